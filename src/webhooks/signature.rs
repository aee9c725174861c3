//! Standard Webhooks signatures (<https://www.standardwebhooks.com>, "Signature scheme"):
//! `webhook-signature: v1,<base64 HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")>`,
//! the key being the base64 part of the `whsec_…` secret. The `hmac`, `sha2` and `base64`
//! crates compute it (RustCrypto's HMAC, not a hand-rolled one).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The prefix of a secret's text form.
pub const PREFIX: &str = "whsec_";
/// Key sizes the specification allows (192 to 512 bits).
pub const KEY_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// A signing key. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// `whsec_` then the base64 of a 24- to 64-byte key. The error never echoes the text.
    pub fn parse(text: &str) -> Result<Secret, String> {
        let b64 = text.trim().strip_prefix(PREFIX).ok_or_else(|| {
            format!("must start with {PREFIX:?} followed by a base64 key (Standard Webhooks)")
        })?;
        let key = STANDARD
            .decode(b64)
            .map_err(|_| format!("the part after {PREFIX:?} is not valid base64"))?;
        if !KEY_BYTES.contains(&key.len()) {
            return Err(format!(
                "the key is {} bytes; Standard Webhooks keys are {} to {} bytes",
                key.len(),
                KEY_BYTES.start(),
                KEY_BYTES.end()
            ));
        }
        Ok(Secret(key))
    }

    /// The `webhook-signature` value for message `id` sent at `timestamp` (Unix seconds).
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        // Any key length is valid for HMAC, so this never fails.
        let mut mac = match <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => return String::new(),
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks reference libraries' tests.
    #[test]
    fn matches_the_reference_vector() {
        let s = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            s.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn bad_secrets_are_refused_without_echo() {
        for bad in [
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_!!!",
            "whsec_c2hvcnQ=",
        ] {
            let e = Secret::parse(bad).unwrap_err();
            assert!(!e.contains("MfKQ") && !e.contains("c2hv"), "{e}");
        }
        assert!(
            !format!(
                "{:?}",
                Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            )
            .contains("MfKQ")
        );
    }
}

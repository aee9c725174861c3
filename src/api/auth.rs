//! Bearer-token authentication for `/v1/*`.
//!
//! The server stores only SHA-256 digests of the accepted tokens (from `--api-token-sha256`,
//! `LADLE_API_TOKEN_SHA256` or `--api-tokens-file`; `ladle hash-token` computes one). A request
//! presents `Authorization: Bearer <token>`; its digest is compared with every stored digest in
//! constant time (no early exit, `subtle`). Health and readiness stay open. Tokens are never
//! logged: the header is marked sensitive and the trace layer does not record headers.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::api::ApiError;
use crate::error::ErrorCode;

/// A SHA-256 digest of an accepted token.
pub type TokenDigest = [u8; 32];

/// The accepted token digests. Empty: authentication is off (loopback or `--insecure-no-auth`).
#[derive(Clone, Default)]
pub struct ApiAuth {
    digests: Arc<Vec<TokenDigest>>,
}

impl std::fmt::Debug for ApiAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiAuth")
            .field("tokens", &self.digests.len())
            .finish()
    }
}

impl ApiAuth {
    pub fn new(digests: Vec<TokenDigest>) -> Self {
        ApiAuth {
            digests: Arc::new(digests),
        }
    }

    /// Whether any token is configured (otherwise every request passes).
    pub fn enabled(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Whether `token` hashes to one of the accepted digests. Every digest is compared, in
    /// constant time, whatever matches.
    pub fn accepts(&self, token: &str) -> bool {
        let digest = token_digest(token);
        let mut ok = subtle::Choice::from(0u8);
        for d in self.digests.iter() {
            ok |= d.ct_eq(&digest);
        }
        bool::from(ok)
    }
}

/// SHA-256 of a token (as `ladle hash-token` prints it, in hex).
pub fn token_digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// Parses a 64-character hex digest (either case); `None` if it is not one.
pub fn parse_digest(hex_digest: &str) -> Option<TokenDigest> {
    let s = hex_digest.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Whether a path is under the authenticated API.
fn is_protected(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/")
}

fn unauthorized(message: &str) -> Response {
    let mut resp = ApiError::new(ErrorCode::Unauthorized, message).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"ladle\""),
    );
    resp
}

/// The middleware: `/v1/*` needs a valid bearer token when tokens are configured.
pub async fn require_token(State(auth): State<ApiAuth>, req: Request, next: Next) -> Response {
    if !auth.enabled() || !is_protected(req.uri().path()) {
        return next.run(req).await;
    }
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return unauthorized("missing bearer token (send `Authorization: Bearer <token>`)");
    };
    let Ok(value) = value.to_str() else {
        return unauthorized("invalid bearer token");
    };
    let token = match value.trim().split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        _ => return unauthorized("the Authorization header must use the Bearer scheme"),
    };
    if token.is_empty() || !auth.accepts(token) {
        return unauthorized("invalid bearer token");
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_roundtrip_and_match() {
        let d = token_digest("s3cret");
        let hex_d = hex::encode(d);
        assert_eq!(parse_digest(&hex_d), Some(d));
        assert_eq!(parse_digest(&hex_d.to_uppercase()), Some(d));
        assert_eq!(parse_digest("s3cret"), None);
        assert_eq!(parse_digest(&hex_d[..63]), None);
        let auth = ApiAuth::new(vec![token_digest("other"), d]);
        assert!(auth.accepts("s3cret"));
        assert!(!auth.accepts("s3cre"));
        assert!(!auth.accepts(""));
        assert!(!ApiAuth::default().enabled());
        assert!(!format!("{auth:?}").contains(&hex_d));
    }

    #[test]
    fn only_v1_is_protected() {
        assert!(is_protected("/v1/merges"));
        assert!(is_protected("/v1"));
        assert!(!is_protected("/v1x"));
        assert!(!is_protected("/healthz"));
        assert!(!is_protected("/readyz"));
    }
}

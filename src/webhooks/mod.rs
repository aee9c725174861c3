//! Signed webhooks: a job's `"notify": {"url": …, "events": […]}`.
//!
//! - **Submit** ([`WebhookConfig::validate`]): the URL parses, names a host of
//!   `--webhook-allowed-hosts` (loopback by default; IP literals in any spelling are matched as
//!   the evaluator's allow-list matches them, names exactly), uses `https`, or plain `http` to
//!   a loopback host only, and carries no credentials; `events` are job states among
//!   [`EVENTS`]. Anything else is refused (400 `invalid_recipe`, `field: "notify"`), as is any
//!   `notify` when the server has no `--webhook-secret`.
//! - **Durable, at least once**: the validated settings are stored on the job (`jobs.notify`);
//!   a trigger on `jobs` writes one `webhook_deliveries` row per event in the statement that
//!   changes the state (see `migrations/*/0005_webhooks.sql`), so a crash between the change
//!   and the POST loses nothing. [`deliver::run`] (in `ladle serve` and `ladle worker`) claims
//!   due rows with a lease, POSTs them and records each attempt.
//! - **Signed** per Standard Webhooks ([`signature`]): `webhook-id` (one per event, the same
//!   on every retry), `webhook-timestamp` (whole seconds), `webhook-signature: v1,<base64
//!   HMAC-SHA256 of "id.timestamp.body">` with the key of `whsec_…`.

pub mod deliver;
pub mod signature;

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::queue::JobState;
use crate::search::evaluator::{AllowedHosts, EvaluatorError};
pub use signature::Secret;

/// The states a webhook can announce, in this order in a stored `events` list.
pub const EVENTS: [JobState; 4] = [
    JobState::Running,
    JobState::Succeeded,
    JobState::Failed,
    JobState::Cancelled,
];

/// `events` when a request gives none: the terminal states.
pub const DEFAULT_EVENTS: [JobState; 3] =
    [JobState::Succeeded, JobState::Failed, JobState::Cancelled];

/// Longest accepted webhook URL.
pub const MAX_URL_LEN: usize = 2048;

/// `notify` as a request gives it (merges and analyses alike).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"url": "https://hooks.example.com/ladle",
                          "events": ["succeeded", "failed", "cancelled"]}))]
pub struct NotifySpec {
    /// Where the events are POSTed: `https://…` (plain `http://` only to a loopback host),
    /// on a host of the server's `--webhook-allowed-hosts`.
    pub url: String,
    /// The state changes to send: `running`, `succeeded`, `failed`, `cancelled` [default:
    /// succeeded, failed, cancelled].
    #[serde(default)]
    #[schema(value_type = Option<Vec<WebhookEvent>>)]
    pub events: Option<Vec<String>>,
}

/// A state change a webhook can announce.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)] // the schema of `events`: they are parsed by hand (see `validate`)
pub enum WebhookEvent {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// Validated webhook settings, as stored on the job (`jobs.notify`) and shown in its view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    pub url: String,
    pub events: Vec<JobState>,
}

impl Notify {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "url": self.url,
            "events": self.events.iter().map(|e| e.as_str()).collect::<Vec<_>>(),
        })
    }
}

/// The server's webhook settings: the signing secret (webhooks are off without one) and the
/// hosts a webhook URL may name.
#[derive(Clone, Default)]
pub struct WebhookConfig {
    pub secret: Option<Secret>,
    pub allowed_hosts: AllowedHosts,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("allowed_hosts", &self.allowed_hosts)
            .finish()
    }
}

impl WebhookConfig {
    /// Check a request's `notify` (see the module doc); the message says what is wrong.
    pub fn validate(&self, spec: &NotifySpec) -> Result<Notify, String> {
        if self.secret.is_none() {
            return Err(
                "webhooks are not enabled on this server (it has no --webhook-secret)".to_string(),
            );
        }
        self.check_url(&spec.url)?;
        let events = match &spec.events {
            None => DEFAULT_EVENTS.to_vec(),
            Some(list) => {
                if list.is_empty() {
                    return Err("events: give at least one event, or leave it out".into());
                }
                for e in list {
                    if !EVENTS.iter().any(|s| s.as_str() == e) {
                        return Err(format!(
                            "events: unknown event {e:?} (running, succeeded, failed, cancelled)"
                        ));
                    }
                }
                EVENTS
                    .into_iter()
                    .filter(|s| list.iter().any(|e| e == s.as_str()))
                    .collect()
            }
        };
        Ok(Notify {
            url: spec.url.clone(),
            events,
        })
    }

    /// The URL rules of submit, checked again before every delivery (the delivering
    /// process's allow-list may differ from the API's).
    pub fn check_url(&self, raw: &str) -> Result<url::Url, String> {
        if raw.len() > MAX_URL_LEN {
            return Err(format!("url: longer than {MAX_URL_LEN} bytes"));
        }
        let url = url::Url::parse(raw).map_err(|e| format!("url: not a URL ({e})"))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err("url: must not carry credentials (user:password@)".into());
        }
        match url.scheme() {
            "https" => {}
            "http" if is_loopback(&url) => {}
            "http" => {
                return Err(format!(
                    "url: plain http is allowed only to a loopback host, not {:?}; use https",
                    url.host_str().unwrap_or_default()
                ));
            }
            other => return Err(format!("url: scheme {other:?} (https or http)")),
        }
        match self.allowed_hosts.check(raw) {
            Ok(()) => Ok(url),
            Err(EvaluatorError::HostNotAllowed { host, allowed }) => Err(format!(
                "url: host {host:?} is not allowed (--webhook-allowed-hosts: {allowed})"
            )),
            Err(e) => Err(format!("url: {e}")),
        }
    }
}

/// A loopback host: an address of `127.0.0.0/8` or `::1` (in any spelling the URL parser
/// reads, e.g. `2130706433` or `0x7f.1`), or the name `localhost`.
fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).to_canonical().is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(hosts: &[&str]) -> WebhookConfig {
        WebhookConfig {
            secret: Some(Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()),
            allowed_hosts: if hosts.is_empty() {
                AllowedHosts::default()
            } else {
                AllowedHosts::parse(&hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())
                    .unwrap()
            },
        }
    }

    fn spec(url: &str, events: Option<&[&str]>) -> NotifySpec {
        NotifySpec {
            url: url.into(),
            events: events.map(|e| e.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn loopback_by_default_in_every_spelling() {
        let c = config(&[]);
        for ok in [
            "http://127.0.0.1:9/hook",
            "http://localhost/hook",
            "http://LOCALHOST/hook",
            "http://[::1]:8080/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://127.1/",
            "https://127.0.0.1/",
        ] {
            assert!(c.validate(&spec(ok, None)).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1/",
            "https://10.0.0.1/",
            "http://169.254.169.254/latest",
            "http://localhost.evil.com/",
            "https://hooks.example.com/x",
            "http://[::ffff:10.0.0.1]/",
            "ftp://127.0.0.1/",
            "http://user:pw@127.0.0.1/",
            "not a url",
        ] {
            assert!(c.validate(&spec(bad, None)).is_err(), "{bad}");
        }
    }

    #[test]
    fn plain_http_only_to_loopback() {
        let c = config(&["hooks.example.com", "10.0.0.0/8"]);
        assert!(
            c.validate(&spec("https://hooks.example.com/x", None))
                .is_ok()
        );
        assert!(c.validate(&spec("https://10.1.2.3/x", None)).is_ok());
        let e = c
            .validate(&spec("http://hooks.example.com/x", None))
            .unwrap_err();
        assert!(e.contains("plain http"), "{e}");
        assert!(c.validate(&spec("http://10.1.2.3/x", None)).is_err());
    }

    #[test]
    fn events_default_dedupe_and_order() {
        let c = config(&[]);
        let n = c.validate(&spec("http://127.0.0.1/", None)).unwrap();
        assert_eq!(n.events, DEFAULT_EVENTS.to_vec());
        let n = c
            .validate(&spec(
                "http://127.0.0.1/",
                Some(&["failed", "running", "failed"]),
            ))
            .unwrap();
        assert_eq!(n.events, vec![JobState::Running, JobState::Failed]);
        assert_eq!(
            n.to_json(),
            serde_json::json!({"url": "http://127.0.0.1/", "events": ["running", "failed"]})
        );
        assert!(c.validate(&spec("http://127.0.0.1/", Some(&[]))).is_err());
        let e = c
            .validate(&spec("http://127.0.0.1/", Some(&["queued"])))
            .unwrap_err();
        assert!(e.contains("queued"), "{e}");
    }

    #[test]
    fn no_secret_no_webhooks() {
        let c = WebhookConfig::default();
        let e = c.validate(&spec("http://127.0.0.1/", None)).unwrap_err();
        assert!(e.contains("--webhook-secret"), "{e}");
        assert!(!format!("{:?}", config(&[])).contains("MfKQ"));
    }
}

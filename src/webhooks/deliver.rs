//! The delivery loop: claim due `webhook_deliveries` rows with a lease, POST each (signed) to
//! its URL, record the outcome. Runs in `ladle serve` and `ladle worker`; any number of
//! processes can run it over one database (a claimed row is held by one of them).
//!
//! - **At least once**: a row stays pending until an attempt gets a 2xx answer. A process that
//!   dies holding rows loses nothing: their lease ([`LEASE`]) expires and any process claims
//!   them again, within a minute of a restart.
//! - **Retries**: after the n-th failed attempt the row is due again after [`RETRY_AFTER`]`[n-1]`
//!   (±10 %): 2 s, 10 s, 1 min, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h, about 27.6 h in all; the
//!   attempt after the last of them that fails gives up (`failed`).
//! - **Order**: the deliveries of one job claimed together go out one after the other, oldest
//!   event first (jobs concurrently); a retry may still arrive after a later event.
//! - **Requests**: `POST` with `content-type: application/json` and the Standard Webhooks
//!   headers, a timeout of [`REQUEST_TIMEOUT`], redirects not followed (a 3xx is a failed
//!   attempt), no proxy from the environment (as the evaluator's client: the allow-list checks
//!   the URL's host), the URL checked against this process's allow-list before every attempt.
//! - **Body** (the same bytes on every retry, stored after the first attempt):
//!   `{"type": "job.<event>", "timestamp": <event time>, "data": {"job_id", "kind", "event",
//!   "job": <the job's view as GET shows it, at the first attempt>}}`.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use chrono::SecondsFormat;
use tokio_util::sync::CancellationToken;

use super::WebhookConfig;
use crate::failpoints::{self, CrashPoint};
use crate::queue::{Delivery, DeliveryOutcome, JobQueue};

/// How long one POST may take (connect, send, answer head).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a claimed delivery stays with its process: well over [`REQUEST_TIMEOUT`].
pub const LEASE: Duration = Duration::from_secs(20);
/// How often the loop looks for due deliveries when nothing woke it.
pub const POLL: Duration = Duration::from_millis(500);
/// Deliveries claimed (and sent concurrently) at once.
pub const BATCH: u32 = 16;
/// The wait after the n-th failed attempt.
pub const RETRY_AFTER: [Duration; 9] = [
    Duration::from_secs(2),
    Duration::from_secs(10),
    Duration::from_secs(60),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(10 * 3600),
];
/// Attempts before a delivery is given up: the first and one per [`RETRY_AFTER`] entry.
pub const MAX_ATTEMPTS: i32 = RETRY_AFTER.len() as i32 + 1;

/// Run until `stop` fires. Returns at once when `config` has no secret (webhooks are off).
pub async fn run(queue: Arc<dyn JobQueue>, config: WebhookConfig, stop: CancellationToken) {
    if config.secret.is_none() {
        tracing::debug!("webhooks off (no --webhook-secret): no delivery loop");
        return;
    }
    let http = match client() {
        Ok(http) => http,
        Err(e) => {
            tracing::error!(error = %e, "webhooks: cannot build the HTTP client; no deliveries");
            return;
        }
    };
    let owner = format!("webhooks-{}-{}", std::process::id(), uuid::Uuid::now_v7());
    let mut changes = queue.job_changes();
    loop {
        let claimed = tokio::select! {
            _ = stop.cancelled() => return,
            c = queue.claim_deliveries(&owner, LEASE, BATCH) => c,
        };
        let full = match claimed {
            Ok(batch) => {
                let n = batch.len();
                // Jobs concurrently; one job's events one after the other, oldest first.
                let mut by_job: BTreeMap<uuid::Uuid, Vec<Delivery>> = BTreeMap::new();
                for d in batch {
                    by_job.entry(d.job_id).or_default().push(d);
                }
                let (queue, http, config) = (queue.as_ref(), &http, &config);
                let sends = futures::future::join_all(by_job.into_values().map(|mut ds| {
                    ds.sort_by_key(|d| d.created_at);
                    async move {
                        for d in ds {
                            deliver_one(queue, http, config, d).await;
                        }
                    }
                }));
                tokio::select! {
                    // Unfinished rows keep their lease and are sent again once it expires.
                    _ = stop.cancelled() => return,
                    _ = sends => {}
                }
                n == BATCH as usize
            }
            Err(e) => {
                tracing::warn!(error = %e, "webhooks: cannot claim deliveries");
                false
            }
        };
        if full {
            continue;
        }
        // A state change on Postgres (which is when deliveries appear) wakes the loop early.
        let hint = async {
            match changes.as_mut() {
                Some(rx) => {
                    let _ = rx.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
            _ = hint => {}
        }
    }
}

fn client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(REQUEST_TIMEOUT / 2)
        .user_agent(concat!("ladle-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// One attempt of one claimed delivery, recorded (fenced) when it ends.
async fn deliver_one(
    queue: &dyn JobQueue,
    http: &reqwest::Client,
    config: &WebhookConfig,
    d: Delivery,
) {
    failpoints::crash(CrashPoint::BeforeWebhook);
    let payload = match &d.payload {
        Some(p) => Ok(Some(p.clone())),
        None => payload(queue, &d).await,
    };
    let (payload, outcome, label) = match payload {
        Ok(Some(p)) => match config.check_url(&d.url) {
            Ok(url) => {
                let (outcome, label) = post(http, config, &d, url, &p).await;
                (p, outcome, label)
            }
            Err(e) => (
                p,
                DeliveryOutcome::GaveUp {
                    status: None,
                    error: format!("not sent: {e}"),
                },
                "refused",
            ),
        },
        // The job was pruned: its rows went with it (the fenced record below changes nothing).
        Ok(None) => return,
        Err(e) => {
            // The lease expires and the row is claimed again.
            tracing::warn!(delivery = %d.id, error = %e, "webhooks: cannot read the job");
            return;
        }
    };
    crate::metrics::webhook_call(label);
    match queue.record_delivery(&d, &payload, &outcome).await {
        Ok(true) => match &outcome {
            DeliveryOutcome::Delivered { status } => tracing::info!(
                delivery = %d.id, job = %d.job_id, event = d.event.as_str(), status,
                attempt = d.attempts, "webhook delivered"
            ),
            DeliveryOutcome::Retry { error, after, .. } => tracing::warn!(
                delivery = %d.id, job = %d.job_id, event = d.event.as_str(), %error,
                attempt = d.attempts, retry_in_s = after.as_secs_f64(), "webhook failed; will retry"
            ),
            DeliveryOutcome::GaveUp { error, .. } => tracing::warn!(
                delivery = %d.id, job = %d.job_id, event = d.event.as_str(), %error,
                attempt = d.attempts, "webhook failed; giving up"
            ),
        },
        Ok(false) => {
            tracing::debug!(delivery = %d.id, "webhooks: the lease on the delivery was lost")
        }
        Err(e) => {
            tracing::warn!(delivery = %d.id, error = %e, "webhooks: cannot record the attempt")
        }
    }
}

/// The body of `d`: the event and the job's view now. `None` when the job is gone.
async fn payload(
    queue: &dyn JobQueue,
    d: &Delivery,
) -> Result<Option<String>, crate::queue::QueueError> {
    let Some(job) = queue.get(d.job_id).await? else {
        return Ok(None);
    };
    let kind = job.kind;
    let body = serde_json::json!({
        "type": format!("job.{}", d.event.as_str()),
        "timestamp": d.created_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        "data": {
            "job_id": d.job_id,
            "kind": kind.as_str(),
            "event": d.event.as_str(),
            "job": crate::api::JobView::from(job),
        },
    });
    serde_json::to_string(&body)
        .map(Some)
        .map_err(|e| crate::queue::QueueError::Corrupt(format!("webhook body: {e}")))
}

/// POST `body` to `url`, signed; the outcome and its metric label.
async fn post(
    http: &reqwest::Client,
    config: &WebhookConfig,
    d: &Delivery,
    url: url::Url,
    body: &str,
) -> (DeliveryOutcome, &'static str) {
    let Some(secret) = &config.secret else {
        return (
            retry_or_give_up(d, None, "no --webhook-secret in this process".into()),
            "refused",
        );
    };
    let timestamp = chrono::Utc::now().timestamp();
    let signature = secret.sign(&d.id, timestamp, body.as_bytes());
    let sent = http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", &d.id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body.to_string())
        .send()
        .await;
    match sent {
        Ok(resp) if resp.status().is_success() => (
            DeliveryOutcome::Delivered {
                status: resp.status().as_u16(),
            },
            "delivered",
        ),
        Ok(resp) => {
            let status = resp.status();
            let mut error = format!("the receiver answered {status}");
            if status.is_redirection() {
                error.push_str(" (redirects are not followed)");
            }
            (
                retry_or_give_up(d, Some(status.as_u16()), error),
                "http_error",
            )
        }
        Err(e) => (retry_or_give_up(d, None, describe(&e)), "network_error"),
    }
}

/// A failed attempt: due again after the schedule's wait, or given up after the last.
fn retry_or_give_up(d: &Delivery, status: Option<u16>, error: String) -> DeliveryOutcome {
    let n = usize::try_from(d.attempts.max(1) - 1).unwrap_or(0);
    match RETRY_AFTER.get(n) {
        Some(wait) if d.attempts < MAX_ATTEMPTS => DeliveryOutcome::Retry {
            status,
            error,
            after: jitter(*wait),
        },
        _ => DeliveryOutcome::GaveUp {
            status,
            error: format!("{error}; gave up after {} attempts", d.attempts),
        },
    }
}

/// `wait` scaled by a random factor in [0.9, 1.1], so receivers coming back are not hit by
/// every retry at once.
fn jitter(wait: Duration) -> Duration {
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let per_mille = 900 + r % 201;
    wait.mul_f64(per_mille as f64 / 1000.0)
}

/// A transport error in words, without the URL (the view shows it already).
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return format!("no answer within {} s", REQUEST_TIMEOUT.as_secs());
    }
    let mut text = if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "the request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(attempts: i32) -> Delivery {
        Delivery {
            id: "msg_x".into(),
            job_id: uuid::Uuid::nil(),
            event: crate::queue::JobState::Succeeded,
            url: "http://127.0.0.1/".into(),
            created_at: chrono::Utc::now(),
            attempts,
            owner: "o".into(),
            payload: None,
        }
    }

    #[test]
    fn retries_for_about_a_day_then_give_up() {
        let total: Duration = RETRY_AFTER.iter().sum();
        assert!(
            (Duration::from_secs(20 * 3600)..Duration::from_secs(30 * 3600)).contains(&total),
            "{total:?}"
        );
        assert!(RETRY_AFTER[0] <= Duration::from_secs(5));
        match retry_or_give_up(&delivery(1), Some(500), "x".into()) {
            DeliveryOutcome::Retry { after, .. } => {
                assert!(
                    after >= Duration::from_millis(1800) && after <= Duration::from_millis(2200)
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            retry_or_give_up(&delivery(MAX_ATTEMPTS - 1), None, "x".into()),
            DeliveryOutcome::Retry { .. }
        ));
        assert!(matches!(
            retry_or_give_up(&delivery(MAX_ATTEMPTS), None, "x".into()),
            DeliveryOutcome::GaveUp { .. }
        ));
    }
}

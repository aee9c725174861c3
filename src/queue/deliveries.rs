//! Webhook delivery rows (`webhook_deliveries`): what the delivery loop claims and records,
//! and what a job's view shows. The rows are written by a trigger on `jobs` in the same
//! statement as the state change they announce (see `migrations/*/0005_webhooks.sql`); the
//! queue only claims, records and lists them.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::{JobState, QueueError, QueueResult};

/// A delivery a process now holds: claimed with a lease, `attempts` already counting this one.
/// Every write about it is fenced on `(id, owner, attempts)`.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message id (`webhook-id`), the same on every retry.
    pub id: String,
    pub job_id: Uuid,
    pub event: JobState,
    pub url: String,
    /// When the event happened (the state change).
    pub created_at: DateTime<Utc>,
    pub attempts: i32,
    pub owner: String,
    /// The body sent by an earlier attempt (retries send the same bytes); `None` at first.
    pub payload: Option<String>,
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// The receiver answered 2xx.
    Delivered { status: u16 },
    /// Failed; due again after `after`.
    Retry {
        status: Option<u16>,
        error: String,
        after: Duration,
    },
    /// Failed for good (retries exhausted, or the delivery can no longer be made).
    GaveUp { status: Option<u16>, error: String },
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Not delivered yet; due at `next_attempt_at`.
    Pending,
    Delivered,
    /// Given up.
    Failed,
}

/// One delivery as a job's view shows it (`notify.deliveries`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeliveryRecord {
    /// The `webhook-id` header: one per event, the same on every retry.
    #[schema(example = "msg_5f1c0b1e9d2a4c7b8e6f3a2d1c0b9a8e")]
    pub id: String,
    /// The state change announced (`running`, `succeeded`, `failed`, `cancelled`).
    pub event: JobState,
    pub state: DeliveryState,
    /// Attempts so far.
    pub attempts: i32,
    /// The HTTP status of the last answer (none when the last attempt got no answer).
    pub last_status: Option<i32>,
    /// Why the last attempt failed (none after a success).
    pub last_error: Option<String>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// When a pending delivery is tried next.
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// An `event` column value as a state; anything else is a corrupt row.
pub(crate) fn parse_event(s: &str) -> QueueResult<JobState> {
    JobState::parse(s).ok_or_else(|| QueueError::Corrupt(format!("unknown webhook event {s:?}")))
}

/// The state of a row from its end columns.
pub(crate) fn delivery_state(delivered: bool, failed: bool) -> DeliveryState {
    match (delivered, failed) {
        (true, _) => DeliveryState::Delivered,
        (false, true) => DeliveryState::Failed,
        (false, false) => DeliveryState::Pending,
    }
}

/// Longest error text stored per attempt.
pub(crate) const MAX_ERROR_CHARS: usize = 500;

/// `error`, cut to [`MAX_ERROR_CHARS`] characters.
pub(crate) fn short_error(error: &str) -> String {
    error.chars().take(MAX_ERROR_CHARS).collect()
}

//! The job queue: job rows, the state machine, claim with a lease, heartbeats, retry, cancel.
//!
//! One object-safe trait, [`JobQueue`], with a SQLite backend (the single-machine default) and a
//! Postgres backend (production). Every write a worker makes after its claim is fenced on the
//! [`Lease`] `(job_id, owner, attempt)`: a worker that lost its lease changes nothing.
//! See `../shared/reference/QUEUE.md` §4 for the design this follows.

pub mod deliveries;
pub mod postgres;
pub mod sqlite;
pub mod state;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::ErrorCode;
pub use deliveries::{Delivery, DeliveryOutcome, DeliveryRecord, DeliveryState};

/// Lifecycle state of a job. Stored as text with a CHECK constraint in both backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        Some(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// What a job does: a merge writes a soup to its output; an analysis (diagnostics) writes
/// nothing and leaves its numbers in the job's `result`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    #[default]
    Merge,
    Analysis,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Merge => "merge",
            JobKind::Analysis => "analysis",
        }
    }

    pub fn parse(s: &str) -> Option<JobKind> {
        match s {
            "merge" => Some(JobKind::Merge),
            "analysis" => Some(JobKind::Analysis),
            _ => None,
        }
    }

    /// A `kind` column value; anything else is a corrupt row.
    pub(crate) fn parse_column(s: &str) -> QueueResult<JobKind> {
        JobKind::parse(s).ok_or_else(|| QueueError::Corrupt(format!("unknown job kind {s:?}")))
    }
}

/// What an error stored on a job looks like (`error` column, and each entry of `errors`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default)]
    pub retryable: bool,
    /// The attempt that failed, as the queue stored it ([`state::error_entry`]); `None` in an
    /// error a worker reports (the queue takes the attempt from the lease).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
}

/// A job to insert.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// UUIDv7, made by the caller (time-ordered: newest-first listing orders by id).
    pub id: Uuid,
    pub kind: JobKind,
    pub idempotency_key: Option<String>,
    /// SHA-256 of the normalized recipe; detects an idempotency key reused with another body.
    pub request_hash: Vec<u8>,
    /// The output folder's resolved URL (links followed, normalized: column `output_url`);
    /// at most one queued/running job per key, however each recipe spells the folder.
    /// Analyses, which write nothing, use the per-job `analysis:<id>`. Never shown.
    pub output_key: String,
    /// The output as the recipe writes it: what an [`QueueError::OutputInUse`] names.
    pub output_uri: String,
    /// The normalized recipe, as JSON.
    pub recipe: serde_json::Value,
    /// Higher runs first.
    pub priority: i32,
    pub max_attempts: i32,
    /// The validated webhook settings (`webhooks::Notify` as JSON: `url`, `events`); each
    /// change of the job's state to one of `events` then writes a delivery row.
    pub notify: Option<serde_json::Value>,
}

/// A job row as the API and workers see it.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub id: Uuid,
    pub kind: JobKind,
    pub idempotency_key: Option<String>,
    pub state: JobState,
    pub priority: i32,
    pub attempts: i32,
    pub max_attempts: i32,
    /// [`NewJob::output_key`] (column `output_url`); never shown.
    #[serde(skip)]
    pub output_key: String,
    pub recipe: serde_json::Value,
    pub run_after: DateTime<Utc>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub heartbeat_at: Option<DateTime<Utc>>,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub progress: Option<serde_json::Value>,
    pub result: Option<serde_json::Value>,
    pub error: Option<JobError>,
    /// Per-attempt error history (oldest first).
    pub errors: Vec<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// Set by the reaper when it gave this merge its one recovery-only run (its last worker
    /// stopped heartbeating with attempts exhausted). A worker claiming it merges nothing: it
    /// completes the job if this recipe's manifest is published, else fails it.
    pub recovery_only: bool,
    /// The job's webhook settings (`url`, `events`), if it has any.
    pub notify: Option<serde_json::Value>,
}

/// Result of [`JobQueue::enqueue`].
#[derive(Debug, Clone)]
pub struct Enqueued {
    pub job: Job,
    /// `false` when an existing job with the same idempotency key and body was returned.
    pub created: bool,
}

/// The fencing token every write after a claim carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lease {
    pub job_id: Uuid,
    pub owner: String,
    /// The job's `attempts` value right after this claim.
    pub attempt: i32,
}

/// A job a worker now holds.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub lease: Lease,
    pub job: Job,
}

/// Answer to a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatOutcome {
    /// The lease was extended. `cancel_requested`: stop, clean up, then `acknowledge_cancel`.
    Held { cancel_requested: bool },
    /// Another worker (or the reaper) owns the job now: stop and publish nothing.
    Lost,
}

/// Answer to a cancel request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job was queued and is now `cancelled`.
    Cancelled,
    /// The job is running; its worker will stop within a heartbeat.
    Requested,
    /// The job was already finished in this state (nothing changed).
    AlreadyFinished(JobState),
    /// No such job.
    NotFound,
}

/// Listing filter; newest first, keyset-paginated by id (UUIDv7 is time-ordered).
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub state: Option<JobState>,
    /// Only jobs of this kind (all kinds when `None`).
    pub kind: Option<JobKind>,
    /// Maximum rows (the caller clamps it).
    pub limit: u32,
    /// Return only jobs with `id < before` (the last id of the previous page).
    pub before: Option<Uuid>,
}

/// Timing parameters of the queue (QUEUE.md §4.5).
#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub lease_ttl: Duration,
    /// Backoff base: `base · 2^(attempt−1)`, capped, ±20 % jitter.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            lease_ttl: Duration::from_secs(60),
            backoff_base: Duration::from_secs(30),
            backoff_cap: Duration::from_secs(30 * 60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the lease on job {0} is no longer held by this worker")]
    LeaseLost(Uuid),
    #[error("idempotency key {0:?} was already used with a different request body")]
    IdempotencyKeyReused(String),
    #[error("another queued or running job already writes to {0}")]
    OutputInUse(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt job row: {0}")]
    Corrupt(String),
    /// The database cannot store writes now for a reason outside it: its file was deleted or
    /// replaced while the service runs (SQLite), or it reports itself read-only.
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

impl QueueError {
    pub fn code(&self) -> ErrorCode {
        match self {
            QueueError::LeaseLost(_) => ErrorCode::LeaseExpired,
            QueueError::IdempotencyKeyReused(_) => ErrorCode::IdempotencyKeyReused,
            QueueError::OutputInUse(_) => ErrorCode::OutputInUse,
            QueueError::Database(e) if is_unavailable(e) => ErrorCode::DatabaseUnavailable,
            QueueError::Unavailable(_) => ErrorCode::DatabaseUnavailable,
            QueueError::Database(_) | QueueError::Migrate(_) => ErrorCode::DatabaseError,
            QueueError::Corrupt(_) => ErrorCode::Internal,
        }
    }
}

/// Whether `e` says the database cannot be reached or cannot store writes (as opposed to a
/// statement that failed): a full disk, a read-only or unopenable file, an I/O error, a lost
/// connection. Such failures are `database_unavailable` (503), which clients and the queue
/// retry.
///
/// - SQLite (primary result codes): `SQLITE_READONLY` (8), `SQLITE_IOERR` (10),
///   `SQLITE_CORRUPT` (11), `SQLITE_FULL` (13), `SQLITE_CANTOPEN` (14), `SQLITE_NOTADB` (26).
/// - Postgres (SQLSTATE): class `53` (insufficient resources: `53100` disk full), class `08`
///   (connection exception), `25006` (read-only transaction), `57P01`–`57P03` (shutting down,
///   cannot connect now), `58030` (I/O error).
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => {
            let Some(code) = db.code() else { return false };
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                // The extended code: the primary code is its low byte.
                code.parse::<i32>()
                    .is_ok_and(|c| matches!(c & 0xff, 8 | 10 | 11 | 13 | 14 | 26))
            } else {
                code.starts_with("53")
                    || code.starts_with("08")
                    || matches!(&*code, "25006" | "57P01" | "57P02" | "57P03" | "58030")
            }
        }
        _ => false,
    }
}

pub type QueueResult<T> = Result<T, QueueError>;

/// The queue. Object-safe; the app holds an `Arc<dyn JobQueue>`.
#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    /// Which backend ("sqlite" or "postgres"), for logs and `/readyz`.
    fn backend(&self) -> &'static str;

    /// Insert a job, idempotently on `idempotency_key` (same key + same hash → the existing job,
    /// `created = false`; same key + other hash → `IdempotencyKeyReused`). A live job already
    /// writing to `output_key` → `OutputInUse`. Wakes waiting workers.
    async fn enqueue(&self, job: NewJob) -> QueueResult<Enqueued>;

    /// Claim the next runnable job (highest priority, then oldest `run_after`, then id) in one
    /// statement; `attempts` grows by one and the lease runs for `lease_ttl`.
    async fn claim(&self, owner: &str) -> QueueResult<Option<ClaimedJob>>;

    /// Extend the lease (fenced) and store progress if given; reports a pending cancel.
    async fn heartbeat(
        &self,
        lease: &Lease,
        progress: Option<&serde_json::Value>,
    ) -> QueueResult<HeartbeatOutcome>;

    /// Fenced: `running → succeeded` with `result`. `LeaseLost` if the fence does not match.
    async fn complete(&self, lease: &Lease, result: &serde_json::Value) -> QueueResult<()>;

    /// Fenced: record `error`; `queued` again with backoff if retryable and attempts remain,
    /// `cancelled` if a cancel was requested, else `failed`. Returns the new state.
    async fn fail(&self, lease: &Lease, error: &JobError) -> QueueResult<JobState>;

    /// Fenced: the owner stopped after a cancel request → `cancelled`.
    async fn acknowledge_cancel(&self, lease: &Lease) -> QueueResult<()>;

    /// Fenced: graceful shutdown; back to `queued` at once without charging the attempt
    /// (`max_attempts` grows by one, `attempts` never decreases).
    async fn release(&self, lease: &Lease) -> QueueResult<()>;

    /// Cancel: a queued job becomes `cancelled` at once; a running one is marked.
    async fn request_cancel(&self, id: Uuid) -> QueueResult<CancelOutcome>;

    /// Expired leases → `queued` (with backoff), `cancelled` (cancel requested), or, with
    /// attempts exhausted, `queued` at once for one recovery-only run (a merge not recovered
    /// before: `max_attempts + 1`, `recovery_only` set) else `failed`; in one conditional
    /// statement (`state::after_lease_expiry`). Returns how many rows changed.
    async fn reap_expired(&self) -> QueueResult<u64>;

    async fn get(&self, id: Uuid) -> QueueResult<Option<Job>>;

    async fn list(&self, filter: &ListFilter) -> QueueResult<Vec<Job>>;

    /// Delete terminal jobs finished before `older_than`, in batches. Returns rows deleted.
    async fn prune(&self, older_than: DateTime<Utc>, batch: u32) -> QueueResult<u64>;

    /// How many jobs are in each state (states without jobs may be absent): one grouped
    /// count, for the `ladle_jobs{state}` gauge.
    async fn count_by_state(&self) -> QueueResult<Vec<(JobState, u64)>>;
    /// Readiness, for `/readyz`: the database answers and can store a write (SQLite: a
    /// committed write to the file, which must still be the file opened at start; Postgres:
    /// a server that is neither read-only nor in recovery).
    async fn ping(&self) -> QueueResult<()>;

    /// Hints that a running job's cancel was requested (its id): on Postgres every
    /// `NOTIFY ladle_cancel` from any instance, on SQLite the cancels requested through this
    /// process. A worker beats at once on a hint for its job, so the cancel is seen in
    /// milliseconds instead of at the next heartbeat; hints may be missed (a lagging
    /// receiver, a dropped listener), heartbeats remain the guarantee.
    fn cancel_hints(&self) -> tokio::sync::broadcast::Receiver<Uuid>;

    /// Jobs changed (inserted or updated: state, progress, heartbeat) at or after `since`,
    /// oldest change first, at most `limit`: what `GET /v1/events` follows.
    async fn changed_since(&self, since: DateTime<Utc>, limit: u32) -> QueueResult<Vec<Job>>;

    /// Hints that a job row changed (its id), from any process: on Postgres every
    /// `NOTIFY ladle_job_changed` (a trigger on `jobs`); `None` where there are none (SQLite),
    /// and the event streams poll. Hints may be missed; polling remains the guarantee.
    fn job_changes(&self) -> Option<tokio::sync::broadcast::Receiver<Uuid>> {
        None
    }

    /// Wait until new work may be available (an enqueue in this process, or a NOTIFY on
    /// Postgres) or `max` elapses, whichever is first. Polling is still the guarantee.
    async fn wait_for_work(&self, max: Duration);

    /// Claim up to `limit` webhook deliveries that are due (pending, `next_attempt_at` passed,
    /// no live lease), oldest due first, in one statement: each gets `owner` and a lease of
    /// `lease`, and its `attempts` grows by one. Two processes never hold one row at once
    /// (Postgres: `FOR UPDATE SKIP LOCKED`; SQLite: one writer).
    async fn claim_deliveries(
        &self,
        owner: &str,
        lease: Duration,
        limit: u32,
    ) -> QueueResult<Vec<Delivery>>;

    /// Fenced on `(id, owner, attempts)`: record how the attempt ended (and the body it sent,
    /// kept for the retries) and release the lease. `false` when the fence did not match (the
    /// lease expired and another process claimed the row, or the job was pruned).
    async fn record_delivery(
        &self,
        delivery: &Delivery,
        payload: &str,
        outcome: &DeliveryOutcome,
    ) -> QueueResult<bool>;

    /// A job's deliveries, oldest event first.
    async fn deliveries(&self, job_id: Uuid) -> QueueResult<Vec<DeliveryRecord>>;
}

/// `(state column, count)` rows → typed counts; an unknown state is a corrupt row.
pub(crate) fn state_counts(rows: Vec<(String, i64)>) -> QueueResult<Vec<(JobState, u64)>> {
    rows.into_iter()
        .map(|(s, n)| {
            JobState::parse(&s)
                .map(|state| (state, n.max(0) as u64))
                .ok_or_else(|| QueueError::Corrupt(format!("unknown job state {s:?}")))
        })
        .collect()
}

/// Capacity of the cancel-hint channel: a receiver further behind only loses hints.
pub(crate) const CANCEL_HINTS: usize = 256;

/// Open the queue named by `database_url` and, when `migrate` is true, apply its migrations.
///
/// - `postgres://…` or `postgresql://…` → [`postgres::PostgresQueue`] (it also starts the
///   `LISTEN` task that turns notifications into wake-ups).
/// - anything else (`sqlite:///abs/path/ladle.db`, `sqlite:ladle.db`, `sqlite::memory:`) →
///   [`sqlite::SqliteQueue`], creating the database file if it is missing.
pub async fn connect(
    database_url: &str,
    config: QueueConfig,
    migrate: bool,
) -> QueueResult<std::sync::Arc<dyn JobQueue>> {
    if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
        let queue = postgres::PostgresQueue::connect(database_url, config).await?;
        if migrate {
            queue.migrate().await?;
        }
        Ok(std::sync::Arc::new(queue))
    } else {
        let queue = sqlite::SqliteQueue::connect(database_url, config).await?;
        if migrate {
            queue.migrate().await?;
        }
        Ok(std::sync::Arc::new(queue))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::{ConnectOptions, Connection, Executor};

    /// A real `SQLITE_READONLY` (a read-only connection writing) is `database_unavailable`; a
    /// statement that fails on its own (no such table) stays `database_error`.
    #[tokio::test]
    async fn read_only_sqlite_is_unavailable_a_bad_statement_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(dir.path().join("t.db"))
            .create_if_missing(true);
        let mut rw = options.connect().await.unwrap();
        rw.execute("CREATE TABLE t (x INTEGER)").await.unwrap();
        rw.close().await.unwrap();
        let mut ro = options.read_only(true).connect().await.unwrap();
        let e = ro.execute("INSERT INTO t VALUES (1)").await.unwrap_err();
        assert!(is_unavailable(&e), "{e}");
        assert_eq!(
            QueueError::Database(e).code(),
            ErrorCode::DatabaseUnavailable
        );
        let e = ro.execute("INSERT INTO nope VALUES (1)").await.unwrap_err();
        assert!(!is_unavailable(&e), "{e}");
        assert_eq!(QueueError::Database(e).code(), ErrorCode::DatabaseError);
    }
}

//! Postgres backend of the job queue: production, many workers on many machines (QUEUE.md §4).
//!
//! - **Schema**: `migrations/postgres/0001_jobs.sql`, with the state-machine invariants as CHECK
//!   constraints, embedded with [`sqlx::migrate!`].
//! - **Time**: always the database clock. Leases, `run_after`, and every timestamp are written
//!   with `now()` in SQL; the only durations bound from the application are the configured
//!   lease TTL and backoff delays (`make_interval(secs => …)`).
//! - **Claim**: one `UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED LIMIT 1)`, so
//!   concurrent claimers skip each other's rows instead of queueing behind them.
//! - **Every other transition** is one conditional `UPDATE` re-evaluated by Postgres on the
//!   latest row version, fenced on `(id, lease_owner, attempts, state = 'running')` after a
//!   claim. Only `enqueue` and `request_cancel` use a transaction, to send their `NOTIFY` only
//!   when the change commits.
//! - **Wake-ups**: `enqueue` (and `release`) notify channel `ladle_jobs`, `request_cancel` of a
//!   running job notifies `ladle_cancel` (payload: the job id). A background task `LISTEN`s on
//!   both, on a dedicated connection, and signals an in-process [`Notify`]; each (re)connect of
//!   the listener also signals, because notifications sent while it was disconnected are lost.
//!   Polling remains the guarantee: `wait_for_work` always returns by its timeout.
//! - **Commits are checked**: sqlx's Postgres `fetch_optional` reads every message up to
//!   `ReadyForQuery` (so an error raised at an autocommit statement's commit is returned, unlike
//!   SQLite's, see `sqlite.rs`), and the transactions end in a checked `commit`.
//!   [`PostgresQueue::ping`] refuses a server that is read-only or in recovery.
//!
//! The URL may carry libpq options, e.g. `postgres://host/db?options=-csearch_path%3Dladle` to
//! keep the `jobs` table (and the migrations table) in another schema.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use uuid::Uuid;

mod deliveries;

use super::state;
use super::{
    CancelOutcome, ClaimedJob, Delivery, DeliveryOutcome, DeliveryRecord, Enqueued,
    HeartbeatOutcome, Job, JobError, JobKind, JobQueue, JobState, Lease, ListFilter, NewJob,
    QueueConfig, QueueError, QueueResult,
};

/// The embedded Postgres migrations (`migrations/postgres`).
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// Channel notified when a job becomes runnable now (enqueue, release).
pub const JOBS_CHANNEL: &str = "ladle_jobs";
/// Channel notified when a running job's cancel is requested; the payload is the job id.
pub const CANCEL_CHANNEL: &str = "ladle_cancel";
/// Every insert or update of a job row (trigger `jobs_notify_changed`, payload: the id).
pub const CHANGED_CHANNEL: &str = "ladle_job_changed";

/// Every column a [`Job`] is built from, in `SELECT` / `RETURNING` lists.
const JOB_COLUMNS: &str = "id, kind, idempotency_key, state, priority, attempts, max_attempts, \
     output_url, recipe, run_after, lease_owner, lease_expires_at, heartbeat_at, \
     cancel_requested_at, progress, result, error, errors, created_at, started_at, \
     finished_at, updated_at, recovery_only, notify";

/// The fence every write after a claim carries: `$1` id, `$2` owner, `$3` attempt.
const FENCE: &str = "id = $1 AND lease_owner = $2 AND attempts = $3 AND state = 'running'";

/// The name of the unique index that allows one live job per output URL (see the migration).
const ACTIVE_OUTPUT_INDEX: &str = "jobs_active_output_url";

/// The reaper's "one recovery-only run" case (`state::grants_recovery`): a merge whose attempts
/// ran out, no cancel pending, not recovered before.
const RECOVERY: &str = "(cancel_requested_at IS NULL AND attempts >= max_attempts \
     AND NOT recovery_only AND kind = 'merge')";

/// The default batch size of [`JobQueue::prune`] when the caller passes 0.
const DEFAULT_PRUNE_BATCH: u32 = 1000;

/// How often `enqueue` re-tries when the row its idempotency key collided with vanished before
/// it could be read (pruned in between).
const ENQUEUE_TRIES: usize = 3;

/// Connections in the main pool (the listener has its own).
const POOL_SIZE: u32 = 16;

/// The Postgres job queue. Share it behind an `Arc`; dropping it stops its listener task.
pub struct PostgresQueue {
    pool: PgPool,
    config: QueueConfig,
    work: Arc<Notify>,
    cancels: tokio::sync::broadcast::Sender<Uuid>,
    /// Ids from `NOTIFY ladle_job_changed` (the `jobs` trigger), for the event streams.
    changes: tokio::sync::broadcast::Sender<Uuid>,
    listener: JoinHandle<()>,
}

impl Drop for PostgresQueue {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl PostgresQueue {
    /// Connect to the database at `url` (`postgres://…` or `postgresql://…`) and start the
    /// `LISTEN` task. Migrations are not run: call [`PostgresQueue::migrate`].
    pub async fn connect(url: &str, config: QueueConfig) -> QueueResult<Self> {
        let options = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .connect_with(options.clone())
            .await?;
        // A dedicated one-connection pool: the listener holds its connection for good and must
        // not take a slot that claims and heartbeats need.
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with(options);
        let work = Arc::new(Notify::new());
        let cancels = tokio::sync::broadcast::channel(super::CANCEL_HINTS).0;
        let changes = tokio::sync::broadcast::channel(super::CANCEL_HINTS).0;
        let listener = tokio::spawn(listen(
            listen_pool,
            work.clone(),
            cancels.clone(),
            changes.clone(),
        ));
        Ok(PostgresQueue {
            pool,
            config,
            work,
            cancels,
            changes,
            listener,
        })
    }

    /// Apply the embedded migrations (`migrations/postgres`). Idempotent; concurrent callers
    /// serialize on sqlx's migration advisory lock.
    pub async fn migrate(&self) -> QueueResult<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// The connection pool (test support: direct SQL against the schema).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// **Test support, not part of [`JobQueue`].** Move the lease of running job `id` one
    /// second into the past (database clock), as if its worker had stopped heartbeating, so
    /// tests exercise the reaper without sleeping. A no-op when the job is not running.
    pub async fn expire_lease_now(&self, id: Uuid) -> QueueResult<()> {
        sqlx::query(
            "UPDATE jobs SET lease_expires_at = now() - interval '1 second' \
             WHERE id = $1 AND state = 'running'",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Wake every task in `wait_for_work` of this process, or the next one to call it.
    fn wake(&self) {
        wake(&self.work);
    }

    async fn find_by_key(&self, key: &str) -> QueueResult<Option<(Job, Vec<u8>)>> {
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS}, request_hash FROM jobs WHERE idempotency_key = $1"
        ))
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => {
                let hash: Vec<u8> = row.try_get("request_hash")?;
                Ok(Some((job_from_row(&row)?, hash)))
            }
            None => Ok(None),
        }
    }

    /// The outcome of a fenced write that returns no data: one row changed, or `LeaseLost`.
    fn fenced(lease: &Lease, rows: u64) -> QueueResult<()> {
        if rows == 1 {
            Ok(())
        } else {
            Err(QueueError::LeaseLost(lease.job_id))
        }
    }
}

#[async_trait]
impl JobQueue for PostgresQueue {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn enqueue(&self, job: NewJob) -> QueueResult<Enqueued> {
        let insert = format!(
            "INSERT INTO jobs (id, idempotency_key, request_hash, output_url, recipe, state, \
                               priority, max_attempts, run_after, created_at, updated_at, kind, \
                               notify) \
             VALUES ($1, $2, $3, $4, $5, 'queued', $6, $7, now(), now(), now(), $8, $9) \
             ON CONFLICT (idempotency_key) DO NOTHING \
             RETURNING {JOB_COLUMNS}"
        );
        for _ in 0..ENQUEUE_TRIES {
            let mut tx = self.pool.begin().await?;
            let inserted = sqlx::query(&insert)
                .bind(job.id)
                .bind(job.idempotency_key.as_deref())
                .bind(&job.request_hash)
                .bind(&job.output_key)
                .bind(&job.recipe)
                .bind(job.priority)
                .bind(job.max_attempts)
                .bind(job.kind.as_str())
                .bind(job.notify.as_ref())
                .fetch_optional(&mut *tx)
                .await;
            let output_conflict = match inserted {
                Ok(Some(row)) => {
                    let created = job_from_row(&row)?;
                    // Delivered to listeners only if the insert commits.
                    sqlx::query("SELECT pg_notify($1, '')")
                        .bind(JOBS_CHANNEL)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    self.wake();
                    return Ok(Enqueued {
                        job: created,
                        created: true,
                    });
                }
                // The idempotency key exists already (committed: a concurrent insert of the
                // same key is waited for by ON CONFLICT).
                Ok(None) => false,
                Err(e) if is_output_conflict(&e) => true,
                Err(e) => return Err(e.into()),
            };
            tx.rollback().await?;
            let Some(key) = job.idempotency_key.as_deref() else {
                return Err(QueueError::OutputInUse(job.output_uri));
            };
            // A replay of a live job may also collide on its output URL: the key decides first.
            match self.find_by_key(key).await? {
                Some((existing, hash)) if hash == job.request_hash => {
                    return Ok(Enqueued {
                        job: existing,
                        created: false,
                    });
                }
                Some(_) => return Err(QueueError::IdempotencyKeyReused(key.to_string())),
                None if output_conflict => return Err(QueueError::OutputInUse(job.output_uri)),
                // The conflicting row was pruned between the insert and the look-up: retry.
                None => continue,
            }
        }
        Err(QueueError::Corrupt(format!(
            "enqueue of job {}: idempotency key conflict without a matching row",
            job.id
        )))
    }

    async fn claim(&self, owner: &str) -> QueueResult<Option<ClaimedJob>> {
        let sql = format!(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = $1, \
                 lease_expires_at = now() + make_interval(secs => $2), heartbeat_at = now(), \
                 started_at = coalesce(started_at, now()), updated_at = now() \
             WHERE id = (SELECT id FROM jobs \
                         WHERE state = 'queued' AND run_after <= now() \
                         ORDER BY priority DESC, run_after, id \
                         LIMIT 1 FOR UPDATE SKIP LOCKED) \
             RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(owner)
            .bind(state::duration_secs(self.config.lease_ttl))
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let job = job_from_row(&row)?;
        Ok(Some(ClaimedJob {
            lease: Lease {
                job_id: job.id,
                owner: owner.to_string(),
                attempt: job.attempts,
            },
            job,
        }))
    }

    async fn heartbeat(
        &self,
        lease: &Lease,
        progress: Option<&serde_json::Value>,
    ) -> QueueResult<HeartbeatOutcome> {
        let row = sqlx::query(&format!(
            "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $4), \
                 heartbeat_at = now(), progress = coalesce($5, progress), updated_at = now() \
             WHERE {FENCE} \
             RETURNING cancel_requested_at IS NOT NULL AS cancel_requested"
        ))
        .bind(lease.job_id)
        .bind(&lease.owner)
        .bind(lease.attempt)
        .bind(state::duration_secs(self.config.lease_ttl))
        .bind(progress)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(HeartbeatOutcome::Held {
                cancel_requested: row.try_get("cancel_requested")?,
            }),
            None => Ok(HeartbeatOutcome::Lost),
        }
    }

    async fn complete(&self, lease: &Lease, result: &serde_json::Value) -> QueueResult<()> {
        let done = sqlx::query(&format!(
            "UPDATE jobs SET state = 'succeeded', result = $4, error = NULL, finished_at = now(), \
                 lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
             WHERE {FENCE}"
        ))
        .bind(lease.job_id)
        .bind(&lease.owner)
        .bind(lease.attempt)
        .bind(result)
        .execute(&self.pool)
        .await?;
        Self::fenced(lease, done.rows_affected())
    }

    async fn fail(&self, lease: &Lease, error: &JobError) -> QueueResult<JobState> {
        let delay = state::backoff(
            lease.attempt,
            self.config.backoff_base,
            self.config.backoff_cap,
            state::jitter_seed(lease.job_id, lease.attempt),
        );
        let entry = state::error_entry(error, lease.attempt);
        // `$4 AND attempts < max_attempts AND no cancel` is the "queued again" case.
        let row = sqlx::query(&format!(
            "UPDATE jobs SET \
                 state = CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled' \
                              WHEN $4 AND attempts < max_attempts THEN 'queued' \
                              ELSE 'failed' END, \
                 run_after = CASE WHEN cancel_requested_at IS NULL AND $4 \
                                       AND attempts < max_attempts \
                                  THEN now() + make_interval(secs => $5) \
                                  ELSE run_after END, \
                 finished_at = CASE WHEN cancel_requested_at IS NULL AND $4 \
                                         AND attempts < max_attempts \
                                    THEN NULL ELSE now() END, \
                 error = $6, errors = errors || jsonb_build_array($6), \
                 lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
             WHERE {FENCE} \
             RETURNING state"
        ))
        .bind(lease.job_id)
        .bind(&lease.owner)
        .bind(lease.attempt)
        .bind(error.retryable)
        .bind(state::duration_secs(delay))
        .bind(entry)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => parse_state(&row.try_get::<String, _>("state")?),
            None => Err(QueueError::LeaseLost(lease.job_id)),
        }
    }

    async fn acknowledge_cancel(&self, lease: &Lease) -> QueueResult<()> {
        let done = sqlx::query(&format!(
            "UPDATE jobs SET state = 'cancelled', \
                 cancel_requested_at = coalesce(cancel_requested_at, now()), \
                 finished_at = now(), lease_owner = NULL, lease_expires_at = NULL, \
                 updated_at = now() \
             WHERE {FENCE}"
        ))
        .bind(lease.job_id)
        .bind(&lease.owner)
        .bind(lease.attempt)
        .execute(&self.pool)
        .await?;
        Self::fenced(lease, done.rows_affected())
    }

    async fn release(&self, lease: &Lease) -> QueueResult<()> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE jobs SET \
                 state = CASE WHEN cancel_requested_at IS NULL THEN 'queued' \
                              ELSE 'cancelled' END, \
                 max_attempts = CASE WHEN cancel_requested_at IS NULL THEN max_attempts + 1 \
                                     ELSE max_attempts END, \
                 run_after = CASE WHEN cancel_requested_at IS NULL THEN now() \
                                  ELSE run_after END, \
                 finished_at = CASE WHEN cancel_requested_at IS NULL THEN NULL ELSE now() END, \
                 lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
             WHERE {FENCE} \
             RETURNING state"
        ))
        .bind(lease.job_id)
        .bind(&lease.owner)
        .bind(lease.attempt)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Err(QueueError::LeaseLost(lease.job_id));
        };
        let requeued = parse_state(&row.try_get::<String, _>("state")?)? == JobState::Queued;
        if requeued {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(JOBS_CHANNEL)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        if requeued {
            self.wake();
        }
        Ok(())
    }

    async fn request_cancel(&self, id: Uuid) -> QueueResult<CancelOutcome> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "UPDATE jobs SET \
                 state = CASE WHEN state = 'queued' THEN 'cancelled' ELSE state END, \
                 finished_at = CASE WHEN state = 'queued' THEN now() ELSE finished_at END, \
                 cancel_requested_at = coalesce(cancel_requested_at, now()), updated_at = now() \
             WHERE id = $1 AND state IN ('queued', 'running') \
             RETURNING state",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = row {
            let outcome = match parse_state(&row.try_get::<String, _>("state")?)? {
                JobState::Cancelled => CancelOutcome::Cancelled,
                _ => {
                    // Tell the owner now; its next heartbeat is the guaranteed path.
                    sqlx::query("SELECT pg_notify($1, $2)")
                        .bind(CANCEL_CHANNEL)
                        .bind(id.to_string())
                        .execute(&mut *tx)
                        .await?;
                    CancelOutcome::Requested
                }
            };
            tx.commit().await?;
            return Ok(outcome);
        }
        tx.rollback().await?;
        // Neither queued nor running: terminal (or absent) for good, so this look-up cannot
        // race with a transition back to a live state.
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        match state {
            Some(s) => Ok(CancelOutcome::AlreadyFinished(parse_state(&s)?)),
            None => Ok(CancelOutcome::NotFound),
        }
    }

    async fn reap_expired(&self) -> QueueResult<u64> {
        // Same rules as `state::after_lease_expiry` / `state::grants_recovery` (RECOVERY below);
        // the retry delay is min(cap, base · 2^min(attempts−1, 20)) scaled by a random factor
        // in [0.8, 1.2]. Every CASE reads the row as it was before this UPDATE.
        // One statement: a row a concurrent heartbeat or fenced write changed first no longer
        // matches when Postgres re-checks the WHERE clause on its latest version.
        let done = sqlx::query(&format!(
            "UPDATE jobs SET \
                 state = CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled' \
                              WHEN {RECOVERY} THEN 'queued' \
                              WHEN attempts >= max_attempts THEN 'failed' \
                              ELSE 'queued' END, \
                 max_attempts = CASE WHEN {RECOVERY} THEN max_attempts + 1 \
                                     ELSE max_attempts END, \
                 recovery_only = recovery_only OR {RECOVERY}, \
                 run_after = CASE WHEN {RECOVERY} THEN now() \
                     WHEN cancel_requested_at IS NULL AND attempts < max_attempts \
                     THEN now() + make_interval(secs => \
                              least($2, $1 * (1 << least(greatest(attempts - 1, 0), 20))) \
                              * (0.8 + 0.4 * random())) \
                     ELSE run_after END, \
                 finished_at = CASE WHEN {RECOVERY} THEN NULL \
                                    WHEN cancel_requested_at IS NOT NULL \
                                         OR attempts >= max_attempts \
                                    THEN now() END, \
                 error = jsonb_build_object('code', 'lease_expired', 'message', $3::text, \
                                            'retryable', true, 'attempt', attempts), \
                 errors = errors || jsonb_build_array( \
                              jsonb_build_object('code', 'lease_expired', 'message', $3::text, \
                                                 'retryable', true, 'attempt', attempts)), \
                 lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
             WHERE state = 'running' AND lease_expires_at < now()"
        ))
        .bind(state::duration_secs(self.config.backoff_base))
        .bind(state::duration_secs(self.config.backoff_cap))
        .bind(state::LEASE_EXPIRED_MESSAGE)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn get(&self, id: Uuid) -> QueueResult<Option<Job>> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn list(&self, filter: &ListFilter) -> QueueResult<Vec<Job>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs \
             WHERE ($1::text IS NULL OR state = $1) AND ($2::uuid IS NULL OR id < $2) \
               AND ($4::text IS NULL OR kind = $4) \
             ORDER BY id DESC LIMIT $3"
        ))
        .bind(filter.state.map(JobState::as_str))
        .bind(filter.before)
        .bind(i64::from(filter.limit))
        .bind(filter.kind.map(JobKind::as_str))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn changed_since(&self, since: DateTime<Utc>, limit: u32) -> QueueResult<Vec<Job>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE updated_at >= $1 \
             ORDER BY updated_at, id LIMIT $2"
        ))
        .bind(since)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn prune(&self, older_than: DateTime<Utc>, batch: u32) -> QueueResult<u64> {
        let batch = if batch == 0 {
            DEFAULT_PRUNE_BATCH
        } else {
            batch
        };
        let mut total = 0;
        loop {
            // One short statement per batch keeps locks and WAL bursts small.
            let done = sqlx::query(
                "DELETE FROM jobs WHERE id IN ( \
                     SELECT id FROM jobs \
                     WHERE finished_at < $1 AND state IN ('succeeded', 'failed', 'cancelled') \
                     ORDER BY finished_at LIMIT $2)",
            )
            .bind(older_than)
            .bind(i64::from(batch))
            .execute(&self.pool)
            .await?;
            total += done.rows_affected();
            if done.rows_affected() < u64::from(batch) {
                return Ok(total);
            }
        }
    }

    async fn count_by_state(&self) -> QueueResult<Vec<(JobState, u64)>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM jobs GROUP BY state")
                .fetch_all(&self.pool)
                .await?;
        super::state_counts(rows)
    }

    async fn ping(&self) -> QueueResult<()> {
        // Writes would fail on a hot standby or with `default_transaction_read_only` on.
        let row = sqlx::query(
            "SELECT pg_is_in_recovery() AS recovery, \
                    current_setting('transaction_read_only') AS read_only",
        )
        .fetch_one(&self.pool)
        .await?;
        let recovery: bool = row.try_get("recovery")?;
        let read_only: String = row.try_get("read_only")?;
        if recovery || read_only == "on" {
            return Err(QueueError::Unavailable(
                "the Postgres server accepts no writes (read-only or in recovery)".into(),
            ));
        }
        Ok(())
    }

    fn cancel_hints(&self) -> tokio::sync::broadcast::Receiver<Uuid> {
        self.cancels.subscribe()
    }

    fn job_changes(&self) -> Option<tokio::sync::broadcast::Receiver<Uuid>> {
        Some(self.changes.subscribe())
    }

    async fn wait_for_work(&self, max: Duration) {
        let _ = tokio::time::timeout(max, self.work.notified()).await;
    }

    async fn claim_deliveries(
        &self,
        owner: &str,
        lease: Duration,
        limit: u32,
    ) -> QueueResult<Vec<Delivery>> {
        self.claim_deliveries_impl(owner, lease, limit).await
    }

    async fn record_delivery(
        &self,
        delivery: &Delivery,
        payload: &str,
        outcome: &DeliveryOutcome,
    ) -> QueueResult<bool> {
        self.record_delivery_impl(delivery, payload, outcome).await
    }

    async fn deliveries(&self, job_id: Uuid) -> QueueResult<Vec<DeliveryRecord>> {
        self.deliveries_impl(job_id).await
    }
}

/// Wake every task waiting on `work`, or store one wake-up for the next waiter if none waits.
fn wake(work: &Notify) {
    work.notify_one();
    work.notify_waiters();
}

/// The listener task: `LISTEN ladle_jobs, ladle_cancel` on the dedicated pool's connection;
/// turn every job notification, and every (re)connect, into a wake-up, and every cancel
/// notification into a cancel hint for the job it names. Never returns; errors are
/// logged and retried after a pause. Aborted when the queue is dropped.
async fn listen(
    pool: PgPool,
    work: Arc<Notify>,
    cancels: tokio::sync::broadcast::Sender<Uuid>,
    changes: tokio::sync::broadcast::Sender<Uuid>,
) {
    const RETRY: Duration = Duration::from_secs(1);
    loop {
        match PgListener::connect_with(&pool).await {
            Ok(mut listener) => match listener
                .listen_all([JOBS_CHANNEL, CANCEL_CHANNEL, CHANGED_CHANNEL])
                .await
            {
                Ok(()) => {
                    // Anything sent while we were not listening is lost: look for work now.
                    wake(&work);
                    loop {
                        match listener.try_recv().await {
                            Ok(Some(n)) if n.channel() == CANCEL_CHANNEL => {
                                if let Ok(id) = Uuid::parse_str(n.payload()) {
                                    // No receiver (no worker in this process) is fine.
                                    let _ = cancels.send(id);
                                }
                            }
                            Ok(Some(n)) if n.channel() == CHANGED_CHANNEL => {
                                if let Ok(id) = Uuid::parse_str(n.payload()) {
                                    let _ = changes.send(id);
                                }
                            }
                            Ok(Some(_)) => wake(&work),
                            // The connection dropped; the next call reconnects and re-LISTENs.
                            Ok(None) => {
                                wake(&work);
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "queue listener failed; reconnecting");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "queue listener could not LISTEN"),
            },
            Err(e) => tracing::warn!(error = %e, "queue listener could not connect"),
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Whether `e` is the active-output unique index refusing a second live job on one output URL.
fn is_output_conflict(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            db.is_unique_violation() && db.constraint() == Some(ACTIVE_OUTPUT_INDEX)
        }
        _ => false,
    }
}

fn parse_state(s: &str) -> QueueResult<JobState> {
    JobState::parse(s).ok_or_else(|| QueueError::Corrupt(format!("unknown job state {s:?}")))
}

/// Build a [`Job`] from a row selected with [`JOB_COLUMNS`].
fn job_from_row(row: &PgRow) -> QueueResult<Job> {
    let id: Uuid = row.try_get("id")?;
    let error = row
        .try_get::<Option<serde_json::Value>, _>("error")?
        .map(serde_json::from_value::<JobError>)
        .transpose()
        .map_err(|e| QueueError::Corrupt(format!("job {id}: error: {e}")))?;
    let errors = match row.try_get::<serde_json::Value, _>("errors")? {
        serde_json::Value::Array(entries) => entries,
        other => {
            return Err(QueueError::Corrupt(format!(
                "job {id}: errors is not an array: {other}"
            )));
        }
    };
    Ok(Job {
        id,
        kind: JobKind::parse_column(&row.try_get::<String, _>("kind")?)?,
        idempotency_key: row.try_get("idempotency_key")?,
        state: parse_state(&row.try_get::<String, _>("state")?)?,
        priority: i32::from(row.try_get::<i16, _>("priority")?),
        attempts: row.try_get("attempts")?,
        max_attempts: row.try_get("max_attempts")?,
        output_key: row.try_get("output_url")?,
        recipe: row.try_get("recipe")?,
        run_after: row.try_get("run_after")?,
        lease_owner: row.try_get("lease_owner")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        heartbeat_at: row.try_get("heartbeat_at")?,
        cancel_requested_at: row.try_get("cancel_requested_at")?,
        progress: row.try_get("progress")?,
        result: row.try_get("result")?,
        error,
        errors,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        updated_at: row.try_get("updated_at")?,
        recovery_only: row.try_get("recovery_only")?,
        notify: row.try_get("notify")?,
    })
}

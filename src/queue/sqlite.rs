//! SQLite backend of the job queue: the single-machine default (QUEUE.md §4).
//!
//! - **Schema**: `migrations/sqlite/0001_jobs.sql`, a `STRICT` table whose CHECK constraints hold
//!   the state-machine invariants, embedded with [`sqlx::migrate!`].
//! - **Time**: one host, so the application clock is the clock. Every statement binds the
//!   current time as integer milliseconds since the Unix epoch; SQL never calls `datetime()`.
//! - **Concurrency**: every operation is a single autocommit statement (claim, reap and each
//!   fenced write included). A writing statement takes SQLite's write lock when it starts, so
//!   it reads the latest committed rows and waits on `busy_timeout` (5 s) instead of failing
//!   with `SQLITE_BUSY` the way an upgraded deferred transaction would. No operation needs
//!   more than one statement to be atomic, so no explicit transaction is used.
//! - **Wake-ups**: an in-process [`Notify`], signalled by `enqueue` and `release`.
//! - **Commits are checked**: an autocommit statement commits when it is stepped to its end.
//!   `fetch_optional` stops after the first `RETURNING` row and resets the statement, and sqlx
//!   drops the reset's error, so a `SQLITE_FULL` at commit was lost while the row (of a job that
//!   was never stored) came back (launchbadge/sqlx#2099). Every `RETURNING` write here goes
//!   through [`write_returning`], which steps to `SQLITE_DONE`; plain writes use `execute`,
//!   which does too. [`SqliteQueue::ping`] also writes, and checks that the database file is
//!   still the one opened at start (a deleted or replaced file would take writes that vanish).

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow,
};
use sqlx::{ConnectOptions, Connection, Row};
use tokio::sync::Notify;
use uuid::Uuid;

mod deliveries;

use super::state;
use super::{
    CancelOutcome, ClaimedJob, Delivery, DeliveryOutcome, DeliveryRecord, Enqueued,
    HeartbeatOutcome, Job, JobError, JobKind, JobQueue, JobState, Lease, ListFilter, NewJob,
    QueueConfig, QueueError, QueueResult,
};

/// The embedded SQLite migrations (`migrations/sqlite`).
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// Every column a [`Job`] is built from, in `SELECT` / `RETURNING` lists.
const JOB_COLUMNS: &str = "id, kind, idempotency_key, state, priority, attempts, max_attempts, \
     output_url, recipe, run_after, lease_owner, lease_expires_at, heartbeat_at, \
     cancel_requested_at, progress, result, error, errors, created_at, started_at, \
     finished_at, updated_at, recovery_only, notify";

/// The fence every write after a claim carries: `?1` id, `?2` owner, `?3` attempt.
const FENCE: &str = "id = ?1 AND lease_owner = ?2 AND attempts = ?3 AND state = 'running'";

/// The reaper's "one recovery-only run" case (`state::grants_recovery`): a merge whose attempts
/// ran out, no cancel pending, not recovered before.
const RECOVERY: &str = "(cancel_requested_at IS NULL AND attempts >= max_attempts \
     AND recovery_only = 0 AND kind = 'merge')";

/// The default batch size of [`JobQueue::prune`] when the caller passes 0.
const DEFAULT_PRUNE_BATCH: u32 = 1000;

/// How often `enqueue` re-tries when the row its idempotency key collided with vanished before
/// it could be read (pruned in between).
const ENQUEUE_TRIES: usize = 3;

/// The SQLite job queue. Cheap to share behind an `Arc`; all state lives in the database file.
pub struct SqliteQueue {
    pool: SqlitePool,
    /// The database file and its identity when opened (none for an in-memory database).
    file: Option<FileIdentity>,
    config: QueueConfig,
    work: Arc<Notify>,
    cancels: tokio::sync::broadcast::Sender<Uuid>,
}

impl SqliteQueue {
    /// Open (creating the file, and its parent directory, if missing) the SQLite database at
    /// `url`, e.g. `sqlite:///abs/path/ladle.db` or `sqlite:ladle.db`.
    ///
    /// The connections use WAL journaling, `busy_timeout` = 5 s and foreign keys. Migrations
    /// are not run: call [`SqliteQueue::migrate`].
    pub async fn connect(url: &str, config: QueueConfig) -> QueueResult<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);

        if let Some(parent) = options.get_filename().parent()
            && !parent.as_os_str().is_empty()
            && !is_in_memory(url)
            && !parent.exists()
        {
            std::fs::create_dir_all(parent).map_err(sqlx::Error::Io)?;
        }

        // Switching a fresh file to WAL needs an exclusive lock that `busy_timeout` does not
        // wait for; do it once on a lone connection before the pool opens several at once.
        options.connect().await?.close().await?;

        let mut pool_options = SqlitePoolOptions::new().max_connections(10);
        if is_in_memory(url) {
            // An in-memory database lives only while a connection to it is open.
            pool_options = pool_options
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None);
        }
        let file = if is_in_memory(url) {
            None
        } else {
            Some(FileIdentity::of(options.get_filename()).map_err(sqlx::Error::Io)?)
        };
        let pool = pool_options.connect_with(options).await?;
        Ok(SqliteQueue {
            pool,
            file,
            config,
            work: Arc::new(Notify::new()),
            cancels: tokio::sync::broadcast::channel(super::CANCEL_HINTS).0,
        })
    }

    /// Apply the embedded migrations (`migrations/sqlite`). Idempotent.
    pub async fn migrate(&self) -> QueueResult<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// The connection pool (test support: direct SQL against the schema).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// **Test support, not part of [`JobQueue`].** Move the lease of running job `id` one
    /// second into the past, as if its worker had stopped heartbeating, so tests exercise the
    /// reaper without sleeping. A no-op when the job is not running.
    pub async fn expire_lease_now(&self, id: Uuid) -> QueueResult<()> {
        sqlx::query(
            "UPDATE jobs SET lease_expires_at = ?2 - 1000 WHERE id = ?1 AND state = 'running'",
        )
        .bind(id_text(id))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Wake every task in `wait_for_work`, or the next one to call it if none waits now.
    fn wake(&self) {
        self.work.notify_one();
        self.work.notify_waiters();
    }

    async fn find_by_key(&self, key: &str) -> QueueResult<Option<(Job, Vec<u8>)>> {
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS}, request_hash FROM jobs WHERE idempotency_key = ?1"
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

    /// Run a writing statement with `RETURNING` to its end (so that its commit's error is
    /// seen, see the module doc) and return its first row.
    async fn write_returning<'q>(
        &self,
        query: sqlx::query::Query<'q, sqlx::Sqlite, SqliteArguments<'q>>,
    ) -> Result<Option<SqliteRow>, sqlx::Error> {
        Ok(query.fetch_all(&self.pool).await?.into_iter().next())
    }

    /// The database file must still be the one opened at start.
    fn check_file(&self) -> QueueResult<()> {
        match &self.file {
            Some(file) => file.check(),
            None => Ok(()),
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
impl JobQueue for SqliteQueue {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn enqueue(&self, job: NewJob) -> QueueResult<Enqueued> {
        let recipe = to_json_text(&job.recipe)?;
        let notify = job.notify.as_ref().map(to_json_text).transpose()?;
        let insert = format!(
            "INSERT INTO jobs (id, idempotency_key, request_hash, output_url, recipe, state, \
                               priority, max_attempts, run_after, created_at, updated_at, kind, \
                               notify) \
             VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6, ?7, ?8, ?8, ?8, ?9, ?10) \
             ON CONFLICT (idempotency_key) DO NOTHING \
             RETURNING {JOB_COLUMNS}"
        );
        // A write into a deleted or replaced file would be acknowledged and then lost.
        self.check_file()?;
        for _ in 0..ENQUEUE_TRIES {
            let query = sqlx::query(&insert)
                .bind(id_text(job.id))
                .bind(job.idempotency_key.as_deref())
                .bind(&job.request_hash)
                .bind(&job.output_key)
                .bind(&recipe)
                .bind(job.priority)
                .bind(job.max_attempts)
                .bind(now_ms())
                .bind(job.kind.as_str())
                .bind(notify.as_deref());
            let inserted = self.write_returning(query).await;
            let output_conflict = match inserted {
                Ok(Some(row)) => {
                    let created = job_from_row(&row)?;
                    self.wake();
                    return Ok(Enqueued {
                        job: created,
                        created: true,
                    });
                }
                // The idempotency key exists already.
                Ok(None) => false,
                Err(e) if is_output_conflict(&e) => true,
                Err(e) => return Err(e.into()),
            };
            let Some(key) = job.idempotency_key.as_deref() else {
                return Err(QueueError::OutputInUse(job.output_uri));
            };
            // A replay of a live job also collides on its output URL: the key decides first.
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
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = ?1, \
                 lease_expires_at = ?2 + ?3, heartbeat_at = ?2, \
                 started_at = coalesce(started_at, ?2), updated_at = ?2 \
             WHERE id = (SELECT id FROM jobs \
                         WHERE state = 'queued' AND run_after <= ?2 \
                         ORDER BY priority DESC, run_after, id LIMIT 1) \
               AND state = 'queued' \
             RETURNING {JOB_COLUMNS}"
        );
        let query = sqlx::query(&sql)
            .bind(owner)
            .bind(now_ms())
            .bind(bounded_ms(self.config.lease_ttl));
        let row = self.write_returning(query).await?;
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
        let progress = progress.map(to_json_text).transpose()?;
        let sql = format!(
            "UPDATE jobs SET lease_expires_at = ?4 + ?5, heartbeat_at = ?4, \
                 progress = coalesce(?6, progress), updated_at = ?4 \
             WHERE {FENCE} \
             RETURNING cancel_requested_at IS NOT NULL AS cancel_requested"
        );
        let query = sqlx::query(&sql)
            .bind(id_text(lease.job_id))
            .bind(&lease.owner)
            .bind(lease.attempt)
            .bind(now_ms())
            .bind(bounded_ms(self.config.lease_ttl))
            .bind(progress);
        let row = self.write_returning(query).await?;
        match row {
            Some(row) => Ok(HeartbeatOutcome::Held {
                cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
            }),
            None => Ok(HeartbeatOutcome::Lost),
        }
    }

    async fn complete(&self, lease: &Lease, result: &serde_json::Value) -> QueueResult<()> {
        let done = sqlx::query(&format!(
            "UPDATE jobs SET state = 'succeeded', result = ?4, error = NULL, finished_at = ?5, \
                 lease_owner = NULL, lease_expires_at = NULL, updated_at = ?5 \
             WHERE {FENCE}"
        ))
        .bind(id_text(lease.job_id))
        .bind(&lease.owner)
        .bind(lease.attempt)
        .bind(to_json_text(result)?)
        .bind(now_ms())
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
        let entry = to_json_text(&state::error_entry(error, lease.attempt))?;
        // `?5 AND attempts < max_attempts AND no cancel` is the "queued again" case.
        let sql = format!(
            "UPDATE jobs SET \
                 state = CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled' \
                              WHEN ?5 AND attempts < max_attempts THEN 'queued' \
                              ELSE 'failed' END, \
                 run_after = CASE WHEN cancel_requested_at IS NULL AND ?5 \
                                       AND attempts < max_attempts \
                                  THEN ?4 + ?6 ELSE run_after END, \
                 finished_at = CASE WHEN cancel_requested_at IS NULL AND ?5 \
                                         AND attempts < max_attempts \
                                    THEN NULL ELSE ?4 END, \
                 error = ?7, errors = json_insert(errors, '$[#]', json(?7)), \
                 lease_owner = NULL, lease_expires_at = NULL, updated_at = ?4 \
             WHERE {FENCE} \
             RETURNING state"
        );
        let query = sqlx::query(&sql)
            .bind(id_text(lease.job_id))
            .bind(&lease.owner)
            .bind(lease.attempt)
            .bind(now_ms())
            .bind(error.retryable)
            .bind(bounded_ms(delay))
            .bind(entry);
        let row = self.write_returning(query).await?;
        match row {
            Some(row) => parse_state(&row.try_get::<String, _>("state")?),
            None => Err(QueueError::LeaseLost(lease.job_id)),
        }
    }

    async fn acknowledge_cancel(&self, lease: &Lease) -> QueueResult<()> {
        let done = sqlx::query(&format!(
            "UPDATE jobs SET state = 'cancelled', \
                 cancel_requested_at = coalesce(cancel_requested_at, ?4), finished_at = ?4, \
                 lease_owner = NULL, lease_expires_at = NULL, updated_at = ?4 \
             WHERE {FENCE}"
        ))
        .bind(id_text(lease.job_id))
        .bind(&lease.owner)
        .bind(lease.attempt)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Self::fenced(lease, done.rows_affected())
    }

    async fn release(&self, lease: &Lease) -> QueueResult<()> {
        let sql = format!(
            "UPDATE jobs SET \
                 state = CASE WHEN cancel_requested_at IS NULL THEN 'queued' \
                              ELSE 'cancelled' END, \
                 max_attempts = CASE WHEN cancel_requested_at IS NULL THEN max_attempts + 1 \
                                     ELSE max_attempts END, \
                 run_after = CASE WHEN cancel_requested_at IS NULL THEN ?4 \
                                  ELSE run_after END, \
                 finished_at = CASE WHEN cancel_requested_at IS NULL THEN NULL ELSE ?4 END, \
                 lease_owner = NULL, lease_expires_at = NULL, updated_at = ?4 \
             WHERE {FENCE} \
             RETURNING state"
        );
        let query = sqlx::query(&sql)
            .bind(id_text(lease.job_id))
            .bind(&lease.owner)
            .bind(lease.attempt)
            .bind(now_ms());
        let row = self.write_returning(query).await?;
        match row {
            Some(row) => {
                if parse_state(&row.try_get::<String, _>("state")?)? == JobState::Queued {
                    self.wake();
                }
                Ok(())
            }
            None => Err(QueueError::LeaseLost(lease.job_id)),
        }
    }

    async fn request_cancel(&self, id: Uuid) -> QueueResult<CancelOutcome> {
        // A job that is neither queued nor running is terminal (or absent) for good, so the
        // follow-up look-up cannot race with a transition back to a live state.
        let query = sqlx::query(
            "UPDATE jobs SET \
                 state = CASE WHEN state = 'queued' THEN 'cancelled' ELSE state END, \
                 finished_at = CASE WHEN state = 'queued' THEN ?2 ELSE finished_at END, \
                 cancel_requested_at = coalesce(cancel_requested_at, ?2), updated_at = ?2 \
             WHERE id = ?1 AND state IN ('queued', 'running') \
             RETURNING state",
        )
        .bind(id_text(id))
        .bind(now_ms());
        let row = self.write_returning(query).await?;
        if let Some(row) = row {
            return match parse_state(&row.try_get::<String, _>("state")?)? {
                JobState::Cancelled => Ok(CancelOutcome::Cancelled),
                _ => {
                    // No receiver (no worker in this process) is fine.
                    let _ = self.cancels.send(id);
                    Ok(CancelOutcome::Requested)
                }
            };
        }
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM jobs WHERE id = ?1")
            .bind(id_text(id))
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
        let done = sqlx::query(&format!(
            "UPDATE jobs SET \
                 state = CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled' \
                              WHEN {RECOVERY} THEN 'queued' \
                              WHEN attempts >= max_attempts THEN 'failed' \
                              ELSE 'queued' END, \
                 max_attempts = CASE WHEN {RECOVERY} THEN max_attempts + 1 \
                                     ELSE max_attempts END, \
                 recovery_only = CASE WHEN {RECOVERY} THEN 1 ELSE recovery_only END, \
                 run_after = CASE WHEN {RECOVERY} THEN ?1 \
                     WHEN cancel_requested_at IS NULL AND attempts < max_attempts \
                     THEN ?1 + min(?3, ?2 * (1 << min(max(attempts - 1, 0), 20))) \
                               * (800 + abs(random() % 401)) / 1000 \
                     ELSE run_after END, \
                 finished_at = CASE WHEN {RECOVERY} THEN NULL \
                                    WHEN cancel_requested_at IS NOT NULL \
                                         OR attempts >= max_attempts \
                                    THEN ?1 END, \
                 error = json_object('code', 'lease_expired', 'message', ?4, \
                                     'retryable', json('true'), 'attempt', attempts), \
                 errors = json_insert(errors, '$[#]', \
                                      json_object('code', 'lease_expired', 'message', ?4, \
                                                  'retryable', json('true'), \
                                                  'attempt', attempts)), \
                 lease_owner = NULL, lease_expires_at = NULL, updated_at = ?1 \
             WHERE state = 'running' AND lease_expires_at < ?1"
        ))
        .bind(now_ms())
        .bind(bounded_ms(self.config.backoff_base))
        .bind(bounded_ms(self.config.backoff_cap))
        .bind(state::LEASE_EXPIRED_MESSAGE)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn get(&self, id: Uuid) -> QueueResult<Option<Job>> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))
            .bind(id_text(id))
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn list(&self, filter: &ListFilter) -> QueueResult<Vec<Job>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs \
             WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR id < ?2) \
               AND (?4 IS NULL OR kind = ?4) \
             ORDER BY id DESC LIMIT ?3"
        ))
        .bind(filter.state.map(JobState::as_str))
        .bind(filter.before.map(id_text))
        .bind(i64::from(filter.limit))
        .bind(filter.kind.map(JobKind::as_str))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn changed_since(&self, since: DateTime<Utc>, limit: u32) -> QueueResult<Vec<Job>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE updated_at >= ?1 \
             ORDER BY updated_at, id LIMIT ?2"
        ))
        .bind(since.timestamp_millis())
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
            // One short write per batch, so claims and heartbeats interleave with a big prune.
            let done = sqlx::query(
                "DELETE FROM jobs WHERE id IN ( \
                     SELECT id FROM jobs \
                     WHERE finished_at IS NOT NULL AND finished_at < ?1 \
                       AND state IN ('succeeded', 'failed', 'cancelled') \
                     ORDER BY finished_at LIMIT ?2)",
            )
            .bind(older_than.timestamp_millis())
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
        self.check_file()?;
        // A committed write: the header's `user_version` (which nothing else uses) rewritten
        // with its own value. Its commit appends a WAL frame, so a full disk, a read-only
        // file or an I/O error fails it as it would fail an insert.
        let mut conn = self.pool.acquire().await?;
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&mut *conn)
            .await?;
        sqlx::query(&format!("PRAGMA user_version = {version}"))
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    fn cancel_hints(&self) -> tokio::sync::broadcast::Receiver<Uuid> {
        self.cancels.subscribe()
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

/// The current time as milliseconds since the Unix epoch (0 if the clock is before 1970).
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(state::duration_ms)
        .unwrap_or(0)
}

/// A duration in milliseconds, bounded (to about 70 years) so that `now + value`, the reaper's
/// `base · 2^20` and `cap · 1200` all stay within `i64`: SQLite would otherwise turn an
/// overflowing integer into a REAL, which the STRICT table rejects.
fn bounded_ms(d: Duration) -> i64 {
    state::duration_ms(d).min(i64::MAX >> 22)
}

/// Ids are stored as hyphenated lowercase text, so text order is UUIDv7 time order.
fn id_text(id: Uuid) -> String {
    id.as_hyphenated().to_string()
}

/// A database file's path and the device and inode it had when the queue opened it.
struct FileIdentity {
    path: std::path::PathBuf,
    dev: u64,
    ino: u64,
}

impl FileIdentity {
    fn of(path: &std::path::Path) -> std::io::Result<FileIdentity> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)?;
        Ok(FileIdentity {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// `Unavailable` when the path is gone or now names another file: the open connections
    /// still write to the old inode, and whatever they store would be lost on restart.
    fn check(&self) -> QueueResult<()> {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino => Ok(()),
            Ok(_) => Err(QueueError::Unavailable(format!(
                "the database file {} was replaced by another file while the service runs",
                self.path.display()
            ))),
            Err(e) => Err(QueueError::Unavailable(format!(
                "the database file {} cannot be found any more: {e}",
                self.path.display()
            ))),
        }
    }
}

fn is_in_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

/// Whether `e` is the active-output unique index refusing a second live job on one output URL.
fn is_output_conflict(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            db.is_unique_violation() && db.message().contains("jobs.output_url")
        }
        _ => false,
    }
}

fn to_json_text(value: &serde_json::Value) -> QueueResult<String> {
    serde_json::to_string(value).map_err(|e| QueueError::Corrupt(format!("unencodable JSON: {e}")))
}

fn parse_state(s: &str) -> QueueResult<JobState> {
    JobState::parse(s).ok_or_else(|| QueueError::Corrupt(format!("unknown job state {s:?}")))
}

fn time(column: &str, ms: i64) -> QueueResult<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| QueueError::Corrupt(format!("{column}: time {ms} ms out of range")))
}

fn opt_time(row: &SqliteRow, column: &str) -> QueueResult<Option<DateTime<Utc>>> {
    row.try_get::<Option<i64>, _>(column)?
        .map(|ms| time(column, ms))
        .transpose()
}

fn opt_json(row: &SqliteRow, column: &str) -> QueueResult<Option<serde_json::Value>> {
    row.try_get::<Option<String>, _>(column)?
        .map(|text| {
            serde_json::from_str(&text)
                .map_err(|e| QueueError::Corrupt(format!("{column}: invalid JSON: {e}")))
        })
        .transpose()
}

/// Build a [`Job`] from a row selected with [`JOB_COLUMNS`].
fn job_from_row(row: &SqliteRow) -> QueueResult<Job> {
    let id: String = row.try_get("id")?;
    let id = Uuid::parse_str(&id).map_err(|e| QueueError::Corrupt(format!("id {id:?}: {e}")))?;
    let corrupt = |what: &str, e: serde_json::Error| {
        QueueError::Corrupt(format!("job {id}: {what}: invalid JSON: {e}"))
    };
    let recipe: String = row.try_get("recipe")?;
    let error = row
        .try_get::<Option<String>, _>("error")?
        .map(|text| serde_json::from_str::<JobError>(&text).map_err(|e| corrupt("error", e)))
        .transpose()?;
    let errors: String = row.try_get("errors")?;
    Ok(Job {
        id,
        kind: JobKind::parse_column(&row.try_get::<String, _>("kind")?)?,
        idempotency_key: row.try_get("idempotency_key")?,
        state: parse_state(&row.try_get::<String, _>("state")?)?,
        priority: row.try_get("priority")?,
        attempts: row.try_get("attempts")?,
        max_attempts: row.try_get("max_attempts")?,
        output_key: row.try_get("output_url")?,
        recipe: serde_json::from_str(&recipe).map_err(|e| corrupt("recipe", e))?,
        run_after: time("run_after", row.try_get("run_after")?)?,
        lease_owner: row.try_get("lease_owner")?,
        lease_expires_at: opt_time(row, "lease_expires_at")?,
        heartbeat_at: opt_time(row, "heartbeat_at")?,
        cancel_requested_at: opt_time(row, "cancel_requested_at")?,
        progress: opt_json(row, "progress")?,
        result: opt_json(row, "result")?,
        error,
        errors: serde_json::from_str(&errors).map_err(|e| corrupt("errors", e))?,
        created_at: time("created_at", row.try_get("created_at")?)?,
        started_at: opt_time(row, "started_at")?,
        finished_at: opt_time(row, "finished_at")?,
        updated_at: time("updated_at", row.try_get("updated_at")?)?,
        recovery_only: row.try_get::<i64, _>("recovery_only")? != 0,
        notify: opt_json(row, "notify")?,
    })
}

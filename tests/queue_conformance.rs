//! One conformance suite for every [`JobQueue`] backend (QUEUE.md §5).
//!
//! Each scenario below is written once against `&Harness` (an `Arc<dyn JobQueue>` plus a few
//! backend-specific hooks: expire a lease, run direct SQL). The `conformance!` macro at the end
//! instantiates every scenario twice:
//! - `sqlite::<name>`: always, on a fresh database file in a temp directory;
//! - `postgres::<name>`: when `LADLE_TEST_POSTGRES_URL` is set (e.g.
//!   `postgres://postgres@127.0.0.1:5432/postgres`), on a fresh database `ladle_test_<random>`
//!   created on that server and dropped afterwards. When the variable is unset each Postgres
//!   test prints a loud `SKIPPED` line to stderr and passes.
//!
//! Leases are expired with the backends' `expire_lease_now` hook instead of sleeping, so the
//! whole suite runs in seconds.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use ladle::error::ErrorCode;
use ladle::queue::postgres::PostgresQueue;
use ladle::queue::sqlite::SqliteQueue;
use ladle::queue::state;
use ladle::queue::{
    CancelOutcome, ClaimedJob, DeliveryOutcome, DeliveryState, HeartbeatOutcome, Job, JobError,
    JobKind, JobQueue, JobState, ListFilter, NewJob, QueueConfig, QueueError,
};
use serde_json::json;
use sqlx::error::ErrorKind;
use uuid::Uuid;

const PG_ENV: &str = "LADLE_TEST_POSTGRES_URL";

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

enum Backend {
    Sqlite {
        queue: Arc<SqliteQueue>,
        dir: tempfile::TempDir,
    },
    Postgres {
        queue: Arc<PostgresQueue>,
        url: String,
        config: QueueConfig,
        // Dropped last: drops the test database.
        _db: common::PgDb,
    },
}

/// A queue under test plus the backend-specific hooks the scenarios need.
struct Harness {
    q: Arc<dyn JobQueue>,
    backend: Backend,
}

impl Harness {
    async fn sqlite(config: QueueConfig) -> Harness {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("ladle.db").display());
        let queue = Arc::new(SqliteQueue::connect(&url, config).await.expect("connect"));
        queue.migrate().await.expect("migrate");
        Harness {
            q: queue.clone(),
            backend: Backend::Sqlite { queue, dir },
        }
    }

    /// `None` (after a loud line on stderr) when `LADLE_TEST_POSTGRES_URL` is unset.
    async fn postgres(test: &str, config: QueueConfig) -> Option<Harness> {
        let Some(db) = common::PgDb::create().await else {
            // Straight to the stderr handle: libtest captures `eprintln!`, not this.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: Postgres queue conformance `{test}` (set {PG_ENV}, e.g. \
                 postgres://postgres@127.0.0.1:5432/postgres)"
            );
            return None;
        };
        let queue = Arc::new(
            PostgresQueue::connect(&db.url, config.clone())
                .await
                .expect("connect"),
        );
        queue.migrate().await.expect("migrate");
        Some(Harness {
            q: queue.clone(),
            backend: Backend::Postgres {
                queue,
                url: db.url.clone(),
                config,
                _db: db,
            },
        })
    }

    /// Simulate a worker that stopped heartbeating.
    async fn expire(&self, id: Uuid) {
        match &self.backend {
            Backend::Sqlite { queue, .. } => queue.expire_lease_now(id).await,
            Backend::Postgres { queue, .. } => queue.expire_lease_now(id).await,
        }
        .expect("expire lease");
    }

    /// Run direct SQL with the job id bound as parameter 1.
    async fn sql(&self, sqlite: &str, postgres: &str, id: Uuid) -> Result<u64, sqlx::Error> {
        match &self.backend {
            Backend::Sqlite { queue, .. } => sqlx::query(sqlite)
                .bind(id.to_string())
                .execute(queue.pool())
                .await
                .map(|r| r.rows_affected()),
            Backend::Postgres { queue, .. } => sqlx::query(postgres)
                .bind(id)
                .execute(queue.pool())
                .await
                .map(|r| r.rows_affected()),
        }
    }

    async fn row_count(&self) -> i64 {
        let sql = "SELECT count(*) FROM jobs";
        match &self.backend {
            Backend::Sqlite { queue, .. } => sqlx::query_scalar(sql).fetch_one(queue.pool()).await,
            Backend::Postgres { queue, .. } => {
                sqlx::query_scalar(sql).fetch_one(queue.pool()).await
            }
        }
        .expect("count")
    }

    /// Make a queued job runnable now (skip the rest of its backoff).
    async fn make_runnable(&self, id: Uuid) {
        let n = self
            .sql(
                "UPDATE jobs SET run_after = run_after - 86400000 WHERE id = ?1",
                "UPDATE jobs SET run_after = now() - interval '1 second' WHERE id = $1",
                id,
            )
            .await
            .expect("make runnable");
        assert_eq!(n, 1);
    }

    /// Another queue instance on the same database (another process, in effect). Postgres
    /// only: SQLite wake-ups are in-process by design.
    async fn second_instance(&self) -> Option<Arc<dyn JobQueue>> {
        match &self.backend {
            Backend::Sqlite { .. } => None,
            Backend::Postgres { url, config, .. } => Some(Arc::new(
                PostgresQueue::connect(url, config.clone())
                    .await
                    .expect("connect second instance"),
            )),
        }
    }

    fn is_postgres(&self) -> bool {
        matches!(self.backend, Backend::Postgres { .. })
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Small timings: backoff 1 s (cap 10 s), lease 2 s.
fn fast() -> QueueConfig {
    QueueConfig {
        lease_ttl: Duration::from_secs(2),
        backoff_base: Duration::from_secs(1),
        backoff_cap: Duration::from_secs(10),
    }
}

/// No backoff: a reaped job is claimable again at once.
fn no_backoff() -> QueueConfig {
    QueueConfig {
        backoff_base: Duration::ZERO,
        ..fast()
    }
}

/// An hour of backoff: a reaped or failed job stays out of the way for the whole test.
fn long_backoff() -> QueueConfig {
    QueueConfig {
        backoff_base: Duration::from_secs(3600),
        backoff_cap: Duration::from_secs(3600),
        ..fast()
    }
}

fn job(output: &str) -> NewJob {
    NewJob {
        id: Uuid::now_v7(),
        kind: JobKind::Merge,
        idempotency_key: None,
        request_hash: vec![7; 32],
        output_key: format!("file:///soups/{output}"),
        output_uri: format!("file:///soups/{output}"),
        recipe: json!({ "method": "linear", "output": output }),
        priority: 0,
        max_attempts: 3,
        notify: None,
    }
}

fn keyed(output: &str, key: &str, hash: u8) -> NewJob {
    NewJob {
        idempotency_key: Some(key.to_string()),
        request_hash: vec![hash; 32],
        ..job(output)
    }
}

fn storage_error(retryable: bool) -> JobError {
    JobError {
        code: if retryable {
            ErrorCode::StorageError
        } else {
            ErrorCode::CheckpointMalformed
        },
        message: "simulated failure".to_string(),
        retryable,
        attempt: None,
    }
}

async fn enqueue(h: &Harness, new: NewJob) -> Job {
    let e = h.q.enqueue(new).await.expect("enqueue");
    assert!(e.created);
    e.job
}

async fn claim(h: &Harness, owner: &str) -> ClaimedJob {
    h.q.claim(owner)
        .await
        .expect("claim")
        .expect("a runnable job")
}

async fn get(h: &Harness, id: Uuid) -> Job {
    h.q.get(id).await.expect("get").expect("job exists")
}

fn is_lease_lost<T: std::fmt::Debug>(r: &Result<T, QueueError>, id: Uuid) -> bool {
    matches!(r, Err(QueueError::LeaseLost(lost)) if *lost == id)
}

/// `run_after − updated_at` of a job just re-queued: the backoff it was given.
fn backoff_ms(job: &Job) -> i64 {
    (job.run_after - job.updated_at).num_milliseconds()
}

fn assert_check_violation(r: Result<u64, sqlx::Error>, what: &str) {
    match r {
        Err(sqlx::Error::Database(db)) => assert_eq!(
            db.kind(),
            ErrorKind::CheckViolation,
            "{what}: wrong error: {db}"
        ),
        other => panic!("{what}: expected a CHECK violation, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

/// The happy path and the fields each step sets.
async fn lifecycle(h: &Harness) {
    assert_eq!(
        h.q.backend(),
        if h.is_postgres() {
            "postgres"
        } else {
            "sqlite"
        }
    );
    h.q.ping().await.expect("ping");
    assert!(h.q.get(Uuid::now_v7()).await.expect("get").is_none());

    let new = job("life");
    let queued = enqueue(h, new.clone()).await;
    assert_eq!(queued.id, new.id);
    assert_eq!(queued.state, JobState::Queued);
    assert_eq!((queued.attempts, queued.max_attempts), (0, 3));
    assert_eq!(queued.recipe, new.recipe);
    assert_eq!(queued.output_key, new.output_key);
    assert!(queued.errors.is_empty() && queued.error.is_none());
    assert!(queued.lease_owner.is_none() && queued.finished_at.is_none());
    assert!(queued.run_after <= Utc::now() + TimeDelta::seconds(1));

    let c = claim(h, "worker-a").await;
    assert_eq!(c.lease.job_id, new.id);
    assert_eq!((c.lease.owner.as_str(), c.lease.attempt), ("worker-a", 1));
    assert_eq!(c.job.state, JobState::Running);
    assert_eq!(c.job.attempts, 1);
    assert_eq!(c.job.lease_owner.as_deref(), Some("worker-a"));
    let (Some(expires), Some(beat), Some(started)) =
        (c.job.lease_expires_at, c.job.heartbeat_at, c.job.started_at)
    else {
        panic!(
            "claim must set lease, heartbeat and start times: {:?}",
            c.job
        );
    };
    let ttl = (expires - beat).num_milliseconds();
    assert!((1900..=2100).contains(&ttl), "lease ttl {ttl} ms");
    assert!(started <= beat);
    assert!(h.q.claim("worker-b").await.expect("claim").is_none());

    let progress = json!({ "tensors_done": 3 });
    assert_eq!(
        h.q.heartbeat(&c.lease, Some(&progress))
            .await
            .expect("beat"),
        HeartbeatOutcome::Held {
            cancel_requested: false
        }
    );
    assert_eq!(get(h, new.id).await.progress, Some(progress.clone()));
    h.q.heartbeat(&c.lease, None).await.expect("beat");
    let beaten = get(h, new.id).await;
    assert_eq!(
        beaten.progress,
        Some(progress),
        "None keeps the last progress"
    );
    assert!(beaten.lease_expires_at >= Some(expires));

    let result = json!({ "manifest": "ladle-manifest.json", "shards": 2 });
    h.q.complete(&c.lease, &result).await.expect("complete");
    let done = get(h, new.id).await;
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(done.result, Some(result.clone()));
    assert!(done.finished_at.is_some());
    assert!(done.lease_owner.is_none() && done.lease_expires_at.is_none());
    assert_eq!(done.attempts, 1);

    // Terminal: every fenced call now fails and changes nothing.
    assert_eq!(
        h.q.heartbeat(&c.lease, None).await.expect("beat"),
        HeartbeatOutcome::Lost
    );
    assert!(is_lease_lost(
        &h.q.complete(&c.lease, &json!(1)).await,
        new.id
    ));
    assert_eq!(get(h, new.id).await.result, Some(result));
}

/// 200 jobs, 16 concurrent claimers: every job is claimed exactly once, at attempt 1.
async fn claim_exclusivity(h: &Harness) {
    const JOBS: usize = 200;
    const CLAIMERS: usize = 16;
    let mut ids = HashSet::new();
    for i in 0..JOBS {
        ids.insert(enqueue(h, job(&format!("ex-{i}"))).await.id);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(CLAIMERS));
    let mut tasks = Vec::new();
    for w in 0..CLAIMERS {
        let q = h.q.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let owner = format!("claimer-{w}");
            let mut got = Vec::new();
            while let Some(c) = q.claim(&owner).await.expect("claim") {
                assert_eq!(c.lease.owner, owner);
                got.push((c.lease.job_id, c.lease.attempt, c.job.lease_owner));
            }
            got
        }));
    }
    let mut claimed: HashMap<Uuid, usize> = HashMap::new();
    let mut total = 0;
    for t in tasks {
        for (id, attempt, owner) in t.await.expect("claimer task") {
            assert_eq!(attempt, 1, "job {id} claimed at attempt {attempt}");
            assert!(owner.is_some());
            *claimed.entry(id).or_default() += 1;
            total += 1;
        }
    }
    assert_eq!(total, JOBS, "claims returned");
    assert_eq!(claimed.len(), JOBS, "distinct jobs claimed");
    assert!(claimed.values().all(|&n| n == 1));
    assert_eq!(claimed.keys().copied().collect::<HashSet<_>>(), ids);
    let running =
        h.q.list(&ListFilter {
            kind: None,
            state: Some(JobState::Running),
            limit: 1000,
            before: None,
        })
        .await
        .expect("list");
    assert_eq!(running.len(), JOBS);
    assert!(running.iter().all(|j| j.attempts == 1));
}

/// A worker whose lease expired and was re-claimed is fenced out of every write.
async fn stale_owner_is_fenced(h: &Harness) {
    let id = enqueue(h, job("stale")).await.id;
    let a = claim(h, "worker-a").await;
    h.expire(id).await;
    assert_eq!(h.q.reap_expired().await.expect("reap"), 1);
    let b = claim(h, "worker-b").await;
    assert_eq!(b.lease.job_id, id);
    assert_eq!(b.lease.attempt, 2);

    let before = get(h, id).await;
    assert_eq!(
        h.q.heartbeat(&a.lease, Some(&json!({ "stale": true })))
            .await
            .expect("beat"),
        HeartbeatOutcome::Lost
    );
    assert!(is_lease_lost(
        &h.q.complete(&a.lease, &json!("zombie")).await,
        id
    ));
    assert!(is_lease_lost(
        &h.q.fail(&a.lease, &storage_error(false)).await,
        id
    ));
    assert!(is_lease_lost(&h.q.acknowledge_cancel(&a.lease).await, id));
    assert!(is_lease_lost(&h.q.release(&a.lease).await, id));
    // Right owner name but a stale attempt is fenced too (a restarted worker reusing its name).
    let mut same_owner_old_attempt = b.lease.clone();
    same_owner_old_attempt.attempt = 1;
    assert_eq!(
        h.q.heartbeat(&same_owner_old_attempt, None)
            .await
            .expect("beat"),
        HeartbeatOutcome::Lost
    );
    assert!(is_lease_lost(
        &h.q.complete(&same_owner_old_attempt, &json!("zombie"))
            .await,
        id
    ));

    let after = get(h, id).await;
    assert_eq!(after.state, JobState::Running);
    assert_eq!(after.lease_owner.as_deref(), Some("worker-b"));
    assert_eq!(after.attempts, 2);
    assert_eq!(after.max_attempts, before.max_attempts);
    assert_eq!(after.progress, before.progress);
    assert_eq!(after.result, None);
    assert_eq!(after.errors.len(), before.errors.len());
    assert_eq!(after.lease_expires_at, before.lease_expires_at);

    assert_eq!(
        h.q.heartbeat(&b.lease, None).await.expect("beat"),
        HeartbeatOutcome::Held {
            cancel_requested: false
        }
    );
    h.q.complete(&b.lease, &json!("b"))
        .await
        .expect("b completes");
    let done = get(h, id).await;
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(done.result, Some(json!("b")));
    // The errors history records the expired first attempt.
    assert_eq!(done.errors.len(), 1);
    assert_eq!(done.errors[0]["code"], "lease_expired");
    assert_eq!(done.errors[0]["attempt"], 1);
}

/// The reaper re-queues (with backoff), fails (attempts exhausted) or cancels (cancel pending)
/// expired leases, and leaves live leases alone.
async fn reaper_outcomes(h: &Harness) {
    let retry = enqueue(h, job("reap-retry")).await.id;
    assert_eq!(claim(h, "w").await.lease.job_id, retry);
    // An analysis publishes nothing a recovery run could find: attempts exhausted → failed.
    // (Merges get one recovery-only run first: `recovery_only_run`.)
    let exhausted = enqueue(
        h,
        NewJob {
            max_attempts: 1,
            kind: JobKind::Analysis,
            ..job("reap-exhausted")
        },
    )
    .await
    .id;
    assert_eq!(claim(h, "w").await.lease.job_id, exhausted);
    let cancelled = enqueue(h, job("reap-cancel")).await.id;
    assert_eq!(claim(h, "w").await.lease.job_id, cancelled);
    assert_eq!(
        h.q.request_cancel(cancelled).await.expect("cancel"),
        CancelOutcome::Requested
    );
    let alive = enqueue(h, job("reap-alive")).await.id;
    assert_eq!(claim(h, "w").await.lease.job_id, alive);

    assert_eq!(
        h.q.reap_expired().await.expect("reap"),
        0,
        "nothing expired yet"
    );
    for id in [retry, exhausted, cancelled] {
        h.expire(id).await;
    }
    assert_eq!(h.q.reap_expired().await.expect("reap"), 3);
    assert_eq!(h.q.reap_expired().await.expect("reap"), 0, "idempotent");

    let j = get(h, retry).await;
    assert_eq!(j.state, JobState::Queued);
    assert_eq!(j.attempts, 1, "attempts never decrease");
    assert!(j.lease_owner.is_none() && j.lease_expires_at.is_none() && j.finished_at.is_none());
    let delay = backoff_ms(&j);
    assert!((790..=1210).contains(&delay), "reaper backoff {delay} ms");
    assert!(j.run_after > Utc::now() - TimeDelta::milliseconds(100));
    let err = j.error.clone().expect("error recorded");
    assert_eq!(err.code, ErrorCode::LeaseExpired);
    assert!(err.retryable);
    assert_eq!(j.errors.len(), 1);
    assert_eq!(j.errors[0]["code"], "lease_expired");
    // In the future: not claimable yet.
    assert!(h.q.claim("w").await.expect("claim").is_none());

    let j = get(h, exhausted).await;
    assert_eq!(j.state, JobState::Failed);
    assert!(!j.recovery_only);
    assert_eq!(j.max_attempts, 1);
    assert!(j.finished_at.is_some() && j.lease_owner.is_none());
    assert_eq!(j.error.map(|e| e.code), Some(ErrorCode::LeaseExpired));

    let j = get(h, cancelled).await;
    assert_eq!(
        j.state,
        JobState::Cancelled,
        "a cancel request beats the retry"
    );
    assert!(j.finished_at.is_some() && j.cancel_requested_at.is_some());

    let j = get(h, alive).await;
    assert_eq!(j.state, JobState::Running);
    assert_eq!(j.lease_owner.as_deref(), Some("w"));
}

/// A merge whose lease expires on its last attempt gets one recovery-only run: queued again
/// at once, `max_attempts + 1`, `recovery_only` set; the stale owner stays fenced. A second
/// expiry fails it (one recovery at most); a pending cancel beats the recovery; a graceful
/// release of a recovery run keeps the flag.
async fn recovery_only_run(h: &Harness) {
    let last = |name: &str| NewJob {
        max_attempts: 1,
        ..job(name)
    };
    let expire_and_reap = |id: Uuid| async move {
        h.expire(id).await;
        assert_eq!(h.q.reap_expired().await.expect("reap"), 1);
    };

    // Recovered: the second owner completes the recovery run.
    let id = enqueue(h, last("recover-ok")).await.id;
    let a = claim(h, "a").await;
    assert_eq!((a.lease.job_id, a.lease.attempt), (id, 1));
    assert!(!a.job.recovery_only, "a first run is a normal run");
    expire_and_reap(id).await;
    let j = get(h, id).await;
    assert_eq!(j.state, JobState::Queued, "recovery instead of failed");
    assert!(j.recovery_only);
    assert_eq!((j.attempts, j.max_attempts), (1, 2));
    assert!(j.finished_at.is_none() && j.lease_owner.is_none());
    assert!(
        j.run_after <= Utc::now(),
        "a recovery run is not backed off"
    );
    assert_eq!(
        j.error.as_ref().map(|e| e.code),
        Some(ErrorCode::LeaseExpired)
    );
    assert_eq!(j.errors.len(), 1);
    let b = claim(h, "b").await;
    assert_eq!((b.lease.job_id, b.lease.attempt), (id, 2));
    assert!(b.job.recovery_only, "the claimer is told to only recover");
    assert!(is_lease_lost(&h.q.complete(&a.lease, &json!({})).await, id));
    h.q.complete(&b.lease, &json!({"recovered": true}))
        .await
        .expect("recovery completes");
    let j = get(h, id).await;
    assert_eq!(j.state, JobState::Succeeded);
    assert_eq!((j.attempts, j.max_attempts), (2, 2));

    // One recovery at most: the recovery run's lease expiring too fails the job.
    let id = enqueue(h, last("recover-twice")).await.id;
    claim(h, "a").await;
    expire_and_reap(id).await;
    assert_eq!(claim(h, "b").await.lease.attempt, 2);
    expire_and_reap(id).await;
    let j = get(h, id).await;
    assert_eq!(j.state, JobState::Failed);
    assert!(j.recovery_only && j.finished_at.is_some());
    assert_eq!((j.attempts, j.max_attempts), (2, 2));
    assert_eq!(j.error.map(|e| e.code), Some(ErrorCode::LeaseExpired));
    assert_eq!(j.errors.len(), 2);
    assert!(h.q.claim("c").await.expect("claim").is_none());

    // A recovery run that fails (nothing was published) is final.
    let id = enqueue(h, last("recover-nothing")).await.id;
    claim(h, "a").await;
    expire_and_reap(id).await;
    let b = claim(h, "b").await;
    let state =
        h.q.fail(&b.lease, &storage_error(true))
            .await
            .expect("fail");
    assert_eq!(
        state,
        JobState::Failed,
        "no attempt left after the recovery run"
    );

    // A pending cancel beats the recovery.
    let id = enqueue(h, last("recover-cancel")).await.id;
    claim(h, "a").await;
    assert_eq!(
        h.q.request_cancel(id).await.expect("cancel"),
        CancelOutcome::Requested
    );
    expire_and_reap(id).await;
    let j = get(h, id).await;
    assert_eq!(j.state, JobState::Cancelled);
    assert!(!j.recovery_only);
    assert_eq!(j.max_attempts, 1);

    // A recovery run released on shutdown stays a recovery run and keeps its one extra try.
    let id = enqueue(h, last("recover-release")).await.id;
    claim(h, "a").await;
    expire_and_reap(id).await;
    let b = claim(h, "b").await;
    h.q.release(&b.lease).await.expect("release");
    let j = get(h, id).await;
    assert_eq!(j.state, JobState::Queued);
    assert_eq!((j.attempts, j.max_attempts), (2, 3));
    let c = claim(h, "c").await;
    assert_eq!((c.lease.job_id, c.lease.attempt), (id, 3));
    assert!(c.job.recovery_only);
    expire_and_reap(id).await;
    assert_eq!(get(h, id).await.state, JobState::Failed);
}

/// The reaper and the owner's `complete` race on an expired lease: exactly one wins, and a
/// terminal state is never overwritten.
async fn reaper_vs_complete_race(h: &Harness) {
    const ROUNDS: usize = 200;
    let (mut completed, mut reaped) = (0, 0);
    for round in 0..ROUNDS {
        let id = enqueue(h, job(&format!("race-{round}"))).await.id;
        // Earlier rounds' re-queued jobs wait an hour, so this is the only runnable job.
        let c = claim(h, "owner").await;
        assert_eq!(c.lease.job_id, id);
        h.expire(id).await;

        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let (q1, b1) = (h.q.clone(), barrier.clone());
        let reaper = tokio::spawn(async move {
            b1.wait().await;
            q1.reap_expired().await.expect("reap")
        });
        let (q2, b2, lease) = (h.q.clone(), barrier, c.lease.clone());
        let completer = tokio::spawn(async move {
            b2.wait().await;
            q2.complete(&lease, &json!({ "round": round })).await
        });
        let n = reaper.await.expect("reaper task");
        let done = completer.await.expect("completer task");

        let j = get(h, id).await;
        match done {
            Ok(()) => {
                completed += 1;
                assert_eq!(n, 0, "round {round}: reaper changed a completed job");
                assert_eq!(j.state, JobState::Succeeded, "round {round}");
                assert_eq!(j.result, Some(json!({ "round": round })));
                assert!(j.errors.is_empty(), "round {round}: {:?}", j.errors);
            }
            Err(QueueError::LeaseLost(lost)) => {
                reaped += 1;
                assert_eq!(lost, id);
                assert_eq!(n, 1, "round {round}");
                assert_eq!(j.state, JobState::Queued, "round {round}");
                assert!(j.result.is_none());
            }
            Err(e) => panic!("round {round}: complete failed: {e}"),
        }
        // A later reap never touches the settled row.
        h.q.reap_expired().await.expect("reap");
        let again = get(h, id).await;
        assert_eq!(again.state, j.state, "round {round}: state overwritten");
        assert_eq!(
            again.updated_at, j.updated_at,
            "round {round}: row rewritten"
        );
    }
    assert_eq!(completed + reaped, ROUNDS);
    eprintln!("reaper vs complete: complete won {completed}, reaper won {reaped}");
}

/// Retryable failures back off and retry until `max_attempts`; non-retryable ones fail at once;
/// a pending cancel beats the retry.
async fn retry_and_backoff(h: &Harness) {
    let config = fast();
    let id = enqueue(h, job("retry")).await.id;
    for attempt in 1..=3 {
        let c = claim(h, "w").await;
        assert_eq!((c.lease.job_id, c.lease.attempt), (id, attempt));
        let err = JobError {
            message: format!("flaky storage, attempt {attempt}"),
            ..storage_error(true)
        };
        let state = h.q.fail(&c.lease, &err).await.expect("fail");
        let j = get(h, id).await;
        assert_eq!(j.state, state);
        assert_eq!(j.errors.len(), attempt as usize, "errors history grows");
        assert_eq!(j.errors[attempt as usize - 1]["attempt"], attempt);
        assert_eq!(j.errors[attempt as usize - 1]["code"], "storage_error");
        assert_eq!(
            j.error.as_ref().map(|e| e.message.clone()),
            Some(err.message)
        );
        assert!(j.lease_owner.is_none() && j.lease_expires_at.is_none());
        assert_eq!(j.attempts, attempt);
        if attempt < 3 {
            assert_eq!(state, JobState::Queued);
            assert!(j.finished_at.is_none());
            let nominal = 1000 * (1i64 << (attempt - 1));
            let delay = backoff_ms(&j);
            assert!(
                (nominal * 8 / 10 - 2..=nominal * 12 / 10 + 2).contains(&delay),
                "attempt {attempt}: backoff {delay} ms, nominal {nominal} ms"
            );
            // Exactly the pure function's value, jitter included.
            let expect = state::backoff(
                attempt,
                config.backoff_base,
                config.backoff_cap,
                state::jitter_seed(id, attempt),
            )
            .as_millis() as i64;
            assert!(
                (delay - expect).abs() <= 2,
                "backoff {delay} ms, expected {expect}"
            );
            assert!(
                h.q.claim("w").await.expect("claim").is_none(),
                "not before run_after"
            );
            h.make_runnable(id).await;
        } else {
            assert_eq!(state, JobState::Failed, "attempts exhausted");
            assert!(j.finished_at.is_some());
        }
    }

    let permanent = enqueue(h, job("permanent")).await.id;
    let c = claim(h, "w").await;
    assert_eq!(c.lease.job_id, permanent);
    assert_eq!(
        h.q.fail(&c.lease, &storage_error(false))
            .await
            .expect("fail"),
        JobState::Failed
    );
    let j = get(h, permanent).await;
    assert_eq!(
        (j.state, j.attempts, j.errors.len()),
        (JobState::Failed, 1, 1)
    );
    assert_eq!(
        j.error.map(|e| e.code),
        Some(ErrorCode::CheckpointMalformed)
    );

    let doomed = enqueue(h, job("doomed")).await.id;
    let c = claim(h, "w").await;
    assert_eq!(c.lease.job_id, doomed);
    h.q.request_cancel(doomed).await.expect("cancel");
    assert_eq!(
        h.q.fail(&c.lease, &storage_error(true))
            .await
            .expect("fail"),
        JobState::Cancelled,
        "cancellation beats retry"
    );
    assert!(get(h, doomed).await.finished_at.is_some());
}

/// Cancelling a queued job is immediate and final; it is never claimed.
async fn cancel_queued(h: &Harness) {
    let id = enqueue(h, job("cancel-q")).await.id;
    assert_eq!(
        h.q.request_cancel(id).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    let j = get(h, id).await;
    assert_eq!(j.state, JobState::Cancelled);
    assert_eq!(j.attempts, 0);
    assert!(j.finished_at.is_some() && j.cancel_requested_at.is_some());
    assert!(h.q.claim("late-worker").await.expect("claim").is_none());
    assert_eq!(
        h.q.request_cancel(id).await.expect("cancel"),
        CancelOutcome::AlreadyFinished(JobState::Cancelled)
    );
    assert_eq!(
        h.q.request_cancel(Uuid::now_v7()).await.expect("cancel"),
        CancelOutcome::NotFound
    );
    assert_eq!(get(h, id).await.state, JobState::Cancelled);
}

/// Cancelling a running job marks it; the owner sees it in the heartbeat and acknowledges.
async fn cancel_running(h: &Harness) {
    let id = enqueue(h, job("cancel-r")).await.id;
    let c = claim(h, "w").await;
    assert_eq!(
        h.q.heartbeat(&c.lease, None).await.expect("beat"),
        HeartbeatOutcome::Held {
            cancel_requested: false
        }
    );
    assert_eq!(
        h.q.request_cancel(id).await.expect("cancel"),
        CancelOutcome::Requested
    );
    let j = get(h, id).await;
    assert_eq!(j.state, JobState::Running);
    assert!(j.cancel_requested_at.is_some() && j.finished_at.is_none());
    assert_eq!(
        h.q.request_cancel(id).await.expect("cancel twice"),
        CancelOutcome::Requested
    );
    assert_eq!(
        h.q.heartbeat(&c.lease, None).await.expect("beat"),
        HeartbeatOutcome::Held {
            cancel_requested: true
        }
    );
    h.q.acknowledge_cancel(&c.lease).await.expect("ack");
    let j = get(h, id).await;
    assert_eq!(j.state, JobState::Cancelled);
    assert_eq!(j.attempts, 1, "attempts unchanged");
    assert!(j.finished_at.is_some() && j.lease_owner.is_none());
    assert_eq!(
        h.q.heartbeat(&c.lease, None).await.expect("beat"),
        HeartbeatOutcome::Lost
    );
    assert!(is_lease_lost(&h.q.acknowledge_cancel(&c.lease).await, id));
    assert_eq!(
        h.q.request_cancel(id).await.expect("cancel"),
        CancelOutcome::AlreadyFinished(JobState::Cancelled)
    );

    // A finished job is not cancellable.
    let ok = enqueue(h, job("cancel-done")).await.id;
    let c = claim(h, "w").await;
    h.q.complete(&c.lease, &json!({})).await.expect("complete");
    assert_eq!(
        h.q.request_cancel(ok).await.expect("cancel"),
        CancelOutcome::AlreadyFinished(JobState::Succeeded)
    );
}

/// Graceful release: back to queued at once, the attempt is not charged (max_attempts + 1).
async fn release(h: &Harness) {
    let id = enqueue(h, job("release")).await.id;
    let c = claim(h, "w").await;
    h.q.release(&c.lease).await.expect("release");
    let j = get(h, id).await;
    assert_eq!(j.state, JobState::Queued);
    assert_eq!((j.attempts, j.max_attempts), (1, 4));
    assert!(j.lease_owner.is_none() && j.lease_expires_at.is_none() && j.finished_at.is_none());
    assert!(j.errors.is_empty());
    assert!(is_lease_lost(&h.q.release(&c.lease).await, id));

    let c2 = claim(h, "w2").await;
    assert_eq!(
        (c2.lease.job_id, c2.lease.attempt),
        (id, 2),
        "runnable at once"
    );

    // Released with a cancel pending: cancelled, not re-queued.
    h.q.request_cancel(id).await.expect("cancel");
    h.q.release(&c2.lease).await.expect("release");
    let j = get(h, id).await;
    assert_eq!(j.state, JobState::Cancelled);
    assert_eq!((j.attempts, j.max_attempts), (2, 4));
    assert!(j.finished_at.is_some());
}

/// 50 concurrent enqueues with one key and body make one job; another body is refused.
async fn idempotent_enqueue(h: &Harness) {
    const CALLERS: usize = 50;
    let barrier = Arc::new(tokio::sync::Barrier::new(CALLERS));
    let mut tasks = Vec::new();
    for _ in 0..CALLERS {
        let (q, barrier) = (h.q.clone(), barrier.clone());
        // Each request gets its own fresh id, as the API would make.
        let new = keyed("idem", "key-1", 1);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            q.enqueue(new).await
        }));
    }
    let mut ids = HashSet::new();
    let mut created = Vec::new();
    for t in tasks {
        let e = t.await.expect("task").expect("enqueue");
        ids.insert(e.job.id);
        if e.created {
            created.push(e.job.id);
        }
        assert_eq!(e.job.idempotency_key.as_deref(), Some("key-1"));
    }
    assert_eq!(created.len(), 1, "exactly one created=true");
    assert_eq!(ids.len(), 1, "every caller sees the same job");
    assert!(ids.contains(&created[0]));
    assert_eq!(h.row_count().await, 1);

    let reused = h.q.enqueue(keyed("idem", "key-1", 2)).await;
    match &reused {
        Err(e @ QueueError::IdempotencyKeyReused(k)) => {
            assert_eq!(k, "key-1");
            assert_eq!(e.code(), ErrorCode::IdempotencyKeyReused);
        }
        other => panic!("expected IdempotencyKeyReused, got {other:?}"),
    }
    // Another body wins over the output collision too.
    assert!(matches!(
        h.q.enqueue(keyed("elsewhere", "key-1", 2)).await,
        Err(QueueError::IdempotencyKeyReused(_))
    ));

    // A replay after the job finished still returns it.
    let id = created[0];
    h.q.request_cancel(id).await.expect("cancel");
    let replay =
        h.q.enqueue(keyed("idem", "key-1", 1))
            .await
            .expect("replay");
    assert!(!replay.created);
    assert_eq!((replay.job.id, replay.job.state), (id, JobState::Cancelled));
    assert_eq!(h.row_count().await, 1);
}

/// At most one live job per output URL; a finished one frees it.
async fn output_in_use(h: &Harness) {
    let first = enqueue(h, keyed("shared", "first", 1)).await.id;
    match h.q.enqueue(job("shared")).await {
        Err(e @ QueueError::OutputInUse(_)) => assert_eq!(e.code(), ErrorCode::OutputInUse),
        other => panic!("expected OutputInUse, got {other:?}"),
    }
    assert!(matches!(
        h.q.enqueue(keyed("shared", "second", 2)).await,
        Err(QueueError::OutputInUse(_))
    ));
    // Replaying the live job's own key is idempotent, not a collision.
    let replay =
        h.q.enqueue(keyed("shared", "first", 1))
            .await
            .expect("replay");
    assert!(!replay.created && replay.job.id == first);
    enqueue(h, job("other")).await;

    let c = claim(h, "w").await;
    assert_eq!(c.lease.job_id, first);
    assert!(
        matches!(
            h.q.enqueue(job("shared")).await,
            Err(QueueError::OutputInUse(_))
        ),
        "running jobs hold their output too"
    );
    h.q.complete(&c.lease, &json!({})).await.expect("complete");
    let next = enqueue(h, keyed("shared", "second", 2)).await;
    assert_eq!(next.state, JobState::Queued);
    assert_eq!(h.row_count().await, 3);
}

/// Highest priority first, then older; a future `run_after` is not claimable.
async fn ordering(h: &Harness) {
    let mut ids: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    ids.sort();
    let mk = |i: usize, priority: i32| NewJob {
        id: ids[i],
        priority,
        ..job(&format!("order-{i}"))
    };
    let old_low = enqueue(h, mk(0, 0)).await.id;
    let high = enqueue(h, mk(1, 5)).await.id;
    let new_low = enqueue(h, mk(2, 0)).await.id;
    let later = enqueue(h, mk(3, 10)).await.id;
    let n = h
        .sql(
            "UPDATE jobs SET run_after = run_after + 3600000 WHERE id = ?1",
            "UPDATE jobs SET run_after = now() + interval '1 hour' WHERE id = $1",
            later,
        )
        .await
        .expect("delay job");
    assert_eq!(n, 1);

    let order: Vec<Uuid> = [
        claim(h, "w").await,
        claim(h, "w").await,
        claim(h, "w").await,
    ]
    .iter()
    .map(|c| c.lease.job_id)
    .collect();
    assert_eq!(order, vec![high, old_low, new_low]);
    assert!(
        h.q.claim("w").await.expect("claim").is_none(),
        "a job scheduled in the future is not claimed, whatever its priority"
    );
    h.make_runnable(later).await;
    assert_eq!(claim(h, "w").await.lease.job_id, later);
}

/// The schema itself rejects rows that break the state machine's invariants.
async fn schema_checks(h: &Harness) {
    let id = enqueue(h, job("checks")).await.id;
    let cases: [(&str, &str, &str); 8] = [
        (
            "running without a lease",
            "UPDATE jobs SET state = 'running' WHERE id = ?1",
            "UPDATE jobs SET state = 'running' WHERE id = $1",
        ),
        (
            "terminal without finished_at",
            "UPDATE jobs SET state = 'succeeded' WHERE id = ?1",
            "UPDATE jobs SET state = 'succeeded' WHERE id = $1",
        ),
        (
            "finished_at on a live job",
            "UPDATE jobs SET finished_at = 1 WHERE id = ?1",
            "UPDATE jobs SET finished_at = now() WHERE id = $1",
        ),
        (
            "attempts above max_attempts",
            "UPDATE jobs SET attempts = max_attempts + 1 WHERE id = ?1",
            "UPDATE jobs SET attempts = max_attempts + 1 WHERE id = $1",
        ),
        (
            "max_attempts below 1",
            "UPDATE jobs SET max_attempts = 0 WHERE id = ?1",
            "UPDATE jobs SET max_attempts = 0 WHERE id = $1",
        ),
        (
            "unknown state",
            "UPDATE jobs SET state = 'paused' WHERE id = ?1",
            "UPDATE jobs SET state = 'paused' WHERE id = $1",
        ),
        (
            "a lease left on a job that is not running",
            "UPDATE jobs SET lease_owner = 'w', lease_expires_at = 1 WHERE id = ?1",
            "UPDATE jobs SET lease_owner = 'w', lease_expires_at = now() WHERE id = $1",
        ),
        (
            "negative attempts",
            "UPDATE jobs SET attempts = -1 WHERE id = ?1",
            "UPDATE jobs SET attempts = -1 WHERE id = $1",
        ),
    ];
    for (what, sqlite, postgres) in cases {
        assert_check_violation(h.sql(sqlite, postgres, id).await, what);
    }
    // Control: a harmless update through the same path succeeds.
    let ok = h
        .sql(
            "UPDATE jobs SET priority = 3 WHERE id = ?1",
            "UPDATE jobs SET priority = 3 WHERE id = $1",
            id,
        )
        .await
        .expect("valid update");
    assert_eq!(ok, 1);
    let j = get(h, id).await;
    assert_eq!((j.state, j.attempts, j.priority), (JobState::Queued, 0, 3));

    // A consistent running row is accepted, and a terminal row needs finished_at.
    let c = claim(h, "w").await;
    assert_check_violation(
        h.sql(
            "UPDATE jobs SET state = 'failed', lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = ?1",
            "UPDATE jobs SET state = 'failed', lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = $1",
            c.lease.job_id,
        )
        .await,
        "failed without finished_at",
    );
    assert!(matches!(
        h.q.enqueue(NewJob {
            max_attempts: 0,
            ..job("zero")
        })
        .await,
        Err(QueueError::Database(_))
    ));
}

/// Prune deletes only terminal rows finished before the cutoff, in batches.
async fn prune(h: &Harness) {
    let mut old = Vec::new();
    // Three old terminal jobs: succeeded, failed, cancelled.
    let succeeded = enqueue(h, keyed("p-ok", "prune-key", 1)).await.id;
    let c = claim(h, "w").await;
    h.q.complete(&c.lease, &json!({})).await.expect("complete");
    old.push(succeeded);
    let failed = enqueue(h, job("p-fail")).await.id;
    let c = claim(h, "w").await;
    h.q.fail(&c.lease, &storage_error(false))
        .await
        .expect("fail");
    old.push(failed);
    let cancelled = enqueue(h, job("p-cancel")).await.id;
    h.q.request_cancel(cancelled).await.expect("cancel");
    old.push(cancelled);
    // Live and recent jobs that must survive.
    let recent = enqueue(h, job("p-recent")).await.id;
    h.q.request_cancel(recent).await.expect("cancel");
    let running = enqueue(h, job("p-running")).await.id;
    assert_eq!(claim(h, "w").await.lease.job_id, running);
    let queued = enqueue(h, job("p-queued")).await.id;

    for id in &old {
        let n = h
            .sql(
                "UPDATE jobs SET finished_at = finished_at - 2 * 86400000 WHERE id = ?1",
                "UPDATE jobs SET finished_at = finished_at - interval '2 days' WHERE id = $1",
                *id,
            )
            .await
            .expect("backdate");
        assert_eq!(n, 1);
    }
    let cutoff = Utc::now() - TimeDelta::days(1);
    assert_eq!(
        h.q.prune(cutoff, 1).await.expect("prune"),
        3,
        "batches of 1"
    );
    assert_eq!(h.q.prune(cutoff, 1).await.expect("prune"), 0);
    for id in &old {
        assert!(h.q.get(*id).await.expect("get").is_none(), "{id} pruned");
    }
    for id in [recent, running, queued] {
        assert!(h.q.get(id).await.expect("get").is_some(), "{id} kept");
    }
    assert_eq!(h.row_count().await, 3);

    // An idempotency key lives as long as its row.
    let again =
        h.q.enqueue(keyed("p-ok", "prune-key", 9))
            .await
            .expect("key free after prune");
    assert!(again.created);
}

/// Newest first, keyset-paginated by id, with a state filter.
async fn list_pagination(h: &Harness) {
    let mut ids: Vec<Uuid> = (0..7).map(|_| Uuid::now_v7()).collect();
    ids.sort();
    for (i, id) in ids.iter().enumerate() {
        enqueue(
            h,
            NewJob {
                id: *id,
                ..job(&format!("list-{i}"))
            },
        )
        .await;
    }
    for i in [1, 4] {
        h.q.request_cancel(ids[i]).await.expect("cancel");
    }
    let page = |state: Option<JobState>, limit: u32, before: Option<Uuid>| {
        let q = h.q.clone();
        async move {
            q.list(&ListFilter {
                kind: None,
                state,
                limit,
                before,
            })
            .await
            .expect("list")
            .into_iter()
            .map(|j| j.id)
            .collect::<Vec<_>>()
        }
    };
    let rev = |idx: &[usize]| idx.iter().map(|&i| ids[i]).collect::<Vec<_>>();

    assert_eq!(page(None, 3, None).await, rev(&[6, 5, 4]));
    assert_eq!(page(None, 3, Some(ids[4])).await, rev(&[3, 2, 1]));
    assert_eq!(page(None, 3, Some(ids[1])).await, rev(&[0]));
    assert_eq!(page(None, 3, Some(ids[0])).await, rev(&[]));
    assert_eq!(page(None, 100, None).await.len(), 7);
    assert_eq!(
        page(Some(JobState::Queued), 100, None).await,
        rev(&[6, 5, 3, 2, 0])
    );
    assert_eq!(
        page(Some(JobState::Queued), 2, Some(ids[5])).await,
        rev(&[3, 2])
    );
    assert_eq!(
        page(Some(JobState::Cancelled), 10, None).await,
        rev(&[4, 1])
    );
    assert_eq!(
        page(Some(JobState::Cancelled), 10, Some(ids[4])).await,
        rev(&[1])
    );
    assert!(page(Some(JobState::Running), 10, None).await.is_empty());
}

/// `wait_for_work` returns on an enqueue (this process; on Postgres also another instance via
/// NOTIFY) well before its timeout, and by its timeout otherwise.
async fn wake_ups(h: &Harness) {
    drain_wake_ups(h).await;
    let t = Instant::now();
    h.q.wait_for_work(Duration::from_millis(300)).await;
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "returns by its timeout"
    );

    let mut producers: Vec<Arc<dyn JobQueue>> = vec![h.q.clone()];
    producers.extend(h.second_instance().await);
    for (n, producer) in producers.into_iter().enumerate() {
        // The previous round's NOTIFY echo may still be pending: spurious wake-ups are
        // allowed, but this test wants a quiet start.
        drain_wake_ups(h).await;
        let q = h.q.clone();
        let waiter = tokio::spawn(async move {
            let t = Instant::now();
            q.wait_for_work(Duration::from_secs(20)).await;
            t.elapsed()
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiter.is_finished(), "producer {n}: woke without work");
        let sent = Instant::now();
        producer
            .enqueue(job(&format!("wake-{n}")))
            .await
            .expect("enqueue");
        let waited = waiter.await.expect("waiter");
        assert!(
            waited < Duration::from_secs(5),
            "producer {n}: woke after {waited:?}"
        );
        eprintln!("wake-up from producer {n} after {:?}", sent.elapsed());
    }

    // An enqueue while nobody waits is not lost: the next wait returns at once.
    h.q.enqueue(job("wake-stored")).await.expect("enqueue");
    let t = Instant::now();
    h.q.wait_for_work(Duration::from_secs(10)).await;
    assert!(t.elapsed() < Duration::from_secs(2));
}

/// QUEUE.md §5 #17, measured: submit → claimed latency through the wake-up path (a
/// consumer blocked in `wait_for_work` with a 60 s poll). SQLite: the in-process `Notify`;
/// Postgres: an enqueue from a second queue instance, so the wake-up is a LISTEN/NOTIFY
/// round trip. Median and p99 are printed; the bound asserted is generous (2 s p99, the doc
/// expects under 1 s) because the test machine is shared.
async fn wake_up_latency(h: &Harness) {
    const ROUNDS: usize = 40;
    let producer = match h.second_instance().await {
        Some(q) => q,
        None => h.q.clone(),
    };
    drain_wake_ups(h).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Uuid, Instant)>();
    let q = h.q.clone();
    let consumer = tokio::spawn(async move {
        loop {
            match q.claim("consumer").await.expect("claim") {
                Some(c) => {
                    if tx.send((c.lease.job_id, Instant::now())).is_err() {
                        return;
                    }
                }
                None => q.wait_for_work(Duration::from_secs(60)).await,
            }
        }
    });
    let mut latencies = Vec::with_capacity(ROUNDS);
    for n in 0..ROUNDS {
        // Let the consumer go back to waiting, so each round measures a wake-up.
        tokio::time::sleep(Duration::from_millis(30)).await;
        let sent = Instant::now();
        let id = producer
            .enqueue(job(&format!("latency-{n}")))
            .await
            .expect("enqueue")
            .job
            .id;
        let (claimed, at) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("claimed within 30 s (60 s poll: the wake-up was lost)")
            .expect("consumer alive");
        assert_eq!(claimed, id);
        latencies.push(at - sent);
    }
    consumer.abort();
    latencies.sort();
    let median = latencies[ROUNDS / 2];
    let p99 = latencies[(ROUNDS * 99).div_ceil(100) - 1];
    let _ = writeln!(
        std::io::stderr(),
        "wake-up latency ({}, {ROUNDS} rounds, submit → claimed): median {median:?}, p99 {p99:?}, \
         max {:?}",
        h.q.backend(),
        latencies[ROUNDS - 1]
    );
    assert!(p99 < Duration::from_secs(2), "p99 {p99:?}");
}

/// Consume wake-ups already pending (an earlier enqueue, a NOTIFY echo, the listener's
/// connect) until a short wait runs to its timeout.
async fn drain_wake_ups(h: &Harness) {
    for _ in 0..50 {
        let t = Instant::now();
        h.q.wait_for_work(Duration::from_millis(100)).await;
        if t.elapsed() >= Duration::from_millis(90) {
            return;
        }
    }
    panic!("wait_for_work keeps returning at once with no work");
}

/// `ladle::queue::connect` picks the backend from the URL, creates a missing SQLite file
/// (and directory), and migrations are idempotent.
async fn connect_and_migrate(h: &Harness) {
    match &h.backend {
        Backend::Sqlite { dir, .. } => {
            let path = dir.path().join("nested").join("deeper").join("other.db");
            let url = format!("sqlite://{}", path.display());
            let q = ladle::queue::connect(&url, fast(), true)
                .await
                .expect("connect");
            assert_eq!(q.backend(), "sqlite");
            assert!(path.exists());
            enqueue_and_claim_once(&q).await;
            let again = ladle::queue::connect(&url, fast(), true)
                .await
                .expect("reconnect");
            assert_eq!(
                again
                    .list(&ListFilter {
                        kind: None,
                        limit: 10,
                        ..Default::default()
                    })
                    .await
                    .expect("list")
                    .len(),
                1
            );
            // An in-memory database works (and survives its connections being reused).
            let mem = ladle::queue::connect("sqlite::memory:", fast(), true)
                .await
                .expect("connect in-memory");
            enqueue_and_claim_once(&mem).await;
            assert_eq!(
                mem.list(&ListFilter {
                    kind: None,
                    limit: 10,
                    ..Default::default()
                })
                .await
                .expect("list")
                .len(),
                1
            );
            // Relative `sqlite:` URLs parse too.
            sqlx::sqlite::SqliteConnectOptions::from_str("sqlite:ladle.db").expect("parses");
        }
        Backend::Postgres { url, .. } => {
            // The harness already migrated this database: migrating again is a no-op.
            let q = ladle::queue::connect(url, fast(), true)
                .await
                .expect("connect");
            assert_eq!(q.backend(), "postgres");
            enqueue_and_claim_once(&q).await;
            // A schema named in the URL (libpq `options`) isolates the queue's tables.
            let Backend::Postgres { queue, .. } = &h.backend else {
                unreachable!()
            };
            sqlx::query("CREATE SCHEMA ladle_alt")
                .execute(queue.pool())
                .await
                .expect("create schema");
            let mut scoped = url::Url::parse(url).expect("url");
            scoped
                .query_pairs_mut()
                .append_pair("options", "-csearch_path=ladle_alt");
            let s = ladle::queue::connect(scoped.as_str(), fast(), true)
                .await
                .expect("connect with search_path");
            assert!(scoped.as_str().contains("search_path%3Dladle_alt"));
            enqueue_and_claim_once(&s).await;
            let in_alt: i64 = sqlx::query_scalar("SELECT count(*) FROM ladle_alt.jobs")
                .fetch_one(queue.pool())
                .await
                .expect("count");
            assert_eq!(in_alt, 1);
            assert_eq!(h.row_count().await, 1, "public.jobs untouched");

            let alt = url.replacen("postgres://", "postgresql://", 1);
            let q2 = ladle::queue::connect(&alt, fast(), false)
                .await
                .expect("connect");
            assert_eq!(q2.backend(), "postgres");
            assert_eq!(
                q2.list(&ListFilter {
                    kind: None,
                    limit: 10,
                    ..Default::default()
                })
                .await
                .expect("list")
                .len(),
                1
            );
        }
    }
}

async fn enqueue_and_claim_once(q: &Arc<dyn JobQueue>) {
    let e = q.enqueue(job("connect")).await.expect("enqueue");
    let c = q.claim("w").await.expect("claim").expect("job");
    assert_eq!(c.lease.job_id, e.job.id);
}

// ---------------------------------------------------------------------------------------------
// Instantiation: every scenario on every backend
/// Webhook deliveries: the `jobs` trigger writes one row per state change that `notify.events`
/// names (in the statement of the change), the claim leases rows to one owner at a time, an
/// expired lease is claimed again, every record is fenced, prune takes a job's rows with it.
async fn webhook_deliveries(h: &Harness) {
    let hooked = |name: &str, events: serde_json::Value| NewJob {
        notify: Some(json!({"url": "http://127.0.0.1:9/hook", "events": events})),
        ..job(name)
    };
    let a = enqueue(
        h,
        hooked("wh-a", json!(["running", "succeeded", "cancelled"])),
    )
    .await;
    assert_eq!(
        a.notify.as_ref().map(|n| n["url"].clone()),
        Some(json!("http://127.0.0.1:9/hook"))
    );
    let c = claim(h, "w").await;
    assert_eq!(c.lease.job_id, a.id);
    h.q.complete(&c.lease, &json!({})).await.expect("complete");
    // Not in its events: no row.
    let b = enqueue(h, hooked("wh-b", json!(["succeeded"]))).await;
    assert_eq!(
        h.q.request_cancel(b.id).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    let plain = enqueue(h, job("wh-plain")).await;
    assert_eq!(
        h.q.request_cancel(plain.id).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    assert!(h.q.deliveries(b.id).await.expect("deliveries").is_empty());
    assert!(
        h.q.deliveries(plain.id)
            .await
            .expect("deliveries")
            .is_empty()
    );

    let lease = Duration::from_secs(30);
    let mut got =
        h.q.claim_deliveries("d1", lease, 10)
            .await
            .expect("claim deliveries");
    got.sort_by_key(|d| d.event.as_str());
    let events: Vec<JobState> = got.iter().map(|d| d.event).collect();
    assert_eq!(events, vec![JobState::Running, JobState::Succeeded]);
    assert!(
        got.iter()
            .all(|d| d.job_id == a.id && d.attempts == 1 && d.owner == "d1")
    );
    assert!(
        got.iter()
            .all(|d| d.id.starts_with("msg_") && d.payload.is_none())
    );
    assert_ne!(got[0].id, got[1].id);
    assert!(
        h.q.claim_deliveries("d2", lease, 10)
            .await
            .expect("claim")
            .is_empty(),
        "leased"
    );

    let (running, succeeded) = (got[0].clone(), got[1].clone());
    let retry = DeliveryOutcome::Retry {
        status: Some(500),
        error: "the receiver answered 500".into(),
        after: Duration::ZERO,
    };
    assert!(
        h.q.record_delivery(&running, "{\"n\":1}", &retry)
            .await
            .expect("record")
    );
    assert!(
        !h.q.record_delivery(&running, "{}", &retry)
            .await
            .expect("record"),
        "fenced"
    );
    let ok = DeliveryOutcome::Delivered { status: 204 };
    assert!(
        h.q.record_delivery(&succeeded, "{}", &ok)
            .await
            .expect("record")
    );
    // Due again at once; the stored body comes back with it.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let again = h.q.claim_deliveries("d2", lease, 10).await.expect("claim");
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].id.as_str(), again[0].attempts),
        (running.id.as_str(), 2)
    );
    assert_eq!(again[0].payload.as_deref(), Some("{\"n\":1}"));
    let gave_up = DeliveryOutcome::GaveUp {
        status: None,
        error: "cannot connect".into(),
    };
    assert!(
        h.q.record_delivery(&again[0], "{}", &gave_up)
            .await
            .expect("record")
    );
    let records = h.q.deliveries(a.id).await.expect("deliveries");
    let summary: Vec<_> = records
        .iter()
        .map(|r| {
            (
                r.event,
                r.state,
                r.attempts,
                r.last_status,
                r.last_error.clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                JobState::Running,
                DeliveryState::Failed,
                2,
                None,
                Some("cannot connect".into())
            ),
            (
                JobState::Succeeded,
                DeliveryState::Delivered,
                1,
                Some(204),
                None
            ),
        ]
    );
    assert!(records[1].delivered_at.is_some() && records[1].next_attempt_at.is_none());

    // A lease that ran out: another owner claims the row, the first one's record is fenced.
    let d = enqueue(h, hooked("wh-d", json!(["running"]))).await;
    assert_eq!(claim(h, "w").await.lease.job_id, d.id);
    let first =
        h.q.claim_deliveries("d1", Duration::ZERO, 10)
            .await
            .expect("claim");
    assert_eq!(first.len(), 1);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let second = h.q.claim_deliveries("d2", lease, 10).await.expect("claim");
    assert_eq!((second.len(), second[0].attempts), (1, 2));
    assert!(
        !h.q.record_delivery(&first[0], "{}", &ok)
            .await
            .expect("record")
    );
    assert!(
        h.q.record_delivery(&second[0], "{}", &ok)
            .await
            .expect("record")
    );

    // Prune takes the rows of the jobs it deletes.
    h.q.prune(Utc::now() + TimeDelta::days(1), 0)
        .await
        .expect("prune");
    assert!(h.q.deliveries(a.id).await.expect("deliveries").is_empty());
}

// ---------------------------------------------------------------------------------------------

/// Generous bound so a deadlock fails the test instead of hanging the suite.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(120);

macro_rules! conformance {
    ($($name:ident => $config:expr;)*) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let h = super::Harness::sqlite($config).await;
                    tokio::time::timeout(super::SCENARIO_TIMEOUT, super::$name(&h))
                        .await
                        .expect("scenario timed out");
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let Some(h) = super::Harness::postgres(stringify!($name), $config).await
                    else {
                        return;
                    };
                    tokio::time::timeout(super::SCENARIO_TIMEOUT, super::$name(&h))
                        .await
                        .expect("scenario timed out");
                }
            )*
        }
    };
}

conformance! {
    lifecycle => super::fast();
    claim_exclusivity => super::fast();
    stale_owner_is_fenced => super::no_backoff();
    reaper_outcomes => super::fast();
    recovery_only_run => super::fast();
    reaper_vs_complete_race => super::long_backoff();
    retry_and_backoff => super::fast();
    cancel_queued => super::fast();
    cancel_running => super::fast();
    release => super::fast();
    idempotent_enqueue => super::fast();
    output_in_use => super::fast();
    ordering => super::fast();
    schema_checks => super::fast();
    prune => super::fast();
    list_pagination => super::fast();
    wake_ups => super::fast();
    wake_up_latency => super::fast();
    connect_and_migrate => super::fast();
    webhook_deliveries => super::fast();
}

// ---------------------------------------------------------------------------------------------
// QUEUE.md §5 #21: two-session interleavings on Postgres
// ---------------------------------------------------------------------------------------------

/// Whether `task` is still blocked after `wait` (it waits on a row lock the other session
/// holds).
async fn still_blocked<T>(task: &tokio::task::JoinHandle<T>, wait: Duration) -> bool {
    tokio::time::sleep(wait).await;
    !task.is_finished()
}

/// Two connections stepping through claim / enqueue / heartbeat / complete / reap in the
/// orders that matter, session 1 holding an explicit transaction open between steps:
/// - a claim held uncommitted is skipped by a second claimer (SKIP LOCKED), which neither
///   blocks nor takes it; after a rollback the job is claimable again;
/// - an uncommitted enqueue is invisible to a claimer until it commits;
/// - a heartbeat extending an expired lease, uncommitted: the reaper waits on the row lock and,
///   re-checking its WHERE on the committed version, leaves the job running;
/// - a reaper's requeue of an expired lease, uncommitted: the owner's fenced `complete` waits,
///   then finds the fence gone (LeaseLost) and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_two_session_interleavings() {
    let Some(h) = Harness::postgres("two_session_interleavings", fast()).await else {
        return;
    };
    let Backend::Postgres { queue, .. } = &h.backend else {
        unreachable!("a Postgres harness");
    };
    let pool = queue.pool().clone();
    let step = Duration::from_millis(300);

    // 1. A claim in flight (session 1's UPDATE … FOR UPDATE SKIP LOCKED, uncommitted).
    let first = enqueue(&h, job("two-1")).await.id;
    let mut s1 = pool.begin().await.expect("begin");
    let held: Uuid = sqlx::query_scalar(
        "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = 's1', \
             lease_expires_at = now() + interval '1 minute', heartbeat_at = now(), \
             started_at = now(), updated_at = now() \
         WHERE id = (SELECT id FROM jobs WHERE state = 'queued' AND run_after <= now() \
                     ORDER BY priority DESC, run_after, id LIMIT 1 FOR UPDATE SKIP LOCKED) \
         RETURNING id",
    )
    .fetch_one(&mut *s1)
    .await
    .expect("session 1 claims");
    assert_eq!(held, first);
    let t = Instant::now();
    assert!(
        h.q.claim("s2").await.expect("claim").is_none(),
        "session 2 skips the locked row"
    );
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "SKIP LOCKED does not wait"
    );
    let second = enqueue(&h, job("two-2")).await.id;
    let c =
        h.q.claim("s2")
            .await
            .expect("claim")
            .expect("the unlocked job");
    assert_eq!(c.lease.job_id, second, "session 2 takes the next job");
    s1.rollback().await.expect("rollback");
    let again = claim(&h, "s3").await;
    assert_eq!((again.lease.job_id, again.lease.attempt), (first, 1));

    // 2. An uncommitted enqueue is invisible to claimers until it commits.
    let hidden = Uuid::now_v7();
    let mut s1 = pool.begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO jobs (id, request_hash, output_url, recipe, run_after, created_at, \
                           updated_at) \
         VALUES ($1, '\\x00', 'file:///soups/two-hidden', '{}', now(), now(), now())",
    )
    .bind(hidden)
    .execute(&mut *s1)
    .await
    .expect("session 1 inserts");
    assert!(h.q.get(hidden).await.expect("get").is_none());
    assert!(h.q.claim("s2").await.expect("claim").is_none());
    s1.commit().await.expect("commit");
    assert_eq!(claim(&h, "s2").await.lease.job_id, hidden);

    // 3. Heartbeat (uncommitted) vs reaper on an expired lease: the heartbeat wins.
    let hb = enqueue(&h, job("two-hb")).await.id;
    let owner = claim(&h, "owner").await;
    assert_eq!(owner.lease.job_id, hb);
    h.expire(hb).await;
    let mut s1 = pool.begin().await.expect("begin");
    let extended = sqlx::query(
        "UPDATE jobs SET lease_expires_at = now() + interval '1 minute', heartbeat_at = now() \
         WHERE id = $1 AND lease_owner = $2 AND attempts = $3 AND state = 'running'",
    )
    .bind(hb)
    .bind(&owner.lease.owner)
    .bind(owner.lease.attempt)
    .execute(&mut *s1)
    .await
    .expect("session 1 heartbeats")
    .rows_affected();
    assert_eq!(extended, 1);
    let q = h.q.clone();
    let reaper = tokio::spawn(async move { q.reap_expired().await });
    assert!(
        still_blocked(&reaper, step).await,
        "the reaper waits for the heartbeat's row lock"
    );
    s1.commit().await.expect("commit");
    assert_eq!(reaper.await.expect("join").expect("reap"), 0);
    let j = get(&h, hb).await;
    assert_eq!((j.state, j.attempts), (JobState::Running, 1));
    assert_eq!(j.lease_owner.as_deref(), Some("owner"));

    // 4. Reaper (uncommitted) vs the owner's complete: the reaper wins, complete is fenced.
    h.expire(hb).await;
    let mut s1 = pool.begin().await.expect("begin");
    let reaped = sqlx::query(
        "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL, \
             updated_at = now() \
         WHERE id = $1 AND state = 'running' AND lease_expires_at < now()",
    )
    .bind(hb)
    .execute(&mut *s1)
    .await
    .expect("session 1 reaps")
    .rows_affected();
    assert_eq!(reaped, 1);
    let q = h.q.clone();
    let lease = owner.lease.clone();
    let complete = tokio::spawn(async move { q.complete(&lease, &json!({})).await });
    assert!(
        still_blocked(&complete, step).await,
        "complete waits for the reaper's row lock"
    );
    s1.commit().await.expect("commit");
    let done = complete.await.expect("join");
    assert!(is_lease_lost(&done, hb), "{done:?}");
    let j = get(&h, hb).await;
    assert_eq!((j.state, j.attempts), (JobState::Queued, 1));
    assert!(j.result.is_none() && j.finished_at.is_none());
}

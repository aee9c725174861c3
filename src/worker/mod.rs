//! The worker loop: reap → claim → run (with heartbeats) → complete / fail / release.
//!
//! No merge math here: a claimed job's recipe goes to the [`Engine`]. The worker owns the
//! lease: a heartbeat task extends it, carries progress, and turns "cancel requested", "lease
//! lost" or "no successful heartbeat for 2/3 of the lease" into a stop of the run. The merge
//! itself runs on the blocking pool and rayon, so heartbeats never wait behind tensor math.

pub use crate::failpoints;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::engine::{
    Engine, EngineError, MergeOutcome, Progress, PublishGate, RunControl, StopReason, analysis,
};
use crate::queue::{
    ClaimedJob, HeartbeatOutcome, JobError, JobKind, JobQueue, JobState, Lease, QueueError,
};
use crate::search::evaluator::AllowedHosts;
use crate::search::spec::JobSpec;
use failpoints::CrashPoint;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Jobs run at once by this process.
    pub slots: usize,
    /// Must match the queue's lease TTL.
    pub lease_ttl: Duration,
    pub heartbeat_interval: Duration,
    /// Longest sleep between claim attempts when nothing wakes the worker.
    pub poll_interval: Duration,
    /// On shutdown, how long an in-flight job may keep running before it is released.
    pub shutdown_grace: Duration,
    /// Hosts an evaluator URL may name (checked again before every search).
    pub evaluator_hosts: AllowedHosts,
    /// `--retry-storage-full`: a `storage_full` failure is retried (it is not by default).
    pub retry_storage_full: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            slots: 1,
            lease_ttl: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(15),
            poll_interval: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
            evaluator_hosts: AllowedHosts::default(),
            retry_storage_full: false,
        }
    }
}

/// How often a running job's progress is stored when it changed (one fenced heartbeat, not
/// one write per chunk): what `GET /v1/merges/{id}` and the event streams see move.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// A unique identity for this worker process: host, pid and a random suffix.
pub fn worker_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    format!(
        "{host}:{}:{}",
        std::process::id(),
        &suffix[suffix.len() - 8..]
    )
}

/// Run `config.slots` worker loops until `shutdown` fires; in-flight jobs get
/// `shutdown_grace` to finish, then are released without charging an attempt.
pub async fn run(
    queue: Arc<dyn JobQueue>,
    engine: Arc<Engine>,
    config: WorkerConfig,
    shutdown: CancellationToken,
) {
    let owner = worker_identity();
    failpoints::announce();
    info!(%owner, slots = config.slots, backend = queue.backend(), "worker started");
    crate::metrics::worker_slots(config.slots.max(1) as f64);
    let mut loops = tokio::task::JoinSet::new();
    for slot in 0..config.slots.max(1) {
        let w = Slot {
            queue: queue.clone(),
            engine: engine.clone(),
            config: config.clone(),
            owner: format!("{owner}/{slot}"),
            shutdown: shutdown.clone(),
        };
        loops.spawn(async move { w.run().await });
    }
    while loops.join_next().await.is_some() {}
    crate::metrics::worker_slots(-(config.slots.max(1) as f64));
    info!(%owner, "worker stopped");
}

struct Slot {
    queue: Arc<dyn JobQueue>,
    engine: Arc<Engine>,
    config: WorkerConfig,
    owner: String,
    shutdown: CancellationToken,
}

impl Slot {
    async fn run(&self) {
        while !self.shutdown.is_cancelled() {
            if let Err(e) = self.queue.reap_expired().await {
                warn!(error = %e, "reaping expired leases failed");
            }
            // A shutdown that arrived while reaping: claim nothing more (a claim now would
            // only be handed back, counted as an attempt).
            if self.shutdown.is_cancelled() {
                break;
            }
            // The lease starts in the database no earlier than this.
            let asked = Instant::now();
            match self.queue.claim(&self.owner).await {
                Ok(Some(job)) if self.shutdown.is_cancelled() => {
                    // The shutdown arrived while this claim was in flight: hand the job
                    // straight back (not charged: max_attempts grows by one).
                    if let Err(e) = self.queue.release(&job.lease).await {
                        warn!(error = %e, job_id = %job.lease.job_id, "could not release a job claimed during shutdown");
                    }
                }
                Ok(Some(job)) => {
                    let span = info_span!("job", job_id = %job.lease.job_id, attempt = job.lease.attempt, owner = %self.owner);
                    let (_busy, started, row) =
                        (crate::metrics::slot_busy(), Instant::now(), job.job.clone());
                    crate::metrics::job_started(&row);
                    let outcome = self.run_job(job, asked).instrument(span).await;
                    crate::metrics::job_finished(&row, outcome, started.elapsed());
                }
                Ok(None) => {
                    tokio::select! {
                        _ = self.shutdown.cancelled() => {}
                        _ = self.queue.wait_for_work(self.config.poll_interval) => {}
                    }
                }
                Err(e) => {
                    warn!(error = %e, "claim failed; retrying after the poll interval");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => {}
                        _ = tokio::time::sleep(self.config.poll_interval) => {}
                    }
                }
            }
        }
    }

    /// Runs one claimed attempt; returns how it ended (the `outcome` label of the metrics).
    async fn run_job(&self, claimed: ClaimedJob, claimed_at: Instant) -> &'static str {
        let lease = claimed.lease.clone();
        info!("job claimed");
        let recipe: Option<JobSpec> = match claimed.job.kind {
            JobKind::Analysis => None,
            JobKind::Merge => match serde_json::from_value(claimed.job.recipe.clone()) {
                Ok(r) => Some(r),
                Err(e) => {
                    let err = JobError {
                        code: crate::error::ErrorCode::InvalidRecipe,
                        message: format!("stored recipe cannot be read: {e}"),
                        retryable: false,
                        attempt: None,
                    };
                    return self.finish_failed(&lease, &err).await;
                }
            },
        };
        if let (true, Some(recipe)) = (claimed.job.recovery_only, &recipe) {
            return self.recover_only(&claimed, recipe).await;
        }
        let progress = Arc::new(Progress::default());
        let keeper = Arc::new(LeaseKeeper::new(
            self.queue.clone(),
            lease.clone(),
            progress.clone(),
            claimed_at,
            self.fence_after(),
        ));
        let ctl = Arc::new(RunControl {
            cancel: CancellationToken::new(),
            stop_reason: Default::default(),
            progress: progress.clone(),
            gate: Arc::new(LeaseGate {
                keeper: keeper.clone(),
            }),
            run_info: serde_json::json!({"job_id": lease.job_id, "attempt": lease.attempt}),
        });

        let heartbeat = tokio::spawn(
            heartbeat_loop(keeper.clone(), ctl.clone(), self.config.heartbeat_interval)
                .in_current_span(),
        );
        // Graceful shutdown: let the run finish within the grace period, then stop it.
        let grace = {
            let ctl = ctl.clone();
            let shutdown = self.shutdown.clone();
            let grace = self.config.shutdown_grace;
            tokio::spawn(
                async move {
                    shutdown.cancelled().await;
                    tokio::select! {
                        _ = ctl.cancel.cancelled() => {}
                        _ = tokio::time::sleep(grace) => ctl.stop(StopReason::ShuttingDown),
                    }
                }
                .in_current_span(),
            )
        };

        let result = match &recipe {
            Some(job) => {
                let driver = crate::search::run::Driver {
                    engine: &self.engine,
                    ctl: &ctl,
                    job_id: lease.job_id.to_string(),
                    allowed: &self.config.evaluator_hosts,
                    recorded: crate::search::run::recorded(claimed.job.progress.as_ref()),
                    backoff: Duration::from_millis(500),
                };
                crate::search::run::run_job(&driver, job)
                    .await
                    .map(Done::Merge)
            }
            None => analysis::run(&self.engine, &claimed.job.recipe, &ctl)
                .await
                .map(Done::Analysis),
        };
        heartbeat.abort();
        grace.abort();

        match result {
            Ok(Done::Analysis(result)) => {
                let _ = keeper.beat(self.config.heartbeat_interval).await;
                match self
                    .settle("complete", || self.queue.complete(&lease, &result))
                    .await
                {
                    Ok(()) => info!("analysis succeeded"),
                    Err(e) => warn!(error = %e, "could not record the analysis result"),
                }
                "succeeded"
            }
            Ok(Done::Merge(outcome)) => {
                failpoints::crash(CrashPoint::AfterManifest);
                let mut result = serde_json::json!({"uri": outcome.uri, "files": outcome.files});
                if let Some(search) = progress.search() {
                    result["search"] = search;
                }
                if outcome.recovered {
                    result["recovered"] = serde_json::Value::Bool(true);
                    // Nothing was merged this time, but the soup is whole: say so.
                    let total = progress.tensors_total.load(Ordering::Relaxed);
                    progress.tensors_done.store(total, Ordering::Relaxed);
                }
                // Record final progress, then complete (both fenced). The manifest is out:
                // complete is retried through database errors, or the job would be charged
                // another attempt (or fail on its last) although the soup is published.
                let _ = keeper.beat(self.config.heartbeat_interval).await;
                match self
                    .settle("complete", || self.queue.complete(&lease, &result))
                    .await
                {
                    Ok(()) => info!(uri = %outcome.uri, "job succeeded"),
                    Err(e) => {
                        warn!(error = %e, "could not record success; the next owner will find the manifest")
                    }
                }
                "succeeded"
            }
            Err(EngineError::Cancelled) => {
                match self
                    .settle("acknowledge_cancel", || {
                        self.queue.acknowledge_cancel(&lease)
                    })
                    .await
                {
                    Ok(()) => info!("job cancelled"),
                    Err(e) => warn!(error = %e, "could not acknowledge the cancel"),
                }
                "cancelled"
            }
            Err(EngineError::LeaseLost) => {
                warn!("lease lost: stopped without publishing");
                crate::metrics::lease_lost();
                "lease_lost"
            }
            Err(EngineError::ShuttingDown) => {
                match self.settle("release", || self.queue.release(&lease)).await {
                    Ok(()) => info!("job released for another worker (shutdown)"),
                    Err(e) => warn!(error = %e, "could not release the job"),
                }
                "released"
            }
            Err(e) => {
                let code = e.code();
                let err = JobError {
                    code,
                    message: e.to_string(),
                    retryable: code.retryable()
                        || (code == crate::error::ErrorCode::StorageFull
                            && self.config.retry_storage_full),
                    attempt: None,
                };
                self.finish_failed(&lease, &err).await
            }
        }
    }

    /// The one recovery-only run the reaper gives a merge whose last worker died (QUEUE.md
    /// §4.8 on the last attempt): no merge; succeed (`recovered: true`) if this recipe's soup
    /// is published, else fail with the reaper's `lease_expired` error.
    async fn recover_only(&self, claimed: &ClaimedJob, job: &JobSpec) -> &'static str {
        let lease = &claimed.lease;
        info!("recovery-only run: checking the output, merging nothing");
        let why = match self
            .engine
            .recover(&job.recipe, job.search.is_some(), claimed.job.id)
            .await
        {
            Ok(Some(outcome)) => {
                let result = serde_json::json!({"uri": outcome.uri, "files": outcome.files, "recovered": true});
                match self
                    .settle("complete", || self.queue.complete(lease, &result))
                    .await
                {
                    Ok(()) => info!(uri = %outcome.uri, "job succeeded (recovered)"),
                    Err(e) => warn!(error = %e, "could not record the recovered success"),
                }
                return "succeeded";
            }
            Ok(None) => "no manifest was published".to_string(),
            Err(e) => e.to_string(),
        };
        let mut err = claimed.job.error.clone().unwrap_or_else(|| JobError {
            code: crate::error::ErrorCode::LeaseExpired,
            message: crate::queue::state::LEASE_EXPIRED_MESSAGE.to_string(),
            retryable: true,
            attempt: None,
        });
        err.message = format!("{} (recovery run: {why})", err.message);
        err.retryable = false;
        self.finish_failed(lease, &err).await
    }

    /// Run one of the fenced writes that end an attempt (complete, fail, release, acknowledge
    /// the cancel), retrying database errors for up to one lease length. A lost lease is final:
    /// the queue already moved the job on.
    async fn settle<T, F, Fut>(&self, what: &'static str, mut op: F) -> Result<T, QueueError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, QueueError>>,
    {
        let deadline = Instant::now() + self.config.lease_ttl;
        let mut pause = Duration::from_millis(200);
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e @ (QueueError::LeaseLost(_) | QueueError::Corrupt(_))) => return Err(e),
                Err(e) if Instant::now() + pause < deadline => {
                    warn!(error = %e, op = what, "database error; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Records a failed attempt; returns `failed`, `retried` (queued again) or `cancelled`.
    async fn finish_failed(&self, lease: &Lease, err: &JobError) -> &'static str {
        match self.settle("fail", || self.queue.fail(lease, err)).await {
            Ok(state) => {
                info!(code = %err.code, state = state.as_str(), message = %err.message, "job failed");
                match state {
                    JobState::Queued => "retried",
                    JobState::Cancelled => "cancelled",
                    _ => "failed",
                }
            }
            Err(e) => {
                error!(error = %e, "could not record the failure");
                "failed"
            }
        }
    }

    /// Stop working on a job when no heartbeat succeeded for this long: 2/3 of the lease, so
    /// a partitioned worker stops before another can claim the job.
    fn fence_after(&self) -> Duration {
        self.config.lease_ttl * 2 / 3
    }
}

/// What a finished run hands back.
enum Done {
    Merge(MergeOutcome),
    /// An analysis's numbers: the job's `result`.
    Analysis(serde_json::Value),
}

/// The lease of one running job. Heartbeats from the loop and from the publish gate go
/// through [`LeaseKeeper::beat`] one at a time, so the stored progress never goes backwards,
/// and every confirmation moves the one fence deadline.
struct LeaseKeeper {
    queue: Arc<dyn JobQueue>,
    lease: Lease,
    progress: Arc<Progress>,
    /// When the last confirmed heartbeat (or the claim) was *sent*, on this process's
    /// monotonic clock: the database extended the lease no earlier than that.
    last_ok: std::sync::Mutex<Instant>,
    /// The progress the last confirmed heartbeat stored.
    last_stored: std::sync::Mutex<Option<serde_json::Value>>,
    one_at_a_time: tokio::sync::Mutex<()>,
    fence_after: Duration,
}

#[derive(Debug, thiserror::Error)]
enum BeatError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

impl LeaseKeeper {
    fn new(
        queue: Arc<dyn JobQueue>,
        lease: Lease,
        progress: Arc<Progress>,
        claimed_at: Instant,
        fence_after: Duration,
    ) -> Self {
        LeaseKeeper {
            queue,
            lease,
            progress,
            last_ok: std::sync::Mutex::new(claimed_at),
            last_stored: std::sync::Mutex::new(None),
            one_at_a_time: tokio::sync::Mutex::new(()),
            fence_after,
        }
    }

    /// After this instant the worker must act as if the lease were lost: 2/3 of the lease
    /// after the last confirmation, so it stops before the lease can expire and another
    /// worker claim the job.
    fn fence_deadline(&self) -> Instant {
        *self.last_ok.lock().unwrap_or_else(|p| p.into_inner()) + self.fence_after
    }

    fn time_left(&self) -> Duration {
        self.fence_deadline()
            .saturating_duration_since(Instant::now())
    }

    /// The progress as stored in the job row: the snapshot plus the search record.
    fn progress_json(&self) -> Option<serde_json::Value> {
        let mut progress = serde_json::to_value(self.progress.snapshot()).ok();
        if let (Some(p), Some(search)) = (progress.as_mut(), self.progress.search()) {
            p["search"] = search;
        }
        progress
    }

    /// Whether the progress moved since the last confirmed heartbeat stored it.
    fn progress_changed(&self) -> bool {
        let now = self.progress_json();
        *self.last_stored.lock().unwrap_or_else(|p| p.into_inner()) != now
    }

    /// One fenced heartbeat carrying the current progress, abandoned after `budget`.
    async fn beat(&self, budget: Duration) -> Result<HeartbeatOutcome, BeatError> {
        let call = async {
            let _one = self.one_at_a_time.lock().await;
            let progress = self.progress_json();
            let sent = Instant::now();
            let outcome = self.queue.heartbeat(&self.lease, progress.as_ref()).await?;
            if let HeartbeatOutcome::Held { .. } = outcome {
                let mut last = self.last_ok.lock().unwrap_or_else(|p| p.into_inner());
                *last = (*last).max(sent);
                *self.last_stored.lock().unwrap_or_else(|p| p.into_inner()) = progress;
            }
            Ok(outcome)
        };
        match tokio::time::timeout(budget, call).await {
            Ok(r) => r,
            Err(_) => Err(BeatError::TimedOut(budget)),
        }
    }
}

async fn heartbeat_loop(keeper: Arc<LeaseKeeper>, ctl: Arc<RunControl>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    // Progress between heartbeats: a beat when it moved, at most once per PROGRESS_INTERVAL.
    let mut progress_tick = tokio::time::interval(PROGRESS_INTERVAL.min(interval));
    progress_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    progress_tick.tick().await;
    let mut hints = keeper.queue.cancel_hints();
    let mut hints_open = true;
    let job_id = keeper.lease.job_id;
    loop {
        let deadline = keeper.fence_deadline();
        tokio::select! {
            _ = ctl.cancel.cancelled() => return,
            _ = tick.tick() => {}
            _ = progress_tick.tick() => if !keeper.progress_changed() { continue },
            // A cancel hint for this job: beat now, the heartbeat's answer decides.
            hint = hints.recv(), if hints_open => match hint {
                Ok(id) if id == job_id => {}
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    hints_open = false;
                    continue;
                }
            },
            // Fence on time, not only after the next failed heartbeat.
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
        let left = keeper.time_left();
        if left.is_zero() {
            fence(&ctl);
            return;
        }
        // A hung database call must not outlive the fence deadline.
        match keeper.beat(left.min(interval)).await {
            Ok(HeartbeatOutcome::Held { cancel_requested }) => {
                failpoints::crash(CrashPoint::Heartbeat);
                if cancel_requested {
                    info!("cancel requested: stopping");
                    ctl.stop(StopReason::Cancelled);
                    return;
                }
            }
            Ok(HeartbeatOutcome::Lost) => {
                warn!("heartbeat: lease lost");
                ctl.stop(StopReason::LeaseLost);
                return;
            }
            Err(e) => warn!(error = %e, "heartbeat failed"),
        }
        if keeper.time_left().is_zero() {
            fence(&ctl);
            return;
        }
    }
}

fn fence(ctl: &RunControl) {
    warn!("no successful heartbeat for 2/3 of the lease: fencing myself");
    crate::metrics::self_fenced();
    ctl.stop(StopReason::LeaseLost);
}

/// Before the manifest: a fenced heartbeat must confirm the lease, with no cancel pending.
struct LeaseGate {
    keeper: Arc<LeaseKeeper>,
}

#[async_trait]
impl PublishGate for LeaseGate {
    async fn may_publish(&self) -> Result<(), EngineError> {
        let left = self.keeper.time_left();
        if left.is_zero() {
            return Err(EngineError::LeaseLost);
        }
        match self.keeper.beat(left).await {
            Ok(HeartbeatOutcome::Held {
                cancel_requested: false,
            }) => {
                failpoints::crash(CrashPoint::BeforeManifest);
                Ok(())
            }
            Ok(HeartbeatOutcome::Held {
                cancel_requested: true,
            }) => Err(EngineError::Cancelled),
            Ok(HeartbeatOutcome::Lost) => Err(EngineError::LeaseLost),
            Err(e) => {
                // Unconfirmed is not held: publish nothing; the lease will expire and the
                // job runs again elsewhere (the shards written so far are deterministic).
                warn!(error = %e, "cannot confirm the lease before publishing");
                Err(EngineError::LeaseLost)
            }
        }
    }

    /// A search's evaluation: stored at once with a fenced heartbeat. Not confirmed → stop
    /// (the next attempt replays what was stored).
    async fn persist(&self) -> Result<(), EngineError> {
        let left = self.keeper.time_left();
        if left.is_zero() {
            return Err(EngineError::LeaseLost);
        }
        match self.keeper.beat(left).await {
            Ok(HeartbeatOutcome::Held {
                cancel_requested: false,
            }) => Ok(()),
            Ok(HeartbeatOutcome::Held {
                cancel_requested: true,
            }) => Err(EngineError::Cancelled),
            Ok(HeartbeatOutcome::Lost) => Err(EngineError::LeaseLost),
            Err(e) => {
                warn!(error = %e, "cannot store the search's progress");
                Err(EngineError::LeaseLost)
            }
        }
    }
}

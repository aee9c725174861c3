//! The worker loop: reap → claim → run (with heartbeats) → complete / fail / release.
//!
//! No merge math here: a claimed job's recipe goes to the [`Engine`]. The worker owns the
//! lease: a heartbeat task extends it, carries progress, and turns "cancel requested", "lease
//! lost" or "no successful heartbeat for 2/3 of the lease" into a stop of the run. The merge
//! itself runs on the blocking pool and rayon, so heartbeats never wait behind tensor math.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::engine::{Engine, EngineError, Progress, PublishGate, RunControl, StopReason};
use crate::queue::{ClaimedJob, HeartbeatOutcome, JobError, JobQueue, Lease};
use crate::recipe::Recipe;

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
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            slots: 1,
            lease_ttl: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(15),
            poll_interval: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

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
    info!(%owner, slots = config.slots, backend = queue.backend(), "worker started");
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
            match self.queue.claim(&self.owner).await {
                Ok(Some(job)) => {
                    let span = info_span!("job", job_id = %job.lease.job_id, attempt = job.lease.attempt, owner = %self.owner);
                    self.run_job(job).instrument(span).await;
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

    async fn run_job(&self, claimed: ClaimedJob) {
        let lease = claimed.lease.clone();
        info!("job claimed");
        let recipe: Recipe = match serde_json::from_value(claimed.job.recipe.clone()) {
            Ok(r) => r,
            Err(e) => {
                let err = JobError {
                    code: crate::error::ErrorCode::InvalidRecipe,
                    message: format!("stored recipe cannot be read: {e}"),
                    retryable: false,
                };
                self.finish_failed(&lease, &err).await;
                return;
            }
        };
        let progress = Arc::new(Progress::default());
        let health = Arc::new(LeaseHealth::new());
        let ctl = Arc::new(RunControl {
            cancel: CancellationToken::new(),
            stop_reason: Default::default(),
            progress: progress.clone(),
            gate: Arc::new(LeaseGate {
                queue: self.queue.clone(),
                lease: lease.clone(),
                progress: progress.clone(),
                health: health.clone(),
                fence_after: self.fence_after(),
            }),
            run_info: serde_json::json!({"job_id": lease.job_id, "attempt": lease.attempt}),
        });

        let heartbeat = tokio::spawn(
            heartbeat_loop(
                self.queue.clone(),
                lease.clone(),
                ctl.clone(),
                health,
                self.config.heartbeat_interval,
                self.fence_after(),
            )
            .in_current_span(),
        );
        // Graceful shutdown: let the run finish within the grace period, then stop it.
        let grace = {
            let ctl = ctl.clone();
            let shutdown = self.shutdown.clone();
            let grace = self.config.shutdown_grace;
            tokio::spawn(async move {
                shutdown.cancelled().await;
                tokio::select! {
                    _ = ctl.cancel.cancelled() => {}
                    _ = tokio::time::sleep(grace) => ctl.stop(StopReason::ShuttingDown),
                }
            })
        };

        let result = self.engine.run(&recipe, &ctl).await;
        heartbeat.abort();
        grace.abort();

        match result {
            Ok(outcome) => {
                let mut result = serde_json::json!({"uri": outcome.uri, "files": outcome.files});
                if outcome.recovered {
                    result["recovered"] = serde_json::Value::Bool(true);
                }
                let progress = progress.snapshot();
                // Record final progress, then complete (both fenced).
                let _ = self
                    .queue
                    .heartbeat(&lease, serde_json::to_value(progress).ok().as_ref())
                    .await;
                match self.queue.complete(&lease, &result).await {
                    Ok(()) => info!(uri = %outcome.uri, "job succeeded"),
                    Err(e) => {
                        warn!(error = %e, "could not record success; the next owner will find the manifest")
                    }
                }
            }
            Err(EngineError::Cancelled) => match self.queue.acknowledge_cancel(&lease).await {
                Ok(()) => info!("job cancelled"),
                Err(e) => warn!(error = %e, "could not acknowledge the cancel"),
            },
            Err(EngineError::LeaseLost) => {
                warn!("lease lost: stopped without publishing");
            }
            Err(EngineError::ShuttingDown) => match self.queue.release(&lease).await {
                Ok(()) => info!("job released for another worker (shutdown)"),
                Err(e) => warn!(error = %e, "could not release the job"),
            },
            Err(e) => {
                let code = e.code();
                let err = JobError {
                    code,
                    message: e.to_string(),
                    retryable: code.retryable(),
                };
                self.finish_failed(&lease, &err).await;
            }
        }
    }

    async fn finish_failed(&self, lease: &Lease, err: &JobError) {
        match self.queue.fail(lease, err).await {
            Ok(state) => {
                info!(code = %err.code, state = state.as_str(), message = %err.message, "job failed")
            }
            Err(e) => error!(error = %e, "could not record the failure"),
        }
    }

    /// Stop working on a job when no heartbeat succeeded for this long: 2/3 of the lease, so
    /// a partitioned worker stops before another can claim the job.
    fn fence_after(&self) -> Duration {
        self.config.lease_ttl * 2 / 3
    }
}

/// When the lease was last confirmed, on this process's monotonic clock.
struct LeaseHealth {
    last_ok: std::sync::Mutex<Instant>,
}

impl LeaseHealth {
    fn new() -> Self {
        LeaseHealth {
            last_ok: std::sync::Mutex::new(Instant::now()),
        }
    }
    fn confirm(&self) {
        *self.last_ok.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }
    fn since_ok(&self) -> Duration {
        self.last_ok
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }
}

async fn heartbeat_loop(
    queue: Arc<dyn JobQueue>,
    lease: Lease,
    ctl: Arc<RunControl>,
    health: Arc<LeaseHealth>,
    interval: Duration,
    fence_after: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = ctl.cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let progress = serde_json::to_value(ctl.progress.snapshot()).ok();
        // A hung database call must not outlive the fence deadline.
        let beat = tokio::time::timeout(interval, queue.heartbeat(&lease, progress.as_ref())).await;
        match beat {
            Ok(Ok(HeartbeatOutcome::Held { cancel_requested })) => {
                health.confirm();
                if cancel_requested {
                    info!("cancel requested: stopping");
                    ctl.stop(StopReason::Cancelled);
                    return;
                }
            }
            Ok(Ok(HeartbeatOutcome::Lost)) => {
                warn!("heartbeat: lease lost");
                ctl.stop(StopReason::LeaseLost);
                return;
            }
            Ok(Err(e)) => warn!(error = %e, "heartbeat failed"),
            Err(_) => warn!("heartbeat timed out"),
        }
        if health.since_ok() >= fence_after {
            warn!(
                since_ok_s = health.since_ok().as_secs_f64(),
                "no successful heartbeat for 2/3 of the lease: fencing myself"
            );
            ctl.stop(StopReason::LeaseLost);
            return;
        }
    }
}

/// Before the manifest: a fenced heartbeat must confirm the lease, with no cancel pending.
struct LeaseGate {
    queue: Arc<dyn JobQueue>,
    lease: Lease,
    progress: Arc<Progress>,
    health: Arc<LeaseHealth>,
    fence_after: Duration,
}

#[async_trait]
impl PublishGate for LeaseGate {
    async fn may_publish(&self) -> Result<(), EngineError> {
        if self.health.since_ok() >= self.fence_after {
            return Err(EngineError::LeaseLost);
        }
        let progress = serde_json::to_value(self.progress.snapshot()).ok();
        match self.queue.heartbeat(&self.lease, progress.as_ref()).await {
            Ok(HeartbeatOutcome::Held {
                cancel_requested: false,
            }) => {
                self.health.confirm();
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
}

//! What a run is controlled and observed by: progress counters and phase, the publish gate,
//! stop reasons (moved out of `engine/mod.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use async_trait::async_trait;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::EngineError;

/// Live progress counters, shared with the heartbeat that reports them. Updated with relaxed
/// atomics per chunk; the worker samples them (at most once a second) into the job row.
#[derive(Debug, Default)]
pub struct Progress {
    pub tensors_done: AtomicU64,
    pub tensors_total: AtomicU64,
    pub bytes_read: AtomicU64,
    /// The input bytes planned to be read so far: the merge pass's reads, set at planning,
    /// plus each pre-pass's when it starts (so `bytes_read` never passes it).
    pub bytes_total: AtomicU64,
    pub bytes_written: AtomicU64,
    /// The current [`Phase`] (its `u8` code; 0: not started).
    phase: AtomicU8,
    /// An evaluation-driven search's record (greedy soup): stored with every heartbeat,
    /// shown by `GET /v1/merges/{id}`, written into the manifest.
    pub search: std::sync::Mutex<Option<serde_json::Value>>,
}

/// What a running job is doing now (`progress.phase`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Resolving and opening the inputs, checking them against each other.
    Planning,
    /// The exact whole-model selection pass of `scope: "model"` (before anything is written).
    Prepass,
    /// Streaming tensors into the output.
    Merging,
    /// Asking the evaluator for a score (greedy soups, sweeps).
    Evaluating,
    /// Writing the manifest (the soup becomes visible).
    Publishing,
}

impl Phase {
    const ALL: [Phase; 5] = [
        Phase::Planning,
        Phase::Prepass,
        Phase::Merging,
        Phase::Evaluating,
        Phase::Publishing,
    ];

    fn code(self) -> u8 {
        Phase::ALL
            .iter()
            .position(|p| *p == self)
            .map_or(0, |i| i as u8 + 1)
    }

    fn from_code(code: u8) -> Option<Phase> {
        Phase::ALL.get(usize::from(code).checked_sub(1)?).copied()
    }
}

/// The public shape of progress (`GET /v1/merges/{id}` → `progress`, and the data of a
/// `progress` event).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub struct ProgressSnapshot {
    /// What the job is doing; absent before it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    pub tensors_done: u64,
    pub tensors_total: u64,
    pub bytes_read: u64,
    /// Input bytes planned to be read: every tensor the merge reads, of every input it reads
    /// it from, plus one more read of a tensor's inputs per pre-pass (added when the pass
    /// starts, so it can grow while the job runs). `bytes_read` never passes it, and equals
    /// it when a merge ends having read everything (not when it kept a previous attempt's
    /// output).
    #[serde(default)]
    pub bytes_total: u64,
    pub bytes_written: u64,
}

impl Progress {
    pub fn snapshot(&self) -> ProgressSnapshot {
        ProgressSnapshot {
            phase: Phase::from_code(self.phase.load(Ordering::Relaxed)),
            tensors_done: self.tensors_done.load(Ordering::Relaxed),
            tensors_total: self.tensors_total.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
        }
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase.code(), Ordering::Relaxed);
    }

    /// The search record, if this run searches.
    pub fn search(&self) -> Option<serde_json::Value> {
        self.search
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn set_search(&self, record: serde_json::Value) {
        *self
            .search
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(record);
    }
}

/// Asked right before the manifest is written: may this run still publish?
#[async_trait]
pub trait PublishGate: Send + Sync {
    async fn may_publish(&self) -> Result<(), EngineError>;

    /// Store the progress now (fenced), before the run goes on: a search calls it after each
    /// evaluation so that a later attempt replays it instead of asking again.
    async fn persist(&self) -> Result<(), EngineError> {
        Ok(())
    }
}

/// Always open: the one-shot CLI has no lease to lose.
pub struct AlwaysPublish;

#[async_trait]
impl PublishGate for AlwaysPublish {
    async fn may_publish(&self) -> Result<(), EngineError> {
        Ok(())
    }
}

/// Why a run was asked to stop; set before the token is cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Cancelled,
    LeaseLost,
    ShuttingDown,
}

/// What a run is controlled and observed by.
pub struct RunControl {
    pub cancel: CancellationToken,
    /// Read when `cancel` fires, to tell the caller why.
    pub stop_reason: Arc<std::sync::Mutex<Option<StopReason>>>,
    pub progress: Arc<Progress>,
    pub gate: Arc<dyn PublishGate>,
    /// Free-form identity written into the manifest (job id, attempt).
    pub run_info: serde_json::Value,
}

impl RunControl {
    /// A control for a run nobody else stops (the CLI).
    pub fn standalone() -> Self {
        RunControl {
            cancel: CancellationToken::new(),
            stop_reason: Arc::new(std::sync::Mutex::new(None)),
            progress: Arc::new(Progress::default()),
            gate: Arc::new(AlwaysPublish),
            run_info: serde_json::Value::Null,
        }
    }

    /// Stop the run for `reason` (the first reason wins).
    pub fn stop(&self, reason: StopReason) {
        let mut r = self
            .stop_reason
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        r.get_or_insert(reason);
        self.cancel.cancel();
    }

    fn stopped_error(&self) -> EngineError {
        let reason = *self
            .stop_reason
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match reason {
            Some(StopReason::LeaseLost) => EngineError::LeaseLost,
            Some(StopReason::ShuttingDown) => EngineError::ShuttingDown,
            Some(StopReason::Cancelled) | None => EngineError::Cancelled,
        }
    }

    pub(crate) fn check(&self) -> Result<(), EngineError> {
        if self.cancel.is_cancelled() {
            Err(self.stopped_error())
        } else {
            Ok(())
        }
    }
}

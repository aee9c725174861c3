//! Runs one recipe against storage: plan → merge (streaming) → publish.
//!
//! The engine is the I/O shell around the pure kernels in [`crate::merge`]: it reads the
//! ingredients' headers, checks them against each other before anything is written, then
//! streams every output tensor through the kernel in bounded chunks and writes shards whose
//! headers were computed up front. The manifest is written last, create-if-absent, and only
//! after the caller's [`PublishGate`] confirms the job is still ours. Used by the worker (one
//! job from the queue) and by the one-shot `ladle merge` command alike.

mod adapter_analysis;
pub mod analysis;
mod buffers;
mod fold;
mod kernel;
mod lora_extract;
mod lora_merge;
mod manifest;
mod model_card;
mod output;
pub mod output_rules;
mod prepass;
pub mod publish;
pub mod side_files;
mod slices;
mod tensor_prepass;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::checkpoint::{
    Checkpoint, CheckpointError, INDEX_FILE_NAME, LocalFile, LocalReadError, OutTensor, ShardPlan,
    index_json, open_checkpoint, plan_shards,
};
use crate::error::ErrorCode;
use crate::merge::precision::Precision;
use crate::merge::{DType, MergeError, map_blocks};
use crate::recipe::{Recipe, layer_index};
use crate::storage::{Location, Storage, StorageError};

pub use kernel::Kernel;
pub use manifest::{MANIFEST_NAME, Manifest, OutputFile};

/// Tuning knobs. Memory in flight is about `inflight_bytes` plus one multipart part per
/// concurrent upload, whatever the model size.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Elements per chunk of a tensor (each chunk is fetched, merged and written as a unit).
    pub chunk_elems: usize,
    /// Upper bound on the bytes of chunks being fetched or merged at once.
    pub inflight_bytes: u64,
    /// Multipart part size for output shards.
    pub part_size: usize,
    /// Parts uploaded concurrently per shard.
    pub upload_concurrency: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            chunk_elems: 2 << 20,
            inflight_bytes: 64 << 20,
            part_size: 8 << 20,
            upload_concurrency: 4,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Adapter(#[from] crate::checkpoint::adapter::AdapterError),
    #[error("{0}")]
    InvalidRecipe(String),
    #[error("{0}")]
    ShapeMismatch(String),
    #[error("{0}")]
    UnsupportedDtype(String),
    #[error("{0}")]
    OutputConflict(String),
    #[error("{0}")]
    OutputNotEmpty(String),
    #[error("merge kernel failed on tensor {tensor}: {source}")]
    Merge { tensor: String, source: MergeError },
    #[error("object storage error while {context}: {source}")]
    ObjectStore {
        context: String,
        source: object_store::Error,
    },
    #[error("the job was cancelled")]
    Cancelled,
    #[error("the worker lost its lease on the job")]
    LeaseLost,
    #[error("the worker is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Evaluator(#[from] crate::search::evaluator::EvaluatorError),
}

impl EngineError {
    pub fn code(&self) -> ErrorCode {
        match self {
            EngineError::Storage(StorageError::Io { source, .. }) if is_full(source) => {
                ErrorCode::StorageFull
            }
            EngineError::Storage(StorageError::ObjectStore(e)) if store_full(e) => {
                ErrorCode::StorageFull
            }
            EngineError::Storage(e) => e.code(),
            EngineError::Checkpoint(e) => e.code(),
            EngineError::Adapter(e) => e.code(),
            EngineError::InvalidRecipe(_) => ErrorCode::InvalidRecipe,
            EngineError::ShapeMismatch(_) => ErrorCode::ShapeMismatch,
            EngineError::UnsupportedDtype(_) => ErrorCode::UnsupportedDtype,
            EngineError::OutputConflict(_) => ErrorCode::OutputConflict,
            EngineError::OutputNotEmpty(_) => ErrorCode::OutputNotEmpty,
            EngineError::Merge {
                source: MergeError::MaskMismatch { .. },
                ..
            } => ErrorCode::ShapeMismatch,
            EngineError::Merge { .. } => ErrorCode::CheckpointMalformed,
            EngineError::ObjectStore { source, .. } if store_full(source) => ErrorCode::StorageFull,
            EngineError::ObjectStore { source, .. }
                if crate::storage::local::outside_roots(source).is_some() =>
            {
                ErrorCode::PathOutsideRoots
            }
            EngineError::ObjectStore { .. } => ErrorCode::StorageError,
            EngineError::Cancelled => ErrorCode::Cancelled,
            EngineError::LeaseLost => ErrorCode::LeaseExpired,
            EngineError::ShuttingDown => ErrorCode::Cancelled,
            EngineError::Internal(_) => ErrorCode::Internal,
            EngineError::Evaluator(e) => e.code(),
        }
    }

    fn store(context: impl Into<String>) -> impl FnOnce(object_store::Error) -> EngineError {
        let context = context.into();
        move |source| match crate::storage::local::outside_roots(&source) {
            Some(o) => EngineError::Storage(StorageError::OutsideRoots {
                path: o.path.clone(),
            }),
            None => EngineError::ObjectStore { context, source },
        }
    }
}

/// Whether an I/O error means the disk or the quota is full (`ENOSPC`, `EDQUOT`).
fn is_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(28 | 122))
}

/// Whether an object store error means the storage is full: an `ENOSPC`/`EDQUOT` anywhere in
/// its chain (the local store), or an S3 server saying so (MinIO's `XMinioStorageFull`, HTTP
/// 507 Insufficient Storage).
fn store_full(e: &object_store::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && is_full(io)
        {
            return true;
        }
        cur = err.source();
    }
    let text = e.to_string();
    text.contains("XMinioStorageFull")
        || text.contains("Insufficient Storage")
        || text.contains("No space left on device")
        || text.contains("Disk quota exceeded")
}

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

/// What a finished run produced.
#[derive(Debug, Clone, Serialize)]
pub struct MergeOutcome {
    pub uri: String,
    pub files: Vec<OutputFile>,
    /// True when the output was already complete (a previous attempt published it).
    pub recovered: bool,
}

/// How each output tensor is produced.
#[derive(Debug, Clone)]
enum TensorOp {
    /// Merge the float inputs with the recipe's kernel.
    Merge,
    /// Copy the first model's bytes (integer and bool tensors).
    CopyFirst,
    /// Copy tensor `source` of input `input`, times `scale` (passthrough).
    Pick {
        input: usize,
        source: String,
        scale: Option<f64>,
    },
    /// Merge tensor `name` of a slice's inputs with its kernel ([`slices::Part`]).
    Part { part: usize, name: String },
}

/// Everything decided before the first output byte is written.
struct Plan {
    inputs: Vec<(Location, Checkpoint)>,
    output: Location,
    ops: BTreeMap<String, TensorOp>,
    shards: Vec<ShardPlan>,
    recipe_sha256: String,
    kernel: Arc<Kernel>,
    /// What `config.json` must say of the soup (dtype, depth of a slice stack).
    side: side_files::SideInfo,
    /// The merged slices of a slice recipe with a method other than passthrough.
    parts: Vec<slices::Part>,
}

/// A merged tensor's inputs, kernel and the name the kernel knows it by.
type MergeView<'a> = (&'a [(Location, Checkpoint)], &'a Arc<Kernel>, &'a str);

impl Plan {
    /// A merged tensor's inputs, kernel and the name the kernel knows it by (`None`: a copy).
    fn merge_view<'a>(&'a self, op: &'a TensorOp, tensor: &'a str) -> Option<MergeView<'a>> {
        match op {
            TensorOp::Merge => Some((&self.inputs, &self.kernel, tensor)),
            TensorOp::Part { part, name } => self
                .parts
                .get(*part)
                .map(|p| (p.inputs.as_slice(), &p.kernel, name.as_str())),
            TensorOp::CopyFirst | TensorOp::Pick { .. } => None,
        }
    }

    /// The input bytes the merge pass reads: every source of every op, whole.
    fn read_bytes(&self) -> u64 {
        let whole = |inputs: &[(Location, Checkpoint)], name: &str| -> u64 {
            inputs
                .iter()
                .filter_map(|(_, c)| c.tensors.get(name))
                .map(|t| t.len())
                .sum()
        };
        self.ops
            .iter()
            .map(|(tensor, op)| match op {
                TensorOp::CopyFirst => whole(self.inputs.get(..1).unwrap_or_default(), tensor),
                TensorOp::Pick { input, source, .. } => whole(
                    self.inputs.get(*input..*input + 1).unwrap_or_default(),
                    source,
                ),
                TensorOp::Merge | TensorOp::Part { .. } => self
                    .merge_view(op, tensor)
                    .map_or(0, |(inputs, _, name)| whole(inputs, name)),
            })
            .sum()
    }

    /// The non-finite values written, per output tensor (see [`Kernel::nonfinite_report`]).
    fn nonfinite_report(&self) -> serde_json::Value {
        if self.parts.is_empty() {
            self.kernel.nonfinite_report()
        } else {
            slices::nonfinite_report(&self.parts)
        }
    }
}

pub struct Engine {
    storage: Arc<Storage>,
    config: EngineConfig,
}

impl Engine {
    pub fn new(storage: Arc<Storage>, config: EngineConfig) -> Self {
        Engine { storage, config }
    }

    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// Run a recipe to completion: the output is either fully published (manifest present)
    /// or, on error, cleaned up (except after a lost lease, when another worker may own it).
    pub async fn run(
        &self,
        recipe: &Recipe,
        ctl: &Arc<RunControl>,
    ) -> Result<MergeOutcome, EngineError> {
        if recipe
            .parameters
            .get::<crate::methods::lora::LoraConfig>()
            .is_some()
        {
            // Adapter-level merges write an adapter, not a model.
            return self.run_lora(recipe, ctl).await;
        }
        if recipe
            .parameters
            .get::<crate::methods::lora_extract::LoraExtractConfig>()
            .is_some()
        {
            return self.run_lora_extract(recipe, ctl).await;
        }
        let started = Instant::now();
        ctl.progress.set_phase(Phase::Planning);
        let plan = Arc::new(self.plan(recipe, &ctl.progress).await?);
        ctl.progress
            .tensors_total
            .store(plan.ops.len() as u64, Ordering::Relaxed);
        ctl.progress
            .bytes_total
            .store(plan.read_bytes(), Ordering::Relaxed);
        ctl.progress.set_phase(Phase::Merging);
        if let Some(outcome) = self.existing_output(&plan).await? {
            return Ok(outcome);
        }
        // Every file goes to this run's own staging folder first (see `publish`).
        let writer = publish::Writer::of(&ctl.run_info);
        let staging = publish::staging(&plan.output, &writer);
        publish::remove_dead_staging(&plan.output, &writer).await;
        let result = self
            .write_all(recipe, &plan, ctl, &staging, &writer, started)
            .await;
        // Whatever happened, what is left in the staging folder is ours alone (also after a
        // lost lease: another worker writes to its own).
        publish::remove_staging(&staging).await;
        result
    }

    /// Recovery only (the reaper found the job's last attempt dead): merge nothing, only look
    /// whether a previous attempt published this recipe's soup. `Some` (`recovered: true`)
    /// when the output holds a manifest made from this recipe whose files are all there;
    /// `None` when no manifest was published; `OutputConflict` when one from another recipe or
    /// with missing files is there. The same check as `existing_output`, without planning
    /// (which would open every input, and for model-wide selection read them all).
    ///
    /// A search (greedy soup, sweep; `searched`) publishes the recipe it chose, not the stored
    /// one: its soup is recognised by the job id the manifest records (`run.job_id`) and its
    /// `search` section instead.
    pub async fn recover(
        &self,
        recipe: &Recipe,
        searched: bool,
        job_id: uuid::Uuid,
    ) -> Result<Option<MergeOutcome>, EngineError> {
        // Held by one handle, not created: a missing folder holds no soup.
        let output = match self.storage.resolve(&recipe.output.uri)?.pinned(false) {
            Err(StorageError::ObjectStore(object_store::Error::NotFound { .. })) => {
                return Ok(None);
            }
            other => other?,
        };
        // Every attempt of the job is dead now: their staging folders go.
        publish::remove_dead_staging(&output, &publish::Writer::all_attempts_of(job_id)).await;
        let Some(existing) = manifest::read(&output).await? else {
            return Ok(None);
        };
        let ours = if searched {
            existing.search.is_some()
                && existing.run.get("job_id").and_then(|v| v.as_str())
                    == Some(job_id.to_string().as_str())
        } else {
            existing.recipe_sha256 == hex::encode(recipe.hash())
        };
        if !ours {
            return Err(EngineError::OutputConflict(format!(
                "{} holds a soup made from a different recipe ({})",
                output.url, MANIFEST_NAME
            )));
        }
        manifest::verify_files(&output, &existing).await?;
        Ok(Some(MergeOutcome {
            uri: output.url.clone(),
            files: existing.files,
            recovered: true,
        }))
    }

    /// Resolve every URL under the allowed roots (all before any I/O), then open the
    /// checkpoints, a few at a time, in the given order.
    async fn open_inputs<'a>(
        &self,
        uris: impl Iterator<Item = &'a String>,
    ) -> Result<Vec<(Location, Checkpoint)>, EngineError> {
        let locations = uris
            .map(|u| self.storage.resolve(u))
            .collect::<Result<Vec<_>, _>>()?;
        futures::stream::iter(locations)
            .map(|loc| async move {
                let mut ckpt = open_checkpoint(loc.store.as_ref(), &loc.path, &loc.url).await?;
                open_local_files(&loc, &mut ckpt).await?;
                Ok::<_, EngineError>((loc, ckpt))
            })
            .buffered(8)
            .try_collect()
            .await
    }

    /// Resolve, open and cross-check every input; size the output. Writes nothing.
    async fn plan(&self, recipe: &Recipe, progress: &Progress) -> Result<Plan, EngineError> {
        let output = self.storage.resolve(&recipe.output.uri)?;
        // Inputs in kernel order: the base model first (when the method has one).
        let uris = recipe
            .base_model
            .iter()
            .chain(recipe.models.iter().map(|m| &m.uri));
        let mut inputs = self.open_inputs(uris).await?;
        // Adapters folded into models: checked against them before anything is written.
        fold::attach_all(&self.storage, recipe, &mut inputs).await?;
        let mut parts = Vec::new();
        let (ops, num_hidden_layers) = if recipe.method.about().slices {
            slices::plan(recipe, &inputs)?
        } else if !recipe.slices.is_empty() {
            let (ops, merged, layers) = slices::plan_merged(recipe, &inputs)?;
            parts = merged;
            (ops, Some(layers))
        } else {
            (check_compatible(&inputs)?, None)
        };
        let first = &inputs[0].1;
        // mergekit interpolates gradients over the layer stack: layer i of L is at i/(L−1).
        let num_layers = first
            .tensors
            .keys()
            .filter_map(|n| layer_index(n))
            .max()
            .map_or(0, |m| m + 1);
        let kernel = if let Some(p) = parts.first() {
            p.kernel.clone()
        } else {
            let mut kernel = Kernel::new(recipe, num_layers).map_err(EngineError::Internal)?;
            if let Some((specs, compute)) = kernel.model_selection() {
                // scope "model": the cut-offs over the whole model, before anything is written.
                progress.set_phase(Phase::Prepass);
                let merged: Vec<String> = ops
                    .iter()
                    .filter(|(_, op)| matches!(op, TensorOp::Merge))
                    .map(|(name, _)| name.clone())
                    .collect();
                let selections = prepass::model_bands(
                    &inputs,
                    &merged,
                    &specs,
                    compute,
                    self.config.chunk_elems,
                )
                .await?;
                kernel = kernel.with_bands(selections.iter().map(|s| s.band).collect());
            }
            Arc::new(kernel)
        };
        let mut out_tensors = Vec::with_capacity(ops.len());
        let mut merged_dtype = recipe.output.dtype;
        for (name, op) in &ops {
            let (ckpt, source) = match op {
                TensorOp::Pick { input, source, .. } => (
                    &inputs
                        .get(*input)
                        .ok_or_else(|| EngineError::Internal("input out of range".into()))?
                        .1,
                    source,
                ),
                TensorOp::Part { part, name } => (
                    &parts
                        .get(*part)
                        .and_then(|p| p.inputs.first())
                        .ok_or_else(|| EngineError::Internal("slice part out of range".into()))?
                        .1,
                    name,
                ),
                _ => (first, name),
            };
            let t = ckpt
                .tensors
                .get(source)
                .ok_or_else(|| EngineError::Internal(format!("tensor {source} vanished")))?;
            let dtype = match op {
                TensorOp::Merge | TensorOp::Part { .. } => recipe
                    .output
                    .dtype
                    .or(recipe.method.about().output_dtype)
                    .unwrap_or(ckpt.read_dtype(t)),
                TensorOp::Pick { .. } if t.dtype.is_mergeable_float() => {
                    recipe.output.dtype.unwrap_or(ckpt.read_dtype(t))
                }
                TensorOp::CopyFirst | TensorOp::Pick { .. } => t.dtype,
            };
            if merged_dtype.is_none()
                && dtype.is_mergeable_float()
                && !matches!(op, TensorOp::CopyFirst)
            {
                merged_dtype = Some(dtype);
            }
            out_tensors.push(OutTensor {
                name: name.clone(),
                dtype,
                shape: t.shape.clone(),
            });
        }
        let shards = plan_shards(
            &out_tensors,
            Some(recipe.output.max_shard_size),
            &BTreeMap::new(),
        )
        .map_err(|e| EngineError::Internal(format!("planning output shards: {e}")))?;
        let tokenizer = side_files::tokenizer_source(&self.storage, recipe).await?;
        // Side files linked out of the roots are refused now, before anything is written.
        side_files::check_sources(recipe, donor(&inputs).as_ref(), tokenizer.as_ref()).await?;
        // The output folder is opened once, now (the last step that can fail), and every write,
        // rename and removal of this run goes through that handle (`Location::pinned`): a folder
        // swapped for a link or moved while the job runs does not redirect anything. A folder
        // made here goes again if the run leaves it empty (`storage/local/made.rs`).
        let output = output.pinned(true)?;
        Ok(Plan {
            inputs,
            output,
            ops,
            shards,
            recipe_sha256: hex::encode(recipe.hash()),
            kernel,
            side: side_files::SideInfo {
                dtype: merged_dtype,
                num_hidden_layers,
                tokenizer,
            },
            parts,
        })
    }

    /// A manifest already at the output: ours (a previous attempt finished publishing) → done;
    /// anything else → conflict.
    async fn existing_output(&self, plan: &Plan) -> Result<Option<MergeOutcome>, EngineError> {
        let Some(existing) = manifest::read(&plan.output).await? else {
            return Ok(None);
        };
        if existing.recipe_sha256 != plan.recipe_sha256 {
            return Err(EngineError::OutputConflict(format!(
                "{} already holds a soup made from a different recipe ({})",
                plan.output.url, MANIFEST_NAME
            )));
        }
        manifest::verify_files(&plan.output, &existing).await?;
        Ok(Some(MergeOutcome {
            uri: plan.output.url.clone(),
            files: existing.files,
            recovered: true,
        }))
    }

    async fn write_all(
        &self,
        recipe: &Recipe,
        plan: &Arc<Plan>,
        ctl: &Arc<RunControl>,
        staging: &Location,
        writer: &publish::Writer,
        started: Instant,
    ) -> Result<MergeOutcome, EngineError> {
        let mut written: Vec<OutputFile> = Vec::new();
        // The inputs must be what was planned before and after every shard is read.
        check_inputs(&plan.inputs).await?;
        for shard in &plan.shards {
            ctl.check()?;
            let file = self
                .write_shard(plan, staging, shard, plan.kernel.clone(), ctl)
                .await?;
            written.push(file);
            crate::failpoints::pause("shard-written").await;
            check_inputs(&plan.inputs).await?;
        }
        if plan.shards.len() > 1 {
            let mut weight_map = BTreeMap::new();
            let mut total = 0u64;
            for shard in &plan.shards {
                for t in &shard.tensors {
                    weight_map.insert(t.name.clone(), shard.file_name.clone());
                    total += t.len;
                }
            }
            let bytes = Bytes::from(index_json(total, &weight_map));
            let f = output::put_small(staging, INDEX_FILE_NAME, bytes).await?;
            ctl.progress
                .bytes_written
                .fetch_add(f.size, Ordering::Relaxed);
            written.push(f);
        }
        let donor = donor(&plan.inputs);
        for f in
            side_files::write(recipe, donor.as_ref(), &plan.output, staging, &plan.side).await?
        {
            written.push(f);
        }
        ctl.check()?;
        ctl.progress.set_phase(Phase::Publishing);
        // Last chance to find out we may not publish: a fenced heartbeat in the worker.
        ctl.gate.may_publish().await?;
        let mut m = Manifest::new(recipe, plan, written, started, &ctl.run_info);
        m.search = ctl.progress.search();
        let recovered = publish::publish(&plan.output, staging, writer, &m).await?;
        Ok(MergeOutcome {
            uri: plan.output.url.clone(),
            files: m.files,
            recovered,
        })
    }

    /// Stream one shard: header, then every tensor chunk by chunk, through a multipart upload.
    async fn write_shard(
        &self,
        plan: &Arc<Plan>,
        staging: &Location,
        shard: &ShardPlan,
        kernel: Arc<Kernel>,
        ctl: &Arc<RunControl>,
    ) -> Result<OutputFile, EngineError> {
        let mut sink = output::ShardSink::create(
            staging,
            &shard.file_name,
            self.config.part_size,
            self.config.upload_concurrency,
        )
        .await?;
        let result = async {
            sink.write(Bytes::from(shard.header.clone())).await?;
            let chunks = self.chunks_of(plan, shard)?;
            let per_chunk_max = chunks.iter().map(|c| c.bytes_in_flight).max().unwrap_or(1);
            let depth = (self.config.inflight_bytes / per_chunk_max.max(1)).clamp(1, 8) as usize;
            // Output buffers of streamed chunks are reused: those in flight here, plus those
            // the upload and the hasher still hold.
            let widest = shard.tensors.iter().map(|t| t.dtype.size_bytes()).max();
            let pool = buffers::BufferPool::new(
                self.config.chunk_elems.max(1) * widest.unwrap_or(1),
                depth + 2 * self.config.upload_concurrency.max(1) + 4,
            );
            // Each chunk is its own task, so reads and merges of the next chunks proceed
            // while this loop hashes and uploads; `buffered` bounds how many are in flight.
            let mut stream = futures::stream::iter(chunks)
                .map(|chunk| {
                    tokio::spawn(
                        produce_chunk(
                            plan.clone(),
                            chunk,
                            kernel.clone(),
                            ctl.clone(),
                            pool.clone(),
                        )
                        .in_current_span(),
                    )
                })
                .buffered(depth);
            while let Some(done) = stream.next().await {
                let (chunk, bytes) =
                    done.map_err(|e| EngineError::Internal(format!("chunk task failed: {e}")))??;
                ctl.check()?;
                ctl.progress
                    .bytes_written
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                sink.write(bytes).await?;
                crate::metrics::chunk_merged();
                if chunk.last_of_tensor {
                    ctl.progress.tensors_done.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok::<_, EngineError>(())
        }
        .await;
        match result {
            Ok(()) => sink.finish().await,
            Err(e) => {
                sink.abort().await;
                Err(e)
            }
        }
    }

    /// Split a shard's tensors into chunks of at most `chunk_elems` elements.
    fn chunks_of(&self, plan: &Plan, shard: &ShardPlan) -> Result<Vec<Chunk>, EngineError> {
        let mut chunks = Vec::new();
        for t in &shard.tensors {
            let op = plan
                .ops
                .get(&t.name)
                .cloned()
                .ok_or_else(|| EngineError::Internal(format!("no op for {}", t.name)))?;
            let numel: u64 = t.shape.iter().product();
            // A streamed tensor: its chunks start on multiples of the stream's alignment and
            // share one slot for its pre-pass statistics.
            let view = plan.merge_view(&op, &t.name);
            let align = view.and_then(|(inputs, kernel, name)| {
                inputs
                    .first()
                    .and_then(|(_, c)| c.tensors.get(name))
                    .and_then(|b| kernel.stream(name, &t.shape, b.dtype))
                    .map(|s| s.align().max(1) as u64)
            });
            let whole =
                align.is_none() && view.is_some_and(|(_, kernel, name)| kernel.whole_tensor(name));
            let step = match align {
                Some(a) => (self.config.chunk_elems as u64 / a).max(1) * a,
                None if whole => numel.max(1),
                None => self.config.chunk_elems.max(1) as u64,
            };
            let stream = align.map(|_| Arc::new(tensor_prepass::StreamSlot::new(step)));
            let in_size: u64 = match op {
                TensorOp::Merge | TensorOp::Part { .. } => view.map_or(0, |(inputs, _, name)| {
                    inputs
                        .iter()
                        .filter_map(|(_, c)| c.tensors.get(name))
                        .map(|l| l.dtype.size_bytes() as u64)
                        .sum()
                }),
                TensorOp::CopyFirst => t.dtype.size_bytes() as u64,
                TensorOp::Pick {
                    input, ref source, ..
                } => plan
                    .inputs
                    .get(input)
                    .and_then(|(_, c)| c.tensors.get(source))
                    .map_or(4, |l| l.dtype.size_bytes() as u64),
            };
            // The whole-tensor path also holds an f32 copy of every input, one task vector
            // per model and an f32 result (see `kernel`).
            let out_size = t.dtype.size_bytes() as u64
                + if whole {
                    8 * (view.map_or(0, |(inputs, _, _)| inputs.len()) as u64 + 1)
                } else {
                    0
                };
            let mut begin = 0u64;
            loop {
                let end = (begin + step).min(numel);
                chunks.push(Chunk {
                    tensor: t.name.clone(),
                    op: op.clone(),
                    out_dtype: t.dtype,
                    shape: t.shape.clone(),
                    elems: begin..end,
                    last_of_tensor: end == numel,
                    bytes_in_flight: (end - begin) * (in_size + out_size),
                    stream: stream.clone(),
                });
                if end == numel {
                    break;
                }
                begin = end;
            }
        }
        Ok(chunks)
    }
}

/// The folder side files are copied from: the base model's, else the first model's
/// (inputs[0]), as mergekit's; `None` when that input is a single `.safetensors` file.
fn donor(inputs: &[(Location, Checkpoint)]) -> Option<Location> {
    let (loc, ckpt) = inputs.first()?;
    ckpt.folder
        .as_ref()
        .map(|folder| loc.with_path(folder.clone()))
}

/// One unit of streaming work: a range of elements of one output tensor.
struct Chunk {
    tensor: String,
    op: TensorOp,
    out_dtype: DType,
    shape: Vec<u64>,
    elems: std::ops::Range<u64>,
    last_of_tensor: bool,
    bytes_in_flight: u64,
    /// A streamed tensor's pre-pass statistics, shared by its chunks.
    stream: Option<Arc<tensor_prepass::StreamSlot>>,
}

/// Fetch a chunk's input ranges concurrently, then merge them off the async runtime.
async fn produce_chunk(
    plan: Arc<Plan>,
    chunk: Chunk,
    kernel: Arc<Kernel>,
    ctl: Arc<RunControl>,
    pool: Arc<buffers::BufferPool>,
) -> Result<(Chunk, Bytes), EngineError> {
    ctl.check()?;
    // Test-only throttle / CPU burn (a no-op unless built with the `failpoints` feature).
    crate::failpoints::chunk().await;
    if chunk.elems.is_empty() {
        // An empty tensor: nothing to read (an empty ranged GET is invalid on S3).
        return Ok((chunk, Bytes::new()));
    }
    // A merged slice's tensor: its own inputs and kernel, under the name its kernel knows.
    let (merge_inputs, kernel, merge_name): (&[(Location, Checkpoint)], Arc<Kernel>, String) =
        match &chunk.op {
            TensorOp::Part { part, name } => {
                let p = plan
                    .parts
                    .get(*part)
                    .ok_or_else(|| EngineError::Internal("slice part out of range".into()))?;
                (&p.inputs, p.kernel.clone(), name.clone())
            }
            _ => (&plan.inputs, kernel, chunk.tensor.clone()),
        };
    // A streamed tensor's statistics first (its pre-passes, run by the first chunk to get
    // here), so that waiting chunks hold no input bytes.
    let stream = match &chunk.stream {
        Some(slot) => Some(
            slot.get(merge_inputs, &kernel, &merge_name, &chunk.shape, &ctl)
                .await?,
        ),
        None => None,
    };
    let (sources, source_name): (&[(Location, Checkpoint)], &String) = match &chunk.op {
        TensorOp::Merge | TensorOp::Part { .. } => (merge_inputs, &merge_name),
        TensorOp::CopyFirst => (&plan.inputs[..1], &chunk.tensor),
        TensorOp::Pick { input, source, .. } => (
            plan.inputs
                .get(*input..*input + 1)
                .ok_or_else(|| EngineError::Internal("input out of range".into()))?,
            source,
        ),
    };
    let progress = &ctl.progress;
    let elems = &chunk.elems;
    let reads = sources.iter().map(|(loc, ckpt)| async move {
        let (dtype, bytes) = read_elems(loc, ckpt, source_name, elems.clone()).await?;
        progress
            .bytes_read
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok::<_, EngineError>((dtype, bytes))
    });
    let raw: Vec<(DType, Bytes)> = futures::future::try_join_all(reads).await?;
    if let TensorOp::CopyFirst = chunk.op {
        let bytes = raw.into_iter().next().map(|(_, b)| b).unwrap_or_default();
        return Ok((chunk, bytes));
    }
    if let TensorOp::Pick { scale, .. } = &chunk.op {
        let scale = *scale;
        let Some((in_dtype, bytes)) = raw.into_iter().next() else {
            return Err(EngineError::Internal("no input read".into()));
        };
        // mergekit's `dtype`: the tensor is cast on load, then scaled in that dtype.
        let (in_dtype, bytes) = match kernel
            .cast_dtype()
            .filter(|to| in_dtype.is_mergeable_float() && *to != in_dtype)
        {
            Some(to) => {
                let cast = crate::merge::dtype::cast(in_dtype, &bytes, to).map_err(|e| {
                    EngineError::Merge {
                        tensor: chunk.tensor.clone(),
                        source: e.into(),
                    }
                })?;
                (to, Bytes::from(cast))
            }
            None => (in_dtype, bytes),
        };
        let out_dtype = chunk.out_dtype;
        if !in_dtype.is_mergeable_float() || (scale.is_none() && in_dtype == out_dtype) {
            return Ok((chunk, bytes));
        }
        let name = chunk.tensor.clone();
        let n = (chunk.elems.end - chunk.elems.start) as usize;
        let converted = crate::telemetry::spawn_blocking(move || {
            let mut buf = pool.take(n * out_dtype.size_bytes());
            let out = buf.as_mut_slice();
            // `tensor * scale` in the source dtype (a Python float acts at f32 precision).
            let p = Precision::of(in_dtype);
            map_blocks(
                &[(in_dtype, bytes.as_ref())],
                out_dtype,
                out,
                |b, o| match scale {
                    Some(s) => {
                        let s = s as f32;
                        for (o, x) in o.iter_mut().zip(b[0]) {
                            *o = p.round(x * s);
                        }
                    }
                    None => o.copy_from_slice(b[0]),
                },
            )?;
            Ok::<_, MergeError>(buf.into_bytes())
        })
        .await
        .map_err(|e| EngineError::Internal(format!("merge task panicked: {e}")))?
        .map_err(|source| EngineError::Merge {
            tensor: name,
            source,
        })?;
        return Ok((chunk, converted));
    }
    let out_dtype = chunk.out_dtype;
    let n = (chunk.elems.end - chunk.elems.start) as usize;
    let name = chunk.tensor.clone();
    let shape = chunk.shape.clone();
    let first = chunk.elems.start;
    let task_name = merge_name.clone();
    let merged = crate::telemetry::spawn_blocking(move || {
        let inputs: Vec<(DType, &[u8])> = raw.iter().map(|(d, b)| (*d, b.as_ref())).collect();
        let mut out = pool.take(n * out_dtype.size_bytes());
        match &stream {
            Some(s) => kernel.run_stream(
                &task_name,
                s.as_ref(),
                first,
                &inputs,
                out_dtype,
                out.as_mut_slice(),
            )?,
            None => kernel.run(&task_name, &shape, &inputs, out_dtype, out.as_mut_slice())?,
        }
        // The inputs (mapped file ranges) are released before the output travels on.
        drop(inputs);
        drop(raw);
        Ok::<_, MergeError>(out.into_bytes())
    })
    .await
    .map_err(|e| EngineError::Internal(format!("merge task panicked: {e}")))?
    .map_err(|source| EngineError::Merge {
        tensor: name,
        source,
    })?;
    Ok((chunk, merged))
}

/// Read elements `elems` of tensor `name` of one input: through the file held open for the job
/// when the input is local (mapped, no copy), else with a ranged GET. A short file or object is
/// a malformed checkpoint.
pub(super) async fn read_elems(
    loc: &Location,
    ckpt: &Checkpoint,
    name: &str,
    elems: std::ops::Range<u64>,
) -> Result<(DType, Bytes), EngineError> {
    match &ckpt.lora {
        // A model with an adapter folded in reads as the fold.
        Some(att) => fold::read(loc, ckpt, att, name, elems).await,
        None => read_stored(loc.store.as_ref(), &loc.url, ckpt, name, elems).await,
    }
}

/// [`read_elems`] of the stored bytes (`url` names the checkpoint in messages).
pub(super) async fn read_stored(
    store: &dyn object_store::ObjectStore,
    url: &str,
    ckpt: &Checkpoint,
    name: &str,
    elems: std::ops::Range<u64>,
) -> Result<(DType, Bytes), EngineError> {
    let t = ckpt
        .tensors
        .get(name)
        .ok_or_else(|| EngineError::Internal(format!("tensor {name} missing from {url}")))?;
    let size = t.dtype.size_bytes() as u64;
    let range = t.start + elems.start * size..t.start + elems.end * size;
    let file = &ckpt.files[t.file];
    if let Some(local) = &file.local {
        let local = local.clone();
        let read = range.clone();
        let bytes = tokio::task::spawn_blocking(move || local.read(read))
            .await
            .map_err(|e| EngineError::Internal(format!("read task failed: {e}")))?
            .map_err(|e| local_read_error(e, &file.path, name))?;
        crate::metrics::bytes_read(bytes.len() as u64);
        return Ok((t.dtype, bytes));
    }
    // `If-Match` on the ETag recorded at plan time: a replaced object is never read.
    let opts = object_store::GetOptions {
        range: Some(object_store::GetRange::Bounded(range.clone())),
        if_match: file.etag.clone(),
        ..Default::default()
    };
    let fetched = async { store.get_opts(&file.path, opts).await?.bytes().await }.await;
    let bytes = match fetched {
        Ok(b) => b,
        Err(object_store::Error::Precondition { .. }) => {
            return Err(EngineError::from(CheckpointError::Changed {
                file: crate::checkpoint::identity::file_name(url, &file.path),
                what: "its ETag is no longer the one the merge was planned with".into(),
            }));
        }
        Err(e) => return Err(read_error(e, &file.path, name, &range)),
    };
    if bytes.len() as u64 != range.end - range.start {
        return Err(EngineError::from(CheckpointError::Malformed {
            file: file.path.to_string(),
            reason: format!(
                "tensor {name}: expected {} bytes, the object returned {} (truncated?)",
                range.end - range.start,
                bytes.len()
            ),
        }));
    }
    crate::metrics::bytes_read(bytes.len() as u64);
    Ok((t.dtype, bytes))
}

/// Every input file is still what the plan recorded (see [`crate::checkpoint::identity`]).
async fn check_inputs(inputs: &[(Location, Checkpoint)]) -> Result<(), EngineError> {
    for (loc, ckpt) in inputs {
        for file in &ckpt.files {
            crate::checkpoint::identity::check_unchanged(loc.store.as_ref(), &loc.url, file)
                .await?;
        }
    }
    Ok(())
}

/// A local read that found the file shorter than planned is a malformed checkpoint; an I/O
/// error is a storage failure.
fn local_read_error(
    e: LocalReadError,
    file: &object_store::path::Path,
    tensor: &str,
) -> EngineError {
    match e {
        LocalReadError::Truncated { .. } => EngineError::from(CheckpointError::Malformed {
            file: file.to_string(),
            reason: format!("reading tensor {tensor}: {e}"),
        }),
        LocalReadError::Io { path, source } => {
            EngineError::Storage(StorageError::Io { path, source })
        }
    }
}

/// For a local checkpoint (a `file://` URL), open each of its files once, for the whole job
/// (tensor bytes are then read through these descriptors, see [`LocalFile`]). A file whose size
/// differs from the one its header was read at changed in between: malformed.
async fn open_local_files(loc: &Location, ckpt: &mut Checkpoint) -> Result<(), EngineError> {
    let Some(local) = loc.local.clone() else {
        return Ok(());
    };
    let wanted: Vec<(usize, object_store::path::Path, u64)> = ckpt
        .files
        .iter()
        .enumerate()
        .map(|(i, f)| (i, f.path.clone(), f.size))
        .collect();
    let opened = tokio::task::spawn_blocking(move || {
        wanted
            .into_iter()
            .map(|(i, path, size)| {
                let file = open_local_file(&local, &path)?;
                if file.size() != size {
                    return Err(EngineError::from(CheckpointError::Malformed {
                        file: path.to_string(),
                        reason: format!(
                            "the file changed while it was opened: {size} bytes, then {}",
                            file.size()
                        ),
                    }));
                }
                Ok((i, Arc::new(file)))
            })
            .collect::<Result<Vec<_>, EngineError>>()
    })
    .await
    .map_err(|e| EngineError::Internal(format!("open task failed: {e}")))??;
    for (i, file) in opened {
        ckpt.files[i].local = Some(file);
    }
    Ok(())
}

/// Opens one local input file for the job, through the confined store's root handle (a link
/// leaving the root is `path_outside_roots`). Blocking.
fn open_local_file(
    local: &crate::storage::local::LocalStore,
    path: &object_store::path::Path,
) -> Result<LocalFile, EngineError> {
    let context = format!("opening file:///{path}");
    let file = local.open_file(path).map_err(EngineError::store(context))?;
    LocalFile::from_file(file, std::path::PathBuf::from(format!("/{path}"))).map_err(|source| {
        EngineError::Storage(StorageError::Io {
            path: format!("/{path}"),
            source,
        })
    })
}

/// A failed ranged GET: a vanished or short object is a malformed checkpoint (not worth a
/// retry); anything else is a storage failure (retryable).
fn read_error(
    e: object_store::Error,
    file: &object_store::path::Path,
    tensor: &str,
    range: &std::ops::Range<u64>,
) -> EngineError {
    let text = e.to_string();
    let lies = matches!(e, object_store::Error::NotFound { .. })
        || text.to_ascii_lowercase().contains("range");
    if lies {
        EngineError::from(CheckpointError::Malformed {
            file: file.to_string(),
            reason: format!(
                "reading tensor {tensor} bytes {}..{}: {text} (truncated or replaced?)",
                range.start, range.end
            ),
        })
    } else {
        EngineError::ObjectStore {
            context: format!("reading tensor {tensor} from {file}"),
            source: e,
        }
    }
}

/// Same names and shapes in every input; decides how each tensor is produced.
fn check_compatible(
    inputs: &[(Location, Checkpoint)],
) -> Result<BTreeMap<String, TensorOp>, EngineError> {
    let (first_loc, first) = inputs
        .first()
        .ok_or_else(|| EngineError::Internal("no inputs".into()))?;
    let mut ops = BTreeMap::new();
    for (i, (loc, ckpt)) in inputs.iter().enumerate().skip(1) {
        let missing: Vec<&String> = first
            .tensors
            .keys()
            .filter(|k| !ckpt.tensors.contains_key(*k))
            .collect();
        let extra: Vec<&String> = ckpt
            .tensors
            .keys()
            .filter(|k| !first.tensors.contains_key(*k))
            .collect();
        if !missing.is_empty() || !extra.is_empty() {
            return Err(EngineError::ShapeMismatch(format!(
                "models[{i}] ({}) and models[0] ({}) hold different tensors: missing {}; extra {}",
                loc.url,
                first_loc.url,
                list_names(&missing),
                list_names(&extra)
            )));
        }
    }
    for (name, t0) in &first.tensors {
        let mut all_float = t0.dtype.is_mergeable_float();
        for (i, (loc, ckpt)) in inputs.iter().enumerate().skip(1) {
            let t = &ckpt.tensors[name];
            if t.shape != t0.shape {
                return Err(EngineError::ShapeMismatch(format!(
                    "tensor {name}: shape {:?} in models[{i}] ({}) but {:?} in models[0] ({})",
                    t.shape, loc.url, t0.shape, first_loc.url
                )));
            }
            if t.dtype.is_mergeable_float() != t0.dtype.is_mergeable_float()
                || (!t0.dtype.is_mergeable_float() && t.dtype != t0.dtype)
            {
                return Err(EngineError::UnsupportedDtype(format!(
                    "tensor {name}: dtype {} in models[{i}] ({}) cannot be combined with {} in models[0] ({})",
                    t.dtype.as_str(),
                    loc.url,
                    t0.dtype.as_str(),
                    first_loc.url
                )));
            }
            all_float &= t.dtype.is_mergeable_float();
        }
        ops.insert(
            name.clone(),
            if all_float {
                TensorOp::Merge
            } else {
                TensorOp::CopyFirst
            },
        );
    }
    Ok(ops)
}

fn list_names(names: &[&String]) -> String {
    if names.is_empty() {
        return "none".into();
    }
    let shown: Vec<&str> = names.iter().take(5).map(|s| s.as_str()).collect();
    if names.len() > 5 {
        format!("{} (and {} more)", shown.join(", "), names.len() - 5)
    } else {
        shown.join(", ")
    }
}

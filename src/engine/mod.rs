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
mod control;
mod error;
mod fold;
mod kernel;
mod lora_extract;
mod lora_merge;
mod manifest;
mod model_card;
mod output;
pub mod output_rules;
mod permute;
mod permuted_read;
mod plan;
mod prepass;
pub mod publish;
mod read;
mod run;
pub mod side_files;
mod slices;
mod tensor_prepass;
mod vocab;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde::Serialize;

use crate::recipe::Recipe;
use crate::storage::{Storage, StorageError};

pub use control::{
    AlwaysPublish, Phase, Progress, ProgressSnapshot, PublishGate, RunControl, StopReason,
};
pub use error::EngineError;
pub use kernel::Kernel;
pub use manifest::{MANIFEST_NAME, Manifest, OutputFile};
use plan::{Plan, TensorOp, check_compatible, open_local_files};
use read::{read_elems, read_stored};

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

/// What a finished run produced.
#[derive(Debug, Clone, Serialize)]
pub struct MergeOutcome {
    pub uri: String,
    pub files: Vec<OutputFile>,
    /// True when the output was already complete (a previous attempt published it).
    pub recovered: bool,
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
}

//! Planning a run: every input resolved, opened and checked against the others, each output
//! tensor's operation decided and the output shards sized, before anything is written
//! (moved out of `engine/mod.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use super::{
    Engine, EngineError, Kernel, MANIFEST_NAME, MergeOutcome, Phase, Progress, fold, manifest,
    permute, prepass, side_files, slices,
};
use crate::checkpoint::{
    Checkpoint, CheckpointError, LocalFile, OutTensor, ShardPlan, open_model, plan_shards,
};
use crate::recipe::{Recipe, layer_index};
use crate::storage::{Location, StorageError};

/// How each output tensor is produced.
#[derive(Debug, Clone)]
pub(super) enum TensorOp {
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
pub(super) struct Plan {
    pub(super) inputs: Vec<(Location, Checkpoint)>,
    pub(super) output: Location,
    pub(super) ops: BTreeMap<String, TensorOp>,
    pub(super) shards: Vec<ShardPlan>,
    pub(super) recipe_sha256: String,
    pub(super) kernel: Arc<Kernel>,
    /// What `config.json` must say of the soup (dtype, depth of a slice stack).
    pub(super) side: side_files::SideInfo,
    /// The merged slices of a slice recipe with a method other than passthrough.
    pub(super) parts: Vec<slices::Part>,
}

/// A merged tensor's inputs, kernel and the name the kernel knows it by.
pub(super) type MergeView<'a> = (&'a [(Location, Checkpoint)], &'a Arc<Kernel>, &'a str);

impl Plan {
    /// A merged tensor's inputs, kernel and the name the kernel knows it by (`None`: a copy).
    pub(super) fn merge_view<'a>(
        &'a self,
        op: &'a TensorOp,
        tensor: &'a str,
    ) -> Option<MergeView<'a>> {
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
    pub(super) fn read_bytes(&self) -> u64 {
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
    pub(super) fn nonfinite_report(&self) -> serde_json::Value {
        if self.parts.is_empty() {
            self.kernel.nonfinite_report()
        } else {
            slices::nonfinite_report(&self.parts)
        }
    }
}

impl Engine {
    /// Resolve every URL under the allowed roots (all before any I/O), then open the
    /// checkpoints, a few at a time, in the given order.
    pub(super) async fn open_inputs<'a>(
        &self,
        uris: impl Iterator<Item = &'a String>,
    ) -> Result<Vec<(Location, Checkpoint)>, EngineError> {
        let locations = uris
            .map(|u| self.storage.resolve(u))
            .collect::<Result<Vec<_>, _>>()?;
        futures::stream::iter(locations)
            .map(|loc| async move {
                let mut ckpt = open_model(loc.store.as_ref(), &loc.path, &loc.url).await?;
                open_local_files(&loc, &mut ckpt).await?;
                Ok::<_, EngineError>((loc, ckpt))
            })
            .buffered(8)
            .try_collect()
            .await
    }

    /// Resolve, open and cross-check every input; size the output. Writes nothing.
    pub(super) async fn plan(
        &self,
        recipe: &Recipe,
        progress: &Progress,
    ) -> Result<Plan, EngineError> {
        let output = self.storage.resolve(&recipe.output.uri)?;
        // Inputs in kernel order: the base model first (when the method has one).
        let uris = recipe
            .base_model
            .iter()
            .chain(recipe.models.iter().map(|m| &m.uri));
        let mut inputs = self.open_inputs(uris).await?;
        // Adapters folded into models: checked against them before anything is written.
        fold::attach_all(&self.storage, recipe, &mut inputs).await?;
        // A source-only tokenizer build's source holds a tokenizer (its files are copied when
        // the build changes nothing).
        let tokenizer =
            side_files::tokenizer_source(&self.storage, recipe, donor(&inputs).as_ref()).await?;
        // A tokenizer built for the soup: the embedding rows permuted onto it (read through the
        // checkpoints from now on), before the tensors are checked against each other.
        let built =
            permute::attach(&self.storage, recipe, &mut inputs, self.config.chunk_elems).await?;
        let tokenizer = if built.is_some() { None } else { tokenizer };
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
        // `chat_template: auto`: the most common template among the inputs.
        let chat_template = side_files::chat_template(recipe, &inputs).await?;
        let side = side_files::SideInfo {
            dtype: merged_dtype,
            num_hidden_layers,
            tokenizer,
            chat_template,
            built,
        };
        // Side files linked out of the roots are refused now, before anything is written.
        side_files::check_sources(recipe, &side, donor(&inputs).as_ref()).await?;
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
            side,
            parts,
        })
    }

    /// A manifest already at the output: ours (a previous attempt finished publishing) → done;
    /// anything else → conflict.
    pub(super) async fn existing_output(
        &self,
        plan: &Plan,
    ) -> Result<Option<MergeOutcome>, EngineError> {
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
}

/// The folder side files are copied from: the base model's, else the first model's
/// (inputs[0]), as mergekit's; `None` when that input is a single `.safetensors` file.
pub(super) fn donor(inputs: &[(Location, Checkpoint)]) -> Option<Location> {
    let (loc, ckpt) = inputs.first()?;
    ckpt.folder
        .as_ref()
        .map(|folder| loc.with_path(folder.clone()))
}

/// For a local checkpoint (a `file://` URL), open each of its files once, for the whole job
/// (tensor bytes are then read through these descriptors, see [`LocalFile`]). A file whose size
/// differs from the one its header was read at changed in between: malformed.
pub(super) async fn open_local_files(
    loc: &Location,
    ckpt: &mut Checkpoint,
) -> Result<(), EngineError> {
    let Some(local) = loc.local.clone() else {
        return Ok(());
    };
    let wanted: Vec<(usize, object_store::path::Path, String, u64)> = ckpt
        .files
        .iter()
        .enumerate()
        .map(|(i, f)| (i, f.path.clone(), f.name.clone(), f.size))
        .collect();
    let opened = tokio::task::spawn_blocking(move || {
        wanted
            .into_iter()
            .map(|(i, path, name, size)| {
                let file = open_local_file(&local, &path, &name)?;
                if file.size() != size {
                    return Err(EngineError::from(CheckpointError::Malformed {
                        file: name,
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
/// leaving the root is `path_outside_roots`); `name`: the file as the job names it, in
/// messages. Blocking.
fn open_local_file(
    local: &crate::storage::local::LocalStore,
    path: &object_store::path::Path,
    name: &str,
) -> Result<LocalFile, EngineError> {
    let context = format!("opening {name}");
    let file = local.open_file(path).map_err(EngineError::store(context))?;
    LocalFile::from_file(file, std::path::PathBuf::from(name)).map_err(|source| {
        EngineError::Storage(StorageError::Io {
            path: name.to_string(),
            source,
        })
    })
}

/// Same names and shapes in every input; decides how each tensor is produced.
pub(super) fn check_compatible(
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

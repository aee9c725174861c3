//! `method: lora`: adapter-level merges (peft's `add_weighted_adapter`), written as a PEFT
//! adapter folder (`adapter_config.json`, `adapter_model.safetensors`, then the manifest).
//!
//! Adapters are small (a few factors per module), so each module is combined whole; the base
//! is only read for its shapes and for the copies peft writes (`modules_to_save` tensors and an
//! embedding's `base_layer` weight, both the base's). Everything is checked (adapters against
//! the base, ranks against the combination) before anything is written.
//!
//! One deviation from peft, on purpose: the new config always has `use_rslora: false`. peft
//! copies the first adapter's `use_rslora`, so with an rsLoRA first adapter its merged
//! adapter loads √r_new times too large (the factors already hold every source's scaling);
//! ladle writes the same factors with the config that scales them by 1.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;

use super::manifest::{self, InputRecord, MANIFEST_NAME, Manifest, OutputFile};
use super::{
    Engine, EngineError, MergeOutcome, Phase, RunControl, fold, output, publish, read_elems,
    read_stored,
};
use crate::checkpoint::Checkpoint;
use crate::checkpoint::adapter::{
    ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, Attached, ModuleKind, TargetModules, Touch,
};
use crate::merge::lora_combine::{Combination, Source, cat, combine, factor_weights};
use crate::merge::lora_svd::combine_svd;
use crate::merge::precision::Precision;
use crate::merge::rng::KeyedRng;
use crate::merge::{DType, MergeError, decode_to_f32, encode_from_f32};
use crate::methods::lora::LoraConfig;
use crate::recipe::{Recipe, Setting};
use crate::storage::Location;

pub(super) const PREFIX: &str = "base_model.model.";

/// One output tensor: name, dtype, shape, little-endian bytes.
pub(super) type OutTensor = (String, DType, Vec<u64>, Vec<u8>);

fn invalid(msg: String) -> EngineError {
    EngineError::InvalidRecipe(msg)
}

/// Tensor `name` of an input (a checkpoint, read as its fold when it has an adapter), whole.
pub(super) async fn read_whole(
    loc: &Location,
    ckpt: &Checkpoint,
    name: &str,
) -> Result<(DType, Bytes), EngineError> {
    let t = ckpt
        .tensors
        .get(name)
        .ok_or_else(|| EngineError::Internal(format!("tensor {name} vanished")))?;
    let n: u64 = t.shape.iter().product();
    read_elems(loc, ckpt, name, 0..n).await
}

/// `b` (tensor `name`, stored as `d`) decoded to f32.
pub(super) fn decode(name: &str, d: DType, b: &[u8]) -> Result<Vec<f32>, EngineError> {
    let mut f = vec![0f32; b.len() / d.size_bytes().max(1)];
    decode_to_f32(d, b, &mut f).map_err(|e| EngineError::Merge {
        tensor: name.to_string(),
        source: MergeError::from(e),
    })?;
    Ok(f)
}

/// Adapter tensor `name`, whole, decoded to f32.
pub(super) async fn whole(att: &Attached, name: &str) -> Result<Vec<f32>, EngineError> {
    let t = att
        .file
        .tensors
        .get(name)
        .ok_or_else(|| EngineError::Internal(format!("adapter tensor {name} vanished")))?;
    let n: u64 = t.shape.iter().product();
    let (d, b) = read_stored(att.store.as_ref(), &att.file.url, &att.file, name, 0..n).await?;
    decode(name, d, &b)
}

pub(super) fn encode(name: &str, dtype: DType, values: &[f32]) -> Result<Vec<u8>, EngineError> {
    let mut out = vec![0u8; values.len() * dtype.size_bytes()];
    encode_from_f32(dtype, values, &mut out).map_err(|e| EngineError::Merge {
        tensor: name.to_string(),
        source: MergeError::from(e),
    })?;
    Ok(out)
}

/// A base tensor copied into the adapter file (as peft copies the base's module), in `dtype`.
async fn base_copy(
    base: &(crate::storage::Location, Checkpoint),
    tensor: &str,
    dtype: Option<DType>,
) -> Result<OutTensor, EngineError> {
    let (loc, ckpt) = base;
    let t = ckpt
        .tensors
        .get(tensor)
        .ok_or_else(|| EngineError::Internal(format!("base tensor {tensor} vanished")))?;
    let (d, b) = read_whole(loc, ckpt, tensor).await?;
    let to = dtype.filter(|_| d.is_mergeable_float()).unwrap_or(d);
    let bytes = if to == d {
        b.to_vec()
    } else {
        encode(tensor, to, &decode(tensor, d, &b)?)?
    };
    Ok((format!("{PREFIX}{tensor}"), to, t.shape.clone(), bytes))
}

/// `safetensors` bytes of `tensors` (sorted by name), with `{"format": "pt"}` metadata.
pub(super) fn safetensors_bytes(mut tensors: Vec<OutTensor>) -> Vec<u8> {
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, dtype, shape, bytes) in &tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype.as_str(), "shape": shape,
                               "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap_or_default();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (_, _, _, bytes) in &tensors {
        out.extend_from_slice(bytes);
    }
    out
}

/// The new config: the first adapter's, with `r = lora_alpha = r_new`, no patterns, the union
/// of the target modules, `use_rslora: false` (see the module's text).
fn new_config(adapters: &[Attached], r_new: u64) -> Result<serde_json::Value, EngineError> {
    let first = adapters
        .first()
        .ok_or_else(|| EngineError::Internal("no adapters".into()))?;
    let mut raw = first.adapter.config.raw.clone();
    let mut names = BTreeSet::new();
    let mut regexes = Vec::new();
    for a in adapters {
        match &a.adapter.config.target_modules {
            Some(TargetModules::List(l)) => names.extend(l.iter().cloned()),
            Some(TargetModules::Regex(r)) => regexes.push(format!("({r})")),
            None => {}
        }
    }
    let targets = match (names.is_empty(), regexes.is_empty()) {
        (_, true) => serde_json::json!(names),
        (true, false) => serde_json::json!(regexes.join("|")),
        (false, false) => {
            return Err(invalid(
                "models: the adapters give target_modules both as lists and as regular \
                 expressions; peft cannot combine them either"
                    .into(),
            ));
        }
    };
    raw.insert("r".into(), serde_json::json!(r_new));
    raw.insert("lora_alpha".into(), serde_json::json!(r_new));
    raw.insert("rank_pattern".into(), serde_json::json!({}));
    raw.insert("alpha_pattern".into(), serde_json::json!({}));
    raw.insert("target_modules".into(), targets);
    raw.insert("use_rslora".into(), serde_json::json!(false));
    raw.insert("peft_type".into(), serde_json::json!("LORA"));
    Ok(serde_json::Value::Object(raw))
}

/// The weight of model `i` for `module` (`None`: left out).
fn weight_of(recipe: &Recipe, i: usize, module: &str) -> Option<f64> {
    let m = recipe.models.get(i)?;
    match m.parameters.get("weight") {
        Some(s @ Setting::Filters(_)) => s.eval(module, 0.0),
        _ => Some(m.weight),
    }
}

impl Engine {
    /// Run a `lora` recipe (see the module's text).
    pub(super) async fn run_lora(
        &self,
        recipe: &Recipe,
        ctl: &Arc<RunControl>,
    ) -> Result<MergeOutcome, EngineError> {
        let mut job = self.adapter_job::<LoraConfig>(recipe, ctl, "lora", "the adapters' base")?;
        let config = job.config.clone();
        let mut opened = self.open_inputs(std::iter::once(job.base_uri)).await?;
        let base = opened
            .pop()
            .ok_or_else(|| EngineError::Internal("base not opened".into()))?;
        if let Some(i) = recipe.models.iter().position(|m| m.lora.is_some()) {
            return Err(invalid(format!(
                "models[{i}].lora: method lora combines adapters (give each adapter as a \
                 model's uri), it folds none"
            )));
        }
        let mut adapters = Vec::with_capacity(recipe.models.len());
        for m in &recipe.models {
            adapters.push(fold::open_adapter(&self.storage, &m.uri, &base.1, None).await?);
        }
        if let Some(done) = job.published().await? {
            return Ok(done);
        }
        // peft: one adapter is always `linear`.
        let kind = if adapters.len() == 1 {
            Combination::Linear
        } else {
            config.combination.kind()
        };
        let ranks: Vec<u64> = adapters.iter().map(|a| a.adapter.max_rank()).collect();
        let r_new = if kind == Combination::Cat {
            ranks.iter().sum()
        } else if kind.is_svd() {
            // peft: `svd_rank or max(adapters_ranks)`.
            config
                .svd_rank
                .unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(0))
        } else {
            if ranks.iter().any(|r| *r != ranks[0]) {
                return Err(invalid(format!(
                    "parameters.combination: {:?} needs adapters of one rank (peft: \"All \
                     adapters must have the same r value\"); their ranks are {ranks:?} (use cat)",
                    config.combination
                )));
            }
            ranks[0]
        };
        // modules_to_save: no two adapters may save one module (peft refuses it too).
        let mut saved: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, a) in adapters.iter().enumerate() {
            for (tensor, t) in &a.adapter.touched {
                if let Touch::Replace(_) = t
                    && let Some(j) = saved.insert(tensor, i)
                {
                    return Err(invalid(format!(
                        "models[{j}] and models[{i}] both save {tensor} (modules_to_save); peft \
                         cannot merge them either"
                    )));
                }
            }
        }
        // Every module of any adapter, by base tensor name.
        let modules: BTreeSet<&String> = adapters
            .iter()
            .flat_map(|a| a.adapter.modules().map(|(k, _)| k))
            .collect();
        ctl.progress
            .tensors_total
            .store(modules.len() as u64, Ordering::Relaxed);
        ctl.progress.set_phase(Phase::Merging);
        let mut tensors: Vec<OutTensor> = Vec::new();
        for tensor in modules {
            ctl.check()?;
            let mut parts = Vec::new();
            for (i, a) in adapters.iter().enumerate() {
                let Some(Touch::Lora(m)) = a.adapter.touched.get(tensor) else {
                    continue;
                };
                let Some(weight) = weight_of(recipe, i, &m.module) else {
                    continue;
                };
                if kind != Combination::Cat && !kind.is_svd() && m.rank != r_new {
                    return Err(invalid(format!(
                        "models[{i}]: module {} has rank {} (rank_pattern), not {r_new}; \
                         {:?} needs one rank everywhere (use cat)",
                        m.module, m.rank, config.combination
                    )));
                }
                let af = whole(a, &m.a).await?;
                let bf = whole(a, &m.b).await?;
                parts.push((i, m.clone(), af, bf, weight));
            }
            let Some((_, first, _, _, _)) = parts.first() else {
                continue;
            };
            let first = first.clone();
            let base_t =
                base.1.tensors.get(tensor).ok_or_else(|| {
                    EngineError::Internal(format!("base tensor {tensor} vanished"))
                })?;
            // (out, in) of a Linear; (num_embeddings, dim) of an Embedding.
            let (n_a, n_b) = match first.kind {
                ModuleKind::Linear => (base_t.shape[1] as usize, base_t.shape[0] as usize),
                ModuleKind::Embedding => (base_t.shape[0] as usize, base_t.shape[1] as usize),
            };
            let sources: Vec<Source<'_>> = parts
                .iter()
                .map(|(_, m, a, b, w)| Source {
                    a,
                    b,
                    rank: m.rank as usize,
                    scaling: m.scaling,
                    weight: *w,
                })
                .collect();
            let r = r_new as usize;
            let (out_dtype, (a_new, b_new)) = if kind == Combination::Cat {
                let d = recipe.output.dtype.unwrap_or(base_t.dtype);
                let p = Precision::of(d);
                (d, cat(&sources, n_a, n_b, r, |x| p.round(x)))
            } else if kind.is_svd() {
                let rngs: Vec<KeyedRng> = parts
                    .iter()
                    .map(|(i, ..)| KeyedRng::new(config.seed, *i, &format!("{tensor}.delta")))
                    .collect();
                let (density, sign) = (config.density.unwrap_or(1.0), config.sign_method());
                let factors = combine_svd(
                    kind,
                    &sources,
                    n_a,
                    n_b,
                    r,
                    density,
                    sign,
                    &rngs,
                    config.svd_clamp,
                )
                .map_err(|e| invalid(format!("models: module {}: {e}", first.module)))?;
                (recipe.output.dtype.unwrap_or(DType::F32), factors)
            } else {
                let (wa, wb) = factor_weights(&sources);
                let (name_a, name_b) = (format!("{tensor}.lora_A"), format!("{tensor}.lora_B"));
                let rng = |name: &str| -> Vec<KeyedRng> {
                    parts
                        .iter()
                        .map(|(i, ..)| KeyedRng::new(config.seed, *i, name))
                        .collect()
                };
                let (density, sign) = (config.density.unwrap_or(1.0), config.sign_method());
                let a_list = parts.iter().map(|p| p.2.clone()).collect();
                let b_list = parts.iter().map(|p| p.3.clone()).collect();
                let a_new = combine(kind, a_list, &wa, density, sign, &rng(&name_a));
                let b_new = combine(kind, b_list, &wb, density, sign, &rng(&name_b));
                (recipe.output.dtype.unwrap_or(DType::F32), (a_new, b_new))
            };
            let module = &first.module;
            let (a_name, b_name) = match first.kind {
                ModuleKind::Linear => (
                    format!("{PREFIX}{module}.lora_A.weight"),
                    format!("{PREFIX}{module}.lora_B.weight"),
                ),
                ModuleKind::Embedding => (
                    format!("{PREFIX}{module}.lora_embedding_A"),
                    format!("{PREFIX}{module}.lora_embedding_B"),
                ),
            };
            tensors.push((
                a_name.clone(),
                out_dtype,
                vec![r_new, n_a as u64],
                encode(&a_name, out_dtype, &a_new)?,
            ));
            tensors.push((
                b_name.clone(),
                out_dtype,
                vec![n_b as u64, r_new],
                encode(&b_name, out_dtype, &b_new)?,
            ));
            if first.kind == ModuleKind::Embedding {
                // peft saves the embedding's base layer with an embedding LoRA: the base's.
                let (_, d, shape, bytes) = base_copy(&base, tensor, recipe.output.dtype).await?;
                tensors.push((
                    format!("{PREFIX}{module}.base_layer.weight"),
                    d,
                    shape,
                    bytes,
                ));
            }
            ctl.progress.tensors_done.fetch_add(1, Ordering::Relaxed);
        }
        // The first adapter's modules_to_save, copied from the base (as peft does).
        if let Some(first) = adapters.first() {
            for (tensor, t) in &first.adapter.touched {
                if let Touch::Replace(_) = t {
                    tensors.push(base_copy(&base, tensor, recipe.output.dtype).await?);
                }
            }
        }
        let adapter = AdapterFiles::new(tensors, &new_config(&adapters, r_new)?)?;
        let inputs = std::iter::once(InputRecord::of(&base.0, &base.1))
            .chain(adapters.iter().map(InputRecord::of_adapter))
            .collect();
        job.publish(recipe, inputs, adapter, ctl).await
    }

    /// The start of every run that writes an adapter (`lora`, `lora_extract`): the clock, the
    /// method's parameters, the output folder, the base's URI (`base_is`: what the message
    /// calls it when missing) and the recipe's hash.
    pub(super) fn adapter_job<'r, C: crate::methods::Config + Clone>(
        &self,
        recipe: &'r Recipe,
        ctl: &RunControl,
        method: &str,
        base_is: &str,
    ) -> Result<AdapterJob<'r, C>, EngineError> {
        let started = Instant::now();
        ctl.progress.set_phase(Phase::Planning);
        let config = recipe
            .parameters
            .get::<C>()
            .ok_or_else(|| EngineError::Internal(format!("{method} without its parameters")))?
            .clone();
        let output = self.storage.resolve(&recipe.output.uri)?;
        let base_uri = recipe
            .base_model
            .as_ref()
            .ok_or_else(|| invalid(format!("base_model: method {method} needs {base_is}")))?;
        Ok(AdapterJob {
            started,
            config,
            output,
            base_uri,
            recipe_sha256: hex::encode(recipe.hash()),
        })
    }
}

/// A run that writes an adapter folder, from [`Engine::adapter_job`] to [`AdapterJob::publish`].
pub(super) struct AdapterJob<'r, C> {
    started: Instant,
    pub config: C,
    output: Location,
    pub base_uri: &'r String,
    recipe_sha256: String,
}

impl<C> AdapterJob<'_, C> {
    /// The output already holds this recipe's adapter: a recovery (see [`published_adapter`]).
    /// Called once the inputs are checked: from here on the output folder is held by one
    /// directory handle (see `Location::pinned`), through which `publish` writes.
    pub async fn published(&mut self) -> Result<Option<MergeOutcome>, EngineError> {
        self.output = self.output.pinned(true)?;
        published_adapter(&self.output, &self.recipe_sha256).await
    }

    /// Publish `adapter` with the manifest recording `inputs` (see [`publish_adapter`]).
    pub async fn publish(
        self,
        recipe: &Recipe,
        inputs: Vec<InputRecord>,
        adapter: AdapterFiles,
        ctl: &Arc<RunControl>,
    ) -> Result<MergeOutcome, EngineError> {
        publish_adapter(
            &self.output,
            recipe,
            self.recipe_sha256,
            inputs,
            adapter,
            ctl,
            self.started,
        )
        .await
    }
}

/// The output already holds a manifest: `Some` (a recovery) when it is this recipe's and all
/// its files are there, `output_conflict` when it is another recipe's.
async fn published_adapter(
    output: &Location,
    recipe_sha256: &str,
) -> Result<Option<MergeOutcome>, EngineError> {
    let Some(existing) = manifest::read(output).await? else {
        return Ok(None);
    };
    if existing.recipe_sha256 != recipe_sha256 {
        return Err(EngineError::OutputConflict(format!(
            "{} already holds a soup made from a different recipe ({MANIFEST_NAME})",
            output.url
        )));
    }
    manifest::verify_files(output, &existing).await?;
    Ok(Some(MergeOutcome {
        uri: output.url.clone(),
        files: existing.files,
        recovered: true,
    }))
}

/// A PEFT adapter folder's two files.
pub(super) struct AdapterFiles {
    /// `adapter_model.safetensors`.
    pub weights: Bytes,
    /// `adapter_config.json`.
    pub config: Bytes,
    /// How many tensors `weights` holds.
    pub tensors: usize,
}

impl AdapterFiles {
    /// `tensors` as a safetensors file and `config` as `adapter_config.json`.
    pub fn new(tensors: Vec<OutTensor>, config: &serde_json::Value) -> Result<Self, EngineError> {
        let config = serde_json::to_vec_pretty(config)
            .map_err(|e| EngineError::Internal(format!("adapter config: {e}")))?;
        Ok(AdapterFiles {
            tensors: tensors.len(),
            weights: Bytes::from(safetensors_bytes(tensors)),
            config: Bytes::from(config),
        })
    }
}

/// Publish an adapter folder (adapter merges and extractions alike) through the publish
/// protocol: both files into this run's staging folder, the manifest (`inputs` as recorded)
/// last.
async fn publish_adapter(
    output: &Location,
    recipe: &Recipe,
    recipe_sha256: String,
    inputs: Vec<InputRecord>,
    adapter: AdapterFiles,
    ctl: &Arc<RunControl>,
    started: Instant,
) -> Result<MergeOutcome, EngineError> {
    ctl.check()?;
    // Every file goes to this run's own staging folder first (see `publish`).
    let writer = publish::Writer::of(&ctl.run_info);
    let staging = publish::staging(output, &writer);
    publish::remove_dead_staging(output, &writer).await;
    let result = async {
        let mut written: Vec<OutputFile> = Vec::new();
        for (name, bytes) in [
            (ADAPTER_WEIGHTS_NAME, adapter.weights),
            (ADAPTER_CONFIG_NAME, adapter.config),
        ] {
            let f = output::put_small(&staging, name, bytes).await?;
            ctl.progress
                .bytes_written
                .fetch_add(f.size, Ordering::Relaxed);
            written.push(f);
        }
        ctl.check()?;
        ctl.progress.set_phase(Phase::Publishing);
        ctl.gate.may_publish().await?;
        let m = Manifest {
            format: manifest::FORMAT.into(),
            ladle_version: env!("CARGO_PKG_VERSION").into(),
            recipe: serde_json::to_value(recipe).unwrap_or(serde_json::Value::Null),
            recipe_sha256,
            inputs,
            tensors: adapter.tensors,
            files: written,
            run: ctl.run_info.clone(),
            sparsity: None,
            search: None,
            nonfinite: None,
            elapsed_s: started.elapsed().as_secs_f64(),
        };
        let recovered = publish::publish(output, &staging, &writer, &m).await?;
        Ok::<_, EngineError>((m.files, recovered))
    }
    .await;
    // Whatever happened, what is left in the staging folder is ours alone.
    publish::remove_staging(&staging).await;
    let (files, recovered) = result?;
    Ok(MergeOutcome {
        uri: output.url.clone(),
        files,
        recovered,
    })
}

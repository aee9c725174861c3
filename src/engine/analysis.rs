//! Runs an analysis job (diagnostics, no output written): streams every float tensor of the
//! models (and base) chunk by chunk through [`crate::merge::diagnostics`].
//!
//! Inputs are opened and cross-checked exactly as for a merge (same names, same shapes, float
//! against float: a mismatch fails the job with `shape_mismatch` / `unsupported_dtype` naming
//! the tensor). Integer and bool tensors are skipped and listed in the result. A chunk's ranged
//! reads run concurrently; its statistics are computed on the blocking pool; at most a few
//! chunks (bounded by `inflight_bytes`) are in flight, and chunk results are folded in order.
//!
//! Models that are PEFT adapter folders are analysed from their factors instead
//! ([`super::adapter_analysis`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::{Engine, EngineError, RunControl, TensorOp, check_compatible, read_elems};
use crate::checkpoint::Checkpoint;
use crate::merge::diagnostics::{Reference, Stats};
use crate::merge::{DType, MergeError, decode_to_f32};
use crate::storage::Location;

/// Per-tensor cosine matrices are left out of the result when they would hold more numbers
/// than this (`models² × tensors`); the totals always have theirs.
pub const MAX_TENSOR_COSINES: usize = 250_000;

/// The stored (normalized) request of an analysis job: the job's `recipe` column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalysisSpec {
    /// Normalized model URLs.
    pub models: Vec<String>,
    /// Normalized base URL; without it task vectors are taken against the models' mean.
    #[serde(default)]
    pub base_model: Option<String>,
}

/// A tensor left out of the analysis (integer or bool).
#[derive(Debug, Serialize)]
struct Skipped {
    name: String,
    dtype: &'static str,
}

/// One unit of work: a range of elements of one tensor, in every input.
struct Chunk {
    tensor: String,
    elems: std::ops::Range<u64>,
    last_of_tensor: bool,
}

/// Run the analysis described by `spec` (the job's stored request); the returned JSON becomes
/// the job's `result`.
pub async fn run(
    engine: &Engine,
    spec: &serde_json::Value,
    ctl: &Arc<RunControl>,
) -> Result<serde_json::Value, EngineError> {
    let spec: AnalysisSpec = serde_json::from_value(spec.clone()).map_err(|e| {
        EngineError::InvalidRecipe(format!("stored analysis request cannot be read: {e}"))
    })?;
    if spec.models.is_empty() {
        return Err(EngineError::InvalidRecipe(
            "models: an analysis needs at least one model".into(),
        ));
    }
    let adapters = super::adapter_analysis::adapters_among(engine, &spec.models).await;
    if let Some(first) = adapters.iter().position(|a| *a) {
        if let Some(i) = adapters.iter().position(|a| !*a) {
            return Err(EngineError::InvalidRecipe(format!(
                "models[{i}]: models[{first}] is a PEFT adapter and models[{i}] is not; an \
                 analysis compares adapters with adapters or models with models (fold an \
                 adapter into its base, {{\"uri\": base, \"lora\": adapter}} in a merge, to \
                 compare it with a model)"
            )));
        }
        return super::adapter_analysis::run(engine, &spec, ctl).await;
    }
    let n = spec.models.len();
    let reference = if spec.base_model.is_some() {
        Reference::Base
    } else {
        Reference::Mean
    };
    ctl.progress.set_phase(super::Phase::Planning);
    // Inputs: the models in order, then the base.
    let inputs = engine
        .open_inputs(spec.models.iter().chain(&spec.base_model))
        .await?;
    let ops = check_compatible(&inputs)?;
    let first = &inputs[0].1;
    let mut skipped = Vec::new();
    let mut analysed: Vec<(String, Vec<u64>)> = Vec::new();
    for (name, op) in &ops {
        let t = first
            .tensors
            .get(name)
            .ok_or_else(|| EngineError::Internal(format!("tensor {name} vanished")))?;
        match op {
            TensorOp::Merge => analysed.push((name.clone(), t.shape.clone())),
            _ => skipped.push(Skipped {
                name: name.clone(),
                dtype: t.dtype.as_str(),
            }),
        }
    }
    ctl.progress
        .tensors_total
        .store(analysed.len() as u64, Ordering::Relaxed);
    let planned: u64 = analysed
        .iter()
        .flat_map(|(name, _)| inputs.iter().filter_map(|(_, c)| c.tensors.get(name)))
        .map(|t| t.len())
        .sum();
    ctl.progress.bytes_total.store(planned, Ordering::Relaxed);
    ctl.progress.set_phase(super::Phase::Merging);

    // Bytes one element costs in flight: its raw bytes in every input plus an f32 copy each.
    let per_elem: u64 = analysed
        .iter()
        .map(|(name, _)| {
            inputs
                .iter()
                .filter_map(|(_, c)| c.tensors.get(name))
                .map(|t| t.dtype.size_bytes() as u64 + 4)
                .sum::<u64>()
        })
        .max()
        .unwrap_or(1)
        .max(1);
    let budget = engine.config.inflight_bytes.max(1);
    // At least 1024 elements a chunk unless the configured chunk is smaller (never `clamp`:
    // a configured chunk below 1024 would make its bounds cross).
    let step = (budget / per_elem)
        .max(1024)
        .min(engine.config.chunk_elems.max(1) as u64);
    let depth = (budget / (step * per_elem)).clamp(1, 8) as usize;
    let mut chunks = Vec::new();
    for (name, shape) in &analysed {
        let numel: u64 = shape.iter().product();
        let mut begin = 0u64;
        loop {
            let end = (begin + step).min(numel);
            chunks.push(Chunk {
                tensor: name.clone(),
                elems: begin..end,
                last_of_tensor: end == numel,
            });
            if end == numel {
                break;
            }
            begin = end;
        }
    }

    let inputs = Arc::new(inputs);
    let mut stream = futures::stream::iter(chunks)
        .map(|chunk| {
            tokio::spawn(
                analyse_chunk(inputs.clone(), chunk, n, reference, ctl.clone()).in_current_span(),
            )
        })
        .buffered(depth);
    let mut totals = Stats::new(n, reference);
    let mut current: Option<Stats> = None;
    let mut tensors: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let keep_cosines = n.saturating_mul(n).saturating_mul(analysed.len()) <= MAX_TENSOR_COSINES;
    let shapes: BTreeMap<&String, &Vec<u64>> = analysed.iter().map(|(k, v)| (k, v)).collect();
    while let Some(done) = stream.next().await {
        let (chunk, part) =
            done.map_err(|e| EngineError::Internal(format!("analysis task failed: {e}")))??;
        ctl.check()?;
        let merge_err = |source: MergeError| EngineError::Merge {
            tensor: chunk.tensor.clone(),
            source,
        };
        match current.as_mut() {
            Some(s) => s.merge(&part).map_err(merge_err)?,
            None => current = Some(part),
        }
        if chunk.last_of_tensor {
            let stats = current
                .take()
                .ok_or_else(|| EngineError::Internal("no statistics for a tensor".into()))?;
            totals.merge(&stats).map_err(merge_err)?;
            let mut entry = serde_json::to_value(stats.summary())
                .map_err(|e| EngineError::Internal(format!("encoding the result: {e}")))?;
            if let Some(obj) = entry.as_object_mut() {
                if !keep_cosines {
                    obj.remove("cosine");
                }
                let shape = shapes.get(&chunk.tensor).cloned().cloned();
                obj.insert("shape".into(), serde_json::json!(shape));
            }
            tensors.insert(chunk.tensor.clone(), entry);
            ctl.progress.tensors_done.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(serde_json::json!({
        "reference": reference,
        "models": spec.models,
        "base_model": spec.base_model,
        "totals": totals.summary(),
        "tensors": tensors,
        "tensor_cosines": keep_cosines,
        "skipped": skipped,
    }))
}

/// Read one chunk of every input concurrently, then accumulate its statistics off the runtime.
async fn analyse_chunk(
    inputs: Arc<Vec<(Location, Checkpoint)>>,
    chunk: Chunk,
    n: usize,
    reference: Reference,
    ctl: Arc<RunControl>,
) -> Result<(Chunk, Stats), EngineError> {
    ctl.check()?;
    // Test-only throttle / CPU burn (a no-op unless built with the `failpoints` feature).
    crate::failpoints::chunk().await;
    if chunk.elems.is_empty() {
        // An empty tensor: nothing to read (an empty ranged GET is invalid on S3).
        return Ok((chunk, Stats::new(n, reference)));
    }
    let progress = &ctl.progress;
    let (name, elems) = (&chunk.tensor, &chunk.elems);
    let reads = inputs.iter().map(|(loc, ckpt)| async move {
        let (dtype, bytes) = read_elems(loc, ckpt, name, elems.clone()).await?;
        progress
            .bytes_read
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok::<_, EngineError>((dtype, bytes))
    });
    let raw: Vec<(DType, bytes::Bytes)> = futures::future::try_join_all(reads).await?;
    let len = (chunk.elems.end - chunk.elems.start) as usize;
    let name = chunk.tensor.clone();
    let stats = crate::telemetry::spawn_blocking(move || {
        let mut values = Vec::with_capacity(raw.len());
        for (dtype, bytes) in &raw {
            let mut v = vec![0.0f32; len];
            decode_to_f32(*dtype, bytes, &mut v)?;
            values.push(v);
        }
        let models: Vec<&[f32]> = values[..n].iter().map(Vec::as_slice).collect();
        let base = values.get(n).map(Vec::as_slice);
        let mut stats = Stats::new(n, reference);
        stats.accumulate(&models, base)?;
        Ok::<_, MergeError>(stats)
    })
    .await
    .map_err(|e| EngineError::Internal(format!("analysis task panicked: {e}")))?
    .map_err(|source| EngineError::Merge {
        tensor: name,
        source,
    })?;
    Ok((chunk, stats))
}

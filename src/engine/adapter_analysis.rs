//! Analyses of PEFT LoRA adapters (`POST /v1/analyses` whose models are adapter folders):
//! norms and cosines of the deltas the adapters add to their base, computed from the factors
//! ([`crate::merge::lora_gram`]), never forming an `out × in` product.
//!
//! Each adapter is opened and checked against `base_model` exactly as for a fold (a bad one
//! fails with `invalid_adapter`). Its delta on a base tensor is `s·B·A` for a LoRA module
//! (plus `copy − base` when the file holds the module's `base_layer` copy and it differs), or
//! `saved − base` for a `modules_to_save` tensor; a tensor an adapter does not touch has a zero
//! delta. The result has the shape of a model analysis (`reference: "base"`, `totals`,
//! `tensors: {name: {elements, shape, norms, cosine}}`, `tensor_cosines`, `skipped: []`),
//! with `inputs: "adapters"`, per tensor each adapter's `ranks` (`null` where it has no LoRA
//! module there), and none of the element-wise numbers (sign conflicts, sparsity, shared
//! zeros, non-finite counts: they would need the formed deltas).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use object_store::ObjectStoreExt;

use super::analysis::{AnalysisSpec, MAX_TENSOR_COSINES};
use super::lora_merge::{decode, read_whole, whole};
use super::{Engine, EngineError, Phase, RunControl, fold};
use crate::checkpoint::Checkpoint;
use crate::checkpoint::adapter::{ADAPTER_CONFIG_NAME, Attached, ModuleKind, Touch};
use crate::merge::lora_gram::{Part, gram};
use crate::storage::Location;

/// Per model: whether its folder holds `adapter_config.json`. A failed look-up counts as "not
/// an adapter" (opening the model then reports what is wrong).
pub(super) async fn adapters_among(engine: &Engine, models: &[String]) -> Vec<bool> {
    let mut out = Vec::with_capacity(models.len());
    for m in models {
        let found = match engine.storage.resolve(m) {
            Ok(loc) => loc
                .store
                .head(&loc.path.clone().join(ADAPTER_CONFIG_NAME))
                .await
                .is_ok(),
            Err(_) => false,
        };
        out.push(found);
    }
    out
}

/// One adapter's delta on one tensor, owned (see [`Part`]).
enum Owned {
    LowRank {
        a: Vec<f32>,
        b: Vec<f32>,
        rank: usize,
        scale: f64,
    },
    Dense(Vec<f32>),
}

impl Owned {
    fn part(&self) -> Part<'_> {
        match self {
            Owned::LowRank { a, b, rank, scale } => Part::LowRank {
                a,
                b,
                rank: *rank,
                scale: *scale,
            },
            Owned::Dense(d) => Part::Dense(d),
        }
    }
}

/// `x − base` in `B@A` orientation (`transpose`: an embedding's `(vocab, dim)` weight, stored
/// as `rows × cols`); `None` when it is zero everywhere.
fn difference(x: &[f32], base: &[f32], rows: usize, cols: usize, transpose: bool) -> Option<Owned> {
    if x.iter().zip(base).all(|(a, b)| a == b) {
        return None;
    }
    let d: Vec<f32> = if transpose {
        (0..rows * cols)
            .map(|e| {
                let (j, i) = (e / rows, e % rows); // output (cols × rows)
                x[i * cols + j] - base[i * cols + j]
            })
            .collect()
    } else {
        x.iter().zip(base).map(|(a, b)| a - b).collect()
    };
    Some(Owned::Dense(d))
}

/// Norms and cosines of a Gram matrix (`null` where a norm is zero), as a model analysis
/// reports them.
fn summary(g: &[f64], n: usize, elements: u64) -> serde_json::Value {
    let norms: Vec<f64> = (0..n).map(|i| g[i * n + i].max(0.0).sqrt()).collect();
    let cosine: Vec<Vec<Option<f64>>> = (0..n)
        .map(|i| {
            (0..n)
                .map(|j| {
                    let d = norms[i] * norms[j];
                    (d > 0.0).then(|| (g[i * n + j] / d).clamp(-1.0, 1.0))
                })
                .collect()
        })
        .collect();
    serde_json::json!({"elements": elements, "norms": norms, "cosine": cosine})
}

/// Every adapter's delta on one tensor, `n_b × n_a` in `B@A` orientation.
struct Deltas {
    parts: Vec<Vec<Owned>>,
    /// Per adapter, its LoRA rank there.
    ranks: Vec<Option<u64>>,
    n_a: usize,
    n_b: usize,
}

/// The deltas of every adapter on `tensor` (see the module's text), and each one's rank there.
async fn deltas(
    base: &(Location, Checkpoint),
    adapters: &[Attached],
    tensor: &str,
) -> Result<Deltas, EngineError> {
    let t = base
        .1
        .tensors
        .get(tensor)
        .ok_or_else(|| EngineError::Internal(format!("base tensor {tensor} vanished")))?;
    let rows = t.shape.first().copied().unwrap_or(1) as usize;
    let cols = t.shape.iter().skip(1).product::<u64>() as usize;
    let embedding = adapters.iter().any(|a| {
        matches!(a.adapter.touched.get(tensor),
                 Some(Touch::Lora(m)) if m.kind == ModuleKind::Embedding)
    });
    // B@A orientation: (n_b rows, n_a columns).
    let (n_a, n_b) = if embedding {
        (rows, cols)
    } else {
        (cols, rows)
    };
    let mut base_values: Option<Vec<f32>> = None;
    let mut all = Vec::with_capacity(adapters.len());
    let mut ranks = Vec::with_capacity(adapters.len());
    for att in adapters {
        let mut parts = Vec::new();
        let mut rank = None;
        let dense_name = match att.adapter.touched.get(tensor) {
            None => None,
            Some(Touch::Lora(m)) => {
                parts.push(Owned::LowRank {
                    a: whole(att, &m.a).await?,
                    b: whole(att, &m.b).await?,
                    rank: m.rank as usize,
                    scale: m.scaling,
                });
                rank = Some(m.rank);
                m.weight_from_adapter.clone()
            }
            Some(Touch::Replace(name)) => Some(name.clone()),
        };
        if let Some(name) = dense_name {
            if base_values.is_none() {
                let (d, b) = read_whole(&base.0, &base.1, tensor).await?;
                base_values = Some(decode(tensor, d, &b)?);
            }
            let copy = whole(att, &name).await?;
            let b = base_values.as_deref().unwrap_or_default();
            parts.extend(difference(&copy, b, rows, cols, embedding));
        }
        all.push(parts);
        ranks.push(rank);
    }
    Ok(Deltas {
        parts: all,
        ranks,
        n_a,
        n_b,
    })
}

/// Run an analysis whose models are all adapters (see the module's text).
pub(super) async fn run(
    engine: &Engine,
    spec: &AnalysisSpec,
    ctl: &Arc<RunControl>,
) -> Result<serde_json::Value, EngineError> {
    let base_uri = spec.base_model.as_ref().ok_or_else(|| {
        EngineError::InvalidRecipe(
            "base_model: an analysis of LoRA adapters needs their base model (an adapter is a \
             delta against it)"
                .into(),
        )
    })?;
    ctl.progress.set_phase(Phase::Planning);
    let base = engine
        .open_inputs(std::iter::once(base_uri))
        .await?
        .pop()
        .ok_or_else(|| EngineError::Internal("base not opened".into()))?;
    let mut adapters = Vec::with_capacity(spec.models.len());
    for m in &spec.models {
        adapters.push(fold::open_adapter(&engine.storage, m, &base.1, None).await?);
    }
    let tensors: BTreeSet<String> = adapters
        .iter()
        .flat_map(|a| a.adapter.touched.keys().cloned())
        .collect();
    let n = adapters.len();
    ctl.progress
        .tensors_total
        .store(tensors.len() as u64, Ordering::Relaxed);
    ctl.progress.set_phase(Phase::Merging);
    let keep_cosines = n.saturating_mul(n).saturating_mul(tensors.len()) <= MAX_TENSOR_COSINES;
    let mut totals = vec![0f64; n * n];
    let mut elements = 0u64;
    let mut out = serde_json::Map::new();
    for tensor in &tensors {
        ctl.check()?;
        let shape = base
            .1
            .tensors
            .get(tensor)
            .map(|t| t.shape.clone())
            .unwrap_or_default();
        let numel: u64 = shape.iter().product();
        let Deltas {
            parts: owned,
            ranks,
            n_a,
            n_b,
        } = deltas(&base, &adapters, tensor).await?;
        let g = crate::telemetry::spawn_blocking(move || {
            let parts: Vec<Vec<Part<'_>>> = owned
                .iter()
                .map(|ps| ps.iter().map(Owned::part).collect())
                .collect();
            gram(&parts, n_a, n_b)
        })
        .await
        .map_err(|e| EngineError::Internal(format!("analysis task panicked: {e}")))?;
        for (t, x) in totals.iter_mut().zip(&g) {
            *t += x;
        }
        elements += numel;
        let mut entry = summary(&g, n, numel);
        if let Some(obj) = entry.as_object_mut() {
            if !keep_cosines {
                obj.remove("cosine");
            }
            obj.insert("shape".into(), serde_json::json!(shape));
            obj.insert("ranks".into(), serde_json::json!(ranks));
        }
        out.insert(tensor.clone(), entry);
        ctl.progress.tensors_done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(serde_json::json!({
        "reference": "base",
        "inputs": "adapters",
        "models": spec.models,
        "base_model": spec.base_model,
        "totals": summary(&totals, n, elements),
        "tensors": out,
        "tensor_cosines": keep_cosines,
        "skipped": [],
    }))
}

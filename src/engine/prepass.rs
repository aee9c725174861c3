//! The pre-pass of a model-wide selection (`scope: "model"`: TIES / breadcrumbs over the whole
//! model, ALGORITHMS.md §1.7): the exact cut-off magnitudes of every task vector over all of its
//! merged tensors, found in bounded memory by the radix select of [`crate::merge::radix`].
//!
//! Two streamed reads of every input, chunk by chunk (`chunk_elems` elements of one tensor of
//! every input at a time), before the merge pass:
//! 1. a histogram of the high 16 bits of `|δ|` per model;
//! 2. for each cut-off, a histogram of the low 16 bits inside its bucket.
//!
//! `δ = r(x − b)` is rounded to the same precision as the merge pass's task vectors (the
//! recipe's `compute_dtype`, else each tensor's base dtype), so the kernel's `|δ| ≥ cut-off`
//! test sees the very values that were counted. Memory: two or three 512 KiB histograms per
//! model plus one chunk of every input.

use bytes::Bytes;

use super::{EngineError, read_elems};
use crate::checkpoint::Checkpoint;
use crate::merge::gta::task_vector;
use crate::merge::precision::Precision;
use crate::merge::radix::{self, Band, Cutoff, Located};
use crate::merge::{DType, decode_to_f32};
use crate::storage::Location;

/// What one model's selection came to (logged, and kept for tests).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelSelection {
    /// Elements of the model's task vector over all merged tensors.
    pub elements: u64,
    /// The band applied to `|δ|`.
    pub band: Band,
    /// The lower cut-off (`None`: everything or nothing kept, see `band`).
    pub low: Option<Cutoff>,
    /// The upper cut-off of a breadcrumbs band.
    pub high: Option<Cutoff>,
    /// Elements kept: all those equal to the lower cut-off are kept (so this may exceed the
    /// rank asked for by the tied ones), all those equal to the upper one dropped.
    pub kept: u64,
}

/// Per model (inputs `1..`; input 0 is the base), the band of `|δ|` its selection keeps over
/// `tensors`. `specs` are `(outliers, density, gamma)` per model.
pub(super) async fn model_bands(
    inputs: &[(Location, Checkpoint)],
    tensors: &[String],
    specs: &[(bool, f64, f64)],
    compute: Option<DType>,
    chunk_elems: usize,
) -> Result<Vec<ModelSelection>, EngineError> {
    let models = inputs.len().saturating_sub(1);
    if specs.len() != models {
        return Err(EngineError::Internal(format!(
            "scope \"model\": {} selections for {models} models",
            specs.len()
        )));
    }
    let mut elements = 0u64;
    for name in tensors {
        let t =
            inputs[0].1.tensors.get(name).ok_or_else(|| {
                EngineError::Internal(format!("tensor {name} missing from the base"))
            })?;
        elements += t.shape.iter().product::<u64>();
    }
    let ranks: Vec<Option<(u64, u64)>> = specs
        .iter()
        .map(|&(outliers, density, gamma)| radix::band_ranks(outliers, density, gamma, elements))
        .collect();
    let mut out: Vec<ModelSelection> = ranks
        .iter()
        .map(|_| ModelSelection {
            elements,
            band: Band::ALL,
            low: None,
            high: None,
            kept: elements,
        })
        .collect();
    if ranks.iter().all(|r| r.is_none()) {
        return Ok(out);
    }

    // Pass 1: high 16 bits.
    let high = vec![radix::histogram(); models];
    let high = scan(inputs, tensors, compute, chunk_elems, high, |h, i, d| {
        radix::accumulate_high(&mut h[i], d)
    })
    .await?;

    // Pass 2: low 16 bits inside each cut-off's bucket. Targets: (model, rank, location).
    let mut targets: Vec<(usize, u64, Located)> = Vec::new();
    for (i, r) in ranks.iter().enumerate() {
        let Some((lo, hi)) = *r else { continue };
        for rank in [lo, hi] {
            if let Some(at) = radix::locate(&high[i], rank) {
                targets.push((i, rank, at));
            }
        }
    }
    drop(high);
    let buckets: Vec<(usize, u32)> = targets.iter().map(|(i, _, at)| (*i, at.bucket)).collect();
    let low = vec![radix::histogram(); targets.len()];
    let low = scan(
        inputs,
        tensors,
        compute,
        chunk_elems,
        low,
        move |h, i, d| {
            for (t, (m, bucket)) in buckets.iter().enumerate() {
                if *m == i {
                    radix::accumulate_low(&mut h[t], *bucket, d);
                }
            }
        },
    )
    .await?;
    let cutoff = |model: usize, rank: u64| {
        targets
            .iter()
            .zip(&low)
            .find(|((m, r, _), _)| *m == model && *r == rank)
            .and_then(|((_, _, at), h)| radix::select(*at, h, rank))
    };

    for (i, r) in ranks.iter().enumerate() {
        let Some((lo_rank, hi_rank)) = *r else {
            continue;
        };
        let sel = &mut out[i];
        if lo_rank == 0 {
            sel.band = Band::NONE;
            sel.kept = 0;
            continue;
        }
        let low = cutoff(i, lo_rank)
            .ok_or_else(|| EngineError::Internal("scope \"model\": no lower cut-off".into()))?;
        let high =
            if hi_rank > 0 {
                Some(cutoff(i, hi_rank).ok_or_else(|| {
                    EngineError::Internal("scope \"model\": no upper cut-off".into())
                })?)
            } else {
                None
            };
        let at_or_above = |c: &Cutoff| c.greater + c.equal;
        sel.band = Band {
            lo: low.key,
            hi: high.map(|h| h.key),
        };
        sel.kept = at_or_above(&low).saturating_sub(high.as_ref().map_or(0, at_or_above));
        if high.is_some_and(|h| h.key <= low.key) {
            sel.band = Band::NONE;
            sel.kept = 0;
        }
        sel.low = Some(low);
        sel.high = high;
        tracing::info!(
            model = i,
            elements,
            rank = lo_rank,
            cutoff = low.value(),
            strictly_above = low.greater,
            tied_at_cutoff = low.equal,
            upper_cutoff = high.map(|h| h.value()),
            kept = sel.kept,
            "scope \"model\" selection"
        );
    }
    Ok(out)
}

/// Stream every merged tensor of every input chunk by chunk, compute each model's task vector
/// and hand it to `f(state, model, δ)`.
async fn scan<S, F>(
    inputs: &[(Location, Checkpoint)],
    tensors: &[String],
    compute: Option<DType>,
    chunk_elems: usize,
    mut state: S,
    f: F,
) -> Result<S, EngineError>
where
    S: Send + 'static,
    F: Fn(&mut S, usize, &[f32]) + Send + Sync + Clone + 'static,
{
    let chunk_elems = chunk_elems.max(1) as u64;
    for name in tensors {
        let base =
            inputs[0].1.tensors.get(name).ok_or_else(|| {
                EngineError::Internal(format!("tensor {name} missing from the base"))
            })?;
        let n: u64 = base.shape.iter().product();
        let p = Precision::of(compute.unwrap_or(base.dtype));
        let mut start = 0u64;
        while start < n {
            let elems = start..(start + chunk_elems).min(n);
            start = elems.end;
            let reads = inputs
                .iter()
                .map(|(loc, ckpt)| read_elems(loc, ckpt, name, elems.clone()));
            let raw: Vec<(DType, Bytes)> = futures::future::try_join_all(reads).await?;
            let f = f.clone();
            let len = (elems.end - elems.start) as usize;
            state = crate::telemetry::spawn_blocking(move || {
                let mut decoded = Vec::with_capacity(raw.len());
                for (dtype, bytes) in &raw {
                    let mut v = vec![0.0f32; len];
                    decode_to_f32(*dtype, bytes, &mut v)?;
                    decoded.push(v);
                }
                let mut delta = vec![0.0f32; len];
                for (i, x) in decoded.iter().enumerate().skip(1) {
                    task_vector(&decoded[0], x, p, &mut delta);
                    f(&mut state, i - 1, &delta);
                }
                Ok::<_, crate::merge::DTypeError>(state)
            })
            .await
            .map_err(|e| EngineError::Internal(format!("pre-pass task panicked: {e}")))?
            .map_err(|source| EngineError::Merge {
                tensor: name.clone(),
                source: source.into(),
            })?;
        }
    }
    Ok(state)
}

//! SCE (Select, Calculate, Erase) as mergekit's `sce`, rounding to the compute precision
//! `r(·)` after every tensor op:
//! ```text
//! τ_i = r(x_i − b)
//! select (select_topk < 1): var = r(population variance over models of τ) per element;
//!   keep the k = ⌊f32(count_nonzero(var))·f32(select_topk)⌋ largest var, τ_i ← τ_i·mask
//! erase: s = Σ τ_i (f32), keep i iff sign(τ_i) = (s ≥ 0 ? +1 : −1)
//! calculate: w_i = r(mean r(τ_i²)) over the tensor, S = r(Σ w_i);
//!   w_i = |S| < 1e-6 ? r(1/N) : r(w_i / S)
//! out = r(b + r(r(Σ_kept r(τ_i·w_i)) / max(r(Σ_kept w_i), 1e-6)))
//! ```
//! The variance top-k is exact with ties broken by index (the higher index first), as TIES.

use rayon::prelude::*;

use crate::merge::blocks::{TASK_ELEMS, map_spans, scan_spans};
use crate::merge::dtype::DType;
use crate::merge::error::MergeError;
use crate::merge::gta::keep_rank_band;
use crate::merge::precision::Precision;
use crate::merge::radix;
use crate::merge::select::{TIE_BLOCK, TieTable, Top, mag_key, top_from};
use crate::merge::stream::{TensorStream, sum_start};

/// The population variance over the models of one element's task-vector values.
#[inline(always)]
fn variance(p: Precision, vals: &[f32]) -> f32 {
    let m = vals.len();
    let mean = vals.iter().map(|t| *t as f64).sum::<f64>() / m as f64;
    let v = vals.iter().map(|t| (*t as f64 - mean).powi(2)).sum::<f64>() / m as f64;
    p.round(v as f32)
}

/// The number of variances the selection keeps.
fn top_k(nonzero: usize, select_topk: f64) -> usize {
    ((nonzero as f32) * (select_topk as f32)) as usize
}

/// The models' weights from their sums `Σ r(τ²)` over `n` elements.
fn weights(p: Precision, sums: &[f64], n: usize) -> Vec<f32> {
    let m = sums.len();
    let nf = n.max(1) as f64;
    let mut w: Vec<f32> = sums.iter().map(|s| p.round((s / nf) as f32)).collect();
    let wsum = p.round(w.iter().map(|x| *x as f64).sum::<f64>() as f32);
    if (wsum as f64).abs() < 1e-6 {
        let u = p.round(1.0 / m as f32);
        w.iter_mut().for_each(|x| *x = u);
    } else {
        w.iter_mut().for_each(|x| *x = p.round(*x / wsum));
    }
    w
}

/// One output element from the (selected) task-vector values and the weights.
#[inline(always)]
fn element(p: Precision, b: f32, vals: &[f32], w: &[f32]) -> f32 {
    let s: f32 = vals.iter().sum();
    let majority = if s >= 0.0 { 1.0f32 } else { -1.0 };
    let mut acc = 0.0f32;
    let mut div = 0.0f32;
    for (v, wi) in vals.iter().zip(w) {
        if *v != 0.0 && v.signum() == majority {
            acc += p.round(v * wi);
            div += wi;
        }
    }
    let div = p.round(div).max(1e-6);
    p.round(b + p.round(p.round(acc) / div))
}

pub fn sce(p: Precision, base: &[f32], xs: &[&[f32]], select_topk: f64, out: &mut [f32]) {
    let n = base.len();
    let m = xs.len();
    if m == 0 {
        out.copy_from_slice(base);
        return;
    }
    let mut tvs: Vec<Vec<f32>> = xs
        .iter()
        .map(|x| x.iter().zip(base).map(|(x, b)| p.round(x - b)).collect())
        .collect();
    let mut vals = vec![0.0f32; m];
    if select_topk <= 0.0 {
        tvs.iter_mut().for_each(|t| t.fill(0.0));
    } else if select_topk < 1.0 {
        let mut var: Vec<f32> = (0..n)
            .map(|e| {
                for (v, t) in vals.iter_mut().zip(&tvs) {
                    *v = t[e];
                }
                variance(p, &vals)
            })
            .collect();
        let nonzero = var.iter().filter(|v| **v != 0.0).count();
        let k = top_k(nonzero, select_topk);
        keep_rank_band(&mut var, n - k.min(n), n);
        // `keep_rank_band` zeroes the unselected; a selected variance is never 0 unless
        // k exceeds the non-zero count, which it cannot.
        for (e, v) in var.iter().enumerate() {
            if *v == 0.0 {
                for t in tvs.iter_mut() {
                    t[e] = 0.0;
                }
            }
        }
    }
    let sums: Vec<f64> = tvs
        .iter()
        .map(|t| t.iter().map(|v| p.round(v * v) as f64).sum())
        .collect();
    let w = weights(p, &sums, n);
    for (e, o) in out.iter_mut().enumerate() {
        for (v, t) in vals.iter_mut().zip(&tvs) {
            *v = t[e];
        }
        *o = element(p, base[e], &vals, &w);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Variance histogram and non-zero count.
    Histogram,
    /// Low 16 bits inside the cut-off's bucket.
    Low,
    /// Tie table and the weights' sums over the selected values.
    Weights,
    Done,
}

/// [`sce`] streamed ([`TensorStream`]): with a selection (`0 < select_topk < 1`), pass 1 the
/// histogram of the per-element variances and their non-zero count, pass 2 (f32 / f16) the
/// low bits of the cut-off, pass 3 the tie table and `Σ r(τ²)` of the selected values; without
/// one, only pass 3's sums. Inputs: the base (else the first model stands in), then the models.
#[derive(Debug, Clone)]
pub struct SceStream {
    p: Precision,
    has_base: bool,
    models: usize,
    n: u64,
    select_topk: f64,
    stage: Stage,
    high: Vec<u64>,
    low: Vec<u64>,
    located: Option<radix::Located>,
    nonzero: usize,
    top: Top,
    table: TieTable,
    /// Ties seen so far in the weights pass.
    seen: u64,
    sums: Vec<f64>,
    w: Vec<f32>,
}

impl SceStream {
    pub fn new(p: Precision, has_base: bool, models: usize, n: u64, select_topk: f64) -> Self {
        let mut s = SceStream {
            p,
            has_base,
            models,
            n,
            select_topk,
            stage: Stage::Histogram,
            high: Vec::new(),
            low: Vec::new(),
            located: None,
            nonzero: 0,
            top: Top::Everything,
            table: TieTable::default(),
            seen: 0,
            sums: vec![sum_start(); models],
            w: Vec::new(),
        };
        if select_topk <= 0.0 {
            s.top = Top::Nothing;
            s.stage = Stage::Done;
            // Every value erased: each sum is of zeros, so the weights fall back to 1/N.
            s.w = weights(p, &vec![0.0; models], n as usize);
        } else if select_topk >= 1.0 {
            s.stage = Stage::Weights;
        }
        s
    }

    fn check(&self, inputs: &[(DType, &[u8])]) -> Result<(), MergeError> {
        let want = self.models + usize::from(self.has_base);
        if inputs.len() != want || self.models == 0 {
            return Err(MergeError::WeightCount {
                inputs: inputs.len(),
                weights: want.max(1),
            });
        }
        Ok(())
    }

    /// The task-vector values of element `e` into `vals`.
    #[inline(always)]
    fn values(&self, blocks: &[&[f32]], e: usize, vals: &mut [f32]) {
        let base = blocks[0][e];
        let xs = if self.has_base { &blocks[1..] } else { blocks };
        for (v, x) in vals.iter_mut().zip(xs) {
            *v = self.p.round(x[e] - base);
        }
    }

    /// Whether element with variance `var` keeps its values (`seen`: ties before it).
    #[inline(always)]
    fn keeps(&self, var: f32, seen: &mut u64) -> bool {
        match self.top {
            Top::Everything if self.select_topk >= 1.0 => true,
            top => top.holds(mag_key(var), seen) && var != 0.0,
        }
    }
}

impl SceStream {
    /// The per-element variances of one chunk, computed in parallel tasks of [`TASK_ELEMS`].
    fn variances(&self, inputs: &[(DType, &[u8])]) -> Result<Vec<f32>, MergeError> {
        let (d0, b0) = inputs[0];
        let n = b0.len() / d0.size_bytes().max(1);
        let mut vars = vec![0.0f32; n];
        vars.par_chunks_mut(TASK_ELEMS)
            .enumerate()
            .try_for_each(|(t, out)| {
                let a = t * TASK_ELEMS;
                let b = a + out.len();
                let sub: Vec<(DType, &[u8])> = inputs
                    .iter()
                    .map(|(d, bytes)| {
                        let sz = d.size_bytes();
                        (*d, bytes.get(a * sz..b * sz).unwrap_or_default())
                    })
                    .collect();
                let mut vals = vec![0.0f32; self.models];
                scan_spans(&sub, TIE_BLOCK, |start, blocks| {
                    for (e, v) in out[start..start + blocks[0].len()].iter_mut().enumerate() {
                        self.values(blocks, e, &mut vals);
                        *v = variance(self.p, &vals);
                    }
                })
            })?;
        Ok(vars)
    }
}

impl TensorStream for SceStream {
    fn align(&self) -> usize {
        TIE_BLOCK
    }

    fn wants_pass(&self) -> bool {
        self.stage != Stage::Done
    }

    fn observe(&mut self, first: u64, inputs: &[(DType, &[u8])]) -> Result<(), MergeError> {
        self.check(inputs)?;
        let p = self.p;
        let stage = self.stage;
        if stage == Stage::Done {
            return Ok(());
        }
        // The variances, in parallel (elementwise, so the same bits whatever the split); what
        // depends on order (tie counts, the f64 sums) then runs over them in index order.
        let selecting = self.select_topk < 1.0;
        let vars = if selecting {
            self.variances(inputs)?
        } else {
            Vec::new()
        };
        match stage {
            Stage::Histogram => {
                if self.high.is_empty() {
                    self.high = radix::histogram();
                }
                radix::accumulate_high(&mut self.high, &vars);
                self.nonzero += vars.iter().filter(|v| **v != 0.0).count();
            }
            Stage::Low => {
                if let Some(at) = self.located {
                    radix::accumulate_low(&mut self.low, at.bucket, &vars);
                }
            }
            Stage::Weights => {
                let first = first as usize;
                if selecting
                    && let Top::Cut { key, drop } = self.top
                    && drop > 0
                {
                    for (b, block) in vars.chunks(TIE_BLOCK).enumerate() {
                        let at = first + b * TIE_BLOCK;
                        self.table.push(at, key, block.iter().map(|v| mag_key(*v)));
                    }
                }
                let mut vals = vec![0.0f32; self.models];
                let mut sums = std::mem::take(&mut self.sums);
                let mut seen = self.seen;
                let this = &*self;
                scan_spans(inputs, TIE_BLOCK, |start, blocks| {
                    for e in 0..blocks[0].len() {
                        this.values(blocks, e, &mut vals);
                        let keep = !selecting || this.keeps(vars[start + e], &mut seen);
                        for (s, v) in sums.iter_mut().zip(&vals) {
                            let v = if keep { *v } else { 0.0 };
                            *s += p.round(v * v) as f64;
                        }
                    }
                })?;
                self.sums = sums;
                self.seen = seen;
            }
            Stage::Done => {}
        }
        Ok(())
    }

    fn end_pass(&mut self) {
        let p = self.p;
        let n = self.n;
        match self.stage {
            Stage::Histogram => {
                let k = top_k(self.nonzero, self.select_topk).min(n as usize) as u64;
                if p == Precision::BF16 || k == 0 || k >= n {
                    self.top = top_from(&self.high, None, k, n).unwrap_or(Top::Everything);
                    self.high = Vec::new();
                    self.stage = Stage::Weights;
                } else {
                    self.located = radix::locate(&self.high, k);
                    self.low = radix::histogram();
                    self.nonzero = k as usize; // kept for the low pass's select
                    self.stage = Stage::Low;
                }
            }
            Stage::Low => {
                let k = self.nonzero as u64;
                self.top = top_from(&self.high, Some(&self.low), k, n).unwrap_or(Top::Everything);
                self.high = Vec::new();
                self.low = Vec::new();
                self.stage = Stage::Weights;
            }
            Stage::Weights => {
                self.w = weights(p, &self.sums, n as usize);
                self.stage = Stage::Done;
            }
            Stage::Done => {}
        }
    }

    fn merge(
        &self,
        first: u64,
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        self.check(inputs)?;
        if self.wants_pass() {
            return Err(MergeError::NotReady);
        }
        let p = self.p;
        let m = self.models;
        let init = |task_first: usize| {
            (
                vec![0.0f32; m],
                self.table.before(first + task_first as u64),
            )
        };
        map_spans(
            inputs,
            out_dtype,
            out,
            TIE_BLOCK,
            init,
            |(vals, seen), _, blocks, o| {
                for (e, o) in o.iter_mut().enumerate() {
                    self.values(blocks, e, vals);
                    let keep = if self.select_topk >= 1.0 {
                        true
                    } else if self.select_topk <= 0.0 {
                        false
                    } else {
                        let var = variance(p, vals);
                        self.keeps(var, seen)
                    };
                    if !keep {
                        vals.iter_mut().for_each(|v| *v = 0.0);
                    }
                    *o = element(p, blocks[0][e], vals, &self.w);
                }
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn views(raw: &[Vec<u8>], dt: DType, a: usize, e: usize) -> Vec<(DType, &[u8])> {
        let sz = dt.size_bytes();
        raw.iter().map(|r| (dt, &r[sz * a..sz * e])).collect()
    }

    #[test]
    fn streamed_equals_whole() {
        use crate::merge::dtype::encode_from_f32;
        let n = 3 * 4096 + 77;
        let mut st = 0x5555_1234u64;
        let mut next = || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            st
        };
        for (p, dt) in [
            (Precision::BF16, DType::BF16),
            (Precision::F32, DType::F32),
            (Precision::F16, DType::F16),
        ] {
            // Few distinct values: many tied variances, some zero.
            let base: Vec<f32> = (0..n)
                .map(|_| p.round(((next() >> 40) % 5) as f32 * 0.01))
                .collect();
            let xs: Vec<Vec<f32>> = (0..3)
                .map(|_| {
                    base.iter()
                        .map(|b| {
                            let r = next();
                            if r % 7 == 0 {
                                *b
                            } else {
                                p.round(b + ((r >> 40) % 9) as f32 * 0.003 - 0.012)
                            }
                        })
                        .collect()
                })
                .collect();
            let enc = |v: &[f32]| {
                let mut b = vec![0u8; n * dt.size_bytes()];
                encode_from_f32(dt, v, &mut b).unwrap();
                b
            };
            let raw: Vec<Vec<u8>> = std::iter::once(&base)
                .chain(&xs)
                .map(|v| enc(v.as_slice()))
                .collect();
            for topk in [0.0, 0.1, 0.5, 0.999, 1.0] {
                let refs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
                let mut want = vec![0.0f32; n];
                sce(p, &base, &refs, topk, &mut want);
                let wb = enc(&want);
                for chunk in [4096usize, 8192, n] {
                    let mut s = SceStream::new(p, true, 3, n as u64, topk);
                    while s.wants_pass() {
                        for a in (0..n).step_by(chunk) {
                            s.observe(a as u64, &views(&raw, dt, a, (a + chunk).min(n)))
                                .unwrap();
                        }
                        s.end_pass();
                    }
                    let sz = dt.size_bytes();
                    let mut got = vec![0u8; n * sz];
                    for a in (0..n).step_by(chunk) {
                        let e = (a + chunk).min(n);
                        s.merge(
                            a as u64,
                            &views(&raw, dt, a, e),
                            dt,
                            &mut got[sz * a..sz * e],
                        )
                        .unwrap();
                    }
                    assert!(got == wb, "{p:?} topk {topk} chunk {chunk}");
                }
            }
        }
    }

    #[test]
    fn by_hand() {
        // Two models; deltas m1 = [2, 0, −1, 1], m2 = [2, 2, 1, −1].
        let b = [0.0f32; 4];
        let x1 = [2.0f32, 0.0, -1.0, 1.0];
        let x2 = [2.0f32, 2.0, 1.0, -1.0];
        let mut out = [0.0f32; 4];
        sce(Precision::F32, &b, &[&x1, &x2], 1.0, &mut out);
        // w1 = mean(τ1²) = 6/4 = 1.5, w2 = 10/4 = 2.5; normalized 0.375, 0.625.
        // e0: both +: (2·0.375 + 2·0.625)/1 = 2; e1: only m2: 2·0.625/0.625 = 2;
        // e2: s = 0 → +: m2 only → 1; e3: s = 0 → +: m1 only → 1.
        assert_eq!(out, [2.0, 2.0, 1.0, 1.0]);
        // select_topk 0.5: var = [0, 1, 1, 1] → 3 non-zero → k = 1: the highest index kept.
        sce(Precision::F32, &b, &[&x1, &x2], 0.5, &mut out);
        // Only e3 survives: τ1 = [0,0,0,1], τ2 = [0,0,0,−1]; w1 = w2 = 0.25 → 0.5 each;
        // e3: s = 0 → +: m1 → 1·0.5/0.5 = 1.
        assert_eq!(out, [0.0, 0.0, 0.0, 1.0]);
    }
}

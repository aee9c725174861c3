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

use crate::merge::blocks::{TASK_ELEMS, map_spans, par_values, scan_spans};
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

/// One block's task-vector values, model by model, and (when asked) their per-element
/// variances: the same bits as [`variance`] element by element (the same operations in the
/// same order, f64 sums starting from `-0.0` as `Iterator::sum`), computed across the block so
/// that the loops vectorize.
struct Cols {
    models: usize,
    tv: Vec<f32>,
    var: Vec<f32>,
    mean: Vec<f64>,
    acc: Vec<f64>,
}

impl Cols {
    fn new(models: usize) -> Cols {
        Cols {
            models,
            tv: vec![0.0; models * TIE_BLOCK],
            var: vec![0.0; TIE_BLOCK],
            mean: vec![0.0; TIE_BLOCK],
            acc: vec![0.0; TIE_BLOCK],
        }
    }

    /// Model `i`'s values over the block last filled (`len` elements).
    #[inline(always)]
    fn tv(&self, i: usize, len: usize) -> &[f32] {
        &self.tv[i * TIE_BLOCK..i * TIE_BLOCK + len]
    }

    /// `τ_i = r(x_i − b)` of a block of at most [`TIE_BLOCK`] elements (`blocks`: the base,
    /// else the first model standing in for it, then the models), and their variances when
    /// `with_var`.
    fn fill(&mut self, p: Precision, has_base: bool, blocks: &[&[f32]], with_var: bool) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { self.fill_avx2(p, has_base, blocks, with_var) };
            return;
        }
        self.fill_inner(p, has_base, blocks, with_var)
    }

    /// [`Cols::fill`] compiled for AVX2: the same operations (IEEE arithmetic, no fused
    /// multiply-add), four f64 lanes instead of two.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn fill_avx2(&mut self, p: Precision, has_base: bool, blocks: &[&[f32]], with_var: bool) {
        self.fill_inner(p, has_base, blocks, with_var)
    }

    #[inline(always)]
    fn fill_inner(&mut self, p: Precision, has_base: bool, blocks: &[&[f32]], with_var: bool) {
        let len = blocks[0].len();
        let base = blocks[0];
        let xs = if has_base { &blocks[1..] } else { blocks };
        for (i, x) in xs.iter().enumerate().take(self.models) {
            let t = &mut self.tv[i * TIE_BLOCK..i * TIE_BLOCK + len];
            for ((t, x), b) in t.iter_mut().zip(x.iter()).zip(base) {
                *t = x - b;
            }
            p.round_slice(t);
        }
        if !with_var {
            return;
        }
        let m = self.models as f64;
        let mean = &mut self.mean[..len];
        mean.fill(sum_start());
        for i in 0..self.models {
            let t = &self.tv[i * TIE_BLOCK..i * TIE_BLOCK + len];
            for (mu, t) in mean.iter_mut().zip(t) {
                *mu += *t as f64;
            }
        }
        mean.iter_mut().for_each(|mu| *mu /= m);
        let acc = &mut self.acc[..len];
        acc.fill(sum_start());
        for i in 0..self.models {
            let t = &self.tv[i * TIE_BLOCK..i * TIE_BLOCK + len];
            for ((a, t), mu) in acc.iter_mut().zip(t).zip(mean.iter()) {
                let d = *t as f64 - mu;
                *a += d * d;
            }
        }
        let var = &mut self.var[..len];
        for (v, a) in var.iter_mut().zip(acc.iter()) {
            *v = (a / m) as f32;
        }
        p.round_slice(var);
    }
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
    /// Reused buffer of the weights pass's per-element values.
    values: Vec<f32>,
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
            values: Vec::new(),
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

    /// Per element of a block of variances (`0 < select_topk < 1`): all ones when it keeps
    /// its values (among the selected variances, and not 0), else 0; `seen` counts the ties
    /// before the block and advances past it.
    fn keep_mask(&self, vars: &[f32], seen: &mut u64, keep: &mut [u32]) {
        self.top.mask_block(vars, seen, keep);
        for (k, v) in keep.iter_mut().zip(vars) {
            *k &= u32::from(*v != 0.0).wrapping_neg();
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
                let mut cols = Cols::new(self.models);
                scan_spans(&sub, TIE_BLOCK, |start, blocks| {
                    let len = blocks[0].len();
                    cols.fill(self.p, self.has_base, blocks, true);
                    out[start..start + len].copy_from_slice(&cols.var[..len]);
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
                // Per element, in parallel: each model's `r(τ²)` (0 where the selection
                // drops the element; each block's tie count from the table just filled);
                // then the f64 sums in index order on this thread.
                let m = self.models;
                let mut values = std::mem::take(&mut self.values);
                let this = &*self;
                let init = || (Cols::new(m), vec![0u32; TIE_BLOCK], vec![0.0f32; TIE_BLOCK]);
                par_values(inputs, m, &mut values, init, |state, start, blocks, out| {
                    let (cols, keep, sq) = state;
                    let len = blocks[0].len();
                    cols.fill(p, this.has_base, blocks, false);
                    let keep = &mut keep[..len];
                    if selecting {
                        let mut seen = this.table.before((first + start) as u64);
                        this.keep_mask(&vars[start..start + len], &mut seen, keep);
                    } else {
                        keep.fill(u32::MAX);
                    }
                    let sq = &mut sq[..len];
                    for i in 0..m {
                        // `r(v²)`, v the value or +0.0 where the selection drops it.
                        for ((q, t), k) in sq.iter_mut().zip(cols.tv(i, len)).zip(keep.iter()) {
                            let v = f32::from_bits(t.to_bits() & k);
                            *q = v * v;
                        }
                        p.round_slice(sq);
                        for (e, q) in sq.iter().enumerate() {
                            out[e * m + i] = *q;
                        }
                    }
                })?;
                if m == 2 {
                    let (mut s0, mut s1) = (self.sums[0], self.sums[1]);
                    for v in values.chunks_exact(2) {
                        s0 += v[0] as f64;
                        s1 += v[1] as f64;
                    }
                    (self.sums[0], self.sums[1]) = (s0, s1);
                } else {
                    for v in values.chunks_exact(m) {
                        for (s, x) in self.sums.iter_mut().zip(v) {
                            *s += *x as f64;
                        }
                    }
                }
                self.values = values;
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
                self.values = Vec::new();
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
        let selecting = self.select_topk > 0.0 && self.select_topk < 1.0;
        let init = |task_first: usize| {
            (
                Cols::new(m),
                Vote::new(),
                self.table.before(first + task_first as u64),
            )
        };
        map_spans(
            inputs,
            out_dtype,
            out,
            TIE_BLOCK,
            init,
            |(cols, vote, seen), _, blocks, o| {
                cols.fill(p, self.has_base, blocks, selecting);
                let keep = &mut vote.keep[..o.len()];
                if self.select_topk >= 1.0 {
                    keep.fill(u32::MAX);
                } else if self.select_topk <= 0.0 {
                    keep.fill(0);
                } else {
                    self.keep_mask(&cols.var[..o.len()], seen, keep);
                }
                vote.merge(p, cols, blocks[0], &self.w, o);
            },
        )
    }
}

/// The sign vote and weighted mean of [`element`] across one block of at most [`TIE_BLOCK`]
/// elements: per element the same operations in the same order (the f32 sums over the models
/// in model order, a rounding after each product and at the end), so the same bits, with the
/// loops over the elements vectorizable. A model that does not vote adds `+0.0` to the sums,
/// which leaves them unchanged: they start at `+0.0` and a sum of round-to-nearest additions
/// is `−0.0` only when every term is, so neither ever holds `−0.0`.
struct Vote {
    /// Per element: all ones when the element keeps its values, else 0.
    keep: Vec<u32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
    div: Vec<f32>,
    prod: Vec<f32>,
}

impl Vote {
    fn new() -> Vote {
        Vote {
            keep: vec![0; TIE_BLOCK],
            sum: vec![0.0; TIE_BLOCK],
            acc: vec![0.0; TIE_BLOCK],
            div: vec![0.0; TIE_BLOCK],
            prod: vec![0.0; TIE_BLOCK],
        }
    }

    /// `o[e] = element(p, base[e], [keep[e] ? τ_i[e] : 0 for each model i], w)`, the block's
    /// task-vector values in `cols` (last filled, overwritten) and its `keep` flags in
    /// `self.keep`.
    fn merge(&mut self, p: Precision, cols: &mut Cols, base: &[f32], w: &[f32], o: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { self.merge_avx2(p, cols, base, w, o) };
            return;
        }
        self.merge_inner(p, cols, base, w, o)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn merge_avx2(
        &mut self,
        p: Precision,
        cols: &mut Cols,
        base: &[f32],
        w: &[f32],
        o: &mut [f32],
    ) {
        self.merge_inner(p, cols, base, w, o)
    }

    #[inline(always)]
    fn merge_inner(
        &mut self,
        p: Precision,
        cols: &mut Cols,
        base: &[f32],
        w: &[f32],
        o: &mut [f32],
    ) {
        let len = o.len();
        let keep = &self.keep[..len];
        let sum = &mut self.sum[..len];
        sum.fill(std::iter::empty::<f32>().sum());
        for i in 0..cols.models {
            let t = &mut cols.tv[i * TIE_BLOCK..i * TIE_BLOCK + len];
            for ((t, k), s) in t.iter_mut().zip(keep).zip(sum.iter_mut()) {
                // A dropped value becomes +0.0 (the bits cleared), branch-free.
                *t = f32::from_bits(t.to_bits() & k);
                *s += *t;
            }
        }
        let acc = &mut self.acc[..len];
        let div = &mut self.div[..len];
        acc.fill(0.0);
        div.fill(0.0);
        let prod = &mut self.prod[..len];
        for (i, wi) in w.iter().enumerate().take(cols.models) {
            let t = &cols.tv[i * TIE_BLOCK..i * TIE_BLOCK + len];
            for (q, t) in prod.iter_mut().zip(t) {
                *q = t * wi;
            }
            p.round_slice(prod);
            let wb = wi.to_bits();
            for ((((a, d), q), t), s) in acc
                .iter_mut()
                .zip(div.iter_mut())
                .zip(prod.iter())
                .zip(t)
                .zip(sum.iter())
            {
                // `t != 0 && signum(t) == majority`, majority `+1` iff `s >= 0` (NaN: −1);
                // a model that does not vote adds +0.0.
                let up = *s >= 0.0;
                let votes = (up & (*t > 0.0)) | (!up & (*t < 0.0));
                let m = u32::from(votes).wrapping_neg();
                *a += f32::from_bits(q.to_bits() & m);
                *d += f32::from_bits(wb & m);
            }
        }
        p.round_slice(div);
        div.iter_mut().for_each(|d| *d = d.max(1e-6));
        p.round_slice(acc);
        for (a, d) in acc.iter_mut().zip(div.iter()) {
            *a /= d;
        }
        p.round_slice(acc);
        for ((o, a), b) in o.iter_mut().zip(acc.iter()).zip(base) {
            *o = b + a;
        }
        p.round_slice(o);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The block variances of [`Cols`] equal [`variance`] element by element, bit for bit,
    /// for 1 to 4 models, with and without a base, in every precision, over values that
    /// include signed zeros, ties, infinities, NaN and huge magnitudes (NaN compared as NaN).
    #[test]
    fn block_variances_equal_the_scalar_ones() {
        each_case(
            0x9e37_79b9_7f4a_7c15,
            TIE_BLOCK - 3,
            |p, models, has_base, views| {
                let len = views[0].len();
                let mut cols = Cols::new(models);
                cols.fill(p, has_base, views, true);
                let xs = if has_base { &views[1..] } else { views };
                for e in 0..len {
                    let vals: Vec<f32> = xs.iter().map(|x| p.round(x[e] - views[0][e])).collect();
                    for (i, v) in vals.iter().enumerate() {
                        assert_eq!(cols.tv(i, len)[e].to_bits(), v.to_bits());
                    }
                    let want = variance(p, &vals);
                    // A NaN's sign and payload after f64 arithmetic are not specified
                    // (the compiler may swap the operands of an addition); only NaN-ness
                    // is compared there.
                    let same = cols.var[e].to_bits() == want.to_bits()
                        || (cols.var[e].is_nan() && want.is_nan());
                    assert!(
                        same,
                        "{p:?} models {models} base {has_base} element {e}: {vals:?}"
                    );
                }
            },
        );
    }

    /// `k` blocks of `len` values of precision `p` in [−4, 4), one in seven a special value
    /// (signed zeros, ±1, infinities, NaN, huge magnitudes, a subnormal); `seed` advances.
    fn sample_blocks(p: Precision, k: usize, len: usize, seed: &mut u64) -> Vec<Vec<f32>> {
        let special = [
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            3e38,
            -3e38,
            1e-40,
        ];
        let mut next = || {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed
        };
        (0..k)
            .map(|_| {
                (0..len)
                    .map(|_| {
                        let r = next();
                        if r % 7 == 0 {
                            special[(r >> 8) as usize % special.len()]
                        } else {
                            p.round(((r >> 11) as f64 / (1u64 << 53) as f64 * 8.0 - 4.0) as f32)
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// The block vote of [`Vote::merge`] equals [`element`] element by element, bit for bit,
    /// for 1 to 4 models, with and without a base, in every precision, with elements kept and
    /// dropped, over weights that include 0, negative and tiny values.
    #[test]
    fn block_vote_equals_the_scalar_element() {
        each_case(
            0x2545_f491_4f6c_dd1d,
            TIE_BLOCK - 5,
            |p, models, has_base, views| {
                let len = views[0].len();
                let choices = [0.5f32, 0.0, -0.25, 1e-7, 0.3, 1.0];
                let w: Vec<f32> = (0..models)
                    .map(|i| p.round(choices[(i + models) % choices.len()]))
                    .collect();
                let mut cols = Cols::new(models);
                cols.fill(p, has_base, views, false);
                let tv: Vec<Vec<f32>> = (0..models).map(|i| cols.tv(i, len).to_vec()).collect();
                let mut vote = Vote::new();
                for (e, keep) in vote.keep[..len].iter_mut().enumerate() {
                    *keep = if e % 5 != 0 { u32::MAX } else { 0 };
                }
                let mut got = vec![0.0f32; len];
                vote.merge(p, &mut cols, views[0], &w, &mut got);
                for (e, g) in got.iter().enumerate() {
                    let vals: Vec<f32> = tv
                        .iter()
                        .map(|t| if e % 5 != 0 { t[e] } else { 0.0 })
                        .collect();
                    let want = element(p, views[0][e], &vals, &w);
                    let same = g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan());
                    assert!(same, "{p:?} models {models} base {has_base} element {e}");
                }
            },
        );
    }

    /// Runs `f(p, models, has_base, blocks)` for every precision, 1 to 4 models, with and
    /// without a base, on [`sample_blocks`] of `len` values (the base's block first).
    fn each_case(mut seed: u64, len: usize, mut f: impl FnMut(Precision, usize, bool, &[&[f32]])) {
        for p in [Precision::BF16, Precision::F16, Precision::F32] {
            for models in 1..=4 {
                for has_base in [false, true] {
                    let k = models + usize::from(has_base);
                    let blocks = sample_blocks(p, k, len, &mut seed);
                    let views: Vec<&[f32]> = blocks.iter().map(|b| b.as_slice()).collect();
                    f(p, models, has_base, &views);
                }
            }
        }
    }

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

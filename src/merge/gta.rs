//! Generalized task arithmetic (mergekit's `GeneralizedTaskArithmeticMerge`): task arithmetic,
//! TIES, breadcrumbs (± TIES), DARE (linear/TIES) and DELLA (linear/TIES). ALGORITHMS.md §5–§9.
//!
//! For one tensor, with `r(·)` the rounding to the compute [`Precision`]:
//! ```text
//! δ_i   = r(x_i − b)                               task vector
//! δ_i   ← sparsify(δ_i)                            (TIES / breadcrumbs / DARE / DELLA)
//! w_i   = r(weight_i);  wd_i = r(δ_i · w_i)
//! sign consensus: s = Σ wd_i (f32, in order); keep i iff sign(wd_i) = (s ≥ 0 ? +1 : −1)
//! mixed = r(Σ_kept wd_i);  div = r(Σ_kept w_i) (0 → 1)        with consensus
//! mixed = r(Σ wd_i);       div = r(Σ w_i)      (|·|<1e-8 → 1)  without
//! normalize: mixed = r(mixed / div);  λ ≠ 1: mixed = r(mixed · λ)
//! out   = r(b + mixed)
//! ```
//! Reductions accumulate in f32 in model order and round once, as torch does on CPU; with
//! bf16 inputs and the default (storage) precision this reproduces mergekit 0.1.5 bit for bit
//! wherever the selection is not a tie (conformance README).
//!
//! Selection is exact (no histograms): magnitudes are ranked by `(|δ|, index)` ascending, so
//! equal magnitudes keep the **higher** index first for top-k (TIES) and the band
//! `[n_bot, n − n_top)` for breadcrumbs. torch's sort is not stable, so mergekit may choose
//! other elements among equal magnitudes; the conformance tie rule accepts either.

use crate::merge::precision::{Precision, bf16_round};
use crate::merge::radix::Band;
use crate::merge::rng::{KeyedRng, threshold};
use crate::merge::sparsification::Sparsification;

/// Per-model parameters for one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelParams {
    pub weight: f64,
    pub density: f64,
    pub gamma: f64,
    pub epsilon: f64,
}

impl Default for ModelParams {
    fn default() -> Self {
        ModelParams {
            weight: 1.0,
            density: 1.0,
            gamma: 0.01,
            epsilon: 0.15,
        }
    }
}

/// Method-wide settings for one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    pub sparsification: Sparsification,
    pub consensus: bool,
    pub normalize: bool,
    pub rescale: bool,
    pub lambda: f64,
    pub precision: Precision,
    pub seed: u64,
    /// TIES / breadcrumbs selection per row of `row_len` instead of per tensor.
    pub per_row: bool,
}

impl Config {
    /// Whether sparsifying a model with these parameters changes nothing (then the whole merge
    /// is elementwise and may run chunk by chunk).
    pub fn sparsify_is_noop(&self, m: &ModelParams) -> bool {
        self.sparsification == Sparsification::None || m.density >= 1.0
    }
}

/// `δ = r(x − b)` into `out`.
pub fn task_vector(base: &[f32], x: &[f32], p: Precision, out: &mut [f32]) {
    #[inline(always)]
    fn with<R: Fn(f32) -> f32>(r: R, base: &[f32], x: &[f32], out: &mut [f32]) {
        for ((o, &b), &x) in out.iter_mut().zip(base).zip(x) {
            *o = r(x - b);
        }
    }
    // One loop per precision, so each is compiled (and vectorized) without the dispatch.
    crate::merge::simd::run(
        #[inline(always)]
        || match p {
            Precision::F32 => with(|v| v, base, x, out),
            Precision::BF16 => with(bf16_round, base, x, out),
            Precision::F16 => with(|v| Precision::F16.round(v), base, x, out),
        },
    )
}

/// Elementwise combination of (already sparsified) task vectors with the base.
/// `weights` are the rounded weights `r(w_i)`, one per delta.
pub fn combine(base: &[f32], deltas: &[&[f32]], weights: &[f32], cfg: &Config, out: &mut [f32]) {
    crate::merge::simd::run(
        #[inline(always)]
        || match cfg.precision {
            Precision::F32 => combine_with(|v| v, base, deltas, weights, cfg, out),
            Precision::BF16 => combine_with(bf16_round, base, deltas, weights, cfg, out),
            Precision::F16 => {
                combine_with(|v| Precision::F16.round(v), base, deltas, weights, cfg, out)
            }
        },
    )
}

/// Elements combined together (per model, then per element), so the inner loops run over
/// contiguous arrays and vectorize.
const COMBINE_TILE: usize = 64;

/// [`combine`] with the rounding `r` known at compile time. Per element, exactly as the
/// formula in the module docs: `wd_i = r(δ_i·w_i)`, `s = Σ wd_i` in model order from `Sum`'s
/// neutral element; with consensus the kept `wd_i` and `w_i` are summed from +0 (adding +0 for
/// the others changes nothing: such a sum is never −0), without it `mixed = r(s)`.
#[inline(always)]
fn combine_with<R: Fn(f32) -> f32 + Copy>(
    r: R,
    base: &[f32],
    deltas: &[&[f32]],
    weights: &[f32],
    cfg: &Config,
    out: &mut [f32],
) {
    const T: usize = COMBINE_TILE;
    let lambda = cfg.lambda as f32;
    let zero: f32 = std::iter::empty::<f32>().sum();
    let plain_div = {
        let d = r(weights.iter().sum::<f32>());
        if d.abs() < 1e-8 { 1.0 } else { d }
    };
    let mut wd = vec![[0.0f32; T]; deltas.len()];
    for (t, o_tile) in out.chunks_mut(T).enumerate() {
        let e0 = t * T;
        let len = o_tile.len();
        let mut s = [zero; T];
        for ((d, &w), wdi) in deltas.iter().zip(weights).zip(wd.iter_mut()) {
            let d = &d[e0..e0 + len];
            for e in 0..len {
                let v = r(d[e] * w);
                wdi[e] = v;
                s[e] += v;
            }
        }
        let mut mixed = [0.0f32; T];
        let mut div = [plain_div; T];
        if cfg.consensus {
            let mut acc = [0.0f32; T];
            let mut dv = [0.0f32; T];
            for (&w, wdi) in weights.iter().zip(&wd) {
                for e in 0..len {
                    let x = wdi[e];
                    // x ≠ 0 and sign(x) = (s ≥ 0 ? + : −); NaN is never kept.
                    let keep = if s[e] >= 0.0 { x > 0.0 } else { x < 0.0 };
                    acc[e] += if keep { x } else { 0.0 };
                    dv[e] += if keep { w } else { 0.0 };
                }
            }
            for e in 0..len {
                mixed[e] = r(acc[e]);
                let d = r(dv[e]);
                div[e] = if d == 0.0 { 1.0 } else { d };
            }
        } else {
            for e in 0..len {
                mixed[e] = r(s[e]);
            }
        }
        // One step at a time across the tile (the same operations per element as one loop
        // with the two conditions inside, but each loop vectorizes).
        let mixed = &mut mixed[..len];
        if cfg.normalize {
            for (x, d) in mixed.iter_mut().zip(&div) {
                *x = r(*x / d);
            }
        }
        if cfg.lambda != 1.0 {
            for x in mixed.iter_mut() {
                *x = r(*x * lambda);
            }
        }
        for ((o, b), x) in o_tile.iter_mut().zip(&base[e0..e0 + len]).zip(mixed.iter()) {
            *o = r(b + x);
        }
    }
}

/// The former per-element [`combine`], kept as the reference the tiled one is tested against.
#[cfg(test)]
fn combine_reference(
    base: &[f32],
    deltas: &[&[f32]],
    weights: &[f32],
    cfg: &Config,
    out: &mut [f32],
) {
    let p = cfg.precision;
    let lambda = cfg.lambda as f32;
    let plain_div = {
        let d = p.round(weights.iter().sum::<f32>());
        if d.abs() < 1e-8 { 1.0 } else { d }
    };
    let mut wd = vec![0.0f32; deltas.len()];
    for (e, o) in out.iter_mut().enumerate() {
        for (i, d) in deltas.iter().enumerate() {
            wd[i] = p.round(d[e] * weights[i]);
        }
        let (mixed, div) = if cfg.consensus {
            let s: f32 = wd.iter().sum();
            let majority = if s >= 0.0 { 1.0f32 } else { -1.0 };
            let mut acc = 0.0f32;
            let mut div = 0.0f32;
            for (x, w) in wd.iter().zip(weights) {
                if *x != 0.0 && x.signum() == majority {
                    acc += x;
                    div += w;
                }
            }
            let div = p.round(div);
            (p.round(acc), if div == 0.0 { 1.0 } else { div })
        } else {
            (p.round(wd.iter().sum::<f32>()), plain_div)
        };
        let mut mixed = mixed;
        if cfg.normalize {
            mixed = p.round(mixed / div);
        }
        if cfg.lambda != 1.0 {
            mixed = p.round(mixed * lambda);
        }
        *o = p.round(base[e] + mixed);
    }
}

/// The whole elementwise path for one block: `blocks[0]` is the base, `blocks[1..]` the models.
/// Valid only when every model's sparsification is a no-op ([`Config::sparsify_is_noop`]).
pub fn elementwise(blocks: &[&[f32]], weights: &[f32], cfg: &Config, out: &mut [f32]) {
    let Some((base, xs)) = blocks.split_first() else {
        return;
    };
    let deltas: Vec<Vec<f32>> = xs
        .iter()
        .map(|x| {
            let mut d = vec![0.0; out.len()];
            task_vector(base, x, cfg.precision, &mut d);
            d
        })
        .collect();
    let refs: Vec<&[f32]> = deltas.iter().map(|d| d.as_slice()).collect();
    combine(base, &refs, weights, cfg, out);
}

/// The elementwise path of a model-wide selection (`scope: "model"`): each task vector keeps
/// the magnitudes inside its model's [`Band`] (thresholds from a pre-pass over the whole
/// model), then the usual combination. `blocks[0]` is the base.
pub fn elementwise_banded(
    blocks: &[&[f32]],
    weights: &[f32],
    bands: &[Band],
    cfg: &Config,
    out: &mut [f32],
) {
    let Some((base, xs)) = blocks.split_first() else {
        return;
    };
    let deltas: Vec<Vec<f32>> = xs
        .iter()
        .zip(bands)
        .map(|(x, band)| {
            let mut d = vec![0.0; out.len()];
            task_vector(base, x, cfg.precision, &mut d);
            band.apply(&mut d);
            d
        })
        .collect();
    let refs: Vec<&[f32]> = deltas.iter().map(|d| d.as_slice()).collect();
    combine(base, &refs, weights, cfg, out);
}

/// Keep the elements whose ascending rank by `(|δ|, index)` lies in `lo..hi`; zero the rest.
/// Exact: two selections on a copy of the magnitudes, then one pass in index order.
pub fn keep_rank_band(delta: &mut [f32], lo: usize, hi: usize) {
    let n = delta.len();
    let hi = hi.min(n);
    if lo >= hi {
        delta.fill(0.0);
        return;
    }
    if lo == 0 && hi == n {
        return;
    }
    let mut mags: Vec<f32> = delta.iter().map(|x| x.abs()).collect();
    let cmp = |a: &f32, b: &f32| a.total_cmp(b);
    let low = *mags.select_nth_unstable_by(lo, cmp).1;
    let high = *mags.select_nth_unstable_by(hi - 1, cmp).1;
    let mut less_low = 0usize;
    let mut less_high = 0usize;
    for &m in &mags {
        if m.total_cmp(&low).is_lt() {
            less_low += 1;
        }
        if m.total_cmp(&high).is_lt() {
            less_high += 1;
        }
    }
    drop(mags);
    let (mut seen_low, mut seen_high) = (0usize, 0usize);
    for x in delta.iter_mut() {
        let m = x.abs();
        let keep = if m.total_cmp(&low).is_lt() || m.total_cmp(&high).is_gt() {
            false
        } else if m.total_cmp(&low).is_gt() && m.total_cmp(&high).is_lt() {
            true
        } else {
            let rank = if m.total_cmp(&low).is_eq() {
                seen_low += 1;
                less_low + seen_low - 1
            } else {
                seen_high += 1;
                less_high + seen_high - 1
            };
            (lo..hi).contains(&rank)
        };
        if !keep {
            *x = 0.0;
        }
    }
}

/// mergekit's `magnitude` (TIES trim): keep `max(1, ⌊density·n⌋)` largest magnitudes.
pub fn magnitude(delta: &mut [f32], density: f64) {
    if density >= 1.0 {
        return;
    }
    let (lo, hi) = magnitude_band(density, delta.len());
    keep_rank_band(delta, lo, hi);
}

/// The ascending-rank band [`magnitude`] keeps of `n` elements (`density < 1`).
pub fn magnitude_band(density: f64, n: usize) -> (usize, usize) {
    let k = ((density * n as f64) as usize).max(1).min(n);
    (n - k, n)
}

/// The ascending-rank band [`magnitude_outliers`] keeps of `n` elements (`density < 1`).
pub fn outliers_band(density: f64, gamma: f64, n: usize) -> (usize, usize) {
    let n = n as i64;
    let target = (density * n as f64) as i64;
    let mut n_top = (gamma * n as f64) as i64;
    let mut n_bot = n - target - n_top;
    if n_bot < 0 {
        n_top += n_bot;
        n_bot = 0;
    }
    (n_bot as usize, (n - n_top) as usize)
}

/// mergekit's `magnitude_outliers` (breadcrumbs): drop the `⌊gamma·n⌋` largest and the
/// smallest down to `⌊density·n⌋` kept. When `⌊gamma·n⌋ = 0` nothing large is dropped and the
/// `⌊density·n⌋` largest are kept: that is what mergekit 0.1.5 does (the conformance pack keeps
/// 57 of 64 at density 0.9, gamma 0.01), unlike the older slice `[n_bot:-0]` that kept nothing
/// (ALGORITHMS.md §20.5).
pub fn magnitude_outliers(delta: &mut [f32], density: f64, gamma: f64) {
    if density >= 1.0 {
        return;
    }
    let (lo, hi) = outliers_band(density, gamma, delta.len());
    keep_rank_band(delta, lo, hi);
}

/// DARE: keep each element with probability `r(density)`.
pub fn random(delta: &mut [f32], density: f64, p: Precision, rng: &KeyedRng) {
    random_at(delta, 0, density, p, rng)
}

/// [`random`] on the elements `first..` of a tensor (the draws are keyed by element index).
#[inline]
pub fn random_at(delta: &mut [f32], first: u64, density: f64, p: Precision, rng: &KeyedRng) {
    if density >= 1.0 {
        return;
    }
    let t = threshold(p.scalar(density) as f64);
    // Branch-free: a kept/dropped branch at probability ~½ mispredicts every other element.
    // The draws multiply 64-bit lanes: vectorized with AVX-512 DQ where the CPU has it.
    crate::merge::simd::run_wide(|| {
        for (e, x) in delta.iter_mut().enumerate() {
            let keep = rng.bits(first + e as u64) < t;
            *x = f32::from_bits(x.to_bits() & u32::from(keep).wrapping_neg());
        }
    })
}

/// mergekit's L1 rescale: `masked · r(‖δ‖₁ / ‖masked‖₁)` with norms rounded to the precision,
/// skipped when either norm is below 1e-7.
pub fn rescale_l1(original_l1: f32, masked: &mut [f32], p: Precision) {
    let after = p.round(masked.iter().map(|x| x.abs() as f64).sum::<f64>() as f32);
    if original_l1 < 1e-7 || after < 1e-7 {
        return;
    }
    let scale = p.round(original_l1 / after);
    for x in masked.iter_mut() {
        *x = p.round(*x * scale);
    }
}

/// Sparsify one task vector in place (with rescale when configured).
pub fn sparsify(delta: &mut [f32], m: &ModelParams, cfg: &Config, row_len: usize, rng: &KeyedRng) {
    if cfg.sparsify_is_noop(m) {
        return;
    }
    let p = cfg.precision;
    let l1 = p.round(delta.iter().map(|x| x.abs() as f64).sum::<f64>() as f32);
    match cfg.sparsification {
        Sparsification::None => return,
        Sparsification::Magnitude if cfg.per_row => delta
            .chunks_mut(row_len.max(1))
            .for_each(|r| magnitude(r, m.density)),
        Sparsification::MagnitudeOutliers if cfg.per_row => delta
            .chunks_mut(row_len.max(1))
            .for_each(|r| magnitude_outliers(r, m.density, m.gamma)),
        Sparsification::Magnitude => magnitude(delta, m.density),
        Sparsification::MagnitudeOutliers => magnitude_outliers(delta, m.density, m.gamma),
        Sparsification::Random => random(delta, m.density, p, rng),
        Sparsification::DellaMagprune => {
            crate::merge::della::della(delta, row_len, m.density, m.epsilon, p, rng)
        }
    }
    if cfg.rescale {
        rescale_l1(l1, delta, p);
    }
}

/// The whole-tensor path: `xs` are the models (base excluded), `models` their parameters for
/// this tensor, `row_len` the last-dimension length (DELLA's rows), `tensor` the name keying
/// the generator. Memory: one f32 task vector per model plus the output.
pub fn merge_tensor(
    base: &[f32],
    xs: &[&[f32]],
    models: &[ModelParams],
    cfg: &Config,
    row_len: usize,
    tensor: &str,
    out: &mut [f32],
) {
    let p = cfg.precision;
    let mut deltas = Vec::with_capacity(xs.len());
    for (i, (x, m)) in xs.iter().zip(models).enumerate() {
        let mut d = vec![0.0f32; base.len()];
        task_vector(base, x, p, &mut d);
        let rng = KeyedRng::new(cfg.seed, i, tensor);
        sparsify(&mut d, m, cfg, row_len, &rng);
        deltas.push(d);
    }
    let weights: Vec<f32> = models.iter().map(|m| p.scalar(m.weight)).collect();
    let refs: Vec<&[f32]> = deltas.iter().map(|d| d.as_slice()).collect();
    combine(base, &refs, &weights, cfg, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(s: Sparsification, consensus: bool, normalize: bool) -> Config {
        Config {
            sparsification: s,
            consensus,
            normalize,
            rescale: false,
            lambda: 1.0,
            precision: Precision::F32,
            seed: 1,
            per_row: false,
        }
    }

    fn mp(weight: f64, density: f64) -> ModelParams {
        ModelParams {
            weight,
            density,
            ..Default::default()
        }
    }

    fn run(base: &[f32], xs: &[&[f32]], ms: &[ModelParams], c: &Config) -> Vec<f32> {
        let mut out = vec![0.0; base.len()];
        merge_tensor(base, xs, ms, c, base.len(), "t", &mut out);
        out
    }

    #[test]
    fn task_arithmetic_by_hand() {
        let b = [1.0f32, 2.0, 3.0, 4.0];
        let x1 = [2.0f32, 2.0, 1.0, 4.5];
        let x2 = [1.0f32, 4.0, 3.0, 3.5];
        let c = cfg(Sparsification::None, false, false);
        let out = run(&b, &[&x1, &x2], &[mp(0.5, 1.0), mp(0.25, 1.0)], &c);
        assert_eq!(out, vec![1.5, 2.5, 2.0, 4.125]);
        // λ = 0 gives the base exactly.
        let c0 = Config { lambda: 0.0, ..c };
        assert_eq!(run(&b, &[&x1, &x2], &[mp(0.5, 1.0), mp(0.25, 1.0)], &c0), b);
        // One model with itself as base gives the base.
        assert_eq!(run(&b, &[&b], &[mp(0.7, 1.0)], &c), b);
    }

    #[test]
    fn ties_by_hand() {
        // Deltas: m1 = [3, -1, 2, -4], m2 = [-2, -2, 1, 1]; density 0.5 keeps 2 each:
        // m1 → [3, 0, 0, -4], m2 → [-2, -2, 0, 0] (|−2| ties: the higher index ranks higher,
        // both kept here as the two largest).
        let b = [0.0f32; 4];
        let x1 = [3.0f32, -1.0, 2.0, -4.0];
        let x2 = [-2.0f32, -2.0, 1.0, 1.0];
        let c = cfg(Sparsification::Magnitude, true, true);
        let out = run(&b, &[&x1, &x2], &[mp(1.0, 0.5), mp(1.0, 0.5)], &c);
        // e0: 3 − 2 = 1 ≥ 0 → + : only m1 → 3/1; e1: −2 → only m2 → −2; e2: 0 → 0; e3: −4.
        assert_eq!(out, vec![3.0, -2.0, 0.0, -4.0]);
        // TIES with density 1 and one model equals task arithmetic (normalize off).
        let c1 = Config {
            normalize: false,
            ..c
        };
        let ta = cfg(Sparsification::None, false, false);
        assert_eq!(
            run(&b, &[&x1], &[mp(0.5, 1.0)], &c1),
            run(&b, &[&x1], &[mp(0.5, 1.0)], &ta)
        );
    }

    #[test]
    fn band_selection_is_exact_with_ties() {
        let mut d = vec![1.0f32, -1.0, 1.0, 2.0, -3.0, 1.0];
        keep_rank_band(&mut d, 2, 5); // ranks by (|δ|, idx): 0,1,2,5 are the 1s → keep idx 2,5,3
        assert_eq!(d, vec![0.0, 0.0, 1.0, 2.0, 0.0, 1.0]);
        let mut t = vec![5.0f32, 1.0, 5.0, 5.0];
        magnitude(&mut t, 0.5);
        assert_eq!(t, vec![0.0, 0.0, 5.0, 5.0]);
        let mut z = vec![1.0f32; 10];
        magnitude(&mut z, 0.01); // max(1, 0) = 1 kept
        assert_eq!(z.iter().filter(|x| **x != 0.0).count(), 1);
    }

    #[test]
    fn breadcrumbs_as_mergekit() {
        // 100 elements 1..=100: density 0.9, gamma 0.01 → n_top 1, n_bot 9: keep 10..=99.
        let mut d: Vec<f32> = (1..=100).map(|x| x as f32).collect();
        magnitude_outliers(&mut d, 0.9, 0.01);
        let kept: Vec<f32> = d.iter().copied().filter(|x| *x != 0.0).collect();
        assert_eq!(kept, (10..=99).map(|x| x as f32).collect::<Vec<_>>());
        // Fewer than 1/gamma elements: no outlier dropped, the 45 largest kept (mergekit 0.1.5).
        let mut s: Vec<f32> = (1..=50).map(|x| x as f32).collect();
        magnitude_outliers(&mut s, 0.9, 0.01);
        let kept: Vec<f32> = s.iter().copied().filter(|x| *x != 0.0).collect();
        assert_eq!(kept, (6..=50).map(|x| x as f32).collect::<Vec<_>>());
    }

    #[test]
    fn per_row_selection() {
        // Two rows of 100: row 0 holds 1..=100, row 1 holds 1000 + 1..=100. Per tensor, the
        // band would keep mostly row 1; per row, each row keeps its own 10..=99.
        let mut d: Vec<f32> = (1..=100)
            .map(|x| x as f32)
            .chain((1..=100).map(|x| 1000.0 + x as f32))
            .collect();
        let c = Config {
            per_row: true,
            ..cfg(Sparsification::MagnitudeOutliers, false, false)
        };
        let m = ModelParams {
            weight: 1.0,
            density: 0.9,
            gamma: 0.01,
            epsilon: 0.15,
        };
        sparsify(&mut d, &m, &c, 100, &KeyedRng::new(0, 0, "t"));
        let kept0: Vec<f32> = d[..100].iter().copied().filter(|x| *x != 0.0).collect();
        assert_eq!(kept0, (10..=99).map(|x| x as f32).collect::<Vec<_>>());
        assert_eq!(d[100..].iter().filter(|x| **x != 0.0).count(), 90);
    }

    #[test]
    fn dare_keeps_density_and_rescales_l1() {
        let n = 100_000;
        let b = vec![0.0f32; n];
        let x: Vec<f32> = (0..n).map(|i| ((i % 7) as f32 - 3.0) * 0.25).collect();
        for density in [0.3, 0.7] {
            let mut c = cfg(Sparsification::Random, false, false);
            c.rescale = true;
            let out = run(&b, &[&x], &[mp(1.0, density)], &c);
            let nz_in = x.iter().filter(|v| **v != 0.0).count() as f64;
            let kept = out.iter().filter(|v| **v != 0.0).count() as f64;
            let frac = kept / nz_in;
            let sd = (density * (1.0 - density) / nz_in).sqrt();
            assert!(
                (frac - density).abs() < 4.0 * sd,
                "density {density}: {frac}"
            );
            let l1 = |v: &[f32]| v.iter().map(|a| a.abs() as f64).sum::<f64>();
            assert!((l1(&out) / l1(&x) - 1.0).abs() < 1e-5);
            // Same seed, same bytes; another seed, another mask.
            assert_eq!(out, run(&b, &[&x], &[mp(1.0, density)], &c));
            let c2 = Config { seed: 2, ..c };
            assert_ne!(out, run(&b, &[&x], &[mp(1.0, density)], &c2));
        }
    }

    #[test]
    fn della_keep_probability_follows_rank() {
        let n = 4096;
        let b = vec![0.0f32; n];
        let x: Vec<f32> = (1..=n).map(|i| i as f32).collect();
        let c = cfg(Sparsification::DellaMagprune, false, false);
        let m = ModelParams {
            weight: 1.0,
            density: 0.5,
            gamma: 0.0,
            epsilon: 0.4,
        };
        let out = run(&b, &[&x], &[m], &c);
        let low = out[..n / 4].iter().filter(|v| **v != 0.0).count() as f64 / (n / 4) as f64;
        let high = out[3 * n / 4..].iter().filter(|v| **v != 0.0).count() as f64 / (n / 4) as f64;
        // Expected keep rates: ≈ 0.1 + 0.8·0.125 = 0.2 and ≈ 0.8.
        assert!((low - 0.2).abs() < 0.05, "{low}");
        assert!((high - 0.8).abs() < 0.05, "{high}");
    }

    /// The tiled combination equals the per-element one bit for bit (signed zeros, NaN, ±∞,
    /// ties of the sign vote, every precision, with and without consensus / normalize / λ).
    #[test]
    fn tiled_combine_matches_the_reference() {
        let mut s = 0x0123_4567_89ab_cdefu64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let special = [
            0.0f32,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-40,
            -1e-40,
        ];
        for round in 0..200 {
            let n = 1 + (next() % 300) as usize;
            let m = 1 + (next() % 4) as usize;
            let p = [Precision::BF16, Precision::F32, Precision::F16][round % 3];
            let mut val = || {
                let r = next();
                if r % 5 == 0 {
                    special[(r >> 8) as usize % special.len()]
                } else {
                    p.round(((r >> 20) % 17) as f32 * 0.25 - 2.0)
                }
            };
            let base: Vec<f32> = (0..n).map(|_| val()).collect();
            let ds: Vec<Vec<f32>> = (0..m).map(|_| (0..n).map(|_| val()).collect()).collect();
            let weights: Vec<f32> = (0..m).map(|_| val()).collect();
            let refs: Vec<&[f32]> = ds.iter().map(|d| d.as_slice()).collect();
            let c = Config {
                sparsification: Sparsification::None,
                consensus: round % 2 == 0,
                normalize: round % 4 < 2,
                rescale: false,
                lambda: if round % 5 == 0 { 0.7 } else { 1.0 },
                precision: p,
                seed: 0,
                per_row: false,
            };
            let mut a = vec![0.0f32; n];
            let mut b = vec![0.0f32; n];
            combine(&base, &refs, &weights, &c, &mut a);
            combine_reference(&base, &refs, &weights, &c, &mut b);
            // NaN's sign and payload are not kept by the compiler (LLVM may commute an add):
            // any NaN equals any NaN here; every other value bit for bit.
            let bits = |v: &[f32]| {
                v.iter()
                    .map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() })
                    .collect::<Vec<_>>()
            };
            assert_eq!(bits(&a), bits(&b), "round {round}");
        }
    }

    #[test]
    fn bf16_rounds_every_step() {
        let p = Precision::BF16;
        let c = Config {
            precision: p,
            ..cfg(Sparsification::None, false, false)
        };
        let b = [1.0f32];
        let x = [1.0f32 + 2f32.powi(-7)];
        // δ = 2^-7; w = r(0.3) = 0.30078125; wd = r(2^-7·0.30078125) = 0.00234985…; out r(1+wd).
        let out = run(&b, &[&x], &[mp(0.3, 1.0)], &c);
        let wd = p.round(2f32.powi(-7) * 0.30078125);
        assert_eq!(out[0], p.round(1.0 + wd));
    }
}

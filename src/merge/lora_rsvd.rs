//! A randomized truncated SVD for `lora_extract` when the rank is far below the matrix's
//! dimensions (Halko, Martinsson & Tropp 2011, "Finding structure with randomness"), with an
//! a-posteriori accuracy check; [`truncated`] falls back to the full SVD
//! ([`crate::merge::lora_svd::dense_svd`]) whenever the check cannot vouch for the result.
//!
//! **Range finder**: `k = r + OVERSAMPLE` Gaussian probes `Ω` (a fixed seed: the same input
//! gives the same factors), `Q = orth(M·Ω)`, then `POWER_ITERATIONS` rounds of subspace
//! iteration `Q = orth(M·orth(Mᵀ·Q))`; the Ritz triplets come from the SVD of the `k × n`
//! matrix `QᵀM = U_b·S·Vᵀ`, `U = Q·U_b`. Cost `O(m·n·k)` per round instead of `O(m·n·min(m, n))`.
//!
//! **Check** (every quantity computed, none assumed): the result for rank `r` is accepted when
//! a bound on `‖P̂ − P‖_F`, `P̂ = Û_r·Ŝ_r·V̂_rᵀ` and `P` the exact truncated SVD's product,
//! is at most `TOLERANCE·‖P̂‖_F`.
//! - `e = ‖M − Q·(QᵀM)‖_F ≥ ‖(I − QQᵀ)M‖₂`, formed block by block of rows (no cancellation).
//!   By Weyl, each true `σ_i ∈ [ŝ_i, ŝ_i + e]`.
//! - For a cut `j ≤ r`: the Ritz residuals `R_j = ‖M·V̂_j − Û_j·Ŝ_j‖_F² + ‖Mᵀ·Û_j − V̂_j·Ŝ_j‖_F²`
//!   (square-rooted) and the gap `δ_j = ŝ_j − (ŝ_{j+1} + e)` bound the subspace angles by
//!   Wedin's theorem, `‖sin Θ‖_F ≤ R_j/δ_j`, so the top-`j` parts differ by at most
//!   `√2·(ŝ_1 + e)·R_j/δ_j + R_j`; the triplets `j+1..r` add at most
//!   `√(Σ ŝ_i²) + √(Σ (ŝ_i + e)²)`. The bound is the smallest over `j` (a spectrum whose tail
//!   below the cut is noise passes at the cut above the noise).
//! - With `sv_epsilon`, the rank (the count of singular values above it) must be certain:
//!   no `ŝ_i ≤ ε < ŝ_i + e`.
//!
//! A spectrum with a clear gap at or below `r` (a LoRA folded into a model, a low-rank task
//! vector plus noise) passes; a flat one (a random full-rank delta, a slowly decaying
//! spectrum, where the best rank-`r` subspace is barely determined) fails and takes the full SVD.

use faer::{Mat, MatRef};

use crate::merge::lora_svd::{Svd, SvdFailed, dense_svd, finish};
use crate::merge::rng::KeyedRng;

/// Probes beyond the rank (Halko et al. recommend 5–10).
pub const OVERSAMPLE: usize = 10;
/// Rounds of subspace iteration.
pub const POWER_ITERATIONS: usize = 4;
/// Relative Frobenius bound the randomized product must meet against the exact one.
pub const TOLERANCE: f64 = 1e-3;
/// Rows of the residual formed at a time.
const RESIDUAL_ROWS: usize = 512;
/// The randomized route is tried when `2·(r + OVERSAMPLE) ≤ min(m, n)`.
pub fn eligible(m: usize, n: usize, r: usize) -> bool {
    r > 0 && 2 * (r + OVERSAMPLE) <= m.min(n)
}

/// Which routine produced a truncated SVD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The randomized range finder, its check passed.
    Randomized,
    /// The full thin SVD (not eligible, or the check failed).
    Full,
}

/// The truncated SVD that `mergekit-extract-lora` takes of an `m × n` task vector `t`
/// (row-major): up to `max_rank` triplets, then with `sv_epsilon > 0` only those above it.
/// Randomized when [`eligible`] and its check passes, else the full SVD.
pub fn truncated(
    t: &[f32],
    m: usize,
    n: usize,
    max_rank: usize,
    sv_epsilon: f64,
) -> Result<(Svd, Route), SvdFailed> {
    let max_rank = max_rank.min(m.min(n));
    if eligible(m, n, max_rank) {
        if !t.iter().all(|v| v.is_finite()) {
            return Err(SvdFailed);
        }
        let mat = Mat::from_fn(m, n, |i, j| t[i * n + j] as f64);
        if let Some(svd) = randomized(mat.as_ref(), max_rank, sv_epsilon)? {
            return Ok((svd, Route::Randomized));
        }
    }
    let svd = dense_svd(t, m, n, max_rank)?;
    let rank = if sv_epsilon > 0.0 {
        svd.s.iter().filter(|s| **s > sv_epsilon).count()
    } else {
        svd.rank()
    };
    Ok((svd.truncate(rank), Route::Full))
}

/// `n × k` standard normal entries from `rng` (Box–Muller on its uniforms).
fn gaussian(n: usize, k: usize, rng: &KeyedRng) -> Mat<f64> {
    Mat::from_fn(n, k, |i, j| {
        let e = 2 * (i * k + j) as u64;
        let u1 = 1.0 - rng.uniform(e); // (0, 1]
        let u2 = rng.uniform(e + 1);
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    })
}

fn orth(y: MatRef<'_, f64>) -> Mat<f64> {
    y.qr().compute_thin_Q()
}

/// The randomized SVD of `mat`, `Some` when its check passes (see the module's text), truncated
/// to its rank (`max_rank`, or the count above `sv_epsilon`).
fn randomized(
    mat: MatRef<'_, f64>,
    max_rank: usize,
    sv_epsilon: f64,
) -> Result<Option<Svd>, SvdFailed> {
    let (m, n) = (mat.nrows(), mat.ncols());
    let k = (max_rank + OVERSAMPLE).min(m.min(n));
    let omega = gaussian(n, k, &KeyedRng::new(0, 0, "lora_extract.range"));
    let mut q = orth((mat * omega.as_ref()).as_ref());
    for _ in 0..POWER_ITERATIONS {
        let z = orth((mat.transpose() * q.as_ref()).as_ref());
        q = orth((mat * z.as_ref()).as_ref());
    }
    let small = q.as_ref().transpose() * mat; // k × n
    let svd = small.thin_svd().map_err(|_| SvdFailed)?;
    let s: Vec<f64> = (0..k).map(|i| svd.S().column_vector()[i]).collect();
    if s.iter().any(|x| !x.is_finite()) {
        return Err(SvdFailed);
    }
    let u = q.as_ref() * svd.U();
    let v = svd.V().to_owned();
    // e = ‖(I − QQᵀ)M‖_F ≥ ‖(I − QQᵀ)M‖₂.
    let mut e2 = 0f64;
    for start in (0..m).step_by(RESIDUAL_ROWS) {
        let h = RESIDUAL_ROWS.min(m - start);
        let rest = mat.subrows(start, h) - q.as_ref().subrows(start, h) * small.as_ref();
        let norm = rest.norm_l2();
        e2 += norm * norm;
    }
    let e = e2.sqrt();
    let mut rank = max_rank;
    if sv_epsilon > 0.0 {
        if s[..max_rank]
            .iter()
            .any(|x| *x <= sv_epsilon && sv_epsilon < x + e)
        {
            return Ok(None);
        }
        rank = s[..max_rank].iter().filter(|x| **x > sv_epsilon).count();
    }
    let out = finish(&u, &s, &v).truncate(rank);
    if rank == 0 || accurate(mat, &u, &s, &v, rank, e) {
        Ok(Some(out))
    } else {
        Ok(None)
    }
}

/// The check of the module's text for the top `r` Ritz triplets (`r < s.len()`).
fn accurate(mat: MatRef<'_, f64>, u: &Mat<f64>, s: &[f64], v: &Mat<f64>, r: usize, e: f64) -> bool {
    let (ur, vr) = (u.as_ref().subcols(0, r), v.as_ref().subcols(0, r));
    let left = mat * vr; // M·V̂_r, m × r
    let right = mat.transpose() * ur; // Mᵀ·Û_r, n × r
    // Per triplet i: ‖M·v̂_i − ŝ_i·û_i‖² + ‖Mᵀ·û_i − ŝ_i·v̂_i‖².
    let res: Vec<f64> = (0..r)
        .map(|i| {
            let a: f64 = (0..mat.nrows())
                .map(|row| (left[(row, i)] - s[i] * ur[(row, i)]).powi(2))
                .sum();
            let b: f64 = (0..mat.ncols())
                .map(|col| (right[(col, i)] - s[i] * vr[(col, i)]).powi(2))
                .sum();
            a + b
        })
        .collect();
    let norm = s[..r].iter().map(|x| x * x).sum::<f64>().sqrt();
    product_bound(s, &res, r, e) <= TOLERANCE * norm
}

/// The smallest bound over the cuts `j = 1..=r` on `‖P̂_r − P_r‖_F` (see the module's text),
/// from the Ritz values `s` (at least `r + 1`), the squared residuals `res` of the first `r`
/// triplets and `e ≥ ‖(I − QQᵀ)M‖₂`; infinite when no cut has a positive gap.
fn product_bound(s: &[f64], res: &[f64], r: usize, e: f64) -> f64 {
    let top = s[0] + e;
    let mut best = f64::INFINITY;
    let mut res_sum = 0.0;
    for j in 1..=r {
        res_sum += res[j - 1];
        let gap = s[j - 1] - (s[j] + e);
        if gap <= 0.0 {
            continue;
        }
        let tail_hat = s[j..r].iter().map(|x| x * x).sum::<f64>().sqrt();
        let tail_up = s[j..r]
            .iter()
            .map(|x| (x + e) * (x + e))
            .sum::<f64>()
            .sqrt();
        // `+ R_j`: `Û_j·Ŝ_j·V̂_jᵀ` is `Π̂_j·M` up to the residual `Mᵀ·Û_j − V̂_j·Ŝ_j`.
        let r_j = res_sum.sqrt();
        let bound = std::f64::consts::SQRT_2 * top * r_j / gap + r_j + tail_hat + tail_up;
        best = best.min(bound);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product(svd: &Svd) -> Vec<f64> {
        let p = svd.rank();
        let mut out = vec![0f64; svd.m * svd.n];
        for i in 0..svd.m {
            for j in 0..svd.n {
                out[i * svd.n + j] = (0..p)
                    .map(|k| svd.u[i * p + k] * svd.s[k] * svd.v[j * p + k])
                    .sum();
            }
        }
        out
    }

    fn rel_frobenius(a: &[f64], b: &[f64]) -> f64 {
        let d: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
        let n: f64 = b.iter().map(|y| y * y).sum();
        (d / n).sqrt()
    }

    /// `m × n`: a rank-`rank` signal with singular values `1, 0.9, …` plus Gaussian noise of
    /// standard deviation `noise`.
    fn low_rank_plus_noise(m: usize, n: usize, rank: usize, noise: f64) -> Vec<f32> {
        let g = |rows, cols, name| gaussian(rows, cols, &KeyedRng::new(7, 0, name));
        let (l, r) = (
            orth(g(m, rank, "l").as_ref()),
            orth(g(n, rank, "r").as_ref()),
        );
        let z = g(m, n, "z");
        (0..m * n)
            .map(|x| {
                let (i, j) = (x / n, x % n);
                let signal: f64 = (0..rank)
                    .map(|k| (1.0 - 0.1 * k as f64) * l[(i, k)] * r[(j, k)])
                    .sum();
                (signal + noise * z[(i, j)]) as f32
            })
            .collect()
    }

    #[test]
    fn a_gap_takes_the_randomized_route_and_matches_the_full_svd() {
        let (m, n) = (200, 150);
        let t = low_rank_plus_noise(m, n, 6, 1e-4);
        let quiet = low_rank_plus_noise(m, n, 6, 1e-7);
        // Cut at the gap; above it when the tail is at f32 rounding level: both certified.
        for (r, t) in [(6, &t), (12, &quiet)] {
            let (fast, route) = truncated(t, m, n, r, 0.0).unwrap();
            assert_eq!(route, Route::Randomized, "r={r}");
            assert_eq!(fast.rank(), r);
            let full = dense_svd(t, m, n, r).unwrap();
            let err = rel_frobenius(&product(&fast), &product(&full));
            assert!(err <= TOLERANCE, "r={r}: {err}");
            for (a, b) in fast.s.iter().zip(&full.s) {
                assert!((a - b).abs() <= 1e-6, "r={r}: {a} vs {b}");
            }
        }
        // Above the gap with a noise tail the exact and randomized products may differ by
        // more than the tolerance there (the noise directions are not determined): refused.
        assert_eq!(truncated(&t, m, n, 12, 0.0).unwrap().1, Route::Full);
        // sv_epsilon between the signal and the noise: the rank is the signal's, certified.
        let (fast, route) = truncated(&t, m, n, 12, 0.05).unwrap();
        assert_eq!((route, fast.rank()), (Route::Randomized, 6));
    }

    #[test]
    fn a_flat_spectrum_falls_back_to_the_full_svd() {
        let (m, n) = (120, 100);
        let z = gaussian(m, n, &KeyedRng::new(3, 0, "flat"));
        let t: Vec<f32> = (0..m * n).map(|x| z[(x / n, x % n)] as f32).collect();
        let (svd, route) = truncated(&t, m, n, 8, 0.0).unwrap();
        assert_eq!(route, Route::Full);
        assert_eq!(svd.rank(), 8);
    }

    #[test]
    fn small_or_high_rank_problems_are_not_eligible() {
        assert!(!eligible(64, 64, 23));
        assert!(eligible(64, 64, 22));
        assert!(eligible(4096, 4096, 64));
        assert!(!eligible(4096, 4096, 0));
        let t = low_rank_plus_noise(30, 30, 3, 0.0);
        assert_eq!(truncated(&t, 30, 30, 8, 0.0).unwrap().1, Route::Full);
    }

    #[test]
    fn the_bound_uses_the_best_cut() {
        // A clear gap after 2 values, noise after: the cut at 2 gives a small bound; no cut
        // has a gap in a flat spectrum.
        let s = [1.0, 0.8, 1e-6, 1e-6, 1e-6];
        let res = [1e-20; 4];
        assert!(product_bound(&s, &res, 4, 1e-7) < 1e-5);
        let flat = [1.0, 1.0, 1.0, 1.0, 1.0];
        assert!(product_bound(&flat, &res, 4, 1e-7).is_infinite());
    }
}

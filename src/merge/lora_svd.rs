//! Truncated SVDs for LoRA: peft 0.21.2's SVD combination types (`svd`, `ties_svd`,
//! `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`; `../shared/ALGORITHMS.md` §14,
//! `../shared/conformance-lora/README.md` §3) and `mergekit-extract-lora` (§5 there). Pure
//! functions over slices, row-major; the linear algebra is `faer`'s (f64).
//!
//! - [`delta`]: peft's `get_delta_weight` in f32, `(B@A)·f32(s)` with B@A as a fused
//!   multiply-add chain over the rank (the fold's arithmetic, [`crate::merge::lora`]).
//! - [`low_rank_svd`]: the SVD of `Σ c_i B_i A_i` from a QR of the stacked B's, a QR of the
//!   stacked (weighted) Aᵀ's and an SVD of the `(Σr)×(Σr)` core: never an `out × in` SVD. For
//!   the types whose merge function is a weighted sum (`svd`; `dare_linear_svd` and
//!   `magnitude_prune_svd` at density ≥ 1).
//! - [`dense_svd`]: the thin SVD of a formed matrix (pruned deltas are full rank);
//!   `lora_extract` goes through [`crate::merge::lora_rsvd`] (randomized when it can vouch for it).
//! - [`Svd::lora`]: peft's factors `B = U_r·diag(S_r)`, `A = V_rᵀ`, rows/columns past the
//!   available rank left zero, and [`clamp`] (`svd_clamp`: the quantile of the union of both
//!   factors' entries, torch's linear interpolation, both clamped to `[−hi, hi]`).
//!
//! Signs: singular vectors are unique only up to the sign of each pair (and a rotation inside
//! a repeated singular value); ladle makes the entry of largest magnitude of each left singular
//! vector positive (the first one on a tie). The product `B@A` does not depend on it;
//! `svd_clamp` does (peft's result follows LAPACK's choice, which no other routine reproduces).

use faer::Mat;

use crate::merge::lora::{Factors, fold_linear};
use crate::merge::lora_combine::{Combination, SignMethod, Source, combine};
use crate::merge::precision::Precision;
use crate::merge::rng::KeyedRng;

/// peft's `get_delta_weight` of one module in `B@A` orientation, `(n_b × n_a)` row-major:
/// `Q = B@A` (fused multiply-add chain over `k = 0..r`), then `Q·f32(scale)`.
pub fn delta(a: &[f32], b: &[f32], rank: usize, n_a: usize, n_b: usize, scale: f32) -> Vec<f32> {
    let f = Factors { a, b, rank, scale };
    let zeros = vec![0f32; n_a * n_b];
    let mut out = vec![0f32; n_a * n_b];
    fold_linear(&f, n_a, 0, &zeros, Precision::F32, &mut out);
    out
}

/// A truncated SVD `M ≈ U·diag(S)·Vᵀ` of an `m × n` matrix: `u` is `(m × p)`, `v` `(n × p)`,
/// row-major, `s` non-increasing, signs as the module's text says.
#[derive(Debug, Clone)]
pub struct Svd {
    pub m: usize,
    pub n: usize,
    pub u: Vec<f64>,
    pub s: Vec<f64>,
    pub v: Vec<f64>,
}

/// The SVD routine did not converge (faer's `SvdError`), or a value was not finite.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the SVD did not converge (a non-finite value, or a matrix faer cannot decompose)")]
pub struct SvdFailed;

impl Svd {
    pub fn rank(&self) -> usize {
        self.s.len()
    }

    /// Keep the first `r` singular triplets (all of them when fewer).
    pub fn truncate(mut self, r: usize) -> Svd {
        let p = self.rank();
        if r >= p {
            return self;
        }
        let cut = |x: &[f64], rows: usize| -> Vec<f64> {
            (0..rows)
                .flat_map(|i| x[i * p..i * p + r].iter().copied())
                .collect()
        };
        self.u = cut(&self.u, self.m);
        self.v = cut(&self.v, self.n);
        self.s.truncate(r);
        self
    }

    /// peft's factors of rank `r`: `A = V_rᵀ` `(r × n)`, `B = U_r·diag(S_r)` `(m × r)`, in f32;
    /// rows of A / columns of B past the available rank are zero.
    pub fn lora(&self, r: usize) -> (Vec<f32>, Vec<f32>) {
        self.split(r, |s| (1.0, s))
    }

    /// Factors of rank `r` with `A = diag(fa(s))·V_rᵀ`, `B = U_r·diag(fb(s))` where
    /// `(fa, fb) = split(s)` (peft: `(1, s)`; mergekit-extract-lora: `(√s, √s)` or `(s, 1)`).
    pub fn split(&self, r: usize, split: impl Fn(f64) -> (f64, f64)) -> (Vec<f32>, Vec<f32>) {
        let p = self.rank();
        let mut a = vec![0f32; r * self.n];
        let mut b = vec![0f32; self.m * r];
        for k in 0..p.min(r) {
            let (fa, fb) = split(self.s[k]);
            for j in 0..self.n {
                a[k * self.n + j] = (fa * self.v[j * p + k]) as f32;
            }
            for i in 0..self.m {
                b[i * r + k] = (fb * self.u[i * p + k]) as f32;
            }
        }
        (a, b)
    }
}

fn mat_from_f32(x: &[f32], m: usize, n: usize) -> Mat<f64> {
    Mat::from_fn(m, n, |i, j| x[i * n + j] as f64)
}

/// Make each pair's sign canonical (largest |u_k| entry positive) and copy out row-major.
pub(crate) fn finish(u: &Mat<f64>, s: &[f64], v: &Mat<f64>) -> Svd {
    let (m, n, p) = (u.nrows(), v.nrows(), s.len());
    let mut out = Svd {
        m,
        n,
        u: vec![0.0; m * p],
        s: s.to_vec(),
        v: vec![0.0; n * p],
    };
    for k in 0..p {
        let mut best = (0usize, 0f64);
        for i in 0..m {
            if u[(i, k)].abs() > best.1 {
                best = (i, u[(i, k)].abs());
            }
        }
        let sign = if u[(best.0, k)] < 0.0 { -1.0 } else { 1.0 };
        for i in 0..m {
            out.u[i * p + k] = sign * u[(i, k)];
        }
        for j in 0..n {
            out.v[j * p + k] = sign * v[(j, k)];
        }
    }
    out
}

fn check_finite(x: &[f32]) -> Result<(), SvdFailed> {
    if x.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(SvdFailed)
    }
}

/// The thin SVD of the formed `m × n` matrix `d` (row-major), truncated to `r`.
pub fn dense_svd(d: &[f32], m: usize, n: usize, r: usize) -> Result<Svd, SvdFailed> {
    check_finite(d)?;
    let mat = mat_from_f32(d, m, n);
    let svd = mat.thin_svd().map_err(|_| SvdFailed)?;
    let s: Vec<f64> = (0..m.min(n)).map(|k| svd.S().column_vector()[k]).collect();
    Ok(finish(&svd.U().to_owned(), &s, &svd.V().to_owned()).truncate(r))
}

/// One term `c·B@A` of a low-rank sum: `a` `(rank × n_a)`, `b` `(n_b × rank)`.
#[derive(Debug, Clone, Copy)]
pub struct Term<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub rank: usize,
    pub coef: f64,
}

/// The SVD of `M = Σ c_i B_i A_i` (`n_b × n_a`), truncated to `r`, without forming `M`:
/// `[B_1 … B_n] = Q_b R_b`, `[c_1 A_1; …]ᵀ = Q_a R_a`, `R_b R_aᵀ = U_c S V_cᵀ`, so
/// `M = (Q_b U_c) S (Q_a V_c)ᵀ`. Cost `O((n_a + n_b)·R²)`, `R = Σ r_i`.
pub fn low_rank_svd(
    terms: &[Term<'_>],
    n_a: usize,
    n_b: usize,
    r: usize,
) -> Result<Svd, SvdFailed> {
    let total: usize = terms.iter().map(|t| t.rank).sum();
    for t in terms {
        check_finite(t.a)?;
        check_finite(t.b)?;
    }
    if total == 0 {
        return Ok(Svd {
            m: n_b,
            n: n_a,
            u: Vec::new(),
            s: Vec::new(),
            v: Vec::new(),
        });
    }
    let mut bs = Mat::<f64>::zeros(n_b, total);
    let mut at = Mat::<f64>::zeros(n_a, total);
    let mut off = 0;
    for t in terms {
        for k in 0..t.rank {
            for i in 0..n_b {
                bs[(i, off + k)] = t.b[i * t.rank + k] as f64;
            }
            for j in 0..n_a {
                at[(j, off + k)] = t.coef * t.a[k * n_a + j] as f64;
            }
        }
        off += t.rank;
    }
    let qb = bs.qr();
    let qa = at.qr();
    let core = qb.thin_R() * qa.thin_R().transpose();
    let svd = core.thin_svd().map_err(|_| SvdFailed)?;
    let p = core.nrows().min(core.ncols());
    let s: Vec<f64> = (0..p).map(|k| svd.S().column_vector()[k]).collect();
    let u = qb.compute_thin_Q() * svd.U();
    let v = qa.compute_thin_Q() * svd.V();
    Ok(finish(&u, &s, &v).truncate(r))
}

/// `torch.quantile(x, q)` (linear interpolation) in f32, as torch computes it: the rank
/// `f32(q)·(n−1)`, then `lerp` between its neighbours in the sorted values.
pub fn quantile(x: &[f32], q: f64) -> f32 {
    if x.is_empty() {
        return f32::NAN;
    }
    let mut v = x.to_vec();
    v.sort_by(f32::total_cmp);
    let rank = q as f32 * (v.len() - 1) as f32;
    let below = rank.floor();
    let w = rank - below;
    let lo = (below as usize).min(v.len() - 1);
    let hi = (rank.ceil() as usize).min(v.len() - 1);
    let (a, b) = (v[lo], v[hi]);
    // torch's lerp: `a + w·(b − a)` for w < 0.5, else `b − (b − a)·(1 − w)`.
    if w < 0.5 {
        a + w * (b - a)
    } else {
        b - (b - a) * (1.0 - w)
    }
}

/// peft's `svd_clamp`: `hi = quantile(concat(B, A), q)`, both factors clamped to `[−hi, hi]`.
pub fn clamp(a: &mut [f32], b: &mut [f32], q: f64) {
    let all: Vec<f32> = b.iter().chain(a.iter()).copied().collect();
    let hi = quantile(&all, q);
    let lo = -hi;
    for x in a.iter_mut().chain(b.iter_mut()) {
        // torch.clamp(x, min, max) = min(max(x, min), max).
        *x = x.max(lo).min(hi);
    }
}

/// One module of an SVD type (`kind.is_svd()`): the merge function of `kind` over the deltas
/// `D_i = get_delta_weight_i` with the raw weights `f32(w_i)` (`rngs[i]` draws DARE's mask of
/// `D_i`), then the rank-`r_new` truncation as peft's factors, then `svd_clamp`. Sources are
/// `(rank × n_a)` / `(n_b × rank)`; returns `(A (r_new × n_a), B (n_b × r_new))`.
///
/// When the merge function is a weighted sum at this density, the sum of the low-rank terms is
/// decomposed without forming it ([`low_rank_svd`]); otherwise the deltas are formed, combined
/// and decomposed ([`dense_svd`]).
#[allow(clippy::too_many_arguments)]
pub fn combine_svd(
    kind: Combination,
    sources: &[Source<'_>],
    n_a: usize,
    n_b: usize,
    r_new: usize,
    density: f64,
    method: SignMethod,
    rngs: &[KeyedRng],
    svd_clamp: Option<f64>,
) -> Result<(Vec<f32>, Vec<f32>), SvdFailed> {
    let svd = if kind.is_weighted_sum(density) {
        let terms: Vec<Term<'_>> = sources
            .iter()
            .map(|s| Term {
                a: s.a,
                b: s.b,
                rank: s.rank,
                coef: (s.weight as f32 as f64) * (s.scaling as f32 as f64),
            })
            .collect();
        low_rank_svd(&terms, n_a, n_b, r_new)?
    } else {
        let deltas: Vec<Vec<f32>> = sources
            .iter()
            .map(|s| delta(s.a, s.b, s.rank, n_a, n_b, s.scaling as f32))
            .collect();
        let weights: Vec<f32> = sources.iter().map(|s| s.weight as f32).collect();
        let d = combine(kind, deltas, &weights, density, method, rngs);
        dense_svd(&d, n_b, n_a, r_new)?
    };
    // peft clamps the factors it has (fewer than r_new pairs when a module's delta has a
    // smaller rank than r_new); ladle then pads them with zeros to r_new.
    let p = svd.rank().min(r_new);
    let (mut a, mut b) = svd.lora(p);
    if let Some(q) = svd_clamp {
        clamp(&mut a, &mut b, q);
    }
    if p == r_new {
        return Ok((a, b));
    }
    a.resize(r_new * n_a, 0.0);
    let mut padded = vec![0f32; n_b * r_new];
    for i in 0..n_b {
        padded[i * r_new..i * r_new + p].copy_from_slice(&b[i * p..(i + 1) * p]);
    }
    Ok((a, padded))
}

/// `mergekit-extract-lora`'s decomposition of one task vector `t` (`m × n` row-major, already
/// in `B@A` orientation): `rank = min(max_rank, min(m, n))`, and with `sv_epsilon > 0` at most
/// the number of singular values above it (possibly 0); `distribute`: `A = √S·Vᵀ`, `B = U·√S`,
/// else `A = S·Vᵀ`, `B = U`. Returns `(rank, A (rank × n), B (m × rank))`. The SVD is
/// [`crate::merge::lora_rsvd::truncated`]'s: randomized when the rank is far below the
/// dimensions and its accuracy check passes, else the full one.
pub fn extract(
    t: &[f32],
    m: usize,
    n: usize,
    max_rank: usize,
    sv_epsilon: f64,
    distribute: bool,
) -> Result<(usize, Vec<f32>, Vec<f32>), SvdFailed> {
    let (svd, _) = crate::merge::lora_rsvd::truncated(t, m, n, max_rank, sv_epsilon)?;
    let rank = svd.rank();
    let (a, b) = if distribute {
        svd.split(rank, |s| (s.sqrt(), s.sqrt()))
    } else {
        svd.split(rank, |s| (s, 1.0))
    };
    Ok((rank, a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product(a: &[f32], b: &[f32], r: usize, n_a: usize, n_b: usize) -> Vec<f64> {
        let mut p = vec![0f64; n_a * n_b];
        for i in 0..n_b {
            for j in 0..n_a {
                p[i * n_a + j] = (0..r)
                    .map(|k| b[i * r + k] as f64 * a[k * n_a + j] as f64)
                    .sum();
            }
        }
        p
    }

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32) - 0.5
            })
            .collect()
    }

    /// The low-rank route and the dense route give the same best rank-r product, and a rank
    /// covering the whole sum reproduces it.
    #[test]
    fn low_rank_equals_dense_and_is_exact_at_full_rank() {
        let (n_a, n_b) = (23, 17);
        let (a1, b1) = (pseudo(3 * n_a, 1), pseudo(n_b * 3, 2));
        let (a2, b2) = (pseudo(2 * n_a, 3), pseudo(n_b * 2, 4));
        let terms = [
            Term {
                a: &a1,
                b: &b1,
                rank: 3,
                coef: 0.7,
            },
            Term {
                a: &a2,
                b: &b2,
                rank: 2,
                coef: -1.3,
            },
        ];
        let p1 = product(&a1, &b1, 3, n_a, n_b);
        let p2 = product(&a2, &b2, 2, n_a, n_b);
        let m: Vec<f64> = p1.iter().zip(&p2).map(|(x, y)| 0.7 * x - 1.3 * y).collect();
        let mf: Vec<f32> = m.iter().map(|x| *x as f32).collect();
        let max = m.iter().fold(0f64, |a, x| a.max(x.abs()));
        // Full rank (5): exact.
        let (a, b) = low_rank_svd(&terms, n_a, n_b, 5).unwrap().lora(5);
        let got = product(&a, &b, 5, n_a, n_b);
        let err = got
            .iter()
            .zip(&m)
            .fold(0f64, |e, (x, y)| e.max((x - y).abs()));
        assert!(err < 1e-6 * max, "full rank: {err}");
        // Rank 3 (with padding to 4): low-rank and dense agree.
        let (a, b) = low_rank_svd(&terms, n_a, n_b, 3).unwrap().lora(4);
        let (da, db) = dense_svd(&mf, n_b, n_a, 3).unwrap().lora(4);
        assert!(a[3 * n_a..].iter().all(|x| *x == 0.0));
        let (g, d) = (product(&a, &b, 4, n_a, n_b), product(&da, &db, 4, n_a, n_b));
        let err = g
            .iter()
            .zip(&d)
            .fold(0f64, |e, (x, y)| e.max((x - y).abs()));
        assert!(err < 1e-5 * max, "rank 3: {err}");
        // And the factors themselves agree: the sign convention is the routine's, not faer's.
        let (la, _) = low_rank_svd(&terms, n_a, n_b, 3).unwrap().lora(3);
        let (da3, _) = dense_svd(&mf, n_b, n_a, 3).unwrap().lora(3);
        let ferr = la
            .iter()
            .zip(&da3)
            .fold(0f32, |e, (x, y)| e.max((x - y).abs()));
        assert!(ferr < 1e-4, "factors: {ferr}");
    }

    #[test]
    fn quantile_interpolates_like_torch() {
        let x = [3.0f32, 1.0, 2.0, 4.0];
        assert_eq!(quantile(&x, 0.5), 2.5);
        assert_eq!(quantile(&x, 1.0), 4.0);
        assert_eq!(quantile(&x, 0.0), 1.0);
        let mut a = vec![-5.0f32, 0.5];
        let mut b = vec![2.0f32, 1.0];
        clamp(&mut a, &mut b, 0.5);
        // hi = quantile([2, 1, -5, 0.5], 0.5) = 0.75
        assert_eq!(a, vec![-0.75, 0.5]);
        assert_eq!(b, vec![0.75, 0.75]);
    }

    #[test]
    fn delta_is_the_scaled_product() {
        let a = [1.0f32, 2.0, 3.0, 4.0]; // r=2, n_a=2
        let b = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0]; // n_b=3
        assert_eq!(
            delta(&a, &b, 2, 2, 3, 0.5),
            vec![0.5, 1.0, 1.5, 2.0, 2.0, 3.0]
        );
    }
}

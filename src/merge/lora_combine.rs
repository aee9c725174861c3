//! Combining LoRA modules into one, as peft 0.21.2's `add_weighted_adapter` does
//! (`../shared/ALGORITHMS.md` §14, `../shared/conformance-lora/README.md` §3): pure functions
//! over one module's factors, in f32 with peft's roundings.
//!
//! - [`cat`]: `A_new = [ (A_i·f32(w_i))·f32(s_i) ; … ]` (rows), `B_new = [B_i …]` (columns),
//!   from row/column 0, zero-padded to `r_new`: `B_new@A_new = Σ w_i s_i B_i A_i` exactly.
//! - the factor types ([`Combination::Linear`], `Ties`, `DareLinear`, `DareTies`,
//!   `MagnitudePrune`): the A list and the B list are combined separately ([`combine`]) with
//!   weights `sign(ws)·√|ws|` (A) and `√|ws|` (B), `ws = w·s` in double, rounded to f32.

use crate::merge::rng::KeyedRng;

/// peft's `combination_type`s. The `*Svd` ones apply their merge function to the full deltas
/// `s_i·B_i@A_i` with the raw weights, then truncate with an SVD (`crate::merge::lora_svd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    Linear,
    Cat,
    Ties,
    DareLinear,
    DareTies,
    MagnitudePrune,
    Svd,
    TiesSvd,
    DareLinearSvd,
    DareTiesSvd,
    MagnitudePruneSvd,
}

impl Combination {
    /// One of the SVD types.
    pub fn is_svd(self) -> bool {
        matches!(
            self,
            Combination::Svd
                | Combination::TiesSvd
                | Combination::DareLinearSvd
                | Combination::DareTiesSvd
                | Combination::MagnitudePruneSvd
        )
    }

    /// The merge function is a plain weighted sum at this density (so a sum of low-rank terms
    /// stays low-rank): `linear`, `cat`, `svd`, and the pruning types that do not prune
    /// (density ≥ 1) without a sign election.
    pub fn is_weighted_sum(self, density: f64) -> bool {
        match self {
            Combination::Linear | Combination::Cat | Combination::Svd => true,
            Combination::DareLinear
            | Combination::MagnitudePrune
            | Combination::DareLinearSvd
            | Combination::MagnitudePruneSvd => density >= 1.0,
            Combination::Ties
            | Combination::DareTies
            | Combination::TiesSvd
            | Combination::DareTiesSvd => false,
        }
    }
}

/// `majority_sign_method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignMethod {
    Total,
    Frequency,
}

/// One source module: its factors (f32), its rank and peft's scaling, and its weight.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// `(rank, n_a)` row-major.
    pub a: &'a [f32],
    /// `(n_b, rank)` row-major.
    pub b: &'a [f32],
    pub rank: usize,
    pub scaling: f64,
    pub weight: f64,
}

/// peft's `cat` of `sources` into `(r_new × n_a, n_b × r_new)`; `round` is applied to every
/// factor element (the new adapter's parameters are in the base's dtype).
pub fn cat(
    sources: &[Source<'_>],
    n_a: usize,
    n_b: usize,
    r_new: usize,
    round: impl Fn(f32) -> f32,
) -> (Vec<f32>, Vec<f32>) {
    let mut a_new = vec![0f32; r_new * n_a];
    let mut b_new = vec![0f32; n_b * r_new];
    let mut off = 0usize;
    for s in sources {
        let (w, sc) = (s.weight as f32, s.scaling as f32);
        for k in 0..s.rank.min(r_new.saturating_sub(off)) {
            for j in 0..n_a {
                a_new[(off + k) * n_a + j] = round((s.a[k * n_a + j] * w) * sc);
            }
            for i in 0..n_b {
                b_new[i * r_new + off + k] = round(s.b[i * s.rank + k]);
            }
        }
        off += s.rank;
    }
    (a_new, b_new)
}

/// The weights peft gives the A and the B factors of each source.
pub fn factor_weights(sources: &[Source<'_>]) -> (Vec<f32>, Vec<f32>) {
    sources
        .iter()
        .map(|s| {
            let ws = s.weight * s.scaling;
            let root = ws.abs().sqrt();
            let sign = if ws >= 0.0 { 1.0 } else { -1.0 };
            ((sign * root) as f32, root as f32)
        })
        .unzip()
}

/// `Σ t_i·w_i`, each product rounded, summed in order from `+0`.
fn weighted_sum(tensors: &[Vec<f32>], weights: &[f32]) -> Vec<f32> {
    let n = tensors.first().map_or(0, Vec::len);
    let mut out = vec![0f32; n];
    for (t, &w) in tensors.iter().zip(weights) {
        for (o, &x) in out.iter_mut().zip(t) {
            *o += x * w;
        }
    }
    out
}

/// Keep the `int(density·n)` largest magnitudes of `t`, zero the rest (`t·0`: `-0` for a
/// negative entry, as torch's `tensor * mask`). Ties at the threshold keep the lower index.
pub fn magnitude_prune(t: &mut [f32], density: f64) {
    if density >= 1.0 {
        return;
    }
    let k = (density * t.len() as f64) as usize;
    let mut order: Vec<usize> = (0..t.len()).collect();
    order.sort_by(|&i, &j| t[j].abs().total_cmp(&t[i].abs()).then(i.cmp(&j)));
    let mut keep = vec![false; t.len()];
    for &i in order.iter().take(k) {
        keep[i] = true;
    }
    for (x, k) in t.iter_mut().zip(keep) {
        if !k {
            *x *= 0.0;
        }
    }
}

/// DARE's random pruning: keep element `e` with probability `density` (`rng`'s keyed draw
/// for `e`, as the full-model DARE), rescale the kept ones by `1/density`.
pub fn random_prune(t: &mut [f32], density: f64, rng: &KeyedRng) {
    if density >= 1.0 {
        return;
    }
    let d = density as f32;
    for (e, x) in t.iter_mut().enumerate() {
        *x = if rng.keep(e as u64, density) {
            *x / d
        } else {
            *x * 0.0
        };
    }
}

/// TIES' sign election and disjoint mean of (already pruned) tensors with weights `w`.
fn disjoint_merge(tensors: &[Vec<f32>], weights: &[f32], method: SignMethod) -> Vec<f32> {
    let n = tensors.first().map_or(0, Vec::len);
    let sign = |x: f32| {
        if x > 0.0 {
            1.0f32
        } else if x < 0.0 {
            -1.0
        } else {
            0.0
        }
    };
    (0..n)
        .map(|e| {
            let stat = tensors.iter().fold(0f32, |acc, t| match method {
                SignMethod::Total => acc + t[e],
                SignMethod::Frequency => acc + sign(t[e]),
            });
            let majority = if stat >= 0.0 { 1.0 } else { -1.0 };
            let mut sum = 0f32;
            let mut count = 0f32;
            for (t, &w) in tensors.iter().zip(weights) {
                let keep = sign(t[e]) == majority;
                let kept = if keep { 1.0f32 } else { 0.0 };
                sum += (t[e] * w) * kept;
                count += kept;
            }
            sum / count.max(1.0)
        })
        .collect()
}

/// peft's merge function `kind` over `tensors` (one per source, same length) with weights
/// `weights`. `rngs[i]` draws DARE's mask of `tensors[i]`.
pub fn combine(
    kind: Combination,
    mut tensors: Vec<Vec<f32>>,
    weights: &[f32],
    density: f64,
    method: SignMethod,
    rngs: &[KeyedRng],
) -> Vec<f32> {
    match kind {
        Combination::Linear | Combination::Cat | Combination::Svd => {
            weighted_sum(&tensors, weights)
        }
        Combination::MagnitudePrune | Combination::MagnitudePruneSvd => {
            for t in &mut tensors {
                magnitude_prune(t, density);
            }
            weighted_sum(&tensors, weights)
        }
        Combination::Ties | Combination::TiesSvd => {
            for t in &mut tensors {
                magnitude_prune(t, density);
            }
            disjoint_merge(&tensors, weights, method)
        }
        Combination::DareLinear | Combination::DareLinearSvd => {
            for (t, rng) in tensors.iter_mut().zip(rngs) {
                random_prune(t, density, rng);
            }
            weighted_sum(&tensors, weights)
        }
        Combination::DareTies | Combination::DareTiesSvd => {
            for (t, rng) in tensors.iter_mut().zip(rngs) {
                random_prune(t, density, rng);
            }
            disjoint_merge(&tensors, weights, method)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cat_is_the_exact_weighted_sum_of_products() {
        let (a1, b1) = (vec![1.0f32, 2.0], vec![3.0f32, 4.0]); // r=1, n_a=2, n_b=2
        let (a2, b2) = (vec![5.0f32, 6.0], vec![7.0f32, 8.0]);
        let s = [
            Source {
                a: &a1,
                b: &b1,
                rank: 1,
                scaling: 2.0,
                weight: 0.5,
            },
            Source {
                a: &a2,
                b: &b2,
                rank: 1,
                scaling: 1.0,
                weight: -1.0,
            },
        ];
        let (a, b) = cat(&s, 2, 2, 3, |x| x);
        assert_eq!(a, vec![1.0, 2.0, -5.0, -6.0, 0.0, 0.0]);
        assert_eq!(b, vec![3.0, 7.0, 0.0, 4.0, 8.0, 0.0]);
    }

    #[test]
    fn ties_elects_and_averages() {
        let t = vec![vec![1.0f32, -2.0, 0.5], vec![-3.0f32, -1.0, 0.25]];
        let out = combine(
            Combination::Ties,
            t,
            &[1.0, 1.0],
            1.0,
            SignMethod::Total,
            &[],
        );
        assert_eq!(out, vec![-3.0, -1.5, 0.375]);
        let mut p = vec![1.0f32, -4.0, 2.0, -0.5];
        magnitude_prune(&mut p, 0.5);
        assert_eq!(p, vec![0.0, -4.0, 2.0, -0.0]);
        assert!(p[3].is_sign_negative());
    }
}

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

use crate::merge::gta::keep_rank_band;
use crate::merge::precision::Precision;

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
    if select_topk <= 0.0 {
        tvs.iter_mut().for_each(|t| t.fill(0.0));
    } else if select_topk < 1.0 {
        let mut var: Vec<f32> = (0..n)
            .map(|e| {
                let mean = tvs.iter().map(|t| t[e] as f64).sum::<f64>() / m as f64;
                let v = tvs
                    .iter()
                    .map(|t| (t[e] as f64 - mean).powi(2))
                    .sum::<f64>()
                    / m as f64;
                p.round(v as f32)
            })
            .collect();
        let nonzero = var.iter().filter(|v| **v != 0.0).count();
        let k = ((nonzero as f32) * (select_topk as f32)) as usize;
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
    let nf = n.max(1) as f64;
    let mut w: Vec<f32> = tvs
        .iter()
        .map(|t| {
            let s: f64 = t.iter().map(|v| p.round(v * v) as f64).sum();
            p.round((s / nf) as f32)
        })
        .collect();
    let wsum = p.round(w.iter().map(|x| *x as f64).sum::<f64>() as f32);
    if (wsum as f64).abs() < 1e-6 {
        let u = p.round(1.0 / m as f32);
        w.iter_mut().for_each(|x| *x = u);
    } else {
        w.iter_mut().for_each(|x| *x = p.round(*x / wsum));
    }
    for (e, o) in out.iter_mut().enumerate() {
        let s: f32 = tvs.iter().map(|t| t[e]).sum();
        let majority = if s >= 0.0 { 1.0f32 } else { -1.0 };
        let mut acc = 0.0f32;
        let mut div = 0.0f32;
        for (t, wi) in tvs.iter().zip(&w) {
            let v = t[e];
            if v != 0.0 && v.signum() == majority {
                acc += p.round(v * wi);
                div += wi;
            }
        }
        let div = p.round(div).max(1e-6);
        *o = p.round(base[e] + p.round(p.round(acc) / div));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

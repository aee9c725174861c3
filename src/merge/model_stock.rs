//! Model Stock as mergekit's `model_stock` (ALGORITHMS.md §10), with torch's rounding to the
//! compute precision `r(·)` after every tensor op:
//! ```text
//! o_i = r(x_i − b);  cos_ij = clamp(r(r(Σ r(o_i·o_j)) / max(r(‖o_i‖·‖o_j‖), 1e-6)), −1, 1)
//! cos = r(mean_ij cos_ij);  t = r(r(N·cos) / r(1 + r((N−1)·cos)))
//! avg = r(r(r(x_1 + x_2) + x_3 …) / N)     (Python's sum: one rounding per addition)
//! out = r(r(t·avg) + r(r(1 − t)·b))
//! ```
//! per flattened tensor, or per row (last dimension) with `filter_wise`. Norms and dot
//! products accumulate in f64 here and round once (torch: f32 in its own order), which moves a
//! bf16 scalar by one ulp at most now and then (conformance tolerance: 4 ulps).

use crate::merge::precision::Precision;

fn sum_round(p: Precision, it: impl Iterator<Item = f64>) -> f32 {
    p.round(it.sum::<f64>() as f32)
}

/// `xs` are the fine-tuned models (at least two), `row_len` the length of the vectors the
/// statistic is taken over (the whole tensor unless filter-wise).
pub fn model_stock(p: Precision, base: &[f32], xs: &[&[f32]], row_len: usize, out: &mut [f32]) {
    let row_len = row_len.max(1);
    let n_models = xs.len();
    let nf = n_models as f32;
    let mut offsets: Vec<Vec<f32>> = vec![Vec::new(); n_models];
    for (r, (brow, orow)) in base
        .chunks(row_len)
        .zip(out.chunks_mut(row_len))
        .enumerate()
    {
        let start = r * row_len;
        let len = brow.len();
        for (o, x) in offsets.iter_mut().zip(xs) {
            o.clear();
            o.extend(
                x[start..start + len]
                    .iter()
                    .zip(brow)
                    .map(|(x, b)| p.round(x - b)),
            );
        }
        let norms: Vec<f32> = offsets
            .iter()
            .map(|o| {
                p.round((o.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>()).sqrt() as f32)
            })
            .collect();
        let mut cos_sum = 0.0f64;
        let mut pairs = 0usize;
        for i in 0..n_models {
            for j in i + 1..n_models {
                let np = p.round(norms[i] * norms[j]).max(1e-6);
                let dot = sum_round(
                    p,
                    offsets[i]
                        .iter()
                        .zip(&offsets[j])
                        .map(|(a, b)| p.round(a * b) as f64),
                );
                let c = p.round(dot / np).clamp(-1.0, 1.0);
                cos_sum += c as f64;
                pairs += 1;
            }
        }
        let cos = p.round((cos_sum / pairs.max(1) as f64) as f32);
        let t = p.round(p.round(nf * cos) / p.round(1.0 + p.round((nf - 1.0) * cos)));
        let one_minus_t = p.round(1.0 - t);
        for (e, o) in orow.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for x in xs {
                acc = p.round(acc + x[start + e]);
            }
            let avg = p.round(acc / nf);
            *o = p.round(p.round(t * avg) + p.round(one_minus_t * brow[e]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_hand() {
        // Orthogonal task vectors: cos = 0 → t = 0 → the base.
        let b = [1.0f32, 1.0, 1.0, 1.0];
        let x1 = [2.0f32, 1.0, 1.0, 1.0];
        let x2 = [1.0f32, 2.0, 1.0, 1.0];
        let mut out = [0.0f32; 4];
        model_stock(Precision::F32, &b, &[&x1, &x2], 4, &mut out);
        assert_eq!(out, b);
        // Identical task vectors: cos = 1 → t = 2/2 = 1 → the average (= x1).
        model_stock(Precision::F32, &b, &[&x1, &x1], 4, &mut out);
        assert_eq!(out, x1);
        // cos = 0.5 for two models: t = 1/1.5 = 2/3.
        let y1 = [2.0f32, 1.0, 1.0, 1.0];
        let y2 = [1.5f32, 1.0 + 0.75f32.sqrt(), 1.0, 1.0];
        model_stock(Precision::F32, &b, &[&y1, &y2], 4, &mut out);
        let t = 2.0 / 3.0;
        for e in 0..4 {
            let avg = (y1[e] + y2[e]) / 2.0;
            assert!((out[e] - (t * avg + (1.0 - t) * b[e])).abs() < 1e-5);
        }
    }
}

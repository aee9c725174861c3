//! Folding a LoRA module into a weight, chunk by chunk of the weight's elements: peft's
//! `merge_and_unload` arithmetic, bit for bit (`../shared/conformance-lora/README.md` §1).
//!
//! Per element, in f32: `Q = Σ_k B[i,k]·A[k,j]` as a fused multiply-add chain over
//! `k = 0..r` from 0 (torch's CPU matmul), `D = Q · f32(s)`, and
//! - Linear: `W' = round(f32(W + D))`;
//! - Embedding (delta `(B@A)^T`): `W' = round(f32(W + round(D)))` (peft adds
//!   `delta.to(weight.dtype)`),
//!
//! where `round` is the precision the base is loaded in and `W` is already in it. Only the rows
//! of the chunk are formed: never the whole `out × in` product.

use crate::merge::precision::Precision;

/// One LoRA module's factors, decoded to f32, and its scaling.
#[derive(Debug, Clone, Copy)]
pub struct Factors<'a> {
    /// `A`, `(r, n_a)` row-major (Linear: `n_a = in`; Embedding: `n_a = num_embeddings`).
    pub a: &'a [f32],
    /// `B`, `(n_b, r)` row-major (Linear: `n_b = out`; Embedding: `n_b = dim`).
    pub b: &'a [f32],
    pub rank: usize,
    /// peft's scaling, rounded to f32 once (`float32(s)`).
    pub scale: f32,
}

/// `W' = round(W + s·B@A)` for the elements `first..first + w.len()` of a Linear weight of
/// `cols` columns (`w`: those elements of `W`, in the load precision). Writes `out`.
pub fn fold_linear(
    f: &Factors<'_>,
    cols: usize,
    first: usize,
    w: &[f32],
    round: Precision,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            unsafe { fold_linear_fma(f, cols, first, w, round, out) };
            return;
        }
    }
    fold_linear_inner(f, cols, first, w, round, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fold_linear_fma(
    f: &Factors<'_>,
    cols: usize,
    first: usize,
    w: &[f32],
    round: Precision,
    out: &mut [f32],
) {
    fold_linear_inner(f, cols, first, w, round, out)
}

#[inline(always)]
fn fold_linear_inner(
    f: &Factors<'_>,
    cols: usize,
    first: usize,
    w: &[f32],
    round: Precision,
    out: &mut [f32],
) {
    let r = f.rank;
    let mut e = 0usize;
    while e < w.len() {
        let idx = first + e;
        let (i, j0) = (idx / cols, idx % cols);
        let n = (cols - j0).min(w.len() - e);
        let acc = &mut out[e..e + n];
        acc.fill(0.0);
        let brow = &f.b[i * r..(i + 1) * r];
        for (k, &bk) in brow.iter().enumerate() {
            let arow = &f.a[k * cols + j0..k * cols + j0 + n];
            for (q, &ak) in acc.iter_mut().zip(arow) {
                *q = bk.mul_add(ak, *q);
            }
        }
        for (q, &wv) in acc.iter_mut().zip(&w[e..e + n]) {
            *q = round.round(wv + *q * f.scale);
        }
        e += n;
    }
}

/// `W' = round(W + round(s·(B@A)^T))` for the elements `first..first + w.len()` of an
/// Embedding weight `(num_embeddings, dim)`, `dim = cols`.
pub fn fold_embedding(
    f: &Factors<'_>,
    cols: usize,
    first: usize,
    w: &[f32],
    round: Precision,
    out: &mut [f32],
) {
    let r = f.rank;
    let n_a = f.a.len().checked_div(r).unwrap_or(0);
    let mut e = 0usize;
    let mut acol = vec![0f32; r];
    while e < w.len() {
        let idx = first + e;
        let (i, j0) = (idx / cols, idx % cols);
        let n = (cols - j0).min(w.len() - e);
        for (k, c) in acol.iter_mut().enumerate() {
            *c = f.a[k * n_a + i];
        }
        for (q, (o, &wv)) in out[e..e + n].iter_mut().zip(&w[e..e + n]).enumerate() {
            let j = j0 + q;
            let brow = &f.b[j * r..(j + 1) * r];
            let mut acc = 0f32;
            for (&bk, &ak) in brow.iter().zip(&acol) {
                acc = bk.mul_add(ak, acc);
            }
            *o = round.round(wv + round.round(acc * f.scale));
        }
        e += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_fold_matches_a_naive_product_on_any_chunking() {
        let (out_f, in_f, r) = (5usize, 7usize, 3usize);
        let a: Vec<f32> = (0..r * in_f).map(|x| (x as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..out_f * r).map(|x| (x as f32 * 0.11).cos()).collect();
        let w: Vec<f32> = (0..out_f * in_f).map(|x| x as f32 * 0.01).collect();
        let f = Factors {
            a: &a,
            b: &b,
            rank: r,
            scale: 0.5,
        };
        let want: Vec<f32> = (0..out_f * in_f)
            .map(|idx| {
                let (i, j) = (idx / in_f, idx % in_f);
                let mut acc = 0f32;
                for k in 0..r {
                    acc = b[i * r + k].mul_add(a[k * in_f + j], acc);
                }
                w[idx] + acc * 0.5
            })
            .collect();
        for step in [1usize, 3, 7, 11, 35] {
            let mut got = vec![0f32; w.len()];
            let mut first = 0;
            while first < w.len() {
                let end = (first + step).min(w.len());
                fold_linear(
                    &f,
                    in_f,
                    first,
                    &w[first..end],
                    Precision::F32,
                    &mut got[first..end],
                );
                first = end;
            }
            assert_eq!(got, want, "step {step}");
        }
    }

    #[test]
    fn embedding_fold_transposes_and_rounds_the_delta() {
        // W (3 tokens, dim 2); A (r=1, 3), B (2, 1): delta[i][j] = B[j]·A[i].
        let a = [1.0f32, 2.0, 3.0];
        let b = [0.5f32, 0.25];
        let w = [0.0f32; 6];
        let f = Factors {
            a: &a,
            b: &b,
            rank: 1,
            scale: 2.0,
        };
        let mut out = [0f32; 6];
        fold_embedding(&f, 2, 0, &w, Precision::F32, &mut out);
        assert_eq!(out, [1.0, 0.5, 2.0, 1.0, 3.0, 1.5]);
        let mut tail = [0f32; 3];
        fold_embedding(&f, 2, 3, &w[3..], Precision::F32, &mut tail);
        assert_eq!(tail, [1.0, 3.0, 1.5]);
    }
}

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

use crate::merge::blocks::{map_spans, par_values};
use crate::merge::dtype::DType;
use crate::merge::error::MergeError;
use crate::merge::precision::Precision;
use crate::merge::stream::{TensorStream, sum_start};

fn sum_round(p: Precision, it: impl Iterator<Item = f64>) -> f32 {
    p.round(it.sum::<f64>() as f32)
}

/// `(t, r(1 − t))` from the offsets' rounded norms and their pairwise rounded dot products
/// (pairs `(i, j)`, `i < j`, in order).
fn interpolation(p: Precision, norms: &[f32], dots: &[f32]) -> (f32, f32) {
    let n_models = norms.len();
    let nf = n_models as f32;
    let mut cos_sum = 0.0f64;
    let mut pairs = 0usize;
    for i in 0..n_models {
        for j in i + 1..n_models {
            let np = p.round(norms[i] * norms[j]).max(1e-6);
            let c = p.round(dots[pairs] / np).clamp(-1.0, 1.0);
            cos_sum += c as f64;
            pairs += 1;
        }
    }
    let cos = p.round((cos_sum / pairs.max(1) as f64) as f32);
    let t = p.round(p.round(nf * cos) / p.round(1.0 + p.round((nf - 1.0) * cos)));
    (t, p.round(1.0 - t))
}

/// One output element: the models' average pulled towards the base.
#[inline]
fn element(p: Precision, xs: &[&[f32]], e: usize, b: f32, t: f32, one_minus_t: f32) -> f32 {
    let nf = xs.len() as f32;
    let mut acc = 0.0f32;
    for x in xs {
        acc = p.round(acc + x[e]);
    }
    let avg = p.round(acc / nf);
    p.round(p.round(t * avg) + p.round(one_minus_t * b))
}

/// `xs` are the fine-tuned models (at least two), `row_len` the length of the vectors the
/// statistic is taken over (the whole tensor unless filter-wise).
pub fn model_stock(p: Precision, base: &[f32], xs: &[&[f32]], row_len: usize, out: &mut [f32]) {
    let row_len = row_len.max(1);
    let n_models = xs.len();
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
        let mut dots = Vec::new();
        for i in 0..n_models {
            for j in i + 1..n_models {
                dots.push(sum_round(
                    p,
                    offsets[i]
                        .iter()
                        .zip(&offsets[j])
                        .map(|(a, b)| p.round(a * b) as f64),
                ));
            }
        }
        let (t, one_minus_t) = interpolation(p, &norms, &dots);
        let rows: Vec<&[f32]> = xs.iter().map(|x| &x[start..start + len]).collect();
        for (e, o) in orow.iter_mut().enumerate() {
            *o = element(p, &rows, e, brow[e], t, one_minus_t);
        }
    }
}

/// [`model_stock`] streamed ([`TensorStream`]). Over the whole tensor: one pass for the
/// offsets' norms and dot products (sums in index order), then elementwise. Filter-wise:
/// chunks hold whole rows, each merged on its own. Inputs: the base (when the recipe has one,
/// else the first model stands in for it), then the models.
#[derive(Debug, Clone)]
pub struct ModelStockStream {
    p: Precision,
    has_base: bool,
    models: usize,
    /// `Some(row_len)`: filter-wise.
    rows: Option<usize>,
    pass_done: bool,
    sq: Vec<f64>,
    dot: Vec<f64>,
    coef: Option<(f32, f32)>,
    /// Reused buffer of per-element pre-pass values.
    values: Vec<f32>,
}

impl ModelStockStream {
    pub fn new(p: Precision, has_base: bool, models: usize, rows: Option<usize>) -> Self {
        let pairs = models * models.saturating_sub(1) / 2;
        ModelStockStream {
            p,
            has_base,
            models,
            rows: rows.map(|r| r.max(1)),
            pass_done: rows.is_some(),
            sq: vec![sum_start(); models],
            dot: vec![sum_start(); pairs],
            coef: None,
            values: Vec::new(),
        }
    }

    fn check(&self, inputs: &[(DType, &[u8])]) -> Result<(), MergeError> {
        let want = self.models + usize::from(self.has_base);
        if inputs.len() != want || self.models < 2 {
            return Err(MergeError::WeightCount {
                inputs: inputs.len(),
                weights: want.max(2),
            });
        }
        Ok(())
    }

    /// The base and the models among the decoded blocks.
    fn split<'a>(&self, blocks: &'a [&'a [f32]]) -> (&'a [f32], &'a [&'a [f32]]) {
        if self.has_base {
            (blocks[0], &blocks[1..])
        } else {
            (blocks[0], blocks)
        }
    }
}

impl TensorStream for ModelStockStream {
    fn align(&self) -> usize {
        self.rows.unwrap_or(1)
    }

    fn wants_pass(&self) -> bool {
        !self.pass_done
    }

    fn observe(&mut self, _first: u64, inputs: &[(DType, &[u8])]) -> Result<(), MergeError> {
        self.check(inputs)?;
        let p = self.p;
        let m = self.models;
        let has_base = self.has_base;
        // Per element, in parallel: the offsets `o_i`, then the rounded products `r(o_i·o_j)`
        // (pairs in order); then every sum in index order on this thread.
        let k = m + self.dot.len();
        let mut values = std::mem::take(&mut self.values);
        let pairs = self.dot.len();
        par_values(
            inputs,
            k,
            &mut values,
            || vec![0.0f32; k * crate::merge::BLOCK_ELEMS],
            |cols, _, blocks, out| {
                let len = blocks[0].len();
                let (base, xs) = if has_base {
                    (blocks[0], &blocks[1..])
                } else {
                    (blocks[0], blocks)
                };
                // Column by column (vectorized): `o_i = r(x_i − b)`, then `r(o_i·o_j)`.
                let (o, d) = cols.split_at_mut(m * crate::merge::BLOCK_ELEMS);
                for (oi, x) in o.chunks_mut(crate::merge::BLOCK_ELEMS).zip(xs) {
                    let oi = &mut oi[..len];
                    for ((v, x), b) in oi.iter_mut().zip(x.iter()).zip(base) {
                        *v = x - b;
                    }
                    p.round_slice(oi);
                }
                let mut q = 0;
                for i in 0..m {
                    for j in i + 1..m {
                        let dq = &mut d[q * crate::merge::BLOCK_ELEMS..][..len];
                        let oi = &o[i * crate::merge::BLOCK_ELEMS..][..len];
                        let oj = &o[j * crate::merge::BLOCK_ELEMS..][..len];
                        for ((v, x), y) in dq.iter_mut().zip(oi).zip(oj) {
                            *v = x * y;
                        }
                        p.round_slice(dq);
                        q += 1;
                    }
                }
                let col = |c: usize, e: usize| cols[c * crate::merge::BLOCK_ELEMS + e];
                for (e, v) in out.chunks_exact_mut(k).enumerate() {
                    for (c, v) in v.iter_mut().enumerate().take(m + pairs) {
                        *v = col(c, e);
                    }
                }
            },
        )?;
        if m == 2 {
            let (mut s0, mut s1, mut d) = (self.sq[0], self.sq[1], self.dot[0]);
            for v in values.chunks_exact(3) {
                s0 += (v[0] as f64) * (v[0] as f64);
                s1 += (v[1] as f64) * (v[1] as f64);
                d += v[2] as f64;
            }
            (self.sq[0], self.sq[1], self.dot[0]) = (s0, s1, d);
        } else {
            for v in values.chunks_exact(k) {
                let (o, d) = v.split_at(m);
                for (s, x) in self.sq.iter_mut().zip(o) {
                    *s += (*x as f64) * (*x as f64);
                }
                for (s, x) in self.dot.iter_mut().zip(d) {
                    *s += *x as f64;
                }
            }
        }
        self.values = values;
        Ok(())
    }

    fn end_pass(&mut self) {
        let p = self.p;
        let norms: Vec<f32> = self.sq.iter().map(|s| p.round(s.sqrt() as f32)).collect();
        let dots: Vec<f32> = self.dot.iter().map(|d| p.round(*d as f32)).collect();
        self.coef = Some(interpolation(p, &norms, &dots));
        self.pass_done = true;
        self.values = Vec::new();
    }

    fn merge(
        &self,
        _first: u64,
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        self.check(inputs)?;
        let p = self.p;
        if let Some(row_len) = self.rows {
            let span = (crate::merge::BLOCK_ELEMS / row_len).max(1) * row_len;
            return map_spans(
                inputs,
                out_dtype,
                out,
                span,
                |_| (),
                |_, _, blocks, o| {
                    let (base, xs) = self.split(blocks);
                    model_stock(p, base, xs, row_len, o);
                },
            );
        }
        let (t, omt) = self.coef.ok_or(MergeError::NotReady)?;
        map_spans(
            inputs,
            out_dtype,
            out,
            crate::merge::BLOCK_ELEMS,
            |_| vec![0.0f32; crate::merge::BLOCK_ELEMS],
            |u, _, blocks, o| {
                // `element` across the block, one rounding step at a time.
                let (base, xs) = self.split(blocks);
                let u = &mut u[..o.len()];
                o.fill(0.0);
                for x in xs {
                    for (a, v) in o.iter_mut().zip(x.iter()) {
                        *a += v;
                    }
                    p.round_slice(o);
                }
                let nf = xs.len() as f32;
                o.iter_mut().for_each(|a| *a /= nf);
                p.round_slice(o);
                o.iter_mut().for_each(|a| *a *= t);
                p.round_slice(o);
                for (v, b) in u.iter_mut().zip(base) {
                    *v = omt * b;
                }
                p.round_slice(u);
                for (a, v) in o.iter_mut().zip(u.iter()) {
                    *a += v;
                }
                p.round_slice(o);
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn views(raw: &[Vec<u8>], a: usize, e: usize) -> Vec<(DType, &[u8])> {
        raw.iter()
            .map(|r| (DType::BF16, &r[2 * a..2 * e]))
            .collect()
    }

    #[test]
    fn streamed_equals_whole() {
        use crate::merge::dtype::encode_from_f32;
        let n = 9_000;
        let cols = 300;
        let mut st = 0x1234_5678u64;
        let mut next = || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            ((st >> 40) % 400) as f32 * 0.0005 + 0.9
        };
        let p = Precision::BF16;
        let vs: Vec<Vec<f32>> = (0..4)
            .map(|_| (0..n).map(|_| p.round(next())).collect())
            .collect();
        let raw: Vec<Vec<u8>> = vs
            .iter()
            .map(|v| {
                let mut b = vec![0u8; 2 * n];
                encode_from_f32(DType::BF16, v, &mut b).unwrap();
                b
            })
            .collect();
        for has_base in [true, false] {
            for rows in [None, Some(cols)] {
                let (base, xs): (&[f32], Vec<&[f32]>) = if has_base {
                    (
                        vs[0].as_slice(),
                        vs[1..].iter().map(|v| v.as_slice()).collect(),
                    )
                } else {
                    (vs[0].as_slice(), vs.iter().map(|v| v.as_slice()).collect())
                };
                let mut want = vec![0.0f32; n];
                model_stock(p, base, &xs, rows.unwrap_or(n), &mut want);
                let mut wb = vec![0u8; 2 * n];
                encode_from_f32(DType::BF16, &want, &mut wb).unwrap();
                let models = xs.len();
                for chunk in [cols, 3 * cols, n] {
                    let mut s = ModelStockStream::new(p, has_base, models, rows);
                    let ins = |a: usize, e: usize| views(&raw, a, e);
                    while s.wants_pass() {
                        for a in (0..n).step_by(chunk) {
                            s.observe(a as u64, &ins(a, (a + chunk).min(n))).unwrap();
                        }
                        s.end_pass();
                    }
                    let mut got = vec![0u8; 2 * n];
                    for a in (0..n).step_by(chunk) {
                        let e = (a + chunk).min(n);
                        s.merge(a as u64, &ins(a, e), DType::BF16, &mut got[2 * a..2 * e])
                            .unwrap();
                    }
                    assert!(got == wb, "base {has_base} rows {rows:?} chunk {chunk}");
                }
            }
        }
    }

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

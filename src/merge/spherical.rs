//! NuSLERP and the Karcher mean as mergekit computes them on torch tensors (ALGORITHMS.md
//! §11.3–§11.4), rounding to the compute precision `r(·)` after every tensor op.
//!
//! torch details that decide bf16 bit parity (conformance README): a Python float meets a
//! tensor at f32 precision; a 0-dim f32 tensor meeting a bf16 tensor is rounded to bf16 first,
//! except as the right operand of `*` or `/`; reductions accumulate (here in f64) and round once.

use crate::merge::blocks::{map_spans, par_values};
use crate::merge::dtype::DType;
use crate::merge::error::MergeError;
use crate::merge::precision::Precision;
use crate::merge::stream::{TensorStream, sum_start};

fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt()
}

/// The interpolation of one vector pair once its norms and cosine are known.
#[derive(Debug, Clone, Copy, PartialEq)]
struct NuCoef {
    lerp: bool,
    s0: f32,
    s1: f32,
    sin_theta: f32,
    one_minus: f32,
    tf: f32,
}

/// A vector's norm as `nuslerp` divides by it, from its sum of squares.
fn nu_norm(p: Precision, sq: f64) -> f32 {
    p.round(sq.sqrt() as f32).max(1e-7)
}

fn nu_coef(p: Precision, t: f64, cos: f32) -> NuCoef {
    let theta = p.round(cos.clamp(-1.0, 1.0).acos());
    let sin_theta = p.round(theta.sin());
    let tf = t as f32;
    let one_minus = (1.0 - t) as f32;
    let lerp = sin_theta.abs() < 1e-8;
    let (s0, s1) = if lerp {
        (0.0, 0.0)
    } else {
        (
            p.round(p.round(one_minus * theta).sin()),
            p.round(p.round(tf * theta).sin()),
        )
    };
    NuCoef {
        lerp,
        s0,
        s1,
        sin_theta,
        one_minus,
        tf,
    }
}

#[inline]
fn nu_apply(p: Precision, c: &NuCoef, a: f32, b: f32) -> f32 {
    if c.lerp {
        p.round(p.round(c.one_minus * a) + p.round(c.tf * b))
    } else {
        p.round(p.round(p.round(c.s0 * a) + p.round(c.s1 * b)) / c.sin_theta)
    }
}

/// One term of the cosine: the product of the normalized elements.
#[inline]
fn nu_cos_term(p: Precision, a: f32, b: f32, n0: f32, n1: f32) -> f32 {
    p.round(p.round(a / n0) * p.round(b / n1))
}

/// mergekit's `nuslerp` on one vector pair (already task vectors when there is a base):
/// normalize (norm clamped to ≥ 1e-7), `cos = r(Σ r(u0·u1))`, `θ = r(acos)`, and
/// `r(r(r(sin(r((1−t)θ)))·v0) + r(r(sin(r(tθ)))·v1)) / r(sin θ)`, lerp when `|sin θ| < 1e-8`.
pub fn nuslerp_vec(p: Precision, t: f64, v0: &[f32], v1: &[f32], out: &mut [f32]) {
    let n0 = p.round(norm(v0) as f32).max(1e-7);
    let n1 = p.round(norm(v1) as f32).max(1e-7);
    let cos = p.round(
        v0.iter()
            .zip(v1)
            .map(|(a, b)| nu_cos_term(p, *a, *b, n0, n1) as f64)
            .sum::<f64>() as f32,
    );
    let c = nu_coef(p, t, cos);
    for ((o, a), b) in out.iter_mut().zip(v0).zip(v1) {
        *o = nu_apply(p, &c, *a, *b);
    }
}

/// How NuSLERP splits a tensor into vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NuslerpShape {
    /// The whole tensor is one vector (`nuslerp_flatten: true`, the default).
    Flatten,
    /// Each row (last dimension) is a vector.
    Rows,
    /// Each column (first dimension of a 2-D tensor) is a vector (`nuslerp_row_wise`).
    Columns,
}

/// `out = [b +] nuslerp(t, x0 [− b], x1 [− b])` for a tensor of shape `rows × cols`.
#[allow(clippy::too_many_arguments)]
pub fn nuslerp(
    p: Precision,
    t: f64,
    base: Option<&[f32]>,
    x0: &[f32],
    x1: &[f32],
    shape: NuslerpShape,
    cols: usize,
    out: &mut [f32],
) {
    let (v0, v1): (Vec<f32>, Vec<f32>) = match base {
        Some(b) => (
            x0.iter().zip(b).map(|(x, b)| p.round(x - b)).collect(),
            x1.iter().zip(b).map(|(x, b)| p.round(x - b)).collect(),
        ),
        None => (x0.to_vec(), x1.to_vec()),
    };
    let n = out.len();
    let cols = cols.max(1);
    match shape {
        NuslerpShape::Flatten => nuslerp_vec(p, t, &v0, &v1, out),
        NuslerpShape::Rows => {
            for ((o, a), b) in out
                .chunks_mut(cols)
                .zip(v0.chunks(cols))
                .zip(v1.chunks(cols))
            {
                nuslerp_vec(p, t, a, b, o);
            }
        }
        NuslerpShape::Columns => {
            let rows = n / cols;
            let mut a = vec![0.0f32; rows];
            let mut b = vec![0.0f32; rows];
            let mut o = vec![0.0f32; rows];
            for c in 0..cols {
                for r in 0..rows {
                    a[r] = v0[r * cols + c];
                    b[r] = v1[r * cols + c];
                }
                nuslerp_vec(p, t, &a, &b, &mut o);
                for r in 0..rows {
                    out[r * cols + c] = o[r];
                }
            }
        }
    }
    if let Some(b) = base {
        for (o, b) in out.iter_mut().zip(b) {
            *o = p.round(b + *o);
        }
    }
}

/// [`nuslerp`] streamed ([`TensorStream`]). `Flatten`: pass 1 the two norms, pass 2 the
/// cosine, then elementwise. `Columns`: the same per column (sums over the rows in order, as
/// the whole-tensor kernel's column vectors), `cols` scalars per statistic. `Rows`: chunks
/// hold whole rows, each merged on its own. Inputs: `[base,] x0, x1`.
#[derive(Debug, Clone)]
pub struct NuslerpStream {
    p: Precision,
    t: f64,
    has_base: bool,
    shape: NuslerpShape,
    cols: usize,
    pass: u8,
    sq: [Vec<f64>; 2],
    cos: Vec<f64>,
    norms: [Vec<f32>; 2],
    coefs: Vec<NuCoef>,
    /// Reused buffer of per-element pre-pass values.
    values: Vec<f32>,
}

impl NuslerpStream {
    pub fn new(
        p: Precision,
        t: f64,
        has_base: bool,
        shape: NuslerpShape,
        cols: usize,
        n: u64,
    ) -> Self {
        let cols = cols.max(1);
        // Flatten: one vector; Columns: one per column; Rows: no statistic.
        let vectors = match shape {
            NuslerpShape::Flatten => 1,
            NuslerpShape::Columns => cols.min(n.max(1) as usize),
            NuslerpShape::Rows => 0,
        };
        NuslerpStream {
            p,
            t,
            has_base,
            shape,
            cols,
            pass: if vectors == 0 { 2 } else { 0 },
            sq: [vec![sum_start(); vectors], vec![sum_start(); vectors]],
            cos: vec![sum_start(); vectors],
            norms: [Vec::new(), Vec::new()],
            coefs: Vec::new(),
            values: Vec::new(),
        }
    }

    fn check(&self, inputs: &[(DType, &[u8])]) -> Result<(), MergeError> {
        let want = 2 + usize::from(self.has_base);
        if inputs.len() != want {
            return Err(MergeError::WeightCount {
                inputs: inputs.len(),
                weights: want,
            });
        }
        Ok(())
    }

    /// The vector element `e` (of the whole tensor) belongs to.
    #[inline]
    fn vector(&self, e: u64) -> usize {
        match self.shape {
            NuslerpShape::Columns => (e % self.cols as u64) as usize,
            _ => 0,
        }
    }

    /// The vector of the element after one of vector `v` (no division per element).
    #[inline]
    fn next_vector(&self, v: usize) -> usize {
        match self.shape {
            NuslerpShape::Columns if v + 1 < self.cols => v + 1,
            _ => 0,
        }
    }
}

/// One block's (task) vector values of both models, `a` and `b` (as [`nu_values`], across
/// the block so that the loops vectorize).
struct NuCols {
    a: Vec<f32>,
    b: Vec<f32>,
}

impl NuCols {
    fn new() -> NuCols {
        NuCols {
            a: vec![0.0; crate::merge::BLOCK_ELEMS],
            b: vec![0.0; crate::merge::BLOCK_ELEMS],
        }
    }

    fn fill(&mut self, p: Precision, has_base: bool, blocks: &[&[f32]]) {
        let len = blocks[0].len();
        let (a, b) = (&mut self.a[..len], &mut self.b[..len]);
        if has_base {
            let base = blocks[0];
            for ((a, x), y) in a.iter_mut().zip(blocks[1]).zip(base) {
                *a = x - y;
            }
            for ((b, x), y) in b.iter_mut().zip(blocks[2]).zip(base) {
                *b = x - y;
            }
            p.round_slice(a);
            p.round_slice(b);
        } else {
            a.copy_from_slice(blocks[0]);
            b.copy_from_slice(blocks[1]);
        }
    }
}

impl TensorStream for NuslerpStream {
    fn align(&self) -> usize {
        match self.shape {
            NuslerpShape::Rows => self.cols,
            _ => 1,
        }
    }

    fn wants_pass(&self) -> bool {
        self.pass < 2
    }

    fn observe(&mut self, first: u64, inputs: &[(DType, &[u8])]) -> Result<(), MergeError> {
        self.check(inputs)?;
        let p = self.p;
        let has_base = self.has_base;
        let pass = self.pass;
        // The per-element values in parallel (pass 0: both task-vector values; pass 1: the
        // rounded cosine term), then the sums in index order on this thread.
        let k = if pass == 0 { 2 } else { 1 };
        let mut values = std::mem::take(&mut self.values);
        let this = &*self;
        par_values(
            inputs,
            k,
            &mut values,
            NuCols::new,
            |cols, start, blocks, out| {
                let len = blocks[0].len();
                cols.fill(p, has_base, blocks);
                let (a, b) = (&mut cols.a[..len], &mut cols.b[..len]);
                if pass == 0 {
                    for (o, (a, b)) in out.chunks_exact_mut(2).zip(a.iter().zip(b.iter())) {
                        o[0] = *a;
                        o[1] = *b;
                    }
                } else if this.shape == NuslerpShape::Flatten {
                    // `r(r(a/n0)·r(b/n1))` across the block (the same operations as
                    // `nu_cos_term`, one rounding step at a time).
                    let (n0, n1) = (this.norms[0][0], this.norms[1][0]);
                    a.iter_mut().for_each(|x| *x /= n0);
                    p.round_slice(a);
                    b.iter_mut().for_each(|x| *x /= n1);
                    p.round_slice(b);
                    a.iter_mut().zip(b.iter()).for_each(|(x, y)| *x *= y);
                    p.round_slice(a);
                    out.copy_from_slice(a);
                } else {
                    let mut v = this.vector(first + start as u64);
                    for (o, (a, b)) in out.iter_mut().zip(a.iter().zip(b.iter())) {
                        *o = nu_cos_term(p, *a, *b, this.norms[0][v], this.norms[1][v]);
                        v = this.next_vector(v);
                    }
                }
            },
        )?;
        let mut v = self.vector(first);
        if pass == 0 {
            let [sq0, sq1] = &mut self.sq;
            if self.shape == NuslerpShape::Flatten {
                let (mut s0, mut s1) = (sq0[0], sq1[0]);
                for ab in values.chunks_exact(2) {
                    s0 += (ab[0] as f64) * (ab[0] as f64);
                    s1 += (ab[1] as f64) * (ab[1] as f64);
                }
                (sq0[0], sq1[0]) = (s0, s1);
            } else {
                for ab in values.chunks_exact(2) {
                    sq0[v] += (ab[0] as f64) * (ab[0] as f64);
                    sq1[v] += (ab[1] as f64) * (ab[1] as f64);
                    v = if v + 1 < self.cols { v + 1 } else { 0 };
                }
            }
        } else if self.shape == NuslerpShape::Flatten {
            let mut c = self.cos[0];
            for t in &values {
                c += *t as f64;
            }
            self.cos[0] = c;
        } else {
            for t in &values {
                self.cos[v] += *t as f64;
                v = if v + 1 < self.cols { v + 1 } else { 0 };
            }
        }
        self.values = values;
        Ok(())
    }

    fn end_pass(&mut self) {
        let p = self.p;
        if self.pass == 0 {
            self.norms = [
                self.sq[0].iter().map(|s| nu_norm(p, *s)).collect(),
                self.sq[1].iter().map(|s| nu_norm(p, *s)).collect(),
            ];
        } else {
            self.coefs = self
                .cos
                .iter()
                .map(|c| nu_coef(p, self.t, p.round(*c as f32)))
                .collect();
            self.values = Vec::new();
        }
        self.pass += 1;
    }

    fn merge(
        &self,
        first: u64,
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        self.check(inputs)?;
        let p = self.p;
        let has_base = self.has_base;
        if self.shape == NuslerpShape::Rows {
            let cols = self.cols;
            let span = (crate::merge::BLOCK_ELEMS / cols).max(1) * cols;
            return map_spans(
                inputs,
                out_dtype,
                out,
                span,
                |_| (),
                |_, _, blocks, o| {
                    let (base, x0, x1) = if has_base {
                        (Some(blocks[0]), blocks[1], blocks[2])
                    } else {
                        (None, blocks[0], blocks[1])
                    };
                    nuslerp(p, self.t, base, x0, x1, NuslerpShape::Rows, cols, o);
                },
            );
        }
        if self.wants_pass() {
            return Err(MergeError::NotReady);
        }
        map_spans(
            inputs,
            out_dtype,
            out,
            crate::merge::BLOCK_ELEMS,
            |_| NuCols::new(),
            |cols, start, blocks, o| {
                let len = o.len();
                cols.fill(p, has_base, blocks);
                let (a, b) = (&mut cols.a[..len], &mut cols.b[..len]);
                if self.shape == NuslerpShape::Flatten {
                    // `nu_apply` across the block, one rounding step at a time.
                    let c = &self.coefs[0];
                    let (ca, cb) = if c.lerp {
                        (c.one_minus, c.tf)
                    } else {
                        (c.s0, c.s1)
                    };
                    a.iter_mut().for_each(|x| *x *= ca);
                    p.round_slice(a);
                    b.iter_mut().for_each(|x| *x *= cb);
                    p.round_slice(b);
                    for ((o, a), b) in o.iter_mut().zip(a.iter()).zip(b.iter()) {
                        *o = a + b;
                    }
                    p.round_slice(o);
                    if !c.lerp {
                        o.iter_mut().for_each(|x| *x /= c.sin_theta);
                        p.round_slice(o);
                    }
                } else {
                    let mut v = self.vector(first + start as u64);
                    for ((o, a), b) in o.iter_mut().zip(a.iter()).zip(b.iter()) {
                        let c = &self.coefs[v];
                        v = self.next_vector(v);
                        *o = nu_apply(p, c, *a, *b);
                    }
                }
                if has_base {
                    // `b + v` in this order, as the scalar kernel adds them.
                    #[allow(clippy::assign_op_pattern)]
                    for (o, x) in o.iter_mut().zip(blocks[0]) {
                        *o = x + *o;
                    }
                    p.round_slice(o);
                }
            },
        )
    }
}

/// mergekit's `karcher_merge_tensors` with equal weights `1/N`.
/// `final_scale_bf16`: round the final scale `Σ αᵢ‖xᵢ‖` to the compute precision before
/// multiplying (what the conformance pack shows torch doing).
pub fn karcher(p: Precision, xs: &[&[f32]], max_iter: usize, tol: f64, out: &mut [f32]) {
    let n = out.len();
    if xs.len() == 1 {
        out.copy_from_slice(xs[0]);
        return;
    }
    let alpha = 1.0 / xs.len() as f64;
    let mut norms = Vec::with_capacity(xs.len());
    let mut units: Vec<Vec<f32>> = Vec::with_capacity(xs.len());
    for x in xs {
        let nv = norm(x) as f32; // f32 0-dim tensor
        norms.push(nv as f64);
        if nv == 0.0 {
            units.push(vec![0.0; n]);
        } else {
            units.push(x.iter().map(|v| p.round(v / nv)).collect());
        }
    }
    let valid: Vec<usize> = (0..xs.len()).filter(|&i| norms[i] > tol).collect();
    if valid.is_empty() {
        out.fill(0.0);
        return;
    }
    let alpha_sum: f64 = valid.iter().map(|_| alpha).sum();
    let na: Vec<f32> = valid.iter().map(|_| (alpha / alpha_sum) as f32).collect();
    let vu: Vec<&[f32]> = valid.iter().map(|&i| units[i].as_slice()).collect();
    let mut u = vec![0.0f32; n];
    for (a, ui) in na.iter().zip(&vu) {
        for (x, v) in u.iter_mut().zip(ui.iter()) {
            *x = p.round(*x + p.round(a * v));
        }
    }
    let norm_u = norm(&u) as f32;
    if (norm_u as f64) < tol {
        u.copy_from_slice(vu[0]);
    } else {
        for x in u.iter_mut() {
            *x = p.round(*x / norm_u);
        }
    }
    let mut t_vec = vec![0.0f32; n];
    for _ in 0..max_iter {
        t_vec.fill(0.0);
        for (a, ui) in na.iter().zip(&vu) {
            let dot = p
                .round(
                    u.iter()
                        .zip(ui.iter())
                        .map(|(x, y)| *x as f64 * *y as f64)
                        .sum::<f64>() as f32,
                )
                .clamp(-1.0, 1.0);
            let theta = p.round(dot.acos());
            if (theta as f64) < tol {
                continue;
            }
            let sin_theta = p.round(theta.sin());
            let coef = p.round(a * p.round(theta / sin_theta));
            for ((tv, x), y) in t_vec.iter_mut().zip(&u).zip(ui.iter()) {
                let diff = p.round(y - p.round(dot * x));
                *tv = p.round(*tv + p.round(coef * diff));
            }
        }
        let norm_t = norm(&t_vec) as f32;
        if (norm_t as f64) < tol {
            break;
        }
        // 0-dim f32 on the left of `*`: rounded to the tensor's dtype first.
        let c = p.round(norm_t.cos());
        let s = p.round(norm_t.sin());
        for (x, tv) in u.iter_mut().zip(&t_vec) {
            *x = p.round(p.round(c * *x) + p.round(s * p.round(tv / norm_t)));
        }
        let un = norm(&u) as f32;
        if (un as f64) > tol {
            for x in u.iter_mut() {
                *x = p.round(*x / un);
            }
        }
    }
    let scale: f64 = norms.iter().map(|nv| alpha * nv).sum();
    let sc = p.round(scale as f32);
    for (o, x) in out.iter_mut().zip(&u) {
        *o = p.round(sc * x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nuslerp_ends_and_midpoint() {
        let a = [3.0f32, 0.0, 0.0, 0.0];
        let b = [0.0f32, 3.0, 0.0, 0.0];
        let mut out = [0.0f32; 4];
        let f = Precision::F32;
        nuslerp(f, 0.0, None, &a, &b, NuslerpShape::Flatten, 4, &mut out);
        assert!(out.iter().zip(&a).all(|(x, y)| (x - y).abs() < 1e-6));
        nuslerp(f, 0.5, None, &a, &b, NuslerpShape::Flatten, 4, &mut out);
        let h = 3.0 * std::f32::consts::FRAC_1_SQRT_2;
        assert!((out[0] - h).abs() < 1e-5 && (out[1] - h).abs() < 1e-5);
        // With a base: interpolate the task vectors, add the base back.
        let base = [1.0f32; 4];
        let a1: Vec<f32> = a.iter().map(|x| x + 1.0).collect();
        let b1: Vec<f32> = b.iter().map(|x| x + 1.0).collect();
        nuslerp(
            f,
            0.5,
            Some(&base),
            &a1,
            &b1,
            NuslerpShape::Flatten,
            4,
            &mut out,
        );
        assert!((out[0] - h - 1.0).abs() < 1e-5 && (out[2] - 1.0).abs() < 1e-6);
        // Row-wise: each row of a 2×2 on its own (colinear rows → lerp).
        let r0 = [1.0f32, 0.0, 2.0, 0.0];
        let r1 = [3.0f32, 0.0, 0.0, 2.0];
        nuslerp(f, 0.5, None, &r0, &r1, NuslerpShape::Rows, 2, &mut out);
        assert_eq!(out[..2], [2.0, 0.0]);
        assert!((out[2] - 2.0 * std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-5);
    }

    fn views(
        raw: &[Vec<u8>],
        dt: crate::merge::DType,
        a: usize,
        e: usize,
    ) -> Vec<(crate::merge::DType, &[u8])> {
        let sz = dt.size_bytes();
        raw.iter().map(|r| (dt, &r[sz * a..sz * e])).collect()
    }

    #[test]
    fn nuslerp_streamed_equals_whole() {
        use crate::merge::DType;
        use crate::merge::dtype::encode_from_f32;
        let (rows, cols) = (37, 250);
        let n = rows * cols;
        let mut st = 0x9876_5431u64;
        let mut next = || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            ((st >> 40) % 1000) as f32 * 0.0001 - 0.05
        };
        for (p, dt) in [(Precision::BF16, DType::BF16), (Precision::F32, DType::F32)] {
            let vs: Vec<Vec<f32>> = (0..3)
                .map(|_| (0..n).map(|_| p.round(next())).collect())
                .collect();
            let raw: Vec<Vec<u8>> = vs
                .iter()
                .map(|v| {
                    let mut b = vec![0u8; n * dt.size_bytes()];
                    encode_from_f32(dt, v, &mut b).unwrap();
                    b
                })
                .collect();
            for has_base in [true, false] {
                for shape in [
                    NuslerpShape::Flatten,
                    NuslerpShape::Rows,
                    NuslerpShape::Columns,
                ] {
                    let base = has_base.then_some(vs[0].as_slice());
                    let (x0, x1) = if has_base {
                        (&vs[1], &vs[2])
                    } else {
                        (&vs[0], &vs[1])
                    };
                    let mut want = vec![0.0f32; n];
                    nuslerp(p, 0.3, base, x0, x1, shape, cols, &mut want);
                    let mut wb = vec![0u8; n * dt.size_bytes()];
                    encode_from_f32(dt, &want, &mut wb).unwrap();
                    let ins: Vec<Vec<u8>> = if has_base {
                        raw.clone()
                    } else {
                        raw[..2].to_vec()
                    };
                    for chunk in [cols, 3 * cols, n] {
                        let mut s = NuslerpStream::new(p, 0.3, has_base, shape, cols, n as u64);
                        while s.wants_pass() {
                            for a in (0..n).step_by(chunk) {
                                s.observe(a as u64, &views(&ins, dt, a, (a + chunk).min(n)))
                                    .unwrap();
                            }
                            s.end_pass();
                        }
                        let mut got = vec![0u8; n * dt.size_bytes()];
                        let sz = dt.size_bytes();
                        for a in (0..n).step_by(chunk) {
                            let e = (a + chunk).min(n);
                            s.merge(
                                a as u64,
                                &views(&ins, dt, a, e),
                                dt,
                                &mut got[sz * a..sz * e],
                            )
                            .unwrap();
                        }
                        assert!(got == wb, "{p:?} base {has_base} {shape:?} chunk {chunk}");
                    }
                }
            }
        }
    }

    #[test]
    fn karcher_of_two_orthogonal_vectors() {
        let a = [2.0f32, 0.0, 0.0, 0.0];
        let b = [0.0f32, 4.0, 0.0, 0.0];
        let mut out = [0.0f32; 4];
        karcher(Precision::F32, &[&a, &b], 10, 1e-5, &mut out);
        // Direction: the bisector; scale: mean of the norms (3).
        let h = 3.0 * std::f32::consts::FRAC_1_SQRT_2;
        assert!(
            (out[0] - h).abs() < 1e-4 && (out[1] - h).abs() < 1e-4,
            "{out:?}"
        );
        // Same model twice gives the model.
        karcher(Precision::F32, &[&a, &a], 10, 1e-5, &mut out);
        assert!(out.iter().zip(&a).all(|(x, y)| (x - y).abs() < 1e-5));
    }
}

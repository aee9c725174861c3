//! RAM (Reinforced Agent Merging) and its tensor-local RAM+ variant, as mergekit 0.1.5's
//! `ram` / `ramplus_tl` compute them (`mergekit/merge_methods/ram.py`).
//!
//! Per element, with task vectors `τᵢ = r(xᵢ − b)` (`r`: rounding to the inputs' precision, as
//! torch's bf16 arithmetic does), a model *contributes* where `|τᵢ| > r(ε)`; `c` is the number of
//! contributing models. A contribution is kept whole where it is the only one (`c = 1`) and
//! averaged where several overlap (`τᵢ / c`):
//!
//! - `ram`: `r(b + r(Σᵢ tᵢ))`, `tᵢ = τᵢ` (c = 1), `r(τᵢ / c)` (c > 1), `τᵢ·0` (not contributing);
//!   elementwise.
//! - `ramplus_tl`: unique contributions are scaled by `λᵢ = 1 + r_·clamp(ρᵢ, 0, α)`, with
//!   `ρᵢ = sharedᵢ / max(uniqueᵢ, ε)` counted over the whole tensor (`sharedᵢ`: elements where model
//!   `i` contributes and `c > 1`, `uniqueᵢ`: where it alone does). mergekit multiplies the bf16
//!   task vectors by a float32 `λ`, so the sum and the result are float32: `b + Σᵢ tᵢ` in f32
//!   (the method writes float32 unless the recipe names an output dtype). One pre-pass counts.
//!
//! Inputs: the base first, then the models.

use crate::merge::blocks::{map_blocks, scan_spans};
use crate::merge::dtype::DType;
use crate::merge::error::MergeError;
use crate::merge::precision::Precision;
use crate::merge::stream::{TensorStream, sum_start};

/// mergekit's default `epsilon` (both methods).
pub const DEFAULT_EPSILON: f64 = 1e-5;
/// mergekit's default `r` of `ramplus_tl`.
pub const DEFAULT_R: f64 = 0.1;
/// mergekit's default `alpha` of `ramplus_tl`.
pub const DEFAULT_ALPHA: f64 = 0.2;

fn check(inputs: &[(DType, &[u8])], models: usize) -> Result<(), MergeError> {
    if inputs.len() != models + 1 || models == 0 {
        return Err(MergeError::WeightCount {
            inputs: inputs.len(),
            weights: models + 1,
        });
    }
    Ok(())
}

/// The task vectors of element `e` into `tv`, and the number of contributing models.
#[inline]
fn task_values(p: Precision, eps: f32, blocks: &[&[f32]], e: usize, tv: &mut [f32]) -> usize {
    let b = blocks[0][e];
    let mut count = 0;
    for (t, x) in tv.iter_mut().zip(&blocks[1..]) {
        *t = p.round(x[e] - b);
        count += usize::from(t.abs() > eps);
    }
    count
}

/// The averaged part of model `i`'s term: `(τ·[contributes]·[c > 1]) / max(c, 1)`, in `p`.
#[inline]
fn overlap_term(p: Precision, eps: f32, t: f32, count: usize) -> f32 {
    let z = if t.abs() > eps { t } else { t * 0.0 };
    if count > 1 {
        p.round(z / p.round(count as f32))
    } else {
        z * 0.0
    }
}

/// `ram` over whole inputs (base first), elementwise: any chunking gives the same bits.
pub fn ram(
    p: Precision,
    epsilon: f64,
    inputs: &[(DType, &[u8])],
    out_dtype: DType,
    out: &mut [u8],
) -> Result<(), MergeError> {
    let models = inputs.len().saturating_sub(1);
    check(inputs, models)?;
    let eps = p.scalar(epsilon);
    map_blocks(inputs, out_dtype, out, |blocks, o| {
        let mut tv = vec![0.0f32; models];
        for (e, o) in o.iter_mut().enumerate() {
            let count = task_values(p, eps, blocks, e, &mut tv);
            let mut sum = sum_start();
            for &t in &tv {
                let z = if t.abs() > eps { t } else { t * 0.0 };
                let unique = if count == 1 { z } else { z * 0.0 };
                sum += p.round(unique + overlap_term(p, eps, t, count)) as f64;
            }
            *o = p.round(blocks[0][e] + p.round(sum as f32));
        }
    })
}

/// `ramplus_tl` streamed: one counting pass, then elementwise.
#[derive(Debug, Clone)]
pub struct RamPlusStream {
    p: Precision,
    models: usize,
    eps: f32,
    epsilon: f64,
    r: f64,
    alpha: f64,
    counted: bool,
    shared: Vec<u64>,
    unique: Vec<u64>,
    lambda: Vec<f32>,
}

impl RamPlusStream {
    pub fn new(p: Precision, models: usize, r: f64, alpha: f64, epsilon: f64) -> RamPlusStream {
        RamPlusStream {
            p,
            models,
            eps: p.scalar(epsilon),
            epsilon,
            r,
            alpha,
            counted: false,
            shared: vec![0; models],
            unique: vec![0; models],
            lambda: Vec::new(),
        }
    }

    /// Per model `λᵢ` (after the pass).
    pub fn lambdas(&self) -> &[f32] {
        &self.lambda
    }
}

impl TensorStream for RamPlusStream {
    fn align(&self) -> usize {
        1
    }

    fn wants_pass(&self) -> bool {
        !self.counted
    }

    fn observe(&mut self, _first: u64, inputs: &[(DType, &[u8])]) -> Result<(), MergeError> {
        check(inputs, self.models)?;
        let (p, eps) = (self.p, self.eps);
        let mut tv = vec![0.0f32; self.models];
        let (shared, unique) = (&mut self.shared, &mut self.unique);
        scan_spans(inputs, crate::merge::BLOCK_ELEMS, |_, blocks| {
            for e in 0..blocks[0].len() {
                let count = task_values(p, eps, blocks, e, &mut tv);
                if count == 0 {
                    continue;
                }
                for (i, t) in tv.iter().enumerate() {
                    if t.abs() > eps {
                        if count > 1 {
                            shared[i] += 1;
                        } else {
                            unique[i] += 1;
                        }
                    }
                }
            }
        })
    }

    fn end_pass(&mut self) {
        // torch: `shared / unique.clamp(min=ε)` is a float32 division of the counts
        // (`clamp` with a float bound makes the int64 counts float32), then `1 + r·clamp(ρ, 0, α)`.
        let (eps, r, alpha) = (self.epsilon as f32, self.r as f32, self.alpha as f32);
        self.lambda = self
            .shared
            .iter()
            .zip(&self.unique)
            .map(|(s, u)| {
                let rho = *s as f32 / (*u as f32).max(eps);
                1.0 + r * rho.clamp(0.0, alpha)
            })
            .collect();
        self.counted = true;
    }

    fn merge(
        &self,
        _first: u64,
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        check(inputs, self.models)?;
        if !self.counted {
            return Err(MergeError::NotReady);
        }
        let (p, eps) = (self.p, self.eps);
        let lambda = &self.lambda;
        map_blocks(inputs, out_dtype, out, |blocks, o| {
            let mut tv = vec![0.0f32; lambda.len()];
            for (e, o) in o.iter_mut().enumerate() {
                let count = task_values(p, eps, blocks, e, &mut tv);
                // float32 from here: a bf16 term times the float32 λ.
                let mut sum = 0.0f32;
                for (i, &t) in tv.iter().enumerate() {
                    let z = if t.abs() > eps { t } else { t * 0.0 };
                    let unique = if count == 1 { z } else { z * 0.0 };
                    let term = unique * lambda[i] + overlap_term(p, eps, t, count);
                    sum = if i == 0 { term } else { sum + term };
                }
                *o = blocks[0][e] + sum;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::dtype::{decode_to_f32, encode_from_f32};
    use crate::merge::stream::run_whole;

    fn enc(dt: DType, v: &[f32]) -> Vec<u8> {
        let mut b = vec![0u8; v.len() * dt.size_bytes()];
        encode_from_f32(dt, v, &mut b).unwrap();
        b
    }

    fn dec(dt: DType, b: &[u8]) -> Vec<f32> {
        let mut v = vec![0.0f32; b.len() / dt.size_bytes()];
        decode_to_f32(dt, b, &mut v).unwrap();
        v
    }

    #[test]
    fn ram_by_hand() {
        // Element 0: only model 0 moves (kept whole); 1: both move (averaged);
        // 2: below epsilon everywhere (the base).
        let base = [1.0f32, 1.0, 1.0];
        let x0 = [1.5f32, 2.0, 1.0 + 1e-7];
        let x1 = [1.0f32, 3.0, 1.0];
        let raw = [
            enc(DType::F32, &base),
            enc(DType::F32, &x0),
            enc(DType::F32, &x1),
        ];
        let ins: Vec<(DType, &[u8])> = raw.iter().map(|r| (DType::F32, r.as_slice())).collect();
        let mut out = vec![0u8; 12];
        ram(Precision::F32, DEFAULT_EPSILON, &ins, DType::F32, &mut out).unwrap();
        assert_eq!(dec(DType::F32, &out), vec![1.5, 2.5, 1.0]);
    }

    #[test]
    fn ramplus_scales_unique_contributions() {
        // Model 0: 1 shared, 1 unique element → ρ = 1, λ = 1 + 0.1·min(1, 0.2) = 1.02.
        // Model 1: 1 shared, 0 unique → ρ = 1/ε, λ = 1.02 as well.
        let base = [0.0f32, 0.0, 0.0];
        let x0 = [1.0f32, 2.0, 0.0];
        let x1 = [0.0f32, 4.0, 0.0];
        let raw = [
            enc(DType::F32, &base),
            enc(DType::F32, &x0),
            enc(DType::F32, &x1),
        ];
        let ins: Vec<(DType, &[u8])> = raw.iter().map(|r| (DType::F32, r.as_slice())).collect();
        let mut s =
            RamPlusStream::new(Precision::F32, 2, DEFAULT_R, DEFAULT_ALPHA, DEFAULT_EPSILON);
        let mut out = vec![0u8; 12];
        run_whole(&mut s, &ins, DType::F32, &mut out).unwrap();
        let l = 1.0f32 + 0.1f32 * 0.2f32;
        assert_eq!(s.lambdas(), &[l, l]);
        assert_eq!(dec(DType::F32, &out), vec![l, 3.0, 0.0]);
    }

    #[test]
    fn streamed_chunks_equal_whole() {
        let n = 3 * 4096 + 5;
        let mut st = 0x1234_5678u64;
        let mut next = || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            ((st >> 40) % 7) as f32 * 0.01 - 0.03
        };
        let p = Precision::BF16;
        let base: Vec<f32> = (0..n).map(|_| p.round(next())).collect();
        let xs: Vec<Vec<f32>> = (0..3)
            .map(|i| {
                base.iter()
                    .map(|b| if i == 1 { *b } else { p.round(b + next()) })
                    .collect()
            })
            .collect();
        let raw: Vec<Vec<u8>> = std::iter::once(&base)
            .chain(&xs)
            .map(|v| enc(DType::BF16, v))
            .collect();
        let ins: Vec<(DType, &[u8])> = raw.iter().map(|r| (DType::BF16, r.as_slice())).collect();
        let mut whole = RamPlusStream::new(p, 3, DEFAULT_R, DEFAULT_ALPHA, DEFAULT_EPSILON);
        let mut want = vec![0u8; n * 4];
        run_whole(&mut whole, &ins, DType::F32, &mut want).unwrap();
        let mut s = RamPlusStream::new(p, 3, DEFAULT_R, DEFAULT_ALPHA, DEFAULT_EPSILON);
        let step = 1000;
        while s.wants_pass() {
            for a in (0..n).step_by(step) {
                let e = (a + step).min(n);
                let v: Vec<(DType, &[u8])> = raw
                    .iter()
                    .map(|r| (DType::BF16, &r[2 * a..2 * e]))
                    .collect();
                s.observe(a as u64, &v).unwrap();
            }
            s.end_pass();
        }
        let mut got = vec![0u8; n * 4];
        for a in (0..n).step_by(step) {
            let e = (a + step).min(n);
            let v: Vec<(DType, &[u8])> = raw
                .iter()
                .map(|r| (DType::BF16, &r[2 * a..2 * e]))
                .collect();
            s.merge(a as u64, &v, DType::F32, &mut got[4 * a..4 * e])
                .unwrap();
        }
        assert_eq!(got, want);
        // ram is elementwise: chunks of it are the whole.
        let mut whole = vec![0u8; n * 2];
        ram(p, DEFAULT_EPSILON, &ins, DType::BF16, &mut whole).unwrap();
        let v: Vec<(DType, &[u8])> = raw.iter().map(|r| (DType::BF16, &r[..200])).collect();
        let mut part = vec![0u8; 200];
        ram(p, DEFAULT_EPSILON, &v, DType::BF16, &mut part).unwrap();
        assert_eq!(part, whole[..200]);
    }
}

//! Multi-SLERP: barycentric interpolation of several models on the hypersphere, as mergekit
//! 0.1.5's `multislerp` computes it (`mergekit/merge_methods/multislerp.py`), every tensor op
//! rounded to the inputs' precision `r(·)` (torch's bf16 arithmetic; reductions accumulate,
//! here in f64, and round once).
//!
//! On the flattened tensors `vᵢ` (task vectors `r(xᵢ − b)` with a base), weights `wᵢ` (bf16
//! tensors in mergekit; normalized to sum 1 by default):
//! `nᵢ = r‖vᵢ‖`, `ûᵢ = r(vᵢ / r(nᵢ + ε))`, `m = r(Σ r(ûᵢ·wᵢ))`, `m̂ = r(m / r‖m‖)`,
//! `dᵢ = r(Σₑ r(ûᵢ·m̂))`, `τ = r(Σ r(r(ûᵢ − r(dᵢ·m̂))·wᵢ))`, `θ = r(r‖τ‖ + ε)`,
//! `out = r(r(r(m̂·r(cos θ)) + r(τ·r(r(sin θ)/θ)))·r(Σ r(nᵢ·wᵢ)))` (+ the base).
//! Where `‖m‖ < ε` two models fall back to `r(r(v₀w₀) + r(v₁w₁))`; more fail (mergekit raises).
//!
//! Streamed: four pre-passes (the norms, `‖m‖`, the dots, `‖τ‖`), then elementwise. Memory: a
//! few scalars per model. Inputs: `[base,] x₁ … x_N`.

use crate::merge::blocks::{map_blocks, scan_spans};
use crate::merge::dtype::DType;
use crate::merge::error::MergeError;
use crate::merge::precision::Precision;
use crate::merge::stream::{TensorStream, sum_start};

/// mergekit's default `eps`.
pub const DEFAULT_EPS: f64 = 1e-8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Norms,
    MeanNorm,
    Dots,
    TangentNorm,
    Done,
}

#[derive(Debug, Clone)]
pub struct MultislerpStream {
    p: Precision,
    has_base: bool,
    /// The weights as the kernel uses them (rounded, normalized).
    w: Vec<f32>,
    eps: f32,
    stage: Stage,
    sums: Vec<f64>,
    /// Per model `r(nᵢ + ε)`, the unit vectors' divisor.
    den: Vec<f32>,
    /// `r(Σ r(nᵢ·wᵢ))`.
    avg_norm: f32,
    mean_norm: f32,
    /// `‖m‖ < ε`: the lerp fallback (two models).
    lerp: bool,
    dots: Vec<f32>,
    cos: f32,
    sin_div: f32,
}

impl MultislerpStream {
    /// `weights`: one per model (this tensor's values); `normalize`: divide by their sum.
    pub fn new(
        p: Precision,
        has_base: bool,
        weights: &[f64],
        normalize: bool,
        eps: f64,
    ) -> MultislerpStream {
        let mut w: Vec<f32> = weights.iter().map(|x| p.scalar(*x)).collect();
        if normalize {
            let s = p.round(w.iter().map(|x| *x as f64).sum::<f64>() as f32);
            for x in w.iter_mut() {
                *x = p.round(*x / s);
            }
        }
        let models = w.len();
        MultislerpStream {
            p,
            has_base,
            w,
            eps: eps as f32,
            stage: if models <= 1 {
                Stage::Done
            } else {
                Stage::Norms
            },
            sums: vec![sum_start(); models],
            den: Vec::new(),
            avg_norm: 0.0,
            mean_norm: 0.0,
            lerp: false,
            dots: Vec::new(),
            cos: 0.0,
            sin_div: 0.0,
        }
    }

    fn models(&self) -> usize {
        self.w.len()
    }

    fn check(&self, inputs: &[(DType, &[u8])]) -> Result<(), MergeError> {
        let want = self.models() + usize::from(self.has_base);
        if inputs.len() != want || self.models() == 0 {
            return Err(MergeError::WeightCount {
                inputs: inputs.len(),
                weights: want.max(1),
            });
        }
        Ok(())
    }

    /// The (task) vector values of element `e`.
    #[inline]
    fn values(&self, blocks: &[&[f32]], e: usize, v: &mut [f32]) {
        if self.has_base {
            let b = blocks[0][e];
            for (v, x) in v.iter_mut().zip(&blocks[1..]) {
                *v = self.p.round(x[e] - b);
            }
        } else {
            for (v, x) in v.iter_mut().zip(blocks) {
                *v = x[e];
            }
        }
    }

    /// Unit-vector values from the vector values (after the norms pass).
    #[inline]
    fn units(&self, v: &mut [f32]) {
        for (v, d) in v.iter_mut().zip(&self.den) {
            *v = self.p.round(*v / d);
        }
    }

    /// `Σ r(yᵢ·wᵢ)`, rounded once.
    #[inline]
    fn weighted(&self, y: &[f32]) -> f32 {
        let mut s = sum_start();
        for (y, w) in y.iter().zip(&self.w) {
            s += self.p.round(y * w) as f64;
        }
        self.p.round(s as f32)
    }

    /// `m̂` of one element from its unit values.
    #[inline]
    fn mean_hat(&self, u: &[f32]) -> f32 {
        self.p.round(self.weighted(u) / self.mean_norm)
    }

    /// `τ` of one element from its unit values (overwritten) and `m̂`.
    #[inline]
    fn tangent(&self, u: &mut [f32], m: f32) -> f32 {
        let p = self.p;
        for (u, d) in u.iter_mut().zip(&self.dots) {
            *u = p.round(*u - p.round(d * m));
        }
        self.weighted(u)
    }

    fn root(&self, sq: f64) -> f32 {
        self.p.round(sq.sqrt() as f32)
    }
}

impl TensorStream for MultislerpStream {
    fn align(&self) -> usize {
        1
    }

    fn wants_pass(&self) -> bool {
        self.stage != Stage::Done
    }

    fn observe(&mut self, _first: u64, inputs: &[(DType, &[u8])]) -> Result<(), MergeError> {
        self.check(inputs)?;
        let stage = self.stage;
        let mut sums = std::mem::take(&mut self.sums);
        let this = &*self;
        let mut v = vec![0.0f32; this.models()];
        scan_spans(inputs, crate::merge::BLOCK_ELEMS, |_, blocks| {
            for e in 0..blocks[0].len() {
                this.values(blocks, e, &mut v);
                match stage {
                    Stage::Norms => {
                        for (s, x) in sums.iter_mut().zip(&v) {
                            *s += (*x as f64) * (*x as f64);
                        }
                    }
                    Stage::MeanNorm => {
                        this.units(&mut v);
                        let m = this.weighted(&v) as f64;
                        sums[0] += m * m;
                    }
                    Stage::Dots => {
                        this.units(&mut v);
                        let m = this.mean_hat(&v);
                        for (s, u) in sums.iter_mut().zip(&v) {
                            *s += this.p.round(u * m) as f64;
                        }
                    }
                    Stage::TangentNorm => {
                        this.units(&mut v);
                        let m = this.mean_hat(&v);
                        let t = this.tangent(&mut v, m) as f64;
                        sums[0] += t * t;
                    }
                    Stage::Done => {}
                }
            }
        })?;
        self.sums = sums;
        Ok(())
    }

    fn end_pass(&mut self) {
        let p = self.p;
        let models = self.models();
        let sums = std::mem::replace(&mut self.sums, vec![sum_start(); models]);
        self.stage = match self.stage {
            Stage::Norms => {
                let norms: Vec<f32> = sums.iter().map(|s| self.root(*s)).collect();
                self.den = norms.iter().map(|n| p.round(n + self.eps)).collect();
                self.avg_norm = self.weighted(&norms);
                Stage::MeanNorm
            }
            Stage::MeanNorm => {
                self.mean_norm = self.root(sums[0]);
                // torch compares the bf16 norm with the Python float.
                if (self.mean_norm as f64) < self.eps as f64 {
                    self.lerp = true;
                    Stage::Done
                } else {
                    Stage::Dots
                }
            }
            Stage::Dots => {
                self.dots = sums.iter().map(|s| p.round(*s as f32)).collect();
                Stage::TangentNorm
            }
            Stage::TangentNorm => {
                let theta = p.round(self.root(sums[0]) + self.eps);
                self.cos = p.round(theta.cos());
                self.sin_div = p.round(p.round(theta.sin()) / theta);
                Stage::Done
            }
            Stage::Done => Stage::Done,
        };
    }

    fn merge(
        &self,
        _first: u64,
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        self.check(inputs)?;
        if self.wants_pass() {
            return Err(MergeError::NotReady);
        }
        let p = self.p;
        let models = self.models();
        if self.lerp && models != 2 {
            return Err(MergeError::ZeroWeightSum);
        }
        map_blocks(inputs, out_dtype, out, |blocks, o| {
            let mut v = vec![0.0f32; models];
            for (e, o) in o.iter_mut().enumerate() {
                if models == 1 {
                    // mergekit returns the one model's tensor as it is.
                    *o = blocks[blocks.len() - 1][e];
                    continue;
                }
                self.values(blocks, e, &mut v);
                let r = if self.lerp {
                    p.round(p.round(v[0] * self.w[0]) + p.round(v[1] * self.w[1]))
                } else {
                    self.units(&mut v);
                    let m = self.mean_hat(&v);
                    let t = self.tangent(&mut v, m);
                    let r = p.round(p.round(m * self.cos) + p.round(t * self.sin_div));
                    p.round(r * self.avg_norm)
                };
                *o = if self.has_base {
                    p.round(r + blocks[0][e])
                } else {
                    r
                };
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::dtype::{decode_to_f32, encode_from_f32};
    use crate::merge::stream::run_whole;

    fn enc(v: &[f32]) -> Vec<u8> {
        let mut b = vec![0u8; v.len() * 4];
        encode_from_f32(DType::F32, v, &mut b).unwrap();
        b
    }

    fn run(xs: &[&[f32]], w: &[f64], has_base: bool) -> Vec<f32> {
        let raw: Vec<Vec<u8>> = xs.iter().map(|x| enc(x)).collect();
        let ins: Vec<(DType, &[u8])> = raw.iter().map(|r| (DType::F32, r.as_slice())).collect();
        let mut s = MultislerpStream::new(Precision::F32, has_base, w, true, DEFAULT_EPS);
        let mut out = vec![0u8; xs[0].len() * 4];
        run_whole(&mut s, &ins, DType::F32, &mut out).unwrap();
        let mut v = vec![0.0f32; xs[0].len()];
        decode_to_f32(DType::F32, &out, &mut v).unwrap();
        v
    }

    #[test]
    fn interpolates_on_the_sphere() {
        // Two orthogonal unit vectors, equal weights: the midpoint of the arc, norm 1.
        let got = run(&[&[1.0, 0.0], &[0.0, 1.0]], &[1.0, 1.0], false);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!(
            (got[0] - h).abs() < 1e-6 && (got[1] - h).abs() < 1e-6,
            "{got:?}"
        );
        // All weight on one model gives it back.
        let got = run(&[&[3.0, 4.0], &[0.0, 2.0]], &[1.0, 0.0], false);
        assert!(
            (got[0] - 3.0).abs() < 1e-5 && (got[1] - 4.0).abs() < 1e-5,
            "{got:?}"
        );
        // With a base: task vectors, then the base added back.
        let got = run(&[&[1.0, 1.0], &[2.0, 1.0], &[1.0, 2.0]], &[1.0, 1.0], true);
        assert!((got[0] - (1.0 + h)).abs() < 1e-6, "{got:?}");
        // Antipodal with equal weights: the lerp fallback (two models).
        let got = run(&[&[1.0, 0.0], &[-1.0, 0.0]], &[1.0, 1.0], false);
        assert_eq!(got, vec![0.0, 0.0]);
    }

    #[test]
    fn streamed_chunks_equal_whole() {
        let n = 2 * 4096 + 33;
        let p = Precision::BF16;
        let mut st = 0xdead_beefu64;
        let mut next = || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            ((st >> 40) % 2001) as f32 / 1000.0 - 1.0
        };
        let xs: Vec<Vec<f32>> = (0..4)
            .map(|_| (0..n).map(|_| p.round(next())).collect())
            .collect();
        let raw: Vec<Vec<u8>> = xs
            .iter()
            .map(|x| {
                let mut b = vec![0u8; n * 2];
                encode_from_f32(DType::BF16, x, &mut b).unwrap();
                b
            })
            .collect();
        let w = [0.5, 0.3, 0.2];
        let all: Vec<(DType, &[u8])> = raw.iter().map(|r| (DType::BF16, r.as_slice())).collect();
        let mut whole = MultislerpStream::new(p, true, &w, true, DEFAULT_EPS);
        let mut want = vec![0u8; n * 2];
        run_whole(&mut whole, &all, DType::BF16, &mut want).unwrap();
        let mut s = MultislerpStream::new(p, true, &w, true, DEFAULT_EPS);
        let step = 999;
        let part = |a: usize, e: usize| -> Vec<(DType, &[u8])> {
            raw.iter()
                .map(|r| (DType::BF16, &r[2 * a..2 * e]))
                .collect()
        };
        while s.wants_pass() {
            for a in (0..n).step_by(step) {
                s.observe(a as u64, &part(a, (a + step).min(n))).unwrap();
            }
            s.end_pass();
        }
        let mut got = vec![0u8; n * 2];
        for a in (0..n).step_by(step) {
            let e = (a + step).min(n);
            s.merge(a as u64, &part(a, e), DType::BF16, &mut got[2 * a..2 * e])
                .unwrap();
        }
        assert_eq!(got, want);
    }
}

//! The Karcher mean ([`spherical::karcher`](crate::merge::spherical::karcher)) streamed: the
//! same bits without holding the tensor.
//!
//! Each step of the iteration is elementwise once a few scalars are known (the norms, every
//! dot product `u·ûᵢ`, `‖t‖`, `‖u'‖`), and each scalar is a sum over the whole tensor. So the
//! stream keeps only the scalars: a pre-pass per sum (the models' norms, the first mean's norm,
//! then per iteration the dot products, `‖t‖` and `‖u'‖`), and any element's current `u` is
//! recomputed from the inputs by replaying the finished iterations. Passes: `2 + 3·iterations`
//! (at most `2 + 3·max_iter`); the replay makes pass `j` cost `O(j)` per element. Memory: a few
//! scalars per model per iteration.

use crate::merge::blocks::{map_blocks, scan_spans};
use crate::merge::dtype::DType;
use crate::merge::error::MergeError;
use crate::merge::precision::Precision;
use crate::merge::stream::{TensorStream, sum_start};

/// One finished iteration: per valid model its rounded dot product's coefficient (`None`:
/// skipped, `θ < tol`) and dot, then the update's scalars.
#[derive(Debug, Clone)]
struct Iteration {
    dots: Vec<f32>,
    coefs: Vec<Option<f32>>,
    norm_t: f32,
    c: f32,
    s: f32,
    un: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Norms,
    NormU,
    Dots,
    NormT,
    Un,
    Done,
}

#[derive(Debug, Clone)]
pub struct KarcherStream {
    p: Precision,
    models: usize,
    max_iter: usize,
    tol: f64,
    stage: Stage,
    sums: Vec<f64>,
    /// Per model `‖xᵢ‖` as f32 (the divisor of its unit vector).
    nv: Vec<f32>,
    valid: Vec<usize>,
    na: Vec<f32>,
    /// `‖Σ aᵢûᵢ‖`; below `tol` the first unit vector stands in.
    norm_u: f32,
    done: Vec<Iteration>,
    /// The iteration being gathered.
    cur: Option<Iteration>,
    scale: f32,
}

impl KarcherStream {
    pub fn new(p: Precision, models: usize, max_iter: usize, tol: f64) -> KarcherStream {
        KarcherStream {
            p,
            models,
            max_iter,
            tol,
            stage: if models <= 1 {
                Stage::Done
            } else {
                Stage::Norms
            },
            sums: vec![sum_start(); models],
            nv: Vec::new(),
            valid: Vec::new(),
            na: Vec::new(),
            norm_u: 0.0,
            done: Vec::new(),
            cur: None,
            scale: 0.0,
        }
    }

    fn check(&self, inputs: &[(DType, &[u8])]) -> Result<(), MergeError> {
        if inputs.len() != self.models || self.models == 0 {
            return Err(MergeError::WeightCount {
                inputs: inputs.len(),
                weights: self.models.max(1),
            });
        }
        Ok(())
    }

    /// The unit-vector values of element `e` of the valid models.
    #[inline]
    fn units(&self, blocks: &[&[f32]], e: usize, units: &mut [f32]) {
        let p = self.p;
        for (u, &i) in units.iter_mut().zip(&self.valid) {
            let nv = self.nv[i];
            *u = if nv == 0.0 {
                0.0
            } else {
                p.round(blocks[i][e] / nv)
            };
        }
    }

    /// `Σ aᵢûᵢ` before normalization.
    #[inline]
    fn mean(&self, units: &[f32]) -> f32 {
        let p = self.p;
        let mut u = 0.0f32;
        for (a, v) in self.na.iter().zip(units) {
            u = p.round(u + p.round(a * v));
        }
        u
    }

    /// The starting point `u₀` of element with these unit values.
    #[inline]
    fn start(&self, units: &[f32]) -> f32 {
        if (self.norm_u as f64) < self.tol {
            units[0]
        } else {
            self.p.round(self.mean(units) / self.norm_u)
        }
    }

    /// The tangent value `t` of one element at `u` for an iteration's dots and coefficients.
    #[inline]
    fn tangent(&self, it: &Iteration, units: &[f32], u: f32) -> f32 {
        let p = self.p;
        let mut t = 0.0f32;
        for ((dot, coef), y) in it.dots.iter().zip(&it.coefs).zip(units) {
            if let Some(coef) = coef {
                let diff = p.round(y - p.round(dot * u));
                t = p.round(t + p.round(coef * diff));
            }
        }
        t
    }

    /// `u'` before the division by its norm.
    #[inline]
    fn moved(&self, it: &Iteration, units: &[f32], u: f32) -> f32 {
        let p = self.p;
        let t = self.tangent(it, units, u);
        p.round(p.round(it.c * u) + p.round(it.s * p.round(t / it.norm_t)))
    }

    /// `u` of one element after the finished iterations.
    #[inline]
    fn replay(&self, units: &[f32]) -> f32 {
        let mut u = self.start(units);
        for it in &self.done {
            let m = self.moved(it, units, u);
            u = if (it.un as f64) > self.tol {
                self.p.round(m / it.un)
            } else {
                m
            };
        }
        u
    }

    fn next_iteration(&mut self) {
        self.stage = if self.done.len() < self.max_iter {
            self.sums = vec![sum_start(); self.valid.len()];
            Stage::Dots
        } else {
            Stage::Done
        };
        if self.stage == Stage::Done {
            self.finish();
        }
    }

    fn finish(&mut self) {
        self.stage = Stage::Done;
        let alpha = 1.0 / self.models as f64;
        let scale: f64 = self.nv.iter().map(|nv| alpha * *nv as f64).sum();
        self.scale = self.p.round(scale as f32);
    }
}

impl TensorStream for KarcherStream {
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
        let mut units = vec![0.0f32; self.valid.len()];
        let this = &*self;
        let cur = self.cur.as_ref();
        scan_spans(inputs, crate::merge::BLOCK_ELEMS, |_, blocks| {
            for e in 0..blocks[0].len() {
                match stage {
                    Stage::Norms => {
                        for (s, x) in sums.iter_mut().zip(blocks) {
                            *s += (x[e] as f64) * (x[e] as f64);
                        }
                    }
                    Stage::NormU => {
                        this.units(blocks, e, &mut units);
                        let u = this.mean(&units);
                        sums[0] += (u as f64) * (u as f64);
                    }
                    Stage::Dots => {
                        this.units(blocks, e, &mut units);
                        let u = this.replay(&units);
                        for (s, y) in sums.iter_mut().zip(&units) {
                            *s += u as f64 * *y as f64;
                        }
                    }
                    Stage::NormT | Stage::Un => {
                        this.units(blocks, e, &mut units);
                        let u = this.replay(&units);
                        let Some(it) = cur else { continue };
                        let v = if stage == Stage::NormT {
                            this.tangent(it, &units, u)
                        } else {
                            this.moved(it, &units, u)
                        };
                        sums[0] += (v as f64) * (v as f64);
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
        let tol = self.tol;
        match self.stage {
            Stage::Norms => {
                self.nv = self.sums.iter().map(|s| s.sqrt() as f32).collect();
                self.valid = (0..self.models)
                    .filter(|&i| self.nv[i] as f64 > tol)
                    .collect();
                if self.valid.is_empty() {
                    self.finish();
                    return;
                }
                let alpha = 1.0 / self.models as f64;
                let alpha_sum: f64 = self.valid.iter().map(|_| alpha).sum();
                self.na = self
                    .valid
                    .iter()
                    .map(|_| (alpha / alpha_sum) as f32)
                    .collect();
                self.sums = vec![sum_start(); 1];
                self.stage = Stage::NormU;
            }
            Stage::NormU => {
                self.norm_u = self.sums[0].sqrt() as f32;
                self.next_iteration();
            }
            Stage::Dots => {
                let mut it = Iteration {
                    dots: Vec::new(),
                    coefs: Vec::new(),
                    norm_t: 0.0,
                    c: 0.0,
                    s: 0.0,
                    un: 0.0,
                };
                for (s, a) in self.sums.iter().zip(&self.na) {
                    let dot = p.round(*s as f32).clamp(-1.0, 1.0);
                    let theta = p.round(dot.acos());
                    it.dots.push(dot);
                    it.coefs.push(if (theta as f64) < tol {
                        None
                    } else {
                        let sin_theta = p.round(theta.sin());
                        Some(p.round(a * p.round(theta / sin_theta)))
                    });
                }
                // Every model skipped: t = 0 everywhere, ‖t‖ = 0 (below a positive tol).
                if it.coefs.iter().all(Option::is_none) && tol > 0.0 {
                    self.finish();
                    return;
                }
                self.cur = Some(it);
                self.sums = vec![sum_start(); 1];
                self.stage = Stage::NormT;
            }
            Stage::NormT => {
                let norm_t = self.sums[0].sqrt() as f32;
                if (norm_t as f64) < tol {
                    self.cur = None;
                    self.finish();
                    return;
                }
                if let Some(it) = self.cur.as_mut() {
                    it.norm_t = norm_t;
                    it.c = p.round(norm_t.cos());
                    it.s = p.round(norm_t.sin());
                }
                self.sums = vec![sum_start(); 1];
                self.stage = Stage::Un;
            }
            Stage::Un => {
                let un = self.sums[0].sqrt() as f32;
                if let Some(mut it) = self.cur.take() {
                    it.un = un;
                    self.done.push(it);
                }
                self.next_iteration();
            }
            Stage::Done => {}
        }
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
        if self.models == 1 {
            return map_blocks(inputs, out_dtype, out, |b, o| o.copy_from_slice(b[0]));
        }
        if self.valid.is_empty() {
            return map_blocks(inputs, out_dtype, out, |_, o| o.fill(0.0));
        }
        map_blocks(inputs, out_dtype, out, |b, o| {
            let mut units = vec![0.0f32; self.valid.len()];
            for (e, o) in o.iter_mut().enumerate() {
                self.units(b, e, &mut units);
                *o = p.round(self.scale * self.replay(&units));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::dtype::encode_from_f32;
    use crate::merge::spherical::karcher;

    fn views(raw: &[Vec<u8>], dt: DType, a: usize, e: usize) -> Vec<(DType, &[u8])> {
        let sz = dt.size_bytes();
        raw.iter().map(|r| (dt, &r[sz * a..sz * e])).collect()
    }

    #[test]
    fn streamed_equals_whole() {
        let n = 5000;
        let mut st = 0x1357_9bdfu64;
        let mut next = || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            ((st >> 40) % 2000) as f32 * 0.0001 - 0.1
        };
        for (p, dt) in [(Precision::BF16, DType::BF16), (Precision::F32, DType::F32)] {
            for models in [1usize, 2, 3] {
                for (max_iter, tol) in [(10usize, 1e-5f64), (3, 1e-9), (0, 1e-5)] {
                    let mut vs: Vec<Vec<f32>> = (0..models)
                        .map(|_| (0..n).map(|_| p.round(next())).collect())
                        .collect();
                    if models == 3 {
                        // A zero model is not valid.
                        vs[2].iter_mut().for_each(|x| *x = 0.0);
                    }
                    let refs: Vec<&[f32]> = vs.iter().map(|v| v.as_slice()).collect();
                    let mut want = vec![0.0f32; n];
                    karcher(p, &refs, max_iter, tol, &mut want);
                    let sz = dt.size_bytes();
                    let mut wb = vec![0u8; n * sz];
                    encode_from_f32(dt, &want, &mut wb).unwrap();
                    let raw: Vec<Vec<u8>> = vs
                        .iter()
                        .map(|v| {
                            let mut b = vec![0u8; n * sz];
                            encode_from_f32(dt, v, &mut b).unwrap();
                            b
                        })
                        .collect();
                    for chunk in [1000usize, n] {
                        let mut s = KarcherStream::new(p, models, max_iter, tol);
                        while s.wants_pass() {
                            for a in (0..n).step_by(chunk) {
                                s.observe(a as u64, &views(&raw, dt, a, (a + chunk).min(n)))
                                    .unwrap();
                            }
                            s.end_pass();
                        }
                        let mut got = vec![0u8; n * sz];
                        for a in (0..n).step_by(chunk) {
                            let e = (a + chunk).min(n);
                            s.merge(
                                a as u64,
                                &views(&raw, dt, a, e),
                                dt,
                                &mut got[sz * a..sz * e],
                            )
                            .unwrap();
                        }
                        assert!(
                            got == wb,
                            "{p:?} models {models} iter {max_iter} tol {tol} chunk {chunk}"
                        );
                    }
                }
            }
        }
    }
}

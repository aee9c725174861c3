//! Spherical linear interpolation as mergekit's `slerp` (ALGORITHMS.md §11.1), in f32 as its
//! numpy code: normalize both flattened tensors (norm > 1e-8), `dot = Σ v̂0·v̂1`; if
//! `|dot| > 0.9995` lerp `(1−t)·v0 + t·v1`, else `θ = acos(dot)`,
//! `out = sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1`. Norms and the dot product accumulate
//! in f64 (numpy uses pairwise / BLAS f32 sums; the difference moves an f32 scalar by an ulp at
//! most, far below a bf16 ulp of the output).

use crate::merge::blocks::{map_blocks, scan_spans};
use crate::merge::dtype::DType;
use crate::merge::error::MergeError;
use crate::merge::precision::Precision;
use crate::merge::stream::{TensorStream, sum_start};

pub const DOT_THRESHOLD: f32 = 0.9995;
pub const EPS: f32 = 1e-8;

fn norm(v: &[f32]) -> f32 {
    v.iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt() as f32
}

/// The divisor a vector of norm `n` is normalized by.
fn unit_scale(n: f32) -> f32 {
    if n > EPS { n } else { 1.0 }
}

/// The two coefficients of `out = c0·v0 + c1·v1`, from the dot product of the unit vectors.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Mix {
    c0: f32,
    c1: f32,
}

fn mix(t: f64, dot: f32) -> Mix {
    let tf = t as f32;
    if dot.abs() > DOT_THRESHOLD {
        return Mix {
            c0: (1.0 - t) as f32,
            c1: tf,
        };
    }
    let theta0 = dot.acos();
    let sin0 = theta0.sin();
    let theta_t = theta0 * tf;
    let sin_t = theta_t.sin();
    Mix {
        c0: (theta0 - theta_t).sin() / sin0,
        c1: sin_t / sin0,
    }
}

#[inline]
fn apply(m: Mix, v0: &[f32], v1: &[f32], out: &mut [f32]) {
    for ((o, x), y) in out.iter_mut().zip(v0).zip(v1) {
        *o = m.c0 * x + m.c1 * y;
    }
}

/// `out = slerp(t, v0, v1)` elementwise over the flattened tensors (f32 results; the caller
/// rounds to the output dtype).
pub fn slerp(t: f64, v0: &[f32], v1: &[f32], out: &mut [f32]) {
    let s0n = unit_scale(norm(v0));
    let s1n = unit_scale(norm(v1));
    let dot = v0
        .iter()
        .zip(v1)
        .map(|(a, b)| ((a / s0n) * (b / s1n)) as f64)
        .sum::<f64>() as f32;
    apply(mix(t, dot), v0, v1, out);
}

/// [`slerp`] streamed ([`TensorStream`]): pass 1 the two norms, pass 2 the dot product of the
/// unit vectors (sums in index order, as [`slerp`]), then elementwise; the result rounded to
/// `p` (mergekit casts to the base tensor's dtype). Inputs: the base, then the other model.
#[derive(Debug, Clone)]
pub struct SlerpStream {
    t: f64,
    p: Precision,
    pass: u8,
    sq: [f64; 2],
    dot: f64,
    scales: [f32; 2],
    mix: Option<Mix>,
}

impl SlerpStream {
    pub fn new(t: f64, p: Precision) -> SlerpStream {
        SlerpStream {
            t,
            p,
            pass: 0,
            sq: [sum_start(); 2],
            dot: sum_start(),
            scales: [1.0; 2],
            mix: None,
        }
    }

    fn two<'a>(inputs: &'a [(DType, &'a [u8])]) -> Result<&'a [(DType, &'a [u8])], MergeError> {
        if inputs.len() != 2 {
            return Err(MergeError::WeightCount {
                inputs: inputs.len(),
                weights: 2,
            });
        }
        Ok(inputs)
    }
}

impl TensorStream for SlerpStream {
    fn align(&self) -> usize {
        1
    }

    fn wants_pass(&self) -> bool {
        self.pass < 2
    }

    fn observe(&mut self, _first: u64, inputs: &[(DType, &[u8])]) -> Result<(), MergeError> {
        let inputs = Self::two(inputs)?;
        let [s0n, s1n] = self.scales;
        if self.pass == 0 {
            let [mut a, mut b] = self.sq;
            scan_spans(inputs, crate::merge::BLOCK_ELEMS, |_, v| {
                for x in v[0] {
                    a += (*x as f64) * (*x as f64);
                }
                for y in v[1] {
                    b += (*y as f64) * (*y as f64);
                }
            })?;
            self.sq = [a, b];
        } else {
            let mut d = self.dot;
            scan_spans(inputs, crate::merge::BLOCK_ELEMS, |_, v| {
                for (a, b) in v[0].iter().zip(v[1]) {
                    d += ((a / s0n) * (b / s1n)) as f64;
                }
            })?;
            self.dot = d;
        }
        Ok(())
    }

    fn end_pass(&mut self) {
        if self.pass == 0 {
            self.scales = [
                unit_scale(self.sq[0].sqrt() as f32),
                unit_scale(self.sq[1].sqrt() as f32),
            ];
        } else {
            self.mix = Some(mix(self.t, self.dot as f32));
        }
        self.pass += 1;
    }

    fn merge(
        &self,
        _first: u64,
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        let inputs = Self::two(inputs)?;
        let m = self.mix.ok_or(MergeError::NotReady)?;
        let p = self.p;
        map_blocks(inputs, out_dtype, out, |b, o| {
            apply(m, b[0], b[1], o);
            for x in o.iter_mut() {
                *x = p.round(*x);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_equals_whole() {
        use crate::merge::dtype::encode_from_f32;
        use crate::merge::stream::run_whole;
        let n = 10_000;
        for (t, k) in [(0.3, 0.37f32), (0.7, 0.0), (0.5, 1.0)] {
            let v0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            // k = 0: v1 = v0 (lerp branch); otherwise another direction.
            let v1: Vec<f32> = (0..n).map(|i| (i as f32 * (0.37 + k)).sin()).collect();
            let enc = |v: &[f32]| {
                let mut b = vec![0u8; v.len() * 2];
                encode_from_f32(DType::BF16, v, &mut b).unwrap();
                b
            };
            let (b0, b1) = (enc(&v0), enc(&v1));
            let mut d0 = vec![0.0f32; n];
            let mut d1 = vec![0.0f32; n];
            crate::merge::decode_to_f32(DType::BF16, &b0, &mut d0).unwrap();
            crate::merge::decode_to_f32(DType::BF16, &b1, &mut d1).unwrap();
            let mut want = vec![0.0f32; n];
            slerp(t, &d0, &d1, &mut want);
            let p = Precision::BF16;
            want.iter_mut().for_each(|x| *x = p.round(*x));
            let want = enc(&want);
            for chunk in [1000usize, 4097, n] {
                let mut s = SlerpStream::new(t, p);
                let ins = |a: usize, e: usize| {
                    [
                        (DType::BF16, &b0[2 * a..2 * e]),
                        (DType::BF16, &b1[2 * a..2 * e]),
                    ]
                };
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
                assert!(got == want, "t {t} chunk {chunk}");
                let mut w = SlerpStream::new(t, p);
                let mut got2 = vec![0u8; 2 * n];
                run_whole(&mut w, &ins(0, n), DType::BF16, &mut got2).unwrap();
                assert!(got2 == want);
            }
        }
    }

    #[test]
    fn ends_and_midpoint() {
        let a = [1.0f32, 0.0, 0.0, 0.0];
        let b = [0.0f32, 1.0, 0.0, 0.0];
        let mut out = [0.0f32; 4];
        slerp(0.0, &a, &b, &mut out);
        assert_eq!(out, a);
        slerp(1.0, &a, &b, &mut out);
        assert!(out.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-6));
        slerp(0.5, &a, &b, &mut out);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!((out[0] - h).abs() < 1e-6 && (out[1] - h).abs() < 1e-6);
        // Colinear: lerp.
        let c = [2.0f32, 0.0, 0.0, 0.0];
        slerp(0.25, &a, &c, &mut out);
        assert_eq!(out, [1.25, 0.0, 0.0, 0.0]);
        // Independent check at t = 0.3 on a 4×4 example against f64 math.
        let v0: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).sin()).collect();
        let v1: Vec<f32> = (0..16).map(|i| (i as f32 * 0.91).cos()).collect();
        let mut got = vec![0.0f32; 16];
        slerp(0.3, &v0, &v1, &mut got);
        let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let dot: f64 = v0
            .iter()
            .zip(&v1)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum::<f64>()
            / (n(&v0) * n(&v1));
        let th = dot.acos();
        for e in 0..16 {
            let want =
                ((0.7 * th).sin() * v0[e] as f64 + (0.3 * th).sin() * v1[e] as f64) / th.sin();
            assert!((got[e] as f64 - want).abs() < 1e-5, "{e}");
        }
    }
}

//! Arcee Fusion, as mergekit 0.1.5's `arcee_fusion` computes it
//! (`mergekit/merge_methods/arcee_fusion.py`): a base and one model; the model's change is kept
//! where it is important, elsewhere the base stays.
//!
//! Per row (the last dimension; a 0-/1-D tensor is one row), in the inputs' precision `r(·)`
//! as torch's bf16 arithmetic rounds:
//! `p = r(softmax(x) + 1e-8)`, `q = r(softmax(b) + 1e-8)`,
//! `kl = r(Σ r(p · r(ln r(p / q))))`; per element the importance `s = r(|r(x − b)| · kl)`.
//! Over the whole tensor, the quantiles of `s` at 0.25, 0.5 and 0.75 (mergekit sorts and takes
//! index `trunc(q·(n − 1))`; above 10⁶ elements it samples 10⁶ of them at random, ladle takes
//! every element: exact and deterministic), `t = r(median + r(1.5 · r(q3 − q1)))`, and
//! `out = b + r(x − b)·[s ≥ t]` in **float32** (mergekit's mask is a float32 tensor, so the
//! result is float32; the method writes float32 unless the recipe names an output dtype).
//!
//! Streamed: pass 1 computes each row's `kl` (kept, one scalar per row) and a histogram of the
//! high 16 bits of every importance's order key; bf16 importances have no low bits, other
//! precisions take a second pass over the low 16 bits of the buckets holding the quantiles.
//! Then rows are merged on their own. Memory: one f32 per row plus at most four histograms of
//! 65,536 counters. Inputs: the base, then the model.

use crate::merge::blocks::{map_spans, scan_spans};
use crate::merge::dtype::DType;
use crate::merge::error::MergeError;
use crate::merge::precision::Precision;
use crate::merge::stream::{TensorStream, sum_start};

const BUCKETS: usize = 1 << 16;
/// mergekit's quantiles of the importance.
const QUANTILES: [f32; 3] = [0.25, 0.5, 0.75];

/// An order key of a float: ascending keys sort as the values (`−0` before `+0`).
#[inline]
fn order_key(x: f32) -> u32 {
    let b = x.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

#[inline]
fn from_key(k: u32) -> f32 {
    f32::from_bits(if k & 0x8000_0000 != 0 {
        k & 0x7fff_ffff
    } else {
        !k
    })
}

/// `softmax(v) + 1e-8` as torch computes it on a tensor of precision `p`: `exp(x − max)` in
/// f32, times `1 / Σ`, rounded; then the epsilon added and rounded.
fn softmax_eps(p: Precision, v: &[f32], out: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = sum_start();
    for (o, x) in out.iter_mut().zip(v) {
        *o = (x - max).exp();
        sum += *o as f64;
    }
    let inv = 1.0 / sum as f32;
    for o in out.iter_mut() {
        *o = p.round(p.round(*o * inv) + 1e-8f32);
    }
}

/// The row's `kl` from the model's and the base's rows (`sp`, `sq`: scratch of the row's length).
fn row_kl(p: Precision, x: &[f32], b: &[f32], sp: &mut [f32], sq: &mut [f32]) -> f32 {
    softmax_eps(p, x, sp);
    softmax_eps(p, b, sq);
    let mut sum = sum_start();
    for (pp, qq) in sp.iter().zip(sq.iter()) {
        let ratio = p.round(pp / qq);
        sum += p.round(pp * p.round(ratio.ln())) as f64;
    }
    p.round(sum as f32)
}

#[inline]
fn importance(p: Precision, x: f32, b: f32, kl: f32) -> f32 {
    p.round(p.round(x - b).abs() * kl)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Rows,
    Low,
    Done,
}

/// Where one quantile lies: its rank (0-based, ascending), its bucket and how many keys lie in
/// lower buckets.
#[derive(Debug, Clone, Copy)]
struct Rank {
    rank: u64,
    bucket: u32,
    below: u64,
}

#[derive(Debug, Clone)]
pub struct ArceeFusionStream {
    p: Precision,
    cols: usize,
    n: u64,
    stage: Stage,
    /// Per row its `kl`.
    kl: Vec<f32>,
    high: Vec<u64>,
    ranks: Vec<Rank>,
    /// Pass 2: a low-bits histogram per distinct bucket of `ranks`.
    low: Vec<(u32, Vec<u64>)>,
    threshold: f32,
}

impl ArceeFusionStream {
    /// `cols`: the row length (the tensor's last dimension); `n`: its element count.
    pub fn new(p: Precision, cols: usize, n: u64) -> ArceeFusionStream {
        let cols = cols.max(1);
        ArceeFusionStream {
            p,
            cols,
            n,
            stage: if n == 0 { Stage::Done } else { Stage::Rows },
            kl: Vec::with_capacity((n / cols as u64) as usize),
            high: Vec::new(),
            ranks: Vec::new(),
            low: Vec::new(),
            threshold: f32::INFINITY,
        }
    }

    /// The importance cut-off (after the passes).
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    fn check(&self, inputs: &[(DType, &[u8])]) -> Result<(), MergeError> {
        if inputs.len() != 2 {
            return Err(MergeError::WeightCount {
                inputs: inputs.len(),
                weights: 2,
            });
        }
        Ok(())
    }

    fn span(&self) -> usize {
        (crate::merge::BLOCK_ELEMS / self.cols).max(1) * self.cols
    }

    /// The quantile values from the ranks' keys; then the threshold.
    fn finish(&mut self, keys: [u32; 3]) {
        let p = self.p;
        let [q1, median, q3] = keys.map(from_key);
        let iqr = p.round(q3 - q1);
        self.threshold = p.round(median + p.round(1.5 * iqr));
        self.stage = Stage::Done;
        self.high = Vec::new();
        self.low = Vec::new();
    }
}

impl TensorStream for ArceeFusionStream {
    fn align(&self) -> usize {
        self.cols
    }

    fn wants_pass(&self) -> bool {
        self.stage != Stage::Done
    }

    fn observe(&mut self, first: u64, inputs: &[(DType, &[u8])]) -> Result<(), MergeError> {
        self.check(inputs)?;
        let (p, cols) = (self.p, self.cols);
        let row0 = (first / cols as u64) as usize;
        let span = self.span();
        match self.stage {
            Stage::Rows => {
                if self.high.is_empty() {
                    self.high = vec![0; BUCKETS];
                }
                let (mut sp, mut sq) = (vec![0.0f32; cols], vec![0.0f32; cols]);
                let (kl, high) = (&mut self.kl, &mut self.high);
                scan_spans(inputs, span, |_, blocks| {
                    let (b, x) = (blocks[0], blocks[1]);
                    for (xr, br) in x.chunks(cols).zip(b.chunks(cols)) {
                        let k = row_kl(p, xr, br, &mut sp[..xr.len()], &mut sq[..xr.len()]);
                        kl.push(k);
                        for (xe, be) in xr.iter().zip(br) {
                            high[(order_key(importance(p, *xe, *be, k)) >> 16) as usize] += 1;
                        }
                    }
                })
            }
            Stage::Low => {
                let (kl, low) = (&self.kl, &mut self.low);
                scan_spans(inputs, span, |start, blocks| {
                    let (b, x) = (blocks[0], blocks[1]);
                    let rows = x.chunks(cols).zip(b.chunks(cols)).enumerate();
                    for (r, (xr, br)) in rows {
                        let k = kl[row0 + start / cols + r];
                        for (xe, be) in xr.iter().zip(br) {
                            let key = order_key(importance(p, *xe, *be, k));
                            for (bucket, h) in low.iter_mut() {
                                if key >> 16 == *bucket {
                                    h[(key & 0xffff) as usize] += 1;
                                }
                            }
                        }
                    }
                })
            }
            Stage::Done => Ok(()),
        }
    }

    fn end_pass(&mut self) {
        match self.stage {
            Stage::Rows => {
                let last = (self.n - 1) as f32;
                self.ranks = QUANTILES
                    .iter()
                    .map(|q| {
                        let rank = ((q * last) as u64).min(self.n - 1);
                        let mut below = 0u64;
                        let mut bucket = 0u32;
                        for (b, c) in self.high.iter().enumerate() {
                            if below + c > rank {
                                bucket = b as u32;
                                break;
                            }
                            below += c;
                        }
                        Rank {
                            rank,
                            bucket,
                            below,
                        }
                    })
                    .collect();
                if self.p == Precision::BF16 {
                    // bf16 importances: the low 16 bits of every key are zero... except
                    // for negative values, whose keys are complemented (all ones).
                    let keys = [0, 1, 2].map(|i| {
                        let b = self.ranks[i].bucket;
                        let k = b << 16;
                        if b & 0x8000 != 0 { k } else { k | 0xffff }
                    });
                    self.finish(keys);
                } else {
                    let mut buckets: Vec<u32> = self.ranks.iter().map(|r| r.bucket).collect();
                    buckets.dedup();
                    self.low = buckets
                        .into_iter()
                        .map(|b| (b, vec![0u64; BUCKETS]))
                        .collect();
                    self.stage = Stage::Low;
                }
            }
            Stage::Low => {
                let keys = [0, 1, 2].map(|i| {
                    let r = self.ranks[i];
                    let h = self
                        .low
                        .iter()
                        .find(|(b, _)| *b == r.bucket)
                        .map(|(_, h)| h.as_slice())
                        .unwrap_or(&[]);
                    let mut below = r.below;
                    let mut low = 0u32;
                    for (l, c) in h.iter().enumerate() {
                        if below + c > r.rank {
                            low = l as u32;
                            break;
                        }
                        below += c;
                    }
                    (r.bucket << 16) | low
                });
                self.finish(keys);
            }
            Stage::Done => {}
        }
    }

    fn merge(
        &self,
        first: u64,
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        self.check(inputs)?;
        if self.wants_pass() {
            return Err(MergeError::NotReady);
        }
        let (p, cols, t) = (self.p, self.cols, self.threshold);
        let row0 = (first / cols as u64) as usize;
        map_spans(
            inputs,
            out_dtype,
            out,
            self.span(),
            |_| (),
            |_, start, blocks, o| {
                let (b, x) = (blocks[0], blocks[1]);
                let rows = o.chunks_mut(cols).zip(x.chunks(cols).zip(b.chunks(cols)));
                for (r, (or, (xr, br))) in rows.enumerate() {
                    let k = self.kl.get(row0 + start / cols + r).copied().unwrap_or(0.0);
                    for ((o, xe), be) in or.iter_mut().zip(xr).zip(br) {
                        let keep = importance(p, *xe, *be, k) >= t;
                        let delta = p.round(xe - be);
                        *o = be + delta * if keep { 1.0 } else { 0.0 };
                    }
                }
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::dtype::encode_from_f32;
    use crate::merge::stream::run_whole;

    #[test]
    fn order_keys_sort_as_values() {
        let mut xs = vec![-3.5f32, -1.0, -0.0, 0.0, 1e-40, 0.25, 7.0, f32::INFINITY];
        let keys: Vec<u32> = xs.iter().map(|x| order_key(*x)).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
        for x in xs.drain(..) {
            assert_eq!(from_key(order_key(x)).to_bits(), x.to_bits());
        }
    }

    fn enc(dt: DType, v: &[f32]) -> Vec<u8> {
        let mut b = vec![0u8; v.len() * dt.size_bytes()];
        encode_from_f32(dt, v, &mut b).unwrap();
        b
    }

    /// A plain whole-tensor version: sort the importances.
    fn reference(p: Precision, b: &[f32], x: &[f32], cols: usize) -> Vec<f32> {
        let mut imp = Vec::new();
        let (mut sp, mut sq) = (vec![0.0; cols], vec![0.0; cols]);
        for (xr, br) in x.chunks(cols).zip(b.chunks(cols)) {
            let k = row_kl(p, xr, br, &mut sp, &mut sq);
            imp.extend(xr.iter().zip(br).map(|(xe, be)| importance(p, *xe, *be, k)));
        }
        let mut sorted = imp.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let last = (sorted.len() - 1) as f32;
        let at = |q: f32| sorted[(q * last) as usize];
        let iqr = p.round(at(0.75) - at(0.25));
        let t = p.round(at(0.5) + p.round(1.5 * iqr));
        imp.iter()
            .zip(x.iter().zip(b))
            .map(|(s, (xe, be))| be + p.round(xe - be) * if *s >= t { 1.0 } else { 0.0 })
            .collect()
    }

    #[test]
    fn streamed_equals_a_sorted_reference() {
        let (rows, cols) = (37, 64);
        let n = rows * cols;
        let mut st = 0x9e37_79b9u64;
        let mut next = || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            ((st >> 40) % 1000) as f32 / 1000.0 - 0.5
        };
        for (p, dt) in [
            (Precision::BF16, DType::BF16),
            (Precision::F16, DType::F16),
            (Precision::F32, DType::F32),
        ] {
            let b: Vec<f32> = (0..n).map(|_| p.round(next() * 0.1)).collect();
            let x: Vec<f32> = b
                .iter()
                .map(|v| p.round(v + next() * next() * 0.05))
                .collect();
            let want = reference(p, &b, &x, cols);
            let raw = [enc(dt, &b), enc(dt, &x)];
            let sz = dt.size_bytes();
            let mut s = ArceeFusionStream::new(p, cols, n as u64);
            let step = 5 * cols;
            while s.wants_pass() {
                for a in (0..n).step_by(step) {
                    let e = (a + step).min(n);
                    let v: Vec<(DType, &[u8])> =
                        raw.iter().map(|r| (dt, &r[sz * a..sz * e])).collect();
                    s.observe(a as u64, &v).unwrap();
                }
                s.end_pass();
            }
            let mut got = vec![0u8; 4 * n];
            for a in (0..n).step_by(step) {
                let e = (a + step).min(n);
                let v: Vec<(DType, &[u8])> = raw.iter().map(|r| (dt, &r[sz * a..sz * e])).collect();
                s.merge(a as u64, &v, DType::F32, &mut got[4 * a..4 * e])
                    .unwrap();
            }
            let got: Vec<f32> = got
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let kept = got.iter().zip(&b).filter(|(g, b)| g != b).count();
            assert!(kept > 0, "{p:?}: nothing kept");
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{p:?}"
            );
            // The whole tensor at once gives the same.
            let mut whole = ArceeFusionStream::new(p, cols, n as u64);
            let v: Vec<(DType, &[u8])> = raw.iter().map(|r| (dt, r.as_slice())).collect();
            let mut out = vec![0u8; 4 * n];
            run_whole(&mut whole, &v, DType::F32, &mut out).unwrap();
            assert_eq!(whole.threshold().to_bits(), s.threshold().to_bits());
        }
    }
}

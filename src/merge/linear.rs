//! Weighted linear soup (ALGORITHMS.md §2): `θ = Σ_i w_i · x_i`, optionally divided by a
//! divisor (`Σ_i w_i` for mergekit's `normalize = true`, `n` for a uniform soup).
//!
//! The arithmetic is the contract, bit for bit: per element, `acc = 0`, then for each input in
//! order `acc = w_i.mul_add(x_i, acc)` (one fused multiply-add, a single rounding), then
//! `acc / divisor` when a divisor is given. FMA is exactly specified, so the AVX2+FMA path picked
//! at run time and the portable path (which calls libm's `fmaf`) give identical bits.

use crate::merge::blocks::map_blocks;
use crate::merge::dtype::DType;
use crate::merge::error::MergeError;

/// Elements accumulated together in registers (8 AVX vectors).
const TILE: usize = 64;

/// `out[e] = (Σ_i weights[i] · inputs[i][e]) [/ divisor]`, accumulated in input order with one
/// fused multiply-add per input, starting from `+0.0`.
///
/// # Panics
/// If `weights.len() != inputs.len()` or an input's length differs from `out.len()` (callers
/// validate shapes first; [`linear_raw`] reports these as errors instead).
pub fn linear(inputs: &[&[f32]], weights: &[f32], divisor: Option<f32>, out: &mut [f32]) {
    assert_eq!(inputs.len(), weights.len(), "one weight per input");
    assert!(
        inputs.iter().all(|x| x.len() == out.len()),
        "every input has out.len() elements"
    );
    #[cfg(target_arch = "x86_64")]
    {
        if fma_available() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            unsafe { linear_fma(inputs, weights, divisor, out) };
            return;
        }
    }
    linear_portable(inputs, weights, divisor, out);
}

#[cfg(target_arch = "x86_64")]
fn fma_available() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// The AVX2 + FMA instance of [`linear_inner`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn linear_fma(inputs: &[&[f32]], weights: &[f32], divisor: Option<f32>, out: &mut [f32]) {
    linear_inner(inputs, weights, divisor, out)
}

/// The baseline instance of [`linear_inner`] (on x86_64 without FMA, `mul_add` is a libm call).
fn linear_portable(inputs: &[&[f32]], weights: &[f32], divisor: Option<f32>, out: &mut [f32]) {
    linear_inner(inputs, weights, divisor, out)
}

/// The one body of the kernel, inlined into each instance so that each is compiled with its
/// own target features.
#[inline(always)]
fn linear_inner(inputs: &[&[f32]], weights: &[f32], divisor: Option<f32>, out: &mut [f32]) {
    let full = out.len() - out.len() % TILE;
    let (head, tail) = out.split_at_mut(full);
    for (t, out_tile) in head.chunks_exact_mut(TILE).enumerate() {
        let base = t * TILE;
        let mut acc = [0.0f32; TILE];
        for (x, &w) in inputs.iter().zip(weights) {
            let xs = &x[base..base + TILE];
            for (a, &v) in acc.iter_mut().zip(xs) {
                *a = w.mul_add(v, *a);
            }
        }
        finish(&acc, divisor, out_tile);
    }
    for (j, o) in tail.iter_mut().enumerate() {
        let e = full + j;
        let mut acc = 0.0f32;
        for (x, &w) in inputs.iter().zip(weights) {
            acc = w.mul_add(x[e], acc);
        }
        *o = match divisor {
            Some(d) => acc / d,
            None => acc,
        };
    }
}

#[inline(always)]
fn finish(acc: &[f32], divisor: Option<f32>, out: &mut [f32]) {
    match divisor {
        Some(d) => {
            for (o, a) in out.iter_mut().zip(acc) {
                *o = a / d;
            }
        }
        None => out.copy_from_slice(acc),
    }
}

/// [`linear`] over raw little-endian tensors: decodes each input (F64/F32/F16/BF16, dtypes may
/// differ), merges in `f32`, encodes into `out` as `out_dtype` with round-to-nearest-even.
///
/// Blocked and parallel through [`map_blocks`]; the bytes equal those of decode-all →
/// [`linear`] → encode-all for any thread count. Fails when a dtype is not a mergeable float,
/// when the weights do not match the inputs, or when an input does not hold exactly as many
/// elements as `out`.
pub fn linear_raw(
    inputs: &[(DType, &[u8])],
    weights: &[f32],
    divisor: Option<f32>,
    out_dtype: DType,
    out: &mut [u8],
) -> Result<(), MergeError> {
    if weights.len() != inputs.len() {
        return Err(MergeError::WeightCount {
            inputs: inputs.len(),
            weights: weights.len(),
        });
    }
    map_blocks(inputs, out_dtype, out, |blocks, out_block| {
        linear(blocks, weights, divisor, out_block)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::blocks::{BLOCK_ELEMS, TASK_ELEMS};
    use crate::merge::dtype::{decode_to_f32, encode_from_f32};

    /// xorshift64: deterministic test data without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// Roughly uniform in [-2, 2), with all mantissa bits populated.
        fn f32(&mut self) -> f32 {
            ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.f32()).collect()
        }
    }

    /// The contract, written out plainly.
    fn by_hand(inputs: &[&[f32]], weights: &[f32], divisor: Option<f32>) -> Vec<f32> {
        let n = inputs.first().map_or(0, |x| x.len());
        (0..n)
            .map(|e| {
                let mut acc = 0.0f32;
                for (x, w) in inputs.iter().zip(weights) {
                    acc = w.mul_add(x[e], acc);
                }
                match divisor {
                    Some(d) => acc / d,
                    None => acc,
                }
            })
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn matches_the_contract() {
        let mut rng = Rng(42);
        for n in [0usize, 1, 5, 63, 64, 65, 200, 1000] {
            for k in [1usize, 2, 3, 5] {
                let xs: Vec<Vec<f32>> = (0..k).map(|_| rng.vec(n)).collect();
                let refs: Vec<&[f32]> = xs.iter().map(|v| v.as_slice()).collect();
                let w = rng.vec(k);
                for div in [None, Some(w.iter().sum::<f32>()), Some(3.0)] {
                    let mut out = vec![f32::NAN; n];
                    linear(&refs, &w, div, &mut out);
                    assert_eq!(bits(&out), bits(&by_hand(&refs, &w, div)), "n={n} k={k}");
                }
            }
        }
    }

    #[test]
    fn fused_not_separate_rounding() {
        // (1 + 2^-23)² − 1 needs the fused form to keep the 2^-46 term: a separate product would
        // round (1 + 2^-23)² to 1 + 2^-22 first.
        let a = 1.0 + f32::EPSILON;
        let mut out = [0.0f32];
        linear(&[&[1.0], &[a]], &[-1.0, a], None, &mut out);
        // acc1 = fma(-1, 1, 0) = -1; acc2 = fma(a, a, -1) = 2^-22 + 2^-46 exactly (one rounding).
        assert_eq!(out[0], 2f32.powi(-22) + 2f32.powi(-46));
        // Order matters and is input order: start from +0, so (-0)·x gives +0.
        linear(&[&[-0.0]], &[1.0], None, &mut out);
        assert_eq!(out[0].to_bits(), 0.0f32.to_bits());
    }

    #[test]
    fn uniform_soup_and_weights() {
        let a = [1.0f32, 2.0, -4.0];
        let b = [3.0f32, 2.0, 4.0];
        let mut out = [0.0f32; 3];
        linear(&[&a, &b], &[1.0, 1.0], Some(2.0), &mut out);
        assert_eq!(out, [2.0, 2.0, 0.0]);
        linear(&[&a, &b], &[0.25, -1.0], None, &mut out);
        assert_eq!(out, [-2.75, -1.5, -5.0]);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn fma_and_portable_paths_are_bit_identical() {
        if !fma_available() {
            eprintln!("no AVX2+FMA on this CPU: only the portable path exists");
            return;
        }
        let mut rng = Rng(7);
        for n in [1usize, 64, 777, 4096 + 13] {
            for k in [1usize, 2, 3, 7] {
                // Mix magnitudes so that the fused rounding matters often.
                let xs: Vec<Vec<f32>> = (0..k)
                    .map(|i| {
                        rng.vec(n)
                            .into_iter()
                            .map(|x| x * 10f32.powi(i as i32 - 3))
                            .collect()
                    })
                    .collect();
                let refs: Vec<&[f32]> = xs.iter().map(|v| v.as_slice()).collect();
                let w = rng.vec(k);
                for div in [None, Some(0.7f32)] {
                    let mut fast = vec![0.0; n];
                    let mut slow = vec![0.0; n];
                    // SAFETY: AVX2 and FMA were detected above.
                    unsafe { linear_fma(&refs, &w, div, &mut fast) };
                    linear_portable(&refs, &w, div, &mut slow);
                    assert_eq!(bits(&fast), bits(&slow), "n={n} k={k}");
                }
            }
        }
    }

    fn encode(d: DType, v: &[f32]) -> Vec<u8> {
        let mut b = vec![0u8; v.len() * d.size_bytes()];
        encode_from_f32(d, v, &mut b).unwrap();
        b
    }

    fn decode(d: DType, b: &[u8]) -> Vec<f32> {
        let mut v = vec![0f32; b.len() / d.size_bytes()];
        decode_to_f32(d, b, &mut v).unwrap();
        v
    }

    /// decode-all → linear → encode-all, the reference for the blocked driver.
    fn unblocked(
        inputs: &[(DType, &[u8])],
        w: &[f32],
        div: Option<f32>,
        out_dtype: DType,
    ) -> Vec<u8> {
        let dec: Vec<Vec<f32>> = inputs.iter().map(|(d, b)| decode(*d, b)).collect();
        let refs: Vec<&[f32]> = dec.iter().map(|v| v.as_slice()).collect();
        let n = refs.first().map_or(0, |x| x.len());
        let mut out = vec![0.0; n];
        linear(&refs, w, div, &mut out);
        encode(out_dtype, &out)
    }

    #[test]
    fn raw_equals_unblocked_for_mixed_dtypes_sizes_and_pools() {
        let mut rng = Rng(99);
        let sizes = [
            0,
            1,
            BLOCK_ELEMS - 1,
            BLOCK_ELEMS,
            3 * BLOCK_ELEMS + 5,
            TASK_ELEMS,
            TASK_ELEMS + 1,
            2 * TASK_ELEMS + BLOCK_ELEMS + 77,
        ];
        let dtypes = [DType::BF16, DType::F32, DType::F16, DType::F64];
        for (s, &n) in sizes.iter().enumerate() {
            let k = 1 + s % 3;
            let in_dts: Vec<DType> = (0..k).map(|i| dtypes[(s + i) % 4]).collect();
            let bytes: Vec<Vec<u8>> = in_dts.iter().map(|d| encode(*d, &rng.vec(n))).collect();
            let inputs: Vec<(DType, &[u8])> = in_dts
                .iter()
                .zip(&bytes)
                .map(|(d, b)| (*d, b.as_slice()))
                .collect();
            let w = rng.vec(k);
            let div = if s % 2 == 0 {
                Some(w.iter().sum())
            } else {
                None
            };
            for out_dt in dtypes {
                let want = unblocked(&inputs, &w, div, out_dt);
                for threads in [1, 4] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut got = vec![0xAAu8; n * out_dt.size_bytes()];
                    pool.install(|| linear_raw(&inputs, &w, div, out_dt, &mut got))
                        .unwrap();
                    assert!(
                        got == want,
                        "n={n} k={k} {in_dts:?} → {out_dt}, {threads} threads"
                    );
                }
            }
        }
    }

    #[test]
    fn raw_validates() {
        let a = vec![0u8; 8];
        let mut out = vec![0u8; 8];
        let e = linear_raw(&[(DType::F32, &a)], &[1.0, 2.0], None, DType::F32, &mut out);
        assert_eq!(
            e,
            Err(MergeError::WeightCount {
                inputs: 1,
                weights: 2
            })
        );
        let e = linear_raw(&[(DType::F16, &a)], &[1.0], None, DType::F32, &mut out);
        assert!(matches!(e, Err(MergeError::InputLength { .. })));
        let e = linear_raw(&[(DType::I64, &a)], &[1.0], None, DType::F64, &mut out);
        assert!(matches!(e, Err(MergeError::DType(_))));
    }

    /// Throughput check, run by hand: `cargo test --release --lib merge::linear::tests::throughput
    /// -- --ignored --nocapture`. Reports a cache-resident size (the kernel) and a DRAM-sized
    /// tensor (bounded by memory bandwidth: 8 bytes move per element).
    #[test]
    #[ignore]
    fn throughput() {
        let w = [0.5f32, 0.3, 0.2];
        for (n, reps) in [(TASK_ELEMS, 200), (64 * 1024 * 1024, 3)] {
            let mut rng = Rng(1);
            let bytes: Vec<Vec<u8>> = (0..3).map(|_| encode(DType::BF16, &rng.vec(n))).collect();
            let inputs: Vec<(DType, &[u8])> =
                bytes.iter().map(|b| (DType::BF16, b.as_slice())).collect();
            let mut out = vec![1u8; n * 2];
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut best = f64::INFINITY;
                for _ in 0..3 {
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        pool.install(|| linear_raw(&inputs, &w, Some(1.0), DType::BF16, &mut out))
                            .unwrap();
                    }
                    best = best.min(t.elapsed().as_secs_f64() / reps as f64);
                }
                eprintln!(
                    "3×bf16 → bf16, {n} elements, {threads} thread(s): {:.0} M elements/s",
                    n as f64 / best / 1e6
                );
            }
        }
    }
}

//! The precision a method's arithmetic is rounded to after every step.
//!
//! mergekit computes most methods with torch tensors of the checkpoint's dtype: each elementwise
//! op is evaluated in f32 and rounded to that dtype, each reduction accumulates in f32 and rounds
//! once (conformance README, "Arithmetic details"). Emulating that is what makes bf16 outputs
//! bit-identical; with [`Precision::F32`] every rounding is the identity.
//!
//! Two forms, with the same bits: [`Precision::round`] for one value, and the chunk-wise
//! [`Precision::round_slice`] / [`Precision::round_into`] for kernels that round a block at a
//! time (branch-free, vectorised, AVX2 picked at run time on x86_64).

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::merge::dtype::{DType, bf16_round_bits};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    BF16,
    F16,
}

/// Elements per stack block of the f16 slice path (half's slice conversions use F16C on 8 at a
/// time, the same instruction as its scalar conversion).
const F16_BLOCK: usize = 64;

impl Precision {
    /// The precision torch would compute in for tensors stored as `d` (F64 runs in f32 here).
    pub fn of(d: DType) -> Precision {
        match d {
            DType::BF16 => Precision::BF16,
            DType::F16 => Precision::F16,
            _ => Precision::F32,
        }
    }

    /// Round an f32 result to this precision (round-to-nearest-even), back in f32.
    #[inline(always)]
    pub fn round(self, x: f32) -> f32 {
        match self {
            Precision::F32 => x,
            Precision::BF16 => bf16_round(x),
            Precision::F16 => f16::from_f32(x).to_f32(),
        }
    }

    /// A Python float meeting a tensor of this dtype as a 0-dim operand on the left of `*`
    /// or either side of `+`/`−` (rounded to the tensor's dtype first).
    #[inline]
    pub fn scalar(self, x: f64) -> f32 {
        self.round(x as f32)
    }

    /// [`Precision::round`] of every element, in place.
    #[inline]
    pub fn round_slice(self, xs: &mut [f32]) {
        match self {
            Precision::F32 => {}
            Precision::BF16 => bf16_round_slice(xs),
            Precision::F16 => {
                let mut tmp = [f16::ZERO; F16_BLOCK];
                for block in xs.chunks_mut(F16_BLOCK) {
                    let t = &mut tmp[..block.len()];
                    t.convert_from_f32_slice(block);
                    t.convert_to_f32_slice(block);
                }
            }
        }
    }

    /// `dst[i] = self.round(src[i])`.
    ///
    /// # Panics
    /// If the lengths differ.
    #[inline]
    pub fn round_into(self, src: &[f32], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len(), "round_into: lengths differ");
        dst.copy_from_slice(src);
        self.round_slice(dst);
    }
}

/// Round an f32 to the nearest bf16 (ties to even), in f32: the same bits as
/// `half::bf16::from_f32(x).to_f32()` (NaN stays a quiet NaN of the same sign and top payload
/// bits, overflow carries into infinity). Branch-free, so loops over it vectorize.
#[inline(always)]
pub fn bf16_round(x: f32) -> f32 {
    f32::from_bits(bf16_round_bits(x.to_bits()))
}

/// [`bf16_round`] of every element, in place.
#[inline]
pub fn bf16_round_slice(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { bf16_round_slice_avx2(xs) };
            return;
        }
    }
    bf16_round_slice_inner(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn bf16_round_slice_avx2(xs: &mut [f32]) {
    bf16_round_slice_inner(xs)
}

#[inline(always)]
fn bf16_round_slice_inner(xs: &mut [f32]) {
    for x in xs {
        *x = bf16_round(*x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn fast_bf16_rounding_matches_half() {
        let check = |b: u32| {
            let x = f32::from_bits(b);
            let want = bf16::from_f32(x).to_f32();
            let got = bf16_round(x);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{b:#x}: {got:?} vs {want:?}"
            );
        };
        // Every pattern around each rounding boundary of every exponent, and a random sweep.
        for hi in 0..=0xFFFFu32 {
            for lo in [0u32, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF] {
                check((hi << 16) | lo);
            }
        }
        let mut s = 0x1234_5678_9ABC_DEF0u64;
        for _ in 0..2_000_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            check(s as u32);
        }
    }

    /// The inputs where rounding to a 16-bit format decides: for every 16-bit pattern of
    /// `format` (each decoded to f32), the value itself, the midpoints to its neighbours (ties)
    /// and one f32 ulp either side of them; plus NaNs with every kind of payload, infinities,
    /// f32 subnormals, ±0 and a large pseudo-random sweep of all bit patterns.
    fn hard_cases(decode: impl Fn(u16) -> f32) -> Vec<f32> {
        let mut xs = Vec::with_capacity(65536 * 8 + 1_100_000);
        for h in 0..=u16::MAX {
            let v = decode(h);
            let next = decode(h.wrapping_add(1));
            xs.push(v);
            if v.is_finite() && next.is_finite() && next.is_sign_negative() == v.is_sign_negative()
            {
                let mid = ((v as f64 + next as f64) / 2.0) as f32; // exact: one more bit
                let m = mid.to_bits();
                xs.extend([
                    mid,
                    f32::from_bits(m.wrapping_sub(1)),
                    f32::from_bits(m + 1),
                ]);
            }
            let b = v.to_bits();
            xs.extend([b ^ 1, b | 0x7FFF, b | 0x8000, b | 0xFFFF].map(f32::from_bits));
        }
        for b in [
            0x7F80_0000u32,
            0xFF80_0000,
            0x7F80_0001,
            0xFF80_0001,
            0x7FC0_0000,
            0xFFC0_0000,
            0x7FFF_FFFF,
            0xFFFF_FFFF,
            0x7FBF_FFFF,
            0x7F80_8000,
            0x7FA0_0001,
            0x0000_0000,
            0x8000_0000,
            0x0000_0001,
            0x8000_0001,
            0x007F_FFFF,
            0x807F_FFFF,
            0x0080_0000,
            0x7F7F_FFFF,
            0xFF7F_FFFF,
            0x477F_F000,
            0x477F_EFFF,
            0x3380_0000,
            0x3300_0000,
        ] {
            xs.push(f32::from_bits(b));
        }
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..1_000_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            xs.push(f32::from_bits((s >> 17) as u32));
        }
        xs
    }

    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits()
    }

    #[test]
    fn slices_round_exactly_as_the_scalar_bf16() {
        let xs = hard_cases(|h| bf16::from_bits(h).to_f32());
        let mut got = xs.clone();
        Precision::BF16.round_slice(&mut got);
        let mut portable = xs.clone();
        bf16_round_slice_inner(&mut portable);
        let mut into = vec![0.0; xs.len()];
        Precision::BF16.round_into(&xs, &mut into);
        for (i, &x) in xs.iter().enumerate() {
            // NaN payloads included: the bits, not just NaN-ness.
            let want = bf16::from_f32(x).to_f32();
            assert!(
                same(Precision::BF16.round(x), want),
                "{:#010x}",
                x.to_bits()
            );
            assert!(same(got[i], want), "slice {:#010x}", x.to_bits());
            assert!(same(portable[i], want), "portable {:#010x}", x.to_bits());
            assert!(same(into[i], want), "into {:#010x}", x.to_bits());
        }
    }

    #[test]
    fn slices_round_exactly_as_the_scalar_f16() {
        let xs = hard_cases(|h| f16::from_bits(h).to_f32());
        // Lengths that are not a multiple of the block.
        for len in [xs.len(), F16_BLOCK - 1, F16_BLOCK + 3, 1, 0] {
            let xs = &xs[xs.len() - len..];
            let mut got = xs.to_vec();
            Precision::F16.round_slice(&mut got);
            for (&x, &g) in xs.iter().zip(&got) {
                let want = f16::from_f32(x).to_f32();
                assert!(same(Precision::F16.round(x), want), "{:#010x}", x.to_bits());
                assert!(
                    same(g, want),
                    "slice {:#010x}: {g:?} vs {want:?}",
                    x.to_bits()
                );
            }
        }
        // f32 is the identity, NaN payloads and all.
        let mut got = xs.clone();
        Precision::F32.round_slice(&mut got);
        assert!(xs.iter().zip(&got).all(|(a, b)| same(*a, *b)));
    }

    /// IEEE round-to-nearest-even of `x` to a binary format with `mant` fraction bits and
    /// normal exponents `emin..=emax`, computed exactly in f64: gradual underflow (subnormals
    /// kept, below half the smallest one → ±0, exactly half → ±0 by ties-to-even), overflow
    /// past the largest finite + half an ulp → ±inf. What torch's CPU `Tensor.to` does (it
    /// flushes nothing unless `torch.set_flush_denormal(True)`), written without `half`.
    fn reference_rne(x: f32, mant: i32, emin: i32, emax: i32) -> f32 {
        if !x.is_finite() || x == 0.0 {
            return x;
        }
        let y = (x as f64).abs();
        let e = ((y.to_bits() >> 52) & 0x7ff) as i32 - 1023;
        let q = 2f64.powi(e.max(emin) - mant);
        let v = (y / q).round_ties_even() * q;
        let v = if v >= 2f64.powi(emax + 1) {
            f64::INFINITY
        } else {
            v
        };
        (v as f32).copysign(x)
    }

    /// Every 16-bit pattern's value, the ties between neighbours and one f32 ulp either side
    /// (subnormals of the format included) round as the independent reference says, through
    /// [`Precision::round`], [`Precision::round_slice`], the encoder and [`crate::merge::dtype::cast`].
    #[test]
    fn sixteen_bit_rounding_matches_an_independent_reference() {
        use crate::merge::dtype::{cast, decode_to_f32, encode_from_f32};
        for (p, dt, mant, emin, emax, decode) in [
            (
                Precision::BF16,
                DType::BF16,
                7,
                -126,
                127,
                (|h| bf16::from_bits(h).to_f32()) as fn(u16) -> f32,
            ),
            (
                Precision::F16,
                DType::F16,
                10,
                -14,
                15,
                (|h| f16::from_bits(h).to_f32()) as fn(u16) -> f32,
            ),
        ] {
            let xs: Vec<f32> = hard_cases(decode)
                .into_iter()
                .filter(|x| !x.is_nan())
                .collect();
            let mut slice = xs.clone();
            p.round_slice(&mut slice);
            let mut enc = vec![0u8; xs.len() * 2];
            encode_from_f32(dt, &xs, &mut enc).unwrap();
            let mut dec = vec![0.0f32; xs.len()];
            decode_to_f32(dt, &enc, &mut dec).unwrap();
            let f32_bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
            let cast16 = cast(DType::F32, &f32_bytes, dt).unwrap();
            assert_eq!(cast16, enc, "{dt}");
            for (i, &x) in xs.iter().enumerate() {
                let want = reference_rne(x, mant, emin, emax);
                let b = x.to_bits();
                assert!(
                    same(p.round(x), want),
                    "{dt} {b:#010x}: {} vs {want}",
                    p.round(x)
                );
                assert!(same(slice[i], want), "{dt} slice {b:#010x}");
                assert!(same(dec[i], want), "{dt} encode {b:#010x}");
            }
        }
        // bf16 → f16 (mergekit `dtype: float16` over bf16 checkpoints): every pattern.
        let all: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
        let got = cast(DType::BF16, &all, DType::F16).unwrap();
        for h in 0..=u16::MAX {
            let x = bf16::from_bits(h).to_f32();
            let i = 2 * h as usize;
            let g = f16::from_le_bytes([got[i], got[i + 1]]).to_f32();
            if x.is_nan() {
                assert!(g.is_nan(), "{h:#06x}");
            } else {
                assert!(same(g, reference_rne(x, 10, -14, 15)), "{h:#06x}: {g}");
            }
        }
    }

    #[test]
    fn rounds_to_nearest_even() {
        let p = Precision::BF16;
        assert_eq!(p.round(0.3), 0.30078125);
        assert_eq!(p.round(1.0 + 2f32.powi(-8)), 1.0); // tie → even
        assert_eq!(p.round(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert_eq!(Precision::F32.round(0.3), 0.3);
        assert_eq!(Precision::F16.round(1.0 + 2f32.powi(-12)), 1.0);
        assert_eq!(Precision::of(DType::F64), Precision::F32);
    }
}

//! The precision a method's arithmetic is rounded to after every step.
//!
//! mergekit computes most methods with torch tensors of the checkpoint's dtype: each elementwise
//! op is evaluated in f32 and rounded to that dtype, each reduction accumulates in f32 and rounds
//! once (conformance README, "Arithmetic details"). Emulating that is what makes bf16 outputs
//! bit-identical; with [`Precision::F32`] every rounding is the identity.

use half::f16;

use crate::merge::dtype::DType;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    BF16,
    F16,
}

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
    #[inline]
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
}

/// Round an f32 to the nearest bf16 (ties to even), in f32: the same bits as
/// `half::bf16::from_f32(x).to_f32()` (NaN stays a quiet NaN of the same sign, overflow
/// carries into infinity), branch-light so loops over it vectorize.
#[inline]
pub fn bf16_round(x: f32) -> f32 {
    let b = x.to_bits();
    if x.is_nan() {
        return f32::from_bits((b | 0x0040_0000) & 0xFFFF_0000);
    }
    f32::from_bits(b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000)
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

//! The precision a method's arithmetic is rounded to after every step.
//!
//! mergekit computes most methods with torch tensors of the checkpoint's dtype: each elementwise
//! op is evaluated in f32 and rounded to that dtype, each reduction accumulates in f32 and rounds
//! once (conformance README, "Arithmetic details"). Emulating that is what makes bf16 outputs
//! bit-identical; with [`Precision::F32`] every rounding is the identity.

use half::{bf16, f16};

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
            Precision::BF16 => bf16::from_f32(x).to_f32(),
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

#[cfg(test)]
mod tests {
    use super::*;

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

//! A keyed, counter-based generator: the draw for element `e` of tensor `name` of model `m`
//! under `seed` is a pure function of those four values, so DARE/DELLA masks do not depend on
//! chunking, thread count or the order tensors are processed in (ALGORITHMS.md §1.6).
//!
//! `u = fmix(fmix(key) ^ e·φ)` with `key = fmix(seed ⊕ fmix(m) ⊕ H(name))`, where `fmix` is
//! the SplitMix64 finalizer, φ the 64-bit golden ratio and `H` the first 8 bytes of SHA-256.
//! The uniform is `(u >> 11) · 2⁻⁵³` in `[0, 1)`.

use sha2::{Digest, Sha256};

const PHI: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline]
fn fmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The stream of one (seed, model, tensor).
#[derive(Debug, Clone, Copy)]
pub struct KeyedRng {
    key: u64,
}

impl KeyedRng {
    pub fn new(seed: u64, model: usize, tensor: &str) -> Self {
        let h = Sha256::digest(tensor.as_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[..8]);
        let name = u64::from_le_bytes(b);
        KeyedRng {
            key: fmix(seed ^ fmix((model as u64).wrapping_add(PHI)) ^ name),
        }
    }

    /// The 53 random bits of element `e`: [`KeyedRng::uniform`] is `bits(e) · 2⁻⁵³`.
    #[inline(always)]
    pub fn bits(&self, e: u64) -> u64 {
        fmix(self.key ^ e.wrapping_mul(PHI).wrapping_add(PHI)) >> 11
    }

    /// Uniform in `[0, 1)` for element `e`.
    #[inline]
    pub fn uniform(&self, e: u64) -> f64 {
        self.bits(e) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Bernoulli(p) for element `e`: `uniform(e) < p`.
    #[inline]
    pub fn keep(&self, e: u64, p: f64) -> bool {
        self.bits(e) < threshold(p)
    }
}

/// The integer form of `uniform(e) < p`: `bits(e) < threshold(p)` for every `e`, so a loop
/// deciding many draws against one probability converts it once. `bits · 2⁻⁵³` is exact in
/// f64 (`bits < 2⁵³`) and so is `p · 2⁵³` (a power-of-two scaling), hence
/// `bits · 2⁻⁵³ < p ⟺ bits < p · 2⁵³ ⟺ bits < ⌈p · 2⁵³⌉` for an integer `bits`.
#[inline]
pub fn threshold(p: f64) -> u64 {
    const ONE: u64 = 1 << 53;
    if p.is_nan() || p <= 0.0 {
        0
    } else if p >= 1.0 {
        ONE
    } else {
        (p * ONE as f64).ceil() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_and_uniform() {
        let a = KeyedRng::new(42, 0, "w");
        assert_eq!(a.uniform(7), KeyedRng::new(42, 0, "w").uniform(7));
        assert_ne!(a.uniform(7), KeyedRng::new(43, 0, "w").uniform(7));
        assert_ne!(a.uniform(7), KeyedRng::new(42, 1, "w").uniform(7));
        assert_ne!(a.uniform(7), KeyedRng::new(42, 0, "v").uniform(7));
        let n = 200_000u64;
        for p in [0.1, 0.5, 0.7] {
            let kept = (0..n).filter(|e| a.keep(*e, p)).count() as f64;
            let sd = (p * (1.0 - p) * n as f64).sqrt();
            assert!((kept - p * n as f64).abs() < 4.0 * sd, "p={p} kept={kept}");
        }
        let mean = (0..n).map(|e| a.uniform(e)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.005);
    }

    /// `bits < threshold(p)` decides exactly as the float comparison `uniform < p`, at and
    /// around every probability's boundary, for the extreme and special probabilities too.
    #[test]
    fn threshold_equals_the_float_comparison() {
        let a = KeyedRng::new(7, 2, "t");
        let unit = 1.0 / (1u64 << 53) as f64;
        let mut ps = vec![
            0.0,
            -0.0,
            -1.0,
            1.0,
            1.5,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE,
            5e-324,
            unit,
            1.0 - unit,
            0.5,
            0.1,
            0.3f32 as f64,
        ];
        for e in 0..2000u64 {
            ps.push(a.uniform(e)); // exactly on a draw
            ps.push(a.uniform(e) + unit / 2.0);
            ps.push(f64::from_bits(a.uniform(e).to_bits().wrapping_sub(1)));
        }
        for (i, &p) in ps.iter().enumerate() {
            for e in 0..200u64 {
                let e = e.wrapping_mul(i as u64 + 1);
                assert_eq!(a.keep(e, p), a.uniform(e) < p, "p {p:e} e {e}");
            }
            // The draws that sit on the boundary itself.
            for e in 0..2000u64 {
                let u = a.uniform(e);
                assert_eq!(a.bits(e) < threshold(p), u < p, "p {p:e} e {e}");
            }
        }
    }
}

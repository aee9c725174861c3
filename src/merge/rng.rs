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

    /// Uniform in `[0, 1)` for element `e`.
    #[inline]
    pub fn uniform(&self, e: u64) -> f64 {
        let u = fmix(self.key ^ e.wrapping_mul(PHI).wrapping_add(PHI));
        (u >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Bernoulli(p) for element `e`.
    #[inline]
    pub fn keep(&self, e: u64, p: f64) -> bool {
        self.uniform(e) < p
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
}

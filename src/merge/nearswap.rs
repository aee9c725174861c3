//! NearSwap as mergekit's `nearswap`, elementwise with torch's rounding `r(·)` to the compute
//! precision: `w = clamp(r(r(1 / max(r(|a − b|), r(1e-6))) · f32(t)), 0, 1)`,
//! `out = r(r(w·b) + r(r(1 − w)·a))` with `a` the base and `b` the other model.

use crate::merge::precision::Precision;

pub fn nearswap(p: Precision, t: f64, base: &[f32], other: &[f32], out: &mut [f32]) {
    let tf = t as f32;
    let floor = p.round(1e-6);
    for ((o, a), b) in out.iter_mut().zip(base).zip(other) {
        let absdiff = p.round(a - b).abs().max(floor);
        // Python's `t / tensor` is torch's `tensor.reciprocal() * t`.
        let w = p.round(p.round(1.0 / absdiff) * tf).clamp(0.0, 1.0);
        *o = p.round(p.round(w * b) + p.round(p.round(1.0 - w) * a));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_hand() {
        let a = [1.0f32, 1.0, 1.0, 1.0];
        let b = [1.5f32, 1.25, 3.0, 1.0];
        let mut out = [0.0f32; 4];
        nearswap(Precision::F32, 0.5, &a, &b, &mut out);
        // |a−b| = 0.5 → w = 1 → b; 0.25 → w = 2 → 1 → b; 2 → w = 0.25 → 0.25·3 + 0.75·1 = 1.5;
        // 0 → clamped to 1e-6 → w = 1 → b.
        assert_eq!(out, [1.5, 1.25, 1.5, 1.0]);
    }
}

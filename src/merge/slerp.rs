//! Spherical linear interpolation as mergekit's `slerp` (ALGORITHMS.md §11.1), in f32 as its
//! numpy code: normalize both flattened tensors (norm > 1e-8), `dot = Σ v̂0·v̂1`; if
//! `|dot| > 0.9995` lerp `(1−t)·v0 + t·v1`, else `θ = acos(dot)`,
//! `out = sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1`. Norms and the dot product accumulate
//! in f64 (numpy uses pairwise / BLAS f32 sums; the difference moves an f32 scalar by an ulp at
//! most, far below a bf16 ulp of the output).

pub const DOT_THRESHOLD: f32 = 0.9995;
pub const EPS: f32 = 1e-8;

fn norm(v: &[f32]) -> f32 {
    v.iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt() as f32
}

/// `out = slerp(t, v0, v1)` elementwise over the flattened tensors (f32 results; the caller
/// rounds to the output dtype).
pub fn slerp(t: f64, v0: &[f32], v1: &[f32], out: &mut [f32]) {
    let tf = t as f32;
    let n0 = norm(v0);
    let n1 = norm(v1);
    let s0n = if n0 > EPS { n0 } else { 1.0 };
    let s1n = if n1 > EPS { n1 } else { 1.0 };
    let dot = v0
        .iter()
        .zip(v1)
        .map(|(a, b)| ((a / s0n) * (b / s1n)) as f64)
        .sum::<f64>() as f32;
    if dot.abs() > DOT_THRESHOLD {
        let a = (1.0 - t) as f32;
        for ((o, x), y) in out.iter_mut().zip(v0).zip(v1) {
            *o = a * x + tf * y;
        }
        return;
    }
    let theta0 = dot.acos();
    let sin0 = theta0.sin();
    let theta_t = theta0 * tf;
    let sin_t = theta_t.sin();
    let s0 = (theta0 - theta_t).sin() / sin0;
    let s1 = sin_t / sin0;
    for ((o, x), y) in out.iter_mut().zip(v0).zip(v1) {
        *o = s0 * x + s1 * y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

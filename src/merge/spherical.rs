//! NuSLERP and the Karcher mean as mergekit computes them on torch tensors (ALGORITHMS.md
//! §11.3–§11.4), rounding to the compute precision `r(·)` after every tensor op.
//!
//! torch details that decide bf16 bit parity (conformance README): a Python float meets a
//! tensor at f32 precision; a 0-dim f32 tensor meeting a bf16 tensor is rounded to bf16 first,
//! except as the right operand of `*` or `/`; reductions accumulate (here in f64) and round once.

use crate::merge::precision::Precision;

fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt()
}

/// mergekit's `nuslerp` on one vector pair (already task vectors when there is a base):
/// normalize (norm clamped to ≥ 1e-7), `cos = r(Σ r(u0·u1))`, `θ = r(acos)`, and
/// `r(r(r(sin(r((1−t)θ)))·v0) + r(r(sin(r(tθ)))·v1)) / r(sin θ)`, lerp when `|sin θ| < 1e-8`.
pub fn nuslerp_vec(p: Precision, t: f64, v0: &[f32], v1: &[f32], out: &mut [f32]) {
    let n0 = p.round(norm(v0) as f32).max(1e-7);
    let n1 = p.round(norm(v1) as f32).max(1e-7);
    let cos = p.round(
        v0.iter()
            .zip(v1)
            .map(|(a, b)| p.round(p.round(a / n0) * p.round(b / n1)) as f64)
            .sum::<f64>() as f32,
    );
    let theta = p.round(cos.clamp(-1.0, 1.0).acos());
    let sin_theta = p.round(theta.sin());
    let tf = t as f32;
    let one_minus = (1.0 - t) as f32;
    if sin_theta.abs() < 1e-8 {
        for ((o, a), b) in out.iter_mut().zip(v0).zip(v1) {
            *o = p.round(p.round(one_minus * a) + p.round(tf * b));
        }
        return;
    }
    let s0 = p.round(p.round(one_minus * theta).sin());
    let s1 = p.round(p.round(tf * theta).sin());
    for ((o, a), b) in out.iter_mut().zip(v0).zip(v1) {
        *o = p.round(p.round(p.round(s0 * a) + p.round(s1 * b)) / sin_theta);
    }
}

/// How NuSLERP splits a tensor into vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NuslerpShape {
    /// The whole tensor is one vector (`nuslerp_flatten: true`, the default).
    Flatten,
    /// Each row (last dimension) is a vector.
    Rows,
    /// Each column (first dimension of a 2-D tensor) is a vector (`nuslerp_row_wise`).
    Columns,
}

/// `out = [b +] nuslerp(t, x0 [− b], x1 [− b])` for a tensor of shape `rows × cols`.
#[allow(clippy::too_many_arguments)]
pub fn nuslerp(
    p: Precision,
    t: f64,
    base: Option<&[f32]>,
    x0: &[f32],
    x1: &[f32],
    shape: NuslerpShape,
    cols: usize,
    out: &mut [f32],
) {
    let (v0, v1): (Vec<f32>, Vec<f32>) = match base {
        Some(b) => (
            x0.iter().zip(b).map(|(x, b)| p.round(x - b)).collect(),
            x1.iter().zip(b).map(|(x, b)| p.round(x - b)).collect(),
        ),
        None => (x0.to_vec(), x1.to_vec()),
    };
    let n = out.len();
    let cols = cols.max(1);
    match shape {
        NuslerpShape::Flatten => nuslerp_vec(p, t, &v0, &v1, out),
        NuslerpShape::Rows => {
            for ((o, a), b) in out
                .chunks_mut(cols)
                .zip(v0.chunks(cols))
                .zip(v1.chunks(cols))
            {
                nuslerp_vec(p, t, a, b, o);
            }
        }
        NuslerpShape::Columns => {
            let rows = n / cols;
            let mut a = vec![0.0f32; rows];
            let mut b = vec![0.0f32; rows];
            let mut o = vec![0.0f32; rows];
            for c in 0..cols {
                for r in 0..rows {
                    a[r] = v0[r * cols + c];
                    b[r] = v1[r * cols + c];
                }
                nuslerp_vec(p, t, &a, &b, &mut o);
                for r in 0..rows {
                    out[r * cols + c] = o[r];
                }
            }
        }
    }
    if let Some(b) = base {
        for (o, b) in out.iter_mut().zip(b) {
            *o = p.round(b + *o);
        }
    }
}

/// mergekit's `karcher_merge_tensors` with equal weights `1/N`.
/// `final_scale_bf16`: round the final scale `Σ αᵢ‖xᵢ‖` to the compute precision before
/// multiplying (what the conformance pack shows torch doing).
pub fn karcher(p: Precision, xs: &[&[f32]], max_iter: usize, tol: f64, out: &mut [f32]) {
    let n = out.len();
    if xs.len() == 1 {
        out.copy_from_slice(xs[0]);
        return;
    }
    let alpha = 1.0 / xs.len() as f64;
    let mut norms = Vec::with_capacity(xs.len());
    let mut units: Vec<Vec<f32>> = Vec::with_capacity(xs.len());
    for x in xs {
        let nv = norm(x) as f32; // f32 0-dim tensor
        norms.push(nv as f64);
        if nv == 0.0 {
            units.push(vec![0.0; n]);
        } else {
            units.push(x.iter().map(|v| p.round(v / nv)).collect());
        }
    }
    let valid: Vec<usize> = (0..xs.len()).filter(|&i| norms[i] > tol).collect();
    if valid.is_empty() {
        out.fill(0.0);
        return;
    }
    let alpha_sum: f64 = valid.iter().map(|_| alpha).sum();
    let na: Vec<f32> = valid.iter().map(|_| (alpha / alpha_sum) as f32).collect();
    let vu: Vec<&[f32]> = valid.iter().map(|&i| units[i].as_slice()).collect();
    let mut u = vec![0.0f32; n];
    for (a, ui) in na.iter().zip(&vu) {
        for (x, v) in u.iter_mut().zip(ui.iter()) {
            *x = p.round(*x + p.round(a * v));
        }
    }
    let norm_u = norm(&u) as f32;
    if (norm_u as f64) < tol {
        u.copy_from_slice(vu[0]);
    } else {
        for x in u.iter_mut() {
            *x = p.round(*x / norm_u);
        }
    }
    let mut t_vec = vec![0.0f32; n];
    for _ in 0..max_iter {
        t_vec.fill(0.0);
        for (a, ui) in na.iter().zip(&vu) {
            let dot = p
                .round(
                    u.iter()
                        .zip(ui.iter())
                        .map(|(x, y)| *x as f64 * *y as f64)
                        .sum::<f64>() as f32,
                )
                .clamp(-1.0, 1.0);
            let theta = p.round(dot.acos());
            if (theta as f64) < tol {
                continue;
            }
            let sin_theta = p.round(theta.sin());
            let coef = p.round(a * p.round(theta / sin_theta));
            for ((tv, x), y) in t_vec.iter_mut().zip(&u).zip(ui.iter()) {
                let diff = p.round(y - p.round(dot * x));
                *tv = p.round(*tv + p.round(coef * diff));
            }
        }
        let norm_t = norm(&t_vec) as f32;
        if (norm_t as f64) < tol {
            break;
        }
        // 0-dim f32 on the left of `*`: rounded to the tensor's dtype first.
        let c = p.round(norm_t.cos());
        let s = p.round(norm_t.sin());
        for (x, tv) in u.iter_mut().zip(&t_vec) {
            *x = p.round(p.round(c * *x) + p.round(s * p.round(tv / norm_t)));
        }
        let un = norm(&u) as f32;
        if (un as f64) > tol {
            for x in u.iter_mut() {
                *x = p.round(*x / un);
            }
        }
    }
    let scale: f64 = norms.iter().map(|nv| alpha * nv).sum();
    let sc = p.round(scale as f32);
    for (o, x) in out.iter_mut().zip(&u) {
        *o = p.round(sc * x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nuslerp_ends_and_midpoint() {
        let a = [3.0f32, 0.0, 0.0, 0.0];
        let b = [0.0f32, 3.0, 0.0, 0.0];
        let mut out = [0.0f32; 4];
        let f = Precision::F32;
        nuslerp(f, 0.0, None, &a, &b, NuslerpShape::Flatten, 4, &mut out);
        assert!(out.iter().zip(&a).all(|(x, y)| (x - y).abs() < 1e-6));
        nuslerp(f, 0.5, None, &a, &b, NuslerpShape::Flatten, 4, &mut out);
        let h = 3.0 * std::f32::consts::FRAC_1_SQRT_2;
        assert!((out[0] - h).abs() < 1e-5 && (out[1] - h).abs() < 1e-5);
        // With a base: interpolate the task vectors, add the base back.
        let base = [1.0f32; 4];
        let a1: Vec<f32> = a.iter().map(|x| x + 1.0).collect();
        let b1: Vec<f32> = b.iter().map(|x| x + 1.0).collect();
        nuslerp(
            f,
            0.5,
            Some(&base),
            &a1,
            &b1,
            NuslerpShape::Flatten,
            4,
            &mut out,
        );
        assert!((out[0] - h - 1.0).abs() < 1e-5 && (out[2] - 1.0).abs() < 1e-6);
        // Row-wise: each row of a 2×2 on its own (colinear rows → lerp).
        let r0 = [1.0f32, 0.0, 2.0, 0.0];
        let r1 = [3.0f32, 0.0, 0.0, 2.0];
        nuslerp(f, 0.5, None, &r0, &r1, NuslerpShape::Rows, 2, &mut out);
        assert_eq!(out[..2], [2.0, 0.0]);
        assert!((out[2] - 2.0 * std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-5);
    }

    #[test]
    fn karcher_of_two_orthogonal_vectors() {
        let a = [2.0f32, 0.0, 0.0, 0.0];
        let b = [0.0f32, 4.0, 0.0, 0.0];
        let mut out = [0.0f32; 4];
        karcher(Precision::F32, &[&a, &b], 10, 1e-5, &mut out);
        // Direction: the bisector; scale: mean of the norms (3).
        let h = 3.0 * std::f32::consts::FRAC_1_SQRT_2;
        assert!(
            (out[0] - h).abs() < 1e-4 && (out[1] - h).abs() < 1e-4,
            "{out:?}"
        );
        // Same model twice gives the model.
        karcher(Precision::F32, &[&a, &a], 10, 1e-5, &mut out);
        assert!(out.iter().zip(&a).all(|(x, y)| (x - y).abs() < 1e-5));
    }
}

//! Inner products of LoRA deltas without forming them (analyses of adapters): for one module,
//! each adapter's delta is a sum of [`Part`]s, the low-rank `s·B·A` and, rarely, a dense
//! difference (a `modules_to_save` copy, or an embedding's `base_layer` copy, minus the base).
//!
//! - `⟨s₁B₁A₁, s₂B₂A₂⟩_F = s₁s₂·tr((B₁ᵀB₂)(A₂A₁ᵀ))`: `O((n_a + n_b)·r₁·r₂)`, and
//!   `‖sBA‖²_F = s²·tr((BᵀB)(AAᵀ))`;
//! - `⟨D, sBA⟩_F = s·Σ_{i,k} B_ik·(D·Aᵀ)_ik`: `O(n_a·n_b·r)`;
//! - `⟨D₁, D₂⟩_F` element by element.
//!
//! Every part is in `B@A` orientation (`n_b × n_a` row-major: a Linear's `(out, in)`, the
//! transpose of an Embedding's weight). Sums in `f64`.

/// One term of a module's delta, `n_b × n_a` in `B@A` orientation.
#[derive(Debug, Clone, Copy)]
pub enum Part<'a> {
    /// `scale·B@A`: `a` `(rank × n_a)`, `b` `(n_b × rank)`, row-major.
    LowRank {
        a: &'a [f32],
        b: &'a [f32],
        rank: usize,
        scale: f64,
    },
    /// A formed difference, `n_b × n_a` row-major.
    Dense(&'a [f32]),
}

/// `Σ_i x[i·sx + ox]·y[i·sy + oy]` over `len` rows, in f64.
fn strided_dot(
    x: &[f32],
    sx: usize,
    ox: usize,
    y: &[f32],
    sy: usize,
    oy: usize,
    len: usize,
) -> f64 {
    (0..len)
        .map(|i| x[i * sx + ox] as f64 * y[i * sy + oy] as f64)
        .sum()
}

fn row_dot(x: &[f32], y: &[f32]) -> f64 {
    x.iter().zip(y).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// `⟨p, q⟩_F` of two parts of one module (`n_a` columns, `n_b` rows).
pub fn inner(p: &Part<'_>, q: &Part<'_>, n_a: usize, n_b: usize) -> f64 {
    match (p, q) {
        (
            Part::LowRank {
                a: a1,
                b: b1,
                rank: r1,
                scale: s1,
            },
            Part::LowRank {
                a: a2,
                b: b2,
                rank: r2,
                scale: s2,
            },
        ) => {
            let (r1, r2) = (*r1, *r2);
            let mut tr = 0.0;
            for k in 0..r1 {
                for l in 0..r2 {
                    // (B₁ᵀB₂)_kl · (A₂A₁ᵀ)_lk
                    let c = strided_dot(b1, r1, k, b2, r2, l, n_b);
                    let e = row_dot(&a2[l * n_a..(l + 1) * n_a], &a1[k * n_a..(k + 1) * n_a]);
                    tr += c * e;
                }
            }
            s1 * s2 * tr
        }
        (Part::Dense(d), Part::LowRank { a, b, rank, scale })
        | (Part::LowRank { a, b, rank, scale }, Part::Dense(d)) => {
            let r = *rank;
            let mut sum = 0.0;
            for i in 0..n_b {
                let row = &d[i * n_a..(i + 1) * n_a];
                for k in 0..r {
                    sum += b[i * r + k] as f64 * row_dot(row, &a[k * n_a..(k + 1) * n_a]);
                }
            }
            scale * sum
        }
        (Part::Dense(x), Part::Dense(y)) => row_dot(x, y),
    }
}

/// The Gram matrix `G_ij = ⟨Δ_i, Δ_j⟩_F` of the deltas `Δ_i = Σ parts[i]` (an empty list is a
/// zero delta), `n × n` row-major.
pub fn gram(parts: &[Vec<Part<'_>>], n_a: usize, n_b: usize) -> Vec<f64> {
    let n = parts.len();
    let mut g = vec![0.0; n * n];
    for i in 0..n {
        for j in i..n {
            let v: f64 = parts[i]
                .iter()
                .flat_map(|p| parts[j].iter().map(move |q| (p, q)))
                .map(|(p, q)| inner(p, q, n_a, n_b))
                .sum();
            g[i * n + j] = v;
            g[j * n + i] = v;
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    fn formed(p: &Part<'_>, n_a: usize, n_b: usize) -> Vec<f64> {
        match p {
            Part::Dense(d) => d.iter().map(|x| *x as f64).collect(),
            Part::LowRank { a, b, rank, scale } => (0..n_b * n_a)
                .map(|x| {
                    let (i, j) = (x / n_a, x % n_a);
                    scale
                        * (0..*rank)
                            .map(|k| b[i * rank + k] as f64 * a[k * n_a + j] as f64)
                            .sum::<f64>()
                })
                .collect(),
        }
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let rng = crate::merge::rng::KeyedRng::new(seed, 0, "gram");
        (0..n).map(|e| rng.uniform(e as u64) as f32 - 0.5).collect()
    }

    /// Every kind of pair, against the formed products.
    #[test]
    fn gram_equals_the_formed_products() {
        let (n_a, n_b) = (13, 9);
        let (a1, b1) = (values(3 * n_a, 1), values(n_b * 3, 2));
        let (a2, b2) = (values(5 * n_a, 3), values(n_b * 5, 4));
        let d = values(n_a * n_b, 5);
        let parts = vec![
            vec![Part::LowRank {
                a: &a1,
                b: &b1,
                rank: 3,
                scale: 2.0,
            }],
            vec![
                Part::LowRank {
                    a: &a2,
                    b: &b2,
                    rank: 5,
                    scale: -0.5,
                },
                Part::Dense(&d),
            ],
            vec![],
        ];
        let g = gram(&parts, n_a, n_b);
        let dense: Vec<Vec<f64>> = parts
            .iter()
            .map(|ps| {
                let mut sum = vec![0.0; n_a * n_b];
                for p in ps {
                    for (s, x) in sum.iter_mut().zip(formed(p, n_a, n_b)) {
                        *s += x;
                    }
                }
                sum
            })
            .collect();
        for i in 0..3 {
            for j in 0..3 {
                let want: f64 = dense[i].iter().zip(&dense[j]).map(|(x, y)| x * y).sum();
                assert!(
                    (g[i * 3 + j] - want).abs() <= 1e-9 * want.abs().max(1.0),
                    "({i},{j}): {} vs {want}",
                    g[i * 3 + j]
                );
            }
        }
        assert_eq!(g[8], 0.0);
    }
}

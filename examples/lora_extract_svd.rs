//! Times `lora_extract`'s SVD of one module: the full thin SVD (what every module took before
//! the randomized route) against `lora_rsvd::truncated` (randomized when its check passes),
//! on the same `dim × dim` task vector, and prints the route taken and the relative Frobenius
//! difference of the two rank-`r` products.
//!
//! Task vectors (seeded), for each rank `r`: `gap`: a rank-`r` part with singular values
//! `1 … 0.1` (log spaced) plus Gaussian noise of `1e-4/√dim` per element (a rank-`r` LoRA
//! folded into a model, stored in f32); `decay`: the same with a rank-`4r` part (the cut falls
//! inside a slowly decaying spectrum: the check must fail); `flat`: Gaussian entries (a random
//! full-rank delta, no gap: the check must fail).
//!
//! `cargo run --release --example lora_extract_svd -- [dim] [ranks] [kinds] [runs]`, e.g.
//! `cargo run --release --example lora_extract_svd -- 4096 16,64 gap,decay,flat 3` (the
//! defaults; in a debug build faer runs with debug assertions and is far slower).

use std::time::Instant;

use faer::Mat;
use ladle::merge::lora_rsvd::{Route, truncated};
use ladle::merge::lora_svd::{Svd, dense_svd};

fn arg<T: std::str::FromStr>(i: usize, default: T) -> T {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

/// xorshift64* → standard normal (Box–Muller).
struct Normal(u64);

impl Normal {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn next(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    fn mat(&mut self, m: usize, n: usize, scale: f64) -> Mat<f64> {
        Mat::from_fn(m, n, |_, _| scale * self.next())
    }
}

fn task_vector(kind: &str, dim: usize, r: usize) -> Vec<f32> {
    let signal = if kind == "decay" { 4 * r } else { r };
    let mut g = Normal(0x9E37_79B9_7F4A_7C15);
    let t = match kind {
        "flat" => g.mat(dim, dim, 1.0 / (dim as f64).sqrt()),
        _ => {
            let l = g.mat(dim, signal, 1.0).qr().compute_thin_Q();
            let r = g.mat(dim, signal, 1.0).qr().compute_thin_Q();
            let steps = signal.saturating_sub(1).max(1) as f64;
            let s = Mat::from_fn(signal, signal, |i, j| {
                if i == j {
                    10f64.powf(-(i as f64) / steps)
                } else {
                    0.0
                }
            });
            let low = l.as_ref() * s.as_ref() * r.as_ref().transpose();
            let noise = g.mat(dim, dim, 1e-4 / (dim as f64).sqrt());
            low + noise
        }
    };
    (0..dim * dim)
        .map(|x| t[(x / dim, x % dim)] as f32)
        .collect()
}

fn product(svd: &Svd) -> Mat<f64> {
    let p = svd.rank();
    let u = Mat::from_fn(svd.m, p, |i, k| svd.u[i * p + k] * svd.s[k]);
    let v = Mat::from_fn(svd.n, p, |j, k| svd.v[j * p + k]);
    u.as_ref() * v.as_ref().transpose()
}

fn median(mut x: Vec<f64>) -> f64 {
    x.sort_by(f64::total_cmp);
    x[x.len() / 2]
}

fn main() {
    let dim: usize = arg(1, 4096);
    let ranks: String = arg(2, "16,64".to_string());
    let kinds: String = arg(3, "gap,decay,flat".to_string());
    let runs: usize = arg(4, 3).max(1);
    println!(
        "| task vector | dim | r | full SVD s (1 run) | truncated s (median of ≤ {runs}) | route | speed-up | ‖P_trunc − P_full‖_F / ‖P_full‖_F |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for kind in kinds.split(',') {
        for r in ranks.split(',').filter_map(|r| r.parse::<usize>().ok()) {
            let t = task_vector(kind, dim, r);
            // The full SVD once (its cost does not depend on r); the truncated one `runs` times
            // when it takes the randomized route (a fallback costs a full SVD: once).
            let t0 = Instant::now();
            let full = dense_svd(&t, dim, dim, r).expect("full SVD");
            let full_s = vec![t0.elapsed().as_secs_f64()];
            let (mut fast_s, mut fast, mut route) = (Vec::new(), None, None);
            while fast_s.len() < runs {
                let t0 = Instant::now();
                let (svd, rt) = truncated(&t, dim, dim, r, 0.0).expect("truncated SVD");
                fast_s.push(t0.elapsed().as_secs_f64());
                fast = Some(svd);
                route = Some(rt);
                if rt == Route::Full {
                    break;
                }
            }
            let fast = fast.expect("ran");
            let (pf, pt) = (product(&full), product(&fast));
            let err = (&pt - &pf).norm_l2() / pf.norm_l2();
            let (a, b) = (median(full_s), median(fast_s));
            println!(
                "| {kind} | {dim} | {r} | {a:.2} | {b:.2} | {:?} | {:.1}× | {err:.1e} |",
                route.expect("ran"),
                a / b
            );
        }
    }
}

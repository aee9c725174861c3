//! Property tests for every kernel, over many random cases from a seeded generator (no extra
//! crate; a failing case prints its seed and size): identities the methods must satisfy
//! whatever the data.

use crate::merge::gta::{self, Config, ModelParams};
use crate::merge::linear::linear;
use crate::merge::precision::Precision;
use crate::merge::sparsification::Sparsification;
use crate::merge::{model_stock, sce, slerp, spherical};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// bf16-representable values around 1 ± 0.05 (checkpoint-like), sometimes exactly 0.
    fn tensor(&mut self, n: usize, p: Precision) -> Vec<f32> {
        (0..n)
            .map(|_| {
                if self.next().is_multiple_of(17) {
                    0.0
                } else {
                    p.round((self.unit() * 2.0 - 1.0) as f32 * 0.05 + 0.02)
                }
            })
            .collect()
    }
}

const CASES: u64 = 60;

fn gta_cfg(s: Sparsification, consensus: bool, p: Precision) -> Config {
    Config {
        sparsification: s,
        consensus,
        normalize: false,
        rescale: false,
        lambda: 1.0,
        precision: p,
        seed: 7,
        per_row: false,
    }
}

fn run_gta(cfg: &Config, base: &[f32], xs: &[&[f32]], ms: &[ModelParams]) -> Vec<f32> {
    let mut out = vec![0.0; base.len()];
    gta::merge_tensor(base, xs, ms, cfg, base.len().clamp(1, 16), "t", &mut out);
    out
}

fn mp(weight: f64, density: f64) -> ModelParams {
    ModelParams {
        weight,
        density,
        ..Default::default()
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn merging_a_model_with_itself_gives_that_model() {
    for seed in 1..=CASES {
        let mut r = Rng(seed);
        let n = 1 + (r.next() % 300) as usize;
        let p = if seed % 2 == 0 {
            Precision::BF16
        } else {
            Precision::F32
        };
        let x = r.tensor(n, p);
        let mut out = vec![0.0; n];
        // x + x and a division by 2 are exact in f32 (three copies and /3 are not).
        linear(&[&x, &x], &[1.0, 1.0], Some(2.0), &mut out);
        assert_eq!(bits(&out), bits(&x), "linear seed {seed}");
        // Every GTA method with the model as its own base: all task vectors are zero.
        for s in [
            Sparsification::None,
            Sparsification::Magnitude,
            Sparsification::MagnitudeOutliers,
            Sparsification::Random,
            Sparsification::DellaMagprune,
        ] {
            for consensus in [false, true] {
                let c = gta_cfg(s, consensus, p);
                let m = ModelParams {
                    weight: 0.7,
                    density: 0.5,
                    gamma: 0.1,
                    epsilon: 0.1,
                };
                let got = run_gta(&c, &x, &[&x, &x], &[m, m]);
                assert_eq!(bits(&got), bits(&x), "{s:?} seed {seed}");
            }
        }
        slerp::slerp(0.3, &x, &x, &mut out);
        assert!(
            out.iter()
                .zip(&x)
                .all(|(a, b)| (a - b).abs() <= 1e-6 * b.abs().max(1e-3))
        );
        let mut o2 = vec![0.0; n];
        spherical::karcher(p, &[&x, &x], 10, 1e-5, &mut o2);
        assert!(
            o2.iter()
                .zip(&x)
                .all(|(a, b)| (a - b).abs() <= 2.0 * 2f32.powi(-7) * b.abs().max(1e-3)),
            "karcher seed {seed}"
        );
        model_stock::model_stock(p, &x, &[&x, &x], n, &mut o2);
        assert_eq!(bits(&o2), bits(&x), "model_stock seed {seed}");
        sce::sce(p, &x, &[&x, &x], 0.5, &mut o2);
        assert_eq!(bits(&o2), bits(&x), "sce seed {seed}");
    }
}

#[test]
fn task_arithmetic_lambda_zero_is_the_base_and_ties_density_one_is_task_arithmetic() {
    for seed in 1..=CASES {
        let mut r = Rng(seed * 31);
        let n = 1 + (r.next() % 300) as usize;
        let p = if seed % 2 == 0 {
            Precision::BF16
        } else {
            Precision::F32
        };
        let b = r.tensor(n, p);
        let x = r.tensor(n, p);
        let y = r.tensor(n, p);
        let ms = [mp(0.6, 1.0), mp(0.3, 1.0)];
        let c0 = Config {
            lambda: 0.0,
            ..gta_cfg(Sparsification::None, false, p)
        };
        assert_eq!(
            bits(&run_gta(&c0, &b, &[&x, &y], &ms)),
            bits(&b),
            "λ=0 seed {seed}"
        );
        let ta = gta_cfg(Sparsification::None, false, p);
        let ties = gta_cfg(Sparsification::Magnitude, true, p);
        assert_eq!(
            bits(&run_gta(&ties, &b, &[&x], &ms[..1])),
            bits(&run_gta(&ta, &b, &[&x], &ms[..1])),
            "ties(d=1, one model) = ta, seed {seed}"
        );
    }
}

#[test]
fn linear_normalize_is_scale_invariant() {
    for seed in 1..=CASES {
        let mut r = Rng(seed * 7 + 3);
        let n = 1 + (r.next() % 200) as usize;
        let xs: Vec<Vec<f32>> = (0..3).map(|_| r.tensor(n, Precision::F32)).collect();
        let refs: Vec<&[f32]> = xs.iter().map(|v| v.as_slice()).collect();
        // Powers of two scale exactly, so the normalized soup is bit-identical.
        let w = [0.5f32, 0.25, 0.125];
        let k = 2f32.powi((r.next() % 8) as i32 - 4);
        let wk: Vec<f32> = w.iter().map(|x| x * k).collect();
        let mut a = vec![0.0; n];
        let mut b = vec![0.0; n];
        linear(&refs, &w, Some(w.iter().sum()), &mut a);
        linear(&refs, &wk, Some(wk.iter().sum()), &mut b);
        assert_eq!(bits(&a), bits(&b), "seed {seed}");
    }
}

#[test]
fn slerp_ends() {
    for seed in 1..=CASES {
        let mut r = Rng(seed * 5 + 1);
        let n = 2 + (r.next() % 200) as usize;
        let a = r.tensor(n, Precision::F32);
        let b = r.tensor(n, Precision::F32);
        let mut out = vec![0.0; n];
        slerp::slerp(0.0, &a, &b, &mut out);
        assert!(
            out.iter().zip(&a).all(|(x, y)| (x - y).abs() <= 1e-6),
            "t=0 seed {seed}"
        );
        slerp::slerp(1.0, &a, &b, &mut out);
        assert!(
            out.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-5),
            "t=1 seed {seed}"
        );
        let mut nu = vec![0.0; n];
        spherical::nuslerp(
            Precision::F32,
            0.0,
            None,
            &a,
            &b,
            spherical::NuslerpShape::Flatten,
            n,
            &mut nu,
        );
        assert!(
            nu.iter().zip(&a).all(|(x, y)| (x - y).abs() <= 1e-5),
            "nuslerp t=0 seed {seed}"
        );
    }
}

#[test]
fn symmetric_methods_ignore_ingredient_order() {
    for seed in 1..=CASES {
        let mut r = Rng(seed * 11 + 5);
        let n = 1 + (r.next() % 200) as usize;
        let p = Precision::BF16;
        let b = r.tensor(n, p);
        let x = r.tensor(n, p);
        let y = r.tensor(n, p);
        let mut o1 = vec![0.0; n];
        let mut o2 = vec![0.0; n];
        // Two models: sums of two terms commute exactly.
        model_stock::model_stock(p, &b, &[&x, &y], n, &mut o1);
        model_stock::model_stock(p, &b, &[&y, &x], n, &mut o2);
        assert_eq!(bits(&o1), bits(&o2), "model_stock seed {seed}");
        sce::sce(p, &b, &[&x, &y], 1.0, &mut o1);
        sce::sce(p, &b, &[&y, &x], 1.0, &mut o2);
        assert_eq!(bits(&o1), bits(&o2), "sce seed {seed}");
        let ties = Config {
            normalize: true,
            ..gta_cfg(Sparsification::Magnitude, true, p)
        };
        let m = mp(0.5, 0.5);
        assert_eq!(
            bits(&run_gta(&ties, &b, &[&x, &y], &[m, m])),
            bits(&run_gta(&ties, &b, &[&y, &x], &[m, m])),
            "ties seed {seed}"
        );
    }
}

#[test]
fn dare_is_stable_across_thread_counts_and_seeded() {
    let mut r = Rng(99);
    let n = 50_000;
    let p = Precision::BF16;
    let b = r.tensor(n, p);
    let x = r.tensor(n, p);
    let y = r.tensor(n, p);
    let c = Config {
        rescale: true,
        ..gta_cfg(Sparsification::Random, true, p)
    };
    let ms = [mp(0.5, 0.3), mp(0.5, 0.7)];
    let want = run_gta(&c, &b, &[&x, &y], &ms);
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let got = pool.install(|| run_gta(&c, &b, &[&x, &y], &ms));
        assert_eq!(bits(&got), bits(&want), "{threads} threads");
    }
    let other = Config { seed: 8, ..c };
    assert_ne!(bits(&run_gta(&other, &b, &[&x, &y], &ms)), bits(&want));
    // Densities other than 0.5 tell keep probability from drop probability.
    for density in [0.2, 0.9] {
        let mut d: Vec<f32> = vec![1.0; n];
        gta::random(
            &mut d,
            density,
            Precision::F32,
            &crate::merge::rng::KeyedRng::new(1, 0, "t"),
        );
        let kept = d.iter().filter(|v| **v != 0.0).count() as f64 / n as f64;
        let sd = (density * (1.0 - density) / n as f64).sqrt();
        assert!(
            (kept - density).abs() < 4.0 * sd,
            "density {density}: kept {kept}"
        );
    }
}

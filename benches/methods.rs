//! Cost of every merge method END TO END through the engine (`Engine::run`: read, merge,
//! encode, write shards and manifest), relative to `linear` on the same inputs.
//!
//! Inputs, generated once in a temp dir (local files): a base and three fine-tunes, bf16,
//! 6 tensors of 2048 × 2048 (`model.layers.{0..5}.mlp.weight`), 24 Mi parameters = 48 MiB
//! each, 192 MiB in all. Each sample merges into a fresh output folder (removed outside the
//! timing). At the end it prints a table: median seconds per run and × linear.
//!
//! `cargo bench --bench methods` (criterion, 10 samples per method); a subset:
//! `cargo bench --bench methods -- ties`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use ladle::engine::{Engine, EngineConfig, RunControl};
use ladle::recipe::Recipe;
use ladle::storage::{S3Settings, Storage};
use serde_json::{Value, json};

const LAYERS: usize = 6;
const DIM: usize = 2048;

fn url(p: &Path) -> String {
    format!("file://{}", p.display())
}

/// Deterministic bf16 checkpoint: `base + scale · noise` (scale 0 gives the base).
fn write_checkpoint(dir: &Path, seed: u64, scale: f32) {
    std::fs::create_dir_all(dir).expect("create checkpoint folder");
    let n = DIM * DIM;
    let mut tensors: Vec<(String, Vec<u8>)> = Vec::new();
    for layer in 0..LAYERS {
        let mut base_state = 0x9e37_79b9_7f4a_7c15u64 ^ (layer as u64 + 1);
        let mut state = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ (layer as u64 + 7);
        let next = |s: &mut u64| {
            *s ^= *s << 13;
            *s ^= *s >> 7;
            *s ^= *s << 17;
            (*s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut bytes = Vec::with_capacity(n * 2);
        for _ in 0..n {
            let b = next(&mut base_state) * 0.1;
            let d = if scale == 0.0 {
                0.0
            } else {
                next(&mut state) * scale
            };
            bytes.extend_from_slice(&half::bf16::from_f32(b + d).to_le_bytes());
        }
        tensors.push((format!("model.layers.{layer}.mlp.weight"), bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, b)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![DIM, DIM], b)
                    .expect("tensor view");
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors"))
        .expect("write checkpoint");
    std::fs::write(dir.join("config.json"), b"{\"num_hidden_layers\": 6}").expect("config");
}

/// The recipes: every method with typical parameters, on base + ft1..ft3 where it takes them.
fn recipes(root: &Path) -> Vec<(&'static str, Value)> {
    let m = |n: &str| url(&root.join(n));
    let fts = |extra: Value| -> Vec<Value> {
        [("ft1", 0.5), ("ft2", 0.3), ("ft3", 0.2)]
            .iter()
            .map(|(n, w)| {
                let mut p = extra.clone();
                p["weight"] = json!(w);
                json!({"uri": m(n), "parameters": p})
            })
            .collect()
    };
    let gta = |method: &str, extra: Value, global: Value| {
        json!({"method": method, "base_model": m("base"), "models": fts(extra),
               "parameters": global})
    };
    let all: Vec<Value> = ["base", "ft1", "ft2", "ft3"]
        .iter()
        .map(|n| json!({"uri": m(n), "weight": 1.0}))
        .collect();
    let d = json!({"density": 0.5});
    let bc = json!({"density": 0.9, "gamma": 0.01});
    let della = json!({"density": 0.5, "epsilon": 0.1});
    vec![
        ("linear", json!({"method": "linear", "models": all})),
        (
            "task_arithmetic",
            gta("task_arithmetic", json!({}), json!({})),
        ),
        ("ties", gta("ties", d.clone(), json!({}))),
        (
            "ties_model_scope",
            gta("ties", d.clone(), json!({"scope": "model"})),
        ),
        ("breadcrumbs", gta("breadcrumbs", bc.clone(), json!({}))),
        ("breadcrumbs_ties", gta("breadcrumbs_ties", bc, json!({}))),
        ("dare_linear", gta("dare_linear", d.clone(), json!({}))),
        ("dare_ties", gta("dare_ties", d, json!({}))),
        (
            "della_linear",
            gta("della_linear", della.clone(), json!({})),
        ),
        ("della", gta("della", della, json!({}))),
        (
            "slerp",
            json!({"method": "slerp", "base_model": m("base"),
                   "models": [{"uri": m("ft1")}], "parameters": {"t": 0.3}}),
        ),
        (
            "nearswap",
            json!({"method": "nearswap", "base_model": m("base"),
                   "models": [{"uri": m("ft1")}], "parameters": {"t": 0.0005}}),
        ),
        (
            "nuslerp",
            json!({"method": "nuslerp", "base_model": m("base"),
                   "models": [{"uri": m("ft1"), "weight": 0.7}, {"uri": m("ft2"), "weight": 0.3}]}),
        ),
        (
            "model_stock",
            json!({"method": "model_stock", "base_model": m("base"),
                   "models": [{"uri": m("ft1")}, {"uri": m("ft2")}, {"uri": m("ft3")}]}),
        ),
        (
            "karcher",
            json!({"method": "karcher",
                   "models": [{"uri": m("ft1")}, {"uri": m("ft2")}, {"uri": m("ft3")}]}),
        ),
        (
            "sce",
            json!({"method": "sce", "base_model": m("base"),
                   "models": [{"uri": m("ft1")}, {"uri": m("ft2")}, {"uri": m("ft3")}],
                   "parameters": {"select_topk": 0.5}}),
        ),
        (
            "sparse_soup",
            json!({"method": "sparse_soup", "models": [{"uri": m("ft1")}, {"uri": m("ft2")}, {"uri": m("ft3")}]}),
        ),
        (
            "ema",
            json!({"method": "ema", "parameters": {"decay": 0.9},
                   "models": [{"uri": m("ft1")}, {"uri": m("ft2")}, {"uri": m("ft3")}]}),
        ),
        (
            "passthrough",
            json!({"method": "passthrough", "models": [{"uri": m("ft1")}]}),
        ),
    ]
}

fn bench_methods(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let root: PathBuf = tmp.path().to_path_buf();
    write_checkpoint(&root.join("base"), 0, 0.0);
    for (i, n) in ["ft1", "ft2", "ft3"].iter().enumerate() {
        write_checkpoint(&root.join(n), i as u64 + 1, 0.01);
    }
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let storage = Arc::new(Storage::new(None, S3Settings::default()).expect("storage"));
    let engine = Arc::new(Engine::new(storage, EngineConfig::default()));
    let samples: Arc<Mutex<BTreeMap<&'static str, Vec<f64>>>> = Arc::default();
    let order: Vec<&'static str> = recipes(&root).iter().map(|(n, _)| *n).collect();

    let mut group = c.benchmark_group("methods");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5));
    for (name, mut recipe) in recipes(&root) {
        let out = root.join(format!("out-{name}"));
        recipe["output"] = json!({"uri": url(&out)});
        let sub = Recipe::parse_json(&serde_json::to_vec(&recipe).expect("json"))
            .unwrap_or_else(|e| panic!("{name}: recipe rejected: {e}"));
        let recipe = sub.recipe;
        let samples = samples.clone();
        let engine = engine.clone();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let _ = std::fs::remove_dir_all(&out);
                    let t = Instant::now();
                    rt.block_on(engine.run(&recipe, &Arc::new(RunControl::standalone())))
                        .unwrap_or_else(|e| panic!("{name}: merge failed: {e}"));
                    let dt = t.elapsed();
                    total += dt;
                    samples
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(name)
                        .or_default()
                        .push(dt.as_secs_f64());
                }
                let _ = std::fs::remove_dir_all(&out);
                total
            })
        });
    }
    group.finish();

    let samples = samples.lock().unwrap_or_else(|p| p.into_inner());
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let lin = samples.get("linear").map_or(f64::NAN, |v| median(v));
    println!("\n| method | runs | median s | × linear |\n| --- | --- | --- | --- |");
    for name in order {
        if let Some(v) = samples.get(name) {
            let m = median(v);
            println!("| {name} | {} | {m:.3} | {:.2} |", v.len(), m / lin);
        }
    }
}

criterion_group!(benches, bench_methods);
criterion_main!(benches);

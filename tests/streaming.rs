//! Every streamed method through the real engine (local files): a tensor's pre-passes and its
//! chunk-by-chunk merge give the same bytes whatever the chunk size, from chunks of 4,096
//! elements (several per tensor, rows split across chunks where the method allows it) to one
//! chunk per tensor. The kernels' own tests check the streamed kernels against the
//! whole-tensor ones bit for bit; this checks the engine's wiring (alignment, the shared
//! statistics of a tensor, element offsets) on top.

mod common;

use std::path::Path;
use std::sync::Arc;

use ladle::engine::{Engine, EngineConfig, RunControl};
use ladle::recipe::Recipe;
use ladle::storage::{S3Settings, Storage};
use serde_json::{Value, json};

use common::soup::{Tensors, assert_soup_equal, read_output_dir};
use common::{RawTensor, file_url, write_sharded};

/// bf16 values near `base` (or near 0.5 without one): many ties, zeros of both signs.
fn tensor(name: &str, shape: &[usize], seed: u64, base: Option<&RawTensor>) -> RawTensor {
    let n: usize = shape.iter().product();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data = (0..n)
        .flat_map(|e| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = base.map_or(0.5, |b| {
                f32::from_bits(
                    (u16::from_le_bytes([b.data[2 * e], b.data[2 * e + 1]]) as u32) << 16,
                )
            });
            let v = match x % 31 {
                0 => 0.0,
                1 => -0.0,
                2 => b,
                _ => b + ((x >> 20) % 64) as f32 * 0.002 - 0.064,
            };
            half::bf16::from_f32(v).to_le_bytes()
        })
        .collect();
    RawTensor {
        name: name.into(),
        dtype: safetensors::Dtype::BF16,
        shape: shape.to_vec(),
        data,
    }
}

fn write_models(dir: &Path) -> Vec<String> {
    // 4,099-element rows (not a multiple of 4,096) and a tensor of 5 rows, one small tensor.
    let shapes: [(&str, Vec<usize>); 3] = [
        ("a.weight", vec![5, 4099]),
        ("b.weight", vec![3, 7]),
        ("c.bias", vec![9000]),
    ];
    let base: Vec<RawTensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, (n, s))| tensor(n, s, 100 + i as u64, None))
        .collect();
    let mut urls = Vec::new();
    for m in 0..4u64 {
        let tensors: Vec<RawTensor> = if m == 0 {
            base.clone()
        } else {
            base.iter()
                .enumerate()
                .map(|(i, b)| tensor(&b.name, &b.shape, 10 * m + i as u64, Some(b)))
                .collect()
        };
        let d = dir.join(format!("m{m}"));
        write_sharded(&d, &tensors, 1);
        urls.push(format!("{}/", file_url(&d)));
    }
    urls
}

async fn run(recipe: &Value, chunk_elems: usize) {
    let sub = Recipe::parse_json(&serde_json::to_vec(recipe).unwrap())
        .unwrap_or_else(|e| panic!("recipe rejected: {e}"));
    let storage = Arc::new(Storage::new(None, S3Settings::default()).unwrap());
    let engine = Engine::new(
        storage,
        EngineConfig {
            chunk_elems,
            ..Default::default()
        },
    );
    engine
        .run(&sub.recipe, &Arc::new(RunControl::standalone()))
        .await
        .unwrap_or_else(|e| panic!("merge failed [{}]: {e}", e.code()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_methods_do_not_depend_on_the_chunk_size() {
    let dir = tempfile::tempdir().unwrap();
    let urls = write_models(dir.path());
    let m = |i: usize, extra: Value| {
        let mut v = json!({"uri": urls[i], "parameters": {"weight": 0.3 + 0.2 * i as f64}});
        if let (Some(p), Some(e)) = (v["parameters"].as_object_mut(), extra.as_object()) {
            p.extend(e.clone());
        }
        v
    };
    let gta = |method: &str, params: Value| {
        let dens = match method {
            "breadcrumbs_ties" => json!({"density": 0.4, "gamma": 0.05}),
            "della" => json!({"density": 0.4, "epsilon": 0.1}),
            _ => json!({"density": 0.4}),
        };
        json!({"method": method, "base_model": urls[0],
               "models": [m(1, dens.clone()), m(2, dens.clone()), m(3, dens.clone())],
               "parameters": params})
    };
    let recipes = [
        ("ties", gta("ties", json!({}))),
        (
            "ties_f32",
            gta("ties", json!({"compute_dtype": "float32", "rescale": true})),
        ),
        ("ties_row", gta("ties", json!({"scope": "row"}))),
        ("breadcrumbs_ties", gta("breadcrumbs_ties", json!({}))),
        ("dare_ties", gta("dare_ties", json!({}))),
        ("della", gta("della", json!({}))),
        (
            "task_arithmetic",
            json!({"method": "task_arithmetic", "base_model": urls[0],
            "models": [m(1, json!({})), m(2, json!({}))]}),
        ),
        (
            "sce",
            json!({"method": "sce", "base_model": urls[0],
            "models": [m(1, json!({})), m(2, json!({})), m(3, json!({}))],
            "parameters": {"select_topk": 0.3}}),
        ),
        (
            "slerp",
            json!({"method": "slerp", "base_model": urls[0],
            "models": [{"uri": urls[1]}], "parameters": {"t": 0.4}}),
        ),
        (
            "nuslerp",
            json!({"method": "nuslerp", "base_model": urls[0],
            "models": [m(1, json!({})), m(2, json!({}))]}),
        ),
        (
            "nuslerp_cols",
            json!({"method": "nuslerp",
            "models": [m(1, json!({})), m(2, json!({}))],
            "parameters": {"nuslerp_flatten": false, "nuslerp_row_wise": true}}),
        ),
        (
            "model_stock",
            json!({"method": "model_stock", "base_model": urls[0],
            "models": [{"uri": urls[1]}, {"uri": urls[2]}, {"uri": urls[3]}]}),
        ),
        (
            "model_stock_fw",
            json!({"method": "model_stock", "base_model": urls[0],
            "models": [{"uri": urls[1]}, {"uri": urls[2]}],
            "parameters": {"filter_wise": true}}),
        ),
        (
            "karcher",
            json!({"method": "karcher",
            "models": [{"uri": urls[1]}, {"uri": urls[2]}, {"uri": urls[3]}]}),
        ),
        (
            "multislerp",
            json!({"method": "multislerp", "base_model": urls[0],
            "models": [m(1, json!({})), m(2, json!({})), m(3, json!({}))]}),
        ),
        (
            "arcee_fusion",
            json!({"method": "arcee_fusion", "base_model": urls[0],
            "models": [{"uri": urls[1]}]}),
        ),
        (
            "ram",
            json!({"method": "ram", "base_model": urls[0],
            "models": [{"uri": urls[1]}, {"uri": urls[2]}, {"uri": urls[3]}]}),
        ),
        (
            "ramplus_tl",
            json!({"method": "ramplus_tl", "base_model": urls[0],
            "models": [{"uri": urls[1]}, {"uri": urls[2]}, {"uri": urls[3]}]}),
        ),
    ];
    for (name, recipe) in recipes {
        let mut outs: Vec<Tensors> = Vec::new();
        for chunk in [4096usize, 1 << 26] {
            let out = dir.path().join(format!("out-{name}-{chunk}"));
            let mut r = recipe.clone();
            r["output"] = json!({"uri": format!("{}/", file_url(&out))});
            run(&r, chunk).await;
            outs.push(read_output_dir(&out));
        }
        assert_eq!(outs[0].len(), 3, "{name}");
        assert_soup_equal(&outs[0], &outs[1]);
    }
}

//! LoRA adapters against peft 0.21.2 and mergekit 0.1.5: the pack `../shared/conformance-lora/`
//! (its README gives the layout, the exact calls and the tolerances), through the real engine
//! (JSON and mergekit YAML recipes), the `ladle merge` binary and the service over HTTP.
//!
//! The pack is found at `$LADLE_CONFORMANCE_LORA_DIR` or `/work/shared/conformance-lora`;
//! without it every test prints a loud SKIP line.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ladle::engine::{Engine, EngineConfig, EngineError, MergeOutcome, RunControl};
use ladle::recipe::Recipe;
use ladle::service::Mode;
use ladle::storage::{S3Settings, Storage};
use serde_json::{Value, json};

fn pack() -> Option<PathBuf> {
    let p = std::env::var_os("LADLE_CONFORMANCE_LORA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/work/shared/conformance-lora"));
    if p.join("MANIFEST.json").exists() {
        Some(p)
    } else {
        loud_skip(
            "LoRA conformance",
            &format!(
                "no pack at {} (set LADLE_CONFORMANCE_LORA_DIR)",
                p.display()
            ),
        );
        None
    }
}

fn url(p: &Path) -> String {
    url::Url::from_directory_path(p).unwrap().to_string()
}

/// name → (dtype, shape, raw bytes).
type Raw = BTreeMap<String, (String, Vec<usize>, Vec<u8>)>;

fn read_raw(path: &Path) -> Raw {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                (
                    format!("{:?}", v.dtype()),
                    v.shape().to_vec(),
                    v.data().to_vec(),
                ),
            )
        })
        .collect()
}

/// Every tensor bit-identical (names, dtypes, shapes, bytes); on failure, per tensor the count
/// of differing elements.
fn assert_identical(case: &str, got: &Raw, want: &Raw) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{case}: tensor names"
    );
    let mut bad = Vec::new();
    for (name, (dt, shape, bytes)) in want {
        let (gdt, gshape, gbytes) = &got[name];
        assert_eq!((gdt, gshape), (dt, shape), "{case}: {name}");
        if gbytes != bytes {
            let size = if dt == "F32" { 4 } else { 2 };
            let n = gbytes
                .chunks(size)
                .zip(bytes.chunks(size))
                .filter(|(a, b)| a != b)
                .count();
            bad.push(format!(
                "{name}: {n} of {} elements differ",
                bytes.len() / size
            ));
        }
    }
    assert!(bad.is_empty(), "{case}: {bad:#?}");
}

async fn run(recipe: &Recipe, chunk_elems: usize) -> Result<MergeOutcome, EngineError> {
    let storage = Arc::new(Storage::new(None, S3Settings::default()).unwrap());
    let engine = Engine::new(
        storage,
        EngineConfig {
            chunk_elems,
            ..Default::default()
        },
    );
    engine
        .run(recipe, &Arc::new(RunControl::standalone()))
        .await
}

fn fold_recipe(base: &Path, adapter: &Path, out: &Path, dtype: &str) -> Value {
    json!({"method": "passthrough",
           "models": [{"uri": url(base), "lora": url(adapter)}],
           "output": {"uri": url(out), "dtype": dtype}})
}

/// The 6 fold cases (peft `merge_and_unload`), every variant, bit-identical; with a chunk size
/// that splits rows (37 elements) and with the default one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folds_match_peft_bit_for_bit() {
    let Some(pack) = pack() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let base = pack.join("inputs/base");
    let mut ran = 0;
    for case in [
        "fold_qv_r8",
        "fold_rslora_r16",
        "fold_pattern_r4",
        "fold_mts_embed_r4",
        "fold_qkvo_r8_bf16",
        "fold_fan_in_fan_out_true",
    ] {
        let dir = pack.join("cases").join(case);
        let spec: Value =
            serde_json::from_slice(&std::fs::read(dir.join("case.json")).unwrap()).unwrap();
        let adapter = match spec["inputs"]["adapter"].as_str() {
            Some(rel) => dir.join(rel),
            None => dir.join("adapter"),
        }
        .canonicalize()
        .unwrap();
        for variant in spec["variants"].as_array().unwrap() {
            let v = variant["name"].as_str().unwrap();
            let dtype = variant["out_dtype"].as_str().unwrap();
            let want = read_raw(&dir.join(variant["expected"].as_str().unwrap()));
            for chunk in [37usize, 2 << 20] {
                let out = tmp.path().join(format!("{case}-{v}-{chunk}"));
                let recipe = fold_recipe(&base, &adapter, &out, dtype);
                let sub = Recipe::parse_json(&serde_json::to_vec(&recipe).unwrap()).unwrap();
                run(&sub.recipe, chunk)
                    .await
                    .unwrap_or_else(|e| panic!("{case}/{v}: [{}] {e}", e.code()));
                let got = read_raw(&out.join("model.safetensors"));
                assert_identical(&format!("{case}/{v}/{chunk}"), &got, &want);
                ran += 1;
            }
        }
    }
    assert_eq!(ran, 2 * 8);
    eprintln!("folds: {ran} runs bit-identical to peft");
}

/// The 3 mergekit `MODEL+LORA` recipes, YAML as written in the pack, bit-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mergekit_model_plus_lora_recipes_match() {
    let Some(pack) = pack() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for case in [
        "mk_passthrough_lora",
        "mk_passthrough_lora_f32",
        "mk_linear_lora",
    ] {
        let dir = pack.join("cases").join(case);
        let yml = std::fs::read_to_string(dir.join("recipe.yml")).unwrap();
        let out = tmp.path().join(case);
        let sub = Recipe::parse_yaml(&yml, Some(&dir), Some(&url(&out)))
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        assert!(sub.recipe.models.iter().all(|m| m.lora.is_some()), "{case}");
        run(&sub.recipe, 1000)
            .await
            .unwrap_or_else(|e| panic!("{case}: [{}] {e}", e.code()));
        let got = read_raw(&out.join("model.safetensors"));
        let want = read_raw(&dir.join("expected/model.safetensors"));
        assert_identical(case, &got, &want);
        let manifest: Value =
            serde_json::from_slice(&std::fs::read(out.join("ladle-manifest.json")).unwrap())
                .unwrap();
        assert!(
            manifest["inputs"][0]["lora"]["modules"]
                .as_object()
                .is_some_and(|m| !m.is_empty()),
            "{case}: {manifest}"
        );
    }
}

/// The pack's 7 bad adapters: each fails with `invalid_adapter`, the message naming what the
/// pack says it should, before anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_adapters_are_refused_before_writing() {
    let Some(pack) = pack() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let base = pack.join("inputs/base");
    let mut refused = 0;
    for entry in std::fs::read_dir(pack.join("cases")).unwrap() {
        let dir = entry.unwrap().path();
        let case = dir.file_name().unwrap().to_string_lossy().to_string();
        if !case.starts_with("bad_") {
            continue;
        }
        let spec: Value =
            serde_json::from_slice(&std::fs::read(dir.join("case.json")).unwrap()).unwrap();
        let out = tmp.path().join(&case);
        let recipe = fold_recipe(&base, &dir.join("adapter"), &out, "bfloat16");
        let sub = Recipe::parse_json(&serde_json::to_vec(&recipe).unwrap()).unwrap();
        let err = run(&sub.recipe, 1000)
            .await
            .err()
            .unwrap_or_else(|| panic!("{case}: accepted"));
        assert_eq!(err.code().as_str(), "invalid_adapter", "{case}: {err}");
        let text = err.to_string().to_lowercase();
        let words = spec["expected_failure"]["error_mentions_any"]
            .as_array()
            .unwrap();
        assert!(
            words
                .iter()
                .any(|w| text.contains(&w.as_str().unwrap().to_lowercase())),
            "{case}: {err} mentions none of {words:?}"
        );
        assert!(text.contains("adapter_"), "{case}: names no file: {err}");
        assert!(!out.exists() || std::fs::read_dir(&out).unwrap().next().is_none());
        eprintln!("{case}: refused: {err}");
        refused += 1;
    }
    assert_eq!(refused, 7);
}

/// A folded model as an ingredient of another method is the fold rounded to the checkpoint's
/// dtype: a linear soup of one folded entry with weight 1 is the bf16 fold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folded_ingredient_is_the_fold_in_the_checkpoint_dtype() {
    let Some(pack) = pack() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let base = pack.join("inputs/base");
    let out = tmp.path().join("soup");
    let recipe = json!({"method": "linear",
        "models": [{"uri": url(&base), "lora": url(&pack.join("inputs/adapters/qv_r8")), "weight": 1.0}],
        "output": {"uri": url(&out)}});
    let sub = Recipe::parse_json(&serde_json::to_vec(&recipe).unwrap()).unwrap();
    run(&sub.recipe, 4096).await.unwrap();
    let got = read_raw(&out.join("model.safetensors"));
    let want = read_raw(&pack.join("cases/fold_qv_r8/expected/bf16/model.safetensors"));
    assert_identical("linear of one fold", &got, &want);
    // The model named by base_model and by a models entry with an adapter is two inputs.
    let out2 = tmp.path().join("ta");
    let recipe = json!({"method": "task_arithmetic", "base_model": url(&base),
        "models": [{"uri": url(&base), "lora": url(&pack.join("inputs/adapters/qv_r8")), "weight": 1.0}],
        "output": {"uri": url(&out2)}});
    let sub = Recipe::parse_json(&serde_json::to_vec(&recipe).unwrap()).unwrap();
    assert_eq!(sub.recipe.models.len(), 1);
    run(&sub.recipe, 4096).await.unwrap();
    assert!(out2.join("model.safetensors").is_file());
}

/// `ladle merge recipe.yml` (the binary) on the pack's mergekit recipe.
#[test]
fn ladle_merge_folds_a_model_plus_lora_yaml() {
    let Some(pack) = pack() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = pack.join("cases/mk_passthrough_lora");
    let out = tmp.path().join("out");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_ladle"))
        .args(["merge", "--quiet", "--out"])
        .arg(&out)
        .arg(dir.join("recipe.yml"))
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_identical(
        "ladle merge",
        &read_raw(&out.join("model.safetensors")),
        &read_raw(&dir.join("expected/model.safetensors")),
    );
}

/// Over HTTP: a fold job succeeds bit-identical to peft; a DoRA adapter fails the job with
/// `invalid_adapter`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_folds_and_refuses_over_http() {
    let Some(pack) = pack() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", tmp.path().join("ladle.db").display());
    let roots = vec![
        pack.display().to_string(),
        tmp.path().join("out").display().to_string(),
    ];
    std::fs::create_dir_all(tmp.path().join("out")).unwrap();
    let settings = test_settings(&tmp.path().join("data"), &db, roots, None);
    let (service, base_url) = start(&settings, Mode::Serve).await;
    let client = reqwest::Client::new();
    let base = pack.join("inputs/base");
    let good = tmp.path().join("out/good");
    let (status, job) = submit(
        &client,
        &base_url,
        &fold_recipe(
            &base,
            &pack.join("inputs/adapters/rslora_r16"),
            &good,
            "float32",
        ),
    )
    .await;
    assert_eq!(status, 202, "{job}");
    let done = wait_terminal(
        &client,
        &base_url,
        job["id"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_identical(
        "http fold",
        &read_raw(&good.join("model.safetensors")),
        &read_raw(&pack.join("cases/fold_rslora_r16/expected/f32/model.safetensors")),
    );
    let bad = tmp.path().join("out/bad");
    let (status, job) = submit(
        &client,
        &base_url,
        &fold_recipe(
            &base,
            &pack.join("cases/bad_dora/adapter"),
            &bad,
            "bfloat16",
        ),
    )
    .await;
    assert_eq!(status, 202, "{job}");
    let failed = wait_terminal(
        &client,
        &base_url,
        job["id"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "invalid_adapter", "{failed}");
    assert!(
        failed["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("DoRA"),
        "{failed}"
    );
    // An adapter outside the allowed roots is refused at intake, naming the field.
    let (status, body) = submit(
        &client,
        &base_url,
        &json!({"method": "passthrough",
                "models": [{"uri": url(&base), "lora": "file:///etc/"}],
                "output": {"uri": url(&tmp.path().join("out/x"))}}),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.to_string().contains("models[0].lora"), "{body}");
    service.shutdown().await;
}

/// Decoded values of every tensor: name → (dtype, shape, f32 values).
fn read_values(path: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<f32>)> {
    read_raw(path)
        .into_iter()
        .map(|(n, (dt, shape, bytes))| {
            let d = match dt.as_str() {
                "F32" => safetensors::Dtype::F32,
                "BF16" => safetensors::Dtype::BF16,
                "F16" => safetensors::Dtype::F16,
                other => panic!("{n}: {other}"),
            };
            (n, (dt, shape, to_f32(d, &bytes)))
        })
        .collect()
}

/// Factors equal element by element (`+0 == −0`), same names, dtypes and shapes.
fn assert_factors_equal(case: &str, got: &Path, want: &Path) {
    let (got, want) = (read_values(got), read_values(want));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{case}: tensor names"
    );
    let mut bad = Vec::new();
    for (name, (dt, shape, values)) in &want {
        let (gdt, gshape, gvalues) = &got[name];
        assert_eq!((gdt, gshape), (dt, shape), "{case}: {name}");
        let n = values
            .iter()
            .zip(gvalues)
            .filter(|(a, b)| a != b && !(a.is_nan() && b.is_nan()))
            .count();
        if n > 0 {
            bad.push(format!("{name}: {n} of {} differ", values.len()));
        }
    }
    assert!(bad.is_empty(), "{case}: {bad:#?}");
}

fn lora_recipe(pack: &Path, case: &Value, out: &Path) -> Value {
    let inputs = &case["inputs"];
    let op = &case["operation"];
    let models: Vec<Value> = inputs["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .zip(op["weights"].as_array().unwrap())
        .map(|(a, w)| {
            let name = a["name"].as_str().unwrap();
            json!({"uri": url(&pack.join("inputs/adapters").join(name)), "parameters": {"weight": w}})
        })
        .collect();
    let mut params = json!({"combination": op["combination_type"]});
    for key in ["density", "majority_sign_method"] {
        if let Some(v) = op.get(key).filter(|v| !v.is_null()) {
            params[key] = v.clone();
        }
    }
    params["seed"] = op["torch_seed"].clone();
    let mut output = json!({"uri": url(out)});
    if inputs["base_load_dtype"] == "float32" {
        output["dtype"] = json!("float32");
    }
    json!({"method": "lora", "base_model": url(&pack.join("inputs/base")),
           "models": models, "parameters": params, "output": output})
}

/// The new adapter's config: `r`, `lora_alpha`, `target_modules` (as a set),
/// `modules_to_save` as peft's; `use_rslora` false (ladle's fix of peft's rsLoRA quirk).
fn assert_config(case: &str, got: &Path, want: &Path) {
    let read = |p: &Path| -> Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let (g, w) = (read(got), read(want));
    for key in ["r", "lora_alpha", "modules_to_save", "peft_type"] {
        assert_eq!(g[key], w[key], "{case}: {key}");
    }
    let set = |v: &Value| -> std::collections::BTreeSet<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        set(&g["target_modules"]),
        set(&w["target_modules"]),
        "{case}"
    );
    assert_eq!(g["use_rslora"], false, "{case}");
    assert_eq!(g["rank_pattern"], json!({}), "{case}");
}

/// peft's `add_weighted_adapter` types whose factors are deterministic: bit-identical factors
/// (DARE at density 1 included), the config as peft's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_weighted_adapter_factors_match_peft() {
    let Some(pack) = pack() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for case in [
        "awa_linear",
        "awa_cat",
        "awa_cat_f32base",
        "awa_cat_missing_first",
        "awa_cat_rslora_first",
        "awa_cat_modules_to_save",
        "awa_ties_total",
        "awa_ties_frequency",
        "awa_magnitude_prune",
        "awa_dare_linear_d1",
        "awa_dare_ties_d1",
    ] {
        let dir = pack.join("cases").join(case);
        let spec: Value =
            serde_json::from_slice(&std::fs::read(dir.join("case.json")).unwrap()).unwrap();
        let out = tmp.path().join(case);
        let recipe = lora_recipe(&pack, &spec, &out);
        let sub = Recipe::parse_json(&serde_json::to_vec(&recipe).unwrap())
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        run(&sub.recipe, 4096)
            .await
            .unwrap_or_else(|e| panic!("{case}: [{}] {e}", e.code()));
        assert_factors_equal(
            case,
            &out.join("adapter_model.safetensors"),
            &dir.join("expected/adapter_model.safetensors"),
        );
        assert_config(
            case,
            &out.join("adapter_config.json"),
            &dir.join("expected/adapter_config.json"),
        );
        assert!(out.join("ladle-manifest.json").is_file());
    }
}

/// LoRA Soups CAT with per-module weights (`name` rules; modules no rule names are left out):
/// factors bit-identical to the pack's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soups_cat_with_per_module_weights_matches() {
    let Some(pack) = pack() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = pack.join("cases/soups_cat");
    let spec: Value =
        serde_json::from_slice(&std::fs::read(dir.join("case.json")).unwrap()).unwrap();
    let mw = spec["operation"]["module_weights"].as_object().unwrap();
    let names: Vec<&str> = spec["inputs"]["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    let models: Vec<Value> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let rules: Vec<Value> = mw
                .iter()
                .filter(|(_, w)| !w[i].is_null())
                .map(|(m, w)| json!({"name": m, "value": w[i]}))
                .collect();
            json!({"uri": url(&pack.join("inputs/adapters").join(n)),
                   "parameters": {"weight": rules}})
        })
        .collect();
    let out = tmp.path().join("soup");
    let recipe = json!({"method": "lora", "base_model": url(&pack.join("inputs/base")),
        "models": models, "parameters": {"combination": "cat"},
        "output": {"uri": url(&out), "dtype": "float32"}});
    let recipe = Recipe::parse_json(&serde_json::to_vec(&recipe).unwrap())
        .unwrap()
        .recipe;
    run(&recipe, 4096).await.unwrap();
    assert_factors_equal(
        "soups_cat",
        &out.join("adapter_model.safetensors"),
        &dir.join("expected/adapter_model.safetensors"),
    );
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        (cfg["r"].clone(), cfg["lora_alpha"].clone()),
        (json!(30), json!(30))
    );
    // Folding the new adapter (bf16) gives the pack's fold of it, bit for bit.
    let folded = tmp.path().join("folded");
    let fold = fold_recipe(&pack.join("inputs/base"), &out, &folded, "bfloat16");
    let sub = Recipe::parse_json(&serde_json::to_vec(&fold).unwrap()).unwrap();
    run(&sub.recipe, 4096).await.unwrap();
    assert_identical(
        "soups fold",
        &read_raw(&folded.join("model.safetensors")),
        &read_raw(&dir.join("expected/fold_bf16/model.safetensors")),
    );
}

/// DARE at density < 1 (peft's torch masks cannot be reproduced): seeded and deterministic,
/// the kept fraction of each factor near the density, another seed another mask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dare_on_factors_is_seeded() {
    let Some(pack) = pack() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = pack.join("cases/awa_dare_linear");
    let mut spec: Value =
        serde_json::from_slice(&std::fs::read(dir.join("case.json")).unwrap()).unwrap();
    let mut outs = Vec::new();
    for (i, seed) in [11, 11, 12].into_iter().enumerate() {
        spec["operation"]["torch_seed"] = json!(seed);
        let out = tmp.path().join(format!("d{i}"));
        let recipe = lora_recipe(&pack, &spec, &out);
        let sub = Recipe::parse_json(&serde_json::to_vec(&recipe).unwrap()).unwrap();
        run(&sub.recipe, 4096).await.unwrap();
        outs.push(std::fs::read(out.join("adapter_model.safetensors")).unwrap());
    }
    assert_eq!(outs[0], outs[1], "same seed, same adapter");
    assert_ne!(outs[0], outs[2], "another seed, another mask");
    // Density 0.5: an element is zero when every adapter having it drops it (1/4 where both
    // adapters have the module, 1/2 where one has it).
    let v = read_values(&tmp.path().join("d0/adapter_model.safetensors"));
    let (zeros, total) = v
        .values()
        .map(|(_, _, x)| (x.iter().filter(|x| **x == 0.0).count(), x.len()))
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
    let frac = zeros as f64 / total as f64;
    assert!((0.2..0.55).contains(&frac), "zero fraction {frac}");
}

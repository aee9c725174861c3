//! End to end over real HTTP: the real service on a random port, a real database (SQLite
//! always; Postgres when `LADLE_TEST_POSTGRES_URL` is set) and a real S3-protocol server
//! (s3s-fs). Generated checkpoints (bf16 and f32, one sharded input, one single-file input,
//! one input in S3); the soup is compared bit for bit with a reference computed here.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::soup::*;
use common::*;
use ladle::service::Mode;
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjPath;
use sha2::{Digest, Sha256};

fn model_tensors(seed: u64) -> Vec<RawTensor> {
    vec![
        bf16_tensor("model.embed_tokens.weight", &[300, 64], seed),
        bf16_tensor("model.layers.0.mlp.weight", &[64, 96], seed + 1),
        f32_tensor("model.layers.0.bias", &[96], seed + 2),
        f32_tensor("model.norm.weight", &[64], seed + 3),
        i64_tensor("model.position_ids", 32, seed),
        bf16_tensor("model.empty", &[0, 64], seed),
    ]
}

/// Check the manifest's list against the files, and that it lists exactly what is there.
fn check_manifest(files: &BTreeMap<String, Vec<u8>>, result: &serde_json::Value) {
    let manifest: serde_json::Value =
        serde_json::from_slice(&files["ladle-manifest.json"]).expect("manifest json");
    let listed = manifest["files"].as_array().expect("files");
    assert_eq!(
        listed.len() + 1,
        files.len(),
        "manifest lists every other file: {listed:?}"
    );
    for f in listed {
        let path = f["path"].as_str().unwrap();
        let bytes = &files[path];
        assert_eq!(
            f["size"].as_u64().unwrap(),
            bytes.len() as u64,
            "{path} size"
        );
        assert_eq!(
            f["sha256"].as_str().unwrap(),
            hex::encode(Sha256::digest(bytes)),
            "{path} sha256"
        );
    }
    assert_eq!(
        &manifest["files"], &result["files"],
        "job result lists the manifest's files"
    );
}

async fn s3_files(s3: &S3Server, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    use futures::TryStreamExt;
    let store = s3.store();
    let p = ObjPath::from(prefix);
    let metas: Vec<_> = store.list(Some(&p)).try_collect().await.expect("list");
    let mut out = BTreeMap::new();
    for m in metas {
        let bytes = store.get(&m.location).await.unwrap().bytes().await.unwrap();
        out.insert(m.location.filename().unwrap().to_string(), bytes.to_vec());
    }
    out
}

async fn scenario(database_url: &str, backend: &str) {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().canonicalize().unwrap();
    let s3 = S3Server::start();
    if s3.is_none() {
        loud_skip(
            &format!("e2e S3 parts on {backend}"),
            "s3s-fs not installed: run .ci/run or `cargo install s3s-fs@0.14.1 --features binary --locked`",
        );
    }
    let models: Vec<Vec<RawTensor>> = (0..3).map(|k| model_tensors(100 * (k + 1))).collect();
    // A: a sharded local folder with side files; B: a single local file; C: S3 (or local).
    let a_dir = root.join("ft-a");
    write_sharded(&a_dir, &models[0], 2);
    std::fs::write(a_dir.join("config.json"), br#"{"model_type": "llama"}"#).unwrap();
    std::fs::write(a_dir.join("tokenizer.json"), br#"{"version": "1.0"}"#).unwrap();
    let b_dir = root.join("ft-b");
    std::fs::create_dir_all(&b_dir).unwrap();
    std::fs::write(
        b_dir.join("model.safetensors"),
        safetensors_bytes(&models[1]),
    )
    .unwrap();
    let c_uri = match &s3 {
        Some(s3) => {
            s3.store()
                .put(
                    &ObjPath::from("ft-c/model.safetensors"),
                    safetensors_bytes(&models[2]).into(),
                )
                .await
                .unwrap();
            format!("s3://{BUCKET}/ft-c/")
        }
        None => {
            let c = root.join("ft-c");
            std::fs::create_dir_all(&c).unwrap();
            std::fs::write(c.join("model.safetensors"), safetensors_bytes(&models[2])).unwrap();
            file_url(&c)
        }
    };
    let mut roots = vec![root.display().to_string()];
    if s3.is_some() {
        roots.push(format!("s3://{BUCKET}/"));
    }
    let settings = test_settings(&root.join("data"), database_url, roots, s3.as_ref());
    let client = reqwest::Client::new();
    let models_json = serde_json::json!([
        {"uri": file_url(&a_dir)},
        {"uri": file_url(&b_dir.join("model.safetensors"))},
        {"uri": c_uri},
    ]);

    // --- Cancel while queued (API only: no worker can claim it first) ---
    let (api, base) = start(&settings, Mode::Api).await;
    let (status, queued) = submit(
        &client,
        &base,
        &serde_json::json!({
            "method": "linear", "models": models_json,
            "output": {"uri": file_url(&root.join("soups/cancelled"))}
        }),
    )
    .await;
    assert_eq!(status, 202, "{queued}");
    let cancelled_id = queued["id"].as_str().unwrap().to_string();
    let r = client
        .post(format!("{base}/v1/merges/{cancelled_id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["state"], "cancelled");
    api.shutdown().await;

    let (service, base) = start(&settings, Mode::Serve).await;
    let h: serde_json::Value = client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["status"], "ok");
    let r = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // --- 1. Uniform soup to local storage, dtypes kept per tensor ---
    let out1 = root.join("soups/run-1");
    let body1 = serde_json::json!({
        "method": "linear", "models": models_json,
        "parameters": {"normalize": true},
        "output": {"uri": format!("{}/", file_url(&out1))},
        "idempotency_key": "run-1"
    });
    let (status, job) = submit(&client, &base, &body1).await;
    assert_eq!(status, 202, "{job}");
    let id1 = job["id"].as_str().unwrap().to_string();
    // Same key and body → the same job, 200; same key, other body → 409.
    let (status, again) = submit(&client, &base, &body1).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["id"], job["id"]);
    let mut other = body1.clone();
    other["parameters"]["normalize"] = serde_json::Value::Bool(false);
    let (status, err) = submit(&client, &base, &other).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (409, Some("idempotency_key_reused")),
        "{err}"
    );

    let done = wait_terminal(&client, &base, &id1, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 1);
    assert_eq!(done["progress"]["tensors_done"], 6, "{done}");
    assert_eq!(done["progress"]["tensors_total"], 6);
    assert!(done["progress"]["bytes_read"].as_u64().unwrap() > 0);
    assert!(done["error"].is_null());
    let files = local_files(&out1);
    assert!(
        files.contains_key("model.safetensors"),
        "{:?}",
        files.keys()
    );
    // config.json anew from the first model's, with the soup's dtype (mergekit's).
    let config: serde_json::Value = serde_json::from_slice(&files["config.json"]).unwrap();
    assert_eq!(config["model_type"], "llama", "{config}");
    assert!(config["dtype"].is_string(), "{config}");
    assert_eq!(config["dtype"], config["torch_dtype"], "{config}");
    assert_eq!(files["tokenizer.json"], br#"{"version": "1.0"}"#);
    assert!(files.contains_key("README.md") && files.contains_key("mergekit_config.yml"));
    check_manifest(&files, &done["result"]);
    assert_soup_equal(
        &read_tensors(&files),
        &linear_reference(&models, &[1.0, 1.0, 1.0], true, None),
    );

    // --- 1b. A learned soup: coefficients per model and per tensor (exact names), with a
    // layer gradient and a fallback, normalized per tensor; bit for bit against Σαx/Σα ---
    let out_learned = root.join("soups/learned");
    let learned = |m: usize| -> serde_json::Value {
        let (emb, mlp, rest) = [(0.5, 0.25, 1.0), (0.3, 0.5, 2.0), (0.2, 0.25, 3.0)][m];
        serde_json::json!({"uri": models_json[m]["uri"], "parameters": {"weight": [
            {"name": "model.embed_tokens.weight", "value": emb},
            {"name": "model.layers.0.mlp.weight", "value": mlp},
            {"value": rest}
        ]}})
    };
    let (status, job) = submit(
        &client,
        &base,
        &serde_json::json!({
            "method": "linear", "models": [learned(0), learned(1), learned(2)],
            "output": {"uri": file_url(&out_learned)}
        }),
    )
    .await;
    assert_eq!(status, 202, "{job}");
    let done = wait_terminal(
        &client,
        &base,
        job["id"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_soup_equal(
        &read_tensors(&local_files(&out_learned)),
        &linear_reference_by_tensor(
            &models,
            |name| match name {
                "model.embed_tokens.weight" => vec![0.5, 0.3, 0.2],
                "model.layers.0.mlp.weight" => vec![0.25, 0.5, 0.25],
                _ => vec![1.0, 2.0, 3.0],
            },
            true,
            None,
        ),
    );

    // --- 2. Weighted, not normalized, float32 out, sharded, to S3 (or local) ---
    let (out2_uri, out2_prefix) = match &s3 {
        Some(_) => (
            format!("s3://{BUCKET}/soups/run-2"),
            "soups/run-2".to_string(),
        ),
        None => (file_url(&root.join("soups/run-2")), String::new()),
    };
    let models_weighted = serde_json::json!([
        {"uri": models_json[0]["uri"], "weight": 0.5},
        {"uri": models_json[1]["uri"], "weight": 0.3},
        {"uri": models_json[2]["uri"], "weight": -0.2},
    ]);
    let (status, job) = submit(
        &client,
        &base,
        &serde_json::json!({
            "method": "linear", "models": models_weighted,
            "parameters": {"normalize": false},
            "output": {"uri": out2_uri, "dtype": "float32", "max_shard_size": "40KB"}
        }),
    )
    .await;
    assert_eq!(status, 202, "{job}");
    let done = wait_terminal(
        &client,
        &base,
        job["id"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let files = match &s3 {
        Some(s3) => s3_files(s3, &out2_prefix).await,
        None => local_files(&root.join("soups/run-2")),
    };
    let shards = files.keys().filter(|k| k.ends_with(".safetensors")).count();
    assert!(shards >= 2, "expected several shards: {:?}", files.keys());
    assert!(
        files.keys().any(|k| k.starts_with("model-00001-of-")),
        "{:?}",
        files.keys()
    );
    let index: serde_json::Value =
        serde_json::from_slice(&files["model.safetensors.index.json"]).unwrap();
    assert_eq!(index["weight_map"].as_object().unwrap().len(), 6);
    check_manifest(&files, &done["result"]);
    assert_soup_equal(
        &read_tensors(&files),
        &linear_reference(
            &models,
            &[0.5, 0.3, -0.2],
            false,
            Some(safetensors::Dtype::F32),
        ),
    );

    // --- 2b. A mergekit YAML recipe over HTTP (task arithmetic against a base) ---
    let yaml = format!(
        "merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 0.5}}\n  - model: {}\n    parameters: {{weight: 0.3}}\noutput:\n  uri: {}\n",
        models_json[0]["uri"].as_str().unwrap(),
        models_json[1]["uri"].as_str().unwrap(),
        models_json[2]["uri"].as_str().unwrap(),
        file_url(&root.join("soups/yaml")),
    );
    let post_yaml = |body: String| {
        client
            .post(format!("{base}/v1/merges"))
            .header("content-type", "application/yaml")
            .body(body)
            .send()
    };
    let r = post_yaml(yaml.clone()).await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let job: serde_json::Value = r.json().await.unwrap();
    let done = wait_terminal(
        &client,
        &base,
        job["id"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(local_files(&root.join("soups/yaml")).contains_key("ladle-manifest.json"));
    // The base model is checked against the allowed roots at submit time too.
    let outside = yaml.replace(models_json[0]["uri"].as_str().unwrap(), "file:///etc");
    let r = post_yaml(outside).await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let err: serde_json::Value = r.json().await.unwrap();
    assert_eq!(err["code"], "storage_not_allowed", "{err}");
    assert!(
        err["message"].as_str().unwrap().starts_with("base_model"),
        "{err}"
    );

    // --- 3. Errors at submit time: 4xx with a precise code, nothing queued ---
    for (uri, code) in [
        ("file:///etc/passwd".to_string(), "storage_not_allowed"),
        (
            format!("{}/../../etc/passwd", file_url(&a_dir)),
            "storage_not_allowed",
        ),
        (
            format!("{}/%2e%2e/x", file_url(&a_dir)),
            "storage_not_allowed",
        ),
        (
            "s3://not-allowed-bucket/x".to_string(),
            "storage_not_allowed",
        ),
    ] {
        let (status, err) = submit(
            &client,
            &base,
            &serde_json::json!({
                "method": "linear", "models": [{"uri": uri}, {"uri": models_json[1]["uri"]}],
                "output": {"uri": file_url(&root.join("soups/never"))}
            }),
        )
        .await;
        assert_eq!(
            (status, err["code"].as_str()),
            (403, Some(code)),
            "{uri}: {err}"
        );
        assert!(
            err["message"].as_str().unwrap().contains("models[0].uri"),
            "{err}"
        );
    }
    // JSON has no NaN or infinity: both spellings are rejected, never read as "no weight".
    for weight in ["NaN", "1e999", "\"1\""] {
        let body = format!(
            r#"{{"method": "linear", "models": [{{"uri": {}, "weight": {weight}}}], "output": {{"uri": {}}}}}"#,
            models_json[1]["uri"],
            serde_json::Value::String(file_url(&root.join("soups/never")))
        );
        let r = client
            .post(format!("{base}/v1/merges"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let err: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            (status, err["code"].as_str()),
            (400, Some("invalid_recipe")),
            "{weight}: {err}"
        );
    }

    // --- 4. Errors found by the worker: the job fails with the code, output untouched ---
    let bad_header = root.join("bad-header");
    std::fs::create_dir_all(&bad_header).unwrap();
    let mut bytes = safetensors_bytes(&models[1]);
    bytes[..8].copy_from_slice(&(1u64 << 32).to_le_bytes()); // a 4 GB header length
    std::fs::write(bad_header.join("model.safetensors"), bytes).unwrap();
    let mismatched = root.join("mismatched");
    std::fs::create_dir_all(&mismatched).unwrap();
    let mut wrong = models[1].clone();
    wrong[1] = bf16_tensor("model.layers.0.mlp.weight", &[96, 64], 7);
    std::fs::write(
        mismatched.join("model.safetensors"),
        safetensors_bytes(&wrong),
    )
    .unwrap();
    for (name, uri, code, needle) in [
        (
            "missing",
            file_url(&root.join("nothing-here")),
            "checkpoint_not_found",
            "nothing-here",
        ),
        (
            "malformed",
            file_url(&bad_header),
            "checkpoint_malformed",
            "model.safetensors",
        ),
        (
            "mismatch",
            file_url(&mismatched),
            "shape_mismatch",
            "model.layers.0.mlp.weight",
        ),
    ] {
        let out = root.join("soups").join(name);
        let (status, job) = submit(
            &client,
            &base,
            &serde_json::json!({
                "method": "linear", "models": [{"uri": models_json[0]["uri"]}, {"uri": uri}],
                "output": {"uri": file_url(&out)}
            }),
        )
        .await;
        assert_eq!(status, 202, "{job}");
        let done = wait_terminal(
            &client,
            &base,
            job["id"].as_str().unwrap(),
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(done["state"], "failed", "{name}: {done}");
        assert_eq!(done["error"]["code"], code, "{name}: {done}");
        assert_eq!(done["attempts"], 1, "{name}: not retried");
        let msg = done["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(needle),
            "{name}: message {msg:?} should name {needle}"
        );
        assert!(
            local_files(&out).is_empty(),
            "{name}: output must be untouched"
        );
        assert!(done["result"].is_null());
    }

    // --- 5. 50 concurrent submits with one key: one job, one 202, 49 replays ---
    let body = serde_json::json!({
        "method": "linear", "models": models_json,
        "output": {"uri": file_url(&root.join("soups/concurrent"))},
        "idempotency_key": "concurrent-50"
    });
    let answers = futures::future::join_all((0..50).map(|_| submit(&client, &base, &body))).await;
    let created = answers.iter().filter(|(s, _)| *s == 202).count();
    let replayed = answers.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!((created, replayed), (1, 49), "{answers:?}");
    let ids: std::collections::HashSet<_> = answers.iter().map(|(_, v)| v["id"].clone()).collect();
    assert_eq!(ids.len(), 1, "every answer names the same job");
    let id = answers[0].1["id"].as_str().unwrap().to_string();
    let done = wait_terminal(&client, &base, &id, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "succeeded", "{done}");

    // --- 6. Listing, newest first, paginated; the cancelled job never ran ---
    let page: serde_json::Value = client
        .get(format!("{base}/v1/merges?state=failed&limit=2"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let jobs = page["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    assert!(jobs[0]["created_at"].as_str() >= jobs[1]["created_at"].as_str());
    let cursor = page["next_cursor"].as_str().unwrap();
    let page2: serde_json::Value = client
        .get(format!(
            "{base}/v1/merges?state=failed&limit=2&cursor={cursor}"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page2["jobs"].as_array().unwrap().len(), 1);
    assert!(page2["jobs"][0]["created_at"].as_str() <= jobs[1]["created_at"].as_str());
    assert!(page2["next_cursor"].is_null());
    let r = client
        .get(format!("{base}/v1/merges?state=bogus"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let c: serde_json::Value = client
        .get(format!("{base}/v1/merges/{cancelled_id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (c["state"].as_str(), c["attempts"].as_i64()),
        (Some("cancelled"), Some(0))
    );
    let r = client
        .post(format!("{base}/v1/merges/{id1}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        409,
        "a succeeded job is not cancellable"
    );
    let r = client
        .get(format!("{base}/v1/merges/{}", uuid::Uuid::now_v7()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);

    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_sqlite() {
    let db = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", db.path().join("ladle.db").display());
    scenario(&url, "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_postgres() {
    match PgDb::create().await {
        Some(db) => scenario(&db.url, "postgres").await,
        None => loud_skip("e2e on Postgres", "set LADLE_TEST_POSTGRES_URL"),
    }
}

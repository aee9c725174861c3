//! Trajectory soups over real HTTP: the real service, a real database (SQLite; Postgres when
//! `LADLE_TEST_POSTGRES_URL` is set) and a real S3-protocol server (s3s-fs). One training run
//! folder `checkpoint-100 … checkpoint-600` (checkpoint-300 sharded), a junk file, a `logs`
//! folder and a `checkpoint-700` folder without weights; the same tree locally and in S3. Each
//! soup is compared bit for bit with a reference computed here from the generated tensors.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::soup::*;
use common::*;
use ladle::service::Mode;
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjPath;

const STEPS: [u64; 6] = [100, 200, 300, 400, 500, 600];

fn model_tensors(seed: u64) -> Vec<RawTensor> {
    vec![
        bf16_tensor("model.layers.0.mlp.weight", &[24, 16], seed),
        f32_tensor("model.layers.0.bias", &[40], seed + 1),
        i64_tensor("model.position_ids", 8, seed),
    ]
}

/// The run folder's files: (relative path, bytes).
fn run_files(models: &BTreeMap<u64, Vec<RawTensor>>, scratch: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for (step, tensors) in models {
        let dir = format!("checkpoint-{step}");
        if *step == 300 {
            let shard_dir = scratch.join(&dir);
            for (name, bytes) in write_sharded(&shard_dir, tensors, 2) {
                files.push((format!("{dir}/{name}"), bytes));
            }
        } else {
            files.push((
                format!("{dir}/model.safetensors"),
                safetensors_bytes(tensors),
            ));
        }
        files.push((
            format!("{dir}/config.json"),
            br#"{"model_type": "x"}"#.to_vec(),
        ));
    }
    files.push(("junk.txt".into(), b"not a checkpoint".to_vec()));
    files.push(("logs/events.txt".into(), b"loss 1.0".to_vec()));
    // the highest step, but no weights: never selected
    files.push((
        "checkpoint-700/config.json".into(),
        br#"{"model_type": "x"}"#.to_vec(),
    ));
    files
}

struct Ctx {
    client: reqwest::Client,
    base: String,
    root: std::path::PathBuf,
    models: BTreeMap<u64, Vec<RawTensor>>,
}

impl Ctx {
    fn steps(&self, steps: &[u64]) -> Vec<&Vec<RawTensor>> {
        steps.iter().map(|s| &self.models[s]).collect()
    }

    /// Submit, expect 202, wait, expect success; the finished job.
    async fn run(&self, body: serde_json::Value) -> serde_json::Value {
        let (status, job) = submit(&self.client, &self.base, &body).await;
        assert_eq!(status, 202, "{job}");
        let id = job["id"].as_str().unwrap().to_string();
        let done = wait_terminal(&self.client, &self.base, &id, Duration::from_secs(60)).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        done
    }

    /// Submit, expect a refusal; (status, code, message).
    async fn refuse(&self, body: serde_json::Value) -> (u16, String, String) {
        let (status, err) = submit(&self.client, &self.base, &body).await;
        assert!((400..500).contains(&status), "{status} {err}");
        (
            status,
            err["code"].as_str().unwrap_or_default().to_string(),
            err["message"].as_str().unwrap_or_default().to_string(),
        )
    }

    fn out(&self, name: &str) -> (String, std::path::PathBuf) {
        let p = self.root.join("soups").join(name);
        (file_url(&p), p)
    }
}

/// The stored recipe lists the explicit models (in step order) and records the selection.
fn assert_recorded(
    done: &serde_json::Value,
    run_uri: &str,
    steps: &[u64],
    select: serde_json::Value,
) {
    let recipe = &done["recipe"];
    let uris: Vec<&str> = recipe["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["uri"].as_str().unwrap())
        .collect();
    let run = run_uri.trim_end_matches('/');
    let want: Vec<String> = steps
        .iter()
        .map(|s| format!("{run}/checkpoint-{s}"))
        .collect();
    assert_eq!(uris, want, "{recipe}");
    assert_eq!(recipe["trajectory"]["uri"], run, "{recipe}");
    assert_eq!(recipe["trajectory"]["select"], select, "{recipe}");
    let picked: Vec<u64> = recipe["trajectory"]["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step"].as_u64().unwrap())
        .collect();
    assert_eq!(picked, steps, "{recipe}");
}

async fn scenario(database_url: &str, backend: &str) {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().canonicalize().unwrap();
    let s3 = S3Server::start();
    if s3.is_none() {
        loud_skip(
            &format!("trajectory S3 parts on {backend}"),
            "s3s-fs not installed: run .ci/run or `cargo install s3s-fs@0.14.1 --features binary --locked`",
        );
    }
    let models: BTreeMap<u64, Vec<RawTensor>> =
        STEPS.iter().map(|s| (*s, model_tensors(*s * 7))).collect();
    let files = run_files(&models, &root.join("scratch"));
    let run = root.join("runs/run7");
    for (rel, bytes) in &files {
        let p = run.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    std::fs::create_dir_all(root.join("runs/empty/logs")).unwrap();
    if let Some(s3) = &s3 {
        let store = s3.store();
        for (rel, bytes) in &files {
            store
                .put(&ObjPath::from(format!("run7/{rel}")), bytes.clone().into())
                .await
                .unwrap();
        }
    }
    let mut roots = vec![root.display().to_string()];
    if s3.is_some() {
        roots.push(format!("s3://{BUCKET}/run7"));
    }
    let settings = test_settings(&root.join("data"), database_url, roots, s3.as_ref());
    let (service, base) = start(&settings, Mode::Serve).await;
    let ctx = Ctx {
        client: reqwest::Client::new(),
        base,
        root: root.clone(),
        models,
    };
    let run_uri = format!("{}/", file_url(&run));

    // last: 3 → the uniform soup of 400, 500, 600 (700 has no weights), bit for bit.
    let (out, out_dir) = ctx.out("last3");
    let done = ctx
        .run(serde_json::json!({"method": "linear",
            "trajectory": {"uri": run_uri, "select": {"last": 3}},
            "output": {"uri": out}}))
        .await;
    assert_recorded(
        &done,
        &run_uri,
        &[400, 500, 600],
        serde_json::json!({"last": 3}),
    );
    let mean_last3 = linear_reference(&ctx.steps(&[400, 500, 600]), &[1.0; 3], true, None);
    assert_soup_equal(&read_output_dir(&out_dir), &mean_last3);

    // steps (given out of order; 300 is sharded) → ordered by step.
    let (out, out_dir) = ctx.out("steps");
    let done = ctx
        .run(serde_json::json!({"method": "linear",
            "trajectory": {"uri": run_uri, "select": {"steps": [300, 100]}},
            "output": {"uri": out}}))
        .await;
    assert_recorded(
        &done,
        &run_uri,
        &[100, 300],
        serde_json::json!({"steps": [300, 100]}),
    );
    assert_soup_equal(
        &read_output_dir(&out_dir),
        &linear_reference(&ctx.steps(&[100, 300]), &[1.0; 2], true, None),
    );

    // glob on the folder name.
    let (out, out_dir) = ctx.out("glob");
    let done = ctx
        .run(serde_json::json!({"method": "linear",
            "trajectory": {"uri": run_uri, "select": {"glob": "checkpoint-[2-4]?0"}},
            "output": {"uri": out}}))
        .await;
    assert_recorded(
        &done,
        &run_uri,
        &[200, 300, 400],
        serde_json::json!({"glob": "checkpoint-[2-4]?0"}),
    );
    assert_soup_equal(
        &read_output_dir(&out_dir),
        &linear_reference(&ctx.steps(&[200, 300, 400]), &[1.0; 3], true, None),
    );

    // ema over the last 4, decay 0.5: weights β³ = 1/8, (1−β)β² = 1/8, (1−β)β = 1/4, 1−β = 1/2.
    let (out, out_dir) = ctx.out("ema");
    let done = ctx
        .run(serde_json::json!({"method": "ema",
            "trajectory": {"uri": run_uri, "select": {"last": 4}},
            "parameters": {"decay": 0.5},
            "output": {"uri": out}}))
        .await;
    assert_recorded(
        &done,
        &run_uri,
        &[300, 400, 500, 600],
        serde_json::json!({"last": 4}),
    );
    let weights: Vec<f64> = done["recipe"]["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["weight"].as_f64().unwrap())
        .collect();
    assert_eq!(weights, [0.125, 0.125, 0.25, 0.5]);
    assert_soup_equal(
        &read_output_dir(&out_dir),
        &linear_reference(
            &ctx.steps(&[300, 400, 500, 600]),
            &[0.125, 0.125, 0.25, 0.5],
            false,
            None,
        ),
    );

    // The same trajectory in S3: last 3 gives the same bytes as the local one.
    if s3.is_some() {
        let s3_uri = format!("s3://{BUCKET}/run7/");
        let (out, out_dir) = ctx.out("s3-last3");
        let done = ctx
            .run(serde_json::json!({"method": "linear",
                "trajectory": {"uri": s3_uri, "select": {"last": 3}},
                "output": {"uri": out}}))
            .await;
        assert_recorded(
            &done,
            &s3_uri,
            &[400, 500, 600],
            serde_json::json!({"last": 3}),
        );
        assert_soup_equal(&read_output_dir(&out_dir), &mean_last3);
        let (out, _) = ctx.out("s3-missing");
        let (status, code, msg) = ctx
            .refuse(serde_json::json!({"method": "linear",
                "trajectory": {"uri": s3_uri, "select": {"steps": [500, 650]}},
                "output": {"uri": out}}))
            .await;
        assert_eq!((status, code.as_str()), (400, "invalid_recipe"), "{msg}");
        assert!(
            msg.contains("trajectory.select.steps") && msg.contains("650"),
            "{msg}"
        );
        // a bucket prefix outside the allowed roots
        let (status, code, msg) = ctx
            .refuse(serde_json::json!({"method": "linear",
                "trajectory": {"uri": format!("s3://{BUCKET}/other/"), "select": {"last": 1}},
                "output": {"uri": out}}))
            .await;
        assert_eq!(
            (status, code.as_str()),
            (403, "storage_not_allowed"),
            "{msg}"
        );
        assert!(msg.contains("trajectory.uri"), "{msg}");
    }

    // Refusals, each naming the field.
    let (out, _) = ctx.out("refused");
    let cases: Vec<(serde_json::Value, u16, &str, Vec<&str>)> = vec![
        // a step that does not exist (700 has no weights): the message lists what does
        (
            serde_json::json!({"uri": run_uri, "select": {"steps": [100, 700]}}),
            400,
            "invalid_recipe",
            vec![
                "trajectory.select.steps",
                "700",
                "100 (checkpoint-100)",
                "600 (checkpoint-600)",
            ],
        ),
        (
            serde_json::json!({"uri": run_uri, "select": {"last": 7}}),
            400,
            "invalid_recipe",
            vec!["trajectory.select.last", "only 6"],
        ),
        (
            serde_json::json!({"uri": run_uri, "select": {"glob": "step-*"}}),
            400,
            "invalid_recipe",
            vec!["trajectory.select.glob", "checkpoint-100"],
        ),
        (
            serde_json::json!({"uri": run_uri, "select": {"glob": "../run7/*"}}),
            400,
            "invalid_recipe",
            vec!["trajectory.select.glob"],
        ),
        // traversal in the folder URL
        (
            serde_json::json!({"uri": format!("{}/../run7/", file_url(&run)), "select": {"last": 1}}),
            403,
            "storage_not_allowed",
            vec!["trajectory.uri"],
        ),
        (
            serde_json::json!({"uri": format!("{}/%2e%2e/run7", file_url(&run)), "select": {"last": 1}}),
            403,
            "storage_not_allowed",
            vec!["trajectory.uri"],
        ),
        (
            serde_json::json!({"uri": "file:///etc/", "select": {"last": 1}}),
            403,
            "storage_not_allowed",
            vec!["trajectory.uri"],
        ),
        // a folder without checkpoints, and one that does not exist
        (
            serde_json::json!({"uri": file_url(&root.join("runs/empty")), "select": {"last": 1}}),
            400,
            "invalid_recipe",
            vec!["trajectory.uri", "\"logs\""],
        ),
        (
            serde_json::json!({"uri": file_url(&root.join("runs/nope")), "select": {"last": 1}}),
            400,
            "invalid_recipe",
            vec!["trajectory.uri"],
        ),
    ];
    for (trajectory, want_status, want_code, needles) in cases {
        let body = serde_json::json!({"method": "linear", "trajectory": trajectory,
            "output": {"uri": out}});
        let (status, code, msg) = ctx.refuse(body).await;
        assert_eq!(
            (status, code.as_str()),
            (want_status, want_code),
            "{trajectory}: {msg}"
        );
        for n in needles {
            assert!(msg.contains(n), "{trajectory}: {msg:?} lacks {n:?}");
        }
    }
    let t = serde_json::json!({"uri": run_uri, "select": {"last": 2}});
    let (_, code, msg) = ctx
        .refuse(serde_json::json!({"method": "ties", "base_model": file_url(&run.join("checkpoint-100")),
            "trajectory": t, "output": {"uri": out}}))
        .await;
    assert_eq!(code, "invalid_recipe");
    assert!(
        msg.starts_with("trajectory:") && msg.contains("method ties"),
        "{msg}"
    );
    let (_, code, msg) = ctx
        .refuse(serde_json::json!({"method": "linear", "trajectory": t,
            "models": [{"uri": file_url(&run.join("checkpoint-100"))}],
            "output": {"uri": out}}))
        .await;
    assert_eq!(code, "invalid_recipe");
    assert!(msg.contains("not both"), "{msg}");
    // the output may not lie inside the trajectory (it is an input)
    let (_, code, msg) = ctx
        .refuse(serde_json::json!({"method": "linear", "trajectory": t,
            "output": {"uri": file_url(&run.join("checkpoint-600/soup"))}}))
        .await;
    assert_eq!(code, "invalid_recipe");
    assert!(msg.contains("output.uri"), "{msg}");

    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trajectory_sqlite() {
    let db = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", db.path().join("ladle.db").display());
    scenario(&url, "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trajectory_postgres() {
    match PgDb::create().await {
        Some(db) => scenario(&db.url, "postgres").await,
        None => loud_skip(
            "trajectory on Postgres",
            "LADLE_TEST_POSTGRES_URL is not set",
        ),
    }
}

/// The one-shot CLI expands a trajectory too (a relative folder path, resolved against the
/// recipe's folder).
#[test]
fn cli_merge_expands_a_trajectory() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().canonicalize().unwrap();
    let models: BTreeMap<u64, Vec<RawTensor>> =
        STEPS.iter().map(|s| (*s, model_tensors(*s * 7))).collect();
    for (rel, bytes) in run_files(&models, &root.join("scratch")) {
        let p = root.join("run7").join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    let recipe = root.join("recipe.json");
    std::fs::write(
        &recipe,
        serde_json::to_vec(&serde_json::json!({"method": "linear",
            "trajectory": {"uri": "run7", "select": {"last": 2}},
            "output": {"uri": file_url(&root.join("soup"))}}))
        .unwrap(),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ladle"))
        .args(["merge", "--quiet"])
        .arg(&recipe)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = linear_reference(&[&models[&500], &models[&600]], &[1.0; 2], true, None);
    assert_soup_equal(&read_output_dir(&root.join("soup")), &want);
}

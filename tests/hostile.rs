//! Hostile and broken input against the real service on a random port, with the SQLite queue
//! and again with the Postgres queue when `LADLE_TEST_POSTGRES_URL` is set (else a loud
//! SKIPPED line; the two run side by side). The S3 parts run on the SQLite pass only and need
//! s3s-fs (a loud SKIPPED line without it).
//!
//! - Checkpoints that lie: each fails its job with `checkpoint_malformed` naming the file (and
//!   the tensor by its position, where one is at fault: never by its name, nor quoting anything
//!   else of the file), is not retried, writes nothing at the output URL, and
//!   the service keeps serving. NaN and infinity are values like any other: that job succeeds.
//! - Requests that lie: each gets a 4xx with a precise code at submit time and queues nothing.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use futures::TryStreamExt;
use ladle::service::Mode;
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjPath;

/// A safetensors file from a header written by hand (no padding) and a data section.
fn raw_file(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

/// `w`: F32 [4, 4] at [0, 64); `b`: F32 [4] at [64, 80).
fn good_tensors(seed: u64) -> Vec<RawTensor> {
    vec![
        f32_tensor("w", &[4, 4], seed),
        f32_tensor("b", &[4], seed + 1),
    ]
}

fn write_model(dir: &Path, bytes: &[u8]) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    file_url(dir)
}

fn local_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn submit_raw(
    client: &reqwest::Client,
    base: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, serde_json::Value) {
    let r = client
        .post(format!("{base}/v1/merges"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("post");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

struct BadCase {
    name: &'static str,
    uri: String,
    /// Substrings the error message must contain (the file, the tensor).
    needles: Vec<&'static str>,
}

/// Which queue database a hostile test runs on.
enum Db {
    /// A SQLite file in the test's temp folder.
    Sqlite,
    /// A throw-away Postgres database (`LADLE_TEST_POSTGRES_URL`).
    Postgres(PgDb),
}

impl Db {
    /// `None` after a loud SKIPPED line when Postgres is not configured.
    async fn postgres(test: &str) -> Option<Db> {
        let db = PgDb::create().await.map(Db::Postgres);
        if db.is_none() {
            loud_skip(
                &format!("hostile `{test}` on Postgres"),
                "set LADLE_TEST_POSTGRES_URL, e.g. postgres://postgres@127.0.0.1:5432/postgres",
            );
        }
        db
    }

    fn url(&self, root: &Path) -> String {
        match self {
            Db::Sqlite => format!("sqlite://{}", root.join("data/ladle.db").display()),
            Db::Postgres(pg) => pg.url.clone(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_checkpoints_fail_their_job_and_the_service_keeps_serving() {
    lying_checkpoints(Db::Sqlite).await;
}

/// The same checkpoints with the Postgres queue (the S3 copies of two of them only on SQLite:
/// they test storage, not the queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_checkpoints_on_postgres() {
    if let Some(db) = Db::postgres("lying_checkpoints").await {
        lying_checkpoints(db).await;
    }
}

async fn lying_checkpoints(db: Db) {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().canonicalize().unwrap();
    let s3 = match db {
        Db::Sqlite => S3Server::start(),
        Db::Postgres(_) => None,
    };
    if s3.is_none() && matches!(db, Db::Sqlite) {
        loud_skip(
            "hostile checkpoints on S3",
            "s3s-fs not installed: run .ci/run or `cargo install s3s-fs@0.14.1 --features binary --locked`",
        );
    }
    let good = good_tensors(1);
    let good_bytes = safetensors_bytes(&good);
    let good_uri = write_model(&root.join("good"), &good_bytes);
    let data: Vec<u8> = good.iter().flat_map(|t| t.data.clone()).collect();
    assert_eq!(data.len(), 80);

    let mut cases: Vec<BadCase> = Vec::new();
    let mut case = |name: &'static str, bytes: Vec<u8>, needles: Vec<&'static str>| {
        let uri = write_model(&root.join(name), &bytes);
        cases.push(BadCase { name, uri, needles });
    };
    // Header length past the end of the file.
    let mut b = good_bytes.clone();
    let past = b.len() as u64;
    b[..8].copy_from_slice(&past.to_le_bytes());
    case(
        "header-past-eof",
        b,
        vec!["model.safetensors", "past the end"],
    );
    // A 4 GB header length.
    let mut b = good_bytes.clone();
    b[..8].copy_from_slice(&(4u64 << 30).to_le_bytes());
    case(
        "header-4gb",
        b,
        vec!["model.safetensors", "exceeds the limit"],
    );
    // Fewer than 8 bytes.
    case("too-short", vec![1, 0, 0], vec!["model.safetensors"]);
    // Offsets past the end of the data section.
    case(
        "out-of-bounds",
        raw_file(
            br#"{"w":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64]},"b":{"dtype":"F32","shape":[4],"data_offsets":[64,80]}}"#,
            &data[..70],
        ),
        vec!["model.safetensors", "tensor 2 of the header", "past the"],
    );
    // Overlapping tensors.
    case(
        "overlap",
        raw_file(
            br#"{"w":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64]},"b":{"dtype":"F32","shape":[4],"data_offsets":[48,64]}}"#,
            &data,
        ),
        vec!["model.safetensors", "tensors 1 and 2 of the header overlap"],
    );
    // dtype and shape disagree with the offsets.
    case(
        "size-mismatch",
        raw_file(
            br#"{"w":{"dtype":"F16","shape":[4,4],"data_offsets":[0,64]},"b":{"dtype":"F32","shape":[4],"data_offsets":[64,80]}}"#,
            &data,
        ),
        vec!["model.safetensors", "tensor 1 of the header", "data_offsets span"],
    );
    // Reversed offsets.
    case(
        "reversed",
        raw_file(
            br#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[64,0]},"b":{"dtype":"F32","shape":[4],"data_offsets":[64,80]}}"#,
            &data,
        ),
        vec!["model.safetensors", "tensor 1 of the header", "end before"],
    );
    // A shape whose byte size overflows 64 bits.
    case(
        "overflow",
        raw_file(
            br#"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,64]},"b":{"dtype":"F32","shape":[4],"data_offsets":[64,80]}}"#,
            &data,
        ),
        vec!["model.safetensors", "tensor 1 of the header", "overflows"],
    );
    // An unknown dtype.
    case(
        "unknown-dtype",
        raw_file(
            br#"{"w":{"dtype":"F31","shape":[4,4],"data_offsets":[0,64]},"b":{"dtype":"F32","shape":[4],"data_offsets":[64,80]}}"#,
            &data,
        ),
        vec!["model.safetensors", "tensor 1 of the header has an unknown dtype"],
    );
    // Header JSON that is not UTF-8.
    case(
        "not-utf8",
        raw_file(
            b"{\"w\xff\":{\"dtype\":\"F32\",\"shape\":[4,4],\"data_offsets\":[0,64]},\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[64,80]}}",
            &data,
        ),
        vec!["model.safetensors", "UTF-8"],
    );
    // The same tensor name twice (a JSON map would silently keep one).
    case(
        "duplicate",
        raw_file(
            br#"{"w":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64]},"b":{"dtype":"F32","shape":[4],"data_offsets":[64,80]},"w":{"dtype":"F32","shape":[4],"data_offsets":[64,80]}}"#,
            &data,
        ),
        vec![
            "model.safetensors",
            "tensor 3 of the header has the name of an earlier tensor",
        ],
    );
    // An empty tensor name (found in the fuzz corpus: it parsed, then failed the job as
    // `internal` when the output was planned).
    case(
        "empty-name",
        raw_file(
            br#"{"":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64]},"b":{"dtype":"F32","shape":[4],"data_offsets":[64,80]}}"#,
            &data,
        ),
        vec![
            "model.safetensors",
            "tensor 1 of the header has a reserved or empty name",
        ],
    );
    // Not JSON at all, and JSON of the wrong shape.
    case(
        "garbage-json",
        raw_file(b"{\"w\": [1, 2", &data),
        vec!["model.safetensors"],
    );
    case(
        "unknown-key",
        raw_file(
            br#"{"w":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64],"extra":1},"b":{"dtype":"F32","shape":[4],"data_offsets":[64,80]}}"#,
            &data,
        ),
        vec!["model.safetensors", "tensor 1 of the header", "wrong shape"],
    );
    // A truncated object: the header still parses, the last tensor's bytes are missing.
    let mut b = good_bytes.clone();
    b.truncate(b.len() - 10);
    // (The safetensors crate lays `b` before `w`: `w` is the one cut.)
    case(
        "truncated",
        b,
        vec!["model.safetensors", "of the header ends", "past the"],
    );
    // A shard index naming a shard that does not exist.
    let sharded = root.join("missing-shard");
    write_sharded(
        &sharded,
        &[f32_tensor("w", &[4, 4], 1), f32_tensor("b", &[4], 2)],
        2,
    );
    std::fs::remove_file(sharded.join("model-00002-of-00002.safetensors")).unwrap();
    cases.push(BadCase {
        name: "missing-shard",
        uri: file_url(&sharded),
        needles: vec!["model.safetensors.index.json", "does not exist"],
    });
    // An index and its shards that disagree (the index places `b` in the wrong shard).
    let disagree = root.join("index-disagrees");
    write_sharded(
        &disagree,
        &[f32_tensor("w", &[4, 4], 1), f32_tensor("b", &[4], 2)],
        2,
    );
    let index = serde_json::json!({"metadata": {}, "weight_map": {
        "w": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}});
    std::fs::write(
        disagree.join("model.safetensors.index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    cases.push(BadCase {
        name: "index-disagrees",
        uri: file_url(&disagree),
        needles: vec!["model.safetensors.index.json", "does not hold"],
    });

    // The same lies on S3: a valid object overwritten by a truncated one, and a lying header.
    let mut roots = vec![root.display().to_string()];
    if let Some(s3) = &s3 {
        roots.push(format!("s3://{BUCKET}/"));
        let store = s3.store();
        let p = ObjPath::from("hostile/truncated/model.safetensors");
        store.put(&p, good_bytes.clone().into()).await.unwrap();
        let mut short = good_bytes.clone();
        short.truncate(short.len() - 10);
        store.put(&p, short.into()).await.unwrap();
        cases.push(BadCase {
            name: "s3-truncated",
            uri: format!("s3://{BUCKET}/hostile/truncated/"),
            needles: vec!["hostile/truncated/model.safetensors", "past the"],
        });
        let mut b = good_bytes.clone();
        b[..8].copy_from_slice(&(4u64 << 30).to_le_bytes());
        store
            .put(&ObjPath::from("hostile/header-4gb.safetensors"), b.into())
            .await
            .unwrap();
        cases.push(BadCase {
            name: "s3-header-4gb",
            uri: format!("s3://{BUCKET}/hostile/header-4gb.safetensors"),
            needles: vec!["hostile/header-4gb.safetensors", "exceeds the limit"],
        });
    }

    let settings = test_settings(&root.join("data"), &db.url(&root), roots, s3.as_ref());
    let (service, base) = start(&settings, Mode::Serve).await;
    let client = reqwest::Client::new();

    // Submit them all at once: the workers chew through them concurrently.
    let mut jobs = Vec::new();
    for c in &cases {
        let out_uri = if c.name.starts_with("s3-") {
            format!("s3://{BUCKET}/soups/{}", c.name)
        } else {
            file_url(&root.join("soups").join(c.name))
        };
        let (status, job) = submit(
            &client,
            &base,
            &serde_json::json!({
                "method": "linear",
                "models": [{"uri": good_uri}, {"uri": c.uri}],
                "output": {"uri": out_uri}
            }),
        )
        .await;
        assert_eq!(status, 202, "{}: {job}", c.name);
        jobs.push(job["id"].as_str().unwrap().to_string());
    }
    for (c, id) in cases.iter().zip(&jobs) {
        let done = wait_terminal(&client, &base, id, Duration::from_secs(60)).await;
        assert_eq!(done["state"], "failed", "{}: {done}", c.name);
        assert_eq!(
            done["error"]["code"], "checkpoint_malformed",
            "{}: {done}",
            c.name
        );
        assert_eq!(done["attempts"], 1, "{}: not retried: {done}", c.name);
        assert!(done["result"].is_null());
        let msg = done["error"]["message"].as_str().unwrap();
        for needle in &c.needles {
            assert!(
                msg.contains(needle),
                "{}: message {msg:?} should contain {needle:?}",
                c.name
            );
        }
        assert!(
            local_files(&root.join("soups").join(c.name)).is_empty(),
            "{}: nothing at the output URL",
            c.name
        );
    }
    if let Some(s3) = &s3 {
        let listed: Vec<_> = s3
            .store()
            .list(Some(&ObjPath::from("soups")))
            .try_collect()
            .await
            .unwrap();
        assert!(listed.is_empty(), "nothing at S3 outputs: {listed:?}");
    }

    // NaN and infinities are values: the job succeeds and keeps them.
    let special: Vec<f32> = vec![
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1.0,
        f32::MAX,
        -0.0,
        f32::MIN_POSITIVE,
        1e-45,
    ];
    let special_t = RawTensor {
        name: "w".into(),
        dtype: safetensors::Dtype::F32,
        shape: vec![8],
        data: special.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    let plain = RawTensor {
        data: [1.0f32; 8].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..special_t.clone()
    };
    let nan_a = write_model(&root.join("nan-a"), &safetensors_bytes(&[special_t]));
    let nan_b = write_model(&root.join("nan-b"), &safetensors_bytes(&[plain]));
    let (status, job) = submit(
        &client,
        &base,
        &serde_json::json!({
            "method": "linear", "models": [{"uri": nan_a}, {"uri": nan_b}],
            "parameters": {"normalize": false},
            "output": {"uri": file_url(&root.join("soups/nan")), "dtype": "float32"}
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
    let bytes = std::fs::read(root.join("soups/nan/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let got = to_f32(safetensors::Dtype::F32, st.tensor("w").unwrap().data());
    assert!(got[0].is_nan());
    assert_eq!(got[1], f32::INFINITY);
    assert_eq!(got[2], f32::NEG_INFINITY);
    assert_eq!(got[3], 2.0);
    assert_eq!(got[4], f32::MAX, "f32::MAX + 1 rounds back to MAX");

    // The service still serves: a good merge succeeds after all the bad ones.
    let good2 = write_model(&root.join("good2"), &safetensors_bytes(&good_tensors(7)));
    let (status, job) = submit(
        &client,
        &base,
        &serde_json::json!({
            "method": "linear", "models": [{"uri": good_uri}, {"uri": good2}],
            "output": {"uri": file_url(&root.join("soups/after"))}
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
    assert!(root.join("soups/after/ladle-manifest.json").is_file());
    let r = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_requests_get_a_precise_4xx_at_submit_time() {
    lying_requests(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_requests_on_postgres() {
    if let Some(db) = Db::postgres("lying_requests").await {
        lying_requests(db).await;
    }
}

async fn lying_requests(db: Db) {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().canonicalize().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let model = write_model(&root.join("a"), &safetensors_bytes(&good_tensors(1)));
    let model_b = write_model(&root.join("b"), &safetensors_bytes(&good_tensors(2)));
    std::fs::create_dir_all(outside.path().join("x")).unwrap();
    std::fs::write(
        outside.path().join("x/model.safetensors"),
        safetensors_bytes(&good_tensors(3)),
    )
    .unwrap();
    std::os::unix::fs::symlink(outside.path(), root.join("escape")).unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("x/model.safetensors"),
        root.join("file-link.safetensors"),
    )
    .unwrap();
    std::os::unix::fs::symlink(root.join("loop"), root.join("loop")).unwrap();
    let out = file_url(&root.join("soups/out"));
    let settings = test_settings(
        &root.join("data"),
        &db.url(&root),
        vec![root.display().to_string()],
        None,
    );
    // API only: nothing is ever claimed, so "nothing queued" is visible in the list.
    let (service, base) = start(&settings, Mode::Api).await;
    let client = reqwest::Client::new();
    let recipe = |models: serde_json::Value, output: &str| serde_json::json!({"method": "linear", "models": models, "output": {"uri": output}});

    // --- bodies over the limit: 413, with and without a content-length ---
    let big = format!(
        r#"{{"method": "linear", "models": [{{"uri": "{model}"}}], "output": {{"uri": "{out}"}}, "idempotency_key": "{}"}}"#,
        "k".repeat(2 << 20)
    );
    // The server answers 413 before reading the body and then closes the connection, so a
    // client still writing may see the connection reset instead of the answer: try a few
    // times, require the 413 at least once, and never any other answer.
    for chunked in [false, true] {
        let mut answered = 0;
        for _ in 0..5 {
            let body = if chunked {
                let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big
                    .as_bytes()
                    .chunks(64 * 1024)
                    .map(|c| Ok(c.to_vec()))
                    .collect();
                reqwest::Body::wrap_stream(futures::stream::iter(chunks))
            } else {
                reqwest::Body::from(big.clone())
            };
            let sent = reqwest::Client::new()
                .post(format!("{base}/v1/merges"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            let Ok(r) = sent else { continue };
            let status = r.status().as_u16();
            let err: serde_json::Value = r.json().await.unwrap_or_default();
            assert_eq!(
                (status, err["code"].as_str()),
                (413, Some("payload_too_large")),
                "chunked {chunked}: {err}"
            );
            answered += 1;
        }
        assert!(answered > 0, "chunked {chunked}: never got the 413 answer");
    }

    // --- bodies that are not a recipe: 400 invalid_recipe, naming the field ---
    let many: Vec<serde_json::Value> = (0..10_000)
        .map(|i| serde_json::json!({"uri": format!("{model}/m{i}")}))
        .collect();
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "10,000 models",
            serde_json::to_vec(&recipe(serde_json::Value::Array(many), &out)).unwrap(),
            "models",
        ),
        (
            "NaN weight",
            format!(r#"{{"method": "linear", "models": [{{"uri": "{model}", "weight": NaN}}], "output": {{"uri": "{out}"}}}}"#).into_bytes(),
            "invalid JSON",
        ),
        (
            "Infinity weight",
            format!(r#"{{"method": "linear", "models": [{{"uri": "{model}", "weight": Infinity}}], "output": {{"uri": "{out}"}}}}"#).into_bytes(),
            "invalid JSON",
        ),
        (
            "overflowing weight",
            format!(r#"{{"method": "linear", "models": [{{"uri": "{model}", "weight": 1e999}}], "output": {{"uri": "{out}"}}}}"#).into_bytes(),
            "invalid JSON",
        ),
        (
            "weight too large for f32",
            serde_json::to_vec(&serde_json::json!({"method": "linear",
                "models": [{"uri": model, "weight": 1e300}, {"uri": model_b, "weight": 1.0}],
                "parameters": {"normalize": false}, "output": {"uri": out}}))
            .unwrap(),
            "models[0].weight",
        ),
        (
            "gradient weight too large for f32",
            serde_json::to_vec(&serde_json::json!({"method": "task_arithmetic",
                "base_model": model,
                "models": [{"uri": model_b, "parameters": {"weight": [1e300, 1.0]}}],
                "output": {"uri": out}}))
            .unwrap(),
            "weight",
        ),
        (
            "lambda too large for f32",
            serde_json::to_vec(&serde_json::json!({"method": "task_arithmetic",
                "base_model": model, "models": [{"uri": model_b, "weight": 1.0}],
                "parameters": {"lambda": 1e300}, "output": {"uri": out}}))
            .unwrap(),
            "lambda",
        ),
        (
            "unknown method",
            serde_json::to_vec(&serde_json::json!({"method": "mean-of-vibes",
                "models": [{"uri": model}], "output": {"uri": out}}))
            .unwrap(),
            "method",
        ),
        (
            "unknown parameter",
            serde_json::to_vec(&serde_json::json!({"method": "linear",
                "models": [{"uri": model}], "parameters": {"normalise": true},
                "output": {"uri": out}}))
            .unwrap(),
            "parameters.normalise",
        ),
        (
            "unknown top-level field",
            serde_json::to_vec(&serde_json::json!({"method": "linear",
                "models": [{"uri": model}], "output": {"uri": out}, "callback": "http://x"}))
            .unwrap(),
            "callback",
        ),
        (
            "unknown model field",
            serde_json::to_vec(&serde_json::json!({"method": "linear",
                "models": [{"uri": model, "wieght": 2}], "output": {"uri": out}}))
            .unwrap(),
            "wieght",
        ),
        ("empty body", Vec::new(), "invalid JSON"),
        ("not UTF-8", b"{\"method\": \"lin\xffear\"}".to_vec(), "invalid JSON"),
        ("deeply nested", deep.into_bytes(), "invalid JSON"),
        ("a JSON array", b"[]".to_vec(), "invalid JSON"),
        (
            "output equal to an input",
            serde_json::to_vec(&recipe(serde_json::json!([{"uri": model}]), &model)).unwrap(),
            "output.uri",
        ),
        (
            "output equal to an input, spelled differently",
            serde_json::to_vec(&recipe(
                serde_json::json!([{"uri": model}]),
                &format!("{}/", model.replacen("file://", "file://localhost", 1)),
            ))
            .unwrap(),
            "output.uri",
        ),
        (
            "output inside an input",
            serde_json::to_vec(&recipe(
                serde_json::json!([{"uri": model}]),
                &format!("{model}/soup"),
            ))
            .unwrap(),
            "output.uri",
        ),
    ];
    for (name, body, needle) in cases {
        let (status, err) = submit_raw(&client, &base, body).await;
        assert_eq!(
            (status, err["code"].as_str()),
            (400, Some("invalid_recipe")),
            "{name}: {err}"
        );
        let msg = err["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{name}: {msg:?} should name {needle:?}"
        );
    }
    // base_model is checked like every input.
    for (base_uri, status_code, code, needle) in [
        (
            "file:///etc/".to_string(),
            403,
            "storage_not_allowed",
            "base_model",
        ),
        (
            format!("{}/../../etc", model),
            403,
            "storage_not_allowed",
            "base_model",
        ),
        ("gopher://x/y".to_string(), 400, "invalid_uri", "base_model"),
        (out.clone(), 400, "invalid_recipe", "base_model"),
    ] {
        let (status, err) = submit(
            &client,
            &base,
            &serde_json::json!({"method": "task_arithmetic", "base_model": base_uri,
                "models": [{"uri": model, "weight": 1.0}], "output": {"uri": out}}),
        )
        .await;
        assert_eq!(
            (status, err["code"].as_str()),
            (status_code, Some(code)),
            "base_model {base_uri}: {err}"
        );
        assert!(
            err["message"].as_str().unwrap_or_default().contains(needle),
            "{err}"
        );
    }
    // YAML bodies that lie: an alias bomb (a billion laughs) and a non-UTF-8 body are refused
    // quickly, not expanded.
    let mut bomb = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    for (prev, name) in ["a", "b", "c", "d", "e", "f", "g", "h"]
        .iter()
        .zip(["b", "c", "d", "e", "f", "g", "h", "i"])
    {
        let refs = vec![format!("*{prev}"); 9].join(",");
        bomb.push_str(&format!("{name}: &{name} [{refs}]\n"));
    }
    bomb.push_str(&format!(
        "merge_method: linear\nmodels:\n  - model: {model}\n"
    ));
    for body in [bomb.into_bytes(), b"merge_method: lin\xffear\n".to_vec()] {
        let sent = client
            .post(format!("{base}/v1/merges"))
            .header("content-type", "application/yaml")
            .body(body)
            .send();
        let r = tokio::time::timeout(Duration::from_secs(10), sent)
            .await
            .expect("answered within 10 s")
            .unwrap();
        let status = r.status().as_u16();
        let err: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            (status, err["code"].as_str()),
            (400, Some("invalid_recipe")),
            "{err}"
        );
    }
    // Wrong content type: 415, whatever the body holds.
    let r = client
        .post(format!("{base}/v1/merges"))
        .header("content-type", "text/plain")
        .body(serde_json::to_vec(&recipe(serde_json::json!([{"uri": model}]), &out)).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    let err: serde_json::Value = r.json().await.unwrap();
    assert_eq!(err["code"], "unsupported_media_type", "{err}");

    // --- URLs that lie: 403 storage_not_allowed or 400 invalid_uri, naming the field ---
    let root_url = file_url(&root);
    let url_cases: Vec<(String, u16, &str)> = vec![
        (
            format!("{root_url}/a/../../etc/passwd"),
            403,
            "storage_not_allowed",
        ),
        (
            format!("{root_url}/%2e%2e/%2e%2e/etc/passwd"),
            403,
            "storage_not_allowed",
        ),
        (format!("{root_url}/%2E%2E/x"), 403, "storage_not_allowed"),
        (
            format!("{root_url}/a%2f..%2f..%2fetc"),
            403,
            "storage_not_allowed",
        ),
        (
            format!("{root_url}/a\\..\\..\\etc"),
            403,
            "storage_not_allowed",
        ),
        (
            format!("{root_url}/escape/x/model.safetensors"),
            403,
            "path_outside_roots",
        ),
        // A link inside the root that leads out: refused by name, never by its target.
        (format!("{root_url}/escape/x"), 403, "path_outside_roots"),
        (
            format!("{root_url}/file-link.safetensors"),
            403,
            "path_outside_roots",
        ),
        (format!("{model}/model.safetensors/x"), 400, "invalid_uri"),
        (format!("{root_url}/loop/x"), 400, "invalid_uri"),
        (
            format!("{root_url}/{}", "n".repeat(5000)),
            400,
            "invalid_uri",
        ),
        ("file:///etc/passwd".into(), 403, "storage_not_allowed"),
        ("file:///etc/".into(), 403, "storage_not_allowed"),
        (
            "file://evil.example.com/etc/passwd".into(),
            400,
            "invalid_uri",
        ),
        ("s3://some-bucket/x".into(), 403, "storage_not_allowed"),
        ("ftp://host/x".into(), 400, "invalid_uri"),
        (
            "http://169.254.169.254/latest/meta-data".into(),
            400,
            "invalid_uri",
        ),
        ("gs://bucket/x".into(), 400, "invalid_uri"),
        ("javascript:alert(1)".into(), 400, "invalid_uri"),
        ("/etc/passwd".into(), 400, "invalid_uri"),
        ("not a url".into(), 400, "invalid_uri"),
        (format!("{model}?x=1"), 400, "invalid_uri"),
        (format!("{model}#frag"), 400, "invalid_uri"),
    ];
    for (uri, want_status, want_code) in &url_cases {
        for as_output in [false, true] {
            let body = if as_output {
                recipe(serde_json::json!([{"uri": model_b}]), uri)
            } else {
                recipe(serde_json::json!([{"uri": uri}, {"uri": model_b}]), &out)
            };
            let (status, err) = submit(&client, &base, &body).await;
            // A `.safetensors` output is refused by the recipe before storage looks at it.
            if as_output && uri.ends_with(".safetensors") {
                assert_eq!(status, 400, "output {uri}: {err}");
                continue;
            }
            assert_eq!(
                (status, err["code"].as_str()),
                (*want_status, Some(*want_code)),
                "{} {uri}: {err}",
                if as_output { "output" } else { "model" }
            );
            let field = if as_output {
                "output.uri"
            } else {
                "models[0].uri"
            };
            assert!(
                err["message"].as_str().unwrap_or_default().contains(field),
                "{uri}: {err}"
            );
        }
    }

    // --- list queries that lie ---
    for q in [
        "state=exploded",
        "limit=0",
        "limit=100000",
        "cursor=nope",
        "sort=asc",
    ] {
        let r = client
            .get(format!("{base}/v1/merges?{q}"))
            .send()
            .await
            .unwrap();
        let (status, err) = (
            r.status().as_u16(),
            r.json::<serde_json::Value>().await.unwrap(),
        );
        assert_eq!(
            (status, err["code"].as_str()),
            (400, Some("invalid_query")),
            "{q}: {err}"
        );
    }

    // Nothing was queued by any of it, and the API still takes a good request.
    let r = client
        .get(format!("{base}/v1/merges"))
        .send()
        .await
        .unwrap();
    let list: serde_json::Value = r.json().await.unwrap();
    assert_eq!(list["jobs"].as_array().unwrap().len(), 0, "{list}");
    let (status, job) = submit(
        &client,
        &base,
        &recipe(serde_json::json!([{"uri": model}, {"uri": model_b}]), &out),
    )
    .await;
    assert_eq!(status, 202, "{job}");
    service.shutdown().await;
}

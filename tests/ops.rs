//! Operability over real HTTP against the real service: `/metrics` moves with a merge (API
//! process and a worker-only process with `--metrics-bind`), request ids and access-log lines
//! (JSON logs captured from this process), the job span in blocking tasks, and retention
//! (prune of finished jobs, orphan search scratch folders). SQLite always; Postgres too when
//! `LADLE_TEST_POSTGRES_URL` is set.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use ladle::service::Mode;

// ---------- captured JSON logs (one global subscriber for this test binary) ----------

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The JSON log lines written so far by this process (the format `--log-format json` uses).
fn logs() -> Vec<serde_json::Value> {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    let captured = LOGS.get_or_init(|| {
        let c = Captured::default();
        let writer = c.clone();
        tracing_subscriber::fmt()
            .json()
            .with_env_filter("info")
            .with_writer(move || writer.clone())
            .init();
        c
    });
    let bytes = captured.0.lock().unwrap().clone();
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Whether a log line (its own fields or any enclosing span's) has `key` = `value` (a string,
/// or a number written as one: `"404"`).
fn has_field(line: &serde_json::Value, key: &str, value: &str) -> bool {
    let number = value.parse::<serde_json::Value>().ok();
    let matches = |v: &serde_json::Value| match v.get(key) {
        Some(serde_json::Value::String(s)) => s == value,
        Some(other) => number.as_ref() == Some(other),
        None => false,
    };
    matches(&line["fields"])
        || line["spans"]
            .as_array()
            .is_some_and(|spans| spans.iter().any(matches))
}

// ---------- Prometheus text ----------

/// `name{labels}` → value, for every sample of the exposition.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Sum of the samples of `name` whose labels include every `k="v"` of `labels`.
fn sample(m: &BTreeMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.iter()
        .filter(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v)
        .sum()
}

async fn scrape(client: &reqwest::Client, base: &str) -> (String, BTreeMap<String, f64>) {
    let r = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain"), "{ct}");
    let text = r.text().await.unwrap();
    let parsed = parse_metrics(&text);
    (text, parsed)
}

fn two_models(root: &std::path::Path) -> serde_json::Value {
    let mut uris = Vec::new();
    for k in 0..2u64 {
        let dir = root.join(format!("ft-{k}"));
        std::fs::create_dir_all(&dir).unwrap();
        let tensors = vec![
            bf16_tensor("model.embed_tokens.weight", &[64, 32], 10 + k),
            f32_tensor("model.norm.weight", &[32], 20 + k),
        ];
        std::fs::write(dir.join("model.safetensors"), safetensors_bytes(&tensors)).unwrap();
        uris.push(serde_json::json!({"uri": file_url(&dir)}));
    }
    serde_json::Value::Array(uris)
}

// ---------- metrics ----------

async fn metrics_scenario(database_url: &str) {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().canonicalize().unwrap();
    let models = two_models(&root);
    let settings = test_settings(
        &root.join("data"),
        database_url,
        vec![root.display().to_string()],
        None,
    );
    let mut worker_settings = settings.clone();
    worker_settings.metrics_bind = Some("127.0.0.1:0".parse().unwrap());
    let client = reqwest::Client::new();
    // An API process and a worker-only process over one database, as in production.
    let (api, base) = start(&settings, Mode::Api).await;
    let (worker, _) = start(&worker_settings, Mode::Worker).await;
    let worker_base = format!("http://{}", worker.metrics_addr.expect("metrics listener"));
    let r = client
        .get(format!("{worker_base}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = client
        .get(format!("{worker_base}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    let (_, before) = scrape(&client, &base).await;
    let (status, job) = submit(
        &client,
        &base,
        &serde_json::json!({"method": "linear", "models": models,
            "output": {"uri": file_url(&root.join("soups/m1"))}}),
    )
    .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let done = wait_terminal(&client, &base, &id, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    // A 404 on a job route, so that route's template shows up with its status.
    let r = client
        .get(format!("{base}/v1/merges/{}", uuid::Uuid::now_v7()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);

    // The worker records the end of the attempt just after the row changes: allow a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (text, after) = loop {
        let (text, after) = scrape(&client, &worker_base).await;
        let finished = [
            ("kind", "merge"),
            ("method", "linear"),
            ("outcome", "succeeded"),
        ];
        if sample(&after, "ladle_jobs_finished_total", &finished)
            > sample(&before, "ladle_jobs_finished_total", &finished)
            || Instant::now() > deadline
        {
            break (text, after);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let moved = |name: &str, labels: &[(&str, &str)]| {
        let (b, a) = (sample(&before, name, labels), sample(&after, name, labels));
        assert!(a > b, "{name}{labels:?} did not move: {b} -> {a}\n{text}");
        a - b
    };
    let linear = [("kind", "merge"), ("method", "linear")];
    assert!(moved("ladle_jobs_submitted_total", &linear) >= 1.0);
    assert!(moved("ladle_jobs_started_total", &linear) >= 1.0);
    moved(
        "ladle_jobs_finished_total",
        &[
            ("kind", "merge"),
            ("method", "linear"),
            ("outcome", "succeeded"),
        ],
    );
    moved(
        "ladle_job_duration_seconds_count",
        &[("kind", "merge"), ("outcome", "succeeded")],
    );
    moved("ladle_job_queue_wait_seconds_count", &[("kind", "merge")]);
    // Two models of 64x32 bf16 + 32 f32 each were read; one soup of the same size written.
    let per_model = (64 * 32 * 2 + 32 * 4) as f64;
    assert!(moved("ladle_storage_bytes_total", &[("direction", "read")]) >= 2.0 * per_model);
    assert!(moved("ladle_storage_bytes_total", &[("direction", "written")]) >= per_model);
    assert!(moved("ladle_chunks_merged_total", &[]) >= 2.0);
    moved(
        "ladle_http_requests_total",
        &[
            ("route", "/v1/merges"),
            ("method", "POST"),
            ("status", "202"),
        ],
    );
    moved(
        "ladle_http_requests_total",
        &[
            ("route", "/v1/merges/{id}"),
            ("method", "GET"),
            ("status", "200"),
        ],
    );
    moved(
        "ladle_http_requests_total",
        &[
            ("route", "/v1/merges/{id}"),
            ("method", "GET"),
            ("status", "404"),
        ],
    );
    moved(
        "ladle_http_request_duration_seconds_count",
        &[("route", "/v1/merges/{id}")],
    );
    // Jobs by state are read from this database at scrape time (one succeeded job in it).
    assert_eq!(
        sample(&after, "ladle_jobs", &[("state", "succeeded")]),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(&after, "ladle_jobs", &[("state", "queued")]),
        0.0,
        "{text}"
    );
    assert!(sample(&after, "ladle_worker_slots", &[]) >= 2.0, "{text}");
    // Route labels are templates: no raw id anywhere in the exposition.
    assert!(!text.contains(&id), "a raw job id leaked into /metrics");
    for name in [
        "ladle_jobs_submitted_total",
        "ladle_http_requests_total",
        "ladle_storage_bytes_total",
    ] {
        assert!(
            text.contains(&format!("# HELP {name}")),
            "no HELP for {name}"
        );
    }
    worker.shutdown().await;
    api.shutdown().await;
}

/// SQLite, then Postgres: one after the other, because `ladle_jobs{state}` is one gauge per
/// process that each scrape sets from its own database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_a_merge() {
    logs();
    let db = tempfile::tempdir().unwrap();
    metrics_scenario(&format!(
        "sqlite://{}",
        db.path().join("ladle.db").display()
    ))
    .await;
    match PgDb::create().await {
        Some(db) => metrics_scenario(&db.url).await,
        None => loud_skip("ops metrics on Postgres", "set LADLE_TEST_POSTGRES_URL"),
    }
}

// ---------- request ids and logs ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_and_access_log() {
    logs();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().canonicalize().unwrap();
    let models = two_models(&root);
    let token = "tok-3c1f0a9e-never-logged";
    let mut settings = test_settings(
        &root.join("data"),
        &format!("sqlite://{}", root.join("ladle.db").display()),
        vec![root.display().to_string()],
        None,
    );
    settings.auth = ladle::api::ApiAuth::new(vec![ladle::api::auth::token_digest(token)]);
    let (service, base) = start(&settings, Mode::Serve).await;
    let client = reqwest::Client::new();
    let bearer = format!("Bearer {token}");

    // A client's id is kept: header back, in the 404 body, in the access-log line.
    let missing = uuid::Uuid::now_v7();
    let r = client
        .get(format!("{base}/v1/merges/{missing}"))
        .header("authorization", &bearer)
        .header("x-request-id", "client-req-0001")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(r.headers()["x-request-id"], "client-req-0001");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "not_found");
    assert_eq!(body["request_id"], "client-req-0001", "{body}");
    // An unknown route (no template) and a 401 also carry one, generated when absent.
    let r = client.get(format!("{base}/nope")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let generated = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["request_id"], generated.as_str());
    let r = client
        .get(format!("{base}/v1/merges"))
        .header("authorization", "Bearer wrong-token-value")
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let replaced = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(
        uuid::Uuid::parse_str(&replaced).is_ok(),
        "an odd client id is replaced"
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["request_id"], replaced.as_str());

    // A merge: its job lines carry the job id and attempt.
    let r = client
        .post(format!("{base}/v1/merges"))
        .header("authorization", &bearer)
        .header("x-request-id", "client-req-0002")
        .json(&serde_json::json!({"method": "linear", "models": models,
            "output": {"uri": file_url(&root.join("soups/r1"))}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let id = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let authed = reqwest::Client::builder()
        .default_headers(
            [(
                reqwest::header::AUTHORIZATION,
                reqwest::header::HeaderValue::from_str(&bearer).unwrap(),
            )]
            .into_iter()
            .collect(),
        )
        .build()
        .unwrap();
    let done = wait_terminal(&authed, &base, &id, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "succeeded");
    service.shutdown().await;

    let lines = logs();
    let access = |rid: &str| {
        lines
            .iter()
            .filter(|l| l["fields"]["message"] == "request" && has_field(l, "request_id", rid))
            .cloned()
            .collect::<Vec<_>>()
    };
    let first = access("client-req-0001");
    assert_eq!(first.len(), 1, "one access-log line per request: {first:?}");
    let line = &first[0];
    assert_eq!(line["level"], "INFO");
    assert!(has_field(line, "route", "/v1/merges/{id}"), "{line}");
    assert!(has_field(line, "method", "GET"), "{line}");
    assert!(has_field(line, "status", "404"), "{line}");
    assert!(line["fields"]["latency_ms"].as_f64().is_some(), "{line}");
    assert_eq!(access(&generated).len(), 1);
    assert!(has_field(&access(&generated)[0], "route", "unmatched"));
    assert!(has_field(&access(&replaced)[0], "status", "401"));
    let post = access("client-req-0002");
    assert_eq!(post.len(), 1);
    assert!(has_field(&post[0], "route", "/v1/merges") && has_field(&post[0], "status", "202"));
    // Every line the job causes names it and its attempt.
    let job_lines: Vec<_> = lines
        .iter()
        .filter(|l| has_field(l, "job_id", &id))
        .collect();
    assert!(
        job_lines
            .iter()
            .any(|l| l["fields"]["message"] == "job succeeded"),
        "{job_lines:?}"
    );
    assert!(job_lines.iter().all(|l| has_field(l, "attempt", "1")));
    // Never the token, never a header.
    let all = serde_json::to_string(&lines).unwrap();
    assert!(!all.contains(token) && !all.contains("wrong-token-value"));
    assert!(!all.to_ascii_lowercase().contains("authorization"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_and_spawned_tasks_keep_the_job_span() {
    use tracing::Instrument;
    logs();
    let job_id = uuid::Uuid::now_v7().to_string();
    async {
        ladle::telemetry::spawn_blocking(|| tracing::info!("from a blocking task"))
            .await
            .unwrap();
        tokio::spawn(async { tracing::info!("from a spawned task") }.in_current_span())
            .await
            .unwrap();
    }
    .instrument(tracing::info_span!("job", job_id = %job_id, attempt = 3))
    .await;
    let lines = logs();
    for msg in ["from a blocking task", "from a spawned task"] {
        let line = lines
            .iter()
            .find(|l| l["fields"]["message"] == msg && has_field(l, "job_id", &job_id))
            .unwrap_or_else(|| panic!("{msg}: no line with the job's span"));
        assert!(has_field(line, "attempt", "3"), "{line}");
    }
}

// ---------- retention ----------

async fn retention_scenario(database_url: &str) {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().canonicalize().unwrap();
    let models = two_models(&root);
    let settings = test_settings(
        &root.join("data"),
        database_url,
        vec![root.display().to_string()],
        None,
    );
    let client = reqwest::Client::new();
    let storage =
        ladle::storage::Storage::new(Some(&settings.allowed_roots), Default::default()).unwrap();

    // API only: jobs stay queued, i.e. live.
    let (api, base) = start(&settings, Mode::Api).await;
    let greedy = |out: &str| {
        serde_json::json!({"method": "greedy_soup", "models": models,
            "evaluator": {"url": "http://127.0.0.1:9/evaluate"},
            "output": {"uri": file_url(&root.join(out))}})
    };
    let (status, live) = submit(&client, &base, &greedy("soups/g1")).await;
    assert_eq!(status, 202, "{live}");
    let live_id = live["id"].as_str().unwrap().to_string();
    let scratch = root.join("soups/.ladle-scratch");
    let orphan = uuid::Uuid::now_v7().to_string();
    for (name, file) in [
        (live_id.as_str(), "0/model.safetensors"),
        (orphan.as_str(), "3/model.safetensors"),
        ("not-a-job-id", "keep.txt"),
    ] {
        let path = scratch.join(name).join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"candidate bytes").unwrap();
    }
    let swept = ladle::retention::sweep(api.queue.as_ref(), &storage, None).await;
    assert_eq!(swept.scratch_removed, 1);
    assert!(!scratch.join(&orphan).exists(), "the orphan's folder stays");
    assert!(scratch.join(&live_id).join("0/model.safetensors").exists());
    assert!(scratch.join("not-a-job-id/keep.txt").exists());
    // Finished (cancelled): its folder goes; without a retention period the row stays.
    let r = client
        .post(format!("{base}/v1/merges/{live_id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let swept = ladle::retention::sweep(api.queue.as_ref(), &storage, None).await;
    assert_eq!(
        swept,
        ladle::retention::Swept {
            jobs_pruned: 0,
            scratch_removed: 1
        }
    );
    assert!(!scratch.join(&live_id).exists());
    let r = client
        .get(format!("{base}/v1/merges/{live_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // A queued job is never pruned, a finished one older than the period is.
    let (status, queued) = submit(&client, &base, &greedy("soups/g2")).await;
    assert_eq!(status, 202);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let swept = ladle::retention::sweep(
        api.queue.as_ref(),
        &storage,
        Some(Duration::from_millis(10)),
    )
    .await;
    assert_eq!(swept.jobs_pruned, 1);
    let r = client
        .get(format!("{base}/v1/merges/{live_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let r = client
        .get(format!(
            "{base}/v1/merges/{}",
            queued["id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    api.shutdown().await;

    // In the background: `--retain-finished 1s` on a serving process prunes a finished merge.
    let mut settings = settings;
    settings.retain_finished = Some(ladle::retention::parse_duration("1s").unwrap());
    let (service, base) = start(&settings, Mode::Serve).await;
    let (status, job) = submit(
        &client,
        &base,
        &serde_json::json!({"method": "linear", "models": models,
            "output": {"uri": file_url(&root.join("soups/linear"))}}),
    )
    .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap();
    assert_eq!(
        wait_terminal(&client, &base, id, Duration::from_secs(60)).await["state"],
        "succeeded"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = client
            .get(format!("{base}/v1/merges/{id}"))
            .send()
            .await
            .unwrap();
        if r.status().as_u16() == 404 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the finished job was not pruned in 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The soup itself is the user's: retention deletes job rows, never outputs.
    assert!(root.join("soups/linear/ladle-manifest.json").exists());
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_sqlite() {
    logs();
    let db = tempfile::tempdir().unwrap();
    retention_scenario(&format!(
        "sqlite://{}",
        db.path().join("ladle.db").display()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_postgres() {
    logs();
    match PgDb::create().await {
        Some(db) => retention_scenario(&db.url).await,
        None => loud_skip("ops retention on Postgres", "set LADLE_TEST_POSTGRES_URL"),
    }
}

// ---------- readiness ----------

/// `/readyz` (API) and the worker's `--metrics-bind` `/readyz` answer 503 while an allowed
/// S3 root cannot be reached, and 200 with only reachable roots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_covers_storage() {
    logs();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().canonicalize().unwrap();
    let db = format!("sqlite://{}", root.join("ladle.db").display());
    let client = reqwest::Client::new();
    let mut ok = test_settings(
        &root.join("data"),
        &db,
        vec![root.display().to_string()],
        None,
    );
    ok.metrics_bind = Some("127.0.0.1:0".parse().unwrap());
    let (service, base) = start(&ok, Mode::Serve).await;
    let r = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["storage"],
        "reachable"
    );
    service.shutdown().await;

    // An S3 root on a port nobody listens on.
    let mut dead = ok.clone();
    dead.allowed_roots.push("s3://nowhere-bucket/".into());
    dead.s3 = ladle::storage::S3Settings {
        endpoint: Some(format!("http://127.0.0.1:{}", free_port())),
        region: Some("us-east-1".into()),
        access_key_id: Some("x".into()),
        secret_access_key: Some("y".into()),
        allow_http: Some(true),
        virtual_hosted_style: Some(false),
    };
    let (service, base) = start(&dead, Mode::Serve).await;
    let metrics_base = format!("http://{}", service.metrics_addr.unwrap());
    let r = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "storage_error", "{body}");
    let r = client
        .get(format!("{metrics_base}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let r = client
        .get(format!("{metrics_base}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        200,
        "liveness does not depend on storage"
    );
    service.shutdown().await;
}

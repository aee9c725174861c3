//! Greedy soups end to end: the real service (SQLite; Postgres too when
//! `LADLE_TEST_POSTGRES_URL` is set, else a loud SKIPPED line) and an evaluator written here
//! (axum on 127.0.0.1:0) whose score is a known function of the candidate's weights, read from
//! the `file://` checkpoint URL it is sent: `score = -|mean(w) - 2|`. So the right greedy
//! choice is known in advance, by hand, for every constructed case below.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use common::procs::LadleProc;
use common::*;
use ladle::service::Mode;
use serde_json::{Value, json};

const TARGET: f64 = 2.0;

/// How the test evaluator answers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Behaviour {
    Score,
    /// 500 on the first call of every evaluation id, then the score.
    FailFirst,
    Status400,
    /// `{"score": NaN}` (what Python's json module writes for a NaN).
    NanScore,
    /// Sleep longer than any timeout the tests use.
    Hang,
    /// Score after 400 ms (a search slow enough for progress events between evaluations).
    Slow,
}

#[derive(Clone)]
struct Evaluator {
    behaviour: Behaviour,
    /// Calls per evaluation id.
    calls: Arc<Mutex<BTreeMap<String, usize>>>,
    /// Every request body, in arrival order.
    bodies: Arc<Mutex<Vec<Value>>>,
}

/// The mean of every float of every `.safetensors` file in a local folder.
fn folder_mean(dir: &Path) -> f64 {
    let mut sum = 0.0f64;
    let mut n = 0usize;
    for entry in std::fs::read_dir(dir).expect("read checkpoint folder") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).expect("read shard");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse shard");
        for (_, view) in st.tensors() {
            for v in to_f32(view.dtype(), view.data()) {
                sum += f64::from(v);
                n += 1;
            }
        }
    }
    assert!(n > 0, "no tensors under {}", dir.display());
    sum / n as f64
}

async fn evaluate(State(ev): State<Evaluator>, body: axum::Json<Value>) -> Response {
    let body = body.0;
    ev.bodies.lock().unwrap().push(body.clone());
    let id = body["evaluation_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let count = {
        let mut calls = ev.calls.lock().unwrap();
        let c = calls.entry(id).or_insert(0);
        *c += 1;
        *c
    };
    match ev.behaviour {
        Behaviour::Status400 => {
            return (StatusCode::BAD_REQUEST, "cannot read that checkpoint").into_response();
        }
        Behaviour::NanScore => {
            return (StatusCode::OK, r#"{"score": NaN, "metrics": {}}"#).into_response();
        }
        Behaviour::Hang => {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        Behaviour::FailFirst if count == 1 => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "warming up").into_response();
        }
        Behaviour::Slow => tokio::time::sleep(Duration::from_millis(400)).await,
        Behaviour::FailFirst | Behaviour::Score => {}
    }
    let url = url::Url::parse(body["checkpoint"].as_str().unwrap_or_default()).unwrap();
    let dir = url.to_file_path().unwrap();
    let mean = folder_mean(&dir);
    let score = -(mean - TARGET).abs();
    axum::Json(json!({"score": score, "metrics": {"mean": mean}})).into_response()
}

/// Start the evaluator; its URL and state.
async fn start_evaluator(behaviour: Behaviour) -> (String, Evaluator) {
    let ev = Evaluator {
        behaviour,
        calls: Default::default(),
        bodies: Default::default(),
    };
    let app = axum::Router::new()
        .route("/evaluate", axum::routing::post(evaluate))
        .with_state(ev.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/evaluate"), ev)
}

/// A one-tensor f32 checkpoint whose every value is `v`.
fn constant_model(dir: &Path, v: f32) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let t = RawTensor {
        name: "w".into(),
        dtype: safetensors::Dtype::F32,
        shape: vec![2, 3],
        data: std::iter::repeat_n(v, 6)
            .flat_map(f32::to_le_bytes)
            .collect(),
    };
    std::fs::write(dir.join("model.safetensors"), safetensors_bytes(&[t])).unwrap();
    dir.to_path_buf()
}

/// The service on one backend over a temp root.
struct World {
    tmp: tempfile::TempDir,
    service: Option<ladle::service::Service>,
    base: String,
    client: reqwest::Client,
    _pg: Option<PgDb>,
}

impl World {
    fn root(&self) -> &Path {
        self.tmp.path()
    }

    async fn stop(mut self) {
        if let Some(s) = self.service.take() {
            s.shutdown().await;
        }
    }
}

async fn world(postgres: bool) -> Option<World> {
    world_in(postgres, Mode::Serve).await.map(|(w, _)| w)
}

/// The world in `mode`, and its database URL.
async fn world_in(postgres: bool, mode: Mode) -> Option<(World, String)> {
    let tmp = tempfile::tempdir().unwrap();
    let (db_url, pg) = if postgres {
        let Some(pg) = PgDb::create().await else {
            loud_skip(
                "greedy soup on Postgres",
                "LADLE_TEST_POSTGRES_URL is not set",
            );
            return None;
        };
        (pg.url.clone(), Some(pg))
    } else {
        (
            format!("sqlite://{}", tmp.path().join("ladle.db").display()),
            None,
        )
    };
    let settings = test_settings(
        &tmp.path().join("data"),
        &db_url,
        vec![tmp.path().display().to_string()],
        None,
    );
    let (service, base) = start(&settings, mode).await;
    Some((
        World {
            tmp,
            service: Some(service),
            base,
            client: reqwest::Client::new(),
            _pg: pg,
        },
        db_url,
    ))
}

/// A `ladle worker` process on the world's database.
fn spawn_worker(w: &World, db_url: &str, name: &str, crash_at: Option<&str>) -> LadleProc {
    let mut env = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        env.insert(k.to_string(), v);
    };
    set("LADLE_DATABASE_URL", db_url.to_string());
    set("LADLE_DATA_DIR", w.root().join(name).display().to_string());
    set("LADLE_ALLOWED_ROOTS", w.root().display().to_string());
    set("LADLE_LEASE_TTL_SECS", "3".into());
    set("LADLE_HEARTBEAT_SECS", "1".into());
    set("LADLE_POLL_SECS", "0.2".into());
    set("LADLE_BACKOFF_SECS", "0.5".into());
    set("LADLE_CHUNK_ELEMS", "1024".into());
    if let Some(p) = crash_at {
        set("LADLE_TEST_CRASH_AT", p.into());
    }
    LadleProc::spawn(name, &["worker"], &env, &w.root().join("logs"))
}

/// Run a `worker-1` armed to abort at crash point `point`, and wait until it did.
async fn crash_worker(w: &World, db_url: &str, point: &str) {
    let mut first = spawn_worker(w, db_url, "worker-1", Some(point));
    let status = first
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("the armed worker never crashed");
    assert!(
        common::procs::aborted(status),
        "not a crash: {status:?}\n{}",
        first.log_text()
    );
    assert!(
        first.log_text().contains(&format!("crashing at {point}")),
        "{}",
        first.log_text()
    );
}

/// A worker killed right after storing the first evaluation: the next worker replays it
/// (the evaluator is asked once per evaluation id over both attempts) and picks the same soup.
async fn crash_mid_search_resumes(postgres: bool) {
    let Some((w, db_url)) = world_in(postgres, Mode::Api).await else {
        return;
    };
    let (url, ev) = start_evaluator(Behaviour::Score).await;
    let r = w.root();
    let models = vec![
        (constant_model(&r.join("m0"), 1.0), None),
        (constant_model(&r.join("m1"), 3.0), None),
        (constant_model(&r.join("m2"), 0.0), None),
        (constant_model(&r.join("m3"), 8.0), Some(-6.0)),
    ];
    let out = r.join("out/crash");
    let (status, v) = submit(
        &w.client,
        &w.base,
        &greedy_body(&models, &out, json!({"url": url})),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    crash_worker(&w, &db_url, "after-evaluation").await;
    // What the dead worker stored: evaluation 0, shown by GET.
    let job: Value = w
        .client
        .get(format!("{}/v1/merges/{id}", w.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let evals = job["search"]["evaluations"]
        .as_array()
        .expect("search shown");
    assert_eq!(evals.len(), 1, "{job}");
    assert_eq!(evals[0]["evaluation_id"], format!("{id}/0"));
    assert_eq!(evals[0]["score"].as_f64(), Some(-1.0));

    let _second = spawn_worker(&w, &db_url, "worker-2", None);
    let job = wait_terminal(&w.client, &w.base, &id, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 2, "{job}");
    assert_eq!(accepted(&job), vec![0, 1]);
    assert_eq!(output_values(&out), vec![2.0; 6]);
    let calls = ev.calls.lock().unwrap().clone();
    let expected: BTreeMap<String, usize> = (0..6).map(|n| (format!("{id}/{n}"), 1)).collect();
    assert_eq!(calls, expected, "an evaluation was asked again");
    assert_eq!(
        job["result"]["search"]["evaluations"]
            .as_array()
            .unwrap()
            .len(),
        6
    );
    w.stop().await;
}

/// A search whose only attempt dies right after publishing the final soup: the reaper's
/// recovery-only run recognises the soup (the manifest records this job and its search, not
/// the stored recipe's hash) and the job succeeds without asking the evaluator again.
async fn crash_after_final_manifest_on_last_attempt(postgres: bool) {
    let Some((w, db_url)) = world_in(postgres, Mode::Api).await else {
        return;
    };
    let (url, ev) = start_evaluator(Behaviour::Score).await;
    let r = w.root();
    let models = vec![
        (constant_model(&r.join("m0"), 1.0), None),
        (constant_model(&r.join("m1"), 3.0), None),
    ];
    let out = r.join("out/last");
    let mut body = greedy_body(&models, &out, json!({"url": url}));
    body["max_attempts"] = json!(1);
    let (status, v) = submit(&w.client, &w.base, &body).await;
    assert_eq!(status, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    crash_worker(&w, &db_url, "after-manifest").await;
    let published = std::fs::read(out.join("ladle-manifest.json")).expect("manifest published");
    let calls_before = ev.calls.lock().unwrap().clone();

    let second = spawn_worker(&w, &db_url, "worker-2", None);
    let job = wait_terminal(&w.client, &w.base, &id, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "succeeded", "{job}\n{}", second.log_text());
    assert_eq!(job["result"]["recovered"], true, "{job}");
    assert_eq!(job["attempts"], 2, "{job}");
    assert!(second.log_text().contains("recovery-only run"));
    assert_eq!(output_values(&out), vec![2.0; 6]);
    assert_eq!(
        std::fs::read(out.join("ladle-manifest.json")).unwrap(),
        published,
        "the recovery run rewrote the manifest"
    );
    assert_eq!(
        *ev.calls.lock().unwrap(),
        calls_before,
        "the recovery run asked the evaluator"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn greedy_recovery_after_final_manifest_sqlite() {
    crash_after_final_manifest_on_last_attempt(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn greedy_recovery_after_final_manifest_postgres() {
    crash_after_final_manifest_on_last_attempt(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn greedy_crash_resumes_sqlite() {
    crash_mid_search_resumes(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn greedy_crash_resumes_postgres() {
    crash_mid_search_resumes(true).await;
}

fn greedy_body(models: &[(PathBuf, Option<f64>)], out: &Path, evaluator: Value) -> Value {
    let models: Vec<Value> = models
        .iter()
        .map(|(p, s)| match s {
            Some(s) => json!({"uri": file_url(p), "score": s}),
            None => json!({"uri": file_url(p)}),
        })
        .collect();
    json!({
        "method": "greedy_soup",
        "models": models,
        "evaluator": evaluator,
        "output": {"uri": file_url(out)},
    })
}

async fn run_job(w: &World, body: &Value) -> Value {
    let (status, v) = submit(&w.client, &w.base, body).await;
    assert_eq!(status, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    wait_terminal(&w.client, &w.base, &id, Duration::from_secs(120)).await
}

fn accepted(job: &Value) -> Vec<u64> {
    job["result"]["search"]["accepted"]
        .as_array()
        .unwrap_or_else(|| panic!("no accepted list: {job}"))
        .iter()
        .map(|a| a["model"].as_u64().unwrap())
        .collect()
}

fn output_values(dir: &Path) -> Vec<f32> {
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("output shard");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("w").unwrap();
    to_f32(t.dtype(), t.data())
}

/// Values 1, 3, 0, 8 (model 3's score supplied as its true value, −6). Individual scores:
/// −1, −1, −2 (evaluated, ids 0..2), −6 (given). Order: 0, 1 (tie kept in input order), 2, 3.
/// {0,1}: mean 2 → 0, accepted; {0,1,2}: 4/3 → −2/3, rejected; {0,1,3}: 4 → −2, rejected.
async fn greedy_picks_the_known_set(w: &World) {
    let (url, ev) = start_evaluator(Behaviour::Score).await;
    let r = w.root();
    let models = vec![
        (constant_model(&r.join("m0"), 1.0), None),
        (constant_model(&r.join("m1"), 3.0), None),
        (constant_model(&r.join("m2"), 0.0), None),
        (constant_model(&r.join("m3"), 8.0), Some(-6.0)),
    ];
    let out = r.join("out/greedy");
    let job = run_job(w, &greedy_body(&models, &out, json!({"url": url}))).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(accepted(&job), vec![0, 1]);
    assert_eq!(job["result"]["search"]["best_score"].as_f64(), Some(0.0));
    assert_eq!(job["result"]["search"]["order"], json!([0, 1, 2, 3]));
    let evals = job["result"]["search"]["evaluations"].as_array().unwrap();
    let scores: Vec<f64> = evals.iter().map(|e| e["score"].as_f64().unwrap()).collect();
    // The candidate is written in f32: its mean is 4/3 rounded to f32.
    let third = -(f64::from(4.0f32 / 3.0) - 2.0).abs();
    assert_eq!(scores, vec![-1.0, -1.0, -2.0, 0.0, third, -2.0]);
    let purposes: Vec<&str> = evals
        .iter()
        .map(|e| e["purpose"].as_str().unwrap())
        .collect();
    assert_eq!(
        purposes,
        [
            "individual",
            "individual",
            "individual",
            "candidate",
            "candidate",
            "candidate"
        ]
    );
    // Exactly one call per evaluation, ids <job_id>/<step>.
    let id = job["id"].as_str().unwrap();
    let calls = ev.calls.lock().unwrap().clone();
    let expected: BTreeMap<String, usize> = (0..6).map(|n| (format!("{id}/{n}"), 1)).collect();
    assert_eq!(calls, expected);
    // The soup is the mean of models 0 and 1: 2.0 everywhere.
    assert_eq!(output_values(&out), vec![2.0; 6]);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(out.join("ladle-manifest.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["search"]["evaluations"].as_array().unwrap().len(),
        6
    );
    assert_eq!(manifest["recipe"]["method"], "linear");
    assert_eq!(manifest["recipe"]["models"].as_array().unwrap().len(), 2);
    // Candidates were deleted; the individual evaluations were sent the models themselves.
    let scratch = r.join("out/.ladle-scratch");
    let left: Vec<_> = std::fs::read_dir(&scratch)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "scratch left behind: {left:?}");
    let bodies = ev.bodies.lock().unwrap().clone();
    assert_eq!(bodies[0]["checkpoint"], file_url(&models[0].0));
    assert_eq!(bodies[3]["purpose"], "candidate");
    assert!(
        bodies[3]["checkpoint"]
            .as_str()
            .unwrap()
            .contains("/.ladle-scratch/"),
        "{}",
        bodies[3]
    );
    assert_eq!(bodies[3]["recipe"]["weights"], json!([0.5, 0.5]));
}

/// The job's event stream carries the search record while the search runs: `progress`
/// events whose `search.evaluations` grow one by one (never shrink), then `done` with all six.
async fn progress_events_carry_the_search(w: &World) {
    let (url, _ev) = start_evaluator(Behaviour::Slow).await;
    let r = w.root();
    let models = vec![
        (constant_model(&r.join("e0"), 1.0), None),
        (constant_model(&r.join("e1"), 3.0), None),
        (constant_model(&r.join("e2"), 0.0), None),
        (constant_model(&r.join("e3"), 8.0), Some(-6.0)),
    ];
    let body = greedy_body(&models, &r.join("out/events"), json!({"url": url}));
    let (status, v) = submit(&w.client, &w.base, &body).await;
    assert_eq!(status, 202, "{v}");
    let id = v["id"].as_str().unwrap();
    // The stream ends after its `done` event.
    let text = w
        .client
        .get(format!("{}/v1/merges/{id}/events", w.base))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut done = None;
    for block in text.split("\n\n") {
        let field = |name: &str| {
            block
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        let (Some(event), Some(data)) = (field("event:"), field("data:")) else {
            continue;
        };
        let data: Value = serde_json::from_str(&data).unwrap();
        match event.as_str() {
            "progress" => {
                if let Some(e) = data["search"]["evaluations"].as_array() {
                    seen.push(e.len());
                }
            }
            "done" => done = Some(data),
            _ => {}
        }
    }
    assert!(
        seen.iter().any(|n| *n > 0),
        "no progress event carried evaluations: {seen:?}\n{text}"
    );
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    let done = done.unwrap_or_else(|| panic!("no done event:\n{text}"));
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(
        done["result"]["search"]["evaluations"]
            .as_array()
            .map(Vec::len),
        Some(6),
        "{done}"
    );
}

/// Values 1, 3, 2, 2: individual −1, −1, 0, 0; order 2, 3, 0, 1. {2,3}: mean 2 → 0, a tie
/// with the best: `>=` takes it, `>` does not. `>=`: then {2,3,0} 5/3 and {2,3,1} 7/3, both
/// −1/3, rejected → {2,3}. `>`: {2,0} 1.5 and {2,1} 2.5, both −0.5, rejected → {2}.
async fn accept_rules_differ_on_a_tie(w: &World) {
    let (url, _ev) = start_evaluator(Behaviour::Score).await;
    let r = w.root();
    let models: Vec<(PathBuf, Option<f64>)> = [1.0, 3.0, 2.0, 2.0]
        .iter()
        .enumerate()
        .map(|(i, v)| (constant_model(&r.join(format!("t{i}")), *v), None))
        .collect();
    for (rule, want) in [(">=", vec![2u64, 3]), (">", vec![2])] {
        let out = r.join(format!("out/tie-{}", if rule == ">" { "gt" } else { "ge" }));
        let mut body = greedy_body(&models, &out, json!({"url": url}));
        body["accept"] = json!(rule);
        let job = run_job(w, &body).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        assert_eq!(accepted(&job), want, "accept {rule}");
        let manifest: Value =
            serde_json::from_slice(&std::fs::read(out.join("ladle-manifest.json")).unwrap())
                .unwrap();
        assert_eq!(
            manifest["recipe"]["models"].as_array().unwrap().len(),
            want.len()
        );
        assert_eq!(output_values(&out), vec![2.0; 6]);
    }
}

/// Each evaluator failure ends the job with its code and names the evaluation.
async fn evaluator_failures(w: &World) {
    let r = w.root();
    let models = vec![
        (constant_model(&r.join("f0"), 1.0), Some(-1.0)),
        (constant_model(&r.join("f1"), 3.0), Some(-1.0)),
    ];
    // 500 once per evaluation, then the score: retried, succeeds, one extra call.
    let (url, ev) = start_evaluator(Behaviour::FailFirst).await;
    let job = run_job(
        w,
        &greedy_body(&models, &r.join("out/retry"), json!({"url": url})),
    )
    .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(accepted(&job), vec![0, 1]);
    let id = job["id"].as_str().unwrap();
    assert_eq!(
        ev.calls.lock().unwrap().clone(),
        BTreeMap::from([(format!("{id}/0"), 2)])
    );

    let unreachable = format!("http://127.0.0.1:{}/evaluate", free_port());
    let cases = [
        (Behaviour::Status400, None, "evaluator_failed", "HTTP 400"),
        (Behaviour::NanScore, None, "evaluator_failed", "not JSON"),
        (
            Behaviour::Hang,
            None,
            "evaluator_unavailable",
            "no answer within",
        ),
        (
            Behaviour::Score,
            Some(unreachable),
            "evaluator_unavailable",
            "request failed",
        ),
    ];
    for (i, (behaviour, url_override, code, words)) in cases.into_iter().enumerate() {
        let (url, _ev) = start_evaluator(behaviour).await;
        let url = url_override.unwrap_or(url);
        let out = r.join(format!("out/fail-{i}"));
        let job = run_job(
            w,
            &greedy_body(&models, &out, json!({"url": url, "timeout_s": 1})),
        )
        .await;
        assert_eq!(job["state"], "failed", "{behaviour:?}: {job}");
        assert_eq!(job["error"]["code"], code, "{behaviour:?}: {job}");
        let msg = job["error"]["message"].as_str().unwrap();
        let id = job["id"].as_str().unwrap();
        assert!(
            msg.contains(&format!("evaluation {id}/0")) && msg.contains(words),
            "{behaviour:?}: {msg}"
        );
        assert_eq!(job["attempts"], 1, "not retried at the job level: {job}");
        assert!(!out.join("ladle-manifest.json").exists());
    }
}

/// Refused at submit time, naming the field.
async fn bad_requests(w: &World) {
    let r = w.root();
    let models = vec![
        (constant_model(&r.join("b0"), 1.0), None),
        (constant_model(&r.join("b1"), 3.0), None),
    ];
    let out = r.join("out/bad");
    let cases = [
        (
            greedy_body(
                &models,
                &out,
                json!({"url": "http://10.1.2.3:8000/evaluate"}),
            ),
            "evaluator.url",
        ),
        (
            greedy_body(
                &models,
                &out,
                json!({"url": "http://169.254.169.254/latest"}),
            ),
            "evaluator.url",
        ),
        (
            greedy_body(&models, &out, json!({"url": "file:///etc/passwd"})),
            "evaluator.url",
        ),
        (
            greedy_body(
                &models,
                &out,
                json!({"url": "http://127.0.0.1:1/e", "max_evaluations": 2}),
            ),
            "evaluator.max_evaluations",
        ),
        (
            greedy_body(
                &models,
                &out,
                json!({"url": "http://127.0.0.1:1/e", "x": 1}),
            ),
            "unknown field",
        ),
        (
            json!({"method": "greedy_soup", "models": [{"uri": file_url(&models[0].0)}],
                   "output": {"uri": file_url(&out)}}),
            "evaluator",
        ),
        (
            json!({"method": "linear", "models": [{"uri": file_url(&models[0].0), "score": 1.0}],
                   "output": {"uri": file_url(&out)}}),
            "models[0].score",
        ),
    ];
    for (body, field) in cases {
        let (status, v) = submit(&w.client, &w.base, &body).await;
        assert_eq!(status, 400, "{body}: {v}");
        let msg = v["message"].as_str().unwrap_or_default();
        assert!(msg.contains(field), "{field}: {v}");
    }
    let mut body = greedy_body(&models, &out, json!({"url": "http://127.0.0.1:1/e"}));
    body["accept"] = json!("==");
    let (status, v) = submit(&w.client, &w.base, &body).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("accept"), "{v}");
}

/// task_arithmetic of base 0 and one model at 1 is λ everywhere: λ ∈ {0.5, 1, 2, 3} scores
/// −1.5, −1, 0, −1, so λ = 2 is kept; every score is in the manifest.
async fn sweep_keeps_the_best_value(w: &World) {
    let (url, ev) = start_evaluator(Behaviour::Score).await;
    let r = w.root();
    let base = constant_model(&r.join("s-base"), 0.0);
    let x = constant_model(&r.join("s-x"), 1.0);
    let out = r.join("out/sweep");
    let body = json!({
        "method": "task_arithmetic",
        "base_model": file_url(&base),
        "models": [{"uri": file_url(&x), "weight": 1.0}],
        "sweep": {"parameter": "lambda", "values": [0.5, 1.0, 2.0, 3.0]},
        "evaluator": {"url": url},
        "output": {"uri": file_url(&out)},
    });
    let job = run_job(w, &body).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(output_values(&out), vec![2.0; 6]);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(out.join("ladle-manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["search"]["best"]["value"], 2.0, "{manifest}");
    let scores: Vec<f64> = manifest["search"]["evaluations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["score"].as_f64().unwrap())
        .collect();
    assert_eq!(scores, vec![-1.5, -1.0, 0.0, -1.0]);
    assert_eq!(manifest["recipe"]["parameters"]["lambda"], 2.0);
    assert_eq!(ev.calls.lock().unwrap().len(), 4);

    // Refused at submit: a parameter the method does not take, no evaluator, an unknown one.
    let mut bad = body.clone();
    bad["sweep"] = json!({"parameter": "t", "values": [0.5]});
    let (status, v) = submit(&w.client, &w.base, &bad).await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("sweep.values[0]"),
        "{v}"
    );
    let mut bad = body.clone();
    bad.as_object_mut().unwrap().remove("evaluator");
    let (status, v) = submit(&w.client, &w.base, &bad).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("evaluator"), "{v}");
    let mut bad = body.clone();
    bad["sweep"]["parameter"] = json!("gamma");
    let (status, v) = submit(&w.client, &w.base, &bad).await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("sweep.parameter"),
        "{v}"
    );
}

async fn all(postgres: bool) {
    let Some(w) = world(postgres).await else {
        return;
    };
    bad_requests(&w).await;
    greedy_picks_the_known_set(&w).await;
    progress_events_carry_the_search(&w).await;
    accept_rules_differ_on_a_tie(&w).await;
    evaluator_failures(&w).await;
    sweep_keeps_the_best_value(&w).await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn greedy_soup_sqlite() {
    all(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn greedy_soup_postgres() {
    all(true).await;
}

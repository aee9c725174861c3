//! Signed webhooks (a job's `notify`), end to end over HTTP, on SQLite and (with
//! `LADLE_TEST_POSTGRES_URL`) Postgres. A receiver in this test (a small axum server on port 0)
//! records every POST and answers a scripted status; it checks each signature with its own
//! HMAC-SHA256 (written here from the RFC 2104 definition over `sha2`, not ladle's code),
//! checked against the Standard Webhooks reference vector first.
//!
//! - deliveries are signed, carry the job's view, and follow `events` (a job whose events do
//!   not include what happened gets nothing); `GET` of the job lists them under
//!   `notify.deliveries`; `ladle_webhook_calls_total` counts them;
//! - a receiver answering 307 (to another receiver) then 200: not followed, retried;
//! - a receiver answering 500 then 200 gets the same delivery (id and body) twice, seconds
//!   apart, and the view shows the failed attempt, then the success;
//! - a disallowed host, plain http to a non-loopback host, an unknown event, or a server
//!   without `--webhook-secret` are refused at submit with 400 naming `notify` (merges and
//!   analyses);
//! - kill -9 between completion and delivery: a `ladle worker` child aborts (failpoint
//!   `before-webhook`) right after claiming the delivery of a finished job; a second worker
//!   delivers it once the first one's lease ran out.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::procs::{LadleProc, aborted};
use common::*;
use ladle::service::Mode;
use ladle::webhooks::{Secret, WebhookConfig};
use serde_json::{Value, json};

/// The receiver's key, as `whsec_` + base64 (32 bytes).
const SECRET: &str = "whsec_dGhpcyBpcyBsYWRsZSdzIHRlc3Qgd2ViaG9vayBrZXk=";

// ---------------------------------------------------------------------------------------------
// An independent verifier
// ---------------------------------------------------------------------------------------------

/// HMAC-SHA256 per RFC 2104: `H((K ⊕ opad) ‖ H((K ⊕ ipad) ‖ m))`, 64-byte blocks.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = block.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = block.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new()
        .chain_update(&ipad)
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(&opad)
        .chain_update(inner)
        .finalize()
        .to_vec()
}

/// Whether `header` (space-separated `v1,<base64>` entries) holds the signature of
/// `id.timestamp.body` under `secret` (`whsec_…`).
fn verify(secret: &str, id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").expect("whsec_ prefix"))
        .expect("base64 key");
    let mut msg = format!("{id}.{timestamp}.").into_bytes();
    msg.extend_from_slice(body);
    let want = STANDARD.encode(hmac_sha256(&key, &msg));
    header
        .split(' ')
        .any(|sig| sig.strip_prefix("v1,") == Some(want.as_str()))
}

#[test]
fn the_verifier_matches_the_reference_vector() {
    // The example of the Standard Webhooks reference libraries.
    assert!(verify(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "1614265330",
        br#"{"test": 2432232314}"#,
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    ));
    assert!(!verify(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "1614265331",
        br#"{"test": 2432232314}"#,
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    ));
}

// ---------------------------------------------------------------------------------------------
// The receiver
// ---------------------------------------------------------------------------------------------

/// One POST the receiver got.
#[derive(Debug, Clone)]
struct Got {
    id: String,
    timestamp: String,
    signature: String,
    content_type: String,
    body: Vec<u8>,
    /// Unix seconds when it arrived.
    at: i64,
    /// What the receiver answered.
    answered: u16,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }

    fn job_id(&self) -> String {
        self.json()["data"]["job_id"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

#[derive(Clone, Default)]
struct Inbox {
    got: Arc<Mutex<Vec<Got>>>,
    /// Statuses to answer, in order; 200 once it is empty.
    script: Arc<Mutex<VecDeque<u16>>>,
    /// The `location` of a 3xx answer.
    location: Arc<Mutex<Option<String>>>,
}

struct Receiver {
    addr: SocketAddr,
    inbox: Inbox,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(script: &[u16]) -> Receiver {
        let inbox = Inbox::default();
        inbox.script.lock().unwrap().extend(script.iter().copied());
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(inbox.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("receiver addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { addr, inbox, task }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn got(&self) -> Vec<Got> {
        self.inbox.got.lock().unwrap().clone()
    }

    /// Wait until `done` holds for what arrived; panics after `timeout`.
    async fn wait(&self, timeout: Duration, what: &str, done: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.got();
            if done(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; got {got:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    axum::extract::State(inbox): axum::extract::State<Inbox>,
    headers: axum::http::HeaderMap,
    body: bytes::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let answered = inbox.script.lock().unwrap().pop_front().unwrap_or(200);
    inbox.got.lock().unwrap().push(Got {
        id: h("webhook-id"),
        timestamp: h("webhook-timestamp"),
        signature: h("webhook-signature"),
        content_type: h("content-type"),
        body: body.to_vec(),
        at: chrono::Utc::now().timestamp(),
        answered,
    });
    let status = axum::http::StatusCode::from_u16(answered).unwrap_or(axum::http::StatusCode::OK);
    let location = inbox.location.lock().unwrap().clone();
    match location {
        Some(to) if status.is_redirection() => {
            (status, [(axum::http::header::LOCATION, to)]).into_response()
        }
        _ => status.into_response(),
    }
}

/// Every check a receiver makes: the signature (independently), a whole-seconds timestamp
/// close to the arrival, JSON, a message id.
fn assert_signed(g: &Got) {
    assert!(g.id.starts_with("msg_"), "webhook-id {:?}", g.id);
    let ts: i64 = g
        .timestamp
        .parse()
        .unwrap_or_else(|_| panic!("webhook-timestamp {:?} is not whole seconds", g.timestamp));
    assert!(
        (ts - g.at).abs() <= 30,
        "timestamp {ts} vs arrival {}",
        g.at
    );
    assert!(
        verify(SECRET, &g.id, &g.timestamp, &g.body, &g.signature),
        "bad signature {:?} on {}",
        g.signature,
        String::from_utf8_lossy(&g.body)
    );
    assert!(
        g.content_type.starts_with("application/json"),
        "{}",
        g.content_type
    );
}

// ---------------------------------------------------------------------------------------------
// Set-up
// ---------------------------------------------------------------------------------------------

fn write_models(root: &Path) -> Vec<PathBuf> {
    (0..2u64)
        .map(|k| {
            let tensors = vec![
                f32_tensor("a.weight", &[4, 64], 10 * k + 1),
                f32_tensor("b.weight", &[64], 10 * k + 2),
            ];
            let dir = root.join(format!("ft-{k}"));
            write_sharded(&dir, &tensors, 1);
            dir
        })
        .collect()
}

fn recipe(models: &[PathBuf], out: &Path, notify: Value) -> Value {
    json!({
        "method": "linear",
        "models": [{"uri": file_url(&models[0])}, {"uri": file_url(&models[1])}],
        "output": {"uri": format!("{}/", file_url(out))},
        "notify": notify,
    })
}

fn webhooks_on() -> WebhookConfig {
    WebhookConfig {
        secret: Some(Secret::parse(SECRET).expect("test secret")),
        ..Default::default()
    }
}

/// A database for one test: SQLite in `root`, or a fresh Postgres database (`None`, with a
/// loud skip, when `LADLE_TEST_POSTGRES_URL` is unset).
async fn database(pg: bool, root: &Path, test: &str) -> Option<(String, Option<PgDb>)> {
    if !pg {
        return Some((
            format!("sqlite://{}", root.join("ladle.db").display()),
            None,
        ));
    }
    match PgDb::create().await {
        Some(db) => Some((db.url.clone(), Some(db))),
        None => {
            loud_skip(
                &format!("webhooks test `{test}` on Postgres"),
                "set LADLE_TEST_POSTGRES_URL (.ci/run does)",
            );
            None
        }
    }
}

async fn get_job(client: &reqwest::Client, base: &str, id: &str) -> Value {
    client
        .get(format!("{base}/v1/merges/{id}"))
        .send()
        .await
        .expect("GET job")
        .json()
        .await
        .expect("job JSON")
}

/// Poll `GET` of a job until `done` holds for its view.
async fn wait_view(
    client: &reqwest::Client,
    base: &str,
    id: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let v = get_job(client, base, id).await;
        if done(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn submit_ok(client: &reqwest::Client, base: &str, body: &Value) -> String {
    let (status, v) = submit(client, base, body).await;
    assert_eq!(status, 202, "{v}");
    v["id"].as_str().expect("id").to_string()
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

/// Signed deliveries with the job's view, the events filter, `notify.deliveries`, the metric;
/// then a receiver answering 500 before 200.
async fn deliveries_and_retries(pg: bool) {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().canonicalize().expect("canonical tmp");
    let Some((db_url, _pg)) = database(pg, &root, "deliveries_and_retries").await else {
        return;
    };
    let models = write_models(&root);
    let mut settings = test_settings(
        &root.join("data"),
        &db_url,
        vec![root.display().to_string()],
        None,
    );
    settings.webhooks = webhooks_on();
    let (service, base) = start(&settings, Mode::Serve).await;
    let client = reqwest::Client::new();
    let rx = Receiver::start(&[]).await;

    let a = submit_ok(
        &client,
        &base,
        &recipe(
            &models,
            &root.join("out-a"),
            json!({"url": rx.url(), "events": ["running", "succeeded"]}),
        ),
    )
    .await;
    // Succeeds, but asked only for `failed`: nothing may arrive for it.
    let b = submit_ok(
        &client,
        &base,
        &recipe(
            &models,
            &root.join("out-b"),
            json!({"url": rx.url(), "events": ["failed"]}),
        ),
    )
    .await;
    let got = rx
        .wait(Duration::from_secs(60), "job a's two deliveries", |g| {
            g.iter().filter(|g| g.job_id() == a).count() >= 2
        })
        .await;
    let mine: Vec<&Got> = got.iter().filter(|g| g.job_id() == a).collect();
    for g in &mine {
        assert_signed(g);
    }
    let types: Vec<Value> = mine.iter().map(|g| g.json()["type"].clone()).collect();
    assert_eq!(types, vec![json!("job.running"), json!("job.succeeded")]);
    assert_ne!(mine[0].id, mine[1].id, "one delivery id per event");
    let done = mine[1].json();
    assert_eq!(done["data"]["event"], "succeeded");
    assert_eq!(done["data"]["kind"], "merge");
    assert_eq!(done["data"]["job"]["id"], a.as_str());
    assert_eq!(done["data"]["job"]["state"], "succeeded");
    assert!(done["data"]["job"]["result"]["uri"].is_string(), "{done:#}");
    assert!(done["timestamp"].is_string());

    // The view lists both, delivered at the first attempt, under the ids that were sent.
    let view = wait_view(
        &client,
        &base,
        &a,
        Duration::from_secs(10),
        "a's deliveries recorded",
        |v| {
            v["notify"]["deliveries"]
                .as_array()
                .is_some_and(|d| d.len() == 2 && d.iter().all(|d| d["state"] == "delivered"))
        },
    )
    .await;
    assert_eq!(view["notify"]["url"], rx.url());
    assert_eq!(view["notify"]["events"], json!(["running", "succeeded"]));
    let deliveries = view["notify"]["deliveries"].as_array().expect("deliveries");
    for (d, g) in deliveries.iter().zip(&mine) {
        assert_eq!(d["id"], g.id.as_str());
        assert_eq!(d["attempts"], 1);
        assert_eq!(d["last_status"], 200);
        assert!(
            d["delivered_at"].is_string() && d["last_error"].is_null(),
            "{d}"
        );
    }

    // The events filter: b succeeded, asked for `failed` only.
    wait_terminal(&client, &base, &b, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        rx.got().iter().all(|g| g.job_id() != b),
        "b asked for `failed` only: {:#?}",
        rx.got()
    );
    let vb = get_job(&client, &base, &b).await;
    assert_eq!(vb["state"], "succeeded");
    assert_eq!(vb["notify"]["deliveries"], json!([]));
    // A listing shows the settings but not the deliveries.
    let list: Value = client
        .get(format!("{base}/v1/merges"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("list JSON");
    let listed = list["jobs"]
        .as_array()
        .and_then(|j| j.iter().find(|j| j["id"] == a.as_str()).cloned())
        .expect("a listed");
    assert_eq!(listed["notify"]["url"], rx.url());
    assert!(listed["notify"].get("deliveries").is_none());

    // 500, then 200: the same delivery twice, seconds apart; the view shows the failure first.
    let flaky = Receiver::start(&[500]).await;
    let c = submit_ok(
        &client,
        &base,
        &recipe(
            &models,
            &root.join("out-c"),
            json!({"url": flaky.url(), "events": ["succeeded"]}),
        ),
    )
    .await;
    let failed_once = wait_view(
        &client,
        &base,
        &c,
        Duration::from_secs(60),
        "c's failed attempt",
        // `attempts` counts at claim; the outcome is recorded after the answer.
        |v| v["notify"]["deliveries"][0]["last_status"] == 500,
    )
    .await;
    let d = &failed_once["notify"]["deliveries"][0];
    assert_eq!(d["state"], "pending", "{d}");
    assert_eq!(d["attempts"], 1, "{d}");
    assert!(
        d["last_error"].as_str().is_some_and(|e| e.contains("500")),
        "{d}"
    );
    assert!(d["next_attempt_at"].is_string(), "{d}");
    let got = flaky
        .wait(Duration::from_secs(30), "the retry of c", |g| g.len() >= 2)
        .await;
    assert_eq!((got[0].answered, got[1].answered), (500, 200));
    assert_eq!(got[0].id, got[1].id, "a retry keeps the delivery id");
    assert_eq!(got[0].body, got[1].body, "a retry sends the same body");
    for g in &got {
        assert_signed(g);
    }
    let gap = got[1].at - got[0].at;
    assert!(
        (1..=10).contains(&gap),
        "the first retry came {gap} s later"
    );
    let view = wait_view(
        &client,
        &base,
        &c,
        Duration::from_secs(10),
        "c delivered",
        |v| v["notify"]["deliveries"][0]["state"] == "delivered",
    )
    .await;
    let d = &view["notify"]["deliveries"][0];
    assert_eq!(
        (d["attempts"].clone(), d["last_status"].clone()),
        (json!(2), json!(200))
    );

    // A 307 pointing elsewhere is a failed attempt, not followed: the other receiver gets
    // nothing, and the retry goes to the notify URL again.
    let trap = Receiver::start(&[]).await;
    let redirecting = Receiver::start(&[307]).await;
    *redirecting.inbox.location.lock().unwrap() = Some(trap.url());
    let r = submit_ok(
        &client,
        &base,
        &recipe(
            &models,
            &root.join("out-r"),
            json!({"url": redirecting.url(), "events": ["succeeded"]}),
        ),
    )
    .await;
    let redirected = wait_view(
        &client,
        &base,
        &r,
        Duration::from_secs(60),
        "r's redirected attempt",
        |v| v["notify"]["deliveries"][0]["last_status"] == 307,
    )
    .await;
    let d = &redirected["notify"]["deliveries"][0];
    assert_eq!(d["state"], "pending", "{d}");
    assert!(
        d["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("redirects are not followed")),
        "{d}"
    );
    wait_view(
        &client,
        &base,
        &r,
        Duration::from_secs(30),
        "r delivered on retry",
        |v| v["notify"]["deliveries"][0]["state"] == "delivered",
    )
    .await;
    let got = redirecting.got();
    assert_eq!(
        got.iter().map(|g| g.answered).collect::<Vec<_>>(),
        [307, 200]
    );
    assert!(
        trap.got().is_empty(),
        "the redirect was followed: {:#?}",
        trap.got()
    );

    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    for outcome in ["delivered", "http_error"] {
        assert!(
            metrics.contains(&format!(
                "ladle_webhook_calls_total{{outcome=\"{outcome}\"}}"
            )),
            "{outcome} missing from\n{metrics}"
        );
    }
    service.shutdown().await;
}

/// Refused at submit with 400 naming `notify`: hosts off the allow-list (in several
/// spellings), plain http to a non-loopback host, credentials, unknown events; merges and
/// analyses alike; and any `notify` on a server without a secret.
async fn refused_at_submit() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().canonicalize().expect("canonical tmp");
    let models = write_models(&root);
    let db = format!("sqlite://{}", root.join("ladle.db").display());
    let mut settings = test_settings(
        &root.join("data"),
        &db,
        vec![root.display().to_string()],
        None,
    );
    settings.webhooks = webhooks_on();
    let (service, base) = start(&settings, Mode::Api).await;
    let client = reqwest::Client::new();
    let out = root.join("out");
    let refused = |v: &Value| v["code"] == "invalid_recipe" && v["field"] == "notify";
    for (notify, says) in [
        (json!({"url": "https://10.0.0.1/hook"}), "not allowed"),
        (
            json!({"url": "https://169.254.169.254/latest"}),
            "not allowed",
        ),
        (json!({"url": "https://hooks.example.com/x"}), "not allowed"),
        (
            json!({"url": "https://localhost.example.com/x"}),
            "not allowed",
        ),
        (json!({"url": "https://[::ffff:10.0.0.1]/x"}), "not allowed"),
        (json!({"url": "http://0x0a000001/x"}), "plain http"),
        (json!({"url": "https://user:pw@127.0.0.1/x"}), "credentials"),
        (json!({"url": "ftp://127.0.0.1/x"}), "scheme"),
        (json!({"url": "not a url"}), "not a URL"),
        (
            json!({"url": "http://127.0.0.1/x", "events": ["queued"]}),
            "queued",
        ),
        (
            json!({"url": "http://127.0.0.1/x", "events": []}),
            "at least one",
        ),
    ] {
        let (status, v) = submit(&client, &base, &recipe(&models, &out, notify.clone())).await;
        assert_eq!(status, 400, "{notify}: {v}");
        assert!(refused(&v), "{notify}: {v}");
        assert!(
            v["message"].as_str().is_some_and(|m| m.contains(says)),
            "{notify}: {v}"
        );
    }
    // An unknown key inside notify is refused too (as any unknown recipe field).
    let (status, _) = submit(
        &client,
        &base,
        &recipe(
            &models,
            &out,
            json!({"url": "http://127.0.0.1/x", "secret": "x"}),
        ),
    )
    .await;
    assert_eq!(status, 400);
    // Analyses take the same rules.
    let analysis = |notify: Value| json!({"models": [file_url(&models[0]), file_url(&models[1])], "notify": notify});
    let r = client
        .post(format!("{base}/v1/analyses"))
        .json(&analysis(json!({"url": "https://10.0.0.1/hook"})))
        .send()
        .await
        .expect("post analysis");
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = r.json().await.expect("json");
    assert!(refused(&v), "{v}");
    let r = client
        .post(format!("{base}/v1/analyses"))
        .json(&analysis(json!({"url": "http://127.0.0.1:9/hook"})))
        .send()
        .await
        .expect("post analysis");
    assert_eq!(r.status().as_u16(), 202);
    let v: Value = r.json().await.expect("json");
    assert_eq!(
        v["notify"],
        json!({"url": "http://127.0.0.1:9/hook", "events": ["succeeded", "failed", "cancelled"]})
    );
    // Loopback spellings are accepted on plain http.
    let (status, v) = submit(
        &client,
        &base,
        &recipe(
            &models,
            &out,
            json!({"url": "http://[::1]:9/hook", "events": ["running"]}),
        ),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    service.shutdown().await;

    // No secret: no webhooks at all.
    let settings = test_settings(
        &root.join("data2"),
        &db,
        vec![root.display().to_string()],
        None,
    );
    let (service, base) = start(&settings, Mode::Api).await;
    let (status, v) = submit(
        &client,
        &base,
        &recipe(
            &models,
            &root.join("out2"),
            json!({"url": "http://127.0.0.1:9/hook"}),
        ),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(refused(&v), "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("--webhook-secret")),
        "{v}"
    );
    service.shutdown().await;
}

/// kill -9 between completion and delivery: the API runs here, jobs and deliveries in
/// `ladle worker` children. The first worker finishes the job (the delivery row is written
/// with the state change) and aborts right after claiming the delivery, before the POST;
/// a second worker sends it once the dead one's lease on it ran out (20 s).
async fn crash_before_delivery(pg: bool) {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().canonicalize().expect("canonical tmp");
    let Some((db_url, _pg)) = database(pg, &root, "crash_before_delivery").await else {
        return;
    };
    let models = write_models(&root);
    let mut settings = test_settings(
        &root.join("api"),
        &db_url,
        vec![root.display().to_string()],
        None,
    );
    settings.webhooks = webhooks_on();
    let (service, base) = start(&settings, Mode::Api).await;
    let client = reqwest::Client::new();
    let rx = Receiver::start(&[]).await;
    let worker = |n: usize, crash: bool| {
        let mut env = BTreeMap::new();
        for (k, v) in [
            ("LADLE_DATABASE_URL", db_url.clone()),
            (
                "LADLE_DATA_DIR",
                root.join(format!("worker-{n}")).display().to_string(),
            ),
            ("LADLE_ALLOWED_ROOTS", root.display().to_string()),
            ("LADLE_WEBHOOK_SECRET", SECRET.to_string()),
            ("LADLE_POLL_SECS", "0.2".into()),
            ("LADLE_CHUNK_ELEMS", "1024".into()),
        ] {
            env.insert(k.to_string(), v);
        }
        if crash {
            env.insert("LADLE_TEST_CRASH_AT".into(), "before-webhook".into());
        }
        LadleProc::spawn(
            &format!("worker-{n}"),
            &["worker"],
            &env,
            &root.join("logs"),
        )
    };
    let id = submit_ok(
        &client,
        &base,
        &recipe(
            &models,
            &root.join("out"),
            json!({"url": rx.url(), "events": ["succeeded"]}),
        ),
    )
    .await;
    let mut first = worker(0, true);
    let status = first
        .wait_exit(Duration::from_secs(60))
        .await
        .unwrap_or_else(|| {
            panic!(
                "the worker did not crash at before-webhook:\n{}",
                first.log_text()
            )
        });
    assert!(aborted(status), "{status:?}\n{}", first.log_text());
    assert!(
        first.log_text().contains("crashing at before-webhook"),
        "{}",
        first.log_text()
    );
    // Finished, the delivery claimed (one attempt counted) and not sent.
    let v = get_job(&client, &base, &id).await;
    assert_eq!(v["state"], "succeeded", "{v:#}");
    let d = &v["notify"]["deliveries"][0];
    assert_eq!(
        (d["state"].clone(), d["attempts"].clone()),
        (json!("pending"), json!(1)),
        "{v:#}"
    );
    assert!(rx.got().is_empty());

    let restarted = Instant::now();
    let mut second = worker(1, false);
    let got = rx
        .wait(
            Duration::from_secs(60),
            "the delivery after the restart",
            |g| !g.is_empty(),
        )
        .await;
    let took = restarted.elapsed();
    assert!(took < Duration::from_secs(60), "{took:?}");
    assert_signed(&got[0]);
    assert_eq!(got[0].job_id(), id);
    assert_eq!(got[0].json()["type"], "job.succeeded");
    let v = wait_view(
        &client,
        &base,
        &id,
        Duration::from_secs(10),
        "delivered recorded",
        |v| v["notify"]["deliveries"][0]["state"] == "delivered",
    )
    .await;
    assert_eq!(v["notify"]["deliveries"][0]["id"], got[0].id.as_str());
    assert_eq!(v["notify"]["deliveries"][0]["attempts"], 2);
    eprintln!(
        "webhooks: delivered {:.1} s after the restart (lease 20 s)",
        took.as_secs_f64()
    );
    second.sigterm();
    let _ = second.wait_exit(Duration::from_secs(30)).await;
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_deliveries_and_retries() {
    deliveries_and_retries(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_deliveries_and_retries() {
    deliveries_and_retries(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_is_validated_at_submit() {
    refused_at_submit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_kill9_between_completion_and_delivery() {
    crash_before_delivery(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_kill9_between_completion_and_delivery() {
    crash_before_delivery(true).await;
}

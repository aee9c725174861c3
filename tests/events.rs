//! Live events over Server-Sent Events, across processes: the API runs in this test, the worker
//! is the real `ladle worker` binary as a child process (a throttled merge, so it runs for a
//! few seconds), and the database is SQLite (always) or Postgres (`LADLE_TEST_POSTGRES_URL`).
//! The test reads the streams with its own SSE parser and checks the pinned format: `state`
//! (the job view), `progress` (the view's progress fields), a final `done`, then the end of
//! the stream; `Last-Event-ID` after the end answers 204; `GET /v1/events` carries every
//! state change with `kind`. It also prints the latency from the worker's write (the row's
//! `updated_at`, which is each event's id) to the event's arrival here: median and p99.
//! [`analysis_stream_auth_and_shutdown`]: an analysis's stream, streams behind a token, and
//! streams that end (not hang) when the server shuts down. [`bytes_total_counts_the_pre_passes`]:
//! a TIES merge's `bytes_total` includes its pre-passes' reads.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::procs::LadleProc;
use common::*;
use ladle::service::Mode;

/// One parsed SSE event.
#[derive(Debug, Clone)]
struct Sse {
    event: String,
    id: Option<String>,
    data: serde_json::Value,
    /// Wall clock (Unix ms) when it arrived.
    at_ms: i64,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Parse the complete events in `buf` (fields per the SSE spec: `event`, `id`, `data`; lines
/// starting with `:` are comments), leaving an incomplete tail in it.
fn parse_events(buf: &mut String, out: &mut Vec<Sse>) {
    while let Some(end) = buf.find("\n\n") {
        let block: String = buf.drain(..end + 2).collect();
        let (mut event, mut id, mut data) = (String::from("message"), None, Vec::new());
        for line in block.lines() {
            if line.starts_with(':') || line.is_empty() {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event = value.to_string(),
                "id" => id = Some(value.to_string()),
                "data" => data.push(value.to_string()),
                _ => {}
            }
        }
        if data.is_empty() {
            continue;
        }
        let data = serde_json::from_str(&data.join("\n")).expect("event data is JSON");
        out.push(Sse {
            event,
            id,
            data,
            at_ms: now_ms(),
        });
    }
}

/// Read a stream until it ends or `stop` says so; `None` on timeout.
async fn read_stream(
    mut resp: reqwest::Response,
    timeout: Duration,
    stop: impl Fn(&[Sse]) -> bool,
) -> Option<Vec<Sse>> {
    let deadline = Instant::now() + timeout;
    let mut buf = String::new();
    let mut events = Vec::new();
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, resp.chunk()).await {
            Err(_) => return None,
            Ok(Ok(Some(bytes))) => {
                buf.push_str(&String::from_utf8_lossy(&bytes).replace("\r\n", "\n"));
                parse_events(&mut buf, &mut events);
                if stop(&events) {
                    return Some(events);
                }
            }
            Ok(Ok(None)) => return Some(events),
            Ok(Err(e)) => panic!("stream failed: {e}"),
        }
    }
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return -1;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Submit `jobs` throttled merges to an in-test API, run them on a `ladle worker` child, and
/// check their event streams. Returns (state latencies, progress latencies) in ms.
async fn scenario(database_url: &str, backend: &str, jobs: usize) -> (Vec<i64>, Vec<i64>) {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().to_path_buf();
    for m in 0..2u64 {
        let tensors: Vec<RawTensor> = (0..20)
            .map(|t| f32_tensor(&format!("layers.{t}.w"), &[3, 1024], m * 100 + t))
            .collect();
        write_sharded(&root.join(format!("m{m}")), &tensors, 1);
    }
    let settings = test_settings(
        &root.join("api"),
        database_url,
        vec![root.display().to_string()],
        None,
    );
    let (service, base) = start(&settings, Mode::Api).await;
    let client = reqwest::Client::new();

    let mut env = BTreeMap::new();
    for (k, v) in [
        ("LADLE_DATABASE_URL", database_url.to_string()),
        ("LADLE_DATA_DIR", root.join("worker").display().to_string()),
        ("LADLE_ALLOWED_ROOTS", root.display().to_string()),
        ("LADLE_WORKERS", jobs.to_string()),
        ("LADLE_LEASE_TTL_SECS", "10".into()),
        ("LADLE_HEARTBEAT_SECS", "5".into()),
        ("LADLE_POLL_SECS", "0.2".into()),
        ("LADLE_CHUNK_ELEMS", "1024".into()),
        ("LADLE_INFLIGHT_BYTES", "1".into()),
        ("LADLE_TEST_THROTTLE_MS", "60".into()),
    ] {
        env.insert(k.to_string(), v);
    }

    // The all-jobs stream first, so it sees every job from its creation.
    let all = client
        .get(format!("{base}/v1/events"))
        .send()
        .await
        .expect("GET /v1/events");
    assert_eq!(all.status(), 200);
    assert!(
        all.headers()["content-type"]
            .to_str()
            .unwrap_or_default()
            .starts_with("text/event-stream")
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut ids = Vec::new();
    for j in 0..jobs {
        let body = serde_json::json!({
            "method": "linear",
            "models": [{"uri": file_url(&root.join("m0"))}, {"uri": file_url(&root.join("m1"))}],
            "output": {"uri": file_url(&root.join(format!("out-{j}")))},
        });
        let (status, v) = submit(&client, &base, &body).await;
        assert_eq!(status, 202, "{v}");
        ids.push(v["id"].as_str().expect("id").to_string());
    }
    let mut streams = Vec::new();
    for id in &ids {
        let resp = client
            .get(format!("{base}/v1/merges/{id}/events"))
            .send()
            .await
            .expect("GET events");
        assert_eq!(resp.status(), 200);
        streams.push(tokio::spawn(read_stream(
            resp,
            Duration::from_secs(90),
            |_| false,
        )));
    }
    // Queued for a while: a polling stream (SQLite) observes a state that lasts longer than its
    // poll interval; one shorter may be coalesced into the next.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut worker = LadleProc::spawn(
        &format!("events-{backend}"),
        &["worker"],
        &env,
        &root.join("logs"),
    );

    let mut state_lat = Vec::new();
    let mut progress_lat = Vec::new();
    for (id, stream) in ids.iter().zip(streams) {
        let events = stream
            .await
            .expect("reader")
            .unwrap_or_else(|| panic!("{backend}: the stream of {id} did not end"));
        let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(names.first(), Some(&"state"), "{backend}: {names:?}");
        assert_eq!(names.last(), Some(&"done"), "{backend}: {names:?}");
        let done = &events[events.len() - 1].data;
        assert_eq!(done["state"], "succeeded", "{backend}: {done}");
        assert_eq!(done["id"], id.as_str());
        let got: serde_json::Value = client
            .get(format!("{base}/v1/merges/{id}"))
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json");
        assert_eq!(done, &got, "{backend}: done carries the job view");
        // At the end everything planned was read (a fresh merge reads every planned byte).
        let p = &done["progress"];
        assert!(
            p["bytes_read"].as_u64().unwrap_or_default() > 0,
            "{backend}: {p}"
        );
        assert_eq!(p["bytes_read"], p["bytes_total"], "{backend}: {p}");
        // States in order, each once: queued (on connect, unless the worker was quicker), running,
        // succeeded.
        let states: Vec<&str> = events
            .iter()
            .filter(|e| e.event == "state")
            .map(|e| e.data["state"].as_str().unwrap_or_default())
            .collect();
        assert!(
            states.ends_with(&["running", "succeeded"]),
            "{backend}: states {states:?}"
        );
        let progress: Vec<&Sse> = events.iter().filter(|e| e.event == "progress").collect();
        assert!(
            progress.len() >= 2,
            "{backend}: a ~3.6 s merge gives progress events about every second: {names:?}"
        );
        let mut last_done = 0;
        let mut last_ms = 0;
        for p in &progress {
            for field in [
                "tensors_done",
                "tensors_total",
                "bytes_read",
                "bytes_total",
                "bytes_written",
            ] {
                assert!(p.data[field].is_u64(), "{backend}: {field} in {}", p.data);
            }
            assert_eq!(p.data["tensors_total"], 20);
            // Planned at planning: both models' 20 f32 tensors of 3 × 1024, read once (linear
            // has no pre-pass); what was read so far never passes it.
            let (read, total) = (
                p.data["bytes_read"].as_u64().unwrap_or_default(),
                p.data["bytes_total"].as_u64().unwrap_or_default(),
            );
            assert_eq!(total, 2 * 20 * 3 * 1024 * 4, "{backend}: {}", p.data);
            assert!(read <= total, "{backend}: {}", p.data);
            let d = p.data["tensors_done"].as_u64().unwrap_or_default();
            assert!(d >= last_done, "{backend}: progress went backwards");
            last_done = d;
            // The server sends a stream's progress events at least 250 ms apart; 10 ms of
            // slack for when each one reaches this reader.
            assert!(
                p.at_ms - last_ms >= 240 || last_ms == 0,
                "{backend}: at most 4 per second: {} ms after the previous",
                p.at_ms - last_ms
            );
            last_ms = p.at_ms;
        }
        assert!(
            progress.iter().any(|p| p.data["phase"] == "merging"),
            "{backend}: phase merging seen"
        );
        let mut last_id = i64::MIN;
        for e in &events {
            let id: i64 =
                e.id.as_deref()
                    .expect("every event has an id")
                    .parse()
                    .expect("ms id");
            assert!(id >= last_id, "{backend}: ids never go back");
            last_id = id;
            // The id is the row's updated_at: the worker's write.
            let lat = e.at_ms - id;
            match (e.event.as_str(), e.data["state"].as_str()) {
                ("state", Some("running" | "succeeded")) => state_lat.push(lat),
                ("progress", _) => progress_lat.push(lat),
                _ => {}
            }
        }
        // Resuming after the end: nothing more will come.
        let resumed = client
            .get(format!("{base}/v1/merges/{id}/events"))
            .header("last-event-id", last_id.to_string())
            .send()
            .await
            .expect("resume");
        assert_eq!(resumed.status(), 204, "{backend}: resume after done");
    }

    // The all-jobs stream saw each job queued, running and succeeded, with its kind.
    let want = jobs * 3;
    let seen = std::sync::Mutex::new(Vec::new());
    let all_events = read_stream(all, Duration::from_secs(20), |ev| {
        *seen.lock().unwrap() = ev
            .iter()
            .map(|e| (e.data["id"].clone(), e.data["state"].clone()))
            .collect();
        ev.len() >= want
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "{backend}: /v1/events did not carry {want} events: {:?}",
            seen.lock().unwrap()
        )
    });
    for id in &ids {
        let states: Vec<&str> = all_events
            .iter()
            .filter(|e| e.data["id"] == id.as_str())
            .map(|e| {
                assert_eq!(e.event, "state");
                assert_eq!(e.data["kind"], "merge");
                e.data["state"].as_str().unwrap_or_default()
            })
            .collect();
        assert_eq!(
            states,
            ["queued", "running", "succeeded"],
            "{backend}: {id}"
        );
    }

    // A job that does not exist: 404 with the error body, not a stream.
    let r = client
        .get(format!("{base}/v1/merges/{}/events", uuid::Uuid::now_v7()))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404);

    worker.sigterm();
    let _ = worker.wait_exit(Duration::from_secs(20)).await;
    service.shutdown().await;
    (state_lat, progress_lat)
}

fn report(backend: &str, mut state: Vec<i64>, mut progress: Vec<i64>) {
    state.sort_unstable();
    progress.sort_unstable();
    println!(
        "event latency ({backend}, worker write -> event received in another process): \
         state n={} median={} ms p99={} ms; progress n={} median={} ms p99={} ms",
        state.len(),
        percentile(&state, 0.5),
        percentile(&state, 0.99),
        progress.len(),
        percentile(&progress, 0.5),
        percentile(&progress, 0.99),
    );
    // Polling every 250 ms bounds the delay on every backend; allow scheduling slack on a
    // loaded machine.
    assert!(
        percentile(&state, 0.99) < 1500,
        "{backend}: state p99 {state:?}"
    );
    assert!(
        percentile(&progress, 0.99) < 1500,
        "{backend}: progress p99 {progress:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_sqlite_across_processes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let url = format!("sqlite://{}", tmp.path().join("ladle.db").display());
    let (s, p) = scenario(&url, "sqlite", 4).await;
    report("sqlite", s, p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_postgres_across_processes() {
    let Some(db) = PgDb::create().await else {
        loud_skip(
            "events_postgres_across_processes",
            "LADLE_TEST_POSTGRES_URL is not set",
        );
        return;
    };
    let (s, p) = scenario(&db.url, "postgres", 4).await;
    report("postgres", s, p);
}

const TOKEN: &str = "events-test-token-41c9";

/// GET `path` with `auth` as the Authorization header (none when `None`).
async fn get_as(client: &reqwest::Client, url: &str, auth: Option<&str>) -> reqwest::Response {
    let mut rb = client.get(url);
    if let Some(a) = auth {
        rb = rb.header("authorization", a);
    }
    rb.send().await.expect("get")
}

/// `GET /v1/analyses/{id}/events` of an analysis run by a `ladle worker` child (throttled):
/// queued, running, succeeded, then `done` with the job's view. The server has a token: the
/// streams refuse a request without it or with a wrong one (401 `unauthorized`, a JSON body,
/// no stream) and serve one with it. At shutdown, open streams end: the reader sees the end
/// of the stream within seconds, and the shutdown itself finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn analysis_stream_auth_and_shutdown() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().to_path_buf();
    for m in 0..2u64 {
        let tensors: Vec<RawTensor> = (0..8)
            .map(|t| f32_tensor(&format!("layers.{t}.w"), &[4, 256], m * 100 + t))
            .collect();
        write_sharded(&root.join(format!("m{m}")), &tensors, 1);
    }
    let db = format!("sqlite://{}", root.join("ladle.db").display());
    let mut settings = test_settings(
        &root.join("api"),
        &db,
        vec![root.display().to_string()],
        None,
    );
    settings.auth = ladle::api::ApiAuth::new(vec![ladle::api::auth::token_digest(TOKEN)]);
    let (service, base) = start(&settings, Mode::Api).await;
    let client = reqwest::Client::new();
    let bearer = format!("Bearer {TOKEN}");

    let r = client
        .post(format!("{base}/v1/analyses"))
        .header("authorization", &bearer)
        .json(&serde_json::json!({"models": [file_url(&root.join("m0")), file_url(&root.join("m1"))]}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 202);
    let job: serde_json::Value = r.json().await.expect("json");
    let id = job["id"].as_str().expect("id").to_string();

    // No token, a wrong one: 401 with the error body, for the job's stream and the global one.
    for auth in [None, Some("Bearer wrong-token")] {
        for path in [
            format!("/v1/analyses/{id}/events"),
            "/v1/events".to_string(),
        ] {
            let r = get_as(&client, &format!("{base}{path}"), auth).await;
            assert_eq!(r.status(), 401, "{path} {auth:?}");
            assert!(
                r.headers()["content-type"]
                    .to_str()
                    .unwrap_or_default()
                    .starts_with("application/json")
            );
            let body: serde_json::Value = r.json().await.expect("json");
            assert_eq!(body["code"], "unauthorized", "{path}: {body}");
        }
    }

    // With it: the stream, queued first.
    let r = get_as(
        &client,
        &format!("{base}/v1/analyses/{id}/events"),
        Some(&bearer),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap_or_default()
            .starts_with("text/event-stream")
    );
    let reader = tokio::spawn(read_stream(r, Duration::from_secs(90), |_| false));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let env: BTreeMap<String, String> = [
        ("LADLE_DATABASE_URL", db.clone()),
        ("LADLE_DATA_DIR", root.join("worker").display().to_string()),
        ("LADLE_ALLOWED_ROOTS", root.display().to_string()),
        ("LADLE_WORKERS", "1".into()),
        ("LADLE_POLL_SECS", "0.2".into()),
        ("LADLE_CHUNK_ELEMS", "1024".into()),
        ("LADLE_INFLIGHT_BYTES", "1".into()),
        ("LADLE_TEST_THROTTLE_MS", "200".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut worker = LadleProc::spawn("events-analysis", &["worker"], &env, &root.join("logs"));
    let events = reader
        .await
        .expect("reader")
        .expect("the analysis stream ends");
    let states: Vec<&str> = events
        .iter()
        .filter(|e| e.event == "state")
        .map(|e| e.data["state"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(states, ["queued", "running", "succeeded"], "{events:?}");
    let done = events.last().expect("events");
    assert_eq!(done.event, "done");
    assert_eq!(done.data["state"], "succeeded");
    let view: serde_json::Value =
        get_as(&client, &format!("{base}/v1/analyses/{id}"), Some(&bearer))
            .await
            .json()
            .await
            .expect("json");
    assert_eq!(done.data, view, "done carries the analysis's view");
    assert!(view["result"].is_object(), "{view}");
    worker.sigterm();
    let _ = worker.wait_exit(Duration::from_secs(20)).await;

    // Streams open at shutdown (a queued merge's, nothing runs it now, and the global one) end.
    let body = serde_json::json!({
        "method": "linear",
        "models": [{"uri": file_url(&root.join("m0"))}, {"uri": file_url(&root.join("m1"))}],
        "output": {"uri": file_url(&root.join("soup"))},
    });
    let r = client
        .post(format!("{base}/v1/merges"))
        .header("authorization", &bearer)
        .json(&body)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 202);
    let merge: serde_json::Value = r.json().await.expect("json");
    let mut readers = Vec::new();
    for path in [
        format!(
            "/v1/merges/{}/events",
            merge["id"].as_str().unwrap_or_default()
        ),
        "/v1/events".to_string(),
    ] {
        let r = get_as(&client, &format!("{base}{path}"), Some(&bearer)).await;
        assert_eq!(r.status(), 200, "{path}");
        readers.push((
            path,
            tokio::spawn(read_stream(r, Duration::from_secs(15), |_| false)),
        ));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let stopped = Instant::now();
    tokio::time::timeout(Duration::from_secs(15), service.shutdown())
        .await
        .expect("the shutdown does not wait on open streams forever");
    for (path, reader) in readers {
        let events = reader
            .await
            .expect("reader")
            .unwrap_or_else(|| panic!("{path}: the stream hung after the shutdown"));
        if path.starts_with("/v1/merges/") {
            assert_eq!(events.first().map(|e| e.event.as_str()), Some("state"));
            assert!(
                events.iter().all(|e| e.event != "done"),
                "{path}: {events:?}"
            );
        }
    }
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "{:?}",
        stopped.elapsed()
    );
}

/// `bytes_total` counts the pre-passes: a TIES merge (its sign and magnitude cut-offs read
/// each tensor's inputs again before the merge pass) of tensors larger than a chunk ends with
/// `bytes_read == bytes_total`, and both exceed one read of every input.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bytes_total_counts_the_pre_passes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().to_path_buf();
    let (tensors, elems) = (4u64, 16 * 1024u64);
    for m in 0..3u64 {
        let t: Vec<RawTensor> = (0..tensors)
            .map(|t| f32_tensor(&format!("layers.{t}.w"), &[16, 1024], m * 100 + t))
            .collect();
        write_sharded(&root.join(format!("m{m}")), &t, 1);
    }
    let db = format!("sqlite://{}", root.join("ladle.db").display());
    let settings = test_settings(
        &root.join("data"),
        &db,
        vec![root.display().to_string()],
        None,
    );
    let (service, base) = start(&settings, Mode::Serve).await;
    let client = reqwest::Client::new();
    let body = serde_json::json!({
        "method": "ties",
        "base_model": {"uri": file_url(&root.join("m0"))},
        "models": [
            {"uri": file_url(&root.join("m1")), "parameters": {"weight": 0.5, "density": 0.5}},
            {"uri": file_url(&root.join("m2")), "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "output": {"uri": file_url(&root.join("soup"))},
    });
    let (status, job) = submit(&client, &base, &body).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("id");
    let done = wait_terminal(&client, &base, id, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let p = &done["progress"];
    let (read, total) = (
        p["bytes_read"].as_u64().unwrap_or_default(),
        p["bytes_total"].as_u64().unwrap_or_default(),
    );
    let one_pass = 3 * tensors * elems * 4;
    println!("ties: bytes_read {read}, bytes_total {total}, one read of every input {one_pass}");
    assert_eq!(read, total, "{p}");
    assert!(total > one_pass, "pre-passes counted: {p}");
    service.shutdown().await;
}

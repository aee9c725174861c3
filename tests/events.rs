//! Live events over Server-Sent Events, across processes: the API runs in this test, the worker
//! is the real `ladle worker` binary as a child process (a throttled merge, so it runs for a
//! few seconds), and the database is SQLite (always) or Postgres (`LADLE_TEST_POSTGRES_URL`).
//! The test reads the streams with its own SSE parser and checks the pinned format: `state`
//! (the job view), `progress` (the view's progress fields), a final `done`, then the end of
//! the stream; `Last-Event-ID` after the end answers 204; `GET /v1/events` carries every
//! state change with `kind`. It also prints the latency from the worker's write (the row's
//! `updated_at`, which is each event's id) to the event's arrival here: median and p99.

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
                "bytes_written",
            ] {
                assert!(p.data[field].is_u64(), "{backend}: {field} in {}", p.data);
            }
            assert_eq!(p.data["tensors_total"], 20);
            let d = p.data["tensors_done"].as_u64().unwrap_or_default();
            assert!(d >= last_done, "{backend}: progress went backwards");
            last_done = d;
            assert!(
                p.at_ms - last_ms >= 100 || last_ms == 0,
                "at most 4 per second"
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

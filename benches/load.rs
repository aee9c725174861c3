//! Load run (a bench, not a test): the real service (HTTP API + 2 worker slots, one process)
//! under `LADLE_LOAD_JOBS` (default 10,000) submits from 32 concurrent clients while 8 other
//! clients poll `GET /v1/merges/{id}`; each job is a linear soup of two tiny real checkpoints
//! into its own output folder. Reports submits/s, p50/p99 submit and GET latency and the time
//! to drain, then checks that every job succeeded exactly once: attempts = 1 everywhere and
//! each output's manifest written by that job's first attempt.
//!
//! `cargo bench --bench load` runs SQLite, then Postgres when `LADLE_TEST_POSTGRES_URL` is set
//! (a throw-away database; else a loud SKIPPED line). `LADLE_LOAD_BACKENDS=sqlite` picks one.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use ladle::service::Mode;

const SUBMITTERS: usize = 32;
const POLLERS: usize = 8;

fn main() {
    let jobs: usize = std::env::var("LADLE_LOAD_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let backends =
        std::env::var("LADLE_LOAD_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    for backend in backends.split(',').map(str::trim) {
        rt.block_on(run(backend, jobs));
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn model(dir: &Path, seed: u64) -> String {
    std::fs::create_dir_all(dir).expect("model dir");
    let bytes = safetensors_bytes(&[
        f32_tensor("w", &[4, 4], seed),
        f32_tensor("b", &[4], seed + 1),
    ]);
    std::fs::write(dir.join("model.safetensors"), bytes).expect("write model");
    file_url(dir)
}

async fn run(backend: &str, jobs: usize) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().canonicalize().expect("canonical tempdir");
    let (db_url, _pg) = match backend {
        "sqlite" => (
            format!("sqlite://{}", root.join("data/ladle.db").display()),
            None,
        ),
        "postgres" => match PgDb::create().await {
            Some(db) => (db.url.clone(), Some(db)),
            None => {
                loud_skip("load run on Postgres", "set LADLE_TEST_POSTGRES_URL");
                return;
            }
        },
        other => panic!("unknown backend {other:?} (sqlite, postgres)"),
    };
    let a = model(&root.join("a"), 1);
    let b = model(&root.join("b"), 2);
    let settings = test_settings(
        &root.join("data"),
        &db_url,
        vec![root.display().to_string()],
        None,
    );
    let (service, base) = start(&settings, Mode::Serve).await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .expect("client");

    let ids: Arc<std::sync::Mutex<Vec<(usize, String)>>> = Default::default();
    let drained = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();

    let mut pollers = Vec::new();
    for p in 0..POLLERS {
        let (client, base, ids, drained) =
            (client.clone(), base.clone(), ids.clone(), drained.clone());
        pollers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut k = p;
            while !drained.load(Ordering::SeqCst) {
                let id = {
                    let ids = ids.lock().unwrap_or_else(|e| e.into_inner());
                    if ids.is_empty() {
                        None
                    } else {
                        k = k.wrapping_mul(31).wrapping_add(7919);
                        Some(ids[k % ids.len()].1.clone())
                    }
                };
                let Some(id) = id else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let t = Instant::now();
                let r = client
                    .get(format!("{base}/v1/merges/{id}"))
                    .send()
                    .await
                    .expect("GET");
                assert_eq!(r.status().as_u16(), 200, "GET {id}");
                let _ = r.bytes().await.expect("body");
                lat.push(t.elapsed());
            }
            lat
        }));
    }

    let mut submitters = Vec::new();
    for _ in 0..SUBMITTERS {
        let (client, base, ids, next) = (client.clone(), base.clone(), ids.clone(), next.clone());
        let (a, b, soups) = (a.clone(), b.clone(), root.join("soups"));
        submitters.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= jobs {
                    return lat;
                }
                let body = serde_json::json!({
                    "method": "linear",
                    "models": [{"uri": a}, {"uri": b}],
                    "output": {"uri": file_url(&soups.join(format!("job-{i}")))},
                });
                let t = Instant::now();
                let r = client
                    .post(format!("{base}/v1/merges"))
                    .json(&body)
                    .send()
                    .await
                    .expect("POST");
                let status = r.status().as_u16();
                let v: serde_json::Value = r.json().await.expect("json");
                lat.push(t.elapsed());
                assert_eq!(status, 202, "submit {i}: {v}");
                let id = v["id"].as_str().expect("id").to_string();
                ids.lock().unwrap_or_else(|e| e.into_inner()).push((i, id));
            }
        }));
    }
    let mut submit_lat = Vec::new();
    for s in submitters {
        submit_lat.extend(s.await.expect("submitter"));
    }
    let submit_wall = started.elapsed();

    // Drain: every job terminal.
    let queue = service.queue.clone();
    loop {
        let live = [
            ladle::queue::JobState::Queued,
            ladle::queue::JobState::Running,
        ];
        let mut any = false;
        for state in live {
            let page = queue
                .list(&ladle::queue::ListFilter {
                    state: Some(state),
                    limit: 1,
                    ..Default::default()
                })
                .await
                .expect("list");
            any |= !page.is_empty();
        }
        if !any {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drain_wall = started.elapsed();
    drained.store(true, Ordering::SeqCst);
    let mut get_lat = Vec::new();
    for p in pollers {
        get_lat.extend(p.await.expect("poller"));
    }

    // Every job succeeded once, its manifest written by its first (only) attempt.
    let ids = std::mem::take(&mut *ids.lock().unwrap_or_else(|e| e.into_inner()));
    assert_eq!(ids.len(), jobs);
    let mut problems = Vec::new();
    for (i, id) in &ids {
        let uuid: uuid::Uuid = id.parse().expect("uuid");
        let j = queue.get(uuid).await.expect("get").expect("job");
        if j.state != ladle::queue::JobState::Succeeded || j.attempts != 1 {
            problems.push(format!(
                "job {i}: {:?}, attempts {}, {:?}",
                j.state, j.attempts, j.error
            ));
            continue;
        }
        let path = root
            .join("soups")
            .join(format!("job-{i}"))
            .join("ladle-manifest.json");
        let m: serde_json::Value = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if m["run"]["job_id"] != id.as_str() || m["run"]["attempt"] != 1 {
            problems.push(format!("job {i}: manifest run {}", m["run"]));
        }
    }
    submit_lat.sort();
    get_lat.sort();
    println!(
        "load {backend}: {jobs} jobs, {SUBMITTERS} submitters, {POLLERS} pollers, 2 worker slots | \
         submits {:.0}/s (all in {:.1} s), submit p50 {:.1} ms p99 {:.1} ms | GET {} requests \
         p50 {:.1} ms p99 {:.1} ms | drained {:.1} s after the first submit ({:.0} jobs/s) | \
         {} problems",
        jobs as f64 / submit_wall.as_secs_f64(),
        submit_wall.as_secs_f64(),
        pct(&submit_lat, 0.5).as_secs_f64() * 1e3,
        pct(&submit_lat, 0.99).as_secs_f64() * 1e3,
        get_lat.len(),
        pct(&get_lat, 0.5).as_secs_f64() * 1e3,
        pct(&get_lat, 0.99).as_secs_f64() * 1e3,
        drain_wall.as_secs_f64(),
        jobs as f64 / drain_wall.as_secs_f64(),
        problems.len()
    );
    for p in problems.iter().take(10) {
        println!("  {p}");
    }
    assert!(
        problems.is_empty(),
        "{} jobs did not run exactly once",
        problems.len()
    );
    service.shutdown().await;
}

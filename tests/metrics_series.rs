//! The `/metrics` series no other test moves (tests/ops.rs checks the job, storage, chunk and
//! HTTP series): `ladle_evaluator_calls_total` and `ladle_worker_slots_busy` during a greedy
//! soup against an evaluator written here, `ladle_jobs_pruned_total` with
//! `--retain-finished 1s`, and `ladle_lease_losses_total` / `ladle_self_fences_total` present
//! from the start at 0 (and still 0: no lease was lost). Each with its Prometheus type.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ladle::service::Mode;

/// The `# TYPE` of `name` in the exposition.
fn type_of<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("# TYPE {name} ")))
        .map(str::trim)
}

/// Sum of `name`'s samples whose labels hold `label` (`k="v"`, or any when empty).
fn value(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            let (n, labels) = series.split_once('{').unwrap_or((series, ""));
            n == name && labels.contains(label)
        })
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

async fn scrape(client: &reqwest::Client, base: &str) -> String {
    let r = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(r.status(), 200);
    r.text().await.expect("text")
}

/// An evaluator that takes 600 ms per evaluation (so a scrape sees the slot busy) and
/// scores every checkpoint 1.
async fn slow_evaluator() -> String {
    let app = axum::Router::new().route(
        "/evaluate",
        axum::routing::post(|| async {
            tokio::time::sleep(Duration::from_millis(600)).await;
            axum::Json(serde_json::json!({"score": 1.0, "metrics": {}}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/evaluate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn evaluator_slot_prune_and_lease_series() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().to_path_buf();
    let mut models = Vec::new();
    for m in 0..2u64 {
        let dir = root.join(format!("m{m}"));
        write_sharded(&dir, &[f32_tensor("w", &[4, 8], m)], 1);
        models.push(serde_json::json!({"uri": file_url(&dir)}));
    }
    let db = format!("sqlite://{}", root.join("ladle.db").display());
    let mut settings = test_settings(
        &root.join("data"),
        &db,
        vec![root.display().to_string()],
        None,
    );
    settings.retain_finished = Some(ladle::retention::parse_duration("1s").expect("duration"));
    let (service, base) = start(&settings, Mode::Serve).await;
    let client = reqwest::Client::new();

    let before = scrape(&client, &base).await;
    for (name, kind) in [
        ("ladle_lease_losses_total", "counter"),
        ("ladle_self_fences_total", "counter"),
        ("ladle_jobs_pruned_total", "counter"),
        ("ladle_worker_slots_busy", "gauge"),
    ] {
        assert_eq!(type_of(&before, name), Some(kind), "{name}\n{before}");
    }
    assert_eq!(value(&before, "ladle_worker_slots_busy", ""), 0.0);

    let body = serde_json::json!({
        "method": "greedy_soup",
        "models": models,
        "evaluator": {"url": slow_evaluator().await},
        "output": {"uri": file_url(&root.join("soup"))},
    });
    let (status, job) = submit(&client, &base, &body).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("id").to_string();
    // While it runs (two evaluations or more, 600 ms each), a scrape sees its slot busy.
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let sampler = tokio::spawn({
        let (client, base) = (client.clone(), base.clone());
        async move {
            let mut busy = 0f64;
            loop {
                busy = busy.max(value(
                    &scrape(&client, &base).await,
                    "ladle_worker_slots_busy",
                    "",
                ));
                if stopped.try_recv().is_ok() {
                    return busy;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let done = wait_terminal(&client, &base, &id, Duration::from_secs(60)).await;
    let _ = stop.send(());
    let busy = sampler.await.expect("sampler");
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(busy, 1.0, "one slot busy while the soup ran");

    // Finished jobs older than 1 s are pruned in the background: the row goes, the counter moves.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = client
            .get(format!("{base}/v1/merges/{id}"))
            .send()
            .await
            .expect("get");
        if r.status() == 404 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the finished job was not pruned in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = scrape(&client, &base).await;
    assert_eq!(
        type_of(&after, "ladle_evaluator_calls_total"),
        Some("counter")
    );
    let evaluated = value(&after, "ladle_evaluator_calls_total", "outcome=\"ok\"")
        - value(&before, "ladle_evaluator_calls_total", "outcome=\"ok\"");
    let evaluations = done["result"]["search"]["evaluations"]
        .as_array()
        .map_or(0, Vec::len);
    assert!(evaluations >= 2, "{done}");
    assert_eq!(
        evaluated, evaluations as f64,
        "one call per evaluation\n{after}"
    );
    assert!(
        value(&after, "ladle_jobs_pruned_total", "")
            - value(&before, "ladle_jobs_pruned_total", "")
            >= 1.0,
        "{after}"
    );
    assert_eq!(value(&after, "ladle_worker_slots_busy", ""), 0.0, "{after}");
    for name in ["ladle_lease_losses_total", "ladle_self_fences_total"] {
        assert_eq!(
            value(&after, name, ""),
            0.0,
            "{name}: no lease was lost\n{after}"
        );
    }
    service.shutdown().await;
}

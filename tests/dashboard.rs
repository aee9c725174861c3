//! The `/ui` dashboard in a real headless browser: Debian's `chromium` driven over WebDriver
//! (`chromium-driver`'s `chromedriver`, plain HTTP from here), against the real service with
//! bearer-token auth. The page is loaded once and never reloaded: a merge submitted over the
//! API appears in the list and finishes there; a merge submitted through the form (after a
//! validation error shown in place) runs, is cancelled from the list, and ends `cancelled`.
//!
//! Every one of those updates must come over the event streams (read with `fetch()`, bearer
//! token included), not by polling: the page marks each row and the job page with how its
//! data came (`data-via`: `load`, `sync`, `stream`, `poll`) and counts in `window.__ladleLive`
//! (events by name, fallback polls, connections). Last, the test cuts the list's stream from
//! inside the page (a wrapper around `fetch`) and refuses new ones: the page must fall back to
//! polling (a new job arrives `via=poll`), then reconnect with `Last-Event-ID` set to the last
//! event it had, and stop polling.
//!
//! A greedy soup's page shows its evaluations (table and chart); a failed search's page shows
//! the error code.
//!
//! Screenshots go to `<target>/dashboard/`. `.ci/run` installs chromium and chromium-driver;
//! without them this test prints a loud SKIPPED.

mod common;

#[path = "dashboard/webdriver.rs"]
mod webdriver;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use ladle::service::Mode;
use serde_json::{Value, json};
use webdriver::{Driver, find};

fn model(dir: &Path, rows: usize, seed: u64) -> Value {
    std::fs::create_dir_all(dir).unwrap();
    let tensors = vec![
        bf16_tensor("model.embed_tokens.weight", &[rows, 1024], seed),
        f32_tensor("model.norm.weight", &[1024], seed + 1),
    ];
    std::fs::write(dir.join("model.safetensors"), safetensors_bytes(&tensors)).unwrap();
    json!({"uri": file_url(dir)})
}

/// A row's state in the list, or "" if the row is not there.
const ROW_STATE: &str = "const r = document.querySelector(`#jobs tr[data-id=\"${arguments[0]}\"]`); return r ? r.dataset.state : '';";
/// A row's `state/via` (how its latest data came), or "" if the row is not there.
const ROW_VIA: &str = "const r = document.querySelector(`#jobs tr[data-id=\"${arguments[0]}\"]`); return r ? `${r.dataset.state}/${r.dataset.via}` : '';";
/// The page's live-update counters (`window.__ladleLive`, see src/ui/app.js).
const LIVE: &str = "return window.__ladleLive";
/// True once the view on screen follows its event stream.
const STREAMING: &str = "return window.__ladleLive.mode === 'stream' && document.querySelector('#live').dataset.mode === 'stream'";

/// Wraps the page's `fetch` for event streams: records each stream request's URL and
/// `Last-Event-ID`, refuses new streams while `__blockStreams`, and `__cutStream()` breaks the
/// stream opened last (as a dropped connection would).
const FETCH_WRAPPER: &str = r#"
window.__realFetch = window.__realFetch || window.fetch;
window.__streams = [];
window.__blockStreams = false;
window.fetch = async (url, opts = {}) => {
  const u = String(url);
  if (!u.includes('/events')) return window.__realFetch(url, opts);
  const h = opts.headers || {};
  window.__streams.push({ url: u, lastEventId: h['Last-Event-ID'] || null, auth: Boolean(h.Authorization) });
  if (window.__blockStreams) throw new TypeError('stream refused by the test');
  const resp = await window.__realFetch(url, opts);
  let cut;
  const pipe = new TransformStream({ start(c) { cut = c; } });
  window.__cutStream = () => cut.error(new TypeError('stream cut by the test'));
  return new Response(resp.body.pipeThrough(pipe), { status: resp.status, headers: resp.headers });
};
return 1"#;

/// A search evaluator on a free port: `POST /ok` scores 0.1, 0.3, 0.2, … in call order,
/// `POST /refuse` answers 400. Returns its base URL.
async fn start_evaluator() -> String {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = axum::Router::new()
        .route(
            "/ok",
            axum::routing::post(move || {
                let n = calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let score = [0.1, 0.3, 0.2, 0.4][n % 4];
                async move { axum::Json(json!({"score": score, "metrics": {}})) }
            }),
        )
        .route(
            "/refuse",
            axum::routing::post(|| async {
                (
                    axum::http::StatusCode::BAD_REQUEST,
                    "cannot read that checkpoint",
                )
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

async fn live_stats(driver: &Driver) -> Value {
    driver.js(LIVE, json!([])).await
}

async fn submit_small(
    api: &reqwest::Client,
    base: &str,
    bearer: &str,
    models: &[Value],
    out: &Path,
) -> String {
    let r = api
        .post(format!("{base}/v1/merges"))
        .header("authorization", bearer)
        .json(&json!({"method": "linear", "models": models,
            "output": {"uri": file_url(out)}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Waits until the row of `id` shows `want` (`state/via`).
async fn wait_row(driver: &Driver, id: &str, want: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = driver.js(ROW_VIA, json!([id])).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "row {id}: wanted {want}, the page shows {got}; live: {}",
            live_stats(driver).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_headless_chromium() {
    let (Some(chromedriver), Some(chromium)) = (find("chromedriver"), find("chromium")) else {
        loud_skip(
            "dashboard browser test",
            "chromium / chromedriver not installed: run .ci/run or `apt-get install chromium chromium-driver`",
        );
        return;
    };
    // Every chunk waits 200 ms in the worker (failpoints, test builds only; 8 chunks in
    // flight), so the 1024-chunk merge runs ~25 s: long enough to be seen running and be
    // cancelled; the 25-chunk one runs ~1 s, several of the 250 ms polls that stand in for
    // notifications on SQLite (so its `running` state is seen as an event of its own).
    // SAFETY: set before the service (and any other thread of this test binary) starts.
    unsafe { std::env::set_var("LADLE_TEST_THROTTLE_MS", "200") };
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("dashboard");

    let work = tempfile::tempdir().unwrap();
    let root = work.path().canonicalize().unwrap();
    let small = [model(&root.join("a"), 24, 1), model(&root.join("b"), 24, 2)];
    let big = [
        model(&root.join("c"), 1024, 3),
        model(&root.join("d"), 1024, 4),
    ];
    let token = "dashboard-test-token-5d1e";
    let mut settings = test_settings(
        &root.join("data"),
        &format!("sqlite://{}", root.join("ladle.db").display()),
        vec![root.display().to_string()],
        None,
    );
    settings.auth = ladle::api::ApiAuth::new(vec![ladle::api::auth::token_digest(token)]);
    let (service, base) = start(&settings, Mode::Serve).await;
    let api = reqwest::Client::new();
    let bearer = format!("Bearer {token}");

    let driver = Driver::start(&chromedriver, &chromium).await;
    driver.goto(&format!("{base}/ui")).await;
    // Without a token the list cannot load: the 401 is shown in place.
    driver
        .wait_for(
            "the 401 in place",
            "return document.querySelector('.error-box code')?.textContent === 'unauthorized'",
            json!([]),
            Duration::from_secs(10),
        )
        .await;
    driver.type_into("#token", token).await;
    driver.click("#token-form button[type=submit]").await;
    driver
        .wait_for(
            "the job table",
            "return document.querySelector('#job-table') && !document.querySelector('.error-box')",
            json!([]),
            Duration::from_secs(10),
        )
        .await;
    // The page's SSE parser, fed one wire text cut at every size from 1 to 7 bytes: CRLF, CR
    // and LF line ends (CRLF split across two chunks), comments, multi-line data, ids.
    let parsed = driver
        .js(
            "const wire = 'event: state\\r\\nid: 5\\r\\ndata: {\"a\":1}\\r\\n\\r\\n: keep-alive\\n\\n' \
               + 'event: progress\\ndata: x\\ndata: y\\n\\ndata:z\\rid:7\\r\\r'; \
             const runs = []; \
             for (let step = 1; step <= 7; step++) { \
               const got = []; const p = new SseParser((n, d, i) => got.push([n, d, i])); \
               for (let i = 0; i < wire.length; i += step) p.push(wire.slice(i, i + step)); \
               runs.push(JSON.stringify(got)); \
             } \
             return runs",
            json!([]),
        )
        .await;
    let want = json!([
        ["state", "{\"a\":1}", "5"],
        ["progress", "x\ny", null],
        ["message", "z", "7"]
    ]);
    for run in parsed.as_array().unwrap() {
        let run: Value = serde_json::from_str(run.as_str().unwrap()).unwrap();
        assert_eq!(run, want);
    }

    // Marks this page load: a reload would lose it.
    driver
        .js("window.__loadedOnce = true; return 1", json!([]))
        .await;
    driver
        .wait_for(
            "the list's event stream",
            STREAMING,
            json!([]),
            Duration::from_secs(10),
        )
        .await;

    // 1. Submitted elsewhere (the API): appears in the open list and finishes there, both
    //    from `/v1/events` (the list was read before the job existed; nothing polls).
    let finished_id = submit_small(&api, &base, &bearer, &small, &root.join("soups/small")).await;
    driver
        .wait_for(
            "the new job's row",
            ROW_STATE,
            json!([finished_id]),
            Duration::from_secs(10),
        )
        .await;
    wait_row(
        &driver,
        &finished_id,
        "succeeded/stream",
        Duration::from_secs(60),
    )
    .await;
    let stats = live_stats(&driver).await;
    assert_eq!(stats["polls"], 0, "nothing polled: {stats}");
    assert!(
        stats["byEvent"]["state"].as_u64().unwrap_or(0) >= 2,
        "the row's states came as events: {stats}"
    );

    // 2. The submit form: a validation error in place, then a merge that runs.
    driver.click("#nav-submit").await;
    driver
        .js(
            "document.querySelector('#recipe-input').value = arguments[0]; return 1",
            json!([r#"{"method": "linear", "models": [], "output": {"uri": "file:///nowhere/"}}"#]),
        )
        .await;
    driver.click("#submit").await;
    let code = driver
        .wait_for(
            "the validation error",
            "return document.querySelector('#submit-result .error-box code')?.textContent",
            json!([]),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(code, "invalid_recipe");
    let recipe = json!({"method": "linear", "models": big,
        "output": {"uri": file_url(&root.join("soups/big"))}});
    driver
        .js(
            "document.querySelector('#recipe-input').value = arguments[0]; return 1",
            json!([serde_json::to_string_pretty(&recipe).unwrap()]),
        )
        .await;
    driver.click("#submit").await;
    let running_id = driver
        .wait_for(
            "the new job's page",
            "return document.querySelector('#job-id')?.textContent",
            json!([]),
            Duration::from_secs(10),
        )
        .await
        .as_str()
        .unwrap()
        .to_string();
    driver
        .wait_for(
            "the job to run with progress from its event stream",
            "const s = document.querySelector('h1 .state')?.dataset.state; \
             const l = document.querySelector('#progress-label'); \
             const p = l?.textContent || ''; \
             return s === 'running' && l.dataset.via === 'stream' \
               && p.includes(' read') && !p.includes(' 0 B read')",
            json!([]),
            Duration::from_secs(30),
        )
        .await;
    let stats = live_stats(&driver).await;
    assert_eq!(stats["mode"], "stream", "{stats}");
    assert!(
        stats["byEvent"]["progress"].as_u64().unwrap_or(0) >= 1,
        "progress came as `progress` events: {stats}"
    );

    // 3. The list: one finished and one running job, side by side.
    driver.click("#nav-jobs").await;
    driver
        .wait_for(
            "the running row",
            ROW_STATE,
            json!([running_id]),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(
        driver.js(ROW_STATE, json!([finished_id])).await,
        "succeeded"
    );
    assert_eq!(driver.js(ROW_STATE, json!([running_id])).await, "running");
    let ids = driver
        .js(
            "return [...document.querySelectorAll('#jobs td.id')].map(td => td.textContent)",
            json!([]),
        )
        .await;
    assert_eq!(
        ids,
        json!([running_id, finished_id]),
        "full ids, newest first"
    );
    driver
        .screenshot(&shots.join("jobs-finished-and-running.png"))
        .await;

    // 4. Cancel the running one from the list; `cancelled` arrives over the stream.
    driver
        .wait_for(
            "the list's event stream",
            STREAMING,
            json!([]),
            Duration::from_secs(10),
        )
        .await;
    driver
        .click(&format!(
            "#jobs tr[data-id=\"{running_id}\"] button[data-action=cancel]"
        ))
        .await;
    wait_row(
        &driver,
        &running_id,
        "cancelled/stream",
        Duration::from_secs(30),
    )
    .await;
    let v: Value = api
        .get(format!("{base}/v1/merges/{running_id}"))
        .header("authorization", &bearer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["state"], "cancelled", "{v}");
    driver
        .screenshot(&shots.join("jobs-after-cancel.png"))
        .await;

    // 5. The finished job's page: recipe, full progress, the output files of the manifest.
    driver
        .js(
            "location.hash = '#/merges/' + arguments[0]; return 1",
            json!([finished_id]),
        )
        .await;
    let files = driver
        .wait_for(
            "the output files",
            "return [...document.querySelectorAll('#files tbody td:first-child')].map(td => td.textContent).join(',')",
            json!([]),
            Duration::from_secs(10),
        )
        .await;
    assert!(
        files.as_str().unwrap().contains("model.safetensors"),
        "{files}"
    );
    let label = driver
        .js(
            "return document.querySelector('#progress-label').textContent",
            json!([]),
        )
        .await;
    assert!(label.as_str().unwrap().contains("2/2 tensors"), "{label}");
    // A finished job's stream sends the job and `done`, then ends: nothing more to follow.
    driver
        .wait_for(
            "the finished job's stream to close",
            "return window.__ladleLive.mode === 'done'",
            json!([]),
            Duration::from_secs(10),
        )
        .await;
    driver.screenshot(&shots.join("job-succeeded.png")).await;
    let stats = live_stats(&driver).await;
    assert_eq!(stats["polls"], 0, "nothing polled so far: {stats}");
    assert!(
        stats["byEvent"]["done"].as_u64().unwrap_or(0) >= 1,
        "{stats}"
    );

    // 6. A greedy soup's page: its evaluations as a table and a chart of score per step; a
    //    search whose evaluator refuses: the error with its code.
    let evaluator = start_evaluator().await;
    let greedy = |path: &str, out: &str| {
        json!({"method": "greedy_soup", "models": small,
            "evaluator": {"url": format!("{evaluator}{path}")},
            "output": {"uri": file_url(&root.join(out))}})
    };
    for (body, want) in [
        (greedy("/ok", "soups/greedy"), "succeeded"),
        (greedy("/refuse", "soups/refused"), "failed"),
    ] {
        let r = api
            .post(format!("{base}/v1/merges"))
            .header("authorization", &bearer)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
        let id = r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        driver
            .js(
                "location.hash = '#/merges/' + arguments[0]; return 1",
                json!([id]),
            )
            .await;
        driver
            .wait_for(
                "the search to end on its page",
                "return document.querySelector('h1 .state')?.dataset.state === arguments[0] \
                   && window.__ladleLive.mode === 'done'",
                json!([want]),
                Duration::from_secs(60),
            )
            .await;
        let job: Value = api
            .get(format!("{base}/v1/merges/{id}"))
            .header("authorization", &bearer)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if want == "succeeded" {
            let search = if job["search"].is_object() {
                &job["search"]
            } else {
                &job["result"]["search"]
            };
            let evals = search["evaluations"].as_array().unwrap().len();
            assert!(evals >= 2, "{job}");
            let shown = driver
                .js(
                    "return [document.querySelectorAll('#evaluations tbody tr').length, \
                             document.querySelectorAll('#score-chart circle').length]",
                    json!([]),
                )
                .await;
            assert_eq!(
                shown,
                json!([evals, evals]),
                "one row and one point per evaluation"
            );
            let method = driver
                .js(
                    "return document.querySelector('.facts dd').textContent",
                    json!([]),
                )
                .await;
            assert_eq!(method, "greedy_soup (linear)");
            driver.screenshot(&shots.join("job-greedy-soup.png")).await;
            // What Resubmit would send for a search is a request the API takes, for the same
            // stored recipe.
            let request = driver
                .js("return requestOf(arguments[0])", json!([job["recipe"]]))
                .await;
            let r = api
                .post(format!("{base}/v1/merges"))
                .header("authorization", &bearer)
                .json(&request)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 202, "{request}");
            let copy: Value = r.json().await.unwrap();
            assert_eq!(copy["recipe"], job["recipe"], "{request}");
        } else {
            let code = driver
                .js(
                    "return document.querySelector('.error-box code')?.textContent",
                    json!([]),
                )
                .await;
            assert_eq!(code, job["error"]["code"], "{job}");
            assert_eq!(code, "evaluator_failed");
        }
    }

    // 7. The fallback: the list's stream breaks and cannot be reopened for a while.
    driver.js(FETCH_WRAPPER, json!([])).await;
    driver
        .js("location.hash = '#/?kind=merges'; return 1", json!([]))
        .await;
    driver
        .wait_for(
            "the list's stream (through the wrapper)",
            "return window.__streams.length >= 1 && window.__ladleLive.mode === 'stream'",
            json!([]),
            Duration::from_secs(10),
        )
        .await;
    let streamed_id =
        submit_small(&api, &base, &bearer, &small, &root.join("soups/streamed")).await;
    wait_row(
        &driver,
        &streamed_id,
        "succeeded/stream",
        Duration::from_secs(60),
    )
    .await;
    let last_id = live_stats(&driver).await["lastEventId"].clone();
    assert!(last_id.is_string(), "events carry ids: {last_id}");
    driver
        .js(
            "window.__blockStreams = true; window.__cutStream(); return 1",
            json!([]),
        )
        .await;
    driver
        .wait_for(
            "the polling fallback",
            "return window.__ladleLive.mode === 'poll' && window.__ladleLive.polls > 0 \
               && document.querySelector('#live').textContent.includes('polling')",
            json!([]),
            Duration::from_secs(10),
        )
        .await;
    let polled_id = submit_small(&api, &base, &bearer, &small, &root.join("soups/polled")).await;
    wait_row(
        &driver,
        &polled_id,
        "succeeded/poll",
        Duration::from_secs(60),
    )
    .await;
    driver.screenshot(&shots.join("jobs-polling.png")).await;
    // The stream comes back: the page reconnects with the last id it had, and stops polling.
    driver
        .js("window.__blockStreams = false; return 1", json!([]))
        .await;
    driver
        .wait_for(
            "the reconnected stream",
            STREAMING,
            json!([]),
            Duration::from_secs(30),
        )
        .await;
    let streams = driver.js("return window.__streams", json!([])).await;
    let streams = streams.as_array().unwrap();
    assert!(streams.len() >= 3, "opened, refused, reopened: {streams:?}");
    let reopened = streams.last().unwrap();
    assert_eq!(
        reopened["url"].as_str().unwrap(),
        "/v1/events",
        "{reopened}"
    );
    assert_eq!(
        reopened["lastEventId"], last_id,
        "resumed after the last event"
    );
    assert!(
        streams.iter().all(|s| s["auth"] == true),
        "every stream sent the token: {streams:?}"
    );
    let polls = live_stats(&driver).await["polls"].clone();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let stats = live_stats(&driver).await;
    assert_eq!(stats["polls"], polls, "polling stopped: {stats}");
    assert_eq!(stats["mode"], "stream", "{stats}");
    assert!(stats["reconnects"].as_u64().unwrap_or(0) >= 1, "{stats}");

    // 8. A state filter: only the cancelled job is left in the list.
    driver.click("button[data-filter=cancelled]").await;
    driver
        .wait_for(
            "the cancelled filter",
            "const ids = [...document.querySelectorAll('#jobs tr')].map(r => r.dataset.id); \
             return ids.length === 1 && ids[0] === arguments[0]",
            json!([running_id]),
            Duration::from_secs(10),
        )
        .await;

    // 9. Resubmit the finished job: the form opens with its recipe, and the copy runs and
    //    finishes on its own page.
    driver
        .js(
            "location.hash = '#/merges/' + arguments[0]; return 1",
            json!([finished_id]),
        )
        .await;
    driver
        .wait_for(
            "the resubmit button on the settled page (it re-renders until its stream closed)",
            "return document.querySelector('#resubmit') && window.__ladleLive.mode === 'done'",
            json!([]),
            Duration::from_secs(10),
        )
        .await;
    driver.click("#resubmit").await;
    let draft = driver
        .wait_for(
            "the form with the recipe",
            "return document.querySelector('#recipe-input')?.value",
            json!([]),
            Duration::from_secs(10),
        )
        .await;
    assert!(draft.as_str().unwrap().contains("soups/small"), "{draft}");
    driver.click("#submit").await;
    let copy_id = driver
        .wait_for(
            "the copy's page",
            "const id = document.querySelector('#job-id')?.textContent; \
             return id && id !== arguments[0] ? id : ''",
            json!([finished_id]),
            Duration::from_secs(10),
        )
        .await;
    driver
        .wait_for(
            "the copy to finish on its page",
            "return document.querySelector('h1 .state')?.dataset.state === 'succeeded' \
               && window.__ladleLive.mode === 'done'",
            json!([]),
            Duration::from_secs(60),
        )
        .await;
    let recipe_of = |id: Value| {
        let (api, base, bearer) = (&api, &base, &bearer);
        async move {
            let v: Value = api
                .get(format!("{base}/v1/merges/{}", id.as_str().unwrap()))
                .header("authorization", bearer)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["recipe"].clone()
        }
    };
    // The same merge; `mergekit_config` records how each request was written (the copy's
    // form spells out the defaults), so it is compared apart.
    let (mut copy, mut original) = (
        recipe_of(copy_id).await,
        recipe_of(json!(finished_id)).await,
    );
    for text in [
        copy["mergekit_config"].take(),
        original["mergekit_config"].take(),
    ] {
        let text = text.as_str().unwrap_or_default().to_string();
        assert!(text.starts_with("merge_method: linear\n"), "{text}");
        assert!(text.contains("/a\n"), "names model a: {text}");
    }
    assert_eq!(copy, original, "the copy has the same recipe");
    assert_eq!(
        live_stats(&driver).await["polls"],
        polls,
        "no polling since"
    );
    assert_eq!(
        driver
            .js("return window.__loadedOnce === true", json!([]))
            .await,
        true,
        "the page was reloaded"
    );
    let live = driver
        .js(
            "return document.querySelector('#live').textContent",
            json!([]),
        )
        .await;
    println!("dashboard updates: {live}");

    let _ = driver.cmd(reqwest::Method::DELETE, "", Value::Null).await;
    drop(driver);
    service.shutdown().await;
}

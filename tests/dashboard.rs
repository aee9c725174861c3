//! The `/ui` dashboard in a real headless browser: Debian's `chromium` driven over WebDriver
//! (`chromium-driver`'s `chromedriver`, plain HTTP from here), against the real service with
//! bearer-token auth. The page is loaded once and never reloaded: a merge submitted over the
//! API appears in the list and finishes there; a merge submitted through the form (after a
//! validation error shown in place) runs, is cancelled from the list, and ends `cancelled`.
//! Screenshots go to `<target>/dashboard/`. `.ci/run` installs chromium and chromium-driver;
//! without them this test prints a loud SKIPPED.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use ladle::service::Mode;
use serde_json::{Value, json};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(bin))
            .find(|p| p.is_file())
    })
}

/// chromedriver on a free port; killed on drop.
struct Driver {
    child: Child,
    base: String,
    http: reqwest::Client,
    session: String,
    _profile: tempfile::TempDir,
}

impl Driver {
    async fn start(chromedriver: &Path, chromium: &Path) -> Driver {
        let port = free_port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = match http.get(format!("{base}/status")).send().await {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .ok()
                    .is_some_and(|v| v["value"]["ready"] == true),
                Err(_) => false,
            };
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.display().to_string(),
                "args": ["--headless", "--no-sandbox", "--disable-gpu",
                         "--disable-background-networking", "--no-first-run",
                         "--disable-dev-shm-usage", "--window-size=1400,1000",
                         format!("--user-data-dir={}", profile.path().display())],
            },
        }}});
        let r: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {r}"))
            .to_string();
        Driver {
            child,
            base,
            http,
            session,
            _profile: profile,
        }
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut req = self.http.request(method.clone(), url);
        if method == reqwest::Method::POST {
            req = req.json(&body);
        }
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        assert!(
            v["value"].get("error").is_none(),
            "WebDriver {method} {path}: {v}"
        );
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", json!({"url": url}))
            .await;
    }

    async fn js(&self, script: &str, args: Value) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": args}),
        )
        .await
    }

    async fn element(&self, css: &str) -> String {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        v[ELEMENT].as_str().unwrap().to_string()
    }

    async fn click(&self, css: &str) {
        let e = self.element(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            json!({}),
        )
        .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            json!({"text": text}),
        )
        .await;
    }

    /// Polls `script` (returning a truthy value when done) until it holds.
    async fn wait_for(&self, what: &str, script: &str, args: Value, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.js(script, args.clone()).await;
            if !(v.is_null() || v == false || v == "") {
                return v;
            }
            if Instant::now() > deadline {
                let page = self
                    .js("return document.querySelector('main').innerText", json!([]))
                    .await;
                panic!("timed out waiting for {what}; the page shows:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&self, path: &Path) {
        let v = self
            .cmd(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap();
        assert_eq!(&png[..4], b"\x89PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
        println!("screenshot: {}", path.display());
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
    // cancelled; the 3-chunk one takes well under a second more than unthrottled.
    // SAFETY: set before the service (and any other thread of this test binary) starts.
    unsafe { std::env::set_var("LADLE_TEST_THROTTLE_MS", "200") };
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("dashboard");

    let work = tempfile::tempdir().unwrap();
    let root = work.path().canonicalize().unwrap();
    let small = [model(&root.join("a"), 2, 1), model(&root.join("b"), 2, 2)];
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
    // Marks this page load: a reload would lose it.
    driver
        .js("window.__loadedOnce = true; return 1", json!([]))
        .await;

    // 1. Submitted elsewhere (the API): appears in the open list and finishes there.
    let r = api
        .post(format!("{base}/v1/merges"))
        .header("authorization", &bearer)
        .json(&json!({"method": "linear", "models": small,
            "output": {"uri": file_url(&root.join("soups/small"))}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let finished_id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    driver
        .wait_for(
            "the new job's row",
            ROW_STATE,
            json!([finished_id]),
            Duration::from_secs(10),
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while driver.js(ROW_STATE, json!([finished_id])).await != "succeeded" {
        assert!(Instant::now() < deadline, "the row never showed succeeded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

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
            "the job to run with progress",
            "const s = document.querySelector('h1 .state')?.dataset.state; \
             const p = document.querySelector('#progress-label')?.textContent || ''; \
             return s === 'running' && p.includes(' read') && !p.includes(' 0 B read')",
            json!([]),
            Duration::from_secs(30),
        )
        .await;

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

    // 4. Cancel the running one from the list.
    driver
        .click(&format!(
            "#jobs tr[data-id=\"{running_id}\"] button[data-action=cancel]"
        ))
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while driver.js(ROW_STATE, json!([running_id])).await != "cancelled" {
        assert!(Instant::now() < deadline, "the row never showed cancelled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    driver.screenshot(&shots.join("job-succeeded.png")).await;
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

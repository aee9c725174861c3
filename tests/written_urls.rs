//! URLs are shown as the request wrote them (issue 11: "error bodies and messages never
//! contain ... resolved paths the user did not write"), end to end: the real service over HTTP
//! on a real database (SQLite always; Postgres too when `LADLE_TEST_POSTGRES_URL` is set, else a
//! loud SKIP line), and the real `ladle merge`.
//!
//! The allowed root is configured through a link (`R-shown -> R-canon`) and holds a folder and
//! a link to it (`inner-link -> inner-real`); every request names its models and output through
//! both links. The stored job (`GET` of it, the listing), its event stream (`state`,
//! `progress`, `done`), the manifest, the model card, an analysis and the message of every
//! refusal (`checkpoint_not_found`, `checkpoint_malformed` for a missing shard, a bad header
//! and a file link to a bad file, `path_outside_roots` for links leaving the root,
//! `output_conflict`, `output_in_use`) name the files as written and never `R-canon`,
//! `inner-real` nor the folder outside. Two jobs to one output spelled differently (through the
//! link and not, with a trailing slash, as `file://localhost/…`) still conflict: the queue keys
//! outputs by their resolved folder.

mod common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::procs::LADLE;
use common::*;
use ladle::service::Mode;
use serde_json::{Value, json};

/// The strings no answer may carry: the resolved root, the resolved folder behind the link,
/// the folder outside the root (and the secret in it).
const HIDDEN: [&str; 3] = ["R-canon", "inner-real", "outside-folder"];

struct World {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    /// The root as configured and written: `<base>/R-shown`, a link to `<base>/R-canon`.
    shown: PathBuf,
    client: reqwest::Client,
    settings: ladle::config::Settings,
    _pg: Option<PgDb>,
}

impl World {
    /// `<root as written>/inner-link/<rest>` as a `file://` URL.
    fn url(&self, rest: &str) -> String {
        file_url(&self.shown.join("inner-link").join(rest))
    }
}

fn tensors(seed: u64) -> Vec<RawTensor> {
    vec![
        f32_tensor("a.w", &[8, 4], seed),
        f32_tensor("b.w", &[16], seed + 1),
    ]
}

fn model(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors_bytes(&tensors(seed)),
    )
    .unwrap();
    std::fs::write(dir.join("config.json"), br#"{"model_type": "llama"}"#).unwrap();
}

/// The layout of the module text, plus the inputs the refusals need.
fn layout() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().canonicalize().unwrap();
    let canon = base.join("R-canon");
    let real = canon.join("inner-real");
    let outside = base.join("outside-folder");
    model(&real.join("m1"), 1);
    model(&real.join("m2"), 2);
    // A file input that is a link to another name inside the root.
    symlink("m2/model.safetensors", real.join("filelink.safetensors")).unwrap();
    // No checkpoint at all.
    std::fs::create_dir_all(real.join("empty")).unwrap();
    // A sharded model missing a shard.
    let shards = write_sharded(&real.join("sh"), &tensors(3), 2);
    std::fs::remove_file(real.join("sh").join(&shards[1].0)).unwrap();
    // A header that is not one, in a folder and behind a file link.
    std::fs::create_dir_all(real.join("bad")).unwrap();
    let mut bad = 5000u64.to_le_bytes().to_vec();
    bad.extend_from_slice(b"not a header at all");
    std::fs::write(real.join("bad/model.safetensors"), bad).unwrap();
    symlink("bad/model.safetensors", real.join("badlink.safetensors")).unwrap();
    // Links that leave the root: a model folder, and a side file of a model.
    model(&outside.join("private"), 9);
    std::fs::write(outside.join("secret"), b"very-secret").unwrap();
    symlink(outside.join("private"), real.join("escape")).unwrap();
    model(&real.join("leaky"), 4);
    symlink(outside.join("secret"), real.join("leaky/tokenizer.json")).unwrap();
    symlink("inner-real", canon.join("inner-link")).unwrap();
    let shown = base.join("R-shown");
    symlink("R-canon", &shown).unwrap();
    (tmp, base, shown)
}

async fn world(postgres: bool) -> Option<World> {
    let (tmp, base, shown) = layout();
    let (db_url, pg) = if postgres {
        let Some(pg) = PgDb::create().await else {
            loud_skip(
                "written URLs on Postgres",
                "LADLE_TEST_POSTGRES_URL is not set",
            );
            return None;
        };
        (pg.url.clone(), Some(pg))
    } else {
        (
            format!("sqlite://{}", base.join("ladle.db").display()),
            None,
        )
    };
    let settings = test_settings(
        &base.join("data"),
        &db_url,
        vec![shown.display().to_string()],
        None,
    );
    Some(World {
        _tmp: tmp,
        base,
        shown,
        client: reqwest::Client::new(),
        settings,
        _pg: pg,
    })
}

/// `text` names none of [`HIDDEN`].
fn assert_hidden(what: &str, text: &str) {
    for h in HIDDEN {
        assert!(!text.contains(h), "{what} shows {h}: {text}");
    }
}

fn linear(models: &[String], out: &str, weights: &[f64]) -> Value {
    json!({
        "method": "linear",
        "models": models
            .iter()
            .zip(weights)
            .map(|(m, w)| json!({"uri": m, "weight": w}))
            .collect::<Vec<_>>(),
        "output": {"uri": out},
    })
}

async fn get(w: &World, url: &str) -> String {
    w.client
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Submit, then read the job's whole event stream (it ends after `done`); the stream's text
/// and the terminal job.
async fn run(w: &World, base: &str, body: &Value) -> (String, Value) {
    let (status, v) = submit(&w.client, base, body).await;
    assert_eq!(status, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let events = w
        .client
        .get(format!("{base}/v1/merges/{id}/events"))
        .send()
        .await
        .unwrap();
    let text = tokio::time::timeout(Duration::from_secs(60), events.text())
        .await
        .expect("the event stream ends after done")
        .unwrap();
    assert!(text.contains("event: done"), "{text}");
    let done = wait_terminal(&w.client, base, &id, Duration::from_secs(60)).await;
    (text, done)
}

/// A job that fails with `code`, its message naming `names`: the message.
async fn fails(w: &World, base: &str, body: &Value, code: &str, names: &str) -> String {
    let (events, done) = run(w, base, body).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error"]["code"], code, "{done}");
    let message = done["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains(names), "{code}: {message}");
    assert_hidden(code, &done.to_string());
    assert_hidden(code, &events);
    message
}

async fn written_urls(postgres: bool) {
    let Some(w) = world(postgres).await else {
        return;
    };
    let (service, base) = start(&w.settings, Mode::Serve).await;
    // A folder with a trailing slash (shown without it) and a file that is a link.
    let m1w = format!("{}/", w.url("m1"));
    let m1 = w.url("m1");
    let m2 = w.url("filelink.safetensors");
    let out = w.url("out-ok");

    // A merge through the links succeeds, and everything about it names them.
    let body = linear(&[m1w.clone(), m2.clone()], &out, &[0.5, 0.5]);
    let (events, done) = run(&w, &base, &body).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    for text in [&events, &done.to_string()] {
        assert_hidden("the job", text);
        assert!(text.contains(&out) && text.contains(&m1), "{text}");
    }
    // `progress` events come only when the job moved (a tiny job may have none); every event
    // of the stream is checked above.
    assert!(events.contains("event: state"), "{events}");
    let recipe = &done["recipe"]["recipe"];
    let recipe = if recipe.is_null() {
        &done["recipe"]
    } else {
        recipe
    };
    assert_eq!(recipe["models"][0]["uri"], m1w.as_str(), "{recipe}");
    assert_eq!(recipe["models"][1]["uri"], m2.as_str(), "{recipe}");
    assert_eq!(recipe["output"]["uri"], out.as_str(), "{recipe}");
    assert_eq!(done["result"]["uri"], out.as_str(), "{done}");
    let id = done["id"].as_str().unwrap();
    let listing = get(&w, &format!("{base}/v1/merges")).await;
    assert!(listing.contains(id) && listing.contains(&out), "{listing}");
    assert_hidden("the listing", &listing);
    let soup = w.base.join("R-canon/inner-real/out-ok");
    let manifest_text = std::fs::read_to_string(soup.join("ladle-manifest.json")).unwrap();
    assert_hidden("the manifest", &manifest_text);
    let manifest: Value = serde_json::from_str(&manifest_text).unwrap();
    assert_eq!(manifest["inputs"][0]["uri"], m1.as_str(), "{manifest}");
    assert_eq!(manifest["inputs"][1]["uri"], m2.as_str(), "{manifest}");
    let shown_path = w.shown.join("inner-link");
    let shown_path = shown_path.to_string_lossy();
    let shown_path = shown_path.trim_start_matches('/');
    assert_eq!(
        manifest["inputs"][1]["files"][0]["path"],
        format!("{shown_path}/filelink.safetensors"),
        "{manifest}"
    );
    assert_eq!(manifest["recipe"]["output"]["uri"], out.as_str());
    assert_hidden(
        "the model card",
        &std::fs::read_to_string(soup.join("README.md")).unwrap(),
    );
    // An analysis of the same models.
    let r = w
        .client
        .post(format!("{base}/v1/analyses"))
        .json(&json!({"models": [m1, m2]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let a: Value = r.json().await.unwrap();
    let a = wait_job(
        &w.client,
        &base,
        "analyses",
        a["id"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(a["state"], "succeeded", "{a}");
    assert!(a.to_string().contains(&m1), "{a}");
    assert_hidden("the analysis", &a.to_string());

    // Refusals while the job runs name the files as written.
    let with =
        |first: &str, out: &str| linear(&[w.url(first), m1.clone()], &w.url(out), &[1.0, 1.0]);
    for (i, (first, code, named)) in [
        ("empty", "checkpoint_not_found", "empty"),
        (
            "sh",
            "checkpoint_malformed",
            "sh/model.safetensors.index.json",
        ),
        ("bad", "checkpoint_malformed", "bad/model.safetensors"),
        (
            "badlink.safetensors",
            "checkpoint_malformed",
            "badlink.safetensors",
        ),
        ("leaky", "path_outside_roots", "leaky/tokenizer.json"),
    ]
    .into_iter()
    .enumerate()
    {
        let body = with(first, &format!("o{i}"));
        let m = fails(&w, &base, &body, code, &w.url(named)).await;
        if first == "badlink.safetensors" {
            // Named by the link, never by the file it leads to.
            assert!(!m.contains("bad/model.safetensors"), "{m}");
        }
    }
    // Another recipe into the finished soup's folder.
    let other = linear(&[m1.clone(), w.url("m2")], &out, &[0.25, 0.75]);
    fails(&w, &base, &other, "output_conflict", &out).await;
    // A model folder that is a link out of the root: refused at submission.
    let (status, err) = submit(&w.client, &base, &with("escape", "o6")).await;
    assert_eq!(status, 403, "{err}");
    assert_eq!(err["code"], "path_outside_roots", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains(&w.url("escape")),
        "{err}"
    );
    assert_hidden("path_outside_roots", &err.to_string());
    service.shutdown().await;

    // One live job per output folder, however it is spelled. No workers: the first job stays
    // queued.
    let (service, base) = start(&w.settings, Mode::Api).await;
    let first = linear(&[m1.clone(), w.url("m2")], &w.url("out-q"), &[0.5, 0.5]);
    let (status, v) = submit(&w.client, &base, &first).await;
    assert_eq!(status, 202, "{v}");
    assert_hidden("a queued job", &v.to_string());
    for spelling in [
        file_url(&w.shown.join("inner-real/out-q")),
        format!("{}/", w.url("out-q")),
        format!(
            "file://localhost{}",
            w.shown.join("inner-link/out-q").display()
        ),
        file_url(&w.base.join("R-canon/inner-real/out-q")),
    ] {
        let body = linear(&[m1.clone(), w.url("m2")], &spelling, &[0.3, 0.7]);
        let (status, err) = submit(&w.client, &base, &body).await;
        assert_eq!(status, 409, "{spelling}: {err}");
        assert_eq!(err["code"], "output_in_use", "{spelling}: {err}");
        let message = err["message"].as_str().unwrap();
        // The refusal names this request's output as it wrote it, not the other job's.
        assert!(message.contains(&spelling), "{message}");
        // Nothing hidden that this request did not write itself.
        for h in HIDDEN.iter().filter(|h| !spelling.contains(*h)) {
            assert!(!err.to_string().contains(h), "{spelling}: {err}");
        }
    }
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn written_urls_sqlite() {
    written_urls(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn written_urls_postgres() {
    written_urls(true).await;
}

/// `ladle merge` with a relative model path in a mergekit YAML recipe, read through the root's
/// link and the folder link: the manifest names the path as written (made absolute from the
/// recipe's folder as given), never the resolved folders.
#[test]
fn one_shot_records_relative_paths_as_written() {
    let (_tmp, base, shown) = layout();
    std::fs::write(
        shown.join("recipe.yml"),
        "merge_method: linear\nmodels:\n  - model: inner-link/m1\n    parameters: {weight: 0.5}\n  - model: ./inner-link/m2\n    parameters: {weight: 0.5}\n",
    )
    .unwrap();
    let o = Command::new(LADLE)
        .current_dir(&base)
        .args([
            "merge",
            "--quiet",
            "R-shown/recipe.yml",
            "R-shown/inner-link/cli-out",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(base.join("R-canon/inner-real/cli-out/ladle-manifest.json"))
        .unwrap();
    assert_hidden("the one-shot manifest", &text);
    let manifest: Value = serde_json::from_str(&text).unwrap();
    let m1 = file_url(&shown.join("inner-link/m1"));
    assert!(
        manifest["inputs"][0]["uri"]
            .as_str()
            .unwrap()
            .starts_with(&m1),
        "{manifest}"
    );
    assert!(
        manifest["recipe"]["output"]["uri"]
            .as_str()
            .unwrap()
            .ends_with("R-shown/inner-link/cli-out"),
        "{manifest}"
    );
    // A refusal names the file as written too.
    std::fs::write(
        shown.join("bad.yml"),
        "merge_method: linear\nmodels:\n  - model: inner-link/bad\n    parameters: {weight: 0.5}\n  - model: inner-link/m1\n    parameters: {weight: 0.5}\n",
    )
    .unwrap();
    let o = Command::new(LADLE)
        .current_dir(&base)
        .args([
            "merge",
            "--quiet",
            "R-shown/bad.yml",
            "R-shown/inner-link/cli-bad",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("R-shown/inner-link/bad/model.safetensors"),
        "{err}"
    );
    assert_hidden("the one-shot refusal", &err);
}

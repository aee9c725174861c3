//! Confinement by handle (`src/storage/local.rs`), end to end: the real service over HTTP on a
//! real database (SQLite always; Postgres too when `LADLE_TEST_POSTGRES_URL` is set, else a
//! loud SKIP line) and the real `ladle merge`. Every case plants a symbolic link, inside an
//! allowed root, that leads to a folder outside every root, and checks that the request or the
//! job is refused with `path_outside_roots` naming the file as the request wrote it (or, for
//! an output folder swapped for a link mid-job, that the job's writes stay in the folder it
//! opened), that nothing outside was read into an answer, written or deleted, and that nothing
//! half-written is left; plus a link that stays inside the root, which still works.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::procs::{LADLE, LadleProc};
use common::*;
use ladle::service::Mode;
use serde_json::{Value, json};

const SECRET: &[u8] = b"root:$6$very-secret-hash:19000:0:99999:7:::\n";

/// An allowed root and a folder outside it, with a service on one backend.
struct World {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    data: PathBuf,
    db_url: String,
    settings: ladle::config::Settings,
    client: reqwest::Client,
    _pg: Option<PgDb>,
}

async fn world(postgres: bool, what: &str) -> Option<World> {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().canonicalize().unwrap();
    let (db_url, pg) = if postgres {
        let Some(pg) = PgDb::create().await else {
            loud_skip(
                &format!("confinement on Postgres: {what}"),
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
    let root = base.join("root");
    let outside = base.join("outside");
    let data = base.join("data");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("shadow"), SECRET).unwrap();
    let settings = test_settings(&data, &db_url, vec![root.display().to_string()], None);
    Some(World {
        _tmp: tmp,
        root,
        outside,
        data,
        db_url,
        settings,
        client: reqwest::Client::new(),
        _pg: pg,
    })
}

fn tensors(seed: u64) -> Vec<RawTensor> {
    vec![
        f32_tensor("a.w", &[8, 4], seed),
        f32_tensor("b.w", &[16], seed + 1),
    ]
}

/// A model folder: `model.safetensors` and `config.json`.
fn model(dir: &Path, seed: u64) {
    model_with(dir, &tensors(seed));
}

fn model_with(dir: &Path, tensors: &[RawTensor]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("model.safetensors"), safetensors_bytes(tensors)).unwrap();
    std::fs::write(dir.join("config.json"), br#"{"model_type": "llama"}"#).unwrap();
}

/// Every file under `dir` (relative names, links listed as links), sorted.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let e = e.unwrap();
            let p = e.path();
            let name = p.strip_prefix(base).unwrap().display().to_string();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                out.push(format!("{name}/"));
                walk(base, &p, out);
            } else if ft.is_symlink() {
                out.push(format!("{name} ->"));
            } else {
                out.push(name);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn linear(models: &[String], out: &Path) -> Value {
    json!({
        "method": "linear",
        "models": models.iter().map(|m| json!({"uri": m, "weight": 1.0})).collect::<Vec<_>>(),
        "output": {"uri": file_url(out)},
    })
}

/// The text of an answer must not carry the secret, nor where the link leads.
fn assert_no_leak(w: &World, text: &str) {
    assert!(!text.contains("very-secret"), "{text}");
    assert!(!text.contains(&*w.outside.to_string_lossy()), "{text}");
}

/// Submit; the request is refused at once (403) or the job fails, with `path_outside_roots`
/// either way. Returns the error object.
async fn refused(w: &World, base: &str, route: &str, body: &Value) -> Value {
    let r = w
        .client
        .post(format!("{base}/v1/{route}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    let err = if status == 202 {
        let id = v["id"].as_str().unwrap().to_string();
        let done = wait_route(w, base, route, &id).await;
        assert_eq!(done["state"], "failed", "{done}");
        done["error"].clone()
    } else {
        assert_eq!(status, 403, "{v}");
        v.clone()
    };
    assert_eq!(err["code"], "path_outside_roots", "{err}");
    assert_no_leak(w, &err.to_string());
    err
}

async fn wait_route(w: &World, base: &str, route: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: Value = w
            .client
            .get(format!("{base}/v1/{route}/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let state = v["state"].as_str().unwrap_or_default().to_string();
        if ["succeeded", "failed", "cancelled"].contains(&state.as_str()) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{route} {id} stuck in {state}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Finding 2 over HTTP: links inside input folders to files outside, for merges and analyses;
/// and a link that stays inside the root, which works.
async fn reads_through_links(postgres: bool) {
    let Some(w) = world(postgres, "reads through links").await else {
        return;
    };
    let (service, base) = start(&w.settings, Mode::Serve).await;
    let r = &w.root;
    model(&r.join("m2"), 2);
    let m2 = file_url(&r.join("m2"));
    std::fs::write(
        w.outside.join("private.safetensors"),
        safetensors_bytes(&tensors(9)),
    )
    .unwrap();
    std::fs::create_dir_all(w.outside.join("private")).unwrap();
    write_sharded(&w.outside.join("private"), &tensors(9), 2);

    // tokenizer.json -> a file outside (the one-line /etc/shadow of the probe).
    model(&r.join("tok"), 1);
    symlink(w.outside.join("shadow"), r.join("tok/tokenizer.json")).unwrap();
    // model.safetensors -> a private model outside.
    std::fs::create_dir_all(r.join("weights")).unwrap();
    symlink(
        w.outside.join("private.safetensors"),
        r.join("weights/model.safetensors"),
    )
    .unwrap();
    // A sharded folder whose index is real but one shard is a link out; and one whose index is
    // a link out (relative, through `..`).
    let shards = write_sharded(&r.join("shard"), &tensors(3), 2);
    std::fs::remove_file(r.join("shard").join(&shards[1].0)).unwrap();
    symlink(
        w.outside.join("private").join(&shards[1].0),
        r.join("shard").join(&shards[1].0),
    )
    .unwrap();
    std::fs::create_dir_all(r.join("index")).unwrap();
    for (name, _) in write_sharded(&r.join("index"), &tensors(3), 2) {
        assert!(r.join("index").join(name).exists());
    }
    std::fs::remove_file(r.join("index/model.safetensors.index.json")).unwrap();
    symlink(
        "../../outside/private/model.safetensors.index.json",
        r.join("index/model.safetensors.index.json"),
    )
    .unwrap();
    // The model folder itself a link out.
    symlink(w.outside.join("private"), r.join("folder-link")).unwrap();

    for (i, bad) in ["tok", "weights", "shard", "index", "folder-link"]
        .iter()
        .enumerate()
    {
        let out = r.join(format!("out-{i}"));
        let err = refused(
            &w,
            &base,
            "merges",
            &linear(&[file_url(&r.join(bad)), m2.clone()], &out),
        )
        .await;
        assert!(
            err["message"].as_str().unwrap_or_default().contains(bad),
            "{bad}: {err}"
        );
        // Refused while planning: nothing written, not even the output folder.
        assert!(!out.exists(), "{bad}: {:?}", tree(&out));
    }
    // Analyses over a linked model answer nothing about the private weights.
    for bad in ["weights", "shard", "folder-link"] {
        refused(
            &w,
            &base,
            "analyses",
            &json!({"models": [file_url(&r.join(bad)), m2]}),
        )
        .await;
    }

    // Links that stay inside the root work: a relative link to a shared tokenizer, the
    // weights linked from another folder, and an absolute link back into the root.
    std::fs::create_dir_all(r.join("shared")).unwrap();
    std::fs::write(r.join("shared/tokenizer.json"), br#"{"version": "1.0"}"#).unwrap();
    std::fs::create_dir_all(r.join("inside")).unwrap();
    symlink("../shared/tokenizer.json", r.join("inside/tokenizer.json")).unwrap();
    symlink(
        r.join("m2/model.safetensors"),
        r.join("inside/model.safetensors"),
    )
    .unwrap();
    symlink("../m2/config.json", r.join("inside/config.json")).unwrap();
    let out = r.join("out-inside");
    let (status, v) = submit(
        &w.client,
        &base,
        &linear(&[file_url(&r.join("inside")), m2.clone()], &out),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let done = wait_terminal(
        &w.client,
        &base,
        v["id"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        br#"{"version": "1.0"}"#
    );
    // The soup of a model with itself: the model's tensors (read through the links).
    let got = common::soup::read_output_dir(&out);
    let want = common::soup::read_tensors(&common::soup::local_files(&r.join("m2")));
    assert_eq!(got.len(), want.len());
    assert!(out.join("ladle-manifest.json").exists());
    // The outside folder is as it was.
    assert_eq!(std::fs::read(w.outside.join("shadow")).unwrap(), SECRET);
    assert_eq!(
        tree(&w.outside),
        vec![
            "private.safetensors".to_string(),
            "private/".into(),
            "private/model-00001-of-00002.safetensors".into(),
            "private/model-00002-of-00002.safetensors".into(),
            "private/model.safetensors.index.json".into(),
            "shadow".into(),
        ]
    );
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_through_links_sqlite() {
    reads_through_links(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_through_links_postgres() {
    reads_through_links(true).await;
}

/// A trajectory folder with a checkpoint linked out of the roots, then with a checkpoint
/// whose weights are: the whole listing is refused (403 `path_outside_roots`; leaving the
/// entry out would change what a selection picks), naming the entry under the folder as the
/// request wrote it (here through an alias link inside the root), never the resolved folder
/// nor the link's target. Without the link the same request merges.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trajectory_entries_linked_out_are_refused_by_name() {
    let Some(w) = world(false, "trajectory links").await else {
        return;
    };
    let (service, base) = start(&w.settings, Mode::Serve).await;
    let r = &w.root;
    let run = r.join("run");
    for i in 1..=2u64 {
        model(&run.join(format!("checkpoint-{i}")), i);
    }
    model(&w.outside.join("private"), 9);
    symlink(w.outside.join("private"), run.join("checkpoint-3")).unwrap();
    symlink("run", r.join("alias")).unwrap();
    let written = file_url(&r.join("alias"));
    let body = json!({
        "method": "linear",
        "trajectory": {"uri": format!("{written}/"), "select": {"last": 2}},
        "output": {"uri": file_url(&r.join("out-t"))},
    });
    let resolved = run.display().to_string();
    let err = refused(&w, &base, "merges", &body).await;
    let msg = err["message"].as_str().unwrap_or_default();
    assert!(msg.contains(&format!("{written}/checkpoint-3 ")), "{msg}");
    assert!(!msg.contains(&resolved), "{msg}");
    // A checkpoint folder whose weights are linked out.
    std::fs::remove_file(run.join("checkpoint-3")).unwrap();
    model(&run.join("checkpoint-3"), 3);
    std::fs::remove_file(run.join("checkpoint-3/model.safetensors")).unwrap();
    symlink(
        w.outside.join("private/model.safetensors"),
        run.join("checkpoint-3/model.safetensors"),
    )
    .unwrap();
    let err = refused(&w, &base, "merges", &body).await;
    let msg = err["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&format!("{written}/checkpoint-3/model.safetensors")),
        "{msg}"
    );
    assert!(!msg.contains(&resolved), "{msg}");
    assert!(!r.join("out-t").exists(), "{:?}", tree(&r.join("out-t")));
    // The link gone, the same request merges.
    std::fs::remove_dir_all(run.join("checkpoint-3")).unwrap();
    let (status, v) = submit(&w.client, &base, &body).await;
    assert_eq!(status, 202, "{v}");
    let done = wait_terminal(
        &w.client,
        &base,
        v["id"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(r.join("out-t/ladle-manifest.json").exists());
    service.shutdown().await;
}

/// Run once by the test evaluator, on its first call.
type Hook = Arc<Mutex<Option<Box<dyn FnOnce() + Send>>>>;

/// An evaluator that scores every candidate 1.0 (or answers 422), and runs `on_call` first.
async fn evaluator(fail: bool, on_call: Hook) -> String {
    let app = axum::Router::new().route(
        "/evaluate",
        axum::routing::post(move |_body: axum::Json<Value>| {
            let on_call = on_call.clone();
            async move {
                if let Some(f) = on_call.lock().unwrap().take() {
                    f();
                }
                if fail {
                    (
                        axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                        axum::Json(json!({"error": "no"})),
                    )
                } else {
                    (
                        axum::http::StatusCode::OK,
                        axum::Json(json!({"score": 1.0})),
                    )
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/evaluate")
}

/// Finding 1: a link planted in a greedy soup's scratch folder before a worker claims the job
/// (and another while a candidate is being evaluated) is removed as a link; the folder it
/// points to keeps every file. The scratch folder and an empty `.ladle-scratch` are gone
/// afterwards, also when the search fails.
async fn greedy_scratch_links(postgres: bool) {
    let Some(w) = world(postgres, "greedy scratch links").await else {
        return;
    };
    let victim = w.outside.join("victim");
    std::fs::create_dir_all(victim.join("deep")).unwrap();
    std::fs::write(victim.join("a.txt"), b"a").unwrap();
    std::fs::write(victim.join("deep/b.txt"), b"b").unwrap();
    let before = tree(&w.outside);
    let r = w.root.clone();
    for i in 0..3 {
        model(&r.join(format!("g{i}")), i);
    }
    let (api, base) = start(&w.settings, Mode::Api).await;
    for fail in [false, true] {
        let scratch_root = r.join("g/.ladle-scratch");
        let planted: Arc<Mutex<Option<PathBuf>>> = Arc::default();
        let planted2 = planted.clone();
        let victim2 = victim.clone();
        let hook: Box<dyn FnOnce() + Send> = Box::new(move || {
            if let Some(dir) = planted2.lock().unwrap().clone() {
                let _ = symlink(&victim2, dir.join("during"));
                let _ = symlink(victim2.join("a.txt"), dir.join("file-link"));
            }
        });
        let url = evaluator(fail, Arc::new(Mutex::new(Some(hook)))).await;
        let body = json!({
            "method": "greedy_soup",
            "models": (0..3).map(|i| json!({"uri": file_url(&r.join(format!("g{i}"))), "score": i as f64})).collect::<Vec<_>>(),
            "evaluator": {"url": url},
            "output": {"uri": file_url(&r.join("g/soup"))},
        });
        let (status, v) = submit(&w.client, &base, &body).await;
        assert_eq!(status, 202, "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        // Planted before any worker runs: the job id is in the 202 answer.
        let dir = scratch_root.join(&id);
        std::fs::create_dir_all(&dir).unwrap();
        symlink(&victim, dir.join("x")).unwrap();
        *planted.lock().unwrap() = Some(dir.clone());
        let (worker, _) = start(&w.settings, Mode::Worker).await;
        let done = wait_terminal(&w.client, &base, &id, Duration::from_secs(120)).await;
        worker.shutdown().await;
        if fail {
            assert_eq!(done["state"], "failed", "{done}");
            assert_eq!(done["error"]["code"], "evaluator_failed", "{done}");
        } else {
            assert_eq!(done["state"], "succeeded", "{done}");
            assert!(r.join("g/soup/ladle-manifest.json").exists());
        }
        assert_eq!(tree(&w.outside), before, "fail={fail}");
        assert!(
            !scratch_root.exists(),
            "fail={fail}: {:?}",
            tree(&scratch_root)
        );
    }
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn greedy_scratch_links_sqlite() {
    greedy_scratch_links(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn greedy_scratch_links_postgres() {
    greedy_scratch_links(true).await;
}

/// `renameat2(RENAME_EXCHANGE)`: swap two names atomically.
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        a,
        rustix::fs::CWD,
        b,
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .map_err(std::io::Error::from)
}

/// Whether `dir` or a folder up to `depth` levels below it holds a file whose name starts with
/// `prefix` (a run stages its files in `.ladle-staging/<writer>/`).
fn holds(dir: &Path, prefix: &str, depth: usize) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        e.file_name().to_string_lossy().starts_with(prefix)
            || (depth > 0
                && e.file_type().is_ok_and(|t| t.is_dir())
                && holds(&e.path(), prefix, depth - 1))
    })
}

/// Waits (busy, off the runtime) until the staging folder of `dir` (`.ladle-staging/<attempt>/`)
/// holds a file whose name starts with `prefix`, then exchanges `dir` with the link `swap`
/// (which points outside). Only staged files count, so the swap falls while the job is still
/// writing, never after it published. True if it swapped in time.
fn swap_when(dir: PathBuf, prefix: &'static str, swap: PathBuf) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let staging = dir.join(".ladle-staging");
        while Instant::now() < deadline {
            if holds(&staging, prefix, 1) {
                return exchange(&dir, &swap).is_ok();
            }
            std::thread::yield_now();
        }
        false
    })
}

/// Whether `dir` holds exactly a whole soup: the manifest and the files it lists, each with its
/// size and SHA-256, and nothing else (no staging folder, no claim).
fn whole_soup(dir: &Path) -> Result<(), String> {
    let text = std::fs::read(dir.join("ladle-manifest.json")).map_err(|e| e.to_string())?;
    let m: Value = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
    let mut want = vec!["ladle-manifest.json".to_string()];
    for f in m["files"].as_array().ok_or("manifest without files")? {
        let name = f["path"].as_str().unwrap_or_default();
        let bytes = std::fs::read(dir.join(name)).map_err(|e| format!("{name}: {e}"))?;
        use sha2::Digest;
        if Some(hex::encode(sha2::Sha256::digest(&bytes)).as_str()) != f["sha256"].as_str() {
            return Err(format!("{name}: SHA-256 differs from the manifest"));
        }
        want.push(name.to_string());
    }
    want.sort();
    let have = tree(dir);
    if have != want {
        return Err(format!("{have:?} is not {want:?}"));
    }
    Ok(())
}

/// Finding 3 over HTTP, `ladle serve` as a process (its chunks throttled so the job is still
/// running): once the run's first shard appears (in its staging folder inside the output), the
/// output folder is exchanged (`renameat2(RENAME_EXCHANGE)`) for a link, to a folder outside
/// the roots (even tries) or to another folder inside the root (odd tries). The output folder
/// was opened once at plan time and every create, rename and removal goes through that
/// handle: the job finishes, its whole soup lands in the folder it opened (now at the link's
/// old name) and nothing at all is written where the link leads. Five tries.
async fn output_swapped_mid_job(postgres: bool) {
    let Some(w) = world(postgres, "output swapped mid-job").await else {
        return;
    };
    let r = &w.root;
    // Model 1 carries side files someone chose (an `authorized_keys` too, never copied).
    let big = |seed| {
        vec![
            f32_tensor("a.w", &[64, 32], seed),
            f32_tensor("b.w", &[64, 32], seed + 1),
        ]
    };
    model_with(&r.join("a"), &big(1));
    std::fs::write(r.join("a/authorized_keys"), b"ssh-ed25519 AAAA attacker").unwrap();
    std::fs::write(r.join("a/tokenizer.json"), b"{}").unwrap();
    model_with(&r.join("b"), &big(2));
    let port = free_port();
    let mut env = BTreeMap::new();
    for (k, v) in [
        ("LADLE_BIND", format!("127.0.0.1:{port}")),
        ("LADLE_DATABASE_URL", w.db_url.clone()),
        ("LADLE_DATA_DIR", w.data.display().to_string()),
        ("LADLE_ALLOWED_ROOTS", r.display().to_string()),
        ("LADLE_CHUNK_ELEMS", "64".into()),
        ("LADLE_TEST_THROTTLE_MS", "40".into()),
    ] {
        env.insert(k.to_string(), v);
    }
    let logs = r.join("logs");
    let mut proc = LadleProc::spawn("serve", &["serve"], &env, &logs);
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while w
        .client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "serve did not start: {}",
            proc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..5 {
        let out = r.join(format!("out-{i}"));
        let target = if i % 2 == 0 {
            w.outside.join(format!("target-{i}"))
        } else {
            r.join(format!("decoy-{i}"))
        };
        std::fs::create_dir_all(&target).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        let swap = r.join(format!("swap-{i}"));
        symlink(&target, &swap).unwrap();
        let swapper = swap_when(out.clone(), "model-", swap.clone());
        let mut body = linear(&[file_url(&r.join("a")), file_url(&r.join("b"))], &out);
        body["output"]["max_shard_size"] = json!("2KB");
        let (status, v) = submit(&w.client, &base, &body).await;
        assert_eq!(status, 202, "{v}");
        let done = wait_terminal(
            &w.client,
            &base,
            v["id"].as_str().unwrap(),
            Duration::from_secs(120),
        )
        .await;
        assert!(swapper.join().unwrap(), "try {i}: never swapped: {done}");
        assert!(
            std::fs::symlink_metadata(&out).unwrap().is_symlink(),
            "try {i}: not swapped"
        );
        assert_eq!(done["state"], "succeeded", "try {i}: {done}");
        assert_no_leak(&w, &done.to_string());
        // Nothing where the link leads.
        assert_eq!(tree(&target), Vec::<String>::new(), "try {i}");
        // The folder opened at plan time (now at `swap-i`) holds the whole soup and nothing
        // else: no staged file, no claim, no side file outside the fixed list.
        whole_soup(&swap).unwrap_or_else(|e| panic!("try {i}: {e}"));
        assert!(!swap.join("authorized_keys").exists(), "try {i}");
        assert!(swap.join("tokenizer.json").exists(), "try {i}");
    }
    assert_eq!(std::fs::read(w.outside.join("shadow")).unwrap(), SECRET);
    proc.sigterm();
    proc.wait_exit(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn output_swapped_mid_job_sqlite() {
    output_swapped_mid_job(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn output_swapped_mid_job_postgres() {
    output_swapped_mid_job(true).await;
}

/// `ladle merge` with `--allowed-root`: the same links refused, the same inside link working.
#[test]
fn one_shot_merge_is_confined_too() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().canonicalize().unwrap();
    let (root, outside) = (base.join("root"), base.join("outside"));
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("shadow"), SECRET).unwrap();
    std::fs::write(
        outside.join("private.safetensors"),
        safetensors_bytes(&tensors(9)),
    )
    .unwrap();
    model(&root.join("m2"), 2);
    model(&root.join("tok"), 1);
    symlink(outside.join("shadow"), root.join("tok/tokenizer.json")).unwrap();
    std::fs::create_dir_all(root.join("weights")).unwrap();
    symlink(
        outside.join("private.safetensors"),
        root.join("weights/model.safetensors"),
    )
    .unwrap();
    let run = |first: &str, out: &Path| {
        let recipe = root.join(format!("{first}.json"));
        std::fs::write(
            &recipe,
            linear(
                &[file_url(&root.join(first)), file_url(&root.join("m2"))],
                out,
            )
            .to_string(),
        )
        .unwrap();
        // A run that gets as far as writing a shard says so in the pause folder, and goes on
        // at once (the go-ahead is there already; see `src/failpoints.rs`).
        let pause = base.join(format!("pause-{first}"));
        std::fs::create_dir_all(&pause).unwrap();
        std::fs::write(pause.join("shard-written.go"), b"").unwrap();
        Command::new(LADLE)
            .args(["merge", "--quiet", "--allowed-root"])
            .arg(&root)
            .arg(&recipe)
            .env("LADLE_TEST_PAUSE_AT", "shard-written")
            .env("LADLE_TEST_PAUSE_DIR", &pause)
            .output()
            .unwrap()
    };
    for bad in ["tok", "weights"] {
        let out = root.join(format!("out-{bad}"));
        let o = run(bad, &out);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success(), "{bad}: {err}");
        assert!(err.contains("outside the allowed roots"), "{bad}: {err}");
        assert!(err.contains(bad), "{bad}: names the file: {err}");
        assert!(!err.contains("very-secret"), "{err}");
        assert!(!err.contains(&*outside.to_string_lossy()), "{err}");
        // Refused while planning, before anything was written: no shard was ever staged (the
        // run never reached the pause after the first shard), and no output folder was made.
        let reached = base.join(format!("pause-{bad}/shard-written.reached"));
        assert!(
            !reached.exists(),
            "{bad}: a shard was staged before the refusal"
        );
        assert!(!out.exists(), "{bad}: {:?}", tree(&out));
    }
    // A relative link inside the root works.
    std::fs::create_dir_all(root.join("inside")).unwrap();
    symlink(
        "../m2/model.safetensors",
        root.join("inside/model.safetensors"),
    )
    .unwrap();
    let out = root.join("out-inside");
    let o = run("inside", &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The pause point works (so its absence above means something).
    assert!(base.join("pause-inside/shard-written.reached").exists());
    assert!(out.join("ladle-manifest.json").exists());
    assert_eq!(std::fs::read(outside.join("shadow")).unwrap(), SECRET);
}

/// Finding 9: a file that fails validation gives no bytes of it back (a text file's first 8
/// bytes were once printed as a "header length"; header JSON keys were quoted).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_files_leak_no_bytes() {
    let Some(w) = world(false, "no leaks").await else {
        return;
    };
    let (service, base) = start(&w.settings, Mode::Serve).await;
    let r = &w.root;
    model(&r.join("m2"), 2);
    // A text file posing as weights (its first 8 bytes were the "header length"), long and
    // short enough for both length checks.
    std::fs::create_dir_all(r.join("text")).unwrap();
    std::fs::write(r.join("text/model.safetensors"), SECRET).unwrap();
    std::fs::create_dir_all(r.join("small")).unwrap();
    std::fs::write(
        r.join("small/model.safetensors"),
        b"\x10\0\0\0\0\0\0\0very-secret",
    )
    .unwrap();
    let header_len = u64::from_le_bytes(SECRET[..8].try_into().unwrap()).to_string();
    for bad in ["text", "small"] {
        let out = r.join(format!("out-{bad}"));
        let (status, v) = submit(
            &w.client,
            &base,
            &linear(&[file_url(&r.join(bad)), file_url(&r.join("m2"))], &out),
        )
        .await;
        let err = if status == 202 {
            wait_terminal(
                &w.client,
                &base,
                v["id"].as_str().unwrap(),
                Duration::from_secs(60),
            )
            .await["error"]
                .clone()
        } else {
            v
        };
        assert_eq!(err["code"], "checkpoint_malformed", "{bad}: {err}");
        let text = err.to_string();
        assert!(!text.contains("very-secret"), "{bad}: {text}");
        assert!(!text.contains(&header_len), "{bad}: {text}");
        assert!(
            !text.contains("16-byte") && !text.contains(" 16 "),
            "{bad}: {text}"
        );
    }
    service.shutdown().await;
}

/// Issue 11: a file inside the root that fails validation is never quoted back. Every header,
/// index and adapter below carries a marker in its tensor names, dtypes, keys or values; each
/// job fails with its stable code, and the marker is in no part of the answer (the detail is
/// only logged).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_files_quote_none_of_their_contents() {
    const MARK: &str = "SECRET-7f3a";
    let Some(w) = world(false, "no quoted contents").await else {
        return;
    };
    let (service, base) = start(&w.settings, Mode::Serve).await;
    let r = &w.root;
    model(&r.join("m2"), 2);
    let m2 = file_url(&r.join("m2"));
    // A safetensors file of a header written by hand and `data` zero bytes.
    let st = |header: &str, data: usize| {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.resize(out.len() + data, 0);
        out
    };
    let mut cases: Vec<(String, Value, &str)> = Vec::new();
    // Checkpoints whose header fails validation.
    let headers = [
        format!(r#"{{"{MARK}.w":{{"dtype":"{MARK}","shape":[4],"data_offsets":[0,16]}}}}"#),
        format!(r#"{{"w":{{"dtype":"F32","shape":[4],"data_offsets":[0,16],"{MARK}":1}}}}"#),
        format!(
            r#"{{"{MARK}.a":{{"dtype":"F32","shape":[4],"data_offsets":[0,16]}},"{MARK}.b":{{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}}}"#
        ),
        format!(
            r#"{{"{MARK}":{{"dtype":"F32","shape":[4],"data_offsets":[0,16]}},"{MARK}":{{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}}}"#
        ),
        format!(r#"{{"{MARK}": [1,"#),
        format!(r#"{{"__metadata__":{{"{MARK}":{{"x":1}}}}}}"#),
        format!(r#"{{"{MARK}":{{"dtype":"F16","shape":[4],"data_offsets":[0,16]}}}}"#),
        format!(r#"{{"{MARK}":{{"dtype":"F32","shape":[4],"data_offsets":[0,32]}}}}"#),
    ];
    for (i, h) in headers.iter().enumerate() {
        let dir = r.join(format!("header-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.safetensors"), st(h, 16)).unwrap();
        let out = r.join(format!("out-header-{i}"));
        let recipe = linear(&[file_url(&dir), m2.clone()], &out);
        cases.push((format!("header {i}"), recipe, "checkpoint_malformed"));
    }
    // Sharded checkpoints whose index fails validation (or names what is not there).
    let indexes = [
        json!({"weight_map": {MARK: format!("../{MARK}.safetensors")}}).to_string(),
        format!(r#"{{"weight_map": {{"{MARK}": 1}}}}"#),
        format!(r#"{{"weight_map": {{"{MARK}": "#),
        json!({"weight_map": {"a.w": "model-00001-of-00002.safetensors",
            "b.w": "model-00002-of-00002.safetensors",
            MARK: "model-00001-of-00002.safetensors"}})
        .to_string(),
        json!({"weight_map": {"a.w": "model-00001-of-00002.safetensors",
            "b.w": format!("{MARK}.safetensors")}})
        .to_string(),
    ];
    for (i, index) in indexes.iter().enumerate() {
        let dir = r.join(format!("index-{i}"));
        write_sharded(&dir, &tensors(3), 2);
        std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
        let out = r.join(format!("out-index-{i}"));
        let recipe = linear(&[file_url(&dir), m2.clone()], &out);
        cases.push((format!("index {i}"), recipe, "checkpoint_malformed"));
    }
    // Adapters (folded into m2) whose config or tensors fail validation.
    let lora = |name: &str, shape: &[usize]| RawTensor {
        name: name.to_string(),
        ..f32_tensor("x", shape, 5)
    };
    let good_config = r#"{"r":2,"lora_alpha":4,"target_modules":["a"]}"#.to_string();
    let good_weights = vec![
        lora("base_model.model.a.lora_A.weight", &[2, 4]),
        lora("base_model.model.a.lora_B.weight", &[8, 2]),
    ];
    let adapters = [
        (format!(r#"{{"peft_type":"{MARK}"}}"#), good_weights.clone()),
        (
            format!(
                r#"{{"r":2,"lora_alpha":4,"target_modules":["a"],"rank_pattern":{{"{MARK}":0}}}}"#
            ),
            good_weights.clone(),
        ),
        (
            format!(r#"{{"r":"{MARK}","lora_alpha":4}}"#),
            good_weights.clone(),
        ),
        (format!(r#"{{"{MARK}": [1,"#), good_weights.clone()),
        (
            good_config.clone(),
            vec![
                lora(&format!("{MARK}.lora_A.weight"), &[2, 4]),
                lora(&format!("{MARK}.lora_B.weight"), &[8, 2]),
            ],
        ),
        (
            good_config.clone(),
            vec![
                lora(&format!("base_model.model.{MARK}.lora_A.weight"), &[2, 4]),
                lora(&format!("base_model.model.{MARK}.lora_B.weight"), &[8, 2]),
            ],
        ),
        (
            good_config.clone(),
            vec![lora(&format!("base_model.model.{MARK}.weight"), &[16])],
        ),
    ];
    for (i, (config, weights)) in adapters.iter().enumerate() {
        let dir = r.join(format!("adapter-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("adapter_config.json"), config).unwrap();
        std::fs::write(
            dir.join("adapter_model.safetensors"),
            safetensors_bytes(weights),
        )
        .unwrap();
        let out = r.join(format!("out-adapter-{i}"));
        let recipe = json!({
            "method": "linear",
            "models": [{"uri": m2, "lora": file_url(&dir), "weight": 1.0}, {"uri": m2, "weight": 1.0}],
            "output": {"uri": file_url(&out)},
        });
        cases.push((format!("adapter {i}"), recipe, "invalid_adapter"));
    }

    for (name, recipe, code) in &cases {
        let (status, v) = submit(&w.client, &base, recipe).await;
        let answer = if status == 202 {
            let id = v["id"].as_str().unwrap();
            wait_terminal(&w.client, &base, id, Duration::from_secs(60)).await
        } else {
            v
        };
        let err = if answer["error"].is_object() {
            &answer["error"]
        } else {
            &answer
        };
        assert_eq!(err["code"], *code, "{name}: {answer}");
        let text = answer.to_string();
        assert!(!text.contains(MARK), "{name}: {text}");
        assert!(!text.contains("7f3a"), "{name}: {text}");
    }
    service.shutdown().await;
}

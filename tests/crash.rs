//! Process-level reliability tests: the real `ladle worker` binary as child processes over one
//! database (SQLite always; Postgres when `LADLE_TEST_POSTGRES_URL` is set, a fresh database per
//! test, else a loud SKIPPED line), killed with SIGKILL, stopped with SIGTERM, crashed at named
//! crash points, and cut off from Postgres by a TCP proxy. QUEUE.md §5 tests 3, 9, 12, 13, 14, 15
//! and 20, and the create-if-absent check of the S3 server the tests use.
//!
//! The crash points and the per-chunk throttle exist only in builds with the `failpoints`
//! feature, which `cargo test` enables (Cargo.toml: ladle's dev-dependency on itself); see
//! `src/failpoints.rs`. The tests run one at a time (they time leases of a few seconds
//! on a 2-core machine), each in its own temp folder with its own database.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::procs::{ChaosProxy, LadleProc, aborted};
use common::*;
use ladle::failpoints::{self, CrashPoint};
use ladle::queue::{Job, JobQueue, JobState};
use ladle::service::{Mode, Service};
use sha2::{Digest, Sha256};
use uuid::Uuid;

const MANIFEST: &str = "ladle-manifest.json";

/// One test at a time: they measure leases of seconds, and a neighbour's CPU burn or kill
/// must not decide another test's outcome.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A test's world: temp folder, database, two generated fine-tunes, the API (in-process, for
/// submitting and cancelling), and a direct queue handle for watching job rows.
struct Rig {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    backend: Backend,
    db_url: String,
    api: Option<Service>,
    base: String,
    queue: Arc<dyn JobQueue>,
    client: reqwest::Client,
    models: Vec<PathBuf>,
    logs: PathBuf,
    spawned: AtomicUsize,
    _pg: Option<PgDb>,
    /// Outputs go to this S3-protocol server when set.
    s3: Option<S3Server>,
}

/// How a spawned worker is configured.
#[derive(Debug, Clone)]
struct WorkerOpts {
    lease_s: f64,
    heartbeat_s: f64,
    grace_s: f64,
    slots: usize,
    throttle_ms: u64,
    burn_ms: u64,
    crash_at: Option<CrashPoint>,
    /// A database URL other than the rig's (the chaos proxy).
    db_url: Option<String>,
}

impl Default for WorkerOpts {
    fn default() -> Self {
        WorkerOpts {
            lease_s: 3.0,
            heartbeat_s: 1.0,
            grace_s: 5.0,
            slots: 1,
            throttle_ms: 0,
            burn_ms: 0,
            crash_at: None,
            db_url: None,
        }
    }
}

impl Rig {
    /// `None` (after a loud SKIPPED line) when the backend is not available.
    async fn new(backend: Backend, test: &str) -> Option<Rig> {
        Rig::build(backend, test, None).await
    }

    /// SQLite, with every output on a fresh s3s-fs server (`None` when s3s-fs is missing).
    async fn with_s3(test: &str) -> Option<Rig> {
        let Some(s3) = S3Server::start() else {
            loud_skip(
                &format!("crash test `{test}` on S3"),
                "s3s-fs not installed: run .ci/run or `cargo install s3s-fs@0.14.1 --features binary --locked`",
            );
            return None;
        };
        Rig::build(Backend::Sqlite, test, Some(s3)).await
    }

    async fn build(backend: Backend, test: &str, s3: Option<S3Server>) -> Option<Rig> {
        assert!(
            failpoints::enabled(),
            "the crash tests need the `failpoints` feature (cargo test enables it through \
             ladle's dev-dependency on itself)"
        );
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().canonicalize().expect("canonical temp dir");
        let (db_url, pg) = match backend {
            Backend::Sqlite => (
                format!("sqlite://{}", root.join("ladle.db").display()),
                None,
            ),
            Backend::Postgres => match PgDb::create().await {
                Some(db) => (db.url.clone(), Some(db)),
                None => {
                    loud_skip(
                        &format!("crash test `{test}` on Postgres"),
                        "set LADLE_TEST_POSTGRES_URL (.ci/run does)",
                    );
                    return None;
                }
            },
        };
        let models = write_models(&root);
        let mut roots = vec![root.display().to_string()];
        if s3.is_some() {
            roots.push(format!("s3://{BUCKET}/"));
        }
        let settings = test_settings(&root.join("api-data"), &db_url, roots, s3.as_ref());
        let (api, base) = start(&settings, Mode::Api).await;
        let queue = api.queue.clone();
        Some(Rig {
            _tmp: tmp,
            logs: root.join("logs"),
            root,
            backend,
            db_url,
            api: Some(api),
            base,
            queue,
            client: reqwest::Client::new(),
            models,
            spawned: AtomicUsize::new(0),
            _pg: pg,
            s3,
        })
    }

    fn out_dir(&self, name: &str) -> PathBuf {
        self.root.join("soups").join(name)
    }

    /// The recipe for a soup of the two fine-tunes into `soups/<name>/` (3 output shards),
    /// in the temp folder or on S3.
    fn recipe(&self, name: &str) -> serde_json::Value {
        let out = match &self.s3 {
            Some(_) => format!("s3://{BUCKET}/soups/{name}/"),
            None => format!("{}/", file_url(&self.out_dir(name))),
        };
        self.recipe_to(&out)
    }

    fn recipe_to(&self, out: &str) -> serde_json::Value {
        serde_json::json!({
            "method": "linear",
            "models": [
                {"uri": file_url(&self.models[0]), "weight": 1.0},
                {"uri": file_url(&self.models[1]), "weight": 2.0},
            ],
            "parameters": {"normalize": true},
            "output": {"uri": out, "max_shard_size": 40000},
        })
    }

    async fn submit(&self, name: &str) -> Uuid {
        self.submit_body(&self.recipe(name)).await
    }

    /// Submit the recipe for `name` with `max_attempts` set.
    async fn submit_attempts(&self, name: &str, max_attempts: i32) -> Uuid {
        let mut body = self.recipe(name);
        body["max_attempts"] = max_attempts.into();
        self.submit_body(&body).await
    }

    async fn submit_body(&self, body: &serde_json::Value) -> Uuid {
        let r = self
            .client
            .post(format!("{}/v1/merges", self.base))
            .json(body)
            .send()
            .await
            .expect("POST /v1/merges");
        let status = r.status().as_u16();
        let v: serde_json::Value = r.json().await.expect("json");
        assert_eq!(status, 202, "{v}");
        v["id"].as_str().expect("id").parse().expect("uuid")
    }

    async fn cancel(&self, id: Uuid) -> serde_json::Value {
        let r = self
            .client
            .post(format!("{}/v1/merges/{id}/cancel", self.base))
            .send()
            .await
            .expect("POST cancel");
        assert!(r.status().is_success(), "cancel: {}", r.status());
        r.json().await.expect("json")
    }

    fn spawn_worker(&self, opts: &WorkerOpts) -> LadleProc {
        let n = self.spawned.fetch_add(1, Ordering::SeqCst);
        let mut env = BTreeMap::new();
        let mut set = |k: &str, v: String| {
            env.insert(k.to_string(), v);
        };
        set(
            "LADLE_DATABASE_URL",
            opts.db_url.clone().unwrap_or_else(|| self.db_url.clone()),
        );
        set(
            "LADLE_DATA_DIR",
            self.root.join(format!("worker-{n}")).display().to_string(),
        );
        match &self.s3 {
            None => set("LADLE_ALLOWED_ROOTS", self.root.display().to_string()),
            Some(s3) => {
                set(
                    "LADLE_ALLOWED_ROOTS",
                    format!("{},s3://{BUCKET}/", self.root.display()),
                );
                set("LADLE_S3_ENDPOINT", s3.endpoint.clone());
                set("LADLE_S3_REGION", "us-east-1".into());
                set("LADLE_S3_ACCESS_KEY_ID", ACCESS_KEY.into());
                set("LADLE_S3_SECRET_ACCESS_KEY", SECRET_KEY.into());
                set("LADLE_S3_ALLOW_HTTP", "true".into());
            }
        }
        set("LADLE_WORKERS", opts.slots.to_string());
        set("LADLE_LEASE_TTL_SECS", opts.lease_s.to_string());
        set("LADLE_HEARTBEAT_SECS", opts.heartbeat_s.to_string());
        set("LADLE_POLL_SECS", "0.2".into());
        set("LADLE_BACKOFF_SECS", "0.5".into());
        set("LADLE_SHUTDOWN_GRACE_SECS", opts.grace_s.to_string());
        set("LADLE_CHUNK_ELEMS", "1024".into());
        if opts.throttle_ms > 0 {
            // One chunk in flight: the throttle then adds up chunk after chunk.
            set("LADLE_INFLIGHT_BYTES", "1".into());
            set("LADLE_TEST_THROTTLE_MS", opts.throttle_ms.to_string());
        }
        if opts.burn_ms > 0 {
            set("LADLE_TEST_BURN_MS", opts.burn_ms.to_string());
        }
        if let Some(p) = opts.crash_at {
            set("LADLE_TEST_CRASH_AT", p.name().into());
        }
        let armed = env.keys().any(|k| k.starts_with("LADLE_TEST_"));
        let mut w = LadleProc::spawn(&format!("worker-{n}"), &["worker"], &env, &self.logs);
        if armed {
            assert_armed(&mut w);
        }
        w
    }

    async fn job(&self, id: Uuid) -> Job {
        self.queue
            .get(id)
            .await
            .expect("get job")
            .expect("job exists")
    }

    /// Poll the job row until `done` holds.
    async fn wait_job(
        &self,
        id: Uuid,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Job) -> bool,
    ) -> Job {
        let deadline = Instant::now() + timeout;
        loop {
            let j = self.job(id).await;
            if done(&j) {
                return j;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}: state {:?}, attempts {}, progress {:?}, error {:?}",
                j.state,
                j.attempts,
                j.progress,
                j.error
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn wait_terminal(&self, id: Uuid, timeout: Duration) -> Job {
        self.wait_job(id, timeout, "a terminal state", |j| j.state.is_terminal())
            .await
    }

    /// Running, with at least `tensors` tensors written (as the last heartbeat reported).
    async fn wait_running_with(&self, id: Uuid, tensors: u64) -> Job {
        self.wait_job(id, Duration::from_secs(30), "running with progress", |j| {
            j.state == JobState::Running && progress(j).0 >= tensors
        })
        .await
    }

    /// `ladle merge` of the same recipe into a fresh folder: the reference soup.
    fn reference(&self, name: &str) -> Vec<serde_json::Value> {
        let dir = self.root.join("reference").join(name);
        let recipe = self.root.join(format!("recipe-{name}.json"));
        let local = format!("{}/", file_url(&dir));
        std::fs::write(&recipe, self.recipe_to(&local).to_string()).expect("write recipe");
        let run = std::process::Command::new(procs::LADLE)
            .args(["merge", "--quiet", "--out"])
            .arg(&dir)
            .arg(&recipe)
            .env_remove("LADLE_TEST_CRASH_AT")
            .env_remove("LADLE_TEST_THROTTLE_MS")
            .env_remove("LADLE_TEST_BURN_MS")
            .output()
            .expect("ladle merge");
        assert!(
            run.status.success(),
            "reference merge: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let m = read_manifest(&dir).expect("reference manifest");
        m["files"].as_array().expect("files").clone()
    }

    /// The soup at `soups/<name>` is complete, valid, holds nothing the manifest does not
    /// list, and equals the reference merge.
    fn assert_soup(&self, name: &str) -> serde_json::Value {
        let dir = self.out_dir(name);
        let m = read_manifest(&dir).expect("manifest at the output");
        if let Some(problem) = manifest_problem(&dir, &m) {
            panic!("{name}: {problem}");
        }
        assert_only_listed(&dir, &m);
        let files = m["files"].as_array().expect("files");
        assert!(
            files
                .iter()
                .filter(|f| f["path"].as_str().unwrap_or("").ends_with(".safetensors"))
                .count()
                >= 3,
            "expected 3 shards: {files:?}"
        );
        assert_eq!(
            files,
            &self.reference(name),
            "{name}: shards differ from the reference merge of the same recipe"
        );
        m
    }

    /// Every object under `soups/<name>/` on the S3 server.
    async fn s3_objects(&self, name: &str) -> BTreeMap<String, Vec<u8>> {
        use futures::TryStreamExt;
        use object_store::ObjectStoreExt;
        let store = self.s3.as_ref().expect("an S3 rig").store();
        let prefix = object_store::path::Path::from(format!("soups/{name}"));
        let metas: Vec<_> = store.list(Some(&prefix)).try_collect().await.expect("list");
        let mut out = BTreeMap::new();
        for m in metas {
            let bytes = store
                .get(&m.location)
                .await
                .expect("get")
                .bytes()
                .await
                .expect("bytes");
            let name = m.location.filename().expect("file name").to_string();
            out.insert(name, bytes.to_vec());
        }
        out
    }

    /// The S3 soup: a valid manifest listing exactly the other objects, equal to the reference.
    async fn assert_s3_soup(&self, name: &str) -> serde_json::Value {
        let objects = self.s3_objects(name).await;
        let m: serde_json::Value =
            serde_json::from_slice(objects.get(MANIFEST).expect("manifest object"))
                .expect("manifest json");
        let files = m["files"].as_array().expect("files");
        let mut listed: BTreeSet<String> = BTreeSet::new();
        for f in files {
            let path = f["path"].as_str().expect("path");
            let bytes = objects
                .get(path)
                .unwrap_or_else(|| panic!("{path} is listed but not on S3"));
            assert_eq!(f["size"].as_u64(), Some(bytes.len() as u64), "{path}");
            assert_eq!(
                f["sha256"].as_str(),
                Some(hex::encode(Sha256::digest(bytes)).as_str()),
                "{path}"
            );
            listed.insert(path.to_string());
        }
        listed.insert(MANIFEST.into());
        let have: BTreeSet<String> = objects.keys().cloned().collect();
        assert_eq!(have, listed, "objects beyond the manifest's");
        assert_eq!(
            files,
            &self.reference(name),
            "{name}: differs from the reference"
        );
        m
    }

    async fn finish(mut self) {
        if let Some(api) = self.api.take() {
            api.shutdown().await;
        }
    }
}

/// Two fine-tunes: three 16 Ki-element bf16 matrices (16 chunks each at 1024 elements), an f32
/// vector and an i64 tensor; the first has a config file (copied to the soup).
fn write_models(root: &Path) -> Vec<PathBuf> {
    (0..2u64)
        .map(|k| {
            let seed = 1000 * (k + 1);
            let tensors = vec![
                bf16_tensor("model.embed_tokens.weight", &[256, 64], seed),
                bf16_tensor("model.layers.0.mlp.weight", &[64, 256], seed + 1),
                bf16_tensor("model.layers.1.mlp.weight", &[64, 256], seed + 2),
                f32_tensor("model.norm.weight", &[64], seed + 3),
                i64_tensor("model.position_ids", 32, seed),
            ];
            let dir = root.join(format!("ft-{k}"));
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join("model.safetensors"), safetensors_bytes(&tensors))
                .expect("write model");
            if k == 0 {
                std::fs::write(dir.join("config.json"), br#"{"model_type": "llama"}"#)
                    .expect("write config");
            }
            dir
        })
        .collect()
}

/// (tensors_done, tensors_total) from the job's last reported progress.
fn progress(j: &Job) -> (u64, u64) {
    let p = j.progress.as_ref();
    let get = |k: &str| p.and_then(|p| p[k].as_u64()).unwrap_or(0);
    (get("tensors_done"), get("tensors_total"))
}

fn read_manifest(dir: &Path) -> Option<serde_json::Value> {
    let bytes = std::fs::read(dir.join(MANIFEST)).ok()?;
    Some(serde_json::from_slice(&bytes).expect("manifest is JSON"))
}

/// Whether every file the manifest lists is there with its size and SHA-256.
fn manifest_problem(dir: &Path, m: &serde_json::Value) -> Option<String> {
    let Some(files) = m["files"].as_array() else {
        return Some("manifest without files".into());
    };
    for f in files {
        let path = f["path"].as_str().unwrap_or_default();
        let bytes = match std::fs::read(dir.join(path)) {
            Ok(b) => b,
            Err(e) => return Some(format!("manifest lists {path}, which is missing: {e}")),
        };
        if Some(bytes.len() as u64) != f["size"].as_u64() {
            return Some(format!(
                "manifest lists {path} with size {} but it has {} bytes",
                f["size"],
                bytes.len()
            ));
        }
        if Some(hex::encode(Sha256::digest(&bytes)).as_str()) != f["sha256"].as_str() {
            return Some(format!("manifest lists {path} with another SHA-256"));
        }
    }
    None
}

/// The folder holds the manifest and what it lists, nothing else (no leftovers of the
/// killed attempt, such as a partial upload).
fn assert_only_listed(dir: &Path, m: &serde_json::Value) {
    let mut want: BTreeSet<String> = m["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter_map(|f| f["path"].as_str().map(String::from))
        .collect();
    want.insert(MANIFEST.into());
    let have: BTreeSet<String> = std::fs::read_dir(dir)
        .expect("output folder")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        have,
        want,
        "files in {} beyond the manifest's",
        dir.display()
    );
}

fn assert_no_manifest(dir: &Path, when: &str) {
    assert!(
        !dir.join(MANIFEST).exists(),
        "a manifest exists {when}: {:?}",
        std::fs::read_to_string(dir.join(MANIFEST))
    );
}

/// What a watcher saw while polling the output folder and the job row.
#[derive(Debug, Default)]
struct WatchReport {
    polls: usize,
    violations: Vec<String>,
    /// (state, attempts) pairs seen.
    seen: BTreeSet<(String, i32)>,
    /// Polls that saw a manifest while the job was still `running` (the window between
    /// publishing and `complete`, or a later attempt recovering a published soup).
    manifest_while_running: usize,
    /// Polls that saw a manifest while the job was `queued` again (its publisher died before
    /// `complete`).
    manifest_while_queued: usize,
    /// Longest gap between two heartbeats of one attempt, from `heartbeat_at`.
    max_heartbeat_gap: Duration,
}

struct Watcher {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<WatchReport>,
}

impl Watcher {
    /// Poll `dir` then the job, every few ms, until stopped. Invariants:
    /// - a manifest lists only files that exist with its sizes and SHA-256s;
    /// - once seen, the manifest never changes;
    /// - a manifest coexists with `running` only after that attempt reported every tensor
    ///   written (publish → complete), or while a later attempt recovers it; with `queued`
    ///   only when an attempt published and died before `complete`; never with `failed` or
    ///   `cancelled`.
    fn start(queue: Arc<dyn JobQueue>, id: Uuid, dir: PathBuf) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut r = WatchReport::default();
            let mut first: Option<Vec<u8>> = None;
            let mut last_beat: Option<(i32, chrono::DateTime<chrono::Utc>)> = None;
            while !s.load(Ordering::SeqCst) {
                r.polls += 1;
                // The folder first, then the row: a manifest seen here was written before the
                // state read below.
                let manifest = std::fs::read(dir.join(MANIFEST)).ok();
                let parsed = manifest
                    .as_ref()
                    .map(|b| serde_json::from_slice::<serde_json::Value>(b));
                if let Some(bytes) = &manifest {
                    match &parsed {
                        Some(Ok(m)) => {
                            if let Some(p) = manifest_problem(&dir, m) {
                                r.violations.push(p);
                            }
                        }
                        _ => r.violations.push("a manifest that is not JSON".into()),
                    }
                    match &first {
                        None => first = Some(bytes.clone()),
                        Some(f) if f != bytes => {
                            r.violations.push("the manifest was rewritten".into())
                        }
                        _ => {}
                    }
                }
                let Ok(Some(job)) = queue.get(id).await else {
                    r.violations.push("job row unreadable".into());
                    break;
                };
                r.seen.insert((job.state.as_str().into(), job.attempts));
                if let Some(Ok(m)) = &parsed {
                    let by = m["run"]["attempt"].as_i64().unwrap_or(-1);
                    match job.state {
                        JobState::Succeeded => {}
                        // An attempt published, then died before `complete`; the reaper
                        // queued the job again, and the next attempt will find the soup.
                        JobState::Queued if by >= 1 && by <= job.attempts as i64 => {
                            r.manifest_while_queued += 1;
                        }
                        JobState::Running => {
                            r.manifest_while_running += 1;
                            let (done, total) = progress(&job);
                            let publishing =
                                by == job.attempts as i64 && total > 0 && done == total;
                            let recovering = by < job.attempts as i64 && by >= 1;
                            if !(publishing || recovering) {
                                r.violations.push(format!(
                                    "manifest (attempt {by}) while attempt {} is running with {done}/{total} tensors written",
                                    job.attempts
                                ));
                            }
                        }
                        other => r
                            .violations
                            .push(format!("manifest while the job is {}", other.as_str())),
                    }
                }
                if job.state == JobState::Running
                    && let Some(at) = job.heartbeat_at
                {
                    if let Some((attempt, prev)) = last_beat
                        && attempt == job.attempts
                        && at > prev
                    {
                        let gap = (at - prev).to_std().unwrap_or_default();
                        r.max_heartbeat_gap = r.max_heartbeat_gap.max(gap);
                    }
                    last_beat = Some((job.attempts, at));
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            r
        });
        Watcher { stop, task }
    }

    async fn finish(self) -> WatchReport {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("watcher task")
    }
}

fn assert_clean_watch(r: &WatchReport) {
    assert!(r.polls > 20, "the watcher barely ran: {r:?}");
    assert!(r.violations.is_empty(), "watcher saw: {:#?}", r.violations);
}

/// The spawned binary honours the failpoint variables: it logs "test failpoints armed" before
/// "worker started". It would not if `target/debug/ladle` (what `CARGO_BIN_EXE_ladle` names)
/// had been replaced by a plain `cargo build` while these tests ran.
fn assert_armed(w: &mut LadleProc) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = w.log_text();
        if log.contains("test failpoints armed") {
            return;
        }
        assert!(
            !log.contains("worker started") && w.is_running() && Instant::now() < deadline,
            "{} ignores the LADLE_TEST_ variables: built without the `failpoints` feature? \
             (a `cargo build` running beside `cargo test` replaces it)\n{log}",
            procs::LADLE
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// (idle, total) jiffies of the whole machine, from `/proc/stat`.
fn machine_cpu() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (idle, f.iter().take(8).sum())
}

/// SIGTERM a worker and require a clean exit within 15 s.
async fn stop_clean(w: &mut LadleProc) {
    w.sigterm();
    let status = w.wait_exit(Duration::from_secs(15)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{}: {status:?}\n{}",
        w.name,
        w.log_text()
    );
}

fn log_has(p: &LadleProc, needle: &str) -> bool {
    p.log_text().contains(needle)
}

/// SIGTERM `w` and wait until it logs that it stopped claiming. The signal is handled
/// asynchronously: a job submitted before that line may still be claimed (and is then handed
/// straight back), so "no new claims" is only about jobs submitted after it.
async fn sigterm_and_wait_shutdown(w: &LadleProc) {
    w.sigterm();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log_has(w, "shutting down") {
        assert!(
            Instant::now() < deadline,
            "{}: no shutdown log line: {}",
            w.name,
            w.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------------------------------------
// The scenarios (each run on SQLite and on Postgres)
// ------------------------------------------------------------------------------------------

/// QUEUE.md §5 #3: SIGKILL a worker mid-merge; a second worker finishes the job, once.
async fn kill9_mid_merge(rig: Rig) {
    let id = rig.submit("kill9").await;
    let out = rig.out_dir("kill9");
    let watch = Watcher::start(rig.queue.clone(), id, out.clone());
    let mut a = rig.spawn_worker(&WorkerOpts {
        throttle_ms: 120,
        ..Default::default()
    });
    // At least one tensor (the first shard) written, many still to go.
    let j = rig.wait_running_with(id, 1).await;
    let (done, total) = progress(&j);
    assert!(
        done < total,
        "the merge finished before the kill: {done}/{total}"
    );
    let status = a.kill9();
    assert!(!status.success());
    assert_eq!(rig.job(id).await.attempts, 1);
    assert_no_manifest(&out, "after the kill");
    let partial: Vec<_> = std::fs::read_dir(&out)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(!partial.is_empty(), "the killed worker wrote nothing yet");

    let mut b = rig.spawn_worker(&WorkerOpts {
        throttle_ms: 10,
        ..Default::default()
    });
    let j = rig.wait_terminal(id, Duration::from_secs(45)).await;
    let report = watch.finish().await;
    assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
    assert_eq!(j.attempts, 2);
    assert_clean_watch(&report);
    assert_eq!(
        report.manifest_while_queued, 0,
        "nobody published before the kill"
    );
    assert!(
        report.seen.contains(&("running".into(), 1))
            && report.seen.contains(&("running".into(), 2)),
        "the watcher saw both attempts run: {:?}",
        report.seen
    );
    let m = rig.assert_soup("kill9");
    assert_eq!(m["run"]["attempt"], 2, "the second worker published");
    assert_eq!(j.result.as_ref().expect("result")["files"], m["files"]);
    assert!(log_has(&b, "job succeeded"), "{}", b.log_text());
    stop_clean(&mut b).await;
    rig.finish().await;
}

/// POST cancel, accepting every answer a cancel racing the job's end may get (200 cancelled,
/// 202 requested, 409 not cancellable: already succeeded). Returns (status, body).
async fn cancel_any(rig: &Rig, id: Uuid) -> (u16, serde_json::Value) {
    let r = rig
        .client
        .post(format!("{}/v1/merges/{id}/cancel", rig.base))
        .send()
        .await
        .expect("POST cancel");
    let status = r.status().as_u16();
    let body = r.json().await.expect("json");
    assert!(matches!(status, 200 | 202 | 409), "cancel: {status} {body}");
    (status, body)
}

/// Files left in an output folder (none when it does not exist).
fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// QUEUE.md §5 #8: cancel a running merge → the worker stops within a heartbeat interval
/// (+1 s), cleans its output, the job is `cancelled` with attempts unchanged, and the worker
/// lives on.
async fn cancel_running_job(rig: Rig) {
    let id = rig.submit("cancel-running").await;
    let out = rig.out_dir("cancel-running");
    let mut w = rig.spawn_worker(&WorkerOpts {
        throttle_ms: 120,
        ..Default::default()
    });
    rig.wait_running_with(id, 1).await;
    assert!(!files_in(&out).is_empty(), "the merge wrote nothing yet");
    let asked = Instant::now();
    let v = rig.cancel(id).await;
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["cancel_requested"], true, "{v}");
    let j = rig.wait_terminal(id, Duration::from_secs(10)).await;
    let took = asked.elapsed();
    eprintln!(
        "cancel of a running job ({:?}): stopped after {took:?}",
        rig.backend
    );
    assert_eq!(j.state, JobState::Cancelled, "{:?}", j.error);
    assert_eq!(j.attempts, 1, "a cancel charges no further attempt");
    // Postgres: the cancel's NOTIFY reaches the worker's listener, which beats at once
    // (QUEUE.md #8: under 1 s with LISTEN on). SQLite in another process: no notification,
    // the worker sees the request at its next heartbeat (interval 1 s).
    let bound = match rig.backend {
        Backend::Postgres => Duration::from_millis(1000),
        Backend::Sqlite => Duration::from_secs(2),
    };
    assert!(took < bound, "stopped after {took:?}");
    assert!(log_has(&w, "job cancelled"), "{}", w.log_text());
    assert_no_manifest(&out, "for a cancelled job");
    assert!(
        files_in(&out).is_empty(),
        "output not cleaned: {:?}",
        files_in(&out)
    );
    assert!(
        !out.exists(),
        "the output folder the job made was left, empty"
    );
    assert!(w.is_running());
    stop_clean(&mut w).await;
    rig.finish().await;
}

/// QUEUE.md §5 #10: cancels land at staggered moments of short merges, some before and
/// some after the manifest. Every round ends in exactly one of: `succeeded` with a whole
/// soup (the cancel came too late: 409), or `cancelled` with nothing at the output.
async fn cancel_races_completion(rig: Rig) {
    const ROUNDS: u64 = 12;
    let mut w = rig.spawn_worker(&WorkerOpts {
        throttle_ms: 5,
        ..Default::default()
    });
    let (mut succeeded, mut cancelled) = (0, 0);
    for round in 0..ROUNDS {
        let name = format!("race-{round}");
        let id = rig.submit(&name).await;
        rig.wait_job(id, Duration::from_secs(20), "claimed", |j| j.attempts == 1)
            .await;
        tokio::time::sleep(Duration::from_millis(round * 40)).await;
        let (status, body) = cancel_any(&rig, id).await;
        let j = rig.wait_terminal(id, Duration::from_secs(20)).await;
        let out = rig.out_dir(&name);
        match j.state {
            JobState::Succeeded => {
                succeeded += 1;
                assert_ne!(status, 200, "answered cancelled but succeeded: {body}");
                rig.assert_soup(&name);
            }
            JobState::Cancelled => {
                cancelled += 1;
                assert_ne!(
                    status, 409,
                    "answered not cancellable but cancelled: {body}"
                );
                assert_no_manifest(&out, "for a cancelled job");
                assert!(
                    files_in(&out).is_empty(),
                    "{name}: left {:?}",
                    files_in(&out)
                );
            }
            other => panic!("{name}: ended {other:?}: {:?}", j.error),
        }
        assert_eq!(j.attempts, 1);
    }
    eprintln!(
        "cancel vs completion ({:?}): {succeeded} succeeded, {cancelled} cancelled of {ROUNDS}",
        rig.backend
    );
    stop_clean(&mut w).await;
    rig.finish().await;
}

/// `(job_id, attempt)` of every line of a worker log containing `what` (the job span's fields).
fn logged_runs(log: &str, what: &str) -> Vec<(Uuid, i32)> {
    let field = |line: &str, key: &str| -> Option<String> {
        let start = line.find(key)? + key.len();
        let rest = &line[start..];
        let end = rest.find([' ', '}', ',']).unwrap_or(rest.len());
        Some(rest[..end].to_string())
    };
    log.lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            let id = field(l, "job_id=")?.parse().ok()?;
            let attempt = field(l, "attempt=")?.parse().ok()?;
            Some((id, attempt))
        })
        .collect()
}

/// Every (job, attempt) → the lease owners seen holding it.
type OwnerHistory = BTreeMap<(Uuid, i32), BTreeSet<String>>;

/// QUEUE.md §5 #2: two worker processes share six slow merges; one of them is frozen
/// (SIGSTOP) past its 2 s lease mid-merge, then thawed. At no poll does one attempt of a job
/// have two owners; across both processes' logs every (job, attempt) is claimed once, each job
/// succeeds once, claims per job equal its attempts, and the thawed worker fences itself
/// instead of publishing.
async fn never_two_runners(rig: Rig) {
    let names: Vec<String> = (0..6).map(|i| format!("two-runners-{i}")).collect();
    let mut ids = Vec::new();
    for n in &names {
        ids.push(rig.submit(n).await);
    }
    let opts = |throttle_ms| WorkerOpts {
        lease_s: 2.0,
        heartbeat_s: 0.5,
        throttle_ms,
        ..Default::default()
    };
    let mut a = rig.spawn_worker(&opts(15));
    let mut b = rig.spawn_worker(&opts(25));
    let owners: Arc<std::sync::Mutex<OwnerHistory>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let poll = {
        let (queue, ids, owners, stop) =
            (rig.queue.clone(), ids.clone(), owners.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                for id in &ids {
                    if let Ok(Some(j)) = queue.get(*id).await
                        && let Some(o) = j.lease_owner
                    {
                        let mut map = owners.lock().unwrap_or_else(|p| p.into_inner());
                        map.entry((*id, j.attempts)).or_default().insert(o);
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    // Freeze A while it holds a job with work left, past its lease.
    let a_tag = format!(":{}:", a.pid());
    let frozen = rig
        .wait_job(
            ids[0],
            Duration::from_secs(30),
            "A or B running job 0",
            |j| j.state == JobState::Running && progress(j).0 >= 1,
        )
        .await;
    let victim = if frozen
        .lease_owner
        .as_deref()
        .is_some_and(|o| o.contains(&a_tag))
    {
        &mut a
    } else {
        &mut b
    };
    victim.signal("STOP");
    tokio::time::sleep(Duration::from_secs(4)).await;
    victim.signal("CONT");
    let victim_name = victim.name.clone();
    for id in &ids {
        let j = rig.wait_terminal(*id, Duration::from_secs(120)).await;
        assert_eq!(j.state, JobState::Succeeded, "{id}: {:?}", j.error);
    }
    stop.store(true, Ordering::SeqCst);
    poll.await.expect("poller");
    for (key, seen) in owners.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        assert_eq!(seen.len(), 1, "{key:?} held by {seen:?}");
    }
    let logs = [a.log_text(), b.log_text()];
    let claims: Vec<(Uuid, i32)> = logs
        .iter()
        .flat_map(|l| logged_runs(l, "job claimed"))
        .collect();
    let successes: Vec<(Uuid, i32)> = logs
        .iter()
        .flat_map(|l| logged_runs(l, "job succeeded"))
        .collect();
    let unique: BTreeSet<_> = claims.iter().collect();
    assert_eq!(
        unique.len(),
        claims.len(),
        "a (job, attempt) claimed twice: {claims:?}"
    );
    for (id, name) in ids.iter().zip(&names) {
        let j = rig.job(*id).await;
        let n = claims.iter().filter(|(c, _)| c == id).count();
        assert_eq!(n as i32, j.attempts, "{name}: claims logged vs attempts");
        let won: Vec<_> = successes.iter().filter(|(c, _)| c == id).collect();
        assert_eq!(won.len(), 1, "{name}: successes {won:?}");
        assert_eq!(won[0].1, j.attempts, "{name}: the last attempt succeeded");
        let m = rig.assert_soup(name);
        assert_eq!(
            m["run"]["attempt"], j.attempts,
            "{name}: published by the last attempt"
        );
    }
    let frozen_job = rig.job(ids[0]).await;
    assert!(
        frozen_job.attempts >= 2,
        "job 0 was not taken over: {frozen_job:?}"
    );
    let victim_log = if victim_name == a.name {
        &logs[0]
    } else {
        &logs[1]
    };
    assert!(
        victim_log.contains("lease lost") || victim_log.contains("fencing myself"),
        "the thawed worker did not fence itself:\n{victim_log}"
    );
    eprintln!(
        "never two runners ({:?}): {} claims for {} jobs, job 0 attempts {}",
        rig.backend,
        claims.len(),
        ids.len(),
        frozen_job.attempts
    );
    stop_clean(&mut a).await;
    stop_clean(&mut b).await;
    rig.finish().await;
}

/// QUEUE.md §5 #9: a cancel requested after the owner died → `cancelled` by the reaper, and
/// no worker runs the job again.
async fn cancel_after_worker_died(rig: Rig) {
    let id = rig.submit("cancel-dead").await;
    let out = rig.out_dir("cancel-dead");
    let mut a = rig.spawn_worker(&WorkerOpts {
        throttle_ms: 120,
        ..Default::default()
    });
    rig.wait_running_with(id, 1).await;
    a.kill9();
    let v = rig.cancel(id).await;
    assert_eq!(
        v["state"], "running",
        "the dead worker still holds the lease: {v}"
    );
    assert_eq!(v["cancel_requested"], true);
    let mut b = rig.spawn_worker(&WorkerOpts::default());
    let j = rig.wait_terminal(id, Duration::from_secs(30)).await;
    assert_eq!(j.state, JobState::Cancelled, "{:?}", j.error);
    assert_eq!(j.attempts, 1);
    // It stays cancelled; the live worker never claims it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let j = rig.job(id).await;
    assert_eq!((j.state, j.attempts), (JobState::Cancelled, 1));
    assert!(b.is_running());
    assert!(!log_has(&b, "job claimed"), "{}", b.log_text());
    assert_no_manifest(&out, "for a cancelled job");
    stop_clean(&mut b).await;
    rig.finish().await;
}

/// QUEUE.md §5 #12: a job that kills its worker on every attempt ends `failed` after
/// max_attempts (3) crashes; its fourth run is the reaper's recovery-only run, which merges
/// nothing (no crash), finds no manifest and fails it; nobody runs it again.
async fn poison_job(rig: Rig) {
    let id = rig.submit("poison").await;
    let out = rig.out_dir("poison");
    let opts = WorkerOpts {
        crash_at: Some(CrashPoint::BeforeManifest),
        ..Default::default()
    };
    let mut crashes = 0;
    let mut spawns = 0;
    let survivor = loop {
        assert!(spawns < 6, "more worker restarts than attempts: a loop");
        let mut w = rig.spawn_worker(&opts);
        spawns += 1;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = w.try_status() {
                assert!(aborted(status), "{}: {status}\n{}", w.name, w.log_text());
                assert!(
                    log_has(&w, "crashing at before-manifest"),
                    "{}",
                    w.log_text()
                );
                crashes += 1;
                break;
            }
            if rig.job(id).await.state.is_terminal() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no crash and no end: {}",
                w.log_text()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        if w.is_running() {
            break w;
        }
        assert_no_manifest(&out, "after a crash before the manifest");
    };
    let j = rig.job(id).await;
    assert_eq!(j.state, JobState::Failed);
    assert_eq!((crashes, j.attempts, j.max_attempts), (3, 4, 4));
    assert!(j.recovery_only);
    let err = j.error.as_ref().expect("error");
    assert_eq!(err.code.to_string(), "lease_expired", "{err:?}");
    assert!(err.message.contains("no manifest was published"), "{err:?}");
    // The last worker ran the recovery only, lives on and never runs the job again.
    let mut survivor = survivor;
    assert!(
        log_has(&survivor, "recovery-only run"),
        "{}",
        survivor.log_text()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(survivor.is_running(), "{}", survivor.log_text());
    let again = rig.job(id).await;
    assert_eq!((again.state, again.attempts), (JobState::Failed, 4));
    assert_eq!(survivor.log_text().matches("job claimed").count(), 1);
    assert_no_manifest(&out, "for a failed job");
    survivor.sigterm();
    assert!(survivor.wait_exit(Duration::from_secs(15)).await.is_some());
    rig.finish().await;
}

/// QUEUE.md §5 #13: lease 3 s, heartbeat 1 s, and a merge that keeps every core busy for
/// ~12 s: one attempt, no lease lost.
async fn heartbeats_hold_under_cpu_saturation(rig: Rig) {
    let id = rig.submit("burn").await;
    let out = rig.out_dir("burn");
    let watch = Watcher::start(rig.queue.clone(), id, out.clone());
    let mut w = rig.spawn_worker(&WorkerOpts {
        burn_ms: 1500,
        ..Default::default()
    });
    rig.wait_job(id, Duration::from_secs(20), "running", |j| {
        j.state == JobState::Running
    })
    .await;
    let started = Instant::now();
    let cpu0 = w.cpu_time().unwrap_or_default();
    let machine0 = machine_cpu();
    let j = rig.wait_terminal(id, Duration::from_secs(50)).await;
    let wall = started.elapsed();
    let cpu = w.cpu_time().unwrap_or_default().saturating_sub(cpu0);
    let machine1 = machine_cpu();
    let report = watch.finish().await;
    let cores = cpu.as_secs_f64() / wall.as_secs_f64();
    let idle = (machine1.0 - machine0.0) as f64 / ((machine1.1 - machine0.1) as f64).max(1.0);
    eprintln!(
        "cpu saturation ({:?}): merge {wall:.1?}, worker CPU {cpu:.1?} = {cores:.2} cores, \
         machine idle {:.1} %, longest heartbeat gap {:?}",
        rig.backend,
        idle * 100.0,
        report.max_heartbeat_gap
    );
    assert_eq!(
        j.state,
        JobState::Succeeded,
        "{:?}\n{}",
        j.error,
        w.log_text()
    );
    assert_eq!(j.attempts, 1, "{}", w.log_text());
    assert_clean_watch(&report);
    assert!(
        wall > Duration::from_secs(8),
        "the merge was not long: {wall:?}"
    );
    // Every core busy (other processes on the machine count too: they only make it harder),
    // and the worker itself busy with more than half a core of merge work throughout. The
    // engine keeps at most 8 chunks in flight, so only up to 8 cores can be filled.
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        ncpu > 8 || idle < 0.15,
        "the cores were not saturated: {:.1} % idle",
        idle * 100.0
    );
    assert!(
        cores > 0.5,
        "the merge did not load the machine: {cores:.2} cores"
    );
    // Fencing starts at 2/3 of the lease (2 s) without a confirmed heartbeat.
    assert!(
        report.max_heartbeat_gap < Duration::from_millis(1900),
        "heartbeat gap {:?}",
        report.max_heartbeat_gap
    );
    let log = w.log_text();
    for bad in ["heartbeat failed", "fencing myself", "lease lost"] {
        assert!(!log.contains(bad), "worker log has {bad:?}:\n{log}");
    }
    rig.assert_soup("burn");
    stop_clean(&mut w).await;
    rig.finish().await;
}

/// QUEUE.md §5 #15, first half: SIGTERM with a grace period too short for the merge → the job
/// is released (`queued`, attempts unchanged, max_attempts + 1), nothing is published, no new
/// claim; another worker then runs both jobs.
async fn sigterm_releases_after_grace(rig: Rig) {
    let id = rig.submit("term-release").await;
    let out = rig.out_dir("term-release");
    let mut a = rig.spawn_worker(&WorkerOpts {
        throttle_ms: 120,
        grace_s: 1.0,
        slots: 2,
        ..Default::default()
    });
    rig.wait_running_with(id, 1).await;
    sigterm_and_wait_shutdown(&a).await;
    let id2 = rig.submit("term-release-2").await;
    let t = Instant::now();
    let status = a.wait_exit(Duration::from_secs(15)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "clean exit after SIGTERM: {status:?}\n{}",
        a.log_text()
    );
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "exit took {:?}",
        t.elapsed()
    );
    let j = rig.job(id).await;
    assert_eq!(j.state, JobState::Queued, "{}", a.log_text());
    assert_eq!(
        (j.attempts, j.max_attempts),
        (1, 4),
        "released without charging"
    );
    assert!(log_has(&a, "job released"), "{}", a.log_text());
    assert_no_manifest(&out, "after a release");
    let j2 = rig.job(id2).await;
    assert_eq!(
        (j2.state, j2.attempts),
        (JobState::Queued, 0),
        "no new claims"
    );

    let mut b = rig.spawn_worker(&WorkerOpts {
        slots: 2,
        ..Default::default()
    });
    for (job, name, attempts) in [(id, "term-release", 2), (id2, "term-release-2", 1)] {
        let j = rig.wait_terminal(job, Duration::from_secs(30)).await;
        assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
        assert_eq!(j.attempts, attempts);
        rig.assert_soup(name);
    }
    stop_clean(&mut b).await;
    rig.finish().await;
}

/// QUEUE.md §5 #15, second half: SIGTERM with enough grace → the in-flight job finishes (one
/// attempt), no new job is claimed, the process exits cleanly.
async fn sigterm_finishes_within_grace(rig: Rig) {
    let id = rig.submit("term-finish").await;
    let mut a = rig.spawn_worker(&WorkerOpts {
        throttle_ms: 60,
        grace_s: 30.0,
        slots: 2,
        ..Default::default()
    });
    rig.wait_running_with(id, 1).await;
    sigterm_and_wait_shutdown(&a).await;
    let id2 = rig.submit("term-finish-2").await;
    let status = a.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "clean exit: {status:?}\n{}",
        a.log_text()
    );
    let j = rig.job(id).await;
    assert_eq!(
        j.state,
        JobState::Succeeded,
        "{:?}\n{}",
        j.error,
        a.log_text()
    );
    assert_eq!(j.attempts, 1);
    rig.assert_soup("term-finish");
    let j2 = rig.job(id2).await;
    assert_eq!(
        (j2.state, j2.attempts),
        (JobState::Queued, 0),
        "no new claims"
    );
    rig.finish().await;
}

/// QUEUE.md §5 #20: a worker dies at a named crash point; a second worker brings the job to
/// exactly one `succeeded` with a valid manifest equal to the reference.
///
/// `last_attempt`: the job has `max_attempts = 1`, so the crash uses its last attempt; the
/// reaper then gives it its one recovery-only run (max_attempts 2), which publishes nothing
/// new: it succeeds (`recovered`) when the crashed worker's manifest is out.
async fn crash_point_recovers(rig: Rig, point: CrashPoint, last_attempt: bool) {
    let name = format!("crash-{}", point.name());
    let id = if last_attempt {
        rig.submit_attempts(&name, 1).await
    } else {
        rig.submit(&name).await
    };
    let out = rig.out_dir(&name);
    let watch = Watcher::start(rig.queue.clone(), id, out.clone());
    let mut a = rig.spawn_worker(&WorkerOpts {
        crash_at: Some(point),
        // Long enough for a heartbeat to happen mid-merge.
        throttle_ms: if point == CrashPoint::Heartbeat {
            60
        } else {
            0
        },
        ..Default::default()
    });
    let status = a.wait_exit(Duration::from_secs(30)).await;
    assert!(status.is_some_and(aborted), "{status:?}\n{}", a.log_text());
    assert!(
        log_has(&a, &format!("crashing at {}", point.name())),
        "{}",
        a.log_text()
    );
    let j = rig.job(id).await;
    assert_eq!((j.state, j.attempts), (JobState::Running, 1));
    let published = match point {
        CrashPoint::AfterManifest => {
            let m = read_manifest(&out).expect("the manifest is out before the crash");
            assert_eq!(m["run"]["attempt"], 1);
            Some(std::fs::read(out.join(MANIFEST)).expect("manifest bytes"))
        }
        _ => {
            assert_no_manifest(&out, "after a crash before publishing");
            None
        }
    };
    let mut b = rig.spawn_worker(&WorkerOpts::default());
    let j = rig.wait_terminal(id, Duration::from_secs(30)).await;
    let report = watch.finish().await;
    assert_eq!(
        j.state,
        JobState::Succeeded,
        "{:?}\n{}",
        j.error,
        b.log_text()
    );
    assert_eq!(j.attempts, 2);
    assert_eq!(
        j.recovery_only, last_attempt,
        "recovery-only run iff the last attempt crashed"
    );
    if last_attempt {
        assert_eq!(
            j.max_attempts, 2,
            "the recovery run is the one extra attempt"
        );
        assert!(log_has(&b, "recovery-only run"), "{}", b.log_text());
    }
    assert_clean_watch(&report);
    let m = rig.assert_soup(&name);
    let result = j.result.as_ref().expect("result");
    assert_eq!(result["files"], m["files"]);
    match published {
        Some(bytes) => {
            assert_eq!(result["recovered"], true, "{result}");
            assert_eq!(
                std::fs::read(out.join(MANIFEST)).expect("manifest"),
                bytes,
                "the recovering worker kept the published manifest"
            );
            let (done, total) = progress(&j);
            assert_eq!(done, total, "a recovered job reports all tensors done");
        }
        None => assert_eq!(m["run"]["attempt"], 2),
    }
    if last_attempt {
        // The history keeps the expiry that led to the recovery run.
        assert_eq!(j.errors.len(), 1, "{:?}", j.errors);
        assert_eq!(j.errors[0]["code"], "lease_expired");
    }
    stop_clean(&mut b).await;
    rig.finish().await;
}

async fn crash_before_manifest(rig: Rig) {
    crash_point_recovers(rig, CrashPoint::BeforeManifest, false).await
}

async fn crash_after_manifest(rig: Rig) {
    crash_point_recovers(rig, CrashPoint::AfterManifest, false).await
}

/// The manifest is out but the worker died on the job's last attempt: the reaper's
/// recovery-only run finds the soup and the job succeeds (`recovered`), instead of failing
/// with `lease_expired` over a complete soup.
async fn crash_after_manifest_on_last_attempt(rig: Rig) {
    crash_point_recovers(rig, CrashPoint::AfterManifest, true).await
}

async fn crash_in_heartbeat(rig: Rig) {
    crash_point_recovers(rig, CrashPoint::Heartbeat, false).await
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let _one = SERIAL.lock().await;
                let rig = Rig::new(Backend::Sqlite, stringify!($name)).await.expect("sqlite");
                super::$name(rig).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let _one = SERIAL.lock().await;
                if let Some(rig) = Rig::new(Backend::Postgres, stringify!($name)).await {
                    super::$name(rig).await;
                }
            }
        }
    )*};
}

on_both_backends!(
    kill9_mid_merge,
    never_two_runners,
    cancel_running_job,
    cancel_races_completion,
    cancel_after_worker_died,
    poison_job,
    heartbeats_hold_under_cpu_saturation,
    sigterm_releases_after_grace,
    sigterm_finishes_within_grace,
    crash_before_manifest,
    crash_after_manifest,
    crash_after_manifest_on_last_attempt,
    crash_in_heartbeat,
);

// ------------------------------------------------------------------------------------------
// Postgres outages (QUEUE.md §5 #14): the worker reaches Postgres through a chaos proxy
// ------------------------------------------------------------------------------------------

/// A proxy in front of the rig's Postgres, and the database URL that goes through it.
async fn proxied(rig: &Rig) -> (ChaosProxy, String) {
    let mut url = url::Url::parse(&rig.db_url).expect("postgres url");
    let host = url.host_str().unwrap_or("127.0.0.1").to_string();
    let port = url.port().unwrap_or(5432);
    let upstream = tokio::net::lookup_host((host.as_str(), port))
        .await
        .expect("resolve postgres")
        .next()
        .expect("postgres address");
    let proxy = ChaosProxy::start(upstream).await;
    url.set_host(Some("127.0.0.1")).expect("host");
    url.set_port(Some(proxy.addr.port())).expect("port");
    (proxy, url.to_string())
}

fn outage_opts(db_url: String) -> WorkerOpts {
    WorkerOpts {
        lease_s: 6.0,
        heartbeat_s: 1.0,
        throttle_ms: 150,
        db_url: Some(db_url),
        ..Default::default()
    }
}

/// Postgres unreachable for 2 s (less than the 4 s fence and the 6 s lease): heartbeats fail,
/// the merge goes on, one attempt.
async fn postgres_short_outage(rig: Rig) {
    let (proxy, url) = proxied(&rig).await;
    let id = rig.submit("outage-short").await;
    let mut a = rig.spawn_worker(&outage_opts(url));
    rig.wait_running_with(id, 1).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.restore();
    let j = rig.wait_terminal(id, Duration::from_secs(40)).await;
    let log = a.log_text();
    assert_eq!(j.state, JobState::Succeeded, "{:?}\n{log}", j.error);
    assert_eq!(j.attempts, 1, "{log}");
    assert!(
        log.contains("heartbeat failed"),
        "the outage was felt:\n{log}"
    );
    assert!(!log.contains("fencing myself"), "{log}");
    rig.assert_soup("outage-short");
    a.sigterm();
    assert!(a.wait_exit(Duration::from_secs(15)).await.is_some());
    rig.finish().await;
}

/// Postgres unreachable for 10 s (more than the lease): the worker fences itself before its
/// lease expires (so before anyone could claim the job), writes nothing more, and after the
/// outage the job runs once more (attempt 2) and succeeds.
async fn postgres_long_outage(rig: Rig) {
    let (proxy, url) = proxied(&rig).await;
    let id = rig.submit("outage-long").await;
    let out = rig.out_dir("outage-long");
    let mut a = rig.spawn_worker(&outage_opts(url));
    rig.wait_running_with(id, 1).await;
    proxy.cut();
    let cut_at = Instant::now();
    // The lease as the database holds it: no heartbeat can move it during the outage.
    let expires = rig.job(id).await.lease_expires_at.expect("lease");
    let fenced_at = loop {
        if a.log_text().contains("fencing myself") {
            break chrono::Utc::now();
        }
        assert!(
            cut_at.elapsed() < Duration::from_secs(9),
            "no self-fencing during the outage:\n{}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        fenced_at < expires,
        "fenced at {fenced_at}, after the lease expired at {expires}"
    );
    // Once fenced it writes nothing more (in-flight uploads are aborted).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let listing = |d: &Path| -> BTreeMap<String, u64> {
        std::fs::read_dir(d)
            .map(|e| {
                e.flatten()
                    .map(|e| {
                        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                        (e.file_name().to_string_lossy().into_owned(), len)
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let after_fence = listing(&out);
    let rest = Duration::from_secs(10).saturating_sub(cut_at.elapsed());
    tokio::time::sleep(rest).await;
    assert_eq!(listing(&out), after_fence, "a fenced worker kept writing");
    assert!(!out.join(MANIFEST).exists(), "published during the outage");
    let j = rig.job(id).await;
    assert_eq!(
        (j.state, j.attempts),
        (JobState::Running, 1),
        "nobody else took it"
    );
    proxy.restore();
    let j = rig.wait_terminal(id, Duration::from_secs(40)).await;
    let log = a.log_text();
    assert_eq!(j.state, JobState::Succeeded, "{:?}\n{log}", j.error);
    assert_eq!(j.attempts, 2, "ran once more after the outage:\n{log}");
    assert!(log.contains("stopped without publishing"), "{log}");
    let m = rig.assert_soup("outage-long");
    assert_eq!(m["run"]["attempt"], 2);
    a.sigterm();
    assert!(a.wait_exit(Duration::from_secs(15)).await.is_some());
    rig.finish().await;
}

/// The publish protocol on S3 through the real binary: a worker killed mid-upload leaves no
/// visible object (unfinished multipart uploads) and the next one publishes; a worker killed
/// right after its manifest put is recovered from the manifest on S3.
async fn s3_output_survives_crashes(rig: Rig) {
    let id = rig.submit("s3-kill9").await;
    let mut a = rig.spawn_worker(&WorkerOpts {
        throttle_ms: 120,
        ..Default::default()
    });
    rig.wait_running_with(id, 1).await;
    a.kill9();
    let left = rig.s3_objects("s3-kill9").await;
    assert!(!left.contains_key(MANIFEST), "{:?}", left.keys());
    let mut b = rig.spawn_worker(&WorkerOpts::default());
    let j = rig.wait_terminal(id, Duration::from_secs(45)).await;
    assert_eq!(
        j.state,
        JobState::Succeeded,
        "{:?}\n{}",
        j.error,
        b.log_text()
    );
    assert_eq!(j.attempts, 2);
    let m = rig.assert_s3_soup("s3-kill9").await;
    assert_eq!(m["run"]["attempt"], 2);
    stop_clean(&mut b).await;

    let id = rig.submit("s3-after-manifest").await;
    let mut a = rig.spawn_worker(&WorkerOpts {
        crash_at: Some(CrashPoint::AfterManifest),
        ..Default::default()
    });
    let status = a.wait_exit(Duration::from_secs(30)).await;
    assert!(status.is_some_and(aborted), "{status:?}\n{}", a.log_text());
    let published = rig.s3_objects("s3-after-manifest").await;
    let manifest = published
        .get(MANIFEST)
        .expect("manifest before the crash")
        .clone();
    let mut b = rig.spawn_worker(&WorkerOpts::default());
    let j = rig.wait_terminal(id, Duration::from_secs(30)).await;
    assert_eq!(
        j.state,
        JobState::Succeeded,
        "{:?}\n{}",
        j.error,
        b.log_text()
    );
    assert_eq!(j.attempts, 2);
    assert_eq!(j.result.as_ref().expect("result")["recovered"], true);
    rig.assert_s3_soup("s3-after-manifest").await;
    assert_eq!(
        rig.s3_objects("s3-after-manifest").await[MANIFEST],
        manifest,
        "the manifest was kept"
    );
    stop_clean(&mut b).await;
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_output_survives_kill9_and_crash_after_manifest() {
    let _one = SERIAL.lock().await;
    if let Some(rig) = Rig::with_s3("s3_output_survives_crashes").await {
        s3_output_survives_crashes(rig).await;
    }
}

macro_rules! on_postgres {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let _one = SERIAL.lock().await;
            if let Some(rig) = Rig::new(Backend::Postgres, stringify!($name)).await {
                super::$name(rig).await;
            }
        }
    )*};
}

/// The outage tests exist only for Postgres (SQLite is a local file).
mod outage {
    use super::*;
    on_postgres!(postgres_short_outage, postgres_long_outage);
}

// ------------------------------------------------------------------------------------------
// The S3-protocol server's create-if-absent (QUEUE.md §4.8 step 3)
// ------------------------------------------------------------------------------------------

/// s3s-fs honours `PutMode::Create` (If-None-Match: *) for sequential writers, through the S3
/// client ladle itself builds: the second manifest put gets `AlreadyExists` and the first
/// manifest stays. (Concurrent conditional puts are not atomic on s3s-fs; ladle does not rely
/// on them: one live job per output URL is a unique index in the queue.)
#[tokio::test]
async fn s3_server_honours_create_if_absent() {
    use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
    let Some(s3) = S3Server::start() else {
        loud_skip(
            "S3 create-if-absent check",
            "s3s-fs not installed: run .ci/run or `cargo install s3s-fs@0.14.1 --features binary --locked`",
        );
        return;
    };
    let args = s3.args();
    let storage = ladle::storage::Storage::new(
        Some(&[format!("s3://{BUCKET}/")]),
        ladle::storage::S3Settings {
            endpoint: args.s3_endpoint,
            region: args.s3_region,
            access_key_id: args.s3_access_key_id,
            secret_access_key: args.s3_secret_access_key,
            allow_http: args.s3_allow_http,
            virtual_hosted_style: args.s3_virtual_hosted_style,
        },
    )
    .expect("storage");
    let folder = storage
        .resolve(&format!("s3://{BUCKET}/soups/create-if-absent/"))
        .expect("resolve");
    let loc = folder.child(MANIFEST);
    let create = || PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    loc.store
        .put_opts(&loc.path, PutPayload::from_static(b"first"), create())
        .await
        .expect("first create");
    let second = loc
        .store
        .put_opts(&loc.path, PutPayload::from_static(b"second"), create())
        .await;
    assert!(
        matches!(second, Err(object_store::Error::AlreadyExists { .. })),
        "second create-if-absent put: {second:?}"
    );
    let got = loc
        .store
        .get(&loc.path)
        .await
        .expect("get")
        .bytes()
        .await
        .expect("bytes");
    assert_eq!(&got[..], b"first", "the first manifest stays");
    // A plain put still overwrites (shards are rewritten by a re-run).
    loc.store
        .put(&loc.path, PutPayload::from_static(b"third"))
        .await
        .expect("overwrite");
    // After a delete, create works again.
    loc.store.delete(&loc.path).await.expect("delete");
    loc.store
        .put_opts(&loc.path, PutPayload::from_static(b"fourth"), create())
        .await
        .expect("create after delete");
}

//! The publish protocol (README "Publish protocol") under races, and the faults around it.
//!
//! Races: 4 concurrent `ladle merge` one-shots to one local folder and to one S3 bucket (moto,
//! which enforces conditional creates, in its own venv `target/ci-venv-moto`), each repeated
//! `LADLE_TEST_RACES` (default 20) times; two services with separate SQLite databases racing
//! one output; an attempt that lost its lease racing its successor, and twin attempts. After
//! every race the output must hold exactly one complete soup whose manifest matches its files
//! (SHA-256 recomputed) and nothing else, and every other writer must have failed with
//! `output_conflict` or ended as a recovery of the identical recipe. The counts are printed.
//!
//! Faults: inputs that change mid-merge (`input_changed`: rename-replace, write in place, S3
//! ETag), a full output disk (`storage_full`, on a small tmpfs; retried only with
//! `retry_storage_full`), and the output rules at submit.
//! One file (longer than most) so that the suite links one test binary for all of it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};

const LADLE: &str = env!("CARGO_BIN_EXE_ladle");
const MANIFEST: &str = "ladle-manifest.json";
const MOTO_VERSION: &str = "5.2.5";

fn races() -> usize {
    std::env::var("LADLE_TEST_RACES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// Two fine-tunes (2 shards each, a config.json) under `root`.
fn write_models(root: &Path, n: usize) -> Vec<PathBuf> {
    (0..2)
        .map(|m| {
            let dir = root.join(format!("model-{m}"));
            let tensors: Vec<RawTensor> = (0..6)
                .map(|t| f32_tensor(&format!("layers.{t}.w"), &[n, 64], (m * 10 + t) as u64))
                .collect();
            write_sharded(&dir, &tensors, 2);
            std::fs::write(dir.join("config.json"), br#"{"num_hidden_layers": 6}"#).unwrap();
            dir
        })
        .collect()
}

/// A linear soup of the two models with `weight` on the second, into `out`.
fn recipe(models: &[PathBuf], weight: f64, out: &str) -> serde_json::Value {
    serde_json::json!({
        "method": "linear",
        "models": [
            {"uri": file_url(&models[0]), "weight": 1.0},
            {"uri": file_url(&models[1]), "weight": weight},
        ],
        "output": {"uri": out, "max_shard_size": 40000},
    })
}

/// How one writer ended.
#[derive(Debug, Clone, PartialEq)]
enum End {
    Published,
    Recovered,
    Conflict,
    Other(String),
}

#[derive(Debug, Default)]
struct Tally {
    runs: usize,
    published: usize,
    conflicts: usize,
    recoveries: usize,
    corrupted: usize,
}

impl Tally {
    fn add(&mut self, end: &End) {
        self.runs += 1;
        match end {
            End::Published => self.published += 1,
            End::Recovered => self.recoveries += 1,
            End::Conflict => self.conflicts += 1,
            End::Other(_) => {}
        }
    }

    /// Straight to the process's stderr: libtest captures `eprintln!` of a passing test, so
    /// the counts would otherwise never show (`--nocapture` or not, CI logs keep them).
    fn report(&self, what: &str) {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "publish race ({what}): runs={} published={} conflicts={} recoveries={} corrupted={}",
            self.runs,
            self.published,
            self.conflicts,
            self.recoveries,
            self.corrupted
        );
    }
}

fn cli_end(out: &std::process::Output) -> End {
    if out.status.success() {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if v["recovered"] == true {
            End::Recovered
        } else {
            End::Published
        }
    } else {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if err.contains("[output_conflict]") {
            End::Conflict
        } else {
            End::Other(err)
        }
    }
}

/// The files of a soup (name → bytes), and the manifest.
type Soup = (serde_json::Value, BTreeMap<String, Vec<u8>>);

/// Whether the soup is whole: the manifest lists exactly the other files, each with its size
/// and SHA-256. `Err` says what is wrong.
fn check_soup((m, files): &Soup) -> Result<(), String> {
    let listed = m["files"].as_array().ok_or("manifest without files")?;
    let mut want = BTreeSet::new();
    for f in listed {
        let path = f["path"].as_str().unwrap_or_default();
        want.insert(path.to_string());
        let bytes = files
            .get(path)
            .ok_or(format!("manifest lists {path}, which is missing"))?;
        if Some(bytes.len() as u64) != f["size"].as_u64() {
            return Err(format!("{path}: size differs from the manifest"));
        }
        if Some(hex::encode(Sha256::digest(bytes)).as_str()) != f["sha256"].as_str() {
            return Err(format!("{path}: SHA-256 differs from the manifest"));
        }
    }
    let have: BTreeSet<String> = files.keys().cloned().collect();
    if have != want {
        return Err(format!("files beyond the manifest's: {have:?} vs {want:?}"));
    }
    if !want.iter().any(|p| p.ends_with(".safetensors")) {
        return Err("no shard".into());
    }
    Ok(())
}

/// Every entry under a local output (recursively, dotfiles and folders included; a folder
/// is recorded with a trailing `/`), and the manifest.
fn local_soup(dir: &Path) -> Result<Soup, String> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))? {
            let e = e.map_err(|e| e.to_string())?;
            let rel = e
                .path()
                .strip_prefix(dir)
                .map_err(|e| e.to_string())?
                .to_string_lossy()
                .into_owned();
            if e.file_type().map_err(|e| e.to_string())?.is_dir() {
                files.insert(format!("{rel}/"), Vec::new());
                stack.push(e.path());
            } else {
                files.insert(rel, std::fs::read(e.path()).map_err(|e| e.to_string())?);
            }
        }
    }
    let m = files.remove(MANIFEST).ok_or("no manifest")?;
    let m = serde_json::from_slice(&m).map_err(|e| format!("manifest: {e}"))?;
    Ok((m, files))
}

async fn s3_soup(store: &dyn ObjectStore, prefix: &str) -> Result<Soup, String> {
    let p = object_store::path::Path::from(prefix);
    let metas: Vec<_> = store
        .list(Some(&p))
        .try_collect()
        .await
        .map_err(|e| e.to_string())?;
    let mut files = BTreeMap::new();
    for meta in metas {
        let bytes = store
            .get(&meta.location)
            .await
            .map_err(|e| e.to_string())?
            .bytes()
            .await
            .map_err(|e| e.to_string())?;
        let full = meta.location.to_string();
        let rel = full
            .strip_prefix(&format!("{prefix}/"))
            .unwrap_or(&full)
            .to_string();
        files.insert(rel, bytes.to_vec());
    }
    let m = files.remove(MANIFEST).ok_or("no manifest")?;
    let m = serde_json::from_slice(&m).map_err(|e| format!("manifest: {e}"))?;
    Ok((m, files))
}

/// Judge one race: the soup is whole, exactly one writer published it, every other one
/// conflicted or recovered the same recipe (`weights[i]`: writer i's recipe).
fn judge(
    tally: &mut Tally,
    race: usize,
    soup: Result<Soup, String>,
    ends: &[End],
    weights: &[f64],
) {
    for e in ends {
        tally.add(e);
        if let End::Other(err) = e {
            panic!("race {race}: a writer failed otherwise than output_conflict: {err}");
        }
    }
    let problem = match &soup {
        Ok(s) => check_soup(s).err(),
        Err(e) => Some(e.clone()),
    };
    if let Some(p) = problem {
        tally.corrupted += 1;
        eprintln!("race {race}: CORRUPTED: {p} (ends {ends:?})");
        return;
    }
    let Ok((m, _)) = soup else { return };
    let published = m["recipe"]["models"][1]["weight"].as_f64();
    let winners = ends.iter().filter(|e| **e == End::Published).count();
    assert_eq!(winners, 1, "race {race}: {ends:?}");
    for (e, w) in ends.iter().zip(weights) {
        match e {
            End::Published | End::Recovered => {
                assert_eq!(Some(*w), published, "race {race}: {e:?} of another recipe")
            }
            _ => {}
        }
    }
}

/// Run `ladle merge` writers at once (one per recipe file), with `env`.
fn run_writers(recipes: &[PathBuf], env: &[(String, String)], race: usize) -> Vec<End> {
    let children: Vec<_> = recipes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut c = Command::new(LADLE);
            c.args(["merge", "--quiet"])
                .arg(r)
                .envs(env.iter().cloned())
                // Vary the interleavings a little from race to race.
                .env("LADLE_TEST_THROTTLE_MS", ((race + i) % 3).to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            c.spawn().expect("spawn ladle merge")
        })
        .collect();
    children
        .into_iter()
        .map(|c| cli_end(&c.wait_with_output().expect("wait ladle merge")))
        .collect()
}

const WEIGHTS: [f64; 4] = [1.0, 2.0, 3.0, 1.0];

fn write_recipes(root: &Path, models: &[PathBuf], out: &str, race: usize) -> Vec<PathBuf> {
    WEIGHTS
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let p = root.join(format!("recipe-{race}-{i}.json"));
            std::fs::write(&p, serde_json::to_vec(&recipe(models, *w, out)).unwrap()).unwrap();
            p
        })
        .collect()
}

#[test]
fn four_one_shots_race_one_local_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let models = write_models(&root, 64);
    let mut tally = Tally::default();
    for race in 0..races() {
        let out = root.join(format!("soups/race-{race}"));
        let recipes = write_recipes(&root, &models, &file_url(&out), race);
        let ends = run_writers(&recipes, &[], race);
        judge(&mut tally, race, local_soup(&out), &ends, &WEIGHTS);
    }
    tally.report("4 one-shots, local folder");
    assert_eq!(tally.corrupted, 0, "{tally:?}");
    assert!(tally.conflicts > 0, "no race ever conflicted: {tally:?}");
}

/// moto's S3 server, in its own venv under `target/` (created on first use).
struct Moto {
    child: std::process::Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto() -> Option<Moto> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci-venv-moto");
    let server = venv.join("bin/moto_server");
    if !server.is_file() {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(venv.join("bin/pip"))
                .args(["install", "-q", &format!("moto[server]=={MOTO_VERSION}")])
                .status()
                .is_ok_and(|s| s.success());
        if !made || !server.is_file() {
            loud_skip(
                "the S3 publish race",
                "could not install moto[server] into target/ci-venv-moto (no python3 venv or no PyPI)",
            );
            return None;
        }
    }
    let port = free_port();
    let child = Command::new(&server)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            loud_skip("the S3 publish race", "moto_server did not start");
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(Moto {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_one_shots_race_one_s3_bucket_on_moto() {
    let Some(moto) = moto() else { return };
    let bucket = "race";
    let r = reqwest::Client::new()
        .put(format!("{}/{bucket}", moto.endpoint))
        .send()
        .await
        .expect("create bucket");
    assert!(r.status().is_success(), "create bucket: {}", r.status());
    let store: Arc<dyn ObjectStore> = Arc::new(
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&moto.endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_bucket_name(bucket)
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .build()
            .unwrap(),
    );
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let models = write_models(&root, 64);
    let env: Vec<(String, String)> = [
        ("LADLE_S3_ENDPOINT", moto.endpoint.as_str()),
        ("LADLE_S3_REGION", "us-east-1"),
        ("LADLE_S3_ACCESS_KEY_ID", "test"),
        ("LADLE_S3_SECRET_ACCESS_KEY", "test"),
        ("LADLE_S3_ALLOW_HTTP", "true"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut tally = Tally::default();
    for race in 0..races() {
        let prefix = format!("soups/race-{race}");
        let recipes = write_recipes(&root, &models, &format!("s3://{bucket}/{prefix}/"), race);
        let env2 = env.clone();
        let ends = tokio::task::spawn_blocking(move || run_writers(&recipes, &env2, race))
            .await
            .unwrap();
        let soup = s3_soup(store.as_ref(), &prefix).await;
        judge(&mut tally, race, soup, &ends, &WEIGHTS);
    }
    tally.report("4 one-shots, S3 bucket on moto");
    assert_eq!(tally.corrupted, 0, "{tally:?}");
    assert!(tally.conflicts > 0, "no race ever conflicted: {tally:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_with_separate_databases_race_one_output() {
    use ladle::service::Mode;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let models = write_models(&root, 64);
    let roots = vec![root.display().to_string()];
    let mut services = Vec::new();
    for s in 0..2 {
        let data = root.join(format!("data-{s}"));
        let db = format!("sqlite://{}", data.join("ladle.db").display());
        std::fs::create_dir_all(&data).unwrap();
        services.push(start(&test_settings(&data, &db, roots.clone(), None), Mode::Serve).await);
    }
    let client = reqwest::Client::new();
    let mut tally = Tally::default();
    let n = races().div_ceil(2);
    for race in 0..n {
        let out = root.join(format!("soups/svc-{race}"));
        // Mostly two different recipes; every fourth race the same one (one recovers).
        let weights = if race % 4 == 3 {
            [1.0, 1.0]
        } else {
            [1.0, 2.0]
        };
        let mut ids = Vec::new();
        for (s, (_, base)) in services.iter().enumerate() {
            let (status, v) =
                submit(&client, base, &recipe(&models, weights[s], &file_url(&out))).await;
            assert!(status == 202 || status == 200, "{status}: {v}");
            ids.push(v["id"].as_str().unwrap().to_string());
        }
        let mut ends = Vec::new();
        for ((_, base), id) in services.iter().zip(&ids) {
            let v = wait_terminal(&client, base, id, Duration::from_secs(60)).await;
            ends.push(match (v["state"].as_str(), v["error"]["code"].as_str()) {
                (Some("succeeded"), _) if v["result"]["recovered"] == true => End::Recovered,
                (Some("succeeded"), _) => End::Published,
                (_, Some("output_conflict")) => End::Conflict,
                _ => End::Other(v.to_string()),
            });
        }
        judge(&mut tally, race, local_soup(&out), &ends, &weights);
    }
    tally.report("2 services, separate SQLite databases");
    assert_eq!(tally.corrupted, 0, "{tally:?}");
    for (s, _) in services {
        s.shutdown().await;
    }
}

/// A gate that says the lease is gone (a worker that lost it before publishing).
struct LeaseGone;

#[async_trait::async_trait]
impl ladle::engine::PublishGate for LeaseGone {
    async fn may_publish(&self) -> Result<(), ladle::engine::EngineError> {
        Err(ladle::engine::EngineError::LeaseLost)
    }
}

fn control(
    job: &str,
    attempt: u64,
    gate: Arc<dyn ladle::engine::PublishGate>,
) -> Arc<ladle::engine::RunControl> {
    let mut ctl = ladle::engine::RunControl::standalone();
    ctl.gate = gate;
    ctl.run_info = serde_json::json!({"job_id": job, "attempt": attempt});
    Arc::new(ctl)
}

async fn validated(
    storage: &ladle::storage::Storage,
    body: &serde_json::Value,
) -> ladle::recipe::Recipe {
    let req = ladle::intake::parse(
        &serde_json::to_vec(body).unwrap(),
        ladle::intake::Format::Json,
        None,
    )
    .unwrap();
    ladle::intake::accept(storage, &Default::default(), None, req)
        .await
        .unwrap()
        .submission
        .job
        .recipe
}

/// An attempt that lost its lease races its successor; twin attempts (a lost lease noticed
/// too late: both past the gate) race each other; a dead attempt's staging is removed by the
/// next one, a live writer's is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_lost_and_twin_attempts() {
    use ladle::engine::{AlwaysPublish, Engine, EngineConfig, EngineError};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let models = write_models(&root, 64);
    let storage = Arc::new(
        ladle::storage::Storage::new(Some(&[root.display().to_string()]), Default::default())
            .unwrap(),
    );
    let engine = Engine::new(storage.clone(), EngineConfig::default());
    let mut tally = Tally::default();
    for race in 0..races() {
        let out = root.join(format!("soups/lease-{race}"));
        let r = validated(&storage, &recipe(&models, 2.0, &file_url(&out))).await;
        let job = format!("job{race}");
        // A dead attempt left staging (a partial upload too); a live other writer has some.
        let dead = out.join(format!(".ladle-staging/{job}-1"));
        let live = out.join(".ladle-staging/cli-live");
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::create_dir_all(&live).unwrap();
        std::fs::write(dead.join("model-00001-of-00003.safetensors#7"), b"old").unwrap();
        std::fs::write(live.join("x.safetensors"), b"live").unwrap();
        let (c2, c3) = (
            control(&job, 2, Arc::new(LeaseGone)),
            control(&job, 3, Arc::new(AlwaysPublish)),
        );
        let (lost, next) = tokio::join!(engine.run(&r, &c2), engine.run(&r, &c3));
        // Fenced: its gate says the lease is gone, or its staging was removed under it.
        assert!(lost.is_err(), "the lease-lost attempt published: {lost:?}");
        let next = next.expect("the successor publishes");
        assert!(!dead.exists(), "a dead attempt's staging was left");
        assert_eq!(std::fs::read(live.join("x.safetensors")).unwrap(), b"live");
        std::fs::remove_dir_all(out.join(".ladle-staging")).unwrap();
        let ends = [
            End::Conflict, // the lease-lost attempt published nothing: counted as a loser
            if next.recovered {
                End::Recovered
            } else {
                End::Published
            },
        ];
        judge(&mut tally, race, local_soup(&out), &ends, &[2.0, 2.0]);
        // Twins (two jobs of the same recipe, e.g. in two services): same bytes, one output.
        let twin_out = root.join(format!("soups/twin-{race}"));
        let r = validated(&storage, &recipe(&models, 3.0, &file_url(&twin_out))).await;
        let (c4, c5) = (
            control(&format!("twina{race}"), 1, Arc::new(AlwaysPublish)),
            control(&format!("twinb{race}"), 1, Arc::new(AlwaysPublish)),
        );
        let (a, b) = tokio::join!(engine.run(&r, &c4), engine.run(&r, &c5));
        let end = |o: Result<ladle::engine::MergeOutcome, EngineError>| match o {
            Ok(o) if o.recovered => End::Recovered,
            Ok(_) => End::Published,
            Err(e) if e.code() == ladle::error::ErrorCode::OutputConflict => End::Conflict,
            Err(e) => End::Other(e.to_string()),
        };
        judge(
            &mut tally,
            race,
            local_soup(&twin_out),
            &[end(a), end(b)],
            &[3.0, 3.0],
        );
    }
    tally.report("lease-lost attempt vs successor, twin attempts");
    assert_eq!(tally.corrupted, 0, "{tally:?}");
}

/// Run `ladle merge` held at the `shard-written` pause point; `change` runs while it is held.
/// Returns the exit and stderr.
fn merge_with_change(
    recipe_path: &Path,
    env: &[(String, String)],
    pause_dir: &Path,
    change: impl FnOnce(),
) -> (bool, String) {
    std::fs::create_dir_all(pause_dir).unwrap();
    let child = Command::new(LADLE)
        .args(["merge", "--quiet"])
        .arg(recipe_path)
        .envs(env.iter().cloned())
        .env("LADLE_TEST_PAUSE_AT", "shard-written")
        .env("LADLE_TEST_PAUSE_DIR", pause_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let reached = pause_dir.join("shard-written.reached");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reached.exists() {
        assert!(
            Instant::now() < deadline,
            "the merge never reached its pause point"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    change();
    std::fs::write(pause_dir.join("shard-written.go"), b"").unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Nothing was published, and nothing is left: the output folder (which the run made) is
/// gone, not even left empty.
fn assert_nothing_published(out: &Path) {
    let files: Vec<String> = walk_files(out);
    assert!(files.is_empty(), "left in the output: {files:?}");
    assert!(
        std::fs::symlink_metadata(out).is_err(),
        "the output folder {} was left behind",
        out.display()
    );
}

fn walk_files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            } else {
                found.push(e.path().display().to_string());
            }
        }
    }
    found
}

#[test]
fn an_input_renamed_over_or_written_in_place_mid_merge_is_input_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let models = write_models(&root, 64);
    let shard = models[1].join("model-00001-of-00002.safetensors");
    for case in ["rename-replace", "in-place"] {
        let out = root.join(format!("soups/changed-{case}"));
        let rp = root.join(format!("recipe-{case}.json"));
        std::fs::write(
            &rp,
            serde_json::to_vec(&recipe(&models, 2.0, &file_url(&out))).unwrap(),
        )
        .unwrap();
        let original = std::fs::read(&shard).unwrap();
        let (ok, err) = merge_with_change(&rp, &[], &root.join(format!("pause-{case}")), || {
            let mut changed = original.clone();
            let n = changed.len();
            changed[n - 4..].copy_from_slice(&[9, 9, 9, 9]);
            if case == "rename-replace" {
                // As trainers save: a new file renamed over the old one.
                let tmp = models[1].join(".tmp-save");
                std::fs::write(&tmp, &changed).unwrap();
                std::fs::rename(&tmp, &shard).unwrap();
            } else {
                use std::os::unix::fs::FileExt;
                std::thread::sleep(Duration::from_millis(20));
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&shard)
                    .unwrap()
                    .write_all_at(&[9, 9, 9, 9], (n - 4) as u64)
                    .unwrap();
            }
        });
        assert!(!ok, "{case}: the merge succeeded");
        assert!(err.contains("[input_changed]"), "{case}: {err}");
        assert!(
            err.contains("model-1/model-00001-of-00002.safetensors"),
            "{case}: the file is not named: {err}"
        );
        assert_nothing_published(&out);
        std::fs::write(&shard, &original).unwrap();
        eprintln!("input_changed ({case}): {}", err.trim());
    }
    // Unchanged inputs: the same merge publishes, and the manifest records their identity.
    let out = root.join("soups/unchanged");
    let rp = root.join("recipe-unchanged.json");
    std::fs::write(
        &rp,
        serde_json::to_vec(&recipe(&models, 2.0, &file_url(&out))).unwrap(),
    )
    .unwrap();
    let (ok, err) = merge_with_change(&rp, &[], &root.join("pause-unchanged"), || {});
    assert!(ok, "{err}");
    let (m, _) = local_soup(&out).unwrap();
    let f = &m["inputs"][1]["files"][0];
    assert!(
        f["inode"].as_u64().is_some() && f["mtime"].is_string(),
        "{m}"
    );
    // Input URLs keep their leading `/` (finding 10: they once came out as `file://tmp/…`).
    assert_eq!(m["inputs"][1]["uri"], file_url(&models[1]), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_input_whose_etag_changes_mid_merge_is_input_changed() {
    let Some(s3) = S3Server::start() else {
        loud_skip(
            "the S3 input_changed test",
            "s3s-fs is not installed (.ci/run installs it)",
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let models = write_models(&root, 64);
    let store = s3.store();
    for (m, dir) in models.iter().enumerate() {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let key = format!("in/model-{m}/{}", e.file_name().to_string_lossy());
            let bytes = std::fs::read(e.path()).unwrap();
            store
                .put(&object_store::path::Path::from(key), bytes.into())
                .await
                .unwrap();
        }
    }
    let out = root.join("soups/s3-changed");
    let mut body = recipe(&models, 2.0, &file_url(&out));
    for m in 0..2 {
        body["models"][m]["uri"] = format!("s3://{BUCKET}/in/model-{m}/").into();
    }
    let rp = root.join("recipe-s3.json");
    std::fs::write(&rp, serde_json::to_vec(&body).unwrap()).unwrap();
    let a = s3.args();
    let env: Vec<(String, String)> = [
        ("LADLE_S3_ENDPOINT", a.s3_endpoint.unwrap_or_default()),
        ("LADLE_S3_REGION", "us-east-1".into()),
        (
            "LADLE_S3_ACCESS_KEY_ID",
            a.s3_access_key_id.unwrap_or_default(),
        ),
        (
            "LADLE_S3_SECRET_ACCESS_KEY",
            a.s3_secret_access_key.unwrap_or_default(),
        ),
        ("LADLE_S3_ALLOW_HTTP", "true".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let key = object_store::path::Path::from("in/model-1/model-00001-of-00002.safetensors");
    let mut changed = store
        .get(&key)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let n = changed.len();
    changed[n - 4..].copy_from_slice(&[9, 9, 9, 9]);
    let (put_store, put_key) = (store.clone(), key.clone());
    let handle = tokio::runtime::Handle::current();
    let (ok, err) = tokio::task::spawn_blocking(move || {
        merge_with_change(&rp, &env, &root.join("pause-s3"), || {
            handle
                .block_on(put_store.put(&put_key, changed.into()))
                .unwrap();
        })
    })
    .await
    .unwrap();
    assert!(!ok, "the merge succeeded");
    assert!(err.contains("[input_changed]"), "{err}");
    assert!(err.contains("model-00001-of-00002.safetensors"), "{err}");
    assert_nothing_published(&out);
    eprintln!("input_changed (S3 ETag): {}", err.trim());
}

/// A 256 KiB tmpfs at `root/small-disk`, unmounted on drop; `None` (after a loud SKIP line
/// naming `what`) where no tmpfs can be mounted (not root).
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(root: &Path, what: &str) -> Option<SmallDisk> {
        let disk = root.join("small-disk");
        std::fs::create_dir_all(&disk).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
            .arg(&disk)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            loud_skip(what, "cannot mount a tmpfs (needs root; CI runs as root)");
            return None;
        }
        Some(SmallDisk(disk))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_output_disk_is_storage_full_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    // 6 tensors of 256×64 f32 per model: a 384 KiB soup on a 256 KiB file system.
    let models = write_models(&root, 256);
    let Some(small) = SmallDisk::mount(&root, "the storage_full test") else {
        return;
    };
    let disk = small.0.clone();
    let out = disk.join("soup");
    let rp = root.join("recipe-full.json");
    std::fs::write(
        &rp,
        serde_json::to_vec(&recipe(&models, 2.0, &file_url(&out))).unwrap(),
    )
    .unwrap();
    let run = Command::new(LADLE)
        .args(["merge", "--quiet"])
        .arg(&rp)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(err.contains("[storage_full]"), "{err}");
    let left = walk_files(&disk);
    assert!(left.is_empty(), "partial files left: {left:?}");
    assert!(!out.exists(), "the output folder was left behind, empty");
    eprintln!("storage_full: {}", err.trim());
}

/// In the service: a job that fills its output disk fails with `storage_full` on its first
/// attempt, unless `retry_storage_full` is set, when it is retried (with the usual backoff)
/// up to its `max_attempts`. Nothing is left on the disk either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_full_is_retried_only_when_configured() {
    use ladle::service::Mode;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let models = write_models(&root, 256);
    let Some(small) = SmallDisk::mount(&root, "the retry_storage_full test") else {
        return;
    };
    let client = reqwest::Client::new();
    for retry in [false, true] {
        let data = root.join(format!("data-{retry}"));
        let db = format!("sqlite://{}", data.join("ladle.db").display());
        std::fs::create_dir_all(&data).unwrap();
        let mut settings = test_settings(&data, &db, vec![root.display().to_string()], None);
        settings.worker.retry_storage_full = retry;
        let (svc, base) = start(&settings, Mode::Serve).await;
        let out = small.0.join(format!("soup-{retry}"));
        let mut body = recipe(&models, 2.0, &file_url(&out));
        body["max_attempts"] = 2.into();
        let done = submit_and_wait(&client, &base, &body).await;
        assert_eq!(done["state"], "failed", "{done}");
        assert_eq!(done["error"]["code"], "storage_full", "{done}");
        let attempts = if retry { 2 } else { 1 };
        assert_eq!(
            done["attempts"], attempts,
            "retry_storage_full={retry}: {done}"
        );
        let left = walk_files(&small.0);
        assert!(left.is_empty(), "partial files left: {left:?}");
        assert!(!out.exists(), "the output folder was left behind, empty");
        svc.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_rules_at_submit() {
    use ladle::service::Mode;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let models = write_models(&root, 64);
    let data = root.join("data");
    let db = format!("sqlite://{}", data.join("ladle.db").display());
    std::fs::create_dir_all(&data).unwrap();
    let (svc, base) = start(
        &test_settings(&data, &db, vec![root.display().to_string()], None),
        Mode::Serve,
    )
    .await;
    let client = reqwest::Client::new();
    // The data directory, and any folder inside it: refused, also with overwrite.
    for out in [data.clone(), data.join("soups/x")] {
        for overwrite in [false, true] {
            let mut body = recipe(&models, 2.0, &file_url(&out));
            body["output"]["overwrite"] = overwrite.into();
            let (status, v) = submit(&client, &base, &body).await;
            assert_eq!(status, 403, "{}: {v}", out.display());
            assert_eq!(v["code"], "storage_not_allowed", "{v}");
            assert!(v.to_string().contains("output"), "{v}");
        }
    }
    // A folder holding a user's files: refused, naming the field and a file.
    let out = root.join("mine");
    std::fs::create_dir_all(out.join("sub")).unwrap();
    std::fs::write(out.join("notes.txt"), b"keep me").unwrap();
    std::fs::write(out.join("config.json"), b"{\"mine\": true}").unwrap();
    let (status, v) = submit(&client, &base, &recipe(&models, 2.0, &file_url(&out))).await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["code"], "output_not_empty", "{v}");
    assert!(v.to_string().contains("notes.txt"), "{v}");
    // overwrite: written beside them, never over them: config.json is taken → conflict.
    let mut body = recipe(&models, 2.0, &file_url(&out));
    body["output"]["overwrite"] = true.into();
    let done = submit_and_wait(&client, &base, &body).await;
    assert_eq!(done["error"]["code"], "output_conflict", "{done}");
    assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"keep me");
    assert_eq!(
        std::fs::read(out.join("config.json")).unwrap(),
        b"{\"mine\": true}"
    );
    // Without the clash it publishes beside the user's file, which stays.
    std::fs::remove_file(out.join("config.json")).unwrap();
    let mut body = recipe(&models, 3.0, &file_url(&out));
    body["output"]["overwrite"] = true.into();
    let done = submit_and_wait(&client, &base, &body).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"keep me");
    assert!(out.join(MANIFEST).is_file());
    // A folder holding a complete soup is not foreign: the same recipe again is accepted.
    let (status, v) = submit(&client, &base, &body).await;
    assert!(status == 202 || status == 200, "{status}: {v}");
    svc.shutdown().await;
}

/// Submit `body`, expect 202, and wait (60 s at most) for the job to end; returns the job.
async fn submit_and_wait(
    client: &reqwest::Client,
    base: &str,
    body: &serde_json::Value,
) -> serde_json::Value {
    let (status, v) = submit(client, base, body).await;
    assert_eq!(status, 202, "{v}");
    wait_terminal(
        client,
        base,
        v["id"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await
}

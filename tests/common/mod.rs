//! Shared test support: a real S3-protocol server (s3s-fs) on a random port, checkpoint
//! generation with the independent `safetensors` crate, and the real service on a random port.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ladle::config::{S3Args, ServiceArgs, Settings, TuningArgs};
use ladle::service::{Mode, Service};
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use safetensors::tensor::TensorView;

pub const BUCKET: &str = "ladle-test";
pub const ACCESS_KEY: &str = "test";
pub const SECRET_KEY: &str = "testtesttest";

/// Print a line nobody can miss when a test part is skipped.
pub fn loud_skip(what: &str, why: &str) {
    use std::io::Write as _;
    // Straight to the stderr handle: libtest captures `eprintln!` of a passing test.
    let _ = writeln!(
        std::io::stderr(),
        "\n==================== SKIPPED: {what} ({why}) ====================\n"
    );
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// An s3s-fs process serving one bucket from a temp dir; killed on drop.
pub struct S3Server {
    pub endpoint: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl S3Server {
    /// Start s3s-fs if the binary is installed (`.ci/run` installs it), else `None`.
    pub fn start() -> Option<S3Server> {
        let bin = find_s3s_fs()?;
        let dir = tempfile::tempdir().ok()?;
        std::fs::create_dir_all(dir.path().join(BUCKET)).ok()?;
        let port = free_port();
        let child = Command::new(bin)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--access-key",
                ACCESS_KEY,
                "--secret-key",
                SECRET_KEY,
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(S3Server {
            endpoint: format!("http://127.0.0.1:{port}"),
            child,
            _dir: dir,
        })
    }

    pub fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(&self.endpoint)
                .with_allow_http(true)
                .with_region("us-east-1")
                .with_bucket_name(BUCKET)
                .with_access_key_id(ACCESS_KEY)
                .with_secret_access_key(SECRET_KEY)
                .build()
                .expect("s3 store"),
        )
    }

    pub fn args(&self) -> S3Args {
        S3Args {
            s3_endpoint: Some(self.endpoint.clone()),
            s3_region: Some("us-east-1".into()),
            s3_access_key_id: Some(ACCESS_KEY.into()),
            s3_secret_access_key: Some(SECRET_KEY.into()),
            s3_allow_http: Some(true),
            s3_virtual_hosted_style: Some(false),
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_s3s_fs() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("LADLE_TEST_S3S_FS") {
        return Some(PathBuf::from(p));
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("s3s-fs"))
                .collect()
        })
        .unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(h) = cargo_home {
        candidates.push(h.join("bin/s3s-fs"));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// A tensor to write: name, safetensors dtype, shape, raw little-endian bytes.
#[derive(Clone, Debug)]
pub struct RawTensor {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Deterministic pseudo-random floats in [-2, 2) with a few special values mixed in.
pub fn floats(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|i| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            match i % 97 {
                13 => 0.0,
                29 => -0.0,
                41 => 1.0e-39, // f32 subnormal
                _ => ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0,
            }
        })
        .collect()
}

pub fn bf16_tensor(name: &str, shape: &[usize], seed: u64) -> RawTensor {
    let n: usize = shape.iter().product();
    let data = floats(seed, n)
        .into_iter()
        .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
        .collect();
    RawTensor {
        name: name.into(),
        dtype: safetensors::Dtype::BF16,
        shape: shape.to_vec(),
        data,
    }
}

pub fn f32_tensor(name: &str, shape: &[usize], seed: u64) -> RawTensor {
    let n: usize = shape.iter().product();
    let data = floats(seed, n)
        .into_iter()
        .flat_map(f32::to_le_bytes)
        .collect();
    RawTensor {
        name: name.into(),
        dtype: safetensors::Dtype::F32,
        shape: shape.to_vec(),
        data,
    }
}

pub fn i64_tensor(name: &str, n: usize, seed: u64) -> RawTensor {
    let data = (0..n as i64)
        .flat_map(|i| (i * 7 + seed as i64).to_le_bytes())
        .collect();
    RawTensor {
        name: name.into(),
        dtype: safetensors::Dtype::I64,
        shape: vec![n],
        data,
    }
}

/// Serialize with the `safetensors` crate (independent of ladle's writer).
pub fn safetensors_bytes(tensors: &[RawTensor]) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.data).expect("tensor view"),
            )
        })
        .collect();
    safetensors::tensor::serialize(views, None).expect("serialize")
}

/// Write a sharded HF folder: tensors split over `shards` files plus the index.
pub fn write_sharded(dir: &Path, tensors: &[RawTensor], shards: usize) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut weight_map = serde_json::Map::new();
    let per = tensors.len().div_ceil(shards);
    for (i, chunk) in tensors.chunks(per).enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        for t in chunk {
            weight_map.insert(t.name.clone(), serde_json::Value::String(name.clone()));
        }
        files.push((name, safetensors_bytes(chunk)));
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    files.push((
        "model.safetensors.index.json".into(),
        serde_json::to_vec_pretty(&index).expect("json"),
    ));
    std::fs::create_dir_all(dir).expect("mkdir");
    for (name, bytes) in &files {
        std::fs::write(dir.join(name), bytes).expect("write");
    }
    files
}

/// Decode a tensor's values to f32 (independent of ladle's conversion code).
pub fn to_f32(dtype: safetensors::Dtype, data: &[u8]) -> Vec<f32> {
    match dtype {
        safetensors::Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect(),
        safetensors::Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        safetensors::Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        other => panic!("not a float dtype: {other:?}"),
    }
}

/// Settings for a test service: random port, temp data dir, fast timings.
pub fn test_settings(
    data_dir: &Path,
    database_url: &str,
    roots: Vec<String>,
    s3: Option<&S3Server>,
) -> Settings {
    let args = ServiceArgs {
        bind: Some("127.0.0.1:0".parse().expect("addr")),
        data_dir: Some(data_dir.to_path_buf()),
        database_url: Some(database_url.to_string()),
        allowed_roots: roots,
        workers: Some(2),
        s3: s3.map(S3Server::args).unwrap_or_default(),
        tuning: TuningArgs {
            lease_ttl_secs: Some(6.0),
            heartbeat_secs: Some(1.0),
            poll_secs: Some(0.2),
            backoff_secs: Some(1.0),
            shutdown_grace_secs: Some(5.0),
            chunk_elems: Some(1024),
            ..Default::default()
        },
        ..Default::default()
    };
    Settings::resolve(args, None).expect("settings")
}

pub async fn start(settings: &Settings, mode: Mode) -> (Service, String) {
    let service = Service::start(settings, mode).await.expect("service start");
    let base = service
        .addr
        .map(|a| format!("http://{a}"))
        .unwrap_or_default();
    (service, base)
}

/// A throw-away Postgres database on the server `LADLE_TEST_POSTGRES_URL` names; dropped (best
/// effort, even when the test panics) on drop.
pub struct PgDb {
    admin_url: String,
    name: String,
    pub url: String,
}

impl PgDb {
    /// `None` when `LADLE_TEST_POSTGRES_URL` is unset.
    pub async fn create() -> Option<PgDb> {
        use sqlx::{Connection, Executor};
        let admin_url = std::env::var("LADLE_TEST_POSTGRES_URL").ok()?;
        let name = format!("ladle_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .expect("connect to LADLE_TEST_POSTGRES_URL");
        admin
            .execute(format!("CREATE DATABASE \"{name}\"").as_str())
            .await
            .expect("create test database");
        let _ = admin.close().await;
        let mut url = url::Url::parse(&admin_url).expect("LADLE_TEST_POSTGRES_URL is a URL");
        url.set_path(&format!("/{name}"));
        Some(PgDb {
            admin_url,
            name,
            url: url.to_string(),
        })
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // A fresh runtime on its own thread: this may run inside the test's runtime.
        let dropper = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                use sqlx::{Connection, Executor};
                if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await {
                    let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                    let _ = admin.execute(sql.as_str()).await;
                    let _ = admin.close().await;
                }
            });
        });
        let _ = dropper.join();
    }
}

/// Poll a job until it reaches a terminal state.
pub async fn wait_terminal(
    client: &reqwest::Client,
    base: &str,
    id: &str,
    timeout: Duration,
) -> serde_json::Value {
    wait_job(client, base, "merges", id, timeout).await
}

/// Poll `GET {base}/v1/{kind}/{id}` (`kind`: `merges` or `analyses`) until the job is
/// terminal; its JSON.
pub async fn wait_job(
    client: &reqwest::Client,
    base: &str,
    kind: &str,
    id: &str,
    timeout: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let v: serde_json::Value = client
            .get(format!("{base}/v1/{kind}/{id}"))
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json");
        let state = v["state"].as_str().unwrap_or_default().to_string();
        if ["succeeded", "failed", "cancelled"].contains(&state.as_str()) {
            return v;
        }
        assert!(Instant::now() < deadline, "job {id} stuck in {state}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub mod compare;
pub mod mergekit_tokenizer;
/// The real `ladle` binary as child processes, throw-away Postgres databases, a chaos proxy.
pub mod procs;
pub mod soup;

/// A stand-in `tokenizer.json`: a WordLevel vocabulary of `rows` tokens (`t0`, `t1`, …, as
/// many as the stand-ins' embedding rows, so a build naming only a source moves nothing and
/// copies the files as they are), `"v": v` telling the files apart byte for byte.
pub fn stand_in_tokenizer(v: u64, rows: usize) -> String {
    let vocab: Vec<String> = (0..rows).map(|i| format!(r#""t{i}": {i}"#)).collect();
    format!(
        r#"{{"v": {v}, "model": {{"type": "WordLevel", "vocab": {{{}}}}}}}"#,
        vocab.join(", ")
    )
}

/// A local path as a `file://` URL.
pub fn file_url(p: &Path) -> String {
    url::Url::from_file_path(p).expect("file url").to_string()
}

/// POST a JSON recipe; the status and the JSON answer (null when the body is not JSON).
pub async fn submit(
    client: &reqwest::Client,
    base: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = client
        .post(format!("{base}/v1/merges"))
        .json(body)
        .send()
        .await
        .expect("post");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// SHA-256 (hex) of every `.safetensors` file of a folder, by file name.
pub fn tensor_digests(dir: &Path) -> std::collections::BTreeMap<String, String> {
    use sha2::Digest as _;
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|p| {
            (
                p.file_name()
                    .expect("file name")
                    .to_string_lossy()
                    .into_owned(),
                hex::encode(sha2::Sha256::digest(std::fs::read(&p).expect("read"))),
            )
        })
        .collect()
}

/// Runs the `ladle` binary in `cwd` and waits for it.
pub fn ladle_in(cwd: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ladle"))
        .current_dir(cwd)
        .args(args)
        .output()
        .expect("run ladle")
}

/// A JSON file's value.
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json")
}

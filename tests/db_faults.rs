//! Database faults while serving: a full data directory (a small tmpfs mounted by the test),
//! the database file deleted or replaced under the service, and a Postgres that turned
//! read-only. A submit is never answered 202 for a job that is not stored; it gets 503
//! `database_unavailable`, and `/readyz` says not ready until the fault is gone.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ladle::service::Mode;
use serde_json::{Value, json};

use common::*;

/// A tmpfs of `size` mounted on a fresh temp folder; unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (after a loud skip) when mounting is not possible here (not root, no tmpfs).
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            loud_skip(
                "full-disk tests",
                "cannot mount a tmpfs (they need root: CI runs as root)",
            );
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Fill the file system holding `dir` to its last byte; the filler file's path.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    for chunk in [1 << 16, 512, 1] {
        let buf = vec![0u8; chunk];
        while f.write_all(&buf).is_ok() {}
    }
    let _ = f.sync_all();
    path
}

/// Where the soups go: beside the data directory (no output may lie inside it), an allowed
/// root of its own.
fn soups(data: &Path) -> std::path::PathBuf {
    let dir = data.parent().expect("data has a parent").join("soups");
    std::fs::create_dir_all(&dir).expect("soups folder");
    dir
}

fn recipe(data: &Path, i: usize) -> Value {
    json!({
        "method": "linear",
        "models": [{"uri": file_url(&data.join("a"))}, {"uri": file_url(&data.join("b"))}],
        "output": {"uri": file_url(&soups(data).join(format!("out-{i}")))},
    })
}

async fn readyz(client: &reqwest::Client, base: &str) -> (u16, Value) {
    let r = client.get(format!("{base}/readyz")).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn job_status(client: &reqwest::Client, base: &str, id: &str) -> u16 {
    client
        .get(format!("{base}/v1/merges/{id}"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A 503 `database_unavailable` answer.
fn assert_unavailable(status: u16, v: &Value) {
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["code"], "database_unavailable", "{v}");
}

/// A service (API only) over SQLite in `data`.
async fn sqlite_service(data: &Path) -> (ladle::service::Service, String) {
    let db = format!("sqlite://{}", data.join("ladle.db").display());
    let roots = vec![soups(data).display().to_string()];
    start(&test_settings(data, &db, roots, None), Mode::Api).await
}

/// 40 submits to a service whose data directory is full: each is either stored (202, and
/// found by GET, also after a restart) or refused with 503 `database_unavailable`; `/readyz`
/// is 503 while the disk is full and 200 once space is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_directory_never_acknowledges_a_lost_job() {
    let Some(fs) = Tmpfs::mount("8m") else { return };
    let data = fs.path().join("data");
    for m in ["a", "b"] {
        std::fs::create_dir_all(data.join(m)).unwrap();
    }
    let client = reqwest::Client::new();
    let (service, base) = sqlite_service(&data).await;
    assert_eq!(readyz(&client, &base).await.0, 200);
    let (status, v) = submit(&client, &base, &recipe(&data, 0)).await;
    assert_eq!(status, 202, "{v}");
    let mut stored = vec![v["id"].as_str().unwrap().to_string()];

    let filler = fill(fs.path());
    let mut refused = 0;
    for i in 1..=40 {
        let (status, v) = submit(&client, &base, &recipe(&data, i)).await;
        match status {
            202 => stored.push(v["id"].as_str().unwrap().to_string()),
            503 => {
                assert_unavailable(status, &v);
                refused += 1;
            }
            other => panic!("submit {i} on a full disk: {other} {v}"),
        }
    }
    {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "full disk: 40 submits, {refused} refused with 503, {} stored",
            stored.len() - 1
        );
    }
    assert!(
        refused > 0,
        "the full disk refused no submit: the test filled nothing"
    );
    for id in &stored {
        assert_eq!(
            job_status(&client, &base, id).await,
            200,
            "job {id} acknowledged, not stored"
        );
    }
    let (status, v) = readyz(&client, &base).await;
    assert_unavailable(status, &v);

    std::fs::remove_file(&filler).unwrap();
    assert_eq!(
        readyz(&client, &base).await.0,
        200,
        "not ready once space is back"
    );
    let (status, v) = submit(&client, &base, &recipe(&data, 99)).await;
    assert_eq!(status, 202, "{v}");
    stored.push(v["id"].as_str().unwrap().to_string());
    service.shutdown().await;

    // What was acknowledged is in the file, not only in a connection's cache.
    let (service, base) = sqlite_service(&data).await;
    for id in &stored {
        assert_eq!(
            job_status(&client, &base, id).await,
            200,
            "job {id} lost by a restart"
        );
    }
    service.shutdown().await;
}

/// The database file renamed away or replaced by another file while the service runs: the
/// open connections would write into a file nobody will read again, so submits get 503
/// `database_unavailable` and `/readyz` 503; back in place, all is well again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_or_replaced_database_file_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let db = data.join("ladle.db");
    let client = reqwest::Client::new();
    let (service, base) = sqlite_service(&data).await;
    let (status, v) = submit(&client, &base, &recipe(&data, 0)).await;
    assert_eq!(status, 202, "{v}");

    let moved = data.join("moved.db");
    std::fs::rename(&db, &moved).unwrap();
    let (status, v) = readyz(&client, &base).await;
    assert_unavailable(status, &v);
    let (status, v) = submit(&client, &base, &recipe(&data, 1)).await;
    assert_unavailable(status, &v);

    std::fs::rename(&moved, &db).unwrap();
    assert_eq!(readyz(&client, &base).await.0, 200);
    let (status, v) = submit(&client, &base, &recipe(&data, 2)).await;
    assert_eq!(status, 202, "{v}");

    // Same name, another file (another inode).
    std::fs::copy(&db, &moved).unwrap();
    std::fs::rename(&moved, &db).unwrap();
    let (status, v) = readyz(&client, &base).await;
    assert_unavailable(status, &v);
    let (status, v) = submit(&client, &base, &recipe(&data, 3)).await;
    assert_unavailable(status, &v);
    service.shutdown().await;
}

/// A Postgres database switched to read-only (`default_transaction_read_only`, its sessions
/// restarted): submits get 503 `database_unavailable`, `/readyz` 503; switched back, 202.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_postgres_is_unavailable() {
    use sqlx::{Connection, Executor};
    let Some(pg) = PgDb::create().await else {
        loud_skip(
            "read-only Postgres test",
            "LADLE_TEST_POSTGRES_URL is not set",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let client = reqwest::Client::new();
    let roots = vec![soups(&data).display().to_string()];
    let (service, base) = start(&test_settings(&data, &pg.url, roots, None), Mode::Api).await;
    let (status, v) = submit(&client, &base, &recipe(&data, 0)).await;
    assert_eq!(status, 202, "{v}");

    // This session keeps the old default, so it can switch the database back.
    let mut admin = sqlx::PgConnection::connect(&pg.url).await.unwrap();
    let set_read_only = |on: bool| {
        format!(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET \
             default_transaction_read_only = {}', current_database()); END $$",
            if on { "on" } else { "off" }
        )
    };
    let restart_sessions = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                            WHERE datname = current_database() AND pid <> pg_backend_pid()";
    admin.execute(set_read_only(true).as_str()).await.unwrap();
    admin.execute(restart_sessions).await.unwrap();
    for i in 1..=3 {
        let (status, v) = submit(&client, &base, &recipe(&data, i)).await;
        assert_eq!(
            (status, &v["code"]),
            (503, &json!("database_unavailable")),
            "{v}"
        );
    }
    let (status, v) = readyz(&client, &base).await;
    assert_unavailable(status, &v);

    admin.execute(set_read_only(false).as_str()).await.unwrap();
    admin.execute(restart_sessions).await.unwrap();
    // The first request after the restart may meet a connection that died with it.
    let mut ready = 0;
    for _ in 0..20 {
        ready = readyz(&client, &base).await.0;
        if ready == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready, 200);
    let (status, v) = submit(&client, &base, &recipe(&data, 9)).await;
    assert_eq!(status, 202, "{v}");
    let _ = admin.close().await;
    service.shutdown().await;
}

//! The real `ladle` binary: one-shot merges, start-up checks, and `serve` over HTTP.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const LADLE: &str = env!("CARGO_BIN_EXE_ladle");

#[test]
fn one_shot_merge_writes_a_complete_soup() {
    let dir = tempfile::tempdir().unwrap();
    let a = vec![bf16_tensor("w", &[50, 40], 1), f32_tensor("b", &[40], 2)];
    let b = vec![bf16_tensor("w", &[50, 40], 3), f32_tensor("b", &[40], 4)];
    for (name, t) in [("a", &a), ("b", &b)] {
        std::fs::create_dir_all(dir.path().join(name)).unwrap();
        std::fs::write(
            dir.path().join(name).join("model.safetensors"),
            safetensors_bytes(t),
        )
        .unwrap();
    }
    let recipe = dir.path().join("recipe.json");
    std::fs::write(
        &recipe,
        r#"{"method": "linear", "models": [{"uri": "a", "weight": 3}, {"uri": "b", "weight": 1}],
            "output": {"uri": "file:///placeholder", "dtype": "float32"}}"#,
    )
    .unwrap();
    let out = dir.path().join("soup");
    let run = Command::new(LADLE)
        .args(["merge", "--quiet", "--out"])
        .arg(&out)
        .arg(&recipe)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(printed["files"][0]["path"], "model.safetensors");
    assert!(out.join("ladle-manifest.json").is_file());
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let w = st.tensor("w").unwrap();
    assert_eq!(w.dtype(), safetensors::Dtype::F32);
    let got = to_f32(w.dtype(), w.data());
    let xa = to_f32(safetensors::Dtype::BF16, &a[0].data);
    let xb = to_f32(safetensors::Dtype::BF16, &b[0].data);
    for i in 0..got.len() {
        let want = 1.0f32.mul_add(xb[i], 3.0f32.mul_add(xa[i], 0.0)) / 4.0;
        assert_eq!(got[i].to_bits(), want.to_bits(), "element {i}");
    }
    // A second run onto the same output finds the complete soup and changes nothing.
    let again = Command::new(LADLE)
        .args(["merge", "--quiet", "--out"])
        .arg(&out)
        .arg(&recipe)
        .output()
        .unwrap();
    assert!(again.status.success());
    let printed: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(printed["recovered"], true);
    // Another recipe onto the same output is a conflict, not an overwrite.
    std::fs::write(
        &recipe,
        r#"{"method": "linear", "models": [{"uri": "a"}, {"uri": "b"}], "output": {"uri": "file:///x"}}"#,
    )
    .unwrap();
    let conflict = Command::new(LADLE)
        .args(["merge", "--quiet", "--out"])
        .arg(&out)
        .arg(&recipe)
        .output()
        .unwrap();
    assert!(!conflict.status.success());
    assert!(String::from_utf8_lossy(&conflict.stderr).contains("output_conflict"));
}

#[test]
fn unknown_ladle_variable_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let run = Command::new(LADLE)
        .arg("serve")
        .env("LADLE_WORKRES", "2")
        .env("LADLE_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("LADLE_WORKRES"), "{err}");
}

#[test]
fn serve_answers_health_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = Command::new(LADLE)
        .arg("serve")
        .env("LADLE_BIND", format!("127.0.0.1:{port}"))
        .env("LADLE_DATA_DIR", dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        if let Ok(r) = http::get(&format!("http://127.0.0.1:{port}/readyz")) {
            break r;
        }
        assert!(Instant::now() < deadline, "serve did not answer");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(body.contains("\"ready\""), "{body}");
    assert!(
        dir.path().join("ladle.db").is_file(),
        "SQLite lives in the data dir"
    );
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "clean exit on SIGTERM: {status}");
            break;
        }
        assert!(Instant::now() < deadline, "serve ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
}

mod http {
    /// A tiny blocking GET over a plain TCP socket (keeps the test free of a blocking client).
    pub fn get(url: &str) -> std::io::Result<String> {
        use std::io::{Read, Write};
        let rest = url.trim_start_matches("http://");
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut s = std::net::TcpStream::connect(host)?;
        write!(
            s,
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }
}

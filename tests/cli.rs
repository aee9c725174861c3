//! The real `ladle` binary: one-shot merges, start-up checks, and `serve` over HTTP.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const LADLE: &str = env!("CARGO_BIN_EXE_ladle");

/// Output that went to a pipe or a file holds no ANSI escape codes.
fn assert_no_colour(text: &str) {
    assert!(!text.contains('\u{1b}'), "ANSI escape codes: {text:?}");
}

/// A single-file checkpoint folder.
fn write_model(dir: &std::path::Path, tensors: &[RawTensor]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("model.safetensors"), safetensors_bytes(tensors)).unwrap();
}

#[test]
fn one_shot_merge_writes_a_complete_soup() {
    let dir = tempfile::tempdir().unwrap();
    let a = vec![bf16_tensor("w", &[50, 40], 1), f32_tensor("b", &[40], 2)];
    let b = vec![bf16_tensor("w", &[50, 40], 3), f32_tensor("b", &[40], 4)];
    write_model(&dir.path().join("a"), &a);
    write_model(&dir.path().join("b"), &b);
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
    let err = String::from_utf8_lossy(&conflict.stderr);
    // Printed once (not also as a log record), without colour codes in a file or pipe.
    assert_eq!(err.matches("output_conflict").count(), 1, "{err}");
    assert_no_colour(&err);
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

/// `serve` with nothing running, and a client holding an idle keep-alive connection, exits
/// cleanly within a second of SIGTERM; its log (stderr to a file) has no colour codes.
#[test]
fn serve_answers_health_and_stops_on_sigterm() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = dir.path().join("serve.log");
    let mut child = Command::new(LADLE)
        .arg("serve")
        .env("LADLE_BIND", format!("127.0.0.1:{port}"))
        .env("LADLE_DATA_DIR", dir.path())
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
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
    let mut idle = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(idle, "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let pid = child.id().to_string();
    let sent = Instant::now();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let deadline = sent + Duration::from_secs(20);
    let took = loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "clean exit on SIGTERM: {status}");
            break sent.elapsed();
        }
        assert!(Instant::now() < deadline, "serve ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    {
        let _ = writeln!(std::io::stderr(), "serve exited {took:?} after SIGTERM");
    }
    assert!(
        took < Duration::from_secs(1),
        "serve took {took:?} to exit after SIGTERM"
    );
    drop(idle);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("shutting down"), "{text}");
    assert_no_colour(&text);
}

/// A greedy soup from `ladle merge` with `HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY` pointing at a
/// listener: the evaluator on loopback is called directly, the "proxy" is never contacted.
#[test]
fn the_evaluator_client_ignores_proxy_variables() {
    use std::io::{Read, Write};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    for (name, seed) in [("a", 1), ("b", 2)] {
        write_model(&dir.path().join(name), &[f32_tensor("w", &[8, 4], seed)]);
    }
    // The "proxy": counts connections and hangs up.
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_port = proxy.local_addr().unwrap().port();
    let proxied = Arc::new(AtomicUsize::new(0));
    let count = proxied.clone();
    std::thread::spawn(move || {
        for conn in proxy.incoming() {
            drop(conn);
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    // The evaluator: every candidate scores 1.
    let evaluator = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let eval_port = evaluator.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in evaluator.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            // Head, then as many body bytes as Content-Length says.
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&req).to_ascii_lowercase();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if req.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            let body = r#"{"score": 1.0}"#;
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let recipe = dir.path().join("greedy.json");
    std::fs::write(
        &recipe,
        serde_json::json!({
            "method": "greedy_soup",
            "models": [{"uri": "a"}, {"uri": "b"}],
            "evaluator": {"url": format!("http://127.0.0.1:{eval_port}/evaluate")},
            "output": {"uri": "file:///placeholder"},
        })
        .to_string(),
    )
    .unwrap();
    let proxy_url = format!("http://127.0.0.1:{proxy_port}");
    let run = Command::new(LADLE)
        .args(["merge", "--quiet", "--out"])
        .arg(dir.path().join("soup"))
        .arg(&recipe)
        .env("HTTP_PROXY", &proxy_url)
        .env("http_proxy", &proxy_url)
        .env("HTTPS_PROXY", &proxy_url)
        .env("ALL_PROXY", &proxy_url)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(
        proxied.load(Ordering::SeqCst),
        0,
        "the evaluator call went to the proxy"
    );
    assert!(dir.path().join("soup/ladle-manifest.json").is_file());
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

//! Bearer-token auth: in process (the real router on a random port) and through the real
//! binary (start-up refusal on a non-loopback bind, `hash-token`, no token in the logs).

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use ladle::api::auth::token_digest;
use ladle::config::{ServiceArgs, Settings, TuningArgs};
use ladle::service::{Mode, Service, ServiceError};

const LADLE: &str = env!("CARGO_BIN_EXE_ladle");
const TOKEN_FLAG: &str = "tok-from-flag-7f3a9c1e5d";
const TOKEN_FILE: &str = "tok-from-file-2b8d4e6f0a";

fn digest_hex(token: &str) -> String {
    hex::encode(token_digest(token))
}

fn args(dir: &Path, bind: &str) -> ServiceArgs {
    ServiceArgs {
        bind: Some(bind.parse().unwrap()),
        data_dir: Some(dir.to_path_buf()),
        database_url: Some(format!(
            "sqlite://{}",
            dir.join("ladle.db").to_string_lossy()
        )),
        workers: Some(1),
        tuning: TuningArgs {
            poll_secs: Some(0.2),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Everything the test process logs, at every level, into one buffer.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuf {
    type Writer = LogBuf;
    fn make_writer(&'a self) -> LogBuf {
        self.clone()
    }
}

async fn status_code(r: reqwest::Response) -> (u16, serde_json::Value) {
    let status = r.status().as_u16();
    let body = r.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_needs_a_valid_bearer_token_and_tokens_never_reach_the_logs() {
    let logs = LogBuf::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_global_default(subscriber);

    let dir = tempfile::tempdir().unwrap();
    let tokens_file = dir.path().join("tokens.txt");
    std::fs::write(
        &tokens_file,
        format!("# ops team\n\n{}\n", digest_hex(TOKEN_FILE).to_uppercase()),
    )
    .unwrap();
    let mut a = args(dir.path(), "127.0.0.1:0");
    a.api_token_sha256 = vec![digest_hex(TOKEN_FLAG), digest_hex("another-one")];
    a.api_tokens_file = Some(tokens_file);
    let settings = Settings::resolve(a, None).unwrap();
    assert!(settings.auth.enabled());
    let (service, base) = start(&settings, Mode::Api).await;
    let client = reqwest::Client::new();

    // Health and readiness stay open.
    for path in ["/healthz", "/readyz"] {
        let r = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
    }

    // No token, a wrong one, another scheme, an empty one: 401 unauthorized, JSON body.
    let body = serde_json::json!({"method": "linear", "models": [{"uri": "file:///x/a"}],
                                  "output": {"uri": "file:///x/out"}});
    for auth in [
        None,
        Some("Bearer wrong-token".to_string()),
        Some(format!("Bearer {TOKEN_FLAG}x")),
        Some(format!("Basic {TOKEN_FLAG}")),
        Some(TOKEN_FLAG.to_string()),
        Some("Bearer ".to_string()),
        Some(format!("Bearer {}", digest_hex(TOKEN_FLAG))), // the digest is not the token
    ] {
        for req in [
            client.get(format!("{base}/v1/merges")),
            client.post(format!("{base}/v1/merges")).json(&body),
            client.get(format!(
                "{base}/v1/merges/00000000-0000-0000-0000-000000000000"
            )),
            client.post(format!("{base}/v1/merges/x/cancel")),
            client.get(format!("{base}/v1/no-such-route")),
        ] {
            let req = match &auth {
                Some(v) => req.header("authorization", v),
                None => req,
            };
            let r = req.send().await.unwrap();
            assert_eq!(
                r.headers()
                    .get("www-authenticate")
                    .map(|v| v.to_str().unwrap().starts_with("Bearer")),
                Some(true)
            );
            let (status, err) = status_code(r).await;
            assert_eq!(
                (status, err["code"].as_str()),
                (401, Some("unauthorized")),
                "{auth:?}: {err}"
            );
            assert!(err["message"].is_string(), "{err}");
            assert!(!err.to_string().contains(TOKEN_FLAG), "{err}");
        }
    }

    // Nothing was queued by the rejected submits.
    for (token, scheme) in [(TOKEN_FLAG, "Bearer"), (TOKEN_FILE, "bearer")] {
        let r = client
            .get(format!("{base}/v1/merges"))
            .header("authorization", format!("{scheme} {token}"))
            .send()
            .await
            .unwrap();
        let (status, list) = status_code(r).await;
        assert_eq!(status, 200, "{list}");
        assert_eq!(list["jobs"].as_array().unwrap().len(), 0);
    }
    // With a valid token the API behaves as without auth (here: the recipe's URLs are outside
    // the allowed roots → 403, and an unknown route → 404).
    let r = client
        .post(format!("{base}/v1/merges"))
        .bearer_auth(TOKEN_FLAG)
        .json(&body)
        .send()
        .await
        .unwrap();
    let (status, err) = status_code(r).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (403, Some("storage_not_allowed"))
    );
    let r = client
        .get(format!("{base}/v1/no-such-route"))
        .bearer_auth(TOKEN_FILE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);

    service.shutdown().await;
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        text.contains("/v1/merges"),
        "the trace layer logged requests: {text}"
    );
    for secret in [TOKEN_FLAG, TOKEN_FILE] {
        assert!(!text.contains(secret), "a token reached the logs");
    }
}

#[tokio::test]
async fn non_loopback_bind_needs_tokens_or_an_explicit_opt_out() {
    let dir = tempfile::tempdir().unwrap();
    // No tokens on 0.0.0.0: refused before binding, for serve and api, not for worker.
    let settings = Settings::resolve(args(dir.path(), "0.0.0.0:0"), None).unwrap();
    for mode in [Mode::Serve, Mode::Api] {
        match Service::start(&settings, mode).await {
            Err(e @ ServiceError::NoAuth { .. }) => {
                assert!(e.to_string().contains("--insecure-no-auth"), "{e}");
            }
            Err(e) => panic!("{mode:?}: wrong error {e}"),
            Ok(_) => panic!("{mode:?}: started without auth on 0.0.0.0"),
        }
    }
    let worker = Service::start(&settings, Mode::Worker).await.unwrap();
    worker.shutdown().await;

    // Loopback spellings need nothing.
    for bind in ["127.0.0.1:0", "[::1]:0", "127.0.0.2:0"] {
        let s = Settings::resolve(args(dir.path(), bind), None).unwrap();
        assert!(!ladle::service::requires_auth(&s), "{bind}");
    }

    // With tokens, or with --insecure-no-auth, it starts.
    let mut with_tokens = args(dir.path(), "0.0.0.0:0");
    with_tokens.api_token_sha256 = vec![digest_hex(TOKEN_FLAG)];
    let s = Settings::resolve(with_tokens, None).unwrap();
    let svc = Service::start(&s, Mode::Api).await.unwrap();
    let port = svc.addr.unwrap().port();
    let r = reqwest::get(format!("http://127.0.0.1:{port}/v1/merges"))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    svc.shutdown().await;

    let mut opt_out = args(dir.path(), "0.0.0.0:0");
    opt_out.insecure_no_auth = true;
    let s = Settings::resolve(opt_out, None).unwrap();
    let svc = Service::start(&s, Mode::Api).await.unwrap();
    let port = svc.addr.unwrap().port();
    let r = reqwest::get(format!("http://127.0.0.1:{port}/v1/merges"))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    svc.shutdown().await;
}

#[test]
fn a_token_where_a_digest_belongs_is_refused_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(dir.path(), "127.0.0.1:0");
    a.api_token_sha256 = vec![digest_hex("fine"), TOKEN_FLAG.to_string()];
    let e = Settings::resolve(a, None).unwrap_err().to_string();
    assert!(e.contains("entry 2"), "{e}");
    assert!(e.contains("hash-token"), "{e}");
    assert!(!e.contains(TOKEN_FLAG), "{e}");

    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("{}\n{TOKEN_FILE}\n", digest_hex("ok"))).unwrap();
    let mut a = args(dir.path(), "127.0.0.1:0");
    a.api_tokens_file = Some(file);
    let e = Settings::resolve(a, None).unwrap_err().to_string();
    assert!(
        e.contains("api_tokens_file") && !e.contains(TOKEN_FILE),
        "{e}"
    );

    let mut a = args(dir.path(), "127.0.0.1:0");
    a.api_tokens_file = Some(dir.path().join("missing"));
    assert!(Settings::resolve(a, None).is_err());
}

// ----- through the real binary -----

fn ladle(dir: &Path) -> Command {
    let mut c = Command::new(LADLE);
    c.env_remove("LADLE_API_TOKEN_SHA256")
        .env_remove("LADLE_INSECURE_NO_AUTH")
        .env_remove("LADLE_BIND")
        .env("LADLE_DATA_DIR", dir)
        .env(
            "LADLE_DATABASE_URL",
            format!("sqlite://{}", dir.join("ladle.db").display()),
        )
        .stdin(Stdio::null());
    c
}

#[test]
fn binary_refuses_a_public_bind_without_tokens() {
    let dir = tempfile::tempdir().unwrap();
    for mode in ["serve", "api"] {
        let out = ladle(dir.path())
            .args([mode, "--bind", "0.0.0.0:0"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{mode} started without auth");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("refusing to serve") && stderr.contains("--insecure-no-auth"),
            "{mode}: {stderr}"
        );
    }
    // A raw token where a digest belongs is a start-up error that does not echo it.
    let out = ladle(dir.path())
        .args(["serve", "--bind", "0.0.0.0:0"])
        .env("LADLE_API_TOKEN_SHA256", TOKEN_FLAG)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("hash-token") && !stderr.contains(TOKEN_FLAG),
        "{stderr}"
    );
}

/// Wait until a child logs its listening address, or fail.
fn wait_listening(child: &mut std::process::Child, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("ladle exited early ({status}): {err}");
        }
        assert!(Instant::now() < deadline, "ladle did not start listening");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn binary_serves_with_tokens_and_with_the_explicit_opt_out() {
    let dir = tempfile::tempdir().unwrap();
    let hashed = {
        let mut child = Command::new(LADLE)
            .arg("hash-token")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{TOKEN_FLAG}\n").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(hashed.trim(), digest_hex(TOKEN_FLAG));
    assert_eq!(hashed.trim().len(), 64);
    let empty = Command::new(LADLE)
        .arg("hash-token")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!empty.status.success());

    // 1. Tokens through the environment, comma-separated; full request logging turned on.
    let port = free_port();
    let mut child = ladle(dir.path())
        .args(["serve", "--bind", &format!("0.0.0.0:{port}")])
        .env(
            "LADLE_API_TOKEN_SHA256",
            format!("{},{}", digest_hex("someone-else"), hashed.trim()),
        )
        .env("RUST_LOG", "trace,sqlx=info,hyper=info,h2=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_listening(&mut child, port);
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(blocking_get(&format!("{base}/healthz"), None), 200);
    assert_eq!(blocking_get(&format!("{base}/v1/merges"), None), 401);
    assert_eq!(
        blocking_get(&format!("{base}/v1/merges"), Some("wrong-token-123")),
        401
    );
    assert_eq!(
        blocking_get(&format!("{base}/v1/merges"), Some(TOKEN_FLAG)),
        200
    );
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(logs.contains("/v1/merges"), "requests were logged: {logs}");
    assert!(!logs.contains(TOKEN_FLAG), "the token reached the logs");
    assert!(
        !logs.contains("wrong-token-123"),
        "a token reached the logs"
    );

    // 2. The explicit opt-out.
    let port = free_port();
    let mut child = ladle(dir.path())
        .args([
            "api",
            "--insecure-no-auth",
            "--bind",
            &format!("0.0.0.0:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_listening(&mut child, port);
    assert_eq!(
        blocking_get(&format!("http://127.0.0.1:{port}/v1/merges"), None),
        200
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// A GET from outside any runtime (the binary tests are plain `#[test]`s): the status.
fn blocking_get(url: &str, token: Option<&str>) -> u16 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut req = reqwest::Client::new().get(url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap().status().as_u16()
    })
}

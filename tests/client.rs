//! `ladle submit | status | list | cancel | watch`: the real binary against the real service
//! (SQLite, workers in the same process) on a random port, checking what it prints and its
//! exit statuses (0 succeeded, 1 failed or cancelled, 2 refused).

mod common;

use std::process::{Command, Output};

use common::*;
use ladle::service::Mode;

const LADLE: &str = env!("CARGO_BIN_EXE_ladle");

async fn ladle(args: Vec<String>, server: &str) -> Output {
    ladle_as(args, server, None).await
}

/// `ladle ARGS` with `LADLE_TOKEN` set to `token` (unset when `None`).
async fn ladle_as(args: Vec<String>, server: &str, token: Option<&str>) -> Output {
    let server = server.to_string();
    let token = token.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(LADLE);
        cmd.args(&args).env("LADLE_SERVER", server);
        match token {
            Some(t) => cmd.env("LADLE_TOKEN", t),
            None => cmd.env_remove("LADLE_TOKEN"),
        };
        cmd.output().expect("run ladle")
    })
    .await
    .expect("join")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_commands_and_exit_statuses() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().to_path_buf();
    for m in 0..2u64 {
        let tensors = vec![
            f32_tensor("layers.0.w", &[4, 8], m),
            f32_tensor("layers.1.w", &[8], m + 10),
        ];
        write_sharded(&root.join(format!("m{m}")), &tensors, 1);
    }
    let url = format!("sqlite://{}", root.join("ladle.db").display());
    let settings = test_settings(
        &root.join("data"),
        &url,
        vec![root.display().to_string()],
        None,
    );
    let (service, base) = start(&settings, Mode::Serve).await;

    let recipe = root.join("recipe.json");
    let body = serde_json::json!({
        "method": "linear",
        "models": [{"uri": file_url(&root.join("m0"))}, {"uri": file_url(&root.join("m1"))}],
        "output": {"uri": file_url(&root.join("soup"))},
    });
    std::fs::write(&recipe, body.to_string()).expect("write");
    let p = |x: &std::path::Path| x.display().to_string();

    // submit --wait: the id (a UUID) first, then the result; exit 0.
    let out = ladle(vec!["submit".into(), p(&recipe), "--wait".into()], &base).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let id = stdout.lines().next().unwrap_or_default().to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{stdout}");
    assert!(stdout.contains("succeeded: file://"), "{stdout}");
    assert!(root.join("soup/ladle-manifest.json").is_file());

    // status, list, watch of a finished job.
    let out = ladle(vec!["status".into(), id.clone()], &base).await;
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status prints JSON");
    assert_eq!(v["state"], "succeeded");
    let out = ladle(
        vec!["list".into(), "--state".into(), "succeeded".into()],
        &base,
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains(&id));
    let out = ladle(vec!["watch".into(), id.clone()], &base).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "watch of a job that already succeeded"
    );

    // cancel of a finished job: refused, exit 2 with the code.
    let out = ladle(vec!["cancel".into(), id.clone()], &base).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("not_cancellable"),
        "{}",
        text(&out.stderr)
    );

    // A job that fails (a checkpoint that is not there): exit 1 with its error code.
    let missing = root.join("missing.json");
    let mut bad = body.clone();
    bad["models"][1]["uri"] = file_url(&root.join("nothing-here")).into();
    bad["output"]["uri"] = file_url(&root.join("soup-2")).into();
    std::fs::write(&missing, bad.to_string()).expect("write");
    let out = ladle(vec!["submit".into(), p(&missing), "--wait".into()], &base).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("failed: checkpoint_not_found"),
        "{}",
        text(&out.stdout)
    );
    // Its view's error says whether it is retried and which attempt failed (README, Errors).
    let failed_id = text(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let out = ladle(vec!["status".into(), failed_id], &base).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status prints JSON");
    assert_eq!(v["state"], "failed", "{v}");
    assert_eq!(v["error"]["code"], "checkpoint_not_found", "{v}");
    assert_eq!(v["error"]["retryable"], false, "{v}");
    assert_eq!(v["error"]["attempt"], 1, "{v}");

    // A refused request: exit 2, code and message printed.
    let invalid = root.join("invalid.json");
    std::fs::write(&invalid, r#"{"method": "linear", "models": []}"#).expect("write");
    let out = ladle(vec!["submit".into(), p(&invalid)], &base).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("invalid_recipe"),
        "{}",
        text(&out.stderr)
    );

    // A YAML recipe naming models by relative paths: refused here, with what to do instead.
    let yaml = root.join("recipe.yml");
    std::fs::write(
        &yaml,
        "merge_method: linear\nmodels:\n  - model: ./m0\n  - model: ./m1\n",
    )
    .expect("write");
    let out = ladle(vec!["submit".into(), p(&yaml)], &base).await;
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("\"./m0\" is a path") && err.contains("ladle merge"),
        "{err}"
    );

    // No server there: exit 2.
    let out = ladle(vec!["status".into(), id.clone()], "http://127.0.0.1:9").await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("cannot reach"),
        "{}",
        text(&out.stderr)
    );
    service.shutdown().await;
}

/// The job `submit` (without `--wait`) printed: its first line.
fn first_line(out: &Output) -> String {
    text(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Cancel `id` over HTTP with the bearer token; its state after.
async fn cancel_over_http(base: &str, id: &str, token: &str) -> serde_json::Value {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/merges/{id}/cancel"))
        .bearer_auth(token)
        .send()
        .await
        .expect("cancel");
    assert!(r.status().is_success(), "cancel {id}: {}", r.status());
    r.json().await.expect("json")
}

/// Cancel `id` while `follower` (a `ladle` command following it) runs: the job is
/// cancelled, and the command ends soon after with exit status 1; its output.
async fn cancelled_while_followed(
    base: &str,
    id: &str,
    token: &str,
    follower: tokio::task::JoinHandle<Output>,
) -> Output {
    assert_eq!(
        cancel_over_http(base, id, token).await["state"],
        "cancelled"
    );
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), follower)
        .await
        .expect("the command ends after the cancel")
        .expect("join");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// A server with a token: the CLI takes it from `LADLE_TOKEN` (refused without it, exit 2
/// with `unauthorized`); `watch` and `submit --wait` of jobs that end cancelled exit 1. The
/// server is API-only, so the jobs stay queued until cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_with_a_token_and_cancelled_jobs() {
    const TOKEN: &str = "client-test-token-7f3a";
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().to_path_buf();
    let url = format!("sqlite://{}", root.join("ladle.db").display());
    let mut settings = test_settings(
        &root.join("data"),
        &url,
        vec![root.display().to_string()],
        None,
    );
    settings.auth = ladle::api::ApiAuth::new(vec![ladle::api::auth::token_digest(TOKEN)]);
    let (service, base) = start(&settings, Mode::Api).await;
    let p = |x: &std::path::Path| x.display().to_string();
    let recipe = |name: &str| {
        let path = root.join(format!("{name}.json"));
        let body = serde_json::json!({
            "method": "linear",
            "models": [{"uri": file_url(&root.join("m0"))}, {"uri": file_url(&root.join("m1"))}],
            "output": {"uri": file_url(&root.join(name))},
        });
        std::fs::write(&path, body.to_string()).expect("write");
        path
    };

    // Without the token, or with a wrong one: refused, exit 2, the code printed.
    for token in [None, Some("wrong-token")] {
        let out = ladle_as(vec!["submit".into(), p(&recipe("a"))], &base, token).await;
        assert_eq!(out.status.code(), Some(2), "{token:?}");
        assert!(
            text(&out.stderr).contains("unauthorized"),
            "{}",
            text(&out.stderr)
        );
    }

    // With LADLE_TOKEN: accepted; status, list and watch use it too.
    let out = ladle_as(vec!["submit".into(), p(&recipe("a"))], &base, Some(TOKEN)).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let a = first_line(&out);
    assert!(uuid::Uuid::parse_str(&a).is_ok(), "{a}");
    let out = ladle_as(vec!["status".into(), a.clone()], &base, Some(TOKEN)).await;
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["state"], "queued");

    // `watch` of a queued job that is then cancelled: exit 1, the state printed.
    let (watch_base, watch_id) = (base.clone(), a.clone());
    let watch = tokio::spawn(async move {
        ladle_as(vec!["watch".into(), watch_id], &watch_base, Some(TOKEN)).await
    });
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let out = cancelled_while_followed(&base, &a, TOKEN, watch).await;
    assert!(
        text(&out.stdout).starts_with("cancelled"),
        "{}",
        text(&out.stdout)
    );
    // And of a job that already was cancelled.
    let out = ladle_as(vec!["watch".into(), a.clone()], &base, Some(TOKEN)).await;
    assert_eq!(out.status.code(), Some(1));

    // `submit --wait` of a job cancelled while it waits: its id first, then exit 1.
    let (wait_base, wait_recipe) = (base.clone(), p(&recipe("b")));
    let waiting = tokio::spawn(async move {
        ladle_as(
            vec!["submit".into(), wait_recipe, "--wait".into()],
            &wait_base,
            Some(TOKEN),
        )
        .await
    });
    let http = reqwest::Client::new();
    let mut b = None;
    for _ in 0..100 {
        let list: serde_json::Value = http
            .get(format!("{base}/v1/merges?state=queued"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("json");
        b = list["jobs"]
            .as_array()
            .and_then(|items| items.first())
            .and_then(|j| j["id"].as_str())
            .map(str::to_string);
        if b.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let b = b.expect("the waited-for job appears");
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    let out = cancelled_while_followed(&base, &b, TOKEN, waiting).await;
    assert_eq!(first_line(&out), b);
    assert!(
        text(&out.stdout).contains("\ncancelled"),
        "{}",
        text(&out.stdout)
    );
    service.shutdown().await;
}

//! `ladle submit | status | list | cancel | watch`: the real binary against the real service
//! (SQLite, workers in the same process) on a random port, checking what it prints and its
//! exit statuses (0 succeeded, 1 failed or cancelled, 2 refused).

mod common;

use std::process::{Command, Output};

use common::*;
use ladle::service::Mode;

const LADLE: &str = env!("CARGO_BIN_EXE_ladle");

async fn ladle(args: Vec<String>, server: &str) -> Output {
    let server = server.to_string();
    tokio::task::spawn_blocking(move || {
        Command::new(LADLE)
            .args(&args)
            .env("LADLE_SERVER", server)
            .env_remove("LADLE_TOKEN")
            .output()
            .expect("run ladle")
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

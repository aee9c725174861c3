//! The contract, tested from outside: schemathesis (PyPI) generates requests from the served
//! `/openapi.json` against the live server (SQLite, a worker, real checkpoints under the
//! allowed root) and checks that no response is a 5xx and that every response conforms to the
//! document (status code, content type, headers, schema). Then the generated Python client
//! (`clients/python/ladle_client`) submits a merge, waits for it and reads the manifest URL.
//! Both need the tools `.ci/run` installs into `.ci/.venv` (`LADLE_PYTHON_VENV` overrides);
//! without them the tests say SKIPPED loudly.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use ladle::service::Mode;

fn venv() -> PathBuf {
    std::env::var_os("LADLE_PYTHON_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/.venv")))
}

/// Two small checkpoints under `root` and the settings of a service that may read them.
fn setup(root: &std::path::Path) -> ladle::config::Settings {
    for m in 0..2u64 {
        let tensors = vec![
            f32_tensor("layers.0.w", &[4, 8], m),
            bf16_tensor("layers.1.w", &[8], m + 10),
        ];
        write_sharded(&root.join(format!("m{m}")), &tensors, 1);
    }
    let url = format!("sqlite://{}", root.join("ladle.db").display());
    test_settings(
        &root.join("data"),
        &url,
        vec![root.display().to_string()],
        None,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schemathesis_finds_no_5xx_and_no_nonconforming_response() {
    let st = venv().join("bin/st");
    if !st.is_file() {
        loud_skip(
            "schemathesis contract test",
            "no .ci/.venv/bin/st (.ci/run installs schemathesis)",
        );
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let settings = setup(tmp.path());
    let (service, base) = start(&settings, Mode::Serve).await;
    let report = tmp.path().join("report");
    // CPython 3.11.7 (this machine's) can raise `SystemError: AST constructor recursion depth
    // mismatch` inside schemathesis' own code generation (a CPython bug, not a finding about
    // ladle): such a run is repeated, loudly, up to twice; any other failure fails at once.
    let mut tries = 0;
    let out = loop {
        tries += 1;
        let out = tokio::task::spawn_blocking({
            let base = base.clone();
            let report = report.clone();
            let st = st.clone();
            move || {
                Command::new(&st)
                    .args(["run", &format!("{base}/openapi.json")])
                    .args([
                        "--checks",
                        "not_a_server_error,status_code_conformance,content_type_conformance,\
                     response_headers_conformance,response_schema_conformance",
                        // Streams never end by themselves: their format is tests/events.rs's.
                        "--exclude-path-regex",
                        "/events$",
                        "--max-examples",
                        "40",
                        "--seed",
                        "20261203",
                        "--workers",
                        "2",
                        "--request-timeout",
                        "20",
                        "--report",
                        "junit",
                        "--report-dir",
                    ])
                    .arg(&report)
                    .env("NO_COLOR", "1")
                    .output()
                    .expect("run schemathesis")
            }
        })
        .await
        .expect("join");
        let stdout = String::from_utf8_lossy(&out.stdout);
        println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let interpreter_bug = stdout.contains("AST constructor recursion depth mismatch")
            && !stdout.contains("Server error")
            && !stdout.contains("does not conform");
        if out.status.success() || !interpreter_bug || tries == 3 {
            break out;
        }
        eprintln!(
            "==================== schemathesis run {tries} hit CPython's AST recursion-depth bug \
         (not a ladle failure): running it again ===================="
        );
    };
    service.shutdown().await;
    assert!(
        out.status.success(),
        "schemathesis found failures (see its output above)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_client_submits_waits_and_reads_the_manifest() {
    let python = venv().join("bin/python");
    if !python.is_file() {
        loud_skip(
            "Python client test",
            "no .ci/.venv/bin/python (.ci/run creates it)",
        );
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().to_path_buf();
    let settings = setup(&root);
    let (service, base) = start(&settings, Mode::Serve).await;
    let out_dir = root.join("soup");
    let recipe = serde_json::json!({
        "method": "linear",
        "models": [{"uri": file_url(&root.join("m0"))}, {"uri": file_url(&root.join("m1"))}],
        "output": {"uri": file_url(&out_dir)},
    });
    let recipe_path = root.join("recipe.json");
    std::fs::write(&recipe_path, recipe.to_string()).expect("write recipe");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/python/example_merge.py"
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .arg(script)
            .arg(&base)
            .arg(&recipe_path)
            .env(
                "PYTHONPATH",
                concat!(env!("CARGO_MANIFEST_DIR"), "/clients/python"),
            )
            .output()
            .expect("run python")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the Python client example failed");
    let manifest = stdout
        .lines()
        .find_map(|l| l.strip_prefix("manifest: "))
        .expect("the example prints the manifest URL");
    assert!(manifest.starts_with("file://") && manifest.ends_with("/soup/ladle-manifest.json"));
    assert!(out_dir.join("ladle-manifest.json").is_file());
    service.shutdown().await;
}

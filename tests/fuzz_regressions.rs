//! Replays the inputs kept from fuzzing (`fuzz/`, run outside CI) through the same code and
//! checks as the fuzz targets: `tests/fuzz-regressions/<target>/*` holds the crashes found (the
//! `crash-*` files) and a few seeds and interesting corpus entries. Any panic here is a
//! regression; each file is named in the failure.

use std::path::{Path, PathBuf};

#[path = "../fuzz/targets.rs"]
mod targets;

use ladle::checkpoint::{parse_header, parse_header_len};
use ladle::recipe::Recipe;

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-regressions")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no inputs in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

/// Runs `f` on every input; on a panic, names the file.
fn replay(target: &str, f: impl Fn(&[u8]) + std::panic::RefUnwindSafe) -> usize {
    let all = inputs(target);
    for (path, bytes) in &all {
        if std::panic::catch_unwind(|| f(bytes)).is_err() {
            panic!("{target}: input {} panics", path.display());
        }
    }
    all.len()
}

#[test]
fn shard_index_inputs_do_not_panic() {
    let n = replay("shard_index", targets::shard_index);
    assert!(n >= 4);
}

#[test]
fn recipe_yaml_inputs_do_not_panic() {
    let n = replay("recipe_yaml", targets::recipe_yaml);
    assert!(n >= 3);
}

#[test]
fn safetensors_header_inputs_do_not_panic() {
    let n = replay("safetensors_header", targets::safetensors_header);
    assert!(n >= 5);
}

#[test]
fn recipe_json_inputs_do_not_panic() {
    let n = replay("recipe_json", targets::recipe_json);
    assert!(n >= 3);
}

/// The seeds mean what their names say (so the replay above exercises the accepting paths).
#[test]
fn seeds_parse_as_intended() {
    let valid = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fuzz-regressions/safetensors_header/seed-valid-file"),
    )
    .unwrap();
    let rest = &valid[1..];
    let n = parse_header_len(rest, rest.len() as u64).unwrap();
    let h = parse_header(&rest[8..8 + n as usize], n, rest.len() as u64).unwrap();
    assert_eq!(h.tensors.len(), 4);
    let recipe = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fuzz-regressions/recipe_json/seed-uniform"),
    )
    .unwrap();
    assert_eq!(Recipe::parse_json(&recipe).unwrap().recipe.models.len(), 3);
    for seed in [
        "seed-ties.yml",
        "seed-slerp.yml",
        "seed-linear-anchors.yml",
        "seed-passthrough.yml",
    ] {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fuzz-regressions/recipe_yaml")
                .join(seed),
        )
        .unwrap();
        if let Err(e) = Recipe::parse_yaml(&text, None, Some("file:///d/out")) {
            panic!("{seed}: {e}");
        }
    }
}

/// `fuzz/` is a workspace of its own with its own `Cargo.lock`, which `cargo test` never
/// builds, so nothing noticed when it fell behind the crate's dependencies (three times).
/// `cargo metadata --locked` fails when the lock file would have to change.
#[test]
fn fuzz_lock_file_follows_the_crate() {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/Cargo.toml");
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--locked", "--format-version", "1"])
        .args([
            "--filter-platform",
            "x86_64-unknown-linux-gnu",
            "--manifest-path",
        ])
        .arg(&manifest)
        .output()
        .expect("run cargo metadata");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        return;
    }
    assert!(
        !stderr.contains("--locked"),
        "fuzz/Cargo.lock is out of date: run `cargo update -w --manifest-path fuzz/Cargo.toml` \
         (or copy the root Cargo.lock there first to keep the same versions):\n{stderr}"
    );
    // Anything else (no registry reachable) says nothing about the lock file.
    eprintln!(
        "\n==================== SKIPPED: fuzz lock file check (cargo metadata failed: {}) ====================\n",
        stderr.trim()
    );
}

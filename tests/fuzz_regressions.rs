//! Replays the inputs kept from fuzzing (`fuzz/`, run outside CI) through the same code and
//! checks as the fuzz targets: `tests/fuzz-regressions/<target>/*` holds the crashes found (the
//! `crash-*` files) and a few seeds and interesting corpus entries. Any panic here is a
//! regression; each file is named in the failure.

use std::path::{Path, PathBuf};

use ladle::checkpoint::{Header, parse_header, parse_header_len, parse_index};
use ladle::recipe::{MAX_MODELS, Recipe};

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

/// `fuzz/fuzz_targets/safetensors_header.rs`, as a function.
fn header_target(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let file_size = rest.len() as u64;
        let Ok(n) = parse_header_len(rest, file_size) else {
            return;
        };
        let json = &rest[8..8 + n as usize];
        if let Ok(h) = parse_header(json, n, file_size) {
            check_header(&h, file_size);
        }
    } else {
        let n = rest.len() as u64;
        let file_size = 8 + n + u64::from(mode) * 64;
        if let Ok(h) = parse_header(rest, n, file_size) {
            check_header(&h, file_size);
        }
    }
}

fn check_header(h: &Header, file_size: u64) {
    let data_len = file_size - h.data_start();
    let mut prev: Option<&str> = None;
    let mut ranges = Vec::new();
    for t in &h.tensors {
        assert!(prev < Some(t.name.as_str()), "tensors sorted, names unique");
        prev = Some(&t.name);
        let (b, e) = t.data_offsets;
        assert!(b <= e && e <= data_len, "{}: offsets in bounds", t.name);
        let bytes = t.numel().checked_mul(t.dtype.size_bytes() as u64);
        assert_eq!(bytes, Some(e - b), "{}: size agrees with shape", t.name);
        assert!(h.get(&t.name).is_some());
        if e > b {
            ranges.push((b, e));
        }
    }
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        assert!(w[0].1 <= w[1].0, "no overlap");
    }
}

/// `fuzz/fuzz_targets/recipe_json.rs`, as a function.
fn recipe_target(data: &[u8]) {
    let Ok(sub) = Recipe::parse_json(data) else {
        return;
    };
    let r = &sub.recipe;
    assert!(!r.models.is_empty() && r.models.len() <= MAX_MODELS);
    assert!(r.models.iter().all(|m| m.weight.is_finite()));
    // Every number a kernel will use fits f32 (a larger one would turn into infinity).
    for m in &r.models {
        assert!(m.weight.abs() <= f64::from(f32::MAX), "weight {}", m.weight);
        for (k, s) in &m.parameters {
            for x in s.anchors() {
                assert!(x.is_finite() && x.abs() <= f64::from(f32::MAX), "{k}: {x}");
            }
        }
    }
    assert!(r.models.iter().all(|m| !m.uri.trim().is_empty()));
    assert_eq!(r.hash().len(), 32);
    let (weights, divisor) = r.linear_weights();
    assert_eq!(weights.len(), r.models.len());
    assert!(
        weights.iter().all(|w| w.is_finite()),
        "kernel weights {weights:?}"
    );
    if let Some(d) = divisor {
        assert!(d.is_finite() && d != 0.0, "normalizing divisor {d}");
    }
    let json = serde_json::to_value(r).expect("a recipe serializes");
    let back: Recipe = serde_json::from_value(json).expect("a stored recipe reads back");
    assert_eq!(back.models.len(), r.models.len());
}

/// `fuzz/fuzz_targets/shard_index.rs`, as a function.
fn index_target(data: &[u8]) {
    let Ok(index) = parse_index(data) else {
        return;
    };
    let folder = object_store::path::Path::from("ckpt/folder");
    for file in index.weight_map.values() {
        assert!(file.ends_with(".safetensors"));
        let p = folder.clone().join(file.as_str());
        assert_eq!(p.parts().count(), 3, "{file:?} -> {p}");
        assert!(p.prefix_matches(&folder), "{file:?} -> {p}");
    }
}

#[test]
fn shard_index_inputs_do_not_panic() {
    let n = replay("shard_index", index_target);
    assert!(n >= 4);
}

/// `fuzz/fuzz_targets/recipe_yaml.rs`, as a function.
fn yaml_target(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(sub) = Recipe::parse_yaml(text, None, Some("file:///d/out")) else {
        return;
    };
    let r = &sub.recipe;
    assert!(!r.models.is_empty() && r.models.len() <= MAX_MODELS);
    for m in &r.models {
        assert!(m.weight.is_finite() && m.weight.abs() <= f64::from(f32::MAX));
        for (k, s) in &m.parameters {
            for x in s.anchors() {
                assert!(x.is_finite() && x.abs() <= f64::from(f32::MAX), "{k}: {x}");
            }
        }
    }
    assert_eq!(r.hash().len(), 32);
}

#[test]
fn recipe_yaml_inputs_do_not_panic() {
    let n = replay("recipe_yaml", yaml_target);
    assert!(n >= 3);
}

#[test]
fn safetensors_header_inputs_do_not_panic() {
    let n = replay("safetensors_header", header_target);
    assert!(n >= 5);
}

#[test]
fn recipe_json_inputs_do_not_panic() {
    let n = replay("recipe_json", recipe_target);
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

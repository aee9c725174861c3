//! The fuzz targets' bodies, shared by the libFuzzer binaries in `fuzz_targets/` and by
//! `tests/fuzz_regressions.rs`, which replays the kept inputs through the very same code in
//! `cargo test`. Besides "never panics", each checks what callers rely on.
#![allow(dead_code)] // each fuzz binary uses one target

use ladle::checkpoint::{Header, parse_header, parse_header_len, parse_index};
use ladle::recipe::{MAX_MODELS, Recipe};

/// The safetensors header parser: never panics; an accepted header satisfies [`check_header`].
pub fn safetensors_header(data: &[u8]) {
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

/// What a caller may assume of an accepted header.
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

/// `Recipe::parse_json`: never panics; an accepted recipe keeps what the queue and engine rely on.
pub fn recipe_json(data: &[u8]) {
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
    // What the API stores must read back.
    let json = serde_json::to_value(r).expect("a recipe serializes");
    let back: Recipe = serde_json::from_value(json).expect("a stored recipe reads back");
    assert_eq!(back.models.len(), r.models.len());
}

/// The shard index parser: never panics; accepted shard names stay one file in the folder.
pub fn shard_index(data: &[u8]) {
    let Ok(index) = parse_index(data) else {
        return;
    };
    let folder = object_store::path::Path::from("ckpt/folder");
    for file in index.weight_map.values() {
        assert!(file.ends_with(".safetensors"));
        // As the reader builds a shard's path: one more segment under the folder, same prefix.
        let p = folder.clone().join(file.as_str());
        assert_eq!(p.parts().count(), 3, "{file:?} -> {p}");
        assert!(p.prefix_matches(&folder), "{file:?} -> {p}");
    }
}

/// `Recipe::parse_yaml`: never panics; an accepted recipe keeps every kernel number within f32.
pub fn recipe_yaml(data: &[u8]) {
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

//! Comparing a soup with what mergekit 0.1.5 wrote for a recipe of
//! `tests/data/mergekit_tokenizer/` (`tests/mergekit_tokenizer.rs`): every tensor within a
//! number of bf16 ulps, `config.json`'s `vocab_size`, the vocabulary, the new tokens' settings
//! and the chat template.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::compare::{bf16_ulp, read_f32_tensors};
use super::read_json;

/// The stand-ins, recipes and mergekit's outputs.
pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mergekit_tokenizer")
}

/// Tokens the stand-ins' base tokenizer has (ids 0..24): anything after is new.
pub const BASE_TOKENS: u64 = 24;

/// Token → id of a `tokenizer.json` (its model's vocabulary and its added tokens), and the
/// added tokens' entries by id.
pub fn vocabulary(dir: &Path) -> (BTreeMap<String, u64>, BTreeMap<u64, Value>) {
    let doc = read_json(&dir.join("tokenizer.json"));
    let mut ids: BTreeMap<String, u64> = doc["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(t, i)| (t.clone(), i.as_u64().unwrap()))
        .collect();
    let mut added = BTreeMap::new();
    for a in doc["added_tokens"].as_array().unwrap() {
        let id = a["id"].as_u64().unwrap();
        ids.insert(a["content"].as_str().unwrap().to_string(), id);
        added.insert(id, a.clone());
    }
    (ids, added)
}

/// The chat template a tokenizer folder gives (transformers: `chat_template.jinja` first).
pub fn template(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("chat_template.jinja"))
        .ok()
        .or_else(|| {
            read_json(&dir.join("tokenizer_config.json"))["chat_template"]
                .as_str()
                .map(str::to_string)
        })
        .map(|t| t.trim().to_string())
}

/// Everything compared with mergekit's output of `recipe`; the failures.
pub fn compare(recipe: &str, max_ulps: f64, ours: &Path) -> Vec<String> {
    let theirs = data_dir().join("expected").join(recipe);
    let mut failures = Vec::new();
    let got = read_f32_tensors(&ours.join("model.safetensors"));
    let want = read_f32_tensors(&theirs.join("model.safetensors"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{recipe}: tensor names"
    );
    let (mut total, mut differ, mut worst) = (0usize, 0usize, 0f64);
    for (name, (shape, w, dt)) in &want {
        let (gshape, g, gdt) = &got[name];
        if shape != gshape || dt != gdt {
            failures.push(format!(
                "{recipe}: {name}: {gshape:?} {gdt}, mergekit's {shape:?} {dt}"
            ));
            continue;
        }
        total += w.len();
        for (a, b) in g.iter().zip(w) {
            if a.to_bits() != b.to_bits() {
                differ += 1;
                worst = worst.max((*a as f64 - *b as f64).abs() / bf16_ulp(*b));
            }
        }
    }
    eprintln!("{recipe:<12} | {differ} of {total} elements differ | max {worst:.2} ulps");
    if worst > max_ulps {
        failures.push(format!(
            "{recipe}: {differ} elements differ, max {worst} ulps"
        ));
    }
    let vocab_size = |d: &Path| read_json(&d.join("config.json"))["vocab_size"].clone();
    if vocab_size(ours) != vocab_size(&theirs) {
        failures.push(format!(
            "{recipe}: config.json vocab_size {} vs mergekit's {}",
            vocab_size(ours),
            vocab_size(&theirs)
        ));
    }
    let ((ids, added), (want_ids, want_added)) = (vocabulary(ours), vocabulary(&theirs));
    if ids != want_ids {
        failures.push(format!(
            "{recipe}: vocabulary {ids:?}\n  vs mergekit's {want_ids:?}"
        ));
    }
    // The new tokens' settings (transformers also marks the base's `<unk>` as an added token
    // when it saves, which ladle, copying the base's entries, does not).
    let new = |a: &BTreeMap<u64, Value>| -> Vec<Value> {
        a.range(BASE_TOKENS..).map(|(_, v)| v.clone()).collect()
    };
    if new(&added) != new(&want_added) {
        failures.push(format!(
            "{recipe}: new tokens {:?}\n  vs mergekit's {:?}",
            new(&added),
            new(&want_added)
        ));
    }
    if template(ours) != template(&theirs) {
        failures.push(format!(
            "{recipe}: chat template {:?} vs mergekit's {:?}",
            template(ours),
            template(&theirs)
        ));
    }
    failures
}

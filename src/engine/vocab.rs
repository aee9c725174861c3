//! The soup's tokenizer when one is built (mergekit 0.1.5's `tokenizer_source: union` and its
//! `tokenizer` section; `mergekit/tokenizer/build.py`), over the models' `tokenizer.json`
//! files read with `serde_json` (the vocabulary is all a merge needs of a tokenizer: the
//! `tokenizers` crate would add a large dependency to read the same two fields):
//!
//! - a model's vocabulary is transformers' `get_vocab()`: the model's own (`model.vocab`, a map
//!   for BPE / WordLevel / WordPiece, a list for Unigram) and its `added_tokens`;
//! - the base's (the base model's, else the first model's) loses the tokens at or beyond its
//!   `config.json` `vocab_size` (mergekit's `get_stripped_tokenizer`);
//! - `union`: the base's tokens, then every other model's tokens that the base lacks (those
//!   below that model's `vocab_size`; not an added token of any model), then every model's
//!   added tokens the vocabulary still lacks, each new token at the next id. mergekit walks
//!   the models in set order and each vocabulary in hash order, so the order of the new
//!   tokens varies between its runs; ladle takes the recipe's order (base first) and each
//!   vocabulary by id;
//! - then `tokenizer.tokens` the vocabulary lacks, in the order written;
//! - a model's permutation: for each token of the soup, its id in that model (below the
//!   model's `vocab_size`), or none.
//!
//! The written `tokenizer.json` is the source tokenizer's file with the stripped tokens
//! removed and the new ones appended to `added_tokens` (a model's token with its own
//! settings, another as transformers' `add_tokens` adds it: not special, normalized); a
//! `tokenizer_config.json` with an `added_tokens_decoder` gets the same entries there. mergekit writes
//! both through transformers' `save_pretrained`, which lays the files out its own way; the
//! vocabulary and the tokens' settings are the same.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

/// A tokenizer file that cannot be used (names the file as the recipe's folder gives it).
#[derive(Debug, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct TokenizerError {
    pub file: String,
    pub reason: String,
}

fn bad(file: &str, reason: impl Into<String>) -> TokenizerError {
    TokenizerError {
        file: file.to_string(),
        reason: reason.into(),
    }
}

/// A model's tokenizer as its `tokenizer.json` gives it.
#[derive(Debug, Clone)]
pub(super) struct Vocab {
    /// Token → id: transformers' `get_vocab()`.
    pub ids: HashMap<String, u64>,
    /// The tokens by id (the order ladle walks a vocabulary in).
    pub by_id: Vec<(u64, String)>,
    /// The `added_tokens` entries by id.
    pub added: Vec<(u64, Map<String, Value>)>,
    /// Tokens of the model's own vocabulary, without added tokens (transformers'
    /// `vocab_size`).
    pub model_len: u64,
}

/// Parse a `tokenizer.json` (`file` names it in errors).
pub(super) fn parse(bytes: &[u8], file: &str) -> Result<(Vocab, Value), TokenizerError> {
    let doc: Value =
        serde_json::from_slice(bytes).map_err(|e| bad(file, format!("not valid JSON: {e}")))?;
    let vocab = vocab_of(&doc, file)?;
    Ok((vocab, doc))
}

fn vocab_of(doc: &Value, file: &str) -> Result<Vocab, TokenizerError> {
    let model = doc
        .get("model")
        .and_then(Value::as_object)
        .ok_or_else(|| bad(file, "no `model` object"))?;
    let mut ids: HashMap<String, u64> = HashMap::new();
    match model.get("vocab") {
        Some(Value::Object(m)) => {
            for (tok, id) in m {
                let id = id
                    .as_u64()
                    .ok_or_else(|| bad(file, format!("model.vocab[{tok:?}]: not a token id")))?;
                ids.insert(tok.clone(), id);
            }
        }
        // Unigram: `[[token, score], …]`, the id being the position.
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let tok = item
                    .get(0)
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(file, format!("model.vocab[{i}]: not [token, score]")))?;
                ids.insert(tok.to_string(), i as u64);
            }
        }
        _ => return Err(bad(file, "model.vocab: expected a map or a list of tokens")),
    }
    let model_len = ids.len() as u64;
    let mut added = Vec::new();
    if let Some(list) = doc.get("added_tokens").filter(|v| !v.is_null()) {
        let list = list
            .as_array()
            .ok_or_else(|| bad(file, "added_tokens: expected a list"))?;
        for (i, entry) in list.iter().enumerate() {
            let obj = entry
                .as_object()
                .ok_or_else(|| bad(file, format!("added_tokens[{i}]: expected an object")))?;
            let id = obj.get("id").and_then(Value::as_u64);
            let content = obj.get("content").and_then(Value::as_str);
            let (Some(id), Some(content)) = (id, content) else {
                return Err(bad(
                    file,
                    format!("added_tokens[{i}]: needs `id` and `content`"),
                ));
            };
            ids.insert(content.to_string(), id);
            let mut settings = obj.clone();
            settings.remove("id");
            added.push((id, settings));
        }
    }
    added.sort_by_key(|(id, _)| *id);
    let mut by_id: Vec<(u64, String)> = ids.iter().map(|(t, i)| (*i, t.clone())).collect();
    by_id.sort();
    Ok(Vocab {
        ids,
        by_id,
        added,
        model_len,
    })
}

impl Vocab {
    /// Without the tokens at or beyond `vocab_size` (mergekit's stripped base tokenizer).
    pub(super) fn stripped(&self, vocab_size: u64) -> (Vocab, Vec<String>) {
        let removed: Vec<String> = self
            .by_id
            .iter()
            .filter(|(id, _)| *id >= vocab_size)
            .map(|(_, t)| t.clone())
            .collect();
        let mut v = self.clone();
        v.ids.retain(|_, id| *id < vocab_size);
        v.by_id.retain(|(id, _)| *id < vocab_size);
        v.added.retain(|(id, _)| *id < vocab_size);
        v.model_len = v.model_len.min(v.ids.len() as u64);
        (v, removed)
    }
}

/// A token the soup's vocabulary gets beyond its source tokenizer's.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct NewToken {
    pub id: u64,
    /// Its `added_tokens` entry, without the id.
    pub settings: Map<String, Value>,
}

/// How transformers' `add_tokens` adds a plain string: not special, normalized.
fn plain(content: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("content".into(), content.into());
    for (k, v) in [
        ("single_word", false),
        ("lstrip", false),
        ("rstrip", false),
        ("normalized", true),
        ("special", false),
    ] {
        m.insert(k.into(), v.into());
    }
    m
}

fn content(settings: &Map<String, Value>) -> &str {
    settings
        .get("content")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// The soup's vocabulary: `source` (the tokenizer written, already stripped when it is the
/// base's), the tokens `union` adds from `others` (each model's vocabulary and `vocab_size`,
/// base first when it is a model; `None`: no union), then `extra` (`tokenizer.tokens`).
/// Returns the new tokens, in id order.
pub(super) fn build(
    source: &Vocab,
    union: Option<&[(&Vocab, u64)]>,
    extra: &[&str],
) -> Vec<NewToken> {
    let mut present: HashSet<String> = source.ids.keys().cloned().collect();
    let mut next = source
        .added
        .last()
        .map_or(0, |(id, _)| id + 1)
        .max(source.model_len);
    let mut out = Vec::new();
    let mut push = |settings: Map<String, Value>, present: &mut HashSet<String>| {
        let c = content(&settings).to_string();
        if c.is_empty() || !present.insert(c) {
            return;
        }
        out.push(NewToken { id: next, settings });
        next += 1;
    };
    if let Some(models) = union {
        let mut added: Vec<Map<String, Value>> = Vec::new();
        let mut added_names: HashSet<String> = HashSet::new();
        for (v, size) in models {
            for (id, settings) in &v.added {
                if *id < *size && added_names.insert(content(settings).to_string()) {
                    added.push(settings.clone());
                }
            }
        }
        let mut seen: HashSet<&str> = HashSet::new();
        for (v, size) in models {
            for (id, tok) in &v.by_id {
                if *id < *size && seen.insert(tok) && !added_names.contains(tok) {
                    push(plain(tok), &mut present);
                }
            }
        }
        for settings in added {
            push(settings, &mut present);
        }
    }
    for tok in extra {
        push(plain(tok), &mut present);
    }
    out
}

/// The soup's vocabulary by id: `source`'s tokens and the new ones. Its ids must run from 0
/// without a gap (each is a row of the permuted embeddings).
pub(super) fn tokens_by_id(
    source: &Vocab,
    new: &[NewToken],
    file: &str,
) -> Result<Vec<String>, TokenizerError> {
    let mut all: Vec<(u64, String)> = source.by_id.clone();
    all.extend(new.iter().map(|t| (t.id, content(&t.settings).to_string())));
    all.sort();
    for (i, (id, tok)) in all.iter().enumerate() {
        if *id != i as u64 {
            return Err(bad(
                file,
                format!(
                    "token ids are not contiguous ({tok:?} has id {id} where {i} was expected): \
                     each id is a row of the embedding"
                ),
            ));
        }
    }
    Ok(all.into_iter().map(|(_, t)| t).collect())
}

/// A model's permutation onto `tokens`: each token's id in `model` when below `vocab_size`.
pub(super) fn permutation(tokens: &[String], model: &Vocab, vocab_size: u64) -> Vec<Option<u64>> {
    tokens
        .iter()
        .map(|t| model.ids.get(t).copied().filter(|id| *id < vocab_size))
        .collect()
}

/// `tokenizer.json` of the soup: the source's with `removed` gone (from the model's
/// vocabulary, its merges and the added tokens) and `new` appended to `added_tokens`.
pub(super) fn write_tokenizer_json(mut doc: Value, removed: &[String], new: &[NewToken]) -> Value {
    let gone: HashSet<&str> = removed.iter().map(String::as_str).collect();
    if !gone.is_empty()
        && let Some(model) = doc.get_mut("model").and_then(Value::as_object_mut)
    {
        if let Some(Value::Object(v)) = model.get_mut("vocab") {
            v.retain(|t, _| !gone.contains(t.as_str()));
        }
        if let Some(Value::Array(merges)) = model.get_mut("merges") {
            merges.retain(|m| match m {
                Value::String(s) => !s.split(' ').any(|t| gone.contains(t)),
                Value::Array(pair) => !pair
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|t| gone.contains(t)),
                _ => true,
            });
        }
    }
    let obj = match doc.as_object_mut() {
        Some(o) => o,
        None => return doc,
    };
    let list = obj
        .entry("added_tokens")
        .or_insert_with(|| Value::Array(Vec::new()));
    if !list.is_array() {
        *list = Value::Array(Vec::new());
    }
    if let Value::Array(list) = list {
        list.retain(|e| !gone.contains(e.get("content").and_then(Value::as_str).unwrap_or("")));
        for t in new {
            let mut entry = Map::new();
            entry.insert("id".into(), t.id.into());
            entry.extend(t.settings.clone());
            list.push(Value::Object(entry));
        }
    }
    doc
}

/// `tokenizer_config.json` of the soup: its `added_tokens_decoder`, when it has one, without
/// `removed` and with `new` (by id, each entry's settings).
pub(super) fn write_tokenizer_config(
    mut cfg: Value,
    removed: &[String],
    new: &[NewToken],
) -> Value {
    let Some(obj) = cfg.as_object_mut() else {
        return cfg;
    };
    // transformers 5 reads the added tokens from `tokenizer.json` and writes no
    // `added_tokens_decoder`; one the source has is kept in step.
    if let Some(Value::Object(d)) = obj.get_mut("added_tokens_decoder") {
        d.retain(|_, e| {
            !removed
                .iter()
                .any(|r| e.get("content").and_then(Value::as_str) == Some(r.as_str()))
        });
        for t in new {
            d.insert(t.id.to_string(), Value::Object(t.settings.clone()));
        }
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(tokens: &[&str], added: &[(&str, bool)]) -> Vocab {
        let v: Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), Value::from(i)))
            .collect();
        let added: Vec<Value> = added
            .iter()
            .enumerate()
            .map(|(i, (t, special))| {
                serde_json::json!({"id": tokens.len() + i, "content": t, "special": special})
            })
            .collect();
        let doc =
            serde_json::json!({"model": {"type": "WordLevel", "vocab": v}, "added_tokens": added});
        parse(&serde_json::to_vec(&doc).unwrap(), "t.json")
            .unwrap()
            .0
    }

    #[test]
    fn union_in_recipe_order_then_added_then_extra() {
        let base = vocab(&["a", "b", "c"], &[("<s>", true)]);
        let ft1 = vocab(&["b", "a", "x", "c"], &[("<tool>", true)]);
        let ft2 = vocab(
            &["a", "y", "x"],
            &[("<s>", true), ("<tool>", false), ("<img>", true)],
        );
        let models = [(&base, 4), (&ft1, 5), (&ft2, 3)];
        let new = build(&base, Some(&models), &["<pad>", "a"]);
        let names: Vec<(u64, &str)> = new.iter().map(|t| (t.id, content(&t.settings))).collect();
        // ft2's `<img>` (id 5) is at or beyond its vocab_size (3), and so is `<tool>` there.
        assert_eq!(
            names,
            [(4, "x"), (5, "y"), (6, "<tool>"), (7, "<pad>")],
            "{new:?}"
        );
        assert_eq!(
            new[2].settings["special"], true,
            "the first model's settings"
        );
        assert_eq!(new[3].settings["normalized"], true);
        let tokens = tokens_by_id(&base, &new, "t.json").unwrap();
        assert_eq!(tokens, ["a", "b", "c", "<s>", "x", "y", "<tool>", "<pad>"]);
        let p = permutation(&tokens, &ft1, 5);
        assert_eq!(
            p,
            [
                Some(1),
                Some(0),
                Some(3),
                None,
                Some(2),
                None,
                Some(4),
                None
            ]
        );
        let (stripped, removed) = base.stripped(3);
        assert_eq!(removed, ["<s>"]);
        assert!(!stripped.ids.contains_key("<s>"));
        let doc = serde_json::json!({"model": {"vocab": {"a": 0, "<s>": 3}, "merges": ["a <s>", "a a"]},
                                     "added_tokens": [{"id": 3, "content": "<s>"}]});
        let out = write_tokenizer_json(doc, &removed, &new[..1]);
        assert_eq!(out["model"]["vocab"], serde_json::json!({"a": 0}));
        assert_eq!(out["model"]["merges"], serde_json::json!(["a a"]));
        assert_eq!(out["added_tokens"][0]["content"], "x");
        assert_eq!(out["added_tokens"][0]["id"], 4);
        let cfg = write_tokenizer_config(
            serde_json::json!({"added_tokens_decoder": {"3": {"content": "<s>"}}}),
            &removed,
            &new[..1],
        );
        assert_eq!(
            cfg["added_tokens_decoder"],
            serde_json::json!({"4": new[0].settings.clone()})
        );
        let plain_cfg = serde_json::json!({"bos_token": "<s>"});
        assert_eq!(
            write_tokenizer_config(plain_cfg.clone(), &removed, &new),
            plain_cfg
        );
        for bad_doc in [
            &b"{"[..],
            br#"{"model": {}}"#,
            br#"{"model": {"vocab": {"a": -1}}}"#,
        ] {
            let e = parse(bad_doc, "m/tokenizer.json").unwrap_err();
            assert_eq!(e.file, "m/tokenizer.json");
        }
    }
}

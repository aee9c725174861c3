//! The recipe as mergekit YAML text: what a soup's `mergekit_config.yml` holds and its model
//! card quotes (mergekit writes the configuration file it was given, byte for byte).
//!
//! A YAML request keeps its own text. A JSON request is written as the mergekit
//! configuration that asks for the same merge: `method` → `merge_method`, `uri` → `model`
//! (a `file://` URL as its path, which mergekit reads too; other URLs as they are), a model's
//! `weight` into its `parameters`, `input_dtype` (the cast on load) → `dtype` (which also
//! gives the task-arithmetic family its `compute_dtype`), `output.dtype` → `out_dtype`,
//! `tokenizer_source` (its path), the `tokenizer` section (its models as paths) and
//! `chat_template` as they are, a non-default
//! `output.max_shard_size` under ladle's `output` mapping (mergekit ignores keys it does not
//! know). `ladle merge` reads the text back into the same recipe (tested both ways).
//! Searches (greedy soups, sweeps) have none: what they merge is chosen while they run.

use serde_json::{Map, Value};

use super::MergeRequest;
use crate::methods::{Method, YamlDtype};

/// The mergekit configuration text of a request (after its trajectory was expanded), `None`
/// for a search.
pub fn text(req: &MergeRequest) -> Option<String> {
    if req.evaluator.is_some() || req.sweep.is_some() || req.accept.is_some() {
        return None;
    }
    if let Some(source) = &req.yaml_source {
        return Some(source.clone());
    }
    Some(render(&from_json_request(req)))
}

/// A model reference as mergekit reads it: a local folder as its path.
pub fn model_path(uri: &str) -> String {
    url::Url::parse(uri)
        .ok()
        .filter(|u| u.scheme() == "file")
        .and_then(|u| u.to_file_path().ok())
        .map(|p| {
            let s = p.to_string_lossy().into_owned();
            match s.strip_suffix('/') {
                Some(t) if !t.is_empty() => t.to_string(),
                _ => s,
            }
        })
        .unwrap_or_else(|| uri.to_string())
}

/// The top-level entries, in the order mergekit's examples use.
fn from_json_request(req: &MergeRequest) -> Vec<(String, Value)> {
    let mut top: Vec<(String, Value)> = Vec::new();
    top.push(("merge_method".into(), Value::String(req.method.clone())));
    if let Some(base) = &req.base_model {
        top.push(("base_model".into(), Value::String(model_path(base))));
    }
    if !req.models.is_empty() {
        let models = req
            .models
            .iter()
            .map(|m| {
                let mut entry = Map::new();
                entry.insert("model".into(), Value::String(model_path(&m.uri)));
                let mut params = Map::new();
                if let Some(w) = m.weight {
                    params.insert("weight".into(), Value::from(w));
                }
                params.extend(m.parameters.clone());
                if !params.is_empty() {
                    entry.insert("parameters".into(), Value::Object(params));
                }
                Value::Object(entry)
            })
            .collect();
        top.push(("models".into(), Value::Array(models)));
    }
    if !req.slices.is_empty() {
        let slices = req
            .slices
            .iter()
            .map(|s| {
                let sources = s
                    .sources
                    .iter()
                    .map(|src| {
                        let mut entry = Map::new();
                        entry.insert("model".into(), Value::String(model_path(&src.uri)));
                        entry.insert("layer_range".into(), Value::from(src.layer_range.to_vec()));
                        if !src.parameters.is_empty() {
                            entry
                                .insert("parameters".into(), Value::Object(src.parameters.clone()));
                        }
                        Value::Object(entry)
                    })
                    .collect();
                serde_json::json!({ "sources": Value::Array(sources) })
            })
            .collect();
        top.push(("slices".into(), Value::Array(slices)));
    }
    let mut params = req.parameters.clone();
    let compute =
        Method::parse(&req.method).map(|m| m.about().yaml_dtype) == Some(YamlDtype::Compute);
    // YAML's `dtype` is the cast on load (`input_dtype`) and, for the task-arithmetic family,
    // also the compute dtype: a `compute_dtype` equal to it goes without saying.
    let dtype = req.input_dtype.clone();
    if compute
        && dtype.is_some()
        && params.get("compute_dtype").and_then(Value::as_str) == dtype.as_deref()
    {
        params.remove("compute_dtype");
    }
    if !params.is_empty() {
        top.push(("parameters".into(), Value::Object(params)));
    }
    if let Some(d) = dtype {
        top.push(("dtype".into(), Value::String(d)));
    }
    if let Some(d) = &req.output.dtype {
        top.push(("out_dtype".into(), Value::String(d.clone())));
    }
    if let Some(t) = &req.tokenizer_source {
        top.push(("tokenizer_source".into(), Value::String(model_path(t))));
    }
    if let Some(t) = &req.tokenizer {
        top.push(("tokenizer".into(), tokenizer_yaml(t)));
    }
    if let Some(t) = &req.chat_template {
        top.push(("chat_template".into(), Value::String(t.clone())));
    }
    if let Some(size) = &req.output.max_shard_size {
        top.push((
            "output".into(),
            serde_json::json!({ "max_shard_size": size.clone() }),
        ));
    }
    let mut flags = Map::new();
    for (key, value) in [
        ("copy_tokenizer", req.output.copy_tokenizer),
        ("write_model_card", req.output.write_model_card),
    ] {
        if let Some(v) = value {
            flags.insert(key.into(), Value::Bool(v));
        }
    }
    if !flags.is_empty() {
        match top.iter_mut().find(|(k, _)| k == "output") {
            Some((_, Value::Object(out))) => out.extend(flags),
            _ => top.push(("output".into(), Value::Object(flags))),
        }
    }
    top
}

/// A request's `tokenizer` as mergekit's section: model references as paths, `tokens` a
/// mapping by token (written in key order, as every mapping here).
fn tokenizer_yaml(t: &Value) -> Value {
    let path = |v: &Value| match v.as_str() {
        Some(s) if s != "union" && s != "base" => Value::String(model_path(s)),
        _ => v.clone(),
    };
    let Some(obj) = t.as_object() else {
        return t.clone();
    };
    let mut out = obj.clone();
    if let Some(source) = obj.get("source") {
        out.insert("source".into(), path(source));
    }
    let entries: Vec<(String, Map<String, Value>)> = match obj.get("tokens") {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|i| {
                let mut e = i.as_object()?.clone();
                let token = e.remove("token")?.as_str()?.to_string();
                Some((token, e))
            })
            .collect(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| (k.clone(), v.as_object().cloned().unwrap_or_default()))
            .collect(),
        _ => Vec::new(),
    };
    if obj.contains_key("tokens") {
        let mut tokens = Map::new();
        for (token, mut e) in entries {
            match e.get_mut("source") {
                Some(Value::Object(src)) => {
                    if let Some(m) = src.get("model").cloned() {
                        src.insert("model".into(), path(&m));
                    }
                }
                Some(src) => *src = path(src),
                None => {}
            }
            tokens.insert(token, Value::Object(e));
        }
        out.insert("tokens".into(), Value::Object(tokens));
    }
    Value::Object(out)
}

/// Block YAML: mappings and lists of mappings as blocks, lists of scalars in flow style,
/// strings plain when YAML reads them back as the same string, else double-quoted (a JSON
/// string is a valid YAML double-quoted scalar).
fn render(top: &[(String, Value)]) -> String {
    let mut out = String::new();
    for (k, v) in top {
        entry(&mut out, 0, k, v);
    }
    out
}

fn entry(out: &mut String, indent: usize, key: &str, value: &Value) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(m) if !m.is_empty() => {
            out.push_str(&format!("{pad}{}:\n", scalar_str(key)));
            for (k, v) in sorted(m) {
                entry(out, indent + 2, k, v);
            }
        }
        Value::Array(items) if items.iter().any(|i| i.is_object() || i.is_array()) => {
            out.push_str(&format!("{pad}{}:\n", scalar_str(key)));
            for item in items {
                list_item(out, indent + 2, item);
            }
        }
        other => out.push_str(&format!("{pad}{}: {}\n", scalar_str(key), flow(other))),
    }
}

fn list_item(out: &mut String, indent: usize, item: &Value) {
    let pad = " ".repeat(indent);
    match item {
        Value::Object(m) if !m.is_empty() => {
            let mut first = true;
            for (k, v) in sorted(m) {
                let mut one = String::new();
                entry(&mut one, indent + 2, k, v);
                if first {
                    // `- key: ...` on the item's own line.
                    out.push_str(&format!("{pad}- {}", &one[indent + 2..]));
                    first = false;
                } else {
                    out.push_str(&one);
                }
            }
        }
        other => out.push_str(&format!("{pad}- {}\n", flow(other))),
    }
}

/// A mapping's entries by key (as mergekit's `yaml.dump` orders them), whatever order the
/// map keeps.
fn sorted(m: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut v: Vec<(&String, &Value)> = m.iter().collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

/// A value on one line.
fn flow(v: &Value) -> String {
    match v {
        Value::String(s) => scalar_str(s),
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(flow).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(m) => format!(
            "{{{}}}",
            sorted(m)
                .into_iter()
                .map(|(k, v)| format!("{}: {}", scalar_str(k), flow(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

/// A string as a YAML scalar: plain when it is unambiguous, else JSON-quoted.
fn scalar_str(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./+@~".contains(c))
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '/' || c == '_')
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "y" | "n" | "nan" | "inf"
        );
    if plain {
        s.to_string()
    } else {
        serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_request_as_mergekit_yaml() {
        let req = MergeRequest::from_json(
            br#"{"method": "ties", "base_model": "file:///m/base/",
                 "models": [{"uri": "file:///m/a%20b/", "weight": 0.5,
                             "parameters": {"density": [0.5, 0.7]}},
                            {"uri": "s3://bucket/ft/", "parameters": {"weight": {"filter": "x"}}}],
                 "parameters": {"normalize": true, "compute_dtype": "float32"},
                 "input_dtype": "float32",
                 "output": {"uri": "file:///o/", "dtype": "bfloat16", "max_shard_size": "1GB",
                            "write_model_card": false}}"#,
        )
        .unwrap();
        let text = text(&req).unwrap();
        let want = [
            "merge_method: ties",
            "base_model: /m/base",
            "models:",
            "  - model: \"/m/a b\"",
            "    parameters:",
            "      density: [0.5, 0.7]",
            "      weight: 0.5",
            "  - model: \"s3://bucket/ft/\"",
            "    parameters:",
            "      weight:",
            "        filter: x",
            "parameters:",
            "  normalize: true",
            "dtype: float32",
            "out_dtype: bfloat16",
            "output:",
            "  max_shard_size: \"1GB\"",
            "  write_model_card: false",
            "",
        ];
        assert_eq!(text, want.join("\n"));
        // It reads back as YAML with the same content.
        let doc = super::super::yaml::parse(&text).unwrap();
        assert_eq!(doc["models"][0]["model"], "/m/a b");
        assert_eq!(doc["models"][1]["parameters"]["weight"]["filter"], "x");
        assert_eq!(doc["parameters"]["normalize"], true);
        assert_eq!(doc["output"]["write_model_card"], false);
        assert_eq!(scalar_str("true"), "\"true\"");
        assert_eq!(scalar_str("1e3"), "\"1e3\"");
        assert_eq!(scalar_str("org/name"), "org/name");
    }

    #[test]
    fn yaml_keeps_its_text_and_searches_have_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a")).unwrap();
        let source = "# mine\nmerge_method: linear\nmodels:\n  - model: a\n";
        let req = MergeRequest::from_yaml(source, Some(dir.path())).unwrap();
        assert_eq!(text(&req).as_deref(), Some(source));
        let req = MergeRequest::from_json(
            br#"{"method": "linear", "models": [{"uri": "file:///a/"}], "output": {"uri": "file:///o/"},
                 "sweep": {"parameter": "x", "values": [1]}}"#,
        )
        .unwrap();
        assert_eq!(text(&req), None);
    }
}

//! mergekit YAML recipes → ladle's request (then validated as any JSON request).
//!
//! Parsed with `serde-saphyr` (maintained, panic-free by design, with budgets on aliases,
//! nesting and events against "billion laughs" inputs; `serde_yaml` is archived). Supported
//! keys: `merge_method`, `models` (`model`, `parameters`), `base_model`, `parameters`,
//! `slices` (`sources`: `model`, `layer_range`, `parameters`; `base_model`, `parameters`), `dtype`, `out_dtype`,
//! `tokenizer_source` (`base`, `union`, or a model: a path, URL or hub id, also spelled
//! `model:<path>`), the `tokenizer` section (`source`, `tokens`, `pad_to_multiple_of`; its
//! `tokens` kept in the order written), `chat_template` ([`super::tokenizer`]), and ladle's own
//! `output` (an [`super::OutputSpec`]). Every other key mergekit knows (`modules`, a slice's
//! `residual_weight` (unused by mergekit 0.1.5), ...) is rejected by name.
//!
//! `dtype` has mergekit's cast-on-load meaning: every float input tensor is cast to it
//! (`input_dtype`, round-to-nearest-even as torch's `Tensor.to`) and the method computes in it
//! (the task-arithmetic family also gets it as `compute_dtype`); it is the output dtype unless
//! `out_dtype` names one, except for the methods that write their own (float32 for
//! `arcee_fusion` and `ramplus_tl`, as mergekit). Refused: any other dtype name than
//! float32, float16, bfloat16 (by name); integer and bool tensors are copied, never cast.
//!
//! Model references: `MODEL+LORA` (mergekit's syntax) is a model entry with a PEFT adapter
//! folded in (`lora`). A URL (`file://`, `s3://`) is kept; a relative path is resolved, when a
//! `base_dir` (the recipe file's folder) is given, from the current directory first (as
//! mergekit resolves it), then from `base_dir`. A reference that is no existing local path
//! but has the shape of a Hugging Face hub id (`org/name`, `org/name@revision`) is kept as
//! written: storage resolves it from the local cache ([`crate::storage::hf_cache`]), as
//! mergekit treats a path that does not exist as a hub id. Anything else is an error naming
//! the field.

use std::path::{Component, Path, PathBuf};

use serde_json::{Map, Value};

use super::RecipeError;
use crate::merge::DType;
use crate::methods::{Method, YamlDtype};
use crate::storage::hf_cache::HubRef;

pub(super) fn invalid(field: impl Into<String>, message: impl Into<String>) -> RecipeError {
    RecipeError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// `path` with the part up to its last `..` resolved (links followed there, as the kernel
/// does), the rest as written; `.` segments dropped. Unchanged when it has no `..` or that
/// part does not resolve.
fn without_parent_segments(path: &Path) -> PathBuf {
    let parts: Vec<Component<'_>> = path.components().collect();
    let Some(last) = parts
        .iter()
        .rposition(|c| matches!(c, Component::ParentDir))
    else {
        return parts.iter().collect();
    };
    let head: PathBuf = parts[..=last].iter().collect();
    match head.canonicalize() {
        Ok(mut resolved) => {
            resolved.extend(&parts[last + 1..]);
            resolved
        }
        Err(_) => path.to_path_buf(),
    }
}

pub(super) fn model_ref(
    v: &Value,
    field: &str,
    base_dir: Option<&Path>,
) -> Result<String, RecipeError> {
    let s = v
        .as_str()
        .ok_or_else(|| invalid(field, "expected a path or a storage URL"))?;
    if s.contains("://") {
        return Ok(s.to_string());
    }
    let hub_id = HubRef::parse(s).is_some();
    let path = Path::new(s);
    let full = match (path.is_absolute(), base_dir) {
        (true, _) => path.to_path_buf(),
        // From the current directory, as mergekit resolves them; else from the recipe's
        // folder (ladle's earlier rule).
        (false, Some(dir)) => std::env::current_dir()
            .ok()
            .map(|cwd| cwd.join(path))
            .filter(|p| p.exists())
            .unwrap_or_else(|| dir.join(path)),
        // Over HTTP there is no recipe folder: a hub id, or nothing.
        (false, None) if hub_id => return Ok(s.to_string()),
        (false, None) => {
            return Err(invalid(
                field,
                format!(
                    "{s:?} is neither a storage URL nor a Hugging Face hub id \
                     (org/name[@revision]); a relative path needs a recipe file (ladle merge \
                     recipe.yml)"
                ),
            ));
        }
    };
    if hub_id && !full.exists() {
        return Ok(s.to_string());
    }
    // `..` segments are refused by storage: resolve them (the path must exist anyway); links
    // after the last one stay as written, so the recipe and the manifest name them so.
    let full = without_parent_segments(&full);
    let url = if full.is_dir() {
        url::Url::from_directory_path(&full)
    } else if full.is_file() {
        url::Url::from_file_path(&full)
    } else {
        return Err(invalid(
            field,
            format!(
                "{s:?} is neither a local checkpoint (not in the current directory, and {} \
                 does not exist) nor a storage URL nor a Hugging Face hub id \
                 (org/name[@revision])",
                full.display()
            ),
        ));
    };
    url.map(|u| u.to_string()).map_err(|()| {
        invalid(
            field,
            format!("{} is not a valid local path", full.display()),
        )
    })
}

/// mergekit's `MODEL+LORA` reference: split at the one `+` (more than one is an error, as in
/// mergekit 0.1.5).
fn split_lora(v: &Value, field: &str) -> Result<(Value, Option<Value>), RecipeError> {
    let Some(s) = v.as_str() else {
        return Ok((v.clone(), None));
    };
    let parts: Vec<&str> = s.split('+').collect();
    match parts.as_slice() {
        [_] => Ok((v.clone(), None)),
        [model, lora] if !model.is_empty() && !lora.is_empty() => Ok((
            Value::String((*model).to_string()),
            Some(Value::String((*lora).to_string())),
        )),
        _ => Err(invalid(
            field,
            format!("{s:?}: a model with an adapter is MODEL+LORA, with exactly one `+`"),
        )),
    }
}

pub(super) fn object<'a>(v: &'a Value, field: &str) -> Result<&'a Map<String, Value>, RecipeError> {
    v.as_object()
        .ok_or_else(|| invalid(field, "expected a mapping"))
}

fn array<'a>(v: &'a Value, field: &str) -> Result<&'a Vec<Value>, RecipeError> {
    v.as_array()
        .ok_or_else(|| invalid(field, "expected a list"))
}

/// Translate a parsed mergekit configuration into ladle's JSON request shape.
pub fn to_request(doc: &Value, base_dir: Option<&Path>) -> Result<Value, RecipeError> {
    let top = object(doc, "recipe")?;
    let mut req = Map::new();
    let mut parameters = Map::new();
    let mut dtype: Option<String> = None;
    let mut out_dtype: Option<String> = None;
    let mut output = Map::new();
    let method = top
        .get("merge_method")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("merge_method", "required (a string)"))?
        .to_string();
    for (key, value) in top {
        match key.as_str() {
            "merge_method" => {}
            "base_model" => {
                if split_lora(value, "base_model")?.1.is_some() {
                    return Err(invalid(
                        "base_model",
                        "a model with a LoRA adapter folded in (`model+lora`) cannot be the \
                         base model; fold it into a model entry instead",
                    ));
                }
                req.insert(
                    "base_model".into(),
                    Value::String(model_ref(value, "base_model", base_dir)?),
                );
            }
            "models" => {
                let mut models = Vec::new();
                for (i, m) in array(value, "models")?.iter().enumerate() {
                    let field = format!("models[{i}]");
                    let m = object(m, &field)?;
                    let mut spec = Map::new();
                    for (k, v) in m {
                        match k.as_str() {
                            "model" => {
                                let mf = format!("{field}.model");
                                let (model, lora) = split_lora(v, &mf)?;
                                spec.insert(
                                    "uri".into(),
                                    Value::String(model_ref(&model, &mf, base_dir)?),
                                );
                                if let Some(lora) = lora {
                                    spec.insert(
                                        "lora".into(),
                                        Value::String(model_ref(&lora, &mf, base_dir)?),
                                    );
                                }
                            }
                            "parameters" => {
                                object(v, &format!("{field}.parameters"))?;
                                spec.insert("parameters".into(), v.clone());
                            }
                            other => {
                                return Err(invalid(
                                    format!("{field}.{other}"),
                                    "unsupported key (supported: model, parameters)",
                                ));
                            }
                        }
                    }
                    if !spec.contains_key("uri") {
                        return Err(invalid(format!("{field}.model"), "required"));
                    }
                    models.push(Value::Object(spec));
                }
                req.insert("models".into(), Value::Array(models));
            }
            "slices" => {
                let mut slices = Vec::new();
                for (i, s) in array(value, "slices")?.iter().enumerate() {
                    let field = format!("slices[{i}]");
                    let s = object(s, &field)?;
                    let mut sources = Vec::new();
                    let mut slice = Map::new();
                    for (k, v) in s {
                        match k.as_str() {
                            "sources" => {}
                            "base_model" => {
                                let bf = format!("{field}.base_model");
                                slice.insert(
                                    "base_model".into(),
                                    Value::String(model_ref(v, &bf, base_dir)?),
                                );
                                continue;
                            }
                            "parameters" => {
                                object(v, &format!("{field}.parameters"))?;
                                slice.insert("parameters".into(), v.clone());
                                continue;
                            }
                            _ => {
                                return Err(invalid(
                                    format!("{field}.{k}"),
                                    "unsupported key (supported: sources, base_model, parameters)",
                                ));
                            }
                        }
                        for (j, src) in array(v, &format!("{field}.sources"))?.iter().enumerate() {
                            let sf = format!("{field}.sources[{j}]");
                            let src = object(src, &sf)?;
                            let mut out = Map::new();
                            for (sk, sv) in src {
                                match sk.as_str() {
                                    "model" => {
                                        out.insert(
                                            "uri".into(),
                                            Value::String(model_ref(
                                                sv,
                                                &format!("{sf}.model"),
                                                base_dir,
                                            )?),
                                        );
                                    }
                                    "layer_range" | "parameters" => {
                                        out.insert(sk.clone(), sv.clone());
                                    }
                                    other => {
                                        return Err(invalid(
                                            format!("{sf}.{other}"),
                                            "unsupported key (supported: model, layer_range, parameters)",
                                        ));
                                    }
                                }
                            }
                            sources.push(Value::Object(out));
                        }
                    }
                    slice.insert("sources".into(), Value::Array(sources));
                    slices.push(Value::Object(slice));
                }
                req.insert("slices".into(), Value::Array(slices));
            }
            "parameters" => {
                parameters = object(value, "parameters")?.clone();
            }
            "dtype" => dtype = Some(dtype_name(value, "dtype")?),
            "out_dtype" => out_dtype = Some(dtype_name(value, "out_dtype")?),
            "tokenizer_source" => match value.as_str() {
                // The base model's tokenizer, built (as mergekit plans it): kept as written.
                Some(super::tokenizer::BASE) => {
                    req.insert(
                        "tokenizer_source".into(),
                        Value::String(super::tokenizer::BASE.into()),
                    );
                }
                // A tokenizer with every model's tokens, built for the soup: the section's
                // `source: union` with nothing else (as mergekit plans it).
                Some("union") => {
                    super::yaml_tokenizer::set_tokenizer(
                        &mut req,
                        serde_json::json!({"source": "union"}),
                        "tokenizer_source",
                    )?;
                }
                // A model (mergekit: a path or hub id; `model:<path>` spelled out too): its
                // tokenizer, built.
                Some(s) => {
                    let model = Value::String(s.strip_prefix("model:").unwrap_or(s).to_string());
                    req.insert(
                        "tokenizer_source".into(),
                        Value::String(model_ref(&model, "tokenizer_source", base_dir)?),
                    );
                }
                None => {
                    return Err(invalid(
                        "tokenizer_source",
                        "expected `base`, `union` or a model (a path, storage URL or hub id)",
                    ));
                }
            },
            "tokenizer" => {
                let section = super::yaml_tokenizer::section(value, base_dir)?;
                super::yaml_tokenizer::set_tokenizer(&mut req, section, "tokenizer")?;
            }
            "chat_template" => {
                let text = value
                    .as_str()
                    .ok_or_else(|| invalid("chat_template", "expected a template name or text"))?;
                req.insert("chat_template".into(), Value::String(text.to_string()));
            }
            "output" => output = object(value, "output")?.clone(),
            other => {
                return Err(invalid(
                    other,
                    "mergekit option not supported by ladle (supported: merge_method, models, \
                     base_model, parameters, slices, dtype, out_dtype, tokenizer_source, \
                     tokenizer, chat_template)",
                ));
            }
        }
    }
    let about = Method::parse(&method).map(|m| m.about());
    let role = about.map_or(YamlDtype::Inputs, |a| a.yaml_dtype);
    // mergekit writes `out_dtype`, else what the method returns: the dtype it computed in
    // (`dtype`), or its own (float32 for arcee_fusion and ramplus_tl).
    let writes_own = about.is_some_and(|a| a.output_dtype.is_some());
    if let Some(d) = &dtype {
        // mergekit casts every tensor to `dtype` on load, then computes in it: ladle casts the
        // float inputs (`input_dtype`); the task-arithmetic family also takes it as its
        // compute dtype.
        if role == YamlDtype::Compute && !parameters.contains_key("compute_dtype") {
            parameters.insert("compute_dtype".into(), Value::String(d.clone()));
        }
        req.insert("input_dtype".into(), Value::String(d.clone()));
    }
    if !output.contains_key("dtype")
        && let Some(d) = out_dtype.or(dtype.filter(|_| !writes_own))
    {
        output.insert("dtype".into(), Value::String(d));
    }
    if !output.contains_key("uri") {
        // The CLI fills it from --out; an API request must name it.
        output.insert("uri".into(), Value::String(String::new()));
    }
    req.insert("method".into(), Value::String(method));
    req.insert("parameters".into(), Value::Object(parameters));
    req.insert("output".into(), Value::Object(output));
    Ok(Value::Object(req))
}

fn dtype_name(v: &Value, field: &str) -> Result<String, RecipeError> {
    let s = v
        .as_str()
        .ok_or_else(|| invalid(field, "expected a dtype name"))?;
    DType::parse_user(s)
        .filter(|d| matches!(d, DType::F32 | DType::F16 | DType::BF16))
        .ok_or_else(|| {
            invalid(
                field,
                format!("unsupported dtype {s:?} (float32, float16, bfloat16)"),
            )
        })?;
    Ok(s.to_string())
}

/// Parse YAML text (bounded by serde-saphyr's default budgets) into a JSON value.
pub fn parse(text: &str) -> Result<Value, RecipeError> {
    let mut doc = serde_saphyr::from_str::<Value>(text)
        .map_err(|e| RecipeError::Syntax(format!("invalid YAML recipe: {e}")))?;
    super::yaml_tokenizer::order_tokens(text, &mut doc)?;
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translates_and_rejects_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("inputs/base")).unwrap();
        std::fs::create_dir_all(dir.path().join("inputs/ft1")).unwrap();
        let text = "merge_method: ties\nbase_model: inputs/base\nmodels:\n  - model: inputs/ft1\n    parameters:\n      weight: 0.5\n      density: [0.5, 0.7]\ndtype: float32\nout_dtype: bfloat16\ntokenizer_source: base\n";
        let v = to_request(&parse(text).unwrap(), Some(dir.path())).unwrap();
        assert_eq!(v["method"], "ties");
        assert!(v["base_model"].as_str().unwrap().starts_with("file:///"));
        assert_eq!(v["parameters"]["compute_dtype"], "float32");
        assert_eq!(v["output"]["dtype"], "bfloat16");
        assert_eq!(v["models"][0]["parameters"]["density"][1], 0.7);
        // `tokenizer_source: base` is kept (a build from the base's tokenizer), never a path.
        assert_eq!(v["tokenizer_source"], "base");
        let e = |t: &str| match to_request(&parse(t).unwrap(), Some(dir.path())) {
            Err(RecipeError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            e("merge_method: linear\nchat_template: [x]\n"),
            "chat_template"
        );
        assert_eq!(e("merge_method: linear\ntokenizer: [union]\n"), "tokenizer");
        assert_eq!(
            e("merge_method: linear\ntokenizer_source: union\ntokenizer: {source: base}\n"),
            "tokenizer_source"
        );
        // The section: its models resolved, `tokens` a list in the order written.
        let v = to_request(
            &parse(
                "merge_method: linear\ntokenizer:\n  source: inputs/ft1\n  tokens:\n    zz: {source: inputs/ft1, force: true}\n    aa:\n      source: {kind: model_token, model: inputs/base, token_id: 3}\n    mm: {source: {kind: zero}}\n  pad_to_multiple_of: 64\n",
            )
            .unwrap(),
            Some(dir.path()),
        )
        .unwrap();
        let t = &v["tokenizer"];
        assert!(
            t["source"].as_str().unwrap().ends_with("/inputs/ft1/"),
            "{v}"
        );
        let names: Vec<&str> = t["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["token"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["zz", "aa", "mm"], "{v}");
        assert!(
            t["tokens"][0]["source"]
                .as_str()
                .unwrap()
                .ends_with("/inputs/ft1/")
        );
        assert!(
            t["tokens"][1]["source"]["model"]
                .as_str()
                .unwrap()
                .ends_with("/inputs/base/")
        );
        assert_eq!(t["pad_to_multiple_of"], 64);
        let v = to_request(
            &parse("merge_method: linear\ntokenizer_source: union\n").unwrap(),
            None,
        )
        .unwrap();
        assert_eq!(v["tokenizer"], serde_json::json!({"source": "union"}));
        let v = to_request(
            &parse(
                "merge_method: linear\ntokenizer_source: model:inputs/ft1\nchat_template: chatml\n",
            )
            .unwrap(),
            Some(dir.path()),
        )
        .unwrap();
        assert!(
            v["tokenizer_source"]
                .as_str()
                .unwrap()
                .ends_with("/inputs/ft1/"),
            "{v}"
        );
        assert_eq!(v["chat_template"], "chatml");
        let v = to_request(
            &parse("merge_method: linear\ntokenizer_source: org/tok\n").unwrap(),
            None,
        )
        .unwrap();
        assert_eq!(v["tokenizer_source"], "org/tok");
        // Not a local path, shaped as a hub id: kept as written (storage resolves it); an
        // existing local folder of that shape (`inputs/ft1`) is the folder, as in mergekit.
        let v = to_request(
            &parse("merge_method: linear\nmodels:\n  - model: org/some-hub-model@v1\n  - model: inputs/ft1\n").unwrap(),
            Some(dir.path()),
        )
        .unwrap();
        assert_eq!(v["models"][0]["uri"], "org/some-hub-model@v1");
        assert!(
            v["models"][1]["uri"]
                .as_str()
                .unwrap()
                .starts_with("file:///")
        );
        let v = to_request(
            &parse("merge_method: linear\nmodels:\n  - model: org/m\n").unwrap(),
            None,
        )
        .unwrap();
        assert_eq!(v["models"][0]["uri"], "org/m");
        assert_eq!(
            e("merge_method: linear\nmodels:\n  - model: a/b/not-there\n"),
            "models[0].model"
        );
        assert_eq!(e("models: []\n"), "merge_method");
        assert_eq!(
            e(
                "merge_method: passthrough\nslices:\n  - sources:\n      - model: inputs/ft1\n        layer_range: [0, 1]\n    residual_weight: 0.5\n"
            ),
            "slices[0].residual_weight"
        );
        assert!(parse("a: [1, 2\n").is_err());
        // An alias bomb stays within the parser's budgets.
        let bomb = "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\nh: [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n";
        let _ = parse(bomb);
    }
}

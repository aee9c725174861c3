//! The tokenizer options of a recipe, as mergekit 0.1.5 reads them: `tokenizer_source` and
//! the `tokenizer` section (a tokenizer built for the soup: [`TokenizerSpec`], and what a
//! recipe builds: [`TokenizerBuild`]) and `chat_template` (the template it gets instead of the
//! tokenizer's own).
//!
//! `chat_template` is one of mergekit's built-in names (`alpaca`, `chatml`, `exaone`,
//! `llama3`, `mistral`; ladle's own renderings of those formats, `assets/chat_templates/`, whose
//! text may differ from mergekit's files) or a Jinja template;
//! mergekit's rule tells them apart: a string under 256 characters with no line break and no
//! `{` that names a built-in template is that template; otherwise a string of at least 20
//! characters holding a `{` is a template; anything else is refused. `auto` is kept as
//! [`AUTO`]: the engine picks the most common template among the inputs, as mergekit does.
//!
//! A built tokenizer ([`TokenizerSpec`]: mergekit's `tokenizer_source` (`base`, `union` or a
//! model), or its `tokenizer:` section with `source`, `tokens`, `pad_to_multiple_of`) is
//! validated here for its shape only; the engine reads the models' tokenizers
//! (`engine::vocab`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::RecipeError;

/// `chat_template: auto`: the most common template among the inputs (chosen by the engine).
pub const AUTO: &str = "auto";

/// Templates for mergekit 0.1.5's built-in names (ladle's own text of each format).
pub const CHAT_TEMPLATES: [(&str, &str); 5] = [
    (
        "alpaca",
        include_str!("../../assets/chat_templates/alpaca.jinja"),
    ),
    (
        "chatml",
        include_str!("../../assets/chat_templates/chatml.jinja"),
    ),
    (
        "exaone",
        include_str!("../../assets/chat_templates/exaone.jinja"),
    ),
    (
        "llama3",
        include_str!("../../assets/chat_templates/llama3.jinja"),
    ),
    (
        "mistral",
        include_str!("../../assets/chat_templates/mistral.jinja"),
    ),
];

/// The longest chat template accepted (a template is part of the stored recipe).
pub const MAX_CHAT_TEMPLATE: usize = 64 * 1024;

/// The template text `chat_template` (as written) stands for.
pub fn chat_template(written: &str) -> Result<String, RecipeError> {
    let invalid = |m: String| RecipeError::invalid("chat_template", m);
    let names = || {
        CHAT_TEMPLATES
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if written == AUTO {
        return Ok(AUTO.to_string());
    }
    let name_like = written.len() < 256 && !written.contains('\n') && !written.contains('{');
    if name_like && let Some((_, text)) = CHAT_TEMPLATES.iter().find(|(n, _)| *n == written) {
        return Ok((*text).to_string());
    }
    if written.len() < 20 || !written.contains('{') {
        return Err(invalid(format!(
            "{written:?} is neither one of mergekit's templates ({}) nor a Jinja template (at \
             least 20 characters, with a `{{`)",
            names()
        )));
    }
    if written.len() > MAX_CHAT_TEMPLATE {
        return Err(invalid(format!(
            "a template of {} bytes; at most {MAX_CHAT_TEMPLATE} are accepted",
            written.len()
        )));
    }
    Ok(written.to_string())
}

/// `tokenizer_source: base` (YAML and JSON), kept as written in the stored recipe: the base
/// model's tokenizer, built ([`TokenizerBuild`]). Never a model's name.
pub const BASE: &str = "base";
/// `tokenizer_source: union`: the section's `source: union` with nothing else.
pub const UNION: &str = "union";

/// The tokenizer a recipe builds for the soup and the field that asks for it, as mergekit
/// 0.1.5's planner reads them (`MergePlanner.__init__`, `mergekit/plan.py`): the `tokenizer`
/// section, else a plain `tokenizer_source` (`base` or a model), which is mergekit's
/// `BuildTokenizer` with that source and nothing else: its vocabulary (the base's stripped at
/// its `vocab_size`, or the model's as it is) and every model's embedding rows permuted onto
/// it, exactly as the section.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizerBuild {
    pub spec: TokenizerSpec,
    /// `tokenizer_source` or `tokenizer`: the field refusals name.
    pub field: &'static str,
}

impl TokenizerBuild {
    /// What `output` builds (`None`: the donor's files, copied).
    pub fn of(output: &super::Output) -> Option<TokenizerBuild> {
        if let Some(spec) = &output.tokenizer {
            return Some(TokenizerBuild {
                spec: spec.clone(),
                field: "tokenizer",
            });
        }
        let source = match output.tokenizer_source.as_deref()? {
            BASE => VocabSource::Base,
            uri => VocabSource::Model(uri.to_string()),
        };
        Some(TokenizerBuild {
            spec: TokenizerSpec {
                source,
                tokens: Vec::new(),
                pad_to_multiple_of: None,
            },
            field: "tokenizer_source",
        })
    }

    /// Only a source, `base` or a model (no `tokens`, no `pad_to_multiple_of`): when every
    /// model's rows already sit on that vocabulary the build changes no tensor, and the
    /// source's tokenizer files are copied as they are (`engine::permute::attach`).
    pub fn source_only(&self) -> bool {
        self.spec.tokens.is_empty()
            && self.spec.pad_to_multiple_of.is_none()
            && self.spec.source != VocabSource::Union
    }

    /// The field naming the source: `tokenizer_source` or `tokenizer.source`.
    pub fn source_field(&self) -> &'static str {
        match self.field {
            "tokenizer" => "tokenizer.source",
            f => f,
        }
    }
}

/// Which vocabulary a built tokenizer starts from (mergekit's `tokenizer.source`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VocabSource {
    /// The base model's tokenizer plus every other model's tokens (mergekit's default).
    Union,
    /// The base model's (else the first model's) tokenizer.
    Base,
    /// That model's tokenizer (a URL, or a hub id).
    Model(String),
}

/// Where a token's embedding row comes from (mergekit's `TokenEmbeddingConfig.source`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EmbedSource {
    /// A row of zeros.
    Zero,
    /// The token's own row in that model (a URL, one of the recipe's models).
    Model { model: String },
    /// Row `token_id`, or the row of `token` in that model's own vocabulary.
    ModelToken {
        model: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token_id: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
}

/// One entry of `tokenizer.tokens`: a token the soup's vocabulary holds (added when new) and
/// where its embedding rows come from; `force` uses that source even for the models that
/// have the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSpec {
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<EmbedSource>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// A tokenizer built for the soup, with every model's embedding rows permuted onto its
/// vocabulary before the merge (mergekit's `tokenizer` section; `tokenizer_source: union` is
/// `source: union` with nothing else).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerSpec {
    pub source: VocabSource,
    /// In the order written (new tokens get their ids in it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<TokenSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_to_multiple_of: Option<u64>,
}

/// Most entries `tokenizer.tokens` may have, and the longest token.
pub const MAX_TOKENS: usize = 65_536;
pub const MAX_TOKEN_LEN: usize = 1024;
/// The largest `pad_to_multiple_of`.
pub const MAX_PAD_MULTIPLE: u64 = 1 << 16;

impl TokenizerSpec {
    /// Every model URL it names (its source, the tokens' source models), for intake to
    /// resolve and the CLI to make absolute.
    pub fn uris_mut(&mut self) -> impl Iterator<Item = &mut String> {
        let source = match &mut self.source {
            VocabSource::Model(m) => Some(m),
            _ => None,
        };
        source.into_iter().chain(
            self.tokens
                .iter_mut()
                .filter_map(|t| match t.source.as_mut()? {
                    EmbedSource::Zero => None,
                    EmbedSource::Model { model } | EmbedSource::ModelToken { model, .. } => {
                        Some(model)
                    }
                }),
        )
    }
}

/// A request's `tokenizer` object (mergekit's section, in JSON: `source` (`union` by default,
/// `base`, or a model), `tokens` (an object by token, or a list of `{"token": …}` entries to
/// keep an order), `pad_to_multiple_of`).
pub fn tokenizer_section(v: &Value) -> Result<TokenizerSpec, RecipeError> {
    let obj = v
        .as_object()
        .ok_or_else(|| RecipeError::invalid("tokenizer", "expected an object"))?;
    let mut spec = TokenizerSpec {
        source: VocabSource::Union,
        tokens: Vec::new(),
        pad_to_multiple_of: None,
    };
    for (key, value) in obj {
        let field = format!("tokenizer.{key}");
        match key.as_str() {
            "source" => {
                spec.source = match value.as_str() {
                    Some("union") => VocabSource::Union,
                    Some("base") => VocabSource::Base,
                    Some(s) if !s.trim().is_empty() => {
                        VocabSource::Model(s.strip_prefix("model:").unwrap_or(s).to_string())
                    }
                    _ => {
                        return Err(RecipeError::invalid(
                            field,
                            "expected `union`, `base` or a model (a URL or hub id)",
                        ));
                    }
                }
            }
            "pad_to_multiple_of" => match value {
                Value::Null => {}
                _ => {
                    let n = value
                        .as_u64()
                        .filter(|n| (1..=MAX_PAD_MULTIPLE).contains(n))
                        .ok_or_else(|| {
                            RecipeError::invalid(
                                &field,
                                format!("expected an integer from 1 to {MAX_PAD_MULTIPLE}"),
                            )
                        })?;
                    spec.pad_to_multiple_of = Some(n);
                }
            },
            "tokens" => spec.tokens = tokens(value)?,
            _ => {
                return Err(RecipeError::invalid(
                    field,
                    "unsupported key (supported: source, tokens, pad_to_multiple_of)",
                ));
            }
        }
    }
    Ok(spec)
}

fn tokens(v: &Value) -> Result<Vec<TokenSpec>, RecipeError> {
    let entries: Vec<(String, &Value)> = match v {
        Value::Null => Vec::new(),
        Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), v)).collect(),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                item.get("token")
                    .and_then(Value::as_str)
                    .map(|t| (t.to_string(), item))
                    .ok_or_else(|| {
                        RecipeError::invalid(
                            format!("tokenizer.tokens[{i}].token"),
                            "required (a string)",
                        )
                    })
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(RecipeError::invalid(
                "tokenizer.tokens",
                "expected an object (by token) or a list of {\"token\": …} entries",
            ));
        }
    };
    if entries.len() > MAX_TOKENS {
        return Err(RecipeError::invalid(
            "tokenizer.tokens",
            format!("{} entries; at most {MAX_TOKENS}", entries.len()),
        ));
    }
    let mut out: Vec<TokenSpec> = Vec::with_capacity(entries.len());
    for (token, entry) in entries {
        let field = format!("tokenizer.tokens[{token:?}]");
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(RecipeError::invalid(
                field,
                format!("a token is 1 to {MAX_TOKEN_LEN} bytes"),
            ));
        }
        if out.iter().any(|t| t.token == token) {
            return Err(RecipeError::invalid(field, "given twice"));
        }
        let mut spec = TokenSpec {
            token: token.clone(),
            source: None,
            force: false,
        };
        let obj = match entry {
            Value::Null => None,
            Value::Object(o) => Some(o),
            _ => return Err(RecipeError::invalid(field, "expected a mapping")),
        };
        for (k, v) in obj.into_iter().flatten() {
            match k.as_str() {
                "token" => {}
                "force" => {
                    spec.force = v.as_bool().ok_or_else(|| {
                        RecipeError::invalid(format!("{field}.force"), "expected true or false")
                    })?
                }
                "source" => spec.source = embed_source(v, &format!("{field}.source"))?,
                other => {
                    return Err(RecipeError::invalid(
                        format!("{field}.{other}"),
                        "unsupported key (supported: source, force)",
                    ));
                }
            }
        }
        out.push(spec);
    }
    Ok(out)
}

fn embed_source(v: &Value, field: &str) -> Result<Option<EmbedSource>, RecipeError> {
    let model = |v: Option<&Value>, f: &str| -> Result<String, RecipeError> {
        v.and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.strip_prefix("model:").unwrap_or(s).to_string())
            .ok_or_else(|| RecipeError::invalid(f, "expected a model (a path, URL or hub id)"))
    };
    let obj = match v {
        Value::Null => return Ok(None),
        Value::String(_) => {
            return Ok(Some(EmbedSource::Model {
                model: model(Some(v), field)?,
            }));
        }
        Value::Object(o) => o,
        _ => {
            return Err(RecipeError::invalid(
                field,
                "expected a model, {kind: zero} or {kind: model_token, model, token | token_id}",
            ));
        }
    };
    let allowed: &[&str] = match obj.get("kind").and_then(Value::as_str) {
        Some("zero") => &["kind"],
        Some("model_token") => &["kind", "model", "token", "token_id"],
        _ => {
            return Err(RecipeError::invalid(
                format!("{field}.kind"),
                "expected `zero` or `model_token`",
            ));
        }
    };
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(RecipeError::invalid(
            format!("{field}.{k}"),
            format!("unsupported key (supported: {})", allowed.join(", ")),
        ));
    }
    if allowed.len() == 1 {
        return Ok(Some(EmbedSource::Zero));
    }
    let token_id = match obj.get("token_id") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            RecipeError::invalid(format!("{field}.token_id"), "expected a token id (≥ 0)")
        })?),
    };
    let token = match obj.get("token") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_str()
                .ok_or_else(|| RecipeError::invalid(format!("{field}.token"), "expected a string"))?
                .to_string(),
        ),
    };
    if token_id.is_some() == token.is_some() {
        return Err(RecipeError::invalid(
            field,
            "exactly one of token_id and token (as mergekit's model_token)",
        ));
    }
    Ok(Some(EmbedSource::ModelToken {
        model: model(obj.get("model"), &format!("{field}.model"))?,
        token_id,
        token,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_templates_and_refusals() {
        let chatml = chat_template("chatml").unwrap();
        assert!(
            chatml.starts_with("{% for message in messages %}"),
            "{chatml}"
        );
        for (name, text) in CHAT_TEMPLATES {
            assert!(text.contains('{'), "{name}");
            assert_eq!(chat_template(name).unwrap(), text);
        }
        let own = "{% for m in messages %}{{ m['content'] }}{% endfor %}";
        assert_eq!(chat_template(own).unwrap(), own);
        assert_eq!(chat_template("auto").unwrap(), AUTO);
        for bad in ["vicuna", "{{ x }}", "", "no braces in this long string"] {
            let e = chat_template(bad).unwrap_err();
            assert_eq!(e.field(), Some("chat_template"), "{bad}");
        }
        assert!(chat_template(&format!("{{{}", "x".repeat(MAX_CHAT_TEMPLATE))).is_err());
    }

    #[test]
    fn tokenizer_sections() {
        let spec = tokenizer_section(&serde_json::json!({
            "pad_to_multiple_of": 8,
            "tokens": [
                {"token": "<b>", "source": {"kind": "zero"}},
                {"token": "<a>", "source": "file:///m/ft/", "force": true},
                {"token": "<c>", "source": {"kind": "model_token", "model": "file:///m/b/", "token": "x"}},
            ],
        }))
        .unwrap();
        assert_eq!(spec.source, VocabSource::Union);
        assert_eq!(spec.pad_to_multiple_of, Some(8));
        let names: Vec<&str> = spec.tokens.iter().map(|t| t.token.as_str()).collect();
        assert_eq!(names, ["<b>", "<a>", "<c>"], "the order written");
        assert_eq!(spec.tokens[0].source, Some(EmbedSource::Zero));
        assert!(spec.tokens[1].force);
        let back: TokenizerSpec =
            serde_json::from_value(serde_json::to_value(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
        let base = tokenizer_section(&serde_json::json!({"source": "base"})).unwrap();
        assert_eq!(base.source, VocabSource::Base);
        for (bad, field) in [
            (serde_json::json!({"source": 3}), "tokenizer.source"),
            (
                serde_json::json!({"pad_to_multiple_of": 0}),
                "tokenizer.pad_to_multiple_of",
            ),
            (serde_json::json!({"x": 1}), "tokenizer.x"),
            (
                serde_json::json!({"tokens": {"<a>": {"source": {"kind": "model_token", "model": "m"}}}}),
                "tokenizer.tokens[\"<a>\"].source",
            ),
            (
                serde_json::json!({"tokens": {"<a>": {"source": {"kind": "one"}}}}),
                "tokenizer.tokens[\"<a>\"].source.kind",
            ),
            (
                serde_json::json!({"tokens": {"<a>": {"weight": 1}}}),
                "tokenizer.tokens[\"<a>\"].weight",
            ),
            (
                serde_json::json!({"tokens": [{"source": "m"}]}),
                "tokenizer.tokens[0].token",
            ),
        ] {
            let e = tokenizer_section(&bad).unwrap_err();
            assert_eq!(e.field(), Some(field), "{bad}");
        }
    }
}

//! The tokenizer options of a mergekit YAML recipe (see [`super::yaml`]): `tokenizer_source:
//! union` and the `tokenizer` section become the request's `tokenizer` object, its model
//! references resolved as every model's, its `tokens` a list in the order written (new tokens
//! get their ids in that order, and a JSON object keeps none).

use std::path::Path;

use serde_json::{Map, Value};

use super::RecipeError;
use super::yaml::{invalid, model_ref, object};

/// Replaces a mapping `tokenizer.tokens` of `doc` (parsed from `text`) by the list of its
/// entries, each with its `token`, in document order.
pub(super) fn order_tokens(text: &str, doc: &mut Value) -> Result<(), RecipeError> {
    let Some(Value::Object(tokens)) = doc.pointer("/tokenizer/tokens").cloned() else {
        return Ok(());
    };
    let order = serde_saphyr::from_str::<TokenOrder>(text)
        .map_err(|e| RecipeError::Syntax(format!("invalid YAML recipe: {e}")))?;
    let keys = order.tokenizer.map(|t| t.tokens.0).unwrap_or_default();
    let list: Vec<Value> = keys
        .into_iter()
        .filter_map(|k| {
            let mut entry = match tokens.get(&k)? {
                Value::Object(o) => o.clone(),
                _ => Map::new(),
            };
            entry.insert("token".into(), Value::String(k));
            Some(Value::Object(entry))
        })
        .collect();
    if let Some(slot) = doc.pointer_mut("/tokenizer/tokens") {
        *slot = Value::Array(list);
    }
    Ok(())
}

/// The request's `tokenizer` (mergekit refuses `tokenizer_source` with a `tokenizer` section).
pub(super) fn set_tokenizer(
    req: &mut Map<String, Value>,
    v: Value,
    field: &str,
) -> Result<(), RecipeError> {
    if req.contains_key("tokenizer") || req.contains_key("tokenizer_source") {
        return Err(invalid(
            field,
            "give tokenizer_source or a tokenizer section, not both (as mergekit)",
        ));
    }
    req.insert("tokenizer".into(), v);
    Ok(())
}

/// mergekit's `tokenizer` section with its model references resolved (`source`, and each
/// token's `source` model); `tokens` is a list in the order written ([`parse`]).
pub(super) fn section(v: &Value, base_dir: Option<&Path>) -> Result<Value, RecipeError> {
    let mut section = object(v, "tokenizer")?.clone();
    if let Some(Value::String(s)) = section.get("source")
        && s != "union"
        && s != "base"
    {
        let model = Value::String(s.strip_prefix("model:").unwrap_or(s).to_string());
        let url = model_ref(&model, "tokenizer.source", base_dir)?;
        section.insert("source".into(), Value::String(url));
    }
    if let Some(Value::Array(tokens)) = section.get_mut("tokens") {
        for entry in tokens.iter_mut() {
            let name = entry
                .get("token")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let field = format!("tokenizer.tokens[{name:?}].source");
            let Some(source) = entry.get_mut("source") else {
                continue;
            };
            match source {
                Value::String(s) => {
                    let model = Value::String(s.strip_prefix("model:").unwrap_or(s).to_string());
                    *source = Value::String(model_ref(&model, &field, base_dir)?);
                }
                Value::Object(o) => {
                    if let Some(m) = o.get("model").filter(|m| m.is_string()) {
                        let url = model_ref(m, &format!("{field}.model"), base_dir)?;
                        o.insert("model".into(), Value::String(url));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(Value::Object(section))
}

/// The keys of `tokenizer.tokens`, in document order (everything else ignored).
#[derive(serde::Deserialize)]
struct TokenOrder {
    #[serde(default)]
    tokenizer: Option<TokenOrderSection>,
}

#[derive(serde::Deserialize)]
struct TokenOrderSection {
    #[serde(default)]
    tokens: KeysInOrder,
}

#[derive(Default)]
struct KeysInOrder(Vec<String>);

impl<'de> serde::Deserialize<'de> for KeysInOrder {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = KeysInOrder;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a mapping of tokens")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<KeysInOrder, A::Error> {
                let mut keys = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    keys.push(k);
                }
                Ok(KeysInOrder(keys))
            }
        }
        d.deserialize_map(Keys)
    }
}

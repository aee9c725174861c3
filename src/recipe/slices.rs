//! `slices`: the output's layer stack as mergekit 0.1.5 defines it. Each output slice lists
//! its `sources` (a model and a `layer_range` each, all of the same length) and may give its
//! own `base_model` and `parameters`. With `passthrough` a slice has one source, copied; with
//! every other method the slice's sources are merged layer by layer by the method, as if they
//! were the recipe's models: layer `a + k` of every source makes output layer `offset + k`.
//!
//! Parameters are looked up as mergekit's `ConfigReader` does: a per-model parameter from the
//! source's own `parameters`, else the slice's, else the recipe's; any other parameter from the
//! slice's, else the recipe's. A filter list that matches nothing falls through to the next
//! level (the levels are chained into one list here, first match winning). Gradients run over
//! the slice's layers: output layer `k` of an `n`-layer slice is at `t = k / (n − 1)` (1 when
//! `n = 1`), the tensors outside the layers at 0.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::validate::ingredients;
use super::{
    BaseRule, MAX_SLICE_LAYERS, MergeRequest, Method, ModelSpec, RecipeError, Slice, SliceSource,
    SliceSpec,
};
use crate::methods::{ParseInput, Setting};

/// The models of a slice recipe, in the engine's input order after the base (unique, in order
/// of appearance, the base model left out), and the validated slices.
pub(super) struct Stack {
    pub uris: Vec<String>,
    pub slices: Vec<Slice>,
}

fn same_uri(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// Checks a source's URL and layer range; counts the layers into `total`.
fn check_source(
    field: &str,
    uri: &str,
    range: [u64; 2],
    total: &mut u64,
) -> Result<(), RecipeError> {
    if uri.trim().is_empty() {
        return Err(RecipeError::invalid(
            format!("{field}.uri"),
            "must not be empty",
        ));
    }
    let [a, b] = range;
    if a >= b || b - a > MAX_SLICE_LAYERS {
        return Err(RecipeError::invalid(
            format!("{field}.layer_range"),
            format!("[{a}, {b}] is not a non-empty range [first, end) of layers"),
        ));
    }
    *total += b - a;
    if *total > MAX_SLICE_LAYERS {
        return Err(RecipeError::invalid(
            "slices",
            format!("more than {MAX_SLICE_LAYERS} layers in all"),
        ));
    }
    Ok(())
}

/// Passthrough's slices: one source each, only `scale` (per source, or per slice for all its
/// sources); `models` gets the sources' URLs (unique, in order) and a source's `model` indexes it.
pub(super) fn take_passthrough(req: &mut MergeRequest) -> Result<Vec<Slice>, RecipeError> {
    if !req.models.is_empty() {
        return Err(RecipeError::invalid(
            "models",
            "give either models or slices, not both",
        ));
    }
    let specs = std::mem::take(&mut req.slices);
    let mut total = 0u64;
    let mut slices = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        if spec.sources.len() != 1 {
            return Err(RecipeError::invalid(
                format!("slices[{i}].sources"),
                "passthrough takes exactly one source per slice",
            ));
        }
        if spec.base_model.is_some() {
            return Err(RecipeError::invalid(
                format!("slices[{i}].base_model"),
                "method passthrough takes no base model",
            ));
        }
        if let Some(key) = spec.parameters.keys().find(|k| k.as_str() != "scale") {
            return Err(RecipeError::invalid(
                format!("slices[{i}].parameters.{key}"),
                "unknown parameter (known: scale)",
            ));
        }
        let mut sources = Vec::new();
        for (j, src) in spec.sources.iter().enumerate() {
            let field = format!("slices[{i}].sources[{j}]");
            check_source(&field, &src.uri, src.layer_range, &mut total)?;
            let mut parameters = BTreeMap::new();
            for key in src.parameters.keys() {
                if key != "scale" {
                    return Err(RecipeError::invalid(
                        format!("{field}.parameters.{key}"),
                        "unknown parameter (known: scale)",
                    ));
                }
            }
            for (key, value) in chained(&src.parameters, &spec.parameters, &Map::new()) {
                let pf = format!("{field}.parameters.{key}");
                parameters.insert(
                    key.clone(),
                    Setting::from_json(&value).map_err(|e| RecipeError::invalid(&pf, e))?,
                );
            }
            let model = match req.models.iter().position(|m| same_uri(&m.uri, &src.uri)) {
                Some(k) => k,
                None => {
                    req.models.push(ModelSpec::uri(src.uri.clone()));
                    req.models.len() - 1
                }
            };
            sources.push(SliceSource {
                model,
                layer_range: src.layer_range,
                parameters,
                weight: None,
            });
        }
        slices.push(Slice {
            sources,
            base: None,
            parameters: None,
        });
    }
    Ok(slices)
}

/// `first`, falling through to `then` where it gives no value: a number or gradient always
/// gives one; a filter list is followed by `then`'s rules. Anything else (a flag, a string)
/// is `first` as it is.
fn chain(first: &Value, then: &Value) -> Value {
    fn rules(v: &Value) -> Option<Vec<Value>> {
        match v {
            Value::Number(_) => Some(vec![serde_json::json!({ "value": v })]),
            Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_number) => {
                Some(vec![serde_json::json!({ "value": v })])
            }
            Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_object) => {
                Some(items.clone())
            }
            _ => None,
        }
    }
    let always = match first {
        Value::Number(_) => true,
        Value::Array(items) => items.iter().all(Value::is_number),
        _ => true,
    };
    if always {
        return first.clone();
    }
    match (rules(first), rules(then)) {
        (Some(mut a), Some(b)) => {
            a.extend(b);
            Value::Array(a)
        }
        _ => first.clone(),
    }
}

/// The keys of `own`, each chained over the same key of `slice`, then of `global`.
fn chained(
    own: &Map<String, Value>,
    slice: &Map<String, Value>,
    global: &Map<String, Value>,
) -> Map<String, Value> {
    own.iter()
        .map(|(k, v)| {
            let mut v = v.clone();
            for next in [slice.get(k), global.get(k)].into_iter().flatten() {
                v = chain(&v, next);
            }
            (k.clone(), v)
        })
        .collect()
}

/// The slices of any other method: each slice validated as a recipe of its own (its sources
/// as the models, its base, its parameters chained over the recipe's), so that the method's
/// own rules and messages apply per slice. `base_model` is the recipe's (already checked
/// against the method's rule).
pub(super) fn take_merged(
    req: &mut MergeRequest,
    method: Method,
    base_model: Option<&str>,
) -> Result<Stack, RecipeError> {
    if !req.models.is_empty() {
        return Err(RecipeError::invalid(
            "models",
            "give either models or slices, not both",
        ));
    }
    let specs: Vec<SliceSpec> = std::mem::take(&mut req.slices);
    let has_base = base_model.is_some();
    let mut uris: Vec<String> = Vec::new();
    let mut total = 0u64;
    let mut slices = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let sf = format!("slices[{i}]");
        if spec.sources.is_empty() {
            return Err(RecipeError::invalid(
                format!("{sf}.sources"),
                "at least one source is required",
            ));
        }
        let len = |j: usize| {
            spec.sources[j].layer_range[1].saturating_sub(spec.sources[j].layer_range[0])
        };
        for (j, src) in spec.sources.iter().enumerate() {
            let mut counted = 0;
            check_source(
                &format!("{sf}.sources[{j}]"),
                &src.uri,
                src.layer_range,
                &mut counted,
            )?;
            if len(j) != len(0) {
                return Err(RecipeError::invalid(
                    format!("{sf}.sources[{j}].layer_range"),
                    format!(
                        "{} layers, but sources[0] has {}: all sources of a slice need the same \
                         number of layers",
                        len(j),
                        len(0)
                    ),
                ));
            }
        }
        total += len(0);
        if total > MAX_SLICE_LAYERS {
            return Err(RecipeError::invalid(
                "slices",
                format!("more than {MAX_SLICE_LAYERS} layers in all"),
            ));
        }
        // The slice's base: its own, else the recipe's; it must be one of its sources (the
        // method reads the base's layers from it), unless the method can do without one.
        let (base_field, base_uri) = match &spec.base_model {
            Some(b) if b.trim().is_empty() => {
                return Err(RecipeError::invalid(
                    format!("{sf}.base_model"),
                    "must not be empty",
                ));
            }
            Some(b) => (format!("{sf}.base_model"), Some(b.as_str())),
            None => ("base_model".to_string(), base_model),
        };
        if spec.base_model.is_some() && method.base_rule() == BaseRule::Forbidden {
            return Err(RecipeError::invalid(
                base_field,
                format!("method {} takes no base model", method.name()),
            ));
        }
        let base = base_uri.and_then(|b| spec.sources.iter().position(|s| same_uri(&s.uri, b)));
        if base_uri.is_some()
            && base.is_none()
            && (spec.base_model.is_some() || method.base_rule() == BaseRule::Required)
        {
            return Err(RecipeError::invalid(
                base_field,
                format!(
                    "{:?} is not one of {sf}'s sources: list it there with its layer_range (the \
                     base's layers come from it)",
                    base_uri.unwrap_or_default()
                ),
            ));
        }
        if base.is_none() && method.base_rule() == BaseRule::Required {
            return Err(RecipeError::invalid(
                "base_model",
                format!(
                    "method {} needs a base model (for every slice)",
                    method.name()
                ),
            ));
        }
        // The slice as a recipe: its sources as models (the base among them), parameters
        // chained source → slice → recipe.
        let models: Vec<ModelSpec> = spec
            .sources
            .iter()
            .map(|src| ModelSpec {
                parameters: chained(&src.parameters, &spec.parameters, &req.parameters),
                ..ModelSpec::uri(src.uri.clone())
            })
            .collect();
        let mut parameters = chained(&spec.parameters, &req.parameters, &Map::new());
        for (k, v) in &req.parameters {
            parameters.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let slice_base = base.map(|j| spec.sources[j].uri.as_str());
        let rename = |e: RecipeError| match e {
            RecipeError::Invalid { field, message } => {
                let field = match field.strip_prefix("models[") {
                    Some(rest) => format!("{sf}.sources[{rest}"),
                    None if field == "models" => format!("{sf}.sources"),
                    None => field,
                };
                RecipeError::invalid(field, format!("{message} (in {sf})"))
            }
            other => other,
        };
        let (_, _, mut entries) =
            ingredients(&models, &parameters, method, slice_base).map_err(rename)?;
        let params = method
            .parse_parameters(&mut ParseInput {
                params: &parameters,
                models: &mut entries,
                has_base: slice_base.is_some(),
                has_slices: false,
            })
            .map_err(|e| rename(e.into()))?;
        let mut sources = Vec::with_capacity(spec.sources.len());
        for (j, src) in spec.sources.iter().enumerate() {
            // Input index: the recipe's base is input 0; the others follow in order.
            let model = match base_model {
                Some(b) if same_uri(b, &src.uri) => 0,
                _ => {
                    let k = match uris.iter().position(|u| same_uri(u, &src.uri)) {
                        Some(k) => k,
                        None => {
                            uris.push(src.uri.clone());
                            uris.len() - 1
                        }
                    };
                    k + usize::from(has_base)
                }
            };
            let entry = entries.iter().find(|e| e.index == j);
            sources.push(SliceSource {
                model,
                layer_range: src.layer_range,
                parameters: entry.map(|e| e.parameters.clone()).unwrap_or_default(),
                weight: entry.map(|e| e.weight),
            });
        }
        slices.push(Slice {
            sources,
            base,
            parameters: Some(params),
        });
    }
    Ok(Stack { uris, slices })
}

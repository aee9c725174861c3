//! A parsed request → a validated [`Recipe`]: [`Recipe::from_request`] and its steps. The
//! method-specific part (parameters, weights) is the method's own ([`crate::methods`]).

use std::collections::BTreeMap;

use super::output::{check_apart, float_dtype, parse_output};
use super::{
    Ingredient, MAX_ATTEMPTS_LIMIT, MAX_MODELS, MAX_SLICE_LAYERS, MergeRequest, ModelSpec, Recipe,
    RecipeError, Slice, SliceSource, Submission, trajectory,
};
use crate::methods::{BaseRule, Method, ModelEntry, ParseInput, Setting};

impl Recipe {
    /// Parse and validate a JSON body.
    pub fn parse_json(body: &[u8]) -> Result<Submission, RecipeError> {
        Self::from_request(MergeRequest::from_json(body)?)
    }

    /// Parse and validate a mergekit YAML recipe (see [`MergeRequest::from_yaml`]); the CLI
    /// gives the output's URL (`--out`) as `output_uri`.
    pub fn parse_yaml(
        text: &str,
        base_dir: Option<&std::path::Path>,
        output_uri: Option<&str>,
    ) -> Result<Submission, RecipeError> {
        let mut req = MergeRequest::from_yaml(text, base_dir)?;
        if let Some(uri) = output_uri {
            req.output.uri = uri.to_string();
        }
        Self::from_request(req)
    }

    /// Validate and normalize a parsed request for one merge. A search (`greedy_soup`, a
    /// `sweep`, an `evaluator`) is the search layer's: `search::spec::from_request` takes its
    /// fields off and validates the merges with this; here they are refused.
    pub fn from_request(mut req: MergeRequest) -> Result<Submission, RecipeError> {
        check_no_search(&req)?;
        let mergekit_config = super::mergekit_config::text(&req);
        let trajectory = trajectory::take_expanded(&mut req)?;
        let slices = take_slices(&mut req)?;
        let method = method(&req)?;
        check_model_count(&req)?;
        let base_model = base_model(&req, method)?;
        let (uris, loras, mut entries) = ingredients(&req, method, base_model.as_deref())?;
        let parameters = method.parse_parameters(&mut ParseInput {
            params: &req.parameters,
            models: &mut entries,
            has_base: base_model.is_some(),
            has_slices: !slices.is_empty(),
        })?;
        let models: Vec<Ingredient> = uris
            .into_iter()
            .zip(loras)
            .zip(entries)
            .map(|((uri, lora), m)| Ingredient {
                uri,
                lora,
                weight: m.weight,
                parameters: m.parameters,
            })
            .collect();
        let output = parse_output(&req.output)?;
        check_apart(&output.uri, input_fields(base_model.as_deref(), &models))?;
        check_scheduling(&req)?;
        let input_dtype = req
            .input_dtype
            .as_deref()
            .map(|s| float_dtype(s, "input_dtype"))
            .transpose()?;
        Ok(Submission {
            recipe: Recipe {
                method,
                models,
                base_model,
                slices,
                parameters,
                output,
                trajectory,
                input_dtype,
                mergekit_config,
            },
            idempotency_key: req.idempotency_key,
            priority: req.priority.unwrap_or(0),
            max_attempts: req.max_attempts,
        })
    }
}

/// The search fields, which only the search layer takes (it removes them before validating
/// the recipe).
fn check_no_search(req: &MergeRequest) -> Result<(), RecipeError> {
    let field = if req.sweep.is_some() {
        Some("sweep".to_string())
    } else if req.evaluator.is_some() {
        Some("evaluator".to_string())
    } else if req.accept.is_some() {
        Some("accept".to_string())
    } else {
        req.models
            .iter()
            .position(|m| m.score.is_some())
            .map(|i| format!("models[{i}].score"))
    };
    match field {
        Some(f) => Err(RecipeError::invalid(
            f,
            "belongs to a search (greedy_soup, sweep), validated by search::spec::from_request",
        )),
        None => Ok(()),
    }
}

/// The inputs of a recipe with their field names: the base model, then every model (and its
/// adapter).
fn input_fields<'a>(
    base_model: Option<&'a str>,
    models: &'a [Ingredient],
) -> impl Iterator<Item = (String, &'a str)> {
    base_model
        .map(|b| ("base_model".to_string(), b))
        .into_iter()
        .chain(models.iter().enumerate().flat_map(|(i, m)| {
            std::iter::once((format!("models[{i}].uri"), m.uri.as_str()))
                .chain(m.lora.as_deref().map(|l| (format!("models[{i}].lora"), l)))
        }))
}

/// The registered method the request names.
fn method(req: &MergeRequest) -> Result<Method, RecipeError> {
    Method::parse(&req.method).ok_or_else(|| {
        RecipeError::invalid(
            "method",
            format!(
                "unknown merge method {:?} (supported: {})",
                req.method,
                Method::names()
            ),
        )
    })
}

fn check_model_count(req: &MergeRequest) -> Result<(), RecipeError> {
    if req.models.is_empty() {
        return Err(RecipeError::invalid(
            "models",
            "at least one model is required",
        ));
    }
    if req.models.len() > MAX_MODELS {
        return Err(RecipeError::invalid(
            "models",
            format!(
                "{} models given; at most {MAX_MODELS} are allowed",
                req.models.len()
            ),
        ));
    }
    Ok(())
}

/// `base_model` as the method's rule wants it.
fn base_model(req: &MergeRequest, method: Method) -> Result<Option<String>, RecipeError> {
    match (&req.base_model, method.base_rule()) {
        (None, BaseRule::Required) => Err(RecipeError::invalid(
            "base_model",
            format!("method {} needs a base model", method.name()),
        )),
        (Some(_), BaseRule::Forbidden) => Err(RecipeError::invalid(
            "base_model",
            format!(
                "method {} takes no base model (list it in models instead)",
                method.name()
            ),
        )),
        (Some(b), _) if b.trim().is_empty() => {
            Err(RecipeError::invalid("base_model", "must not be empty"))
        }
        (b, _) => Ok(b.clone()),
    }
}

/// The models besides the base (a model naming the base is the base: mergekit lists it in
/// both places for slerp), each with its URL and its weight and per-model settings parsed; the
/// method's parser checks and completes them.
fn ingredients(
    req: &MergeRequest,
    method: Method,
    base_model: Option<&str>,
) -> Result<IngredientParts, RecipeError> {
    let is_base = |uri: &str| {
        base_model.is_some_and(|b| b.trim_end_matches('/') == uri.trim_end_matches('/'))
    };
    // A model with an adapter folded in is not the base, even at the base's URL.
    let specs: Vec<(usize, &ModelSpec)> = req
        .models
        .iter()
        .enumerate()
        .filter(|(_, m)| m.lora.is_some() || !is_base(&m.uri))
        .collect();
    if specs.is_empty() {
        return Err(RecipeError::invalid(
            "models",
            "at least one model besides base_model is required",
        ));
    }
    let gives_weight = |m: &ModelSpec| m.weight.is_some() || m.parameters.contains_key("weight");
    let any_weight = specs.iter().any(|(_, m)| gives_weight(m));
    let default_weight = req.parameters.contains_key("weight");
    let mut uris = Vec::with_capacity(specs.len());
    let mut loras = Vec::with_capacity(specs.len());
    let mut entries = Vec::with_capacity(specs.len());
    for &(i, m) in &specs {
        if m.uri.trim().is_empty() {
            return Err(RecipeError::invalid(
                format!("models[{i}].uri"),
                "must not be empty",
            ));
        }
        if m.lora.as_deref().is_some_and(|l| l.trim().is_empty()) {
            return Err(RecipeError::invalid(
                format!("models[{i}].lora"),
                "must not be empty (a PEFT LoRA adapter folder)",
            ));
        }
        if m.weight.is_some() && m.parameters.contains_key("weight") {
            return Err(RecipeError::invalid(
                format!("models[{i}].parameters.weight"),
                "give the weight once (models[].weight or models[].parameters.weight)",
            ));
        }
        let mut parameters = BTreeMap::new();
        for (key, value) in &m.parameters {
            let setting = Setting::from_json(value)
                .map_err(|e| RecipeError::invalid(format!("models[{i}].parameters.{key}"), e))?;
            if key == "weight" && setting.as_scalar().is_some() {
                continue; // carried in `weight`
            }
            parameters.insert(key.clone(), setting);
        }
        let scalar_weight = m.weight.or_else(|| {
            m.parameters
                .get("weight")
                .and_then(|w| w.as_f64().filter(|_| w.is_number()))
        });
        let weight = match scalar_weight {
            // The kernels compute in f32: a weight beyond its range would become infinite.
            Some(w) if !w.is_finite() || w.abs() > f64::from(f32::MAX) => {
                return Err(RecipeError::invalid(
                    format!("models[{i}].weight"),
                    "must be a finite number within the range of f32 (|w| ≤ 3.4e38)",
                ));
            }
            Some(w) => w,
            None if gives_weight(m) => 1.0, // a gradient or filter list in `parameters`
            None if any_weight && !default_weight => {
                return Err(RecipeError::invalid(
                    format!("models[{i}].weight"),
                    "give a weight for every model, or for none (a uniform soup)",
                ));
            }
            None if method.about().weights_required && !default_weight => {
                return Err(RecipeError::invalid(
                    format!("models[{i}].weight"),
                    format!("method {} needs a weight for every model", method.name()),
                ));
            }
            None => 1.0,
        };
        uris.push(m.uri.clone());
        loras.push(m.lora.clone());
        entries.push(ModelEntry {
            index: i,
            weight,
            weight_given: gives_weight(m),
            parameters,
        });
    }
    Ok((uris, loras, entries))
}

/// Per ingredient: its URL, its adapter's URL, its parsed entry.
type IngredientParts = (Vec<String>, Vec<Option<String>>, Vec<ModelEntry>);

/// `idempotency_key`, `max_attempts` and `priority` within their bounds.
fn check_scheduling(req: &MergeRequest) -> Result<(), RecipeError> {
    if let Some(key) = &req.idempotency_key
        && (key.is_empty() || key.len() > 256)
    {
        return Err(RecipeError::invalid(
            "idempotency_key",
            "must be 1 to 256 characters",
        ));
    }
    if let Some(n) = req.max_attempts
        && !(1..=MAX_ATTEMPTS_LIMIT).contains(&n)
    {
        return Err(RecipeError::invalid(
            "max_attempts",
            format!("must be between 1 and {MAX_ATTEMPTS_LIMIT}"),
        ));
    }
    if !(-1000..=1000).contains(&req.priority.unwrap_or(0)) {
        return Err(RecipeError::invalid(
            "priority",
            "must be between -1000 and 1000",
        ));
    }
    Ok(())
}

/// `slices` → the models they name (unique, in order of appearance) and validated slices.
fn take_slices(req: &mut MergeRequest) -> Result<Vec<Slice>, RecipeError> {
    if req.slices.is_empty() {
        return Ok(Vec::new());
    }
    if !Method::parse(&req.method).is_some_and(|m| m.about().slices) {
        let stacking: Vec<&str> = Method::all()
            .filter(|m| m.about().slices)
            .map(Method::name)
            .collect();
        return Err(RecipeError::invalid(
            "slices",
            format!(
                "slices are supported with method {} only, not {:?}",
                stacking.join(", "),
                req.method
            ),
        ));
    }
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
        let mut sources = Vec::new();
        for (j, src) in spec.sources.iter().enumerate() {
            let field = format!("slices[{i}].sources[{j}]");
            if src.uri.trim().is_empty() {
                return Err(RecipeError::invalid(
                    format!("{field}.uri"),
                    "must not be empty",
                ));
            }
            let [a, b] = src.layer_range;
            if a >= b || b - a > MAX_SLICE_LAYERS {
                return Err(RecipeError::invalid(
                    format!("{field}.layer_range"),
                    format!("[{a}, {b}] is not a non-empty range [first, end) of layers"),
                ));
            }
            total += b - a;
            if total > MAX_SLICE_LAYERS {
                return Err(RecipeError::invalid(
                    "slices",
                    format!("more than {MAX_SLICE_LAYERS} layers in all"),
                ));
            }
            let mut parameters = BTreeMap::new();
            for (key, value) in &src.parameters {
                let pf = format!("{field}.parameters.{key}");
                if key != "scale" {
                    return Err(RecipeError::invalid(pf, "unknown parameter (known: scale)"));
                }
                parameters.insert(
                    key.clone(),
                    Setting::from_json(value).map_err(|e| RecipeError::invalid(&pf, e))?,
                );
            }
            let model = match req
                .models
                .iter()
                .position(|m| m.uri.trim_end_matches('/') == src.uri.trim_end_matches('/'))
            {
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
            });
        }
        slices.push(Slice { sources });
    }
    Ok(slices)
}

//! A parsed request → a validated [`Recipe`]: [`Recipe::from_request`] and its steps. The
//! method-specific part (parameters, weights) is the method's own ([`crate::methods`]).

use std::collections::BTreeMap;

use super::output::{check_apart, float_dtype, parse_output};
use super::{
    Ingredient, MAX_ATTEMPTS_LIMIT, MAX_MODELS, MergeRequest, ModelSpec, Recipe, RecipeError,
    Slice, Submission, slices, trajectory,
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
        let trajectory = trajectory::take_expanded(&mut req)?;
        let method = method(&req)?;
        if !req.slices.is_empty() && !method.about().slices {
            return Self::from_stack(req, method, trajectory);
        }
        let slices = if req.slices.is_empty() {
            Vec::new()
        } else {
            slices::take_passthrough(&mut req)?
        };
        check_model_count(&req)?;
        let base_model = base_model(&req, method)?;
        let (uris, loras, mut entries) =
            ingredients(&req.models, &req.parameters, method, base_model.as_deref())?;
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
        Self::finish(
            req, method, models, base_model, slices, parameters, trajectory,
        )
    }

    /// `slices` with a method that merges them (any but passthrough): every slice is
    /// validated as a recipe of its own ([`slices::take_merged`]); the recipe's models are
    /// the sources' (each opened once), its parameters the first slice's.
    fn from_stack(
        mut req: MergeRequest,
        method: Method,
        trajectory: Option<trajectory::Trajectory>,
    ) -> Result<Submission, RecipeError> {
        if trajectory.is_some() {
            return Err(RecipeError::invalid(
                "trajectory",
                "give either a trajectory or slices, not both",
            ));
        }
        let base_model = base_model(&req, method)?;
        let stack = slices::take_merged(&mut req, method, base_model.as_deref())?;
        if stack.uris.len() > MAX_MODELS {
            return Err(RecipeError::invalid(
                "slices",
                format!(
                    "{} models named; at most {MAX_MODELS} are allowed",
                    stack.uris.len()
                ),
            ));
        }
        let parameters = stack
            .slices
            .first()
            .and_then(|s| s.parameters.clone())
            .ok_or_else(|| RecipeError::invalid("slices", "at least one slice is required"))?;
        let models = stack
            .uris
            .into_iter()
            .map(|uri| Ingredient {
                uri,
                lora: None,
                weight: 1.0,
                parameters: BTreeMap::new(),
            })
            .collect();
        Self::finish(
            req,
            method,
            models,
            base_model,
            stack.slices,
            parameters,
            None,
        )
    }

    /// The steps every recipe ends with: output, inputs apart from it, scheduling, cast.
    fn finish(
        req: MergeRequest,
        method: Method,
        models: Vec<Ingredient>,
        base_model: Option<String>,
        slices: Vec<Slice>,
        parameters: crate::methods::Parameters,
        trajectory: Option<trajectory::Trajectory>,
    ) -> Result<Submission, RecipeError> {
        let mergekit_config = super::mergekit_config::text(&req);
        let mut output = parse_output(&req.output)?;
        check_apart(&output.uri, input_fields(base_model.as_deref(), &models))?;
        tokenizer_options(&req, method, &mut output)?;
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

/// `tokenizer_source` (`base`, `union`, or a model: not empty, apart from the output), the
/// `tokenizer` section (its shape, [`super::tokenizer::tokenizer_section`]) and
/// `chat_template` (its text, or `auto`), for the methods that write a model folder (not the
/// LoRA ones: an adapter has no tokenizer).
///
/// Each is kept as written: `tokenizer_source` as `output.tokenizer_source` (`base`, or the
/// model), except `union`, which is the section's `source: union` with nothing else (as
/// mergekit plans it, and as a YAML recipe's is read); the section as `output.tokenizer`.
/// Both build the soup's tokenizer ([`super::tokenizer::TokenizerBuild`]); mergekit refuses
/// `tokenizer_source` and `tokenizer` together.
fn tokenizer_options(
    req: &MergeRequest,
    method: Method,
    output: &mut super::Output,
) -> Result<(), RecipeError> {
    use super::tokenizer::{BASE, TokenizerSpec, UNION, VocabSource};
    let adapter = matches!(method.name(), "lora" | "lora_extract");
    for (field, given) in [
        ("tokenizer_source", req.tokenizer_source.is_some()),
        ("tokenizer", req.tokenizer.is_some()),
        ("chat_template", req.chat_template.is_some()),
    ] {
        if adapter && given {
            return Err(RecipeError::invalid(
                field,
                format!(
                    "method {} writes a LoRA adapter, which has no tokenizer",
                    method.name()
                ),
            ));
        }
    }
    if let Some(section) = &req.tokenizer {
        if req.tokenizer_source.is_some() {
            return Err(RecipeError::invalid(
                "tokenizer",
                "give tokenizer_source or a tokenizer section, not both (as mergekit)",
            ));
        }
        let mut spec = super::tokenizer::tokenizer_section(section)?;
        let named: Vec<(String, &str)> = spec
            .uris_mut()
            .map(|u| ("tokenizer".to_string(), u.as_str()))
            .collect();
        check_apart(&output.uri, named)?;
        output.tokenizer = Some(spec);
    }
    match req.tokenizer_source.as_deref() {
        None => {}
        Some(UNION) => {
            output.tokenizer = Some(TokenizerSpec {
                source: VocabSource::Union,
                tokens: Vec::new(),
                pad_to_multiple_of: None,
            })
        }
        Some(BASE) => output.tokenizer_source = Some(BASE.to_string()),
        Some(source) if source.trim().is_empty() => {
            return Err(RecipeError::invalid(
                "tokenizer_source",
                "must not be empty (`base`, `union`, or a model's URL or hub id)",
            ));
        }
        Some(source) => {
            check_apart(&output.uri, [("tokenizer_source".to_string(), source)])?;
            output.tokenizer_source = Some(source.to_string());
        }
    }
    output.chat_template = req
        .chat_template
        .as_deref()
        .map(super::tokenizer::chat_template)
        .transpose()?;
    if output.chat_template.is_some()
        && !output.copy_tokenizer
        && output.tokenizer_source.is_none()
        && output.tokenizer.is_none()
    {
        return Err(RecipeError::invalid(
            "chat_template",
            "no tokenizer is written to hold it (output.copy_tokenizer is false, \
             --no-copy-tokenizer, and no tokenizer_source)",
        ));
    }
    Ok(())
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
pub(super) fn ingredients(
    models: &[ModelSpec],
    global: &serde_json::Map<String, serde_json::Value>,
    method: Method,
    base_model: Option<&str>,
) -> Result<IngredientParts, RecipeError> {
    let is_base = |uri: &str| {
        base_model.is_some_and(|b| b.trim_end_matches('/') == uri.trim_end_matches('/'))
    };
    // A model with an adapter folded in is not the base, even at the base's URL.
    let specs: Vec<(usize, &ModelSpec)> = models
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
    let default_weight = global.contains_key("weight");
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

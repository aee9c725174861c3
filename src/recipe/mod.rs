//! The merge request: parse, validate, and normalize into a [`Recipe`].
//!
//! Knows nothing of HTTP or the database. Unknown fields are rejected everywhere (never
//! silently ignored), and every error names the field it is about.

pub mod setting;
pub mod trajectory;
pub mod yaml;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use setting::{FilterRule, Setting, Value, depth, layer_index};

use crate::error::ErrorCode;
use crate::merge::DType;

/// Most ingredients a recipe may name.
pub const MAX_MODELS: usize = 128;
/// Default output shard size (HF's default is 5 GB; we pick a friendlier 5 GB too).
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;
/// Smallest accepted shard size (below it, file counts explode).
pub const MIN_SHARD_SIZE: u64 = 1024;
pub const MAX_ATTEMPTS_LIMIT: i32 = 20;

/// A request body as sent to `POST /v1/merges` (and the one-shot CLI).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "method": "linear",
    "models": [{"uri": "file:///data/ft-a/"}, {"uri": "s3://bucket/ft-b/", "weight": 2.0}],
    "parameters": {"normalize": true},
    "output": {"uri": "file:///data/soups/run-1/", "dtype": "bfloat16", "max_shard_size": "2GB"},
    "idempotency_key": "run-1"
}))]
pub struct MergeRequest {
    /// The merge method (`linear`, `task_arithmetic`, `ties`, …, `greedy_soup`; see the README).
    #[schema(example = "linear")]
    pub method: String,
    #[serde(default)]
    pub models: Vec<ModelSpec>,
    /// Layer ranges from several models, stacked (method `passthrough`).
    #[serde(default)]
    pub slices: Vec<SliceSpec>,
    /// A training run's folder and a selection of its checkpoints, instead of `models`.
    #[serde(default)]
    pub trajectory: Option<trajectory::TrajectorySpec>,
    /// What [`trajectory::expand`] listed and picked (never read from a request body).
    #[serde(skip)]
    pub expanded_trajectory: Option<trajectory::Trajectory>,
    /// The pre-trained model the task vectors are taken against (`t = 0` end for slerp).
    #[serde(default)]
    pub base_model: Option<String>,
    #[serde(default)]
    pub parameters: serde_json::Map<String, serde_json::Value>,
    pub output: OutputSpec,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub priority: Option<i32>,
    #[serde(default)]
    pub max_attempts: Option<i32>,
    /// Scores candidates (method `greedy_soup`).
    #[serde(default)]
    pub evaluator: Option<crate::search::spec::EvaluatorSpec>,
    /// Greedy soup's accept rule: `">="` (the paper, default) or `">"`.
    #[serde(default)]
    pub accept: Option<String>,
    /// Merge once per value of one parameter, keep the best-scoring soup (needs `evaluator`).
    #[serde(default)]
    pub sweep: Option<crate::search::spec::SweepSpec>,
    /// The dtype every merged float tensor of the checkpoints must have; another dtype fails
    /// the job. mergekit YAML's `dtype` becomes this for the methods that compute in the
    /// checkpoints' own dtype (all but the task-arithmetic family, which take `compute_dtype`).
    #[serde(default)]
    pub input_dtype: Option<String>,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub uri: String,
    #[serde(default)]
    pub weight: Option<f64>,
    /// A known score of this model alone (method `greedy_soup`; evaluated when absent).
    #[serde(default)]
    pub score: Option<f64>,
    /// Per-model parameters (`density`, `gamma`, `epsilon`, `weight` as a gradient or filters).
    #[serde(default)]
    pub parameters: serde_json::Map<String, serde_json::Value>,
}

/// One output slice: the layers `layer_range` of its source, in order.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SliceSpec {
    pub sources: Vec<SliceSourceSpec>,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SliceSourceSpec {
    pub uri: String,
    /// `[first, end)` layer indices of the source model.
    #[schema(value_type = Vec<u64>, min_items = 2, max_items = 2)]
    pub layer_range: [u64; 2],
    #[serde(default)]
    pub parameters: serde_json::Map<String, serde_json::Value>,
}

/// A validated slice source: `model` indexes [`Recipe::models`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SliceSource {
    pub model: usize,
    pub layer_range: [u64; 2],
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, Setting>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Slice {
    pub sources: Vec<SliceSource>,
}

/// Most layers a slice list may produce.
pub const MAX_SLICE_LAYERS: u64 = 100_000;

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    pub uri: String,
    #[serde(default)]
    pub dtype: Option<String>,
    /// `"2GB"`, `"500MB"`, `"1GiB"` or a number of bytes.
    #[serde(default)]
    pub max_shard_size: Option<serde_json::Value>,
}

/// Merge methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Weighted (or uniform) average: the model soup.
    Linear,
    /// `base + λ Σ w_i (x_i − base)` (ALGORITHMS.md §5).
    TaskArithmetic,
    /// Trim (top-k magnitude per tensor), elect sign, disjoint mean (§6).
    Ties,
    /// Drop the smallest and the largest-magnitude deltas per tensor (§8).
    Breadcrumbs,
    /// Breadcrumbs with TIES sign consensus.
    BreadcrumbsTies,
    /// Random drop with L1 rescale, then task arithmetic (§7).
    DareLinear,
    /// Random drop with L1 rescale, then TIES sign consensus.
    DareTies,
    /// Magnitude-ranked random drop per row, sign consensus (§9).
    Della,
    /// DELLA without sign consensus.
    DellaLinear,
    /// Spherical interpolation between the base (t = 0) and one model (§11.1).
    Slerp,
    /// Model Stock: interpolate the average toward the base by the task vectors' cosine (§10).
    ModelStock,
    /// Slerp of two weighted models (or of their task vectors, with a base) (§11.3).
    Nuslerp,
    /// Riemannian (Karcher) mean of the models on the sphere (§11.4).
    Karcher,
    /// Select (variance top-k), calculate (weights from energy), erase (sign consensus).
    Sce,
    /// Copy tensors (optionally scaled); with `slices`, stack layer ranges of several models.
    Passthrough,
    /// Take the model's value where it is within `t` of the base, interpolate beyond.
    Nearswap,
    /// Sparse Model Soups: a linear soup of ingredients that share one zero pattern.
    SparseSoup,
    /// Offline EMA over checkpoints of one run (oldest first): a linear soup with weights
    /// `β^{T−1}` on the first and `(1 − β)·β^{T−j}` on checkpoint `j ≥ 2` (ALGORITHMS.md §17).
    Ema,
}

/// Whether a method takes a base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseRule {
    Required,
    Optional,
    Forbidden,
}

impl Method {
    pub const ALL: [Method; 18] = [
        Method::Linear,
        Method::TaskArithmetic,
        Method::Ties,
        Method::Breadcrumbs,
        Method::BreadcrumbsTies,
        Method::DareLinear,
        Method::DareTies,
        Method::Della,
        Method::DellaLinear,
        Method::Slerp,
        Method::ModelStock,
        Method::Nuslerp,
        Method::Karcher,
        Method::Sce,
        Method::Passthrough,
        Method::Nearswap,
        Method::SparseSoup,
        Method::Ema,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Linear => "linear",
            Method::TaskArithmetic => "task_arithmetic",
            Method::Ties => "ties",
            Method::Breadcrumbs => "breadcrumbs",
            Method::BreadcrumbsTies => "breadcrumbs_ties",
            Method::DareLinear => "dare_linear",
            Method::DareTies => "dare_ties",
            Method::Della => "della",
            Method::DellaLinear => "della_linear",
            Method::Slerp => "slerp",
            Method::ModelStock => "model_stock",
            Method::Nuslerp => "nuslerp",
            Method::Karcher => "karcher",
            Method::Sce => "sce",
            Method::Passthrough => "passthrough",
            Method::Nearswap => "nearswap",
            Method::SparseSoup => "sparse_soup",
            Method::Ema => "ema",
        }
    }

    pub fn parse(s: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == s)
    }

    /// The generalized-task-arithmetic family (mergekit's `GeneralizedTaskArithmeticMerge`):
    /// its sparsification, whether it elects signs, and its `normalize`/`rescale` defaults.
    pub fn gta(self) -> Option<GtaMethod> {
        use Sparsification as S;
        let (sparsification, consensus, normalize, rescale) = match self {
            Method::TaskArithmetic => (S::None, false, false, false),
            Method::Ties => (S::Magnitude, true, true, false),
            Method::Breadcrumbs => (S::MagnitudeOutliers, false, false, false),
            Method::BreadcrumbsTies => (S::MagnitudeOutliers, true, false, false),
            Method::DareLinear => (S::Random, false, false, true),
            Method::DareTies => (S::Random, true, false, true),
            Method::Della => (S::DellaMagprune, true, true, true),
            Method::DellaLinear => (S::DellaMagprune, false, false, true),
            Method::Linear
            | Method::Slerp
            | Method::ModelStock
            | Method::Nuslerp
            | Method::Karcher
            | Method::Sce
            | Method::Passthrough
            | Method::Nearswap
            | Method::SparseSoup
            | Method::Ema => return None,
        };
        Some(GtaMethod {
            sparsification,
            consensus,
            default_normalize: normalize,
            default_rescale: rescale,
        })
    }

    /// Whether the method needs, accepts or refuses `base_model`.
    pub fn base_rule(self) -> BaseRule {
        match self {
            Method::Linear
            | Method::Karcher
            | Method::Passthrough
            | Method::SparseSoup
            | Method::Ema => BaseRule::Forbidden,
            Method::Nuslerp => BaseRule::Optional,
            _ => BaseRule::Required,
        }
    }
}

/// How a GTA method sparsifies each task vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sparsification {
    None,
    /// Keep the `density` share of largest `|δ|` (TIES).
    Magnitude,
    /// Drop the `gamma` share of largest `|δ|` and the smallest down to `density` (breadcrumbs).
    MagnitudeOutliers,
    /// Keep each element with probability `density` (DARE).
    Random,
    /// Keep with a probability ranked by magnitude per row (DELLA).
    DellaMagprune,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GtaMethod {
    pub sparsification: Sparsification,
    pub consensus: bool,
    pub default_normalize: bool,
    pub default_rescale: bool,
}

/// Method parameters, validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum Parameters {
    Linear {
        /// Divide by the sum of the weights.
        normalize: bool,
    },
    /// Every generalized-task-arithmetic method (which one is [`Recipe::method`]).
    Gta {
        normalize: bool,
        /// L1-norm rescale of each sparsified task vector (mergekit ≥ 2025-02).
        rescale: bool,
        lambda: f64,
        /// Seed of the keyed generator (DARE, DELLA).
        seed: u64,
        /// Precision the arithmetic is rounded to after every step (as torch does on tensors
        /// of that dtype); `None`: the base model's storage dtype, as mergekit without `dtype`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        compute_dtype: Option<DType>,
        /// Per-model parameters given once for all models (`density`, `weight`, ...).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        model_defaults: BTreeMap<String, Setting>,
        /// Selection per row (last dimension) instead of per tensor: `scope: "row"`, the
        /// breadcrumbs paper's code (ties, breadcrumbs, breadcrumbs_ties only).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        per_row: bool,
        /// One selection over the whole model per task vector: `scope: "model"`, the TIES
        /// paper's trim (ties, breadcrumbs, breadcrumbs_ties); thresholds from a pre-pass.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        per_model: bool,
    },
    Slerp {
        t: Setting,
    },
    ModelStock {
        /// Cosines per row (last dimension) instead of per tensor.
        filter_wise: bool,
    },
    Nuslerp {
        /// The whole tensor is one vector (mergekit `nuslerp_flatten`, default true).
        flatten: bool,
        /// Without flatten: columns (`true`) or rows (`false`) are the vectors.
        row_wise: bool,
    },
    Karcher {
        max_iter: u32,
        tol: f64,
    },
    Sce {
        select_topk: f64,
    },
    Passthrough {},
    Nearswap {
        t: Setting,
    },
    SparseSoup {
        normalize: bool,
        /// Fail when the ingredients' zero patterns differ (else report those tensors).
        require_shared_mask: bool,
    },
}

/// One ingredient after validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ingredient {
    /// The URL as the client gave it (resolution and the allowed-root check happen in storage).
    pub uri: String,
    pub weight: f64,
    /// Per-model parameters other than a scalar weight (validated per method).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, Setting>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Output {
    pub uri: String,
    /// `None`: each tensor keeps the first model's dtype.
    pub dtype: Option<DType>,
    pub max_shard_size: u64,
}

/// A validated, normalized recipe: what a job stores and a worker runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    pub method: Method,
    /// The ingredients, without the base model (an entry naming the base is dropped).
    pub models: Vec<Ingredient>,
    /// The base model's URL, for the methods that need one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    /// Passthrough's layer stack (empty: every tensor of the one model).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slices: Vec<Slice>,
    pub parameters: Parameters,
    pub output: Output,
    /// An evaluation-driven search (greedy soup) around this recipe, which is then the uniform
    /// soup of all models; the worker runs the search and writes the chosen soup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<crate::search::spec::Search>,
    /// The trajectory `models` was expanded from (the selection and what it picked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trajectory: Option<trajectory::Trajectory>,
    /// The dtype the merged float tensors must have (see [`MergeRequest::input_dtype`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_dtype: Option<DType>,
}

/// Scheduling options that travel beside the recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    pub recipe: Recipe,
    pub idempotency_key: Option<String>,
    pub priority: i32,
    pub max_attempts: Option<i32>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{0}")]
    Syntax(String),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

impl From<crate::search::spec::Invalid> for RecipeError {
    fn from(e: crate::search::spec::Invalid) -> Self {
        RecipeError::invalid(e.field, e.message)
    }
}

impl RecipeError {
    pub fn code(&self) -> ErrorCode {
        ErrorCode::InvalidRecipe
    }

    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        RecipeError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl Recipe {
    /// Parse and validate a JSON body.
    pub fn parse_json(body: &[u8]) -> Result<Submission, RecipeError> {
        Self::from_request(Self::request_json(body)?)
    }

    /// A JSON body as a request, not validated yet (a trajectory is expanded in between).
    pub fn request_json(body: &[u8]) -> Result<MergeRequest, RecipeError> {
        serde_json::from_slice(body)
            .map_err(|e| RecipeError::Syntax(format!("invalid JSON recipe: {e}")))
    }

    /// Parse and validate a mergekit YAML recipe. `base_dir` (the recipe file's folder)
    /// resolves relative model paths; without it only storage URLs are accepted. An `output`
    /// mapping (ladle's extension) gives the output; the CLI sets its `uri` from `--out`.
    pub fn parse_yaml(
        text: &str,
        base_dir: Option<&std::path::Path>,
        output_uri: Option<&str>,
    ) -> Result<Submission, RecipeError> {
        Self::from_request(Self::request_yaml(text, base_dir, output_uri)?)
    }

    /// A YAML recipe as a request, not validated yet (see [`Recipe::parse_yaml`]).
    pub fn request_yaml(
        text: &str,
        base_dir: Option<&std::path::Path>,
        output_uri: Option<&str>,
    ) -> Result<MergeRequest, RecipeError> {
        let doc = yaml::parse(text)?;
        let mut req = yaml::to_request(&doc, base_dir)?;
        if let Some(uri) = output_uri {
            req["output"]["uri"] = serde_json::Value::String(uri.to_string());
        }
        serde_json::from_value(req)
            .map_err(|e| RecipeError::Syntax(format!("invalid YAML recipe: {e}")))
    }

    /// Validate and normalize a parsed request.
    pub fn from_request(mut req: MergeRequest) -> Result<Submission, RecipeError> {
        let expanded = trajectory::take_expanded(&mut req)?;
        if let Some(sweep) = req.sweep.take() {
            return crate::search::spec::sweep(req, sweep);
        }
        let greedy = crate::search::spec::take_greedy(&mut req).map_err(RecipeError::from)?;
        let slices = take_slices(&mut req)?;
        let method = Method::parse(&req.method).ok_or_else(|| {
            let known: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
            RecipeError::invalid(
                "method",
                format!(
                    "unknown merge method {:?} (supported: {})",
                    req.method,
                    known.join(", ")
                ),
            )
        })?;
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
        let base_model = match (&req.base_model, method.base_rule()) {
            (None, BaseRule::Required) => {
                return Err(RecipeError::invalid(
                    "base_model",
                    format!("method {} needs a base model", method.name()),
                ));
            }
            (Some(_), BaseRule::Forbidden) => {
                return Err(RecipeError::invalid(
                    "base_model",
                    format!(
                        "method {} takes no base model (list it in models instead)",
                        method.name()
                    ),
                ));
            }
            (Some(b), _) if b.trim().is_empty() => {
                return Err(RecipeError::invalid("base_model", "must not be empty"));
            }
            (b, _) => b.clone(),
        };
        let is_base = |uri: &str| {
            base_model
                .as_deref()
                .is_some_and(|b| b.trim_end_matches('/') == uri.trim_end_matches('/'))
        };
        // A model naming the base is the base (mergekit lists it in both places for slerp).
        let specs: Vec<(usize, &ModelSpec)> = req
            .models
            .iter()
            .enumerate()
            .filter(|(_, m)| !is_base(&m.uri))
            .collect();
        if specs.is_empty() {
            return Err(RecipeError::invalid(
                "models",
                "at least one model besides base_model is required",
            ));
        }
        let scalar_weight = |m: &ModelSpec| {
            m.weight.or_else(|| {
                m.parameters
                    .get("weight")
                    .and_then(|w| w.as_f64().filter(|_| w.is_number()))
            })
        };
        let any_weight = specs
            .iter()
            .any(|(_, m)| m.weight.is_some() || m.parameters.contains_key("weight"));
        let default_weight = req.parameters.contains_key("weight");
        let mut models = Vec::with_capacity(specs.len());
        for &(i, m) in &specs {
            if m.uri.trim().is_empty() {
                return Err(RecipeError::invalid(
                    format!("models[{i}].uri"),
                    "must not be empty",
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
                let setting = Setting::from_json(value).map_err(|e| {
                    RecipeError::invalid(format!("models[{i}].parameters.{key}"), e)
                })?;
                if key == "weight" && setting.as_scalar().is_some() {
                    continue; // carried in `weight`
                }
                parameters.insert(key.clone(), setting);
            }
            let has_weight = m.weight.is_some() || m.parameters.contains_key("weight");
            let weight = match scalar_weight(m) {
                // The kernels compute in f32: a weight beyond its range would become infinite.
                Some(w) if !w.is_finite() || w.abs() > f64::from(f32::MAX) => {
                    return Err(RecipeError::invalid(
                        format!("models[{i}].weight"),
                        "must be a finite number within the range of f32 (|w| ≤ 3.4e38)",
                    ));
                }
                Some(w) => w,
                None if has_weight => 1.0, // a gradient or filter list in `parameters`
                None if any_weight && !default_weight => {
                    return Err(RecipeError::invalid(
                        format!("models[{i}].weight"),
                        "give a weight for every model, or for none (a uniform soup)",
                    ));
                }
                None if (method.gta().is_some() || method == Method::Nuslerp)
                    && !default_weight =>
                {
                    return Err(RecipeError::invalid(
                        format!("models[{i}].weight"),
                        format!("method {} needs a weight for every model", method.name()),
                    ));
                }
                None => 1.0,
            };
            models.push((
                i,
                Ingredient {
                    uri: m.uri.clone(),
                    weight,
                    parameters,
                },
            ));
        }
        let parameters = match method {
            Method::Linear => parse_linear(&req.parameters, &models)?,
            Method::Ema => parse_ema(&req.parameters, &mut models, any_weight)?,
            Method::SparseSoup => {
                let mut p = req.parameters.clone();
                let require_shared_mask = match p.remove("require_shared_mask") {
                    None => false,
                    Some(v) => bool_param("require_shared_mask", &v)?,
                };
                if let Some((i, m)) = models.iter().find(|(_, m)| !m.parameters.is_empty()) {
                    let key = m.parameters.keys().next().cloned().unwrap_or_default();
                    return Err(RecipeError::invalid(
                        format!("models[{i}].parameters.{key}"),
                        "method sparse_soup takes only a numeric weight per model",
                    ));
                }
                match parse_linear(&p, &models) {
                    Ok(Parameters::Linear { normalize }) => Parameters::SparseSoup {
                        normalize,
                        require_shared_mask,
                    },
                    Ok(_) => return Err(RecipeError::invalid("method", "internal")),
                    Err(RecipeError::Invalid { field, message }) => {
                        return Err(RecipeError::Invalid {
                            field,
                            message: message
                                .replace("method linear", "method sparse_soup")
                                .replace(
                                    "(known: normalize)",
                                    "(known: normalize, require_shared_mask)",
                                ),
                        });
                    }
                    Err(e) => return Err(e),
                }
            }
            Method::Slerp | Method::Nearswap => parse_slerp(method, &req.parameters, &models)?,
            Method::Passthrough => parse_passthrough(&req.parameters, &models, slices.is_empty())?,
            Method::ModelStock | Method::Nuslerp | Method::Karcher | Method::Sce => {
                parse_other(method, &req.parameters, &models, base_model.is_some())?
            }
            _ => parse_gta(method, &req.parameters, &models)?,
        };
        // A global `weight` applies to the models that give none.
        if let Parameters::Gta { model_defaults, .. } = &parameters
            && let Some(w) = model_defaults.get("weight")
        {
            for (i, m) in models.iter_mut() {
                let spec = &req.models[*i];
                if spec.weight.is_none() && !spec.parameters.contains_key("weight") {
                    match w.as_scalar() {
                        Some(x) => m.weight = x,
                        None => {
                            m.parameters.insert("weight".into(), w.clone());
                        }
                    }
                }
            }
        }
        let models: Vec<Ingredient> = models.into_iter().map(|(_, m)| m).collect();
        let output = parse_output(&req.output)?;
        if let Some(b) = &base_model
            && same_or_nested(b, &output.uri)
        {
            return Err(RecipeError::invalid(
                "output.uri",
                "the output must not be, contain or lie inside an input (base_model)",
            ));
        }
        for (i, m) in models.iter().enumerate() {
            if same_or_nested(&m.uri, &output.uri) {
                return Err(RecipeError::invalid(
                    "output.uri",
                    format!(
                        "the output must not be, contain or lie inside an input (models[{i}].uri)"
                    ),
                ));
            }
        }
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
        let priority = req.priority.unwrap_or(0);
        if !(-1000..=1000).contains(&priority) {
            return Err(RecipeError::invalid(
                "priority",
                "must be between -1000 and 1000",
            ));
        }
        let search = greedy
            .map(|g| g.finish(req.evaluator.as_ref(), req.accept.as_deref()))
            .transpose()?;
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
                search,
                trajectory: expanded,
                input_dtype,
            },
            idempotency_key: req.idempotency_key,
            priority,
            max_attempts: req.max_attempts,
        })
    }

    /// SHA-256 of the canonical JSON form: two requests with the same hash ask for the same
    /// merge (used to detect an idempotency key reused with another body).
    pub fn hash(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).unwrap_or_default();
        Sha256::digest(&json).to_vec()
    }

    /// Weights as the kernel uses them, and the divisor when normalizing.
    pub fn linear_weights(&self) -> (Vec<f32>, Option<f32>) {
        let weights: Vec<f32> = self.models.iter().map(|m| m.weight as f32).collect();
        let divisor = match self.parameters {
            Parameters::Linear { normalize: true }
            | Parameters::SparseSoup {
                normalize: true, ..
            } => Some(weights.iter().sum::<f32>()),
            _ => None,
        };
        (weights, divisor)
    }
}

fn parse_linear(
    params: &serde_json::Map<String, serde_json::Value>,
    models: &[(usize, Ingredient)],
) -> Result<Parameters, RecipeError> {
    let mut normalize = true;
    for (key, value) in params {
        match key.as_str() {
            "normalize" => {
                normalize = value.as_bool().ok_or_else(|| {
                    RecipeError::invalid("parameters.normalize", "must be true or false")
                })?;
            }
            other => {
                return Err(RecipeError::invalid(
                    format!("parameters.{other}"),
                    "unknown parameter for method linear (known: normalize)",
                ));
            }
        }
    }
    for (i, m) in models {
        if let Some(key) = m.parameters.keys().find(|k| *k != "weight") {
            return Err(RecipeError::invalid(
                format!("models[{i}].parameters.{key}"),
                "method linear takes only a weight per model (a number, a layer gradient or \
                 filter/name rules)",
            ));
        }
    }
    // Per-tensor weights (gradients, rules) are checked for a zero sum tensor by tensor.
    if normalize && models.iter().all(|(_, m)| m.parameters.is_empty()) {
        let sum: f32 = models.iter().map(|(_, m)| m.weight as f32).sum();
        if sum == 0.0 || !sum.is_finite() {
            return Err(RecipeError::invalid(
                "models[].weight",
                "with normalize: true the weights must not sum to zero",
            ));
        }
    }
    Ok(Parameters::Linear { normalize })
}

fn bool_param(key: &str, v: &serde_json::Value) -> Result<bool, RecipeError> {
    v.as_bool()
        .ok_or_else(|| RecipeError::invalid(format!("parameters.{key}"), "must be true or false"))
}

/// Per-model parameter names of a GTA method.
fn gta_model_params(method: Method) -> &'static [&'static str] {
    match method.gta().map(|g| g.sparsification) {
        Some(Sparsification::None) => &["weight"],
        Some(Sparsification::MagnitudeOutliers) => &["weight", "density", "gamma"],
        Some(Sparsification::DellaMagprune) => &["weight", "density", "epsilon"],
        Some(_) => &["weight", "density"],
        None => &[],
    }
}

fn check_range(
    field: &str,
    s: &Setting,
    ok: impl Fn(f64) -> bool,
    what: &str,
) -> Result<(), RecipeError> {
    match s.anchors().into_iter().find(|x| !ok(*x)) {
        Some(bad) => Err(RecipeError::invalid(
            field,
            format!("{bad} is out of range: {what}"),
        )),
        None => Ok(()),
    }
}

fn check_model_param(
    method: Method,
    field: &str,
    key: &str,
    s: &Setting,
) -> Result<(), RecipeError> {
    match key {
        "density" => check_range(
            field,
            s,
            |d| d > 0.0 && d <= 1.0,
            "density must be in (0, 1]",
        ),
        "gamma" => check_range(
            field,
            s,
            |g| (0.0..1.0).contains(&g),
            "gamma must be in [0, 1)",
        ),
        "epsilon" => check_range(
            field,
            s,
            |e| (0.0..0.5).contains(&e),
            "epsilon must be in [0, 0.5)",
        ),
        "weight" => check_range(
            field,
            s,
            |w| w.abs() <= f64::from(f32::MAX),
            "a weight must be finite and within the range of f32",
        ),
        other => Err(RecipeError::invalid(
            field,
            format!(
                "unknown parameter {other:?} for method {} (known: {})",
                method.name(),
                gta_model_params(method).join(", ")
            ),
        )),
    }
}

fn parse_gta(
    method: Method,
    params: &serde_json::Map<String, serde_json::Value>,
    models: &[(usize, Ingredient)],
) -> Result<Parameters, RecipeError> {
    let gta = method
        .gta()
        .ok_or_else(|| RecipeError::invalid("method", "not a task-arithmetic method"))?;
    let mut normalize = gta.default_normalize;
    let mut rescale = gta.default_rescale;
    let mut lambda = 1.0;
    let mut seed = 0u64;
    let mut compute_dtype = None;
    let mut per_row = false;
    let mut per_model = false;
    let selects = matches!(
        gta.sparsification,
        Sparsification::Magnitude | Sparsification::MagnitudeOutliers
    );
    let mut model_defaults = BTreeMap::new();
    let allowed = gta_model_params(method);
    for (key, value) in params {
        let field = format!("parameters.{key}");
        match key.as_str() {
            "normalize" => normalize = bool_param(key, value)?,
            "rescale" if gta.sparsification != Sparsification::None => {
                rescale = bool_param(key, value)?
            }
            "lambda" => {
                lambda = value
                    .as_f64()
                    .filter(|x| x.is_finite() && x.abs() <= f64::from(f32::MAX))
                    .ok_or_else(|| {
                        RecipeError::invalid(&field, "must be a finite number within f32 range")
                    })?;
            }
            "seed"
                if matches!(
                    gta.sparsification,
                    Sparsification::Random | Sparsification::DellaMagprune
                ) =>
            {
                seed = value.as_u64().ok_or_else(|| {
                    RecipeError::invalid(&field, "must be an integer from 0 to 2^64 − 1")
                })?;
            }
            "scope" if selects => {
                (per_row, per_model) = match value.as_str() {
                    Some("tensor") => (false, false),
                    Some("row") => (true, false),
                    Some("model") => (false, true),
                    _ => {
                        return Err(RecipeError::invalid(
                            &field,
                            "use \"tensor\", \"row\" or \"model\"",
                        ));
                    }
                };
            }
            "compute_dtype" => {
                let d = value
                    .as_str()
                    .and_then(DType::parse_user)
                    .filter(|d| matches!(d, DType::F32 | DType::BF16 | DType::F16));
                compute_dtype = Some(d.ok_or_else(|| {
                    RecipeError::invalid(&field, "use float32, float16 or bfloat16")
                })?);
            }
            k if allowed.contains(&k) => {
                let s = Setting::from_json(value).map_err(|e| RecipeError::invalid(&field, e))?;
                check_model_param(method, &field, k, &s)?;
                model_defaults.insert(k.to_string(), s);
            }
            other => {
                let mut known = vec!["normalize", "lambda", "compute_dtype"];
                if gta.sparsification != Sparsification::None {
                    known.push("rescale");
                }
                if selects {
                    known.push("scope");
                }
                if matches!(
                    gta.sparsification,
                    Sparsification::Random | Sparsification::DellaMagprune
                ) {
                    known.push("seed");
                }
                known.extend_from_slice(allowed);
                return Err(RecipeError::invalid(
                    field,
                    format!(
                        "unknown parameter {other:?} for method {} (known: {})",
                        method.name(),
                        known.join(", ")
                    ),
                ));
            }
        }
    }
    for (i, m) in models {
        for (key, s) in &m.parameters {
            check_model_param(method, &format!("models[{i}].parameters.{key}"), key, s)?;
        }
        if per_model {
            // One threshold over the whole model needs one density (and gamma) per model.
            for k in ["density", "gamma"] {
                let own = m.parameters.get(k);
                let s = own.or_else(|| model_defaults.get(k));
                if s.is_some_and(|s| s.as_scalar().is_none()) {
                    let at = if own.is_some() {
                        format!("models[{i}].parameters.{k}")
                    } else {
                        format!("parameters.{k}")
                    };
                    return Err(RecipeError::invalid(
                        at,
                        "scope \"model\" selects over the whole model: give one number, \
                         not a gradient or filters",
                    ));
                }
            }
        }
        if gta.sparsification == Sparsification::DellaMagprune {
            let get = |k: &str| {
                m.parameters
                    .get(k)
                    .or_else(|| model_defaults.get(k))
                    .map(|s| s.anchors())
            };
            let densities = get("density").unwrap_or_else(|| vec![1.0]);
            let epsilons = get("epsilon").unwrap_or_else(|| vec![0.15]);
            for d in densities.iter().filter(|d| **d < 1.0) {
                for e in &epsilons {
                    if d - e <= 0.0 || d + e >= 1.0 {
                        return Err(RecipeError::invalid(
                            format!("models[{i}].parameters.epsilon"),
                            format!("density {d} ± epsilon {e} must lie in (0, 1)"),
                        ));
                    }
                }
            }
        }
    }
    Ok(Parameters::Gta {
        normalize,
        rescale,
        lambda,
        seed,
        compute_dtype,
        model_defaults,
        per_row,
        per_model,
    })
}

/// `slices` → the models they name (unique, in order of appearance) and validated slices.
fn take_slices(req: &mut MergeRequest) -> Result<Vec<Slice>, RecipeError> {
    if req.slices.is_empty() {
        return Ok(Vec::new());
    }
    if req.method != "passthrough" {
        return Err(RecipeError::invalid(
            "slices",
            format!(
                "slices are supported with method passthrough only, not {:?}",
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
                    req.models.push(ModelSpec {
                        uri: src.uri.clone(),
                        weight: None,
                        score: None,
                        parameters: serde_json::Map::new(),
                    });
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

fn parse_passthrough(
    params: &serde_json::Map<String, serde_json::Value>,
    models: &[(usize, Ingredient)],
    whole_model: bool,
) -> Result<Parameters, RecipeError> {
    if let Some(key) = params.keys().next() {
        return Err(RecipeError::invalid(
            format!("parameters.{key}"),
            "passthrough takes no global parameters (give scale per model or per slice)",
        ));
    }
    if whole_model && models.len() != 1 {
        return Err(RecipeError::invalid(
            "models",
            "passthrough copies exactly one model (or give slices)",
        ));
    }
    for (i, m) in models {
        if let Some(key) = m.parameters.keys().find(|k| k.as_str() != "scale") {
            return Err(RecipeError::invalid(
                format!("models[{i}].parameters.{key}"),
                "unknown parameter for method passthrough (known: scale)",
            ));
        }
    }
    Ok(Parameters::Passthrough {})
}

/// EMA: computes the weights (a linear soup, no normalization: they sum to 1).
fn parse_ema(
    params: &serde_json::Map<String, serde_json::Value>,
    models: &mut [(usize, Ingredient)],
    any_weight: bool,
) -> Result<Parameters, RecipeError> {
    if any_weight {
        return Err(RecipeError::invalid(
            "models[].weight",
            "ema computes the weights from decay; give none",
        ));
    }
    let mut decay = None;
    for (key, value) in params {
        match key.as_str() {
            "decay" => {
                decay = Some(
                    value
                        .as_f64()
                        .filter(|d| *d > 0.0 && *d < 1.0)
                        .ok_or_else(|| {
                            RecipeError::invalid("parameters.decay", "must be in (0, 1)")
                        })?,
                );
            }
            other => {
                return Err(RecipeError::invalid(
                    format!("parameters.{other}"),
                    "unknown parameter for method ema (known: decay)",
                ));
            }
        }
    }
    let decay = decay.ok_or_else(|| {
        RecipeError::invalid(
            "parameters.decay",
            "ema needs decay (per checkpoint interval)",
        )
    })?;
    if let Some((i, m)) = models.iter().find(|(_, m)| !m.parameters.is_empty()) {
        let key = m.parameters.keys().next().cloned().unwrap_or_default();
        return Err(RecipeError::invalid(
            format!("models[{i}].parameters.{key}"),
            "ema takes no per-model parameters",
        ));
    }
    let t = models.len() as i32;
    for (j, (_, m)) in models.iter_mut().enumerate() {
        let j = j as i32 + 1;
        m.weight = if j == 1 {
            decay.powi(t - 1)
        } else {
            (1.0 - decay) * decay.powi(t - j)
        };
    }
    Ok(Parameters::Linear { normalize: false })
}

/// model_stock, nuslerp, karcher, sce.
fn parse_other(
    method: Method,
    params: &serde_json::Map<String, serde_json::Value>,
    models: &[(usize, Ingredient)],
    has_base: bool,
) -> Result<Parameters, RecipeError> {
    let name = method.name();
    let model_keys: &[&str] = if method == Method::Nuslerp {
        &["weight"]
    } else {
        &[]
    };
    for (i, m) in models {
        if let Some(key) = m
            .parameters
            .keys()
            .find(|k| !model_keys.contains(&k.as_str()))
        {
            return Err(RecipeError::invalid(
                format!("models[{i}].parameters.{key}"),
                format!("unknown per-model parameter for method {name}"),
            ));
        }
    }
    let count = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(RecipeError::invalid(
                "models",
                format!("{name} needs {what} ({} given)", models.len()),
            ))
        }
    };
    let mut known: Vec<&str> = Vec::new();
    let mut out = match method {
        Method::ModelStock => {
            count(
                models.len() >= 2,
                "base_model and at least two other models",
            )?;
            known.push("filter_wise");
            Parameters::ModelStock { filter_wise: false }
        }
        Method::Nuslerp => {
            count(
                models.len() == 2,
                if has_base {
                    "exactly two models besides base_model"
                } else {
                    "exactly two models"
                },
            )?;
            known.extend(["nuslerp_flatten", "nuslerp_row_wise"]);
            Parameters::Nuslerp {
                flatten: true,
                row_wise: false,
            }
        }
        Method::Karcher => {
            known.extend(["max_iter", "tol"]);
            Parameters::Karcher {
                max_iter: 10,
                tol: 1e-5,
            }
        }
        Method::Sce => {
            known.push("select_topk");
            Parameters::Sce { select_topk: 1.0 }
        }
        _ => return Err(RecipeError::invalid("method", "not handled here")),
    };
    for (key, value) in params {
        let field = format!("parameters.{key}");
        match (&mut out, key.as_str()) {
            (Parameters::ModelStock { filter_wise }, "filter_wise") => {
                *filter_wise = bool_param(key, value)?
            }
            (Parameters::Nuslerp { flatten, .. }, "nuslerp_flatten") => {
                *flatten = bool_param(key, value)?
            }
            (Parameters::Nuslerp { row_wise, .. }, "nuslerp_row_wise") => {
                *row_wise = bool_param(key, value)?
            }
            (Parameters::Karcher { max_iter, .. }, "max_iter") => {
                *max_iter = value
                    .as_u64()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| {
                        RecipeError::invalid(&field, "must be an integer from 1 to 10000")
                    })? as u32;
            }
            (Parameters::Karcher { tol, .. }, "tol") => {
                *tol = value
                    .as_f64()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or_else(|| RecipeError::invalid(&field, "must be a positive number"))?;
            }
            (Parameters::Sce { select_topk }, "select_topk") => {
                *select_topk = value
                    .as_f64()
                    .filter(|x| *x > 0.0 && *x <= 1.0)
                    .ok_or_else(|| RecipeError::invalid(&field, "must be in (0, 1]"))?;
            }
            (_, other) => {
                return Err(RecipeError::invalid(
                    field,
                    format!(
                        "unknown parameter {other:?} for method {name} (known: {})",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
        }
    }
    Ok(out)
}

fn parse_slerp(
    method: Method,
    params: &serde_json::Map<String, serde_json::Value>,
    models: &[(usize, Ingredient)],
) -> Result<Parameters, RecipeError> {
    let name = method.name();
    if models.len() != 1 {
        return Err(RecipeError::invalid(
            "models",
            format!(
                "{name} interpolates base_model and exactly one other model ({} given)",
                models.len()
            ),
        ));
    }
    if let Some((i, m)) = models.iter().find(|(_, m)| !m.parameters.is_empty()) {
        let key = m.parameters.keys().next().cloned().unwrap_or_default();
        return Err(RecipeError::invalid(
            format!("models[{i}].parameters.{key}"),
            format!("{name} takes no per-model parameters"),
        ));
    }
    let mut t = None;
    for (key, value) in params {
        match key.as_str() {
            "t" => {
                t = Some(
                    Setting::from_json(value)
                        .map_err(|e| RecipeError::invalid("parameters.t", e))?,
                )
            }
            other => {
                return Err(RecipeError::invalid(
                    format!("parameters.{other}"),
                    format!("unknown parameter for method {name} (known: t)"),
                ));
            }
        }
    }
    let t = t.ok_or_else(|| RecipeError::invalid("parameters.t", format!("{name} needs t")))?;
    if let Setting::Filters(rules) = &t
        && !rules
            .iter()
            .any(|r| matches!(r.filter.as_deref(), None | Some("*")))
    {
        return Err(RecipeError::invalid(
            "parameters.t",
            "end the filter list with a rule without filter (the value for other tensors)",
        ));
    }
    Ok(if method == Method::Nearswap {
        Parameters::Nearswap { t }
    } else {
        Parameters::Slerp { t }
    })
}

/// A float dtype a recipe names (`field` for the error).
fn float_dtype(s: &str, field: &str) -> Result<DType, RecipeError> {
    DType::parse_user(s)
        .filter(|d| d.is_mergeable_float())
        .ok_or_else(|| {
            RecipeError::invalid(
                field,
                format!("unknown or unsupported dtype {s:?} (use float32, float16 or bfloat16)"),
            )
        })
}

fn parse_output(spec: &OutputSpec) -> Result<Output, RecipeError> {
    if spec.uri.trim().is_empty() {
        return Err(RecipeError::invalid("output.uri", "must not be empty"));
    }
    if spec.uri.ends_with(".safetensors") {
        return Err(RecipeError::invalid(
            "output.uri",
            "the output is a folder URL, not a .safetensors file",
        ));
    }
    let dtype = spec
        .dtype
        .as_deref()
        .map(|s| float_dtype(s, "output.dtype"))
        .transpose()?;
    let max_shard_size = match &spec.max_shard_size {
        None => DEFAULT_MAX_SHARD_SIZE,
        Some(v) => parse_size(v).ok_or_else(|| {
            RecipeError::invalid(
                "output.max_shard_size",
                format!("expected a size such as \"2GB\", \"500MB\" or a byte count, got {v}"),
            )
        })?,
    };
    if max_shard_size < MIN_SHARD_SIZE {
        return Err(RecipeError::invalid(
            "output.max_shard_size",
            format!("must be at least {MIN_SHARD_SIZE} bytes"),
        ));
    }
    Ok(Output {
        uri: spec.uri.clone(),
        dtype,
        max_shard_size,
    })
}

/// `"2GB"` (10⁹, as Hugging Face), `"2GiB"` (2³⁰), `"500MB"`, `"1.5GB"`, or a byte count.
pub fn parse_size(v: &serde_json::Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let s = v.as_str()?.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = num * mult;
    (0.0..1e18).contains(&bytes).then_some(bytes as u64)
}

/// Whether two URLs are the same location or one lies inside the other (textually, after
/// trimming trailing slashes). Checked on the raw URLs here and again on resolved ones.
pub fn same_or_nested(a: &str, b: &str) -> bool {
    let a = a.trim_end_matches('/');
    let b = b.trim_end_matches('/');
    a == b || a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: serde_json::Value) -> Result<Submission, RecipeError> {
        Recipe::parse_json(&serde_json::to_vec(&v).unwrap())
    }

    fn field(e: RecipeError) -> String {
        match e {
            RecipeError::Invalid { field, .. } => field,
            RecipeError::Syntax(s) => s,
        }
    }

    #[test]
    fn uniform_soup_defaults() {
        let s = parse(serde_json::json!({
            "method": "linear",
            "models": [{"uri": "file:///d/a"}, {"uri": "file:///d/b"}],
            "output": {"uri": "file:///d/out/", "dtype": "bfloat16", "max_shard_size": "2GB"}
        }))
        .unwrap();
        assert_eq!(s.recipe.models[1].weight, 1.0);
        assert_eq!(s.recipe.output.max_shard_size, 2_000_000_000);
        assert_eq!(s.recipe.output.dtype, Some(DType::BF16));
        assert_eq!(s.recipe.linear_weights(), (vec![1.0, 1.0], Some(2.0)));
    }

    #[test]
    fn errors_name_the_field() {
        let base = |models: serde_json::Value, params: serde_json::Value| {
            serde_json::json!({"method": "linear", "models": models, "parameters": params,
                               "output": {"uri": "file:///d/out"}})
        };
        let e = parse(base(
            serde_json::json!([{"uri": "file:///d/a", "weight": 1.0}, {"uri": "file:///d/b"}]),
            serde_json::json!({}),
        ))
        .unwrap_err();
        assert_eq!(field(e), "models[1].weight");
        let e = parse(base(
            serde_json::json!([{"uri": "file:///d/a"}]),
            serde_json::json!({"density": 0.5}),
        ))
        .unwrap_err();
        assert_eq!(field(e), "parameters.density");
        let e = parse(base(
            serde_json::json!([{"uri": "file:///d/a", "weight": 1.0}, {"uri": "file:///d/b", "weight": -1.0}]),
            serde_json::json!({}),
        ))
        .unwrap_err();
        assert_eq!(field(e), "models[].weight");
        let e = parse(base(
            serde_json::json!([{"uri": "file:///d/out"}]),
            serde_json::json!({}),
        ))
        .unwrap_err();
        assert_eq!(field(e), "output.uri");
        let e = parse(
            serde_json::json!({"method": "linear", "models": [{"uri": "file:///a"}],
            "output": {"uri": "file:///o"}, "extra": 1}),
        )
        .unwrap_err();
        assert!(field(e).contains("unknown field"));
        let e = parse(
            serde_json::json!({"method": "soup", "models": [{"uri": "file:///a"}],
            "output": {"uri": "file:///o"}}),
        )
        .unwrap_err();
        assert_eq!(field(e), "method");
    }

    #[test]
    fn hash_ignores_scheduling_but_not_recipe() {
        let a = parse(
            serde_json::json!({"method": "linear", "models": [{"uri": "file:///a"}],
            "output": {"uri": "file:///o"}, "idempotency_key": "k1"}),
        )
        .unwrap();
        let b = parse(
            serde_json::json!({"method": "linear", "models": [{"uri": "file:///a"}],
            "output": {"uri": "file:///o"}, "idempotency_key": "k2"}),
        )
        .unwrap();
        let c = parse(
            serde_json::json!({"method": "linear", "models": [{"uri": "file:///a", "weight": 2.0}],
            "output": {"uri": "file:///o"}}),
        )
        .unwrap();
        assert_eq!(a.recipe.hash(), b.recipe.hash());
        assert_ne!(a.recipe.hash(), c.recipe.hash());
    }

    #[test]
    fn base_model_methods_validate_every_parameter() {
        use serde_json::json;
        let req = |method: &str, models: serde_json::Value, params: serde_json::Value| {
            json!({"method": method, "base_model": "file:///d/base", "models": models,
                   "parameters": params, "output": {"uri": "file:///d/out"}})
        };
        let two = json!([{"uri": "file:///d/a", "weight": 0.5, "parameters": {"density": 0.5}},
                         {"uri": "file:///d/b", "parameters": {"weight": 0.3, "density": 0.5}}]);
        let s = parse(req("ties", two.clone(), json!({}))).unwrap();
        assert_eq!(s.recipe.base_model.as_deref(), Some("file:///d/base"));
        assert_eq!(s.recipe.models[1].weight, 0.3);
        assert!(!s.recipe.models[1].parameters.contains_key("weight"));
        assert!(matches!(
            s.recipe.parameters,
            Parameters::Gta {
                normalize: true,
                rescale: false,
                ..
            }
        ));
        // Missing base model.
        let mut r = req("ties", two.clone(), json!({}));
        r.as_object_mut().unwrap().remove("base_model");
        assert_eq!(field(parse(r).unwrap_err()), "base_model");
        // Linear takes none.
        let r = req("linear", json!([{"uri": "file:///d/a"}]), json!({}));
        assert_eq!(field(parse(r).unwrap_err()), "base_model");
        // Out-of-range density, per model and global.
        let bad = json!([{"uri": "file:///d/a", "weight": 1, "parameters": {"density": 1.5}}]);
        assert_eq!(
            field(parse(req("ties", bad, json!({}))).unwrap_err()),
            "models[0].parameters.density"
        );
        assert_eq!(
            field(
                parse(req(
                    "dare_linear",
                    two.clone(),
                    json!({"density": [0.5, 0.0]})
                ))
                .unwrap_err()
            ),
            "parameters.density"
        );
        // Unknown names, also ones another method knows.
        assert_eq!(
            field(parse(req("ties", two.clone(), json!({"gamma": 0.1}))).unwrap_err()),
            "parameters.gamma"
        );
        assert_eq!(
            field(parse(req("task_arithmetic", two.clone(), json!({"seed": 1}))).unwrap_err()),
            "parameters.seed"
        );
        let unk = json!([{"uri": "file:///d/a", "weight": 1, "parameters": {"densty": 0.5}}]);
        assert_eq!(
            field(parse(req("ties", unk, json!({}))).unwrap_err()),
            "models[0].parameters.densty"
        );
        // Selection scope: tensor (mergekit), row, or model (one density per model).
        let s = parse(req("breadcrumbs", two.clone(), json!({"scope": "row"}))).unwrap();
        assert!(matches!(
            s.recipe.parameters,
            Parameters::Gta { per_row: true, .. }
        ));
        let model = json!({"scope": "model", "density": 0.2});
        let s = parse(req("ties", two.clone(), model)).unwrap();
        assert!(matches!(
            s.recipe.parameters,
            Parameters::Gta {
                per_model: true,
                per_row: false,
                ..
            }
        ));
        let grad =
            json!([{"uri": "file:///d/a", "weight": 1, "parameters": {"density": [0.2, 0.5]}}]);
        assert_eq!(
            field(parse(req("ties", grad, json!({"scope": "model"}))).unwrap_err()),
            "models[0].parameters.density"
        );
        assert_eq!(
            field(parse(req("ties", two.clone(), json!({"scope": "global"}))).unwrap_err()),
            "parameters.scope"
        );
        assert_eq!(
            field(parse(req("dare_ties", two.clone(), json!({"scope": "model"}))).unwrap_err()),
            "parameters.scope"
        );
        assert_eq!(
            field(parse(req("dare_ties", two.clone(), json!({"scope": "row"}))).unwrap_err()),
            "parameters.scope"
        );
        // Weight required for GTA methods, unless given globally.
        let now = json!([{"uri": "file:///d/a"}]);
        assert_eq!(
            field(parse(req("task_arithmetic", now.clone(), json!({}))).unwrap_err()),
            "models[0].weight"
        );
        let s = parse(req("task_arithmetic", now, json!({"weight": 0.25}))).unwrap();
        assert_eq!(s.recipe.models[0].weight, 0.25);
        // DELLA: density ± epsilon inside (0, 1).
        let d = json!([{"uri": "file:///d/a", "weight": 1, "parameters": {"density": 0.9, "epsilon": 0.2}}]);
        assert_eq!(
            field(parse(req("della", d, json!({}))).unwrap_err()),
            "models[0].parameters.epsilon"
        );
        // Slerp: the base listed among the models is the base; exactly one other model.
        let s = parse(req(
            "slerp",
            json!([{"uri": "file:///d/base"}, {"uri": "file:///d/a"}]),
            json!({"t": [{"filter": "mlp", "value": [0, 1]}, {"value": 0.5}]}),
        ))
        .unwrap();
        assert_eq!(s.recipe.models.len(), 1);
        assert_eq!(
            field(parse(req("slerp", two.clone(), json!({"t": 0.5}))).unwrap_err()),
            "models"
        );
        assert_eq!(
            field(parse(req("slerp", json!([{"uri": "file:///d/a"}]), json!({}))).unwrap_err()),
            "parameters.t"
        );
        assert_eq!(
            field(
                parse(req(
                    "slerp",
                    json!([{"uri": "file:///d/a"}]),
                    json!({"t": [{"filter": "mlp", "value": 1}]})
                ))
                .unwrap_err()
            ),
            "parameters.t"
        );
    }

    #[test]
    fn passthrough_slices_validate() {
        use serde_json::json;
        let req = |slices: serde_json::Value| json!({"method": "passthrough", "slices": slices, "output": {"uri": "file:///d/out"}});
        let s = parse(req(json!([
            {"sources": [{"uri": "file:///d/a", "layer_range": [0, 2]}]},
            {"sources": [{"uri": "file:///d/b", "layer_range": [1, 2],
                          "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1}]}}]},
            {"sources": [{"uri": "file:///d/a/", "layer_range": [0, 1]}]}
        ])))
        .unwrap();
        assert_eq!(s.recipe.models.len(), 2);
        assert_eq!(s.recipe.slices[2].sources[0].model, 0);
        assert_eq!(s.recipe.slices[1].sources[0].layer_range, [1, 2]);
        let bad = [
            (
                req(json!([{"sources": [{"uri": "file:///d/a", "layer_range": [2, 2]}]}])),
                "slices[0].sources[0].layer_range",
            ),
            (
                req(
                    json!([{"sources": [{"uri": "file:///d/a", "layer_range": [0, 1]},
                                        {"uri": "file:///d/b", "layer_range": [0, 1]}]}]),
                ),
                "slices[0].sources",
            ),
            (
                req(
                    json!([{"sources": [{"uri": "file:///d/a", "layer_range": [0, 1],
                                         "parameters": {"weight": 1}}]}]),
                ),
                "slices[0].sources[0].parameters.weight",
            ),
            (
                json!({"method": "linear", "slices": [{"sources": [{"uri": "file:///d/a", "layer_range": [0, 1]}]}],
                       "output": {"uri": "file:///d/out"}}),
                "slices",
            ),
            (
                json!({"method": "passthrough", "models": [{"uri": "file:///d/a"}, {"uri": "file:///d/b"}],
                       "output": {"uri": "file:///d/out"}}),
                "models",
            ),
        ];
        for (r, f) in bad {
            assert_eq!(field(parse(r).unwrap_err()), f);
        }
    }

    #[test]
    fn ema_weights() {
        use serde_json::json;
        let s = parse(json!({"method": "ema",
            "models": [{"uri": "file:///d/c1"}, {"uri": "file:///d/c2"}, {"uri": "file:///d/c3"}],
            "parameters": {"decay": 0.5}, "output": {"uri": "file:///d/out"}}))
        .unwrap();
        let w: Vec<f64> = s.recipe.models.iter().map(|m| m.weight).collect();
        // e1 = c1; e2 = .5 e1 + .5 c2; e3 = .5 e2 + .5 c3 → .25 c1 + .25 c2 + .5 c3.
        assert_eq!(w, vec![0.25, 0.25, 0.5]);
        assert_eq!(s.recipe.linear_weights().1, None);
        let e = parse(
            json!({"method": "ema", "models": [{"uri": "file:///d/c1", "weight": 1}],
            "parameters": {"decay": 0.5}, "output": {"uri": "file:///d/out"}}),
        )
        .unwrap_err();
        assert_eq!(field(e), "models[].weight");
        let e = parse(json!({"method": "ema", "models": [{"uri": "file:///d/c1"}],
            "parameters": {"decay": 1.0}, "output": {"uri": "file:///d/out"}}))
        .unwrap_err();
        assert_eq!(field(e), "parameters.decay");
    }

    #[test]
    fn linear_recipe_serializes_as_before() {
        let s = parse(serde_json::json!({
            "method": "linear",
            "models": [{"uri": "file:///d/a", "weight": 2.0}],
            "output": {"uri": "file:///d/out/"}
        }))
        .unwrap();
        let v = serde_json::to_value(&s.recipe).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"method": "linear",
                "models": [{"uri": "file:///d/a", "weight": 2.0}],
                "parameters": {"method": "linear", "normalize": true},
                "output": {"uri": "file:///d/out/", "dtype": null, "max_shard_size": 5_000_000_000u64}})
        );
    }

    #[test]
    fn sizes() {
        use serde_json::json;
        assert_eq!(parse_size(&json!("2GB")), Some(2_000_000_000));
        assert_eq!(parse_size(&json!("1GiB")), Some(1 << 30));
        assert_eq!(parse_size(&json!("1.5 MB")), Some(1_500_000));
        assert_eq!(parse_size(&json!(4096)), Some(4096));
        assert_eq!(parse_size(&json!("lots")), None);
        assert_eq!(parse_size(&json!(-1)), None);
    }
}

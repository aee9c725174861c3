//! The merge request: parse, validate, and normalize into a [`Recipe`].
//!
//! Knows nothing of HTTP or the database. Unknown fields are rejected everywhere (never
//! silently ignored), and every error names the field it is about.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeRequest {
    pub method: String,
    pub models: Vec<ModelSpec>,
    #[serde(default)]
    pub parameters: serde_json::Map<String, serde_json::Value>,
    pub output: OutputSpec,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub priority: Option<i32>,
    #[serde(default)]
    pub max_attempts: Option<i32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub uri: String,
    #[serde(default)]
    pub weight: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
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
}

/// Method parameters, validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum Parameters {
    Linear {
        /// Divide by the sum of the weights.
        normalize: bool,
    },
}

/// One ingredient after validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ingredient {
    /// The URL as the client gave it (resolution and the allowed-root check happen in storage).
    pub uri: String,
    pub weight: f64,
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
    pub models: Vec<Ingredient>,
    pub parameters: Parameters,
    pub output: Output,
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
        let request: MergeRequest = serde_json::from_slice(body)
            .map_err(|e| RecipeError::Syntax(format!("invalid JSON recipe: {e}")))?;
        Self::from_request(request)
    }

    /// Validate and normalize a parsed request.
    pub fn from_request(req: MergeRequest) -> Result<Submission, RecipeError> {
        let method = match req.method.as_str() {
            "linear" => Method::Linear,
            other => {
                return Err(RecipeError::invalid(
                    "method",
                    format!("unknown merge method {other:?} (supported: linear)"),
                ));
            }
        };
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
        let any_weight = req.models.iter().any(|m| m.weight.is_some());
        let mut models = Vec::with_capacity(req.models.len());
        for (i, m) in req.models.iter().enumerate() {
            if m.uri.trim().is_empty() {
                return Err(RecipeError::invalid(
                    format!("models[{i}].uri"),
                    "must not be empty",
                ));
            }
            let weight = match m.weight {
                // The kernels compute in f32: a weight beyond its range would become infinite.
                Some(w) if !w.is_finite() || w.abs() > f64::from(f32::MAX) => {
                    return Err(RecipeError::invalid(
                        format!("models[{i}].weight"),
                        "must be a finite number within the range of f32 (|w| ≤ 3.4e38)",
                    ));
                }
                Some(w) => w,
                None if any_weight => {
                    return Err(RecipeError::invalid(
                        format!("models[{i}].weight"),
                        "give a weight for every model, or for none (a uniform soup)",
                    ));
                }
                None => 1.0,
            };
            models.push(Ingredient {
                uri: m.uri.clone(),
                weight,
            });
        }
        let parameters = match method {
            Method::Linear => parse_linear(&req.parameters, &models)?,
        };
        let output = parse_output(&req.output)?;
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
        Ok(Submission {
            recipe: Recipe {
                method,
                models,
                parameters,
                output,
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
            Parameters::Linear { normalize: true } => Some(weights.iter().sum::<f32>()),
            Parameters::Linear { normalize: false } => None,
        };
        (weights, divisor)
    }
}

fn parse_linear(
    params: &serde_json::Map<String, serde_json::Value>,
    models: &[Ingredient],
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
    if normalize {
        let sum: f32 = models.iter().map(|m| m.weight as f32).sum();
        if sum == 0.0 || !sum.is_finite() {
            return Err(RecipeError::invalid(
                "models[].weight",
                "with normalize: true the weights must not sum to zero",
            ));
        }
    }
    Ok(Parameters::Linear { normalize })
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
    let dtype = match &spec.dtype {
        None => None,
        Some(s) => {
            let d = DType::parse_user(s).filter(|d| d.is_mergeable_float());
            Some(d.ok_or_else(|| {
                RecipeError::invalid(
                    "output.dtype",
                    format!(
                        "unknown or unsupported dtype {s:?} (use float32, float16 or bfloat16)"
                    ),
                )
            })?)
        }
    };
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

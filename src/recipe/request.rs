//! The request as sent to `POST /v1/merges` and `ladle merge` (JSON, or mergekit YAML
//! translated to the same shape): wire types only, validated by [`super::validate`] (and the
//! search fields by `search::spec`, which sits above this module).

use serde::Deserialize;

use super::{RecipeError, trajectory, yaml};

/// A model reference as a request may write it (a `base_model`, a model of an analysis): a
/// URL, or an object with its `uri`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum ModelRef {
    Uri(String),
    Object(ModelRefObject),
}

/// `{"uri": …}`: the object form of a `ModelRef`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelRefObject {
    pub uri: String,
}

impl ModelRef {
    /// The URL it names.
    pub fn into_uri(self) -> String {
        match self {
            ModelRef::Uri(u) => u,
            ModelRef::Object(o) => o.uri,
        }
    }
}

/// Reads either form of an optional [`ModelRef`] into the URL it names (serde's
/// `deserialize_with`).
pub fn optional_model_ref<'de, D>(d: D) -> Result<Option<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Ok(Option::<ModelRef>::deserialize(d)?.map(ModelRef::into_uri))
}

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
    /// Layer ranges from several models, stacked (any method; see `SliceSpec`).
    #[serde(default)]
    pub slices: Vec<SliceSpec>,
    /// A training run's folder and a selection of its checkpoints, instead of `models`.
    #[serde(default)]
    pub trajectory: Option<trajectory::TrajectorySpec>,
    /// What [`trajectory::expand`] listed and picked (never read from a request body).
    #[serde(skip)]
    pub expanded_trajectory: Option<trajectory::Trajectory>,
    /// The pre-trained model the task vectors are taken against (`t = 0` end for slerp): a
    /// URL, or `{"uri": …}` like every model reference.
    #[serde(default, deserialize_with = "optional_model_ref")]
    #[schema(value_type = Option<ModelRef>)]
    pub base_model: Option<String>,
    #[serde(default)]
    pub parameters: serde_json::Map<String, serde_json::Value>,
    /// Required; absent, it is an empty URL (refused naming `output.uri`), which lets the CLI
    /// set it from `--out`.
    #[serde(default)]
    pub output: OutputSpec,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub priority: Option<i32>,
    #[serde(default)]
    pub max_attempts: Option<i32>,
    /// Scores candidates (method `greedy_soup`, sweeps; validated by `search::spec`).
    #[serde(default)]
    pub evaluator: Option<EvaluatorSpec>,
    /// Greedy soup's accept rule: `">="` (the paper, default) or `">"`.
    #[serde(default)]
    pub accept: Option<String>,
    /// Merge once per value of one parameter, keep the best-scoring soup (needs `evaluator`).
    #[serde(default)]
    pub sweep: Option<SweepSpec>,
    /// Cast every float input tensor to this dtype on load (round-to-nearest-even, as torch's
    /// `Tensor.to`), so the method computes in it: mergekit YAML's `dtype`. Integer and bool
    /// tensors are copied unchanged.
    #[serde(default)]
    pub input_dtype: Option<String>,
    /// The soup's tokenizer, built as mergekit builds it (mergekit YAML's `tokenizer_source`):
    /// `base` (the base model's, without its tokens at or beyond its `vocab_size`), `union`
    /// (the base's and every model's tokens), or a model (a URL, or a hub id: its tokenizer),
    /// every model's embedding rows permuted onto that vocabulary. When they already sit on
    /// it, the source's tokenizer files are copied as they are. Written even with
    /// `output.copy_tokenizer: false`, as mergekit writes the tokenizer a recipe names.
    #[serde(default)]
    pub tokenizer_source: Option<String>,
    /// The soup's chat template, written as `chat_template.jinja`: one of mergekit's
    /// templates by name (`alpaca`, `chatml`, `exaone`, `llama3`, `mistral`) or a Jinja
    /// template (mergekit YAML's `chat_template`).
    #[serde(default)]
    pub chat_template: Option<String>,
    /// A tokenizer built for the soup (mergekit YAML's `tokenizer` section, and
    /// `tokenizer_source: union`): `{"source": "union" | "base" | <model>, "tokens": {<token>:
    /// {"source": <model> | {"kind": "zero"} | {"kind": "model_token", "model": …, "token" |
    /// "token_id": …}, "force": bool}}, "pad_to_multiple_of": n}`; `tokens` may be a list of
    /// `{"token": …, …}` entries to keep their order (the ids of new tokens follow it).
    #[serde(default)]
    pub tokenizer: Option<serde_json::Value>,
    /// The text of a mergekit YAML request, as sent (never read from a JSON body): what the
    /// soup's `mergekit_config.yml` holds ([`super::mergekit_config`]).
    #[serde(skip)]
    pub yaml_source: Option<String>,
    /// Signed webhooks on this job's state changes (validated by `webhooks`, stored apart from
    /// the recipe; over HTTP only: `ladle merge` refuses it).
    #[serde(default)]
    pub notify: Option<crate::webhooks::NotifySpec>,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub uri: String,
    /// A PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`) to
    /// fold into this model: the ingredient is `W + s·B·A` (mergekit's `model+lora`).
    #[serde(default)]
    pub lora: Option<String>,
    #[serde(default)]
    pub weight: Option<f64>,
    /// A known score of this model alone (method `greedy_soup`; evaluated when absent).
    #[serde(default)]
    pub score: Option<f64>,
    /// Per-model parameters (`density`, `gamma`, `epsilon`, `weight` as a gradient or filters).
    #[serde(default)]
    pub parameters: serde_json::Map<String, serde_json::Value>,
}

impl ModelSpec {
    /// A model given by its URL only.
    pub fn uri(uri: String) -> ModelSpec {
        ModelSpec {
            uri,
            lora: None,
            weight: None,
            score: None,
            parameters: serde_json::Map::new(),
        }
    }
}

/// One output slice: layers `layer_range` of its sources (passthrough: one source, copied;
/// any other method: the sources merged layer by layer, all with the same number of layers).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SliceSpec {
    pub sources: Vec<SliceSourceSpec>,
    /// This slice's base model (one of its sources); default: the recipe's `base_model`.
    #[serde(default, deserialize_with = "optional_model_ref")]
    #[schema(value_type = Option<ModelRef>)]
    pub base_model: Option<String>,
    /// Parameters for this slice, before the recipe's (a source's own come first).
    #[serde(default)]
    pub parameters: serde_json::Map<String, serde_json::Value>,
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

/// `evaluator` as sent.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EvaluatorSpec {
    pub url: String,
    #[serde(default)]
    pub timeout_s: Option<f64>,
    #[serde(default)]
    pub max_evaluations: Option<u32>,
}

/// `sweep` as sent.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    pub parameter: String,
    pub values: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    pub uri: String,
    #[serde(default)]
    pub dtype: Option<String>,
    /// `"2GB"`, `"500MB"`, `"1GiB"` or a number of bytes.
    #[serde(default)]
    pub max_shard_size: Option<serde_json::Value>,
    /// Write into a folder that holds files no ladle manifest claims (refused otherwise with
    /// `output_not_empty`). Those files are never deleted or replaced: a name ladle needs that
    /// is taken fails the job with `output_conflict`.
    #[serde(default)]
    pub overwrite: bool,
    /// Copy the tokenizer files of the donor (the base model, else the first model) into the
    /// output, as mergekit's `--copy-tokenizer` [default: true].
    #[serde(default)]
    pub copy_tokenizer: Option<bool>,
    /// Write the model card `README.md` and `mergekit_config.yml`, as mergekit's
    /// `--write-model-card` [default: true].
    #[serde(default)]
    pub write_model_card: Option<bool>,
}

impl MergeRequest {
    /// A JSON body as a request, not validated yet (a trajectory is expanded in between).
    pub fn from_json(body: &[u8]) -> Result<MergeRequest, RecipeError> {
        serde_json::from_slice(body)
            .map_err(|e| RecipeError::Syntax(format!("invalid JSON recipe: {e}")))
    }

    /// A mergekit YAML recipe as a request, not validated yet. `base_dir` (the recipe file's
    /// folder) resolves relative model paths; without it only storage URLs are accepted. An
    /// `output` mapping (ladle's extension) gives the output.
    pub fn from_yaml(
        text: &str,
        base_dir: Option<&std::path::Path>,
    ) -> Result<MergeRequest, RecipeError> {
        let doc = yaml::parse(text)?;
        let req = yaml::to_request(&doc, base_dir)?;
        let mut req: MergeRequest = serde_json::from_value(req)
            .map_err(|e| RecipeError::Syntax(format!("invalid YAML recipe: {e}")))?;
        req.yaml_source = Some(text.to_string());
        Ok(req)
    }

    /// Every model URL of the request (models and their adapters, base model, tokenizer
    /// source, the tokenizer section's models, trajectory folder, slice sources),
    /// for the CLI to make relative paths absolute.
    pub fn uris_mut(&mut self) -> impl Iterator<Item = &mut String> {
        self.models
            .iter_mut()
            .flat_map(|m| std::iter::once(&mut m.uri).chain(m.lora.iter_mut()))
            .chain(self.base_model.iter_mut())
            .chain(
                self.tokenizer_source
                    .iter_mut()
                    .filter(|s| !matches!(s.as_str(), "base" | "union")),
            )
            .chain(self.tokenizer.iter_mut().flat_map(tokenizer_uris))
            .chain(self.trajectory.iter_mut().map(|t| &mut t.uri))
            .chain(self.slices.iter_mut().flat_map(|s| {
                s.sources
                    .iter_mut()
                    .map(|src| &mut src.uri)
                    .chain(s.base_model.iter_mut())
            }))
    }
}

/// The model references of a request's `tokenizer` object: its `source` (unless `union` or
/// `base`) and each token's `source` (a model, or the `model` of a `model_token`).
fn tokenizer_uris(t: &mut serde_json::Value) -> Vec<&mut String> {
    use serde_json::Value;
    let Some(obj) = t.as_object_mut() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (key, value) in obj.iter_mut() {
        match value {
            Value::String(s) if key == "source" && !matches!(s.as_str(), "union" | "base") => {
                out.push(s)
            }
            Value::Array(items) if key == "tokens" => {
                out.extend(
                    items
                        .iter_mut()
                        .filter_map(|e| token_uri(e.get_mut("source")?)),
                );
            }
            Value::Object(m) if key == "tokens" => {
                out.extend(
                    m.values_mut()
                        .filter_map(|e| token_uri(e.get_mut("source")?)),
                );
            }
            _ => {}
        }
    }
    out
}

fn token_uri(source: &mut serde_json::Value) -> Option<&mut String> {
    match source {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Object(o) => match o.get_mut("model")? {
            serde_json::Value::String(s) => Some(s),
            _ => None,
        },
        _ => None,
    }
}

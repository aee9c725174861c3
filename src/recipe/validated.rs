//! The validated, normalized recipe: one merge, what a manifest records (a job stores it with
//! the search around it, if any: `search::spec::JobSpec`). Its JSON form is the stored
//! contract (jobs in the database, manifests, the idempotency hash): field names and order do
//! not change.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::trajectory;
use crate::merge::DType;
use crate::methods::linear::LinearConfig;
use crate::methods::sparse_soup::SparseSoupConfig;
use crate::methods::{KernelInput, Method, ModelInput, Parameters, Setting};

/// A validated slice source: `model` indexes the engine's inputs (the base model first when
/// the recipe has one, then [`Recipe::models`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SliceSource {
    pub model: usize,
    pub layer_range: [u64; 2],
    /// Per-model parameters: passthrough's `scale`; for a merged slice, the method's per-model
    /// parameters other than a scalar weight (the slice's and the recipe's chained in).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, Setting>,
    /// A merged slice's source other than its base: its scalar weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
}

/// One output slice (see `recipe::slices`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Slice {
    pub sources: Vec<SliceSource>,
    /// A merged slice: which of its sources is its base model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<usize>,
    /// A merged slice: the method's parameters for it (the slice's chained over the
    /// recipe's); `None` for passthrough.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Parameters>,
}

/// One ingredient after validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ingredient {
    /// The URL as the client gave it (resolution and the allowed-root check happen in storage).
    pub uri: String,
    /// A PEFT LoRA adapter folded into the model (its URL, as given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<String>,
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
    /// Write beside files no ladle manifest claims (never over them).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub overwrite: bool,
    /// Copy the donor's tokenizer files (mergekit's `--copy-tokenizer`).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub copy_tokenizer: bool,
    /// Write `README.md` (the model card) and `mergekit_config.yml`.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub write_model_card: bool,
    /// The model whose tokenizer files are written instead of the donor's (its URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_source: Option<String>,
    /// The chat template written as `chat_template.jinja` (the text a name stands for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// A tokenizer built for the soup, the embedding rows permuted onto its vocabulary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<super::tokenizer::TokenizerSpec>,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
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
    /// The output's layer stack (empty: the models' layers, merged or, for passthrough, the
    /// one model's). With a method other than passthrough, `models` are the sources' models
    /// and `parameters` the first slice's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slices: Vec<Slice>,
    pub parameters: Parameters,
    pub output: Output,
    /// The trajectory `models` was expanded from (the selection and what it picked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trajectory: Option<trajectory::Trajectory>,
    /// The dtype every float input is cast to on load (see
    /// [`super::MergeRequest::input_dtype`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_dtype: Option<DType>,
    /// The recipe as mergekit YAML ([`super::mergekit_config`]): the soup's
    /// `mergekit_config.yml`, quoted by its model card. `None` for a search's merges and for
    /// recipes stored before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mergekit_config: Option<String>,
}

/// Scheduling options that travel beside the recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    pub recipe: Recipe,
    pub idempotency_key: Option<String>,
    pub priority: i32,
    pub max_attempts: Option<i32>,
}

impl Recipe {
    /// SHA-256 of the canonical JSON form: two requests with the same hash ask for the same
    /// merge (used to detect an idempotency key reused with another body, and a soup already
    /// published). `mergekit_config` is left out: it is how the recipe was written (a YAML
    /// file's text, or a JSON request's rendering, defaults spelled out or not), not what is
    /// merged; without it the hash is the one recipes had before the field existed.
    pub fn hash(&self) -> Vec<u8> {
        let json = if self.mergekit_config.is_some() {
            let mut merge = self.clone();
            merge.mergekit_config = None;
            serde_json::to_vec(&merge)
        } else {
            serde_json::to_vec(self)
        };
        Sha256::digest(json.unwrap_or_default()).to_vec()
    }

    /// Linear weights as the kernel uses them, and the divisor when normalizing (for the
    /// linear family; other methods get their weights and no divisor).
    pub fn linear_weights(&self) -> (Vec<f32>, Option<f32>) {
        let weights: Vec<f32> = self.models.iter().map(|m| m.weight as f32).collect();
        let normalize = self.parameters.get::<LinearConfig>().map(|c| c.normalize) == Some(true)
            || self
                .parameters
                .get::<SparseSoupConfig>()
                .map(|c| c.normalize)
                == Some(true);
        let divisor = normalize.then(|| weights.iter().sum::<f32>());
        (weights, divisor)
    }

    /// What the method's kernel is built from.
    pub fn kernel_input(&self, num_layers: usize) -> KernelInput<'_> {
        KernelInput {
            models: self
                .models
                .iter()
                .map(|m| ModelInput {
                    weight: m.weight,
                    parameters: &m.parameters,
                })
                .collect(),
            has_base: self.base_model.is_some(),
            num_layers,
        }
    }
}

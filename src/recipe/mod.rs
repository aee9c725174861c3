//! The merge request: parse, validate, and normalize into a [`Recipe`].
//!
//! Knows nothing of HTTP or the database. Unknown fields are rejected everywhere (never
//! silently ignored), and every error names the field it is about. One concern per file:
//!
//! - [`request`]: the wire types ([`MergeRequest`], JSON or translated mergekit YAML, [`yaml`]);
//! - [`validated`]: the validated [`Recipe`] a job stores and a worker runs;
//! - [`validate`]: [`Recipe::from_request`], a short list of named steps (each method's own
//!   parameters are parsed by the method, [`crate::methods`]);
//! - [`output`]: the output folder, dtype and shard size;
//! - [`trajectory`]: a training run's folder instead of `models`;
//! - `slices`: the output's layer stack (`slices`), with any method;
//! - [`tokenizer`]: `tokenizer_source`, the `tokenizer` section and `chat_template` (mergekit's
//!   built-in templates, `auto`); `yaml_tokenizer`: their YAML form;
//! - [`error`](mod@error): [`RecipeError`].

pub mod error;
pub mod mergekit_config;
pub mod output;
pub mod request;
mod slices;
pub mod tokenizer;
pub mod trajectory;
pub mod validate;
pub mod validated;
pub mod yaml;
mod yaml_tokenizer;

pub use error::RecipeError;
pub use output::{DEFAULT_MAX_SHARD_SIZE, MIN_SHARD_SIZE, parse_size, same_or_nested};
pub use request::{
    EvaluatorSpec, MergeRequest, ModelSpec, OutputSpec, SliceSourceSpec, SliceSpec, SweepSpec,
};
pub use validated::{Ingredient, Output, Recipe, Slice, SliceSource, Submission};

pub use crate::methods::setting::{FilterRule, Setting, Value, depth, layer_index};
pub use crate::methods::{BaseRule, Method, Parameters};

/// Most ingredients a recipe may name.
pub const MAX_MODELS: usize = 128;
pub const MAX_ATTEMPTS_LIMIT: i32 = 20;
/// Most layers a slice list may produce.
pub const MAX_SLICE_LAYERS: u64 = 100_000;

#[cfg(test)]
mod tests;

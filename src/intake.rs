//! The one intake path of a merge request, shared by `POST /v1/merges` and `ladle merge`:
//! parse (JSON, or mergekit YAML) → expand a trajectory (listing its folder) → validate
//! ([`crate::search::spec::from_request`]: the search, and the merge with
//! `Recipe::from_request`) → resolve and check every URL under the allowed roots → check the
//! evaluator's host → hash.
//!
//! The recipe is kept, stored and run as written: a URL reached through a symbolic link inside
//! an allowed root, or a hub id (which names a cache snapshot), is shown as the request spelled
//! it in the stored job, the manifest, events and messages. The resolved places serve only
//! for the checks (the output apart from its inputs, the output rules) and as the output's
//! key, [`Accepted::output_key`], which keeps one queued or running job per output folder
//! however it is spelled. A worker resolves the URLs again when the job runs, under the same
//! rules, and reaches every file by handle from its root (`storage::local`).

use std::path::Path;

use crate::error::ErrorCode;
use crate::recipe::trajectory::{self, TrajectoryError};
use crate::recipe::{MergeRequest, RecipeError, output};
use crate::search::evaluator::AllowedHosts;
use crate::search::spec::{self, JobSubmission};
use crate::storage::{Storage, StorageError};

/// A request body's format (over HTTP, from its content type: `api::media`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    /// mergekit YAML (with ladle's `output` mapping).
    Yaml,
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error(transparent)]
    Trajectory(#[from] TrajectoryError),
    /// The output breaks an output rule (data directory, foreign files).
    #[error(transparent)]
    Output(crate::engine::EngineError),
    /// A URL refused by storage (`field` names it).
    #[error("{field}: {source}")]
    Storage {
        field: String,
        #[source]
        source: StorageError,
    },
}

impl IntakeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            IntakeError::Recipe(e) => e.code(),
            IntakeError::Trajectory(e) => e.code(),
            IntakeError::Storage { source, .. } => source.code(),
            IntakeError::Output(e) => e.code(),
        }
    }

    /// The request field at fault, when one is.
    pub fn field(&self) -> Option<&str> {
        match self {
            IntakeError::Recipe(e) | IntakeError::Trajectory(TrajectoryError::Recipe(e)) => {
                e.field()
            }
            IntakeError::Trajectory(TrajectoryError::Storage(_)) => Some("trajectory.uri"),
            IntakeError::Storage { field, .. } => Some(field),
            IntakeError::Output(_) => Some("output.uri"),
        }
    }
}

/// A validated, checked submission.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub submission: JobSubmission,
    /// The output folder's resolved URL, links followed (what the queue keeps unique among
    /// live jobs); never shown: messages name `output.uri` as written.
    pub output_key: String,
    /// [`spec::JobSpec::hash`] of the job as it will be stored.
    pub hash: Vec<u8>,
}

/// Parse a body into a request, not validated yet. `base_dir` (the recipe file's folder)
/// resolves a YAML recipe's relative model paths; over HTTP there is none, and model
/// references are storage URLs or hub ids (resolved by storage from its Hugging Face cache).
pub fn parse(
    body: &[u8],
    format: Format,
    base_dir: Option<&Path>,
) -> Result<MergeRequest, RecipeError> {
    match format {
        Format::Json => MergeRequest::from_json(body),
        Format::Yaml => {
            let text = std::str::from_utf8(body)
                .map_err(|_| RecipeError::Syntax("a YAML recipe must be UTF-8".into()))?;
            MergeRequest::from_yaml(text, base_dir)
        }
    }
}

/// Everything after parsing: expand, validate, resolve and check, hash.
/// `data_dir`: the service's data directory, which no output may be or lie in (the CLI has
/// none).
pub async fn accept(
    storage: &Storage,
    evaluator_hosts: &AllowedHosts,
    data_dir: Option<&Path>,
    mut req: MergeRequest,
) -> Result<Accepted, IntakeError> {
    // A trajectory becomes explicit models now, so the stored recipe names what is merged.
    trajectory::expand(storage, &mut req).await?;
    let submission = spec::from_request(req)?;
    let job = &submission.job;
    let recipe = &job.recipe;
    // Every URL must resolve under an allowed root; the resolved URL is for the checks only.
    let resolve = |field: String, uri: &str| {
        storage
            .resolve(uri)
            .map(|loc| (field.clone(), loc.canonical))
            .map_err(|source| IntakeError::Storage { field, source })
    };
    // Resolved in request order (the first refusal names the first field at fault) ...
    let mut models = Vec::with_capacity(recipe.models.len());
    let mut loras = Vec::new();
    for (i, m) in recipe.models.iter().enumerate() {
        models.push(resolve(format!("models[{i}].uri"), &m.uri)?);
        if let Some(l) = m.lora.as_deref() {
            loras.push(resolve(format!("models[{i}].lora"), l)?);
        }
    }
    let base = recipe
        .base_model
        .as_deref()
        .map(|b| resolve("base_model".into(), b))
        .transpose()?;
    // `tokenizer_source: base` names no model of its own.
    let tokenizer = recipe
        .output
        .tokenizer_source
        .as_deref()
        .filter(|t| *t != crate::recipe::tokenizer::BASE)
        .map(|t| resolve("tokenizer_source".into(), t))
        .transpose()?;
    // A built tokenizer's models (its source, the tokens' sources).
    let mut tokenizer_models = Vec::new();
    if let Some(mut t) = recipe.output.tokenizer.clone() {
        for u in t.uris_mut() {
            tokenizer_models.push(resolve("tokenizer".into(), u)?);
        }
    }
    // ... and checked against the output, the base model first.
    let inputs: Vec<(String, String)> = base
        .into_iter()
        .chain(models)
        .chain(loras)
        .chain(tokenizer)
        .chain(tokenizer_models)
        .collect();
    // An output is written, so it is a storage URL; `org/name` is not read as a hub id here.
    let output_key = storage
        .resolve_storage(&recipe.output.uri)
        .map(|loc| loc.canonical)
        .map_err(|source| IntakeError::Storage {
            field: "output.uri".into(),
            source,
        })?;
    if let Some(search) = &job.search {
        evaluator_hosts
            .check(&search.evaluator().url)
            .map_err(|e| RecipeError::invalid("evaluator.url", e.to_string()))?;
    }
    // Checked on the raw URLs by validation, again on the resolved ones (symlinks, spellings).
    output::check_apart(
        &output_key,
        inputs.iter().map(|(f, u)| (f.clone(), u.as_str())),
    )?;
    crate::engine::output_rules::check(
        storage,
        &recipe.output.uri,
        recipe.output.overwrite,
        data_dir,
    )
    .await
    .map_err(IntakeError::Output)?;
    let hash = job.hash();
    Ok(Accepted {
        submission,
        output_key,
        hash,
    })
}

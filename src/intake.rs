//! The one intake path of a merge request, shared by `POST /v1/merges` and `ladle merge`:
//! parse (JSON, or mergekit YAML) → expand a trajectory (listing its folder) → validate
//! ([`crate::search::spec::from_request`]: the search, and the merge with
//! `Recipe::from_request`) → resolve and check every URL under the allowed roots → check the
//! evaluator's host → hash.
//!
//! The API stores the resolved URLs (the job reads exactly what was checked); the CLI checks
//! them the same way but runs the recipe as written, so its manifest records the user's URLs
//! ([`Urls`]).

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

/// What intake does with the URLs it resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urls {
    /// Store the normalized URLs (the API: the stored job names what was checked).
    Normalize,
    /// Only check them (the CLI: the recipe runs, and is recorded, as written).
    Check,
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
    /// The output folder's resolved URL (what the queue keeps unique among live jobs).
    pub output_url: String,
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
    urls: Urls,
    data_dir: Option<&Path>,
    mut req: MergeRequest,
) -> Result<Accepted, IntakeError> {
    // A trajectory becomes explicit models now, so the stored recipe names what is merged.
    trajectory::expand(storage, &mut req).await?;
    let mut submission = spec::from_request(req)?;
    let job = &mut submission.job;
    let recipe = &mut job.recipe;
    // Every URL must resolve under an allowed root.
    let resolve = |field: String, uri: &str| {
        storage
            .resolve(uri)
            .map(|loc| loc.url)
            .map_err(|source| IntakeError::Storage { field, source })
    };
    let mut models = Vec::with_capacity(recipe.models.len());
    let mut loras = Vec::with_capacity(recipe.models.len());
    for (i, m) in recipe.models.iter().enumerate() {
        models.push(resolve(format!("models[{i}].uri"), &m.uri)?);
        loras.push(
            m.lora
                .as_deref()
                .map(|l| resolve(format!("models[{i}].lora"), l))
                .transpose()?,
        );
    }
    let base = recipe
        .base_model
        .as_deref()
        .map(|b| resolve("base_model".into(), b))
        .transpose()?;
    let tokenizer = recipe
        .output
        .tokenizer_source
        .as_deref()
        .map(|t| resolve("tokenizer_source".into(), t))
        .transpose()?;
    // A built tokenizer's models (its source, the tokens' sources).
    let tokenizer_models = recipe
        .output
        .tokenizer
        .as_mut()
        .map(|t| {
            t.uris_mut()
                .map(|u| resolve("tokenizer".into(), u))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?
        .unwrap_or_default();
    // An output is written, so it is a storage URL; `org/name` is not read as a hub id here.
    let output_url = storage
        .resolve_storage(&recipe.output.uri)
        .map(|loc| loc.url)
        .map_err(|source| IntakeError::Storage {
            field: "output.uri".into(),
            source,
        })?;
    if let Some(search) = &job.search {
        evaluator_hosts
            .check(&search.evaluator().url)
            .map_err(|e| RecipeError::invalid("evaluator.url", e.to_string()))?;
    }
    // Checked on the raw URLs by validation, again on the resolved ones (symlinks, `..`).
    let inputs = base
        .iter()
        .map(|b| ("base_model".to_string(), b.as_str()))
        .chain(
            models
                .iter()
                .enumerate()
                .map(|(i, u)| (format!("models[{i}].uri"), u.as_str())),
        )
        .chain(
            loras
                .iter()
                .enumerate()
                .filter_map(|(i, l)| l.as_deref().map(|l| (format!("models[{i}].lora"), l))),
        )
        .chain(
            tokenizer
                .as_deref()
                .map(|t| ("tokenizer_source".to_string(), t)),
        )
        .chain(
            tokenizer_models
                .iter()
                .map(|t| ("tokenizer".to_string(), t.as_str())),
        );
    output::check_apart(&output_url, inputs)?;
    crate::engine::output_rules::check(storage, &output_url, recipe.output.overwrite, data_dir)
        .await
        .map_err(IntakeError::Output)?;
    if urls == Urls::Normalize {
        for ((m, url), lora) in recipe.models.iter_mut().zip(models).zip(loras) {
            m.uri = url;
            m.lora = lora;
        }
        recipe.base_model = base;
        recipe.output.tokenizer_source = tokenizer;
        if let Some(t) = recipe.output.tokenizer.as_mut() {
            for (u, resolved) in t.uris_mut().zip(tokenizer_models) {
                *u = resolved;
            }
        }
        recipe.output.uri = output_url.clone();
    }
    let hash = job.hash();
    Ok(Accepted {
        submission,
        output_url,
        hash,
    })
}

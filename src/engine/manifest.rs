//! `ladle-manifest.json`: written last, create-if-absent; its presence means the soup is
//! complete. It records the recipe, the inputs and every output file with its SHA-256.

use std::time::Instant;

use bytes::Bytes;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use super::{EngineError, Plan};
use crate::recipe::Recipe;
use crate::storage::Location;

pub const MANIFEST_NAME: &str = "ladle-manifest.json";
pub(super) const FORMAT: &str = "ladle.manifest/v1";
/// A manifest larger than this is not ours.
const MAX_MANIFEST_BYTES: usize = 64 << 20;

/// One output file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Relative to the output folder.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputFile {
    pub path: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputRecord {
    pub uri: String,
    pub tensors: usize,
    pub files: Vec<InputFile>,
    /// The LoRA adapter folded into this input: its URL, ranks and scalings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub ladle_version: String,
    pub recipe: serde_json::Value,
    pub recipe_sha256: String,
    pub inputs: Vec<InputRecord>,
    pub tensors: usize,
    pub files: Vec<OutputFile>,
    /// Job id and attempt when run by a worker; null for the CLI.
    pub run: serde_json::Value,
    /// Sparse soups: per-tensor and total output sparsity, tensors without a shared mask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparsity: Option<serde_json::Value>,
    /// Greedy soup: the request, every evaluation with its score, the accepted models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<serde_json::Value>,
    /// Non-finite output values (NaN, ±inf): `total`, and per tensor for those with any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonfinite: Option<serde_json::Value>,
    pub elapsed_s: f64,
}

impl Manifest {
    pub(super) fn new(
        recipe: &Recipe,
        plan: &Plan,
        files: Vec<OutputFile>,
        started: Instant,
        run: &serde_json::Value,
    ) -> Self {
        Manifest {
            format: FORMAT.into(),
            ladle_version: env!("CARGO_PKG_VERSION").into(),
            recipe: serde_json::to_value(recipe).unwrap_or(serde_json::Value::Null),
            recipe_sha256: plan.recipe_sha256.clone(),
            inputs: plan
                .inputs
                .iter()
                .map(|(loc, c)| InputRecord {
                    uri: loc.url.clone(),
                    tensors: c.tensors.len(),
                    files: c
                        .files
                        .iter()
                        .map(|f| InputFile {
                            path: f.path.to_string(),
                            size: f.size,
                        })
                        .collect(),
                    lora: c.lora.as_deref().map(super::fold::describe),
                })
                .collect(),
            tensors: plan.ops.len(),
            files,
            run: run.clone(),
            sparsity: plan.kernel.sparsity_report(),
            search: None,
            nonfinite: Some(plan.nonfinite_report()),
            elapsed_s: started.elapsed().as_secs_f64(),
        }
    }
}

/// The manifest at `folder`, if any.
pub(super) async fn read(folder: &Location) -> Result<Option<Manifest>, EngineError> {
    let loc = folder.child(MANIFEST_NAME);
    let got = match loc.store.get(&loc.path).await {
        Ok(g) => g,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => {
            return Err(EngineError::ObjectStore {
                context: format!("reading {}", loc.url),
                source: e,
            });
        }
    };
    if got.meta.size > MAX_MANIFEST_BYTES as u64 {
        return Err(EngineError::OutputConflict(format!(
            "{} exists and is not a ladle manifest",
            loc.url
        )));
    }
    let bytes = got
        .bytes()
        .await
        .map_err(EngineError::store("reading the manifest"))?;
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        EngineError::OutputConflict(format!(
            "{} exists and is not a ladle manifest: {e}",
            loc.url
        ))
    })
}

/// Every file the manifest lists is present with its size.
pub(super) async fn verify_files(folder: &Location, m: &Manifest) -> Result<(), EngineError> {
    for f in &m.files {
        let loc = folder.child(&f.path);
        match loc.store.head(&loc.path).await {
            Ok(meta) if meta.size == f.size => {}
            Ok(meta) => {
                return Err(EngineError::OutputConflict(format!(
                    "{} is {} bytes but the manifest says {}",
                    loc.url, meta.size, f.size
                )));
            }
            Err(e) => {
                return Err(EngineError::OutputConflict(format!(
                    "{} is listed in the manifest but cannot be read: {e}",
                    loc.url
                )));
            }
        }
    }
    Ok(())
}

/// Write the manifest if absent. If another run of the same recipe already published the
/// same files, that is success; anything else is a conflict.
pub(super) async fn publish(folder: &Location, m: &Manifest) -> Result<(), EngineError> {
    let loc = folder.child(MANIFEST_NAME);
    let body = serde_json::to_vec_pretty(m)
        .map_err(|e| EngineError::Internal(format!("serializing the manifest: {e}")))?;
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    match loc
        .store
        .put_opts(&loc.path, PutPayload::from_bytes(Bytes::from(body)), opts)
        .await
    {
        Ok(_) => Ok(()),
        Err(object_store::Error::AlreadyExists { .. }) => match read(folder).await? {
            Some(existing)
                if existing.recipe_sha256 == m.recipe_sha256 && existing.files == m.files =>
            {
                Ok(())
            }
            _ => Err(EngineError::OutputConflict(format!(
                "{} was published by another run with different contents",
                loc.url
            ))),
        },
        Err(e) => Err(EngineError::ObjectStore {
            context: format!("writing {}", loc.url),
            source: e,
        }),
    }
}

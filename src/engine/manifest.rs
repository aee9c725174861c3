//! `ladle-manifest.json`: written last, create-if-absent (see [`super::publish`]); its presence
//! means the soup is complete. It records the recipe, the inputs (each file with its identity
//! at plan time) and every output file with its SHA-256.

use std::time::Instant;

use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};

use super::{EngineError, Plan};
use crate::checkpoint::Checkpoint;
use crate::checkpoint::adapter::Attached;
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
    /// The file's path as the job names it ([`crate::checkpoint::CheckpointFile::name`]),
    /// without scheme and bucket: a `file://` URL's path without its leading `/`, an `s3://`
    /// URL's key, a hub id and the file's path in the snapshot (`org/name@v2/config.json`).
    pub path: String,
    pub size: u64,
    /// The store's ETag when the merge was planned (S3: what reads were conditional on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// The modification time when the merge was planned (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime: Option<String>,
    /// A local file's inode (and device) when it was opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inode: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<u64>,
}

impl InputFile {
    /// What the merge was planned with: path, size and the identity the reads were checked against.
    pub(super) fn of(f: &crate::checkpoint::CheckpointFile) -> Self {
        InputFile {
            path: store_path(&f.name),
            size: f.size,
            etag: f.etag.clone(),
            mtime: f
                .modified
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)),
            inode: f.local.as_ref().map(|l| l.identity().ino),
            device: f.local.as_ref().map(|l| l.identity().dev),
        }
    }
}

/// A file's name as the job names it (a URL, or a hub id and a path) as an [`InputFile::path`].
fn store_path(name: &str) -> String {
    match url::Url::parse(name) {
        Ok(url) if matches!(url.scheme(), "file" | "s3" | "s3a") => {
            url.path().trim_start_matches('/').to_string()
        }
        _ => name.to_string(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputRecord {
    /// The input as the recipe names it.
    pub uri: String,
    /// For a Hugging Face hub id (`org/name[@revision]`), the commit of the cache snapshot read
    /// (a branch or tag resolves when the job runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    pub tensors: usize,
    pub files: Vec<InputFile>,
    /// The LoRA adapter folded into this input: its URL, ranks and scalings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<serde_json::Value>,
}

impl InputRecord {
    /// A checkpoint read from `loc` (with the adapter folded into it, if any).
    pub(super) fn of(loc: &Location, ckpt: &Checkpoint) -> Self {
        InputRecord {
            uri: loc.url.clone(),
            commit: crate::storage::hf_cache::commit_of(loc).map(str::to_string),
            tensors: ckpt.tensors.len(),
            files: ckpt.files.iter().map(InputFile::of).collect(),
            lora: ckpt.lora.as_deref().map(super::fold::describe),
        }
    }

    /// An adapter read as an input of its own (an adapter-level merge).
    pub(super) fn of_adapter(att: &Attached) -> Self {
        InputRecord {
            uri: att.url.clone(),
            commit: None,
            tensors: att.file.tensors.len(),
            files: att.file.files.iter().map(InputFile::of).collect(),
            lora: Some(super::fold::describe(att)),
        }
    }
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
                .map(|(loc, c)| InputRecord::of(loc, c))
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

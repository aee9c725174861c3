//! Reading input tensor bytes: through the file held open for the job when local, else with
//! ranged GETs carrying the ETag recorded at plan time (moved out of `engine/mod.rs`).

use bytes::Bytes;

use super::{EngineError, fold};
use crate::checkpoint::{Checkpoint, CheckpointError, LocalReadError, TensorLoc};
use crate::merge::DType;
use crate::storage::{Location, StorageError};

/// Read elements `elems` of tensor `name` of one input: through the file held open for the job
/// when the input is local (mapped, no copy), else with a ranged GET. A short file or object is
/// a malformed checkpoint.
pub(super) async fn read_elems(
    loc: &Location,
    ckpt: &Checkpoint,
    name: &str,
    elems: std::ops::Range<u64>,
) -> Result<(DType, Bytes), EngineError> {
    // Embedding rows permuted onto a tokenizer built for the soup.
    if let Some(p) = &ckpt.permuted
        && p.table.dtypes.contains_key(name)
    {
        return super::permuted_read::read(p, name, elems).await;
    }
    match &ckpt.lora {
        // A model with an adapter folded in reads as the fold.
        Some(att) => fold::read(loc, ckpt, att, name, elems).await,
        None => read_stored(loc.store.as_ref(), &loc.url, ckpt, name, elems).await,
    }
}

/// The header entry of tensor `name` of `ckpt` (planned, so its absence is a bug; `url` names
/// the checkpoint).
pub(super) fn tensor_entry<'a>(
    ckpt: &'a Checkpoint,
    name: &str,
    url: &str,
) -> Result<&'a TensorLoc, EngineError> {
    ckpt.tensors
        .get(name)
        .ok_or_else(|| EngineError::Internal(format!("tensor {name} missing from {url}")))
}

/// [`read_elems`] of the stored bytes (`url` names the checkpoint in messages).
pub(super) async fn read_stored(
    store: &dyn object_store::ObjectStore,
    url: &str,
    ckpt: &Checkpoint,
    name: &str,
    elems: std::ops::Range<u64>,
) -> Result<(DType, Bytes), EngineError> {
    let t = tensor_entry(ckpt, name, url)?;
    let size = t.dtype.size_bytes() as u64;
    let range = t.start + elems.start * size..t.start + elems.end * size;
    let file = &ckpt.files[t.file];
    if let Some(local) = &file.local {
        let local = local.clone();
        let read = range.clone();
        let bytes = tokio::task::spawn_blocking(move || local.read(read))
            .await
            .map_err(|e| EngineError::Internal(format!("read task failed: {e}")))?
            .map_err(|e| local_read_error(e, &file.name, name))?;
        crate::metrics::bytes_read(bytes.len() as u64);
        return Ok((t.dtype, bytes));
    }
    // `If-Match` on the ETag recorded at plan time: a replaced object is never read.
    let opts = object_store::GetOptions {
        range: Some(object_store::GetRange::Bounded(range.clone())),
        if_match: file.etag.clone(),
        ..Default::default()
    };
    let fetched = async { store.get_opts(&file.path, opts).await?.bytes().await }.await;
    let bytes = match fetched {
        Ok(b) => b,
        Err(object_store::Error::Precondition { .. }) => {
            return Err(EngineError::from(CheckpointError::Changed {
                file: file.name.clone(),
                what: "its ETag is no longer the one the merge was planned with".into(),
            }));
        }
        Err(e) => return Err(read_error(e, &file.name, name, &range)),
    };
    if bytes.len() as u64 != range.end - range.start {
        return Err(EngineError::from(CheckpointError::Malformed {
            file: file.name.clone(),
            reason: format!(
                "tensor {name}: expected {} bytes, the object returned {} (truncated?)",
                range.end - range.start,
                bytes.len()
            ),
        }));
    }
    crate::metrics::bytes_read(bytes.len() as u64);
    Ok((t.dtype, bytes))
}

/// Every input file is still what the plan recorded (see [`crate::checkpoint::identity`]).
pub(super) async fn check_inputs(inputs: &[(Location, Checkpoint)]) -> Result<(), EngineError> {
    for (loc, ckpt) in inputs {
        for file in &ckpt.files {
            crate::checkpoint::identity::check_unchanged(loc.store.as_ref(), file).await?;
        }
    }
    Ok(())
}

/// A local read that found the file shorter than planned is a malformed checkpoint; an I/O
/// error is a storage failure.
fn local_read_error(e: LocalReadError, file: &str, tensor: &str) -> EngineError {
    match e {
        LocalReadError::Truncated { .. } => EngineError::from(CheckpointError::Malformed {
            file: file.to_string(),
            reason: format!("reading tensor {tensor}: {e}"),
        }),
        LocalReadError::Io { path, source } => {
            EngineError::Storage(StorageError::Io { path, source })
        }
    }
}

/// A failed ranged GET: a vanished or short object is a malformed checkpoint (not worth a
/// retry); anything else is a storage failure (retryable).
fn read_error(
    e: object_store::Error,
    file: &str,
    tensor: &str,
    range: &std::ops::Range<u64>,
) -> EngineError {
    let text = e.to_string();
    let lies = matches!(e, object_store::Error::NotFound { .. })
        || text.to_ascii_lowercase().contains("range");
    if lies {
        EngineError::from(CheckpointError::Malformed {
            file: file.to_string(),
            reason: format!(
                "reading tensor {tensor} bytes {}..{}: {text} (truncated or replaced?)",
                range.start, range.end
            ),
        })
    } else {
        EngineError::ObjectStore {
            context: format!("reading tensor {tensor} from {file}"),
            source: e,
        }
    }
}

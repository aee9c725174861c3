//! The engine's errors and their stable codes (moved out of `engine/mod.rs`).

use crate::checkpoint::CheckpointError;
use crate::error::ErrorCode;
use crate::merge::MergeError;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Adapter(#[from] crate::checkpoint::adapter::AdapterError),
    /// A model's tokenizer files cannot be used to build the soup's (`invalid_tokenizer`).
    #[error(transparent)]
    Tokenizer(#[from] super::vocab::TokenizerError),
    #[error("{0}")]
    InvalidRecipe(String),
    #[error("{0}")]
    ShapeMismatch(String),
    #[error("{0}")]
    UnsupportedDtype(String),
    #[error("{0}")]
    OutputConflict(String),
    #[error("{0}")]
    OutputNotEmpty(String),
    #[error("merge kernel failed on tensor {tensor}: {source}")]
    Merge { tensor: String, source: MergeError },
    #[error("object storage error while {context}: {source}")]
    ObjectStore {
        context: String,
        source: object_store::Error,
    },
    #[error("the job was cancelled")]
    Cancelled,
    #[error("the worker lost its lease on the job")]
    LeaseLost,
    #[error("the worker is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Evaluator(#[from] crate::search::evaluator::EvaluatorError),
}

impl EngineError {
    pub fn code(&self) -> ErrorCode {
        match self {
            EngineError::Storage(StorageError::Io { source, .. }) if is_full(source) => {
                ErrorCode::StorageFull
            }
            EngineError::Storage(StorageError::ObjectStore(e)) if store_full(e) => {
                ErrorCode::StorageFull
            }
            EngineError::Storage(e) => e.code(),
            EngineError::Checkpoint(e) => e.code(),
            EngineError::Adapter(e) => e.code(),
            EngineError::Tokenizer(_) => ErrorCode::InvalidTokenizer,
            EngineError::InvalidRecipe(_) => ErrorCode::InvalidRecipe,
            EngineError::ShapeMismatch(_) => ErrorCode::ShapeMismatch,
            EngineError::UnsupportedDtype(_) => ErrorCode::UnsupportedDtype,
            EngineError::OutputConflict(_) => ErrorCode::OutputConflict,
            EngineError::OutputNotEmpty(_) => ErrorCode::OutputNotEmpty,
            EngineError::Merge {
                source: MergeError::MaskMismatch { .. },
                ..
            } => ErrorCode::ShapeMismatch,
            EngineError::Merge { .. } => ErrorCode::CheckpointMalformed,
            EngineError::ObjectStore { source, .. } if store_full(source) => ErrorCode::StorageFull,
            EngineError::ObjectStore { source, .. }
                if crate::storage::local::outside_roots(source).is_some() =>
            {
                ErrorCode::PathOutsideRoots
            }
            EngineError::ObjectStore { .. } => ErrorCode::StorageError,
            EngineError::Cancelled => ErrorCode::Cancelled,
            EngineError::LeaseLost => ErrorCode::LeaseExpired,
            EngineError::ShuttingDown => ErrorCode::Cancelled,
            EngineError::Internal(_) => ErrorCode::Internal,
            EngineError::Evaluator(e) => e.code(),
        }
    }

    pub(super) fn store(
        context: impl Into<String>,
    ) -> impl FnOnce(object_store::Error) -> EngineError {
        let context = context.into();
        move |source| match crate::storage::local::outside_roots(&source) {
            Some(o) => EngineError::Storage(StorageError::OutsideRoots {
                path: o.path.clone(),
            }),
            None => EngineError::ObjectStore { context, source },
        }
    }
}

/// Whether an I/O error means the disk or the quota is full (`ENOSPC`, `EDQUOT`).
fn is_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(28 | 122))
}

/// Whether an object store error means the storage is full: an `ENOSPC`/`EDQUOT` anywhere in
/// its chain (the local store), or an S3 server saying so (MinIO's `XMinioStorageFull`, HTTP
/// 507 Insufficient Storage).
fn store_full(e: &object_store::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && is_full(io)
        {
            return true;
        }
        cur = err.source();
    }
    let text = e.to_string();
    text.contains("XMinioStorageFull")
        || text.contains("Insufficient Storage")
        || text.contains("No space left on device")
        || text.contains("Disk quota exceeded")
}

//! The one table of stable, machine-readable error codes.
//!
//! Every layer has its own typed error enum (`thiserror`); each maps to one [`ErrorCode`] here.
//! The HTTP layer turns a code into a status once (`api::error`), and a failed job stores the
//! same code in its `error` column, so clients see one vocabulary everywhere.

use serde::{Deserialize, Serialize};

/// Stable error codes. The `snake_case` string form is the public contract: never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request body is not a valid recipe (bad JSON, unknown field, bad value).
    InvalidRecipe,
    /// A URL is malformed or uses a scheme ladle does not handle.
    InvalidUri,
    /// A URL falls outside every configured allowed root (or escapes one via `..`/symlinks).
    StorageNotAllowed,
    /// A checkpoint URL names nothing that exists (no file, no `model.safetensors`, no index).
    CheckpointNotFound,
    /// A checkpoint exists but its bytes lie: header, offsets, index, truncation.
    CheckpointMalformed,
    /// The ingredients disagree on tensor names or shapes.
    ShapeMismatch,
    /// A tensor has a dtype the requested method cannot combine.
    UnsupportedDtype,
    /// The same idempotency key was sent with a different body.
    IdempotencyKeyReused,
    /// Another live job already writes to the same output URL.
    OutputInUse,
    /// The output folder already holds a different, complete soup.
    OutputConflict,
    /// No such job.
    NotFound,
    /// The job is already finished and cannot be cancelled.
    NotCancellable,
    /// The request body is larger than the configured limit.
    PayloadTooLarge,
    /// Missing or wrong bearer token.
    Unauthorized,
    /// Object storage failed (network, permissions, server error). Retryable.
    StorageError,
    /// The database failed. Retryable.
    DatabaseError,
    /// The worker stopped heartbeating and its lease expired.
    LeaseExpired,
    /// The job was cancelled.
    Cancelled,
    /// A bug or an unexpected condition.
    Internal,
    /// The evaluator answered 4xx, or without a finite `score` (names the evaluation).
    EvaluatorFailed,
    /// The evaluator could not be reached (5xx, timeouts) after its bounded retries.
    EvaluatorUnavailable,
}

impl ErrorCode {
    /// The stable string form, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRecipe => "invalid_recipe",
            ErrorCode::InvalidUri => "invalid_uri",
            ErrorCode::StorageNotAllowed => "storage_not_allowed",
            ErrorCode::CheckpointNotFound => "checkpoint_not_found",
            ErrorCode::CheckpointMalformed => "checkpoint_malformed",
            ErrorCode::ShapeMismatch => "shape_mismatch",
            ErrorCode::UnsupportedDtype => "unsupported_dtype",
            ErrorCode::IdempotencyKeyReused => "idempotency_key_reused",
            ErrorCode::OutputInUse => "output_in_use",
            ErrorCode::OutputConflict => "output_conflict",
            ErrorCode::NotFound => "not_found",
            ErrorCode::NotCancellable => "not_cancellable",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::StorageError => "storage_error",
            ErrorCode::DatabaseError => "database_error",
            ErrorCode::LeaseExpired => "lease_expired",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Internal => "internal",
            ErrorCode::EvaluatorFailed => "evaluator_failed",
            ErrorCode::EvaluatorUnavailable => "evaluator_unavailable",
        }
    }

    /// The HTTP status a request failing with this code gets.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidRecipe | ErrorCode::InvalidUri => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::StorageNotAllowed => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::IdempotencyKeyReused
            | ErrorCode::OutputInUse
            | ErrorCode::OutputConflict
            | ErrorCode::NotCancellable => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::CheckpointNotFound
            | ErrorCode::CheckpointMalformed
            | ErrorCode::ShapeMismatch
            | ErrorCode::UnsupportedDtype => 422,
            ErrorCode::Cancelled => 409,
            ErrorCode::StorageError | ErrorCode::LeaseExpired => 502,
            ErrorCode::DatabaseError => 503,
            ErrorCode::Internal => 500,
            ErrorCode::EvaluatorFailed => 422,
            ErrorCode::EvaluatorUnavailable => 502,
        }
    }

    /// Whether a job failing with this code should be retried (with backoff) by the queue.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::StorageError | ErrorCode::DatabaseError | ErrorCode::LeaseExpired
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_form_matches_serde() {
        for code in [
            ErrorCode::InvalidRecipe,
            ErrorCode::StorageNotAllowed,
            ErrorCode::CheckpointMalformed,
            ErrorCode::IdempotencyKeyReused,
            ErrorCode::LeaseExpired,
        ] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }

    #[test]
    fn client_errors_are_4xx_and_not_retryable() {
        for code in [
            ErrorCode::InvalidRecipe,
            ErrorCode::StorageNotAllowed,
            ErrorCode::ShapeMismatch,
            ErrorCode::CheckpointMalformed,
        ] {
            assert!((400..500).contains(&code.http_status()));
            assert!(!code.retryable());
        }
        assert!(ErrorCode::StorageError.retryable());
    }
}

//! The one table of stable, machine-readable error codes.
//!
//! Every layer has its own typed error enum (`thiserror`); each maps to one [`ErrorCode`] here.
//! The HTTP layer turns a code into a status once (`api::error`), and a failed job stores the
//! same code in its `error` column, so clients see one vocabulary everywhere.
//!
//! [`error_codes!`] below is the table: one row per code (variant, string, HTTP status,
//! retryable by the queue, description). The enum, [`ErrorCode::as_str`],
//! [`ErrorCode::http_status`], [`ErrorCode::retryable`] and [`ErrorCode::ALL`] all come from
//! it; `tests::readme_lists_every_code` checks the README's table against [`ErrorCode::ALL`].
//! Adding a code is one row. The string form is the public contract: never rename one.

use serde::{Deserialize, Serialize};

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal, $status:literal, $retry:literal; )*) => {
        /// Stable error codes (see the module's table).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant, )*
        }

        impl ErrorCode {
            /// Every code, in table order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),*];

            /// The stable string form, as serialized.
            pub fn as_str(self) -> &'static str {
                match self { $( ErrorCode::$variant => $name, )* }
            }

            /// The HTTP status a request failing with this code gets.
            pub fn http_status(self) -> u16 {
                match self { $( ErrorCode::$variant => $status, )* }
            }

            /// Whether a job failing with this code should be retried (with backoff) by the
            /// queue.
            pub fn retryable(self) -> bool {
                match self { $( ErrorCode::$variant => $retry, )* }
            }

            /// The code with this string form.
            pub fn parse(s: &str) -> Option<ErrorCode> {
                match s { $( $name => Some(ErrorCode::$variant), )* _ => None }
            }
        }
    };
}

error_codes! {
    /// The request body is not a valid recipe (bad JSON, unknown field, bad value).
    InvalidRecipe = "invalid_recipe", 400, false;
    /// A URL is malformed or uses a scheme ladle does not handle.
    InvalidUri = "invalid_uri", 400, false;
    /// A query string is malformed or has an unknown or out-of-range parameter.
    InvalidQuery = "invalid_query", 400, false;
    /// Missing or wrong bearer token.
    Unauthorized = "unauthorized", 401, false;
    /// A URL falls outside every configured allowed root (or escapes one via `..`/symlinks).
    StorageNotAllowed = "storage_not_allowed", 403, false;
    /// A file or folder is reached through a symbolic link that leaves its allowed root
    /// (names the file as the request spelled it, never the link's target).
    PathOutsideRoots = "path_outside_roots", 403, false;
    /// No such job (or route).
    NotFound = "not_found", 404, false;
    /// The request body did not arrive within the body timeout (`--http-body-timeout-secs`).
    RequestTimeout = "request_timeout", 408, false;
    /// The same idempotency key was sent with a different body.
    IdempotencyKeyReused = "idempotency_key_reused", 409, false;
    /// Another live job already writes to the same output URL.
    OutputInUse = "output_in_use", 409, false;
    /// The output folder already holds a different, complete soup, or another run is
    /// publishing a different one to it (see README, "Publish protocol").
    OutputConflict = "output_conflict", 409, false;
    /// The output folder holds files that no ladle manifest claims (set `output.overwrite` to
    /// write beside them; ladle still never deletes or replaces them).
    OutputNotEmpty = "output_not_empty", 409, false;
    /// The job is already finished and cannot be cancelled.
    NotCancellable = "not_cancellable", 409, false;
    /// The job was cancelled.
    Cancelled = "cancelled", 409, false;
    /// The request body is larger than the configured limit.
    PayloadTooLarge = "payload_too_large", 413, false;
    /// The request's `Content-Type` is not one the route reads (JSON; YAML for merges).
    UnsupportedMediaType = "unsupported_media_type", 415, false;
    /// A checkpoint URL names nothing that exists (no file, no `model.safetensors`, no index).
    CheckpointNotFound = "checkpoint_not_found", 422, false;
    /// A model named by a Hugging Face hub id (`org/name[@revision]`) is not in the local
    /// cache (model, revision or snapshot missing), or no cache is configured; names the model
    /// and revision. ladle never downloads.
    ModelNotCached = "model_not_cached", 422, false;
    /// A checkpoint exists but its bytes lie: header, offsets, index, truncation.
    CheckpointMalformed = "checkpoint_malformed", 422, false;
    /// A LoRA adapter folder is refused: missing or bad `adapter_config.json`, an adapter type
    /// other than LoRA (DoRA, IA3, …), tensors that disagree with the config or the base.
    InvalidAdapter = "invalid_adapter", 422, false;
    /// A model's tokenizer cannot be read to build the soup's (`tokenizer_source: union`, the
    /// `tokenizer` section, `chat_template: auto`): names the file.
    InvalidTokenizer = "invalid_tokenizer", 422, false;
    /// The ingredients disagree on tensor names or shapes.
    ShapeMismatch = "shape_mismatch", 422, false;
    /// A tensor has a dtype the requested method cannot combine.
    UnsupportedDtype = "unsupported_dtype", 422, false;
    /// The evaluator answered 4xx, or without a finite `score` (names the evaluation).
    EvaluatorFailed = "evaluator_failed", 422, false;
    /// A bug or an unexpected condition.
    Internal = "internal", 500, false;
    /// Object storage failed (network, permissions, server error). Retryable.
    StorageError = "storage_error", 502, true;
    /// The worker stopped heartbeating and its lease expired.
    LeaseExpired = "lease_expired", 502, true;
    /// The evaluator could not be reached (5xx, timeouts) after its bounded retries.
    EvaluatorUnavailable = "evaluator_unavailable", 502, false;
    /// The database failed. Retryable.
    DatabaseError = "database_error", 503, true;
    /// The database cannot store writes now (disk full, read-only, its file deleted or
    /// replaced, unreachable). Nothing was stored. Retryable.
    DatabaseUnavailable = "database_unavailable", 503, true;
    /// An input checkpoint changed while it was merged (size, mtime, inode or ETag differ from
    /// the plan); nothing was published. Retryable: the next attempt reads the new version.
    InputChanged = "input_changed", 503, true;
    /// The output storage is full (`ENOSPC`, `EDQUOT`, S3 "storage full"); partial files were
    /// removed. Not retried: space must be made first.
    StorageFull = "storage_full", 507, false;
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
    fn string_form_matches_serde_and_parses_back() {
        for &code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
            let back: ErrorCode = serde_json::from_str(&json).unwrap();
            assert_eq!(back, code);
        }
        assert_eq!(ErrorCode::parse("no_such_code"), None);
    }

    #[test]
    fn client_errors_are_4xx_and_not_retryable() {
        for &code in ErrorCode::ALL {
            let status = code.http_status();
            assert!((400..600).contains(&status), "{code}: {status}");
            if (400..500).contains(&status) {
                assert!(!code.retryable(), "{code} is a client error yet retryable");
            }
        }
        assert!(ErrorCode::StorageError.retryable());
    }

    /// The README's error table (rows `| `code` | status | retried | … |`) lists exactly the
    /// codes of [`ErrorCode::ALL`], with the same status and retry flag, in the same order.
    #[test]
    fn readme_lists_every_code() {
        let readme = include_str!("../README.md");
        let rows: Vec<(String, u16, bool)> = readme
            .lines()
            .filter_map(|line| {
                let cells: Vec<&str> = line.split('|').map(str::trim).collect();
                let code = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
                let status = cells.get(2)?.parse().ok()?;
                let retried = match *cells.get(3)? {
                    "yes" => true,
                    "no" => false,
                    _ => return None,
                };
                Some((code.to_string(), status, retried))
            })
            .collect();
        let table: Vec<(String, u16, bool)> = ErrorCode::ALL
            .iter()
            .map(|c| (c.as_str().to_string(), c.http_status(), c.retryable()))
            .collect();
        assert_eq!(
            rows, table,
            "README.md's error table differs from src/error.rs"
        );
    }
}

//! The one place errors become HTTP responses: `{"code", "message", "field"?, "request_id"?}`
//! with the status of the code in [`crate::error::ErrorCode`]; `field` names the request field
//! at fault when one is; `request_id` is the request's `x-request-id`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::ErrorCode;
use crate::intake::IntakeError;
use crate::queue::QueueError;
use crate::recipe::RecipeError;
use crate::storage::StorageError;

/// Every error body: a stable code and a message for people.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(example = json!({
    "code": "invalid_recipe",
    "message": "models[0].weight: must be finite",
    "field": "models[0].weight",
    "request_id": "0193a4f2-7c1e-7b40-9d2a-5f0c3e8b1a66"
}))]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// The request field at fault (`models[1].uri`, `parameters.density`, `limit`), if one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The request's id, the same as its `x-request-id` response header (the client's own
    /// when it sent a sane one, else generated): the key to the request's server log lines.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub request_id: Option<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            field: None,
            request_id: None,
        }
    }

    /// An error about one field: the message starts with the field's name.
    pub fn at(code: ErrorCode, field: impl Into<String>, message: impl std::fmt::Display) -> Self {
        let field = field.into();
        ApiError {
            code,
            message: format!("{field}: {message}"),
            field: Some(field),
            request_id: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut body = if status.is_server_error() {
            // The detail (database or storage messages, paths) goes to the log only: a 5xx
            // body says which code failed and nothing about the internals.
            tracing::error!(code = %self.code, message = %self.message, "request failed");
            ApiError::new(self.code, server_error_message(self.code))
        } else {
            self
        };
        // The request's id (when inside one), so a user's report finds its log lines.
        body.request_id = crate::telemetry::request_id();
        (status, Json(body)).into_response()
    }
}

/// What a 5xx body says: the kind of failure, never its detail.
fn server_error_message(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::DatabaseError => "the database is unavailable; try again later",
        ErrorCode::DatabaseUnavailable => {
            "the database cannot store writes now; nothing was stored; try again later"
        }
        ErrorCode::StorageError => "object storage failed; try again later",
        _ => "an internal error happened; the server log has the details",
    }
}

impl From<RecipeError> for ApiError {
    fn from(e: RecipeError) -> Self {
        ApiError {
            code: e.code(),
            message: e.to_string(),
            field: e.field().map(str::to_string),
            request_id: None,
        }
    }
}

impl From<IntakeError> for ApiError {
    fn from(e: IntakeError) -> Self {
        ApiError {
            code: e.code(),
            message: e.to_string(),
            field: e.field().map(str::to_string),
            request_id: None,
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        ApiError::new(e.code(), e.to_string())
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        ApiError::new(e.code(), e.to_string())
    }
}

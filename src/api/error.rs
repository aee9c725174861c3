//! The one place errors become HTTP responses: `{"code", "message", "field"?}` with the status
//! of the code in [`crate::error::ErrorCode`]; `field` names the request field at fault when
//! one is.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::ErrorCode;
use crate::intake::IntakeError;
use crate::queue::QueueError;
use crate::recipe::RecipeError;
use crate::storage::StorageError;

#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// The request field at fault (`models[1].uri`, `parameters.density`, `limit`), if one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            field: None,
        }
    }

    /// An error about one field: the message starts with the field's name.
    pub fn at(code: ErrorCode, field: impl Into<String>, message: impl std::fmt::Display) -> Self {
        let field = field.into();
        ApiError {
            code,
            message: format!("{field}: {message}"),
            field: Some(field),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = if status.is_server_error() {
            // The detail (database or storage messages, paths) goes to the log only: a 5xx
            // body says which code failed and nothing about the internals.
            tracing::error!(code = %self.code, message = %self.message, "request failed");
            ApiError::new(self.code, server_error_message(self.code))
        } else {
            self
        };
        (status, Json(with_request_id(&body))).into_response()
    }
}

/// The error body plus `request_id` (the `x-request-id` of the request, when inside one), so
/// a user's report finds the request's log lines.
fn with_request_id(body: &ApiError) -> serde_json::Value {
    let mut value = serde_json::to_value(body).unwrap_or_else(|_| serde_json::json!({}));
    if let (Some(obj), Some(id)) = (value.as_object_mut(), crate::telemetry::request_id()) {
        obj.insert("request_id".into(), serde_json::Value::String(id));
    }
    value
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
        }
    }
}

impl From<IntakeError> for ApiError {
    fn from(e: IntakeError) -> Self {
        ApiError {
            code: e.code(),
            message: e.to_string(),
            field: e.field().map(str::to_string),
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

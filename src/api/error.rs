//! The one place errors become HTTP responses: `{"code", "message"}` with the status of
//! the code in [`crate::error::ErrorCode`].

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::ErrorCode;
use crate::queue::QueueError;
use crate::recipe::RecipeError;
use crate::storage::StorageError;

#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(code = %self.code, message = %self.message, "request failed");
        }
        (status, Json(self)).into_response()
    }
}

impl From<RecipeError> for ApiError {
    fn from(e: RecipeError) -> Self {
        ApiError::new(e.code(), e.to_string())
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

//! `POST /v1/analyses`, `GET /v1/analyses[/{id}]`, `POST /v1/analyses/{id}/cancel`: merge
//! diagnostics as queued jobs (kind `analysis`), with the same body limit, idempotency,
//! priority, listing and cancel conventions as merges. The job's `result` holds the numbers
//! (see `engine::analysis`).

use axum::Router;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use bytes::Bytes;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{
    ApiError, AppState, JobView, ListQuery, body_and_type, cancel_of_kind, enqueued_response,
    job_of_kind, json_response, list_of_kind,
};
use crate::engine::analysis::AnalysisSpec;
use crate::error::ErrorCode;
use crate::queue::{JobKind, NewJob};
use crate::recipe::{MAX_ATTEMPTS_LIMIT, MAX_MODELS};

/// Fewest models an analysis compares.
pub const MIN_MODELS: usize = 2;

/// The analysis routes, merged into the API router.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/analyses", post(submit).get(list))
        .route("/v1/analyses/{id}", get(get_analysis))
        .route("/v1/analyses/{id}/cancel", post(cancel))
}

/// The body of `POST /v1/analyses`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnalysisRequest {
    /// `"uri"` or `{"uri": "…"}` each.
    models: Vec<serde_json::Value>,
    #[serde(default)]
    base_model: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    priority: Option<i32>,
    #[serde(default)]
    max_attempts: Option<i32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelRef {
    uri: String,
}

fn invalid(field: &str, message: impl std::fmt::Display) -> ApiError {
    ApiError::at(ErrorCode::InvalidRecipe, field, message)
}

/// A validated request: the spec to store and the queue settings.
struct Validated {
    spec: AnalysisSpec,
    idempotency_key: Option<String>,
    priority: i32,
    max_attempts: Option<i32>,
}

/// Parse and validate a body; every URL is resolved against the allowed roots.
fn validate(state: &AppState, body: &[u8]) -> Result<Validated, ApiError> {
    let req: AnalysisRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidRecipe,
            format!("invalid JSON analysis request: {e}"),
        )
    })?;
    if !(MIN_MODELS..=MAX_MODELS).contains(&req.models.len()) {
        return Err(invalid(
            "models",
            format!(
                "{} models given; an analysis takes {MIN_MODELS} to {MAX_MODELS}",
                req.models.len()
            ),
        ));
    }
    let mut models = Vec::with_capacity(req.models.len());
    for (i, m) in req.models.into_iter().enumerate() {
        let uri = match m {
            serde_json::Value::String(s) => s,
            obj @ serde_json::Value::Object(_) => {
                serde_json::from_value::<ModelRef>(obj)
                    .map_err(|e| invalid(&format!("models[{i}]"), e))?
                    .uri
            }
            _ => {
                return Err(invalid(
                    &format!("models[{i}]"),
                    "expected a URL string or {\"uri\": …}",
                ));
            }
        };
        let loc = state
            .storage
            .resolve(&uri)
            .map_err(|e| ApiError::at(e.code(), format!("models[{i}].uri"), &e))?;
        models.push(loc.url);
    }
    let base_model = match req.base_model {
        None => None,
        Some(b) => Some(
            state
                .storage
                .resolve(&b)
                .map_err(|e| ApiError::at(e.code(), "base_model", &e))?
                .url,
        ),
    };
    if let Some(key) = &req.idempotency_key
        && (key.is_empty() || key.len() > 256)
    {
        return Err(invalid("idempotency_key", "must be 1 to 256 characters"));
    }
    if let Some(n) = req.max_attempts
        && !(1..=MAX_ATTEMPTS_LIMIT).contains(&n)
    {
        return Err(invalid(
            "max_attempts",
            format!("must be between 1 and {MAX_ATTEMPTS_LIMIT}"),
        ));
    }
    let priority = req.priority.unwrap_or(0);
    if !(-1000..=1000).contains(&priority) {
        return Err(invalid("priority", "must be between -1000 and 1000"));
    }
    Ok(Validated {
        spec: AnalysisSpec { models, base_model },
        idempotency_key: req.idempotency_key,
        priority,
        max_attempts: req.max_attempts,
    })
}

async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (body, content_type) = body_and_type(body, &headers)?;
    super::media::body_format(content_type.as_deref(), false)?;
    let v = validate(&state, &body)?;
    let spec_json = serde_json::to_value(&v.spec)
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    // The kind is part of the hash: an idempotency key first used for a merge is never
    // answered with that merge.
    let canonical = serde_json::to_vec(&serde_json::json!({"kind": "analysis", "spec": spec_json}))
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    let id = Uuid::now_v7();
    let enqueued = state
        .queue
        .enqueue(NewJob {
            id,
            kind: JobKind::Analysis,
            idempotency_key: v.idempotency_key,
            request_hash: Sha256::digest(&canonical).to_vec(),
            output_url: format!("analysis:{id}"),
            recipe: spec_json,
            priority: v.priority,
            max_attempts: v.max_attempts.unwrap_or(state.default_max_attempts),
        })
        .await?;
    if enqueued.job.kind != JobKind::Analysis {
        // Same key and same hash cannot come from a merge (the hash names the kind).
        return Err(ApiError::new(
            ErrorCode::IdempotencyKeyReused,
            "idempotency_key: already used by a merge",
        ));
    }
    Ok(enqueued_response(enqueued, "analyses"))
}

async fn get_analysis(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = job_of_kind(&state, &id, JobKind::Analysis).await?;
    Ok(json_response(StatusCode::OK, &JobView::from(job)))
}

async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    list_of_kind(&state, query, JobKind::Analysis).await
}

async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    cancel_of_kind(&state, &id, JobKind::Analysis).await
}

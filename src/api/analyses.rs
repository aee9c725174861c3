//! `POST /v1/analyses`, `GET /v1/analyses[/{id}]`, `POST /v1/analyses/{id}/cancel`: merge
//! diagnostics as queued jobs (kind `analysis`), with the same body limit, idempotency,
//! priority, listing and cancel conventions as merges. The job's `result` holds the numbers
//! (see `engine::analysis`).

use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::{
    ApiError, AppState, JobView, ListQuery, ListView, body_and_type, cancel_of_kind,
    enqueued_response, job_of_kind, json_response, list_of_kind,
};
use crate::engine::analysis::AnalysisSpec;
use crate::error::ErrorCode;
use crate::queue::{JobKind, NewJob};
use crate::recipe::request::{ModelRef, ModelRefObject, optional_model_ref};
use crate::recipe::{MAX_ATTEMPTS_LIMIT, MAX_MODELS};

/// Fewest models an analysis compares.
pub const MIN_MODELS: usize = 2;

/// The analysis routes, merged into the API router.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(submit, list))
        .routes(routes!(get_analysis))
        .routes(routes!(cancel))
}

/// The body of `POST /v1/analyses`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"models": ["file:///data/ft-a/", {"uri": "file:///data/ft-b/"}],
                          "base_model": "file:///data/base/"}))]
struct AnalysisRequest {
    /// `"uri"` or `{"uri": "…"}` each (2 to 128).
    #[schema(value_type = Vec<ModelRef>)]
    models: Vec<serde_json::Value>,
    /// The models' base (needed for adapters): a URL, or `{"uri": …}`.
    #[serde(default, deserialize_with = "optional_model_ref")]
    #[schema(value_type = Option<ModelRef>)]
    base_model: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    priority: Option<i32>,
    #[serde(default)]
    max_attempts: Option<i32>,
    /// Signed webhooks on this job's state changes.
    #[serde(default)]
    notify: Option<crate::webhooks::NotifySpec>,
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
    notify: Option<serde_json::Value>,
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
                serde_json::from_value::<ModelRefObject>(obj)
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
        notify: super::validate_notify(state, req.notify)?,
    })
}

/// Submit an analysis of 2 to 128 checkpoints (JSON only).
#[utoipa::path(
    post,
    path = "/v1/analyses",
    operation_id = "submit_analysis",
    tag = "analyses",
    request_body(content = AnalysisRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "A new job.", body = JobView,
            headers(("location" = String, description = "`/v1/analyses/{id}`"))),
        (status = 200, description = "The job this idempotency key already named.", body = JobView,
            headers(("location" = String), ("idempotent-replayed" = String))),
    )
)]
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
            request_hash: super::with_notify(
                Sha256::digest(&canonical).to_vec(),
                v.notify.as_ref(),
            ),
            output_key: format!("analysis:{id}"),
            output_uri: format!("analysis:{id}"),
            recipe: spec_json,
            priority: v.priority,
            max_attempts: v.max_attempts.unwrap_or(state.default_max_attempts),
            notify: v.notify,
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

/// One analysis job; `result` holds the numbers once it succeeded.
#[utoipa::path(
    get,
    path = "/v1/analyses/{id}",
    operation_id = "get_analysis",
    tag = "analyses",
    params(("id" = Uuid, Path, description = "The job's id.")),
    responses((status = 200, description = "The job.", body = JobView))
)]
async fn get_analysis(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = job_of_kind(&state, &id, JobKind::Analysis).await?;
    let view = JobView::with_deliveries(job, state.queue.as_ref()).await?;
    Ok(json_response(StatusCode::OK, &view))
}

/// Analysis jobs, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/analyses",
    operation_id = "list_analyses",
    tag = "analyses",
    params(ListQuery),
    responses((status = 200, description = "A page of jobs.", body = ListView))
)]
async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    list_of_kind(&state, query, JobKind::Analysis).await
}

/// Cancel an analysis: a queued one at once (200), a running one within a heartbeat (202).
#[utoipa::path(
    post,
    path = "/v1/analyses/{id}/cancel",
    operation_id = "cancel_analysis",
    tag = "analyses",
    params(("id" = Uuid, Path, description = "The job's id.")),
    responses(
        (status = 200, description = "Cancelled (or it already was).", body = JobView),
        (status = 202, description = "Running: its worker stops within a heartbeat.", body = JobView),
    )
)]
async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    cancel_of_kind(&state, &id, JobKind::Analysis).await
}

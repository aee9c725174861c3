//! HTTP API under `/v1`: submit, inspect, list, cancel and follow merges; health and readiness;
//! the OpenAPI document (`/openapi.json`, `/docs`).
//!
//! Thin: parse and validate the request (recipe module), check every URL against the allowed
//! roots (storage module), and hand the job to the queue. No math, no object I/O. Routes are
//! registered through `utoipa_axum` ([`api_routes`]), so each one is in the document.

pub mod analyses;
pub mod auth;
pub mod error;
pub mod events;
pub mod limits;
pub mod media;
pub mod openapi;

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::engine::ProgressSnapshot;
use crate::error::ErrorCode;
use crate::intake::{self, Format};
use crate::queue::{CancelOutcome, Enqueued, Job, JobKind, JobQueue, JobState, ListFilter, NewJob};
use crate::storage::Storage;
pub use auth::ApiAuth;
pub use error::ApiError;

/// Largest accepted request body.
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;

#[derive(Clone)]
pub struct AppState {
    pub queue: Arc<dyn JobQueue>,
    pub storage: Arc<Storage>,
    /// Attempts per job unless the request says otherwise.
    pub default_max_attempts: i32,
    /// Hosts an evaluator URL may name.
    pub evaluator_hosts: crate::search::evaluator::AllowedHosts,
    /// The webhook secret (no `notify` without one) and the hosts a webhook URL may name.
    pub webhooks: Arc<crate::webhooks::WebhookConfig>,
    /// Fires when the server stops: event streams end then.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The data directory (no output may be or lie in it).
    pub data_dir: Option<std::path::PathBuf>,
}

/// Every documented route (all of them but the fallback).
pub(crate) fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(submit, list))
        .routes(routes!(get_job))
        .routes(routes!(cancel))
        .routes(routes!(events::merge_events))
        .merge(analyses::routes())
        .routes(routes!(events::analysis_events))
        .routes(routes!(events::all_events))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(openapi::openapi_json))
        .routes(routes!(openapi::docs))
        .routes(routes!(openapi::docs_asset))
}

/// The OpenAPI 3.1 document `GET /openapi.json` serves.
pub fn openapi_document() -> serde_json::Value {
    let (_, api) = api_routes().split_for_parts();
    openapi::document(api)
}

/// The API. `auth` guards `/v1/*` (an empty [`ApiAuth`] lets everything through); health,
/// readiness, `/metrics` and the `/ui` page (which asks for the token itself) stay open.
/// Every route is in the OpenAPI document but the `/ui` dashboard's (a page for people, with
/// its script and style sheet: not part of the API contract; the document's description names
/// it). The
/// access log records no headers, so tokens never reach the logs.
pub fn router(state: AppState, body_limit: usize, auth: ApiAuth) -> Router {
    let (routes, _) = api_routes().split_for_parts();
    routes
        .merge(crate::ui::routes())
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            body_limit,
            limits::reject_oversized,
        ))
        .layer(axum::middleware::from_fn_with_state(
            auth,
            auth::require_token,
        ))
        // Request id, access log and HTTP metrics; records no headers.
        .layer(axum::middleware::from_fn(crate::telemetry::access_log))
        .layer(
            tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer::new([
                header::AUTHORIZATION,
            ]),
        )
        .with_state(state)
}

/// What `GET /v1/merges/{id}` returns.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(example = json!({
    "id": "019ae4a2-6c1e-7d43-9a57-3f0c2b8e1d20", "state": "running", "attempts": 1,
    "max_attempts": 3, "cancel_requested": false, "created_at": "2026-12-03T10:00:00Z",
    "started_at": "2026-12-03T10:00:01Z", "finished_at": null,
    "progress": {"phase": "merging", "tensors_done": 120, "tensors_total": 291,
                 "bytes_read": 1234567890, "bytes_total": 1963140608, "bytes_written": 617283945},
    "result": null, "error": null, "idempotency_key": "run-1",
    "recipe": {"method": "linear"},
    "notify": {"url": "https://hooks.example.com/ladle", "events": ["running", "succeeded"],
               "deliveries": [{"id": "msg_5f1c0b1e9d2a4c7b8e6f3a2d1c0b9a8e", "event": "running",
                               "state": "delivered", "attempts": 1, "last_status": 200,
                               "last_error": null, "last_attempt_at": "2026-12-03T10:00:01Z",
                               "next_attempt_at": null, "delivered_at": "2026-12-03T10:00:01Z",
                               "created_at": "2026-12-03T10:00:01Z"}]}
}))]
pub struct JobView {
    pub id: Uuid,
    pub state: JobState,
    pub attempts: i32,
    pub max_attempts: i32,
    pub cancel_requested: bool,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    pub progress: ProgressSnapshot,
    /// A greedy soup's trajectory so far: every evaluation, the accepted models, the best
    /// score (absent for other jobs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<serde_json::Value>,
    /// Once succeeded: `uri` (the soup's folder; its `ladle-manifest.json` is the manifest),
    /// `files`, and `search` for searches; an analysis's numbers.
    pub result: Option<serde_json::Value>,
    pub error: Option<ErrorView>,
    pub idempotency_key: Option<String>,
    /// The recipe as stored: explicit models (a trajectory expanded), every URL and hub id as
    /// the request wrote it.
    pub recipe: serde_json::Value,
    /// The job's webhook settings, and in `GET` of the job its deliveries (absent when the
    /// job has no `notify`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notify: Option<NotifyView>,
}

/// A job's `notify` as its view shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NotifyView {
    pub url: String,
    #[schema(value_type = Vec<crate::webhooks::WebhookEvent>)]
    pub events: Vec<JobState>,
    /// One per event so far, oldest first (in `GET` of one job; absent in listings, event
    /// streams and webhook bodies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries: Option<Vec<crate::queue::DeliveryRecord>>,
}

impl JobView {
    /// The view `GET` of one job answers: with `notify.deliveries`.
    pub(crate) async fn with_deliveries(
        job: Job,
        queue: &dyn JobQueue,
    ) -> Result<JobView, ApiError> {
        let id = job.id;
        let mut view = JobView::from(job);
        if let Some(notify) = view.notify.as_mut() {
            notify.deliveries = Some(queue.deliveries(id).await?);
        }
        Ok(view)
    }
}

/// A failed (or cancelled) job's error, or while a job waits for its retry, its last one.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(example = json!({"code": "storage_error", "message": "reading s3://ft/a/model.safetensors: connection reset",
                          "retryable": true, "attempt": 2}))]
pub struct ErrorView {
    pub code: ErrorCode,
    pub message: String,
    /// Whether the queue retries a job failing this way (up to `max_attempts`, with backoff).
    pub retryable: bool,
    /// The attempt (1-based) that failed.
    pub attempt: i32,
}

impl From<Job> for JobView {
    fn from(j: Job) -> Self {
        JobView {
            id: j.id,
            state: j.state,
            attempts: j.attempts,
            max_attempts: j.max_attempts,
            cancel_requested: j.cancel_requested_at.is_some(),
            created_at: j.created_at,
            started_at: j.started_at,
            finished_at: j.finished_at,
            search: j.progress.as_ref().and_then(|p| p.get("search")).cloned(),
            progress: j
                .progress
                .and_then(|p| serde_json::from_value(p).ok())
                .unwrap_or_default(),
            // A result is only shown once the job succeeded.
            result: if j.state == JobState::Succeeded {
                j.result
            } else {
                None
            },
            error: if j.state == JobState::Succeeded {
                None
            } else {
                j.error.map(|e| ErrorView {
                    code: e.code,
                    message: e.message,
                    retryable: e.retryable,
                    // Every stored error names its attempt; the count is the fallback.
                    attempt: e.attempt.unwrap_or(j.attempts),
                })
            },
            idempotency_key: j.idempotency_key,
            recipe: j.recipe,
            notify: j
                .notify
                .and_then(|n| serde_json::from_value::<crate::webhooks::Notify>(n).ok())
                .map(|n| NotifyView {
                    url: n.url,
                    events: n.events,
                    deliveries: None,
                }),
        }
    }
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    (status, axum::Json(body)).into_response()
}

/// Submit a merge.
///
/// JSON (the recipe) or mergekit YAML (`Content-Type: application/yaml`, plus ladle's
/// `output: {uri: …}`; over HTTP, model references are storage URLs or, when the server has a
/// Hugging Face cache (`--hf-cache`), hub ids `org/name[@revision]`).
#[utoipa::path(
    post,
    path = "/v1/merges",
    operation_id = "submit_merge",
    tag = "merges",
    request_body(
        description = "A recipe: JSON, or a mergekit YAML file.",
        content(
            (crate::recipe::MergeRequest = "application/json"),
            (String = "application/yaml", example = "merge_method: linear\nmodels:\n  - model: file:///data/ft-a/\n  - model: file:///data/ft-b/\noutput:\n  uri: file:///data/soups/run-1/\n"),
        )
    ),
    responses(
        (status = 202, description = "A new job.", body = JobView,
            headers(("location" = String, description = "`/v1/merges/{id}`"))),
        (status = 200, description = "The job this idempotency key already named, with the same body.",
            body = JobView, headers(
                ("location" = String, description = "`/v1/merges/{id}`"),
                ("idempotent-replayed" = String, description = "`true`"))),
    )
)]
async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (body, content_type) = body_and_type(body, &headers)?;
    let format = match media::body_format(content_type.as_deref(), true)? {
        media::BodyFormat::Json => Format::Json,
        media::BodyFormat::Yaml => Format::Yaml,
    };
    let mut req = intake::parse(&body, format, None)?;
    let notify = validate_notify(&state, req.notify.take())?;
    let accepted = intake::accept(
        &state.storage,
        &state.evaluator_hosts,
        state.data_dir.as_deref(),
        req,
    )
    .await?;
    let sub = accepted.submission;
    let recipe_json = serde_json::to_value(&sub.job)
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    let enqueued = state
        .queue
        .enqueue(NewJob {
            id: Uuid::now_v7(),
            kind: JobKind::Merge,
            idempotency_key: sub.idempotency_key,
            request_hash: with_notify(accepted.hash, notify.as_ref()),
            output_key: accepted.output_key,
            output_uri: sub.job.recipe.output.uri.clone(),
            recipe: recipe_json,
            priority: sub.priority,
            max_attempts: sub.max_attempts.unwrap_or(state.default_max_attempts),
            notify,
        })
        .await?;
    Ok(enqueued_response(enqueued, "merges"))
}

/// A request's `notify`, validated, as the queue stores it; refused naming `notify`.
pub(crate) fn validate_notify(
    state: &AppState,
    spec: Option<crate::webhooks::NotifySpec>,
) -> Result<Option<serde_json::Value>, ApiError> {
    let Some(spec) = spec else { return Ok(None) };
    state
        .webhooks
        .validate(&spec)
        .map(|n| Some(n.to_json()))
        .map_err(|e| ApiError::at(ErrorCode::InvalidRecipe, "notify", e))
}

/// The request hash with the webhook settings in it (unchanged without them), so that an
/// idempotency key replayed with another `notify` is a different request.
pub(crate) fn with_notify(hash: Vec<u8>, notify: Option<&serde_json::Value>) -> Vec<u8> {
    use sha2::Digest as _;
    match notify {
        None => hash,
        Some(n) => {
            let mut h = sha2::Sha256::new();
            h.update(&hash);
            h.update(b"\0notify\0");
            h.update(n.to_string().as_bytes());
            h.finalize().to_vec()
        }
    }
}

/// A submit's body (or the 413 / 408 / 400 that replaces it) and its content type.
pub(crate) fn body_and_type(
    body: Result<Bytes, BytesRejection>,
    headers: &HeaderMap,
) -> Result<(Bytes, Option<String>), ApiError> {
    let body = body.map_err(limits::body_rejection)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|ct| ct.to_str().unwrap_or_default().to_string());
    Ok((body, content_type))
}

/// The answer to a submit: 202 for a new job, 200 with `idempotent-replayed: true` for the
/// existing one; `Location: /v1/<collection>/<id>` either way.
pub(crate) fn enqueued_response(enqueued: Enqueued, collection: &str) -> Response {
    if enqueued.created {
        crate::metrics::job_submitted(&enqueued.job);
    }
    let id = enqueued.job.id;
    let view = JobView::from(enqueued.job);
    let status = if enqueued.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let mut resp = json_response(status, &view);
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/{collection}/{id}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    if !enqueued.created {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    resp
}

fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::new(ErrorCode::NotFound, format!("no merge job with id {raw:?}")))
}

/// One merge job: state, attempts, progress, result or error.
#[utoipa::path(
    get,
    path = "/v1/merges/{id}",
    operation_id = "get_merge",
    tag = "merges",
    params(("id" = Uuid, Path, description = "The job's id.")),
    responses((status = 200, description = "The job.", body = JobView))
)]
async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = job_of_kind(&state, &id, JobKind::Merge).await?;
    let view = JobView::with_deliveries(job, state.queue.as_ref()).await?;
    Ok(json_response(StatusCode::OK, &view))
}

fn no_such(kind: JobKind, id: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no {} job with id {id}", kind.as_str()),
    )
}

/// The job `raw` names, if it is of `kind` (a merge id under `/v1/analyses` is not found).
pub(crate) async fn job_of_kind(
    state: &AppState,
    raw: &str,
    kind: JobKind,
) -> Result<Job, ApiError> {
    let id = parse_id(raw)?;
    state
        .queue
        .get(id)
        .await?
        .filter(|j| j.kind == kind)
        .ok_or_else(|| no_such(kind, id))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only jobs in this state.
    #[param(value_type = Option<JobState>)]
    state: Option<String>,
    /// Page size (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[param(value_type = Option<Uuid>)]
    cursor: Option<String>,
}

/// A page of jobs, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ListView {
    jobs: Vec<JobView>,
    /// Pass as `cursor` to get the next (older) page; null on the last page.
    next_cursor: Option<String>,
}

/// Merge jobs, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/merges",
    operation_id = "list_merges",
    tag = "merges",
    params(ListQuery),
    responses((status = 200, description = "A page of jobs.", body = ListView))
)]
async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    list_of_kind(&state, query, JobKind::Merge).await
}

/// `GET` listing of one kind of job, newest first, keyset-paginated.
pub(crate) async fn list_of_kind(
    state: &AppState,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
    kind: JobKind,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::new(ErrorCode::InvalidQuery, e.body_text()))?;
    let filter_state = match q.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            ApiError::at(
                ErrorCode::InvalidQuery,
                "state",
                format!("unknown state {s:?} (queued, running, succeeded, failed, cancelled)"),
            )
        })?),
    };
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::at(
            ErrorCode::InvalidQuery,
            "limit",
            format!("must be between 1 and {MAX_PAGE}"),
        ));
    }
    let before = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(Uuid::parse_str(c).map_err(|_| {
            ApiError::at(
                ErrorCode::InvalidQuery,
                "cursor",
                format!("invalid cursor {c:?}"),
            )
        })?),
    };
    let jobs = state
        .queue
        .list(&ListFilter {
            kind: Some(kind),
            state: filter_state,
            limit,
            before,
        })
        .await?;
    let next_cursor = if jobs.len() as u32 == limit {
        jobs.last().map(|j| j.id.to_string())
    } else {
        None
    };
    let body = ListView {
        jobs: jobs.into_iter().map(JobView::from).collect(),
        next_cursor,
    };
    Ok(json_response(StatusCode::OK, &body))
}

/// Cancel a merge: a queued one at once (200), a running one within a heartbeat (202).
#[utoipa::path(
    post,
    path = "/v1/merges/{id}/cancel",
    operation_id = "cancel_merge",
    tag = "merges",
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
    cancel_of_kind(&state, &id, JobKind::Merge).await
}

/// Cancel a job of `kind`: a queued one at once (200), a running one within a heartbeat (202).
pub(crate) async fn cancel_of_kind(
    state: &AppState,
    raw: &str,
    kind: JobKind,
) -> Result<Response, ApiError> {
    let id = job_of_kind(state, raw, kind).await?.id;
    let outcome = state.queue.request_cancel(id).await?;
    let status = match outcome {
        CancelOutcome::NotFound => return Err(no_such(kind, id)),
        CancelOutcome::AlreadyFinished(JobState::Cancelled) | CancelOutcome::Cancelled => {
            StatusCode::OK
        }
        CancelOutcome::AlreadyFinished(s) => {
            return Err(ApiError::new(
                ErrorCode::NotCancellable,
                format!("job {id} already finished as {}", s.as_str()),
            ));
        }
        CancelOutcome::Requested => StatusCode::ACCEPTED,
    };
    let job = job_of_kind(state, raw, kind).await?;
    Ok(json_response(status, &JobView::from(job)))
}

/// The readiness answer (the schema of `/readyz`'s bodies).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[allow(dead_code)] // documents the JSON readyz builds
struct ReadyView {
    /// `ready` or `unavailable`.
    status: String,
    /// The backend (`sqlite` or `postgres`), when ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    database: Option<String>,
    /// `reachable` (every allowed storage root answered a listing), when ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    storage: Option<String>,
    /// Why not, when unavailable: `database_error` or `database_unavailable` (the database
    /// cannot store writes), `storage_error` (an allowed storage root does not answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<ErrorCode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "health",
    responses((status = 200, description = "Alive.", body = serde_json::Value, example = json!({"status": "ok"})))
)]
async fn healthz() -> Response {
    json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}))
}

/// Readiness: the database can store writes and every allowed storage root answers.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready.", body = ReadyView,
            example = json!({"status": "ready", "database": "sqlite", "storage": "reachable"})),
        (status = 503, description = "Not ready: the database cannot store writes (`code`: \
            `database_error` or `database_unavailable`), or an allowed storage root does not \
            answer (`storage_error`).", body = ReadyView,
            example = json!({"status": "unavailable", "code": "database_unavailable",
                             "message": "the database cannot store writes now"})),
    )
)]
async fn readyz(State(state): State<AppState>) -> Response {
    match state.queue.ping().await {
        Ok(()) => {}
        Err(e) => {
            // The detail (paths, database messages) goes to the log; the body gives the code.
            tracing::warn!(error = %e, "not ready: the database check failed");
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({
                    "status": "unavailable",
                    "code": e.code(),
                    "message": "the database cannot store writes now",
                }),
            );
        }
    }
    // Every allowed root answers a listing (a pod that cannot reach S3 takes no submissions).
    if let Err(e) = crate::storage::probe::reachable(&state.storage).await {
        tracing::warn!(error = %e, "readiness: object storage is not reachable");
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"status": "unavailable", "code": ErrorCode::StorageError, "message": "object storage is not reachable"}),
        );
    }
    json_response(
        StatusCode::OK,
        &serde_json::json!({"status": "ready", "database": state.queue.backend(), "storage": "reachable"}),
    )
}

/// Prometheus metrics (text exposition format 0.0.4); open like `/healthz` (no token), for
/// scrapers.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "health",
    responses(
        (status = 200, description = "The series (see the README's metrics table).",
            content_type = "text/plain", body = String,
            example = "# TYPE ladle_jobs gauge\nladle_jobs{state=\"queued\"} 0\n"),
        (status = 503, description = "No metrics recorder in this process.",
            content_type = "text/plain", body = String),
    )
)]
async fn metrics(State(state): State<AppState>) -> Response {
    crate::metrics::render(state.queue.as_ref()).await
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

//! Logs people can follow: a request id and an access-log line for every HTTP request
//! ([`access_log`]), and the job's span (job id, attempt) carried into the tasks a job spawns
//! ([`spawn_blocking`], and `.in_current_span()` on `tokio::spawn`ed futures).

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

/// The request-id header: accepted from the client when it is a sane token, else generated;
/// always returned.
pub static REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-given request id kept (a longer or odd one is replaced).
const MAX_REQUEST_ID: usize = 128;

tokio::task_local! {
    /// The id of the request this task serves (set by [`access_log`]).
    static REQUEST_ID: String;
}

/// The current request's id, inside a request (error bodies carry it as `request_id`).
pub fn request_id() -> Option<String> {
    REQUEST_ID.try_with(|id| id.clone()).ok()
}

/// A client's `x-request-id` if it is 1 to 128 visible ASCII characters without quotes or
/// backslashes (it goes into logs and JSON), else a fresh UUIDv7.
fn request_id_of(req: &Request) -> String {
    req.headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_REQUEST_ID
                && v.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

/// The middleware (outermost layer of the API router): one `request` span holding the request
/// id, method and route template (`/v1/merges/{id}`, never the raw path), so every log line
/// of the request carries them; one access-log line at info with status and latency when the
/// response head is ready; `x-request-id` on the response; HTTP metrics. Headers are never
/// recorded (no Authorization value can reach the logs).
pub async fn access_log(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request_id_of(&req);
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let span = tracing::info_span!("request", request_id = %id, method = %method, route = %route);
    let mut resp = REQUEST_ID
        .scope(id.clone(), next.run(req).instrument(span.clone()))
        .await;
    let took = started.elapsed();
    let status = resp.status().as_u16();
    span.in_scope(|| {
        tracing::info!(status, latency_ms = took.as_secs_f64() * 1e3, "request");
    });
    crate::metrics::http_request(&route, method.as_str(), status, took);
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER.clone(), v);
    }
    resp
}

/// `tokio::task::spawn_blocking` that runs `f` inside the caller's span, so log lines from
/// blocking work (and from rayon tasks it starts on this thread) keep the job id and attempt.
pub fn spawn_blocking<F, R>(f: F) -> tokio::task::JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
}

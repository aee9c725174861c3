//! Server-Sent Events: `GET /v1/merges/{id}/events`, `GET /v1/analyses/{id}/events` (one job)
//! and `GET /v1/events` (state changes of every job, for dashboards).
//!
//! The database is the only source: a stream re-reads the job row when Postgres says it changed
//! (`NOTIFY ladle_job_changed`, a trigger on `jobs`, from any process) and every
//! [`POLL`] anyway (SQLite, a dropped listener). The worker stores progress at most once a
//! second, so the API and the worker may be different processes on different machines.
//!
//! Per-job stream (the format the dashboard relies on):
//! - `event: state`, data: the job view (the JSON of `GET /v1/merges/{id}`), on connect and on
//!   every state change;
//! - `event: progress`, data: the view's `progress` (`phase`, `tensors_done`, `tensors_total`,
//!   `bytes_read`, `bytes_total`, `bytes_written`) plus `search` when the job searches, while it runs, only
//!   when it moved, at most 4 per second;
//! - `event: done`, data: the terminal job view; then the stream ends.
//!
//! Every event's `id:` is the row's `updated_at` in Unix milliseconds. A client reconnecting with
//! `Last-Event-ID` gets the current view only if the job changed since (there is no history to
//! replay), and `204 No Content` (which tells an `EventSource` to stop) if the job had already
//! finished by then. `GET /v1/events` sends `event: state`, data: the list-view JSON of the
//! job (as one item of `GET /v1/merges`) plus `kind`, when a job is created or changes state;
//! `Last-Event-ID` resumes after that change. Streams end when the server shuts down.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};
use uuid::Uuid;

use super::{ApiError, AppState, JobView, job_of_kind};
use crate::engine::ProgressSnapshot;
use crate::queue::{Job, JobKind, JobState};

/// Longest wait between two reads of a followed job (the guarantee when no NOTIFY arrives).
pub const POLL: Duration = Duration::from_millis(250);
/// Fewest milliseconds between two `progress` events of one stream (at most 4 per second).
const PROGRESS_GAP_MS: u128 = 250;
/// `GET /v1/events`: how far back each read looks again, in ms (a Postgres write that commits
/// late carries an older `updated_at`), and how far back the first read looks.
const LOOKBACK_MS: i64 = 2_000;
const PRIME_MS: i64 = 60_000;
/// `GET /v1/events`: fewest time between two reads.
const MIN_GAP: Duration = Duration::from_millis(100);
/// Rows one read of `GET /v1/events` takes.
const BATCH: u32 = 1000;

/// The data of a `progress` event.
#[derive(Debug, Serialize, PartialEq)]
struct ProgressEvent {
    #[serde(flatten)]
    progress: ProgressSnapshot,
    #[serde(skip_serializing_if = "Option::is_none")]
    search: Option<serde_json::Value>,
}

/// One item of `GET /v1/events`: a list item plus the job's kind.
#[derive(Debug, Serialize)]
struct ChangeEvent {
    kind: JobKind,
    #[serde(flatten)]
    job: JobView,
}

fn stamp(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

fn event(name: &str, id: i64, data: &impl Serialize) -> Event {
    let data = serde_json::to_string(data).unwrap_or_else(|_| "null".into());
    Event::default().event(name).id(id.to_string()).data(data)
}

/// The `Last-Event-ID` a reconnecting client sends (our ids are Unix milliseconds).
fn last_event_id(headers: &HeaderMap) -> Option<i64> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// An SSE response fed by `rx`; keep-alive comments every 15 s.
fn sse(rx: mpsc::Receiver<Event>) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Wait for the next reason to read again: a change hint for `id` (any id when `None`), the
/// poll interval, a disconnected client or the shutdown. `false`: stop.
async fn next_wake(
    state: &AppState,
    tx: &mpsc::Sender<Event>,
    hints: &mut Option<broadcast::Receiver<Uuid>>,
    id: Option<Uuid>,
) -> bool {
    let sleep = tokio::time::sleep(POLL);
    tokio::pin!(sleep);
    loop {
        let hint = async {
            match hints.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        let got = tokio::select! {
            _ = tx.closed() => return false,
            _ = state.shutdown.cancelled() => return false,
            _ = &mut sleep => return true,
            got = hint => got,
        };
        match got {
            Ok(changed) if id.is_none_or(|id| id == changed) => return true,
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => *hints = None,
        }
    }
}

/// Follow one job.
#[utoipa::path(
    get,
    path = "/v1/merges/{id}/events",
    operation_id = "merge_events",
    tag = "events",
    params(
        ("id" = Uuid, Path, description = "The merge job's id."),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id."),
    ),
    responses(
        (status = 200, description = "`state`, `progress` and a final `done` event (see the \
            module documentation of the API).", content_type = "text/event-stream", body = String,
            example = "event: state\nid: 1764754800000\ndata: {\"id\":\"…\",\"state\":\"running\",…}\n\n"),
        (status = 204, description = "Resumed (`Last-Event-ID`) after the job had finished: nothing more will come."),
    )
)]
pub async fn merge_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    job_stream(state, &id, JobKind::Merge, &headers).await
}

/// Follow one analysis job (same events as a merge's).
#[utoipa::path(
    get,
    path = "/v1/analyses/{id}/events",
    operation_id = "analysis_events",
    tag = "events",
    params(
        ("id" = Uuid, Path, description = "The analysis job's id."),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id."),
    ),
    responses(
        (status = 200, description = "`state`, `progress` and a final `done` event.",
            content_type = "text/event-stream", body = String),
        (status = 204, description = "Resumed after the job had finished."),
    )
)]
pub async fn analysis_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    job_stream(state, &id, JobKind::Analysis, &headers).await
}

async fn job_stream(
    state: AppState,
    raw: &str,
    kind: JobKind,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let job = job_of_kind(&state, raw, kind).await?;
    let resume = last_event_id(headers);
    if job.state.is_terminal() && resume.is_some_and(|r| r >= stamp(job.updated_at)) {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(follow_job(state, job, resume, tx));
    Ok(sse(rx))
}

fn progress_of(view: &JobView) -> ProgressEvent {
    ProgressEvent {
        progress: view.progress,
        search: view.search.clone(),
    }
}

/// Send the events of one job until it is terminal, the client leaves or the server stops.
async fn follow_job(state: AppState, first: Job, resume: Option<i64>, tx: mpsc::Sender<Event>) {
    let id = first.id;
    let mut hints = state.queue.job_changes();
    // What the client has: a resumed client has seen everything up to its id.
    let mut seen = resume.unwrap_or(i64::MIN);
    let mut sent_state: Option<JobState> = None;
    let mut sent_progress: Option<ProgressEvent> = None;
    let mut progress_at = std::time::Instant::now();
    let mut next = Some(first);
    loop {
        if let Some(job) = next.take() {
            let at = stamp(job.updated_at);
            let view = JobView::from(job);
            let now = view.state;
            if at > seen && sent_state != Some(now) {
                sent_progress = Some(progress_of(&view));
                if tx.send(event("state", at, &view)).await.is_err() {
                    return;
                }
                sent_state = Some(now);
                seen = at;
            } else if at > seen
                && now == JobState::Running
                && progress_at.elapsed().as_millis() >= PROGRESS_GAP_MS
            {
                let p = progress_of(&view);
                if sent_progress.as_ref() != Some(&p) {
                    if tx.send(event("progress", at, &p)).await.is_err() {
                        return;
                    }
                    progress_at = std::time::Instant::now();
                    sent_progress = Some(p);
                }
                seen = at;
            }
            if now.is_terminal() {
                let _ = tx.send(event("done", at.max(seen), &view)).await;
                return;
            }
        }
        if !next_wake(&state, &tx, &mut hints, Some(id)).await {
            return;
        }
        match state.queue.get(id).await {
            Ok(Some(j)) => next = Some(j),
            // Pruned while followed: nothing more will happen to it.
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(job_id = %id, error = %e, "event stream: reading the job failed; retrying")
            }
        }
    }
}

/// State changes of every job.
#[utoipa::path(
    get,
    path = "/v1/events",
    operation_id = "all_events",
    tag = "events",
    params(
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id."),
    ),
    responses(
        (status = 200, description = "`state` events: a job's list-view JSON plus `kind`, when \
            a job is created or changes state.", content_type = "text/event-stream", body = String,
            example = "event: state\nid: 1764754800000\ndata: {\"kind\":\"merge\",\"id\":\"…\",\"state\":\"queued\",…}\n\n"),
    )
)]
pub async fn all_events(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let resume = last_event_id(&headers).and_then(DateTime::<Utc>::from_timestamp_millis);
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(follow_all(state, resume, Utc::now(), tx));
    sse(rx)
}

async fn follow_all(
    state: AppState,
    resume: Option<DateTime<Utc>>,
    connected: DateTime<Utc>,
    tx: mpsc::Sender<Event>,
) {
    let mut hints = state.queue.job_changes();
    // The state each job was last seen in (sent, or primed without sending).
    let mut known: HashMap<Uuid, (JobState, DateTime<Utc>)> = HashMap::new();
    let mut cursor = match resume {
        Some(at) => at,
        None => {
            // Not resumed: what happened before the client came is not news (what happened
            // since, even before this first read, is).
            let since = connected - chrono::TimeDelta::milliseconds(PRIME_MS);
            let mut latest = since;
            if let Ok(jobs) = state.queue.changed_since(since, BATCH).await {
                for j in jobs.into_iter().filter(|j| j.updated_at <= connected) {
                    latest = latest.max(j.updated_at);
                    known.insert(j.id, (j.state, j.updated_at));
                }
            }
            latest
        }
    };
    let resumed_at = resume;
    loop {
        let lookback = chrono::TimeDelta::milliseconds(LOOKBACK_MS);
        match state.queue.changed_since(cursor - lookback, BATCH).await {
            Ok(jobs) => {
                for j in jobs {
                    cursor = cursor.max(j.updated_at);
                    let news = match known.get(&j.id) {
                        Some((s, _)) => *s != j.state,
                        // Unknown: new since the client came, or changed after its resume point.
                        None => resumed_at.is_none_or(|r| j.updated_at > r),
                    };
                    known.insert(j.id, (j.state, j.updated_at));
                    if news {
                        let at = stamp(j.updated_at);
                        let item = ChangeEvent {
                            kind: j.kind,
                            job: JobView::from(j),
                        };
                        if tx.send(event("state", at, &item)).await.is_err() {
                            return;
                        }
                    }
                }
                // Finished jobs that fell out of the look-back window will not come back.
                let horizon = cursor - lookback - lookback;
                known.retain(|_, (s, at)| !s.is_terminal() || *at >= horizon);
            }
            Err(e) => tracing::warn!(error = %e, "event stream: reading changes failed; retrying"),
        }
        let read_at = tokio::time::Instant::now();
        if !next_wake(&state, &tx, &mut hints, None).await {
            return;
        }
        // Every heartbeat of every job is a hint: read at most every MIN_GAP.
        tokio::time::sleep_until(read_at + MIN_GAP).await;
    }
}

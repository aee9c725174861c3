//! Prometheus metrics: one process-wide recorder (`metrics` + `metrics-exporter-prometheus`),
//! the series ladle exports (names and labels in one place, below), and `GET /metrics`.
//!
//! Call sites elsewhere are one line each (`crate::metrics::job_started(&job)`). Labels are
//! bounded: kinds, methods (the validated recipe's), outcomes, states, HTTP route templates
//! (never a raw path or id) and status codes.
//!
//! A worker-only process (`ladle worker`) serves `/metrics`, `/healthz` and `/readyz` on its
//! own `--metrics-bind` listener ([`serve`]).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::api::limits::HttpLimits;
use crate::error::ErrorCode;
use crate::queue::{Job, JobKind, JobQueue, JobState};
use crate::storage::Storage;

/// Histogram buckets for durations, in seconds: HTTP requests (ms) up to long merges (hours).
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 2.5, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Install the recorder once per process (later calls return the same handle). `None` if
/// another recorder was installed first (then ladle's series go there, and `/metrics` says so).
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let built = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| b.install_recorder());
            match built {
                Ok(handle) => {
                    describe();
                    gauge!("ladle_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
                    // The unlabeled series exist from the start, at 0: an alert on a rate of
                    // lease losses sees a series before the first loss.
                    for name in [
                        "ladle_lease_losses_total",
                        "ladle_self_fences_total",
                        "ladle_jobs_pruned_total",
                        "ladle_scratch_folders_removed_total",
                    ] {
                        counter!(name).increment(0);
                    }
                    gauge!("ladle_worker_slots_busy").increment(0.0);
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed; /metrics is empty");
                    None
                }
            }
        })
        .as_ref()
}

fn describe() {
    describe_counter!(
        "ladle_jobs_submitted_total",
        "Jobs accepted (new, not idempotent replays), by kind and method."
    );
    describe_counter!(
        "ladle_jobs_started_total",
        "Job attempts claimed by a worker, by kind and method."
    );
    describe_counter!(
        "ladle_jobs_finished_total",
        "Job attempts ended, by kind, method and outcome (succeeded, failed, retried, cancelled, released, lease_lost)."
    );
    describe_histogram!(
        "ladle_job_duration_seconds",
        Unit::Seconds,
        "Duration of a job attempt, claim to end, by kind, method and outcome."
    );
    describe_histogram!(
        "ladle_job_queue_wait_seconds",
        Unit::Seconds,
        "Time a job was runnable before a worker claimed it, by kind."
    );
    describe_gauge!(
        "ladle_jobs",
        "Jobs in the database by state (read at scrape time)."
    );
    describe_counter!(
        "ladle_storage_bytes_total",
        Unit::Bytes,
        "Tensor bytes read from and written to storage by merges and analyses (direction: read, written)."
    );
    describe_counter!(
        "ladle_chunks_merged_total",
        "Tensor chunks merged (or analysed)."
    );
    describe_gauge!("ladle_worker_slots", "Job slots of this process's workers.");
    describe_gauge!("ladle_worker_slots_busy", "Job slots running a job now.");
    describe_counter!(
        "ladle_http_requests_total",
        "HTTP requests by route template, method and status."
    );
    describe_histogram!(
        "ladle_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request latency (to the response head) by route template and method."
    );
    describe_counter!(
        "ladle_evaluator_calls_total",
        "Evaluations asked of a search's evaluator, by outcome (ok, evaluator_failed, evaluator_unavailable; retries included in one call)."
    );
    describe_counter!(
        "ladle_webhook_calls_total",
        "Webhook deliveries tried, by outcome."
    );
    describe_counter!(
        "ladle_lease_losses_total",
        "Runs stopped without publishing because the lease was lost (taken by another owner or the reaper, or self-fenced)."
    );
    describe_counter!(
        "ladle_self_fences_total",
        "Runs a worker stopped itself: no heartbeat confirmed for 2/3 of the lease."
    );
    describe_counter!(
        "ladle_jobs_pruned_total",
        "Finished jobs deleted by retention (--retain-finished)."
    );
    describe_counter!(
        "ladle_scratch_folders_removed_total",
        "Search scratch folders no live job owns, removed by retention."
    );
    describe_gauge!(
        "ladle_build_info",
        "Always 1; the version label says which ladle runs."
    );
}

/// The method label of a stored recipe (`analysis` for analyses).
fn method(job: &Job) -> String {
    match job.kind {
        JobKind::Analysis => "analysis".to_string(),
        JobKind::Merge => job
            .recipe
            .get("method")
            .and_then(|m| m.as_str())
            .unwrap_or("unknown")
            .to_string(),
    }
}

pub fn job_submitted(job: &Job) {
    counter!("ladle_jobs_submitted_total", "kind" => job.kind.as_str(), "method" => method(job))
        .increment(1);
}

/// A claimed attempt: counts it and its queue wait (runnable since `run_after`).
pub fn job_started(job: &Job) {
    counter!("ladle_jobs_started_total", "kind" => job.kind.as_str(), "method" => method(job))
        .increment(1);
    let waited = (chrono::Utc::now() - job.run_after.max(job.created_at))
        .to_std()
        .unwrap_or_default();
    histogram!("ladle_job_queue_wait_seconds", "kind" => job.kind.as_str())
        .record(waited.as_secs_f64());
}

/// An attempt ended with `outcome` after `took`.
pub fn job_finished(job: &Job, outcome: &'static str, took: Duration) {
    let (kind, method) = (job.kind.as_str(), method(job));
    counter!("ladle_jobs_finished_total", "kind" => kind, "method" => method.clone(), "outcome" => outcome)
        .increment(1);
    histogram!("ladle_job_duration_seconds", "kind" => kind, "method" => method, "outcome" => outcome)
        .record(took.as_secs_f64());
}

pub fn bytes_read(n: u64) {
    counter!("ladle_storage_bytes_total", "direction" => "read").increment(n);
}

pub fn bytes_written(n: u64) {
    counter!("ladle_storage_bytes_total", "direction" => "written").increment(n);
}

pub fn chunk_merged() {
    counter!("ladle_chunks_merged_total").increment(1);
}

/// Slots started (`+n`) or stopped (`-n`).
pub fn worker_slots(delta: f64) {
    gauge!("ladle_worker_slots").increment(delta);
}

/// A busy slot for as long as the guard lives.
pub struct SlotBusy(());

pub fn slot_busy() -> SlotBusy {
    gauge!("ladle_worker_slots_busy").increment(1.0);
    SlotBusy(())
}

impl Drop for SlotBusy {
    fn drop(&mut self) {
        gauge!("ladle_worker_slots_busy").decrement(1.0);
    }
}

pub fn http_request(route: &str, method: &str, status: u16, took: Duration) {
    let (route, method) = (route.to_string(), method.to_string());
    counter!("ladle_http_requests_total", "route" => route.clone(), "method" => method.clone(), "status" => status.to_string())
        .increment(1);
    histogram!("ladle_http_request_duration_seconds", "route" => route, "method" => method)
        .record(took.as_secs_f64());
}

/// One evaluation: `None` when it produced a score, else the error's code.
pub fn evaluator_call(error: Option<ErrorCode>) {
    let outcome = error.map_or("ok", |c| c.as_str());
    counter!("ladle_evaluator_calls_total", "outcome" => outcome).increment(1);
}

pub fn webhook_call(outcome: &'static str) {
    counter!("ladle_webhook_calls_total", "outcome" => outcome).increment(1);
}

pub fn lease_lost() {
    counter!("ladle_lease_losses_total").increment(1);
}

pub fn self_fenced() {
    counter!("ladle_self_fences_total").increment(1);
}

pub fn jobs_pruned(n: u64) {
    counter!("ladle_jobs_pruned_total").increment(n);
}

pub fn scratch_removed() {
    counter!("ladle_scratch_folders_removed_total").increment(1);
}

/// The text exposition: refreshes `ladle_jobs{state}` from the database (one grouped count),
/// then renders every series. A database error leaves the gauge at its last value and is
/// logged; the rest is still served.
pub async fn render(queue: &dyn JobQueue) -> Response {
    let Some(handle) = install() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed in this process\n",
        )
            .into_response();
    };
    match queue.count_by_state().await {
        Ok(counts) => {
            for state in JobState::ALL {
                let n = counts
                    .iter()
                    .find(|(s, _)| *s == state)
                    .map_or(0, |(_, n)| *n);
                gauge!("ladle_jobs", "state" => state.as_str()).set(n as f64);
            }
        }
        Err(e) => tracing::warn!(error = %e, "metrics: counting jobs by state failed"),
    }
    handle.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

/// What the `--metrics-bind` routes read.
#[derive(Clone)]
struct Probed {
    queue: Arc<dyn JobQueue>,
    storage: Arc<Storage>,
}

async fn scrape(State(p): State<Probed>) -> Response {
    render(p.queue.as_ref()).await
}

/// `--metrics-bind` of a process: `/metrics`, plus `/healthz` and `/readyz` (the database
/// and every allowed storage root answer) for a worker's probes. Served with the API's HTTP
/// limits (`limits`: header, idle and body timeouts, connection cap; `api::limits`), so a
/// slow or silent client is closed here as on the API port. Runs until `shutdown`.
pub async fn serve(
    bind: SocketAddr,
    queue: Arc<dyn JobQueue>,
    storage: Arc<Storage>,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Probed { queue, storage });
    let task = tokio::spawn(crate::api::limits::serve(listener, app, limits, shutdown));
    tracing::info!(%local, "metrics listening");
    Ok((local, task))
}

async fn ready(State(p): State<Probed>) -> Response {
    if let Err(e) = p.queue.ping().await {
        tracing::warn!(error = %e, "readiness: the database does not answer");
        return (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n").into_response();
    }
    if let Err(e) = crate::storage::probe::reachable(&p.storage).await {
        tracing::warn!(error = %e, "readiness: object storage is not reachable");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "object storage unreachable\n",
        )
            .into_response();
    }
    (StatusCode::OK, "ready\n").into_response()
}

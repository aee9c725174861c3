//! HTTP limits against slow, silent and greedy clients, and the accept loop that applies them.
//!
//! `axum::serve` runs hyper with its defaults: no timeout on a request head or body, none on an
//! idle keep-alive connection, no cap on connections; 200 slowloris connections stayed open
//! for minutes. [`serve`] is the same HTTP/1.1 server (axum's default build serves HTTP/1.1
//! only too) with these limits:
//!
//! - **Header timeout** (`--http-header-timeout-secs`, 10 s): hyper's `header_read_timeout`.
//!   A complete request head must arrive within it, counted from when the connection opens or
//!   from the end of its previous response; so it is also the idle keep-alive timeout, and a
//!   connection that sends nothing is closed after it.
//! - **Body timeout** (`--http-body-timeout-secs`, 30 s): the whole request body must arrive
//!   within it of the end of the head (tower-http's `RequestBodyDeadlineLayer`: a deadline, not
//!   an inactivity timer, so a trickle of one byte a second does not keep it open). The handler
//!   answers 408 `request_timeout` and the connection is closed.
//! - **Connection cap** (`--http-max-connections`, 1024): beyond it, new connections wait in
//!   the kernel's listen backlog until an open one closes.
//! - **Early 413** ([`reject_oversized`]): a `Content-Length` above `--body-limit` is answered
//!   at once, before any of the body is read, and the connection is closed.
//! - **Shutdown**: when the token fires, accepting stops, idle connections close at once, open
//!   requests finish, and whatever is still open after [`DRAIN`] is dropped.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::ApiError;
use crate::error::ErrorCode;

/// How long open connections may take to finish once shutdown begins.
pub const DRAIN: Duration = Duration::from_secs(5);

/// The server's limits (see the module doc; the flags set them).
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// A complete request head must arrive within this (also the keep-alive idle timeout).
    pub header_timeout: Duration,
    /// The whole request body must arrive within this of the end of the head.
    pub body_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

/// Serve `app` on `listener` with `limits` until `shutdown` fires, then drain (see the module
/// doc). Returns once every connection is closed or dropped.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) {
    let app = tower_http::timeout::RequestBodyDeadline::new(app, limits.body_timeout);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        // Small JSON answers: do not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let conn =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let stop = shutdown.clone();
        conns.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                // Timeouts and clients that hang up: routine, not worth more than debug.
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let drained =
        tokio::time::timeout(DRAIN, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            open = conns.len(),
            "HTTP connections still open after the drain time: closing them"
        );
        conns.shutdown().await;
    }
}

/// An `accept` error: a connection that failed before it was accepted is skipped; anything
/// else (out of file descriptors) is logged and retried after a pause.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    ) {
        return;
    }
    tracing::warn!(error = %e, "accepting an HTTP connection failed; pausing");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Middleware: a request whose `Content-Length` exceeds `limit` gets 413 `payload_too_large`
/// at once, without reading its body, and the connection is closed.
pub async fn reject_oversized(State(limit): State<usize>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(len) if len > limit as u64 => {
            let mut resp = ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("the request body ({len} bytes) is larger than the limit of {limit} bytes"),
            )
            .into_response();
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            resp
        }
        _ => next.run(req).await,
    }
}

/// The error answering a body that could not be read: 413 past the body limit, 408 past the
/// body timeout, else 400.
pub fn body_rejection(e: BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(ErrorCode::PayloadTooLarge, "request body is too large")
    } else if caused_by_timeout(&e) {
        ApiError::new(
            ErrorCode::RequestTimeout,
            "the request body did not arrive within the body timeout",
        )
    } else {
        ApiError::new(ErrorCode::InvalidRecipe, e.body_text())
    }
}

/// Whether the body deadline is somewhere in `e`'s chain of causes.
fn caused_by_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cause = c.source();
    }
    false
}

//! `POST /v1/analyses`, `GET /v1/analyses[/{id}]`, `POST /v1/analyses/{id}/cancel`: merge
//! diagnostics as queued jobs (kind `analysis`). Being written (issue 4).

use axum::Router;

use super::AppState;

/// The analysis routes, merged into the API router.
pub fn routes() -> Router<AppState> {
    Router::new()
}

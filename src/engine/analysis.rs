//! Runs an analysis job (diagnostics, no output written): streams every float tensor of the
//! models (and base) chunk by chunk through `merge::diagnostics`. Being written (issue 4).

use std::sync::Arc;

use super::{Engine, EngineError, RunControl};

/// Run the analysis described by `spec` (the job's stored request); the returned JSON becomes
/// the job's `result`.
pub async fn run(
    _engine: &Engine,
    _spec: &serde_json::Value,
    _ctl: &Arc<RunControl>,
) -> Result<serde_json::Value, EngineError> {
    Err(EngineError::Internal(
        "analyses are not implemented yet".into(),
    ))
}

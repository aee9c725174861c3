//! Readiness of object storage: can every allowed root be listed right now?

use std::time::Duration;

use futures::StreamExt;

use super::Storage;

/// How long one root may take to answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Lists the first object under every allowed root (one request each: a missing or empty
/// folder is fine, an unreachable store, a denied listing or a timeout is not). `Err` names
/// the first root that failed and why. An unrestricted `Storage` (the one-shot CLI) has
/// nothing to probe.
pub async fn reachable(storage: &Storage) -> Result<(), String> {
    if storage.roots.is_none() {
        return Ok(());
    }
    for root in storage.allowed_roots() {
        let loc = storage.resolve(&root).map_err(|e| format!("{root}: {e}"))?;
        let prefix = (!loc.path.as_ref().is_empty()).then_some(&loc.path);
        let first =
            tokio::time::timeout(PROBE_TIMEOUT, async { loc.store.list(prefix).next().await })
                .await;
        match first {
            Err(_) => return Err(format!("{root}: no answer within {PROBE_TIMEOUT:?}")),
            Ok(Some(Err(object_store::Error::NotFound { .. }))) | Ok(None) | Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Err(format!("{root}: {e}")),
        }
    }
    Ok(())
}

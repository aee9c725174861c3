//! Retention, in the background of every service process:
//! - with `--retain-finished <duration>` (e.g. `30d`), finished jobs (succeeded, failed,
//!   cancelled) whose `finished_at` is older than that are deleted ([`JobQueue::prune`], in
//!   batches); without it they are kept forever;
//! - scratch folders of searches (`<output's folder>/.ladle-scratch/<job_id>/`) that no live
//!   job owns (the job is finished, or has no row) are removed. A search deletes its own
//!   candidates as it goes; what is left comes from workers killed mid-search.
//!
//! Several processes may run this at once: deletes are idempotent.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::queue::{JobKind, JobQueue, ListFilter};
use crate::search::run::{remove_scratch, scratch_root};
use crate::storage::Storage;

/// Rows deleted per statement.
const PRUNE_BATCH: u32 = 500;
/// Jobs read per page, and pages read per sweep, when looking for scratch folders.
const PAGE: u32 = 500;
const MAX_PAGES: usize = 20;
/// Longest pause between sweeps.
const MAX_INTERVAL: Duration = Duration::from_secs(600);

/// A retention period: a number and a unit (`30d`, `12h`, `90m`, `1w`; humantime's syntax).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_zero() {
        return Err(format!("{s:?}: must be longer than zero"));
    }
    Ok(d)
}

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub jobs_pruned: u64,
    pub scratch_removed: u64,
}

/// One sweep: orphan scratch folders first (while the finished jobs that name their parent
/// folders still exist), then the prune.
pub async fn sweep(queue: &dyn JobQueue, storage: &Storage, retain: Option<Duration>) -> Swept {
    let mut swept = Swept::default();
    match scratch_roots(queue).await {
        Ok(roots) => {
            for root in roots {
                swept.scratch_removed += remove_orphans(queue, storage, &root).await;
            }
        }
        Err(e) => tracing::warn!(error = %e, "retention: listing jobs failed"),
    }
    if let Some(retain) = retain {
        let cutoff = chrono::Utc::now()
            - chrono::Duration::from_std(retain).unwrap_or(chrono::Duration::MAX);
        match queue.prune(cutoff, PRUNE_BATCH).await {
            Ok(n) => swept.jobs_pruned = n,
            Err(e) => tracing::warn!(error = %e, "retention: pruning finished jobs failed"),
        }
    }
    if swept != Swept::default() {
        tracing::info!(
            jobs_pruned = swept.jobs_pruned,
            scratch_removed = swept.scratch_removed,
            "retention sweep"
        );
    }
    crate::metrics::jobs_pruned(swept.jobs_pruned);
    swept
}

/// The scratch roots of every search job on record (newest first, bounded).
async fn scratch_roots(queue: &dyn JobQueue) -> crate::queue::QueueResult<BTreeSet<String>> {
    let mut roots = BTreeSet::new();
    let mut before = None;
    for _ in 0..MAX_PAGES {
        let page = queue
            .list(&ListFilter {
                kind: Some(JobKind::Merge),
                state: None,
                limit: PAGE,
                before,
            })
            .await?;
        for job in &page {
            let searches = job.recipe.get("search").is_some_and(|s| !s.is_null());
            let output = job.recipe.pointer("/output/uri").and_then(|u| u.as_str());
            if let (true, Some(root)) = (searches, output.and_then(scratch_root)) {
                roots.insert(root);
            }
        }
        if page.len() < PAGE as usize {
            break;
        }
        before = page.last().map(|j| j.id);
    }
    Ok(roots)
}

/// Removes the job folders under one scratch root whose job is finished or unknown.
async fn remove_orphans(queue: &dyn JobQueue, storage: &Storage, root: &str) -> u64 {
    let Ok(loc) = storage.resolve(root) else {
        return 0;
    };
    let prefix = (!loc.path.as_ref().is_empty()).then_some(&loc.path);
    let listing = match loc.store.list_with_delimiter(prefix).await {
        Ok(l) => l,
        Err(object_store::Error::NotFound { .. }) => return 0,
        Err(e) => {
            tracing::warn!(url = %loc.url, error = %e, "retention: listing a scratch folder failed");
            return 0;
        }
    };
    let mut removed = 0;
    for sub in listing.common_prefixes {
        let Some(Ok(id)) = sub.filename().map(Uuid::parse_str) else {
            continue;
        };
        let owned = match queue.get(id).await {
            Ok(job) => job.is_some_and(|j| !j.state.is_terminal()),
            // Unknown: keep it, the next sweep decides.
            Err(_) => true,
        };
        if !owned {
            let child = loc.child(&id.to_string());
            tracing::info!(url = %child.url, "retention: removing a scratch folder no live job owns");
            remove_scratch(&child).await;
            crate::metrics::scratch_removed();
            removed += 1;
        }
    }
    removed
}

/// The background task: a sweep within 5 s of start, then every `retain / 4` (at least 1 s,
/// at most 10 min; 10 min without `--retain-finished`), until `shutdown`.
pub fn spawn(
    queue: Arc<dyn JobQueue>,
    storage: Arc<Storage>,
    retain: Option<Duration>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let interval = retain
        .map_or(MAX_INTERVAL, |r| r / 4)
        .clamp(Duration::from_secs(1), MAX_INTERVAL);
    let first = tokio::time::Instant::now() + interval.min(Duration::from_secs(5));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(first, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            sweep(queue.as_ref(), &storage, retain).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration(" 90m "), Ok(Duration::from_secs(90 * 60)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("soon").is_err());
    }
}

//! Pure parts of the queue: state transitions, backoff and the JSON stored in error columns.
//!
//! Both backends implement the transitions of QUEUE.md §4.3 in SQL (one conditional statement
//! per transition, so the database re-checks the condition on the latest row version). The
//! functions here are the same rules written once in Rust: the SQL `CASE` expressions in
//! `sqlite.rs` and `postgres.rs` mirror them, the unit tests below pin them down, and the
//! backends use [`backoff`] to compute the retry delay of a failed attempt.
//!
//! ```text
//! queued ──claim──▶ running ──complete──▶ succeeded
//!    │                 │ ──fail (non-retryable, or attempts = max)──▶ failed
//!    │                 │ ──fail (retryable, attempts < max)──▶ queued (run_after = now + backoff)
//!    │                 │ ──lease expired (reaper)──▶ queued | failed | cancelled
//!    │                 │ ──owner acknowledges cancel──▶ cancelled
//!    │                 └ ──graceful release (shutdown)──▶ queued (max_attempts + 1)
//!    └──cancel──▶ cancelled
//! ```
//!
//! A pending cancel request beats every other outcome of a running job except success: a
//! failing, released or orphaned job whose cancel was requested ends `cancelled`.

use std::time::Duration;

use uuid::Uuid;

use super::{JobError, JobState};
use crate::error::ErrorCode;

/// The exponent of the backoff stops growing after this many doublings (`base · 2^20` is far
/// above any sensible cap). The SQL of the reapers uses the same bound.
pub const MAX_BACKOFF_DOUBLINGS: u32 = 20;

/// Jitter amplitude in per-mille: the delay is scaled by a factor in `[0.8, 1.2]`.
pub const JITTER_PER_MILLE: u64 = 200;

/// The message stored when the reaper takes a job from a worker that stopped heartbeating.
pub const LEASE_EXPIRED_MESSAGE: &str = "worker stopped heartbeating";

/// Retry delay after failed attempt number `attempt` (1-based):
/// `min(cap, base · 2^(attempt−1))`, then scaled by a deterministic jitter factor in
/// `[0.8, 1.2]` derived from `jitter_seed`.
///
/// The cap is applied before the jitter so that many jobs failing at the cap still spread out;
/// the result is therefore at most `1.2 · cap`. `attempt <= 1` gives the base delay. The
/// exponent stops at [`MAX_BACKOFF_DOUBLINGS`]; the arithmetic saturates instead of overflowing.
pub fn backoff(attempt: i32, base: Duration, cap: Duration, jitter_seed: u64) -> Duration {
    let doublings = u32::try_from(attempt.saturating_sub(1))
        .unwrap_or(0)
        .min(MAX_BACKOFF_DOUBLINGS);
    let raw = base.as_nanos().saturating_mul(1u128 << doublings);
    let capped = raw.min(cap.as_nanos());
    let factor = 1000 - JITTER_PER_MILLE + mix64(jitter_seed) % (2 * JITTER_PER_MILLE + 1);
    let nanos = capped.saturating_mul(u128::from(factor)) / 1000;
    duration_from_nanos(nanos)
}

/// A jitter seed for attempt `attempt` of job `id`: a cheap hash of the id's bytes (the random
/// tail of a UUIDv7 makes it differ between jobs) and the attempt number (so retries of one job
/// do not all land on the same fraction).
pub fn jitter_seed(id: Uuid, attempt: i32) -> u64 {
    let (hi, lo) = id.as_u64_pair();
    mix64(hi ^ mix64(lo ^ u64::from(attempt.unsigned_abs())))
}

/// The SplitMix64 finalizer: a fast, well-mixed 64-bit hash.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn duration_from_nanos(nanos: u128) -> Duration {
    let secs = nanos / 1_000_000_000;
    let sub = (nanos % 1_000_000_000) as u32;
    match u64::try_from(secs) {
        Ok(secs) => Duration::new(secs, sub),
        Err(_) => Duration::MAX,
    }
}

/// A duration as whole milliseconds, saturating at `i64::MAX` (SQLite stores times as integer
/// milliseconds since the Unix epoch).
pub fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A duration as fractional seconds for Postgres `make_interval(secs => …)`, bounded to about
/// 100 years so the interval arithmetic can never overflow.
pub fn duration_secs(d: Duration) -> f64 {
    d.as_secs_f64().min(100.0 * 365.0 * 86_400.0)
}

/// The state a running job moves to when its owner reports a failure (`fail`).
///
/// `attempts` is the job's attempt counter (the attempt that just failed).
pub fn after_fail(
    cancel_requested: bool,
    retryable: bool,
    attempts: i32,
    max_attempts: i32,
) -> JobState {
    if cancel_requested {
        JobState::Cancelled
    } else if retryable && attempts < max_attempts {
        JobState::Queued
    } else {
        JobState::Failed
    }
}

/// The state a running job whose lease expired moves to (the reaper). Its attempt is charged:
/// a poison job that kills its worker runs at most `max_attempts` times. With attempts
/// exhausted, a job that may still recover (`recovery_available`: a merge that has not had its
/// recovery run yet) goes back to `queued` for one recovery-only run (see
/// [`grants_recovery`]) instead of failing.
pub fn after_lease_expiry(
    cancel_requested: bool,
    attempts: i32,
    max_attempts: i32,
    recovery_available: bool,
) -> JobState {
    if cancel_requested {
        JobState::Cancelled
    } else if attempts < max_attempts
        || grants_recovery(cancel_requested, attempts, max_attempts, recovery_available)
    {
        JobState::Queued
    } else {
        JobState::Failed
    }
}

/// Whether the reaper gives an expired job its recovery-only run: no cancel pending, attempts
/// exhausted, and no recovery given before (merge jobs only: an analysis publishes nothing a
/// recovery could find). The job is queued again at once with `max_attempts + 1` (as a release
/// does, `attempts` never decreases) and `recovery_only` set for good.
pub fn grants_recovery(
    cancel_requested: bool,
    attempts: i32,
    max_attempts: i32,
    recovery_available: bool,
) -> bool {
    !cancel_requested && attempts >= max_attempts && recovery_available
}

/// The state a running job moves to when its owner releases it on graceful shutdown: back to
/// `queued` (without charging the attempt), unless a cancel was requested meanwhile.
pub fn after_release(cancel_requested: bool) -> JobState {
    if cancel_requested {
        JobState::Cancelled
    } else {
        JobState::Queued
    }
}

/// Whether §4.3 allows `from → to`. Terminal states never change; `queued → queued` is not a
/// transition. (Documentation and test support: the backends enforce the machine in SQL.)
pub fn can_transition(from: JobState, to: JobState) -> bool {
    use JobState::*;
    matches!(
        (from, to),
        (Queued, Running)
            | (Queued, Cancelled)
            | (Running, Succeeded)
            | (Running, Failed)
            | (Running, Queued)
            | (Running, Cancelled)
    )
}

/// The JSON stored in a job's `error` column and appended to its `errors` history:
/// `{code, message, retryable, attempt}`. It deserializes as a [`JobError`] (with `attempt`).
pub fn error_entry(error: &JobError, attempt: i32) -> serde_json::Value {
    serde_json::json!({
        "code": error.code,
        "message": error.message,
        "retryable": error.retryable,
        "attempt": attempt,
    })
}

/// The [`JobError`] the reaper records (built in SQL by the backends; this is its Rust form).
pub fn lease_expired_error() -> JobError {
    JobError {
        code: ErrorCode::LeaseExpired,
        message: LEASE_EXPIRED_MESSAGE.to_string(),
        retryable: true,
        attempt: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn bounds(d: Duration) -> (Duration, Duration) {
        (d.mul_f64(0.8), d.mul_f64(1.2))
    }

    #[test]
    fn backoff_doubles_per_attempt_within_jitter() {
        let base = Duration::from_secs(30);
        let cap = Duration::from_secs(30 * 60);
        for seed in 0..500u64 {
            for attempt in 1..=6 {
                let expect = base * 2u32.pow(attempt as u32 - 1);
                let (lo, hi) = bounds(expect);
                let got = backoff(attempt, base, cap, seed);
                assert!(
                    got >= lo && got <= hi,
                    "attempt {attempt} seed {seed}: {got:?} not in [{lo:?}, {hi:?}]"
                );
            }
        }
    }

    #[test]
    fn backoff_is_capped_before_jitter() {
        let cap = Duration::from_secs(100);
        for seed in 0..500u64 {
            let got = backoff(30, S, cap, seed);
            let (lo, hi) = bounds(cap);
            assert!(got >= lo && got <= hi, "{got:?}");
        }
    }

    #[test]
    fn backoff_handles_extremes_without_overflow() {
        assert_eq!(backoff(0, S, S * 10, 7), backoff(1, S, S * 10, 7));
        assert_eq!(backoff(-5, S, S * 10, 7), backoff(1, S, S * 10, 7));
        let huge = backoff(i32::MAX, Duration::MAX, Duration::MAX, 1);
        assert!(huge >= Duration::from_secs(u64::MAX / 2));
        assert_eq!(backoff(3, Duration::ZERO, S, 9), Duration::ZERO);
    }

    #[test]
    fn backoff_is_deterministic_and_jitter_spreads() {
        let a = backoff(2, S, S * 100, 42);
        assert_eq!(a, backoff(2, S, S * 100, 42));
        let distinct: std::collections::HashSet<_> = (0..100u64)
            .map(|s| backoff(1, S, S * 100, s).as_millis())
            .collect();
        assert!(
            distinct.len() > 50,
            "jitter barely varies: {}",
            distinct.len()
        );
        let lows = (0..1000u64)
            .filter(|&s| backoff(1, S, S * 100, s) < S)
            .count();
        assert!(
            (300..700).contains(&lows),
            "jitter is lopsided: {lows}/1000 below 1 s"
        );
    }

    #[test]
    fn jitter_seed_differs_by_job_and_attempt() {
        let a = Uuid::now_v7();
        let b = Uuid::now_v7();
        assert_ne!(jitter_seed(a, 1), jitter_seed(b, 1));
        assert_ne!(jitter_seed(a, 1), jitter_seed(a, 2));
        assert_eq!(jitter_seed(a, 3), jitter_seed(a, 3));
    }

    #[test]
    fn unit_conversions_saturate() {
        assert_eq!(duration_ms(Duration::from_millis(1500)), 1500);
        assert_eq!(duration_ms(Duration::MAX), i64::MAX);
        assert_eq!(duration_secs(Duration::from_millis(250)), 0.25);
        assert!(duration_secs(Duration::MAX) < 1e10);
    }

    #[test]
    fn fail_transitions() {
        assert_eq!(after_fail(false, true, 1, 3), JobState::Queued);
        assert_eq!(after_fail(false, true, 3, 3), JobState::Failed);
        assert_eq!(after_fail(false, false, 1, 3), JobState::Failed);
        // Cancellation beats retry.
        assert_eq!(after_fail(true, true, 1, 3), JobState::Cancelled);
        assert_eq!(after_fail(true, false, 3, 3), JobState::Cancelled);
    }

    #[test]
    fn lease_expiry_and_release_transitions() {
        assert_eq!(after_lease_expiry(false, 1, 3, true), JobState::Queued);
        assert_eq!(after_lease_expiry(false, 1, 3, false), JobState::Queued);
        // Attempts exhausted: one recovery-only run if still available, else failed.
        assert_eq!(after_lease_expiry(false, 3, 3, true), JobState::Queued);
        assert!(grants_recovery(false, 3, 3, true));
        assert!(!grants_recovery(false, 1, 3, true));
        assert_eq!(after_lease_expiry(false, 3, 3, false), JobState::Failed);
        assert!(!grants_recovery(false, 3, 3, false));
        // A pending cancel wins over both.
        assert_eq!(after_lease_expiry(true, 1, 3, true), JobState::Cancelled);
        assert_eq!(after_lease_expiry(true, 3, 3, true), JobState::Cancelled);
        assert!(!grants_recovery(true, 3, 3, true));
        assert_eq!(after_release(false), JobState::Queued);
        assert_eq!(after_release(true), JobState::Cancelled);
    }

    #[test]
    fn every_outcome_is_an_allowed_transition_and_terminals_are_final() {
        for cancel in [false, true] {
            for retryable in [false, true] {
                for (a, m) in [(1, 1), (1, 3), (3, 3)] {
                    assert!(can_transition(
                        JobState::Running,
                        after_fail(cancel, retryable, a, m)
                    ));
                    for recovery in [false, true] {
                        assert!(can_transition(
                            JobState::Running,
                            after_lease_expiry(cancel, a, m, recovery)
                        ));
                    }
                }
            }
            assert!(can_transition(JobState::Running, after_release(cancel)));
        }
        let all = [
            JobState::Queued,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
        ];
        for from in all.into_iter().filter(|s| s.is_terminal()) {
            for to in all {
                assert!(!can_transition(from, to), "{from:?} -> {to:?}");
            }
        }
        assert!(!can_transition(JobState::Queued, JobState::Succeeded));
    }

    #[test]
    fn error_entry_round_trips_as_job_error() {
        let e = JobError {
            code: ErrorCode::StorageError,
            message: "boom".into(),
            retryable: true,
            attempt: None,
        };
        let v = error_entry(&e, 2);
        assert_eq!(v["attempt"], 2);
        assert_eq!(v["code"], "storage_error");
        let back: JobError = serde_json::from_value(v).unwrap();
        assert_eq!(
            back,
            JobError {
                attempt: Some(2),
                ..e
            }
        );
        assert_eq!(lease_expired_error().code.as_str(), "lease_expired");
    }
}

//! Test-only fault injection for the process-level crash tests (`tests/crash.rs`): crash points
//! of the worker, the engine, searches and the webhook delivery loop, and the per-chunk throttle the engine calls. A
//! low-level module (it depends on nothing of ladle), so the engine needs no `worker` import.
//!
//! Compiled in only with the `failpoints` cargo feature. No normal build has it (`cargo build`,
//! `cargo build --release`, the Docker image): there every function here is an empty inline
//! no-op and the variables below mean nothing. `cargo test` turns the feature on through the
//! crate's dev-dependency on itself (see Cargo.toml), so the `ladle` binary the tests spawn has
//! the hooks, armed only by these variables (the `LADLE_TEST_` prefix is exempt from the
//! unknown-variable check):
//!
//! - `LADLE_TEST_CRASH_AT=<point>`: `std::process::abort()` at that point (see [`CrashPoint`]).
//! - `LADLE_TEST_THROTTLE_MS=<n>`: sleep `n` ms before producing each chunk, so a merge lasts
//!   long enough to be killed mid-way.
//! - `LADLE_TEST_BURN_MS=<n>`: spin a blocking-pool thread for `n` ms of wall time per chunk,
//!   next to the merge kernels, so a merge saturates every core.

/// Where a worker can be made to die.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// Shards, index and side files uploaded, lease confirmed; the manifest not yet written
    /// (the worker's publish gate).
    BeforeManifest,
    /// The engine returned Ok (manifest written); `complete` not yet called.
    AfterManifest,
    /// Right after a heartbeat extended the lease.
    Heartbeat,
    /// A search stored an evaluation's score (fenced); the next step not begun.
    AfterEvaluation,
    /// The webhook delivery loop claimed a delivery (its lease taken); the POST not sent.
    BeforeWebhook,
}

impl CrashPoint {
    pub const ALL: [CrashPoint; 5] = [
        CrashPoint::BeforeManifest,
        CrashPoint::AfterManifest,
        CrashPoint::Heartbeat,
        CrashPoint::AfterEvaluation,
        CrashPoint::BeforeWebhook,
    ];

    /// The value `LADLE_TEST_CRASH_AT` takes.
    pub fn name(self) -> &'static str {
        match self {
            CrashPoint::BeforeManifest => "before-manifest",
            CrashPoint::AfterManifest => "after-manifest",
            CrashPoint::Heartbeat => "heartbeat",
            CrashPoint::AfterEvaluation => "after-evaluation",
            CrashPoint::BeforeWebhook => "before-webhook",
        }
    }
}

/// Whether this build honours the `LADLE_TEST_` fault-injection variables.
pub fn enabled() -> bool {
    cfg!(feature = "failpoints")
}

/// Abort the process if `LADLE_TEST_CRASH_AT` names `point`.
#[inline]
pub fn crash(point: CrashPoint) {
    #[cfg(feature = "failpoints")]
    imp::crash(point);
    #[cfg(not(feature = "failpoints"))]
    let _ = point;
}

/// Called once per chunk by the engine: the throttle and the CPU burn, when armed.
#[inline]
pub async fn chunk() {
    #[cfg(feature = "failpoints")]
    imp::chunk().await;
}

/// Log which hooks are armed (at worker start), and stop on a crash point nobody knows: a
/// typo must not make a crash test pass for the wrong reason.
pub fn announce() {
    #[cfg(feature = "failpoints")]
    imp::announce();
}

#[cfg(feature = "failpoints")]
mod imp {
    use std::io::Write;
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    use super::CrashPoint;

    struct Armed {
        crash_at: Option<String>,
        throttle: Duration,
        burn: Duration,
    }

    fn millis(var: &str) -> Duration {
        match std::env::var(var) {
            Ok(v) => match v.trim().parse::<u64>() {
                Ok(ms) => Duration::from_millis(ms),
                Err(_) => {
                    eprintln!("ladle failpoints: {var}={v:?} is not a number of milliseconds");
                    std::process::exit(2);
                }
            },
            Err(_) => Duration::ZERO,
        }
    }

    fn armed() -> &'static Armed {
        static ARMED: OnceLock<Armed> = OnceLock::new();
        ARMED.get_or_init(|| Armed {
            crash_at: std::env::var("LADLE_TEST_CRASH_AT")
                .ok()
                .filter(|v| !v.is_empty()),
            throttle: millis("LADLE_TEST_THROTTLE_MS"),
            burn: millis("LADLE_TEST_BURN_MS"),
        })
    }

    pub(super) fn crash(point: CrashPoint) {
        if armed().crash_at.as_deref() == Some(point.name()) {
            // Straight to stderr (the log may be buffered): the test reads this line.
            let _ = writeln!(
                std::io::stderr(),
                "ladle failpoint: crashing at {}",
                point.name()
            );
            std::process::abort();
        }
    }

    pub(super) async fn chunk() {
        let a = armed();
        if !a.throttle.is_zero() {
            tokio::time::sleep(a.throttle).await;
        }
        if !a.burn.is_zero() {
            let burn = a.burn;
            let _ = tokio::task::spawn_blocking(move || {
                let start = Instant::now();
                let mut x = 0u64;
                while start.elapsed() < burn {
                    for i in 0..10_000u64 {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(i),
                        );
                    }
                }
                x
            })
            .await;
        }
    }

    pub(super) fn announce() {
        let a = armed();
        if let Some(name) = &a.crash_at
            && !CrashPoint::ALL.iter().any(|p| p.name() == name)
        {
            let known: Vec<&str> = CrashPoint::ALL.iter().map(|p| p.name()).collect();
            eprintln!(
                "ladle failpoints: unknown LADLE_TEST_CRASH_AT={name:?} (known: {})",
                known.join(", ")
            );
            std::process::exit(2);
        }
        if a.crash_at.is_some() || !a.throttle.is_zero() || !a.burn.is_zero() {
            tracing::warn!(
                crash_at = a.crash_at.as_deref().unwrap_or("none"),
                throttle_ms = a.throttle.as_millis() as u64,
                burn_ms = a.burn.as_millis() as u64,
                "test failpoints armed"
            );
        }
    }
}

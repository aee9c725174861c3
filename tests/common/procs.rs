//! Process-level test support: the real `ladle` binary as a child process (stderr captured to a
//! file, SIGKILL / SIGTERM, exit status), throw-away Postgres databases, and a TCP proxy that
//! can cut a process off from Postgres.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub const LADLE: &str = env!("CARGO_BIN_EXE_ladle");

/// Every variable a spawned `ladle` could pick up from the test's own environment and that a
/// test sets explicitly (or must not inherit).
const SCRUB: [&str; 4] = [
    "LADLE_TEST_CRASH_AT",
    "LADLE_TEST_THROTTLE_MS",
    "LADLE_TEST_BURN_MS",
    "RUST_LOG",
];

/// A `ladle` child process; its stderr goes to `log`. Killed (SIGKILL) on drop if still running.
pub struct LadleProc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
    status: Option<ExitStatus>,
}

impl LadleProc {
    /// `ladle <args…>` with `env` (on top of the test's environment minus [`SCRUB`]).
    pub fn spawn(name: &str, args: &[&str], env: &BTreeMap<String, String>, logs: &Path) -> Self {
        std::fs::create_dir_all(logs).expect("log dir");
        let log = logs.join(format!("{name}.log"));
        let err = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(LADLE);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err);
        for k in SCRUB {
            cmd.env_remove(k);
        }
        cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
        cmd.envs(env);
        let child = cmd.spawn().expect("spawn ladle");
        LadleProc {
            name: name.to_string(),
            child,
            log,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The captured stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Exit status if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) -> ExitStatus {
        if let Some(s) = self.try_status() {
            return s;
        }
        let _ = self.child.kill();
        let s = self.child.wait().expect("wait");
        self.status = Some(s);
        s
    }

    /// SIGTERM (no reap).
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Send signal `name` (`TERM`, `STOP`, `CONT`, …) with kill(1).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success(), "kill -{name} {}", self.pid());
    }

    /// Wait for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// User + system CPU time so far (Linux `/proc`), for checking the load a test created.
    pub fn cpu_time(&self) -> Option<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        // Fields after the command name (which is in parentheses and may hold spaces).
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        // USER_HZ is 100 on every Linux this runs on.
        Some(Duration::from_millis(ticks * 10))
    }
}

impl Drop for LadleProc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Killed by SIGABRT (what `std::process::abort()` raises).
pub fn aborted(s: ExitStatus) -> bool {
    s.signal() == Some(6)
}

/// A TCP proxy on a random local port in front of `upstream`. [`ChaosProxy::cut`] closes every
/// open connection and refuses new ones (accepts, then closes at once) until
/// [`ChaosProxy::restore`].
pub struct ChaosProxy {
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    /// Bumped on every cut: connections opened before it see a new generation and close.
    generation: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl ChaosProxy {
    pub async fn start(upstream: SocketAddr) -> ChaosProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let down = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (d, g) = (down.clone(), generation.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if d.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let born = g.load(Ordering::SeqCst);
                let g = g.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let pump = async {
                        tokio::select! {
                            _ = tokio::io::copy(&mut cr, &mut sw) => {}
                            _ = tokio::io::copy(&mut sr, &mut cw) => {}
                        }
                    };
                    let cut = async {
                        while g.load(Ordering::SeqCst) == born {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    };
                    tokio::select! {
                        _ = pump => {}
                        _ = cut => {}
                    }
                    // Dropping both halves closes both connections.
                });
            }
        });
        ChaosProxy {
            addr,
            down,
            generation,
            task,
        }
    }

    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

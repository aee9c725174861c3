//! Wiring of a service process: database, storage, engine, API, workers and the webhook
//! delivery loop, and a graceful shutdown. `main.rs` calls this; integration tests call it too, on a random port.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{AppState, router};
use crate::config::Settings;
use crate::engine::Engine;
use crate::queue::{self, JobQueue};
use crate::storage::Storage;

/// Which parts a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// API and workers.
    Serve,
    Api,
    Worker,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot create the data folder {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Queue(#[from] queue::QueueError),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error("cannot use the Hugging Face cache {path}: {source}")]
    HfCache {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "refusing to serve the API on {addr} without authentication: it is not a loopback \
         address. Give token digests (--api-token-sha256, LADLE_API_TOKEN_SHA256 or \
         --api-tokens-file; `ladle hash-token` computes one), bind to 127.0.0.1, or pass \
         --insecure-no-auth explicitly"
    )]
    NoAuth { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Whether the API would listen on a non-loopback address with no tokens and without an
/// explicit `--insecure-no-auth` (a start-up error).
pub fn requires_auth(settings: &Settings) -> bool {
    let loopback = settings.bind.ip().to_canonical().is_loopback();
    !loopback && !settings.auth.enabled() && !settings.insecure_no_auth
}

/// A started service.
pub struct Service {
    /// Where the API listens (None for a worker-only process).
    pub addr: Option<SocketAddr>,
    /// Where `--metrics-bind` listens, if given.
    pub metrics_addr: Option<SocketAddr>,
    pub queue: Arc<dyn JobQueue>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Service {
    /// Open the database (running migrations), bind the API, start the workers.
    pub async fn start(settings: &Settings, mode: Mode) -> Result<Service, ServiceError> {
        let serves_api = matches!(mode, Mode::Serve | Mode::Api);
        if serves_api && requires_auth(settings) {
            return Err(ServiceError::NoAuth {
                addr: settings.bind,
            });
        }
        if serves_api
            && !settings.auth.enabled()
            && !settings.bind.ip().to_canonical().is_loopback()
        {
            tracing::warn!(bind = %settings.bind, "--insecure-no-auth: the API accepts requests without a token");
        }
        std::fs::create_dir_all(&settings.data_dir).map_err(|source| ServiceError::DataDir {
            path: settings.data_dir.display().to_string(),
            source,
        })?;
        let queue = queue::connect(&settings.database_url, settings.queue.clone(), true).await?;
        let hf_cache =
            match &settings.hf_cache {
                None => None,
                Some(dir) => Some(crate::storage::hf_cache::HfCache::new(dir).map_err(
                    |source| ServiceError::HfCache {
                        path: dir.display().to_string(),
                        source,
                    },
                )?),
            };
        let storage = Arc::new(
            Storage::new(Some(&settings.allowed_roots), settings.s3.clone())?
                .with_hf_cache(hf_cache),
        );
        crate::metrics::install();
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let (mut addr, mut metrics_addr) = (None, None);
        if let Some(bind) = settings.metrics_bind {
            let (local, task) = crate::metrics::serve(
                bind,
                queue.clone(),
                storage.clone(),
                settings.http.clone(),
                shutdown.clone(),
            )
            .await
            .map_err(|source| ServiceError::Bind { addr: bind, source })?;
            metrics_addr = Some(local);
            tasks.push(task);
        }
        tasks.push(crate::retention::spawn(
            queue.clone(),
            storage.clone(),
            settings.retain_finished,
            shutdown.clone(),
        ));
        if serves_api {
            let listener =
                tokio::net::TcpListener::bind(settings.bind)
                    .await
                    .map_err(|source| ServiceError::Bind {
                        addr: settings.bind,
                        source,
                    })?;
            let local = listener.local_addr().map_err(|source| ServiceError::Bind {
                addr: settings.bind,
                source,
            })?;
            addr = Some(local);
            let app = router(
                AppState {
                    queue: queue.clone(),
                    storage: storage.clone(),
                    default_max_attempts: settings.max_attempts,
                    evaluator_hosts: settings.worker.evaluator_hosts.clone(),
                    webhooks: Arc::new(settings.webhooks.clone()),
                    shutdown: shutdown.clone(),
                    data_dir: Some(settings.data_dir.clone()),
                },
                settings.body_limit,
                settings.auth.clone(),
            );
            let stop = shutdown.clone();
            let limits = settings.http.clone();
            tasks.push(tokio::spawn(async move {
                crate::api::limits::serve(listener, app, limits, stop).await
            }));
            tracing::info!(
                %local,
                roots = ?storage.allowed_roots(),
                auth = if settings.auth.enabled() { "bearer" } else { "none" },
                "API listening"
            );
        }
        if matches!(mode, Mode::Serve | Mode::Worker) {
            let engine = Arc::new(Engine::new(storage.clone(), settings.engine.clone()));
            let q = queue.clone();
            let config = settings.worker.clone();
            let stop = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                crate::worker::run(q, engine, config, stop).await
            }));
            // Webhook deliveries go out from the processes that run jobs.
            let (q, webhooks, stop) = (queue.clone(), settings.webhooks.clone(), shutdown.clone());
            tasks.push(tokio::spawn(async move {
                crate::webhooks::deliver::run(q, webhooks, stop).await
            }));
        }
        Ok(Service {
            addr,
            metrics_addr,
            queue,
            shutdown,
            tasks,
        })
    }

    /// Stop claiming, let in-flight work finish or be released, stop serving.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// A token that stops the service when cancelled (e.g. from a signal handler).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Wait until every task ended (after the shutdown token fired).
    pub async fn wait(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

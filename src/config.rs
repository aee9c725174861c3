//! Settings: each from a flag, a `LADLE_…` environment variable or a TOML config file, in that
//! precedence, then the built-in default. Unknown `LADLE_` variables and unknown config keys
//! are errors at start-up, never silently ignored.

use crate::search::evaluator::AllowedHosts;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::api::ApiAuth;
use crate::api::auth::{TokenDigest, parse_digest};
use crate::api::limits::HttpLimits;
use crate::engine::EngineConfig;
use crate::queue::QueueConfig;
use crate::storage::S3Settings;
use crate::webhooks::{Secret, WebhookConfig};
use crate::worker::WorkerConfig;

#[derive(Debug, Parser)]
#[command(
    name = "ladle",
    version,
    about = "Merge fine-tuned checkpoints into model soups"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// TOML config file (keys as the long flags, with underscores).
    #[arg(long, env = "LADLE_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "LADLE_LOG_FORMAT", global = true, value_enum)]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// API and workers in one process (the single-machine default).
    Serve(ServiceArgs),
    /// The HTTP API only.
    Api(ServiceArgs),
    /// Workers only (run many of these over one Postgres and one object store).
    Worker(ServiceArgs),
    /// Apply database migrations and exit.
    Migrate(ServiceArgs),
    /// Run one merge locally, without a database or server, with a progress bar.
    #[command(
        long_about = "Run one merge locally, without a database or server, with a progress bar.\n\n\
RECIPE is a mergekit YAML configuration (a .yml or .yaml file: merge_method, models, base_model, \
parameters, slices, dtype, out_dtype, ...; as mergekit-yaml takes it) or ladle's JSON recipe \
(anything else; the body POST /v1/merges takes). Relative model paths in a YAML recipe resolve \
from the current directory first, as mergekit resolves them, then from the recipe's folder; in \
a JSON recipe from the recipe's folder. A reference that is no local path but reads as \
org/name or org/name@revision is a Hugging Face hub id, resolved offline from the local cache \
(--hf-cache; ladle never downloads).\n\n\
The soup goes to OUT_DIR (a folder, as mergekit-yaml takes it) or --out (a path or a \
file:// or s3:// URL); either replaces the recipe's output.uri. Beside the tensors it holds \
config.json (with the output dtype), the donor's tokenizer files, the model card README.md, \
mergekit_config.yml (the recipe text, which `ladle merge` takes back) and ladle-manifest.json.",
        after_help = "mergekit-yaml flags that do not apply to ladle (--cuda, --lazy-unpickle, \
--low-cpu-memory) are accepted and ignored, with one line saying so."
    )]
    Merge(MergeArgs),
    /// Read an API token on stdin and print its SHA-256 digest (for `--api-token-sha256`).
    HashToken,
    /// A client of a ladle server: submit, status, list, cancel, watch.
    #[command(flatten)]
    Client(crate::client::ClientCommand),
}

/// Settings shared by the service modes. Every field is optional here so that the config
/// file and the defaults can fill what flags and env leave unset.
#[derive(Debug, Clone, Default, Args, Deserialize)]
pub struct ServiceArgs {
    /// Address the HTTP API listens on [default: 127.0.0.1:8080].
    #[arg(long, env = "LADLE_BIND")]
    pub bind: Option<SocketAddr>,
    /// Folder for the SQLite database (by default) and the service's own files; always an
    /// allowed root, but never an output (outputs go under another `--allowed-root`)
    /// [default: ./ladle-data].
    #[arg(long, env = "LADLE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// `postgres://…` selects Postgres; `sqlite:…` SQLite [default: SQLite in the data dir].
    #[arg(long, env = "LADLE_DATABASE_URL")]
    pub database_url: Option<String>,
    /// A URL (`file:///…`, `s3://bucket/prefix`) or path jobs may read and write, in addition
    /// to the data dir (always a root); repeatable (env: comma-separated).
    #[arg(
        long = "allowed-root",
        env = "LADLE_ALLOWED_ROOTS",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub allowed_roots: Vec<String>,
    /// A local Hugging Face hub cache (the layout huggingface_hub writes): model references
    /// `org/name[@revision]` resolve to its snapshots, offline, and it becomes an allowed
    /// root. Unset: hub ids are refused (`model_not_cached`); the service never reads
    /// `$HF_HOME` on its own [default: none].
    #[arg(long, env = "LADLE_HF_CACHE", value_name = "DIR")]
    pub hf_cache: Option<PathBuf>,
    /// Merge jobs run at once by this process [default: 1].
    #[arg(long, env = "LADLE_WORKERS")]
    pub workers: Option<usize>,
    /// SHA-256 hex digest of an accepted API bearer token (`ladle hash-token` prints one);
    /// repeatable (env: comma-separated). Never the token itself.
    #[arg(
        long = "api-token-sha256",
        env = "LADLE_API_TOKEN_SHA256",
        value_delimiter = ',',
        hide_env_values = true
    )]
    #[serde(default)]
    pub api_token_sha256: Vec<String>,
    /// File with one accepted token digest per line (blank lines and `#` comments ignored).
    #[arg(long, env = "LADLE_API_TOKENS_FILE")]
    pub api_tokens_file: Option<PathBuf>,
    /// Serve the API without tokens on a non-loopback address (otherwise a start-up error).
    #[arg(long, env = "LADLE_INSECURE_NO_AUTH")]
    #[serde(default)]
    pub insecure_no_auth: bool,
    /// A host an evaluator URL may name (greedy soups): an IP network (`10.0.0.0/8`), an
    /// address or an exact host name; repeatable (env: comma-separated) [default: loopback
    /// only: 127.0.0.0/8, ::1, localhost].
    #[arg(
        long = "evaluator-allowed-hosts",
        env = "LADLE_EVALUATOR_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub evaluator_allowed_hosts: Vec<String>,
    /// The Standard Webhooks signing secret, `whsec_` + a base64 key of 24 to 64 bytes; jobs
    /// may carry `notify` only when it is set. Give every process of a deployment the same.
    #[arg(long, env = "LADLE_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// A host a webhook URL (`notify.url`) may name: an IP network, an address or an exact host
    /// name, as `--evaluator-allowed-hosts`; repeatable (env: comma-separated) [default:
    /// loopback only: 127.0.0.0/8, ::1, localhost].
    #[arg(
        long = "webhook-allowed-hosts",
        env = "LADLE_WEBHOOK_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub webhook_allowed_hosts: Vec<String>,
    /// Also serve `/metrics`, `/healthz` and `/readyz` on this address (for `ladle worker`,
    /// which has no API port; the API serves `/metrics` on `--bind` anyway) [default: none].
    #[arg(long, env = "LADLE_METRICS_BIND")]
    pub metrics_bind: Option<SocketAddr>,
    /// Delete finished jobs (succeeded, failed, cancelled) this long after they finished, in
    /// the background: `30d`, `12h`, `90m` [default: keep forever].
    #[arg(long, env = "LADLE_RETAIN_FINISHED")]
    pub retain_finished: Option<String>,
    /// Seconds a client has to send a complete request head, counted from when its
    /// connection opens or its previous response ends (so also the idle keep-alive timeout)
    /// [default: 10].
    #[arg(long, env = "LADLE_HTTP_HEADER_TIMEOUT_SECS")]
    pub http_header_timeout_secs: Option<f64>,
    /// Seconds a client has to send a whole request body, from the end of its head; later
    /// → 408 `request_timeout` [default: 30].
    #[arg(long, env = "LADLE_HTTP_BODY_TIMEOUT_SECS")]
    pub http_body_timeout_secs: Option<f64>,
    /// HTTP connections served at once; more wait in the listen backlog [default: 1024].
    #[arg(long, env = "LADLE_HTTP_MAX_CONNECTIONS")]
    pub http_max_connections: Option<usize>,
    /// Retry a job that failed with `storage_full` (a full output disk or quota), with the
    /// usual backoff and attempt limit, for storage that frees space by itself [default: off:
    /// space must be made first].
    #[arg(long, env = "LADLE_RETRY_STORAGE_FULL")]
    #[serde(default)]
    pub retry_storage_full: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub s3: S3Args,
    #[command(flatten)]
    #[serde(flatten)]
    pub tuning: TuningArgs,
}

#[derive(Debug, Clone, Default, Args, Deserialize)]
pub struct S3Args {
    /// S3 endpoint (e.g. http://127.0.0.1:9000); else `AWS_ENDPOINT`, else AWS.
    #[arg(long, env = "LADLE_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    #[arg(long, env = "LADLE_S3_REGION")]
    pub s3_region: Option<String>,
    #[arg(long, env = "LADLE_S3_ACCESS_KEY_ID")]
    pub s3_access_key_id: Option<String>,
    #[arg(long, env = "LADLE_S3_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub s3_secret_access_key: Option<String>,
    /// Allow plain-http endpoints.
    #[arg(long, env = "LADLE_S3_ALLOW_HTTP")]
    pub s3_allow_http: Option<bool>,
    /// Virtual-hosted-style requests instead of path style.
    #[arg(long, env = "LADLE_S3_VIRTUAL_HOSTED_STYLE")]
    pub s3_virtual_hosted_style: Option<bool>,
}

#[derive(Debug, Clone, Default, Args, Deserialize)]
pub struct TuningArgs {
    /// Lease length in seconds [default: 60].
    #[arg(long, env = "LADLE_LEASE_TTL_SECS")]
    pub lease_ttl_secs: Option<f64>,
    /// Heartbeat interval in seconds [default: lease/4].
    #[arg(long, env = "LADLE_HEARTBEAT_SECS")]
    pub heartbeat_secs: Option<f64>,
    /// Poll interval in seconds when idle [default: 5].
    #[arg(long, env = "LADLE_POLL_SECS")]
    pub poll_secs: Option<f64>,
    /// Backoff base for retries in seconds [default: 30].
    #[arg(long, env = "LADLE_BACKOFF_SECS")]
    pub backoff_secs: Option<f64>,
    /// Seconds an in-flight job may run after SIGTERM before it is released [default: 30].
    #[arg(long, env = "LADLE_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<f64>,
    /// Attempts per job unless the request says otherwise [default: 3].
    #[arg(long, env = "LADLE_MAX_ATTEMPTS")]
    pub max_attempts: Option<i32>,
    /// Largest request body in bytes [default: 1 MiB].
    #[arg(long, env = "LADLE_BODY_LIMIT")]
    pub body_limit: Option<usize>,
    /// Bytes of tensor chunks in flight per job [default: 64 MiB].
    #[arg(long, env = "LADLE_INFLIGHT_BYTES")]
    pub inflight_bytes: Option<u64>,
    /// Elements per tensor chunk [default: 2 Mi].
    #[arg(long, env = "LADLE_CHUNK_ELEMS")]
    pub chunk_elems: Option<usize>,
}

/// `ladle merge`: one merge, as `mergekit-yaml CONFIG OUT_DIR` runs one (its help text is
/// on [`Command::Merge`]).
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The recipe: mergekit YAML (.yml, .yaml) or ladle's JSON.
    pub recipe: PathBuf,
    /// Output folder (as mergekit-yaml takes it); or give --out.
    #[arg(value_name = "OUT_DIR", conflicts_with = "out")]
    pub out_dir: Option<PathBuf>,
    /// Output folder URL or path (overrides the recipe's `output.uri`).
    #[arg(long)]
    pub out: Option<String>,
    /// Copy the donor's tokenizer files (the base model's, else the first model's) [default].
    #[arg(long, overrides_with = "no_copy_tokenizer")]
    pub copy_tokenizer: bool,
    /// Do not copy tokenizer files.
    #[arg(long, overrides_with = "copy_tokenizer")]
    pub no_copy_tokenizer: bool,
    /// Largest output shard: bytes, with mergekit's K/M/B suffixes (5B = 5·10⁹ bytes, its
    /// default) or ladle's units ("2GB", "500MiB") [default: the recipe's, else 5GB].
    #[arg(long, value_name = "SIZE")]
    pub out_shard_size: Option<String>,
    /// Write the model card README.md and mergekit_config.yml [default].
    #[arg(long, overrides_with = "no_write_model_card")]
    pub write_model_card: bool,
    /// Write neither README.md nor mergekit_config.yml.
    #[arg(long, overrides_with = "write_model_card")]
    pub no_write_model_card: bool,
    /// Seed of the random methods (DARE, DELLA) when the recipe gives none (ladle's keyed
    /// generator: the same seed gives the same soup, not mergekit's torch draws).
    #[arg(long, value_name = "N")]
    pub random_seed: Option<u64>,
    /// Accepted, as mergekit's: ladle checks tensor names and shapes, never architecture
    /// names, so there is nothing more to allow.
    #[arg(long)]
    pub allow_crimes: bool,
    /// Ignored (mergekit's GPU switch; ladle streams on the CPU).
    #[arg(long, hide = true)]
    pub cuda: bool,
    /// Ignored (ladle maps safetensors files, it never unpickles).
    #[arg(long, hide = true)]
    pub lazy_unpickle: bool,
    /// Ignored (ladle always streams in bounded memory).
    #[arg(long, hide = true)]
    pub low_cpu_memory: bool,
    /// Restrict reads and writes to these roots (by default a local run may touch anything
    /// the invoking user can).
    #[arg(long = "allowed-root")]
    pub allowed_roots: Vec<String>,
    /// The Hugging Face hub cache model references `org/name[@revision]` resolve from,
    /// offline (an allowed root too when --allowed-root restricts the run) [default:
    /// huggingface_hub's: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub].
    #[arg(long, env = "LADLE_HF_CACHE", value_name = "DIR")]
    pub hf_cache: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub s3: S3Args,
    #[command(flatten)]
    pub tuning: MergeTuning,
}

/// The engine settings of a one-shot merge (the service's others do not apply).
#[derive(Debug, Clone, Default, Args)]
pub struct MergeTuning {
    /// Bytes of tensor chunks in flight [default: 64 MiB].
    #[arg(long, env = "LADLE_INFLIGHT_BYTES")]
    pub inflight_bytes: Option<u64>,
    /// Elements per tensor chunk [default: 2 Mi].
    #[arg(long, env = "LADLE_CHUNK_ELEMS")]
    pub chunk_elems: Option<usize>,
}

impl MergeTuning {
    pub fn engine_config(&self) -> EngineConfig {
        engine_config(&TuningArgs {
            inflight_bytes: self.inflight_bytes,
            chunk_elems: self.chunk_elems,
            ..TuningArgs::default()
        })
    }
}

/// A shard size as mergekit's `--out-shard-size` reads it (digits, or digits with a K, M or
/// B suffix: ×10³, ×10⁶, ×10⁹ bytes), else as ladle's `max_shard_size` ("2GB", "1GiB").
pub fn parse_shard_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.len().saturating_sub(1);
    if let (Some(num), Some(unit)) = (t.get(..split), t.get(split..)) {
        let mult = match unit.to_ascii_lowercase().as_str() {
            "k" => Some(1_000u64),
            "m" => Some(1_000_000),
            "b" => Some(1_000_000_000),
            _ => None,
        };
        if let Some(mult) = mult
            && !num.is_empty()
            && num.bytes().all(|b| b.is_ascii_digit())
        {
            return num.parse::<u64>().ok()?.checked_mul(mult);
        }
    }
    crate::recipe::parse_size(&serde_json::Value::String(t.to_string()))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown environment variable {0} (known LADLE_ variables: {1})")]
    UnknownEnv(String, String),
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid setting {0}")]
    Invalid(String),
}

/// Every `LADLE_` variable some flag reads, collected from the CLI definition itself.
pub fn known_env_vars() -> Vec<String> {
    fn collect(cmd: &clap::Command, out: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            if let Some(env) = arg.get_env() {
                out.push(env.to_string_lossy().into_owned());
            }
        }
        for sub in cmd.get_subcommands() {
            collect(sub, out);
        }
    }
    let mut out = Vec::new();
    collect(&Cli::command(), &mut out);
    out.sort();
    out.dedup();
    out
}

/// Keys a config file may set: the service flags' names (with underscores).
fn config_file_keys() -> Vec<String> {
    let cli = Cli::command();
    cli.find_subcommand("serve")
        .map(|serve| {
            serve
                .get_arguments()
                .filter(|a| !a.is_global_set())
                .map(|a| a.get_id().to_string())
                .filter(|id| id != "help" && id != "version")
                .collect()
        })
        .unwrap_or_default()
}

/// Fail on any `LADLE_…` variable no setting reads (a typo would otherwise be ignored).
pub fn check_env(vars: impl Iterator<Item = (String, String)>) -> Result<(), ConfigError> {
    let known = known_env_vars();
    for (key, _) in vars {
        if key.starts_with("LADLE_") && !known.contains(&key) && !key.starts_with("LADLE_TEST_") {
            return Err(ConfigError::UnknownEnv(key, known.join(", ")));
        }
    }
    Ok(())
}

/// Resolved settings of a service process.
#[derive(Debug, Clone)]
pub struct Settings {
    pub bind: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub allowed_roots: Vec<String>,
    /// `--hf-cache`: where hub ids resolve (also in `allowed_roots`); `None`: refused.
    pub hf_cache: Option<PathBuf>,
    pub s3: S3Settings,
    pub queue: QueueConfig,
    pub worker: WorkerConfig,
    pub engine: EngineConfig,
    pub max_attempts: i32,
    pub body_limit: usize,
    /// HTTP server timeouts and connection cap.
    pub http: HttpLimits,
    /// Accepted API token digests (empty: no authentication).
    pub auth: ApiAuth,
    /// `--insecure-no-auth`: allow a non-loopback bind without tokens.
    pub insecure_no_auth: bool,
    /// `--metrics-bind`: a listener of its own for `/metrics` and the probes.
    pub metrics_bind: Option<SocketAddr>,
    /// `--retain-finished`: how long finished jobs are kept (`None`: forever).
    pub retain_finished: Option<Duration>,
    /// `--webhook-secret`, `--webhook-allowed-hosts`.
    pub webhooks: WebhookConfig,
}

fn secs(name: &str, v: Option<f64>, default: f64) -> Result<Duration, ConfigError> {
    let v = v.unwrap_or(default);
    if !(v.is_finite() && v > 0.0 && v < 1e7) {
        return Err(ConfigError::Invalid(format!(
            "{name}: must be a positive number of seconds"
        )));
    }
    Ok(Duration::from_secs_f64(v))
}

impl Settings {
    /// Flags/env (already in `args`) over the config file over defaults.
    pub fn resolve(args: ServiceArgs, config_file: Option<&Path>) -> Result<Settings, ConfigError> {
        let file: ServiceArgs = match config_file {
            None => ServiceArgs::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                let parse_err = |message: String| ConfigError::Parse {
                    path: path.display().to_string(),
                    message,
                };
                let table: toml::Table =
                    toml::from_str(&text).map_err(|e| parse_err(e.to_string()))?;
                let known = config_file_keys();
                if let Some(key) = table.keys().find(|k| !known.contains(k)) {
                    return Err(parse_err(format!(
                        "unknown key {key:?} (known: {})",
                        known.join(", ")
                    )));
                }
                table.try_into().map_err(|e| parse_err(e.to_string()))?
            }
        };
        let data_dir = args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("ladle-data"));
        let data_dir = std::path::absolute(&data_dir)
            .map_err(|e| ConfigError::Invalid(format!("data_dir: {e}")))?;
        let database_url = args
            .database_url
            .or(file.database_url)
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("ladle.db").display()));
        // The data directory is always a root (the service's own files; never an output, see
        // `engine::output_rules`); every `--allowed-root` (or, without flags, the config
        // file's list) adds to it.
        let extra = if !args.allowed_roots.is_empty() {
            args.allowed_roots
        } else {
            file.allowed_roots
        };
        // A configured Hugging Face cache is a root too (its snapshots link into its blobs).
        let hf_cache = args
            .hf_cache
            .or(file.hf_cache)
            .map(|d| std::path::absolute(&d))
            .transpose()
            .map_err(|e| ConfigError::Invalid(format!("hf_cache: {e}")))?;
        let mut allowed_roots = vec![data_dir.display().to_string()];
        for root in extra
            .into_iter()
            .chain(hf_cache.iter().map(|d| d.display().to_string()))
        {
            if !allowed_roots.contains(&root) {
                allowed_roots.push(root);
            }
        }
        let s3 = merge_s3(args.s3, file.s3);
        let t = merge_tuning(args.tuning, file.tuning);
        let lease_ttl = secs("lease_ttl_secs", t.lease_ttl_secs, 60.0)?;
        let heartbeat = secs(
            "heartbeat_secs",
            t.heartbeat_secs,
            lease_ttl.as_secs_f64() / 4.0,
        )?;
        if heartbeat * 2 > lease_ttl {
            return Err(ConfigError::Invalid(
                "heartbeat_secs: must be at most half of lease_ttl_secs".into(),
            ));
        }
        let workers = args.workers.or(file.workers).unwrap_or(1);
        if workers == 0 || workers > 64 {
            return Err(ConfigError::Invalid("workers: must be 1 to 64".into()));
        }
        let max_attempts = t.max_attempts.unwrap_or(3);
        if !(1..=crate::recipe::MAX_ATTEMPTS_LIMIT).contains(&max_attempts) {
            return Err(ConfigError::Invalid("max_attempts: must be 1 to 20".into()));
        }
        let backoff_base = secs("backoff_secs", t.backoff_secs, 30.0)?;
        let digest_list = if !args.api_token_sha256.is_empty() {
            args.api_token_sha256
        } else {
            file.api_token_sha256
        };
        let mut digests = parse_digests("api_token_sha256", &digest_list)?;
        if let Some(path) = args.api_tokens_file.or(file.api_tokens_file) {
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                path: path.display().to_string(),
                source,
            })?;
            let lines: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from)
                .collect();
            digests.extend(parse_digests(
                &format!("api_tokens_file {}", path.display()),
                &lines,
            )?);
        }
        digests.sort_unstable();
        digests.dedup();
        let evaluator_hosts = if !args.evaluator_allowed_hosts.is_empty() {
            AllowedHosts::parse(&args.evaluator_allowed_hosts)
        } else if !file.evaluator_allowed_hosts.is_empty() {
            AllowedHosts::parse(&file.evaluator_allowed_hosts)
        } else {
            Ok(AllowedHosts::default())
        }
        .map_err(|e| ConfigError::Invalid(format!("evaluator_allowed_hosts: {e}")))?;
        let webhook_hosts = if !args.webhook_allowed_hosts.is_empty() {
            AllowedHosts::parse(&args.webhook_allowed_hosts)
        } else if !file.webhook_allowed_hosts.is_empty() {
            AllowedHosts::parse(&file.webhook_allowed_hosts)
        } else {
            Ok(AllowedHosts::default())
        }
        .map_err(|e| ConfigError::Invalid(format!("webhook_allowed_hosts: {e}")))?;
        let webhooks = WebhookConfig {
            secret: args
                .webhook_secret
                .or(file.webhook_secret)
                .map(|s| Secret::parse(&s))
                .transpose()
                .map_err(|e| ConfigError::Invalid(format!("webhook_secret: {e}")))?,
            allowed_hosts: webhook_hosts,
        };
        let http_defaults = HttpLimits::default();
        let http = HttpLimits {
            header_timeout: secs(
                "http_header_timeout_secs",
                args.http_header_timeout_secs
                    .or(file.http_header_timeout_secs),
                http_defaults.header_timeout.as_secs_f64(),
            )?,
            body_timeout: secs(
                "http_body_timeout_secs",
                args.http_body_timeout_secs.or(file.http_body_timeout_secs),
                http_defaults.body_timeout.as_secs_f64(),
            )?,
            max_connections: match args.http_max_connections.or(file.http_max_connections) {
                None => http_defaults.max_connections,
                Some(n) if (1..=1_000_000).contains(&n) => n,
                Some(_) => {
                    return Err(ConfigError::Invalid(
                        "http_max_connections: must be 1 to 1000000".into(),
                    ));
                }
            },
        };
        Ok(Settings {
            bind: args
                .bind
                .or(file.bind)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            data_dir,
            database_url,
            allowed_roots,
            hf_cache,
            s3,
            queue: QueueConfig {
                lease_ttl,
                backoff_base,
                backoff_cap: Duration::from_secs(30 * 60).max(backoff_base),
            },
            worker: WorkerConfig {
                slots: workers,
                lease_ttl,
                heartbeat_interval: heartbeat,
                poll_interval: secs("poll_secs", t.poll_secs, 5.0)?,
                shutdown_grace: secs("shutdown_grace_secs", t.shutdown_grace_secs, 30.0)?,
                evaluator_hosts,
                retry_storage_full: args.retry_storage_full || file.retry_storage_full,
            },
            engine: engine_config(&t),
            max_attempts,
            body_limit: t.body_limit.unwrap_or(crate::api::DEFAULT_BODY_LIMIT),
            http,
            auth: ApiAuth::new(digests),
            insecure_no_auth: args.insecure_no_auth || file.insecure_no_auth,
            metrics_bind: args.metrics_bind.or(file.metrics_bind),
            retain_finished: args
                .retain_finished
                .or(file.retain_finished)
                .map(|s| crate::retention::parse_duration(&s))
                .transpose()
                .map_err(|e| ConfigError::Invalid(format!("retain_finished: {e}")))?,
            webhooks,
        })
    }
}

/// Token digests as 64 hex characters each. The message never echoes a rejected entry: it
/// may be a token pasted where its digest belongs.
fn parse_digests(what: &str, list: &[String]) -> Result<Vec<TokenDigest>, ConfigError> {
    list.iter()
        .filter(|s| !s.trim().is_empty())
        .enumerate()
        .map(|(i, s)| {
            parse_digest(s).ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "{what}: entry {} is not a 64-character hex SHA-256 digest (store digests, \
                     never tokens: `ladle hash-token` prints one)",
                    i + 1
                ))
            })
        })
        .collect()
}

/// Engine settings from tuning flags.
pub fn engine_config(t: &TuningArgs) -> EngineConfig {
    let d = EngineConfig::default();
    EngineConfig {
        chunk_elems: t.chunk_elems.unwrap_or(d.chunk_elems).max(1024),
        inflight_bytes: t.inflight_bytes.unwrap_or(d.inflight_bytes),
        ..d
    }
}

pub fn merge_s3(a: S3Args, b: S3Args) -> S3Settings {
    S3Settings {
        endpoint: a.s3_endpoint.or(b.s3_endpoint),
        region: a.s3_region.or(b.s3_region),
        access_key_id: a.s3_access_key_id.or(b.s3_access_key_id),
        secret_access_key: a.s3_secret_access_key.or(b.s3_secret_access_key),
        allow_http: a.s3_allow_http.or(b.s3_allow_http),
        virtual_hosted_style: a.s3_virtual_hosted_style.or(b.s3_virtual_hosted_style),
    }
}

fn merge_tuning(a: TuningArgs, b: TuningArgs) -> TuningArgs {
    TuningArgs {
        lease_ttl_secs: a.lease_ttl_secs.or(b.lease_ttl_secs),
        heartbeat_secs: a.heartbeat_secs.or(b.heartbeat_secs),
        poll_secs: a.poll_secs.or(b.poll_secs),
        backoff_secs: a.backoff_secs.or(b.backoff_secs),
        shutdown_grace_secs: a.shutdown_grace_secs.or(b.shutdown_grace_secs),
        max_attempts: a.max_attempts.or(b.max_attempts),
        body_limit: a.body_limit.or(b.body_limit),
        inflight_bytes: a.inflight_bytes.or(b.inflight_bytes),
        chunk_elems: a.chunk_elems.or(b.chunk_elems),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_ladle_env_is_an_error() {
        let ok = vec![
            ("LADLE_BIND".to_string(), "x".to_string()),
            ("PATH".into(), "/".into()),
        ];
        assert!(check_env(ok.into_iter()).is_ok());
        let bad = vec![("LADLE_BINDD".to_string(), "x".to_string())];
        let e = check_env(bad.into_iter()).unwrap_err();
        assert!(e.to_string().contains("LADLE_BINDD"));
        assert!(known_env_vars().contains(&"LADLE_ALLOWED_ROOTS".to_string()));
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ladle.toml");
        std::fs::write(
            &cfg,
            "bind = \"127.0.0.1:9999\"\nworkers = 3\nallowed_roots = [\"/tmp\"]\ns3_region = \"eu-west-1\"\n",
        )
        .unwrap();
        let args = ServiceArgs {
            workers: Some(2),
            ..Default::default()
        };
        let s = Settings::resolve(args, Some(&cfg)).unwrap();
        assert_eq!(s.worker.slots, 2);
        assert_eq!(s.bind.port(), 9999);
        // The data directory is always a root; the file's roots add to it.
        assert_eq!(
            s.allowed_roots,
            vec![s.data_dir.display().to_string(), "/tmp".to_string()]
        );
        assert_eq!(s.s3.region.as_deref(), Some("eu-west-1"));
        assert_eq!(s.hf_cache, None);
        // A configured Hugging Face cache is an allowed root.
        std::fs::write(&cfg, "hf_cache = \"/srv/hf/hub\"\n").unwrap();
        let s = Settings::resolve(ServiceArgs::default(), Some(&cfg)).unwrap();
        assert_eq!(s.hf_cache.as_deref(), Some(Path::new("/srv/hf/hub")));
        assert_eq!(s.allowed_roots[1], "/srv/hf/hub");
        assert!(known_env_vars().contains(&"LADLE_HF_CACHE".to_string()));
        let s = Settings::resolve(ServiceArgs::default(), None).unwrap();
        assert_eq!(s.bind.port(), 8080);
        assert!(s.database_url.starts_with("sqlite://"));
    }

    /// `--allowed-root X` (and `LADLE_ALLOWED_ROOTS`, which clap reads into the same field)
    /// adds to the data directory, which stays a root, first; the flag's list replaces the
    /// config file's.
    #[test]
    fn allowed_root_flag_keeps_the_data_dir_a_root() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ladle.toml");
        std::fs::write(&cfg, "allowed_roots = [\"/from-file\"]\n").unwrap();
        let data = dir.path().join("data");
        let args = ServiceArgs {
            data_dir: Some(data.clone()),
            allowed_roots: vec!["/srv/models".into(), "s3://bucket/soups".into()],
            ..Default::default()
        };
        let s = Settings::resolve(args, Some(&cfg)).unwrap();
        assert_eq!(
            s.allowed_roots,
            vec![
                data.display().to_string(),
                "/srv/models".to_string(),
                "s3://bucket/soups".to_string()
            ]
        );
        // The data directory given again as a root is listed once.
        let args = ServiceArgs {
            data_dir: Some(data.clone()),
            allowed_roots: vec![data.display().to_string()],
            ..Default::default()
        };
        let s = Settings::resolve(args, None).unwrap();
        assert_eq!(s.allowed_roots, vec![data.display().to_string()]);
        // Through the command line as `ladle serve` parses it.
        let cli = Cli::try_parse_from([
            "ladle",
            "serve",
            "--data-dir",
            &data.display().to_string(),
            "--allowed-root",
            "/srv/models",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("`ladle serve` parsed as another command");
        };
        let s = Settings::resolve(args, None).unwrap();
        assert_eq!(
            s.allowed_roots,
            vec![data.display().to_string(), "/srv/models".to_string()]
        );
    }

    #[test]
    fn retry_storage_full_from_flag_or_file() {
        let s = Settings::resolve(ServiceArgs::default(), None).unwrap();
        assert!(!s.worker.retry_storage_full, "off by default");
        let args = ServiceArgs {
            retry_storage_full: true,
            ..Default::default()
        };
        assert!(
            Settings::resolve(args, None)
                .unwrap()
                .worker
                .retry_storage_full
        );
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ladle.toml");
        std::fs::write(&cfg, "retry_storage_full = true\n").unwrap();
        let s = Settings::resolve(ServiceArgs::default(), Some(&cfg)).unwrap();
        assert!(s.worker.retry_storage_full);
        assert!(known_env_vars().contains(&"LADLE_RETRY_STORAGE_FULL".to_string()));
    }

    #[test]
    fn unknown_config_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ladle.toml");
        std::fs::write(&cfg, "bindd = \"127.0.0.1:9999\"\n").unwrap();
        assert!(Settings::resolve(ServiceArgs::default(), Some(&cfg)).is_err());
    }
}

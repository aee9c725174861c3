//! The `ladle` binary: subcommands only; the logic lives in the library.

/// mimalloc reuses the large per-chunk buffers instead of mapping and faulting fresh pages
/// for every chunk (glibc malloc), which cut system time in the benchmark.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use ladle::config::{Cli, Command, LogFormat, MergeArgs, Settings, check_env, merge_s3};
use ladle::engine::{Engine, RunControl};
use ladle::intake::{self, Format};
use ladle::service::{Mode, Service};
use ladle::storage::Storage;
use ladle::storage::hf_cache::{HfCache, HubRef};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let log_format = cli.log_format.unwrap_or(LogFormat::Text);
    init_logging(log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Command::Client(cmd) = cli.command {
        return std::process::ExitCode::from(runtime.block_on(ladle::client::run(cmd)));
    }
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Once: as a log record where logs are JSON (machines read them), else as a line.
            match log_format {
                LogFormat::Json => tracing::error!("{e:#}"),
                LogFormat::Text => eprintln!("error: {e:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr; colours only when stderr is a terminal and `NO_COLOR` is unset or empty
/// (<https://no-color.org>), so log files never hold ANSI escape codes.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && !no_color)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(cli: Cli) -> Result<()> {
    check_env(std::env::vars())?;
    let config = cli.config.clone();
    let (args, mode) = match cli.command {
        Command::Merge(args) => return merge_once(args).await,
        Command::HashToken => return hash_token(),
        Command::Client(_) => bail!("client commands run before the service set-up"),
        Command::Serve(a) => (a, Some(Mode::Serve)),
        Command::Api(a) => (a, Some(Mode::Api)),
        Command::Worker(a) => (a, Some(Mode::Worker)),
        Command::Migrate(a) => (a, None),
    };
    let settings = Settings::resolve(args, config.as_deref())?;
    let Some(mode) = mode else {
        std::fs::create_dir_all(&settings.data_dir)
            .with_context(|| format!("creating {}", settings.data_dir.display()))?;
        ladle::queue::connect(&settings.database_url, settings.queue.clone(), true).await?;
        tracing::info!(database = %redact(&settings.database_url), "migrations applied");
        return Ok(());
    };
    let service = Service::start(&settings, mode).await?;
    tracing::info!(
        mode = ?mode,
        database = %redact(&settings.database_url),
        data_dir = %settings.data_dir.display(),
        "ladle started"
    );
    let stop = service.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        stop.cancel();
        tracing::info!("shutting down: no new claims; in-flight jobs finish or are released");
    });
    service.wait().await;
    Ok(())
}

/// `ladle hash-token`: a token on stdin (one line; the line break is not part of it) → its
/// SHA-256 digest in hex on stdout. The token itself is never printed.
fn hash_token() -> Result<()> {
    use std::io::Read;
    let mut input = String::new();
    std::io::stdin()
        .take(64 * 1024)
        .read_to_string(&mut input)
        .context("reading the token from stdin (it must be UTF-8)")?;
    let token = input.trim();
    if token.is_empty() {
        bail!("no token on stdin: run e.g. `printf %s \"$TOKEN\" | ladle hash-token`");
    }
    if token.contains(char::is_whitespace) {
        bail!("the token must be one line without spaces");
    }
    println!("{}", hex::encode(ladle::api::auth::token_digest(token)));
    Ok(())
}

/// SIGTERM or Ctrl-C.
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Hide a password in a database URL for logs.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// A local path or URL → URL.
fn to_url(s: &str) -> Result<String> {
    if s.contains("://") {
        return Ok(s.to_string());
    }
    let abs = std::path::absolute(s).with_context(|| format!("resolving {s}"))?;
    url::Url::from_file_path(&abs)
        .map(|u| u.to_string())
        .map_err(|()| anyhow::anyhow!("{} is not a valid local path", abs.display()))
}

/// The recipe file as a request: a `.yml` / `.yaml` file is a mergekit configuration
/// (relative model paths from the current directory first, as mergekit, then from the
/// recipe's folder), anything else ladle's JSON (relative model paths, base model, trajectory
/// folder and slice sources are relative to the recipe's folder). `OUT_DIR` or `--out` sets
/// the output; mergekit-yaml's output flags become the output's options.
fn read_request(args: &MergeArgs) -> Result<ladle::recipe::MergeRequest> {
    let body = std::fs::read(&args.recipe)
        .with_context(|| format!("reading {}", args.recipe.display()))?;
    let is_yaml = args
        .recipe
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yml") || e.eq_ignore_ascii_case("yaml"));
    let parent = args.recipe.parent().unwrap_or(std::path::Path::new(""));
    let invalid = |e: ladle::recipe::RecipeError| anyhow::anyhow!("invalid recipe: {e}");
    let mut req = if is_yaml {
        let folder = if parent.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            parent
        };
        let dir = std::path::absolute(folder)
            .with_context(|| format!("resolving {}", args.recipe.display()))?;
        intake::parse(&body, Format::Yaml, Some(&dir)).map_err(invalid)?
    } else {
        let mut req = intake::parse(&body, Format::Json, None).map_err(invalid)?;
        for uri in req.uris_mut() {
            if !uri.contains("://") {
                let local = parent.join(&*uri);
                // Not a local path but shaped as `org/name[@rev]`: a hub id, from the cache.
                if !local.exists() && HubRef::parse(uri).is_some() {
                    continue;
                }
                *uri = to_url(&local.to_string_lossy())?;
            }
        }
        req
    };
    if let Some(out) = &args.out {
        req.output.uri = to_url(out)?;
    }
    if let Some(dir) = &args.out_dir {
        req.output.uri = to_url(&dir.to_string_lossy())?;
    }
    if let Some(size) = &args.out_shard_size {
        let bytes = ladle::config::parse_shard_size(size).with_context(|| {
            format!("--out-shard-size {size:?}: expected bytes, e.g. 5B (5·10⁹), 500M or 2GB")
        })?;
        req.output.max_shard_size = Some(bytes.into());
    }
    if args.no_copy_tokenizer {
        req.output.copy_tokenizer = Some(false);
    }
    if args.no_write_model_card {
        req.output.write_model_card = Some(false);
    }
    Ok(req)
}

/// mergekit-yaml's flags that mean nothing to ladle: one line naming those given.
fn note_ignored_flags(args: &MergeArgs) {
    let ignored: Vec<&str> = [
        (args.cuda, "--cuda"),
        (args.lazy_unpickle, "--lazy-unpickle"),
        (args.low_cpu_memory, "--low-cpu-memory"),
        (args.allow_crimes, "--allow-crimes"),
    ]
    .into_iter()
    .filter_map(|(given, name)| given.then_some(name))
    .collect();
    if !ignored.is_empty() {
        eprintln!(
            "note: ignoring {} (mergekit-yaml options with nothing to do in ladle: it streams on \
             the CPU in bounded memory, reads safetensors only, and checks tensor names and \
             shapes rather than architectures)",
            ignored.join(", ")
        );
    }
}

/// Validate and check the request; `--random-seed` becomes the recipe's `seed` when it gives
/// none and its method draws random numbers (else it is noted and dropped).
async fn accept_request(
    args: &MergeArgs,
    storage: &Storage,
    allowed: &ladle::search::evaluator::AllowedHosts,
    req: ladle::recipe::MergeRequest,
) -> Result<intake::Accepted> {
    let invalid = |e: intake::IntakeError| anyhow::anyhow!("refused [{}]: {e}", e.code());
    if let Some(seed) = args.random_seed
        && !req.parameters.contains_key("seed")
    {
        let mut seeded = req.clone();
        seeded.parameters.insert("seed".into(), seed.into());
        match intake::accept(storage, allowed, None, seeded).await {
            Err(e) if e.field() == Some("parameters.seed") => {
                eprintln!(
                    "note: ignoring --random-seed: method {} draws no random numbers",
                    req.method
                );
            }
            other => return other.map_err(invalid),
        }
    }
    intake::accept(storage, allowed, None, req)
        .await
        .map_err(invalid)
}

/// The storage of a one-shot merge: unrestricted unless `--allowed-root` is given (then a
/// `--hf-cache` / `LADLE_HF_CACHE` is a root too; huggingface_hub's default cache, used when
/// none is configured, is not). Hub ids resolve from the configured cache, else the default.
fn local_storage(args: &MergeArgs) -> Result<Storage> {
    let mut roots = args.allowed_roots.clone();
    if !roots.is_empty()
        && let Some(dir) = &args.hf_cache
    {
        roots.push(
            std::path::absolute(dir)
                .with_context(|| format!("--hf-cache {}", dir.display()))?
                .display()
                .to_string(),
        );
    }
    let cache = match args.hf_cache.clone().or_else(HfCache::default_dir) {
        Some(dir) => Some(
            HfCache::new(&dir)
                .with_context(|| format!("the Hugging Face cache {}", dir.display()))?,
        ),
        None => None,
    };
    let roots = (!roots.is_empty()).then_some(roots.as_slice());
    Ok(Storage::new(roots, merge_s3(args.s3.clone(), Default::default()))?.with_hf_cache(cache))
}

/// `ladle merge RECIPE OUT_DIR` (or `--out URL`): one merge, no database, with a progress bar; the request
/// goes through the same intake as `POST /v1/merges` (the URLs are checked, the recipe runs as
/// written).
async fn merge_once(args: MergeArgs) -> Result<()> {
    note_ignored_flags(&args);
    let req = read_request(&args)?;
    if req.notify.is_some() {
        bail!(
            "invalid recipe: notify: webhooks are sent by the service (POST /v1/merges); \
             `ladle merge` runs locally and sends none"
        );
    }
    let storage = Arc::new(local_storage(&args)?);
    // A greedy soup or sweep from the command line: the evaluator must be on loopback.
    let allowed = ladle::search::evaluator::AllowedHosts::default();
    let sub = accept_request(&args, &storage, &allowed, req)
        .await?
        .submission;
    let engine = Engine::new(storage, args.tuning.engine_config());
    let ctl = Arc::new(RunControl::standalone());
    let progress = ctl.progress.clone();
    let bar_done = CancellationToken::new();
    let bar_task = (!args.quiet).then(|| {
        let done = bar_done.clone();
        tokio::spawn(async move {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:40}] {pos}/{len} tensors, {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            loop {
                let p = progress.snapshot();
                bar.set_length(p.tensors_total);
                bar.set_position(p.tensors_done);
                bar.set_message(format!(
                    "{:.0} MB read, {:.0} MB written",
                    p.bytes_read as f64 / 1e6,
                    p.bytes_written as f64 / 1e6
                ));
                tokio::select! {
                    _ = done.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            bar.finish();
        })
    });
    let driver = ladle::search::run::Driver {
        engine: &engine,
        ctl: &ctl,
        job_id: format!("cli-{}", uuid::Uuid::now_v7()),
        allowed: &allowed,
        recorded: Default::default(),
        backoff: Duration::from_millis(500),
    };
    let result = ladle::search::run::run_job(&driver, &sub.job).await;
    bar_done.cancel();
    if let Some(t) = bar_task {
        let _ = t.await;
    }
    match result {
        Ok(outcome) => {
            println!("{}", serde_json::to_string_pretty(&outcome)?);
            Ok(())
        }
        Err(e) => bail!("merge failed [{}]: {e}", e.code()),
    }
}

//! `ladle submit | status | list | cancel | watch`: a command-line client of a ladle server.
//!
//! The server is `--server` or `LADLE_SERVER` (default `http://127.0.0.1:8080`), the bearer token
//! `--token` or `LADLE_TOKEN`. Exit status: 0 when the job succeeded (or, for `status`, `list`
//! and `cancel`, when the server answered 2xx); 1 when it failed or was cancelled; 2 when the
//! request was refused (the error code and message are printed) or the server could not be
//! reached. `--wait` and `watch` follow the job's event stream (`GET /v1/merges/{id}/events`)
//! with a progress bar on stderr, resuming with `Last-Event-ID` if the connection drops.
//!
//! YAML recipes: over HTTP there is no recipe folder, so a model named by a path (relative or
//! absolute) instead of a storage URL is refused here, before anything is sent, with the URL to
//! use instead; `ladle merge recipe.yml` resolves such paths locally.

pub mod sse;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

/// Exit status: the job succeeded (or the request did what was asked).
pub const EXIT_OK: u8 = 0;
/// Exit status: the job failed or was cancelled.
pub const EXIT_JOB_FAILED: u8 = 1;
/// Exit status: the request was refused, or the server could not be reached.
pub const EXIT_REFUSED: u8 = 2;

/// Where the server is.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// The server's base URL.
    #[arg(long, env = "LADLE_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// Bearer token, when the server requires one.
    #[arg(long, env = "LADLE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// The client subcommands (flattened into `ladle`'s).
#[derive(Debug, Clone, Subcommand)]
pub enum ClientCommand {
    /// Submit a recipe (JSON, or mergekit YAML by its .yml/.yaml extension) and print the job id.
    Submit {
        recipe: PathBuf,
        /// Follow the job to its end (progress bar on stderr), then print the result.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Print a job (the JSON of `GET /v1/merges/{id}`).
    Status {
        id: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// List jobs, newest first: id, state, created, method.
    List {
        /// Only jobs in this state (queued, running, succeeded, failed, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// At most this many (1 to 500).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        conn: Connection,
    },
    /// Cancel a job.
    Cancel {
        id: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Follow a job to its end; exit 0 if it succeeded (also when it already had).
    Watch {
        id: String,
        #[command(flatten)]
        conn: Connection,
    },
}

/// Run a client command; the exit status.
pub async fn run(cmd: ClientCommand) -> u8 {
    let result = match cmd {
        ClientCommand::Submit { recipe, wait, conn } => {
            submit(&Client::new(conn), &recipe, wait).await
        }
        ClientCommand::Status { id, conn } => status(&Client::new(conn), &id).await,
        ClientCommand::List { state, limit, conn } => {
            list(&Client::new(conn), state.as_deref(), limit).await
        }
        ClientCommand::Cancel { id, conn } => cancel(&Client::new(conn), &id).await,
        ClientCommand::Watch { id, conn } => watch(&Client::new(conn), &id).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{e}");
            EXIT_REFUSED
        }
    }
}

/// Why a request did not give an answer to work with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("refused: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("cannot reach the server at {server}: {source}")]
    Unreachable {
        server: String,
        source: reqwest::Error,
    },
    #[error("{0}")]
    Local(String),
}

struct Client {
    http: reqwest::Client,
    conn: Connection,
}

impl Client {
    fn new(conn: Connection) -> Self {
        Client {
            http: reqwest::Client::new(),
            conn,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.conn.server.trim_end_matches('/'))
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, self.url(path));
        match &self.conn.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    fn unreachable(&self, source: reqwest::Error) -> ClientError {
        ClientError::Unreachable {
            server: self.conn.server.clone(),
            source,
        }
    }

    /// Send; a 2xx JSON answer, or the server's error as [`ClientError::Refused`].
    async fn json(&self, rb: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        let resp = rb.send().await.map_err(|e| self.unreachable(e))?;
        if resp.status().is_success() {
            return Ok(resp.json().await.unwrap_or(Value::Null));
        }
        self.json_error(resp).await
    }

    async fn get_job(&self, id: &str) -> Result<Value, ClientError> {
        self.json(self.request(reqwest::Method::GET, &format!("/v1/merges/{id}")))
            .await
    }
}

/// A YAML recipe's model references that are paths, neither storage URLs nor hub ids
/// (`org/name[@revision]`, which a server with a Hugging Face cache resolves): nothing the
/// server can open, it has no recipe folder.
fn yaml_paths(text: &str) -> Result<Vec<String>, ClientError> {
    let doc: Value = serde_saphyr::from_str(text)
        .map_err(|e| ClientError::Local(format!("the recipe is not valid YAML: {e}")))?;
    let mut refs: Vec<&Value> = Vec::new();
    for m in doc["models"].as_array().into_iter().flatten() {
        refs.push(&m["model"]);
    }
    for s in doc["slices"].as_array().into_iter().flatten() {
        for src in s["sources"].as_array().into_iter().flatten() {
            refs.push(&src["model"]);
        }
    }
    refs.push(&doc["base_model"]);
    Ok(refs
        .into_iter()
        .filter_map(Value::as_str)
        .filter(|s| !s.contains("://") && crate::storage::hf_cache::HubRef::parse(s).is_none())
        .map(str::to_string)
        .collect())
}

async fn submit(client: &Client, recipe: &std::path::Path, wait: bool) -> Result<u8, ClientError> {
    let text = std::fs::read_to_string(recipe)
        .map_err(|e| ClientError::Local(format!("cannot read {}: {e}", recipe.display())))?;
    let yaml = matches!(
        recipe.extension().and_then(|e| e.to_str()),
        Some("yml" | "yaml")
    );
    if yaml {
        let paths = yaml_paths(&text)?;
        if let Some(p) = paths.first() {
            return Err(ClientError::Local(format!(
                "{}: model {p:?} is a path; the server cannot resolve paths of your machine \
                 (over HTTP there is no recipe folder). Name every model by a storage URL the \
                 server may read (file:///abs/path/ on the server's filesystem, s3://bucket/…, \
                 or a hub id org/name when the server has a Hugging Face cache), or run \
                 `ladle merge {}` locally",
                recipe.display(),
                recipe.display()
            )));
        }
    }
    let content_type = if yaml {
        "application/yaml"
    } else {
        "application/json"
    };
    let job = client
        .json(
            client
                .request(reqwest::Method::POST, "/v1/merges")
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(text),
        )
        .await?;
    let id = job["id"].as_str().unwrap_or_default().to_string();
    println!("{id}");
    if !wait {
        return Ok(EXIT_OK);
    }
    follow(client, &id).await
}

async fn status(client: &Client, id: &str) -> Result<u8, ClientError> {
    let job = client.get_job(id).await?;
    println!("{}", serde_json::to_string_pretty(&job).unwrap_or_default());
    Ok(EXIT_OK)
}

async fn list(client: &Client, state: Option<&str>, limit: u32) -> Result<u8, ClientError> {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair("limit", &limit.to_string());
    if let Some(s) = state {
        query.append_pair("state", s);
    }
    let path = format!("/v1/merges?{}", query.finish());
    let page = client
        .json(client.request(reqwest::Method::GET, &path))
        .await?;
    for j in page["jobs"].as_array().into_iter().flatten() {
        println!(
            "{}  {:<9}  {}  {}",
            j["id"].as_str().unwrap_or_default(),
            j["state"].as_str().unwrap_or_default(),
            j["created_at"].as_str().unwrap_or_default(),
            j["recipe"]["method"].as_str().unwrap_or_default(),
        );
    }
    Ok(EXIT_OK)
}

async fn cancel(client: &Client, id: &str) -> Result<u8, ClientError> {
    let job = client
        .json(client.request(reqwest::Method::POST, &format!("/v1/merges/{id}/cancel")))
        .await?;
    let state = job["state"].as_str().unwrap_or_default();
    if state == "cancelled" {
        println!("cancelled");
    } else {
        println!("cancel requested (the job is {state}; its worker stops within a heartbeat)");
    }
    Ok(EXIT_OK)
}

async fn watch(client: &Client, id: &str) -> Result<u8, ClientError> {
    // A 404 or a bad id is refused before any stream.
    client.get_job(id).await?;
    follow(client, id).await
}

/// Follow the job's events to its end; print the outcome; its exit status.
async fn follow(client: &Client, id: &str) -> Result<u8, ClientError> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:>10} [{bar:40}] {pos}/{len} tensors")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut last_id: Option<String> = None;
    let mut failures = 0u32;
    let done = loop {
        match stream_once(client, id, &bar, &mut last_id).await {
            Ok(Some(view)) => break view,
            // 204 (resumed after the end) or the stream ended early: ask for the job itself.
            Ok(None) => {
                let view = client.get_job(id).await?;
                if is_terminal(&view) {
                    break view;
                }
            }
            Err(ClientError::Unreachable { .. }) if failures < 10 => {}
            Err(e) => {
                bar.finish_and_clear();
                return Err(e);
            }
        }
        failures += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    bar.finish_and_clear();
    Ok(outcome(&done))
}

fn is_terminal(view: &Value) -> bool {
    matches!(
        view["state"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

/// One connection to the event stream: `Some(view)` at `done`, `None` if it ended without.
async fn stream_once(
    client: &Client,
    id: &str,
    bar: &ProgressBar,
    last_id: &mut Option<String>,
) -> Result<Option<Value>, ClientError> {
    let mut rb = client
        .request(reqwest::Method::GET, &format!("/v1/merges/{id}/events"))
        .header(reqwest::header::ACCEPT, "text/event-stream");
    if let Some(last) = last_id.as_deref() {
        rb = rb.header("last-event-id", last);
    }
    let mut resp = rb.send().await.map_err(|e| client.unreachable(e))?;
    if resp.status() == reqwest::StatusCode::NO_CONTENT {
        return Ok(None);
    }
    if !resp.status().is_success() {
        return client.json_error(resp).await.map(|_| None);
    }
    let mut parser = sse::Parser::default();
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(None),
            Err(e) => return Err(client.unreachable(e)),
        };
        for ev in parser.feed(&chunk) {
            if ev.id.is_some() {
                *last_id = ev.id.clone();
            }
            let Ok(data) = serde_json::from_str::<Value>(&ev.data) else {
                continue;
            };
            match ev.event.as_str() {
                "state" => show(bar, &data["progress"], data["state"].as_str()),
                "progress" => show(bar, &data, None),
                "done" => return Ok(Some(data)),
                _ => {}
            }
        }
    }
}

impl Client {
    /// A non-2xx answer as [`ClientError::Refused`].
    async fn json_error(&self, resp: reqwest::Response) -> Result<Value, ClientError> {
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        Err(ClientError::Refused {
            code: body["code"]
                .as_str()
                .map_or_else(|| format!("http_{}", status.as_u16()), str::to_string),
            message: body["message"].as_str().unwrap_or_default().to_string(),
        })
    }
}

fn show(bar: &ProgressBar, progress: &Value, state: Option<&str>) {
    if let Some(total) = progress["tensors_total"].as_u64() {
        bar.set_length(total);
    }
    if let Some(done) = progress["tensors_done"].as_u64() {
        bar.set_position(done);
    }
    let msg = progress["phase"]
        .as_str()
        .or(state)
        .unwrap_or_default()
        .to_string();
    if !msg.is_empty() {
        bar.set_message(msg);
    }
}

/// Print a terminal job's outcome; its exit status.
fn outcome(view: &Value) -> u8 {
    match view["state"].as_str() {
        Some("succeeded") => {
            println!(
                "succeeded: {}",
                view["result"]["uri"].as_str().unwrap_or_default()
            );
            EXIT_OK
        }
        Some(state) => {
            let code = view["error"]["code"].as_str().unwrap_or("cancelled");
            let message = view["error"]["message"].as_str().unwrap_or_default();
            println!("{state}: {code}: {message}");
            EXIT_JOB_FAILED
        }
        None => EXIT_JOB_FAILED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_paths_are_found() {
        let text = "merge_method: linear\nbase_model: file:///data/base/\nmodels:\n  - model: ./ft-a\n  - model: s3://b/ft-b/\n";
        assert_eq!(yaml_paths(text).ok(), Some(vec!["./ft-a".to_string()]));
        let text = "merge_method: passthrough\nslices:\n  - sources:\n      - model: /abs/ft\n        layer_range: [0, 2]\n";
        assert_eq!(yaml_paths(text).ok(), Some(vec!["/abs/ft".to_string()]));
        let text = "merge_method: linear\nmodels:\n  - model: org/name@v1\n  - model: ft/a/b\n";
        assert_eq!(yaml_paths(text).ok(), Some(vec!["ft/a/b".to_string()]));
    }
}

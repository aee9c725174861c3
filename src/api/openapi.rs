//! The OpenAPI 3.1 document (`GET /openapi.json`) and its rendering (`GET /docs`).
//!
//! Paths, parameters, bodies and schemas come from the handlers' `#[utoipa::path]` attributes
//! and the types' `ToSchema` derives, collected by `utoipa_axum`'s router: a route registered
//! through [`super::api_routes`] is documented, and only those are served. [`document`] adds
//! what every operation shares: the error responses (every [`ErrorCode`] under its HTTP
//! status, an example each, from [`ErrorCode::ALL`]), the `x-request-id` header of every
//! response ([`REQUEST_ID_HEADER`], set by [`crate::telemetry::access_log`] on all routes) and
//! the bearer security of `/v1/*`.
//! Every served route is documented but the `/ui` dashboard's (`/ui`, `/ui/app.js`,
//! `/ui/style.css`): a page for people, not part of the contract (the description names it).
//! `/docs` is Swagger UI, vendored from the npm package `swagger-ui-dist` (see
//! `assets/swagger-ui/README.md`) and embedded in the binary: it works with no internet access.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};
use utoipa::OpenApi;

use super::ApiError;
use crate::error::ErrorCode;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ladle",
        description = "Merges fine-tuned checkpoints into model soups: submit a recipe, follow \
            the job (poll it or stream its events), read the manifest URL of the result. \
            Errors are `{\"code\", \"message\"}` with a stable `code` (schema `ErrorCode`) \
            and the request's `request_id`; every response carries it as `x-request-id`. \
            A job may carry `notify` (signed webhooks on its state changes, Standard Webhooks \
            headers; see the README). Not described here: the `/ui` dashboard (an HTML page for \
            people, with its script and style sheet).",
        license(name = "Apache-2.0")
    ),
    tags(
        (name = "merges", description = "Merge jobs: a recipe in, a soup (safetensors and a manifest) out."),
        (name = "analyses", description = "Diagnostics of a set of checkpoints as queued jobs."),
        (name = "events", description = "Server-Sent Events: live state and progress."),
        (name = "health", description = "Liveness, readiness and metrics (no authentication)."),
        (name = "meta", description = "This document and its rendering (no authentication)."),
    ),
    components(schemas(ErrorCode, ApiError))
)]
pub struct ApiDoc;

/// The codes an operation may answer with besides its successes, by operation id; every
/// `/v1` operation may also answer `unauthorized`, `internal`, `database_error` and
/// `database_unavailable`, and any other status carries an error body too (`default`).
fn errors_of(operation_id: &str) -> &'static [ErrorCode] {
    use ErrorCode::*;
    match operation_id {
        "submit_merge" | "submit_analysis" => &[
            InvalidRecipe,
            InvalidUri,
            StorageNotAllowed,
            IdempotencyKeyReused,
            OutputInUse,
            RequestTimeout,
            PayloadTooLarge,
            UnsupportedMediaType,
            CheckpointNotFound,
            CheckpointMalformed,
            StorageError,
        ],
        "list_merges" | "list_analyses" => &[InvalidRecipe],
        "get_merge" | "get_analysis" | "merge_events" | "analysis_events" => &[NotFound],
        "cancel_merge" | "cancel_analysis" => &[NotFound, NotCancellable],
        _ => &[],
    }
}

const COMMON_V1: [ErrorCode; 4] = [
    ErrorCode::Unauthorized,
    ErrorCode::Internal,
    ErrorCode::DatabaseError,
    ErrorCode::DatabaseUnavailable,
];

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// The name of the shared response header under `components/headers`.
const REQUEST_ID_HEADER: &str = "RequestId";

fn request_id_header() -> Value {
    json!({
        "description": "The request's id: the client's `x-request-id` when it sent 1 to 128 \
            visible ASCII characters without quotes or backslashes, else a generated UUIDv7. \
            Error bodies repeat it as `request_id`; the server's log lines of the request \
            carry it.",
        "required": true,
        "schema": {"type": "string", "example": "0193a4f2-7c1e-7b40-9d2a-5f0c3e8b1a66"},
    })
}

fn error_ref() -> Value {
    json!({"$ref": "#/components/schemas/ApiError"})
}

/// One error response: the codes sharing `status`, an example each.
fn error_response(status: u16, codes: &[ErrorCode]) -> Value {
    let mut examples = serde_json::Map::new();
    for code in codes {
        let message = match status {
            500..=599 => "(what kind of failure; the detail is in the server log)".to_string(),
            _ => format!("(what is wrong, naming the field or the job: {code})"),
        };
        examples.insert(
            code.as_str().to_string(),
            json!({"value": {
                "code": code.as_str(),
                "message": message,
                "request_id": "0193a4f2-7c1e-7b40-9d2a-5f0c3e8b1a66",
            }}),
        );
    }
    let names: Vec<String> = codes.iter().map(|c| format!("`{c}`")).collect();
    json!({
        "description": format!("Refused or failed: {}.", names.join(", ")),
        "content": {"application/json": {"schema": error_ref(), "examples": examples}},
    })
}

/// The finished document: `api` (from the router) plus errors, security and code table.
pub fn document(api: utoipa::openapi::OpenApi) -> Value {
    let mut doc = serde_json::to_value(&api).unwrap_or(Value::Null);
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for (path, item) in paths.iter_mut() {
            let v1 = path.starts_with("/v1/");
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for (method, op) in item.iter_mut() {
                if !METHODS.contains(&method.as_str()) {
                    continue;
                }
                let id = op
                    .get("operationId")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let mut codes: Vec<ErrorCode> = errors_of(&id).to_vec();
                if v1 {
                    codes.extend(COMMON_V1);
                }
                let mut by_status: std::collections::BTreeMap<u16, Vec<ErrorCode>> =
                    Default::default();
                for code in codes {
                    by_status.entry(code.http_status()).or_default().push(code);
                }
                if let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) {
                    for (status, codes) in by_status {
                        responses
                            .entry(status.to_string())
                            .or_insert_with(|| error_response(status, &codes));
                    }
                    if v1 {
                        // Any other status (a limit, a proxy) still carries an error body.
                        responses.entry("default").or_insert_with(|| {
                            json!({
                                "description": "Any other error: `{\"code\", \"message\", \"request_id\"}`.",
                                "content": {"application/json": {"schema": error_ref()}},
                            })
                        });
                    }
                    // Every response of every route carries the request id.
                    for response in responses.values_mut().filter_map(Value::as_object_mut) {
                        if let Some(headers) = response
                            .entry("headers")
                            .or_insert_with(|| json!({}))
                            .as_object_mut()
                        {
                            headers.insert(
                                "x-request-id".into(),
                                json!({"$ref": format!("#/components/headers/{REQUEST_ID_HEADER}")}),
                            );
                        }
                    }
                }
                if v1 && let Some(op) = op.as_object_mut() {
                    op.insert("security".into(), json!([{"bearer": []}, {}]));
                }
            }
        }
    }
    if let Some(components) = doc.get_mut("components").and_then(Value::as_object_mut) {
        components.insert(
            "headers".into(),
            json!({REQUEST_ID_HEADER: request_id_header()}),
        );
        components.insert(
            "securitySchemes".into(),
            json!({"bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "`Authorization: Bearer <token>` when the server has tokens \
                    (`--api-token-sha256`); a loopback server without tokens needs none.",
            }}),
        );
        if let Some(code) = components
            .get_mut("schemas")
            .and_then(|s| s.get_mut("ErrorCode"))
            .and_then(Value::as_object_mut)
        {
            let mut table = String::from(
                "Stable error codes (never renamed). A request's error gets the HTTP status \
                 below; a failed job's `error.code` uses the same codes.\n\n\
                 | code | HTTP | retried by the queue |\n| --- | ---: | --- |\n",
            );
            for c in ErrorCode::ALL {
                let retried = if c.retryable() { "yes" } else { "no" };
                table.push_str(&format!("| `{c}` | {} | {retried} |\n", c.http_status()));
            }
            code.insert("description".into(), Value::String(table));
        }
    }
    doc
}

/// The served bytes of the document, built once.
fn document_bytes() -> &'static Bytes {
    static DOC: OnceLock<Bytes> = OnceLock::new();
    DOC.get_or_init(|| {
        let doc = super::openapi_document();
        Bytes::from(serde_json::to_vec_pretty(&doc).unwrap_or_default())
    })
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document.", content_type = "application/json", body = serde_json::Value))
)]
pub async fn openapi_json() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        document_bytes().clone(),
    )
        .into_response()
}

const DOCS_HTML: &str = r##"<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>ladle API</title>
  <link rel="stylesheet" href="/docs/swagger-ui.css">
  <link rel="icon" type="image/png" href="/docs/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true});
  </script>
</body>
</html>
"##;

/// The document rendered by Swagger UI (served from this binary, no CDN).
#[utoipa::path(
    get,
    path = "/docs",
    operation_id = "docs",
    tag = "meta",
    responses((status = 200, description = "An HTML page.", content_type = "text/html", body = String))
)]
pub async fn docs() -> Html<&'static str> {
    Html(DOCS_HTML)
}

/// The vendored Swagger UI files `/docs` loads.
#[utoipa::path(
    get,
    path = "/docs/{asset}",
    operation_id = "docs_asset",
    tag = "meta",
    params(("asset" = String, Path, description = "`swagger-ui-bundle.js`, `swagger-ui.css` or `favicon-32x32.png`.")),
    responses(
        (status = 200, description = "The file.", content(
            (String = "text/javascript"), (String = "text/css"), (String = "image/png"))),
        (status = 404, description = "No such file.", body = ApiError),
    )
)]
pub async fn docs_asset(Path(asset): Path<String>) -> Response {
    let (content_type, bytes): (&str, &'static [u8]) = match asset.as_str() {
        "swagger-ui-bundle.js" => (
            "text/javascript",
            include_bytes!("../../assets/swagger-ui/swagger-ui-bundle.js"),
        ),
        "swagger-ui.css" => (
            "text/css",
            include_bytes!("../../assets/swagger-ui/swagger-ui.css"),
        ),
        "favicon-32x32.png" => (
            "image/png",
            include_bytes!("../../assets/swagger-ui/favicon-32x32.png"),
        ),
        _ => {
            return ApiError::new(ErrorCode::NotFound, format!("no docs file {asset:?}"))
                .into_response();
        }
    };
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        bytes,
    )
        .into_response()
}

//! The OpenAPI contract: the generated document against its committed snapshot
//! (`tests/snapshots/openapi.json`, which `clients/python/` is generated from), its coverage
//! (every route, every error code), and what the running server serves at `/openapi.json` and
//! `/docs` (Swagger UI from the binary, no CDN).
//!
//! After an intended API change: `LADLE_UPDATE_SNAPSHOTS=1 cargo test --test openapi`, then
//! regenerate the Python client (`clients/python/regenerate.sh`).

mod common;

use common::*;
use ladle::error::ErrorCode;
use ladle::service::Mode;

const SNAPSHOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/snapshots/openapi.json");

fn document_text() -> String {
    let doc = ladle::api::openapi_document();
    serde_json::to_string_pretty(&doc).expect("json") + "\n"
}

#[test]
fn document_matches_snapshot() {
    let text = document_text();
    if std::env::var_os("LADLE_UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(SNAPSHOT, &text).expect("write the snapshot");
        return;
    }
    let committed = std::fs::read_to_string(SNAPSHOT).unwrap_or_default();
    assert!(
        committed == text,
        "the OpenAPI document changed: review it, then run \
         `LADLE_UPDATE_SNAPSHOTS=1 cargo test --test openapi` and clients/python/regenerate.sh"
    );
}

#[test]
fn document_covers_every_route_and_code() {
    let doc = ladle::api::openapi_document();
    assert_eq!(doc["openapi"], "3.1.0");
    let want = [
        ("/v1/merges", "post", "submit_merge"),
        ("/v1/merges", "get", "list_merges"),
        ("/v1/merges/{id}", "get", "get_merge"),
        ("/v1/merges/{id}/cancel", "post", "cancel_merge"),
        ("/v1/merges/{id}/events", "get", "merge_events"),
        ("/v1/analyses", "post", "submit_analysis"),
        ("/v1/analyses", "get", "list_analyses"),
        ("/v1/analyses/{id}", "get", "get_analysis"),
        ("/v1/analyses/{id}/cancel", "post", "cancel_analysis"),
        ("/v1/analyses/{id}/events", "get", "analysis_events"),
        ("/v1/events", "get", "all_events"),
        ("/healthz", "get", "healthz"),
        ("/readyz", "get", "readyz"),
        ("/metrics", "get", "metrics"),
        ("/openapi.json", "get", "openapi"),
        ("/docs", "get", "docs"),
        ("/docs/{asset}", "get", "docs_asset"),
    ];
    for (path, method, id) in want {
        assert_eq!(
            doc["paths"][path][method]["operationId"], id,
            "{method} {path}"
        );
    }
    // Both request content types of a merge, with examples.
    let content = &doc["paths"]["/v1/merges"]["post"]["requestBody"]["content"];
    assert!(content["application/json"]["schema"].is_object());
    assert!(content["application/yaml"]["example"].is_string());
    assert!(doc["components"]["schemas"]["MergeRequest"]["example"].is_object());
    // Every error code is in the ErrorCode schema and its table, and the error responses of
    // the operations carry an example per code under the code's status.
    let codes: Vec<&str> = doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .expect("ErrorCode enum")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let all: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(codes, all);
    let table = doc["components"]["schemas"]["ErrorCode"]["description"]
        .as_str()
        .expect("table");
    for c in ErrorCode::ALL {
        assert!(
            table.contains(&format!("| `{c}` | {} |", c.http_status())),
            "{c} in the table"
        );
    }
    let submit = &doc["paths"]["/v1/merges"]["post"]["responses"];
    let example = &submit["409"]["content"]["application/json"]["examples"]["output_in_use"];
    assert_eq!(example["value"]["code"], "output_in_use");
    assert!(submit["default"].is_object());
    let get = &doc["paths"]["/v1/merges/{id}"]["get"]["responses"];
    assert_eq!(
        get["404"]["content"]["application/json"]["examples"]["not_found"]["value"]["code"],
        "not_found"
    );
    assert_eq!(
        doc["paths"]["/v1/merges/{id}/events"]["get"]["responses"]["200"]["content"]
            .as_object()
            .map(|c| c.keys().cloned().collect::<Vec<_>>()),
        Some(vec!["text/event-stream".to_string()])
    );
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

/// The error body's `request_id` and the `x-request-id` header are in the contract: the
/// schema has the property (with an example), and every response of every operation names
/// the shared header.
#[test]
fn document_describes_the_request_id() {
    let doc = ladle::api::openapi_document();
    let error = &doc["components"]["schemas"]["ApiError"];
    assert_eq!(error["properties"]["request_id"]["type"], "string");
    assert!(error["example"]["request_id"].is_string());
    let header = &doc["components"]["headers"]["RequestId"];
    assert_eq!(header["schema"]["type"], "string");
    let mut responses = 0;
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            for (status, response) in op["responses"].as_object().expect("responses") {
                assert_eq!(
                    response["headers"]["x-request-id"]["$ref"], "#/components/headers/RequestId",
                    "{method} {path} {status}"
                );
                responses += 1;
            }
        }
    }
    assert!(responses > 40, "{responses} responses");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_serves_the_document_and_docs_offline() {
    let tmp = tempfile::tempdir().expect("tmp");
    let url = format!("sqlite://{}", tmp.path().join("ladle.db").display());
    let settings = test_settings(tmp.path(), &url, vec![], None);
    let (service, base) = start(&settings, Mode::Api).await;
    let client = reqwest::Client::new();

    let r = client
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let served: serde_json::Value = r.json().await.expect("json");
    assert_eq!(served, ladle::api::openapi_document());

    let r = client
        .get(format!("{base}/docs"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    let html = r.text().await.expect("html");
    assert!(html.contains("/docs/swagger-ui-bundle.js") && html.contains("/openapi.json"));
    // Nothing is fetched from elsewhere: every src/href is a path of this server.
    for attr in ["src=\"", "href=\""] {
        for part in html.split(attr).skip(1) {
            assert!(part.starts_with('/'), "{attr}{part}");
        }
    }
    for (file, ct) in [
        ("swagger-ui-bundle.js", "text/javascript"),
        ("swagger-ui.css", "text/css"),
    ] {
        let r = client
            .get(format!("{base}/docs/{file}"))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 200, "{file}");
        assert_eq!(r.headers()["content-type"], ct);
        assert!(r.bytes().await.expect("bytes").len() > 10_000, "{file}");
    }
    let r = client
        .get(format!("{base}/docs/nope.js"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
    // As documented: the header on the response, its value in the error body.
    let id = r.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_string();
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["request_id"], id.as_str());
    service.shutdown().await;
}

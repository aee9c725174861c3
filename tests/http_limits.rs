//! The HTTP server's limits (`src/api/limits.rs`) against slow, silent and greedy clients, over
//! real sockets to the real service: slowloris heads (on the API port and on a worker's
//! `--metrics-bind` port), slow bodies, silent and idle keep-alive connections, the connection
//! cap, an early 413, and content types matched exactly.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ladle::api::limits::HttpLimits;
use ladle::service::{Mode, Service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::*;

/// An API-only service on a random port with these limits.
async fn server(
    header_s: f64,
    body_s: f64,
    max_connections: usize,
) -> (tempfile::TempDir, Service, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let db = format!("sqlite://{}", data.join("ladle.db").display());
    let mut settings = test_settings(&data, &db, vec![], None);
    settings.http = HttpLimits {
        header_timeout: Duration::from_secs_f64(header_s),
        body_timeout: Duration::from_secs_f64(body_s),
        max_connections,
    };
    let (service, _) = start(&settings, Mode::Api).await;
    let addr = service.addr.expect("the API listens");
    (dir, service, addr)
}

/// Read until the server closes the connection (EOF or reset); everything it sent, and
/// whether it closed within `limit`.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (got, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// One `GET /healthz` on a fresh connection: the status line and how long the answer took.
async fn healthz(addr: SocketAddr) -> (String, Duration) {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (got, closed) = read_until_closed(&mut s, Duration::from_secs(10)).await;
    assert!(closed, "healthz connection not closed");
    let text = String::from_utf8_lossy(&got);
    (
        text.lines().next().unwrap_or_default().to_string(),
        t.elapsed(),
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// 200 connections that send a request head one header line every 300 ms and never finish
/// it are all closed by the header timeout, while `/healthz` on other connections answers
/// within 100 ms the whole time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slowloris_heads_are_closed_while_healthz_answers() {
    let header = Duration::from_secs(2);
    let (_dir, service, addr) = server(header.as_secs_f64(), 30.0, 1024).await;
    slowloris(addr, header, "API port").await;
    service.shutdown().await;
}

/// The same attack on a worker-only process's `--metrics-bind` listener (its `/healthz`,
/// `/readyz` and `/metrics`): it is served with the same limits, so the same holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slowloris_on_the_worker_metrics_port_is_closed_too() {
    let header = Duration::from_secs(2);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let db = format!("sqlite://{}", data.join("ladle.db").display());
    let mut settings = test_settings(&data, &db, vec![], None);
    settings.http.header_timeout = header;
    settings.metrics_bind = Some("127.0.0.1:0".parse().unwrap());
    let (service, _) = start(&settings, Mode::Worker).await;
    assert!(service.addr.is_none(), "a worker serves no API");
    let addr = service.metrics_addr.expect("the metrics listener");
    slowloris(addr, header, "worker --metrics-bind").await;
    service.shutdown().await;
}

/// 200 slowloris connections to `addr`, `/healthz` probed meanwhile; the figures go to
/// stderr uncaptured, and every connection must close at the header timeout.
async fn slowloris(addr: SocketAddr, header: Duration, what: &str) {
    const N: usize = 200;
    let mut lorises = tokio::task::JoinSet::new();
    for _ in 0..N {
        lorises.spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let opened = Instant::now();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
                .await
                .unwrap();
            let mut buf = [0u8; 1024];
            loop {
                if opened.elapsed() > Duration::from_secs(20) {
                    return None;
                }
                tokio::select! {
                    r = s.read(&mut buf) => match r {
                        Ok(0) | Err(_) => return Some(opened.elapsed()),
                        Ok(_) => {}
                    },
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {
                        if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
                            return Some(opened.elapsed());
                        }
                    }
                }
            }
        });
    }
    // Probe /healthz every 50 ms while the attack runs, until every loris is gone.
    let mut probes = Vec::new();
    let attack = Instant::now();
    while attack.elapsed() < header + Duration::from_secs(1) {
        let (status, took) = healthz(addr).await;
        assert!(
            status.contains(" 200 "),
            "healthz during the attack: {status}"
        );
        probes.push(took);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut closed: Vec<Duration> = Vec::new();
    while let Some(r) = lorises.join_next().await {
        closed.push(
            r.unwrap()
                .expect("a slowloris connection stayed open for 20 s"),
        );
    }
    closed.sort();
    probes.sort();
    let fig = format!(
        "slowloris ({what}): {N} connections, header timeout {:.0} ms: closed after median {:.0} ms, \
         max {:.0} ms; /healthz meanwhile: {} probes, median {:.1} ms, p95 {:.1} ms, max {:.1} ms",
        ms(header),
        ms(percentile(&closed, 0.5)),
        ms(closed[N - 1]),
        probes.len(),
        ms(percentile(&probes, 0.5)),
        ms(percentile(&probes, 0.95)),
        ms(probes[probes.len() - 1]),
    );
    {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "{fig}");
    }
    assert!(
        closed[0] >= header - Duration::from_millis(100),
        "closed before the timeout: {fig}"
    );
    assert!(
        closed[N - 1] <= header + Duration::from_secs(1),
        "not closed within the timeout: {fig}"
    );
    assert!(
        probes[probes.len() - 1] < Duration::from_millis(100),
        "healthz slower than 100 ms: {fig}"
    );
}

/// A connection that sends nothing, and a keep-alive connection idle after a response, are
/// closed after the header timeout; a connection that keeps sending requests is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_are_closed() {
    let header = Duration::from_secs(1);
    let (_dir, service, addr) = server(header.as_secs_f64(), 30.0, 1024).await;

    let mut silent = TcpStream::connect(addr).await.unwrap();
    let t = Instant::now();
    let (_, closed) = read_until_closed(&mut silent, Duration::from_secs(5)).await;
    let silent_after = t.elapsed();
    assert!(closed, "a silent connection stayed open for 5 s");

    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let t = Instant::now();
    let (_, closed) = read_until_closed(&mut idle, Duration::from_secs(5)).await;
    let idle_after = t.elapsed();
    assert!(closed, "an idle keep-alive connection stayed open for 5 s");
    for (what, after) in [("silent", silent_after), ("idle", idle_after)] {
        assert!(
            after >= header - Duration::from_millis(100)
                && after <= header + Duration::from_millis(900),
            "{what} connection closed after {after:?} (timeout {header:?})"
        );
    }

    // Busy keep-alive: a request every 400 ms for 3 s, each answered on the same connection.
    let mut busy = TcpStream::connect(addr).await.unwrap();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        busy.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let n = tokio::time::timeout(Duration::from_secs(2), busy.read(&mut buf))
            .await
            .expect("answer on the busy connection")
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    service.shutdown().await;
}

/// 50 bodies trickled one byte every 200 ms get 408 `request_timeout` at the body timeout
/// and their connections are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_bodies_are_cut_at_the_body_timeout() {
    const N: usize = 50;
    let body = Duration::from_secs(1);
    let (_dir, service, addr) = server(10.0, body.as_secs_f64(), 1024).await;
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..N {
        slow.spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(
                b"POST /v1/merges HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
                  Content-Length: 1000\r\n\r\n{",
            )
            .await
            .unwrap();
            let sent_head = Instant::now();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                if sent_head.elapsed() > Duration::from_secs(10) {
                    return (None, got);
                }
                tokio::select! {
                    r = s.read(&mut buf) => match r {
                        Ok(0) | Err(_) => return (Some(sent_head.elapsed()), got),
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    },
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {
                        if s.write_all(b" ").await.is_err() {
                            return (Some(sent_head.elapsed()), got);
                        }
                    }
                }
            }
        });
    }
    let mut closed = Vec::new();
    let mut answered_408 = 0;
    while let Some(r) = slow.join_next().await {
        let (after, got) = r.unwrap();
        let after = after.expect("a slow body kept its connection for 10 s");
        let text = String::from_utf8_lossy(&got);
        if !text.is_empty() {
            assert!(text.starts_with("HTTP/1.1 408"), "{text}");
            assert!(text.contains("request_timeout"), "{text}");
            answered_408 += 1;
        }
        closed.push(after);
    }
    closed.sort();
    {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "slow bodies: {N} connections, body timeout {:.0} ms: closed after median {:.0} ms, \
             max {:.0} ms; {answered_408} read their 408",
            ms(body),
            ms(percentile(&closed, 0.5)),
            ms(closed[N - 1])
        );
    }
    assert!(closed[0] >= body - Duration::from_millis(100), "{closed:?}");
    assert!(
        closed[N - 1] <= body + Duration::from_millis(1500),
        "{closed:?}"
    );
    assert!(answered_408 > 0, "no slow client saw its 408");
    service.shutdown().await;
}

/// A `Content-Length` over the body limit is answered 413 at once, with no body sent, and the
/// connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_content_length_is_refused_before_the_body() {
    let (_dir, service, addr) = server(10.0, 30.0, 1024).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let t = Instant::now();
    s.write_all(
        b"POST /v1/merges HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
          Content-Length: 10000000000\r\n\r\n",
    )
    .await
    .unwrap();
    let (got, closed) = read_until_closed(&mut s, Duration::from_secs(2)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("\"payload_too_large\""), "{text}");
    assert!(closed, "the connection stayed open after the 413");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    service.shutdown().await;
}

/// With a cap of 4 connections held by silent clients, a fifth is served only once the header
/// timeout frees a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_for_a_slot() {
    let header = Duration::from_secs(1);
    let (_dir, service, addr) = server(header.as_secs_f64(), 30.0, 4).await;
    let mut holders = Vec::new();
    for _ in 0..4 {
        holders.push(TcpStream::connect(addr).await.unwrap());
    }
    let held = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _) = healthz(addr).await;
    let waited = held.elapsed();
    assert!(status.contains(" 200 "), "{status}");
    assert!(
        waited >= header - Duration::from_millis(100),
        "the fifth connection was served after {waited:?}, before a slot was free"
    );
    assert!(waited < header + Duration::from_secs(2), "{waited:?}");
    drop(holders);
    service.shutdown().await;
}

/// Content types are matched exactly: `application/jsonx` is not JSON (415), parameters such
/// as `charset=utf-8` are fine, and analyses take no YAML.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_types_are_matched_exactly() {
    let (_dir, service, addr) = server(10.0, 30.0, 1024).await;
    let client = reqwest::Client::new();
    let base = format!("http://{addr}");
    let post = |path: &str, ct: &str, body: &str| {
        client
            .post(format!("{base}{path}"))
            .header("content-type", ct)
            .body(body.to_string())
            .send()
    };
    for ct in [
        "application/jsonx",
        "application/json-patch+json",
        "text/plain",
    ] {
        let r = post("/v1/merges", ct, "{}").await.unwrap();
        assert_eq!(r.status().as_u16(), 415, "{ct}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["code"], "unsupported_media_type", "{ct}: {v}");
    }
    // Read as JSON: `{}` is then an invalid recipe, not an unsupported type.
    let r = post("/v1/merges", "application/json; charset=utf-8", "{}")
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["code"], "invalid_recipe", "{v}");
    let r = post("/v1/analyses", "application/yaml", "models: []")
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    service.shutdown().await;
}

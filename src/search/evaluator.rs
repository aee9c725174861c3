//! The evaluator protocol: `POST url` with the candidate's checkpoint URL, answered by
//! `200 {"score": <finite number>, "metrics": {...}}`. 4xx and bad answers fail the job;
//! 5xx, timeouts and connection errors are retried with backoff a bounded number of times.
//! Redirects are not followed (a redirect could leave the host allow-list), and proxies named by
//! `HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY` are ignored for the same reason.

use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;

use crate::error::ErrorCode;

/// Default allow-list: loopback only.
pub const DEFAULT_ALLOWED_HOSTS: [&str; 3] = ["127.0.0.0/8", "::1", "localhost"];
/// Largest evaluator answer read.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// Tries per evaluation (the first and the retries).
pub const MAX_TRIES: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum EvaluatorError {
    #[error("evaluation {id}: {message}")]
    Failed { id: String, message: String },
    #[error("evaluation {id}: evaluator unavailable after {tries} tries: {last}")]
    Unavailable {
        id: String,
        tries: u32,
        last: String,
    },
    #[error("evaluator host {host:?} is not allowed (allowed: {allowed})")]
    HostNotAllowed { host: String, allowed: String },
}

impl EvaluatorError {
    pub fn code(&self) -> ErrorCode {
        match self {
            EvaluatorError::Failed { .. } => ErrorCode::EvaluatorFailed,
            EvaluatorError::Unavailable { .. } => ErrorCode::EvaluatorUnavailable,
            EvaluatorError::HostNotAllowed { .. } => ErrorCode::InvalidRecipe,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Net { addr: IpAddr, prefix: u8 },
    Name(String),
}

/// Hosts an evaluator URL may name: IP networks (`10.0.0.0/8`, `::1`) or exact host names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHosts {
    entries: Vec<Entry>,
    text: String,
}

impl Default for AllowedHosts {
    fn default() -> Self {
        let list: Vec<String> = DEFAULT_ALLOWED_HOSTS
            .iter()
            .map(|s| s.to_string())
            .collect();
        // The defaults parse.
        AllowedHosts::parse(&list).unwrap_or(AllowedHosts {
            entries: Vec::new(),
            text: String::new(),
        })
    }
}

impl AllowedHosts {
    pub fn parse(list: &[String]) -> Result<AllowedHosts, String> {
        let mut entries = Vec::new();
        for raw in list {
            let s = raw.trim();
            if s.is_empty() {
                continue;
            }
            let (addr, prefix) = match s.split_once('/') {
                Some((a, p)) => (a, Some(p)),
                None => (s, None),
            };
            let ip = addr
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>();
            match (ip, prefix) {
                (Ok(addr), p) => {
                    let max = if addr.is_ipv4() { 32 } else { 128 };
                    let prefix = match p {
                        None => max,
                        Some(p) => p
                            .parse::<u8>()
                            .ok()
                            .filter(|p| *p <= max)
                            .ok_or_else(|| format!("{s:?}: bad prefix length"))?,
                    };
                    entries.push(Entry::Net { addr, prefix });
                }
                (Err(_), None)
                    if s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') =>
                {
                    entries.push(Entry::Name(s.to_ascii_lowercase()));
                }
                (Err(_), _) => {
                    return Err(format!(
                        "{s:?} is neither an IP network (a.b.c.d/n) nor a host name"
                    ));
                }
            }
        }
        Ok(AllowedHosts {
            entries,
            text: list.join(", "),
        })
    }

    /// Whether `url`'s host is allowed. Names match exactly (no DNS lookup here: a name is
    /// trusted as configured); IP literals match the networks.
    pub fn check(&self, url: &str) -> Result<(), EvaluatorError> {
        let not_allowed = |host: String| EvaluatorError::HostNotAllowed {
            host,
            allowed: self.text.clone(),
        };
        let parsed = url::Url::parse(url).map_err(|_| not_allowed(url.to_string()))?;
        let ok = match parsed.host() {
            Some(url::Host::Ipv4(ip)) => self.has_ip(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.has_ip(IpAddr::V6(ip)),
            Some(url::Host::Domain(d)) => {
                let d = d.to_ascii_lowercase();
                self.entries.iter().any(|e| *e == Entry::Name(d.clone()))
            }
            None => false,
        };
        if ok {
            Ok(())
        } else {
            Err(not_allowed(
                parsed.host_str().unwrap_or_default().to_string(),
            ))
        }
    }

    fn has_ip(&self, ip: IpAddr) -> bool {
        self.entries.iter().any(|e| match (e, ip) {
            (
                Entry::Net {
                    addr: IpAddr::V4(n),
                    prefix,
                },
                IpAddr::V4(ip),
            ) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(*prefix)).unwrap_or(0);
                u32::from(*n) & mask == u32::from(ip) & mask
            }
            (
                Entry::Net {
                    addr: IpAddr::V6(n),
                    prefix,
                },
                IpAddr::V6(ip),
            ) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(*prefix)).unwrap_or(0);
                u128::from(*n) & mask == u128::from(ip) & mask
            }
            _ => false,
        })
    }
}

/// The body sent to the evaluator.
#[derive(Debug, Clone, Serialize)]
pub struct Request<'a> {
    pub checkpoint: &'a str,
    pub job_id: &'a str,
    pub evaluation_id: &'a str,
    pub purpose: &'a str,
    pub recipe: serde_json::Value,
}

/// A valid answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub score: f64,
    pub metrics: serde_json::Value,
}

/// Decide what an answer body means (pure; unit-tested).
pub fn parse_answer(id: &str, body: &[u8]) -> Result<Answer, EvaluatorError> {
    let failed = |message: String| EvaluatorError::Failed {
        id: id.to_string(),
        message,
    };
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| failed(format!("the answer is not JSON: {e}")))?;
    let score = match v.get("score") {
        None | Some(serde_json::Value::Null) => {
            return Err(failed("the answer has no \"score\"".into()));
        }
        Some(s) => s
            .as_f64()
            .ok_or_else(|| failed(format!("\"score\" is not a number: {s}")))?,
    };
    if !score.is_finite() {
        return Err(failed(format!("\"score\" is not finite: {score}")));
    }
    Ok(Answer {
        score,
        metrics: v.get("metrics").cloned().unwrap_or(serde_json::Value::Null),
    })
}

/// Evaluator HTTP client.
pub struct Client {
    http: reqwest::Client,
    /// First pause between tries (doubled each retry).
    pub backoff: Duration,
}

impl Client {
    pub fn new() -> Result<Client, String> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // `HTTP(S)_PROXY` in the service's environment must not carry calls to an
            // allow-listed host through another one (the allow-list checks the URL's host).
            .no_proxy()
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Client {
            http,
            backoff: Duration::from_millis(500),
        })
    }

    /// One evaluation, with retries on 5xx, timeouts and connection errors.
    pub async fn evaluate(
        &self,
        url: &str,
        timeout: Duration,
        req: &Request<'_>,
    ) -> Result<Answer, EvaluatorError> {
        let answer = self.evaluate_with_retries(url, timeout, req).await;
        crate::metrics::evaluator_call(answer.as_ref().err().map(EvaluatorError::code));
        answer
    }

    async fn evaluate_with_retries(
        &self,
        url: &str,
        timeout: Duration,
        req: &Request<'_>,
    ) -> Result<Answer, EvaluatorError> {
        let id = req.evaluation_id;
        let mut pause = self.backoff;
        let mut last = String::new();
        for attempt in 1..=MAX_TRIES {
            match self.try_once(url, timeout, req).await {
                Ok(Ok(body)) => return parse_answer(id, &body),
                Ok(Err(e)) => return Err(e),
                Err(retryable) => last = retryable,
            }
            if attempt < MAX_TRIES {
                tracing::warn!(evaluation_id = id, error = %last, "evaluator call failed; retrying");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
        Err(EvaluatorError::Unavailable {
            id: id.to_string(),
            tries: MAX_TRIES,
            last,
        })
    }

    /// `Ok(Ok(body))` on 200, `Ok(Err)` on a final failure, `Err(reason)` when retryable.
    async fn try_once(
        &self,
        url: &str,
        timeout: Duration,
        req: &Request<'_>,
    ) -> Result<Result<Vec<u8>, EvaluatorError>, String> {
        let failed = |message: String| EvaluatorError::Failed {
            id: req.evaluation_id.to_string(),
            message,
        };
        let call = async {
            let mut resp = self
                .http
                .post(url)
                .json(req)
                .send()
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            let status = resp.status();
            if status.is_server_error() {
                return Err(format!("HTTP {status}"));
            }
            let mut body = Vec::new();
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| format!("reading the answer failed: {e}"))?
            {
                if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Ok(Err(failed(format!(
                        "the answer is larger than {MAX_RESPONSE_BYTES} bytes"
                    ))));
                }
                body.extend_from_slice(&chunk);
            }
            if status != reqwest::StatusCode::OK {
                let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
                return Ok(Err(failed(format!(
                    "the evaluator answered HTTP {status}: {text}"
                ))));
            }
            Ok(Ok(body))
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_allowed_by_default_and_nothing_else() {
        let a = AllowedHosts::default();
        assert!(a.check("http://127.0.0.1:8080/eval").is_ok());
        assert!(a.check("http://127.9.9.9/eval").is_ok());
        assert!(a.check("http://[::1]:1/eval").is_ok());
        assert!(a.check("http://LOCALHOST/eval").is_ok());
        assert!(a.check("http://10.0.0.1/eval").is_err());
        assert!(a.check("http://169.254.169.254/latest").is_err());
        assert!(a.check("http://localhost.evil.com/").is_err());
        assert!(a.check("http://[::2]/").is_err());
    }

    #[test]
    fn networks_and_names_parse() {
        let a = AllowedHosts::parse(&["10.1.0.0/16".into(), "eval.internal".into()]).unwrap();
        assert!(a.check("https://10.1.200.3/x").is_ok());
        assert!(a.check("https://10.2.0.1/x").is_err());
        assert!(a.check("https://eval.internal/x").is_ok());
        assert!(a.check("http://127.0.0.1/x").is_err());
        assert!(AllowedHosts::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(AllowedHosts::parse(&["bad host/8".into()]).is_err());
        let all = AllowedHosts::parse(&["0.0.0.0/0".into()]).unwrap();
        assert!(all.check("http://8.8.8.8/").is_ok());
    }

    #[test]
    fn answers_need_a_finite_score() {
        let a = parse_answer("j/0", br#"{"score": 0.5, "metrics": {"acc": 1}}"#).unwrap();
        assert_eq!(a.score, 0.5);
        assert_eq!(a.metrics["acc"], 1);
        for bad in [
            &br#"{"metrics": {}}"#[..],
            br#"{"score": null}"#,
            br#"{"score": "0.5"}"#,
            br#"{"score": NaN}"#,
            b"not json",
        ] {
            let e = parse_answer("j/3", bad).unwrap_err();
            assert!(e.to_string().contains("evaluation j/3"), "{e}");
            assert_eq!(e.code(), ErrorCode::EvaluatorFailed);
        }
    }
}

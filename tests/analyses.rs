//! Merge diagnostics end to end (`POST /v1/analyses`): the real service on a random port, a
//! real database (SQLite always; Postgres when `LADLE_TEST_POSTGRES_URL` is set) and, when
//! s3s-fs is installed, one input in a real S3-protocol server. The checkpoints hold task
//! vectors built to have known norms, cosines (0, ±1, 60°), sign conflicts and shared zeros;
//! every number of the result is also checked against a naive element-by-element computation
//! of the definitions written here.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use ladle::service::Mode;
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjPath;

const MODELS: usize = 4;
/// Elements of the designed tensor: 500 periods of 6.
const DESIGNED: usize = 3000;

fn f32_raw(name: &str, shape: &[usize], values: &[f32]) -> RawTensor {
    RawTensor {
        name: name.into(),
        dtype: safetensors::Dtype::F32,
        shape: shape.to_vec(),
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

fn base_designed(e: usize) -> f32 {
    (e % 7) as f32 * 0.25 - 0.75
}

/// Task vector of model `k` at element `e` of `designed.w` (period 6):
/// p = (1,1,0,1,1,0), q = (0,1,1,0,1,1), −2p, r = (1,−1,1,−1,1,−1).
fn delta(k: usize, e: usize) -> f32 {
    let p = [1.0, 1.0, 0.0, 1.0, 1.0, 0.0];
    let q = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0];
    let r = [1.0, -1.0, 1.0, -1.0, 1.0, -1.0];
    match k {
        0 => p[e % 6],
        1 => q[e % 6],
        2 => -2.0 * p[e % 6],
        _ => r[e % 6],
    }
}

/// The base's tensors.
fn base_tensors() -> Vec<RawTensor> {
    let designed: Vec<f32> = (0..DESIGNED).map(base_designed).collect();
    vec![
        f32_raw("designed.w", &[500, 6], &designed),
        f32_raw("sparse.w", &[1000], &[0.5; 1000]),
        bf16_tensor("random.w", &[64, 40], 7),
        f32_raw("nan.w", &[6], &[0.0, 0.5, 1.0, 1.5, 2.0, 2.5]),
        i64_tensor("position_ids", 16, 0),
        bf16_tensor("empty.w", &[0, 8], 1),
    ]
}

/// Model `k`'s tensors.
fn model_tensors(k: usize) -> Vec<RawTensor> {
    let designed: Vec<f32> = (0..DESIGNED)
        .map(|e| base_designed(e) + delta(k, e))
        .collect();
    // Zeros: models 0, 2, 3 at e % 4 == 0; model 1 at every even e. ∩ = 250, ∪ = 500.
    let sparse: Vec<f32> = (0..1000)
        .map(|e| {
            let zero = if k == 1 { e % 2 == 0 } else { e % 4 == 0 };
            if zero {
                0.0
            } else {
                1.0 + (e % 3) as f32 + k as f32
            }
        })
        .collect();
    let mut nan: Vec<f32> = (0..6)
        .map(|e| (e as f32 - 2.0) * (k as f32 + 1.0))
        .collect();
    if k == 3 {
        nan[0] = f32::NAN;
    }
    vec![
        f32_raw("designed.w", &[500, 6], &designed),
        f32_raw("sparse.w", &[1000], &sparse),
        bf16_tensor("random.w", &[64, 40], 100 + k as u64),
        f32_raw("nan.w", &[6], &nan),
        i64_tensor("position_ids", 16, k as u64),
        bf16_tensor("empty.w", &[0, 8], 1),
    ]
}

/// The definitions, element by element (independent of `merge::diagnostics`).
#[derive(Debug, Default)]
struct Naive {
    n: usize,
    base: bool,
    elements: u64,
    excluded: u64,
    sq: Vec<f64>,
    dot: Vec<Vec<f64>>,
    conflict: u64,
    conflict_models: Vec<u64>,
    zeros: Vec<u64>,
    zero_all: u64,
    zero_any: u64,
    nonfinite: Vec<u64>,
    nonfinite_base: u64,
}

impl Naive {
    fn new(n: usize, base: bool) -> Naive {
        Naive {
            n,
            base,
            sq: vec![0.0; n],
            dot: vec![vec![0.0; n]; n],
            conflict_models: vec![0; n],
            zeros: vec![0; n],
            nonfinite: vec![0; n],
            ..Default::default()
        }
    }

    fn add(&mut self, models: &[Vec<f32>], base: Option<&[f32]>) {
        let n = self.n;
        for e in 0..models[0].len() {
            self.elements += 1;
            let xs: Vec<f32> = models.iter().map(|m| m[e]).collect();
            let z = xs.iter().filter(|x| **x == 0.0).count();
            for (i, x) in xs.iter().enumerate() {
                self.zeros[i] += u64::from(*x == 0.0);
                self.nonfinite[i] += u64::from(!x.is_finite());
            }
            self.zero_all += u64::from(z == n);
            self.zero_any += u64::from(z > 0);
            let b = base.map(|b| b[e]);
            if let Some(b) = b {
                self.nonfinite_base += u64::from(!b.is_finite());
            }
            if xs.iter().chain(&b).any(|x| !x.is_finite()) {
                self.excluded += 1;
                continue;
            }
            let r = match b {
                Some(b) => f64::from(b),
                None => xs.iter().map(|x| f64::from(*x)).sum::<f64>() / n as f64,
            };
            let d: Vec<f64> = xs.iter().map(|x| f64::from(*x) - r).collect();
            for i in 0..n {
                self.sq[i] += d[i] * d[i];
                for j in 0..n {
                    self.dot[i][j] += d[i] * d[j];
                }
            }
            let pos = d.iter().any(|x| *x > 0.0);
            let neg = d.iter().any(|x| *x < 0.0);
            if pos && neg {
                self.conflict += 1;
                let elected = if d.iter().sum::<f64>() >= 0.0 {
                    1.0
                } else {
                    -1.0
                };
                for (c, x) in self.conflict_models.iter_mut().zip(&d) {
                    if *x != 0.0 && x.signum() != elected {
                        *c += 1;
                    }
                }
            }
        }
    }

    /// Compare with a `totals` or `tensors[name]` entry of the result.
    fn check(&self, got: &serde_json::Value, what: &str) {
        let close = |a: f64, b: f64, field: &str| {
            assert!(
                (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0),
                "{what}.{field}: got {a}, want {b}"
            );
        };
        let num = |v: &serde_json::Value| v.as_f64().unwrap_or_else(|| panic!("{what}: {v}"));
        assert_eq!(got["elements"].as_u64(), Some(self.elements), "{what}");
        for i in 0..self.n {
            close(num(&got["norms"][i]), self.sq[i].sqrt(), "norms");
            for j in 0..self.n {
                let c = &got["cosine"][i][j];
                if self.sq[i] == 0.0 || self.sq[j] == 0.0 {
                    assert!(c.is_null(), "{what}: cosine of a zero vector: {c}");
                } else {
                    let want = self.dot[i][j] / (self.sq[i].sqrt() * self.sq[j].sqrt());
                    close(num(c), want, "cosine");
                }
            }
        }
        let counted = (self.elements - self.excluded) as f64;
        if self.base && counted > 0.0 {
            close(
                num(&got["sign_conflict"]),
                self.conflict as f64 / counted,
                "sign_conflict",
            );
            for i in 0..self.n {
                close(
                    num(&got["sign_conflict_models"][i]),
                    self.conflict_models[i] as f64 / counted,
                    "sign_conflict_models",
                );
            }
        } else {
            assert!(got["sign_conflict"].is_null(), "{what}: {got}");
            assert!(got["sign_conflict_models"].is_null(), "{what}: {got}");
        }
        for i in 0..self.n {
            if self.elements == 0 {
                assert!(got["sparsity"][i].is_null());
            } else {
                close(
                    num(&got["sparsity"][i]),
                    self.zeros[i] as f64 / self.elements as f64,
                    "sparsity",
                );
            }
        }
        let shared = if self.zero_any == 0 {
            1.0
        } else {
            self.zero_all as f64 / self.zero_any as f64
        };
        close(num(&got["shared_zeros"]), shared, "shared_zeros");
        let nf = &got["nonfinite"];
        let models: Vec<u64> = nf["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(models, self.nonfinite, "{what}.nonfinite.models");
        assert_eq!(nf["excluded_elements"].as_u64(), Some(self.excluded));
        if self.base {
            assert_eq!(nf["base"].as_u64(), Some(self.nonfinite_base));
        } else {
            assert!(nf["base"].is_null());
        }
    }
}

fn float_values(t: &RawTensor) -> Vec<f32> {
    to_f32(t.dtype, &t.data)
}

/// Naive statistics per float tensor and in total for the given models (and base).
fn naive(models: &[Vec<RawTensor>], base: Option<&[RawTensor]>) -> (Vec<(String, Naive)>, Naive) {
    let n = models.len();
    let mut per = Vec::new();
    let mut total = Naive::new(n, base.is_some());
    for (ti, t) in models[0].iter().enumerate() {
        if t.dtype == safetensors::Dtype::I64 {
            continue;
        }
        let xs: Vec<Vec<f32>> = models.iter().map(|m| float_values(&m[ti])).collect();
        let b = base.map(|b| float_values(&b[ti]));
        let mut one = Naive::new(n, base.is_some());
        one.add(&xs, b.as_deref());
        total.add(&xs, b.as_deref());
        per.push((t.name.clone(), one));
    }
    (per, total)
}

async fn post(
    client: &reqwest::Client,
    base: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value, Option<String>) {
    let r = client
        .post(format!("{base}/v1/analyses"))
        .json(body)
        .send()
        .await
        .expect("post");
    let status = r.status().as_u16();
    let location = r
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (
        status,
        r.json().await.unwrap_or(serde_json::Value::Null),
        location,
    )
}

async fn get(client: &reqwest::Client, url: &str) -> (u16, serde_json::Value) {
    let r = client.get(url).send().await.expect("get");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

async fn wait_analysis(client: &reqwest::Client, base: &str, id: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, v) = get(client, &format!("{base}/v1/analyses/{id}")).await;
        assert_eq!(status, 200, "{v}");
        let state = v["state"].as_str().unwrap_or_default().to_string();
        if ["succeeded", "failed", "cancelled"].contains(&state.as_str()) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "analysis {id} stuck in {state}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn write_model(dir: &Path, tensors: &[RawTensor]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("model.safetensors"), safetensors_bytes(tensors)).unwrap();
}

async fn scenario(database_url: &str, backend: &str) {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().canonicalize().unwrap();
    let s3 = S3Server::start();
    if s3.is_none() {
        loud_skip(
            &format!("analyses S3 input on {backend}"),
            "s3s-fs not installed: run .ci/run or `cargo install s3s-fs@0.14.1 --features binary --locked`",
        );
    }
    let base_t = base_tensors();
    let models: Vec<Vec<RawTensor>> = (0..MODELS).map(model_tensors).collect();
    let base_dir = root.join("base");
    write_model(&base_dir, &base_t);
    let mut uris = Vec::new();
    for (k, m) in models.iter().enumerate() {
        let dir = root.join(format!("ft-{k}"));
        match k {
            // A sharded folder.
            1 => {
                write_sharded(&dir, m, 2);
                uris.push(file_url(&dir));
            }
            // In S3 when there is a server.
            3 if s3.is_some() => {
                let s3 = s3.as_ref().unwrap();
                s3.store()
                    .put(
                        &ObjPath::from("ft-3/model.safetensors"),
                        safetensors_bytes(m).into(),
                    )
                    .await
                    .unwrap();
                uris.push(format!("s3://{BUCKET}/ft-3/"));
            }
            // A single file named directly.
            2 => {
                write_model(&dir, m);
                uris.push(file_url(&dir.join("model.safetensors")));
            }
            _ => {
                write_model(&dir, m);
                uris.push(file_url(&dir));
            }
        }
    }
    let mut roots = vec![root.display().to_string()];
    if s3.is_some() {
        roots.push(format!("s3://{BUCKET}/"));
    }
    let settings = test_settings(&root.join("data"), database_url, roots, s3.as_ref());
    let client = reqwest::Client::new();

    // --- API only: nothing claims jobs. Cancel a queued analysis; ids do not cross kinds ---
    let (api, base) = start(&settings, Mode::Api).await;
    let (status, queued, location) = post(
        &client,
        &base,
        &serde_json::json!({"models": [uris[0], {"uri": uris[1]}]}),
    )
    .await;
    assert_eq!(status, 202, "{queued}");
    let queued_id = queued["id"].as_str().unwrap().to_string();
    assert_eq!(location, Some(format!("/v1/analyses/{queued_id}")));
    assert_eq!(queued["state"], "queued");
    let (status, merge) = submit(
        &client,
        &base,
        &serde_json::json!({
            "method": "linear", "models": [{"uri": uris[0]}, {"uri": uris[1]}],
            "output": {"uri": file_url(&root.join("soups/never"))}
        }),
    )
    .await;
    assert_eq!(status, 202, "{merge}");
    let merge_id = merge["id"].as_str().unwrap().to_string();
    let (status, e) = get(&client, &format!("{base}/v1/analyses/{merge_id}")).await;
    assert_eq!(
        (status, e["code"].as_str()),
        (404, Some("not_found")),
        "{e}"
    );
    let (status, e) = get(&client, &format!("{base}/v1/merges/{queued_id}")).await;
    assert_eq!(
        (status, e["code"].as_str()),
        (404, Some("not_found")),
        "{e}"
    );
    let r = client
        .post(format!("{base}/v1/analyses/{merge_id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404, "a merge is not cancelled here");
    for (path, id) in [("analyses", &queued_id), ("merges", &merge_id)] {
        let r = client
            .post(format!("{base}/v1/{path}/{id}/cancel"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["state"], "cancelled");
    }
    api.shutdown().await;

    // --- Bad requests: 4xx naming the field, nothing queued ---
    let (service, base) = start(&settings, Mode::Serve).await;
    let bad = [
        (
            serde_json::json!({"models": [uris[0]]}),
            400,
            "invalid_recipe",
            "models",
        ),
        (
            serde_json::json!({"models": [uris[0], "file:///etc/passwd"]}),
            403,
            "storage_not_allowed",
            "models[1].uri",
        ),
        (
            serde_json::json!({"models": [uris[0], "ftp://host/x"]}),
            400,
            "invalid_uri",
            "models[1].uri",
        ),
        (
            serde_json::json!({"models": [uris[0], uris[1]], "base_model": format!("{}/../../etc", file_url(&root))}),
            403,
            "storage_not_allowed",
            "base_model",
        ),
        (
            serde_json::json!({"models": [uris[0], {"uri": uris[1], "weight": 1}]}),
            400,
            "invalid_recipe",
            "models[1]",
        ),
        (
            serde_json::json!({"models": [uris[0], 5]}),
            400,
            "invalid_recipe",
            "models[1]",
        ),
        (
            serde_json::json!({"models": [uris[0], uris[1]], "output": {"uri": uris[0]}}),
            400,
            "invalid_recipe",
            "output",
        ),
        (
            serde_json::json!({"models": [uris[0], uris[1]], "priority": 5000}),
            400,
            "invalid_recipe",
            "priority",
        ),
        (
            serde_json::json!({"models": [uris[0], uris[1]], "max_attempts": 0}),
            400,
            "invalid_recipe",
            "max_attempts",
        ),
    ];
    for (body, want_status, code, field) in bad {
        let (status, e, _) = post(&client, &base, &body).await;
        assert_eq!(status, want_status, "{body} → {e}");
        assert_eq!(e["code"], code, "{body} → {e}");
        assert!(
            e["message"].as_str().unwrap_or_default().contains(field),
            "{body}: message must name {field}: {e}"
        );
    }
    let r = client
        .post(format!("{base}/v1/analyses"))
        .header("content-type", "application/yaml")
        .body("models: []")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);

    // --- Against the base: numbers by construction and by the naive computation ---
    let body = serde_json::json!({
        "models": uris.iter().map(|u| serde_json::json!({"uri": u})).collect::<Vec<_>>(),
        "base_model": file_url(&base_dir),
        "idempotency_key": format!("analysis-{backend}"),
        "priority": 3,
    });
    let (status, sub, _) = post(&client, &base, &body).await;
    assert_eq!(status, 202, "{sub}");
    let id = sub["id"].as_str().unwrap().to_string();
    let (status, again, _) = post(&client, &base, &body).await;
    assert_eq!((status, again["id"].as_str()), (200, Some(id.as_str())));
    let mut other = body.clone();
    other["models"] = serde_json::json!([uris[0], uris[1]]);
    let (status, e, _) = post(&client, &base, &other).await;
    assert_eq!(
        (status, e["code"].as_str()),
        (409, Some("idempotency_key_reused"))
    );
    let done = wait_analysis(&client, &base, &id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let result = &done["result"];
    assert_eq!(result["reference"], "base");
    assert_eq!(result["models"].as_array().unwrap().len(), MODELS);
    if s3.is_some() {
        assert!(result["models"][3].as_str().unwrap().starts_with("s3://"));
    }
    assert!(result["base_model"].as_str().unwrap().contains("/base"));
    assert_eq!(
        result["skipped"],
        serde_json::json!([{"name": "position_ids", "dtype": "I64"}])
    );
    assert_eq!(done["progress"]["tensors_total"], 5);
    assert_eq!(done["progress"]["tensors_done"], 5);
    assert!(done["progress"]["bytes_read"].as_u64().unwrap() > 0);

    // designed.w: the constructed task vectors.
    let d = &result["tensors"]["designed.w"];
    assert_eq!(d["shape"], serde_json::json!([500, 6]));
    let norms: Vec<f64> = (0..MODELS)
        .map(|i| d["norms"][i].as_f64().unwrap())
        .collect();
    let want_norms = [
        2000f64.sqrt(),
        2000f64.sqrt(),
        8000f64.sqrt(),
        3000f64.sqrt(),
    ];
    for (g, w) in norms.iter().zip(want_norms) {
        assert!((g - w).abs() < 1e-9, "norms {norms:?}");
    }
    let want_cos = [
        [1.0, 0.5, -1.0, 0.0],
        [0.5, 1.0, -0.5, 0.0],
        [-1.0, -0.5, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    for i in 0..MODELS {
        for j in 0..MODELS {
            let g = d["cosine"][i][j].as_f64().unwrap();
            assert!((g - want_cos[i][j]).abs() < 1e-12, "cosine[{i}][{j}] = {g}");
        }
    }
    // Per period of 6: 5 elements with mixed signs; opposing the elected sign: model 0 twice,
    // model 1 once, model 2 twice, model 3 once.
    assert!((d["sign_conflict"].as_f64().unwrap() - 5.0 / 6.0).abs() < 1e-12);
    let want_models = [2.0 / 6.0, 1.0 / 6.0, 2.0 / 6.0, 1.0 / 6.0];
    for (i, w) in want_models.iter().enumerate() {
        let g = d["sign_conflict_models"][i].as_f64().unwrap();
        assert!((g - w).abs() < 1e-12, "sign_conflict_models[{i}] = {g}");
    }
    // sparse.w: zeros at e % 4 == 0 (models 0, 2, 3) and e % 2 == 0 (model 1).
    let s = &result["tensors"]["sparse.w"];
    assert_eq!(s["sparsity"], serde_json::json!([0.25, 0.5, 0.25, 0.25]));
    assert_eq!(s["shared_zeros"], 0.5);
    // nan.w: model 3's NaN at element 0 is left out and counted.
    let nf = &result["tensors"]["nan.w"]["nonfinite"];
    assert_eq!(nf["models"], serde_json::json!([0, 0, 0, 1]));
    assert_eq!(nf["excluded_elements"], 1);
    assert_eq!(result["tensors"]["empty.w"]["elements"], 0);
    // Everything, against the naive computation.
    let (per, total) = naive(&models, Some(&base_t));
    for (name, want) in &per {
        want.check(&result["tensors"][name], name);
    }
    total.check(&result["totals"], "totals");
    assert_eq!(result["tensors"].as_object().unwrap().len(), per.len());
    assert_eq!(result["tensor_cosines"], true);

    // --- Without a base: deviations from the mean; two models give cosine −1 ---
    let (status, sub, _) = post(
        &client,
        &base,
        &serde_json::json!({"models": [uris[0], uris[2]]}),
    )
    .await;
    assert_eq!(status, 202, "{sub}");
    let done = wait_analysis(&client, &base, sub["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let result = &done["result"];
    assert_eq!(result["reference"], "mean");
    assert!(result["base_model"].is_null());
    let t = &result["totals"];
    assert!(
        (t["cosine"][0][1].as_f64().unwrap() + 1.0).abs() < 1e-12,
        "{t}"
    );
    assert!(t["sign_conflict"].is_null());
    let (per, total) = naive(&[models[0].clone(), models[2].clone()], None);
    for (name, want) in &per {
        want.check(&result["tensors"][name], name);
    }
    total.check(&result["totals"], "totals (mean)");

    // --- Failures: a missing checkpoint, a shape mismatch ---
    let (status, sub, _) = post(
        &client,
        &base,
        &serde_json::json!({"models": [uris[0], file_url(&root.join("nothing-here"))]}),
    )
    .await;
    assert_eq!(status, 202, "{sub}");
    let failed = wait_analysis(&client, &base, sub["id"].as_str().unwrap()).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "checkpoint_not_found", "{failed}");
    assert!(failed["result"].is_null());
    let mut odd = models[0].clone();
    odd[0] = f32_raw("designed.w", &[6, 500], &float_values(&models[0][0]));
    write_model(&root.join("odd"), &odd);
    let (status, sub, _) = post(
        &client,
        &base,
        &serde_json::json!({"models": [uris[0], file_url(&root.join("odd"))]}),
    )
    .await;
    assert_eq!(status, 202, "{sub}");
    let failed = wait_analysis(&client, &base, sub["id"].as_str().unwrap()).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "shape_mismatch", "{failed}");
    assert!(
        failed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("designed.w"),
        "{failed}"
    );

    // --- Listing: analyses only, newest first ---
    let (status, list) = get(&client, &format!("{base}/v1/analyses?limit=100")).await;
    assert_eq!(status, 200);
    let jobs = list["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 5, "{list}");
    assert!(jobs.iter().all(|j| j["id"] != merge_id.as_str()));
    let (_, merges) = get(&client, &format!("{base}/v1/merges?limit=100")).await;
    let merges = merges["jobs"].as_array().unwrap();
    assert_eq!(merges.len(), 1);
    assert_eq!(merges[0]["id"], merge_id.as_str());
    let (status, _) = get(&client, &format!("{base}/v1/analyses?state=bogus")).await;
    assert_eq!(status, 400);

    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyses_sqlite() {
    let db = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", db.path().join("ladle.db").display());
    scenario(&url, "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyses_postgres() {
    match PgDb::create().await {
        Some(db) => scenario(&db.url, "postgres").await,
        None => loud_skip("analyses on Postgres", "set LADLE_TEST_POSTGRES_URL"),
    }
}

/// Cancel a running analysis: a real `ladle worker` process, throttled to one 1024-element
/// chunk per 100 ms (test failpoint), stops within a heartbeat and the job ends cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_running_analysis() {
    use common::procs::LadleProc;
    use std::collections::BTreeMap;

    let work = tempfile::tempdir().unwrap();
    let root = work.path().canonicalize().unwrap();
    let db_url = format!("sqlite://{}", root.join("ladle.db").display());
    // 64 chunks of 1024 elements: about 6.4 s of throttled work.
    let mut uris = Vec::new();
    for k in 0..2u64 {
        let dir = root.join(format!("big-{k}"));
        write_model(&dir, &[f32_tensor("big.w", &[64, 1024], 500 + k)]);
        uris.push(file_url(&dir));
    }
    let settings = test_settings(
        &root.join("data"),
        &db_url,
        vec![root.display().to_string()],
        None,
    );
    let (api, base) = start(&settings, Mode::Api).await;
    let client = reqwest::Client::new();
    let (status, sub, _) = post(&client, &base, &serde_json::json!({"models": uris})).await;
    assert_eq!(status, 202, "{sub}");
    let id = sub["id"].as_str().unwrap().to_string();

    let env: BTreeMap<String, String> = [
        ("LADLE_DATABASE_URL", db_url.clone()),
        ("LADLE_DATA_DIR", root.join("worker").display().to_string()),
        ("LADLE_ALLOWED_ROOTS", root.display().to_string()),
        ("LADLE_WORKERS", "1".into()),
        ("LADLE_LEASE_TTL_SECS", "6".into()),
        ("LADLE_HEARTBEAT_SECS", "0.5".into()),
        ("LADLE_POLL_SECS", "0.2".into()),
        ("LADLE_CHUNK_ELEMS", "1024".into()),
        // One chunk in flight, so the throttle adds up chunk after chunk.
        ("LADLE_INFLIGHT_BYTES", "1".into()),
        ("LADLE_TEST_THROTTLE_MS", "100".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut worker = LadleProc::spawn("worker", &["worker"], &env, &root.join("logs"));

    // Wait until it runs and has read something.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = get(&client, &format!("{base}/v1/analyses/{id}")).await;
        if v["state"] == "running" && v["progress"]["bytes_read"].as_u64().unwrap_or(0) > 0 {
            assert_eq!(v["progress"]["tensors_total"], 1, "{v}");
            break;
        }
        assert_ne!(v["state"], "succeeded", "finished before the cancel: {v}");
        assert!(
            Instant::now() < deadline && worker.is_running(),
            "analysis never ran: {v}\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        worker.log_text().contains("test failpoints armed"),
        "{} ignores LADLE_TEST_THROTTLE_MS: built without the `failpoints` feature?\n{}",
        common::procs::LADLE,
        worker.log_text()
    );
    let r = client
        .post(format!("{base}/v1/analyses/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202, "a running job is asked to stop");
    let done = wait_analysis(&client, &base, &id).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    assert!(done["result"].is_null());
    assert_eq!(done["progress"]["tensors_done"], 0, "{done}");
    assert!(worker.is_running(), "the worker survives a cancel");
    worker.sigterm();
    let _ = worker.wait_exit(Duration::from_secs(20)).await;
    api.shutdown().await;
}

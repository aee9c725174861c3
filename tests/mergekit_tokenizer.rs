//! mergekit's tokenizer options with models whose tokenizers differ
//! (`tests/data/mergekit_tokenizer/`, see its `make.sh`): `tokenizer_source: union`, a
//! `tokenizer:` section (`tokens` with model, model-token and zero sources, `force`,
//! `pad_to_multiple_of`) and `chat_template: auto`, run by `ladle merge` (chunks of 1024
//! elements, which cut the embeddings mid-row) and by the service over HTTP, compared with what
//! mergekit 0.1.5 wrote: every tensor (the permuted embedding rows included) within the
//! conformance pack's rules (bit-identical for task arithmetic, within 1 bf16 ulp for slerp),
//! `config.json`'s `vocab_size`, the vocabulary (every token's id), the new tokens' settings and
//! the chat template. Then the refusals: a tokenizer that cannot be read, a token source that
//! is not one of the models, `tokenizer_source` with a section; nothing written. A JSON
//! recipe's `tokenizer` (relative paths made absolute by `ladle merge`) and the
//! `mergekit_config.yml` it gets, read back.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::compare::{bf16_ulp, dir_url, read_f32_tensors};
use common::*;
use ladle::service::Mode;
use serde_json::Value;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mergekit_tokenizer")
}

/// The recipes and the largest difference allowed, in bf16 ulps of the output.
const RECIPES: [(&str, f64); 4] = [
    ("union", 0.0),
    ("section", 1.0),
    ("base-tokens", 0.0),
    ("model-source", 0.0),
];

/// Tokens the stand-ins' base tokenizer has (ids 0..24): anything after is new.
const BASE_TOKENS: u64 = 24;

/// Token → id of a `tokenizer.json` (its model's vocabulary and its added tokens), and the
/// added tokens' entries by id.
fn vocabulary(dir: &Path) -> (BTreeMap<String, u64>, BTreeMap<u64, Value>) {
    let doc = read_json(&dir.join("tokenizer.json"));
    let mut ids: BTreeMap<String, u64> = doc["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(t, i)| (t.clone(), i.as_u64().unwrap()))
        .collect();
    let mut added = BTreeMap::new();
    for a in doc["added_tokens"].as_array().unwrap() {
        let id = a["id"].as_u64().unwrap();
        ids.insert(a["content"].as_str().unwrap().to_string(), id);
        added.insert(id, a.clone());
    }
    (ids, added)
}

/// The chat template a tokenizer folder gives (transformers: `chat_template.jinja` first).
fn template(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("chat_template.jinja"))
        .ok()
        .or_else(|| {
            read_json(&dir.join("tokenizer_config.json"))["chat_template"]
                .as_str()
                .map(str::to_string)
        })
        .map(|t| t.trim().to_string())
}

/// Everything compared with mergekit's output of `recipe`; the failures.
fn compare(recipe: &str, max_ulps: f64, ours: &Path) -> Vec<String> {
    let theirs = data_dir().join("expected").join(recipe);
    let mut failures = Vec::new();
    let got = read_f32_tensors(&ours.join("model.safetensors"));
    let want = read_f32_tensors(&theirs.join("model.safetensors"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{recipe}: tensor names"
    );
    let (mut total, mut differ, mut worst) = (0usize, 0usize, 0f64);
    for (name, (shape, w, dt)) in &want {
        let (gshape, g, gdt) = &got[name];
        if shape != gshape || dt != gdt {
            failures.push(format!(
                "{recipe}: {name}: {gshape:?} {gdt}, mergekit's {shape:?} {dt}"
            ));
            continue;
        }
        total += w.len();
        for (a, b) in g.iter().zip(w) {
            if a.to_bits() != b.to_bits() {
                differ += 1;
                worst = worst.max((*a as f64 - *b as f64).abs() / bf16_ulp(*b));
            }
        }
    }
    eprintln!("{recipe:<12} | {differ} of {total} elements differ | max {worst:.2} ulps");
    if worst > max_ulps {
        failures.push(format!(
            "{recipe}: {differ} elements differ, max {worst} ulps"
        ));
    }
    let vocab_size = |d: &Path| read_json(&d.join("config.json"))["vocab_size"].clone();
    if vocab_size(ours) != vocab_size(&theirs) {
        failures.push(format!(
            "{recipe}: config.json vocab_size {} vs mergekit's {}",
            vocab_size(ours),
            vocab_size(&theirs)
        ));
    }
    let ((ids, added), (want_ids, want_added)) = (vocabulary(ours), vocabulary(&theirs));
    if ids != want_ids {
        failures.push(format!(
            "{recipe}: vocabulary {ids:?}\n  vs mergekit's {want_ids:?}"
        ));
    }
    // The new tokens' settings (transformers also marks the base's `<unk>` as an added token
    // when it saves, which ladle, copying the base's entries, does not).
    let new = |a: &BTreeMap<u64, Value>| -> Vec<Value> {
        a.range(BASE_TOKENS..).map(|(_, v)| v.clone()).collect()
    };
    if new(&added) != new(&want_added) {
        failures.push(format!(
            "{recipe}: new tokens {:?}\n  vs mergekit's {:?}",
            new(&added),
            new(&want_added)
        ));
    }
    if template(ours) != template(&theirs) {
        failures.push(format!(
            "{recipe}: chat template {:?} vs mergekit's {:?}",
            template(ours),
            template(&theirs)
        ));
    }
    failures
}

#[test]
fn tokenizer_options_match_mergekit() {
    let dir = data_dir();
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (recipe, max_ulps) in RECIPES {
        let out = tmp.path().join(recipe);
        let run = ladle_in(
            &dir,
            &[
                "merge",
                &format!("recipes/{recipe}.yml"),
                out.to_str().unwrap(),
                "--quiet",
                "--chunk-elems",
                "1024",
            ],
        );
        assert!(
            run.status.success(),
            "{recipe}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        failures.extend(compare(recipe, max_ulps, &out));
    }
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
}

/// The union recipe over HTTP (YAML with absolute paths), on SQLite: the same soup, the stored
/// recipe with its tokenizer; then the refusals, each a failed job or a 4xx with its code and
/// nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn union_over_http_and_refusals() {
    let dir = data_dir();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let db = format!("sqlite:{}", data.join("ladle.db").display());
    // A copy of the inputs whose ft1 tokenizer is no JSON.
    let broken = tmp.path().join("broken");
    for m in ["base", "ft1", "ft2"] {
        std::fs::create_dir_all(broken.join(m)).unwrap();
        for f in std::fs::read_dir(dir.join("inputs").join(m)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, broken.join(m).join(f.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(broken.join("ft1/tokenizer.json"), b"{\"model\": ").unwrap();
    let settings = test_settings(&data, &db, vec![dir_url(&dir), dir_url(tmp.path())], None);
    let (service, base) = start(&settings, Mode::Serve).await;
    let client = reqwest::Client::new();
    let inputs = dir.join("inputs");
    let text = std::fs::read_to_string(dir.join("recipes/union.yml"))
        .unwrap()
        .replace("inputs/", &format!("{}/", inputs.display()));
    let post = |yaml: String| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let r = client
                .post(format!("{base}/v1/merges"))
                .header("content-type", "application/yaml")
                .body(yaml)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    // An accepted job, once it has finished.
    let job = |(status, job): (u16, Value)| {
        let client = client.clone();
        let base = base.clone();
        async move {
            assert_eq!(status, 202, "{job}");
            let id = job["id"].as_str().unwrap().to_string();
            wait_terminal(&client, &base, &id, std::time::Duration::from_secs(60)).await
        }
    };
    let with_output = |text: &str, out: &Path| format!("{text}output:\n  uri: {}\n", dir_url(out));
    let soup = tmp.path().join("soup");
    let done = job(post(with_output(&text, &soup)).await).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let failures = compare("union", 0.0, &soup);
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
    let recipe = &done["recipe"];
    let recipe = recipe.get("recipe").unwrap_or(recipe);
    assert_eq!(recipe["output"]["tokenizer"]["source"], "union", "{done}");
    assert_eq!(recipe["output"]["chat_template"], "auto", "{done}");
    // A tokenizer that is no JSON: the job fails naming the file, nothing is written.
    let bad = text.replace(
        &format!("{}/", inputs.display()),
        &format!("{}/", broken.display()),
    );
    let out = tmp.path().join("bad-tok");
    let done = job(post(with_output(&bad, &out)).await).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "invalid_tokenizer", "{done}");
    let message = done["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("ft1/tokenizer.json"), "{done}");
    assert!(!out.join("model.safetensors").exists());
    // A token source that is not one of the models: a failed job naming the field.
    let section = std::fs::read_to_string(dir.join("recipes/section.yml"))
        .unwrap()
        .replace("inputs/", &format!("{}/", inputs.display()))
        .replace(
            &format!("model: {}/ft1\n        token: delta", inputs.display()),
            &format!("model: {}/ft2\n        token: delta", inputs.display()),
        );
    let out = tmp.path().join("bad-source");
    let done = job(post(with_output(&section, &out)).await).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "invalid_recipe", "{done}");
    let message = done["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("tokenizer.tokens[\"<pad>\"].source") && message.contains("ft2"),
        "{done}"
    );
    assert!(!out.join("model.safetensors").exists());
    // tokenizer_source and a section together: refused at once, naming the field.
    let both = format!("{text}tokenizer:\n  source: union\n");
    let (status, body) = post(with_output(&both, &tmp.path().join("both"))).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "invalid_recipe", "{body}");
    assert_eq!(body["field"], "tokenizer_source", "{body}");
    service.shutdown().await;
}

/// `chat_template: auto` without a built tokenizer: the donor's tokenizer files with the most
/// common template among the inputs (mergekit's `_set_chat_template`: each model's template,
/// stripped; a tie goes to the first, in the recipe's order here) as `chat_template.jinja`;
/// no input with a template: the donor's files as they are.
#[test]
fn auto_template_on_the_donors_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = data_dir().join("inputs");
    let a = std::fs::read_to_string(inputs.join("base/tokenizer_config.json")).unwrap();
    let b = std::fs::read_to_string(inputs.join("ft1/tokenizer_config.json")).unwrap();
    let template_of = |cfg: &str| {
        serde_json::from_str::<Value>(cfg).unwrap()["chat_template"]
            .as_str()
            .unwrap()
            .trim()
            .to_string()
    };
    // Three copies of the base: one with template A, two with B (one of them in a
    // chat_template.jinja, which transformers prefers to the config's), one with none.
    let copy = |name: &str, config: &str, jinja: Option<&str>| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["model.safetensors", "config.json", "tokenizer.json"] {
            std::fs::copy(inputs.join("base").join(f), d.join(f)).unwrap();
        }
        std::fs::write(d.join("tokenizer_config.json"), config).unwrap();
        if let Some(j) = jinja {
            std::fs::write(d.join("chat_template.jinja"), j).unwrap();
        }
    };
    copy("a", &a, None);
    copy("b1", &b, None);
    copy("b2", &a, Some(&format!("\n{}\n", template_of(&b))));
    copy(
        "none",
        r#"{"tokenizer_class": "PreTrainedTokenizerFast"}"#,
        None,
    );
    let run = |name: &str, models: &[&str]| {
        let list: String = models
            .iter()
            .map(|m| format!("  - model: {m}\n    parameters: {{weight: 1.0}}\n"))
            .collect();
        let recipe = format!("merge_method: linear\nmodels:\n{list}chat_template: auto\n");
        std::fs::write(tmp.path().join(format!("{name}.yml")), recipe).unwrap();
        let out = ladle_in(
            tmp.path(),
            &["merge", &format!("{name}.yml"), name, "--quiet"],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tmp.path().join(name)
    };
    for (name, models, want) in [
        ("most", &["a", "b1", "b2"][..], Some(template_of(&b))),
        ("tie", &["none", "a", "b1"], Some(template_of(&a))),
    ] {
        let soup = run(name, models);
        assert_eq!(template(&soup), want, "{name}");
        assert_eq!(
            std::fs::read(soup.join("tokenizer.json")).unwrap(),
            std::fs::read(tmp.path().join(models[0]).join("tokenizer.json")).unwrap(),
            "{name}: the donor's tokenizer"
        );
        // The donor's own template is left out of its config.
        assert!(
            read_json(&soup.join("tokenizer_config.json"))
                .get("chat_template")
                .is_none(),
            "{name}"
        );
    }
    let soup = run("no-template", &["none", "none"]);
    assert!(!soup.join("chat_template.jinja").exists());
    assert_eq!(
        std::fs::read(soup.join("tokenizer_config.json")).unwrap(),
        std::fs::read(tmp.path().join("none/tokenizer_config.json")).unwrap()
    );
}

/// The same tokenizer as a JSON recipe (`"tokenizer"`, relative paths from the recipe's
/// folder): mergekit's tensors and vocabulary; its `mergekit_config.yml` names the section
/// and gives the same soup back.
#[test]
fn json_tokenizer_section_and_its_mergekit_config() {
    let tmp = tempfile::tempdir().unwrap();
    for m in ["base", "ft1", "ft2"] {
        let to = tmp.path().join("inputs").join(m);
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(data_dir().join("inputs").join(m)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(
        tmp.path().join("r.json"),
        r#"{"method": "task_arithmetic", "base_model": "inputs/base",
            "models": [{"uri": "inputs/ft1", "weight": 0.6}, {"uri": "inputs/ft2", "weight": 0.4}],
            "input_dtype": "bfloat16", "parameters": {"compute_dtype": "bfloat16"},
            "tokenizer": {"source": "inputs/ft1", "pad_to_multiple_of": 1},
            "output": {"uri": "file:///placeholder/", "dtype": "bfloat16"}}"#,
    )
    .unwrap();
    let out = ladle_in(tmp.path(), &["merge", "r.json", "soup", "--quiet"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let failures = compare("model-source", 0.0, &tmp.path().join("soup"));
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
    let text = std::fs::read_to_string(tmp.path().join("soup/mergekit_config.yml")).unwrap();
    assert!(
        text.contains("\ntokenizer:\n  pad_to_multiple_of: 1\n  source: /"),
        "{text}"
    );
    let again = ladle_in(
        tmp.path(),
        &["merge", "soup/mergekit_config.yml", "again", "--quiet"],
    );
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(
        tensor_digests(&tmp.path().join("soup")),
        tensor_digests(&tmp.path().join("again"))
    );
    assert_eq!(
        read_json(&tmp.path().join("soup/tokenizer.json")),
        read_json(&tmp.path().join("again/tokenizer.json"))
    );
}

//! mergekit's tokenizer options with models whose tokenizers differ
//! (`tests/data/mergekit_tokenizer/`, see its `make.sh`): `tokenizer_source: union`, `base`
//! and a model (plain, which mergekit builds as a section naming only that source), a
//! `tokenizer:` section (`tokens` with model, model-token and zero sources, `force`,
//! `pad_to_multiple_of`; only a `source`) and `chat_template: auto`, run by `ladle merge`
//! (chunks of 1024 elements, which cut the embeddings mid-row) and by the service over HTTP
//! (`union`, the plain `tokenizer_source: <model>`), compared with what
//! mergekit 0.1.5 wrote: every tensor (the permuted embedding rows included) within the
//! conformance pack's rules (bit-identical for task arithmetic, within 1 bf16 ulp for slerp),
//! `config.json`'s `vocab_size`, the vocabulary (every token's id), the new tokens' settings and
//! the chat template. Then the refusals: a tokenizer that cannot be read, a token source that
//! is not one of the models, `tokenizer_source` with a section; nothing written. A JSON
//! recipe's `tokenizer` and `tokenizer_source: base` (relative paths made absolute by `ladle
//! merge`) and the `mergekit_config.yml` they get, read back. A source-only build that moves
//! no row: today's output byte for byte (a model with an adapter folded in too). Where the
//! build cannot go: refusals by name, and a model without a tokenizer (the base's, as
//! mergekit).

mod common;

use std::path::Path;

use common::compare::dir_url;
use common::mergekit_tokenizer::{compare, data_dir, template};
use common::*;
use ladle::service::Mode;
use serde_json::Value;

/// The recipes and the largest difference allowed, in bf16 ulps of the output.
const RECIPES: [(&str, f64); 7] = [
    ("union", 0.0),
    ("section", 1.0),
    ("base-tokens", 0.0),
    ("model-source", 0.0),
    ("plain-base", 0.0),
    ("plain-model", 0.0),
    ("section-source", 0.0),
];

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
    // The plain `tokenizer_source: <model>`: built as mergekit builds it; the stored recipe
    // keeps it as written.
    let plain = std::fs::read_to_string(dir.join("recipes/plain-model.yml"))
        .unwrap()
        .replace("inputs/", &format!("{}/", inputs.display()));
    let soup = tmp.path().join("plain");
    let done = job(post(with_output(&plain, &soup)).await).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let failures = compare("plain-model", 0.0, &soup);
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
    let recipe = &done["recipe"];
    let recipe = recipe.get("recipe").unwrap_or(recipe);
    let source = recipe["output"]["tokenizer_source"].as_str().unwrap_or("");
    assert!(source.ends_with("/inputs/ft2/"), "{done}");
    assert!(recipe["output"].get("tokenizer").is_none(), "{done}");
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

/// A copy of the stand-in `name` as `to`, without the files named in `skip`.
fn copy_input(name: &str, to: &Path, skip: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for f in std::fs::read_dir(data_dir().join("inputs").join(name)).unwrap() {
        let f = f.unwrap().path();
        let file = f.file_name().unwrap();
        if !skip.iter().any(|s| file == *s) {
            std::fs::copy(&f, to.join(file)).unwrap();
        }
    }
}

/// `ladle merge` of the YAML `text` as `name`.yml in `dir`, into `dir/name`.
fn merge_yaml(dir: &Path, name: &str, text: &str) -> std::process::Output {
    std::fs::write(dir.join(format!("{name}.yml")), text).unwrap();
    ladle_in(dir, &["merge", &format!("{name}.yml"), name, "--quiet"])
}

fn ok(run: &std::process::Output) {
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// The files of a soup folder but the recipe's own (card, recipe text, manifest).
fn soup_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|f| f.unwrap().path())
        .filter(|f| {
            !matches!(
                f.file_name().unwrap().to_str().unwrap(),
                "README.md" | "mergekit_config.yml" | "ladle-manifest.json"
            )
        })
        .map(|f| {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&f).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// `tokenizer_source: base`, a model or a section naming only a source, where every model's
/// tokenizer is the same and its embeddings have as many rows as tokens: the build moves
/// nothing, so the soup is today's byte for byte (the donor's or that model's tokenizer files
/// as they are, the plain merge), a model with an adapter folded in too; where rows would
/// move, that model is refused by name.
#[test]
fn source_only_build_that_moves_nothing_is_a_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for m in ["base", "ft1", "ft2"] {
        copy_input(m, &d.join(m), &[]);
    }
    // A model on the base's vocabulary with 24 rows: ft1 and ft2 built onto it.
    let plain = std::fs::read_to_string(data_dir().join("recipes/plain-base.yml"))
        .unwrap()
        .replace("inputs/", "");
    ok(&merge_yaml(d, "same", &plain));
    // An adapter for it (q_proj of layer 0).
    let adapter = d.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        r#"{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "peft_type": "LORA"}"#,
    )
    .unwrap();
    let prefix = "base_model.model.model.layers.0.self_attn.q_proj";
    let factors = [
        bf16_tensor(&format!("{prefix}.lora_A.weight"), &[2, 48], 7),
        bf16_tensor(&format!("{prefix}.lora_B.weight"), &[48, 2], 8),
    ];
    std::fs::write(
        adapter.join("adapter_model.safetensors"),
        safetensors_bytes(&factors),
    )
    .unwrap();
    let recipe = |model: &str, extra: &str| {
        format!(
            "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: {model}\n    \
             parameters:\n      weight: 0.5\ndtype: bfloat16\n{extra}"
        )
    };
    let same_dir = d.join("same");
    for (model, label) in [("same", "plain"), ("same+adapter", "lora")] {
        ok(&merge_yaml(d, &format!("{label}-none"), &recipe(model, "")));
        let today = soup_files(&d.join(format!("{label}-none")));
        assert!(today.iter().any(|(n, _)| n == "tokenizer.json"), "{label}");
        for (case, extra) in [
            ("base", "tokenizer_source: base\n".to_string()),
            ("section", "tokenizer:\n  source: base\n".to_string()),
            (
                "model",
                format!("tokenizer_source: {}\n", same_dir.display()),
            ),
        ] {
            let name = format!("{label}-{case}");
            ok(&merge_yaml(d, &name, &recipe(model, &extra)));
            let got = soup_files(&d.join(&name));
            if case == "model" {
                // That model's tokenizer files as they are, the same tensors and config.
                for (file, bytes) in &got {
                    let want = match file.as_str() {
                        "model.safetensors" | "config.json" => today
                            .iter()
                            .find(|(n, _)| n == file)
                            .map(|(_, b)| b.clone())
                            .unwrap(),
                        _ => std::fs::read(same_dir.join(file)).unwrap(),
                    };
                    assert!(*bytes == want, "{name}: {file}");
                }
            } else {
                assert!(got == today, "{name}: not today's soup byte for byte");
            }
        }
    }
    // ft1's rows would move onto the base's vocabulary: its adapter is refused by name.
    let out = merge_yaml(
        d,
        "moved",
        &recipe("ft1+adapter", "tokenizer_source: base\n"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("[invalid_recipe]")
            && err.contains("tokenizer_source:")
            && err.contains("/ft1"),
        "{err}"
    );
    assert!(!d.join("moved/model.safetensors").exists());
}

/// Where the plain option's build cannot go: a model with `tokenizer.model` and no
/// `tokenizer.json` (`invalid_tokenizer`, naming the file), a base without any tokenizer
/// (`invalid_recipe`, naming `tokenizer_source`; mergekit fails there too), both before
/// anything is written; a model without any tokenizer has the base's vocabulary, as in
/// mergekit (here the soup is mergekit's `plain-base`: ft2 has the base's ids).
#[test]
fn where_the_plain_build_cannot_go() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for m in ["base", "ft1", "ft2"] {
        copy_input(m, &d.join(m), &[]);
    }
    let tok = ["tokenizer.json", "tokenizer_config.json"];
    copy_input("ft1", &d.join("ft1-spm"), &["tokenizer.json"]);
    std::fs::write(d.join("ft1-spm/tokenizer.model"), b"\x0a\x05\x0a\x01a").unwrap();
    copy_input("ft2", &d.join("ft2-bare"), &tok);
    copy_input("base", &d.join("base-bare"), &tok);
    let plain = std::fs::read_to_string(data_dir().join("recipes/plain-base.yml"))
        .unwrap()
        .replace("inputs/", "");
    let out = merge_yaml(d, "spm", &plain.replace("model: ft1", "model: ft1-spm"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("[invalid_tokenizer]") && err.contains("ft1-spm/tokenizer.json"),
        "{err}"
    );
    assert!(!d.join("spm/model.safetensors").exists());
    let out = merge_yaml(
        d,
        "no-base",
        &plain.replace("base_model: base", "base_model: base-bare"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("[invalid_recipe]")
            && err.contains("tokenizer_source: base")
            && err.contains("holds no tokenizer"),
        "{err}"
    );
    assert!(!d.join("no-base/model.safetensors").exists());
    ok(&merge_yaml(
        d,
        "bare",
        &plain.replace("model: ft2", "model: ft2-bare"),
    ));
    let failures = compare("plain-base", 0.0, &d.join("bare"));
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
}

/// `"tokenizer_source": "base"` in a JSON recipe: the keyword (not a path), built as
/// mergekit's `plain-base`; kept as written in the stored recipe and `mergekit_config.yml`,
/// which gives the same soup back.
#[test]
fn json_tokenizer_source_base() {
    let tmp = tempfile::tempdir().unwrap();
    for m in ["base", "ft1", "ft2"] {
        copy_input(m, &tmp.path().join("inputs").join(m), &[]);
    }
    std::fs::write(
        tmp.path().join("r.json"),
        r#"{"method": "task_arithmetic", "base_model": "inputs/base",
            "models": [{"uri": "inputs/ft1", "weight": 0.5}, {"uri": "inputs/ft2", "weight": 0.7}],
            "input_dtype": "bfloat16", "parameters": {"compute_dtype": "bfloat16"},
            "tokenizer_source": "base",
            "output": {"uri": "file:///placeholder/", "dtype": "bfloat16"}}"#,
    )
    .unwrap();
    ok(&ladle_in(
        tmp.path(),
        &["merge", "r.json", "soup", "--quiet"],
    ));
    let soup = tmp.path().join("soup");
    let failures = compare("plain-base", 0.0, &soup);
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
    let manifest = read_json(&soup.join("ladle-manifest.json"));
    assert_eq!(
        manifest["recipe"]["output"]["tokenizer_source"], "base",
        "{manifest}"
    );
    let text = std::fs::read_to_string(soup.join("mergekit_config.yml")).unwrap();
    assert!(text.contains("\ntokenizer_source: base\n"), "{text}");
    ok(&ladle_in(
        tmp.path(),
        &["merge", "soup/mergekit_config.yml", "again", "--quiet"],
    ));
    assert_eq!(
        tensor_digests(&soup),
        tensor_digests(&tmp.path().join("again"))
    );
}

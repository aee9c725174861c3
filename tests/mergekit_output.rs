//! The output folder as mergekit writes it and `ladle merge` as `mergekit-yaml` runs: the model
//! card (against mergekit 0.1.5's own `generate_card`, `tests/data/mergekit_card/make.sh`),
//! `mergekit_config.yml` read back into the same tensors, `config.json` with the output dtype,
//! the donor's tokenizer files, the positional `OUT_DIR`, mergekit's flags, relative paths
//! from the current directory, and the method name of the stored and listed recipe.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;
use ladle::service::Mode;

const CARDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/mergekit_card");

/// A checkpoint folder as the hub has them: bf16 tensors, config, tokenizer, its own card and
/// a file mergekit does not copy.
fn write_model(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let tensors = vec![
        bf16_tensor("model.layers.0.mlp.weight", &[24, 16], seed),
        bf16_tensor("model.layers.1.mlp.weight", &[24, 16], seed + 1),
        bf16_tensor("model.embed_tokens.weight", &[32, 16], seed + 2),
    ];
    std::fs::write(dir.join("model.safetensors"), safetensors_bytes(&tensors)).unwrap();
    let config = format!(
        r#"{{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2, "torch_dtype": "bfloat16", "seed": {seed}}}"#
    );
    std::fs::write(dir.join("config.json"), config).unwrap();
    std::fs::write(dir.join("tokenizer.json"), stand_in_tokenizer(seed, 32)).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), br#"{"a": 1}"#).unwrap();
    std::fs::write(dir.join("generation_config.json"), br#"{"g": 1}"#).unwrap();
    std::fs::write(dir.join("README.md"), format!("# model {seed}\n")).unwrap();
    std::fs::write(dir.join("LICENSE"), "licence\n").unwrap();
}

/// `base`, `ft1`, `ft2` in a fresh folder.
fn models() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_model(&dir.path().join("base"), 1);
    write_model(&dir.path().join("ft1"), 10);
    write_model(&dir.path().join("ft2"), 20);
    dir
}

fn ok(run: &Output) {
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn yaml_recipe_writes_mergekits_output_folder_and_reads_it_back() {
    let dir = models();
    for case in ["ties", "slerp"] {
        let recipe = format!("{case}.yml");
        std::fs::copy(Path::new(CARDS).join(&recipe), dir.path().join(&recipe)).unwrap();
        let soup = dir.path().join(format!("out-{case}/soup"));
        let run = ladle_in(
            dir.path(),
            &["merge", &recipe, &format!("out-{case}/soup"), "--quiet"],
        );
        ok(&run);
        // The card is mergekit's, byte for byte; the recipe text is the file as given.
        let want =
            std::fs::read_to_string(Path::new(CARDS).join(format!("{case}.README.md"))).unwrap();
        assert_eq!(
            std::fs::read_to_string(soup.join("README.md")).unwrap(),
            want
        );
        assert_eq!(
            std::fs::read(soup.join("mergekit_config.yml")).unwrap(),
            std::fs::read(dir.path().join(&recipe)).unwrap()
        );
        // config.json anew from the base's, with the output dtype (ties: `dtype: float32`).
        let config = read_json(&soup.join("config.json"));
        let dtype = if case == "ties" {
            "float32"
        } else {
            "bfloat16"
        };
        assert_eq!(config["dtype"], dtype, "{config}");
        assert_eq!(config["torch_dtype"], dtype, "{config}");
        assert_eq!(config["seed"], 1, "the donor is the base model");
        // The donor's tokenizer files byte for byte; its card and other files never.
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            assert_eq!(
                std::fs::read(soup.join(f)).unwrap(),
                std::fs::read(dir.path().join("base").join(f)).unwrap(),
                "{f}"
            );
        }
        assert!(!soup.join("LICENSE").exists());
        let manifest = read_json(&soup.join("ladle-manifest.json"));
        let listed: Vec<&str> = manifest["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["path"].as_str().unwrap())
            .collect();
        for f in [
            "README.md",
            "mergekit_config.yml",
            "config.json",
            "tokenizer.json",
        ] {
            assert!(listed.contains(&f), "{f} in {listed:?}");
        }
        // mergekit_config.yml goes back in (from the same directory: its paths are relative)
        // and gives the same tensors.
        let again = format!("out-{case}/again");
        let config_path = format!("out-{case}/soup/mergekit_config.yml");
        ok(&ladle_in(
            dir.path(),
            &["merge", &config_path, &again, "--quiet"],
        ));
        let first = tensor_digests(&soup);
        assert!(!first.is_empty());
        assert_eq!(first, tensor_digests(&dir.path().join(&again)));
    }
}

#[test]
fn json_recipe_gets_a_mergekit_config_that_reproduces_it() {
    let dir = models();
    let recipe = dir.path().join("recipe.json");
    std::fs::write(
        &recipe,
        r#"{"method": "dare_ties", "base_model": "base",
            "models": [{"uri": "ft1", "weight": 0.7, "parameters": {"density": 0.6}},
                       {"uri": "ft2", "weight": 0.3, "parameters": {"density": [0.2, 0.9]}}],
            "parameters": {"seed": 42, "compute_dtype": "float32"}, "input_dtype": "float32",
            "output": {"uri": "file:///placeholder/", "dtype": "bfloat16", "max_shard_size": 1024}}"#,
    )
    .unwrap();
    let soup = dir.path().join("soup");
    ok(&ladle_in(
        dir.path(),
        &["merge", "recipe.json", "--out", "soup", "--quiet"],
    ));
    let text = std::fs::read_to_string(soup.join("mergekit_config.yml")).unwrap();
    assert!(
        text.starts_with("merge_method: dare_ties\nbase_model: /"),
        "{text}"
    );
    assert!(
        text.contains("dtype: float32\nout_dtype: bfloat16\n"),
        "{text}"
    );
    let card = std::fs::read_to_string(soup.join("README.md")).unwrap();
    assert!(card.contains(&format!("```yaml\n{text}\n```\n")), "{card}");
    assert!(card.contains("[DARE TIES](https://arxiv.org/abs/2311.03099) merge method using /"));
    assert_eq!(read_json(&soup.join("config.json"))["dtype"], "bfloat16");
    // From another directory: the paths are absolute. Several shards: the same files.
    let elsewhere = tempfile::tempdir().unwrap();
    let again = elsewhere.path().join("again");
    let config_path = soup.join("mergekit_config.yml");
    ok(&ladle_in(
        elsewhere.path(),
        &[
            "merge",
            config_path.to_str().unwrap(),
            again.to_str().unwrap(),
            "--quiet",
        ],
    ));
    let first = tensor_digests(&soup);
    assert!(first.len() > 1, "{first:?}");
    assert_eq!(first, tensor_digests(&again));
}

#[test]
fn mergekit_yaml_flags() {
    let dir = models();
    std::fs::copy(
        Path::new(CARDS).join("ties.yml"),
        dir.path().join("ties.yml"),
    )
    .unwrap();
    // Flags that do not apply: accepted, one line says so.
    let run = ladle_in(
        dir.path(),
        &[
            "merge",
            "ties.yml",
            "a",
            "--quiet",
            "--cuda",
            "--lazy-unpickle",
            "--low-cpu-memory",
            "--allow-crimes",
            "--random-seed",
            "7",
            "--copy-tokenizer",
            "--write-model-card",
        ],
    );
    ok(&run);
    let stderr = String::from_utf8_lossy(&run.stderr);
    let notes: Vec<&str> = stderr.lines().filter(|l| l.starts_with("note:")).collect();
    assert_eq!(notes.len(), 2, "{stderr}");
    assert!(
        notes[0].starts_with(
            "note: ignoring --cuda, --lazy-unpickle, --low-cpu-memory, --allow-crimes ("
        ),
        "{stderr}"
    );
    // ties draws no random numbers: the seed is noted and dropped.
    assert_eq!(
        notes[1],
        "note: ignoring --random-seed: method ties draws no random numbers"
    );
    assert!(dir.path().join("a/README.md").is_file());
    // No tokenizer, no card; small shards (mergekit's K suffix: ×1000 bytes).
    let run = ladle_in(
        dir.path(),
        &[
            "merge",
            "ties.yml",
            "b",
            "--quiet",
            "--no-copy-tokenizer",
            "--no-write-model-card",
            "--out-shard-size",
            "2K",
        ],
    );
    ok(&run);
    let b = dir.path().join("b");
    for gone in [
        "README.md",
        "mergekit_config.yml",
        "tokenizer.json",
        "generation_config.json",
    ] {
        assert!(!b.join(gone).exists(), "{gone}");
    }
    assert!(b.join("config.json").is_file());
    assert!(tensor_digests(&b).len() > 1);
    // DARE takes the seed: another seed, other tensors.
    let dare = "merge_method: dare_linear\nbase_model: ./base\nmodels:\n  - model: ./ft1\n    parameters: {weight: 1.0, density: 0.5}\n";
    std::fs::write(dir.path().join("dare.yml"), dare).unwrap();
    ok(&ladle_in(
        dir.path(),
        &["merge", "dare.yml", "d1", "--quiet", "--random-seed", "1"],
    ));
    ok(&ladle_in(
        dir.path(),
        &["merge", "dare.yml", "d2", "--quiet", "--random-seed", "2"],
    ));
    assert_ne!(
        tensor_digests(&dir.path().join("d1")),
        tensor_digests(&dir.path().join("d2"))
    );
    // OUT_DIR and --out are one or the other.
    let both = ladle_in(dir.path(), &["merge", "ties.yml", "x", "--out", "y"]);
    assert!(!both.status.success());
    // --help: YAML and JSON recipes, the one-shot options only.
    let help = ladle_in(dir.path(), &["merge", "--help"]);
    ok(&help);
    let help = String::from_utf8_lossy(&help.stdout);
    for want in [
        "mergekit YAML",
        "JSON",
        "OUT_DIR",
        "--no-copy-tokenizer",
        "--out-shard-size",
    ] {
        assert!(help.contains(want), "{want} missing from:\n{help}");
    }
    for service in [
        "--lease-ttl-secs",
        "--heartbeat-secs",
        "--body-limit",
        "--workers",
    ] {
        assert!(!help.contains(service), "{service} in:\n{help}");
    }
    // The ignored flags are named once, not listed as options.
    assert!(
        !help.lines().any(|l| l.trim_start().starts_with("--cuda")),
        "{help}"
    );
}

#[test]
fn relative_paths_from_the_current_directory_then_the_recipe_folder() {
    let dir = models();
    // The recipe in a sub-folder names ./base and ./ft1: found in the current directory.
    std::fs::create_dir_all(dir.path().join("recipes")).unwrap();
    let text = "merge_method: linear\nmodels:\n  - model: ./base\n    parameters: {weight: 1.0}\n  - model: ./ft1\n    parameters: {weight: 1.0}\n";
    std::fs::write(dir.path().join("recipes/r.yml"), text).unwrap();
    ok(&ladle_in(
        dir.path(),
        &["merge", "recipes/r.yml", "soup", "--quiet"],
    ));
    let manifest = read_json(&dir.path().join("soup/ladle-manifest.json"));
    let base_url = file_url(&dir.path().join("base").canonicalize().unwrap());
    assert_eq!(
        manifest["recipe"]["models"][0]["uri"]
            .as_str()
            .unwrap()
            .trim_end_matches('/'),
        base_url
    );
    // Run from elsewhere: not in the current directory, so from the recipe's folder.
    std::fs::write(
        dir.path().join("r2.yml"),
        text.replace("./base", "base").replace("./ft1", "ft1"),
    )
    .unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("r2.yml");
    ok(&ladle_in(
        elsewhere.path(),
        &["merge", recipe.to_str().unwrap(), "soup", "--quiet"],
    ));
    assert!(elsewhere.path().join("soup/model.safetensors").is_file());
}

/// The stored and listed recipe names the method as the request did (`ties`, not the
/// family's config kind `gta`), over HTTP, on SQLite (and Postgres when configured).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_and_listed_recipe_name_the_method() {
    let mut backends = vec![("sqlite", None)];
    match PgDb::create().await {
        Some(pg) => backends.push(("postgres", Some(pg))),
        None => loud_skip(
            "postgres backend of the method-name test",
            "LADLE_TEST_POSTGRES_URL unset",
        ),
    }
    for (backend, pg) in &backends {
        let dir = models();
        let data = dir.path().join("data");
        let url = match pg {
            Some(pg) => pg.url.clone(),
            None => format!("sqlite:{}", data.join("ladle.db").display()),
        };
        let settings = test_settings(&data, &url, vec![file_url(dir.path())], None);
        let (service, base) = start(&settings, Mode::Serve).await;
        let client = reqwest::Client::new();
        let body = serde_json::json!({
            "method": "ties",
            "base_model": file_url(&dir.path().join("base")),
            "models": [
                {"uri": file_url(&dir.path().join("ft1")), "weight": 0.5, "parameters": {"density": 0.5}},
                {"uri": file_url(&dir.path().join("ft2")), "weight": 0.5, "parameters": {"density": 0.5}}
            ],
            "output": {"uri": file_url(&dir.path().join("soup"))}
        });
        let (status, job) = submit(&client, &base, &body).await;
        assert_eq!(status, 202, "{backend}: {job}");
        let id = job["id"].as_str().unwrap().to_string();
        let done = wait_terminal(&client, &base, &id, std::time::Duration::from_secs(60)).await;
        assert_eq!(done["state"], "succeeded", "{backend}: {done}");
        let got: serde_json::Value = client
            .get(format!("{base}/v1/merges/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let listed: serde_json::Value = client
            .get(format!("{base}/v1/merges"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let in_list = listed["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id.as_str())
            .unwrap()
            .clone();
        for view in [&job, &got, &in_list] {
            let recipe = &view["recipe"];
            let recipe = recipe.get("recipe").unwrap_or(recipe);
            assert_eq!(recipe["method"], "ties", "{backend}: {view}");
            assert_eq!(recipe["parameters"]["method"], "ties", "{backend}: {view}");
            assert!(!view.to_string().contains("\"gta\""), "{backend}: {view}");
        }
        // The soup's card and recipe text too.
        let card = std::fs::read_to_string(dir.path().join("soup/README.md")).unwrap();
        assert!(card.contains(
            "merged using the [TIES](https://arxiv.org/abs/2306.01708) merge method using /"
        ));
        let text = std::fs::read_to_string(dir.path().join("soup/mergekit_config.yml")).unwrap();
        assert!(text.starts_with("merge_method: ties\n"), "{text}");
        service.shutdown().await;
    }
}

/// `tokenizer_source: <model>` (also spelled `model:<path>`): that model's tokenizer files
/// instead of the donor's, whatever `--no-copy-tokenizer` says; `chat_template` (one of
/// mergekit's names, or a Jinja template) written as `chat_template.jinja`, the tokenizer's own
/// template left out; the tensors unchanged; refusals by name.
#[test]
fn tokenizer_source_and_chat_template() {
    let dir = models();
    let d = dir.path();
    std::fs::write(d.join("base/chat_template.jinja"), "{{ base }}").unwrap();
    let tok = d.join("tok");
    std::fs::create_dir_all(&tok).unwrap();
    // The models' vocabulary (nothing moves): its files as they are.
    let tok_json = stand_in_tokenizer(77, 32);
    std::fs::write(tok.join("tokenizer.json"), &tok_json).unwrap();
    std::fs::write(
        tok.join("tokenizer_config.json"),
        br#"{"chat_template": "{{ tok }}", "b": 2}"#,
    )
    .unwrap();
    std::fs::write(tok.join("chat_template.jinja"), "{{ tok }}").unwrap();
    std::fs::write(tok.join("special_tokens_map.json"), br#"{"eos": 1}"#).unwrap();
    let ties = std::fs::read_to_string(Path::new(CARDS).join("ties.yml")).unwrap();
    let run = |name: &str, extra_yaml: &str, flags: &[&str]| {
        std::fs::write(d.join(format!("{name}.yml")), format!("{ties}{extra_yaml}")).unwrap();
        let recipe = format!("{name}.yml");
        let mut args = vec!["merge", recipe.as_str(), name, "--quiet"];
        args.extend(flags);
        ladle_in(d, &args)
    };
    ok(&run("plain", "", &[]));
    let plain = d.join("plain");
    assert_eq!(
        std::fs::read(plain.join("chat_template.jinja")).unwrap(),
        b"{{ base }}"
    );
    let chatml = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/chat_templates/chatml.jinja"
    ))
    .unwrap();
    for (name, source) in [("with-tok", "tok"), ("with-tok-prefixed", "model:tok")] {
        ok(&run(
            name,
            &format!("tokenizer_source: {source}\nchat_template: chatml\n"),
            &[],
        ));
        let soup = d.join(name);
        assert_eq!(tensor_digests(&soup), tensor_digests(&plain), "{name}");
        assert_eq!(
            std::fs::read(soup.join("tokenizer.json")).unwrap(),
            tok_json.as_bytes()
        );
        assert_eq!(
            read_json(&soup.join("tokenizer_config.json")),
            serde_json::json!({"b": 2})
        );
        assert_eq!(
            std::fs::read(soup.join("special_tokens_map.json")).unwrap(),
            br#"{"eos": 1}"#
        );
        assert_eq!(
            std::fs::read(soup.join("chat_template.jinja")).unwrap(),
            chatml
        );
        // config.json is still the donor's; the donor's generation_config is not the
        // tokenizer's (the tokenizer source has none).
        assert_eq!(read_json(&soup.join("config.json"))["seed"], 1);
        assert!(!soup.join("generation_config.json").exists());
        let manifest = read_json(&soup.join("ladle-manifest.json"));
        assert!(
            manifest["recipe"]["output"]["chat_template"]
                .as_str()
                .is_some_and(|t| t.as_bytes() == chatml),
            "{manifest}"
        );
    }
    // The recipe text goes back in with its tokenizer options.
    ok(&ladle_in(
        d,
        &[
            "merge",
            "with-tok/mergekit_config.yml",
            "tok-again",
            "--quiet",
        ],
    ));
    assert_eq!(
        std::fs::read(d.join("tok-again/chat_template.jinja")).unwrap(),
        chatml
    );
    // A tokenizer source is written even with --no-copy-tokenizer; a Jinja template as text.
    let own = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}";
    ok(&run(
        "own",
        &format!(
            "tokenizer_source: ./tok\nchat_template: |-\n  {}\n",
            own.replace('\n', "\n  ")
        ),
        &["--no-copy-tokenizer"],
    ));
    assert_eq!(
        std::fs::read_to_string(d.join("own/chat_template.jinja")).unwrap(),
        own
    );
    assert_eq!(
        std::fs::read(d.join("own/tokenizer.json")).unwrap(),
        tok_json.as_bytes()
    );
    // The donor's tokenizer with another template: its own template files left out.
    ok(&run("donor-tpl", "chat_template: llama3\n", &[]));
    let soup = d.join("donor-tpl");
    assert_eq!(
        std::fs::read(soup.join("tokenizer.json")).unwrap(),
        std::fs::read(d.join("base/tokenizer.json")).unwrap()
    );
    assert!(
        std::fs::read_to_string(soup.join("chat_template.jinja"))
            .unwrap()
            .contains("<|start_header_id|>")
    );
    // Refused by name.
    std::fs::create_dir_all(d.join("bad")).unwrap();
    std::fs::write(d.join("bad/tokenizer.json"), br#"{"v": 78}"#).unwrap();
    for (name, extra, flags, want) in [
        ("r1", "chat_template: vicuna\n", &[][..], "chat_template"),
        (
            "r3",
            "chat_template: chatml\n",
            &["--no-copy-tokenizer"],
            "chat_template",
        ),
        // A tokenizer.json that is no tokenizer: refused naming the file.
        ("r4", "tokenizer_source: ./bad\n", &[], "bad/tokenizer.json"),
        (
            "r5",
            "tokenizer_source: ./missing\n",
            &[],
            "tokenizer_source",
        ),
    ] {
        let out = run(name, extra, flags);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}");
        assert!(err.contains(&format!("{want}:")), "{name}: {err}");
        assert!(!d.join(name).join("model.safetensors").exists(), "{name}");
    }
    // A folder without a tokenizer: the job fails before anything is written.
    std::fs::create_dir_all(d.join("empty")).unwrap();
    let out = run("r6", "tokenizer_source: ./empty\n", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("[invalid_recipe]") && err.contains("holds no tokenizer"),
        "{err}"
    );
    // A JSON recipe: its mergekit_config.yml names them, and reproduces the soup.
    std::fs::write(
        d.join("t.json"),
        r#"{"method": "linear", "models": [{"uri": "ft1", "weight": 1.0}, {"uri": "ft2", "weight": 1.0}],
            "tokenizer_source": "tok", "chat_template": "mistral",
            "output": {"uri": "file:///placeholder/"}}"#,
    )
    .unwrap();
    ok(&ladle_in(
        d,
        &["merge", "t.json", "--out", "json-tok", "--quiet"],
    ));
    let text = std::fs::read_to_string(d.join("json-tok/mergekit_config.yml")).unwrap();
    assert!(text.contains("\nchat_template: mistral\n"), "{text}");
    assert!(text.contains("\ntokenizer_source: /"), "{text}");
    ok(&ladle_in(
        d,
        &[
            "merge",
            "json-tok/mergekit_config.yml",
            "json-again",
            "--quiet",
        ],
    ));
    for f in ["tokenizer.json", "chat_template.jinja"] {
        assert_eq!(
            std::fs::read(d.join("json-tok").join(f)).unwrap(),
            std::fs::read(d.join("json-again").join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(
        tensor_digests(&d.join("json-tok")),
        tensor_digests(&d.join("json-again"))
    );
}

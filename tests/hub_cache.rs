//! Hugging Face hub ids resolved offline from a local cache (the layout huggingface_hub
//! writes: `models--org--name/{refs/<ref>, snapshots/<commit>/ -> ../../blobs/<hash>}`), through
//! `ladle merge` and through the service over HTTP: the snapshots picked by `refs/main`, a tag
//! and a commit; the recipe text and the card naming the hub ids; a model, a revision or a
//! cache missing (`model_not_cached`); a snapshot link out of the cache (`path_outside_roots`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use ladle::config::{ServiceArgs, Settings, TuningArgs};
use ladle::service::Mode;
use sha2::{Digest, Sha256};

const LADLE: &str = env!("CARGO_BIN_EXE_ladle");

const BASE_MAIN: &str = "1111111111111111111111111111111111111111";
const FT_MAIN: &str = "2222222222222222222222222222222222222222";
const FT_V2: &str = "3333333333333333333333333333333333333333";
const EVIL_MAIN: &str = "4444444444444444444444444444444444444444";

/// A checkpoint's files: bf16 tensors, a config and a tokenizer.
fn checkpoint(seed: u64) -> Vec<(&'static str, Vec<u8>)> {
    let tensors = vec![
        bf16_tensor("model.layers.0.mlp.weight", &[24, 16], seed),
        bf16_tensor("model.layers.1.mlp.weight", &[24, 16], seed + 1),
        bf16_tensor("model.embed_tokens.weight", &[32, 16], seed + 2),
    ];
    vec![
        ("model.safetensors", safetensors_bytes(&tensors)),
        (
            "config.json",
            format!(r#"{{"model_type": "llama", "num_hidden_layers": 2, "torch_dtype": "bfloat16", "seed": {seed}}}"#)
                .into_bytes(),
        ),
        ("tokenizer.json", stand_in_tokenizer(seed, 32).into_bytes()),
    ]
}

/// One snapshot of `repo` (`org/name`) at `commit` in the cache: every file a blob named by
/// its SHA-256, linked from the snapshot as huggingface_hub links it; `refs` name the commit.
fn add_snapshot(cache: &Path, repo: &str, commit: &str, refs: &[&str], seed: u64) -> PathBuf {
    let dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = dir.join("snapshots").join(commit);
    std::fs::create_dir_all(dir.join("blobs")).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    for (name, bytes) in checkpoint(seed) {
        let blob = hex::encode(Sha256::digest(&bytes));
        std::fs::write(dir.join("blobs").join(&blob), &bytes).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snapshot.join(name)).unwrap();
    }
    for r in refs {
        let path = dir.join("refs").join(r);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, commit).unwrap();
    }
    snapshot
}

/// The fake cache under `root/hub`: `org/base` (main), `org/ft` (main, and tag `v2` at another
/// commit), `org/evil` (main; its weights link to a file outside the cache).
fn fake_cache(root: &Path) -> PathBuf {
    let cache = root.join("hub");
    add_snapshot(&cache, "org/base", BASE_MAIN, &["main"], 1);
    add_snapshot(&cache, "org/ft", FT_MAIN, &["main"], 10);
    add_snapshot(&cache, "org/ft", FT_V2, &["v2"], 20);
    let evil = add_snapshot(&cache, "org/evil", EVIL_MAIN, &["main"], 30);
    let outside = root.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(
        outside.join("private.safetensors"),
        safetensors_bytes(&[bf16_tensor("model.layers.0.mlp.weight", &[24, 16], 99)]),
    )
    .unwrap();
    std::fs::remove_file(evil.join("model.safetensors")).unwrap();
    std::os::unix::fs::symlink(
        outside.join("private.safetensors"),
        evil.join("model.safetensors"),
    )
    .unwrap();
    cache
}

/// base + 0.3·(ft@main − base) + 0.7·(ft@v2 − base), named by hub ids.
const HUB_RECIPE: &str = "merge_method: task_arithmetic\nbase_model: org/base\nmodels:\n  - model: org/ft\n    parameters:\n      weight: 0.3\n  - model: org/ft@v2\n    parameters:\n      weight: 0.7\ndtype: float32\n";

/// The same merge naming the snapshot folders by path.
fn path_recipe(cache: &Path) -> String {
    let snap = |repo: &str, commit: &str| {
        cache
            .join(format!(
                "models--{}/snapshots/{commit}",
                repo.replace('/', "--")
            ))
            .display()
            .to_string()
    };
    HUB_RECIPE
        .replace("org/ft@v2", &snap("org/ft", FT_V2))
        .replace("org/ft\n", &format!("{}\n", snap("org/ft", FT_MAIN)))
        .replace("org/base", &snap("org/base", BASE_MAIN))
}

/// `ladle merge` in `cwd` with no Hugging Face settings inherited (`HOME` points at `home`).
fn ladle(cwd: &Path, home: &Path, env: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut cmd = Command::new(LADLE);
    cmd.current_dir(cwd)
        .args(args)
        .env("HOME", home)
        .env_remove("LADLE_HF_CACHE");
    for var in [
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HOME",
        "XDG_CACHE_HOME",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn ok(run: &Output) {
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

fn failed_with(run: &Output, code: &str) -> String {
    let err = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(!run.status.success(), "{err}");
    assert!(err.contains(&format!("[{code}]")), "{code}: {err}");
    err
}

/// The manifest's inputs name the hub ids as written, with the commit of the snapshot read,
/// and nothing in it names the cache's folders (paths the recipe did not write).
fn check_inputs(soup: &Path, cache: &Path) {
    let text = std::fs::read_to_string(soup.join("ladle-manifest.json")).unwrap();
    assert!(!text.contains(&*cache.to_string_lossy()), "{text}");
    assert!(!text.contains("models--"), "{text}");
    let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    let inputs: Vec<(&str, &str)> = manifest["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["uri"].as_str().unwrap(), i["commit"].as_str().unwrap()))
        .collect();
    assert_eq!(
        inputs,
        [
            ("org/base", BASE_MAIN),
            ("org/ft", FT_MAIN),
            ("org/ft@v2", FT_V2)
        ],
        "{text}"
    );
}

/// The card's front matter: its `base_model` lists the hub ids, without revisions.
fn check_card(soup: &Path, recipe_text: &str) {
    let card = std::fs::read_to_string(soup.join("README.md")).unwrap();
    assert!(
        card.starts_with("---\nbase_model:\n- org/base\n- org/ft\nlibrary_name: transformers\n"),
        "{card}"
    );
    assert!(
        card.contains("merge method using [org/base](https://huggingface.co/org/base) as a base"),
        "{card}"
    );
    assert!(
        card.contains("* [org/ft](https://huggingface.co/org/ft)"),
        "{card}"
    );
    assert!(card.contains(recipe_text), "{card}");
}

#[test]
fn ladle_merge_resolves_hub_ids_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let cache = fake_cache(&root);
    let home = root.join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(root.join("hub.yml"), HUB_RECIPE).unwrap();
    std::fs::write(root.join("paths.yml"), path_recipe(&cache)).unwrap();
    let cache_s = cache.to_str().unwrap();

    // --hf-cache; the same tensors as the snapshot folders named by path.
    ok(&ladle(
        &root,
        &home,
        &[],
        &["merge", "hub.yml", "soup", "--quiet", "--hf-cache", cache_s],
    ));
    ok(&ladle(
        &root,
        &home,
        &[],
        &["merge", "paths.yml", "by-path", "--quiet"],
    ));
    let soup = root.join("soup");
    let want = tensor_digests(&root.join("by-path"));
    assert_eq!(tensor_digests(&soup), want);
    // main and v2 are different snapshots: swapping them changes the soup.
    std::fs::write(
        root.join("swapped.yml"),
        HUB_RECIPE
            .replace("weight: 0.3", "weight: 0.x")
            .replace("weight: 0.7", "weight: 0.3")
            .replace("weight: 0.x", "weight: 0.7"),
    )
    .unwrap();
    ok(&ladle(
        &root,
        &home,
        &[],
        &[
            "merge",
            "swapped.yml",
            "swapped",
            "--quiet",
            "--hf-cache",
            cache_s,
        ],
    ));
    assert_ne!(tensor_digests(&root.join("swapped")), want);

    // Recorded: the recipe as written, the snapshots read, the card's hub ids.
    assert_eq!(
        std::fs::read_to_string(soup.join("mergekit_config.yml")).unwrap(),
        HUB_RECIPE
    );
    check_card(&soup, HUB_RECIPE);
    let manifest = read_json(&soup.join("ladle-manifest.json"));
    assert_eq!(manifest["recipe"]["base_model"], "org/base");
    assert_eq!(manifest["recipe"]["models"][1]["uri"], "org/ft@v2");
    check_inputs(&soup, &cache);
    // The donor's side files come through the snapshot's links.
    assert_eq!(read_json(&soup.join("config.json"))["seed"], 1);
    assert_eq!(
        std::fs::read(soup.join("tokenizer.json")).unwrap(),
        stand_in_tokenizer(1, 32).as_bytes()
    );
    // mergekit_config.yml goes back in.
    ok(&ladle(
        &root,
        &home,
        &[],
        &[
            "merge",
            "soup/mergekit_config.yml",
            "again",
            "--quiet",
            "--hf-cache",
            cache_s,
        ],
    ));
    assert_eq!(tensor_digests(&root.join("again")), want);

    // The cache from LADLE_HF_CACHE, or huggingface_hub's default ($HF_HUB_CACHE, $HF_HOME/hub).
    ok(&ladle(
        &root,
        &home,
        &[("LADLE_HF_CACHE", &cache)],
        &["merge", "hub.yml", "env", "--quiet"],
    ));
    assert_eq!(tensor_digests(&root.join("env")), want);
    ok(&ladle(
        &root,
        &home,
        &[("HF_HUB_CACHE", &cache)],
        &["merge", "hub.yml", "default", "--quiet"],
    ));
    assert_eq!(tensor_digests(&root.join("default")), want);
    std::fs::create_dir_all(root.join("hf-home")).unwrap();
    std::os::unix::fs::symlink(&cache, root.join("hf-home/hub")).unwrap();
    ok(&ladle(
        &root,
        &home,
        &[("HF_HOME", &root.join("hf-home"))],
        &["merge", "hub.yml", "from-hf-home", "--quiet"],
    ));
    assert_eq!(tensor_digests(&root.join("from-hf-home")), want);

    // A JSON recipe: a hub id with a commit as its revision.
    std::fs::write(
        root.join("r.json"),
        format!(
            r#"{{"method": "linear", "models": [{{"uri": "org/ft@{FT_V2}", "weight": 1.0}}, {{"uri": "org/base", "weight": 1.0}}],
                "output": {{"uri": "file:///placeholder/"}}}}"#
        ),
    )
    .unwrap();
    ok(&ladle(
        &root,
        &home,
        &[],
        &[
            "merge",
            "r.json",
            "--out",
            "json-soup",
            "--quiet",
            "--hf-cache",
            cache_s,
        ],
    ));
    let text = std::fs::read_to_string(root.join("json-soup/mergekit_config.yml")).unwrap();
    assert!(
        text.contains(&format!("  - model: org/ft@{FT_V2}\n")),
        "{text}"
    );
    assert!(text.contains("  - model: org/base\n"), "{text}");
    let card = std::fs::read_to_string(root.join("json-soup/README.md")).unwrap();
    assert!(
        card.starts_with("---\nbase_model:\n- org/ft\n- org/base\n"),
        "{card}"
    );

    // A local folder of the same shape is the folder (as mergekit reads it).
    let local = root.join("org/base");
    std::fs::create_dir_all(&local).unwrap();
    for (name, bytes) in checkpoint(1) {
        std::fs::write(local.join(name), bytes).unwrap();
    }
    ok(&ladle(
        &root,
        &home,
        &[],
        &[
            "merge",
            "hub.yml",
            "local-base",
            "--quiet",
            "--hf-cache",
            cache_s,
        ],
    ));
    let manifest = read_json(&root.join("local-base/ladle-manifest.json"));
    assert!(
        manifest["recipe"]["base_model"]
            .as_str()
            .unwrap()
            .ends_with("/org/base/"),
        "{manifest}"
    );
    std::fs::remove_dir_all(root.join("org")).unwrap();

    // Refusals, each naming the model (and revision).
    let refuse = |name: &str, text: &str, extra: &[&str], env: &[(&str, &Path)], code: &str| {
        let name = format!("{name}.yml");
        std::fs::write(root.join(&name), text).unwrap();
        let mut args = vec!["merge", name.as_str(), "out-bad", "--quiet"];
        args.extend(extra);
        let err = failed_with(&ladle(&root, &home, env, &args), code);
        assert!(!root.join("out-bad/model.safetensors").exists());
        err
    };
    let with_cache = ["--hf-cache", cache_s];
    let err = refuse(
        "missing",
        &HUB_RECIPE.replace("org/ft@v2", "org/missing"),
        &with_cache,
        &[],
        "model_not_cached",
    );
    assert!(
        err.contains("org/missing is not in the Hugging Face cache"),
        "{err}"
    );
    assert!(err.contains("ladle never downloads"), "{err}");
    let err = refuse(
        "no-rev",
        &HUB_RECIPE.replace("org/ft@v2", "org/ft@v9"),
        &with_cache,
        &[],
        "model_not_cached",
    );
    assert!(
        err.contains("revision \"v9\" of org/ft is not in the Hugging Face cache"),
        "{err}"
    );
    assert!(err.contains("cached refs: main, v2"), "{err}");
    let err = refuse(
        "no-commit",
        &HUB_RECIPE.replace("org/ft@v2", &format!("org/ft@{}", "5".repeat(40))),
        &with_cache,
        &[],
        "model_not_cached",
    );
    assert!(err.contains("has no snapshot"), "{err}");
    // No cache configured and none at the default place (an empty home).
    let err = refuse("no-cache", HUB_RECIPE, &[], &[], "model_not_cached");
    assert!(
        err.contains("org/ft is not in the Hugging Face cache"),
        "{err}"
    );
    // A snapshot link out of the cache, without naming where it leads.
    let err = refuse(
        "evil",
        &HUB_RECIPE.replace("org/ft@v2", "org/evil"),
        &with_cache,
        &[],
        "path_outside_roots",
    );
    assert!(err.contains("org/evil: model.safetensors"), "{err}");
    assert!(!err.contains("outside/private"), "{err}");
    // Restricted by --allowed-root: a configured cache is a root; the default one is not.
    let allowed = root.display().to_string() + "/soups";
    std::fs::create_dir_all(&allowed).unwrap();
    let restricted = ladle(
        &root,
        &home,
        &[],
        &[
            "merge",
            "hub.yml",
            "soups/r",
            "--quiet",
            "--allowed-root",
            &allowed,
            "--hf-cache",
            cache_s,
        ],
    );
    ok(&restricted);
    assert_eq!(tensor_digests(&root.join("soups/r")), want);
    let err = failed_with(
        &ladle(
            &root,
            &home,
            &[("HF_HUB_CACHE", &cache)],
            &[
                "merge",
                "hub.yml",
                "soups/d",
                "--quiet",
                "--allowed-root",
                &allowed,
            ],
        ),
        "storage_not_allowed",
    );
    assert!(err.contains("\"org/ft\""), "{err}");
}

/// A service with `hf_cache` set as a config file sets it.
fn service_settings(root: &Path, hf_cache: Option<&Path>) -> Settings {
    let data = root.join(format!("data-{}", hf_cache.is_some()));
    let config = root.join(format!("ladle-{}.toml", hf_cache.is_some()));
    let text = match hf_cache {
        Some(c) => format!("hf_cache = {:?}\n", c.display().to_string()),
        None => String::new(),
    };
    std::fs::write(&config, text).unwrap();
    let args = ServiceArgs {
        bind: Some("127.0.0.1:0".parse().unwrap()),
        data_dir: Some(data.clone()),
        database_url: Some(format!("sqlite:{}", data.join("ladle.db").display())),
        allowed_roots: vec![file_url(&root.join("soups"))],
        workers: Some(1),
        tuning: TuningArgs {
            poll_secs: Some(0.2),
            chunk_elems: Some(1024),
            ..Default::default()
        },
        ..Default::default()
    };
    Settings::resolve(args, Some(&config)).unwrap()
}

async fn post_yaml(base: &str, text: &str) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/merges"))
        .header("content-type", "application/yaml")
        .body(text.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_resolves_hub_ids_from_a_configured_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let cache = fake_cache(&root);
    std::fs::create_dir_all(root.join("soups")).unwrap();
    std::fs::write(root.join("paths.yml"), path_recipe(&cache)).unwrap();
    let home = root.join("home");
    std::fs::create_dir_all(&home).unwrap();
    ok(&ladle(
        &root,
        &home,
        &[],
        &["merge", "paths.yml", "by-path", "--quiet"],
    ));
    let want = tensor_digests(&root.join("by-path"));

    let settings = service_settings(&root, Some(&cache));
    assert!(
        settings
            .allowed_roots
            .contains(&cache.display().to_string()),
        "{:?}",
        settings.allowed_roots
    );
    let (service, base) = start(&settings, Mode::Serve).await;
    let client = reqwest::Client::new();
    let out = |name: &str| {
        format!(
            "output:\n  uri: {}\n",
            file_url(&root.join("soups").join(name))
        )
    };

    // YAML naming hub ids.
    let text = format!("{HUB_RECIPE}{}", out("yaml"));
    let (status, job) = post_yaml(&base, &text).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let done = wait_terminal(&client, &base, &id, std::time::Duration::from_secs(60)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let soup = root.join("soups/yaml");
    assert_eq!(tensor_digests(&soup), want);
    check_card(&soup, HUB_RECIPE);
    assert_eq!(
        std::fs::read_to_string(soup.join("mergekit_config.yml")).unwrap(),
        text
    );
    // The stored job names the hub ids as written (resolved when the job runs), never the
    // cache's folders; the manifest has the commits read.
    let recipe = &done["recipe"];
    let recipe = recipe.get("recipe").unwrap_or(recipe);
    assert_eq!(recipe["models"][1]["uri"], "org/ft@v2", "{recipe}");
    assert_eq!(recipe["base_model"], "org/base", "{recipe}");
    assert!(!done.to_string().contains("models--"), "{done}");
    check_inputs(&soup, &cache);

    // JSON naming hub ids, its tokenizer from one of them, with one of mergekit's templates.
    let body = serde_json::json!({
        "method": "task_arithmetic",
        "base_model": "org/base",
        "models": [{"uri": "org/ft", "weight": 0.3}, {"uri": "org/ft@v2", "weight": 0.7}],
        "input_dtype": "float32",
        "parameters": {"compute_dtype": "float32"},
        "tokenizer_source": "org/ft@v2",
        "chat_template": "chatml",
        "output": {"uri": file_url(&root.join("soups/json")), "dtype": "float32"}
    });
    let (status, job) = submit(&client, &base, &body).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let done = wait_terminal(&client, &base, &id, std::time::Duration::from_secs(60)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(tensor_digests(&root.join("soups/json")), want);
    let card = std::fs::read_to_string(root.join("soups/json/README.md")).unwrap();
    assert!(
        card.starts_with("---\nbase_model:\n- org/base\n- org/ft\n"),
        "{card}"
    );
    assert_eq!(
        std::fs::read(root.join("soups/json/tokenizer.json")).unwrap(),
        stand_in_tokenizer(20, 32).as_bytes()
    );
    assert_eq!(
        std::fs::read_to_string(root.join("soups/json/chat_template.jinja")).unwrap(),
        ladle::recipe::tokenizer::CHAT_TEMPLATES[1].1
    );
    let recipe = &done["recipe"];
    let recipe = recipe.get("recipe").unwrap_or(recipe);
    assert_eq!(
        recipe["output"]["tokenizer_source"], "org/ft@v2",
        "{recipe}"
    );
    assert!(!done.to_string().contains("models--"), "{done}");
    check_inputs(&root.join("soups/json"), &cache);

    // Refused at submission: 4xx with the code, the field, the model and the revision.
    let refused = |text: String, code: &'static str, status: u16| {
        let base = base.clone();
        async move {
            let (got, err) = post_yaml(&base, &text).await;
            assert_eq!(got, status, "{err}");
            assert_eq!(err["code"], code, "{err}");
            err
        }
    };
    let err = refused(
        format!(
            "{}{}",
            HUB_RECIPE.replace("org/ft@v2", "org/missing"),
            out("m")
        ),
        "model_not_cached",
        422,
    )
    .await;
    assert_eq!(err["field"], "models[1].uri", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("org/missing"),
        "{err}"
    );
    let err = refused(
        format!(
            "{}{}",
            HUB_RECIPE.replace("org/ft@v2", "org/ft@v9"),
            out("r")
        ),
        "model_not_cached",
        422,
    )
    .await;
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("revision \"v9\" of org/ft"),
        "{err}"
    );
    let err = refused(
        format!(
            "{}{}",
            HUB_RECIPE.replace("org/ft@v2", "org/evil"),
            out("e")
        ),
        "path_outside_roots",
        403,
    )
    .await;
    assert!(
        !err["message"].as_str().unwrap().contains("outside/private"),
        "{err}"
    );
    // An output shaped like a hub id is not one (outputs are written: storage URLs only).
    let err = refused(
        format!("{HUB_RECIPE}output:\n  uri: org/soup\n"),
        "invalid_uri",
        400,
    )
    .await;
    assert_eq!(err["field"], "output.uri", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("org/soup"),
        "{err}"
    );
    for name in ["m", "r", "e"] {
        assert!(!root.join("soups").join(name).exists(), "{name}");
    }
    service.shutdown().await;

    // A service without a configured cache refuses hub ids, whatever $HF_HOME holds.
    let settings = service_settings(&root, None);
    assert!(settings.hf_cache.is_none());
    let (service, base) = start(&settings, Mode::Serve).await;
    let (status, err) = post_yaml(&base, &format!("{HUB_RECIPE}{}", out("none"))).await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["code"], "model_not_cached", "{err}");
    assert_eq!(err["field"], "models[0].uri", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("--hf-cache"),
        "{err}"
    );
    service.shutdown().await;
}

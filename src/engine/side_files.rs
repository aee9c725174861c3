//! What a soup's folder holds beside its tensors, as mergekit 0.1.5 writes it:
//!
//! - `config.json` written anew from the donor's (the base model, else the first model):
//!   `dtype` and `torch_dtype` set to the output dtype (transformers ≥ 4.56 reads `dtype` and
//!   prefers it when both are there; older versions and other tools read `torch_dtype`),
//!   `num_hidden_layers` the depth of a slice stack;
//! - the donor's tokenizer and generation files ([`TOKENIZER_FILES`], the list mergekit's
//!   `_copy_tokenizer` copies, plus the processor files its architectures carry along) byte for
//!   byte, unless `output.copy_tokenizer` is false; a built tokenizer's files
//!   ([`super::permute`]), or, when a source-only build (`tokenizer_source: base` or a model)
//!   leaves every model's rows where they are, that source's files as they are, always
//!   (mergekit writes the tokenizer a recipe names whatever `--copy-tokenizer` says);
//! - with `chat_template`, that template as `chat_template.jinja` (where transformers 5's
//!   `save_pretrained`, which mergekit calls, writes it), the tokenizer's own template left
//!   out (`chat_template.jinja`, `chat_template.json`, the `chat_template` key of
//!   `tokenizer_config.json`);
//! - the model card `README.md` ([`super::model_card`]) and `mergekit_config.yml` (the recipe
//!   text), unless `output.write_model_card` is false. An input's own `README.md` (another
//!   model's card) and any other file of the donor folder are never copied.

use bytes::Bytes;

use object_store::ObjectStoreExt;

use super::output::{copy_side_files, put_small};
use super::{EngineError, OutputFile, model_card};
use crate::merge::DType;
use crate::recipe::Recipe;
use crate::recipe::tokenizer::{TokenizerBuild, VocabSource};
use crate::storage::{Location, Storage};

/// The donor's files copied byte for byte (mergekit's list, in its order, then the tag-along
/// files of its multimodal architectures).
pub const TOKENIZER_FILES: [&str; 14] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
    "chat_template.json",
    "video_preprocessor_config.json",
    "vocab.json",
    "preprocessor_config.json",
    "processor_config.json",
    "normalizer.json",
];

pub const CONFIG_NAME: &str = "config.json";
pub const MODEL_CARD_NAME: &str = "README.md";
pub const RECIPE_NAME: &str = "mergekit_config.yml";

/// What the side files need to know of the planned soup.
pub(super) struct SideInfo {
    /// The dtype of the merged tensors (the output dtype, else what the first merged float
    /// tensor keeps).
    pub dtype: Option<DType>,
    /// The depth of a slice stack.
    pub num_hidden_layers: Option<u64>,
    /// The folder the tokenizer files come from instead of the donor (a source-only build
    /// that changes nothing: [`tokenizer_source`]).
    pub tokenizer: Option<Location>,
    /// The chat template written (`chat_template`, with `auto` resolved; `None`: the
    /// tokenizer keeps its own).
    pub chat_template: Option<String>,
    /// A tokenizer built for the soup (`output.tokenizer`).
    pub built: Option<super::permute::Built>,
}

/// The tokenizer files a tokenizer source must hold one of (what transformers loads a
/// tokenizer from, and mergekit's test for a tokenizer it can copy).
const TOKENIZER_MARKERS: [&str; 3] = ["tokenizer_config.json", "tokenizer.json", "tokenizer.model"];

/// The chat template file transformers ≥ 4.43 writes (and mergekit 0.1.5, through
/// transformers 5's `save_pretrained`, writes a recipe's `chat_template` into).
pub const CHAT_TEMPLATE_NAME: &str = "chat_template.jinja";

/// The folder whose tokenizer files are copied as they are when a source-only build changes
/// nothing ([`TokenizerBuild::source_only`]: `tokenizer_source: base` or a model, or a section
/// naming only that): the donor's for `base`, else that model's, resolved and checked to hold
/// a tokenizer before anything is merged (mergekit fails on a source without one, the base
/// included). `None` for every other recipe.
pub(super) async fn tokenizer_source(
    storage: &Storage,
    recipe: &Recipe,
    donor: Option<&Location>,
) -> Result<Option<Location>, EngineError> {
    let Some(build) = TokenizerBuild::of(&recipe.output).filter(TokenizerBuild::source_only) else {
        return Ok(None);
    };
    let field = build.source_field();
    let (folder, named) = match &build.spec.source {
        VocabSource::Model(uri) => (storage.resolve(uri)?, uri.clone()),
        _ => match donor {
            Some(d) => (d.clone(), format!("base (the base model, {})", d.url)),
            None => {
                return Err(EngineError::InvalidRecipe(format!(
                    "{field}: base: the base model is a single file, with no tokenizer to \
                     build on (mergekit fails too); leave {field} out to merge without one"
                )));
            }
        },
    };
    for name in TOKENIZER_MARKERS {
        match folder.store.head(&folder.path.clone().join(name)).await {
            Ok(_) => return Ok(Some(folder)),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => {
                return Err(EngineError::store(format!("reading {}/{name}", folder.url))(e));
            }
        }
    }
    Err(EngineError::InvalidRecipe(format!(
        "{field}: {named} holds no tokenizer (none of {}; mergekit fails too)",
        TOKENIZER_MARKERS.join(", ")
    )))
}

/// Which side files are copied from where: `config.json` (and, when copying the tokenizer,
/// the tokenizer files) from the donor, the tokenizer files from `tokenizer_source`; with a
/// built tokenizer, the source tokenizer's files other than the two rewritten
/// ([`BUILT_FILES`]).
fn sources<'a>(
    recipe: &Recipe,
    info: &'a SideInfo,
    donor: Option<&'a Location>,
) -> Vec<(&'a Location, Vec<&'static str>)> {
    let template = info.chat_template.as_deref();
    let tokenizer = info.tokenizer.as_ref();
    // A chat template replaces the tokenizer's own (in `tokenizer_config.json`, or a
    // `chat_template.jinja` / processor `chat_template.json` of the donor).
    let tokenizer_names: Vec<&'static str> = TOKENIZER_FILES
        .into_iter()
        .filter(|n| template.is_none() || !matches!(*n, CHAT_TEMPLATE_NAME | "chat_template.json"))
        .collect();
    // The tokenizer: from `tokenizer_source` whenever it is given (as mergekit writes the
    // tokenizer a recipe names), else the donor's when copying.
    let from_donor = recipe.output.copy_tokenizer && tokenizer.is_none() && info.built.is_none();
    let mut out = Vec::new();
    if let Some(donor) = donor {
        let mut names = vec![CONFIG_NAME];
        if from_donor {
            names.extend(&tokenizer_names);
        }
        out.push((donor, names));
    }
    if let Some(source) = tokenizer {
        out.push((source, tokenizer_names));
    } else if let Some(built) = &info.built {
        let names = BUILT_FILES
            .into_iter()
            .filter(|n| template.is_none() || *n != CHAT_TEMPLATE_NAME)
            .collect();
        out.push((&built.source, names));
    }
    out
}

/// What a built tokenizer's folder holds beside the two files rewritten (`tokenizer.json`,
/// `tokenizer_config.json`): what transformers' `save_pretrained` writes of a fast tokenizer.
const BUILT_FILES: [&str; 2] = ["special_tokens_map.json", CHAT_TEMPLATE_NAME];

/// `chat_template: auto` (mergekit's `_set_chat_template`): each input's template (its
/// `chat_template.jinja`, else the `chat_template` of its `tokenizer_config.json`: a string,
/// or the `default` of a list of named ones; inputs without a tokenizer have none), stripped;
/// the most common one, the first of them in the recipe's order (base first) on a tie.
/// `None` when no input has one (the tokenizer keeps its own). Any other `chat_template` is
/// its text already.
pub(super) async fn chat_template(
    recipe: &Recipe,
    inputs: &[(Location, crate::checkpoint::Checkpoint)],
) -> Result<Option<String>, EngineError> {
    let Some(written) = recipe.output.chat_template.as_deref() else {
        return Ok(None);
    };
    if written != crate::recipe::tokenizer::AUTO {
        return Ok(Some(written.to_string()));
    }
    let mut seen: Vec<(String, usize)> = Vec::new();
    let mut urls = std::collections::HashSet::new();
    for (loc, ckpt) in inputs {
        let Some(folder) = ckpt.folder.as_ref().map(|f| loc.with_path(f.clone())) else {
            continue;
        };
        if !urls.insert(folder.url.clone()) {
            continue;
        }
        if let Some(t) = model_template(&folder).await?
            && !t.trim().is_empty()
        {
            let t = t.trim().to_string();
            match seen.iter_mut().find(|(s, _)| *s == t) {
                Some((_, n)) => *n += 1,
                None => seen.push((t, 1)),
            }
        }
    }
    let best = seen.iter().map(|(_, n)| *n).max();
    Ok(seen
        .into_iter()
        .find(|(_, n)| Some(*n) == best)
        .map(|(t, _)| t))
}

/// One model folder's chat template as transformers loads it (see [`chat_template`]).
async fn model_template(folder: &Location) -> Result<Option<String>, EngineError> {
    let url = folder.url.trim_end_matches('/').to_string();
    let read = |name: &'static str| {
        let path = folder.path.clone().join(name);
        let url = url.clone();
        let context = format!("reading {url}/{name}");
        async move {
            match folder.store.get(&path).await {
                Ok(g) if g.meta.size > MAX_TEMPLATE_FILE => {
                    Err(EngineError::Tokenizer(super::vocab::TokenizerError {
                        file: format!("{url}/{name}"),
                        reason: format!("{} bytes, more than {MAX_TEMPLATE_FILE}", g.meta.size),
                    }))
                }
                Ok(g) => g
                    .bytes()
                    .await
                    .map(Some)
                    .map_err(EngineError::store(context)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(EngineError::store(context)(e)),
            }
        }
    };
    let config = read("tokenizer_config.json").await?;
    let has_tokenizer = config.is_some()
        || read("tokenizer.json").await?.is_some()
        || read("tokenizer.model").await?.is_some();
    if !has_tokenizer {
        return Ok(None);
    }
    if let Some(b) = read(CHAT_TEMPLATE_NAME).await? {
        return Ok(Some(String::from_utf8_lossy(&b).into_owned()));
    }
    let Some(b) = config else { return Ok(None) };
    let cfg: serde_json::Value = serde_json::from_slice(&b).map_err(|e| {
        EngineError::Tokenizer(super::vocab::TokenizerError {
            file: format!("{url}/tokenizer_config.json"),
            reason: format!("not valid JSON: {e}"),
        })
    })?;
    Ok(match cfg.get("chat_template") {
        Some(serde_json::Value::String(t)) => Some(t.clone()),
        Some(serde_json::Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    })
}

/// The largest tokenizer file read for its chat template.
const MAX_TEMPLATE_FILE: u64 = 64 << 20;

/// Before anything is written (at plan time): every side file that will be copied from a
/// local folder is opened once through the confined store, so that one linked out of the
/// roots is refused (`path_outside_roots`, naming it as the recipe's folder gives it) before a
/// shard is staged or the output folder made. The copy later goes through the same store.
pub(super) async fn check_sources(
    recipe: &Recipe,
    info: &SideInfo,
    donor: Option<&Location>,
) -> Result<(), EngineError> {
    for (source, names) in sources(recipe, info, donor) {
        let Some(local) = source.local.clone() else {
            continue;
        };
        let folder = source.path.clone();
        let url = source.url.clone();
        tokio::task::spawn_blocking(move || {
            for name in names {
                match local.open_file(&folder.clone().join(name)) {
                    Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(EngineError::store(format!("opening {url}/{name}"))(e)),
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| EngineError::Internal(format!("side file check failed: {e}")))??;
    }
    Ok(())
}

/// Write the side files of `recipe`'s soup into `dest` (the run's staging folder of `output`,
/// whose name titles the card); `donor` is the donor model's folder (`None` when it is a single
/// `.safetensors` file: nothing to copy).
pub(super) async fn write(
    recipe: &Recipe,
    donor: Option<&Location>,
    output: &Location,
    dest: &Location,
    info: &SideInfo,
) -> Result<Vec<OutputFile>, EngineError> {
    let mut written = Vec::new();
    let template = info.chat_template.as_deref();
    let edit = |name: &str, bytes: Bytes| match name {
        CONFIG_NAME => rewrite_config(bytes, info),
        "tokenizer_config.json" if template.is_some() => without_chat_template(bytes),
        _ => bytes,
    };
    let from_donor = recipe.output.copy_tokenizer && info.tokenizer.is_none();
    for (source, names) in sources(recipe, info, donor) {
        written.extend(copy_side_files(source, dest, &names, edit).await?);
    }
    if let Some(built) = &info.built {
        written.extend(write_built(built, dest, template.is_some()).await?);
    }
    if let Some(text) = template
        && (info.tokenizer.is_some() || info.built.is_some() || (from_donor && donor.is_some()))
    {
        let bytes = Bytes::from(text.to_string());
        written.push(put_small(dest, CHAT_TEMPLATE_NAME, bytes).await?);
    }
    if recipe.output.write_model_card {
        let card = model_card::render(recipe, &folder_name(&output.url));
        written.push(put_small(dest, MODEL_CARD_NAME, Bytes::from(card)).await?);
        if let Some(text) = &recipe.mergekit_config {
            written.push(put_small(dest, RECIPE_NAME, Bytes::from(text.clone())).await?);
        }
    }
    Ok(written)
}

/// A built tokenizer's two rewritten files (the source's `tokenizer_config.json` when it has
/// one, without its template when the recipe gives one).
async fn write_built(
    built: &super::permute::Built,
    dest: &Location,
    own_template: bool,
) -> Result<Vec<OutputFile>, EngineError> {
    let mut out = Vec::new();
    let json = |v: &serde_json::Value| -> Result<Bytes, EngineError> {
        let mut bytes = serde_json::to_vec_pretty(v)
            .map_err(|e| EngineError::Internal(format!("writing the tokenizer: {e}")))?;
        bytes.push(b'\n');
        Ok(Bytes::from(bytes))
    };
    let name = super::permute::TOKENIZER_JSON;
    out.push(put_small(dest, name, json(&built.tokenizer_json)?).await?);
    let name = super::permute::TOKENIZER_CONFIG;
    let path = built.source.path.clone().join(name);
    let context = format!("reading {}/{name}", built.source.url.trim_end_matches('/'));
    let cfg = match built.source.store.get(&path).await {
        Ok(g) => Some(g.bytes().await.map_err(EngineError::store(context))?),
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => return Err(EngineError::store(context)(e)),
    };
    if let Some(bytes) = cfg {
        let bytes = if own_template {
            without_chat_template(bytes)
        } else {
            bytes
        };
        let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            EngineError::Tokenizer(super::vocab::TokenizerError {
                file: format!("{}/{name}", built.source.url.trim_end_matches('/')),
                reason: format!("not valid JSON: {e}"),
            })
        })?;
        out.push(put_small(dest, name, json(&built.tokenizer_config(v))?).await?);
    }
    Ok(out)
}

/// The last segment of a folder URL (mergekit titles the card with the output folder's name).
fn folder_name(url: &str) -> String {
    let local = url::Url::parse(url)
        .ok()
        .filter(|u| u.scheme() == "file")
        .and_then(|u| u.to_file_path().ok());
    if let Some(name) = local.as_deref().and_then(|p| p.file_name()) {
        return name.to_string_lossy().into_owned();
    }
    url.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_string()
}

/// torch's name of a dtype, as `config.json` gives it.
fn torch_name(d: DType) -> Option<&'static str> {
    match d {
        DType::F64 => Some("float64"),
        DType::F32 => Some("float32"),
        DType::F16 => Some("float16"),
        DType::BF16 => Some("bfloat16"),
        _ => None,
    }
}

/// `tokenizer_config.json` without its `chat_template` key (a recipe's template goes to
/// `chat_template.jinja`, which transformers prefers, as transformers 5's `save_pretrained`
/// moves it); byte for byte when it has none or is not a JSON object.
fn without_chat_template(bytes: Bytes) -> Bytes {
    let Ok(serde_json::Value::Object(mut cfg)) =
        serde_json::from_slice::<serde_json::Value>(&bytes)
    else {
        return bytes;
    };
    if cfg.remove("chat_template").is_none() {
        return bytes;
    }
    match serde_json::to_vec_pretty(&serde_json::Value::Object(cfg)) {
        Ok(mut v) => {
            v.push(b'\n');
            Bytes::from(v)
        }
        Err(_) => bytes,
    }
}

/// `config.json` with the soup's dtype and depth, written as transformers writes it (keys
/// sorted, two-space indent, a final newline); unchanged when it is not a JSON object.
fn rewrite_config(bytes: Bytes, info: &SideInfo) -> Bytes {
    let Ok(serde_json::Value::Object(mut cfg)) =
        serde_json::from_slice::<serde_json::Value>(&bytes)
    else {
        return bytes;
    };
    if let Some(name) = info.dtype.and_then(torch_name) {
        for key in ["dtype", "torch_dtype"] {
            cfg.insert(key.into(), name.into());
        }
    }
    if let Some(built) = &info.built {
        cfg.insert("vocab_size".into(), built.vocab_size.into());
    }
    if let Some(n) = info.num_hidden_layers {
        cfg.insert("num_hidden_layers".into(), n.into());
        if let Some(serde_json::Value::Object(text)) = cfg.get_mut("text_config")
            && text.contains_key("num_hidden_layers")
        {
            text.insert("num_hidden_layers".into(), n.into());
        }
    }
    let mut sorted: Vec<(String, serde_json::Value)> = cfg.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let cfg: serde_json::Map<String, serde_json::Value> = sorted.into_iter().collect();
    match serde_json::to_vec_pretty(&serde_json::Value::Object(cfg)) {
        Ok(mut v) => {
            v.push(b'\n');
            Bytes::from(v)
        }
        Err(_) => bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_weights_dotfiles_or_ladle_files() {
        let copied: Vec<&str> = std::iter::once(CONFIG_NAME)
            .chain(TOKENIZER_FILES)
            .collect();
        for skip in [
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "ladle-manifest.json",
            ".hidden",
            "model.safetensors#3",
            "ladle.db",
            "ladle.db-wal",
            "authorized_keys",
            "README.md",
            ".env",
        ] {
            assert!(!copied.contains(&skip), "{skip}");
        }
    }

    #[test]
    fn config_gets_dtype_and_depth() {
        let info = SideInfo {
            dtype: Some(DType::F32),
            num_hidden_layers: Some(44),
            tokenizer: None,
            chat_template: None,
            built: None,
        };
        let out = rewrite_config(
            Bytes::from_static(
                br#"{"torch_dtype": "bfloat16", "model_type": "llama", "num_hidden_layers": 40,
                    "text_config": {"num_hidden_layers": 40}}"#,
            ),
            &info,
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["dtype"], "float32");
        assert_eq!(v["torch_dtype"], "float32");
        assert_eq!(v["num_hidden_layers"], 44);
        assert_eq!(v["text_config"]["num_hidden_layers"], 44);
        assert!(out.ends_with(b"}\n"));
        let keep = Bytes::from_static(b"not json");
        assert_eq!(rewrite_config(keep.clone(), &info), keep);
        assert_eq!(folder_name("file:///x/my%20soup/"), "my soup");
        assert_eq!(folder_name("s3://b/p/out"), "out");
        let tok = Bytes::from_static(br#"{"chat_template": "x", "eos_token": "</s>"}"#);
        let v: serde_json::Value = serde_json::from_slice(&without_chat_template(tok)).unwrap();
        assert_eq!(v, serde_json::json!({"eos_token": "</s>"}));
        let plain = Bytes::from_static(br#"{"eos_token": "</s>"}"#);
        assert_eq!(without_chat_template(plain.clone()), plain);
    }
}

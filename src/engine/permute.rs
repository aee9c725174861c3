//! A tokenizer built for the soup (mergekit's `tokenizer_source`, `base`, `union` or a model,
//! and its `tokenizer` section: [`TokenizerBuild`]) and every model's embedding rows permuted
//! onto its vocabulary before the merge, as mergekit 0.1.5's `PermutedVocabulary`
//! (`mergekit/tokenizer/embed.py`). A build naming only a source (`base` or a model) that
//! moves no row (every model has each token at its own id and as many rows as tokens; the
//! base loses no token at its `vocab_size`) attaches nothing: the merge is the plain one and
//! the source's tokenizer files are copied as they are.
//!
//! [`attach`] (at plan time, before the tensors are checked against each other) reads each
//! model's `tokenizer.json` and `config.json` ([`super::vocab`]: union, stripping, the
//! permutations), decides where every row of every model comes from
//! ([`crate::checkpoint::permuted`]) and attaches that to the model's checkpoint, whose
//! embedding tensors then have the soup's shape. From then on every read of them
//! ([`super::permuted_read`], from `read_elems`: the merge, the pre-passes and passthrough alike) assembles the
//! chunk's rows: a model's own row where it has the token, else the token's default row
//! (mergekit's rules, in order: `tokenizer.tokens`' source for that token; the one model that
//! has it; zeros when none does; the base model's row when it has it; else the mean of the
//! models that have it, in the recipe's order), a padding row (`pad_to_multiple_of`) the mean
//! of the model's token rows, computed by a pre-pass here. Nothing beyond a chunk's rows (and
//! the rows its defaults need) is held. Embedding tensors are those mergekit's architectures
//! mark with a vocabulary axis: 2-D weights named `embed_tokens`, `wte`, `word_embeddings`,
//! `embed_in`, `tok_embeddings`, `lm_head` or `embed_out`.
//!
//! The permuted rows have the models' promoted dtype (after `input_dtype`'s cast on load), as
//! mergekit's. Refused, naming the file or the field, before anything is written: a tokenizer
//! that cannot be read, or only a `tokenizer.model` (`invalid_tokenizer`), a model with an
//! adapter folded in whose rows would move, a token source that is not one of the recipe's
//! models or lacks the token. A model with no tokenizer files has the base's (mergekit's
//! `build_tokenizer`: "Assuming same as" the base).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use object_store::ObjectStoreExt;
use serde_json::Value;

use super::vocab::{self, NewToken, TokenizerError, Vocab};
use super::{EngineError, permuted_read};
use crate::checkpoint::permuted::{DefaultRow, Permuted, RowModel, RowSource, RowTable};
use crate::checkpoint::{Checkpoint, TensorLoc};
use crate::merge::DType;
use crate::recipe::Recipe;
use crate::recipe::tokenizer::{EmbedSource, TokenSpec, TokenizerBuild, VocabSource};
use crate::storage::{Location, Storage};

pub const TOKENIZER_JSON: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
/// The largest tokenizer or config file read.
const MAX_TOKENIZER_FILE: u64 = 256 << 20;

/// What the side files need of a built tokenizer.
#[derive(Debug, Clone)]
pub(super) struct Built {
    /// The folder whose tokenizer files are rewritten (the base's, or `tokenizer.source`).
    pub source: Location,
    /// The soup's `tokenizer.json`.
    pub tokenizer_json: Value,
    pub removed: Vec<String>,
    pub new: Vec<NewToken>,
    /// Rows of the permuted embeddings (`config.json`'s `vocab_size`).
    pub vocab_size: u64,
}

impl Built {
    /// The soup's `tokenizer_config.json` from the source's.
    pub(super) fn tokenizer_config(&self, cfg: Value) -> Value {
        vocab::write_tokenizer_config(cfg, &self.removed, &self.new)
    }
}

/// Names of the embedding modules (the input embedding, then the output layer).
pub const EMBEDDINGS: [&str; 7] = [
    "embed_tokens",
    "wte",
    "word_embeddings",
    "embed_in",
    "tok_embeddings",
    "lm_head",
    "embed_out",
];

/// Whether `name` is an embedding weight with a vocabulary axis (0).
pub fn is_embedding(name: &str, shape: &[u64]) -> bool {
    let module = name.strip_suffix(".weight").unwrap_or(name);
    let last = module.rsplit('.').next().unwrap_or(module);
    shape.len() == 2 && EMBEDDINGS.contains(&last)
}

fn invalid_tokenizer(e: TokenizerError) -> EngineError {
    EngineError::Tokenizer(e)
}

/// A small file of a folder, `None` when it does not exist.
async fn read_file(folder: &Location, name: &str) -> Result<Option<Bytes>, EngineError> {
    let path = folder.path.clone().join(name);
    let file = format!("{}/{name}", folder.url.trim_end_matches('/'));
    let got = match folder.store.get(&path).await {
        Ok(g) => g,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(EngineError::store(format!("reading {file}"))(e)),
    };
    if got.meta.size > MAX_TOKENIZER_FILE {
        return Err(invalid_tokenizer(TokenizerError {
            file,
            reason: format!("{} bytes, more than {MAX_TOKENIZER_FILE}", got.meta.size),
        }));
    }
    let bytes = got
        .bytes()
        .await
        .map_err(EngineError::store(format!("reading {file}")))?;
    Ok(Some(bytes))
}

/// A model folder's tokenizer (`None`: it has no tokenizer files at all, and mergekit assumes
/// the base's) and its `config.json` `vocab_size`.
async fn model_tokenizer(
    folder: &Location,
) -> Result<(Option<(Vocab, Value)>, Option<u64>), EngineError> {
    let url = folder.url.trim_end_matches('/');
    let config = match read_file(folder, "config.json").await? {
        Some(b) => Some(serde_json::from_slice::<Value>(&b).map_err(|e| {
            invalid_tokenizer(TokenizerError {
                file: format!("{url}/config.json"),
                reason: format!("not valid JSON: {e}"),
            })
        })?),
        None => None,
    };
    let vocab_size = config.as_ref().and_then(|c| {
        c.get("vocab_size")
            .or_else(|| c.get("text_config").and_then(|t| t.get("vocab_size")))
            .and_then(Value::as_u64)
    });
    let file = format!("{url}/{TOKENIZER_JSON}");
    match read_file(folder, TOKENIZER_JSON).await? {
        Some(b) => Ok((
            Some(vocab::parse(&b, &file).map_err(invalid_tokenizer)?),
            vocab_size,
        )),
        None => {
            for other in [TOKENIZER_CONFIG, "tokenizer.model"] {
                if read_file(folder, other).await?.is_some() {
                    return Err(invalid_tokenizer(TokenizerError {
                        file,
                        reason: format!(
                            "missing: building a tokenizer needs each model's tokenizer.json \
                             (the folder has {other} only; transformers' save_pretrained of \
                             its fast tokenizer writes one; without tokenizer_source and a \
                             tokenizer section the donor's files are copied)"
                        ),
                    }));
                }
            }
            Ok((None, vocab_size))
        }
    }
}

/// The folder of an input (a single `.safetensors` file has none).
fn folder_of(loc: &Location, ckpt: &Checkpoint) -> Option<Location> {
    ckpt.folder.as_ref().map(|f| loc.with_path(f.clone()))
}

/// The dtype torch promotes these to.
fn promote(a: DType, b: DType) -> DType {
    match (a, b) {
        _ if a == b => a,
        (DType::F64, _) | (_, DType::F64) => DType::F64,
        _ => DType::F32,
    }
}

/// Build the soup's tokenizer and attach every model's permutation (`inputs`: base first
/// when the recipe has one). `None` when the recipe builds no tokenizer, or when a
/// source-only build ([`TokenizerBuild::source_only`]) would move no row.
pub(super) async fn attach(
    storage: &Storage,
    recipe: &Recipe,
    inputs: &mut [(Location, Checkpoint)],
    chunk_elems: usize,
) -> Result<Option<Built>, EngineError> {
    let Some(build) = TokenizerBuild::of(&recipe.output) else {
        return Ok(None);
    };
    let (spec, field) = (&build.spec, build.field);
    // A model with an adapter folded in: refused where its rows would move (a source-only
    // build that changes nothing needs no permutation, checked below).
    let lora = inputs.iter().position(|(_, c)| c.lora.is_some()).map(|i| {
        format!(
            "{field}: a model with a LoRA adapter folded in ({}) cannot have its embedding \
             rows permuted onto a built tokenizer; fold it first (passthrough of the model \
             with its adapter), or leave {field} out to copy the donor's tokenizer",
            inputs[i].0.url
        )
    });
    if let Some(e) = lora.clone().filter(|_| !build.source_only()) {
        return Err(EngineError::InvalidRecipe(e));
    }
    let (donor_loc, donor_ckpt) = &inputs[0];
    let donor = folder_of(donor_loc, donor_ckpt).ok_or_else(|| {
        EngineError::InvalidRecipe(format!(
            "{field}: the base model {} is a single file, with no tokenizer to build on",
            donor_loc.url
        ))
    })?;
    let mut vocabs: Vec<(Option<Vocab>, u64)> = Vec::with_capacity(inputs.len());
    let mut base_doc = None;
    for (i, (loc, ckpt)) in inputs.iter().enumerate() {
        let (tok, size) = match folder_of(loc, ckpt) {
            Some(f) => model_tokenizer(&f).await?,
            None => (None, None),
        };
        if i == 0 {
            let Some((v, doc)) = tok else {
                return Err(invalid_tokenizer(TokenizerError {
                    file: format!("{}/{TOKENIZER_JSON}", donor.url.trim_end_matches('/')),
                    reason: "missing: the base of a built tokenizer needs one".into(),
                }));
            };
            let size = size.unwrap_or(v.ids.len() as u64);
            base_doc = Some(doc);
            vocabs.push((Some(v), size));
        } else {
            let size = size.or_else(|| tok.as_ref().map(|(v, _)| v.ids.len() as u64));
            let v = tok.map(|(v, _)| v);
            let size = size.unwrap_or(vocabs[0].1);
            vocabs.push((v, size));
        }
    }
    let (base_full, base_size) = (vocabs[0].0.clone().unwrap_or_else(empty_vocab), vocabs[0].1);
    let (base, removed) = base_full.stripped(base_size);
    let (source_loc, source, source_doc, removed) = match &spec.source {
        VocabSource::Union | VocabSource::Base => (
            donor.clone(),
            base.clone(),
            base_doc.unwrap_or(Value::Null),
            removed,
        ),
        VocabSource::Model(uri) => {
            let loc = storage.resolve(uri)?;
            match model_tokenizer(&loc).await? {
                (Some((v, doc)), _) => (loc, v, doc, Vec::new()),
                (None, _) => {
                    return Err(invalid_tokenizer(TokenizerError {
                        file: format!("{}/{TOKENIZER_JSON}", loc.url.trim_end_matches('/')),
                        reason: format!(
                            "missing: {} names a model without one",
                            build.source_field()
                        ),
                    }));
                }
            }
        }
    };
    let union: Option<Vec<(&Vocab, u64)>> = matches!(spec.source, VocabSource::Union).then(|| {
        vocabs
            .iter()
            .enumerate()
            .filter_map(|(i, (v, s))| match (i, v) {
                (0, _) => Some((&base, *s)),
                (_, Some(v)) => Some((v, *s)),
                _ => None,
            })
            .collect()
    });
    let extra: Vec<&str> = spec.tokens.iter().map(|t| t.token.as_str()).collect();
    let new = vocab::build(&source, union.as_deref(), &extra);
    let source_file = format!("{}/{TOKENIZER_JSON}", source_loc.url.trim_end_matches('/'));
    let tokens = vocab::tokens_by_id(&source, &new, &source_file).map_err(invalid_tokenizer)?;
    // Each model's own vocabulary (a model without a tokenizer has the base's).
    let own: Vec<&Vocab> = vocabs
        .iter()
        .enumerate()
        .map(|(i, (v, _))| match (i, v) {
            (0, _) | (_, None) => &base,
            (_, Some(v)) => v,
        })
        .collect();
    let perms: Vec<Vec<Option<u64>>> = own
        .iter()
        .zip(&vocabs)
        .map(|(v, (_, size))| vocab::permutation(&tokens, v, *size))
        .collect();
    let n_tokens = tokens.len() as u64;
    // A source-only build that moves no row (each model has every token at its own id, as
    // many rows as tokens, nothing stripped): the merge and the tokenizer stay as they are,
    // and the source's files are copied (`side_files::tokenizer_source`).
    if build.source_only() && removed.is_empty() && new.is_empty() && unmoved(&perms, inputs) {
        return Ok(None);
    }
    if let Some(e) = lora {
        return Err(EngineError::InvalidRecipe(e));
    }
    let rows = match spec.pad_to_multiple_of {
        Some(m) if !n_tokens.is_multiple_of(m) => n_tokens.div_ceil(m) * m,
        _ => n_tokens,
    };
    // Which models are the recipe's, by URL (for the tokens' sources).
    let mut by_url: HashMap<String, usize> = HashMap::new();
    for (i, (loc, _)) in inputs.iter().enumerate() {
        by_url.entry(loc.url.clone()).or_insert(i);
    }
    let base_index = recipe.base_model.as_ref().map(|_| 0usize);
    let order: Vec<usize> = match base_index {
        Some(b) => (0..inputs.len()).filter(|i| *i != b).chain([b]).collect(),
        None => (0..inputs.len()).collect(),
    };
    let originals: Vec<(String, Checkpoint)> = inputs
        .iter()
        .map(|(l, c)| (l.url.clone(), c.clone()))
        .collect();
    let embeddings: Vec<String> = originals[0]
        .1
        .tensors
        .iter()
        .filter(|(n, t)| is_embedding(n, &t.shape) && t.dtype.is_mergeable_float())
        .map(|(n, _)| n.clone())
        .collect();
    let mut dtypes = BTreeMap::new();
    for name in &embeddings {
        let mut dtype: Option<DType> = None;
        let mut cols = None;
        for (i, (url, c)) in originals.iter().enumerate() {
            let t = c.tensors.get(name).ok_or_else(|| {
                EngineError::ShapeMismatch(format!(
                    "tensor {name}: in models[0] ({}) but not in models[{i}] ({url})",
                    originals[0].0
                ))
            })?;
            if *cols.get_or_insert(t.shape[1]) != t.shape[1] || t.shape.len() != 2 {
                return Err(EngineError::ShapeMismatch(format!(
                    "tensor {name}: shape {:?} in models[{i}] ({url}); the embeddings must \
                     agree on their width",
                    t.shape
                )));
            }
            if let Some(max) = perms[i].iter().flatten().max()
                && *max >= t.shape[0]
            {
                return Err(EngineError::ShapeMismatch(format!(
                    "tensor {name}: models[{i}] ({url}) has {} rows, its tokenizer ids reach {max}",
                    t.shape[0]
                )));
            }
            let d = match recipe.input_dtype {
                Some(to) => to,
                None => t.dtype,
            };
            dtype = Some(dtype.map_or(d, |a| promote(a, d)));
        }
        if let Some(d) = dtype {
            dtypes.insert(name.clone(), d);
        }
    }
    let specs: HashMap<&str, &TokenSpec> =
        spec.tokens.iter().map(|t| (t.token.as_str(), t)).collect();
    let mut defaults: Vec<DefaultRow> = Vec::new();
    let mut maps: Vec<Vec<RowSource>> = vec![Vec::with_capacity(tokens.len()); inputs.len()];
    for (j, tok) in tokens.iter().enumerate() {
        let cfg = specs.get(tok.as_str());
        let force = cfg.is_some_and(|c| c.force);
        let present: Vec<Option<u64>> = perms.iter().map(|p| p[j]).collect();
        if !force && present.iter().all(Option::is_some) {
            for (m, map) in maps.iter_mut().enumerate() {
                map.push(RowSource::Own(present[m].unwrap_or(0)));
            }
            continue;
        }
        let default = match cfg {
            Some(c) => token_default(
                c,
                j,
                &present,
                &perms,
                &own,
                &by_url,
                storage,
                &originals,
                &embeddings,
            )?,
            None => {
                let have: Vec<usize> = order
                    .iter()
                    .copied()
                    .filter(|m| present[*m].is_some())
                    .collect();
                match (have.as_slice(), base_index) {
                    ([one], _) => row(*one, present[*one]),
                    ([], _) => DefaultRow::Zero,
                    (_, Some(b)) if present[b].is_some() => row(b, present[b]),
                    _ => DefaultRow::Average(
                        have.iter()
                            .map(|m| (*m, present[*m].unwrap_or(0)))
                            .collect(),
                    ),
                }
            }
        };
        let k = defaults.len() as u32;
        defaults.push(default);
        for (m, map) in maps.iter_mut().enumerate() {
            map.push(match present[m] {
                Some(r) if !force => RowSource::Own(r),
                _ => RowSource::Default(k),
            });
        }
    }
    let table = Arc::new(RowTable {
        tokens: n_tokens,
        rows,
        maps,
        defaults,
        models: inputs
            .iter()
            .map(|(l, c)| RowModel {
                store: l.store.clone(),
                url: l.url.clone(),
                ckpt: c.clone(),
            })
            .collect(),
        dtypes,
        means: OnceLock::new(),
    });
    for (m, (_, ckpt)) in inputs.iter_mut().enumerate() {
        for (name, dtype) in &table.dtypes {
            if let Some(t) = ckpt.tensors.get_mut(name) {
                let cols = t.shape[1];
                *t = TensorLoc {
                    file: t.file,
                    dtype: *dtype,
                    shape: vec![rows, cols],
                    start: t.start,
                    end: t.start + rows * cols * dtype.size_bytes() as u64,
                };
            }
        }
        ckpt.permuted = Some(Arc::new(Permuted {
            model: m,
            table: table.clone(),
        }));
    }
    // Padding rows: the mean of each model's token rows, from a pass over them.
    let mut means = BTreeMap::new();
    if rows > n_tokens {
        for (m, (_, ckpt)) in inputs.iter().enumerate() {
            for name in table.dtypes.keys() {
                let Some(p) = &ckpt.permuted else { continue };
                means.insert(
                    (m, name.clone()),
                    permuted_read::token_mean(p, name, chunk_elems).await?,
                );
            }
        }
    }
    let _ = table.means.set(means);
    let tokenizer_json = vocab::write_tokenizer_json(source_doc, &removed, &new);
    Ok(Some(Built {
        source: source_loc,
        tokenizer_json,
        removed,
        new,
        vocab_size: rows,
    }))
}

/// Whether every permutation is the identity over every model's embedding rows.
fn unmoved(perms: &[Vec<Option<u64>>], inputs: &[(Location, Checkpoint)]) -> bool {
    perms.iter().zip(inputs).all(|(p, (_, ckpt))| {
        p.iter().enumerate().all(|(j, id)| *id == Some(j as u64))
            && ckpt
                .tensors
                .iter()
                .filter(|(n, t)| is_embedding(n, &t.shape))
                .all(|(_, t)| t.shape[0] == p.len() as u64)
    })
}

fn empty_vocab() -> Vocab {
    Vocab {
        ids: HashMap::new(),
        by_id: Vec::new(),
        added: Vec::new(),
        model_len: 0,
    }
}

fn row(model: usize, r: Option<u64>) -> DefaultRow {
    DefaultRow::Row {
        model,
        row: r.unwrap_or(0),
    }
}

/// The default row of a token `tokenizer.tokens` names (mergekit's `compute_default_embedding`).
#[allow(clippy::too_many_arguments)]
fn token_default(
    c: &TokenSpec,
    j: usize,
    present: &[Option<u64>],
    perms: &[Vec<Option<u64>>],
    own: &[&Vocab],
    by_url: &HashMap<String, usize>,
    storage: &Storage,
    originals: &[(String, Checkpoint)],
    embeddings: &[String],
) -> Result<DefaultRow, EngineError> {
    let field = format!("tokenizer.tokens[{:?}].source", c.token);
    let model_of = |uri: &str| -> Result<usize, EngineError> {
        let url = storage.resolve(uri)?.url;
        by_url.get(&url).copied().ok_or_else(|| {
            EngineError::InvalidRecipe(format!("{field}: {uri} is not one of the recipe's models"))
        })
    };
    match &c.source {
        None => Err(EngineError::InvalidRecipe(format!(
            "{field}: required, since {} (mergekit fails without one)",
            if c.force {
                "the token is forced".to_string()
            } else {
                format!(
                    "{} of the models lack the token",
                    present.iter().filter(|p| p.is_none()).count()
                )
            }
        ))),
        Some(EmbedSource::Zero) => Ok(DefaultRow::Zero),
        Some(EmbedSource::Model { model }) => {
            let m = model_of(model)?;
            match perms[m][j] {
                Some(r) => Ok(DefaultRow::Row { model: m, row: r }),
                None => Err(EngineError::InvalidRecipe(format!(
                    "{field}: {model} does not have the token"
                ))),
            }
        }
        Some(EmbedSource::ModelToken {
            model,
            token_id,
            token,
        }) => {
            let m = model_of(model)?;
            let r = match (token_id, token) {
                (Some(id), _) => *id,
                (None, Some(t)) => {
                    // The model's own vocabulary (mergekit's `original_vocabs`).
                    own[m].ids.get(t).copied().ok_or_else(|| {
                        EngineError::InvalidRecipe(format!(
                            "{field}.token: {t:?} is not in {model}'s vocabulary"
                        ))
                    })?
                }
                (None, None) => {
                    return Err(EngineError::InvalidRecipe(format!(
                        "{field}: token_id or token"
                    )));
                }
            };
            for name in embeddings {
                let rows = originals[m].1.tensors.get(name).map_or(0, |t| t.shape[0]);
                if r >= rows {
                    return Err(EngineError::InvalidRecipe(format!(
                        "{field}: token id {r} is out of range for {model} ({name} has {rows} rows)"
                    )));
                }
            }
            Ok(DefaultRow::Row { model: m, row: r })
        }
    }
}

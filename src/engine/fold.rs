//! Models with a LoRA adapter folded in (a model entry's `lora`, mergekit's `model+lora`).
//!
//! [`attach_all`] opens each entry's adapter folder while planning (config, tensor header),
//! matches it against the model ([`Adapter::build`]: names, ranks, shapes; before anything is
//! written) and attaches it to the model's [`Checkpoint`]. From then on every read of that
//! checkpoint ([`read`], called by `read_elems` for the merge, the pre-passes and passthrough
//! alike) returns the fold, chunk by chunk: for a LoRA'd weight the chunk's rows of `s·B·A`
//! are formed from the whole (small) factors, never the whole product
//! ([`crate::merge::lora`]); a `modules_to_save` tensor reads from the adapter file.
//!
//! The fold's dtype (the base "loaded in"): for `passthrough` of one entry, the output dtype
//! (a plain fold, as peft's `merge_and_unload` over a base loaded in it); as an ingredient of
//! any other method, `input_dtype` when given (mergekit's `--lora-merge-dtype`), else each
//! tensor's stored dtype (mergekit's LoRA cache: the folded model is saved in the checkpoint's
//! dtype, then merged).

use std::sync::Arc;

use bytes::Bytes;
use object_store::ObjectStoreExt;

use super::{EngineError, open_local_files, read_stored};
use crate::checkpoint::adapter::{
    ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, Adapter, AdapterConfig, AdapterError, Attached,
    MAX_ADAPTER_CONFIG_LEN, ModuleKind, Touch,
};
use crate::checkpoint::{Checkpoint, CheckpointError, open_checkpoint};
use crate::merge::lora::{Factors, fold_embedding, fold_linear};
use crate::merge::precision::Precision;
use crate::merge::{DType, MergeError, decode_to_f32, encode_from_f32};
use crate::recipe::Recipe;
use crate::storage::{Location, Storage};

/// The dtype a recipe's folds are computed in (see the module's text).
fn fold_dtype(recipe: &Recipe) -> Option<DType> {
    if recipe.method.about().slices && recipe.slices.is_empty() {
        recipe.output.dtype.or(recipe.input_dtype)
    } else {
        recipe.input_dtype
    }
}

/// Attach every model entry's adapter to its opened checkpoint (`inputs`: base first when the
/// recipe has one, then the models).
pub(super) async fn attach_all(
    storage: &Storage,
    recipe: &Recipe,
    inputs: &mut [(Location, Checkpoint)],
) -> Result<(), EngineError> {
    let offset = usize::from(recipe.base_model.is_some());
    let dtype = fold_dtype(recipe);
    for (i, m) in recipe.models.iter().enumerate() {
        let Some(lora) = &m.lora else { continue };
        let (_, ckpt) = inputs
            .get_mut(offset + i)
            .ok_or_else(|| EngineError::Internal("model input out of range".into()))?;
        let attached = open_adapter(storage, lora, ckpt, dtype).await?;
        ckpt.lora = Some(Arc::new(attached));
    }
    Ok(())
}

/// Open the adapter folder at `uri` and match it against `base`.
pub(super) async fn open_adapter(
    storage: &Storage,
    uri: &str,
    base: &Checkpoint,
    dtype: Option<DType>,
) -> Result<Attached, EngineError> {
    let loc = storage.resolve(uri)?;
    let url = loc.url.trim_end_matches('/').to_string();
    let config_file = format!("{url}/{ADAPTER_CONFIG_NAME}");
    let weights_file = format!("{url}/{ADAPTER_WEIGHTS_NAME}");
    let config_path = loc.path.clone().join(ADAPTER_CONFIG_NAME);
    let missing = |file: &str, what: &str| {
        EngineError::Adapter(AdapterError::new(
            file,
            what,
            format!(
                "missing: a PEFT LoRA adapter is a folder with {ADAPTER_CONFIG_NAME} and \
                 {ADAPTER_WEIGHTS_NAME}"
            ),
        ))
    };
    let got = match loc.store.get(&config_path).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(missing(&config_file, ADAPTER_CONFIG_NAME));
        }
        Err(e) => {
            return Err(EngineError::ObjectStore {
                context: format!("reading {config_file}"),
                source: e,
            });
        }
    };
    if got.meta.size > MAX_ADAPTER_CONFIG_LEN {
        return Err(EngineError::Adapter(AdapterError::new(
            &config_file,
            ADAPTER_CONFIG_NAME,
            format!(
                "{} bytes, more than {MAX_ADAPTER_CONFIG_LEN}",
                got.meta.size
            ),
        )));
    }
    let bytes = got.bytes().await.map_err(|e| EngineError::ObjectStore {
        context: format!("reading {config_file}"),
        source: e,
    })?;
    let config = AdapterConfig::parse(&bytes, &config_file)?;
    let weights_path = loc.path.clone().join(ADAPTER_WEIGHTS_NAME);
    let mut file = match open_checkpoint(loc.store.as_ref(), &weights_path, &weights_file).await {
        Ok(f) => f,
        Err(CheckpointError::NotFound { .. }) => {
            return Err(missing(&weights_file, ADAPTER_WEIGHTS_NAME));
        }
        Err(e) => return Err(e.into()),
    };
    let file_loc = loc.child(ADAPTER_WEIGHTS_NAME);
    open_local_files(&file_loc, &mut file).await?;
    let adapter = Adapter::build(
        config,
        file.tensors
            .iter()
            .map(|(n, t)| (n.as_str(), (t.dtype, t.shape.as_slice()))),
        &|n: &str| base.tensors.get(n).map(|t| (t.dtype, t.shape.as_slice())),
        &weights_file,
    )?;
    Ok(Attached {
        url,
        adapter,
        file,
        store: loc.store.clone(),
        dtype,
    })
}

/// `bytes` of `from` as `to` (floats only; anything else is returned as stored).
fn convert(from: DType, bytes: Bytes, to: DType) -> Result<Bytes, MergeError> {
    if from == to || !from.is_mergeable_float() || !to.is_mergeable_float() {
        return Ok(bytes);
    }
    let n = bytes.len() / from.size_bytes();
    let mut f = vec![0f32; n];
    decode_to_f32(from, &bytes, &mut f)?;
    let mut out = vec![0u8; n * to.size_bytes()];
    encode_from_f32(to, &f, &mut out)?;
    Ok(Bytes::from(out))
}

fn decoded(dtype: DType, bytes: &[u8]) -> Result<Vec<f32>, MergeError> {
    let mut f = vec![0f32; bytes.len() / dtype.size_bytes().max(1)];
    decode_to_f32(dtype, bytes, &mut f)?;
    Ok(f)
}

/// Elements `elems` of tensor `src` of the adapter file.
async fn read_adapter(
    att: &Attached,
    src: &str,
    elems: std::ops::Range<u64>,
) -> Result<(DType, Bytes), EngineError> {
    read_stored(att.store.as_ref(), &att.file.url, &att.file, src, elems).await
}

/// Elements `elems` of tensor `name` of a checkpoint with an adapter attached, as the fold
/// (in [`Checkpoint::read_dtype`]).
pub(super) async fn read(
    loc: &Location,
    ckpt: &Checkpoint,
    att: &Attached,
    name: &str,
    elems: std::ops::Range<u64>,
) -> Result<(DType, Bytes), EngineError> {
    let t = super::read::tensor_entry(ckpt, name, &loc.url)?;
    let to = ckpt.read_dtype(t);
    let merge_err = |source| EngineError::Merge {
        tensor: name.to_string(),
        source,
    };
    let module = match att.adapter.touched.get(name) {
        None => {
            let (d, b) = read_stored(loc.store.as_ref(), &loc.url, ckpt, name, elems).await?;
            return Ok((to, convert(d, b, to).map_err(merge_err)?));
        }
        Some(Touch::Replace(src)) => {
            let (d, b) = read_adapter(att, src, elems).await?;
            return Ok((to, convert(d, b, to).map_err(merge_err)?));
        }
        Some(Touch::Lora(m)) => m,
    };
    let numel = |n: &str| {
        att.file
            .tensors
            .get(n)
            .map(|t| t.shape.iter().product::<u64>())
            .ok_or_else(|| EngineError::Internal(format!("adapter tensor {n} vanished")))
    };
    let first = elems.start as usize;
    let (w, a, b) = futures::try_join!(
        async {
            match &module.weight_from_adapter {
                Some(src) => read_adapter(att, src, elems.clone()).await,
                None => read_stored(loc.store.as_ref(), &loc.url, ckpt, name, elems.clone()).await,
            }
        },
        read_adapter(att, &module.a, 0..numel(&module.a)?),
        read_adapter(att, &module.b, 0..numel(&module.b)?),
    )?;
    let cols = t.shape.get(1).copied().unwrap_or(1).max(1) as usize;
    let (kind, rank, scale) = (module.kind, module.rank as usize, module.scaling as f32);
    let out = crate::telemetry::spawn_blocking(move || {
        let round = Precision::of(to);
        // The base as loaded in the fold's dtype; the factors in f32, whatever the file says.
        let mut wf = decoded(w.0, &w.1)?;
        round.round_slice(&mut wf);
        let af = decoded(a.0, &a.1)?;
        let bf = decoded(b.0, &b.1)?;
        let f = Factors {
            a: &af,
            b: &bf,
            rank,
            scale,
        };
        let mut folded = vec![0f32; wf.len()];
        match kind {
            ModuleKind::Linear => fold_linear(&f, cols, first, &wf, round, &mut folded),
            ModuleKind::Embedding => fold_embedding(&f, cols, first, &wf, round, &mut folded),
        }
        let mut out = vec![0u8; folded.len() * to.size_bytes()];
        encode_from_f32(to, &folded, &mut out)?;
        Ok::<_, MergeError>(Bytes::from(out))
    })
    .await
    .map_err(|e| EngineError::Internal(format!("fold task panicked: {e}")))?
    .map_err(merge_err)?;
    Ok((to, out))
}

/// What the manifest records of a model's adapter: its URL, ranks and scalings.
pub(super) fn describe(att: &Attached) -> serde_json::Value {
    let modules: serde_json::Map<String, serde_json::Value> = att
        .adapter
        .modules()
        .map(|(_, m)| {
            (
                m.module.clone(),
                serde_json::json!({"r": m.rank, "alpha": m.alpha, "scaling": m.scaling}),
            )
        })
        .collect();
    serde_json::json!({
        "uri": att.url,
        "r": att.adapter.config.r,
        "lora_alpha": att.adapter.config.lora_alpha,
        "use_rslora": att.adapter.config.use_rslora,
        "modules": modules,
    })
}

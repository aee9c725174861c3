//! `method: lora_extract` (mergekit 0.1.5's `mergekit-extract-lora`): a PEFT adapter from a
//! fine-tune and its base, written as an adapter folder (`adapter_config.json`,
//! `adapter_model.safetensors`, then the manifest).
//!
//! Modules are the checkpoint's `<module>.weight` tensors, classified from the tensors alone
//! (ladle has no model classes): the input embedding (`embed_tokens`, `wte`,
//! `word_embeddings`, `embed_in`, `tok_embeddings`) and the output layer (`lm_head`,
//! `embed_out`) by name, other 2-D weights as Linear, the rest (norms) as undecomposable. They
//! are visited as `named_modules` would list them for a decoder (embedding first, layers in
//! numeric order, the output layer last), and mergekit's rules apply in that order:
//! - without `embed_lora`, the embedding and the output layer join `modules_to_save` (unless
//!   an exclude regex names them);
//! - a module in `modules_to_save` (full path or last component) is saved at full rank (the
//!   fine-tune's tensor, and its bias);
//! - else, when the include/exclude regexes let it through (`re.search`): a Linear (and the
//!   output layer) is decomposed, the embedding too (transposed, as `lora_embedding_A/B`)
//!   with `embed_lora`; a Linear's bias becomes `lora_B.bias = ft − base`; an undecomposable
//!   module is saved at full rank (joining `modules_to_save`) unless `skip_undecomposable`.
//!
//! The task vector is `ft − base` rounded to the inputs' dtype (mergekit subtracts in the
//! stored dtype), decomposed by [`crate::merge::lora_svd::extract`]; the factors are written
//! in that dtype (or `output.dtype`). Config: `r = lora_alpha =` the largest rank,
//! `rank_pattern = alpha_pattern =` the modules of another rank, `use_rslora: false`.
//!
//! One deviation, on purpose: a module left with rank 0 by `sv_epsilon` (nothing above it) is
//! left out of the adapter. mergekit writes empty `(0, n)` factors and a rank of 0, which peft
//! refuses to load; ladle's adapter has no tensors for it, and when any module was left out
//! `target_modules` lists the full paths of the decomposed modules, so that peft (and ladle)
//! load the adapter and the left-out modules keep their base weights (a delta of 0, as meant).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::lora_merge::{AdapterFiles, OutTensor, PREFIX, decode, encode, read_whole};
use super::manifest::InputRecord;
use super::{Engine, EngineError, MergeOutcome, Phase, RunControl, fold};
use crate::merge::DType;
use crate::merge::lora_svd::extract;
use crate::merge::precision::Precision;
use crate::methods::lora_extract::LoraExtractConfig;
use crate::recipe::Recipe;

const EMBED_IN: [&str; 5] = [
    "embed_tokens",
    "wte",
    "word_embeddings",
    "embed_in",
    "tok_embeddings",
];
const EMBED_OUT: [&str; 2] = ["lm_head", "embed_out"];

fn invalid(msg: String) -> EngineError {
    EngineError::InvalidRecipe(msg)
}

/// What a module is, from its weight's name and shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    EmbedIn,
    EmbedOut,
    Linear,
    Undecomposable,
}

/// What is done with one module.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    /// Saved at full rank: the fine-tune's weight (and bias).
    Save,
    /// Decomposed; `transpose` for an embedding (`lora_embedding_A/B`).
    Decompose { transpose: bool },
}

fn short(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

/// Sort key: the embedding first, the output layer last, numeric path components as numbers.
fn order_key(module: &str, kind: Kind) -> (u8, Vec<(u64, String)>) {
    let rank = match kind {
        Kind::EmbedIn => 0,
        Kind::EmbedOut => 2,
        _ => 1,
    };
    let parts = module
        .split('.')
        .map(|p| match p.parse::<u64>() {
            Ok(n) => (n, String::new()),
            Err(_) => (u64::MAX, p.to_string()),
        })
        .collect();
    (rank, parts)
}

/// Per module (in visiting order): its path, kind and action.
type Planned = Vec<(String, Kind, Action)>;

/// mergekit's plan (see the module's text): per module (in visiting order) its action, and
/// the final `modules_to_save` list.
fn plan(
    modules: &[(String, Kind)],
    c: &LoraExtractConfig,
) -> Result<(Planned, Vec<String>), EngineError> {
    let compile = |list: &[String]| -> Result<Vec<regex::Regex>, EngineError> {
        list.iter()
            .map(|r| {
                regex::Regex::new(r)
                    .map_err(|e| invalid(format!("parameters: regular expression {r:?}: {e}")))
            })
            .collect()
    };
    let (include, exclude) = (compile(&c.include_regexes)?, compile(&c.exclude_regexes)?);
    let excluded = |name: &str| exclude.iter().any(|r| r.is_match(name));
    let should_extract = |name: &str| {
        (include.is_empty() || include.iter().any(|r| r.is_match(name))) && !excluded(name)
    };
    let mut to_save: Vec<String> = c.modules_to_save.clone();
    let mut out = Vec::new();
    for (name, kind) in modules {
        let key = short(name).to_string();
        let embedding = matches!(kind, Kind::EmbedIn | Kind::EmbedOut);
        if !c.embed_lora && embedding && !excluded(name) && !to_save.contains(&key) {
            to_save.push(key.clone());
        }
        if to_save.iter().any(|m| m == name || *m == key) {
            out.push((name.clone(), *kind, Action::Save));
        } else if should_extract(name) {
            match kind {
                Kind::Linear | Kind::EmbedOut => {
                    out.push((name.clone(), *kind, Action::Decompose { transpose: false }))
                }
                Kind::EmbedIn => {
                    out.push((name.clone(), *kind, Action::Decompose { transpose: true }))
                }
                Kind::Undecomposable => {
                    if !c.skip_undecomposable {
                        if !to_save.contains(&key) {
                            to_save.push(key.clone());
                        }
                        out.push((name.clone(), *kind, Action::Save));
                    }
                }
            }
        }
    }
    Ok((out, to_save))
}

/// The dtype torch gives `ft − base`: the wider of the two (f32 when they differ).
fn promoted(a: DType, b: DType) -> DType {
    if a == b { a } else { DType::F32 }
}

/// `ft − base` rounded to `dtype` (mergekit subtracts in the stored dtype).
fn task_vector(ft: &[f32], base: &[f32], dtype: DType) -> Vec<f32> {
    let p = Precision::of(dtype);
    ft.iter().zip(base).map(|(f, b)| p.round(f - b)).collect()
}

impl Engine {
    /// Run a `lora_extract` recipe (see the module's text).
    pub(super) async fn run_lora_extract(
        &self,
        recipe: &Recipe,
        ctl: &Arc<RunControl>,
    ) -> Result<MergeOutcome, EngineError> {
        let mut job = self.adapter_job::<LoraExtractConfig>(
            recipe,
            ctl,
            "lora_extract",
            "the fine-tune's base",
        )?;
        let (config, base_uri) = (job.config.clone(), job.base_uri);
        let ft_uri = &recipe
            .models
            .first()
            .ok_or_else(|| invalid("models: method lora_extract needs the fine-tune".into()))?
            .uri;
        let mut inputs = self.open_inputs([base_uri, ft_uri].into_iter()).await?;
        fold::attach_all(&self.storage, recipe, &mut inputs).await?;
        let (ft_loc, ft) = inputs
            .pop()
            .ok_or_else(|| EngineError::Internal("fine-tune not opened".into()))?;
        let (base_loc, base) = inputs
            .pop()
            .ok_or_else(|| EngineError::Internal("base not opened".into()))?;
        // Modules: every `<module>.weight` of the base; the fine-tune must match it.
        let mut modules = Vec::new();
        for (name, t) in &base.tensors {
            let Some(module) = name.strip_suffix(".weight") else {
                continue;
            };
            if !t.dtype.is_mergeable_float() {
                continue;
            }
            let Some(f) = ft.tensors.get(name) else {
                return Err(EngineError::ShapeMismatch(format!(
                    "models[0]: {} has no tensor {name} (the base has it)",
                    ft_loc.url
                )));
            };
            if f.shape != t.shape {
                return Err(EngineError::ShapeMismatch(format!(
                    "models[0]: tensor {name} is {:?} in the fine-tune, {:?} in the base",
                    f.shape, t.shape
                )));
            }
            let kind = match t.shape.len() {
                2 if EMBED_IN.contains(&short(module)) => Kind::EmbedIn,
                2 if EMBED_OUT.contains(&short(module)) => Kind::EmbedOut,
                2 => Kind::Linear,
                _ => Kind::Undecomposable,
            };
            modules.push((module.to_string(), kind));
        }
        modules.sort_by_cached_key(|(m, k)| order_key(m, *k));
        let (actions, modules_to_save) = plan(&modules, &config)?;
        if !actions
            .iter()
            .any(|(_, _, a)| matches!(a, Action::Decompose { .. }))
        {
            return Err(invalid(
                "parameters: no module to decompose (include_regexes / exclude_regexes / \
                 modules_to_save leave none)"
                    .into(),
            ));
        }
        if let Some(done) = job.published().await? {
            return Ok(done);
        }
        ctl.progress
            .tensors_total
            .store(actions.len() as u64, Ordering::Relaxed);
        ctl.progress.set_phase(Phase::Merging);
        let mut tensors: Vec<OutTensor> = Vec::new();
        let mut ranks: BTreeMap<String, usize> = BTreeMap::new();
        let mut dropped = 0usize;
        for (module, _, action) in &actions {
            ctl.check()?;
            let wname = format!("{module}.weight");
            let bname = format!("{module}.bias");
            let has_bias = base.tensors.contains_key(&bname) && ft.tensors.contains_key(&bname);
            match action {
                Action::Save => {
                    for name in std::iter::once(&wname).chain(has_bias.then_some(&bname)) {
                        let Some(t) = ft.tensors.get(name) else {
                            continue;
                        };
                        let (d, b) = read_whole(&ft_loc, &ft, name).await?;
                        let (d, bytes) = match recipe.output.dtype {
                            Some(o) if o != d && d.is_mergeable_float() => {
                                (o, encode(name, o, &decode(name, d, &b)?)?)
                            }
                            _ => (d, b.to_vec()),
                        };
                        tensors.push((format!("{PREFIX}{name}"), d, t.shape.clone(), bytes));
                    }
                }
                Action::Decompose { transpose } => {
                    let shape = base
                        .tensors
                        .get(&wname)
                        .map(|t| t.shape.clone())
                        .ok_or_else(|| EngineError::Internal(format!("{wname} vanished")))?;
                    let ((fd, fb), (bd, bb)) = futures::try_join!(
                        read_whole(&ft_loc, &ft, &wname),
                        read_whole(&base_loc, &base, &wname)
                    )?;
                    let tv_dtype = promoted(fd, bd);
                    let out_dtype = recipe.output.dtype.unwrap_or(tv_dtype);
                    let tv = task_vector(
                        &decode(&wname, fd, &fb)?,
                        &decode(&wname, bd, &bb)?,
                        tv_dtype,
                    );
                    let (rows, cols) = (shape[0] as usize, shape[1] as usize);
                    let transpose = *transpose;
                    let (max_rank, eps, dist) = (
                        config.max_rank as usize,
                        config.sv_epsilon,
                        config.distribute_scale,
                    );
                    let (r, a, b, m, n) = crate::telemetry::spawn_blocking(move || {
                        let (m, n, t) = if transpose {
                            let mut t = vec![0f32; tv.len()];
                            for i in 0..rows {
                                for j in 0..cols {
                                    t[j * rows + i] = tv[i * cols + j];
                                }
                            }
                            (cols, rows, t)
                        } else {
                            (rows, cols, tv)
                        };
                        extract(&t, m, n, max_rank, eps, dist).map(|(r, a, b)| (r, a, b, m, n))
                    })
                    .await
                    .map_err(|e| EngineError::Internal(format!("SVD task panicked: {e}")))?
                    .map_err(|e| invalid(format!("models[0]: module {module}: {e}")))?;
                    if r == 0 {
                        dropped += 1;
                        ctl.progress.tensors_done.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let (an, bn) = if transpose {
                        (
                            format!("{PREFIX}{module}.lora_embedding_A"),
                            format!("{PREFIX}{module}.lora_embedding_B"),
                        )
                    } else {
                        (
                            format!("{PREFIX}{module}.lora_A.weight"),
                            format!("{PREFIX}{module}.lora_B.weight"),
                        )
                    };
                    tensors.push((
                        an.clone(),
                        out_dtype,
                        vec![r as u64, n as u64],
                        encode(&an, out_dtype, &a)?,
                    ));
                    tensors.push((
                        bn.clone(),
                        out_dtype,
                        vec![m as u64, r as u64],
                        encode(&bn, out_dtype, &b)?,
                    ));
                    if has_bias && !transpose {
                        let ((fd, fb), (bd, bb)) = futures::try_join!(
                            read_whole(&ft_loc, &ft, &bname),
                            read_whole(&base_loc, &base, &bname)
                        )?;
                        let d = promoted(fd, bd);
                        let tb =
                            task_vector(&decode(&bname, fd, &fb)?, &decode(&bname, bd, &bb)?, d);
                        let o = recipe.output.dtype.unwrap_or(d);
                        let name = format!("{PREFIX}{module}.lora_B.bias");
                        tensors.push((
                            name.clone(),
                            o,
                            vec![tb.len() as u64],
                            encode(&name, o, &tb)?,
                        ));
                    }
                    ranks.insert(module.clone(), r);
                }
            }
            ctl.progress.tensors_done.fetch_add(1, Ordering::Relaxed);
        }
        let r_max = ranks.values().copied().max().ok_or_else(|| {
            invalid(format!(
                "parameters.sv_epsilon: no singular value of any module is above {} (every \
                 module would have rank 0)",
                config.sv_epsilon
            ))
        })?;
        let pattern: serde_json::Map<String, serde_json::Value> = ranks
            .iter()
            .filter(|(_, r)| **r != r_max)
            .map(|(m, r)| (m.clone(), serde_json::json!(r)))
            .collect();
        let targets: Vec<String> = if dropped == 0 {
            ranks
                .keys()
                .map(|m| short(m).to_string())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        } else {
            ranks.keys().cloned().collect()
        };
        let config_json = serde_json::json!({
            "base_model_name_or_path": base_uri,
            "peft_type": "LORA",
            "use_rslora": false,
            "target_modules": targets,
            "modules_to_save": modules_to_save,
            "task_type": "CAUSAL_LM",
            "r": r_max,
            "lora_alpha": r_max,
            "rank_pattern": pattern,
            "alpha_pattern": pattern,
            "lora_dropout": 0.0,
            "fan_in_fan_out": false,
            "inference_mode": true,
        });
        let adapter = AdapterFiles::new(tensors, &config_json)?;
        let inputs = vec![
            InputRecord::of(&base_loc, &base),
            InputRecord::of(&ft_loc, &ft),
        ];
        job.publish(recipe, inputs, adapter, ctl).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LoraExtractConfig {
        LoraExtractConfig {
            max_rank: 8,
            sv_epsilon: 0.0,
            include_regexes: Vec::new(),
            exclude_regexes: Vec::new(),
            embed_lora: false,
            distribute_scale: true,
            modules_to_save: Vec::new(),
            skip_undecomposable: false,
        }
    }

    #[test]
    fn plan_follows_mergekit() {
        let mut modules = vec![
            ("lm_head".to_string(), Kind::EmbedOut),
            ("model.norm".to_string(), Kind::Undecomposable),
            ("model.layers.10.self_attn.q_proj".to_string(), Kind::Linear),
            (
                "model.layers.2.input_layernorm".to_string(),
                Kind::Undecomposable,
            ),
            ("model.layers.2.self_attn.q_proj".to_string(), Kind::Linear),
            ("model.embed_tokens".to_string(), Kind::EmbedIn),
        ];
        modules.sort_by_cached_key(|(m, k)| order_key(m, *k));
        assert_eq!(modules[0].0, "model.embed_tokens");
        assert_eq!(modules[1].0, "model.layers.2.input_layernorm");
        assert_eq!(modules[3].0, "model.layers.10.self_attn.q_proj");
        assert_eq!(modules[5].0, "lm_head");
        let (actions, mts) = plan(&modules, &config()).unwrap();
        assert_eq!(mts, ["embed_tokens", "input_layernorm", "norm", "lm_head"]);
        assert_eq!(actions.len(), 6);
        let mut c = config();
        c.embed_lora = true;
        c.include_regexes = vec!["self_attn|embed".into()];
        let (actions, mts) = plan(&modules, &c).unwrap();
        assert!(mts.is_empty());
        assert_eq!(actions[0].2, Action::Decompose { transpose: true });
        assert_eq!(actions.len(), 3, "{actions:?}");
    }
}

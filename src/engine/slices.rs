//! Slice planning. Passthrough ([`plan`]): which input tensor (and scale) each output tensor
//! comes from. Any other method ([`plan_merged`]): per slice, a [`Part`], the slice's sources
//! merged by the method as a recipe of their own.
//!
//! As mergekit plans a Llama-like model: the tensors outside the layer stack that hold
//! embeddings (names containing `embed`, `wte` or `wpe`) come from the first slice's model, the
//! other non-layer tensors (final norm, `lm_head`) from the last slice's; layer `a + i` of a
//! slice's source becomes output layer `offset + i`, numbered consecutively over the slices.
//! A `scale` parameter is evaluated on the source tensor name at the slice depth
//! `i / (len − 1)` (1 for a one-layer slice; 0 outside the layers), as mergekit does.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{EngineError, Kernel, TensorOp, check_compatible};
use crate::checkpoint::Checkpoint;
use crate::recipe::{Ingredient, Recipe, Setting, depth, layer_index};
use crate::storage::Location;

fn is_pre_weight(name: &str) -> bool {
    name.contains("embed") || name.contains("wte") || name.contains("wpe")
}

/// `model.layers.7.mlp.weight` with 7 replaced by `new`.
pub fn rename_layer(name: &str, new: usize) -> String {
    let mut parts: Vec<String> = name.split('.').map(str::to_string).collect();
    for i in 0..parts.len().saturating_sub(1) {
        if matches!(parts[i].as_str(), "layers" | "h" | "blocks" | "layer")
            && parts[i + 1].parse::<usize>().is_ok()
        {
            parts[i + 1] = new.to_string();
            break;
        }
    }
    parts.join(".")
}

fn scale_of(params: &BTreeMap<String, Setting>, name: &str, t: f64) -> Option<f64> {
    params.get("scale").and_then(|s| s.eval(name, t))
}

/// The ops of a passthrough recipe and the output's layer count (for `config.json`).
pub(super) fn plan(
    recipe: &Recipe,
    inputs: &[(Location, Checkpoint)],
) -> Result<(BTreeMap<String, TensorOp>, Option<u64>), EngineError> {
    let mut ops = BTreeMap::new();
    if recipe.slices.is_empty() {
        let (_, ckpt) = inputs
            .first()
            .ok_or_else(|| EngineError::Internal("passthrough without a model".into()))?;
        let params = recipe
            .models
            .first()
            .map(|m| m.parameters.clone())
            .unwrap_or_default();
        let num_layers = ckpt
            .tensors
            .keys()
            .filter_map(|n| layer_index(n))
            .max()
            .map_or(0, |m| m + 1);
        for name in ckpt.tensors.keys() {
            ops.insert(
                name.clone(),
                TensorOp::Pick {
                    input: 0,
                    source: name.clone(),
                    scale: scale_of(&params, name, depth(name, num_layers)),
                },
            );
        }
        return Ok((ops, None));
    }
    let first = &recipe.slices[0].sources[0];
    let last = &recipe.slices[recipe.slices.len() - 1].sources[0];
    // Non-layer tensors: embeddings from the first slice's model, the rest from the last's.
    for (src, pre) in [(first, true), (last, false)] {
        let (_, ckpt) = inputs
            .get(src.model)
            .ok_or_else(|| EngineError::Internal("slice model out of range".into()))?;
        for name in ckpt.tensors.keys() {
            if layer_index(name).is_none() && is_pre_weight(name) == pre {
                ops.insert(
                    name.clone(),
                    TensorOp::Pick {
                        input: src.model,
                        source: name.clone(),
                        scale: scale_of(&src.parameters, name, 0.0),
                    },
                );
            }
        }
    }
    let mut out_layer = 0usize;
    for (i, slice) in recipe.slices.iter().enumerate() {
        let src = &slice.sources[0];
        let (loc, ckpt) = inputs
            .get(src.model)
            .ok_or_else(|| EngineError::Internal("slice model out of range".into()))?;
        let [a, b] = src.layer_range;
        let len = (b - a) as usize;
        for k in 0..len {
            let layer = a as usize + k;
            let t = if len > 1 {
                k as f64 / (len - 1) as f64
            } else {
                1.0
            };
            let names: Vec<&String> = ckpt
                .tensors
                .keys()
                .filter(|n| layer_index(n) == Some(layer))
                .collect();
            if names.is_empty() {
                return Err(EngineError::InvalidRecipe(format!(
                    "slices[{i}].sources[0].layer_range: {} has no layer {layer} (range [{a}, {b}])",
                    loc.url
                )));
            }
            for name in names {
                ops.insert(
                    rename_layer(name, out_layer),
                    TensorOp::Pick {
                        input: src.model,
                        source: name.clone(),
                        scale: scale_of(&src.parameters, name, t),
                    },
                );
            }
            out_layer += 1;
        }
    }
    Ok((ops, Some(out_layer as u64)))
}

/// Output tensor name → how it is produced.
type Ops = BTreeMap<String, TensorOp>;

/// One merged slice as the engine runs it. Its inputs are the slice's sources (base first),
/// each seen with only the slice's layers, renumbered `0..n`, plus the tensors outside the
/// layers that the slice provides (embeddings: the first slice; the rest: the last). Its kernel
/// is the method's for the slice's models and parameters, built for `n` layers: the kernel
/// sees tensor names with the layer renumbered within the slice, so a gradient runs over the
/// slice's layers (`t = k / (n − 1)`) as mergekit's does. Filters match these names too
/// (`self_attn`, `mlp`, … are unchanged; a filter naming a layer number sees `k`).
pub(super) struct Part {
    pub inputs: Vec<(Location, Checkpoint)>,
    pub kernel: Arc<Kernel>,
    /// The output tensor each of the part's tensor names becomes.
    pub output_names: BTreeMap<String, String>,
}

/// The ops of a slice recipe with a method that merges, its parts and the output's layer
/// count.
pub(super) fn plan_merged(
    recipe: &Recipe,
    inputs: &[(Location, Checkpoint)],
) -> Result<(Ops, Vec<Part>, u64), EngineError> {
    let mut ops = BTreeMap::new();
    let mut parts = Vec::with_capacity(recipe.slices.len());
    let last = recipe.slices.len().saturating_sub(1);
    let mut offset = 0usize;
    for (i, slice) in recipe.slices.iter().enumerate() {
        let sf = format!("slices[{i}]");
        let parameters = slice
            .parameters
            .clone()
            .ok_or_else(|| EngineError::Internal(format!("{sf} has no parameters")))?;
        // Base first, then the other sources in order (the kernels' input order).
        let order: Vec<usize> = slice
            .base
            .into_iter()
            .chain((0..slice.sources.len()).filter(|j| Some(*j) != slice.base))
            .collect();
        let n = slice
            .sources
            .first()
            .map_or(0, |s| (s.layer_range[1] - s.layer_range[0]) as usize);
        let mut part_inputs = Vec::with_capacity(order.len());
        // Per part tensor name: the first input's own name (for copies).
        let mut first_names: BTreeMap<String, String> = BTreeMap::new();
        for (pos, &j) in order.iter().enumerate() {
            let src = &slice.sources[j];
            let (loc, ckpt) = inputs
                .get(src.model)
                .ok_or_else(|| EngineError::Internal(format!("{sf} model out of range")))?;
            let a = src.layer_range[0] as usize;
            let mut view = ckpt.clone();
            view.tensors.clear();
            for k in 0..n {
                let mut found = false;
                for (name, t) in ckpt
                    .tensors
                    .iter()
                    .filter(|(n, _)| layer_index(n) == Some(a + k))
                {
                    let as_name = rename_layer(name, k);
                    if pos == 0 {
                        first_names.insert(as_name.clone(), name.clone());
                    }
                    view.tensors.insert(as_name, t.clone());
                    found = true;
                }
                if !found {
                    return Err(EngineError::InvalidRecipe(format!(
                        "{sf}.sources[{j}].layer_range: {} has no layer {} (range [{}, {}])",
                        loc.url,
                        a + k,
                        src.layer_range[0],
                        src.layer_range[1]
                    )));
                }
            }
            for (name, t) in &ckpt.tensors {
                let pre = is_pre_weight(name);
                if layer_index(name).is_none() && ((i == 0 && pre) || (i == last && !pre)) {
                    if pos == 0 {
                        first_names.insert(name.clone(), name.clone());
                    }
                    view.tensors.insert(name.clone(), t.clone());
                }
            }
            part_inputs.push((loc.clone(), view));
        }
        let part_ops = check_compatible(&part_inputs).map_err(|e| match e {
            EngineError::ShapeMismatch(m) => EngineError::ShapeMismatch(format!(
                "{sf} (models numbered within the slice, base first; layers from 0): {m}"
            )),
            EngineError::UnsupportedDtype(m) => EngineError::UnsupportedDtype(format!(
                "{sf} (models numbered within the slice, base first; layers from 0): {m}"
            )),
            other => other,
        })?;
        let sub = Recipe {
            method: recipe.method,
            models: order
                .iter()
                .filter(|j| Some(**j) != slice.base)
                .map(|&j| {
                    let src = &slice.sources[j];
                    Ingredient {
                        uri: inputs[src.model].0.url.clone(),
                        lora: None,
                        weight: src.weight.unwrap_or(1.0),
                        parameters: src.parameters.clone(),
                    }
                })
                .collect(),
            base_model: slice
                .base
                .map(|j| inputs[slice.sources[j].model].0.url.clone()),
            slices: Vec::new(),
            parameters,
            output: recipe.output.clone(),
            trajectory: None,
            input_dtype: recipe.input_dtype,
        };
        let kernel = Kernel::new(&sub, n).map_err(EngineError::Internal)?;
        if kernel.model_selection().is_some() {
            return Err(EngineError::InvalidRecipe(format!(
                "{sf}: a model-wide selection (scope: \"model\") cannot be combined with slices"
            )));
        }
        let mut output_names = BTreeMap::new();
        for (name, op) in part_ops {
            let out = match layer_index(&name) {
                Some(k) => rename_layer(&name, offset + k),
                None => name.clone(),
            };
            let op = match op {
                TensorOp::Merge => TensorOp::Part {
                    part: i,
                    name: name.clone(),
                },
                _ => TensorOp::Pick {
                    input: slice.sources[order[0]].model,
                    source: first_names
                        .get(&name)
                        .cloned()
                        .unwrap_or_else(|| name.clone()),
                    scale: None,
                },
            };
            output_names.insert(name, out.clone());
            ops.insert(out, op);
        }
        parts.push(Part {
            inputs: part_inputs,
            kernel: Arc::new(kernel),
            output_names,
        });
        offset += n;
    }
    Ok((ops, parts, offset as u64))
}

/// The parts' non-finite counts, under the output's tensor names.
pub(super) fn nonfinite_report(parts: &[Part]) -> serde_json::Value {
    let mut total = 0u64;
    let mut tensors = serde_json::Map::new();
    for p in parts {
        let report = p.kernel.nonfinite_report();
        for (name, n) in report["tensors"].as_object().into_iter().flatten() {
            let n = n.as_u64().unwrap_or(0);
            total += n;
            let out = p.output_names.get(name).unwrap_or(name);
            tensors.insert(out.clone(), n.into());
        }
    }
    serde_json::json!({"total": total, "tensors": tensors})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_the_layer_index_only() {
        assert_eq!(
            rename_layer("model.layers.1.self_attn.o_proj.weight", 2),
            "model.layers.2.self_attn.o_proj.weight"
        );
        assert_eq!(
            rename_layer("transformer.h.10.mlp.c_fc.weight", 3),
            "transformer.h.3.mlp.c_fc.weight"
        );
        assert_eq!(rename_layer("lm_head.weight", 3), "lm_head.weight");
    }
}

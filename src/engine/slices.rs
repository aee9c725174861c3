//! Passthrough planning: which input tensor (and scale) each output tensor comes from.
//!
//! As mergekit plans a Llama-like model: the tensors outside the layer stack that hold
//! embeddings (names containing `embed`, `wte` or `wpe`) come from the first slice's model, the
//! other non-layer tensors (final norm, `lm_head`) from the last slice's; layer `a + i` of a
//! slice's source becomes output layer `offset + i`, numbered consecutively over the slices.
//! A `scale` parameter is evaluated on the source tensor name at the slice depth
//! `i / (len − 1)` (1 for a one-layer slice; 0 outside the layers), as mergekit does.

use std::collections::BTreeMap;

use super::{EngineError, TensorOp};
use crate::checkpoint::Checkpoint;
use crate::recipe::{Recipe, Setting, depth, layer_index};
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

//! `lora_extract`: mergekit 0.1.5's `mergekit-extract-lora`. From a fine-tune (the one
//! `models` entry, which may itself be `{"uri", "lora"}`) and its `base_model`, a PEFT LoRA
//! adapter: per decomposable module the best rank-r approximation of `ft − base` (Eckart–Young,
//! a truncated SVD), the rest saved at full rank (`modules_to_save`). Parameters are
//! mergekit's options with underscores: `max_rank` (128), `sv_epsilon` (0: keep only
//! singular values above it), `include_regexes` / `exclude_regexes` (lists, `re.search` on the
//! module path), `embed_lora` (false: embeddings at full rank), `distribute_scale` (true:
//! `A = √S·Vᵀ`, `B = U·√S`; false: `A = S·Vᵀ`, `B = U`), `modules_to_save` (mergekit's repeatable
//! `--save-module`), `skip_undecomposable` (false: norms and other 1-D weights at full rank).
//!
//! The engine runs this method itself (`engine::lora_extract`): its output is an adapter.

use serde::{Deserialize, Serialize};

use super::{
    About, BaseRule, Config, Invalid, KernelInput, MergeMethod, ParseInput, TensorKernel, invalid,
};

pub struct LoraExtract;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraExtractConfig {
    pub max_rank: u64,
    pub sv_epsilon: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include_regexes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_regexes: Vec<String>,
    pub embed_lora: bool,
    pub distribute_scale: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules_to_save: Vec<String>,
    pub skip_undecomposable: bool,
}

impl Config for LoraExtractConfig {
    const TAG: &'static str = "lora_extract";
}

const ABOUT: About = About::new("lora_extract", BaseRule::Required);

fn strings(field: &str, value: &serde_json::Value) -> Result<Vec<String>, Invalid> {
    let list = value
        .as_array()
        .ok_or_else(|| invalid(field, "must be a list of strings"))?;
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| invalid(format!("{field}[{i}]"), "must be a string"))
        })
        .collect()
}

fn boolean(field: &str, value: &serde_json::Value) -> Result<bool, Invalid> {
    value
        .as_bool()
        .ok_or_else(|| invalid(field, "must be true or false"))
}

impl MergeMethod for LoraExtract {
    type Config = LoraExtractConfig;

    fn about(&self) -> &About {
        &ABOUT
    }

    fn parse(&self, cx: &mut ParseInput<'_>) -> Result<LoraExtractConfig, Invalid> {
        let mut c = LoraExtractConfig {
            max_rank: 128,
            sv_epsilon: 0.0,
            include_regexes: Vec::new(),
            exclude_regexes: Vec::new(),
            embed_lora: false,
            distribute_scale: true,
            modules_to_save: Vec::new(),
            skip_undecomposable: false,
        };
        for (key, value) in cx.params {
            let field = format!("parameters.{key}");
            match key.as_str() {
                "max_rank" => {
                    c.max_rank = value
                        .as_u64()
                        .filter(|r| *r >= 1)
                        .ok_or_else(|| invalid(&field, "must be an integer ≥ 1"))?;
                }
                "sv_epsilon" => {
                    c.sv_epsilon = value
                        .as_f64()
                        .filter(|e| e.is_finite() && *e >= 0.0)
                        .ok_or_else(|| invalid(&field, "must be a number ≥ 0"))?;
                }
                "include_regexes" | "exclude_regexes" => {
                    let list = strings(&field, value)?;
                    for (i, r) in list.iter().enumerate() {
                        regex::Regex::new(r).map_err(|e| {
                            invalid(
                                format!("{field}[{i}]"),
                                format!("not a regular expression: {e}"),
                            )
                        })?;
                    }
                    if key == "include_regexes" {
                        c.include_regexes = list;
                    } else {
                        c.exclude_regexes = list;
                    }
                }
                "modules_to_save" => c.modules_to_save = strings(&field, value)?,
                "embed_lora" => c.embed_lora = boolean(&field, value)?,
                "distribute_scale" => c.distribute_scale = boolean(&field, value)?,
                "skip_undecomposable" => c.skip_undecomposable = boolean(&field, value)?,
                _ => {
                    return Err(invalid(
                        field,
                        "unknown parameter for method lora_extract (known: max_rank, \
                         sv_epsilon, include_regexes, exclude_regexes, embed_lora, \
                         distribute_scale, modules_to_save, skip_undecomposable)",
                    ));
                }
            }
        }
        if cx.models.len() != 1 {
            return Err(invalid(
                "models",
                format!(
                    "method lora_extract takes exactly one model (the fine-tune), got {}",
                    cx.models.len()
                ),
            ));
        }
        if let Some(m) = cx.models.first() {
            if m.weight_given {
                return Err(invalid(
                    format!("models[{}].weight", m.index),
                    "method lora_extract takes no weight",
                ));
            }
            if let Some(key) = m.parameters.keys().next() {
                return Err(invalid(
                    format!("models[{}].parameters.{key}", m.index),
                    "method lora_extract takes no per-model parameters",
                ));
            }
        }
        Ok(c)
    }

    fn kernel(
        &self,
        _config: &LoraExtractConfig,
        _cx: &KernelInput<'_>,
    ) -> Result<Box<dyn TensorKernel>, String> {
        Err(
            "method lora_extract writes an adapter: the engine runs it (engine::lora_extract)"
                .into(),
        )
    }
}

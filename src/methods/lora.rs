//! `lora`: adapter-level merges of PEFT LoRA adapters over one base, as peft 0.21.2's
//! `add_weighted_adapter` (`combination`: `linear`, `cat`, `ties`, `dare_linear`,
//! `dare_ties`, `magnitude_prune`, and the SVD types `svd`, `ties_svd`, `dare_linear_svd`,
//! `dare_ties_svd`, `magnitude_prune_svd` with `svd_rank` and `svd_clamp`); the output is a
//! PEFT adapter folder. `cat` takes
//! per-module weights (LoRA Soups' CAT): `weight` as a list of `{"name"|"filter", "value"}`
//! rules matched against the module path (`model.layers.0.self_attn.k_proj`); a module no rule
//! matches is left out (weight 0); a last rule with neither is the default.
//!
//! The engine runs this method itself (`engine::lora_merge`): its output is not a model, so
//! it has no per-tensor kernel. The arithmetic is [`crate::merge::lora_combine`].

use serde::{Deserialize, Serialize};

use super::setting::Value;
use super::{
    About, BaseRule, Config, Invalid, KernelInput, MergeMethod, ParseInput, Setting, TensorKernel,
    invalid,
};
use crate::merge::lora_combine::{Combination, SignMethod};

pub struct Lora;

/// The stored form of [`Combination`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CombinationName {
    Linear,
    Cat,
    Ties,
    DareLinear,
    DareTies,
    MagnitudePrune,
    Svd,
    TiesSvd,
    DareLinearSvd,
    DareTiesSvd,
    MagnitudePruneSvd,
}

impl CombinationName {
    /// The name as a recipe writes it (`dare_ties_svd`).
    pub fn as_str(self) -> &'static str {
        match self {
            CombinationName::Linear => "linear",
            CombinationName::Cat => "cat",
            CombinationName::Ties => "ties",
            CombinationName::DareLinear => "dare_linear",
            CombinationName::DareTies => "dare_ties",
            CombinationName::MagnitudePrune => "magnitude_prune",
            CombinationName::Svd => "svd",
            CombinationName::TiesSvd => "ties_svd",
            CombinationName::DareLinearSvd => "dare_linear_svd",
            CombinationName::DareTiesSvd => "dare_ties_svd",
            CombinationName::MagnitudePruneSvd => "magnitude_prune_svd",
        }
    }

    pub fn kind(self) -> Combination {
        match self {
            CombinationName::Linear => Combination::Linear,
            CombinationName::Cat => Combination::Cat,
            CombinationName::Ties => Combination::Ties,
            CombinationName::DareLinear => Combination::DareLinear,
            CombinationName::DareTies => Combination::DareTies,
            CombinationName::MagnitudePrune => Combination::MagnitudePrune,
            CombinationName::Svd => Combination::Svd,
            CombinationName::TiesSvd => Combination::TiesSvd,
            CombinationName::DareLinearSvd => Combination::DareLinearSvd,
            CombinationName::DareTiesSvd => Combination::DareTiesSvd,
            CombinationName::MagnitudePruneSvd => Combination::MagnitudePruneSvd,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignMethodName {
    Total,
    Frequency,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub combination: CombinationName,
    /// `ties`, `dare_*`, `magnitude_prune` (≥ 1: no pruning, as peft).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub density: Option<f64>,
    pub majority_sign_method: SignMethodName,
    pub seed: u64,
    /// SVD types: the new rank (default: the largest rank of the adapters, as peft).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub svd_rank: Option<u64>,
    /// SVD types: clamp both factors at this quantile of their entries (0 ≤ q ≤ 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub svd_clamp: Option<f64>,
}

impl LoraConfig {
    pub fn sign_method(&self) -> SignMethod {
        match self.majority_sign_method {
            SignMethodName::Total => SignMethod::Total,
            SignMethodName::Frequency => SignMethod::Frequency,
        }
    }
}

impl Config for LoraConfig {
    const TAG: &'static str = "lora";
}

const ABOUT: About = About::new("lora", BaseRule::Required);

impl MergeMethod for Lora {
    type Config = LoraConfig;

    fn about(&self) -> &About {
        &ABOUT
    }

    fn parse(&self, cx: &mut ParseInput<'_>) -> Result<LoraConfig, Invalid> {
        let mut combination = None;
        let mut density = None;
        let mut sign = SignMethodName::Total;
        let mut seed = 0u64;
        let mut svd_rank = None;
        let mut svd_clamp = None;
        for (key, value) in cx.params {
            let field = format!("parameters.{key}");
            match key.as_str() {
                "combination" => {
                    combination = Some(
                        serde_json::from_value::<CombinationName>(value.clone()).map_err(|_| {
                            invalid(
                                &field,
                                "one of linear, cat, ties, dare_linear, dare_ties, \
                                 magnitude_prune, svd, ties_svd, dare_linear_svd, \
                                 dare_ties_svd, magnitude_prune_svd",
                            )
                        })?,
                    );
                }
                "svd_rank" => {
                    svd_rank = Some(
                        value
                            .as_u64()
                            .filter(|r| *r >= 1)
                            .ok_or_else(|| invalid(&field, "must be an integer ≥ 1"))?,
                    );
                }
                "svd_clamp" => {
                    svd_clamp = Some(
                        value
                            .as_f64()
                            .filter(|q| (0.0..=1.0).contains(q))
                            .ok_or_else(|| {
                                invalid(&field, "must be a number from 0 to 1 (a quantile)")
                            })?,
                    );
                }
                "density" => {
                    density = Some(
                        value
                            .as_f64()
                            .filter(|d| d.is_finite() && *d >= 0.0)
                            .ok_or_else(|| invalid(&field, "must be a number ≥ 0"))?,
                    );
                }
                "majority_sign_method" => {
                    sign = serde_json::from_value(value.clone())
                        .map_err(|_| invalid(&field, "\"total\" or \"frequency\""))?;
                }
                "seed" => {
                    seed = value
                        .as_u64()
                        .ok_or_else(|| invalid(&field, "must be an integer from 0 to 2^64 − 1"))?;
                }
                _ => {
                    return Err(invalid(
                        field,
                        "unknown parameter for method lora (known: combination, density, \
                         majority_sign_method, seed, svd_rank, svd_clamp)",
                    ));
                }
            }
        }
        let combination =
            combination.ok_or_else(|| invalid("parameters.combination", "required"))?;
        let kind = combination.kind();
        let prunes = !matches!(
            combination,
            CombinationName::Linear | CombinationName::Cat | CombinationName::Svd
        );
        if prunes && density.is_none() {
            return Err(invalid(
                "parameters.density",
                format!("combination {} needs a density", combination.as_str()),
            ));
        }
        if !kind.is_svd() {
            for (key, given) in [
                ("svd_rank", svd_rank.is_some()),
                ("svd_clamp", svd_clamp.is_some()),
            ] {
                if given {
                    return Err(invalid(
                        format!("parameters.{key}"),
                        format!(
                            "only for the SVD types (combination {} has no SVD)",
                            combination.as_str()
                        ),
                    ));
                }
            }
        }
        for m in cx.models.iter() {
            for (key, s) in &m.parameters {
                let field = format!("models[{}].parameters.{key}", m.index);
                match (key.as_str(), s) {
                    ("weight", Setting::Filters(rules)) if combination == CombinationName::Cat => {
                        // A module's weight is one number: a gradient (mergekit's layer
                        // interpolation) in a rule would silently give its first anchor.
                        if let Some(i) = rules
                            .iter()
                            .position(|r| !matches!(r.value, Value::Scalar(_)))
                        {
                            return Err(invalid(
                                format!("{field}[{i}].value"),
                                "a per-module weight is a number (no gradient)",
                            ));
                        }
                    }
                    ("weight", _) => {
                        return Err(invalid(
                            field,
                            "per-module weights (a list of name/filter rules) are for \
                             combination cat only",
                        ));
                    }
                    _ => {
                        return Err(invalid(
                            field,
                            "unknown parameter for method lora (known: weight)",
                        ));
                    }
                }
            }
        }
        Ok(LoraConfig {
            combination,
            density,
            majority_sign_method: sign,
            seed,
            svd_rank,
            svd_clamp,
        })
    }

    fn kernel(
        &self,
        _config: &LoraConfig,
        _cx: &KernelInput<'_>,
    ) -> Result<Box<dyn TensorKernel>, String> {
        Err("method lora writes an adapter: the engine runs it (engine::lora_merge)".into())
    }
}

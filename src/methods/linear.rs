//! `linear`: the weighted (or uniform) average, the model soup. Weights may vary by tensor (a
//! layer gradient or `filter`/`name` rules per model), normalized per tensor.

use serde::{Deserialize, Serialize};

use super::{
    About, BaseRule, Config, Invalid, KernelInput, MergeMethod, Method, ModelEntry, Needs,
    ParseInput, Setting, TensorKernel, YamlDtype, common, invalid,
};
use crate::merge::{DType, MergeError, linear_raw};
use crate::methods::setting::depth;

pub struct Linear;

/// The linear soup (what greedy soups and sweeps write).
pub const METHOD: Method = Method::of(&Linear);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearConfig {
    /// Divide by the sum of the weights.
    pub normalize: bool,
}

impl Config for LinearConfig {
    const TAG: &'static str = "linear";
}

const ABOUT: About = About {
    trajectory: true,
    yaml_dtype: YamlDtype::AccumulatesF32,
    ..About::new("linear", BaseRule::Forbidden)
};

impl MergeMethod for Linear {
    type Config = LinearConfig;

    fn about(&self) -> &About {
        &ABOUT
    }

    fn parse(&self, cx: &mut ParseInput<'_>) -> Result<LinearConfig, Invalid> {
        let normalize = parse_soup(
            "linear",
            cx.params.iter(),
            "normalize",
            cx.models,
            " (a number, a layer gradient or filter/name rules)",
        )?;
        Ok(LinearConfig { normalize })
    }

    fn kernel(
        &self,
        config: &LinearConfig,
        cx: &KernelInput<'_>,
    ) -> Result<Box<dyn TensorKernel>, String> {
        Ok(Box::new(kernel(config.normalize, cx)))
    }
}

/// The linear family's parameters (`linear`, `sparse_soup`): `normalize` (default true) among
/// `params`, only weights per model, and with `normalize` a non-zero sum of scalar weights.
pub(super) fn parse_soup<'a>(
    method: &str,
    params: impl Iterator<Item = (&'a String, &'a serde_json::Value)>,
    known: &str,
    models: &[ModelEntry],
    weight_kinds: &str,
) -> Result<bool, Invalid> {
    let mut normalize = true;
    for (key, value) in params {
        match key.as_str() {
            "normalize" => normalize = common::bool_param(key, value)?,
            other => {
                return Err(invalid(
                    format!("parameters.{other}"),
                    format!("unknown parameter for method {method} (known: {known})"),
                ));
            }
        }
    }
    for m in models {
        if let Some(key) = m.parameters.keys().find(|k| *k != "weight") {
            return Err(invalid(
                format!("models[{}].parameters.{key}", m.index),
                format!("method {method} takes only a weight per model{weight_kinds}"),
            ));
        }
    }
    // Per-tensor weights (gradients, rules) are checked for a zero sum tensor by tensor.
    if normalize && models.iter().all(|m| m.parameters.is_empty()) {
        let sum: f32 = models.iter().map(|m| m.weight as f32).sum();
        if sum == 0.0 || !sum.is_finite() {
            return Err(invalid(
                "models[].weight",
                "with normalize: true the weights must not sum to zero",
            ));
        }
    }
    Ok(normalize)
}

/// The weights as the kernel uses them, and the divisor when normalizing (their f32 sum).
pub fn weights(normalize: bool, cx: &KernelInput<'_>) -> (Vec<f32>, Option<f32>) {
    let weights = cx.weights_f32();
    let divisor = normalize.then(|| weights.iter().sum::<f32>());
    (weights, divisor)
}

/// The linear soup kernel (also `ema`'s, whose weights the parser computed).
pub fn kernel(normalize: bool, cx: &KernelInput<'_>) -> LinearKernel {
    let (weights, divisor) = weights(normalize, cx);
    let settings: Vec<Option<Setting>> = cx
        .models
        .iter()
        .map(|m| m.parameters.get("weight").cloned())
        .collect();
    let per_tensor = settings
        .iter()
        .any(Option::is_some)
        .then_some(TensorWeights {
            settings,
            normalize,
            num_layers: cx.num_layers,
        });
    LinearKernel {
        weights,
        divisor,
        per_tensor,
    }
}

#[derive(Debug, Clone)]
pub struct LinearKernel {
    weights: Vec<f32>,
    divisor: Option<f32>,
    /// Per-model weights that vary by tensor (a layer gradient or `filter`/`name` rules, e.g.
    /// a learned soup's coefficients); `None` when every weight is one number.
    per_tensor: Option<TensorWeights>,
}

/// Linear weights that depend on the tensor: each model's `weight` setting evaluated for the
/// tensor's name and layer depth (the model's scalar weight where a setting gives nothing).
#[derive(Debug, Clone)]
struct TensorWeights {
    settings: Vec<Option<Setting>>,
    normalize: bool,
    num_layers: usize,
}

impl TensorWeights {
    /// The weights and (with `normalize`) their sum for tensor `name`, summed in model order
    /// in f32 as for scalar weights.
    fn for_tensor(&self, name: &str, scalar: &[f32]) -> (Vec<f32>, Option<f32>) {
        let t = depth(name, self.num_layers);
        let weights: Vec<f32> = scalar
            .iter()
            .zip(&self.settings)
            .map(|(w, s)| {
                s.as_ref()
                    .and_then(|s| s.eval(name, t))
                    .map_or(*w, |v| v as f32)
            })
            .collect();
        let divisor = self.normalize.then(|| weights.iter().sum::<f32>());
        (weights, divisor)
    }
}

impl TensorKernel for LinearKernel {
    fn needs(&self, _name: &str) -> Needs {
        Needs::Nothing
    }

    fn run(
        &self,
        name: &str,
        _shape: &[u64],
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        match &self.per_tensor {
            None => linear_raw(inputs, &self.weights, self.divisor, out_dtype, out),
            Some(pt) => {
                let (weights, divisor) = pt.for_tensor(name, &self.weights);
                if divisor == Some(0.0) {
                    return Err(MergeError::ZeroWeightSum);
                }
                linear_raw(inputs, &weights, divisor, out_dtype, out)
            }
        }
    }
}

//! `multislerp`: barycentric interpolation of several weighted models on the hypersphere
//! (mergekit's Multi-SLERP; the kernel is [`crate::merge::multislerp`]), of their task vectors
//! when a base is given.

use serde::{Deserialize, Serialize};

use super::{
    About, BaseRule, Config, Invalid, KernelInput, MergeMethod, Needs, ParseInput, Setting,
    TensorKernel, common, invalid,
};
use crate::merge::multislerp::{DEFAULT_EPS, MultislerpStream};
use crate::merge::precision::Precision;
use crate::merge::stream::{TensorStream, run_whole};
use crate::merge::{DType, MergeError};
use crate::methods::setting::depth;

pub struct Multislerp;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultislerpConfig {
    /// Divide the weights by their sum (mergekit `normalize_weights`, default true).
    pub normalize_weights: bool,
    /// Added to the norms before dividing (mergekit `eps`, default 1e-8).
    pub eps: f64,
}

impl Config for MultislerpConfig {
    const TAG: &'static str = "multislerp";
}

const ABOUT: About = About {
    weights_required: true,
    ..About::new("multislerp", BaseRule::Optional)
};

impl MergeMethod for Multislerp {
    type Config = MultislerpConfig;

    fn about(&self) -> &About {
        &ABOUT
    }

    fn parse(&self, cx: &mut ParseInput<'_>) -> Result<MultislerpConfig, Invalid> {
        let name = ABOUT.name;
        common::check_model_keys(name, cx, &["weight"])?;
        let mut c = MultislerpConfig {
            normalize_weights: true,
            eps: DEFAULT_EPS,
        };
        let known = ["normalize_weights", "eps"];
        common::parse_globals(name, cx, &known, |key, value, field| {
            match key {
                "normalize_weights" => c.normalize_weights = common::bool_param(key, value)?,
                "eps" => {
                    c.eps = value
                        .as_f64()
                        .filter(|x| x.is_finite() && *x >= 0.0)
                        .ok_or_else(|| invalid(field, "must be a number ≥ 0"))?;
                }
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(c)
    }

    fn kernel(
        &self,
        config: &MultislerpConfig,
        cx: &KernelInput<'_>,
    ) -> Result<Box<dyn TensorKernel>, String> {
        Ok(Box::new(MultislerpKernel {
            config: config.clone(),
            weights: cx
                .models
                .iter()
                .map(|m| (m.weight, m.parameters.get("weight").cloned()))
                .collect(),
            has_base: cx.has_base,
            num_layers: cx.num_layers,
        }))
    }
}

#[derive(Debug, Clone)]
pub struct MultislerpKernel {
    config: MultislerpConfig,
    /// Per model: the scalar weight, and a setting that overrides it where it gives a value.
    weights: Vec<(f64, Option<Setting>)>,
    has_base: bool,
    num_layers: usize,
}

impl MultislerpKernel {
    fn make(&self, name: &str, base_dtype: DType) -> MultislerpStream {
        let t = depth(name, self.num_layers);
        let w: Vec<f64> = self
            .weights
            .iter()
            .map(|(w, s)| s.as_ref().and_then(|s| s.eval(name, t)).unwrap_or(*w))
            .collect();
        MultislerpStream::new(
            Precision::of(base_dtype),
            self.has_base,
            &w,
            self.config.normalize_weights,
            self.config.eps,
        )
    }
}

impl TensorKernel for MultislerpKernel {
    fn needs(&self, _name: &str) -> Needs {
        Needs::Tensor
    }

    fn stream(
        &self,
        name: &str,
        _shape: &[u64],
        base_dtype: DType,
    ) -> Option<Box<dyn TensorStream>> {
        Some(Box::new(self.make(name, base_dtype)))
    }

    fn run(
        &self,
        name: &str,
        _shape: &[u64],
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        let first = inputs.first().map_or(DType::F32, |(d, _)| *d);
        run_whole(&mut self.make(name, first), inputs, out_dtype, out)
    }
}

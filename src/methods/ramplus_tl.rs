//! `ramplus_tl`: RAM+ with tensor-local statistics (mergekit's `ramplus_tl`; the kernel is
//! [`crate::merge::ram::RamPlusStream`]): as `ram`, with each model's unique contributions
//! scaled up by how much of it overlaps with the others in the tensor (one counting pre-pass).
//! Writes float32, as mergekit does, unless the recipe names an output dtype.

use serde::{Deserialize, Serialize};

use super::{
    About, BaseRule, Config, Invalid, KernelInput, MergeMethod, Needs, ParseInput, TensorKernel,
    common, invalid,
};
use crate::merge::precision::Precision;
use crate::merge::ram::{DEFAULT_ALPHA, DEFAULT_EPSILON, DEFAULT_R, RamPlusStream};
use crate::merge::stream::{TensorStream, run_whole};
use crate::merge::{DType, MergeError};

pub struct RamPlusTl;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RamPlusTlConfig {
    /// Scale of the overlap ratio (default 0.1).
    pub r: f64,
    /// Cap of the overlap ratio (default 0.2).
    pub alpha: f64,
    /// Contribution threshold (default 1e-5).
    pub epsilon: f64,
}

impl Config for RamPlusTlConfig {
    const TAG: &'static str = "ramplus_tl";
}

const ABOUT: About = About {
    output_dtype: Some(DType::F32),
    ..About::new("ramplus_tl", BaseRule::Required)
};

impl MergeMethod for RamPlusTl {
    type Config = RamPlusTlConfig;

    fn about(&self) -> &About {
        &ABOUT
    }

    fn parse(&self, cx: &mut ParseInput<'_>) -> Result<RamPlusTlConfig, Invalid> {
        let name = ABOUT.name;
        common::check_model_keys(name, cx, &[])?;
        let mut c = RamPlusTlConfig {
            r: DEFAULT_R,
            alpha: DEFAULT_ALPHA,
            epsilon: DEFAULT_EPSILON,
        };
        let number = |field: &str, value: &serde_json::Value| {
            value
                .as_f64()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| invalid(field, "must be a number ≥ 0"))
        };
        common::parse_globals(name, cx, &["r", "alpha", "epsilon"], |key, value, field| {
            match key {
                "r" => c.r = number(field, value)?,
                "alpha" => c.alpha = number(field, value)?,
                "epsilon" => c.epsilon = super::ram::epsilon(field, value)?,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(c)
    }

    fn kernel(
        &self,
        config: &RamPlusTlConfig,
        cx: &KernelInput<'_>,
    ) -> Result<Box<dyn TensorKernel>, String> {
        Ok(Box::new(RamPlusTlKernel {
            config: config.clone(),
            models: cx.models.len(),
        }))
    }
}

#[derive(Debug, Clone)]
pub struct RamPlusTlKernel {
    config: RamPlusTlConfig,
    models: usize,
}

impl RamPlusTlKernel {
    fn make(&self, base_dtype: DType) -> RamPlusStream {
        let c = &self.config;
        RamPlusStream::new(
            Precision::of(base_dtype),
            self.models,
            c.r,
            c.alpha,
            c.epsilon,
        )
    }
}

impl TensorKernel for RamPlusTlKernel {
    fn needs(&self, _name: &str) -> Needs {
        Needs::Tensor
    }

    fn stream(
        &self,
        _name: &str,
        _shape: &[u64],
        base_dtype: DType,
    ) -> Option<Box<dyn TensorStream>> {
        Some(Box::new(self.make(base_dtype)))
    }

    fn run(
        &self,
        _name: &str,
        _shape: &[u64],
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        let first = inputs.first().map_or(DType::F32, |(d, _)| *d);
        run_whole(&mut self.make(first), inputs, out_dtype, out)
    }
}

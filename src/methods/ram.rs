//! `ram`: Reinforced Agent Merging (mergekit's `ram`; the kernel is [`crate::merge::ram`]):
//! per element, a model's task vector is kept whole where it alone moves the weight (beyond
//! `epsilon`) and averaged where several do. Elementwise.

use serde::{Deserialize, Serialize};

use super::{
    About, BaseRule, Config, Invalid, KernelInput, MergeMethod, Needs, ParseInput, TensorKernel,
    common, invalid,
};
use crate::merge::precision::Precision;
use crate::merge::ram::{DEFAULT_EPSILON, ram};
use crate::merge::{DType, MergeError};

pub struct Ram;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RamConfig {
    /// A task-vector element counts as a contribution where `|τ| > epsilon` (default 1e-5).
    pub epsilon: f64,
}

impl Config for RamConfig {
    const TAG: &'static str = "ram";
}

const ABOUT: About = About::new("ram", BaseRule::Required);

/// `parameters.epsilon`: a number ≥ 0.
pub(super) fn epsilon(field: &str, value: &serde_json::Value) -> Result<f64, Invalid> {
    value
        .as_f64()
        .filter(|x| x.is_finite() && *x >= 0.0)
        .ok_or_else(|| invalid(field, "must be a number ≥ 0"))
}

impl MergeMethod for Ram {
    type Config = RamConfig;

    fn about(&self) -> &About {
        &ABOUT
    }

    fn parse(&self, cx: &mut ParseInput<'_>) -> Result<RamConfig, Invalid> {
        let name = ABOUT.name;
        common::check_model_keys(name, cx, &[])?;
        let mut c = RamConfig {
            epsilon: DEFAULT_EPSILON,
        };
        common::parse_globals(name, cx, &["epsilon"], |key, value, field| {
            match key {
                "epsilon" => c.epsilon = epsilon(field, value)?,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(c)
    }

    fn kernel(
        &self,
        config: &RamConfig,
        cx: &KernelInput<'_>,
    ) -> Result<Box<dyn TensorKernel>, String> {
        Ok(Box::new(RamKernel {
            epsilon: config.epsilon,
            models: cx.models.len(),
        }))
    }
}

#[derive(Debug, Clone)]
pub struct RamKernel {
    epsilon: f64,
    models: usize,
}

impl TensorKernel for RamKernel {
    fn needs(&self, _name: &str) -> Needs {
        Needs::Nothing
    }

    fn run(
        &self,
        _name: &str,
        _shape: &[u64],
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        common::expect_inputs(inputs.len(), self.models + 1)?;
        let first = inputs.first().map_or(DType::F32, |(d, _)| *d);
        ram(Precision::of(first), self.epsilon, inputs, out_dtype, out)
    }
}

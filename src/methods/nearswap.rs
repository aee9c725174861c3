//! `nearswap`: take the model's value where it is within `t` of the base, interpolate beyond.

use serde::{Deserialize, Serialize};

use super::slerp::{DEFAULT_T, parse_t};
use super::{
    About, BaseRule, Config, Invalid, KernelInput, MergeMethod, Needs, ParseInput, Setting,
    TensorKernel, common,
};
use crate::merge::precision::Precision;
use crate::merge::{DType, MergeError, map_blocks};
use crate::methods::setting::depth;

pub struct Nearswap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NearswapConfig {
    pub t: Setting,
}

impl Config for NearswapConfig {
    const TAG: &'static str = "nearswap";
}

const ABOUT: About = About::new("nearswap", BaseRule::Required);

impl MergeMethod for Nearswap {
    type Config = NearswapConfig;

    fn about(&self) -> &About {
        &ABOUT
    }

    fn parse(&self, cx: &mut ParseInput<'_>) -> Result<NearswapConfig, Invalid> {
        Ok(NearswapConfig {
            t: parse_t("nearswap", cx)?,
        })
    }

    fn kernel(
        &self,
        config: &NearswapConfig,
        cx: &KernelInput<'_>,
    ) -> Result<Box<dyn TensorKernel>, String> {
        Ok(Box::new(NearswapKernel {
            t: config.t.clone(),
            num_layers: cx.num_layers,
        }))
    }
}

#[derive(Debug, Clone)]
pub struct NearswapKernel {
    t: Setting,
    num_layers: usize,
}

impl TensorKernel for NearswapKernel {
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
        let tv = self
            .t
            .eval(name, depth(name, self.num_layers))
            .unwrap_or(DEFAULT_T);
        common::expect_inputs(inputs.len(), 2)?;
        let p = Precision::of(inputs[0].0);
        map_blocks(inputs, out_dtype, out, |b, o| {
            crate::merge::nearswap::nearswap(p, tv, b[0], b[1], o)
        })
    }
}

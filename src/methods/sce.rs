//! `sce`: select (variance top-k), calculate (weights from energy), erase (sign consensus).

use serde::{Deserialize, Serialize};

use super::{
    About, BaseRule, Config, Invalid, KernelInput, MergeMethod, Needs, ParseInput, TensorKernel,
    common, invalid,
};
use crate::merge::{DType, MergeError, encode_from_f32, sce};

pub struct Sce;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SceConfig {
    pub select_topk: f64,
}

impl Config for SceConfig {
    const TAG: &'static str = "sce";
}

const ABOUT: About = About::new("sce", BaseRule::Required);

impl MergeMethod for Sce {
    type Config = SceConfig;

    fn about(&self) -> &About {
        &ABOUT
    }

    fn parse(&self, cx: &mut ParseInput<'_>) -> Result<SceConfig, Invalid> {
        let name = ABOUT.name;
        common::check_model_keys(name, cx, &[])?;
        let mut c = SceConfig { select_topk: 1.0 };
        common::parse_globals(
            name,
            cx,
            &["select_topk", "int8_mask"],
            |key, value, field| {
                match key {
                    // mergekit's mask storage type: identical results, checked and not stored.
                    "int8_mask" => {
                        common::bool_param(key, value)?;
                    }
                    "select_topk" => {
                        c.select_topk = value
                            .as_f64()
                            .filter(|x| *x > 0.0 && *x <= 1.0)
                            .ok_or_else(|| invalid(field, "must be in (0, 1]"))?;
                    }
                    _ => return Ok(false),
                }
                Ok(true)
            },
        )?;
        Ok(c)
    }

    fn kernel(
        &self,
        config: &SceConfig,
        cx: &KernelInput<'_>,
    ) -> Result<Box<dyn TensorKernel>, String> {
        Ok(Box::new(SceKernel {
            select_topk: config.select_topk,
            models: cx.models.len(),
            has_base: cx.has_base,
        }))
    }
}

#[derive(Debug, Clone)]
pub struct SceKernel {
    select_topk: f64,
    models: usize,
    has_base: bool,
}

impl TensorKernel for SceKernel {
    fn needs(&self, _name: &str) -> Needs {
        Needs::Tensor
    }

    fn stream(
        &self,
        _name: &str,
        shape: &[u64],
        base_dtype: DType,
    ) -> Option<Box<dyn crate::merge::stream::TensorStream>> {
        Some(Box::new(crate::merge::sce::SceStream::new(
            crate::merge::precision::Precision::of(base_dtype),
            self.has_base,
            self.models,
            shape.iter().product::<u64>(),
            self.select_topk,
        )))
    }

    fn run(
        &self,
        _name: &str,
        _shape: &[u64],
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        let (p, decoded, mut res) =
            common::decode_models(inputs, out_dtype, out, self.models, self.has_base, 1, false)?;
        let (base, xs) = common::split_base(&decoded, self.has_base);
        let base = base.unwrap_or(xs[0]);
        sce::sce(p, base, &xs, self.select_topk, &mut res);
        encode_from_f32(out_dtype, &res, out).map_err(MergeError::from)
    }
}

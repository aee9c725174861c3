//! `model_stock`: interpolate the average toward the base by the task vectors' cosine (§10).

use serde::{Deserialize, Serialize};

use super::{
    About, BaseRule, Config, Invalid, KernelInput, MergeMethod, Needs, ParseInput, TensorKernel,
    common,
};
use crate::merge::{DType, MergeError, encode_from_f32, model_stock};

pub struct ModelStock;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelStockConfig {
    /// Cosines per row (last dimension) instead of per tensor.
    pub filter_wise: bool,
}

impl Config for ModelStockConfig {
    const TAG: &'static str = "model_stock";
}

const ABOUT: About = About::new("model_stock", BaseRule::Required);

impl MergeMethod for ModelStock {
    type Config = ModelStockConfig;

    fn about(&self) -> &About {
        &ABOUT
    }

    fn parse(&self, cx: &mut ParseInput<'_>) -> Result<ModelStockConfig, Invalid> {
        let name = ABOUT.name;
        common::check_model_keys(name, cx, &[])?;
        common::check_count(
            name,
            cx,
            cx.models.len() >= 2,
            "base_model and at least two other models",
        )?;
        let mut c = ModelStockConfig { filter_wise: false };
        common::parse_globals(name, cx, &["filter_wise"], |key, value, _| {
            match key {
                "filter_wise" => c.filter_wise = common::bool_param(key, value)?,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(c)
    }

    fn kernel(
        &self,
        config: &ModelStockConfig,
        cx: &KernelInput<'_>,
    ) -> Result<Box<dyn TensorKernel>, String> {
        Ok(Box::new(ModelStockKernel {
            filter_wise: config.filter_wise,
            models: cx.models.len(),
            has_base: cx.has_base,
        }))
    }
}

#[derive(Debug, Clone)]
pub struct ModelStockKernel {
    filter_wise: bool,
    models: usize,
    has_base: bool,
}

impl TensorKernel for ModelStockKernel {
    fn needs(&self, _name: &str) -> Needs {
        Needs::Tensor
    }

    fn stream(
        &self,
        _name: &str,
        shape: &[u64],
        base_dtype: DType,
    ) -> Option<Box<dyn crate::merge::stream::TensorStream>> {
        Some(Box::new(model_stock::ModelStockStream::new(
            crate::merge::precision::Precision::of(base_dtype),
            self.has_base,
            self.models,
            self.filter_wise.then(|| common::row_len(shape)),
        )))
    }

    fn run(
        &self,
        _name: &str,
        shape: &[u64],
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        let (p, decoded, mut res) =
            common::decode_models(inputs, out_dtype, out, self.models, self.has_base, 2, false)?;
        let (base, xs) = common::split_base(&decoded, self.has_base);
        let base = base.unwrap_or(xs[0]);
        let row = if self.filter_wise {
            common::row_len(shape)
        } else {
            res.len()
        };
        model_stock::model_stock(p, base, &xs, row, &mut res);
        encode_from_f32(out_dtype, &res, out).map_err(MergeError::from)
    }
}

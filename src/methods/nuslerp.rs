//! `nuslerp`: slerp of two weighted models, or of their task vectors with a base (§11.3).

use serde::{Deserialize, Serialize};

use super::{
    About, BaseRule, Config, Invalid, KernelInput, MergeMethod, Needs, ParseInput, Setting,
    TensorKernel, common,
};
use crate::merge::{DType, MergeError, encode_from_f32, spherical};
use crate::methods::setting::depth;

pub struct Nuslerp;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NuslerpConfig {
    /// The whole tensor is one vector (mergekit `nuslerp_flatten`, default true).
    pub flatten: bool,
    /// Without flatten: columns (`true`) or rows (`false`) are the vectors.
    pub row_wise: bool,
}

impl Config for NuslerpConfig {
    const TAG: &'static str = "nuslerp";
}

const ABOUT: About = About {
    weights_required: true,
    ..About::new("nuslerp", BaseRule::Optional)
};

impl MergeMethod for Nuslerp {
    type Config = NuslerpConfig;

    fn about(&self) -> &About {
        &ABOUT
    }

    fn parse(&self, cx: &mut ParseInput<'_>) -> Result<NuslerpConfig, Invalid> {
        let name = ABOUT.name;
        common::check_model_keys(name, cx, &["weight"])?;
        common::check_count(
            name,
            cx,
            cx.models.len() == 2,
            if cx.has_base {
                "exactly two models besides base_model"
            } else {
                "exactly two models"
            },
        )?;
        let mut c = NuslerpConfig {
            flatten: true,
            row_wise: false,
        };
        let known = ["nuslerp_flatten", "nuslerp_row_wise"];
        common::parse_globals(name, cx, &known, |key, value, _| {
            match key {
                "nuslerp_flatten" => c.flatten = common::bool_param(key, value)?,
                "nuslerp_row_wise" => c.row_wise = common::bool_param(key, value)?,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(c)
    }

    fn kernel(
        &self,
        config: &NuslerpConfig,
        cx: &KernelInput<'_>,
    ) -> Result<Box<dyn TensorKernel>, String> {
        Ok(Box::new(NuslerpKernel {
            shape: match (config.flatten, config.row_wise) {
                (true, _) => spherical::NuslerpShape::Flatten,
                (false, false) => spherical::NuslerpShape::Rows,
                (false, true) => spherical::NuslerpShape::Columns,
            },
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
pub struct NuslerpKernel {
    shape: spherical::NuslerpShape,
    /// Per model: the scalar weight, and a setting that overrides it where it gives a value.
    weights: Vec<(f64, Option<Setting>)>,
    has_base: bool,
    num_layers: usize,
}

impl NuslerpKernel {
    /// `t`: the second model's share of the two weights for tensor `name`.
    fn t(&self, name: &str) -> f64 {
        let t_depth = depth(name, self.num_layers);
        let w: Vec<f64> = self
            .weights
            .iter()
            .map(|(w, s)| s.as_ref().and_then(|s| s.eval(name, t_depth)).unwrap_or(*w))
            .collect();
        let total = w.iter().sum::<f64>();
        if total.abs() < 1e-6 || w.len() < 2 {
            0.5
        } else {
            w[1] / total
        }
    }
}

impl TensorKernel for NuslerpKernel {
    fn needs(&self, _name: &str) -> Needs {
        Needs::Tensor
    }

    fn stream(
        &self,
        name: &str,
        shape: &[u64],
        base_dtype: DType,
    ) -> Option<Box<dyn crate::merge::stream::TensorStream>> {
        if self.weights.len() != 2 {
            return None;
        }
        Some(Box::new(spherical::NuslerpStream::new(
            crate::merge::precision::Precision::of(base_dtype),
            self.t(name),
            self.has_base,
            self.shape,
            common::row_len(shape),
            shape.iter().product::<u64>(),
        )))
    }

    fn run(
        &self,
        name: &str,
        shape: &[u64],
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        let n = self.weights.len();
        let (p, decoded, mut res) =
            common::decode_models(inputs, out_dtype, out, n, self.has_base, 2, true)?;
        let (base, xs) = common::split_base(&decoded, self.has_base);
        let t = self.t(name);
        let cols = common::row_len(shape);
        spherical::nuslerp(p, t, base, xs[0], xs[1], self.shape, cols, &mut res);
        encode_from_f32(out_dtype, &res, out).map_err(MergeError::from)
    }
}

//! `slerp`: spherical interpolation between the base (`t = 0`) and one model (§11.1); `t` may
//! be a number, a layer gradient or filter rules.

use serde::{Deserialize, Serialize};

use super::{
    About, BaseRule, Config, Invalid, KernelInput, MergeMethod, Needs, ParseInput, Setting,
    TensorKernel, common, invalid,
};
use crate::merge::precision::Precision;
use crate::merge::{DType, MergeError, encode_from_f32};
use crate::methods::setting::depth;

pub struct Slerp;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlerpConfig {
    pub t: Setting,
}

impl Config for SlerpConfig {
    const TAG: &'static str = "slerp";
}

/// `t` where a setting gives no value for a tensor.
pub const DEFAULT_T: f64 = 0.5;

const ABOUT: About = About::new("slerp", BaseRule::Required);

impl MergeMethod for Slerp {
    type Config = SlerpConfig;

    fn about(&self) -> &About {
        &ABOUT
    }

    fn parse(&self, cx: &mut ParseInput<'_>) -> Result<SlerpConfig, Invalid> {
        Ok(SlerpConfig {
            t: parse_t("slerp", cx)?,
        })
    }

    fn kernel(
        &self,
        config: &SlerpConfig,
        cx: &KernelInput<'_>,
    ) -> Result<Box<dyn TensorKernel>, String> {
        Ok(Box::new(SlerpKernel {
            t: config.t.clone(),
            num_layers: cx.num_layers,
        }))
    }
}

/// The parameters of a two-model interpolation (`slerp`, `nearswap`): exactly one model
/// besides the base, no per-model parameters, and `t` (a filter list must end with a rule for
/// every other tensor).
pub(super) fn parse_t(name: &str, cx: &ParseInput<'_>) -> Result<Setting, Invalid> {
    if cx.models.len() != 1 {
        return Err(invalid(
            "models",
            format!(
                "{name} interpolates base_model and exactly one other model ({} given)",
                cx.models.len()
            ),
        ));
    }
    if let Some(field) = common::first_model_param(cx.models) {
        return Err(invalid(
            field,
            format!("{name} takes no per-model parameters"),
        ));
    }
    let mut t = None;
    for (key, value) in cx.params {
        match key.as_str() {
            "t" => t = Some(common::setting_param("t", value)?),
            other => {
                return Err(invalid(
                    format!("parameters.{other}"),
                    format!("unknown parameter for method {name} (known: t)"),
                ));
            }
        }
    }
    let t = t.ok_or_else(|| invalid("parameters.t", format!("{name} needs t")))?;
    if let Setting::Filters(rules) = &t
        && !rules
            .iter()
            .any(|r| matches!(r.filter.as_deref(), None | Some("*")))
    {
        return Err(invalid(
            "parameters.t",
            "end the filter list with a rule without filter (the value for other tensors)",
        ));
    }
    Ok(t)
}

#[derive(Debug, Clone)]
pub struct SlerpKernel {
    t: Setting,
    num_layers: usize,
}

impl TensorKernel for SlerpKernel {
    fn needs(&self, _name: &str) -> Needs {
        Needs::Tensor
    }

    fn stream(
        &self,
        name: &str,
        _shape: &[u64],
        base_dtype: DType,
    ) -> Option<Box<dyn crate::merge::stream::TensorStream>> {
        let tv = self
            .t
            .eval(name, depth(name, self.num_layers))
            .unwrap_or(DEFAULT_T);
        Some(Box::new(crate::merge::slerp::SlerpStream::new(
            tv,
            Precision::of(base_dtype),
        )))
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
        let (decoded, mut res) = common::decode_all(inputs, out_dtype, out)?;
        common::expect_inputs(decoded.len(), 2)?;
        crate::merge::slerp::slerp(tv, &decoded[0], &decoded[1], &mut res);
        // mergekit casts the result to the base tensor's dtype before saving.
        let p = Precision::of(inputs[0].0);
        for x in res.iter_mut() {
            *x = p.round(*x);
        }
        encode_from_f32(out_dtype, &res, out).map_err(MergeError::from)
    }
}

//! `ema`: an offline EMA over checkpoints of one run (oldest first), as a linear soup with
//! weights `β^{T−1}` on the first and `(1 − β)·β^{T−j}` on checkpoint `j ≥ 2`
//! (ALGORITHMS.md §17). Stored as a linear soup without normalization (the weights sum to 1).

use super::linear::{self, LinearConfig};
use super::{
    About, BaseRule, Invalid, KernelInput, MergeMethod, ParseInput, TensorKernel, YamlDtype,
    common, invalid,
};

pub struct Ema;

const ABOUT: About = About {
    trajectory: true,
    yaml_dtype: YamlDtype::AccumulatesF32,
    ..About::new("ema", BaseRule::Forbidden)
};

impl MergeMethod for Ema {
    type Config = LinearConfig;

    fn about(&self) -> &About {
        &ABOUT
    }

    fn parse(&self, cx: &mut ParseInput<'_>) -> Result<LinearConfig, Invalid> {
        if cx.any_weight() {
            return Err(invalid(
                "models[].weight",
                "ema computes the weights from decay; give none",
            ));
        }
        let mut decay = None;
        for (key, value) in cx.params {
            match key.as_str() {
                "decay" => {
                    decay = Some(
                        value
                            .as_f64()
                            .filter(|d| *d > 0.0 && *d < 1.0)
                            .ok_or_else(|| invalid("parameters.decay", "must be in (0, 1)"))?,
                    );
                }
                other => {
                    return Err(invalid(
                        format!("parameters.{other}"),
                        "unknown parameter for method ema (known: decay)",
                    ));
                }
            }
        }
        let decay = decay.ok_or_else(|| {
            invalid(
                "parameters.decay",
                "ema needs decay (per checkpoint interval)",
            )
        })?;
        if let Some(field) = common::first_model_param(cx.models) {
            return Err(invalid(field, "ema takes no per-model parameters"));
        }
        let t = cx.models.len() as i32;
        for (j, m) in cx.models.iter_mut().enumerate() {
            let j = j as i32 + 1;
            m.weight = if j == 1 {
                decay.powi(t - 1)
            } else {
                (1.0 - decay) * decay.powi(t - j)
            };
        }
        Ok(LinearConfig { normalize: false })
    }

    fn kernel(
        &self,
        config: &LinearConfig,
        cx: &KernelInput<'_>,
    ) -> Result<Box<dyn TensorKernel>, String> {
        Ok(Box::new(linear::kernel(config.normalize, cx)))
    }
}

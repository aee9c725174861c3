//! `passthrough`: copy one model (optional per-model `scale`), or stack `slices` (layer
//! ranges of several models, renumbered). The engine lays the tensors out itself
//! (`engine::slices`): it picks and scales source tensors instead of merging.

use serde::{Deserialize, Serialize};

use super::{
    About, BaseRule, Config, Invalid, KernelInput, MergeMethod, Needs, ParseInput, TensorKernel,
    common, invalid,
};
use crate::merge::{DType, MergeError, linear_raw};

pub struct Passthrough;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassthroughConfig {}

impl Config for PassthroughConfig {
    const TAG: &'static str = "passthrough";
}

const ABOUT: About = About {
    slices: true,
    ..About::new("passthrough", BaseRule::Forbidden)
};

impl MergeMethod for Passthrough {
    type Config = PassthroughConfig;

    fn about(&self) -> &About {
        &ABOUT
    }

    fn parse(&self, cx: &mut ParseInput<'_>) -> Result<PassthroughConfig, Invalid> {
        if let Some(key) = cx.params.keys().next() {
            return Err(invalid(
                format!("parameters.{key}"),
                "passthrough takes no global parameters (give scale per model or per slice)",
            ));
        }
        if !cx.has_slices && cx.models.len() != 1 {
            return Err(invalid(
                "models",
                "passthrough copies exactly one model (or give slices)",
            ));
        }
        for m in cx.models.iter() {
            if let Some(key) = m.parameters.keys().find(|k| k.as_str() != "scale") {
                return Err(invalid(
                    format!("models[{}].parameters.{key}", m.index),
                    "unknown parameter for method passthrough (known: scale)",
                ));
            }
        }
        Ok(PassthroughConfig {})
    }

    fn kernel(
        &self,
        _config: &PassthroughConfig,
        _cx: &KernelInput<'_>,
    ) -> Result<Box<dyn TensorKernel>, String> {
        Ok(Box::new(FirstInput))
    }
}

/// The engine picks passthrough's tensors itself; a tensor it did merge would be the first
/// input's, converted to the output dtype.
#[derive(Debug, Clone)]
pub struct FirstInput;

impl TensorKernel for FirstInput {
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
        common::expect_inputs(inputs.len().min(1), 1)?;
        linear_raw(&inputs[..1], &[1.0], None, out_dtype, out)
    }
}

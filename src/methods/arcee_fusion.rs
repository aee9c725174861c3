//! `arcee_fusion`: a base and one model; the model's change is kept where its importance
//! (the change times the row's KL divergence) is above the tensor's `median + 1.5·IQR`
//! (mergekit's Arcee Fusion; the kernel is [`crate::merge::arcee_fusion`]). Writes float32, as
//! mergekit does, unless the recipe names an output dtype.

use serde::{Deserialize, Serialize};

use super::{
    About, BaseRule, Config, Invalid, KernelInput, MergeMethod, Needs, ParseInput, TensorKernel,
    common,
};
use crate::merge::arcee_fusion::ArceeFusionStream;
use crate::merge::precision::Precision;
use crate::merge::stream::{TensorStream, run_whole};
use crate::merge::{DType, MergeError};

pub struct ArceeFusion;

/// No parameters (mergekit defines none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArceeFusionConfig {}

impl Config for ArceeFusionConfig {
    const TAG: &'static str = "arcee_fusion";
}

const ABOUT: About = About {
    output_dtype: Some(DType::F32),
    ..About::new("arcee_fusion", BaseRule::Required)
};

impl MergeMethod for ArceeFusion {
    type Config = ArceeFusionConfig;

    fn about(&self) -> &About {
        &ABOUT
    }

    fn parse(&self, cx: &mut ParseInput<'_>) -> Result<ArceeFusionConfig, Invalid> {
        let name = ABOUT.name;
        common::check_model_keys(name, cx, &[])?;
        common::check_count(
            name,
            cx,
            cx.models.len() == 1,
            "exactly one model besides base_model",
        )?;
        common::parse_globals(name, cx, &[], |_, _, _| Ok(false))?;
        Ok(ArceeFusionConfig {})
    }

    fn kernel(
        &self,
        _config: &ArceeFusionConfig,
        _cx: &KernelInput<'_>,
    ) -> Result<Box<dyn TensorKernel>, String> {
        Ok(Box::new(ArceeFusionKernel))
    }
}

#[derive(Debug, Clone)]
pub struct ArceeFusionKernel;

fn make(shape: &[u64], base_dtype: DType) -> ArceeFusionStream {
    ArceeFusionStream::new(
        Precision::of(base_dtype),
        common::row_len(shape),
        shape.iter().product::<u64>(),
    )
}

impl TensorKernel for ArceeFusionKernel {
    fn needs(&self, _name: &str) -> Needs {
        Needs::Tensor
    }

    fn stream(
        &self,
        _name: &str,
        shape: &[u64],
        base_dtype: DType,
    ) -> Option<Box<dyn TensorStream>> {
        Some(Box::new(make(shape, base_dtype)))
    }

    fn run(
        &self,
        _name: &str,
        shape: &[u64],
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        let first = inputs.first().map_or(DType::F32, |(d, _)| *d);
        run_whole(&mut make(shape, first), inputs, out_dtype, out)
    }
}

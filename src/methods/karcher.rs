//! `karcher`: the Riemannian (Karcher) mean of the models on the sphere (§11.4). With a
//! `base_model`, the base joins the averaged models, added last (mergekit gathers the base with
//! the models and averages them all with equal weights).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    About, BaseRule, Config, Invalid, KernelInput, MergeMethod, Needs, ParseInput, TensorKernel,
    common, invalid,
};
use crate::merge::karcher_stream::{CacheBudget, KarcherStream};
use crate::merge::stream::TensorStream;
use crate::merge::{DType, MergeError, encode_from_f32, spherical};

pub struct Karcher;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KarcherConfig {
    pub max_iter: u32,
    pub tol: f64,
}

impl Config for KarcherConfig {
    const TAG: &'static str = "karcher";
}

const ABOUT: About = About {
    trajectory: true,
    ..About::new("karcher", BaseRule::Optional)
};

impl MergeMethod for Karcher {
    type Config = KarcherConfig;

    fn about(&self) -> &About {
        &ABOUT
    }

    fn parse(&self, cx: &mut ParseInput<'_>) -> Result<KarcherConfig, Invalid> {
        let name = ABOUT.name;
        common::check_model_keys(name, cx, &[])?;
        let mut c = KarcherConfig {
            max_iter: 10,
            tol: 1e-5,
        };
        common::parse_globals(name, cx, &["max_iter", "tol"], |key, value, field| {
            match key {
                "max_iter" => {
                    c.max_iter = value
                        .as_u64()
                        .filter(|n| (1..=10_000).contains(n))
                        .ok_or_else(|| invalid(field, "must be an integer from 1 to 10000"))?
                        as u32;
                }
                "tol" => {
                    c.tol = value
                        .as_f64()
                        .filter(|x| x.is_finite() && *x > 0.0)
                        .ok_or_else(|| invalid(field, "must be a positive number"))?;
                }
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(c)
    }

    fn kernel(
        &self,
        config: &KarcherConfig,
        cx: &KernelInput<'_>,
    ) -> Result<Box<dyn TensorKernel>, String> {
        Ok(Box::new(KarcherKernel {
            config: config.clone(),
            models: cx.models.len(),
            has_base: cx.has_base,
            cache: CacheBudget::new(CACHE_BYTES),
        }))
    }
}

/// Bytes of per-element cache the streamed tensors of one merge may hold at once (see
/// [`crate::merge::karcher_stream`]): a tensor of up to 48 Mi bf16 elements is cached whole;
/// beyond the budget the elements replay the iterations instead (same bits, slower). With
/// 128 MiB a 3 × 0.98 GB karcher peaked at 301 MiB RSS (its 65.5 M-element embedding cached
/// whole); 96 MiB keeps it under issue 10's 300 MB.
const CACHE_BYTES: usize = 96 << 20;

#[derive(Debug, Clone)]
pub struct KarcherKernel {
    config: KarcherConfig,
    models: usize,
    has_base: bool,
    cache: Arc<CacheBudget>,
}

impl TensorKernel for KarcherKernel {
    fn needs(&self, _name: &str) -> Needs {
        Needs::Tensor
    }

    fn stream(
        &self,
        _name: &str,
        shape: &[u64],
        base_dtype: DType,
    ) -> Option<Box<dyn crate::merge::stream::TensorStream>> {
        let elems = shape
            .iter()
            .try_fold(1usize, |n, d| n.checked_mul(usize::try_from(*d).ok()?))
            .unwrap_or(usize::MAX);
        let stream = KarcherStream::new(
            crate::merge::precision::Precision::of(base_dtype),
            self.models + usize::from(self.has_base),
            self.config.max_iter as usize,
            self.config.tol,
        )
        .with_cache(elems, self.cache.clone());
        let stream: Box<dyn TensorStream> = if self.has_base {
            Box::new(BaseLast(stream))
        } else {
            Box::new(stream)
        };
        Some(stream)
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
        let (base, mut xs) = common::split_base(&decoded, self.has_base);
        xs.extend(base);
        let c = &self.config;
        spherical::karcher(p, &xs, c.max_iter as usize, c.tol, &mut res);
        encode_from_f32(out_dtype, &res, out).map_err(MergeError::from)
    }
}

/// A stream over the models then the base, fed the engine's order (base first).
struct BaseLast<S>(S);

/// `[base, x₁ … x_N]` → `[x₁ … x_N, base]`.
fn base_last<'a>(inputs: &[(DType, &'a [u8])]) -> Vec<(DType, &'a [u8])> {
    let mut v: Vec<(DType, &[u8])> = inputs.iter().skip(1).copied().collect();
    v.extend(inputs.first().copied());
    v
}

impl<S: TensorStream> TensorStream for BaseLast<S> {
    fn align(&self) -> usize {
        self.0.align()
    }

    fn wants_pass(&self) -> bool {
        self.0.wants_pass()
    }

    fn observe(&mut self, first: u64, inputs: &[(DType, &[u8])]) -> Result<(), MergeError> {
        self.0.observe(first, &base_last(inputs))
    }

    fn end_pass(&mut self) {
        self.0.end_pass()
    }

    fn merge(
        &self,
        first: u64,
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        self.0.merge(first, &base_last(inputs), out_dtype, out)
    }
}

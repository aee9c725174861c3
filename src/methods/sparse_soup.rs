//! `sparse_soup` (Sparse Model Soups): a linear soup of ingredients that share one zero
//! pattern. Zeros shared by every ingredient stay exactly zero; the manifest's `sparsity`
//! gives per-tensor and total sparsity and the tensors whose patterns differ
//! (`require_shared_mask: true` fails such a job).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::linear::{parse_soup, weights};
use super::{
    About, BaseRule, Config, Invalid, KernelInput, MergeMethod, Needs, ParseInput, TensorKernel,
    YamlDtype, common, invalid,
};
use crate::merge::{DType, MergeError, map_blocks};

pub struct SparseSoup;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparseSoupConfig {
    pub normalize: bool,
    /// Fail when the ingredients' zero patterns differ (else report those tensors).
    pub require_shared_mask: bool,
}

impl Config for SparseSoupConfig {
    const TAG: &'static str = "sparse_soup";
}

const ABOUT: About = About {
    trajectory: true,
    yaml_dtype: YamlDtype::AccumulatesF32,
    ..About::new("sparse_soup", BaseRule::Forbidden)
};

impl MergeMethod for SparseSoup {
    type Config = SparseSoupConfig;

    fn about(&self) -> &About {
        &ABOUT
    }

    fn parse(&self, cx: &mut ParseInput<'_>) -> Result<SparseSoupConfig, Invalid> {
        let require_shared_mask = match cx.params.get("require_shared_mask") {
            None => false,
            Some(v) => common::bool_param("require_shared_mask", v)?,
        };
        if let Some(field) = common::first_model_param(cx.models) {
            return Err(invalid(
                field,
                "method sparse_soup takes only a numeric weight per model",
            ));
        }
        let normalize = parse_soup(
            "sparse_soup",
            cx.params
                .iter()
                .filter(|(k, _)| *k != "require_shared_mask"),
            "normalize, require_shared_mask",
            cx.models,
            "",
        )?;
        Ok(SparseSoupConfig {
            normalize,
            require_shared_mask,
        })
    }

    fn kernel(
        &self,
        config: &SparseSoupConfig,
        cx: &KernelInput<'_>,
    ) -> Result<Box<dyn TensorKernel>, String> {
        let (weights, divisor) = weights(config.normalize, cx);
        Ok(Box::new(SparseSoupKernel {
            weights,
            divisor,
            require_shared_mask: config.require_shared_mask,
            stats: Mutex::new(BTreeMap::new()),
        }))
    }
}

/// Zero counts of one output tensor of a sparse soup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SparseStats {
    pub elements: u64,
    /// Output elements equal to ±0.
    pub zeros: u64,
    /// Elements where some ingredient is zero and another is not.
    pub mask_mismatch: u64,
}

/// A linear soup that checks the ingredients share one zero pattern and counts the output's
/// zeros per tensor (reported in the manifest).
#[derive(Debug)]
pub struct SparseSoupKernel {
    weights: Vec<f32>,
    divisor: Option<f32>,
    require_shared_mask: bool,
    stats: Mutex<BTreeMap<String, SparseStats>>,
}

impl TensorKernel for SparseSoupKernel {
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
        common::expect_inputs(inputs.len(), self.weights.len())?;
        let zeros = AtomicU64::new(0);
        let mismatch = AtomicU64::new(0);
        map_blocks(inputs, out_dtype, out, |b, o| {
            crate::merge::linear(b, &self.weights, self.divisor, o);
            let (mut z, mut mm) = (0u64, 0u64);
            for (e, v) in o.iter_mut().enumerate() {
                let zero_in = b.iter().filter(|x| x[e] == 0.0).count();
                if zero_in == b.len() {
                    *v = 0.0; // shared zeros stay exactly (+)0
                } else if zero_in > 0 {
                    mm += 1;
                }
                if *v == 0.0 {
                    z += 1;
                }
            }
            zeros.fetch_add(z, Ordering::Relaxed);
            mismatch.fetch_add(mm, Ordering::Relaxed);
        })?;
        let mm = mismatch.load(Ordering::Relaxed);
        if self.require_shared_mask && mm > 0 {
            return Err(MergeError::MaskMismatch {
                elements: mm as usize,
            });
        }
        let n = (out.len() / out_dtype.size_bytes().max(1)) as u64;
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let entry = s.entry(name.to_string()).or_default();
        entry.elements += n;
        entry.zeros += zeros.load(Ordering::Relaxed);
        entry.mask_mismatch += mm;
        Ok(())
    }

    /// Per-tensor and total output sparsity, and the tensors whose ingredients did not share
    /// one zero pattern.
    fn report(&self) -> Option<serde_json::Value> {
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let (mut zeros, mut elements) = (0u64, 0u64);
        let mut tensors = serde_json::Map::new();
        let mut mismatched = Vec::new();
        for (name, s) in stats.iter() {
            zeros += s.zeros;
            elements += s.elements;
            if s.mask_mismatch > 0 {
                mismatched.push(serde_json::json!({"tensor": name, "elements": s.mask_mismatch}));
            }
            tensors.insert(
                name.clone(),
                serde_json::json!({
                    "elements": s.elements,
                    "zeros": s.zeros,
                    "sparsity": if s.elements > 0 { s.zeros as f64 / s.elements as f64 } else { 0.0 },
                }),
            );
        }
        Some(serde_json::json!({
            "total": if elements > 0 { zeros as f64 / elements as f64 } else { 0.0 },
            "zeros": zeros,
            "elements": elements,
            "tensors_without_shared_mask": mismatched,
            "tensors": tensors,
        }))
    }
}

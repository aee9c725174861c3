//! From a recipe to the kernel call for one output tensor: resolves per-tensor parameters
//! (filters, gradients across depth), picks the compute precision, and says how a tensor is
//! merged: chunk by chunk with [`Kernel::run`] (elementwise methods), streamed with
//! [`Kernel::stream`] (a method that needs a statistic of the tensor: TIES / breadcrumbs
//! cut-offs, rescale norms, DELLA's per-row ranks, SCE's variance top-k, model_stock's cosines,
//! slerp / nuslerp norms and dot products: pre-passes over the tensor's chunks, then chunk by
//! chunk), or whole (karcher, whose iterations still take the tensor at once).
//!
//! Memory of a streamed tensor: the method's statistics (a few 512 KiB histograms, 8 bytes
//! per 4,096 elements per tie table, a few scalars or one per column) plus the chunks in
//! flight. The whole-tensor path (karcher) holds the raw input bytes, one f32 copy of every
//! input, one f32 unit vector per model and an f32 result: a small multiple of the largest
//! tensor.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::merge::gta::{self, ModelParams};
use crate::merge::gta_stream::GtaStream;
use crate::merge::karcher_stream::KarcherStream;
use crate::merge::model_stock::ModelStockStream;
use crate::merge::precision::Precision;
use crate::merge::radix::Band;
use crate::merge::sce::SceStream;
use crate::merge::slerp::SlerpStream;
use crate::merge::spherical::NuslerpStream;
use crate::merge::stream::{TensorStream, run_whole};
use crate::merge::{
    DType, MergeError, count_nonfinite, decode_to_f32, encode_from_f32, linear_raw, map_blocks,
};
use crate::recipe::{GtaMethod, Parameters, Recipe, Setting, depth};

/// Linear weights that depend on the tensor: each model's `weight` setting evaluated for the
/// tensor's name and layer depth (the model's scalar weight where a setting gives nothing).
#[derive(Debug, Clone)]
pub struct TensorWeights {
    settings: Vec<Option<Setting>>,
    normalize: bool,
    num_layers: usize,
}

impl TensorWeights {
    /// The weights and (with `normalize`) their sum for tensor `name`, summed in model order
    /// in f32 as for scalar weights.
    fn for_tensor(&self, name: &str, scalar: &[f32]) -> (Vec<f32>, Option<f32>) {
        let t = depth(name, self.num_layers);
        let weights: Vec<f32> = scalar
            .iter()
            .zip(&self.settings)
            .map(|(w, s)| {
                s.as_ref()
                    .and_then(|s| s.eval(name, t))
                    .map_or(*w, |v| v as f32)
            })
            .collect();
        let divisor = self.normalize.then(|| weights.iter().sum::<f32>());
        (weights, divisor)
    }
}

/// The method, ready to run on tensors. Inputs arrive base first (when the recipe has one),
/// then the models in recipe order.
#[derive(Debug, Clone)]
pub enum Op {
    Linear {
        weights: Vec<f32>,
        divisor: Option<f32>,
        /// Per-model weights that vary by tensor (a layer gradient or `filter`/`name` rules,
        /// e.g. a learned soup's coefficients); `None` when every weight is one number.
        per_tensor: Option<TensorWeights>,
    },
    Gta {
        method: GtaMethod,
        normalize: bool,
        rescale: bool,
        lambda: f64,
        seed: u64,
        compute_dtype: Option<DType>,
        /// Per model: its parameters, its scalar weight.
        models: Vec<(std::collections::BTreeMap<String, Setting>, f64)>,
        defaults: std::collections::BTreeMap<String, Setting>,
        num_layers: usize,
        per_row: bool,
        /// `scope: "model"`: per model, the band of magnitudes kept over the whole model
        /// (set from the engine's pre-pass with [`Kernel::with_bands`]); the merge then
        /// streams elementwise.
        per_model: bool,
        bands: Arc<Vec<Band>>,
    },
    Slerp {
        t: Setting,
        num_layers: usize,
    },
    Nearswap {
        t: Setting,
        num_layers: usize,
    },
    /// A linear soup that checks the ingredients share one zero pattern and counts the
    /// output's zeros per tensor (reported in the manifest).
    SparseSoup {
        weights: Vec<f32>,
        divisor: Option<f32>,
        require_shared_mask: bool,
        stats: Arc<Mutex<BTreeMap<String, SparseStats>>>,
    },
    /// model_stock, nuslerp, karcher, sce: whole-tensor methods without per-tensor settings
    /// beyond the models' weights.
    Other {
        parameters: Parameters,
        /// Per model: its parameters, its scalar weight.
        models: Vec<(std::collections::BTreeMap<String, Setting>, f64)>,
        has_base: bool,
        num_layers: usize,
    },
}

/// A recipe's method ready to run on tensors ([`Op`]), plus what it counts on the way: the
/// non-finite values (NaN, ±inf) of every merged output tensor, for the manifest.
#[derive(Debug, Clone)]
pub struct Kernel {
    op: Op,
    nonfinite: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Kernel {
    pub fn new(recipe: &Recipe, num_layers: usize) -> Result<Kernel, String> {
        Ok(Kernel {
            op: Op::new(recipe, num_layers)?,
            nonfinite: Arc::default(),
        })
    }

    /// The method.
    pub fn op(&self) -> &Op {
        &self.op
    }

    /// See [`Op::sparsity_report`].
    pub fn sparsity_report(&self) -> Option<serde_json::Value> {
        self.op.sparsity_report()
    }

    /// See [`Op::model_selection`].
    pub fn model_selection(&self) -> Option<ModelScope> {
        self.op.model_selection()
    }

    /// The kernel with the model-wide bands of `scope: "model"` (one per model).
    pub fn with_bands(self, bands: Vec<Band>) -> Kernel {
        Kernel {
            op: self.op.with_bands(bands),
            nonfinite: self.nonfinite,
        }
    }

    /// See [`Op::whole_tensor`].
    pub fn whole_tensor(&self, name: &str) -> bool {
        self.op.whole_tensor(name)
    }

    /// See [`Op::stream`].
    pub fn stream(
        &self,
        name: &str,
        shape: &[u64],
        base_dtype: DType,
    ) -> Option<Box<dyn TensorStream>> {
        self.op.stream(name, shape, base_dtype)
    }

    /// Merge chunk `first..` of a streamed tensor ([`TensorStream::merge`]) and count the
    /// non-finite values written.
    #[allow(clippy::too_many_arguments)]
    pub fn run_stream(
        &self,
        name: &str,
        stream: &dyn TensorStream,
        first: u64,
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        stream.merge(first, inputs, out_dtype, out)?;
        self.count_nonfinite(name, out_dtype, out);
        Ok(())
    }

    fn count_nonfinite(&self, name: &str, out_dtype: DType, out: &[u8]) {
        let bad = count_nonfinite(out_dtype, out);
        if bad > 0 {
            let mut m = self.nonfinite.lock().unwrap_or_else(|p| p.into_inner());
            *m.entry(name.to_string()).or_default() += bad;
        }
    }

    /// Merge one tensor or chunk ([`Op::run`]) and count the non-finite values written.
    pub fn run(
        &self,
        name: &str,
        shape: &[u64],
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        self.op.run(name, shape, inputs, out_dtype, out)?;
        self.count_nonfinite(name, out_dtype, out);
        Ok(())
    }

    /// For the manifest: `{"total": n, "tensors": {name: n}}` over the tensors with any
    /// non-finite output value; `{"total": 0, "tensors": {}}` when there are none.
    pub fn nonfinite_report(&self) -> serde_json::Value {
        let m = self.nonfinite.lock().unwrap_or_else(|p| p.into_inner());
        let total: u64 = m.values().sum();
        serde_json::json!({"total": total, "tensors": *m})
    }
}

/// A model-wide selection's needs: per model `(outliers, density, gamma)`, and the compute
/// dtype of the task vectors (`None`: each tensor's base dtype).
pub type ModelScope = (Vec<(bool, f64, f64)>, Option<DType>);

/// Zero counts of one output tensor of a sparse soup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SparseStats {
    pub elements: u64,
    /// Output elements equal to ±0.
    pub zeros: u64,
    /// Elements where some ingredient is zero and another is not.
    pub mask_mismatch: u64,
}

impl Op {
    /// The sparse soup's report for the manifest: per-tensor and total output sparsity, and
    /// the tensors whose ingredients did not share one zero pattern.
    pub fn sparsity_report(&self) -> Option<serde_json::Value> {
        let Op::SparseSoup { stats, .. } = self else {
            return None;
        };
        let stats = stats.lock().unwrap_or_else(|p| p.into_inner());
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

    pub fn new(recipe: &Recipe, num_layers: usize) -> Result<Op, String> {
        match &recipe.parameters {
            Parameters::SparseSoup {
                require_shared_mask,
                ..
            } => {
                let (weights, divisor) = recipe.linear_weights();
                Ok(Op::SparseSoup {
                    weights,
                    divisor,
                    require_shared_mask: *require_shared_mask,
                    stats: Arc::new(Mutex::new(BTreeMap::new())),
                })
            }
            Parameters::Linear { normalize } => {
                let (weights, divisor) = recipe.linear_weights();
                let settings: Vec<Option<Setting>> = recipe
                    .models
                    .iter()
                    .map(|m| m.parameters.get("weight").cloned())
                    .collect();
                let per_tensor = settings
                    .iter()
                    .any(Option::is_some)
                    .then_some(TensorWeights {
                        settings,
                        normalize: *normalize,
                        num_layers,
                    });
                Ok(Op::Linear {
                    weights,
                    divisor,
                    per_tensor,
                })
            }
            Parameters::Gta {
                normalize,
                rescale,
                lambda,
                seed,
                compute_dtype,
                model_defaults,
                per_row,
                per_model,
            } => {
                let method = recipe
                    .method
                    .gta()
                    .ok_or_else(|| format!("{} is not a GTA method", recipe.method.name()))?;
                Ok(Op::Gta {
                    method,
                    normalize: *normalize,
                    rescale: *rescale,
                    lambda: *lambda,
                    seed: *seed,
                    compute_dtype: *compute_dtype,
                    models: recipe
                        .models
                        .iter()
                        .map(|m| (m.parameters.clone(), m.weight))
                        .collect(),
                    defaults: model_defaults.clone(),
                    num_layers,
                    per_row: *per_row,
                    per_model: *per_model,
                    bands: Arc::new(Vec::new()),
                })
            }
            Parameters::Slerp { t } => Ok(Op::Slerp {
                t: t.clone(),
                num_layers,
            }),
            Parameters::Nearswap { t } => Ok(Op::Nearswap {
                t: t.clone(),
                num_layers,
            }),
            other => Ok(Op::Other {
                parameters: other.clone(),
                models: recipe
                    .models
                    .iter()
                    .map(|m| (m.parameters.clone(), m.weight))
                    .collect(),
                has_base: recipe.base_model.is_some(),
                num_layers,
            }),
        }
    }

    fn gta_params(&self, name: &str) -> Option<(gta::Config, Vec<ModelParams>)> {
        let Op::Gta {
            method,
            normalize,
            rescale,
            lambda,
            seed,
            models,
            defaults,
            num_layers,
            per_row,
            ..
        } = self
        else {
            return None;
        };
        let t = depth(name, *num_layers);
        let models = models
            .iter()
            .map(|(params, weight)| {
                let get = |k: &str| {
                    params
                        .get(k)
                        .and_then(|s| s.eval(name, t))
                        .or_else(|| defaults.get(k).and_then(|s| s.eval(name, t)))
                };
                let d = ModelParams::default();
                ModelParams {
                    weight: params
                        .get("weight")
                        .and_then(|s| s.eval(name, t))
                        .unwrap_or(*weight),
                    density: get("density").unwrap_or(d.density),
                    gamma: get("gamma").unwrap_or(d.gamma),
                    epsilon: get("epsilon").unwrap_or(d.epsilon),
                }
            })
            .collect();
        let cfg = gta::Config {
            sparsification: method.sparsification,
            consensus: method.consensus,
            normalize: *normalize,
            rescale: *rescale,
            lambda: *lambda,
            precision: Precision::F32, // set per tensor from the base's dtype
            seed: *seed,
            per_row: *per_row,
        };
        Some((cfg, models))
    }

    /// `scope: "model"`: per model, `(outliers, density, gamma)` of its model-wide selection
    /// (`outliers`: breadcrumbs' band rather than TIES' top-k), and the compute dtype the task
    /// vectors are rounded to (`None`: each tensor's base dtype). `None` for any other kernel.
    pub fn model_selection(&self) -> Option<ModelScope> {
        let Op::Gta {
            method,
            compute_dtype,
            models,
            defaults,
            per_model: true,
            ..
        } = self
        else {
            return None;
        };
        let outliers = method.sparsification == crate::recipe::Sparsification::MagnitudeOutliers;
        let d = ModelParams::default();
        let per = models
            .iter()
            .map(|(params, _)| {
                let get = |k: &str| {
                    params
                        .get(k)
                        .or_else(|| defaults.get(k))
                        .and_then(|s| s.as_scalar())
                };
                (
                    outliers,
                    get("density").unwrap_or(d.density),
                    get("gamma").unwrap_or(d.gamma),
                )
            })
            .collect();
        Some((per, *compute_dtype))
    }

    /// The kernel with the model-wide bands of `scope: "model"` (one per model).
    pub fn with_bands(mut self, new: Vec<Band>) -> Op {
        if let Op::Gta { bands, .. } = &mut self {
            *bands = Arc::new(new);
        }
        self
    }

    /// Whether tensor `name` needs all of its elements at once (methods not streamed yet).
    pub fn whole_tensor(&self, _name: &str) -> bool {
        match self {
            Op::Linear { .. } | Op::Nearswap { .. } | Op::SparseSoup { .. } | Op::Gta { .. } => {
                false
            }
            // Streamed (see `stream`); whole only for a method without a streamed kernel.
            Op::Slerp { .. } => false,
            Op::Other { parameters, .. } => !matches!(
                parameters,
                Parameters::ModelStock { .. }
                    | Parameters::Nuslerp { .. }
                    | Parameters::Karcher { .. }
                    | Parameters::Sce { .. }
            ),
        }
    }

    /// The streamed merge of tensor `name` (see [`TensorStream`]): its pre-passes, then chunk
    /// by chunk. `None` when the tensor merges with [`Op::run`] (elementwise chunks, or whole).
    pub fn stream(
        &self,
        name: &str,
        shape: &[u64],
        base_dtype: DType,
    ) -> Option<Box<dyn TensorStream>> {
        match self {
            Op::Gta {
                per_model: false,
                compute_dtype,
                ..
            } => {
                let (mut cfg, models) = self.gta_params(name)?;
                cfg.precision = Precision::of(compute_dtype.unwrap_or(base_dtype));
                let n = shape.iter().product::<u64>();
                Some(Box::new(GtaStream::new(
                    cfg,
                    &models,
                    n,
                    row_len(shape),
                    name,
                )))
            }
            Op::Slerp { t, num_layers } => {
                let tv = t.eval(name, depth(name, *num_layers)).unwrap_or(0.5);
                Some(Box::new(SlerpStream::new(tv, Precision::of(base_dtype))))
            }
            Op::Other {
                parameters,
                models,
                has_base,
                num_layers,
            } => {
                let p = Precision::of(base_dtype);
                let cols = cols_of(shape);
                let n = shape.iter().product::<u64>();
                match parameters {
                    Parameters::ModelStock { filter_wise } => {
                        Some(Box::new(ModelStockStream::new(
                            p,
                            *has_base,
                            models.len(),
                            filter_wise.then_some(cols),
                        )))
                    }
                    Parameters::Nuslerp { flatten, row_wise } => {
                        let t = nuslerp_t(models, name, *num_layers);
                        Some(Box::new(NuslerpStream::new(
                            p,
                            t,
                            *has_base,
                            nuslerp_shape(*flatten, *row_wise),
                            cols,
                            n,
                        )))
                    }
                    Parameters::Karcher { max_iter, tol } => Some(Box::new(KarcherStream::new(
                        p,
                        models.len(),
                        *max_iter as usize,
                        *tol,
                    ))),
                    Parameters::Sce { select_topk } => Some(Box::new(SceStream::new(
                        p,
                        *has_base,
                        models.len(),
                        n,
                        *select_topk,
                    ))),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// Merge one tensor (or, for elementwise tensors, one chunk of it) into `out`.
    /// `inputs` are raw little-endian bytes, base first; `shape` is the whole tensor's shape.
    pub fn run(
        &self,
        name: &str,
        shape: &[u64],
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        match self {
            Op::Linear {
                weights,
                divisor,
                per_tensor: None,
            } => linear_raw(inputs, weights, *divisor, out_dtype, out),
            Op::Linear {
                weights,
                per_tensor: Some(pt),
                ..
            } => {
                let (weights, divisor) = pt.for_tensor(name, weights);
                if divisor == Some(0.0) {
                    return Err(MergeError::ZeroWeightSum);
                }
                linear_raw(inputs, &weights, divisor, out_dtype, out)
            }
            Op::Gta { compute_dtype, .. } => {
                let Some((mut cfg, models)) = self.gta_params(name) else {
                    return Ok(());
                };
                let base_dtype = inputs.first().map_or(DType::F32, |(d, _)| *d);
                cfg.precision = Precision::of(compute_dtype.unwrap_or(base_dtype));
                if models.len() + 1 != inputs.len() {
                    return Err(MergeError::WeightCount {
                        inputs: inputs.len(),
                        weights: models.len() + 1,
                    });
                }
                if let Op::Gta {
                    per_model: true,
                    bands,
                    ..
                } = self
                {
                    if bands.len() != models.len() {
                        return Err(MergeError::MissingSelection {
                            bands: bands.len(),
                            models: models.len(),
                        });
                    }
                    let p = cfg.precision;
                    let weights: Vec<f32> = models.iter().map(|m| p.scalar(m.weight)).collect();
                    return map_blocks(inputs, out_dtype, out, |blocks, o| {
                        gta::elementwise_banded(blocks, &weights, bands, &cfg, o)
                    });
                }
                // The whole tensor at once: the streamed kernel over one chunk.
                let n = shape.iter().product::<u64>();
                let mut s = GtaStream::new(cfg, &models, n, row_len(shape), name);
                run_whole(&mut s, inputs, out_dtype, out)
            }
            Op::Slerp { t, num_layers } => {
                let tv = t.eval(name, depth(name, *num_layers)).unwrap_or(0.5);
                let (decoded, mut res) = decode_all(inputs, out_dtype, out)?;
                if decoded.len() != 2 {
                    return Err(MergeError::WeightCount {
                        inputs: decoded.len(),
                        weights: 2,
                    });
                }
                crate::merge::slerp::slerp(tv, &decoded[0], &decoded[1], &mut res);
                // mergekit casts the result to the base tensor's dtype before saving.
                let p = Precision::of(inputs[0].0);
                for x in res.iter_mut() {
                    *x = p.round(*x);
                }
                encode_from_f32(out_dtype, &res, out).map_err(MergeError::from)
            }
            Op::SparseSoup {
                weights,
                divisor,
                require_shared_mask,
                stats,
            } => {
                if weights.len() != inputs.len() {
                    return Err(MergeError::WeightCount {
                        inputs: inputs.len(),
                        weights: weights.len(),
                    });
                }
                let zeros = AtomicU64::new(0);
                let mismatch = AtomicU64::new(0);
                map_blocks(inputs, out_dtype, out, |b, o| {
                    crate::merge::linear(b, weights, *divisor, o);
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
                if *require_shared_mask && mm > 0 {
                    return Err(MergeError::MaskMismatch {
                        elements: mm as usize,
                    });
                }
                let n = (out.len() / out_dtype.size_bytes().max(1)) as u64;
                let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
                let entry = s.entry(name.to_string()).or_default();
                entry.elements += n;
                entry.zeros += zeros.load(Ordering::Relaxed);
                entry.mask_mismatch += mm;
                Ok(())
            }
            Op::Nearswap { t, num_layers } => {
                let tv = t.eval(name, depth(name, *num_layers)).unwrap_or(0.5);
                if inputs.len() != 2 {
                    return Err(MergeError::WeightCount {
                        inputs: inputs.len(),
                        weights: 2,
                    });
                }
                let p = Precision::of(inputs[0].0);
                map_blocks(inputs, out_dtype, out, |b, o| {
                    crate::merge::nearswap::nearswap(p, tv, b[0], b[1], o)
                })
            }
            Op::Other {
                parameters,
                models,
                has_base,
                num_layers,
            } => run_other(
                parameters,
                models,
                *has_base,
                *num_layers,
                name,
                shape,
                inputs,
                out_dtype,
                out,
            ),
        }
    }
}

/// The two dimensions a 2-D view of the tensor has: (rows, last dimension).
fn cols_of(shape: &[u64]) -> usize {
    match shape {
        [] | [_] => shape.iter().product::<u64>().max(1) as usize,
        _ => shape.last().copied().unwrap_or(1).max(1) as usize,
    }
}

#[allow(clippy::too_many_arguments)]
fn run_other(
    parameters: &Parameters,
    models: &[(std::collections::BTreeMap<String, Setting>, f64)],
    has_base: bool,
    num_layers: usize,
    name: &str,
    shape: &[u64],
    inputs: &[(DType, &[u8])],
    out_dtype: DType,
    out: &mut [u8],
) -> Result<(), MergeError> {
    use crate::merge::{model_stock, sce, spherical};
    let first_dtype = inputs.first().map_or(DType::F32, |(d, _)| *d);
    let p = Precision::of(first_dtype);
    let (decoded, mut res) = decode_all(inputs, out_dtype, out)?;
    let want = models.len() + usize::from(has_base);
    if decoded.len() != want {
        return Err(MergeError::WeightCount {
            inputs: decoded.len(),
            weights: want,
        });
    }
    let (base, xs): (Option<&[f32]>, Vec<&[f32]>) = if has_base {
        (
            Some(decoded[0].as_slice()),
            decoded[1..].iter().map(|v| v.as_slice()).collect(),
        )
    } else {
        (None, decoded.iter().map(|v| v.as_slice()).collect())
    };
    let cols = cols_of(shape);
    let needed = match parameters {
        Parameters::Nuslerp { .. } => 2,
        Parameters::ModelStock { .. } => 2,
        _ => 1,
    };
    if xs.len() < needed || (matches!(parameters, Parameters::Nuslerp { .. }) && xs.len() != 2) {
        return Err(MergeError::WeightCount {
            inputs: xs.len(),
            weights: needed,
        });
    }
    match parameters {
        Parameters::ModelStock { filter_wise } => {
            let base = base.unwrap_or(xs[0]);
            let row = if *filter_wise { cols } else { res.len() };
            model_stock::model_stock(p, base, &xs, row, &mut res);
        }
        Parameters::Nuslerp { flatten, row_wise } => {
            let t = nuslerp_t(models, name, num_layers);
            let how = nuslerp_shape(*flatten, *row_wise);
            spherical::nuslerp(p, t, base, xs[0], xs[1], how, cols, &mut res);
        }
        Parameters::Karcher { max_iter, tol } => {
            spherical::karcher(p, &xs, *max_iter as usize, *tol, &mut res);
        }
        Parameters::Sce { select_topk } => {
            let base = base.unwrap_or(xs[0]);
            sce::sce(p, base, &xs, *select_topk, &mut res);
        }
        _ => {}
    }
    encode_from_f32(out_dtype, &res, out).map_err(MergeError::from)
}

/// NuSLERP's `t`: the second model's share of the two weights for this tensor.
fn nuslerp_t(models: &[(BTreeMap<String, Setting>, f64)], name: &str, num_layers: usize) -> f64 {
    let t_depth = depth(name, num_layers);
    let w: Vec<f64> = models
        .iter()
        .map(|(params, w)| {
            params
                .get("weight")
                .and_then(|s| s.eval(name, t_depth))
                .unwrap_or(*w)
        })
        .collect();
    let total = w.iter().sum::<f64>();
    if total.abs() < 1e-6 || w.len() < 2 {
        0.5
    } else {
        w[1] / total
    }
}

fn nuslerp_shape(flatten: bool, row_wise: bool) -> crate::merge::spherical::NuslerpShape {
    use crate::merge::spherical::NuslerpShape;
    match (flatten, row_wise) {
        (true, _) => NuslerpShape::Flatten,
        (false, false) => NuslerpShape::Rows,
        (false, true) => NuslerpShape::Columns,
    }
}

/// DELLA's row: the last dimension (a 0-/1-D tensor is one row).
fn row_len(shape: &[u64]) -> usize {
    match shape {
        [] | [_] => shape.iter().product::<u64>().max(1) as usize,
        _ => shape.last().copied().unwrap_or(1).max(1) as usize,
    }
}

/// Decode every input to f32 (checking lengths) and allocate the f32 result.
#[allow(clippy::type_complexity)]
fn decode_all(
    inputs: &[(DType, &[u8])],
    out_dtype: DType,
    out: &[u8],
) -> Result<(Vec<Vec<f32>>, Vec<f32>), MergeError> {
    if !out_dtype.is_mergeable_float() {
        return Err(crate::merge::DTypeError::NotFloat(out_dtype).into());
    }
    let osz = out_dtype.size_bytes();
    if !out.len().is_multiple_of(osz) {
        return Err(MergeError::OutputLength {
            dtype: out_dtype,
            bytes: out.len(),
        });
    }
    let n = out.len() / osz;
    let mut decoded = Vec::with_capacity(inputs.len());
    for (index, (dtype, bytes)) in inputs.iter().enumerate() {
        if !dtype.is_mergeable_float() {
            return Err(crate::merge::DTypeError::NotFloat(*dtype).into());
        }
        if n.checked_mul(dtype.size_bytes()) != Some(bytes.len()) {
            return Err(MergeError::InputLength {
                index,
                dtype: *dtype,
                expected: n.saturating_mul(dtype.size_bytes()),
                actual: bytes.len(),
                elements: n,
            });
        }
        let mut v = vec![0.0f32; n];
        decode_to_f32(*dtype, bytes, &mut v)?;
        decoded.push(v);
    }
    Ok((decoded, vec![0.0f32; n]))
}

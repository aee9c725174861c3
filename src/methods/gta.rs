//! The generalized-task-arithmetic family (mergekit's `GeneralizedTaskArithmeticMerge`):
//! task arithmetic, TIES, breadcrumbs (± TIES), DARE (linear/TIES) and DELLA (linear/TIES)
//! (ALGORITHMS.md §5–§9). One [`Gta`] value per method: its sparsification, whether it elects
//! signs, and its `normalize`/`rescale` defaults; they share [`GtaConfig`] and the kernel.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    About, BaseRule, Config, Invalid, KernelInput, MergeMethod, ModelScope, Needs, ParseInput,
    Setting, TensorKernel, YamlDtype, common, invalid,
};
use crate::merge::gta::{self, ModelParams};
use crate::merge::precision::Precision;
use crate::merge::radix::Band;
use crate::merge::{DType, MergeError, Sparsification, encode_from_f32, map_blocks};
use crate::methods::setting::depth;

/// One method of the family.
#[derive(Debug)]
pub struct Gta {
    about: About,
    pub sparsification: Sparsification,
    /// TIES sign consensus.
    pub consensus: bool,
    pub default_normalize: bool,
    pub default_rescale: bool,
}

const fn family(
    name: &'static str,
    sparsification: Sparsification,
    consensus: bool,
    default_normalize: bool,
    default_rescale: bool,
) -> Gta {
    Gta {
        about: About {
            weights_required: true,
            yaml_dtype: YamlDtype::Compute,
            ..About::new(name, BaseRule::Required)
        },
        sparsification,
        consensus,
        default_normalize,
        default_rescale,
    }
}

use Sparsification as S;
/// `base + λ Σ w_i (x_i − base)` (§5).
pub const TASK_ARITHMETIC: Gta = family("task_arithmetic", S::None, false, false, false);
/// Trim (top-k magnitude per tensor), elect sign, disjoint mean (§6).
pub const TIES: Gta = family("ties", S::Magnitude, true, true, false);
/// Drop the smallest and the largest-magnitude deltas per tensor (§8).
pub const BREADCRUMBS: Gta = family("breadcrumbs", S::MagnitudeOutliers, false, false, false);
/// Breadcrumbs with TIES sign consensus.
pub const BREADCRUMBS_TIES: Gta =
    family("breadcrumbs_ties", S::MagnitudeOutliers, true, false, false);
/// Random drop with L1 rescale, then task arithmetic (§7).
pub const DARE_LINEAR: Gta = family("dare_linear", S::Random, false, false, true);
/// Random drop with L1 rescale, then TIES sign consensus.
pub const DARE_TIES: Gta = family("dare_ties", S::Random, true, false, true);
/// Magnitude-ranked random drop per row, sign consensus (§9).
pub const DELLA: Gta = family("della", S::DellaMagprune, true, true, true);
/// DELLA without sign consensus.
pub const DELLA_LINEAR: Gta = family("della_linear", S::DellaMagprune, false, false, true);

/// The family's parameters (which method is the recipe's `method`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GtaConfig {
    pub normalize: bool,
    /// L1-norm rescale of each sparsified task vector (mergekit ≥ 2025-02).
    pub rescale: bool,
    pub lambda: f64,
    /// Seed of the keyed generator (DARE, DELLA).
    pub seed: u64,
    /// Precision the arithmetic is rounded to after every step (as torch does on tensors of
    /// that dtype); `None`: the base model's storage dtype, as mergekit without `dtype`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_dtype: Option<DType>,
    /// Per-model parameters given once for all models (`density`, `weight`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub model_defaults: BTreeMap<String, Setting>,
    /// Selection per row (last dimension) instead of per tensor: `scope: "row"`, the
    /// breadcrumbs paper's code (ties, breadcrumbs, breadcrumbs_ties only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_row: bool,
    /// One selection over the whole model per task vector: `scope: "model"`, the TIES paper's
    /// trim (ties, breadcrumbs, breadcrumbs_ties); thresholds from a pre-pass.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_model: bool,
}

impl Config for GtaConfig {
    /// One tag for the whole family (the stored form predates the registry).
    const TAG: &'static str = "gta";
}

impl Gta {
    /// Per-model parameter names.
    fn model_params(&self) -> &'static [&'static str] {
        match self.sparsification {
            S::None => &["weight"],
            S::MagnitudeOutliers => &["weight", "density", "gamma"],
            S::DellaMagprune => &["weight", "density", "epsilon"],
            S::Magnitude | S::Random => &["weight", "density"],
        }
    }

    /// Selects by magnitude (TIES, breadcrumbs): takes `scope`.
    fn selects(&self) -> bool {
        matches!(self.sparsification, S::Magnitude | S::MagnitudeOutliers)
    }

    /// Draws random masks (DARE, DELLA): takes `seed`.
    fn random(&self) -> bool {
        matches!(self.sparsification, S::Random | S::DellaMagprune)
    }

    fn check_model_param(&self, field: &str, key: &str, s: &Setting) -> Result<(), Invalid> {
        use common::check_range;
        match key {
            "density" => check_range(
                field,
                s,
                |d| d > 0.0 && d <= 1.0,
                "density must be in (0, 1]",
            ),
            "gamma" => check_range(
                field,
                s,
                |g| (0.0..1.0).contains(&g),
                "gamma must be in [0, 1)",
            ),
            "epsilon" => check_range(
                field,
                s,
                |e| (0.0..0.5).contains(&e),
                "epsilon must be in [0, 0.5)",
            ),
            "weight" => check_range(
                field,
                s,
                |w| w.abs() <= f64::from(f32::MAX),
                "a weight must be finite and within the range of f32",
            ),
            other => Err(invalid(
                field,
                format!(
                    "unknown parameter {other:?} for method {} (known: {})",
                    self.about.name,
                    self.model_params().join(", ")
                ),
            )),
        }
    }
}

impl MergeMethod for Gta {
    type Config = GtaConfig;

    fn about(&self) -> &About {
        &self.about
    }

    fn parse(&self, cx: &mut ParseInput<'_>) -> Result<GtaConfig, Invalid> {
        let mut c = GtaConfig {
            normalize: self.default_normalize,
            rescale: self.default_rescale,
            lambda: 1.0,
            seed: 0,
            compute_dtype: None,
            model_defaults: BTreeMap::new(),
            per_row: false,
            per_model: false,
        };
        let allowed = self.model_params();
        for (key, value) in cx.params {
            let field = format!("parameters.{key}");
            match key.as_str() {
                "normalize" => c.normalize = common::bool_param(key, value)?,
                // mergekit's `int8_mask` only picks the storage type of the sign-consensus
                // mask (int8 instead of the compute dtype): the results are identical, so it
                // is checked and not stored.
                "int8_mask" => {
                    common::bool_param(key, value)?;
                }
                "rescale" if self.sparsification != S::None => {
                    c.rescale = common::bool_param(key, value)?
                }
                "lambda" => {
                    c.lambda = value
                        .as_f64()
                        .filter(|x| x.is_finite() && x.abs() <= f64::from(f32::MAX))
                        .ok_or_else(|| {
                            invalid(&field, "must be a finite number within f32 range")
                        })?;
                }
                "seed" if self.random() => {
                    c.seed = value
                        .as_u64()
                        .ok_or_else(|| invalid(&field, "must be an integer from 0 to 2^64 − 1"))?;
                }
                "scope" if self.selects() => {
                    (c.per_row, c.per_model) = match value.as_str() {
                        Some("tensor") => (false, false),
                        Some("row") => (true, false),
                        Some("model") => (false, true),
                        _ => {
                            return Err(invalid(&field, "use \"tensor\", \"row\" or \"model\""));
                        }
                    };
                }
                "compute_dtype" => {
                    let d = value
                        .as_str()
                        .and_then(DType::parse_user)
                        .filter(|d| matches!(d, DType::F32 | DType::BF16 | DType::F16));
                    c.compute_dtype =
                        Some(d.ok_or_else(|| invalid(&field, "use float32, float16 or bfloat16"))?);
                }
                k if allowed.contains(&k) => {
                    let s = Setting::from_json(value).map_err(|e| invalid(&field, e))?;
                    self.check_model_param(&field, k, &s)?;
                    c.model_defaults.insert(k.to_string(), s);
                }
                other => {
                    let mut known = vec!["normalize", "lambda", "compute_dtype", "int8_mask"];
                    if self.sparsification != S::None {
                        known.push("rescale");
                    }
                    if self.selects() {
                        known.push("scope");
                    }
                    if self.random() {
                        known.push("seed");
                    }
                    known.extend_from_slice(allowed);
                    return Err(invalid(
                        field,
                        format!(
                            "unknown parameter {other:?} for method {} (known: {})",
                            self.about.name,
                            known.join(", ")
                        ),
                    ));
                }
            }
        }
        for m in cx.models.iter() {
            let i = m.index;
            for (key, s) in &m.parameters {
                self.check_model_param(&format!("models[{i}].parameters.{key}"), key, s)?;
            }
            if c.per_model {
                // One threshold over the whole model needs one density (and gamma) per model.
                for k in ["density", "gamma"] {
                    let own = m.parameters.get(k);
                    let s = own.or_else(|| c.model_defaults.get(k));
                    if s.is_some_and(|s| s.as_scalar().is_none()) {
                        let at = if own.is_some() {
                            format!("models[{i}].parameters.{k}")
                        } else {
                            format!("parameters.{k}")
                        };
                        return Err(invalid(
                            at,
                            "scope \"model\" selects over the whole model: give one number, \
                             not a gradient or filters",
                        ));
                    }
                }
            }
            if self.sparsification == S::DellaMagprune {
                let get = |k: &str| {
                    m.parameters
                        .get(k)
                        .or_else(|| c.model_defaults.get(k))
                        .map(|s| s.anchors())
                };
                let d = ModelParams::default();
                let densities = get("density").unwrap_or_else(|| vec![d.density]);
                let epsilons = get("epsilon").unwrap_or_else(|| vec![d.epsilon]);
                for d in densities.iter().filter(|d| **d < 1.0) {
                    for e in &epsilons {
                        if d - e <= 0.0 || d + e >= 1.0 {
                            return Err(invalid(
                                format!("models[{i}].parameters.epsilon"),
                                format!("density {d} ± epsilon {e} must lie in (0, 1)"),
                            ));
                        }
                    }
                }
            }
        }
        // A global `weight` applies to the models that give none.
        if let Some(w) = c.model_defaults.get("weight") {
            for m in cx.models.iter_mut().filter(|m| !m.weight_given) {
                match w.as_scalar() {
                    Some(x) => m.weight = x,
                    None => {
                        m.parameters.insert("weight".into(), w.clone());
                    }
                }
            }
        }
        Ok(c)
    }

    fn kernel(
        &self,
        config: &GtaConfig,
        cx: &KernelInput<'_>,
    ) -> Result<Box<dyn TensorKernel>, String> {
        let defaults = &config.model_defaults;
        let param = |own: &BTreeMap<String, Setting>, k: &str| Param {
            own: own.get(k).cloned(),
            default: defaults.get(k).cloned(),
        };
        let models = cx
            .models
            .iter()
            .map(|m| GtaModel {
                weight: m.weight,
                weight_setting: m.parameters.get("weight").cloned(),
                density: param(m.parameters, "density"),
                gamma: param(m.parameters, "gamma"),
                epsilon: param(m.parameters, "epsilon"),
            })
            .collect();
        Ok(Box::new(GtaKernel {
            sparsification: self.sparsification,
            consensus: self.consensus,
            normalize: config.normalize,
            rescale: config.rescale,
            lambda: config.lambda,
            seed: config.seed,
            compute_dtype: config.compute_dtype,
            models,
            num_layers: cx.num_layers,
            per_row: config.per_row,
            per_model: config.per_model,
            bands: Vec::new(),
        }))
    }
}

/// A per-model parameter: the model's own setting, else the global one (a setting that gives
/// nothing for a tensor, such as an unmatched filter list, falls through to the global one).
#[derive(Debug, Clone)]
struct Param {
    own: Option<Setting>,
    default: Option<Setting>,
}

impl Param {
    fn eval(&self, name: &str, t: f64) -> Option<f64> {
        self.own
            .as_ref()
            .and_then(|s| s.eval(name, t))
            .or_else(|| self.default.as_ref().and_then(|s| s.eval(name, t)))
    }

    /// The one number of a model-wide selection (the own setting wins when given).
    fn scalar(&self) -> Option<f64> {
        self.own
            .as_ref()
            .or(self.default.as_ref())
            .and_then(Setting::as_scalar)
    }
}

/// One model's parameters, typed.
#[derive(Debug, Clone)]
struct GtaModel {
    /// The scalar weight.
    weight: f64,
    /// A weight that varies by tensor (gradient or filters), overriding `weight` where it
    /// gives a value.
    weight_setting: Option<Setting>,
    density: Param,
    gamma: Param,
    epsilon: Param,
}

#[derive(Debug, Clone)]
pub struct GtaKernel {
    sparsification: Sparsification,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    lambda: f64,
    seed: u64,
    compute_dtype: Option<DType>,
    models: Vec<GtaModel>,
    num_layers: usize,
    per_row: bool,
    /// `scope: "model"`: per model, the band of magnitudes kept over the whole model (set from
    /// the engine's pre-pass); the merge then streams elementwise.
    per_model: bool,
    bands: Vec<Band>,
}

impl GtaKernel {
    /// The kernel's settings and every model's parameters for tensor `name`.
    fn params(&self, name: &str) -> (gta::Config, Vec<ModelParams>) {
        let t = depth(name, self.num_layers);
        let d = ModelParams::default();
        let models = self
            .models
            .iter()
            .map(|m| ModelParams {
                weight: m
                    .weight_setting
                    .as_ref()
                    .and_then(|s| s.eval(name, t))
                    .unwrap_or(m.weight),
                density: m.density.eval(name, t).unwrap_or(d.density),
                gamma: m.gamma.eval(name, t).unwrap_or(d.gamma),
                epsilon: m.epsilon.eval(name, t).unwrap_or(d.epsilon),
            })
            .collect();
        let cfg = gta::Config {
            sparsification: self.sparsification,
            consensus: self.consensus,
            normalize: self.normalize,
            rescale: self.rescale,
            lambda: self.lambda,
            precision: Precision::F32, // set per tensor from the base's dtype
            seed: self.seed,
            per_row: self.per_row,
        };
        (cfg, models)
    }
}

impl TensorKernel for GtaKernel {
    fn needs(&self, name: &str) -> Needs {
        if self.per_model {
            return Needs::Nothing;
        }
        let (cfg, models) = self.params(name);
        if models.iter().all(|m| cfg.sparsify_is_noop(m)) {
            Needs::Nothing
        } else {
            Needs::Tensor
        }
    }

    fn run(
        &self,
        name: &str,
        shape: &[u64],
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        let (mut cfg, models) = self.params(name);
        let base_dtype = inputs.first().map_or(DType::F32, |(d, _)| *d);
        cfg.precision = Precision::of(self.compute_dtype.unwrap_or(base_dtype));
        if models.len() + 1 != inputs.len() {
            return Err(MergeError::WeightCount {
                inputs: inputs.len(),
                weights: models.len() + 1,
            });
        }
        if self.per_model {
            if self.bands.len() != models.len() {
                return Err(MergeError::MissingSelection {
                    bands: self.bands.len(),
                    models: models.len(),
                });
            }
            let p = cfg.precision;
            let weights: Vec<f32> = models.iter().map(|m| p.scalar(m.weight)).collect();
            return map_blocks(inputs, out_dtype, out, |blocks, o| {
                gta::elementwise_banded(blocks, &weights, &self.bands, &cfg, o)
            });
        }
        if models.iter().all(|m| cfg.sparsify_is_noop(m)) {
            let p = cfg.precision;
            let weights: Vec<f32> = models.iter().map(|m| p.scalar(m.weight)).collect();
            return map_blocks(inputs, out_dtype, out, |blocks, o| {
                gta::elementwise(blocks, &weights, &cfg, o)
            });
        }
        let (decoded, mut res) = common::decode_all(inputs, out_dtype, out)?;
        let row_len = common::row_len(shape);
        let xs: Vec<&[f32]> = decoded[1..].iter().map(|v| v.as_slice()).collect();
        gta::merge_tensor(&decoded[0], &xs, &models, &cfg, row_len, name, &mut res);
        encode_from_f32(out_dtype, &res, out).map_err(MergeError::from)
    }

    fn stream(
        &self,
        name: &str,
        shape: &[u64],
        base_dtype: DType,
    ) -> Option<Box<dyn crate::merge::stream::TensorStream>> {
        if self.per_model {
            return None;
        }
        let (mut cfg, models) = self.params(name);
        cfg.precision = Precision::of(self.compute_dtype.unwrap_or(base_dtype));
        let n = shape.iter().product::<u64>();
        Some(Box::new(crate::merge::gta_stream::GtaStream::new(
            cfg,
            &models,
            n,
            common::row_len(shape),
            name,
        )))
    }

    /// `scope: "model"`: per model, `(outliers, density, gamma)` of its model-wide selection
    /// (`outliers`: breadcrumbs' band rather than TIES' top-k), and the compute dtype the task
    /// vectors are rounded to (`None`: each tensor's base dtype).
    fn model_selection(&self) -> Option<ModelScope> {
        if !self.per_model {
            return None;
        }
        let outliers = self.sparsification == S::MagnitudeOutliers;
        let d = ModelParams::default();
        let per = self
            .models
            .iter()
            .map(|m| {
                (
                    outliers,
                    m.density.scalar().unwrap_or(d.density),
                    m.gamma.scalar().unwrap_or(d.gamma),
                )
            })
            .collect();
        Some((per, self.compute_dtype))
    }

    fn set_bands(&mut self, bands: Vec<Band>) {
        self.bands = bands;
    }
}

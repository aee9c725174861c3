//! Merge methods: one module per method (the generalized-task-arithmetic family shares
//! [`gta`]), each implementing [`MergeMethod`], and [`REGISTRY`], the one list of them.
//!
//! A method says, in one place: its name and what it takes ([`About`]: base-model rule,
//! whether every model needs a weight, trajectories, slices, what mergekit's YAML `dtype`
//! means for it); how its global and per-model parameters parse into its typed [`Config`]
//! (every error naming the field); and the [`TensorKernel`] it runs per tensor, including what
//! that kernel needs before it can stream a tensor ([`Needs`]). Parameters reach kernels typed:
//! the only string lookups are in the methods' parse functions.
//!
//! **Adding a method**: a new file here with a type implementing [`MergeMethod`] (its config
//! struct implementing [`Config`]), its `mod` line below and one line in [`REGISTRY`]. Nothing
//! else in ladle lists methods: the request validation, the mergekit YAML translation,
//! trajectories, the stored recipe and the engine all ask the registry.
//!
//! Layering: below `recipe` (which stores a [`Method`] and its [`Parameters`]) and above the
//! pure kernels of [`crate::merge`].

pub mod arcee_fusion;
pub mod common;
pub mod ema;
pub mod gta;
pub mod karcher;
pub mod linear;
pub mod lora;
pub mod lora_extract;
pub mod model_stock;
pub mod multislerp;
pub mod nearswap;
pub mod nuslerp;
pub mod passthrough;
pub mod ram;
pub mod ramplus_tl;
pub mod sce;
pub mod setting;
pub mod slerp;
pub mod sparse_soup;

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::merge::radix::Band;
use crate::merge::{DType, MergeError};
pub use setting::Setting;

/// Every merge method, in the order error messages list them.
pub static REGISTRY: &[&dyn DynMethod] = &[
    &linear::Linear,
    &gta::TASK_ARITHMETIC,
    &gta::TIES,
    &gta::BREADCRUMBS,
    &gta::BREADCRUMBS_TIES,
    &gta::DARE_LINEAR,
    &gta::DARE_TIES,
    &gta::DELLA,
    &gta::DELLA_LINEAR,
    &slerp::Slerp,
    &model_stock::ModelStock,
    &nuslerp::Nuslerp,
    &karcher::Karcher,
    &sce::Sce,
    &passthrough::Passthrough,
    &nearswap::Nearswap,
    &sparse_soup::SparseSoup,
    &ema::Ema,
    &multislerp::Multislerp,
    &arcee_fusion::ArceeFusion,
    &ram::Ram,
    &ramplus_tl::RamPlusTl,
    &lora::Lora,
    &lora_extract::LoraExtract,
];

/// Whether a method takes a base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseRule {
    Required,
    Optional,
    Forbidden,
}

/// What mergekit YAML's `dtype` means for a method, besides the cast on load every method
/// gets (`input_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YamlDtype {
    /// Also the compute dtype (the task-arithmetic family: `compute_dtype`).
    Compute,
    /// The linear family: it accumulates in float32 whatever the inputs (only the cast).
    AccumulatesF32,
    /// The method computes in its inputs' dtype, i.e. the cast one (only the cast).
    Inputs,
}

/// What a method is and takes, apart from its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct About {
    /// The name recipes use (`method`, mergekit's `merge_method`).
    pub name: &'static str,
    pub base: BaseRule,
    /// Every model needs a weight (unless a global `weight` gives one to all).
    pub weights_required: bool,
    /// Can take a training run's folder instead of `models` (a plain, ordered list of models
    /// with no base and no per-model roles).
    pub trajectory: bool,
    /// Takes `slices` (layer ranges of several models), and lays out its own tensors.
    pub slices: bool,
    pub yaml_dtype: YamlDtype,
    /// The dtype the method writes when the request names none (`None`: each tensor's own).
    /// mergekit's `arcee_fusion` and `ramplus_tl` return float32 tensors from bf16 inputs.
    pub output_dtype: Option<DType>,
}

impl About {
    /// A method with a base rule and every other property at its default (no required weights,
    /// no trajectory, no slices, YAML `dtype` = the inputs' dtype).
    pub const fn new(name: &'static str, base: BaseRule) -> About {
        About {
            name,
            base,
            weights_required: false,
            trajectory: false,
            slices: false,
            yaml_dtype: YamlDtype::Inputs,
            output_dtype: None,
        }
    }
}

/// A field-named validation failure of a method's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

/// A [`Invalid`] for `field`.
pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// One model of a request, as a method's parser sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEntry {
    /// Position in the request's `models` (for field names).
    pub index: usize,
    /// The scalar weight (1 when none was given; a method may set it, as `ema` does).
    pub weight: f64,
    /// The request gave this model a weight (`weight` or `parameters.weight`).
    pub weight_given: bool,
    /// Per-model parameters other than a scalar weight.
    pub parameters: BTreeMap<String, Setting>,
}

/// What a method's parser gets: the global parameters as sent and the models (without the
/// base), whose weights and per-model parameters it may complete.
pub struct ParseInput<'a> {
    pub params: &'a serde_json::Map<String, serde_json::Value>,
    pub models: &'a mut [ModelEntry],
    pub has_base: bool,
    /// The request gave `slices`.
    pub has_slices: bool,
}

impl ParseInput<'_> {
    /// Some model was given a weight.
    pub fn any_weight(&self) -> bool {
        self.models.iter().any(|m| m.weight_given)
    }
}

/// One model as a kernel is built from it (the stored recipe's ingredient).
#[derive(Debug, Clone, Copy)]
pub struct ModelInput<'a> {
    pub weight: f64,
    pub parameters: &'a BTreeMap<String, Setting>,
}

/// What a kernel is built from, besides the method's config.
#[derive(Debug, Clone)]
pub struct KernelInput<'a> {
    /// The models in recipe order (without the base).
    pub models: Vec<ModelInput<'a>>,
    pub has_base: bool,
    /// Layers of the first input (gradients interpolate over them).
    pub num_layers: usize,
}

impl KernelInput<'_> {
    /// The scalar weights as the kernels use them.
    pub fn weights_f32(&self) -> Vec<f32> {
        self.models.iter().map(|m| m.weight as f32).collect()
    }
}

/// What a kernel needs of a tensor before it can merge it chunk by chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Nothing: elementwise, every chunk on its own.
    Nothing,
    /// A statistic over the whole tensor (top-k, norms, ranks, an L1 rescale): today the
    /// tensor is merged whole, in f32.
    Tensor,
}

/// A model-wide selection's needs (`scope: "model"`): per model `(outliers, density, gamma)`,
/// and the compute dtype of the task vectors (`None`: each tensor's base dtype).
pub type ModelScope = (Vec<(bool, f64, f64)>, Option<DType>);

/// A method ready to run on tensors. Inputs arrive base first (when the recipe has one), then
/// the models in recipe order.
pub trait TensorKernel: Send + Sync + fmt::Debug {
    /// What tensor `name` needs before streaming ([`Needs`]).
    fn needs(&self, name: &str) -> Needs;

    /// Merge one tensor (or, when [`Needs::Nothing`], one chunk of it) into `out`. `inputs`
    /// are raw little-endian bytes, base first; `shape` is the whole tensor's shape.
    fn run(
        &self,
        name: &str,
        shape: &[u64],
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError>;

    /// The streamed merge of tensor `name` (whose base is `base_dtype`): pre-passes over the
    /// tensor's chunks for the statistics it needs, then chunk by chunk
    /// ([`crate::merge::stream::TensorStream`]). `None`: the engine calls [`Self::run`] as
    /// [`Self::needs`] says.
    fn stream(
        &self,
        _name: &str,
        _shape: &[u64],
        _base_dtype: DType,
    ) -> Option<Box<dyn crate::merge::stream::TensorStream>> {
        None
    }

    /// A statistic over the whole model the engine computes before the merge (a pre-pass over
    /// every merged tensor): `Some` for `scope: "model"` selections.
    fn model_selection(&self) -> Option<ModelScope> {
        None
    }

    /// Receive the pre-pass's result: per model, the band of magnitudes kept.
    fn set_bands(&mut self, _bands: Vec<Band>) {}

    /// What the method reports in the manifest (`sparsity` for sparse soups).
    fn report(&self) -> Option<serde_json::Value> {
        None
    }
}

/// A method's validated parameters: serialized into the stored recipe as `parameters`,
/// `{"method": TAG, ...fields}`.
pub trait Config:
    Serialize + DeserializeOwned + fmt::Debug + Clone + PartialEq + Send + Sync + 'static
{
    /// The `method` tag of the stored form (several methods may share one config).
    const TAG: &'static str;
}

/// What one method module implements.
pub trait MergeMethod: Send + Sync + 'static {
    type Config: Config;

    fn about(&self) -> &About;

    /// Validate the global parameters (`cx.params`) and the models' own; complete the models
    /// (weights) where the method defines them.
    fn parse(&self, cx: &mut ParseInput<'_>) -> Result<Self::Config, Invalid>;

    /// The kernel for a validated config.
    fn kernel(
        &self,
        config: &Self::Config,
        cx: &KernelInput<'_>,
    ) -> Result<Box<dyn TensorKernel>, String>;
}

/// [`MergeMethod`] without its config type, as [`REGISTRY`] holds it (implemented for every
/// [`MergeMethod`]).
pub trait DynMethod: Send + Sync {
    fn info(&self) -> &About;
    /// The stored `parameters.method` tag of this method's config.
    fn config_tag(&self) -> &'static str;
    fn load_parameters(&self, v: serde_json::Value) -> Result<Parameters, serde_json::Error>;
    fn parse_parameters(&self, cx: &mut ParseInput<'_>) -> Result<Parameters, Invalid>;
    fn build_kernel(
        &self,
        p: &Parameters,
        cx: &KernelInput<'_>,
    ) -> Result<Box<dyn TensorKernel>, String>;
}

impl<M: MergeMethod> DynMethod for M {
    fn info(&self) -> &About {
        self.about()
    }

    fn config_tag(&self) -> &'static str {
        M::Config::TAG
    }

    fn load_parameters(&self, v: serde_json::Value) -> Result<Parameters, serde_json::Error> {
        serde_json::from_value::<M::Config>(v).map(Parameters::new)
    }

    fn parse_parameters(&self, cx: &mut ParseInput<'_>) -> Result<Parameters, Invalid> {
        self.parse(cx).map(Parameters::new)
    }

    fn build_kernel(
        &self,
        p: &Parameters,
        cx: &KernelInput<'_>,
    ) -> Result<Box<dyn TensorKernel>, String> {
        let config = p.get::<M::Config>().ok_or_else(|| {
            format!(
                "method {} got parameters of kind {:?}",
                self.about().name,
                p.tag()
            )
        })?;
        self.kernel(config, cx)
    }
}

/// A merge method: a handle into [`REGISTRY`], stored in a recipe as its name.
#[derive(Clone, Copy)]
pub struct Method(&'static dyn DynMethod);

impl Method {
    /// A handle on a method of [`REGISTRY`] (for the code that names one method).
    pub const fn of(method: &'static dyn DynMethod) -> Method {
        Method(method)
    }

    /// The method named `name`.
    pub fn parse(name: &str) -> Option<Method> {
        REGISTRY
            .iter()
            .find(|m| m.info().name == name)
            .map(|m| Method(*m))
    }

    /// Every method, in registry order.
    pub fn all() -> impl Iterator<Item = Method> {
        REGISTRY.iter().map(|m| Method(*m))
    }

    /// The registered names, comma-separated (for messages).
    pub fn names() -> String {
        REGISTRY
            .iter()
            .map(|m| m.info().name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn about(self) -> &'static About {
        self.0.info()
    }

    pub fn name(self) -> &'static str {
        self.0.info().name
    }

    pub fn base_rule(self) -> BaseRule {
        self.0.info().base
    }

    /// Validate a request's parameters into this method's config.
    pub fn parse_parameters(self, cx: &mut ParseInput<'_>) -> Result<Parameters, Invalid> {
        self.0.parse_parameters(cx)
    }

    /// The kernel for `parameters` (which must be this method's).
    pub fn kernel(
        self,
        parameters: &Parameters,
        cx: &KernelInput<'_>,
    ) -> Result<Box<dyn TensorKernel>, String> {
        self.0.build_kernel(parameters, cx)
    }
}

impl PartialEq for Method {
    fn eq(&self, other: &Method) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Method {}

impl fmt::Debug for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Method {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Method {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Method, D::Error> {
        let name = String::deserialize(d)?;
        Method::parse(&name)
            .ok_or_else(|| D::Error::custom(format!("unknown merge method {name:?}")))
    }
}

/// A method's config without its type (what [`Parameters`] holds).
trait DynConfig: Send + Sync + fmt::Debug {
    fn tag(&self) -> &'static str;
    fn stored(&self) -> serde_json::Result<Box<serde_json::value::RawValue>>;
    fn as_any(&self) -> &dyn Any;
}

/// The stored form: the tag first, then the config's fields in declaration order.
#[derive(Serialize)]
struct Tagged<'a, C> {
    method: &'static str,
    #[serde(flatten)]
    config: &'a C,
}

impl<C: Config> DynConfig for C {
    fn tag(&self) -> &'static str {
        C::TAG
    }

    fn stored(&self) -> serde_json::Result<Box<serde_json::value::RawValue>> {
        serde_json::value::to_raw_value(&Tagged {
            method: C::TAG,
            config: self,
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A method's validated parameters (its [`Config`]), stored as `{"method": TAG, ...}`.
#[derive(Clone)]
pub struct Parameters(Arc<dyn DynConfig>);

impl Parameters {
    pub fn new<C: Config>(config: C) -> Parameters {
        Parameters(Arc::new(config))
    }

    /// The config, if it is a `C`.
    pub fn get<C: Config>(&self) -> Option<&C> {
        self.0.as_any().downcast_ref::<C>()
    }

    /// The stored `method` tag.
    pub fn tag(&self) -> &'static str {
        self.0.tag()
    }

    fn stored_text(&self) -> Option<String> {
        self.0.stored().ok().map(|r| r.get().to_string())
    }
}

impl fmt::Debug for Parameters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl PartialEq for Parameters {
    fn eq(&self, other: &Parameters) -> bool {
        self.tag() == other.tag() && self.stored_text() == other.stored_text()
    }
}

impl Serialize for Parameters {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        self.0.stored().map_err(S::Error::custom)?.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Parameters {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Parameters, D::Error> {
        let mut map = serde_json::Map::deserialize(d)?;
        let tag = match map.remove("method") {
            Some(serde_json::Value::String(s)) => s,
            _ => return Err(D::Error::missing_field("method")),
        };
        let method = REGISTRY
            .iter()
            .find(|m| m.config_tag() == tag)
            .ok_or_else(|| D::Error::custom(format!("unknown parameters kind {tag:?}")))?;
        method
            .load_parameters(serde_json::Value::Object(map))
            .map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_parse_back() {
        let names: Vec<&str> = Method::all().map(Method::name).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "{names:?}");
        for m in Method::all() {
            assert_eq!(Method::parse(m.name()), Some(m));
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(serde_json::from_str::<Method>(&json).unwrap(), m);
        }
        assert!(Method::parse("soup").is_none());
    }

    #[test]
    fn stored_parameters_read_back() {
        let p = Parameters::new(linear::LinearConfig { normalize: false });
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, r#"{"method":"linear","normalize":false}"#);
        let back: Parameters = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
        assert_eq!(
            back.get::<linear::LinearConfig>().map(|c| c.normalize),
            Some(false)
        );
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["normalize"], false);
        assert!(serde_json::from_str::<Parameters>(r#"{"method":"linear","x":1}"#).is_err());
        assert!(serde_json::from_str::<Parameters>(r#"{"method":"nope"}"#).is_err());
    }
}

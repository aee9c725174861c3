//! PEFT LoRA adapter folders: `adapter_config.json` + `adapter_model.safetensors`, as peft's
//! `save_pretrained` writes them (peft 0.21.2; `../shared/conformance-lora/README.md`).
//!
//! [`AdapterConfig::parse`] reads the config (refusing DoRA, IA3 and every other `peft_type` by
//! name); [`Adapter::build`] matches the adapter's tensors against the base checkpoint's
//! (names, ranks, shapes) and says, per base tensor, what a fold does to it ([`Touch`]).
//! Everything here is checked before anything is written; every failure is an
//! [`AdapterError`] (code `invalid_adapter`) naming the file and the field. Messages never
//! quote a refused adapter's bytes (tensor names, config keys and values, JSON parser text):
//! tensors are named by position, pattern entries by number, and the detail goes to the log.
//!
//! Tensor names: `base_model.model.<module>.lora_A.weight` `(r, in)` and `.lora_B.weight`
//! `(out, r)` for a Linear; `.lora_embedding_A` `(r, num_embeddings)` / `.lora_embedding_B`
//! `(dim, r)` for an Embedding; `base_model.model.<module>.base_layer.weight`, a copy of an
//! embedding's weight that peft's fold uses instead of the base's; any other
//! `base_model.model.<tensor>` is a `modules_to_save` replacement of that base tensor.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use object_store::ObjectStore;
use serde::Deserialize;
use serde::de::{MapAccess, Visitor};

use super::reader::Checkpoint;
use crate::error::ErrorCode;
use crate::merge::DType;

/// The config file of an adapter folder.
pub const ADAPTER_CONFIG_NAME: &str = "adapter_config.json";
/// The tensor file of an adapter folder.
pub const ADAPTER_WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// Largest `adapter_config.json` read.
pub const MAX_ADAPTER_CONFIG_LEN: u64 = 1 << 20;

const PREFIX: &str = "base_model.model.";

/// A refused adapter: the file and the field at fault, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LoRA adapter {file}: {field}: {message}")]
pub struct AdapterError {
    /// The file (URL or path) at fault.
    pub file: String,
    /// The config field or tensor name.
    pub field: String,
    pub message: String,
}

impl AdapterError {
    pub fn new(file: &str, field: impl Into<String>, message: impl Into<String>) -> AdapterError {
        AdapterError {
            file: file.to_string(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// Like [`AdapterError::new`], with `detail` (which may quote the refused files) logged.
    pub fn logged(
        file: &str,
        field: impl Into<String>,
        message: impl Into<String>,
        detail: &dyn fmt::Debug,
    ) -> AdapterError {
        let e = AdapterError::new(file, field, message);
        tracing::warn!(file = %e.file, field = %e.field, message = %e.message, ?detail, "adapter refused");
        e
    }

    pub fn code(&self) -> ErrorCode {
        ErrorCode::InvalidAdapter
    }
}

/// The `peft_type`s peft knows: a refusal may name one of these (ladle's list, not the
/// file's bytes); anything else is "an unknown type".
const PEFT_TYPES: [&str; 27] = [
    "PROMPT_TUNING",
    "MULTITASK_PROMPT_TUNING",
    "P_TUNING",
    "PREFIX_TUNING",
    "ADALORA",
    "BOFT",
    "ADAPTION_PROMPT",
    "IA3",
    "LOHA",
    "LOKR",
    "OFT",
    "POLY",
    "LN_TUNING",
    "VERA",
    "FOURIERFT",
    "XLORA",
    "HRA",
    "VBLORA",
    "CPT",
    "BONE",
    "RANDLORA",
    "TRAINABLE_TOKENS",
    "C3A",
    "SHIRA",
    "MISS",
    "ROAD",
    "GRALORA",
];

/// A JSON object's entries in document order (peft's `rank_pattern`: the first matching key
/// wins, in the dict's order).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ordered<T>(pub Vec<(String, T)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Ordered<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Ordered<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Ordered(Vec::new()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, T>()? {
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// `target_modules`: a list of names (suffix match at a dot) or one regular expression (full
/// match).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Regex(String),
}

/// The fields of `adapter_config.json` ladle reads (peft writes many more; they are ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AdapterConfig {
    #[serde(default)]
    pub peft_type: Option<String>,
    pub r: u64,
    pub lora_alpha: f64,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub rank_pattern: Ordered<u64>,
    #[serde(default)]
    pub alpha_pattern: Ordered<f64>,
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Ignored, as peft ignores it for `nn.Linear` (it forces it to false).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub lora_bias: bool,
    #[serde(default)]
    pub target_parameters: Option<serde_json::Value>,
    /// The whole config as read (a merged adapter's config starts from the first one's).
    #[serde(skip)]
    pub raw: serde_json::Map<String, serde_json::Value>,
}

/// `re.match(rf"(.*\.)?({key})$", module)`, peft's `get_pattern_key`.
fn pattern_matches(key: &str, module: &str) -> bool {
    regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).is_ok_and(|re| re.is_match(module))
}

impl AdapterConfig {
    /// Parse and check `adapter_config.json` (`file` names it in errors).
    pub fn parse(bytes: &[u8], file: &str) -> Result<AdapterConfig, AdapterError> {
        let raw: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
            let what = crate::checkpoint::header::json_what(&e);
            AdapterError::logged(file, ADAPTER_CONFIG_NAME, what, &e.to_string())
        })?;
        let obj = raw.as_object().ok_or_else(|| {
            AdapterError::new(file, ADAPTER_CONFIG_NAME, "expected a JSON object")
        })?;
        // The adapter type first: another type's config has other fields.
        match obj.get("peft_type") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::String(t)) if t == "LORA" => {}
            Some(serde_json::Value::String(t)) => {
                let kind = match PEFT_TYPES.iter().find(|k| **k == t.as_str()) {
                    Some(k) => format!("{k} adapters are"),
                    None => "an unknown adapter type is".to_string(),
                };
                return Err(AdapterError::logged(
                    file,
                    "peft_type",
                    format!("{kind} not supported (only LoRA: peft_type \"LORA\")"),
                    t,
                ));
            }
            Some(other) => {
                return Err(AdapterError::logged(
                    file,
                    "peft_type",
                    "expected a string",
                    other,
                ));
            }
        }
        if obj.get("use_dora") == Some(&serde_json::Value::Bool(true)) {
            return Err(AdapterError::new(
                file,
                "use_dora",
                "DoRA adapters are not supported (their fold needs the weight norms)",
            ));
        }
        for (field, what) in [("r", "a positive integer"), ("lora_alpha", "a number")] {
            if !obj.contains_key(field) {
                return Err(AdapterError::new(file, field, format!("missing ({what})")));
            }
        }
        let mut config: AdapterConfig = serde_json::from_value(raw.clone()).map_err(|e| {
            let msg = e.to_string();
            let field = [
                "rank_pattern",
                "alpha_pattern",
                "target_modules",
                "modules_to_save",
            ]
            .into_iter()
            .chain(["r", "lora_alpha", "use_rslora", "lora_bias"])
            .find(|f| msg.contains(&format!("`{f}`")))
            .unwrap_or(ADAPTER_CONFIG_NAME);
            AdapterError::logged(file, field, "has the wrong type or value", &msg)
        })?;
        config.raw = obj.clone();
        if config.r == 0 {
            return Err(AdapterError::new(file, "r", "must be a positive integer"));
        }
        if !config.lora_alpha.is_finite() {
            return Err(AdapterError::new(file, "lora_alpha", "must be finite"));
        }
        if config.lora_bias {
            return Err(AdapterError::new(
                file,
                "lora_bias",
                "LoRA biases are not supported",
            ));
        }
        if config
            .target_parameters
            .as_ref()
            .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(AdapterError::new(
                file,
                "target_parameters",
                "adapters on parameters (not modules) are not supported",
            ));
        }
        for (i, (k, r)) in config.rank_pattern.0.iter().enumerate() {
            if *r == 0 {
                return Err(AdapterError::logged(
                    file,
                    "rank_pattern",
                    format!("entry {}: must be a positive integer", i + 1),
                    k,
                ));
            }
        }
        for (field, keys) in [
            (
                "rank_pattern",
                config
                    .rank_pattern
                    .0
                    .iter()
                    .map(|(k, _)| k)
                    .collect::<Vec<_>>(),
            ),
            (
                "alpha_pattern",
                config.alpha_pattern.0.iter().map(|(k, _)| k).collect(),
            ),
        ] {
            for (i, k) in keys.into_iter().enumerate() {
                if regex::Regex::new(k).is_err() {
                    return Err(AdapterError::logged(
                        file,
                        field,
                        format!("entry {}: not a valid regular expression", i + 1),
                        k,
                    ));
                }
            }
        }
        if let Some(TargetModules::Regex(re)) = &config.target_modules
            && regex::Regex::new(re).is_err()
        {
            return Err(AdapterError::logged(
                file,
                "target_modules",
                "not a valid regular expression",
                re,
            ));
        }
        Ok(config)
    }

    /// The rank of `module` (`rank_pattern`, else `r`).
    pub fn rank_of(&self, module: &str) -> u64 {
        self.rank_pattern
            .0
            .iter()
            .find(|(k, _)| pattern_matches(k, module))
            .map_or(self.r, |(_, r)| *r)
    }

    /// The alpha of `module` (`alpha_pattern`, else `lora_alpha`).
    pub fn alpha_of(&self, module: &str) -> f64 {
        self.alpha_pattern
            .0
            .iter()
            .find(|(k, _)| pattern_matches(k, module))
            .map_or(self.lora_alpha, |(_, a)| *a)
    }

    /// peft's scaling of `module`, in double: `alpha/r`, or `alpha/√r` with rsLoRA.
    pub fn scaling_of(&self, module: &str) -> f64 {
        let r = self.rank_of(module) as f64;
        let alpha = self.alpha_of(module);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    /// Whether `target_modules` names `module`.
    pub fn targets(&self, module: &str) -> bool {
        match &self.target_modules {
            None => false,
            Some(TargetModules::List(list)) => list
                .iter()
                .any(|t| t == "all-linear" || module == t || module.ends_with(&format!(".{t}"))),
            Some(TargetModules::Regex(re)) => {
                regex::Regex::new(&format!("^(?:{re})$")).is_ok_and(|re| re.is_match(module))
            }
        }
    }

    /// Whether `modules_to_save` names the module of `tensor` (peft's raw suffix test).
    pub fn saves(&self, module: &str) -> bool {
        self.modules_to_save
            .iter()
            .flatten()
            .any(|m| module.ends_with(m.as_str()))
    }
}

/// The kind of a LoRA'd module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    /// `nn.Linear`: delta `B @ A`, shape `(out, in)`.
    Linear,
    /// `nn.Embedding`: delta `(B @ A)^T`, shape `(num_embeddings, dim)`.
    Embedding,
}

/// One LoRA'd module of an adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    /// The module path (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    pub kind: ModuleKind,
    /// Adapter tensor names.
    pub a: String,
    pub b: String,
    pub rank: u64,
    pub alpha: f64,
    /// `alpha/r` or `alpha/√r`, in double (peft's `scaling[adapter]`).
    pub scaling: f64,
    /// The base weight's replacement in the adapter file (`<module>.base_layer.weight`).
    pub weight_from_adapter: Option<String>,
}

/// What a fold does to one base tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Touch {
    /// Adds the module's `s·B·A`.
    Lora(LoraModule),
    /// Replaced by this adapter tensor (`modules_to_save`), unchanged.
    Replace(String),
}

/// An adapter matched against its base: per base tensor name (`….weight`), what a fold does.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    pub config: AdapterConfig,
    pub touched: BTreeMap<String, Touch>,
}

/// A tensor's dtype and shape, as [`Adapter::build`] checks them.
pub type Meta<'a> = (DType, &'a [u64]);

impl Adapter {
    /// Match the adapter's tensors (`tensors`: its safetensors header) against the base's
    /// (`base`). `file` names the tensor file in errors. Refuses unknown tensor kinds, DoRA
    /// magnitudes, a missing A or B, a rank that is not the config's, shapes that do not fit
    /// the base, modules `target_modules` does not name or the base does not hold.
    pub fn build<'a>(
        config: AdapterConfig,
        tensors: impl IntoIterator<Item = (&'a str, Meta<'a>)>,
        base: &dyn Fn(&str) -> Option<Meta<'a>>,
        file: &str,
    ) -> Result<Adapter, AdapterError> {
        // Tensors are named by their position in the file (in name order), never by name:
        // the names are the refused file's bytes (they go to the log).
        let mut pos: BTreeMap<&'a str, usize> = BTreeMap::new();
        let nth = |pos: &BTreeMap<&'a str, usize>, name: &str| {
            let i = pos.get(name).copied().unwrap_or(0);
            format!("tensor {i} of {ADAPTER_WEIGHTS_NAME} (in name order)")
        };
        let err = |field: &str, message: String, detail: &dyn fmt::Debug| {
            AdapterError::logged(file, field, message, detail)
        };
        let mut a_of: BTreeMap<String, (String, ModuleKind, Meta<'a>)> = BTreeMap::new();
        let mut b_of: BTreeMap<String, (String, ModuleKind, Meta<'a>)> = BTreeMap::new();
        let mut base_layer: BTreeMap<String, (String, Meta<'a>)> = BTreeMap::new();
        let mut replace: BTreeMap<String, (String, Meta<'a>)> = BTreeMap::new();
        for (name, meta) in tensors {
            let at = pos.len() + 1;
            pos.insert(name, at);
            let this = nth(&pos, name);
            let Some(rest) = name.strip_prefix(PREFIX) else {
                return Err(err(
                    "tensors",
                    format!("{this}: tensor names of a PEFT adapter start with {PREFIX:?}"),
                    &name,
                ));
            };
            let lora = [
                (".lora_A.weight", true, ModuleKind::Linear),
                (".lora_B.weight", false, ModuleKind::Linear),
                (".lora_embedding_A", true, ModuleKind::Embedding),
                (".lora_embedding_B", false, ModuleKind::Embedding),
            ]
            .into_iter()
            .find_map(|(suffix, is_a, kind)| {
                rest.strip_suffix(suffix)
                    .map(|m| (m.to_string(), is_a, kind))
            });
            if let Some((module, is_a, kind)) = lora {
                if !meta.0.is_mergeable_float() {
                    return Err(err(
                        "tensors",
                        format!("{this}: a lora_A or lora_B tensor that is not a float"),
                        &(name, meta.0),
                    ));
                }
                let into = if is_a { &mut a_of } else { &mut b_of };
                into.insert(module, (name.to_string(), kind, meta));
            } else if let Some(module) = rest.strip_suffix(".base_layer.weight") {
                base_layer.insert(module.to_string(), (name.to_string(), meta));
            } else if rest.contains("lora_magnitude_vector") {
                return Err(err(
                    "tensors",
                    format!("{this}: a DoRA magnitude vector: DoRA adapters are not supported"),
                    &name,
                ));
            } else if rest.contains(".lora_") || rest.contains("ia3_") {
                return Err(err(
                    "tensors",
                    format!(
                        "{this}: not a tensor of a plain LoRA adapter (lora_A / lora_B / \
                         lora_embedding_A / lora_embedding_B)"
                    ),
                    &name,
                ));
            } else {
                replace.insert(rest.to_string(), (name.to_string(), meta));
            }
        }
        let mut touched = BTreeMap::new();
        for (module, (b_name, _, _)) in &b_of {
            if !a_of.contains_key(module) {
                return Err(err(
                    "lora_A",
                    format!("missing: the lora_B {} has no lora_A", nth(&pos, b_name)),
                    module,
                ));
            }
        }
        for (module, (a_name, kind, a_meta)) in &a_of {
            let this = nth(&pos, a_name);
            let Some((b_name, b_kind, b_meta)) = b_of.get(module) else {
                return Err(err(
                    "lora_B",
                    format!("missing: the lora_A {this} has no lora_B"),
                    module,
                ));
            };
            if b_kind != kind {
                return Err(err(
                    "tensors",
                    format!(
                        "{this} and {}: lora_A and lora_B of different kinds",
                        nth(&pos, b_name)
                    ),
                    module,
                ));
            }
            if !config.targets(module) {
                return Err(err(
                    "target_modules",
                    format!(
                        "the module of {this} has LoRA tensors but target_modules does not name it"
                    ),
                    module,
                ));
            }
            let weight_name = format!("{module}.weight");
            let Some((_, base_shape)) = base(&weight_name) else {
                return Err(err(
                    "target_modules",
                    format!(
                        "the module of {this} is not in the base model: the adapter was trained \
                         on another architecture"
                    ),
                    &weight_name,
                ));
            };
            let rank = config.rank_of(module);
            let (a_shape, b_shape) = (a_meta.1, b_meta.1);
            if a_shape.len() != 2 || b_shape.len() != 2 {
                return Err(err(
                    "tensors",
                    format!("{this}: lora_A and lora_B must be matrices"),
                    &(a_shape, b_shape),
                ));
            }
            if a_shape[0] != rank || b_shape[1] != rank {
                return Err(err(
                    "r",
                    format!(
                        "the rank of the tensors of {this} (lora_A and its lora_B) is not the one \
                         the config gives their module (r / rank_pattern)"
                    ),
                    &(module, rank, a_shape, b_shape),
                ));
            }
            // (out, in) of a Linear; (num_embeddings, dim) of an Embedding.
            let want = match kind {
                ModuleKind::Linear => [b_shape[0], a_shape[1]],
                ModuleKind::Embedding => [a_shape[1], b_shape[0]],
            };
            if base_shape != want {
                return Err(err(
                    "tensors",
                    format!(
                        "{this}: lora_A and its lora_B make a delta whose shape is not the base \
                         weight's"
                    ),
                    &(a_shape, b_shape, &weight_name, base_shape),
                ));
            }
            let weight_from_adapter = match base_layer.remove(module) {
                Some((name, (dtype, shape))) => {
                    if shape != base_shape || !dtype.is_mergeable_float() {
                        return Err(err(
                            "tensors",
                            format!(
                                "{}: a base_layer copy whose shape or dtype does not fit the base \
                                 weight",
                                nth(&pos, &name)
                            ),
                            &(&name, shape, dtype, base_shape),
                        ));
                    }
                    Some(name)
                }
                None => None,
            };
            let alpha = config.alpha_of(module);
            touched.insert(
                weight_name,
                Touch::Lora(LoraModule {
                    module: module.clone(),
                    kind: *kind,
                    a: a_name.clone(),
                    b: b_name.clone(),
                    rank,
                    alpha,
                    scaling: config.scaling_of(module),
                    weight_from_adapter,
                }),
            );
        }
        if let Some((module, (name, _))) = base_layer.into_iter().next() {
            return Err(err(
                "tensors",
                format!(
                    "{}: a base_layer copy of a module that has no LoRA tensors",
                    nth(&pos, &name)
                ),
                &module,
            ));
        }
        for (tensor, (name, (dtype, shape))) in replace {
            let this = nth(&pos, &name);
            let module = tensor.strip_suffix(".weight").unwrap_or(&tensor);
            if !config.saves(module) {
                return Err(err(
                    "modules_to_save",
                    format!(
                        "{this} replaces a base tensor, but modules_to_save does not name its module"
                    ),
                    &name,
                ));
            }
            match base(&tensor) {
                Some((bd, bs))
                    if bs == shape && bd.is_mergeable_float() == dtype.is_mergeable_float() => {}
                Some((_, bs)) => {
                    return Err(err(
                        "tensors",
                        format!(
                            "{this}: its shape or dtype does not fit the base tensor it replaces"
                        ),
                        &(&name, shape, dtype, bs),
                    ));
                }
                None => {
                    return Err(err(
                        "modules_to_save",
                        format!("{this}: the base model has no tensor it could replace"),
                        &(&name, &tensor),
                    ));
                }
            }
            if touched.contains_key(&tensor) {
                return Err(err(
                    "tensors",
                    format!("{this} replaces a base tensor that a LoRA module also changes"),
                    &(&name, &tensor),
                ));
            }
            touched.insert(tensor, Touch::Replace(name));
        }
        if touched.is_empty() {
            return Err(AdapterError::new(
                file,
                ADAPTER_WEIGHTS_NAME,
                "holds no LoRA tensors",
            ));
        }
        Ok(Adapter { config, touched })
    }

    /// The largest rank (peft's `max(r, *rank_pattern.values())`).
    pub fn max_rank(&self) -> u64 {
        self.config
            .rank_pattern
            .0
            .iter()
            .map(|(_, r)| *r)
            .fold(self.config.r, u64::max)
    }

    /// The LoRA modules, by base tensor name.
    pub fn modules(&self) -> impl Iterator<Item = (&String, &LoraModule)> {
        self.touched.iter().filter_map(|(k, t)| match t {
            Touch::Lora(m) => Some((k, m)),
            Touch::Replace(_) => None,
        })
    }
}

/// An adapter attached to a checkpoint (a model entry with `lora`): the checkpoint reads as the
/// fold `W + s·B·A` (see `engine::fold`).
#[derive(Debug, Clone)]
pub struct Attached {
    /// The adapter folder's URL (for messages and the manifest).
    pub url: String,
    pub adapter: Adapter,
    /// `adapter_model.safetensors`, opened.
    pub file: Checkpoint,
    pub store: Arc<dyn ObjectStore>,
    /// The dtype the fold is computed in and read as (the base loaded in it; `None`: each
    /// tensor's stored dtype).
    pub dtype: Option<DType>,
}

impl PartialEq for Attached {
    fn eq(&self, other: &Attached) -> bool {
        self.url == other.url && self.dtype == other.dtype && self.adapter == other.adapter
    }
}

impl Eq for Attached {}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Result<AdapterConfig, AdapterError> {
        AdapterConfig::parse(json.as_bytes(), "a/adapter_config.json")
    }

    #[test]
    fn patterns_match_as_peft() {
        let c = config(
            r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"rank_pattern":{"layers.1.mlp.down_proj":2,"v_proj":6},
               "alpha_pattern":{"model.layers.0.self_attn.q_proj":16,"o_proj":2},
               "target_modules":["down_proj","q_proj"]}"#,
        )
        .unwrap();
        assert_eq!(c.rank_of("model.layers.1.mlp.down_proj"), 2);
        assert_eq!(c.rank_of("model.layers.0.mlp.down_proj"), 4);
        assert_eq!(c.rank_of("model.layers.0.self_attn.v_proj"), 6);
        assert_eq!(c.alpha_of("model.layers.0.self_attn.q_proj"), 16.0);
        assert_eq!(c.alpha_of("model.layers.1.self_attn.q_proj"), 8.0);
        assert_eq!(c.scaling_of("model.layers.0.self_attn.v_proj"), 8.0 / 6.0);
        assert!(c.targets("model.layers.0.mlp.down_proj"));
        assert!(!c.targets("model.layers.0.mlp.xdown_proj"));
        let rs =
            config(r#"{"r":16,"lora_alpha":8,"use_rslora":true,"target_modules":"(.*q_proj)"}"#)
                .unwrap();
        assert_eq!(rs.scaling_of("x.q_proj"), 2.0);
        assert!(rs.targets("model.q_proj") && !rs.targets("model.k_proj"));
    }

    #[test]
    fn refuses_other_types_by_name() {
        let e = config(r#"{"peft_type":"IA3","target_modules":["k_proj"]}"#).unwrap_err();
        assert_eq!(e.field, "peft_type");
        assert!(e.message.contains("IA3"), "{e}");
        // A type peft does not know is not quoted back.
        let e = config(r#"{"peft_type":"SECRET-7f3a"}"#).unwrap_err();
        assert_eq!(e.field, "peft_type");
        assert!(!e.to_string().contains("SECRET"), "{e}");
        let e = config(r#"{"r":2,"lora_alpha":8,"rank_pattern":{"SECRET-7f3a":0}}"#).unwrap_err();
        assert_eq!(e.field, "rank_pattern");
        assert!(!e.to_string().contains("SECRET"), "{e}");
        let e = config(r#"{"r":"SECRET-7f3a","lora_alpha":8}"#).unwrap_err();
        assert!(e.message.contains("wrong type"), "{e}");
        assert!(!e.to_string().contains("SECRET"), "{e}");
        let e = config(r#"{"SECRET-7f3a": [1,"#).unwrap_err();
        assert!(!e.to_string().contains("SECRET"), "{e}");
        let e = config(r#"{"peft_type":"LORA","r":8,"lora_alpha":8,"use_dora":true}"#).unwrap_err();
        assert_eq!(e.field, "use_dora");
        assert!(e.to_string().contains("DoRA"));
        assert_eq!(config(r#"{"lora_alpha":8}"#).unwrap_err().field, "r");
        assert_eq!(config(r#"{"r":0,"lora_alpha":8}"#).unwrap_err().field, "r");
        assert_eq!(config("[]").unwrap_err().field, ADAPTER_CONFIG_NAME);
    }

    #[test]
    fn build_checks_names_ranks_and_shapes() {
        let c =
            config(r#"{"r":2,"lora_alpha":4,"target_modules":["q"],"modules_to_save":["head"]}"#)
                .unwrap();
        let (a, b, w, h) = ([2u64, 3], [4u64, 2], [4u64, 3], [5u64, 3]);
        let base = |n: &str| match n {
            "m.q.weight" => Some((DType::BF16, &w[..])),
            "head.weight" => Some((DType::BF16, &h[..])),
            _ => None,
        };
        let ok = Adapter::build(
            c.clone(),
            [
                ("base_model.model.m.q.lora_A.weight", (DType::F32, &a[..])),
                ("base_model.model.m.q.lora_B.weight", (DType::F32, &b[..])),
                ("base_model.model.head.weight", (DType::BF16, &h[..])),
            ],
            &base,
            "f",
        )
        .unwrap();
        assert_eq!(ok.touched.len(), 2);
        assert!(matches!(&ok.touched["m.q.weight"], Touch::Lora(m) if m.scaling == 2.0));
        let missing_b = Adapter::build(
            c.clone(),
            [("base_model.model.m.q.lora_A.weight", (DType::F32, &a[..]))],
            &base,
            "f",
        )
        .unwrap_err();
        assert!(missing_b.field.contains("lora_B"), "{missing_b}");
        assert!(
            missing_b
                .message
                .contains("tensor 1 of adapter_model.safetensors"),
            "{missing_b}"
        );
        assert!(!missing_b.to_string().contains("m.q"), "{missing_b}");
        let wrong = [3u64, 3];
        let bad_shape = Adapter::build(
            c,
            [
                ("base_model.model.m.q.lora_A.weight", (DType::F32, &a[..])),
                (
                    "base_model.model.m.q.lora_B.weight",
                    (DType::F32, &wrong[..]),
                ),
            ],
            &base,
            "f",
        )
        .unwrap_err();
        assert_eq!(bad_shape.field, "r", "{bad_shape}");
    }
}

//! Parameter values as mergekit writes them: a number, a gradient (a list of anchors
//! interpolated across layer depth), or a list of tensor-name filters, the first match winning.
//!
//! Evaluation follows mergekit 0.1.5's `evaluate_setting`: a gradient `[a_0 … a_m]` at depth
//! `t ∈ [0, 1]` gives `(1 − f)·a_i + f·a_{i+1}` with `s = t·m`, `i = ⌊s⌋`, `f = s − i` (in f64);
//! a filter list returns the value of the first rule whose `filter` is absent, `"*"`, or a
//! substring of the tensor name; no match gives `None` (the parameter's default applies).
//! ladle's extension: a rule may give `name` instead of `filter`, matching exactly one tensor
//! name (a per-tensor coefficient table, e.g. a learned soup's, cannot then match a second
//! tensor whose name contains the first, as `filter` would).

use serde::{Deserialize, Serialize};

/// Most anchors in a gradient, and most rules in a filter list.
pub const MAX_SETTING_LIST: usize = 1024;

/// A number or a gradient (no filters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Scalar(f64),
    Gradient(Vec<f64>),
}

/// One rule of a filter list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FilterRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// An exact tensor name (never with `filter`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub value: Value,
}

/// A validated parameter value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Setting {
    Scalar(f64),
    Gradient(Vec<f64>),
    Filters(Vec<FilterRule>),
}

impl Value {
    fn eval(&self, t: f64) -> f64 {
        match self {
            Value::Scalar(x) => *x,
            Value::Gradient(v) => gradient(v, t),
        }
    }

    fn values(&self) -> Vec<f64> {
        match self {
            Value::Scalar(x) => vec![*x],
            Value::Gradient(v) => v.clone(),
        }
    }
}

/// mergekit's piecewise-linear interpolation (`v` is never empty after validation).
fn gradient(v: &[f64], t: f64) -> f64 {
    let Some(last) = v.len().checked_sub(1) else {
        return 0.0;
    };
    let scaled = t * last as f64;
    let i0 = (scaled as usize).min(last);
    let i1 = (i0 + 1).min(last);
    let frac = scaled - i0 as f64;
    (1.0 - frac) * v[i0] + frac * v[i1]
}

impl Setting {
    /// The value for tensor `name` at layer depth `t` (0 for tensors outside the layers).
    pub fn eval(&self, name: &str, t: f64) -> Option<f64> {
        match self {
            Setting::Scalar(x) => Some(*x),
            Setting::Gradient(v) => Some(gradient(v, t)),
            Setting::Filters(rules) => rules
                .iter()
                .find(|r| match (r.name.as_deref(), r.filter.as_deref()) {
                    (Some(exact), _) => name == exact,
                    (None, None | Some("*")) => true,
                    (None, Some(f)) => name.contains(f),
                })
                .map(|r| r.value.eval(t)),
        }
    }

    /// Every number the setting can produce at an anchor (for range checks): interpolation
    /// stays between anchors, so checking anchors checks every value.
    pub fn anchors(&self) -> Vec<f64> {
        match self {
            Setting::Scalar(x) => vec![*x],
            Setting::Gradient(v) => v.clone(),
            Setting::Filters(rules) => rules.iter().flat_map(|r| r.value.values()).collect(),
        }
    }

    /// The scalar, when the setting is one.
    pub fn as_scalar(&self) -> Option<f64> {
        match self {
            Setting::Scalar(x) => Some(*x),
            _ => None,
        }
    }

    /// Parse a JSON value; `Err` is a message for the field.
    pub fn from_json(v: &serde_json::Value) -> Result<Setting, String> {
        match v {
            serde_json::Value::Number(_) => Ok(Setting::Scalar(number(v)?)),
            serde_json::Value::Array(items) => {
                if items.is_empty() {
                    return Err("an empty list has no value".into());
                }
                if items.len() > MAX_SETTING_LIST {
                    return Err(format!("at most {MAX_SETTING_LIST} entries"));
                }
                if items.iter().all(|i| i.is_number()) {
                    let v = items.iter().map(number).collect::<Result<Vec<_>, _>>()?;
                    return Ok(Setting::Gradient(v));
                }
                let mut rules = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let obj = item.as_object().ok_or_else(|| {
                        format!(
                            "[{i}]: expected a number (a gradient) or {{\"filter\", \"value\"}}"
                        )
                    })?;
                    let mut filter = None;
                    let mut exact = None;
                    let mut value = None;
                    for (k, x) in obj {
                        match k.as_str() {
                            "filter" => {
                                filter = Some(
                                    x.as_str()
                                        .ok_or_else(|| format!("[{i}].filter: expected a string"))?
                                        .to_string(),
                                );
                            }
                            "name" => {
                                exact = Some(
                                    x.as_str()
                                        .filter(|n| !n.is_empty())
                                        .ok_or_else(|| {
                                            format!("[{i}].name: expected a tensor name")
                                        })?
                                        .to_string(),
                                );
                            }
                            "value" => {
                                value = Some(
                                    match Setting::from_json(x)
                                        .map_err(|e| format!("[{i}].value: {e}"))?
                                    {
                                        Setting::Scalar(s) => Value::Scalar(s),
                                        Setting::Gradient(g) => Value::Gradient(g),
                                        Setting::Filters(_) => {
                                            return Err(format!(
                                                "[{i}].value: filters cannot be nested"
                                            ));
                                        }
                                    },
                                );
                            }
                            other => return Err(format!("[{i}]: unknown key {other:?}")),
                        }
                    }
                    let value = value.ok_or_else(|| format!("[{i}]: missing \"value\""))?;
                    if filter.is_some() && exact.is_some() {
                        return Err(format!(
                            "[{i}]: give \"filter\" (a substring) or \"name\" (an exact tensor \
                             name), not both"
                        ));
                    }
                    if let Some(n) = &exact
                        && rules
                            .iter()
                            .any(|r: &FilterRule| r.name.as_ref() == Some(n))
                    {
                        return Err(format!("[{i}].name: {n:?} is given twice"));
                    }
                    rules.push(FilterRule {
                        filter,
                        name: exact,
                        value,
                    });
                }
                Ok(Setting::Filters(rules))
            }
            other => Err(format!(
                "expected a number, a list of numbers or a list of filters, got {other}"
            )),
        }
    }
}

fn number(v: &serde_json::Value) -> Result<f64, String> {
    v.as_f64()
        .filter(|x| x.is_finite())
        .ok_or_else(|| format!("expected a finite number, got {v}"))
}

/// Layer index of a tensor name (`model.layers.7.mlp…` → 7), if it lies in a layer.
pub fn layer_index(name: &str) -> Option<usize> {
    let mut parts = name.split('.');
    while let Some(p) = parts.next() {
        if matches!(p, "layers" | "h" | "blocks" | "layer")
            && let Some(n) = parts.clone().next().and_then(|n| n.parse().ok())
        {
            return Some(n);
        }
    }
    None
}

/// mergekit's depth `t` of a tensor: `layer / (num_layers − 1)` inside the layers (1 when there
/// is a single layer), 0 outside them.
pub fn depth(name: &str, num_layers: usize) -> f64 {
    match layer_index(name) {
        Some(i) if num_layers > 1 => i as f64 / (num_layers - 1) as f64,
        Some(_) => 1.0,
        None => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn gradients_and_filters_as_mergekit() {
        let s = Setting::from_json(&json!([
            {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
            {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
            {"value": 0.5}
        ]))
        .unwrap();
        let n = "model.layers.0.self_attn.q_proj.weight";
        assert_eq!(s.eval(n, 0.0), Some(0.0));
        assert_eq!(s.eval(n, 1.0), Some(1.0));
        // t = 0.375 → scaled 1.5 → halfway between 0.5 and 0.3.
        assert!((s.eval(n, 0.375).unwrap() - 0.4).abs() < 1e-12);
        assert_eq!(s.eval("model.layers.1.mlp.up_proj.weight", 1.0), Some(0.0));
        assert_eq!(s.eval("model.embed_tokens.weight", 0.0), Some(0.5));
        let only = Setting::from_json(&json!([{"filter": "mlp", "value": 1}])).unwrap();
        assert_eq!(only.eval("lm_head.weight", 0.0), None);
        assert!(Setting::from_json(&json!([])).is_err());
        assert!(Setting::from_json(&json!("x")).is_err());
        assert!(Setting::from_json(&json!([{"value": [{"value": 1}]}])).is_err());
        assert!(Setting::from_json(&json!([{"value": 1, "x": 2}])).is_err());
    }

    #[test]
    fn exact_names_match_one_tensor_only() {
        let s = Setting::from_json(&json!([
            {"name": "model.layers.1.mlp.weight", "value": 0.25},
            {"name": "model.layers.11.mlp.weight", "value": 0.75},
            {"filter": "mlp", "value": 0.5}
        ]))
        .unwrap();
        assert_eq!(s.eval("model.layers.1.mlp.weight", 0.0), Some(0.25));
        assert_eq!(s.eval("model.layers.11.mlp.weight", 0.0), Some(0.75));
        // A substring filter "layers.1.mlp" would also have matched layers.11: a name does not.
        assert_eq!(s.eval("model.layers.1.mlp.weight.extra", 0.0), Some(0.5));
        assert_eq!(s.eval("lm_head.weight", 0.0), None);
        assert!(Setting::from_json(&json!([{"name": "a", "filter": "a", "value": 1}])).is_err());
        assert!(Setting::from_json(&json!([{"name": "", "value": 1}])).is_err());
        assert!(
            Setting::from_json(&json!([{"name": "a", "value": 1}, {"name": "a", "value": 2}]))
                .is_err()
        );
        // The stored form round-trips.
        let back: Setting = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn depth_of_names() {
        assert_eq!(layer_index("model.layers.12.mlp.weight"), Some(12));
        assert_eq!(layer_index("model.norm.weight"), None);
        assert_eq!(depth("model.layers.1.x", 2), 1.0);
        assert_eq!(depth("model.layers.1.x", 3), 0.5);
        assert_eq!(depth("model.layers.0.x", 1), 1.0);
        assert_eq!(depth("lm_head.weight", 3), 0.0);
    }
}

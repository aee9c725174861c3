//! Helpers the method modules share: parameter checks (errors naming the field) and the
//! whole-tensor decoding of the methods that need a statistic over a tensor.

use super::{Invalid, ModelEntry, ParseInput, Setting, invalid};
use crate::merge::precision::Precision;
use crate::merge::{DType, DTypeError, MergeError, decode_to_f32};

/// `parameters.<key>` as a boolean.
pub fn bool_param(key: &str, v: &serde_json::Value) -> Result<bool, Invalid> {
    v.as_bool()
        .ok_or_else(|| invalid(format!("parameters.{key}"), "must be true or false"))
}

/// Every anchor of `s` satisfies `ok` (interpolation stays between anchors).
pub fn check_range(
    field: &str,
    s: &Setting,
    ok: impl Fn(f64) -> bool,
    what: &str,
) -> Result<(), Invalid> {
    match s.anchors().into_iter().find(|x| !ok(*x)) {
        Some(bad) => Err(invalid(field, format!("{bad} is out of range: {what}"))),
        None => Ok(()),
    }
}

/// The first model with a per-model parameter, as `(field, key)`.
pub fn first_model_param(models: &[ModelEntry]) -> Option<String> {
    models.iter().find_map(|m| {
        m.parameters
            .keys()
            .next()
            .map(|key| format!("models[{}].parameters.{key}", m.index))
    })
}

/// A `t`-like setting given globally: parsed, named in errors as `parameters.<key>`.
pub fn setting_param(key: &str, v: &serde_json::Value) -> Result<Setting, Invalid> {
    Setting::from_json(v).map_err(|e| invalid(format!("parameters.{key}"), e))
}

/// The two dimensions a 2-D view of the tensor has: the last dimension (a 0-/1-D tensor is
/// one row). DELLA's row, model_stock's filter, nuslerp's row or column length.
pub fn row_len(shape: &[u64]) -> usize {
    match shape {
        [] | [_] => shape.iter().product::<u64>().max(1) as usize,
        _ => shape.last().copied().unwrap_or(1).max(1) as usize,
    }
}

/// Decode every input to f32 (checking lengths) and allocate the f32 result.
#[allow(clippy::type_complexity)]
pub fn decode_all(
    inputs: &[(DType, &[u8])],
    out_dtype: DType,
    out: &[u8],
) -> Result<(Vec<Vec<f32>>, Vec<f32>), MergeError> {
    if !out_dtype.is_mergeable_float() {
        return Err(DTypeError::NotFloat(out_dtype).into());
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
            return Err(DTypeError::NotFloat(*dtype).into());
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

/// `inputs.len() == want`, else the kernel's count error.
pub fn expect_inputs(got: usize, want: usize) -> Result<(), MergeError> {
    if got == want {
        Ok(())
    } else {
        Err(MergeError::WeightCount {
            inputs: got,
            weights: want,
        })
    }
}

/// Per-model parameters only among `model_keys` (model_stock, nuslerp, karcher, sce).
pub fn check_model_keys(
    name: &str,
    cx: &ParseInput<'_>,
    model_keys: &[&str],
) -> Result<(), Invalid> {
    for m in cx.models.iter() {
        if let Some(key) = m
            .parameters
            .keys()
            .find(|k| !model_keys.contains(&k.as_str()))
        {
            return Err(invalid(
                format!("models[{}].parameters.{key}", m.index),
                format!("unknown per-model parameter for method {name}"),
            ));
        }
    }
    Ok(())
}

/// The global parameters, each given to `set` with its field name; `set` answers `Ok(false)`
/// for a name the method does not know (then the error lists `known`).
pub fn parse_globals(
    name: &str,
    cx: &ParseInput<'_>,
    known: &[&str],
    mut set: impl FnMut(&str, &serde_json::Value, &str) -> Result<bool, Invalid>,
) -> Result<(), Invalid> {
    for (key, value) in cx.params {
        let field = format!("parameters.{key}");
        if !set(key, value, &field)? {
            return Err(invalid(
                field,
                format!(
                    "unknown parameter {key:?} for method {name} (known: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
    }
    Ok(())
}

/// `models` satisfies the method's count (`what` says what it needs).
pub fn check_count(name: &str, cx: &ParseInput<'_>, ok: bool, what: &str) -> Result<(), Invalid> {
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "models",
            format!("{name} needs {what} ({} given)", cx.models.len()),
        ))
    }
}

/// A whole tensor decoded for a method over `models` models (plus the base when `has_base`):
/// the inputs' precision (the first input's dtype), the decoded inputs and the f32 result.
/// Fails unless there are `models` (+ base) inputs and at least `needed` models (exactly
/// `needed` when `exact`).
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub fn decode_models(
    inputs: &[(DType, &[u8])],
    out_dtype: DType,
    out: &[u8],
    models: usize,
    has_base: bool,
    needed: usize,
    exact: bool,
) -> Result<(Precision, Vec<Vec<f32>>, Vec<f32>), MergeError> {
    let first_dtype = inputs.first().map_or(DType::F32, |(d, _)| *d);
    let p = Precision::of(first_dtype);
    let (decoded, res) = decode_all(inputs, out_dtype, out)?;
    expect_inputs(decoded.len(), models + usize::from(has_base))?;
    let xs = decoded.len() - usize::from(has_base);
    if xs < needed || (exact && xs != needed) {
        return Err(MergeError::WeightCount {
            inputs: xs,
            weights: needed,
        });
    }
    Ok((p, decoded, res))
}

/// The base (when there is one) and the models of [`decode_models`]'s inputs.
pub fn split_base(decoded: &[Vec<f32>], has_base: bool) -> (Option<&[f32]>, Vec<&[f32]>) {
    if has_base {
        (
            Some(decoded[0].as_slice()),
            decoded[1..].iter().map(|v| v.as_slice()).collect(),
        )
    } else {
        (None, decoded.iter().map(|v| v.as_slice()).collect())
    }
}

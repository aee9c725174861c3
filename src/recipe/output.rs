//! The `output` part of a request: folder URL, dtype, shard size; and the check that it lies
//! apart from every input.

use super::{Output, OutputSpec, RecipeError};
use crate::merge::DType;

/// Default output shard size (Hugging Face's default is 5 GB; we pick the same).
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;
/// Smallest accepted shard size (below it, file counts explode).
pub const MIN_SHARD_SIZE: u64 = 1024;

/// A float dtype a recipe names (`field` for the error).
pub fn float_dtype(s: &str, field: &str) -> Result<DType, RecipeError> {
    DType::parse_user(s)
        .filter(|d| d.is_mergeable_float())
        .ok_or_else(|| {
            RecipeError::invalid(
                field,
                format!("unknown or unsupported dtype {s:?} (use float32, float16 or bfloat16)"),
            )
        })
}

pub fn parse_output(spec: &OutputSpec) -> Result<Output, RecipeError> {
    if spec.uri.trim().is_empty() {
        return Err(RecipeError::invalid("output.uri", "must not be empty"));
    }
    if spec.uri.ends_with(".safetensors") {
        return Err(RecipeError::invalid(
            "output.uri",
            "the output is a folder URL, not a .safetensors file",
        ));
    }
    let dtype = spec
        .dtype
        .as_deref()
        .map(|s| float_dtype(s, "output.dtype"))
        .transpose()?;
    let max_shard_size = match &spec.max_shard_size {
        None => DEFAULT_MAX_SHARD_SIZE,
        Some(v) => parse_size(v).ok_or_else(|| {
            RecipeError::invalid(
                "output.max_shard_size",
                format!("expected a size such as \"2GB\", \"500MB\" or a byte count, got {v}"),
            )
        })?,
    };
    if max_shard_size < MIN_SHARD_SIZE {
        return Err(RecipeError::invalid(
            "output.max_shard_size",
            format!("must be at least {MIN_SHARD_SIZE} bytes"),
        ));
    }
    Ok(Output {
        uri: spec.uri.clone(),
        dtype,
        max_shard_size,
        overwrite: spec.overwrite,
        copy_tokenizer: spec.copy_tokenizer.unwrap_or(true),
        write_model_card: spec.write_model_card.unwrap_or(true),
        tokenizer_source: None,
        chat_template: None,
        tokenizer: None,
    })
}

/// `"2GB"` (10⁹, as Hugging Face), `"2GiB"` (2³⁰), `"500MB"`, `"1.5GB"`, or a byte count.
pub fn parse_size(v: &serde_json::Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let s = v.as_str()?.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = num * mult;
    (0.0..1e18).contains(&bytes).then_some(bytes as u64)
}

/// Whether two URLs are the same location or one lies inside the other (textually, after
/// trimming trailing slashes). Checked on the raw URLs here and again on resolved ones.
pub fn same_or_nested(a: &str, b: &str) -> bool {
    let a = a.trim_end_matches('/');
    let b = b.trim_end_matches('/');
    a == b || a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/"))
}

/// The output must not be, contain or lie inside any input (`inputs`: field name, URL).
pub fn check_apart<'a>(
    output: &str,
    inputs: impl IntoIterator<Item = (String, &'a str)>,
) -> Result<(), RecipeError> {
    for (field, uri) in inputs {
        if same_or_nested(uri, output) {
            return Err(RecipeError::invalid(
                "output.uri",
                format!("the output must not be, contain or lie inside an input ({field})"),
            ));
        }
    }
    Ok(())
}

//! Reading outputs for comparison with a reference tool's: tensors decoded to f32, the bf16
//! spacing the conformance pack measures differences in, folder URLs.

use std::collections::BTreeMap;
use std::path::Path;

/// Tensors by name: shape, values decoded to f32, dtype name.
pub type F32Tensors = BTreeMap<String, (Vec<u64>, Vec<f32>, String)>;

/// The tensors of a safetensors file, decoded to f32 ([`super::to_f32`]).
pub fn read_f32_tensors(path: &Path) -> F32Tensors {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let shape = view.shape().iter().map(|x| *x as u64).collect();
            let values = super::to_f32(view.dtype(), view.data());
            (name, (shape, values, format!("{:?}", view.dtype())))
        })
        .collect()
}

/// The spacing of bf16 numbers at `|m|` (the conformance pack's unit).
pub fn bf16_ulp(m: f32) -> f64 {
    if m == 0.0 || !m.is_finite() {
        return f64::MIN_POSITIVE;
    }
    2f64.powi((m.abs() as f64).log2().floor() as i32 - 7)
}

/// A local folder as a `file://` URL with a trailing slash.
pub fn dir_url(p: &Path) -> String {
    url::Url::from_directory_path(p)
        .expect("directory url")
        .to_string()
}

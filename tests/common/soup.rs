//! Reference soups computed independently of ladle, and byte-exact comparison with an output.

use std::collections::BTreeMap;
use std::path::Path;

use super::{RawTensor, to_f32};

/// Tensors by name: dtype, shape, raw little-endian bytes.
pub type Tensors = BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;

/// The linear soup: per tensor `Σ w_i x_i` in f32, one fused multiply-add per model in order,
/// divided by `Σ w_i` (summed in order in f32) when `normalize`; rounded to `out` or the
/// tensor's dtype (bf16 round-to-nearest-even). Integer tensors come from the first model.
/// `weights(name)` gives the models' weights for one tensor (a learned soup's coefficients).
pub fn linear_reference_by_tensor<M: AsRef<[RawTensor]>>(
    models: &[M],
    weights: impl Fn(&str) -> Vec<f32>,
    normalize: bool,
    out: Option<safetensors::Dtype>,
) -> Tensors {
    let mut expected = BTreeMap::new();
    for (ti, t0) in models[0].as_ref().iter().enumerate() {
        if t0.dtype == safetensors::Dtype::I64 {
            expected.insert(
                t0.name.clone(),
                (t0.dtype, t0.shape.clone(), t0.data.clone()),
            );
            continue;
        }
        let xs: Vec<Vec<f32>> = models
            .iter()
            .map(|m| to_f32(m.as_ref()[ti].dtype, &m.as_ref()[ti].data))
            .collect();
        let w = weights(&t0.name);
        let sum_w: f32 = w.iter().sum();
        let dtype = out.unwrap_or(t0.dtype);
        let mut bytes = Vec::new();
        for e in 0..xs[0].len() {
            let mut acc = 0.0f32;
            for (x, w) in xs.iter().zip(&w) {
                acc = w.mul_add(x[e], acc);
            }
            if normalize {
                acc /= sum_w;
            }
            match dtype {
                safetensors::Dtype::BF16 => {
                    bytes.extend(half::bf16::from_f32(acc).to_bits().to_le_bytes())
                }
                safetensors::Dtype::F32 => bytes.extend(acc.to_le_bytes()),
                other => panic!("unexpected {other:?}"),
            }
        }
        expected.insert(t0.name.clone(), (dtype, t0.shape.clone(), bytes));
    }
    expected
}

/// [`linear_reference_by_tensor`] with one weight per model for every tensor.
pub fn linear_reference<M: AsRef<[RawTensor]>>(
    models: &[M],
    weights: &[f32],
    normalize: bool,
    out: Option<safetensors::Dtype>,
) -> Tensors {
    linear_reference_by_tensor(models, |_| weights.to_vec(), normalize, out)
}

/// Every tensor of an output's `.safetensors` files (single file or sharded), read with the
/// safetensors crate; a tensor in two shards fails the test.
pub fn read_tensors(files: &BTreeMap<String, Vec<u8>>) -> Tensors {
    let mut out = BTreeMap::new();
    for (name, bytes) in files {
        if !name.ends_with(".safetensors") {
            continue;
        }
        let st = safetensors::SafeTensors::deserialize(bytes).expect("output parses");
        for (tname, view) in st.tensors() {
            let prev = out.insert(
                tname.clone(),
                (view.dtype(), view.shape().to_vec(), view.data().to_vec()),
            );
            assert!(prev.is_none(), "tensor {tname} in two shards");
        }
    }
    out
}

/// The files directly in a local folder, by name (none when the folder does not exist).
pub fn local_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// [`read_tensors`] of a local output folder.
pub fn read_output_dir(dir: &Path) -> Tensors {
    read_tensors(&local_files(dir))
}

/// Same names, dtypes, shapes and bytes; names the first differing byte.
pub fn assert_soup_equal(got: &Tensors, want: &Tensors) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, (dt, shape, bytes)) in want {
        let (gdt, gshape, gbytes) = &got[name];
        assert_eq!((gdt, gshape), (dt, shape), "{name}");
        if gbytes != bytes {
            let first = gbytes.iter().zip(bytes).position(|(a, b)| a != b);
            panic!("{name}: bytes differ from the reference (first at byte {first:?})");
        }
    }
}

//! The recipe's method as the engine runs it: the method's kernel ([`crate::methods`] builds it
//! from the stored recipe), plus what the engine counts on the way: the non-finite values
//! (NaN, ±inf) of every merged output tensor, for the manifest.
//!
//! Memory of the whole-tensor path ([`Needs::Tensor`]), per tensor in flight: the raw input
//! bytes, one f32 copy of every input, one f32 task vector per model (GTA), an f32 output and
//! the encoded output: about `(2k + 2) · 4 + raw` bytes per element for `k` models plus a
//! base, i.e. a small multiple of the largest tensor. Selection scratch (magnitudes, DELLA's
//! per-row order) adds at most 4–8 bytes per element, transiently.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::merge::radix::Band;
use crate::merge::stream::{Cast, TensorStream, cast_inputs, views};
use crate::merge::{DType, MergeError, count_nonfinite};
use crate::methods::{ModelScope, Needs, TensorKernel};
use crate::recipe::Recipe;

#[derive(Debug)]
pub struct Kernel {
    method: Box<dyn TensorKernel>,
    /// Cast every float input to this dtype before the method sees it (the recipe's
    /// `input_dtype`, mergekit's `dtype`: cast on load).
    cast: Option<DType>,
    nonfinite: Mutex<BTreeMap<String, u64>>,
}

impl Kernel {
    pub fn new(recipe: &Recipe, num_layers: usize) -> Result<Kernel, String> {
        let method = recipe
            .method
            .kernel(&recipe.parameters, &recipe.kernel_input(num_layers))?;
        Ok(Kernel {
            method,
            cast: recipe.input_dtype,
            nonfinite: Mutex::default(),
        })
    }

    /// The dtype every float input is cast to on load (mergekit's `dtype`), if any.
    pub fn cast_dtype(&self) -> Option<DType> {
        self.cast
    }

    /// What the method reports in the manifest (a sparse soup's `sparsity`).
    pub fn sparsity_report(&self) -> Option<serde_json::Value> {
        self.method.report()
    }

    /// See [`TensorKernel::model_selection`].
    pub fn model_selection(&self) -> Option<ModelScope> {
        self.method.model_selection()
    }

    /// The kernel with the model-wide bands of `scope: "model"` (one per model).
    pub fn with_bands(mut self, bands: Vec<Band>) -> Kernel {
        self.method.set_bands(bands);
        self
    }

    /// What tensor `name` needs before it can be streamed.
    pub fn needs(&self, name: &str) -> Needs {
        self.method.needs(name)
    }

    /// See [`TensorKernel::stream`].
    pub fn stream(
        &self,
        name: &str,
        shape: &[u64],
        base_dtype: DType,
    ) -> Option<Box<dyn TensorStream>> {
        match self.cast.filter(|_| base_dtype.is_mergeable_float()) {
            Some(to) => self
                .method
                .stream(name, shape, to)
                .map(|inner| Box::new(Cast { inner, to }) as Box<dyn TensorStream>),
            None => self.method.stream(name, shape, base_dtype),
        }
    }

    /// Merge chunk `first..` of a streamed tensor ([`TensorStream::merge`]) and count the
    /// non-finite values written.
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
        let bad = count_nonfinite(out_dtype, out);
        if bad > 0 {
            let mut m = self.nonfinite.lock().unwrap_or_else(|p| p.into_inner());
            *m.entry(name.to_string()).or_default() += bad;
        }
        Ok(())
    }

    /// Whether tensor `name` needs all of its elements at once.
    pub fn whole_tensor(&self, name: &str) -> bool {
        self.needs(name) == Needs::Tensor
    }

    /// Merge one tensor or chunk ([`TensorKernel::run`]) and count the non-finite values
    /// written.
    pub fn run(
        &self,
        name: &str,
        shape: &[u64],
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        match self
            .cast
            .map(|to| cast_inputs(inputs, to))
            .transpose()?
            .flatten()
        {
            Some(c) => self.method.run(name, shape, &views(&c), out_dtype, out)?,
            None => self.method.run(name, shape, inputs, out_dtype, out)?,
        }
        let bad = count_nonfinite(out_dtype, out);
        if bad > 0 {
            let mut m = self.nonfinite.lock().unwrap_or_else(|p| p.into_inner());
            *m.entry(name.to_string()).or_default() += bad;
        }
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

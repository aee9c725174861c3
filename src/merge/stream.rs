//! The contract of a per-tensor streamed method: zero or more pre-passes over the tensor's
//! chunks (in index order, each chunk seen once per pass) that gather the statistics the
//! method needs (cut-offs, norms, sums), then a merge of each chunk on its own, in any order and
//! in parallel. Memory is the method's statistics plus the chunks in flight, whatever the
//! tensor's size.
//!
//! Every implementation reproduces its whole-tensor kernel bit for bit for any chunking whose
//! boundaries fall on multiples of [`TensorStream::align`].

use crate::merge::dtype::DType;
use crate::merge::error::MergeError;

pub trait TensorStream: Send + Sync {
    /// Chunk boundaries (the `first` element of every chunk) must be multiples of this.
    fn align(&self) -> usize;

    /// Whether a(nother) pre-pass over the tensor is needed before merging.
    fn wants_pass(&self) -> bool;

    /// The next chunk of the current pre-pass: `inputs` (base first, as for the merge) hold
    /// the elements `first..` of the tensor; chunks come in index order, covering the tensor.
    fn observe(&mut self, first: u64, inputs: &[(DType, &[u8])]) -> Result<(), MergeError>;

    /// The current pre-pass has seen every chunk.
    fn end_pass(&mut self);

    /// Merge the chunk whose first element is `first` into `out` (elements of `out_dtype`).
    fn merge(
        &self,
        first: u64,
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError>;
}

/// Run a stream over a tensor held whole: every pre-pass over the one chunk, then the merge.
pub fn run_whole(
    s: &mut dyn TensorStream,
    inputs: &[(DType, &[u8])],
    out_dtype: DType,
    out: &mut [u8],
) -> Result<(), MergeError> {
    while s.wants_pass() {
        s.observe(0, inputs)?;
        s.end_pass();
    }
    s.merge(0, inputs, out_dtype, out)
}

/// The start of a streamed sum: what `Iterator::sum::<f64>` starts from (its neutral element),
/// so that adding the terms one by one in index order gives the very bits of the whole-tensor
/// kernel's `.sum::<f64>()`, signed zeros included.
pub fn sum_start() -> f64 {
    std::iter::empty::<f64>().sum()
}

/// A stream whose float inputs are first cast to one dtype (mergekit's `dtype`: every tensor
/// cast on load), whatever the checkpoints store.
pub struct Cast {
    pub inner: Box<dyn TensorStream>,
    pub to: DType,
}

/// Inputs cast to one dtype, owned.
pub type CastInputs = Vec<(DType, Vec<u8>)>;

/// `inputs` with every mergeable float of another dtype cast to `to` (`None`: nothing to cast).
pub fn cast_inputs(inputs: &[(DType, &[u8])], to: DType) -> Result<Option<CastInputs>, MergeError> {
    if inputs
        .iter()
        .all(|(d, _)| *d == to || !d.is_mergeable_float())
    {
        return Ok(None);
    }
    inputs
        .iter()
        .map(|(d, b)| {
            if *d == to || !d.is_mergeable_float() {
                Ok((*d, b.to_vec()))
            } else {
                Ok((to, crate::merge::dtype::cast(*d, b, to)?))
            }
        })
        .collect::<Result<Vec<_>, MergeError>>()
        .map(Some)
}

/// Borrowed views of cast inputs.
pub fn views(cast: &[(DType, Vec<u8>)]) -> Vec<(DType, &[u8])> {
    cast.iter().map(|(d, b)| (*d, b.as_slice())).collect()
}

impl TensorStream for Cast {
    fn align(&self) -> usize {
        self.inner.align()
    }

    fn wants_pass(&self) -> bool {
        self.inner.wants_pass()
    }

    fn observe(&mut self, first: u64, inputs: &[(DType, &[u8])]) -> Result<(), MergeError> {
        match cast_inputs(inputs, self.to)? {
            Some(c) => self.inner.observe(first, &views(&c)),
            None => self.inner.observe(first, inputs),
        }
    }

    fn end_pass(&mut self) {
        self.inner.end_pass()
    }

    fn merge(
        &self,
        first: u64,
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        match cast_inputs(inputs, self.to)? {
            Some(c) => self.inner.merge(first, &views(&c), out_dtype, out),
            None => self.inner.merge(first, inputs, out_dtype, out),
        }
    }
}

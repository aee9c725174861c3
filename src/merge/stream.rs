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

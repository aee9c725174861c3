//! Errors of the merge kernels.

use crate::error::ErrorCode;
use crate::merge::dtype::{DType, DTypeError};

/// Why a kernel refused its buffers. Headers and shapes are validated before any kernel runs, so
/// apart from a non-float dtype these indicate a bug in the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    /// A dtype cannot be merged, or a conversion buffer had the wrong length.
    #[error(transparent)]
    DType(#[from] DTypeError),
    /// An input does not hold as many elements as the output.
    #[error(
        "input {index} ({dtype}) has {actual} bytes, expected {expected} ({elements} elements)"
    )]
    InputLength {
        /// Position of the input in the list.
        index: usize,
        /// Its dtype.
        dtype: DType,
        /// Bytes expected: `elements × dtype.size_bytes()`.
        expected: usize,
        /// Bytes given.
        actual: usize,
        /// Elements of the output.
        elements: usize,
    },
    /// The output buffer is not a whole number of elements of its dtype.
    #[error("output buffer of {bytes} bytes is not a whole number of {dtype} elements")]
    OutputLength {
        /// The output dtype.
        dtype: DType,
        /// Length of the output buffer.
        bytes: usize,
    },
    /// The number of weights differs from the number of inputs.
    #[error("{weights} weights for {inputs} inputs")]
    WeightCount {
        /// Number of inputs.
        inputs: usize,
        /// Number of weights.
        weights: usize,
    },
    /// Sparse soup with `require_shared_mask`: the ingredients' zero patterns differ.
    #[error(
        "the ingredients do not share one zero pattern ({elements} elements differ in this chunk)"
    )]
    MaskMismatch {
        /// Elements where some ingredient is zero and another is not.
        elements: usize,
    },
    /// `normalize: true` with per-tensor weights that sum to zero for one tensor.
    #[error("the models' weights for this tensor sum to zero (normalize: true divides by the sum)")]
    ZeroWeightSum,
    /// A streamed tensor was merged before its pre-passes over the tensor had run.
    #[error("the tensor's statistics were not gathered before merging (pre-pass missing)")]
    NotReady,
    /// A model-wide selection (`scope: "model"`) ran without its thresholds from the pre-pass.
    #[error("scope \"model\": the kernel has {bands} thresholds for {models} models")]
    MissingSelection {
        /// Thresholds the kernel holds.
        bands: usize,
        /// Models it merges.
        models: usize,
    },
}

impl MergeError {
    /// The stable error code: `unsupported_dtype` for a non-float dtype, `shape_mismatch` when
    /// inputs disagree in element count, `internal` for the rest (caller bugs).
    pub fn code(&self) -> ErrorCode {
        match self {
            MergeError::DType(e) => e.code(),
            MergeError::InputLength { .. } | MergeError::MaskMismatch { .. } => {
                ErrorCode::ShapeMismatch
            }
            MergeError::ZeroWeightSum => ErrorCode::InvalidRecipe,
            MergeError::OutputLength { .. }
            | MergeError::WeightCount { .. }
            | MergeError::MissingSelection { .. }
            | MergeError::NotReady => ErrorCode::Internal,
        }
    }
}

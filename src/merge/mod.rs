//! Pure merge kernels and dtype conversion: no I/O, no async.
//!
//! - [`dtype`]: the [`DType`] vocabulary and byte ⇄ `f32` conversion (round-to-nearest-even).
//! - [`blocks`]: the blocked, parallel driver [`map_blocks`] that turns raw tensor bytes into
//!   `f32` blocks, runs an elementwise kernel on them and encodes the result.
//! - [`linear`](mod@linear): the weighted linear soup kernel ([`linear()`], [`linear_raw`]).
//! - [`lora`](mod@lora): folding a LoRA module's `s·B·A` into a weight, chunk by chunk;
//!   [`lora_combine`]: combining LoRA modules as peft's `add_weighted_adapter`;
//!   [`lora_svd`] and [`lora_rsvd`]: their SVDs (the randomized one for `lora_extract`);
//!   [`lora_gram`]: inner products of LoRA deltas from their factors (analyses).
//! - [`precision`]: rounding to the compute dtype (mergekit's bf16 arithmetic).
//! - [`embed_rows`]: embedding rows made from others on a soup's vocabulary (means, padding).
//! - [`gta`]: task arithmetic, TIES, breadcrumbs, DARE, DELLA (mergekit's generalized task
//!   arithmetic; DELLA's ranked drop in [`della`](mod@della)), [`slerp`](mod@slerp), [`spherical`] (NuSLERP, Karcher), [`model_stock`],
//!   [`sce`], [`multislerp`], [`arcee_fusion`], [`ram`] (RAM and RAM+), and the keyed
//!   generator [`rng`].
//! - [`stream`]: the contract of a per-tensor streamed method (pre-passes over the chunks,
//!   then chunk-by-chunk merging), [`select`] (exact rank cut-offs over chunks) and
//!   [`gta_stream`] (the GTA family streamed).
//! - [`error`](mod@error): the error type [`MergeError`].

pub mod arcee_fusion;
pub mod blocks;
pub mod della;
pub mod diagnostics;
pub mod dtype;
pub mod embed_rows;
pub mod error;
pub mod gta;
pub mod gta_stream;
pub mod karcher_stream;
pub mod linear;
pub mod lora;
pub mod lora_combine;
pub mod lora_gram;
pub mod lora_rsvd;
pub mod lora_svd;
pub mod model_stock;
pub mod multislerp;
pub mod nearswap;
pub mod precision;
#[cfg(test)]
mod properties;
pub mod radix;
pub mod ram;
pub mod rng;
pub mod sce;
pub mod select;
pub mod simd;
pub mod slerp;
pub mod sparsification;
pub mod spherical;
pub mod stream;

pub use blocks::{BLOCK_ELEMS, TASK_ELEMS, map_blocks, map_spans, par_values, scan_spans};
pub use dtype::{DType, DTypeError, count_nonfinite, decode_to_f32, encode_from_f32};
pub use error::MergeError;
pub use linear::{linear, linear_raw};
pub use sparsification::Sparsification;

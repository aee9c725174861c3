//! Checkpoint formats: safetensors headers, sharded indexes, shard planning.
//!
//! - [`adapter`]: PEFT LoRA adapter folders (config, tensor names, checks against the base).
//! - [`header`]: strict parsing of one safetensors header ([`parse_header`]).
//! - [`index`]: Hugging Face `model.safetensors.index.json` files.
//! - [`writer`]: planning output shards (headers and offsets) so they stream in one pass.
//! - [`identity`]: an input file's identity at plan time, checked around every shard.
//! - [`permuted`]: embedding rows seen on a soup's vocabulary (data; `engine::permute`).
//! - [`local`]: ranged reads of a local file through one descriptor held for the job (mmap).
//! - [`reader`]: opening a checkpoint (file, folder, or sharded folder) in object storage by
//!   reading headers only.

pub mod adapter;
pub mod header;
pub mod identity;
pub mod index;
pub mod local;
pub mod permuted;
pub mod reader;
pub mod writer;

pub use header::{Header, HeaderError, MAX_HEADER_LEN, TensorInfo, parse_header, parse_header_len};
pub use index::{INDEX_FILE_NAME, MAX_INDEX_LEN, ShardIndex, index_json, parse_index};
pub use local::{LocalFile, LocalReadError};
pub use reader::{
    Checkpoint, CheckpointError, CheckpointFile, TensorLoc, open_checkpoint, open_model,
};
pub use writer::{OutTensor, PlannedTensor, ShardPlan, plan_shards};

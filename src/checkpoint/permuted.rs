//! A checkpoint's embedding rows seen on another vocabulary (a tokenizer built for the soup,
//! mergekit's `PermutedVocabulary`): what each row of the permuted tensor is made of. Data
//! only; `engine::permute` builds it and reads through it, chunk by chunk.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use object_store::ObjectStore;

use super::Checkpoint;
use crate::merge::DType;

/// One row of a model's permuted embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowSource {
    /// Row `n` of the model's own tensor.
    Own(u64),
    /// Entry `n` of [`RowTable::defaults`].
    Default(u32),
    /// Zeros (a token no rule gives a row: mergekit logs it and leaves zeros).
    Zero,
}

/// A row computed from the models' rows (the same tensor name in each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DefaultRow {
    Zero,
    /// Row `row` of model `model`'s own tensor.
    Row {
        model: usize,
        row: u64,
    },
    /// The mean of these rows, summed in this order in the tensor's dtype (as torch).
    Average(Vec<(usize, u64)>),
}

/// A model whose rows a default may read: where, and its tensors as stored.
pub struct RowModel {
    pub store: Arc<dyn ObjectStore>,
    pub url: String,
    /// The checkpoint as opened (without a permutation).
    pub ckpt: Checkpoint,
}

/// Every model's row map onto the soup's vocabulary.
pub struct RowTable {
    /// Rows that stand for a token (`len(vocab)`); the rows after them, up to `rows`, are
    /// padding (`pad_to_multiple_of`), each the mean of the first `tokens` rows.
    pub tokens: u64,
    pub rows: u64,
    /// Per model, per row below `tokens`.
    pub maps: Vec<Vec<RowSource>>,
    pub defaults: Vec<DefaultRow>,
    pub models: Vec<RowModel>,
    /// The dtype the permuted tensor has (the models' promoted dtype, mergekit's), by name.
    pub dtypes: BTreeMap<String, DType>,
    /// The padding row per (model, tensor), computed before the merge (a pre-pass).
    pub means: OnceLock<BTreeMap<(usize, String), Vec<f32>>>,
}

/// The permutation attached to one model's checkpoint.
#[derive(Clone)]
pub struct Permuted {
    /// Which of [`RowTable::models`] this is.
    pub model: usize,
    pub table: Arc<RowTable>,
}

impl PartialEq for Permuted {
    fn eq(&self, other: &Self) -> bool {
        self.model == other.model && Arc::ptr_eq(&self.table, &other.table)
    }
}

impl Eq for Permuted {}

impl std::fmt::Debug for Permuted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permuted")
            .field("model", &self.model)
            .field("rows", &self.table.rows)
            .field("tensors", &self.table.dtypes.keys().collect::<Vec<_>>())
            .finish()
    }
}

//! Reading a model's permuted embedding rows ([`super::permute`]): a range of elements of the
//! permuted tensor, assembled from the model's own rows (one read per run of consecutive
//! rows), the default rows the chunk needs (each source row read once per chunk) and the
//! padding row; and the pre-pass that computes that padding row.

use std::collections::HashMap;

use bytes::Bytes;

use super::EngineError;
use super::read::read_stored;
use crate::checkpoint::permuted::{DefaultRow, Permuted, RowSource, RowTable};
use crate::merge::embed_rows::{add_columns, average_rows, column_means};
use crate::merge::precision::Precision;
use crate::merge::{DType, decode_to_f32, encode_from_f32};

/// The mean of a model's token rows of `name` (its padding row), over chunks of rows.
pub(super) async fn token_mean(
    p: &Permuted,
    name: &str,
    chunk_elems: usize,
) -> Result<Vec<f32>, EngineError> {
    let table = &p.table;
    let (dtype, cols) = shape_of(p, name)?;
    let step = (chunk_elems as u64 / cols.max(1)).max(1);
    let mut sums = vec![0f64; cols as usize];
    let mut r = 0u64;
    while r < table.tokens {
        let end = (r + step).min(table.tokens);
        let block = rows_f32(p, name, r..end).await?;
        add_columns(&block, cols as usize, &mut sums);
        r = end;
    }
    Ok(column_means(&sums, table.tokens, Precision::of(dtype)))
}

fn shape_of(p: &Permuted, name: &str) -> Result<(DType, u64), EngineError> {
    let table = &p.table;
    let dtype = *table
        .dtypes
        .get(name)
        .ok_or_else(|| EngineError::Internal(format!("{name} is not permuted")))?;
    let cols = table.models[p.model]
        .ckpt
        .tensors
        .get(name)
        .map(|t| t.shape[1])
        .ok_or_else(|| EngineError::Internal(format!("{name} missing")))?;
    Ok((dtype, cols))
}

/// Rows `rows` of model `m`'s stored tensor, decoded.
async fn stored_rows(
    table: &RowTable,
    m: usize,
    name: &str,
    rows: std::ops::Range<u64>,
    cols: u64,
) -> Result<Vec<f32>, EngineError> {
    let model = &table.models[m];
    let (dtype, bytes) = read_stored(
        model.store.as_ref(),
        &model.url,
        &model.ckpt,
        name,
        rows.start * cols..rows.end * cols,
    )
    .await?;
    let mut out = vec![0f32; ((rows.end - rows.start) * cols) as usize];
    decode_to_f32(dtype, &bytes, &mut out).map_err(|e| EngineError::Merge {
        tensor: name.to_string(),
        source: e.into(),
    })?;
    Ok(out)
}

/// Rows `rows` of the permuted tensor, decoded (in its dtype's values).
async fn rows_f32(
    p: &Permuted,
    name: &str,
    rows: std::ops::Range<u64>,
) -> Result<Vec<f32>, EngineError> {
    let table = &p.table;
    let (dtype, cols) = shape_of(p, name)?;
    let prec = Precision::of(dtype);
    let c = cols as usize;
    let mut out = vec![0f32; (rows.end - rows.start) as usize * c];
    let map = &table.maps[p.model];
    // The model's own rows, one read per run of consecutive rows.
    let mut r = rows.start;
    while r < rows.end.min(table.tokens) {
        let RowSource::Own(first) = map[r as usize] else {
            r += 1;
            continue;
        };
        let mut end = r + 1;
        while end < rows.end.min(table.tokens)
            && map[end as usize] == RowSource::Own(first + (end - r))
        {
            end += 1;
        }
        let got = stored_rows(table, p.model, name, first..first + (end - r), cols).await?;
        let at = (r - rows.start) as usize * c;
        out[at..at + got.len()].copy_from_slice(&got);
        r = end;
    }
    // Defaults (the rows they need, each read once per chunk), padding.
    let mut cache: HashMap<(usize, u64), Vec<f32>> = HashMap::new();
    for r in rows.clone() {
        let at = (r - rows.start) as usize * c;
        let slot = &mut out[at..at + c];
        if r >= table.tokens {
            let means = table
                .means
                .get()
                .and_then(|m| m.get(&(p.model, name.to_string())))
                .ok_or_else(|| EngineError::Internal(format!("{name}: padding row unset")))?;
            slot.copy_from_slice(means);
            continue;
        }
        let RowSource::Default(k) = map[r as usize] else {
            continue;
        };
        let wanted: Vec<(usize, u64)> = match &table.defaults[k as usize] {
            DefaultRow::Zero => Vec::new(),
            DefaultRow::Row { model, row } => vec![(*model, *row)],
            DefaultRow::Average(list) => list.clone(),
        };
        for key in &wanted {
            if !cache.contains_key(key) {
                let got = stored_rows(table, key.0, name, key.1..key.1 + 1, cols).await?;
                cache.insert(*key, got.into_iter().map(|x| prec.round(x)).collect());
            }
        }
        let got: Vec<&[f32]> = wanted
            .iter()
            .filter_map(|k| cache.get(k))
            .map(Vec::as_slice)
            .collect();
        match &table.defaults[k as usize] {
            DefaultRow::Zero => slot.fill(0.0),
            DefaultRow::Row { .. } => slot.copy_from_slice(got[0]),
            DefaultRow::Average(_) => average_rows(&got, prec, slot),
        }
    }
    // The model's own rows in the permuted dtype (a cast on load, as torch's `.to`).
    prec.round_slice(&mut out);
    Ok(out)
}

/// Elements `elems` of the permuted tensor `name` (row-major), in its dtype.
pub(super) async fn read(
    p: &Permuted,
    name: &str,
    elems: std::ops::Range<u64>,
) -> Result<(DType, Bytes), EngineError> {
    let (dtype, cols) = shape_of(p, name)?;
    let cols = cols.max(1);
    let first = elems.start / cols;
    let last = elems.end.div_ceil(cols);
    let rows = rows_f32(p, name, first..last).await?;
    let skip = (elems.start - first * cols) as usize;
    let n = (elems.end - elems.start) as usize;
    let mut bytes = vec![0u8; n * dtype.size_bytes()];
    encode_from_f32(dtype, &rows[skip..skip + n], &mut bytes).map_err(|e| EngineError::Merge {
        tensor: name.to_string(),
        source: e.into(),
    })?;
    Ok((dtype, Bytes::from(bytes)))
}

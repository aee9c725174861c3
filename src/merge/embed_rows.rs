//! Embedding rows made from other rows when a model's rows are permuted onto a soup's
//! vocabulary (mergekit 0.1.5's `PermutedVocabulary`), computed as torch computes them in the
//! tensor's dtype: a token's mean row is `embed = embed + row` per model, in order, then
//! `embed /= count`, each op rounded to the dtype; a padding row is `torch.mean` over the
//! token rows (accumulated wide, rounded once).

use super::precision::Precision;

/// The mean of `rows` (each `out.len()` long), summed in order: every step rounded to `p`.
pub fn average_rows(rows: &[&[f32]], p: Precision, out: &mut [f32]) {
    out.fill(0.0);
    for row in rows {
        for (o, x) in out.iter_mut().zip(row.iter()) {
            *o = p.round(*o + x);
        }
    }
    let n = rows.len().max(1) as f32;
    for o in out.iter_mut() {
        *o = p.round(*o / n);
    }
}

/// Adds each column of a row-major block (`cols` wide) into `sums`.
pub fn add_columns(block: &[f32], cols: usize, sums: &mut [f64]) {
    if cols == 0 {
        return;
    }
    for row in block.chunks_exact(cols) {
        for (s, x) in sums.iter_mut().zip(row) {
            *s += f64::from(*x);
        }
    }
}

/// The column means of `count` rows from their sums, rounded to `p` once.
pub fn column_means(sums: &[f64], count: u64, p: Precision) -> Vec<f32> {
    let n = count.max(1) as f64;
    sums.iter().map(|s| p.round((s / n) as f32)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_round_each_step() {
        let a = [1.0f32, 3.0];
        let b = [2.0f32, 1.0 / 256.0];
        let mut out = [0.0f32; 2];
        average_rows(&[&a, &b], Precision::F32, &mut out);
        assert_eq!(out, [1.5, (3.0 + 1.0 / 256.0) / 2.0]);
        // In bf16, 3 + 1/256 rounds to 3 before the division.
        average_rows(&[&a, &b], Precision::BF16, &mut out);
        assert_eq!(out, [1.5, 1.5]);
        let mut sums = vec![0.0f64; 2];
        add_columns(&[1.0, 2.0, 3.0, 4.0], 2, &mut sums);
        assert_eq!(sums, [4.0, 6.0]);
        assert_eq!(column_means(&sums, 2, Precision::F32), [2.0, 3.0]);
    }
}

//! DELLA's magnitude-ranked random drop (mergekit's `della_magprune`, ALGORITHMS.md §9), per
//! row of a task vector: element `j` of a row of `d` elements, ranked `rank_j` (1-based,
//! ascending by `(|δ|, index)`), is kept with probability
//! ```text
//! span = r(r(d) − 1);  norm = span > 0 ? clamp(r(r(r(rank_j) − 1) / span), 0, 1) : 0
//! prob = r(f32(density − ε) + r(r(norm · 2) · f32(ε)))
//! ```
//! (`r` the rounding to the compute precision; bf16 rounds ranks above 256, as mergekit).
//! `prob` depends only on the rank and the row length, so [`DellaKeep`] computes it once per
//! rank as an integer threshold of the keyed generator ([`threshold`]) and a row costs one
//! ranking plus one table look-up and one draw per element.

use crate::merge::precision::Precision;
use crate::merge::radix;
use crate::merge::rng::{KeyedRng, threshold};

/// What DELLA does to rows of one length under one model's `density` / `epsilon`.
#[derive(Debug, Clone, PartialEq)]
pub enum DellaKeep {
    /// `density ≥ 1`: nothing is dropped.
    All,
    /// `density ≤ 0`: everything is dropped.
    Nothing,
    /// Keep thresholds by rank (`thresholds[rank − 1]`) for rows of `len` elements.
    Ranked {
        len: usize,
        density: f64,
        epsilon: f64,
        p: Precision,
        thresholds: Vec<u64>,
    },
}

impl DellaKeep {
    /// The table for rows of `row_len` elements (at least 1).
    pub fn new(row_len: usize, density: f64, epsilon: f64, p: Precision) -> DellaKeep {
        if density >= 1.0 {
            return DellaKeep::All;
        }
        if density <= 0.0 {
            return DellaKeep::Nothing;
        }
        let len = row_len.max(1);
        DellaKeep::Ranked {
            len,
            density,
            epsilon,
            p,
            thresholds: thresholds(len, density, epsilon, p),
        }
    }
}

/// `threshold(prob(rank))` for ranks `1..=d`.
fn thresholds(d: usize, density: f64, epsilon: f64, p: Precision) -> Vec<u64> {
    // `(density − ε) + tensor`: a Python float meets the tensor at f32 precision.
    let low = (density - epsilon) as f32;
    let eps = epsilon as f32;
    let max_rank = p.round(d as f32);
    let span = p.round(max_rank - 1.0);
    (1..=d)
        .map(|rank| {
            let rr = p.round(rank as f32);
            let norm = if span > 0.0 {
                p.round(p.round(rr - 1.0) / span).clamp(0.0, 1.0)
            } else {
                0.0
            };
            threshold(p.round(low + p.round(p.round(norm * 2.0) * eps)) as f64)
        })
        .collect()
}

/// DELLA on a whole tensor, rows of `row_len` elements.
pub fn della(
    delta: &mut [f32],
    row_len: usize,
    density: f64,
    epsilon: f64,
    p: Precision,
    rng: &KeyedRng,
) {
    della_at(delta, 0, &DellaKeep::new(row_len, density, epsilon, p), rng)
}

/// [`della`] on whole rows starting at element `first` of a tensor (a multiple of the row
/// length); a shorter last row gets its own table.
#[inline]
pub fn della_at(delta: &mut [f32], first: u64, keep: &DellaKeep, rng: &KeyedRng) {
    let (len, thresholds) = match keep {
        DellaKeep::All => return,
        DellaKeep::Nothing => {
            delta.fill(0.0);
            return;
        }
        DellaKeep::Ranked {
            len, thresholds, ..
        } => (*len, thresholds),
    };
    let mut ranker = Ranker::default();
    let mut masks = vec![0u32; len];
    let mut draws = vec![0u64; len];
    for (r, row) in delta.chunks_mut(len).enumerate() {
        let d = row.len();
        let short;
        let table: &[u64] = if d == len {
            thresholds
        } else {
            let DellaKeep::Ranked {
                density,
                epsilon,
                p,
                ..
            } = keep
            else {
                return;
            };
            short = self::thresholds(d, *density, *epsilon, *p);
            &short
        };
        let e0 = first + (r * len) as u64;
        // In ascending order: the order's i-th index has rank i + 1, so its threshold is
        // `table[i]`. The draws go to a mask first, then the mask to the row: a drop written
        // in place (only where an element is dropped) compiles to a branch that mispredicts
        // about every other element.
        let masks = &mut masks[..d];
        // The draws in index order first (vectorized, with AVX-512 DQ where the CPU has it),
        // then compared in rank order.
        let draws = &mut draws[..d];
        crate::merge::simd::run_wide(|| {
            for (j, u) in draws.iter_mut().enumerate() {
                *u = rng.bits(e0 + j as u64);
            }
        });
        for (&j, t) in ranker.order(row).iter().zip(table) {
            let j = j as usize;
            masks[j] = u32::from(draws[j] < *t).wrapping_neg();
        }
        for (x, m) in row.iter_mut().zip(masks.iter()) {
            *x = f32::from_bits(x.to_bits() & m);
        }
    }
}

/// The ascending order by `(|δ|, index)` (the element indices, rank 1 first), as a stable
/// sort on `|δ|.total_cmp` gives it: for magnitudes (sign cleared) `total_cmp` orders like
/// the bits, so a stable LSD radix sort of the keys (a byte at a time, skipping bytes every
/// key shares, e.g. the zero low half of bf16 values) gives that order in linear time. Scratch reused from row to row.
#[derive(Debug, Default)]
struct Ranker {
    keys: Vec<u32>,
    idx: Vec<u32>,
    tmp_keys: Vec<u32>,
    tmp_idx: Vec<u32>,
}

impl Ranker {
    fn order(&mut self, row: &[f32]) -> &[u32] {
        let d = row.len();
        self.keys.clear();
        self.keys.extend(row.iter().map(|x| radix::key(*x)));
        self.idx.clear();
        self.idx.extend(0..d as u32);
        self.tmp_keys.resize(d, 0);
        self.tmp_idx.resize(d, 0);
        // Bytes every key shares (e.g. the zero low half of bf16 values) need no pass: a pass
        // over them would not move anything.
        let (any, all) = self
            .keys
            .iter()
            .fold((0u32, u32::MAX), |(o, a), k| (o | k, a & k));
        for shift in [0u32, 8, 16, 24] {
            if ((any ^ all) >> shift) & 0xff == 0 {
                continue;
            }
            let mut count = [0u32; 256];
            for k in &self.keys {
                count[((k >> shift) & 0xff) as usize] += 1;
            }
            let mut pos = [0u32; 256];
            let mut sum = 0u32;
            for (p, c) in pos.iter_mut().zip(&count) {
                *p = sum;
                sum += c;
            }
            for (k, i) in self.keys.iter().zip(&self.idx) {
                let b = ((k >> shift) & 0xff) as usize;
                let at = pos[b] as usize;
                pos[b] += 1;
                self.tmp_keys[at] = *k;
                self.tmp_idx[at] = *i;
            }
            std::mem::swap(&mut self.keys, &mut self.tmp_keys);
            std::mem::swap(&mut self.idx, &mut self.tmp_idx);
        }
        &self.idx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DELLA's ranks by one sort of `bits << 32 | index` equal those of the stable sort by
    /// `|δ|.total_cmp` it replaced, ties, zeros of both signs and NaN included.
    #[test]
    fn della_ranks_match_a_stable_sort() {
        let mut s = 0xdead_beef_1234_5678u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for round in 0..50 {
            let row = 1 + (next() % 300) as usize;
            let n = row * (1 + (next() % 4) as usize);
            let d: Vec<f32> = (0..n)
                .map(|_| match next() % 13 {
                    0 => 0.0,
                    1 => -0.0,
                    2 => f32::NAN,
                    3 => -f32::NAN,
                    _ => ((next() % 9) as f32 - 4.0) * 0.125,
                })
                .collect();
            let p = if round % 2 == 0 {
                Precision::BF16
            } else {
                Precision::F32
            };
            let rng = KeyedRng::new(5, 1, "w");
            let mut got = d.clone();
            della_at(&mut got, 4096, &DellaKeep::new(row, 0.5, 0.2, p), &rng);
            // The reference: the former stable sort, then the same keep rule.
            let mut want = d.clone();
            let (low, eps) = ((0.5f64 - 0.2) as f32, 0.2f32);
            for (r, rw) in want.chunks_mut(row).enumerate() {
                let mut order: Vec<usize> = (0..rw.len()).collect();
                order.sort_by(|&a, &b| rw[a].abs().total_cmp(&rw[b].abs()));
                let mut rank = vec![0u32; rw.len()];
                for (pos, &i) in order.iter().enumerate() {
                    rank[i] = pos as u32 + 1;
                }
                let span = p.round(p.round(rw.len() as f32) - 1.0);
                for (j, x) in rw.iter_mut().enumerate() {
                    let rr = p.round(rank[j] as f32);
                    let norm = if span > 0.0 {
                        p.round(p.round(rr - 1.0) / span).clamp(0.0, 1.0)
                    } else {
                        0.0
                    };
                    let prob = p.round(low + p.round(p.round(norm * 2.0) * eps));
                    if !rng.keep(4096 + (r * row + j) as u64, prob as f64) {
                        *x = 0.0;
                    }
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "round {round}");
        }
    }
}

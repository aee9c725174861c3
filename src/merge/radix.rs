//! Exact k-th largest magnitude over data seen in chunks, in bounded memory: a two-pass radix
//! select over the bits of `|x|` (the TIES paper's trim over the WHOLE model, ALGORITHMS.md
//! §1.7, §6.1).
//!
//! For a non-negative f32 (the sign bit cleared) the bit pattern, read as an unsigned integer,
//! orders like the value (`+0 < subnormals < normals < +inf < NaN`, as `f32::total_cmp` on
//! magnitudes). So:
//!
//! 1. pass 1: a histogram of the high 16 bits of every key ([`accumulate_high`]);
//!    [`locate`] finds the bucket holding the k-th largest and how many keys lie above it;
//! 2. pass 2: a histogram of the low 16 bits of the keys inside that bucket
//!    ([`accumulate_low`]); [`select`] gives the exact k-th largest key and the counts of keys
//!    strictly above it and equal to it.
//!
//! Memory: 65,536 counters per histogram, whatever the data size.
//!
//! **Tie rule** ([`Band::keeps`]): a selection keeps every element whose magnitude is `≥` the
//! cut-off, so all elements equal to the k-th largest are kept (the TIES reference's `kthvalue`
//! and `>=`): `kept = greater + equal ≥ k`. For a band with an upper cut-off (breadcrumbs), the
//! elements equal to the upper cut-off are dropped with the outliers above it.

/// Counters per histogram (16 bits).
pub const BUCKETS: usize = 1 << 16;

/// The order key of `|x|`: its bits with the sign cleared.
#[inline]
pub fn key(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// A fresh histogram.
pub fn histogram() -> Vec<u64> {
    vec![0; BUCKETS]
}

/// Pass 1: count the high 16 bits of every `key(x)`.
#[inline]
pub fn accumulate_high(counts: &mut [u64], xs: &[f32]) {
    for &x in xs {
        counts[(key(x) >> 16) as usize] += 1;
    }
}

/// Pass 2: count the low 16 bits of the keys whose high 16 bits are `bucket`.
pub fn accumulate_low(counts: &mut [u64], bucket: u32, xs: &[f32]) {
    for &x in xs {
        let k = key(x);
        if k >> 16 == bucket {
            counts[(k & 0xffff) as usize] += 1;
        }
    }
}

/// Where the k-th largest key lies after pass 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    /// Its high 16 bits.
    pub bucket: u32,
    /// Keys in higher buckets.
    pub above: u64,
}

/// The bucket of the `k`-th largest key (`k ≥ 1`); `None` when `k` is 0 or exceeds the count.
pub fn locate(high: &[u64], k: u64) -> Option<Located> {
    if k == 0 {
        return None;
    }
    let mut above = 0u64;
    for b in (0..high.len()).rev() {
        if above + high[b] >= k {
            return Some(Located {
                bucket: b as u32,
                above,
            });
        }
        above += high[b];
    }
    None
}

/// The exact k-th largest key and its tie counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cutoff {
    pub key: u32,
    /// Keys strictly greater than `key`.
    pub greater: u64,
    /// Keys equal to `key` (≥ 1).
    pub equal: u64,
}

impl Cutoff {
    /// The cut-off magnitude.
    pub fn value(&self) -> f32 {
        f32::from_bits(self.key)
    }
}

/// The `k`-th largest key from pass 1's location and pass 2's histogram of that bucket.
pub fn select(at: Located, low: &[u64], k: u64) -> Option<Cutoff> {
    let mut greater = at.above;
    for l in (0..low.len()).rev() {
        if low[l] > 0 && greater + low[l] >= k {
            return Some(Cutoff {
                key: (at.bucket << 16) | l as u32,
                greater,
                equal: low[l],
            });
        }
        greater += low[l];
    }
    None
}

/// Which magnitudes a model-wide selection keeps: `lo ≤ key(x) < hi` (no upper bound when
/// `hi` is `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Band {
    pub lo: u32,
    pub hi: Option<u32>,
}

impl Band {
    /// Keep everything.
    pub const ALL: Band = Band { lo: 0, hi: None };
    /// Keep nothing.
    pub const NONE: Band = Band { lo: 1, hi: Some(0) };

    #[inline]
    pub fn keeps(&self, x: f32) -> bool {
        let k = key(x);
        k >= self.lo && self.hi.is_none_or(|h| k < h)
    }

    /// Zero the elements outside the band.
    pub fn apply(&self, delta: &mut [f32]) {
        if *self == Band::ALL {
            return;
        }
        for x in delta.iter_mut() {
            if !self.keeps(*x) {
                *x = 0.0;
            }
        }
    }
}

/// The ranks from the top (1-based) a model-wide selection needs over `n` magnitudes:
/// TIES (`magnitude`) keeps `max(1, ⌊density·n⌋)` largest; breadcrumbs (`magnitude_outliers`)
/// drops the `⌊gamma·n⌋` largest and keeps `⌊density·n⌋` below them (fewer when that runs past
/// the bottom), as the per-tensor rules in `gta`. Returns `(lo_rank, hi_rank)`: the band is
/// `[cut-off at lo_rank, cut-off at hi_rank)`; `lo_rank = 0` keeps nothing, `hi_rank = 0` means
/// no upper cut-off; `None` keeps everything.
pub fn band_ranks(outliers: bool, density: f64, gamma: f64, n: u64) -> Option<(u64, u64)> {
    if density >= 1.0 || n == 0 {
        return None;
    }
    if !outliers {
        let k = ((density * n as f64) as u64).clamp(1, n);
        return Some((k, 0));
    }
    let n_i = n as i64;
    let target = (density * n as f64) as i64;
    let mut n_top = (gamma * n as f64) as i64;
    let mut n_bot = n_i - target - n_top;
    if n_bot < 0 {
        n_top += n_bot;
        n_bot = 0;
    }
    let n_top = n_top.max(0) as u64;
    Some(((n_i - n_bot).max(0) as u64, n_top))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::precision::bf16_round;

    /// Both passes over `chunks`, then the k-th largest.
    fn two_pass(chunks: &[Vec<f32>], k: u64) -> Option<Cutoff> {
        let mut high = histogram();
        for c in chunks {
            accumulate_high(&mut high, c);
        }
        let at = locate(&high, k)?;
        let mut low = histogram();
        for c in chunks {
            accumulate_low(&mut low, at.bucket, c);
        }
        select(at, &low, k)
    }

    #[test]
    fn by_hand() {
        // |x| sorted descending: 4, 3, 2, 2, 2, 1, 0, 0.
        let data = vec![
            vec![2.0f32, -3.0, 0.0],
            vec![-2.0, 1.0, 4.0],
            vec![2.0, -0.0],
        ];
        let c = two_pass(&data, 1).unwrap();
        assert_eq!((c.value(), c.greater, c.equal), (4.0, 0, 1));
        let c = two_pass(&data, 3).unwrap();
        assert_eq!((c.value(), c.greater, c.equal), (2.0, 2, 3));
        let c = two_pass(&data, 5).unwrap();
        assert_eq!((c.value(), c.greater, c.equal), (2.0, 2, 3));
        let c = two_pass(&data, 8).unwrap();
        assert_eq!((c.value(), c.greater, c.equal), (0.0, 6, 2));
        assert_eq!(two_pass(&data, 9), None);
        assert_eq!(two_pass(&data, 0), None);
        // ≥ cut-off keeps the three tied 2s with k = 3: greater + equal = 5 kept.
        let band = Band {
            lo: c_key(2.0),
            hi: None,
        };
        let kept = data.iter().flatten().filter(|x| band.keeps(**x)).count();
        assert_eq!(kept, 5);
    }

    fn c_key(x: f32) -> u32 {
        key(x)
    }

    #[test]
    fn key_orders_like_magnitude() {
        let xs = [
            0.0f32,
            1e-45,
            1e-38,
            0.5,
            1.0,
            3.0e38,
            f32::INFINITY,
            f32::NAN,
        ];
        for w in xs.windows(2) {
            assert!(key(w[0]) < key(w[1]), "{} vs {}", w[0], w[1]);
            assert_eq!(key(-w[1]), key(w[1]));
        }
    }

    /// A small deterministic generator (xorshift) for the reference comparison.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn matches_a_sort_on_random_data_with_ties() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..20 {
            let n = 1 + (xorshift(&mut s) % 5000) as usize;
            // bf16-rounded small values: few distinct magnitudes, many ties; some exact zeros,
            // some values across many exponents (different high buckets).
            let data: Vec<f32> = (0..n)
                .map(|_| {
                    let r = xorshift(&mut s);
                    let mant = ((r >> 8) % 2000) as f32 / 1000.0 - 1.0;
                    let exp = ((r >> 40) % 24) as i32 - 12;
                    if r.is_multiple_of(17) {
                        0.0
                    } else {
                        bf16_round(mant * 2f32.powi(exp))
                    }
                })
                .collect();
            let chunks: Vec<Vec<f32>> = data.chunks(97 + round).map(|c| c.to_vec()).collect();
            let mut sorted: Vec<f32> = data.iter().map(|x| x.abs()).collect();
            sorted.sort_by(|a, b| b.total_cmp(a));
            for k in [1, 2, n as u64 / 3, n as u64 / 2, n as u64] {
                let k = k.max(1);
                let c = two_pass(&chunks, k).unwrap();
                let want = sorted[k as usize - 1];
                assert_eq!(c.value(), want, "round {round}, k {k}");
                let greater = sorted.iter().filter(|x| **x > want).count() as u64;
                let equal = sorted.iter().filter(|x| **x == want).count() as u64;
                assert_eq!(
                    (c.greater, c.equal),
                    (greater, equal),
                    "round {round}, k {k}"
                );
                assert!(c.greater < k && c.greater + c.equal >= k);
            }
        }
    }

    #[test]
    fn band_ranks_follow_the_per_tensor_rules() {
        // TIES: max(1, ⌊density·n⌋).
        assert_eq!(band_ranks(false, 0.5, 0.0, 10), Some((5, 0)));
        assert_eq!(band_ranks(false, 0.01, 0.0, 10), Some((1, 0)));
        assert_eq!(band_ranks(false, 1.0, 0.0, 10), None);
        // breadcrumbs: 100 elements, density 0.9, gamma 0.01: drop the top 1, keep 90 below.
        assert_eq!(band_ranks(true, 0.9, 0.01, 100), Some((91, 1)));
        // density + gamma > 1: the band runs to the bottom (n_bot = 0), n_top shrinks.
        assert_eq!(band_ranks(true, 0.9, 0.2, 100), Some((100, 10)));
        // Band over 1..=100 with (91, 1): keeps 10..=99, as gta::magnitude_outliers.
        let data: Vec<f32> = (1..=100).map(|x| x as f32).collect();
        let lo = two_pass(std::slice::from_ref(&data), 91).unwrap().key;
        let hi = two_pass(std::slice::from_ref(&data), 1).unwrap().key;
        let mut d = data.clone();
        Band { lo, hi: Some(hi) }.apply(&mut d);
        let kept: Vec<f32> = d.into_iter().filter(|x| *x != 0.0).collect();
        assert_eq!(kept, (10..=99).map(|x| x as f32).collect::<Vec<_>>());
        let mut none = data;
        Band::NONE.apply(&mut none);
        assert!(none.iter().all(|x| *x == 0.0));
    }
}

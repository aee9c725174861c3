//! Exact rank selections over a tensor seen chunk by chunk (TIES / breadcrumbs magnitude
//! cut-offs, SCE's variance top-k), reproducing the whole-tensor rule of
//! [`crate::merge::gta::keep_rank_band`] bit for bit.
//!
//! That rule ranks the elements by `(|x|, index)` ascending and keeps the ranks `lo..hi`.
//! Counted from the top, the kept set is `Top(n − lo) \ Top(n − hi)` where `Top(m)` is the `m`
//! largest by `(|x|, index)`. With `c` the `m`-th largest magnitude key ([`radix`] select over
//! streamed histograms), `greater` the count of keys above `c` and `equal` the count equal to
//! it, `Top(m)` holds every key above `c` and the **last** `m − greater` of the elements equal
//! to `c` in index order, i.e. it leaves out the first `drop = greater + equal − m` tied ones.
//!
//! So a chunk needs, besides the cut-off, how many tied elements came before it: a streamed
//! pass records that count at every [`TIE_BLOCK`] boundary ([`TieTable`]); chunks then start
//! on those boundaries. Memory: 8 bytes per `TIE_BLOCK` elements per cut-off.

use crate::merge::radix::{self, key};

/// Elements between two entries of a [`TieTable`].
pub const TIE_BLOCK: usize = 4096;

/// `Top(m)`: the `m` largest of `n` magnitude keys ranked by `(key, index)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Top {
    /// `m = 0`.
    Nothing,
    /// `m = n`.
    Everything,
    /// Keys above `key`, and the elements equal to `key` from the `drop`-th one (in index
    /// order, 0-based) on.
    Cut { key: u32, drop: u64 },
}

impl Top {
    /// Whether deciding membership needs the running count of elements equal to the cut-off.
    pub fn counts_ties(&self) -> bool {
        matches!(self, Top::Cut { drop, .. } if *drop > 0)
    }

    /// Membership of an element with key `k`; `seen` is the count of elements equal to the
    /// cut-off before it, advanced past this one when it is tied.
    #[inline(always)]
    pub fn holds(&self, k: u32, seen: &mut u64) -> bool {
        match *self {
            Top::Nothing => false,
            Top::Everything => true,
            // Without branches: whether `k` is above, at or below the cut-off is data, and
            // mispredicts about every other element at density ½.
            Top::Cut { key: c, drop } => {
                let tied = k == c;
                let s = *seen;
                *seen = s + u64::from(tied);
                (k > c) | (tied & (s >= drop))
            }
        }
    }
}

impl Top {
    /// [`Top::holds`] over a block of values (keys `mag_key(x)`), as masks: `out[e]` all ones
    /// when element `e` is in, else 0; `seen` advances past the block's ties. The same result
    /// as calling `holds` element by element, but the running tie count matters only in a
    /// block where the `drop`-th tie falls: before it every tie is out, after it every tie is
    /// in, so other blocks are decided by one comparison per element (vectorizable).
    #[inline]
    pub fn mask_block(&self, xs: &[f32], seen: &mut u64, out: &mut [u32]) {
        let out = &mut out[..xs.len()];
        let mask = |b: bool| u32::from(b).wrapping_neg();
        match *self {
            Top::Nothing => out.fill(0),
            Top::Everything => out.fill(u32::MAX),
            Top::Cut { key: c, drop } => {
                let s = *seen;
                let tied = xs.iter().filter(|x| mag_key(**x) == c).count() as u64;
                if s >= drop {
                    for (o, x) in out.iter_mut().zip(xs) {
                        *o = mask(mag_key(*x) >= c);
                    }
                } else if s + tied <= drop {
                    for (o, x) in out.iter_mut().zip(xs) {
                        *o = mask(mag_key(*x) > c);
                    }
                } else {
                    let mut s = s;
                    for (o, x) in out.iter_mut().zip(xs) {
                        *o = mask(self.holds(mag_key(*x), &mut s));
                    }
                }
                *seen = s + tied;
            }
        }
    }
}

/// The ranks from the top that a band `lo..hi` (ascending ranks over `n`) is made of: `Top` sizes
/// `(n − lo, n − hi)`, with `lo ≥ hi` meaning nothing.
pub fn top_sizes(lo: usize, hi: usize, n: usize) -> (u64, u64) {
    let hi = hi.min(n);
    if lo >= hi {
        return (0, 0);
    }
    ((n - lo) as u64, (n - hi) as u64)
}

/// `Top(m)` of `n` keys from the pass-1 histogram of the high 16 bits and, for the bucket
/// [`radix::locate`] found, the histogram of the low 16 bits (`low` is `None` when every key's
/// low 16 bits are zero, as for bf16 values: the bucket's count is then all at low bits 0).
pub fn top_from(high: &[u64], low: Option<&[u64]>, m: u64, n: u64) -> Option<Top> {
    if m == 0 {
        return Some(Top::Nothing);
    }
    if m >= n {
        return Some(Top::Everything);
    }
    let at = radix::locate(high, m)?;
    let c = match low {
        Some(low) => radix::select(at, low, m)?,
        None => {
            let mut l = vec![0u64; radix::BUCKETS];
            l[0] = high[at.bucket as usize];
            radix::select(at, &l, m)?
        }
    };
    Some(Top::Cut {
        key: c.key,
        drop: c.greater + c.equal - m,
    })
}

/// Counts of elements equal to one cut-off before every [`TIE_BLOCK`] boundary of a tensor
/// (entry `b`: before element `b · TIE_BLOCK`), built in index order by a streamed pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TieTable {
    before: Vec<u64>,
    seen: u64,
}

impl TieTable {
    /// Account for the next elements of the tensor, in index order; `first` is the index of
    /// `keys`' first element.
    pub fn push(&mut self, first: usize, cut: u32, keys: impl Iterator<Item = u32>) {
        for (j, k) in keys.enumerate() {
            if (first + j).is_multiple_of(TIE_BLOCK) {
                self.before.push(self.seen);
            }
            if k == cut {
                self.seen += 1;
            }
        }
    }

    /// Elements equal to the cut-off before element `first` (a multiple of [`TIE_BLOCK`]).
    pub fn before(&self, first: u64) -> u64 {
        let b = (first / TIE_BLOCK as u64) as usize;
        self.before.get(b).copied().unwrap_or(self.seen)
    }
}

impl TieTable {
    /// The table of a cut-off from per-block tie counts in index order (`counts[b]`: the
    /// elements of block `b` equal to the cut-off).
    pub fn from_counts(counts: impl Iterator<Item = u64>) -> TieTable {
        let mut t = TieTable::default();
        for c in counts {
            t.before.push(t.seen);
            t.seen += c;
        }
        t
    }
}

/// Keys (high 16 bits) a [`BandTally`] counts per block: a guess of a cut-off's bucket ± 32.
pub const TALLY_WIDTH: u32 = 64;

/// Per-[`TIE_BLOCK`] counts of the keys in a band of [`TALLY_WIDTH`] buckets (high 16 bits of
/// [`mag_key`]), taken in the pass that builds the histogram, before the cut-off is known:
/// when the cut-off's bucket falls in the band and its low 16 bits are zero (bf16 values),
/// its [`TieTable`] follows without another pass ([`BandTally::table`]). The band is guessed
/// from the tensor's first chunk. Memory: `2 · (TALLY_WIDTH + 1)` bytes per block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BandTally {
    lo: u32,
    counts: Vec<u16>,
}

impl BandTally {
    /// Bytes a tally takes for `n` elements.
    pub fn bytes_for(n: u64) -> u64 {
        n.div_ceil(TIE_BLOCK as u64) * 2 * (TALLY_WIDTH as u64 + 1)
    }

    /// A tally of the band around the bucket holding the `m`-th largest key among the elements
    /// `high` counts, scaled from `seen` elements to `n` (`None` when it has no such rank).
    pub fn around(high: &[u64], m: u64, seen: u64, n: u64) -> Option<BandTally> {
        if seen == 0 || n == 0 {
            return None;
        }
        let r = ((m as u128 * seen as u128).div_ceil(n as u128) as u64).clamp(1, seen);
        let at = radix::locate(high, r)?;
        Some(BandTally {
            lo: at.bucket.saturating_sub(TALLY_WIDTH / 2),
            counts: Vec::new(),
        })
    }

    /// Count the next block of the tensor (index order, whole blocks but the last).
    pub fn push_block(&mut self, xs: &[f32]) {
        let w = TALLY_WIDTH as usize + 1;
        let at = self.counts.len();
        self.counts.resize(at + w, 0);
        let row = &mut self.counts[at..at + w];
        for x in xs {
            let i = ((mag_key(*x) >> 16).wrapping_sub(self.lo)).min(TALLY_WIDTH);
            row[i as usize] += 1;
        }
    }

    /// The [`TieTable`] of the cut-off `cut` when the band holds it and its low 16 bits are
    /// zero (so the bucket's count is the count of elements equal to it).
    pub fn table(&self, cut: u32) -> Option<TieTable> {
        let i = (cut >> 16).wrapping_sub(self.lo);
        if cut & 0xffff != 0 || i >= TALLY_WIDTH {
            return None;
        }
        let w = TALLY_WIDTH as usize + 1;
        Some(TieTable::from_counts(
            self.counts.chunks(w).map(|b| u64::from(b[i as usize])),
        ))
    }
}

/// The key of a magnitude as [`radix`] orders it.
#[inline]
pub fn mag_key(x: f32) -> u32 {
    key(x)
}

#[cfg(test)]
mod tests {
    /// [`Top::mask_block`] equals [`Top::holds`] element by element, and advances `seen` the
    /// same, for cut-offs before, inside and after a block's ties, in blocks of any length.
    #[test]
    fn block_masks_equal_element_holds() {
        use super::*;
        let vals: Vec<f32> = (0..1000)
            .map(|i| [0.5f32, -0.5, 0.25, 1.0, -0.0, 0.5][(i * 7 + i / 3) % 6])
            .collect();
        let c = mag_key(0.5);
        for top in [
            Top::Nothing,
            Top::Everything,
            Top::Cut { key: c, drop: 0 },
            Top::Cut { key: c, drop: 37 },
            Top::Cut { key: c, drop: 200 },
            Top::Cut { key: c, drop: 5000 },
            Top::Cut {
                key: mag_key(0.25),
                drop: 3,
            },
        ] {
            for block in [1usize, 64, 100, 1000] {
                let (mut s1, mut s2) = (0u64, 0u64);
                for xs in vals.chunks(block) {
                    let mut got = vec![7u32; xs.len()];
                    top.mask_block(xs, &mut s1, &mut got);
                    for (x, g) in xs.iter().zip(&got) {
                        let want = u32::from(top.holds(mag_key(*x), &mut s2)).wrapping_neg();
                        assert_eq!(*g, want, "{top:?} block {block}");
                    }
                    assert_eq!(s1, s2, "{top:?} block {block}");
                }
            }
        }
    }

    use super::*;
    use crate::merge::gta::keep_rank_band;
    use crate::merge::precision::bf16_round;

    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    /// The band `lo..hi` computed from streamed histograms and tie tables over chunks of
    /// `chunk` elements, against the whole-tensor rule.
    fn streamed_band(
        data: &[f32],
        lo: usize,
        hi: usize,
        chunk: usize,
        exact_low: bool,
    ) -> Vec<f32> {
        let n = data.len();
        let (m_lo, m_hi) = top_sizes(lo, hi, n);
        let mut high = radix::histogram();
        for c in data.chunks(chunk) {
            radix::accumulate_high(&mut high, c);
        }
        let top = |m: u64| {
            let low = (m > 0 && m < n as u64).then(|| {
                let at = radix::locate(&high, m).unwrap();
                let mut low = radix::histogram();
                for c in data.chunks(chunk) {
                    radix::accumulate_low(&mut low, at.bucket, c);
                }
                low
            });
            top_from(
                &high,
                if exact_low { low.as_deref() } else { None },
                m,
                n as u64,
            )
            .unwrap()
        };
        let tops = [top(m_lo), top(m_hi)];
        let mut tables = [TieTable::default(), TieTable::default()];
        for (c, d) in data.chunks(chunk).enumerate() {
            for (t, tab) in tops.iter().zip(tables.iter_mut()) {
                if let Top::Cut { key: cut, .. } = t {
                    tab.push(c * chunk, *cut, d.iter().map(|x| mag_key(*x)));
                }
            }
        }
        let mut out = Vec::with_capacity(n);
        for (c, d) in data.chunks(chunk).enumerate() {
            let first = (c * chunk) as u64;
            let mut seen = [tables[0].before(first), tables[1].before(first)];
            for x in d {
                let k = mag_key(*x);
                let a = tops[0].holds(k, &mut seen[0]);
                let b = tops[1].holds(k, &mut seen[1]);
                out.push(if a && !b { *x } else { 0.0 });
            }
        }
        out
    }

    #[test]
    fn streamed_bands_equal_the_whole_tensor_rule() {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        for round in 0..40 {
            let n = 1 + (xorshift(&mut s) % 20_000) as usize;
            let distinct = 1 + xorshift(&mut s) % 50;
            let data: Vec<f32> = (0..n)
                .map(|_| {
                    let r = xorshift(&mut s);
                    match r % 23 {
                        0 => 0.0,
                        1 => -0.0,
                        2 if round % 5 == 0 => f32::NAN,
                        3 if round % 7 == 0 => f32::INFINITY,
                        _ => {
                            let v = ((r >> 20) % distinct) as f32 * 0.013 - 0.3;
                            if round % 2 == 0 {
                                bf16_round(v)
                            } else {
                                v * 1.000_1
                            }
                        }
                    }
                })
                .collect();
            let exact_low = round % 2 == 1;
            let bands = [
                (n - n.min(1 + n / 2), n),
                (n / 10, n - n / 100),
                (0, n),
                (n / 3, n / 3),
                (n.saturating_sub(1), n),
                (1, n.saturating_sub(1)),
            ];
            for (lo, hi) in bands {
                let mut want = data.clone();
                keep_rank_band(&mut want, lo, hi);
                for chunk in [
                    TIE_BLOCK,
                    2 * TIE_BLOCK,
                    n.div_ceil(TIE_BLOCK).max(1) * TIE_BLOCK,
                ] {
                    let got = streamed_band(&data, lo, hi, chunk, exact_low);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "round {round} n {n} band {lo}..{hi} chunk {chunk}"
                    );
                }
            }
        }
    }

    /// A tally's table is the one a tie pass builds, for every cut-off of its band, and it has
    /// none outside the band or for keys with low bits.
    #[test]
    fn tally_tables_equal_tie_pass_tables() {
        use super::*;
        // bf16-like magnitudes spread over ~200 buckets, with a partial last block.
        let n = 5 * TIE_BLOCK + 123;
        let vals: Vec<f32> = (0..n)
            .map(|i| {
                let b = 0x3c00u32 + ((i as u32).wrapping_mul(2_654_435_761) >> 24) % 200;
                let x = f32::from_bits(b << 16);
                if i % 3 == 0 { -x } else { x }
            })
            .collect();
        let mut high = radix::histogram();
        radix::accumulate_high(&mut high, &vals[..TIE_BLOCK]);
        let m = (n / 2) as u64;
        let mut tally = BandTally::around(&high, m, TIE_BLOCK as u64, n as u64).unwrap();
        for b in vals.chunks(TIE_BLOCK) {
            tally.push_block(b);
        }
        let lo = tally.lo;
        for bucket in lo.saturating_sub(3)..lo + TALLY_WIDTH + 3 {
            let cut = bucket << 16;
            let mut want = TieTable::default();
            want.push(0, cut, vals.iter().map(|x| mag_key(*x)));
            let inside = bucket >= lo && bucket < lo + TALLY_WIDTH;
            assert_eq!(
                tally.table(cut),
                inside.then_some(want),
                "bucket {bucket:#x}"
            );
            assert_eq!(tally.table(cut | 1), None);
        }
        assert_eq!(BandTally::around(&high, m, 0, n as u64), None);
    }
}

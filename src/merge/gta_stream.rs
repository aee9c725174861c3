//! The generalized task arithmetic family ([`crate::merge::gta`]) on one tensor, streamed: the
//! same bits as [`gta::merge_tensor`] on the whole tensor, holding only statistics between
//! chunks.
//!
//! What each sparsification needs before the merge pass (every sum runs in index order, in
//! f64, as the whole-tensor kernel's, so the rounded norms are the same):
//! - none, DARE without rescale, DELLA / per-row TIES or breadcrumbs without rescale: nothing
//!   (DARE's draws are keyed by element index; DELLA and `per_row` work row by row, and chunks
//!   hold whole rows);
//! - TIES / breadcrumbs over the tensor: pass 1, a histogram of the high 16 bits of `|δ|`; for
//!   f32 / f16 compute precision pass 2, the low 16 bits inside the cut-off's bucket (bf16
//!   magnitudes have zero low bits, so pass 1 is exact); then, when elements tied at a cut-off
//!   are split, a pass counting the tied ones before every [`TIE_BLOCK`] ([`select`]). With bf16
//!   compute precision over several chunks that pass is usually not needed: the first chunk's
//!   histogram guesses each cut-off's bucket, and pass 1 counts per block the keys of
//!   [`TALLY_WIDTH`] buckets around it ([`BandTally`]); when the cut-off falls inside, its tie
//!   table is those counts' prefix sums (the same table), else the tie pass runs as before;
//! - rescale: `‖δ‖₁` in the first pass, `‖mask(δ)‖₁` in the first pass that knows the mask.
//!
//! Memory: 512 KiB per histogram (one or two per model, during the passes that need them),
//! tie tables of 8 bytes per 4,096 elements per split cut-off, during pass 1 a tally of 130
//! bytes per 4,096 elements per cut-off (at most [`TALLY_BUDGET`] per tensor, else no tally),
//! one span of scratch per task.
//!
//! [`select`]: crate::merge::select
//! [`TALLY_WIDTH`]: crate::merge::select::TALLY_WIDTH

use rayon::prelude::*;

use crate::merge::blocks::{map_spans, scan_spans};
use crate::merge::della::{DellaKeep, della_at};
use crate::merge::dtype::DType;
use crate::merge::error::MergeError;
use crate::merge::gta::{self, Config, ModelParams, combine, task_vector};
use crate::merge::precision::Precision;
use crate::merge::radix;
use crate::merge::rng::KeyedRng;
use crate::merge::select::{BandTally, TIE_BLOCK, TieTable, Top, mag_key, top_from, top_sizes};
use crate::merge::sparsification::Sparsification;
use crate::merge::stream::{TensorStream, sum_start};

/// How one model's task vector is sparsified.
#[derive(Debug, Clone)]
enum Mask {
    /// Kept whole (`density ≥ 1` or no sparsification).
    Keep,
    /// DARE.
    Random,
    /// DELLA, per row (its keep table for the tensor's rows).
    Della(DellaKeep),
    /// TIES / breadcrumbs per row (`per_row`).
    RowBand,
    /// TIES / breadcrumbs over the tensor: `Top(m[0]) \ Top(m[1])`; `tops` are `None` until
    /// the passes resolve them.
    Band {
        m: [u64; 2],
        tops: [Option<Top>; 2],
        tables: [TieTable; 2],
        /// Tables already built from the first pass's [`BandTally`] (no tie pass for them).
        tallied: [bool; 2],
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// High 16 bits, `‖δ‖₁`, and `‖mask(δ)‖₁` where the mask is already known.
    First,
    /// Low 16 bits inside the cut-offs' buckets.
    Low,
    /// Tie tables, and `‖mask(δ)‖₁` where still missing.
    Ties,
    Done,
}

#[derive(Debug, Clone)]
struct Model {
    params: ModelParams,
    rng: KeyedRng,
    mask: Mask,
    l1_sum: f64,
    after_sum: f64,
    after_done: bool,
    scale: Option<f32>,
    high: Vec<u64>,
    low: [Vec<u64>; 2],
    located: [Option<radix::Located>; 2],
    /// Ties seen so far in a sequential pass.
    pass_seen: [u64; 2],
    /// Per-block key counts around each cut-off's guessed bucket, during the first pass.
    tally: [Option<BandTally>; 2],
}

/// The settings every model's pass shares.
#[derive(Debug, Clone, Copy)]
struct Shared {
    cfg: Config,
    n: u64,
    row_len: usize,
    span: usize,
    pass: Pass,
    /// Whether the first pass tallies keys around the cut-offs ([`BandTally`]).
    tally: bool,
}

/// One tensor's GTA merge, streamed ([`TensorStream`]).
#[derive(Debug, Clone)]
pub struct GtaStream {
    shared: Shared,
    weights: Vec<f32>,
    models: Vec<Model>,
}

impl GtaStream {
    /// `models` are the models' parameters for this tensor (base excluded), `n` its element
    /// count, `row_len` its last dimension, `tensor` its name (keying the generator).
    pub fn new(
        cfg: Config,
        models: &[ModelParams],
        n: u64,
        row_len: usize,
        tensor: &str,
    ) -> GtaStream {
        let p = cfg.precision;
        let row_len = row_len.max(1);
        let models: Vec<Model> = models
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mask = if cfg.sparsify_is_noop(m) {
                    Mask::Keep
                } else {
                    match cfg.sparsification {
                        Sparsification::None => Mask::Keep,
                        Sparsification::Random => Mask::Random,
                        Sparsification::DellaMagprune => {
                            Mask::Della(DellaKeep::new(row_len, m.density, m.epsilon, p))
                        }
                        Sparsification::Magnitude | Sparsification::MagnitudeOutliers
                            if cfg.per_row =>
                        {
                            Mask::RowBand
                        }
                        s => {
                            let (lo, hi) = if s == Sparsification::Magnitude {
                                gta::magnitude_band(m.density, n as usize)
                            } else {
                                gta::outliers_band(m.density, m.gamma, n as usize)
                            };
                            let (a, b) = top_sizes(lo, hi, n as usize);
                            let trivial = |m: u64| match m {
                                0 => Some(Top::Nothing),
                                m if m >= n => Some(Top::Everything),
                                _ => None,
                            };
                            Mask::Band {
                                m: [a, b],
                                tops: [trivial(a), trivial(b)],
                                tables: Default::default(),
                                tallied: [false; 2],
                            }
                        }
                    }
                };
                Model {
                    params: *m,
                    rng: KeyedRng::new(cfg.seed, i, tensor),
                    mask,
                    l1_sum: sum_start(),
                    after_sum: sum_start(),
                    after_done: false,
                    scale: None,
                    high: Vec::new(),
                    low: Default::default(),
                    located: [None; 2],
                    pass_seen: [0; 2],
                    tally: [None, None],
                }
            })
            .collect();
        let row_local = models
            .iter()
            .any(|m| matches!(m.mask, Mask::Della(_) | Mask::RowBand));
        let span = if row_local {
            (TIE_BLOCK / row_len).max(1) * row_len
        } else {
            TIE_BLOCK
        };
        let weights = models.iter().map(|m| p.scalar(m.params.weight)).collect();
        let mut s = GtaStream {
            shared: Shared {
                cfg,
                n,
                row_len,
                span,
                pass: Pass::Done,
                tally: false,
            },
            weights,
            models,
        };
        let unresolved = s.models.iter().any(
            |m| matches!(&m.mask, Mask::Band { tops, .. } if tops.iter().any(Option::is_none)),
        );
        let rescaled = cfg.rescale && s.models.iter().any(|m| !matches!(m.mask, Mask::Keep));
        // bf16 keys have zero low bits, so a bucket's count is a key's count (BandTally).
        let cuts = s
            .models
            .iter()
            .map(|m| match &m.mask {
                Mask::Band { tops, .. } => tops.iter().filter(|t| t.is_none()).count() as u64,
                _ => 0,
            })
            .sum::<u64>();
        s.shared.tally = p == Precision::BF16
            && !s.row_local()
            && cuts > 0
            && cuts * BandTally::bytes_for(n) <= TALLY_BUDGET;
        s.shared.pass = if unresolved || rescaled {
            Pass::First
        } else {
            Pass::Done
        };
        s
    }

    fn row_local(&self) -> bool {
        self.models
            .iter()
            .any(|m| matches!(m.mask, Mask::Della(_) | Mask::RowBand))
    }

    /// Whether a tie pass (tables, or a mask norm still missing) is needed.
    fn needs_ties(&self) -> bool {
        self.models.iter().any(|m| {
            let tables = untallied(&m.mask).iter().any(|t| *t);
            let norm = self.shared.cfg.rescale && !matches!(m.mask, Mask::Keep) && !m.after_done;
            tables || norm
        })
    }

    fn finish_scales(&mut self) {
        let p = self.shared.cfg.precision;
        if !self.shared.cfg.rescale {
            return;
        }
        for m in &mut self.models {
            if matches!(m.mask, Mask::Keep) {
                continue;
            }
            let l1 = p.round(m.l1_sum as f32);
            let after = p.round(m.after_sum as f32);
            // As `rescale_l1`: skipped only when a norm is below 1e-7 (a NaN norm still scales).
            m.scale = (!(l1 < 1e-7 || after < 1e-7)).then(|| p.round(l1 / after));
        }
    }
}

impl Shared {
    /// Sparsify `d` (elements `first..` of the tensor) as the whole-tensor kernel would;
    /// `seen` are the ties counted before `first` for the model's cut-offs.
    #[inline]
    fn apply(&self, m: &Model, first: u64, d: &mut [f32], seen: &mut [u64; 2]) -> bool {
        let p = self.cfg.precision;
        let ms = &m.params;
        match &m.mask {
            Mask::Keep => {}
            Mask::Random => gta::random_at(d, first, ms.density, p, &m.rng),
            Mask::Della(keep) => della_at(d, first, keep, &m.rng),
            Mask::RowBand => {
                for row in d.chunks_mut(self.row_len) {
                    if self.cfg.sparsification == Sparsification::Magnitude {
                        gta::magnitude(row, ms.density);
                    } else {
                        gta::magnitude_outliers(row, ms.density, ms.gamma);
                    }
                }
            }
            Mask::Band {
                tops: [Some(a), Some(b)],
                ..
            } => {
                let (a, b) = (*a, *b);
                if a == Top::Everything && b == Top::Nothing {
                    return true;
                }
                // Block masks (vectorizable) rather than `holds` element by element: the same
                // membership, the running tie counts used only where a cut-off's ties split.
                let (mut in_a, mut in_b) = ([0u32; TIE_BLOCK], [0u32; TIE_BLOCK]);
                for block in d.chunks_mut(TIE_BLOCK) {
                    let len = block.len();
                    a.mask_block(block, &mut seen[0], &mut in_a);
                    b.mask_block(block, &mut seen[1], &mut in_b);
                    for ((x, ia), ib) in block.iter_mut().zip(&in_a[..len]).zip(&in_b[..len]) {
                        *x = f32::from_bits(x.to_bits() & ia & !ib);
                    }
                }
            }
            Mask::Band { .. } => return false,
        }
        true
    }

    /// One model's share of a pre-pass over one chunk.
    fn observe_model(
        &self,
        m: &mut Model,
        first: u64,
        base: (DType, &[u8]),
        x: (DType, &[u8]),
    ) -> Result<(), MergeError> {
        let p = self.cfg.precision;
        let active = !matches!(m.mask, Mask::Keep);
        let rescale = self.cfg.rescale && active;
        let resolved = match &m.mask {
            Mask::Band { tops, .. } => tops.iter().all(Option::is_some),
            _ => true,
        };
        let (want_l1, want_high, want_low, want_tables, want_after) = match self.pass {
            Pass::First => (
                rescale,
                !resolved,
                false,
                false,
                rescale && resolved && !m.after_done,
            ),
            Pass::Low => (false, false, !resolved, false, false),
            Pass::Ties => (false, false, false, true, rescale && !m.after_done),
            Pass::Done => return Ok(()),
        };
        let untallied = untallied(&m.mask);
        let has_tables = untallied.iter().any(|t| *t);
        if !(want_l1 || want_high || want_low || want_after || (want_tables && has_tables)) {
            return Ok(());
        }
        // The first chunk of the first pass guesses the cut-offs' buckets from its own
        // histogram, then tallies its blocks again; later chunks tally as they go.
        let n_here = base.1.len() / base.0.size_bytes().max(1);
        let guess = want_high && self.tally && first == 0 && (n_here as u64) < self.n;
        let tallying = want_high && self.tally && !guess && m.tally.iter().any(Option::is_some);
        if want_high && m.high.is_empty() {
            m.high = radix::histogram();
        }
        let mut d = vec![0.0f32; self.span];
        let mut masked = vec![0.0f32; if want_after { self.span } else { 0 }];
        scan_spans(&[base, x], self.span, |start, blocks| {
            let at = first + start as u64;
            let d = &mut d[..blocks[0].len()];
            task_vector(blocks[0], blocks[1], p, d);
            if want_l1 {
                let mut s = m.l1_sum;
                for v in d.iter() {
                    s += v.abs() as f64;
                }
                m.l1_sum = s;
            }
            if want_high {
                radix::accumulate_high(&mut m.high, d);
            }
            if tallying {
                for t in m.tally.iter_mut().flatten() {
                    t.push_block(d);
                }
            }
            if want_low {
                for t in 0..2 {
                    if let Some(at) = m.located[t] {
                        radix::accumulate_low(&mut m.low[t], at.bucket, d);
                    }
                }
            }
            if want_tables && let Mask::Band { tops, tables, .. } = &mut m.mask {
                for t in 0..2 {
                    if let Some(Top::Cut { key, drop }) = tops[t]
                        && drop > 0
                        && untallied[t]
                    {
                        tables[t].push(at as usize, key, d.iter().map(|v| mag_key(*v)));
                    }
                }
            }
            if want_after {
                let md = &mut masked[..d.len()];
                md.copy_from_slice(d);
                let mut seen = m.pass_seen;
                self.apply(m, at, md, &mut seen);
                m.pass_seen = seen;
                let mut s = m.after_sum;
                for v in md.iter() {
                    s += v.abs() as f64;
                }
                m.after_sum = s;
            }
        })?;
        if guess && let Mask::Band { m: ms, tops, .. } = &m.mask {
            for t in 0..2 {
                if tops[t].is_none() {
                    m.tally[t] = BandTally::around(&m.high, ms[t], n_here as u64, self.n);
                }
            }
            let tally = &mut m.tally;
            scan_spans(&[base, x], self.span, |_, blocks| {
                let d = &mut d[..blocks[0].len()];
                task_vector(blocks[0], blocks[1], p, d);
                for t in tally.iter_mut().flatten() {
                    t.push_block(d);
                }
            })?;
        }
        Ok(())
    }
}

/// Bytes of [`BandTally`] one tensor's stream may hold (over every model's cut-offs); a larger
/// tensor takes the tie pass instead.
const TALLY_BUDGET: u64 = 64 << 20;

/// Per cut-off of a band mask: whether its tie table still has to be built by a tie pass.
fn untallied(mask: &Mask) -> [bool; 2] {
    match mask {
        Mask::Band { tops, tallied, .. } => {
            [0, 1].map(|t| tops[t].is_some_and(|c| c.counts_ties()) && !tallied[t])
        }
        _ => [false; 2],
    }
}

impl TensorStream for GtaStream {
    fn align(&self) -> usize {
        if self.row_local() {
            self.shared.row_len
        } else {
            TIE_BLOCK
        }
    }

    fn wants_pass(&self) -> bool {
        self.shared.pass != Pass::Done
    }

    fn observe(&mut self, first: u64, inputs: &[(DType, &[u8])]) -> Result<(), MergeError> {
        if inputs.len() != self.models.len() + 1 {
            return Err(MergeError::WeightCount {
                inputs: inputs.len(),
                weights: self.models.len() + 1,
            });
        }
        let shared = self.shared;
        let base = inputs[0];
        self.models
            .par_iter_mut()
            .zip(inputs[1..].par_iter())
            .try_for_each(|(m, x)| shared.observe_model(m, first, base, *x))
    }

    fn end_pass(&mut self) {
        let p = self.shared.cfg.precision;
        let n = self.shared.n;
        let pass = self.shared.pass;
        let rescale = self.shared.cfg.rescale;
        let mut need_low = false;
        for m in &mut self.models {
            let resolved_before = match &m.mask {
                Mask::Band { tops, .. } => tops.iter().all(Option::is_some),
                _ => true,
            };
            if rescale && resolved_before && !matches!(m.mask, Mask::Keep) {
                // The passes that just ran had the mask: its norm is complete.
                if pass == Pass::First || pass == Pass::Ties {
                    m.after_done = true;
                }
            }
            let tally = std::mem::take(&mut m.tally);
            let Mask::Band {
                m: ms,
                tops,
                tables,
                tallied,
            } = &mut m.mask
            else {
                continue;
            };
            match pass {
                Pass::First => {
                    for t in 0..2 {
                        if tops[t].is_some() {
                            continue;
                        }
                        if p == Precision::BF16 {
                            tops[t] = top_from(&m.high, None, ms[t], n);
                            if let (Some(Top::Cut { key, drop }), Some(tally)) =
                                (tops[t], &tally[t])
                                && drop > 0
                                && let Some(table) = tally.table(key)
                            {
                                tables[t] = table;
                                tallied[t] = true;
                            }
                        } else {
                            m.located[t] = radix::locate(&m.high, ms[t]);
                            m.low[t] = radix::histogram();
                            need_low = true;
                        }
                    }
                    if !need_low {
                        m.high = Vec::new();
                    }
                }
                Pass::Low => {
                    for t in 0..2 {
                        if tops[t].is_none() {
                            tops[t] = top_from(&m.high, Some(&m.low[t]), ms[t], n);
                        }
                    }
                    m.high = Vec::new();
                    m.low = Default::default();
                }
                Pass::Ties | Pass::Done => {}
            }
            // A histogram that could not place a rank (cannot happen for ranks 1..n): keep
            // everything rather than loop.
            if pass != Pass::First || p == Precision::BF16 {
                for t in tops.iter_mut() {
                    if t.is_none() {
                        *t = Some(Top::Everything);
                    }
                }
            }
        }
        for m in &mut self.models {
            m.pass_seen = [0; 2];
        }
        self.shared.pass = match pass {
            Pass::First if need_low => Pass::Low,
            Pass::First | Pass::Low if self.needs_ties() => Pass::Ties,
            _ => Pass::Done,
        };
        if self.shared.pass == Pass::Done {
            self.finish_scales();
        }
    }

    fn merge(
        &self,
        first: u64,
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        if inputs.len() != self.models.len() + 1 {
            return Err(MergeError::WeightCount {
                inputs: inputs.len(),
                weights: self.models.len() + 1,
            });
        }
        if self.wants_pass() {
            return Err(MergeError::NotReady);
        }
        let shared = self.shared;
        let p = shared.cfg.precision;
        let k = self.models.len();
        let init = |task_first: usize| {
            let at = first + task_first as u64;
            let seen: Vec<[u64; 2]> = self
                .models
                .iter()
                .map(|m| match &m.mask {
                    Mask::Band { tables, .. } => [tables[0].before(at), tables[1].before(at)],
                    _ => [0; 2],
                })
                .collect();
            (vec![vec![0.0f32; shared.span]; k], seen)
        };
        map_spans(
            inputs,
            out_dtype,
            out,
            shared.span,
            init,
            |(deltas, seen), start, blocks, o| {
                let at = first + start as u64;
                let base = blocks[0];
                for (i, m) in self.models.iter().enumerate() {
                    let d = &mut deltas[i][..base.len()];
                    task_vector(base, blocks[1 + i], p, d);
                    shared.apply(m, at, d, &mut seen[i]);
                    if let Some(s) = m.scale {
                        for x in d.iter_mut() {
                            *x = p.round(*x * s);
                        }
                    }
                }
                let refs: Vec<&[f32]> = deltas.iter().map(|d| &d[..base.len()]).collect();
                combine(base, &refs, &self.weights, &shared.cfg, o);
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::dtype::encode_from_f32;
    use crate::merge::stream::run_whole;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// Checkpoint-like values with many ties, zeros, −0.0 and the odd NaN / ∞.
        fn tensor(&mut self, n: usize, p: Precision, base: Option<&[f32]>, odd: bool) -> Vec<f32> {
            (0..n)
                .map(|e| {
                    let r = self.next();
                    let v = match r % 61 {
                        0 => 0.0,
                        1 => -0.0,
                        2 if odd => f32::NAN,
                        3 if odd => f32::NEG_INFINITY,
                        4 => base.map_or(0.0, |b| b[e]),
                        _ => {
                            let q = ((r >> 16) % 200) as f32 - 100.0;
                            base.map_or(1.0, |b| b[e]) + q * 0.0007
                        }
                    };
                    p.round(v)
                })
                .collect()
        }
    }

    /// Elements `a..b` of every input.
    fn views(raw: &[Vec<u8>], dt: DType, a: usize, b: usize) -> Vec<(DType, &[u8])> {
        let sz = dt.size_bytes();
        raw.iter().map(|r| (dt, &r[a * sz..b * sz])).collect()
    }

    fn encode(d: DType, v: &[f32]) -> Vec<u8> {
        let mut b = vec![0u8; v.len() * d.size_bytes()];
        encode_from_f32(d, v, &mut b).unwrap();
        b
    }

    fn dtype_of(p: Precision) -> DType {
        match p {
            Precision::BF16 => DType::BF16,
            Precision::F16 => DType::F16,
            Precision::F32 => DType::F32,
        }
    }

    /// The whole-tensor kernel against the stream over chunks of every aligned size; the
    /// number of pre-passes each chunking took (1, 3 blocks per chunk, one chunk).
    fn check(
        cfg: Config,
        models: &[ModelParams],
        n: usize,
        row_len: usize,
        seed: u64,
        odd: bool,
    ) -> Vec<usize> {
        let mut rng = Rng(seed | 1);
        let p = cfg.precision;
        let base = rng.tensor(n, p, None, odd);
        let xs: Vec<Vec<f32>> = models
            .iter()
            .map(|_| rng.tensor(n, p, Some(&base), odd))
            .collect();
        check_on(cfg, models, row_len, &base, &xs, seed)
    }

    /// [`check`] on given tensors.
    fn check_on(
        cfg: Config,
        models: &[ModelParams],
        row_len: usize,
        base: &[f32],
        xs: &[Vec<f32>],
        seed: u64,
    ) -> Vec<usize> {
        let p = cfg.precision;
        let dt = dtype_of(p);
        let n = base.len();
        let refs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
        let mut want = vec![0.0f32; n];
        gta::merge_tensor(base, &refs, models, &cfg, row_len, "t", &mut want);
        let want = encode(dt, &want);
        let raw: Vec<Vec<u8>> = std::iter::once(base)
            .chain(xs.iter().map(|x| x.as_slice()))
            .map(|v| encode(dt, v))
            .collect();
        let mut passes = Vec::new();
        let s0 = GtaStream::new(cfg, models, n as u64, row_len, "t");
        let align = s0.align();
        for chunk_blocks in [1usize, 3, usize::MAX] {
            let chunk = if chunk_blocks == usize::MAX {
                n.max(1)
            } else {
                align * chunk_blocks
            };
            let mut s = s0.clone();
            let sz = dt.size_bytes();
            let view = |a: usize, b: usize| views(&raw, dt, a, b);
            let mut count = 0;
            while s.wants_pass() {
                count += 1;
                let mut a = 0;
                while a < n {
                    let b = (a + chunk).min(n);
                    s.observe(a as u64, &view(a, b)).unwrap();
                    a = b;
                }
                s.end_pass();
            }
            let mut got = vec![0u8; n * sz];
            let mut a = 0;
            while a < n {
                let b = (a + chunk).min(n);
                s.merge(a as u64, &view(a, b), dt, &mut got[a * sz..b * sz])
                    .unwrap();
                a = b;
            }
            assert!(
                got == want,
                "{cfg:?} {models:?} n {n} row {row_len} chunk {chunk} seed {seed}"
            );
            let mut whole = s0.clone();
            let mut got2 = vec![0u8; n * sz];
            run_whole(&mut whole, &view(0, n), dt, &mut got2).unwrap();
            assert!(got2 == want, "whole: {cfg:?} n {n}");
            passes.push(count);
        }
        passes
    }

    /// Two models with different weights, densities and gammas (the third, dense one of the
    /// sparsification test is added there).
    fn two_models() -> [ModelParams; 2] {
        [
            ModelParams {
                weight: 0.5,
                density: 0.5,
                gamma: 0.01,
                epsilon: 0.15,
            },
            ModelParams {
                weight: 0.3,
                density: 0.3,
                gamma: 0.1,
                epsilon: 0.1,
            },
        ]
    }

    /// bf16 TIES and breadcrumbs over several chunks build their tie tables in the histogram
    /// pass when the first chunk's guess holds the cut-offs (one pre-pass), and fall back to the
    /// tie pass when it does not (a first chunk unlike the rest); the same bits either way.
    #[test]
    fn first_pass_tallies_or_falls_back() {
        use Sparsification as S;
        let p = Precision::BF16;
        let ms = two_models();
        let n = 12 * TIE_BLOCK + 77;
        let mut rng = Rng(0x9e37_79b9);
        let base = rng.tensor(n, p, None, false);
        let xs: Vec<Vec<f32>> = (0..2)
            .map(|_| rng.tensor(n, p, Some(&base), false))
            .collect();
        // The first 3 blocks' deltas 64 times larger: a guess from them misses the cut-offs.
        let skewed: Vec<Vec<f32>> = xs
            .iter()
            .map(|x| {
                x.iter()
                    .zip(&base)
                    .enumerate()
                    .map(|(e, (v, b))| {
                        if e < 3 * TIE_BLOCK {
                            p.round(b + (v - b) * 64.0)
                        } else {
                            *v
                        }
                    })
                    .collect()
            })
            .collect();
        for s in [S::Magnitude, S::MagnitudeOutliers] {
            let c = cfg(s, true, p, false, false);
            // Chunks of 1 and 3 blocks: one pass; the whole tensor as one chunk: the tie pass.
            assert_eq!(check_on(c, &ms, 4096, &base, &xs, 1), [1, 1, 2], "{s:?}");
            // The guess from a skewed first chunk of 1 or 3 blocks misses: the tie pass.
            assert_eq!(
                check_on(c, &ms, 4096, &base, &skewed, 2),
                [2, 2, 2],
                "{s:?}"
            );
        }
    }

    fn cfg(
        s: Sparsification,
        consensus: bool,
        p: Precision,
        rescale: bool,
        per_row: bool,
    ) -> Config {
        Config {
            sparsification: s,
            consensus,
            normalize: true,
            rescale,
            lambda: 1.0,
            precision: p,
            seed: 11,
            per_row,
        }
    }

    #[test]
    fn streamed_equals_whole_tensor_for_every_sparsification() {
        use Sparsification as S;
        let mut seed = 0x51_7cc1_b727_220au64;
        for p in [Precision::BF16, Precision::F32, Precision::F16] {
            for (s, consensus) in [
                (S::None, false),
                (S::Magnitude, true),
                (S::MagnitudeOutliers, false),
                (S::MagnitudeOutliers, true),
                (S::Random, false),
                (S::Random, true),
                (S::DellaMagprune, true),
            ] {
                for rescale in [false, true] {
                    for per_row in [false, true] {
                        if per_row && !matches!(s, S::Magnitude | S::MagnitudeOutliers) {
                            continue;
                        }
                        for (n, row_len) in [
                            (1usize, 1usize),
                            (5000, 100),
                            (9000, 4096),
                            (17_000, 17_000),
                        ] {
                            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                            let [m0, m1] = two_models();
                            let ms = [
                                m0,
                                m1,
                                ModelParams {
                                    weight: 1.0,
                                    density: 1.0,
                                    gamma: 0.01,
                                    epsilon: 0.15,
                                },
                            ];
                            let c = cfg(s, consensus, p, rescale, per_row);
                            check(c, &ms, n, row_len, seed, n % 2 == 0);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_densities() {
        use Sparsification as S;
        for s in [
            S::Magnitude,
            S::MagnitudeOutliers,
            S::Random,
            S::DellaMagprune,
        ] {
            for density in [0.0, 1e-9, 0.999_999, 0.9] {
                for gamma in [0.0, 0.5, 0.01] {
                    let ms = [
                        ModelParams {
                            weight: 1.0,
                            density,
                            gamma,
                            epsilon: 0.05,
                        },
                        ModelParams {
                            weight: -0.5,
                            density: 0.5,
                            gamma,
                            epsilon: 0.05,
                        },
                    ];
                    for p in [Precision::BF16, Precision::F32] {
                        check(cfg(s, true, p, true, false), &ms, 8192 + 7, 64, 99, false);
                    }
                }
            }
        }
    }
}

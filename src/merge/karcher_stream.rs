//! The Karcher mean ([`spherical::karcher`](crate::merge::spherical::karcher)) streamed: the
//! same bits without holding the inputs.
//!
//! Each step of the iteration is elementwise once a few scalars are known (the norms, every
//! dot product `u·ûᵢ`, `‖t‖`, `‖u'‖`), and each scalar is a sum over the whole tensor. So the
//! stream gathers the scalars in pre-passes (the models' norms, the first mean's norm, then
//! per iteration the dot products, `‖t‖` and `‖u'‖`): `2 + 3·iterations` passes, at most
//! `2 + 3·max_iter`.
//!
//! Between passes each element's current point `u` is kept in a per-element cache (2 bytes an
//! element for bf16 arithmetic, 4 otherwise), so that every pass costs one step per element.
//! The cache is bounded by a [`CacheBudget`] shared by the job's tensors: a tensor gets a cache
//! for as many of its leading elements as the budget has left, and its remaining elements
//! recompute their `u` from the inputs by replaying the finished iterations (pass `j` then
//! costs `O(j)` for them). Either way the bits are the same. Memory: a few scalars per model
//! per iteration, plus the cache.
//!
//! The per-block arithmetic is written as loops over a block of elements (one operation of the
//! whole-tensor kernel at a time, in its order), so that it vectorizes; the sums stay
//! sequential in index order (the whole-tensor kernel's `.sum::<f64>()`).
//!
//! (Over STYLE.md's ~600 lines: the stage machine, its block loops and the replay they fall
//! back on belong together; a quarter of the file is the bit-identity tests.)

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::merge::blocks::{map_blocks, map_spans, scan_spans};
use crate::merge::dtype::DType;
use crate::merge::error::MergeError;
use crate::merge::precision::{Precision, bf16_round};
use crate::merge::stream::{TensorStream, sum_start};

/// Elements per block of the streamed arithmetic.
const BLOCK: usize = crate::merge::BLOCK_ELEMS;

/// Bytes of per-element cache that the Karcher streams of one job may hold at once.
#[derive(Debug)]
pub struct CacheBudget(AtomicUsize);

impl CacheBudget {
    pub fn new(bytes: usize) -> Arc<CacheBudget> {
        Arc::new(CacheBudget(AtomicUsize::new(bytes)))
    }

    /// Take up to `want` bytes; returns how many were taken.
    fn take(&self, want: usize) -> usize {
        let mut got = 0;
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                got = want.min(left);
                Some(left - got)
            });
        got
    }

    fn give(&self, bytes: usize) {
        self.0.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Bytes not taken.
    pub fn left(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// The cached values of the tensor's leading elements: bf16 bit patterns when the arithmetic
/// is bf16 (every cached value is a bf16-rounded f32, so its low half is zero), else f32.
#[derive(Debug)]
enum Cache {
    Bf16(Vec<u16>),
    Wide(Vec<f32>),
}

impl Cache {
    fn len(&self) -> usize {
        match self {
            Cache::Bf16(v) => v.len(),
            Cache::Wide(v) => v.len(),
        }
    }

    fn load(&self, g0: usize, dst: &mut [f32]) {
        match self {
            Cache::Bf16(v) => {
                let len = dst.len();
                for (d, b) in dst.iter_mut().zip(&v[g0..g0 + len]) {
                    *d = f32::from_bits((*b as u32) << 16);
                }
            }
            Cache::Wide(v) => dst.copy_from_slice(&v[g0..g0 + dst.len()]),
        }
    }

    fn store(&mut self, g0: usize, src: &[f32]) {
        match self {
            Cache::Bf16(v) => {
                for (b, s) in v[g0..g0 + src.len()].iter_mut().zip(src) {
                    *b = (s.to_bits() >> 16) as u16;
                }
            }
            Cache::Wide(v) => v[g0..g0 + src.len()].copy_from_slice(src),
        }
    }
}

/// What the cached value of an element is, relative to its current point `u`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Pending {
    /// `Σ aᵢûᵢ`: `u₀` is it divided by `‖Σ aᵢûᵢ‖` (or the first unit vector).
    Mean,
    /// `u'` of the last finished iteration, before the division by its norm (the norm).
    Moved(f32),
    /// `u` itself.
    Final,
}

/// Rounding to the compute precision, resolved at compile time in the block loops.
trait Round: Copy + Send + Sync {
    fn r(self, x: f32) -> f32;
}

#[derive(Clone, Copy)]
struct RoundF32;
impl Round for RoundF32 {
    #[inline(always)]
    fn r(self, x: f32) -> f32 {
        x
    }
}

#[derive(Clone, Copy)]
struct RoundBf16;
impl Round for RoundBf16 {
    #[inline(always)]
    fn r(self, x: f32) -> f32 {
        bf16_round(x)
    }
}

#[derive(Clone, Copy)]
struct RoundF16;
impl Round for RoundF16 {
    #[inline(always)]
    fn r(self, x: f32) -> f32 {
        Precision::F16.round(x)
    }
}

/// One block's working arrays: the valid models' unit values (`valid × BLOCK`), the current
/// point `u`, a value per element, and one element's unit values for a replay.
struct Scratch {
    units: Vec<f32>,
    u: Vec<f32>,
    v: Vec<f32>,
    one: Vec<f32>,
}

impl Scratch {
    fn new(valid: usize) -> Scratch {
        Scratch {
            units: vec![0.0; valid * BLOCK],
            u: vec![0.0; BLOCK],
            v: vec![0.0; BLOCK],
            one: vec![0.0; valid],
        }
    }
}

/// `sums[j] += u[e]·unitsⱼ[e]` for every element in order, the `K` sums side by side in
/// registers (independent chains; each one adds in index order).
#[inline(always)]
fn dots<const K: usize>(u: &[f32], units: &[f32], sums: &mut [f64]) {
    let mut acc = [0.0f64; K];
    acc.copy_from_slice(&sums[..K]);
    let rows: [&[f32]; K] = std::array::from_fn(|j| &units[j * BLOCK..j * BLOCK + u.len()]);
    for (e, x) in u.iter().enumerate() {
        let x = *x as f64;
        for (a, r) in acc.iter_mut().zip(&rows) {
            *a += x * r[e] as f64;
        }
    }
    sums[..K].copy_from_slice(&acc);
}

/// One finished iteration: per valid model its rounded dot product's coefficient (`None`:
/// skipped, `θ < tol`) and dot, then the update's scalars.
#[derive(Debug, Clone)]
struct Iteration {
    dots: Vec<f32>,
    coefs: Vec<Option<f32>>,
    norm_t: f32,
    c: f32,
    s: f32,
    un: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Norms,
    NormU,
    Dots,
    NormT,
    Un,
    Done,
}

#[derive(Debug)]
pub struct KarcherStream {
    p: Precision,
    models: usize,
    max_iter: usize,
    tol: f64,
    stage: Stage,
    sums: Vec<f64>,
    /// Per model `‖xᵢ‖` as f32 (the divisor of its unit vector).
    nv: Vec<f32>,
    valid: Vec<usize>,
    na: Vec<f32>,
    /// `‖Σ aᵢûᵢ‖`; below `tol` the first unit vector stands in.
    norm_u: f32,
    done: Vec<Iteration>,
    /// The iteration being gathered.
    cur: Option<Iteration>,
    scale: f32,
    /// The tensor's elements and the budget its cache comes out of (none: no cache).
    elems: usize,
    budget: Option<Arc<CacheBudget>>,
    /// Bytes taken from the budget (given back on drop).
    reserved: usize,
    cache: Option<Cache>,
    pending: Pending,
}

impl Drop for KarcherStream {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            b.give(self.reserved);
        }
    }
}

impl KarcherStream {
    /// A stream without a cache (every pass replays the finished iterations).
    pub fn new(p: Precision, models: usize, max_iter: usize, tol: f64) -> KarcherStream {
        KarcherStream {
            p,
            models,
            max_iter,
            tol,
            stage: if models <= 1 {
                Stage::Done
            } else {
                Stage::Norms
            },
            sums: vec![sum_start(); models],
            nv: Vec::new(),
            valid: Vec::new(),
            na: Vec::new(),
            norm_u: 0.0,
            done: Vec::new(),
            cur: None,
            scale: 0.0,
            elems: 0,
            budget: None,
            reserved: 0,
            cache: None,
            pending: Pending::Final,
        }
    }

    /// Cache the current point of (the leading elements of) this tensor of `elems` elements,
    /// out of `budget`.
    pub fn with_cache(mut self, elems: usize, budget: Arc<CacheBudget>) -> KarcherStream {
        self.elems = elems;
        self.budget = Some(budget);
        self
    }

    /// Take the cache out of the budget (once, before the first pass that writes it).
    fn reserve(&mut self) {
        let Some(budget) = &self.budget else { return };
        if self.cache.is_some() || self.reserved > 0 {
            return;
        }
        let size = if self.p == Precision::BF16 { 2 } else { 4 };
        let got = budget.take(self.elems.saturating_mul(size));
        let n = got / size;
        budget.give(got - n * size);
        self.reserved = n * size;
        if n > 0 {
            self.cache = Some(if self.p == Precision::BF16 {
                Cache::Bf16(vec![0; n])
            } else {
                Cache::Wide(vec![0.0; n])
            });
        }
    }

    fn check(&self, inputs: &[(DType, &[u8])]) -> Result<(), MergeError> {
        if inputs.len() != self.models || self.models == 0 {
            return Err(MergeError::WeightCount {
                inputs: inputs.len(),
                weights: self.models.max(1),
            });
        }
        Ok(())
    }

    /// `Σ aᵢûᵢ` before normalization.
    #[inline]
    fn mean(&self, units: &[f32]) -> f32 {
        let p = self.p;
        let mut u = 0.0f32;
        for (a, v) in self.na.iter().zip(units) {
            u = p.round(u + p.round(a * v));
        }
        u
    }

    /// The starting point `u₀` of element with these unit values.
    #[inline]
    fn start(&self, units: &[f32]) -> f32 {
        if (self.norm_u as f64) < self.tol {
            units[0]
        } else {
            self.p.round(self.mean(units) / self.norm_u)
        }
    }

    /// The tangent value `t` of one element at `u` for an iteration's dots and coefficients.
    #[inline]
    fn tangent(&self, it: &Iteration, units: &[f32], u: f32) -> f32 {
        let p = self.p;
        let mut t = 0.0f32;
        for ((dot, coef), y) in it.dots.iter().zip(&it.coefs).zip(units) {
            if let Some(coef) = coef {
                let diff = p.round(y - p.round(dot * u));
                t = p.round(t + p.round(coef * diff));
            }
        }
        t
    }

    /// `u'` before the division by its norm.
    #[inline]
    fn moved(&self, it: &Iteration, units: &[f32], u: f32) -> f32 {
        let p = self.p;
        let t = self.tangent(it, units, u);
        p.round(p.round(it.c * u) + p.round(it.s * p.round(t / it.norm_t)))
    }

    /// `u` of one element after the finished iterations, from its unit values.
    #[inline]
    fn replay(&self, units: &[f32]) -> f32 {
        let mut u = self.start(units);
        for it in &self.done {
            let m = self.moved(it, units, u);
            u = if (it.un as f64) > self.tol {
                self.p.round(m / it.un)
            } else {
                m
            };
        }
        u
    }

    /// The valid models' unit values of a block of `len` elements, into `sc.units`.
    #[inline(always)]
    fn block_units<R: Round>(&self, r: R, blocks: &[&[f32]], len: usize, sc: &mut Scratch) {
        for (dst, &i) in sc.units.chunks_mut(BLOCK).zip(&self.valid) {
            let nv = self.nv[i];
            let dst = &mut dst[..len];
            if nv == 0.0 {
                dst.fill(0.0);
            } else {
                for (d, x) in dst.iter_mut().zip(&blocks[i][..len]) {
                    *d = r.r(x / nv);
                }
            }
        }
    }

    /// `Σ aᵢûᵢ` of every element of the block, into `sc.v`.
    #[inline(always)]
    fn block_mean<R: Round>(&self, r: R, len: usize, sc: &mut Scratch) {
        let v = &mut sc.v[..len];
        v.fill(0.0);
        for (a, units) in self.na.iter().zip(sc.units.chunks(BLOCK)) {
            for (x, y) in v.iter_mut().zip(&units[..len]) {
                *x = r.r(*x + r.r(a * y));
            }
        }
    }

    /// The current point `u` of every element of a block starting at element `g0` of the
    /// tensor, into `sc.u`: from the cache where it covers them, else by replaying.
    #[inline(always)]
    fn block_point<R: Round>(
        &self,
        r: R,
        cache: Option<&Cache>,
        g0: usize,
        len: usize,
        sc: &mut Scratch,
    ) {
        let cached = cache.map_or(0, |c| c.len().saturating_sub(g0).min(len));
        if let Some(c) = cache.filter(|_| cached > 0) {
            let u = &mut sc.u[..cached];
            c.load(g0, u);
            match self.pending {
                Pending::Mean => {
                    if (self.norm_u as f64) < self.tol {
                        u.copy_from_slice(&sc.units[..cached]);
                    } else {
                        let nu = self.norm_u;
                        for x in u.iter_mut() {
                            *x = r.r(*x / nu);
                        }
                    }
                }
                Pending::Moved(un) => {
                    if (un as f64) > self.tol {
                        for x in u.iter_mut() {
                            *x = r.r(*x / un);
                        }
                    }
                }
                Pending::Final => {}
            }
        }
        let k = self.valid.len();
        for e in cached..len {
            for (j, o) in sc.one.iter_mut().enumerate().take(k) {
                *o = sc.units[j * BLOCK + e];
            }
            sc.u[e] = self.replay(&sc.one);
        }
    }

    /// The tangent `t` of every element of the block at `sc.u`, into `sc.v`.
    #[inline(always)]
    fn block_tangent<R: Round>(&self, r: R, it: &Iteration, len: usize, sc: &mut Scratch) {
        let t = &mut sc.v[..len];
        t.fill(0.0);
        let u = &sc.u[..len];
        for ((dot, coef), units) in it.dots.iter().zip(&it.coefs).zip(sc.units.chunks(BLOCK)) {
            let Some(coef) = *coef else { continue };
            let dot = *dot;
            for ((tv, x), y) in t.iter_mut().zip(u).zip(&units[..len]) {
                let diff = r.r(y - r.r(dot * x));
                *tv = r.r(*tv + r.r(coef * diff));
            }
        }
    }

    /// `u'` (before its division by its norm) of every element of the block, into `sc.v`.
    #[inline(always)]
    fn block_moved<R: Round>(&self, r: R, it: &Iteration, len: usize, sc: &mut Scratch) {
        self.block_tangent(r, it, len, sc);
        let (c, s, nt) = (it.c, it.s, it.norm_t);
        for (tv, x) in sc.v[..len].iter_mut().zip(&sc.u[..len]) {
            *tv = r.r(r.r(c * x) + r.r(s * r.r(*tv / nt)));
        }
    }

    /// One block of a pre-pass after the norms: `g0` is its first element in the tensor.
    #[inline(always)]
    fn observe_block<R: Round>(
        &self,
        r: R,
        g0: usize,
        blocks: &[&[f32]],
        cache: &mut Option<Cache>,
        sums: &mut [f64],
        sc: &mut Scratch,
    ) {
        let len = blocks[0].len();
        self.block_units(r, blocks, len, sc);
        let cached = cache
            .as_ref()
            .map_or(0, |c| c.len().saturating_sub(g0).min(len));
        match self.stage {
            Stage::NormU => {
                self.block_mean(r, len, sc);
                if let Some(c) = cache.as_mut().filter(|_| cached > 0) {
                    c.store(g0, &sc.v[..cached]);
                }
                for x in &sc.v[..len] {
                    sums[0] += (*x as f64) * (*x as f64);
                }
            }
            Stage::Dots => {
                self.block_point(r, cache.as_ref(), g0, len, sc);
                if let Some(c) = cache.as_mut().filter(|_| cached > 0) {
                    c.store(g0, &sc.u[..cached]);
                }
                let k = sums.len().min(self.valid.len());
                let (u, units) = (&sc.u[..len], &sc.units[..]);
                match k {
                    1 => dots::<1>(u, units, sums),
                    2 => dots::<2>(u, units, sums),
                    3 => dots::<3>(u, units, sums),
                    4 => dots::<4>(u, units, sums),
                    _ => {
                        for (e, x) in u.iter().enumerate() {
                            let x = *x as f64;
                            for (j, s) in sums[..k].iter_mut().enumerate() {
                                *s += x * units[j * BLOCK + e] as f64;
                            }
                        }
                    }
                }
            }
            Stage::NormT | Stage::Un => {
                let Some(it) = self.cur.as_ref() else { return };
                self.block_point(r, cache.as_ref(), g0, len, sc);
                if self.stage == Stage::NormT {
                    self.block_tangent(r, it, len, sc);
                } else {
                    self.block_moved(r, it, len, sc);
                    if let Some(c) = cache.as_mut().filter(|_| cached > 0) {
                        c.store(g0, &sc.v[..cached]);
                    }
                }
                for x in &sc.v[..len] {
                    sums[0] += (*x as f64) * (*x as f64);
                }
            }
            Stage::Norms | Stage::Done => {}
        }
    }

    /// One block of the merge: `g0` is its first element in the tensor.
    #[inline(always)]
    fn merge_block<R: Round>(
        &self,
        r: R,
        g0: usize,
        blocks: &[&[f32]],
        out: &mut [f32],
        sc: &mut Scratch,
    ) {
        let len = out.len();
        self.block_units(r, blocks, len, sc);
        self.block_point(r, self.cache.as_ref(), g0, len, sc);
        let scale = self.scale;
        for (o, x) in out.iter_mut().zip(&sc.u[..len]) {
            *o = r.r(scale * x);
        }
    }

    fn next_iteration(&mut self) {
        self.stage = if self.done.len() < self.max_iter {
            self.sums = vec![sum_start(); self.valid.len()];
            Stage::Dots
        } else {
            Stage::Done
        };
        if self.stage == Stage::Done {
            self.finish();
        }
    }

    fn finish(&mut self) {
        self.stage = Stage::Done;
        let alpha = 1.0 / self.models as f64;
        let scale: f64 = self.nv.iter().map(|nv| alpha * *nv as f64).sum();
        self.scale = self.p.round(scale as f32);
    }
}

impl TensorStream for KarcherStream {
    fn align(&self) -> usize {
        1
    }

    fn wants_pass(&self) -> bool {
        self.stage != Stage::Done
    }

    fn observe(&mut self, first: u64, inputs: &[(DType, &[u8])]) -> Result<(), MergeError> {
        self.check(inputs)?;
        let first = usize::try_from(first).map_err(|_| MergeError::NotReady)?;
        let mut sums = std::mem::take(&mut self.sums);
        if self.stage == Stage::Norms {
            let r = scan_spans(inputs, BLOCK, |_, blocks| {
                for e in 0..blocks[0].len() {
                    for (s, x) in sums.iter_mut().zip(blocks) {
                        *s += (x[e] as f64) * (x[e] as f64);
                    }
                }
            });
            self.sums = sums;
            return r;
        }
        if self.stage == Stage::NormU {
            self.reserve();
        }
        let mut cache = self.cache.take();
        let mut sc = Scratch::new(self.valid.len());
        let this = &*self;
        let r = scan_spans(inputs, BLOCK, |start, blocks| {
            let g0 = first + start;
            match this.p {
                Precision::F32 => {
                    this.observe_block(RoundF32, g0, blocks, &mut cache, &mut sums, &mut sc)
                }
                Precision::BF16 => {
                    this.observe_block(RoundBf16, g0, blocks, &mut cache, &mut sums, &mut sc)
                }
                Precision::F16 => {
                    this.observe_block(RoundF16, g0, blocks, &mut cache, &mut sums, &mut sc)
                }
            }
        });
        self.cache = cache;
        self.sums = sums;
        r
    }

    fn end_pass(&mut self) {
        let p = self.p;
        let tol = self.tol;
        match self.stage {
            Stage::Norms => {
                self.nv = self.sums.iter().map(|s| s.sqrt() as f32).collect();
                self.valid = (0..self.models)
                    .filter(|&i| self.nv[i] as f64 > tol)
                    .collect();
                if self.valid.is_empty() {
                    self.finish();
                    return;
                }
                let alpha = 1.0 / self.models as f64;
                let alpha_sum: f64 = self.valid.iter().map(|_| alpha).sum();
                self.na = self
                    .valid
                    .iter()
                    .map(|_| (alpha / alpha_sum) as f32)
                    .collect();
                self.sums = vec![sum_start(); 1];
                self.stage = Stage::NormU;
            }
            Stage::NormU => {
                self.norm_u = self.sums[0].sqrt() as f32;
                self.pending = Pending::Mean;
                self.next_iteration();
            }
            Stage::Dots => {
                self.pending = Pending::Final;
                let mut it = Iteration {
                    dots: Vec::new(),
                    coefs: Vec::new(),
                    norm_t: 0.0,
                    c: 0.0,
                    s: 0.0,
                    un: 0.0,
                };
                for (s, a) in self.sums.iter().zip(&self.na) {
                    let dot = p.round(*s as f32).clamp(-1.0, 1.0);
                    let theta = p.round(dot.acos());
                    it.dots.push(dot);
                    it.coefs.push(if (theta as f64) < tol {
                        None
                    } else {
                        let sin_theta = p.round(theta.sin());
                        Some(p.round(a * p.round(theta / sin_theta)))
                    });
                }
                // Every model skipped: t = 0 everywhere, ‖t‖ = 0 (below a positive tol).
                if it.coefs.iter().all(Option::is_none) && tol > 0.0 {
                    self.finish();
                    return;
                }
                self.cur = Some(it);
                self.sums = vec![sum_start(); 1];
                self.stage = Stage::NormT;
            }
            Stage::NormT => {
                let norm_t = self.sums[0].sqrt() as f32;
                if (norm_t as f64) < tol {
                    self.cur = None;
                    self.finish();
                    return;
                }
                if let Some(it) = self.cur.as_mut() {
                    it.norm_t = norm_t;
                    it.c = p.round(norm_t.cos());
                    it.s = p.round(norm_t.sin());
                }
                self.sums = vec![sum_start(); 1];
                self.stage = Stage::Un;
            }
            Stage::Un => {
                let un = self.sums[0].sqrt() as f32;
                self.pending = Pending::Moved(un);
                if let Some(mut it) = self.cur.take() {
                    it.un = un;
                    self.done.push(it);
                }
                self.next_iteration();
            }
            Stage::Done => {}
        }
    }

    fn merge(
        &self,
        first: u64,
        inputs: &[(DType, &[u8])],
        out_dtype: DType,
        out: &mut [u8],
    ) -> Result<(), MergeError> {
        self.check(inputs)?;
        if self.wants_pass() {
            return Err(MergeError::NotReady);
        }
        if self.models == 1 {
            return map_blocks(inputs, out_dtype, out, |b, o| o.copy_from_slice(b[0]));
        }
        if self.valid.is_empty() {
            return map_blocks(inputs, out_dtype, out, |_, o| o.fill(0.0));
        }
        let first = usize::try_from(first).map_err(|_| MergeError::NotReady)?;
        let k = self.valid.len();
        map_spans(
            inputs,
            out_dtype,
            out,
            BLOCK,
            |_| Scratch::new(k),
            |sc, start, b, o| {
                let g0 = first + start;
                match self.p {
                    Precision::F32 => self.merge_block(RoundF32, g0, b, o, sc),
                    Precision::BF16 => self.merge_block(RoundBf16, g0, b, o, sc),
                    Precision::F16 => self.merge_block(RoundF16, g0, b, o, sc),
                }
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::dtype::encode_from_f32;
    use crate::merge::spherical::karcher;

    fn views(raw: &[Vec<u8>], dt: DType, a: usize, e: usize) -> Vec<(DType, &[u8])> {
        let sz = dt.size_bytes();
        raw.iter().map(|r| (dt, &r[sz * a..sz * e])).collect()
    }

    /// Streamed with no cache, a cache of part of the tensor and a cache of all of it, in
    /// chunks of several sizes: the whole-tensor kernel's bits.
    #[test]
    fn streamed_equals_whole() {
        let n = 5000;
        let mut st = 0x1357_9bdfu64;
        let mut next = || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            ((st >> 40) % 2000) as f32 * 0.0001 - 0.1
        };
        let precisions = [
            (Precision::BF16, DType::BF16),
            (Precision::F32, DType::F32),
            (Precision::F16, DType::F16),
        ];
        for (p, dt) in precisions {
            for models in [1usize, 2, 3] {
                for (max_iter, tol) in [(10usize, 1e-5f64), (3, 1e-9), (0, 1e-5)] {
                    let mut vs: Vec<Vec<f32>> = (0..models)
                        .map(|_| (0..n).map(|_| p.round(next())).collect())
                        .collect();
                    if models == 3 {
                        // A zero model is not valid.
                        vs[2].iter_mut().for_each(|x| *x = 0.0);
                    }
                    let refs: Vec<&[f32]> = vs.iter().map(|v| v.as_slice()).collect();
                    let mut want = vec![0.0f32; n];
                    karcher(p, &refs, max_iter, tol, &mut want);
                    let sz = dt.size_bytes();
                    let mut wb = vec![0u8; n * sz];
                    encode_from_f32(dt, &want, &mut wb).unwrap();
                    let raw: Vec<Vec<u8>> = vs
                        .iter()
                        .map(|v| {
                            let mut b = vec![0u8; n * sz];
                            encode_from_f32(dt, v, &mut b).unwrap();
                            b
                        })
                        .collect();
                    // Cache sizes in elements (None: no cache); 4 bytes an element covers
                    // every precision's element size.
                    for cache in [None, Some(2345usize), Some(n)] {
                        for chunk in [1000usize, 4096 + 7] {
                            let mut s = KarcherStream::new(p, models, max_iter, tol);
                            let budget = cache.map(|c| CacheBudget::new(4 * c));
                            if let Some(b) = &budget {
                                s = s.with_cache(n, b.clone());
                            }
                            while s.wants_pass() {
                                for a in (0..n).step_by(chunk) {
                                    s.observe(a as u64, &views(&raw, dt, a, (a + chunk).min(n)))
                                        .unwrap();
                                }
                                s.end_pass();
                            }
                            let mut got = vec![0u8; n * sz];
                            for a in (0..n).step_by(chunk) {
                                let e = (a + chunk).min(n);
                                s.merge(
                                    a as u64,
                                    &views(&raw, dt, a, e),
                                    dt,
                                    &mut got[sz * a..sz * e],
                                )
                                .unwrap();
                            }
                            assert!(
                                got == wb,
                                "{p:?} models {models} iter {max_iter} tol {tol} chunk {chunk} cache {cache:?}"
                            );
                            drop(s);
                            // The budget is whole again once the stream is gone.
                            if let (Some(b), Some(c)) = (&budget, cache) {
                                assert_eq!(b.left(), 4 * c);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_cache_takes_what_the_budget_has_left() {
        let budget = CacheBudget::new(10);
        let mut a = KarcherStream::new(Precision::BF16, 2, 3, 1e-5).with_cache(4, budget.clone());
        a.reserve();
        assert_eq!(a.cache.as_ref().map(Cache::len), Some(4));
        assert_eq!(budget.left(), 2);
        let mut b = KarcherStream::new(Precision::F32, 2, 3, 1e-5).with_cache(4, budget.clone());
        b.reserve();
        // 2 bytes left: not one f32 element.
        assert!(b.cache.is_none());
        assert_eq!(budget.left(), 2);
        drop(a);
        assert_eq!(budget.left(), 10);
        drop(b);
        assert_eq!(budget.left(), 10);
    }
}

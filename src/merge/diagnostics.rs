//! Merge diagnostics over slices: task-vector norms, pairwise cosines, TIES sign conflicts,
//! sparsity and shared-zero fractions. Pure, no I/O.
//!
//! [`Stats`] accumulates one chunk of one tensor at a time (the same element range of every
//! model, plus the base's when there is one) and [`Stats::merge`] adds chunk results up, so a
//! tensor, or a whole model, is the sum of its chunks. Counts are exact whatever the chunking;
//! sums are `f64` and agree across chunkings up to `f64` rounding.
//!
//! Definitions, for element `e` of a tensor, models `θ_1 … θ_n`, base `θ_0`:
//!
//! - **Task vectors** `δ_i = θ_i − θ_0` (in `f64`). Without a base the reference is the models'
//!   elementwise mean, `δ_i = θ_i − (Σ_j θ_j)/n` ([`Reference::Mean`]): how far each model sits
//!   from the uniform soup. Those deviations sum to zero by construction (and for two models
//!   `δ_2 = −δ_1`, cosine −1), so sign statistics are not defined there.
//! - **Norms** `‖δ_i‖₂ = sqrt(Σ_e δ_i²)`; **cosines** `Σ δ_i δ_j / (‖δ_i‖ ‖δ_j‖)`, undefined
//!   (`None`) when either norm is zero.
//! - **Elected sign** (TIES "mass", no trimming, unweighted): `s = +1` if `Σ_i δ_i ≥ 0`, else
//!   `−1` (mergekit's rule for a zero sum). **`sign_conflict`**: the fraction of elements where the
//!   nonzero deltas do not all have one sign. That is exactly the set of elements where at least
//!   one nonzero `δ_i` opposes `s` (if the nonzero signs agree, their sum has that sign; if they
//!   disagree, one side opposes whatever is elected), so it is one number, not two.
//!   **`sign_conflict_models[i]`**: the fraction of model `i`'s elements whose nonzero `δ_i`
//!   opposes `s`: what TIES' disjoint mean drops from model `i`. Denominator for both: the
//!   elements counted (see non-finite values below).
//! - **Sparsity** of model `i`: the fraction of its weights `θ_i` that are exactly zero (`−0.0`
//!   counts as zero). **Shared zeros** (Sparse Model Soups' mask agreement): elements zero in
//!   every model over elements zero in at least one, `|∩|/|∪|`; `1.0` when no model has a zero
//!   (the zero patterns trivially agree).
//! - **Non-finite values**: an element where any model or the base is NaN or ±∞ is left out of
//!   norms, cosines and sign counts (it would make them NaN) and counted in `excluded`; each
//!   input's non-finite values are counted too. Zero counts cover every element.

use crate::merge::dtype::DType;
use crate::merge::error::MergeError;

/// Elements processed per inner block (the deltas of every model for one block live in a
/// scratch of `n × BLOCK` `f64`).
const BLOCK: usize = 1024;

/// What the task vectors are taken against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reference {
    /// `δ_i = θ_i − θ_base`.
    Base,
    /// `δ_i = θ_i − mean_j θ_j` (no base given).
    Mean,
}

/// Mergeable sums and counts over some elements of some tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    models: usize,
    reference: Reference,
    /// Elements seen (every element of every chunk accumulated).
    pub elements: u64,
    /// Elements left out of norms, cosines and signs because an input is non-finite there.
    pub excluded: u64,
    /// `Σ δ_i²` per model.
    pub sq: Vec<f64>,
    /// `Σ δ_i δ_j` for `i < j`, row-major upper triangle (see [`Stats::dot`]).
    pub dots: Vec<f64>,
    /// Elements whose nonzero deltas disagree in sign (base reference only).
    pub conflict_elements: u64,
    /// Per model: elements where its nonzero delta opposes the elected sign (base only).
    pub conflict_models: Vec<u64>,
    /// Per model: weights exactly zero.
    pub zeros: Vec<u64>,
    /// Elements zero in every model.
    pub zeros_all: u64,
    /// Elements zero in at least one model.
    pub zeros_any: u64,
    /// Per model: non-finite weights.
    pub nonfinite: Vec<u64>,
    /// Non-finite weights of the base (0 without a base).
    pub nonfinite_base: u64,
}

/// Finished numbers of a [`Stats`]: what an analysis reports per tensor and in total.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    pub elements: u64,
    /// `‖δ_i‖₂` per model.
    pub norms: Vec<f64>,
    /// `n × n` cosines of the task vectors; `None` where a norm is zero.
    pub cosine: Vec<Vec<Option<f64>>>,
    /// Fraction of counted elements with disagreeing nonzero delta signs; `None` for the mean
    /// reference or when no element was counted.
    pub sign_conflict: Option<f64>,
    /// Per model: fraction of counted elements where its delta opposes the elected sign.
    pub sign_conflict_models: Option<Vec<f64>>,
    /// Per model: fraction of weights that are zero; `None` for an empty tensor.
    pub sparsity: Vec<Option<f64>>,
    /// `|zero in all| / |zero in any|`, 1.0 when no model has a zero.
    pub shared_zeros: f64,
    pub nonfinite: NonFinite,
}

/// Non-finite counts of a [`Summary`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NonFinite {
    /// Non-finite weights per model.
    pub models: Vec<u64>,
    /// Non-finite weights of the base; `None` without a base.
    pub base: Option<u64>,
    /// Elements left out of norms, cosines and sign counts.
    pub excluded_elements: u64,
}

impl Stats {
    /// Empty sums for `models` models against `reference`.
    pub fn new(models: usize, reference: Reference) -> Self {
        Stats {
            models,
            reference,
            elements: 0,
            excluded: 0,
            sq: vec![0.0; models],
            dots: vec![0.0; models * models.saturating_sub(1) / 2],
            conflict_elements: 0,
            conflict_models: vec![0; models],
            zeros: vec![0; models],
            zeros_all: 0,
            zeros_any: 0,
            nonfinite: vec![0; models],
            nonfinite_base: 0,
        }
    }

    /// Number of models.
    pub fn models(&self) -> usize {
        self.models
    }

    /// The reference the deltas are taken against.
    pub fn reference(&self) -> Reference {
        self.reference
    }

    /// Position of the pair `i < j` in [`Stats::dots`].
    fn pair(&self, i: usize, j: usize) -> usize {
        // Rows 0..i hold (n−1) + (n−2) + … + (n−i) entries.
        i * (2 * self.models - i - 1) / 2 + (j - i - 1)
    }

    /// `Σ δ_i δ_j` (any order of `i`, `j`; `Σ δ_i²` when equal).
    pub fn dot(&self, i: usize, j: usize) -> f64 {
        match i.cmp(&j) {
            std::cmp::Ordering::Equal => self.sq[i],
            std::cmp::Ordering::Less => self.dots[self.pair(i, j)],
            std::cmp::Ordering::Greater => self.dots[self.pair(j, i)],
        }
    }

    /// Add one chunk: the same elements of every model (`models[i]`), and of the base when the
    /// reference is [`Reference::Base`]. Every slice must have the same length.
    pub fn accumulate(
        &mut self,
        models: &[&[f32]],
        base: Option<&[f32]>,
    ) -> Result<(), MergeError> {
        let n = self.models;
        if models.len() != n {
            return Err(MergeError::WeightCount {
                inputs: models.len(),
                weights: n,
            });
        }
        let len = models.first().map_or(0, |m| m.len());
        let expect = |index: usize, actual: usize| {
            if actual == len {
                Ok(())
            } else {
                Err(MergeError::InputLength {
                    index,
                    dtype: DType::F32,
                    expected: len * 4,
                    actual: actual * 4,
                    elements: len,
                })
            }
        };
        for (i, m) in models.iter().enumerate() {
            expect(i, m.len())?;
        }
        let base = match (self.reference, base) {
            (Reference::Base, Some(b)) => {
                expect(n, b.len())?;
                Some(b)
            }
            (Reference::Mean, None) => None,
            (Reference::Base, None) | (Reference::Mean, Some(_)) => {
                return Err(MergeError::WeightCount {
                    inputs: n + usize::from(base.is_some()),
                    weights: n + usize::from(self.reference == Reference::Base),
                });
            }
        };
        let mut deltas = vec![0.0f64; n * BLOCK];
        let mut counted = vec![false; BLOCK];
        let mut start = 0;
        while start < len {
            let end = (start + BLOCK).min(len);
            self.block(models, base, start..end, &mut deltas, &mut counted);
            start = end;
        }
        Ok(())
    }

    /// One block: zero and non-finite counts, deltas, then sums and signs.
    fn block(
        &mut self,
        models: &[&[f32]],
        base: Option<&[f32]>,
        range: std::ops::Range<usize>,
        deltas: &mut [f64],
        counted: &mut [bool],
    ) {
        let n = self.models;
        let b = range.len();
        self.elements += b as u64;
        for (k, e) in range.clone().enumerate() {
            let mut zero_count = 0usize;
            let mut finite = true;
            for (i, m) in models.iter().enumerate() {
                let x = m[e];
                if x == 0.0 {
                    self.zeros[i] += 1;
                    zero_count += 1;
                }
                if !x.is_finite() {
                    self.nonfinite[i] += 1;
                    finite = false;
                }
            }
            if zero_count == n {
                self.zeros_all += 1;
            }
            if zero_count > 0 {
                self.zeros_any += 1;
            }
            let reference = match base {
                Some(bs) => {
                    let x = bs[e];
                    if !x.is_finite() {
                        self.nonfinite_base += 1;
                        finite = false;
                    }
                    f64::from(x)
                }
                None => models.iter().map(|m| f64::from(m[e])).sum::<f64>() / n as f64,
            };
            counted[k] = finite;
            if !finite {
                self.excluded += 1;
            }
            for (i, m) in models.iter().enumerate() {
                deltas[i * BLOCK + k] = if finite {
                    f64::from(m[e]) - reference
                } else {
                    0.0
                };
            }
        }
        // Sums: model-major rows of the block, so the inner loops run over contiguous memory.
        for i in 0..n {
            let di = &deltas[i * BLOCK..i * BLOCK + b];
            self.sq[i] += di.iter().map(|d| d * d).sum::<f64>();
            for j in i + 1..n {
                let dj = &deltas[j * BLOCK..j * BLOCK + b];
                let s: f64 = di.iter().zip(dj).map(|(x, y)| x * y).sum();
                let p = self.pair(i, j);
                self.dots[p] += s;
            }
        }
        if self.reference == Reference::Mean {
            return;
        }
        for (k, &ok) in counted.iter().enumerate().take(b) {
            if !ok {
                continue;
            }
            let mut sum = 0.0f64;
            let (mut pos, mut neg) = (false, false);
            for i in 0..n {
                let d = deltas[i * BLOCK + k];
                sum += d;
                pos |= d > 0.0;
                neg |= d < 0.0;
            }
            if !(pos && neg) {
                continue;
            }
            self.conflict_elements += 1;
            let elected_positive = sum >= 0.0;
            for i in 0..n {
                let d = deltas[i * BLOCK + k];
                if (elected_positive && d < 0.0) || (!elected_positive && d > 0.0) {
                    self.conflict_models[i] += 1;
                }
            }
        }
    }

    /// Add another chunk's (or tensor's) sums. Both must be for the same models and reference.
    pub fn merge(&mut self, other: &Stats) -> Result<(), MergeError> {
        if other.models != self.models || other.reference != self.reference {
            return Err(MergeError::WeightCount {
                inputs: other.models,
                weights: self.models,
            });
        }
        self.elements += other.elements;
        self.excluded += other.excluded;
        for (a, b) in self.sq.iter_mut().zip(&other.sq) {
            *a += b;
        }
        for (a, b) in self.dots.iter_mut().zip(&other.dots) {
            *a += b;
        }
        self.conflict_elements += other.conflict_elements;
        for (a, b) in self.conflict_models.iter_mut().zip(&other.conflict_models) {
            *a += b;
        }
        for (a, b) in self.zeros.iter_mut().zip(&other.zeros) {
            *a += b;
        }
        self.zeros_all += other.zeros_all;
        self.zeros_any += other.zeros_any;
        for (a, b) in self.nonfinite.iter_mut().zip(&other.nonfinite) {
            *a += b;
        }
        self.nonfinite_base += other.nonfinite_base;
        Ok(())
    }

    /// The finished numbers.
    pub fn summary(&self) -> Summary {
        let n = self.models;
        let norms: Vec<f64> = self.sq.iter().map(|s| s.sqrt()).collect();
        let cosine = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| {
                        let d = norms[i] * norms[j];
                        (d > 0.0).then(|| (self.dot(i, j) / d).clamp(-1.0, 1.0))
                    })
                    .collect()
            })
            .collect();
        let counted = self.elements - self.excluded;
        let signs = self.reference == Reference::Base && counted > 0;
        let frac = |count: u64, of: u64| count as f64 / of as f64;
        Summary {
            elements: self.elements,
            norms,
            cosine,
            sign_conflict: signs.then(|| frac(self.conflict_elements, counted)),
            sign_conflict_models: signs.then(|| {
                self.conflict_models
                    .iter()
                    .map(|&c| frac(c, counted))
                    .collect()
            }),
            sparsity: self
                .zeros
                .iter()
                .map(|&z| (self.elements > 0).then(|| frac(z, self.elements)))
                .collect(),
            shared_zeros: if self.zeros_any == 0 {
                1.0
            } else {
                frac(self.zeros_all, self.zeros_any)
            },
            nonfinite: NonFinite {
                models: self.nonfinite.clone(),
                base: (self.reference == Reference::Base).then_some(self.nonfinite_base),
                excluded_elements: self.excluded,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1.0)
    }

    fn run(models: &[Vec<f32>], base: Option<&[f32]>) -> Stats {
        let reference = if base.is_some() {
            Reference::Base
        } else {
            Reference::Mean
        };
        let mut s = Stats::new(models.len(), reference);
        let views: Vec<&[f32]> = models.iter().map(Vec::as_slice).collect();
        s.accumulate(&views, base).unwrap();
        s
    }

    /// `base + delta` for a base of 0.5 everywhere (exact in f32 for small multiples of 1/4).
    fn on_base(delta: &[f32]) -> Vec<f32> {
        delta.iter().map(|d| 0.5 + d).collect()
    }

    #[test]
    fn known_cosines_and_norms() {
        // u ⟂ v, both of norm 2; 2u; −u; and a 60° pair p, q (norm √2 each, p·q = 1).
        let u = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0];
        let v = [1.0, -1.0, 1.0, -1.0, 0.0, 0.0];
        let two_u: Vec<f32> = u.iter().map(|x| 2.0 * x).collect();
        let minus_u: Vec<f32> = u.iter().map(|x| -x).collect();
        let p = [0.0, 0.0, 0.0, 0.0, 1.0, 1.0];
        let q = [0.0, 0.0, 0.0, 1.0, 0.0, 1.0];
        let base = [0.5f32; 6];
        let models = vec![
            on_base(&u),
            on_base(&v),
            on_base(&two_u),
            on_base(&minus_u),
            on_base(&p),
            on_base(&q),
        ];
        let s = run(&models, Some(&base)).summary();
        assert_eq!(s.elements, 6);
        let norms = [2.0, 2.0, 4.0, 2.0, 2f64.sqrt(), 2f64.sqrt()];
        for (got, want) in s.norms.iter().zip(norms) {
            assert!(close(*got, want), "{got} vs {want}");
        }
        let c = |i: usize, j: usize| s.cosine[i][j].unwrap();
        assert!(close(c(0, 1), 0.0), "orthogonal");
        assert!(close(c(0, 2), 1.0), "δ and 2δ");
        assert!(close(c(0, 3), -1.0), "δ and −δ");
        assert!(close(c(4, 5), 0.5), "60°: {}", c(4, 5));
        assert!(close(c(1, 0), c(0, 1)) && close(c(5, 4), 0.5), "symmetric");
        assert!(close(c(3, 3), 1.0));
        // u·q = 1, ‖u‖‖q‖ = 2√2.
        assert!(close(c(0, 5), 1.0 / (2.0 * 2f64.sqrt())));
    }

    #[test]
    fn zero_task_vector_has_no_cosine() {
        let base = [1.0f32, 2.0, 3.0];
        let s = run(&[base.to_vec(), vec![1.0, 2.0, 4.0]], Some(&base)).summary();
        assert_eq!(s.norms, vec![0.0, 1.0]);
        assert_eq!(s.cosine[0][1], None);
        assert_eq!(s.cosine[0][0], None);
        assert_eq!(s.cosine[1][1], Some(1.0));
    }

    #[test]
    fn sign_conflicts_by_hand() {
        // Deltas per element (models a, b, c), elected sign, who opposes it:
        // e0: ( 1,  0, -2) Σ=-1 → −, mixed, opposing: a
        // e1: ( 1,  1, -2) Σ= 0 → + (zero sum elects +), mixed, opposing: c
        // e2: ( 0,  1,  0) Σ= 1 → +, not mixed
        // e3: (-1, -1, -2) Σ=-4 → −, not mixed
        // e4: ( 0,  0,  0) nothing
        // e5: ( 3, -1, -1) Σ= 1 → +, mixed, opposing: b, c
        let a = [1.0, 1.0, 0.0, -1.0, 0.0, 3.0];
        let b = [0.0, 1.0, 1.0, -1.0, 0.0, -1.0];
        let c = [-2.0, -2.0, 0.0, -2.0, 0.0, -1.0];
        let base = [0.5f32; 6];
        let s = run(&[on_base(&a), on_base(&b), on_base(&c)], Some(&base));
        assert_eq!(s.conflict_elements, 3);
        assert_eq!(s.conflict_models, vec![1, 1, 2]);
        let sum = s.summary();
        assert_eq!(sum.sign_conflict, Some(0.5));
        assert_eq!(
            sum.sign_conflict_models,
            Some(vec![1.0 / 6.0, 1.0 / 6.0, 2.0 / 6.0])
        );
    }

    #[test]
    fn sparsity_and_shared_zeros() {
        // Zeros: m0 at {0, 1}, m1 at {0, 1, 2}, m2 at {0}. ∩ = {0}, ∪ = {0, 1, 2}.
        let m0 = vec![0.0, -0.0, 1.0, 2.0];
        let m1 = vec![0.0, 0.0, 0.0, 2.0];
        let m2 = vec![-0.0, 3.0, 1.0, 2.0];
        let s = run(&[m0, m1, m2], None).summary();
        assert_eq!(s.sparsity, vec![Some(0.5), Some(0.75), Some(0.25)]);
        assert_eq!(s.shared_zeros, 1.0 / 3.0);
        // No zeros at all: the patterns agree trivially.
        let s = run(&[vec![1.0, 2.0], vec![3.0, 4.0]], None).summary();
        assert_eq!(s.shared_zeros, 1.0);
        assert_eq!(s.sparsity, vec![Some(0.0), Some(0.0)]);
        // Identical masks: 1.0.
        let s = run(&[vec![0.0, 2.0], vec![0.0, 4.0]], None).summary();
        assert_eq!(s.shared_zeros, 1.0);
    }

    #[test]
    fn mean_reference() {
        // Two models: deviations from the mean are ±(θ1 − θ2)/2, cosine −1, no sign numbers.
        let s = run(&[vec![1.0, 3.0, 5.0], vec![3.0, 3.0, 1.0]], None).summary();
        // θ1 − θ2 = (−2, 0, 4): each deviation has norm √20 / 2.
        assert!(close(s.norms[0], 20f64.sqrt() / 2.0));
        assert!(close(s.norms[1], 20f64.sqrt() / 2.0));
        assert!(close(s.cosine[0][1].unwrap(), -1.0));
        assert_eq!(s.sign_conflict, None);
        assert_eq!(s.sign_conflict_models, None);
        assert_eq!(s.nonfinite.base, None);
    }

    #[test]
    fn nonfinite_elements_are_left_out() {
        let base = [0.0f32, 0.0, f32::INFINITY, 0.0];
        let m0 = vec![1.0, f32::NAN, 1.0, 1.0];
        let m1 = vec![1.0, 1.0, 1.0, -1.0];
        let s = run(&[m0, m1], Some(&base));
        assert_eq!(s.excluded, 2);
        assert_eq!(s.nonfinite, vec![1, 0]);
        assert_eq!(s.nonfinite_base, 1);
        let sum = s.summary();
        // Counted: e0 (1, 1) and e3 (1, −1).
        assert_eq!(sum.norms, vec![2f64.sqrt(), 2f64.sqrt()]);
        assert!(close(sum.cosine[0][1].unwrap(), 0.0));
        assert_eq!(sum.sign_conflict, Some(0.5));
        assert_eq!(sum.sign_conflict_models, Some(vec![0.0, 0.5]));
        assert!(sum.norms.iter().all(|x| x.is_finite()));
        assert_eq!(sum.nonfinite.excluded_elements, 2);
        assert_eq!(sum.nonfinite.base, Some(1));
    }

    /// Deterministic values with zeros, negative zeros and a NaN sprinkled in.
    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                match (i as u64 + seed) % 11 {
                    3 => 0.0,
                    7 => -0.0,
                    _ if i == 2500 && seed == 2 => f32::NAN,
                    _ => ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0,
                }
            })
            .collect()
    }

    #[test]
    fn any_chunking_gives_the_same_numbers() {
        let len = 5000;
        let models: Vec<Vec<f32>> = (1..=4).map(|s| values(s, len)).collect();
        let base = values(9, len);
        for reference in [Reference::Base, Reference::Mean] {
            let b = (reference == Reference::Base).then_some(base.as_slice());
            let whole = {
                let mut s = Stats::new(4, reference);
                let v: Vec<&[f32]> = models.iter().map(Vec::as_slice).collect();
                s.accumulate(&v, b).unwrap();
                s
            };
            assert_eq!(whole.elements, len as u64);
            assert_eq!(whole.nonfinite, vec![0, 1, 0, 0]);
            for chunk in [1, 7, 1000, 1024, 1025, 4999] {
                let mut total = Stats::new(4, reference);
                let mut start = 0;
                while start < len {
                    let end = (start + chunk).min(len);
                    let mut part = Stats::new(4, reference);
                    let v: Vec<&[f32]> = models.iter().map(|m| &m[start..end]).collect();
                    part.accumulate(&v, b.map(|b| &b[start..end])).unwrap();
                    total.merge(&part).unwrap();
                    start = end;
                }
                // Counts exactly; sums up to f64 rounding.
                assert_eq!(total.elements, whole.elements);
                assert_eq!(total.excluded, whole.excluded);
                assert_eq!(total.conflict_elements, whole.conflict_elements);
                assert_eq!(total.conflict_models, whole.conflict_models);
                assert_eq!(total.zeros, whole.zeros);
                assert_eq!(
                    (total.zeros_all, total.zeros_any),
                    (whole.zeros_all, whole.zeros_any)
                );
                assert_eq!(total.nonfinite, whole.nonfinite);
                for (a, b) in total
                    .sq
                    .iter()
                    .zip(&whole.sq)
                    .chain(total.dots.iter().zip(&whole.dots))
                {
                    assert!(close(*a, *b), "chunk {chunk}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn matches_a_naive_computation() {
        // The definitions computed element by element, independently of the blocked code.
        let len = 3000;
        let models: Vec<Vec<f32>> = (11..=13).map(|s| values(s, len)).collect();
        let base = values(20, len);
        let s = run(&models, Some(&base));
        let n = models.len();
        let mut sq = vec![0.0f64; n];
        let mut dot01 = 0.0f64;
        let mut conflicts = 0u64;
        for e in 0..len {
            let d: Vec<f64> = models
                .iter()
                .map(|m| f64::from(m[e]) - f64::from(base[e]))
                .collect();
            for (acc, x) in sq.iter_mut().zip(&d) {
                *acc += x * x;
            }
            dot01 += d[0] * d[1];
            let signs: Vec<f64> = d
                .iter()
                .filter(|x| **x != 0.0)
                .map(|x| x.signum())
                .collect();
            if signs.iter().any(|s| *s != signs[0]) {
                conflicts += 1;
            }
        }
        for (got, want) in s.sq.iter().zip(&sq) {
            assert!(close(*got, *want));
        }
        assert!(close(s.dot(0, 1), dot01));
        assert!(close(s.dot(1, 0), dot01));
        assert_eq!(s.conflict_elements, conflicts);
        assert!(conflicts > 0);
    }

    #[test]
    fn pair_index_covers_the_triangle() {
        let s = Stats::new(5, Reference::Mean);
        let mut seen = Vec::new();
        for i in 0..5 {
            for j in i + 1..5 {
                seen.push(s.pair(i, j));
            }
        }
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn mismatched_lengths_are_refused() {
        let mut s = Stats::new(2, Reference::Base);
        let r = s.accumulate(&[&[1.0, 2.0], &[1.0]], Some(&[0.0, 0.0]));
        assert!(matches!(r, Err(MergeError::InputLength { index: 1, .. })));
        let r = s.accumulate(&[&[1.0], &[1.0]], None);
        assert!(r.is_err(), "base reference needs a base");
        assert_eq!(s.elements, 0);
    }
}

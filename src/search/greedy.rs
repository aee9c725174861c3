//! Greedy soup decisions (ALGORITHMS.md §3), without I/O: the order of the candidates, the
//! accept rule, and the state of one search. The driver asks [`Greedy::next`] what to evaluate
//! and hands the score back with [`Greedy::record`].

use serde::{Deserialize, Serialize};

/// When a candidate soup replaces the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Accept {
    /// `score >= best`: the paper's Recipe 1 (the default).
    #[serde(rename = ">=")]
    GreaterOrEqual,
    /// `score > best`: `mlfoundations/model-soups` main.py.
    #[serde(rename = ">")]
    Greater,
}

impl Accept {
    pub fn accepts(self, score: f64, best: f64) -> bool {
        match self {
            Accept::GreaterOrEqual => score >= best,
            Accept::Greater => score > best,
        }
    }
}

/// Indices of `scores` by score, descending; equal scores keep input order (stable).
pub fn order(scores: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    // total_cmp: scores are finite (checked when recorded), so this is the numeric order.
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    idx
}

/// Evaluations a greedy search over `n` models needs when `unscored` of them have no
/// supplied score: one per unscored model, then one per candidate after the first.
pub fn evaluations_needed(n: usize, unscored: usize) -> usize {
    unscored + n.saturating_sub(1)
}

/// One greedy pass over models already scored individually.
#[derive(Debug, Clone, PartialEq)]
pub struct Greedy {
    accept: Accept,
    order: Vec<usize>,
    /// Positions in `order` already decided (the first is accepted without evaluation).
    decided: usize,
    accepted: Vec<usize>,
    best: f64,
}

impl Greedy {
    /// Start from the best single model. `scores` has one finite score per model.
    pub fn new(scores: &[f64], accept: Accept) -> Option<Greedy> {
        let order = order(scores);
        let first = *order.first()?;
        Some(Greedy {
            accept,
            order,
            decided: 1,
            accepted: vec![first],
            best: scores[first],
        })
    }

    /// The next candidate: the accepted set plus the next model (input indices, in the
    /// order they were accepted), or `None` when every model was tried.
    pub fn next(&self) -> Option<Vec<usize>> {
        let m = *self.order.get(self.decided)?;
        let mut set = self.accepted.clone();
        set.push(m);
        Some(set)
    }

    /// The score of the candidate [`Greedy::next`] returned; true when it was accepted.
    pub fn record(&mut self, score: f64) -> bool {
        let Some(&m) = self.order.get(self.decided) else {
            return false;
        };
        self.decided += 1;
        if self.accept.accepts(score, self.best) {
            self.accepted.push(m);
            self.best = score;
            true
        } else {
            false
        }
    }

    pub fn accepted(&self) -> &[usize] {
        &self.accepted
    }

    pub fn best(&self) -> f64 {
        self.best
    }

    pub fn order(&self) -> &[usize] {
        &self.order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_descending_and_stable_on_ties() {
        assert_eq!(order(&[0.5, 0.9, 0.5, 0.9, 0.1]), vec![1, 3, 0, 2, 4]);
        assert_eq!(order(&[]), Vec::<usize>::new());
    }

    #[test]
    fn accept_rules_differ_only_on_a_tie() {
        assert!(Accept::GreaterOrEqual.accepts(0.7, 0.7));
        assert!(!Accept::Greater.accepts(0.7, 0.7));
        assert!(Accept::Greater.accepts(0.71, 0.7));
        assert!(!Accept::GreaterOrEqual.accepts(0.69, 0.7));
    }

    #[test]
    fn a_pass_accepts_improvements_and_skips_the_rest() {
        // Order: 2 (0.9), 0 (0.8), 3 (0.6), 1 (0.3).
        let mut g = Greedy::new(&[0.8, 0.3, 0.9, 0.6], Accept::GreaterOrEqual).unwrap();
        assert_eq!(g.accepted(), &[2]);
        assert_eq!(g.next(), Some(vec![2, 0]));
        assert!(g.record(0.95));
        assert_eq!(g.next(), Some(vec![2, 0, 3]));
        assert!(!g.record(0.94));
        assert_eq!(g.next(), Some(vec![2, 0, 1]));
        assert!(g.record(0.95)); // a tie is accepted with >=
        assert_eq!(g.next(), None);
        assert_eq!(g.accepted(), &[2, 0, 1]);
        assert_eq!(g.best(), 0.95);
        assert!(!g.record(1.0)); // nothing left to decide
    }

    #[test]
    fn strict_rule_rejects_a_tie() {
        let mut g = Greedy::new(&[0.5, 0.5], Accept::Greater).unwrap();
        assert_eq!(g.next(), Some(vec![0, 1]));
        assert!(!g.record(0.5));
        assert_eq!(g.accepted(), &[0]);
        assert_eq!(g.best(), 0.5);
    }

    #[test]
    fn budget_counts_individuals_and_candidates() {
        assert_eq!(evaluations_needed(4, 0), 3);
        assert_eq!(evaluations_needed(4, 4), 7);
        assert_eq!(evaluations_needed(1, 1), 1);
        assert_eq!(evaluations_needed(0, 0), 0);
        assert!(Greedy::new(&[], Accept::Greater).is_none());
    }
}

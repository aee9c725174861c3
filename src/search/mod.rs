//! Evaluation-driven soups (issue 4): greedy soup and parameter sweeps, driven by scores from
//! a client-run evaluator over HTTP.

pub mod evaluator;
pub mod greedy;
pub mod run;
pub mod spec;

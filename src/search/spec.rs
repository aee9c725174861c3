//! What a merge job stores and runs ([`JobSpec`]: a recipe, and the search around it, if any),
//! and the search part of a request: the fields `evaluator`, `accept`, `sweep` and per-model
//! `score`, validated into [`Search`]. This layer sits above `recipe`: [`from_request`] takes
//! the search fields off a request and validates the merges with `Recipe::from_request`.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::greedy::{self, Accept};
pub use crate::recipe::{EvaluatorSpec, SweepSpec};
use crate::recipe::{MergeRequest, Recipe, RecipeError, Submission};

/// Longest evaluator call the request may ask for.
pub const MAX_TIMEOUT_S: f64 = 3600.0;
/// Most evaluations one search may make.
pub const MAX_EVALUATIONS: u32 = 10_000;

/// What a merge job stores and runs: the recipe (the soup to write, or for a search the
/// recipe it searches around) and the search. Stored as the recipe's JSON with `search` beside
/// its fields; without a search it is exactly the recipe's JSON (and hash).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    #[serde(flatten)]
    pub recipe: Recipe,
    /// An evaluation-driven search (greedy soup, sweep); the worker runs it and writes the
    /// chosen soup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<Search>,
}

impl JobSpec {
    /// SHA-256 of the stored JSON form: two requests with the same hash ask for the same job
    /// (used to detect an idempotency key reused with another body).
    pub fn hash(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).unwrap_or_default();
        Sha256::digest(&json).to_vec()
    }
}

/// A validated job and the scheduling options that travel beside it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSubmission {
    pub job: JobSpec,
    pub idempotency_key: Option<String>,
    pub priority: i32,
    pub max_attempts: Option<i32>,
}

impl JobSubmission {
    fn new(sub: Submission, search: Option<Search>) -> JobSubmission {
        JobSubmission {
            job: JobSpec {
                recipe: sub.recipe,
                search,
            },
            idempotency_key: sub.idempotency_key,
            priority: sub.priority,
            max_attempts: sub.max_attempts,
        }
    }
}

/// Validate a parsed request: a sweep, a greedy soup, or one merge.
pub fn from_request(mut req: MergeRequest) -> Result<JobSubmission, RecipeError> {
    if let Some(spec) = req.sweep.take() {
        return sweep(req, spec);
    }
    let greedy = take_greedy(&mut req)?;
    let evaluator = req.evaluator.take();
    let accept = req.accept.take();
    let mut sub = Recipe::from_request(req)?;
    if greedy.is_some() {
        // The models merged are chosen while the search runs.
        sub.recipe.mergekit_config = None;
    }
    let search = greedy
        .map(|g| g.finish(evaluator.as_ref(), accept.as_deref()))
        .transpose()?;
    Ok(JobSubmission::new(sub, search))
}

impl From<Invalid> for RecipeError {
    fn from(e: Invalid) -> Self {
        RecipeError::Invalid {
            field: e.field,
            message: e.message,
        }
    }
}

/// A validated evaluator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluator {
    pub url: String,
    pub timeout_s: f64,
    pub max_evaluations: u32,
}

/// What a job searches over; the recipe beside it is the uniform soup of all models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Search {
    /// Greedy soup: `scores[i]` is model i's supplied score (`None`: evaluate it first).
    Greedy {
        evaluator: Evaluator,
        accept: Accept,
        scores: Vec<Option<f64>>,
    },
    /// One merge per value of `parameter`; `variants[i]` is the recipe for `values[i]`.
    Sweep {
        evaluator: Evaluator,
        parameter: String,
        values: Vec<serde_json::Value>,
        variants: Vec<Recipe>,
    },
}

impl Search {
    pub fn evaluator(&self) -> &Evaluator {
        match self {
            Search::Greedy { evaluator, .. } | Search::Sweep { evaluator, .. } => evaluator,
        }
    }
}

/// Parameters a sweep may vary.
pub const SWEEP_PARAMETERS: [&str; 4] = ["lambda", "t", "density", "weight"];
/// Most values one sweep may try.
pub const MAX_SWEEP_VALUES: usize = 256;

/// A sweep request: each value validated as the same request with `parameters.<parameter>`
/// set to it (so ranges and applicability are the method's own rules); the recipe is the
/// first value's, with the search beside it.
fn sweep(mut req: MergeRequest, sweep: SweepSpec) -> Result<JobSubmission, RecipeError> {
    if req.method == "greedy_soup" {
        return Err(invalid("sweep", "a greedy soup cannot also sweep").into());
    }
    if !SWEEP_PARAMETERS.contains(&sweep.parameter.as_str()) {
        return Err(invalid(
            "sweep.parameter",
            format!("use one of {}", SWEEP_PARAMETERS.join(", ")),
        )
        .into());
    }
    if sweep.values.is_empty() || sweep.values.len() > MAX_SWEEP_VALUES {
        return Err(invalid(
            "sweep.values",
            format!("give 1 to {MAX_SWEEP_VALUES} values"),
        )
        .into());
    }
    if req.parameters.contains_key(&sweep.parameter) {
        return Err(invalid(
            format!("parameters.{}", sweep.parameter),
            "the sweep sets it; give it only in sweep.values",
        )
        .into());
    }
    let spec = req
        .evaluator
        .take()
        .ok_or_else(|| invalid("evaluator", "a sweep needs an evaluator"))?;
    let evaluator = evaluator(&spec, sweep.values.len())?;
    // Scores and an accept rule belong to greedy soups only.
    take_greedy(&mut req)?;
    let mut variants = Vec::with_capacity(sweep.values.len());
    let mut first = None;
    for (i, v) in sweep.values.iter().enumerate() {
        let mut one = req.clone();
        one.parameters.insert(sweep.parameter.clone(), v.clone());
        let sub = Recipe::from_request(one).map_err(|e| match e {
            RecipeError::Invalid { field, message } => RecipeError::Invalid {
                field: format!("sweep.values[{i}]"),
                message: format!("{field}: {message}"),
            },
            other => other,
        })?;
        variants.push(sub.recipe.clone());
        first.get_or_insert(sub);
    }
    let sub = first.ok_or_else(|| invalid("sweep.values", "no values"))?;
    let search = Search::Sweep {
        evaluator,
        parameter: sweep.parameter,
        values: sweep.values,
        variants,
    };
    Ok(JobSubmission::new(sub, Some(search)))
}

/// A field-named validation failure.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Validate the evaluator: an http(s) URL without credentials, query or fragment, a positive
/// timeout, and (with `needed`) a budget that covers the search.
pub fn evaluator(spec: &EvaluatorSpec, needed: usize) -> Result<Evaluator, Invalid> {
    let url = url::Url::parse(&spec.url)
        .map_err(|e| invalid("evaluator.url", format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("evaluator.url", "the scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("evaluator.url", "must name a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("evaluator.url", "must not carry credentials"));
    }
    if url.fragment().is_some() {
        return Err(invalid("evaluator.url", "must not have a fragment"));
    }
    let timeout_s = spec.timeout_s.unwrap_or(300.0);
    if !(timeout_s.is_finite() && timeout_s > 0.0 && timeout_s <= MAX_TIMEOUT_S) {
        return Err(invalid(
            "evaluator.timeout_s",
            format!("must be a number of seconds in (0, {MAX_TIMEOUT_S}]"),
        ));
    }
    let max_evaluations = spec
        .max_evaluations
        .unwrap_or(u32::try_from(needed).unwrap_or(u32::MAX));
    if max_evaluations > MAX_EVALUATIONS {
        return Err(invalid(
            "evaluator.max_evaluations",
            format!("at most {MAX_EVALUATIONS}"),
        ));
    }
    if (max_evaluations as usize) < needed {
        return Err(invalid(
            "evaluator.max_evaluations",
            format!(
                "the search needs {needed} evaluations (one per model without a score, then one \
                 per candidate after the best model); {max_evaluations} allowed"
            ),
        ));
    }
    Ok(Evaluator {
        url: url.to_string(),
        timeout_s,
        max_evaluations,
    })
}

/// Validate a greedy soup's search part. `scores[i]` is the supplied score of model i.
pub fn greedy(
    spec: Option<&EvaluatorSpec>,
    accept: Option<&str>,
    scores: Vec<Option<f64>>,
) -> Result<Search, Invalid> {
    let spec = spec.ok_or_else(|| invalid("evaluator", "method greedy_soup needs an evaluator"))?;
    for (i, s) in scores.iter().enumerate() {
        if s.is_some_and(|s| !s.is_finite()) {
            return Err(invalid(
                format!("models[{i}].score"),
                "must be a finite number",
            ));
        }
    }
    let accept = match accept {
        None | Some(">=") => Accept::GreaterOrEqual,
        Some(">") => Accept::Greater,
        Some(_) => return Err(invalid("accept", "use \">=\" (the paper) or \">\"")),
    };
    let unscored = scores.iter().filter(|s| s.is_none()).count();
    let evaluator = evaluator(spec, greedy::evaluations_needed(scores.len(), unscored))?;
    Ok(Search::Greedy {
        evaluator,
        accept,
        scores,
    })
}

/// A greedy soup request, its search fields taken off: the rest parses as a uniform linear
/// soup of the same models.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingGreedy {
    scores: Vec<Option<f64>>,
}

impl PendingGreedy {
    pub fn finish(
        self,
        evaluator: Option<&EvaluatorSpec>,
        accept: Option<&str>,
    ) -> Result<Search, Invalid> {
        greedy(evaluator, accept, self.scores)
    }
}

/// Recognize `method: "greedy_soup"` and turn the request into the uniform `linear` soup it
/// searches within; refuse search fields on any other method.
pub fn take_greedy(req: &mut MergeRequest) -> Result<Option<PendingGreedy>, Invalid> {
    if req.method != "greedy_soup" {
        if let Some(i) = req.models.iter().position(|m| m.score.is_some()) {
            return Err(invalid(
                format!("models[{i}].score"),
                "only method greedy_soup takes a score",
            ));
        }
        if req.evaluator.is_some() {
            return Err(invalid(
                "evaluator",
                "only method greedy_soup uses an evaluator",
            ));
        }
        if req.accept.is_some() {
            return Err(invalid("accept", "only method greedy_soup takes accept"));
        }
        return Ok(None);
    }
    if req.base_model.is_some() {
        return Err(invalid(
            "base_model",
            "method greedy_soup averages the models themselves; it takes no base model",
        ));
    }
    if !req.slices.is_empty() {
        return Err(invalid("slices", "method greedy_soup takes no slices"));
    }
    if let Some(key) = req.parameters.keys().next() {
        return Err(invalid(
            format!("parameters.{key}"),
            "method greedy_soup takes no parameters (every soup is a uniform average)",
        ));
    }
    for (i, m) in req.models.iter().enumerate() {
        if m.weight.is_some() {
            return Err(invalid(
                format!("models[{i}].weight"),
                "method greedy_soup averages uniformly; give no weights",
            ));
        }
        if let Some(key) = m.parameters.keys().next() {
            return Err(invalid(
                format!("models[{i}].parameters.{key}"),
                "method greedy_soup takes no per-model parameters",
            ));
        }
    }
    let scores = req.models.iter_mut().map(|m| m.score.take()).collect();
    req.method = "linear".into();
    Ok(Some(PendingGreedy { scores }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str, max: Option<u32>) -> EvaluatorSpec {
        EvaluatorSpec {
            url: url.into(),
            timeout_s: None,
            max_evaluations: max,
        }
    }

    #[test]
    fn budget_must_cover_the_search() {
        let e = greedy(
            Some(&spec("http://127.0.0.1:1/eval", Some(3))),
            None,
            vec![None, Some(1.0), None],
        )
        .unwrap_err();
        assert_eq!(e.field, "evaluator.max_evaluations");
        assert!(e.message.contains("needs 4"), "{}", e.message);
        let ok = greedy(
            Some(&spec("http://127.0.0.1:1/eval", None)),
            Some(">"),
            vec![None, Some(1.0), None],
        )
        .unwrap();
        assert_eq!(ok.evaluator().max_evaluations, 4);
    }

    #[test]
    fn bad_fields_are_named() {
        let field = |r: Result<Search, Invalid>| r.unwrap_err().field;
        assert_eq!(field(greedy(None, None, vec![None])), "evaluator");
        assert_eq!(
            field(greedy(Some(&spec("ftp://h/x", None)), None, vec![None])),
            "evaluator.url"
        );
        assert_eq!(
            field(greedy(
                Some(&spec("http://u:p@h/x", None)),
                None,
                vec![None]
            )),
            "evaluator.url"
        );
        assert_eq!(
            field(greedy(
                Some(&spec("http://h/x", None)),
                Some("=="),
                vec![None]
            )),
            "accept"
        );
        assert_eq!(
            field(greedy(
                Some(&spec("http://h/x", None)),
                None,
                vec![Some(f64::NAN)]
            )),
            "models[0].score"
        );
    }
}

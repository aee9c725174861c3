//! The greedy soup driver: score the unscored models, then try each candidate soup (the
//! accepted set plus the next model, a uniform `linear` recipe) by writing it through the
//! engine to a scratch folder, asking the evaluator, and deleting it. The chosen soup is then
//! written to the output like any merge, with the search record in its manifest.
//!
//! Evaluation ids are `<job_id>/<step>`, so a later attempt replays the same steps; a step
//! already recorded in the job's stored progress reuses its score instead of asking again.
//! After every evaluation the record is stored (a fenced heartbeat) before the next step.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};

use super::evaluator::{AllowedHosts, Client, EvaluatorError, Request};
use super::greedy::{Accept, Greedy};
use super::spec::{JobSpec, Search};
use crate::engine::{Engine, EngineError, MergeOutcome, RunControl};
use crate::methods::Parameters;
use crate::methods::linear::{self, LinearConfig};
use crate::recipe::{Ingredient, Recipe};
use crate::storage::Location;

/// Folder, beside the output, that holds the candidates of running searches.
pub const SCRATCH_DIR: &str = ".ladle-scratch";

/// One evaluation, as recorded in progress and in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub evaluation_id: String,
    pub purpose: String,
    /// Indices into the recipe's models.
    pub ingredients: Vec<usize>,
    pub score: f64,
    #[serde(default)]
    pub metrics: serde_json::Value,
    /// Candidates: whether the candidate became the soup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted: Option<bool>,
}

/// One accepted model and the score of the soup when it joined.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AcceptedModel {
    pub model: usize,
    pub uri: String,
    pub score: f64,
}

/// What progress and the manifest show.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub kind: String,
    pub accept: Accept,
    /// The order candidates are tried in (model indices), once every model has a score.
    #[serde(default)]
    pub order: Vec<usize>,
    pub evaluations: Vec<Evaluation>,
    pub accepted: Vec<AcceptedModel>,
    #[serde(default)]
    pub best_score: Option<f64>,
    /// Evaluations made or replayed so far (the next evaluation id's step).
    pub step: usize,
    pub done: bool,
}

/// Evaluations a previous attempt recorded in the job's progress, by evaluation id.
pub fn recorded(progress: Option<&serde_json::Value>) -> BTreeMap<String, Evaluation> {
    progress
        .and_then(|p| p.get("search"))
        .and_then(|s| s.get("evaluations"))
        .and_then(|e| serde_json::from_value::<Vec<Evaluation>>(e.clone()).ok())
        .map(|evals| {
            evals
                .into_iter()
                .map(|e| (e.evaluation_id.clone(), e))
                .collect()
        })
        .unwrap_or_default()
}

/// What a search runs with.
pub struct Driver<'a> {
    pub engine: &'a Engine,
    pub ctl: &'a Arc<RunControl>,
    pub job_id: String,
    pub allowed: &'a AllowedHosts,
    /// Evaluations of earlier attempts of this job.
    pub recorded: BTreeMap<String, Evaluation>,
    /// First pause between evaluator retries.
    pub backoff: Duration,
}

/// Run a merge job, for the worker and `ladle merge` alike: its search when it has one
/// (through `driver`), else its recipe.
pub async fn run_job(driver: &Driver<'_>, job: &JobSpec) -> Result<MergeOutcome, EngineError> {
    match &job.search {
        Some(search) => driver.run(&job.recipe, search).await,
        None => driver.engine.run(&job.recipe, driver.ctl).await,
    }
}

impl Driver<'_> {
    /// Run `search` around `recipe` and write the chosen soup.
    pub async fn run(&self, recipe: &Recipe, search: &Search) -> Result<MergeOutcome, EngineError> {
        let (evaluator, accept, scores) = match search {
            Search::Sweep {
                evaluator,
                parameter,
                values,
                variants,
            } => {
                let result = self
                    .sweep(recipe, evaluator, parameter, values, variants)
                    .await;
                if let Err(e) = &result
                    && !matches!(e, EngineError::LeaseLost)
                    && let Ok(scratch) = self.scratch(recipe)
                {
                    remove_scratch(&scratch).await;
                }
                return result;
            }
            Search::Greedy {
                evaluator,
                accept,
                scores,
            } => (evaluator, accept, scores),
        };
        self.allowed.check(&evaluator.url)?;
        let mut client = Client::new().map_err(EngineError::Internal)?;
        client.backoff = self.backoff;
        let timeout = Duration::from_secs_f64(evaluator.timeout_s);
        let scratch = self.scratch(recipe)?;
        remove_scratch(&scratch).await;
        let result = self
            .greedy(recipe, evaluator, accept, scores, client, timeout, &scratch)
            .await;
        // A failed (or cancelled) search leaves no candidates behind; after a lost lease another
        // worker may be using them.
        if !matches!(result, Err(EngineError::LeaseLost)) {
            remove_scratch(&scratch).await;
        }
        let chosen = result?;
        // 3. The chosen soup, as a plain recipe, to the output.
        self.engine.run(&chosen, self.ctl).await
    }

    /// Steps 1 and 2 of a greedy soup: the recipe of the chosen soup.
    #[allow(clippy::too_many_arguments)]
    async fn greedy(
        &self,
        recipe: &Recipe,
        evaluator: &super::spec::Evaluator,
        accept: &Accept,
        scores: &[Option<f64>],
        client: Client,
        timeout: Duration,
        scratch: &Location,
    ) -> Result<Recipe, EngineError> {
        let mut record = Record {
            kind: "greedy".into(),
            accept: *accept,
            order: Vec::new(),
            evaluations: Vec::new(),
            accepted: Vec::new(),
            best_score: None,
            step: 0,
            done: false,
        };
        let mut ctx = Step {
            driver: self,
            client: &client,
            url: &evaluator.url,
            timeout,
            max: evaluator.max_evaluations as usize,
            recipe,
            scratch,
        };

        // 1. Every model without a supplied score, in input order: the model itself.
        let mut known = Vec::with_capacity(scores.len());
        for (i, s) in scores.iter().enumerate() {
            let score = match s {
                Some(s) => *s,
                None => {
                    ctx.evaluate(&mut record, vec![i], "individual")
                        .await?
                        .score
                }
            };
            known.push(score);
        }
        // 2. One pass over the others, best first.
        let mut greedy = Greedy::new(&known, *accept)
            .ok_or_else(|| EngineError::Internal("a greedy soup without models".into()))?;
        record.order = greedy.order().to_vec();
        let first = greedy.accepted()[0];
        record.accepted.push(AcceptedModel {
            model: first,
            uri: recipe.models[first].uri.clone(),
            score: known[first],
        });
        record.best_score = Some(greedy.best());
        self.publish(&record).await?;
        while let Some(set) = greedy.next() {
            let eval = ctx.evaluate(&mut record, set.clone(), "candidate").await?;
            let took = greedy.record(eval.score);
            if let Some(e) = record.evaluations.last_mut() {
                e.accepted = Some(took);
            }
            if took && let Some(&m) = set.last() {
                record.accepted.push(AcceptedModel {
                    model: m,
                    uri: recipe.models[m].uri.clone(),
                    score: eval.score,
                });
            }
            record.best_score = Some(greedy.best());
            self.publish(&record).await?;
        }
        record.done = true;
        self.publish(&record).await?;
        Ok(soup(recipe, greedy.accepted(), recipe.output.uri.clone()))
    }

    /// One merge per value, each scored; the best (the first on a tie) is written to the
    /// output. Evaluation `<job_id>/<i>` is value `i`.
    async fn sweep(
        &self,
        recipe: &Recipe,
        evaluator: &super::spec::Evaluator,
        parameter: &str,
        values: &[serde_json::Value],
        variants: &[Recipe],
    ) -> Result<MergeOutcome, EngineError> {
        self.allowed.check(&evaluator.url)?;
        let mut client = Client::new().map_err(EngineError::Internal)?;
        client.backoff = self.backoff;
        let scratch = self.scratch(recipe)?;
        remove_scratch(&scratch).await;
        let timeout = Duration::from_secs_f64(evaluator.timeout_s);
        let mut evaluations: Vec<Evaluation> = Vec::new();
        let mut best: Option<(usize, f64)> = None;
        for (i, variant) in variants.iter().enumerate() {
            self.ctl.check()?;
            let id = format!("{}/{i}", self.job_id);
            let eval = match self.recorded.get(&id) {
                Some(e) if e.purpose == "candidate" && e.ingredients == [i] => e.clone(),
                _ => {
                    let loc = scratch.child(&i.to_string());
                    let mut r = variant.clone();
                    r.output.uri = loc.url.clone();
                    self.engine.run(&r, self.ctl).await?;
                    let req = Request {
                        checkpoint: &loc.url,
                        job_id: &self.job_id,
                        evaluation_id: &id,
                        purpose: "candidate",
                        recipe: serde_json::json!({
                            "method": variant.method.name(),
                            "ingredients": variant.models.iter().map(|m| &m.uri).collect::<Vec<_>>(),
                            "weights": variant.models.iter().map(|m| m.weight).collect::<Vec<_>>(),
                            "params": {parameter: values[i]},
                        }),
                    };
                    let answer = tokio::select! {
                        a = client.evaluate(&evaluator.url, timeout, &req) => a,
                        _ = self.ctl.cancel.cancelled() => {
                            remove_scratch(&loc).await;
                            return Err(self.ctl.check().err().unwrap_or(EngineError::Cancelled));
                        }
                    };
                    remove_scratch(&loc).await;
                    let answer = answer?;
                    tracing::info!(evaluation_id = %id, score = answer.score, "sweep value evaluated");
                    Evaluation {
                        evaluation_id: id.clone(),
                        purpose: "candidate".into(),
                        ingredients: vec![i],
                        score: answer.score,
                        metrics: answer.metrics,
                        accepted: None,
                    }
                }
            };
            if best.is_none_or(|(_, b)| eval.score > b) {
                best = Some((i, eval.score));
            }
            evaluations.push(eval);
            let record = serde_json::json!({
                "kind": "sweep",
                "parameter": parameter,
                "values": values,
                "evaluations": evaluations,
                "best": best.map(|(i, s)| serde_json::json!({"index": i, "value": values[i], "score": s})),
                "step": i + 1,
                "done": i + 1 == variants.len(),
            });
            self.ctl.progress.set_search(record);
            self.ctl.gate.persist().await?;
            crate::failpoints::crash(crate::failpoints::CrashPoint::AfterEvaluation);
        }
        remove_scratch(&scratch).await;
        let (i, _) = best.ok_or_else(|| EngineError::Internal("a sweep without values".into()))?;
        let mut chosen = variants[i].clone();
        chosen.output.uri = recipe.output.uri.clone();
        self.engine.run(&chosen, self.ctl).await
    }

    /// `<output's folder>/.ladle-scratch/<job_id>`, checked against the allowed roots.
    fn scratch(&self, recipe: &Recipe) -> Result<Location, EngineError> {
        let root = scratch_root(&recipe.output.uri).ok_or_else(|| {
            EngineError::InvalidRecipe(format!(
                "output {}: a greedy soup needs a folder above the output for its candidates",
                recipe.output.uri.trim_end_matches('/')
            ))
        })?;
        let uri = format!("{root}/{}", self.job_id);
        Ok(self.engine.storage().resolve(&uri)?)
    }

    async fn publish(&self, record: &Record) -> Result<(), EngineError> {
        let value = serde_json::to_value(record)
            .map_err(|e| EngineError::Internal(format!("search record: {e}")))?;
        self.ctl.progress.set_search(value);
        self.ctl.gate.persist().await
    }
}

struct Step<'a> {
    driver: &'a Driver<'a>,
    client: &'a Client,
    url: &'a str,
    timeout: Duration,
    max: usize,
    recipe: &'a Recipe,
    scratch: &'a Location,
}

impl Step<'_> {
    /// Score `set` (one model: the model itself; several: their uniform soup), replaying a
    /// recorded evaluation of the same step, and store the record before returning.
    async fn evaluate(
        &mut self,
        record: &mut Record,
        set: Vec<usize>,
        purpose: &str,
    ) -> Result<Evaluation, EngineError> {
        self.driver.ctl.check()?;
        let step = record.step;
        let id = format!("{}/{step}", self.driver.job_id);
        if step >= self.max {
            return Err(EngineError::InvalidRecipe(format!(
                "evaluation {id}: the budget of {} evaluations is spent",
                self.max
            )));
        }
        let eval = match self.driver.recorded.get(&id) {
            Some(e) if e.ingredients == set && e.purpose == purpose => {
                tracing::info!(evaluation_id = %id, score = e.score, "evaluation replayed from the job's progress");
                Evaluation {
                    accepted: None,
                    ..e.clone()
                }
            }
            _ => self.ask(&id, &set, purpose).await?,
        };
        record.evaluations.push(eval.clone());
        record.step = step + 1;
        self.driver.publish(record).await?;
        crate::failpoints::crash(crate::failpoints::CrashPoint::AfterEvaluation);
        Ok(eval)
    }

    async fn ask(&self, id: &str, set: &[usize], purpose: &str) -> Result<Evaluation, EngineError> {
        let uris: Vec<&str> = set
            .iter()
            .map(|&i| self.recipe.models[i].uri.as_str())
            .collect();
        let weight = 1.0 / set.len() as f64;
        let described = serde_json::json!({
            "method": "linear",
            "ingredients": uris,
            "weights": vec![weight; set.len()],
        });
        // A single model is scored as it is; a soup is written to scratch first.
        let candidate = if set.len() == 1 {
            None
        } else {
            let step = id.rsplit('/').next().unwrap_or("0");
            let loc = self.scratch.child(step);
            let r = soup(self.recipe, set, loc.url.clone());
            self.driver.engine.run(&r, self.driver.ctl).await?;
            Some(loc)
        };
        let checkpoint = match &candidate {
            Some(loc) => loc.url.clone(),
            None => uris[0].to_string(),
        };
        let req = Request {
            checkpoint: &checkpoint,
            job_id: &self.driver.job_id,
            evaluation_id: id,
            purpose,
            recipe: described,
        };
        self.driver
            .ctl
            .progress
            .set_phase(crate::engine::Phase::Evaluating);
        let answer = tokio::select! {
            a = self.client.evaluate(self.url, self.timeout, &req) => a,
            _ = self.driver.ctl.cancel.cancelled() => {
                if let Some(loc) = &candidate { remove_scratch(loc).await; }
                return Err(self.driver.ctl.check().err().unwrap_or(EngineError::Cancelled));
            }
        };
        if let Some(loc) = &candidate {
            remove_scratch(loc).await;
        }
        let answer = answer.map_err(|e: EvaluatorError| {
            tracing::warn!(evaluation_id = id, error = %e, "evaluation failed");
            e
        })?;
        tracing::info!(
            evaluation_id = id,
            score = answer.score,
            purpose,
            "evaluated"
        );
        Ok(Evaluation {
            evaluation_id: id.to_string(),
            purpose: purpose.to_string(),
            ingredients: set.to_vec(),
            score: answer.score,
            metrics: answer.metrics,
            accepted: None,
        })
    }
}

/// The uniform soup of `set` (model indices, taken in input order) as a plain recipe.
pub fn soup(recipe: &Recipe, set: &[usize], output: String) -> Recipe {
    let mut idx = set.to_vec();
    idx.sort_unstable();
    // A clone keeps what the search does not change (output dtype, shard size, provenance).
    let mut r = recipe.clone();
    r.method = linear::METHOD;
    r.models = idx
        .iter()
        .map(|&i| Ingredient {
            uri: recipe.models[i].uri.clone(),
            lora: recipe.models[i].lora.clone(),
            weight: 1.0,
            parameters: BTreeMap::new(),
        })
        .collect();
    r.base_model = None;
    r.slices = Vec::new();
    r.parameters = Parameters::new(LinearConfig { normalize: true });
    r.output.uri = output;
    r.mergekit_config = None;
    r
}

/// `<output's folder>/.ladle-scratch`: where the searches writing next to `output_uri` keep
/// their candidates, one folder per job id. `None` if the output has no folder above it.
pub fn scratch_root(output_uri: &str) -> Option<String> {
    let out = output_uri.trim_end_matches('/');
    let parent = out
        .rsplit_once('/')
        .map(|(p, _)| p)
        .filter(|p| !p.ends_with(':') && !p.ends_with('/'))?;
    Some(format!("{parent}/{SCRATCH_DIR}"))
}

/// Delete a scratch folder and everything under it; for local files also `.ladle-scratch`
/// itself once it is empty. Locally through the confined store's handles: nothing is followed,
/// a link planted inside is removed as a link, its target untouched.
pub(crate) async fn remove_scratch(loc: &Location) {
    if let Some(local) = loc.local.clone() {
        let path = loc.path.clone();
        let url = loc.url.clone();
        let removed = tokio::task::spawn_blocking(move || {
            local.remove_tree(&path)?;
            // `<…>/.ladle-scratch/<job>`: drop `.ladle-scratch` when this was its last folder.
            let parts: Vec<_> = path.parts().collect();
            if parts.len() >= 2 && parts[parts.len() - 1].as_ref() != SCRATCH_DIR {
                let parent =
                    object_store::path::Path::from_iter(parts[..parts.len() - 1].iter().cloned());
                if parent.filename() == Some(SCRATCH_DIR) {
                    local.remove_empty_dir(&parent)?;
                }
            } else if path.filename() == Some(SCRATCH_DIR) {
                local.remove_empty_dir(&path)?;
            }
            Ok::<_, object_store::Error>(())
        })
        .await;
        match removed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(url = %url, error = %e, "could not remove the scratch folder")
            }
            Err(e) => tracing::warn!(url = %url, error = %e, "scratch clean-up task failed"),
        }
        return;
    }
    let listed: Result<Vec<_>, _> = loc.store.list(Some(&loc.path)).try_collect().await;
    match listed {
        Ok(objects) => {
            for o in objects {
                if let Err(e) = loc.store.delete(&o.location).await {
                    tracing::warn!(path = %o.location, error = %e, "could not delete a scratch file");
                }
            }
        }
        Err(e) => tracing::warn!(url = %loc.url, error = %e, "could not list the scratch folder"),
    }
}

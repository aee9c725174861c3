//! Trajectory soups (ALGORITHMS.md §17): a recipe may name one training run's folder and a
//! selection (`last: k`, explicit `steps`, or a `glob` on the folder names) instead of listing
//! every checkpoint.
//!
//! The checkpoints of a trajectory are the immediate subfolders of `uri` that hold a
//! safetensors checkpoint (`model.safetensors` or `model.safetensors.index.json`, what the
//! checkpoint reader accepts). The step of a folder is the trailing run of ASCII digits of its
//! name (`checkpoint-1500`, `step_1500`, `global_step1500`, `1500` → 1500; `final`,
//! `ckpt-100-ema` → none). Checkpoints are ordered by step (numerically), then name; folders
//! without a step come after all stepped ones, by name, and only `glob` can select them.
//!
//! The selection is expanded when the job is submitted ([`expand`], the one function here that
//! does I/O): the stored recipe lists the explicit models, oldest first, and records the
//! selection and what it picked ([`Trajectory`]). Everything else is pure.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use super::{MAX_MODELS, MergeRequest, ModelSpec, RecipeError};
use crate::error::ErrorCode;
use crate::methods::Method;
pub use crate::storage::list::Folder;
use crate::storage::{Storage, StorageError, list};

/// Most subfolders of a trajectory folder that are looked at (each costs one listing).
pub const MAX_SCANNED: usize = 1024;
/// Longest accepted glob pattern.
pub const MAX_GLOB_LEN: usize = 256;
/// Most names quoted in one error message.
const MAX_NAMES_IN_MESSAGE: usize = 20;

/// The methods a trajectory can feed (`About::trajectory`): averages of a plain, ordered list
/// of models with no base and no per-model roles. The others (a base and task vectors,
/// two-model interpolations, layer stacking) need choices a folder listing cannot express.
pub fn methods() -> impl Iterator<Item = Method> {
    Method::all().filter(|m| m.about().trajectory)
}

/// `"trajectory": {"uri": …, "select": …}` as a request gives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrajectorySpec {
    pub uri: String,
    pub select: Select,
}

/// Which checkpoints of the folder to take.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Select {
    /// The `k` checkpoints with the highest steps.
    Last(usize),
    /// Exactly these steps.
    Steps(Vec<u64>),
    /// Every checkpoint whose folder name matches (`*`, `?`, `[...]`, `{a,b}`).
    Glob(String),
}

/// One selected checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
}

/// What a recipe records about its trajectory: the folder (normalized), the selection as
/// given, and the checkpoints it picked, in model order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trajectory {
    pub uri: String,
    pub select: Select,
    pub checkpoints: Vec<Checkpoint>,
}

/// The step of a folder name: its trailing ASCII digits as a `u64` (none if there are no
/// trailing digits or they overflow).
pub fn step_of(name: &str) -> Option<u64> {
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 {
        return None;
    }
    name[name.len() - digits..].parse().ok()
}

/// Trajectory order: by step, numerically; folders without a step last; then by name.
pub fn order(a: &Checkpoint, b: &Checkpoint) -> Ordering {
    match (a.step, b.step) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
    .then_with(|| a.name.cmp(&b.name))
}

/// Checks that need no listing: the method takes a plain list, `models` is not also given,
/// and the selection is well formed.
pub fn check_request(req: &MergeRequest) -> Result<(), RecipeError> {
    let Some(spec) = &req.trajectory else {
        return Ok(());
    };
    if !methods().any(|m| m.name() == req.method) {
        let names: Vec<&str> = methods().map(Method::name).collect();
        return Err(RecipeError::invalid(
            "trajectory",
            format!(
                "method {} cannot take a trajectory (only {} can: they average a plain list \
                 of checkpoints); list the models instead",
                req.method,
                names.join(", ")
            ),
        ));
    }
    if !req.models.is_empty() {
        return Err(RecipeError::invalid(
            "trajectory",
            "give either models or trajectory, not both",
        ));
    }
    if !req.slices.is_empty() {
        return Err(RecipeError::invalid(
            "trajectory",
            "give either slices or trajectory, not both",
        ));
    }
    if spec.uri.trim().is_empty() {
        return Err(RecipeError::invalid("trajectory.uri", "must not be empty"));
    }
    match &spec.select {
        Select::Last(k) => {
            if *k == 0 || *k > MAX_MODELS {
                return Err(RecipeError::invalid(
                    "trajectory.select.last",
                    format!("must be between 1 and {MAX_MODELS}"),
                ));
            }
        }
        Select::Steps(steps) => {
            if steps.is_empty() || steps.len() > MAX_MODELS {
                return Err(RecipeError::invalid(
                    "trajectory.select.steps",
                    format!("give 1 to {MAX_MODELS} steps"),
                ));
            }
            let mut sorted = steps.clone();
            sorted.sort_unstable();
            if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
                return Err(RecipeError::invalid(
                    "trajectory.select.steps",
                    format!("step {} is given twice", w[0]),
                ));
            }
        }
        Select::Glob(pattern) => {
            glob_matcher(pattern)?;
        }
    }
    Ok(())
}

/// A matcher for one folder name. Path separators and `..` are refused: the pattern selects
/// among the folder's own children, never elsewhere.
fn glob_matcher(pattern: &str) -> Result<globset::GlobMatcher, RecipeError> {
    let field = "trajectory.select.glob";
    if pattern.is_empty() || pattern.len() > MAX_GLOB_LEN {
        return Err(RecipeError::invalid(
            field,
            format!("must be 1 to {MAX_GLOB_LEN} characters"),
        ));
    }
    if pattern.contains(['/', '\\', '\0']) || pattern.contains("..") {
        return Err(RecipeError::invalid(
            field,
            "matches one folder name: no path separators, `..` or NUL",
        ));
    }
    globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(false)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| RecipeError::invalid(field, format!("invalid pattern: {e}")))
}

/// `names` as a short list for a message.
fn quote_names<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.into_iter().collect();
    if names.is_empty() {
        return "none".to_string();
    }
    let mut shown: Vec<String> = names
        .iter()
        .take(MAX_NAMES_IN_MESSAGE)
        .map(|n| format!("{n:?}"))
        .collect();
    if names.len() > MAX_NAMES_IN_MESSAGE {
        shown.push(format!("… and {} more", names.len() - MAX_NAMES_IN_MESSAGE));
    }
    shown.join(", ")
}

/// Refuse two selected checkpoints with one step (`checkpoint-100` and `step_100`): which is
/// older is unknowable.
fn check_unique_steps(field: &str, picked: &[Checkpoint]) -> Result<(), RecipeError> {
    for w in picked.windows(2) {
        if w[0].step.is_some() && w[0].step == w[1].step {
            return Err(RecipeError::invalid(
                field,
                format!(
                    "folders {:?} and {:?} both have step {}; select by glob instead",
                    w[0].name,
                    w[1].name,
                    w[0].step.unwrap_or_default()
                ),
            ));
        }
    }
    Ok(())
}

/// Pick the checkpoints `select` names among the listed `folders`, in trajectory order.
pub fn select(folders: &[Folder], select: &Select) -> Result<Vec<Checkpoint>, RecipeError> {
    let mut all: Vec<Checkpoint> = folders
        .iter()
        .filter(|f| f.has_checkpoint)
        .map(|f| Checkpoint {
            name: f.name.clone(),
            step: step_of(&f.name),
        })
        .collect();
    all.sort_by(order);
    if all.is_empty() {
        return Err(RecipeError::invalid(
            "trajectory.uri",
            format!(
                "no subfolder holds a checkpoint (model.safetensors or \
                 model.safetensors.index.json); subfolders: {}",
                quote_names(folders.iter().map(|f| f.name.as_str()))
            ),
        ));
    }
    let unstepped = || {
        quote_names(
            all.iter()
                .filter(|c| c.step.is_none())
                .map(|c| c.name.as_str()),
        )
    };
    let picked = match select {
        Select::Last(k) => {
            let field = "trajectory.select.last";
            let stepped: Vec<Checkpoint> =
                all.iter().filter(|c| c.step.is_some()).cloned().collect();
            if stepped.len() < *k {
                return Err(RecipeError::invalid(
                    field,
                    format!(
                        "asks for the last {k} checkpoints but only {} have a step: {}; \
                         folders without a step (ignored): {}",
                        stepped.len(),
                        quote_names(stepped.iter().map(|c| c.name.as_str())),
                        unstepped()
                    ),
                ));
            }
            let picked = stepped[stepped.len() - k..].to_vec();
            check_unique_steps(field, &picked)?;
            picked
        }
        Select::Steps(steps) => {
            let field = "trajectory.select.steps";
            let mut wanted = steps.clone();
            wanted.sort_unstable();
            let missing: Vec<String> = wanted
                .iter()
                .filter(|s| !all.iter().any(|c| c.step == Some(**s)))
                .map(u64::to_string)
                .collect();
            if !missing.is_empty() {
                let available: Vec<String> = all
                    .iter()
                    .filter_map(|c| c.step.map(|s| format!("{s} ({})", c.name)))
                    .collect();
                return Err(RecipeError::invalid(
                    field,
                    format!(
                        "no checkpoint for step {}; available steps: {}; folders without a \
                         step: {}",
                        missing.join(", "),
                        quote_names(available.iter().map(String::as_str)),
                        unstepped()
                    ),
                ));
            }
            let picked: Vec<Checkpoint> = all
                .iter()
                .filter(|c| c.step.is_some_and(|s| wanted.binary_search(&s).is_ok()))
                .cloned()
                .collect();
            check_unique_steps(field, &picked)?;
            picked
        }
        Select::Glob(pattern) => {
            let matcher = glob_matcher(pattern)?;
            let picked: Vec<Checkpoint> = all
                .iter()
                .filter(|c| matcher.is_match(&c.name))
                .cloned()
                .collect();
            if picked.is_empty() {
                return Err(RecipeError::invalid(
                    "trajectory.select.glob",
                    format!(
                        "{pattern:?} matches no checkpoint; checkpoints: {}",
                        quote_names(all.iter().map(|c| c.name.as_str()))
                    ),
                ));
            }
            picked
        }
    };
    if picked.len() > MAX_MODELS {
        return Err(RecipeError::invalid(
            "trajectory.select",
            format!(
                "selects {} checkpoints; at most {MAX_MODELS} are allowed",
                picked.len()
            ),
        ));
    }
    Ok(picked)
}

/// Errors of [`expand`]: the folder URL refused by storage (its own code), or a selection or
/// listing problem (`invalid_recipe`, naming the field).
#[derive(Debug, thiserror::Error)]
pub enum TrajectoryError {
    #[error("trajectory.uri: {0}")]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Recipe(#[from] RecipeError),
}

impl TrajectoryError {
    pub fn code(&self) -> ErrorCode {
        match self {
            TrajectoryError::Storage(e) => e.code(),
            TrajectoryError::Recipe(e) => e.code(),
        }
    }
}

/// Expand `req.trajectory` (if any) into `req.models` by listing the folder through
/// `storage` (allowed roots and traversal rules apply to the folder; the models are URLs under
/// it and go through the same per-model resolution as any other). Must run before
/// [`super::Recipe::from_request`], which refuses an unexpanded trajectory.
pub async fn expand(storage: &Storage, req: &mut MergeRequest) -> Result<(), TrajectoryError> {
    check_request(req)?;
    let Some(spec) = req.trajectory.clone() else {
        return Ok(());
    };
    // A storage URL: the checkpoints are named as URLs under it (a hub id names one model).
    let loc = storage.resolve_storage(&spec.uri)?;
    // Messages name the folder as the request wrote it (never a resolved path); the store's
    // detail goes to the log.
    let written = spec.uri.trim_end_matches('/');
    let folders = match list::subfolders(&loc, MAX_SCANNED).await {
        Ok(f) => f,
        Err(list::ListError::Outside { entry }) => {
            let path = match entry {
                Some(entry) => format!("{written}/{entry}"),
                None => written.to_string(),
            };
            tracing::warn!(trajectory = %path, "refused: a symbolic link leads outside the allowed roots");
            return Err(StorageError::OutsideRoots { path }.into());
        }
        Err(e @ list::ListError::TooMany { .. }) => {
            return Err(RecipeError::invalid(
                "trajectory.uri",
                format!("cannot list {written}: {e}"),
            )
            .into());
        }
        Err(e) => {
            tracing::warn!(trajectory = %loc.url, error = %e, "listing a trajectory folder failed");
            return Err(RecipeError::invalid(
                "trajectory.uri",
                format!("cannot list {written} (the folder could not be read)"),
            )
            .into());
        }
    };
    let picked = select(&folders, &spec.select)?;
    let mut models = Vec::with_capacity(picked.len());
    for c in &picked {
        let uri = list::child_url(&loc.url, &c.name)
            .map_err(|e| RecipeError::invalid("trajectory.uri", format!("{}: {e}", loc.url)))?;
        models.push(ModelSpec::uri(uri));
    }
    req.models = models;
    req.expanded_trajectory = Some(Trajectory {
        uri: loc.url,
        select: spec.select,
        checkpoints: picked,
    });
    Ok(())
}

/// Part of [`super::Recipe::from_request`]: a trajectory must have been expanded first.
pub(super) fn take_expanded(req: &mut MergeRequest) -> Result<Option<Trajectory>, RecipeError> {
    match (&req.trajectory, req.expanded_trajectory.take()) {
        (None, _) => Ok(None),
        (Some(_), Some(t)) => Ok(Some(t)),
        (Some(_), None) => {
            check_request(req)?;
            Err(RecipeError::invalid(
                "trajectory",
                "a trajectory is expanded by listing its folder, which only `POST /v1/merges` \
                 and `ladle merge` do",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folders(names: &[&str]) -> Vec<Folder> {
        names
            .iter()
            .map(|n| Folder {
                name: n.to_string(),
                has_checkpoint: !n.starts_with("empty"),
            })
            .collect()
    }

    fn names(c: &[Checkpoint]) -> Vec<&str> {
        c.iter().map(|c| c.name.as_str()).collect()
    }

    fn err_parts(e: RecipeError) -> (String, String) {
        match e {
            RecipeError::Invalid { field, message } => (field, message),
            RecipeError::Syntax(m) => panic!("syntax error {m}"),
        }
    }

    #[test]
    fn step_is_the_trailing_integer() {
        assert_eq!(step_of("checkpoint-1500"), Some(1500));
        assert_eq!(step_of("step_1500"), Some(1500));
        assert_eq!(step_of("global_step1500"), Some(1500));
        assert_eq!(step_of("1500"), Some(1500));
        assert_eq!(step_of("epoch-007"), Some(7));
        assert_eq!(step_of("final"), None);
        assert_eq!(step_of("ckpt-100-ema"), None);
        assert_eq!(step_of(""), None);
        assert_eq!(step_of("x99999999999999999999999"), None); // overflows u64
        assert_eq!(step_of("run٣"), None); // only ASCII digits count
    }

    #[test]
    fn order_is_numeric_then_name_with_unstepped_last() {
        let mut c: Vec<Checkpoint> = ["final", "checkpoint-1000", "checkpoint-200", "a-200", "b"]
            .iter()
            .map(|n| Checkpoint {
                name: n.to_string(),
                step: step_of(n),
            })
            .collect();
        c.sort_by(order);
        assert_eq!(
            names(&c),
            ["a-200", "checkpoint-200", "checkpoint-1000", "b", "final"]
        );
    }

    #[test]
    fn last_k_takes_the_highest_steps_oldest_first() {
        let f = folders(&[
            "checkpoint-600",
            "checkpoint-1000",
            "checkpoint-50",
            "final",
            "empty-900",
        ]);
        let got = select(&f, &Select::Last(2)).unwrap();
        assert_eq!(names(&got), ["checkpoint-600", "checkpoint-1000"]);
        assert_eq!(got[1].step, Some(1000));
        // a folder without weights does not count, even with the highest step
        let got = select(&f, &Select::Last(3)).unwrap();
        assert_eq!(
            names(&got),
            ["checkpoint-50", "checkpoint-600", "checkpoint-1000"]
        );
        let (field, msg) = err_parts(select(&f, &Select::Last(4)).unwrap_err());
        assert_eq!(field, "trajectory.select.last");
        assert!(
            msg.contains("only 3 have a step") && msg.contains("\"final\""),
            "{msg}"
        );
    }

    #[test]
    fn steps_select_exactly_and_name_what_is_missing() {
        let f = folders(&[
            "checkpoint-100",
            "checkpoint-200",
            "checkpoint-300",
            "final",
        ]);
        let got = select(&f, &Select::Steps(vec![300, 100])).unwrap();
        assert_eq!(names(&got), ["checkpoint-100", "checkpoint-300"]);
        let (field, msg) = err_parts(select(&f, &Select::Steps(vec![100, 700, 50])).unwrap_err());
        assert_eq!(field, "trajectory.select.steps");
        assert!(msg.contains("step 50, 700"), "{msg}");
        assert!(msg.contains("200 (checkpoint-200)"), "{msg}");
        assert!(msg.contains("\"final\""), "{msg}");
    }

    #[test]
    fn two_folders_with_one_step_are_ambiguous() {
        let f = folders(&["checkpoint-100", "step_100", "checkpoint-200"]);
        let (field, msg) = err_parts(select(&f, &Select::Steps(vec![100])).unwrap_err());
        assert_eq!(field, "trajectory.select.steps");
        assert!(msg.contains("both have step 100"), "{msg}");
        assert!(select(&f, &Select::Last(1)).is_ok());
        assert!(select(&f, &Select::Last(3)).is_err());
        // a glob picks by name, so it can choose one of them
        let got = select(&f, &Select::Glob("checkpoint-*".into())).unwrap();
        assert_eq!(names(&got), ["checkpoint-100", "checkpoint-200"]);
    }

    #[test]
    fn glob_matches_names_and_orders_by_step() {
        let f = folders(&[
            "checkpoint-1000",
            "checkpoint-200",
            "ckpt-300",
            "checkpoint-final",
            "empty-checkpoint-5",
        ]);
        let got = select(&f, &Select::Glob("checkpoint-*".into())).unwrap();
        assert_eq!(
            names(&got),
            ["checkpoint-200", "checkpoint-1000", "checkpoint-final"]
        );
        let got = select(&f, &Select::Glob("c*-[23]??".into())).unwrap();
        assert_eq!(names(&got), ["checkpoint-200", "ckpt-300"]);
        let got = select(&f, &Select::Glob("checkpoint-?000".into())).unwrap();
        assert_eq!(names(&got), ["checkpoint-1000"]);
        let (field, msg) = err_parts(select(&f, &Select::Glob("nope*".into())).unwrap_err());
        assert_eq!(field, "trajectory.select.glob");
        assert!(msg.contains("\"ckpt-300\""), "{msg}");
    }

    #[test]
    fn unsafe_globs_are_refused() {
        for p in ["", "../x", "a/b", "a\\b", "..", "x..y"] {
            let (field, _) = err_parts(glob_matcher(p).unwrap_err());
            assert_eq!(field, "trajectory.select.glob", "{p:?}");
        }
        assert!(glob_matcher("[").is_err());
        assert!(glob_matcher(&"a".repeat(MAX_GLOB_LEN + 1)).is_err());
    }

    #[test]
    fn a_folder_without_checkpoints_names_the_uri_field() {
        let f = folders(&["empty-a", "empty-b"]);
        let (field, msg) = err_parts(select(&f, &Select::Last(1)).unwrap_err());
        assert_eq!(field, "trajectory.uri");
        assert!(msg.contains("\"empty-a\""), "{msg}");
        let (field, _) = err_parts(select(&[], &Select::Glob("*".into())).unwrap_err());
        assert_eq!(field, "trajectory.uri");
    }

    #[test]
    fn selections_are_capped() {
        let many: Vec<String> = (0..=MAX_MODELS).map(|i| format!("c-{i}")).collect();
        let f: Vec<Folder> = many
            .iter()
            .map(|n| Folder {
                name: n.clone(),
                has_checkpoint: true,
            })
            .collect();
        let (field, _) = err_parts(select(&f, &Select::Glob("c-*".into())).unwrap_err());
        assert_eq!(field, "trajectory.select");
    }

    fn request(json: serde_json::Value) -> MergeRequest {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn request_checks_need_no_listing() {
        let t = serde_json::json!({"uri": "file:///d/run", "select": {"last": 2}});
        let out = serde_json::json!({"uri": "file:///d/out"});
        for m in ["linear", "ema", "sparse_soup", "karcher"] {
            let r = request(serde_json::json!({"method": m, "trajectory": t, "output": out}));
            check_request(&r).unwrap();
        }
        let r = request(serde_json::json!({"method": "ties", "trajectory": t, "output": out}));
        let (field, msg) = err_parts(check_request(&r).unwrap_err());
        assert_eq!(field, "trajectory");
        assert!(
            msg.contains("method ties")
                && ["linear", "ema", "sparse_soup", "karcher"]
                    .iter()
                    .all(|m| msg.contains(m)),
            "{msg}"
        );
        let r = request(
            serde_json::json!({"method": "linear", "trajectory": t, "output": out,
            "models": [{"uri": "file:///d/a"}]}),
        );
        assert!(
            err_parts(check_request(&r).unwrap_err())
                .1
                .contains("not both")
        );
        for (sel, f) in [
            (serde_json::json!({"last": 0}), "trajectory.select.last"),
            (
                serde_json::json!({"last": MAX_MODELS + 1}),
                "trajectory.select.last",
            ),
            (serde_json::json!({"steps": []}), "trajectory.select.steps"),
            (
                serde_json::json!({"steps": [5, 5]}),
                "trajectory.select.steps",
            ),
            (serde_json::json!({"glob": "a/*"}), "trajectory.select.glob"),
        ] {
            let r = request(serde_json::json!({"method": "linear", "output": out,
                "trajectory": {"uri": "file:///d/run", "select": sel}}));
            assert_eq!(err_parts(check_request(&r).unwrap_err()).0, f);
        }
        // a selection is exactly one of the three forms
        let bad = serde_json::json!({"method": "linear", "output": out,
            "trajectory": {"uri": "file:///d/run", "select": {"last": 2, "glob": "*"}}});
        assert!(serde_json::from_value::<MergeRequest>(bad).is_err());
    }

    #[test]
    fn an_unexpanded_trajectory_is_refused_by_validation() {
        let body = serde_json::json!({"method": "linear", "output": {"uri": "file:///d/out"},
            "trajectory": {"uri": "file:///d/run", "select": {"last": 2}}});
        let e = super::super::Recipe::parse_json(&serde_json::to_vec(&body).unwrap()).unwrap_err();
        assert_eq!(err_parts(e).0, "trajectory");
    }
}

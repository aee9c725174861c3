//! The model card (`README.md`) of a soup, as mergekit 0.1.5 writes it (`mergekit/card.py`):
//! YAML front matter (`base_model`: the Hugging Face hub ids among the models, `library_name:
//! transformers`, `tags: [mergekit, merge]`), a title (the output folder's name), the method
//! with a link to its paper, the base, the list of the other models, and the recipe text in a
//! `yaml` code block. Never an input's card.
//!
//! Differences from mergekit, by design: the models are listed in recipe order (base, models,
//! slice sources; mergekit iterates a Python set, whose order changes from run to run), and a
//! model is a hub id only when ladle read it from a Hugging Face cache snapshot of that id
//! (`…/models--org--name/snapshots/<rev>/`, see [`crate::storage::hf_cache`]), shown without
//! its `@revision` as mergekit shows it: mergekit asks the hub over the network.

use serde_json::Value;

use crate::recipe::Recipe;
use crate::recipe::mergekit_config::model_path;
use crate::storage::hf_cache::HubRef;

/// mergekit's display name and reference link of each of its methods (`method_md`): mergekit's
/// own text, for the card; a method mergekit lacks shows its name.
const MERGEKIT_METHODS: &[(&str, &str, &str)] = &[
    ("arcee_fusion", "Arcee Fusion", "https://arcee.ai"),
    (
        "breadcrumbs",
        "Model Breadcrumbs",
        "https://arxiv.org/abs/2312.06795",
    ),
    (
        "breadcrumbs_ties",
        "Model Breadcrumbs with TIES",
        "https://arxiv.org/abs/2312.06795",
    ),
    (
        "dare_linear",
        "Linear DARE",
        "https://arxiv.org/abs/2311.03099",
    ),
    ("dare_ties", "DARE TIES", "https://arxiv.org/abs/2311.03099"),
    ("della", "DELLA", "https://arxiv.org/abs/2406.11617"),
    (
        "della_linear",
        "Linear DELLA",
        "https://arxiv.org/abs/2406.11617",
    ),
    (
        "karcher",
        "Karcher Mean",
        "https://arxiv.org/abs/2603.04972",
    ),
    ("linear", "Linear", "https://arxiv.org/abs/2203.05482"),
    (
        "model_stock",
        "Model Stock",
        "https://arxiv.org/abs/2403.19522",
    ),
    (
        "multislerp",
        "Multi-SLERP",
        "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    ),
    (
        "nearswap",
        "NearSwap",
        "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    ),
    ("nuslerp", "NuSLERP", ""),
    ("passthrough", "Passthrough", ""),
    (
        "ram",
        "Reinforced Agent Merging",
        "https://arxiv.org/abs/2601.13572",
    ),
    (
        "ramplus_tl",
        "Reinforced Agent Merging Plus (Tensor-Local)",
        "https://arxiv.org/abs/2601.13572",
    ),
    ("sce", "SCE", "https://arxiv.org/abs/2408.07990"),
    ("slerp", "SLERP", "https://en.wikipedia.org/wiki/Slerp"),
    (
        "task_arithmetic",
        "Task Arithmetic",
        "https://arxiv.org/abs/2212.04089",
    ),
    ("ties", "TIES", "https://arxiv.org/abs/2306.01708"),
];

/// The card of `recipe`'s soup, written into the folder named `name`.
pub fn render(recipe: &Recipe, name: &str) -> String {
    let method = recipe.method.name();
    let written = written_models(recipe);
    let urls: Vec<&str> = recipe
        .base_model
        .iter()
        .chain(recipe.models.iter().map(|m| &m.uri))
        .map(String::as_str)
        .collect();
    // A hub id is shown without its revision (mergekit's `model.model.path`).
    let shown = |m: &String| hub_id(m, &urls).map_or_else(|| m.clone(), str::to_string);
    let written = Written {
        base: written.base.as_ref().map(shown),
        models: written.models.iter().map(shown).collect(),
    };
    let hub = |m: &str| hub_id(m, &urls).is_some();
    // mergekit names no base for slerp (its `base_model` is the t = 0 end).
    let base = written.base.as_deref().filter(|_| method != "slerp");
    let mut listed: Vec<&str> = Vec::new();
    for m in written.base.iter().chain(&written.models) {
        if Some(m.as_str()) != base && !listed.contains(&m.as_str()) {
            listed.push(m);
        }
    }
    let mut hub_ids: Vec<&str> = Vec::new();
    for m in written.base.iter().chain(&written.models) {
        if hub(m) && !hub_ids.contains(&m.as_str()) {
            hub_ids.push(m);
        }
    }
    let link = |m: &str| {
        if hub(m) {
            format!("[{m}](https://huggingface.co/{m})")
        } else {
            m.to_string()
        }
    };
    let mut card = String::from("---\n");
    if hub_ids.is_empty() {
        card.push_str("base_model: []\n");
    } else {
        card.push_str("base_model:\n");
        for id in &hub_ids {
            card.push_str(&format!("- {id}\n"));
        }
    }
    card.push_str("library_name: transformers\ntags:\n- mergekit\n- merge\n\n---\n");
    let title = if name.is_empty() {
        "Untitled Model (1)"
    } else {
        name
    };
    card.push_str(&format!("# {title}\n\n"));
    card.push_str(
        "This is a merge of pre-trained language models created using \
         [mergekit](https://github.com/cg123/mergekit).\n\n## Merge Details\n### Merge Method\n\n",
    );
    let base_text = base
        .map(|b| format!(" using {} as a base", link(b)))
        .unwrap_or_default();
    card.push_str(&format!(
        "This model was merged using the {} merge method{base_text}.\n\n",
        method_md(method)
    ));
    card.push_str("### Models Merged\n\nThe following models were included in the merge:\n");
    let bullets: Vec<String> = listed.iter().map(|m| format!("* {}", link(m))).collect();
    card.push_str(&bullets.join("\n"));
    card.push_str("\n\n### Configuration\n\n");
    match &recipe.mergekit_config {
        Some(text) => {
            card.push_str(
                "The following YAML configuration was used to produce this model:\n\n```yaml\n",
            );
            card.push_str(text);
            card.push_str("\n```\n");
        }
        None => card.push_str(
            "The models were chosen by a search (greedy soup or sweep); `ladle-manifest.json` \
             records the recipe that produced this model and every evaluation.\n",
        ),
    }
    card
}

fn method_md(method: &str) -> String {
    match MERGEKIT_METHODS.iter().find(|(n, _, _)| *n == method) {
        Some((_, pretty, url)) if !url.is_empty() => format!("[{pretty}]({url})"),
        Some((_, pretty, _)) => (*pretty).to_string(),
        None => method.to_string(),
    }
}

/// The models as the recipe text names them (else as paths from the recipe's URLs).
struct Written {
    base: Option<String>,
    /// Models then slice sources, in order.
    models: Vec<String>,
}

fn written_models(recipe: &Recipe) -> Written {
    let from_text = recipe
        .mergekit_config
        .as_deref()
        .and_then(|t| crate::recipe::yaml::parse(t).ok());
    if let Some(doc) = from_text {
        let name = |v: &Value| v.get("model").and_then(Value::as_str).map(str::to_string);
        let mut models: Vec<String> = doc
            .get("models")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(name)
            .collect();
        for slice in doc
            .get("slices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let sources = slice.get("sources").and_then(Value::as_array);
            models.extend(sources.into_iter().flatten().filter_map(name));
        }
        return Written {
            base: doc
                .get("base_model")
                .and_then(Value::as_str)
                .map(str::to_string),
            models,
        };
    }
    Written {
        base: recipe.base_model.as_deref().map(model_path),
        models: recipe.models.iter().map(|m| model_path(&m.uri)).collect(),
    }
}

/// The hub id (`org/name`, without a revision) of `written` when ladle read it from a
/// Hugging Face cache: the recipe names it as a hub id (resolved from the cache when the job
/// ran) or by its cache snapshot's URL (`…/models--org--name/snapshots/<commit>`, as the
/// service stores it).
fn hub_id<'a>(written: &'a str, urls: &[&str]) -> Option<&'a str> {
    let repo = HubRef::parse(written)?.repo;
    let marker = format!("/{}/snapshots/", HubRef::parse(repo)?.folder_name());
    urls.iter()
        .any(|u| HubRef::parse(u).is_some_and(|h| h.repo == repo) || u.contains(&marker))
        .then_some(repo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_only_from_a_cache_snapshot() {
        let urls = [
            "file:///hf/hub/models--org--name/snapshots/abc/",
            "org/kept@v2",
        ];
        assert_eq!(hub_id("org/name", &urls), Some("org/name"));
        assert_eq!(hub_id("org/name@main", &urls), Some("org/name"));
        assert_eq!(hub_id("org/kept@v2", &urls), Some("org/kept"));
        assert_eq!(hub_id("org/kept", &urls), Some("org/kept"));
        assert_eq!(hub_id("org/other", &urls), None);
        assert_eq!(hub_id("/abs/path", &urls), None);
        assert_eq!(hub_id("a/b/c", &urls), None);
        assert_eq!(
            method_md("ties"),
            "[TIES](https://arxiv.org/abs/2306.01708)"
        );
        assert_eq!(method_md("nuslerp"), "NuSLERP");
        assert_eq!(method_md("sparse_soup"), "sparse_soup");
    }
}

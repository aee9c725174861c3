//! Every config of mergekit 0.1.5's `examples/` folder, unchanged but for the model names
//! (`tests/data/mergekit_examples/`, see its README), run by ladle and compared tensor by
//! tensor with what mergekit 0.1.5 wrote for it on the same stand-in checkpoints, with the
//! conformance pack's rules (`../shared/conformance/README.md`): bit-identical for linear and
//! passthrough, the tie rule for TIES (bit-identical outside the elements whose `|δ|` ties at a
//! cut-off), within 1 ulp of the inputs for slerp and arcee_fusion. Prints, per example, how
//! many elements differ and the largest difference in ulps. `extra/` adds configs of ladle's
//! own, made by mergekit 0.1.5 the same way: slices with merging methods (per-slice base
//! models, parameters at source, slice and global level, gradients over each slice's layers).
//! Where the inputs of an output element are not named (passthrough and slices renumber
//! layers), its ulps are the output's own (stricter).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::compare::{
    F32Tensors as Tensors, bf16_ulp as ulp, dir_url as url, read_f32_tensors as read_tensors,
};

use half::f16;
use ladle::engine::{Engine, EngineConfig, RunControl};
use ladle::recipe::Recipe;
use ladle::storage::{S3Settings, Storage};
use serde_json::Value;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mergekit_examples")
}

/// mergekit's depth of a tensor in a 40-layer stand-in: `layer / 39`, 0 outside the layers.
fn depth(name: &str) -> f64 {
    name.split('.')
        .skip_while(|p| *p != "layers")
        .nth(1)
        .and_then(|n| n.parse::<f64>().ok())
        .map_or(0.0, |l| l / 39.0)
}

/// mergekit's gradient interpolation.
fn gradient(v: &[f64], t: f64) -> f64 {
    let last = v.len() - 1;
    let scaled = t * last as f64;
    let i0 = (scaled as usize).min(last);
    let i1 = (i0 + 1).min(last);
    let frac = scaled - i0 as f64;
    (1.0 - frac) * v[i0] + frac * v[i1]
}

/// How an example's output is compared.
enum Rule {
    Exact,
    Ulps(f64),
    /// arcee_fusion: within 1 ulp, except elements where one side kept the model's value and
    /// the other the base's (the element's importance on the other side of the threshold, a
    /// float rounding of the bf16 importance or the threshold apart); at most this share.
    Fusion(f64),
    /// TIES top-k in float16: per model (after the base), its density at a tensor.
    Ties(Vec<fn(&str) -> f64>),
}

struct Example {
    /// `examples/` (mergekit's) or `extra/` (ladle's own, made by mergekit the same way).
    folder: &'static str,
    name: &'static str,
    /// The stand-ins whose magnitudes give `m_e` (base first); empty: the output's own.
    inputs: &'static [&'static str],
    rule: Rule,
}

fn examples() -> Vec<Example> {
    vec![
        Example {
            folder: "examples",
            name: "arcee_fusion",
            inputs: &["base", "ft1"],
            rule: Rule::Fusion(1e-4),
        },
        Example {
            folder: "examples",
            name: "bio-merge",
            inputs: &["base", "ft1", "ft2"],
            rule: Rule::Ties(vec![|_| 0.5, |_| 0.5]),
        },
        Example {
            folder: "examples",
            name: "gradient-slerp",
            inputs: &["ft1", "ft2"],
            rule: Rule::Ulps(1.0),
        },
        Example {
            folder: "examples",
            name: "linear",
            inputs: &["ft1", "ft3", "ft2"],
            rule: Rule::Exact,
        },
        Example {
            folder: "examples",
            name: "orcamini-platy-44layer",
            inputs: &[],
            rule: Rule::Exact,
        },
        Example {
            folder: "examples",
            name: "ties",
            inputs: &["base", "ft1", "ft2", "ft3"],
            rule: Rule::Ties(vec![
                |n| gradient(&[1.0, 0.7, 0.1], depth(n)),
                |_| 0.5,
                |_| 0.33,
            ]),
        },
        Example {
            folder: "extra",
            name: "slices-task_arithmetic",
            inputs: &[],
            rule: Rule::Exact,
        },
        Example {
            folder: "extra",
            name: "slices-slerp",
            inputs: &[],
            rule: Rule::Ulps(1.0),
        },
    ]
}

/// Elements whose float16 `|δ|` ties at a model's top-k cut-off with more elements than slots
/// left: which of them mergekit keeps comes from torch's unstable sort.
fn ambiguous(
    densities: &[fn(&str) -> f64],
    name: &str,
    base: &[f32],
    models: &[&[f32]],
) -> Vec<bool> {
    let n = base.len();
    let mut amb = vec![false; n];
    for (x, density) in models.iter().zip(densities) {
        let k = ((density(name) * n as f64) as usize).max(1);
        if k >= n {
            continue;
        }
        let mags: Vec<f32> = x
            .iter()
            .zip(base)
            .map(|(a, b)| {
                (f16::from_f32(f16::from_f32(*a).to_f32() - f16::from_f32(*b).to_f32()))
                    .to_f32()
                    .abs()
            })
            .collect();
        let mut sorted = mags.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let p = n - k;
        if sorted[p - 1] != sorted[p] {
            continue;
        }
        for (a, m) in amb.iter_mut().zip(&mags) {
            if *m == sorted[p] {
                *a = true;
            }
        }
    }
    amb
}

async fn run(recipe: &Recipe) {
    let storage = Arc::new(Storage::new(None, S3Settings::default()).unwrap());
    let engine = Engine::new(
        storage,
        EngineConfig {
            chunk_elems: 300,
            ..Default::default()
        },
    );
    engine
        .run(recipe, &Arc::new(RunControl::standalone()))
        .await
        .unwrap_or_else(|e| panic!("merge failed [{}]: {e}", e.code()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mergekit_example_runs_and_matches() {
    let dir = data_dir();
    let tmp = tempfile::tempdir().unwrap();
    let inputs: BTreeMap<&str, Tensors> = ["base", "ft1", "ft2", "ft3"]
        .into_iter()
        .map(|n| {
            (
                n,
                read_tensors(&dir.join("inputs").join(n).join("model.safetensors")),
            )
        })
        .collect();
    let listed: BTreeSet<String> = std::fs::read_dir(dir.join("examples"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let cases = examples();
    let covered: BTreeSet<String> = cases
        .iter()
        .filter(|c| c.folder == "examples")
        .map(|c| format!("{}.yml", c.name))
        .collect();
    assert_eq!(listed, covered, "every example has a case");
    let mut failures = Vec::new();
    eprintln!(
        "example                | rule          | differing elements      | max ulps | notes"
    );
    for case in &cases {
        let text =
            std::fs::read_to_string(dir.join(case.folder).join(format!("{}.yml", case.name)))
                .unwrap();
        let out = tmp.path().join(case.name);
        let sub = Recipe::parse_yaml(&text, Some(&dir), Some(&url(&out)))
            .unwrap_or_else(|e| panic!("{}: rejected: {e}", case.name));
        run(&sub.recipe).await;
        let expected = dir.join("expected").join(case.name);
        let cfg = |p: &Path| -> Value {
            serde_json::from_slice(&std::fs::read(p.join("config.json")).unwrap()).unwrap()
        };
        let (ours, theirs) = (cfg(&out), cfg(&expected));
        if ours["num_hidden_layers"] != theirs["num_hidden_layers"] {
            failures.push(format!(
                "{}: config.json num_hidden_layers {} vs mergekit's {}",
                case.name, ours["num_hidden_layers"], theirs["num_hidden_layers"]
            ));
        }
        let got = read_tensors(&out.join("model.safetensors"));
        let want = read_tensors(&expected.join("model.safetensors"));
        if got.keys().collect::<Vec<_>>() != want.keys().collect::<Vec<_>>() {
            failures.push(format!("{}: tensor names differ", case.name));
            continue;
        }
        let (mut total, mut differ, mut amb_total, mut differ_outside) = (0, 0, 0, 0);
        let (mut flipped, mut max_ulps_unflipped) = (0usize, 0f64);
        let mut max_ulps = 0f64;
        for (name, (shape, w, wdt)) in &want {
            let (gshape, g, gdt) = &got[name];
            if shape != gshape || wdt != gdt {
                failures.push(format!(
                    "{}: {name}: {gshape:?} {gdt} vs mergekit's {shape:?} {wdt}",
                    case.name
                ));
                continue;
            }
            let ins: Vec<&[f32]> = if case.inputs.is_empty() {
                vec![w.as_slice()]
            } else {
                case.inputs
                    .iter()
                    .map(|i| inputs[i][name].1.as_slice())
                    .collect()
            };
            let amb = match &case.rule {
                Rule::Ties(d) => Some(ambiguous(d, name, ins[0], &ins[1..])),
                _ => None,
            };
            total += w.len();
            for e in 0..w.len() {
                let a = amb.as_ref().is_some_and(|v| v[e]);
                amb_total += usize::from(a);
                if g[e].to_bits() == w[e].to_bits() {
                    continue;
                }
                differ += 1;
                let m_e = ins.iter().map(|x| x[e].abs()).fold(0.0f32, f32::max);
                let ulps = (g[e] as f64 - w[e] as f64).abs() / ulp(m_e);
                max_ulps = max_ulps.max(ulps);
                if let (Rule::Fusion(_), [base, model]) = (&case.rule, ins.as_slice()) {
                    let (b, m) = (base[e], model[e]);
                    if (g[e] == b && w[e] == m) || (g[e] == m && w[e] == b) {
                        flipped += 1;
                    } else {
                        max_ulps_unflipped = max_ulps_unflipped.max(ulps);
                    }
                }
                if !a {
                    differ_outside += 1;
                }
            }
        }
        let note = match case.rule {
            Rule::Exact => {
                if differ > 0 {
                    failures.push(format!("{}: {differ} elements differ", case.name));
                }
                String::new()
            }
            Rule::Ulps(k) => {
                if max_ulps > k {
                    failures.push(format!("{}: max {max_ulps} ulps > {k}", case.name));
                }
                String::new()
            }
            Rule::Fusion(share) => {
                if max_ulps_unflipped > 1.0 || flipped as f64 > share * total as f64 {
                    failures.push(format!(
                        "{}: {flipped} elements on the other side of the threshold, max \
                         {max_ulps_unflipped} ulps elsewhere",
                        case.name
                    ));
                }
                format!(
                    "{flipped} on the other side of the threshold (model vs base value), \
                     elsewhere max {max_ulps_unflipped:.2} ulps"
                )
            }
            Rule::Ties(_) => {
                if differ_outside > 0 {
                    failures.push(format!(
                        "{}: {differ_outside} elements differ outside the ambiguous set",
                        case.name
                    ));
                }
                format!(
                    "ambiguous {:.1}%, differing outside it: {differ_outside}",
                    100.0 * amb_total as f64 / total.max(1) as f64
                )
            }
        };
        eprintln!(
            "{:<22} | {:<13} | {:>7} of {:>7} ({:>5.2}%) | {:>8.2} | {note}",
            case.name,
            match case.rule {
                Rule::Exact => "bit-identical",
                Rule::Ulps(_) => "1 ulp",
                Rule::Fusion(_) => "1 ulp, flips",
                Rule::Ties(_) => "tie rule",
            },
            differ,
            total,
            100.0 * differ as f64 / total.max(1) as f64,
            max_ulps,
        );
    }
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
}

/// A slice over every layer of every model is the `models:` form (mergekit's planner turns
/// `models` into exactly that slice): the same bytes for every kind of method (elementwise,
/// streamed with pre-passes, selections, keyed random draws).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slice_over_every_layer_is_the_models_form() {
    let dir = data_dir();
    let tmp = tempfile::tempdir().unwrap();
    let recipes = [
        (
            "ties",
            "parameters: {density: [0.9, 0.3], weight: 0.5}",
            "parameters: {normalize: true}",
        ),
        (
            "dare_ties",
            "parameters: {density: 0.5, weight: 0.4}",
            "parameters: {seed: 7}",
        ),
        ("model_stock", "", ""),
        ("karcher", "", ""),
        (
            "sce",
            "parameters: {weight: 0.3}",
            "parameters: {select_topk: 0.5}",
        ),
        (
            "breadcrumbs",
            "parameters: {density: 0.8, gamma: 0.05, weight: [0.2, 0.6]}",
            "",
        ),
    ];
    for (method, per_model, global) in recipes {
        let models: String = ["ft1", "ft2", "ft3"]
            .iter()
            .map(|m| format!("  - model: inputs/{m}\n    {per_model}\n"))
            .collect();
        let sources: String = ["ft1", "ft2", "ft3"]
            .iter()
            .map(|m| {
                format!(
                    "      - model: inputs/{m}\n        layer_range: [0, 40]\n        {per_model}\n"
                )
            })
            .collect();
        let head = format!("merge_method: {method}\nbase_model: inputs/base\n{global}\n");
        let as_models = format!("{head}models:\n{models}");
        let as_slices = format!(
            "{head}slices:\n  - sources:\n      - model: inputs/base\n        layer_range: [0, 40]\n{sources}"
        );
        let mut bytes = Vec::new();
        for (form, text) in [("models", &as_models), ("slices", &as_slices)] {
            let out = tmp.path().join(format!("{method}-{form}"));
            let sub = Recipe::parse_yaml(text, Some(&dir), Some(&url(&out)))
                .unwrap_or_else(|e| panic!("{method} ({form}): rejected: {e}\n{text}"));
            run(&sub.recipe).await;
            bytes.push(std::fs::read(out.join("model.safetensors")).unwrap());
        }
        assert!(
            bytes[0] == bytes[1],
            "{method}: slices give other bytes than models"
        );
        eprintln!("{method}: one slice over [0, 40] = models: (same bytes)");
    }
}

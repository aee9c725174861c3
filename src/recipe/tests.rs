//! Unit tests of request validation (every error names its field).

use super::*;
use crate::merge::DType;
use crate::methods::gta::GtaConfig;

fn gta(s: &Submission) -> GtaConfig {
    s.recipe.parameters.get::<GtaConfig>().cloned().unwrap()
}

fn parse(v: serde_json::Value) -> Result<Submission, RecipeError> {
    Recipe::parse_json(&serde_json::to_vec(&v).unwrap())
}

fn field(e: RecipeError) -> String {
    match e {
        RecipeError::Invalid { field, .. } => field,
        RecipeError::Syntax(s) => s,
    }
}

#[test]
fn uniform_soup_defaults() {
    let s = parse(serde_json::json!({
        "method": "linear",
        "models": [{"uri": "file:///d/a"}, {"uri": "file:///d/b"}],
        "output": {"uri": "file:///d/out/", "dtype": "bfloat16", "max_shard_size": "2GB"}
    }))
    .unwrap();
    assert_eq!(s.recipe.models[1].weight, 1.0);
    assert_eq!(s.recipe.output.max_shard_size, 2_000_000_000);
    assert_eq!(s.recipe.output.dtype, Some(DType::BF16));
    assert_eq!(s.recipe.linear_weights(), (vec![1.0, 1.0], Some(2.0)));
}

#[test]
fn errors_name_the_field() {
    let base = |models: serde_json::Value, params: serde_json::Value| {
        serde_json::json!({"method": "linear", "models": models, "parameters": params,
                           "output": {"uri": "file:///d/out"}})
    };
    let e = parse(base(
        serde_json::json!([{"uri": "file:///d/a", "weight": 1.0}, {"uri": "file:///d/b"}]),
        serde_json::json!({}),
    ))
    .unwrap_err();
    assert_eq!(field(e), "models[1].weight");
    let e = parse(base(
        serde_json::json!([{"uri": "file:///d/a"}]),
        serde_json::json!({"density": 0.5}),
    ))
    .unwrap_err();
    assert_eq!(field(e), "parameters.density");
    let e = parse(base(
        serde_json::json!([{"uri": "file:///d/a", "weight": 1.0}, {"uri": "file:///d/b", "weight": -1.0}]),
        serde_json::json!({}),
    ))
    .unwrap_err();
    assert_eq!(field(e), "models[].weight");
    let e = parse(base(
        serde_json::json!([{"uri": "file:///d/out"}]),
        serde_json::json!({}),
    ))
    .unwrap_err();
    assert_eq!(field(e), "output.uri");
    let e = parse(
        serde_json::json!({"method": "linear", "models": [{"uri": "file:///a"}],
        "output": {"uri": "file:///o"}, "extra": 1}),
    )
    .unwrap_err();
    assert!(field(e).contains("unknown field"));
    let e = parse(
        serde_json::json!({"method": "soup", "models": [{"uri": "file:///a"}],
        "output": {"uri": "file:///o"}}),
    )
    .unwrap_err();
    assert_eq!(field(e), "method");
}

#[test]
fn hash_ignores_scheduling_but_not_recipe() {
    let a = parse(
        serde_json::json!({"method": "linear", "models": [{"uri": "file:///a"}],
        "output": {"uri": "file:///o"}, "idempotency_key": "k1"}),
    )
    .unwrap();
    let b = parse(
        serde_json::json!({"method": "linear", "models": [{"uri": "file:///a"}],
        "output": {"uri": "file:///o"}, "idempotency_key": "k2"}),
    )
    .unwrap();
    let c = parse(
        serde_json::json!({"method": "linear", "models": [{"uri": "file:///a", "weight": 2.0}],
        "output": {"uri": "file:///o"}}),
    )
    .unwrap();
    assert_eq!(a.recipe.hash(), b.recipe.hash());
    assert_ne!(a.recipe.hash(), c.recipe.hash());
    // The same merge written with its defaults spelled out: another mergekit_config text,
    // the same hash.
    let d = parse(
        serde_json::json!({"method": "linear", "models": [{"uri": "file:///a", "weight": 1.0}],
        "output": {"uri": "file:///o", "max_shard_size": 5000000000u64}}),
    )
    .unwrap();
    assert_ne!(a.recipe.mergekit_config, d.recipe.mergekit_config);
    assert_eq!(a.recipe.hash(), d.recipe.hash());
}

#[test]
fn base_model_methods_validate_every_parameter() {
    use serde_json::json;
    let req = |method: &str, models: serde_json::Value, params: serde_json::Value| {
        json!({"method": method, "base_model": "file:///d/base", "models": models,
               "parameters": params, "output": {"uri": "file:///d/out"}})
    };
    let two = json!([{"uri": "file:///d/a", "weight": 0.5, "parameters": {"density": 0.5}},
                     {"uri": "file:///d/b", "parameters": {"weight": 0.3, "density": 0.5}}]);
    let s = parse(req("ties", two.clone(), json!({}))).unwrap();
    assert_eq!(s.recipe.base_model.as_deref(), Some("file:///d/base"));
    assert_eq!(s.recipe.models[1].weight, 0.3);
    assert!(!s.recipe.models[1].parameters.contains_key("weight"));
    assert!(gta(&s).normalize && !gta(&s).rescale);
    // The object form of a model reference names the same base; an unknown key is refused.
    let mut r = req("ties", two.clone(), json!({}));
    r["base_model"] = json!({"uri": "file:///d/base"});
    let o = parse(r.clone()).unwrap();
    assert_eq!(o.recipe.base_model.as_deref(), Some("file:///d/base"));
    assert_eq!(o.recipe.hash(), s.recipe.hash());
    r["base_model"] = json!({"uri": "file:///d/base", "lora": "x"});
    assert!(parse(r).is_err());
    // Missing base model.
    let mut r = req("ties", two.clone(), json!({}));
    r.as_object_mut().unwrap().remove("base_model");
    assert_eq!(field(parse(r).unwrap_err()), "base_model");
    // Linear takes none.
    let r = req("linear", json!([{"uri": "file:///d/a"}]), json!({}));
    assert_eq!(field(parse(r).unwrap_err()), "base_model");
    // Out-of-range density, per model and global.
    let bad = json!([{"uri": "file:///d/a", "weight": 1, "parameters": {"density": 1.5}}]);
    assert_eq!(
        field(parse(req("ties", bad, json!({}))).unwrap_err()),
        "models[0].parameters.density"
    );
    assert_eq!(
        field(
            parse(req(
                "dare_linear",
                two.clone(),
                json!({"density": [0.5, 0.0]})
            ))
            .unwrap_err()
        ),
        "parameters.density"
    );
    // Unknown names, also ones another method knows.
    assert_eq!(
        field(parse(req("ties", two.clone(), json!({"gamma": 0.1}))).unwrap_err()),
        "parameters.gamma"
    );
    assert_eq!(
        field(parse(req("task_arithmetic", two.clone(), json!({"seed": 1}))).unwrap_err()),
        "parameters.seed"
    );
    let unk = json!([{"uri": "file:///d/a", "weight": 1, "parameters": {"densty": 0.5}}]);
    assert_eq!(
        field(parse(req("ties", unk, json!({}))).unwrap_err()),
        "models[0].parameters.densty"
    );
    // Selection scope: tensor (mergekit), row, or model (one density per model).
    let s = parse(req("breadcrumbs", two.clone(), json!({"scope": "row"}))).unwrap();
    assert!(gta(&s).per_row);
    let model = json!({"scope": "model", "density": 0.2});
    let s = parse(req("ties", two.clone(), model)).unwrap();
    assert!(gta(&s).per_model && !gta(&s).per_row);
    let grad = json!([{"uri": "file:///d/a", "weight": 1, "parameters": {"density": [0.2, 0.5]}}]);
    assert_eq!(
        field(parse(req("ties", grad, json!({"scope": "model"}))).unwrap_err()),
        "models[0].parameters.density"
    );
    assert_eq!(
        field(parse(req("ties", two.clone(), json!({"scope": "global"}))).unwrap_err()),
        "parameters.scope"
    );
    assert_eq!(
        field(parse(req("dare_ties", two.clone(), json!({"scope": "model"}))).unwrap_err()),
        "parameters.scope"
    );
    assert_eq!(
        field(parse(req("dare_ties", two.clone(), json!({"scope": "row"}))).unwrap_err()),
        "parameters.scope"
    );
    // Weight required for GTA methods, unless given globally.
    let now = json!([{"uri": "file:///d/a"}]);
    assert_eq!(
        field(parse(req("task_arithmetic", now.clone(), json!({}))).unwrap_err()),
        "models[0].weight"
    );
    let s = parse(req("task_arithmetic", now, json!({"weight": 0.25}))).unwrap();
    assert_eq!(s.recipe.models[0].weight, 0.25);
    // DELLA: density ± epsilon inside (0, 1).
    let d = json!([{"uri": "file:///d/a", "weight": 1, "parameters": {"density": 0.9, "epsilon": 0.2}}]);
    assert_eq!(
        field(parse(req("della", d, json!({}))).unwrap_err()),
        "models[0].parameters.epsilon"
    );
    // Slerp: the base listed among the models is the base; exactly one other model.
    let s = parse(req(
        "slerp",
        json!([{"uri": "file:///d/base"}, {"uri": "file:///d/a"}]),
        json!({"t": [{"filter": "mlp", "value": [0, 1]}, {"value": 0.5}]}),
    ))
    .unwrap();
    assert_eq!(s.recipe.models.len(), 1);
    assert_eq!(
        field(parse(req("slerp", two.clone(), json!({"t": 0.5}))).unwrap_err()),
        "models"
    );
    assert_eq!(
        field(parse(req("slerp", json!([{"uri": "file:///d/a"}]), json!({}))).unwrap_err()),
        "parameters.t"
    );
    assert_eq!(
        field(
            parse(req(
                "slerp",
                json!([{"uri": "file:///d/a"}]),
                json!({"t": [{"filter": "mlp", "value": 1}]})
            ))
            .unwrap_err()
        ),
        "parameters.t"
    );
}

#[test]
fn passthrough_slices_validate() {
    use serde_json::json;
    let req = |slices: serde_json::Value| json!({"method": "passthrough", "slices": slices, "output": {"uri": "file:///d/out"}});
    let s = parse(req(json!([
        {"sources": [{"uri": "file:///d/a", "layer_range": [0, 2]}]},
        {"sources": [{"uri": "file:///d/b", "layer_range": [1, 2],
                      "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1}]}}]},
        {"sources": [{"uri": "file:///d/a/", "layer_range": [0, 1]}]}
    ])))
    .unwrap();
    assert_eq!(s.recipe.models.len(), 2);
    assert_eq!(s.recipe.slices[2].sources[0].model, 0);
    assert_eq!(s.recipe.slices[1].sources[0].layer_range, [1, 2]);
    let bad = [
        (
            req(json!([{"sources": [{"uri": "file:///d/a", "layer_range": [2, 2]}]}])),
            "slices[0].sources[0].layer_range",
        ),
        (
            req(
                json!([{"sources": [{"uri": "file:///d/a", "layer_range": [0, 1]},
                                    {"uri": "file:///d/b", "layer_range": [0, 1]}]}]),
            ),
            "slices[0].sources",
        ),
        (
            req(
                json!([{"sources": [{"uri": "file:///d/a", "layer_range": [0, 1],
                                     "parameters": {"weight": 1}}]}]),
            ),
            "slices[0].sources[0].parameters.weight",
        ),
        (
            req(
                json!([{"sources": [{"uri": "file:///d/a", "layer_range": [0, 1]}],
                        "parameters": {"weight": 1}}]),
            ),
            "slices[0].parameters.weight",
        ),
        (
            json!({"method": "passthrough", "models": [{"uri": "file:///d/a"}, {"uri": "file:///d/b"}],
                   "output": {"uri": "file:///d/out"}}),
            "models",
        ),
    ];
    for (r, f) in bad {
        assert_eq!(field(parse(r).unwrap_err()), f);
    }
}

#[test]
fn ema_weights() {
    use serde_json::json;
    let s = parse(json!({"method": "ema",
        "models": [{"uri": "file:///d/c1"}, {"uri": "file:///d/c2"}, {"uri": "file:///d/c3"}],
        "parameters": {"decay": 0.5}, "output": {"uri": "file:///d/out"}}))
    .unwrap();
    let w: Vec<f64> = s.recipe.models.iter().map(|m| m.weight).collect();
    // e1 = c1; e2 = .5 e1 + .5 c2; e3 = .5 e2 + .5 c3 → .25 c1 + .25 c2 + .5 c3.
    assert_eq!(w, vec![0.25, 0.25, 0.5]);
    assert_eq!(s.recipe.linear_weights().1, None);
    let e = parse(
        json!({"method": "ema", "models": [{"uri": "file:///d/c1", "weight": 1}],
        "parameters": {"decay": 0.5}, "output": {"uri": "file:///d/out"}}),
    )
    .unwrap_err();
    assert_eq!(field(e), "models[].weight");
    let e = parse(json!({"method": "ema", "models": [{"uri": "file:///d/c1"}],
        "parameters": {"decay": 1.0}, "output": {"uri": "file:///d/out"}}))
    .unwrap_err();
    assert_eq!(field(e), "parameters.decay");
}

#[test]
fn linear_recipe_serializes_as_before() {
    let s = parse(serde_json::json!({
        "method": "linear",
        "models": [{"uri": "file:///d/a", "weight": 2.0}],
        "output": {"uri": "file:///d/out/"}
    }))
    .unwrap();
    let mut v = serde_json::to_value(&s.recipe).unwrap();
    // New beside the old fields: the recipe as mergekit YAML (the soup's mergekit_config.yml).
    assert_eq!(
        v.as_object_mut()
            .unwrap()
            .remove("mergekit_config")
            .unwrap(),
        "merge_method: linear\nmodels:\n  - model: /d/a\n    parameters:\n      weight: 2.0\n"
    );
    assert_eq!(
        v,
        serde_json::json!({"method": "linear",
            "models": [{"uri": "file:///d/a", "weight": 2.0}],
            "parameters": {"method": "linear", "normalize": true},
            "output": {"uri": "file:///d/out/", "dtype": null, "max_shard_size": 5_000_000_000u64}})
    );
}

#[test]
fn sizes() {
    use serde_json::json;
    assert_eq!(parse_size(&json!("2GB")), Some(2_000_000_000));
    assert_eq!(parse_size(&json!("1GiB")), Some(1 << 30));
    assert_eq!(parse_size(&json!("1.5 MB")), Some(1_500_000));
    assert_eq!(parse_size(&json!(4096)), Some(4096));
    assert_eq!(parse_size(&json!("lots")), None);
    assert_eq!(parse_size(&json!(-1)), None);
}

/// Every registered method's validated recipe reads back from its stored JSON as the same
/// recipe (the method by name, its parameters by their tag), with the same hash.
#[test]
fn every_method_round_trips_through_its_stored_form() {
    use crate::methods::{BaseRule, Method};
    use serde_json::json;
    let mut seen = 0;
    for m in Method::all() {
        let about = m.about();
        let models = match m.name() {
            "slerp" | "nearswap" | "passthrough" | "arcee_fusion" => {
                json!([{"uri": "file:///d/a", "weight": 1}])
            }
            _ => {
                json!([{"uri": "file:///d/a", "weight": 0.6}, {"uri": "file:///d/b", "weight": 0.4}])
            }
        };
        let mut req = json!({"method": m.name(), "models": models,
                             "output": {"uri": "file:///d/out"}});
        if about.base != BaseRule::Forbidden {
            req["base_model"] = json!("file:///d/base");
        }
        match m.name() {
            "slerp" | "nearswap" => req["parameters"] = json!({"t": [0.2, 0.8]}),
            "ema" => {
                req["parameters"] = json!({"decay": 0.9});
                req["models"] = json!([{"uri": "file:///d/a"}, {"uri": "file:///d/b"}]);
            }
            "ties" => req["parameters"] = json!({"density": 0.5, "scope": "row"}),
            "lora" => req["parameters"] = json!({"combination": "ties", "density": 0.5}),
            "lora_extract" => {
                req["models"] = json!([{"uri": "file:///d/a"}]);
                req["parameters"] = json!({"max_rank": 8, "include_regexes": ["self_attn"]});
            }
            _ => {}
        }
        let s = parse(req.clone()).unwrap_or_else(|e| panic!("{}: {e}", m.name()));
        let stored = serde_json::to_value(&s.recipe).unwrap();
        assert_eq!(stored["method"], m.name());
        let back: Recipe = serde_json::from_value(stored.clone()).unwrap();
        assert_eq!(back, s.recipe, "{stored}");
        assert_eq!(back.hash(), s.recipe.hash());
        seen += 1;
    }
    assert_eq!(seen, crate::methods::REGISTRY.len());
}

#[test]
fn merged_slices_validate_per_slice() {
    use serde_json::json;
    let req = |slices: serde_json::Value, params: serde_json::Value| {
        json!({"method": "ties", "base_model": "file:///d/base", "slices": slices,
               "parameters": params, "output": {"uri": "file:///d/out"}})
    };
    let src = |uri: &str, a: u64, b: u64| json!({"uri": uri, "layer_range": [a, b]});
    let s = parse(req(
        json!([
            {"sources": [src("file:///d/base", 0, 2),
                         {"uri": "file:///d/a", "layer_range": [0, 2],
                          "parameters": {"weight": 0.5,
                                         "density": [{"filter": "mlp", "value": 0.3}]}},
                         src("file:///d/b", 2, 4)],
             "parameters": {"density": 0.7}},
            {"sources": [src("file:///d/b", 0, 1), src("file:///d/a/", 3, 4)],
             "base_model": "file:///d/b", "parameters": {"normalize": false}}
        ]),
        json!({"weight": 0.25, "density": 0.9}),
    ))
    .unwrap();
    let r = &s.recipe;
    // Inputs: the base, then a and b (each once).
    assert_eq!(r.models.len(), 2);
    assert_eq!(r.slices[0].base, Some(0));
    assert_eq!(
        r.slices[0]
            .sources
            .iter()
            .map(|x| x.model)
            .collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert_eq!(r.slices[1].base, Some(0));
    assert_eq!(
        r.slices[1]
            .sources
            .iter()
            .map(|x| x.model)
            .collect::<Vec<_>>(),
        [2, 1]
    );
    let a = &r.slices[0].sources[1];
    assert_eq!(a.weight, Some(0.5));
    // The source's filter list falls through to the slice's density, then the recipe's.
    let d = &a.parameters["density"];
    assert_eq!(d.eval("model.layers.0.mlp.up_proj.weight", 0.0), Some(0.3));
    assert_eq!(
        d.eval("model.layers.0.self_attn.q_proj.weight", 0.0),
        Some(0.7)
    );
    // b takes the recipe's weight and, in the first slice, the slice's density.
    let cfg = |i: usize| {
        r.slices[i]
            .parameters
            .as_ref()
            .unwrap()
            .get::<GtaConfig>()
            .cloned()
            .unwrap()
    };
    assert_eq!(cfg(0).model_defaults["density"].eval("x", 0.0), Some(0.7));
    assert_eq!(cfg(1).model_defaults["density"].eval("x", 0.0), Some(0.9));
    assert!(cfg(0).normalize);
    assert!(!cfg(1).normalize);
    let bad = [
        (
            req(
                json!([{"sources": [src("file:///d/base", 0, 2), src("file:///d/a", 0, 3)]}]),
                json!({}),
            ),
            "slices[0].sources[1].layer_range",
        ),
        (
            req(
                json!([{"sources": [src("file:///d/a", 0, 2), src("file:///d/b", 0, 2)]}]),
                json!({}),
            ),
            "base_model",
        ),
        (
            req(
                json!([{"sources": [src("file:///d/base", 0, 2), src("file:///d/a", 0, 2)],
                        "base_model": "file:///d/c"}]),
                json!({}),
            ),
            "slices[0].base_model",
        ),
        (
            req(
                json!([{"sources": [src("file:///d/base", 0, 2),
                                    {"uri": "file:///d/a", "layer_range": [0, 2],
                                     "parameters": {"density": 2, "weight": 1}}]}]),
                json!({}),
            ),
            "slices[0].sources[1].parameters.density",
        ),
        (
            req(json!([{"sources": []}]), json!({})),
            "slices[0].sources",
        ),
    ];
    for (r, f) in bad {
        assert_eq!(field(parse(r).unwrap_err()), f);
    }
    // The stored form reads back.
    let json = serde_json::to_string(&s.recipe).unwrap();
    let back: Recipe = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s.recipe);
}

#[test]
fn tokenizer_source_kept_as_written_and_built() {
    use super::tokenizer::{TokenizerBuild, VocabSource};
    let with = |extra: serde_json::Value| {
        let mut v = serde_json::json!({"method": "linear",
            "models": [{"uri": "file:///d/a"}, {"uri": "file:///d/b"}],
            "output": {"uri": "file:///d/out/"}});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        parse(v)
    };
    // `base`: the keyword, kept as written, built from the base's tokenizer.
    let s = with(serde_json::json!({"tokenizer_source": "base"})).unwrap();
    assert_eq!(s.recipe.output.tokenizer_source.as_deref(), Some("base"));
    assert_eq!(s.recipe.output.tokenizer, None);
    let b = TokenizerBuild::of(&s.recipe.output).unwrap();
    assert_eq!(
        (b.spec.source.clone(), b.field, b.source_only()),
        (VocabSource::Base, "tokenizer_source", true)
    );
    // A model: kept as written, built from its tokenizer.
    let s = with(serde_json::json!({"tokenizer_source": "file:///d/t/"})).unwrap();
    let b = TokenizerBuild::of(&s.recipe.output).unwrap();
    assert_eq!(b.spec.source, VocabSource::Model("file:///d/t/".into()));
    assert_eq!(b.source_field(), "tokenizer_source");
    // `union`: the section's `source: union`, as a YAML recipe reads it.
    let s = with(serde_json::json!({"tokenizer_source": "union"})).unwrap();
    assert_eq!(s.recipe.output.tokenizer_source, None);
    let b = TokenizerBuild::of(&s.recipe.output).unwrap();
    assert_eq!((b.spec.source, b.field), (VocabSource::Union, "tokenizer"));
    assert!(!TokenizerBuild::of(&s.recipe.output).unwrap().source_only());
    // A section naming only a source is that section (no longer turned into a copy).
    let s = with(serde_json::json!({"tokenizer": {"source": "base"}})).unwrap();
    let b = TokenizerBuild::of(&s.recipe.output).unwrap();
    assert_eq!(
        (b.field, b.source_field()),
        ("tokenizer", "tokenizer.source")
    );
    assert!(b.source_only());
    let s = with(serde_json::json!({"tokenizer": {"source": "base", "pad_to_multiple_of": 8}}))
        .unwrap();
    assert!(!TokenizerBuild::of(&s.recipe.output).unwrap().source_only());
    // None: the donor's files.
    let s = with(serde_json::json!({})).unwrap();
    assert_eq!(TokenizerBuild::of(&s.recipe.output), None);
    for (bad, want) in [
        (
            serde_json::json!({"tokenizer_source": " "}),
            "tokenizer_source",
        ),
        (
            serde_json::json!({"tokenizer_source": "base", "tokenizer": {"source": "base"}}),
            "tokenizer",
        ),
        (
            // The output is no tokenizer source (refused naming the output, as any input).
            serde_json::json!({"tokenizer_source": "file:///d/out/"}),
            "output.uri",
        ),
    ] {
        assert_eq!(field(with(bad.clone()).unwrap_err()), want, "{bad}");
    }
}

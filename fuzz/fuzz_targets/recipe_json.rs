//! The recipe parser: `Recipe::parse_json` on hostile bytes. Besides "never panics", an
//! accepted recipe must satisfy what the queue and the engine rely on.
#![no_main]

use ladle::recipe::{MAX_MODELS, Recipe};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(sub) = Recipe::parse_json(data) else {
        return;
    };
    let r = &sub.recipe;
    assert!(!r.models.is_empty() && r.models.len() <= MAX_MODELS);
    assert!(r.models.iter().all(|m| m.weight.is_finite()));
    // Every number a kernel will use fits f32 (a larger one would turn into infinity).
    for m in &r.models {
        assert!(m.weight.abs() <= f64::from(f32::MAX), "weight {}", m.weight);
        for (k, s) in &m.parameters {
            for x in s.anchors() {
                assert!(x.is_finite() && x.abs() <= f64::from(f32::MAX), "{k}: {x}");
            }
        }
    }
    assert!(r.models.iter().all(|m| !m.uri.trim().is_empty()));
    assert_eq!(r.hash().len(), 32);
    let (weights, divisor) = r.linear_weights();
    assert_eq!(weights.len(), r.models.len());
    assert!(
        weights.iter().all(|w| w.is_finite()),
        "kernel weights {weights:?}"
    );
    if let Some(d) = divisor {
        assert!(d.is_finite() && d != 0.0, "normalizing divisor {d}");
    }
    // What the API stores must read back.
    let json = serde_json::to_value(r).expect("a recipe serializes");
    let back: Recipe = serde_json::from_value(json).expect("a stored recipe reads back");
    assert_eq!(back.models.len(), r.models.len());
});

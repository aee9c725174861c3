//! mergekit-style YAML recipes (`Recipe::parse_yaml`, what `POST /v1/merges` takes as
//! `application/yaml`): never panics, never blows up (aliases, deep nesting), and an accepted
//! recipe keeps every number a kernel uses within f32.
#![no_main]

use ladle::recipe::{MAX_MODELS, Recipe};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(sub) = Recipe::parse_yaml(text, None, Some("file:///d/out")) else {
        return;
    };
    let r = &sub.recipe;
    assert!(!r.models.is_empty() && r.models.len() <= MAX_MODELS);
    for m in &r.models {
        assert!(m.weight.is_finite() && m.weight.abs() <= f64::from(f32::MAX));
        for (k, s) in &m.parameters {
            for x in s.anchors() {
                assert!(x.is_finite() && x.abs() <= f64::from(f32::MAX), "{k}: {x}");
            }
        }
    }
    assert_eq!(r.hash().len(), 32);
});

//! mergekit-style YAML recipes (`Recipe::parse_yaml`, what `POST /v1/merges` takes as
//! `application/yaml`): never panics, never blows up (aliases, deep nesting), and an accepted
//! recipe keeps every number a kernel uses within f32.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::recipe_yaml(data));

//! The recipe parser: `Recipe::parse_json` on hostile bytes. Besides "never panics", an
//! accepted recipe must satisfy what the queue and the engine rely on.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::recipe_json(data));

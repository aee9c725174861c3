//! The sharded-checkpoint index parser (`model.safetensors.index.json`): never panics, and
//! every shard name it accepts stays one plain file inside the checkpoint folder.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::shard_index(data));

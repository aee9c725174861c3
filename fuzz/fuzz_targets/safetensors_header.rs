//! The safetensors header parser: `parse_header_len` + `parse_header` on hostile bytes.
//!
//! Input: a mode byte, then either a whole file (mode even: the first 8 bytes are the header
//! length) or the header JSON alone (mode odd: its length is exact and the data section is
//! `mode * 64` bytes, so the fuzzer need not guess a consistent length prefix). Besides "never
//! panics", every accepted header must satisfy the invariants readers rely on.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::safetensors_header(data));

//! The safetensors header parser: `parse_header_len` + `parse_header` on hostile bytes.
//!
//! Input: a mode byte, then either a whole file (mode even: the first 8 bytes are the header
//! length) or the header JSON alone (mode odd: its length is exact and the data section is
//! `mode * 64` bytes, so the fuzzer need not guess a consistent length prefix). Besides "never
//! panics", every accepted header must satisfy the invariants readers rely on.
#![no_main]

use ladle::checkpoint::{Header, parse_header, parse_header_len};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let file_size = rest.len() as u64;
        let Ok(n) = parse_header_len(rest, file_size) else {
            return;
        };
        let json = &rest[8..8 + n as usize];
        if let Ok(h) = parse_header(json, n, file_size) {
            check(&h, file_size);
        }
    } else {
        let n = rest.len() as u64;
        let file_size = 8 + n + u64::from(mode) * 64;
        if let Ok(h) = parse_header(rest, n, file_size) {
            check(&h, file_size);
        }
    }
});

/// What a caller may assume of an accepted header.
fn check(h: &Header, file_size: u64) {
    let data_len = file_size - h.data_start();
    let mut prev: Option<&str> = None;
    let mut ranges = Vec::new();
    for t in &h.tensors {
        assert!(prev < Some(t.name.as_str()), "tensors sorted, names unique");
        prev = Some(&t.name);
        let (b, e) = t.data_offsets;
        assert!(b <= e && e <= data_len, "{}: offsets in bounds", t.name);
        let bytes = t.numel().checked_mul(t.dtype.size_bytes() as u64);
        assert_eq!(bytes, Some(e - b), "{}: size agrees with shape", t.name);
        assert!(h.get(&t.name).is_some());
        if e > b {
            ranges.push((b, e));
        }
    }
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        assert!(w[0].1 <= w[1].0, "no overlap");
    }
}

//! Tensor element types (the safetensors vocabulary) and conversion between stored bytes and the
//! `f32` compute type.
//!
//! Rules (ALGORITHMS.md §1.2): F64/F32/F16/BF16 are read into `f32` (F64 rounded to nearest even),
//! merged in `f32`, and written back in the requested float dtype with round-to-nearest-even.
//! NaN stays a (quiet) NaN, ±inf is kept, values too large for F16 become ±inf, subnormals are
//! handled exactly. Integer, bool and FP8 tensors are never decoded here.
//!
//! The conversion loops are written so that LLVM vectorizes them; on x86_64 an AVX2 copy of the
//! same code is picked at run time (integer and exact conversions only, so both paths give the
//! same bits).

use half::f16;
use half::slice::HalfFloatSliceExt;
use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;

/// Element type of a stored tensor, serialized with its safetensors name (`"F32"`, `"BF16"`,
/// `"BOOL"`, `"F8_E4M3"`, ...).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    /// IEEE binary64.
    F64,
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (the top half of a binary32).
    BF16,
    /// FP8 E4M3 (stored and copied, never merged).
    F8_E4M3,
    /// FP8 E5M2 (stored and copied, never merged).
    F8_E5M2,
    /// Signed 64-bit integer.
    I64,
    /// Signed 32-bit integer.
    I32,
    /// Signed 16-bit integer.
    I16,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 64-bit integer.
    U64,
    /// Unsigned 32-bit integer.
    U32,
    /// Unsigned 16-bit integer.
    U16,
    /// Unsigned 8-bit integer.
    U8,
    /// Boolean, one byte per element.
    #[serde(rename = "BOOL")]
    Bool,
}

/// Every dtype, in declaration order (handy for tests and for listing supported names).
pub const ALL_DTYPES: [DType; 15] = [
    DType::F64,
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::F8_E4M3,
    DType::F8_E5M2,
    DType::I64,
    DType::I32,
    DType::I16,
    DType::I8,
    DType::U64,
    DType::U32,
    DType::U16,
    DType::U8,
    DType::Bool,
];

impl DType {
    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F64 | DType::I64 | DType::U64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::F8_E4M3 | DType::F8_E5M2 | DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// The safetensors name (`"F32"`, `"BF16"`, `"BOOL"`, ...), identical to the serde form.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8_E4M3 => "F8_E4M3",
            DType::F8_E5M2 => "F8_E5M2",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U64 => "U64",
            DType::U32 => "U32",
            DType::U16 => "U16",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    /// Parses a safetensors dtype name, exactly as written in a header (case-sensitive).
    /// Names ladle does not know (`F4`, `C64`, `F8_E8M0`, ...) give `None`.
    pub fn parse(s: &str) -> Option<DType> {
        ALL_DTYPES.into_iter().find(|d| d.as_str() == s)
    }

    /// Parses a dtype as a user writes it in a recipe: `bfloat16`/`bf16`, `float16`/`f16`/`half`,
    /// `float32`/`f32`/`float`, `float64`/`f64`, case-insensitively, with an optional `torch.`
    /// prefix; any safetensors name (in any case) is accepted too.
    pub fn parse_user(s: &str) -> Option<DType> {
        let lower = s.trim().to_ascii_lowercase();
        let lower = lower.strip_prefix("torch.").unwrap_or(&lower);
        let d = match lower {
            "bfloat16" | "bf16" => DType::BF16,
            "float16" | "f16" | "half" | "fp16" => DType::F16,
            "float32" | "f32" | "float" | "fp32" => DType::F32,
            "float64" | "f64" | "double" | "fp64" => DType::F64,
            "bool" => DType::Bool,
            other => return DType::parse(&other.to_ascii_uppercase()),
        };
        Some(d)
    }

    /// Whether tensors of this dtype can be merged (decoded to and encoded from `f32`):
    /// F64, F32, F16 and BF16 only.
    pub fn is_mergeable_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a conversion was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DTypeError {
    /// The dtype is not one of F64/F32/F16/BF16.
    #[error("dtype {0} cannot be converted to or from f32 for merging")]
    NotFloat(DType),
    /// The byte buffer does not hold exactly as many elements as the f32 buffer.
    #[error("{dtype} buffer of {bytes} bytes does not hold {elements} elements")]
    LengthMismatch {
        /// The dtype of the byte buffer.
        dtype: DType,
        /// Length of the byte buffer.
        bytes: usize,
        /// Length of the f32 buffer.
        elements: usize,
    },
}

impl DTypeError {
    /// The stable error code: a non-float dtype is `unsupported_dtype`; a length disagreement is
    /// a caller bug (headers are validated before any data is converted), so `internal`.
    pub fn code(&self) -> ErrorCode {
        match self {
            DTypeError::NotFloat(_) => ErrorCode::UnsupportedDtype,
            DTypeError::LengthMismatch { .. } => ErrorCode::Internal,
        }
    }
}

fn check(dtype: DType, bytes: usize, elements: usize) -> Result<(), DTypeError> {
    if !dtype.is_mergeable_float() {
        return Err(DTypeError::NotFloat(dtype));
    }
    if elements.checked_mul(dtype.size_bytes()) != Some(bytes) {
        return Err(DTypeError::LengthMismatch {
            dtype,
            bytes,
            elements,
        });
    }
    Ok(())
}

/// Decodes little-endian `src` of `dtype` into `dst` (one `f32` per element).
///
/// BF16, F16 and F32 convert exactly; F64 rounds to nearest even (Rust `as`). Fails when `dtype`
/// is not a mergeable float or `src.len() != dst.len() * dtype.size_bytes()`.
pub fn decode_to_f32(dtype: DType, src: &[u8], dst: &mut [f32]) -> Result<(), DTypeError> {
    check(dtype, src.len(), dst.len())?;
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { decode_avx2(dtype, src, dst) };
            return Ok(());
        }
    }
    decode_inner(dtype, src, dst);
    Ok(())
}

/// Non-finite values (NaN, ±inf) in little-endian `bytes` of a float `dtype`: the elements
/// whose exponent bits are all ones. 0 for integer, bool and FP8 dtypes (never merged).
/// Vectorised (every merged output chunk is counted), AVX2 picked at run time on x86_64.
pub fn count_nonfinite(dtype: DType, bytes: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { count_nonfinite_avx2(dtype, bytes) };
        }
    }
    count_nonfinite_inner(dtype, bytes)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn count_nonfinite_avx2(dtype: DType, bytes: &[u8]) -> u64 {
    count_nonfinite_inner(dtype, bytes)
}

#[inline(always)]
fn count_nonfinite_inner(dtype: DType, bytes: &[u8]) -> u64 {
    /// Counted in blocks whose lane counters cannot overflow, then summed.
    macro_rules! count {
        ($t:ty, $n:literal, $mask:expr) => {{
            let mask: $t = $mask;
            bytes
                .chunks(4096 * $n)
                .map(|block| {
                    block
                        .chunks_exact($n)
                        .map(|c| {
                            let mut b = [0u8; $n];
                            b.copy_from_slice(c);
                            u32::from(<$t>::from_le_bytes(b) & mask == mask)
                        })
                        .sum::<u32>() as u64
                })
                .sum::<u64>()
        }};
    }
    match dtype {
        DType::F64 => count!(u64, 8, 0x7ff0_0000_0000_0000),
        DType::F32 => count!(u32, 4, 0x7f80_0000),
        DType::F16 => count!(u16, 2, 0x7c00),
        DType::BF16 => count!(u16, 2, 0x7f80),
        _ => 0,
    }
}

/// Encodes `src` into little-endian `dst` of `dtype` with round-to-nearest-even (F64 is exact).
///
/// Fails when `dtype` is not a mergeable float or `dst.len() != src.len() * dtype.size_bytes()`.
pub fn encode_from_f32(dtype: DType, src: &[f32], dst: &mut [u8]) -> Result<(), DTypeError> {
    check(dtype, dst.len(), src.len())?;
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { encode_avx2(dtype, src, dst) };
            return Ok(());
        }
    }
    encode_inner(dtype, src, dst);
    Ok(())
}

/// Casts little-endian `src` of float dtype `from` to `to` as torch's `Tensor.to` does on CPU:
/// through f32 (exact for BF16/F16), then round-to-nearest-even, subnormals kept (torch does
/// not flush them unless `set_flush_denormal(True)`). `from == to` copies.
pub fn cast(from: DType, src: &[u8], to: DType) -> Result<Vec<u8>, DTypeError> {
    if from == to {
        return Ok(src.to_vec());
    }
    let n = src.len() / from.size_bytes().max(1);
    check(from, src.len(), n)?;
    let mut out = vec![0u8; n * to.size_bytes()];
    let mut tmp = vec![0.0f32; n.min(crate::merge::BLOCK_ELEMS)];
    let (fs, ts) = (from.size_bytes(), to.size_bytes());
    for (s, d) in src
        .chunks(crate::merge::BLOCK_ELEMS * fs)
        .zip(out.chunks_mut(crate::merge::BLOCK_ELEMS * ts))
    {
        let t = &mut tmp[..s.len() / fs];
        decode_to_f32(from, s, t)?;
        encode_from_f32(to, t, d)?;
    }
    Ok(out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn decode_avx2(dtype: DType, src: &[u8], dst: &mut [f32]) {
    decode_inner(dtype, src, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn encode_avx2(dtype: DType, src: &[f32], dst: &mut [u8]) {
    encode_inner(dtype, src, dst)
}

/// Converts an `f32` to bfloat16 bits, round-to-nearest-even; NaN becomes a quiet NaN with the
/// same sign and top payload bits. Branch-free, so loops vectorize.
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    (bf16_round_bits(x.to_bits()) >> 16) as u16
}

/// The f32 bit pattern `b` rounded to bf16 (ties to even), as an f32 pattern whose low half is
/// zero. A NaN keeps its sign and top payload bits and is made quiet (rounding it would carry
/// into the exponent or the sign); finite values too large round into infinity. Branch-free
/// (a select), so loops over it vectorize.
#[inline(always)]
pub(crate) fn bf16_round_bits(b: u32) -> u32 {
    let quiet = (b | 0x0040_0000) & 0xFFFF_0000;
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000;
    if b & 0x7FFF_FFFF > 0x7F80_0000 {
        quiet
    } else {
        rounded
    }
}

/// Converts bfloat16 bits to `f32` (exact).
#[inline(always)]
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Elements per stack chunk in the F16 paths (half's slice conversions use F16C on 8 at a time).
const F16_CHUNK: usize = 64;

#[inline(always)]
fn decode_inner(dtype: DType, src: &[u8], dst: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        DType::BF16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16_bits_to_f32(u16::from_le_bytes([s[0], s[1]]));
            }
        }
        DType::F16 => {
            let mut tmp = [f16::ZERO; F16_CHUNK];
            for (d, s) in dst.chunks_mut(F16_CHUNK).zip(src.chunks(F16_CHUNK * 2)) {
                let t = &mut tmp[..d.len()];
                for (h, b) in t.iter_mut().zip(s.chunks_exact(2)) {
                    *h = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
                }
                t.convert_to_f32_slice(d);
            }
        }
        DType::F64 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(8)) {
                *d = f64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]) as f32;
            }
        }
        // Unreachable: `check` admits mergeable floats only.
        _ => {}
    }
}

#[inline(always)]
fn encode_inner(dtype: DType, src: &[f32], dst: &mut [u8]) {
    match dtype {
        DType::F32 => {
            for (d, s) in dst.chunks_exact_mut(4).zip(src) {
                d.copy_from_slice(&s.to_le_bytes());
            }
        }
        DType::BF16 => {
            for (d, s) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&f32_to_bf16_bits(*s).to_le_bytes());
            }
        }
        DType::F16 => {
            let mut tmp = [f16::ZERO; F16_CHUNK];
            for (d, s) in dst.chunks_mut(F16_CHUNK * 2).zip(src.chunks(F16_CHUNK)) {
                let t = &mut tmp[..s.len()];
                t.convert_from_f32_slice(s);
                for (b, h) in d.chunks_exact_mut(2).zip(t.iter()) {
                    b.copy_from_slice(&h.to_bits().to_le_bytes());
                }
            }
        }
        DType::F64 => {
            for (d, s) in dst.chunks_exact_mut(8).zip(src) {
                d.copy_from_slice(&(*s as f64).to_le_bytes());
            }
        }
        // Unreachable: `check` admits mergeable floats only.
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    fn enc(dtype: DType, xs: &[f32]) -> Vec<u8> {
        let mut out = vec![0u8; xs.len() * dtype.size_bytes()];
        encode_from_f32(dtype, xs, &mut out).unwrap();
        out
    }

    fn dec(dtype: DType, bytes: &[u8]) -> Vec<f32> {
        let mut out = vec![0f32; bytes.len() / dtype.size_bytes()];
        decode_to_f32(dtype, bytes, &mut out).unwrap();
        out
    }

    fn bf16_of(x: f32) -> u16 {
        let b = enc(DType::BF16, &[x]);
        u16::from_le_bytes([b[0], b[1]])
    }

    fn f16_of(x: f32) -> u16 {
        let b = enc(DType::F16, &[x]);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Both code paths (portable and AVX2) on the same data.
    fn both_paths_encode(dtype: DType, xs: &[f32]) -> Vec<u8> {
        let mut a = vec![0u8; xs.len() * dtype.size_bytes()];
        encode_inner(dtype, xs, &mut a);
        let b = enc(dtype, xs);
        assert_eq!(a, b, "portable and dispatched encode differ for {dtype}");
        a
    }

    #[test]
    fn names_round_trip_and_serde_matches() {
        for d in ALL_DTYPES {
            assert_eq!(DType::parse(d.as_str()), Some(d));
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(json, format!("\"{}\"", d.as_str()));
            let back: DType = serde_json::from_str(&json).unwrap();
            assert_eq!(back, d);
        }
        assert_eq!(DType::Bool.as_str(), "BOOL");
        assert_eq!(DType::parse("bf16"), None);
        assert_eq!(DType::parse("F4"), None);
        assert_eq!(DType::parse("C64"), None);
        assert!(serde_json::from_str::<DType>("\"Bool\"").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(DType::F64.size_bytes(), 8);
        assert_eq!(DType::BF16.size_bytes(), 2);
        assert_eq!(DType::F8_E4M3.size_bytes(), 1);
        assert_eq!(DType::Bool.size_bytes(), 1);
        assert_eq!(DType::U32.size_bytes(), 4);
    }

    #[test]
    fn user_spellings() {
        for (s, d) in [
            ("bfloat16", DType::BF16),
            ("bf16", DType::BF16),
            ("BF16", DType::BF16),
            ("torch.bfloat16", DType::BF16),
            ("float16", DType::F16),
            ("f16", DType::F16),
            ("half", DType::F16),
            ("float32", DType::F32),
            ("f32", DType::F32),
            ("float", DType::F32),
            ("Float32", DType::F32),
            ("float64", DType::F64),
            ("f64", DType::F64),
            ("F8_E4M3", DType::F8_E4M3),
            ("i64", DType::I64),
        ] {
            assert_eq!(DType::parse_user(s), Some(d), "{s}");
        }
        assert_eq!(DType::parse_user("float8"), None);
        assert_eq!(DType::parse_user(""), None);
    }

    #[test]
    fn mergeable() {
        let m: Vec<DType> = ALL_DTYPES
            .into_iter()
            .filter(|d| d.is_mergeable_float())
            .collect();
        assert_eq!(m, vec![DType::F64, DType::F32, DType::F16, DType::BF16]);
    }

    #[test]
    fn errors() {
        let mut f = [0f32; 2];
        assert_eq!(
            decode_to_f32(DType::I32, &[0; 8], &mut f),
            Err(DTypeError::NotFloat(DType::I32))
        );
        assert_eq!(
            decode_to_f32(DType::F8_E4M3, &[0; 2], &mut f),
            Err(DTypeError::NotFloat(DType::F8_E4M3))
        );
        assert!(matches!(
            decode_to_f32(DType::BF16, &[0; 3], &mut f),
            Err(DTypeError::LengthMismatch { .. })
        ));
        let mut b = [0u8; 7];
        assert!(matches!(
            encode_from_f32(DType::F32, &f, &mut b),
            Err(DTypeError::LengthMismatch { .. })
        ));
        assert_eq!(
            encode_from_f32(DType::Bool, &f, &mut b[..2]),
            Err(DTypeError::NotFloat(DType::Bool))
        );
        assert_eq!(
            DTypeError::NotFloat(DType::I8).code(),
            ErrorCode::UnsupportedDtype
        );
    }

    fn sample_values() -> Vec<f32> {
        let mut v = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.1,
            -3.75,
            1e-3,
            65504.0,
            65520.0,
            1e10,
            -1e-10,
            f32::MIN_POSITIVE,
            f32::MIN_POSITIVE / 8.0,
            f32::from_bits(1),
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::EPSILON,
        ];
        // Deterministic pseudo-random bit patterns (finite and not).
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..5000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            v.push(f32::from_bits((s >> 32) as u32));
        }
        v
    }

    #[test]
    fn round_trips_are_exact_where_representable() {
        let xs: Vec<f32> = sample_values()
            .into_iter()
            .filter(|x| !x.is_nan())
            .collect();
        // f32 and f64 hold every f32 exactly.
        for d in [DType::F32, DType::F64] {
            let back = dec(d, &both_paths_encode(d, &xs));
            for (a, b) in xs.iter().zip(&back) {
                assert_eq!(a.to_bits(), b.to_bits(), "{d}");
            }
        }
        // A bf16/f16 value survives decode → encode unchanged, for every bit pattern; a NaN
        // comes back as a quiet NaN of the same sign.
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let bytes: Vec<u8> = all.iter().flat_map(|h| h.to_le_bytes()).collect();
        for d in [DType::BF16, DType::F16] {
            let f = dec(d, &bytes);
            let again = both_paths_encode(d, &f);
            for (i, &h) in all.iter().enumerate() {
                let b = u16::from_le_bytes([again[2 * i], again[2 * i + 1]]);
                if f[i].is_nan() {
                    let r = dec(d, &b.to_le_bytes())[0];
                    assert!(r.is_nan(), "{d} pattern {h:#06x}");
                    assert_eq!(r.is_sign_negative(), f[i].is_sign_negative());
                } else {
                    assert_eq!(h, b, "{d} pattern {h:#06x}");
                }
            }
        }
    }

    #[test]
    fn decode_is_exact() {
        // bf16 is the top half of an f32.
        let b = 0x3F81u16.to_le_bytes();
        assert_eq!(dec(DType::BF16, &b)[0], 1.0078125);
        // f16 max, smallest subnormal, -0.
        assert_eq!(dec(DType::F16, &0x7BFFu16.to_le_bytes())[0], 65504.0);
        assert_eq!(dec(DType::F16, &0x0001u16.to_le_bytes())[0], 2f32.powi(-24));
        assert_eq!(
            dec(DType::F16, &0x8000u16.to_le_bytes())[0].to_bits(),
            0x8000_0000
        );
        assert_eq!(dec(DType::F16, &0x7C00u16.to_le_bytes())[0], f32::INFINITY);
        assert!(dec(DType::F16, &0x7E00u16.to_le_bytes())[0].is_nan());
        // f64 → f32 rounds to nearest even: 1 + 2^-24 is halfway between 1 and 1 + 2^-23.
        let x = 1.0f64 + 2f64.powi(-24);
        assert_eq!(dec(DType::F64, &x.to_le_bytes())[0], 1.0);
        let y = 1.0f64 + 3.0 * 2f64.powi(-24);
        assert_eq!(dec(DType::F64, &y.to_le_bytes())[0], 1.0 + 2f32.powi(-22));
        assert_eq!(dec(DType::F64, &1e300f64.to_le_bytes())[0], f32::INFINITY);
        assert!(dec(DType::F64, &f64::NAN.to_le_bytes())[0].is_nan());
        // Little-endian F32.
        assert_eq!(dec(DType::F32, &[0, 0, 0x80, 0x3F])[0], 1.0);
    }

    #[test]
    fn bf16_edge_cases() {
        assert_eq!(bf16_of(0.0), 0x0000);
        assert_eq!(bf16_of(-0.0), 0x8000);
        assert_eq!(bf16_of(f32::INFINITY), 0x7F80);
        assert_eq!(bf16_of(f32::NEG_INFINITY), 0xFF80);
        // NaN stays NaN and is quiet, also for a signalling NaN with payload only in the low bits
        // (plain truncation would turn it into infinity).
        for nan in [
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7F80_0001),
            f32::from_bits(0xFF80_0001),
        ] {
            let b = bf16_of(nan);
            assert_eq!(b & 0x7F80, 0x7F80);
            assert_ne!(b & 0x0040, 0, "quiet bit");
            assert_eq!(b & 0x8000 != 0, nan.is_sign_negative());
        }
        // Ties to even: 1 + 2^-8 lies exactly between 1 and 1 + 2^-7 → 1 (even).
        assert_eq!(bf16_of(1.0 + 2f32.powi(-8)), 0x3F80);
        // 1 + 3·2^-8 lies between 1 + 2^-7 (odd) and 1 + 2^-6 → up to the even one.
        assert_eq!(bf16_of(1.0 + 3.0 * 2f32.powi(-8)), 0x3F82);
        // Just above a tie rounds up.
        assert_eq!(bf16_of(f32::from_bits(0x3F80_8001)), 0x3F81);
        // Max finite bf16 and overflow to inf when rounding up past it.
        assert_eq!(bf16_of(f32::from_bits(0x7F7F_0000)), 0x7F7F);
        assert_eq!(bf16_of(f32::MAX), 0x7F80);
        assert_eq!(bf16_of(f32::MIN), 0xFF80);
        // Subnormals: the bf16 subnormal range is the f32 one.
        assert_eq!(bf16_of(f32::from_bits(0x0001_0000)), 0x0001);
        assert_eq!(bf16_of(f32::from_bits(0x0000_8000)), 0x0000); // tie → even (0)
        assert_eq!(bf16_of(f32::from_bits(0x0001_8000)), 0x0002); // tie → even (2)
        assert_eq!(bf16_of(f32::from_bits(0x8000_0001)), 0x8000);
        // Rounding up from the largest subnormal gives the smallest normal.
        assert_eq!(bf16_of(f32::from_bits(0x007F_FFFF)), 0x0080);
    }

    #[test]
    fn bf16_matches_half_on_many_bit_patterns() {
        // Every upper half combined with the low halves where rounding decisions happen, plus a
        // strided sweep of the whole space.
        let lows: [u32; 12] = [
            0x0000, 0x0001, 0x3FFF, 0x7FFF, 0x8000, 0x8001, 0xBFFF, 0xC000, 0xFFFF, 0x1234, 0x7FFE,
            0x8002,
        ];
        let mut xs = Vec::with_capacity(65536 * lows.len() + 70_000);
        for hi in 0..=0xFFFFu32 {
            for lo in lows {
                xs.push(f32::from_bits((hi << 16) | lo));
            }
        }
        let mut b = 0u32;
        while let Some(next) = b.checked_add(61_441) {
            xs.push(f32::from_bits(next));
            b = next;
        }
        let ours = both_paths_encode(DType::BF16, &xs);
        for (x, o) in xs.iter().zip(ours.chunks_exact(2)) {
            let got = u16::from_le_bytes([o[0], o[1]]);
            let want = bf16::from_f32(*x).to_bits();
            assert_eq!(got, want, "x = {:#010x}", x.to_bits());
            assert_eq!(f32_to_bf16_bits(*x), want);
        }
    }

    #[test]
    fn f16_edge_cases() {
        assert_eq!(f16_of(0.0), 0x0000);
        assert_eq!(f16_of(-0.0), 0x8000);
        assert_eq!(f16_of(f32::INFINITY), 0x7C00);
        assert_eq!(f16_of(f32::NEG_INFINITY), 0xFC00);
        for nan in [f32::NAN, -f32::NAN, f32::from_bits(0x7F80_0001)] {
            let h = f16_of(nan);
            assert_eq!(h & 0x7C00, 0x7C00);
            assert_ne!(h & 0x03FF, 0, "still a NaN");
            assert_ne!(h & 0x0200, 0, "quiet bit");
        }
        // Max finite, and overflow: 65520 is the tie between 65504 and 65536 (=inf) → inf.
        assert_eq!(f16_of(65504.0), 0x7BFF);
        assert_eq!(f16_of(65519.0), 0x7BFF);
        assert_eq!(f16_of(65520.0), 0x7C00);
        assert_eq!(f16_of(1e6), 0x7C00);
        assert_eq!(f16_of(-1e6), 0xFC00);
        // Ties to even at 1.0: ulp is 2^-10.
        assert_eq!(f16_of(1.0 + 2f32.powi(-11)), 0x3C00);
        assert_eq!(f16_of(1.0 + 3.0 * 2f32.powi(-11)), 0x3C02);
        // Subnormals: smallest is 2^-24; half of it is a tie → 0; 1.5 × it → 2 (even).
        assert_eq!(f16_of(2f32.powi(-24)), 0x0001);
        assert_eq!(f16_of(2f32.powi(-25)), 0x0000);
        assert_eq!(f16_of(2f32.powi(-25) * 1.0001), 0x0001);
        assert_eq!(f16_of(1.5 * 2f32.powi(-24)), 0x0002);
        assert_eq!(f16_of(-2f32.powi(-24)), 0x8001);
        // Largest subnormal and smallest normal.
        assert_eq!(f16_of(1023.0 * 2f32.powi(-24)), 0x03FF);
        assert_eq!(f16_of(2f32.powi(-14)), 0x0400);
        // Matches half's scalar conversion on many patterns.
        let xs = sample_values();
        let ours = both_paths_encode(DType::F16, &xs);
        for (x, o) in xs.iter().zip(ours.chunks_exact(2)) {
            let got = u16::from_le_bytes([o[0], o[1]]);
            let want = f16::from_f32(*x);
            if x.is_nan() {
                assert!(f16::from_bits(got).is_nan());
            } else {
                assert_eq!(got, want.to_bits(), "x = {:#010x}", x.to_bits());
            }
        }
    }

    #[test]
    fn lengths_not_multiple_of_chunk() {
        for n in [0usize, 1, 7, 63, 64, 65, 130] {
            let xs: Vec<f32> = (0..n).map(|i| i as f32 * 0.37 - 5.0).collect();
            for d in [DType::F16, DType::BF16, DType::F32, DType::F64] {
                let back = dec(d, &both_paths_encode(d, &xs));
                assert_eq!(back.len(), n);
                for (a, b) in xs.iter().zip(&back) {
                    assert!((a - b).abs() <= a.abs() * 2f32.powi(-8), "{d}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn vectorised_nonfinite_count_matches_a_plain_count() {
        let mut s = 0xD1B5_4A32_D192_ED03u64;
        // Random bytes with many all-ones exponents, across block boundaries.
        let bytes: Vec<u8> = (0..3 * 4096 * 8 + 13)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                if s.is_multiple_of(3) {
                    0xFF
                } else {
                    (s >> 24) as u8
                }
            })
            .collect();
        for dtype in [DType::F64, DType::F32, DType::F16, DType::BF16] {
            let n = dtype.size_bytes();
            let bytes = &bytes[..bytes.len() / n * n];
            let plain = bytes
                .chunks_exact(n)
                .filter(|c| {
                    let mut b = [0u8; 8];
                    b[..n].copy_from_slice(c);
                    let v = u64::from_le_bytes(b);
                    let mask = match dtype {
                        DType::F64 => 0x7ff0_0000_0000_0000,
                        DType::F32 => 0x7f80_0000,
                        DType::F16 => 0x7c00,
                        _ => 0x7f80,
                    };
                    v & mask == mask
                })
                .count() as u64;
            assert!(plain > 0);
            assert_eq!(count_nonfinite(dtype, bytes), plain, "{dtype}");
            assert_eq!(count_nonfinite_inner(dtype, bytes), plain, "{dtype}");
        }
    }

    #[test]
    fn bf16_bits_agree_with_the_f32_rounding() {
        for x in sample_values() {
            let r = bf16_round_bits(x.to_bits());
            assert_eq!(r & 0xFFFF, 0);
            assert_eq!((r >> 16) as u16, f32_to_bf16_bits(x));
            assert_eq!((r >> 16) as u16, bf16::from_f32(x).to_bits(), "{x:?}");
        }
    }

    #[test]
    fn counts_nonfinite_per_dtype() {
        let vals = [
            1.0f32,
            f32::NAN,
            -f32::INFINITY,
            f32::INFINITY,
            -0.0,
            65504.0,
            1e-40,
        ];
        for dtype in [DType::F64, DType::F32, DType::F16, DType::BF16] {
            let mut bytes = vec![0u8; vals.len() * dtype.size_bytes()];
            encode_from_f32(dtype, &vals, &mut bytes).unwrap();
            assert_eq!(count_nonfinite(dtype, &bytes), 3, "{dtype}");
        }
        // 1e6 overflows f16 to inf (counted there only).
        let mut h = vec![0u8; 2];
        encode_from_f32(DType::F16, &[1e6], &mut h).unwrap();
        assert_eq!(count_nonfinite(DType::F16, &h), 1);
        assert_eq!(count_nonfinite(DType::I32, &[0xff; 8]), 0);
    }
}

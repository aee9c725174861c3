//! Strict parsing of safetensors headers.
//!
//! A safetensors file is an 8-byte little-endian `u64` `N`, then `N` bytes of UTF-8 JSON, then
//! the data section. The JSON object maps each tensor name to
//! `{"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}` (offsets relative to the data
//! section, which starts at `8 + N`), plus an optional `"__metadata__": {str: str}`.
//!
//! The parser trusts nothing: duplicate names (which `serde_json` maps would silently collapse),
//! unknown dtypes, unknown keys, sizes that disagree with the shape, offsets out of the file and
//! overlapping tensors are all errors that name the tensor by its position in the header
//! (`tensor 3 of the header`). Messages never quote the file: no tensor names, dtype strings,
//! keys, values or JSON parser text (a file posing as weights, a text file say, would have its
//! bytes handed back); those stay in the error's fields for the log. It never panics and never
//! allocates much more than the header itself (shape rank is bounded).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::error::ErrorCode;
use crate::merge::DType;

/// The largest header length accepted (100 MiB; the safetensors crate allows 100 MB).
pub const MAX_HEADER_LEN: u64 = 100 * 1024 * 1024;

/// The most dimensions a tensor shape may have (bounds memory on hostile headers).
pub const MAX_RANK: usize = 64;

/// The reserved key holding string metadata.
pub const METADATA_KEY: &str = "__metadata__";

/// Why a header (or a shard index, or a shard plan) is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer than 8 bytes where the header length should be.
    #[error("file is {len} bytes, too short to hold the 8-byte header length")]
    TooShort {
        /// Bytes available.
        len: u64,
    },
    /// The header length is over [`MAX_HEADER_LEN`].
    // The length is the file's first 8 bytes: never in the message (a text file posing as
    // weights would hand its first 8 bytes back as a number).
    #[error("the declared header length exceeds the limit of {MAX_HEADER_LEN} bytes")]
    HeaderTooLarge {
        /// The declared header length.
        len: u64,
    },
    /// `8 + N` is past the end of the file.
    #[error("the declared header length runs past the end of the {file_size}-byte file")]
    HeaderPastEof {
        /// The declared header length.
        header_len: u64,
        /// The file size.
        file_size: u64,
    },
    /// The JSON bytes given are not as many as the declared header length.
    #[error("header is {actual} bytes, but its declared length differs")]
    HeaderLength {
        /// The declared header length.
        expected: u64,
        /// Bytes given.
        actual: u64,
    },
    /// The header is not UTF-8.
    #[error("header is not valid UTF-8 (invalid byte at {valid_up_to})")]
    NotUtf8 {
        /// Offset of the first invalid byte within the header.
        valid_up_to: u64,
    },
    /// Invalid JSON, or JSON of the wrong shape (unknown key, wrong type, ...).
    #[error("invalid {}: {what}", .context.as_deref().unwrap_or("header"))]
    Json {
        /// What was being read: `tensor 3 of the header`, `__metadata__`, `index`, or none for
        /// the header (ladle's words, never the file's).
        context: Option<String>,
        /// What is wrong, in general terms and with a position (ladle's words).
        what: String,
        /// The JSON parser's message: it may quote the file, so it is for the log only.
        message: String,
    },
    /// A tensor name appears twice.
    #[error("tensor {index} of the header has the name of an earlier tensor")]
    DuplicateTensor {
        /// The name (for the log only: it is the file's bytes).
        name: String,
        /// The tensor's position (1-based, in the header's order).
        index: usize,
    },
    /// A dtype name ladle does not know.
    #[error("tensor {index} of the header has an unknown dtype")]
    UnknownDtype {
        /// The tensor (log only).
        name: String,
        /// The dtype as written (log only).
        dtype: String,
        /// The tensor's position (1-based, in the header's order).
        index: usize,
    },
    /// `data_offsets` end before they begin.
    #[error("tensor {index} of the header has data_offsets that end before they begin")]
    OffsetsReversed {
        /// The tensor (log only).
        name: String,
        /// First offset.
        begin: u64,
        /// Second offset.
        end: u64,
        /// The tensor's position (1-based, in the header's order).
        index: usize,
    },
    /// The byte size of the shape does not fit in 64 bits.
    #[error("tensor {index} of the header has a shape whose size in bytes overflows")]
    SizeOverflow {
        /// The tensor (log only).
        name: String,
        /// Its shape.
        shape: Vec<u64>,
        /// The tensor's position (1-based, in the header's order).
        index: usize,
    },
    /// `shape × dtype size` differs from `end − begin`.
    #[error(
        "tensor {index} of the header: the bytes its shape and dtype need differ from what its data_offsets span"
    )]
    SizeMismatch {
        /// The tensor (log only).
        name: String,
        /// Its shape.
        shape: Vec<u64>,
        /// Its dtype.
        dtype: DType,
        /// Bytes the shape needs.
        expected: u64,
        /// Bytes the offsets span.
        actual: u64,
        /// The tensor's position (1-based, in the header's order).
        index: usize,
    },
    /// A tensor's data ends past the end of the data section.
    #[error("tensor {index} of the header ends past the {data_len}-byte data section")]
    OutOfBounds {
        /// The tensor (log only).
        name: String,
        /// Its end offset.
        end: u64,
        /// Size of the data section.
        data_len: u64,
        /// The tensor's position (1-based, in the header's order).
        index: usize,
    },
    /// Two tensors share bytes.
    #[error("tensors {first_index} and {second_index} of the header overlap")]
    Overlap {
        /// The tensor starting first (log only).
        first: String,
        /// The tensor starting inside it (log only).
        second: String,
        /// Their positions (1-based, in the header's order).
        first_index: usize,
        /// See `first_index`.
        second_index: usize,
    },
    /// A shard index is larger than [`crate::checkpoint::index::MAX_INDEX_LEN`].
    #[error("index is {len} bytes, over the limit of {max} bytes")]
    IndexTooLarge {
        /// Its size.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A shard index names a file that is not a plain `*.safetensors` file name.
    #[error("index places a tensor in a file that is not a plain *.safetensors file name")]
    InvalidShardName {
        /// The tensor (log only).
        tensor: String,
        /// The file name as written (log only).
        file: String,
    },
    /// A tensor has a reserved or empty name (on input, or to write).
    #[error("tensor {index} of the header has a reserved or empty name")]
    ReservedName {
        /// The name (log only).
        name: String,
        /// The tensor's position (1-based, in the header's order).
        index: usize,
    },
}

impl HeaderError {
    /// Always [`ErrorCode::CheckpointMalformed`].
    pub fn code(&self) -> ErrorCode {
        ErrorCode::CheckpointMalformed
    }

    /// A JSON error of `context`: its position and kind for the message, the parser's text
    /// (which may quote the file) for the log.
    pub(crate) fn json(context: Option<String>, e: &serde_json::Error) -> HeaderError {
        HeaderError::Json {
            context,
            what: json_what(e),
            message: e.to_string(),
        }
    }
}

/// What is wrong with some JSON, in ladle's words: the kind of error and where (never the
/// parser's text, which quotes the input).
pub(crate) fn json_what(e: &serde_json::Error) -> String {
    let kind = match e.classify() {
        serde_json::error::Category::Syntax => "not valid JSON",
        serde_json::error::Category::Eof => "JSON that ends too early",
        serde_json::error::Category::Data => {
            "JSON of the wrong shape (an unknown or duplicate key, a missing field or a wrong type)"
        }
        serde_json::error::Category::Io => "unreadable JSON",
    };
    format!("{kind} at line {}, column {}", e.line(), e.column())
}

/// One tensor of a header. Offsets are relative to the data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape (empty for a scalar).
    pub shape: Vec<u64>,
    /// `[begin, end)` within the data section.
    pub data_offsets: (u64, u64),
}

impl TensorInfo {
    /// Number of elements (1 for a scalar). Exact for every tensor [`parse_header`] returns;
    /// saturates at `u64::MAX` otherwise.
    pub fn numel(&self) -> u64 {
        self.shape.iter().fold(1u64, |a, &d| a.saturating_mul(d))
    }

    /// Bytes of data: `end − begin` (0 if reversed, which [`parse_header`] never returns).
    pub fn byte_len(&self) -> u64 {
        self.data_offsets.1.saturating_sub(self.data_offsets.0)
    }
}

/// A parsed, validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// `N`, the JSON length (including padding).
    pub header_len: u64,
    /// Tensors, sorted by name.
    pub tensors: Vec<TensorInfo>,
    /// `__metadata__` (empty when absent).
    pub metadata: BTreeMap<String, String>,
}

impl Header {
    /// Absolute file offset of the data section: `8 + header_len`.
    pub fn data_start(&self) -> u64 {
        // Saturating only matters for a hand-built `Header`; parsed ones have N ≤ MAX_HEADER_LEN.
        self.header_len.saturating_add(8)
    }

    /// The tensor with this name.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
            .and_then(|i| self.tensors.get(i))
    }
}

/// Reads the header length `N` from the first 8 bytes of a file of `file_size` bytes and checks
/// it: `N ≤` [`MAX_HEADER_LEN`] and `8 + N ≤ file_size`.
pub fn parse_header_len(first8: &[u8], file_size: u64) -> Result<u64, HeaderError> {
    let Some(bytes) = first8.get(..8) else {
        return Err(HeaderError::TooShort {
            len: first8.len() as u64,
        });
    };
    let mut arr = [0u8; 8];
    arr.copy_from_slice(bytes);
    let n = u64::from_le_bytes(arr);
    if n > MAX_HEADER_LEN {
        return Err(HeaderError::HeaderTooLarge { len: n });
    }
    // Cannot overflow: n ≤ MAX_HEADER_LEN.
    if 8 + n > file_size {
        return Err(HeaderError::HeaderPastEof {
            header_len: n,
            file_size,
        });
    }
    Ok(n)
}

/// Parses and validates the header JSON (`json`, exactly `header_len` bytes) of a file of
/// `file_size` bytes. See the module documentation for every rule checked.
pub fn parse_header(json: &[u8], header_len: u64, file_size: u64) -> Result<Header, HeaderError> {
    if json.len() as u64 != header_len {
        return Err(HeaderError::HeaderLength {
            expected: header_len,
            actual: json.len() as u64,
        });
    }
    if header_len > MAX_HEADER_LEN {
        return Err(HeaderError::HeaderTooLarge { len: header_len });
    }
    let data_len = file_size
        .checked_sub(8 + header_len)
        .ok_or(HeaderError::HeaderPastEof {
            header_len,
            file_size,
        })?;
    let text = std::str::from_utf8(json).map_err(|e| HeaderError::NotUtf8 {
        valid_up_to: e.valid_up_to() as u64,
    })?;

    let raw = parse_raw(text)?;

    let mut metadata = None;
    // Each tensor with its position in the header (1-based): messages name tensors by it,
    // never by the file's bytes.
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, entry) in raw {
        match entry {
            RawEntry::Metadata(m) => {
                if metadata.replace(m).is_some() {
                    return Err(HeaderError::Json {
                        context: Some(METADATA_KEY.to_string()),
                        what: "appears more than once".to_string(),
                        message: "appears more than once".to_string(),
                    });
                }
            }
            // An empty name cannot be written back (see `writer`): refuse it here, on input.
            RawEntry::Tensor(_) if name.is_empty() => {
                let index = tensors.len() + 1;
                return Err(HeaderError::ReservedName { name, index });
            }
            RawEntry::Tensor(t) => {
                let index = tensors.len() + 1;
                tensors.push((name, index, t));
            }
        }
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    for pair in tensors.windows(2) {
        if pair[0].0 == pair[1].0 {
            return Err(HeaderError::DuplicateTensor {
                name: pair[0].0.clone(),
                index: pair[1].1,
            });
        }
    }

    let mut out = Vec::with_capacity(tensors.len());
    let mut positions = BTreeMap::new();
    for (name, index, raw) in tensors {
        positions.insert(name.clone(), index);
        out.push(validate_tensor(name, index, raw, data_len)?);
    }
    check_overlaps(&out, &positions)?;

    Ok(Header {
        header_len,
        tensors: out,
        metadata: metadata.unwrap_or_default(),
    })
}

fn validate_tensor(
    name: String,
    index: usize,
    raw: RawTensor,
    data_len: u64,
) -> Result<TensorInfo, HeaderError> {
    let Some(dtype) = DType::parse(&raw.dtype) else {
        return Err(HeaderError::UnknownDtype {
            name,
            dtype: raw.dtype,
            index,
        });
    };
    let (begin, end) = raw.data_offsets;
    if begin > end {
        return Err(HeaderError::OffsetsReversed {
            name,
            begin,
            end,
            index,
        });
    }
    // Exact: a zero dimension makes the tensor empty whatever the other dimensions are.
    let numel = if raw.shape.contains(&0) {
        Some(0)
    } else {
        raw.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))
    };
    let expected = numel.and_then(|n| n.checked_mul(dtype.size_bytes() as u64));
    let Some(expected) = expected else {
        return Err(HeaderError::SizeOverflow {
            name,
            shape: raw.shape,
            index,
        });
    };
    if expected != end - begin {
        return Err(HeaderError::SizeMismatch {
            name,
            shape: raw.shape,
            dtype,
            expected,
            actual: end - begin,
            index,
        });
    }
    if end > data_len {
        return Err(HeaderError::OutOfBounds {
            name,
            end,
            data_len,
            index,
        });
    }
    Ok(TensorInfo {
        name,
        dtype,
        shape: raw.shape,
        data_offsets: (begin, end),
    })
}

/// Rejects any two tensors whose non-empty byte ranges intersect. Empty tensors own no bytes.
fn check_overlaps(
    tensors: &[TensorInfo],
    positions: &BTreeMap<String, usize>,
) -> Result<(), HeaderError> {
    let mut order: Vec<&TensorInfo> = tensors.iter().filter(|t| t.byte_len() > 0).collect();
    order.sort_by_key(|t| t.data_offsets);
    // The tensor reaching furthest so far; sorted by begin, any later tensor starting before
    // its end overlaps it.
    let mut furthest: Option<&TensorInfo> = None;
    for t in order {
        if let Some(f) = furthest
            && t.data_offsets.0 < f.data_offsets.1
        {
            let at = |t: &TensorInfo| positions.get(&t.name).copied().unwrap_or(0);
            return Err(HeaderError::Overlap {
                first: f.name.clone(),
                second: t.name.clone(),
                first_index: at(f),
                second_index: at(t),
            });
        }
        if furthest.is_none_or(|f| t.data_offsets.1 > f.data_offsets.1) {
            furthest = Some(t);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Raw JSON layer: keeps every key (duplicates included) so that validation can see them.

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensor {
    dtype: String,
    #[serde(deserialize_with = "bounded_shape")]
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

enum RawEntry {
    Metadata(BTreeMap<String, String>),
    Tensor(RawTensor),
}

/// Parses the top-level object, reporting which entry a JSON error happened in.
fn parse_raw(text: &str) -> Result<Vec<(String, RawEntry)>, HeaderError> {
    let context = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_str(text);
    let result = HeaderSeed { context: &context }
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v));
    result.map_err(|e| HeaderError::json(context.into_inner(), &e))
}

struct HeaderSeed<'a> {
    context: &'a RefCell<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for HeaderSeed<'_> {
    type Value = Vec<(String, RawEntry)>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for HeaderSeed<'_> {
    type Value = Vec<(String, RawEntry)>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a safetensors header object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::new();
        let mut tensors = 0usize;
        while let Some(key) = map.next_key::<String>()? {
            if key == METADATA_KEY {
                self.context.replace(Some(METADATA_KEY.to_string()));
                let m = map.next_value::<StrictStringMap>()?;
                entries.push((key, RawEntry::Metadata(m.0)));
            } else {
                tensors += 1;
                self.context
                    .replace(Some(format!("tensor {tensors} of the header")));
                let t = map.next_value::<RawTensor>()?;
                entries.push((key, RawEntry::Tensor(t)));
            }
            self.context.replace(None);
        }
        Ok(entries)
    }
}

/// A JSON object of strings to strings that rejects duplicate keys.
pub(crate) struct StrictStringMap(pub(crate) BTreeMap<String, String>);

impl<'de> serde::Deserialize<'de> for StrictStringMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrictStringMap;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of strings")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StrictStringMap, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    if out.contains_key(&k) {
                        return Err(de::Error::custom(format_args!("duplicate key {k:?}")));
                    }
                    out.insert(k, v);
                }
                Ok(StrictStringMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A shape: an array of at most [`MAX_RANK`] non-negative integers.
fn bounded_shape<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<u64>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "an array of at most {MAX_RANK} dimensions")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u64>, A::Error> {
            let mut out = Vec::new();
            while let Some(d) = seq.next_element::<u64>()? {
                if out.len() == MAX_RANK {
                    return Err(de::Error::custom(format_args!(
                        "shape has more than {MAX_RANK} dimensions"
                    )));
                }
                out.push(d);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{Dtype as StDtype, TensorView};
    use std::collections::HashMap;

    /// A file with these `(name, dtype, shape)` tensors written by the safetensors crate.
    fn st_file(
        tensors: &[(&str, StDtype, &[usize])],
        metadata: Option<HashMap<String, String>>,
    ) -> Vec<u8> {
        let datas: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, d, s)| {
                let n: usize = s.iter().product::<usize>() * d.bitsize() / 8;
                (0..n).map(|i| i as u8).collect()
            })
            .collect();
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .zip(&datas)
            .map(|((name, d, s), data)| {
                (
                    name.to_string(),
                    TensorView::new(*d, s.to_vec(), data).unwrap(),
                )
            })
            .collect();
        safetensors::serialize(views, metadata).unwrap()
    }

    fn parse_file(file: &[u8]) -> Result<Header, HeaderError> {
        let n = parse_header_len(file, file.len() as u64)?;
        parse_header(&file[8..8 + n as usize], n, file.len() as u64)
    }

    /// A file from a literal JSON header and `data_len` bytes of data.
    fn raw_file(json: &str, data_len: usize) -> Vec<u8> {
        let mut f = (json.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(json.as_bytes());
        f.resize(f.len() + data_len, 0);
        f
    }

    fn parse_json(json: &str, data_len: usize) -> Result<Header, HeaderError> {
        parse_file(&raw_file(json, data_len))
    }

    #[test]
    fn parses_files_written_by_safetensors() {
        let meta = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("note".to_string(), "héllo \"quoted\"".to_string()),
        ]);
        let file = st_file(
            &[
                ("model.layers.0.weight", StDtype::BF16, &[4, 3]),
                ("b.bias", StDtype::F32, &[3]),
                ("a.scalar", StDtype::F64, &[]),
                ("empty", StDtype::F16, &[0, 5]),
                ("steps", StDtype::I64, &[1]),
                ("mask", StDtype::BOOL, &[7]),
                ("q", StDtype::F8_E4M3, &[2, 2]),
            ],
            Some(meta),
        );
        let h = parse_file(&file).unwrap();
        let names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "a.scalar",
                "b.bias",
                "empty",
                "mask",
                "model.layers.0.weight",
                "q",
                "steps"
            ]
        );
        assert_eq!(h.metadata["format"], "pt");
        assert_eq!(h.metadata["note"], "héllo \"quoted\"");
        assert_eq!(h.data_start(), 8 + h.header_len);
        assert_eq!(h.header_len % 8, 0);

        let w = h.get("model.layers.0.weight").unwrap();
        assert_eq!(w.dtype, DType::BF16);
        assert_eq!(w.shape, vec![4, 3]);
        assert_eq!(w.numel(), 12);
        assert_eq!(w.byte_len(), 24);
        let s = h.get("a.scalar").unwrap();
        assert_eq!((s.numel(), s.byte_len()), (1, 8));
        let e = h.get("empty").unwrap();
        assert_eq!((e.numel(), e.byte_len()), (0, 0));
        assert_eq!(h.get("mask").unwrap().dtype, DType::Bool);
        assert_eq!(h.get("q").unwrap().dtype, DType::F8_E4M3);
        assert!(h.get("nope").is_none());

        // The data lies where the header says: compare with the safetensors reader.
        let st = safetensors::SafeTensors::deserialize(&file).unwrap();
        for t in &h.tensors {
            let view = st.tensor(&t.name).unwrap();
            let start = (h.data_start() + t.data_offsets.0) as usize;
            let end = (h.data_start() + t.data_offsets.1) as usize;
            assert_eq!(&file[start..end], view.data(), "{}", t.name);
        }
    }

    #[test]
    fn no_metadata_and_no_tensors() {
        let h = parse_file(&st_file(&[("x", StDtype::F32, &[2])], None)).unwrap();
        assert!(h.metadata.is_empty());
        let h = parse_json("{}", 0).unwrap();
        assert!(h.tensors.is_empty());
        // Trailing spaces (padding) and leftover data after the last tensor are fine.
        let h = parse_json(
            r#"{"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}   "#,
            5,
        )
        .unwrap();
        assert_eq!(h.tensors.len(), 1);
    }

    #[test]
    fn header_len_errors() {
        assert_eq!(
            parse_header_len(&[1, 2, 3], 100),
            Err(HeaderError::TooShort { len: 3 })
        );
        let four_gb = (4u64 << 30).to_le_bytes();
        assert_eq!(
            parse_header_len(&four_gb, 8 << 30),
            Err(HeaderError::HeaderTooLarge { len: 4 << 30 })
        );
        assert!(matches!(
            parse_header_len(&u64::MAX.to_le_bytes(), u64::MAX),
            Err(HeaderError::HeaderTooLarge { .. })
        ));
        assert_eq!(
            parse_header_len(&100u64.to_le_bytes(), 107),
            Err(HeaderError::HeaderPastEof {
                header_len: 100,
                file_size: 107
            })
        );
        assert_eq!(parse_header_len(&100u64.to_le_bytes(), 108), Ok(100));
        assert_eq!(
            parse_header_len(&MAX_HEADER_LEN.to_le_bytes(), u64::MAX),
            Ok(MAX_HEADER_LEN)
        );
        // parse_header re-checks what it is given.
        assert!(matches!(
            parse_header(b"{}", 3, 100),
            Err(HeaderError::HeaderLength {
                expected: 3,
                actual: 2
            })
        ));
        assert!(matches!(
            parse_header(b"{}", 2, 9),
            Err(HeaderError::HeaderPastEof { .. })
        ));
    }

    #[test]
    fn rejects_bad_encoding_and_structure() {
        let bad_utf8 = b"{\"\xff\":1}";
        assert!(matches!(
            parse_header(bad_utf8, bad_utf8.len() as u64, 100),
            Err(HeaderError::NotUtf8 { valid_up_to: 2 })
        ));
        for json in [
            "",
            "[]",
            "null",
            "\"x\"",
            "{",
            "{} {}",
            "{}\0\0",
            r#"{"x": 1}"#,
            r#"{"x": {"dtype": "F32", "shape": [1]}}"#,
            r#"{"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}"#,
            r#"{"x": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 0]}}"#,
            r#"{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}"#,
            r#"{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}"#,
            r#"{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 18446744073709551616]}}"#,
        ] {
            let r = parse_json(json, 16);
            assert!(
                matches!(r, Err(HeaderError::Json { .. })),
                "{json:?}: {r:?}"
            );
        }
    }

    #[test]
    fn rejects_unknown_keys_naming_the_tensor() {
        let json = r#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}}"#;
        let err = parse_json(json, 4).unwrap_err();
        assert!(
            matches!(&err, HeaderError::Json { context: Some(c), message, .. } if c == "tensor 1 of the header" && message.contains("extra")),
            "{err:?}"
        );
        // The message names the tensor by position and quotes nothing of the file.
        let text = err.to_string();
        assert!(text.contains("tensor 1 of the header"), "{text}");
        assert!(
            text.contains("wrong shape") && text.contains("at line 1, column"),
            "{text}"
        );
        assert!(!text.contains("extra") && !text.contains("\"w\""), "{text}");
        // A key repeated inside an entry.
        let json =
            r#"{"w": {"dtype": "F32", "dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}"#;
        assert!(matches!(parse_json(json, 4), Err(HeaderError::Json { .. })));
    }

    #[test]
    fn rejects_duplicate_tensor_names() {
        let json = r#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                       "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}"#;
        assert_eq!(
            parse_json(json, 8),
            Err(HeaderError::DuplicateTensor {
                name: "w".to_string(),
                index: 2
            })
        );
        // Same name spelled with an escape.
        let json = r#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                       "\u0077": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}"#;
        assert!(matches!(
            parse_json(json, 8),
            Err(HeaderError::DuplicateTensor { .. })
        ));
    }

    #[test]
    fn rejects_unknown_dtype() {
        for d in ["F4", "C64", "f32", "FLOAT", ""] {
            let json =
                format!(r#"{{"w": {{"dtype": "{d}", "shape": [1], "data_offsets": [0, 1]}}}}"#);
            assert_eq!(
                parse_json(&json, 8),
                Err(HeaderError::UnknownDtype {
                    name: "w".to_string(),
                    dtype: d.to_string(),
                    index: 1
                })
            );
            let text = parse_json(&json, 8).unwrap_err().to_string();
            assert_eq!(text, "tensor 1 of the header has an unknown dtype");
        }
    }

    #[test]
    fn rejects_bad_sizes_and_offsets() {
        let t = |d: &str, shape: &str, b: u64, e: u64| {
            format!(r#"{{"w": {{"dtype": "{d}", "shape": {shape}, "data_offsets": [{b}, {e}]}}}}"#)
        };
        assert!(matches!(
            parse_json(&t("F32", "[2]", 0, 4), 8),
            Err(HeaderError::SizeMismatch {
                expected: 8,
                actual: 4,
                ..
            })
        ));
        assert!(matches!(
            parse_json(&t("BF16", "[]", 0, 4), 8),
            Err(HeaderError::SizeMismatch {
                expected: 2,
                actual: 4,
                ..
            })
        ));
        assert!(matches!(
            parse_json(&t("F32", "[1]", 8, 4), 8),
            Err(HeaderError::OffsetsReversed {
                begin: 8,
                end: 4,
                ..
            })
        ));
        assert!(matches!(
            parse_json(&t("F32", "[2]", 4, 12), 8),
            Err(HeaderError::OutOfBounds {
                end: 12,
                data_len: 8,
                ..
            })
        ));
        // Shape product overflows u64, or overflows once multiplied by the element size.
        assert!(matches!(
            parse_json(&t("F32", "[4294967296, 4294967296]", 0, 0), 8),
            Err(HeaderError::SizeOverflow { .. })
        ));
        assert!(matches!(
            parse_json(&t("F64", "[4611686018427387904]", 0, 0), 8),
            Err(HeaderError::SizeOverflow { .. })
        ));
        // A zero dimension makes the product 0 however large the others are; a product that
        // would wrap to a small number is an overflow, never accepted.
        assert!(parse_json(&t("U8", "[4294967296, 4294967296, 0]", 0, 0), 8).is_ok());
        assert!(matches!(
            parse_json(&t("U8", "[18446744073709551615, 2]", 0, 2), 8),
            Err(HeaderError::SizeOverflow { .. })
        ));
        // Offsets at u64::MAX do not overflow anything.
        let max = u64::MAX;
        assert!(matches!(
            parse_json(&t("U8", "[0]", max, max), 8),
            Err(HeaderError::OutOfBounds { .. })
        ));
        // Rank bound.
        let shape = format!("[{}]", vec!["1"; MAX_RANK + 1].join(","));
        assert!(matches!(
            parse_json(&t("U8", &shape, 0, 1), 8),
            Err(HeaderError::Json { .. })
        ));
        let shape = format!("[{}]", vec!["1"; MAX_RANK].join(","));
        assert!(parse_json(&t("U8", &shape, 0, 1), 8).is_ok());
    }

    #[test]
    fn rejects_overlaps() {
        let json = r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}"#;
        assert_eq!(
            parse_json(json, 8),
            Err(HeaderError::Overlap {
                first: "a".to_string(),
                second: "b".to_string(),
                first_index: 1,
                second_index: 2
            })
        );
        // Contained in a long tensor that is not the immediately preceding one.
        let json = r#"{"a": {"dtype": "U8", "shape": [10], "data_offsets": [0, 10]},
                       "b": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]},
                       "c": {"dtype": "U8", "shape": [1], "data_offsets": [5, 6]}}"#;
        assert!(matches!(
            parse_json(json, 10),
            Err(HeaderError::Overlap { .. })
        ));
        // Identical ranges.
        let json = r#"{"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]},
                       "b": {"dtype": "I16", "shape": [1], "data_offsets": [2, 4]}}"#;
        assert!(matches!(
            parse_json(json, 4),
            Err(HeaderError::Overlap { .. })
        ));
        // Touching, gaps, and empty tensors anywhere are fine.
        let json = r#"{"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                       "b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]},
                       "c": {"dtype": "U8", "shape": [0], "data_offsets": [1, 1]},
                       "d": {"dtype": "U8", "shape": [1], "data_offsets": [6, 7]}}"#;
        assert!(parse_json(json, 8).is_ok());
    }

    #[test]
    fn metadata_must_be_strings() {
        let ok = r#"{"__metadata__": {"format": "pt", "x": ""}}"#;
        assert_eq!(parse_json(ok, 0).unwrap().metadata.len(), 2);
        for json in [
            r#"{"__metadata__": {"format": 1}}"#,
            r#"{"__metadata__": {"a": {"b": "c"}}}"#,
            r#"{"__metadata__": null}"#,
            r#"{"__metadata__": ["a"]}"#,
            r#"{"__metadata__": {"a": "1", "a": "2"}}"#,
            r#"{"__metadata__": {}, "__metadata__": {}}"#,
        ] {
            let r = parse_json(json, 0);
            assert!(
                matches!(&r, Err(HeaderError::Json { context: Some(c), .. }) if c == METADATA_KEY),
                "{json}: {r:?}"
            );
        }
    }

    #[test]
    fn error_code() {
        assert_eq!(
            HeaderError::TooShort { len: 0 }.code(),
            ErrorCode::CheckpointMalformed
        );
        let e = HeaderError::Json {
            context: None,
            what: "w".into(),
            message: "m".into(),
        };
        assert_eq!(e.to_string(), "invalid header: w");
    }

    #[test]
    fn never_panics_on_mangled_headers() {
        // Cheap stand-in for the fuzzer: flip, truncate and splice a valid header.
        let file = st_file(
            &[("a", StDtype::F32, &[2, 2]), ("b", StDtype::BF16, &[3])],
            Some(HashMap::from([("k".to_string(), "v".to_string())])),
        );
        let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
        let json = &file[8..8 + n];
        let mut s = 12345u64;
        for _ in 0..20_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let mut j = json.to_vec();
            let pos = (s as usize) % j.len();
            match (s >> 32) % 3 {
                0 => j[pos] = (s >> 40) as u8,
                1 => j.truncate(pos),
                _ => j.insert(pos, b"0123456789,[]{}\":-"[(s >> 48) as usize % 18]),
            }
            let _ = parse_header(&j, j.len() as u64, (s >> 16) % 4096);
        }
    }
}

//! Planning output shards so that they can be written in one streaming pass.
//!
//! A safetensors header holds every offset, so it must be known before the first data byte is
//! written. [`plan_shards`] computes, from names, dtypes and shapes alone, which shard each
//! tensor goes to, each shard's complete header bytes and each tensor's absolute file offset;
//! the writer then streams `header` followed by each tensor's bytes in order.

use std::collections::{BTreeMap, HashSet};

use serde::ser::{SerializeMap, Serializer};

use crate::checkpoint::header::{HeaderError, MAX_HEADER_LEN, METADATA_KEY};
use crate::merge::DType;

/// A tensor to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutTensor {
    /// Its name.
    pub name: String,
    /// Its stored dtype.
    pub dtype: DType,
    /// Its shape.
    pub shape: Vec<u64>,
}

/// A tensor's place in a planned shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTensor {
    /// Its name.
    pub name: String,
    /// Its dtype.
    pub dtype: DType,
    /// Its shape.
    pub shape: Vec<u64>,
    /// Absolute offset of its data in the shard file.
    pub offset: u64,
    /// Length of its data in bytes.
    pub len: u64,
}

/// One output file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    /// `model.safetensors`, or `model-0000i-of-0000N.safetensors`.
    pub file_name: String,
    /// The file's first bytes: the 8-byte little-endian length, then the JSON header padded with
    /// spaces to a multiple of 8 bytes (as the safetensors crate pads).
    pub header: Vec<u8>,
    /// The tensors in file order; their data follows the header back to back.
    pub tensors: Vec<PlannedTensor>,
    /// Size of the whole file.
    pub size: u64,
}

impl ShardPlan {
    /// Bytes of tensor data in the file (`size − header.len()`).
    pub fn data_len(&self) -> u64 {
        self.size - self.header.len() as u64
    }
}

/// Plans the output files for `tensors`, kept in the given order.
///
/// Tensors are packed greedily: a shard is closed when adding the next tensor would take its
/// data over `max_shard_size`; a tensor larger than the limit on its own gets a shard to itself
/// (as in Hugging Face; unlike `huggingface_hub`, which emits that shard ahead of the one being
/// filled, the given order is kept). `None` means one shard. One shard is named
/// `model.safetensors`, several `model-00001-of-0000N.safetensors`.
///
/// Each header lists its tensors in order, with `__metadata__` first (the given metadata plus
/// `"format": "pt"` if absent). The output bytes are deterministic.
///
/// Fails on an empty, reserved (`__metadata__`) or duplicate name, on a size that overflows, and
/// on a header larger than [`MAX_HEADER_LEN`].
pub fn plan_shards(
    tensors: &[OutTensor],
    max_shard_size: Option<u64>,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<ShardPlan>, HeaderError> {
    let mut seen = HashSet::with_capacity(tensors.len());
    let mut sizes = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        let index = i + 1;
        if t.name.is_empty() || t.name == METADATA_KEY {
            return Err(HeaderError::ReservedName {
                name: t.name.clone(),
                index,
            });
        }
        if !seen.insert(t.name.as_str()) {
            return Err(HeaderError::DuplicateTensor {
                name: t.name.clone(),
                index,
            });
        }
        sizes.push(byte_size(t, index)?);
    }

    // Group consecutive tensors into shards.
    let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
    let mut start = 0;
    let mut current: u64 = 0;
    for (i, &size) in sizes.iter().enumerate() {
        if let Some(max) = max_shard_size {
            let over = current.checked_add(size).is_none_or(|s| s > max);
            if i > start && (size > max || over) {
                groups.push(start..i);
                start = i;
                current = 0;
            }
            if size > max {
                // Alone in its shard.
                groups.push(i..i + 1);
                start = i + 1;
                current = 0;
                continue;
            }
        }
        current = current
            .checked_add(size)
            .ok_or_else(|| overflow(&tensors[i], i + 1))?;
    }
    if start < tensors.len() || groups.is_empty() {
        groups.push(start..tensors.len());
    }

    let mut meta = metadata.clone();
    meta.entry("format".to_string())
        .or_insert_with(|| "pt".to_string());

    let count = groups.len();
    let mut plans = Vec::with_capacity(count);
    for (k, range) in groups.into_iter().enumerate() {
        let file_name = if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", k + 1)
        };
        let group = &tensors[range.clone()];
        let group_sizes = &sizes[range];
        plans.push(plan_one(file_name, group, group_sizes, &meta)?);
    }
    Ok(plans)
}

/// `index`: the tensor's position (1-based) in the list being planned.
fn overflow(t: &OutTensor, index: usize) -> HeaderError {
    HeaderError::SizeOverflow {
        name: t.name.clone(),
        shape: t.shape.clone(),
        index,
    }
}

fn byte_size(t: &OutTensor, index: usize) -> Result<u64, HeaderError> {
    let numel = if t.shape.contains(&0) {
        Some(0)
    } else {
        t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))
    };
    numel
        .and_then(|n| n.checked_mul(t.dtype.size_bytes() as u64))
        .ok_or_else(|| overflow(t, index))
}

/// Serializes one header as the safetensors crate does: `__metadata__` first, then each tensor
/// as `{"dtype":..,"shape":[..],"data_offsets":[b,e]}`, compact.
struct HeaderJson<'a> {
    metadata: &'a BTreeMap<String, String>,
    tensors: &'a [OutTensor],
    offsets: &'a [(u64, u64)],
}

#[derive(serde::Serialize)]
struct EntryJson<'a> {
    dtype: DType,
    shape: &'a [u64],
    data_offsets: (u64, u64),
}

impl serde::Serialize for HeaderJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.tensors.len() + 1))?;
        map.serialize_entry(METADATA_KEY, self.metadata)?;
        for (t, &data_offsets) in self.tensors.iter().zip(self.offsets) {
            map.serialize_entry(
                &t.name,
                &EntryJson {
                    dtype: t.dtype,
                    shape: &t.shape,
                    data_offsets,
                },
            )?;
        }
        map.end()
    }
}

fn plan_one(
    file_name: String,
    tensors: &[OutTensor],
    sizes: &[u64],
    metadata: &BTreeMap<String, String>,
) -> Result<ShardPlan, HeaderError> {
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut end: u64 = 0;
    for (i, (t, &size)) in tensors.iter().zip(sizes).enumerate() {
        let next = end.checked_add(size).ok_or_else(|| overflow(t, i + 1))?;
        offsets.push((end, next));
        end = next;
    }
    let json = serde_json::to_vec(&HeaderJson {
        metadata,
        tensors,
        offsets: &offsets,
    })
    .map_err(|e| HeaderError::json(None, &e))?;
    let padded = json.len().next_multiple_of(8);
    if padded as u64 > MAX_HEADER_LEN {
        return Err(HeaderError::HeaderTooLarge { len: padded as u64 });
    }
    let mut header = Vec::with_capacity(8 + padded);
    header.extend_from_slice(&(padded as u64).to_le_bytes());
    header.extend_from_slice(&json);
    header.resize(8 + padded, b' ');

    let data_start = header.len() as u64;
    let size = data_start
        .checked_add(end)
        .ok_or_else(|| HeaderError::SizeOverflow {
            name: file_name.clone(),
            shape: Vec::new(),
            index: tensors.len(),
        })?;
    let planned = tensors
        .iter()
        .zip(&offsets)
        .map(|(t, &(b, e))| PlannedTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            offset: data_start + b,
            len: e - b,
        })
        .collect();
    Ok(ShardPlan {
        file_name,
        header,
        tensors: planned,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::header::{parse_header, parse_header_len};
    use std::collections::HashMap;

    fn t(name: &str, dtype: DType, shape: &[u64]) -> OutTensor {
        OutTensor {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    /// The whole file: header then zero data.
    fn materialize(plan: &ShardPlan) -> Vec<u8> {
        let mut f = plan.header.clone();
        f.resize(plan.size as usize, 0);
        f
    }

    #[test]
    fn single_shard_parses_with_ours_and_safetensors() {
        let tensors = vec![
            t("z.weight", DType::BF16, &[3, 5]),
            t("a.bias", DType::F32, &[5]),
            t("scalar", DType::F64, &[]),
            t("empty", DType::F16, &[0, 4]),
            t("steps", DType::I64, &[1]),
            t("weird \"name\"\n", DType::U8, &[3]),
        ];
        let meta = BTreeMap::from([("merged_by".to_string(), "ladle".to_string())]);
        let plans = plan_shards(&tensors, None, &meta).unwrap();
        assert_eq!(plans.len(), 1);
        let p = &plans[0];
        assert_eq!(p.file_name, "model.safetensors");
        assert_eq!(p.header.len() % 8, 0);
        assert_eq!(p.data_len(), 30 + 20 + 8 + 8 + 3);
        let names: Vec<&str> = p.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "z.weight",
                "a.bias",
                "scalar",
                "empty",
                "steps",
                "weird \"name\"\n"
            ]
        );
        // Back to back in the given order.
        let mut at = p.header.len() as u64;
        for pt in &p.tensors {
            assert_eq!(pt.offset, at);
            at += pt.len;
        }
        assert_eq!(at, p.size);

        let file = materialize(p);
        let n = parse_header_len(&file, file.len() as u64).unwrap();
        let h = parse_header(&file[8..8 + n as usize], n, file.len() as u64).unwrap();
        assert_eq!(h.data_start(), p.header.len() as u64);
        assert_eq!(h.metadata["format"], "pt");
        assert_eq!(h.metadata["merged_by"], "ladle");
        for pt in &p.tensors {
            let info = h.get(&pt.name).unwrap();
            assert_eq!(info.dtype, pt.dtype);
            assert_eq!(info.shape, pt.shape);
            assert_eq!(h.data_start() + info.data_offsets.0, pt.offset);
            assert_eq!(info.byte_len(), pt.len);
        }

        let st = safetensors::SafeTensors::deserialize(&file).unwrap();
        assert_eq!(st.len(), tensors.len());
        let w = st.tensor("z.weight").unwrap();
        assert_eq!(w.shape(), &[3, 5]);
        assert_eq!(w.dtype(), safetensors::Dtype::BF16);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&file).unwrap();
        assert_eq!(
            meta.metadata()
                .as_ref()
                .unwrap()
                .get("format")
                .map(String::as_str),
            Some("pt")
        );
    }

    #[test]
    fn header_bytes_match_the_safetensors_crate() {
        // The safetensors crate orders by dtype alignment then name; give ours that order and
        // the bytes must be identical.
        let tensors = vec![
            t("a", DType::F32, &[2, 2]),
            t("b", DType::F32, &[3]),
            t("c", DType::BF16, &[5]),
        ];
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let plan = &plan_shards(&tensors, None, &meta).unwrap()[0];
        let mut datas: Vec<Vec<u8>> = Vec::new();
        for x in &tensors {
            datas.push(vec![0u8; byte_size(x, 0).unwrap() as usize]);
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .zip(&datas)
            .map(|(x, d)| {
                let dt = match x.dtype {
                    DType::F32 => safetensors::Dtype::F32,
                    _ => safetensors::Dtype::BF16,
                };
                let shape = x.shape.iter().map(|&s| s as usize).collect();
                (
                    x.name.clone(),
                    safetensors::tensor::TensorView::new(dt, shape, d).unwrap(),
                )
            })
            .collect();
        let theirs = safetensors::serialize(
            views,
            Some(HashMap::from([("format".to_string(), "pt".to_string())])),
        )
        .unwrap();
        assert_eq!(materialize(plan), theirs);
    }

    #[test]
    fn deterministic_and_keeps_format_if_given() {
        let tensors = vec![t("x", DType::F16, &[7])];
        let meta = BTreeMap::from([("format".to_string(), "np".to_string())]);
        let a = plan_shards(&tensors, Some(100), &meta).unwrap();
        let b = plan_shards(&tensors, Some(100), &meta).unwrap();
        assert_eq!(a, b);
        let file = materialize(&a[0]);
        let n = parse_header_len(&file, file.len() as u64).unwrap();
        let h = parse_header(&file[8..8 + n as usize], n, file.len() as u64).unwrap();
        assert_eq!(h.metadata["format"], "np");
    }

    fn layout(plans: &[ShardPlan]) -> Vec<Vec<&str>> {
        plans
            .iter()
            .map(|p| p.tensors.iter().map(|t| t.name.as_str()).collect())
            .collect()
    }

    #[test]
    fn shard_boundaries() {
        // Sizes in bytes (U8): a=40 b=40 c=30 d=150 e=10 f=100 g=1.
        let tensors: Vec<OutTensor> = [
            ("a", 40),
            ("b", 40),
            ("c", 30),
            ("d", 150),
            ("e", 10),
            ("f", 100),
            ("g", 1),
        ]
        .iter()
        .map(|(n, s)| t(n, DType::U8, &[*s]))
        .collect();
        let none = BTreeMap::new();
        let plans = plan_shards(&tensors, Some(100), &none).unwrap();
        // a+b = 80, +c = 110 > 100 → close; c; d > 100 alone; e + f = 110 → close; f = 100 fits
        // exactly; g does not.
        assert_eq!(
            layout(&plans),
            vec![
                vec!["a", "b"],
                vec!["c"],
                vec!["d"],
                vec!["e"],
                vec!["f"],
                vec!["g"]
            ]
        );
        let names: Vec<&str> = plans.iter().map(|p| p.file_name.as_str()).collect();
        assert_eq!(
            names,
            [
                "model-00001-of-00006.safetensors",
                "model-00002-of-00006.safetensors",
                "model-00003-of-00006.safetensors",
                "model-00004-of-00006.safetensors",
                "model-00005-of-00006.safetensors",
                "model-00006-of-00006.safetensors",
            ]
        );
        for p in &plans {
            assert!(p.data_len() <= 100 || p.tensors.len() == 1);
            // Every shard is a valid file on its own, offsets relative to it.
            let file = materialize(p);
            assert!(safetensors::SafeTensors::deserialize(&file).is_ok());
            assert_eq!(p.tensors[0].offset, p.header.len() as u64);
        }

        // Exactly at the limit stays together; one byte more splits.
        let two = vec![t("a", DType::F32, &[5]), t("b", DType::F32, &[5])];
        assert_eq!(
            layout(&plan_shards(&two, Some(40), &none).unwrap()).len(),
            1
        );
        assert_eq!(
            layout(&plan_shards(&two, Some(39), &none).unwrap()).len(),
            2
        );
        // No limit: one shard; large limit: one shard.
        assert_eq!(plan_shards(&tensors, None, &none).unwrap().len(), 1);
        assert_eq!(
            plan_shards(&tensors, Some(1 << 40), &none).unwrap().len(),
            1
        );
        // Oversized tensor first and last.
        let big_first = vec![t("big", DType::U8, &[500]), t("s", DType::U8, &[1])];
        assert_eq!(
            layout(&plan_shards(&big_first, Some(10), &none).unwrap()),
            vec![vec!["big"], vec!["s"]]
        );
        let big_last = vec![t("s", DType::U8, &[1]), t("big", DType::U8, &[500])];
        assert_eq!(
            layout(&plan_shards(&big_last, Some(10), &none).unwrap()),
            vec![vec!["s"], vec!["big"]]
        );
        // Empty tensors never force a split; zero limit gives each non-empty tensor its own.
        let zeros = vec![
            t("e1", DType::F32, &[0]),
            t("x", DType::U8, &[1]),
            t("e2", DType::F32, &[0]),
        ];
        assert_eq!(
            layout(&plan_shards(&zeros, Some(0), &none).unwrap()),
            vec![vec!["e1"], vec!["x"], vec!["e2"]]
        );
    }

    #[test]
    fn no_tensors_gives_one_empty_file() {
        let plans = plan_shards(&[], Some(10), &BTreeMap::new()).unwrap();
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].file_name, "model.safetensors");
        let file = materialize(&plans[0]);
        assert!(safetensors::SafeTensors::deserialize(&file).is_ok());
    }

    #[test]
    fn rejects_bad_input() {
        let none = BTreeMap::new();
        let dup = vec![t("a", DType::U8, &[1]), t("a", DType::U8, &[2])];
        assert_eq!(
            plan_shards(&dup, None, &none),
            Err(HeaderError::DuplicateTensor {
                name: "a".into(),
                index: 2
            })
        );
        for name in ["", "__metadata__"] {
            assert!(matches!(
                plan_shards(&[t(name, DType::U8, &[1])], None, &none),
                Err(HeaderError::ReservedName { .. })
            ));
        }
        let huge = vec![t("h", DType::F32, &[u64::MAX / 2])];
        assert!(matches!(
            plan_shards(&huge, None, &none),
            Err(HeaderError::SizeOverflow { .. })
        ));
        let two_huge = vec![
            t("h1", DType::U8, &[u64::MAX / 2 + 1]),
            t("h2", DType::U8, &[u64::MAX / 2 + 1]),
        ];
        assert!(matches!(
            plan_shards(&two_huge, None, &none),
            Err(HeaderError::SizeOverflow { .. })
        ));
    }
}

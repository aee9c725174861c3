//! Hugging Face shard indexes (`model.safetensors.index.json`):
//! `{"metadata": {"total_size": N, ...}, "weight_map": {"tensor name": "shard file name"}}`.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::checkpoint::header::{HeaderError, StrictStringMap};

/// The largest index accepted (32 MiB; a 400B-parameter model's index is well under 1 MiB).
pub const MAX_INDEX_LEN: u64 = 32 * 1024 * 1024;

/// File name of the index in a checkpoint folder.
pub const INDEX_FILE_NAME: &str = "model.safetensors.index.json";

/// A parsed shard index.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardIndex {
    /// The `metadata` object as written (`Value::Null` when absent).
    pub metadata: serde_json::Value,
    /// Tensor name → shard file name (a plain file name in the same folder).
    pub weight_map: BTreeMap<String, String>,
}

#[derive(serde::Deserialize)]
struct RawIndex {
    #[serde(default)]
    metadata: serde_json::Value,
    weight_map: StrictStringMap,
}

/// Parses an index: at most [`MAX_INDEX_LEN`] bytes of JSON; `weight_map` a string → string
/// object without duplicate keys; every shard a plain `*.safetensors` file name (no `/`, `\`,
/// `..`, or control characters). Other top-level keys are ignored.
pub fn parse_index(bytes: &[u8]) -> Result<ShardIndex, HeaderError> {
    if bytes.len() as u64 > MAX_INDEX_LEN {
        return Err(HeaderError::IndexTooLarge {
            len: bytes.len() as u64,
            max: MAX_INDEX_LEN,
        });
    }
    let raw: RawIndex = serde_json::from_slice(bytes)
        .map_err(|e| HeaderError::json(Some("index".to_string()), &e))?;
    let weight_map = raw.weight_map.0;
    for (tensor, file) in &weight_map {
        if !is_plain_shard_name(file) {
            return Err(HeaderError::InvalidShardName {
                tensor: tensor.clone(),
                file: file.clone(),
            });
        }
    }
    Ok(ShardIndex {
        metadata: raw.metadata,
        weight_map,
    })
}

/// Whether `name` is a plain file name ending in `.safetensors` that cannot leave its folder.
pub fn is_plain_shard_name(name: &str) -> bool {
    name.len() > ".safetensors".len()
        && name.ends_with(".safetensors")
        && !name.contains(['/', '\\'])
        && !name.contains("..")
        && !name.chars().any(char::is_control)
}

/// The index for a sharded output: pretty JSON (two-space indent, like `transformers`),
/// `{"metadata": {"total_size": N}, "weight_map": {...}}`, with a final newline.
/// `total_size` is, as in Hugging Face indexes, the sum of the tensors' data bytes.
pub fn index_json(total_size: u64, weight_map: &BTreeMap<String, String>) -> Vec<u8> {
    #[derive(Serialize)]
    struct Meta {
        total_size: u64,
    }
    #[derive(Serialize)]
    struct Index<'a> {
        metadata: Meta,
        weight_map: &'a BTreeMap<String, String>,
    }
    let index = Index {
        metadata: Meta { total_size },
        weight_map,
    };
    // Serializing integers and string maps into a Vec cannot fail.
    let mut out = serde_json::to_vec_pretty(&index).unwrap_or_default();
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hf_index() {
        let json = br#"{
  "metadata": {"total_size": 1234, "format": "pt"},
  "weight_map": {
    "lm_head.weight": "model-00002-of-00002.safetensors",
    "model.embed_tokens.weight": "model-00001-of-00002.safetensors"
  }
}"#;
        let idx = parse_index(json).unwrap();
        assert_eq!(idx.metadata["total_size"], 1234);
        assert_eq!(idx.weight_map.len(), 2);
        assert_eq!(
            idx.weight_map["lm_head.weight"],
            "model-00002-of-00002.safetensors"
        );
        // Metadata may be absent; extra keys are ignored.
        let idx = parse_index(br#"{"weight_map": {"a": "x.safetensors"}, "other": 1}"#).unwrap();
        assert!(idx.metadata.is_null());
    }

    #[test]
    fn rejects_bad_indexes() {
        for json in [
            &b""[..],
            b"[]",
            b"{}",
            b"{\"metadata\": {}}",
            b"{\"weight_map\": []}",
            b"{\"weight_map\": {\"a\": 1}}",
            b"{\"weight_map\": {\"a\": \"x.safetensors\", \"a\": \"y.safetensors\"}}",
            b"{\"weight_map\": {}, \"weight_map\": {}}",
            b"{\"weight_map\": {\"\xff\": \"x.safetensors\"}}",
        ] {
            let r = parse_index(json);
            assert!(
                matches!(&r, Err(HeaderError::Json { context: Some(c), .. }) if c == "index"),
                "{:?}: {r:?}",
                String::from_utf8_lossy(json)
            );
        }
        for file in [
            "../model.safetensors",
            "sub/model.safetensors",
            "sub\\model.safetensors",
            "/abs.safetensors",
            "model.bin",
            ".safetensors",
            "a..safetensors",
            "model.safetensors\n",
            "",
        ] {
            let json = serde_json::json!({"weight_map": {"t": file}}).to_string();
            assert_eq!(
                parse_index(json.as_bytes()),
                Err(HeaderError::InvalidShardName {
                    tensor: "t".into(),
                    file: file.into()
                }),
                "{file}"
            );
        }
        let big = vec![b' '; MAX_INDEX_LEN as usize + 1];
        assert!(matches!(
            parse_index(&big),
            Err(HeaderError::IndexTooLarge { .. })
        ));
    }

    #[test]
    fn writes_and_reads_back() {
        let map = BTreeMap::from([
            (
                "b".to_string(),
                "model-00002-of-00002.safetensors".to_string(),
            ),
            (
                "a".to_string(),
                "model-00001-of-00002.safetensors".to_string(),
            ),
        ]);
        let bytes = index_json(42, &map);
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with(
            "{\n  \"metadata\": {\n    \"total_size\": 42\n  },\n  \"weight_map\": {\n    \"a\""
        ));
        assert!(text.ends_with("}\n"));
        let idx = parse_index(&bytes).unwrap();
        assert_eq!(idx.weight_map, map);
        assert_eq!(idx.metadata, serde_json::json!({"total_size": 42}));
    }
}

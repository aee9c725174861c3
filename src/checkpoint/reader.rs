//! Opening a checkpoint in object storage by reading its headers only.
//!
//! A checkpoint URL names either one `*.safetensors` file, or a folder holding
//! `model.safetensors.index.json` (a sharded checkpoint) or `model.safetensors`. For each file
//! ladle asks for its size (`HEAD`), then its first 8 bytes, then exactly its header bytes:
//! never the data.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::checkpoint::header::{Header, HeaderError, parse_header, parse_header_len};
use crate::checkpoint::index::{INDEX_FILE_NAME, MAX_INDEX_LEN, parse_index};
use crate::checkpoint::local::LocalFile;
use crate::error::ErrorCode;
use crate::merge::DType;

/// File name of an unsharded checkpoint in a folder.
pub const SINGLE_FILE_NAME: &str = "model.safetensors";

/// How many shard headers are fetched at once.
const HEADER_CONCURRENCY: usize = 8;

/// Why a checkpoint could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Nothing at the URL: no file, no index, no `model.safetensors`.
    #[error(
        "no checkpoint at {url}: expected a .safetensors file, or a folder with {INDEX_FILE_NAME} or {SINGLE_FILE_NAME}"
    )]
    NotFound {
        /// The checkpoint URL.
        url: String,
    },
    /// A file exists but its bytes are wrong (header, index, missing shard, disagreement).
    /// The reason never quotes the file (see [`HeaderError`]); the detail goes to the log.
    #[error("malformed checkpoint file {file}: {reason}")]
    Malformed {
        /// The file at fault, as the job names it (its checkpoint's URL, plus the file name
        /// when the URL names a folder).
        file: String,
        /// What is wrong (usually a [`HeaderError`] message).
        reason: String,
    },
    /// An input file changed while the job read it (size, mtime, inode or ETag differ from
    /// what was recorded when the job was planned).
    #[error("input {file} changed while it was being merged ({what}); nothing was published")]
    Changed {
        /// The file, as the job names it.
        file: String,
        /// What differs.
        what: String,
    },
    /// A PEFT adapter where a model is expected: a folder holding `adapter_config.json` and no
    /// checkpoint, or a `.safetensors` file of LoRA factors (averaging A and B matrices
    /// element by element is wrong math, so it is refused rather than merged).
    #[error(
        "{url} is a LoRA adapter, not a model: fold it into its base model with \"lora\" \
         (YAML `model+adapter`), or combine adapters with \"method\": \"lora\""
    )]
    Adapter {
        /// The reference, as the job names it.
        url: String,
    },
    /// Object storage failed.
    #[error("storage error: {0}")]
    Storage(#[from] object_store::Error),
}

impl CheckpointError {
    /// `checkpoint_not_found`, `checkpoint_malformed`, `input_changed`, `invalid_adapter`,
    /// `path_outside_roots` or `storage_error`.
    pub fn code(&self) -> ErrorCode {
        match self {
            CheckpointError::NotFound { .. } => ErrorCode::CheckpointNotFound,
            CheckpointError::Malformed { .. } => ErrorCode::CheckpointMalformed,
            CheckpointError::Changed { .. } => ErrorCode::InputChanged,
            CheckpointError::Adapter { .. } => ErrorCode::InvalidAdapter,
            CheckpointError::Storage(e) if crate::storage::local::outside_roots(e).is_some() => {
                ErrorCode::PathOutsideRoots
            }
            CheckpointError::Storage(_) => ErrorCode::StorageError,
        }
    }

    /// File `file` (named as the job names it: [`crate::checkpoint::identity::file_name`]) is
    /// malformed: `reason` (ladle's words) goes into the message, `detail` (which may quote
    /// the file: tensor names, keys) to the log only.
    fn malformed(
        file: String,
        reason: impl std::fmt::Display,
        detail: &dyn std::fmt::Debug,
    ) -> Self {
        tracing::warn!(%file, %reason, ?detail, "malformed checkpoint file");
        CheckpointError::Malformed {
            file,
            reason: reason.to_string(),
        }
    }
}

/// One safetensors file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointFile {
    /// Its path in the store (resolved: links followed).
    pub path: Path,
    /// The file as the job names it, for messages and manifests: the input's URL as written,
    /// plus the file's path under it ([`crate::checkpoint::identity::file_name`]).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its validated header.
    pub header: Header,
    /// The file, open for the job, when it is local (see [`LocalFile`]); tensor bytes are then
    /// read through it instead of the store.
    pub local: Option<Arc<LocalFile>>,
    /// The store's ETag when the header was read (S3 reads then carry `If-Match` on it).
    pub etag: Option<String>,
    /// The store's modification time when the header was read.
    pub modified: Option<chrono::DateTime<chrono::Utc>>,
}

/// Where a tensor's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLoc {
    /// Index into [`Checkpoint::files`].
    pub file: usize,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// Absolute offset of the first byte in the file.
    pub start: u64,
    /// Absolute offset one past the last byte.
    pub end: u64,
}

impl TensorLoc {
    /// Bytes of data.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the tensor has no data.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// An opened checkpoint: its files (headers read and validated) and a map of every tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The URL it was opened from (for messages).
    pub url: String,
    /// Its files: one, or the shards named by the index sorted by file name.
    pub files: Vec<CheckpointFile>,
    /// Every tensor by name.
    pub tensors: BTreeMap<String, TensorLoc>,
    /// The folder when the URL named a folder, `None` when it named a file.
    pub folder: Option<Path>,
    /// A LoRA adapter folded into this checkpoint (a model entry's `lora`): its tensors read
    /// as the fold (`engine::fold`).
    pub lora: Option<Arc<super::adapter::Attached>>,
    /// Its embedding rows permuted onto a tokenizer built for the soup (`engine::permute`).
    pub permuted: Option<Arc<super::permuted::Permuted>>,
}

impl Checkpoint {
    /// Bytes of tensor data a full read of the checkpoint fetches (headers excluded).
    pub fn input_bytes(&self) -> u64 {
        self.tensors.values().map(TensorLoc::len).sum()
    }

    /// The dtype reads of tensor `t` return: the fold's dtype for the float tensors of a
    /// checkpoint with an adapter attached, else the stored one.
    pub fn read_dtype(&self, t: &TensorLoc) -> DType {
        match &self.lora {
            Some(a) if t.dtype.is_mergeable_float() => a.dtype.unwrap_or(t.dtype),
            _ => t.dtype,
        }
    }
}

/// Opens the checkpoint at `path` in `store`; `url` is only used in messages.
///
/// A path whose last segment ends in `.safetensors` is one file. Otherwise it is a folder: with
/// `model.safetensors.index.json`, every shard the index names is opened (a missing shard is
/// malformed, and index and shard headers must agree exactly, both ways); else
/// `model.safetensors`; else [`CheckpointError::NotFound`].
pub async fn open_checkpoint(
    store: &dyn ObjectStore,
    path: &Path,
    url: &str,
) -> Result<Checkpoint, CheckpointError> {
    let not_found = || CheckpointError::NotFound {
        url: url.to_string(),
    };
    let name = |p: &Path| crate::checkpoint::identity::file_name(url, path, p);
    let is_file = path.filename().is_some_and(|f| f.ends_with(".safetensors"));
    if is_file {
        let file = open_file(store, path, name(path))
            .await?
            .ok_or_else(not_found)?;
        return assemble(url, vec![file], None, None);
    }

    let index_path = path.clone().join(INDEX_FILE_NAME);
    match store.get(&index_path).await {
        Ok(got) => {
            if got.meta.size > MAX_INDEX_LEN {
                let e = HeaderError::IndexTooLarge {
                    len: got.meta.size,
                    max: MAX_INDEX_LEN,
                };
                return Err(CheckpointError::malformed(name(&index_path), &e, &e));
            }
            let bytes = got.bytes().await?;
            let index = parse_index(&bytes)
                .map_err(|e| CheckpointError::malformed(name(&index_path), &e, &e))?;
            let shard_names: BTreeSet<&str> =
                index.weight_map.values().map(String::as_str).collect();
            let count = shard_names.len();
            let paths: Vec<Path> = shard_names.iter().map(|n| path.clone().join(*n)).collect();
            let index_path = &index_path;
            let name = &name;
            let files: Vec<CheckpointFile> = futures::stream::iter(paths.into_iter().enumerate())
                .map(|(i, p)| async move {
                    // The shard's name is the index's bytes: the message names the index.
                    open_file(store, &p, name(&p)).await?.ok_or_else(|| {
                        CheckpointError::malformed(
                            name(index_path),
                            format!(
                                "names a shard that does not exist (shard {} of {count}, in name \
                                 order)",
                                i + 1
                            ),
                            &p,
                        )
                    })
                })
                .buffered(HEADER_CONCURRENCY)
                .try_collect()
                .await?;
            let weight_map: BTreeMap<&str, Path> = index
                .weight_map
                .iter()
                .map(|(t, f)| (t.as_str(), path.clone().join(f.as_str())))
                .collect();
            assemble(
                url,
                files,
                Some(path.clone()),
                Some((&name(index_path), weight_map)),
            )
        }
        Err(object_store::Error::NotFound { .. }) => {
            let single = path.clone().join(SINGLE_FILE_NAME);
            let file = open_file(store, &single, name(&single))
                .await?
                .ok_or_else(not_found)?;
            assemble(url, vec![file], Some(path.clone()), None)
        }
        Err(e) => Err(e.into()),
    }
}

/// [`open_checkpoint`] of a model (an ingredient or a base model): a PEFT adapter given there
/// is refused by name ([`CheckpointError::Adapter`]) instead of being not found (a folder with
/// `adapter_config.json`) or merged as weights (a file of `lora_A` / `lora_B` factors).
pub async fn open_model(
    store: &dyn ObjectStore,
    path: &Path,
    url: &str,
) -> Result<Checkpoint, CheckpointError> {
    let adapter = || CheckpointError::Adapter {
        url: url.to_string(),
    };
    match open_checkpoint(store, path, url).await {
        Err(CheckpointError::NotFound { .. })
            if store
                .head(
                    &path
                        .clone()
                        .join(crate::checkpoint::adapter::ADAPTER_CONFIG_NAME),
                )
                .await
                .is_ok() =>
        {
            Err(adapter())
        }
        Ok(c) if c.tensors.keys().any(|n| is_lora_factor(n)) => Err(adapter()),
        other => other,
    }
}

/// Whether a tensor name is one of peft's LoRA factors.
fn is_lora_factor(name: &str) -> bool {
    name.contains(".lora_A.")
        || name.contains(".lora_B.")
        || name.ends_with(".lora_embedding_A")
        || name.ends_with(".lora_embedding_B")
}

/// Builds the tensor map, checking that no tensor is in two files and, for a sharded
/// checkpoint, that the index and the shard headers agree exactly.
fn assemble(
    url: &str,
    files: Vec<CheckpointFile>,
    folder: Option<Path>,
    index: Option<(&str, BTreeMap<&str, Path>)>,
) -> Result<Checkpoint, CheckpointError> {
    let mut tensors: BTreeMap<String, TensorLoc> = BTreeMap::new();
    for (i, f) in files.iter().enumerate() {
        let data_start = f.header.data_start();
        for t in &f.header.tensors {
            if let Some((_, map)) = &index {
                match map.get(t.name.as_str()) {
                    Some(p) if *p == f.path => {}
                    Some(p) => {
                        return Err(CheckpointError::malformed(
                            f.name.clone(),
                            format!(
                                "holds a tensor that {INDEX_FILE_NAME} places in another shard"
                            ),
                            &(&t.name, p),
                        ));
                    }
                    None => {
                        return Err(CheckpointError::malformed(
                            f.name.clone(),
                            format!("holds a tensor that {INDEX_FILE_NAME} does not list"),
                            &t.name,
                        ));
                    }
                }
            }
            if let Some(prev) = tensors.get(&t.name) {
                let other = files
                    .get(prev.file)
                    .map(|g| g.path.to_string())
                    .unwrap_or_default();
                return Err(CheckpointError::malformed(
                    f.name.clone(),
                    "holds a tensor that another shard also holds",
                    &(&t.name, other),
                ));
            }
            tensors.insert(
                t.name.clone(),
                TensorLoc {
                    file: i,
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    start: data_start + t.data_offsets.0,
                    end: data_start + t.data_offsets.1,
                },
            );
        }
    }
    if let Some((index_path, map)) = &index {
        for (name, shard) in map {
            if !tensors.contains_key(*name) {
                return Err(CheckpointError::malformed(
                    index_path.to_string(),
                    "lists a tensor in a shard whose header does not hold it",
                    &(name, shard),
                ));
            }
        }
    }
    Ok(Checkpoint {
        url: url.to_string(),
        files,
        tensors,
        folder,
        lora: None,
        permuted: None,
    })
}

/// `HEAD`, then bytes `0..8`, then bytes `8..8+N`, then validation. `Ok(None)` when the file
/// does not exist. `name`: the file as the job names it.
async fn open_file(
    store: &dyn ObjectStore,
    path: &Path,
    name: String,
) -> Result<Option<CheckpointFile>, CheckpointError> {
    let malformed = |e: &HeaderError| CheckpointError::malformed(name.clone(), e, e);
    let meta = match store.head(path).await {
        Ok(meta) => meta,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let size = meta.size;
    if size < 8 {
        return Err(malformed(&HeaderError::TooShort { len: size }));
    }
    let first8 = store.get_range(path, 0..8).await.map_err(vanished)?;
    if first8.len() != 8 {
        let reason = "the store returned a short read of the header length";
        return Err(CheckpointError::malformed(name, reason, &first8.len()));
    }
    let n = parse_header_len(&first8, size).map_err(|e| malformed(&e))?;
    let json = if n == 0 {
        bytes::Bytes::new()
    } else {
        store.get_range(path, 8..8 + n).await.map_err(vanished)?
    };
    if json.len() as u64 != n {
        let reason = "the store returned a short read of the header";
        return Err(CheckpointError::malformed(name, reason, &json.len()));
    }
    let header = parse_header(&json, n, size).map_err(|e| malformed(&e))?;
    Ok(Some(CheckpointFile {
        path: path.clone(),
        name,
        size,
        header,
        local: None,
        etag: meta.e_tag,
        modified: Some(meta.last_modified),
    }))
}

/// Any error after `HEAD`, including a file that vanished since, is a storage error (retryable),
/// not "not found".
fn vanished(e: object_store::Error) -> CheckpointError {
    CheckpointError::Storage(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::index::index_json;
    use crate::checkpoint::writer::{OutTensor, plan_shards};
    use futures::stream::BoxStream;
    use object_store::local::LocalFileSystem;
    use object_store::memory::InMemory;
    use object_store::{
        CopyOptions, GetOptions, GetRange, GetResult, ListResult, MultipartUpload, ObjectMeta,
        PutMultipartOptions, PutOptions, PutPayload, PutResult,
    };
    use std::sync::{Arc, Mutex};

    fn t(name: &str, dtype: DType, shape: &[u64]) -> OutTensor {
        OutTensor {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    /// Writes a checkpoint planned with `max_shard_size` under `folder`; returns file names.
    /// Data bytes are a counter so that ranges can be checked.
    async fn write_ckpt(
        store: &dyn ObjectStore,
        folder: &Path,
        tensors: &[OutTensor],
        max_shard_size: Option<u64>,
    ) -> Vec<String> {
        let plans = plan_shards(tensors, max_shard_size, &BTreeMap::new()).unwrap();
        let mut map = BTreeMap::new();
        for p in &plans {
            let mut f = p.header.clone();
            let mut k = 0u8;
            f.resize_with(p.size as usize, || {
                k = k.wrapping_add(1);
                k
            });
            store
                .put(&folder.clone().join(p.file_name.as_str()), f.into())
                .await
                .unwrap();
            for pt in &p.tensors {
                map.insert(pt.name.clone(), p.file_name.clone());
            }
        }
        if plans.len() > 1 {
            let total = plans.iter().map(|p| p.data_len()).sum();
            store
                .put(
                    &folder.clone().join(INDEX_FILE_NAME),
                    index_json(total, &map).into(),
                )
                .await
                .unwrap();
        }
        plans.into_iter().map(|p| p.file_name).collect()
    }

    fn sample() -> Vec<OutTensor> {
        vec![
            t("embed", DType::BF16, &[10, 4]),
            t("layer.0.w", DType::F32, &[4, 4]),
            t("layer.0.b", DType::F32, &[4]),
            t("layer.1.w", DType::F16, &[4, 4]),
            t("head", DType::BF16, &[4, 10]),
        ]
    }

    fn assert_matches_sample(ck: &Checkpoint) {
        let names: Vec<&str> = ck.tensors.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["embed", "head", "layer.0.b", "layer.0.w", "layer.1.w"]
        );
        let embed = &ck.tensors["embed"];
        assert_eq!(embed.dtype, DType::BF16);
        assert_eq!(embed.shape, vec![10, 4]);
        assert_eq!(embed.len(), 80);
        assert_eq!(ck.input_bytes(), 80 + 64 + 16 + 32 + 80);
        for loc in ck.tensors.values() {
            let f = &ck.files[loc.file];
            assert!(loc.start >= f.header.data_start() && loc.end <= f.size);
        }
    }

    #[tokio::test]
    async fn single_file_folder_and_shards_on_local_fs() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalFileSystem::new_with_prefix(dir.path()).unwrap();

        // A file URL.
        let files = write_ckpt(&store, &Path::from("one"), &sample(), None).await;
        assert_eq!(files, ["model.safetensors"]);
        let ck = open_checkpoint(
            &store,
            &Path::from("one/model.safetensors"),
            "file:///one/model.safetensors",
        )
        .await
        .unwrap();
        assert_eq!(ck.folder, None);
        assert_eq!(ck.files.len(), 1);
        assert_eq!(ck.url, "file:///one/model.safetensors");
        assert_matches_sample(&ck);

        // A folder URL with model.safetensors.
        let ck = open_checkpoint(&store, &Path::from("one"), "file:///one")
            .await
            .unwrap();
        assert_eq!(ck.folder, Some(Path::from("one")));
        assert_matches_sample(&ck);

        // A sharded folder.
        let files = write_ckpt(&store, &Path::from("sharded"), &sample(), Some(100)).await;
        assert!(files.len() >= 3, "{files:?}");
        let ck = open_checkpoint(&store, &Path::from("sharded"), "s3://b/sharded")
            .await
            .unwrap();
        assert_eq!(ck.files.len(), files.len());
        assert_eq!(ck.folder, Some(Path::from("sharded")));
        assert_matches_sample(&ck);
        // The locations point at the right bytes: compare with the safetensors reader.
        for (name, loc) in &ck.tensors {
            let f = &ck.files[loc.file];
            let bytes = std::fs::read(dir.path().join(f.path.as_ref())).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            assert_eq!(
                &bytes[loc.start as usize..loc.end as usize],
                st.tensor(name).unwrap().data()
            );
        }
    }

    #[tokio::test]
    async fn not_found_cases() {
        let store = InMemory::new();
        for (path, url) in [
            ("nothing", "u1"),
            ("nothing/model.safetensors", "u2"),
            ("", "u3"),
        ] {
            let e = open_checkpoint(&store, &Path::from(path), url)
                .await
                .unwrap_err();
            assert!(
                matches!(&e, CheckpointError::NotFound { url: u } if u == url),
                "{e:?}"
            );
            assert_eq!(e.code(), ErrorCode::CheckpointNotFound);
        }
        // A folder holding other files only.
        store
            .put(&Path::from("other/pytorch_model.bin"), vec![0u8; 10].into())
            .await
            .unwrap();
        let e = open_checkpoint(&store, &Path::from("other"), "u")
            .await
            .unwrap_err();
        assert!(matches!(e, CheckpointError::NotFound { .. }));
    }

    #[tokio::test]
    async fn missing_shard_is_malformed_and_named() {
        let store = InMemory::new();
        let folder = Path::from("m");
        let files = write_ckpt(&store, &folder, &sample(), Some(100)).await;
        store
            .delete(&folder.clone().join(files[1].as_str()))
            .await
            .unwrap();
        let e = open_checkpoint(&store, &folder, "u").await.unwrap_err();
        match &e {
            CheckpointError::Malformed { file, reason } => {
                // Named by the index (the shard's name is the index's bytes).
                assert_eq!(file, &format!("u/{INDEX_FILE_NAME}"));
                assert!(reason.contains("does not exist"), "{reason}");
                assert!(!reason.contains(files[1].as_str()), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.code(), ErrorCode::CheckpointMalformed);
    }

    #[tokio::test]
    async fn index_and_headers_must_agree_both_ways() {
        let store = InMemory::new();
        let folder = Path::from("x");
        let files = write_ckpt(&store, &folder, &sample(), Some(100)).await;
        let index_path = folder.clone().join(INDEX_FILE_NAME);
        let original = store.get(&index_path).await.unwrap().bytes().await.unwrap();
        let idx = parse_index(&original).unwrap();

        // The index lists a tensor that no header holds.
        let mut map = idx.weight_map.clone();
        map.insert("ghost".into(), files[0].clone());
        store
            .put(&index_path, index_json(0, &map).into())
            .await
            .unwrap();
        let e = open_checkpoint(&store, &folder, "u").await.unwrap_err();
        assert!(
            matches!(&e, CheckpointError::Malformed { file, reason } if file == "u/model.safetensors.index.json" && reason.contains("does not hold") && !reason.contains("ghost")),
            "{e:?}"
        );

        // A header holds a tensor the index does not list ("layer.0.b" shares its shard with
        // "layer.0.w", so the shard is still opened; a shard the index never names is ignored).
        let mut map = idx.weight_map.clone();
        assert_eq!(map["layer.0.b"], map["layer.0.w"]);
        map.remove("layer.0.b");
        store
            .put(&index_path, index_json(0, &map).into())
            .await
            .unwrap();
        let e = open_checkpoint(&store, &folder, "u").await.unwrap_err();
        assert!(
            matches!(&e, CheckpointError::Malformed { reason, .. } if !reason.contains("layer.0.b") && reason.contains("does not list")),
            "{e:?}"
        );

        // The index places a tensor in the wrong shard.
        let mut map = idx.weight_map.clone();
        let wrong = files.iter().find(|f| **f != map["embed"]).unwrap().clone();
        map.insert("embed".into(), wrong);
        store
            .put(&index_path, index_json(0, &map).into())
            .await
            .unwrap();
        let e = open_checkpoint(&store, &folder, "u").await.unwrap_err();
        assert!(
            matches!(&e, CheckpointError::Malformed { reason, .. } if !reason.contains("embed") && (reason.contains("another shard") || reason.contains("does not hold"))),
            "{e:?}"
        );

        // A bad index.
        store
            .put(
                &index_path,
                b"{\"weight_map\": {\"a\": \"../b.safetensors\"}}"
                    .to_vec()
                    .into(),
            )
            .await
            .unwrap();
        let e = open_checkpoint(&store, &folder, "u").await.unwrap_err();
        assert!(
            matches!(&e, CheckpointError::Malformed { file, .. } if file.ends_with(INDEX_FILE_NAME)),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn tensor_in_two_shards_is_malformed() {
        let store = InMemory::new();
        let folder = Path::from("d");
        // Two single-file plans that share a tensor name, written as shards.
        for (file, tensors) in [
            (
                "a.safetensors",
                vec![t("w", DType::F32, &[2]), t("x", DType::F32, &[1])],
            ),
            ("b.safetensors", vec![t("w", DType::F32, &[2])]),
        ] {
            let p = &plan_shards(&tensors, None, &BTreeMap::new()).unwrap()[0];
            let mut f = p.header.clone();
            f.resize(p.size as usize, 0);
            store
                .put(&folder.clone().join(file), f.into())
                .await
                .unwrap();
        }
        let map = BTreeMap::from([
            ("w".to_string(), "a.safetensors".to_string()),
            ("x".to_string(), "b.safetensors".to_string()),
        ]);
        store
            .put(
                &folder.clone().join(INDEX_FILE_NAME),
                index_json(0, &map).into(),
            )
            .await
            .unwrap();
        let e = open_checkpoint(&store, &folder, "u").await.unwrap_err();
        assert!(matches!(&e, CheckpointError::Malformed { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn truncated_and_corrupt_files() {
        let store = InMemory::new();
        let p = Path::from("bad.safetensors");
        // Header length past EOF.
        let mut f = 1000u64.to_le_bytes().to_vec();
        f.extend_from_slice(b"{}");
        store.put(&p, f.into()).await.unwrap();
        let e = open_checkpoint(&store, &p, "u").await.unwrap_err();
        assert!(
            matches!(&e, CheckpointError::Malformed { file, reason } if file == "u" && reason.contains("past the end")),
            "{e:?}"
        );
        // Shorter than 8 bytes.
        store.put(&p, vec![1u8, 2, 3].into()).await.unwrap();
        let e = open_checkpoint(&store, &p, "u").await.unwrap_err();
        assert!(matches!(e, CheckpointError::Malformed { .. }));
        // A 4 GB header length.
        store
            .put(&p, (4u64 << 30).to_le_bytes().to_vec().into())
            .await
            .unwrap();
        let e = open_checkpoint(&store, &p, "u").await.unwrap_err();
        assert!(
            matches!(&e, CheckpointError::Malformed { reason, .. } if reason.contains("exceeds"))
        );
        // Data truncated after the header: a tensor runs past the end.
        let plan = &plan_shards(&[t("w", DType::F32, &[4])], None, &BTreeMap::new()).unwrap()[0];
        let mut f = plan.header.clone();
        f.resize(plan.size as usize - 1, 0);
        store.put(&p, f.into()).await.unwrap();
        let e = open_checkpoint(&store, &p, "u").await.unwrap_err();
        assert!(
            matches!(&e, CheckpointError::Malformed { reason, .. } if reason.contains("tensor 1 of the header") && !reason.contains("\"w\"")),
            "{e:?}"
        );
    }

    /// Wraps a store and records every GET range, to check that only header bytes are read.
    #[derive(Debug)]
    struct Recording {
        inner: InMemory,
        gets: Mutex<Vec<(String, Option<GetRange>, bool)>>,
    }

    impl std::fmt::Display for Recording {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Recording({})", self.inner)
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Recording {
        async fn put_opts(
            &self,
            l: &Path,
            p: PutPayload,
            o: PutOptions,
        ) -> object_store::Result<PutResult> {
            self.inner.put_opts(l, p, o).await
        }
        async fn put_multipart_opts(
            &self,
            l: &Path,
            o: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(l, o).await
        }
        async fn get_opts(&self, l: &Path, o: GetOptions) -> object_store::Result<GetResult> {
            self.gets
                .lock()
                .unwrap()
                .push((l.to_string(), o.range.clone(), o.head));
            self.inner.get_opts(l, o).await
        }
        fn delete_stream(
            &self,
            locations: BoxStream<'static, object_store::Result<Path>>,
        ) -> BoxStream<'static, object_store::Result<Path>> {
            self.inner.delete_stream(locations)
        }
        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&Path>,
        ) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &Path,
            to: &Path,
            o: CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, o).await
        }
    }

    #[tokio::test]
    async fn reads_headers_only() {
        let store = Arc::new(Recording {
            inner: InMemory::new(),
            gets: Mutex::new(Vec::new()),
        });
        let big = vec![t("a", DType::F32, &[1000]), t("b", DType::F32, &[1000])];
        let files = write_ckpt(store.as_ref(), &Path::from("h"), &big, Some(4000)).await;
        assert_eq!(files.len(), 2);
        store.gets.lock().unwrap().clear();
        let dyn_store: Arc<dyn ObjectStore> = store.clone();
        let ck = open_checkpoint(dyn_store.as_ref(), &Path::from("h"), "u")
            .await
            .unwrap();
        assert_eq!(ck.tensors.len(), 2);
        let gets = store.gets.lock().unwrap().clone();
        for (path, range, head) in &gets {
            if path.ends_with(".safetensors") && !head {
                let Some(GetRange::Bounded(r)) = range else {
                    panic!("unbounded GET of {path}");
                };
                let f = ck.files.iter().find(|f| f.path.as_ref() == path).unwrap();
                assert!(r.end <= f.header.data_start(), "{path}: {r:?} reads data");
            }
        }
        // Per shard: one HEAD and two ranged GETs; plus the index.
        assert_eq!(gets.len(), 2 * 3 + 1, "{gets:?}");
    }

    #[test]
    fn open_checkpoint_future_is_send() {
        fn assert_send<T: Send>(_: T) {}
        let store = InMemory::new();
        let path = Path::from("x");
        assert_send(open_checkpoint(&store, &path, "u"));
    }
}

//! Writing a run's files into its staging folder (see [`super::publish`]): streamed shards
//! (multipart, hashed on the way out), small files, side files copied from the first model.

use bytes::Bytes;
use futures::StreamExt;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};

use super::manifest::MANIFEST_NAME;
use super::{EngineError, OutputFile};
use crate::checkpoint::INDEX_FILE_NAME;
use crate::storage::Location;

/// Files up to this size are copied with one GET and one PUT; larger ones stream.
const SMALL_FILE: u64 = 16 << 20;

/// One output file being streamed out: a multipart upload plus a running SHA-256.
pub(super) struct ShardSink {
    name: String,
    upload: WriteMultipart,
    /// Bytes go to a hashing task on the blocking pool, so hashing overlaps the upload and
    /// the next chunks' merges instead of stalling the writer.
    to_hasher: tokio::sync::mpsc::Sender<Bytes>,
    hasher: tokio::task::JoinHandle<Sha256>,
    size: u64,
    concurrency: usize,
}

impl ShardSink {
    pub(super) async fn create(
        folder: &Location,
        name: &str,
        part_size: usize,
        concurrency: usize,
    ) -> Result<Self, EngineError> {
        let loc = folder.child(name);
        let upload = loc
            .store
            .put_multipart(&loc.path)
            .await
            .map_err(EngineError::store(format!(
                "starting upload of {}",
                loc.url
            )))?;
        let (to_hasher, mut from_writer) = tokio::sync::mpsc::channel::<Bytes>(4);
        let hasher = tokio::task::spawn_blocking(move || {
            let mut h = Sha256::new();
            while let Some(piece) = from_writer.blocking_recv() {
                h.update(&piece);
            }
            h
        });
        Ok(ShardSink {
            name: name.to_string(),
            upload: WriteMultipart::new_with_chunk_size(upload, part_size),
            to_hasher,
            hasher,
            size: 0,
            concurrency: concurrency.max(1),
        })
    }

    /// Append bytes: uploaded with bounded parts in flight, hashed on the side.
    pub(super) async fn write(&mut self, bytes: Bytes) -> Result<(), EngineError> {
        self.upload
            .wait_for_capacity(self.concurrency)
            .await
            .map_err(EngineError::store(format!("uploading {}", self.name)))?;
        self.size += bytes.len() as u64;
        crate::metrics::bytes_written(bytes.len() as u64);
        self.upload.put(bytes.clone());
        self.to_hasher
            .send(bytes)
            .await
            .map_err(|_| EngineError::Internal("the hashing task stopped".into()))
    }

    /// Complete the upload: only now does the object appear, whole.
    pub(super) async fn finish(self) -> Result<OutputFile, EngineError> {
        let name = self.name;
        drop(self.to_hasher);
        let digest = self
            .hasher
            .await
            .map_err(|e| EngineError::Internal(format!("hash task failed: {e}")))?
            .finalize();
        self.upload
            .finish()
            .await
            .map_err(EngineError::store(format!("completing upload of {name}")))?;
        Ok(OutputFile {
            path: name,
            size: self.size,
            sha256: hex::encode(digest),
        })
    }

    /// Abort the upload; nothing becomes visible.
    pub(super) async fn abort(self) {
        drop(self.to_hasher);
        self.hasher.abort();
        if let Err(e) = self.upload.abort().await {
            tracing::warn!(file = %self.name, error = %e, "aborting a multipart upload failed");
        }
    }
}

/// Write a small file in one PUT.
pub(super) async fn put_small(
    folder: &Location,
    name: &str,
    bytes: Bytes,
) -> Result<OutputFile, EngineError> {
    let loc = folder.child(name);
    let file = OutputFile {
        path: name.to_string(),
        size: bytes.len() as u64,
        sha256: hex::encode(Sha256::digest(&bytes)),
    };
    loc.store
        .put(&loc.path, PutPayload::from_bytes(bytes))
        .await
        .map_err(EngineError::store(format!("writing {}", loc.url)))?;
    Ok(file)
}

/// Whether a file of a model folder is a side file to copy (config, tokenizer, ...), not
/// weights, not ladle's own, not hidden or a partial upload.
pub(super) fn is_side_file(name: &str) -> bool {
    const WEIGHT_SUFFIXES: [&str; 8] = [
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".msgpack",
        ".h5",
        ".gguf",
    ];
    !(name.is_empty()
        || name.starts_with('.')
        || name.contains('#')
        || name == MANIFEST_NAME
        || name == INDEX_FILE_NAME
        || name.ends_with(".index.json")
        || WEIGHT_SUFFIXES.iter().any(|s| name.ends_with(s)))
}

/// `config.json` with `num_hidden_layers` set (and in `text_config` when present), as
/// mergekit writes it after stacking slices; unchanged when it is not a JSON object.
fn with_num_hidden_layers(bytes: Bytes, n: u64) -> Bytes {
    let Ok(serde_json::Value::Object(mut cfg)) =
        serde_json::from_slice::<serde_json::Value>(&bytes)
    else {
        return bytes;
    };
    cfg.insert("num_hidden_layers".into(), n.into());
    if let Some(serde_json::Value::Object(text)) = cfg.get_mut("text_config")
        && text.contains_key("num_hidden_layers")
    {
        text.insert("num_hidden_layers".into(), n.into());
    }
    match serde_json::to_vec_pretty(&serde_json::Value::Object(cfg)) {
        Ok(mut v) => {
            v.push(b'\n');
            Bytes::from(v)
        }
        Err(_) => bytes,
    }
}

/// Copy the side files at the top level of `source` into `dest`; `num_hidden_layers` rewrites
/// that field of `config.json` (passthrough slices change the depth).
pub(super) async fn copy_side_files(
    source: &Location,
    dest: &Location,
    num_hidden_layers: Option<u64>,
) -> Result<Vec<OutputFile>, EngineError> {
    let listing = source
        .store
        .list_with_delimiter(Some(&source.path))
        .await
        .map_err(EngineError::store(format!("listing {}", source.url)))?;
    let mut copied = Vec::new();
    for meta in listing.objects {
        let Some(name) = meta.location.filename().map(str::to_string) else {
            continue;
        };
        if !is_side_file(&name) {
            continue;
        }
        let context = format!("copying {}/{name}", source.url);
        let got = source
            .store
            .get(&meta.location)
            .await
            .map_err(EngineError::store(context.clone()))?;
        if meta.size <= SMALL_FILE {
            let mut bytes = got.bytes().await.map_err(EngineError::store(context))?;
            if let (Some(n), "config.json") = (num_hidden_layers, name.as_str()) {
                bytes = with_num_hidden_layers(bytes, n);
            }
            copied.push(put_small(dest, &name, bytes).await?);
        } else {
            let mut sink = ShardSink::create(dest, &name, 16 << 20, 2).await?;
            let mut stream = got.into_stream();
            let streamed = async {
                while let Some(piece) = stream.next().await {
                    sink.write(piece.map_err(EngineError::store(context.clone()))?)
                        .await?;
                }
                Ok::<_, EngineError>(())
            }
            .await;
            match streamed {
                Ok(()) => copied.push(sink.finish().await?),
                Err(e) => {
                    sink.abort().await;
                    return Err(e);
                }
            }
        }
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::is_side_file;

    #[test]
    fn side_files() {
        for keep in [
            "config.json",
            "tokenizer.json",
            "tokenizer.model",
            "README.md",
        ] {
            assert!(is_side_file(keep), "{keep}");
        }
        for skip in [
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
            "ladle-manifest.json",
            ".hidden",
            "model.safetensors#3",
        ] {
            assert!(!is_side_file(skip), "{skip}");
        }
    }
}

//! Writing a run's files into its staging folder (see [`super::publish`]): streamed shards
//! (multipart, hashed on the way out), small files, side files copied from the first model.

use bytes::Bytes;
use futures::StreamExt;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};

use super::{EngineError, OutputFile};
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

/// The side files copied from the first model's folder, and only these: configs, tokenizer
/// files, chat templates. Never weights, dotfiles, ladle's own files or the database
/// (`ladle.db*`), whatever else the folder holds. The one list: extend it here.
pub const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
];

/// Whether `name` is a side file to copy (one of [`SIDE_FILES`]).
#[cfg(test)]
pub(super) fn is_side_file(name: &str) -> bool {
    SIDE_FILES.contains(&name)
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
    // `dest` is the run's staging folder: on an error the run removes all of it.
    let mut copied = Vec::new();
    copy_each(source, dest, num_hidden_layers, &mut copied).await?;
    Ok(copied)
}

async fn copy_each(
    source: &Location,
    dest: &Location,
    num_hidden_layers: Option<u64>,
    copied: &mut Vec<OutputFile>,
) -> Result<(), EngineError> {
    for &name in SIDE_FILES {
        let name = name.to_string();
        let location = source.path.clone().join(name.as_str());
        let context = format!("copying {}/{name}", source.url);
        // Through the confined store: a side file linked outside the root is refused
        // (`path_outside_roots`), never copied.
        let got = match source.store.get(&location).await {
            Err(object_store::Error::NotFound { .. }) => continue,
            got => got.map_err(EngineError::store(context.clone()))?,
        };
        if got.meta.size <= SMALL_FILE {
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
    Ok(())
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
            "chat_template.jinja",
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
            "ladle.db",
            "ladle.db-wal",
            "authorized_keys",
            "README.md",
            ".env",
        ] {
            assert!(!is_side_file(skip), "{skip}");
        }
    }
}

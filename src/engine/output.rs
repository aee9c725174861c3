//! Writing a run's files into its staging folder (see [`super::publish`]): streamed shards
//! (multipart, hashed on the way out), small files, named side files copied from the donor
//! model ([`super::side_files`] says which).

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

/// Copy the files named `names` at the top level of `source` into `dest` (a name the source
/// lacks is skipped); `edit` may rewrite a small file on the way (`config.json`).
pub(super) async fn copy_side_files(
    source: &Location,
    dest: &Location,
    names: &[&str],
    edit: impl Fn(&str, Bytes) -> Bytes,
) -> Result<Vec<OutputFile>, EngineError> {
    // `dest` is the run's staging folder: on an error the run removes all of it.
    let mut copied = Vec::new();
    copy_each(source, dest, names, &edit, &mut copied).await?;
    Ok(copied)
}

async fn copy_each(
    source: &Location,
    dest: &Location,
    names: &[&str],
    edit: &impl Fn(&str, Bytes) -> Bytes,
    copied: &mut Vec<OutputFile>,
) -> Result<(), EngineError> {
    for &name in names {
        let location = source.path.clone().join(name);
        let context = format!("copying {}/{name}", source.url);
        // Through the confined store: a side file linked outside the root is refused
        // (`path_outside_roots`), never copied.
        let got = match source.store.get(&location).await {
            Err(object_store::Error::NotFound { .. }) => continue,
            got => got.map_err(EngineError::store(context.clone()))?,
        };
        if got.meta.size <= SMALL_FILE {
            let bytes = got.bytes().await.map_err(EngineError::store(context))?;
            copied.push(put_small(dest, name, edit(name, bytes)).await?);
        } else {
            let mut sink = ShardSink::create(dest, name, 16 << 20, 2).await?;
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

//! The pre-passes of a streamed tensor ([`TensorStream`]: TIES / breadcrumbs cut-offs,
//! rescale norms, …): before the first chunk of such a tensor is merged, its inputs are read
//! chunk by chunk, in order, once per pass the method asks for, and the statistics are kept
//! with the tensor's chunks. Whichever chunk of the tensor runs first prepares it; the others
//! wait for it ([`StreamSlot`]), holding no input bytes while they wait.
//!
//! Memory: the method's statistics plus two chunks of every input read ahead.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;

use super::{EngineError, Kernel, RunControl, read_elems};
use crate::checkpoint::Checkpoint;
use crate::merge::DType;
use crate::merge::stream::TensorStream;
use crate::storage::Location;

/// One streamed tensor's merge, prepared once by the first of its chunks to need it.
pub(super) struct StreamSlot {
    /// Elements per pre-pass chunk (a multiple of the stream's alignment).
    step: u64,
    cell: tokio::sync::OnceCell<Arc<dyn TensorStream>>,
}

impl StreamSlot {
    pub(super) fn new(step: u64) -> StreamSlot {
        StreamSlot {
            step: step.max(1),
            cell: tokio::sync::OnceCell::new(),
        }
    }

    /// The tensor's stream with its pre-passes done (run now if no chunk has yet).
    pub(super) async fn get(
        &self,
        inputs: &[(Location, Checkpoint)],
        kernel: &Kernel,
        name: &str,
        shape: &[u64],
        ctl: &RunControl,
    ) -> Result<Arc<dyn TensorStream>, EngineError> {
        self.cell
            .get_or_try_init(|| async {
                let base = inputs
                    .first()
                    .and_then(|(_, c)| c.tensors.get(name))
                    .ok_or_else(|| {
                        EngineError::Internal(format!("tensor {name} missing from the base"))
                    })?;
                let stream = kernel.stream(name, shape, base.dtype).ok_or_else(|| {
                    EngineError::Internal(format!("tensor {name} has no streamed kernel"))
                })?;
                prepare(inputs, name, stream, self.step, ctl).await
            })
            .await
            .cloned()
    }
}

/// Run every pre-pass `stream` asks for over tensor `name` of `inputs`, `step` elements of
/// every input at a time.
async fn prepare(
    inputs: &[(Location, Checkpoint)],
    name: &str,
    mut stream: Box<dyn TensorStream>,
    step: u64,
    ctl: &RunControl,
) -> Result<Arc<dyn TensorStream>, EngineError> {
    let n: u64 = inputs
        .first()
        .and_then(|(_, c)| c.tensors.get(name))
        .map(|t| t.shape.iter().product())
        .ok_or_else(|| EngineError::Internal(format!("tensor {name} missing from the base")))?;
    let pass_bytes: u64 = inputs
        .iter()
        .filter_map(|(_, c)| c.tensors.get(name))
        .map(|t| t.len())
        .sum();
    while stream.wants_pass() {
        ctl.progress
            .bytes_total
            .fetch_add(pass_bytes, std::sync::atomic::Ordering::Relaxed);
        let ranges: Vec<std::ops::Range<u64>> = (0..n)
            .step_by(step as usize)
            .map(|s| s..(s + step).min(n))
            .collect();
        let mut reads = futures::stream::iter(ranges)
            .map(|r| async move {
                let reads = inputs
                    .iter()
                    .map(|(loc, ckpt)| read_elems(loc, ckpt, name, r.clone()));
                let raw: Vec<(DType, Bytes)> = futures::future::try_join_all(reads).await?;
                Ok::<_, EngineError>((r.start, raw))
            })
            .buffered(2);
        while let Some(next) = reads.next().await {
            ctl.check()?;
            let (first, raw) = next?;
            let bytes: u64 = raw.iter().map(|(_, b)| b.len() as u64).sum();
            ctl.progress
                .bytes_read
                .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
            stream = tokio::task::spawn_blocking(move || {
                let views: Vec<(DType, &[u8])> =
                    raw.iter().map(|(d, b)| (*d, b.as_ref())).collect();
                stream.observe(first, &views).map(|()| stream)
            })
            .await
            .map_err(|e| EngineError::Internal(format!("pre-pass task panicked: {e}")))?
            .map_err(|source| EngineError::Merge {
                tensor: name.to_string(),
                source,
            })?;
        }
        stream.end_pass();
    }
    Ok(Arc::from(stream))
}

//! The pre-passes of a streamed tensor ([`TensorStream`]: TIES / breadcrumbs cut-offs,
//! rescale norms, …): before the first chunk of such a tensor is merged, its inputs are read
//! chunk by chunk, in order, once per pass the method asks for, and the statistics are kept
//! with the tensor's chunks. Whichever chunk of the tensor runs first prepares it; the others
//! wait for it ([`StreamSlot`]), holding no input bytes while they wait.
//!
//! The pre-passes of the next streamed tensors run ahead of the chunk window ([`Ahead`]): while
//! one tensor's chunks are merged and written, the next one's statistics are gathered, so the
//! merge of a tensor does not wait for its own pre-passes with the cores idle. At most
//! [`AHEAD`] tensors are prepared and not yet written at a time.
//!
//! Memory: the statistics of at most [`AHEAD`] tensors plus two chunks of every input read
//! ahead.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tracing::Instrument;

use super::{EngineError, Kernel, Plan, RunControl, TensorOp, read_elems};
use crate::checkpoint::Checkpoint;
use crate::merge::DType;
use crate::merge::stream::TensorStream;
use crate::storage::Location;

/// Streamed tensors whose pre-passes may be done (or running) ahead of their writing.
pub(super) const AHEAD: usize = 3;

/// One streamed tensor's merge, prepared once by the first of its chunks to need it, or ahead
/// of them by [`Ahead`].
pub(super) struct StreamSlot {
    /// Elements per pre-pass chunk (a multiple of the stream's alignment).
    step: u64,
    cell: tokio::sync::OnceCell<Arc<dyn TensorStream>>,
    /// [`Ahead`]'s permit for this tensor, held until the tensor is written (`true` once it is).
    ahead: std::sync::Mutex<(bool, Option<tokio::sync::OwnedSemaphorePermit>)>,
}

impl StreamSlot {
    pub(super) fn new(step: u64) -> StreamSlot {
        StreamSlot {
            step: step.max(1),
            cell: tokio::sync::OnceCell::new(),
            ahead: std::sync::Mutex::new((false, None)),
        }
    }

    /// The tensor is written: its permit goes back to [`Ahead`].
    pub(super) fn written(&self) {
        let mut a = self.ahead.lock().unwrap_or_else(|e| e.into_inner());
        a.0 = true;
        a.1 = None;
    }

    /// Keep `permit` until the tensor is written (dropped at once if it already is).
    fn hold(&self, permit: tokio::sync::OwnedSemaphorePermit) {
        let mut a = self.ahead.lock().unwrap_or_else(|e| e.into_inner());
        if !a.0 {
            a.1 = Some(permit);
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

/// One streamed tensor of a shard, for [`Ahead`]: its slot and where its merge reads.
pub(super) struct AheadTensor {
    pub(super) slot: Arc<StreamSlot>,
    pub(super) op: TensorOp,
    pub(super) tensor: String,
    pub(super) shape: Vec<u64>,
}

/// The pre-passes of a shard's streamed tensors, run in order on a task of their own, at most
/// [`AHEAD`] tensors ahead of the last one written; stopped when dropped. A pre-pass that fails
/// here is left to the tensor's first chunk, which runs it again and reports the error.
pub(super) struct Ahead(tokio::task::JoinHandle<()>);

impl Ahead {
    pub(super) fn start(plan: Arc<Plan>, tensors: Vec<AheadTensor>, ctl: Arc<RunControl>) -> Ahead {
        let task = async move {
            let permits = Arc::new(tokio::sync::Semaphore::new(AHEAD));
            for t in tensors {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                t.slot.hold(permit);
                let Some((inputs, kernel, name)) = plan.merge_view(&t.op, &t.tensor) else {
                    continue;
                };
                if t.slot
                    .get(inputs, kernel, name, &t.shape, &ctl)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        };
        Ahead(tokio::spawn(task.in_current_span()))
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        self.0.abort();
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

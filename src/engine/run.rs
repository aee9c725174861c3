//! Writing a planned run: every shard streamed chunk by chunk through the kernel into the
//! run's staging folder, then the index and the side files, then publishing (moved out of
//! `engine/mod.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use tracing::Instrument;

use super::read::{check_inputs, read_elems};
use super::{
    Engine, EngineError, Kernel, Manifest, MergeOutcome, OutputFile, Phase, Plan, RunControl,
    TensorOp, buffers, output, plan::donor, publish, side_files, tensor_prepass,
};
use crate::checkpoint::{Checkpoint, INDEX_FILE_NAME, ShardPlan, index_json};
use crate::merge::precision::Precision;
use crate::merge::{DType, MergeError, map_blocks};
use crate::recipe::Recipe;
use crate::storage::Location;

impl Engine {
    pub(super) async fn write_all(
        &self,
        recipe: &Recipe,
        plan: &Arc<Plan>,
        ctl: &Arc<RunControl>,
        staging: &Location,
        writer: &publish::Writer,
        started: Instant,
    ) -> Result<MergeOutcome, EngineError> {
        let mut written: Vec<OutputFile> = Vec::new();
        // The inputs must be what was planned before and after every shard is read.
        check_inputs(&plan.inputs).await?;
        for shard in &plan.shards {
            ctl.check()?;
            let file = self
                .write_shard(plan, staging, shard, plan.kernel.clone(), ctl)
                .await?;
            written.push(file);
            crate::failpoints::pause("shard-written").await;
            check_inputs(&plan.inputs).await?;
        }
        if plan.shards.len() > 1 {
            let mut weight_map = BTreeMap::new();
            let mut total = 0u64;
            for shard in &plan.shards {
                for t in &shard.tensors {
                    weight_map.insert(t.name.clone(), shard.file_name.clone());
                    total += t.len;
                }
            }
            let bytes = Bytes::from(index_json(total, &weight_map));
            let f = output::put_small(staging, INDEX_FILE_NAME, bytes).await?;
            ctl.progress
                .bytes_written
                .fetch_add(f.size, Ordering::Relaxed);
            written.push(f);
        }
        let donor = donor(&plan.inputs);
        for f in
            side_files::write(recipe, donor.as_ref(), &plan.output, staging, &plan.side).await?
        {
            written.push(f);
        }
        ctl.check()?;
        ctl.progress.set_phase(Phase::Publishing);
        // Last chance to find out we may not publish: a fenced heartbeat in the worker.
        ctl.gate.may_publish().await?;
        let mut m = Manifest::new(recipe, plan, written, started, &ctl.run_info);
        m.search = ctl.progress.search();
        let recovered = publish::publish(&plan.output, staging, writer, &m).await?;
        Ok(MergeOutcome {
            uri: plan.output.url.clone(),
            files: m.files,
            recovered,
        })
    }

    /// Stream one shard: header, then every tensor chunk by chunk, through a multipart upload.
    async fn write_shard(
        &self,
        plan: &Arc<Plan>,
        staging: &Location,
        shard: &ShardPlan,
        kernel: Arc<Kernel>,
        ctl: &Arc<RunControl>,
    ) -> Result<OutputFile, EngineError> {
        let mut sink = output::ShardSink::create(
            staging,
            &shard.file_name,
            self.config.part_size,
            self.config.upload_concurrency,
        )
        .await?;
        let result = async {
            sink.write(Bytes::from(shard.header.clone())).await?;
            let chunks = self.chunks_of(plan, shard)?;
            let _ahead =
                tensor_prepass::Ahead::start(plan.clone(), ahead_tensors(&chunks), ctl.clone());
            let per_chunk_max = chunks.iter().map(|c| c.bytes_in_flight).max().unwrap_or(1);
            let depth = (self.config.inflight_bytes / per_chunk_max.max(1)).clamp(1, 8) as usize;
            // Output buffers of streamed chunks are reused: those in flight here, plus those
            // the upload and the hasher still hold.
            let widest = shard.tensors.iter().map(|t| t.dtype.size_bytes()).max();
            let pool = buffers::BufferPool::new(
                self.config.chunk_elems.max(1) * widest.unwrap_or(1),
                depth + 2 * self.config.upload_concurrency.max(1) + 4,
            );
            // Each chunk is its own task, so reads and merges of the next chunks proceed
            // while this loop hashes and uploads; `buffered` bounds how many are in flight.
            let mut stream = futures::stream::iter(chunks)
                .map(|chunk| {
                    tokio::spawn(
                        produce_chunk(
                            plan.clone(),
                            chunk,
                            kernel.clone(),
                            ctl.clone(),
                            pool.clone(),
                        )
                        .in_current_span(),
                    )
                })
                .buffered(depth);
            while let Some(done) = stream.next().await {
                let (chunk, bytes) =
                    done.map_err(|e| EngineError::Internal(format!("chunk task failed: {e}")))??;
                ctl.check()?;
                ctl.progress
                    .bytes_written
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                sink.write(bytes).await?;
                crate::metrics::chunk_merged();
                if chunk.last_of_tensor {
                    if let Some(slot) = &chunk.stream {
                        slot.written();
                    }
                    ctl.progress.tensors_done.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok::<_, EngineError>(())
        }
        .await;
        match result {
            Ok(()) => sink.finish().await,
            Err(e) => {
                sink.abort().await;
                Err(e)
            }
        }
    }

    /// Split a shard's tensors into chunks of at most `chunk_elems` elements.
    fn chunks_of(&self, plan: &Plan, shard: &ShardPlan) -> Result<Vec<Chunk>, EngineError> {
        let mut chunks = Vec::new();
        for t in &shard.tensors {
            let op = plan
                .ops
                .get(&t.name)
                .cloned()
                .ok_or_else(|| EngineError::Internal(format!("no op for {}", t.name)))?;
            let numel: u64 = t.shape.iter().product();
            // A streamed tensor: its chunks start on multiples of the stream's alignment and
            // share one slot for its pre-pass statistics.
            let view = plan.merge_view(&op, &t.name);
            let align = view.and_then(|(inputs, kernel, name)| {
                inputs
                    .first()
                    .and_then(|(_, c)| c.tensors.get(name))
                    .and_then(|b| kernel.stream(name, &t.shape, b.dtype))
                    .map(|s| s.align().max(1) as u64)
            });
            let whole =
                align.is_none() && view.is_some_and(|(_, kernel, name)| kernel.whole_tensor(name));
            let step = match align {
                Some(a) => (self.config.chunk_elems as u64 / a).max(1) * a,
                None if whole => numel.max(1),
                None => self.config.chunk_elems.max(1) as u64,
            };
            let stream = align.map(|_| Arc::new(tensor_prepass::StreamSlot::new(step)));
            let in_size: u64 = match op {
                TensorOp::Merge | TensorOp::Part { .. } => view.map_or(0, |(inputs, _, name)| {
                    inputs
                        .iter()
                        .filter_map(|(_, c)| c.tensors.get(name))
                        .map(|l| l.dtype.size_bytes() as u64)
                        .sum()
                }),
                TensorOp::CopyFirst => t.dtype.size_bytes() as u64,
                TensorOp::Pick {
                    input, ref source, ..
                } => plan
                    .inputs
                    .get(input)
                    .and_then(|(_, c)| c.tensors.get(source))
                    .map_or(4, |l| l.dtype.size_bytes() as u64),
            };
            // The whole-tensor path also holds an f32 copy of every input, one task vector
            // per model and an f32 result (see `kernel`).
            let out_size = t.dtype.size_bytes() as u64
                + if whole {
                    8 * (view.map_or(0, |(inputs, _, _)| inputs.len()) as u64 + 1)
                } else {
                    0
                };
            let mut begin = 0u64;
            loop {
                let end = (begin + step).min(numel);
                chunks.push(Chunk {
                    tensor: t.name.clone(),
                    op: op.clone(),
                    out_dtype: t.dtype,
                    shape: t.shape.clone(),
                    elems: begin..end,
                    last_of_tensor: end == numel,
                    bytes_in_flight: (end - begin) * (in_size + out_size),
                    stream: stream.clone(),
                });
                if end == numel {
                    break;
                }
                begin = end;
            }
        }
        Ok(chunks)
    }
}

/// The streamed tensors of `chunks`, in order (their pre-passes can run ahead).
fn ahead_tensors(chunks: &[Chunk]) -> Vec<tensor_prepass::AheadTensor> {
    let mut tensors: Vec<tensor_prepass::AheadTensor> = Vec::new();
    for c in chunks {
        let Some(slot) = &c.stream else { continue };
        if tensors.last().is_some_and(|t| Arc::ptr_eq(&t.slot, slot)) {
            continue;
        }
        tensors.push(tensor_prepass::AheadTensor {
            slot: slot.clone(),
            op: c.op.clone(),
            tensor: c.tensor.clone(),
            shape: c.shape.clone(),
        });
    }
    tensors
}

/// One unit of streaming work: a range of elements of one output tensor.
struct Chunk {
    tensor: String,
    op: TensorOp,
    out_dtype: DType,
    shape: Vec<u64>,
    elems: std::ops::Range<u64>,
    last_of_tensor: bool,
    bytes_in_flight: u64,
    /// A streamed tensor's pre-pass statistics, shared by its chunks.
    stream: Option<Arc<tensor_prepass::StreamSlot>>,
}

/// Fetch a chunk's input ranges concurrently, then merge them off the async runtime.
async fn produce_chunk(
    plan: Arc<Plan>,
    chunk: Chunk,
    kernel: Arc<Kernel>,
    ctl: Arc<RunControl>,
    pool: Arc<buffers::BufferPool>,
) -> Result<(Chunk, Bytes), EngineError> {
    ctl.check()?;
    // Test-only throttle / CPU burn (a no-op unless built with the `failpoints` feature).
    crate::failpoints::chunk().await;
    if chunk.elems.is_empty() {
        // An empty tensor: nothing to read (an empty ranged GET is invalid on S3).
        return Ok((chunk, Bytes::new()));
    }
    // A merged slice's tensor: its own inputs and kernel, under the name its kernel knows.
    let (merge_inputs, kernel, merge_name): (&[(Location, Checkpoint)], Arc<Kernel>, String) =
        match &chunk.op {
            TensorOp::Part { part, name } => {
                let p = plan
                    .parts
                    .get(*part)
                    .ok_or_else(|| EngineError::Internal("slice part out of range".into()))?;
                (&p.inputs, p.kernel.clone(), name.clone())
            }
            _ => (&plan.inputs, kernel, chunk.tensor.clone()),
        };
    // A streamed tensor's statistics first (its pre-passes, run by the first chunk to get
    // here), so that waiting chunks hold no input bytes.
    let stream = match &chunk.stream {
        Some(slot) => Some(
            slot.get(merge_inputs, &kernel, &merge_name, &chunk.shape, &ctl)
                .await?,
        ),
        None => None,
    };
    let (sources, source_name): (&[(Location, Checkpoint)], &String) = match &chunk.op {
        TensorOp::Merge | TensorOp::Part { .. } => (merge_inputs, &merge_name),
        TensorOp::CopyFirst => (&plan.inputs[..1], &chunk.tensor),
        TensorOp::Pick { input, source, .. } => (
            plan.inputs
                .get(*input..*input + 1)
                .ok_or_else(|| EngineError::Internal("input out of range".into()))?,
            source,
        ),
    };
    let progress = &ctl.progress;
    let elems = &chunk.elems;
    let reads = sources.iter().map(|(loc, ckpt)| async move {
        let (dtype, bytes) = read_elems(loc, ckpt, source_name, elems.clone()).await?;
        progress
            .bytes_read
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok::<_, EngineError>((dtype, bytes))
    });
    let raw: Vec<(DType, Bytes)> = futures::future::try_join_all(reads).await?;
    if let TensorOp::CopyFirst = chunk.op {
        let bytes = raw.into_iter().next().map(|(_, b)| b).unwrap_or_default();
        return Ok((chunk, bytes));
    }
    if let TensorOp::Pick { scale, .. } = &chunk.op {
        let scale = *scale;
        let Some((in_dtype, bytes)) = raw.into_iter().next() else {
            return Err(EngineError::Internal("no input read".into()));
        };
        // mergekit's `dtype`: the tensor is cast on load, then scaled in that dtype.
        let (in_dtype, bytes) = match kernel
            .cast_dtype()
            .filter(|to| in_dtype.is_mergeable_float() && *to != in_dtype)
        {
            Some(to) => {
                let cast = crate::merge::dtype::cast(in_dtype, &bytes, to).map_err(|e| {
                    EngineError::Merge {
                        tensor: chunk.tensor.clone(),
                        source: e.into(),
                    }
                })?;
                (to, Bytes::from(cast))
            }
            None => (in_dtype, bytes),
        };
        let out_dtype = chunk.out_dtype;
        if !in_dtype.is_mergeable_float() || (scale.is_none() && in_dtype == out_dtype) {
            return Ok((chunk, bytes));
        }
        let name = chunk.tensor.clone();
        let n = (chunk.elems.end - chunk.elems.start) as usize;
        let converted = merge_task(name, move || {
            let mut buf = pool.take(n * out_dtype.size_bytes());
            let out = buf.as_mut_slice();
            // `tensor * scale` in the source dtype (a Python float acts at f32 precision).
            let p = Precision::of(in_dtype);
            map_blocks(
                &[(in_dtype, bytes.as_ref())],
                out_dtype,
                out,
                |b, o| match scale {
                    Some(s) => {
                        let s = s as f32;
                        for (o, x) in o.iter_mut().zip(b[0]) {
                            *o = p.round(x * s);
                        }
                    }
                    None => o.copy_from_slice(b[0]),
                },
            )?;
            Ok(buf.into_bytes())
        })
        .await?;
        return Ok((chunk, converted));
    }
    let out_dtype = chunk.out_dtype;
    let n = (chunk.elems.end - chunk.elems.start) as usize;
    let name = chunk.tensor.clone();
    let shape = chunk.shape.clone();
    let first = chunk.elems.start;
    let task_name = merge_name.clone();
    let merged = merge_task(name, move || {
        let inputs: Vec<(DType, &[u8])> = raw.iter().map(|(d, b)| (*d, b.as_ref())).collect();
        let mut out = pool.take(n * out_dtype.size_bytes());
        match &stream {
            Some(s) => kernel.run_stream(
                &task_name,
                s.as_ref(),
                first,
                &inputs,
                out_dtype,
                out.as_mut_slice(),
            )?,
            None => kernel.run(&task_name, &shape, &inputs, out_dtype, out.as_mut_slice())?,
        }
        // The inputs (mapped file ranges) are released before the output travels on.
        drop(inputs);
        drop(raw);
        Ok(out.into_bytes())
    })
    .await?;
    Ok((chunk, merged))
}

/// Runs a chunk's kernel on the blocking pool (in the job's span); its error names `tensor`.
async fn merge_task<F>(tensor: String, f: F) -> Result<Bytes, EngineError>
where
    F: FnOnce() -> Result<Bytes, MergeError> + Send + 'static,
{
    crate::telemetry::spawn_blocking(f)
        .await
        .map_err(|e| EngineError::Internal(format!("merge task panicked: {e}")))?
        .map_err(|source| EngineError::Merge { tensor, source })
}

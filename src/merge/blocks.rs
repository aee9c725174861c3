//! The blocked, parallel driver shared by every elementwise merge method.
//!
//! [`map_blocks`] walks the elements of one tensor in cache-sized blocks of [`BLOCK_ELEMS`]:
//! each input block is decoded into a small `f32` scratch, the kernel runs on the block, and the
//! result is encoded straight into the output bytes. Large tensors are split into tasks of
//! [`TASK_ELEMS`] elements run in parallel on the current rayon pool, each task reusing one
//! scratch. Because the kernel is elementwise and blocks never straddle, the output bytes equal
//! those of decode-all → kernel → encode-all, whatever the block size or the thread count.

use rayon::prelude::*;

use crate::merge::dtype::{DType, DTypeError, decode_to_f32, encode_from_f32};
use crate::merge::error::MergeError;

/// Elements per block: 4096 `f32` = 16 KiB per input, so a few inputs and the output block stay
/// in L1/L2 while the kernel runs.
pub const BLOCK_ELEMS: usize = 4096;

/// Elements per rayon task (a multiple of [`BLOCK_ELEMS`]). Tensors no larger than this run on
/// the calling thread without touching the pool.
pub const TASK_ELEMS: usize = 256 * 1024;

/// Checks that every dtype is a mergeable float and that every buffer holds the same number of
/// elements; returns that number.
fn validate(inputs: &[(DType, &[u8])], out_dtype: DType, out: &[u8]) -> Result<usize, MergeError> {
    if !out_dtype.is_mergeable_float() {
        return Err(DTypeError::NotFloat(out_dtype).into());
    }
    let osz = out_dtype.size_bytes();
    if !out.len().is_multiple_of(osz) {
        return Err(MergeError::OutputLength {
            dtype: out_dtype,
            bytes: out.len(),
        });
    }
    let n = out.len() / osz;
    for (index, (dtype, bytes)) in inputs.iter().enumerate() {
        if !dtype.is_mergeable_float() {
            return Err(DTypeError::NotFloat(*dtype).into());
        }
        let expected = n.checked_mul(dtype.size_bytes());
        if expected != Some(bytes.len()) {
            return Err(MergeError::InputLength {
                index,
                dtype: *dtype,
                expected: expected.unwrap_or(usize::MAX),
                actual: bytes.len(),
                elements: n,
            });
        }
    }
    Ok(n)
}

/// Runs the elementwise kernel `f` over raw little-endian tensors.
///
/// `inputs` are `(dtype, bytes)` pairs, each a mergeable float (F64/F32/F16/BF16, they may
/// differ) holding exactly as many elements as `out` holds elements of `out_dtype`. For every
/// block, `f(blocks, out_block)` receives one decoded `&[f32]` per input (in input order, all of
/// the same length, at most [`BLOCK_ELEMS`]) and must write every element of `out_block` (its
/// contents on entry are unspecified). `f` must be elementwise: element `e` of `out_block` may
/// depend on element `e` of the blocks only; then the result does not depend on blocking or on
/// the number of threads.
///
/// Runs in parallel on the current rayon pool for tensors larger than [`TASK_ELEMS`].
pub fn map_blocks<F>(
    inputs: &[(DType, &[u8])],
    out_dtype: DType,
    out: &mut [u8],
    f: F,
) -> Result<(), MergeError>
where
    F: Fn(&[&[f32]], &mut [f32]) + Sync,
{
    let n = validate(inputs, out_dtype, out)?;
    let k = inputs.len();
    if n <= TASK_ELEMS {
        let mut scratch = new_scratch(k);
        return run_task(inputs, 0, out_dtype, out, &mut scratch, &f);
    }
    out.par_chunks_mut(TASK_ELEMS * out_dtype.size_bytes())
        .enumerate()
        .try_for_each_init(
            || new_scratch(k),
            |scratch, (t, chunk)| run_task(inputs, t * TASK_ELEMS, out_dtype, chunk, scratch, &f),
        )
}

/// Like [`map_blocks`], for kernels that need to know where they are and whole spans of
/// elements at once: `f(state, first, blocks, out_block)` gets spans of exactly `span`
/// elements (the last may be shorter), `first` being the index of the span's first element
/// in the buffers. Spans are grouped into tasks of about [`TASK_ELEMS`] elements run in
/// parallel; each task starts with `init(first)` (its first element) and walks its spans in
/// order, so `state` may carry running counts from span to span within the task.
pub fn map_spans<S, I, F>(
    inputs: &[(DType, &[u8])],
    out_dtype: DType,
    out: &mut [u8],
    span: usize,
    init: I,
    f: F,
) -> Result<(), MergeError>
where
    I: Fn(usize) -> S + Sync,
    F: Fn(&mut S, usize, &[&[f32]], &mut [f32]) + Sync,
{
    let n = validate(inputs, out_dtype, out)?;
    let span = span.max(1);
    let per_task = (TASK_ELEMS / span).max(1) * span;
    let osz = out_dtype.size_bytes();
    let task = |t: usize, chunk: &mut [u8]| -> Result<(), MergeError> {
        let first = t * per_task;
        let len = chunk.len() / osz.max(1);
        let k = inputs.len();
        let mut scratch = vec![0.0f32; (k + 1) * span.min(len.max(1))];
        let width = span.min(len.max(1));
        let (ins, outs) = scratch.split_at_mut(k * width);
        let mut state = init(first);
        for (b, out_block) in chunk.chunks_mut(span * osz).enumerate() {
            let start = first + b * span;
            let blen = out_block.len() / osz;
            let blocks = decode_span(inputs, start, blen, ins, width)?;
            let o = &mut outs[..blen];
            crate::merge::simd::run(
                #[inline(always)]
                || f(&mut state, start, &blocks, o),
            );
            encode_from_f32(out_dtype, o, out_block)?;
        }
        Ok(())
    };
    if n <= per_task {
        return task(0, out);
    }
    out.par_chunks_mut(per_task * osz)
        .enumerate()
        .try_for_each(|(t, chunk)| task(t, chunk))
}

/// Checks that every input is a mergeable float holding as many elements as the first;
/// returns that number.
fn validate_inputs(inputs: &[(DType, &[u8])]) -> Result<usize, MergeError> {
    let Some((d0, b0)) = inputs.first() else {
        return Ok(0);
    };
    let n = b0.len() / d0.size_bytes().max(1);
    for (index, (dtype, bytes)) in inputs.iter().enumerate() {
        if !dtype.is_mergeable_float() {
            return Err(DTypeError::NotFloat(*dtype).into());
        }
        if bytes.len() != n * dtype.size_bytes() {
            return Err(MergeError::InputLength {
                index,
                dtype: *dtype,
                expected: n * dtype.size_bytes(),
                actual: bytes.len(),
                elements: n,
            });
        }
    }
    Ok(n)
}

/// Decodes spans of `span` elements of `inputs` in order and hands each to
/// `f(first, blocks)` on the calling thread (a pre-pass whose sums must follow index order).
pub fn scan_spans<F>(inputs: &[(DType, &[u8])], span: usize, mut f: F) -> Result<(), MergeError>
where
    F: FnMut(usize, &[&[f32]]),
{
    let n = validate_inputs(inputs)?;
    let span = span.max(1);
    let width = span.min(n.max(1));
    let mut scratch = vec![0.0f32; inputs.len() * width];
    let mut start = 0;
    while start < n {
        let len = span.min(n - start);
        let blocks = decode_span(inputs, start, len, &mut scratch, width)?;
        crate::merge::simd::run(
            #[inline(always)]
            || f(start, &blocks),
        );
        start += len;
    }
    Ok(())
}

/// The parallel half of an order-dependent pre-pass: computes `k` `f32` values per element
/// of `inputs` into `values` (element `e`'s values at `values[e·k .. e·k + k]`), in tasks of
/// about [`TASK_ELEMS`] elements run on the current rayon pool. `f` gets
/// blocks of at most [`BLOCK_ELEMS`] decoded elements starting at element `first` and must
/// write all `k · len` values of `out`. The caller then folds `values` in index order on its
/// own thread (sums whose bits depend on the order of their terms), so only that fold is
/// sequential: decoding, rounding and division, the costly part, use every core.
///
/// Each task starts with a scratch state `init()` that `f` may use (`f(state, first, blocks,
/// out)`). `values` is resized to `n · k` and may be reused between calls (no zeroing of what
/// it already holds).
pub fn par_values<S, I, F>(
    inputs: &[(DType, &[u8])],
    k: usize,
    values: &mut Vec<f32>,
    init: I,
    f: F,
) -> Result<(), MergeError>
where
    I: Fn() -> S + Sync,
    F: Fn(&mut S, usize, &[&[f32]], &mut [f32]) + Sync,
{
    let n = validate_inputs(inputs)?;
    let k = k.max(1);
    values.resize(n * k, 0.0);
    let values = &mut values[..n * k];
    let task = |t: usize, out: &mut [f32]| -> Result<(), MergeError> {
        let first = t * TASK_ELEMS;
        let len = out.len() / k;
        let width = BLOCK_ELEMS.min(len.max(1));
        let mut scratch = vec![0.0f32; inputs.len() * width];
        let mut state = init();
        for (b, out_block) in out.chunks_mut(BLOCK_ELEMS * k).enumerate() {
            let start = first + b * BLOCK_ELEMS;
            let blen = out_block.len() / k;
            let blocks = decode_span(inputs, start, blen, &mut scratch, width)?;
            crate::merge::simd::run(
                #[inline(always)]
                || f(&mut state, start, &blocks, out_block),
            );
        }
        Ok(())
    };
    if n <= TASK_ELEMS {
        return task(0, values);
    }
    values
        .par_chunks_mut(TASK_ELEMS * k)
        .enumerate()
        .try_for_each(|(t, out)| task(t, out))
}

/// Decodes elements `start .. start + len` of every input into its own `width`-element slice
/// of `scratch` (input `i` at `scratch[i·width ..]`) and returns the decoded blocks, one per
/// input, each `len` long. The inputs must hold at least `start + len` elements (checked by
/// the callers' validation).
fn decode_span<'s>(
    inputs: &[(DType, &[u8])],
    start: usize,
    len: usize,
    scratch: &'s mut [f32],
    width: usize,
) -> Result<Vec<&'s [f32]>, MergeError> {
    for ((dtype, bytes), dst) in inputs.iter().zip(scratch.chunks_mut(width)) {
        let sz = dtype.size_bytes();
        decode_to_f32(
            *dtype,
            &bytes[start * sz..(start + len) * sz],
            &mut dst[..len],
        )?;
    }
    Ok(scratch.chunks(width).map(|c| &c[..len]).collect())
}

/// One scratch: `k` input blocks followed by the output block.
fn new_scratch(k: usize) -> Vec<f32> {
    vec![0.0; (k + 1) * BLOCK_ELEMS]
}

/// Processes the elements `first .. first + out.len() / out_size` block by block.
fn run_task<F>(
    inputs: &[(DType, &[u8])],
    first: usize,
    out_dtype: DType,
    out: &mut [u8],
    scratch: &mut [f32],
    f: &F,
) -> Result<(), MergeError>
where
    F: Fn(&[&[f32]], &mut [f32]),
{
    let k = inputs.len();
    let osz = out_dtype.size_bytes();
    let (ins, outs) = scratch.split_at_mut(k * BLOCK_ELEMS);
    for (b, out_block) in out.chunks_mut(BLOCK_ELEMS * osz).enumerate() {
        let start = first + b * BLOCK_ELEMS;
        let len = out_block.len() / osz;
        // In bounds: `validate` checked every input holds exactly `n` elements.
        let blocks = decode_span(inputs, start, len, ins, BLOCK_ELEMS)?;
        let out_f32 = &mut outs[..len];
        crate::merge::simd::run(
            #[inline(always)]
            || f(&blocks, out_f32),
        );
        encode_from_f32(out_dtype, out_f32, out_block)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    #[test]
    fn validation() {
        let a = [0u8; 8];
        let mut out = [0u8; 8];
        let id = |b: &[&[f32]], o: &mut [f32]| o.copy_from_slice(b[0]);
        // F32 ×2 → 2 elements; BF16 ×4 bytes ok, 8 bytes wrong.
        assert!(map_blocks(&[(DType::F32, &a)], DType::F32, &mut out, id).is_ok());
        assert!(map_blocks(&[(DType::BF16, &a[..4])], DType::F32, &mut out, id).is_ok());
        let e = map_blocks(&[(DType::BF16, &a)], DType::F32, &mut out, id).unwrap_err();
        assert!(matches!(
            e,
            MergeError::InputLength {
                index: 0,
                expected: 4,
                actual: 8,
                ..
            }
        ));
        assert_eq!(e.code(), crate::error::ErrorCode::ShapeMismatch);
        let e = map_blocks(&[(DType::I32, &a)], DType::F32, &mut out, id).unwrap_err();
        assert_eq!(e, MergeError::DType(DTypeError::NotFloat(DType::I32)));
        assert_eq!(e.code(), crate::error::ErrorCode::UnsupportedDtype);
        let e = map_blocks(&[(DType::F32, &a)], DType::U8, &mut out, id).unwrap_err();
        assert_eq!(e, MergeError::DType(DTypeError::NotFloat(DType::U8)));
        let mut odd = [0u8; 7];
        let e = map_blocks(&[(DType::F32, &a)], DType::F32, &mut odd, id).unwrap_err();
        assert!(matches!(e, MergeError::OutputLength { bytes: 7, .. }));
    }

    #[test]
    fn blocks_see_aligned_elements_in_any_pool() {
        // Element e of input i holds e + i·n (exact in f32 for these sizes); the kernel checks
        // that every block lines up, and the output records the element index.
        let n = 2 * TASK_ELEMS + 3 * BLOCK_ELEMS + 17;
        let inputs_f: Vec<Vec<f32>> = (0..3)
            .map(|i| (0..n).map(|e| (e + i * n) as f32).collect())
            .collect();
        let dts = [DType::F32, DType::F64, DType::F32];
        let bytes: Vec<Vec<u8>> = inputs_f
            .iter()
            .zip(dts)
            .map(|(v, d)| {
                let mut b = vec![0u8; n * d.size_bytes()];
                encode_from_f32(d, v, &mut b).unwrap();
                b
            })
            .collect();
        let inputs: Vec<(DType, &[u8])> = dts
            .iter()
            .zip(&bytes)
            .map(|(d, b)| (*d, b.as_slice()))
            .collect();
        for threads in [1, 3] {
            let mut out = vec![0u8; n * 4];
            pool(threads)
                .install(|| {
                    map_blocks(&inputs, DType::F32, &mut out, |b, o| {
                        assert_eq!(b.len(), 3);
                        for (e, o) in o.iter_mut().enumerate() {
                            let base = b[0][e];
                            assert_eq!(b[1][e], base + n as f32);
                            assert_eq!(b[2][e], base + 2.0 * n as f32);
                            *o = base;
                        }
                    })
                })
                .unwrap();
            let mut back = vec![0f32; n];
            decode_to_f32(DType::F32, &out, &mut back).unwrap();
            for (e, v) in back.iter().enumerate() {
                assert_eq!(*v, e as f32);
            }
        }
    }

    #[test]
    fn no_inputs_and_empty_tensors() {
        let mut out = vec![0u8; 10];
        map_blocks(&[], DType::BF16, &mut out, |b, o| {
            assert!(b.is_empty());
            o.fill(1.0);
        })
        .unwrap();
        assert_eq!(out, [0x80, 0x3F].repeat(5));
        let mut empty: [u8; 0] = [];
        map_blocks(&[(DType::F16, &[])], DType::F16, &mut empty, |_, _| {
            panic!("no block for an empty tensor")
        })
        .unwrap();
    }
}

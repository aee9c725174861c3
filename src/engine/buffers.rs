//! Reused output buffers for the chunks of one shard.
//!
//! A chunk's merged bytes are written into a buffer taken from the shard's [`BufferPool`] and
//! passed on as [`Bytes`] (to the upload and the hasher); when both are done with them, the
//! buffer goes back to the pool. Steady-state chunks so allocate nothing and zero nothing: a
//! fresh `vec![0; n]` per chunk costs a memset (or, for large allocations, page faults and the
//! kernel's page clearing) of every output byte. Buffers are handed out with stale contents:
//! every user overwrites the whole buffer.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Buffers of `size` bytes, at most `keep` of them kept while idle.
pub(super) struct BufferPool {
    size: usize,
    keep: usize,
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// A pool for chunks of at most `size` bytes (larger requests get a buffer of their own).
    pub(super) fn new(size: usize, keep: usize) -> Arc<BufferPool> {
        Arc::new(BufferPool {
            size,
            keep,
            free: Mutex::new(Vec::new()),
        })
    }

    /// A buffer of `len` bytes (contents unspecified).
    pub(super) fn take(self: &Arc<Self>, len: usize) -> PooledBuf {
        if len > self.size {
            return PooledBuf {
                buf: vec![0u8; len],
                len,
                pool: None,
            };
        }
        let reused = self
            .free
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        PooledBuf {
            buf: reused.unwrap_or_else(|| vec![0u8; self.size]),
            len,
            pool: Some(self.clone()),
        }
    }

    fn put_back(&self, buf: Vec<u8>) {
        let mut free = self
            .free
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if free.len() < self.keep {
            free.push(buf);
        }
    }
}

/// A buffer out of a [`BufferPool`]; back to it when dropped.
pub(super) struct PooledBuf {
    buf: Vec<u8>,
    len: usize,
    pool: Option<Arc<BufferPool>>,
}

impl PooledBuf {
    pub(super) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }

    /// As `Bytes`, without a copy; the buffer returns to the pool when the last clone drops.
    pub(super) fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.put_back(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_bounded() {
        let pool = BufferPool::new(64, 2);
        let mut a = pool.take(10);
        a.as_mut_slice().fill(7);
        let ptr = a.as_ref().as_ptr();
        let bytes = a.into_bytes();
        assert_eq!(&bytes[..], &[7u8; 10]);
        let clone = bytes.clone();
        drop(bytes);
        // Still referenced: not back yet.
        assert!(pool.free.lock().unwrap().is_empty());
        drop(clone);
        assert_eq!(pool.free.lock().unwrap().len(), 1);
        // The same memory comes back, with the requested length.
        let b = pool.take(64);
        assert_eq!(b.as_ref().as_ptr(), ptr);
        assert_eq!(b.as_ref().len(), 64);
        // More than `keep` idle buffers are freed, not kept.
        let (c, d, e) = (pool.take(1), pool.take(1), pool.take(1));
        drop((b, c, d, e));
        assert_eq!(pool.free.lock().unwrap().len(), 2);
        // Oversized requests are served and not pooled.
        let big = pool.take(1000);
        assert_eq!(big.as_ref().len(), 1000);
        drop(big);
        assert_eq!(pool.free.lock().unwrap().len(), 2);
    }
}

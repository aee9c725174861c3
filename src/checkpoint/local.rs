//! Reading tensor bytes of a local checkpoint file through one open file, held for the job.
//!
//! A [`LocalFile`] is opened once, when the job is planned, and every ranged read of the job
//! goes through that descriptor: a file renamed or replaced afterwards does not change what is
//! read. Reads map the range into memory (`mmap`, pages populated up front) and hand it out as
//! [`Bytes`] without copying it or zeroing a buffer first; the mapping is released when the last
//! `Bytes` of it is dropped. Where a file cannot be mapped, the range is read with `pread`.
//!
//! Truncation is checked before every read: the file must still be as large as when it was
//! opened, so a short file is a malformed checkpoint, never short data. What no check can catch
//! is a file truncated in place *while* one of its mapped ranges is being read: the process then
//! gets `SIGBUS`. Inputs are only read; a writer that truncates a checkpoint during a merge is
//! outside what ladle defends against (replacing the file, as tools that save checkpoints do,
//! is harmless: the open descriptor keeps the old bytes).

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

/// One local safetensors file, open for the whole job.
pub struct LocalFile {
    file: File,
    /// For messages.
    path: PathBuf,
    /// The size when it was opened; every read checks that the file is still this large.
    size: u64,
    /// What `fstat` said when it was opened: the engine compares it with [`LocalFile::current`]
    /// around every output shard (a write in place changes the size or the mtime).
    identity: LocalIdentity,
}

/// A local file's identity as `fstat` sees it: device, inode, size, modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i128,
}

impl LocalIdentity {
    fn of(meta: &std::fs::Metadata) -> LocalIdentity {
        use std::os::unix::fs::MetadataExt;
        LocalIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

impl std::fmt::Debug for LocalFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalFile")
            .field("path", &self.path)
            .field("size", &self.size)
            .finish()
    }
}

/// Two handles are equal when they name the same file at the same size (the descriptor itself
/// is not compared).
impl PartialEq for LocalFile {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path && self.size == other.size
    }
}

impl Eq for LocalFile {}

/// Why a local read failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalReadError {
    /// The file is shorter than the range (truncated since it was opened).
    #[error(
        "{path}: bytes {start}..{end} requested, but the file now holds {len} bytes (truncated?)"
    )]
    Truncated {
        path: String,
        start: u64,
        end: u64,
        len: u64,
    },
    /// The operating system refused (an I/O error).
    #[error("reading {path}: {source}")]
    Io { path: String, source: io::Error },
}

impl LocalFile {
    /// Opens `path` read-only.
    pub fn open(path: &Path) -> io::Result<LocalFile> {
        LocalFile::from_file(File::open(path)?, path.to_path_buf())
    }

    /// Wraps a file opened elsewhere (`path` is only used in messages).
    pub fn from_file(file: File, path: PathBuf) -> io::Result<LocalFile> {
        let meta = file.metadata()?;
        Ok(LocalFile {
            file,
            path,
            size: meta.len(),
            identity: LocalIdentity::of(&meta),
        })
    }

    /// The identity recorded when it was opened.
    pub fn identity(&self) -> LocalIdentity {
        self.identity
    }

    /// The identity now (`fstat` of the open descriptor).
    pub fn current(&self) -> io::Result<LocalIdentity> {
        Ok(LocalIdentity::of(&self.file.metadata()?))
    }

    /// The size when it was opened.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Its path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes `range` of the file. Blocking (page faults of a file not in the page cache wait for
    /// the disk): call it off the async runtime.
    pub fn read(&self, range: Range<u64>) -> Result<Bytes, LocalReadError> {
        let io = |source| LocalReadError::Io {
            path: self.path.display().to_string(),
            source,
        };
        let len = self.file.metadata().map_err(io)?.len();
        if range.end > len.min(self.size) || range.start > range.end {
            return Err(LocalReadError::Truncated {
                path: self.path.display().to_string(),
                start: range.start,
                end: range.end,
                len,
            });
        }
        let n = usize::try_from(range.end - range.start)
            .map_err(|_| io(io::Error::other("range larger than the address space")))?;
        if n == 0 {
            return Ok(Bytes::new());
        }
        // SAFETY: the mapping is read-only and private to this process; ladle never writes its
        // inputs. Another process changing the bytes while they are mapped would be seen here
        // (ladle checks that inputs did not change around each shard), and one truncating the
        // file in place raises SIGBUS (see the module documentation).
        let mapped = unsafe {
            memmap2::MmapOptions::new()
                .offset(range.start)
                .len(n)
                .populate()
                .map(&self.file)
        };
        match mapped {
            Ok(map) => Ok(Bytes::from_owner(map)),
            // Not mappable (some file systems): read it.
            Err(_) => {
                let mut buf = vec![0u8; n];
                self.file
                    .read_exact_at(&mut buf, range.start)
                    .map_err(|e| {
                        if e.kind() == io::ErrorKind::UnexpectedEof {
                            LocalReadError::Truncated {
                                path: self.path.display().to_string(),
                                start: range.start,
                                end: range.end,
                                len: self.file.metadata().map_or(0, |m| m.len()),
                            }
                        } else {
                            io(e)
                        }
                    })?;
                Ok(Bytes::from(buf))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(n: usize) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let data: Vec<u8> = (0..n).map(|i| (i * 7 + i / 251) as u8).collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        (dir, path, data)
    }

    #[test]
    fn reads_ranges_at_any_offset() {
        let page = 4096usize;
        let (_dir, path, data) = file_with(5 * page + 123);
        let f = LocalFile::open(&path).unwrap();
        assert_eq!(f.size(), data.len() as u64);
        for (a, b) in [
            (0, 1),
            (0, data.len()),
            (1, page + 1),
            (page - 1, page + 1),
            (page, 2 * page),
            (3 * page + 17, data.len()),
            (77, 77),
        ] {
            let got = f.read(a as u64..b as u64).unwrap();
            assert_eq!(&got[..], &data[a..b], "{a}..{b}");
        }
        // The bytes outlive other reads and stay valid after the handle's other maps drop.
        let keep = f.read(10..20).unwrap();
        drop(f.read(0..data.len() as u64).unwrap());
        assert_eq!(&keep[..], &data[10..20]);
    }

    #[test]
    fn past_the_end_and_truncated_files_are_refused() {
        let (_dir, path, data) = file_with(10_000);
        let f = LocalFile::open(&path).unwrap();
        let e = f.read(9_000..10_001).unwrap_err();
        assert!(
            matches!(e, LocalReadError::Truncated { len: 10_000, .. }),
            "{e}"
        );
        // Truncated after it was opened: a read that would reach past the new end is refused,
        // even a read that the new size would still allow is refused when it passes the old one.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(5_000)
            .unwrap();
        let e = f.read(4_000..6_000).unwrap_err();
        assert!(
            matches!(&e, LocalReadError::Truncated { len: 5_000, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("truncated"), "{e}");
        assert_eq!(&f.read(0..100).unwrap()[..], &data[..100]);
    }

    #[test]
    fn a_replaced_file_is_still_read_from_the_descriptor() {
        let (dir, path, data) = file_with(8192);
        let f = LocalFile::open(&path).unwrap();
        let other = dir.path().join("y");
        std::fs::write(&other, vec![0xEEu8; 8192]).unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert_eq!(&f.read(0..8192).unwrap()[..], &data[..]);
        // The descriptor's identity did not change either (the path's did).
        assert_eq!(f.current().unwrap(), f.identity());
    }

    #[test]
    fn a_write_in_place_changes_the_identity() {
        let (_dir, path, _data) = file_with(8192);
        let f = LocalFile::open(&path).unwrap();
        assert_eq!(f.current().unwrap(), f.identity());
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&[1, 2, 3], 100)
            .unwrap();
        let now = f.current().unwrap();
        assert_eq!(now.ino, f.identity().ino);
        assert_ne!(now, f.identity());
    }
}

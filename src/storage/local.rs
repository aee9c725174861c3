//! The local file store: every file or folder ladle opens, lists, creates, renames or deletes on
//! the local file system is reached from a directory handle of an allowed root, never by path.
//!
//! Why not `object_store`'s `LocalFileSystem`: it opens every object by its full path string,
//! so whatever symlink sits on the way at that moment is followed (`tokenizer.json ->
//! /etc/shadow` is read, a scratch listing walks through a planted link and its clean-up then
//! deletes the link's target), it re-creates missing parent folders by path (an output folder
//! swapped for a link mid-job is written through), and a root check made once on the URL's text
//! says nothing about the later opens. [`LocalStore`] implements the same
//! [`ObjectStore`] interface (so the engine, the manifest and the listings keep one storage
//! interface for S3 and local files) on these rules instead:
//!
//! - Each root is opened once as a [`cap_std::fs::Dir`]; every operation walks from that handle,
//!   component by component (`openat2(RESOLVE_BENEATH)` on Linux, an `O_NOFOLLOW` walk
//!   elsewhere), so there is no window between a check and the use: what is opened is what was
//!   checked.
//! - A symlink is followed only while its target stays inside the same root; one that leaves it
//!   (or any absolute link whose real target is outside) fails with [`OutsideRoots`], which
//!   names the file as the URL spelled it, never the link target (error code
//!   `path_outside_roots`).
//! - Writes go to a temporary file `<name>#<digits>` created with `O_EXCL` in the target folder,
//!   then renamed into place: a link planted at the final name is replaced, never written
//!   through. [`PutMode::Create`] and `copy/rename_if_not_exists` never replace anything
//!   (`renameat2(RENAME_NOREPLACE)`), so claims made with create-if-absent work as on S3.
//! - Deletes unlink the name itself (`unlinkat`), never what a link points to; folders are
//!   removed recursively without following links ([`LocalStore::remove_tree`]).
//! - Listings do not descend into symlinked folders (no loops, nothing outside).
//! - A job's output folder is held: [`LocalStore::pin_dir`] opens it once, when the job is
//!   planned, and gives a store over that one handle, so every write, rename and removal of the
//!   job stays in the folder that was opened, whatever is moved or swapped in at its name later
//!   (and no link leaves that folder).
//!
//! Object paths are absolute file system paths without the leading `/` (as with
//! `LocalFileSystem::new()`), so messages and manifests are unchanged. Hard links cannot be told
//! apart from the file they link to: a hard link inside a root to a file outside it is read
//! like any other file (see the README's Security section).

use listing::{Entry, classify, walk};
pub use names::outside_entry;
use names::{Shown, shown_url};
use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Component, Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::{Path, PathPart};
use object_store::{
    Attributes, CopyMode, CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult,
    MultipartUpload, ObjectMeta, ObjectStore, PutMode, PutMultipartOptions, PutOptions, PutPayload,
    PutResult, RenameOptions, RenameTargetMode, UploadPart,
};

const STORE: &str = "LocalStore";

/// A file reached through a symbolic link (or a folder) that leaves its allowed root.
#[derive(Debug, thiserror::Error)]
#[error("{path} leads outside the allowed roots (through a symbolic link)")]
pub struct OutsideRoots {
    /// The file as the URL names it (`file:///…`), never the link's target.
    pub path: String,
}

/// The [`OutsideRoots`] inside an `object_store` error, if that is what it is.
pub fn outside_roots(e: &object_store::Error) -> Option<&OutsideRoots> {
    match e {
        object_store::Error::PermissionDenied { source, .. } => source.downcast_ref(),
        _ => None,
    }
}

/// One allowed root: its canonical path and, once opened, its handle.
struct RootDir {
    path: PathBuf,
    /// `path` as object path parts.
    parts: Vec<String>,
    dir: Mutex<Option<Arc<Dir>>>,
    /// A folder opened once and held ([`LocalStore::pin_dir`]): `path` is only where it was
    /// when opened; nothing is ever looked up by path again, and no link leaves the handle.
    pinned: bool,
}

/// The confined local store (see the module documentation). Cloning shares the handles.
#[derive(Clone)]
pub struct LocalStore {
    /// Outermost first: a path is served by the widest root that holds it.
    roots: Arc<Vec<RootDir>>,
    /// A held folder that [`LocalStore::pin_dir`] made: removed when the last clone goes,
    /// if it is empty then (see `made.rs`). Held only for that drop, never read.
    _made: Option<Arc<made::MadeDir>>,
    /// How messages name the files of the location this store was resolved for
    /// ([`LocalStore::shown_as`]); `None`: by their paths.
    shown: Option<Arc<Shown>>,
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore")
            .field(
                "roots",
                &self.roots.iter().map(|r| &r.path).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl std::fmt::Display for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalStore({} roots)", self.roots.len())
    }
}

/// A file system path as object path parts.
fn fs_parts(path: &FsPath) -> Vec<String> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(PathPart::from(n.as_bytes()).as_ref().to_string()),
            _ => None,
        })
        .collect()
}

/// An object path part as a file name (`PathPart` percent-encodes what object keys avoid).
fn part_name(part: &str) -> OsString {
    match super::percent_decode(part) {
        Some(bytes) => OsStr::from_bytes(&bytes).to_os_string(),
        None => OsString::from(part),
    }
}

/// `<name>#<digits>`: a temporary file of a write in progress (hidden from listings).
pub fn is_staging_name(name: &[u8]) -> bool {
    match name.iter().rposition(|&b| b == b'#') {
        Some(i) => i > 0 && i + 1 < name.len() && name[i + 1..].iter().all(u8::is_ascii_digit),
        None => false,
    }
}

fn staging_name(name: &OsStr) -> OsString {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut s = name.to_os_string();
    s.push(format!("#{}{nanos:09}{n}", std::process::id()));
    s
}

/// Whether cap-std refused because the path would leave the root.
pub(crate) fn is_escape(e: &io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error())
        || (e.kind() == io::ErrorKind::PermissionDenied && e.raw_os_error().is_none() && {
            let text = e.to_string();
            text.contains("outside of the filesystem") || text.contains("an absolute path")
        })
}

/// A resolved location: the root it is under and the path relative to that root.
struct Rel<'a> {
    root: &'a RootDir,
    /// Relative to the root; empty for the root itself.
    rel: PathBuf,
    /// For messages: the file as the request wrote it ([`shown_url`]).
    url: String,
    /// What the store names its files by, for the children of this path.
    shown: Option<&'a Shown>,
}

impl Rel<'_> {
    fn outside(&self) -> object_store::Error {
        object_store::Error::PermissionDenied {
            path: self.url.clone(),
            source: Box::new(OutsideRoots {
                path: self.url.clone(),
            }),
        }
    }

    fn io(&self, e: io::Error) -> object_store::Error {
        if is_escape(&e) {
            return self.outside();
        }
        match e.kind() {
            io::ErrorKind::NotFound => object_store::Error::NotFound {
                path: self.url.clone(),
                source: Box::new(e),
            },
            io::ErrorKind::AlreadyExists => object_store::Error::AlreadyExists {
                path: self.url.clone(),
                source: Box::new(e),
            },
            _ => object_store::Error::Generic {
                store: STORE,
                source: Box::new(io::Error::new(e.kind(), format!("{}: {e}", self.url))),
            },
        }
    }

    fn dir(&self) -> Result<Arc<Dir>, object_store::Error> {
        self.root.dir().map_err(|e| self.io(e))
    }

    fn name(&self) -> Result<&OsStr, object_store::Error> {
        self.rel
            .file_name()
            .ok_or_else(|| object_store::Error::InvalidPath {
                source: object_store::path::Error::EmptySegment {
                    path: self.url.clone(),
                },
            })
    }

    fn parent(&self) -> PathBuf {
        self.rel
            .parent()
            .map(FsPath::to_path_buf)
            .unwrap_or_default()
    }

    /// Runs `op` on `rel` from the root's handle; when cap-std refuses because a link on the
    /// way leaves the root, the path is canonicalised (following every link) and, if the real
    /// target is inside the same root (an absolute link pointing back in), `op` runs again on
    /// that path, still from the handle: whatever was swapped in between, nothing outside the
    /// root is reached.
    fn follow<T>(
        &self,
        rel: &FsPath,
        op: impl Fn(&Dir, &FsPath) -> io::Result<T>,
    ) -> Result<T, object_store::Error> {
        let dir = self.dir()?;
        match op(&dir, &dot(rel)) {
            Err(e) if is_escape(&e) && self.root.pinned => {
                tracing::warn!(path = %self.url, "refused: a symbolic link leads out of the held folder");
                Err(self.outside())
            }
            Err(e) if is_escape(&e) => {
                let real = std::fs::canonicalize(self.root.path.join(rel)).map_err(|e| {
                    if e.kind() == io::ErrorKind::NotFound {
                        self.io(e)
                    } else {
                        self.outside()
                    }
                })?;
                let Ok(inside) = real.strip_prefix(&self.root.path) else {
                    tracing::warn!(path = %self.url, "refused: a symbolic link leads outside the allowed roots");
                    return Err(self.outside());
                };
                op(&dir, &dot(inside)).map_err(|e| self.io(e))
            }
            other => other.map_err(|e| self.io(e)),
        }
    }

    /// The folder holding this path, opened (links inside the root followed).
    fn parent_dir(&self, create: bool) -> Result<Dir, object_store::Error> {
        let parent = self.parent();
        match self.follow(&parent, |d, p| d.open_dir(p)) {
            Err(object_store::Error::NotFound { .. }) if create => {
                self.follow(&parent, |d, p| d.create_dir_all(p))?;
                self.follow(&parent, |d, p| d.open_dir(p))
            }
            other => other,
        }
    }
}

/// `.` for the root itself.
fn dot(rel: &FsPath) -> PathBuf {
    if rel.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        rel.to_path_buf()
    }
}

impl RootDir {
    fn dir(&self) -> io::Result<Arc<Dir>> {
        let mut guard = self.dir.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = guard.as_ref() {
            return Ok(d.clone());
        }
        let d = Arc::new(Dir::open_ambient_dir(
            &self.path,
            cap_std::ambient_authority(),
        )?);
        *guard = Some(d.clone());
        Ok(d)
    }
}

fn read_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    // Non-blocking so that a FIFO planted as an input cannot hang the open; the file type is
    // checked right after.
    o.read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32);
    o
}

fn create_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.write(true).create_new(true).mode(0o644);
    o
}

fn etag(m: &std::fs::Metadata) -> String {
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .unwrap_or_default()
        .as_micros();
    format!("\"{:x}-{mtime:x}-{:x}\"", m.ino(), m.len())
}

fn object_meta(location: Path, m: &std::fs::Metadata) -> ObjectMeta {
    ObjectMeta {
        location,
        last_modified: m
            .modified()
            .map(chrono::DateTime::<chrono::Utc>::from)
            .unwrap_or_default(),
        size: m.len(),
        e_tag: Some(etag(m)),
        version: None,
    }
}

fn join(parent: &Path, name: &OsStr) -> Path {
    parent.clone().join(PathPart::from(name.as_bytes()))
}

/// Moves `from` (in `from_dir`) to `to` (in `to_dir`); `no_replace`: fail with
/// `AlreadyExists` rather than replace anything.
fn rename_at(
    from_dir: &Dir,
    from: &OsStr,
    to_dir: &Dir,
    to: &OsStr,
    no_replace: bool,
) -> io::Result<()> {
    if no_replace {
        rustix::fs::renameat_with(
            from_dir,
            from,
            to_dir,
            to,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(io::Error::from)
    } else {
        from_dir.rename(from, to_dir, to)
    }
}

impl LocalStore {
    /// A store over these canonical root folders (opened on first use). `/` alone: the whole
    /// file system (the unrestricted one-shot CLI).
    pub fn new(roots: Vec<PathBuf>) -> LocalStore {
        let mut roots: Vec<RootDir> = roots
            .into_iter()
            .map(|path| RootDir {
                parts: fs_parts(&path),
                path,
                dir: Mutex::new(None),
                pinned: false,
            })
            .collect();
        roots.sort_by_key(|r| r.parts.len());
        roots.dedup_by(|a, b| a.path == b.path);
        LocalStore {
            roots: Arc::new(roots),
            _made: None,
            shown: None,
        }
    }

    /// The same store (same handles), whose messages name the files under `prefix` (the
    /// object path a URL resolved to) by `url`, the URL as the request wrote it: what
    /// [`super::Storage::resolve`] gives each location.
    pub fn shown_as(&self, prefix: &Path, url: &str) -> LocalStore {
        LocalStore {
            roots: self.roots.clone(),
            _made: self._made.clone(),
            shown: Some(Arc::new(Shown {
                prefix: prefix.clone(),
                url: url.to_string(),
            })),
        }
    }

    /// `location` as messages name it.
    pub fn shown(&self, location: &Path) -> String {
        shown_url(self.shown.as_deref(), location)
    }

    fn locate(&self, location: &Path) -> Result<Rel<'_>, object_store::Error> {
        let parts: Vec<String> = location.parts().map(|p| p.as_ref().to_string()).collect();
        let url = self.shown(location);
        for root in self.roots.iter() {
            if parts.len() >= root.parts.len() && parts.iter().zip(&root.parts).all(|(a, b)| a == b)
            {
                let rel: PathBuf = parts[root.parts.len()..]
                    .iter()
                    .map(|p| part_name(p))
                    .collect();
                return Ok(Rel {
                    root,
                    rel,
                    url,
                    shown: self.shown.as_deref(),
                });
            }
        }
        Err(object_store::Error::PermissionDenied {
            path: url.clone(),
            source: Box::new(OutsideRoots { path: url }),
        })
    }

    /// A store over the one folder at `location`, opened now (from this store's handles, so
    /// under the same rules) and held: every later operation on a path under `location` goes
    /// through that handle, wherever the folder is moved to or whatever is put at its name
    /// meanwhile (an output folder exchanged for a link is not followed: the writes stay in
    /// the folder that was opened). `create`: make the folder (and missing parents) first; a
    /// folder made here is removed again, through its parent's handle, when the last clone of
    /// the returned store goes, if it is empty then (a run that failed before publishing: see
    /// `made.rs`). Paths outside `location` are refused (`path_outside_roots`).
    pub fn pin_dir(
        &self,
        location: &Path,
        create: bool,
    ) -> Result<LocalStore, object_store::Error> {
        let r = self.locate(location)?;
        let (opened, made) = match r.follow(&r.rel, |d, p| d.open_dir(p)) {
            Err(object_store::Error::NotFound { .. }) if create => make_dir(&r)?,
            other => (other?, None),
        };
        Ok(LocalStore {
            roots: Arc::new(vec![RootDir {
                path: r.root.path.join(&r.rel),
                parts: location.parts().map(|p| p.as_ref().to_string()).collect(),
                dir: Mutex::new(Some(Arc::new(opened))),
                pinned: true,
            }]),
            _made: made.map(Arc::new),
            shown: self.shown.clone(),
        })
    }

    /// Opens the regular file at `location` read-only (for mapped reads).
    pub fn open_file(&self, location: &Path) -> Result<std::fs::File, object_store::Error> {
        let r = self.locate(location)?;
        open_regular(&r, &r.rel)
    }

    /// Removes `location` and everything under it without following any link (a link is
    /// removed itself, its target untouched). A missing folder is fine.
    pub fn remove_tree(&self, location: &Path) -> Result<(), object_store::Error> {
        let r = self.locate(location)?;
        let parent = match r.parent_dir(false) {
            Err(object_store::Error::NotFound { .. }) => return Ok(()),
            other => other?,
        };
        let name = r.name()?;
        match parent.symlink_metadata(name) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(r.io(e)),
            Ok(m) if m.is_dir() => parent.remove_dir_all(name).map_err(|e| r.io(e)),
            Ok(_) => parent.remove_file(name).map_err(|e| r.io(e)),
        }
    }

    /// Removes the folder at `location` if it is empty (and a real folder, not a link).
    pub fn remove_empty_dir(&self, location: &Path) -> Result<bool, object_store::Error> {
        let r = self.locate(location)?;
        let parent = match r.parent_dir(false) {
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            other => other?,
        };
        let name = r.name()?;
        match parent.symlink_metadata(name) {
            Ok(m) if m.is_dir() => match parent.remove_dir(name) {
                Ok(()) => Ok(true),
                Err(_) => Ok(false),
            },
            _ => Ok(false),
        }
    }

    fn list_blocking(&self, prefix: Option<&Path>) -> Vec<object_store::Result<ObjectMeta>> {
        let base = prefix.cloned().unwrap_or_default();
        let r = match self.locate(&base) {
            Ok(r) => r,
            Err(e) => return vec![Err(e)],
        };
        let dir = match r.follow(&r.rel, |d, p| d.open_dir(p)) {
            Ok(d) => d,
            Err(object_store::Error::NotFound { .. }) => return Vec::new(),
            Err(e) => return vec![Err(e)],
        };
        let mut out = Vec::new();
        walk(&r, &dir, &r.rel, &base, &mut out);
        out
    }
}

/// Makes the missing folder `r` (parents too) and opens it; the [`made::MadeDir`] when this
/// call made it (not when another writer made it meanwhile, nor for a root itself).
fn make_dir(r: &Rel<'_>) -> Result<(Dir, Option<made::MadeDir>), object_store::Error> {
    let Ok(name) = r.name() else {
        r.follow(&r.rel, |d, p| d.create_dir_all(p))?;
        return Ok((r.follow(&r.rel, |d, p| d.open_dir(p))?, None));
    };
    let parent = r.parent_dir(true)?;
    let made = match parent.create_dir(name) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(r.io(e)),
    };
    let opened = r.follow(&r.rel, |d, p| d.open_dir(p))?;
    let made = if made {
        made::MadeDir::of(parent, name, &opened, &r.url)
    } else {
        None
    };
    Ok((opened, made))
}

/// Opens a regular file (links inside the root followed); anything else is `NotFound`.
fn open_regular(r: &Rel<'_>, rel: &FsPath) -> Result<std::fs::File, object_store::Error> {
    let file = r
        .follow(rel, |d, p| d.open_with(p, &read_options()))?
        .into_std();
    let meta = file.metadata().map_err(|e| r.io(e))?;
    if !meta.is_file() {
        return Err(r.io(io::Error::new(
            io::ErrorKind::NotFound,
            "not a regular file",
        )));
    }
    Ok(file)
}

/// Writes `payload` to a new staging file beside `r`'s name; returns the folder, the staging
/// name and the written file's metadata.
fn stage(
    r: &Rel<'_>,
    write: impl FnOnce(&mut std::fs::File) -> io::Result<()>,
) -> object_store::Result<(Dir, OsString, std::fs::Metadata)> {
    let parent = r.parent_dir(true)?;
    let name = r.name()?;
    let tmp = staging_name(name);
    let mut file = parent
        .open_with(&tmp, &create_options())
        .map_err(|e| r.io(e))?
        .into_std();
    let written = write(&mut file).and_then(|()| file.metadata());
    match written {
        Ok(m) => Ok((parent, tmp, m)),
        Err(e) => {
            let _ = parent.remove_file(&tmp);
            Err(r.io(e))
        }
    }
}

/// Renames the staging file into place (or, `no_replace`, fails if the name exists).
fn publish(r: &Rel<'_>, parent: &Dir, tmp: &OsStr, no_replace: bool) -> object_store::Result<()> {
    let name = r.name()?;
    rename_at(parent, tmp, parent, name, no_replace).map_err(|e| {
        let _ = parent.remove_file(tmp);
        r.io(e)
    })
}

/// Runs blocking file system work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> object_store::Result<T> + Send + 'static,
) -> object_store::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| object_store::Error::JoinError { source: e })?
}

mod listing;
mod made;
mod names;
mod store;
#[cfg(test)]
mod tests;

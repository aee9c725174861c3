//! Hugging Face hub ids (`org/name`, `org/name@revision`) resolved offline, from a local cache
//! in the layout `huggingface_hub` writes:
//!
//! ```text
//! <cache>/models--<org>--<name>/refs/<ref>             the commit hash a branch or tag names
//! <cache>/models--<org>--<name>/snapshots/<commit>/…   the files, as links into ../../blobs/
//! <cache>/models--<org>--<name>/blobs/<hash>           the bytes
//! ```
//!
//! A revision is a ref (`main` when none is given; `refs/<ref>` holds its commit) or a
//! 40-hex commit, which picks `snapshots/<commit>/` directly. ladle never downloads: a model,
//! revision or snapshot the cache lacks is `model_not_cached`, naming the model and the
//! revision. The snapshot folder, and every link inside it, must lead to a place inside the
//! cache (`path_outside_roots` otherwise): checked here when the id is resolved, and again on
//! every open by [`super::local::LocalStore`] where the cache is an allowed root (the service).

use std::io::Read;
use std::path::{Path, PathBuf};

use cap_std::fs::OpenOptionsExt;

use super::StorageError;

/// huggingface_hub's limit on a repository id (`validate_repo_id`).
const MAX_REPO_LEN: usize = 96;
const MAX_REVISION_LEN: usize = 255;
/// Entries and depth the link check walks in a snapshot (a checkpoint has a few dozen files).
const MAX_SNAPSHOT_ENTRIES: usize = 100_000;
const MAX_SNAPSHOT_DEPTH: usize = 16;

/// A model reference read as a Hugging Face hub id: `org/name`, optionally `@revision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubRef<'a> {
    /// `org/name`.
    pub repo: &'a str,
    /// As written after `@`; `None`: `main`.
    pub revision: Option<&'a str>,
}

impl<'a> HubRef<'a> {
    /// `s` as a hub id, when it has the shape of one (`org/name`, each part of letters,
    /// digits, `-`, `_`, `.`, as huggingface_hub validates them; one optional `@revision`).
    /// Anything with a scheme (`file://`, `s3://`), more or fewer than one `/`, or an empty
    /// part is not.
    pub fn parse(s: &'a str) -> Option<HubRef<'a>> {
        if s.contains("://") {
            return None;
        }
        let (repo, revision) = match s.split_once('@') {
            None => (s, None),
            Some((repo, rev)) => (repo, Some(rev)),
        };
        if revision.is_some_and(|r| !valid_revision(r)) {
            return None;
        }
        let (org, name) = repo.split_once('/')?;
        if repo.len() > MAX_REPO_LEN || !valid_part(org) || !valid_part(name) {
            return None;
        }
        Some(HubRef { repo, revision })
    }

    /// The revision looked up: as written, else `main`.
    pub fn revision(&self) -> &'a str {
        self.revision.unwrap_or("main")
    }

    /// The repository's folder in the cache: `models--org--name`.
    pub fn folder_name(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }
}

/// The commit of the cache snapshot a hub id's location reads (`None` for any other
/// location): the last segment of its resolved folder, `…/snapshots/<commit>`.
pub fn commit_of(loc: &super::Location) -> Option<&str> {
    HubRef::parse(&loc.url)?;
    let commit = loc.canonical.rsplit('/').next()?;
    is_commit(commit).then_some(commit)
}

fn valid_part(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
        && !s.contains("--")
        && !s.contains("..")
}

/// A branch, tag (`v1.0`, `refs/pr/1`) or commit: no empty, `.` or `..` segment.
fn valid_revision(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_REVISION_LEN
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        && s.split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

/// A full commit hash, as huggingface_hub's `REGEX_COMMIT_HASH`.
fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A local Hugging Face hub cache folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfCache {
    /// Absolute, as configured (for messages).
    dir: PathBuf,
    /// With links resolved (the longest existing ancestor): what every path must lie under.
    canonical: PathBuf,
}

impl HfCache {
    /// The cache at `dir` (made absolute; it need not exist yet: every lookup then finds
    /// nothing cached).
    pub fn new(dir: &Path) -> std::io::Result<HfCache> {
        let dir = std::path::absolute(dir)?;
        let canonical = super::canonicalize_lenient(&dir)?;
        Ok(HfCache { dir, canonical })
    }

    /// Where huggingface_hub keeps its cache by default: `$HF_HUB_CACHE`, else
    /// `$HUGGINGFACE_HUB_CACHE` (its older name), else `$HF_HOME/hub`, else
    /// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub` (a leading `~` is
    /// the home folder, as huggingface_hub expands it).
    pub fn default_dir() -> Option<PathBuf> {
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from);
        let var = |name: &str| {
            let v = std::env::var(name).ok().filter(|v| !v.is_empty())?;
            match (v.strip_prefix("~/"), &home) {
                (Some(rest), Some(h)) => Some(h.join(rest)),
                _ if v == "~" => home.clone(),
                _ => Some(PathBuf::from(v)),
            }
        };
        var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
            .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")))
            .or_else(|| home.map(|h| h.join(".cache/huggingface/hub")))
    }

    /// The folder as configured (absolute).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The snapshot folder `written` (parsed as `hub`) names, canonical, after checking that
    /// it and every link in it lead to places inside the cache.
    pub fn snapshot(&self, written: &str, hub: &HubRef<'_>) -> Result<PathBuf, StorageError> {
        // Messages name the model as written and never the cache's folder (a path the user
        // did not write); the log has it.
        let not_cached = |reason: String| {
            tracing::info!(model = written, cache = %self.dir.display(), %reason, "model not cached");
            StorageError::ModelNotCached {
                model: written.to_string(),
                reason,
            }
        };
        let io = |source: std::io::Error| {
            tracing::warn!(model = written, cache = %self.dir.display(), error = %source, "reading the Hugging Face cache failed");
            StorageError::Io {
                path: written.to_string(),
                source: std::io::Error::new(source.kind(), source.kind().to_string()),
            }
        };
        let repo = hub.repo;
        let rev = hub.revision();
        let repo_dir = self.canonical.join(hub.folder_name());
        if !repo_dir.is_dir() {
            return Err(not_cached(format!(
                "{repo} is not in the Hugging Face cache (no {} folder); ladle never \
                 downloads: fetch it first (e.g. `hf download {repo} --revision {rev}`)",
                hub.folder_name()
            )));
        }
        let commit = if is_commit(rev) {
            rev.to_string()
        } else {
            let ref_file = Path::new(&hub.folder_name()).join("refs").join(rev);
            match self.read_ref(&ref_file) {
                Ok(Some(commit)) => commit,
                Ok(None) => {
                    return Err(not_cached(format!(
                        "refs/{rev} of {repo} in the Hugging Face cache does not hold a \
                         commit hash"
                    )));
                }
                Err(e) if is_missing(&e) => {
                    return Err(not_cached(format!(
                        "revision {rev:?} of {repo} is not in the Hugging Face cache (cached \
                         refs: {}); ladle never downloads: fetch it first (e.g. `hf download \
                         {repo} --revision {rev}`)",
                        cached_refs(&repo_dir.join("refs"))
                    )));
                }
                Err(e) if super::local::is_escape(&e) => {
                    tracing::warn!(
                        model = written,
                        "refused: a cache ref is a link that leads outside the cache"
                    );
                    return Err(StorageError::OutsideRoots {
                        path: written.to_string(),
                    });
                }
                Err(source) => return Err(io(source)),
            }
        };
        let snapshot = repo_dir.join("snapshots").join(&commit);
        if !snapshot.is_dir() {
            return Err(not_cached(format!(
                "revision {rev:?} of {repo} (commit {commit}) has no snapshot in the Hugging \
                 Face cache; ladle never downloads: fetch it first (e.g. `hf download {repo} \
                 --revision {rev}`)"
            )));
        }
        let real = std::fs::canonicalize(&snapshot).map_err(io)?;
        if !real.starts_with(&self.canonical) {
            tracing::warn!(
                model = written,
                "refused: a cache snapshot leads outside the cache"
            );
            return Err(StorageError::OutsideRoots {
                path: written.to_string(),
            });
        }
        self.check_links(written, &real)?;
        Ok(real)
    }

    /// The commit hash the ref file `rel` (relative to the cache) holds (`None`: something
    /// else); at most a few hundred bytes read. Opened from a handle of the cache folder, as
    /// every other cache file: a ref that is a link leading out of the cache is refused (an
    /// error [`super::local::is_escape`] recognises), never read.
    fn read_ref(&self, rel: &Path) -> std::io::Result<Option<String>> {
        let cache =
            cap_std::fs::Dir::open_ambient_dir(&self.canonical, cap_std::ambient_authority())?;
        let mut options = cap_std::fs::OpenOptions::new();
        // Non-blocking, so that a FIFO planted as a ref cannot hang the lookup.
        options
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32);
        let file = cache.open_with(rel, &options)?;
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not a regular file",
            ));
        }
        let mut text = String::new();
        file.into_std().take(256).read_to_string(&mut text)?;
        let commit = text.trim();
        Ok(is_commit(commit).then(|| commit.to_string()))
    }

    /// Every symbolic link under `snapshot` must lead inside the cache (a dangling one is
    /// left to the checkpoint reader: a missing blob is a missing file).
    fn check_links(&self, written: &str, snapshot: &Path) -> Result<(), StorageError> {
        let mut stack = vec![(snapshot.to_path_buf(), 0usize)];
        let mut seen = 0usize;
        while let Some((dir, depth)) = stack.pop() {
            let entries = std::fs::read_dir(&dir).map_err(|source| {
                tracing::warn!(model = written, error = %source, "listing a cache snapshot failed");
                StorageError::Io {
                    path: written.to_string(),
                    source: std::io::Error::new(source.kind(), source.kind().to_string()),
                }
            })?;
            for entry in entries {
                seen += 1;
                if seen > MAX_SNAPSHOT_ENTRIES {
                    return Err(StorageError::NotAllowed {
                        uri: written.to_string(),
                        reason: format!(
                            "the cache snapshot has more than {MAX_SNAPSHOT_ENTRIES} entries"
                        ),
                    });
                }
                let Ok(entry) = entry else { continue };
                let path = entry.path();
                let Ok(ft) = entry.file_type() else { continue };
                if ft.is_symlink() {
                    if let Ok(real) = std::fs::canonicalize(&path)
                        && !real.starts_with(&self.canonical)
                    {
                        let rel = path.strip_prefix(snapshot).unwrap_or(&path);
                        tracing::warn!(
                            model = written,
                            file = %rel.display(),
                            "refused: a cache snapshot's link leads outside the cache"
                        );
                        return Err(StorageError::OutsideRoots {
                            path: format!("{written}: {}", rel.display()),
                        });
                    }
                } else if ft.is_dir() && depth < MAX_SNAPSHOT_DEPTH {
                    stack.push((path, depth + 1));
                }
            }
        }
        Ok(())
    }
}

fn is_missing(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

/// The ref names in `refs/` (sorted, the first 20), for a message.
fn cached_refs(refs: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(refs)
        .map(|it| {
            it.filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        return "none".into();
    }
    names.sort();
    names.truncate(20);
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn hub_ids_by_shape() {
        let r = HubRef::parse("mistralai/Mistral-7B-v0.1").unwrap();
        assert_eq!(r.repo, "mistralai/Mistral-7B-v0.1");
        assert_eq!(r.revision(), "main");
        assert_eq!(r.folder_name(), "models--mistralai--Mistral-7B-v0.1");
        let r = HubRef::parse("org/name@refs/pr/1").unwrap();
        assert_eq!(r.revision, Some("refs/pr/1"));
        for not in [
            "name",
            "a/b/c",
            "/abs/path",
            "./rel",
            "../up/x",
            "org/",
            "/name",
            "org/name@",
            "org/name@a@b",
            "org/name@../x",
            "org/name@a//b",
            "org/-x",
            "org/x.",
            "org/a--b",
            "org/a..b",
            "file:///x/y",
            "s3://b/k",
            "org/na me",
        ] {
            assert_eq!(HubRef::parse(not), None, "{not}");
        }
    }

    #[test]
    fn snapshot_lookup_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("hub");
        let repo = cache.join("models--org--m");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
        std::fs::write(repo.join("blobs/b1"), b"x").unwrap();
        std::fs::write(repo.join("refs/main"), commit).unwrap();
        std::os::unix::fs::symlink(
            "../../blobs/b1",
            repo.join("snapshots").join(commit).join("config.json"),
        )
        .unwrap();
        let hf = HfCache::new(&cache).unwrap();
        let want = std::fs::canonicalize(repo.join("snapshots").join(commit)).unwrap();
        for id in ["org/m", "org/m@main"] {
            let got = hf.snapshot(id, &HubRef::parse(id).unwrap()).unwrap();
            assert_eq!(got, want, "{id}");
        }
        let by_commit = format!("org/m@{commit}");
        assert_eq!(
            hf.snapshot(&by_commit, &HubRef::parse(&by_commit).unwrap())
                .unwrap(),
            want
        );
        let err = |id: &str| hf.snapshot(id, &HubRef::parse(id).unwrap()).unwrap_err();
        let e = err("org/other");
        assert_eq!(e.code(), ErrorCode::ModelNotCached);
        assert!(e.to_string().contains("org/other"), "{e}");
        let e = err("org/m@v2");
        assert_eq!(e.code(), ErrorCode::ModelNotCached);
        assert!(
            e.to_string().contains("\"v2\"") && e.to_string().contains("cached refs: main"),
            "{e}"
        );
        let e = err("org/m@ffffffffffffffffffffffffffffffffffffffff");
        assert_eq!(e.code(), ErrorCode::ModelNotCached);
        // A ref that is a link out of the cache is not read, even when it holds the commit of
        // a cached (and clean) snapshot; nor is the cache's folder named in any refusal.
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::write(elsewhere.path().join("ref"), commit).unwrap();
        std::os::unix::fs::symlink(elsewhere.path().join("ref"), repo.join("refs/evil")).unwrap();
        let e = err("org/m@evil");
        assert_eq!(e.code(), ErrorCode::PathOutsideRoots, "{e}");
        assert!(e.to_string().contains("org/m@evil"), "{e}");
        for e in [e, err("org/other"), err("org/m@v2")] {
            assert!(!e.to_string().contains(&*cache.to_string_lossy()), "{e}");
        }
        // A link out of the cache, anywhere in the snapshot.
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("secret"),
            repo.join("snapshots")
                .join(commit)
                .join("model.safetensors"),
        )
        .unwrap();
        let e = err("org/m");
        assert_eq!(e.code(), ErrorCode::PathOutsideRoots);
        assert!(e.to_string().contains("model.safetensors"), "{e}");
        assert!(
            !e.to_string().contains(&*outside.path().to_string_lossy()),
            "{e}"
        );
    }
}

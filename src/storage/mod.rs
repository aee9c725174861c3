//! Storage URLs → `object_store` locations, under the configured allowed roots.
//!
//! Every URL a job names goes through [`Storage::resolve`], which is the one place that decides
//! whether ladle may touch it: the scheme must be `file` or `s3`, the path must not contain
//! traversal segments (`..`, `.`, or their percent-encoded forms), and the location, after
//! symlinks are resolved for local files, must fall under an allowed root.
//!
//! That check on the URL's text is only the first gate for local files: every later open,
//! listing, write, rename and delete goes through [`local::LocalStore`], which reaches files
//! from a directory handle of the root and refuses a symbolic link that leaves it
//! (`path_outside_roots`), so nothing swapped in after the check can redirect ladle.
//!
//! A model reference shaped as a Hugging Face hub id (`org/name`, `org/name@revision`: no
//! scheme) is looked up in the configured local cache ([`hf_cache`]) and resolves to its
//! snapshot folder, which then passes the same checks as any `file://` URL.
//!
//! A [`Location`] is reached by its resolved path but named by the URL as written
//! ([`Location::url`]; its store's messages too, [`local::LocalStore::shown_as`]): a link inside
//! a root, a root configured as a link, or a hub id's cache folder is never shown. The resolved
//! URL ([`Location::canonical`]) only compares places (one live job per output folder).

pub mod hf_cache;
pub mod list;
pub mod local;
pub mod probe;

use std::collections::HashMap;
use std::path::{Component, Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use url::Url;

use crate::error::ErrorCode;

/// S3 connection settings. Unset fields fall back to the standard `AWS_*` environment
/// variables (`AWS_ENDPOINT`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, ...), so any S3-compatible
/// server works.
#[derive(Debug, Clone, Default)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Allow plain `http://` endpoints (local servers).
    pub allow_http: Option<bool>,
    /// Virtual-hosted-style addressing (`bucket.endpoint`); default path style.
    pub virtual_hosted_style: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("invalid URL {uri:?}: {reason}")]
    InvalidUri { uri: String, reason: String },
    #[error("URL {uri:?} is not allowed: {reason}")]
    NotAllowed { uri: String, reason: String },
    /// A symbolic link on the way leaves the allowed root (`path` as the user wrote it).
    #[error("{path} leads outside the allowed roots (through a symbolic link)")]
    OutsideRoots { path: String },
    #[error("object storage error: {0}")]
    ObjectStore(#[from] object_store::Error),
    /// A hub id the local Hugging Face cache does not hold (model, revision or snapshot), or
    /// no cache is configured. ladle never downloads.
    #[error("{model}: {reason}")]
    ModelNotCached { model: String, reason: String },
    #[error("local file system error at {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl StorageError {
    pub fn code(&self) -> ErrorCode {
        match self {
            StorageError::InvalidUri { .. } => ErrorCode::InvalidUri,
            StorageError::NotAllowed { .. } => ErrorCode::StorageNotAllowed,
            StorageError::OutsideRoots { .. } => ErrorCode::PathOutsideRoots,
            StorageError::ModelNotCached { .. } => ErrorCode::ModelNotCached,
            StorageError::ObjectStore(e) if local::outside_roots(e).is_some() => {
                ErrorCode::PathOutsideRoots
            }
            StorageError::ObjectStore(object_store::Error::NotFound { .. }) => {
                ErrorCode::CheckpointNotFound
            }
            StorageError::ObjectStore(_) | StorageError::Io { .. } => ErrorCode::StorageError,
        }
    }
}

/// A resolved, allowed location.
#[derive(Clone)]
pub struct Location {
    /// The URL as the request wrote it (a trailing `/` dropped; a hub id as written), with the
    /// names of children appended: what messages, manifests, events and stored recipes show.
    /// A link inside a root on the way, or the resolved folder of a hub id, is never shown.
    pub url: String,
    /// The same place resolved: links followed, the URL normalized (no trailing slash). Only
    /// for comparing places (one active job per output, an output apart from its inputs, the
    /// data directory); never shown to a user.
    pub canonical: String,
    pub store: Arc<dyn ObjectStore>,
    /// The object path inside `store` (a file, or a folder prefix).
    pub path: Path,
    /// The same store as `store` when the location is local (`file://`): for mapped reads
    /// and clean-up through its handles.
    pub local: Option<local::LocalStore>,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Location")
            .field("url", &self.url)
            .field("path", &self.path)
            .finish()
    }
}

impl Location {
    /// A child of this folder location (one plain file name).
    pub fn child(&self, name: &str) -> Location {
        Location {
            url: format!("{}/{}", self.url, name),
            canonical: format!("{}/{}", self.canonical, name),
            store: self.store.clone(),
            path: self.path.clone().join(name),
            local: self.local.clone(),
        }
    }

    /// This folder held by one directory handle, taken now ([`local::LocalStore::pin_dir`]):
    /// the returned location (and every [`Location::child`] of it) creates, renames, lists and
    /// removes through that handle only, so the folder cannot be swapped for a link (or moved)
    /// underneath a job. `create`: make the folder if it is missing. An S3 location is
    /// returned as it is (objects have no folders to swap).
    pub fn pinned(&self, create: bool) -> Result<Location, StorageError> {
        let Some(local) = &self.local else {
            return Ok(self.clone());
        };
        let held =
            local
                .pin_dir(&self.path, create)
                .map_err(|e| match local::outside_roots(&e) {
                    Some(o) => StorageError::OutsideRoots {
                        path: o.path.clone(),
                    },
                    None => StorageError::ObjectStore(e),
                })?;
        Ok(Location {
            url: self.url.clone(),
            canonical: self.canonical.clone(),
            store: Arc::new(held.clone()),
            path: self.path.clone(),
            local: Some(held),
        })
    }

    /// Another path in the same store, under the same URL (for messages).
    pub fn with_path(&self, path: Path) -> Location {
        Location {
            url: self.url.clone(),
            canonical: self.canonical.clone(),
            store: self.store.clone(),
            path,
            local: self.local.clone(),
        }
    }
}

/// One allowed root, in canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Root {
    /// A directory: canonical, and as configured (absolute).
    File {
        canonical: PathBuf,
        written: PathBuf,
    },
    /// A bucket and a key prefix (segments, may be empty for the whole bucket).
    S3 { bucket: String, prefix: Vec<String> },
}

/// Resolves URLs to object stores, enforcing the allowed roots.
pub struct Storage {
    /// `None`: no restriction (the one-shot CLI run as the invoking user).
    roots: Option<Vec<Root>>,
    s3: S3Settings,
    s3_stores: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
    /// Every local root (`/` when unrestricted), reached by handle.
    local: local::LocalStore,
    /// Where hub ids are looked up (`None`: they are refused, `model_not_cached`).
    hf_cache: Option<hf_cache::HfCache>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("roots", &self.roots)
            .finish()
    }
}

impl Storage {
    /// `allowed_roots`: URLs (`file:///…`, `s3://bucket/prefix`) or absolute/relative local
    /// paths. `None` disables the check entirely (only for the one-shot CLI).
    pub fn new(allowed_roots: Option<&[String]>, s3: S3Settings) -> Result<Self, StorageError> {
        let roots = match allowed_roots {
            None => None,
            Some(list) => Some(
                list.iter()
                    .map(|r| parse_root(r))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let local_roots = match &roots {
            None => vec![PathBuf::from("/")],
            Some(roots) => roots
                .iter()
                .filter_map(|r| match r {
                    Root::File { canonical, .. } => Some(canonical.clone()),
                    Root::S3 { .. } => None,
                })
                .collect(),
        };
        Ok(Storage {
            roots,
            s3,
            s3_stores: Mutex::new(HashMap::new()),
            local: local::LocalStore::new(local_roots),
            hf_cache: None,
        })
    }

    /// Resolve hub ids from `cache` (it is not made an allowed root here: the service adds a
    /// configured cache to its roots, `config::Settings`).
    pub fn with_hf_cache(mut self, cache: Option<hf_cache::HfCache>) -> Self {
        self.hf_cache = cache;
        self
    }

    /// The Hugging Face cache hub ids are looked up in, if any.
    pub fn hf_cache(&self) -> Option<&hf_cache::HfCache> {
        self.hf_cache.as_ref()
    }

    /// The allowed roots as URLs (for `/readyz` and error messages).
    pub fn allowed_roots(&self) -> Vec<String> {
        match &self.roots {
            None => vec!["*".to_string()],
            Some(roots) => roots.iter().map(root_url).collect(),
        }
    }

    /// Resolve a URL a job names. Checks syntax, scheme, traversal and allowed roots. A hub
    /// id (`org/name[@revision]`) is its cache snapshot's folder (messages name the id).
    pub fn resolve(&self, uri: &str) -> Result<Location, StorageError> {
        if let Some(hub) = hf_cache::HubRef::parse(uri) {
            return self.resolve_hub(uri, &hub);
        }
        self.resolve_storage(uri)
    }

    /// [`Storage::resolve`] of a URL that must name storage (`file://`, `s3://`), never a
    /// Hugging Face hub id: an output, which is written (a hub id is read from the cache only).
    pub fn resolve_storage(&self, uri: &str) -> Result<Location, StorageError> {
        let invalid = |reason: &str| StorageError::InvalidUri {
            uri: uri.to_string(),
            reason: reason.to_string(),
        };
        reject_traversal(uri)?;
        let url = Url::parse(uri).map_err(|e| invalid(&e.to_string()))?;
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid("query strings and fragments are not allowed"));
        }
        match url.scheme() {
            "file" => self.resolve_file(uri, &url),
            "s3" | "s3a" => self.resolve_s3(uri, &url),
            other => Err(invalid(&format!(
                "scheme {other:?} is not supported (use file:// or s3://)"
            ))),
        }
    }

    fn resolve_hub(&self, uri: &str, hub: &hf_cache::HubRef<'_>) -> Result<Location, StorageError> {
        let cache = self
            .hf_cache
            .as_ref()
            .ok_or_else(|| StorageError::ModelNotCached {
                model: uri.to_string(),
                reason: "not a storage URL, so read as a Hugging Face hub id; no Hugging Face \
                         cache is configured (--hf-cache, LADLE_HF_CACHE or the config key \
                         hf_cache), and ladle never downloads models"
                    .into(),
            })?;
        let dir = cache.snapshot(uri, hub)?;
        let url = Url::from_directory_path(&dir).map_err(|()| StorageError::InvalidUri {
            uri: uri.to_string(),
            reason: "the cache snapshot is not an absolute local path".into(),
        })?;
        self.resolve_file(uri, &url)
    }

    fn resolve_file(&self, uri: &str, url: &Url) -> Result<Location, StorageError> {
        if url
            .host_str()
            .is_some_and(|h| !h.is_empty() && h != "localhost")
        {
            return Err(StorageError::InvalidUri {
                uri: uri.to_string(),
                reason: "file URLs must not name a host".into(),
            });
        }
        let path = url.to_file_path().map_err(|()| StorageError::InvalidUri {
            uri: uri.to_string(),
            reason: "not an absolute local path".into(),
        })?;
        // A path that cannot be resolved (a file used as a folder, a symlink loop, a name too
        // long, no permission) is the request's fault: 400, never a 5xx at submit time.
        let canonical = canonicalize_lenient(&path).map_err(|e| StorageError::InvalidUri {
            uri: uri.to_string(),
            reason: format!("cannot resolve the path: {e}"),
        })?;
        if let Some(roots) = &self.roots {
            let inside = roots.iter().any(|r| match r {
                Root::File {
                    canonical: root, ..
                } => canonical.starts_with(root),
                Root::S3 { .. } => false,
            });
            if !inside {
                // Written inside a root, but a link on the way leads out: say so, without
                // naming where the link leads.
                let written_inside = roots.iter().any(|r| match r {
                    Root::File {
                        canonical: root,
                        written,
                    } => path.starts_with(root) || path.starts_with(written),
                    Root::S3 { .. } => false,
                });
                if written_inside {
                    tracing::warn!(
                        uri,
                        "refused: a symbolic link leads outside the allowed roots"
                    );
                    return Err(StorageError::OutsideRoots {
                        path: uri.to_string(),
                    });
                }
                return Err(StorageError::NotAllowed {
                    uri: uri.to_string(),
                    reason: format!(
                        "outside the allowed roots ({})",
                        self.allowed_roots().join(", ")
                    ),
                });
            }
        }
        let object_path =
            Path::from_absolute_path(&canonical).map_err(|e| StorageError::InvalidUri {
                uri: uri.to_string(),
                reason: e.to_string(),
            })?;
        let canonical = Url::from_file_path(&canonical)
            .map(|u| u.to_string())
            .unwrap_or_else(|()| uri.to_string());
        // Reached by the resolved path, named as written: the store's messages too.
        let shown = uri.trim_end_matches('/').to_string();
        let local = self.local.shown_as(&object_path, &shown);
        Ok(Location {
            url: shown,
            canonical: canonical.trim_end_matches('/').to_string(),
            store: Arc::new(local.clone()),
            path: object_path,
            local: Some(local),
        })
    }

    fn resolve_s3(&self, uri: &str, url: &Url) -> Result<Location, StorageError> {
        let bucket = url.host_str().unwrap_or_default().to_string();
        if bucket.is_empty() {
            return Err(StorageError::InvalidUri {
                uri: uri.to_string(),
                reason: "an s3:// URL must name a bucket".into(),
            });
        }
        let segments = key_segments(url);
        if let Some(roots) = &self.roots {
            let inside = roots.iter().any(|r| match r {
                Root::S3 {
                    bucket: b,
                    prefix: p,
                } => *b == bucket && segments.starts_with(p),
                Root::File { .. } => false,
            });
            if !inside {
                return Err(StorageError::NotAllowed {
                    uri: uri.to_string(),
                    reason: format!(
                        "outside the allowed roots ({})",
                        self.allowed_roots().join(", ")
                    ),
                });
            }
        }
        let store = self.s3_store(&bucket)?;
        let path = Path::from_iter(segments.iter().map(String::as_str));
        Ok(Location {
            url: uri.trim_end_matches('/').to_string(),
            canonical: format!("s3://{bucket}/{}", segments.join("/"))
                .trim_end_matches('/')
                .to_string(),
            store,
            path,
            local: None,
        })
    }

    fn s3_store(&self, bucket: &str) -> Result<Arc<dyn ObjectStore>, StorageError> {
        let mut stores = self
            .s3_stores
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(s) = stores.get(bucket) {
            return Ok(s.clone());
        }
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        let s = &self.s3;
        if let Some(v) = &s.endpoint {
            b = b.with_endpoint(v);
        }
        if let Some(v) = &s.region {
            b = b.with_region(v);
        }
        if let Some(v) = &s.access_key_id {
            b = b.with_access_key_id(v);
        }
        if let Some(v) = &s.secret_access_key {
            b = b.with_secret_access_key(v);
        }
        if let Some(v) = s.allow_http {
            b = b.with_allow_http(v);
        }
        if let Some(v) = s.virtual_hosted_style {
            b = b.with_virtual_hosted_style_request(v);
        }
        let store: Arc<dyn ObjectStore> = Arc::new(b.build()?);
        stores.insert(bucket.to_string(), store.clone());
        Ok(store)
    }
}

/// The key of an s3 URL as decoded, non-empty segments.
fn key_segments(url: &Url) -> Vec<String> {
    url.path()
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_decode(s)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_else(|| s.to_string())
        })
        .collect()
}

fn root_url(root: &Root) -> String {
    match root {
        Root::File { written, .. } => format!("file://{}", written.display()),
        Root::S3 { bucket, prefix } => format!("s3://{bucket}/{}", prefix.join("/")),
    }
}

fn parse_root(raw: &str) -> Result<Root, StorageError> {
    let invalid = |reason: String| StorageError::InvalidUri {
        uri: raw.to_string(),
        reason,
    };
    reject_traversal(raw)?;
    let path = if raw.contains("://") {
        let url = Url::parse(raw).map_err(|e| invalid(e.to_string()))?;
        match url.scheme() {
            "file" => url
                .to_file_path()
                .map_err(|()| invalid("not an absolute local path".into()))?,
            "s3" | "s3a" => {
                let bucket = url.host_str().unwrap_or_default().to_string();
                if bucket.is_empty() {
                    return Err(invalid("an s3:// root must name a bucket".into()));
                }
                return Ok(Root::S3 {
                    prefix: key_segments(&url),
                    bucket,
                });
            }
            other => return Err(invalid(format!("unsupported scheme {other:?}"))),
        }
    } else {
        std::path::absolute(raw).map_err(|e| invalid(e.to_string()))?
    };
    let canonical = canonicalize_lenient(&path).map_err(|source| StorageError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Ok(Root::File {
        canonical,
        written: path,
    })
}

/// Reject `..`/`.` segments (also percent-encoded), encoded slashes, backslashes and NULs
/// before any URL parser gets a chance to normalize them away.
fn reject_traversal(uri: &str) -> Result<(), StorageError> {
    let bad = |reason: &str| StorageError::NotAllowed {
        uri: uri.to_string(),
        reason: reason.to_string(),
    };
    if uri.contains('\\') || uri.contains('\0') {
        return Err(bad("backslashes and NUL characters are not allowed"));
    }
    let rest = uri.split_once("://").map(|(_, r)| r).unwrap_or(uri);
    for segment in rest.split('/') {
        let decoded = percent_decode(segment).ok_or_else(|| bad("invalid percent-encoding"))?;
        if decoded.contains(&b'/') || decoded.contains(&b'\\') || decoded.contains(&0) {
            return Err(bad("encoded slashes or NULs are not allowed"));
        }
        if decoded == b".." || decoded == b"." {
            return Err(bad("path traversal segments (`..`, `.`) are not allowed"));
        }
    }
    Ok(())
}

/// Decode `%XX` escapes; `None` on a malformed escape.
pub(crate) fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let text = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(text, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Canonicalize the longest existing ancestor (resolving symlinks) and append the rest, so a
/// location that does not exist yet (an output folder) is still checked against its real
/// parent. Non-normal components in the remainder are refused.
fn canonicalize_lenient(path: &FsPath) -> std::io::Result<PathBuf> {
    let mut existing = path.to_path_buf();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    loop {
        match std::fs::canonicalize(&existing) {
            Ok(mut canonical) => {
                for part in rest.iter().rev() {
                    canonical.push(part);
                }
                return Ok(canonical);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let name = existing.file_name().map(|n| n.to_os_string());
                let parent = existing.parent().map(|p| p.to_path_buf());
                match (name, parent) {
                    (Some(name), Some(parent)) => {
                        if FsPath::new(&name)
                            .components()
                            .any(|c| !matches!(c, Component::Normal(_)))
                        {
                            return Err(std::io::Error::other("non-normal path component"));
                        }
                        rest.push(name);
                        existing = parent;
                    }
                    _ => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(roots: &[String]) -> Storage {
        Storage::new(Some(roots), S3Settings::default()).unwrap()
    }

    #[test]
    fn file_inside_root_is_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let root = format!("file://{}", dir.path().display());
        let s = storage(&[root]);
        let loc = s
            .resolve(&format!("file://{}/a/b/", dir.path().display()))
            .unwrap();
        assert!(loc.url.ends_with("/a/b"), "{}", loc.url);
    }

    #[test]
    fn traversal_is_rejected_in_every_spelling() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let s = storage(&[d.to_string()]);
        for uri in [
            format!("file://{d}/../etc/passwd"),
            format!("file://{d}/%2e%2e/etc/passwd"),
            format!("file://{d}/%2E%2e/x"),
            format!("file://{d}/./x"),
            format!("file://{d}/a%2fb"),
            "s3://bucket/a/../b".to_string(),
        ] {
            let err = s.resolve(&uri).unwrap_err();
            assert_eq!(err.code(), ErrorCode::StorageNotAllowed, "{uri}: {err}");
        }
    }

    #[test]
    fn outside_root_and_bad_scheme_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage(&[format!("{}", dir.path().display())]);
        let e = s.resolve("file:///etc/passwd").unwrap_err();
        assert_eq!(e.code(), ErrorCode::StorageNotAllowed);
        let e = s.resolve("http://example.com/x").unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidUri);
        let e = s.resolve("s3://bucket/x").unwrap_err();
        assert_eq!(e.code(), ErrorCode::StorageNotAllowed);
        let e = s.resolve("not a url").unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidUri);
    }

    #[test]
    fn symlink_escape_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let link = dir.path().join("escape");
        std::os::unix::fs::symlink(outside.path(), &link).unwrap();
        let s = storage(&[format!("{}", dir.path().display())]);
        let uri = format!("file://{}/model.safetensors", link.display());
        let e = s.resolve(&uri).unwrap_err();
        assert_eq!(e.code(), ErrorCode::PathOutsideRoots, "{e}");
        // The message names the file as written, never where the link leads.
        let text = e.to_string();
        assert!(text.contains(&uri), "{text}");
        assert!(!text.contains(&*outside.path().to_string_lossy()), "{text}");
        // a root that is a prefix string but not a parent directory does not count
        let sibling = format!("{}-evil", dir.path().display());
        let e = s.resolve(&format!("file://{sibling}/x")).unwrap_err();
        assert_eq!(e.code(), ErrorCode::StorageNotAllowed);
    }

    #[test]
    fn s3_prefix_roots_match_whole_segments() {
        let s = storage(&["s3://ckpts/team-a".to_string()]);
        assert!(s.resolve("s3://ckpts/team-a/run/1").is_ok());
        assert!(s.resolve("s3://ckpts/team-a").is_ok());
        let e = s.resolve("s3://ckpts/team-ab/x").unwrap_err();
        assert_eq!(e.code(), ErrorCode::StorageNotAllowed);
        let e = s.resolve("s3://other/team-a/x").unwrap_err();
        assert_eq!(e.code(), ErrorCode::StorageNotAllowed);
    }
}

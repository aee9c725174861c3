//! How the local store names files in messages (moved out of `storage/local.rs`): as the
//! request wrote the URL of the location they were reached from, never by the path a link
//! inside the root resolved to, nor by a hub id's cache folder.

use object_store::path::Path;

use super::{outside_roots, part_name};

/// For an [`OutsideRoots`] met while listing the folder `listed` (its URL, as the location
/// names it: [`super::Location::url`]): `Some(Some(entry))`, the entry that leads out,
/// relative to `listed` and decoded (`sub/file`); `Some(None)`, the folder itself; `None` for
/// any other error.
pub fn outside_entry(e: &object_store::Error, listed: &str) -> Option<Option<String>> {
    let o = outside_roots(e)?;
    let rest = o.path.strip_prefix(listed).unwrap_or(&o.path);
    let rest = rest.trim_matches('/');
    if rest.is_empty() {
        return Some(None);
    }
    let decoded: Vec<String> = rest
        .split('/')
        .map(|p| part_name(p).to_string_lossy().into_owned())
        .collect();
    Some(Some(decoded.join("/")))
}

/// The object path a location resolved to, and the URL the request wrote for it: a file under
/// `prefix` is named in messages as `url` plus the rest of its path, so neither a link inside
/// the root on the way nor a hub id's cache folder is shown.
#[derive(Debug)]
pub(super) struct Shown {
    pub(super) prefix: Path,
    pub(super) url: String,
}

/// How a message names `location`: under the [`Shown`] prefix as the request wrote it, else
/// `file:///` and its path.
pub(super) fn shown_url(shown: Option<&Shown>, location: &Path) -> String {
    if let Some(s) = shown
        && let Some(rest) = location.prefix_match(&s.prefix)
    {
        let mut url = s.url.clone();
        for part in rest {
            url.push('/');
            url.push_str(part.as_ref());
        }
        return url;
    }
    format!("file:///{}", location.as_ref())
}

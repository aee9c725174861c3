//! Listing a folder's checkpoint subfolders (trajectory soups, `crate::recipe::trajectory`).
//!
//! Bounded: one delimiter listing of the folder, refused beyond `max` subfolders, then one
//! delimiter listing per subfolder (at most [`CONCURRENCY`] at a time) to see whether it holds
//! `model.safetensors` or `model.safetensors.index.json`.

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use url::Url;

use super::Location;
use crate::checkpoint::INDEX_FILE_NAME;
use crate::checkpoint::reader::SINGLE_FILE_NAME;

/// One immediate subfolder of a listed folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folder {
    pub name: String,
    /// Holds `model.safetensors` or `model.safetensors.index.json`.
    pub has_checkpoint: bool,
}

/// Subfolders checked at once.
pub const CONCURRENCY: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("{0}")]
    Store(#[from] object_store::Error),
    #[error("more than {max} subfolders; point at a narrower folder")]
    TooMany { max: usize },
    /// An entry of the folder (`entry`, relative to it: `checkpoint-3` or
    /// `checkpoint-3/model.safetensors`; `None`: the folder itself) is a symbolic link that
    /// leaves the allowed roots. The whole listing is refused: leaving the entry out would
    /// silently change which checkpoints a selection picks.
    #[error("a symbolic link in the folder leads outside the allowed roots")]
    Outside { entry: Option<String> },
}

fn prefix(path: &Path) -> Option<&Path> {
    (!path.as_ref().is_empty()).then_some(path)
}

/// A listing error of `listed` (a folder's URL, as its location names it): the link out named by the entry's
/// own name (never the resolved path), anything else as it is.
fn listing_error(listed: &str, e: object_store::Error) -> ListError {
    match crate::storage::local::outside_entry(&e, listed) {
        Some(entry) => ListError::Outside { entry },
        None => ListError::Store(e),
    }
}

/// The immediate subfolders of `loc` (objects directly in it are ignored), sorted by name, each
/// with whether it holds a safetensors checkpoint.
pub async fn subfolders(loc: &Location, max: usize) -> Result<Vec<Folder>, ListError> {
    let listing = loc
        .store
        .list_with_delimiter(prefix(&loc.path))
        .await
        .map_err(|e| listing_error(&loc.url, e))?;
    if listing.common_prefixes.len() > max {
        return Err(ListError::TooMany { max });
    }
    let mut folders: Vec<Folder> = futures::stream::iter(listing.common_prefixes)
        .map(|sub| async move {
            let name = sub.filename().unwrap_or_default().to_string();
            let inner = loc
                .store
                .list_with_delimiter(Some(&sub))
                .await
                // Named from the listed folder: `<subfolder>/<file>`.
                .map_err(|e| listing_error(&loc.url, e))?;
            let has_checkpoint = inner.objects.iter().any(|o| {
                matches!(o.location.filename(), Some(f) if f == SINGLE_FILE_NAME || f == INDEX_FILE_NAME)
            });
            Ok::<_, ListError>(Folder {
                name,
                has_checkpoint,
            })
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    folders.retain(|f| !f.name.is_empty());
    folders.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(folders)
}

/// The URL of child `name` of the folder URL `folder` (`file://…` or `s3://…`), with the name
/// percent-encoded as one path segment.
pub fn child_url(folder: &str, name: &str) -> Result<String, String> {
    let mut url = Url::parse(folder).map_err(|e| e.to_string())?;
    url.path_segments_mut()
        .map_err(|()| "not a hierarchical URL".to_string())?
        .pop_if_empty()
        .push(name);
    Ok(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_urls_encode_one_segment() {
        assert_eq!(
            child_url("file:///d/run", "checkpoint-100").unwrap(),
            "file:///d/run/checkpoint-100"
        );
        assert_eq!(
            child_url("s3://b/run/", "step 5%").unwrap(),
            "s3://b/run/step%205%25"
        );
        assert_eq!(child_url("s3://b", "c-1").unwrap(), "s3://b/c-1");
    }

    #[tokio::test]
    async fn lists_checkpoint_subfolders_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (sub, file) in [
            ("checkpoint-2", "model.safetensors"),
            ("checkpoint-1", "model.safetensors.index.json"),
            ("logs", "events.txt"),
        ] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
            std::fs::write(d.join(sub).join(file), b"x").unwrap();
        }
        std::fs::write(d.join("junk.txt"), b"x").unwrap();
        let storage = super::super::Storage::new(None, Default::default()).unwrap();
        let loc = storage.resolve(&format!("file://{}", d.display())).unwrap();
        let got = subfolders(&loc, 10).await.unwrap();
        let want = [
            ("checkpoint-1", true),
            ("checkpoint-2", true),
            ("logs", false),
        ];
        assert_eq!(got.len(), 3);
        for (f, (n, has)) in got.iter().zip(want) {
            assert_eq!((f.name.as_str(), f.has_checkpoint), (n, has));
        }
        assert!(matches!(
            subfolders(&loc, 2).await,
            Err(ListError::TooMany { max: 2 })
        ));
    }

    /// A checkpoint folder, or a file in one, linked out of the roots: the listing is refused
    /// naming the entry (decoded, relative to the listed folder), never the link's target.
    #[tokio::test]
    async fn a_link_out_refuses_the_listing_naming_the_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(tmp.path()).unwrap();
        let (root, outside) = (base.join("root"), base.join("outside"));
        let run = root.join("run");
        std::fs::create_dir_all(run.join("checkpoint-1")).unwrap();
        std::fs::write(run.join("checkpoint-1/model.safetensors"), b"x").unwrap();
        std::fs::create_dir_all(outside.join("private")).unwrap();
        std::fs::write(outside.join("private/model.safetensors"), b"p").unwrap();
        let storage =
            super::super::Storage::new(Some(&[root.display().to_string()]), Default::default())
                .unwrap();
        let loc = storage
            .resolve(&format!("file://{}", run.display()))
            .unwrap();
        std::os::unix::fs::symlink(outside.join("private"), run.join("step 2")).unwrap();
        match subfolders(&loc, 10).await {
            Err(ListError::Outside { entry }) => assert_eq!(entry.as_deref(), Some("step 2")),
            other => panic!("{other:?}"),
        }
        std::fs::remove_file(run.join("step 2")).unwrap();
        std::fs::create_dir_all(run.join("step 2")).unwrap();
        std::os::unix::fs::symlink(
            outside.join("private/model.safetensors"),
            run.join("step 2/model.safetensors"),
        )
        .unwrap();
        match subfolders(&loc, 10).await {
            Err(ListError::Outside { entry }) => {
                assert_eq!(entry.as_deref(), Some("step 2/model.safetensors"))
            }
            other => panic!("{other:?}"),
        }
        // A link that stays inside the root is a checkpoint like any other.
        std::fs::remove_file(run.join("step 2/model.safetensors")).unwrap();
        std::os::unix::fs::symlink(
            "../checkpoint-1/model.safetensors",
            run.join("step 2/model.safetensors"),
        )
        .unwrap();
        let got = subfolders(&loc, 10).await.unwrap();
        assert!(got.iter().all(|f| f.has_checkpoint), "{got:?}");
    }
}

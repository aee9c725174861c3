//! Where an output may go, checked when a merge is submitted (the API and `ladle merge`).
//!
//! - Never the service's data directory or a folder inside it (that is where ladle keeps its
//!   database): `storage_not_allowed`.
//! - Never a folder holding files that no ladle manifest claims, unless the recipe says
//!   `"output": {"overwrite": true}`: `output_not_empty`. Claimed are the files a manifest
//!   there lists, the manifest, and ladle's own `.ladle-staging/`, `.ladle-claim.json` and
//!   `.ladle-scratch/`; a folder with a claim but no manifest is a publication under way (or
//!   one that died), which the engine settles when the job runs. `overwrite` never deletes or
//!   replaces a file: the publish protocol only creates names that are free.

use std::collections::HashSet;
use std::path::Path as FsPath;

use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};

use super::EngineError;
use super::manifest::{self, MANIFEST_NAME};
use super::publish::{CLAIM_NAME, STAGING_DIR};
use crate::search::run::SCRATCH_DIR;
use crate::storage::{Location, Storage, StorageError};

/// How many foreign files a refusal names.
const NAMED: usize = 3;

/// Check the output rules for `output_uri` (as the request names it).
pub async fn check(
    storage: &Storage,
    output_uri: &str,
    overwrite: bool,
    data_dir: Option<&FsPath>,
) -> Result<(), EngineError> {
    let output = storage.resolve(output_uri)?;
    if let Some(dir) = data_dir {
        check_not_data_dir(&output, output_uri, dir)?;
    }
    if overwrite {
        return Ok(());
    }
    // A publication may finish while we look (manifest written, then the claim removed):
    // the claim first, then the manifest, and once more when foreign files turn up.
    let mut foreign = Vec::new();
    for _ in 0..3 {
        let claim = output.child(CLAIM_NAME);
        match claim.store.head(&claim.path).await {
            // Being published (or a publication that died): the engine decides.
            Ok(_) => return Ok(()),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(EngineError::Storage(StorageError::ObjectStore(e))),
        }
        let claimed: HashSet<String> = match manifest::read(&output).await? {
            Some(m) => m
                .files
                .into_iter()
                .map(|f| f.path)
                .chain([MANIFEST_NAME.to_string(), CLAIM_NAME.to_string()])
                .collect(),
            None => HashSet::new(),
        };
        foreign = foreign_files(&output, output_uri, &claimed).await?;
        if foreign.is_empty() {
            return Ok(());
        }
    }
    Err(EngineError::OutputNotEmpty(format!(
        "output.uri: {} holds files that no ladle manifest claims ({}); choose an empty \
         folder, or set output.overwrite to write beside them (they are never deleted or \
         replaced)",
        output_uri.trim_end_matches('/'),
        foreign.join(", ")
    )))
}

/// The output must not be the data directory or lie inside it.
fn check_not_data_dir(output: &Location, uri: &str, data_dir: &FsPath) -> Result<(), EngineError> {
    let Some(out) = url::Url::parse(&output.canonical)
        .ok()
        .filter(|u| u.scheme() == "file")
        .and_then(|u| u.to_file_path().ok())
    else {
        return Ok(());
    };
    let dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    if out.starts_with(&dir) {
        return Err(EngineError::Storage(StorageError::NotAllowed {
            uri: uri.to_string(),
            reason: "output.uri: the output must not be the service's data directory or a \
                     folder inside it (ladle keeps its database there)"
                .into(),
        }));
    }
    Ok(())
}

/// Up to [`NAMED`] files under `output` (relative names) that `claimed` and ladle's own
/// folders do not account for.
async fn foreign_files(
    output: &Location,
    output_uri: &str,
    claimed: &HashSet<String>,
) -> Result<Vec<String>, EngineError> {
    let store: &dyn ObjectStore = output.store.as_ref();
    let mut listing = store.list(Some(&output.path));
    let prefix = format!("{}/", output.path);
    let mut foreign = Vec::new();
    loop {
        let next = match listing.try_next().await {
            Ok(n) => n,
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => match crate::storage::local::outside_entry(&e, &output.url) {
                // A link in the folder that leads out of the roots is not ladle's: named as
                // the folder's entry, never by where it leads (the listing goes on).
                Some(Some(entry)) => {
                    foreign.push(entry);
                    if foreign.len() >= NAMED {
                        break;
                    }
                    continue;
                }
                Some(None) => {
                    return Err(EngineError::Storage(StorageError::OutsideRoots {
                        path: output_uri.trim_end_matches('/').to_string(),
                    }));
                }
                None => return Err(EngineError::Storage(StorageError::ObjectStore(e))),
            },
        };
        let Some(meta) = next else { break };
        let full = meta.location.to_string();
        let rel = full.strip_prefix(&prefix).unwrap_or(&full);
        let ours = claimed.contains(rel)
            || [STAGING_DIR, SCRATCH_DIR]
                .iter()
                .any(|d| rel.starts_with(&format!("{d}/")));
        if !ours {
            foreign.push(rel.to_string());
            if foreign.len() >= NAMED {
                break;
            }
        }
    }
    Ok(foreign)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::S3Settings;

    fn storage(root: &FsPath) -> Storage {
        Storage::new(Some(&[root.display().to_string()]), S3Settings::default()).unwrap()
    }

    #[tokio::test]
    async fn data_dir_and_foreign_files_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let s = storage(root);
        let data = root.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let url = |p: &FsPath| format!("file://{}", p.display());
        for out in [data.clone(), data.join("soups/x")] {
            let e = check(&s, &url(&out), false, Some(&data)).await.unwrap_err();
            assert_eq!(e.code(), crate::error::ErrorCode::StorageNotAllowed, "{e}");
            // overwrite does not lift it
            let e = check(&s, &url(&out), true, Some(&data)).await.unwrap_err();
            assert_eq!(e.code(), crate::error::ErrorCode::StorageNotAllowed, "{e}");
        }
        // an absent or empty folder, or one with only ladle's staging, is fine
        let out = root.join("out");
        check(&s, &url(&out), false, Some(&data)).await.unwrap();
        std::fs::create_dir_all(out.join(STAGING_DIR).join("j-1")).unwrap();
        std::fs::write(out.join(STAGING_DIR).join("j-1/model.safetensors"), b"x").unwrap();
        check(&s, &url(&out), false, Some(&data)).await.unwrap();
        // a user's file: refused, naming it; overwrite allows it
        std::fs::write(out.join("notes.txt"), b"mine").unwrap();
        let e = check(&s, &url(&out), false, None).await.unwrap_err();
        assert_eq!(e.code(), crate::error::ErrorCode::OutputNotEmpty, "{e}");
        assert!(e.to_string().contains("notes.txt"), "{e}");
        check(&s, &url(&out), true, None).await.unwrap();
        // a claim (a publication under way) defers to the engine
        std::fs::write(out.join(CLAIM_NAME), b"{}").unwrap();
        check(&s, &url(&out), false, None).await.unwrap();
    }

    #[tokio::test]
    async fn a_link_out_of_the_roots_is_a_foreign_entry_named_as_written() {
        let tmp = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(tmp.path()).unwrap();
        let (root, outside) = (base.join("root"), base.join("outside"));
        std::fs::create_dir_all(outside.join("secret-dir")).unwrap();
        std::fs::write(outside.join("secret-dir/key"), b"k").unwrap();
        let out = root.join("out");
        std::fs::create_dir_all(out.join("sub")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret-dir"), out.join("sub/to dir")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret-dir/key"), out.join("key")).unwrap();
        let s = storage(&root);
        let e = check(&s, &format!("file://{}", out.display()), false, None)
            .await
            .unwrap_err();
        assert_eq!(e.code(), crate::error::ErrorCode::OutputNotEmpty, "{e}");
        let text = e.to_string();
        assert!(
            text.contains("sub/to dir") && text.contains("key"),
            "{text}"
        );
        assert!(!text.contains("secret-dir"), "{text}");
        assert!(!text.contains(&*outside.to_string_lossy()), "{text}");
    }
}

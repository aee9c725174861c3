//! Inputs must not change under a merge: each input file's identity, recorded when the job is
//! planned, checked again around every output shard.
//!
//! - A local file is read through the descriptor opened at plan time ([`LocalFile`]), so a
//!   rename-replace cannot switch the bytes read mid-tensor. Its `fstat` (device, inode, size,
//!   mtime) must still be what it was at open (a write in place changes the mtime), and the
//!   store's `HEAD` of its path must still give the size, mtime and ETag seen when the header
//!   was read (a file renamed over it, or removed, changes them).
//! - An S3 object: the same `HEAD` comparison; besides, every ranged read carries `If-Match` on
//!   the ETag recorded at plan time, so a replaced object is never read at all.
//!
//! A difference is [`CheckpointError::Changed`] (`input_changed`, retryable), naming the file.

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use super::reader::{CheckpointError, CheckpointFile};

/// The file at `path` of the input opened at `base` as the job names it: the input URL as
/// written (`input_url`), plus the file's path under `base` when the input is a folder. A link
/// inside the root on the way (a folder or the file itself) is never named by its target.
pub fn file_name(input_url: &str, base: &Path, path: &Path) -> String {
    let url = input_url.trim_end_matches('/');
    match path.prefix_match(base) {
        Some(rest) => {
            let mut name = url.to_string();
            for part in rest {
                name.push('/');
                name.push_str(part.as_ref());
            }
            name
        }
        None => match path.filename() {
            Some(file) => format!("{url}/{file}"),
            None => url.to_string(),
        },
    }
}

/// Whether two modification times are the same, allowing for a store that reports whole
/// seconds.
fn same_time(a: chrono::DateTime<chrono::Utc>, b: chrono::DateTime<chrono::Utc>) -> bool {
    a == b
        || (a.timestamp() == b.timestamp()
            && (a.timestamp_subsec_nanos() == 0 || b.timestamp_subsec_nanos() == 0))
}

/// Check one input file against what was recorded at plan time.
pub async fn check_unchanged(
    store: &dyn ObjectStore,
    file: &CheckpointFile,
) -> Result<(), CheckpointError> {
    let changed = |what: String| CheckpointError::Changed {
        file: file.name.clone(),
        what,
    };
    if let Some(local) = &file.local {
        let was = local.identity();
        let now = local
            .current()
            .map_err(|e| changed(format!("it can no longer be examined: {}", e.kind())))?;
        if now.size != was.size {
            return Err(changed(format!(
                "written in place: {} bytes, now {}",
                was.size, now.size
            )));
        }
        if now != was {
            return Err(changed(
                "written in place: its modification time changed".into(),
            ));
        }
    }
    let meta = match store.head(&file.path).await {
        Ok(m) => m,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(changed("removed or renamed".into()));
        }
        Err(e) => return Err(CheckpointError::Storage(e)),
    };
    if meta.size != file.size {
        return Err(changed(format!(
            "replaced: {} bytes, now {}",
            file.size, meta.size
        )));
    }
    if let (Some(was), Some(now)) = (&file.etag, &meta.e_tag)
        && was != now
    {
        return Err(changed("replaced: its ETag changed".into()));
    }
    if let Some(was) = file.modified
        && !same_time(was, meta.last_modified)
    {
        return Err(changed("replaced: its modification time changed".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_file_as_the_job_does() {
        let folder = Path::from("data/real/m");
        let p = Path::from("data/real/m/model-00001-of-00002.safetensors");
        assert_eq!(
            file_name("file:///data/link/m/", &folder, &p),
            "file:///data/link/m/model-00001-of-00002.safetensors"
        );
        // A file input reached through a link to another name: the name as written.
        let one = Path::from("data/real/target.safetensors");
        assert_eq!(
            file_name("file:///data/link/x.safetensors", &one, &one),
            "file:///data/link/x.safetensors"
        );
        assert_eq!(
            file_name("org/m@v2", &folder, &p),
            "org/m@v2/model-00001-of-00002.safetensors"
        );
    }

    #[test]
    fn whole_second_stores_compare_by_the_second() {
        use chrono::TimeZone;
        let a = chrono::Utc.timestamp_opt(100, 5).unwrap();
        let b = chrono::Utc.timestamp_opt(100, 0).unwrap();
        let c = chrono::Utc.timestamp_opt(100, 6).unwrap();
        assert!(same_time(a, a));
        assert!(same_time(a, b));
        assert!(!same_time(a, c));
        assert!(!same_time(a, chrono::Utc.timestamp_opt(101, 5).unwrap()));
    }
}

//! An output folder that [`super::LocalStore::pin_dir`] made, removed again if the run leaves it
//! empty.
//!
//! A job's output folder is made when the job is planned (`pin_dir(…, create = true)`). A run
//! that then fails before publishing (an input that changed, a full disk, a cancellation, an
//! SVD error, a lost lease) removes its staged files, which would leave that folder behind,
//! empty, where the user asked for a soup. So the held store keeps a [`MadeDir`]: the parent
//! folder's handle, the folder's name, and the device and inode of the folder made. When the
//! last clone of the held store goes (the run is over, however it ended), the folder is removed
//! through the parent's handle, never by path, and only if the name still holds that very
//! folder (not a link, not a folder swapped in) and it is empty: `rmdir` leaves a published
//! soup, or another writer's staging, where it is. Only the last folder of the path is
//! removed; parents made on the way stay.
//!
//! Not covered: a second writer that held the same new folder and had staged nothing yet when
//! the first one failed finds it gone (its writes fail with `storage_error`; nothing is
//! published by it).

use std::ffi::{OsStr, OsString};

use cap_std::fs::{Dir, MetadataExt as _};

/// The folder made, and how to find it again without a path (see the module doc).
pub(super) struct MadeDir {
    parent: Dir,
    name: OsString,
    dev: u64,
    ino: u64,
    /// For the log line.
    url: String,
}

impl MadeDir {
    /// `name` in `parent` was just made and opened as `held`: `None` when the name no longer
    /// holds `held` (swapped in between: then nothing is ever removed).
    pub(super) fn of(parent: Dir, name: &OsStr, held: &Dir, url: &str) -> Option<MadeDir> {
        let held = held.dir_metadata().ok()?;
        let at_name = parent.symlink_metadata(name).ok()?;
        (at_name.is_dir() && at_name.dev() == held.dev() && at_name.ino() == held.ino()).then(
            || MadeDir {
                parent,
                name: name.to_os_string(),
                dev: held.dev(),
                ino: held.ino(),
                url: url.to_string(),
            },
        )
    }
}

impl Drop for MadeDir {
    fn drop(&mut self) {
        let same = self
            .parent
            .symlink_metadata(&self.name)
            .is_ok_and(|m| m.is_dir() && m.dev() == self.dev && m.ino() == self.ino);
        // `rmdir` refuses a folder that is not empty: a soup, or another writer's files, stay.
        if same && self.parent.remove_dir(&self.name).is_ok() {
            tracing::debug!(url = %self.url, "removed the output folder this run made and left empty");
        }
    }
}

//! Listing a folder from its handle without following links out of the root or into linked
//! folders (moved out of `storage/local.rs`).

use super::*;

/// What a directory entry is, with links inside the root followed.
pub(super) enum Entry {
    File(std::fs::Metadata),
    Dir { linked: bool },
    Other,
}

/// `base`: the object path of `dir` (`rel` under the root), for the child's name in messages.
pub(super) fn classify(
    r: &Rel<'_>,
    dir: &Dir,
    rel: &FsPath,
    base: &Path,
    name: &OsStr,
) -> object_store::Result<Entry> {
    let lstat = match dir.symlink_metadata(name) {
        Ok(m) => m,
        // Gone since it was listed.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Entry::Other),
        Err(e) => return Err(r.io(e)),
    };
    let ft = lstat.file_type();
    if ft.is_dir() {
        return Ok(Entry::Dir { linked: false });
    }
    if ft.is_file() {
        let f = dir
            .open_with(name, &read_options())
            .map_err(|e| r.io(e))?
            .into_std();
        let m = f.metadata().map_err(|e| r.io(e))?;
        return Ok(if m.is_file() {
            Entry::File(m)
        } else {
            Entry::Other
        });
    }
    if ft.is_symlink() {
        let child = Rel {
            root: r.root,
            rel: rel.join(name),
            url: shown_url(r.shown, &join(base, name)),
            shown: r.shown,
        };
        let target = child.follow(&child.rel, |d, p| d.metadata(p));
        return match target {
            Ok(m) if m.is_dir() => Ok(Entry::Dir { linked: true }),
            Ok(m) if m.is_file() => Ok(Entry::File(
                open_regular(&child, &child.rel)?
                    .metadata()
                    .map_err(|e| child.io(e))?,
            )),
            Ok(_) => Ok(Entry::Other),
            // A dangling link is not an object.
            Err(object_store::Error::NotFound { .. }) => Ok(Entry::Other),
            Err(e) => Err(e),
        };
    }
    Ok(Entry::Other)
}

pub(super) fn walk(
    r: &Rel<'_>,
    dir: &Dir,
    rel: &FsPath,
    base: &Path,
    out: &mut Vec<object_store::Result<ObjectMeta>>,
) {
    let entries = match dir.entries() {
        Ok(e) => e,
        Err(e) => {
            out.push(Err(r.io(e)));
            return;
        }
    };
    for entry in entries {
        let name = match entry {
            Ok(e) => e.file_name(),
            Err(e) => {
                out.push(Err(r.io(e)));
                continue;
            }
        };
        if is_staging_name(name.as_bytes()) {
            continue;
        }
        match classify(r, dir, rel, base, &name) {
            Ok(Entry::File(m)) => out.push(Ok(object_meta(join(base, &name), &m))),
            Ok(Entry::Dir { linked: false }) => match dir.open_dir(&name) {
                Ok(sub) => walk(r, &sub, &rel.join(&name), &join(base, &name), out),
                Err(e) => out.push(Err(r.io(e))),
            },
            Ok(Entry::Dir { linked: true } | Entry::Other) => {}
            Err(e) => out.push(Err(e)),
        }
    }
}

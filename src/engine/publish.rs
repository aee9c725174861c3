//! The publish protocol: how one run's files become the output's soup, whatever other writers
//! do at the same time (other attempts of the job, other services with their own databases,
//! `ladle merge` one-shots, a worker that lost its lease).
//!
//! 1. **Own names.** A run writes every file under `OUT/.ladle-staging/<writer>/`, where
//!    `<writer>` is `<job id>-<attempt>` (a worker) or `cli-<uuid>` (a one-shot): names no other
//!    run writes. It never deletes, renames over or truncates a file it did not create. Staging
//!    folders of other writers are removed only when they are known dead: earlier attempts of
//!    the same job (the queue fenced them).
//! 2. **Claim.** `OUT/.ladle-claim.json` is created with `PutMode::Create` (create-if-absent:
//!    `O_EXCL`/hard link locally, `If-None-Match: *` on S3). It names the writer, the recipe
//!    hash and a key: the SHA-256 of the recipe hash and every file's size and SHA-256. A run
//!    that finds a claim with another key fails with `output_conflict` (or, when the output
//!    already holds a complete soup of the same recipe, ends as a recovery of it); one that
//!    finds its own key (a twin, or an earlier run of the same bytes that died while
//!    publishing) finishes the publication with it.
//! 3. **Move.** Each staged file goes to its final name create-if-absent
//!    (`rename_if_not_exists`; on a store without it, S3, `head` then `copy`: only runs holding
//!    the claim's key move files into final names, and they all move the same bytes). A final
//!    name that is already taken must hold this run's bytes (size and SHA-256 checked), or the
//!    run fails with `output_conflict`.
//! 4. **Manifest last**, create-if-absent; it lists every file with the SHA-256 of the bytes
//!    that were staged (and then moved, not copied, so they are the same). Already there:
//!    same recipe and files → a recovery; else `output_conflict`.
//! 5. Once a manifest is out the claim has done its work and is removed; every run removes its
//!    own staging folder, whether it succeeded or failed.
//!
//! Locally, every step goes through the output folder's directory handle, taken once when the
//! job is planned (`Location::pinned`): the output swapped for a link (or moved) mid-job
//! changes nothing about where the files go.
//!
//! A claim without a manifest is a publication that died half-way: a run of the same recipe
//! (same key) completes it; any other run gets `output_conflict` until someone clears the
//! folder.

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::EngineError;
use super::manifest::{self, MANIFEST_NAME, Manifest, OutputFile};
use crate::storage::Location;

/// The folder inside an output that holds the runs' staged files, one folder per writer.
pub const STAGING_DIR: &str = ".ladle-staging";
/// The claim object: whoever created it publishes.
pub const CLAIM_NAME: &str = ".ladle-claim.json";
const CLAIM_FORMAT: &str = "ladle.claim/v1";
/// A claim larger than this is not ours.
const MAX_CLAIM_BYTES: u64 = 1 << 20;

/// Who writes: names the run's staging folder and its claim.
#[derive(Debug, Clone)]
pub(super) struct Writer {
    /// `<job id>-<attempt>` or `cli-<uuid>`.
    pub id: String,
    /// The job and attempt, for a worker's run.
    job: Option<(String, u64)>,
}

impl Writer {
    /// From the run's identity (`{"job_id", "attempt"}` for a worker; anything else is a
    /// one-shot, which gets a fresh id).
    pub fn of(run_info: &serde_json::Value) -> Writer {
        let job = run_info.get("job_id").and_then(|v| v.as_str());
        let attempt = run_info.get("attempt").and_then(|v| v.as_u64());
        match (job, attempt) {
            (Some(j), Some(a)) if is_plain_name(j) => Writer {
                id: format!("{j}-{a}"),
                job: Some((j.to_string(), a)),
            },
            _ => Writer {
                id: format!("cli-{}", uuid::Uuid::now_v7().simple()),
                job: None,
            },
        }
    }

    /// A writer for which every attempt of `job` is dead (a recovery-only run).
    pub fn all_attempts_of(job: uuid::Uuid) -> Writer {
        Writer {
            id: format!("{job}-recovery"),
            job: Some((job.to_string(), u64::MAX)),
        }
    }

    /// Whether the staging folder `name` belongs to a writer known to be dead: an earlier
    /// attempt of this job (the queue fenced it when this attempt was claimed).
    fn is_dead(&self, name: &str) -> bool {
        let Some((job, attempt)) = &self.job else {
            return false;
        };
        name.rsplit_once('-').is_some_and(|(j, a)| {
            j == job && a.parse::<u64>().is_ok_and(|earlier| earlier < *attempt)
        })
    }
}

fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The writer's staging folder inside `output`.
pub(super) fn staging(output: &Location, writer: &Writer) -> Location {
    output.child(STAGING_DIR).child(&writer.id)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claim {
    format: String,
    writer: String,
    /// Job id and attempt for a worker; null for a one-shot.
    run: serde_json::Value,
    recipe_sha256: String,
    /// SHA-256 of the recipe hash and the files (name, size, SHA-256): two runs with the same
    /// key publish the same bytes.
    key: String,
}

fn key_of(recipe_sha256: &str, files: &[OutputFile]) -> String {
    let mut h = Sha256::new();
    h.update(recipe_sha256.as_bytes());
    for f in files {
        h.update(b"\n");
        h.update(f.path.as_bytes());
        h.update(b"\0");
        h.update(f.size.to_string().as_bytes());
        h.update(b"\0");
        h.update(f.sha256.as_bytes());
    }
    hex::encode(h.finalize())
}

fn conflict(msg: String) -> EngineError {
    EngineError::OutputConflict(msg)
}

/// Create `loc` with `bytes` unless it exists: `Ok(false)` when it did.
async fn create(loc: &Location, bytes: Vec<u8>) -> Result<bool, EngineError> {
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    match loc
        .store
        .put_opts(&loc.path, PutPayload::from_bytes(Bytes::from(bytes)), opts)
        .await
    {
        Ok(_) => Ok(true),
        Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
        Err(e) => Err(EngineError::ObjectStore {
            context: format!("creating {}", loc.url),
            source: e,
        }),
    }
}

async fn read_claim(output: &Location) -> Result<Option<Claim>, EngineError> {
    let loc = output.child(CLAIM_NAME);
    let got = match loc.store.get(&loc.path).await {
        Ok(g) => g,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => {
            return Err(EngineError::ObjectStore {
                context: format!("reading {}", loc.url),
                source: e,
            });
        }
    };
    if got.meta.size > MAX_CLAIM_BYTES {
        return Err(conflict(format!(
            "{} exists and is not a ladle claim",
            loc.url
        )));
    }
    let bytes = got
        .bytes()
        .await
        .map_err(EngineError::store(format!("reading {}", loc.url)))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|_| conflict(format!("{} exists and is not a ladle claim", loc.url)))
}

/// Remove the claim (best effort). Only once a manifest is out: from then on nobody acts on a
/// claim but the run that created it, and that run first looks for the manifest.
async fn remove_claim(output: &Location) {
    let loc = output.child(CLAIM_NAME);
    match loc.store.delete(&loc.path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => tracing::warn!(file = %loc.url, error = %e, "could not remove the claim"),
    }
}

/// Whether an existing manifest is this run's soup (same recipe, same files).
fn same_soup(existing: &Manifest, m: &Manifest) -> bool {
    existing.recipe_sha256 == m.recipe_sha256 && existing.files == m.files
}

/// The output already has a manifest: a recovery when it is this soup, else a conflict.
fn settle_existing(
    output: &Location,
    existing: &Manifest,
    m: &Manifest,
) -> Result<bool, EngineError> {
    if same_soup(existing, m) {
        Ok(true)
    } else {
        Err(conflict(format!(
            "{} was published by another run with different contents",
            output.child(MANIFEST_NAME).url
        )))
    }
}

/// Publish the files staged in `staging` (all of `m.files`) to `output`, then the manifest.
/// `Ok(true)`: another run had already published the identical soup (a recovery).
pub(super) async fn publish(
    output: &Location,
    staging: &Location,
    writer: &Writer,
    m: &Manifest,
) -> Result<bool, EngineError> {
    let claim = Claim {
        format: CLAIM_FORMAT.into(),
        writer: writer.id.clone(),
        run: m.run.clone(),
        recipe_sha256: m.recipe_sha256.clone(),
        key: key_of(&m.recipe_sha256, &m.files),
    };
    let body = serde_json::to_vec_pretty(&claim)
        .map_err(|e| EngineError::Internal(format!("serializing the claim: {e}")))?;
    // A final name taken by a file nobody is publishing (`overwrite`: a user's file) is a
    // conflict found before claiming, so that no claim is left behind for it.
    let unclaimed = read_claim(output).await?.is_none() && manifest::read(output).await?.is_none();
    if unclaimed {
        for f in &m.files {
            let to = output.child(&f.path);
            match to.store.head(&to.path).await {
                Err(object_store::Error::NotFound { .. }) => {}
                Ok(_) => holds_same_bytes(&to, f).await?,
                Err(e) => {
                    return Err(EngineError::ObjectStore {
                        context: format!("publishing {}", to.url),
                        source: e,
                    });
                }
            }
        }
    }
    let claimant = create(&output.child(CLAIM_NAME), body).await?;
    if !claimant {
        // Claimed by another run: the same bytes → publish them together; else the manifest,
        // if one is out, tells a recovery from a conflict.
        let theirs = read_claim(output).await?;
        if theirs.as_ref().is_none_or(|c| c.key != claim.key) {
            let existing = manifest::read(output).await?;
            return match existing {
                Some(existing) => {
                    let settled = settle_existing(output, &existing, m);
                    remove_claim(output).await;
                    settled
                }
                None => Err(conflict(match theirs {
                    Some(c) => format!(
                        "{} is being published by another run ({}) with different contents",
                        output.url, c.writer
                    ),
                    None => format!("{} is being published by another run", output.url),
                })),
            };
        }
        tracing::info!(
            claimant = %theirs.map(|c| c.writer).unwrap_or_default(),
            "the output is claimed for the same soup: publishing it together"
        );
    }
    // A manifest may already be out (a twin finished first, or the claim came after it).
    if let Some(existing) = manifest::read(output).await? {
        let settled = settle_existing(output, &existing, m);
        remove_claim(output).await;
        return settled;
    }
    let mut moved = Vec::new();
    for f in &m.files {
        match move_into_place(staging, output, f).await {
            Ok(true) => moved.push(f),
            Ok(false) => {}
            Err(e) => {
                // A name taken by other bytes: no run with this key can publish (they all
                // need that name), so the claimant takes back what it moved, and the claim.
                if claimant && matches!(e, EngineError::OutputConflict(_)) {
                    for f in moved {
                        let loc = output.child(&f.path);
                        let _ = loc.store.delete(&loc.path).await;
                    }
                    remove_claim(output).await;
                }
                return Err(e);
            }
        }
    }
    let body = serde_json::to_vec_pretty(m)
        .map_err(|e| EngineError::Internal(format!("serializing the manifest: {e}")))?;
    let recovered = if create(&output.child(MANIFEST_NAME), body).await? {
        false
    } else {
        match manifest::read(output).await? {
            Some(existing) => settle_existing(output, &existing, m)?,
            None => {
                return Err(conflict(format!(
                    "{} vanished while publishing",
                    output.child(MANIFEST_NAME).url
                )));
            }
        }
    };
    remove_claim(output).await;
    Ok(recovered)
}

/// Move one staged file to its final name, never over an existing one; a final name already
/// taken must hold the same bytes. `Ok(true)`: this run put the file there.
async fn move_into_place(
    staging: &Location,
    output: &Location,
    f: &OutputFile,
) -> Result<bool, EngineError> {
    let from = staging.child(&f.path);
    let to = output.child(&f.path);
    match to.store.rename_if_not_exists(&from.path, &to.path).await {
        Ok(()) => Ok(true),
        Err(object_store::Error::AlreadyExists { .. }) => {
            holds_same_bytes(&to, f).await.map(|()| false)
        }
        Err(
            object_store::Error::NotSupported { .. } | object_store::Error::NotImplemented { .. },
        ) => {
            // No atomic create-if-absent copy (S3 without a copy-if-not-exists header): the
            // claim's key already guarantees that whoever else writes this name writes these
            // bytes.
            match to.store.head(&to.path).await {
                Ok(_) => holds_same_bytes(&to, f).await.map(|()| false),
                Err(object_store::Error::NotFound { .. }) => {
                    to.store
                        .copy(&from.path, &to.path)
                        .await
                        .map_err(EngineError::store(format!("publishing {}", to.url)))?;
                    if let Err(e) = to.store.delete(&from.path).await {
                        tracing::warn!(file = %from.url, error = %e, "could not remove a staged file");
                    }
                    Ok(true)
                }
                Err(e) => Err(EngineError::ObjectStore {
                    context: format!("publishing {}", to.url),
                    source: e,
                }),
            }
        }
        Err(e) => Err(EngineError::ObjectStore {
            context: format!("publishing {}", to.url),
            source: e,
        }),
    }
}

/// Whether `loc` holds exactly `f`'s bytes (size, then SHA-256 of its content).
async fn holds_same_bytes(loc: &Location, f: &OutputFile) -> Result<(), EngineError> {
    let differs = || {
        conflict(format!(
            "{} already exists with other contents (written by another run or not by ladle)",
            loc.url
        ))
    };
    let got = loc
        .store
        .get(&loc.path)
        .await
        .map_err(EngineError::store(format!("reading {}", loc.url)))?;
    if got.meta.size != f.size {
        return Err(differs());
    }
    let mut h = Sha256::new();
    let mut stream = got.into_stream();
    while let Some(piece) = stream.next().await {
        h.update(&piece.map_err(EngineError::store(format!("reading {}", loc.url)))?);
    }
    if hex::encode(h.finalize()) == f.sha256 {
        Ok(())
    } else {
        Err(differs())
    }
}

/// Remove a staging folder and everything in it (best effort): this run's own, or one of a
/// writer known dead. Locally through the output's held handle, following nothing: the folder
/// goes with its partial uploads (`<name>#<digits>`, hidden from listings), a link inside is
/// removed as a link, and `.ladle-staging` goes too once it is empty.
pub(super) async fn remove_staging(staging: &Location) {
    if let Some(local) = staging.local.clone() {
        let path = staging.path.clone();
        let removed = tokio::task::spawn_blocking(move || {
            local.remove_tree(&path)?;
            let parts: Vec<_> = path.parts().collect();
            if parts.len() >= 2 && parts[parts.len() - 2].as_ref() == STAGING_DIR {
                let parent =
                    object_store::path::Path::from_iter(parts[..parts.len() - 1].iter().cloned());
                local.remove_empty_dir(&parent)?;
            }
            Ok::<_, object_store::Error>(())
        })
        .await;
        match removed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(url = %staging.url, error = %e, "could not remove a staging folder")
            }
            Err(e) => tracing::warn!(url = %staging.url, error = %e, "staging clean-up failed"),
        }
        return;
    }
    let listed: Result<Vec<_>, _> = staging.store.list(Some(&staging.path)).try_collect().await;
    match listed {
        Ok(objects) => {
            for o in objects {
                match staging.store.delete(&o.location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => {
                        tracing::warn!(path = %o.location, error = %e, "could not remove a staged file")
                    }
                }
            }
        }
        Err(e) => tracing::warn!(url = %staging.url, error = %e, "could not list a staging folder"),
    }
}

/// Remove the staging folders of writers known dead (earlier attempts of this job).
pub(super) async fn remove_dead_staging(output: &Location, writer: &Writer) {
    if writer.job.is_none() {
        return;
    }
    let root = output.child(STAGING_DIR);
    let Ok(listing) = root.store.list_with_delimiter(Some(&root.path)).await else {
        return;
    };
    for prefix in listing.common_prefixes {
        let Some(name) = prefix.filename().map(str::to_string) else {
            continue;
        };
        if writer.is_dead(&name) {
            tracing::info!(staging = %name, "removing the staging folder of an earlier attempt");
            remove_staging(&root.child(&name)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_and_dead_attempts() {
        let w = Writer::of(&serde_json::json!({"job_id": "0193-ab", "attempt": 3}));
        assert_eq!(w.id, "0193-ab-3");
        assert!(w.is_dead("0193-ab-1"));
        assert!(w.is_dead("0193-ab-2"));
        assert!(!w.is_dead("0193-ab-3"));
        assert!(!w.is_dead("0193-ab-4"));
        assert!(!w.is_dead("0193-ac-1"));
        assert!(!w.is_dead("cli-0193ab"));
        let cli = Writer::of(&serde_json::Value::Null);
        assert!(cli.id.starts_with("cli-"), "{}", cli.id);
        assert!(!cli.is_dead("0193-ab-1"));
        assert_ne!(cli.id, Writer::of(&serde_json::Value::Null).id);
        // A job id that is not a plain name cannot steer the staging path.
        let odd = Writer::of(&serde_json::json!({"job_id": "../x", "attempt": 1}));
        assert!(odd.id.starts_with("cli-"));
    }

    #[test]
    fn keys_cover_every_file() {
        let f = |p: &str, s: u64, h: &str| OutputFile {
            path: p.into(),
            size: s,
            sha256: h.into(),
        };
        let a = key_of("r", &[f("a", 1, "x"), f("b", 2, "y")]);
        assert_eq!(a, key_of("r", &[f("a", 1, "x"), f("b", 2, "y")]));
        assert_ne!(a, key_of("r", &[f("a", 1, "x"), f("b", 2, "z")]));
        assert_ne!(a, key_of("r", &[f("a", 1, "x")]));
        assert_ne!(a, key_of("q", &[f("a", 1, "x"), f("b", 2, "y")]));
    }
}

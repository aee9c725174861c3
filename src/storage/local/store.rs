//! The [`ObjectStore`] interface of [`LocalStore`] and its multipart uploads, on the rules of
//! the parent module (moved out of `storage/local.rs`).

use super::*;

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let no_replace = match opts.mode {
            PutMode::Overwrite => false,
            PutMode::Create => true,
            PutMode::Update(_) => {
                return Err(object_store::Error::NotImplemented {
                    operation: "put with PutMode::Update".into(),
                    implementer: STORE.into(),
                });
            }
        };
        let this = self.clone();
        let location = location.clone();
        blocking(move || {
            let r = this.locate(&location)?;
            let (parent, tmp, meta) = stage(&r, |f| {
                for chunk in payload.iter() {
                    f.write_all(chunk)?;
                }
                Ok(())
            })?;
            publish(&r, &parent, &tmp, no_replace)?;
            Ok(PutResult {
                e_tag: Some(etag(&meta)),
                version: None,
                extensions: Default::default(),
            })
        })
        .await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        _opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let this = self.clone();
        let location = location.clone();
        blocking(move || {
            let (parent, tmp, file) = {
                let r = this.locate(&location)?;
                let parent = r.parent_dir(true)?;
                let tmp = staging_name(r.name()?);
                let file = parent
                    .open_with(&tmp, &create_options())
                    .map_err(|e| r.io(e))?
                    .into_std();
                (parent, tmp, file)
            };
            Ok(Box::new(Upload {
                store: this,
                location,
                state: Arc::new(UploadState {
                    parent,
                    tmp,
                    file: Mutex::new(Some(file)),
                }),
                offset: 0,
                open: true,
            }) as Box<dyn MultipartUpload>)
        })
        .await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let this = self.clone();
        let location = location.clone();
        blocking(move || {
            let r = this.locate(&location)?;
            let file = open_regular(&r, &r.rel)?;
            let m = file.metadata().map_err(|e| r.io(e))?;
            let meta = object_meta(location.clone(), &m);
            options.check_preconditions(&meta)?;
            let range = match options.range {
                Some(range) => {
                    range
                        .as_range(meta.size)
                        .map_err(|e| object_store::Error::Generic {
                            store: STORE,
                            source: Box::new(e),
                        })?
                }
                None => 0..meta.size,
            };
            Ok(GetResult {
                payload: GetResultPayload::File(file, PathBuf::from(&r.url)),
                meta,
                range,
                attributes: Attributes::default(),
                extensions: Default::default(),
            })
        })
        .await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let this = self.clone();
        locations
            .map(move |location| {
                let this = this.clone();
                async move {
                    let location = location?;
                    blocking(move || {
                        let r = this.locate(&location)?;
                        let parent = r.parent_dir(false)?;
                        // `unlinkat`: a link is removed itself, never its target.
                        parent.remove_file(r.name()?).map_err(|e| r.io(e))?;
                        Ok(location)
                    })
                    .await
                }
            })
            .buffered(8)
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let this = self.clone();
        let prefix = prefix.cloned();
        futures::stream::once(async move {
            tokio::task::spawn_blocking(move || this.list_blocking(prefix.as_ref()))
                .await
                .unwrap_or_else(|e| vec![Err(object_store::Error::JoinError { source: e })])
        })
        .flat_map(futures::stream::iter)
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let this = self.clone();
        let base = prefix.cloned().unwrap_or_default();
        blocking(move || {
            let mut result = ListResult {
                common_prefixes: Vec::new(),
                objects: Vec::new(),
                extensions: Default::default(),
            };
            let r = this.locate(&base)?;
            let dir = match r.follow(&r.rel, |d, p| d.open_dir(p)) {
                Ok(d) => d,
                Err(object_store::Error::NotFound { .. }) => return Ok(result),
                Err(e) => return Err(e),
            };
            for entry in dir.entries().map_err(|e| r.io(e))? {
                let name = entry.map_err(|e| r.io(e))?.file_name();
                if is_staging_name(name.as_bytes()) {
                    continue;
                }
                match classify(&r, &dir, &r.rel, &base, &name)? {
                    Entry::File(m) => result.objects.push(object_meta(join(&base, &name), &m)),
                    Entry::Dir { .. } => result.common_prefixes.push(join(&base, &name)),
                    Entry::Other => {}
                }
            }
            result.objects.sort_by(|a, b| a.location.cmp(&b.location));
            result.common_prefixes.sort();
            Ok(result)
        })
        .await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        let no_replace = matches!(options.mode, CopyMode::Create);
        let this = self.clone();
        let (from, to) = (from.clone(), to.clone());
        blocking(move || {
            let src = this.locate(&from)?;
            let mut input = open_regular(&src, &src.rel)?;
            let dst = this.locate(&to)?;
            let (parent, tmp, _) = stage(&dst, |f| {
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = input.read(&mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    f.write_all(&buf[..n])?;
                }
            })?;
            publish(&dst, &parent, &tmp, no_replace)
        })
        .await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        let no_replace = matches!(options.target_mode, RenameTargetMode::Create);
        let this = self.clone();
        let (from, to) = (from.clone(), to.clone());
        blocking(move || {
            let src = this.locate(&from)?;
            let dst = this.locate(&to)?;
            let src_dir = src.parent_dir(false)?;
            let dst_dir = dst.parent_dir(true)?;
            rename_at(&src_dir, src.name()?, &dst_dir, dst.name()?, no_replace).map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    src.io(e)
                } else {
                    dst.io(e)
                }
            })
        })
        .await
    }
}

struct UploadState {
    parent: Dir,
    tmp: OsString,
    file: Mutex<Option<std::fs::File>>,
}

/// A streamed write: parts are written at their offsets into the staging file, which is
/// renamed into place on `complete` and removed on `abort` or drop.
struct Upload {
    store: LocalStore,
    location: Path,
    state: Arc<UploadState>,
    offset: u64,
    open: bool,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("location", &self.location)
            .finish()
    }
}

fn aborted() -> object_store::Error {
    object_store::Error::Generic {
        store: STORE,
        source: "the upload was already completed or aborted".into(),
    }
}

#[async_trait]
impl MultipartUpload for Upload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let offset = self.offset;
        self.offset += data.content_length() as u64;
        let state = self.state.clone();
        Box::pin(blocking(move || {
            let guard = state.file.lock().unwrap_or_else(|p| p.into_inner());
            let file = guard.as_ref().ok_or_else(aborted)?;
            let mut at = offset;
            for chunk in data.iter() {
                file.write_all_at(chunk, at)
                    .map_err(|e| object_store::Error::Generic {
                        store: STORE,
                        source: Box::new(e),
                    })?;
                at += chunk.len() as u64;
            }
            Ok(())
        }))
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        if !self.open {
            return Err(aborted());
        }
        self.open = false;
        let state = self.state.clone();
        let store = self.store.clone();
        let location = self.location.clone();
        blocking(move || {
            let file = state
                .file
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .ok_or_else(aborted)?;
            let r = store.locate(&location)?;
            let meta = file.metadata().map_err(|e| r.io(e))?;
            drop(file);
            publish(&r, &state.parent, &state.tmp, false)?;
            Ok(PutResult {
                e_tag: Some(etag(&meta)),
                version: None,
                extensions: Default::default(),
            })
        })
        .await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        if !self.open {
            return Err(aborted());
        }
        self.open = false;
        let state = self.state.clone();
        blocking(move || {
            state.file.lock().unwrap_or_else(|p| p.into_inner()).take();
            state
                .parent
                .remove_file(&state.tmp)
                .map_err(|e| object_store::Error::Generic {
                    store: STORE,
                    source: Box::new(e),
                })
        })
        .await
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.open {
            let _ = self.state.parent.remove_file(&self.state.tmp);
        }
    }
}

use std::os::unix::fs::symlink;

use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};

use super::*;

/// A root and a folder outside it holding `secret.txt`.
fn setup() -> (tempfile::TempDir, PathBuf, PathBuf, LocalStore) {
    let tmp = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(tmp.path()).unwrap();
    let root = base.join("root");
    let outside = base.join("outside");
    std::fs::create_dir_all(root.join("m")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.txt"), b"secret").unwrap();
    let store = LocalStore::new(vec![root.clone()]);
    (tmp, root, outside, store)
}

fn obj(p: &FsPath) -> Path {
    Path::from_absolute_path(p).unwrap()
}

#[tokio::test]
async fn put_get_list_delete_round_trip() {
    let (_t, root, _o, s) = setup();
    let p = obj(&root.join("m/a b.txt"));
    s.put(&p, PutPayload::from_static(b"hello")).await.unwrap();
    assert_eq!(std::fs::read(root.join("m/a b.txt")).unwrap(), b"hello");
    let got = s.get(&p).await.unwrap().bytes().await.unwrap();
    assert_eq!(&got[..], b"hello");
    assert_eq!(&s.get_range(&p, 1..3).await.unwrap()[..], b"el");
    // Nested parents are created inside the root.
    let deep = obj(&root.join("m/x/y/z.bin"));
    s.put(&deep, PutPayload::from_static(b"1")).await.unwrap();
    let listed: Vec<ObjectMeta> = s.list(Some(&obj(&root.join("m")))).try_collect_vec().await;
    let mut names: Vec<String> = listed.iter().map(|m| m.location.to_string()).collect();
    names.sort();
    assert_eq!(names, vec![p.to_string(), deep.to_string()]);
    let l = s
        .list_with_delimiter(Some(&obj(&root.join("m"))))
        .await
        .unwrap();
    assert_eq!(l.objects.len(), 1);
    assert_eq!(l.common_prefixes, vec![obj(&root.join("m/x"))]);
    s.delete(&p).await.unwrap();
    assert!(!root.join("m/a b.txt").exists());
    assert!(matches!(
        s.get(&p).await,
        Err(object_store::Error::NotFound { .. })
    ));
    // A missing folder lists as empty.
    assert!(
        s.list_with_delimiter(Some(&obj(&root.join("nope"))))
            .await
            .unwrap()
            .objects
            .is_empty()
    );
}

trait CollectVec {
    async fn try_collect_vec(self) -> Vec<ObjectMeta>;
}

impl CollectVec for BoxStream<'static, object_store::Result<ObjectMeta>> {
    async fn try_collect_vec(self) -> Vec<ObjectMeta> {
        use futures::TryStreamExt;
        self.try_collect().await.unwrap()
    }
}

#[tokio::test]
async fn links_inside_the_root_are_followed_links_out_are_refused() {
    let (_t, root, outside, s) = setup();
    std::fs::write(root.join("m/real.json"), b"{}").unwrap();
    symlink("real.json", root.join("m/rel.json")).unwrap();
    symlink(root.join("m/real.json"), root.join("m/abs.json")).unwrap();
    symlink(outside.join("secret.txt"), root.join("m/tokenizer.json")).unwrap();
    symlink("../../outside/secret.txt", root.join("m/dotdot.json")).unwrap();
    symlink(&outside, root.join("linked-dir")).unwrap();
    for ok in ["m/rel.json", "m/abs.json"] {
        let got = s.get(&obj(&root.join(ok))).await.unwrap();
        assert_eq!(&got.bytes().await.unwrap()[..], b"{}", "{ok}");
        s.open_file(&obj(&root.join(ok))).unwrap();
    }
    for bad in ["m/tokenizer.json", "m/dotdot.json", "linked-dir/secret.txt"] {
        let p = obj(&root.join(bad));
        let e = s.get(&p).await.unwrap_err();
        let o = outside_roots(&e).unwrap_or_else(|| panic!("{bad}: {e}"));
        assert!(o.path.ends_with(bad), "{}", o.path);
        let text = e.to_string();
        assert!(!text.contains("outside/secret"), "{text}");
        assert!(!text.contains("secret\""), "{text}");
        assert!(outside_roots(&s.open_file(&p).unwrap_err()).is_some());
        assert!(outside_roots(&s.head(&p).await.unwrap_err()).is_some());
    }
    // A listing that meets a link out fails loudly rather than reading through it.
    let e = s
        .list_with_delimiter(Some(&obj(&root.join("m"))))
        .await
        .unwrap_err();
    assert!(outside_roots(&e).is_some(), "{e}");
    // A path no root holds.
    assert!(outside_roots(&s.get(&obj(&outside.join("secret.txt"))).await.unwrap_err()).is_some());
}

#[tokio::test]
async fn deletes_never_follow_links() {
    let (_t, root, outside, s) = setup();
    let scratch = root.join("g/.ladle-scratch/job");
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::write(scratch.join("part"), b"x").unwrap();
    symlink(&outside, scratch.join("x")).unwrap();
    symlink(outside.join("secret.txt"), scratch.join("y")).unwrap();
    s.delete(&obj(&scratch.join("y"))).await.unwrap();
    assert!(outside.join("secret.txt").exists());
    s.remove_tree(&obj(&scratch)).unwrap();
    assert!(!scratch.exists());
    assert_eq!(
        std::fs::read(outside.join("secret.txt")).unwrap(),
        b"secret"
    );
    assert!(
        s.remove_empty_dir(&obj(&root.join("g/.ladle-scratch")))
            .unwrap()
    );
    assert!(!root.join("g/.ladle-scratch").exists());
    // Missing: fine. A scratch folder that is itself a link: the link goes, not the target.
    s.remove_tree(&obj(&scratch)).unwrap();
    std::fs::create_dir_all(root.join("g/.ladle-scratch")).unwrap();
    symlink(&outside, &scratch).unwrap();
    s.remove_tree(&obj(&scratch)).unwrap();
    assert!(std::fs::symlink_metadata(&scratch).is_err());
    assert!(outside.join("secret.txt").exists());
}

#[tokio::test]
async fn writes_replace_planted_links_and_refuse_swapped_folders() {
    let (_t, root, outside, s) = setup();
    // A link at the final name is replaced, its target untouched.
    symlink(outside.join("secret.txt"), root.join("m/config.json")).unwrap();
    s.put(
        &obj(&root.join("m/config.json")),
        PutPayload::from_static(b"new"),
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read(outside.join("secret.txt")).unwrap(),
        b"secret"
    );
    assert!(
        std::fs::symlink_metadata(root.join("m/config.json"))
            .unwrap()
            .is_file()
    );
    // The output folder swapped for a link out: refused, nothing written outside.
    std::fs::remove_dir_all(root.join("m")).unwrap();
    symlink(&outside, root.join("m")).unwrap();
    let e = s
        .put(
            &obj(&root.join("m/authorized_keys")),
            PutPayload::from_static(b"k"),
        )
        .await
        .unwrap_err();
    assert!(outside_roots(&e).is_some(), "{e}");
    let e = s
        .put_multipart(&obj(&root.join("m/model.safetensors")))
        .await
        .unwrap_err();
    assert!(outside_roots(&e).is_some(), "{e}");
    let mut names: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, vec![OsString::from("secret.txt")]);
}

/// A held folder (`pin_dir`): exchanged for a link out (and for a link into the same root)
/// mid-job, every write, rename, listing and removal still goes to the folder that was opened;
/// nothing is written where the link leads, and nothing outside the folder is reachable.
#[tokio::test]
async fn a_held_folder_keeps_its_writes_whatever_is_swapped_in() {
    let (_t, root, outside, s) = setup();
    let out = root.join("out");
    // Created by the pin, parents too.
    let held = s.pin_dir(&obj(&out.join("soup")), true).unwrap();
    let soup = out.join("soup");
    assert!(soup.is_dir());
    held.put(
        &obj(&soup.join(".ladle-staging/j-1/model.safetensors")),
        PutPayload::from_static(b"w1"),
    )
    .await
    .unwrap();
    let mut upload = WriteMultipart::new_with_chunk_size(
        held.put_multipart(&obj(&soup.join(".ladle-staging/j-1/model-2.safetensors")))
            .await
            .unwrap(),
        4,
    );
    upload.write(b"shard two");
    // Swapped atomically for a link out of the root.
    symlink(&outside, root.join("swap")).unwrap();
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        soup.as_path(),
        rustix::fs::CWD,
        root.join("swap").as_path(),
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .unwrap();
    assert!(std::fs::symlink_metadata(&soup).unwrap().is_symlink());
    upload.finish().await.unwrap();
    for name in ["model.safetensors", "model-2.safetensors"] {
        held.rename_if_not_exists(
            &obj(&soup.join(".ladle-staging/j-1").join(name)),
            &obj(&soup.join(name)),
        )
        .await
        .unwrap();
    }
    held.put_opts(
        &obj(&soup.join("ladle-manifest.json")),
        PutPayload::from_static(b"{}"),
        PutOptions::from(PutMode::Create),
    )
    .await
    .unwrap();
    held.remove_tree(&obj(&soup.join(".ladle-staging/j-1")))
        .unwrap();
    assert!(
        held.remove_empty_dir(&obj(&soup.join(".ladle-staging")))
            .unwrap()
    );
    let listed: Vec<ObjectMeta> = held.list(Some(&obj(&soup))).try_collect_vec().await;
    assert_eq!(listed.len(), 3, "{listed:?}");
    // Nothing where the link leads; the opened folder (now at `swap`) holds it all.
    let mut names: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, vec![OsString::from("secret.txt")]);
    let mut moved: Vec<_> = std::fs::read_dir(root.join("swap"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    moved.sort();
    assert_eq!(
        moved,
        [
            "ladle-manifest.json",
            "model-2.safetensors",
            "model.safetensors"
        ]
    );
    assert_eq!(
        std::fs::read(root.join("swap/model-2.safetensors")).unwrap(),
        b"shard two"
    );
    // Only paths under the held folder are served; a link in it that leaves it is refused,
    // even one that stays inside the root.
    let e = held.get(&obj(&root.join("m/x"))).await.unwrap_err();
    assert!(outside_roots(&e).is_some(), "{e}");
    std::fs::write(root.join("m/inside.json"), b"{}").unwrap();
    symlink(root.join("m/inside.json"), root.join("swap/abs.json")).unwrap();
    symlink("../m/inside.json", root.join("swap/rel.json")).unwrap();
    for name in ["abs.json", "rel.json"] {
        let e = held.get(&obj(&soup.join(name))).await.unwrap_err();
        assert!(outside_roots(&e).is_some(), "{name}: {e}");
    }
    // Not created on request: a missing folder is `NotFound`.
    assert!(matches!(
        s.pin_dir(&obj(&root.join("nope")), false),
        Err(object_store::Error::NotFound { .. })
    ));
    // A folder that is a link out cannot be held.
    let e = s.pin_dir(&obj(&soup), false).unwrap_err();
    assert!(outside_roots(&e).is_some(), "{e}");
}

#[tokio::test]
async fn create_modes_never_replace() {
    let (_t, root, _o, s) = setup();
    let p = obj(&root.join("m/claim"));
    let create = PutOptions::from(PutMode::Create);
    s.put_opts(&p, PutPayload::from_static(b"1"), create.clone())
        .await
        .unwrap();
    let e = s
        .put_opts(&p, PutPayload::from_static(b"2"), create)
        .await
        .unwrap_err();
    assert!(
        matches!(e, object_store::Error::AlreadyExists { .. }),
        "{e}"
    );
    assert_eq!(std::fs::read(root.join("m/claim")).unwrap(), b"1");
    let q = obj(&root.join("m/other"));
    s.put(&q, PutPayload::from_static(b"3")).await.unwrap();
    let e = s.rename_if_not_exists(&q, &p).await.unwrap_err();
    assert!(
        matches!(e, object_store::Error::AlreadyExists { .. }),
        "{e}"
    );
    let e = s.copy_if_not_exists(&q, &p).await.unwrap_err();
    assert!(
        matches!(e, object_store::Error::AlreadyExists { .. }),
        "{e}"
    );
    let r = obj(&root.join("m/sub/renamed"));
    s.rename_if_not_exists(&q, &r).await.unwrap();
    assert_eq!(std::fs::read(root.join("m/sub/renamed")).unwrap(), b"3");
    s.copy(&r, &q).await.unwrap();
    s.rename(&q, &p).await.unwrap();
    assert_eq!(std::fs::read(root.join("m/claim")).unwrap(), b"3");
    // No staging files are left behind.
    let names: Vec<_> = std::fs::read_dir(root.join("m"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains('#')), "{names:?}");
}

#[tokio::test]
async fn multipart_uploads_appear_whole_or_not_at_all() {
    let (_t, root, _o, s) = setup();
    let p = obj(&root.join("m/model.safetensors"));
    let mut w = WriteMultipart::new_with_chunk_size(s.put_multipart(&p).await.unwrap(), 5);
    w.write(b"0123456789abcdef");
    assert!(!root.join("m/model.safetensors").exists());
    w.finish().await.unwrap();
    assert_eq!(
        std::fs::read(root.join("m/model.safetensors")).unwrap(),
        b"0123456789abcdef"
    );
    let q = obj(&root.join("m/aborted.safetensors"));
    let mut w = WriteMultipart::new_with_chunk_size(s.put_multipart(&q).await.unwrap(), 5);
    w.write(b"0123456789");
    w.abort().await.unwrap();
    let names: Vec<_> = std::fs::read_dir(root.join("m"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["model.safetensors".to_string()]);
}

#[test]
fn staging_names() {
    assert!(is_staging_name(b"model.safetensors#12"));
    assert!(!is_staging_name(b"model.safetensors#"));
    assert!(!is_staging_name(b"#12"));
    assert!(!is_staging_name(b"a#b1"));
    assert!(is_staging_name(staging_name(OsStr::new("x")).as_bytes()));
}

/// A folder `pin_dir` made goes again with the last clone of its held store, if it is empty
/// then; one holding a file, one that was there before, and one moved away (another folder put
/// at its name) stay.
#[tokio::test]
async fn a_made_folder_left_empty_goes_with_its_handle() {
    let (_t, root, _o, s) = setup();
    // Made, a file staged and its staging removed: gone once the last clone goes.
    let soup = root.join("out/soup");
    let held = s.pin_dir(&obj(&soup), true).unwrap();
    let clone = held.clone();
    held.put(
        &obj(&soup.join(".ladle-staging/j-1/x.safetensors")),
        PutPayload::from_static(b"x"),
    )
    .await
    .unwrap();
    held.remove_tree(&obj(&soup.join(".ladle-staging")))
        .unwrap();
    drop(held);
    assert!(soup.is_dir(), "removed while a clone still holds it");
    drop(clone);
    assert!(!soup.exists(), "a made folder left empty stayed");
    assert!(root.join("out").is_dir(), "a parent made on the way stays");
    // Made, a file published in it: stays.
    let held = s.pin_dir(&obj(&soup), true).unwrap();
    held.put(
        &obj(&soup.join("ladle-manifest.json")),
        PutPayload::from_static(b"{}"),
    )
    .await
    .unwrap();
    drop(held);
    assert!(soup.join("ladle-manifest.json").is_file());
    // There before: stays, even empty.
    let before = root.join("before");
    std::fs::create_dir(&before).unwrap();
    drop(s.pin_dir(&obj(&before), true).unwrap());
    assert!(before.is_dir());
    // Made, moved away, another empty folder put at its name: neither is removed.
    let moved = root.join("moved");
    let held = s.pin_dir(&obj(&moved), true).unwrap();
    std::fs::rename(&moved, root.join("moved-away")).unwrap();
    std::fs::create_dir(&moved).unwrap();
    drop(held);
    assert!(moved.is_dir() && root.join("moved-away").is_dir());
}

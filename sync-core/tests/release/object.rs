//! The object store a push fills: verified on receipt, linked into the next release, resumable.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::MetadataExt;

use sync_core::delta::{self, DeltaFormat, Verified};
use sync_core::edge::object::{ObjectError, ObjectStore, ObjectWriter};
use sync_core::edge::root::AppRoot;
use sync_core::manifest::{Entry, Hash, Manifest, Policy};

use crate::harness::*;

/// The daemon has no source tree: every new file must come from the object store.
struct NoSource;

impl sync_core::edge::exec::ContentSource for NoSource {
    fn write_full(
        &self,
        path: &sync_core::RelPath,
        _size: u64,
        _out: &mut std::fs::File,
    ) -> Result<(), sync_core::edge::EdgeError> {
        panic!("{path} should have come from the object store")
    }
}

/// Writes `content` into `w` as the daemon does, through a full payload and `delta::apply`.
fn put(w: &mut ObjectWriter<'_>, content: &[u8]) -> Verified {
    let mut payload = Vec::new();
    delta::encode_full(content, &mut payload).unwrap();
    let hash = blake3::hash(content);
    delta::apply(
        DeltaFormat::Full,
        None,
        &payload,
        content.len() as u64,
        &hash,
        w,
    )
    .unwrap()
}

fn store_names(root: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root.join(".relsync/objects"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn objects_are_verified_on_receipt_and_linked_into_the_release() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("app");
    let root = AppRoot::open_or_create(&path).unwrap();
    let store = ObjectStore::open(&root).unwrap();
    let good = b"<?php echo 'pushed';".to_vec();
    let h = Hash::of(&good);

    // Wrong content: refused, nothing published, no temporary left.
    let mut w = store.create(h, 0o644, good.len() as u64).unwrap();
    let lie = put(&mut w, b"<?php echo 'LYING!';");
    assert!(matches!(
        w.finish(&lie).unwrap(),
        Err(ObjectError::Hash { .. })
    ));
    // More bytes than declared: the write itself fails.
    let mut w = store.create(h, 0o644, 3).unwrap();
    assert!(w.write_all(&good).is_err());
    drop(w);
    // Too few bytes.
    let mut w = store.create(h, 0o644, good.len() as u64).unwrap();
    let short = put(&mut w, &good[..4]);
    assert!(matches!(
        w.finish(&short).unwrap(),
        Err(ObjectError::Size { .. })
    ));
    assert!(store_names(&path).is_empty(), "{:?}", store_names(&path));

    let mut w = store.create(h, 0o644, good.len() as u64).unwrap();
    let verified = put(&mut w, &good);
    w.finish(&verified).unwrap().unwrap();
    assert_eq!(store.list().unwrap(), HashSet::from([(h, 0o644)]));
    let obj = path
        .join(".relsync/objects")
        .join(store_names(&path)[0].clone());
    assert_eq!(std::fs::metadata(&obj).unwrap().mode() & 0o777, 0o644);
    let obj_ino = std::fs::metadata(&obj).unwrap().ino();

    // A release whose only file is that object links it (same inode) and empties the store.
    let target = Manifest::from_unsorted(
        vec![Entry::file("pushed.php", good.len() as u64, 0o644, h).unwrap()],
        &Policy::default(),
    )
    .unwrap();
    let lock = root.lock(|_| {}).unwrap();
    let mut opts = opts("r1", true);
    opts.use_objects = true;
    let report =
        sync_core::edge::deploy::deploy(&root, &lock, &target, &NoSource, &opts, &|_| {}).unwrap();
    assert_eq!(report.summary.object_files, 1);
    let f = path.join("current/pushed.php");
    assert_eq!(std::fs::read(&f).unwrap(), good);
    assert_eq!(std::fs::metadata(&f).unwrap().ino(), obj_ino);
    assert!(store_names(&path).is_empty());
    drop(lock);
    assert_i0(&path);
}

#[test]
fn corrupt_and_stale_objects_are_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("app");
    let root = AppRoot::open_or_create(&path).unwrap();
    let store = ObjectStore::open(&root).unwrap();
    let a = b"aaaa".to_vec();
    let b = b"bbbb".to_vec();
    for data in [&a, &b] {
        let mut w = store.create(Hash::of(data), 0o644, 4).unwrap();
        let verified = put(&mut w, data);
        w.finish(&verified).unwrap().unwrap();
    }
    // Damage one behind the store's back (as a crash before writeback could).
    let damaged = path
        .join(".relsync/objects")
        .join(format!("{}.644", Hash::of(&b).to_hex()));
    std::fs::write(&damaged, b"bbXb").unwrap();
    let wanted = HashSet::from([(Hash::of(&a), 0o644), (Hash::of(&b), 0o644)]);
    assert_eq!(
        store.verified(&wanted).unwrap(),
        HashSet::from([(Hash::of(&a), 0o644)])
    );
    assert!(!damaged.exists());
    // An interrupted receive leaves a temporary; recovery removes it (and keeps young objects).
    std::fs::write(path.join(".relsync/objects/.tmp-1-1"), b"partial").unwrap();
    let lock = root.lock(|_| {}).unwrap();
    let rec = root.recover(&lock).unwrap();
    assert_eq!(rec.objects_removed, 1);
    assert_eq!(store.list().unwrap().len(), 1);
    // Objects older than the limit go too.
    assert_eq!(store.clean(std::time::Duration::ZERO).unwrap(), 1);
    assert!(store.list().unwrap().is_empty());
}

/// Objects the store verified as it wrote them are verified by identity when the release is
/// built, as linked files are; any other object is read again. The cases edit the object in place
/// after it was stored and restore its mtime, which only a re-read can notice.
#[test]
fn objects_verified_on_receipt_are_checked_by_identity_others_are_read() {
    struct Case {
        name: &'static str,
        /// Pass the store's stamps to the build (the daemon that received the object does).
        stamps: bool,
        /// Restore the object's mtime after the in-place edit.
        restore_mtime: bool,
        /// Re-hash linked content anyway (`--verify-all`).
        verify_all: bool,
        built: bool,
    }
    let cases = [
        Case {
            name: "stamp kept, identity trusted",
            stamps: true,
            restore_mtime: true,
            verify_all: false,
            built: true,
        },
        Case {
            name: "mtime changed, read again",
            stamps: true,
            restore_mtime: false,
            verify_all: false,
            built: false,
        },
        Case {
            name: "no stamps (another process), read again",
            stamps: false,
            restore_mtime: true,
            verify_all: false,
            built: false,
        },
        Case {
            name: "verify-all reads it",
            stamps: true,
            restore_mtime: true,
            verify_all: true,
            built: false,
        },
    ];
    for case in cases {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("app");
        let root = AppRoot::open_or_create(&path).unwrap();
        let store = ObjectStore::open(&root).unwrap();
        let good = b"<?php echo 'pushed';".to_vec();
        let h = Hash::of(&good);
        let mut w = store.create(h, 0o644, good.len() as u64).unwrap();
        let verified = put(&mut w, &good);
        w.finish(&verified).unwrap().unwrap();
        let stamps = store.verified_stamps();
        assert_eq!(stamps.len(), 1, "{}", case.name);

        let obj = path.join(".relsync/objects").join(&store_names(&path)[0]);
        let mtime = std::fs::metadata(&obj).unwrap().modified().unwrap();
        let mut f = std::fs::OpenOptions::new().write(true).open(&obj).unwrap();
        f.write_all(b"<?php echo 'EDITED';").unwrap();
        if case.restore_mtime {
            f.set_modified(mtime).unwrap();
        }
        drop(f);

        let target = Manifest::from_unsorted(
            vec![Entry::file("pushed.php", good.len() as u64, 0o644, h).unwrap()],
            &Policy::default(),
        )
        .unwrap();
        let lock = root.lock(|_| {}).unwrap();
        let mut o = opts("r1", false);
        o.use_objects = true;
        o.exec.verify_links = case.verify_all;
        if case.stamps {
            o.exec.object_stamps = std::sync::Arc::new(stamps);
        }
        let built = sync_core::edge::deploy::deploy(&root, &lock, &target, &NoSource, &o, &|_| {});
        assert_eq!(built.is_ok(), case.built, "{}: {built:?}", case.name);
    }
}

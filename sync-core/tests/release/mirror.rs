//! The rsync-style mirror (`plan_mirror` + `apply_mirror`): copies, no-op resyncs, replacement by
//! new inodes, deletion of extras only when asked, and changes between file and directory.

use std::fs;
use std::path::Path;

use sync_core::edge::exec::LocalSource;
use sync_core::edge::mirror::{apply_mirror, MirrorStats};
use sync_core::plan::{plan_mirror, MirrorPlan};
use sync_core::Manifest;

use crate::harness::*;

fn sync(src: &Path, dst: &Path, delete: bool) -> (MirrorPlan, MirrorStats) {
    let sm = manifest_of(src);
    let dm = if dst.exists() {
        manifest_of(dst)
    } else {
        Manifest::empty()
    };
    let plan = plan_mirror(&sm, &dm, delete);
    let stats = apply_mirror(
        dst,
        &plan.ops,
        &LocalSource::open(src).unwrap(),
        &no_progress,
    )
    .unwrap_or_else(|e| panic!("mirror {} -> {}: {e}", src.display(), dst.display()));
    (plan, stats)
}

#[test]
fn mirror_copies_skips_replaces_deletes_and_changes_types() {
    let t = scratch();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    source_a(&src);
    put(&src, "was-file", b"a file, then a directory", 0o644);
    put(
        &src,
        "was-dir/inner.txt",
        b"a directory, then a file",
        0o644,
    );

    // First sync copies everything.
    let (plan, stats) = sync(&src, &dst, false);
    let sm = manifest_of(&src);
    assert_eq!(stats.written_files, sm.file_count() as u64);
    assert_eq!(manifest_of(&dst), sm);

    // Nothing changed: nothing written, every inode and mtime as it was.
    let before = snapshot(&dst);
    let (plan2, stats2) = sync(&src, &dst, false);
    assert!(plan2.ops.is_empty(), "{:?}", plan2.ops);
    assert_eq!(stats2.written_files, 0);
    assert_eq!(snapshot(&dst), before);
    assert_eq!(plan.summary.files, plan2.summary.unchanged_files);

    // An edit lands in a new inode; another name of the old inode keeps the old content.
    let keep = t.path().join("keep");
    fs::hard_link(dst.join("app/edit.php"), &keep).unwrap();
    let old = fs::read(&keep).unwrap();
    put(
        &src,
        "app/edit.php",
        b"<?php echo 'edited after the first sync';\n",
        0o644,
    );
    let (_, stats3) = sync(&src, &dst, false);
    assert_eq!(stats3.written_files, 1);
    let (k, e) = (node(&keep), node(&dst.join("app/edit.php")));
    assert_ne!(k.ino, e.ino);
    assert_eq!(fs::read(&keep).unwrap(), old);
    assert_eq!(
        e.hash,
        Some(hash_of(&fs::read(src.join("app/edit.php")).unwrap()))
    );
    let now = snapshot(&dst);
    for (p, n) in &before {
        if p != "app/edit.php" && p != "app" {
            assert_eq!(now[p].unlinked(), n.unlinked(), "{p} was touched");
        }
    }

    // Extras stay without --delete and go with it.
    put(&dst, "extra.txt", b"only in dst", 0o644);
    put(&dst, "extra-dir/sub/f.txt", b"only in dst", 0o644);
    let (_, stats4) = sync(&src, &dst, false);
    assert_eq!((stats4.written_files, stats4.removed), (0, 0));
    assert!(dst.join("extra.txt").exists() && dst.join("extra-dir/sub/f.txt").exists());
    let (_, stats5) = sync(&src, &dst, true);
    assert_eq!(stats5.removed, 2, "extra.txt and extra-dir");
    assert!(!dst.join("extra.txt").exists() && !dst.join("extra-dir").exists());
    assert_eq!(manifest_of(&dst), manifest_of(&src));

    // File to directory and directory to file, without --delete.
    fs::remove_file(src.join("was-file")).unwrap();
    put(&src, "was-file/now.txt", b"inside", 0o644);
    mkdir(&src, "was-file", 0o755);
    fs::remove_dir_all(src.join("was-dir")).unwrap();
    put(&src, "was-dir", b"now a file", 0o644);
    sync(&src, &dst, false);
    assert_eq!(node(&dst.join("was-file")).kind, Kind::Dir);
    assert_eq!(node(&dst.join("was-dir")).kind, Kind::File);
    assert_eq!(manifest_of(&dst), manifest_of(&src));
    assert!(fs::read_dir(&dst).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".relsync")));
}

//! Fault case 10: a previous release modified behind relsync's back (edited in place with its mtime
//! restored, a file swapped for a hard link or a symlink to an outside file, a directory swapped for
//! a symlink to an outside directory). The next release still gets the manifest's content in fresh
//! inodes, and nothing outside the app root is linked, written or otherwise changed.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::Path;

use sync_core::edge::root::AppRoot;

use crate::harness::*;

enum Tamper {
    EditInPlaceNewMtime,
    EditInPlace,
    /// The same inside a read-only directory, which the rewrite has to open up for an
    /// unprivileged deploy user.
    EditInPlaceReadOnlyDir,
    HardLinkOutside,
    SymlinkOutside,
    DirSymlinkOutside,
}

fn run(tamper: Tamper) {
    let t = scratch();
    let (src_a, src_b) = (t.path().join("sa"), t.path().join("sb"));
    source_a(&src_a);
    source_b(&src_b);
    let outside = t.path().join("outside");
    let original = fs::read(src_a.join("app/same.php")).unwrap();
    let evil: Vec<u8> = original.iter().map(|b| b.to_ascii_uppercase()).collect();
    assert_ne!(evil, original);
    put(&outside, "evil.php", &evil, 0o644);
    put(
        &outside,
        "lib/util.php",
        b"<?php function util() { return 666; }\n",
        0o644,
    );
    put(&outside, "lib/deep/x.php", b"<?php // DEEP\n", 0o640);

    let path = t.path().join("app");
    let app = new_app(&path);
    deploy_tree(&app, &src_a, &opts("r1", true)).unwrap();
    let victim = in_release(
        &path,
        "r1",
        match tamper {
            Tamper::EditInPlaceReadOnlyDir => "bin/tool",
            _ => "app/same.php",
        },
    );
    let stamp = node(&victim);

    // The paths of b whose basis in r1 was tampered with.
    let affected: &[&str] = match tamper {
        Tamper::EditInPlaceNewMtime => {
            let mut f = OpenOptions::new().write(true).open(&victim).unwrap();
            f.write_all(&fs::read(&victim).unwrap().to_ascii_uppercase())
                .unwrap();
            drop(f);
            set_mtime(&victim, stamp.mtime_ns + 1_000_000_000);
            &["app/same.php", "app/dup.php"]
        }
        Tamper::EditInPlace | Tamper::EditInPlaceReadOnlyDir => {
            let mut f = OpenOptions::new().write(true).open(&victim).unwrap();
            f.write_all(&fs::read(&victim).unwrap().to_ascii_uppercase())
                .unwrap();
            drop(f);
            set_mtime(&victim, stamp.mtime_ns);
            let now = node(&victim);
            assert_eq!(
                (now.ino, now.size, now.mtime_ns),
                (stamp.ino, stamp.size, stamp.mtime_ns)
            );
            assert_ne!(now.hash, stamp.hash);
            match tamper {
                Tamper::EditInPlace => &["app/same.php", "app/dup.php"],
                _ => &["bin/tool"],
            }
        }
        Tamper::HardLinkOutside => {
            fs::remove_file(&victim).unwrap();
            fs::hard_link(outside.join("evil.php"), &victim).unwrap();
            set_mtime(&victim, stamp.mtime_ns);
            &["app/same.php", "app/dup.php"]
        }
        Tamper::SymlinkOutside => {
            fs::remove_file(&victim).unwrap();
            symlink(outside.join("evil.php"), &victim).unwrap();
            &["app/same.php", "app/dup.php"]
        }
        Tamper::DirSymlinkOutside => {
            let lib = in_release(&path, "r1", "app/lib");
            fs::remove_dir_all(&lib).unwrap();
            symlink(outside.join("lib"), &lib).unwrap();
            &["app/lib/util.php", "app/lib/deep/x.php"]
        }
    };
    let outside_before = snapshot(&outside);

    let mut o = opts("r2", true);
    // An edit that restores the old mtime is invisible to the identity check of linked files; only
    // re-hashing them (`--verify-all`) catches it. Any other edit changes the stamp.
    o.exec.verify_links = matches!(tamper, Tamper::EditInPlace | Tamper::EditInPlaceReadOnlyDir);
    let report = deploy_tree(&app, &src_b, &o).unwrap();
    assert!(report.exec.link_fallbacks >= 1, "{:?}", report.exec);

    check_release(&AppRoot::open(&path).unwrap(), &path, "r2");
    assert_eq!(
        snapshot(&outside),
        outside_before,
        "outside the app root changed"
    );
    let outside_inodes = inodes(&outside_before);
    let r1_inodes = inodes(&snapshot(&in_release(&path, "r1", "")));
    for p in affected {
        let n = node(&in_release(&path, "r2", p));
        assert_eq!(n.kind, Kind::File, "{p}");
        assert_eq!(
            n.hash,
            Some(hash_of(&fs::read(src_b.join(p)).unwrap())),
            "{p}"
        );
        assert!(
            !outside_inodes.contains(&(n.dev, n.ino)),
            "{p} is an outside inode"
        );
        assert!(
            !r1_inodes.contains(&(n.dev, n.ino)),
            "{p} shares the tampered inode"
        );
    }
    // Untampered files are still linked.
    assert_eq!(
        node(&in_release(&path, "r2", "index.php")).ino,
        node(&in_release(&path, "r1", "index.php")).ino
    );
    let current = fs::read_link(path.join("current")).unwrap();
    assert_eq!(current, Path::new("releases/r2"));
}

#[test]
fn basis_edited_in_place_is_caught_by_its_stamp() {
    run(Tamper::EditInPlaceNewMtime);
}

#[test]
fn basis_edited_in_place_with_mtime_restored() {
    run(Tamper::EditInPlace);
}

#[test]
fn basis_in_a_read_only_directory_edited_in_place() {
    run(Tamper::EditInPlaceReadOnlyDir);
}

#[test]
fn basis_replaced_by_hard_link_to_outside_file() {
    run(Tamper::HardLinkOutside);
}

#[test]
fn basis_replaced_by_symlink_to_outside_file() {
    run(Tamper::SymlinkOutside);
}

#[test]
fn basis_directory_replaced_by_symlink_to_outside_directory() {
    run(Tamper::DirSymlinkOutside);
}

/// A link source the caller checked a moment ago (`ExecOptions::checked_links`) is linked
/// without a second look; when it was replaced in between (here: before the build, by another
/// file with the same size and mtime), verification finds another inode than the record's,
/// names the file, and nothing is activated. Without the claim the executor checks the source
/// itself and writes that file in full.
#[test]
fn a_link_source_changed_after_its_check_fails_verification_by_name() {
    let w = with_a_deployed();
    let (path, src_b, app) = (&w.path, &w.src_b, &w.app);
    let victim = in_release(path, "r1", "app/same.php");
    let before = node(&victim);
    let forged = fs::read(&victim).unwrap().to_ascii_uppercase();
    let swap = victim.with_extension("swap");
    fs::write(&swap, forged).unwrap();
    fs::rename(&swap, &victim).unwrap();
    set_mtime(&victim, before.mtime_ns);
    assert_ne!(node(&victim).ino, before.ino);

    let mut claimed = opts("r2", true);
    let checked = ahash::AHashSet::from([sync_core::RelPath::new("app/same.php").unwrap()]);
    claimed.exec.checked_links = std::sync::Arc::new(ahash::AHashMap::from([(
        id("r1"),
        std::sync::Arc::new(checked),
    )]));
    let err = deploy_tree(app, src_b, &claimed).unwrap_err();
    let message = err.to_string();
    // Both are linked from the changed file; verification runs in parallel and names the first.
    assert!(
        message.contains("app/same.php") || message.contains("app/dup.php"),
        "{message}"
    );
    assert!(message.contains("changed while staging"), "{message}");
    assert!(!path.join("releases/r2").exists());
    assert!(!path.join("releases/r2.staging").exists());
    assert_eq!(
        fs::read_link(path.join("current")).unwrap(),
        Path::new("releases/r1")
    );

    let report = deploy_tree(app, src_b, &opts("r2", true)).unwrap();
    assert!(report.exec.link_fallbacks >= 1, "{:?}", report.exec);
    check_release(&AppRoot::open(path).unwrap(), path, "r2");
}

//! The prestaged tree (`.relsync/next/<current>`): a build on top of it gives the same release as
//! a build from scratch and never changes the release it was made of; a file of that release
//! changed since is not kept (fault case 10); stale and unfinished trees go.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use sync_core::edge::deploy::{self, DeployOptions};
use sync_core::edge::exec::{CheckedLinks, ExecOptions};
use sync_core::edge::root::AppRoot;
use sync_core::edge::EdgeError;

use crate::harness::*;

fn prestage(app: &AppRoot) -> deploy::PrestageReport {
    let lock = app.lock(|_| {}).unwrap();
    deploy::prestage(app, &lock, false, None).unwrap()
}

/// What the need computation of a push would hand the build: `r1`'s files, but `except`, found
/// intact a moment ago.
fn checked(app: &AppRoot, except: &[&str]) -> CheckedLinks {
    let rec = app.load_record(&id("r1")).unwrap();
    let paths = rec
        .manifest
        .files()
        .map(|(p, ..)| p.clone())
        .filter(|p| !except.contains(&p.as_str()))
        .collect();
    Arc::new([(id("r1"), Arc::new(paths))].into_iter().collect())
}

fn over(release: &str, checked: CheckedLinks) -> DeployOptions {
    DeployOptions {
        prestaged: true,
        exec: ExecOptions {
            checked_links: checked,
            ..ExecOptions::default()
        },
        ..opts(release, true)
    }
}

/// What a tree holds, without which inodes hold it: kind, mode, size, content, target.
fn shape(dir: &std::path::Path) -> Vec<(String, String)> {
    snapshot(dir)
        .into_iter()
        .map(|(p, n)| {
            let what = format!("{:?} {:o} {:?} {:?}", n.kind, n.mode, n.hash, n.target);
            let size = if n.kind == Kind::Dir { 0 } else { n.size };
            (p, format!("{what} {size}"))
        })
        .collect()
}

fn next(root: &std::path::Path, name: &str) -> std::path::PathBuf {
    root.join(".relsync/next").join(name)
}

#[test]
fn a_build_on_the_prestaged_tree_is_the_release_a_fresh_build_makes() {
    let w = with_a_deployed();
    let (path, app) = (&w.path, &w.app);
    let r1 = snapshot(&in_release(path, "r1", ""));
    let report = prestage(app);
    assert_eq!(report.prestaged, Some(id("r1")));
    assert!(app.has_prestage(&id("r1")));
    // The tree is r1's own inodes, and a second call leaves it as it is.
    assert_eq!(inodes(&snapshot(&next(path, "r1"))), inodes(&r1));
    assert_eq!(prestage(app).prestaged, None);

    let report = deploy_tree(app, &w.src_b, &over("r2", checked(app, &[]))).unwrap();
    assert!(
        !next(path, "r1").exists(),
        "the tree became the new release"
    );
    check_release(app, path, "r2");
    assert_eq!(
        unlinked(&snapshot(&in_release(path, "r1", ""))),
        unlinked(&r1)
    );
    assert_eq!(report.exec.link_fallbacks, 0);

    // The same release built from scratch elsewhere: the same tree, file for file.
    let fresh = with_a_deployed();
    deploy_tree(&fresh.app, &fresh.src_b, &opts("r2", true)).unwrap();
    assert_eq!(
        shape(&in_release(path, "r2", "")),
        shape(&in_release(&fresh.path, "r2", ""))
    );
    // Unchanged files are r1's inodes, as in a build from scratch.
    let b = |p: &str| node(&in_release(path, "r2", p));
    let a = |p: &str| node(&in_release(path, "r1", p));
    for p in [
        "index.php",
        "app/same.php",
        "app/lib/deep/x.php",
        "bin/tool",
    ] {
        assert_eq!((b(p).dev, b(p).ino), (a(p).dev, a(p).ino), "{p}");
    }
    assert_ne!(b("app/chmod.sh").ino, a("app/chmod.sh").ino);
    assert!(leftovers(path).is_empty());
    assert_i0(path);
}

#[test]
fn a_file_changed_since_it_was_prestaged_is_not_kept() {
    let w = with_a_deployed();
    let (path, app) = (&w.path, &w.app);
    prestage(app);
    // Edited in place after the tree was made: the tree's name for it is the same inode.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let edited = in_release(path, "r1", "app/lib/util.php");
    std::fs::write(&edited, b"<?php // tampered\n").unwrap();
    let r1 = snapshot(&in_release(path, "r1", ""));

    // The need computation found it changed: the build replaces it with B's content.
    deploy_tree(
        app,
        &w.src_b,
        &over("r2", checked(app, &["app/lib/util.php"])),
    )
    .unwrap();
    check_release(app, path, "r2");
    let b = node(&in_release(path, "r2", "app/lib/util.php"));
    assert_ne!(b.ino, node(&edited).ino);
    assert_eq!(
        unlinked(&snapshot(&in_release(path, "r1", ""))),
        unlinked(&r1)
    );
}

#[test]
fn a_file_that_changes_after_its_check_fails_the_build_and_leaves_nothing() {
    let w = with_a_deployed();
    let (path, app) = (&w.path, &w.app);
    prestage(app);
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(in_release(path, "r1", "app/same.php"), b"<?php // later\n").unwrap();
    // Checked "intact" before the edit: kept (and linked to app/dup.php), and verification
    // catches it.
    let err = deploy_tree(app, &w.src_b, &over("r2", checked(app, &[]))).unwrap_err();
    assert!(matches!(err, EdgeError::Verify { .. }), "{err}");
    assert!(!in_release(path, "r2", "").exists());
    assert!(leftovers(path).is_empty());
    assert!(!app.has_prestage(&id("r1")));
}

#[test]
fn stale_unfinished_and_removed_releases_trees_go() {
    let w = with_a_deployed();
    let (path, app) = (&w.path, &w.app);
    prestage(app);
    std::fs::create_dir_all(next(path, "r0.partial/app")).unwrap();
    // A plain build of r2 recovers first (the unfinished tree goes) and leaves r1's tree; r2
    // becomes current, so r1's is stale then.
    let report = deploy_tree(app, &w.src_b, &opts("r2", true)).unwrap();
    assert_eq!(report.recovered.prestages_removed, ["r0.partial"]);
    assert!(next(path, "r1").exists());
    let lock = app.lock(|_| {}).unwrap();
    assert_eq!(app.recover(&lock).unwrap().prestages_removed, ["r1"]);
    assert!(deploy::prestage_due(app, false), "r2's tree is missing");
    let report = deploy::prestage(app, &lock, false, None).unwrap();
    assert_eq!(report.prestaged, Some(id("r2")));
    assert!(!deploy::prestage_due(app, false), "nothing left to do");
    assert!(deploy::prestage_due(app, true), "made again when asked to");
    // Removing a release removes its tree: it would keep the release's inodes.
    app.remove_current().unwrap();
    app.remove_release(&id("r2")).unwrap();
    assert!(!next(path, "r2").exists());
}

#[test]
fn a_cancelled_prestage_leaves_nothing() {
    let w = with_a_deployed();
    let (path, app) = (&w.path, &w.app);
    let lock = app.lock(|_| {}).unwrap();
    let cancel = Arc::new(AtomicBool::new(true));
    let err = deploy::prestage(app, &lock, false, Some(cancel)).unwrap_err();
    assert!(matches!(err, EdgeError::Cancelled(_)), "{err}");
    assert_eq!(
        std::fs::read_dir(path.join(".relsync/next"))
            .unwrap()
            .count(),
        0
    );
}

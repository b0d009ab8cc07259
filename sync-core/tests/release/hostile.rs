//! Fault cases 13 and 14 from a source tree: special files, symlinks leaving the release and
//! world-writable modes are refused before anything is deployed; setuid and setgid bits never reach
//! a release.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use sync_core::edge::scan::{scan, ScanError, ScanOptions};
use sync_core::manifest::{ManifestError, Policy};
use sync_core::path::PathError;

use crate::harness::*;

fn scan_err(src: &Path) -> ScanError {
    scan(src, &ScanOptions::default(), &no_progress).expect_err("scan should refuse the tree")
}

#[test]
fn fifo_in_the_source_is_refused_by_name() {
    let t = scratch();
    let src = t.path().join("src");
    source_a(&src);
    let fifo = src.join("app/queue");
    let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let err = scan_err(&src);
    match &err {
        ScanError::UnsupportedType { path, kind } => {
            assert_eq!(path, &fifo);
            assert_eq!(*kind, "fifo");
        }
        other => panic!("expected UnsupportedType, got {other:?}"),
    }
    assert!(
        err.to_string().contains(&fifo.display().to_string()),
        "{err}"
    );
}

#[test]
fn symlinks_leaving_the_release_are_refused() {
    type Check = fn(&ManifestError) -> bool;
    let table: &[(&str, &str, Check)] = &[
        ("app/passwd", "/etc/passwd", |e| {
            matches!(e, ManifestError::Path(PathError::AbsoluteTarget { .. }))
        }),
        ("app/up", "../../x", |e| {
            matches!(e, ManifestError::Path(PathError::TargetEscapes { .. }))
        }),
        ("app/lib/far", "../../../../etc", |e| {
            matches!(e, ManifestError::Path(PathError::TargetEscapes { .. }))
        }),
        ("app/other-release", "../../r1/index.php", |e| {
            matches!(e, ManifestError::Path(PathError::TargetEscapes { .. }))
        }),
        ("app/chain", "../public/assets/util.php", |e| {
            matches!(e, ManifestError::SymlinkChain { .. })
        }),
    ];
    for (link_path, target, want) in table {
        let t = scratch();
        let src = t.path().join("src");
        source_a(&src);
        link(&src, link_path, target);
        match scan_err(&src) {
            ScanError::Manifest { source, .. } => {
                assert!(want(&source), "{link_path} -> {target}: {source:?}");
                assert!(source.to_string().contains(link_path), "{source}");
            }
            other => panic!("{link_path} -> {target}: expected a manifest error, got {other:?}"),
        }
    }
}

/// Regression: a symlink whose target walks through another symlink and then back out with `..`
/// resolved lexically to somewhere harmless while physically leading elsewhere. `shared` links
/// lead to `ROOT/shared/`, so `s/..` is the app root and `s/../../../shared/y` is outside it.
#[test]
fn symlink_through_a_symlink_and_back_up_is_a_chain() {
    for target in [
        "s/../.relsync/lock",
        "s/../../../shared/y",
        "s/../releases/r1/index.php",
    ] {
        let t = scratch();
        let src = t.path().join("src");
        source_a(&src);
        link(&src, "s", "../../shared/x");
        link(&src, "l", target);
        match scan_err(&src) {
            ScanError::Manifest {
                source: ManifestError::SymlinkChain { path, .. },
                ..
            } => assert_eq!(path.as_str(), "l", "{target}"),
            other => panic!("l -> {target}: expected a symlink chain error, got {other:?}"),
        }
    }
}

#[test]
fn world_writable_is_refused_unless_allowed() {
    let t = scratch();
    let src = t.path().join("src");
    source_a(&src);
    put(&src, "app/open.php", b"<?php\n", 0o666);
    match scan_err(&src) {
        ScanError::Manifest {
            source: ManifestError::WorldWritable { path, mode },
            ..
        } => assert_eq!((path.as_str(), mode), ("app/open.php", 0o666)),
        other => panic!("expected WorldWritable, got {other:?}"),
    }
    let allow = ScanOptions {
        policy: Policy {
            allow_world_writable: true,
            ..Policy::default()
        },
        ..ScanOptions::default()
    };
    let m = scan(&src, &allow, &no_progress).unwrap().manifest;
    let path = t.path().join("app");
    let app = new_app(&path);
    let lock = app.lock(|_| {}).unwrap();
    let source = sync_core::edge::exec::LocalSource::open(&src).unwrap();
    sync_core::edge::deploy::deploy(&app, &lock, &m, &source, &opts("r1", true), &no_progress)
        .unwrap();
    drop(lock);
    assert_eq!(node(&in_release(&path, "r1", "app/open.php")).mode, 0o666);
    assert_eq!(assert_i0(&path).current.as_deref(), Some("r1"));
}

#[test]
fn setuid_and_setgid_bits_are_stripped() {
    let t = scratch();
    let src = t.path().join("src");
    source_a(&src);
    put(&src, "bin2/suid", b"#!/bin/sh\n", 0o4755);
    put(&src, "bin2/sgid", b"#!/bin/sh\n", 0o2755);
    mkdir(&src, "bin2", 0o2775);
    assert_eq!(
        node(&src.join("bin2/suid")).mode,
        0o4755,
        "the fixture needs the bit set"
    );
    let path = t.path().join("app");
    let app = new_app(&path);
    deploy_tree(&app, &src, &opts("r1", true)).unwrap();
    assert_eq!(node(&in_release(&path, "r1", "bin2/suid")).mode, 0o755);
    assert_eq!(node(&in_release(&path, "r1", "bin2/sgid")).mode, 0o755);
    assert_eq!(node(&in_release(&path, "r1", "bin2")).mode, 0o775);
    assert_eq!(assert_i0(&path).current.as_deref(), Some("r1"));
}

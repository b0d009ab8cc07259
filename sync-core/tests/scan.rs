//! Scanning real trees into manifests: entry shapes, filters, hostile file types, the hash cache and
//! the windowed hashing of large files.

use std::collections::BTreeSet;
use std::ffi::{CString, OsStr};
use std::fs::{self, File, FileTimes, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use sync_core::edge::scan::{scan, Scan, ScanError, ScanOptions, RACY_WINDOW};
use sync_core::manifest::{Entry, ManifestError, Policy};
use sync_core::{Hash, RelPath};

fn no_progress(_: u64) {}

fn run(root: &Path, opts: &ScanOptions) -> Result<Scan, ScanError> {
    scan(root, opts, &no_progress)
}

/// Writes `content` at `root/rel` with `mode`, creating parents, and dates it an hour back so the
/// hash cache treats it as settled.
fn file(root: &Path, rel: &str, content: &[u8], mode: u32) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, content).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    age(&p, 3600);
}

fn age(p: &Path, secs: u64) {
    let t = SystemTime::now() - Duration::from_secs(secs);
    File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_times(FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
}

fn dir(root: &Path, rel: &str, mode: u32) {
    let p = root.join(rel);
    fs::create_dir_all(&p).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
}

fn paths(s: &Scan) -> BTreeSet<String> {
    s.manifest
        .entries()
        .iter()
        .map(|e| e.path.to_string())
        .collect()
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn h(content: &[u8]) -> Hash {
    Hash(*blake3::hash(content).as_bytes())
}

#[test]
fn tree_becomes_exact_entries() {
    let td = tempfile::tempdir().unwrap();
    let r = td.path();
    dir(r, "a", 0o755);
    dir(r, "a/b", 0o750);
    file(r, "a/x.php", b"<?php echo 1;", 0o644);
    file(r, "a/b/run.sh", b"#!/bin/sh\nexit 0\n", 0o755);
    file(r, "empty", b"", 0o600);
    file(r, "setuid", b"s", 0o4755);
    dir(r, "shared-group", 0o2775);
    symlink("a/x.php", r.join("link")).unwrap();
    symlink("../empty", r.join("a/up")).unwrap();
    // A symlink to a directory is an entry, never a way into the directory.
    symlink("a/b", r.join("linkdir")).unwrap();

    let s = run(r, &ScanOptions::default()).unwrap();
    let expected = vec![
        Entry::dir("a", 0o755).unwrap(),
        Entry::dir("a/b", 0o750).unwrap(),
        Entry::file("a/b/run.sh", 17, 0o755, h(b"#!/bin/sh\nexit 0\n")).unwrap(),
        Entry::symlink("a/up", "../empty").unwrap(),
        Entry::file("a/x.php", 13, 0o644, h(b"<?php echo 1;")).unwrap(),
        Entry::file("empty", 0, 0o600, h(b"")).unwrap(),
        Entry::symlink("link", "a/x.php").unwrap(),
        Entry::symlink("linkdir", "a/b").unwrap(),
        Entry::file("setuid", 1, 0o755, h(b"s")).unwrap(),
        Entry::dir("shared-group", 0o775).unwrap(),
    ];
    assert_eq!(s.manifest.entries(), expected.as_slice());
    assert_eq!(
        (s.stats.files, s.stats.bytes, s.stats.dirs, s.stats.symlinks),
        (4, 31, 3, 3)
    );
    // The empty file needs no hashing.
    assert_eq!(
        (
            s.stats.hashed_files,
            s.stats.hashed_bytes,
            s.stats.cached_files
        ),
        (3, 31, 0)
    );
}

#[test]
fn root_must_be_a_directory_and_a_root_symlink_is_followed() {
    let td = tempfile::tempdir().unwrap();
    let r = td.path();
    file(r, "src/f", b"x", 0o644);
    symlink("src", r.join("via")).unwrap();
    let direct = run(&r.join("src"), &ScanOptions::default()).unwrap();
    let linked = run(&r.join("via"), &ScanOptions::default()).unwrap();
    assert_eq!(paths(&direct), set(&["f"]));
    assert_eq!(direct.manifest, linked.manifest);
    let err = run(&r.join("src/f"), &ScanOptions::default()).unwrap_err();
    assert!(matches!(err, ScanError::RootNotDir { .. }), "{err:?}");
    let err = run(&r.join("missing"), &ScanOptions::default()).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

fn filter_tree(r: &Path) {
    for f in [
        "app.php",
        "debug.log",
        "logs/a.log",
        "logs/keep.txt",
        "node_modules/x/y.js",
        "src/main.php",
        "src/cache/c.bin",
        "src/deep/cache",
        "tests/t.php",
        "vendor/top.txt",
        "vendor/pkg/top.txt",
        "vendor/pkg/README.md",
    ] {
        file(r, f, f.as_bytes(), 0o644);
    }
    file(
        r,
        "vendor/.relsyncignore",
        b"# vendor docs\n/top.txt\n*.md\n",
        0o644,
    );
}

#[test]
fn excludes_and_nested_ignore_files() {
    let td = tempfile::tempdir().unwrap();
    let r = td.path();
    filter_tree(r);
    let all = [
        "app.php",
        "debug.log",
        "logs",
        "logs/a.log",
        "logs/keep.txt",
        "node_modules",
        "node_modules/x",
        "node_modules/x/y.js",
        "src",
        "src/cache",
        "src/cache/c.bin",
        "src/deep",
        "src/deep/cache",
        "src/main.php",
        "tests",
        "tests/t.php",
        "vendor",
        "vendor/pkg",
        "vendor/pkg/top.txt",
    ];
    let without = |gone: &[&str]| -> BTreeSet<String> {
        all.iter()
            .filter(|p| !gone.contains(p))
            .map(|p| p.to_string())
            .collect()
    };
    let table: Vec<(Vec<&str>, BTreeSet<String>)> = vec![
        (vec![], without(&[])),
        (vec!["*.log"], without(&["debug.log", "logs/a.log"])),
        (
            vec!["/logs"],
            without(&["logs", "logs/a.log", "logs/keep.txt"]),
        ),
        // A trailing slash matches directories only: `src/deep/cache` is a file and stays.
        (vec!["cache/"], without(&["src/cache", "src/cache/c.bin"])),
        (
            vec!["cache"],
            without(&["src/cache", "src/cache/c.bin", "src/deep/cache"]),
        ),
        (
            vec!["node_modules", "tests/"],
            without(&[
                "node_modules",
                "node_modules/x",
                "node_modules/x/y.js",
                "tests",
                "tests/t.php",
            ]),
        ),
        (vec!["*.log", "!debug.log"], without(&["logs/a.log"])),
        (vec!["logs/*", "!logs/keep.txt"], without(&["logs/a.log"])),
        (vec!["src/**/*.bin"], without(&["src/cache/c.bin"])),
        (vec!["/top.txt"], without(&[])),
        (
            vec!["vendor/pkg"],
            without(&["vendor/pkg", "vendor/pkg/top.txt"]),
        ),
    ];
    for (excludes, expected) in table {
        let opts = ScanOptions {
            excludes: excludes.iter().map(|s| s.to_string()).collect(),
            ..ScanOptions::default()
        };
        let s = run(r, &opts).unwrap();
        assert_eq!(paths(&s), expected, "excludes {excludes:?}");
    }

    // Without ignore files, vendor's own rules no longer apply, but the ignore file itself is
    // still never shipped.
    let opts = ScanOptions {
        ignore_file: false,
        ..ScanOptions::default()
    };
    let mut expected = without(&[]);
    expected.insert("vendor/top.txt".into());
    expected.insert("vendor/pkg/README.md".into());
    assert_eq!(paths(&run(r, &opts).unwrap()), expected);

    // A top-level ignore file works like `excludes`, and a nested one can re-include.
    file(r, ".relsyncignore", b"/tests\n*.txt\n", 0o644);
    file(r, "logs/.relsyncignore", b"!keep.txt\n", 0o644);
    let s = run(r, &ScanOptions::default()).unwrap();
    assert_eq!(
        paths(&s),
        without(&["tests", "tests/t.php", "vendor/pkg/top.txt"])
    );
}

#[test]
fn bad_patterns_are_reported() {
    let td = tempfile::tempdir().unwrap();
    file(td.path(), "a", b"a", 0o644);
    let opts = ScanOptions {
        excludes: vec!["{a,b".into()],
        ..ScanOptions::default()
    };
    let err = run(td.path(), &opts).unwrap_err();
    assert!(
        matches!(&err, ScanError::Pattern { pattern, .. } if pattern == "{a,b"),
        "{err:?}"
    );
    file(td.path(), ".relsyncignore", b"ok\n{x,y\n", 0o644);
    let err = run(td.path(), &ScanOptions::default()).unwrap_err();
    assert!(matches!(&err, ScanError::IgnoreFile { .. }), "{err:?}");
    assert!(err.to_string().contains(".relsyncignore"), "{err}");
}

#[test]
fn skipped_paths_are_left_out_with_their_contents() {
    let td = tempfile::tempdir().unwrap();
    let r = td.path();
    file(r, "storage/logs/x.log", b"x", 0o644);
    file(r, ".env", b"SECRET=1", 0o600);
    file(r, "public/storage/keep", b"k", 0o644);
    file(r, "app.php", b"a", 0o644);
    let opts = ScanOptions {
        skip: ["storage", ".env", "not/there"]
            .iter()
            .map(|s| RelPath::new(*s).unwrap())
            .collect(),
        ..ScanOptions::default()
    };
    let s = run(r, &opts).unwrap();
    assert_eq!(
        paths(&s),
        set(&["app.php", "public", "public/storage", "public/storage/keep"])
    );
}

#[test]
fn fifo_is_unsupported_unless_excluded() {
    let td = tempfile::tempdir().unwrap();
    let r = td.path();
    file(r, "a", b"a", 0o644);
    fs::create_dir(r.join("run")).unwrap();
    let fifo = r.join("run/pipe");
    let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);

    let err = run(r, &ScanOptions::default()).unwrap_err();
    match &err {
        ScanError::UnsupportedType { path, kind } => {
            assert!(path.ends_with("run/pipe"), "{err:?}");
            assert_eq!(*kind, "fifo");
        }
        other => panic!("expected UnsupportedType, got {other:?}"),
    }
    assert!(err.to_string().contains("exclude"), "{err}");

    let opts = ScanOptions {
        excludes: vec!["run/pipe".into()],
        ..ScanOptions::default()
    };
    assert_eq!(paths(&run(r, &opts).unwrap()), set(&["a", "run"]));
}

#[test]
fn world_writable_needs_the_policy() {
    let td = tempfile::tempdir().unwrap();
    let r = td.path();
    file(r, "open", b"o", 0o666);
    let err = run(r, &ScanOptions::default()).unwrap_err();
    assert!(
        matches!(
            &err,
            ScanError::Manifest {
                source: ManifestError::WorldWritable { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("open"), "{err}");
    let opts = ScanOptions {
        policy: Policy {
            allow_world_writable: true,
            ..Policy::default()
        },
        ..ScanOptions::default()
    };
    let s = run(r, &opts).unwrap();
    assert_eq!(
        s.manifest.entries(),
        [Entry::file("open", 1, 0o666, h(b"o")).unwrap()]
    );
}

#[test]
fn hostile_names_and_targets_are_refused() {
    let td = tempfile::tempdir().unwrap();
    let r = td.path();
    file(r, "ok", b"o", 0o644);

    // A reserved name is an error until excluded.
    file(r, "sub/.relsync-old", b"x", 0o644);
    let err = run(r, &ScanOptions::default()).unwrap_err();
    assert!(
        matches!(&err, ScanError::Reserved { path } if path.ends_with("sub/.relsync-old")),
        "{err:?}"
    );
    assert!(err.to_string().contains("rename it or exclude it"), "{err}");
    let opts = ScanOptions {
        excludes: vec![".relsync-old".into()],
        ..ScanOptions::default()
    };
    assert_eq!(paths(&run(r, &opts).unwrap()), set(&["ok", "sub"]));
    fs::remove_dir_all(r.join("sub")).unwrap();

    let bad = r.join(OsStr::from_bytes(b"bad\xffname"));
    fs::write(&bad, b"x").unwrap();
    let err = run(r, &ScanOptions::default()).unwrap_err();
    assert!(
        matches!(&err, ScanError::NotUtf8 { path } if path.contains("bad")),
        "{err:?}"
    );
    fs::remove_file(&bad).unwrap();

    fs::write(r.join("new\nline"), b"x").unwrap();
    let err = run(r, &ScanOptions::default()).unwrap_err();
    assert!(matches!(&err, ScanError::Path { .. }), "{err:?}");
    fs::remove_file(r.join("new\nline")).unwrap();

    symlink(OsStr::from_bytes(b"t\xff"), r.join("badlink")).unwrap();
    let err = run(r, &ScanOptions::default()).unwrap_err();
    assert!(matches!(&err, ScanError::TargetNotUtf8 { .. }), "{err:?}");
    fs::remove_file(r.join("badlink")).unwrap();

    // Targets are validated by the manifest: one leaving the tree is refused.
    symlink("/etc/passwd", r.join("abs")).unwrap();
    let err = run(r, &ScanOptions::default()).unwrap_err();
    assert!(matches!(&err, ScanError::Manifest { .. }), "{err:?}");
}

/// Options with a hash cache. Nothing but the test writes to its trees, and each write is done
/// before the scan that should see it, so a file may be cached as soon as it is written.
fn cached(cache: &Path) -> ScanOptions {
    ScanOptions {
        cache_file: Some(cache.to_owned()),
        racy_window: Duration::ZERO,
        ..ScanOptions::default()
    }
}

#[test]
fn cache_skips_unchanged_files_and_rehashes_edits() {
    let td = tempfile::tempdir().unwrap();
    let r = &td.path().join("src");
    let cache = td.path().join("hash.cache");
    for i in 0..50 {
        file(
            r,
            &format!("d{}/f{i}.php", i % 5),
            format!("content {i:03}").as_bytes(),
            0o644,
        );
    }
    let opts = cached(&cache);

    let first = run(r, &opts).unwrap();
    assert_eq!(
        (first.stats.hashed_files, first.stats.cached_files),
        (50, 0)
    );
    assert!(cache.exists());

    let second = run(r, &opts).unwrap();
    assert_eq!(
        (second.stats.hashed_files, second.stats.cached_files),
        (0, 50)
    );
    assert_eq!(second.manifest, first.manifest);

    // Same size, new content and a new mtime: re-hashed, and the new hash is the right one.
    let edited = r.join("d3/f3.php");
    fs::write(&edited, b"content XYZ").unwrap();
    age(&edited, 60);
    let third = run(r, &opts).unwrap();
    assert_eq!(
        (third.stats.hashed_files, third.stats.cached_files),
        (1, 49)
    );
    let e = third
        .manifest
        .get(&RelPath::new("d3/f3.php").unwrap())
        .unwrap();
    assert_eq!(
        e,
        &Entry::file("d3/f3.php", 11, 0o644, h(b"content XYZ")).unwrap()
    );

    // Content changed with the old mtime put back (`touch -r`): ctime still gives it away.
    let before = fs::metadata(r.join("d4/f4.php"))
        .unwrap()
        .modified()
        .unwrap();
    fs::write(r.join("d4/f4.php"), b"content ABC").unwrap();
    File::options()
        .write(true)
        .open(r.join("d4/f4.php"))
        .unwrap()
        .set_modified(before)
        .unwrap();
    let fourth = run(r, &opts).unwrap();
    assert_eq!(fourth.stats.hashed_files, 1);
    let e = fourth
        .manifest
        .get(&RelPath::new("d4/f4.php").unwrap())
        .unwrap();
    assert_eq!(
        e,
        &Entry::file("d4/f4.php", 11, 0o644, h(b"content ABC")).unwrap()
    );
    assert_eq!(run(r, &opts).unwrap().stats.hashed_files, 0);
}

#[test]
fn racy_files_are_not_cached() {
    let td = tempfile::tempdir().unwrap();
    let r = &td.path().join("src");
    let cache = td.path().join("hash.cache");
    file(r, "old", b"old", 0o644);
    file(r, "future", b"future", 0o644);
    // An mtime in the future is inside the racy window however slow the machine is.
    let later = SystemTime::now() + Duration::from_secs(3600);
    File::options()
        .write(true)
        .open(r.join("future"))
        .unwrap()
        .set_modified(later)
        .unwrap();
    let opts = cached(&cache);
    assert_eq!(run(r, &opts).unwrap().stats.hashed_files, 2);
    let again = run(r, &opts).unwrap();
    assert_eq!((again.stats.hashed_files, again.stats.cached_files), (1, 1));
}

#[test]
fn an_old_mtime_on_fresh_content_is_racy_by_its_ctime() {
    let td = tempfile::tempdir().unwrap();
    let r = &td.path().join("src");
    let cache = td.path().join("hash.cache");
    // Written now with an mtime an hour old, as `cp -p` leaves a copy: only ctime is recent.
    let default_window = ScanOptions {
        cache_file: Some(cache.clone()),
        ..ScanOptions::default()
    };
    assert_eq!(default_window.racy_window, RACY_WINDOW);
    let mut checked = false;
    // The check holds only while the write is younger than the window; a machine too slow to do
    // two small scans in well under that gets another try with a fresh write.
    for _ in 0..5 {
        let t = std::time::Instant::now();
        file(r, "copied", b"copied", 0o644);
        let first = run(r, &default_window).unwrap();
        let second = run(r, &default_window).unwrap();
        if t.elapsed() < RACY_WINDOW / 2 {
            assert_eq!((first.stats.hashed_files, first.stats.cached_files), (1, 0));
            assert_eq!(
                (second.stats.hashed_files, second.stats.cached_files),
                (1, 0)
            );
            checked = true;
            break;
        }
    }
    assert!(
        checked,
        "two scans of one file never took less than a second"
    );
    // Once nothing can write in the same tick any more (here: no window), it is cached.
    let settled = cached(&cache);
    assert_eq!(run(r, &settled).unwrap().stats.hashed_files, 1);
    let again = run(r, &settled).unwrap();
    assert_eq!((again.stats.hashed_files, again.stats.cached_files), (0, 1));
}

#[test]
fn rehash_reads_every_file_and_refreshes_the_cache() {
    let td = tempfile::tempdir().unwrap();
    let r = &td.path().join("src");
    let cache = td.path().join("hash.cache");
    for i in 0..20 {
        file(
            r,
            &format!("f{i}"),
            format!("content {i}").as_bytes(),
            0o644,
        );
    }
    file(r, "empty", b"", 0o644);
    let opts = cached(&cache);
    let first = run(r, &opts).unwrap();
    assert_eq!(run(r, &opts).unwrap().stats.cached_files, 20);

    let rehash = ScanOptions {
        rehash: true,
        ..cached(&cache)
    };
    let full = run(r, &rehash).unwrap();
    assert_eq!((full.stats.hashed_files, full.stats.cached_files), (20, 0));
    assert_eq!(full.manifest, first.manifest);
    // The cache it wrote serves the next ordinary scan in full.
    let after = run(r, &opts).unwrap();
    assert_eq!(
        (after.stats.hashed_files, after.stats.cached_files),
        (0, 20)
    );
}

#[test]
fn an_unchanged_cache_is_touched_so_its_mtime_says_when_it_was_used() {
    let td = tempfile::tempdir().unwrap();
    let r = &td.path().join("src");
    let cache = td.path().join("hash.cache");
    file(r, "a", b"a", 0o644);
    let opts = cached(&cache);
    run(r, &opts).unwrap();
    let written = fs::read(&cache).unwrap();
    let long_ago = SystemTime::now() - Duration::from_secs(90 * 24 * 3600);
    File::options()
        .write(true)
        .open(&cache)
        .unwrap()
        .set_modified(long_ago)
        .unwrap();
    assert_eq!(run(r, &opts).unwrap().stats.cached_files, 1);
    let used = fs::metadata(&cache).unwrap().modified().unwrap();
    assert!(used > long_ago + Duration::from_secs(24 * 3600), "{used:?}");
    // Touched, not rewritten.
    assert_eq!(fs::read(&cache).unwrap(), written);
}

#[test]
fn corrupt_or_foreign_cache_is_ignored() {
    let td = tempfile::tempdir().unwrap();
    let r = &td.path().join("src");
    let cache = td.path().join("hash.cache");
    for i in 0..10 {
        file(r, &format!("f{i}"), &[i as u8; 100], 0o644);
    }
    let opts = cached(&cache);
    let reference = run(r, &opts).unwrap();
    let good = fs::read(&cache).unwrap();

    let mut flipped = good.clone();
    flipped[0] ^= 0xff;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("foreign", flipped),
        ("text", b"this is not a cache\n".to_vec()),
    ];
    for (what, bytes) in cases {
        fs::write(&cache, &bytes).unwrap();
        let s = run(r, &opts).unwrap();
        assert_eq!(s.stats.hashed_files, 10, "{what}");
        assert_eq!(s.manifest, reference.manifest, "{what}");
        // The bad cache was replaced by a good one.
        assert_eq!(run(r, &opts).unwrap().stats.hashed_files, 0, "{what}");
    }

    // A cache that is a directory cannot be read or replaced; the scan still succeeds.
    fs::remove_file(&cache).unwrap();
    fs::create_dir(&cache).unwrap();
    assert_eq!(run(r, &opts).unwrap().manifest, reference.manifest);
}

#[test]
fn cache_forgets_removed_files() {
    let td = tempfile::tempdir().unwrap();
    let r = &td.path().join("src");
    let cache = td.path().join("hash.cache");
    for i in 0..40 {
        file(r, &format!("f{i}"), format!("{i}").as_bytes(), 0o644);
    }
    let opts = cached(&cache);
    run(r, &opts).unwrap();
    let full = fs::metadata(&cache).unwrap().len();
    for i in 0..30 {
        fs::remove_file(r.join(format!("f{i}"))).unwrap();
    }
    let s = run(r, &opts).unwrap();
    assert_eq!((s.stats.hashed_files, s.stats.cached_files), (0, 10));
    let small = fs::metadata(&cache).unwrap().len();
    assert!(
        small * 3 < full,
        "cache kept removed files: {small} of {full} bytes"
    );
}

#[test]
fn cache_file_inside_the_tree_is_not_scanned() {
    let td = tempfile::tempdir().unwrap();
    let r = td.path();
    file(r, "a", b"a", 0o644);
    // A leftover temporary cache from a crashed run is not part of the source either.
    file(r, ".relsync-cache.tmp.1", b"junk", 0o644);
    let opts = cached(&r.join(".relsync-cache"));
    run(r, &opts).unwrap();
    assert!(r.join(".relsync-cache").exists());
    let s = run(r, &opts).unwrap();
    assert_eq!(paths(&s), set(&["a"]));
    assert_eq!(s.stats.cached_files, 1);
}

#[test]
fn large_file_is_hashed_in_windows() {
    let td = tempfile::tempdir().unwrap();
    let r = td.path();
    let p = r.join("big.bin");
    let size: u64 = (64 << 20) + 12_345;
    let mut f = File::create(&p).unwrap();
    f.set_len(size).unwrap();
    // Data at the start, across the window boundaries, and in the unaligned tail.
    for off in [0u64, (32 << 20) - 7, (48 << 20) + 1, size - 100] {
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&[0xa5; 64]).unwrap();
    }
    drop(f);
    file(r, "small", b"small", 0o644);

    let seen = AtomicU64::new(0);
    let calls = AtomicU64::new(0);
    let progress = |n: u64| {
        seen.fetch_add(n, Ordering::Relaxed);
        calls.fetch_add(1, Ordering::Relaxed);
    };
    let s = scan(r, &ScanOptions::default(), &progress).unwrap();
    let content = fs::read(&p).unwrap();
    let (_, fsize, _, fhash) = s.manifest.files().next().unwrap();
    assert_eq!(fsize, size);
    assert_eq!(*fhash, h(&content));
    assert_eq!(s.stats.hashed_bytes, size + 5);
    assert_eq!(seen.load(Ordering::Relaxed), size + 5);
    // The big file reports once per window, so a progress bar moves while it is hashed.
    assert!(calls.load(Ordering::Relaxed) >= 4, "{calls:?}");
}

fn peak_rss_kib() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Run with `cargo test -p sync-core --test scan -- --ignored --test-threads 1`: it writes 1 GiB.
#[test]
#[ignore = "writes a 1 GiB file"]
fn hashing_a_huge_file_keeps_memory_bounded() {
    let td = tempfile::tempdir_in(
        std::env::var_os("SCAN_BIG_DIR").map_or_else(std::env::temp_dir, PathBuf::from),
    )
    .unwrap();
    let p = td.path().join("huge.bin");
    let mut f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&p)
        .unwrap();
    let chunk: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    for _ in 0..1024 {
        f.write_all(&chunk).unwrap();
    }
    drop(f);
    // Reset the high-water mark so that only the scan counts.
    fs::write("/proc/self/clear_refs", "5").unwrap();
    let base = peak_rss_kib();
    let s = run(td.path(), &ScanOptions::default()).unwrap();
    let peak = peak_rss_kib();
    assert_eq!(s.stats.hashed_bytes, 1 << 30);
    eprintln!(
        "peak RSS during the scan: {} MiB (base {} MiB)",
        peak / 1024,
        base / 1024
    );
    assert!(peak < 128 * 1024, "peak RSS {peak} KiB");
}

#[test]
fn a_directory_handle_scans_like_its_path_with_excludes_rooted_there() {
    let tmp = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(tmp.path()).unwrap();
    file(&root, "a/keep.php", b"<?php", 0o644);
    file(&root, "a/skip.log", b"log", 0o644);
    file(&root, "top.log", b"log", 0o644);
    file(&root, ".relsync-tmp-1-2", b"temporary", 0o600);
    symlink("a/keep.php", root.join("link")).unwrap();
    let opts = ScanOptions {
        excludes: vec!["*.log".into(), ".relsync-tmp-*".into()],
        ignore_file: false,
        ..ScanOptions::default()
    };
    let by_path = run(&root, &opts).unwrap().manifest;
    let dir = cap_std::fs::Dir::open_ambient_dir(&root, cap_std::ambient_authority()).unwrap();
    let by_dir = sync_core::edge::scan::scan_dir(&dir, &root, &opts, &no_progress)
        .unwrap()
        .manifest;
    assert_eq!(by_dir, by_path);
    let paths: Vec<&str> = by_dir.entries().iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["a", "a/keep.php", "link"]);
}

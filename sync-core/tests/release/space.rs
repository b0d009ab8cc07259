//! Fault case 5: an app root on a small tmpfs. A release that does not fit is refused by the early
//! free-space check, and one that passes the check but meets a full disk part-way fails with the
//! write error; either way no staging is left, the space comes back, and another app on the same
//! file system is unaffected. Mounting needs root: elsewhere these tests print a skip line.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sync_core::edge::deploy;
use sync_core::edge::exec::{ContentSource, LocalSource};
use sync_core::edge::EdgeError;
use sync_core::RelPath;

use crate::harness::*;

const TMPFS_BYTES: u64 = 4 << 20;
/// Slack for the journal line a failed deploy appends (tmpfs allocates whole pages).
const SLACK: u64 = 16 << 10;

/// A tmpfs mounted for the life of the value; unmounted on drop, also when a test panics.
struct Tmpfs {
    target: CString,
}

impl Tmpfs {
    fn mount(path: &Path, bytes: u64) -> Tmpfs {
        fs::create_dir_all(path).unwrap();
        let target = CString::new(path.as_os_str().as_bytes()).unwrap();
        let fstype = CString::new("tmpfs").unwrap();
        let data = CString::new(format!("size={bytes},mode=0755")).unwrap();
        // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                fstype.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mount tmpfs on {}: {} (these tests need root with CAP_SYS_ADMIN)",
            path.display(),
            io::Error::last_os_error()
        );
        Tmpfs { target }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // SAFETY: `target` is a valid NUL-terminated path.
        unsafe {
            if libc::umount2(self.target.as_ptr(), 0) != 0 {
                // Still busy (an open handle in a panicking test): detach it instead.
                libc::umount2(self.target.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn used_bytes(path: &Path) -> u64 {
    let st = rustix::fs::statvfs(path).unwrap();
    (st.f_blocks - st.f_bfree) * st.f_frsize
}

/// Another app sharing the file system, which must come out of it all intact.
fn other_app(mnt: &Path, t: &Path) -> PathBuf {
    let src = t.join("other-src");
    source_a(&src);
    let path = mnt.join("other");
    let app = new_app(&path);
    deploy_tree(&app, &src, &opts("o1", true)).unwrap();
    path
}

fn check_other(path: &Path, before: &std::collections::BTreeMap<String, Node>) {
    let state = assert_i0(path);
    assert_eq!(state.current.as_deref(), Some("o1"));
    assert_eq!(&snapshot(path), before, "the other app changed");
}

#[test]
fn release_larger_than_free_space_is_refused_before_writing() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let t = scratch();
    let mnt = t.path().join("mnt");
    let _fs = Tmpfs::mount(&mnt, TMPFS_BYTES);
    let other = other_app(&mnt, t.path());
    let other_before = snapshot(&other);
    let (small, big) = (t.path().join("small"), t.path().join("big"));
    source_a(&small);
    source_a(&big);
    // Declared (and real) size 6 MiB on a 4 MiB file system.
    put(&big, "assets/video.bin", &vec![7u8; 6 << 20], 0o644);

    let path = mnt.join("app");
    let app = new_app(&path);
    deploy_tree(&app, &small, &opts("r1", true)).unwrap();
    let used = used_bytes(&mnt);
    let err = deploy_tree(&app, &big, &opts("r2", true)).unwrap_err();
    match &err {
        EdgeError::NoSpace { need, free, root } => {
            assert!(need > free && *need >= 6 << 20, "{err}");
            assert_eq!(root, &path);
        }
        other => panic!("expected NoSpace, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(leftovers(&path).is_empty());
    assert!(
        used_bytes(&mnt).abs_diff(used) <= 4096,
        "{} vs {used}",
        used_bytes(&mnt)
    );
    let state = assert_i0(&path);
    assert_eq!(state.current.as_deref(), Some("r1"));
    assert_eq!(state.releases(), ["r1"]);
    check_other(&other, &other_before);
    drop(app);
}

/// Content source that, at its `at`-th file, lets another writer take every free byte of the file
/// system (the space the pre-check saw is gone by the time the engine writes).
struct Squeezed {
    inner: LocalSource,
    ballast: PathBuf,
    at: u64,
    calls: AtomicU64,
}

fn fill(path: &Path) {
    let mut f = File::create(path).unwrap();
    let chunk = vec![0xabu8; 64 << 10];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("fill {}: {e}", path.display()),
        }
    }
}

impl ContentSource for Squeezed {
    fn write_full(&self, path: &RelPath, size: u64, out: &mut File) -> Result<(), EdgeError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == self.at {
            fill(&self.ballast);
        }
        self.inner.write_full(path, size, out)
    }
}

#[test]
fn disk_filling_up_mid_deploy_fails_cleanly_and_space_is_reclaimed() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let t = scratch();
    let mnt = t.path().join("mnt");
    let _fs = Tmpfs::mount(&mnt, TMPFS_BYTES);
    let other = other_app(&mnt, t.path());
    let other_before = snapshot(&other);
    let (small, big) = (t.path().join("small"), t.path().join("big"));
    source_a(&small);
    source_a(&big);
    // 1.5 MiB in 24 files: fits the free space the pre-check sees.
    for i in 0..24u8 {
        put(
            &big,
            &format!("assets/chunk-{i:02}.bin"),
            &vec![i; 64 << 10],
            0o644,
        );
    }

    let path = mnt.join("app");
    let app = new_app(&path);
    deploy_tree(&app, &small, &opts("r1", true)).unwrap();
    let used = used_bytes(&mnt);
    let free = app.free_bytes().unwrap();
    let target = manifest_of(&big);
    assert!(
        target.total_file_bytes() < free,
        "the tree must pass the pre-check"
    );

    let ballast = mnt.join("ballast");
    let source = Squeezed {
        inner: LocalSource::open(&big).unwrap(),
        ballast: ballast.clone(),
        at: 3,
        calls: AtomicU64::new(0),
    };
    let err = {
        let lock = app.lock(|_| {}).unwrap();
        deploy::deploy(
            &app,
            &lock,
            &target,
            &source,
            &opts("r2", true),
            &no_progress,
        )
        .unwrap_err()
    };
    assert!(
        source.calls.load(Ordering::SeqCst) > 3,
        "the ballast was never written"
    );
    let msg = err.to_string();
    // The error names the staged destination and carries the ENOSPC from the copy.
    match &err {
        EdgeError::Staging { path: dest, source } => {
            assert!(dest.to_string_lossy().contains("chunk-"), "{msg}");
            assert!(dest.to_string_lossy().contains(".staging"), "{msg}");
            match source.as_ref() {
                EdgeError::Io { source, .. } => {
                    assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "{msg}")
                }
                other => panic!("expected an I/O error under the staging error, got {other:?}"),
            }
        }
        other => panic!("expected the write error, got {other:?}"),
    }
    assert!(leftovers(&path).is_empty(), "{:?}", leftovers(&path));
    let state = assert_i0(&path);
    assert_eq!(state.current.as_deref(), Some("r1"));
    assert_eq!(state.releases(), ["r1"]);
    check_other(&other, &other_before);

    fs::remove_file(&ballast).unwrap();
    let after = used_bytes(&mnt);
    assert!(
        after.abs_diff(used) <= SLACK,
        "used {after} bytes after, {used} before"
    );

    // The reclaimed space really is usable: the same release now deploys.
    deploy_tree(&app, &big, &opts("r2", true)).unwrap();
    let state = assert_i0(&path);
    assert_eq!(state.current.as_deref(), Some("r2"));
    check_other(&other, &other_before);
}

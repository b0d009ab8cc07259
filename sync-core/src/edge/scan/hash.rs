//! Hashing one source file, checking that it is the file the walk saw and that it did not change.
//!
//! Small files are read through a per-thread buffer. Large files are memory-mapped one window at a time:
//! mapped file pages count towards the process's resident memory until they are unmapped, so mapping
//! a whole 1 GiB file would make peak memory grow with file size. A window is big enough for
//! `update_rayon` to spread it over all cores.

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use memmap2::{Advice, MmapOptions};
use rustix::fs::{FileType, Mode, OFlags, Stat};

use super::cache::Stamp;
use super::{io_err, ScanError};
use crate::manifest::Hash;

/// Files at least this large are hashed through memory-mapped windows.
pub(crate) const LARGE_FILE: u64 = 16 << 20;
/// Bytes mapped at a time; also the most a large file adds to resident memory.
pub(super) const WINDOW: u64 = 32 << 20;
const READ_BUF: usize = 64 << 10;

/// Hashes the regular file at `path`, which the walk saw with `seen`; tests name files by path.
#[cfg(test)]
pub(super) fn hash_file(
    path: &Path,
    seen: &Stamp,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Hash, ScanError> {
    hash_at(rustix::fs::CWD, path, seen, progress, &|| path.to_owned())
}

/// Hashes the regular file `name` in directory `dir`, which the walk saw with `seen`. `path` names
/// the file in errors; it is only built when one occurs.
pub(super) fn hash_at(
    dir: BorrowedFd<'_>,
    name: &Path,
    seen: &Stamp,
    progress: &(dyn Fn(u64) + Sync),
    path: &dyn Fn() -> PathBuf,
) -> Result<Hash, ScanError> {
    let file = open(dir, name, path)?;
    // Small files need no identity check before hashing: the one after it compares the same
    // descriptor with what the walk saw, so a swap between walk and open is caught there, one stat
    // cheaper. A large file is mapped, and mapping past the end of a swapped-in shorter file would
    // fault, so it is checked first.
    if seen.size >= LARGE_FILE {
        unchanged(&file, seen, path)?;
    }
    hash_open(&file, seen, progress, path)
}

/// Opens `name` in `dir` for reading, if it is still a regular file, with its `fstat`: for a file
/// the walk has not looked at yet, whose stamp then comes from the descriptor it hashes. `None`
/// when it is something else now, or gone (the walk then looks at it as at any other entry).
pub(super) fn open_regular(
    dir: BorrowedFd<'_>,
    name: &Path,
    path: &dyn Fn() -> PathBuf,
) -> Result<Option<(File, Stat)>, ScanError> {
    let file = match open(dir, name, path) {
        Ok(f) => f,
        Err(ScanError::Changed { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let st = rustix::fs::fstat(&file).map_err(|e| io_err("read metadata of", &path())(e.into()))?;
    Ok((FileType::from_raw_mode(st.st_mode) == FileType::RegularFile).then_some((file, st)))
}

fn open(dir: BorrowedFd<'_>, name: &Path, path: &dyn Fn() -> PathBuf) -> Result<File, ScanError> {
    // O_NOFOLLOW: a file swapped for a symlink is not followed out of the tree. O_NONBLOCK: one
    // swapped for a FIFO does not hang the open. The identity check after hashing catches every
    // other swap.
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    match rustix::fs::openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => Ok(File::from(fd)),
        Err(rustix::io::Errno::LOOP) => Err(ScanError::Changed { path: path() }),
        Err(e) => Err(io_err("open", &path())(e.into())),
    }
}

/// Whether the open `file` is still the regular file stamped `seen`.
fn unchanged(file: &File, seen: &Stamp, path: &dyn Fn() -> PathBuf) -> Result<(), ScanError> {
    let st = rustix::fs::fstat(file).map_err(|e| io_err("read metadata of", &path())(e.into()))?;
    if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
        && Stamp::from_stat(&st) == *seen
    {
        Ok(())
    } else {
        Err(ScanError::Changed { path: path() })
    }
}

/// Hashes the open regular `file`, stamped `seen` (and for a large file, known to be that file
/// now), then checks that it is still that file: one written to while it was hashed is an error.
pub(super) fn hash_open(
    file: &File,
    seen: &Stamp,
    progress: &(dyn Fn(u64) + Sync),
    path: &dyn Fn() -> PathBuf,
) -> Result<Hash, ScanError> {
    let hash = if seen.size < LARGE_FILE {
        read_all(file, seen.size, progress).map_err(|e| read_error(e, &path()))?
    } else {
        mapped_hash(file, seen.size, progress).map_err(|e| io_err("map", &path())(e))?
    };
    unchanged(file, seen, path)?;
    Ok(hash)
}

#[cfg(test)]
fn read_hash(
    file: &File,
    size: u64,
    path: &Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Hash, ScanError> {
    read_all(file, size, progress).map_err(|e| read_error(e, path))
}

/// A file that ends before the size the walk saw was changed under us; anything else is a failure
/// to read it.
fn read_error(e: io::Error, path: &Path) -> ScanError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ScanError::Changed {
            path: path.to_owned(),
        }
    } else {
        io_err("read", path)(e)
    }
}

/// Hashes the first `size` bytes of `file` through a per-thread buffer; a file shorter than that is
/// an `UnexpectedEof` error.
fn read_all(mut file: &File, size: u64, progress: &(dyn Fn(u64) + Sync)) -> io::Result<Hash> {
    thread_local! {
        // Reused across files: zeroing a fresh buffer per file cost more than reading a small one.
        static BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; READ_BUF].into_boxed_slice());
    }
    BUF.with_borrow_mut(|buf| {
        let mut hasher = blake3::Hasher::new();
        let mut left = size;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = match file.read(&mut buf[..want]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        progress(size);
        Ok(hasher.finalize().into())
    })
}

/// Hashes the first `size` bytes of `file` through memory-mapped windows of [`WINDOW`] bytes, with
/// blake3's multithreaded hasher inside each window; resident memory stays near one window.
pub(crate) fn mapped_hash(
    file: &File,
    size: u64,
    progress: &(dyn Fn(u64) + Sync),
) -> io::Result<Hash> {
    let mut hasher = blake3::Hasher::new();
    let mut offset = 0u64;
    while offset < size {
        let len = WINDOW.min(size - offset);
        // SAFETY: the map is read-only, private to this function and dropped before the next
        // window. Another process truncating the file while it is mapped would raise SIGBUS; that
        // is the accepted cost of mapping (as in b3sum and ripgrep), and any other concurrent
        // change is caught by the metadata check after hashing.
        let map = unsafe {
            MmapOptions::new()
                .offset(offset)
                .len(len as usize)
                .populate()
                .map(file)
        }?;
        // Only a hint; hashing is correct without it.
        let _ = map.advise(Advice::Sequential);
        hasher.update_rayon(&map);
        drop(map);
        progress(len);
        offset += len;
    }
    Ok(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::fd::AsFd;

    fn stamp(path: &Path) -> Stamp {
        Stamp::of(&fs::symlink_metadata(path).unwrap())
    }

    /// A file listed as regular is opened only while it is one: whatever took its name since
    /// (a symlink, a FIFO, a directory) is left to the walk's ordinary look at it, unread.
    #[test]
    fn open_regular_takes_only_a_regular_file() {
        let td = tempfile::tempdir().unwrap();
        let dir = td.path();
        fs::write(dir.join("file"), b"content").unwrap();
        std::os::unix::fs::symlink("file", dir.join("link")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.join("fifo"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        fs::create_dir(dir.join("dir")).unwrap();
        let fd = rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        for (name, regular) in [
            ("file", true),
            ("link", false),
            ("fifo", false),
            ("dir", false),
        ] {
            let path = || dir.join(name);
            let opened = open_regular(fd.as_fd(), Path::new(name), &path).unwrap();
            assert_eq!(opened.is_some(), regular, "{name}");
            if let Some((file, st)) = opened {
                let seen = Stamp::from_stat(&st);
                assert_eq!(seen, stamp(&dir.join(name)), "{name}");
                let hash = hash_open(&file, &seen, &|_| {}, &path).unwrap();
                assert_eq!(hash, Hash::of(b"content"));
            }
        }
        // Gone since the listing: left to the walk too, which reports the tree as changing.
        let path = || dir.join("gone");
        assert!(open_regular(fd.as_fd(), Path::new("gone"), &path)
            .unwrap()
            .is_none());
    }

    #[test]
    fn both_paths_give_the_blake3_hash() {
        let td = tempfile::tempdir().unwrap();
        for len in [1usize, 4095, 4096, 65_536, 65_537, 200_001] {
            let p = td.path().join(format!("f{len}"));
            let content: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            fs::write(&p, &content).unwrap();
            let want = Hash::of(&content);
            let f = File::open(&p).unwrap();
            let size = len as u64;
            assert_eq!(
                read_hash(&f, size, &p, &|_| {}).unwrap(),
                want,
                "read, {len}"
            );
            assert_eq!(
                mapped_hash(&f, size, &|_| {}).unwrap(),
                want,
                "mapped, {len}"
            );
            assert_eq!(
                hash_file(&p, &stamp(&p), &|_| {}).unwrap(),
                want,
                "file, {len}"
            );
        }
    }

    #[test]
    fn changes_since_the_walk_are_detected() {
        let td = tempfile::tempdir().unwrap();
        let p = td.path().join("f");
        let q = td.path().join("g");
        type Change = fn(&Path, &Path);
        let table: &[(&str, Change)] = &[
            ("rewritten, same size", |p, _| {
                fs::write(p, b"HELLO").unwrap()
            }),
            ("grown", |p, _| fs::write(p, b"hello world").unwrap()),
            ("truncated", |p, _| fs::write(p, b"").unwrap()),
            ("replaced", |p, q| {
                fs::write(q, b"hello").unwrap();
                fs::rename(q, p).unwrap();
            }),
            ("symlink", |p, q| {
                fs::write(q, b"hello").unwrap();
                fs::remove_file(p).unwrap();
                std::os::unix::fs::symlink(q, p).unwrap();
            }),
            ("removed", |p, _| fs::remove_file(p).unwrap()),
        ];
        for (what, change) in table {
            let _ = fs::remove_file(&p);
            fs::write(&p, b"hello").unwrap();
            // Dated back so that a rewrite changes the mtime even on a coarse clock.
            let t = std::time::SystemTime::now() - std::time::Duration::from_secs(100);
            File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(t)
                .unwrap();
            let seen = stamp(&p);
            change(&p, &q);
            let err = hash_file(&p, &seen, &|_| {}).expect_err(what);
            assert!(matches!(err, ScanError::Changed { .. }), "{what}: {err:?}");
        }
    }
}

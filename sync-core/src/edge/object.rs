//! The object store: verified file content a push delivered, kept until a release holds it.
//!
//! A daemon decodes every received file into `ROOT/.relsync/objects/<blake3>.<mode>`: written to a
//! fresh temporary file, hashed while written, checked against the manifest's size and hash, given its
//! final mode through its own descriptor and only then renamed into place. A push that is cut short
//! leaves these verified objects behind, so re-running it sends only what is still missing; the next
//! release links them in (`Op::LinkObject`) and they are removed once that release is complete.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use cap_std::fs::Dir;

use super::exec::hash_file;
use super::root::AppRoot;
use super::{EdgeError, IoContext};
use crate::layout;
use crate::manifest::Hash;

const TMP_PREFIX: &str = ".tmp-";

/// The objects directory of one app root.
#[derive(Debug)]
pub struct ObjectStore {
    dir: Dir,
    path: PathBuf,
    counter: AtomicU64,
}

impl ObjectStore {
    /// Opens (creating if needed) `ROOT/.relsync/objects/`.
    pub fn open(root: &AppRoot) -> Result<ObjectStore, EdgeError> {
        let rel = format!("{}/{}", layout::META, layout::OBJECTS);
        let path = root.path().join(&rel);
        match root.dir().create_dir(&rel) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).ctx("create", &path),
        }
        let dir = root.dir().open_dir(&rel).ctx("open", &path)?;
        Ok(ObjectStore {
            dir,
            path,
            counter: AtomicU64::new(0),
        })
    }

    /// Every (content, mode) present.
    pub fn list(&self) -> Result<HashSet<(Hash, u32)>, EdgeError> {
        let mut set = HashSet::new();
        for e in self.dir.entries().ctx("list", &self.path)? {
            let e = e.ctx("list", &self.path)?;
            if let Some(key) = e.file_name().to_str().and_then(layout::parse_object_name) {
                set.insert(key);
            }
        }
        Ok(set)
    }

    /// Re-hashes the objects named in `wanted` and drops any whose content no longer matches (an
    /// object from before a crash may not have reached the disk whole). Returns those still good.
    pub fn verified(
        &self,
        wanted: &HashSet<(Hash, u32)>,
    ) -> Result<HashSet<(Hash, u32)>, EdgeError> {
        let mut good = HashSet::new();
        for key in self.list()?.intersection(wanted) {
            let name = layout::object_name(&key.0, key.1);
            let ok = self
                .dir
                .open(&name)
                .ok()
                .and_then(|f| hash_file(f.into_std()).ok())
                .is_some_and(|h| h == key.0);
            if ok {
                good.insert(*key);
            } else {
                tracing::warn!(object = %name, "dropping a received object whose content does not match its name");
                let _ = self.dir.remove_file(&name);
            }
        }
        Ok(good)
    }

    /// Starts receiving an object of `size` bytes with content `hash` and permission bits `mode`.
    pub fn create(&self, hash: Hash, mode: u32, size: u64) -> Result<ObjectWriter<'_>, EdgeError> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = format!("{TMP_PREFIX}{}-{n}", std::process::id());
        let fd = rustix::fs::openat(
            &self.dir,
            tmp.as_str(),
            rustix::fs::OFlags::WRONLY
                | rustix::fs::OFlags::CREATE
                | rustix::fs::OFlags::EXCL
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .map_err(io::Error::from)
        .ctx("create", self.path.join(&tmp))?;
        Ok(ObjectWriter {
            store: self,
            file: Some(File::from(fd)),
            tmp,
            hash,
            mode,
            size,
            written: 0,
            hasher: blake3::Hasher::new(),
        })
    }

    /// Removes an object (after a complete release took it over).
    pub fn remove(&self, hash: &Hash, mode: u32) -> Result<(), EdgeError> {
        let name = layout::object_name(hash, mode);
        match self.dir.remove_file(&name) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).ctx("remove", self.path.join(name)),
        }
    }

    /// Removes temporaries of interrupted receives, and objects older than `max_age` (pushes that
    /// were never re-run). Returns how many files went.
    pub fn clean(&self, max_age: Duration) -> Result<usize, EdgeError> {
        let now = SystemTime::now();
        let mut removed = 0;
        for e in self.dir.entries().ctx("list", &self.path)? {
            let e = e.ctx("list", &self.path)?;
            let name = e.file_name().to_string_lossy().into_owned();
            let old = e
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| now.duration_since(t.into_std()).ok())
                .is_some_and(|age| age > max_age);
            if name.starts_with(TMP_PREFIX) || old {
                self.dir
                    .remove_file(&name)
                    .ctx("remove", self.path.join(&name))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// An object being received. Bytes beyond the declared size are refused; [`ObjectWriter::finish`]
/// checks size and hash before the object becomes visible. Dropped unfinished, it removes itself.
pub struct ObjectWriter<'s> {
    store: &'s ObjectStore,
    file: Option<File>,
    tmp: String,
    hash: Hash,
    mode: u32,
    size: u64,
    written: u64,
    hasher: blake3::Hasher,
}

impl Write for ObjectWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written + buf.len() as u64 > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("object content exceeds the declared {} bytes", self.size),
            ));
        }
        let f = self.file.as_mut().expect("file present until finish");
        let n = f.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why a received object was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectError {
    #[error("received {got} bytes, the manifest says {want}")]
    Size { got: u64, want: u64 },
    #[error("received content hashes to {got}, the manifest says {want}")]
    Hash { got: String, want: String },
}

impl ObjectWriter<'_> {
    /// Verifies and publishes the object. `Ok(Err(..))` is a content mismatch (the sender's fault);
    /// `Err(..)` a local failure.
    pub fn finish(mut self) -> Result<Result<(), ObjectError>, EdgeError> {
        let file = self.file.take().expect("finish runs once");
        let tmp_path = self.store.path.join(&self.tmp);
        if self.written != self.size {
            drop(file);
            let _ = self.store.dir.remove_file(&self.tmp);
            return Ok(Err(ObjectError::Size {
                got: self.written,
                want: self.size,
            }));
        }
        let got: Hash = self.hasher.finalize().into();
        if got != self.hash {
            drop(file);
            let _ = self.store.dir.remove_file(&self.tmp);
            return Ok(Err(ObjectError::Hash {
                got: got.to_hex(),
                want: self.hash.to_hex(),
            }));
        }
        file.set_permissions(std::fs::Permissions::from_mode(self.mode))
            .ctx("chmod", &tmp_path)?;
        drop(file);
        let name = layout::object_name(&self.hash, self.mode);
        rustix::fs::renameat(
            &self.store.dir,
            self.tmp.as_str(),
            &self.store.dir,
            name.as_str(),
        )
        .map_err(io::Error::from)
        .ctx("rename", self.store.path.join(&name))?;
        Ok(Ok(()))
    }
}

impl Drop for ObjectWriter<'_> {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = self.store.dir.remove_file(&self.tmp);
        }
    }
}

//! The object store: verified file content a push delivered, kept until a release holds it.
//!
//! A daemon decodes every received file into `ROOT/.relsync/objects/<blake3>.<mode>`: written to a
//! fresh temporary file through `delta::apply`, which hashes what it writes; the writer checks that
//! every byte it took is what that check vouched for ([`Verified`]) and that size and hash are the
//! manifest's, so the content is hashed once on its way in, not twice; it is given its
//! final mode (at creation when the umask leaves it whole, else through its own descriptor) and only
//! then renamed into place. A push that is cut short
//! leaves these verified objects behind, so re-running it sends only what is still missing; the next
//! release links them in (`Op::LinkObject`) and they are removed once that release is complete.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use cap_std::fs::Dir;

use super::exec::hash_file;
use super::root::AppRoot;
use super::{EdgeError, IoContext};
use crate::delta::Verified;
use crate::layout;
use crate::manifest::Hash;
use crate::path::RelPath;
use crate::release::FileStamp;

const TMP_PREFIX: &str = ".tmp-";

/// The objects directory of one app root.
#[derive(Debug)]
pub struct ObjectStore {
    dir: Dir,
    path: PathBuf,
    /// `.tmp-<pid>-`: temporaries of this process, told apart from an earlier one's.
    tmp_prefix: String,
    counter: AtomicU64,
    /// Identity of each object this store verified as it was written, taken once it was
    /// complete: the release build verifies such an object by it instead of reading it again.
    stamps: Mutex<HashMap<(Hash, u32), FileStamp>>,
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
        Ok(ObjectStore::in_dir(dir, path))
    }

    /// A store in an already open directory, such as relsyncd's per-sync work directory inside an
    /// export; `path` names it in errors.
    pub fn in_dir(dir: Dir, path: PathBuf) -> ObjectStore {
        ObjectStore {
            dir,
            path,
            tmp_prefix: format!("{TMP_PREFIX}{}-", std::process::id()),
            counter: AtomicU64::new(0),
            stamps: Mutex::new(HashMap::new()),
        }
    }

    /// Where the store lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The store's directory handle.
    pub fn dir(&self) -> &Dir {
        &self.dir
    }

    /// Hard-links the file at `path` below `from` into the store as the object (`hash`, `mode`),
    /// so that its content survives whatever later happens to `path`. The parent directory is
    /// opened through cap-std (never leaving `from`) and the final name is not followed if it is a
    /// symlink. Nothing is read: whoever uses the object checks its content.
    ///
    /// Returns false when no link could be made (another file system, no hard links there, the
    /// file gone); the caller then treats the content as missing.
    pub fn link_from(&self, from: &Dir, path: &RelPath, hash: &Hash, mode: u32) -> bool {
        let parent = match path.parent() {
            Some(p) => match from.open_dir(p.as_str()) {
                Ok(d) => Some(d),
                Err(_) => return false,
            },
            None => None,
        };
        let at = parent.as_ref().unwrap_or(from);
        let name = layout::object_name(hash, mode);
        match rustix::fs::linkat(
            at,
            path.file_name(),
            &self.dir,
            name.as_str(),
            rustix::fs::AtFlags::empty(),
        ) {
            Ok(()) => true,
            Err(rustix::io::Errno::EXIST) => true,
            Err(e) => {
                tracing::debug!(%path, "cannot link into {}: {e}", self.path.display());
                false
            }
        }
    }

    /// Opens the object (`hash`, `mode`) for reading, without following a symlink; `None` when
    /// it is not there.
    pub fn open_object(&self, hash: &Hash, mode: u32) -> Option<File> {
        let mut opts = cap_std::fs::OpenOptions::new();
        opts.read(true);
        cap_fs_ext::OpenOptionsFollowExt::follow(&mut opts, cap_fs_ext::FollowSymlinks::No);
        let f = self
            .dir
            .open_with(layout::object_name(hash, mode), &opts)
            .ok()?;
        Some(f.into_std())
    }

    /// Every (content, mode) present.
    pub fn list(&self) -> Result<HashSet<(Hash, u32)>, EdgeError> {
        let mut set = HashSet::new();
        for e in self.dir.entries().ctx("list", &self.path)? {
            let e = e.ctx_with("list", || self.path.clone())?;
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
        let tmp = format!("{}{n}", self.tmp_prefix);
        // Created with its final mode when the umask leaves that whole, which spares a chmod;
        // nobody else opens temporaries, and one that fails verification is removed.
        let (create_mode, chmod) = match super::umask() {
            Some(mask) if mode & 0o7777 & mask == 0 && mode & 0o7000 == 0 => (mode & 0o777, false),
            _ => (0o600, true),
        };
        let fd = rustix::fs::openat(
            &self.dir,
            tmp.as_str(),
            rustix::fs::OFlags::WRONLY
                | rustix::fs::OFlags::CREATE
                | rustix::fs::OFlags::EXCL
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(create_mode),
        )
        .map_err(io::Error::from)
        .ctx_with("create", || self.path.join(&tmp))?;
        Ok(ObjectWriter {
            store: self,
            file: Some(File::from(fd)),
            tmp,
            hash,
            mode,
            chmod,
            size,
            written: 0,
        })
    }

    /// The identity (inode, size, mtime) of every object this store wrote and verified, as it
    /// was when complete; see `ExecOptions::object_stamps`. An object of an earlier process is
    /// not among them and gets read again.
    pub fn verified_stamps(&self) -> HashMap<(Hash, u32), FileStamp> {
        self.lock_stamps().clone()
    }

    fn lock_stamps(&self) -> std::sync::MutexGuard<'_, HashMap<(Hash, u32), FileStamp>> {
        // Nothing panics while holding it.
        self.stamps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes an object (after a complete release took it over).
    pub fn remove(&self, hash: &Hash, mode: u32) -> Result<(), EdgeError> {
        self.lock_stamps().remove(&(*hash, mode));
        let name = layout::object_name(hash, mode);
        match self.dir.remove_file(&name) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).ctx_with("remove", || self.path.join(name)),
        }
    }

    /// Removes temporaries of interrupted receives, and objects older than `max_age` (pushes that
    /// were never re-run). Returns how many files went.
    pub fn clean(&self, max_age: Duration) -> Result<usize, EdgeError> {
        let now = SystemTime::now();
        let mut removed = 0;
        for e in self.dir.entries().ctx("list", &self.path)? {
            let e = e.ctx_with("list", || self.path.clone())?;
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
/// checks size and hash (as `delta::apply` verified them while writing here) before the object
/// becomes visible. Dropped unfinished, it removes itself.
pub struct ObjectWriter<'s> {
    store: &'s ObjectStore,
    file: Option<File>,
    tmp: String,
    hash: Hash,
    mode: u32,
    /// The file was not created with `mode`.
    chmod: bool,
    size: u64,
    written: u64,
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
    /// Publishes the object if `verified` (what `delta::apply` returned after writing the content
    /// here) vouches for exactly the bytes written, and they have the manifest's size and hash.
    /// `Ok(Err(..))` is a content mismatch (the sender's fault); `Err(..)` a local failure.
    pub fn finish(mut self, verified: &Verified) -> Result<Result<(), ObjectError>, EdgeError> {
        let file = self.file.take().expect("finish runs once");
        if self.written != self.size {
            drop(file);
            let _ = self.store.dir.remove_file(&self.tmp);
            return Ok(Err(ObjectError::Size {
                got: self.written,
                want: self.size,
            }));
        }
        // A check of fewer bytes than were written vouches for none of them.
        let got = verified.hash();
        if got != self.hash || verified.size() != self.written {
            drop(file);
            let _ = self.store.dir.remove_file(&self.tmp);
            return Ok(Err(ObjectError::Hash {
                got: got.to_hex(),
                want: self.hash.to_hex(),
            }));
        }
        if self.chmod {
            file.set_permissions(std::fs::Permissions::from_mode(self.mode))
                .ctx_with("chmod", || self.store.path.join(&self.tmp))?;
        }
        let st = rustix::fs::fstat(&file)
            .map_err(io::Error::from)
            .ctx_with("stat", || self.store.path.join(&self.tmp))?;
        let stamp = FileStamp {
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec),
        };
        drop(file);
        let name = layout::object_name(&self.hash, self.mode);
        rustix::fs::renameat(
            &self.store.dir,
            self.tmp.as_str(),
            &self.store.dir,
            name.as_str(),
        )
        .map_err(io::Error::from)
        .ctx_with("rename", || self.store.path.join(&name))?;
        self.store
            .lock_stamps()
            .insert((self.hash, self.mode), stamp);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_linked_in_outlive_their_names_and_symlinks_are_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let (dest, objects) = (tmp.path().join("dest"), tmp.path().join("objects"));
        std::fs::create_dir_all(dest.join("a")).unwrap();
        std::fs::create_dir(&objects).unwrap();
        std::fs::write(dest.join("a/f"), b"content").unwrap();
        std::fs::write(tmp.path().join("outside"), b"secret").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("outside"), dest.join("a/link")).unwrap();
        let open = |p: &Path| Dir::open_ambient_dir(p, cap_std::ambient_authority()).unwrap();
        let store = ObjectStore::in_dir(open(&objects), objects.clone());
        let from = open(&dest);
        let hash = Hash::of(b"content");
        let path = |p: &str| RelPath::new(p).unwrap();
        assert!(store.link_from(&from, &path("a/f"), &hash, 0o644));
        // Again is fine: the object is there.
        assert!(store.link_from(&from, &path("a/f"), &hash, 0o644));
        assert!(!store.link_from(&from, &path("a/missing"), &hash, 0o600));
        std::fs::remove_file(dest.join("a/f")).unwrap();
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut store.open_object(&hash, 0o644).unwrap(), &mut got)
            .unwrap();
        assert_eq!(got, b"content");
        assert!(store.open_object(&hash, 0o600).is_none());

        // A symlink is linked as the symlink itself and never opened as an object.
        let other = Hash::of(b"secret");
        store.link_from(&from, &path("a/link"), &other, 0o644);
        assert!(store.open_object(&other, 0o644).is_none());
        assert_eq!(
            store.list().unwrap(),
            HashSet::from([(hash, 0o644), (other, 0o644)])
        );
    }

    /// Writes `content` into `w` the way the daemon does, through a full payload and
    /// `delta::apply`, and returns the check it vouches with.
    fn apply(content: &[u8], w: &mut ObjectWriter<'_>) -> Verified {
        let mut payload = Vec::new();
        crate::delta::encode_full(content, &mut payload).unwrap();
        crate::delta::apply(
            crate::delta::DeltaFormat::Full,
            None,
            &payload,
            content.len() as u64,
            &blake3::hash(content),
            w,
        )
        .unwrap()
    }

    #[test]
    fn objects_get_their_mode_whatever_the_umask_and_only_verified_ones_appear() {
        let tmp = tempfile::tempdir().unwrap();
        let open = |p: &Path| Dir::open_ambient_dir(p, cap_std::ambient_authority()).unwrap();
        let store = ObjectStore::in_dir(open(tmp.path()), tmp.path().to_owned());
        // 0o664 and 0o777 are cut by the usual 022 umask, so they take the chmod path.
        for (i, mode) in [0o644, 0o755, 0o600, 0o664, 0o777, 0o400]
            .into_iter()
            .enumerate()
        {
            let content = format!("content {i}").into_bytes();
            let hash = Hash::of(&content);
            let mut w = store.create(hash, mode, content.len() as u64).unwrap();
            let verified = apply(&content, &mut w);
            assert_eq!(w.finish(&verified).unwrap(), Ok(()));
            let meta =
                std::fs::metadata(tmp.path().join(layout::object_name(&hash, mode))).unwrap();
            assert_eq!(meta.permissions().mode() & 0o7777, mode, "mode {mode:o}");
        }
        // Content other than the name says.
        let lie = Hash::of(b"something else");
        let mut w = store.create(lie, 0o644, 3).unwrap();
        let verified = apply(b"abc", &mut w);
        assert!(matches!(
            w.finish(&verified).unwrap(),
            Err(ObjectError::Hash { .. })
        ));
        // Fewer bytes than the manifest's size.
        let short = Hash::of(b"abcd");
        let mut w = store.create(short, 0o644, 4).unwrap();
        let verified = apply(b"abc", &mut w);
        assert_eq!(
            w.finish(&verified).unwrap(),
            Err(ObjectError::Size { got: 3, want: 4 })
        );
        // Right size and a check of the right content, but a byte the check never saw.
        let mut w = store.create(Hash::of(b"abc"), 0o644, 4).unwrap();
        w.write_all(b"x").unwrap();
        let verified = apply(b"abc", &mut w);
        assert!(matches!(
            w.finish(&verified).unwrap(),
            Err(ObjectError::Hash { .. })
        ));
        // None of the refused objects nor any temporary is left.
        let names: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 6, "{names:?}");
        assert!(names.iter().all(|n| layout::parse_object_name(n).is_some()));
    }

    #[test]
    fn the_umask_is_read_from_the_status_line() {
        let cases = [
            ("Name:\tx\nUmask:\t0022\nState:\tR\n", Some(0o022)),
            ("Umask:\t0077\n", Some(0o077)),
            ("Umask:\t0000", Some(0)),
            ("Name:\tx\n", None),
            ("Umask:\tzz\n", None),
        ];
        for (status, want) in cases {
            assert_eq!(crate::edge::parse_umask(status), want, "{status:?}");
        }
    }
}

//! What the client last pushed to each target, kept so the next push can send zstd deltas
//! against the daemon's current files without asking for signatures first.
//!
//! Layout under the cache directory (`$RELSYNC_CACHE_DIR`, else `$XDG_CACHE_HOME/relsync`, else
//! `~/.cache/relsync`; the scan's hash caches live there too):
//!
//! ```text
//! blobs/<blake3 hex>      content, as a plain payload (the `Full` format of `delta`: zstd,
//!                         or raw blocks for a file a push sent as a small delta)
//! targets/<key>.manifest  per `host:port/app` (a push) or `relsync://host:port/export/path` (a
//!                         sync's destination): a header line naming it, then the last manifest
//!                         sent there, in its binary encoding
//! lock                    flock held while blobs are added or pruned
//! prune-state             blobs left by the last prune, blobs added since
//! blob-missing            a blob was found missing or damaged since the cache was last listed
//! ```
//!
//! Blobs are content addressed and verified against their name whenever they are read (through
//! `delta::apply`, which also bounds the output), so a torn or damaged blob is dropped and the
//! file goes out another way; nothing here needs fsync. After each successful push the files of
//! the pushed manifest that are not stored yet are added (in parallel, skipping files over
//! [`MAX_CACHED_FILE`], which go by rsync delta instead) and the target's manifest is replaced.
//! Blobs no target's manifest references are removed once the blobs added since the last such
//! prune reach a quarter of what was left then: a prune reads every target's manifest and lists
//! every blob, which would otherwise cost each push as much as a small patch's transfer, and the
//! garbage it leaves meanwhile stays within that quarter. The counts live in `prune-state`.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rayon::prelude::*;
use sync_core::delta::{self, DeltaFormat};
use sync_core::manifest::{Hash, Manifest, Policy};
use sync_core::wire::max_payload_len;

use super::source::{SourceError, SourceTree};
use super::target::Target;

/// Files larger than this are not cached: storing them costs more than an rsync round trip.
/// Storing copies the whole file on every push that changes it (about half a CPU-second per
/// GiB on tmpfs, more than the rest of the client's work on such a file); the next push of a
/// larger file asks for its signature instead, one round trip shared by every such file, and a
/// delta against a large basis is no cheaper to compute by zstd than by rsync.
pub const MAX_CACHED_FILE: u64 = 16 << 20;
/// Temporary files older than this are leftovers of a killed process.
const STALE_TEMP: Duration = Duration::from_secs(3600);
const TARGET_MAGIC: &str = "relsync-cache-target 1";
const TEMP_PREFIX: &str = ".tmp-";
/// The note [`Cache::note_missing`] leaves.
const MISSING: &str = "blob-missing";

/// Why the cache could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    #[error("cache: cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The contents of `manifest` that a cache recording a push of it stores ([`Cache::record`]):
/// its non-empty files up to [`MAX_CACHED_FILE`].
pub fn kept_contents(manifest: &Manifest) -> HashSet<Hash> {
    manifest
        .files()
        .filter(|(_, size, _, _)| *size > 0 && *size <= MAX_CACHED_FILE)
        .map(|(_, _, _, hash)| *hash)
        .collect()
}

/// What [`Cache::record`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheUpdate {
    /// Blobs added and their compressed size.
    pub stored_files: u64,
    pub stored_bytes: u64,
    /// Files left out: over [`MAX_CACHED_FILE`], or changed since the scan, or failing to write.
    pub skipped_files: u64,
    /// Blobs removed because no target references them any more.
    pub pruned_files: u64,
}

/// Blobs stored for a push that has not succeeded yet; holds the cache lock.
#[derive(Debug)]
pub struct Stored {
    _lock: File,
    update: CacheUpdate,
}

/// The client's content cache.
#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    blobs: PathBuf,
    targets: PathBuf,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Cache {
    /// `$RELSYNC_CACHE_DIR`, else `$XDG_CACHE_HOME/relsync`, else `~/.cache/relsync`.
    pub fn default_dir() -> Option<PathBuf> {
        let env = |k| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        env("RELSYNC_CACHE_DIR")
            .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("relsync")))
            .or_else(|| env("HOME").map(|d| d.join(".cache/relsync")))
    }

    /// Opens (creating) the cache in `dir`.
    pub fn open(dir: &Path) -> Result<Cache, CacheError> {
        let blobs = dir.join("blobs");
        let targets = dir.join("targets");
        for d in [&blobs, &targets] {
            fs::create_dir_all(d).map_err(io_err("create", d))?;
        }
        Ok(Cache {
            dir: dir.to_owned(),
            blobs,
            targets,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn blob_path(&self, hash: &Hash) -> PathBuf {
        self.blobs.join(hash.to_hex())
    }

    fn target_path(&self, target: &dyn fmt::Display) -> PathBuf {
        let key = blake3::hash(target.to_string().as_bytes()).to_hex();
        self.targets.join(format!("{}.manifest", &key[..32]))
    }

    /// Hashes of every stored blob: the contents a push can use as zstd reference.
    pub fn hashes(&self) -> Result<HashSet<Hash>, CacheError> {
        let mut out = HashSet::new();
        for e in fs::read_dir(&self.blobs).map_err(io_err("list", &self.blobs))? {
            let e = e.map_err(io_err("list", &self.blobs))?;
            if let Some(h) = e.file_name().to_str().and_then(Hash::from_hex) {
                out.insert(h);
            }
        }
        Ok(out)
    }

    /// Notes that a blob the cache should hold is not there. Best effort: without the note, the
    /// blob is only restored once its content is pushed as new again.
    fn note_missing(&self) {
        let _ = File::create(self.dir.join(MISSING));
    }

    /// Whether a blob was found missing since the last call, clearing the note: whoever reads
    /// the cache's contents then lists them rather than trusting the targets' manifests, so
    /// the push's store step puts the missing ones back.
    pub fn take_missing(&self) -> bool {
        fs::remove_file(self.dir.join(MISSING)).is_ok()
    }

    pub fn contains(&self, hash: &Hash) -> bool {
        self.blob_path(hash).is_file()
    }

    /// The content with `hash` and `size`, if stored and intact. A damaged blob is removed.
    /// Either way a blob that was asked for and is not there is noted ([`Cache::take_missing`]).
    pub fn load(&self, hash: &Hash, size: u64) -> Result<Option<Vec<u8>>, CacheError> {
        let path = self.blob_path(hash);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.note_missing();
                return Ok(None);
            }
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        let mut payload = Vec::new();
        file.take(max_payload_len(size).saturating_add(1))
            .read_to_end(&mut payload)
            .map_err(io_err("read", &path))?;
        let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        let expected = blake3::Hash::from_bytes(hash.0);
        match delta::apply(DeltaFormat::Full, None, &payload, size, &expected, &mut out) {
            Ok(_) => Ok(Some(out)),
            Err(e) => {
                tracing::debug!("cache: dropping damaged blob {}: {e}", path.display());
                let _ = fs::remove_file(&path);
                self.note_missing();
                Ok(None)
            }
        }
    }

    /// Stores `payload`, a `Full` payload (plain zstd) of the content with `hash`, unless a
    /// blob for it exists. Returns whether it wrote one.
    pub fn store_payload(&self, hash: &Hash, payload: &[u8]) -> Result<bool, CacheError> {
        let path = self.blob_path(hash);
        if path.exists() {
            return Ok(false);
        }
        write_atomic(&self.blobs, &path, &[payload])?;
        Ok(true)
    }

    /// The manifest last pushed to `target` (a [`Target`], or a `SyncTarget` naming a sync's
    /// destination), if any (and readable). Pushes use [`Cache::last_manifest_encoding`].
    #[cfg(test)]
    pub fn last_manifest(&self, target: &dyn fmt::Display) -> Result<Option<Manifest>, CacheError> {
        Ok(self
            .last_manifest_encoding(target)?
            .and_then(|bytes| Manifest::decode(&bytes, &Policy::default()).ok()))
    }

    /// The encoding of the manifest last pushed to `target` (a [`Target`], or a `SyncTarget`
    /// naming a sync's destination) as it was stored, not decoded: what a push names by its
    /// digest and compresses the new manifest against. Bytes that are no manifest are
    /// harmless there: no daemon keeps a manifest with their digest, so it is sent whole.
    pub fn last_manifest_encoding(
        &self,
        target: &dyn fmt::Display,
    ) -> Result<Option<Arc<[u8]>>, CacheError> {
        let path = self.target_path(target);
        match fs::read(&path) {
            Ok(bytes) => Ok(target_file_manifest(&bytes).map(Arc::from)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }

    /// After a successful push of `source`'s manifest to `target`: stores the files not stored
    /// yet, makes the manifest the target's last one, and prunes unreferenced blobs.
    pub fn record(&self, target: &Target, source: &SourceTree) -> Result<CacheUpdate, CacheError> {
        self.commit(self.store_missing(source)?, target, source.manifest())
    }

    /// The first half of [`Cache::record`], which may run while the daemon is still building
    /// the release: stores the files of `source`'s manifest that are not stored yet. Holds the
    /// cache lock until the result is passed to [`Cache::commit`] (or dropped, when the push
    /// failed: the new blobs then go at the next prune).
    pub fn store_missing(&self, source: &SourceTree) -> Result<Stored, CacheError> {
        self.store_missing_from(source, None)
    }

    /// [`Cache::store_missing`] with the contents the cache held when the caller listed them
    /// (`present`), instead of listing them again; a content not listed is looked up by itself
    /// (the push may have stored it since). A blob removed since is not written again: the next
    /// push has one basis less.
    pub fn store_missing_from(
        &self,
        source: &SourceTree,
        present: Option<&HashSet<Hash>>,
    ) -> Result<Stored, CacheError> {
        let lock = self.lock()?;
        let listed;
        let (present, listed_now) = match present {
            Some(p) => (p, false),
            None => {
                listed = self.hashes()?;
                (&listed, true)
            }
        };
        let mut seen = HashSet::new();
        let mut skipped = 0u64;
        let todo: Vec<_> = source
            .manifest()
            .files()
            .filter(|(_, size, _, hash)| *size > 0 && seen.insert(**hash))
            .filter(|(_, size, _, hash)| {
                let big = *size > MAX_CACHED_FILE;
                skipped += u64::from(big);
                // A listing made ahead misses what the push stored since (its full payloads).
                !big && !present.contains(hash) && (listed_now || !self.contains(hash))
            })
            .collect();
        let results: Vec<Result<u64, String>> = todo
            .par_iter()
            .map(|(path, size, _, hash)| {
                let content = source
                    .read(path, *size, hash)
                    .map_err(|e: SourceError| e.to_string())?;
                let mut payload = Vec::with_capacity(content.len() / 4);
                delta::encode_full(&content, &mut payload).map_err(|e| e.to_string())?;
                self.store_payload(hash, &payload)
                    .map_err(|e| e.to_string())?;
                Ok(payload.len() as u64)
            })
            .collect();
        let mut update = CacheUpdate::default();
        for r in results {
            match r {
                Ok(n) => {
                    update.stored_files += 1;
                    update.stored_bytes += n;
                }
                Err(e) => {
                    tracing::debug!("cache: not storing a file: {e}");
                    skipped += 1;
                }
            }
        }
        update.skipped_files = skipped;
        Ok(Stored {
            _lock: lock,
            update,
        })
    }

    /// The second half of [`Cache::record`], once the push succeeded: makes `manifest` the
    /// target's last one and prunes blobs no target references.
    pub fn commit(
        &self,
        stored: Stored,
        target: &dyn fmt::Display,
        manifest: &Manifest,
    ) -> Result<CacheUpdate, CacheError> {
        let mut update = stored.update.clone();
        let head = format!("{TARGET_MAGIC}\n{target}\n").into_bytes();
        let path = self.target_path(target);
        write_atomic(&self.targets, &path, &[&head, &manifest.encode()])?;
        update.pruned_files = self.prune_when_due(update.stored_files)?;
        Ok(update)
    }

    /// [`Cache::commit`] for many targets that received the same manifest (a fleet push): one
    /// prune at the end instead of one per target.
    pub fn commit_all(
        &self,
        stored: Stored,
        targets: &[Target],
        manifest: &Manifest,
    ) -> Result<CacheUpdate, CacheError> {
        let mut update = stored.update.clone();
        let encoded = manifest.encode();
        for target in targets {
            let head = format!("{TARGET_MAGIC}\n{target}\n").into_bytes();
            write_atomic(&self.targets, &self.target_path(target), &[&head, &encoded])?;
        }
        update.pruned_files = self.prune_when_due(update.stored_files)?;
        Ok(update)
    }

    /// Removes blobs that no target's last manifest references, and stale temporary files.
    pub fn prune(&self) -> Result<u64, CacheError> {
        let _lock = self.lock()?;
        Ok(self.prune_locked()?.0)
    }

    /// Counts `added` new blobs and prunes once those added since the last prune reach a
    /// quarter of the blobs it left (see the module docs). Called with the lock held.
    fn prune_when_due(&self, added: u64) -> Result<u64, CacheError> {
        let path = self.dir.join("prune-state");
        let state = fs::read_to_string(&path).ok().and_then(|text| {
            let mut n = text.split_whitespace().map(|w| w.parse::<u64>().ok());
            Some((n.next()??, n.next()??))
        });
        let write = |left: u64, since: u64| {
            write_atomic(&self.dir, &path, &[format!("{left} {since}\n").as_bytes()])
        };
        if let Some((left, since)) = state {
            let since = since.saturating_add(added);
            if since.saturating_mul(4) < left {
                write(left, since)?;
                return Ok(0);
            }
        }
        let (removed, left) = self.prune_locked()?;
        write(left, 0)?;
        Ok(removed)
    }

    /// The blobs removed, and the blobs left.
    fn prune_locked(&self) -> Result<(u64, u64), CacheError> {
        let mut referenced = HashSet::new();
        for e in fs::read_dir(&self.targets).map_err(io_err("list", &self.targets))? {
            let e = e.map_err(io_err("list", &self.targets))?;
            let path = e.path();
            if remove_if_stale_temp(&path) {
                continue;
            }
            let parsed = fs::read(&path).ok().and_then(|bytes| {
                Manifest::decode(target_file_manifest(&bytes)?, &Policy::default()).ok()
            });
            match parsed {
                Some(m) => referenced.extend(m.files().map(|(_, _, _, h)| *h)),
                None => {
                    tracing::debug!("cache: removing unreadable {}", path.display());
                    let _ = fs::remove_file(&path);
                }
            }
        }
        let (mut removed, mut left) = (0, 0);
        for e in fs::read_dir(&self.blobs).map_err(io_err("list", &self.blobs))? {
            let e = e.map_err(io_err("list", &self.blobs))?;
            let path = e.path();
            if remove_if_stale_temp(&path) {
                continue;
            }
            let keep = e
                .file_name()
                .to_str()
                .and_then(Hash::from_hex)
                .is_some_and(|h| referenced.contains(&h));
            if !keep && fs::remove_file(&path).is_ok() {
                removed += 1;
            } else {
                left += 1;
            }
        }
        Ok((removed, left))
    }

    fn lock(&self) -> Result<File, CacheError> {
        let path = self.dir.join("lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io_err("lock", &path)(e.into()))?;
        Ok(f)
    }
}

/// The manifest encoding of a target file, after checking its header (magic, target name).
fn target_file_manifest(bytes: &[u8]) -> Option<&[u8]> {
    let rest = bytes
        .strip_prefix(TARGET_MAGIC.as_bytes())?
        .strip_prefix(b"\n")?;
    let nl = rest.iter().position(|b| *b == b'\n')?;
    std::str::from_utf8(&rest[..nl]).ok()?;
    Some(&rest[nl + 1..])
}

/// Writes `parts` to a temporary file in `dir` and renames it to `path`.
fn write_atomic(dir: &Path, path: &Path, parts: &[&[u8]]) -> Result<(), CacheError> {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!("{TEMP_PREFIX}{}-{n}", std::process::id()));
    let written = (|| {
        let mut f = File::options().write(true).create_new(true).open(&tmp)?;
        for p in parts {
            f.write_all(p)?;
        }
        fs::rename(&tmp, path)
    })();
    written.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err("write", path)(e)
    })
}

fn remove_if_stale_temp(path: &Path) -> bool {
    let is_temp = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(TEMP_PREFIX));
    if !is_temp {
        return false;
    }
    let old = fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age > STALE_TEMP);
    if old {
        let _ = fs::remove_file(path);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    use sync_core::manifest::Entry;

    struct Fixture {
        _tmp: tempfile::TempDir,
        src: PathBuf,
        cache: Cache,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir(&src).unwrap();
        let cache = Cache::open(&tmp.path().join("cache")).unwrap();
        Fixture {
            _tmp: tmp,
            src,
            cache,
        }
    }

    /// Writes `files` into the source dir and returns a tree over exactly those files.
    fn tree(fx: &Fixture, files: &[(&str, &[u8])]) -> SourceTree {
        for e in fs::read_dir(&fx.src).unwrap() {
            fs::remove_file(e.unwrap().path()).unwrap();
        }
        let entries = files
            .iter()
            .map(|(p, c)| {
                fs::write(fx.src.join(p), c).unwrap();
                Entry::file(p, c.len() as u64, 0o644, Hash::of(c)).unwrap()
            })
            .collect();
        let m = Manifest::from_unsorted(entries, &Policy::default()).unwrap();
        SourceTree::open(&fx.src, Arc::new(m)).unwrap()
    }

    fn target(s: &str) -> Target {
        Target::parse(s).unwrap()
    }

    fn hashes(contents: &[&[u8]]) -> HashSet<Hash> {
        contents.iter().map(|c| Hash::of(c)).collect()
    }

    #[test]
    fn the_last_manifest_is_read_as_it_was_stored() {
        let fx = fixture();
        let one = target("web1/shop");
        assert!(fx.cache.last_manifest_encoding(&one).unwrap().is_none());
        let t = tree(&fx, &[("a", b"alpha content")]);
        fx.cache.record(&one, &t).unwrap();
        assert_eq!(
            fx.cache.last_manifest_encoding(&one).unwrap().as_deref(),
            Some(&*t.manifest().encode())
        );

        // A damaged header: no manifest at all.
        let path = fx.cache.target_path(&one);
        fs::write(&path, b"relsync-cache-target 1 web1/shop").unwrap();
        assert!(fx.cache.last_manifest_encoding(&one).unwrap().is_none());
        // Damaged bytes after a good header are handed on as stored, and never decode.
        let mut bytes = format!("{TARGET_MAGIC}\n{one}\n").into_bytes();
        bytes.extend_from_slice(b"not a manifest");
        fs::write(&path, &bytes).unwrap();
        assert_eq!(
            fx.cache.last_manifest_encoding(&one).unwrap().as_deref(),
            Some(&b"not a manifest"[..])
        );
        assert!(fx.cache.last_manifest(&one).unwrap().is_none());
    }

    #[test]
    fn the_contents_read_ahead_come_from_the_last_manifest_or_else_the_listing() {
        let fx = fixture();
        let one = target("web1/shop");
        let (a, b): (&[u8], &[u8]) = (b"alpha content", b"beta content");
        let t = tree(&fx, &[("a", a), ("b", b), ("empty", b"")]);
        fx.cache.record(&one, &t).unwrap();
        // Another target's blob is in the cache, but not in what was pushed to this one.
        let other = tree(&fx, &[("c", b"gamma")]);
        fx.cache.record(&target("web2/shop"), &other).unwrap();

        let view = crate::client::read_cache_for(&fx.cache, &one).unwrap();
        assert_eq!(*view.contents, hashes(&[a, b]));
        assert_eq!(view.last_manifest.as_deref(), Some(&*t.manifest().encode()));
        assert_eq!(
            view.last_decoded.map(|m| m.digest()),
            Some(t.manifest().digest())
        );

        // A blob found missing (removed by hand, or dropped as damaged) makes the next read
        // list the cache, once, so the push's store step writes it again.
        fs::remove_file(fx.cache.blob_path(&Hash::of(a))).unwrap();
        assert_eq!(fx.cache.load(&Hash::of(a), a.len() as u64).unwrap(), None);
        let view = crate::client::read_cache_for(&fx.cache, &one).unwrap();
        assert_eq!(*view.contents, fx.cache.hashes().unwrap());
        assert!(!view.contents.contains(&Hash::of(a)));
        assert!(
            view.last_decoded.is_some(),
            "the manifest is still the basis"
        );
        let view = crate::client::read_cache_for(&fx.cache, &one).unwrap();
        assert_eq!(*view.contents, hashes(&[a, b]), "the note was taken");
        fs::write(fx.cache.blob_path(&Hash::of(b)), b"damaged").unwrap();
        assert_eq!(fx.cache.load(&Hash::of(b), b.len() as u64).unwrap(), None);
        assert!(fx.cache.take_missing() && !fx.cache.take_missing());

        // Files too large to cache are not claimed.
        let big = Entry::file("big", MAX_CACHED_FILE + 1, 0o644, Hash::of(b"big")).unwrap();
        let small = Entry::file("small", 5, 0o644, Hash::of(b"small")).unwrap();
        let m = Manifest::from_unsorted(vec![big, small], &Policy::default()).unwrap();
        assert_eq!(kept_contents(&m), hashes(&[b"small"]));

        // A last manifest that does not decode: the cache is listed, and no basis is offered.
        let mut bytes = format!("{TARGET_MAGIC}\n{one}\n").into_bytes();
        bytes.extend_from_slice(b"not a manifest");
        fs::write(fx.cache.target_path(&one), &bytes).unwrap();
        let view = crate::client::read_cache_for(&fx.cache, &one).unwrap();
        assert_eq!(*view.contents, fx.cache.hashes().unwrap());
        assert!(view.last_manifest.is_none() && view.last_decoded.is_none());
    }

    #[test]
    fn record_stores_what_was_pushed_and_prunes_what_no_target_needs() {
        let fx = fixture();
        let (a, b, c): (&[u8], &[u8], &[u8]) = (b"alpha content", b"beta content", b"gamma");
        let one = target("web1/shop");
        let two = target("web2/shop");

        let t = tree(&fx, &[("a", a), ("b", b), ("dup", a), ("empty", b"")]);
        let u = fx.cache.record(&one, &t).unwrap();
        // Two distinct non-empty contents; the duplicate and the empty file add nothing.
        assert_eq!((u.stored_files, u.pruned_files), (2, 0));
        assert_eq!(fx.cache.hashes().unwrap(), hashes(&[a, b]));
        assert_eq!(
            fx.cache.last_manifest(&one).unwrap().unwrap().digest(),
            t.manifest().digest()
        );
        assert!(fx.cache.last_manifest(&two).unwrap().is_none());

        // Another target keeps `b` alive; the first target moves on to `c` only.
        let t2 = tree(&fx, &[("b", b)]);
        let u = fx.cache.record(&two, &t2).unwrap();
        assert_eq!((u.stored_files, u.pruned_files), (0, 0));
        let t3 = tree(&fx, &[("c", c)]);
        let u = fx.cache.record(&one, &t3).unwrap();
        assert_eq!((u.stored_files, u.pruned_files), (1, 1));
        assert_eq!(fx.cache.hashes().unwrap(), hashes(&[b, c]));
        assert_eq!(fx.cache.load(&Hash::of(c), 5).unwrap().as_deref(), Some(c));
        assert_eq!(fx.cache.load(&Hash::of(a), a.len() as u64).unwrap(), None);
    }

    #[test]
    fn one_commit_records_many_targets() {
        let fx = fixture();
        let (a, b): (&[u8], &[u8]) = (b"alpha content", b"beta content");
        let hosts = [target("web1/shop"), target("web2/shop")];
        let t = tree(&fx, &[("a", a)]);
        fx.cache.record(&hosts[0], &t).unwrap();
        let t2 = tree(&fx, &[("b", b)]);
        let stored = fx.cache.store_missing(&t2).unwrap();
        let u = fx.cache.commit_all(stored, &hosts, t2.manifest()).unwrap();
        // `a` was only web1's, which now has `b` like web2.
        assert_eq!((u.stored_files, u.pruned_files), (1, 1));
        for h in &hosts {
            let m = fx.cache.last_manifest(h).unwrap().unwrap();
            assert_eq!(m.digest(), t2.manifest().digest(), "{h}");
        }
        assert_eq!(fx.cache.hashes().unwrap(), hashes(&[b]));
    }

    #[test]
    fn contents_listed_ahead_are_not_stored_again() {
        let fx = fixture();
        let (a, b, c): (&[u8], &[u8], &[u8]) = (b"alpha content", b"beta content", b"gamma");
        let t = tree(&fx, &[("a", a)]);
        fx.cache.record(&target("web1/shop"), &t).unwrap();
        let t2 = tree(&fx, &[("a", a), ("b", b), ("c", c)]);
        // (what the caller listed, what was stored since, what is stored, what the cache then
        // holds)
        type Contents<'a> = &'a [&'a [u8]];
        let cases: &[(Option<Contents>, Contents, u64, Contents)] = &[
            (None, &[], 2, &[a, b, c]),
            // The listing holds `a` only: `b` and `c` are stored.
            (Some(&[a]), &[], 2, &[a, b, c]),
            // `b` was stored after the listing (a full payload the push sent): not again.
            (Some(&[a]), &[b], 1, &[a, b, c]),
            // A listing that says `c` is there already: it is not written.
            (Some(&[a, b, c]), &[], 0, &[a]),
        ];
        for (listed, since, stored, holds) in cases {
            for h in fx.cache.hashes().unwrap() {
                if h != Hash::of(a) {
                    fs::remove_file(fx.cache.blob_path(&h)).unwrap();
                }
            }
            for content in *since {
                let mut payload = Vec::new();
                delta::encode_full(content, &mut payload).unwrap();
                fx.cache
                    .store_payload(&Hash::of(content), &payload)
                    .unwrap();
            }
            let listed = listed.map(hashes);
            let s = fx.cache.store_missing_from(&t2, listed.as_ref()).unwrap();
            assert_eq!(s.update.stored_files, *stored, "{listed:?}");
            drop(s);
            assert_eq!(fx.cache.hashes().unwrap(), hashes(holds), "{listed:?}");
        }
    }

    #[test]
    fn blobs_left_behind_are_pruned_once_a_quarter_as_many_were_added() {
        let fx = fixture();
        let host = target("web1/shop");
        let files: Vec<(String, Vec<u8>)> = (0..8)
            .map(|i| (format!("f{i}"), format!("content of file {i}").into_bytes()))
            .collect();
        let with = |edits: &[(usize, &str)]| {
            let mut f = files.clone();
            for (i, c) in edits {
                f[*i].1 = c.as_bytes().to_vec();
            }
            f
        };
        let record = |f: &[(String, Vec<u8>)]| {
            let refs: Vec<(&str, &[u8])> = f.iter().map(|(p, c)| (p.as_str(), &c[..])).collect();
            fx.cache.record(&host, &tree(&fx, &refs)).unwrap()
        };
        let all =
            |f: &[(String, Vec<u8>)]| f.iter().map(|(_, c)| Hash::of(c)).collect::<HashSet<_>>();
        let u = record(&files);
        assert_eq!((u.stored_files, u.pruned_files), (8, 0));
        // One blob added against eight left: the replaced one stays for now.
        let one = with(&[(0, "edit one")]);
        let u = record(&one);
        assert_eq!((u.stored_files, u.pruned_files), (1, 0));
        assert_eq!(fx.cache.hashes().unwrap().len(), 9);
        // Two added since the prune is a quarter of eight: both replaced blobs go.
        let two = with(&[(0, "edit one"), (1, "edit two")]);
        let u = record(&two);
        assert_eq!((u.stored_files, u.pruned_files), (1, 2));
        assert_eq!(fx.cache.hashes().unwrap(), all(&two));
        // An explicit prune always runs.
        let three = with(&[(0, "edit one"), (1, "edit two"), (2, "edit three")]);
        assert_eq!(record(&three).pruned_files, 0);
        assert_eq!(fx.cache.prune().unwrap(), 1);
        assert_eq!(fx.cache.hashes().unwrap(), all(&three));
    }

    #[test]
    fn damaged_blobs_are_dropped_not_used() {
        let fx = fixture();
        let content: &[u8] = b"some php file content that is cached";
        let t = tree(&fx, &[("x.php", content)]);
        fx.cache.record(&target("h/app"), &t).unwrap();
        let h = Hash::of(content);
        let size = content.len() as u64;
        assert_eq!(fx.cache.load(&h, size).unwrap().as_deref(), Some(content));
        // Asked for with the wrong size: refused by the bounded decoder, and dropped.
        assert_eq!(fx.cache.load(&h, size + 1).unwrap(), None);
        assert!(!fx.cache.contains(&h));

        fx.cache.record(&target("h/app"), &t).unwrap();
        let mut other = Vec::new();
        delta::encode_full(b"different bytes", &mut other).unwrap();
        fs::write(fx.cache.blob_path(&h), &other).unwrap();
        assert_eq!(fx.cache.load(&h, 15).unwrap(), None);
        assert!(!fx.cache.contains(&h));
    }

    #[test]
    fn files_changed_since_the_scan_are_not_cached() {
        let fx = fixture();
        let t = tree(&fx, &[("a", b"original"), ("b", b"kept")]);
        fs::write(fx.src.join("a"), b"edited!!").unwrap();
        let u = fx.cache.record(&target("h/app"), &t).unwrap();
        assert_eq!((u.stored_files, u.skipped_files), (1, 1));
        assert_eq!(fx.cache.hashes().unwrap(), hashes(&[b"kept"]));
    }

    #[test]
    fn unreadable_target_files_and_stray_blobs_are_pruned() {
        let fx = fixture();
        let t = tree(&fx, &[("a", b"aaaa")]);
        fx.cache.record(&target("h/app"), &t).unwrap();
        fs::write(fx.cache.targets.join("junk.manifest"), b"garbage").unwrap();
        fx.cache
            .store_payload(&Hash::of(b"stray"), b"whatever")
            .unwrap();
        fs::write(fx.cache.blobs.join(".tmp-1-1"), b"fresh temp").unwrap();
        assert_eq!(fx.cache.prune().unwrap(), 1);
        assert!(!fx.cache.targets.join("junk.manifest").exists());
        // A fresh temporary file may belong to a running push: kept.
        assert!(fx.cache.blobs.join(".tmp-1-1").exists());
        assert_eq!(fx.cache.hashes().unwrap(), hashes(&[b"aaaa"]));
    }
}

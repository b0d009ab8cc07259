//! The executor: applies a release plan's operations inside `ROOT/releases/<id>.staging/`.
//!
//! Guarantees: every path is resolved beneath a directory handle (cap-std); new content is written to
//! a fresh inode under a temporary name and renamed into place, so no file of another release is ever
//! written, truncated or chmod-ed; a link source is used only while it is still the inode recorded
//! when its release was verified (fault case 10); a sync error aborts (no retry-and-continue).
//! A [`Stager`] applies any prefix of a plan, which is what the crash tests rely on.
//!
//! A build may start from the prestaged tree of the current release instead of an empty
//! directory ([`Stager::begin`] with `over`): `.relsync/next/<id>` is renamed to the staging directory,
//! its removals unlink names in it only, and the files it keeps are verified by identity like
//! any link. [`Stager::begin_prestage`] makes such a tree.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ahash::AHashMap;
use cap_fs_ext::DirExt as _;
use cap_std::fs::{Dir, MetadataExt as _, OpenOptions, Permissions};
use rayon::prelude::*;
use rustix::fs::{FileType, OFlags};

use super::root::{sync_dir, sync_fs, AppRoot, LockGuard};
use super::{EdgeError, IoContext};
use crate::manifest::{EntryKind, Hash, Manifest};
use crate::path::RelPath;
use crate::plan::Op;
use crate::release::{FileStamp, ReleaseId, ReleaseRecord};

/// Where new file content comes from.
pub trait ContentSource: Sync {
    /// Writes the whole content of `path` (declared `size` bytes) to `out`.
    fn write_full(&self, path: &RelPath, size: u64, out: &mut File) -> Result<(), EdgeError>;

    /// Writes the content of `path` given the current version `basis`; sources that cannot use a
    /// basis send the full content.
    fn write_with_basis(
        &self,
        path: &RelPath,
        size: u64,
        _basis: &File,
        out: &mut File,
    ) -> Result<(), EdgeError> {
        self.write_full(path, size, out)
    }
}

/// No content at all: for a prestaged tree, which only links.
struct NoContent;

impl ContentSource for NoContent {
    fn write_full(&self, path: &RelPath, _size: u64, _out: &mut File) -> Result<(), EdgeError> {
        Err(EdgeError::Verify {
            path: path.clone(),
            reason: "its file in the prestaged release changed since that release was verified; \
                     a prestaged tree only links"
                .into(),
        })
    }
}

/// Content read from a local source tree.
#[derive(Debug)]
pub struct LocalSource {
    dir: Dir,
    path: PathBuf,
}

impl LocalSource {
    pub fn open(path: &Path) -> Result<LocalSource, EdgeError> {
        let dir =
            Dir::open_ambient_dir(path, cap_std::ambient_authority()).ctx("open source", path)?;
        Ok(LocalSource {
            dir,
            path: path.to_owned(),
        })
    }
}

impl ContentSource for LocalSource {
    fn write_full(&self, path: &RelPath, size: u64, out: &mut File) -> Result<(), EdgeError> {
        let mut opts = OpenOptions::new();
        opts.read(true);
        cap_fs_ext::OpenOptionsFollowExt::follow(&mut opts, cap_fs_ext::FollowSymlinks::No);
        let src = self
            .dir
            .open_with(path.as_str(), &opts)
            .ctx_with("open source file", || self.path.join(path.as_str()))?;
        // std::io::copy uses copy_file_range between files, so the data need not pass through us.
        let n = io::copy(&mut src.into_std().take(size + 1), out)
            .ctx_with("copy", || self.path.join(path.as_str()))?;
        if n != size {
            return Err(EdgeError::Source {
                path: path.clone(),
                reason: format!("expected {size} bytes, read {n}; re-run the deploy"),
            });
        }
        Ok(())
    }
}

/// Test hooks that inject faults at exact points (fault cases 4 and 6).
#[doc(hidden)]
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// `SyncTree` fails with EIO.
    pub fail_sync: bool,
    /// Writing this file fails with EIO.
    pub fail_write: Option<RelPath>,
    /// This file is replaced by a copy with one byte flipped just before verification.
    pub corrupt: Option<RelPath>,
}

#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// Re-hash linked files too. By default a linked file is verified by identity: its source
    /// must be the very inode whose content was blake3-verified when its release was built,
    /// with the recorded size and mtime (any write through any name changes the mtime), when it
    /// is linked; and the staged name must still be that inode when the release is verified.
    /// Re-hashing also catches an in-place edit that deliberately restored the old mtime, at the
    /// cost of reading every file.
    pub verify_links: bool,
    /// Objects this process verified as it wrote them (`ObjectStore::verified_stamps`), with the
    /// inode, size and mtime each had then. An object linked into the release that still has
    /// them is verified by identity, by the same rule as a linked file; any other object is
    /// re-hashed.
    pub object_stamps: ObjectStamps,
    /// Link sources (by release, then path) whose identity this process checked against their
    /// record a moment ago, with the app locked: they are linked without checking them again.
    /// Verification checks every linked file's inode all the same, so a source replaced in
    /// between fails the build instead of entering the release.
    pub checked_links: CheckedLinks,
    /// Set by another thread to stop the build between groups of operations; it then fails
    /// with [`EdgeError::Cancelled`] (for a build whose push ended while it ran).
    pub cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
    #[doc(hidden)]
    pub faults: Faults,
}

/// Objects by (content, mode) with the inode, size and mtime each had when it was verified.
pub type ObjectStamps = Arc<HashMap<(Hash, u32), FileStamp>>;

/// Files of kept releases, by release, whose identity was just checked
/// ([`ExecOptions::checked_links`]).
pub type CheckedLinks = Arc<AHashMap<ReleaseId, Arc<ahash::AHashSet<RelPath>>>>;

/// How a file that was not written here can be verified without reading it.
#[derive(Debug, Clone, Copy)]
enum Identity {
    /// Hard-linked from a kept release after its identity check: the recorded stamp of the
    /// inode it shares.
    Linked(FileStamp),
    /// Linked from an object verified while written, which then had this identity.
    Object(FileStamp),
}

/// What the executor did beyond the plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExecStats {
    /// Link sources that failed their identity or content check and were written in full instead.
    pub link_fallbacks: u64,
    pub bytes_written: u64,
    pub files_verified: u64,
    /// Wall time per [`Op::phase`], in the order the phases first ran.
    #[serde(skip)]
    pub timings: Vec<(&'static str, Duration)>,
}

struct BasisFiles<'a> {
    dir: Dir,
    record: &'a ReleaseRecord,
    /// The record's stamps by path, made on the first link from this release: a build over a
    /// prestaged tree may link nothing from it.
    stamps: std::sync::OnceLock<ahash::AHashMap<RelPath, FileStamp>>,
}

impl<'a> BasisFiles<'a> {
    fn stamp(&self, p: &RelPath) -> Option<FileStamp> {
        let record = self.record;
        let stamps = self.stamps.get_or_init(|| {
            record
                .manifest
                .files()
                .map(|(p, ..)| p.clone())
                .zip(record.stamps.iter().copied())
                .collect()
        });
        stamps.get(p).copied()
    }
}

/// Builds one release. Dropping it without [`Stager::abort`] leaves the staging directory for recovery,
/// exactly like a crash.
pub struct Stager<'a> {
    root: &'a AppRoot,
    release: ReleaseId,
    target: &'a Manifest,
    seq: u64,
    created_unix: i64,
    bases: AHashMap<ReleaseId, BasisFiles<'a>>,
    source: &'a dyn ContentSource,
    opts: ExecOptions,
    staging: Dir,
    staging_path: PathBuf,
    device: u64,
    /// Paths hard-linked so far, with what they can be verified by.
    linked: ahash::AHashMap<RelPath, Identity>,
    /// Serializes rewrites during verification, which may open up a read-only parent directory.
    rewrite: Mutex<()>,
    stamps: Vec<FileStamp>,
    fallbacks: AtomicU64,
    written: AtomicU64,
    tmp_counter: AtomicU64,
    timings: Vec<(&'static str, Duration)>,
    progress: &'a (dyn Fn(u64) + Sync),
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("injected I/O error ({what})"))
}

fn mtime_ns(m: &cap_std::fs::Metadata) -> i128 {
    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
}

impl<'a> Stager<'a> {
    /// Creates `releases/<id>.staging/`, or with `over` makes the prestaged tree of that release
    /// (`.relsync/next/<over>`) the staging directory, for a plan of
    /// [`crate::plan::plan_release_over`]. `bases` are the records of releases that link
    /// operations may name.
    #[allow(clippy::too_many_arguments)]
    pub fn begin(
        root: &'a AppRoot,
        _lock: &LockGuard,
        release: &ReleaseId,
        over: Option<&ReleaseId>,
        target: &'a Manifest,
        bases: &'a [Arc<ReleaseRecord>],
        seq: u64,
        created_unix: i64,
        source: &'a dyn ContentSource,
        opts: ExecOptions,
        progress: &'a (dyn Fn(u64) + Sync),
    ) -> Result<Stager<'a>, EdgeError> {
        let releases = root.releases_dir()?;
        if releases.exists(release.as_str()) {
            return Err(EdgeError::ReleaseExists(release.clone()));
        }
        let staging_name = release.staging_name();
        let staging_path = root
            .path()
            .join(crate::layout::RELEASES)
            .join(&staging_name);
        match over {
            None => releases
                .create_dir(&staging_name)
                .ctx("create staging directory", &staging_path)?,
            Some(over) => root
                .next_dir()?
                .rename(over.as_str(), &releases, &staging_name)
                .ctx("rename the prestaged tree to", &staging_path)?,
        }
        let staging = releases
            .open_dir(&staging_name)
            .ctx("open staging directory", &staging_path)?;
        Self::with_staging(
            root,
            release,
            target,
            bases,
            seq,
            created_unix,
            source,
            opts,
            progress,
            (staging, staging_path),
        )
    }

    /// A stager that makes the prestaged tree of `base` in `.relsync/next/<base>.partial`, to
    /// apply [`crate::plan::plan_prestage`]'s operations; [`Stager::finish_prestage`] then
    /// gives the tree its name. Its link operations find no content to fall back on: a link
    /// source that fails its check fails the prestage.
    pub fn begin_prestage(
        root: &'a AppRoot,
        _lock: &LockGuard,
        base: &'a Arc<ReleaseRecord>,
        opts: ExecOptions,
    ) -> Result<Stager<'a>, EdgeError> {
        let next = root.next_dir()?;
        let name = format!("{}{}", base.id, crate::layout::PARTIAL_SUFFIX);
        let path = root.next_path().join(&name);
        next.create_dir(&name).ctx("create", &path)?;
        let staging = next.open_dir(&name).ctx("open", &path)?;
        Self::with_staging(
            root,
            &base.id,
            &base.manifest,
            std::slice::from_ref(base),
            base.seq,
            base.created_unix,
            &NoContent,
            opts,
            &|_| {},
            (staging, path),
        )
    }

    /// Names the tree [`Stager::begin_prestage`] made: `.relsync/next/<base>`.
    pub fn finish_prestage(self) -> Result<(), EdgeError> {
        let next = self.root.next_dir()?;
        let from = format!("{}{}", self.release, crate::layout::PARTIAL_SUFFIX);
        next.rename(&from, &next, self.release.as_str())
            .ctx("rename", &self.staging_path)
    }

    #[allow(clippy::too_many_arguments)]
    fn with_staging(
        root: &'a AppRoot,
        release: &ReleaseId,
        target: &'a Manifest,
        bases: &'a [Arc<ReleaseRecord>],
        seq: u64,
        created_unix: i64,
        source: &'a dyn ContentSource,
        opts: ExecOptions,
        progress: &'a (dyn Fn(u64) + Sync),
        (staging, staging_path): (Dir, PathBuf),
    ) -> Result<Stager<'a>, EdgeError> {
        let releases = root.releases_dir()?;
        let mut base_map = AHashMap::new();
        for rec in bases {
            let Ok(dir) = releases.open_dir(rec.id.as_str()) else {
                continue;
            };
            let stamps = std::sync::OnceLock::new();
            base_map.insert(
                rec.id.clone(),
                BasisFiles {
                    dir,
                    record: rec,
                    stamps,
                },
            );
        }
        Ok(Stager {
            root,
            release: release.clone(),
            target,
            seq,
            created_unix,
            bases: base_map,
            source,
            opts,
            staging,
            staging_path,
            device: root.device()?,
            linked: ahash::AHashMap::new(),
            rewrite: Mutex::new(()),
            stamps: Vec::new(),
            fallbacks: AtomicU64::new(0),
            written: AtomicU64::new(0),
            tmp_counter: AtomicU64::new(0),
            timings: Vec::new(),
            progress,
        })
    }

    /// Replaces [`ExecOptions::object_stamps`]: for a build that started before the objects
    /// it links were all written.
    pub fn set_object_stamps(&mut self, stamps: ObjectStamps) {
        self.opts.object_stamps = stamps;
    }

    pub fn stats(&self) -> ExecStats {
        ExecStats {
            link_fallbacks: self.fallbacks.load(Ordering::Relaxed),
            bytes_written: self.written.load(Ordering::Relaxed),
            files_verified: self.stamps.len() as u64,
            timings: self.timings.clone(),
        }
    }

    /// [`EdgeError::Cancelled`] once [`ExecOptions::cancel`] is set.
    fn check_cancel(&self) -> Result<(), EdgeError> {
        match &self.opts.cancel {
            Some(c) if c.load(Ordering::Relaxed) => Err(EdgeError::Cancelled(
                "the push ended while its release was being built".into(),
            )),
            _ => Ok(()),
        }
    }

    fn time(&mut self, phase: &'static str, took: Duration) {
        match self.timings.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, d)) => *d += took,
            None => self.timings.push((phase, took)),
        }
    }

    fn staged(&self, p: &RelPath) -> PathBuf {
        self.staging_path.join(p.as_str())
    }

    /// Applies `ops` in order; runs of independent file operations go in parallel.
    pub fn apply(&mut self, ops: &[Op]) -> Result<(), EdgeError> {
        let mut i = 0;
        while i < ops.len() {
            self.check_cancel()?;
            let parallel = |op: &Op| {
                matches!(
                    op,
                    Op::Link { .. }
                        | Op::Keep { .. }
                        | Op::LinkObject { .. }
                        | Op::WriteFull { .. }
                        | Op::WriteDelta { .. }
                        | Op::Symlink { .. }
                )
            };
            if parallel(&ops[i]) {
                let end = ops[i..]
                    .iter()
                    .position(|o| !parallel(o))
                    .map_or(ops.len(), |n| i + n);
                let t = Instant::now();
                // A kept file needs nothing done: only what verifies it.
                let (kept, io): (Vec<&Op>, Vec<&Op>) = ops[i..end]
                    .iter()
                    .partition(|o| matches!(o, Op::Keep { .. }));
                self.linked.reserve(kept.len());
                for op in kept {
                    if let Op::Keep {
                        path, size, stamp, ..
                    } = op
                    {
                        (self.progress)(*size);
                        self.linked.insert(path.clone(), Identity::Linked(*stamp));
                    }
                }
                let this = &*self;
                // Ops of one directory share its handle (and their link sources' directories), so
                // each file costs a couple of `*at` calls on a single name instead of a full path
                // resolution per call.
                let chunks: Vec<&[&Op]> = io
                    .chunk_by(|a, b| op_path(a).parent_str() == op_path(b).parent_str())
                    .collect();
                let linked: Vec<Vec<(RelPath, Identity)>> = chunks
                    .par_iter()
                    .map(|chunk| {
                        this.check_cancel()?;
                        let mut dirs = DirCache::new(this);
                        let mut linked = Vec::new();
                        for op in chunk.iter() {
                            if let Some(l) = this.apply_file_op(op, &mut dirs)? {
                                linked.push(l);
                            }
                        }
                        Ok(linked)
                    })
                    .collect::<Result<_, EdgeError>>()?;
                self.linked.extend(linked.into_iter().flatten());
                self.time(ops[i].phase(), t.elapsed());
                tracing::debug!(
                    ops = end - i,
                    ms = t.elapsed().as_millis() as u64,
                    "file operations"
                );
                i = end;
            } else if matches!(ops[i], Op::Remove { .. }) {
                let end = ops[i..]
                    .iter()
                    .position(|o| !matches!(o, Op::Remove { .. }))
                    .map_or(ops.len(), |n| i + n);
                let t = Instant::now();
                self.apply_removals(&ops[i..end])?;
                self.time(ops[i].phase(), t.elapsed());
                tracing::debug!(
                    ops = end - i,
                    ms = t.elapsed().as_millis() as u64,
                    "removals"
                );
                i = end;
            } else if matches!(ops[i], Op::CreateDir { .. } | Op::SetDirMode { .. }) {
                let same = |o: &Op| std::mem::discriminant(o) == std::mem::discriminant(&ops[i]);
                let end = ops[i..]
                    .iter()
                    .position(|o| !same(o))
                    .map_or(ops.len(), |n| i + n);
                let t = Instant::now();
                self.apply_dir_ops(&ops[i..end])?;
                self.time(ops[i].phase(), t.elapsed());
                tracing::debug!(
                    op = ops[i].name(),
                    ops = end - i,
                    ms = t.elapsed().as_millis() as u64,
                    "directory operations"
                );
                i = end;
            } else {
                let t = Instant::now();
                self.apply_one(&ops[i])?;
                self.time(ops[i].phase(), t.elapsed());
                tracing::debug!(
                    op = ops[i].name(),
                    ms = t.elapsed().as_millis() as u64,
                    "operation"
                );
                i += 1;
            }
        }
        Ok(())
    }

    /// A run of `Remove` operations, in order (children before their parents), each through its
    /// parent's handle: `unlinkat` never follows a symlink.
    fn apply_removals(&self, run: &[Op]) -> Result<(), EdgeError> {
        let mut dirs = DirCache::new(self);
        for op in run {
            let Op::Remove { path, dir } = op else {
                unreachable!("{} is not a removal", op.name());
            };
            let parent = dirs.staging(path.parent_str())?;
            let flags = if *dir {
                rustix::fs::AtFlags::REMOVEDIR
            } else {
                rustix::fs::AtFlags::empty()
            };
            rustix::fs::unlinkat(parent, path.file_name(), flags)
                .map_err(io::Error::from)
                .ctx_with("remove", || self.staged(path))?;
        }
        Ok(())
    }

    /// A run of `CreateDir` (or of `SetDirMode`) operations, level by level: all directories of one
    /// depth in parallel, each through its parent's handle. Parents are created before children;
    /// modes are set children first, so a read-only directory is locked only once it is filled.
    fn apply_dir_ops(&self, run: &[Op]) -> Result<(), EdgeError> {
        let create = matches!(run.first(), Some(Op::CreateDir { .. }));
        let mut levels: std::collections::BTreeMap<usize, Vec<&Op>> = Default::default();
        for op in run {
            levels.entry(op_path(op).depth()).or_default().push(op);
        }
        let mut depths: Vec<usize> = levels.keys().copied().collect();
        if !create {
            depths.reverse();
        }
        for depth in depths {
            let level = &levels[&depth];
            let chunks: Vec<&[&Op]> = level
                .chunk_by(|a, b| op_path(a).parent_str() == op_path(b).parent_str())
                .collect();
            chunks.par_iter().try_for_each(|chunk| {
                self.check_cancel()?;
                let mut dirs = DirCache::new(self);
                for op in chunk.iter() {
                    let path = op_path(op);
                    let parent = dirs.staging(path.parent_str())?;
                    match op {
                        Op::CreateDir { mode, .. } => rustix::fs::mkdirat(
                            parent,
                            path.file_name(),
                            rustix::fs::Mode::from_raw_mode(*mode),
                        )
                        .map_err(io::Error::from)
                        .ctx_with("create directory", || self.staged(path))?,
                        Op::SetDirMode { mode, .. } => {
                            // Through a descriptor opened without following symlinks: a name
                            // swapped for a symlink is never chmod-ed through.
                            let fd = rustix::fs::openat(
                                parent,
                                path.file_name(),
                                rustix::fs::OFlags::RDONLY
                                    | rustix::fs::OFlags::DIRECTORY
                                    | rustix::fs::OFlags::NOFOLLOW
                                    | rustix::fs::OFlags::CLOEXEC,
                                rustix::fs::Mode::empty(),
                            )
                            .map_err(io::Error::from)
                            .ctx_with("open directory", || self.staged(path))?;
                            rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(*mode))
                                .map_err(io::Error::from)
                                .ctx_with("chmod directory", || self.staged(path))?;
                        }
                        other => unreachable!("{} is not a directory operation", other.name()),
                    }
                }
                Ok::<(), EdgeError>(())
            })?;
        }
        Ok(())
    }

    fn apply_one(&mut self, op: &Op) -> Result<(), EdgeError> {
        match op {
            Op::CreateDir { .. } | Op::SetDirMode { .. } => {
                self.apply_dir_ops(std::slice::from_ref(op))
            }
            Op::SyncTree => {
                if self.opts.faults.fail_sync {
                    return Err(eio("syncfs")).ctx("sync", &self.staging_path);
                }
                sync_fs(&self.staging, &self.staging_path)
            }
            Op::Verify => self.verify(),
            Op::WriteRecord => {
                if self.stamps.len() != self.target.file_count() {
                    self.verify()?;
                }
                self.root
                    .write_record(ReleaseRecord {
                        id: self.release.clone(),
                        seq: self.seq,
                        created_unix: self.created_unix,
                        manifest: self.target.clone(),
                        stamps: self.stamps.clone(),
                    })
                    .map(drop)
            }
            Op::MarkComplete => {
                let releases = self.root.releases_dir()?;
                let rel_path = self.root.path().join(crate::layout::RELEASES);
                releases
                    .rename(
                        self.release.staging_name(),
                        &releases,
                        self.release.as_str(),
                    )
                    .ctx("rename", rel_path.join(self.release.as_str()))?;
                sync_dir(&releases, &rel_path)
            }
            Op::Activate => self.root.swap_current(&self.release),
            Op::Prune { release } => {
                if self.root.current()?.as_ref() == Some(release) {
                    return Err(EdgeError::Protected(release.clone()));
                }
                self.root.remove_release(release)
            }
            file_op => {
                if let Some((path, identity)) =
                    self.apply_file_op(file_op, &mut DirCache::new(self))?
                {
                    self.linked.insert(path, identity);
                }
                Ok(())
            }
        }
    }

    /// Applies one file operation; for a hard link, returns the path and what verifies it.
    fn apply_file_op(
        &self,
        op: &Op,
        dirs: &mut DirCache<'_>,
    ) -> Result<Option<(RelPath, Identity)>, EdgeError> {
        match op {
            Op::Link {
                path,
                from,
                from_path,
                size,
                mode,
                ..
            } => {
                if let Some(stamp) = self.link_source_ok(dirs, from, from_path, *size, *mode) {
                    let (bdir, sdir) =
                        dirs.link_pair(from, from_path.parent_str(), path.parent_str())?;
                    let bdir = bdir.expect("checked by link_source_ok");
                    rustix::fs::linkat(
                        bdir,
                        from_path.file_name(),
                        sdir,
                        path.file_name(),
                        rustix::fs::AtFlags::empty(),
                    )
                    .map_err(io::Error::from)
                    .ctx_with("link", || self.staged(path))?;
                    (self.progress)(*size);
                    Ok(Some((path.clone(), Identity::Linked(stamp))))
                } else {
                    tracing::warn!(release = %from, path = %from_path, "link source changed since it was verified; writing {path} in full");
                    self.fallbacks.fetch_add(1, Ordering::Relaxed);
                    self.write_file_in(dirs, path, *size, *mode, None)
                        .map(|()| None)
                }
            }
            // Applied by `apply` itself; here for a plan applied one operation at a time.
            Op::Keep {
                path, size, stamp, ..
            } => {
                (self.progress)(*size);
                Ok(Some((path.clone(), Identity::Linked(*stamp))))
            }
            Op::LinkObject {
                path,
                size,
                mode,
                hash,
            } => {
                let (odir, sdir) = dirs.object_pair(path.parent_str())?;
                rustix::fs::linkat(
                    odir,
                    crate::layout::object_name(hash, *mode).as_str(),
                    sdir,
                    path.file_name(),
                    rustix::fs::AtFlags::empty(),
                )
                .map_err(io::Error::from)
                .ctx_with("link received object to", || self.staged(path))?;
                (self.progress)(*size);
                let stamp = self.opts.object_stamps.get(&(*hash, *mode));
                Ok(stamp.map(|s| (path.clone(), Identity::Object(*s))))
            }
            Op::WriteFull {
                path, size, mode, ..
            } => self
                .write_file_in(dirs, path, *size, *mode, None)
                .map(|()| None),
            Op::WriteDelta {
                path,
                basis,
                basis_path,
                size,
                mode,
                ..
            } => self
                .write_file_in(dirs, path, *size, *mode, Some((basis, basis_path)))
                .map(|()| None),
            Op::Symlink { path, target } => {
                let sdir = dirs.staging(path.parent_str())?;
                rustix::fs::symlinkat(target.as_str(), sdir, path.file_name())
                    .map_err(io::Error::from)
                    .ctx_with("create symlink", || self.staged(path))?;
                Ok(None)
            }
            other => unreachable!("{} is not a file operation", other.name()),
        }
    }

    /// The basis file's recorded stamp if it is still exactly what its release recorded: a regular
    /// file (not followed through a symlink) on our device with the recorded inode, size and
    /// mtime, and the mode the new file needs. A file in [`ExecOptions::checked_links`] is taken
    /// as checked.
    fn link_source_ok(
        &self,
        dirs: &mut DirCache<'_>,
        from: &ReleaseId,
        p: &RelPath,
        size: u64,
        mode: u32,
    ) -> Option<FileStamp> {
        let stamp = self.bases.get(from)?.stamp(p)?;
        if stamp.size == size
            && self
                .opts
                .checked_links
                .get(from)
                .is_some_and(|checked| checked.contains(p))
        {
            return Some(stamp);
        }
        let bdir = dirs.basis(from, p.parent_str()).ok()??;
        let st =
            rustix::fs::statat(bdir, p.file_name(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW).ok()?;
        let ok = rustix::fs::FileType::from_raw_mode(st.st_mode)
            == rustix::fs::FileType::RegularFile
            && st.st_dev == self.device
            && st.st_ino == stamp.ino
            && st.st_size as u64 == stamp.size
            && st.st_size as u64 == size
            && stat_mtime_ns(&st) == stamp.mtime_ns
            && st.st_mode & 0o7777 == mode;
        ok.then_some(stamp)
    }

    fn write_file(
        &self,
        path: &RelPath,
        size: u64,
        mode: u32,
        basis: Option<(&ReleaseId, &RelPath)>,
    ) -> Result<(), EdgeError> {
        self.write_file_in(&mut DirCache::new(self), path, size, mode, basis)
    }

    fn write_file_in(
        &self,
        dirs: &mut DirCache<'_>,
        path: &RelPath,
        size: u64,
        mode: u32,
        basis: Option<(&ReleaseId, &RelPath)>,
    ) -> Result<(), EdgeError> {
        let dest = self.staged(path);
        if self.opts.faults.fail_write.as_ref() == Some(path) {
            return Err(eio("write")).ctx("write", dest);
        }
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = format!(".relsync-tmp-{n}");
        let sdir = dirs.staging(path.parent_str())?;
        // O_EXCL + O_NOFOLLOW: always a fresh inode of our own, never an existing file or a link.
        let mut out = File::from(
            rustix::fs::openat(
                sdir,
                tmp.as_str(),
                rustix::fs::OFlags::WRONLY
                    | rustix::fs::OFlags::CREATE
                    | rustix::fs::OFlags::EXCL
                    | rustix::fs::OFlags::NOFOLLOW
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::from_raw_mode(0o600),
            )
            .map_err(io::Error::from)
            .ctx("create", &dest)?,
        );
        let basis_file = basis.and_then(|(id, bp)| {
            let b = self.bases.get(id)?;
            let mut o = OpenOptions::new();
            o.read(true);
            cap_fs_ext::OpenOptionsFollowExt::follow(&mut o, cap_fs_ext::FollowSymlinks::No);
            b.dir.open_with(bp.as_str(), &o).ok().map(|f| f.into_std())
        });
        match basis_file {
            Some(bf) => self.source.write_with_basis(path, size, &bf, &mut out),
            None => self.source.write_full(path, size, &mut out),
        }
        .map_err(|e| EdgeError::Staging {
            path: dest.clone(),
            source: Box::new(e),
        })?;
        out.set_permissions(std::fs::Permissions::from_mode(mode))
            .ctx("chmod", &dest)?;
        drop(out);
        let sdir = dirs.staging(path.parent_str())?;
        rustix::fs::renameat(sdir, tmp.as_str(), sdir, path.file_name())
            .map_err(io::Error::from)
            .ctx("rename", &dest)?;
        self.written.fetch_add(size, Ordering::Relaxed);
        (self.progress)(size);
        Ok(())
    }

    fn corrupt_for_test(&self, path: &RelPath) -> Result<(), EdgeError> {
        // Replace with a flipped copy (a new inode), so even a linked file's other names stay intact.
        let mut data = self
            .staging
            .read(path.as_str())
            .ctx_with("read", || self.staged(path))?;
        if let Some(b) = data.first_mut() {
            *b ^= 0xff;
        } else {
            data.push(0);
        }
        let tmp = ".relsync-corrupt";
        self.staging
            .write(tmp, &data)
            .ctx_with("write", || self.staged(path))?;
        self.staging
            .rename(tmp, &self.staging, path.as_str())
            .ctx_with("rename", || self.staged(path))
    }

    /// Checks every entry of the staging tree against the manifest and records file stamps.
    fn verify(&mut self) -> Result<(), EdgeError> {
        if let Some(p) = self.opts.faults.corrupt.clone() {
            self.corrupt_for_test(&p)?;
        }
        let linked = std::mem::take(&mut self.linked);
        let this = &*self;
        let chunks: Vec<&[crate::manifest::Entry]> = this
            .target
            .entries()
            .chunk_by(|a, b| a.path.parent_str() == b.path.parent_str())
            .collect();
        // The record written next holds the manifest's encoding: make it on a core this phase
        // leaves idle at times, rather than alone after it.
        let (checked, _) = rayon::join(
            || {
                chunks
                    .par_iter()
                    .map(|chunk| this.verify_dir(chunk, &linked))
                    .collect::<Result<Vec<_>, EdgeError>>()
            },
            || this.target.encode(),
        );
        let stamps: Vec<FileStamp> = checked?.into_iter().flatten().flatten().collect();
        self.stamps = stamps;
        Ok(())
    }

    /// [`Stager::verify`] of the entries of one directory.
    fn verify_dir(
        &self,
        chunk: &[crate::manifest::Entry],
        linked: &ahash::AHashMap<RelPath, Identity>,
    ) -> Result<Vec<Option<FileStamp>>, EdgeError> {
        let mut dirs = DirCache::new(self);
        // Linked files need only their inode: one listing of the directory gives every
        // entry's, where an `lstat` per file costs a system call each.
        let by_identity = chunk
            .iter()
            .filter(|e| matches!(linked.get(&e.path), Some(Identity::Linked(_))))
            .count();
        let listed = if by_identity >= LIST_DIR_FROM && !self.opts.verify_links {
            let parent = chunk[0].path.parent_str();
            Some(list_inodes(dirs.staging(parent)?).ctx_with("list", || {
                parent.map_or(self.staging_path.clone(), |p| self.staging_path.join(p))
            })?)
        } else {
            None
        };
        chunk
            .iter()
            .map(|e| {
                let identity = linked.get(&e.path).copied();
                if let (Some(Identity::Linked(stamp)), Some(listed)) = (identity, &listed) {
                    let name = e.path.file_name().as_bytes();
                    match listed.get(name) {
                        Some(&(ino, FileType::RegularFile)) if ino == stamp.ino => {
                            return Ok(Some(stamp));
                        }
                        // The file system does not say: look as for any other file.
                        Some((_, FileType::Unknown)) => {}
                        Some(_) => {
                            return Err(EdgeError::Verify {
                                path: e.path.clone(),
                                reason: LINK_CHANGED.into(),
                            })
                        }
                        None => {
                            return Err(EdgeError::Verify {
                                path: e.path.clone(),
                                reason: "missing from the staged release".into(),
                            })
                        }
                    }
                }
                self.verify_entry(&mut dirs, &e.path, &e.kind, identity)
            })
            .collect::<Result<Vec<Option<FileStamp>>, EdgeError>>()
    }

    fn verify_entry(
        &self,
        dirs: &mut DirCache<'_>,
        path: &RelPath,
        kind: &EntryKind,
        identity: Option<Identity>,
    ) -> Result<Option<FileStamp>, EdgeError> {
        let fail = |reason: String| EdgeError::Verify {
            path: path.clone(),
            reason,
        };
        let sdir = dirs.staging(path.parent_str())?;
        let st = rustix::fs::statat(
            sdir,
            path.file_name(),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| fail(format!("missing from the staged release ({e})")))?;
        let ftype = rustix::fs::FileType::from_raw_mode(st.st_mode);
        let perm = st.st_mode & 0o7777;
        match kind {
            EntryKind::Dir { mode } => {
                let right = |st: &rustix::fs::Stat| {
                    rustix::fs::FileType::from_raw_mode(st.st_mode)
                        == rustix::fs::FileType::Directory
                        && st.st_mode & 0o7777 == *mode
                };
                if right(&st) {
                    return Ok(None);
                }
                // A rewrite of a file inside it (below) may have opened a read-only directory
                // up for a moment, while other directories are verified in parallel: look
                // again once no rewrite is under way.
                let _no_rewrite = self.rewrite.lock().expect("lock poisoned");
                let again = rustix::fs::statat(
                    sdir,
                    path.file_name(),
                    rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| fail(format!("missing from the staged release ({e})")))?;
                if right(&again) {
                    Ok(None)
                } else {
                    Err(fail(format!("expected a directory with mode {mode:o}")))
                }
            }
            EntryKind::Symlink { target } => {
                let t = rustix::fs::readlinkat(sdir, path.file_name(), Vec::new())
                    .map_err(|e| fail(format!("expected a symlink ({e})")))?;
                let t = t.to_string_lossy();
                if t != target.as_str() {
                    return Err(fail(format!(
                        "symlink points to {t:?}, expected {target:?}"
                    )));
                }
                Ok(None)
            }
            &EntryKind::File { size, mode, hash } => {
                if ftype != rustix::fs::FileType::RegularFile
                    || st.st_size as u64 != size
                    || perm != mode
                {
                    return Err(fail(format!(
                        "expected a regular file of {size} bytes with mode {mode:o}"
                    )));
                }
                let here = FileStamp {
                    ino: st.st_ino,
                    size: st.st_size as u64,
                    mtime_ns: stat_mtime_ns(&st),
                };
                let linked = match identity {
                    Some(Identity::Linked(stamp)) => Some(stamp),
                    // Still the inode whose content was hashed as it was written, unchanged
                    // since; otherwise it is read like a written file.
                    Some(Identity::Object(stamp)) if here == stamp && !self.opts.verify_links => {
                        return Ok(Some(here));
                    }
                    Some(Identity::Object(_)) | None => None,
                };
                if let Some(stamp) = linked {
                    if here != stamp {
                        return Err(fail(LINK_CHANGED.into()));
                    }
                    if !self.opts.verify_links {
                        return Ok(Some(here));
                    }
                }
                let f = File::from(
                    rustix::fs::openat(
                        sdir,
                        path.file_name(),
                        rustix::fs::OFlags::RDONLY
                            | rustix::fs::OFlags::NOFOLLOW
                            | rustix::fs::OFlags::CLOEXEC,
                        rustix::fs::Mode::empty(),
                    )
                    .map_err(io::Error::from)
                    .ctx_with("open", || self.staged(path))?,
                );
                let actual = hash_file(f).ctx_with("read", || self.staged(path))?;
                if actual == hash {
                    return Ok(Some(here));
                }
                if linked.is_none() {
                    return Err(fail(format!(
                        "content hash {} does not match the manifest's {}",
                        &actual.to_hex()[..16],
                        &hash.to_hex()[..16]
                    )));
                }
                // An earlier release was edited in place: unlink our name for that inode and write
                // the content in full (fault case 10).
                tracing::warn!(%path, "linked file differs from its manifest; the earlier release was modified in place; writing it in full");
                // Directory modes are final by now: a read-only parent (never shared with another
                // release) is opened up for the rewrite and restored after it.
                let _one_at_a_time = self.rewrite.lock().expect("lock poisoned");
                let parent = match path.parent() {
                    Some(p) => {
                        let m = self
                            .staging
                            .symlink_metadata(p.as_str())
                            .ctx_with("stat", || self.staged(&p))?;
                        Some((p, m.mode() & 0o7777))
                    }
                    None => None,
                };
                let set_mode = |p: &RelPath, mode: u32| {
                    self.staging
                        .set_permissions(
                            p.as_str(),
                            Permissions::from_std(std::fs::Permissions::from_mode(mode)),
                        )
                        .ctx_with("chmod directory", || self.staged(p))
                };
                let opened = parent.as_ref().filter(|(_, m)| m & 0o300 != 0o300);
                if let Some((p, m)) = opened {
                    set_mode(p, m | 0o700)?;
                }
                self.staging
                    .remove_file(path.as_str())
                    .ctx_with("remove", || self.staged(path))?;
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                self.write_file(path, size, mode, None)?;
                if let Some((p, m)) = opened {
                    set_mode(p, *m)?;
                }
                if self.hash_staged(path)? != hash {
                    return Err(fail(
                        "content does not match the manifest after a full rewrite".into(),
                    ));
                }
                let m = self
                    .staging
                    .symlink_metadata(path.as_str())
                    .ctx_with("stat", || self.staged(path))?;
                Ok(Some(stamp(&m)))
            }
        }
    }

    fn hash_staged(&self, path: &RelPath) -> Result<Hash, EdgeError> {
        let mut opts = OpenOptions::new();
        opts.read(true);
        cap_fs_ext::OpenOptionsFollowExt::follow(&mut opts, cap_fs_ext::FollowSymlinks::No);
        let f = self
            .staging
            .open_with(path.as_str(), &opts)
            .ctx_with("open", || self.staged(path))?
            .into_std();
        hash_file(f).ctx_with("read", || self.staged(path))
    }

    /// Removes the staging directory (a failed deploy leaves nothing behind).
    pub fn abort(self) -> Result<(), EdgeError> {
        let path = self.staging_path.clone();
        drop(self);
        super::root::remove_tree(&path)
    }

    pub fn staging_path(&self) -> &Path {
        &self.staging_path
    }
}

/// Why a linked file fails verification.
const LINK_CHANGED: &str =
    "linked file changed while staging (it is no longer the inode its release recorded)";

/// A directory whose chunk links this many files is listed for their inodes, not `lstat`ed file
/// by file: a directory split into many small chunks by its subdirectories would be listed once
/// per chunk.
const LIST_DIR_FROM: usize = 4;

/// A directory's entries by name: inode and type.
type Listing = AHashMap<Box<[u8]>, (u64, FileType)>;

/// Every entry of `dir` with its inode and type, by name, from one pass of `getdents64`.
fn list_inodes(dir: &Dir) -> io::Result<Listing> {
    // The handle may be a path-only one, which cannot be read: open the directory itself.
    let fd = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let mut buf = vec![std::mem::MaybeUninit::<u8>::uninit(); 64 * 1024];
    let mut entries = rustix::fs::RawDir::new(&fd, &mut buf);
    let mut out = AHashMap::new();
    while let Some(entry) = entries.next() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.insert(name.into(), (entry.ino(), entry.file_type()));
        }
    }
    Ok(out)
}

fn stat_mtime_ns(st: &rustix::fs::Stat) -> i128 {
    st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128
}

/// The path a file operation creates.
fn op_path(op: &Op) -> &RelPath {
    match op {
        Op::Link { path, .. }
        | Op::Keep { path, .. }
        | Op::Remove { path, .. }
        | Op::LinkObject { path, .. }
        | Op::WriteFull { path, .. }
        | Op::WriteDelta { path, .. }
        | Op::Symlink { path, .. }
        | Op::CreateDir { path, .. }
        | Op::SetDirMode { path, .. } => path,
        other => unreachable!("{} has no path", other.name()),
    }
}

/// Directory handles opened (beneath the staging tree or a basis release, via cap-std) for one run
/// of operations; `*at` calls on single names are then made relative to them.
struct DirCache<'s> {
    stager: &'s Stager<'s>,
    objects: Option<Dir>,
    // Keyed by the parent's text ("" for the top level): looked up once per operation, so
    // without allocating a key.
    staging: AHashMap<Box<str>, Dir>,
    basis: AHashMap<ReleaseId, AHashMap<Box<str>, Option<Dir>>>,
}

impl<'s> DirCache<'s> {
    fn new(stager: &'s Stager<'s>) -> DirCache<'s> {
        DirCache {
            stager,
            objects: None,
            staging: AHashMap::new(),
            basis: AHashMap::new(),
        }
    }

    fn staging(&mut self, parent: Option<&str>) -> Result<&Dir, EdgeError> {
        let key = parent.unwrap_or("");
        if !self.staging.contains_key(key) {
            let d = match parent {
                Some(p) => self
                    .stager
                    .staging
                    .open_dir_nofollow(p)
                    .ctx_with("open", || self.stager.staging_path.join(p))?,
                None => self
                    .stager
                    .staging
                    .try_clone()
                    .ctx("open", &self.stager.staging_path)?,
            };
            self.staging.insert(key.into(), d);
        }
        Ok(&self.staging[key])
    }

    /// The object store and staging directories for linking a received object.
    fn object_pair(&mut self, parent: Option<&str>) -> Result<(&Dir, &Dir), EdgeError> {
        if self.objects.is_none() {
            let rel = format!("{}/{}", crate::layout::META, crate::layout::OBJECTS);
            let d = self
                .stager
                .root
                .dir()
                .open_dir(&rel)
                .ctx("open", self.stager.root.path().join(&rel))?;
            self.objects = Some(d);
        }
        self.staging(parent)?;
        Ok((
            self.objects.as_ref().expect("opened above"),
            &self.staging[parent.unwrap_or("")],
        ))
    }

    /// The basis and staging directories for one hard link.
    fn link_pair(
        &mut self,
        id: &ReleaseId,
        from_parent: Option<&str>,
        parent: Option<&str>,
    ) -> Result<(Option<&Dir>, &Dir), EdgeError> {
        self.basis(id, from_parent)?;
        self.staging(parent)?;
        Ok((
            self.basis[id][from_parent.unwrap_or("")].as_ref(),
            &self.staging[parent.unwrap_or("")],
        ))
    }

    /// `None` when the basis release or directory is gone or is not a real directory.
    fn basis(&mut self, id: &ReleaseId, parent: Option<&str>) -> Result<Option<&Dir>, EdgeError> {
        let key = parent.unwrap_or("");
        if !self.basis.contains_key(id) {
            self.basis.insert(id.clone(), AHashMap::new());
        }
        let dirs = self.basis.get_mut(id).expect("inserted above");
        if !dirs.contains_key(key) {
            let d = self.stager.bases.get(id).and_then(|b| match parent {
                Some(p) => b.dir.open_dir_nofollow(p).ok(),
                None => b.dir.try_clone().ok(),
            });
            dirs.insert(key.into(), d);
        }
        Ok(dirs[key].as_ref())
    }
}

fn stamp(m: &cap_std::fs::Metadata) -> FileStamp {
    FileStamp {
        ino: m.ino(),
        size: m.len(),
        mtime_ns: mtime_ns(m),
    }
}

/// blake3 of an open file, reading through one reused buffer per thread so memory does not grow
/// with the file and small files cost no allocation.
pub fn hash_file(mut f: File) -> io::Result<Hash> {
    let size = f.metadata()?.len();
    if size >= super::scan::hash::LARGE_FILE {
        return super::scan::hash::mapped_hash(&f, size, &|_| {});
    }
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        if buf.is_empty() {
            buf.resize(256 * 1024, 0);
        }
        let mut h = blake3::Hasher::new();
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(h.finalize().into())
    })
}

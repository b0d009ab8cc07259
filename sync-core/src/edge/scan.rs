//! Scanning a source tree into a validated [`Manifest`].
//!
//! The walk (symlinks never followed) applies only relsync's own filters: the `excludes` patterns,
//! `.relsyncignore` files in the tree (gitignore syntax, scoped to their directory like `.gitignore`,
//! with the precedence the `ignore` crate's walker gives them), and the `skip` list. No git,
//! hidden-file or parent-directory rules apply, so the manifest holds what `rsync -a` of the same
//! tree with the same excludes would copy. `.relsyncignore` files themselves are left out of the
//! manifest: they configure the scan, and `.relsync*` names are reserved for relsync's own files in
//! a release. Any other reserved name is an error.
//!
//! File contents are hashed in parallel with rayon as the walk finds them; large files are
//! memory-mapped one bounded window at a time so that memory does not grow with file size. A file
//! whose identity, size or times differ between the walk, the start and the end of hashing is
//! reported as changed while scanning. A hash cache keyed on (device, inode, size, mtime, ctime) lets
//! a rescan skip unchanged files.

mod cache;
pub(crate) mod hash;
mod walk;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rayon::prelude::*;
use rustix::fs::{Mode, OFlags};
use std::os::fd::OwnedFd;

use crate::manifest::{Entry, EntryKind, Hash, Manifest, ManifestError, Policy};
use crate::path::{PathError, RelPath};

use cache::{HashCache, Stamp};

/// Name of the per-directory ignore files honoured by the scan (gitignore syntax).
pub const IGNORE_FILE: &str = ".relsyncignore";

/// The default [`ScanOptions::racy_window`].
pub const RACY_WINDOW: Duration = Duration::from_secs(2);

/// What to scan and how.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// Gitignore-style patterns, matched from the scan root (like `rsync --exclude` or lines of a
    /// top-level `.gitignore`). A path excluded here or by an ignore file is left out: a `!pattern`
    /// re-includes only what earlier patterns of the same source excluded.
    pub excludes: Vec<String>,
    /// Honour `.relsyncignore` files found in the tree.
    pub ignore_file: bool,
    /// Paths left out entirely, with everything below them (the app's shared paths); they need not
    /// exist.
    pub skip: Vec<RelPath>,
    /// Where the hash cache lives; `None` hashes every file.
    pub cache_file: Option<PathBuf>,
    /// Read and hash every file even where the cache holds its hash (rsync's `--checksum`); the
    /// cache is written afresh from what was read.
    pub rehash: bool,
    /// A file whose mtime or ctime lies less than this before the start of the scan (or after it)
    /// is hashed but not cached: a second write in the same timestamp tick as the one the scan saw
    /// could leave size and times unchanged (git's "racy" entries). ctime counts as well as mtime
    /// because `cp -p` or `touch -r` put an old mtime on new content. Default [`RACY_WINDOW`].
    pub racy_window: Duration,
    /// Validation policy for the resulting manifest.
    pub policy: Policy,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            excludes: Vec::new(),
            ignore_file: true,
            skip: Vec::new(),
            cache_file: None,
            rehash: false,
            racy_window: RACY_WINDOW,
            policy: Policy::default(),
        }
    }
}

/// Counts from one scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Regular files in the manifest, and their total size.
    pub files: u64,
    pub bytes: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Files whose content was read and hashed (empty files need neither hashing nor the cache).
    pub hashed_files: u64,
    pub hashed_bytes: u64,
    /// Files whose hash came from the cache.
    pub cached_files: u64,
}

/// The result of a scan.
#[derive(Debug, Clone)]
pub struct Scan {
    pub manifest: Manifest,
    pub stats: ScanStats,
}

/// Why a scan failed. Every variant names the path (or pattern) involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScanError {
    #[error("source {} is not a directory; pass the directory to deploy", path.display())]
    RootNotDir { path: PathBuf },
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} is a {kind}; relsync ships only files, directories and symlinks: exclude it",
        path.display()
    )]
    UnsupportedType { path: PathBuf, kind: &'static str },
    #[error("name of {path} is not valid UTF-8; rename it or exclude it")]
    NotUtf8 { path: String },
    #[error("symlink {} has a target that is not valid UTF-8; recreate it or exclude it", path.display())]
    TargetNotUtf8 { path: PathBuf },
    #[error(
        "{} uses a name reserved by relsync (starting with `.relsync`); rename it or exclude it",
        path.display()
    )]
    Reserved { path: PathBuf },
    #[error("cannot ship {path:?}: {source}; rename it or exclude it")]
    Path {
        path: PathBuf,
        #[source]
        source: PathError,
    },
    #[error(
        "{} changed while scanning; stop whatever writes to the source tree and scan again",
        path.display()
    )]
    Changed { path: PathBuf },
    #[error("invalid exclude pattern {pattern:?}: {message}")]
    Pattern { pattern: String, message: String },
    #[error("invalid ignore file {}: {message}", path.display())]
    IgnoreFile { path: PathBuf, message: String },
    #[error("source tree {} cannot be shipped: {source}", root.display())]
    Manifest {
        root: PathBuf,
        #[source]
        source: ManifestError,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ScanError + 'a {
    move |source| {
        // An entry that vanished between the directory listing and its use means the tree is
        // being modified under us; say so rather than print a bare "not found".
        if source.kind() == io::ErrorKind::NotFound {
            ScanError::Changed {
                path: path.to_owned(),
            }
        } else {
            ScanError::Io {
                what,
                path: path.to_owned(),
                source,
            }
        }
    }
}

/// Scans `root` (which must be a directory; a symlink to one is followed, nothing below it is).
///
/// `progress` receives the number of bytes hashed since its previous call, from any rayon thread; the
/// calls add up to `stats.hashed_bytes`.
pub fn scan(
    root: &Path,
    opts: &ScanOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Scan, ScanError> {
    let started = SystemTime::now();
    let root = fs::canonicalize(root).map_err(|source| ScanError::Io {
        what: "open source directory",
        path: root.to_owned(),
        source,
    })?;
    let root_meta = fs::metadata(&root).map_err(io_err("read", &root))?;
    if !root_meta.is_dir() {
        return Err(ScanError::RootNotDir { path: root });
    }
    let fd = rustix::fs::openat(
        rustix::fs::CWD,
        &root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("read", &root)(e.into()))?;
    scan_fd(root, fd, opts, progress, started)
}

/// Scans the directory open as `dir`, which lies at `path` (absolute, without symlinks: it roots
/// the exclude patterns and names entries in errors). The walk starts from the descriptor, so
/// `path` is not resolved again at its top: relsyncd scans an export's destination through the
/// handle it opened component by component without following symlinks. (Directories nested more
/// than 64 deep are still opened by their full path, as in [`scan`].)
pub fn scan_dir(
    dir: &cap_std::fs::Dir,
    path: &Path,
    opts: &ScanOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Scan, ScanError> {
    let started = SystemTime::now();
    // A readable descriptor of the same directory: cap-std may hold it as `O_PATH`, which cannot
    // be listed.
    let fd = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("read", path)(e.into()))?;
    scan_fd(path.to_owned(), fd, opts, progress, started)
}

fn scan_fd(
    root: PathBuf,
    fd: OwnedFd,
    opts: &ScanOptions,
    progress: &(dyn Fn(u64) + Sync),
    started: SystemTime,
) -> Result<Scan, ScanError> {
    let filter = walk::Filter::new(&root, opts)?;
    let cache = match &opts.cache_file {
        Some(path) if !opts.rehash => HashCache::load(path),
        _ => HashCache::default(),
    };
    let t = std::time::Instant::now();
    let mut scanned = walk::walk(&root, fd, &filter, opts.ignore_file, &cache, progress)?;
    tracing::debug!(
        ms = t.elapsed().as_millis() as u64,
        entries = scanned.len(),
        "walked and hashed"
    );
    // The parallel walk yields entries in no particular order. Sorting here, on all cores, hands
    // the manifest a canonical list, which it checks (a wrong order is an error, not a wrong
    // manifest) without sorting it again on one core.
    scanned.par_sort_unstable_by(|a, b| a.entry.path.cmp(&b.entry.path));

    let mut stats = ScanStats::default();
    let mut entries = Vec::with_capacity(scanned.len());
    let mut fresh = Vec::new();
    for s in scanned {
        match &s.entry.kind {
            EntryKind::File { size, .. } => {
                // Saturating: an absurd total is reported by the manifest's own overflow check.
                stats.files += 1;
                stats.bytes = stats.bytes.saturating_add(*size);
                match s.source {
                    Source::Hashed => {
                        stats.hashed_files += 1;
                        stats.hashed_bytes = stats.hashed_bytes.saturating_add(*size);
                    }
                    Source::Cached => stats.cached_files += 1,
                    Source::Empty => {}
                }
            }
            EntryKind::Dir { .. } => stats.dirs += 1,
            EntryKind::Symlink { .. } => stats.symlinks += 1,
        }
        if let Some((stamp, hash)) = s.cacheable {
            fresh.push((stamp, hash, s.source == Source::Hashed));
        }
        entries.push(s.entry);
    }

    // Saving the cache (sort, encode, write) and validating the manifest are independent, and both
    // wait for the whole walk: run them side by side.
    let save = || {
        if let Some(path) = &opts.cache_file {
            let settled = epoch_ns(started) - opts.racy_window.as_nanos() as i128;
            let kept = fresh
                .into_iter()
                .filter(|(stamp, _, _)| stamp.changed_ns() <= settled);
            cache.save_if_changed(path, kept);
        }
    };
    let ((), manifest) = rayon::join(save, || Manifest::from_canonical(entries, &opts.policy));
    let manifest = manifest.map_err(|source| ScanError::Manifest { root, source })?;
    tracing::debug!(?stats, "scan done");
    Ok(Scan { manifest, stats })
}

fn epoch_ns(t: SystemTime) -> i128 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Hashed,
    Cached,
    Empty,
}

/// One entry of the manifest-to-be, with where its hash came from.
struct Scanned {
    entry: Entry,
    source: Source,
    cacheable: Option<(Stamp, Hash)>,
}

/// The innermost path an `ignore` error carries.
fn error_path(e: &ignore::Error) -> Option<&Path> {
    match e {
        ignore::Error::WithPath { path, .. } => Some(path),
        ignore::Error::WithDepth { err, .. } | ignore::Error::WithLineNumber { err, .. } => {
            error_path(err)
        }
        ignore::Error::Partial(errs) => errs.iter().find_map(error_path),
        _ => None,
    }
}

/// An `ignore` error's message without the paths, which the caller prints once.
fn error_message(e: &ignore::Error) -> String {
    match e {
        ignore::Error::WithPath { err, .. } | ignore::Error::WithDepth { err, .. } => {
            error_message(err)
        }
        ignore::Error::Partial(errs) => errs
            .iter()
            .map(error_message)
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

fn ignore_file_error(path: &Path, err: &ignore::Error) -> ScanError {
    ScanError::IgnoreFile {
        path: error_path(err).unwrap_or(path).to_owned(),
        message: error_message(err),
    }
}

/// Turns a refused path (the walked entry at `path`) into the scan's error for it.
fn rel_error(path: PathBuf, e: PathError) -> ScanError {
    match e {
        PathError::NotUtf8(_) => ScanError::NotUtf8 {
            path: path.to_string_lossy().into_owned(),
        },
        PathError::Reserved(_) => ScanError::Reserved { path },
        source => ScanError::Path { path, source },
    }
}

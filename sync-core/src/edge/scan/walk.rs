//! The parallel traversal behind a scan: lists, filters, classifies and hashes every entry below the
//! root, each file as soon as it is found.
//!
//! Every directory is opened relative to its parent's descriptor and every entry is examined relative
//! to its directory's (`statat`, `openat`, `readlinkat`), so the kernel resolves one name per call
//! instead of the whole path again, and a file's full path is only built when an error names it.
//! Directories are rayon tasks, and a large directory's files are split into several, so hashing
//! overlaps listing. A directory task opens its own descriptor and then drops its parent's, which
//! keeps the number of open descriptors near the depth of the tree rather than its width.
//!
//! Filtering reproduces the `ignore` crate's walker, which this replaces: a `.relsyncignore` applies
//! to the paths below its directory, the deepest one that has an opinion on a path (ignore or `!`
//! whitelist) decides, and the `excludes` matcher is a separate source that its whitelists cannot
//! override. An ignore file's I/O errors are ignored and its pattern errors reported, as there.
//! Entries are filtered before they are classified, so an excluded name is never an error, and an
//! excluded directory is not entered.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, RawDir};
use rustix::io::Errno;

use super::cache::{self, HashCache, Stamp};
use super::IGNORE_FILE;
use super::{hash, ignore_file_error, io_err, rel_error, ScanError, ScanOptions, Scanned, Source};
use crate::manifest::{Entry, EntryKind, Hash};
use crate::path::RelPath;

/// A directory's files are hashed in tasks of at most this many, so that one large directory still
/// spreads over all threads; a task per file would cost more in scheduling than small files take.
const FILES_PER_TASK: usize = 32;
/// Bytes of directory entries fetched per `getdents` call.
const LIST_BUF: usize = 16 << 10;

/// Directories deeper than this are opened by their full path rather than from their parent. A
/// subdirectory waiting for its turn keeps its parent open, so along a deep chain with a sibling at
/// every level the open descriptors grow with depth; this bounds them to about this many per thread
/// whatever the tree, against the usual limit of 1024. Real trees are far shallower.
const PINNED_DEPTH: usize = 64;

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// The filters that do not come from ignore files.
pub(super) struct Filter {
    excludes: Gitignore,
    skip: HashSet<Box<[u8]>>,
    /// The directory holding the cache file, relative to the root, and the cache file's name, when
    /// the cache lives inside the tree: it and its temporary siblings are not part of the source.
    cache: Option<(PathBuf, OsString)>,
}

impl Filter {
    pub fn new(root: &Path, opts: &ScanOptions) -> Result<Filter, ScanError> {
        let mut b = GitignoreBuilder::new(root);
        for pattern in &opts.excludes {
            b.add_line(None, pattern).map_err(|e| ScanError::Pattern {
                pattern: pattern.clone(),
                message: e.to_string(),
            })?;
        }
        let excludes = b.build().map_err(|e| ScanError::Pattern {
            pattern: opts.excludes.join(" "),
            message: e.to_string(),
        })?;
        let skip = opts
            .skip
            .iter()
            .map(|p| p.as_str().as_bytes().into())
            .collect();
        let cache = opts.cache_file.as_deref().and_then(|c| {
            let parent = c.parent().filter(|p| !p.as_os_str().is_empty());
            let dir = fs::canonicalize(parent.unwrap_or(Path::new("."))).ok()?;
            let rel = dir.strip_prefix(root).ok()?.to_owned();
            Some((rel, c.file_name()?.to_owned()))
        });
        Ok(Filter {
            excludes,
            skip,
            cache,
        })
    }

    /// Whether the directory at `rel` holds the cache file.
    fn holds_cache(&self, rel: &str) -> bool {
        self.cache
            .as_ref()
            .is_some_and(|(dir, _)| dir.as_path() == Path::new(rel))
    }

    /// Whether the entry at `rel` (named `name`) survives the excludes, the skip list and the rule
    /// that ignore files and the cache are never shipped. `rel` is relative to the root, where the
    /// excludes are rooted (see [`ignored`]).
    fn keep(&self, rel: &[u8], name: &[u8], is_dir: bool, cache_here: bool) -> bool {
        if !is_dir && name == IGNORE_FILE.as_bytes() {
            return false;
        }
        if cache_here && self.is_cache_name(name) {
            return false;
        }
        if !self.skip.is_empty() && self.skip.contains(rel) {
            return false;
        }
        !self
            .excludes
            .matched(Path::new(OsStr::from_bytes(rel)), is_dir)
            .is_ignore()
    }

    fn is_cache_name(&self, name: &[u8]) -> bool {
        let Some((_, cache_name)) = &self.cache else {
            return false;
        };
        let c = cache_name.as_bytes();
        name.starts_with(c)
            && (name.len() == c.len() || name[c.len()..].starts_with(cache::TEMP_INFIX.as_bytes()))
    }
}

/// The ignore files in force in a directory, deepest first.
struct Ignores {
    matcher: Gitignore,
    /// Length of the relative path of the ignore file's directory, with its trailing `/`: what to
    /// cut from an entry's relative path to match it from that directory, as the matcher expects.
    prefix: usize,
    parent: Option<Arc<Ignores>>,
}

/// Whether the ignore files in `chain` leave out the entry at `rel`. Each matcher is rooted at its
/// directory's absolute path, as the `ignore` crate roots it, but is given the entry's path relative
/// to that directory: `Gitignore` strips its root from a path that starts with it, so both match
/// alike, and this one costs no allocation.
fn ignored(chain: Option<&Arc<Ignores>>, rel: &[u8], is_dir: bool) -> bool {
    let mut next = chain;
    while let Some(ig) = next {
        let m = ig
            .matcher
            .matched(Path::new(OsStr::from_bytes(&rel[ig.prefix..])), is_dir);
        if !m.is_none() {
            return m.is_ignore();
        }
        next = ig.parent.as_ref();
    }
    false
}

/// Reads the ignore file of the directory at `abs`, as the `ignore` crate does: I/O errors (it
/// vanished, it is unreadable, it is a directory) leave it without effect, bad patterns are errors.
fn read_ignore_file(abs: &Path) -> Result<Gitignore, ScanError> {
    let path = abs.join(IGNORE_FILE);
    let mut b = GitignoreBuilder::new(abs);
    let mut errs = Vec::new();
    if let Some(e) = b.add(&path) {
        if !e.is_io() {
            errs.push(e);
        }
    }
    match b.build() {
        Ok(m) if errs.is_empty() => return Ok(m),
        Ok(_) => {}
        Err(e) => errs.push(e),
    }
    let err = if errs.len() == 1 {
        errs.remove(0)
    } else {
        ignore::Error::Partial(errs)
    };
    Err(ignore_file_error(&path, &err))
}

/// An open directory of the tree.
struct Dir {
    fd: OwnedFd,
    abs: PathBuf,
}

/// A directory found and kept, not yet opened.
struct Child {
    /// The open parent, to open the child from; `None` deeper than [`PINNED_DEPTH`], where the
    /// child is opened by `abs`.
    parent: Option<Arc<Dir>>,
    abs: PathBuf,
    rel: RelPath,
    ignores: Option<Arc<Ignores>>,
}

/// One directory's entries: names in one buffer, so listing allocates per directory, not per name.
#[derive(Default)]
struct Listing {
    names: Vec<u8>,
    /// Start and end of each name in `names`, whether the entry is a directory, and the inode of
    /// an entry listed as a regular file.
    entries: Vec<(usize, usize, bool, Option<u64>)>,
    has_ignore_file: bool,
}

/// A regular file's entry kind, where its hash came from, and what the hash cache may keep of it.
type Regular = (EntryKind, Source, Option<(Stamp, Hash)>);

/// What [`Walker::fresh_file`] found.
enum Fresh {
    Scanned(Regular),
    /// No regular file any more: look again as for any entry.
    NotRegular,
    /// Left unhashed after a hashing error elsewhere, which then fails the scan.
    Unhashed,
}

/// State shared by the tasks of one walk.
struct Walker<'a> {
    filter: &'a Filter,
    ignore_file: bool,
    cache: &'a HashCache,
    progress: &'a (dyn Fn(u64) + Sync),
    found: Mutex<Vec<Scanned>>,
    /// The first error about the tree itself; it stops the walk.
    walk_error: Mutex<Option<ScanError>>,
    stop: AtomicBool,
    /// The first error reading a file's content. The walk goes on without hashing, so that a
    /// problem with the tree itself (a FIFO, a bad name: what the user must fix first) still wins
    /// over it, as when all hashing followed the walk.
    hash_error: Mutex<Option<ScanError>>,
    hash_failed: AtomicBool,
}

/// Lists, classifies and hashes every kept entry below `root` (which yields no entry itself), in no
/// particular order.
pub(super) fn walk(
    root: &Path,
    fd: OwnedFd,
    filter: &Filter,
    ignore_file: bool,
    cache: &HashCache,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<Scanned>, ScanError> {
    let w = Walker {
        filter,
        ignore_file,
        cache,
        progress,
        found: Mutex::new(Vec::new()),
        walk_error: Mutex::new(None),
        stop: AtomicBool::new(false),
        hash_error: Mutex::new(None),
        hash_failed: AtomicBool::new(false),
    };
    let root = Dir {
        fd,
        abs: root.to_owned(),
    };
    rayon::scope(|s| {
        let found = w.visit(s, root, None, None);
        w.deliver(found);
    });
    let take = |m: Mutex<Option<ScanError>>| m.into_inner().unwrap_or_else(PoisonError::into_inner);
    if let Some(e) = take(w.walk_error).or(take(w.hash_error)) {
        return Err(e);
    }
    Ok(w.found.into_inner().unwrap_or_else(PoisonError::into_inner))
}

impl<'a> Walker<'a> {
    fn fail(&self, e: ScanError) {
        let mut slot = self
            .walk_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        slot.get_or_insert(e);
        self.stop.store(true, Ordering::Relaxed);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn deliver(&self, batch: Vec<Scanned>) {
        if !batch.is_empty() && !self.stopped() {
            let mut found = self.found.lock().unwrap_or_else(PoisonError::into_inner);
            found.extend(batch);
        }
    }

    /// Opens a kept directory, records it, and walks it.
    fn visit_child<'s>(&'s self, s: &rayon::Scope<'s>, child: Child) {
        if self.stopped() {
            return;
        }
        let Child {
            parent,
            abs,
            rel,
            ignores,
        } = child;
        let opened = match &parent {
            Some(p) => rustix::fs::openat(&p.fd, rel.file_name(), DIR_FLAGS, Mode::empty()),
            None => rustix::fs::openat(rustix::fs::CWD, &abs, DIR_FLAGS, Mode::empty()),
        };
        let fd = match opened {
            Ok(fd) => fd,
            Err(e) => {
                let err = match &parent {
                    Some(p) => open_dir_error(p.fd.as_fd(), Path::new(rel.file_name()), &abs, e),
                    None => open_dir_error(rustix::fs::CWD, &abs, &abs, e),
                };
                return self.fail(err);
            }
        };
        drop(parent);
        let mode = match rustix::fs::fstat(&fd) {
            Ok(st) => st.st_mode & 0o777,
            Err(e) => return self.fail(io_err("read metadata of", &abs)(e.into())),
        };
        let dir = Dir { fd, abs };
        let mut found = self.visit(s, dir, Some(&rel), ignores);
        found.push(Scanned {
            entry: Entry {
                path: rel,
                kind: EntryKind::Dir { mode },
            },
            source: Source::Empty,
            cacheable: None,
        });
        self.deliver(found);
    }

    /// Walks the open directory `dir` at `rel` (`None` for the root): spawns a task per kept
    /// subdirectory and per batch of files, and returns what it scanned itself.
    fn visit<'s>(
        &'s self,
        s: &rayon::Scope<'s>,
        dir: Dir,
        rel: Option<&RelPath>,
        ignores: Option<Arc<Ignores>>,
    ) -> Vec<Scanned> {
        let listing = match list(dir.fd.as_fd(), &dir.abs) {
            Ok(l) => l,
            Err(e) => {
                self.fail(e);
                return Vec::new();
            }
        };
        let rel = rel.map_or("", RelPath::as_str);
        let mut ignores = ignores;
        if self.ignore_file && listing.has_ignore_file {
            match read_ignore_file(&dir.abs) {
                Ok(matcher) => {
                    ignores = Some(Arc::new(Ignores {
                        matcher,
                        prefix: if rel.is_empty() { 0 } else { rel.len() + 1 },
                        parent: ignores,
                    }))
                }
                Err(e) => {
                    self.fail(e);
                    return Vec::new();
                }
            }
        }
        let cache_here = self.filter.holds_cache(rel);
        let dir = Arc::new(dir);

        // `path` is reused for every entry's relative path: `rel/name`.
        let mut path = Vec::with_capacity(rel.len() + 64);
        path.extend_from_slice(rel.as_bytes());
        if !rel.is_empty() {
            path.push(b'/');
        }
        let prefix = path.len();
        let mut files = Vec::new();
        for &(start, end, is_dir, regular) in &listing.entries {
            let name = &listing.names[start..end];
            path.truncate(prefix);
            path.extend_from_slice(name);
            if !self.filter.keep(&path, name, is_dir, cache_here)
                || ignored(ignores.as_ref(), &path, is_dir)
            {
                continue;
            }
            let abs = || dir.abs.join(OsStr::from_bytes(name));
            let entry_rel = match std::str::from_utf8(&path) {
                Ok(p) => RelPath::new(p).map_err(|e| rel_error(abs(), e)),
                Err(_) => Err(ScanError::NotUtf8 {
                    path: abs().to_string_lossy().into_owned(),
                }),
            };
            let entry_rel = match entry_rel {
                Ok(r) => r,
                Err(e) => {
                    self.fail(e);
                    return Vec::new();
                }
            };
            if is_dir {
                let child = Child {
                    parent: (entry_rel.depth() <= PINNED_DEPTH).then(|| Arc::clone(&dir)),
                    abs: abs(),
                    rel: entry_rel,
                    ignores: ignores.clone(),
                };
                s.spawn(move |s| self.visit_child(s, child));
            } else {
                files.push((entry_rel, regular));
            }
        }
        drop(listing);

        while files.len() > FILES_PER_TASK {
            let batch = files.split_off(files.len() - FILES_PER_TASK);
            let dir = Arc::clone(&dir);
            s.spawn(move |_| {
                let found = self.files(&dir, batch);
                self.deliver(found);
            });
        }
        self.files(&dir, files)
    }

    /// Scans `files` of `dir`, each with its inode if the listing said it is a regular file.
    fn files(&self, dir: &Dir, files: Vec<(RelPath, Option<u64>)>) -> Vec<Scanned> {
        let mut found = Vec::with_capacity(files.len());
        for (rel, regular) in files {
            if self.stopped() {
                break;
            }
            // A regular file whose inode the cache does not hold cannot be found there: it is
            // opened and hashed at once, its stamp taken from the open descriptor, one path
            // lookup cheaper than an `lstat` first.
            let scanned = match regular.filter(|&ino| !self.cache.may_hold(ino)) {
                Some(_) => match self.fresh_file(dir, &rel) {
                    Ok(Fresh::Scanned((kind, source, cacheable))) => Ok(Some(Scanned {
                        entry: Entry { path: rel, kind },
                        source,
                        cacheable,
                    })),
                    Ok(Fresh::Unhashed) => Ok(None),
                    Ok(Fresh::NotRegular) => self.file(dir, rel),
                    Err(e) => Err(e),
                },
                None => self.file(dir, rel),
            };
            match scanned {
                Ok(Some(s)) => found.push(s),
                Ok(None) => {}
                Err(e) => {
                    self.fail(e);
                    break;
                }
            }
        }
        found
    }

    /// Opens and hashes a file listed as regular.
    fn fresh_file(&self, dir: &Dir, rel: &RelPath) -> Result<Fresh, ScanError> {
        if self.hash_failed.load(Ordering::Relaxed) {
            return Ok(Fresh::Unhashed);
        }
        let name = rel.file_name();
        let path = || dir.abs.join(name);
        let Some((file, st)) = hash::open_regular(dir.fd.as_fd(), Path::new(name), &path)? else {
            return Ok(Fresh::NotRegular);
        };
        let stamp = Stamp::from_stat(&st);
        let hash = || hash::hash_open(&file, &stamp, self.progress, &path);
        Ok(match self.regular(stamp, st.st_mode, hash) {
            Some(regular) => Fresh::Scanned(regular),
            None => Fresh::Unhashed,
        })
    }

    /// A regular file stamped `stamp` with `mode`: empty, found in the hash cache, or hashed by
    /// `hash`. `None` when it is left unhashed: hashing failed, here (the error is kept for the
    /// scan to report) or elsewhere.
    fn regular(
        &self,
        stamp: Stamp,
        mode: u32,
        hash: impl FnOnce() -> Result<Hash, ScanError>,
    ) -> Option<Regular> {
        let (hash, source) = if stamp.size == 0 {
            (Hash::of(b""), Source::Empty)
        } else if let Some(h) = self.cache.lookup(&stamp) {
            (h, Source::Cached)
        } else if self.hash_failed.load(Ordering::Relaxed) {
            return None;
        } else {
            match hash() {
                Ok(h) => (h, Source::Hashed),
                Err(e) => {
                    self.hash_error
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get_or_insert(e);
                    self.hash_failed.store(true, Ordering::Relaxed);
                    return None;
                }
            }
        };
        let cacheable = (source != Source::Empty).then_some((stamp, hash));
        let kind = EntryKind::File {
            size: stamp.size,
            mode: mode & 0o777,
            hash,
        };
        Some((kind, source, cacheable))
    }

    /// Classifies and (unless cached) hashes one entry that is not a directory. `None` means it was
    /// left unhashed after a hashing error elsewhere, which then fails the scan.
    fn file(&self, dir: &Dir, rel: RelPath) -> Result<Option<Scanned>, ScanError> {
        let name = rel.file_name();
        let path = || dir.abs.join(name);
        let st = rustix::fs::statat(&dir.fd, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err("read metadata of", &path())(e.into()))?;
        let (kind, source, cacheable) = match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => {
                let stamp = Stamp::from_stat(&st);
                let hash = || {
                    let name = Path::new(name);
                    hash::hash_at(dir.fd.as_fd(), name, &stamp, self.progress, &path)
                };
                match self.regular(stamp, st.st_mode, hash) {
                    Some(regular) => regular,
                    None => return Ok(None),
                }
            }
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(&dir.fd, name, Vec::new())
                    .map_err(|e| io_err("read symlink", &path())(e.into()))?
                    .into_string()
                    .map_err(|_| ScanError::TargetNotUtf8 { path: path() })?;
                (EntryKind::Symlink { target }, Source::Empty, None)
            }
            // Listed as something else a moment ago.
            FileType::Directory => return Err(ScanError::Changed { path: path() }),
            other => {
                return Err(ScanError::UnsupportedType {
                    kind: special_kind(other),
                    path: path(),
                })
            }
        };
        Ok(Some(Scanned {
            entry: Entry { path: rel, kind },
            source,
            cacheable,
        }))
    }
}

/// Reads all entries of the open directory `fd` (at `abs`), with their type as far as needed to
/// filter them: whether each is a directory.
fn list(fd: BorrowedFd<'_>, abs: &Path) -> Result<Listing, ScanError> {
    let mut buf = [MaybeUninit::<u8>::uninit(); LIST_BUF];
    let mut dir = RawDir::new(fd, &mut buf);
    let mut listing = Listing::default();
    while let Some(ent) = dir.next() {
        let ent = ent.map_err(|e| io_err("read", abs)(e.into()))?;
        let name = ent.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let regular = (ent.file_type() == FileType::RegularFile).then(|| ent.ino());
        let is_dir = match ent.file_type() {
            FileType::Directory => true,
            // Not every file system fills in the type; `lstat` then tells, as in std's `DirEntry`.
            FileType::Unknown => {
                let st = rustix::fs::statat(fd, ent.file_name(), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| io_err("read", &abs.join(OsStr::from_bytes(name)))(e.into()))?;
                FileType::from_raw_mode(st.st_mode) == FileType::Directory
            }
            _ => false,
        };
        listing.has_ignore_file |= name == IGNORE_FILE.as_bytes();
        let start = listing.names.len();
        listing.names.extend_from_slice(name);
        listing
            .entries
            .push((start, listing.names.len(), is_dir, regular));
    }
    Ok(listing)
}

/// The error for a kept directory that cannot be opened, worded as the walk's previous design (one
/// `lstat`, then a listing) worded it.
fn open_dir_error(at: BorrowedFd<'_>, name: &Path, abs: &Path, e: Errno) -> ScanError {
    match rustix::fs::statat(at, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(e) => io_err("read metadata of", abs)(e.into()),
        Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::Directory => {
            ScanError::Changed {
                path: abs.to_owned(),
            }
        }
        Ok(_) => io_err("read", abs)(e.into()),
    }
}

fn special_kind(ft: FileType) -> &'static str {
    match ft {
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        _ => "file of unknown type",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use ignore::WalkBuilder;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::super::{scan, ScanOptions};
    use super::*;

    /// Ignore-file lines and exclude patterns to draw from: anchored, unanchored, directory-only,
    /// globstar, whitelists of files and of directories, comments.
    const LINES: &[&str] = &[
        "*.log",
        "!keep.log",
        "/top.txt",
        "cache/",
        "cache",
        "!cache",
        "s*/",
        "**/deep/*.php",
        "*.txt",
        "!d1",
        "d0/",
        "# note",
        "",
        "sub/x.php",
        "/sub",
        "!*.md",
        "*.md",
        "d?/",
        "!s1/",
        "!top.txt",
        "deep",
    ];
    const NAMES: &[&str] = &[
        "a.log",
        "keep.log",
        "top.txt",
        "cache",
        "x.php",
        "README.md",
        "deep",
        "sub",
        "s1",
        "d0",
        "d1",
    ];

    fn build(rng: &mut StdRng, dir: &Path, depth: usize) {
        fs::create_dir_all(dir).unwrap();
        for name in NAMES {
            let roll: f64 = rng.gen();
            if depth < 3 && roll < 0.35 {
                build(rng, &dir.join(name), depth + 1);
            } else if roll < 0.8 {
                fs::write(dir.join(name), name.as_bytes()).unwrap();
            }
        }
        if rng.gen_bool(0.4) {
            let lines: Vec<&str> = (0..rng.gen_range(1..5))
                .map(|_| LINES[rng.gen_range(0..LINES.len())])
                .collect();
            fs::write(dir.join(IGNORE_FILE), lines.join("\n")).unwrap();
        }
    }

    /// What the `ignore` crate's walker, set up as the scan used to set it up, keeps.
    fn reference(root: &Path, excludes: &[String], ignore_file: bool) -> BTreeSet<String> {
        let mut b = GitignoreBuilder::new(root);
        for p in excludes {
            b.add_line(None, p).unwrap();
        }
        let excludes = b.build().unwrap();
        let mut w = WalkBuilder::new(root);
        w.standard_filters(false).follow_links(false);
        if ignore_file {
            w.add_custom_ignore_filename(IGNORE_FILE);
        }
        w.filter_entry(move |d| {
            let is_dir = d.file_type().is_some_and(|t| t.is_dir());
            d.depth() == 0
                || !((d.file_name() == IGNORE_FILE && !is_dir)
                    || excludes.matched(d.path(), is_dir).is_ignore())
        });
        w.build()
            .map(|d| d.unwrap())
            .filter(|d| d.depth() > 0)
            .map(|d| {
                d.path()
                    .strip_prefix(root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn filters_like_the_ignore_crate_walker() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut nonempty = 0;
        for case in 0..60 {
            let td = tempfile::tempdir().unwrap();
            let root = fs::canonicalize(td.path()).unwrap();
            build(&mut rng, &root, 0);
            let excludes: Vec<String> = (0..rng.gen_range(0..3))
                .map(|_| LINES[rng.gen_range(0..LINES.len())].to_owned())
                .collect();
            let ignore_file = case % 5 != 0;
            let opts = ScanOptions {
                excludes: excludes.clone(),
                ignore_file,
                ..ScanOptions::default()
            };
            let got: BTreeSet<String> = scan(&root, &opts, &|_| {})
                .unwrap()
                .manifest
                .entries()
                .iter()
                .map(|e| e.path.to_string())
                .collect();
            let want = reference(&root, &excludes, ignore_file);
            nonempty += usize::from(!want.is_empty());
            assert_eq!(got, want, "case {case}, excludes {excludes:?}");
        }
        // The generator must produce trees worth comparing.
        assert!(nonempty > 40, "{nonempty}");
    }

    #[test]
    fn deep_and_wide_trees_are_complete() {
        let td = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(td.path()).unwrap();
        // Deeper than PINNED_DEPTH, so that directories are opened both ways, and directories with
        // more files than one task takes.
        let mut deep = root.clone();
        for i in 0..300 {
            deep.push(format!("{}", i % 10));
        }
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("leaf"), b"leaf").unwrap();
        for d in 0..3 {
            let dir = root.join(format!("wide{d}"));
            fs::create_dir(&dir).unwrap();
            for f in 0..(FILES_PER_TASK * 3 + d) {
                fs::write(dir.join(format!("f{f}")), format!("{d}/{f}")).unwrap();
            }
        }
        let s = scan(&root, &ScanOptions::default(), &|_| {}).unwrap();
        assert_eq!(s.stats.dirs, 300 + 3);
        assert_eq!(s.stats.files, 1 + 3 * FILES_PER_TASK as u64 * 3 + 3);
        assert_eq!(
            s.manifest.entries().len() as u64,
            s.stats.dirs + s.stats.files
        );
        let want = reference(&root, &[], true);
        let got: BTreeSet<String> = s
            .manifest
            .entries()
            .iter()
            .map(|e| e.path.to_string())
            .collect();
        assert_eq!(got, want);
    }

    /// A deep chain with a sibling at every level keeps each level's parent open until the sibling
    /// is entered; the scan must still fit a small descriptor limit. It lowers the limit in a child
    /// process running only this test, so that other tests keep theirs.
    #[test]
    fn deep_comb_fits_a_small_descriptor_limit() {
        const CHILD: &str = "RELSYNC_SCAN_FD_CHILD";
        const DEPTH: usize = 600;
        if let Some(root) = std::env::var_os(CHILD) {
            use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
            let max = getrlimit(Resource::Nofile).maximum;
            setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(256),
                    maximum: max,
                },
            )
            .unwrap();
            let s = scan(Path::new(&root), &ScanOptions::default(), &|_| {}).unwrap();
            assert_eq!(s.stats.dirs, 3 * DEPTH as u64);
            assert_eq!(s.stats.files, DEPTH as u64);
            return;
        }
        let td = tempfile::tempdir().unwrap();
        let mut dir = fs::canonicalize(td.path()).unwrap();
        let root = dir.clone();
        for _ in 0..DEPTH {
            // A sibling listed before the chain and one after it: whichever order the file system
            // lists them in, one of them waits while the chain is walked.
            fs::create_dir(dir.join("s")).unwrap();
            fs::write(dir.join("s/f"), b"f").unwrap();
            fs::create_dir(dir.join("c")).unwrap();
            fs::create_dir(dir.join("t")).unwrap();
            dir.push("c");
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "edge::scan::walk::tests::deep_comb_fits_a_small_descriptor_limit",
                "--nocapture",
            ])
            .env(CHILD, &root)
            // One thread takes the siblings only after the chain; more would take some earlier.
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

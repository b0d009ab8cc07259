//! Syncs into an export (`relsync sync SRC relsync://HOST/NAME[/PATH]`): the destination, its
//! lock, the content it already holds and the mirror itself.
//!
//! The destination is the export's directory, or `PATH` below it, opened one component at a time
//! without following symlinks, so nothing a sync does can leave the export; every later lookup is
//! relative to that handle. A non-blocking `flock` on the export directory keeps two syncs into one
//! export from interleaving (a dry run takes it shared: it changes nothing, but should not plan
//! against a half-applied sync).
//!
//! Content the destination already holds anywhere counts as present for the need. Before the
//! mirror removes or replaces anything, every such file that will be copied to a new place is
//! hard-linked into a per-sync work directory inside the destination (`.relsync-tmp-sync-*`,
//! which scans and plans never see), next to the files received from the client. The mirror
//! (`edge::mirror::apply_mirror_in`) then copies from there into fresh temporary names, verifies
//! each file and renames it into place. The work directory goes when the sync ends, however it
//! ends; one left by a crash is removed, with every other mirror temporary in the destination, by
//! the next sync into it.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use cap_fs_ext::DirExt as _;
use cap_std::fs::Dir;
use sync_core::edge::exec::ContentSource;
use sync_core::edge::mirror::{apply_mirror_in, remove_temporaries, TEMP_PATTERN};
use sync_core::edge::object::ObjectStore;
use sync_core::edge::scan::{scan_dir, ScanError, ScanOptions};
use sync_core::edge::EdgeError;
use sync_core::manifest::{EntryKind, Hash, Manifest, ManifestError, Policy};
use sync_core::path::RelPath;
use sync_core::plan::{plan_mirror, MirrorOp};
use sync_core::proto::daemon::{compute_need as need_of, Event};
use sync_core::wire::{Command, ErrorKind, Limits};

use super::content::copy_verified;
use super::work::{edge_failed, failed, Basis};
use crate::config::ExportConfig;

/// Name prefix of a sync's work directory in its destination (matched by [`TEMP_PATTERN`]).
const WORK_PREFIX: &str = ".relsync-tmp-sync-";

static WORK_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The destination of one sync, locked for the session.
#[derive(Debug)]
pub(super) struct Destination {
    name: String,
    /// The destination's path, for messages and as the scan's root.
    path: PathBuf,
    /// `None` only for a dry run into a destination that does not exist yet.
    dir: Option<Dir>,
    excludes: Vec<String>,
    max_entries: usize,
    /// Where received and secured content waits for the mirror (not for a dry run).
    work: Option<WorkDir>,
    /// The destination as scanned for the need, planned against by the mirror.
    scanned: Mutex<Option<Manifest>>,
    /// A descriptor of the export directory holding the `flock`; dropped last, so the lock
    /// outlives the work directory.
    _lock: OwnedFd,
}

/// A sync's work directory; removed when dropped.
#[derive(Debug)]
struct WorkDir {
    parent: Dir,
    name: String,
    objects: ObjectStore,
}

impl WorkDir {
    fn remove(&self) {
        match self.parent.remove_dir_all(&self.name) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                "cannot remove the sync's work directory {}: {e}; the next sync removes it",
                self.objects.path().display()
            ),
        }
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        self.remove();
    }
}

impl Destination {
    /// Where payloads that wait for the budget are spooled: the work directory, on the
    /// destination's file system, named through its open descriptor (`/proc/self/fd/N`) so that
    /// the export's path is not resolved again; by its path where `/proc` is not mounted.
    pub(super) fn spool_dir(&self) -> Option<PathBuf> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let w = self.work.as_ref()?;
        let by_fd = PathBuf::from(format!(
            "/proc/self/fd/{}",
            w.objects.dir().as_fd().as_raw_fd()
        ));
        Some(if by_fd.is_dir() {
            by_fd
        } else {
            w.objects.path().to_owned()
        })
    }

    pub(super) fn objects(&self) -> Option<&ObjectStore> {
        self.work.as_ref().map(|w| &w.objects)
    }
}

/// Opens the destination of `command` (a `Sync`) in `export`: takes the export's lock, resolves
/// the subpath without following symlinks (creating what is missing, unless a dry run), removes
/// what an interrupted sync left there and creates this sync's work directory. Authorization
/// happened before: nothing here runs for a key the export does not list.
pub(super) fn open(
    export: &ExportConfig,
    command: &Command,
    limits: &Limits,
) -> Result<Destination, Event> {
    let Command::Sync {
        subpath,
        dry_run,
        excludes,
        ..
    } = command
    else {
        return Err(failed(
            ErrorKind::Internal,
            format!("export {} opened for {}", export.name, command.name()),
        ));
    };
    let name = &export.name;
    let root = Dir::open_ambient_dir(&export.path, cap_std::ambient_authority()).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            failed(
                ErrorKind::NotFound,
                format!(
                    "export {name}: its directory {} does not exist; create it on the daemon's host (relsyncd does not create exports)",
                    export.path.display()
                ),
            )
        } else {
            failed(
                ErrorKind::Internal,
                format!(
                    "export {name}: cannot open {}: {e}",
                    export.path.display()
                ),
            )
        }
    })?;
    let lock = lock(&root, name, *dry_run)?;
    let path = match subpath {
        Some(p) => export.path.join(p.as_str()),
        None => export.path.clone(),
    };
    let mut dir = Some(root.try_clone().map_err(|e| {
        failed(
            ErrorKind::Internal,
            format!("export {name}: cannot open {}: {e}", export.path.display()),
        )
    })?);
    let mut walked = export.path.clone();
    for component in subpath.iter().flat_map(|p| p.components()) {
        walked.push(component);
        // A dry run stops at the first component that does not exist yet.
        let Some(parent) = dir.take() else { break };
        dir = step(&parent, component, *dry_run).map_err(|why| {
            failed(
                ErrorKind::BadRequest,
                format!("export {name}: {}: {why}", walked.display()),
            )
        })?;
    }
    let work = match (&dir, dry_run) {
        (Some(d), false) => Some(prepare_work(d, &path).map_err(|e| {
            failed(
                super::work::io_kind(&e),
                format!(
                    "export {name}: cannot create a work directory in {}: {e}",
                    path.display()
                ),
            )
        })?),
        _ => None,
    };
    Ok(Destination {
        name: name.clone(),
        path,
        dir,
        excludes: excludes.clone(),
        max_entries: usize::try_from(limits.max_manifest_entries).unwrap_or(usize::MAX),
        work,
        scanned: Mutex::new(None),
        _lock: lock,
    })
}

/// Takes the export's lock: exclusive for a sync, shared for a dry run, never waiting. The lock
/// lives as long as the returned descriptor.
fn lock(root: &Dir, name: &str, shared: bool) -> Result<OwnedFd, Event> {
    use rustix::fs::{flock, FlockOperation, Mode, OFlags};
    let op = if shared {
        FlockOperation::NonBlockingLockShared
    } else {
        FlockOperation::NonBlockingLockExclusive
    };
    // cap-std may hold directories as `O_PATH`, which cannot be locked.
    let fd = rustix::fs::openat(
        root,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        failed(
            ErrorKind::Internal,
            format!("export {name}: cannot open it to lock it: {e}"),
        )
    })?;
    match flock(&fd, op) {
        Ok(()) => Ok(fd),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(failed(
            ErrorKind::Busy,
            format!("export {name} is busy: another sync into it is running; try again when it has finished"),
        )),
        Err(e) => Err(failed(
            ErrorKind::Internal,
            format!("export {name}: cannot lock it: {e}"),
        )),
    }
}

/// Opens `component` of `parent` as a directory without following a symlink, creating it unless
/// `dry_run`. `Ok(None)`: it does not exist and this is a dry run.
fn step(parent: &Dir, component: &str, dry_run: bool) -> Result<Option<Dir>, String> {
    match parent.open_dir_nofollow(component) {
        Ok(d) => return Ok(Some(d)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(describe(parent, component, &e)),
    }
    if dry_run {
        return Ok(None);
    }
    match parent.create_dir(component) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create it: {e}")),
    }
    parent
        .open_dir_nofollow(component)
        .map(Some)
        .map_err(|e| describe(parent, component, &e))
}

fn describe(parent: &Dir, component: &str, e: &io::Error) -> String {
    match parent.symlink_metadata(component) {
        Ok(m) if m.is_symlink() => {
            "is a symlink; relsyncd never follows symlinks inside an export, sync to the real directory".into()
        }
        Ok(m) if !m.is_dir() => "is not a directory; remove it or sync to another path".into(),
        _ => format!("cannot open it: {e}"),
    }
}

/// Removes what an interrupted sync left in `dest` (its work directory, and then every mirror
/// temporary in the tree) and creates this sync's work directory.
fn prepare_work(dest: &Dir, path: &std::path::Path) -> io::Result<WorkDir> {
    let stale = dest
        .entries()?
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with(WORK_PREFIX));
    if stale {
        let removed = remove_temporaries(dest);
        tracing::info!(
            destination = %path.display(),
            removed,
            "removed what an interrupted sync left behind"
        );
    }
    let n = WORK_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{WORK_PREFIX}{}-{n}", std::process::id());
    dest.create_dir(&name)?;
    dest.create_dir(format!("{name}/objects"))?;
    let objects = dest.open_dir_nofollow(format!("{name}/objects"))?;
    let objects = ObjectStore::in_dir(objects, path.join(&name).join("objects"));
    Ok(WorkDir {
        parent: dest.try_clone()?,
        name,
        objects,
    })
}

/// Scans the destination and finds what of `manifest` it lacks. Content present anywhere in it is
/// not needed; unless this is a dry run, the copies of it that the mirror will use are first
/// secured in the work directory (content that cannot be linked there is needed after all). A
/// basis is the destination's file at the same path.
pub(super) fn compute_need(
    dest: &Destination,
    manifest: &Manifest,
) -> Result<(Event, Option<Arc<Basis>>), Event> {
    let scanned = scan(dest)?;
    // Content the mirror will copy rather than leave where it is.
    let written: HashSet<Hash> = plan_mirror(manifest, &scanned, false)
        .ops
        .iter()
        .filter_map(|op| match op {
            MirrorOp::Write { hash, .. } => Some(*hash),
            _ => None,
        })
        .collect();
    let mut present: HashMap<Hash, (&RelPath, u32)> = HashMap::new();
    for (path, _, mode, hash) in scanned.files() {
        present.entry(*hash).or_insert((path, mode));
    }
    let mut secured = HashSet::new();
    let mut unsecured = 0u64;
    if let (Some(work), Some(dir)) = (&dest.work, &dest.dir) {
        for hash in &written {
            if let Some((path, mode)) = present.get(hash) {
                if work.objects.link_from(dir, path, hash, *mode) {
                    secured.insert(*hash);
                } else {
                    unsecured += 1;
                }
            }
        }
    }
    let dry_run = dest.work.is_none();
    let need = need_of(manifest, Some(&scanned), |h| {
        present.contains_key(h) && (dry_run || !written.contains(h) || secured.contains(h))
    });
    tracing::info!(
        destination = %dest.path.display(),
        entries = scanned.len(),
        needed = need.files.len(),
        with_basis = need.files.iter().filter(|n| n.basis.is_some()).count(),
        have_files = need.have_files,
        have_bytes = need.have_bytes,
        secured = secured.len(),
        unsecured,
        dry_run,
        "need computed"
    );
    let basis = match &dest.dir {
        Some(d) => Some(Arc::new(Basis {
            name: format!("the destination {}", dest.path.display()),
            dir: d.try_clone().map_err(|e| {
                failed(
                    ErrorKind::Internal,
                    format!("cannot open {}: {e}", dest.path.display()),
                )
            })?,
        })),
        None => None,
    };
    *dest.scanned.lock().unwrap_or_else(PoisonError::into_inner) = Some(scanned);
    Ok((Event::Need(need), basis))
}

/// The destination as a manifest: everything but the user's excludes and mirror temporaries
/// (which include the work directory).
fn scan(dest: &Destination) -> Result<Manifest, Event> {
    let Some(dir) = &dest.dir else {
        return Ok(Manifest::empty());
    };
    let mut excludes = dest.excludes.clone();
    excludes.push(TEMP_PATTERN.to_string());
    let opts = ScanOptions {
        excludes,
        ignore_file: false,
        skip: Vec::new(),
        cache_file: None,
        rehash: false,
        racy_window: sync_core::edge::scan::RACY_WINDOW,
        policy: Policy {
            max_entries: dest.max_entries,
            allow_world_writable: true,
            ..Policy::default()
        },
    };
    let t = std::time::Instant::now();
    let scanned = scan_dir(dir, &dest.path, &opts, &|_| {}).map_err(|e| {
        let kind = match &e {
            ScanError::Pattern { .. } => ErrorKind::BadRequest,
            ScanError::Manifest {
                source: ManifestError::TooManyEntries { .. },
                ..
            } => ErrorKind::Limit,
            ScanError::Io { source, .. } => super::work::io_kind(source),
            _ => ErrorKind::Internal,
        };
        failed(
            kind,
            format!(
                "export {}: scanning the destination failed: {}",
                dest.name,
                sync_core::edge::error_chain(&e)
            ),
        )
    })?;
    tracing::debug!(
        ms = t.elapsed().as_millis() as u64,
        files = scanned.stats.files,
        hashed = scanned.stats.hashed_files,
        "destination scanned"
    );
    Ok(scanned.manifest)
}

/// Plans the mirror of `manifest` into the destination scanned for the need and, unless
/// `dry_run`, applies it; then removes the work directory.
pub(super) fn mirror(
    dest: &Destination,
    manifest: &Manifest,
    delete: bool,
    dry_run: bool,
) -> Result<Event, Event> {
    let scanned = dest
        .scanned
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
        .ok_or_else(|| {
            failed(
                ErrorKind::Internal,
                "the mirror was asked for before the destination was scanned".into(),
            )
        })?;
    let plan = plan_mirror(manifest, &scanned, delete);
    if dry_run {
        return Ok(Event::Mirrored {
            plan: Box::new(plan),
            applied: None,
        });
    }
    let (Some(dir), Some(work)) = (&dest.dir, &dest.work) else {
        return Err(failed(
            ErrorKind::Internal,
            "a sync without a destination or work directory".into(),
        ));
    };
    let source = Secured::new(&work.objects, manifest).map_err(|e| edge_failed(&e))?;
    let t = std::time::Instant::now();
    let applied = apply_mirror_in(dir, &dest.path, &plan.ops, &source, &|_| {})
        .map_err(|e| edge_failed(&e))?;
    work.remove();
    tracing::info!(
        destination = %dest.path.display(),
        ms = t.elapsed().as_millis() as u64,
        written = applied.written_files,
        written_bytes = applied.written_bytes,
        removed = applied.removed,
        dirs = applied.dirs,
        unchanged = plan.summary.unchanged_files,
        "sync applied"
    );
    Ok(Event::Mirrored {
        plan: Box::new(plan),
        applied: Some(applied),
    })
}

/// The mirror's content source: the work directory's objects, by content, each copy verified
/// against the manifest's hash while it is made.
struct Secured<'a> {
    objects: &'a ObjectStore,
    modes: HashMap<Hash, Vec<u32>>,
    target: &'a Manifest,
}

impl<'a> Secured<'a> {
    fn new(objects: &'a ObjectStore, target: &'a Manifest) -> Result<Secured<'a>, EdgeError> {
        let mut modes: HashMap<Hash, Vec<u32>> = HashMap::new();
        for (hash, mode) in objects.list()? {
            modes.entry(hash).or_default().push(mode);
        }
        Ok(Secured {
            objects,
            modes,
            target,
        })
    }
}

impl ContentSource for Secured<'_> {
    fn write_full(&self, path: &RelPath, size: u64, out: &mut File) -> Result<(), EdgeError> {
        let source_err = |reason: String| EdgeError::Source {
            path: path.clone(),
            reason,
        };
        let hash = match self.target.get(path).map(|e| &e.kind) {
            Some(EntryKind::File { hash, .. }) => *hash,
            _ => return Err(source_err("not a file of the synced manifest".into())),
        };
        let copies = self
            .modes
            .get(&hash)
            .into_iter()
            .flatten()
            .filter_map(|mode| self.objects.open_object(&hash, *mode));
        for src in copies {
            let copied = copy_verified(src, size, &hash, out)
                .map_err(|e| source_err(format!("writing the copy failed: {e}")))?;
            if copied {
                return Ok(());
            }
        }
        Err(source_err(
            "its content was neither received nor found intact in the destination (a file changed during the sync); sync again".into(),
        ))
    }
}

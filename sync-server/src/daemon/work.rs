//! What the session's requests do on disk. Every function here blocks (file-system work, hashing,
//! delta decoding) and runs on tokio's blocking pool; each answers with the session [`Event`] (or
//! file result) its request expects, with messages that name the app, release or file.

use std::collections::HashSet as StdHashSet;

type HashSet<T> = StdHashSet<T, ahash::RandomState>;
use std::io::{self, Seek as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::file_bytes::Content;
use cap_std::fs::{Dir, OpenOptions};
use memmap2::Mmap;
use sync_core::delta::{self, BasisSignature, DeltaError, DeltaFormat, Verified};
use sync_core::edge::activate::ActivationOptions;
use sync_core::edge::deploy::{self, DeployOptions};
use sync_core::edge::exec::{CheckedLinks, ExecOptions};
use sync_core::edge::object::{ObjectError, ObjectStore};
use sync_core::edge::root::LockGuard;
use sync_core::edge::{error_chain, EdgeError};
use sync_core::layout;
use sync_core::manifest::{EntryKind, Hash, Manifest};
use sync_core::path::RelPath;
use sync_core::proto::daemon::{
    compute_need as need_of, Event, FileFailure, FileJob, NeedList, SignatureJob,
};
use sync_core::release::ReleaseId;
use sync_core::retention;
use sync_core::wire::{BasisRef, Command, ErrorKind, Pruning, ReleaseInfo, ReleaseStatus};

use super::content::{KeptContent, LocalContent};
use super::stream::Payload;
use super::App;

/// An app opened for one session: the lock (for commands that change the root) and the object
/// store (for pushes). Dropping the last handle releases the lock.
#[derive(Debug)]
pub(super) struct Opened {
    app: Arc<App>,
    lock: Option<LockGuard>,
    objects: Option<ObjectStore>,
    /// For a push: the encoding of the kept manifest the client named as its basis.
    pub(super) manifest_basis: Option<Arc<[u8]>>,
    /// For a push: the identity check of the current release's files, started when the push
    /// opened the app, while its manifest is on the way.
    precheck: std::sync::Mutex<Option<Precheck>>,
}

/// [`content::intact_files`] of a release, running.
#[derive(Debug)]
struct Precheck {
    release: ReleaseId,
    thread: std::thread::JoinHandle<Result<ahash::AHashSet<RelPath>, String>>,
}

/// Starts checking which files of `app`'s current release are still the inodes it recorded.
fn precheck_current(app: &Arc<App>) -> Option<Precheck> {
    let release = app.root.current().ok()??;
    let record = app.root.load_record(&release).ok()?;
    let app = Arc::clone(app);
    let thread = std::thread::Builder::new()
        .name("relsyncd-check".into())
        .spawn(move || {
            let t = std::time::Instant::now();
            let intact = super::content::intact_files(&app.root, &record);
            tracing::debug!(
                ms = t.elapsed().as_millis() as u64,
                "checked the current release's files"
            );
            intact.map_err(|e| error_chain(&e))
        })
        .ok()?;
    Some(Precheck { release, thread })
}

impl Drop for Opened {
    /// Once the lock is released, the app is idle: its next release's tree is prestaged.
    fn drop(&mut self) {
        if let Some(lock) = self.lock.take() {
            drop(lock);
            super::prestage::kick(&self.app, false);
        }
    }
}

impl Opened {
    /// Where payloads that wait for the budget are spooled: next to the objects they become, on
    /// the same file system and inside the app root.
    pub(super) fn spool_dir(&self) -> PathBuf {
        self.app
            .root
            .path()
            .join(layout::META)
            .join(layout::OBJECTS)
    }

    fn name(&self) -> &str {
        &self.app.config.name
    }

    /// The keys the app authorizes.
    pub(super) fn authorized(&self) -> &StdHashSet<crate::tls::Fingerprint> {
        &self.app.config.authorized
    }

    /// The app's root.
    pub(super) fn root(&self) -> &sync_core::edge::root::AppRoot {
        &self.app.root
    }

    /// Where release `release` lives once complete.
    pub(super) fn release_dir(&self, release: &ReleaseId) -> PathBuf {
        self.app
            .root
            .path()
            .join(layout::RELEASES)
            .join(release.as_str())
    }

    /// The object store, for pushes.
    pub(super) fn objects(&self) -> Option<&ObjectStore> {
        self.objects.as_ref()
    }

    fn lock(&self) -> Result<&LockGuard, Event> {
        self.lock
            .as_ref()
            .ok_or_else(|| failed(ErrorKind::Internal, "the app lock is not held".into()))
    }
}

/// Where the bases of a transfer are: the `current` release when a push's need was computed, or
/// a sync's destination. `name` says which in messages.
#[derive(Debug)]
pub(super) struct Basis {
    pub(super) name: String,
    pub(super) dir: Dir,
}

pub(super) fn failed(kind: ErrorKind, message: String) -> Event {
    Event::Failed { kind, message }
}

pub(super) fn edge_failed(e: &EdgeError) -> Event {
    failed(edge_kind(e), error_chain(e))
}

/// The error kind a client is told for a file-system failure.
fn edge_kind(e: &EdgeError) -> ErrorKind {
    match e {
        EdgeError::NoSpace { .. } => ErrorKind::NoSpace,
        EdgeError::Verify { .. } => ErrorKind::Verify,
        EdgeError::NoSuchRelease(_) | EdgeError::NoRollbackTarget => ErrorKind::NotFound,
        EdgeError::Busy { .. } => ErrorKind::Busy,
        EdgeError::ReleaseExists(_)
        | EdgeError::Protected(_)
        | EdgeError::Plan(_)
        | EdgeError::Manifest(_) => ErrorKind::BadRequest,
        other => {
            let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(other);
            while let Some(e) = cur {
                if let Some(io) = e.downcast_ref::<io::Error>() {
                    return io_kind(io);
                }
                cur = e.source();
            }
            ErrorKind::Internal
        }
    }
}

/// `NoSpace` for a full disk or quota, `Internal` for anything else.
pub(super) fn io_kind(e: &io::Error) -> ErrorKind {
    match e.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => ErrorKind::NoSpace,
        _ => ErrorKind::Internal,
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Takes the app's lock (unless `command` only reads) and recovers the root.
pub(super) fn open(app: Arc<App>, command: &Command) -> Result<Opened, Event> {
    let started = std::time::Instant::now();
    let opened = open_inner(app, command);
    tracing::debug!(ms = started.elapsed().as_millis() as u64, "opened");
    opened
}

fn open_inner(app: Arc<App>, command: &Command) -> Result<Opened, Event> {
    if matches!(command, Command::Releases) {
        return Ok(Opened {
            app,
            lock: None,
            objects: None,
            manifest_basis: None,
            precheck: Default::default(),
        });
    }
    // A tree being prestaged is finished or removed first; the app is ours then.
    app.prestager.stop();
    let lock = app
        .root
        .lock(|stale| {
            tracing::warn!(
                holder = stale,
                "the previous holder of the lock is gone; recovering"
            );
        })
        .map_err(|e| match e {
            EdgeError::Busy { holder, .. } => failed(
                ErrorKind::Busy,
                format!(
                    "app {} is busy (held by {holder}); wait for that command to finish and try again",
                    app.config.name
                ),
            ),
            other => edge_failed(&other),
        })?;
    let recovered = app.root.recover(&lock).map_err(|e| edge_failed(&e))?;
    if !recovered.is_empty() {
        tracing::info!(
            staging_removed = ?recovered.staging_removed,
            trash_removed = ?recovered.trash_removed,
            orphan_records_removed = ?recovered.orphan_records_removed,
            current_tmp_removed = recovered.current_tmp_removed,
            objects_removed = recovered.objects_removed,
            "recovered what an interrupted run left behind"
        );
    }
    let objects = match command {
        Command::Push { .. } => Some(ObjectStore::open(&app.root).map_err(|e| edge_failed(&e))?),
        _ => None,
    };
    let manifest_basis = match command {
        Command::Push {
            manifest_basis: Some(digest),
            ..
        } => kept_manifest(&app, digest),
        _ => None,
    };
    let precheck = match command {
        Command::Push { .. } => precheck_current(&app),
        _ => None,
    };
    Ok(Opened {
        app,
        lock: Some(lock),
        objects,
        manifest_basis,
        precheck: std::sync::Mutex::new(precheck),
    })
}

/// The encoding of a kept release's manifest with this digest (the current release is tried
/// first: it is what the client last pushed, unless someone else pushed since).
fn kept_manifest(app: &App, digest: &Hash) -> Option<Arc<[u8]>> {
    let root = &app.root;
    let (records, current) = match (root.records(), root.current()) {
        (Ok(r), Ok(c)) => (r, c),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!("cannot look for the basis manifest: {}", error_chain(&e));
            return None;
        }
    };
    let mut order: Vec<_> = records.iter().collect();
    order.sort_by_key(|r| (Some(&r.id) != current.as_ref(), std::cmp::Reverse(r.seq)));
    let found = order
        .into_iter()
        .find(|r| r.digest() == *digest)
        .map(|r| r.manifest.encode());
    if found.is_none() {
        tracing::info!(%digest, "the client's basis manifest is not kept here; it is sent whole");
    }
    found
}

/// What the daemon lacks of `manifest`: content held by an intact file of a kept release or by a
/// verified object is not needed; a basis is offered only while the current release's file is
/// intact, so the client's delta rebuilds against exactly the content it was made for.
/// What [`compute_need`] found.
pub(super) struct Needed {
    /// `Event::Need`, for the session.
    pub(super) event: Event,
    /// The release the needed files' bases are read from.
    pub(super) basis: Option<Arc<Basis>>,
    /// The kept files found intact, which a build starting right away need not check again.
    pub(super) checked: CheckedLinks,
}

pub(super) fn compute_need(
    opened: &Opened,
    release: &ReleaseId,
    manifest: &Manifest,
) -> Result<Needed, Event> {
    let root = &opened.app.root;
    let records = root.records().map_err(|e| edge_failed(&e))?;
    if let Some(existing) = records.iter().find(|r| &r.id == release) {
        if existing.digest() != manifest.digest() {
            return Err(failed(
                ErrorKind::BadRequest,
                format!(
                    "release {release} already exists in app {} with other content; push under another release id, or activate it",
                    opened.name()
                ),
            ));
        }
        // The same push again after it was cut short between building the release and activating
        // it (daemon killed, client gone): nothing to receive, and it converges.
        tracing::info!("release already built from this manifest; nothing to receive");
        let need = NeedList {
            files: Vec::new(),
            have_files: manifest.file_count() as u64,
            have_bytes: manifest.total_file_bytes(),
        };
        return Ok(Needed {
            event: Event::Need(need),
            basis: None,
            checked: CheckedLinks::default(),
        });
    }
    let current = root.current().map_err(|e| edge_failed(&e))?;
    let wanted: HashSet<Hash> = manifest.files().map(|(_, _, _, h)| *h).collect();
    let mut kept =
        KeptContent::new(root, &records, current.as_ref(), &wanted).map_err(|e| edge_failed(&e))?;
    // The current release's files: checked since the push opened the app (the lock is held
    // since, so what was current then is current now), or here if that check did not run.
    let current_record = current
        .as_ref()
        .and_then(|c| records.iter().find(|r| &r.id == c));
    let current_intact = match current_record {
        Some(r) => {
            let running = opened
                .precheck
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
                .filter(|p| p.release == r.id);
            let t = std::time::Instant::now();
            let joined = running.map(|p| p.thread.join());
            tracing::debug!(
                ms = t.elapsed().as_millis() as u64,
                "waited for the current release's check"
            );
            let intact = match joined {
                Some(Ok(Ok(intact))) => intact,
                other => {
                    if let Some(Ok(Err(e))) = other {
                        tracing::warn!(
                            "checking the current release's files failed: {e}; checking again"
                        );
                    }
                    super::content::intact_files(root, r).map_err(|e| edge_failed(&e))?
                }
            };
            let intact = Arc::new(intact);
            kept.set_prechecked(&r.id, Arc::clone(&intact));
            Some(intact)
        }
        None => None,
    };
    let (kept_have, checked) = kept.held_checked(wanted.iter());
    let objects = opened
        .objects
        .as_ref()
        .ok_or_else(|| failed(ErrorKind::Internal, "the object store is not open".into()))?;
    let candidates: StdHashSet<(Hash, u32)> = objects
        .list()
        .map_err(|e| edge_failed(&e))?
        .into_iter()
        .filter(|(h, _)| wanted.contains(h) && !kept_have.contains(h))
        .collect();
    let object_have: HashSet<Hash> = objects
        .verified(&candidates)
        .map_err(|e| edge_failed(&e))?
        .into_iter()
        .map(|(h, _)| h)
        .collect();
    let mut need = need_of(manifest, current_record.map(|r| &r.manifest), |h| {
        kept_have.contains(h) || object_have.contains(h)
    });

    let paths: Vec<&RelPath> = manifest.files().map(|(p, ..)| p).collect();
    let mut dropped = 0u64;
    for n in &mut need.files {
        let Some(basis) = n.basis else { continue };
        let intact = match (current_record, &current_intact, paths.get(n.file as usize)) {
            (Some(r), Some(set), Some(path)) => {
                set.contains(*path)
                    && matches!(
                        r.manifest.get(path).map(|e| &e.kind),
                        Some(EntryKind::File { size, .. }) if *size == basis.size
                    )
            }
            _ => false,
        };
        if !intact {
            n.basis = None;
            dropped += 1;
        }
    }
    let basis = match current_record {
        Some(r) => root
            .dir()
            .open_dir(format!("{}/{}", layout::RELEASES, r.id))
            .ok()
            .map(|dir| {
                Arc::new(Basis {
                    name: format!("release {}", r.id),
                    dir,
                })
            }),
        None => None,
    };
    tracing::info!(
        needed = need.files.len(),
        with_basis = need.files.iter().filter(|n| n.basis.is_some()).count(),
        have_files = need.have_files,
        have_bytes = need.have_bytes,
        objects_reused = object_have.len(),
        bases_dropped = dropped,
        "need computed"
    );
    Ok(Needed {
        event: Event::Need(need),
        basis,
        checked,
    })
}

/// A basis file, read (or mapped, when large) and checked against the content it should have.
fn open_basis(basis: &Basis, path: &RelPath, want: &BasisRef) -> Result<Content, String> {
    let mut opts = OpenOptions::new();
    opts.read(true);
    cap_fs_ext::OpenOptionsFollowExt::follow(&mut opts, cap_fs_ext::FollowSymlinks::No);
    let file = basis
        .dir
        .open_with(path.as_str(), &opts)
        .map_err(|e| format!("cannot open it: {e}"))?
        .into_std();
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat it: {e}"))?;
    if !meta.is_file() || meta.len() != want.size || want.size == 0 {
        return Err(format!(
            "it is not a regular file of {} bytes any more",
            want.size
        ));
    }
    // SAFETY: files of a complete release, and of a sync's destination while its lock is held,
    // are never written in place by relsync (new content always goes to a new inode). If someone
    // edits a large one in place anyway, the mapping may change under us: the hash check below
    // and the blake3 check of every rebuilt file catch that, and reading a mapping of a regular
    // file cannot fault short of truncation, which the size check above makes unlikely rather
    // than impossible; the daemon accepts that window for files it owns.
    let content =
        unsafe { Content::load(&file, want.size) }.map_err(|e| format!("cannot read it: {e}"))?;
    if content.len() as u64 != want.size {
        return Err(format!(
            "it is not a regular file of {} bytes any more",
            want.size
        ));
    }
    let actual = Hash::from(blake3::hash(&content));
    if actual != want.hash {
        return Err(format!(
            "its content hashes to {actual}, not {} as recorded",
            want.hash
        ));
    }
    Ok(content)
}

/// The rsync signature of a basis, or `None` (the client then sends the file in full) when the
/// basis cannot be read or no longer has the recorded content.
pub(super) fn signature(basis: Option<&Basis>, job: &SignatureJob) -> Option<Vec<u8>> {
    let Some(basis) = basis else {
        tracing::warn!(path = %job.path, "nothing to take a basis from; the file will be sent in full");
        return None;
    };
    match open_basis(basis, &job.path, &job.basis) {
        Ok(map) => Some(BasisSignature::calculate(&map).as_bytes().to_vec()),
        Err(why) => {
            tracing::warn!(path = %job.path, basis = %basis.name, "basis unusable, the file will be sent in full: {why}");
            None
        }
    }
}

/// Rebuilds a received file into the object store and verifies it.
pub(super) fn store(
    objects: Option<&ObjectStore>,
    basis: Option<&Basis>,
    job: &FileJob,
    payload: &Payload,
) -> Result<(), FileFailure> {
    let local = |kind, message: String| FileFailure::Local { kind, message };
    let objects =
        objects.ok_or_else(|| local(ErrorKind::Internal, "the object store is not open".into()))?;
    if let (Payload::Spool { file, len }, DeltaFormat::Full) = (payload, job.format) {
        if *len > 0 {
            return store_spooled_full(Some(objects), job, file);
        }
    }
    let spool_map;
    let payload: &[u8] = match payload {
        Payload::Memory(v) => v,
        Payload::Spool { len: 0, .. } => &[],
        Payload::Streamed => {
            return Err(local(
                ErrorKind::Internal,
                "a streamed payload reached the store queue".into(),
            ))
        }
        Payload::Spool { file, .. } => {
            // SAFETY: the spool file is unnamed and ours alone; nothing else can change it.
            spool_map = unsafe { Mmap::map(file) }.map_err(|e| {
                local(
                    ErrorKind::Internal,
                    format!("cannot map the spooled payload: {e}"),
                )
            })?;
            &spool_map
        }
    };
    let basis_map = match (job.format.needs_basis(), job.basis) {
        (false, _) => None,
        (true, None) => {
            return Err(FileFailure::Corrupt(format!(
                "a {} payload without a basis",
                job.format
            )))
        }
        (true, Some(want)) => {
            let basis = basis.ok_or_else(|| {
                local(ErrorKind::Internal, "nothing to take the basis from".into())
            })?;
            Some(open_basis(basis, &job.path, &want).map_err(|why| {
                local(
                    ErrorKind::Internal,
                    format!(
                        "basis in {} is unusable ({why}); run the command again to send the file in full",
                        basis.name
                    ),
                )
            })?)
        }
    };
    let mut writer = objects
        .create(job.hash, job.mode, job.size)
        .map_err(|e| local(edge_kind(&e), error_chain(&e)))?;
    let expected = blake3::Hash::from_bytes(job.hash.0);
    let applied = delta::apply(
        job.format,
        basis_map.as_deref(),
        payload,
        job.size,
        &expected,
        &mut writer,
    );
    finish_store(applied, writer)
}

/// Stores a spooled `Full` payload by reading the spool file in chunks: a mapping would count
/// the whole payload in the daemon's resident memory while it decodes, and large files are what
/// gets spooled.
fn store_spooled_full(
    objects: Option<&ObjectStore>,
    job: &FileJob,
    spool: &std::fs::File,
) -> Result<(), FileFailure> {
    let mut reader = spool;
    reader.rewind().map_err(|e| FileFailure::Local {
        kind: ErrorKind::Internal,
        message: format!("cannot read the spooled payload: {e}"),
    })?;
    store_full_from(
        objects,
        job,
        &mut std::io::BufReader::with_capacity(256 * 1024, reader),
    )
}

/// Stores a `Full` payload read from `payload` as it comes (a spool file, or the pieces a file
/// stream hands over while it receives them), with memory bounded by the decoder's window.
pub(super) fn store_full_from(
    objects: Option<&ObjectStore>,
    job: &FileJob,
    payload: &mut dyn std::io::Read,
) -> Result<(), FileFailure> {
    let local = |kind, message: String| FileFailure::Local { kind, message };
    let objects =
        objects.ok_or_else(|| local(ErrorKind::Internal, "the object store is not open".into()))?;
    let mut writer = objects
        .create(job.hash, job.mode, job.size)
        .map_err(|e| local(edge_kind(&e), error_chain(&e)))?;
    let expected = blake3::Hash::from_bytes(job.hash.0);
    finish_store(
        delta::apply_full_from(payload, job.size, &expected, &mut writer),
        writer,
    )
}

/// Classifies the result of rebuilding a file into `writer`, then completes the object.
fn finish_store(
    applied: Result<Verified, DeltaError>,
    writer: sync_core::edge::object::ObjectWriter<'_>,
) -> Result<(), FileFailure> {
    let local = |kind, message: String| FileFailure::Local { kind, message };
    let verified = match applied {
        Ok(verified) => verified,
        Err(DeltaError::HashMismatch { actual, .. }) => {
            return Err(FileFailure::HashMismatch {
                actual: actual.into(),
            })
        }
        Err(DeltaError::Sink(e)) => {
            return Err(local(
                io_kind(&e),
                format!("writing the object failed: {e}"),
            ))
        }
        Err(e) if e.wants_full_resend() => return Err(FileFailure::Corrupt(error_chain(&e))),
        Err(e) => return Err(local(ErrorKind::Internal, error_chain(&e))),
    };
    match writer.finish(&verified) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(ObjectError::Hash { got, .. })) => Err(FileFailure::HashMismatch {
            actual: Hash::from_hex(&got).unwrap_or(Hash([0; 32])),
        }),
        Ok(Err(e)) => Err(FileFailure::Corrupt(e.to_string())),
        Err(e) => Err(local(edge_kind(&e), error_chain(&e))),
    }
}

/// Builds the pushed release from kept releases and received objects; it is complete (synced,
/// verified, recorded) but not active when this returns.
/// What a build started before the push's files are all in waits for (see [`stage`]).
pub(super) struct Arrival {
    /// The (content, mode) pairs the needed files become in the object store.
    pub(super) objects: StdHashSet<(Hash, u32)>,
    /// Gets a message once the client goes on with the push (its first file or signature
    /// request); dropped when it does not (a dry run).
    pub(super) proceed: std::sync::mpsc::Receiver<()>,
    /// Gets a message once every needed file is stored; dropped when the push ends first.
    pub(super) stored: std::sync::mpsc::Receiver<()>,
    /// The kept files the need computation found intact just before.
    pub(super) checked: CheckedLinks,
    /// Set when the push ends before its files are all in: the build stops where it is.
    pub(super) cancel: Arc<std::sync::atomic::AtomicBool>,
}

/// The (content, mode) pairs `need`'s files of `manifest` become as objects.
pub(super) fn arriving_objects(manifest: &Manifest, need: &NeedList) -> StdHashSet<(Hash, u32)> {
    let mut wanted: Vec<u32> = need.files.iter().map(|n| n.file).collect();
    wanted.sort_unstable();
    wanted.dedup();
    let mut wanted = wanted.into_iter().peekable();
    let mut objects = StdHashSet::new();
    for (i, (_, _, mode, hash)) in manifest.files().enumerate() {
        if wanted.next_if_eq(&(i as u32)).is_some() {
            objects.insert((*hash, mode));
        }
        if wanted.peek().is_none() {
            break;
        }
    }
    objects
}

/// Builds the release from `manifest`. With `arrival`, this starts as soon as the need is
/// known: the release is planned, and once `arrival.proceed` says the push goes on,
/// directories, links from kept releases and symlinks are staged while the needed files
/// arrive, and the rest once `arrival.stored` says they are all in.
pub(super) fn stage(
    opened: &Opened,
    release: &ReleaseId,
    manifest: &Manifest,
    arrival: Option<Arrival>,
) -> Event {
    let build = || -> Result<Event, Event> {
        let lock = opened.lock()?;
        let root = &opened.app.root;
        // The lock is held since the push opened the app, and the push activates only after
        // this: what is current now is what the host ran before the push.
        let previous = root.current().map_err(|e| edge_failed(&e))?;
        let records = root.records().map_err(|e| edge_failed(&e))?;
        if records
            .iter()
            .any(|r| &r.id == release && r.digest() == manifest.digest())
        {
            // Built by an earlier run of this push (see `compute_need`): complete and verified.
            // That run may have ended before it dropped the objects the release now holds.
            if let Some(objects) = &opened.objects {
                let held: HashSet<(Hash, u32)> = manifest
                    .files()
                    .map(|(_, _, mode, hash)| (*hash, mode))
                    .collect();
                for (hash, mode) in objects.list().map_err(|e| edge_failed(&e))? {
                    if held.contains(&(hash, mode)) {
                        objects.remove(&hash, mode).map_err(|e| edge_failed(&e))?;
                    }
                }
            }
            return Ok(Event::Staged {
                linked: manifest.file_count() as u64,
                phases: vec![],
                relayed: Vec::new(),
                previous,
            });
        }
        let source = LocalContent::new(root, manifest, &records).map_err(|e| edge_failed(&e))?;
        let config = &opened.app.config;
        let opts = DeployOptions {
            release_id: Some(release.clone()),
            keep: config.keep,
            activate: false,
            shared: config.shared.clone(),
            now_unix: now_unix(),
            use_objects: true,
            prestaged: config.prestage,
            exec: ExecOptions {
                // What this daemon received is verified by identity, not read a second time.
                object_stamps: Arc::new(
                    opened
                        .objects
                        .as_ref()
                        .map(ObjectStore::verified_stamps)
                        .unwrap_or_default(),
                ),
                // Checked by the need computation a moment ago, with the lock held since.
                checked_links: arrival
                    .as_ref()
                    .map(|a| Arc::clone(&a.checked))
                    .unwrap_or_default(),
                cancel: arrival.as_ref().map(|a| Arc::clone(&a.cancel)),
                ..ExecOptions::default()
            },
            ..DeployOptions::default()
        };
        let report = match arrival {
            None => deploy::deploy(root, lock, manifest, &source, &opts, &|_| {}),
            Some(arrival) => {
                let mut wait = || {
                    arrival.stored.recv().map_err(|_| {
                        EdgeError::Cancelled("the push ended before its files were all in".into())
                    })?;
                    source.refresh_objects();
                    Ok(Arc::new(
                        opened
                            .objects
                            .as_ref()
                            .map(ObjectStore::verified_stamps)
                            .unwrap_or_default(),
                    ))
                };
                let mut start = || {
                    arrival
                        .proceed
                        .recv()
                        .map_err(|_| EdgeError::Cancelled("the push ended at its need".into()))
                };
                let arriving = deploy::Arriving {
                    objects: arrival.objects,
                    start: &mut start,
                    wait: &mut wait,
                };
                deploy::deploy_arriving(root, lock, manifest, &source, &opts, &|_| {}, arriving)
            }
        }
        .map_err(|e| edge_failed(&e))?;
        let s = &report.summary;
        tracing::info!(
            files = s.files,
            linked = s.linked_files,
            moved = s.moved_files,
            from_objects = s.object_files,
            copied = s.full_files,
            link_fallbacks = report.exec.link_fallbacks,
            "release built"
        );
        Ok(Event::Staged {
            linked: s.linked_files,
            phases: report.timings,
            relayed: Vec::new(),
            previous,
        })
    };
    build().unwrap_or_else(|e| {
        if let Event::Failed { message, .. } = &e {
            tracing::warn!("building the release failed: {message}");
        }
        e
    })
}

/// The activation pipeline of the app as relsyncd's config declares it (else the app root's own).
fn activation_options(opened: &Opened) -> ActivationOptions {
    ActivationOptions {
        now_unix: now_unix(),
        config: opened.app.config.activation.clone(),
        ..ActivationOptions::default()
    }
}

/// Points `current` at `release`; returns only after the root directory was synced. With
/// `prune`, releases beyond the app's `keep` are then removed, as a local deploy does.
pub(super) fn activate(opened: &Opened, release: &ReleaseId, prune: bool) -> Event {
    let run = || -> Result<Event, Event> {
        let lock = opened.lock()?;
        deploy::activate_with(&opened.app.root, lock, release, &activation_options(opened))
            .map_err(|e| edge_failed(&e))?;
        tracing::info!(%release, "activated");
        Ok(Event::Activated {
            release: release.clone(),
            pruned: prune.then(|| prune_after_activation(opened, lock)),
        })
    };
    run().unwrap_or_else(|e| e)
}

pub(super) fn rollback(opened: &Opened, to: Option<&ReleaseId>) -> Event {
    let run = || -> Result<Event, Event> {
        let lock = opened.lock()?;
        let release =
            deploy::rollback_with(&opened.app.root, lock, to, &activation_options(opened))
                .map_err(|e| edge_failed(&e))?
                .release;
        tracing::info!(%release, "rolled back");
        Ok(Event::Activated {
            release,
            pruned: None,
        })
    };
    run().unwrap_or_else(|e| e)
}

pub(super) fn prune(opened: &Opened, keep: Option<u32>) -> Event {
    let run = || -> Result<Event, Event> {
        let lock = opened.lock()?;
        let keep = keep
            .map(|k| usize::try_from(k).unwrap_or(usize::MAX))
            .or(opened.app.config.keep);
        let removed =
            deploy::prune(&opened.app.root, lock, keep, now_unix()).map_err(|e| edge_failed(&e))?;
        tracing::info!(removed = ?removed, "pruned");
        Ok(Event::Pruned { removed })
    };
    run().unwrap_or_else(|e| e)
}

/// Takes the app offline and removes every release (`relsync bench` on an app set aside for it).
pub(super) fn clear(opened: &Opened) -> Event {
    let run = || -> Result<Event, Event> {
        let lock = opened.lock()?;
        let removed =
            deploy::clear(&opened.app.root, lock, now_unix()).map_err(|e| edge_failed(&e))?;
        tracing::warn!(removed = ?removed, "cleared: the app has no current release");
        Ok(Event::Pruned { removed })
    };
    run().unwrap_or_else(|e| e)
}

/// After an activation that asked for it (an activating push, or a fleet's activation): keep
/// only the app's configured number of releases. A failure is logged and reported; the
/// activation itself succeeded.
fn prune_after_activation(opened: &Opened, lock: &LockGuard) -> Pruning {
    match deploy::prune(&opened.app.root, lock, opened.app.config.keep, now_unix()) {
        Ok(removed) => {
            if !removed.is_empty() {
                tracing::info!(removed = ?removed, "pruned old releases");
            }
            Pruning::Removed(removed)
        }
        Err(e) => {
            let why = error_chain(&e);
            tracing::warn!("pruning old releases failed: {why}");
            Pruning::Failed(format!("pruning old releases failed: {why}"))
        }
    }
}

/// The kept releases, oldest first, with their roles.
pub(super) fn list(opened: &Opened) -> Event {
    let run = || -> Result<Event, EdgeError> {
        let root = &opened.app.root;
        let records = root.records()?;
        let current = root.current()?;
        let states = root.states(&records)?;
        let rollback = retention::rollback_target(&states, current.as_ref());
        let list = records
            .iter()
            .zip(&states)
            .map(|(r, s)| ReleaseInfo {
                id: r.id.clone(),
                status: if Some(&r.id) == current.as_ref() {
                    ReleaseStatus::Current
                } else if Some(&r.id) == rollback.as_ref() {
                    ReleaseStatus::Rollback
                } else if s.bad {
                    ReleaseStatus::Bad
                } else {
                    ReleaseStatus::Good
                },
                created_unix: r.created_unix,
                files: r.manifest.file_count() as u64,
                bytes: r.manifest.total_file_bytes(),
                manifest: r.digest(),
            })
            .collect();
        Ok(Event::Releases(list))
    };
    run().unwrap_or_else(|e| edge_failed(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sync_core::manifest::{Entry, Policy};
    use sync_core::wire::NeedFile;

    #[test]
    fn arriving_objects_are_the_needed_files_content_and_mode() {
        let h = |s: &str| Hash::of(s.as_bytes());
        let manifest = Manifest::from_unsorted(
            vec![
                Entry::file("a", 1, 0o644, h("a")).unwrap(),
                Entry::dir("d", 0o755).unwrap(),
                Entry::file("d/b", 1, 0o755, h("b")).unwrap(),
                Entry::file("d/c", 1, 0o644, h("b")).unwrap(),
                Entry::file("e", 1, 0o600, h("e")).unwrap(),
            ],
            &Policy::default(),
        )
        .unwrap();
        // (needed file indices, in the order the need lists them; the objects they become)
        type Case<'a> = (&'a [u32], &'a [(&'a str, u32)]);
        let cases: &[Case] = &[
            (&[], &[]),
            (&[0], &[("a", 0o644)]),
            (&[3, 1], &[("b", 0o755), ("e", 0o600)]),
            (&[2, 0, 1], &[("a", 0o644), ("b", 0o755), ("b", 0o644)]),
            (&[3, 3, 9], &[("e", 0o600)]),
        ];
        for (files, want) in cases {
            let need = NeedList {
                files: files
                    .iter()
                    .map(|&file| NeedFile { file, basis: None })
                    .collect(),
                have_files: 0,
                have_bytes: 0,
            };
            let want: StdHashSet<(Hash, u32)> = want.iter().map(|(c, m)| (h(c), *m)).collect();
            assert_eq!(arriving_objects(&manifest, &need), want, "{files:?}");
        }
    }
}

//! The daemon's side of a connection: authorize, receive a manifest and the files it lacks, and
//! ask its driver to build and activate the release, or (for `relsync sync`) to mirror the tree
//! into an export.
//!
//! The session decides and the driver acts. The driver authorizes the peer ([`Request::Open`]),
//! computes what is missing ([`Request::ComputeNeed`], usually with [`compute_need`]), computes
//! signatures, stores each received file as a verified object ([`Request::Receive`]), and builds
//! and activates the release ([`Request::Stage`], [`Request::Activate`]); it reports back through
//! [`DaemonSession::handle_event`] and [`DaemonSession::file_finished`]. The session never asks
//! for a release to be staged unless every needed file arrived and verified, and it admits file
//! payloads only within the bytes-in-flight budget: a header beyond it waits in a queue until
//! earlier files finish.
//!
//! A sync runs the same exchange up to the last file: the need is computed against the export's
//! destination ([`Request::ComputeMirrorNeed`]), and instead of staging the session asks for the
//! mirror to be applied ([`Request::Mirror`]), then reports the plan's steps and the counts
//! (`MirrorPlan`, `Synced`) and ends. A dry run asks for the plan right after `Need` and receives
//! no files.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::delta::DeltaFormat;
use crate::manifest::{EntryKind, Hash, Manifest, Policy};
use crate::path::RelPath;
use crate::plan::{MirrorPlan, MirrorStats};
use crate::release::ReleaseId;
use crate::wire::{
    decode, encode_frame, max_payload_len, peek_version, AppName, BasisRef, ClientMsg, Command,
    DaemonMsg, ErrorKind, FileHeader, FrameDecoder, Limits, MirrorStep, NeedFile, PhaseTime,
    Pruning, ReleaseInfo, Staged, Synced, Usage, WireError, FRAME_HEADER_LEN, MAX_ERROR_MESSAGE,
    MAX_EXCLUDES, MAX_EXCLUDE_LEN, MAX_FILE_HEADER, MAX_MAX_FRAME, MAX_PHASES, MAX_PHASE_NAME,
    MIN_MAX_FRAME, VERSION,
};

use super::{Deadlines, ProtoError};

/// Bound on the encoded size of one [`NeedFile`] (index, option tag, hash, size varint).
const NEED_FILE_MAX: usize = 5 + 1 + 32 + 10;
/// Room for everything in a frame besides its list (variant, length varints, flags, counters).
const FRAME_OVERHEAD: usize = 64;

/// Work the session asks its driver to do. Each is answered with the [`Event`] named in its doc,
/// or with [`Event::Failed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Check that the peer's key may use `app` (for a sync: the export), take the app's (or
    /// export's) lock when `command` changes anything, and recover what an interrupted run left;
    /// for a push naming a `manifest_basis`, look for a kept release whose manifest encodes to
    /// that digest. Answer [`Event::Opened`]; refuse with [`Event::Failed`] (`Unauthorized`,
    /// `Busy`, ...).
    Open { app: AppName, command: Command },
    /// Find which files of `manifest` the daemon lacks. Answer [`Event::Need`] (see
    /// [`compute_need`]).
    ComputeNeed {
        release: ReleaseId,
        manifest: Arc<Manifest>,
    },
    /// For a sync: scan the destination and find which files of `manifest` it lacks (see
    /// [`compute_need`], with the destination as the current release: a basis is the
    /// destination's file at the same path). Unless `dry_run`, secure the content the destination
    /// already holds so that removals of the mirror cannot take it away before it is copied.
    /// Answer [`Event::Need`].
    ComputeMirrorNeed {
        manifest: Arc<Manifest>,
        dry_run: bool,
    },
    /// Compute rsync signatures of these bases. Answer one [`Event::Signature`] per file.
    Signatures { files: Vec<SignatureJob> },
    /// Read `job.payload_len` bytes that follow the header on its file stream, rebuild the file
    /// with `delta::apply` into the object store, verify and fsync it. Answer with
    /// [`DaemonSession::file_finished`]; tell [`DaemonSession::payload_arrived`] as soon as the
    /// payload is read whole, since until then the client owes bytes and the message deadline
    /// runs.
    Receive(FileJob),
    /// Build `release` from kept releases and the object store, sync, verify and mark it
    /// complete. Answer [`Event::Staged`].
    Stage {
        release: ReleaseId,
        manifest: Arc<Manifest>,
    },
    /// For a sync, once every needed file is stored: plan the mirror of `manifest` into the
    /// destination (`plan::plan_mirror`) and, unless `dry_run`, apply it. Answer
    /// [`Event::Mirrored`].
    Mirror {
        manifest: Arc<Manifest>,
        delete: bool,
        dry_run: bool,
    },
    /// Point `current` at `release` (already current is fine) and fsync; with `prune` (an
    /// activating push, or `Command::Activate` asking for it), then remove old releases beyond the
    /// app's `keep`. Answer [`Event::Activated`], whose `pruned` is `Some` exactly when `prune`.
    Activate { release: ReleaseId, prune: bool },
    /// Answer [`Event::Releases`].
    ListReleases,
    /// Answer [`Event::Activated`] with the release now current.
    Rollback { to: Option<ReleaseId> },
    /// Answer [`Event::Pruned`].
    Prune { keep: Option<u32> },
    /// Remove `current`, then every release. Answer [`Event::Pruned`].
    Clear,
}

/// The result of a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer may go on; `policy` is the app's manifest policy (its `max_entries` is further
    /// capped by the session's limits).
    Opened {
        policy: Policy,
        /// The encoding of the push's basis manifest, when the daemon holds it.
        manifest_basis: Option<Arc<[u8]>>,
    },
    Need(NeedList),
    /// The signature of a requested basis; `None` when the basis is missing or fails its
    /// check, so the client sends the file in full.
    Signature {
        file: u32,
        data: Option<Vec<u8>>,
    },
    /// The release is complete; `linked` files came from kept releases by hard link. For a
    /// relayed push, `relayed` says what became of each node of the relay plan. `phases` is
    /// where building it took its time (the session adds its own need and receive phases).
    /// `previous` is the release that was current before the push (the push holds the app's
    /// lock, so nothing else changed it since the session opened the app).
    Staged {
        linked: u64,
        relayed: Vec<crate::relay::Relayed>,
        phases: Vec<PhaseTime>,
        previous: Option<ReleaseId>,
    },
    /// `release` is current; `pruned` is what the prune asked with it did.
    Activated {
        release: ReleaseId,
        pruned: Option<Pruning>,
    },
    Releases(Vec<ReleaseInfo>),
    Pruned {
        removed: Vec<ReleaseId>,
    },
    /// The mirror's plan, and what applying it did (`None` for a dry run).
    Mirrored {
        plan: Box<MirrorPlan>,
        applied: Option<MirrorStats>,
    },
    /// The request failed; the session ends and tells the client `kind` and `message`.
    Failed {
        kind: ErrorKind,
        message: String,
    },
}

/// `message` cut to at most `max` bytes, at a character boundary.
fn cut(mut message: String, max: usize) -> String {
    if message.len() > max {
        message.truncate(message.floor_char_boundary(max));
    }
    message
}

/// What the daemon lacks for a manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NeedList {
    /// Needed files, by strictly increasing file index.
    pub files: Vec<NeedFile>,
    /// Files that will not be received (content already present, or a duplicate of a needed
    /// file's content) and their bytes.
    pub have_files: u64,
    pub have_bytes: u64,
}

/// A basis to compute a signature of: the current release's file at `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureJob {
    pub file: u32,
    pub path: RelPath,
    pub basis: BasisRef,
}

/// An admitted file payload and everything needed to store it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileJob {
    pub file: u32,
    pub path: RelPath,
    pub size: u64,
    pub mode: u32,
    pub hash: Hash,
    pub format: DeltaFormat,
    /// For `ZstdRef` and `Rsync`: the content the payload applies to, the current release's file
    /// at `path` when the need was computed by [`compute_need`].
    pub basis: Option<BasisRef>,
    pub payload_len: u64,
}

/// Why a file could not be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileFailure {
    /// The payload rebuilt to content with another hash: the sender lied or its file changed.
    HashMismatch { actual: Hash },
    /// The payload is not a valid encoding of the file (bad frame, wrong size, bad delta).
    Corrupt(String),
    /// The file stream ended before `payload_len` bytes.
    Truncated { received: u64 },
    /// Storing failed on this side (disk full, I/O error, basis unreadable).
    Local { kind: ErrorKind, message: String },
}

/// How a session ended well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The release was built; `activated` tells whether the client also activated it.
    Pushed {
        staged: Staged,
        activated: bool,
    },
    Listed,
    Activated {
        release: ReleaseId,
    },
    RolledBack {
        release: ReleaseId,
    },
    Pruned {
        removed: Vec<ReleaseId>,
    },
    /// A sync was applied (or, for a dry run, planned).
    Synced(Synced),
}

/// Where a session stands, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonState {
    /// Waiting for `Hello`, or for the driver to authorize it.
    Handshake,
    /// Receiving the manifest.
    Manifest,
    /// Waiting for the driver's need computation.
    ComputingNeed,
    /// Receiving files.
    Transfer,
    /// Waiting for the driver to build the release.
    Staging,
    /// Waiting for the driver to plan and apply a sync.
    Mirroring,
    /// Release staged; waiting for `Activate`, or activating.
    Activation,
    /// Waiting for the driver to carry out a command.
    Command,
    Finished,
}

/// What the daemon lacks of `manifest`, given which contents it `have`s (kept releases and the
/// object store).
///
/// Lists every file of `manifest` whose content `have` does not know, once per distinct content;
/// the basis of a needed file is the file at the same path in `current` when its content differs
/// and is not empty.
pub fn compute_need(
    manifest: &Manifest,
    current: Option<&Manifest>,
    have: impl Fn(&Hash) -> bool,
) -> NeedList {
    let mut out = NeedList::default();
    let mut wanted = HashSet::new();
    for (i, (path, size, _, hash)) in manifest.files().enumerate() {
        if have(hash) || !wanted.insert(*hash) {
            out.have_files += 1;
            out.have_bytes = out.have_bytes.saturating_add(size);
            continue;
        }
        let basis = current
            .and_then(|c| c.get(path))
            .and_then(|e| match e.kind {
                EntryKind::File { size, hash: h, .. } if h != *hash && size > 0 => {
                    Some(BasisRef { hash: h, size })
                }
                _ => None,
            });
        out.files.push(NeedFile {
            file: u32::try_from(i).unwrap_or(u32::MAX),
            basis,
        });
    }
    out
}

/// What the received manifest is for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Goal {
    Release(ReleaseId),
    Mirror { delete: bool, dry_run: bool },
}

/// The manifest being received: a zstd frame of its encoding, against `basis` if any.
#[derive(Debug)]
struct ManifestIn {
    goal: Goal,
    len: u64,
    digest: Hash,
    basis: Option<Arc<[u8]>>,
    buf: Vec<u8>,
    policy: Policy,
}

/// A validated push or sync: what it is for, its manifest and where each file sits among the
/// entries.
#[derive(Debug, Clone)]
struct Push {
    goal: Goal,
    manifest: Arc<Manifest>,
    /// Entry index of each file, by file index.
    files: Vec<u32>,
    /// Session times (ms) at which the manifest was complete, the need was sent and the last
    /// needed file was stored: reported as phases in `Staged`.
    manifest_at: u64,
    need_at: u64,
    received_at: u64,
}

impl Push {
    fn file(&self, file: u32) -> Option<(&RelPath, u64, u32, Hash)> {
        let e = self
            .manifest
            .entries()
            .get(*self.files.get(file as usize)? as usize)?;
        match &e.kind {
            EntryKind::File { size, mode, hash } => Some((&e.path, *size, *mode, *hash)),
            _ => None,
        }
    }

    fn describe(&self, file: u32) -> String {
        match self.file(file) {
            Some((path, ..)) => format!("file {file} ({path})"),
            None => format!("file {file}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sig {
    NotRequested,
    Requested,
    Answered,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// Not announced yet.
    Pending,
    /// Header accepted, waiting for room in the budget.
    Queued {
        format: DeltaFormat,
        payload_len: u64,
    },
    /// Handed to the driver.
    Receiving {
        payload_len: u64,
    },
    Received,
}

#[derive(Debug)]
struct Slot {
    basis: Option<BasisRef>,
    sig: Sig,
    progress: Progress,
    /// The payload announced by its header has been read whole.
    arrived: bool,
}

/// The file transfer of a push.
#[derive(Debug)]
struct Transfer {
    push: Push,
    slots: HashMap<u32, Slot>,
    /// Needed files not yet announced by a header.
    unannounced: usize,
    /// Needed files not yet received.
    remaining: usize,
    /// Announced payloads not yet read whole: bytes the client still owes.
    unarrived: usize,
    in_flight: u64,
    queue: VecDeque<u32>,
    done: bool,
    received: u64,
    received_bytes: u64,
}

impl Transfer {
    /// Counts an announced payload as read whole, once.
    fn mark_arrived(&mut self, file: u32) {
        if let Some(slot) = self.slots.get_mut(&file) {
            let announced = matches!(
                slot.progress,
                Progress::Queued { .. } | Progress::Receiving { .. }
            );
            if announced && !slot.arrived {
                slot.arrived = true;
                self.unarrived -= 1;
            }
        }
    }
}

#[derive(Debug)]
enum Awaiting {
    Releases,
    Activate { release: ReleaseId, prune: bool },
    Rollback(Option<ReleaseId>),
    Prune,
}

#[derive(Debug)]
enum State {
    Hello,
    Opening { command: Command },
    Manifest(ManifestIn),
    ComputingNeed(Push),
    Receiving(Transfer),
    Staging(Transfer),
    Mirroring(Transfer),
    Staged { staged: Staged },
    Activating { staged: Staged },
    Command(Awaiting),
    Finished,
}

/// The daemon's protocol state for one connection.
#[derive(Debug)]
pub struct DaemonSession {
    limits: Limits,
    /// Payloads larger than this are written to disk by the driver as they arrive (see
    /// [`DaemonSession::set_spool_above`]); each counts against the bytes-in-flight budget with
    /// this much only, the memory it can occupy at once.
    spool_above: u64,
    /// The daemon's resource use, reported in `Staged` (see [`DaemonSession::set_usage`]).
    usage: Usage,
    decoder: FrameDecoder,
    state: State,
    clock: Deadlines,
    client_max_frame: u32,
    transmit: VecDeque<Vec<u8>>,
    requests: VecDeque<Request>,
    outcome: Option<Result<Outcome, ProtoError>>,
}

impl DaemonSession {
    /// A session for a connection accepted at `now` (ms).
    pub fn new(limits: Limits, now: u64) -> DaemonSession {
        DaemonSession {
            decoder: FrameDecoder::new(limits.max_frame),
            clock: Deadlines::new(now, limits.message_timeout_ms, limits.push_timeout_ms),
            limits,
            spool_above: u64::MAX,
            usage: Usage::default(),
            state: State::Hello,
            client_max_frame: MIN_MAX_FRAME,
            transmit: VecDeque::new(),
            requests: VecDeque::new(),
            outcome: None,
        }
    }

    /// Tells the session that its driver writes every admitted payload over `bytes` to disk
    /// rather than memory: such a payload then weighs `bytes` in the bytes-in-flight budget, so
    /// large files are received side by side while the memory they hold stays within the budget.
    /// Without it every payload weighs its full length.
    pub fn set_spool_above(&mut self, bytes: u64) {
        self.spool_above = bytes.max(1);
    }

    /// What the daemon process has used for this push so far, as its driver measures it (the
    /// session reads no clock or counter itself); the latest value goes out with `Staged`.
    pub fn set_usage(&mut self, usage: Usage) {
        self.usage = usage;
    }

    /// A decoder for the [`FileHeader`] frame at the start of every file payload.
    pub fn file_header_decoder() -> FrameDecoder {
        FrameDecoder::new(MAX_FILE_HEADER)
    }

    /// Bytes as they arrive on the control stream, in any chunking.
    pub fn handle_control(&mut self, bytes: &[u8], now: u64) {
        super::read_control(self, bytes, now);
    }

    /// The client finished its side of the control stream.
    pub fn handle_control_end(&mut self, now: u64) {
        if self.is_finished() {
            return;
        }
        self.clock.progress(now);
        if let Err(e) = self.decoder.finish() {
            return self.fail(e.into());
        }
        match std::mem::replace(&mut self.state, State::Finished) {
            // Without --activate the client leaves once the release is staged.
            State::Staged { staged } => self.finish(Outcome::Pushed {
                staged,
                activated: false,
            }),
            other => {
                self.state = other;
                let what = self.waiting_label();
                self.fail(ProtoError::Protocol(format!(
                    "client closed the control stream while the daemon was waiting for {what}"
                )));
            }
        }
    }

    /// Payload bytes arrived on a file stream: the client is alive.
    pub fn handle_progress(&mut self, now: u64) {
        self.clock.progress(now);
    }

    /// A file stream failed before its header was complete (`WireError::FrameTooLarge`,
    /// `WireError::Truncated`, ...).
    pub fn handle_stream_error(&mut self, err: WireError, now: u64) {
        if self.is_finished() {
            return;
        }
        self.clock.progress(now);
        self.fail(err.into());
    }

    /// The body of a file stream's header frame (see [`DaemonSession::file_header_decoder`]).
    /// If the file may be received, a [`Request::Receive`] for it comes out of
    /// [`DaemonSession::poll_request`], at once or when the bytes-in-flight budget has room;
    /// the driver holds the stream until then.
    pub fn accept_file(&mut self, frame: &[u8], now: u64) {
        if self.is_finished() {
            return;
        }
        self.clock.progress(now);
        let result = decode::<FileHeader>(frame)
            .map_err(ProtoError::from)
            .and_then(|h| self.on_header(h));
        if let Err(e) = result {
            self.fail(e);
        }
    }

    /// The payload of `file`, announced by a header the session accepted, has been read whole
    /// (whether or not its [`Request::Receive`] was issued yet). Payloads still arriving keep the
    /// message deadline running after `Done`: a client that stalls inside one is cut off then,
    /// not only at the push deadline.
    pub fn payload_arrived(&mut self, file: u32, now: u64) {
        if self.is_finished() {
            return;
        }
        self.clock.progress(now);
        if let State::Receiving(t) = &mut self.state {
            t.mark_arrived(file);
        }
    }

    /// The driver finished (or failed) a [`Request::Receive`].
    pub fn file_finished(&mut self, file: u32, result: Result<(), FileFailure>, now: u64) {
        if self.is_finished() {
            return;
        }
        self.clock.progress(now);
        if let Err(e) = self.on_file_finished(file, result) {
            self.fail(e);
        }
    }

    /// The result of a [`Request`].
    pub fn handle_event(&mut self, event: Event, now: u64) {
        if self.is_finished() {
            return;
        }
        // Whatever the session waits for next, its clock starts now rather than when the
        // driver was asked.
        self.clock.progress(now);
        if let Err(e) = self.on_event(event) {
            self.fail(e);
        }
    }

    /// Call when the deadline from [`DaemonSession::poll_timeout`] passed.
    pub fn handle_timeout(&mut self, now: u64) {
        if self.is_finished() {
            return;
        }
        if let Some(e) = self.clock.expired(now, self.waiting_for_client()) {
            self.fail(e);
        }
    }

    /// The next frame to write on the control stream.
    ///
    /// `now` is unused here; it keeps the two sessions' driver loops alike (the client starts a
    /// deadline when its last manifest chunk leaves).
    pub fn poll_transmit(&mut self, now: u64) -> Option<Vec<u8>> {
        let _ = now;
        self.transmit.pop_front()
    }

    /// The next piece of work for the driver.
    pub fn poll_request(&mut self) -> Option<Request> {
        self.requests.pop_front()
    }

    /// When to call [`DaemonSession::handle_timeout`]; `None` once finished.
    pub fn poll_timeout(&self) -> Option<u64> {
        (!self.is_finished()).then(|| self.clock.next(self.waiting_for_client()))
    }

    pub fn state(&self) -> DaemonState {
        match &self.state {
            State::Hello | State::Opening { .. } => DaemonState::Handshake,
            State::Manifest(_) => DaemonState::Manifest,
            State::ComputingNeed(_) => DaemonState::ComputingNeed,
            State::Receiving(_) => DaemonState::Transfer,
            State::Staging(_) => DaemonState::Staging,
            State::Mirroring(_) => DaemonState::Mirroring,
            State::Staged { .. } | State::Activating { .. } => DaemonState::Activation,
            State::Command(_) => DaemonState::Command,
            State::Finished => DaemonState::Finished,
        }
    }

    /// Whether the session ended; drain [`DaemonSession::poll_transmit`], then close.
    pub fn is_finished(&self) -> bool {
        self.outcome.is_some()
    }

    /// How the session ended, once it has.
    pub fn outcome(&self) -> Option<&Result<Outcome, ProtoError>> {
        self.outcome.as_ref()
    }

    /// Payload bytes admitted and not yet finished.
    pub fn bytes_in_flight(&self) -> u64 {
        match &self.state {
            State::Receiving(t) => t.in_flight,
            _ => 0,
        }
    }

    fn send(&mut self, msg: &DaemonMsg) {
        self.transmit.push_back(encode_frame(msg));
    }

    fn fail(&mut self, err: ProtoError) {
        if self.is_finished() {
            return;
        }
        let message = cut(err.to_string(), MAX_ERROR_MESSAGE);
        self.send(&DaemonMsg::Error {
            kind: err.kind(),
            message,
        });
        self.requests.clear();
        self.state = State::Finished;
        self.outcome = Some(Err(err));
    }

    fn finish(&mut self, outcome: Outcome) {
        self.state = State::Finished;
        self.outcome = Some(Ok(outcome));
    }

    /// What the session waits for, in words.
    fn waiting_label(&self) -> &'static str {
        match &self.state {
            State::Hello => "Hello",
            State::Opening { .. } => "authorization",
            State::Manifest(_) => "the rest of the manifest",
            State::ComputingNeed(_) => "the need computation",
            State::Receiving(t) if !t.done => "files and Done",
            State::Receiving(_) => "files to be stored",
            State::Staging(_) => "the release to be built",
            State::Mirroring(_) => "the sync to be applied",
            State::Staged { .. } => "Activate or the end of the control stream",
            State::Activating { .. } => "activation",
            State::Command(_) => "the command to complete",
            State::Finished => "nothing",
        }
    }

    /// What the client owes, if anything: the message deadline runs only then.
    fn waiting_for_client(&self) -> Option<&'static str> {
        match &self.state {
            State::Hello => Some("Hello"),
            State::Manifest(_) => Some("manifest chunk"),
            State::Receiving(t) if !t.done || t.unannounced > 0 => Some("file data or Done"),
            State::Receiving(t) if t.unarrived > 0 => Some("file data"),
            State::Staged { .. } => Some("Activate"),
            _ => None,
        }
    }

    fn unexpected(&self, msg: &ClientMsg) -> ProtoError {
        ProtoError::Protocol(format!(
            "unexpected {} while the daemon was waiting for {}",
            msg.name(),
            self.waiting_label()
        ))
    }

    fn on_frame(&mut self, frame: &[u8]) -> Result<(), ProtoError> {
        if matches!(self.state, State::Hello) {
            if let Some(theirs) = peek_version(frame).filter(|v| *v != VERSION) {
                return Err(ProtoError::Version {
                    ours: VERSION,
                    theirs,
                });
            }
        }
        let msg = decode::<ClientMsg>(frame)?;
        match msg {
            ClientMsg::Hello {
                version: _,
                app,
                command,
                max_frame,
            } if matches!(self.state, State::Hello) => self.on_hello(app, command, max_frame),
            ClientMsg::ManifestChunk { data, last } if matches!(self.state, State::Manifest(_)) => {
                self.on_chunk(&data, last)
            }
            ClientMsg::SignatureRequest { files } if matches!(self.state, State::Receiving(_)) => {
                self.on_signature_request(&files)
            }
            ClientMsg::Done { files_sent } if matches!(self.state, State::Receiving(_)) => {
                self.on_done(files_sent)
            }
            ClientMsg::Activate { release } if matches!(self.state, State::Staged { .. }) => {
                self.on_activate(release)
            }
            other => Err(self.unexpected(&other)),
        }
    }

    fn on_hello(
        &mut self,
        app: AppName,
        command: Command,
        max_frame: u32,
    ) -> Result<(), ProtoError> {
        if max_frame < MIN_MAX_FRAME {
            return Err(ProtoError::Protocol(format!(
                "client announces max_frame of {max_frame} bytes, below the minimum of {MIN_MAX_FRAME}"
            )));
        }
        self.client_max_frame = max_frame.min(MAX_MAX_FRAME);
        if let Command::Sync {
            export, excludes, ..
        } = &command
        {
            if *export != app {
                return Err(ProtoError::Protocol(format!(
                    "Hello names {app} but the sync is for export {export}"
                )));
            }
            if excludes.len() > MAX_EXCLUDES {
                return Err(ProtoError::Limit(format!(
                    "{} exclude patterns, over the limit of {MAX_EXCLUDES}; use fewer, broader patterns",
                    excludes.len()
                )));
            }
            if let Some(p) = excludes.iter().find(|p| p.len() > MAX_EXCLUDE_LEN) {
                return Err(ProtoError::Limit(format!(
                    "an exclude pattern of {} bytes is over the limit of {MAX_EXCLUDE_LEN}",
                    p.len()
                )));
            }
        }
        if let Command::Push {
            relay: Some(plan), ..
        } = &command
        {
            plan.validate()
                .map_err(|e| ProtoError::Protocol(e.to_string()))?;
        }
        match &command {
            Command::Push { manifest_len, .. } | Command::Sync { manifest_len, .. } => {
                if *manifest_len > self.limits.max_manifest_bytes {
                    return Err(ProtoError::Limit(format!(
                        "manifest of {manifest_len} bytes is over the daemon's max_manifest_bytes of {}; raise it in the daemon configuration or split the app",
                        self.limits.max_manifest_bytes
                    )));
                }
                if *manifest_len == 0 {
                    return Err(ProtoError::Protocol(format!(
                        "{} announces an empty manifest encoding",
                        command.name()
                    )));
                }
            }
            _ => {}
        }
        self.requests.push_back(Request::Open {
            app,
            command: command.clone(),
        });
        self.state = State::Opening { command };
        Ok(())
    }

    fn on_chunk(&mut self, data: &[u8], last: bool) -> Result<(), ProtoError> {
        let State::Manifest(m) = &mut self.state else {
            unreachable!("checked by the caller")
        };
        let bound = max_payload_len(m.len);
        if data.len() as u64 > bound - m.buf.len() as u64 {
            return Err(ProtoError::Protocol(format!(
                "manifest chunks exceed {bound} bytes, more than a compressed manifest of the {} bytes announced in Hello can take",
                m.len
            )));
        }
        m.buf.extend_from_slice(data);
        if !last {
            return Ok(());
        }
        let (format, basis) = match &m.basis {
            Some(b) => (DeltaFormat::ZstdRef, Some(&b[..])),
            None => (DeltaFormat::Full, None),
        };
        let mut encoded = Vec::new();
        crate::delta::apply(
            format,
            basis,
            &m.buf,
            m.len,
            &blake3::Hash::from_bytes(m.digest.0),
            &mut encoded,
        )
        .map_err(|e| {
            ProtoError::Protocol(format!(
                "the manifest does not decode to the {} bytes with digest {} announced in Hello: {e}",
                m.len, m.digest
            ))
        })?;
        m.buf = encoded;
        let cap = usize::try_from(self.limits.max_manifest_entries).unwrap_or(usize::MAX);
        let policy = Policy {
            max_entries: m.policy.max_entries.min(cap),
            ..m.policy
        };
        let manifest = Manifest::decode(&m.buf, &policy)?;
        if manifest.len() > u32::MAX as usize {
            return Err(ProtoError::Limit(format!(
                "manifest has {} entries, more than the protocol can number",
                manifest.len()
            )));
        }
        let files = manifest
            .entries()
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e.kind, EntryKind::File { .. }))
            .map(|(i, _)| i as u32)
            .collect();
        let now = self.clock.now();
        let push = Push {
            goal: m.goal.clone(),
            manifest: Arc::new(manifest),
            files,
            manifest_at: now,
            need_at: now,
            received_at: now,
        };
        self.requests.push_back(match &push.goal {
            Goal::Release(release) => Request::ComputeNeed {
                release: release.clone(),
                manifest: Arc::clone(&push.manifest),
            },
            Goal::Mirror { dry_run, .. } => Request::ComputeMirrorNeed {
                manifest: Arc::clone(&push.manifest),
                dry_run: *dry_run,
            },
        });
        self.state = State::ComputingNeed(push);
        Ok(())
    }

    fn on_signature_request(&mut self, files: &[u32]) -> Result<(), ProtoError> {
        let State::Receiving(t) = &mut self.state else {
            unreachable!("checked by the caller")
        };
        let mut jobs = Vec::with_capacity(files.len().min(t.slots.len()));
        for &file in files {
            let Some(slot) = t.slots.get_mut(&file) else {
                return Err(ProtoError::Protocol(format!(
                    "signature requested for {}, which the daemon did not ask for",
                    t.push.describe(file)
                )));
            };
            let Some(basis) = slot.basis else {
                return Err(ProtoError::Protocol(format!(
                    "signature requested for {}, which has no basis",
                    t.push.describe(file)
                )));
            };
            if slot.sig != Sig::NotRequested {
                return Err(ProtoError::Protocol(format!(
                    "signature for {} requested twice",
                    t.push.describe(file)
                )));
            }
            slot.sig = Sig::Requested;
            let path = t
                .push
                .file(file)
                .map(|(p, ..)| p.clone())
                .ok_or_else(|| ProtoError::Misuse(format!("need lists unknown file {file}")))?;
            jobs.push(SignatureJob { file, path, basis });
        }
        if !jobs.is_empty() {
            self.requests.push_back(Request::Signatures { files: jobs });
        }
        Ok(())
    }

    fn on_done(&mut self, files_sent: u64) -> Result<(), ProtoError> {
        let State::Receiving(t) = &mut self.state else {
            unreachable!("checked by the caller")
        };
        if t.done {
            return Err(ProtoError::Protocol("Done sent twice".into()));
        }
        if files_sent != t.slots.len() as u64 {
            return Err(ProtoError::Protocol(format!(
                "client says it sent {files_sent} files but the daemon needs {}",
                t.slots.len()
            )));
        }
        t.done = true;
        self.maybe_stage();
        Ok(())
    }

    fn on_activate(&mut self, release: ReleaseId) -> Result<(), ProtoError> {
        let State::Staged { staged } = std::mem::replace(&mut self.state, State::Finished) else {
            unreachable!("checked by the caller")
        };
        if release != staged.release {
            let err = ProtoError::Protocol(format!(
                "Activate names release {release} but this push staged {}",
                staged.release
            ));
            self.state = State::Staged { staged };
            return Err(err);
        }
        self.requests.push_back(Request::Activate {
            release,
            prune: true,
        });
        self.state = State::Activating { staged };
        Ok(())
    }

    fn on_header(&mut self, h: FileHeader) -> Result<(), ProtoError> {
        let State::Receiving(t) = &mut self.state else {
            return Err(ProtoError::Protocol(format!(
                "file stream for file {} while the daemon was waiting for {}",
                h.file,
                self.waiting_label()
            )));
        };
        // Named only in errors: a header arrives for every file, and most are fine.
        let push = &t.push;
        let what = || push.describe(h.file);
        let Some(slot) = t.slots.get_mut(&h.file) else {
            let what = what();
            return Err(ProtoError::Protocol(format!(
                "client sent {what}, which the daemon did not ask for"
            )));
        };
        if slot.progress != Progress::Pending {
            return Err(ProtoError::Protocol(format!(
                "client sent {} twice",
                what()
            )));
        }
        let basis_ok = match h.format {
            DeltaFormat::Full => h.basis.is_none(),
            // An rsync payload needs only the basis to apply, not the signature the daemon
            // sent: a client may compute one itself (delta::encode does for bases beyond zstd's
            // window).
            DeltaFormat::ZstdRef | DeltaFormat::Rsync => {
                slot.basis.is_some_and(|b| Some(b.hash) == h.basis)
            }
        };
        if !basis_ok {
            return Err(ProtoError::Protocol(format!(
                "client sent a {} payload for {} against basis {:?}, not the basis the daemon offered",
                h.format,
                what(),
                h.basis
            )));
        }
        let (_, size, _, _) = push
            .file(h.file)
            .ok_or_else(|| ProtoError::Misuse(format!("need lists unknown file {}", h.file)))?;
        if h.payload_len > max_payload_len(size) {
            return Err(ProtoError::Limit(format!(
                "client announces a payload of {} bytes for {} of {size} bytes, over the bound of {}",
                h.payload_len,
                what(),
                max_payload_len(size)
            )));
        }
        slot.progress = Progress::Queued {
            format: h.format,
            payload_len: h.payload_len,
        };
        t.unannounced -= 1;
        t.unarrived += 1;
        t.queue.push_back(h.file);
        self.admit();
        Ok(())
    }

    /// Hands queued files to the driver, oldest first, while the budget has room. A payload
    /// larger than the whole budget goes alone, so every file can be received.
    fn admit(&mut self) {
        let spool_above = self.spool_above;
        let State::Receiving(t) = &mut self.state else {
            return;
        };
        while let Some(&file) = t.queue.front() {
            let slot = t.slots.get_mut(&file).expect("queued files have slots");
            let Progress::Queued {
                format,
                payload_len,
            } = slot.progress
            else {
                unreachable!("queued files are in the Queued state")
            };
            let weight = payload_len.min(spool_above);
            let room = t.in_flight == 0
                || t.in_flight.saturating_add(weight) <= self.limits.max_bytes_in_flight;
            if !room {
                break;
            }
            t.queue.pop_front();
            t.in_flight += weight;
            slot.progress = Progress::Receiving { payload_len };
            let (path, size, mode, hash) = t.push.file(file).expect("slots hold manifest files");
            let job = FileJob {
                file,
                path: path.clone(),
                size,
                mode,
                hash,
                format,
                basis: if format == DeltaFormat::Full {
                    None
                } else {
                    slot.basis
                },
                payload_len,
            };
            self.requests.push_back(Request::Receive(job));
        }
    }

    fn on_file_finished(
        &mut self,
        file: u32,
        result: Result<(), FileFailure>,
    ) -> Result<(), ProtoError> {
        let State::Receiving(t) = &mut self.state else {
            return Err(ProtoError::Misuse(format!(
                "file_finished({file}) while no file transfer runs"
            )));
        };
        let slot = t.slots.get_mut(&file);
        let Some(Slot {
            progress: Progress::Receiving { payload_len },
            ..
        }) = slot
        else {
            return Err(ProtoError::Misuse(format!(
                "file_finished for {}, which was not being received",
                t.push.describe(file)
            )));
        };
        let payload_len = *payload_len;
        let weight = payload_len.min(self.spool_above);
        // Named only in errors, as in `on_header`.
        let path = || {
            t.push
                .file(file)
                .map(|(p, ..)| p.to_string())
                .unwrap_or_default()
        };
        match result {
            Ok(()) => {
                // A stored file was read whole, whether or not the driver said so.
                t.mark_arrived(file);
                t.slots.get_mut(&file).expect("checked").progress = Progress::Received;
                t.in_flight -= weight;
                t.remaining -= 1;
                t.received += 1;
                t.received_bytes += payload_len;
            }
            Err(FileFailure::HashMismatch { actual }) => {
                return Err(ProtoError::Verify(format!(
                    "{}: received content hashes to {actual}, not the hash in the manifest; the file changed during the push or the client is faulty, push again",
                    path()
                )))
            }
            Err(FileFailure::Corrupt(detail)) => {
                return Err(ProtoError::Verify(format!(
                    "{}: payload does not rebuild the file ({detail}); push again",
                    path()
                )))
            }
            Err(FileFailure::Truncated { received }) => {
                return Err(ProtoError::Protocol(format!(
                    "{}: file stream ended after {received} of {payload_len} payload bytes",
                    path()
                )))
            }
            Err(FileFailure::Local { kind, message }) => {
                return Err(ProtoError::Local {
                    kind,
                    message: format!("{}: {message}", path()),
                })
            }
        }
        self.admit();
        self.maybe_stage();
        Ok(())
    }

    fn maybe_stage(&mut self) {
        let ready = matches!(&self.state, State::Receiving(t) if t.done && t.remaining == 0);
        if !ready {
            return;
        }
        let State::Receiving(mut t) = std::mem::replace(&mut self.state, State::Finished) else {
            unreachable!("checked above")
        };
        t.push.received_at = self.clock.now();
        self.state = match t.push.goal.clone() {
            Goal::Release(release) => {
                self.requests.push_back(Request::Stage {
                    release,
                    manifest: Arc::clone(&t.push.manifest),
                });
                State::Staging(t)
            }
            Goal::Mirror { delete, dry_run } => {
                self.requests.push_back(Request::Mirror {
                    manifest: Arc::clone(&t.push.manifest),
                    delete,
                    dry_run,
                });
                State::Mirroring(t)
            }
        };
    }

    fn on_event(&mut self, event: Event) -> Result<(), ProtoError> {
        if let Event::Failed { kind, message } = event {
            return Err(ProtoError::Local { kind, message });
        }
        match (std::mem::replace(&mut self.state, State::Finished), event) {
            (
                State::Opening { command },
                Event::Opened {
                    policy,
                    manifest_basis,
                },
            ) => {
                // Only a basis with exactly the digest the client named is used.
                let basis = match &command {
                    Command::Push {
                        manifest_basis: Some(want),
                        ..
                    } => manifest_basis.filter(|b| Hash::of(b) == *want),
                    _ => None,
                };
                self.send(&DaemonMsg::Welcome {
                    version: VERSION,
                    limits: self.limits,
                    manifest_basis: basis.is_some(),
                });
                self.state = match command {
                    Command::Push {
                        release,
                        manifest_len,
                        manifest_digest,
                        ..
                    } => State::Manifest(ManifestIn {
                        goal: Goal::Release(release),
                        len: manifest_len,
                        digest: manifest_digest,
                        basis,
                        buf: Vec::new(),
                        policy,
                    }),
                    Command::Sync {
                        delete,
                        dry_run,
                        manifest_len,
                        manifest_digest,
                        ..
                    } => State::Manifest(ManifestIn {
                        goal: Goal::Mirror { delete, dry_run },
                        len: manifest_len,
                        digest: manifest_digest,
                        basis: None,
                        buf: Vec::new(),
                        policy,
                    }),
                    Command::Releases => {
                        self.requests.push_back(Request::ListReleases);
                        State::Command(Awaiting::Releases)
                    }
                    Command::Activate { release, prune } => {
                        self.requests.push_back(Request::Activate {
                            release: release.clone(),
                            prune,
                        });
                        State::Command(Awaiting::Activate { release, prune })
                    }
                    Command::Rollback { to } => {
                        self.requests
                            .push_back(Request::Rollback { to: to.clone() });
                        State::Command(Awaiting::Rollback(to))
                    }
                    Command::Prune { keep } => {
                        self.requests.push_back(Request::Prune { keep });
                        State::Command(Awaiting::Prune)
                    }
                    Command::Clear => {
                        self.requests.push_back(Request::Clear);
                        State::Command(Awaiting::Prune)
                    }
                };
                Ok(())
            }
            (State::ComputingNeed(mut push), Event::Need(need)) => {
                push.need_at = self.clock.now();
                self.on_need(push, need)
            }
            (State::Receiving(mut t), Event::Signature { file, data }) => {
                let slot = t.slots.get_mut(&file).filter(|s| s.sig == Sig::Requested);
                let Some(slot) = slot else {
                    let what = t.push.describe(file);
                    self.state = State::Receiving(t);
                    return Err(ProtoError::Misuse(format!(
                        "signature for {what}, which was not requested"
                    )));
                };
                let mut frame = encode_frame(&DaemonMsg::Signature {
                    file,
                    data: data.unwrap_or_default(),
                });
                if frame.len() - FRAME_HEADER_LEN > self.client_max_frame as usize {
                    // Too big for the client to read: it sends the file in full instead.
                    frame = encode_frame(&DaemonMsg::Signature { file, data: vec![] });
                }
                slot.sig = Sig::Answered;
                self.transmit.push_back(frame);
                self.state = State::Receiving(t);
                Ok(())
            }
            (
                State::Staging(t),
                Event::Staged {
                    linked,
                    relayed,
                    phases,
                    previous,
                },
            ) => {
                let Goal::Release(release) = &t.push.goal else {
                    unreachable!("only releases are staged")
                };
                let p = &t.push;
                let ms = |name: &str, from: u64, to: u64| PhaseTime {
                    name: name.into(),
                    micros: to.saturating_sub(from).saturating_mul(1000),
                };
                let phases = [
                    ms("need", p.manifest_at, p.need_at),
                    ms("receive", p.need_at, p.received_at),
                ]
                .into_iter()
                .chain(phases.into_iter().map(|mut ph| {
                    ph.name
                        .truncate(ph.name.floor_char_boundary(MAX_PHASE_NAME));
                    ph
                }))
                .take(MAX_PHASES)
                .collect();
                let staged = Staged {
                    release: release.clone(),
                    files: t.push.files.len() as u64,
                    bytes: t.push.manifest.total_file_bytes(),
                    linked,
                    received: t.received,
                    received_bytes: t.received_bytes,
                    phases,
                    relayed,
                    usage: self.usage,
                    previous,
                };
                self.send(&DaemonMsg::Staged(staged.clone()));
                self.state = State::Staged { staged };
                Ok(())
            }
            (State::Activating { staged }, Event::Activated { release, pruned })
                if release == staged.release && pruned.is_some() =>
            {
                self.send_activated(release, pruned);
                self.finish(Outcome::Pushed {
                    staged,
                    activated: true,
                });
                Ok(())
            }
            (
                State::Command(Awaiting::Activate {
                    release: want,
                    prune,
                }),
                Event::Activated { release, pruned },
            ) if release == want && pruned.is_some() == prune => {
                self.send_activated(release.clone(), pruned);
                self.finish(Outcome::Activated { release });
                Ok(())
            }
            (
                State::Command(Awaiting::Rollback(to)),
                Event::Activated {
                    release,
                    pruned: None,
                },
            ) if to.as_ref().is_none_or(|t| *t == release) => {
                self.send_activated(release.clone(), None);
                self.finish(Outcome::RolledBack { release });
                Ok(())
            }
            (State::Mirroring(t), Event::Mirrored { plan, applied }) => {
                self.on_mirrored(&t, *plan, applied)
            }
            (State::Command(Awaiting::Releases), Event::Releases(list)) => {
                self.send_reply(&DaemonMsg::Releases { list }, "release list")?;
                self.finish(Outcome::Listed);
                Ok(())
            }
            (State::Command(Awaiting::Prune), Event::Pruned { removed }) => {
                self.send_reply(
                    &DaemonMsg::Pruned {
                        removed: removed.clone(),
                    },
                    "list of pruned releases",
                )?;
                self.finish(Outcome::Pruned { removed });
                Ok(())
            }
            (state, event) => {
                self.state = state;
                Err(ProtoError::Misuse(format!(
                    "event {event:?} while waiting for {}",
                    self.waiting_label()
                )))
            }
        }
    }

    /// Tells the client `release` is current. The release is live by now whatever the prune
    /// did, so a prune report that is too long to send is cut rather than failing the session
    /// (the client would take that for a failed activation).
    fn send_activated(&mut self, release: ReleaseId, pruned: Option<Pruning>) {
        let pruned = pruned.map(|p| match p {
            Pruning::Failed(m) => Pruning::Failed(cut(m, MAX_ERROR_MESSAGE)),
            removed => removed,
        });
        let mut frame = encode_frame(&DaemonMsg::Activated {
            release: release.clone(),
            pruned: pruned.clone(),
        });
        if frame.len() - FRAME_HEADER_LEN > self.client_max_frame as usize {
            let n = match &pruned {
                Some(Pruning::Removed(ids)) => ids.len(),
                _ => 0,
            };
            frame = encode_frame(&DaemonMsg::Activated {
                release,
                pruned: Some(Pruning::Failed(format!(
                    "{n} releases were removed, too many to list within the client's max_frame of {} bytes; run `relsync releases` to see what is left",
                    self.client_max_frame
                ))),
            });
        }
        self.transmit.push_back(frame);
    }

    fn send_reply(&mut self, msg: &DaemonMsg, what: &str) -> Result<(), ProtoError> {
        let frame = encode_frame(msg);
        if frame.len() - FRAME_HEADER_LEN > self.client_max_frame as usize {
            return Err(ProtoError::Local {
                kind: ErrorKind::Limit,
                message: format!(
                    "the {what} does not fit in the client's max_frame of {} bytes; prune old releases or raise the client's max_frame",
                    self.client_max_frame
                ),
            });
        }
        self.transmit.push_back(frame);
        Ok(())
    }

    fn on_need(&mut self, push: Push, need: NeedList) -> Result<(), ProtoError> {
        let count = push.files.len();
        let mut prev: Option<u32> = None;
        for n in &need.files {
            if n.file as usize >= count || prev.is_some_and(|p| p >= n.file) {
                return Err(ProtoError::Misuse(format!(
                    "need list names file {} out of order or beyond the {count} files",
                    n.file
                )));
            }
            prev = Some(n.file);
        }
        let slots: HashMap<u32, Slot> = need
            .files
            .iter()
            .map(|n| {
                (
                    n.file,
                    Slot {
                        basis: n.basis,
                        sig: Sig::NotRequested,
                        progress: Progress::Pending,
                        arrived: false,
                    },
                )
            })
            .collect();
        let per_frame = (self.client_max_frame as usize - FRAME_OVERHEAD) / NEED_FILE_MAX;
        let mut chunks = need.files.chunks(per_frame).peekable();
        if chunks.peek().is_none() {
            self.send(&DaemonMsg::Need {
                files: vec![],
                last: true,
                have_files: need.have_files,
                have_bytes: need.have_bytes,
            });
        }
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            self.send(&DaemonMsg::Need {
                files: chunk.to_vec(),
                last,
                have_files: need.have_files,
                have_bytes: need.have_bytes,
            });
        }
        let n = slots.len();
        let dry_run = matches!(push.goal, Goal::Mirror { dry_run: true, .. });
        self.state = State::Receiving(Transfer {
            push,
            slots,
            unannounced: n,
            remaining: n,
            unarrived: 0,
            in_flight: 0,
            queue: VecDeque::new(),
            // A dry run receives nothing: the plan follows the need at once.
            done: dry_run,
            received: 0,
            received_bytes: 0,
        });
        if dry_run {
            let State::Receiving(t) = std::mem::replace(&mut self.state, State::Finished) else {
                unreachable!("set above")
            };
            self.requests.push_back(Request::Mirror {
                manifest: Arc::clone(&t.push.manifest),
                delete: matches!(t.push.goal, Goal::Mirror { delete: true, .. }),
                dry_run: true,
            });
            self.state = State::Mirroring(t);
        }
        Ok(())
    }

    /// Reports a sync's plan, in pieces that fit the client's frames, then its counts, and ends.
    fn on_mirrored(
        &mut self,
        t: &Transfer,
        plan: MirrorPlan,
        applied: Option<MirrorStats>,
    ) -> Result<(), ProtoError> {
        let dry_run = matches!(t.push.goal, Goal::Mirror { dry_run: true, .. });
        if applied.is_none() != dry_run {
            return Err(ProtoError::Misuse(format!(
                "the driver {} a sync that was {}a dry run",
                if applied.is_some() {
                    "applied"
                } else {
                    "did not apply"
                },
                if dry_run { "" } else { "not " }
            )));
        }
        let budget = self.client_max_frame as usize - FRAME_OVERHEAD;
        let mut piece = Vec::new();
        let mut size = 0;
        for op in &plan.ops {
            let step = MirrorStep::of(op, &t.push.manifest).ok_or_else(|| {
                ProtoError::Misuse(format!("the mirror plan has {op:?}, not in the manifest"))
            })?;
            let n = step.max_encoded_len();
            if size + n > budget && !piece.is_empty() {
                self.send(&DaemonMsg::MirrorPlan {
                    steps: std::mem::take(&mut piece),
                });
                size = 0;
            }
            size += n;
            piece.push(step);
        }
        if !piece.is_empty() {
            self.send(&DaemonMsg::MirrorPlan { steps: piece });
        }
        let synced = Synced {
            summary: plan.summary,
            applied,
            steps: plan.ops.len() as u64,
            received: t.received,
            received_bytes: t.received_bytes,
        };
        self.send(&DaemonMsg::Synced(synced.clone()));
        self.finish(Outcome::Synced(synced));
        Ok(())
    }
}

impl super::ControlStream for DaemonSession {
    fn finished(&self) -> bool {
        self.is_finished()
    }

    fn reader(&mut self) -> (&mut FrameDecoder, &mut super::Deadlines) {
        (&mut self.decoder, &mut self.clock)
    }

    fn frame(&mut self, frame: &[u8]) -> Result<(), ProtoError> {
        self.on_frame(frame)
    }

    fn failed(&mut self, e: ProtoError) {
        self.fail(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Entry;
    use crate::wire::Message;

    fn h(b: u8) -> Hash {
        Hash::of(&[b])
    }

    fn manifest(files: &[(&str, u8, u64)]) -> Manifest {
        let entries = files
            .iter()
            .map(|(p, c, size)| Entry::file(p, *size, 0o644, h(*c)).unwrap())
            .collect();
        Manifest::from_unsorted(entries, &Policy::default()).unwrap()
    }

    #[test]
    fn need_skips_present_and_duplicate_content_and_picks_bases() {
        let current = manifest(&[("a", 1, 10), ("b", 2, 20), ("c", 3, 0), ("d", 4, 40)]);
        let new = manifest(&[
            ("a", 1, 10), // unchanged, present
            ("b", 5, 21), // changed: basis b
            ("c", 6, 5),  // changed, but the old content is empty: no basis
            ("d", 4, 40), // unchanged
            ("e", 7, 70), // new
            ("f", 7, 70), // same content as e
            ("g", 9, 90), // in the object store
        ]);
        let have = |x: &Hash| [h(1), h(2), h(3), h(4), h(9)].contains(x);
        let need = compute_need(&new, Some(&current), have);
        assert_eq!(
            need.files,
            vec![
                NeedFile {
                    file: 1,
                    basis: Some(BasisRef {
                        hash: h(2),
                        size: 20
                    })
                },
                NeedFile {
                    file: 2,
                    basis: None
                },
                NeedFile {
                    file: 4,
                    basis: None
                },
            ]
        );
        assert_eq!((need.have_files, need.have_bytes), (4, 10 + 40 + 70 + 90));
        let fresh = compute_need(&new, None, |_| false);
        assert_eq!(fresh.files.len(), 6);
        assert!(fresh.files.iter().all(|n| n.basis.is_none()));
    }

    fn hello(command: Command) -> Vec<u8> {
        ClientMsg::Hello {
            version: VERSION,
            app: AppName::new("shop").unwrap(),
            command,
            max_frame: MIN_MAX_FRAME,
        }
        .frame()
    }

    fn error_of(s: &mut DaemonSession) -> (ErrorKind, String) {
        let mut last = None;
        while let Some(f) = s.poll_transmit(0) {
            last = Some(decode::<DaemonMsg>(&f[4..]).unwrap());
        }
        match last {
            Some(DaemonMsg::Error { kind, message }) => (kind, message),
            other => panic!("expected an Error frame, got {other:?}"),
        }
    }

    #[test]
    fn commands_other_than_push_map_to_one_request_each() {
        let r = ReleaseId::new("r1").unwrap();
        let old = ReleaseId::new("r0").unwrap();
        let table: Vec<(Command, Request, Event, DaemonMsg, Outcome)> = vec![
            (
                Command::Releases,
                Request::ListReleases,
                Event::Releases(vec![]),
                DaemonMsg::Releases { list: vec![] },
                Outcome::Listed,
            ),
            (
                Command::Activate {
                    release: r.clone(),
                    prune: false,
                },
                Request::Activate {
                    release: r.clone(),
                    prune: false,
                },
                Event::Activated {
                    release: r.clone(),
                    pruned: None,
                },
                DaemonMsg::Activated {
                    release: r.clone(),
                    pruned: None,
                },
                Outcome::Activated { release: r.clone() },
            ),
            (
                Command::Activate {
                    release: r.clone(),
                    prune: true,
                },
                Request::Activate {
                    release: r.clone(),
                    prune: true,
                },
                Event::Activated {
                    release: r.clone(),
                    pruned: Some(Pruning::Removed(vec![old.clone()])),
                },
                DaemonMsg::Activated {
                    release: r.clone(),
                    pruned: Some(Pruning::Removed(vec![old.clone()])),
                },
                Outcome::Activated { release: r.clone() },
            ),
            (
                Command::Activate {
                    release: r.clone(),
                    prune: true,
                },
                Request::Activate {
                    release: r.clone(),
                    prune: true,
                },
                Event::Activated {
                    release: r.clone(),
                    pruned: Some(Pruning::Failed("disk error".into())),
                },
                DaemonMsg::Activated {
                    release: r.clone(),
                    pruned: Some(Pruning::Failed("disk error".into())),
                },
                Outcome::Activated { release: r.clone() },
            ),
            (
                Command::Rollback { to: None },
                Request::Rollback { to: None },
                Event::Activated {
                    release: r.clone(),
                    pruned: None,
                },
                DaemonMsg::Activated {
                    release: r.clone(),
                    pruned: None,
                },
                Outcome::RolledBack { release: r.clone() },
            ),
            (
                Command::Prune { keep: Some(3) },
                Request::Prune { keep: Some(3) },
                Event::Pruned {
                    removed: vec![r.clone()],
                },
                DaemonMsg::Pruned {
                    removed: vec![r.clone()],
                },
                Outcome::Pruned {
                    removed: vec![r.clone()],
                },
            ),
            (
                Command::Clear,
                Request::Clear,
                Event::Pruned {
                    removed: vec![r.clone()],
                },
                DaemonMsg::Pruned {
                    removed: vec![r.clone()],
                },
                Outcome::Pruned {
                    removed: vec![r.clone()],
                },
            ),
        ];
        for (command, request, event, reply, outcome) in table {
            let mut s = DaemonSession::new(Limits::default(), 0);
            s.handle_control(&hello(command.clone()), 1);
            assert_eq!(
                s.poll_request(),
                Some(Request::Open {
                    app: AppName::new("shop").unwrap(),
                    command: command.clone()
                })
            );
            s.handle_event(
                Event::Opened {
                    policy: Policy::default(),
                    manifest_basis: None,
                },
                2,
            );
            assert_eq!(s.poll_request(), Some(request), "{command:?}");
            s.handle_event(event, 3);
            let frames: Vec<DaemonMsg> = std::iter::from_fn(|| s.poll_transmit(3))
                .map(|f| decode(&f[4..]).unwrap())
                .collect();
            assert!(matches!(frames[0], DaemonMsg::Welcome { .. }));
            assert_eq!(frames[1], reply);
            assert_eq!(s.outcome().unwrap().as_ref().unwrap(), &outcome);
        }
    }

    /// A session for `command`, opened and past its request for the work.
    fn opened(command: Command) -> DaemonSession {
        let mut s = DaemonSession::new(Limits::default(), 0);
        s.handle_control(&hello(command), 1);
        assert!(matches!(s.poll_request(), Some(Request::Open { .. })));
        s.handle_event(
            Event::Opened {
                policy: Policy::default(),
                manifest_basis: None,
            },
            2,
        );
        assert!(s.poll_request().is_some());
        s
    }

    #[test]
    fn an_activation_reports_a_prune_exactly_when_it_asked_for_one() {
        let r = ReleaseId::new("r1").unwrap();
        let removed = Some(Pruning::Removed(vec![]));
        for (prune, pruned) in [(false, removed), (true, None)] {
            let mut s = opened(Command::Activate {
                release: r.clone(),
                prune,
            });
            s.handle_event(
                Event::Activated {
                    release: r.clone(),
                    pruned,
                },
                3,
            );
            assert!(
                matches!(s.outcome(), Some(Err(ProtoError::Misuse(_)))),
                "prune {prune}: {:?}",
                s.outcome()
            );
        }
    }

    #[test]
    fn a_prune_report_too_long_for_the_client_is_cut_not_fatal() {
        let r = ReleaseId::new("r1").unwrap();
        let many: Vec<ReleaseId> = (0..20_000)
            .map(|i| ReleaseId::new(format!("20240101-{i:06}")).unwrap())
            .collect();
        let long = "é".repeat(MAX_ERROR_MESSAGE);
        let table = [
            (Pruning::Removed(many), "20000 releases were removed"),
            (Pruning::Failed(long), "é"),
        ];
        for (pruned, want) in table {
            let mut s = opened(Command::Activate {
                release: r.clone(),
                prune: true,
            });
            s.handle_event(
                Event::Activated {
                    release: r.clone(),
                    pruned: Some(pruned),
                },
                3,
            );
            assert_eq!(
                s.outcome().unwrap().as_ref().unwrap(),
                &Outcome::Activated { release: r.clone() }
            );
            let last = std::iter::from_fn(|| s.poll_transmit(3)).last().unwrap();
            assert!(last.len() - 4 <= MIN_MAX_FRAME as usize);
            match decode::<DaemonMsg>(&last[4..]).unwrap() {
                DaemonMsg::Activated {
                    release,
                    pruned: Some(Pruning::Failed(m)),
                } => {
                    assert_eq!(release, r);
                    assert!(m.starts_with(want), "{m}");
                    assert!(m.len() <= MAX_ERROR_MESSAGE, "{}", m.len());
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_refused_open_is_told_to_the_client() {
        let mut s = DaemonSession::new(Limits::default(), 0);
        s.handle_control(&hello(Command::Releases), 1);
        assert!(matches!(s.poll_request(), Some(Request::Open { .. })));
        s.handle_event(
            Event::Failed {
                kind: ErrorKind::Unauthorized,
                message: "key abc is not authorized for app shop".into(),
            },
            2,
        );
        let (kind, message) = error_of(&mut s);
        assert_eq!(kind, ErrorKind::Unauthorized);
        assert!(message.contains("app shop"), "{message}");
        assert!(s.poll_request().is_none());
        assert!(s.poll_timeout().is_none());
    }

    #[test]
    fn hello_is_checked_before_the_driver_sees_it() {
        let r = ReleaseId::new("r1").unwrap();
        let push = |len| Command::Push {
            release: r.clone(),
            manifest_len: len,
            manifest_digest: h(0),
            manifest_basis: None,
            relay: None,
        };
        let bad_relay = hello(Command::Push {
            release: r.clone(),
            manifest_len: 10,
            manifest_digest: h(0),
            manifest_basis: None,
            relay: Some(crate::relay::RelayPlan {
                ticket: Vec::new(),
                nodes: vec![crate::relay::RelayNode {
                    host: "n1:7171".into(),
                    key: [0; 32],
                    // A node that is its own parent would make the tree a cycle.
                    parent: Some(0),
                    ticket: vec![1],
                }],
            }),
        });
        let small_frame = ClientMsg::Hello {
            version: VERSION,
            app: AppName::new("shop").unwrap(),
            command: Command::Releases,
            max_frame: 100,
        }
        .frame();
        let sync = |export: &str, excludes: Vec<String>, len| {
            hello(Command::Sync {
                export: AppName::new(export).unwrap(),
                subpath: None,
                delete: false,
                dry_run: false,
                excludes,
                manifest_len: len,
                manifest_digest: h(0),
            })
        };
        let future = vec![0, 0, 0, 4, 0, 7, 0xAB, 0xCD];
        let table: Vec<(&str, Vec<u8>, ErrorKind)> = vec![
            ("too big", hello(push(u64::MAX)), ErrorKind::Limit),
            ("empty", hello(push(0)), ErrorKind::BadRequest),
            ("relay plan with a cycle", bad_relay, ErrorKind::BadRequest),
            ("tiny max_frame", small_frame, ErrorKind::BadRequest),
            (
                "sync into another export than Hello names",
                sync("media", vec![], 10),
                ErrorKind::BadRequest,
            ),
            (
                "sync with too many excludes",
                sync("shop", vec!["x".into(); MAX_EXCLUDES + 1], 10),
                ErrorKind::Limit,
            ),
            (
                "sync with a huge exclude",
                sync("shop", vec!["x".repeat(MAX_EXCLUDE_LEN + 1)], 10),
                ErrorKind::Limit,
            ),
            (
                "sync of an empty manifest",
                sync("shop", vec![], 0),
                ErrorKind::BadRequest,
            ),
            ("future version", future, ErrorKind::Version),
            (
                "not hello",
                ClientMsg::Done { files_sent: 0 }.frame(),
                ErrorKind::BadRequest,
            ),
            (
                "garbage",
                vec![0, 0, 0, 2, 0xFF, 0xFF],
                ErrorKind::BadRequest,
            ),
            (
                "frame too large",
                vec![0x7F, 0, 0, 0],
                ErrorKind::FrameTooLarge,
            ),
        ];
        for (name, bytes, want) in table {
            let mut s = DaemonSession::new(Limits::default(), 0);
            s.handle_control(&bytes, 1);
            assert!(s.is_finished(), "{name}");
            assert!(
                s.poll_request().is_none(),
                "{name}: driver must not be asked"
            );
            let (kind, message) = error_of(&mut s);
            assert_eq!(kind, want, "{name}: {message}");
        }
    }

    #[test]
    fn driver_misuse_is_an_internal_error_not_a_panic() {
        let mut s = DaemonSession::new(Limits::default(), 0);
        s.handle_event(
            Event::Staged {
                linked: 0,
                phases: vec![],
                relayed: Vec::new(),
                previous: None,
            },
            1,
        );
        assert!(matches!(s.outcome(), Some(Err(ProtoError::Misuse(_)))));
        let mut s = DaemonSession::new(Limits::default(), 0);
        s.file_finished(3, Ok(()), 1);
        assert_eq!(error_of(&mut s).0, ErrorKind::Internal);
    }

    #[test]
    fn long_error_messages_are_cut_on_a_char_boundary() {
        let mut s = DaemonSession::new(Limits::default(), 0);
        s.handle_control(&hello(Command::Releases), 1);
        s.handle_event(
            Event::Failed {
                kind: ErrorKind::Internal,
                message: "é".repeat(5000),
            },
            2,
        );
        let (_, message) = error_of(&mut s);
        assert!(message.len() <= MAX_ERROR_MESSAGE);
        assert!(message.len() >= MAX_ERROR_MESSAGE - 1);
    }

    /// A sync session past `Need` for `manifest(files)`, with the requests it made so far.
    fn sync_until_need(dry_run: bool, files: &[(&str, u8, u64)]) -> (DaemonSession, Manifest) {
        let m = manifest(files);
        let encoded = m.encode();
        let mut s = DaemonSession::new(Limits::default(), 0);
        s.handle_control(
            &hello(Command::Sync {
                export: AppName::new("shop").unwrap(),
                subpath: Some(RelPath::new("img").unwrap()),
                delete: true,
                dry_run,
                excludes: vec!["*.log".into()],
                manifest_len: encoded.len() as u64,
                manifest_digest: Hash::of(&encoded),
            }),
            1,
        );
        assert!(matches!(
            s.poll_request(),
            Some(Request::Open {
                command: Command::Sync { .. },
                ..
            })
        ));
        s.handle_event(
            Event::Opened {
                policy: Policy::default(),
                manifest_basis: None,
            },
            2,
        );
        let mut packed = Vec::new();
        crate::delta::encode_full(&encoded, &mut packed).unwrap();
        let chunk = ClientMsg::ManifestChunk {
            data: packed,
            last: true,
        };
        s.handle_control(&chunk.frame(), 3);
        match s.poll_request() {
            Some(Request::ComputeMirrorNeed {
                manifest: got,
                dry_run: d,
            }) => assert_eq!((&*got, d), (&m, dry_run)),
            other => panic!("{other:?}"),
        }
        let need = compute_need(&m, None, |_| false);
        s.handle_event(Event::Need(need), 4);
        (s, m)
    }

    fn sent(s: &mut DaemonSession) -> Vec<DaemonMsg> {
        std::iter::from_fn(|| s.poll_transmit(0))
            .map(|f| {
                assert!(
                    f.len() - 4 <= MIN_MAX_FRAME as usize,
                    "frame over max_frame"
                );
                decode(&f[4..]).unwrap()
            })
            .collect()
    }

    #[test]
    fn a_sync_is_applied_once_every_file_arrived_and_its_plan_reported_in_pieces() {
        let (mut s, m) = sync_until_need(false, &[("a", 1, 10), ("b", 2, 20)]);
        let header = |file| FileHeader {
            file,
            format: DeltaFormat::Full,
            basis: None,
            payload_len: 7,
        };
        for file in [0, 1] {
            s.accept_file(&header(file).frame()[4..], 5);
            assert!(matches!(s.poll_request(), Some(Request::Receive(_))));
        }
        s.file_finished(0, Ok(()), 6);
        s.handle_control(&ClientMsg::Done { files_sent: 2 }.frame(), 6);
        assert_eq!(s.poll_request(), None, "file 1 is still being stored");
        s.file_finished(1, Ok(()), 7);
        match s.poll_request() {
            Some(Request::Mirror {
                manifest,
                delete: true,
                dry_run: false,
            }) => assert_eq!(*manifest, m),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.state(), DaemonState::Mirroring);
        // Enough removals of long paths to need several frames.
        let dst: Vec<Entry> = (0..2000)
            .map(|i| Entry::file(&format!("{}/{i}", "x".repeat(200)), 1, 0o644, h(9)).unwrap())
            .chain([Entry::dir(&"x".repeat(200), 0o755).unwrap()])
            .collect();
        let dst = Manifest::from_unsorted(dst, &Policy::default()).unwrap();
        let mut plan = crate::plan::plan_mirror(&m, &manifest(&[]), true);
        let removals: Vec<_> = dst
            .entries()
            .iter()
            .map(|e| crate::plan::MirrorOp::Remove {
                path: e.path.clone(),
                dir: e.is_dir(),
            })
            .collect();
        plan.ops.splice(0..0, removals);
        plan.summary.removed = 2001;
        let applied = MirrorStats {
            removed: 2001,
            written_files: 2,
            written_bytes: 30,
            dirs: 0,
        };
        s.handle_event(
            Event::Mirrored {
                plan: Box::new(plan.clone()),
                applied: Some(applied.clone()),
            },
            8,
        );
        let frames = sent(&mut s);
        assert!(matches!(frames[0], DaemonMsg::Welcome { .. }));
        assert!(matches!(frames[1], DaemonMsg::Need { .. }));
        let pieces: Vec<&Vec<MirrorStep>> = frames
            .iter()
            .filter_map(|f| match f {
                DaemonMsg::MirrorPlan { steps } => Some(steps),
                _ => None,
            })
            .collect();
        assert!(pieces.len() > 1, "{} pieces", pieces.len());
        let ops: Vec<_> = pieces
            .iter()
            .flat_map(|p| p.iter())
            .map(|st| st.to_op(&m).unwrap())
            .collect();
        assert_eq!(ops, plan.ops);
        let synced = Synced {
            summary: plan.summary,
            applied: Some(applied),
            steps: 2003,
            received: 2,
            received_bytes: 14,
        };
        assert_eq!(frames.last(), Some(&DaemonMsg::Synced(synced.clone())));
        assert_eq!(
            s.outcome().unwrap().as_ref().unwrap(),
            &Outcome::Synced(synced)
        );
    }

    #[test]
    fn a_dry_run_plans_right_after_the_need_and_receives_nothing() {
        let (mut s, m) = sync_until_need(true, &[("a", 1, 10)]);
        match s.poll_request() {
            Some(Request::Mirror {
                manifest,
                dry_run: true,
                ..
            }) => assert_eq!(*manifest, m),
            other => panic!("{other:?}"),
        }
        let header = FileHeader {
            file: 0,
            format: DeltaFormat::Full,
            basis: None,
            payload_len: 7,
        };
        s.accept_file(&header.frame()[4..], 5);
        assert_eq!(error_of(&mut s).0, ErrorKind::BadRequest);

        // A driver that applies a dry run is a bug, told as an internal error.
        let (mut s, m) = sync_until_need(true, &[("a", 1, 10)]);
        let _ = s.poll_request();
        let plan = crate::plan::plan_mirror(&m, &manifest(&[]), false);
        s.handle_event(
            Event::Mirrored {
                plan: Box::new(plan.clone()),
                applied: Some(MirrorStats::default()),
            },
            6,
        );
        assert_eq!(error_of(&mut s).0, ErrorKind::Internal);

        let (mut s, _) = sync_until_need(true, &[("a", 1, 10)]);
        let _ = s.poll_request();
        s.handle_event(
            Event::Mirrored {
                plan: Box::new(plan),
                applied: None,
            },
            6,
        );
        let frames = sent(&mut s);
        let Some(DaemonMsg::Synced(synced)) = frames.last() else {
            panic!("{frames:?}")
        };
        assert_eq!((synced.applied.as_ref(), synced.steps), (None, 1));
        assert!(matches!(s.outcome(), Some(Ok(Outcome::Synced(_)))));
    }

    #[test]
    fn a_plan_naming_paths_outside_the_manifest_is_a_driver_bug() {
        let (mut s, m) = sync_until_need(true, &[("a", 1, 10)]);
        let _ = s.poll_request();
        let mut plan = crate::plan::plan_mirror(&m, &manifest(&[]), false);
        plan.ops.push(crate::plan::MirrorOp::Symlink {
            path: RelPath::new("elsewhere").unwrap(),
            target: "a".into(),
        });
        s.handle_event(
            Event::Mirrored {
                plan: Box::new(plan),
                applied: None,
            },
            6,
        );
        assert_eq!(error_of(&mut s).0, ErrorKind::Internal);
    }
}

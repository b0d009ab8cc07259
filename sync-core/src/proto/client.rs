//! The client's side of a connection: push a release (or run a command) and report what the
//! daemon did, trusting nothing it says.
//!
//! The session sends `Hello` and the manifest, reads the daemon's `Need`, and picks a payload
//! format per needed file: a reference-prefix zstd delta when the client's cache holds the
//! daemon's basis, an rsync delta (after asking for the basis signature) when the basis is large
//! enough to be worth a round trip, plain zstd otherwise. It hands [`Request::SendFile`]s to the
//! driver, at most [`ClientConfig::max_files_out`] at a time, and the driver encodes each file
//! with `delta` and writes it on one of its file streams (at most the negotiated number open,
//! each carrying many files one after another). Every message from the daemon is checked against what the client
//! asked for; anything else (an unknown file, a file needed twice, a malformed signature, a reply
//! that is not due, absurd limits) ends the session with an error, never with success.
//!
//! A sync ([`ClientSession::sync`]) sends its manifest and files the same way; then, instead of
//! `Staged`, the daemon reports the plan it applied as steps on the client's own manifest (so it
//! can only name what the client sent, besides removals) and its counts, which the client checks
//! against those steps.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::delta::{block_size_for, BasisSignature, DeltaFormat, STRONG_LEN};
use crate::manifest::{EntryKind, Hash, Manifest};
use crate::path::RelPath;
use crate::plan::{mirror_summary, MirrorOp, MirrorPlan, MirrorStats};
use crate::release::ReleaseId;
use crate::wire::{
    decode, encode_frame, peek_version, AppName, BasisRef, ClientMsg, Command, DaemonMsg,
    FileHeader, FrameDecoder, Limits, MirrorStep, NeedFile, Pruning, ReleaseInfo, Staged, Synced,
    MAX_MAX_FRAME, MAX_PHASES, MAX_PHASE_NAME, MIN_MAX_FRAME, VERSION,
};

use super::{Deadlines, ProtoError};

/// Manifest chunks stay at most this large even when the daemon accepts more, so the last one
/// leaves soon after it is handed to the driver and the wait for `Need` starts on time.
pub const MAX_MANIFEST_CHUNK: usize = 1 << 20;
/// Room in a frame for everything besides its payload list or bytes.
const FRAME_OVERHEAD: usize = 64;
/// Bound on the encoded size of one file index.
const FILE_INDEX_MAX: usize = 5;
/// Default [`ClientConfig::max_files_out`]: enough queued files to keep a few stream writers
/// busy with batches of small files, few enough that the order of the queue still follows the
/// manifest closely.
pub const DEFAULT_MAX_FILES_OUT: u32 = 1024;

/// The client's own maxima and choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientConfig {
    /// Largest frame the client reads (announced in `Hello`), and the cap on what it sends.
    pub max_frame: u32,
    /// Cap on concurrent file streams, whatever the daemon allows.
    pub max_streams: u32,
    /// Cap on files handed to the driver and not yet reported sent. It is independent of the
    /// streams: a stream carries many files in turn, and its writer needs files queued behind
    /// the one it is writing so it never waits for the next request.
    pub max_files_out: u32,
    pub message_timeout_ms: u64,
    pub push_timeout_ms: u64,
    /// Smallest basis worth a signature round trip; smaller changed files go in full.
    pub rsync_min_basis: u64,
}

impl Default for ClientConfig {
    fn default() -> ClientConfig {
        let limits = Limits::default();
        ClientConfig {
            max_frame: limits.max_frame,
            max_streams: limits.max_streams,
            max_files_out: DEFAULT_MAX_FILES_OUT,
            message_timeout_ms: limits.message_timeout_ms,
            push_timeout_ms: limits.push_timeout_ms,
            rsync_min_basis: 64 * 1024,
        }
    }
}

/// A release to push.
#[derive(Debug, Clone)]
pub struct PushJob {
    pub release: ReleaseId,
    pub manifest: Arc<Manifest>,
    /// Send `Activate` once the release is staged.
    pub activate: bool,
    /// Contents the client can reproduce locally (what it last pushed to this daemon): a
    /// daemon basis found here is used as a zstd reference prefix.
    pub cached: HashSet<Hash>,
    /// The encoding of the manifest last pushed to this daemon: if the daemon still holds it,
    /// the new manifest goes as a zstd delta against it (a few KB instead of ~70 bytes a file).
    pub manifest_basis: Option<Arc<[u8]>>,
    /// That delta, made ahead ([`pack_manifest`]) so that the session sends it as soon as the
    /// daemon accepts the basis; without it (or when it was made against another basis) the
    /// session compresses the manifest then.
    pub packed_manifest: Option<PackedManifest>,
}

/// A manifest's encoding compressed as a zstd delta against a basis manifest's encoding.
#[derive(Debug, Clone)]
pub struct PackedManifest {
    basis: Hash,
    manifest: Hash,
    payload: Arc<[u8]>,
}

/// Compresses `manifest`'s encoding against `basis`, the encoding of the manifest the daemon
/// probably holds: what a push naming that basis sends once the daemon accepts it
/// ([`PushJob::packed_manifest`]). It takes a few milliseconds for a large manifest, which a
/// caller can spend while it connects.
pub fn pack_manifest(manifest: &Manifest, basis: &[u8]) -> Result<PackedManifest, ProtoError> {
    let mut payload = Vec::new();
    crate::delta::encode_with_basis(basis, &manifest.encode(), &mut payload)
        .map_err(|e| ProtoError::Misuse(format!("compressing the manifest failed: {e}")))?;
    Ok(PackedManifest {
        basis: Hash::of(basis),
        manifest: manifest.digest(),
        payload: payload.into(),
    })
}

/// A tree to mirror into an export (`relsync sync`).
#[derive(Debug, Clone)]
pub struct SyncJob {
    pub export: AppName,
    /// Where below the export the tree lands; `None` for the export itself.
    pub subpath: Option<RelPath>,
    /// Remove what the destination has and the manifest does not.
    pub delete: bool,
    /// Ask for the plan only: the daemon changes nothing and no file is sent.
    pub dry_run: bool,
    /// The `--exclude` patterns the manifest was scanned with; they protect the destination's
    /// matching paths too.
    pub excludes: Vec<String>,
    pub manifest: Arc<Manifest>,
    /// Contents the client can reproduce locally (see [`PushJob::cached`]).
    pub cached: HashSet<Hash>,
}

/// How the driver may encode a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// Plain zstd (`delta::encode_full`).
    Full,
    /// The cache holds the daemon's basis: `delta::encode(Basis::Bytes(..))`.
    ZstdRef { basis: BasisRef },
    /// The daemon sent the basis signature: `delta::encode(Basis::Signature(..))`.
    Rsync {
        basis: BasisRef,
        signature: BasisSignature,
    },
}

/// One file for the driver to encode and write on a file stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendFile {
    pub file: u32,
    /// The file's path in the client's own manifest: the only thing the driver may read.
    pub path: RelPath,
    pub size: u64,
    pub hash: Hash,
    pub method: Method,
}

impl SendFile {
    /// The header for a payload of `payload_len` bytes the driver encoded in `format` (which
    /// `delta::encode` may have lowered to `Full`, or to `Rsync` for a basis beyond zstd's
    /// window).
    pub fn header(&self, format: DeltaFormat, payload_len: u64) -> Result<FileHeader, ProtoError> {
        let basis = match (&self.method, format) {
            (_, DeltaFormat::Full) => None,
            (Method::ZstdRef { basis } | Method::Rsync { basis, .. }, _) => Some(basis.hash),
            (Method::Full, _) => {
                return Err(ProtoError::Misuse(format!(
                    "{}: a {format} payload for a file to be sent in full",
                    self.path
                )))
            }
        };
        Ok(FileHeader {
            file: self.file,
            format,
            basis,
            payload_len,
        })
    }
}

/// The files a push to a daemon is likely to send, and how, when that daemon still runs what
/// the client last pushed there (`last`) and holds nothing else: what the daemon's need
/// computation ([`compute_need`](super::daemon::compute_need)) and this session's choice of
/// method would then give. Files that would need an rsync signature are left out: only the
/// daemon can answer those. A driver may encode these while the daemon computes its real need
/// (see `PayloadMemo`); a wrong guess costs that encoding and nothing else, since a payload is
/// taken only for exactly the content and basis it was made for.
pub fn likely_sends(manifest: &Manifest, last: &Manifest, cached: &HashSet<Hash>) -> Vec<SendFile> {
    let held: HashSet<Hash> = last.files().map(|(_, _, _, h)| *h).collect();
    let need = super::daemon::compute_need(manifest, Some(last), |h| held.contains(h));
    let files: Vec<_> = manifest.files().collect();
    need.files
        .into_iter()
        .filter_map(|n| {
            let (path, size, _, hash) = files.get(n.file as usize)?;
            let method = match n.basis {
                None => Method::Full,
                Some(basis) if cached.contains(&basis.hash) => Method::ZstdRef { basis },
                Some(_) => return None,
            };
            Some(SendFile {
                file: n.file,
                path: (*path).clone(),
                size: *size,
                hash: **hash,
                method,
            })
        })
        .collect()
}

/// Work for the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Encode the file, write `FileHeader` + payload on a file stream (see
    /// [`SendFile::header`]), finish the stream, then call [`ClientSession::file_sent`].
    SendFile(SendFile),
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushReport {
    pub release: ReleaseId,
    /// Files and bytes in the manifest.
    pub files: u64,
    pub bytes: u64,
    /// Files the daemon needed, and what it already had.
    pub needed: u64,
    pub have_files: u64,
    pub have_bytes: u64,
    /// Signatures requested.
    pub signatures: u64,
    /// Files sent per payload format.
    pub sent_full: u64,
    pub sent_zstd_ref: u64,
    pub sent_rsync: u64,
    pub payload_bytes: u64,
    /// Bytes of the compressed manifest sent, and whether it went as a delta against the
    /// manifest of the previous push.
    pub manifest_bytes: u64,
    pub manifest_delta: bool,
    /// What the daemon reported after building the release.
    pub staged: Staged,
    pub activated: bool,
}

/// What a sync did (or, for a dry run, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub dry_run: bool,
    /// The daemon's plan, rebuilt from its steps on the client's manifest; its summary is
    /// recomputed from those steps (and matched the daemon's).
    pub plan: MirrorPlan,
    /// What applying the plan did, as the daemon reports it; `None` for a dry run.
    pub applied: Option<MirrorStats>,
    /// Files the daemon needed (for a dry run: would have needed), and what it already had.
    pub needed: u64,
    pub needed_bytes: u64,
    pub have_files: u64,
    pub have_bytes: u64,
    pub signatures: u64,
    pub sent_full: u64,
    pub sent_zstd_ref: u64,
    pub sent_rsync: u64,
    pub payload_bytes: u64,
}

/// How a session ended well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pushed(PushReport),
    Synced(SyncReport),
    Releases(Vec<ReleaseInfo>),
    /// `activate` or `rollback` made `release` current; `pruned` is what the prune that an
    /// `activate` asked for did (`None` when it asked for none, and for a rollback).
    Activated {
        release: ReleaseId,
        pruned: Option<Pruning>,
    },
    Pruned {
        removed: Vec<ReleaseId>,
    },
}

/// Where a session stands, for progress output and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    Handshake,
    /// Sending the manifest and waiting for `Need`.
    Manifest,
    Transfer,
    /// `Done` sent; the daemon builds the release.
    Staging,
    /// The daemon applies (or, for a dry run, plans) a sync.
    Mirroring,
    Activation,
    /// Waiting for the reply to a command.
    Command,
    Finished,
}

/// What a session sends its manifest for.
#[derive(Debug)]
enum Goal {
    Release { release: ReleaseId, activate: bool },
    Mirror { dry_run: bool },
}

/// The push (or sync) in progress.
#[derive(Debug)]
struct PushCtx {
    goal: Goal,
    manifest: Arc<Manifest>,
    cached: HashSet<Hash>,
    /// Entry index of each file, by file index.
    files: Vec<u32>,
    encoded: Arc<[u8]>,
    /// Manifest bytes handed to `poll_transmit` so far.
    emitted: usize,
    /// Bytes per manifest chunk; zero until `Welcome` tells the daemon's frame size.
    chunk: usize,
    manifest_done: bool,
    needed: u64,
    needed_bytes: u64,
    have_files: u64,
    have_bytes: u64,
    signatures: u64,
    sent: [u64; 3],
    payload_bytes: u64,
    manifest_bytes: u64,
    manifest_delta: bool,
    /// The encoding of the manifest the push named as its basis.
    manifest_basis: Option<Arc<[u8]>>,
    /// The manifest compressed against that basis, made ahead.
    packed: Option<PackedManifest>,
}

impl PushCtx {
    fn file(&self, file: u32) -> Option<(&RelPath, u64, Hash)> {
        let e = self
            .manifest
            .entries()
            .get(*self.files.get(file as usize)? as usize)?;
        match &e.kind {
            EntryKind::File { size, hash, .. } => Some((&e.path, *size, *hash)),
            _ => None,
        }
    }

    fn manifest_emitted(&self) -> bool {
        self.manifest_done
    }

    fn release(&self) -> &ReleaseId {
        match &self.goal {
            Goal::Release { release, .. } => release,
            Goal::Mirror { .. } => unreachable!("only pushes have a release"),
        }
    }

    fn report(&self, staged: Staged, activated: bool) -> PushReport {
        PushReport {
            release: self.release().clone(),
            files: self.files.len() as u64,
            bytes: self.manifest.total_file_bytes(),
            needed: self.needed,
            have_files: self.have_files,
            have_bytes: self.have_bytes,
            signatures: self.signatures,
            sent_full: self.sent[0],
            sent_zstd_ref: self.sent[1],
            sent_rsync: self.sent[2],
            payload_bytes: self.payload_bytes,
            manifest_bytes: self.manifest_bytes,
            manifest_delta: self.manifest_delta,
            staged,
            activated,
        }
    }
}

/// Files of the transfer and where each stands.
#[derive(Debug, Default)]
struct Sending {
    /// Signature requested, not yet received: file → basis.
    pending_sig: HashMap<u32, BasisRef>,
    ready: VecDeque<SendFile>,
    outstanding: HashSet<u32>,
    sent: u64,
    total: u64,
}

/// The plan steps of a sync received so far.
#[derive(Debug, Default)]
struct PlanIn {
    ops: Vec<MirrorOp>,
    /// Entries of the manifest that a step already named (each may appear once).
    named: Vec<bool>,
    removals: u64,
}

#[derive(Debug)]
enum State {
    Welcome,
    Need {
        files: Vec<NeedFile>,
        seen: Vec<bool>,
    },
    Sending(Sending),
    AwaitStaged,
    AwaitActivated(Staged),
    /// A sync's plan, as it arrives, then `Synced`.
    AwaitSynced(PlanIn),
    Reply,
    Finished,
}

/// The client's protocol state for one connection.
#[derive(Debug)]
pub struct ClientSession {
    config: ClientConfig,
    command: Command,
    push: Option<PushCtx>,
    decoder: FrameDecoder,
    state: State,
    clock: Deadlines,
    streams: u32,
    send_frame: usize,
    /// Most removals a sync's plan may report (set by `Welcome`).
    max_removals: u64,
    transmit: VecDeque<Vec<u8>>,
    requests: VecDeque<Request>,
    outcome: Option<Result<Outcome, ProtoError>>,
}

impl ClientSession {
    /// A session pushing `job` to `app`, started at `now` (ms).
    pub fn push(config: ClientConfig, app: AppName, job: PushJob, now: u64) -> ClientSession {
        ClientSession::push_relayed(config, app, job, None, now)
    }

    /// [`ClientSession::push`] asking the daemon to forward the release along `relay` once it
    /// is staged; its `Staged` then reports every node of the plan.
    pub fn push_relayed(
        config: ClientConfig,
        app: AppName,
        job: PushJob,
        relay: Option<crate::relay::RelayPlan>,
        now: u64,
    ) -> ClientSession {
        let encoded = job.manifest.encode();
        let digest = job.manifest.digest();
        let basis = job.manifest_basis.as_deref().map(Hash::of);
        let command = Command::Push {
            release: job.release.clone(),
            manifest_len: encoded.len() as u64,
            manifest_digest: digest,
            manifest_basis: basis,
            relay,
        };
        let goal = Goal::Release {
            release: job.release,
            activate: job.activate,
        };
        let mut s = ClientSession::with_manifest(
            config,
            app,
            command,
            goal,
            job.manifest,
            job.cached,
            encoded,
            now,
        );
        if let Some(p) = &mut s.push {
            // Made for this basis and this manifest, or not used.
            p.packed = job
                .packed_manifest
                .filter(|k| Some(k.basis) == basis && k.manifest == digest);
            p.manifest_basis = job.manifest_basis;
        }
        s
    }

    /// A session mirroring `job`'s tree into its export, started at `now` (ms).
    pub fn sync(config: ClientConfig, job: SyncJob, now: u64) -> ClientSession {
        let encoded = job.manifest.encode();
        let command = Command::Sync {
            export: job.export.clone(),
            subpath: job.subpath,
            delete: job.delete,
            dry_run: job.dry_run,
            excludes: job.excludes,
            manifest_len: encoded.len() as u64,
            manifest_digest: job.manifest.digest(),
        };
        let goal = Goal::Mirror {
            dry_run: job.dry_run,
        };
        ClientSession::with_manifest(
            config,
            job.export,
            command,
            goal,
            job.manifest,
            job.cached,
            encoded,
            now,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn with_manifest(
        config: ClientConfig,
        app: AppName,
        command: Command,
        goal: Goal,
        manifest: Arc<Manifest>,
        cached: HashSet<Hash>,
        encoded: Arc<[u8]>,
        now: u64,
    ) -> ClientSession {
        let files = manifest
            .entries()
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e.kind, EntryKind::File { .. }))
            .map(|(i, _)| u32::try_from(i).unwrap_or(u32::MAX))
            .collect();
        let too_many = manifest.len() > u32::MAX as usize;
        let mut s = ClientSession::start(config, app, command, now);
        s.push = Some(PushCtx {
            goal,
            manifest,
            cached,
            files,
            encoded,
            emitted: 0,
            chunk: 0,
            manifest_done: false,
            needed: 0,
            needed_bytes: 0,
            have_files: 0,
            have_bytes: 0,
            signatures: 0,
            sent: [0; 3],
            payload_bytes: 0,
            manifest_bytes: 0,
            manifest_delta: false,
            manifest_basis: None,
            packed: None,
        });
        if too_many {
            s.fail(ProtoError::Limit(
                "manifest has more entries than the protocol can number; split the app".into(),
            ));
        }
        s
    }

    /// A session running a command other than a push or a sync (`Releases`, `Activate`,
    /// `Rollback`, `Prune`).
    pub fn command(
        config: ClientConfig,
        app: AppName,
        command: Command,
        now: u64,
    ) -> ClientSession {
        let mut s = ClientSession::start(config, app, command.clone(), now);
        if matches!(command, Command::Push { .. } | Command::Sync { .. }) {
            s.fail(ProtoError::Misuse(format!(
                "{} needs its own session constructor",
                command.name()
            )));
        }
        s
    }

    fn start(config: ClientConfig, app: AppName, command: Command, now: u64) -> ClientSession {
        let max_frame = config.max_frame.clamp(MIN_MAX_FRAME, MAX_MAX_FRAME);
        let config = ClientConfig {
            max_frame,
            ..config
        };
        let hello = encode_frame(&ClientMsg::Hello {
            version: VERSION,
            app,
            command: command.clone(),
            max_frame,
        });
        ClientSession {
            decoder: FrameDecoder::new(max_frame),
            clock: Deadlines::new(now, config.message_timeout_ms, config.push_timeout_ms),
            config,
            command,
            push: None,
            state: State::Welcome,
            streams: 0,
            send_frame: 0,
            max_removals: 0,
            transmit: VecDeque::from([hello]),
            requests: VecDeque::new(),
            outcome: None,
        }
    }

    /// Bytes as they arrive on the control stream, in any chunking.
    pub fn handle_control(&mut self, bytes: &[u8], now: u64) {
        super::read_control(self, bytes, now);
    }

    /// The daemon finished its side of the control stream (or the connection dropped).
    pub fn handle_control_end(&mut self, now: u64) {
        if self.is_finished() {
            return;
        }
        self.clock.progress(now);
        let err = match self.decoder.finish() {
            Err(e) => e.into(),
            Ok(()) => ProtoError::Protocol(format!(
                "daemon closed the control stream while the client was waiting for {}",
                self.waiting_label()
            )),
        };
        self.fail(err);
    }

    /// The driver wrote a file's header and payload on a file stream; `header` is what it sent.
    pub fn file_sent(&mut self, header: &FileHeader, now: u64) {
        if self.is_finished() {
            return;
        }
        let _ = now;
        if let Err(e) = self.on_file_sent(header) {
            self.fail(e);
        }
    }

    /// Call when the deadline from [`ClientSession::poll_timeout`] passed.
    pub fn handle_timeout(&mut self, now: u64) {
        if self.is_finished() {
            return;
        }
        if let Some(e) = self.clock.expired(now, self.waiting_for_daemon()) {
            self.fail(e);
        }
    }

    /// The next frame to write on the control stream.
    pub fn poll_transmit(&mut self, now: u64) -> Option<Vec<u8>> {
        if let Some(f) = self.transmit.pop_front() {
            return Some(f);
        }
        let p = self.push.as_mut()?;
        if !matches!(self.state, State::Need { .. }) || p.chunk == 0 || p.manifest_emitted() {
            return None;
        }
        let end = (p.emitted + p.chunk).min(p.encoded.len());
        let last = end == p.encoded.len();
        let frame = encode_frame(&ClientMsg::ManifestChunk {
            data: p.encoded[p.emitted..end].to_vec(),
            last,
        });
        p.emitted = end;
        if last {
            // The wait for `Need` starts when the manifest leaves, not when Welcome came.
            self.clock.progress(now);
            p.manifest_done = true;
            p.encoded = Arc::from([]);
        }
        Some(frame)
    }

    /// The next piece of work for the driver; at most [`ClientConfig::max_files_out`] files are
    /// out (handed out, not yet reported by [`ClientSession::file_sent`]) at once.
    pub fn poll_request(&mut self) -> Option<Request> {
        if let Some(r) = self.requests.pop_front() {
            return Some(r);
        }
        let State::Sending(s) = &mut self.state else {
            return None;
        };
        if s.outstanding.len() >= self.config.max_files_out.max(1) as usize {
            return None;
        }
        let f = s.ready.pop_front()?;
        s.outstanding.insert(f.file);
        Some(Request::SendFile(f))
    }

    /// When to call [`ClientSession::handle_timeout`]; `None` once finished.
    pub fn poll_timeout(&self) -> Option<u64> {
        (!self.is_finished()).then(|| self.clock.next(self.waiting_for_daemon()))
    }

    pub fn state(&self) -> ClientState {
        match &self.state {
            State::Welcome => ClientState::Handshake,
            State::Need { .. } => ClientState::Manifest,
            State::Sending(_) => ClientState::Transfer,
            State::AwaitStaged => ClientState::Staging,
            State::AwaitActivated(_) => ClientState::Activation,
            State::AwaitSynced(_) => ClientState::Mirroring,
            State::Reply => ClientState::Command,
            State::Finished => ClientState::Finished,
        }
    }

    /// Whether the session ended; drain [`ClientSession::poll_transmit`], then close.
    pub fn is_finished(&self) -> bool {
        self.outcome.is_some()
    }

    /// How the session ended, once it has.
    pub fn outcome(&self) -> Option<&Result<Outcome, ProtoError>> {
        self.outcome.as_ref()
    }

    /// The limits in force after clamping the daemon's to the client's: (frame size the client
    /// sends, concurrent file streams). Zero before `Welcome`.
    pub fn negotiated(&self) -> (usize, u32) {
        (self.send_frame, self.streams)
    }

    fn fail(&mut self, err: ProtoError) {
        if self.is_finished() {
            return;
        }
        self.transmit.clear();
        self.requests.clear();
        self.state = State::Finished;
        self.outcome = Some(Err(err));
    }

    fn finish(&mut self, outcome: Outcome) {
        self.state = State::Finished;
        self.outcome = Some(Ok(outcome));
    }

    fn waiting_label(&self) -> &'static str {
        match &self.state {
            State::Welcome => "Welcome",
            State::Need { .. } => "Need",
            State::Sending(_) => "signatures",
            State::AwaitStaged => "Staged",
            State::AwaitActivated(_) => "Activated",
            State::AwaitSynced(_) => "Synced",
            State::Reply => "the command's reply",
            State::Finished => "nothing",
        }
    }

    /// What the daemon owes within the message timeout, if anything. Building and activating a
    /// release, applying a sync, and commands, may take long on the daemon: those waits are
    /// bounded by the push timeout only. So is a sync's `Need`, which follows a scan (and hashing)
    /// of the whole destination.
    fn waiting_for_daemon(&self) -> Option<&'static str> {
        match &self.state {
            State::Welcome => Some("Welcome"),
            State::Need { .. }
                if self.push.as_ref().is_some_and(|p| {
                    p.manifest_emitted() && matches!(p.goal, Goal::Release { .. })
                }) =>
            {
                Some("Need")
            }
            State::Sending(s) if !s.pending_sig.is_empty() => Some("Signature"),
            _ => None,
        }
    }

    fn unexpected(&self, msg: &DaemonMsg) -> ProtoError {
        ProtoError::Protocol(format!(
            "unexpected {} from the daemon while the client was waiting for {}",
            msg.name(),
            self.waiting_label()
        ))
    }

    fn on_frame(&mut self, frame: &[u8]) -> Result<(), ProtoError> {
        if matches!(self.state, State::Welcome) {
            if let Some(theirs) = peek_version(frame).filter(|v| *v != VERSION) {
                return Err(ProtoError::Version {
                    ours: VERSION,
                    theirs,
                });
            }
        }
        let msg = decode::<DaemonMsg>(frame)?;
        match (&self.state, msg) {
            (_, DaemonMsg::Error { kind, message }) => Err(ProtoError::Remote { kind, message }),
            (
                State::Welcome,
                DaemonMsg::Welcome {
                    version,
                    limits,
                    manifest_basis,
                },
            ) => self.on_welcome(version, limits, manifest_basis),
            (
                State::Need { .. },
                DaemonMsg::Need {
                    files,
                    last,
                    have_files,
                    have_bytes,
                },
            ) => self.on_need(files, last, have_files, have_bytes),
            (State::Sending(_), DaemonMsg::Signature { file, data }) => {
                self.on_signature(file, &data)
            }
            (State::AwaitStaged, DaemonMsg::Staged(staged)) => self.on_staged(staged),
            (State::AwaitSynced(_), DaemonMsg::MirrorPlan { steps }) => self.on_plan(steps),
            (State::AwaitSynced(_), DaemonMsg::Synced(synced)) => self.on_synced(synced),
            (State::AwaitActivated(_), DaemonMsg::Activated { release, .. }) => {
                let State::AwaitActivated(staged) =
                    std::mem::replace(&mut self.state, State::Finished)
                else {
                    unreachable!("matched above")
                };
                let p = self.push.as_ref().expect("pushes have a context");
                if release != *p.release() {
                    return Err(ProtoError::Protocol(format!(
                        "daemon activated release {release} but the client pushed {}",
                        p.release()
                    )));
                }
                let report = p.report(staged, true);
                self.finish(Outcome::Pushed(report));
                Ok(())
            }
            (State::Reply, msg) => self.on_reply(msg),
            (_, msg) => Err(self.unexpected(&msg)),
        }
    }

    fn on_welcome(
        &mut self,
        version: u16,
        limits: Limits,
        manifest_basis: bool,
    ) -> Result<(), ProtoError> {
        if version != VERSION {
            return Err(ProtoError::Version {
                ours: VERSION,
                theirs: version,
            });
        }
        if limits.max_frame < MIN_MAX_FRAME {
            return Err(ProtoError::Limit(format!(
                "daemon announces max_frame of {} bytes, below the protocol minimum of {MIN_MAX_FRAME}; fix the daemon's configuration",
                limits.max_frame
            )));
        }
        if limits.max_streams == 0 {
            return Err(ProtoError::Limit(
                "daemon announces max_streams of 0, so no file could be sent; fix the daemon's configuration".into(),
            ));
        }
        self.send_frame = limits.max_frame.min(self.config.max_frame) as usize;
        self.streams = limits.max_streams.min(self.config.max_streams).max(1);
        match &mut self.push {
            Some(p) => {
                let entries = p.manifest.len() as u64;
                if entries > limits.max_manifest_entries {
                    return Err(ProtoError::Limit(format!(
                        "the manifest has {entries} entries but the daemon accepts at most {}; raise max_manifest_entries on the daemon or exclude files",
                        limits.max_manifest_entries
                    )));
                }
                if p.encoded.len() as u64 > limits.max_manifest_bytes {
                    return Err(ProtoError::Limit(format!(
                        "the manifest encodes to {} bytes but the daemon accepts at most {}; raise max_manifest_bytes on the daemon",
                        p.encoded.len(),
                        limits.max_manifest_bytes
                    )));
                }
                let basis = match (manifest_basis, &p.manifest_basis) {
                    (false, _) => None,
                    (true, Some(b)) => Some(b),
                    (true, None) => {
                        return Err(ProtoError::Protocol(
                            "daemon accepted a basis manifest the client did not name".into(),
                        ))
                    }
                };
                let wire: Arc<[u8]> = match (basis, p.packed.take()) {
                    (Some(_), Some(packed)) => packed.payload,
                    (basis, _) => {
                        let mut wire = Vec::with_capacity(p.encoded.len() / 4);
                        let compressed = match basis {
                            Some(b) => crate::delta::encode_with_basis(b, &p.encoded, &mut wire),
                            None => crate::delta::encode_full(&p.encoded, &mut wire),
                        };
                        compressed.map_err(|e| {
                            ProtoError::Misuse(format!("compressing the manifest failed: {e}"))
                        })?;
                        wire.into()
                    }
                };
                p.manifest_bytes = wire.len() as u64;
                p.manifest_delta = basis.is_some();
                p.encoded = wire;
                p.chunk = (self.send_frame - FRAME_OVERHEAD).min(MAX_MANIFEST_CHUNK);
                // Removals name the destination's entries, which the daemon caps as it caps
                // manifests; the client holds no more than that, nor more than its own cap.
                self.max_removals = limits
                    .max_manifest_entries
                    .min(Limits::default().max_manifest_entries);
                let count = p.files.len();
                self.state = State::Need {
                    files: Vec::new(),
                    seen: vec![false; count],
                };
            }
            None => self.state = State::Reply,
        }
        Ok(())
    }

    fn on_need(
        &mut self,
        files: Vec<NeedFile>,
        last: bool,
        have_files: u64,
        have_bytes: u64,
    ) -> Result<(), ProtoError> {
        let p = self.push.as_mut().expect("pushes have a context");
        if !p.manifest_emitted() {
            return Err(ProtoError::Protocol(
                "daemon sent Need before the client sent the whole manifest".into(),
            ));
        }
        let State::Need { files: acc, seen } = &mut self.state else {
            unreachable!("checked by the caller")
        };
        for n in files {
            let Some(slot) = seen.get_mut(n.file as usize) else {
                return Err(ProtoError::Protocol(format!(
                    "daemon asked for file {} but the manifest has {} files",
                    n.file,
                    p.files.len()
                )));
            };
            if std::mem::replace(slot, true) {
                let path = p.file(n.file).map(|(path, ..)| path.to_string());
                return Err(ProtoError::Protocol(format!(
                    "daemon asked for file {} ({}) twice",
                    n.file,
                    path.unwrap_or_default()
                )));
            }
            acc.push(n);
        }
        if have_files > p.files.len() as u64 {
            return Err(ProtoError::Protocol(format!(
                "daemon claims to have {have_files} of the {} files",
                p.files.len()
            )));
        }
        if !last {
            return Ok(());
        }
        let State::Need { files, .. } = std::mem::replace(&mut self.state, State::Finished) else {
            unreachable!("matched above")
        };
        p.needed = files.len() as u64;
        p.needed_bytes = files
            .iter()
            .filter_map(|n| p.file(n.file))
            .map(|(_, size, _)| size)
            .sum();
        p.have_files = have_files;
        p.have_bytes = have_bytes;
        if matches!(p.goal, Goal::Mirror { dry_run: true }) {
            // Nothing to send: the daemon answers with the plan.
            self.state = State::AwaitSynced(PlanIn {
                named: vec![false; p.manifest.len()],
                ..PlanIn::default()
            });
            return Ok(());
        }
        self.plan(files)
    }

    /// Chooses a method per needed file and asks for the signatures it needs.
    fn plan(&mut self, files: Vec<NeedFile>) -> Result<(), ProtoError> {
        let p = self.push.as_mut().expect("pushes have a context");
        let mut s = Sending {
            total: files.len() as u64,
            ..Sending::default()
        };
        let mut want_sig = Vec::new();
        for n in files {
            let (path, size, hash) = p.file(n.file).expect("checked against the file count");
            let method = match n.basis {
                None => Method::Full,
                Some(basis) if p.cached.contains(&basis.hash) => Method::ZstdRef { basis },
                Some(basis)
                    if basis.size >= self.config.rsync_min_basis
                        && signature_len(basis.size) + FRAME_OVERHEAD as u64
                            <= u64::from(self.config.max_frame) =>
                {
                    s.pending_sig.insert(n.file, basis);
                    want_sig.push(n.file);
                    continue;
                }
                Some(_) => Method::Full,
            };
            s.ready.push_back(SendFile {
                file: n.file,
                path: path.clone(),
                size,
                hash,
                method,
            });
        }
        p.signatures = want_sig.len() as u64;
        let per_frame = (self.send_frame - FRAME_OVERHEAD) / FILE_INDEX_MAX;
        for chunk in want_sig.chunks(per_frame) {
            self.transmit
                .push_back(encode_frame(&ClientMsg::SignatureRequest {
                    files: chunk.to_vec(),
                }));
        }
        if s.total == 0 {
            self.transmit
                .push_back(encode_frame(&ClientMsg::Done { files_sent: 0 }));
            self.state = self.after_done();
        } else {
            self.state = State::Sending(s);
        }
        Ok(())
    }

    fn on_signature(&mut self, file: u32, data: &[u8]) -> Result<(), ProtoError> {
        let p = self.push.as_ref().expect("pushes have a context");
        let State::Sending(s) = &mut self.state else {
            unreachable!("checked by the caller")
        };
        let Some(basis) = s.pending_sig.remove(&file) else {
            return Err(ProtoError::Protocol(format!(
                "daemon sent a signature for file {file}, which the client did not request or already has"
            )));
        };
        let (path, size, hash) = p.file(file).expect("requested files are in the manifest");
        let method = if data.is_empty() {
            Method::Full
        } else {
            let signature = BasisSignature::decode(data, basis.size).map_err(|e| {
                ProtoError::Protocol(format!("daemon sent a malformed signature for {path}: {e}"))
            })?;
            Method::Rsync { basis, signature }
        };
        s.ready.push_back(SendFile {
            file,
            path: path.clone(),
            size,
            hash,
            method,
        });
        Ok(())
    }

    fn on_file_sent(&mut self, header: &FileHeader) -> Result<(), ProtoError> {
        let State::Sending(s) = &mut self.state else {
            return Err(ProtoError::Misuse(format!(
                "file_sent({}) while no transfer runs",
                header.file
            )));
        };
        if !s.outstanding.remove(&header.file) {
            return Err(ProtoError::Misuse(format!(
                "file_sent({}) for a file that was not handed out",
                header.file
            )));
        }
        let p = self.push.as_mut().expect("pushes have a context");
        p.sent[header.format.code() as usize] += 1;
        p.payload_bytes += header.payload_len;
        s.sent += 1;
        if s.sent == s.total {
            self.transmit.push_back(encode_frame(&ClientMsg::Done {
                files_sent: s.total,
            }));
            self.state = self.after_done();
        }
        Ok(())
    }

    /// What the session waits for once every needed file went out.
    fn after_done(&self) -> State {
        let p = self.push.as_ref().expect("pushes have a context");
        match p.goal {
            Goal::Release { .. } => State::AwaitStaged,
            Goal::Mirror { .. } => State::AwaitSynced(PlanIn {
                named: vec![false; p.manifest.len()],
                ..PlanIn::default()
            }),
        }
    }

    fn on_plan(&mut self, steps: Vec<MirrorStep>) -> Result<(), ProtoError> {
        let p = self.push.as_ref().expect("syncs have a context");
        let State::AwaitSynced(plan) = &mut self.state else {
            unreachable!("checked by the caller")
        };
        for step in steps {
            match step.entry() {
                None => {
                    plan.removals += 1;
                    if plan.removals > self.max_removals {
                        return Err(ProtoError::Limit(format!(
                            "daemon reports more than {} removals, more entries than it may scan",
                            self.max_removals
                        )));
                    }
                }
                Some(i) => {
                    let seen = plan.named.get_mut(i as usize).ok_or_else(|| {
                        ProtoError::Protocol(format!(
                            "daemon's plan names entry {i} but the manifest has {} entries",
                            p.manifest.len()
                        ))
                    })?;
                    if std::mem::replace(seen, true) {
                        return Err(ProtoError::Protocol(format!(
                            "daemon's plan names {} twice",
                            p.manifest.entries()[i as usize].path
                        )));
                    }
                }
            }
            let op = step
                .to_op(&p.manifest)
                .map_err(|e| ProtoError::Protocol(format!("daemon's plan is malformed: {e}")))?;
            plan.ops.push(op);
        }
        Ok(())
    }

    fn on_synced(&mut self, synced: Synced) -> Result<(), ProtoError> {
        let p = self.push.as_ref().expect("syncs have a context");
        let State::AwaitSynced(plan) = std::mem::replace(&mut self.state, State::Finished) else {
            unreachable!("checked by the caller")
        };
        let dry_run = matches!(p.goal, Goal::Mirror { dry_run: true });
        if synced.steps != plan.ops.len() as u64 {
            return Err(ProtoError::Protocol(format!(
                "daemon reports a plan of {} steps but sent {}",
                synced.steps,
                plan.ops.len()
            )));
        }
        let summary = mirror_summary(&p.manifest, &plan.ops);
        if summary != synced.summary {
            return Err(ProtoError::Protocol(format!(
                "daemon's summary {:?} does not match the plan it sent ({summary:?})",
                synced.summary
            )));
        }
        if synced.applied.is_some() == dry_run {
            return Err(ProtoError::Protocol(if dry_run {
                "daemon reports a dry run as applied".into()
            } else {
                "daemon reports the sync as not applied".into()
            }));
        }
        let received = if dry_run { 0 } else { p.needed };
        if synced.received != received {
            return Err(ProtoError::Protocol(format!(
                "daemon reports {} files received but the client sent {received}",
                synced.received
            )));
        }
        let report = SyncReport {
            dry_run,
            plan: MirrorPlan {
                ops: plan.ops,
                summary,
            },
            applied: synced.applied,
            needed: p.needed,
            needed_bytes: p.needed_bytes,
            have_files: p.have_files,
            have_bytes: p.have_bytes,
            signatures: p.signatures,
            sent_full: p.sent[0],
            sent_zstd_ref: p.sent[1],
            sent_rsync: p.sent[2],
            payload_bytes: p.payload_bytes,
        };
        self.finish(Outcome::Synced(report));
        Ok(())
    }

    fn on_staged(&mut self, staged: Staged) -> Result<(), ProtoError> {
        let p = self.push.as_ref().expect("pushes have a context");
        if staged.release != *p.release() {
            return Err(ProtoError::Protocol(format!(
                "daemon staged release {} but the client pushed {}",
                staged.release,
                p.release()
            )));
        }
        if staged.files != p.files.len() as u64 {
            return Err(ProtoError::Protocol(format!(
                "daemon staged {} files but the manifest has {}",
                staged.files,
                p.files.len()
            )));
        }
        if staged.phases.len() > MAX_PHASES
            || staged
                .phases
                .iter()
                .any(|ph| ph.name.len() > MAX_PHASE_NAME)
        {
            return Err(ProtoError::Protocol(format!(
                "daemon reported {} phases (at most {MAX_PHASES}, names of at most {MAX_PHASE_NAME} bytes)",
                staged.phases.len()
            )));
        }
        if matches!(p.goal, Goal::Release { activate: true, .. }) {
            self.transmit.push_back(encode_frame(&ClientMsg::Activate {
                release: p.release().clone(),
            }));
            self.state = State::AwaitActivated(staged);
        } else {
            let report = p.report(staged, false);
            self.finish(Outcome::Pushed(report));
        }
        Ok(())
    }

    fn on_reply(&mut self, msg: DaemonMsg) -> Result<(), ProtoError> {
        let outcome = match (&self.command, msg) {
            (Command::Releases, DaemonMsg::Releases { list }) => Outcome::Releases(list),
            (
                Command::Activate {
                    release: want,
                    prune,
                },
                DaemonMsg::Activated { release, pruned },
            ) if *want == release && pruned.is_some() == *prune => {
                Outcome::Activated { release, pruned }
            }
            (
                Command::Rollback { to },
                DaemonMsg::Activated {
                    release,
                    pruned: None,
                },
            ) if to.as_ref().is_none_or(|t| *t == release) => Outcome::Activated {
                release,
                pruned: None,
            },
            (Command::Prune { .. } | Command::Clear, DaemonMsg::Pruned { removed }) => {
                Outcome::Pruned { removed }
            }
            (_, msg) => {
                return Err(ProtoError::Protocol(format!(
                    "daemon answered {} with an unexpected {}",
                    self.command.name(),
                    msg.name()
                )))
            }
        };
        self.finish(outcome);
        Ok(())
    }
}

/// Encoded size of the signature the daemon computes for a basis of `len` bytes.
fn signature_len(len: u64) -> u64 {
    let block = u64::from(block_size_for(len));
    12 + len.div_ceil(block) * (4 + u64::from(STRONG_LEN))
}

impl super::ControlStream for ClientSession {
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
    use crate::manifest::{Entry, Policy};

    #[test]
    fn signature_len_matches_what_the_daemon_computes() {
        for len in [1usize, 2048, 70_000, 1 << 20] {
            let basis = vec![7u8; len];
            let sig = BasisSignature::calculate(&basis);
            assert_eq!(
                signature_len(len as u64),
                sig.as_bytes().len() as u64,
                "{len}"
            );
        }
    }

    #[test]
    fn likely_sends_are_what_a_daemon_holding_the_last_push_would_need() {
        let f = |p: &str, c: &str| Entry::file(p, c.len() as u64, 0o644, Hash::of(c.as_bytes()));
        let last = Manifest::from_unsorted(
            vec![
                f("same", "same").unwrap(),
                f("edited", "edited, before").unwrap(),
                f("edited-uncached", "uncached, before").unwrap(),
                f("emptied", "").unwrap(),
                f("old-name", "moved").unwrap(),
            ],
            &Policy::default(),
        )
        .unwrap();
        let new = Manifest::from_unsorted(
            vec![
                f("same", "same").unwrap(),
                f("edited", "edited, after").unwrap(),
                f("edited-uncached", "uncached, after").unwrap(),
                f("emptied", "now filled").unwrap(),
                f("new-name", "moved").unwrap(),
                f("added", "added").unwrap(),
                f("added-twice", "added").unwrap(),
            ],
            &Policy::default(),
        )
        .unwrap();
        let cached: HashSet<Hash> = [Hash::of(b"edited, before")].into_iter().collect();
        let got: Vec<(String, String)> = likely_sends(&new, &last, &cached)
            .into_iter()
            .map(|s| {
                let method = match s.method {
                    Method::Full => "full".to_string(),
                    Method::ZstdRef { basis } => format!("zstd-ref {}", basis.size),
                    Method::Rsync { .. } => "rsync".to_string(),
                };
                assert_eq!(new.files().nth(s.file as usize).unwrap().0, &s.path);
                (s.path.to_string(), method)
            })
            .collect();
        // Unchanged and moved content is held; an edit whose basis the client cached goes as a
        // zstd-reference delta, one it did not would wait for a signature; an empty basis is
        // none; the same new content goes once.
        let want = [
            ("added", "full"),
            ("edited", "zstd-ref 14"),
            ("emptied", "full"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(p, m)| (p.to_string(), m.to_string()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn headers_follow_the_method() {
        let basis = BasisRef {
            hash: Hash::of(b"old"),
            size: 3,
        };
        let mk = |method| SendFile {
            file: 4,
            path: RelPath::new("a").unwrap(),
            size: 10,
            hash: Hash::of(b"new"),
            method,
        };
        let full = mk(Method::Full);
        let zref = mk(Method::ZstdRef { basis });
        assert_eq!(full.header(DeltaFormat::Full, 9).unwrap().basis, None);
        assert!(full.header(DeltaFormat::ZstdRef, 9).is_err());
        assert_eq!(
            zref.header(DeltaFormat::ZstdRef, 9).unwrap(),
            FileHeader {
                file: 4,
                format: DeltaFormat::ZstdRef,
                basis: Some(basis.hash),
                payload_len: 9
            }
        );
        assert_eq!(zref.header(DeltaFormat::Full, 9).unwrap().basis, None);
        assert_eq!(
            zref.header(DeltaFormat::Rsync, 9).unwrap().basis,
            Some(basis.hash)
        );
    }

    #[test]
    fn push_and_command_constructors_refuse_the_wrong_kind() {
        let s = ClientSession::command(
            ClientConfig::default(),
            AppName::new("shop").unwrap(),
            Command::Sync {
                export: AppName::new("x").unwrap(),
                subpath: None,
                delete: false,
                dry_run: false,
                excludes: vec![],
                manifest_len: 1,
                manifest_digest: Hash::of(b""),
            },
            0,
        );
        assert!(matches!(s.outcome(), Some(Err(ProtoError::Misuse(_)))));
        let m = Manifest::from_unsorted(
            vec![Entry::file("a", 1, 0o644, Hash::of(b"a")).unwrap()],
            &Policy::default(),
        )
        .unwrap();
        let mut s = ClientSession::push(
            ClientConfig {
                max_frame: 1,
                ..ClientConfig::default()
            },
            AppName::new("shop").unwrap(),
            PushJob {
                release: ReleaseId::new("r").unwrap(),
                manifest: Arc::new(m),
                activate: true,
                cached: HashSet::new(),
                manifest_basis: None,
                packed_manifest: None,
            },
            0,
        );
        let hello = s.poll_transmit(0).unwrap();
        // A too-small configured max_frame is raised to the protocol minimum.
        match decode::<ClientMsg>(&hello[4..]).unwrap() {
            ClientMsg::Hello { max_frame, .. } => assert_eq!(max_frame, MIN_MAX_FRAME),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.poll_timeout(), Some(30_000));
    }

    #[test]
    fn a_manifest_packed_ahead_is_sent_only_for_its_own_basis_and_manifest() {
        let manifest_of = |names: &[&str]| {
            let entries = names
                .iter()
                .map(|n| Entry::file(n, 3, 0o644, Hash::of(n.as_bytes())).unwrap())
                .collect();
            Arc::new(Manifest::from_unsorted(entries, &Policy::default()).unwrap())
        };
        let old = manifest_of(&["a.php", "b.php", "c.php"]).encode();
        let other = manifest_of(&["x.php"]).encode();
        let new = manifest_of(&["a.php", "b.php", "d.php"]);
        let ahead = pack_manifest(&new, &old).unwrap();
        let elsewhere = pack_manifest(&new, &other).unwrap();
        let of_another = pack_manifest(&manifest_of(&["a.php"]), &old).unwrap();
        // (packed, daemon accepts the basis, payload expected on the wire)
        let cases = [
            (
                "packed ahead",
                Some(ahead.clone()),
                true,
                ahead.payload.to_vec(),
            ),
            (
                "packed against another basis",
                Some(elsewhere),
                true,
                ahead.payload.to_vec(),
            ),
            (
                "packed for another manifest",
                Some(of_another),
                true,
                ahead.payload.to_vec(),
            ),
            ("basis refused", Some(ahead), false, {
                let mut full = Vec::new();
                crate::delta::encode_full(&new.encode(), &mut full).unwrap();
                full
            }),
        ];
        for (name, packed, accepted, want) in cases {
            let mut s = ClientSession::push(
                ClientConfig::default(),
                AppName::new("shop").unwrap(),
                PushJob {
                    release: ReleaseId::new("r").unwrap(),
                    manifest: Arc::clone(&new),
                    activate: true,
                    cached: HashSet::new(),
                    manifest_basis: Some(Arc::clone(&old)),
                    packed_manifest: packed,
                },
                0,
            );
            while s.poll_transmit(0).is_some() {}
            let welcome = DaemonMsg::Welcome {
                version: VERSION,
                limits: Limits::default(),
                manifest_basis: accepted,
            };
            s.handle_control(&welcome.frame(), 1);
            let mut sent = Vec::new();
            while let Some(f) = s.poll_transmit(1) {
                if let ClientMsg::ManifestChunk { data, .. } = decode::<ClientMsg>(&f[4..]).unwrap()
                {
                    sent.extend_from_slice(&data);
                }
            }
            assert_eq!(sent, want, "{name}");
            // Whatever was sent decodes to the new manifest against what the daemon holds.
            let mut decoded = Vec::new();
            let basis = accepted.then_some(&old[..]);
            let format = if accepted {
                crate::delta::DeltaFormat::ZstdRef
            } else {
                crate::delta::DeltaFormat::Full
            };
            let digest = blake3::Hash::from_bytes(new.digest().0);
            crate::delta::apply(
                format,
                basis,
                &sent,
                new.encode().len() as u64,
                &digest,
                &mut decoded,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn an_activation_reply_must_report_a_prune_exactly_when_one_was_asked_for() {
        let r = ReleaseId::new("r2").unwrap();
        let removed = Some(Pruning::Removed(vec![ReleaseId::new("r0").unwrap()]));
        let failed = Some(Pruning::Failed("disk error".into()));
        let table = [
            (false, None, true),
            (false, removed.clone(), false),
            (true, removed, true),
            (true, failed, true),
            (true, None, false),
        ];
        for (prune, pruned, ok) in table {
            let mut s = ClientSession::command(
                ClientConfig::default(),
                AppName::new("shop").unwrap(),
                Command::Activate {
                    release: r.clone(),
                    prune,
                },
                0,
            );
            while s.poll_transmit(0).is_some() {}
            let welcome = DaemonMsg::Welcome {
                version: VERSION,
                limits: Limits::default(),
                manifest_basis: false,
            };
            s.handle_control(&welcome.frame(), 1);
            let reply = DaemonMsg::Activated {
                release: r.clone(),
                pruned: pruned.clone(),
            };
            s.handle_control(&reply.frame(), 2);
            let want = Outcome::Activated {
                release: r.clone(),
                pruned: pruned.clone(),
            };
            match s.outcome() {
                Some(Ok(o)) if ok => assert_eq!(o, &want),
                Some(Err(ProtoError::Protocol(_))) if !ok => {}
                other => panic!("prune {prune}, {pruned:?}: {other:?}"),
            }
        }
    }

    use crate::wire::Message as _;

    /// The manifest of the sync tests: a directory, two files, a symlink.
    fn sync_manifest() -> Arc<Manifest> {
        Arc::new(
            Manifest::from_unsorted(
                vec![
                    Entry::dir("d", 0o755).unwrap(),
                    Entry::file("d/new", 5, 0o644, Hash::of(b"new!!")).unwrap(),
                    Entry::file("same", 4, 0o644, Hash::of(b"same")).unwrap(),
                    Entry::symlink("l", "same").unwrap(),
                ],
                &Policy::default(),
            )
            .unwrap(),
        )
    }

    fn frames_of(s: &mut ClientSession) -> Vec<ClientMsg> {
        std::iter::from_fn(|| s.poll_transmit(0))
            .map(|f| decode(&f[4..]).unwrap())
            .collect()
    }

    /// A sync session that sent its manifest and got a `Need` for `d/new` (file 0); for a real
    /// sync the file was also sent, so the session waits for the plan.
    fn sync_awaiting_plan(dry_run: bool) -> ClientSession {
        let mut s = ClientSession::sync(
            ClientConfig::default(),
            SyncJob {
                export: AppName::new("media").unwrap(),
                subpath: Some(RelPath::new("img").unwrap()),
                delete: true,
                dry_run,
                excludes: vec!["*.tmp".into()],
                manifest: sync_manifest(),
                cached: HashSet::new(),
            },
            0,
        );
        let welcome = DaemonMsg::Welcome {
            version: VERSION,
            limits: Limits::default(),
            manifest_basis: false,
        };
        s.handle_control(&welcome.frame(), 1);
        let sent = frames_of(&mut s);
        match &sent[0] {
            ClientMsg::Hello {
                app,
                command:
                    Command::Sync {
                        export,
                        subpath,
                        delete: true,
                        dry_run: d,
                        excludes,
                        ..
                    },
                ..
            } => {
                assert_eq!((app.as_str(), export.as_str()), ("media", "media"));
                assert_eq!(subpath.as_ref().map(RelPath::as_str), Some("img"));
                assert_eq!(
                    (*d, excludes.as_slice()),
                    (dry_run, &["*.tmp".to_string()][..])
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            sent.last(),
            Some(ClientMsg::ManifestChunk { last: true, .. })
        ));
        // The daemon scans the destination before it answers: only the push timeout applies.
        assert_eq!(
            s.poll_timeout(),
            Some(ClientConfig::default().push_timeout_ms)
        );
        let need = DaemonMsg::Need {
            files: vec![NeedFile {
                file: 0,
                basis: None,
            }],
            last: true,
            have_files: 1,
            have_bytes: 4,
        };
        s.handle_control(&need.frame(), 2);
        if !dry_run {
            let Some(Request::SendFile(f)) = s.poll_request() else {
                panic!("the needed file is sent")
            };
            assert_eq!(f.path.as_str(), "d/new");
            s.file_sent(&f.header(DeltaFormat::Full, 9).unwrap(), 3);
            assert_eq!(frames_of(&mut s), [ClientMsg::Done { files_sent: 1 }]);
        } else {
            assert_eq!(s.poll_request(), None, "a dry run sends no file");
            assert_eq!(frames_of(&mut s), [], "nor Done");
        }
        assert_eq!(s.state(), ClientState::Mirroring);
        s
    }

    /// What a daemon that created `d` and wrote `d/new` and `l` says.
    fn good_plan() -> (Vec<MirrorStep>, Synced) {
        let steps = vec![
            MirrorStep::Remove {
                path: RelPath::new("extra").unwrap(),
                dir: false,
            },
            MirrorStep::CreateDir { entry: 0 },
            MirrorStep::Write {
                entry: 1,
                delta: false,
            },
            MirrorStep::Symlink { entry: 2 },
        ];
        let ops: Vec<MirrorOp> = steps
            .iter()
            .map(|st| st.to_op(&sync_manifest()).unwrap())
            .collect();
        let synced = Synced {
            summary: mirror_summary(&sync_manifest(), &ops),
            applied: Some(MirrorStats {
                removed: 1,
                written_files: 1,
                written_bytes: 5,
                dirs: 1,
            }),
            steps: 4,
            received: 1,
            received_bytes: 9,
        };
        (steps, synced)
    }

    fn answer(s: &mut ClientSession, steps: Vec<MirrorStep>, synced: Synced) {
        // In two pieces, as a daemon with a small max_frame sends them.
        let (a, b) = steps.split_at(steps.len() / 2);
        for piece in [a, b] {
            let m = DaemonMsg::MirrorPlan {
                steps: piece.to_vec(),
            };
            s.handle_control(&m.frame(), 4);
        }
        s.handle_control(&DaemonMsg::Synced(synced).frame(), 5);
    }

    #[test]
    fn a_sync_reports_the_plan_rebuilt_from_its_own_manifest() {
        let mut s = sync_awaiting_plan(false);
        let (steps, synced) = good_plan();
        answer(&mut s, steps, synced);
        let Some(Ok(Outcome::Synced(r))) = s.outcome() else {
            panic!("{:?}", s.outcome())
        };
        assert!(!r.dry_run);
        assert_eq!((r.needed, r.needed_bytes, r.sent_full), (1, 5, 1));
        assert_eq!((r.have_files, r.have_bytes), (1, 4));
        assert_eq!(r.applied.as_ref().map(|a| a.written_files), Some(1));
        assert_eq!(
            r.plan.ops[2],
            MirrorOp::Write {
                path: RelPath::new("d/new").unwrap(),
                size: 5,
                mode: 0o644,
                hash: Hash::of(b"new!!"),
                basis: None,
            }
        );
        assert_eq!(
            (r.plan.summary.written_files, r.plan.summary.unchanged_files),
            (1, 1)
        );

        let mut dry = sync_awaiting_plan(true);
        let (steps, synced) = good_plan();
        let synced = Synced {
            applied: None,
            received: 0,
            received_bytes: 0,
            ..synced
        };
        answer(&mut dry, steps, synced);
        let Some(Ok(Outcome::Synced(r))) = dry.outcome() else {
            panic!("{:?}", dry.outcome())
        };
        assert!(r.dry_run && r.applied.is_none());
        assert_eq!((r.needed, r.sent_full), (1, 0));
    }

    #[test]
    fn a_sync_answer_that_does_not_add_up_is_refused() {
        type Edit = fn(&mut Vec<MirrorStep>, &mut Synced);
        let table: Vec<(&str, bool, Edit)> = vec![
            ("entry twice", false, |st, sy| {
                st.push(MirrorStep::Symlink { entry: 2 });
                sy.steps += 1;
            }),
            ("entry out of range", false, |st, sy| {
                st.push(MirrorStep::SetDirMode { entry: 4 });
                sy.steps += 1;
            }),
            ("write of a directory", false, |st, _| {
                st[1] = MirrorStep::Write {
                    entry: 0,
                    delta: false,
                };
            }),
            ("step count", false, |_, sy| sy.steps = 3),
            ("summary", false, |_, sy| sy.summary.written_files = 2),
            ("not applied", false, |_, sy| sy.applied = None),
            ("received", false, |_, sy| sy.received = 0),
            ("dry run applied", true, |_, sy| sy.received = 0),
        ];
        for (name, dry_run, edit) in table {
            let mut s = sync_awaiting_plan(dry_run);
            let (mut steps, mut synced) = good_plan();
            if dry_run {
                synced.received = 0;
            }
            edit(&mut steps, &mut synced);
            answer(&mut s, steps, synced);
            assert!(
                matches!(s.outcome(), Some(Err(ProtoError::Protocol(_)))),
                "{name}: {:?}",
                s.outcome()
            );
        }
        // The daemon's answer to a push is no answer to a sync.
        let mut s = sync_awaiting_plan(false);
        let staged = DaemonMsg::Staged(Staged {
            release: ReleaseId::new("r").unwrap(),
            files: 2,
            bytes: 9,
            linked: 0,
            received: 1,
            received_bytes: 9,
            phases: vec![],
            usage: Default::default(),
            relayed: Vec::new(),
            previous: None,
        });
        s.handle_control(&staged.frame(), 4);
        assert!(matches!(s.outcome(), Some(Err(ProtoError::Protocol(_)))));
    }

    /// A push of `files` files of 10 bytes each, past `Need` (all of them needed), with the
    /// daemon allowing `max_streams` streams.
    fn sending(config: ClientConfig, max_streams: u32, files: u32) -> ClientSession {
        let entries = (0..files)
            .map(|i| Entry::file(&format!("f{i:04}"), 10, 0o644, Hash::of(&i.to_le_bytes())))
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let manifest = Manifest::from_unsorted(entries, &Policy::default()).unwrap();
        let job = PushJob {
            release: ReleaseId::new("r1").unwrap(),
            manifest: Arc::new(manifest),
            activate: false,
            cached: HashSet::new(),
            manifest_basis: None,
            packed_manifest: None,
        };
        let mut s = ClientSession::push(config, AppName::new("shop").unwrap(), job, 0);
        let welcome = DaemonMsg::Welcome {
            version: VERSION,
            limits: Limits {
                max_streams,
                ..Limits::default()
            },
            manifest_basis: false,
        };
        s.handle_control(&welcome.frame(), 0);
        while s.poll_transmit(0).is_some() {}
        let need = DaemonMsg::Need {
            files: (0..files)
                .map(|file| NeedFile { file, basis: None })
                .collect(),
            last: true,
            have_files: 0,
            have_bytes: 0,
        };
        s.handle_control(&need.frame(), 0);
        assert_eq!(s.state(), ClientState::Transfer);
        s
    }

    fn drain(s: &mut ClientSession) -> Vec<SendFile> {
        std::iter::from_fn(|| s.poll_request())
            .map(|Request::SendFile(f)| f)
            .collect()
    }

    #[test]
    fn files_out_are_capped_by_max_files_out_not_by_the_streams() {
        // (client max_streams, daemon max_streams, max_files_out, files, handed out at first)
        let table = [
            (64, 64, 1024, 3000, 1024),
            (64, 3, 1024, 3000, 1024),
            (2, 64, 100, 3000, 100),
            (64, 64, 1024, 10, 10),
            (64, 64, 1, 10, 1),
            // Zero means one: a session that could hand out nothing would never finish.
            (64, 64, 0, 10, 1),
        ];
        for (client_streams, daemon_streams, max_files_out, files, first) in table {
            let config = ClientConfig {
                max_streams: client_streams,
                max_files_out,
                ..ClientConfig::default()
            };
            let case = format!("{client_streams} {daemon_streams} {max_files_out} {files}");
            let mut s = sending(config, daemon_streams, files);
            assert_eq!(
                s.negotiated().1,
                client_streams.min(daemon_streams),
                "{case}"
            );
            let mut out = drain(&mut s);
            assert_eq!(out.len(), first as usize, "{case}");
            // Each file reported sent lets exactly one more out, in manifest order, until all
            // went out once.
            let mut seen: Vec<u32> = out.iter().map(|f| f.file).collect();
            while let Some(f) = out.first().cloned() {
                out.remove(0);
                s.file_sent(&f.header(DeltaFormat::Full, 5).unwrap(), 1);
                let more = drain(&mut s);
                assert!(
                    more.len() <= 1,
                    "{case}: {} more after one sent",
                    more.len()
                );
                seen.extend(more.iter().map(|f| f.file));
                out.extend(more);
                assert!(out.len() <= max_files_out.max(1) as usize, "{case}");
            }
            assert_eq!(seen, (0..files).collect::<Vec<_>>(), "{case}");
            assert_eq!(s.state(), ClientState::Staging, "{case}");
            assert_eq!(
                frames_of(&mut s),
                [ClientMsg::Done {
                    files_sent: u64::from(files)
                }],
                "{case}"
            );
        }
    }
}

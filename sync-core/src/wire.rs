//! The relsync wire format, version 1: messages, their postcard encoding, and length-prefixed framing.
//!
//! Every control message travels as a frame: a 4-byte big-endian length, then that many bytes of
//! postcard. [`FrameDecoder`] checks the length against the receiver's `max_frame` before it
//! buffers anything, grows its buffer only as bytes actually arrive (a peer that announces 64 MiB
//! and sends ten bytes costs ten bytes), and never holds more than one frame. Decoding is strict:
//! trailing bytes, unknown variants and invalid names or release ids are typed errors.
//!
//! Compatibility rule: [`ClientMsg::Hello`], [`DaemonMsg::Welcome`] and [`DaemonMsg::Error`] keep
//! their variant index and leading `version` field in every protocol version, so two peers of
//! different versions can always tell each other so ([`peek_version`]).
//!
//! Pure code: no I/O, no clock.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::delta::DeltaFormat;
use crate::manifest::{Entry, EntryKind, Hash, Manifest};
use crate::path::RelPath;
use crate::plan::{MirrorOp, MirrorStats, MirrorSummary};
use crate::relay::{RelayPlan, Relayed};
use crate::release::ReleaseId;

/// The protocol version this crate speaks (2: manifests travel compressed, against a basis
/// manifest when both sides hold one; 3: a push may carry a relay plan, `Staged` reports what
/// became of its nodes and the daemon's time per phase; 4: `Command::Activate` may ask for the
/// prune that follows an activating push, and `Activated` says what it removed; 5: `Staged` and
/// every `Relayed` say which release the host ran before the push).
pub const VERSION: u16 = 5;
/// The QUIC ALPN of the protocol family; the exact version is checked in `Hello`/`Welcome`.
pub const ALPN: &[u8] = b"relsync/1";
/// Bytes of the length prefix of every frame.
pub const FRAME_HEADER_LEN: usize = 4;
/// Smallest `max_frame` a peer may announce: every message except manifest chunks and
/// signatures fits in it, and those are split or skipped to fit.
pub const MIN_MAX_FRAME: u32 = 64 * 1024;
/// Largest `max_frame` either side uses, whatever is configured or announced.
pub const MAX_MAX_FRAME: u32 = 1 << 30;
/// `max_frame` for the [`FileHeader`] frame that opens every file payload.
pub const MAX_FILE_HEADER: u32 = 256;
/// Longest accepted app (or export) name.
pub const MAX_NAME_LEN: usize = 64;
/// Longest [`DaemonMsg::Error`] message a daemon sends; longer ones are cut.
pub const MAX_ERROR_MESSAGE: usize = 4096;
/// Most exclude patterns in a [`Command::Sync`].
pub const MAX_EXCLUDES: usize = 1024;
/// Longest exclude pattern in a [`Command::Sync`], in bytes.
pub const MAX_EXCLUDE_LEN: usize = 4096;
/// Most entries of [`Staged::phases`], and the longest phase name, in bytes.
pub const MAX_PHASES: usize = 32;
pub const MAX_PHASE_NAME: usize = 64;

/// Why bytes from a peer could not be read as a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// A frame announced more bytes than the receiver accepts.
    #[error("peer sent a frame of {len} bytes, over the limit of {max} bytes; raise max_frame on the receiving side if this is legitimate")]
    FrameTooLarge { len: u64, max: u32 },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({have} of {need} bytes); the peer was cut off")]
    Truncated { have: u64, need: u64 },
    /// The frame is not a valid message of the expected kind.
    #[error("{what} from the peer could not be decoded ({detail}); check that both sides run the same relsync version")]
    Decode { what: &'static str, detail: String },
    /// The frame holds a message followed by extra bytes.
    #[error("{what} from the peer has {extra} bytes after the message")]
    Trailing { what: &'static str, extra: usize },
}

/// Explicit limits and deadlines of a daemon, announced in [`DaemonMsg::Welcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest control frame the daemon accepts.
    pub max_frame: u32,
    /// Most entries in a pushed manifest.
    pub max_manifest_entries: u64,
    /// Most bytes of an encoded pushed manifest.
    pub max_manifest_bytes: u64,
    /// Most concurrent file streams.
    pub max_streams: u32,
    /// Most announced-but-unfinished payload bytes; further file headers wait for room.
    pub max_bytes_in_flight: u64,
    /// Longest silence, in ms, while a message from the peer is due.
    pub message_timeout_ms: u64,
    /// Longest connection, in ms, from its start to the last reply.
    pub push_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_frame: 64 << 20,
            max_manifest_entries: 4_000_000,
            max_manifest_bytes: 1 << 30,
            max_streams: 64,
            max_bytes_in_flight: 64 << 20,
            message_timeout_ms: 30_000,
            push_timeout_ms: 3_600_000,
        }
    }
}

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("name {0:?} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ -, not starting with `.`")]
pub struct NameError(pub String);

/// The name of an app (or of an export, for `relsync sync`) on a daemon.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AppName(String);

impl AppName {
    pub fn new(s: impl Into<String>) -> Result<AppName, NameError> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= MAX_NAME_LEN
            && !s.starts_with('.')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(AppName(s))
        } else {
            Err(NameError(s))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for AppName {
    type Error = NameError;
    fn try_from(s: String) -> Result<AppName, NameError> {
        AppName::new(s)
    }
}

impl From<AppName> for String {
    fn from(n: AppName) -> String {
        n.0
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// What the client asks for in [`ClientMsg::Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Build release `release` from the manifest that follows in [`ClientMsg::ManifestChunk`]s.
    Push {
        release: ReleaseId,
        /// Length and blake3 of the manifest's encoding.
        manifest_len: u64,
        manifest_digest: Hash,
        /// Digest of the encoding of a manifest the client holds and expects the daemon to
        /// hold too (the one it last pushed there): the manifest is then sent as a zstd delta
        /// against it, if `Welcome` accepts.
        manifest_basis: Option<Hash>,
        /// Forward the release to these daemons as it arrives (and, from a relay, the ticket
        /// that authorizes this push); see [`crate::relay`].
        relay: Option<RelayPlan>,
    },
    /// List the app's releases.
    Releases,
    /// Point `current` at an existing release; with `prune`, then remove old releases beyond the
    /// app's `keep` as an activating push does (a fleet push activates on its own connection and
    /// saves one for the prune).
    Activate { release: ReleaseId, prune: bool },
    /// Activate `to`, or the newest good release older than `current`.
    Rollback { to: Option<ReleaseId> },
    /// Remove old releases beyond `keep` (the app's setting when absent).
    Prune { keep: Option<u32> },
    /// Mirror the tree whose manifest follows into export `export` (the `app` of `Hello` names
    /// it too), below `subpath` when given (`relsync sync`). `excludes` are the client's
    /// `--exclude` patterns: the destination's own paths matching them are neither compared nor
    /// removed. With `dry_run` the daemon reports the plan and changes nothing.
    Sync {
        export: AppName,
        subpath: Option<RelPath>,
        delete: bool,
        dry_run: bool,
        excludes: Vec<String>,
        manifest_len: u64,
        manifest_digest: Hash,
    },
    /// Take the app offline and remove every release: `current` goes first, then each release
    /// (answered with `Pruned`). For an app set aside for benchmarking, which `relsync bench`
    /// leaves as it found it.
    Clear,
}

impl Command {
    /// Short lower-case name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Push { .. } => "push",
            Command::Releases => "releases",
            Command::Activate { .. } => "activate",
            Command::Rollback { .. } => "rollback",
            Command::Prune { .. } => "prune",
            Command::Sync { .. } => "sync",
            Command::Clear => "clear",
        }
    }
}

/// Messages on the control stream from client to daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// First message. `max_frame` is the largest frame the client accepts.
    Hello {
        version: u16,
        app: AppName,
        command: Command,
        max_frame: u32,
    },
    /// A piece of the manifest's encoding compressed as one zstd frame (with the basis
    /// manifest's encoding as reference prefix when `Welcome` accepted the basis); `last` marks
    /// the final one.
    ManifestChunk {
        #[serde(with = "bytes")]
        data: Vec<u8>,
        last: bool,
    },
    /// Ask for rsync signatures of these files' bases.
    SignatureRequest { files: Vec<u32> },
    /// Every needed file has been written to a file stream.
    Done { files_sent: u64 },
    /// Activate the release just staged.
    Activate { release: ReleaseId },
}

/// The daemon's current version of a path: what a delta is computed against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BasisRef {
    pub hash: Hash,
    pub size: u64,
}

/// One file the daemon needs, by index into the manifest's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeedFile {
    pub file: u32,
    pub basis: Option<BasisRef>,
}

/// What the daemon reports once a release is built and complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    pub release: ReleaseId,
    /// Files in the release.
    pub files: u64,
    /// Bytes of those files.
    pub bytes: u64,
    /// Files hard-linked from a kept release rather than written.
    pub linked: u64,
    /// Files received over the network in this push.
    pub received: u64,
    /// Payload bytes received over the network in this push.
    pub received_bytes: u64,
    /// For a relayed push: what became of every node of the relay plan.
    pub relayed: Vec<Relayed>,
    /// Where the daemon's time went, phase by phase (at most [`MAX_PHASES`]), for
    /// `relsync bench` and `--json`; the client checks only the bounds.
    pub phases: Vec<PhaseTime>,
    /// What the daemon process used, for the same; zero when it does not say.
    pub usage: Usage,
    /// The release that was current when the push opened the app (`None`: there was none):
    /// the one a fleet returns the host to if its wave fails, learned without asking.
    pub previous: Option<ReleaseId>,
}

/// Resources of a daemon process, as it measured them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// CPU time (user + system) of the whole process from the push's `Hello` to `Staged`: the
    /// push's own when nothing else runs on the daemon.
    pub cpu_micros: u64,
    /// The process's peak resident set size so far, in KiB.
    pub peak_rss_kib: u64,
}

/// Wall time of one phase of work on a daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseTime {
    /// At most [`MAX_PHASE_NAME`] bytes.
    pub name: String,
    pub micros: u64,
}

impl PhaseTime {
    pub fn new(name: &str, d: std::time::Duration) -> PhaseTime {
        PhaseTime {
            name: name.to_owned(),
            micros: u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
        }
    }
}

/// One operation of a mirror plan (`plan::MirrorOp`) as a daemon reports it. Every operation but
/// a removal concerns an entry of the client's own manifest and names it by index, so the client
/// rebuilds the operation from its manifest and a daemon can only report operations on what the
/// client sent; a removal names a path of the destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MirrorStep {
    Remove {
        path: RelPath,
        dir: bool,
    },
    CreateDir {
        entry: u32,
    },
    SetDirMode {
        entry: u32,
    },
    /// The file is written anew; `delta` when the destination's old version was its basis.
    Write {
        entry: u32,
        delta: bool,
    },
    Symlink {
        entry: u32,
    },
}

impl MirrorStep {
    /// The step for `op` of a plan made from `src`; `None` when `op` names an entry that `src`
    /// does not have (a planner bug, not something a peer sent).
    pub fn of(op: &MirrorOp, src: &Manifest) -> Option<MirrorStep> {
        let entry = |path: &RelPath| {
            src.entries()
                .binary_search_by(|e| e.path.cmp(path))
                .ok()
                .and_then(|i| u32::try_from(i).ok())
        };
        Some(match op {
            MirrorOp::Remove { path, dir } => MirrorStep::Remove {
                path: path.clone(),
                dir: *dir,
            },
            MirrorOp::CreateDir { path, .. } => MirrorStep::CreateDir {
                entry: entry(path)?,
            },
            MirrorOp::SetDirMode { path, .. } => MirrorStep::SetDirMode {
                entry: entry(path)?,
            },
            MirrorOp::Write { path, basis, .. } => MirrorStep::Write {
                entry: entry(path)?,
                delta: basis.is_some(),
            },
            MirrorOp::Symlink { path, .. } => MirrorStep::Symlink {
                entry: entry(path)?,
            },
        })
    }

    /// The operation this step stands for in a plan made from `src`, or why it cannot be one (an
    /// index out of range, or naming an entry of another kind).
    pub fn to_op(&self, src: &Manifest) -> Result<MirrorOp, String> {
        let entry = |i: u32| {
            src.entries().get(i as usize).ok_or_else(|| {
                format!(
                    "plan names entry {i} but the manifest has {} entries",
                    src.len()
                )
            })
        };
        let wrong = |e: &Entry, want: &str| {
            format!("plan step for {} expects a {want}, which it is not", e.path)
        };
        Ok(match self {
            MirrorStep::Remove { path, dir } => MirrorOp::Remove {
                path: path.clone(),
                dir: *dir,
            },
            MirrorStep::CreateDir { entry: i } | MirrorStep::SetDirMode { entry: i } => {
                let e = entry(*i)?;
                let EntryKind::Dir { mode } = e.kind else {
                    return Err(wrong(e, "directory"));
                };
                let path = e.path.clone();
                if matches!(self, MirrorStep::CreateDir { .. }) {
                    MirrorOp::CreateDir { path, mode }
                } else {
                    MirrorOp::SetDirMode { path, mode }
                }
            }
            MirrorStep::Write { entry: i, delta } => {
                let e = entry(*i)?;
                let EntryKind::File { size, mode, hash } = e.kind else {
                    return Err(wrong(e, "file"));
                };
                MirrorOp::Write {
                    path: e.path.clone(),
                    size,
                    mode,
                    hash,
                    basis: delta.then(|| e.path.clone()),
                }
            }
            MirrorStep::Symlink { entry: i } => {
                let e = entry(*i)?;
                let EntryKind::Symlink { target } = &e.kind else {
                    return Err(wrong(e, "symlink"));
                };
                MirrorOp::Symlink {
                    path: e.path.clone(),
                    target: target.clone(),
                }
            }
        })
    }

    /// The entry index of a step on the client's manifest; `None` for a removal.
    pub fn entry(&self) -> Option<u32> {
        match self {
            MirrorStep::Remove { .. } => None,
            MirrorStep::CreateDir { entry }
            | MirrorStep::SetDirMode { entry }
            | MirrorStep::Write { entry, .. }
            | MirrorStep::Symlink { entry } => Some(*entry),
        }
    }

    /// A bound on the step's encoded size.
    pub fn max_encoded_len(&self) -> usize {
        match self {
            MirrorStep::Remove { path, .. } => 1 + 10 + path.as_str().len() + 1,
            _ => 1 + 5 + 1,
        }
    }
}

/// What the daemon reports once a sync is done (or, for a dry run, planned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Synced {
    /// The plan's summary.
    pub summary: MirrorSummary,
    /// What applying it did; `None` for a dry run.
    pub applied: Option<MirrorStats>,
    /// Steps sent in [`DaemonMsg::MirrorPlan`] pieces before this message.
    pub steps: u64,
    /// Files received over the network, and their payload bytes.
    pub received: u64,
    pub received_bytes: u64,
}

/// The role of a release among the app's releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReleaseStatus {
    Current,
    Rollback,
    Good,
    Bad,
}

/// One line of [`DaemonMsg::Releases`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseInfo {
    pub id: ReleaseId,
    pub status: ReleaseStatus,
    pub created_unix: i64,
    pub files: u64,
    pub bytes: u64,
    pub manifest: Hash,
}

/// What the prune after an activation did; the activation stands either way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pruning {
    /// These releases were removed (none when nothing lay beyond `keep`).
    Removed(Vec<ReleaseId>),
    /// Pruning failed, for this reason (at most [`MAX_ERROR_MESSAGE`] bytes).
    Failed(String),
}

/// What went wrong, as told to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorKind {
    Version,
    Unauthorized,
    Busy,
    BadRequest,
    FrameTooLarge,
    Limit,
    Timeout,
    Verify,
    NoSpace,
    NotFound,
    Internal,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Version => "version mismatch",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Busy => "busy",
            ErrorKind::BadRequest => "bad request",
            ErrorKind::FrameTooLarge => "frame too large",
            ErrorKind::Limit => "limit exceeded",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Verify => "verification failed",
            ErrorKind::NoSpace => "no space",
            ErrorKind::NotFound => "not found",
            ErrorKind::Internal => "internal error",
        })
    }
}

/// Messages on the control stream from daemon to client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DaemonMsg {
    /// Answer to `Hello` once the client is authorized (and, for a push, the lock is taken).
    Welcome {
        version: u16,
        limits: Limits,
        /// The daemon holds the basis manifest named in `Command::Push`.
        manifest_basis: bool,
    },
    /// The daemon gives up; the connection closes after it.
    Error {
        kind: ErrorKind,
        message: String,
    },
    /// A piece of the list of needed files; `have_*` (the same in every piece) count what the
    /// daemon already had.
    Need {
        files: Vec<NeedFile>,
        last: bool,
        have_files: u64,
        have_bytes: u64,
    },
    /// The rsync signature of a file's basis; empty when the daemon cannot provide one (basis
    /// unusable, or the signature would not fit the client's `max_frame`): send the file in full.
    Signature {
        file: u32,
        #[serde(with = "bytes")]
        data: Vec<u8>,
    },
    Staged(Staged),
    /// `release` is current. `pruned` says what the prune that followed did, when one did (an
    /// activating push, or `Command::Activate` with `prune`).
    Activated {
        release: ReleaseId,
        pruned: Option<Pruning>,
    },
    Releases {
        list: Vec<ReleaseInfo>,
    },
    Pruned {
        removed: Vec<ReleaseId>,
    },
    /// A piece of the plan of a sync, in plan order; any number of pieces precede `Synced`.
    MirrorPlan {
        steps: Vec<MirrorStep>,
    },
    /// The sync is done (or planned, for a dry run); the daemon's last message.
    Synced(Synced),
}

impl DaemonMsg {
    /// Variant name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            DaemonMsg::Welcome { .. } => "Welcome",
            DaemonMsg::Error { .. } => "Error",
            DaemonMsg::Need { .. } => "Need",
            DaemonMsg::Signature { .. } => "Signature",
            DaemonMsg::Staged(_) => "Staged",
            DaemonMsg::Activated { .. } => "Activated",
            DaemonMsg::Releases { .. } => "Releases",
            DaemonMsg::Pruned { .. } => "Pruned",
            DaemonMsg::MirrorPlan { .. } => "MirrorPlan",
            DaemonMsg::Synced(_) => "Synced",
        }
    }
}

impl ClientMsg {
    /// Variant name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            ClientMsg::Hello { .. } => "Hello",
            ClientMsg::ManifestChunk { .. } => "ManifestChunk",
            ClientMsg::SignatureRequest { .. } => "SignatureRequest",
            ClientMsg::Done { .. } => "Done",
            ClientMsg::Activate { .. } => "Activate",
        }
    }
}

/// Opens every file payload on a file stream; exactly `payload_len` raw bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHeader {
    pub file: u32,
    pub format: DeltaFormat,
    /// The basis the payload was computed against (required unless `format` is `Full`).
    pub basis: Option<Hash>,
    pub payload_len: u64,
}

/// A message that travels in a frame.
pub trait Message: Serialize + DeserializeOwned {
    /// What to call it in errors.
    const WHAT: &'static str;

    /// The message as a complete frame (length prefix included).
    fn frame(&self) -> Vec<u8> {
        encode_frame(self)
    }
}

impl Message for ClientMsg {
    const WHAT: &'static str = "client message";
}

impl Message for DaemonMsg {
    const WHAT: &'static str = "daemon message";
}

impl Message for FileHeader {
    const WHAT: &'static str = "file header";
}

/// Largest payload accepted for a file of `size` bytes in any format: zstd's worst-case
/// expansion of the file (or of an rsync delta of it, itself at most `size/64 + 64` over the
/// file) stays well inside `size/32 + 1 MiB`.
pub fn max_payload_len(size: u64) -> u64 {
    size.saturating_add(size / 32).saturating_add(1 << 20)
}

/// `msg` as a frame: length prefix, then postcard.
pub fn encode_frame<T: Serialize + ?Sized>(msg: &T) -> Vec<u8> {
    let mut out = postcard::to_extend(msg, vec![0u8; FRAME_HEADER_LEN])
        .expect("serializing owned data to a Vec cannot fail");
    let len = u32::try_from(out.len() - FRAME_HEADER_LEN)
        .expect("callers keep messages under MAX_MAX_FRAME");
    out[..FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    out
}

/// Decodes one frame body (without its length prefix) as a `T`.
pub fn decode<T: Message>(frame: &[u8]) -> Result<T, WireError> {
    let (msg, rest) = postcard::take_from_bytes::<T>(frame).map_err(|e| WireError::Decode {
        what: T::WHAT,
        detail: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(WireError::Trailing {
            what: T::WHAT,
            extra: rest.len(),
        });
    }
    Ok(msg)
}

/// The protocol version of a frame body holding a `Hello` or a `Welcome` (variant 0 of either
/// direction), read without decoding the rest, which may follow another version's layout.
pub fn peek_version(frame: &[u8]) -> Option<u16> {
    let (variant, rest) = postcard::take_from_bytes::<u32>(frame).ok()?;
    if variant != 0 {
        return None;
    }
    postcard::take_from_bytes::<u16>(rest).ok().map(|(v, _)| v)
}

/// Splits a byte stream into frames, checking each length before buffering its body.
#[derive(Debug)]
pub struct FrameDecoder {
    max_frame: u32,
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    /// Declared length and bytes so far of the frame being read, once its header is complete.
    body: Option<(usize, Vec<u8>)>,
    failed: Option<WireError>,
}

impl FrameDecoder {
    /// A decoder refusing frames over `max_frame` bytes (capped at [`MAX_MAX_FRAME`]).
    pub fn new(max_frame: u32) -> FrameDecoder {
        FrameDecoder {
            max_frame: max_frame.min(MAX_MAX_FRAME),
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            body: None,
            failed: None,
        }
    }

    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// Consumes bytes from the front of `input` until one frame is complete and returns its body;
    /// `Ok(None)` once `input` is empty with no frame complete. Call again until `Ok(None)`.
    ///
    /// After an error the stream is unusable and every later call returns the same error.
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<Vec<u8>>, WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.body.is_none() {
            let take = (FRAME_HEADER_LEN - self.header_len).min(input.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&input[..take]);
            self.header_len += take;
            *input = &input[take..];
            if self.header_len < FRAME_HEADER_LEN {
                return Ok(None);
            }
            let len = u32::from_be_bytes(self.header);
            if len > self.max_frame {
                let e = WireError::FrameTooLarge {
                    len: u64::from(len),
                    max: self.max_frame,
                };
                self.failed = Some(e.clone());
                return Err(e);
            }
            self.body = Some((len as usize, Vec::new()));
        }
        let (len, buf) = self.body.as_mut().expect("set above");
        let take = (*len - buf.len()).min(input.len());
        buf.extend_from_slice(&input[..take]);
        *input = &input[take..];
        if buf.len() < *len {
            return Ok(None);
        }
        let (_, frame) = self.body.take().expect("set above");
        self.header_len = 0;
        Ok(Some(frame))
    }

    /// Whether no partial frame is buffered.
    pub fn is_idle(&self) -> bool {
        self.header_len == 0 && self.body.is_none()
    }

    /// Bytes of the partial frame currently buffered.
    pub fn buffered(&self) -> usize {
        match &self.body {
            Some((_, buf)) => buf.len(),
            None => self.header_len,
        }
    }

    /// Checks that the stream ended on a frame boundary.
    pub fn finish(&self) -> Result<(), WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match &self.body {
            Some((len, buf)) => Err(WireError::Truncated {
                have: buf.len() as u64,
                need: *len as u64,
            }),
            None if self.header_len > 0 => Err(WireError::Truncated {
                have: self.header_len as u64,
                need: FRAME_HEADER_LEN as u64,
            }),
            None => Ok(()),
        }
    }
}

/// Byte strings as postcard byte arrays (length, then the bytes), decoded in one copy rather
/// than element by element.
pub(crate) mod bytes {
    use std::fmt;

    use serde::de::{SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::new();
            while let Some(b) = seq.next_element()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(b: u8) -> Hash {
        Hash::of(&[b])
    }

    fn rid(s: &str) -> ReleaseId {
        ReleaseId::new(s).unwrap()
    }

    fn samples() -> (Vec<ClientMsg>, Vec<DaemonMsg>) {
        let client = vec![
            ClientMsg::Hello {
                version: VERSION,
                app: AppName::new("shop").unwrap(),
                command: Command::Push {
                    release: rid("r1"),
                    manifest_len: 1234,
                    manifest_digest: hash(1),
                    manifest_basis: Some(hash(3)),
                    relay: None,
                },
                max_frame: 1 << 20,
            },
            ClientMsg::Hello {
                version: VERSION,
                app: AppName::new("shop").unwrap(),
                command: Command::Push {
                    release: rid("r2"),
                    manifest_len: 12,
                    manifest_digest: hash(4),
                    manifest_basis: None,
                    relay: Some(crate::relay::RelayPlan {
                        ticket: vec![9; 100],
                        nodes: vec![crate::relay::RelayNode {
                            host: "198.18.0.12:7171".into(),
                            key: [5; 32],
                            parent: None,
                            ticket: vec![8; 100],
                        }],
                    }),
                },
                max_frame: 1 << 20,
            },
            ClientMsg::Hello {
                version: VERSION,
                app: AppName::new("shop").unwrap(),
                command: Command::Sync {
                    export: AppName::new("media").unwrap(),
                    subpath: Some(RelPath::new("img/2024").unwrap()),
                    delete: true,
                    dry_run: false,
                    excludes: vec!["*.log".into(), "/tmp/".into()],
                    manifest_len: 9,
                    manifest_digest: hash(2),
                },
                max_frame: MIN_MAX_FRAME,
            },
            ClientMsg::ManifestChunk {
                data: vec![0, 1, 2, 255],
                last: true,
            },
            ClientMsg::SignatureRequest {
                files: vec![0, 7, u32::MAX],
            },
            ClientMsg::Done { files_sent: 3 },
            ClientMsg::Activate { release: rid("r1") },
            ClientMsg::Hello {
                version: VERSION,
                app: AppName::new("shop").unwrap(),
                command: Command::Activate {
                    release: rid("r1"),
                    prune: false,
                },
                max_frame: MIN_MAX_FRAME,
            },
            ClientMsg::Hello {
                version: VERSION,
                app: AppName::new("shop").unwrap(),
                command: Command::Activate {
                    release: rid("r1"),
                    prune: true,
                },
                max_frame: MIN_MAX_FRAME,
            },
        ];
        let daemon = vec![
            DaemonMsg::Welcome {
                version: VERSION,
                limits: Limits::default(),
                manifest_basis: true,
            },
            DaemonMsg::Error {
                kind: ErrorKind::Busy,
                message: "app shop is busy".into(),
            },
            DaemonMsg::Need {
                files: vec![
                    NeedFile {
                        file: 0,
                        basis: None,
                    },
                    NeedFile {
                        file: 9,
                        basis: Some(BasisRef {
                            hash: hash(3),
                            size: 77,
                        }),
                    },
                ],
                last: false,
                have_files: 5,
                have_bytes: 500,
            },
            DaemonMsg::Signature {
                file: 9,
                data: vec![1; 40],
            },
            DaemonMsg::Staged(Staged {
                release: rid("r1"),
                files: 10,
                bytes: 1000,
                linked: 8,
                received: 2,
                received_bytes: 99,
                phases: vec![PhaseTime::new(
                    "verify",
                    std::time::Duration::from_micros(1500),
                )],
                usage: Usage {
                    cpu_micros: 12_345,
                    peak_rss_kib: 40_960,
                },
                relayed: vec![
                    Relayed::staged(0, Some(rid("r0"))),
                    Relayed::staged(2, None),
                    Relayed::new(1, Some("connection lost".into())),
                ],
                previous: Some(rid("r0")),
            }),
            DaemonMsg::Activated {
                release: rid("r1"),
                pruned: None,
            },
            DaemonMsg::Activated {
                release: rid("r1"),
                pruned: Some(Pruning::Removed(vec![rid("r0"), rid("old")])),
            },
            DaemonMsg::Activated {
                release: rid("r1"),
                pruned: Some(Pruning::Failed("no space left".into())),
            },
            DaemonMsg::Releases {
                list: vec![ReleaseInfo {
                    id: rid("r0"),
                    status: ReleaseStatus::Rollback,
                    created_unix: -5,
                    files: 1,
                    bytes: 2,
                    manifest: hash(4),
                }],
            },
            DaemonMsg::Pruned {
                removed: vec![rid("old")],
            },
            DaemonMsg::MirrorPlan {
                steps: vec![
                    MirrorStep::Remove {
                        path: RelPath::new("old/dir").unwrap(),
                        dir: true,
                    },
                    MirrorStep::CreateDir { entry: 0 },
                    MirrorStep::SetDirMode { entry: 1 },
                    MirrorStep::Write {
                        entry: u32::MAX,
                        delta: true,
                    },
                    MirrorStep::Symlink { entry: 7 },
                ],
            },
            DaemonMsg::Synced(Synced {
                summary: MirrorSummary {
                    files: 3,
                    bytes: 30,
                    written_files: 1,
                    ..MirrorSummary::default()
                },
                applied: Some(MirrorStats {
                    removed: 1,
                    written_files: 1,
                    written_bytes: 10,
                    dirs: 0,
                }),
                steps: 5,
                received: 1,
                received_bytes: 9,
            }),
        ];
        (client, daemon)
    }

    #[test]
    fn every_message_round_trips_through_a_frame() {
        let (client, daemon) = samples();
        for m in client {
            let frame = m.frame();
            let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
            assert_eq!(len, frame.len() - 4, "{m:?}");
            assert_eq!(decode::<ClientMsg>(&frame[4..]).unwrap(), m);
        }
        for m in daemon {
            let frame = m.frame();
            assert_eq!(decode::<DaemonMsg>(&frame[4..]).unwrap(), m);
        }
        let h = FileHeader {
            file: 3,
            format: DeltaFormat::Rsync,
            basis: Some(hash(5)),
            payload_len: u64::MAX,
        };
        let frame = h.frame();
        assert!(frame.len() <= MAX_FILE_HEADER as usize);
        assert_eq!(decode::<FileHeader>(&frame[4..]).unwrap(), h);
    }

    #[test]
    fn mirror_steps_stand_for_operations_on_the_clients_manifest() {
        use crate::manifest::Policy;
        use crate::plan::plan_mirror;
        let m = |entries| Manifest::from_unsorted(entries, &Policy::default()).unwrap();
        let src = m(vec![
            Entry::dir("a", 0o750).unwrap(),
            Entry::file("a/f", 3, 0o644, hash(1)).unwrap(),
            Entry::dir("b", 0o755).unwrap(),
            Entry::file("b/new", 4, 0o600, hash(2)).unwrap(),
            Entry::symlink("l", "a/f").unwrap(),
        ]);
        let dst = m(vec![
            Entry::dir("a", 0o755).unwrap(),
            Entry::file("a/f", 3, 0o644, hash(3)).unwrap(),
            Entry::file("gone", 1, 0o644, hash(4)).unwrap(),
        ]);
        let plan = plan_mirror(&src, &dst, true);
        let kinds: Vec<&str> = plan
            .ops
            .iter()
            .map(|op| match op {
                MirrorOp::Remove { .. } => "rm",
                MirrorOp::CreateDir { .. } => "mkdir",
                MirrorOp::SetDirMode { .. } => "chmod",
                MirrorOp::Write { basis: Some(_), .. } => "delta",
                MirrorOp::Write { .. } => "write",
                MirrorOp::Symlink { .. } => "symlink",
            })
            .collect();
        assert_eq!(kinds, ["rm", "chmod", "mkdir", "delta", "write", "symlink"]);
        for op in &plan.ops {
            let step = MirrorStep::of(op, &src).unwrap();
            assert_eq!(step.to_op(&src).as_ref(), Ok(op));
            let frame = encode_frame(&step);
            assert!(frame.len() - 4 <= step.max_encoded_len(), "{step:?}");
        }
        // Only what the client's manifest holds, as the kind it is there.
        let table = [
            MirrorStep::Write {
                entry: 0,
                delta: false,
            },
            MirrorStep::CreateDir { entry: 1 },
            MirrorStep::SetDirMode { entry: 4 },
            MirrorStep::Symlink { entry: 3 },
            MirrorStep::Write {
                entry: 5,
                delta: true,
            },
            MirrorStep::CreateDir { entry: u32::MAX },
        ];
        for step in table {
            assert!(step.to_op(&src).is_err(), "{step:?}");
        }
        let foreign = MirrorOp::CreateDir {
            path: RelPath::new("zzz").unwrap(),
            mode: 0o755,
        };
        assert_eq!(MirrorStep::of(&foreign, &src), None);
    }

    #[test]
    fn byte_strings_are_length_and_raw_bytes() {
        let m = ClientMsg::ManifestChunk {
            data: vec![0xAA; 3],
            last: true,
        };
        // Variant 1, length 3, the bytes, `true`.
        assert_eq!(&m.frame()[4..], &[1, 3, 0xAA, 0xAA, 0xAA, 1]);
    }

    #[test]
    fn an_activation_asks_for_its_prune_in_a_trailing_flag() {
        for prune in [false, true] {
            let cmd = Command::Activate {
                release: rid("r1"),
                prune,
            };
            // Variant 2, the release as a string, then the flag.
            assert_eq!(
                &encode_frame(&cmd)[4..],
                &[2, 2, b'r', b'1', u8::from(prune)]
            );
        }
    }

    #[test]
    fn versions_can_be_read_from_any_hello_or_welcome() {
        let (client, daemon) = samples();
        assert_eq!(peek_version(&client[0].frame()[4..]), Some(VERSION));
        assert_eq!(peek_version(&daemon[0].frame()[4..]), Some(VERSION));
        assert_eq!(peek_version(&client[1].frame()[4..]), Some(VERSION));
        assert_eq!(peek_version(&client[3].frame()[4..]), None);
        // A future Hello: the next version, then fields this version cannot read.
        let future = [0u8, VERSION as u8 + 1, 0xFF, 0xFF];
        assert_eq!(peek_version(&future), Some(VERSION + 1));
        assert!(decode::<ClientMsg>(&future).is_err());
        assert_eq!(peek_version(&[]), None);
    }

    #[test]
    fn invalid_bodies_are_typed_errors() {
        let valid = ClientMsg::Done { files_sent: 1 }.frame();
        let mut trailing = valid[4..].to_vec();
        trailing.push(0);
        let bad_app = {
            // Hello with app "../x".
            let mut b = vec![0u8, 1, 4];
            b.extend_from_slice(b"../x");
            b.extend_from_slice(&[1, 0x80, 0x80, 0x04]);
            b
        };
        let bad_release = {
            let mut b = vec![4u8, 9];
            b.extend_from_slice(b"x.staging");
            b
        };
        let table: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("unknown variant", vec![42]),
            ("truncated varint", vec![3, 0x80]),
            ("bad app name", bad_app),
            ("reserved release id", bad_release),
            ("huge byte length", vec![1, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]),
        ];
        for (name, body) in table {
            assert!(
                matches!(decode::<ClientMsg>(&body), Err(WireError::Decode { .. })),
                "{name}"
            );
        }
        assert_eq!(
            decode::<ClientMsg>(&trailing),
            Err(WireError::Trailing {
                what: "client message",
                extra: 1
            })
        );
    }

    #[test]
    fn decoder_splits_frames_across_any_chunking() {
        let (client, _) = samples();
        let stream: Vec<u8> = client.iter().flat_map(|m| m.frame()).collect();
        for chunk in [1, 2, 3, 5, 64, stream.len()] {
            let mut dec = FrameDecoder::new(1 << 20);
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                let mut input = piece;
                while let Some(frame) = dec.decode(&mut input).unwrap() {
                    got.push(decode::<ClientMsg>(&frame).unwrap());
                }
                assert!(input.is_empty());
            }
            assert!(dec.is_idle());
            dec.finish().unwrap();
            assert_eq!(got, client, "chunk {chunk}");
        }
    }

    #[test]
    fn oversized_frames_fail_before_any_buffering() {
        let mut dec = FrameDecoder::new(100);
        let mut input: &[u8] = &[0, 0, 0, 101, 1, 2, 3];
        assert_eq!(
            dec.decode(&mut input),
            Err(WireError::FrameTooLarge { len: 101, max: 100 })
        );
        assert_eq!(dec.buffered(), 4);
        // The stream stays failed.
        let mut more: &[u8] = &[0, 0, 0, 1, 0];
        assert!(matches!(
            dec.decode(&mut more),
            Err(WireError::FrameTooLarge { .. })
        ));
        // A frame of exactly max_frame is fine; u32::MAX is refused with the cap applied.
        let mut dec = FrameDecoder::new(u32::MAX);
        assert_eq!(dec.max_frame(), MAX_MAX_FRAME);
        let mut input: &[u8] = &[0xFF, 0xFF, 0xFF, 0xFF];
        assert!(matches!(
            dec.decode(&mut input),
            Err(WireError::FrameTooLarge { len, .. }) if len == u64::from(u32::MAX)
        ));
        let mut dec = FrameDecoder::new(3);
        let mut input: &[u8] = &[0, 0, 0, 3, 7, 8, 9];
        assert_eq!(dec.decode(&mut input), Ok(Some(vec![7, 8, 9])));
    }

    #[test]
    fn a_declared_length_costs_only_what_arrives() {
        let mut dec = FrameDecoder::new(MAX_MAX_FRAME);
        let mut input: &[u8] = &[0x3F, 0xFF, 0xFF, 0xFF, 1, 2];
        assert_eq!(dec.decode(&mut input), Ok(None));
        assert_eq!(dec.buffered(), 2);
        let Some((_, buf)) = &dec.body else {
            panic!("body expected")
        };
        assert!(buf.capacity() < 1024, "capacity {}", buf.capacity());
    }

    #[test]
    fn truncated_streams_are_reported_at_the_end() {
        let table: Vec<(&[u8], Result<(), WireError>)> = vec![
            (&[], Ok(())),
            (&[0, 0], Err(WireError::Truncated { have: 2, need: 4 })),
            (
                &[0, 0, 0, 5, 1],
                Err(WireError::Truncated { have: 1, need: 5 }),
            ),
            (&[0, 0, 0, 1, 1], Ok(())),
            (&[0, 0, 0, 0], Ok(())),
        ];
        for (bytes, want) in table {
            let mut dec = FrameDecoder::new(10);
            let mut input = bytes;
            while dec.decode(&mut input).unwrap().is_some() {}
            assert_eq!(dec.finish(), want, "{bytes:?}");
        }
    }

    #[test]
    fn app_names_are_validated() {
        for ok in ["shop", "a", "my-app_2.0", &"x".repeat(64)] {
            assert!(AppName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "a/b",
            "a b",
            "ü",
            &"x".repeat(65),
            "..",
            "a\n",
        ] {
            assert!(AppName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn payload_bound_covers_incompressible_content() {
        for size in [0usize, 1, 1000, 200_000, 3 << 20] {
            let data: Vec<u8> = (0..size)
                .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
                .collect();
            let mut out = Vec::new();
            let enc = crate::delta::encode_full(&data, &mut out).unwrap();
            assert!(
                enc.payload_len <= max_payload_len(size as u64),
                "size {size}"
            );
        }
        assert_eq!(max_payload_len(u64::MAX), u64::MAX);
    }
}

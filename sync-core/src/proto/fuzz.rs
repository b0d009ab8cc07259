//! Entry points shared by the cargo-fuzz targets in `fuzz/` and the corpus replay test.
//!
//! Each function reads arbitrary bytes as what a peer sends, runs the decoder or session with a
//! minimal driver that answers every request, and panics only if an invariant breaks, so any
//! panic is a finding: a frame over the limit, a message that does not survive re-encoding, a
//! daemon that asks to build a release before every needed file arrived, a client that reports
//! success for a push the daemon never confirmed or reads a file outside its manifest.
//!
//! Session inputs are records: `[tag][len: u32 LE][bytes]`, read zero-padded past the end. The
//! tag's low bit selects the stream (0: control bytes, 1: a file header frame body, daemon side
//! only) and its other bits advance the simulated clock by that many seconds first. The input of
//! [`client_sync_one`] starts with one byte choosing a dry run (odd) or a real sync (even).

use std::collections::HashSet;
use std::sync::Arc;

use super::client::{self, ClientConfig, ClientSession, PushJob, SyncJob};
use super::daemon::{self, compute_need, DaemonSession, Event};
use crate::delta::{BasisSignature, DeltaFormat};
use crate::manifest::{Entry, Hash, Manifest, Policy};
use crate::plan::{plan_mirror, MirrorStats};
use crate::release::ReleaseId;
use crate::wire::{
    decode, encode_frame, AppName, ClientMsg, DaemonMsg, ErrorKind, FileHeader, FrameDecoder,
    Limits, Message, ReleaseInfo, WireError, MAX_FILE_HEADER, MIN_MAX_FRAME,
};

/// Tag bit of a file header record.
pub const FILE_RECORD: u8 = 1;

/// Limits of the fuzzed daemon: small, so the fuzzer reaches them.
pub fn fuzz_limits() -> Limits {
    Limits {
        max_frame: MIN_MAX_FRAME,
        max_manifest_entries: 64,
        max_manifest_bytes: 16 * 1024,
        max_streams: 4,
        max_bytes_in_flight: 4096,
        message_timeout_ms: 30_000,
        push_timeout_ms: 600_000,
    }
}

/// The release the fuzzed client pushes: a few files, one large enough for an rsync basis.
pub fn fuzz_manifest() -> Manifest {
    let f = |p: &str, size: u64, seed: &[u8]| Entry::file(p, size, 0o644, Hash::of(seed)).unwrap();
    Manifest::from_unsorted(
        vec![
            Entry::dir("src", 0o755).unwrap(),
            f("index.php", 120, b"index v2"),
            f("src/a.php", 3000, b"a v2"),
            f("src/b.php", 3000, b"b"),
            f("src/big.bin", 200_000, b"big v2"),
            f("src/copy.php", 3000, b"b"),
            Entry::symlink("latest", "src/a.php").unwrap(),
        ],
        &Policy::default(),
    )
    .expect("a valid manifest")
}

/// What the fuzzed daemon's current release holds: older versions of the same paths.
pub fn fuzz_current() -> Manifest {
    let f = |p: &str, size: u64, seed: &[u8]| Entry::file(p, size, 0o644, Hash::of(seed)).unwrap();
    Manifest::from_unsorted(
        vec![
            Entry::dir("src", 0o755).unwrap(),
            f("index.php", 100, b"index v1"),
            f("src/b.php", 3000, b"b"),
            f("src/big.bin", 190_000, b"big v1"),
        ],
        &Policy::default(),
    )
    .expect("a valid manifest")
}

fn release() -> ReleaseId {
    ReleaseId::new("r2").expect("valid id")
}

/// Reads records from the front of a fuzz input, zero-padding past its end.
struct Records<'a>(&'a [u8]);

impl<'a> Iterator for Records<'a> {
    type Item = (u8, &'a [u8]);

    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.0.split_first()?;
        let mut len = [0u8; 4];
        let n = rest.len().min(4);
        len[..n].copy_from_slice(&rest[..n]);
        let rest = &rest[n..];
        let len = (u32::from_le_bytes(len) as usize).min(rest.len());
        let (body, rest) = rest.split_at(len);
        self.0 = rest;
        Some((tag, body))
    }
}

/// Appends one record to a session input.
pub fn record(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
}

/// Fuzz [`FrameDecoder`] and message decoding: byte 0 picks `max_frame` (64 × (1 + byte)), byte
/// 1 the chunk size the rest arrives in.
///
/// Panics if a frame exceeds `max_frame`, if more than one frame is buffered, or if a decoded
/// message decodes differently after re-encoding.
pub fn frame_decode_one(data: &[u8]) -> Result<usize, WireError> {
    let max = 64 * (1 + u32::from(data.first().copied().unwrap_or(0)));
    let chunk = usize::from(data.get(1).copied().unwrap_or(0)).max(1);
    let stream = data.get(2..).unwrap_or(&[]);
    let mut dec = FrameDecoder::new(max);
    let mut frames = 0;
    for piece in stream.chunks(chunk) {
        let mut input = piece;
        while let Some(frame) = dec.decode(&mut input)? {
            assert!(frame.len() <= max as usize, "frame over max_frame");
            frames += 1;
            round_trip::<ClientMsg>(&frame);
            round_trip::<DaemonMsg>(&frame);
            round_trip::<FileHeader>(&frame);
        }
        assert!(input.is_empty(), "decoder left input unread");
        assert!(
            dec.buffered() <= max as usize,
            "decoder buffers beyond a frame"
        );
    }
    dec.finish()?;
    Ok(frames)
}

fn round_trip<T: Message + PartialEq + std::fmt::Debug>(frame: &[u8]) {
    if let Ok(msg) = decode::<T>(frame) {
        let again = encode_frame(&msg);
        assert_eq!(
            decode::<T>(&again[4..]).as_ref(),
            Ok(&msg),
            "re-encoding changed the message"
        );
    }
}

/// What the fuzzed daemon's driver saw.
#[derive(Debug, Default)]
pub struct DaemonRun {
    pub needed: usize,
    pub received: usize,
    pub staged: bool,
    /// A sync was applied or, for a dry run, planned.
    pub mirrored: bool,
    pub frames: Vec<DaemonMsg>,
}

/// Fuzz [`DaemonSession`] with arbitrary client bytes (see the module doc for the layout),
/// answering every request as a healthy driver would.
///
/// Panics if the session sends a frame that is not a daemon message, asks to stage or apply a
/// sync before every needed file was received and verified (or, for a dry run, after receiving
/// any), admits payloads beyond the budget, or ends without a final `Error` frame on failure.
pub fn daemon_session_one(data: &[u8]) -> DaemonRun {
    let limits = fuzz_limits();
    let current = fuzz_current();
    let mut s = DaemonSession::new(limits, 0);
    let mut run = DaemonRun::default();
    let mut now = 0u64;
    let mut biggest_payload = 0;
    for (tag, body) in Records(data) {
        now += u64::from(tag >> 1) * 1000;
        s.handle_timeout(now);
        if tag & FILE_RECORD == 0 {
            s.handle_control(body, now);
        } else {
            if let Ok(h) = decode::<FileHeader>(body) {
                biggest_payload = biggest_payload.max(h.payload_len);
            }
            s.accept_file(body, now);
        }
        daemon_drive(&mut s, &mut run, &current, now);
        assert!(
            s.bytes_in_flight() <= limits.max_bytes_in_flight.max(biggest_payload),
            "payloads admitted beyond the budget"
        );
    }
    s.handle_control_end(now);
    daemon_drive(&mut s, &mut run, &current, now);
    assert!(s.is_finished(), "a closed control stream ends the session");
    if let Some(Err(_)) = s.outcome() {
        assert!(
            matches!(run.frames.last(), Some(DaemonMsg::Error { .. })),
            "failure without an Error frame"
        );
    }
    run
}

fn daemon_drive(s: &mut DaemonSession, run: &mut DaemonRun, current: &Manifest, now: u64) {
    loop {
        let mut moved = false;
        while let Some(r) = s.poll_request() {
            moved = true;
            match r {
                daemon::Request::Open { .. } => s.handle_event(
                    Event::Opened {
                        policy: Policy::default(),
                        manifest_basis: Some(current.encode()),
                    },
                    now,
                ),
                daemon::Request::ComputeNeed { manifest, .. }
                | daemon::Request::ComputeMirrorNeed { manifest, .. } => {
                    let need = compute_need(&manifest, Some(current), |h| {
                        current.files().any(|(_, _, _, c)| c == h)
                    });
                    run.needed = need.files.len();
                    s.handle_event(Event::Need(need), now);
                }
                daemon::Request::Signatures { files } => {
                    for j in files {
                        let basis = vec![0u8; j.basis.size.min(1 << 20) as usize];
                        let data = Some(BasisSignature::calculate(&basis).as_bytes().to_vec());
                        s.handle_event(Event::Signature { file: j.file, data }, now);
                    }
                }
                daemon::Request::Receive(job) => {
                    run.received += 1;
                    s.file_finished(job.file, Ok(()), now);
                }
                daemon::Request::Stage { .. } => {
                    assert_eq!(
                        run.received, run.needed,
                        "stage requested before every needed file arrived"
                    );
                    run.staged = true;
                    s.handle_event(
                        Event::Staged {
                            linked: 0,
                            phases: vec![],
                            relayed: Vec::new(),
                            previous: None,
                        },
                        now,
                    );
                }
                daemon::Request::Mirror {
                    manifest,
                    delete,
                    dry_run,
                } => {
                    let want = if dry_run { 0 } else { run.needed };
                    assert_eq!(
                        run.received, want,
                        "sync applied before every needed file arrived, or a dry run received files"
                    );
                    run.mirrored = true;
                    let plan = plan_mirror(&manifest, current, delete);
                    let applied = (!dry_run).then(MirrorStats::default);
                    s.handle_event(
                        Event::Mirrored {
                            plan: Box::new(plan),
                            applied,
                        },
                        now,
                    );
                }
                daemon::Request::Activate { release, prune } => s.handle_event(
                    Event::Activated {
                        release,
                        pruned: prune.then(|| crate::wire::Pruning::Removed(vec![])),
                    },
                    now,
                ),
                daemon::Request::ListReleases => s.handle_event(
                    Event::Releases(vec![ReleaseInfo {
                        id: release(),
                        status: crate::wire::ReleaseStatus::Current,
                        created_unix: 0,
                        files: 1,
                        bytes: 1,
                        manifest: Hash::of(b""),
                    }]),
                    now,
                ),
                daemon::Request::Rollback { to } => s.handle_event(
                    Event::Activated {
                        release: to.unwrap_or_else(release),
                        pruned: None,
                    },
                    now,
                ),
                daemon::Request::Prune { .. } | daemon::Request::Clear => {
                    s.handle_event(Event::Pruned { removed: vec![] }, now)
                }
            }
        }
        while let Some(f) = s.poll_transmit(now) {
            moved = true;
            let len = u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize;
            assert_eq!(len + 4, f.len(), "frame length prefix");
            run.frames
                .push(decode::<DaemonMsg>(&f[4..]).expect("the daemon sends valid messages"));
        }
        if !moved {
            return;
        }
    }
}

/// What the fuzzed client did.
#[derive(Debug, Default)]
pub struct ClientRun {
    pub files_sent: usize,
    pub frames: Vec<ClientMsg>,
}

/// Fuzz [`ClientSession`] pushing [`fuzz_manifest`] with arbitrary daemon bytes (the records'
/// stream bit is ignored: everything is control bytes).
///
/// Panics if the client sends an invalid or oversized frame, hands out a file outside its
/// manifest or more files at once than allowed, or reports a successful push that the daemon did
/// not stage for the pushed release after every needed file was sent.
pub fn client_session_one(data: &[u8]) -> Result<client::Outcome, ErrorKind> {
    let manifest = Arc::new(fuzz_manifest());
    let config = ClientConfig {
        max_frame: MIN_MAX_FRAME,
        max_streams: 4,
        max_files_out: 4,
        ..ClientConfig::default()
    };
    let job = PushJob {
        release: release(),
        manifest: Arc::clone(&manifest),
        activate: true,
        // The client has its previous index.php, so a ZstdRef is possible.
        cached: HashSet::from([Hash::of(b"index v1")]),
        manifest_basis: Some(fuzz_current().encode()),
        packed_manifest: None,
    };
    let app = AppName::new("fuzz").expect("valid name");
    let mut c = ClientSession::push(config, app, job, 0);
    let mut run = ClientRun::default();
    let mut now = 0u64;
    client_drive(&mut c, &mut run, &manifest, now);
    for (tag, body) in Records(data) {
        now += u64::from(tag >> 1) * 1000;
        c.handle_timeout(now);
        c.handle_control(body, now);
        client_drive(&mut c, &mut run, &manifest, now);
    }
    c.handle_control_end(now);
    client_drive(&mut c, &mut run, &manifest, now);
    let outcome = c
        .outcome()
        .expect("a closed control stream ends the session");
    if let Ok(client::Outcome::Pushed(r)) = outcome {
        assert_eq!(r.release, release(), "success for another release");
        assert_eq!(r.staged.release, release(), "success without Staged");
        assert!(r.activated, "success without Activated");
        assert_eq!(
            r.sent_full + r.sent_zstd_ref + r.sent_rsync,
            r.needed,
            "success before every needed file was sent"
        );
        assert!(
            matches!(run.frames.last(), Some(ClientMsg::Activate { .. })),
            "success without asking for activation"
        );
    }
    match outcome {
        Ok(o) => Ok(o.clone()),
        Err(e) => Err(e.kind()),
    }
}

/// Fuzz [`ClientSession`] syncing [`fuzz_manifest`] into an export with arbitrary daemon bytes;
/// the first input byte picks a dry run (odd) or a real sync (even), the rest are records.
///
/// Panics if the client sends an invalid or oversized frame, hands out a file outside its
/// manifest (or any file in a dry run), or reports success without the daemon's `Synced`, with a
/// plan that is not made of its own manifest's entries, or before every needed file was sent.
pub fn client_sync_one(data: &[u8]) -> Result<client::Outcome, ErrorKind> {
    let dry_run = data.first().is_some_and(|b| b & 1 == 1);
    let manifest = Arc::new(fuzz_manifest());
    let mut c = ClientSession::sync(fuzz_client_config(), sync_job(&manifest, dry_run), 0);
    let mut run = ClientRun::default();
    let mut now = 0u64;
    client_drive(&mut c, &mut run, &manifest, now);
    for (tag, body) in Records(data.get(1..).unwrap_or(&[])) {
        now += u64::from(tag >> 1) * 1000;
        c.handle_timeout(now);
        c.handle_control(body, now);
        client_drive(&mut c, &mut run, &manifest, now);
    }
    c.handle_control_end(now);
    client_drive(&mut c, &mut run, &manifest, now);
    let outcome = c
        .outcome()
        .expect("a closed control stream ends the session");
    if dry_run {
        assert_eq!(run.files_sent, 0, "a dry run sent a file");
    }
    if let Ok(o) = outcome {
        let client::Outcome::Synced(r) = o else {
            panic!("a sync ended with {o:?}")
        };
        assert_eq!(r.dry_run, dry_run);
        assert_eq!(r.applied.is_none(), dry_run, "applied state");
        if !dry_run {
            assert_eq!(
                r.sent_full + r.sent_zstd_ref + r.sent_rsync,
                r.needed,
                "success before every needed file was sent"
            );
        }
        for op in &r.plan.ops {
            if let crate::plan::MirrorOp::Write { path, hash, .. } = op {
                assert!(
                    manifest.files().any(|(p, _, _, h)| p == path && h == hash),
                    "a write of something the client did not send"
                );
            }
        }
    }
    match outcome {
        Ok(o) => Ok(o.clone()),
        Err(e) => Err(e.kind()),
    }
}

fn fuzz_client_config() -> ClientConfig {
    ClientConfig {
        max_frame: MIN_MAX_FRAME,
        max_streams: 4,
        max_files_out: 4,
        ..ClientConfig::default()
    }
}

fn sync_job(manifest: &Arc<Manifest>, dry_run: bool) -> SyncJob {
    SyncJob {
        export: AppName::new("fuzz").expect("valid name"),
        subpath: Some(crate::path::RelPath::new("mirror").expect("valid path")),
        delete: true,
        dry_run,
        excludes: vec!["*.log".into()],
        manifest: Arc::clone(manifest),
        cached: HashSet::from([Hash::of(b"index v1")]),
    }
}

fn client_drive(c: &mut ClientSession, run: &mut ClientRun, manifest: &Manifest, now: u64) {
    let paths: HashSet<&str> = manifest.files().map(|(p, ..)| p.as_str()).collect();
    let mut out = Vec::new();
    loop {
        let mut moved = false;
        while let Some(f) = c.poll_transmit(now) {
            moved = true;
            assert!(
                f.len() - 4 <= MIN_MAX_FRAME as usize,
                "client frame too large"
            );
            run.frames
                .push(decode::<ClientMsg>(&f[4..]).expect("the client sends valid messages"));
        }
        while let Some(client::Request::SendFile(f)) = c.poll_request() {
            moved = true;
            assert!(paths.contains(f.path.as_str()), "file outside the manifest");
            out.push(f);
            assert!(out.len() <= 4, "more files out than max_files_out");
        }
        // Finish the files one by one, as streams complete.
        if let Some(f) = out.pop() {
            moved = true;
            let header = f
                .header(own_format(&f.method), 1)
                .expect("the method allows its own format");
            assert!(header.frame().len() <= MAX_FILE_HEADER as usize);
            run.files_sent += 1;
            c.file_sent(&header, now);
        }
        if !moved {
            return;
        }
    }
}

/// Seeds for the three targets, from a complete push between the two sessions plus broken
/// variants: (target, name, input).
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let (to_daemon, to_client) = conversation();
    let daemon_bytes: Vec<u8> = to_client.concat();
    let mut out = Vec::new();
    out.push((
        "frame_decode",
        "daemon_frames".into(),
        [&[255, 7][..], &daemon_bytes].concat(),
    ));
    let mut client_bytes = Vec::new();
    for (tag, body) in Records(&to_daemon) {
        if tag & FILE_RECORD != 0 {
            // A file header frame, with its length prefix, as it travels on a file stream.
            client_bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
        }
        client_bytes.extend_from_slice(body);
    }
    out.push((
        "frame_decode",
        "client_frames".into(),
        [&[255, 1][..], &client_bytes].concat(),
    ));
    out.push((
        "frame_decode",
        "too_large".into(),
        vec![0, 4, 0, 0, 1, 0, 9],
    ));
    out.push((
        "frame_decode",
        "truncated".into(),
        vec![255, 1, 0, 0, 0, 9, 1],
    ));
    out.push(("frame_decode", "empty".into(), vec![]));

    let records: Vec<(u8, &[u8])> = Records(&to_daemon).collect();
    let rebuild = |recs: &[(u8, &[u8])]| {
        let mut v = Vec::new();
        for (tag, body) in recs {
            record(&mut v, *tag, body);
        }
        v
    };
    out.push(("daemon_session", "push".into(), to_daemon.clone()));
    out.push((
        "daemon_session",
        "cut".into(),
        rebuild(&records[..records.len() / 2]),
    ));
    let mut stalled = rebuild(&records[..1]);
    record(&mut stalled, 60 << 1, &[]);
    out.push(("daemon_session", "stalled".into(), stalled));
    let twice: Vec<(u8, &[u8])> = records
        .iter()
        .flat_map(|r| std::iter::repeat_n(*r, if r.0 & FILE_RECORD != 0 { 2 } else { 1 }))
        .collect();
    out.push(("daemon_session", "file_twice".into(), rebuild(&twice)));
    out.push(("daemon_session", "empty".into(), vec![]));

    let mut push = Vec::new();
    for f in &to_client {
        record(&mut push, 0, f);
    }
    out.push(("client_session", "push".into(), push));
    let mut trickle = Vec::new();
    for b in &daemon_bytes {
        record(&mut trickle, 2, std::slice::from_ref(b));
    }
    out.push(("client_session", "byte_at_a_time".into(), trickle));
    let mut cut = Vec::new();
    for f in &to_client[..to_client.len() / 2] {
        record(&mut cut, 0, f);
    }
    out.push(("client_session", "cut".into(), cut));
    let mut lumped = Vec::new();
    record(&mut lumped, 0, &daemon_bytes);
    out.push(("client_session", "need_before_manifest".into(), lumped));
    out.push(("client_session", "empty".into(), vec![]));

    for (dry_run, name) in [(false, "sync"), (true, "sync_dry_run")] {
        let (to_daemon, to_client) = sync_conversation(dry_run);
        out.push(("daemon_session", name.into(), to_daemon));
        let mut input = vec![u8::from(dry_run)];
        for f in &to_client {
            record(&mut input, 0, f);
        }
        out.push(("client_sync_session", name.into(), input.clone()));
        if !dry_run {
            // The daemon's answer replayed to a client that asked for a dry run: the plan's
            // applied counts and the needed files no longer fit.
            let mut mismatched = input.clone();
            mismatched[0] = 1;
            out.push((
                "client_sync_session",
                "answer_of_another_mode".into(),
                mismatched,
            ));
            let mut cut = vec![0];
            for f in &to_client[..to_client.len() - 1] {
                record(&mut cut, 0, f);
            }
            out.push(("client_sync_session", "no_synced".into(), cut));
        }
    }
    out.push(("client_sync_session", "empty".into(), vec![]));
    out
}

/// A complete push of [`fuzz_manifest`] between the two sessions with the fuzz drivers: the
/// client's records (control bytes and file headers) and the daemon's frames.
pub fn conversation() -> (Vec<u8>, Vec<Vec<u8>>) {
    let manifest = Arc::new(fuzz_manifest());
    let job = PushJob {
        release: release(),
        manifest: Arc::clone(&manifest),
        activate: true,
        cached: HashSet::from([Hash::of(b"index v1")]),
        manifest_basis: Some(fuzz_current().encode()),
        packed_manifest: None,
    };
    let c = ClientSession::push(
        fuzz_client_config(),
        AppName::new("fuzz").expect("valid"),
        job,
        0,
    );
    converse(c)
}

/// A complete sync (or dry run) of [`fuzz_manifest`], as [`conversation`] gives a push.
pub fn sync_conversation(dry_run: bool) -> (Vec<u8>, Vec<Vec<u8>>) {
    let manifest = Arc::new(fuzz_manifest());
    converse(ClientSession::sync(
        fuzz_client_config(),
        sync_job(&manifest, dry_run),
        0,
    ))
}

fn converse(mut c: ClientSession) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut d = DaemonSession::new(fuzz_limits(), 0);
    let current = fuzz_current();
    let mut drun = DaemonRun::default();
    let (mut to_daemon, mut to_client) = (Vec::new(), Vec::new());
    for _ in 0..1000 {
        let mut moved = false;
        while let Some(f) = c.poll_transmit(0) {
            record(&mut to_daemon, 0, &f);
            d.handle_control(&f, 0);
            moved = true;
        }
        while let Some(client::Request::SendFile(f)) = c.poll_request() {
            let header = f.header(own_format(&f.method), 1).expect("own format");
            let frame = header.frame();
            record(&mut to_daemon, FILE_RECORD, &frame[4..]);
            d.accept_file(&frame[4..], 0);
            c.file_sent(&header, 0);
            moved = true;
        }
        let before = drun.frames.len();
        daemon_drive(&mut d, &mut drun, &current, 0);
        for m in &drun.frames[before..] {
            let f = encode_frame(m);
            c.handle_control(&f, 0);
            to_client.push(f);
            moved = true;
        }
        if !moved {
            break;
        }
    }
    (to_daemon, to_client)
}

fn own_format(method: &client::Method) -> DeltaFormat {
    match method {
        client::Method::Full => DeltaFormat::Full,
        client::Method::ZstdRef { .. } => DeltaFormat::ZstdRef,
        client::Method::Rsync { .. } => DeltaFormat::Rsync,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_conversation_is_a_complete_push() {
        let (to_daemon, to_client) = conversation();
        let run = daemon_session_one(&to_daemon);
        assert!(run.staged);
        // index.php (ZstdRef), a.php, big.bin (rsync), b.php's copy is already there.
        assert_eq!((run.needed, run.received), (3, 3));
        assert!(run
            .frames
            .iter()
            .any(|m| matches!(m, DaemonMsg::Signature { data, .. } if !data.is_empty())));
        let mut input = Vec::new();
        for f in &to_client {
            record(&mut input, 0, f);
        }
        let outcome = client_session_one(&input).unwrap();
        let client::Outcome::Pushed(r) = outcome else {
            panic!("{outcome:?}")
        };
        assert_eq!((r.sent_full, r.sent_zstd_ref, r.sent_rsync), (1, 1, 1));
        let frames = [&[255, 3][..], &to_client.concat()].concat();
        assert_eq!(frame_decode_one(&frames), Ok(to_client.len()));
    }

    #[test]
    fn broken_seeds_fail_without_panicking() {
        for (target, name, input) in seeds() {
            match target {
                "frame_decode" => {
                    let _ = frame_decode_one(&input);
                }
                "daemon_session" => {
                    let run = daemon_session_one(&input);
                    assert_eq!(run.staged, name == "push", "{name}");
                    assert_eq!(run.mirrored, name.starts_with("sync"), "{name}");
                }
                "client_session" => {
                    let ok = client_session_one(&input).is_ok();
                    assert_eq!(ok, name == "push" || name == "byte_at_a_time", "{name}");
                }
                "client_sync_session" => {
                    let ok = client_sync_one(&input).is_ok();
                    assert_eq!(ok, name.starts_with("sync"), "{name}");
                }
                other => panic!("unknown target {other}"),
            }
        }
    }

    #[test]
    fn the_seed_syncs_are_complete() {
        for dry_run in [false, true] {
            let (to_daemon, to_client) = sync_conversation(dry_run);
            let run = daemon_session_one(&to_daemon);
            assert!(run.mirrored && !run.staged, "dry run {dry_run}");
            assert_eq!(run.received, if dry_run { 0 } else { run.needed });
            assert!(run.needed > 0);
            let mut input = vec![u8::from(dry_run)];
            for f in &to_client {
                record(&mut input, 0, f);
            }
            let client::Outcome::Synced(r) = client_sync_one(&input).unwrap() else {
                panic!("not a sync")
            };
            assert_eq!(r.dry_run, dry_run);
            // Against fuzz_current: index.php, a.php, big.bin and copy.php are written, the
            // symlink is new, src exists.
            assert_eq!(r.plan.summary.written_files, 4, "{:?}", r.plan);
            assert_eq!(r.plan.summary.symlinks, 1);
            let sent = r.sent_full + r.sent_zstd_ref + r.sent_rsync;
            assert_eq!(sent, if dry_run { 0 } else { r.needed });
        }
    }

    #[test]
    fn records_are_read_zero_padded() {
        let recs: Vec<(u8, &[u8])> = Records(&[3, 2, 0, 0, 0, 9, 9, 4, 9]).collect();
        assert_eq!(recs, vec![(3, &[9u8, 9][..]), (4, &[][..])]);
        assert_eq!(Records(&[]).count(), 0);
        let huge: Vec<(u8, &[u8])> = Records(&[0, 0xFF, 0xFF, 0xFF, 0xFF, 1]).collect();
        assert_eq!(huge, vec![(0, &[1u8][..])]);
    }
}

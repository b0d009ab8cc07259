//! The async loop around a `ClientSession`: control-stream bytes in and out, one task per file
//! the session hands out, and the session's deadlines on tokio's clock.
//!
//! Files are read and encoded on blocking threads, at most one per core at a time, with the
//! memory held by payloads waiting to go out bounded by [`MEMORY_BUDGET_KIB`] (a larger file is
//! admitted alone). A failure to write a file stream usually means the daemon gave up; its
//! `Error` frame may still be in flight on the control stream, so the loop keeps reading for a
//! moment ([`GRACE`]) and reports the daemon's reason when it arrives.

use std::sync::Arc;
use std::time::Duration;

use quinn::{ConnectionError, WriteError};
use sync_core::delta::DeltaFormat;
use sync_core::proto::client::{ClientState, Method, Outcome, Request, SendFile};
use sync_core::proto::ClientSession;
use sync_core::wire::{
    decode, DaemonMsg, FileHeader, FrameDecoder, Message, NeedFile, MAX_MAX_FRAME, MIN_MAX_FRAME,
};
use sync_core::RelPath;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::cache::{Cache, MAX_CACHED_FILE};
use super::memo::{Key, Payload, PayloadMemo};
use super::rate::RateLimit;
use super::source::{SourceError, SourceTree};
use super::{ClientError, Connection, PerFormat, Progress};

/// Payload bytes (in KiB) that may be encoded and waiting to be written at once.
pub(super) const MEMORY_BUDGET_KIB: u32 = 512 * 1024;
/// How long to wait for the daemon's reason after a file stream failed.
const GRACE: Duration = Duration::from_secs(2);
/// How long to wait for the daemon to acknowledge the end of the control stream.
const FINISH_WAIT: Duration = Duration::from_secs(2);
/// Postcard variant index of `DaemonMsg::Need`.
const NEED_VARIANT: u8 = 2;

/// What a push reads from.
pub(super) struct Files {
    pub source: Arc<SourceTree>,
    pub cache: Option<Arc<Cache>>,
    /// Payloads shared with concurrent pushes of the same release, and their CPU budget.
    pub memo: Option<Arc<PayloadMemo>>,
    /// Payload memory budget of this push, in KiB.
    pub memory_kib: u32,
    /// `--bwlimit`, shared with concurrent pushes.
    pub rate: Option<Arc<RateLimit>>,
}

/// The daemon's need, as announced (and checked by the session).
#[derive(Debug, Default)]
pub(super) struct Need {
    pub files: Vec<NeedFile>,
    pub have_files: u64,
    pub have_bytes: u64,
}

/// How a driven session ended well.
pub(super) struct Driven {
    /// `None` when stopped after `Need` (dry run).
    pub outcome: Option<Outcome>,
    pub need: Option<Need>,
    pub sent_bytes: PerFormat,
}

struct Ctx {
    conn: quinn::Connection,
    source: Arc<SourceTree>,
    cache: Option<Arc<Cache>>,
    memo: Option<Arc<PayloadMemo>>,
    cpu: Arc<Semaphore>,
    memory: Arc<Semaphore>,
    memory_kib: u32,
    rate: Option<Arc<RateLimit>>,
}

struct Sent {
    header: FileHeader,
    size: u64,
}

enum FileError {
    Source(SourceError),
    Net { path: RelPath, message: String },
    Internal(String),
}

/// Runs `session` on a new control stream of `conn` until it ends (or, with `stop_after_need`,
/// until the daemon's whole need arrived).
pub(super) async fn drive(
    conn: &Connection,
    mut session: ClientSession,
    files: Option<Files>,
    stop_after_need: bool,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<Driven, ClientError> {
    let origin = Instant::now();
    let ms = || origin.elapsed().as_millis() as u64;
    let target = conn.target.to_string();
    let fail = |err: ClientError| {
        conn.conn.close(1u32.into(), b"client gave up");
        Err(err)
    };
    let lost = |state: ClientState, source: ConnectionError| ClientError::Connection {
        target: target.clone(),
        during: during(state).to_owned(),
        source,
    };
    let (mut send, mut recv) = match conn.conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return fail(lost(ClientState::Handshake, e)),
    };
    let sizes: Vec<u64> = files
        .as_ref()
        .map(|f| f.source.manifest().files().map(|(_, s, ..)| s).collect())
        .unwrap_or_default();
    let ctx = files.map(|f| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let cpu = match &f.memo {
            Some(m) => Arc::clone(m.cpu()),
            None => Arc::new(Semaphore::new(cores)),
        };
        Arc::new(Ctx {
            conn: conn.conn.clone(),
            source: f.source,
            cache: f.cache,
            memo: f.memo,
            cpu,
            memory: Arc::new(Semaphore::new(f.memory_kib.max(1) as usize)),
            memory_kib: f.memory_kib.max(1),
            rate: f.rate,
        })
    });
    let mut tasks: JoinSet<Result<Sent, FileError>> = JoinSet::new();
    let mut out: Vec<u8> = Vec::new();
    let mut out_pos = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let mut watcher = NeedWatcher::new(conn.config.max_frame);
    let mut need_reported = false;
    let mut control_open = true;
    let mut state = session.state();
    let mut sent_bytes = PerFormat::default();
    let mut net_failure: Option<(ClientError, Instant)> = None;
    progress(Progress::State(state));

    let stopped_early = loop {
        if session.state() != state {
            state = session.state();
            tracing::debug!(ms = ms(), "{target}: {state:?}");
            progress(Progress::State(state));
        }
        if watcher.done && !need_reported && !session.is_finished() {
            need_reported = true;
            let bytes = watcher
                .need
                .files
                .iter()
                .filter_map(|n| sizes.get(n.file as usize))
                .sum();
            progress(Progress::Need {
                files: watcher.need.files.len() as u64,
                bytes,
            });
        }
        let ok_so_far = session.outcome().is_none_or(|o| o.is_ok());
        if stop_after_need && watcher.done && ok_so_far {
            break true;
        }
        if out_pos == out.len() {
            if let Some(frame) = session.poll_transmit(ms()) {
                out = frame;
                out_pos = 0;
            }
        }
        if net_failure.is_none() {
            while let Some(Request::SendFile(f)) = session.poll_request() {
                let Some(ctx) = &ctx else {
                    return fail(ClientError::Internal {
                        target,
                        message: format!("the session asked to send {} during a command", f.path),
                    });
                };
                tasks.spawn(send_file(Arc::clone(ctx), f));
            }
        }
        if session.is_finished() && out_pos == out.len() {
            break false;
        }
        let deadline = session
            .poll_timeout()
            .map(|t| origin + Duration::from_millis(t));
        let grace = net_failure.as_ref().map(|(_, d)| *d);
        let pending = &out[out_pos..];
        tokio::select! {
            r = recv.read(&mut buf), if control_open => match r {
                Ok(Some(n)) => {
                    watcher.feed(&buf[..n]);
                    session.handle_control(&buf[..n], ms());
                }
                Ok(None) => {
                    control_open = false;
                    session.handle_control_end(ms());
                }
                Err(e) => {
                    control_open = false;
                    if !session.is_finished() {
                        if let Some((err, _)) = net_failure.take() {
                            return fail(err);
                        }
                        return fail(read_error(&target, session.state(), e));
                    }
                }
            },
            w = send.write(pending), if !pending.is_empty() => match w {
                Ok(n) => out_pos += n,
                Err(e) => {
                    // The daemon's reason, if any, arrives on the control stream.
                    out_pos = out.len();
                    if net_failure.is_none() {
                        let err = write_error(&target, session.state(), e);
                        net_failure = Some((err, Instant::now() + GRACE));
                    }
                }
            },
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => match joined {
                Ok(Ok(sent)) => {
                    let h = sent.header;
                    match h.format {
                        DeltaFormat::Full => sent_bytes.full += h.payload_len,
                        DeltaFormat::ZstdRef => sent_bytes.zstd_ref += h.payload_len,
                        DeltaFormat::Rsync => sent_bytes.rsync += h.payload_len,
                    }
                    progress(Progress::Sent { bytes: sent.size, payload: h.payload_len });
                    session.file_sent(&h, ms());
                }
                Ok(Err(FileError::Source(e))) => return fail(e.into()),
                Ok(Err(FileError::Net { path, message })) => {
                    if net_failure.is_none() {
                        let err = ClientError::Stream { target: target.clone(), path, message };
                        net_failure = Some((err, Instant::now() + GRACE));
                    }
                }
                Ok(Err(FileError::Internal(message))) => {
                    return fail(ClientError::Internal { target, message })
                }
                Err(e) => {
                    return fail(ClientError::Internal {
                        target,
                        message: format!("a file task failed: {e}"),
                    })
                }
            },
            () = sleep_until(deadline), if deadline.is_some() => session.handle_timeout(ms()),
            () = sleep_until(grace), if grace.is_some() => {
                let (err, _) = net_failure.take().expect("grace implies a failure");
                return fail(err);
            }
        }
    };

    if stopped_early {
        conn.conn.close(0u32.into(), b"dry run");
        return Ok(Driven {
            outcome: None,
            need: Some(std::mem::take(&mut watcher.need)),
            sent_bytes,
        });
    }
    match session.outcome() {
        Some(Ok(outcome)) => {
            // Without activation the daemon takes the end of the control stream as the end of
            // a successful push: make sure it got there before the caller closes the
            // connection. Every other outcome is the daemon's last word already.
            let finished = send.finish().is_ok();
            if finished && matches!(outcome, Outcome::Pushed(r) if !r.activated) {
                let _ = tokio::time::timeout(FINISH_WAIT, send.stopped()).await;
            }
            Ok(Driven {
                outcome: Some(outcome.clone()),
                need: watcher.done.then(|| std::mem::take(&mut watcher.need)),
                sent_bytes,
            })
        }
        Some(Err(e)) => {
            let err = match (e, net_failure) {
                // A control stream that simply ended says less than the failure that ended it.
                (sync_core::proto::ProtoError::Protocol(_), Some((net, _))) => net,
                (e, _) => ClientError::Session {
                    target,
                    kind: e.kind(),
                    message: e.to_string(),
                },
            };
            fail(err)
        }
        None => unreachable!("the loop ends only once the session finished"),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What the session was doing, for messages.
fn during(state: ClientState) -> &'static str {
    match state {
        ClientState::Handshake => "waiting for the daemon to accept the request",
        ClientState::Manifest => "sending the manifest",
        ClientState::Transfer => "sending files",
        ClientState::Staging => "the daemon was building the release",
        ClientState::Activation => "the daemon was activating the release",
        ClientState::Mirroring => "the daemon was applying the sync",
        ClientState::Command => "waiting for the daemon's reply",
        ClientState::Finished => "finishing",
    }
}

fn read_error(target: &str, state: ClientState, e: quinn::ReadError) -> ClientError {
    match e {
        quinn::ReadError::ConnectionLost(source) => ClientError::Connection {
            target: target.to_owned(),
            during: during(state).to_owned(),
            source,
        },
        other => ClientError::Internal {
            target: target.to_owned(),
            message: format!("reading the control stream failed: {other}"),
        },
    }
}

fn write_error(target: &str, state: ClientState, e: WriteError) -> ClientError {
    match e {
        WriteError::ConnectionLost(source) => ClientError::Connection {
            target: target.to_owned(),
            during: during(state).to_owned(),
            source,
        },
        other => ClientError::Internal {
            target: target.to_owned(),
            message: format!("writing the control stream failed: {other}"),
        },
    }
}

/// KiB of memory a file's encoding holds: its content, the cached basis, the payload.
/// How often a relay looks again for content that has not arrived yet.
const READY_POLL: std::time::Duration = std::time::Duration::from_millis(20);

fn weight(f: &SendFile) -> u32 {
    let basis = match &f.method {
        Method::ZstdRef { basis } => basis.size,
        _ => 0,
    };
    let kib = f.size.saturating_add(basis) / 1024 + 1;
    kib.min(u64::from(MEMORY_BUDGET_KIB)) as u32
}

async fn send_file(ctx: Arc<Ctx>, f: SendFile) -> Result<Sent, FileError> {
    let closed = |_| FileError::Internal("a semaphore was closed".into());
    // A relay forwards content it may still be receiving: wait for it before taking memory or
    // a CPU slot, so files that are there go out meanwhile.
    while !ctx.source.ready(&f).map_err(FileError::Source)? {
        tokio::time::sleep(READY_POLL).await;
    }
    let _memory = Arc::clone(&ctx.memory)
        .acquire_many_owned(weight(&f).min(ctx.memory_kib))
        .await
        .map_err(closed)?;
    let encode = || async {
        let _cpu = Arc::clone(&ctx.cpu).acquire_owned().await.map_err(closed)?;
        let (source, cache, job) = (Arc::clone(&ctx.source), ctx.cache.clone(), f.clone());
        tokio::task::spawn_blocking(move || {
            let enc = source.encode(&job, cache.as_deref())?;
            if let Some(cache) = &cache {
                // A full payload is exactly a cache blob: keep it for the next push's deltas.
                if enc.header.format == DeltaFormat::Full
                    && (1..=MAX_CACHED_FILE).contains(&job.size)
                {
                    if let Err(e) = cache.store_payload(&job.hash, &enc.payload) {
                        tracing::debug!("{e}");
                    }
                }
            }
            Ok::<_, SourceError>(Payload {
                format: enc.header.format,
                bytes: enc.payload,
            })
        })
        .await
        .map_err(|e| FileError::Internal(format!("encoding {} failed: {e}", f.path)))?
        .map_err(FileError::Source)
    };
    let payload = match &ctx.memo {
        Some(memo) => memo.get_or_encode(Key::of(&f), encode).await?,
        None => Arc::new(encode().await?),
    };
    let header = f
        .header(payload.format, payload.bytes.len() as u64)
        .map_err(|e| FileError::Internal(e.to_string()))?;
    let net = |message: String| FileError::Net {
        path: f.path.clone(),
        message,
    };
    let mut stream = ctx.conn.open_uni().await.map_err(|e| net(e.to_string()))?;
    stream
        .write_all(&header.frame())
        .await
        .map_err(|e| net(e.to_string()))?;
    match &ctx.rate {
        None => stream
            .write_all(&payload.bytes)
            .await
            .map_err(|e| net(e.to_string()))?,
        Some(rate) => {
            for chunk in payload.bytes.chunks(rate.chunk()) {
                rate.acquire(chunk.len()).await;
                stream
                    .write_all(chunk)
                    .await
                    .map_err(|e| net(e.to_string()))?;
            }
        }
    }
    stream.finish().map_err(|e| net(e.to_string()))?;
    Ok(Sent {
        header,
        size: f.size,
    })
}

/// Reads the daemon's `Need` pieces from a copy of the control bytes. The session checks them;
/// this only keeps what the driver reports (progress totals, the dry run's answer).
struct NeedWatcher {
    decoder: FrameDecoder,
    need: Need,
    done: bool,
}

impl NeedWatcher {
    fn new(max_frame: u32) -> NeedWatcher {
        NeedWatcher {
            decoder: FrameDecoder::new(max_frame.clamp(MIN_MAX_FRAME, MAX_MAX_FRAME)),
            need: Need::default(),
            done: false,
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !self.done {
            let frame = match self.decoder.decode(&mut bytes) {
                Ok(Some(frame)) => frame,
                // The session reports bad frames; the watcher just stops.
                Ok(None) | Err(_) => return,
            };
            if frame.first() != Some(&NEED_VARIANT) {
                continue;
            }
            if let Ok(DaemonMsg::Need {
                files,
                last,
                have_files,
                have_bytes,
            }) = decode::<DaemonMsg>(&frame)
            {
                self.need.files.extend(files);
                self.need.have_files = have_files;
                self.need.have_bytes = have_bytes;
                self.done = last;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sync_core::manifest::Hash;
    use sync_core::wire::{BasisRef, Limits, VERSION};

    #[test]
    fn the_watcher_collects_need_pieces_in_any_chunking() {
        let pieces = [
            DaemonMsg::Welcome {
                version: VERSION,
                limits: Limits::default(),
                manifest_basis: false,
            }
            .frame(),
            DaemonMsg::Need {
                files: vec![NeedFile {
                    file: 3,
                    basis: None,
                }],
                last: false,
                have_files: 7,
                have_bytes: 70,
            }
            .frame(),
            DaemonMsg::Need {
                files: vec![NeedFile {
                    file: 5,
                    basis: Some(BasisRef {
                        hash: Hash::of(b"x"),
                        size: 1,
                    }),
                }],
                last: true,
                have_files: 7,
                have_bytes: 70,
            }
            .frame(),
            DaemonMsg::Signature {
                file: 5,
                data: vec![1; 100],
            }
            .frame(),
        ];
        let stream: Vec<u8> = pieces.concat();
        for chunk in [1, 3, 7, stream.len()] {
            let mut w = NeedWatcher::new(MIN_MAX_FRAME);
            for (i, piece) in stream.chunks(chunk).enumerate() {
                w.feed(piece);
                if !w.done {
                    assert!(i * chunk < pieces[..3].concat().len(), "chunk {chunk}");
                }
            }
            assert!(w.done, "chunk {chunk}");
            let files: Vec<u32> = w.need.files.iter().map(|n| n.file).collect();
            assert_eq!(files, [3, 5], "chunk {chunk}");
            assert_eq!((w.need.have_files, w.need.have_bytes), (7, 70));
        }
    }

    #[test]
    fn weights_stay_within_the_budget() {
        let mk = |size, method| SendFile {
            file: 0,
            path: RelPath::new("a").unwrap(),
            size,
            hash: Hash::of(b""),
            method,
        };
        let basis = BasisRef {
            hash: Hash::of(b"b"),
            size: 10 * 1024,
        };
        let table = [
            (mk(0, Method::Full), 1),
            (mk(4096, Method::Full), 5),
            (mk(4096, Method::ZstdRef { basis }), 15),
            (mk(u64::MAX, Method::Full), MEMORY_BUDGET_KIB),
        ];
        for (f, want) in table {
            assert_eq!(weight(&f), want, "{f:?}");
        }
    }
}

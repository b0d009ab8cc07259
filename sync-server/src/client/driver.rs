//! The async loop around a `ClientSession`: control-stream bytes in and out, the files the
//! session hands out, and the session's deadlines on tokio's clock.
//!
//! Files go out on a few long-lived file streams, each written by its own task that takes the
//! next files from a shared queue in the session's order, encodes them in one blocking call,
//! writes them one after another and reports each as sent. Small files thus cost no task, no
//! thread hand-off and no stream of their own, and a large file holds up only its own writer
//! while the others carry the rest. Encoding runs on blocking threads, at most one per core at
//! a time, with the memory held by payloads waiting to go out bounded by [`MEMORY_BUDGET_KIB`]
//! (a larger file is admitted alone). A failure to write a file stream usually means the daemon
//! gave up; its `Error` frame may still be in flight on the control stream, so the loop keeps
//! reading for a moment ([`GRACE`]) and reports the daemon's reason when it arrives.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::{ConnectionError, SendStream, WriteError};
use sync_core::delta::{self, DeltaFormat};
use sync_core::proto::client::{ClientState, Method, Outcome, Request, SendFile};
use sync_core::proto::ClientSession;
use sync_core::wire::{
    decode, DaemonMsg, FileHeader, FrameDecoder, Message, NeedFile, MAX_MAX_FRAME, MIN_MAX_FRAME,
};
use sync_core::RelPath;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::cache::{Cache, MAX_CACHED_FILE};
use super::memo::{Claim, Key, Payload, PayloadBytes, PayloadMemo};
use super::rate::RateLimit;
use super::source::{EncodedFile, SourceError, SourceTree};
use super::{ClientError, Connection, PerFormat, Progress};
use crate::file_bytes::Content;

/// Payload bytes (in KiB) that may be encoded and waiting to be written at once.
pub(super) const MEMORY_BUDGET_KIB: u32 = 512 * 1024;
/// How long to wait for the daemon's reason after a file stream failed.
const GRACE: Duration = Duration::from_secs(2);
/// How long to wait for the daemon to acknowledge the end of the control stream.
const FINISH_WAIT: Duration = Duration::from_secs(2);
/// Postcard variant index of `DaemonMsg::Need`.
const NEED_VARIANT: u8 = 2;
/// Stream writers per core (at most the negotiated number of streams): more than the encoders,
/// so that while some encode the others write, and a large file leaves the rest a way past it.
const WRITERS_PER_CORE: usize = 2;
/// Most files one writer encodes in one blocking call.
const BATCH_FILES: usize = 64;
/// Most file bytes in one batch; a larger file is a batch of its own.
const BATCH_BYTES: u64 = 512 * 1024;
/// Payloads up to this size are gathered with their headers and written together.
const GATHER_MAX: usize = 64 * 1024;
/// Gathered bytes that are written (and their files reported) at once.
const FLUSH_BYTES: usize = 256 * 1024;

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

/// What a stream writer tells the loop.
enum Report {
    /// These files are written, in this order.
    Sent(Vec<Sent>),
    /// The writer stopped.
    Failed(FileError),
}

/// Files waiting for a stream writer, in the order the session handed them out.
struct Work {
    queue: Mutex<Queue>,
    wake: Notify,
    writers: usize,
}

#[derive(Default)]
struct Queue {
    files: VecDeque<SendFile>,
    /// No more files will come: writers finish their streams once the queue is empty.
    closed: bool,
}

impl Work {
    fn new(writers: usize) -> Work {
        Work {
            queue: Mutex::default(),
            wake: Notify::new(),
            writers: writers.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn extend(&self, files: impl IntoIterator<Item = SendFile>) {
        let before = {
            let mut q = self.lock();
            let before = q.files.len();
            q.files.extend(files);
            before < q.files.len()
        };
        if before {
            self.wake.notify_waiters();
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_waiters();
    }

    /// The next files to write; `None` once the queue is closed and empty.
    async fn next_batch(&self) -> Option<Vec<SendFile>> {
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            // Registered before looking, so files queued after the look wake this writer.
            woken.as_mut().enable();
            {
                let mut q = self.lock();
                if !q.files.is_empty() {
                    return Some(take_batch(&mut q.files, self.writers));
                }
                if q.closed {
                    return None;
                }
            }
            woken.await;
        }
    }
}

/// Takes the next batch off `files`: in order, at most [`BATCH_FILES`] and an even share of
/// what is queued among `writers` (so idle writers get work too), and at most [`BATCH_BYTES`]
/// of files unless the first file alone is larger.
fn take_batch(files: &mut VecDeque<SendFile>, writers: usize) -> Vec<SendFile> {
    let share = files.len().div_ceil(writers.max(1)).clamp(1, BATCH_FILES);
    let mut batch = Vec::with_capacity(share);
    let mut bytes = 0u64;
    while batch.len() < share {
        let Some(f) = files.pop_front() else {
            break;
        };
        if !batch.is_empty() && bytes.saturating_add(f.size) > BATCH_BYTES {
            files.push_front(f);
            break;
        }
        bytes = bytes.saturating_add(f.size);
        batch.push(f);
    }
    batch
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
    let mut writers: JoinSet<()> = JoinSet::new();
    let mut work: Option<Arc<Work>> = None;
    let (report_tx, mut reports) = mpsc::unbounded_channel::<Report>();
    // Files a relay does not have yet, and when to look for them again.
    let mut parked: Vec<SendFile> = Vec::new();
    let mut ready_check: Option<Instant> = None;
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
            let mut ready = Vec::new();
            while let Some(Request::SendFile(f)) = session.poll_request() {
                let Some(ctx) = &ctx else {
                    return fail(ClientError::Internal {
                        target,
                        message: format!("the session asked to send {} during a command", f.path),
                    });
                };
                // A relay forwards content it may still be receiving: files that are there go
                // out meanwhile.
                match ctx.source.ready(&f) {
                    Ok(true) => ready.push(f),
                    Ok(false) => {
                        parked.push(f);
                        ready_check.get_or_insert_with(|| Instant::now() + READY_POLL);
                    }
                    Err(e) => return fail(e.into()),
                }
            }
            if let Some(ctx) = &ctx {
                let streams = session.negotiated().1;
                hand_out(&mut work, ctx, streams, &mut writers, &report_tx, ready);
            }
        }
        // Once the session handed out its last file, writers end their streams when the queue
        // runs dry.
        if state != ClientState::Transfer {
            if let Some(w) = work.take() {
                w.close();
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
            Some(report) = reports.recv() => match report {
                Report::Sent(files) => {
                    for sent in files {
                        let h = sent.header;
                        match h.format {
                            DeltaFormat::Full => sent_bytes.full += h.payload_len,
                            DeltaFormat::ZstdRef => sent_bytes.zstd_ref += h.payload_len,
                            DeltaFormat::Rsync => sent_bytes.rsync += h.payload_len,
                        }
                        progress(Progress::Sent { bytes: sent.size, payload: h.payload_len });
                        session.file_sent(&h, ms());
                    }
                }
                Report::Failed(FileError::Source(e)) => return fail(e.into()),
                Report::Failed(FileError::Net { path, message }) => {
                    if net_failure.is_none() {
                        let err = ClientError::Stream { target: target.clone(), path, message };
                        net_failure = Some((err, Instant::now() + GRACE));
                    }
                }
                Report::Failed(FileError::Internal(message)) => {
                    return fail(ClientError::Internal { target, message })
                }
            },
            Some(joined) = writers.join_next(), if !writers.is_empty() => {
                if let Err(e) = joined {
                    return fail(ClientError::Internal {
                        target,
                        message: format!("a stream writer failed: {e}"),
                    });
                }
            }
            () = sleep_until(ready_check), if ready_check.is_some() => {
                ready_check = None;
                let mut ready = Vec::new();
                for f in std::mem::take(&mut parked) {
                    match ctx.as_ref().map(|c| c.source.ready(&f)) {
                        Some(Ok(true)) => ready.push(f),
                        Some(Err(e)) => return fail(e.into()),
                        Some(Ok(false)) | None => parked.push(f),
                    }
                }
                if !parked.is_empty() {
                    ready_check = Some(Instant::now() + READY_POLL);
                }
                if let Some(ctx) = &ctx {
                    let streams = session.negotiated().1;
                    hand_out(&mut work, ctx, streams, &mut writers, &report_tx, ready);
                }
            }
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

/// How many stream writers a push keeps, given the negotiated number of streams.
pub(super) fn writer_count(streams: u32) -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (WRITERS_PER_CORE * cores)
        .max(2)
        .min(usize::try_from(streams).unwrap_or(usize::MAX))
        .max(1)
}

/// Queues `ready` for the stream writers, starting them with the first files.
fn hand_out(
    work: &mut Option<Arc<Work>>,
    ctx: &Arc<Ctx>,
    streams: u32,
    writers: &mut JoinSet<()>,
    report: &mpsc::UnboundedSender<Report>,
    ready: Vec<SendFile>,
) {
    if ready.is_empty() {
        return;
    }
    work.get_or_insert_with(|| start_writers(ctx, streams, writers, report))
        .extend(ready);
}

fn start_writers(
    ctx: &Arc<Ctx>,
    streams: u32,
    writers: &mut JoinSet<()>,
    report: &mpsc::UnboundedSender<Report>,
) -> Arc<Work> {
    let n = writer_count(streams);
    let work = Arc::new(Work::new(n));
    for _ in 0..n {
        writers.spawn(write_stream(
            Arc::clone(ctx),
            Arc::clone(&work),
            report.clone(),
        ));
    }
    work
}

/// One stream writer: batches off the queue until it is closed and empty, all on one file
/// stream, opened when the first batch is ready.
async fn write_stream(ctx: Arc<Ctx>, work: Arc<Work>, report: mpsc::UnboundedSender<Report>) {
    let mut stream = None;
    while let Some(batch) = work.next_batch().await {
        if let Err(e) = send_batch(&ctx, &mut stream, batch, &report).await {
            let _ = report.send(Report::Failed(e));
            return;
        }
    }
    if let Some(mut stream) = stream {
        // Every file on it is written and reported; a daemon that stopped the stream says why
        // on the control stream.
        let _ = stream.finish();
    }
}

fn closed(_: tokio::sync::AcquireError) -> FileError {
    FileError::Internal("a semaphore was closed".into())
}

/// Encodes `batch` within the memory budget and writes it on `stream`, reporting files as
/// their bytes are written.
async fn send_batch(
    ctx: &Ctx,
    stream: &mut Option<SendStream>,
    batch: Vec<SendFile>,
    report: &mpsc::UnboundedSender<Report>,
) -> Result<(), FileError> {
    let kib = batch
        .iter()
        .map(weight)
        .fold(0u32, u32::saturating_add)
        .min(ctx.memory_kib);
    let _memory = Arc::clone(&ctx.memory)
        .acquire_many_owned(kib)
        .await
        .map_err(closed)?;
    let encoded = match &ctx.memo {
        Some(memo) => shared_payloads(ctx, memo, batch).await?,
        None => {
            let pick = vec![true; batch.len()];
            let (batch, payloads) = encode_batch(ctx, batch, pick).await?;
            batch
                .into_iter()
                .zip(payloads)
                .filter_map(|(f, p)| Some((f, Arc::new(p?))))
                .collect()
        }
    };
    let mut out = Out::default();
    for (f, payload) in &encoded {
        let header = f
            .header(payload.format, payload.bytes.len() as u64)
            .map_err(|e| FileError::Internal(e.to_string()))?;
        out.buf.extend_from_slice(&header.frame());
        out.first.get_or_insert_with(|| f.path.clone());
        match payload.bytes.flat() {
            Some(bytes) if bytes.len() <= GATHER_MAX => out.buf.extend_from_slice(bytes),
            _ => {
                out.flush(ctx, stream).await?;
                // Handed to the stream as it is, not copied into it: quinn keeps the bytes (and
                // with them the payload) until they are acknowledged.
                write_chunks(ctx, stream, chunks_of(payload))
                    .await
                    .map_err(|message| net(&f.path, message))?;
            }
        }
        out.sent.push(Sent {
            header,
            size: f.size,
        });
        if out.buf.len() >= FLUSH_BYTES || payload.bytes.len() > GATHER_MAX {
            out.flush(ctx, stream).await?;
            let _ = report.send(Report::Sent(std::mem::take(&mut out.sent)));
        }
    }
    out.flush(ctx, stream).await?;
    if !out.sent.is_empty() {
        let _ = report.send(Report::Sent(out.sent));
    }
    Ok(())
}

/// Headers and small payloads gathered for one write, and the files they complete.
#[derive(Default)]
struct Out {
    buf: Vec<u8>,
    /// The first file with bytes in `buf`, to name in an error.
    first: Option<RelPath>,
    sent: Vec<Sent>,
}

impl Out {
    async fn flush(&mut self, ctx: &Ctx, stream: &mut Option<SendStream>) -> Result<(), FileError> {
        // Every file gathered sets `first`, so without it there is nothing to write.
        let Some(path) = self.first.take() else {
            return Ok(());
        };
        // quinn would copy a slice into `Bytes` anyway; the buffer stays for the next gather.
        let result = write_chunk(ctx, stream, Bytes::copy_from_slice(&self.buf)).await;
        self.buf.clear();
        result.map_err(|message| net(&path, message))
    }
}

fn net(path: &RelPath, message: String) -> FileError {
    FileError::Net {
        path: path.clone(),
        message,
    }
}

/// A payload that [`Bytes`] can point into.
struct Shared(Arc<Payload>);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes.flat().unwrap_or_default()
    }
}

/// A file's content that [`Bytes`] can point into.
struct SharedContent(Arc<Content>);

impl AsRef<[u8]> for SharedContent {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// `payload` as chunks for a stream, none of them a copy of the payload's bytes: the payload
/// itself, or a raw frame's headers and, between them, ranges of the file's content.
fn chunks_of(payload: &Arc<Payload>) -> Vec<Bytes> {
    match &payload.bytes {
        PayloadBytes::Flat(_) => vec![Bytes::from_owner(Shared(Arc::clone(payload)))],
        PayloadBytes::Raw { content, frame } => {
            let all = Bytes::from_owner(SharedContent(Arc::clone(content)));
            let mut chunks = vec![Bytes::copy_from_slice(frame.header())];
            for (header, range) in frame.blocks() {
                chunks.push(Bytes::copy_from_slice(&header));
                chunks.push(all.slice(range));
            }
            chunks
        }
    }
}

/// Writes `bytes` on the writer's stream (opening it first if needed), within the bandwidth
/// limit; headers count against the limit along with the payloads. The stream keeps `bytes`
/// until they are acknowledged rather than copying them.
async fn write_chunk(
    ctx: &Ctx,
    stream: &mut Option<SendStream>,
    bytes: Bytes,
) -> Result<(), String> {
    let stream = match stream {
        Some(s) => s,
        None => stream.insert(ctx.conn.open_uni().await.map_err(|e| e.to_string())?),
    };
    match &ctx.rate {
        None => stream.write_chunk(bytes).await.map_err(|e| e.to_string()),
        Some(rate) => {
            let mut rest = bytes;
            while !rest.is_empty() {
                let chunk = rest.split_to(rate.chunk().min(rest.len()));
                rate.acquire(chunk.len()).await;
                stream.write_chunk(chunk).await.map_err(|e| e.to_string())?;
            }
            Ok(())
        }
    }
}

/// [`write_chunk`] of each of `chunks` in turn; without a bandwidth limit, in one call.
async fn write_chunks(
    ctx: &Ctx,
    stream: &mut Option<SendStream>,
    mut chunks: Vec<Bytes>,
) -> Result<(), String> {
    match (&ctx.rate, stream) {
        (None, Some(s)) => s
            .write_all_chunks(&mut chunks)
            .await
            .map_err(|e| e.to_string()),
        (_, stream) => {
            for bytes in chunks {
                write_chunk(ctx, stream, bytes).await?;
            }
            Ok(())
        }
    }
}

/// Payloads of `batch` through the memo: those another push encoded already are taken, those
/// nobody has are encoded here in one blocking call (and kept), and only then does the writer
/// wait for those another push is encoding right now, so two pushes never wait on each other.
async fn shared_payloads(
    ctx: &Ctx,
    memo: &Arc<PayloadMemo>,
    batch: Vec<SendFile>,
) -> Result<Vec<(SendFile, Arc<Payload>)>, FileError> {
    let mut payloads: Vec<Option<Arc<Payload>>> = Vec::with_capacity(batch.len());
    let mut tickets = Vec::with_capacity(batch.len());
    for f in &batch {
        let (payload, ticket) = match memo.claim(Key::of(f)) {
            Claim::Ready(p) => (Some(p), None),
            Claim::Encode(ticket) => (None, Some(ticket)),
            Claim::Busy(_) => (None, None),
        };
        payloads.push(payload);
        tickets.push(ticket);
    }
    let mut batch = batch;
    if tickets.iter().any(Option::is_some) {
        let pick = tickets.iter().map(Option::is_some).collect();
        let (back, encoded) = encode_batch(ctx, batch, pick).await?;
        batch = back;
        for ((slot, ticket), payload) in payloads.iter_mut().zip(tickets).zip(encoded) {
            if let (Some(ticket), Some(payload)) = (ticket, payload) {
                *slot = Some(ticket.fill(payload));
            }
        }
    }
    let mut out = Vec::with_capacity(batch.len());
    for (f, payload) in batch.into_iter().zip(payloads) {
        let payload = match payload {
            Some(p) => p,
            None => {
                let one = f.clone();
                memo.get_or_encode(Key::of(&f), || async move {
                    let (_, mut encoded) = encode_batch(ctx, vec![one], vec![true]).await?;
                    encoded
                        .pop()
                        .flatten()
                        .ok_or_else(|| FileError::Internal("an encoding went missing".into()))
                })
                .await?
            }
        };
        out.push((f, payload));
    }
    Ok(out)
}

/// Files per blocking call of [`pre_encode`].
const PRE_ENCODE_BATCH: usize = 32;

/// Largest file [`pre_encode`] encodes: bigger ones are left to the push itself, which streams
/// them rather than holding their payload in the memo.
const PRE_ENCODE_MAX_FILE: u64 = 1 << 20;

/// Encodes `files` (the push's likely sends, `likely_sends`) into `memo` while the daemon
/// computes its need, in batches on the memo's CPU budget, and on one core fewer than the
/// machine has: these are guesses, and the work the push waits for meanwhile (its manifest
/// going out, the daemon's answer coming in, and on a shared machine the daemon's own) keeps a
/// core. A file the memo has, or another push is encoding, is skipped; one that fails to encode
/// is left to the push, which reports it. The push's own writers then find these payloads ready
/// (or wait for one being encoded).
pub(super) fn pre_encode(
    source: Arc<SourceTree>,
    cache: Option<Arc<Cache>>,
    memo: Arc<PayloadMemo>,
    files: Vec<SendFile>,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    let files: Vec<SendFile> = files
        .into_iter()
        .filter(|f| f.size <= PRE_ENCODE_MAX_FILE)
        .collect();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let ahead = Arc::new(Semaphore::new(cores.saturating_sub(1).max(1)));
    for batch in files.chunks(PRE_ENCODE_BATCH) {
        let (source, cache, memo) = (Arc::clone(&source), cache.clone(), Arc::clone(&memo));
        let ahead = Arc::clone(&ahead);
        let batch = batch.to_vec();
        tasks.spawn(async move {
            let Ok(_core) = ahead.acquire_owned().await else {
                return;
            };
            let Ok(_cpu) = Arc::clone(memo.cpu()).acquire_owned().await else {
                return;
            };
            // Claimed only now: a batch waiting for the CPU leaves its files to the push.
            let mut tickets = Vec::new();
            let mut picked = Vec::new();
            for f in batch {
                if let Claim::Encode(ticket) = memo.claim(Key::of(&f)) {
                    tickets.push(ticket);
                    picked.push(f);
                }
            }
            if picked.is_empty() {
                return;
            }
            let encoded = tokio::task::spawn_blocking(move || {
                let files: Vec<&SendFile> = picked.iter().collect();
                encode_files(&source, cache.as_deref(), &files)
                    .into_iter()
                    .map(Result::ok)
                    .collect::<Vec<_>>()
            })
            .await;
            let Ok(encoded) = encoded else { return };
            for (ticket, payload) in tickets.into_iter().zip(encoded) {
                if let Some(payload) = payload {
                    ticket.fill(payload);
                }
            }
        });
    }
    tasks
}

/// Encodes the files of `files` marked in `pick`, in one blocking call on one of the CPU
/// budget's slots; hands the files back with a payload for each picked one.
async fn encode_batch(
    ctx: &Ctx,
    files: Vec<SendFile>,
    pick: Vec<bool>,
) -> Result<(Vec<SendFile>, Vec<Option<Payload>>), FileError> {
    let _cpu = Arc::clone(&ctx.cpu).acquire_owned().await.map_err(closed)?;
    let first = files
        .first()
        .map(|f| f.path.to_string())
        .unwrap_or_default();
    let (source, cache) = (Arc::clone(&ctx.source), ctx.cache.clone());
    tokio::task::spawn_blocking(move || {
        let chosen: Vec<&SendFile> = files
            .iter()
            .zip(&pick)
            .filter_map(|(f, &picked)| picked.then_some(f))
            .collect();
        let mut encoded = encode_files(&source, cache.as_deref(), &chosen).into_iter();
        let mut payloads = Vec::with_capacity(files.len());
        for picked in &pick {
            payloads.push(match picked {
                true => Some(encoded.next().expect("one result per picked file")?),
                false => None,
            });
        }
        Ok::<_, SourceError>((files, payloads))
    })
    .await
    .map_err(|e| FileError::Internal(format!("encoding {first} failed: {e}")))?
    .map_err(FileError::Source)
}

/// Files read (with their bases) at a time for one encoder, at most: the encoder references
/// every basis of its group, so the group stays in memory until it is encoded.
const ENCODE_GROUP_BYTES: usize = 8 << 20;

/// Encodes `files` in order, one result each, through one [`delta::Encoder`] per group of files
/// read together (up to [`ENCODE_GROUP_BYTES`]): its zstd context serves every delta of the
/// group. A file that cannot be read or encoded has its error in its place.
pub(super) fn encode_files(
    source: &SourceTree,
    cache: Option<&Cache>,
    files: &[&SendFile],
) -> Vec<Result<Payload, SourceError>> {
    let mut results = Vec::with_capacity(files.len());
    let mut rest = files;
    while !rest.is_empty() {
        // Read files and the errors of those that could not be, side by side: the encoder
        // borrows the first for the whole group while the second are handed out.
        let (mut loaded, mut failed) = (Vec::new(), Vec::new());
        let mut bytes = 0;
        for f in rest {
            if bytes >= ENCODE_GROUP_BYTES {
                break;
            }
            match source.load(f, cache) {
                Ok(l) => {
                    bytes += l.bytes();
                    loaded.push(Some(l));
                    failed.push(None);
                }
                Err(e) => {
                    loaded.push(None);
                    failed.push(Some(e));
                }
            }
        }
        let (group, after) = rest.split_at(loaded.len());
        let mut encoder = delta::Encoder::new();
        for ((f, l), e) in group.iter().zip(&loaded).zip(failed) {
            results.push(match (l, e) {
                (Some(l), None) => source
                    .encode_loaded(f, l, &mut encoder)
                    .map(|enc| to_payload(cache, f, enc)),
                (_, Some(e)) => Err(e),
                (None, None) => unreachable!("a file is either read or failed"),
            });
        }
        rest = after;
    }
    results
}

/// The payload of `enc`, the encoding of `f`, keeping its plain form in the cache.
fn to_payload(cache: Option<&Cache>, f: &SendFile, enc: EncodedFile) -> Payload {
    if let Some(cache) = cache.filter(|_| (1..=MAX_CACHED_FILE).contains(&f.size)) {
        // A full payload is exactly a cache blob: keep it for the next push's deltas, whether it
        // is sent or lost to a delta (the cache then need not compress the file again).
        let full = match (&enc.spare_full, enc.header.format) {
            (Some(spare), _) => Some(&spare[..]),
            (None, DeltaFormat::Full) => enc.payload.flat(),
            (None, _) => None,
        };
        if let Some(full) = full {
            if let Err(e) = cache.store_payload(&f.hash, full) {
                tracing::debug!("{e}");
            }
        }
    }
    Payload {
        format: enc.header.format,
        bytes: enc.payload,
    }
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

    #[test]
    fn batches_keep_the_order_and_their_bounds() {
        let mk = |file: u32, size: u64| SendFile {
            file,
            path: RelPath::new(format!("f{file}")).unwrap(),
            size,
            hash: Hash::of(&file.to_le_bytes()),
            method: Method::Full,
        };
        const K: u64 = 1024;
        // (file sizes, writers, sizes of the batches taken one after another)
        let table: [(Vec<u64>, usize, Vec<usize>); 6] = [
            (vec![100; 10], 4, vec![3, 2, 2, 1, 1, 1]),
            (vec![100; 200], 1, vec![64, 64, 64, 8]),
            (vec![10, 600 * K, 10], 1, vec![1, 1, 1]),
            (vec![300 * K, 300 * K, 100 * K, 100 * K], 1, vec![1, 3]),
            (vec![u64::MAX, 1], 1, vec![1, 1]),
            (vec![0; 3], 0, vec![3]),
        ];
        for (sizes, writers, want) in table {
            let mut q: VecDeque<SendFile> =
                (0u32..).zip(&sizes).map(|(i, &size)| mk(i, size)).collect();
            let mut got = Vec::new();
            let mut order = Vec::new();
            while !q.is_empty() {
                let b = take_batch(&mut q, writers);
                assert!(b.len() <= BATCH_FILES);
                let bytes = b.iter().fold(0u64, |n, f| n.saturating_add(f.size));
                assert!(b.len() == 1 || bytes <= BATCH_BYTES, "{sizes:?}");
                got.push(b.len());
                order.extend(b.iter().map(|f| f.file));
            }
            assert_eq!(got, want, "{sizes:?} over {writers} writers");
            assert_eq!(order, (0..sizes.len() as u32).collect::<Vec<_>>());
        }
    }
}

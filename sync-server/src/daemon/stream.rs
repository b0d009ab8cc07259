//! File streams: each is read by its own task, header by header.
//!
//! A stream is a sequence of (header frame, payload) until it ends. The reader decodes a header
//! with the session's bounded decoder. A small payload it reads into memory straight away, while
//! the connection's [`Early`] allowance has room, and hands header and payload to the driver in
//! one message: most files of a push are small and admitted at once, and this spares them a round
//! trip to the driver. Any other header it hands to the driver and waits to be told how to read
//! the payload ([`ReadPlan`]): into memory when the session admitted the file; straight to the
//! job already rebuilding it ([`ReadInto::Direct`]) when it is a large plain payload the session
//! admitted, so the bytes are decoded as they arrive instead of written to disk and read back;
//! to an unnamed temporary file in the app's object directory when it is queued behind the
//! bytes-in-flight budget, or large otherwise. It never reads past the announced payload
//! length; what it read beyond a header is kept for the payload.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use quinn::RecvStream;
use sync_core::proto::daemon::FileFailure;
use sync_core::proto::DaemonSession;
use sync_core::wire::{self, ErrorKind, FileHeader, WireError};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::connection::{Clock, Work};

/// Largest read from a file stream at once.
const CHUNK: usize = 256 * 1024;
/// Memory reserved up front for a payload; the rest grows as bytes arrive.
const INITIAL_RESERVE: u64 = 1 << 20;
/// Largest payload read before the driver was asked.
const EARLY_PAYLOAD_MAX: u64 = 64 << 10;
/// Most memory one connection's payloads read before they were admitted may take, as a share of
/// the bytes-in-flight budget and in bytes.
const EARLY_SHARE: u64 = 16;
const EARLY_TOTAL_MAX: u64 = 4 << 20;

/// How to read the payload after a header.
#[derive(Debug)]
pub(super) struct ReadPlan {
    /// The file the header announced.
    pub file: u32,
    pub payload_len: u64,
    pub into: ReadInto,
}

/// Where a payload's bytes go as they are read.
#[derive(Debug)]
pub(super) enum ReadInto {
    Memory,
    /// An unnamed file in this directory.
    Spool(PathBuf),
    /// The job rebuilding the file, in pieces of about [`PIECE`] bytes. A failure to read the
    /// payload is sent too, so the job reports it; the piece channel closes after the
    /// [`Work::Payload`] for the file went to the driver, so the job cannot finish before the
    /// driver heard the payload arrived.
    Direct(mpsc::Sender<Piece>),
}

/// Bytes of a payload in the order received, or why the rest will not come.
pub(super) type Piece = Result<Vec<Bytes>, FileFailure>;

/// Received bytes gathered into one [`Piece`] before the job is woken.
const PIECE: usize = 256 * 1024;

/// A payload that arrived whole.
#[derive(Debug)]
pub(super) enum Payload {
    Memory(Vec<u8>),
    Spool {
        file: File,
        len: u64,
    },
    /// Handed piece by piece to the job that rebuilds the file (`ReadInto::Direct`).
    Streamed,
}

/// Memory for small payloads read before the session admitted their file, so that a connection
/// holds at most the bytes-in-flight budget plus this much (a sixteenth of the budget, 4 MiB at
/// most) in payloads. A reader that finds no room asks the driver first, as for a large payload.
#[derive(Debug)]
pub(super) struct Early {
    room: Arc<Semaphore>,
    payload_max: u64,
}

impl Early {
    pub(super) fn new(max_bytes_in_flight: u64) -> Early {
        let total = (max_bytes_in_flight / EARLY_SHARE).min(EARLY_TOTAL_MAX);
        Early {
            room: Arc::new(Semaphore::new(usize::try_from(total).unwrap_or(0))),
            payload_max: EARLY_PAYLOAD_MAX.min(total),
        }
    }

    /// Room for a payload of `len` bytes, if it is small and there is room; given back when
    /// the permit is dropped.
    fn take(&self, len: u64) -> Option<OwnedSemaphorePermit> {
        if len > self.payload_max {
            return None;
        }
        let n = u32::try_from(len).ok()?;
        Arc::clone(&self.room).try_acquire_many_owned(n).ok()
    }
}

/// Reads `stream` until it ends, the driver declines a header, or a payload fails.
pub(super) async fn read(
    mut stream: RecvStream,
    tx: mpsc::UnboundedSender<Work>,
    clock: Arc<Clock>,
    early: Arc<Early>,
) {
    let mut leftover = Bytes::new();
    loop {
        let frame = match read_header(&mut stream, &mut leftover, &clock).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send(Work::StreamError(e));
                return;
            }
        };
        // A header that does not decode goes to the driver, whose session refuses it.
        let header = wire::decode::<FileHeader>(&frame).ok();
        if let Some((header, room)) =
            header.and_then(|h| early.take(h.payload_len).map(|room| (h, room)))
        {
            let payload = read_payload(
                &mut stream,
                &mut leftover,
                header.payload_len,
                &ReadInto::Memory,
                &clock,
            )
            .await;
            let failed = payload.is_err();
            let sent = tx.send(Work::Whole {
                header,
                frame,
                payload,
                room,
            });
            if failed || sent.is_err() {
                let _ = stream.stop(0u32.into());
                return;
            }
            continue;
        }
        let (reply, plan) = oneshot::channel();
        if tx.send(Work::Header { frame, reply }).is_err() {
            return;
        }
        let Ok(Some(plan)) = plan.await else {
            let _ = stream.stop(0u32.into());
            return;
        };
        let result = read_payload(
            &mut stream,
            &mut leftover,
            plan.payload_len,
            &plan.into,
            &clock,
        )
        .await;
        let failed = result.is_err();
        // Once the payload is whole the client owes nothing more for this file; storing it is
        // the daemon's own work.
        let _ = tx.send(Work::Payload {
            file: plan.file,
            result,
        });
        // Only now may a direct job see the end of its pieces (see `ReadInto::Direct`).
        drop(plan);
        if failed {
            let _ = stream.stop(0u32.into());
            return;
        }
    }
}

/// The next header frame; `None` when the stream ends (or breaks) between files.
async fn read_header(
    stream: &mut RecvStream,
    leftover: &mut Bytes,
    clock: &Clock,
) -> Result<Option<Vec<u8>>, WireError> {
    let mut decoder = DaemonSession::file_header_decoder();
    let mut buf = std::mem::take(leftover);
    loop {
        let mut input = &buf[..];
        if let Some(frame) = decoder.decode(&mut input)? {
            let consumed = buf.len() - input.len();
            *leftover = buf.slice(consumed..);
            return Ok(Some(frame));
        }
        match stream.read_chunk(CHUNK, true).await {
            Ok(Some(chunk)) => {
                clock.touch();
                buf = chunk.bytes;
            }
            // A stream that ends or is reset between files is simply done; inside a header it
            // is truncated.
            Ok(None) | Err(_) => return decoder.finish().map(|()| None),
        }
    }
}

enum Sink<'a> {
    Memory(Vec<u8>),
    Spool(tokio::fs::File, PathBuf),
    Direct {
        /// `None` once the job stopped taking pieces: the rest of the payload is read and
        /// dropped, so the stream stays usable for the files after it.
        to: Option<&'a mpsc::Sender<Piece>>,
        piece: Vec<Bytes>,
        bytes: usize,
    },
}

impl Sink<'_> {
    async fn write(&mut self, bytes: Bytes) -> Result<(), FileFailure> {
        match self {
            Sink::Memory(v) => {
                v.extend_from_slice(&bytes);
                Ok(())
            }
            Sink::Spool(f, dir) => f
                .write_all(&bytes)
                .await
                .map_err(|e| spool_failure(dir, &e)),
            Sink::Direct {
                to,
                piece,
                bytes: gathered,
            } => {
                if to.is_none() {
                    return Ok(());
                }
                *gathered += bytes.len();
                piece.push(bytes);
                if *gathered >= PIECE {
                    *gathered = 0;
                    send_piece(to, std::mem::take(piece)).await;
                }
                Ok(())
            }
        }
    }
}

/// Hands `piece` to a direct job; waiting here while the job is behind holds back the stream. A
/// job that stopped early (it reports why itself) gets nothing more.
async fn send_piece(to: &mut Option<&mpsc::Sender<Piece>>, piece: Vec<Bytes>) {
    if let Some(sender) = to {
        if !piece.is_empty() && sender.send(Ok(piece)).await.is_err() {
            *to = None;
        }
    }
}

/// Reads a payload of `len` bytes into where `into` says.
async fn read_payload(
    stream: &mut RecvStream,
    leftover: &mut Bytes,
    len: u64,
    into: &ReadInto,
    clock: &Clock,
) -> Result<Payload, FileFailure> {
    let result = read_payload_into(stream, leftover, len, into, clock).await;
    if let (Err(failure), ReadInto::Direct(to)) = (&result, into) {
        // The job reports the failure; if it already stopped, it reported its own.
        let _ = to.send(Err(failure.clone())).await;
    }
    result
}

async fn read_payload_into(
    stream: &mut RecvStream,
    leftover: &mut Bytes,
    len: u64,
    into: &ReadInto,
    clock: &Clock,
) -> Result<Payload, FileFailure> {
    let mut sink = match into {
        ReadInto::Direct(to) => Sink::Direct {
            to: Some(to),
            piece: Vec::new(),
            bytes: 0,
        },
        ReadInto::Spool(dir) => {
            let dir2 = dir.clone();
            let file = tokio::task::spawn_blocking(move || tempfile::tempfile_in(&dir2))
                .await
                .map_err(|_| FileFailure::Local {
                    kind: ErrorKind::Internal,
                    message: "creating a spool file failed unexpectedly".into(),
                })?
                .map_err(|e| spool_failure(dir, &e))?;
            Sink::Spool(tokio::fs::File::from_std(file), dir.clone())
        }
        ReadInto::Memory => Sink::Memory(Vec::with_capacity(
            usize::try_from(len.min(INITIAL_RESERVE)).unwrap_or(0),
        )),
    };
    let mut got = 0u64;
    let from_leftover = usize::try_from(len)
        .unwrap_or(usize::MAX)
        .min(leftover.len());
    if from_leftover > 0 {
        sink.write(leftover.split_to(from_leftover)).await?;
        got += from_leftover as u64;
    }
    while got < len {
        let want = usize::try_from(len - got).unwrap_or(usize::MAX).min(CHUNK);
        match stream.read_chunk(want, true).await {
            Ok(Some(chunk)) => {
                clock.touch();
                got += chunk.bytes.len() as u64;
                sink.write(chunk.bytes).await?;
            }
            Ok(None) | Err(_) => return Err(FileFailure::Truncated { received: got }),
        }
    }
    match sink {
        Sink::Memory(v) => Ok(Payload::Memory(v)),
        Sink::Direct { mut to, piece, .. } => {
            send_piece(&mut to, piece).await;
            Ok(Payload::Streamed)
        }
        Sink::Spool(mut f, dir) => {
            f.flush().await.map_err(|e| spool_failure(&dir, &e))?;
            Ok(Payload::Spool {
                file: f.into_std().await,
                len,
            })
        }
    }
}

fn spool_failure(dir: &std::path::Path, e: &std::io::Error) -> FileFailure {
    FileFailure::Local {
        kind: super::work::io_kind(e),
        message: format!("cannot spool the payload under {}: {e}", dir.display()),
    }
}

/// The receiving end of [`ReadInto::Direct`], read by the job on a blocking thread: the pieces in
/// order, then the end of the payload once the reader let go of the channel.
pub(super) struct Pieces {
    rx: mpsc::Receiver<Piece>,
    piece: std::collections::VecDeque<Bytes>,
    /// Why the payload stopped coming, once the reader said so.
    failure: Option<FileFailure>,
}

impl Pieces {
    /// A channel for one payload's pieces; a few in flight keep the reader ahead of the job.
    pub(super) fn channel() -> (mpsc::Sender<Piece>, Pieces) {
        let (tx, rx) = mpsc::channel(PIECES_QUEUED);
        let pieces = Pieces {
            rx,
            piece: std::collections::VecDeque::new(),
            failure: None,
        };
        (tx, pieces)
    }

    /// Why reading the payload failed, if the reader reported it.
    pub(super) fn failure(&mut self) -> Option<FileFailure> {
        self.failure.take()
    }
}

/// Pieces queued per direct payload: with [`PIECE`] bytes each, about 2 MiB.
const PIECES_QUEUED: usize = 8;

impl std::io::Read for Pieces {
    /// Fills `buf` from as many received pieces as are queued, waiting only while it has
    /// nothing: QUIC hands over a datagram's worth at a time, and the decoder and hasher
    /// behind this work far better on large reads than on 1 KiB ones.
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            if let Some(front) = self.piece.front_mut() {
                let take = front.len().min(buf.len() - n);
                buf[n..n + take].copy_from_slice(&front.split_to(take));
                n += take;
                if front.is_empty() {
                    self.piece.pop_front();
                }
                continue;
            }
            if self.failure.is_some() {
                break;
            }
            let next = if n == 0 {
                self.rx.blocking_recv()
            } else {
                match self.rx.try_recv() {
                    Ok(piece) => Some(piece),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                }
            };
            match next {
                Some(Ok(piece)) => self
                    .piece
                    .extend(piece.into_iter().filter(|b| !b.is_empty())),
                Some(Err(failure)) => self.failure = Some(failure),
                None => break,
            }
        }
        if n == 0 && self.failure.is_some() {
            return Err(std::io::Error::other("the payload was cut short"));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    /// What a job reading `sent` through [`Pieces`] gets: the bytes up to the end or the
    /// failure, and the failure it is told.
    async fn read_through(sent: Vec<Piece>) -> (Vec<u8>, bool, Option<FileFailure>) {
        let (to, mut pieces) = Pieces::channel();
        let job = tokio::task::spawn_blocking(move || {
            let mut got = Vec::new();
            let ok = pieces.read_to_end(&mut got).is_ok();
            (got, ok, pieces.failure())
        });
        for piece in sent {
            to.send(piece).await.unwrap();
        }
        drop(to);
        job.await.unwrap()
    }

    /// A case: what the reader sends, the bytes the job reads, whether reading ends well, and
    /// the failure the job is told.
    type Case = (
        &'static str,
        Vec<Piece>,
        &'static [u8],
        bool,
        Option<FileFailure>,
    );

    fn piece(parts: &[&'static [u8]]) -> Piece {
        Ok(parts.iter().map(|p| Bytes::from_static(p)).collect())
    }

    #[tokio::test]
    async fn pieces_read_in_order_and_a_failure_reaches_the_job() {
        let cut = FileFailure::Truncated { received: 7 };
        let cases: Vec<Case> = vec![
            ("nothing", vec![], b"", true, None),
            (
                "parts and pieces, empty ones too",
                vec![piece(&[b"ab", b"", b"c"]), piece(&[]), piece(&[b"defg"])],
                b"abcdefg",
                true,
                None,
            ),
            (
                "cut after some bytes",
                vec![piece(&[b"abc", b"defg"]), Err(cut.clone())],
                b"abcdefg",
                false,
                Some(cut.clone()),
            ),
            ("cut at once", vec![Err(cut.clone())], b"", false, Some(cut)),
        ];
        for (name, sent, bytes, ok, failure) in cases {
            let (got, read_ok, told) = read_through(sent).await;
            assert_eq!(got, bytes, "{name}");
            assert_eq!(read_ok, ok, "{name}");
            assert_eq!(told, failure, "{name}");
        }
    }
}

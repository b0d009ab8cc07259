//! File streams: each is read by its own task, header by header.
//!
//! A stream is a sequence of (header frame, payload) until it ends. The reader decodes a header
//! with the session's bounded decoder. A small payload it reads into memory straight away, while
//! the connection's [`Early`] allowance has room, and hands header and payload to the driver in
//! one message: most files of a push are small and admitted at once, and this spares them a round
//! trip to the driver. Any other header it hands to the driver and waits to be told how to read
//! the payload ([`ReadPlan`]): into memory when the session admitted the file, to an unnamed
//! temporary file in the app's object directory when it is queued behind the bytes-in-flight
//! budget or large. It never reads past the announced payload length; what it read beyond a
//! header is kept for the payload.

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
    /// Spool to an unnamed file in this directory instead of memory.
    pub spool: Option<PathBuf>,
}

/// A payload that arrived whole.
#[derive(Debug)]
pub(super) enum Payload {
    Memory(Vec<u8>),
    Spool { file: File, len: u64 },
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
            let payload =
                read_payload(&mut stream, &mut leftover, header.payload_len, None, &clock).await;
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
            plan.spool.as_ref(),
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

enum Sink {
    Memory(Vec<u8>),
    Spool(tokio::fs::File, PathBuf),
}

impl Sink {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), FileFailure> {
        match self {
            Sink::Memory(v) => {
                v.extend_from_slice(bytes);
                Ok(())
            }
            Sink::Spool(f, dir) => f.write_all(bytes).await.map_err(|e| spool_failure(dir, &e)),
        }
    }
}

/// Reads a payload of `len` bytes into memory, or into an unnamed file in `spool`.
async fn read_payload(
    stream: &mut RecvStream,
    leftover: &mut Bytes,
    len: u64,
    spool: Option<&PathBuf>,
    clock: &Clock,
) -> Result<Payload, FileFailure> {
    let mut sink = match spool {
        Some(dir) => {
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
        None => Sink::Memory(Vec::with_capacity(
            usize::try_from(len.min(INITIAL_RESERVE)).unwrap_or(0),
        )),
    };
    let mut got = 0u64;
    let from_leftover = usize::try_from(len)
        .unwrap_or(usize::MAX)
        .min(leftover.len());
    if from_leftover > 0 {
        sink.write(&leftover.split_to(from_leftover)).await?;
        got += from_leftover as u64;
    }
    while got < len {
        let want = usize::try_from(len - got).unwrap_or(usize::MAX).min(CHUNK);
        match stream.read_chunk(want, true).await {
            Ok(Some(chunk)) => {
                clock.touch();
                sink.write(&chunk.bytes).await?;
                got += chunk.bytes.len() as u64;
            }
            Ok(None) | Err(_) => return Err(FileFailure::Truncated { received: got }),
        }
    }
    match sink {
        Sink::Memory(v) => Ok(Payload::Memory(v)),
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

//! File streams: each is read by its own task, header by header.
//!
//! A stream is a sequence of (header frame, payload) until it ends. The reader decodes a header
//! with the session's bounded decoder, hands it to the driver and waits to be told how to read the
//! payload ([`ReadPlan`]): into memory when the session admitted the file, to an unnamed temporary
//! file in the app's object directory when it is queued behind the bytes-in-flight budget or large.
//! It never reads past the announced payload length; what it read beyond a header is kept for the
//! payload.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use quinn::RecvStream;
use sync_core::proto::daemon::FileFailure;
use sync_core::proto::DaemonSession;
use sync_core::wire::{ErrorKind, WireError};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{mpsc, oneshot};

use super::connection::{Clock, Work};

/// Largest read from a file stream at once.
const CHUNK: usize = 256 * 1024;
/// Memory reserved up front for a payload; the rest grows as bytes arrive.
const INITIAL_RESERVE: u64 = 1 << 20;

/// How to read the payload after a header.
#[derive(Debug)]
pub(super) struct ReadPlan {
    /// The file the header announced.
    pub file: u32,
    pub payload_len: u64,
    /// Spool to an unnamed file in this directory instead of memory.
    pub spool: Option<PathBuf>,
    pub tx: oneshot::Sender<Result<Payload, FileFailure>>,
}

/// A payload that arrived whole.
#[derive(Debug)]
pub(super) enum Payload {
    Memory(Vec<u8>),
    Spool { file: File, len: u64 },
}

/// Reads `stream` until it ends, the driver declines a header, or a payload fails.
pub(super) async fn read(
    mut stream: RecvStream,
    tx: mpsc::UnboundedSender<Work>,
    clock: Arc<Clock>,
) {
    let mut leftover = Vec::new();
    loop {
        let frame = match read_header(&mut stream, &mut leftover, &clock).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send(Work::StreamError(e));
                return;
            }
        };
        let (reply, plan) = oneshot::channel();
        if tx.send(Work::Header { frame, reply }).is_err() {
            return;
        }
        let Ok(Some(plan)) = plan.await else {
            let _ = stream.stop(0u32.into());
            return;
        };
        let result = read_payload(&mut stream, &mut leftover, &plan, &clock).await;
        let failed = result.is_err();
        let _ = plan.tx.send(result);
        if failed {
            let _ = stream.stop(0u32.into());
            return;
        }
        // The client owes nothing more for this file; storing it is the daemon's own work.
        let _ = tx.send(Work::Arrived { file: plan.file });
    }
}

/// The next header frame; `None` when the stream ends (or breaks) between files.
async fn read_header(
    stream: &mut RecvStream,
    leftover: &mut Vec<u8>,
    clock: &Clock,
) -> Result<Option<Vec<u8>>, WireError> {
    let mut decoder = DaemonSession::file_header_decoder();
    let mut buf = std::mem::take(leftover);
    loop {
        let mut input = &buf[..];
        if let Some(frame) = decoder.decode(&mut input)? {
            *leftover = input.to_vec();
            return Ok(Some(frame));
        }
        match stream.read_chunk(CHUNK, true).await {
            Ok(Some(chunk)) => {
                clock.touch();
                buf = chunk.bytes.to_vec();
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

async fn read_payload(
    stream: &mut RecvStream,
    leftover: &mut Vec<u8>,
    plan: &ReadPlan,
    clock: &Clock,
) -> Result<Payload, FileFailure> {
    let len = plan.payload_len;
    let mut sink = match &plan.spool {
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
        sink.write(&leftover[..from_leftover]).await?;
        leftover.drain(..from_leftover);
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

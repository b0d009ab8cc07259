//! The push protocol as two state machines, one per side, in the style of quinn-proto.
//!
//! [`DaemonSession`] receives a push (or a command) and [`ClientSession`] sends one. Neither
//! touches a socket, a file or a clock: the driver feeds control-stream bytes, file-stream
//! headers, the results of the work it was asked to do and the current time (`u64` milliseconds
//! from any fixed origin) in through `handle_*` methods, and drains frames to send
//! (`poll_transmit`), work to do (`poll_request`) and the next deadline (`poll_timeout`). Anything
//! a peer sends that breaks the protocol ends the session with a typed [`ProtoError`]; on the
//! daemon side the client is told why in a final `Error` frame. See `docs/protocol.md`.

pub mod client;
pub mod daemon;
pub mod fuzz;

pub use client::{ClientConfig, ClientSession};
pub use daemon::DaemonSession;

use crate::manifest::ManifestError;
use crate::wire::{ErrorKind, FrameDecoder, WireError};

/// Why a session ended without success.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// Bytes from the peer were not a valid frame or message.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The peers speak different protocol versions.
    #[error("the peer speaks protocol version {theirs} but this side speaks {ours}; upgrade the older of relsync and relsyncd")]
    Version { ours: u16, theirs: u16 },
    /// The peer sent something the protocol does not allow at this point.
    #[error("protocol violation by the peer: {0}")]
    Protocol(String),
    /// A configured limit was exceeded, or the peer announced absurd limits.
    #[error("{0}")]
    Limit(String),
    /// The pushed manifest failed validation.
    #[error("manifest refused: {0}")]
    Manifest(#[from] ManifestError),
    /// A received file did not rebuild to the content the manifest declares.
    #[error("{0}")]
    Verify(String),
    /// Nothing arrived from the peer for `after_ms` while a message was due.
    #[error("no {waiting_for} from the peer within {after_ms} ms; the peer stalled or the network is down, try again")]
    MessageTimeout {
        waiting_for: &'static str,
        after_ms: u64,
    },
    /// The whole exchange took longer than the per-push deadline.
    #[error("the exchange did not finish within the push timeout of {after_ms} ms; try again or raise push_timeout")]
    PushTimeout { after_ms: u64 },
    /// The daemon gave up and said why (client side only).
    #[error("daemon reported {kind}: {message}")]
    Remote { kind: ErrorKind, message: String },
    /// The driver could not carry out a request (authorization, lock, disk, ...).
    #[error("{message}")]
    Local { kind: ErrorKind, message: String },
    /// The driver called the session out of turn: a bug in the driver, not the peer's fault.
    #[error("internal error: {0}")]
    Misuse(String),
}

impl ProtoError {
    /// The error kind reported to the peer (or, for [`ProtoError::Remote`], reported by it).
    pub fn kind(&self) -> ErrorKind {
        match self {
            ProtoError::Wire(WireError::FrameTooLarge { .. }) => ErrorKind::FrameTooLarge,
            ProtoError::Wire(_) | ProtoError::Protocol(_) => ErrorKind::BadRequest,
            ProtoError::Version { .. } => ErrorKind::Version,
            ProtoError::Limit(_) => ErrorKind::Limit,
            ProtoError::Manifest(ManifestError::TooManyEntries { .. }) => ErrorKind::Limit,
            ProtoError::Manifest(_) => ErrorKind::BadRequest,
            ProtoError::Verify(_) => ErrorKind::Verify,
            ProtoError::MessageTimeout { .. } | ProtoError::PushTimeout { .. } => {
                ErrorKind::Timeout
            }
            ProtoError::Remote { kind, .. } | ProtoError::Local { kind, .. } => *kind,
            ProtoError::Misuse(_) => ErrorKind::Internal,
        }
    }
}

/// The two deadlines of a session: the whole exchange, and the silence allowed while the peer
/// owes a message.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    push_timeout: u64,
    push_deadline: u64,
    message_timeout: u64,
    last_progress: u64,
}

impl Deadlines {
    fn new(now: u64, message_timeout: u64, push_timeout: u64) -> Deadlines {
        Deadlines {
            push_timeout,
            push_deadline: now.saturating_add(push_timeout),
            message_timeout,
            last_progress: now,
        }
    }

    /// Something arrived from the peer (or the wait for it starts now).
    fn progress(&mut self, now: u64) {
        self.last_progress = self.last_progress.max(now);
    }

    /// The latest time the session was given.
    fn now(&self) -> u64 {
        self.last_progress
    }

    fn next(&self, waiting: Option<&'static str>) -> u64 {
        match waiting {
            Some(_) => self
                .push_deadline
                .min(self.last_progress.saturating_add(self.message_timeout)),
            None => self.push_deadline,
        }
    }

    fn expired(&self, now: u64, waiting: Option<&'static str>) -> Option<ProtoError> {
        if now >= self.push_deadline {
            return Some(ProtoError::PushTimeout {
                after_ms: self.push_timeout,
            });
        }
        let what = waiting?;
        (now >= self.last_progress.saturating_add(self.message_timeout)).then_some(
            ProtoError::MessageTimeout {
                waiting_for: what,
                after_ms: self.message_timeout,
            },
        )
    }
}

/// What both sessions expose to [`read_control`], the one loop that reads a control stream.
trait ControlStream {
    fn finished(&self) -> bool;
    fn reader(&mut self) -> (&mut FrameDecoder, &mut Deadlines);
    fn frame(&mut self, frame: &[u8]) -> Result<(), ProtoError>;
    fn failed(&mut self, e: ProtoError);
}

/// Feeds control-stream bytes, in any chunking, to `s` frame by frame until they run out or the
/// session ends; a frame the session refuses, or bytes that are no frame, end it.
fn read_control(s: &mut impl ControlStream, mut bytes: &[u8], now: u64) {
    if s.finished() {
        return;
    }
    if !bytes.is_empty() {
        s.reader().1.progress(now);
    }
    while !s.finished() {
        match s.reader().0.decode(&mut bytes) {
            Ok(Some(frame)) => {
                if let Err(e) = s.frame(&frame) {
                    s.failed(e);
                }
            }
            Ok(None) => return,
            Err(e) => s.failed(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_take_the_earlier_of_both() {
        let mut d = Deadlines::new(1000, 30, 100);
        assert_eq!(d.next(None), 1100);
        assert_eq!(d.next(Some("x")), 1030);
        assert!(d.expired(1029, Some("x")).is_none());
        assert!(matches!(
            d.expired(1030, Some("x")),
            Some(ProtoError::MessageTimeout {
                waiting_for: "x",
                after_ms: 30
            })
        ));
        assert!(d.expired(1030, None).is_none());
        d.progress(1090);
        d.progress(1050);
        assert_eq!(d.next(Some("x")), 1100);
        assert!(matches!(
            d.expired(1100, Some("x")),
            Some(ProtoError::PushTimeout { after_ms: 100 })
        ));
        let far = Deadlines::new(u64::MAX - 1, u64::MAX, u64::MAX);
        assert_eq!(far.next(Some("x")), u64::MAX);
    }

    #[test]
    fn every_error_has_the_kind_the_peer_sees() {
        let table: Vec<(ProtoError, ErrorKind)> = vec![
            (
                WireError::FrameTooLarge { len: 9, max: 1 }.into(),
                ErrorKind::FrameTooLarge,
            ),
            (
                WireError::Truncated { have: 1, need: 2 }.into(),
                ErrorKind::BadRequest,
            ),
            (
                ProtoError::Version { ours: 1, theirs: 2 },
                ErrorKind::Version,
            ),
            (ProtoError::Protocol("x".into()), ErrorKind::BadRequest),
            (ProtoError::Limit("x".into()), ErrorKind::Limit),
            (
                ManifestError::TooManyEntries { count: 2, max: 1 }.into(),
                ErrorKind::Limit,
            ),
            (ManifestError::SizeOverflow.into(), ErrorKind::BadRequest),
            (ProtoError::Verify("x".into()), ErrorKind::Verify),
            (ProtoError::PushTimeout { after_ms: 1 }, ErrorKind::Timeout),
            (
                ProtoError::Local {
                    kind: ErrorKind::NoSpace,
                    message: "x".into(),
                },
                ErrorKind::NoSpace,
            ),
            (ProtoError::Misuse("x".into()), ErrorKind::Internal),
        ];
        for (e, kind) in table {
            assert_eq!(e.kind(), kind, "{e}");
        }
    }
}

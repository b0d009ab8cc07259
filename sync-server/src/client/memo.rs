//! Payloads encoded once and sent to many daemons.
//!
//! When one release goes to many hosts at once, hosts that hold the same basis need the same
//! bytes: the same full payload for new content, the same zstd-reference delta for the same
//! cached basis, the same rsync delta for the same basis signature. [`PayloadMemo`] keys each
//! encoding by exactly what determines it — the content hash and the method, with the basis
//! hash and, for rsync, the digest of the signature the daemon sent (a daemon sending a bogus
//! signature therefore gets its own entry and cannot spoil the payload of the others) — and
//! lets the first push that needs a payload encode it while the others wait for the result. A
//! push claims the keys of a whole batch of files at once without waiting ([`PayloadMemo::claim`]),
//! encodes those nobody else is encoding, and only then waits for the rest, so pushes claiming
//! overlapping batches never wait on each other in a circle.
//!
//! Entries are kept while their total size is within the memo's budget, oldest dropped first;
//! a push that finds an entry gone encodes the file again, so the budget bounds memory, not
//! correctness. The pushes of one fleet also share one CPU budget for encoding, so N parallel
//! pushes do not start N times as many encoders as there are cores.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};

use sync_core::delta::{DeltaFormat, RawFrame};
use sync_core::manifest::Hash;
use sync_core::proto::client::{Method, SendFile};
use tokio::sync::{watch, Semaphore};

use crate::file_bytes::Content;

/// What determines an encoded payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Key {
    Full(Hash),
    ZstdRef {
        content: Hash,
        basis: Hash,
    },
    Rsync {
        content: Hash,
        basis: Hash,
        signature: Hash,
    },
}

impl Key {
    pub(super) fn of(f: &SendFile) -> Key {
        match &f.method {
            Method::Full => Key::Full(f.hash),
            Method::ZstdRef { basis } => Key::ZstdRef {
                content: f.hash,
                basis: basis.hash,
            },
            Method::Rsync { basis, signature } => Key::Rsync {
                content: f.hash,
                basis: basis.hash,
                signature: Hash::of(signature.as_bytes()),
            },
        }
    }
}

/// An encoded payload and the format `delta::encode` chose for it.
#[derive(Debug)]
pub struct Payload {
    pub format: DeltaFormat,
    pub bytes: PayloadBytes,
}

/// A payload's bytes: in one buffer, or a large file's own bytes framed as zstd Raw blocks
/// ([`RawFrame`]) where they lie, so that a gigabyte that does not compress is not copied into a
/// payload buffer before it is sent.
pub enum PayloadBytes {
    Flat(Vec<u8>),
    Raw {
        content: Arc<Content>,
        frame: RawFrame,
    },
}

impl PayloadBytes {
    /// The payload's length.
    pub fn len(&self) -> usize {
        match self {
            PayloadBytes::Flat(v) => v.len(),
            PayloadBytes::Raw { frame, .. } => frame.payload_len() as usize,
        }
    }

    /// Whether the payload is empty (a raw frame never is).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes in one buffer, if they are (a raw frame's are not).
    pub fn flat(&self) -> Option<&[u8]> {
        match self {
            PayloadBytes::Flat(v) => Some(v),
            PayloadBytes::Raw { .. } => None,
        }
    }

    /// The payload in one new buffer (for comparisons: a sender sends a raw frame from where
    /// its content lies).
    pub fn to_vec(&self) -> Vec<u8> {
        match self {
            PayloadBytes::Flat(v) => v.clone(),
            PayloadBytes::Raw { content, frame } => {
                let mut out = Vec::with_capacity(self.len());
                out.extend_from_slice(frame.header());
                for (header, range) in frame.blocks() {
                    out.extend_from_slice(&header);
                    out.extend_from_slice(&content[range]);
                }
                out
            }
        }
    }
}

impl From<Vec<u8>> for PayloadBytes {
    fn from(v: Vec<u8>) -> PayloadBytes {
        PayloadBytes::Flat(v)
    }
}

impl PartialEq for PayloadBytes {
    fn eq(&self, other: &PayloadBytes) -> bool {
        match (self.flat(), other.flat()) {
            (Some(a), Some(b)) => a == b,
            _ => self.len() == other.len() && self.to_vec() == other.to_vec(),
        }
    }
}

impl fmt::Debug for PayloadBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PayloadBytes::Flat(v) => write!(f, "Flat({} bytes)", v.len()),
            PayloadBytes::Raw { frame, .. } => write!(f, "Raw({} bytes)", frame.payload_len()),
        }
    }
}

/// Where a key's payload stands.
#[derive(Debug)]
enum Cell {
    /// A push is encoding it (its [`Ticket`] has number `ticket`); the receiver learns when it
    /// filled the cell or gave up, as the ticket's sender is dropped either way.
    Encoding {
        ticket: u64,
        done: watch::Receiver<()>,
    },
    Filled(Arc<Payload>),
}

#[derive(Debug, Default)]
struct Entries {
    cells: HashMap<Key, Cell>,
    /// Filled cells in the order they were filled, with their size.
    filled: VecDeque<(Key, u64)>,
    bytes: u64,
    tickets: u64,
}

/// Payloads shared by concurrent pushes of one release (see the module docs).
#[derive(Debug)]
pub struct PayloadMemo {
    budget: u64,
    entries: Mutex<Entries>,
    cpu: Arc<Semaphore>,
    hits: std::sync::atomic::AtomicU64,
    encodes: std::sync::atomic::AtomicU64,
    offered: std::sync::atomic::AtomicU64,
}

/// How often the memo saved an encoding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoStats {
    /// Payloads encoded.
    pub encodes: u64,
    /// Payloads taken from the memo instead.
    pub hits: u64,
    /// Payloads received from elsewhere and kept (see [`PayloadMemo::offer`]).
    pub offered: u64,
}

/// What [`PayloadMemo::claim`] found.
#[derive(Debug)]
pub(super) enum Claim {
    /// Encoded already.
    Ready(Arc<Payload>),
    /// Nobody has it: the caller encodes it and fills the ticket (or drops it, when the
    /// encoding failed, and the next caller encodes instead).
    Encode(Ticket),
    /// Another push is encoding it; the receiver's `changed` resolves once that push filled
    /// the cell or gave up ([`PayloadMemo::get_or_encode`] waits for that).
    Busy(watch::Receiver<()>),
}

/// The duty to encode one key (see [`Claim::Encode`]).
#[derive(Debug)]
pub(super) struct Ticket {
    memo: Arc<PayloadMemo>,
    key: Key,
    number: u64,
    filled: bool,
    /// Dropped when the ticket is filled or given up, which wakes the waiters.
    _done: watch::Sender<()>,
}

impl Ticket {
    /// Keeps `payload` for `key` and hands it back, shared.
    pub(super) fn fill(mut self, payload: Payload) -> Arc<Payload> {
        use std::sync::atomic::Ordering::Relaxed;
        let payload = Arc::new(payload);
        self.filled = true;
        self.memo.encodes.fetch_add(1, Relaxed);
        self.memo.keep(self.key, self.number, &payload);
        payload
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.filled {
            return;
        }
        let mut e = self.memo.lock();
        if matches!(e.cells.get(&self.key), Some(Cell::Encoding { ticket, .. }) if *ticket == self.number)
        {
            e.cells.remove(&self.key);
        }
    }
}

impl PayloadMemo {
    /// A memo keeping at most `budget` bytes of payloads, encoding on at most `cores` threads.
    pub fn new(budget: u64, cores: usize) -> PayloadMemo {
        PayloadMemo {
            budget,
            entries: Mutex::default(),
            cpu: Arc::new(Semaphore::new(cores.max(1))),
            hits: Default::default(),
            encodes: Default::default(),
            offered: Default::default(),
        }
    }

    pub(super) fn cpu(&self) -> &Arc<Semaphore> {
        &self.cpu
    }

    pub fn stats(&self) -> MemoStats {
        use std::sync::atomic::Ordering::Relaxed;
        MemoStats {
            encodes: self.encodes.load(Relaxed),
            hits: self.hits.load(Relaxed),
            offered: self.offered.load(Relaxed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The payload for `key` if it is there, else the duty to encode it unless another push
    /// has that duty already. Never waits, so a push can claim a whole batch of files, encode
    /// the ones it got in one go, and only then wait for the others.
    pub(super) fn claim(self: &Arc<Self>, key: Key) -> Claim {
        use std::sync::atomic::Ordering::Relaxed;
        let mut e = self.lock();
        match e.cells.get(&key) {
            Some(Cell::Filled(p)) => {
                let p = Arc::clone(p);
                drop(e);
                self.hits.fetch_add(1, Relaxed);
                Claim::Ready(p)
            }
            Some(Cell::Encoding { done, .. }) => Claim::Busy(done.clone()),
            None => {
                e.tickets += 1;
                let number = e.tickets;
                let (tx, rx) = watch::channel(());
                e.cells.insert(
                    key,
                    Cell::Encoding {
                        ticket: number,
                        done: rx,
                    },
                );
                Claim::Encode(Ticket {
                    memo: Arc::clone(self),
                    key,
                    number,
                    filled: false,
                    _done: tx,
                })
            }
        }
    }

    /// The payload for `key`: the memo's, or the one `encode` produces (which the memo then
    /// keeps). Concurrent callers with the same key wait for one encoding; if it fails or is
    /// cancelled, the next waiter encodes instead.
    pub(super) async fn get_or_encode<F, Fut, E>(
        self: &Arc<Self>,
        key: Key,
        encode: F,
    ) -> Result<Arc<Payload>, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Payload, E>>,
    {
        let ticket = loop {
            match self.claim(key) {
                Claim::Ready(p) => return Ok(p),
                Claim::Encode(ticket) => break ticket,
                // Resolves once the encoding push filled the cell or gave up; look again.
                Claim::Busy(mut done) => {
                    let _ = done.changed().await;
                }
            }
        };
        Ok(ticket.fill(encode().await?))
    }

    /// Keeps `bytes`, a payload in `format` that rebuilds `content` (against `basis`, for a
    /// zstd-reference delta) and was already checked by doing so, for the pushes that would
    /// encode the same. Rsync deltas are not offered: they answer one receiver's signature.
    /// Returns whether the memo took it (not when it holds that key already, or a push is
    /// encoding it).
    pub fn offer(
        &self,
        content: Hash,
        format: DeltaFormat,
        basis: Option<Hash>,
        bytes: Vec<u8>,
    ) -> bool {
        let key = match (format, basis) {
            (DeltaFormat::Full, _) => Key::Full(content),
            (DeltaFormat::ZstdRef, Some(basis)) => Key::ZstdRef { content, basis },
            _ => return false,
        };
        if bytes.len() as u64 > self.budget {
            return false;
        }
        let mut e = self.lock();
        if e.cells.contains_key(&key) {
            return false;
        }
        self.fill_locked(
            &mut e,
            key,
            &Arc::new(Payload {
                format,
                bytes: bytes.into(),
            }),
        );
        self.offered
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Fills the cell of ticket `number` and drops the oldest filled cells beyond the budget.
    fn keep(&self, key: Key, number: u64, payload: &Arc<Payload>) {
        let mut e = self.lock();
        if !matches!(e.cells.get(&key), Some(Cell::Encoding { ticket, .. }) if *ticket == number) {
            return;
        }
        self.fill_locked(&mut e, key, payload);
    }

    fn fill_locked(&self, e: &mut Entries, key: Key, payload: &Arc<Payload>) {
        let size = payload.bytes.len() as u64;
        e.cells.insert(key, Cell::Filled(Arc::clone(payload)));
        e.filled.push_back((key, size));
        e.bytes += size;
        while e.bytes > self.budget {
            let Some((old, size)) = e.filled.pop_front() else {
                break;
            };
            e.bytes -= size;
            e.cells.remove(&old);
        }
    }

    /// Payload bytes held now.
    pub fn held_bytes(&self) -> u64 {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn payload(n: usize) -> Payload {
        Payload {
            format: DeltaFormat::Full,
            bytes: vec![1; n].into(),
        }
    }

    #[tokio::test]
    async fn one_encoding_serves_every_push_with_the_same_key() {
        let memo = Arc::new(PayloadMemo::new(1 << 20, 2));
        let calls = Arc::new(AtomicU64::new(0));
        let key = Key::Full(Hash::of(b"a"));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (memo, calls) = (Arc::clone(&memo), Arc::clone(&calls));
            tasks.push(tokio::spawn(async move {
                memo.get_or_encode(key, || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    Ok::<_, ()>(payload(100))
                })
                .await
                .unwrap()
            }));
        }
        let mut got = Vec::new();
        for t in tasks {
            got.push(t.await.unwrap());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(got.iter().all(|p| Arc::ptr_eq(p, &got[0])));
        assert_eq!(
            memo.stats(),
            MemoStats {
                encodes: 1,
                hits: 7,
                offered: 0
            }
        );
    }

    #[tokio::test]
    async fn different_bases_and_signatures_are_different_payloads() {
        let memo = Arc::new(PayloadMemo::new(1 << 20, 1));
        let (c, b1, b2) = (Hash::of(b"c"), Hash::of(b"b1"), Hash::of(b"b2"));
        let keys = [
            Key::Full(c),
            Key::ZstdRef {
                content: c,
                basis: b1,
            },
            Key::ZstdRef {
                content: c,
                basis: b2,
            },
            Key::Rsync {
                content: c,
                basis: b1,
                signature: Hash::of(b"s1"),
            },
            Key::Rsync {
                content: c,
                basis: b1,
                signature: Hash::of(b"s2"),
            },
        ];
        for (i, k) in keys.iter().enumerate() {
            let p = memo
                .get_or_encode(*k, || async move { Ok::<_, ()>(payload(i + 1)) })
                .await
                .unwrap();
            assert_eq!(p.bytes.len(), i + 1, "{k:?}");
        }
        assert_eq!(memo.stats().encodes, keys.len() as u64);
    }

    #[tokio::test]
    async fn a_failed_encoding_is_retried_and_the_budget_drops_the_oldest() {
        let memo = Arc::new(PayloadMemo::new(250, 1));
        let k = |s: &[u8]| Key::Full(Hash::of(s));
        let failed = memo
            .get_or_encode(k(b"x"), || async { Err::<Payload, _>("disk error") })
            .await;
        assert_eq!(failed.unwrap_err(), "disk error");
        let p = memo
            .get_or_encode(k(b"x"), || async { Ok::<_, &str>(payload(100)) })
            .await
            .unwrap();
        assert_eq!(p.bytes.len(), 100);
        for s in [b"y", b"z"] {
            memo.get_or_encode(k(s), || async { Ok::<_, &str>(payload(100)) })
                .await
                .unwrap();
        }
        // x was dropped to stay within 250 bytes: asking again encodes again.
        assert_eq!(memo.held_bytes(), 200);
        let again = memo
            .get_or_encode(k(b"x"), || async { Ok::<_, &str>(payload(7)) })
            .await
            .unwrap();
        assert_eq!(again.bytes.len(), 7);
        let kept = memo
            .get_or_encode(k(b"z"), || async { Ok::<_, &str>(payload(1)) })
            .await
            .unwrap();
        assert_eq!(kept.bytes.len(), 100, "z is still held");
    }

    #[tokio::test]
    async fn an_offered_payload_is_sent_as_received_and_rsync_deltas_are_not_kept() {
        let memo = Arc::new(PayloadMemo::new(1000, 1));
        let (c, b) = (Hash::of(b"c"), Hash::of(b"b"));
        assert!(memo.offer(c, DeltaFormat::Full, None, vec![7; 10]));
        assert!(memo.offer(c, DeltaFormat::ZstdRef, Some(b), vec![8; 4]));
        assert!(
            !memo.offer(c, DeltaFormat::Full, None, vec![9; 3]),
            "held already"
        );
        assert!(!memo.offer(c, DeltaFormat::Rsync, Some(b), vec![1]));
        assert!(
            !memo.offer(c, DeltaFormat::ZstdRef, None, vec![1]),
            "no basis"
        );
        assert!(
            !memo.offer(b, DeltaFormat::Full, None, vec![0; 1001]),
            "over budget"
        );
        let never = || async { Err::<Payload, _>("must not encode") };
        let full = memo.get_or_encode(Key::Full(c), never).await.unwrap();
        assert_eq!(
            (full.format, full.bytes.to_vec()),
            (DeltaFormat::Full, vec![7; 10])
        );
        let zref = memo
            .get_or_encode(
                Key::ZstdRef {
                    content: c,
                    basis: b,
                },
                never,
            )
            .await
            .unwrap();
        assert_eq!(zref.bytes.to_vec(), vec![8; 4]);
        assert_eq!(
            memo.stats(),
            MemoStats {
                encodes: 0,
                hits: 2,
                offered: 2
            }
        );
        assert_eq!(memo.held_bytes(), 14);
        // A key a push is encoding is that push's to fill.
        let busy = Key::Full(b);
        let Claim::Encode(ticket) = memo.claim(busy) else {
            panic!("nobody had the key")
        };
        assert!(!memo.offer(b, DeltaFormat::Full, None, vec![1; 5]));
        assert_eq!(ticket.fill(payload(3)).bytes.len(), 3);
    }

    #[tokio::test]
    async fn a_claimed_key_is_busy_until_filled_or_given_up() {
        let memo = Arc::new(PayloadMemo::new(1 << 20, 1));
        let key = Key::Full(Hash::of(b"k"));
        let Claim::Encode(first) = memo.claim(key) else {
            panic!("nobody had the key")
        };
        let Claim::Busy(mut waiting) = memo.claim(key) else {
            panic!("the key is being encoded")
        };
        // Giving up wakes the waiter, and the next claim gets the duty.
        drop(first);
        assert!(waiting.changed().await.is_err());
        let Claim::Encode(second) = memo.claim(key) else {
            panic!("the first encoder gave up")
        };
        let Claim::Busy(mut waiting) = memo.claim(key) else {
            panic!("the key is being encoded again")
        };
        let filled = second.fill(payload(10));
        assert!(waiting.changed().await.is_err());
        let Claim::Ready(p) = memo.claim(key) else {
            panic!("the key was filled")
        };
        assert!(Arc::ptr_eq(&p, &filled));
        assert_eq!(
            memo.stats(),
            MemoStats {
                encodes: 1,
                hits: 1,
                offered: 0
            }
        );
        assert_eq!(memo.held_bytes(), 10);
    }
}

//! Payloads encoded once and sent to many daemons.
//!
//! When one release goes to many hosts at once, hosts that hold the same basis need the same
//! bytes: the same full payload for new content, the same zstd-reference delta for the same
//! cached basis, the same rsync delta for the same basis signature. [`PayloadMemo`] keys each
//! encoding by exactly what determines it — the content hash and the method, with the basis
//! hash and, for rsync, the digest of the signature the daemon sent (a daemon sending a bogus
//! signature therefore gets its own entry and cannot spoil the payload of the others) — and
//! lets the first push that needs a payload encode it while the others wait for the result.
//!
//! Entries are kept while their total size is within the memo's budget, oldest dropped first;
//! a push that finds an entry gone encodes the file again, so the budget bounds memory, not
//! correctness. The pushes of one fleet also share one CPU budget for encoding, so N parallel
//! pushes do not start N times as many encoders as there are cores.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use sync_core::delta::DeltaFormat;
use sync_core::manifest::Hash;
use sync_core::proto::client::{Method, SendFile};
use tokio::sync::{OnceCell, Semaphore};

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
    pub bytes: Vec<u8>,
}

type Cell = Arc<OnceCell<Arc<Payload>>>;

#[derive(Debug, Default)]
struct Entries {
    cells: HashMap<Key, Cell>,
    /// Filled cells in the order they were filled, with their size.
    filled: VecDeque<(Key, u64)>,
    bytes: u64,
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

    /// The payload for `key`: the memo's, or the one `encode` produces (which the memo then
    /// keeps). Concurrent callers with the same key wait for one encoding; if it fails or is
    /// cancelled, the next waiter encodes instead.
    pub(super) async fn get_or_encode<F, Fut, E>(
        &self,
        key: Key,
        encode: F,
    ) -> Result<Arc<Payload>, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Payload, E>>,
    {
        use std::sync::atomic::Ordering::Relaxed;
        let cell = Arc::clone(self.lock().cells.entry(key).or_default());
        let mut encoded_here = false;
        let payload = cell
            .get_or_try_init(|| async {
                encoded_here = true;
                encode().await.map(Arc::new)
            })
            .await?;
        if encoded_here {
            self.encodes.fetch_add(1, Relaxed);
            self.keep(key, &cell, payload.bytes.len() as u64);
        } else {
            self.hits.fetch_add(1, Relaxed);
        }
        Ok(Arc::clone(payload))
    }

    /// Keeps `bytes`, a payload in `format` that rebuilds `content` (against `basis`, for a
    /// zstd-reference delta) and was already checked by doing so, for the pushes that would
    /// encode the same. Rsync deltas are not offered: they answer one receiver's signature.
    /// Returns whether the memo took it (not when it holds that key already).
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
        let size = bytes.len() as u64;
        if size > self.budget {
            return false;
        }
        let cell = Arc::clone(self.lock().cells.entry(key).or_default());
        if cell.set(Arc::new(Payload { format, bytes })).is_err() {
            return false;
        }
        self.offered
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.keep(key, &cell, size);
        true
    }

    /// Accounts a newly filled cell and drops the oldest ones beyond the budget.
    fn keep(&self, key: Key, cell: &Cell, size: u64) {
        let mut e = self.lock();
        // The cell may have been dropped (and replaced) while it was being filled.
        if !e.cells.get(&key).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            return;
        }
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
            bytes: vec![1; n],
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
        let memo = PayloadMemo::new(1 << 20, 1);
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
        let memo = PayloadMemo::new(250, 1);
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
        let memo = PayloadMemo::new(1000, 1);
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
            (full.format, full.bytes.clone()),
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
        assert_eq!(zref.bytes, vec![8; 4]);
        assert_eq!(
            memo.stats(),
            MemoStats {
                encodes: 0,
                hits: 2,
                offered: 2
            }
        );
        assert_eq!(memo.held_bytes(), 14);
    }
}

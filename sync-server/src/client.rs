//! The client side of the protocol over QUIC: connect to a daemon with pinned keys, push a
//! release, or run a command.
//!
//! The protocol decisions live in `sync_core::proto::ClientSession`; this module only moves its
//! bytes over a quinn connection and carries out its requests: [`connect`] dials and checks keys
//! (with errors that say which command fixes them), [`push`] scans nothing itself but reads the
//! files the session asks for from the source tree ([`SourceTree`], which refuses anything not in
//! the pushed manifest), encodes them with `delta` (using the [`Cache`] of what was last pushed
//! for zstd-reference deltas) and writes each on its own unidirectional stream, several at once.
//! [`command`] runs `releases`, `activate`, `rollback` and `prune`, and [`sync`] mirrors a tree
//! into an export the way [`push`] sends a release. Success is reported only when the session's
//! outcome says so; anything else is a [`ClientError`]. One connection per command.

pub mod cache;
mod driver;
pub mod memo;
pub mod rate;
pub mod source;
pub mod target;

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::{ConnectionError, Endpoint};
use sync_core::manifest::{Hash, Manifest, Policy};
use sync_core::proto::client::{
    likely_sends, ClientConfig, ClientState, Outcome, PackedManifest, PushJob, SyncJob,
};
use sync_core::proto::ClientSession;
use sync_core::relay::RelayPlan;
use sync_core::wire::{AppName, Command, ErrorKind};
use sync_core::{RelPath, ReleaseId};

use crate::net::{self, ConnectError, NetConfig, NetError};
use crate::tls::{Fingerprint, Identity, KnownHosts, PinnedServerVerifier};

pub use cache::{Cache, CacheError, CacheUpdate, Stored};
pub use memo::{MemoStats, PayloadMemo};
pub use rate::{parse_rate, RateError, RateLimit};
pub use source::{Locate, SourceError, SourceTree};
pub use target::{is_sync_url, looks_remote, SyncTarget, Target, TargetError};

/// Why a remote command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("cannot resolve host {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("host {host} has no address")]
    NoAddress { host: String },
    /// The daemon's key is not pinned, or changed; the message says what to run.
    #[error(transparent)]
    Pin(crate::tls::PinError),
    #[error("the daemon at {host_port} does not authorize key {key} for any app or export; add it to `authorized_keys` of {app} in relsyncd's config")]
    KeyRefused {
        host_port: String,
        key: Fingerprint,
        app: AppName,
    },
    #[error("no answer from {host_port}{} within {} s; check that relsyncd runs there and that UDP port {} is reachable", via(.host_port, .addr), .after.as_secs(), .addr.port())]
    ConnectTimeout {
        host_port: String,
        addr: SocketAddr,
        after: Duration,
    },
    #[error(transparent)]
    Connect(ConnectError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("{target}: connection lost while {during}: {source}")]
    Connection {
        target: String,
        during: String,
        #[source]
        source: ConnectionError,
    },
    /// The session ended with an error: the daemon's (`kind` as it reported it), or the
    /// client's own verdict on what the daemon did.
    #[error("{target}: {message}")]
    Session {
        target: String,
        kind: ErrorKind,
        message: String,
    },
    #[error("{target}: sending {path} failed: {message}")]
    Stream {
        target: String,
        path: RelPath,
        message: String,
    },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("{target}: internal error: {message}")]
    Internal { target: String, message: String },
}

/// The longest [`Connection::close`] waits for the close frame to go out.
const CLOSE_WAIT: Duration = Duration::from_millis(50);

/// ` (address)` when `host_port` does not already say it.
fn via(host_port: &str, addr: &SocketAddr) -> String {
    if *host_port == addr.to_string() {
        String::new()
    } else {
        format!(" ({addr})")
    }
}

/// A connection to one app on one daemon, both keys checked.
#[derive(Debug)]
pub struct Connection {
    /// The endpoint the connection was dialled from: its socket lives as long as this.
    _endpoint: Endpoint,
    conn: quinn::Connection,
    target: Target,
    addr: SocketAddr,
    config: ClientConfig,
}

/// Dials `target`, pinning the daemon's key from `known_hosts` and presenting `identity`.
///
/// Addresses are tried IPv4 first (relsyncd listens on `0.0.0.0` by default), each for at most
/// `timeout`; a key problem stops at once, since another address would present the same key.
pub async fn connect(
    target: &Target,
    identity: &Identity,
    known_hosts: &KnownHosts,
    net: &NetConfig,
    timeout: Duration,
) -> Result<Connection, ClientError> {
    let host_port = target.host_port();
    // Checks the host the way the pin lookup does, so a bad one is reported as such.
    PinnedServerVerifier::from_known_hosts(known_hosts, &host_port).map_err(|e| {
        TargetError::Host {
            text: host_port.clone(),
            source: e,
        }
    })?;
    connect_pinned(
        target,
        identity,
        known_hosts.lookup(&host_port),
        net,
        timeout,
    )
    .await
}

/// [`connect`] with the daemon's key given (`None`: not known, so any key is refused with a
/// message saying how to pin it): what a fleet file's `key` does.
pub async fn connect_pinned(
    target: &Target,
    identity: &Identity,
    pin: Option<Fingerprint>,
    net: &NetConfig,
    timeout: Duration,
) -> Result<Connection, ClientError> {
    let host = target.bare_host();
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, target.port()))
        .await
        .map_err(|source| ClientError::Resolve {
            host: host.to_owned(),
            source,
        })?
        .collect();
    addrs.sort_by_key(|a| a.is_ipv6());
    addrs.dedup();
    if addrs.is_empty() {
        return Err(ClientError::NoAddress {
            host: host.to_owned(),
        });
    }
    let host_port = target.host_port();
    let mut last = None;
    for addr in addrs {
        let bind: SocketAddr = if addr.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = net::client_endpoint(bind, net)?;
        let verifier = Arc::new(PinnedServerVerifier::new(&host_port, pin).map_err(|e| {
            TargetError::Host {
                text: host_port.clone(),
                source: e,
            }
        })?);
        let attempt = net::connect(&endpoint, addr, host, verifier, identity, net);
        let err = match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(conn)) => {
                return Ok(Connection {
                    _endpoint: endpoint,
                    conn,
                    target: target.clone(),
                    addr,
                    config: ClientConfig::default(),
                })
            }
            Ok(Err(ConnectError::Pin(pin))) => return Err(ClientError::Pin(pin)),
            Ok(Err(ConnectError::ClientKeyRefused { host_port, key })) => {
                return Err(ClientError::KeyRefused {
                    host_port,
                    key,
                    app: target.app().clone(),
                })
            }
            Ok(Err(e)) => ClientError::Connect(e),
            Err(_elapsed) => ClientError::ConnectTimeout {
                host_port: host_port.clone(),
                addr,
                after: timeout,
            },
        };
        endpoint.close(0u32.into(), b"giving up");
        tracing::debug!("{err}");
        last = Some(err);
    }
    Err(last.expect("at least one address was tried"))
}

impl Connection {
    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn remote_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The daemon's key, as checked against the pin.
    pub fn daemon_key(&self) -> Option<Fingerprint> {
        net::peer_fingerprint(&self.conn)
    }

    /// Replaces the session limits (frame size, streams, timeouts) used by later commands.
    pub fn set_config(&mut self, config: ClientConfig) {
        self.config = config;
    }

    /// Whether neither side has closed the connection (nor has it timed out) so far.
    pub fn is_open(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    /// Closes the connection and returns once there is nothing left to tell the daemon: the
    /// close went out (the connection's driver task sends it), or the daemon had closed first.
    /// Waits at most [`CLOSE_WAIT`].
    ///
    /// The daemon closes as soon as the client acknowledged its last reply, so its close is often
    /// in before the driver task reports it as the close reason: a close frame received counts. After
    /// its own close a connection sends nothing but close packets, so a datagram counted after
    /// the close call is one. `Endpoint::wait_idle` would sit out QUIC's whole draining period
    /// instead (three probe timeouts, 70 ms even on loopback). A daemon that misses the close
    /// lets the session go after its flush wait.
    pub async fn close(self) {
        let sent_before = self.conn.stats().udp_tx.datagrams;
        self.conn.close(0u32.into(), b"done");
        let deadline = tokio::time::Instant::now() + CLOSE_WAIT;
        loop {
            let stats = self.conn.stats();
            let told = stats.frame_rx.connection_close > 0
                || stats.udp_tx.datagrams != sent_before
                || !matches!(
                    self.conn.close_reason(),
                    Some(quinn::ConnectionError::LocallyClosed) | None
                );
            if told || tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Payload bytes a push keeps encoded ahead ([`driver::pre_encode`]) when no memo is shared
/// with other pushes.
const PRE_ENCODE_MEMO_BYTES: u64 = 64 << 20;

/// Aborts the task when dropped (a push that ends stops encoding ahead for it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A push to run.
#[derive(Debug, Clone)]
pub struct PushRequest {
    pub release: ReleaseId,
    /// The scanned manifest of `source`.
    pub manifest: Arc<Manifest>,
    pub source: std::path::PathBuf,
    /// Make the release current once it is staged.
    pub activate: bool,
}

/// Counts per payload format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PerFormat {
    pub full: u64,
    pub zstd_ref: u64,
    pub rsync: u64,
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct PushReport {
    /// The session's account: files, needs, formats, what the daemon staged.
    pub session: sync_core::proto::client::PushReport,
    /// Payload bytes per format.
    pub sent_bytes: PerFormat,
    /// What the client cache did after the push (`None` without a cache).
    pub cache: Option<Result<CacheUpdate, String>>,
}

/// What the daemon would need for a push, asked without sending anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NeedReport {
    /// Files and bytes in the manifest.
    pub files: u64,
    pub bytes: u64,
    /// Files the daemon needs and their size.
    pub needed_files: u64,
    pub needed_bytes: u64,
    /// Needed files the daemon has an older version of (candidates for a delta), and how many
    /// of those the cache holds (a zstd-reference delta without a round trip).
    pub with_basis: u64,
    pub cached_basis: u64,
    /// Files and bytes the daemon already holds.
    pub have_files: u64,
    pub have_bytes: u64,
    /// The needed paths with their size, in manifest order.
    pub paths: Vec<(RelPath, u64)>,
}

/// Progress of a push, for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The session moved on (handshake, manifest, transfer, staging, activation).
    State(ClientState),
    /// The daemon's need is known: this many files and bytes will be sent.
    Need { files: u64, bytes: u64 },
    /// One file went out: its size, and the payload that carried it.
    Sent { bytes: u64, payload: u64 },
}

/// How a push uses the client cache and shares work with concurrent pushes.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    pub cache: Option<Arc<Cache>>,
    /// Record the push in the cache once it succeeded. A fleet push leaves this off and records
    /// all its hosts at once ([`Cache::store_missing`], [`Cache::commit_all`]).
    pub record: bool,
    /// The contents the cache holds, when the caller listed them already.
    pub cached: Option<Arc<HashSet<Hash>>>,
    /// Payloads encoded once for every push of the same release.
    pub memo: Option<Arc<PayloadMemo>>,
    /// Payload bytes (KiB) encoded and waiting to be written at once (default 512 MiB).
    pub memory_kib: Option<u32>,
    /// `--bwlimit`: the payload bytes of every push sharing it together keep to its rate.
    pub rate: Option<Arc<RateLimit>>,
    /// Daemons the receiving daemon forwards the release to as it arrives (a relayed fleet
    /// push); its `Staged` then reports each of them.
    pub relay: Option<RelayPlan>,
    /// Read the files from here, waiting for content still on its way, instead of from
    /// `PushRequest::source` (a relay forwarding a release it is still receiving).
    pub locate: Option<Arc<dyn Locate>>,
    /// The encoded manifest the daemon probably holds, to send the new one as a delta against:
    /// a relay's current release, or what [`read_cache_for`] read ahead. When given, the cache's
    /// last manifest for the target is not read again.
    pub manifest_basis: Option<Arc<[u8]>>,
    /// `manifest_basis` decoded, when the caller has it (as [`read_cache_for`] does): the push
    /// guesses from it what it will send, and decodes it itself otherwise.
    pub basis_manifest: Option<Arc<Manifest>>,
    /// The manifest compressed against the basis ahead of time ([`pack_manifest`]), so the push
    /// sends it as soon as the daemon accepts the basis.
    pub packed_manifest: Option<PackedManifest>,
}

/// Pushes `req` over `conn`: sends what the daemon needs, waits until it staged (and, with
/// `activate`, activated) the release, then records the push in `cache`.
pub async fn push(
    conn: &Connection,
    req: &PushRequest,
    cache: Option<&Arc<Cache>>,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<PushReport, ClientError> {
    let opts = PushOptions {
        cache: cache.cloned(),
        record: true,
        ..PushOptions::default()
    };
    push_with(conn, req, &opts, progress).await
}

/// [`push`] with the options spelled out.
pub async fn push_with(
    conn: &Connection,
    req: &PushRequest,
    opts: &PushOptions,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<PushReport, ClientError> {
    let source = match &opts.locate {
        Some(locate) => Arc::new(SourceTree::located(
            &req.source,
            Arc::clone(&req.manifest),
            Arc::clone(locate),
        )),
        None => open_source(&req.source, &req.manifest)?,
    };
    let mut cached = cached(
        opts.cache.as_ref(),
        &conn.target,
        opts.cached.as_deref(),
        opts.manifest_basis.is_none(),
    )
    .await;
    if cached.manifest.is_none() {
        cached.manifest.clone_from(&opts.manifest_basis);
    }
    let mut config = conn.config;
    if opts.locate.is_some() {
        // The driver looks again for every file out that has not arrived yet every 20 ms, at a
        // few failed opens each: keep the files out, and so those looks, to the streams.
        config.max_files_out = conn.config.max_files_out.min(conn.config.max_streams);
    }
    // A push to a target the cache knows: encode what it will most likely have to send while
    // the daemon works out what it needs.
    let _pre_encoding;
    let with_memo;
    let opts = match (&opts.locate, &opts.cache, &cached.manifest) {
        (None, Some(cache), Some(last)) => {
            let memo = opts.memo.clone().unwrap_or_else(|| {
                let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
                Arc::new(PayloadMemo::new(PRE_ENCODE_MEMO_BYTES, cores))
            });
            with_memo = PushOptions {
                memo: Some(Arc::clone(&memo)),
                ..opts.clone()
            };
            let (source, cache) = (Arc::clone(&source), Arc::clone(cache));
            let (manifest, last, decoded, hashes) = (
                Arc::clone(&req.manifest),
                Arc::clone(last),
                opts.basis_manifest.clone(),
                cached.hashes.clone(),
            );
            let predicted = tokio::task::spawn_blocking(move || {
                let last = match decoded {
                    Some(m) => m,
                    None => Arc::new(Manifest::decode(&last, &Policy::default()).ok()?),
                };
                Some(likely_sends(&manifest, &last, &hashes))
            });
            _pre_encoding = AbortOnDrop(tokio::spawn(async move {
                if let Ok(Some(files)) = predicted.await {
                    let mut tasks = driver::pre_encode(source, Some(cache), memo, files);
                    while tasks.join_next().await.is_some() {}
                }
            }));
            &with_memo
        }
        _ => opts,
    };
    let session = push_session(
        conn,
        config,
        req,
        cached,
        opts.relay.clone(),
        opts.packed_manifest.clone(),
    );
    let t = transfer(conn, session, source, &conn.target, opts, progress).await?;
    let Outcome::Pushed(report) = t.outcome else {
        return Err(ClientError::Internal {
            target: conn.target.to_string(),
            message: "the push session ended with another outcome".into(),
        });
    };
    Ok(PushReport {
        session: report,
        sent_bytes: t.sent_bytes,
        cache: t.cache,
    })
}

/// A sync to run.
#[derive(Debug, Clone)]
pub struct SyncRequest {
    /// The destination directory itself (the trailing-slash rule already applied, see
    /// [`SyncTarget::destination_for`]).
    pub destination: SyncTarget,
    /// Remove what the destination has and `manifest` does not.
    pub delete: bool,
    /// Ask for the plan; change nothing and send no file.
    pub dry_run: bool,
    /// The patterns `manifest` was scanned with; the destination's matching paths are left alone.
    pub excludes: Vec<String>,
    /// The scanned manifest of `source`.
    pub manifest: Arc<Manifest>,
    pub source: std::path::PathBuf,
}

/// What a sync did.
#[derive(Debug, Clone)]
pub struct SyncReport {
    /// The session's account: the plan, what the daemon needed and what went out, what it did.
    pub session: sync_core::proto::client::SyncReport,
    /// Payload bytes per format.
    pub sent_bytes: PerFormat,
    /// What the client cache did after the sync (`None` without a cache, and for a dry run).
    pub cache: Option<Result<CacheUpdate, String>>,
}

/// Mirrors `req`'s tree into its destination over `conn` (connected to the destination's daemon
/// and export): sends what the destination lacks, as deltas against its current files where the
/// cache or a signature allows, waits until the daemon applied the mirror, then records what the
/// destination now holds in `cache` (keyed on the destination, apart from pushes). A dry run
/// only asks for the plan.
pub async fn sync(
    conn: &Connection,
    req: &SyncRequest,
    cache: Option<&Arc<Cache>>,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<SyncReport, ClientError> {
    let source = open_source(&req.source, &req.manifest)?;
    let job = SyncJob {
        export: req.destination.export().clone(),
        subpath: req.destination.path().cloned(),
        delete: req.delete,
        dry_run: req.dry_run,
        excludes: req.excludes.clone(),
        manifest: Arc::clone(&req.manifest),
        cached: if req.dry_run {
            HashSet::new()
        } else {
            cached(cache, &req.destination, None, false).await.hashes
        },
    };
    let session = ClientSession::sync(conn.config, job, 0);
    let opts = PushOptions {
        cache: cache.cloned(),
        record: !req.dry_run,
        ..PushOptions::default()
    };
    let t = transfer(conn, session, source, &req.destination, &opts, progress).await?;
    let Outcome::Synced(report) = t.outcome else {
        return Err(ClientError::Internal {
            target: conn.target.to_string(),
            message: "the sync session ended with another outcome".into(),
        });
    };
    Ok(SyncReport {
        session: report,
        sent_bytes: t.sent_bytes,
        cache: t.cache,
    })
}

/// How a session that sent files ended.
struct Transferred {
    outcome: Outcome,
    sent_bytes: PerFormat,
    cache: Option<Result<CacheUpdate, String>>,
}

/// Drives `session`, which sends `source`'s files, to its end. With `opts.record`, the cache then
/// holds what was sent and notes it as `key`'s last manifest.
async fn transfer(
    conn: &Connection,
    session: ClientSession,
    source: Arc<SourceTree>,
    key: &(dyn std::fmt::Display + Sync),
    opts: &PushOptions,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<Transferred, ClientError> {
    let cache = opts.cache.as_ref();
    // Once every file went out the client only waits for the daemon to build the release (or
    // apply the sync): add this transfer's contents to the cache meanwhile, and record it
    // itself once it succeeded.
    let storing = Mutex::new(None);
    let start_storing = || {
        if let Some(c) = cache.filter(|_| opts.record) {
            let mut slot = storing.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                let (c, s) = (Arc::clone(c), Arc::clone(&source));
                let listed = opts.cached.clone();
                *slot = Some(tokio::task::spawn_blocking(move || {
                    let t = std::time::Instant::now();
                    let stored = c.store_missing_from(&s, listed.as_deref());
                    tracing::debug!(ms = t.elapsed().as_millis() as u64, "cache: stored");
                    stored
                }));
            }
        }
    };
    let hook = |p: Progress| {
        if matches!(
            p,
            Progress::State(ClientState::Staging | ClientState::Mirroring)
        ) {
            start_storing();
        }
        progress(p);
    };
    let driven = driver::drive(
        conn,
        session,
        Some(driver::Files {
            source: Arc::clone(&source),
            cache: cache.cloned(),
            memo: opts.memo.clone(),
            memory_kib: opts.memory_kib.unwrap_or(driver::MEMORY_BUDGET_KIB),
            rate: opts.rate.clone(),
        }),
        false,
        &hook,
    )
    .await?;
    let Some(outcome) = driven.outcome else {
        return Err(ClientError::Internal {
            target: conn.target.to_string(),
            message: "the session ended without an outcome".into(),
        });
    };
    start_storing();
    let pending = storing.lock().unwrap_or_else(|p| p.into_inner()).take();
    let cache = match (cache, pending) {
        (Some(c), Some(pending)) => {
            let (c, key, manifest) = (
                Arc::clone(c),
                key.to_string(),
                Arc::clone(source.manifest()),
            );
            let recorded = async move {
                let stored = pending.await.map_err(|e| e.to_string())?;
                let stored = stored.map_err(|e| e.to_string())?;
                tokio::task::spawn_blocking(move || {
                    let t = std::time::Instant::now();
                    let r = c.commit(stored, &key, &manifest);
                    tracing::debug!(ms = t.elapsed().as_millis() as u64, "cache: committed");
                    r
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
            };
            Some(recorded.await)
        }
        _ => None,
    };
    Ok(Transferred {
        outcome,
        sent_bytes: driven.sent_bytes,
        cache,
    })
}

/// Asks the daemon what it would need for `req` and stops there: nothing is sent or staged
/// (the daemon sees a push cut short after `Need`, which leaves nothing behind).
pub async fn dry_run(
    conn: &Connection,
    req: &PushRequest,
    cache: Option<&Arc<Cache>>,
) -> Result<NeedReport, ClientError> {
    let cached = cached(cache, &conn.target, None, true).await;
    let session = push_session(conn, conn.config, req, cached.clone(), None, None);
    let driven = driver::drive(conn, session, None, true, &|_| {}).await?;
    let need = driven.need.ok_or_else(|| ClientError::Internal {
        target: conn.target.to_string(),
        message: "the session ended before the daemon's need was known".into(),
    })?;
    let files: Vec<_> = req.manifest.files().collect();
    let mut r = NeedReport {
        files: files.len() as u64,
        bytes: req.manifest.total_file_bytes(),
        have_files: need.have_files,
        have_bytes: need.have_bytes,
        ..NeedReport::default()
    };
    let mut needed = need.files;
    needed.sort_by_key(|n| n.file);
    for n in needed {
        // The session checked every index against the manifest.
        let (path, size, ..) = files[n.file as usize];
        r.needed_files += 1;
        r.needed_bytes += size;
        if let Some(b) = n.basis {
            r.with_basis += 1;
            r.cached_basis += u64::from(cached.hashes.contains(&b.hash));
        }
        r.paths.push((path.clone(), size));
    }
    Ok(r)
}

/// Runs a command other than a push (`Releases`, `Activate`, `Rollback`, `Prune`).
pub async fn command(conn: &Connection, command: Command) -> Result<Outcome, ClientError> {
    let session = ClientSession::command(conn.config, conn.target.app().clone(), command, 0);
    let driven = driver::drive(conn, session, None, false, &|_| {}).await?;
    driven.outcome.ok_or_else(|| ClientError::Internal {
        target: conn.target.to_string(),
        message: "the command ended without an outcome".into(),
    })
}

fn open_source(
    source: &std::path::Path,
    manifest: &Arc<Manifest>,
) -> Result<Arc<SourceTree>, ClientError> {
    Ok(Arc::new(SourceTree::open(source, Arc::clone(manifest))?))
}

/// What the cache knows of a target: the contents it can reproduce, and the encoding of the
/// manifest last pushed there.
#[derive(Debug, Default, Clone)]
struct Cached {
    hashes: HashSet<Hash>,
    manifest: Option<Arc<[u8]>>,
}

/// `known`: the contents the cache holds, when the caller listed them already; `manifest`:
/// whether to read the manifest last pushed to `target` too.
async fn cached(
    cache: Option<&Arc<Cache>>,
    target: &(dyn std::fmt::Display + Sync),
    known: Option<&HashSet<Hash>>,
    manifest: bool,
) -> Cached {
    let Some(c) = cache.cloned() else {
        return Cached {
            hashes: known.cloned().unwrap_or_default(),
            manifest: None,
        };
    };
    let target = target.to_string();
    let known = known.cloned();
    let listed =
        tokio::task::spawn_blocking(move || read_cached(&c, &target, known, manifest)).await;
    match listed {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::warn!("{e}; pushing without the cache");
            Cached::default()
        }
        Err(_) => Cached::default(),
    }
}

fn read_cached(
    c: &Cache,
    target: &str,
    known: Option<HashSet<Hash>>,
    manifest: bool,
) -> Result<Cached, cache::CacheError> {
    let started = std::time::Instant::now();
    let hashes = match known {
        Some(h) => h,
        None => c.hashes()?,
    };
    let manifest = if manifest {
        c.last_manifest_encoding(&target)?
    } else {
        None
    };
    tracing::debug!(ms = started.elapsed().as_millis() as u64, "cache: read");
    Ok(Cached { hashes, manifest })
}

/// What the client cache holds for a push to one target (see [`read_cache_for`]).
#[derive(Debug, Clone)]
pub struct CacheView {
    /// The contents it can reproduce, as far as it knows: [`PushOptions::cached`].
    pub contents: Arc<HashSet<Hash>>,
    /// The encoding of the manifest last pushed there: [`PushOptions::manifest_basis`].
    pub last_manifest: Option<Arc<[u8]>>,
    /// That manifest decoded: [`PushOptions::basis_manifest`].
    pub last_decoded: Option<Arc<Manifest>>,
}

/// What `cache` holds for a push to `target`, read ahead (while the source is scanned, say):
/// the manifest last pushed there, and as contents the files of that manifest the cache keeps
/// (each push stores what it sent: [`Cache::record`]). Taking the contents from the manifest
/// rather than listing the cache spares a listing of every blob (tens of milliseconds for a
/// large tree, on cores the scan wants); a blob gone since (removed by hand, or damaged) only
/// lowers its file to a full send when the push finds out ([`Cache::load`] notes it). The cache
/// is listed instead when such a blob was noted (the push then stores the missing ones again),
/// or without a readable last manifest.
pub fn read_cache_for(cache: &Cache, target: &Target) -> Result<CacheView, cache::CacheError> {
    let started = std::time::Instant::now();
    let encoded = cache.last_manifest_encoding(target)?;
    let decoded = encoded
        .as_deref()
        .and_then(|e| Manifest::decode(e, &Policy::default()).ok());
    let view = match decoded {
        Some(last) if cache.take_missing() => CacheView {
            contents: Arc::new(cache.hashes()?),
            last_manifest: encoded,
            last_decoded: Some(Arc::new(last)),
        },
        Some(last) => CacheView {
            contents: Arc::new(cache::kept_contents(&last)),
            last_manifest: encoded,
            last_decoded: Some(Arc::new(last)),
        },
        None => CacheView {
            contents: Arc::new(cache.hashes()?),
            last_manifest: None,
            last_decoded: None,
        },
    };
    tracing::debug!(
        ms = started.elapsed().as_millis() as u64,
        "cache: read ahead"
    );
    Ok(view)
}

fn push_session(
    conn: &Connection,
    config: ClientConfig,
    req: &PushRequest,
    cached: Cached,
    relay: Option<RelayPlan>,
    packed_manifest: Option<PackedManifest>,
) -> ClientSession {
    let job = PushJob {
        release: req.release.clone(),
        manifest: Arc::clone(&req.manifest),
        activate: req.activate,
        cached: cached.hashes,
        manifest_basis: cached.manifest,
        packed_manifest,
    };
    ClientSession::push_relayed(config, conn.target.app().clone(), job, relay, 0)
}

#[cfg(test)]
mod tests;

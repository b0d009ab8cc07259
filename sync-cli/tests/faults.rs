//! Faults against real processes on loopback (fault cases 7, 25, 26 and 27 of
//! `docs/fault-cases.md`): `relsyncd` killed with SIGKILL in the middle of pushes, `relsync push`
//! killed mid-transfer, and hostile clients speaking raw QUIC to the daemon with an authorized key.
//! After every fault: the daemon (restarted if it was killed) serves, `current` names a complete
//! release whose files all match its manifest, nothing half-built is visible, and a legitimate
//! push, the same release id again where one was cut short, converges.
//!
//! `RELSYNC_KILL_LOOPS` sets how many times the daemon is killed (4 by default, the tier-A count;
//! raise it for the long mode); `RELSYNC_KILL_SEED` picks other kill points. Both binaries must
//! be built (see `support/harness.rs`).

#[path = "support/harness.rs"]
mod harness;

use std::collections::VecDeque;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{
    leftovers, noise, objects, php, s, verify_current, verify_release, wait_lock_free, write_tree,
    Daemon, DaemonOptions, Env, Tree, PATIENCE,
};
use serde_json::Value;
use sync_core::delta::DeltaFormat;
use sync_core::manifest::{Entry, Hash, Manifest, Policy};
use sync_core::release::ReleaseId;
use sync_core::wire::{
    self, AppName, ClientMsg, Command, DaemonMsg, ErrorKind, FileHeader, FrameDecoder, Message,
    NeedFile, MIN_MAX_FRAME, VERSION,
};
use sync_server::net::{self, NetConfig};
use sync_server::tls::{Fingerprint, Identity, PinnedServerVerifier};

/// splitmix64: kill points and sizes from a seed, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn env_u64(key: &str, default: u64) -> u64 {
    match std::env::var(key) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{key}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// Files of incompressible content per release in the kill tests, and their size.
const BLOBS: u64 = 24;
const BLOB_SIZE: usize = 384 * 1024;

/// A small PHP app that stays the same, plus `BLOBS` files of content new to release `n`.
fn release(n: u64) -> Tree {
    let mut t: Tree = (0..40)
        .map(|i| {
            (
                format!("src/M{}/F{i}.php", i % 4),
                php(i, 1_500 + i as usize * 37),
            )
        })
        .collect();
    t.push(("public/index.php".into(), php(1_000 + n, 800)));
    for j in 0..BLOBS {
        t.push((
            format!("var/blob{j:02}.bin"),
            noise(n * 1_000 + j, BLOB_SIZE),
        ));
    }
    t
}

/// Files release `n` needs that release `n - 1` does not have: the blobs and the index.
const NEW_PER_RELEASE: u64 = BLOBS + 1;

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {key} in {v}"))
}

/// Starts `relsync push` of `src` as `release` in the background.
fn spawn_push(env: &Env, src: &std::path::Path, target: &str, release: &str) -> Child {
    env.command(&["push", s(src), target, "--release-id", release, "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn push_json(env: &Env, src: &std::path::Path, target: &str, release: &str) -> Value {
    env.json(&["push", s(src), target, "--release-id", release, "--json"])
}

/// Every kept release still matches its manifest (no file of an existing release changed).
fn verify_all(d: &Daemon) {
    for id in d.release_dirs() {
        verify_release(&d.root, &id);
    }
}

/// Where in a push the daemon is killed.
#[derive(Debug, Clone, Copy)]
enum KillPoint {
    /// This long after the push started: the handshake, manifest, need or transfer.
    After(Duration),
    /// Once this many files are stored on the daemon, a little later.
    Stored(usize, Duration),
    /// This long after the staging directory appeared: building, syncing, verifying.
    Staging(Duration),
    /// This long after the daemon logged the release built: activation and the prune after it.
    Built(Duration),
}

impl KillPoint {
    /// Loop `i` kills in each phase in turn, at a point drawn from `rng`.
    fn pick(i: u64, rng: &mut Rng, full_push: Duration) -> KillPoint {
        let ms = |rng: &mut Rng, n: u64| Duration::from_millis(rng.below(n));
        match i % 4 {
            1 => {
                let span = u64::try_from(full_push.as_millis()).unwrap_or(u64::MAX);
                KillPoint::After(ms(rng, span))
            }
            2 => KillPoint::Stored(1 + rng.below(BLOBS) as usize, ms(rng, 15)),
            3 => KillPoint::Staging(ms(rng, 60)),
            _ => KillPoint::Built(ms(rng, 10)),
        }
    }

    /// Waits for the point, or for the push to end on its own.
    fn wait(self, d: &Daemon, id: &str, mark: usize, push: &mut Child) {
        let started = Instant::now();
        let staging = d.root.join("releases").join(format!("{id}.staging"));
        let (reached, delay): (Box<dyn Fn() -> bool>, Duration) = match self {
            KillPoint::After(t) => (Box::new(move || started.elapsed() >= t), Duration::ZERO),
            KillPoint::Stored(k, delay) => (Box::new(move || objects(&d.root) >= k), delay),
            KillPoint::Staging(delay) => (Box::new(|| staging.exists()), delay),
            KillPoint::Built(delay) => (
                Box::new(move || {
                    d.log_since(mark)
                        .iter()
                        .any(|l| l.contains("release built"))
                }),
                delay,
            ),
        };
        while !reached() && push.try_wait().unwrap().is_none() {
            assert!(started.elapsed() < PATIENCE, "the push makes no progress");
            std::thread::sleep(Duration::from_micros(500));
        }
        std::thread::sleep(delay);
    }
}

/// Fault case 7: relsyncd killed with SIGKILL at varying points of a push, many times. After each
/// restart: recovery removed what the push left, `current` is the previous release (or the new one,
/// when the kill came after the swap) and verifies, and the same push again completes, sending only
/// what the daemon does not hold yet.
#[test]
fn the_daemon_killed_mid_push_recovers_and_the_same_push_converges() {
    let loops = env_u64("RELSYNC_KILL_LOOPS", 4);
    let seed = env_u64("RELSYNC_KILL_SEED", 7);
    let mut rng = Rng(seed);
    let env = Env::new();
    let client = env.client_key();
    let mut d = Daemon::start_with(
        &env,
        &DaemonOptions {
            authorized: vec![&client],
            // Small, so activations also prune and kills land in prunes too.
            keep: Some(3),
            ..DaemonOptions::default()
        },
    );
    env.ok(&["trust", &d.host_port(), &d.fingerprint]);
    let src = env.path("src");
    let target = d.target();

    write_tree(&src, &release(0));
    let started = Instant::now();
    let first = push_json(&env, &src, &target, "r0");
    let full_push = started.elapsed();
    assert_eq!(first["activated"], true, "{first}");
    let full_bytes = n(&first, "payload_bytes");

    for i in 1..=loops {
        let id = format!("r{i}");
        let previous = format!("r{}", i - 1);
        let point = KillPoint::pick(i, &mut rng, full_push);
        let context = format!("seed {seed}, loop {i}, kill {point:?}");
        assert_eq!(objects(&d.root), 0, "{context}: objects left from before");

        write_tree(&src, &release(i));
        let mark = d.log_mark();
        let mut push = spawn_push(&env, &src, &target, &id);
        point.wait(&d, &id, mark, &mut push);
        d.kill();
        // The client would wait for its own timeouts on a daemon that vanished; it is cut short
        // as a user would.
        let _ = push.kill();
        let _ = push.wait();

        let left = leftovers(&d.root);
        let stored = objects(&d.root);
        let complete = d.root.join("releases").join(&id).is_dir();
        let mark = d.log_mark();
        d.restart();
        let context = format!("{context}: left {left:?}, {stored} objects, complete {complete}");
        eprintln!("{context}");

        assert_eq!(
            leftovers(&d.root),
            Vec::<String>::new(),
            "{context}: recovery at start"
        );
        if !left.is_empty() {
            let log = d.log_since(mark).join("\n");
            assert!(
                log.contains("recovered what an interrupted run left behind"),
                "{context}: {log}"
            );
        }
        let live = verify_current(&d.root);
        assert!(
            live == previous || (live == id && complete),
            "{context}: current is {live}"
        );
        verify_all(&d);
        wait_lock_free(&d.root);

        let again = push_json(&env, &src, &target, &id);
        assert_eq!(again["activated"], true, "{context}: {again}");
        assert_eq!(verify_current(&d.root), id, "{context}");
        verify_all(&d);
        let needed = n(&again, "needed");
        if complete {
            assert_eq!(needed, 0, "{context}: {again}");
        } else {
            // Every verified object the killed push left is reused; the rest travels.
            assert_eq!(
                needed,
                NEW_PER_RELEASE - stored as u64,
                "{context}: {again}"
            );
            if stored > 0 {
                assert!(
                    n(&again, "payload_bytes") < full_bytes,
                    "{context}: {again}"
                );
            }
        }
        assert_eq!(
            objects(&d.root),
            0,
            "{context}: objects are dropped once used"
        );
        assert_eq!(leftovers(&d.root), Vec::<String>::new(), "{context}");
        d.assert_alive();
    }
}

/// Fault case 27 (one client): `relsync push` killed with SIGKILL mid-transfer. The daemon notices
/// the silence after its message timeout, releases the lock and leaves nothing staged; the same
/// push again sends only what was not stored yet.
#[test]
fn a_killed_client_leaves_nothing_staged_and_its_push_resumes() {
    let env = Env::new();
    let client = env.client_key();
    let mut d = Daemon::start_with(
        &env,
        &DaemonOptions {
            authorized: vec![&client],
            limits: "message_timeout_secs = 2",
            ..DaemonOptions::default()
        },
    );
    env.ok(&["trust", &d.host_port(), &d.fingerprint]);
    let src = env.path("src");
    let target = d.target();
    write_tree(&src, &release(0));
    let first = push_json(&env, &src, &target, "r0");
    let full_bytes = n(&first, "payload_bytes");

    write_tree(&src, &release(1));
    let mut push = spawn_push(&env, &src, &target, "r1");
    let started = Instant::now();
    while objects(&d.root) < (BLOBS / 3) as usize {
        assert!(
            push.try_wait().unwrap().is_none(),
            "the push ended before it could be killed; make release() larger"
        );
        assert!(started.elapsed() < PATIENCE, "the push makes no progress");
        std::thread::sleep(Duration::from_millis(1));
    }
    push.kill().unwrap();
    push.wait().unwrap();

    // The session holds the lock until the daemon gives up on the silent client.
    wait_lock_free(&d.root);
    d.assert_alive();
    assert_eq!(leftovers(&d.root), Vec::<String>::new());
    assert_eq!(verify_current(&d.root), "r0");
    let stored = objects(&d.root);
    assert!(stored >= (BLOBS / 3) as usize, "{stored} objects kept");

    let again = push_json(&env, &src, &target, "r1");
    assert_eq!(again["activated"], true, "{again}");
    assert_eq!(
        n(&again, "needed"),
        NEW_PER_RELEASE - stored as u64,
        "{again}"
    );
    assert!(n(&again, "payload_bytes") < full_bytes, "{again}");
    assert_eq!(verify_current(&d.root), "r1");
    verify_all(&d);
    assert_eq!(objects(&d.root), 0);
}

// ---------------------------------------------------------------------------------------------
// Hostile clients: raw QUIC with a key the daemon authorizes (fault cases 25 and 26)

/// What one abusive connection may add to the daemon's resident memory: the in-flight budget
/// (or one payload admitted alone), the connection's 16 MiB receive window, and what the
/// allocator keeps around them.
const MEMORY_BUDGET_KIB: u64 = 96 * 1024;

/// Daemon limits for the abuse tests: deadlines short enough to watch them fire, long enough for
/// the small legitimate pushes in between on a loaded machine.
const ABUSE_LIMITS: &str = "message_timeout_secs = 2\npush_timeout_secs = 6\nmax_streams = 4\n\
                            max_frame = 1048576\nmax_bytes_in_flight = 4194304\n";

/// A daemon, a legitimate `relsync` client and a hostile key, all authorized for `shop` and `blog`.
struct Arena {
    env: Env,
    d: Daemon,
    rt: tokio::runtime::Runtime,
    hostile: Hostile,
    /// The release a legitimate push last activated.
    live: String,
    pushes: u64,
}

impl Arena {
    fn new(limits: &str) -> Arena {
        let env = Env::new();
        let client = env.client_key();
        let identity = Identity::generate("hostile").unwrap();
        let hostile_fp = identity.fingerprint().to_string();
        let d = Daemon::start_with(
            &env,
            &DaemonOptions {
                authorized: vec![&client, &hostile_fp],
                limits,
                ..DaemonOptions::default()
            },
        );
        env.ok(&["trust", &d.host_port(), &d.fingerprint]);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let hostile = {
            let _guard = rt.enter();
            Hostile::new(&d, identity)
        };
        let mut a = Arena {
            env,
            d,
            rt,
            hostile,
            live: String::new(),
            pushes: 0,
        };
        a.legit_push();
        a
    }

    /// A small push of new content with `relsync`, which must succeed and become current.
    fn legit_push(&mut self) {
        self.pushes += 1;
        let id = format!("ok{}", self.pushes);
        let src = self.env.path("src");
        let mut tree: Tree = (0..20)
            .map(|i| (format!("src/F{i}.php"), php(i, 900)))
            .collect();
        tree.push(("public/index.php".into(), php(500 + self.pushes, 700)));
        write_tree(&src, &tree);
        let out = push_json(&self.env, &src, &self.d.target(), &id);
        assert_eq!(out["activated"], true, "{out}");
        assert_eq!(verify_current(&self.d.root), id);
        self.live = id;
    }

    /// Runs a hostile client to its end.
    fn hostile<T>(&self, f: impl AsyncFnOnce(&Hostile) -> T) -> T {
        self.rt.block_on(f(&self.hostile))
    }

    /// After an abuse: the daemon runs, the lock is free, nothing half-built is visible, the
    /// live release is untouched, and a legitimate push works.
    fn assert_unharmed(&mut self, what: &str) {
        self.d.assert_alive();
        wait_lock_free(&self.d.root);
        assert_eq!(leftovers(&self.d.root), Vec::<String>::new(), "{what}");
        assert_eq!(verify_current(&self.d.root), self.live, "{what}");
        verify_all(&self.d);
        self.legit_push();
    }
}

/// A raw QUIC client of the daemon that speaks frames by hand.
struct Hostile {
    endpoint: quinn::Endpoint,
    identity: Identity,
    daemon_key: Fingerprint,
    addr: std::net::SocketAddr,
}

impl Hostile {
    fn new(d: &Daemon, identity: Identity) -> Hostile {
        Hostile {
            endpoint: net::client_endpoint("127.0.0.1:0".parse().unwrap(), &NetConfig::default())
                .unwrap(),
            identity,
            daemon_key: d.fingerprint.parse().unwrap(),
            addr: d.addr(),
        }
    }

    async fn connect_with(&self, net: &NetConfig) -> quinn::Connection {
        let verifier = Arc::new(
            PinnedServerVerifier::new(&self.addr.to_string(), Some(self.daemon_key)).unwrap(),
        );
        net::connect(
            &self.endpoint,
            self.addr,
            "localhost",
            verifier,
            &self.identity,
            net,
        )
        .await
        .unwrap()
    }

    async fn connect(&self) -> quinn::Connection {
        self.connect_with(&NetConfig::default()).await
    }

    /// Connects and opens the control stream.
    async fn control(&self) -> (quinn::Connection, Control) {
        let conn = self.connect().await;
        let (send, recv) = conn.open_bi().await.unwrap();
        (conn, Control::new(send, recv))
    }

    /// Runs a push of `manifest` as release `release` of `shop` up to the daemon's `Need`.
    async fn push_to_need(
        &self,
        manifest: &Manifest,
        release: &str,
    ) -> (quinn::Connection, Control, Vec<NeedFile>) {
        let (conn, mut c) = self.control().await;
        let encoded = manifest.encode();
        c.send(&hello(Command::Push {
            release: ReleaseId::new(release).unwrap(),
            manifest_len: encoded.len() as u64,
            manifest_digest: Hash::of(&encoded),
            manifest_basis: None,
            relay: None,
        }))
        .await;
        c.expect_welcome().await;
        // The manifest travels as one zstd frame (no basis was named).
        let mut packed = Vec::new();
        sync_core::delta::encode_full(&encoded, &mut packed).unwrap();
        let mut chunks = packed.chunks(512 * 1024).peekable();
        while let Some(data) = chunks.next() {
            c.send(&ClientMsg::ManifestChunk {
                data: data.to_vec(),
                last: chunks.peek().is_none(),
            })
            .await;
        }
        let mut need = Vec::new();
        loop {
            match c.next().await {
                Some(DaemonMsg::Need { files, last, .. }) => {
                    need.extend(files);
                    if last {
                        break;
                    }
                }
                other => panic!("expected Need, got {other:?}"),
            }
        }
        (conn, c, need)
    }
}

fn hello(command: Command) -> ClientMsg {
    ClientMsg::Hello {
        version: VERSION,
        app: AppName::new("shop").unwrap(),
        command,
        max_frame: MIN_MAX_FRAME,
    }
}

/// The control stream of a raw client.
struct Control {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    received: VecDeque<DaemonMsg>,
}

impl Control {
    fn new(send: quinn::SendStream, recv: quinn::RecvStream) -> Control {
        Control {
            send,
            recv,
            decoder: FrameDecoder::new(MIN_MAX_FRAME),
            received: VecDeque::new(),
        }
    }

    async fn send(&mut self, msg: &ClientMsg) {
        self.raw(&msg.frame()).await;
    }

    async fn raw(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.unwrap();
    }

    /// The next message from the daemon; `None` once the stream or connection ended.
    async fn next(&mut self) -> Option<DaemonMsg> {
        loop {
            if let Some(m) = self.received.pop_front() {
                return Some(m);
            }
            let chunk = tokio::time::timeout(PATIENCE, self.recv.read_chunk(64 * 1024, true))
                .await
                .expect("the daemon answers or closes in time")
                .ok()??;
            let mut input = &chunk.bytes[..];
            while !input.is_empty() {
                if let Some(frame) = self.decoder.decode(&mut input).unwrap() {
                    self.received.push_back(wire::decode(&frame).unwrap());
                }
            }
        }
    }

    async fn expect_welcome(&mut self) {
        match self.next().await {
            Some(DaemonMsg::Welcome { .. }) => {}
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    /// The daemon's closing error, which must be of `kind`; returns its message.
    async fn expect_error(&mut self, kind: ErrorKind) -> String {
        loop {
            match self.next().await {
                Some(DaemonMsg::Error { kind: k, message }) => {
                    assert_eq!(k, kind, "{message}");
                    return message;
                }
                Some(DaemonMsg::Need { .. } | DaemonMsg::Welcome { .. }) => {}
                other => panic!("expected an error of kind {kind}, got {other:?}"),
            }
        }
    }
}

/// The connection ends (the daemon closed it) within the patience bound.
async fn closed_by_daemon(conn: &quinn::Connection) {
    let why = tokio::time::timeout(PATIENCE, conn.closed())
        .await
        .expect("the daemon closes the connection in time");
    assert!(
        matches!(why, quinn::ConnectionError::ApplicationClosed(_)),
        "{why:?}"
    );
}

/// A manifest of `files` files of `size` bytes each under `dir/` whose content the daemon has
/// never seen (the bytes need not exist: a hostile client never sends them whole).
fn manifest_of_unknown(dir: &str, files: u64, size: u64, seed: u64) -> Manifest {
    let mut entries = vec![Entry::dir(dir, 0o755).unwrap()];
    for i in 0..files {
        let hash = Hash::of(format!("{seed}/{i}").as_bytes());
        entries.push(Entry::file(&format!("{dir}/f{i:06}.bin"), size, 0o644, hash).unwrap());
    }
    Manifest::from_unsorted(entries, &Policy::default()).unwrap()
}

fn header(file: u32, payload_len: u64) -> Vec<u8> {
    FileHeader {
        file,
        format: DeltaFormat::Full,
        basis: None,
        payload_len,
    }
    .frame()
}

/// Fault case 25, frames: an oversized length prefix, garbage, a message out of turn, another
/// version, an absurd manifest and an oversized file header each end only their own session with
/// a typed error; the daemon stays up and serves the next push.
#[test]
fn hostile_frames_end_only_their_own_session() {
    let mut a = Arena::new(ABUSE_LIMITS);
    let cases: Vec<(&str, ErrorKind, Vec<u8>)> = vec![
        (
            "a 4 GiB length prefix",
            ErrorKind::FrameTooLarge,
            u32::MAX.to_be_bytes().to_vec(),
        ),
        ("garbage", ErrorKind::BadRequest, {
            let mut g = 16u32.to_be_bytes().to_vec();
            g.extend_from_slice(&noise(3, 16));
            g
        }),
        (
            "Done before Hello",
            ErrorKind::BadRequest,
            ClientMsg::Done { files_sent: 3 }.frame(),
        ),
        (
            "another protocol version",
            ErrorKind::Version,
            ClientMsg::Hello {
                version: 99,
                app: AppName::new("shop").unwrap(),
                command: Command::Releases,
                max_frame: MIN_MAX_FRAME,
            }
            .frame(),
        ),
        (
            "a manifest over max_manifest_bytes",
            ErrorKind::Limit,
            hello(Command::Push {
                release: ReleaseId::new("h1").unwrap(),
                manifest_len: 1 << 40,
                manifest_digest: Hash::of(b"x"),
                manifest_basis: None,
                relay: None,
            })
            .frame(),
        ),
    ];
    for (what, kind, bytes) in cases {
        let message = a.hostile(async |h| {
            let (conn, mut c) = h.control().await;
            c.raw(&bytes).await;
            let message = c.expect_error(kind).await;
            closed_by_daemon(&conn).await;
            message
        });
        eprintln!("{what}: {message}");
        a.assert_unharmed(what);
    }

    // After Welcome, with the lock held: a manifest chunk frame over max_frame, with bytes
    // following it, and then a file header over its 256-byte bound.
    a.hostile(async |h| {
        let (conn, mut c) = h.control().await;
        c.send(&hello(Command::Push {
            release: ReleaseId::new("h2").unwrap(),
            manifest_len: 1000,
            manifest_digest: Hash::of(b"x"),
            manifest_basis: None,
            relay: None,
        }))
        .await;
        c.expect_welcome().await;
        c.raw(&(8u32 << 20).to_be_bytes()).await;
        // The daemon may close before all of this is written.
        let _ = c.send.write_all(&noise(4, 1 << 20)).await;
        let message = c.expect_error(ErrorKind::FrameTooLarge).await;
        assert!(message.contains("over the limit"), "{message}");
        closed_by_daemon(&conn).await;
    });
    a.assert_unharmed("an oversized manifest chunk");

    a.hostile(async |h| {
        let manifest = manifest_of_unknown("var", 2, 1000, 5);
        let (conn, mut c, need) = h.push_to_need(&manifest, "h3").await;
        assert_eq!(need.len(), 2);
        let mut s = conn.open_uni().await.unwrap();
        s.write_all(&4096u32.to_be_bytes()).await.unwrap();
        let _ = s.write_all(&[0; 4096]).await;
        c.expect_error(ErrorKind::FrameTooLarge).await;
        closed_by_daemon(&conn).await;
    });
    a.assert_unharmed("an oversized file header");
}

/// Fault case 25, streams and memory: a client holding the daemon's `max_streams` file streams
/// open cannot open another; stalled payloads are read into memory only within the in-flight
/// budget (the rest spools to disk), streams the daemon never accepts are bounded by the
/// connection window, and the stalled session ends at the message deadline.
#[test]
fn stream_floods_stay_within_the_limits_and_the_memory_budget() {
    let mut a = Arena::new(ABUSE_LIMITS);
    let (before, _) = a.d.memory_kib();
    a.hostile(async |h| {
        let manifest = manifest_of_unknown("var", 12, 6 << 20, 11);
        let (conn, mut c, need) = h.push_to_need(&manifest, "h5").await;
        assert_eq!(need.len(), 12);
        // Four streams (the limit), each announcing a 6 MiB payload and sending 5 MiB of it.
        let mut open = Vec::new();
        for n in &need[..4] {
            let mut s = conn.open_uni().await.unwrap();
            s.write_all(&header(n.file, 6 << 20)).await.unwrap();
            s.write_all(&noise(u64::from(n.file), 5 << 20))
                .await
                .unwrap();
            open.push(s);
        }
        // The transport holds back a fifth until one of them ends.
        let fifth = tokio::time::timeout(Duration::from_millis(500), conn.open_uni()).await;
        assert!(
            !matches!(fifth, Ok(Ok(_))),
            "a fifth stream opened past max_streams = 4"
        );
        let message = c.expect_error(ErrorKind::Timeout).await;
        assert!(message.contains("file data"), "{message}");
        closed_by_daemon(&conn).await;
    });
    let (_, peak) = a.d.memory_kib();
    eprintln!("streams: rss before {before} KiB, peak {peak} KiB");
    assert!(
        peak < before + MEMORY_BUDGET_KIB,
        "peak {peak} KiB, {before} KiB before"
    );
    a.assert_unharmed("stalled file streams");

    // Control streams beyond the first are never accepted: what is written to them is held by
    // the transport, at most the connection's receive window.
    let (before, _) = a.d.memory_kib();
    a.hostile(async |h| {
        let (conn, mut c) = h.control().await;
        let encoded = manifest_of_unknown("var", 1, 10, 12).encode();
        c.send(&hello(Command::Push {
            release: ReleaseId::new("h6").unwrap(),
            manifest_len: encoded.len() as u64,
            manifest_digest: Hash::of(&encoded),
            manifest_basis: None,
            relay: None,
        }))
        .await;
        c.expect_welcome().await;
        let mut extra = Vec::new();
        for i in 0..7u64 {
            let Ok((mut s, _)) = conn.open_bi().await else {
                break;
            };
            // Blocks once the window is full; the daemon ends the session meanwhile.
            let junk = noise(100 + i, 8 << 20);
            let _ = tokio::time::timeout(Duration::from_millis(200), s.write_all(&junk)).await;
            extra.push(s);
        }
        let message = c.expect_error(ErrorKind::Timeout).await;
        assert!(message.contains("manifest"), "{message}");
        closed_by_daemon(&conn).await;
    });
    let (_, peak) = a.d.memory_kib();
    eprintln!("bidi flood: rss before {before} KiB, peak {peak} KiB");
    assert!(
        peak < before + MEMORY_BUDGET_KIB,
        "peak {peak} KiB, {before} KiB before"
    );
    a.assert_unharmed("a flood of control streams");
}

/// Fault case 26: peers that never say Hello, stop inside it, stall before the manifest, stall
/// inside a payload (before or after `Done`) or trickle bytes are cut off by the message or the
/// push deadline; each time the lock is released and nothing is left staged.
#[test]
fn slow_peers_are_cut_off_by_the_deadlines() {
    let mut a = Arena::new(ABUSE_LIMITS);

    a.hostile(async |h| {
        // Connected, and not a byte: not even a control stream reaches the daemon.
        let conn = h.connect().await;
        closed_by_daemon(&conn).await;
    });
    a.assert_unharmed("a silent connection");

    a.hostile(async |h| {
        let (conn, mut c) = h.control().await;
        c.raw(&[0, 0]).await;
        let message = c.expect_error(ErrorKind::Timeout).await;
        assert!(message.contains("Hello"), "{message}");
        closed_by_daemon(&conn).await;
    });
    a.assert_unharmed("half a Hello");

    a.hostile(async |h| {
        let (conn, mut c) = h.control().await;
        let encoded = manifest_of_unknown("var", 1, 10, 1).encode();
        c.send(&hello(Command::Push {
            release: ReleaseId::new("h6").unwrap(),
            manifest_len: encoded.len() as u64,
            manifest_digest: Hash::of(&encoded),
            manifest_basis: None,
            relay: None,
        }))
        .await;
        c.expect_welcome().await;
        let message = c.expect_error(ErrorKind::Timeout).await;
        assert!(message.contains("manifest"), "{message}");
        closed_by_daemon(&conn).await;
    });
    a.assert_unharmed("silence after Welcome");

    // A payload announced, partly sent, then nothing more: with and without `Done` after it.
    for (release, done) in [("h7", false), ("h8", true)] {
        a.hostile(async |h| {
            let manifest = manifest_of_unknown("var", 1, 1 << 20, 7);
            let (conn, mut c, need) = h.push_to_need(&manifest, release).await;
            let mut s = conn.open_uni().await.unwrap();
            s.write_all(&header(need[0].file, 1 << 20)).await.unwrap();
            s.write_all(&noise(7, 1000)).await.unwrap();
            if done {
                c.send(&ClientMsg::Done { files_sent: 1 }).await;
            }
            let message = c.expect_error(ErrorKind::Timeout).await;
            assert!(
                message.contains("within 2000 ms"),
                "the message deadline, not the push deadline, ends a stalled payload: {message}"
            );
            closed_by_daemon(&conn).await;
        });
        a.assert_unharmed(if done {
            "a payload stalled after Done"
        } else {
            "a stalled payload"
        });
    }

    // A byte now and then keeps the message deadline away; the push deadline still ends it.
    a.hostile(async |h| {
        let manifest = manifest_of_unknown("var", 1, 1 << 20, 9);
        let (conn, mut c, need) = h.push_to_need(&manifest, "h9").await;
        let mut s = conn.open_uni().await.unwrap();
        s.write_all(&header(need[0].file, 1 << 20)).await.unwrap();
        let trickle = tokio::spawn(async move {
            while s.write_all(&[0]).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        let message = c.expect_error(ErrorKind::Timeout).await;
        assert!(message.contains("push timeout"), "{message}");
        closed_by_daemon(&conn).await;
        trickle.await.unwrap();
    });
    a.assert_unharmed("a trickling payload");
}

/// Fault case 26, the other direction: a client that reads nothing the daemon sends. The daemon
/// gives up on it after the message timeout, and serves others meanwhile.
#[test]
fn a_client_that_reads_nothing_does_not_hold_up_the_daemon() {
    let mut a =
        Arena::new(&ABUSE_LIMITS.replace("message_timeout_secs = 2", "message_timeout_secs = 5"));
    let (before, _) = a.d.memory_kib();
    let mark = a.d.log_mark();
    // A manifest whose need list is far larger than the client's tiny receive windows.
    let manifest = manifest_of_unknown("var", 60_000, 100, 13);
    let (conn, _control) = a.hostile(async |h| {
        let tiny = NetConfig {
            stream_receive_window: 16 * 1024,
            connection_receive_window: 32 * 1024,
            ..NetConfig::default()
        };
        let conn = h.connect_with(&tiny).await;
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut c = Control::new(send, recv);
        let encoded = manifest.encode();
        c.send(&hello(Command::Push {
            release: ReleaseId::new("h10").unwrap(),
            manifest_len: encoded.len() as u64,
            manifest_digest: Hash::of(&encoded),
            manifest_basis: None,
            relay: None,
        }))
        .await;
        // The manifest travels as one zstd frame (no basis was named).
        let mut packed = Vec::new();
        sync_core::delta::encode_full(&encoded, &mut packed).unwrap();
        let mut chunks = packed.chunks(512 * 1024).peekable();
        while let Some(data) = chunks.next() {
            c.send(&ClientMsg::ManifestChunk {
                data: data.to_vec(),
                last: chunks.peek().is_none(),
            })
            .await;
        }
        (conn, c)
    });

    // Meanwhile the daemon answers others: a listing of the same app and a push to another.
    let list = a.env.json(&["releases", &a.d.target(), "--json"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let src = a.env.path("blog-src");
    write_tree(&src, &vec![("index.php".to_string(), php(77, 500))]);
    let out = push_json(&a.env, &src, &a.d.target_of("blog"), "b1");
    assert_eq!(out["activated"], true, "{out}");
    verify_release(&a.d.root_of("blog"), "b1");

    a.hostile(async |_| closed_by_daemon(&conn).await);
    let stopped = "the client stopped reading its replies";
    let log = a.d.log_since_with(mark, stopped, PATIENCE).join("\n");
    assert!(log.contains(stopped), "{log}");
    let (_, peak) = a.d.memory_kib();
    eprintln!("slow reader: rss before {before} KiB, peak {peak} KiB");
    assert!(
        peak < before + MEMORY_BUDGET_KIB,
        "peak {peak} KiB, {before} KiB before"
    );
    a.assert_unharmed("a client that reads nothing");
}

//! relsyncd end to end on loopback: a real daemon (`daemon::serve`, in process, port 0, temporary
//! app roots) driven by a minimal client built on `proto::ClientSession`, `net::connect` and the
//! `delta` encoders. Every test checks what the client was told and what is on disk.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint, RecvStream, SendStream};
use sync_core::delta::{self, Basis, DeltaFormat};
use sync_core::edge::root::AppRoot;
use sync_core::manifest::{Entry, Hash, Manifest, Policy};
use sync_core::proto::client::{
    self, ClientConfig, ClientSession, Method, PushJob, PushReport, SendFile,
};
use sync_core::proto::ProtoError;
use sync_core::relay::{RelayNode, RelayPlan, Ticket};
use sync_core::release::ReleaseId;
use sync_core::wire::{
    AppName, ClientMsg, Command, DaemonMsg, ErrorKind, FileHeader, FrameDecoder, Limits, Message,
    Pruning, ReleaseInfo, ReleaseStatus, MIN_MAX_FRAME, VERSION,
};
use sync_server::config::{AppConfig, Config};
use sync_server::daemon::{self, ServeOptions, Server};
use sync_server::net::{self, client_endpoint, ConnectError, NetConfig};
use sync_server::tls::{ticket, Fingerprint, Identity, PinnedServerVerifier};
use tokio::sync::{mpsc, oneshot};

const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Test data

type Tree = BTreeMap<String, Vec<u8>>;

/// Deterministic PHP-ish text: `n` bytes of numbered lines seeded by `seed`.
fn text(seed: u64, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 64);
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let mut line = 0u64;
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(
            format!("    $v{line} = f({}, '{:x}');\n", line * 7, x % 100_000).as_bytes(),
        );
        line += 1;
    }
    out.truncate(n);
    out
}

/// A small app with one large file (worth a delta) and two files of equal content.
fn tree_a() -> Tree {
    let mut t = Tree::new();
    t.insert("index.php".into(), text(1, 900));
    t.insert("src/App.php".into(), text(2, 5_000));
    t.insert("src/Db.php".into(), text(3, 7_000));
    t.insert("src/Copy.php".into(), text(3, 7_000));
    t.insert("vendor/big.php".into(), text(4, 300_000));
    t.insert("public/app.css".into(), text(5, 20_000));
    t.insert("public/empty.txt".into(), Vec::new());
    t
}

/// Release B: an edit inside the large file and a small one, a new file, a removal, a rename.
fn tree_b() -> Tree {
    let mut t = tree_a();
    let big = t.get_mut("vendor/big.php").unwrap();
    big.splice(
        150_000..150_000,
        b"// patched in release B\n".iter().copied(),
    );
    t.get_mut("src/App.php").unwrap()[100..110].copy_from_slice(b"/*edited*/");
    t.insert("src/New.php".into(), text(6, 3_000));
    let css = t.remove("public/app.css").unwrap();
    t.insert("public/site.css".into(), css);
    t
}

/// `n` files of distinct content.
fn tree_many(n: u64) -> Tree {
    (0..n)
        .map(|i| {
            (
                format!("lib/f{i:02}.php"),
                text(100 + i, 2_000 + i as usize * 10),
            )
        })
        .collect()
}

fn manifest_of(tree: &Tree) -> Manifest {
    let mut dirs = BTreeSet::new();
    let mut entries = Vec::new();
    for (path, content) in tree {
        let mut p = path.as_str();
        while let Some((parent, _)) = p.rsplit_once('/') {
            dirs.insert(parent.to_string());
            p = parent;
        }
        entries.push(Entry::file(path, content.len() as u64, 0o644, Hash::of(content)).unwrap());
    }
    for d in dirs {
        entries.push(Entry::dir(&d, 0o755).unwrap());
    }
    Manifest::from_unsorted(entries, &Policy::default()).unwrap()
}

fn contents(tree: &Tree) -> HashMap<Hash, Vec<u8>> {
    tree.values().map(|c| (Hash::of(c), c.clone())).collect()
}

fn rid(s: &str) -> ReleaseId {
    ReleaseId::new(s).unwrap()
}

fn app(s: &str) -> AppName {
    AppName::new(s).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The daemon

/// How a test daemon is set up.
struct Setup {
    limits: Limits,
    options: ServeOptions,
    keep: usize,
    /// The `shop` app's activation pipeline in relsyncd's config.
    activation: Option<sync_core::activation::ActivationConfig>,
    /// Declare export `media` (the directory `media` of the test's base), open to the shop key.
    export: bool,
    /// App `shop` takes relayed pushes.
    accept_relayed: bool,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            limits: Limits::default(),
            options: ServeOptions {
                grace: Duration::from_secs(5),
                ..ServeOptions::default()
            },
            keep: 10,
            activation: None,
            export: false,
            accept_relayed: false,
        }
    }
}

struct Daemon {
    _dir: tempfile::TempDir,
    base: PathBuf,
    identity: Identity,
    config: Config,
    options: ServeOptions,
    server: Option<(Server, oneshot::Sender<()>)>,
    /// Key authorized for app `shop`.
    shop_key: Identity,
    /// Key authorized for app `blog` only.
    blog_key: Identity,
}

impl Daemon {
    async fn start() -> Daemon {
        Daemon::start_with(Setup::default()).await
    }

    async fn start_with(setup: Setup) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_owned();
        let shop_key = Identity::generate("shop-ci").unwrap();
        let blog_key = Identity::generate("blog-ci").unwrap();
        let app_config = |name: &str, key: &Identity| AppConfig {
            name: name.into(),
            root: base.join(name),
            keep: Some(setup.keep),
            shared: Vec::new(),
            authorized: HashSet::from([key.fingerprint()]),
            accept_relayed: setup.accept_relayed && name == "shop",
            prestage: true,
            activation: (name == "shop").then(|| setup.activation.clone()).flatten(),
        };
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            key: base.join("unused.key"),
            cert: base.join("unused.crt"),
            limits: setup.limits,
            apps: BTreeMap::from([
                ("shop".to_string(), app_config("shop", &shop_key)),
                ("blog".to_string(), app_config("blog", &blog_key)),
            ]),
            exports: if setup.export {
                std::fs::create_dir_all(base.join("media")).unwrap();
                BTreeMap::from([(
                    "media".to_string(),
                    sync_server::config::ExportConfig {
                        name: "media".into(),
                        path: base.join("media"),
                        authorized: HashSet::from([shop_key.fingerprint()]),
                    },
                )])
            } else {
                BTreeMap::new()
            },
        };
        let mut d = Daemon {
            _dir: dir,
            base,
            identity: Identity::generate("relsyncd").unwrap(),
            config,
            options: setup.options,
            server: None,
            shop_key,
            blog_key,
        };
        d.serve().await;
        d
    }

    async fn serve(&mut self) {
        let (tx, rx) = oneshot::channel::<()>();
        let options = self.options.clone();
        let server = daemon::serve(self.config.clone(), self.identity.clone(), options, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
        self.server = Some((server, tx));
    }

    /// Asks for shutdown and waits until the daemon has stopped.
    async fn stop(&mut self) {
        let (server, tx) = self.server.take().expect("daemon running");
        let _ = tx.send(());
        tokio::time::timeout(WAIT, server.stopped())
            .await
            .expect("daemon stops in time");
    }

    fn addr(&self) -> SocketAddr {
        self.server.as_ref().expect("daemon running").0.local_addr()
    }

    fn root(&self, app: &str) -> PathBuf {
        self.base.join(app)
    }

    fn shop(&self) -> PathBuf {
        self.root("shop")
    }

    async fn client(&self, key: &Identity) -> Client {
        Client::new(self.addr(), self.identity.fingerprint(), key.clone())
    }

    async fn shop_client(&self) -> Client {
        self.client(&self.shop_key).await
    }
}

fn current_of(root: &Path) -> Option<String> {
    let target = std::fs::read_link(root.join("current")).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

fn staging_dirs(root: &Path) -> Vec<String> {
    std::fs::read_dir(root.join("releases"))
        .map(|rd| {
            rd.filter_map(|e| {
                let name = e.ok()?.file_name().to_string_lossy().into_owned();
                name.ends_with(".staging").then_some(name)
            })
            .collect()
        })
        .unwrap_or_default()
}

fn objects(root: &Path) -> usize {
    std::fs::read_dir(root.join(".relsync/objects"))
        .map(|rd| {
            rd.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| !e.file_name().to_string_lossy().starts_with('.'))
            })
            .count()
        })
        .unwrap_or(0)
}

/// The release's files are exactly `tree`.
fn assert_release_holds(root: &Path, release: &str, tree: &Tree) {
    let dir = root.join("releases").join(release);
    for (path, content) in tree {
        let got = std::fs::read(dir.join(path)).unwrap_or_else(|e| panic!("{release}/{path}: {e}"));
        assert!(
            got == *content,
            "{release}/{path} differs from what was pushed"
        );
    }
}

fn inode(path: &Path) -> u64 {
    std::fs::symlink_metadata(path).unwrap().ino()
}

/// Every path under `root` with its type, size and mtime: equal snapshots mean nothing was
/// created, written or removed.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (bool, u64, i64, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let m = e.path().symlink_metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            }
            out.insert(
                e.path().strip_prefix(root).unwrap().to_owned(),
                (m.is_dir(), m.len(), m.mtime(), m.mtime_nsec()),
            );
        }
    }
    out
}

/// Waits until the daemon released the app's lock (a connection's session ended).
async fn wait_lock_free(root: &Path) {
    let root = AppRoot::open(root).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        if root.lock(|_| {}).is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "the daemon still holds the lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_objects(root: &Path, n: usize) {
    let deadline = Instant::now() + WAIT;
    while objects(root) < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} objects stored",
            objects(root)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The client

struct Client {
    endpoint: Endpoint,
    addr: SocketAddr,
    daemon_key: Fingerprint,
    identity: Identity,
}

/// How a push behaves.
#[derive(Default)]
struct PushOpts {
    /// Contents the client can reproduce (its cache of the last push).
    cache: HashMap<Hash, Vec<u8>>,
    /// Paths sent with one byte flipped.
    lie: HashSet<String>,
    /// Paths whose file stream is reset halfway through the payload.
    cut: HashSet<String>,
    /// Drop the connection once this many files are stored on the daemon (0: once the need is
    /// known, before any file goes out).
    kill_after: Option<(usize, PathBuf)>,
    /// Concurrent file streams (0: the daemon's limit).
    max_streams: u32,
    no_activate: bool,
    /// The encoding of the manifest of the previous push, sent as the manifest's basis.
    manifest_basis: Option<Arc<[u8]>>,
    /// Sent in `Push.relay`.
    relay: Option<RelayPlan>,
    /// Once the first file went out, wait for this path to appear on the daemon (before the
    /// other files are reported sent, so before `Done`), and note its inode in `Ran::held`.
    hold_for: Option<PathBuf>,
}

#[derive(Debug)]
struct Ran {
    outcome: Option<Result<client::Outcome, ProtoError>>,
    headers: Vec<FileHeader>,
    /// The inode of `PushOpts::hold_for`, had it appeared in time.
    held: Option<u64>,
}

impl Ran {
    fn report(&self) -> &PushReport {
        match &self.outcome {
            Some(Ok(client::Outcome::Pushed(r))) => r,
            other => panic!("push did not succeed: {other:?}"),
        }
    }

    fn remote_error(&self) -> (ErrorKind, &str) {
        match &self.outcome {
            Some(Err(ProtoError::Remote { kind, message })) => (*kind, message),
            other => panic!("expected an error from the daemon, got {other:?}"),
        }
    }

    fn format_of(&self, tree: &Tree, path: &str) -> Option<DeltaFormat> {
        let idx = manifest_of(tree)
            .files()
            .position(|(p, ..)| p.as_str() == path)? as u32;
        self.headers
            .iter()
            .find(|h| h.file == idx)
            .map(|h| h.format)
    }
}

impl Client {
    fn new(addr: SocketAddr, daemon_key: Fingerprint, identity: Identity) -> Client {
        Client {
            endpoint: client_endpoint("127.0.0.1:0".parse().unwrap(), &NetConfig::default())
                .unwrap(),
            addr,
            daemon_key,
            identity,
        }
    }

    async fn try_connect(&self) -> Result<Connection, ConnectError> {
        let verifier = Arc::new(
            PinnedServerVerifier::new(&self.addr.to_string(), Some(self.daemon_key)).unwrap(),
        );
        net::connect(
            &self.endpoint,
            self.addr,
            "localhost",
            verifier,
            &self.identity,
            &NetConfig::default(),
        )
        .await
    }

    async fn connect(&self) -> Connection {
        self.try_connect().await.unwrap()
    }

    async fn push(&self, app_name: &str, tree: &Tree, release: &str, opts: PushOpts) -> Ran {
        let job = PushJob {
            release: rid(release),
            manifest: Arc::new(manifest_of(tree)),
            activate: !opts.no_activate,
            cached: opts.cache.keys().copied().collect(),
            manifest_basis: opts.manifest_basis.clone(),
            packed_manifest: None,
        };
        let mut config = ClientConfig::default();
        if opts.max_streams > 0 {
            // This driver opens a stream per file, so files out are streams open.
            config.max_streams = opts.max_streams;
            config.max_files_out = opts.max_streams;
        }
        let session = ClientSession::push_relayed(config, app(app_name), job, opts.relay, 0);
        let source = Arc::new(Source {
            tree: tree.clone(),
            cache: opts.cache,
            lie: opts.lie,
            cut: opts.cut,
        });
        drive(
            self.connect().await,
            session,
            source,
            opts.kill_after,
            opts.hold_for,
        )
        .await
    }

    async fn command(
        &self,
        app_name: &str,
        command: Command,
    ) -> Result<client::Outcome, ProtoError> {
        let session = ClientSession::command(ClientConfig::default(), app(app_name), command, 0);
        let source = Arc::new(Source {
            tree: Tree::new(),
            cache: HashMap::new(),
            lie: HashSet::new(),
            cut: HashSet::new(),
        });
        drive(self.connect().await, session, source, None, None)
            .await
            .outcome
            .expect("the session ended")
    }

    async fn releases(&self, app_name: &str) -> Vec<ReleaseInfo> {
        match self.command(app_name, Command::Releases).await {
            Ok(client::Outcome::Releases(list)) => list,
            other => panic!("releases failed: {other:?}"),
        }
    }

    /// Opens the control stream and sends a bare `Hello`, for clients that then misbehave.
    async fn hello(
        &self,
        app_name: &str,
        command: Command,
    ) -> (Connection, SendStream, RecvStream) {
        let conn = self.connect().await;
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let hello = ClientMsg::Hello {
            version: VERSION,
            app: app(app_name),
            command,
            max_frame: MIN_MAX_FRAME,
        };
        send.write_all(&hello.frame()).await.unwrap();
        (conn, send, recv)
    }
}

/// A `Hello` for a push of `tree` (for raw clients that never send the manifest).
fn push_command(tree: &Tree, release: &str) -> Command {
    let encoded = manifest_of(tree).encode();
    Command::Push {
        release: rid(release),
        manifest_len: encoded.len() as u64,
        manifest_digest: Hash::of(&encoded),
        manifest_basis: None,
        relay: None,
    }
}

/// The next daemon message on a raw control stream; `None` when the stream ends.
async fn next_msg(recv: &mut RecvStream, decoder: &mut FrameDecoder) -> Option<DaemonMsg> {
    loop {
        let chunk = tokio::time::timeout(WAIT, recv.read_chunk(64 * 1024, true))
            .await
            .expect("the daemon answers in time")
            .ok()??;
        let mut input = &chunk.bytes[..];
        if let Some(frame) = decoder.decode(&mut input).unwrap() {
            assert!(
                input.is_empty(),
                "one frame per read is enough for these tests"
            );
            return Some(sync_core::wire::decode(&frame).unwrap());
        }
    }
}

struct Source {
    tree: Tree,
    cache: HashMap<Hash, Vec<u8>>,
    lie: HashSet<String>,
    cut: HashSet<String>,
}

impl Source {
    /// Encodes one file as a real client does and returns its whole file stream.
    fn encode(&self, f: &SendFile) -> (FileHeader, Vec<u8>) {
        let mut content = self.tree[f.path.as_str()].clone();
        if self.lie.contains(f.path.as_str()) {
            content[0] ^= 1;
        }
        let mut payload = Vec::new();
        let enc = match &f.method {
            Method::Full => delta::encode_full(&content, &mut payload),
            Method::ZstdRef { basis } => delta::encode(
                Basis::Bytes(&self.cache[&basis.hash]),
                &content,
                &mut payload,
            ),
            Method::Rsync { signature, .. } => {
                delta::encode(Basis::Signature(signature), &content, &mut payload)
            }
        }
        .unwrap();
        let header = f.header(enc.format, enc.payload_len).unwrap();
        let mut stream = header.frame();
        stream.extend_from_slice(&payload);
        (header, stream)
    }
}

/// Runs a client session over `conn` to its end (or until `kill_after` files are stored on the
/// daemon, when the connection is dropped as if the client were killed).
async fn drive(
    conn: Connection,
    mut s: ClientSession,
    source: Arc<Source>,
    kill_after: Option<(usize, PathBuf)>,
    mut hold_for: Option<PathBuf>,
) -> Ran {
    let mut held = None;
    let epoch = Instant::now();
    let now = || epoch.elapsed().as_millis() as u64;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<FileHeader>();
    let mut headers = Vec::new();
    let mut sent = 0usize;
    loop {
        while let Some(frame) = s.poll_transmit(now()) {
            if send.write_all(&frame).await.is_err() {
                break;
            }
        }
        while let Some(client::Request::SendFile(f)) = s.poll_request() {
            if matches!(&kill_after, Some((0, _))) {
                // Gone once the need is known, as a dry run is.
                conn.close(9u32.into(), b"dry run");
                return Ran {
                    outcome: None,
                    headers,
                    held,
                };
            }
            let (header, bytes) = source.encode(&f);
            headers.push(header);
            let (conn, tx) = (conn.clone(), done_tx.clone());
            let cut = source.cut.contains(f.path.as_str());
            tokio::spawn(async move {
                let mut uni = conn.open_uni().await?;
                if cut {
                    uni.write_all(&bytes[..bytes.len() / 2]).await?;
                    // Let the bytes go before the reset discards what is unsent.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    uni.reset(0u32.into())?;
                    return anyhow::Ok(());
                }
                uni.write_all(&bytes).await?;
                uni.finish()?;
                let _ = tx.send(header);
                anyhow::Ok(())
            });
        }
        if s.is_finished() {
            break;
        }
        let deadline = epoch + Duration::from_millis(s.poll_timeout().expect("unfinished session"));
        tokio::select! {
            chunk = recv.read_chunk(64 * 1024, true) => match chunk {
                Ok(Some(c)) => s.handle_control(&c.bytes, now()),
                Ok(None) | Err(_) => s.handle_control_end(now()),
            },
            Some(header) = done_rx.recv() => {
                s.file_sent(&header, now());
                sent += 1;
                if let Some(path) = hold_for.take() {
                    let deadline = Instant::now() + WAIT;
                    while held.is_none() && Instant::now() < deadline {
                        held = std::fs::symlink_metadata(&path).ok().map(|m| m.ino());
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                if let Some((n, root)) = &kill_after {
                    if sent == *n {
                        wait_objects(root, *n).await;
                        conn.close(9u32.into(), b"killed");
                        return Ran {
                            outcome: None,
                            headers,
                            held,
                        };
                    }
                }
            }
            () = tokio::time::sleep_until(deadline.into()) => s.handle_timeout(now()),
        }
    }
    if matches!(s.outcome(), Some(Ok(_))) {
        let _ = send.finish();
    }
    let _ = tokio::time::timeout(WAIT, conn.closed()).await;
    conn.close(0u32.into(), b"bye");
    Ran {
        held,
        outcome: s.outcome().map(|o| match o {
            Ok(o) => Ok(o.clone()),
            Err(e) => Err(clone_error(e)),
        }),
        headers,
    }
}

fn clone_error(e: &ProtoError) -> ProtoError {
    match e {
        ProtoError::Remote { kind, message } => ProtoError::Remote {
            kind: *kind,
            message: message.clone(),
        },
        other => ProtoError::Protocol(other.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// Pushes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_push_builds_and_activates_the_release() {
    let d = Daemon::start().await;
    let a = tree_a();
    let ran = d
        .shop_client()
        .await
        .push("shop", &a, "r1", PushOpts::default())
        .await;
    let r = ran.report();
    // Seven files, two of equal content: six distinct contents travel, all in full.
    assert_eq!((r.files, r.needed, r.have_files), (7, 6, 1));
    assert_eq!((r.sent_full, r.sent_zstd_ref, r.sent_rsync), (6, 0, 0));
    assert!(r.activated);
    assert_eq!(r.staged.received, 6);
    assert_eq!(current_of(&d.shop()).as_deref(), Some("r1"));
    assert_release_holds(&d.shop(), "r1", &a);
    let via_current = std::fs::read(d.shop().join("current/vendor/big.php")).unwrap();
    assert!(via_current == a["vendor/big.php"]);
    assert!(staging_dirs(&d.shop()).is_empty());
    assert_eq!(
        objects(&d.shop()),
        0,
        "objects are dropped once a release holds them"
    );
}

/// The activation pipeline declared for the app in relsyncd's own config runs on activation over
/// the wire: a `before_activate` hook that refuses release r2 keeps r1 live and marks r2 bad.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_the_activation_pipeline_from_its_config() {
    let activation = toml::from_str(
        r#"before_activate = [["sh", "-c", "test \"$RELSYNC_RELEASE\" != r2 && touch \"$RELSYNC_RELEASE_DIR/../../hook-ran-$RELSYNC_RELEASE\""]]"#,
    )
    .unwrap();
    let d = Daemon::start_with(Setup {
        activation: Some(activation),
        ..Setup::default()
    })
    .await;
    let client = d.shop_client().await;
    let ran = client
        .push("shop", &tree_a(), "r1", PushOpts::default())
        .await;
    assert!(ran.report().activated);
    assert!(
        d.shop().join("hook-ran-r1").exists(),
        "the hook did not run for r1"
    );
    let ran = client
        .push("shop", &tree_b(), "r2", PushOpts::default())
        .await;
    let (_, message) = ran.remote_error();
    assert!(message.contains("before_activate"), "{message}");
    assert_eq!(current_of(&d.shop()).as_deref(), Some("r1"));
    let list = client.releases("shop").await;
    let r2 = list
        .iter()
        .find(|r| r.id.as_str() == "r2")
        .expect("r2 is kept");
    assert_eq!(r2.status, ReleaseStatus::Bad, "{list:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_content_as_a_new_release_sends_nothing_and_links_everything() {
    let d = Daemon::start().await;
    let c = d.shop_client().await;
    let a = tree_a();
    c.push("shop", &a, "r1", PushOpts::default()).await.report();
    let ran = c.push("shop", &a, "r2", PushOpts::default()).await;
    let r = ran.report();
    assert_eq!((r.needed, r.payload_bytes, r.signatures), (0, 0, 0));
    assert!(ran.headers.is_empty());
    assert_eq!(r.staged.linked, 7);
    assert_eq!(r.staged.received, 0);
    assert_eq!(current_of(&d.shop()).as_deref(), Some("r2"));
    for path in a.keys() {
        let (r1, r2) = (
            d.shop().join("releases/r1").join(path),
            d.shop().join("releases/r2").join(path),
        );
        assert_eq!(inode(&r1), inode(&r2), "{path} is a hard link to r1's copy");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_with_the_basis_in_the_client_cache_goes_as_zstd_ref() {
    let d = Daemon::start().await;
    let c = d.shop_client().await;
    let (a, b) = (tree_a(), tree_b());
    c.push("shop", &a, "r1", PushOpts::default()).await.report();
    let opts = PushOpts {
        cache: contents(&a),
        ..PushOpts::default()
    };
    let ran = c.push("shop", &b, "r2", opts).await;
    let r = ran.report();
    // Changed: big.php and App.php; new: New.php; the renamed css is already there.
    assert_eq!(r.needed, 3);
    assert_eq!(r.signatures, 0);
    assert_eq!(
        ran.format_of(&b, "vendor/big.php"),
        Some(DeltaFormat::ZstdRef)
    );
    assert_eq!(ran.format_of(&b, "src/New.php"), Some(DeltaFormat::Full));
    assert!(
        r.payload_bytes < 8_000,
        "a 24-byte patch of a 300 kB file cost {} bytes",
        r.payload_bytes
    );
    assert_eq!(current_of(&d.shop()).as_deref(), Some("r2"));
    assert_release_holds(&d.shop(), "r2", &b);
    assert_eq!(
        inode(&d.shop().join("releases/r1/public/app.css")),
        inode(&d.shop().join("releases/r2/public/site.css")),
        "the renamed file is linked"
    );
}

/// Waits until the app's next release is prestaged on top of `release`, and returns the tree's
/// directory inode.
async fn wait_prestaged(root: &Path, release: &str) -> u64 {
    let dir = root.join(".relsync/next").join(release);
    let deadline = Instant::now() + WAIT;
    while !dir.is_dir() {
        assert!(
            Instant::now() < deadline,
            "{release} was not prestaged: {:?}",
            std::fs::read_dir(root.join(".relsync/next")).map(|rd| rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .collect::<Vec<_>>())
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    inode(&dir)
}

/// Once idle, the daemon prestages the current release's tree; the next push starts from it
/// (the tree becomes the new release), changes only what differs, and leaves the release it was
/// made of alone. A restart makes the tree again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_starts_from_the_tree_prestaged_while_the_app_was_idle() {
    let mut d = Daemon::start().await;
    let c = d.shop_client().await;
    let (a, b) = (tree_a(), tree_b());
    c.push("shop", &a, "r1", PushOpts::default()).await.report();
    let tree = wait_prestaged(&d.shop(), "r1").await;
    let r1 = snapshot(&d.shop().join("releases/r1"));
    for path in a.keys() {
        assert_eq!(
            inode(&d.shop().join(".relsync/next/r1").join(path)),
            inode(&d.shop().join("releases/r1").join(path)),
            "{path} is prestaged as a link to r1's"
        );
    }

    let opts = PushOpts {
        cache: contents(&a),
        ..PushOpts::default()
    };
    let ran = c.push("shop", &b, "r2", opts).await;
    assert_eq!(ran.report().needed, 3);
    assert_eq!(
        inode(&d.shop().join("releases/r2")),
        tree,
        "the prestaged tree became r2"
    );
    assert_release_holds(&d.shop(), "r2", &b);
    assert_eq!(snapshot(&d.shop().join("releases/r1")), r1);
    assert_eq!(
        inode(&d.shop().join("releases/r1/public/app.css")),
        inode(&d.shop().join("releases/r2/public/site.css")),
    );
    assert!(staging_dirs(&d.shop()).is_empty());

    // Then r2's tree, and nothing else, is prestaged.
    wait_prestaged(&d.shop(), "r2").await;
    wait_lock_free(&d.shop()).await;
    let next: Vec<_> = std::fs::read_dir(d.shop().join(".relsync/next"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(next, ["r2"]);
    // A tree left by an earlier process is made again at startup (it may have been cut short).
    d.stop().await;
    let stray = d.shop().join(".relsync/next/r2/left-by-a-crash");
    std::fs::write(&stray, b"").unwrap();
    d.serve().await;
    let deadline = Instant::now() + WAIT;
    while stray.exists() {
        assert!(Instant::now() < deadline, "the old tree is still there");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_prestaged(&d.shop(), "r2").await;
    wait_lock_free(&d.shop()).await;
    assert!(!stray.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_without_the_basis_asks_for_a_signature_and_goes_as_rsync() {
    let d = Daemon::start().await;
    let c = d.shop_client().await;
    let (a, b) = (tree_a(), tree_b());
    let first = c.push("shop", &a, "r1", PushOpts::default()).await;
    assert_eq!(
        first.report().staged.previous,
        None,
        "the app had no release"
    );
    let ran = c
        .push(
            "shop",
            &b,
            "r2",
            PushOpts {
                no_activate: true,
                ..PushOpts::default()
            },
        )
        .await;
    let r = ran.report();
    assert_eq!(
        r.staged.previous,
        Some(rid("r1")),
        "what ran before the push"
    );
    // Only big.php's basis is large enough for an rsync round trip.
    assert_eq!(r.signatures, 1);
    assert_eq!(
        ran.format_of(&b, "vendor/big.php"),
        Some(DeltaFormat::Rsync)
    );
    assert_eq!((r.sent_rsync, r.sent_full), (1, 2));
    assert!(
        r.payload_bytes < 40_000,
        "rsync patch cost {} bytes",
        r.payload_bytes
    );
    assert!(!r.activated);
    assert_eq!(
        current_of(&d.shop()).as_deref(),
        Some("r1"),
        "staged, not activated"
    );
    assert_release_holds(&d.shop(), "r2", &b);
    // Activate it with the separate command.
    let out = c
        .command(
            "shop",
            Command::Activate {
                release: rid("r2"),
                prune: false,
            },
        )
        .await;
    assert!(
        matches!(out, Ok(client::Outcome::Activated { ref release, pruned: None }) if release.as_str() == "r2"),
        "{out:?}"
    );
    assert_eq!(current_of(&d.shop()).as_deref(), Some("r2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_and_moved_files_cost_nothing() {
    let d = Daemon::start().await;
    let c = d.shop_client().await;
    let a = tree_a();
    c.push("shop", &a, "r1", PushOpts::default()).await.report();
    let moved: Tree = a
        .iter()
        .map(|(p, content)| (format!("app/v2/{}", p.replace('/', "_")), content.clone()))
        .collect();
    let ran = c.push("shop", &moved, "r2", PushOpts::default()).await;
    let r = ran.report();
    assert_eq!((r.needed, r.payload_bytes), (0, 0));
    assert_eq!(r.staged.linked, moved.len() as u64);
    assert_release_holds(&d.shop(), "r2", &moved);
    assert_eq!(
        inode(&d.shop().join("releases/r1/vendor/big.php")),
        inode(&d.shop().join("releases/r2/app/v2/vendor_big.php"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mode_change_makes_a_new_inode_from_local_content() {
    let d = Daemon::start().await;
    let c = d.shop_client().await;
    let a = tree_a();
    c.push("shop", &a, "r1", PushOpts::default()).await.report();
    // Same content, one file executable: nothing to send, and the old inode is not chmod-ed.
    let mut m = manifest_of(&a).entries().to_vec();
    for e in &mut m {
        if e.path.as_str() == "index.php" {
            *e = Entry::file(
                "index.php",
                a["index.php"].len() as u64,
                0o755,
                Hash::of(&a["index.php"]),
            )
            .unwrap();
        }
    }
    let manifest = Manifest::from_unsorted(m, &Policy::default()).unwrap();
    let job = PushJob {
        release: rid("r2"),
        manifest: Arc::new(manifest),
        activate: true,
        cached: HashSet::new(),
        manifest_basis: None,
        packed_manifest: None,
    };
    let session = ClientSession::push(ClientConfig::default(), app("shop"), job, 0);
    let source = Arc::new(Source {
        tree: a.clone(),
        cache: HashMap::new(),
        lie: HashSet::new(),
        cut: HashSet::new(),
    });
    let ran = drive(c.connect().await, session, source, None, None).await;
    let r = ran.report();
    assert_eq!(r.needed, 0);
    let (old, new) = (
        d.shop().join("releases/r1/index.php"),
        d.shop().join("releases/r2/index.php"),
    );
    assert_ne!(inode(&old), inode(&new));
    assert_eq!(std::fs::metadata(&old).unwrap().mode() & 0o777, 0o644);
    assert_eq!(std::fs::metadata(&new).unwrap().mode() & 0o777, 0o755);
    assert_release_holds(&d.shop(), "r2", &a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_is_staged_from_what_the_daemon_holds_while_the_files_arrive() {
    let d = Daemon::start().await;
    let c = d.shop_client().await;
    let a = tree_a();
    c.push("shop", &a, "r1", PushOpts::default()).await.report();
    let mut b = a.clone();
    for i in 0..3 {
        b.insert(format!("new/f{i}.php"), text(700 + i, 3_000));
    }
    // The client reports one new file sent and holds back the others (and so `Done`) until
    // the unchanged index.php is linked into the staging directory.
    let opts = PushOpts {
        hold_for: Some(d.shop().join("releases/r2.staging/index.php")),
        max_streams: 1,
        ..PushOpts::default()
    };
    let ran = c.push("shop", &b, "r2", opts).await;
    let r = ran.report();
    assert_eq!(r.needed, 3);
    let linked = std::fs::metadata(d.shop().join("releases/r1/index.php"))
        .unwrap()
        .ino();
    assert_eq!(
        ran.held,
        Some(linked),
        "index.php was linked from r1 before the push's files were all in"
    );
    assert_eq!(current_of(&d.shop()).as_deref(), Some("r2"));
    assert_release_holds(&d.shop(), "r2", &b);
    assert_eq!(objects(&d.shop()), 0);
}

/// A client that goes away once it knows the need (a dry run) leaves the app's disk as it was:
/// the release build is planned then, but changes the disk only once the first file or
/// signature request shows the push goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_that_stops_at_the_need_leaves_the_disk_alone() {
    let d = Daemon::start().await;
    let c = d.shop_client().await;
    let a = tree_a();
    c.push("shop", &a, "r1", PushOpts::default()).await.report();
    let releases = d.shop().join("releases");
    let before = std::fs::metadata(&releases).unwrap().modified().unwrap();
    let mut b = a.clone();
    b.insert("new/added.php".into(), text(800, 4_000));
    let opts = PushOpts {
        kill_after: Some((0, d.shop())),
        ..PushOpts::default()
    };
    let ran = c.push("shop", &b, "r2", opts).await;
    assert!(ran.outcome.is_none(), "the client went away");
    wait_lock_free(&d.shop()).await;
    assert_eq!(
        std::fs::metadata(&releases).unwrap().modified().unwrap(),
        before,
        "nothing was created or removed in releases/"
    );
    assert!(staging_dirs(&d.shop()).is_empty());

    c.push("shop", &b, "r2", PushOpts::default()).await.report();
    assert_release_holds(&d.shop(), "r2", &b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_sender_is_refused_by_name_and_a_correct_push_then_succeeds() {
    let d = Daemon::start().await;
    let c = d.shop_client().await;
    let a = tree_a();
    let lie = PushOpts {
        lie: HashSet::from(["src/App.php".to_string()]),
        ..PushOpts::default()
    };
    let ran = c.push("shop", &a, "r1", lie).await;
    let (kind, message) = ran.remote_error();
    assert_eq!(kind, ErrorKind::Verify, "{message}");
    assert!(message.contains("src/App.php"), "{message}");
    assert_eq!(current_of(&d.shop()), None, "nothing was activated");
    assert!(!d.shop().join("releases/r1").exists());
    wait_lock_free(&d.shop()).await;
    assert!(staging_dirs(&d.shop()).is_empty());

    let ran = c.push("shop", &a, "r1", PushOpts::default()).await;
    ran.report();
    assert_eq!(current_of(&d.shop()).as_deref(), Some("r1"));
    assert_release_holds(&d.shop(), "r1", &a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_push_resumes_with_only_the_rest() {
    let d = Daemon::start().await;
    let c = d.shop_client().await;
    let t = tree_many(8);
    let opts = PushOpts {
        kill_after: Some((3, d.shop())),
        max_streams: 1,
        ..PushOpts::default()
    };
    let ran = c.push("shop", &t, "r1", opts).await;
    assert!(ran.outcome.is_none(), "the client was killed");
    wait_lock_free(&d.shop()).await;
    assert!(
        staging_dirs(&d.shop()).is_empty(),
        "a killed push leaves no staging"
    );
    assert_eq!(current_of(&d.shop()), None);
    let kept = objects(&d.shop());
    assert_eq!(kept, 3, "the received files stay as verified objects");

    let ran = c.push("shop", &t, "r1", PushOpts::default()).await;
    let r = ran.report();
    assert_eq!(r.needed, 8 - kept as u64);
    assert_eq!(r.have_files, kept as u64);
    assert_eq!(current_of(&d.shop()).as_deref(), Some("r1"));
    assert_release_holds(&d.shop(), "r1", &t);
    assert_eq!(objects(&d.shop()), 0);
}

/// Small text files (read with their header), incompressible ones over the early allowance
/// (read as the driver plans: in memory once admitted, spooled while queued), and empty ones.
fn tree_mixed(small: u64, large: u64) -> Tree {
    let mut t = tree_many(small);
    for i in 0..large {
        t.insert(
            format!("assets/b{i:02}.bin"),
            noise(500 + i, 10_000 + i as usize * 500),
        );
    }
    t.insert("assets/empty".into(), Vec::new());
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_files_under_a_small_budget_arrive_by_every_path_and_a_lie_is_named() {
    // A 64 KiB budget leaves 4 KiB for payloads read before their file is admitted: small
    // payloads mostly take that way, the others queue and spool.
    let d = Daemon::start_with(Setup {
        limits: Limits {
            max_bytes_in_flight: 64 << 10,
            ..Limits::default()
        },
        ..Setup::default()
    })
    .await;
    let c = d.shop_client().await;
    let t = tree_mixed(250, 40);
    let lie = PushOpts {
        lie: HashSet::from(["lib/f150.php".to_string()]),
        ..PushOpts::default()
    };
    let ran = c.push("shop", &t, "r1", lie).await;
    let (kind, message) = ran.remote_error();
    assert_eq!(kind, ErrorKind::Verify, "{message}");
    assert!(message.contains("lib/f150.php"), "{message}");
    wait_lock_free(&d.shop()).await;
    assert!(staging_dirs(&d.shop()).is_empty());
    assert_eq!(current_of(&d.shop()), None);
    let kept = objects(&d.shop()) as u64;

    let ran = c.push("shop", &t, "r1", PushOpts::default()).await;
    let r = ran.report();
    // Everything stored before the lie was found is kept.
    assert_eq!(r.needed, t.len() as u64 - kept);
    assert_release_holds(&d.shop(), "r1", &t);
    assert_eq!(objects(&d.shop()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_cut_with_many_files_in_flight_keeps_what_was_stored_and_resumes() {
    let d = Daemon::start().await;
    let c = d.shop_client().await;
    let t = tree_mixed(300, 20);
    let opts = PushOpts {
        kill_after: Some((40, d.shop())),
        ..PushOpts::default()
    };
    let ran = c.push("shop", &t, "r1", opts).await;
    assert!(ran.outcome.is_none(), "the client was killed");
    // The lock goes only once every store the connection queued has finished.
    wait_lock_free(&d.shop()).await;
    assert!(staging_dirs(&d.shop()).is_empty());
    assert_eq!(current_of(&d.shop()), None);
    let kept = objects(&d.shop()) as u64;
    assert!(kept >= 40, "{kept} objects");

    let ran = c.push("shop", &t, "r1", PushOpts::default()).await;
    let r = ran.report();
    assert_eq!(r.have_files, kept);
    assert_eq!(r.needed, t.len() as u64 - kept);
    assert_release_holds(&d.shop(), "r1", &t);
    assert_eq!(objects(&d.shop()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_in_the_middle_of_a_transfer_ends_it_and_a_restart_resumes() {
    // Almost no grace and a slow client: the session is ended with file streams arriving and
    // stores queued, which must neither hang the shutdown nor leave anything half-built.
    let mut d = Daemon::start_with(Setup {
        options: ServeOptions {
            grace: Duration::from_millis(1),
            ..ServeOptions::default()
        },
        ..Setup::default()
    })
    .await;
    let t = tree_mixed(1000, 20);
    let c = d.shop_client().await;
    let push = {
        let t = t.clone();
        let opts = PushOpts {
            max_streams: 2,
            ..PushOpts::default()
        };
        tokio::spawn(async move { c.push("shop", &t, "r1", opts).await })
    };
    wait_objects(&d.shop(), 30).await;
    d.stop().await;
    let ran = tokio::time::timeout(WAIT, push)
        .await
        .expect("the client hears the end in time")
        .unwrap();
    wait_lock_free(&d.shop()).await;
    assert!(staging_dirs(&d.shop()).is_empty());
    if matches!(ran.outcome, Some(Ok(_))) || current_of(&d.shop()).is_some() {
        // The push won the race against the shutdown.
        assert_release_holds(&d.shop(), "r1", &t);
        return;
    }
    let kept = objects(&d.shop()) as u64;
    // The release may have been built before the session was ended; then nothing is needed.
    let built = d.shop().join("releases/r1").exists();

    d.serve().await;
    let ran = d
        .shop_client()
        .await
        .push("shop", &t, "r1", PushOpts::default())
        .await;
    let r = ran.report();
    let needed = if built { 0 } else { t.len() as u64 - kept };
    assert_eq!(r.needed, needed, "built before the end: {built}");
    assert_release_holds(&d.shop(), "r1", &t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_id_that_exists_is_refused_before_any_transfer() {
    let d = Daemon::start().await;
    let c = d.shop_client().await;
    let a = tree_a();
    c.push("shop", &a, "r1", PushOpts::default()).await.report();
    let ran = c.push("shop", &tree_b(), "r1", PushOpts::default()).await;
    let (kind, message) = ran.remote_error();
    assert_eq!(kind, ErrorKind::BadRequest);
    assert!(
        message.contains("r1") && message.contains("already exists"),
        "{message}"
    );
    assert!(ran.headers.is_empty());
    assert_release_holds(&d.shop(), "r1", &a);
}

/// A push cut short after its release was built (the client gone before `Activate`, or the daemon
/// killed before the swap) converges when run again under the same release id: nothing travels
/// and the release is activated. Other content under that id is still refused (above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_push_again_after_its_release_was_built_activates_it() {
    let d = Daemon::start().await;
    let c = d.shop_client().await;
    c.push("shop", &tree_a(), "r1", PushOpts::default())
        .await
        .report();
    let b = tree_b();
    let staged = PushOpts {
        no_activate: true,
        ..PushOpts::default()
    };
    assert!(!c.push("shop", &b, "r2", staged).await.report().activated);
    assert_eq!(current_of(&d.shop()).as_deref(), Some("r1"));
    // As if that run had been killed after completing r2 but before dropping its objects.
    let new = &b["src/New.php"];
    std::fs::write(
        d.shop()
            .join(".relsync/objects")
            .join(sync_core::layout::object_name(&Hash::of(new), 0o644)),
        new,
    )
    .unwrap();
    assert_eq!(objects(&d.shop()), 1);

    let ran = c.push("shop", &b, "r2", PushOpts::default()).await;
    let r = ran.report();
    assert_eq!((r.needed, r.payload_bytes), (0, 0));
    assert_eq!(r.have_files, b.len() as u64);
    assert!(ran.headers.is_empty());
    assert_eq!(r.staged.received, 0);
    assert!(r.activated);
    assert_eq!(current_of(&d.shop()).as_deref(), Some("r2"));
    assert_release_holds(&d.shop(), "r2", &b);
    assert_eq!(objects(&d.shop()), 0, "objects r2 holds are dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_edited_in_place_is_not_trusted_as_content_or_basis() {
    let d = Daemon::start().await;
    let c = d.shop_client().await;
    let a = tree_a();
    c.push("shop", &a, "r1", PushOpts::default()).await.report();
    // Someone edits two files of the live release in place (same size, new mtime).
    for path in ["index.php", "vendor/big.php"] {
        let p = d.shop().join("releases/r1").join(path);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[10] ^= 0x20;
        std::fs::write(&p, &bytes).unwrap();
    }
    let b = tree_b();
    let ran = c.push("shop", &b, "r2", PushOpts::default()).await;
    let r = ran.report();
    // index.php is unchanged in B but its only copy was edited: the daemon asks for it. big.php
    // changed, and its edited basis is not offered: it comes in full, without a signature.
    assert_eq!(r.needed, 4);
    assert_eq!(r.signatures, 0);
    assert_eq!(ran.format_of(&b, "index.php"), Some(DeltaFormat::Full));
    assert_eq!(ran.format_of(&b, "vendor/big.php"), Some(DeltaFormat::Full));
    assert_release_holds(&d.shop(), "r2", &b);
}

/// Incompressible bytes, so payloads are as large as the files.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2).wrapping_add(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_beyond_the_in_flight_budget_wait_without_stalling_the_connection() {
    // Every payload is over the budget, so files are admitted one at a time while the others
    // queue; the connection window holds less than the queued payloads, so unread queued
    // streams would starve the admitted one.
    let d = Daemon::start_with(Setup {
        limits: Limits {
            max_bytes_in_flight: 1,
            ..Limits::default()
        },
        options: ServeOptions {
            grace: Duration::from_secs(5),
            net: NetConfig {
                stream_receive_window: 128 * 1024,
                connection_receive_window: 256 * 1024,
                ..NetConfig::default()
            },
        },
        ..Setup::default()
    })
    .await;
    let c = d.shop_client().await;
    let t: Tree = (0..8)
        .map(|i| (format!("data/blob{i}.bin"), noise(i + 1, 200_000)))
        .collect();
    let ran = c.push("shop", &t, "r1", PushOpts::default()).await;
    let r = ran.report();
    assert_eq!(r.needed, 8);
    assert!(r.payload_bytes >= 8 * 200_000);
    assert_release_holds(&d.shop(), "r1", &t);
}

/// Runs relsync's own client (`client::push`) against `d`: it carries many files on each of a
/// few streams.
async fn push_with_the_real_client(d: &Daemon, tree: &Tree, release: &str) -> client::PushReport {
    let src = d.base.join(format!("src-{release}"));
    for (path, content) in tree {
        let file = src.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, content).unwrap();
    }
    let target =
        sync_server::client::Target::parse(&format!("127.0.0.1:{}/shop", d.addr().port())).unwrap();
    let conn = sync_server::client::connect_pinned(
        &target,
        &d.shop_key,
        Some(d.identity.fingerprint()),
        &NetConfig::default(),
        WAIT,
    )
    .await
    .unwrap();
    let req = sync_server::client::PushRequest {
        release: rid(release),
        manifest: Arc::new(manifest_of(tree)),
        source: src,
        activate: true,
    };
    let pushed = sync_server::client::push(&conn, &req, None, &|_| {}).await;
    conn.close().await;
    pushed.unwrap().session
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_and_a_few_large_files_on_shared_streams_all_arrive_intact() {
    let mut t: Tree = (0..900u64)
        .map(|i| {
            (
                format!("lib/f{i:03}.php"),
                text(500 + i, 50 + (i as usize * 53) % 4_000),
            )
        })
        .collect();
    t.insert("lib/f100.bin".into(), noise(7, 3 << 20));
    t.insert("lib/f450.bin".into(), noise(8, 600_000));
    t.insert("vendor/huge.bin".into(), noise(9, 34 << 20));
    t.insert("lib/empty.txt".into(), Vec::new());
    // The default limits; and a budget so tight that most headers wait for it, their payloads
    // read to spool files, with only two streams.
    let setups = [
        Setup::default(),
        Setup {
            limits: Limits {
                max_bytes_in_flight: 64 * 1024,
                max_streams: 2,
                ..Limits::default()
            },
            ..Setup::default()
        },
    ];
    for setup in setups {
        let limits = setup.limits;
        let d = Daemon::start_with(setup).await;
        let r = push_with_the_real_client(&d, &t, "r1").await;
        assert_eq!(r.needed, t.len() as u64, "{limits:?}");
        assert_eq!(r.sent_full, r.needed, "{limits:?}");
        assert_eq!(current_of(&d.shop()).as_deref(), Some("r1"));
        let dir = d.shop().join("releases/r1");
        for (path, content) in &t {
            let got = std::fs::read(dir.join(path)).unwrap();
            assert!(
                Hash::of(&got) == Hash::of(content),
                "{path} differs on the daemon ({limits:?})"
            );
        }
    }
}

/// Temporary files left in the object store (unfinished objects).
fn object_temporaries(root: &Path) -> Vec<String> {
    std::fs::read_dir(root.join(".relsync/objects"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.starts_with('.').then_some(name)
        })
        .collect()
}

/// Small files and one plain payload over the size that is rebuilt as it arrives
/// (`ReadInto::Direct`) rather than spooled.
fn tree_with_a_large_file() -> Tree {
    let mut t = tree_many(12);
    t.insert("assets/big.bin".into(), noise(77, 33 << 20));
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_payload_rebuilt_as_it_arrives_is_checked_like_any_other() {
    let d = Daemon::start().await;
    let c = d.shop_client().await;
    let t = tree_with_a_large_file();
    let lie = PushOpts {
        lie: HashSet::from(["assets/big.bin".to_string()]),
        ..PushOpts::default()
    };
    let ran = c.push("shop", &t, "r1", lie).await;
    let (kind, message) = ran.remote_error();
    assert_eq!(kind, ErrorKind::Verify, "{message}");
    assert!(message.contains("assets/big.bin"), "{message}");
    wait_lock_free(&d.shop()).await;
    assert!(staging_dirs(&d.shop()).is_empty());
    assert_eq!(object_temporaries(&d.shop()), Vec::<String>::new());
    assert_eq!(current_of(&d.shop()), None);
    let kept = objects(&d.shop()) as u64;

    let ran = c.push("shop", &t, "r1", PushOpts::default()).await;
    let r = ran.report();
    assert_eq!(r.have_files, kept);
    assert_eq!(r.needed, t.len() as u64 - kept);
    assert_eq!(ran.format_of(&t, "assets/big.bin"), Some(DeltaFormat::Full));
    assert_release_holds(&d.shop(), "r1", &t);
    assert_eq!(objects(&d.shop()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_payload_cut_while_it_is_rebuilt_leaves_nothing_half_written() {
    let d = Daemon::start().await;
    let c = d.shop_client().await;
    let t = tree_with_a_large_file();
    let cut = PushOpts {
        cut: HashSet::from(["assets/big.bin".to_string()]),
        ..PushOpts::default()
    };
    let ran = c.push("shop", &t, "r1", cut).await;
    assert!(
        !matches!(ran.outcome, Some(Ok(_))),
        "a push missing a file cannot succeed: {:?}",
        ran.outcome
    );
    wait_lock_free(&d.shop()).await;
    assert!(staging_dirs(&d.shop()).is_empty());
    assert_eq!(object_temporaries(&d.shop()), Vec::<String>::new());
    assert_eq!(current_of(&d.shop()), None);
    let big = Hash::of(&t["assets/big.bin"]);
    assert!(
        !d.shop()
            .join(".relsync/objects")
            .join(format!("{}.644", big.to_hex()))
            .exists(),
        "no object for the cut file"
    );
    let kept = objects(&d.shop()) as u64;

    let ran = c.push("shop", &t, "r1", PushOpts::default()).await;
    let r = ran.report();
    assert_eq!(r.have_files, kept);
    assert_eq!(r.needed, t.len() as u64 - kept);
    assert_release_holds(&d.shop(), "r1", &t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activated_push_keeps_only_the_configured_number_of_releases() {
    let d = Daemon::start_with(Setup {
        keep: 2,
        ..Setup::default()
    })
    .await;
    let c = d.shop_client().await;
    let mut t = tree_a();
    for (i, r) in ["r1", "r2", "r3"].iter().enumerate() {
        t.insert("index.php".into(), text(70 + i as u64, 1000));
        c.push("shop", &t, r, PushOpts::default()).await.report();
    }
    let ids: Vec<String> = c
        .releases("shop")
        .await
        .iter()
        .map(|i| i.id.to_string())
        .collect();
    assert_eq!(ids, ["r2", "r3"]);
    assert!(!d.shop().join("releases/r1").exists());
    // A push that is only staged prunes nothing.
    t.insert("index.php".into(), text(80, 1000));
    c.push(
        "shop",
        &t,
        "r4",
        PushOpts {
            no_activate: true,
            ..PushOpts::default()
        },
    )
    .await
    .report();
    assert_eq!(c.releases("shop").await.len(), 3);
    // Nor does activating it with the command, unless the command asks for the prune.
    let activate = |release: &str, prune| Command::Activate {
        release: rid(release),
        prune,
    };
    let out = c.command("shop", activate("r4", false)).await;
    assert!(
        matches!(out, Ok(client::Outcome::Activated { ref release, pruned: None }) if release.as_str() == "r4"),
        "{out:?}"
    );
    assert_eq!(c.releases("shop").await.len(), 3);
    t.insert("index.php".into(), text(81, 1000));
    c.push(
        "shop",
        &t,
        "r5",
        PushOpts {
            no_activate: true,
            ..PushOpts::default()
        },
    )
    .await
    .report();
    let out = c.command("shop", activate("r5", true)).await;
    match out {
        Ok(client::Outcome::Activated {
            release,
            pruned: Some(Pruning::Removed(removed)),
        }) => {
            assert_eq!(release, rid("r5"));
            assert_eq!(removed, [rid("r2"), rid("r3")]);
        }
        other => panic!("activating with a prune: {other:?}"),
    }
    let ids: Vec<String> = c
        .releases("shop")
        .await
        .iter()
        .map(|i| i.id.to_string())
        .collect();
    assert_eq!(ids, ["r4", "r5"]);
    assert!(!d.shop().join("releases/r2").exists());
    assert_eq!(current_of(&d.shop()).as_deref(), Some("r5"));
}

// ---------------------------------------------------------------------------------------------
// Commands

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_rollback_activate_and_prune_over_the_wire() {
    let d = Daemon::start().await;
    let c = d.shop_client().await;
    let mut t = tree_a();
    for (i, r) in ["r1", "r2", "r3"].iter().enumerate() {
        t.insert("index.php".into(), text(50 + i as u64, 1000));
        c.push("shop", &t, r, PushOpts::default()).await.report();
    }
    let status = |list: &[ReleaseInfo]| -> Vec<(String, ReleaseStatus)> {
        list.iter().map(|i| (i.id.to_string(), i.status)).collect()
    };
    let list = c.releases("shop").await;
    assert_eq!(
        status(&list),
        vec![
            ("r1".into(), ReleaseStatus::Good),
            ("r2".into(), ReleaseStatus::Rollback),
            ("r3".into(), ReleaseStatus::Current)
        ]
    );
    assert_eq!(list[2].files, t.len() as u64);
    assert_eq!(list[2].manifest, manifest_of(&t).digest());

    let out = c.command("shop", Command::Rollback { to: None }).await;
    assert!(
        matches!(out, Ok(client::Outcome::Activated { ref release, pruned: None }) if release.as_str() == "r2"),
        "{out:?}"
    );
    assert_eq!(current_of(&d.shop()).as_deref(), Some("r2"));

    // Prune to one: current (r2) and its rollback target (r1) are protected, r3 goes.
    let out = c.command("shop", Command::Prune { keep: Some(1) }).await;
    match out {
        Ok(client::Outcome::Pruned { removed }) => assert_eq!(removed, vec![rid("r3")]),
        other => panic!("prune failed: {other:?}"),
    }
    assert!(!d.shop().join("releases/r3").exists());
    assert_eq!(
        status(&c.releases("shop").await),
        vec![
            ("r1".into(), ReleaseStatus::Rollback),
            ("r2".into(), ReleaseStatus::Current)
        ]
    );

    let out = c
        .command(
            "shop",
            Command::Activate {
                release: rid("r3"),
                prune: false,
            },
        )
        .await;
    match out {
        Err(ProtoError::Remote { kind, message }) => {
            assert_eq!(kind, ErrorKind::NotFound);
            assert!(message.contains("r3"), "{message}");
        }
        other => panic!("activating a pruned release should fail: {other:?}"),
    }
    let out = c
        .command(
            "shop",
            Command::Activate {
                release: rid("r1"),
                prune: false,
            },
        )
        .await;
    assert!(
        matches!(out, Ok(client::Outcome::Activated { .. })),
        "{out:?}"
    );
    assert_eq!(current_of(&d.shop()).as_deref(), Some("r1"));
    // Activating the current release again is fine.
    let out = c
        .command(
            "shop",
            Command::Activate {
                release: rid("r1"),
                prune: false,
            },
        )
        .await;
    assert!(
        matches!(out, Ok(client::Outcome::Activated { .. })),
        "{out:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Refusals, contention and misbehaving peers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_authorized_for_another_app_is_refused_without_touching_the_root() {
    let d = Daemon::start().await;
    let before = snapshot(&d.shop());
    let blog_client = d.client(&d.blog_key).await;
    let ran = blog_client
        .push("shop", &tree_a(), "r1", PushOpts::default())
        .await;
    let (kind, message) = ran.remote_error();
    assert_eq!(kind, ErrorKind::Unauthorized);
    assert!(message.contains("shop"), "{message}");
    assert!(ran.headers.is_empty());
    let out = blog_client
        .command("shop", Command::Prune { keep: Some(1) })
        .await;
    assert!(
        matches!(
            out,
            Err(ProtoError::Remote {
                kind: ErrorKind::Unauthorized,
                ..
            })
        ),
        "{out:?}"
    );
    let out = blog_client.command("nosuchapp", Command::Releases).await;
    assert!(
        matches!(
            out,
            Err(ProtoError::Remote {
                kind: ErrorKind::Unauthorized,
                ..
            })
        ),
        "{out:?}"
    );
    assert_eq!(
        snapshot(&d.shop()),
        before,
        "the shop root is untouched: no lock, no staging, no objects"
    );

    // A key nobody authorized does not get past the handshake.
    let stranger = Client::new(
        d.addr(),
        d.identity.fingerprint(),
        Identity::generate("stranger").unwrap(),
    );
    assert!(matches!(
        stranger.try_connect().await,
        Err(ConnectError::ClientKeyRefused { .. })
    ));

    // The blog key still works for its own app.
    blog_client
        .push("blog", &tree_a(), "b1", PushOpts::default())
        .await
        .report();
    assert_eq!(current_of(&d.root("blog")).as_deref(), Some("b1"));
}

/// A key no app authorizes gets past the handshake of a daemon whose app takes relayed pushes,
/// but may only stage, and only with a ticket an authorized key signed for exactly this release,
/// manifest and relay key; every other ticket is refused before the root is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_stages_only_with_a_matching_ticket_and_never_activates() {
    let d = Daemon::start_with(Setup {
        accept_relayed: true,
        ..Setup::default()
    })
    .await;
    let relay = Identity::generate("relay").unwrap();
    let relay_client = d.client(&relay).await;
    let tree = tree_a();
    let digest = Hash::of(&manifest_of(&tree).encode());
    let sign = |key: &Identity, release: &str, digest: Hash, relay_key: Fingerprint| {
        ticket::sign(key, &app("shop"), &rid(release), digest, relay_key).unwrap()
    };
    let good = sign(&d.shop_key, "r1", digest, relay.fingerprint());
    let flipped = {
        let mut t = Ticket::decode(&good).unwrap();
        t.signature[0] ^= 1;
        t.encode()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no ticket", Vec::new()),
        ("garbage", vec![7; 90]),
        ("flipped signature", flipped),
        (
            "signed by a key of another app",
            sign(&d.blog_key, "r1", digest, relay.fingerprint()),
        ),
        (
            "for another release",
            sign(&d.shop_key, "r2", digest, relay.fingerprint()),
        ),
        (
            "for another manifest",
            sign(&d.shop_key, "r1", Hash::of(b"other"), relay.fingerprint()),
        ),
        (
            "for another relay key",
            sign(&d.shop_key, "r1", digest, d.blog_key.fingerprint()),
        ),
    ];
    let before = snapshot(&d.shop());
    for (what, ticket) in cases {
        let ran = relay_client
            .push(
                "shop",
                &tree,
                "r1",
                PushOpts {
                    relay: Some(RelayPlan {
                        ticket,
                        nodes: Vec::new(),
                    }),
                    no_activate: true,
                    ..PushOpts::default()
                },
            )
            .await;
        let (kind, _) = ran.remote_error();
        assert_eq!(kind, ErrorKind::Unauthorized, "{what}");
        assert!(ran.headers.is_empty(), "{what}");
        assert_eq!(snapshot(&d.shop()), before, "{what}: the root was touched");
    }
    let out = relay_client.command("shop", Command::Releases).await;
    assert!(
        matches!(
            out,
            Err(ProtoError::Remote {
                kind: ErrorKind::Unauthorized,
                ..
            })
        ),
        "{out:?}"
    );

    // The matching ticket stages the release. A child whose ticket is not one the client
    // signed for this daemon's key is reported, and never dialed.
    let bogus_child = RelayNode {
        host: "127.0.0.1:9".into(),
        key: [1; 32],
        parent: None,
        ticket: sign(&d.shop_key, "r1", digest, relay.fingerprint()),
    };
    let ran = relay_client
        .push(
            "shop",
            &tree,
            "r1",
            PushOpts {
                relay: Some(RelayPlan {
                    ticket: good.clone(),
                    nodes: vec![bogus_child],
                }),
                no_activate: true,
                ..PushOpts::default()
            },
        )
        .await;
    let relayed = &ran.report().staged.relayed;
    assert_eq!(relayed.len(), 1, "{relayed:?}");
    let why = relayed[0].error.as_deref().unwrap_or_default();
    assert!(why.contains("not relayed to 127.0.0.1:9"), "{why}");
    assert_release_holds(&d.shop(), "r1", &tree);
    wait_lock_free(&d.shop()).await;

    // The activation a relay asks for is refused.
    let ran = relay_client
        .push(
            "shop",
            &tree,
            "r1",
            PushOpts {
                relay: Some(RelayPlan {
                    ticket: good,
                    nodes: Vec::new(),
                }),
                ..PushOpts::default()
            },
        )
        .await;
    let (kind, message) = ran.remote_error();
    assert_eq!(kind, ErrorKind::Unauthorized, "{message}");
    assert!(message.contains("activation"), "{message}");
    wait_lock_free(&d.shop()).await;
    assert_release_holds(&d.shop(), "r1", &tree);
    assert_eq!(current_of(&d.shop()), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_push_while_one_holds_the_lock_is_told_busy() {
    let d = Daemon::start().await;
    let c = d.shop_client().await;
    let a = tree_a();
    let (holder, _send, mut recv) = c.hello("shop", push_command(&a, "r1")).await;
    let mut dec = FrameDecoder::new(MIN_MAX_FRAME);
    assert!(
        matches!(
            next_msg(&mut recv, &mut dec).await,
            Some(DaemonMsg::Welcome { .. })
        ),
        "the first push holds the lock"
    );

    let ran = c.push("shop", &a, "r2", PushOpts::default()).await;
    let (kind, message) = ran.remote_error();
    assert_eq!(kind, ErrorKind::Busy);
    assert!(message.contains("busy (held by"), "{message}");
    // Another app is not affected.
    d.client(&d.blog_key)
        .await
        .push("blog", &a, "b1", PushOpts::default())
        .await
        .report();

    holder.close(0u32.into(), b"gone");
    wait_lock_free(&d.shop()).await;
    c.push("shop", &a, "r2", PushOpts::default()).await.report();
    assert_eq!(current_of(&d.shop()).as_deref(), Some("r2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peers_are_cut_off_after_the_message_timeout_and_the_lock_is_released() {
    let limits = Limits {
        message_timeout_ms: 1_000,
        ..Limits::default()
    };
    let d = Daemon::start_with(Setup {
        limits,
        ..Setup::default()
    })
    .await;
    let c = d.shop_client().await;

    // Opens the control stream and never writes to it.
    let started = Instant::now();
    let conn = c.connect().await;
    let (_send, _recv) = conn.open_bi().await.unwrap();
    let closed = tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("the daemon closes the connection");
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(_)),
        "{closed:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed after {:?}",
        started.elapsed()
    );

    // Says Hello, takes the lock, then stalls before the manifest.
    let a = tree_a();
    let (_conn, _send, mut recv) = c.hello("shop", push_command(&a, "r1")).await;
    let mut dec = FrameDecoder::new(MIN_MAX_FRAME);
    assert!(matches!(
        next_msg(&mut recv, &mut dec).await,
        Some(DaemonMsg::Welcome { .. })
    ));
    match next_msg(&mut recv, &mut dec).await {
        Some(DaemonMsg::Error { kind, message }) => {
            assert_eq!(kind, ErrorKind::Timeout);
            assert!(message.contains("manifest"), "{message}");
        }
        other => panic!("expected a timeout error, got {other:?}"),
    }
    wait_lock_free(&d.shop()).await;
    assert!(staging_dirs(&d.shop()).is_empty());
    c.push("shop", &a, "r1", PushOpts::default()).await.report();
}

// ---------------------------------------------------------------------------------------------
// Restart and shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_daemon_restart() {
    let mut d = Daemon::start().await;
    let a = tree_a();
    d.shop_client()
        .await
        .push("shop", &a, "r1", PushOpts::default())
        .await
        .report();
    d.stop().await;
    // A crash left a staging directory and a stray current.tmp; the next start removes them.
    std::fs::create_dir(d.shop().join("releases/r9.staging")).unwrap();
    std::os::unix::fs::symlink("releases/r9", d.shop().join("current.tmp")).unwrap();
    d.serve().await;
    assert!(staging_dirs(&d.shop()).is_empty());
    assert!(!d.shop().join("current.tmp").exists());

    let c = d.shop_client().await;
    let list = c.releases("shop").await;
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].id.as_str(), list[0].status),
        ("r1", ReleaseStatus::Current)
    );
    let ran = c.push("shop", &a, "r2", PushOpts::default()).await;
    assert_eq!(ran.report().needed, 0);
    assert_eq!(current_of(&d.shop()).as_deref(), Some("r2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_a_stalled_session_after_the_grace_period() {
    let mut d = Daemon::start_with(Setup {
        options: ServeOptions {
            grace: Duration::from_millis(300),
            ..ServeOptions::default()
        },
        ..Setup::default()
    })
    .await;
    let c = d.shop_client().await;
    let a = tree_a();
    let (_conn, _send, mut recv) = c.hello("shop", push_command(&a, "r1")).await;
    let mut dec = FrameDecoder::new(MIN_MAX_FRAME);
    assert!(matches!(
        next_msg(&mut recv, &mut dec).await,
        Some(DaemonMsg::Welcome { .. })
    ));
    let started = Instant::now();
    d.stop().await;
    assert!(started.elapsed() >= Duration::from_millis(250));
    match next_msg(&mut recv, &mut dec).await {
        Some(DaemonMsg::Error { message, .. }) => {
            assert!(message.contains("shutting down"), "{message}")
        }
        other => panic!("expected a shutdown error, got {other:?}"),
    }
    wait_lock_free(&d.shop()).await;
    assert!(staging_dirs(&d.shop()).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Syncs into an export, with the library's client

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_spools_payloads_that_wait_for_the_budget_inside_the_destination() {
    use sync_server::client::{self, SyncRequest, SyncTarget};
    let d = Daemon::start_with(Setup {
        limits: Limits {
            max_bytes_in_flight: 64 * 1024,
            ..Limits::default()
        },
        export: true,
        ..Setup::default()
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let tree: Tree = (0..8)
        .map(|i| (format!("blob{i}.bin"), noise(i, 300_000)))
        .collect();
    for (p, c) in &tree {
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join(p), c).unwrap();
    }
    let manifest = sync_core::edge::scan::scan(
        &src,
        &sync_core::edge::scan::ScanOptions {
            ignore_file: false,
            ..Default::default()
        },
        &|_| {},
    )
    .unwrap()
    .manifest;
    let mut known = sync_server::tls::KnownHosts::load(&tmp.path().join("known_hosts")).unwrap();
    let host_port = format!("127.0.0.1:{}", d.addr().port());
    known.add(&host_port, d.identity.fingerprint()).unwrap();
    let dest = SyncTarget::parse(&format!("relsync://{host_port}/media/site")).unwrap();
    let conn = client::connect(
        dest.target(),
        &d.shop_key,
        &known,
        &NetConfig::default(),
        WAIT,
    )
    .await
    .unwrap();
    let req = SyncRequest {
        destination: dest.clone(),
        delete: false,
        dry_run: false,
        excludes: vec![],
        manifest: Arc::new(manifest),
        source: src.clone(),
    };
    let report = client::sync(&conn, &req, None, &|_| {}).await.unwrap();
    conn.close().await;
    let s = &report.session;
    // Each payload is larger than the whole budget: admitted one at a time, the rest spooled.
    assert_eq!((s.needed, s.sent_full), (8, 8), "{s:?}");
    assert!(s.payload_bytes > 8 * 300_000, "{s:?}");
    let site = d.base.join("media/site");
    for (p, c) in &tree {
        assert!(std::fs::read(site.join(p)).unwrap() == *c, "{p}");
    }
    let names: Vec<String> = std::fs::read_dir(&site)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".relsync"))
        .collect();
    assert!(names.is_empty(), "left behind: {names:?}");
}

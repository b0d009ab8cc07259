//! A client session and a daemon session wired together in memory with a simulated clock.
//!
//! The client "driver" encodes files with the real `delta` engines; the daemon "driver" keeps an
//! in-memory object store and the content of kept releases, rebuilds every payload with
//! `delta::apply` (which checks the blake3 hash) and builds releases from what it holds. Control
//! bytes can be delivered in any chunking, so the same push can be replayed byte by byte.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use proptest::prelude::*;

use sync_core::delta::{self, Basis, BasisSignature, DeltaError, DeltaFormat};
use sync_core::manifest::{Entry, Hash, Manifest, Policy};
use sync_core::plan::{plan_mirror, MirrorOp, MirrorStats};
use sync_core::proto::client::{
    self, ClientConfig, ClientSession, ClientState, Method, PushJob, PushReport, SendFile,
};
use sync_core::proto::client::{SyncJob, SyncReport};
use sync_core::proto::daemon::{
    self, compute_need, DaemonSession, DaemonState, Event, FileFailure, FileJob,
};
use sync_core::proto::{fuzz as proto_fuzz, ProtoError};
use sync_core::release::ReleaseId;
use sync_core::wire::{
    self, AppName, BasisRef, ClientMsg, Command, DaemonMsg, ErrorKind, FileHeader, Limits, Message,
    NeedFile, PhaseTime, Pruning, ReleaseInfo, ReleaseStatus, Staged, MIN_MAX_FRAME, VERSION,
};

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
            format!(
                "    $v{line} = compute({}, '{:x}');\n",
                line * 7,
                x % 100_000
            )
            .as_bytes(),
        );
        line += 1;
    }
    out.truncate(n);
    out
}

/// Release A: a small app with one large file (worth an rsync round trip) and a duplicate.
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

/// Release B: edits to the large file and to a small one, a new file, a removed file, a rename.
fn tree_b() -> Tree {
    let mut t = tree_a();
    let big = t.get_mut("vendor/big.php").unwrap();
    big.splice(
        150_000..150_000,
        b"// patched in release B\n".iter().copied(),
    );
    t.get_mut("src/App.php").unwrap()[100..110].copy_from_slice(b"/*edited*/");
    t.insert("src/New.php".into(), text(6, 3_000));
    t.remove("public/app.css");
    let css = text(5, 20_000);
    t.insert("public/site.css".into(), css);
    t
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

fn rid(s: &str) -> ReleaseId {
    ReleaseId::new(s).unwrap()
}

fn app() -> AppName {
    AppName::new("shop").unwrap()
}

fn contents(tree: &Tree) -> HashMap<Hash, Vec<u8>> {
    tree.values().map(|c| (Hash::of(c), c.clone())).collect()
}

// ---------------------------------------------------------------------------------------------
// The daemon's driver

#[derive(Default)]
struct Daemon {
    /// Content of kept releases.
    kept: HashMap<Hash, Vec<u8>>,
    /// Verified objects of pushes not yet built into a release.
    objects: HashMap<Hash, Vec<u8>>,
    releases: BTreeMap<ReleaseId, Arc<Manifest>>,
    current: Option<ReleaseId>,
    /// Answer signature requests with `None` (basis unusable).
    no_signatures: bool,
    /// Jobs stored per step; 0 stores all at once.
    receive_per_step: usize,
    jobs: VecDeque<FileJob>,
    /// Bytes after each file's header, by file index.
    payloads: HashMap<u32, Vec<u8>>,
    /// Requests seen, by name.
    log: Vec<String>,
    most_jobs_at_once: usize,
    /// The files of a sync's destination.
    mirror: Tree,
}

impl Daemon {
    fn answer(&mut self, r: daemon::Request, s: &mut DaemonSession, now: u64) {
        let name = match &r {
            daemon::Request::Open { .. } => "Open".to_string(),
            daemon::Request::ComputeNeed { .. } => "ComputeNeed".into(),
            daemon::Request::ComputeMirrorNeed { .. } => "ComputeMirrorNeed".into(),
            daemon::Request::Mirror { dry_run, .. } => format!("Mirror{}", u8::from(*dry_run)),
            daemon::Request::Signatures { files } => format!("Signatures{}", files.len()),
            daemon::Request::Receive(j) => format!("Receive{}", j.file),
            daemon::Request::Stage { .. } => "Stage".into(),
            daemon::Request::Activate { .. } => "Activate".into(),
            daemon::Request::ListReleases => "ListReleases".into(),
            daemon::Request::Rollback { .. } => "Rollback".into(),
            daemon::Request::Prune { .. } => "Prune".into(),
            daemon::Request::Clear => "Clear".into(),
        };
        self.log.push(name);
        match r {
            daemon::Request::Open { app, .. } => {
                let event = if app.as_str() == "shop" {
                    Event::Opened {
                        policy: Policy::default(),
                        manifest_basis: None,
                    }
                } else {
                    Event::Failed {
                        kind: ErrorKind::Unauthorized,
                        message: format!("this key may not deploy app {app}"),
                    }
                };
                s.handle_event(event, now);
            }
            daemon::Request::ComputeNeed { manifest, .. } => {
                let current = self.current.as_ref().map(|c| Arc::clone(&self.releases[c]));
                let need = compute_need(&manifest, current.as_deref(), |h| {
                    self.kept.contains_key(h) || self.objects.contains_key(h)
                });
                s.handle_event(Event::Need(need), now);
            }
            daemon::Request::ComputeMirrorNeed { manifest, .. } => {
                // The destination's files are the bases, and its content is present.
                self.kept.extend(contents(&self.mirror));
                let dest = manifest_of(&self.mirror);
                let have: HashSet<Hash> = self.mirror.values().map(|c| Hash::of(c)).collect();
                let need = compute_need(&manifest, Some(&dest), |h| have.contains(h));
                s.handle_event(Event::Need(need), now);
            }
            daemon::Request::Mirror {
                manifest,
                delete,
                dry_run,
            } => {
                let plan = plan_mirror(&manifest, &manifest_of(&self.mirror), delete);
                let applied = (!dry_run).then(|| self.apply_mirror(&plan.ops));
                s.handle_event(
                    Event::Mirrored {
                        plan: Box::new(plan),
                        applied,
                    },
                    now,
                );
            }
            daemon::Request::Signatures { files } => {
                for job in files {
                    let data = (!self.no_signatures).then(|| {
                        BasisSignature::calculate(&self.kept[&job.basis.hash])
                            .as_bytes()
                            .to_vec()
                    });
                    s.handle_event(
                        Event::Signature {
                            file: job.file,
                            data,
                        },
                        now,
                    );
                }
            }
            daemon::Request::Receive(job) => {
                self.jobs.push_back(job);
                self.most_jobs_at_once = self.most_jobs_at_once.max(self.jobs.len());
            }
            daemon::Request::Stage { release, manifest } => {
                let mut linked = 0;
                for (path, _, _, hash) in manifest.files() {
                    if self.kept.contains_key(hash) {
                        linked += 1;
                    } else if let Some(c) = self.objects.remove(hash) {
                        self.kept.insert(*hash, c);
                    } else {
                        return s.handle_event(
                            Event::Failed {
                                kind: ErrorKind::Internal,
                                message: format!("{path}: no content to build from"),
                            },
                            now,
                        );
                    }
                }
                self.releases.insert(release, manifest);
                s.handle_event(
                    Event::Staged {
                        linked,
                        phases: vec![],
                        relayed: Vec::new(),
                        previous: self.current.clone(),
                    },
                    now,
                );
            }
            daemon::Request::Activate { release, prune } => {
                let event = if self.releases.contains_key(&release) {
                    self.current = Some(release.clone());
                    // Nothing is ever beyond `keep` here; what matters is that a prune is
                    // answered exactly when asked for.
                    Event::Activated {
                        release,
                        pruned: prune.then(|| Pruning::Removed(vec![])),
                    }
                } else {
                    Event::Failed {
                        kind: ErrorKind::NotFound,
                        message: format!("release {release} does not exist"),
                    }
                };
                s.handle_event(event, now);
            }
            daemon::Request::ListReleases => {
                let list = self
                    .releases
                    .iter()
                    .map(|(id, m)| ReleaseInfo {
                        id: id.clone(),
                        status: if Some(id) == self.current.as_ref() {
                            ReleaseStatus::Current
                        } else {
                            ReleaseStatus::Good
                        },
                        created_unix: 0,
                        files: m.file_count() as u64,
                        bytes: m.total_file_bytes(),
                        manifest: m.digest(),
                    })
                    .collect();
                s.handle_event(Event::Releases(list), now);
            }
            daemon::Request::Rollback { to } => {
                let release = to.unwrap_or_else(|| self.releases.keys().next().unwrap().clone());
                self.current = Some(release.clone());
                s.handle_event(
                    Event::Activated {
                        release,
                        pruned: None,
                    },
                    now,
                );
            }
            daemon::Request::Prune { .. } => s.handle_event(Event::Pruned { removed: vec![] }, now),
            daemon::Request::Clear => {
                self.current = None;
                let removed = std::mem::take(&mut self.releases).into_keys().collect();
                s.handle_event(Event::Pruned { removed }, now)
            }
        }
    }

    /// Applies a mirror plan to the destination's files, taking content from received objects
    /// and from what the destination held.
    fn apply_mirror(&mut self, ops: &[MirrorOp]) -> MirrorStats {
        let mut stats = MirrorStats::default();
        for op in ops {
            match op {
                MirrorOp::Remove { path, .. } => {
                    let below = format!("{path}/");
                    self.mirror
                        .retain(|p, _| p != path.as_str() && !p.starts_with(&below));
                    stats.removed += 1;
                }
                MirrorOp::Write {
                    path, hash, size, ..
                } => {
                    let content = self
                        .objects
                        .get(hash)
                        .or_else(|| self.kept.get(hash))
                        .unwrap_or_else(|| panic!("{path}: no content to write"))
                        .clone();
                    self.mirror.insert(path.to_string(), content);
                    stats.written_files += 1;
                    stats.written_bytes += size;
                }
                MirrorOp::CreateDir { .. } => stats.dirs += 1,
                MirrorOp::SetDirMode { .. } | MirrorOp::Symlink { .. } => {}
            }
        }
        self.objects.clear();
        stats
    }

    /// Rebuilds a payload the way the real driver does: `delta::apply` against the basis, which
    /// checks the size and the blake3 hash.
    fn store(&mut self, job: &FileJob) -> Result<(), FileFailure> {
        let bytes = self.payloads.remove(&job.file).unwrap_or_default();
        if (bytes.len() as u64) < job.payload_len {
            return Err(FileFailure::Truncated {
                received: bytes.len() as u64,
            });
        }
        let payload = &bytes[..job.payload_len as usize];
        let basis = job.basis.map(|b| self.kept[&b.hash].clone());
        let mut out = Vec::new();
        let expected = blake3::Hash::from_bytes(job.hash.0);
        match delta::apply(
            job.format,
            basis.as_deref(),
            payload,
            job.size,
            &expected,
            &mut out,
        ) {
            Ok(_) => {
                self.objects.insert(job.hash, out);
                Ok(())
            }
            Err(DeltaError::HashMismatch { actual, .. }) => Err(FileFailure::HashMismatch {
                actual: actual.into(),
            }),
            Err(e) if e.wants_full_resend() => Err(FileFailure::Corrupt(e.to_string())),
            Err(e) => Err(FileFailure::Local {
                kind: ErrorKind::Internal,
                message: e.to_string(),
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The client's driver

struct Source {
    tree: Tree,
    cache: HashMap<Hash, Vec<u8>>,
    /// Paths whose content is sent with one byte flipped (a lying or broken sender).
    lie: HashSet<String>,
    headers: Vec<FileHeader>,
}

impl Source {
    fn new(tree: Tree) -> Source {
        Source {
            tree,
            cache: HashMap::new(),
            lie: HashSet::new(),
            headers: Vec::new(),
        }
    }

    /// Encodes one file as the real client driver does and returns its whole file stream.
    fn encode(&mut self, f: &SendFile) -> (FileHeader, Vec<u8>) {
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
        self.headers.push(header);
        let mut stream = header.frame();
        stream.extend_from_slice(&payload);
        (header, stream)
    }
}

// ---------------------------------------------------------------------------------------------
// The network

struct Net {
    now: u64,
    client: ClientSession,
    daemon: DaemonSession,
    src: Source,
    d: Daemon,
    c2d: Vec<u8>,
    d2c: Vec<u8>,
    streams: VecDeque<Vec<u8>>,
    /// Delivery sizes, used in turn; empty delivers everything at once.
    chunks: Vec<usize>,
    next_chunk: usize,
    client_closed: bool,
    daemon_closed: bool,
    /// Every client message the daemon was sent, in order.
    client_frames: Vec<u8>,
}

impl Net {
    fn new(client: ClientSession, limits: Limits, src: Source, mut d: Daemon) -> Net {
        d.log.clear();
        Net {
            now: 0,
            client,
            daemon: DaemonSession::new(limits, 0),
            src,
            d,
            c2d: Vec::new(),
            d2c: Vec::new(),
            streams: VecDeque::new(),
            chunks: Vec::new(),
            next_chunk: 0,
            client_closed: false,
            daemon_closed: false,
            client_frames: Vec::new(),
        }
    }

    fn push(tree: &Tree, release: &str, activate: bool, d: Daemon) -> Net {
        Net::push_with(
            tree,
            release,
            activate,
            d,
            HashMap::new(),
            Limits::default(),
        )
    }

    fn push_with(
        tree: &Tree,
        release: &str,
        activate: bool,
        d: Daemon,
        cache: HashMap<Hash, Vec<u8>>,
        limits: Limits,
    ) -> Net {
        let job = PushJob {
            release: rid(release),
            manifest: Arc::new(manifest_of(tree)),
            activate,
            cached: cache.keys().copied().collect(),
            manifest_basis: None,
            packed_manifest: None,
        };
        let client = ClientSession::push(ClientConfig::default(), app(), job, 0);
        let mut src = Source::new(tree.clone());
        src.cache = cache;
        Net::new(client, limits, src, d)
    }

    fn sync(tree: &Tree, delete: bool, dry_run: bool, d: Daemon) -> Net {
        let cache = contents(&d.mirror);
        let job = SyncJob {
            export: app(),
            subpath: None,
            delete,
            dry_run,
            excludes: vec![],
            manifest: Arc::new(manifest_of(tree)),
            cached: cache.keys().copied().collect(),
        };
        let client = ClientSession::sync(ClientConfig::default(), job, 0);
        let mut src = Source::new(tree.clone());
        src.cache = cache;
        Net::new(client, Limits::default(), src, d)
    }

    fn synced(&self) -> &SyncReport {
        match self.client.outcome() {
            Some(Ok(client::Outcome::Synced(r))) => r,
            other => panic!("client did not sync: {other:?}"),
        }
    }

    fn take(&mut self, available: usize) -> usize {
        if self.chunks.is_empty() {
            return available;
        }
        let n = self.chunks[self.next_chunk % self.chunks.len()].max(1);
        self.next_chunk += 1;
        n.min(available)
    }

    /// One round of everything that can happen without time passing; false if nothing did.
    fn step(&mut self) -> bool {
        let now = self.now;
        let mut moved = false;
        while let Some(f) = self.client.poll_transmit(now) {
            self.c2d.extend_from_slice(&f);
            self.client_frames.extend_from_slice(&f);
            moved = true;
        }
        while let Some(client::Request::SendFile(f)) = self.client.poll_request() {
            let (header, stream) = self.src.encode(&f);
            self.streams.push_back(stream);
            self.client.file_sent(&header, now);
            moved = true;
        }
        if !self.c2d.is_empty() {
            let n = self.take(self.c2d.len());
            let bytes: Vec<u8> = self.c2d.drain(..n).collect();
            self.daemon.handle_control(&bytes, now);
            moved = true;
        } else if self.client.is_finished() && !self.client_closed {
            self.client_closed = true;
            self.daemon.handle_control_end(now);
            moved = true;
        }
        if let Some(stream) = self.streams.pop_front() {
            let mut dec = DaemonSession::file_header_decoder();
            let mut input = &stream[..];
            match dec.decode(&mut input) {
                Ok(Some(frame)) => {
                    if let Ok(h) = wire::decode::<FileHeader>(&frame) {
                        self.d.payloads.insert(h.file, input.to_vec());
                    }
                    self.daemon.accept_file(&frame, now);
                }
                Ok(None) => self
                    .daemon
                    .handle_stream_error(dec.finish().unwrap_err(), now),
                Err(e) => self.daemon.handle_stream_error(e, now),
            }
            moved = true;
        }
        while let Some(r) = self.daemon.poll_request() {
            self.d.answer(r, &mut self.daemon, now);
            moved = true;
        }
        let n = match self.d.receive_per_step {
            0 => self.d.jobs.len(),
            n => n.min(self.d.jobs.len()),
        };
        for _ in 0..n {
            let job = self.d.jobs.pop_front().unwrap();
            let result = self.d.store(&job);
            self.daemon.file_finished(job.file, result, now);
            moved = true;
        }
        while let Some(f) = self.daemon.poll_transmit(now) {
            self.d2c.extend_from_slice(&f);
            moved = true;
        }
        if !self.d2c.is_empty() {
            let n = self.take(self.d2c.len());
            let bytes: Vec<u8> = self.d2c.drain(..n).collect();
            self.client.handle_control(&bytes, now);
            moved = true;
        } else if self.daemon.is_finished() && !self.daemon_closed {
            self.daemon_closed = true;
            self.client.handle_control_end(now);
            moved = true;
        }
        moved
    }

    /// Runs until both sessions finished, letting simulated time pass when nothing moves.
    fn run(&mut self) {
        self.run_until(|_| false);
    }

    fn run_until(&mut self, stop: impl Fn(&Net) -> bool) {
        for _ in 0..1_000_000 {
            if stop(self) {
                return;
            }
            if self.step() {
                continue;
            }
            if self.client.is_finished() && self.daemon.is_finished() {
                return;
            }
            let next = [self.client.poll_timeout(), self.daemon.poll_timeout()]
                .into_iter()
                .flatten()
                .min()
                .expect("an unfinished session has a deadline");
            self.now = self.now.max(next);
            self.client.handle_timeout(self.now);
            self.daemon.handle_timeout(self.now);
        }
        panic!("the sessions did not settle");
    }

    fn report(&self) -> &PushReport {
        match self.client.outcome() {
            Some(Ok(client::Outcome::Pushed(r))) => r,
            other => panic!("client did not push: {other:?}"),
        }
    }

    fn daemon_outcome(&self) -> &daemon::Outcome {
        match self.daemon.outcome() {
            Some(Ok(o)) => o,
            other => panic!("daemon did not succeed: {other:?}"),
        }
    }

    fn client_error(&self) -> &ProtoError {
        match self.client.outcome() {
            Some(Err(e)) => e,
            other => panic!("client should have failed: {other:?}"),
        }
    }

    fn daemon_error(&self) -> &ProtoError {
        match self.daemon.outcome() {
            Some(Err(e)) => e,
            other => panic!("daemon should have failed: {other:?}"),
        }
    }

    fn into_daemon(self) -> Daemon {
        let mut d = self.d;
        d.jobs.clear();
        d.payloads.clear();
        d
    }
}

/// Every file of `tree` is held by the daemon with exactly this content.
fn assert_daemon_holds(d: &Daemon, tree: &Tree) {
    for (path, content) in tree {
        let got = d.kept.get(&Hash::of(content));
        assert_eq!(got, Some(content), "{path}");
    }
}

fn format_of(src: &Source, tree: &Tree, path: &str) -> Option<DeltaFormat> {
    let m = manifest_of(tree);
    let idx = m.files().position(|(p, ..)| p.as_str() == path)? as u32;
    src.headers.iter().find(|h| h.file == idx).map(|h| h.format)
}

fn pushed(tree: &Tree, release: &str) -> Daemon {
    let mut net = Net::push(tree, release, true, Daemon::default());
    net.run();
    net.report();
    net.into_daemon()
}

// ---------------------------------------------------------------------------------------------
// Full pushes

#[test]
fn staged_says_which_release_the_daemon_ran_before_the_push() {
    // (release pushed, activate it, what `Staged` says was current before)
    let table = [
        ("r1", false, None),
        ("r2", true, None),
        ("r3", false, Some("r2")),
        ("r4", true, Some("r2")),
        ("r5", true, Some("r4")),
    ];
    let mut d = Daemon::default();
    for (release, activate, want) in table {
        let mut net = Net::push(&tree_a(), release, activate, d);
        net.run();
        assert_eq!(
            net.report().staged.previous,
            want.map(rid),
            "pushing {release}"
        );
        d = net.into_daemon();
    }
}

#[test]
fn first_push_sends_every_distinct_file_in_full() {
    let a = tree_a();
    let mut net = Net::push(&a, "r1", true, Daemon::default());
    net.run();
    let r = net.report().clone();
    // Seven files, two with the same content: six distinct contents to send.
    assert_eq!((r.files, r.needed, r.have_files), (7, 6, 1));
    assert_eq!((r.sent_full, r.sent_zstd_ref, r.sent_rsync), (6, 0, 0));
    assert_eq!(r.signatures, 0);
    assert!(r.activated);
    assert_eq!(r.staged.received, 6);
    assert_eq!(r.staged.received_bytes, r.payload_bytes);
    assert_eq!(r.bytes, a.values().map(|c| c.len() as u64).sum::<u64>());
    assert!(matches!(
        net.daemon_outcome(),
        daemon::Outcome::Pushed {
            activated: true,
            ..
        }
    ));
    assert_eq!(net.d.current, Some(rid("r1")));
    assert_daemon_holds(&net.d, &a);
    assert!(
        net.d.objects.is_empty(),
        "objects are moved into the release"
    );
}

#[test]
fn re_pushing_the_same_content_sends_nothing() {
    let a = tree_a();
    let d = pushed(&a, "r1");
    let mut net = Net::push(&a, "r2", true, d);
    net.run();
    let r = net.report();
    assert_eq!((r.needed, r.payload_bytes, r.signatures), (0, 0, 0));
    assert_eq!(r.have_files, 7);
    assert_eq!(r.staged.linked, 7);
    assert_eq!(r.staged.received, 0);
    assert!(net.src.headers.is_empty());
    assert!(!net.d.log.iter().any(|l| l.starts_with("Receive")));
    assert_eq!(net.d.current, Some(rid("r2")));
}

#[test]
fn a_patch_with_the_basis_in_the_cache_uses_zstd_ref_without_signatures() {
    let (a, b) = (tree_a(), tree_b());
    let d = pushed(&a, "r1");
    let mut net = Net::push_with(&b, "r2", true, d, contents(&a), Limits::default());
    net.run();
    let r = net.report().clone();
    // Changed: big.php, App.php; new: New.php. The renamed css is already there.
    assert_eq!(r.needed, 3);
    assert_eq!(r.signatures, 0);
    assert!(!net.d.log.iter().any(|l| l.starts_with("Signatures")));
    assert_eq!(
        format_of(&net.src, &b, "vendor/big.php"),
        Some(DeltaFormat::ZstdRef)
    );
    assert_eq!(
        format_of(&net.src, &b, "src/New.php"),
        Some(DeltaFormat::Full)
    );
    assert!(r.sent_zstd_ref >= 1);
    assert!(
        r.payload_bytes < 8_000,
        "a 24-byte patch of a 300 kB file costs {} bytes",
        r.payload_bytes
    );
    assert_daemon_holds(&net.d, &b);
}

#[test]
fn a_patch_without_cache_asks_for_a_signature_and_sends_rsync() {
    let (a, b) = (tree_a(), tree_b());
    let d = pushed(&a, "r1");
    let mut net = Net::push(&b, "r2", false, d);
    net.run();
    let r = net.report().clone();
    // Only big.php's basis reaches the rsync threshold; App.php is small and goes in full.
    assert_eq!(r.signatures, 1);
    assert_eq!(
        net.d.log.iter().filter(|l| *l == "Signatures1").count(),
        1,
        "{:?}",
        net.d.log
    );
    assert_eq!(
        format_of(&net.src, &b, "vendor/big.php"),
        Some(DeltaFormat::Rsync)
    );
    assert_eq!(
        format_of(&net.src, &b, "src/App.php"),
        Some(DeltaFormat::Full)
    );
    assert_eq!((r.sent_rsync, r.sent_full), (1, 2));
    assert!(!r.activated);
    assert!(matches!(
        net.daemon_outcome(),
        daemon::Outcome::Pushed {
            activated: false,
            ..
        }
    ));
    assert_eq!(net.d.current, Some(rid("r1")), "not activated");
    assert_daemon_holds(&net.d, &b);
}

#[test]
fn an_unusable_basis_on_the_daemon_falls_back_to_full() {
    let (a, b) = (tree_a(), tree_b());
    let mut d = pushed(&a, "r1");
    d.no_signatures = true;
    let mut net = Net::push(&b, "r2", true, d);
    net.run();
    let r = net.report();
    assert_eq!(r.signatures, 1);
    assert_eq!((r.sent_rsync, r.sent_full), (0, 3));
    assert_daemon_holds(&net.d, &b);
}

#[test]
fn an_interrupted_push_resumes_with_only_the_missing_files() {
    let a = tree_a();
    let mut net = Net::push(&a, "r1", true, Daemon::default());
    net.d.receive_per_step = 1;
    net.run_until(|n| n.d.objects.len() >= 3);
    // The connection drops: both sessions are gone, the verified objects stay.
    let d = net.into_daemon();
    assert_eq!(d.objects.len(), 3);
    assert!(d.releases.is_empty());

    let mut net = Net::push(&a, "r1", true, d);
    net.run();
    let r = net.report();
    assert_eq!((r.needed, r.have_files), (3, 4));
    assert_eq!(net.src.headers.len(), 3);
    assert_eq!(r.staged.received, 3);
    assert_daemon_holds(&net.d, &a);
}

#[test]
fn a_lying_sender_is_refused_and_an_honest_re_push_succeeds() {
    let a = tree_a();
    let mut net = Net::push(&a, "r1", true, Daemon::default());
    net.src.lie.insert("src/App.php".into());
    net.run();
    let err = net.daemon_error();
    assert_eq!(err.kind(), ErrorKind::Verify);
    assert!(err.to_string().contains("src/App.php"), "{err}");
    match net.client_error() {
        ProtoError::Remote { kind, message } => {
            assert_eq!(*kind, ErrorKind::Verify);
            assert!(message.contains("src/App.php"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!net.d.log.contains(&"Stage".to_string()), "{:?}", net.d.log);
    assert!(net.d.releases.is_empty() && net.d.current.is_none());

    let mut net = Net::push(&a, "r1", true, net.into_daemon());
    net.run();
    net.report();
    assert_eq!(net.d.current, Some(rid("r1")));
    assert_daemon_holds(&net.d, &a);
}

/// Runs one command against `d` and returns the client's outcome and the daemon's state.
fn run_command(d: Daemon, command: Command) -> (Result<client::Outcome, String>, Daemon) {
    let client = ClientSession::command(ClientConfig::default(), app(), command, 0);
    let mut net = Net::new(client, Limits::default(), Source::new(Tree::new()), d);
    net.run();
    let out = match net.client.outcome().unwrap() {
        Ok(o) => Ok(o.clone()),
        Err(e) => Err(format!("{:?}: {e}", e.kind())),
    };
    (out, net.into_daemon())
}

#[test]
fn activating_the_current_release_again_is_ok() {
    let mut d = pushed(&tree_a(), "r1");
    assert_eq!(d.current, Some(rid("r1")));
    for prune in [false, true] {
        let (out, next) = run_command(
            d,
            Command::Activate {
                release: rid("r1"),
                prune,
            },
        );
        assert_eq!(
            out,
            Ok(client::Outcome::Activated {
                release: rid("r1"),
                pruned: prune.then(|| Pruning::Removed(vec![])),
            })
        );
        assert_eq!(next.log, ["Open", "Activate"]);
        assert_eq!(next.current, Some(rid("r1")));
        d = next;
    }
    let (out, _) = run_command(
        d,
        Command::Activate {
            release: rid("nope"),
            prune: false,
        },
    );
    let err = out.unwrap_err();
    assert!(err.starts_with("NotFound") && err.contains("nope"), "{err}");
}

#[test]
fn commands_list_roll_back_and_prune() {
    let d = pushed(&tree_a(), "r1");
    let mut net = Net::push(&tree_b(), "r2", true, d);
    net.run();
    let d = net.into_daemon();
    let (out, d) = run_command(d, Command::Releases);
    let Ok(client::Outcome::Releases(list)) = out else {
        panic!("{out:?}")
    };
    let ids: Vec<(&str, ReleaseStatus)> = list.iter().map(|r| (r.id.as_str(), r.status)).collect();
    assert_eq!(
        ids,
        [("r1", ReleaseStatus::Good), ("r2", ReleaseStatus::Current)]
    );
    let (out, d) = run_command(d, Command::Rollback { to: None });
    assert_eq!(
        out,
        Ok(client::Outcome::Activated {
            release: rid("r1"),
            pruned: None
        })
    );
    assert_eq!(d.current, Some(rid("r1")));
    let (out, d) = run_command(d, Command::Prune { keep: Some(5) });
    assert_eq!(out, Ok(client::Outcome::Pruned { removed: vec![] }));
    let (out, d) = run_command(d, Command::Clear);
    assert_eq!(
        out,
        Ok(client::Outcome::Pruned {
            removed: vec![rid("r1"), rid("r2")]
        })
    );
    assert_eq!(d.current, None);
    let (out, _) = run_command(d, Command::Releases);
    assert_eq!(out, Ok(client::Outcome::Releases(vec![])));
}

#[test]
fn an_unauthorized_app_is_refused_before_any_work() {
    let job = PushJob {
        release: rid("r1"),
        manifest: Arc::new(manifest_of(&tree_a())),
        activate: true,
        cached: HashSet::new(),
        manifest_basis: None,
        packed_manifest: None,
    };
    let client = ClientSession::push(
        ClientConfig::default(),
        AppName::new("other").unwrap(),
        job,
        0,
    );
    let mut net = Net::new(
        client,
        Limits::default(),
        Source::new(tree_a()),
        Daemon::default(),
    );
    net.run();
    assert!(matches!(
        net.client_error(),
        ProtoError::Remote {
            kind: ErrorKind::Unauthorized,
            ..
        }
    ));
    assert_eq!(net.d.log, ["Open"]);
}

#[test]
fn a_sync_mirrors_with_deltas_and_deletes_only_when_asked() {
    // Into an empty destination: every distinct content (the empty file's too) goes in full.
    let a = tree_a();
    let mut net = Net::sync(&a, false, false, Daemon::default());
    net.run();
    let r = net.synced().clone();
    assert_eq!(net.d.log[..3], ["Open", "ComputeMirrorNeed", "Receive0"]);
    assert_eq!(net.d.log.last().map(String::as_str), Some("Mirror0"));
    assert_eq!(r.needed, 6, "{r:?}");
    assert_eq!(r.sent_full, 6);
    assert_eq!(r.plan.summary.written_files, 7);
    assert!(matches!(
        net.daemon_outcome(),
        daemon::Outcome::Synced(s) if s.received == 6
    ));
    assert_eq!(net.d.mirror, a);
    let d = net.into_daemon();

    // A dry run of the next tree says what would change and changes nothing.
    let b = tree_b();
    let mut net = Net::sync(&b, true, true, d);
    net.run();
    let r = net.synced().clone();
    assert!(r.dry_run && r.applied.is_none());
    assert_eq!(
        (r.needed, r.sent_full + r.sent_zstd_ref + r.sent_rsync),
        (3, 0)
    );
    assert_eq!(r.plan.summary.removed, 1, "{:?}", r.plan.ops);
    assert_eq!(net.d.mirror, a, "a dry run changed the destination");
    assert_eq!(net.d.log.last().map(String::as_str), Some("Mirror1"));
    let d = net.into_daemon();

    // Without --delete the renamed file's old name stays; its content is not sent again, and
    // the edits go as deltas against the destination's files, which the cache holds.
    let mut net = Net::sync(&b, false, false, d);
    net.run();
    let r = net.synced().clone();
    assert_eq!(r.needed, 3, "the two edits and src/New.php: {r:?}");
    assert_eq!((r.sent_zstd_ref, r.sent_full, r.signatures), (2, 1, 0));
    assert!(r.payload_bytes < 4_000, "{r:?}");
    assert_eq!(r.plan.summary.removed, 0);
    let mut want = b.clone();
    want.insert("public/app.css".into(), a["public/app.css"].clone());
    assert_eq!(net.d.mirror, want);
    let d = net.into_daemon();

    // With --delete it goes, and nothing else is sent.
    let mut net = Net::sync(&b, true, false, d);
    net.chunks = vec![1, 7, 3];
    net.run();
    let r = net.synced().clone();
    assert_eq!((r.needed, r.plan.summary.removed), (0, 1));
    assert_eq!(r.applied.map(|a| a.removed), Some(1));
    assert_eq!(net.d.mirror, b);
}

#[test]
fn control_bytes_delivered_one_at_a_time_give_the_same_push() {
    let (a, b) = (tree_a(), tree_b());
    let whole = {
        let mut net = Net::push(&b, "r2", true, pushed(&a, "r1"));
        net.run();
        net.report().clone()
    };
    let mut net = Net::push(&b, "r2", true, pushed(&a, "r1"));
    net.chunks = vec![1];
    net.run();
    assert_eq!(net.report(), &whole);
    assert_daemon_holds(&net.d, &b);
}

#[test]
fn the_bytes_in_flight_budget_admits_one_payload_at_a_time() {
    let a = tree_a();
    let limits = Limits {
        max_bytes_in_flight: 1,
        ..Limits::default()
    };
    let mut net = Net::push_with(&a, "r1", true, Daemon::default(), HashMap::new(), limits);
    net.d.receive_per_step = 1;
    net.run_until(|n| {
        assert!(n.daemon.bytes_in_flight() <= n.d.jobs.iter().map(|j| j.payload_len).sum());
        n.client.is_finished() && n.daemon.is_finished()
    });
    assert_eq!(net.d.most_jobs_at_once, 1);
    net.report();
    assert_daemon_holds(&net.d, &a);
}

#[test]
fn large_manifests_and_needs_are_split_to_the_smallest_frames() {
    let mut t = Tree::new();
    for i in 0..3000 {
        t.insert(
            format!("f/{i:05}.php"),
            format!("<?php // {i}\n").into_bytes(),
        );
    }
    let limits = Limits {
        max_frame: MIN_MAX_FRAME,
        ..Limits::default()
    };
    let job = PushJob {
        release: rid("r1"),
        manifest: Arc::new(manifest_of(&t)),
        activate: true,
        cached: HashSet::new(),
        manifest_basis: None,
        packed_manifest: None,
    };
    let config = ClientConfig {
        max_frame: MIN_MAX_FRAME,
        ..ClientConfig::default()
    };
    let client = ClientSession::push(config, app(), job, 0);
    let mut net = Net::new(client, limits, Source::new(t.clone()), Daemon::default());
    net.run();
    assert_eq!(net.report().needed, 3000);
    assert_daemon_holds(&net.d, &t);
    // More than one manifest chunk went out, each within the daemon's max_frame.
    let mut dec = wire::FrameDecoder::new(MIN_MAX_FRAME);
    let mut input = &net.client_frames[..];
    let mut chunks = 0;
    while let Some(f) = dec.decode(&mut input).unwrap() {
        if let ClientMsg::ManifestChunk { .. } = wire::decode::<ClientMsg>(&f).unwrap() {
            chunks += 1;
        }
    }
    assert!(chunks >= 2, "{chunks} chunks");
}

// ---------------------------------------------------------------------------------------------
// A hostile or broken client, seen by the daemon

fn hello_push(manifest: &[u8], release: &str) -> Vec<u8> {
    ClientMsg::Hello {
        version: VERSION,
        app: app(),
        command: Command::Push {
            release: rid(release),
            manifest_len: manifest.len() as u64,
            manifest_digest: Hash::of(manifest),
            manifest_basis: None,
            relay: None,
        },
        max_frame: MIN_MAX_FRAME,
    }
    .frame()
}

/// A daemon session past `Hello` and authorization, waiting for the manifest.
fn opened(limits: Limits, hello: &[u8]) -> DaemonSession {
    let mut s = DaemonSession::new(limits, 0);
    s.handle_control(hello, 0);
    assert!(matches!(
        s.poll_request(),
        Some(daemon::Request::Open { .. })
    ));
    s.handle_event(
        Event::Opened {
            policy: Policy::default(),
            manifest_basis: None,
        },
        0,
    );
    s
}

fn daemon_error_kind(s: &mut DaemonSession) -> ErrorKind {
    let mut last = None;
    while let Some(f) = s.poll_transmit(0) {
        last = Some(wire::decode::<DaemonMsg>(&f[4..]).unwrap());
    }
    match last {
        Some(DaemonMsg::Error { kind, .. }) => kind,
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

fn chunk(data: &[u8], last: bool) -> Vec<u8> {
    ClientMsg::ManifestChunk {
        data: data.to_vec(),
        last,
    }
    .frame()
}

/// A manifest encoding as it travels without a basis: one zstd frame.
fn packed(encoding: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    sync_core::delta::encode_full(encoding, &mut out).unwrap();
    out
}

/// The whole manifest in one last chunk.
fn manifest_chunk(encoding: &[u8]) -> Vec<u8> {
    chunk(&packed(encoding), true)
}

#[test]
fn the_manifest_goes_as_a_delta_when_the_daemon_holds_the_named_basis() {
    let a = manifest_of(&tree_a()).encode();
    let b = manifest_of(&tree_b()).encode();
    let hello = ClientMsg::Hello {
        version: VERSION,
        app: app(),
        command: Command::Push {
            release: rid("r2"),
            manifest_len: b.len() as u64,
            manifest_digest: Hash::of(&b),
            manifest_basis: Some(Hash::of(&a)),
            relay: None,
        },
        max_frame: MIN_MAX_FRAME,
    }
    .frame();
    let cases: [(&str, Option<Vec<u8>>, bool); 3] = [
        ("held", Some(a.to_vec()), true),
        ("another manifest", Some(b.to_vec()), false),
        ("none", None, false),
    ];
    for (name, offered, accepted) in cases {
        let mut s = DaemonSession::new(Limits::default(), 0);
        s.handle_control(&hello, 0);
        assert!(matches!(
            s.poll_request(),
            Some(daemon::Request::Open { .. })
        ));
        s.handle_event(
            Event::Opened {
                policy: Policy::default(),
                manifest_basis: offered.map(Arc::from),
            },
            0,
        );
        let welcome = wire::decode::<DaemonMsg>(&s.poll_transmit(0).unwrap()[4..]).unwrap();
        let DaemonMsg::Welcome { manifest_basis, .. } = welcome else {
            panic!("{name}: {welcome:?}")
        };
        assert_eq!(manifest_basis, accepted, "{name}");
        let mut payload = Vec::new();
        if accepted {
            sync_core::delta::encode_with_basis(&a, &b, &mut payload).unwrap();
            assert!(
                payload.len() < packed(&b).len(),
                "{name}: the delta is {} bytes, the plain frame {}",
                payload.len(),
                packed(&b).len()
            );
        } else {
            payload = packed(&b);
        }
        s.handle_control(&chunk(&payload, true), 1);
        match s.poll_request() {
            Some(daemon::Request::ComputeNeed { manifest, .. }) => {
                assert_eq!(*manifest, manifest_of(&tree_b()), "{name}")
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    // A delta sent when the daemon did not accept the basis does not decode.
    let mut s = DaemonSession::new(Limits::default(), 0);
    s.handle_control(&hello, 0);
    s.poll_request();
    s.handle_event(
        Event::Opened {
            policy: Policy::default(),
            manifest_basis: None,
        },
        0,
    );
    let mut payload = Vec::new();
    sync_core::delta::encode_with_basis(&a, &b, &mut payload).unwrap();
    s.handle_control(&chunk(&payload, true), 1);
    assert!(s.is_finished());
    assert_eq!(daemon_error_kind(&mut s), ErrorKind::BadRequest);
}

#[test]
fn bad_manifests_are_refused_before_the_need_is_computed() {
    let m = manifest_of(&tree_a()).encode();
    let mut other = manifest_of(&tree_b()).encode().to_vec();
    other.truncate(m.len());
    let tight = Limits {
        max_manifest_entries: 3,
        ..Limits::default()
    };
    type Case = (&'static str, Limits, Vec<u8>, ErrorKind);
    let table: Vec<Case> = vec![
        (
            "chunks exceed what the announced length can compress to",
            Limits::default(),
            [
                chunk(&packed(&m), false),
                chunk(
                    &vec![0u8; wire::max_payload_len(m.len() as u64) as usize],
                    true,
                ),
            ]
            .concat(),
            ErrorKind::BadRequest,
        ),
        (
            "data after the frame",
            Limits::default(),
            [chunk(&packed(&m), false), chunk(b"x", true)].concat(),
            ErrorKind::BadRequest,
        ),
        (
            "frame cut short",
            Limits::default(),
            chunk(&packed(&m)[..packed(&m).len() - 1], true),
            ErrorKind::BadRequest,
        ),
        (
            "uncompressed",
            Limits::default(),
            chunk(&m, true),
            ErrorKind::BadRequest,
        ),
        (
            "shorter than announced",
            Limits::default(),
            manifest_chunk(&m[..m.len() - 1]),
            ErrorKind::BadRequest,
        ),
        (
            "digest mismatch",
            Limits::default(),
            manifest_chunk(&other),
            ErrorKind::BadRequest,
        ),
        (
            "over max entries",
            tight,
            manifest_chunk(&m),
            ErrorKind::Limit,
        ),
    ];
    for (name, limits, bytes, want) in table {
        let mut s = opened(limits, &hello_push(&m, "r1"));
        s.handle_control(&bytes, 1);
        assert!(s.is_finished(), "{name}");
        assert!(s.poll_request().is_none(), "{name}: no ComputeNeed");
        assert_eq!(daemon_error_kind(&mut s), want, "{name}");
    }
    // An invalid manifest with the right length and digest fails validation, not the framing.
    let garbage = vec![7u8; 40];
    let mut s = opened(Limits::default(), &hello_push(&garbage, "r1"));
    s.handle_control(&manifest_chunk(&garbage), 1);
    assert!(matches!(s.outcome(), Some(Err(ProtoError::Manifest(_)))));
}

#[test]
fn oversized_garbage_and_truncated_frames_close_the_session() {
    let m = manifest_of(&tree_a()).encode();
    let limits = Limits {
        max_frame: MIN_MAX_FRAME,
        ..Limits::default()
    };
    let too_big = (MIN_MAX_FRAME + 1).to_be_bytes().to_vec();
    let table: Vec<(&str, Vec<u8>, ErrorKind)> = vec![
        ("frame too large", too_big, ErrorKind::FrameTooLarge),
        (
            "garbage body",
            vec![0, 0, 0, 3, 0xEE, 0xEE, 0xEE],
            ErrorKind::BadRequest,
        ),
        (
            "trailing bytes",
            {
                let mut f = ClientMsg::Done { files_sent: 0 }.frame();
                f[3] += 1;
                f.push(0);
                f
            },
            ErrorKind::BadRequest,
        ),
        ("hello twice", hello_push(&m, "r1"), ErrorKind::BadRequest),
    ];
    for (name, bytes, want) in table {
        let mut s = opened(limits, &hello_push(&m, "r1"));
        s.handle_control(&bytes, 1);
        assert!(s.is_finished(), "{name}");
        assert_eq!(daemon_error_kind(&mut s), want, "{name}");
    }
    // A stream that ends inside a frame.
    let mut s = opened(limits, &hello_push(&m, "r1"));
    let c = manifest_chunk(&m);
    s.handle_control(&c[..c.len() / 2], 1);
    assert!(!s.is_finished());
    s.handle_control_end(2);
    assert!(matches!(
        s.outcome(),
        Some(Err(ProtoError::Wire(wire::WireError::Truncated { .. })))
    ));
    // A stream that ends between frames, too early.
    let mut s = opened(limits, &hello_push(&m, "r1"));
    s.handle_control_end(2);
    assert!(matches!(s.outcome(), Some(Err(ProtoError::Protocol(_)))));
}

/// A daemon session with tree B's manifest received, release r1 (tree A) current, waiting for
/// files. Returns the session and the needed files.
fn receiving() -> (DaemonSession, Vec<NeedFile>, Manifest) {
    let (a, b) = (tree_a(), tree_b());
    let mb = manifest_of(&b);
    let enc = mb.encode();
    let mut s = opened(Limits::default(), &hello_push(&enc, "r2"));
    s.handle_control(&manifest_chunk(&enc), 0);
    assert!(matches!(
        s.poll_request(),
        Some(daemon::Request::ComputeNeed { .. })
    ));
    let ma = manifest_of(&a);
    let kept = contents(&a);
    let need = compute_need(&mb, Some(&ma), |h| kept.contains_key(h));
    let files = need.files.clone();
    s.handle_event(Event::Need(need), 0);
    assert_eq!(s.state(), DaemonState::Transfer);
    while s.poll_transmit(0).is_some() {}
    (s, files, mb)
}

/// Payloads the driver spools weigh only the spool threshold in the budget: large files are
/// received side by side, while memory payloads still fill the budget with their full length.
#[test]
fn spooled_payloads_weigh_the_spool_threshold_in_the_budget() {
    let enc = manifest_of(&tree_b()).encode();
    for (spool_above, payload_len, want) in [
        // Without a threshold a payload over the budget goes alone.
        (None, 1000, 1),
        // Spooled (over 40): each weighs 40, and 40 + 40 fit a budget of 100.
        (Some(40), 1000, 2),
        // Held in memory (not over 40): full weight, 30 + 30 + 30 fit, a fourth does not.
        (Some(40), 30, 3),
    ] {
        let limits = Limits {
            max_bytes_in_flight: 100,
            ..Limits::default()
        };
        let mut s = opened(limits, &hello_push(&enc, "r2"));
        if let Some(n) = spool_above {
            s.set_spool_above(n);
        }
        s.handle_control(&manifest_chunk(&enc), 0);
        s.poll_request();
        let mb = manifest_of(&tree_b());
        let need = compute_need(&mb, None, |_| false);
        let files: Vec<u32> = need.files.iter().map(|n| n.file).collect();
        assert!(files.len() >= 4);
        s.handle_event(Event::Need(need), 0);
        for &file in &files[..4] {
            let h = FileHeader {
                file,
                format: DeltaFormat::Full,
                basis: None,
                payload_len,
            };
            s.accept_file(&h.frame()[4..], 1);
        }
        let admitted = std::iter::from_fn(|| s.poll_request())
            .filter(|r| matches!(r, daemon::Request::Receive(_)))
            .count();
        assert_eq!(
            admitted, want,
            "spool_above {spool_above:?}, payloads of {payload_len}"
        );
        assert!(s.bytes_in_flight() <= 100.max(payload_len));
    }
}

#[test]
fn file_headers_must_match_what_was_needed_and_offered() {
    let (_, files, mb) = receiving();
    let with_basis = files.iter().find(|n| n.basis.is_some()).unwrap();
    let without = files.iter().find(|n| n.basis.is_none()).unwrap();
    let not_needed = (0..mb.file_count() as u32)
        .find(|i| !files.iter().any(|n| n.file == *i))
        .unwrap();
    let full = |file| FileHeader {
        file,
        format: DeltaFormat::Full,
        basis: None,
        payload_len: 10,
    };
    let basis = with_basis.basis.unwrap().hash;
    type Case = (&'static str, Vec<FileHeader>, ErrorKind);
    let table: Vec<Case> = vec![
        ("not needed", vec![full(not_needed)], ErrorKind::BadRequest),
        ("out of range", vec![full(9999)], ErrorKind::BadRequest),
        (
            "twice",
            vec![full(without.file), full(without.file)],
            ErrorKind::BadRequest,
        ),
        (
            "delta without a basis",
            vec![FileHeader {
                format: DeltaFormat::ZstdRef,
                basis: Some(basis),
                ..full(without.file)
            }],
            ErrorKind::BadRequest,
        ),
        (
            "delta against another basis",
            vec![FileHeader {
                format: DeltaFormat::Rsync,
                basis: Some(Hash::of(b"elsewhere")),
                ..full(with_basis.file)
            }],
            ErrorKind::BadRequest,
        ),
        (
            "full naming a basis",
            vec![FileHeader {
                basis: Some(basis),
                ..full(with_basis.file)
            }],
            ErrorKind::BadRequest,
        ),
        (
            "payload over the bound",
            vec![FileHeader {
                payload_len: u64::MAX,
                ..full(without.file)
            }],
            ErrorKind::Limit,
        ),
    ];
    for (name, headers, want) in table {
        let (mut s, _, _) = receiving();
        for h in &headers {
            s.accept_file(&h.frame()[4..], 1);
        }
        assert!(s.is_finished(), "{name}");
        assert!(
            !std::iter::from_fn(|| s.poll_request())
                .any(|r| matches!(r, daemon::Request::Stage { .. })),
            "{name}"
        );
        assert_eq!(daemon_error_kind(&mut s), want, "{name}");
    }
    // A header frame that is not a header.
    let (mut s, _, _) = receiving();
    s.accept_file(&[0xFF; 8], 1);
    assert_eq!(daemon_error_kind(&mut s), ErrorKind::BadRequest);
    // Valid: a delta against the offered basis.
    let (mut s, _, _) = receiving();
    s.accept_file(
        &FileHeader {
            format: DeltaFormat::ZstdRef,
            basis: Some(basis),
            ..full(with_basis.file)
        }
        .frame()[4..],
        1,
    );
    assert!(matches!(
        s.poll_request(),
        Some(daemon::Request::Receive(FileJob { format: DeltaFormat::ZstdRef, basis: Some(b), .. })) if b.hash == basis
    ));
}

#[test]
fn signature_requests_and_done_are_checked() {
    let (_, files, _) = receiving();
    let with_basis = files.iter().find(|n| n.basis.is_some()).unwrap().file;
    let without = files.iter().find(|n| n.basis.is_none()).unwrap().file;
    let sig = |files: Vec<u32>| ClientMsg::SignatureRequest { files }.frame();
    let table: Vec<(&str, Vec<u8>)> = vec![
        ("signature of a file without basis", sig(vec![without])),
        ("signature of an unknown file", sig(vec![4000])),
        (
            "signature requested twice",
            [sig(vec![with_basis]), sig(vec![with_basis])].concat(),
        ),
        (
            "done with a wrong count",
            ClientMsg::Done { files_sent: 1 }.frame(),
        ),
        (
            "activate before staged",
            ClientMsg::Activate { release: rid("r2") }.frame(),
        ),
    ];
    for (name, bytes) in table {
        let (mut s, _, _) = receiving();
        s.handle_control(&bytes, 1);
        assert!(s.is_finished(), "{name}");
        assert_eq!(daemon_error_kind(&mut s), ErrorKind::BadRequest, "{name}");
    }
}

#[test]
fn activate_must_name_the_staged_release() {
    let a = tree_a();
    let enc = manifest_of(&a).encode();
    let mut s = opened(Limits::default(), &hello_push(&enc, "r1"));
    s.handle_control(&manifest_chunk(&enc), 0);
    s.poll_request();
    s.handle_event(
        Event::Need(daemon::NeedList {
            files: vec![],
            have_files: 7,
            have_bytes: 0,
        }),
        0,
    );
    s.handle_control(&ClientMsg::Done { files_sent: 0 }.frame(), 0);
    assert!(matches!(
        s.poll_request(),
        Some(daemon::Request::Stage { .. })
    ));
    s.handle_event(
        Event::Staged {
            linked: 7,
            phases: vec![],
            relayed: Vec::new(),
            previous: None,
        },
        0,
    );
    s.handle_control(&ClientMsg::Activate { release: rid("r9") }.frame(), 0);
    assert_eq!(daemon_error_kind(&mut s), ErrorKind::BadRequest);
    assert!(s.poll_request().is_none(), "no Activate request");
}

#[test]
fn staged_reports_the_need_and_receive_phases_then_the_build_phases() {
    let enc = manifest_of(&tree_a()).encode();
    let mut s = opened(Limits::default(), &hello_push(&enc, "r1"));
    s.handle_control(&manifest_chunk(&enc), 10);
    assert!(matches!(
        s.poll_request(),
        Some(daemon::Request::ComputeNeed { .. })
    ));
    s.handle_event(
        Event::Need(daemon::NeedList {
            files: vec![],
            have_files: 3,
            have_bytes: 0,
        }),
        25,
    );
    s.handle_control(&ClientMsg::Done { files_sent: 0 }.frame(), 100);
    assert!(matches!(
        s.poll_request(),
        Some(daemon::Request::Stage { .. })
    ));
    let build = vec![
        PhaseTime::new("stage files", std::time::Duration::from_micros(30_500)),
        PhaseTime::new(&"x".repeat(100), std::time::Duration::from_millis(1)),
    ];
    let usage = wire::Usage {
        cpu_micros: 250_000,
        peak_rss_kib: 65_536,
    };
    s.set_usage(usage);
    s.handle_event(
        Event::Staged {
            linked: 3,
            relayed: Vec::new(),
            phases: build,
            previous: None,
        },
        131,
    );
    let mut staged = None;
    while let Some(f) = s.poll_transmit(131) {
        if let DaemonMsg::Staged(st) = wire::decode::<DaemonMsg>(&f[4..]).unwrap() {
            staged = Some(st);
        }
    }
    let staged = staged.expect("a Staged frame");
    assert_eq!(staged.usage, usage);
    let phases = staged.phases;
    let got: Vec<(&str, u64)> = phases.iter().map(|p| (p.name.as_str(), p.micros)).collect();
    let long = "x".repeat(wire::MAX_PHASE_NAME);
    assert_eq!(
        got,
        [
            ("need", 15_000),
            ("receive", 75_000),
            ("stage files", 30_500),
            (long.as_str(), 1_000)
        ]
    );
}

#[test]
fn a_stalled_client_is_cut_off_by_the_message_deadline() {
    let m = manifest_of(&tree_a()).encode();
    // Silent after connecting.
    let mut s = DaemonSession::new(Limits::default(), 1_000);
    assert_eq!(s.poll_timeout(), Some(31_000));
    s.handle_timeout(30_999);
    assert!(!s.is_finished());
    s.handle_timeout(31_000);
    assert!(matches!(
        s.outcome(),
        Some(Err(ProtoError::MessageTimeout {
            waiting_for: "Hello",
            ..
        }))
    ));
    assert_eq!(daemon_error_kind(&mut s), ErrorKind::Timeout);

    // Silent after half the manifest: the deadline counts from the last byte.
    let mut s = opened(Limits::default(), &hello_push(&m, "r1"));
    let c = manifest_chunk(&m);
    s.handle_control(&c[..10], 5_000);
    assert_eq!(s.poll_timeout(), Some(35_000));
    s.handle_timeout(35_000);
    assert_eq!(daemon_error_kind(&mut s), ErrorKind::Timeout);

    // While the driver works (need computation), the client owes nothing: only the push
    // deadline runs.
    let mut s = opened(Limits::default(), &hello_push(&m, "r1"));
    s.handle_control(&c, 0);
    assert_eq!(s.state(), DaemonState::ComputingNeed);
    assert_eq!(s.poll_timeout(), Some(3_600_000));
}

#[test]
fn a_trickling_client_is_cut_off_by_the_push_deadline() {
    let limits = Limits {
        message_timeout_ms: 30_000,
        push_timeout_ms: 600_000,
        ..Limits::default()
    };
    let m = manifest_of(&tree_a()).encode();
    let mut s = opened(limits, &hello_push(&m, "r1"));
    let c = manifest_chunk(&m);
    let mut now = 0;
    for b in c.iter() {
        now += 29_000;
        s.handle_timeout(now);
        if s.is_finished() {
            break;
        }
        s.handle_control(std::slice::from_ref(b), now);
    }
    assert!(matches!(
        s.outcome(),
        Some(Err(ProtoError::PushTimeout { after_ms: 600_000 }))
    ));
    assert!((600_000..630_000).contains(&now), "{now}");
}

#[test]
fn a_client_stalled_mid_transfer_is_cut_off() {
    let (mut s, files, _) = receiving();
    let without = files.iter().find(|n| n.basis.is_none()).unwrap().file;
    s.accept_file(
        &FileHeader {
            file: without,
            format: DeltaFormat::Full,
            basis: None,
            payload_len: 10,
        }
        .frame()[4..],
        100,
    );
    s.handle_progress(20_000);
    assert_eq!(s.poll_timeout(), Some(50_000));
    s.handle_timeout(50_000);
    assert!(matches!(
        s.outcome(),
        Some(Err(ProtoError::MessageTimeout { .. }))
    ));
}

/// After `Done` with every header in, the client still owes the payloads' bytes: a stall inside
/// one is cut off by the message deadline, not left to the push deadline. Once the payloads have
/// arrived, storing them is the daemon's own work and only the push deadline runs.
#[test]
fn a_client_stalled_inside_a_payload_after_done_is_cut_off() {
    let (mut s, files, _) = receiving();
    let header = |n: &NeedFile| {
        FileHeader {
            file: n.file,
            format: DeltaFormat::Full,
            basis: None,
            payload_len: 10,
        }
        .frame()[4..]
            .to_vec()
    };
    for n in &files {
        s.accept_file(&header(n), 100);
    }
    let sent = files.len() as u64;
    s.handle_control(&ClientMsg::Done { files_sent: sent }.frame(), 200);
    assert_eq!(s.poll_timeout(), Some(30_200));
    // Every payload but the last arrives; the deadline moves with them.
    for n in &files[..files.len() - 1] {
        s.payload_arrived(n.file, 1_000);
    }
    assert_eq!(s.poll_timeout(), Some(31_000));
    s.handle_timeout(31_000);
    assert!(
        matches!(
            s.outcome(),
            Some(Err(ProtoError::MessageTimeout {
                waiting_for: "file data",
                ..
            }))
        ),
        "{:?}",
        s.outcome()
    );

    let (mut s, files, _) = receiving();
    for n in &files {
        s.accept_file(&header(n), 100);
        s.payload_arrived(n.file, 100);
    }
    s.handle_control(&ClientMsg::Done { files_sent: sent }.frame(), 200);
    assert_eq!(s.poll_timeout(), Some(3_600_000), "nothing is owed");
}

// ---------------------------------------------------------------------------------------------
// A hostile or broken daemon, seen by the client

struct Scripted {
    client: ClientSession,
    manifest: Manifest,
    sent: Vec<ClientMsg>,
    now: u64,
}

impl Scripted {
    fn new(tree: &Tree, activate: bool) -> Scripted {
        let manifest = manifest_of(tree);
        let job = PushJob {
            release: rid("r2"),
            manifest: Arc::new(manifest.clone()),
            activate,
            cached: HashSet::new(),
            manifest_basis: None,
            packed_manifest: None,
        };
        let mut s = Scripted {
            client: ClientSession::push(ClientConfig::default(), app(), job, 0),
            manifest,
            sent: Vec::new(),
            now: 0,
        };
        s.drain();
        s
    }

    /// Plays the client's driver: collects frames, "sends" every file in full.
    fn drain(&mut self) {
        loop {
            let mut moved = false;
            while let Some(f) = self.client.poll_transmit(self.now) {
                self.sent.push(wire::decode(&f[4..]).unwrap());
                moved = true;
            }
            while let Some(client::Request::SendFile(f)) = self.client.poll_request() {
                let h = f.header(DeltaFormat::Full, 1).unwrap();
                self.client.file_sent(&h, self.now);
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }

    fn feed(&mut self, msg: &DaemonMsg) {
        self.client.handle_control(&msg.frame(), self.now);
        self.drain();
    }

    fn welcome(&mut self) {
        self.feed(&DaemonMsg::Welcome {
            version: VERSION,
            limits: Limits::default(),
            manifest_basis: false,
        });
    }

    fn index(&self, path: &str) -> u32 {
        self.manifest
            .files()
            .position(|(p, ..)| p.as_str() == path)
            .unwrap() as u32
    }

    fn need(&self, files: &[(&str, Option<u64>)], last: bool) -> DaemonMsg {
        DaemonMsg::Need {
            files: files
                .iter()
                .map(|(p, basis)| NeedFile {
                    file: self.index(p),
                    basis: basis.map(|size| BasisRef {
                        hash: Hash::of(p.as_bytes()),
                        size,
                    }),
                })
                .collect(),
            last,
            have_files: 0,
            have_bytes: 0,
        }
    }

    fn staged(&self, release: &str) -> DaemonMsg {
        DaemonMsg::Staged(Staged {
            release: rid(release),
            files: self.manifest.file_count() as u64,
            bytes: 0,
            linked: 0,
            received: 0,
            received_bytes: 0,
            phases: vec![],
            usage: Default::default(),
            relayed: Vec::new(),
            previous: None,
        })
    }

    fn must_fail(&self, name: &str) -> &ProtoError {
        match self.client.outcome() {
            Some(Err(e)) => e,
            other => panic!("{name}: client must fail, got {other:?}"),
        }
    }
}

#[test]
fn a_scripted_honest_daemon_gets_a_successful_push() {
    let mut s = Scripted::new(&tree_b(), true);
    s.welcome();
    s.feed(&s.need(
        &[("vendor/big.php", Some(300_000)), ("src/New.php", None)],
        true,
    ));
    let sig_req = s.sent.iter().find_map(|m| match m {
        ClientMsg::SignatureRequest { files } => Some(files.clone()),
        _ => None,
    });
    assert_eq!(sig_req, Some(vec![s.index("vendor/big.php")]));
    let basis = vec![9u8; 300_000];
    let sig = BasisSignature::calculate(&basis);
    s.feed(&DaemonMsg::Signature {
        file: s.index("vendor/big.php"),
        data: sig.as_bytes().to_vec(),
    });
    assert!(matches!(
        s.sent.last(),
        Some(ClientMsg::Done { files_sent: 2 })
    ));
    s.feed(&s.staged("r2"));
    assert!(matches!(s.sent.last(), Some(ClientMsg::Activate { .. })));
    s.feed(&DaemonMsg::Activated {
        release: rid("r2"),
        pruned: Some(Pruning::Removed(vec![rid("r0")])),
    });
    assert!(matches!(
        s.client.outcome(),
        Some(Ok(client::Outcome::Pushed(PushReport {
            activated: true,
            needed: 2,
            signatures: 1,
            ..
        })))
    ));
}

#[test]
fn a_hostile_daemon_never_gets_a_successful_push() {
    type Script = fn(&mut Scripted);
    let table: Vec<(&str, Script)> = vec![
        ("need out of range", |s| {
            s.welcome();
            let mut m = s.need(&[], true);
            if let DaemonMsg::Need { files, .. } = &mut m {
                files.push(NeedFile {
                    file: 100,
                    basis: None,
                });
            }
            s.feed(&m);
        }),
        ("need twice in one chunk", |s| {
            s.welcome();
            s.feed(&s.need(&[("index.php", None), ("index.php", None)], true));
        }),
        ("need twice across chunks", |s| {
            s.welcome();
            s.feed(&s.need(&[("index.php", None)], false));
            s.feed(&s.need(&[("index.php", None)], true));
        }),
        ("need before the manifest was sent", |s| {
            let welcome = DaemonMsg::Welcome {
                version: VERSION,
                limits: Limits::default(),
                manifest_basis: false,
            };
            let need = s.need(&[], true);
            let bytes = [welcome.frame(), need.frame()].concat();
            s.client.handle_control(&bytes, 0);
        }),
        ("claims to have more files than exist", |s| {
            s.welcome();
            let mut m = s.need(&[], true);
            if let DaemonMsg::Need { have_files, .. } = &mut m {
                *have_files = 1_000;
            }
            s.feed(&m);
        }),
        ("signature not requested", |s| {
            s.welcome();
            s.feed(&s.need(
                &[("vendor/big.php", Some(300_000)), ("index.php", None)],
                true,
            ));
            let file = s.index("index.php");
            s.feed(&DaemonMsg::Signature { file, data: vec![] });
        }),
        ("signature twice", |s| {
            s.welcome();
            s.feed(&s.need(&[("vendor/big.php", Some(300_000))], true));
            let file = s.index("vendor/big.php");
            let sig = BasisSignature::calculate(&[1u8; 300_000])
                .as_bytes()
                .to_vec();
            s.feed(&DaemonMsg::Signature {
                file,
                data: sig.clone(),
            });
            s.feed(&DaemonMsg::Signature { file, data: sig });
        }),
        ("malformed signature", |s| {
            s.welcome();
            s.feed(&s.need(&[("vendor/big.php", Some(300_000))], true));
            let file = s.index("vendor/big.php");
            s.feed(&DaemonMsg::Signature {
                file,
                data: vec![0x72, 0x73, 0x01, 0x36, 0, 0, 0, 0],
            });
        }),
        ("signature for a different basis size", |s| {
            s.welcome();
            s.feed(&s.need(&[("vendor/big.php", Some(300_000))], true));
            let file = s.index("vendor/big.php");
            let sig = BasisSignature::calculate(&[1u8; 100_000])
                .as_bytes()
                .to_vec();
            s.feed(&DaemonMsg::Signature { file, data: sig });
        }),
        ("staged before done", |s| {
            s.welcome();
            s.feed(&s.need(&[("vendor/big.php", Some(300_000))], true));
            s.feed(&s.staged("r2"));
        }),
        ("staged before need", |s| {
            s.welcome();
            s.feed(&s.staged("r2"));
        }),
        ("staged another release", |s| {
            s.welcome();
            s.feed(&s.need(&[], true));
            s.feed(&s.staged("r1"));
        }),
        ("staged a different file count", |s| {
            s.welcome();
            s.feed(&s.need(&[], true));
            let mut m = s.staged("r2");
            if let DaemonMsg::Staged(st) = &mut m {
                st.files += 1;
            }
            s.feed(&m);
        }),
        ("staged with too many phases", |s| {
            s.welcome();
            s.feed(&s.need(&[], true));
            let mut m = s.staged("r2");
            if let DaemonMsg::Staged(st) = &mut m {
                st.phases = vec![PhaseTime::new("p", Default::default()); wire::MAX_PHASES + 1];
            }
            s.feed(&m);
        }),
        ("staged with a phase name too long", |s| {
            s.welcome();
            s.feed(&s.need(&[], true));
            let mut m = s.staged("r2");
            if let DaemonMsg::Staged(st) = &mut m {
                let name = "p".repeat(wire::MAX_PHASE_NAME + 1);
                st.phases = vec![PhaseTime::new(&name, Default::default())];
            }
            s.feed(&m);
        }),
        ("activated before staged", |s| {
            s.welcome();
            s.feed(&s.need(&[], true));
            s.feed(&DaemonMsg::Activated {
                release: rid("r2"),
                pruned: None,
            });
        }),
        ("activated another release", |s| {
            s.welcome();
            s.feed(&s.need(&[], true));
            s.feed(&s.staged("r2"));
            s.feed(&DaemonMsg::Activated {
                release: rid("r1"),
                pruned: None,
            });
        }),
        ("unexpected message", |s| {
            s.welcome();
            s.feed(&DaemonMsg::Releases { list: vec![] });
        }),
        ("welcome twice", |s| {
            s.welcome();
            s.welcome();
        }),
        ("max_frame below the minimum", |s| {
            s.feed(&DaemonMsg::Welcome {
                version: VERSION,
                limits: Limits {
                    max_frame: 16,
                    ..Limits::default()
                },
                manifest_basis: false,
            });
        }),
        ("no streams", |s| {
            s.feed(&DaemonMsg::Welcome {
                version: VERSION,
                limits: Limits {
                    max_streams: 0,
                    ..Limits::default()
                },
                manifest_basis: false,
            });
        }),
        ("max entries below the manifest", |s| {
            s.feed(&DaemonMsg::Welcome {
                version: VERSION,
                limits: Limits {
                    max_manifest_entries: 2,
                    ..Limits::default()
                },
                manifest_basis: false,
            });
        }),
        ("newer version", |s| {
            s.feed(&DaemonMsg::Welcome {
                version: VERSION + 1,
                limits: Limits::default(),
                manifest_basis: false,
            });
        }),
        ("newer version with another layout", |s| {
            // Variant 0 (`Welcome`), then the version as a one-byte varint.
            let newer = u8::try_from(VERSION + 1).expect("a one-byte varint");
            s.client.handle_control(&[0, 0, 0, 3, 0, newer, 0xFF], 0);
        }),
        ("garbage", |s| {
            s.client.handle_control(&[0, 0, 0, 2, 0xFF, 0xFF], 0);
        }),
        ("frame over the client's max_frame", |s| {
            s.client.handle_control(&[0xFF, 0xFF, 0xFF, 0xFF], 0);
        }),
        ("drop mid-handshake", |s| {
            s.client.handle_control(&[0, 0], 0);
            s.client.handle_control_end(1);
        }),
        ("drop after staged", |s| {
            s.welcome();
            s.feed(&s.need(&[], true));
            s.feed(&s.staged("r2"));
            s.client.handle_control_end(1);
        }),
        ("error", |s| {
            s.feed(&DaemonMsg::Error {
                kind: ErrorKind::Busy,
                message: "app shop is busy (held by host a pid 7)".into(),
            });
        }),
    ];
    for (name, script) in table {
        let mut s = Scripted::new(&tree_b(), true);
        script(&mut s);
        let err = s.must_fail(name);
        let expected_kind = match name {
            "newer version" | "newer version with another layout" => ErrorKind::Version,
            "max_frame below the minimum" | "no streams" | "max entries below the manifest" => {
                ErrorKind::Limit
            }
            "frame over the client's max_frame" => ErrorKind::FrameTooLarge,
            "error" => ErrorKind::Busy,
            _ => ErrorKind::BadRequest,
        };
        assert_eq!(err.kind(), expected_kind, "{name}: {err}");
        // Nothing more goes out after the failure.
        assert!(s.client.poll_transmit(0).is_none(), "{name}");
        assert!(s.client.poll_request().is_none(), "{name}");
    }
}

#[test]
fn absurd_limits_are_clamped_to_the_clients() {
    let mut s = Scripted::new(&tree_b(), true);
    s.feed(&DaemonMsg::Welcome {
        version: VERSION,
        limits: Limits {
            max_frame: u32::MAX,
            max_streams: u32::MAX,
            ..Limits::default()
        },
        manifest_basis: false,
    });
    let config = ClientConfig::default();
    assert_eq!(
        s.client.negotiated(),
        (config.max_frame as usize, config.max_streams)
    );
    // Manifest chunks stay small whatever the daemon accepts.
    for m in &s.sent {
        if let ClientMsg::ManifestChunk { data, .. } = m {
            assert!(data.len() <= client::MAX_MANIFEST_CHUNK);
        }
    }
}

#[test]
fn a_stalled_daemon_is_cut_off_by_the_message_deadline() {
    // No Welcome.
    let mut s = Scripted::new(&tree_a(), true);
    assert_eq!(s.client.poll_timeout(), Some(30_000));
    s.client.handle_timeout(30_000);
    assert!(matches!(
        s.client.outcome(),
        Some(Err(ProtoError::MessageTimeout {
            waiting_for: "Welcome",
            ..
        }))
    ));

    // No Need: the wait starts when the last manifest chunk leaves.
    let mut s = Scripted::new(&tree_a(), true);
    s.client.handle_control(
        &DaemonMsg::Welcome {
            version: VERSION,
            limits: Limits::default(),
            manifest_basis: false,
        }
        .frame(),
        1_000,
    );
    assert_eq!(
        s.client.poll_timeout(),
        Some(3_600_000),
        "manifest not out yet"
    );
    s.now = 7_000;
    s.drain();
    assert_eq!(s.client.poll_timeout(), Some(37_000));
    s.client.handle_timeout(37_000);
    assert!(matches!(
        s.client.outcome(),
        Some(Err(ProtoError::MessageTimeout {
            waiting_for: "Need",
            ..
        }))
    ));

    // No signature.
    let mut s = Scripted::new(&tree_b(), true);
    s.welcome();
    s.feed(&s.need(&[("vendor/big.php", Some(300_000))], true));
    assert_eq!(s.client.state(), ClientState::Transfer);
    s.client.handle_timeout(30_000);
    assert!(matches!(
        s.client.outcome(),
        Some(Err(ProtoError::MessageTimeout {
            waiting_for: "Signature",
            ..
        }))
    ));

    // Building the release may take long: only the push deadline runs.
    let mut s = Scripted::new(&tree_b(), true);
    s.welcome();
    s.feed(&s.need(&[], true));
    assert_eq!(s.client.state(), ClientState::Staging);
    assert_eq!(s.client.poll_timeout(), Some(3_600_000));
    s.client.handle_timeout(3_600_000);
    assert!(matches!(
        s.client.outcome(),
        Some(Err(ProtoError::PushTimeout { .. }))
    ));
}

// ---------------------------------------------------------------------------------------------
// Any chunking of the control streams gives the same push

fn patch_push(chunks: Vec<usize>) -> (PushReport, daemon::Outcome, Vec<FileHeader>) {
    let (a, b) = (tree_a(), tree_b());
    let mut net = Net::push(&b, "r2", true, pushed(&a, "r1"));
    net.chunks = chunks;
    net.run();
    assert_daemon_holds(&net.d, &b);
    (
        net.report().clone(),
        net.daemon_outcome().clone(),
        net.src.headers.clone(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn any_chunking_gives_the_same_outcome(chunks in prop::collection::vec(1usize..300, 1..20)) {
        let whole = patch_push(vec![]);
        let chunked = patch_push(chunks);
        prop_assert_eq!(chunked, whole);
    }
}

/// Applies `edits` (set a byte, insert a byte, truncate) to `data`, positions taken modulo the
/// current length.
fn mutate(mut data: Vec<u8>, edits: &[(u16, u8, u8)]) -> Vec<u8> {
    for &(pos, byte, op) in edits {
        let at = if data.is_empty() {
            0
        } else {
            pos as usize % data.len()
        };
        match op {
            0 if !data.is_empty() => data[at] = byte,
            1 => data.insert(at, byte),
            _ => data.truncate(at),
        }
    }
    data
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    /// A cheap stand-in for the fuzzers under `cargo test`: mutated seed conversations never
    /// break the sessions' invariants (the entry points panic if they do).
    #[test]
    fn mutated_conversations_keep_the_invariants(
        pick in 0usize..64,
        edits in prop::collection::vec((any::<u16>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let seeds = proto_fuzz::seeds();
        let (target, _, data) = &seeds[pick % seeds.len()];
        let data = mutate(data.clone(), &edits);
        match *target {
            "frame_decode" => {
                let _ = proto_fuzz::frame_decode_one(&data);
            }
            "daemon_session" => {
                proto_fuzz::daemon_session_one(&data);
            }
            _ => {
                let _ = proto_fuzz::client_session_one(&data);
            }
        }
    }
}

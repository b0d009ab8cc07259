//! The client driver over real QUIC connections on loopback, against a small in-process daemon
//! built on `DaemonSession` with an in-memory store, and against scripted hostile daemons.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use quinn::Endpoint;
use sync_core::delta::{self, BasisSignature, DeltaFormat};
use sync_core::manifest::{Entry, Policy};
use sync_core::proto::client::{ClientConfig, Method, SendFile};
use sync_core::proto::daemon::{self, compute_need, DaemonSession, Event, FileFailure};
use sync_core::wire::{
    decode, ClientMsg, DaemonMsg, FileHeader, FrameDecoder, Limits, Message, NeedFile, Pruning,
    ReleaseInfo, ReleaseStatus, VERSION,
};
use tokio::time::{Duration, Instant};

use super::*;
use crate::tls::AuthorizedClientVerifier;

// ---------------------------------------------------------------------------------------------
// Keys and endpoints

struct Keys {
    _tmp: tempfile::TempDir,
    daemon: Identity,
    client: Identity,
    known: KnownHosts,
}

fn keys() -> Keys {
    let tmp = tempfile::tempdir().unwrap();
    let known = KnownHosts::load(&tmp.path().join("known_hosts")).unwrap();
    Keys {
        daemon: Identity::generate("daemon").unwrap(),
        client: Identity::generate("client").unwrap(),
        known,
        _tmp: tmp,
    }
}

fn server(k: &Keys, authorized: &[Fingerprint]) -> (Endpoint, SocketAddr) {
    let verifier = Arc::new(AuthorizedClientVerifier::new(authorized.iter().copied()));
    let ep = net::server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &k.daemon,
        verifier,
        &NetConfig::default(),
    )
    .unwrap();
    let addr = ep.local_addr().unwrap();
    (ep, addr)
}

/// An in-memory daemon serving app `shop` to `k`'s client key, trusted in `k`'s known hosts.
fn shop_daemon(k: &mut Keys) -> (Target, Shared) {
    let (ep, addr) = server(k, &[k.client.fingerprint()]);
    let store = Shared::default();
    spawn_daemon(ep, Arc::clone(&store));
    let t = target(addr, "shop");
    k.known.add(&t.host_port(), k.daemon.fingerprint()).unwrap();
    (t, store)
}

fn target(addr: SocketAddr, app: &str) -> Target {
    Target::parse(&format!("127.0.0.1:{}/{app}", addr.port())).unwrap()
}

async fn dial(k: &Keys, t: &Target) -> Result<Connection, ClientError> {
    connect(
        t,
        &k.client,
        &k.known,
        &NetConfig::default(),
        Duration::from_secs(5),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// A well-behaved in-process daemon

#[derive(Default)]
struct Store {
    kept: HashMap<Hash, Vec<u8>>,
    objects: HashMap<Hash, Vec<u8>>,
    releases: BTreeMap<ReleaseId, Arc<Manifest>>,
    current: Option<ReleaseId>,
    /// Payload formats received, in order.
    formats: Vec<DeltaFormat>,
    /// What a sync's destination holds.
    mirror: Option<Arc<Manifest>>,
    /// For each file stream, the files it carried, in order.
    streams: Vec<Vec<u32>>,
}

type Shared = Arc<Mutex<Store>>;

fn spawn_daemon(ep: Endpoint, store: Shared) {
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                if let Ok(conn) = incoming.await {
                    serve(conn, store).await;
                }
            });
        }
    });
}

async fn serve(conn: quinn::Connection, store: Shared) {
    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
        return;
    };
    let origin = Instant::now();
    let ms = || origin.elapsed().as_millis() as u64;
    let mut s = DaemonSession::new(Limits::default(), 0);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Vec<u8>, Vec<u8>)>();
    let uni = conn.clone();
    let streams = Arc::clone(&store);
    tokio::spawn(async move {
        while let Ok(mut stream) = uni.accept_uni().await {
            let (tx, store) = (tx.clone(), Arc::clone(&streams));
            let slot = {
                let mut st = store.lock().unwrap();
                st.streams.push(Vec::new());
                st.streams.len() - 1
            };
            tokio::spawn(async move {
                // A stream carries (header, payload) pairs until it ends.
                let Ok(data) = stream.read_to_end(1 << 30).await else {
                    return;
                };
                let mut input = &data[..];
                while !input.is_empty() {
                    let mut dec = DaemonSession::file_header_decoder();
                    let Ok(Some(frame)) = dec.decode(&mut input) else {
                        return;
                    };
                    let Ok(h) = decode::<FileHeader>(&frame) else {
                        return;
                    };
                    let len = (h.payload_len as usize).min(input.len());
                    let (payload, rest) = input.split_at(len);
                    input = rest;
                    store.lock().unwrap().streams[slot].push(h.file);
                    let _ = tx.send((frame, payload.to_vec()));
                }
            });
        }
    });
    let mut payloads: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    let mut control_open = true;
    loop {
        // Answering a request can queue frames and further requests: settle both.
        loop {
            let mut moved = false;
            while let Some(r) = s.poll_request() {
                answer(r, &mut s, &store, &mut payloads, ms());
                moved = true;
            }
            while let Some(f) = s.poll_transmit(ms()) {
                if send.write_all(&f).await.is_err() {
                    return;
                }
                moved = true;
            }
            if !moved {
                break;
            }
        }
        if s.is_finished() {
            while let Some(f) = s.poll_transmit(ms()) {
                let _ = send.write_all(&f).await;
            }
            let _ = send.finish();
            break;
        }
        let wake = s.poll_timeout().unwrap_or(u64::MAX).min(ms() + 60_000);
        tokio::select! {
            r = recv.read(&mut buf), if control_open => match r {
                Ok(Some(n)) => s.handle_control(&buf[..n], ms()),
                Ok(None) => {
                    control_open = false;
                    s.handle_control_end(ms());
                }
                Err(_) => return,
            },
            Some((frame, payload)) = rx.recv() => {
                if let Ok(h) = decode::<FileHeader>(&frame) {
                    payloads.insert(h.file, payload);
                }
                s.accept_file(&frame, ms());
            }
            () = tokio::time::sleep_until(origin + Duration::from_millis(wake)) => {
                s.handle_timeout(ms());
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
}

fn answer(
    r: daemon::Request,
    s: &mut DaemonSession,
    store: &Shared,
    payloads: &mut HashMap<u32, Vec<u8>>,
    now: u64,
) {
    let mut st = store.lock().unwrap();
    let event = match r {
        // Like relsyncd: the current release's manifest is offered as the basis.
        daemon::Request::Open { .. } => Event::Opened {
            policy: Policy::default(),
            manifest_basis: st.current.as_ref().map(|c| st.releases[c].encode()),
        },
        daemon::Request::ComputeNeed { manifest, .. } => {
            let current = st.current.as_ref().map(|c| Arc::clone(&st.releases[c]));
            Event::Need(compute_need(&manifest, current.as_deref(), |h| {
                st.kept.contains_key(h) || st.objects.contains_key(h)
            }))
        }
        daemon::Request::ComputeMirrorNeed { manifest, .. } => {
            let dest = st.mirror.clone();
            Event::Need(compute_need(&manifest, dest.as_deref(), |h| {
                dest.as_ref()
                    .is_some_and(|d| d.files().any(|(_, _, _, x)| x == h))
            }))
        }
        daemon::Request::Mirror {
            manifest,
            delete,
            dry_run,
        } => {
            let dest = st
                .mirror
                .clone()
                .unwrap_or_else(|| Arc::new(Manifest::empty()));
            let plan = sync_core::plan::plan_mirror(&manifest, &dest, delete);
            let applied = (!dry_run).then(|| {
                let objects = std::mem::take(&mut st.objects);
                st.kept.extend(objects);
                st.mirror = Some(Arc::clone(&manifest));
                sync_core::plan::MirrorStats {
                    removed: plan.summary.removed,
                    written_files: plan.summary.written_files,
                    written_bytes: plan.summary.written_bytes,
                    dirs: plan.summary.dirs_created,
                }
            });
            Event::Mirrored {
                plan: Box::new(plan),
                applied,
            }
        }
        daemon::Request::Signatures { files } => {
            for job in files {
                let data = BasisSignature::calculate(&st.kept[&job.basis.hash])
                    .as_bytes()
                    .to_vec();
                s.handle_event(
                    Event::Signature {
                        file: job.file,
                        data: Some(data),
                    },
                    now,
                );
            }
            return;
        }
        daemon::Request::Receive(job) => {
            let payload = payloads.remove(&job.file).unwrap_or_default();
            let basis = job.basis.map(|b| st.kept[&b.hash].clone());
            let mut out = Vec::new();
            let result = delta::apply(
                job.format,
                basis.as_deref(),
                &payload[..(job.payload_len as usize).min(payload.len())],
                job.size,
                &blake3::Hash::from_bytes(job.hash.0),
                &mut out,
            )
            .map(|_| ())
            .map_err(|e| FileFailure::Corrupt(e.to_string()));
            if result.is_ok() {
                st.formats.push(job.format);
                st.objects.insert(job.hash, out);
            }
            s.file_finished(job.file, result, now);
            return;
        }
        daemon::Request::Stage { release, manifest } => {
            let mut linked = 0;
            for (_, _, _, hash) in manifest.files() {
                if st.kept.contains_key(hash) {
                    linked += 1;
                } else if let Some(c) = st.objects.remove(hash) {
                    st.kept.insert(*hash, c);
                }
            }
            st.releases.insert(release, manifest);
            Event::Staged {
                linked,
                phases: vec![],
                relayed: Vec::new(),
                previous: st.current.clone(),
            }
        }
        daemon::Request::Activate { release, prune } => {
            st.current = Some(release.clone());
            Event::Activated {
                release,
                pruned: prune.then(|| Pruning::Removed(vec![])),
            }
        }
        daemon::Request::ListReleases => Event::Releases(
            st.releases
                .iter()
                .map(|(id, m)| ReleaseInfo {
                    id: id.clone(),
                    status: if Some(id) == st.current.as_ref() {
                        ReleaseStatus::Current
                    } else {
                        ReleaseStatus::Good
                    },
                    created_unix: 0,
                    files: m.file_count() as u64,
                    bytes: m.total_file_bytes(),
                    manifest: m.digest(),
                })
                .collect(),
        ),
        daemon::Request::Rollback { to } => {
            let release = to.unwrap_or_else(|| st.releases.keys().next().unwrap().clone());
            st.current = Some(release.clone());
            Event::Activated {
                release,
                pruned: None,
            }
        }
        daemon::Request::Prune { .. } | daemon::Request::Clear => Event::Pruned { removed: vec![] },
    };
    drop(st);
    s.handle_event(event, now);
}

// ---------------------------------------------------------------------------------------------
// Source trees

/// Writes `files` under `dir` (replacing what was there) and returns the push of them.
fn tree(dir: &Path, release: &str, files: &[(&str, Vec<u8>)]) -> PushRequest {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let mut entries = Vec::new();
    let mut dirs = std::collections::BTreeSet::new();
    for (p, c) in files {
        let path = dir.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, c).unwrap();
        if let Some((d, _)) = p.rsplit_once('/') {
            dirs.insert(d.to_string());
        }
        entries.push(Entry::file(p, c.len() as u64, 0o644, Hash::of(c)).unwrap());
    }
    for d in dirs {
        entries.push(Entry::dir(&d, 0o755).unwrap());
    }
    PushRequest {
        release: ReleaseId::new(release).unwrap(),
        manifest: Arc::new(Manifest::from_unsorted(entries, &Policy::default()).unwrap()),
        source: dir.to_owned(),
        activate: true,
    }
}

fn php(seed: u64, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 64);
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let mut line = 0u64;
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(
            format!("    $v{line} = f({}, '{:x}');\n", line * 7, x % 99_999).as_bytes(),
        );
        line += 1;
    }
    out.truncate(n);
    out
}

fn release_a() -> Vec<(&'static str, Vec<u8>)> {
    let mut v: Vec<(&str, Vec<u8>)> = (0..40)
        .map(|i| {
            let name: &'static str = Box::leak(format!("src/F{i}.php").into_boxed_str());
            (name, php(i, 3_000 + (i as usize) * 97))
        })
        .collect();
    v.push(("vendor/big.php", php(1000, 400_000)));
    v.push(("public/index.php", php(1001, 900)));
    v.push(("public/copy.php", php(1001, 900)));
    v
}

fn release_b() -> Vec<(&'static str, Vec<u8>)> {
    let mut v = release_a();
    for (p, c) in v.iter_mut() {
        if *p == "vendor/big.php" || *p == "src/F3.php" || *p == "src/F17.php" {
            let at = c.len() / 2;
            c.splice(at..at, b"// edited for release b\n".iter().copied());
        }
    }
    v.push(("src/New.php", php(2000, 5_000)));
    v
}

/// Bytes zstd cannot shrink, so their payload is as large as the file.
pub(super) fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// 600 small files of distinct content, with three large incompressible ones among them (one
/// larger than a writer's batch of files and its gathered writes).
fn many_small_and_a_few_large() -> Vec<(&'static str, Vec<u8>)> {
    let mut v: Vec<(&'static str, Vec<u8>)> = (0..600u64)
        .map(|i| {
            let name: &'static str =
                Box::leak(format!("d{:02}/f{i:03}.php", i / 40).into_boxed_str());
            (name, php(3000 + i, 100 + (i as usize * 37) % 6_000))
        })
        .collect();
    v.push(("d03/big.bin", noise(1, 700_000)));
    v.push(("d07/bigger.bin", noise(2, 2_500_000)));
    v.push(("d14/last.bin", noise(3, 100_000)));
    v
}

/// Every file of `files` reached the daemon intact, each on exactly one stream, and the
/// streams were few, each carrying its files in the order the session handed them out.
fn assert_streams_carried(store: &Shared, files: &[(&str, Vec<u8>)], needed: u64) {
    let st = store.lock().unwrap();
    for (p, c) in files {
        let got = st.kept.get(&Hash::of(c));
        assert!(got == Some(c), "{p} is not on the daemon as pushed");
    }
    let mut all: Vec<u32> = st.streams.iter().flatten().copied().collect();
    assert_eq!(all.len() as u64, needed, "every needed file once");
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len() as u64, needed, "no file twice");
    let writers = driver::writer_count(Limits::default().max_streams);
    assert!(
        (1..=writers).contains(&st.streams.len()),
        "{} streams for {writers} writers",
        st.streams.len()
    );
    for files in &st.streams {
        assert!(
            files.is_sorted(),
            "a stream carried files out of order: {files:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Tests against the well-behaved daemon

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncs_send_deltas_and_keep_their_own_cache_entry() {
    let mut k = keys();
    let (ep, addr) = server(&k, &[k.client.fingerprint()]);
    let store = Shared::default();
    spawn_daemon(ep, Arc::clone(&store));
    let dest =
        SyncTarget::parse(&format!("relsync://127.0.0.1:{}/media/site", addr.port())).unwrap();
    k.known
        .add(&dest.target().host_port(), k.daemon.fingerprint())
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(&tmp.path().join("cache")).unwrap());
    let src = tmp.path().join("src");
    let request = |files: Vec<(&str, Vec<u8>)>, dry_run| {
        let p = tree(&src, "unused", &files);
        SyncRequest {
            destination: dest.clone(),
            delete: true,
            dry_run,
            excludes: vec![],
            manifest: p.manifest,
            source: p.source,
        }
    };

    let a = request(release_a(), false);
    let conn = dial(&k, dest.target()).await.unwrap();
    let states = Mutex::new(Vec::new());
    let first = sync(&conn, &a, Some(&cache), &|p| {
        if let Progress::State(s) = p {
            states.lock().unwrap().push(s);
        }
    })
    .await
    .unwrap();
    conn.close().await;
    let s = &first.session;
    assert!(!s.dry_run);
    assert_eq!((s.needed, s.sent_full, s.have_files), (42, 42, 1), "{s:?}");
    assert_eq!(s.plan.summary.written_files, 43);
    assert_eq!(s.applied.as_ref().map(|a| a.written_files), Some(43));
    assert!(states.lock().unwrap().contains(&ClientState::Mirroring));
    assert!(first.cache.clone().unwrap().is_ok());
    // The cache records the destination, not the daemon's app of the same name.
    let recorded = cache.last_manifest(&dest).unwrap().unwrap();
    assert_eq!(recorded.digest(), a.manifest.digest());
    assert!(cache.last_manifest(dest.target()).unwrap().is_none());

    // A dry run of the next tree: the plan, nothing sent, the cache untouched.
    let b = request(release_b(), true);
    let conn = dial(&k, dest.target()).await.unwrap();
    let plan = sync(&conn, &b, Some(&cache), &|_| {}).await.unwrap();
    conn.close().await;
    let s = &plan.session;
    assert!(s.dry_run && s.applied.is_none() && plan.cache.is_none());
    assert_eq!((s.needed, s.payload_bytes), (4, 0));
    assert_eq!(s.plan.summary.written_files, 4);
    assert_eq!(
        store.lock().unwrap().mirror.as_ref().unwrap().digest(),
        a.manifest.digest()
    );

    let b = request(release_b(), false);
    let conn = dial(&k, dest.target()).await.unwrap();
    let second = sync(&conn, &b, Some(&cache), &|_| {}).await.unwrap();
    conn.close().await;
    let s = &second.session;
    assert_eq!((s.needed, s.sent_zstd_ref, s.sent_full), (4, 3, 1), "{s:?}");
    assert!(s.payload_bytes * 20 < first.session.payload_bytes);
    assert_eq!(
        cache.last_manifest(&dest).unwrap().unwrap().digest(),
        b.manifest.digest()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_then_delta_push_then_commands() {
    let mut k = keys();
    let (t, store) = shop_daemon(&mut k);
    let tmp = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(&tmp.path().join("cache")).unwrap());
    let src = tmp.path().join("src");

    let a = tree(&src, "r1", &release_a());
    let conn = dial(&k, &t).await.unwrap();
    assert_eq!(conn.daemon_key(), Some(k.daemon.fingerprint()));
    let events = Mutex::new(Vec::new());
    let first = push(&conn, &a, Some(&cache), &|p| events.lock().unwrap().push(p))
        .await
        .unwrap();
    conn.close().await;
    let s = &first.session;
    // 43 files, two with the same content: 42 distinct contents, all new.
    assert_eq!((s.files, s.needed, s.have_files), (43, 42, 1));
    assert_eq!((s.sent_full, s.sent_zstd_ref, s.sent_rsync), (42, 0, 0));
    assert!(s.activated);
    assert_eq!(first.sent_bytes.full, s.payload_bytes);
    assert_eq!(s.staged.received_bytes, s.payload_bytes);
    let events = events.into_inner().unwrap();
    let need_bytes: u64 = events
        .iter()
        .find_map(|e| match e {
            Progress::Need { files: 42, bytes } => Some(*bytes),
            _ => None,
        })
        .expect("a need event");
    let sent: u64 = events
        .iter()
        .map(|e| match e {
            Progress::Sent { bytes, .. } => *bytes,
            _ => 0,
        })
        .sum();
    assert_eq!(sent, need_bytes);
    assert!(events.contains(&Progress::State(ClientState::Activation)));
    let update = first.cache.clone().unwrap().unwrap();
    // Every distinct non-empty content is cached (full payloads were stored while sending).
    assert_eq!(cache.hashes().unwrap().len(), 42, "{update:?}");
    assert_eq!(
        store.lock().unwrap().current,
        Some(ReleaseId::new("r1").unwrap())
    );

    let b = tree(&src, "r2", &release_b());
    let conn = dial(&k, &t).await.unwrap();
    let second = push(&conn, &b, Some(&cache), &|_| {}).await.unwrap();
    conn.close().await;
    let s = &second.session;
    assert!(
        !first.session.manifest_delta,
        "nothing to diff the first manifest against"
    );
    assert!(
        s.manifest_delta,
        "the second manifest goes as a delta against the first"
    );
    assert_eq!((s.needed, s.sent_full), (4, 1), "{s:?}");
    assert_eq!(s.sent_zstd_ref, 3, "{s:?}");
    assert_eq!(s.signatures, 0, "the cache makes signatures unnecessary");
    assert!(
        s.payload_bytes * 20 < first.session.payload_bytes,
        "{} vs {}",
        s.payload_bytes,
        first.session.payload_bytes
    );
    assert_eq!(
        second.sent_bytes.full + second.sent_bytes.zstd_ref,
        s.payload_bytes
    );
    {
        let st = store.lock().unwrap();
        for (p, c) in release_b() {
            assert_eq!(st.kept.get(&Hash::of(&c)), Some(&c), "{p}");
        }
    }

    // Without the cache, the big file goes by rsync delta after a signature round trip.
    let edited = release_b()
        .into_iter()
        .map(|(p, mut c)| {
            if p == "vendor/big.php" {
                c.extend_from_slice(b"// r3\n");
            }
            (p, c)
        })
        .collect::<Vec<_>>();
    let c = PushRequest {
        activate: false,
        ..tree(&src, "r3", &edited)
    };
    let conn = dial(&k, &t).await.unwrap();
    let third = push(&conn, &c, None, &|_| {}).await.unwrap();
    conn.close().await;
    let s = &third.session;
    assert_eq!((s.needed, s.sent_rsync, s.signatures), (1, 1, 1), "{s:?}");
    assert!(!s.activated);
    assert!(third.cache.is_none());
    assert_eq!(
        store.lock().unwrap().current,
        Some(ReleaseId::new("r2").unwrap())
    );

    let conn = dial(&k, &t).await.unwrap();
    let list = command(&conn, Command::Releases).await.unwrap();
    conn.close().await;
    let Outcome::Releases(list) = list else {
        panic!("{list:?}")
    };
    let ids: Vec<&str> = list.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["r1", "r2", "r3"]);
    let conn = dial(&k, &t).await.unwrap();
    let back = command(
        &conn,
        Command::Rollback {
            to: Some(ReleaseId::new("r1").unwrap()),
        },
    )
    .await
    .unwrap();
    conn.close().await;
    assert_eq!(
        back,
        Outcome::Activated {
            release: ReleaseId::new("r1").unwrap(),
            pruned: None,
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_asks_and_sends_nothing() {
    let mut k = keys();
    let (t, store) = shop_daemon(&mut k);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let a = tree(&src, "r1", &release_a());
    let conn = dial(&k, &t).await.unwrap();
    push(&conn, &a, None, &|_| {}).await.unwrap();
    conn.close().await;

    let b = tree(&src, "r2", &release_b());
    let conn = dial(&k, &t).await.unwrap();
    let need = dry_run(&conn, &b, None).await.unwrap();
    conn.close().await;
    assert_eq!((need.files, need.needed_files, need.with_basis), (44, 4, 3));
    assert_eq!(need.cached_basis, 0);
    assert_eq!(need.have_files, 40);
    let paths: Vec<&str> = need.paths.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        ["src/F17.php", "src/F3.php", "src/New.php", "vendor/big.php"]
    );
    assert_eq!(
        need.needed_bytes,
        need.paths.iter().map(|(_, s)| s).sum::<u64>()
    );
    let st = store.lock().unwrap();
    assert_eq!(st.releases.len(), 1, "a dry run stages nothing");
    assert!(st.objects.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_problems_say_what_to_run() {
    let mut k = keys();
    let stranger = Identity::generate("stranger").unwrap();
    let (ep, addr) = server(&k, &[stranger.fingerprint()]);
    spawn_daemon(ep, Shared::default());
    let t = target(addr, "shop");

    let e = dial(&k, &t).await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ClientError::Pin(_)), "{msg}");
    assert!(
        msg.contains(&format!(
            "relsync trust {} {}",
            t.host_port(),
            k.daemon.fingerprint()
        )),
        "{msg}"
    );

    k.known.add(&t.host_port(), stranger.fingerprint()).unwrap();
    let e = dial(&k, &t).await.unwrap_err();
    assert!(e.to_string().contains("changed"), "{e}");

    let mut k2 = keys();
    let (ep, addr) = server(&k2, &[stranger.fingerprint()]);
    spawn_daemon(ep, Shared::default());
    let t = target(addr, "shop");
    k2.known
        .add(&t.host_port(), k2.daemon.fingerprint())
        .unwrap();
    let e = dial(&k2, &t).await.unwrap_err();
    assert!(matches!(e, ClientError::KeyRefused { .. }), "{e}");
    assert!(
        e.to_string().contains(&format!(
            "does not authorize key {}",
            k2.client.fingerprint()
        )),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Hostile daemons

enum Step {
    /// Wait until the client sent its whole manifest.
    AwaitManifest,
    Send(DaemonMsg),
    /// Close the connection with this code.
    Close(u32),
    /// Say nothing more.
    Stall,
}

fn spawn_script(ep: Endpoint, script: Vec<Step>) {
    tokio::spawn(async move {
        let Some(incoming) = ep.accept().await else {
            return;
        };
        let Ok(conn) = incoming.await else { return };
        let Ok((mut send, mut recv)) = conn.accept_bi().await else {
            return;
        };
        let mut dec = FrameDecoder::new(1 << 30);
        let mut buf = vec![0u8; 65536];
        for step in script {
            match step {
                Step::AwaitManifest => loop {
                    let Ok(Some(n)) = recv.read(&mut buf).await else {
                        return;
                    };
                    let mut input = &buf[..n];
                    let mut last = false;
                    while let Ok(Some(frame)) = dec.decode(&mut input) {
                        last |= matches!(
                            decode::<ClientMsg>(&frame),
                            Ok(ClientMsg::ManifestChunk { last: true, .. })
                        );
                    }
                    if last {
                        break;
                    }
                },
                Step::Send(m) => {
                    if send.write_all(&m.frame()).await.is_err() {
                        return;
                    }
                }
                Step::Close(code) => {
                    conn.close(code.into(), b"hostile daemon hangs up");
                    return;
                }
                Step::Stall => {}
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
    });
}

fn welcome(limits: Limits) -> Step {
    Step::Send(DaemonMsg::Welcome {
        version: VERSION,
        limits,
        manifest_basis: false,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_daemons_never_get_a_success() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let req = tree(&src, "r1", &release_a());
    let need = |files: Vec<u32>| {
        Step::Send(DaemonMsg::Need {
            files: files
                .into_iter()
                .map(|file| NeedFile { file, basis: None })
                .collect(),
            last: true,
            have_files: 0,
            have_bytes: 0,
        })
    };
    let staged = |files| {
        Step::Send(DaemonMsg::Staged(sync_core::wire::Staged {
            release: ReleaseId::new("r1").unwrap(),
            files,
            bytes: 0,
            linked: 0,
            received: 0,
            received_bytes: 0,
            phases: vec![],
            usage: Default::default(),
            relayed: Vec::new(),
            previous: None,
        }))
    };
    let cases: Vec<(&str, Vec<Step>, &str)> = vec![
        (
            "a file index outside the manifest",
            vec![
                welcome(Limits::default()),
                Step::AwaitManifest,
                need(vec![99_999]),
            ],
            "manifest has 43 files",
        ),
        (
            "a file needed twice",
            vec![
                welcome(Limits::default()),
                Step::AwaitManifest,
                need(vec![1, 1]),
            ],
            "twice",
        ),
        (
            "no streams at all",
            vec![welcome(Limits {
                max_streams: 0,
                ..Limits::default()
            })],
            "max_streams",
        ),
        (
            "staged without any file sent",
            vec![welcome(Limits::default()), Step::AwaitManifest, staged(43)],
            "unexpected Staged",
        ),
        (
            "an error instead of a welcome",
            vec![Step::Send(DaemonMsg::Error {
                kind: sync_core::wire::ErrorKind::Busy,
                message: "app shop is busy (held by ci since 10:00)".into(),
            })],
            "busy (held by ci",
        ),
        (
            "a hang-up during the handshake",
            vec![Step::Close(9)],
            "hostile daemon hangs up",
        ),
        (
            "silence after the welcome",
            vec![welcome(Limits::default()), Step::Stall],
            "no Need from the peer",
        ),
    ];
    for (name, script, expect) in cases {
        let mut k = keys();
        let (ep, addr) = server(&k, &[k.client.fingerprint()]);
        spawn_script(ep, script);
        let t = target(addr, "shop");
        k.known.add(&t.host_port(), k.daemon.fingerprint()).unwrap();
        let mut conn = dial(&k, &t).await.unwrap();
        conn.set_config(ClientConfig {
            message_timeout_ms: 500,
            ..ClientConfig::default()
        });
        let got = push(&conn, &req, None, &|_| {}).await;
        conn.close().await;
        match got {
            Ok(r) => panic!("{name}: reported success {r:?}"),
            Err(e) => assert!(e.to_string().contains(expect), "{name}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_files_share_a_few_streams_each_once_and_in_order() {
    // The default memory budget, and one far below the batch and the large files.
    for memory_kib in [None, Some(64)] {
        let mut k = keys();
        let (t, store) = shop_daemon(&mut k);
        let tmp = tempfile::tempdir().unwrap();
        let files = many_small_and_a_few_large();
        let req = tree(&tmp.path().join("src"), "r1", &files);
        let conn = dial(&k, &t).await.unwrap();
        let opts = PushOptions {
            memory_kib,
            ..PushOptions::default()
        };
        let sent = Mutex::new(0u64);
        let pushed = push_with(&conn, &req, &opts, &|p| {
            if let Progress::Sent { .. } = p {
                *sent.lock().unwrap() += 1;
            }
        })
        .await
        .unwrap();
        conn.close().await;
        let s = &pushed.session;
        assert_eq!((s.needed, s.sent_full), (603, 603), "{memory_kib:?}: {s:?}");
        assert_eq!(*sent.lock().unwrap(), 603, "one progress event per file");
        assert_eq!(s.staged.received_bytes, s.payload_bytes);
        assert_streams_carried(&store, &files, 603);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pushes_through_the_memo_encode_each_payload_once() {
    let mut k = keys();
    let mut daemons = Vec::new();
    for _ in 0..2 {
        let (t, store) = shop_daemon(&mut k);
        daemons.push((t, store));
    }
    let tmp = tempfile::tempdir().unwrap();
    let files = many_small_and_a_few_large();
    let req = tree(&tmp.path().join("src"), "r1", &files);
    let memo = Arc::new(PayloadMemo::new(1 << 30, 2));
    let opts = PushOptions {
        memo: Some(Arc::clone(&memo)),
        memory_kib: Some(1024),
        ..PushOptions::default()
    };
    let push_to = |t: Target| {
        let (k, req, opts) = (&k, &req, &opts);
        async move {
            let conn = dial(k, &t).await.unwrap();
            let pushed = push_with(&conn, req, opts, &|_| {}).await;
            conn.close().await;
            pushed.unwrap()
        }
    };
    let (a, b) = tokio::join!(push_to(daemons[0].0.clone()), push_to(daemons[1].0.clone()));
    for pushed in [a, b] {
        assert_eq!(pushed.session.needed, 603, "{:?}", pushed.session);
    }
    assert_eq!(
        memo.stats(),
        MemoStats {
            encodes: 603,
            hits: 603,
            offered: 0
        }
    );
    for (_, store) in &daemons {
        assert_streams_carried(store, &files, 603);
    }
}

/// A push to a target the cache knows encodes what it will likely send ahead, into the memo,
/// and the push takes those payloads: every needed payload is encoded exactly once, and the
/// release arrives as pushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_a_known_target_encodes_its_likely_files_once() {
    let mut k = keys();
    let (t, store) = shop_daemon(&mut k);
    let tmp = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(&tmp.path().join("cache")).unwrap());
    let src = tmp.path().join("src");
    let conn = dial(&k, &t).await.unwrap();
    push(
        &conn,
        &tree(&src, "r1", &release_a()),
        Some(&cache),
        &|_| {},
    )
    .await
    .unwrap();
    conn.close().await;

    let b = tree(&src, "r2", &release_b());
    let memo = Arc::new(PayloadMemo::new(1 << 30, 2));
    let opts = PushOptions {
        cache: Some(Arc::clone(&cache)),
        record: true,
        memo: Some(Arc::clone(&memo)),
        ..PushOptions::default()
    };
    let conn = dial(&k, &t).await.unwrap();
    let pushed = push_with(&conn, &b, &opts, &|_| {}).await.unwrap();
    conn.close().await;
    let s = &pushed.session;
    assert_eq!((s.needed, s.sent_full, s.sent_zstd_ref), (4, 1, 3), "{s:?}");
    assert_eq!(memo.stats().encodes, 4, "{:?}", memo.stats());
    // The files sent as deltas were cached from the plain payloads made while choosing, so
    // the cache compressed nothing after the push; it holds every content of r2.
    let update = pushed.cache.clone().unwrap().unwrap();
    assert_eq!(update.stored_files, 0, "{update:?}");
    for (p, c) in release_b() {
        assert!(cache.contains(&Hash::of(&c)), "{p}");
    }
    let st = store.lock().unwrap();
    for (p, c) in release_b() {
        assert_eq!(st.kept.get(&Hash::of(&c)), Some(&c), "{p}");
    }
}

/// `pre_encode` fills the memo with exactly the payloads the push would encode for the same
/// files, skips what the memo has, and leaves a file it cannot read to the push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoding_ahead_fills_the_memo_with_the_payloads_the_push_would_make() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(&tmp.path().join("cache")).unwrap());
    let src = tmp.path().join("src");
    let a = tree(&src, "r1", &release_a());
    let shop = Target::parse("web1/shop").unwrap();
    cache
        .record(
            &shop,
            &SourceTree::open(&src, Arc::clone(&a.manifest)).unwrap(),
        )
        .unwrap();
    let b = tree(&src, "r2", &release_b());
    let source = Arc::new(SourceTree::open(&src, Arc::clone(&b.manifest)).unwrap());
    let files = likely_sends(&b.manifest, &a.manifest, &cache.hashes().unwrap());
    assert!(files.len() >= 2, "{files:?}");
    // The last one cannot be read any more.
    let gone = files[files.len() - 1].path.clone();
    std::fs::remove_file(src.join(gone.as_str())).unwrap();
    let memo = Arc::new(PayloadMemo::new(1 << 30, 2));
    // One of them is in the memo already.
    let first = files[0].clone();
    let held = driver::pre_encode(
        Arc::clone(&source),
        Some(Arc::clone(&cache)),
        Arc::clone(&memo),
        vec![first.clone()],
    );
    held.join_all().await;
    let mut tasks = driver::pre_encode(
        Arc::clone(&source),
        Some(Arc::clone(&cache)),
        Arc::clone(&memo),
        files.clone(),
    );
    while tasks.join_next().await.is_some() {}
    let readable: Vec<_> = files.iter().filter(|f| f.path != gone).collect();
    assert_eq!(memo.stats().encodes, readable.len() as u64, "{files:?}");
    for f in &files {
        let want = source.encode(f, Some(&cache));
        match memo.claim(memo::Key::of(f)) {
            memo::Claim::Ready(p) => {
                let want = want.unwrap();
                assert_eq!(
                    (p.format, &p.bytes),
                    (want.header.format, &want.payload),
                    "{}",
                    f.path
                );
            }
            memo::Claim::Encode(_) => assert!(want.is_err(), "{} was not encoded", f.path),
            memo::Claim::Busy(_) => panic!("{} is still being encoded", f.path),
        }
    }
}

/// `encode_files` reads files in groups that share one encoder: across group boundaries, every
/// file gets the payload it would get alone, in order, and one that cannot be read gets its
/// error in its place without stopping the others.
#[test]
fn encoding_in_groups_gives_each_file_its_own_payload_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(&tmp.path().join("cache")).unwrap();
    let src = tmp.path().join("src");
    // Twelve files of 1.5 MB and their bases: more than two groups' worth.
    let release: Vec<(&'static str, Vec<u8>)> = (0..12)
        .map(|i| {
            let name: &'static str = Box::leak(format!("lib/L{i:02}.php").into_boxed_str());
            (name, php(50 + i, 1_500_000))
        })
        .chain(release_a())
        .collect();
    let a = tree(&src, "r1", &release);
    let shop = Target::parse("web1/shop").unwrap();
    cache
        .record(
            &shop,
            &SourceTree::open(&src, Arc::clone(&a.manifest)).unwrap(),
        )
        .unwrap();
    let edited: Vec<(&'static str, Vec<u8>)> = release
        .iter()
        .map(|(p, c)| {
            let mut c = c.clone();
            let at = c.len() / 3;
            c.splice(at..at, b"// edited\n".iter().copied());
            (*p, c)
        })
        .collect();
    let b = tree(&src, "r2", &edited);
    let source = SourceTree::open(&src, Arc::clone(&b.manifest)).unwrap();
    let files = likely_sends(&b.manifest, &a.manifest, &cache.hashes().unwrap());
    assert!(files.len() >= 40, "{}", files.len());
    assert!(
        files
            .iter()
            .filter(|f| matches!(f.method, Method::ZstdRef { .. }))
            .count()
            >= 40
    );
    let gone = files[7].path.clone();
    std::fs::remove_file(src.join(gone.as_str())).unwrap();
    let refs: Vec<&SendFile> = files.iter().collect();
    let got = driver::encode_files(&source, Some(&cache), &refs);
    assert_eq!(got.len(), files.len());
    for (f, got) in files.iter().zip(got) {
        match (got, source.encode(f, Some(&cache))) {
            (Ok(p), Ok(want)) => {
                assert_eq!(p.format, want.header.format, "{}", f.path);
                assert!(p.bytes == want.payload, "{}: the payloads differ", f.path);
                assert_eq!(p.format, DeltaFormat::ZstdRef, "{}", f.path);
            }
            (Err(e), Err(_)) => assert_eq!(f.path, gone, "{e}"),
            (got, want) => panic!("{}: {:?} against {:?}", f.path, got.err(), want.err()),
        }
    }
}

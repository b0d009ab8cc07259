//! Forwarding a release to the daemons below this one in a relay tree, while it arrives.
//!
//! As soon as this daemon knows the manifest of a relayed push, it becomes a client too: it
//! pushes the same release to each child of its relay plan (all children at once), over its own
//! QUIC connections, presenting its daemon key and, in the push, the ticket the originating
//! client signed for that key. The files it sends come from a [`RelayContent`]: the release once
//! built, the object store while payloads arrive (an object appears only once verified), or a
//! kept release that already held the content. A file a child needs that is not here yet is
//! waited for, so each file travels on as soon as this daemon has it (pipelined at file
//! granularity: depth adds latency, not transfer time). Each child gets its own part of the plan
//! and reports back in turn, so the answer to the source names every node below.
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sync_core::edge::object::ObjectStore;
use sync_core::edge::root::AppRoot;
use sync_core::layout;
use sync_core::manifest::{Hash, Manifest};
use sync_core::path::RelPath;
use sync_core::relay::{RelayPlan, Relayed};
use sync_core::wire::AppName;
use sync_core::ReleaseId;
use tokio::task::JoinSet;

use crate::client::cache::MAX_CACHED_FILE;
use crate::client::{self, Locate, PayloadMemo, PushOptions, PushRequest, Target};
use crate::fleet::driver::chain;
use crate::net::NetConfig;
use crate::tls::{ticket, Fingerprint, Identity};

/// Longest wait for a child daemon to answer a connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Payload bytes the children's pushes keep to share with each other.
const MEMO_BUDGET: u64 = 64 << 20;
/// Payload memory (KiB) of all child pushes together; a daemon also receives meanwhile.
const MEMORY_TOTAL_KIB: u32 = 128 * 1024;
/// Smallest payload memory (KiB) of one child push.
const MEMORY_MIN_KIB: u32 = 16 * 1024;

/// What a daemon needs to push as a client.
#[derive(Debug)]
pub(super) struct Relayer {
    pub(super) identity: Arc<Identity>,
    pub(super) net: NetConfig,
}

/// One release to forward.
pub(super) struct Forward {
    pub(super) app: AppName,
    pub(super) release: ReleaseId,
    pub(super) manifest: Arc<Manifest>,
    /// Where the release's complete directory will be (named in messages too).
    pub(super) dir: PathBuf,
    pub(super) plan: RelayPlan,
    pub(super) content: Arc<RelayContent>,
    /// Keys the app authorizes: a child's ticket must be signed by one of them.
    pub(super) authorized: HashSet<Fingerprint>,
    /// Payloads for the children, shared between them; the connection offers it what it
    /// receives, so a child on the same basis gets those bytes as they came.
    pub(super) memo: Arc<PayloadMemo>,
}

/// A [`Forward`] with the digest the children's tickets must name.
struct Checked {
    f: Forward,
    digest: Hash,
}

impl std::ops::Deref for Checked {
    type Target = Forward;
    fn deref(&self) -> &Forward {
        &self.f
    }
}

/// Where the content of the release being forwarded is, or will be.
#[derive(Debug)]
pub(super) struct RelayContent {
    release_dir: PathBuf,
    objects: ObjectStore,
    /// Files of kept releases by content.
    kept: HashMap<Hash, Vec<PathBuf>>,
    /// One file of a kept release per content, with its size: the bases this daemon can encode
    /// zstd-reference deltas against, for a child that holds the same release.
    bases: HashMap<Hash, (PathBuf, u64)>,
    /// The contents of `bases`, as the children's pushes take them.
    held: Arc<HashSet<Hash>>,
    /// The encoded manifest of this daemon's current release: a child on the same release gets
    /// the new manifest as a delta against it.
    manifest_basis: Option<Arc<[u8]>>,
    /// Set when this daemon's own push failed: the content will not come.
    given_up: Arc<AtomicBool>,
}

impl RelayContent {
    /// Indexes what `root` holds of `manifest` (run on the blocking pool: it reads records).
    pub(super) fn new(
        root: &AppRoot,
        release: &ReleaseId,
        manifest: &Manifest,
        given_up: Arc<AtomicBool>,
    ) -> Result<RelayContent, String> {
        let releases = root.path().join(layout::RELEASES);
        let objects = ObjectStore::open(root).map_err(|e| e.to_string())?;
        let wanted: std::collections::HashSet<&Hash> =
            manifest.files().map(|(_, _, _, h)| h).collect();
        let mut kept: HashMap<Hash, Vec<PathBuf>> = HashMap::new();
        let mut bases: HashMap<Hash, (PathBuf, u64)> = HashMap::new();
        let records = root.records().map_err(|e| e.to_string())?;
        for r in records.iter().filter(|r| r.id != *release) {
            for (path, size, _, hash) in r.manifest.files() {
                let p = releases.join(r.id.as_str()).join(path.as_str());
                if wanted.contains(hash) {
                    kept.entry(*hash).or_default().push(p.clone());
                }
                // A larger basis is read whole into memory for the delta: those go by rsync
                // delta, as from a client whose cache leaves them out.
                if size <= MAX_CACHED_FILE {
                    bases.entry(*hash).or_insert((p, size));
                }
            }
        }
        let current = root.current().map_err(|e| e.to_string())?;
        let manifest_basis = records
            .iter()
            .find(|r| Some(&r.id) == current.as_ref() && r.id != *release)
            .map(|r| r.manifest.encode());
        Ok(RelayContent {
            release_dir: releases.join(release.as_str()),
            objects,
            kept,
            held: Arc::new(bases.keys().copied().collect()),
            bases,
            manifest_basis,
            given_up,
        })
    }
}

impl Locate for RelayContent {
    fn open(&self, path: &RelPath, hash: &Hash, mode: u32) -> Option<File> {
        // Every candidate is checked against the manifest's hash by the reader; one that fails
        // (a kept file edited in place) fails that file, and the source pushes the host directly.
        File::open(self.release_dir.join(path.as_str()))
            .ok()
            .or_else(|| self.objects.open_object(hash, mode))
            .or_else(|| self.kept.get(hash)?.iter().find_map(|p| File::open(p).ok()))
    }

    fn given_up(&self) -> bool {
        self.given_up.load(Ordering::Relaxed)
    }

    fn basis(&self, hash: &Hash, size: u64) -> Option<Vec<u8>> {
        // The size comes from the child's need: only the recorded one is read (and allocated).
        let (path, recorded) = self.bases.get(hash)?;
        if *recorded != size {
            return None;
        }
        let mut bytes = Vec::with_capacity(usize::try_from(size).ok()?);
        File::open(path)
            .ok()?
            .take(size.saturating_add(1))
            .read_to_end(&mut bytes)
            .ok()?;
        // A kept file edited in place since it was recorded is no basis: the delta would not
        // rebuild the child's content. Sending the file in full is always right.
        (bytes.len() as u64 == size && Hash::of(&bytes) == *hash).then_some(bytes)
    }
}

/// The memo of a [`Forward`]: children with the same basis get the same payloads, encoded once
/// (as for a fleet push) or taken as this daemon received them.
pub(super) fn memo() -> Arc<PayloadMemo> {
    let cores = std::thread::available_parallelism().map_or(2, |c| c.get());
    Arc::new(PayloadMemo::new(MEMO_BUDGET, cores))
}

/// Pushes `f.release` to every child of `f.plan` at once; returns a report for every node of the
/// plan, in plan order.
pub(super) async fn forward(relayer: Arc<Relayer>, f: Forward) -> Vec<Relayed> {
    let digest = f.manifest.digest();
    let f = Arc::new(Checked { f, digest });
    let children = f.plan.children();
    // Children with the same basis get the same payloads: encoded once, as for a fleet push.
    let memo = Arc::clone(&f.memo);
    let memory_kib = (MEMORY_TOTAL_KIB / u32::try_from(children.len().max(1)).unwrap_or(u32::MAX))
        .max(MEMORY_MIN_KIB);
    let mut tasks = JoinSet::new();
    for child in children {
        let (relayer, f, memo) = (Arc::clone(&relayer), Arc::clone(&f), Arc::clone(&memo));
        tasks.spawn(async move { push_child(&relayer, &f, child, memo, memory_kib).await });
    }
    let mut reports: Vec<Option<Relayed>> = vec![None; f.plan.nodes.len()];
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(list) => {
                for r in list {
                    if let Some(slot) = reports.get_mut(r.node as usize) {
                        *slot = Some(r);
                    }
                }
            }
            Err(e) => tracing::warn!("a relay task failed: {e}"),
        }
    }
    let stats = f.memo.stats();
    tracing::info!(
        encoded = stats.encodes,
        as_received = stats.offered,
        shared = stats.hits,
        "payloads for the children"
    );
    reports
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|| {
                Relayed::new(
                    index(i),
                    Some("the relay lost track of this host; push to it directly".into()),
                )
            })
        })
        .collect()
}

fn index(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

/// Pushes to `child` with its part of the plan; reports it and every node below it.
async fn push_child(
    relayer: &Relayer,
    f: &Checked,
    child: usize,
    memo: Arc<PayloadMemo>,
    memory_kib: u32,
) -> Vec<Relayed> {
    let node = &f.plan.nodes[child];
    let (sub, map) = f.plan.subtree(child);
    let result = async {
        // Only a child the client itself named, in a ticket for this daemon's key, is dialed:
        // whoever sent the plan cannot make this daemon connect anywhere else.
        let expect = ticket::Expected {
            app: &f.app,
            release: &f.release,
            manifest_digest: &f.digest,
            peer: relayer.identity.fingerprint(),
            authorized: &f.authorized,
        };
        ticket::verify(&node.ticket, &expect)
            .map_err(|e| format!("not relayed to {}: {e}", node.host))?;
        let target = Target::parse(&format!("{}/{}", node.host, f.app)).map_err(|e| chain(&e))?;
        let conn = client::connect_pinned(
            &target,
            &relayer.identity,
            Some(Fingerprint::from(node.key)),
            &relayer.net,
            CONNECT_TIMEOUT,
        )
        .await
        .map_err(|e| chain(&e))?;
        let req = PushRequest {
            release: f.release.clone(),
            manifest: Arc::clone(&f.manifest),
            source: f.dir.clone(),
            activate: false,
        };
        let locate: Arc<dyn Locate> = Arc::clone(&f.content) as Arc<dyn Locate>;
        let opts = PushOptions {
            relay: Some(sub),
            locate: Some(locate),
            cached: Some(Arc::clone(&f.content.held)),
            manifest_basis: f.content.manifest_basis.clone(),
            memo: Some(memo),
            memory_kib: Some(memory_kib),
            ..PushOptions::default()
        };
        let pushed = client::push_with(&conn, &req, &opts, &|_| {}).await;
        conn.close().await;
        pushed.map_err(|e| chain(&e))
    }
    .await;
    let mut out = Vec::with_capacity(map.len() + 1);
    match result {
        Ok(report) => {
            tracing::info!(
                child = %node.host,
                bytes = report.session.payload_bytes,
                full = report.sent_bytes.full,
                zstd_ref = report.sent_bytes.zstd_ref,
                rsync = report.sent_bytes.rsync,
                "relayed the release"
            );
            out.push(Relayed::staged(
                index(child),
                report.session.staged.previous.clone(),
            ));
            let mut seen = vec![false; map.len()];
            for r in report.session.staged.relayed {
                // A child reports on its own plan's numbering; anything outside it is ignored.
                if let Some(&ours) = map.get(r.node as usize) {
                    seen[r.node as usize] = true;
                    let mut rel = Relayed::new(index(ours), r.error);
                    rel.previous = r.previous;
                    out.push(rel);
                }
            }
            for (i, &ours) in map.iter().enumerate() {
                if !seen[i] {
                    out.push(Relayed::new(
                        index(ours),
                        Some(format!("relay {} did not report this host", node.host)),
                    ));
                }
            }
        }
        Err(e) => {
            tracing::warn!(child = %node.host, "relaying the release failed: {e}");
            out.push(Relayed::new(index(child), Some(e)));
            for &ours in &map {
                out.push(Relayed::new(
                    index(ours),
                    Some(format!("not reached: relay {} failed", node.host)),
                ));
            }
        }
    }
    out
}

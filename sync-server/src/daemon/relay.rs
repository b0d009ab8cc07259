//! Forwarding a staged release to the daemons below this one in a relay tree.
//!
//! Once this daemon has built the release a relayed push asked for, it becomes a client: it
//! pushes the same release, read from its own complete release directory, to each child of its
//! relay plan (all children at once), over its own QUIC connections, presenting its daemon key
//! and, in the push, the ticket the originating client signed for that key. Each child gets its
//! own part of the plan and reports back in turn, so the answer to the source names every node
//! below. Forwarding starts only after this daemon has staged (store-and-forward): each level of
//! the tree adds one transfer time.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sync_core::manifest::Manifest;
use sync_core::relay::{RelayPlan, Relayed};
use sync_core::wire::AppName;
use sync_core::ReleaseId;
use tokio::task::JoinSet;

use crate::client::{self, PushOptions, PushRequest, Target};
use crate::fleet::driver::chain;
use crate::net::NetConfig;
use crate::tls::{Fingerprint, Identity};

/// Longest wait for a child daemon to answer a connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The complete release directory this daemon built.
    pub(super) dir: PathBuf,
    pub(super) plan: RelayPlan,
}

/// Pushes `f.release` to every child of `f.plan` at once; returns a report for every node of the
/// plan, in plan order.
pub(super) async fn forward(relayer: Arc<Relayer>, f: Forward) -> Vec<Relayed> {
    let f = Arc::new(f);
    let mut tasks = JoinSet::new();
    for child in f.plan.children() {
        let (relayer, f) = (Arc::clone(&relayer), Arc::clone(&f));
        tasks.spawn(async move { push_child(&relayer, &f, child).await });
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
async fn push_child(relayer: &Relayer, f: &Forward, child: usize) -> Vec<Relayed> {
    let node = &f.plan.nodes[child];
    let (sub, map) = f.plan.subtree(child);
    let result = async {
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
        let opts = PushOptions {
            relay: Some(sub),
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
                "relayed the release"
            );
            out.push(Relayed::new(index(child), None));
            let mut seen = vec![false; map.len()];
            for r in report.session.staged.relayed {
                // A child reports on its own plan's numbering; anything outside it is ignored.
                if let Some(&ours) = map.get(r.node as usize) {
                    seen[r.node as usize] = true;
                    out.push(Relayed::new(index(ours), r.error));
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

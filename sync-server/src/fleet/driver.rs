//! Carries out a [`Rollout`] (and the other fleet commands) over QUIC, many hosts at once.
//!
//! Every host runs in its own task, at most `fanout` at a time, each step under the per-host
//! deadline, so an unreachable or stuck host only ever costs its own slot. The decisions are the
//! rollout's; this module connects (pinning each daemon to its fleet-file key), runs the client
//! functions, turns their errors into report lines and feeds the results back.
//!
//! Staging one host is one connection: the push without activation, whose `Staged` answer also
//! says which release the host ran before (the one a failing wave returns it to; a relay passes
//! on the same for each host it fed). A host whose daemon refused the push is asked what it runs
//! at the end, with the hosts whose state an activation left in doubt. All pushes share one
//! [`PayloadMemo`] (hosts with the same basis get the same bytes, encoded once) and one listing of
//! the client cache; the cache is updated once for every host that staged, after staging. Each
//! activation asks the daemon to prune the host to its app's `keep` in the same request, as a
//! single push does, so pruning costs no connection of its own.

use std::collections::{HashMap, HashSet};
use std::error::Error as StdError;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sync_core::manifest::Hash;
use sync_core::proto::client::Outcome;
use sync_core::relay::{RelayNode, RelayPlan};
use sync_core::wire::{Command, ErrorKind, Pruning, ReleaseInfo, ReleaseStatus};
use sync_core::ReleaseId;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::rollout::{Action, RolloutReport, Staged, Step, StepResult};
use super::select::{Selected, Selection};
use super::tree::{self, Tree};
use super::Rollout;
use crate::client::{
    self, Cache, CacheUpdate, ClientError, Connection, MemoStats, NeedReport, PayloadMemo,
    Progress, PushOptions, PushRequest, RateLimit, SourceTree,
};
use crate::net::NetConfig;
use crate::tls::ticket::{self, TicketError};
use crate::tls::Identity;

/// Payload bytes the memo keeps for pushes to catch up with each other.
const MEMO_BUDGET: u64 = 256 << 20;
/// Payload memory (KiB) of all concurrent pushes together; each gets its share.
const MEMORY_TOTAL_KIB: u32 = 1024 * 1024;
/// Pause before pushing again to a host busy with the push of a relay that failed.
const BUSY_RETRY: Duration = Duration::from_secs(1);
/// Smallest per-push payload memory (KiB), whatever the fan-out.
const MEMORY_MIN_KIB: u32 = 32 * 1024;

/// How the fleet is driven.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Hosts worked on at once.
    pub fanout: usize,
    /// Longest a host may take for one step (staging, activating, rolling back, a query).
    pub host_timeout: Duration,
    /// Longest wait for a daemon to answer a connection attempt.
    pub connect_timeout: Duration,
    pub net: NetConfig,
    /// `--bwlimit`: bytes per second the source sends to all hosts together.
    pub bwlimit: Option<u64>,
    /// `--relay`: stage through a relay tree of fan-out `fanout` (the source sends to
    /// `source_fanout` hosts, each forwards to `fanout` more) when there are more hosts than the
    /// source sends to.
    pub relay: bool,
    /// Hosts the source itself sends to in a relay tree (default: `fanout`).
    pub source_fanout: Option<usize>,
}

impl FleetOptions {
    /// Hosts the source sends to in a relay tree.
    fn roots(&self) -> usize {
        self.source_fanout.unwrap_or(self.fanout).max(1)
    }
}

impl Default for FleetOptions {
    fn default() -> FleetOptions {
        FleetOptions {
            fanout: 16,
            host_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(10),
            net: fleet_net(),
            bwlimit: None,
            relay: false,
            source_fanout: None,
        }
    }
}

/// Transport settings for fleet commands: a dead host is given up after 10 s of silence rather
/// than 30 (keep-alives every 2 s keep a live but busy daemon's connection open).
pub fn fleet_net() -> NetConfig {
    NetConfig {
        idle_timeout: Duration::from_secs(10),
        keep_alive_interval: Some(Duration::from_secs(2)),
        ..NetConfig::default()
    }
}

/// Something that happened on one host, for progress display.
#[derive(Debug, Clone)]
pub enum Event {
    /// A step started on a host.
    Begin { host: usize, step: Step },
    /// Progress of a host's push.
    Push { host: usize, progress: Progress },
    /// A step ended on a host.
    End {
        host: usize,
        step: Step,
        result: StepResult,
    },
    /// Activation of wave `wave` (of `waves`), with `hosts` hosts, starts.
    Wave {
        wave: usize,
        waves: usize,
        hosts: usize,
    },
}

/// Callback for [`Event`]s; called from several tasks.
pub type OnEvent = Arc<dyn Fn(Event) + Send + Sync>;

/// What a fleet push did.
#[derive(Debug, Clone)]
pub struct FleetReport {
    pub rollout: RolloutReport,
    /// Milliseconds each host spent, over all its steps.
    pub millis: Vec<u64>,
    /// Releases removed after activation beyond the app's `keep`, per host that activated (also
    /// one a failing wave later rolled back: the prune had happened by then).
    pub pruned: Vec<Option<Result<Vec<ReleaseId>, String>>>,
    /// What the client cache did (`None` without a cache or when nothing staged).
    pub cache: Option<Result<CacheUpdate, String>>,
    pub memo: MemoStats,
}

/// What every task of a fleet command shares.
struct Ctx {
    hosts: Vec<Selected>,
    identity: Arc<Identity>,
    opts: FleetOptions,
    on_event: OnEvent,
}

impl Ctx {
    async fn connect(&self, host: usize) -> Result<Connection, ClientError> {
        self.connect_with(host, &self.opts.net).await
    }

    /// A connection for one short command (activate, releases, rollback): no path MTU probes,
    /// which would be most of the bytes it sends, and with many hosts most of what the source
    /// sends for a patch.
    async fn connect_for_command(&self, host: usize) -> Result<Connection, ClientError> {
        let net = NetConfig {
            mtu_discovery: false,
            ..self.opts.net.clone()
        };
        self.connect_with(host, &net).await
    }

    async fn connect_with(&self, host: usize, net: &NetConfig) -> Result<Connection, ClientError> {
        let h = &self.hosts[host];
        client::connect_pinned(
            &h.target,
            &self.identity,
            Some(h.host.key),
            net,
            self.opts.connect_timeout,
        )
        .await
    }

    /// Runs one command on `host` on its own connection.
    async fn command(&self, host: usize, cmd: Command) -> Result<Outcome, String> {
        let conn = self
            .connect_for_command(host)
            .await
            .map_err(|e| chain(&e))?;
        let outcome = client::command(&conn, cmd).await;
        conn.close().await;
        outcome.map_err(|e| chain(&e))
    }

    /// What `host` runs now.
    async fn current(&self, host: usize) -> Result<Option<ReleaseId>, String> {
        match self.command(host, Command::Releases).await? {
            Outcome::Releases(list) => Ok(current_of(&list)),
            o => Err(unexpected(&o)),
        }
    }
}

/// The release `list` marks current.
pub fn current_of(list: &[ReleaseInfo]) -> Option<ReleaseId> {
    list.iter()
        .find(|r| r.status == ReleaseStatus::Current)
        .map(|r| r.id.clone())
}

fn unexpected(o: &Outcome) -> String {
    format!("the daemon answered with an unexpected {o:?}")
}

/// An error and its causes on one line, each cause once.
pub fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut text = String::new();
    let mut cur = Some(e);
    while let Some(c) = cur {
        let s = c.to_string();
        if !text.contains(&s) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&s);
        }
        cur = c.source();
    }
    text
}

/// Runs `f` for every host in `hosts`, at most `fanout` at once, each under `deadline`.
async fn each<T, F, Fut>(
    ctx: &Arc<Ctx>,
    hosts: &[usize],
    deadline: Duration,
    f: F,
) -> Vec<(usize, Result<T, String>)>
where
    T: Send + 'static,
    F: Fn(Arc<Ctx>, usize) -> Fut,
    Fut: Future<Output = Result<T, String>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(ctx.opts.fanout.max(1)));
    let mut tasks = JoinSet::new();
    for &host in hosts {
        let work = f(Arc::clone(ctx), host);
        let slots = Arc::clone(&slots);
        tasks.spawn(async move {
            let _slot = slots.acquire_owned().await;
            let r = match tokio::time::timeout(deadline, work).await {
                Ok(r) => r,
                Err(_) => Err(format!(
                    "no result within {} s (--host-timeout); the host was given up",
                    deadline.as_secs()
                )),
            };
            (host, r)
        });
    }
    let mut out = Vec::with_capacity(hosts.len());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(r) => out.push(r),
            Err(e) => tracing::warn!("a fleet task failed: {e}"),
        }
    }
    out.sort_by_key(|(h, _)| *h);
    out
}

/// Pushes `req` to every host of `sel`: stages everywhere, then (with `req.activate`) activates
/// wave by wave as the rollout decides.
pub async fn push(
    sel: &Selection,
    identity: Arc<Identity>,
    req: &PushRequest,
    cache: Option<Arc<Cache>>,
    opts: &FleetOptions,
    on_event: OnEvent,
) -> FleetReport {
    let ctx = Arc::new(Ctx {
        hosts: sel.hosts.clone(),
        identity,
        opts: opts.clone(),
        on_event,
    });
    let n = ctx.hosts.len();
    let mut rollout = Rollout::new(
        req.release.clone(),
        n,
        sel.settings.waves.clone(),
        sel.settings.max_failed,
        req.activate,
    );
    let cores = std::thread::available_parallelism().map_or(2, |c| c.get());
    let memo = Arc::new(PayloadMemo::new(MEMO_BUDGET, cores));
    let cached = match &cache {
        Some(c) => {
            let c = Arc::clone(c);
            match tokio::task::spawn_blocking(move || c.hashes()).await {
                Ok(Ok(h)) => Some(Arc::new(h)),
                Ok(Err(e)) => {
                    tracing::warn!("{e}; pushing without the cache");
                    None
                }
                Err(_) => None,
            }
        }
        None => None,
    };
    let fanout = u32::try_from(opts.fanout.max(1)).unwrap_or(u32::MAX);
    let push_opts = PushOptions {
        cache: cached.as_ref().and(cache.clone()),
        record: false,
        cached: Some(cached.clone().unwrap_or_default()),
        memo: Some(Arc::clone(&memo)),
        memory_kib: Some((MEMORY_TOTAL_KIB / fanout).max(MEMORY_MIN_KIB)),
        rate: opts.bwlimit.map(|r| Arc::new(RateLimit::new(r))),
        relay: None,
        locate: None,
        manifest_basis: None,
        basis_manifest: None,
        packed_manifest: None,
    };
    let staged_req = Arc::new(PushRequest {
        activate: false,
        ..req.clone()
    });
    let mut millis = vec![0u64; n];
    let mut pruned = vec![None; n];
    // Hosts whose daemon refused the push: alive, running what they ran, which only a query
    // tells (a push that fails says nothing of it).
    let mut ask_after = Vec::new();
    let mut recording = None;
    loop {
        match rollout.next_action() {
            Action::Stage(hosts) => {
                let results = if opts.relay && hosts.len() > opts.roots() {
                    stage_relayed(&ctx, &hosts, &staged_req, &push_opts).await
                } else {
                    each(&ctx, &hosts, opts.host_timeout, |ctx, host| {
                        let (req, push_opts) = (Arc::clone(&staged_req), push_opts.clone());
                        async move { stage(&ctx, host, &req, &push_opts, false).await }
                    })
                    .await
                };
                let mut staged_targets = Vec::new();
                for (host, r) in results {
                    let (result, refused, ms) = r.unwrap_or_else(|e| (Err(e), false, 0));
                    millis[host] += ms;
                    (ctx.on_event)(Event::End {
                        host,
                        step: Step::Stage,
                        result: result.as_ref().map(|_| ()).map_err(Clone::clone),
                    });
                    if result.is_ok() {
                        staged_targets.push(ctx.hosts[host].target.clone());
                    }
                    if refused {
                        ask_after.push(host);
                    }
                    rollout.staged(host, result);
                }
                if let (Some(c), false) = (&cache, staged_targets.is_empty()) {
                    recording = Some(record(Arc::clone(c), req, staged_targets));
                }
            }
            Action::Activate { wave, hosts } => {
                (ctx.on_event)(Event::Wave {
                    wave,
                    waves: rollout.report().waves.len(),
                    hosts: hosts.len(),
                });
                let release = req.release.clone();
                let results = each(&ctx, &hosts, opts.host_timeout, |ctx, host| {
                    let release = release.clone();
                    async move { Ok(activate(&ctx, host, &release).await) }
                })
                .await;
                for (host, r) in results {
                    let (result, daemon_said, ms, prune) = r.unwrap_or_else(|e| {
                        (Err(e), false, opts.host_timeout.as_millis() as u64, None)
                    });
                    millis[host] += ms;
                    if let Some(Err(e)) = &prune {
                        tracing::warn!("{}: {e}", ctx.hosts[host].target);
                    }
                    pruned[host] = prune;
                    (ctx.on_event)(Event::End {
                        host,
                        step: Step::Activate,
                        result: result.clone(),
                    });
                    // A daemon that refused the activation put the previous release back; a
                    // lost connection (or a host with no previous release to go back to) leaves
                    // the host's state unknown until asked.
                    let current = rollout
                        .previous(host)
                        .filter(|_| daemon_said)
                        .map(|p| Some(p.clone()));
                    rollout.activated(host, result, current);
                }
            }
            Action::Rollback { hosts, .. } => {
                let targets: Vec<(usize, Option<ReleaseId>)> = hosts
                    .iter()
                    .map(|&h| (h, rollout.previous(h).cloned()))
                    .collect();
                let results = each(&ctx, &hosts, opts.host_timeout, |ctx, host| {
                    let to = targets
                        .iter()
                        .find(|(h, _)| *h == host)
                        .and_then(|(_, p)| p.clone());
                    let release = req.release.clone();
                    async move { Ok(rollback_one(&ctx, host, to, &release).await) }
                })
                .await;
                for (host, r) in results {
                    let (result, ms) = r.unwrap_or_else(|e| (Err(e), 0));
                    millis[host] += ms;
                    (ctx.on_event)(Event::End {
                        host,
                        step: Step::Rollback,
                        result: result.clone(),
                    });
                    rollout.rolled_back(host, result);
                }
            }
            Action::Done => break,
        }
    }
    // Ask the hosts whose live release is in doubt (a lost connection during activation or
    // rollback, a refused push) what they run now.
    let report = rollout.report();
    let doubtful: Vec<usize> = (0..n)
        .filter(|&h| {
            let r = &report.hosts[h];
            r.current.is_none()
                && (r.activate.is_some() || r.rollback.is_some() || ask_after.contains(&h))
        })
        .collect();
    if !doubtful.is_empty() {
        let asked = each(
            &ctx,
            &doubtful,
            opts.host_timeout.min(Duration::from_secs(30)),
            |ctx, host| async move { ctx.current(host).await },
        )
        .await;
        for (host, r) in asked {
            match r {
                Ok(current) => rollout.observed(host, current),
                Err(e) => tracing::debug!("{}: {e}", ctx.hosts[host].target),
            }
        }
    }
    let cache = match recording {
        Some(task) => Some(task.await.unwrap_or_else(|e| Err(e.to_string()))),
        None => None,
    };
    FleetReport {
        rollout: rollout.report(),
        millis,
        pruned,
        cache,
        memo: memo.stats(),
    }
}

/// What staging one host did: the result, whether its daemon refused the push (so it is alive
/// and still runs what it ran, worth asking what that is) and the time taken.
type StageResult = (Result<Staged, String>, bool, u64);

/// Whether `e` is the daemon's own refusal of a push, rather than a lost or failed connection.
fn refused(e: &ClientError) -> bool {
    matches!(e, ClientError::Session { .. })
}

/// Stages `req` on `host`: pushes without activating; the daemon's answer says what the host
/// ran before.
async fn stage(
    ctx: &Ctx,
    host: usize,
    req: &PushRequest,
    push_opts: &PushOptions,
    retry_busy: bool,
) -> Result<StageResult, String> {
    let started = Instant::now();
    (ctx.on_event)(Event::Begin {
        host,
        step: Step::Stage,
    });
    let ms = || started.elapsed().as_millis() as u64;
    let pushed = loop {
        let conn = match ctx.connect(host).await {
            Ok(c) => c,
            Err(e) => return Ok((Err(chain(&e)), false, ms())),
        };
        let on_event = Arc::clone(&ctx.on_event);
        let pushed = client::push_with(&conn, req, push_opts, &move |p| {
            on_event(Event::Push { host, progress: p })
        })
        .await;
        conn.close().await;
        match pushed {
            // The host still serves the push of a relay that died; it gives that up after its
            // message timeout (the per-host deadline bounds the wait).
            Err(ClientError::Session {
                kind: ErrorKind::Busy,
                ..
            }) if retry_busy => tokio::time::sleep(BUSY_RETRY).await,
            other => break other,
        }
    };
    let refused = pushed.as_ref().is_err_and(refused);
    let result = pushed
        .map(|r| Staged {
            previous: r.session.staged.previous.clone(),
            sent_bytes: r.session.payload_bytes,
            millis: ms(),
            phases: r.session.staged.phases.clone(),
            usage: r.session.staged.usage,
            relayed_by: None,
        })
        .map_err(|e| chain(&e));
    Ok((result, refused, ms()))
}

/// Stages `req` through a relay tree: pushes to the roots with the rest of the tree as their
/// relay plans (and a ticket, signed with the client's key, for every relay of the tree), then
/// pushes directly to every host its relay did not report as staged, so only the content such a
/// host still misses is sent. What each host ran before comes back with its report: from a root
/// in its `Staged`, from a relayed host in its relay's `Relayed` entry.
async fn stage_relayed(
    ctx: &Arc<Ctx>,
    hosts: &[usize],
    req: &Arc<PushRequest>,
    push_opts: &PushOptions,
) -> Vec<(usize, Result<StageResult, String>)> {
    let started = Instant::now();
    let timeout = ctx.opts.host_timeout;
    for &host in hosts {
        (ctx.on_event)(Event::Begin {
            host,
            step: Step::Stage,
        });
    }
    let mut out: Vec<(usize, Result<StageResult, String>)> = Vec::new();
    // A host that cannot be reached is found out by its relay's push (or the source's, for a
    // root), and the hosts below it are then pushed to directly, as for any failed relay.
    let tree = Tree::with_roots(hosts.to_vec(), ctx.opts.roots(), ctx.opts.fanout);
    let digest = req.manifest.digest();
    let plans = match relay_plans(ctx, &tree, &req.release, digest) {
        Ok(p) => p,
        Err(e) => {
            // Without tickets nothing can be relayed: every host is pushed to directly.
            tracing::warn!("{e}; pushing to every host directly");
            HashMap::new()
        }
    };
    tracing::info!(
        hosts = tree.roots().len(),
        depth = tree.depth(),
        "relaying the release"
    );
    let roots: Vec<usize> = tree.roots().to_vec();
    let pushed = each(ctx, &roots, timeout, |ctx, root| {
        let (req, mut opts) = (Arc::clone(req), push_opts.clone());
        opts.relay = plans.get(&root).map(|(plan, _)| plan.clone());
        async move {
            let conn = match ctx.connect(root).await {
                Ok(c) => c,
                Err(e) => return Ok((Err(chain(&e)), false)),
            };
            let on_event = Arc::clone(&ctx.on_event);
            let pushed = client::push_with(&conn, &req, &opts, &move |p| {
                on_event(Event::Push {
                    host: root,
                    progress: p,
                })
            })
            .await;
            conn.close().await;
            let refused = pushed.as_ref().is_err_and(refused);
            Ok((pushed.map_err(|e| chain(&e)), refused))
        }
    })
    .await;
    let ms = |t: Instant| t.elapsed().as_millis() as u64;
    let mut staged: HashSet<usize> = HashSet::new();
    // What each relayed host that staged ran before, as its relay reported.
    let mut previous: HashMap<usize, Option<ReleaseId>> = HashMap::new();
    let mut relay_errors: HashMap<usize, String> = HashMap::new();
    for (root, r) in pushed {
        let below = plans.get(&root).map(|(_, hosts)| hosts.as_slice());
        let (r, refused) = r.unwrap_or_else(|e| (Err(e), false));
        match r {
            Ok(report) => {
                staged.insert(root);
                let result = Staged {
                    previous: report.session.staged.previous.clone(),
                    sent_bytes: report.session.payload_bytes,
                    millis: ms(started),
                    relayed_by: None,
                    phases: report.session.staged.phases.clone(),
                    usage: report.session.staged.usage,
                };
                out.push((root, Ok((Ok(result), false, ms(started)))));
                for rel in &report.session.staged.relayed {
                    let Some(&host) = below.and_then(|b| b.get(rel.node as usize)) else {
                        continue;
                    };
                    match &rel.error {
                        None => {
                            staged.insert(host);
                            previous.insert(host, rel.previous.clone());
                        }
                        Some(e) => {
                            relay_errors.insert(host, e.clone());
                        }
                    }
                }
            }
            Err(e) => {
                for &h in below.unwrap_or_default() {
                    relay_errors
                        .insert(h, format!("its relay {} failed", ctx.hosts[root].host.name));
                }
                out.push((root, Ok((Err(e), refused, ms(started)))));
            }
        }
    }
    // Relayed hosts that staged: reported by their relay, fed by it, nothing from the source.
    for (&host, prev) in &previous {
        let result = Staged {
            previous: prev.clone(),
            sent_bytes: 0,
            millis: ms(started),
            relayed_by: tree.parent(host),
            // A relay reports only whether its children staged, not their timings.
            phases: Vec::new(),
            usage: Default::default(),
        };
        out.push((host, Ok((Ok(result), false, ms(started)))));
    }
    // Re-parented to the source: pushed directly; the objects a failed relay already delivered
    // stay on the host, so only what is missing goes out.
    let orphans = tree::orphans(&tree, &staged);
    if !orphans.is_empty() {
        tracing::info!(
            hosts = orphans.len(),
            "pushing directly to hosts their relay did not stage"
        );
        let direct = each(ctx, &orphans, timeout, |ctx, host| {
            let (req, push_opts) = (Arc::clone(req), push_opts.clone());
            async move { stage(&ctx, host, &req, &push_opts, true).await }
        })
        .await;
        for (host, r) in direct {
            let relayed = relay_errors.remove(&host);
            let r = r.map(|(result, prev, t)| {
                let result = result.map_err(|e| match &relayed {
                    Some(why) => format!("relayed push failed ({why}), then the direct push: {e}"),
                    None => e,
                });
                (result, prev, t)
            });
            out.push((host, r));
        }
    }
    out.sort_by_key(|(h, _)| *h);
    out
}

/// Per root of a relay tree: its relay plan, and the host each node of the plan stands for.
type Plans = HashMap<usize, (RelayPlan, Vec<usize>)>;

/// The relay plan of every root of `tree`, with the hosts its nodes stand for (plan order).
fn relay_plans(
    ctx: &Ctx,
    tree: &Tree,
    release: &ReleaseId,
    digest: Hash,
) -> Result<Plans, TicketError> {
    let mut plans = HashMap::new();
    for &root in tree.roots() {
        let below = tree.below(root);
        let mut nodes = Vec::with_capacity(below.len());
        let mut hosts = Vec::with_capacity(below.len());
        let mut index: HashMap<usize, usize> = HashMap::new();
        for (host, parent) in &below {
            let h = &ctx.hosts[*host];
            let relay = ctx.hosts[parent.unwrap_or(root)].host.key;
            let ticket = ticket::sign(&ctx.identity, h.target.app(), release, digest, relay)?;
            let parent = parent.and_then(|p| index.get(&p).copied());
            index.insert(*host, hosts.len());
            nodes.push(RelayNode {
                host: h.target.host_port(),
                key: *h.host.key.as_bytes(),
                parent: parent.and_then(|p| u32::try_from(p).ok()),
                ticket,
            });
            hosts.push(*host);
        }
        plans.insert(
            root,
            (
                RelayPlan {
                    ticket: Vec::new(),
                    nodes,
                },
                hosts,
            ),
        );
    }
    Ok(plans)
}

/// What activating one host did: the result, whether the daemon itself answered (so it ran its
/// pipeline, and on failure put the previous release back), the time taken, and what the prune
/// asked with the activation removed (`None` unless the release went live).
type Activation = (
    StepResult,
    bool,
    u64,
    Option<Result<Vec<ReleaseId>, String>>,
);

/// Activates `release` on `host` and, in the same request, prunes the host's old releases to
/// its app's `keep`.
async fn activate(ctx: &Ctx, host: usize, release: &ReleaseId) -> Activation {
    let started = Instant::now();
    (ctx.on_event)(Event::Begin {
        host,
        step: Step::Activate,
    });
    let ms = || started.elapsed().as_millis() as u64;
    let conn = match ctx.connect_for_command(host).await {
        // Never reached the daemon: nothing changed there.
        Err(e) => return (Err(chain(&e)), true, ms(), None),
        Ok(c) => c,
    };
    let outcome = client::command(
        &conn,
        Command::Activate {
            release: release.clone(),
            prune: true,
        },
    )
    .await;
    conn.close().await;
    match outcome {
        Ok(Outcome::Activated { release: r, pruned }) if &r == release => {
            let pruned = pruned.map(|p| match p {
                Pruning::Removed(ids) => Ok(ids),
                Pruning::Failed(why) => Err(why),
            });
            (Ok(()), true, ms(), pruned)
        }
        Ok(o) => (Err(unexpected(&o)), false, ms(), None),
        Err(e @ ClientError::Session { .. }) => (Err(chain(&e)), true, ms(), None),
        Err(e) => (Err(chain(&e)), false, ms(), None),
    }
}

/// Puts `host` back on `to` (the release it ran before this push).
async fn rollback_one(
    ctx: &Ctx,
    host: usize,
    to: Option<ReleaseId>,
    release: &ReleaseId,
) -> (StepResult, u64) {
    let started = Instant::now();
    (ctx.on_event)(Event::Begin {
        host,
        step: Step::Rollback,
    });
    let Some(to) = to else {
        return (
            Err(format!(
                "the host ran no release before {release}, so there is nothing to go back to; {release} stays live"
            )),
            0,
        );
    };
    let result = match ctx
        .command(
            host,
            Command::Rollback {
                to: Some(to.clone()),
            },
        )
        .await
    {
        Ok(Outcome::Activated { release: r, .. }) if r == to => Ok(()),
        Ok(o) => Err(unexpected(&o)),
        Err(e) => Err(e),
    };
    (result, started.elapsed().as_millis() as u64)
}

/// Adds the release's contents to the cache and records it for every target that staged it.
fn record(
    cache: Arc<Cache>,
    req: &PushRequest,
    targets: Vec<client::Target>,
) -> tokio::task::JoinHandle<Result<CacheUpdate, String>> {
    let (dir, manifest) = (req.source.clone(), Arc::clone(&req.manifest));
    tokio::task::spawn_blocking(move || {
        let source = SourceTree::open(&dir, Arc::clone(&manifest)).map_err(|e| chain(&e))?;
        let stored = cache.store_missing(&source).map_err(|e| chain(&e))?;
        cache
            .commit_all(stored, &targets, &manifest)
            .map_err(|e| chain(&e))
    })
}

fn context(sel: &Selection, identity: Arc<Identity>, opts: &FleetOptions) -> Arc<Ctx> {
    Arc::new(Ctx {
        hosts: sel.hosts.clone(),
        identity,
        opts: opts.clone(),
        on_event: Arc::new(|_| {}),
    })
}

/// Asks every host what it would need for `req`; nothing is sent or staged.
pub async fn dry_run(
    sel: &Selection,
    identity: Arc<Identity>,
    req: &PushRequest,
    cache: Option<Arc<Cache>>,
    opts: &FleetOptions,
) -> Vec<Result<NeedReport, String>> {
    let ctx = context(sel, identity, opts);
    let hosts: Vec<usize> = (0..sel.hosts.len()).collect();
    let req = Arc::new(req.clone());
    each(&ctx, &hosts, opts.host_timeout, |ctx, host| {
        let (req, cache) = (Arc::clone(&req), cache.clone());
        async move {
            let conn = ctx.connect(host).await.map_err(|e| chain(&e))?;
            let need = client::dry_run(&conn, &req, cache.as_ref()).await;
            conn.close().await;
            need.map_err(|e| chain(&e))
        }
    })
    .await
    .into_iter()
    .map(|(_, r)| r)
    .collect()
}

/// The kept releases of every host.
pub async fn releases(
    sel: &Selection,
    identity: Arc<Identity>,
    opts: &FleetOptions,
) -> Vec<Result<Vec<ReleaseInfo>, String>> {
    let ctx = context(sel, identity, opts);
    let hosts: Vec<usize> = (0..sel.hosts.len()).collect();
    each(&ctx, &hosts, opts.host_timeout, |ctx, host| async move {
        match ctx.command(host, Command::Releases).await? {
            Outcome::Releases(list) => Ok(list),
            o => Err(unexpected(&o)),
        }
    })
    .await
    .into_iter()
    .map(|(_, r)| r)
    .collect()
}

/// Runs `command` on every host (`relsync bench --fleet` resets its hosts with it).
pub async fn command(
    sel: &Selection,
    identity: Arc<Identity>,
    command: Command,
    opts: &FleetOptions,
) -> Vec<Result<Outcome, String>> {
    let ctx = context(sel, identity, opts);
    let hosts: Vec<usize> = (0..sel.hosts.len()).collect();
    each(&ctx, &hosts, opts.host_timeout, |ctx, host| {
        let command = command.clone();
        async move { ctx.command(host, command).await }
    })
    .await
    .into_iter()
    .map(|(_, r)| r)
    .collect()
}

/// Rolls every host back to `to`, or to its own previous good release.
pub async fn rollback(
    sel: &Selection,
    identity: Arc<Identity>,
    to: Option<ReleaseId>,
    opts: &FleetOptions,
) -> Vec<Result<ReleaseId, String>> {
    let ctx = context(sel, identity, opts);
    let hosts: Vec<usize> = (0..sel.hosts.len()).collect();
    each(&ctx, &hosts, opts.host_timeout, |ctx, host| {
        let to = to.clone();
        async move {
            match ctx.command(host, Command::Rollback { to }).await? {
                Outcome::Activated { release, .. } => Ok(release),
                o => Err(unexpected(&o)),
            }
        }
    })
    .await
    .into_iter()
    .map(|(_, r)| r)
    .collect()
}

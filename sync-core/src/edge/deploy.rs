//! Deploy, activate, roll back and prune an app root: the pure planner and retention wired to the
//! executor, under the deploy lock, with a journal entry per event.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::activate::{self, ActivationOptions, ActivationReport};
use super::exec::{ContentSource, ExecOptions, ExecStats, ObjectStamps, Stager};
use super::object::ObjectStore;
use super::root::{operator, AppRoot, JournalEntry, LockGuard, Recovery};
use super::EdgeError;
use crate::manifest::{Hash, Manifest};
use crate::path::RelPath;
use crate::plan::{plan_prestage, plan_release_over, Basis, Op, Plan, PlanOptions, Prestaged};
use crate::release::{ReleaseId, ReleaseRecord};
use crate::retention;

/// Releases kept when neither the flag nor the config says otherwise.
pub const DEFAULT_KEEP: usize = 5;

#[derive(Debug, Clone, Default)]
pub struct DeployOptions {
    pub release_id: Option<ReleaseId>,
    pub keep: Option<usize>,
    pub activate: bool,
    /// Shared paths in addition to the app config's.
    pub shared: Vec<RelPath>,
    /// The time of the deploy (for the default id and the record); the edge caller reads the clock.
    pub now_unix: i64,
    /// Link content from the object store (what a push delivered) when no kept release has it.
    pub use_objects: bool,
    pub exec: ExecOptions,
    /// Leave a release whose activation checks fail live (marked bad) instead of going back.
    pub no_rollback: bool,
    /// Build on the prestaged tree of the current release ([`prestage`]) when there is one and
    /// [`ExecOptions::checked_links`] says which of the current release's files are intact.
    pub prestaged: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeployReport {
    pub release: ReleaseId,
    pub previous: Option<ReleaseId>,
    pub summary: crate::plan::Summary,
    pub activated: bool,
    pub pruned: Vec<ReleaseId>,
    pub recovered: Recovery,
    pub exec: ExecStats,
    /// Wall time of planning and of each phase of the build (see [`crate::plan::Op::phase`]).
    pub timings: Vec<crate::wire::PhaseTime>,
    pub manifest_digest: String,
    /// The activation pipeline's steps (when activated).
    pub activation: Option<ActivationReport>,
}

/// Everything a deploy decided before touching anything: the plan and the records it links from.
#[derive(Debug)]
pub struct Prepared {
    pub plan: Plan,
    pub previous: Option<ReleaseId>,
    pub bases: Vec<Arc<ReleaseRecord>>,
    pub seq: u64,
    /// The release whose prestaged tree the plan starts from.
    pub over: Option<ReleaseId>,
}

/// Shared paths from the app config plus `extra`.
pub fn shared_paths(root: &AppRoot, extra: &[RelPath]) -> Result<Vec<RelPath>, EdgeError> {
    shared_paths_of(root, &root.config()?, extra)
}

fn shared_paths_of(
    root: &AppRoot,
    cfg: &super::root::AppConfig,
    extra: &[RelPath],
) -> Result<Vec<RelPath>, EdgeError> {
    let mut v = cfg.shared_paths().map_err(|reason| EdgeError::Config {
        path: root.path().join(".relsync/config.toml"),
        reason,
    })?;
    for p in extra {
        if !v.contains(p) {
            v.push(p.clone());
        }
    }
    Ok(v)
}

/// Plans a deploy of `target` (no changes on disk).
pub fn prepare(
    root: &AppRoot,
    target: &Manifest,
    opts: &DeployOptions,
) -> Result<Prepared, EdgeError> {
    prepare_arriving(root, target, opts, &HashSet::new())
}

/// [`prepare`] for a build that starts while a push still delivers `arriving`: the (content,
/// mode) pairs the object store will hold once every file is in. The plan links them from
/// there and orders the operations that need them last ([`Plan::waits_from`]).
pub fn prepare_arriving(
    root: &AppRoot,
    target: &Manifest,
    opts: &DeployOptions,
    arriving: &HashSet<(Hash, u32)>,
) -> Result<Prepared, EdgeError> {
    let t = std::time::Instant::now();
    let records = root.records()?;
    tracing::debug!(ms = t.elapsed().as_millis() as u64, "records loaded");
    let current = root.current()?;
    let id = match &opts.release_id {
        Some(id) => {
            if records.iter().any(|r| &r.id == id) {
                return Err(EdgeError::ReleaseExists(id.clone()));
            }
            id.clone()
        }
        None => {
            ReleaseId::from_unix_time(opts.now_unix).unique(|c| records.iter().any(|r| &r.id == c))
        }
    };
    let seq = records.iter().map(|r| r.seq).max().map_or(1, |s| s + 1);
    let cfg = root.config()?;
    let keep = opts.keep.or(cfg.keep).unwrap_or(DEFAULT_KEEP).max(1);
    let prune = if opts.activate {
        let mut states = root.states_at(&records, Some(opts.now_unix))?;
        states.push(retention::ReleaseState {
            id: id.clone(),
            seq,
            bad: false,
            recently_bad: false,
        });
        retention::prune_candidates(&states, Some(&id), keep)
    } else {
        Vec::new()
    };
    // Previous release first (it is what the new one most resembles), then the others newest first.
    let mut bases = records;
    bases.sort_by_key(|r| (Some(&r.id) != current.as_ref(), std::cmp::Reverse(r.seq)));
    let shared = shared_paths_of(root, &cfg, &opts.shared)?;
    root.check_shared(&shared)?;
    let basis_refs: Vec<Basis<'_>> = bases
        .iter()
        .map(|r| Basis {
            id: &r.id,
            manifest: &r.manifest,
        })
        .collect();
    let objects = if opts.use_objects {
        // The target's files held as objects or on their way: look the target's files up in
        // the store's listing and the arriving set, both far smaller than the target.
        let mut held = ObjectStore::open(root)?.list()?;
        held.extend(arriving.iter().copied());
        target
            .files()
            .map(|(_, _, mode, h)| (*h, mode))
            .filter(|key| held.contains(key))
            .collect()
    } else {
        Default::default()
    };
    // The prestaged tree of the current release, when the files it links were just checked.
    let checked = current
        .as_ref()
        .and_then(|c| opts.exec.checked_links.get(c).map(|set| (c, set)))
        .filter(|(c, _)| opts.prestaged && root.has_prestage(c));
    let intact = |p: &RelPath| checked.is_some_and(|(_, set)| set.contains(p));
    let over = checked.and_then(|(c, _)| {
        let i = bases.iter().position(|r| &r.id == c)?;
        Some(Prestaged {
            base: basis_refs[i],
            stamps: &bases[i].stamps,
            intact: &intact,
        })
    });
    let plan = plan_release_over(
        &id,
        target,
        &basis_refs,
        &shared,
        &PlanOptions {
            deltas: false,
            activate: opts.activate,
            prune,
            objects,
            umask: super::umask(),
            arriving: arriving.iter().map(|(h, _)| *h).collect(),
        },
        over,
    )?;
    let over = over.map(|o| o.base.id.clone());
    Ok(Prepared {
        plan,
        previous: current,
        bases,
        seq,
        over,
    })
}

/// Content a push is still delivering when its release build starts ([`deploy_arriving`]).
pub struct Arriving<'w> {
    /// The (content, mode) pairs the object store will hold once every file is in.
    pub objects: HashSet<(Hash, u32)>,
    /// Blocks until the build may change the disk (the push goes on), once it is planned;
    /// [`EdgeError::Cancelled`] when it may not (a dry run stops at the need).
    pub start: &'w mut dyn FnMut() -> Result<(), EdgeError>,
    /// Blocks until they are all there, then gives the stamps of the objects this process
    /// verified as it wrote them ([`ExecOptions::object_stamps`]); [`EdgeError::Cancelled`]
    /// when they never will be (the push ended first).
    pub wait: &'w mut dyn FnMut() -> Result<ObjectStamps, EdgeError>,
}

/// Builds, verifies and (optionally) activates a new release of `target`.
pub fn deploy(
    root: &AppRoot,
    lock: &LockGuard,
    target: &Manifest,
    source: &dyn ContentSource,
    opts: &DeployOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<DeployReport, EdgeError> {
    deploy_inner(root, lock, target, source, opts, progress, None)
}

/// [`deploy`] started while a push still delivers some of its content: it plans, then waits
/// for `arriving.start` before it changes anything; everything that needs only local content
/// (directories, links from kept releases, symlinks) is staged first; then `arriving.wait`
/// blocks until the rest is in the object store and the build goes on as [`deploy`] does. When
/// either is cancelled, the staging directory (if any) is removed and nothing is journaled: the
/// push never got to build its release.
///
/// The root is not recovered here (recovery would remove the temporaries of the objects being
/// written): the caller recovers it when it takes the lock, before the push receives anything.
pub fn deploy_arriving(
    root: &AppRoot,
    lock: &LockGuard,
    target: &Manifest,
    source: &dyn ContentSource,
    opts: &DeployOptions,
    progress: &(dyn Fn(u64) + Sync),
    arriving: Arriving<'_>,
) -> Result<DeployReport, EdgeError> {
    deploy_inner(root, lock, target, source, opts, progress, Some(arriving))
}

fn deploy_inner(
    root: &AppRoot,
    lock: &LockGuard,
    target: &Manifest,
    source: &dyn ContentSource,
    opts: &DeployOptions,
    progress: &(dyn Fn(u64) + Sync),
    mut arriving: Option<Arriving<'_>>,
) -> Result<DeployReport, EdgeError> {
    let started = Instant::now();
    // Recovery removes the temporaries of interrupted receives: not while a push writes its
    // objects. The caller of `deploy_arriving` recovered when it took the lock.
    let recovered = match arriving {
        Some(_) => Recovery::default(),
        None => root.recover(lock)?,
    };
    tracing::debug!(ms = started.elapsed().as_millis() as u64, "recovered");
    let prep = match &arriving {
        Some(a) => prepare_arriving(root, target, opts, &a.objects)?,
        None => prepare(root, target, opts)?,
    };
    let planned = started.elapsed();
    tracing::debug!(
        ms = planned.as_millis() as u64,
        ops = prep.plan.ops.len(),
        "planned"
    );
    let need = prep.plan.summary.full_bytes + prep.plan.summary.delta_bytes;
    let free = root.free_bytes()?;
    if need > free {
        return Err(EdgeError::NoSpace {
            root: root.path().to_owned(),
            need,
            free,
        });
    }
    // Everything up to here only read the disk.
    if let Some(a) = arriving.as_mut() {
        let t = Instant::now();
        (a.start)()?;
        tracing::debug!(ms = t.elapsed().as_millis() as u64, "waited to start");
    }
    if let Some(over) = &prep.over {
        tracing::debug!(%over, "building on the prestaged tree");
    }
    let mut stager = Stager::begin(
        root,
        lock,
        &prep.plan.release,
        prep.over.as_ref(),
        target,
        &prep.bases,
        prep.seq,
        opts.now_unix,
        source,
        opts.exec.clone(),
        progress,
    )?;
    // Everything up to MarkComplete happens in staging; an error there removes staging. After it the
    // release is complete and stays, whatever activation does.
    let split = prep
        .plan
        .ops
        .iter()
        .position(|o| matches!(o, Op::MarkComplete))
        .map_or(prep.plan.ops.len(), |i| i + 1);
    let (build, finish) = prep.plan.ops.split_at(split);
    let result = match arriving.as_mut() {
        Some(a) => {
            let (ready, rest) = build.split_at(prep.plan.waits_from.min(build.len()));
            stager.apply(ready).and_then(|()| {
                let t = Instant::now();
                let stamps = (a.wait)()?;
                tracing::debug!(
                    ms = t.elapsed().as_millis() as u64,
                    "waited for arriving content"
                );
                stager.set_object_stamps(stamps);
                stager.apply(rest)
            })
        }
        None => stager.apply(build),
    };
    let journal = |result: &str| JournalEntry {
        time_unix: opts.now_unix,
        event: "deploy".into(),
        release: prep.plan.release.to_string(),
        operator: operator(),
        manifest: Some(target.digest().to_hex()),
        files: Some(prep.plan.summary.files),
        bytes: Some(prep.plan.summary.bytes),
        result: result.into(),
        duration_ms: started.elapsed().as_millis() as u64,
    };
    if let Err(e) = result {
        stager.abort()?;
        if matches!(e, EdgeError::Cancelled(_)) {
            return Err(e);
        }
        root.append_journal(&journal(&format!("failed: {}", super::error_chain(&e))))?;
        return Err(e);
    }
    tracing::debug!(ms = started.elapsed().as_millis() as u64, "built");
    // The complete release now holds the received objects; the store need not keep them.
    if opts.use_objects {
        let store = ObjectStore::open(root)?;
        for op in build {
            if let Op::LinkObject { hash, mode, .. } = op {
                store.remove(hash, *mode)?;
            }
        }
    }
    // The swap runs as part of the app's activation pipeline; prunes only after it succeeded.
    let mut activation = None;
    for op in finish {
        if !matches!(op, Op::Activate) {
            stager.apply(std::slice::from_ref(op))?;
            continue;
        }
        let run = activate::run(
            root,
            lock,
            &prep.plan.release,
            prep.previous.as_ref(),
            &ActivationOptions {
                auto_rollback: !opts.no_rollback,
                now_unix: opts.now_unix,
                config: None,
            },
        );
        match run {
            Ok(r) => activation = Some(r),
            Err(e) => {
                root.append_journal(&journal(&format!("failed: {}", super::error_chain(&e))))?;
                return Err(e);
            }
        }
    }
    let exec = stager.stats();
    root.append_journal(&journal("ok"))?;
    let pruned = finish
        .iter()
        .filter_map(|o| match o {
            Op::Prune { release } => Some(release.clone()),
            _ => None,
        })
        .collect();
    let timings = std::iter::once(crate::wire::PhaseTime::new("plan", planned))
        .chain(
            exec.timings
                .iter()
                .map(|(p, d)| crate::wire::PhaseTime::new(p, *d)),
        )
        .collect();
    Ok(DeployReport {
        timings,
        release: prep.plan.release.clone(),
        previous: prep.previous,
        summary: prep.plan.summary.clone(),
        activated: opts.activate,
        pruned,
        recovered,
        exec,
        manifest_digest: target.digest().to_hex(),
        activation,
    })
}

/// What [`prestage`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrestageReport {
    /// The release whose tree was prestaged, if one was (it was not already).
    pub prestaged: Option<ReleaseId>,
    /// Prestaged trees removed: of releases no longer current, and unfinished ones.
    pub removed: Vec<String>,
    pub files: u64,
}

/// Whether [`prestage`] has anything to do: the current release's tree to make (again, with
/// `fresh`), or trees of other releases to remove. Reads without the lock, so that an app with
/// nothing to do is left exactly as it is; [`prestage`] looks again under the lock.
pub fn prestage_due(root: &AppRoot, fresh: bool) -> bool {
    let current = root.current().ok().flatten();
    let missing = current
        .as_ref()
        .is_some_and(|c| fresh || !root.has_prestage(c));
    missing
        || root
            .prestages()
            .unwrap_or_default()
            .iter()
            .any(|n| current.as_ref().is_none_or(|c| c.as_str() != n))
}

/// Prestages the current release's tree in `.relsync/next/<current>` (see
/// [`crate::layout::NEXT`]) unless it is there already, and removes every other prestaged tree;
/// with `fresh`, the current one is made again too. The next build on top of the current release
/// then starts from that tree ([`DeployOptions::prestaged`]) instead of making every directory
/// and link itself, which takes that work off a push's path. Stops early with
/// [`EdgeError::Cancelled`] when `cancel` is set, leaving nothing behind.
pub fn prestage(
    root: &AppRoot,
    lock: &LockGuard,
    fresh: bool,
    cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
) -> Result<PrestageReport, EdgeError> {
    let current = root.current()?;
    let keep = current.as_ref().filter(|_| !fresh);
    let removed = root.remove_prestages(keep)?;
    let mut report = PrestageReport {
        prestaged: None,
        removed,
        files: 0,
    };
    let Some(current) = current else {
        return Ok(report);
    };
    if root.has_prestage(&current) {
        return Ok(report);
    }
    let record = root.load_record(&current)?;
    let ops = plan_prestage(
        Basis {
            id: &record.id,
            manifest: &record.manifest,
        },
        super::umask(),
    );
    let mut stager = Stager::begin_prestage(
        root,
        lock,
        &record,
        ExecOptions {
            cancel,
            ..ExecOptions::default()
        },
    )?;
    match stager.apply(&ops) {
        Ok(()) => stager.finish_prestage()?,
        Err(e) => {
            stager.abort()?;
            return Err(e);
        }
    }
    report.files = record.manifest.file_count() as u64;
    report.prestaged = Some(current);
    Ok(report)
}

fn journal_event(
    root: &AppRoot,
    now_unix: i64,
    event: &str,
    id: &ReleaseId,
    started: Instant,
) -> Result<(), EdgeError> {
    journal_result(root, now_unix, event, id, started, "ok".into())
}

fn journal_result(
    root: &AppRoot,
    now_unix: i64,
    event: &str,
    id: &ReleaseId,
    started: Instant,
    result: String,
) -> Result<(), EdgeError> {
    root.append_journal(&JournalEntry {
        time_unix: now_unix,
        event: event.into(),
        release: id.to_string(),
        operator: operator(),
        manifest: None,
        files: None,
        bytes: None,
        result,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// Runs the activation pipeline for `id` and journals `event` with its result.
fn activate_and_journal(
    root: &AppRoot,
    lock: &LockGuard,
    event: &str,
    id: &ReleaseId,
    opts: &ActivationOptions,
    started: Instant,
) -> Result<ActivationReport, EdgeError> {
    let previous = root.current()?;
    match activate::run(root, lock, id, previous.as_ref(), opts) {
        Ok(report) => {
            journal_event(root, opts.now_unix, event, id, started)?;
            Ok(report)
        }
        Err(e) => {
            if matches!(e, EdgeError::Activation(_)) {
                let result = format!("failed: {}", super::error_chain(&e));
                journal_result(root, opts.now_unix, event, id, started, result)?;
            }
            Err(e)
        }
    }
}

/// Points `current` at an existing complete release.
pub fn activate(
    root: &AppRoot,
    lock: &LockGuard,
    id: &ReleaseId,
    now_unix: i64,
) -> Result<(), EdgeError> {
    let opts = ActivationOptions {
        now_unix,
        ..ActivationOptions::default()
    };
    activate_with(root, lock, id, &opts).map(drop)
}

/// [`activate`] through the app's activation pipeline, with its report.
pub fn activate_with(
    root: &AppRoot,
    lock: &LockGuard,
    id: &ReleaseId,
    opts: &ActivationOptions,
) -> Result<ActivationReport, EdgeError> {
    let started = Instant::now();
    root.recover(lock)?;
    root.load_record(id)?;
    root.check_shared(&shared_paths(root, &[])?)?;
    activate_and_journal(root, lock, "activate", id, opts, started)
}

/// Activates `to`, or the newest good release older than `current`. Returns the release activated.
pub fn rollback(
    root: &AppRoot,
    lock: &LockGuard,
    to: Option<&ReleaseId>,
    now_unix: i64,
) -> Result<ReleaseId, EdgeError> {
    let opts = ActivationOptions {
        now_unix,
        ..ActivationOptions::default()
    };
    rollback_with(root, lock, to, &opts).map(|r| r.release)
}

/// [`rollback`] through the app's activation pipeline, with its report (`release` is the release
/// rolled back to).
pub fn rollback_with(
    root: &AppRoot,
    lock: &LockGuard,
    to: Option<&ReleaseId>,
    opts: &ActivationOptions,
) -> Result<ActivationReport, EdgeError> {
    let started = Instant::now();
    root.recover(lock)?;
    let target = match to {
        Some(id) => id.clone(),
        None => {
            let records = root.records()?;
            let states = root.states(&records)?;
            retention::rollback_target(&states, root.current()?.as_ref())
                .ok_or(EdgeError::NoRollbackTarget)?
        }
    };
    root.load_record(&target)?;
    root.check_shared(&shared_paths(root, &[])?)?;
    activate_and_journal(root, lock, "rollback", &target, opts, started)
}

/// Removes releases beyond `keep`; never `current`, the rollback target, or a release marked bad
/// in the last `retention::BAD_GRACE_SECS`.
/// Takes the app offline and removes every release: `current` first (so nothing points into a
/// release being removed), then each release, newest first, with a journal entry each. The
/// journal and the app's config stay.
pub fn clear(root: &AppRoot, lock: &LockGuard, now_unix: i64) -> Result<Vec<ReleaseId>, EdgeError> {
    let started = Instant::now();
    root.recover(lock)?;
    root.remove_current()?;
    let mut records = root.records()?;
    records.sort_by_key(|r| std::cmp::Reverse(r.seq));
    let mut removed = Vec::new();
    for r in records {
        root.remove_release(&r.id)?;
        journal_event(root, now_unix, "clear", &r.id, started)?;
        removed.push(r.id.clone());
    }
    Ok(removed)
}

pub fn prune(
    root: &AppRoot,
    lock: &LockGuard,
    keep: Option<usize>,
    now_unix: i64,
) -> Result<Vec<ReleaseId>, EdgeError> {
    let started = Instant::now();
    root.recover(lock)?;
    let keep = keep.or(root.config()?.keep).unwrap_or(DEFAULT_KEEP).max(1);
    let records = root.records()?;
    let states = root.states_at(&records, Some(now_unix))?;
    let current = root.current()?;
    let doomed = retention::prune_candidates(&states, current.as_ref(), keep);
    for id in &doomed {
        root.remove_release(id)?;
        journal_event(root, now_unix, "prune", id, started)?;
    }
    Ok(doomed)
}

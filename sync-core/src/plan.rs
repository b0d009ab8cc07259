//! Planning: from what exists and what is wanted, the exact list of operations to perform.
//!
//! Two planners live here. [`plan_release`] builds a new release directory next to earlier ones: every
//! file whose (content, mode) already exists in a kept release becomes a hard link (renames and moves
//! cost nothing), the rest is written in full or from a delta, and the tail of the plan makes the
//! release durable, verified, complete and (optionally) current. [`plan_mirror`] updates a plain
//! directory in place, rsync-style. The planners only decide; `edge::exec` applies the operations, so
//! a crash test can apply any prefix of a plan.

use std::collections::HashSet;

use ahash::{AHashMap, AHashSet};

use serde::{Deserialize, Serialize};

use crate::layout;
use crate::manifest::{Entry, EntryKind, Hash, Manifest};
use crate::path::RelPath;
use crate::release::{FileStamp, ReleaseId};

/// A kept release the new one may take content from.
#[derive(Debug, Clone, Copy)]
pub struct Basis<'a> {
    pub id: &'a ReleaseId,
    pub manifest: &'a Manifest,
}

/// One step of building a release. Paths are relative to the release directory being staged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Create a directory with `mode`: its final mode when creating it so gives that mode
    /// (see [`PlanOptions::umask`]), else owner-only, and its final mode is set by `SetDirMode`
    /// once it is filled.
    CreateDir {
        path: RelPath,
        mode: u32,
    },
    /// Hard-link a file of an earlier release that has the same content and mode.
    Link {
        path: RelPath,
        from: ReleaseId,
        from_path: RelPath,
        size: u64,
        mode: u32,
        hash: Hash,
    },
    /// Keep the file the prestaged tree holds at `path`: the file of release `from` at the same
    /// path, hard-linked there when the tree was prestaged, whose identity was checked since.
    /// Nothing is done on disk; verification checks it like a link.
    Keep {
        path: RelPath,
        from: ReleaseId,
        size: u64,
        mode: u32,
        hash: Hash,
        /// The identity `from` recorded for the file, which verification holds it to.
        stamp: FileStamp,
    },
    /// Remove what the prestaged tree holds at `path` (an empty directory when `dir`), never
    /// following a symlink: the new release has something else there, or nothing.
    Remove {
        path: RelPath,
        dir: bool,
    },
    /// Hard-link a verified object that a push delivered (`ROOT/.relsync/objects/`).
    LinkObject {
        path: RelPath,
        size: u64,
        mode: u32,
        hash: Hash,
    },
    /// Write a file reconstructed from a delta against a file of an earlier release.
    WriteDelta {
        path: RelPath,
        basis: ReleaseId,
        basis_path: RelPath,
        size: u64,
        mode: u32,
        hash: Hash,
    },
    /// Write a file's whole content.
    WriteFull {
        path: RelPath,
        size: u64,
        mode: u32,
        hash: Hash,
    },
    Symlink {
        path: RelPath,
        target: String,
    },
    SetDirMode {
        path: RelPath,
        mode: u32,
    },
    /// Make every byte and directory entry of the staging tree durable.
    SyncTree,
    /// Check every file of the staging tree against the manifest.
    Verify,
    /// Persist the release record (manifest + file stamps).
    WriteRecord,
    /// Rename the staging directory to its final name: from here on the release is complete.
    MarkComplete,
    /// Point `current` at the release (symlink `current.tmp`, rename, fsync the root).
    Activate,
    /// Remove an old release.
    Prune {
        release: ReleaseId,
    },
}

impl Op {
    /// Short name for itemized output.
    pub fn name(&self) -> &'static str {
        match self {
            Op::CreateDir { .. } => "mkdir",
            Op::Link { .. } => "link",
            Op::Keep { .. } => "keep",
            Op::Remove { .. } => "remove",
            Op::LinkObject { .. } => "object",
            Op::WriteDelta { .. } => "delta",
            Op::WriteFull { .. } => "full",
            Op::Symlink { .. } => "symlink",
            Op::SetDirMode { .. } => "chmod-dir",
            Op::SyncTree => "sync",
            Op::Verify => "verify",
            Op::WriteRecord => "record",
            Op::MarkComplete => "complete",
            Op::Activate => "activate",
            Op::Prune { .. } => "prune",
        }
    }

    /// The phase of a release build this operation belongs to, as timings report it.
    pub fn phase(&self) -> &'static str {
        match self {
            // Removals reshape a prestaged tree before the files go in.
            Op::CreateDir { .. } | Op::SetDirMode { .. } | Op::Remove { .. } => "stage directories",
            Op::Link { .. }
            | Op::Keep { .. }
            | Op::LinkObject { .. }
            | Op::WriteFull { .. }
            | Op::WriteDelta { .. }
            | Op::Symlink { .. } => "stage files",
            Op::SyncTree => "sync (syncfs)",
            Op::Verify => "verify",
            Op::WriteRecord | Op::MarkComplete => "record + complete",
            Op::Activate => "activate (swap)",
            Op::Prune { .. } => "prune",
        }
    }
}

/// Counts and bytes of a plan, for people and for `--json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub files: u64,
    pub bytes: u64,
    pub linked_files: u64,
    pub linked_bytes: u64,
    /// Linked from a different path than their own (renames and moves).
    pub moved_files: u64,
    pub delta_files: u64,
    pub delta_bytes: u64,
    /// Linked from objects a push delivered.
    pub object_files: u64,
    pub object_bytes: u64,
    pub full_files: u64,
    pub full_bytes: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Files of the previous release that the new one no longer has.
    pub deleted_files: u64,
    pub deleted_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub release: ReleaseId,
    pub ops: Vec<Op>,
    pub summary: Summary,
    /// `ops[..waits_from]` need only content that is local already; the file operations from
    /// here on need content still arriving ([`PlanOptions::arriving`]). Without arriving
    /// content it is where the file operations end.
    pub waits_from: usize,
}

#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// Use deltas for changed files whose previous version exists (network pushes); local builds
    /// copy instead, since reading the source costs the same as reading a delta.
    pub deltas: bool,
    pub activate: bool,
    /// Old releases to remove after activation (from `retention`).
    pub prune: Vec<ReleaseId>,
    /// (content, mode) pairs available as received objects; used when no kept release has them.
    pub objects: HashSet<(Hash, u32)>,
    /// The process's file mode creation mask, when the executor knows it: a directory whose final
    /// mode gives its owner every right, has no special bits and loses nothing to the mask is
    /// created with that mode, with no `SetDirMode` after it. `None`: every directory is created
    /// owner-only and set afterwards.
    pub umask: Option<u32>,
    /// Content still on its way (a push whose files are in flight when the build starts): the
    /// file operations that need it go after all the others, from [`Plan::waits_from`] on, so
    /// the build can apply everything before them while it arrives.
    pub arriving: HashSet<Hash>,
}

/// The mode to create a directory with, when that already is its final `mode` under `umask`.
fn created_final(mode: u32, umask: Option<u32>) -> Option<u32> {
    let umask = umask?;
    (mode & !0o777 == 0 && mode & 0o700 == 0o700 && mode & umask == 0).then_some(mode)
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    #[error("shared path {shared} collides with {path} of the release; remove it from the source or exclude it")]
    SharedCollision { shared: RelPath, path: RelPath },
    #[error("shared path {shared}: its parent {parent} is not a directory of the release")]
    SharedParent { shared: RelPath, parent: RelPath },
    #[error("shared path {0} is listed twice or inside another shared path")]
    SharedNested(RelPath),
}

/// A prestaged tree a build starts from instead of an empty directory: what [`plan_prestage`]
/// made of release `base`.
#[derive(Clone, Copy)]
pub struct Prestaged<'a> {
    pub base: Basis<'a>,
    /// The stamps `base` recorded for its files, in the order of its manifest's files.
    pub stamps: &'a [FileStamp],
    /// Whether the file of `base` at a path was found to be the inode its record names, a moment
    /// ago: only such a file may stay in the new release.
    pub intact: &'a (dyn Fn(&RelPath) -> bool + Sync),
}

impl std::fmt::Debug for Prestaged<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prestaged")
            .field("base", &self.base.id)
            .finish()
    }
}

/// The mode [`plan_prestage`] creates a directory of final mode `mode` with.
fn prestaged_mode(mode: u32, umask: Option<u32>) -> u32 {
    created_final(mode, umask).unwrap_or(0o700)
}

/// The operations that make a prestaged tree of release `base` (see [`layout::NEXT`]): its
/// directories, owner-writable; each of its files hard-linked from the same path of `base`;
/// its symlinks. Shared links, directory modes and everything after staging are left to the
/// build that starts from it ([`plan_release_over`]).
pub fn plan_prestage(base: Basis<'_>, umask: Option<u32>) -> Vec<Op> {
    let entries = base.manifest.entries();
    let mut ops = Vec::with_capacity(entries.len());
    for e in entries {
        if let EntryKind::Dir { mode } = e.kind {
            ops.push(Op::CreateDir {
                path: e.path.clone(),
                mode: prestaged_mode(mode, umask),
            });
        }
    }
    for e in entries {
        match &e.kind {
            EntryKind::Dir { .. } => {}
            EntryKind::Symlink { target } => ops.push(Op::Symlink {
                path: e.path.clone(),
                target: target.clone(),
            }),
            &EntryKind::File { size, mode, hash } => ops.push(Op::Link {
                path: e.path.clone(),
                from: base.id.clone(),
                from_path: e.path.clone(),
                size,
                mode,
                hash,
            }),
        }
    }
    ops
}

/// Plans the release `release` with content `target`, linking from `bases` (previous release first)
/// and linking each of `shared` to `ROOT/shared/`.
pub fn plan_release(
    release: &ReleaseId,
    target: &Manifest,
    bases: &[Basis<'_>],
    shared: &[RelPath],
    opts: &PlanOptions,
) -> Result<Plan, PlanError> {
    plan_release_over(release, target, bases, shared, opts, None)
}

/// What of a prestaged tree a build keeps: by index into the target's entries, whether the
/// tree already holds that entry (for a directory, with the mode the tree created it with);
/// and the removals of everything else it holds, children before their parents.
struct Kept {
    entries: Vec<Option<Held>>,
    removals: Vec<Op>,
}

/// An entry a prestaged tree holds already.
#[derive(Debug, Clone, Copy)]
enum Held {
    /// A directory, created with this mode.
    Dir(u32),
    /// A file with the identity its release recorded.
    File(FileStamp),
    Symlink,
}

fn kept_of(target: &Manifest, over: &Prestaged<'_>, umask: Option<u32>) -> Kept {
    let want = target.entries();
    let mut entries = vec![None; want.len()];
    let mut removals = Vec::new();
    let mut j = 0;
    let mut stamps = over.stamps.iter();
    // Both manifests are in canonical order: one merge walk.
    for have in over.base.manifest.entries() {
        while want.get(j).is_some_and(|w| w.path < have.path) {
            j += 1;
        }
        let same = want.get(j).filter(|w| w.path == have.path);
        let stamp = match have.kind {
            EntryKind::File { .. } => stamps.next(),
            _ => None,
        };
        let kept = match (&have.kind, same.map(|w| &w.kind)) {
            (&EntryKind::Dir { mode }, Some(EntryKind::Dir { .. })) => {
                Some(Held::Dir(prestaged_mode(mode, umask)))
            }
            (EntryKind::Symlink { target: a }, Some(EntryKind::Symlink { target: b })) => {
                (a == b).then_some(Held::Symlink)
            }
            (
                &EntryKind::File { mode, hash, size },
                Some(&EntryKind::File {
                    mode: m, hash: h, ..
                }),
            ) => stamp
                .filter(|s| mode == m && hash == h && s.size == size && (over.intact)(&have.path))
                .map(|s| Held::File(*s)),
            _ => None,
        };
        match kept {
            Some(m) => entries[j] = Some(m),
            None => removals.push(Op::Remove {
                path: have.path.clone(),
                dir: have.is_dir(),
            }),
        }
    }
    // Canonical order puts a directory before what is inside it.
    removals.reverse();
    Kept { entries, removals }
}

/// [`plan_release`] starting from the prestaged tree `over` when given: what the tree holds and
/// the new release has too stays (files as [`Op::Keep`]), everything else it holds is removed
/// first ([`Op::Remove`]), and the rest is planned as on an empty directory.
pub fn plan_release_over(
    release: &ReleaseId,
    target: &Manifest,
    bases: &[Basis<'_>],
    shared: &[RelPath],
    opts: &PlanOptions,
    over: Option<Prestaged<'_>>,
) -> Result<Plan, PlanError> {
    check_shared(target, shared)?;
    let mut ops = Vec::with_capacity(target.len() * 2 + shared.len() + 8);
    let mut s = Summary::default();
    let kept = over.map(|o| kept_of(target, &o, opts.umask));
    let kept_at = |i: usize| kept.as_ref().and_then(|k| k.entries[i]);
    let kept_dir = |i: usize| match kept_at(i) {
        Some(Held::Dir(mode)) => Some(mode),
        _ => None,
    };
    if let Some(k) = &kept {
        ops.extend(k.removals.iter().cloned());
    }

    // Content index over all bases, earlier bases win so the previous release is preferred.
    // Over a prestaged tree only the files not kept are looked up, a few hundred of the
    // target's thousands in a patch: the index then holds just their contents.
    let sought: Option<AHashSet<(Hash, u32)>> = kept.as_ref().map(|_| {
        let mut sought = AHashSet::new();
        for (i, e) in target.entries().iter().enumerate() {
            if let (&EntryKind::File { mode, hash, .. }, None) = (&e.kind, kept_at(i)) {
                sought.insert((hash, mode));
            }
        }
        sought
    });
    let mut index: AHashMap<(Hash, u32), (&ReleaseId, &RelPath)> = AHashMap::new();
    for b in bases {
        for (p, _, mode, h) in b.manifest.files() {
            if sought.as_ref().is_none_or(|s| s.contains(&(*h, mode))) {
                index.entry((*h, mode)).or_insert((b.id, p));
            }
        }
    }
    let previous = bases.first();

    // Every directory first (parents before children), so the file operations after them form one
    // run that the executor can apply in parallel.
    for (i, e) in target.entries().iter().enumerate() {
        if let EntryKind::Dir { mode } = e.kind {
            s.dirs += 1;
            if kept_at(i).is_some() {
                continue;
            }
            ops.push(Op::CreateDir {
                path: e.path.clone(),
                mode: created_final(mode, opts.umask).unwrap_or(0o700),
            });
        }
    }
    // File operations on arriving content wait in `later`, in canonical order like the others.
    let mut later = Vec::new();
    for (i, e) in target.entries().iter().enumerate() {
        let held = kept_at(i);
        let kept = held.is_some();
        let ops = match &e.kind {
            EntryKind::File { hash, .. } if opts.arriving.contains(hash) => &mut later,
            _ => &mut ops,
        };
        match &e.kind {
            EntryKind::Dir { .. } => {}
            EntryKind::Symlink { target } => {
                s.symlinks += 1;
                if !kept {
                    ops.push(Op::Symlink {
                        path: e.path.clone(),
                        target: target.clone(),
                    });
                }
            }
            &EntryKind::File { size, mode, hash } => {
                s.files += 1;
                s.bytes += size;
                let path = e.path.clone();
                if let (Some(Held::File(stamp)), Some(o)) = (held, &over) {
                    s.linked_files += 1;
                    s.linked_bytes += size;
                    ops.push(Op::Keep {
                        path,
                        from: o.base.id.clone(),
                        size,
                        mode,
                        hash,
                        stamp,
                    });
                    continue;
                }
                if let Some((from, from_path)) = index.get(&(hash, mode)) {
                    s.linked_files += 1;
                    s.linked_bytes += size;
                    if *from_path != &e.path {
                        s.moved_files += 1;
                    }
                    ops.push(Op::Link {
                        path,
                        from: (*from).clone(),
                        from_path: (*from_path).clone(),
                        size,
                        mode,
                        hash,
                    });
                    continue;
                }
                if opts.objects.contains(&(hash, mode)) {
                    s.object_files += 1;
                    s.object_bytes += size;
                    ops.push(Op::LinkObject {
                        path,
                        size,
                        mode,
                        hash,
                    });
                    continue;
                }
                let delta_basis = previous.filter(|_| opts.deltas).and_then(|b| {
                    match b.manifest.get(&e.path).map(|x| &x.kind) {
                        // An empty or tiny basis cannot save anything.
                        Some(EntryKind::File { size: bs, .. }) if *bs >= 64 && size >= 64 => {
                            Some(b)
                        }
                        _ => None,
                    }
                });
                if let Some(b) = delta_basis {
                    s.delta_files += 1;
                    s.delta_bytes += size;
                    ops.push(Op::WriteDelta {
                        path: path.clone(),
                        basis: b.id.clone(),
                        basis_path: path,
                        size,
                        mode,
                        hash,
                    });
                } else {
                    s.full_files += 1;
                    s.full_bytes += size;
                    ops.push(Op::WriteFull {
                        path,
                        size,
                        mode,
                        hash,
                    });
                }
            }
        }
    }
    let waits_from = ops.len();
    ops.append(&mut later);
    for p in shared {
        s.symlinks += 1;
        ops.push(Op::Symlink {
            path: p.clone(),
            target: layout::shared_link_target(p),
        });
    }
    // Children before parents, so a read-only directory is locked only after it is filled.
    for (i, e) in target.entries().iter().enumerate().rev() {
        if let EntryKind::Dir { mode } = e.kind {
            let has = kept_dir(i).or_else(|| created_final(mode, opts.umask));
            if has == Some(mode) {
                continue;
            }
            ops.push(Op::SetDirMode {
                path: e.path.clone(),
                mode,
            });
        }
    }
    if let Some(prev) = previous {
        // Both manifests are in canonical order: one merge walk instead of a search per file.
        let mut next = target.entries().iter().peekable();
        for (p, size, _, _) in prev.manifest.files() {
            while next.next_if(|e| e.path < *p).is_some() {}
            if !next
                .peek()
                .is_some_and(|e| e.path == *p && matches!(e.kind, EntryKind::File { .. }))
            {
                s.deleted_files += 1;
                s.deleted_bytes += size;
            }
        }
    }
    ops.extend([Op::SyncTree, Op::Verify, Op::WriteRecord, Op::MarkComplete]);
    if opts.activate {
        ops.push(Op::Activate);
        ops.extend(opts.prune.iter().map(|r| Op::Prune { release: r.clone() }));
    }
    Ok(Plan {
        release: release.clone(),
        ops,
        summary: s,
        waits_from,
    })
}

fn check_shared(target: &Manifest, shared: &[RelPath]) -> Result<(), PlanError> {
    let mut seen: HashSet<&RelPath> = HashSet::new();
    for p in shared {
        if !seen.insert(p) || shared.iter().any(|q| q != p && p.starts_with(q)) {
            return Err(PlanError::SharedNested(p.clone()));
        }
        if let Some(e) = target.entries().iter().find(|e| e.path.starts_with(p)) {
            return Err(PlanError::SharedCollision {
                shared: p.clone(),
                path: e.path.clone(),
            });
        }
        if let Some(parent) = p.parent() {
            if !target.get(&parent).is_some_and(Entry::is_dir) {
                return Err(PlanError::SharedParent {
                    shared: p.clone(),
                    parent,
                });
            }
        }
    }
    Ok(())
}

/// One step of updating a mirror directory in place. Paths are relative to the destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum MirrorOp {
    /// Remove whatever is at `path` (recursively for a directory), never following symlinks.
    Remove {
        path: RelPath,
        dir: bool,
    },
    CreateDir {
        path: RelPath,
        mode: u32,
    },
    SetDirMode {
        path: RelPath,
        mode: u32,
    },
    /// Replace `path` atomically with new content; `basis` is the destination's current version of
    /// the file, usable as a delta basis.
    Write {
        path: RelPath,
        size: u64,
        mode: u32,
        hash: Hash,
        basis: Option<RelPath>,
    },
    /// Replace `path` atomically with a symlink.
    Symlink {
        path: RelPath,
        target: String,
    },
}

/// What a mirror plan amounts to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorSummary {
    pub files: u64,
    pub bytes: u64,
    pub unchanged_files: u64,
    pub written_files: u64,
    pub written_bytes: u64,
    pub delta_files: u64,
    pub removed: u64,
    pub dirs_created: u64,
    pub symlinks: u64,
}

/// What applying a mirror plan did (`edge::mirror::apply_mirror`'s count, also reported over the
/// wire by a daemon that applied one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorStats {
    pub removed: u64,
    pub written_files: u64,
    pub written_bytes: u64,
    pub dirs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MirrorPlan {
    pub ops: Vec<MirrorOp>,
    pub summary: MirrorSummary,
}

/// Plans making `dst` equal to `src` (plus, without `delete`, whatever else `dst` has).
pub fn plan_mirror(src: &Manifest, dst: &Manifest, delete: bool) -> MirrorPlan {
    let mut removes = Vec::new();
    let mut dirs = Vec::new();
    let mut writes = Vec::new();
    let mut s = MirrorSummary::default();
    // A removed directory takes its subtree with it: skip entries below it.
    let mut removed_dir: Option<&RelPath> = None;
    let below_removed = |p: &RelPath, r: Option<&RelPath>| r.is_some_and(|r| p.starts_with(r));

    for d in dst.entries() {
        if below_removed(&d.path, removed_dir) {
            continue;
        }
        let conflict = match src.get(&d.path) {
            None => delete,
            // A file or symlink replaces a file or symlink atomically by rename; only a change to or
            // from a directory needs the old entry gone first.
            Some(e) => e.is_dir() != d.is_dir(),
        };
        if conflict {
            let dir = d.is_dir();
            s.removed += 1;
            removes.push(MirrorOp::Remove {
                path: d.path.clone(),
                dir,
            });
            if dir {
                removed_dir = Some(&d.path);
            }
        }
    }
    let removed: HashSet<&RelPath> = removes
        .iter()
        .map(|op| match op {
            MirrorOp::Remove { path, .. } => path,
            _ => unreachable!("only removals collected"),
        })
        .collect();
    let gone = |p: &RelPath| {
        removed.contains(p)
            || p.parent()
                .is_some_and(|_| removed.iter().any(|r| p.starts_with(r)))
    };

    for e in src.entries() {
        let existing = if gone(&e.path) {
            None
        } else {
            dst.get(&e.path).map(|x| &x.kind)
        };
        match &e.kind {
            EntryKind::Dir { mode } => match existing {
                Some(EntryKind::Dir { mode: m }) => {
                    if m != mode {
                        dirs.push(MirrorOp::SetDirMode {
                            path: e.path.clone(),
                            mode: *mode,
                        });
                    }
                }
                _ => {
                    s.dirs_created += 1;
                    dirs.push(MirrorOp::CreateDir {
                        path: e.path.clone(),
                        mode: *mode,
                    });
                }
            },
            EntryKind::Symlink { target } => {
                s.symlinks += 1;
                if !matches!(existing, Some(EntryKind::Symlink { target: t }) if t == target) {
                    writes.push(MirrorOp::Symlink {
                        path: e.path.clone(),
                        target: target.clone(),
                    });
                }
            }
            &EntryKind::File { size, mode, hash } => {
                s.files += 1;
                s.bytes += size;
                let basis = match existing {
                    Some(EntryKind::File {
                        hash: h, mode: m, ..
                    }) if *h == hash && *m == mode => {
                        s.unchanged_files += 1;
                        continue;
                    }
                    Some(EntryKind::File { .. }) => Some(e.path.clone()),
                    _ => None,
                };
                s.written_files += 1;
                s.written_bytes += size;
                if basis.is_some() {
                    s.delta_files += 1;
                }
                writes.push(MirrorOp::Write {
                    path: e.path.clone(),
                    size,
                    mode,
                    hash,
                    basis,
                });
            }
        }
    }
    let mut ops = removes;
    ops.extend(dirs);
    ops.extend(writes);
    MirrorPlan { ops, summary: s }
}

/// The summary [`plan_mirror`] gives for `ops` planned from `src`, recomputed from the operations:
/// what a client that received a plan's operations from a daemon reports and checks the daemon's
/// own summary against.
pub fn mirror_summary(src: &Manifest, ops: &[MirrorOp]) -> MirrorSummary {
    let mut s = MirrorSummary::default();
    for e in src.entries() {
        match e.kind {
            EntryKind::File { size, .. } => {
                s.files += 1;
                s.bytes = s.bytes.saturating_add(size);
            }
            EntryKind::Symlink { .. } => s.symlinks += 1,
            EntryKind::Dir { .. } => {}
        }
    }
    for op in ops {
        match op {
            MirrorOp::Remove { .. } => s.removed += 1,
            MirrorOp::CreateDir { .. } => s.dirs_created += 1,
            MirrorOp::Write { size, basis, .. } => {
                s.written_files += 1;
                s.written_bytes = s.written_bytes.saturating_add(*size);
                s.delta_files += u64::from(basis.is_some());
            }
            MirrorOp::SetDirMode { .. } | MirrorOp::Symlink { .. } => {}
        }
    }
    s.unchanged_files = s.files.saturating_sub(s.written_files);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Policy;

    fn h(s: &str) -> Hash {
        Hash::of(s.as_bytes())
    }

    fn m(entries: Vec<Entry>) -> Manifest {
        Manifest::from_unsorted(entries, &Policy::default()).unwrap()
    }

    fn id(s: &str) -> ReleaseId {
        ReleaseId::new(s).unwrap()
    }

    fn f(p: &str, content: &str, mode: u32) -> Entry {
        Entry::file(p, content.len() as u64, mode, h(content)).unwrap()
    }

    fn d(p: &str) -> Entry {
        Entry::dir(p, 0o755).unwrap()
    }

    #[test]
    fn directories_get_their_final_mode_at_creation_when_the_mask_allows_it() {
        let target = m(vec![
            Entry::dir("a", 0o755).unwrap(),
            Entry::dir("a/group", 0o775).unwrap(),
            Entry::dir("a/ro", 0o555).unwrap(),
            Entry::dir("b", 0o700).unwrap(),
        ]);
        // (umask, ops after the directories' creation)
        let cases: &[(Option<u32>, &[&str])] = &[
            (
                None,
                &[
                    "mkdir a",
                    "mkdir a/group",
                    "mkdir a/ro",
                    "mkdir b",
                    "chmod b 700",
                    "chmod a/ro 555",
                    "chmod a/group 775",
                    "chmod a 755",
                ],
            ),
            (
                Some(0o022),
                &[
                    "mkdir a 755",
                    "mkdir a/group",
                    "mkdir a/ro",
                    "mkdir b",
                    "chmod a/ro 555",
                    "chmod a/group 775",
                ],
            ),
            (
                Some(0o002),
                &[
                    "mkdir a 755",
                    "mkdir a/group 775",
                    "mkdir a/ro",
                    "mkdir b",
                    "chmod a/ro 555",
                ],
            ),
            // A mask that takes from the owner: everything is set afterwards.
            (
                Some(0o222),
                &[
                    "mkdir a",
                    "mkdir a/group",
                    "mkdir a/ro",
                    "mkdir b",
                    "chmod b 700",
                    "chmod a/ro 555",
                    "chmod a/group 775",
                    "chmod a 755",
                ],
            ),
        ];
        for &(umask, want) in cases {
            let opts = PlanOptions {
                umask,
                ..PlanOptions::default()
            };
            let p = plan_release(&id("r1"), &target, &[], &[], &opts).unwrap();
            let got = render(&p.ops);
            let dirs: Vec<&str> = got
                .iter()
                .map(String::as_str)
                .filter(|l| l.starts_with("mkdir") || l.starts_with("chmod"))
                .collect();
            assert_eq!(dirs, want, "umask {umask:?}");
            assert_eq!(p.summary.dirs, 4);
        }
        // Special bits (a policy may allow them) are always set afterwards.
        for (mode, umask, want) in [
            (0o1777, Some(0), None),
            (0o2755, Some(0o022), None),
            (0o755, Some(0o022), Some(0o755)),
            (0o755, None, None),
        ] {
            assert_eq!(created_final(mode, umask), want, "{mode:o} {umask:?}");
        }
    }

    /// Renders a plan as one line per op, so tests read like the itemized output.
    fn render(ops: &[Op]) -> Vec<String> {
        ops.iter()
            .map(|op| match op {
                Op::CreateDir { path, mode: 0o700 } => format!("mkdir {path}"),
                Op::CreateDir { path, mode } => format!("mkdir {path} {mode:o}"),
                Op::Link {
                    path,
                    from,
                    from_path,
                    ..
                } => format!("link {path} <- {from}:{from_path}"),
                Op::WriteDelta {
                    path,
                    basis,
                    basis_path,
                    ..
                } => format!("delta {path} ~ {basis}:{basis_path}"),
                Op::WriteFull { path, .. } => format!("full {path}"),
                Op::LinkObject { path, .. } => format!("object {path}"),
                Op::Symlink { path, target } => format!("symlink {path} -> {target}"),
                Op::SetDirMode { path, mode } => format!("chmod {path} {mode:o}"),
                Op::Prune { release } => format!("prune {release}"),
                Op::Keep { path, from, .. } => format!("keep {path} ({from})"),
                Op::Remove { path, dir } => format!("rm{} {path}", if *dir { " -d" } else { "" }),
                other => other.name().to_string(),
            })
            .collect()
    }

    #[test]
    fn first_release_writes_everything() {
        let target = m(vec![
            d("app"),
            f("app/a.php", "a", 0o644),
            f("b", "b", 0o755),
        ]);
        let plan = plan_release(&id("r1"), &target, &[], &[], &PlanOptions::default()).unwrap();
        assert_eq!(
            render(&plan.ops),
            [
                "mkdir app",
                "full app/a.php",
                "full b",
                "chmod app 755",
                "sync",
                "verify",
                "record",
                "complete"
            ]
        );
        assert_eq!(plan.summary.full_files, 2);
        assert_eq!(plan.summary.linked_files, 0);
    }

    #[test]
    fn links_renames_deltas_mode_changes_and_shared() {
        let prev = m(vec![
            d("app"),
            f("app/same.php", "same", 0o644),
            f("app/old-name.php", "moved", 0o644),
            f(
                "app/edit.php",
                "version one of a longer file, long enough to be worth a delta....",
                0o644,
            ),
            f("app/chmod.sh", "script", 0o644),
            f("app/gone.php", "gone", 0o644),
        ]);
        let older = m(vec![f("ancient.php", "from r0", 0o644)]);
        let target = m(vec![
            d("app"),
            f("app/same.php", "same", 0o644),
            f("app/new-name.php", "moved", 0o644),
            f(
                "app/edit.php",
                "version two of a longer file, long enough to be worth a delta....",
                0o644,
            ),
            f("app/chmod.sh", "script", 0o755),
            f("back.php", "from r0", 0o644),
        ]);
        let (r0, r1) = (id("r0"), id("r1"));
        let bases = [
            Basis {
                id: &r1,
                manifest: &prev,
            },
            Basis {
                id: &r0,
                manifest: &older,
            },
        ];
        let shared = [
            RelPath::new("storage").unwrap(),
            RelPath::new("app/.env").unwrap(),
        ];
        let opts = PlanOptions {
            deltas: true,
            activate: true,
            prune: vec![r0.clone()],
            ..PlanOptions::default()
        };
        let plan = plan_release(&id("r2"), &target, &bases, &shared, &opts).unwrap();
        assert_eq!(
            render(&plan.ops),
            [
                "mkdir app",
                "full app/chmod.sh",
                "delta app/edit.php ~ r1:app/edit.php",
                "link app/new-name.php <- r1:app/old-name.php",
                "link app/same.php <- r1:app/same.php",
                "link back.php <- r0:ancient.php",
                "symlink storage -> ../../shared/storage",
                "symlink app/.env -> ../../../shared/app/.env",
                "chmod app 755",
                "sync",
                "verify",
                "record",
                "complete",
                "activate",
                "prune r0",
            ]
        );
        let s = &plan.summary;
        assert_eq!((s.linked_files, s.moved_files), (3, 2));
        assert_eq!((s.delta_files, s.full_files), (1, 1));
        assert_eq!((s.deleted_files, s.deleted_bytes), (2, 9));
        // Without deltas the edit is written in full.
        let no_delta = PlanOptions::default();
        let plan = plan_release(&id("r2"), &target, &bases, &[], &no_delta).unwrap();
        assert!(render(&plan.ops).contains(&"full app/edit.php".to_string()));
        assert!(!render(&plan.ops).contains(&"activate".to_string()));
    }

    #[test]
    fn received_objects_are_linked_when_no_release_has_the_content() {
        let prev = m(vec![f("same", "same", 0o644)]);
        let target = m(vec![
            f("same", "same", 0o644),
            f("pushed", "pushed", 0o644),
            f("pushed-exec", "pushed", 0o755),
            f("missing", "missing", 0o644),
        ]);
        let r1 = id("r1");
        let bases = [Basis {
            id: &r1,
            manifest: &prev,
        }];
        let opts = PlanOptions {
            objects: [(h("pushed"), 0o644), (h("same"), 0o644)]
                .into_iter()
                .collect(),
            ..PlanOptions::default()
        };
        let plan = plan_release(&id("r2"), &target, &bases, &[], &opts).unwrap();
        let ops = render(&plan.ops);
        assert!(ops.contains(&"object pushed".to_string()), "{ops:?}");
        // A release beats an object; a different mode is different content for linking.
        assert!(ops.contains(&"link same <- r1:same".to_string()), "{ops:?}");
        assert!(ops.contains(&"full pushed-exec".to_string()), "{ops:?}");
        assert!(ops.contains(&"full missing".to_string()), "{ops:?}");
        assert_eq!(
            (plan.summary.object_files, plan.summary.object_bytes),
            (1, 6)
        );
    }

    #[test]
    fn operations_on_arriving_content_wait_at_the_end() {
        let prev = m(vec![d("b"), f("b/kept", "kept", 0o644)]);
        let target = m(vec![
            d("b"),
            f("a", "arriving", 0o644),
            f("b/arriving-exec", "arriving", 0o755),
            f("b/held", "held", 0o644),
            f("b/kept", "kept", 0o644),
            Entry::symlink("c", "b/kept").unwrap(),
            f("d", "arriving too", 0o644),
        ]);
        let r1 = id("r1");
        let bases = [Basis {
            id: &r1,
            manifest: &prev,
        }];
        let objects: HashSet<_> = [
            (h("arriving"), 0o644),
            (h("held"), 0o644),
            (h("arriving too"), 0o644),
        ]
        .into_iter()
        .collect();
        // (content still arriving, the ops, where the waiting ones start)
        let cases: &[(&[&str], &[&str], usize)] = &[
            (
                &[],
                &[
                    "mkdir b",
                    "object a",
                    "full b/arriving-exec",
                    "object b/held",
                    "link b/kept <- r1:b/kept",
                    "symlink c -> b/kept",
                    "object d",
                ],
                7,
            ),
            (
                &["arriving", "arriving too"],
                &[
                    "mkdir b",
                    "object b/held",
                    "link b/kept <- r1:b/kept",
                    "symlink c -> b/kept",
                    "object a",
                    "full b/arriving-exec",
                    "object d",
                ],
                4,
            ),
        ];
        for (arriving, want, waits_from) in cases {
            let opts = PlanOptions {
                objects: objects.clone(),
                arriving: arriving.iter().map(|c| h(c)).collect(),
                ..PlanOptions::default()
            };
            let plan = plan_release(&id("r2"), &target, &bases, &[], &opts).unwrap();
            let ops = render(&plan.ops);
            assert_eq!(&ops[..want.len()], *want, "arriving {arriving:?}");
            assert_eq!(plan.waits_from, *waits_from, "arriving {arriving:?}");
            assert_eq!(
                &ops[want.len()..],
                ["chmod b 755", "sync", "verify", "record", "complete"]
            );
        }
    }

    #[test]
    fn shared_paths_are_checked() {
        let target = m(vec![
            d("storage"),
            f("storage/x", "x", 0o644),
            f(".env", "e", 0o644),
        ]);
        let plan = |shared: &[&str]| {
            let shared: Vec<RelPath> = shared.iter().map(|s| RelPath::new(*s).unwrap()).collect();
            plan_release(&id("r"), &target, &[], &shared, &PlanOptions::default())
        };
        assert!(matches!(
            plan(&["storage"]),
            Err(PlanError::SharedCollision { .. })
        ));
        assert!(matches!(
            plan(&[".env"]),
            Err(PlanError::SharedCollision { .. })
        ));
        assert!(matches!(
            plan(&["nodir/x"]),
            Err(PlanError::SharedParent { .. })
        ));
        assert!(matches!(plan(&["a", "a"]), Err(PlanError::SharedNested(_))));
        assert!(matches!(
            plan(&["x", "x/y"]),
            Err(PlanError::SharedNested(_))
        ));
        assert!(plan(&["storage/logs"]).is_ok());
    }

    fn render_mirror(ops: &[MirrorOp]) -> Vec<String> {
        ops.iter()
            .map(|op| match op {
                MirrorOp::Remove { path, dir } => {
                    format!("rm{} {path}", if *dir { " -r" } else { "" })
                }
                MirrorOp::CreateDir { path, .. } => format!("mkdir {path}"),
                MirrorOp::SetDirMode { path, mode } => format!("chmod {path} {mode:o}"),
                MirrorOp::Write { path, basis, .. } => {
                    format!(
                        "write {path}{}",
                        if basis.is_some() { " (delta)" } else { "" }
                    )
                }
                MirrorOp::Symlink { path, target } => format!("symlink {path} -> {target}"),
            })
            .collect()
    }

    #[test]
    fn mirror_plans() {
        let src = m(vec![
            d("a"),
            f("a/same", "s", 0o644),
            f("a/edit", "new", 0o644),
            f("a/new", "n", 0o644),
            d("was-file"),
            f("was-dir", "now a file", 0o644),
            Entry::symlink("l", "a/same").unwrap(),
        ]);
        let dst = m(vec![
            d("a"),
            f("a/same", "s", 0o644),
            f("a/edit", "old", 0o644),
            f("a/extra", "x", 0o644),
            f("was-file", "f", 0o644),
            d("was-dir"),
            f("was-dir/inner", "i", 0o644),
            d("old-dir"),
            f("old-dir/y", "y", 0o644),
        ]);
        let keep = plan_mirror(&src, &dst, false);
        assert_eq!(
            render_mirror(&keep.ops),
            [
                "rm -r was-dir",
                "rm was-file",
                "mkdir was-file",
                "write a/edit (delta)",
                "write a/new",
                "symlink l -> a/same",
                "write was-dir",
            ]
        );
        let del = plan_mirror(&src, &dst, true);
        assert_eq!(
            render_mirror(&del.ops)[..4],
            [
                "rm a/extra",
                "rm -r old-dir",
                "rm -r was-dir",
                "rm was-file"
            ]
        );
        assert_eq!(del.summary.unchanged_files, 1);
        assert!(plan_mirror(&src, &src, true).ops.is_empty());
        for (plan, dst) in [(&keep, &dst), (&del, &dst)] {
            assert_eq!(mirror_summary(&src, &plan.ops), plan.summary, "{dst:?}");
        }
        let fresh = plan_mirror(&src, &Manifest::empty(), false);
        assert_eq!(fresh.summary.written_files, 4);
        assert_eq!(mirror_summary(&src, &fresh.ops), fresh.summary);
        assert_ne!(mirror_summary(&src, &keep.ops[1..]), keep.summary);
    }

    /// The plan over a prestaged tree of `a`, with `broken` the files of `a` found changed.
    /// Stamps for the files of `m`: inode numbers counting from 1, their sizes.
    fn stamps_of(m: &Manifest) -> Vec<FileStamp> {
        m.files()
            .enumerate()
            .map(|(i, (_, size, ..))| FileStamp {
                ino: i as u64 + 1,
                size,
                mtime_ns: 0,
            })
            .collect()
    }

    fn over_plan(a: &Manifest, b: &Manifest, broken: &[&str], umask: Option<u32>) -> Plan {
        let intact = |p: &RelPath| !broken.contains(&p.as_str());
        let stamps = stamps_of(a);
        let base = Basis {
            id: &id("a"),
            manifest: a,
        };
        let opts = PlanOptions {
            umask,
            ..PlanOptions::default()
        };
        plan_release_over(
            &id("b"),
            b,
            &[base],
            &[],
            &opts,
            Some(Prestaged {
                base,
                stamps: &stamps,
                intact: &intact,
            }),
        )
        .unwrap()
    }

    #[test]
    fn a_build_over_a_prestaged_tree_keeps_what_is_the_same_and_removes_the_rest_first() {
        let s = |p: &str, t: &str| Entry::symlink(p, t).unwrap();
        let a = m(vec![
            d("app"),
            f("app/same.php", "same", 0o644),
            f("app/edited.php", "old", 0o644),
            f("app/chmod.sh", "sh", 0o644),
            f("app/dup.php", "same", 0o644),
            d("gone"),
            f("gone/x", "x", 0o644),
            d("gone/deeper"),
            f("gone/deeper/y", "y", 0o644),
            f("turns-dir", "t", 0o644),
            d("turns-file"),
            f("turns-file/z", "z", 0o644),
            s("link", "app/same.php"),
            s("relink", "app/same.php"),
            d("ro"),
        ]);
        let b = m(vec![
            d("app"),
            f("app/same.php", "same", 0o644),
            f("app/edited.php", "new", 0o644),
            f("app/chmod.sh", "sh", 0o755),
            f("app/dup.php", "same", 0o644),
            f("app/new.php", "same", 0o644),
            d("turns-dir"),
            f("turns-dir/t", "t", 0o644),
            f("turns-file", "z", 0o644),
            s("link", "app/same.php"),
            s("relink", "app/dup.php"),
            Entry::dir("ro", 0o555).unwrap(),
        ]);
        let plan = over_plan(&a, &b, &["app/dup.php"], Some(0o022));
        assert_eq!(
            render(&plan.ops),
            [
                // Children before their parents.
                "rm turns-file/z",
                "rm -d turns-file",
                "rm turns-dir",
                "rm relink",
                "rm gone/x",
                "rm gone/deeper/y",
                "rm -d gone/deeper",
                "rm -d gone",
                "rm app/edited.php",
                // Its file was found changed: linked again (the executor checks the source).
                "rm app/dup.php",
                // Same content, another mode: a new inode.
                "rm app/chmod.sh",
                "mkdir turns-dir 755",
                "full app/chmod.sh",
                "link app/dup.php <- a:app/dup.php",
                "full app/edited.php",
                "link app/new.php <- a:app/dup.php",
                "keep app/same.php (a)",
                "symlink relink -> app/dup.php",
                "link turns-dir/t <- a:turns-dir",
                "link turns-file <- a:turns-file/z",
                "chmod ro 555",
                "sync",
                "verify",
                "record",
                "complete",
            ]
        );
        assert_eq!(plan.summary.files, 7);
        assert_eq!(plan.summary.linked_files, 5);
        assert_eq!(plan.summary.dirs, 3);
    }

    #[test]
    fn a_kept_directory_gets_its_new_mode_unless_the_prestage_made_it_so() {
        let a = m(vec![d("a"), Entry::dir("b", 0o700).unwrap(), d("c")]);
        let b = m(vec![
            d("a"),
            Entry::dir("b", 0o755).unwrap(),
            Entry::dir("c", 0o750).unwrap(),
        ]);
        // (umask, the directory ops)
        let cases: &[(Option<u32>, &[&str])] = &[
            (Some(0o022), &["chmod c 750", "chmod b 755"]),
            // Without a known mask the prestage made every directory owner-only.
            (None, &["chmod c 750", "chmod b 755", "chmod a 755"]),
        ];
        for &(umask, want) in cases {
            let plan = over_plan(&a, &b, &[], umask);
            let got: Vec<String> = render(&plan.ops)
                .into_iter()
                .filter(|l| l.starts_with("mkdir") || l.starts_with("chmod") || l.starts_with("rm"))
                .collect();
            assert_eq!(got, want, "umask {umask:?}");
        }
    }

    #[test]
    fn a_prestage_links_every_file_from_its_own_path() {
        let a = m(vec![
            Entry::dir("d", 0o555).unwrap(),
            f("d/one", "same", 0o644),
            f("two", "same", 0o644),
            Entry::symlink("s", "two").unwrap(),
        ]);
        let ops = plan_prestage(
            Basis {
                id: &id("a"),
                manifest: &a,
            },
            Some(0o022),
        );
        assert_eq!(
            render(&ops),
            [
                "mkdir d",
                "link d/one <- a:d/one",
                "symlink s -> two",
                "link two <- a:two",
            ]
        );
    }

    /// What a tree holds, by path: a directory's mode, or a file's (content, mode), or a
    /// symlink's target.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Node {
        Dir(u32),
        File(Hash, u32),
        Link(String),
    }

    type Tree = std::collections::BTreeMap<String, Node>;

    fn apply_model(
        tree: &mut Tree,
        ops: &[Op],
        content_of: &dyn Fn(&RelPath) -> (Hash, u32),
        stamp_at: &dyn Fn(&RelPath) -> Option<FileStamp>,
    ) {
        let parent_is_dir = |tree: &Tree, p: &RelPath| match p.parent() {
            None => true,
            Some(q) => matches!(tree.get(q.as_str()), Some(Node::Dir(_))),
        };
        for op in ops {
            match op {
                Op::Remove { path, dir } => {
                    let key = path.as_str();
                    let child = format!("{key}/");
                    assert!(
                        !tree.keys().any(|k| k.starts_with(&child)),
                        "removing non-empty {key}"
                    );
                    let node = tree.remove(key).expect("removing what is not there");
                    assert_eq!(matches!(node, Node::Dir(_)), *dir, "{key}");
                }
                Op::CreateDir { path, mode } => {
                    assert!(parent_is_dir(tree, path), "{path}");
                    assert!(tree.insert(path.to_string(), Node::Dir(*mode)).is_none());
                }
                Op::SetDirMode { path, mode } => {
                    let n = tree.get_mut(path.as_str()).expect("chmod of nothing");
                    assert!(matches!(n, Node::Dir(_)));
                    *n = Node::Dir(*mode);
                }
                Op::Symlink { path, target } => {
                    assert!(parent_is_dir(tree, path), "{path}");
                    assert!(tree
                        .insert(path.to_string(), Node::Link(target.clone()))
                        .is_none());
                }
                Op::Keep {
                    path,
                    mode,
                    hash,
                    stamp,
                    ..
                } => {
                    assert_eq!(
                        tree.get(path.as_str()),
                        Some(&Node::File(*hash, *mode)),
                        "kept {path}"
                    );
                    assert_eq!(stamp_at(path), Some(*stamp), "identity kept for {path}");
                }
                Op::Link {
                    path, from_path, ..
                } => {
                    assert!(parent_is_dir(tree, path), "{path}");
                    let (hash, mode) = content_of(from_path);
                    assert!(tree
                        .insert(path.to_string(), Node::File(hash, mode))
                        .is_none());
                }
                Op::LinkObject {
                    path, mode, hash, ..
                }
                | Op::WriteFull {
                    path, mode, hash, ..
                }
                | Op::WriteDelta {
                    path, mode, hash, ..
                } => {
                    assert!(parent_is_dir(tree, path), "{path}");
                    assert!(tree
                        .insert(path.to_string(), Node::File(*hash, *mode))
                        .is_none());
                }
                Op::SyncTree
                | Op::Verify
                | Op::WriteRecord
                | Op::MarkComplete
                | Op::Activate
                | Op::Prune { .. } => {}
            }
        }
    }

    fn tree_of(m: &Manifest) -> Tree {
        m.entries()
            .iter()
            .map(|e| {
                let node = match &e.kind {
                    EntryKind::Dir { mode } => Node::Dir(*mode),
                    &EntryKind::File { mode, hash, .. } => Node::File(hash, mode),
                    EntryKind::Symlink { target } => Node::Link(target.clone()),
                };
                (e.path.to_string(), node)
            })
            .collect()
    }

    /// A small random release over a few names, contents and modes, so two of them share much.
    fn arb_manifest() -> impl proptest::strategy::Strategy<Value = Manifest> {
        use proptest::prelude::*;
        const NAMES: [&str; 3] = ["a", "b", "c"];
        let kind = prop_oneof![
            (0u8..2).prop_map(|m| (0u8, m)),
            (0u8..3, 0u8..2).prop_map(|(c, m)| (1 + c, m)),
            (0u8..2).prop_map(|t| (4, t)),
        ];
        proptest::collection::btree_map(
            proptest::collection::vec(proptest::sample::select(&NAMES[..]), 1..4)
                .prop_map(|v| v.join("/")),
            kind,
            0..14,
        )
        .prop_map(|picked| {
            // Parents of a path become directories; paths under a non-directory are dropped.
            let mut entries: std::collections::BTreeMap<String, Entry> = Default::default();
            for (path, (k, v)) in picked {
                let parts: Vec<&str> = path.split('/').collect();
                let mut blocked = false;
                for i in 1..parts.len() {
                    let parent = parts[..i].join("/");
                    match entries.get(&parent) {
                        Some(e) if !e.is_dir() => {
                            blocked = true;
                            break;
                        }
                        Some(_) => {}
                        None => {
                            entries.insert(parent.clone(), Entry::dir(&parent, 0o755).unwrap());
                        }
                    }
                }
                if blocked || entries.contains_key(&path) {
                    continue;
                }
                let modes = [0o644, 0o755];
                let e = match k {
                    0 => Entry::dir(&path, [0o755, 0o555][v as usize]).unwrap(),
                    4 => Entry::symlink(&path, ["x", "y"][v as usize]).unwrap(),
                    c => {
                        let content = ["one", "two", "three"][(c - 1) as usize];
                        f(&path, content, modes[v as usize])
                    }
                };
                entries.insert(path, e);
            }
            m(entries.into_values().collect())
        })
    }

    proptest::proptest! {
        /// Applied to a model of the prestaged tree of A, a plan over it gives exactly B: every
        /// removal takes something that is there and empty, nothing is created where something
        /// is, and what is kept is what B wants.
        #[test]
        fn a_plan_over_a_prestaged_tree_turns_it_into_the_new_release(
            a in arb_manifest(),
            b in arb_manifest(),
            broken_bits in proptest::collection::vec(proptest::bool::ANY, 16),
            umask in proptest::sample::select(vec![None, Some(0o022), Some(0o002)]),
        ) {
            let broken: Vec<&str> = a
                .files()
                .zip(&broken_bits)
                .filter(|(_, b)| **b)
                .map(|((p, ..), _)| p.as_str())
                .collect();
            let prestage = plan_prestage(Basis { id: &id("a"), manifest: &a }, umask);
            let content_of = |p: &RelPath| match a.get(p).map(|e| &e.kind) {
                Some(&EntryKind::File { hash, mode, .. }) => (hash, mode),
                other => panic!("link from {p}, which is {other:?}"),
            };
            let stamps = stamps_of(&a);
            let stamp_at = |p: &RelPath| {
                a.files().position(|(q, ..)| q == p).map(|i| stamps[i])
            };
            let mut tree = Tree::new();
            apply_model(&mut tree, &prestage, &content_of, &stamp_at);
            let plan = over_plan(&a, &b, &broken, umask);
            apply_model(&mut tree, &plan.ops, &content_of, &stamp_at);
            proptest::prop_assert_eq!(tree, tree_of(&b));
            for op in &plan.ops {
                if let Op::Keep { path, .. } = op {
                    proptest::prop_assert!(!broken.contains(&path.as_str()), "kept broken {}", path);
                }
            }
        }
    }
}

//! Derives release b from release a the way a typical deploy differs from the previous one.
//!
//! About 3.5% of paths get small edits, 0.5% are added, 0.3% removed, a handful moved to another
//! directory unchanged and exactly one file turns executable. Only plain PHP class files are removed,
//! moved or chmodded, so every symlink target and executable of a survives into b.

use std::collections::BTreeSet;

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::content::Kind;
use crate::layout::{class_name, lognormal, Entry, FileSpec, Tree};

/// What differs between a and b, as sorted relative paths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Changes {
    pub edited: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub renamed: Vec<(String, String)>,
    pub mode_changed: Vec<String>,
}

/// Default share of files edited; [`crate::Options::edited_share`] overrides it.
pub(crate) const EDITED_SHARE: f64 = 0.035;
pub(crate) const ADDED_SHARE: f64 = 0.005;
pub(crate) const REMOVED_SHARE: f64 = 0.003;

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(p, _)| p)
}

fn file_name(path: &str) -> &str {
    path.rsplit_once('/').map_or(path, |(_, n)| n)
}

fn is_editable(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::PhpClass
            | Kind::PhpConfig
            | Kind::PhpRoutes
            | Kind::Migration
            | Kind::Blade
            | Kind::Js
    )
}

/// Builds b from a, editing about `edited_share` of a's files (capped by how many files are of an
/// editable kind). `a` must come from [`crate::layout::plan`].
pub(crate) fn derive(rng: &mut ChaCha8Rng, a: &Tree, edited_share: f64) -> (Tree, Changes) {
    let files: Vec<(&String, &FileSpec)> = a
        .iter()
        .filter_map(|(p, e)| match e {
            Entry::File(f) => Some((p, f)),
            Entry::Symlink(_) => None,
        })
        .collect();
    let n = files.len();
    let edit_count = (n as f64 * edited_share).round() as usize;
    let add_count = ((n as f64 * ADDED_SHARE).round() as usize).max(1);
    let remove_count = ((n as f64 * REMOVED_SHARE).round() as usize).max(1);
    let rename_count = (5 + n / 5000).min(10);
    let next_id = files.iter().map(|(_, f)| f.id).max().map_or(0, |m| m + 1);

    let is_movable = |p: &str, f: &FileSpec| {
        f.kind == Kind::PhpClass && f.mode == 0o644 && !p.starts_with("vendor/composer/")
    };
    let mut movable: Vec<&String> = files
        .iter()
        .filter(|(p, f)| is_movable(p, f))
        .map(|(p, _)| *p)
        .collect();
    movable.shuffle(rng);
    let mut movable = movable.into_iter();
    let removed: Vec<String> = movable.by_ref().take(remove_count).cloned().collect();
    let moved: Vec<String> = movable.by_ref().take(rename_count).cloned().collect();
    let chmodded: Vec<String> = movable.by_ref().take(1).cloned().collect();

    let taken: BTreeSet<&String> = removed.iter().chain(&moved).chain(&chmodded).collect();
    let mut editable: Vec<&String> = files
        .iter()
        .filter(|(p, f)| is_editable(f.kind) && !taken.contains(p))
        .map(|(p, _)| *p)
        .collect();
    editable.shuffle(rng);
    let edited: Vec<String> = editable.into_iter().take(edit_count).cloned().collect();

    let class_dirs: Vec<&str> = files
        .iter()
        .filter(|(p, f)| is_movable(p, f))
        .map(|(p, _)| parent(p))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();

    let mut b = a.clone();
    for path in &removed {
        b.remove(path);
    }
    for path in &edited {
        if let Some(Entry::File(spec)) = b.get_mut(path) {
            spec.edit = Some(rng.gen());
        }
    }
    for path in &chmodded {
        if let Some(Entry::File(spec)) = b.get_mut(path) {
            spec.mode = 0o755;
        }
    }

    let mut renamed = Vec::new();
    for from in &moved {
        let name = file_name(from);
        let to = (0u32..)
            .map(|attempt| {
                let dir = class_dirs[rng.gen_range(0..class_dirs.len())];
                if attempt < 64 {
                    format!("{dir}/{name}")
                } else {
                    format!("{dir}/Moved{attempt}{name}")
                }
            })
            .find(|to| parent(to) != parent(from) && !a.contains_key(to) && !b.contains_key(to))
            .expect("an unbounded attempt counter always finds a free name");
        let entry = b.remove(from).expect("moved paths come from a");
        b.insert(to.clone(), entry);
        renamed.push((from.clone(), to));
    }

    let mut sizes: Vec<u64> = files
        .iter()
        .filter(|(_, f)| f.kind == Kind::PhpClass)
        .map(|(_, f)| f.size)
        .collect();
    sizes.sort_unstable();
    let median = sizes.get(sizes.len() / 2).copied().unwrap_or(4000) as f64;
    let mut added = Vec::new();
    for i in 0..add_count {
        let to = loop {
            let dir = class_dirs[rng.gen_range(0..class_dirs.len())];
            let path = format!("{dir}/{}.php", class_name(rng, ""));
            if !a.contains_key(&path) && !b.contains_key(&path) {
                break path;
            }
        };
        let size = (median * lognormal(rng, 1.0)).clamp(150.0, 400_000.0) as u64;
        let spec = FileSpec {
            id: next_id + i as u32,
            kind: Kind::PhpClass,
            seed: rng.gen(),
            size,
            mode: 0o644,
            edit: None,
        };
        b.insert(to.clone(), Entry::File(spec));
        added.push(to);
    }

    let mut changes = Changes {
        edited,
        added,
        removed,
        renamed,
        mode_changed: chmodded,
    };
    changes.edited.sort();
    changes.added.sort();
    changes.removed.sort();
    changes.renamed.sort();
    (b, changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::plan;
    use rand::SeedableRng;

    fn pair(seed: u64, files: usize) -> (Tree, Tree, Changes) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let a = plan(&mut rng, files, files as u64 * 5000);
        let (b, changes) = derive(&mut rng, &a, EDITED_SHARE);
        (a, b, changes)
    }

    #[test]
    fn change_sets_are_disjoint_and_consistent_with_the_trees() {
        for (seed, files) in [(1, 100), (2, 300), (3, 3000)] {
            let (a, b, c) = pair(seed, files);
            let mut seen = BTreeSet::new();
            let froms = c.renamed.iter().map(|(f, _)| f);
            for p in c
                .edited
                .iter()
                .chain(&c.removed)
                .chain(froms)
                .chain(&c.mode_changed)
            {
                assert!(seen.insert(p.clone()), "{p} is in two change sets");
                assert!(a.contains_key(p), "{p} not in a");
            }
            for p in &c.removed {
                assert!(!b.contains_key(p), "removed {p} still in b");
            }
            for p in &c.added {
                assert!(!a.contains_key(p) && b.contains_key(p), "added {p}");
            }
            for (from, to) in &c.renamed {
                assert!(
                    !b.contains_key(from) && !a.contains_key(to),
                    "{from} -> {to}"
                );
                assert_eq!(a.get(from), b.get(to), "{from} -> {to} changed content");
                assert_ne!(
                    parent(from),
                    parent(to),
                    "{from} -> {to} stays in its directory"
                );
            }
            assert_eq!(c.mode_changed.len(), 1);
            for p in &c.mode_changed {
                match (a.get(p), b.get(p)) {
                    (Some(Entry::File(x)), Some(Entry::File(y))) => {
                        assert_eq!((x.mode, y.mode), (0o644, 0o755));
                        assert_eq!((x.id, x.edit), (y.id, y.edit));
                    }
                    other => panic!("{p}: {other:?}"),
                }
            }
            let untouched = a
                .iter()
                .filter(|(p, _)| !seen.contains(*p))
                .filter(|(p, e)| b.get(*p) != Some(*e))
                .count();
            assert_eq!(untouched, 0, "paths outside the change sets differ");
            assert!((5..=10).contains(&c.renamed.len()));
        }
    }
}

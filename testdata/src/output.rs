//! Writes planned release trees to disk, in parallel, with fixed modes and chosen mtimes.
//!
//! Files that share content across the pair (unchanged, moved, chmodded or edited) are rendered once
//! and written to every place they appear, which halves the work of rendering release b.

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rayon::prelude::*;

use crate::content::{edit_text, render};
use crate::layout::{dirs, Entry, FileSpec, Tree};
use crate::{GenerateError, TreeStats};

pub(crate) fn io_error(path: &Path) -> impl FnOnce(io::Error) -> GenerateError + '_ {
    move |source| GenerateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `root` and every directory of `tree` under it, mode 0755 whatever the umask.
pub(crate) fn create_dirs(root: &Path, tree: &Tree) -> Result<(), GenerateError> {
    let mut builder = DirBuilder::new();
    builder.mode(0o755);
    let dirs = dirs(tree);
    let all = std::iter::once(root.to_path_buf()).chain(dirs.iter().map(|d| root.join(d)));
    for dir in all {
        builder.create(&dir).map_err(io_error(&dir))?;
        fs::set_permissions(&dir, Permissions::from_mode(0o755)).map_err(io_error(&dir))?;
    }
    Ok(())
}

/// Sets the mtime of `root` and every directory of `tree`; done last, since creating entries in a
/// directory bumps its mtime.
pub(crate) fn stamp_dirs(root: &Path, tree: &Tree, mtime: SystemTime) -> Result<(), GenerateError> {
    let dirs = dirs(tree);
    let all = std::iter::once(root.to_path_buf()).chain(dirs.iter().map(|d| root.join(d)));
    for dir in all {
        File::open(&dir)
            .and_then(|f| f.set_modified(mtime))
            .map_err(io_error(&dir))?;
    }
    Ok(())
}

pub(crate) fn write_file(
    path: &Path,
    data: &[u8],
    mode: u32,
    mtime: SystemTime,
) -> Result<(), GenerateError> {
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        f.write_all(data)?;
        f.set_permissions(Permissions::from_mode(mode))?;
        f.set_modified(mtime)
    };
    write().map_err(io_error(path))
}

struct Place<'t> {
    root: usize,
    path: &'t str,
    spec: &'t FileSpec,
}

/// Writes `trees[i]` under `roots[i]` with mtime `mtimes[i]`; returns the bytes written per tree.
pub(crate) fn write_trees(
    roots: [&Path; 2],
    trees: [&Tree; 2],
    mtimes: [SystemTime; 2],
) -> Result<[u64; 2], GenerateError> {
    for (root, tree) in roots.iter().zip(trees) {
        create_dirs(root, tree)?;
    }
    let mut groups: BTreeMap<u32, Vec<Place<'_>>> = BTreeMap::new();
    for (i, tree) in trees.iter().enumerate() {
        for (path, entry) in tree.iter() {
            match entry {
                Entry::File(spec) => groups.entry(spec.id).or_default().push(Place {
                    root: i,
                    path,
                    spec,
                }),
                Entry::Symlink(target) => {
                    let link: PathBuf = roots[i].join(path);
                    std::os::unix::fs::symlink(target, &link).map_err(io_error(&link))?;
                }
            }
        }
    }
    let groups: Vec<Vec<Place<'_>>> = groups.into_values().collect();
    let bytes = groups
        .par_iter()
        .map(|places| {
            let first = &places[0];
            let base = render(
                first.path,
                first.spec.kind,
                first.spec.seed,
                first.spec.size,
            );
            let mut bytes = [0u64; 2];
            for place in places {
                let edited;
                let data = match place.spec.edit {
                    Some(seed) => {
                        edited = edit_text(&base, seed);
                        &edited
                    }
                    None => &base,
                };
                let path = roots[place.root].join(place.path);
                write_file(&path, data, place.spec.mode, mtimes[place.root])?;
                bytes[place.root] += data.len() as u64;
            }
            Ok(bytes)
        })
        .try_reduce(|| [0, 0], |x, y| Ok([x[0] + y[0], x[1] + y[1]]))?;
    for ((root, tree), mtime) in roots.iter().zip(trees).zip(mtimes) {
        stamp_dirs(root, tree, mtime)?;
    }
    Ok(bytes)
}

/// Counts of a tree; `bytes` is only known once written.
pub(crate) fn stats(tree: &Tree, bytes: u64) -> TreeStats {
    let files = tree
        .values()
        .filter(|e| matches!(e, Entry::File(_)))
        .count() as u64;
    TreeStats {
        files,
        bytes,
        dirs: dirs(tree).len() as u64,
        symlinks: tree.len() as u64 - files,
    }
}

//! Applies a mirror plan to a plain destination directory (`relsync sync`).
//!
//! New file content is written to temporary names next to its destination, verified against the
//! manifest, synced, and only then renamed over the old names, so a reader sees each file either old or
//! new and never half-written, and nothing is written through an existing inode.

use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use cap_fs_ext::DirExt as _;
use cap_std::fs::{Dir, OpenOptions, Permissions};
use rayon::prelude::*;

use super::exec::{hash_file, ContentSource};
use super::root::sync_fs;
use super::{EdgeError, IoContext};
use crate::plan::MirrorOp;
pub use crate::plan::MirrorStats;

/// Applies `ops` under `dst_path`, creating it first if needed.
pub fn apply_mirror(
    dst_path: &Path,
    ops: &[MirrorOp],
    source: &dyn ContentSource,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<MirrorStats, EdgeError> {
    std::fs::create_dir_all(dst_path).ctx("create", dst_path)?;
    let dst =
        Dir::open_ambient_dir(dst_path, cap_std::ambient_authority()).ctx("open", dst_path)?;
    apply_mirror_in(&dst, dst_path, ops, source, progress)
}

/// Applies `ops` inside the open directory `dst`; `dst_path` names it in errors. Every lookup is
/// relative to `dst` (cap-std keeps it beneath), which is how relsyncd mirrors into an export
/// without ever resolving the export's path again.
pub fn apply_mirror_in(
    dst: &Dir,
    dst_path: &Path,
    ops: &[MirrorOp],
    source: &dyn ContentSource,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<MirrorStats, EdgeError> {
    let at = |p: &str| dst_path.join(p);
    let mut stats = MirrorStats::default();
    let counter = AtomicU64::new(0);
    let tmp_name = |p: &crate::path::RelPath| {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        match p.parent() {
            Some(d) => format!("{d}/.relsync-tmp-{}-{n}", std::process::id()),
            None => format!(".relsync-tmp-{}-{n}", std::process::id()),
        }
    };
    let mut renames: Vec<(String, &crate::path::RelPath)> = Vec::new();
    let mut writes: Vec<&MirrorOp> = Vec::new();
    for op in ops {
        match op {
            MirrorOp::Remove { path, dir } => {
                if *dir {
                    dst.remove_dir_all(path.as_str())
                        .ctx("remove", at(path.as_str()))?;
                } else {
                    dst.remove_file(path.as_str())
                        .ctx("remove", at(path.as_str()))?;
                }
                stats.removed += 1;
            }
            MirrorOp::CreateDir { path, mode } => {
                dst.create_dir(path.as_str())
                    .ctx("create directory", at(path.as_str()))?;
                stats.dirs += 1;
                // Owner must be able to fill it; the final mode is set once it is filled.
                set_mode(dst, path.as_str(), mode | 0o700).ctx("chmod", at(path.as_str()))?;
            }
            MirrorOp::SetDirMode { .. } => {}
            MirrorOp::Write { .. } | MirrorOp::Symlink { .. } => writes.push(op),
        }
    }
    let staged: Vec<(String, &crate::path::RelPath, Option<u64>)> = writes
        .par_iter()
        .map(|op| -> Result<_, EdgeError> {
            match op {
                MirrorOp::Write {
                    path,
                    size,
                    mode,
                    hash,
                    basis,
                } => {
                    let tmp = tmp_name(path);
                    let mut o = OpenOptions::new();
                    o.write(true).create_new(true);
                    let mut out = dst.open_with(&tmp, &o).ctx("create", at(&tmp))?.into_std();
                    let result = (|| {
                        let basis_file = basis.as_ref().and_then(|b| {
                            let mut r = OpenOptions::new();
                            r.read(true);
                            cap_fs_ext::OpenOptionsFollowExt::follow(
                                &mut r,
                                cap_fs_ext::FollowSymlinks::No,
                            );
                            dst.open_with(b.as_str(), &r).ok().map(|f| f.into_std())
                        });
                        match basis_file {
                            Some(bf) => source.write_with_basis(path, *size, &bf, &mut out)?,
                            None => source.write_full(path, *size, &mut out)?,
                        }
                        out.set_permissions(std::fs::Permissions::from_mode(*mode))
                            .ctx("chmod", at(path.as_str()))?;
                        let f = dst.open(&tmp).ctx("open", at(&tmp))?.into_std();
                        let got = hash_file(f).ctx("read", at(&tmp))?;
                        if got != *hash {
                            return Err(EdgeError::Verify {
                                path: path.clone(),
                                reason: "written content does not match the source's hash".into(),
                            });
                        }
                        Ok(())
                    })();
                    if let Err(e) = result {
                        let _ = dst.remove_file(&tmp);
                        return Err(e);
                    }
                    progress(*size);
                    Ok((tmp, path, Some(*size)))
                }
                MirrorOp::Symlink { path, target } => {
                    let tmp = tmp_name(path);
                    dst.symlink_contents(target, &tmp)
                        .ctx("create symlink", at(&tmp))?;
                    Ok((tmp, path, None))
                }
                _ => unreachable!("only writes collected"),
            }
        })
        .collect::<Vec<_>>()
        .into_iter()
        .collect::<Result<_, _>>()
        .inspect_err(|_| remove_temps(dst))?;
    // Content is durable before any name points to it.
    sync_fs(dst, dst_path).inspect_err(|_| remove_temps(dst))?;
    for (tmp, path, size) in staged {
        if let Some(size) = size {
            stats.written_files += 1;
            stats.written_bytes += size;
        }
        renames.push((tmp, path));
    }
    for (tmp, path) in &renames {
        dst.rename(tmp, dst, path.as_str())
            .ctx("rename", at(path.as_str()))?;
    }
    for op in ops.iter().rev() {
        if let MirrorOp::CreateDir { path, mode } | MirrorOp::SetDirMode { path, mode } = op {
            set_mode(dst, path.as_str(), *mode).ctx("chmod", at(path.as_str()))?;
        }
    }
    sync_fs(dst, dst_path)?;
    Ok(stats)
}

fn set_mode(dir: &Dir, path: &str, mode: u32) -> io::Result<()> {
    dir.set_permissions(
        path,
        Permissions::from_std(std::fs::Permissions::from_mode(mode)),
    )
}

/// Names of relsync's temporaries in a mirror (left by an interrupted sync; never part of a scan).
pub const TEMP_PATTERN: &str = ".relsync-tmp-*";

/// Removes every entry named like [`TEMP_PATTERN`] below `dst`, directories with their contents,
/// without following symlinks: what an interrupted sync (or relsyncd's per-sync work directory)
/// left behind. Returns how many entries went; entries that cannot be removed are left.
pub fn remove_temporaries(dst: &Dir) -> u64 {
    fn walk(dir: &Dir, depth: usize, removed: &mut u64) {
        let Ok(entries) = dir.entries() else { return };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let Ok(kind) = e.file_type() else { continue };
            if name.starts_with(TEMP_PREFIX) {
                let gone = if kind.is_dir() {
                    dir.remove_dir_all(name.as_ref())
                } else {
                    dir.remove_file(name.as_ref())
                };
                *removed += u64::from(gone.is_ok());
            } else if depth < 64 && kind.is_dir() {
                if let Ok(sub) = dir.open_dir_nofollow(name.as_ref()) {
                    walk(&sub, depth + 1, removed);
                }
            }
        }
    }
    let mut removed = 0;
    walk(dst, 0, &mut removed);
    removed
}

const TEMP_PREFIX: &str = ".relsync-tmp-";

/// Best-effort removal of temporaries after a failed write phase.
fn remove_temps(dst: &Dir) {
    fn walk(dir: &Dir, depth: usize) {
        let Ok(entries) = dir.entries() else { return };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".relsync-tmp-") {
                let _ = dir.remove_file(name.as_ref());
            } else if depth < 64 && e.file_type().is_ok_and(|t| t.is_dir()) {
                if let Ok(sub) = dir.open_dir(name.as_ref()) {
                    walk(&sub, depth + 1);
                }
            }
        }
    }
    walk(dst, 0);
}

/// The path a mirror of `src` into `dst` lands in, rsync-style: `src/` copies the contents of src into
/// dst; `src` (no trailing slash) copies the directory itself into `dst/<name of src>`.
pub fn mirror_destination(src: &str, dst: &Path) -> PathBuf {
    if src.ends_with('/') {
        return dst.to_owned();
    }
    match Path::new(src).file_name() {
        Some(name) => dst.join(name),
        None => dst.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_slash_semantics() {
        let d = Path::new("/dst");
        assert_eq!(mirror_destination("src/", d), Path::new("/dst"));
        assert_eq!(mirror_destination("a/src", d), Path::new("/dst/src"));
        assert_eq!(mirror_destination("/", d), Path::new("/dst"));
        assert_eq!(mirror_destination(".", d), Path::new("/dst"));
    }

    #[test]
    fn temporaries_are_removed_at_any_depth_without_following_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let (dst, outside) = (tmp.path().join("dst"), tmp.path().join("outside"));
        for d in ["a/b", ".relsync-tmp-sync-1-0/objects"] {
            std::fs::create_dir_all(dst.join(d)).unwrap();
        }
        std::fs::create_dir_all(&outside).unwrap();
        let files = [
            "a/b/.relsync-tmp-7-3",
            ".relsync-tmp-7-4",
            ".relsync-tmp-sync-1-0/objects/x",
            "a/keep",
        ];
        for f in files {
            std::fs::write(dst.join(f), b"x").unwrap();
        }
        std::fs::write(outside.join(".relsync-tmp-9-9"), b"not ours").unwrap();
        std::os::unix::fs::symlink(&outside, dst.join("a/link")).unwrap();
        let dir = Dir::open_ambient_dir(&dst, cap_std::ambient_authority()).unwrap();
        assert_eq!(remove_temporaries(&dir), 3);
        assert!(dst.join("a/keep").exists());
        assert!(!dst.join(".relsync-tmp-sync-1-0").exists());
        assert!(!dst.join("a/b/.relsync-tmp-7-3").exists());
        assert!(outside.join(".relsync-tmp-9-9").exists());
        assert_eq!(remove_temporaries(&dir), 0);
    }
}

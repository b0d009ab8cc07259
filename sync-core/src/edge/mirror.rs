//! Applies a mirror plan to a plain destination directory (`relsync sync`).
//!
//! New file content is written to temporary names next to its destination, verified against the
//! manifest, synced, and only then renamed over the old names, so a reader sees each file either old or
//! new and never half-written, and nothing is written through an existing inode.

use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use cap_std::fs::{Dir, OpenOptions, Permissions};
use rayon::prelude::*;
use serde::Serialize;

use super::exec::{hash_file, ContentSource};
use super::root::sync_fs;
use super::{EdgeError, IoContext};
use crate::plan::MirrorOp;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MirrorStats {
    pub removed: u64,
    pub written_files: u64,
    pub written_bytes: u64,
    pub dirs: u64,
}

/// Applies `ops` under `dst`.
pub fn apply_mirror(
    dst_path: &Path,
    ops: &[MirrorOp],
    source: &dyn ContentSource,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<MirrorStats, EdgeError> {
    std::fs::create_dir_all(dst_path).ctx("create", dst_path)?;
    let dst =
        Dir::open_ambient_dir(dst_path, cap_std::ambient_authority()).ctx("open", dst_path)?;
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
                set_mode(&dst, path.as_str(), mode | 0o700).ctx("chmod", at(path.as_str()))?;
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
        .inspect_err(|_| remove_temps(&dst))?;
    // Content is durable before any name points to it.
    sync_fs(&dst, dst_path).inspect_err(|_| remove_temps(&dst))?;
    for (tmp, path, size) in staged {
        if let Some(size) = size {
            stats.written_files += 1;
            stats.written_bytes += size;
        }
        renames.push((tmp, path));
    }
    for (tmp, path) in &renames {
        dst.rename(tmp, &dst, path.as_str())
            .ctx("rename", at(path.as_str()))?;
    }
    for op in ops.iter().rev() {
        if let MirrorOp::CreateDir { path, mode } | MirrorOp::SetDirMode { path, mode } = op {
            set_mode(&dst, path.as_str(), *mode).ctx("chmod", at(path.as_str()))?;
        }
    }
    sync_fs(&dst, dst_path)?;
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
}

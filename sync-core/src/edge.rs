//! The file-system edge: the only part of sync-core that touches disks.
//!
//! Everything here works relative to directory handles (cap-std), never writes through a path whose
//! inode another release shares (new content always goes to a fresh inode that is renamed into place),
//! and reports failures as [`EdgeError`]s that name the file or release involved.

pub mod activate;
pub mod deploy;
pub mod exec;
pub mod mirror;
pub mod object;
pub mod root;
pub mod scan;

use std::io;
use std::path::PathBuf;

use crate::manifest::ManifestError;
use crate::path::RelPath;
use crate::plan::PlanError;
use crate::release::{RecordError, ReleaseId};

/// A failure at the file-system edge.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EdgeError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("app root {root} is busy (held by {holder}); wait for that deploy to finish")]
    Busy { root: PathBuf, holder: String },
    #[error("release {0} does not exist; `relsync releases` lists the kept ones")]
    NoSuchRelease(ReleaseId),
    #[error("release {0} already exists; pick another --release-id")]
    ReleaseExists(ReleaseId),
    #[error("there is no release to roll back to")]
    NoRollbackTarget,
    #[error("refusing to prune {0}: it is current or the rollback target")]
    Protected(ReleaseId),
    #[error("release record of {id} is unreadable; remove {path} if the release is gone")]
    Record {
        id: String,
        path: PathBuf,
        #[source]
        source: RecordError,
    },
    /// A build that waited for content a push was delivering, and the push ended first.
    #[error("building the release was cancelled: {0}")]
    Cancelled(String),
    #[error("verification failed for {path}: {reason}; the release was not activated")]
    Verify { path: RelPath, reason: String },
    #[error("not enough space under {root}: {need} bytes to write, {free} free")]
    NoSpace { root: PathBuf, need: u64, free: u64 },
    #[error("source file {path} changed or could not be read: {reason}")]
    Source { path: RelPath, reason: String },
    #[error("writing {path}")]
    Staging {
        path: PathBuf,
        #[source]
        source: Box<EdgeError>,
    },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Scan(#[from] scan::ScanError),
    #[error("shared path {path} is missing: create {} (a directory or a file) before deploying, or remove it from the shared list", root.join("shared").join(path.as_str()).display())]
    SharedMissing { root: PathBuf, path: RelPath },
    #[error("app root config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error(transparent)]
    Activation(#[from] activate::ActivationError),
}

/// Attaches what was being done and to which path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: &'static str, path: impl Into<PathBuf>) -> Result<T, EdgeError>;

    /// As [`IoContext::ctx`], with the path made only on failure (for calls made per file).
    fn ctx_with(self, what: &'static str, path: impl FnOnce() -> PathBuf) -> Result<T, EdgeError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: &'static str, path: impl Into<PathBuf>) -> Result<T, EdgeError> {
        self.map_err(|source| EdgeError::Io {
            what,
            path: path.into(),
            source,
        })
    }

    fn ctx_with(self, what: &'static str, path: impl FnOnce() -> PathBuf) -> Result<T, EdgeError> {
        self.map_err(|source| EdgeError::Io {
            what,
            path: path(),
            source,
        })
    }
}

/// `error: cause: cause…` in one line, for logs and the journal.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The process's umask, read once: relsync never changes it, and setting it to read it would
/// race with other threads creating files. `None` where `/proc` does not tell; callers then
/// create owner-only and set modes afterwards.
pub(crate) fn umask() -> Option<u32> {
    static UMASK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        parse_umask(&status)
    })
}

fn parse_umask(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
    u32::from_str_radix(line.trim(), 8).ok()
}

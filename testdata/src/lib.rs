//! Seeded generator of release pairs that look like a PHP application: release a, and release b as
//! the next deploy of it (a few percent of files edited, some added, removed and moved, one chmod).
//!
//! Tests use a tiny corpus ([`Options::tiny`]), benchmarks the default one (~15,000 files, ~110 MB,
//! the anchor workload of `shared/docs/performance.md`). The same options always give byte-identical
//! trees: everything is drawn from ChaCha streams and sorted maps, never from hash-map order or the
//! clock. Only mtimes depend on when the corpus was made: a is stamped an hour ago, b now, so that
//! mtime-based quick checks find nothing equal, as after a fresh CI checkout.

mod blob;
mod change;
mod content;
mod layout;
mod output;

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use blob::BIG_FILE_PATH;

/// Default size of the big file in [`Options::big_file`] mode: 1 GiB.
pub const DEFAULT_BIG_FILE: u64 = 1 << 30;

/// Name of the summary written next to `a/` and `b/`.
pub const SUMMARY_FILE: &str = "summary.json";

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Options {
    /// Seed of every random choice; the same seed gives the same trees.
    pub seed: u64,
    /// Regular files in release a (b differs by the added and removed ones).
    pub files: usize,
    /// Approximate total size of release a in bytes.
    pub bytes: u64,
    /// When set, generate the big-file pair instead: one file of this many bytes at
    /// [`BIG_FILE_PATH`] in a, and in b the same file with ten small edits.
    pub big_file: Option<u64>,
    /// Share of a's files (0.0 to 1.0) edited in b; the default is 3.5%. Only text-like files
    /// (PHP, templates, JavaScript) are edited, so a share above theirs edits all of them.
    /// Added, removed, moved and chmodded files do not depend on it.
    pub edited_share: f64,
}

impl Default for Options {
    /// The anchor workload: 15,000 files, 110 MB.
    fn default() -> Self {
        Options {
            seed: 1,
            files: 15_000,
            bytes: 110_000_000,
            big_file: None,
            edited_share: change::EDITED_SHARE,
        }
    }
}

impl Options {
    /// A corpus small enough for unit tests: 300 files, 2 MB, written in a few tens of milliseconds.
    pub fn tiny(seed: u64) -> Self {
        Options {
            seed,
            files: 300,
            bytes: 2_000_000,
            big_file: None,
            edited_share: change::EDITED_SHARE,
        }
    }

    /// The big-file pair with a file of `size` bytes.
    pub fn big(seed: u64, size: u64) -> Self {
        Options {
            seed,
            big_file: Some(size),
            ..Options::default()
        }
    }
}

/// Counts of one release tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeStats {
    /// Regular files.
    pub files: u64,
    /// Bytes in regular files.
    pub bytes: u64,
    /// Directories, not counting the release root.
    pub dirs: u64,
    pub symlinks: u64,
}

/// A file moved to another directory with identical content and mode.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Rename {
    pub from: String,
    pub to: String,
}

/// What was generated and how b differs from a. Paths are relative to the release root, with `/`
/// separators, sorted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub seed: u64,
    /// Size of the big file in a, in big-file mode.
    pub big_file: Option<u64>,
    pub a: TreeStats,
    pub b: TreeStats,
    /// Same path in a and b, content changed by a few lines.
    pub edited: Vec<String>,
    /// Only in b.
    pub added: Vec<String>,
    /// Only in a.
    pub removed: Vec<String>,
    pub renamed: Vec<Rename>,
    /// Same path and content, mode 0644 in a and 0755 in b.
    pub mode_changed: Vec<String>,
}

impl Summary {
    /// Reads `DIR/summary.json` as written by [`generate`].
    pub fn load(dir: &Path) -> Result<Summary, GenerateError> {
        let path = dir.join(SUMMARY_FILE);
        let text = fs::read(&path).map_err(output::io_error(&path))?;
        serde_json::from_slice(&text).map_err(|source| GenerateError::Summary { path, source })
    }
}

/// Why a corpus could not be generated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenerateError {
    #[error("invalid generator options: {reason}")]
    InvalidOptions { reason: String },
    #[error("{} already holds a/ or b/: remove them or pick an empty output directory", path.display())]
    OutputNotEmpty { path: PathBuf },
    #[error("cannot write {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot encode or decode summary {}", path.display())]
    Summary {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn check(options: &Options) -> Result<(), GenerateError> {
    let invalid = |reason: String| Err(GenerateError::InvalidOptions { reason });
    if let Some(size) = options.big_file {
        if size < blob::MIN_BIG_FILE {
            return invalid(format!(
                "big file of {size} bytes is too small: use at least {}",
                blob::MIN_BIG_FILE
            ));
        }
        return Ok(());
    }
    if !(0.0..=1.0).contains(&options.edited_share) {
        return invalid(format!(
            "edited share {} is out of range: use a value from 0.0 to 1.0",
            options.edited_share
        ));
    }
    if options.files < layout::MIN_FILES {
        return invalid(format!(
            "{} files is too few for the application layout: use at least {}",
            options.files,
            layout::MIN_FILES
        ));
    }
    let min_bytes = options.files as u64 * 512;
    if options.bytes < min_bytes {
        return invalid(format!(
            "{} bytes is too little for {} files: use at least {min_bytes}",
            options.bytes, options.files
        ));
    }
    Ok(())
}

/// Writes release a to `OUT/a/`, release b to `OUT/b/` and the returned summary to
/// `OUT/summary.json`. `OUT` is created if missing; it must not hold `a/` or `b/` yet.
pub fn generate(out: &Path, options: &Options) -> Result<Summary, GenerateError> {
    check(options)?;
    fs::create_dir_all(out).map_err(output::io_error(out))?;
    let (ra, rb) = (out.join("a"), out.join("b"));
    if ra.symlink_metadata().is_ok() || rb.symlink_metadata().is_ok() {
        return Err(GenerateError::OutputNotEmpty {
            path: out.to_path_buf(),
        });
    }
    let now = SystemTime::now();
    let mtimes = [now - Duration::from_secs(3600), now];

    let summary = match options.big_file {
        Some(size) => generate_big(&ra, &rb, options.seed, size, mtimes)?,
        None => {
            let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
            let a = layout::plan(&mut rng, options.files, options.bytes);
            let (b, changes) = change::derive(&mut rng, &a, options.edited_share);
            let bytes = output::write_trees([&ra, &rb], [&a, &b], mtimes)?;
            Summary {
                seed: options.seed,
                big_file: None,
                a: output::stats(&a, bytes[0]),
                b: output::stats(&b, bytes[1]),
                edited: changes.edited,
                added: changes.added,
                removed: changes.removed,
                renamed: changes
                    .renamed
                    .into_iter()
                    .map(|(from, to)| Rename { from, to })
                    .collect(),
                mode_changed: changes.mode_changed,
            }
        }
    };
    let path = out.join(SUMMARY_FILE);
    let mut json =
        serde_json::to_vec_pretty(&summary).map_err(|source| GenerateError::Summary {
            path: path.clone(),
            source,
        })?;
    json.push(b'\n');
    fs::write(&path, json).map_err(output::io_error(&path))?;
    Ok(summary)
}

fn generate_big(
    ra: &Path,
    rb: &Path,
    seed: u64,
    size: u64,
    mtimes: [SystemTime; 2],
) -> Result<Summary, GenerateError> {
    let dir = Path::new(BIG_FILE_PATH)
        .parent()
        .expect("the big file sits in a directory");
    let mut builder = DirBuilder::new();
    builder.mode(0o755).recursive(true);
    for root in [ra, rb] {
        let d = root.join(dir);
        builder.create(&d).map_err(output::io_error(&d))?;
    }
    let sizes = blob::write_big_pair(
        &ra.join(BIG_FILE_PATH),
        &rb.join(BIG_FILE_PATH),
        seed,
        size,
        mtimes,
    )?;
    for (root, mtime) in [ra, rb].into_iter().zip(mtimes) {
        for d in [root.join(dir), root.to_path_buf()] {
            fs::File::open(&d)
                .and_then(|f| f.set_modified(mtime))
                .map_err(output::io_error(&d))?;
        }
    }
    let stats = |bytes| TreeStats {
        files: 1,
        bytes,
        dirs: 1,
        symlinks: 0,
    };
    Ok(Summary {
        seed,
        big_file: Some(size),
        a: stats(sizes[0]),
        b: stats(sizes[1]),
        edited: vec![BIG_FILE_PATH.to_string()],
        added: Vec::new(),
        removed: Vec::new(),
        renamed: Vec::new(),
        mode_changed: Vec::new(),
    })
}

/// Parses a size as the command lines of this workspace take it: `1048576`, `64K`, `512M`, `1G`,
/// `1GiB`, `110MB`, `2GB` (K/M/G are binary, KB/MB/GB decimal).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size: write e.g. 4096, 64K, 110MB or 1G"))?;
    let factor: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KIB" => 1 << 10,
        "M" | "MIB" => 1 << 20,
        "G" | "GIB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => {
            return Err(format!(
                "unknown size unit `{unit}`: use K, M, G, KB, MB or GB"
            ))
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Path of a checked-in fixture tree, e.g. `fixture_dir("php-app-v1")`.
pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

#[cfg(test)]
mod tests;

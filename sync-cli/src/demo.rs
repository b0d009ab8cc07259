//! `relsync demo`: a self-contained tour on a generated PHP application.
//!
//! Generates a release pair (about 15k files, 110 MB), deploys release 1 and then release 2 into a
//! throwaway app root, shows the release list, rolls back and forward, and removes everything unless
//! `--keep` is given.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};

/// Runs the demo with this very binary, so what it shows is exactly what a user would type.
pub fn run(dir: Option<PathBuf>, keep: bool, files: usize, bytes: u64) -> Result<()> {
    let (work, _guard) = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            (d, None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("relsync-demo-")
                .tempdir()
                .context("creating a temporary directory")?;
            (t.path().to_owned(), Some(t))
        }
    };
    let exe = std::env::current_exe().context("locating the relsync binary")?;
    let corpus = work.join("corpus");
    let root = work.join("app");
    println!(
        "== generating a sample PHP application ({files} files, ~{} MB) in {}",
        bytes / 1_000_000,
        corpus.display()
    );
    let t = Instant::now();
    let mut opts = relsync_testdata::Options::default();
    opts.files = files;
    opts.bytes = bytes;
    let summary =
        relsync_testdata::generate(&corpus, &opts).context("generating the sample app")?;
    println!(
        "   release 1: {} files; release 2: {} edited, {} added, {} removed, {} renamed, {} mode change ({:.1}s)",
        summary.a.files,
        summary.edited.len(),
        summary.added.len(),
        summary.removed.len(),
        summary.renamed.len(),
        summary.mode_changed.len(),
        t.elapsed().as_secs_f64()
    );
    let cache = work.join("cache");
    let step = |title: &str, args: &[&std::ffi::OsStr]| -> Result<()> {
        println!(
            "\n== {title}\n$ relsync {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let status = Command::new(&exe)
            .args(args)
            .env("RELSYNC_CACHE_DIR", &cache)
            .status()
            .with_context(|| format!("running {}", exe.display()))?;
        anyhow::ensure!(status.success(), "`relsync {}` failed", title);
        Ok(())
    };
    let a = corpus.join("a");
    let b = corpus.join("b");
    let os = |p: &Path| p.as_os_str().to_owned();
    step(
        "deploy release 1 (everything is new)",
        &[
            "deploy".as_ref(),
            &os(&a),
            &os(&root),
            "--release-id".as_ref(),
            "release-1".as_ref(),
        ],
    )?;
    step(
        "plan release 2 without changing anything",
        &[
            "deploy".as_ref(),
            &os(&b),
            &os(&root),
            "--release-id".as_ref(),
            "release-2".as_ref(),
            "--dry-run".as_ref(),
        ],
    )?;
    step(
        "deploy release 2 (hard links for unchanged files, renames detected)",
        &[
            "deploy".as_ref(),
            &os(&b),
            &os(&root),
            "--release-id".as_ref(),
            "release-2".as_ref(),
        ],
    )?;
    step("list releases", &["releases".as_ref(), &os(&root)])?;
    step("roll back", &["rollback".as_ref(), &os(&root)])?;
    step(
        "activate release 2 again",
        &["activate".as_ref(), &os(&root), "release-2".as_ref()],
    )?;
    let mirror = work.join("mirror");
    let mut src_slash = os(&b);
    src_slash.push("/");
    step(
        "mirror release 2 rsync-style",
        &[
            "sync".as_ref(),
            &src_slash,
            &os(&mirror),
            "--delete".as_ref(),
        ],
    )?;
    println!();
    if keep {
        println!("kept everything under {}:", work.display());
        println!(
            "  app root   {}  (current -> {})",
            root.display(),
            std::fs::read_link(root.join("current"))?.display()
        );
        println!(
            "  journal    {}",
            root.join(".relsync/journal.jsonl").display()
        );
        println!("  mirror     {}", mirror.display());
        if let Some(g) = _guard {
            let _ = g.keep();
        }
    } else {
        println!(
            "done; removing {} (pass --keep to look around)",
            work.display()
        );
    }
    Ok(())
}

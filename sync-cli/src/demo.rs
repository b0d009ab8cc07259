//! `relsync demo`: a self-contained tour on a generated PHP application.
//!
//! Generates a release pair (about 15k files, 110 MB), starts a few relsyncd daemons on loopback
//! ([`crate::loopback`]: in this process, each with its own throwaway key and app root), creates a client key, trusts the
//! daemons, pushes release 1 and then release 2 to every daemon, lists releases, rolls one back, and
//! finally builds the same releases locally and mirrors one rsync-style. Every step runs this very
//! binary as a user would type it. Everything is removed at the end unless `--keep` is given.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use sync_server::tls::Identity;

use crate::loopback::LocalDaemons;

/// Runs the demo with `daemons` local daemons.
pub fn run(
    dir: Option<PathBuf>,
    keep: bool,
    files: usize,
    bytes: u64,
    daemons: usize,
) -> Result<()> {
    let (work, guard) = match dir {
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

    // The client's key and known-hosts file live here; the subprocesses find them through
    // RELSYNC_CONFIG_DIR, exactly as `~/.config/relsync` would be used.
    let config_dir = work.join("client");
    let cache = work.join("cache");
    let step = |title: &str, args: &[OsString]| -> Result<()> {
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
            .env("RELSYNC_CONFIG_DIR", &config_dir)
            .status()
            .with_context(|| format!("running {}", exe.display()))?;
        anyhow::ensure!(status.success(), "`relsync {title}` failed");
        Ok(())
    };
    let os = |s: &str| OsString::from(s);
    let p = |p: &Path| p.as_os_str().to_owned();

    step("create a client key", &[os("keygen")])?;
    let client_key = Identity::load(&config_dir.join("id.key"), &config_dir.join("id.crt"))
        .context("loading the demo client key")?
        .fingerprint();

    let daemons = LocalDaemons::start(&work, "node", daemons, client_key, false)
        .context("starting the demo daemons")?;
    for (n, node) in daemons.nodes.iter().enumerate() {
        println!(
            "   relsyncd node{} listening on {}, key {}, app root {}",
            n + 1,
            node.addr,
            node.fingerprint,
            node.root.display()
        );
    }
    let nodes: Vec<(SocketAddr, PathBuf, String)> = daemons
        .nodes
        .iter()
        .map(|n| (n.addr, n.root.clone(), n.fingerprint.clone()))
        .collect();

    let result = (|| -> Result<()> {
        for (addr, _, fp) in &nodes {
            step(
                "trust a daemon's key (like ssh's known_hosts)",
                &[os("trust"), os(&addr.to_string()), os(fp)],
            )?;
        }
        let a = corpus.join("a");
        let b = corpus.join("b");
        for (addr, _, _) in &nodes {
            step(
                "push release 1 (everything is new)",
                &[
                    os("push"),
                    p(&a),
                    os(&format!("{addr}/shop")),
                    os("--release-id"),
                    os("release-1"),
                ],
            )?;
        }
        for (addr, _, _) in &nodes {
            step(
                "push release 2 (only changed files travel, as zstd deltas against release 1)",
                &[
                    os("push"),
                    p(&b),
                    os(&format!("{addr}/shop")),
                    os("--release-id"),
                    os("release-2"),
                ],
            )?;
        }
        let first = format!("{}/shop", nodes[0].0);
        step("list releases on a node", &[os("releases"), os(&first)])?;
        step("roll that node back", &[os("rollback"), os(&first)])?;
        step(
            "activate release 2 again",
            &[os("activate"), os(&first), os("release-2")],
        )?;

        let local = work.join("local/app");
        step(
            "build release 1 locally (no daemon)",
            &[
                os("deploy"),
                p(&a),
                p(&local),
                os("--release-id"),
                os("release-1"),
            ],
        )?;
        step(
            "build release 2 locally: hard links for unchanged files, renames detected",
            &[
                os("deploy"),
                p(&b),
                p(&local),
                os("--release-id"),
                os("release-2"),
            ],
        )?;
        let mut b_contents = p(&b);
        b_contents.push("/");
        step(
            "mirror release 2 rsync-style",
            &[
                os("sync"),
                b_contents,
                p(&work.join("mirror")),
                os("--delete"),
            ],
        )?;
        Ok(())
    })();

    daemons.stop();
    result?;
    println!();
    if keep {
        println!("kept everything under {}:", work.display());
        for (addr, root, _) in &nodes {
            println!(
                "  {addr}  {}  (current -> {})",
                root.display(),
                std::fs::read_link(root.join("current"))?.display()
            );
        }
        println!("  journals   <app root>/.relsync/journal.jsonl");
        println!("  client key {}", config_dir.display());
        if let Some(g) = guard {
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

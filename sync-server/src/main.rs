//! relsyncd: receives pushed releases over QUIC and activates them.
//!
//! A thin binary around [`sync_server::daemon::serve`]: parse the arguments, load and check the
//! configuration and key files, set up logging, and serve until SIGTERM or SIGINT.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use sync_server::config::Config;
use sync_server::daemon::{self, ServeOptions};
use sync_server::tls::Identity;
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

/// The relsync daemon: receives pushed releases and switches them live atomically.
#[derive(Debug, Parser)]
#[command(name = "relsyncd", version)]
struct Args {
    /// Configuration file (TOML); see relsyncd.example.toml.
    #[arg(long, short, value_name = "FILE")]
    config: PathBuf,
    /// Check the configuration and the key files, print a summary and exit.
    #[arg(long)]
    check: bool,
    /// Seconds that sessions in progress get to finish after SIGTERM or SIGINT before they are
    /// ended.
    #[arg(long, value_name = "SECS", default_value_t = daemon::DEFAULT_GRACE.as_secs())]
    shutdown_grace: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging();
    let loaded = load(&args.config);
    let (config, identity) = match loaded {
        Ok(v) => v,
        Err(e) => {
            eprintln!("relsyncd: error: {}", render_chain(&e));
            return ExitCode::from(2);
        }
    };
    if args.check {
        print_check(&args.config, &config, &identity);
        return ExitCode::SUCCESS;
    }
    match run(config, identity, Duration::from_secs(args.shutdown_grace)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relsyncd: error: {}", render_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text is already shown (some
/// errors name their cause in their own message too).
fn render_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if text.contains(&c) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&c);
    }
    text
}

fn init_logging() {
    let filter = EnvFilter::try_from_env("RELSYNC_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn load(path: &Path) -> anyhow::Result<(Config, Identity)> {
    let config = Config::load(path)?;
    let identity = Identity::load(&config.key, &config.cert).with_context(|| {
        format!(
            "loading the daemon identity named in {} (key and cert)",
            path.display()
        )
    })?;
    Ok((config, identity))
}

fn print_check(path: &Path, config: &Config, identity: &Identity) {
    println!("{}: ok", path.display());
    println!("listen  {}", config.listen);
    println!(
        "key     {} ({})",
        config.key.display(),
        identity.fingerprint()
    );
    for app in config.apps.values() {
        let state = match std::fs::symlink_metadata(&app.root) {
            Ok(m) if m.is_dir() && app.root.join(".relsync").is_dir() => "app root",
            Ok(m) if m.is_dir() => "directory, becomes an app root at start",
            Ok(_) => "NOT A DIRECTORY: relsyncd will fail to start",
            Err(_) => "missing, created at start",
        };
        println!(
            "app     {} -> {} [{state}], {} authorized key(s)",
            app.name,
            app.root.display(),
            app.authorized.len()
        );
    }
    for export in config.exports.values() {
        let state = match std::fs::metadata(&export.path) {
            Ok(m) if m.is_dir() => "directory",
            Ok(_) => "NOT A DIRECTORY: syncs into it fail",
            Err(_) => "MISSING: create it, relsyncd does not",
        };
        println!(
            "export  {} -> {} [{state}], {} authorized key(s)",
            export.name,
            export.path.display(),
            export.authorized.len()
        );
    }
}

fn run(config: Config, identity: Identity, grace: Duration) -> anyhow::Result<()> {
    // File-system work (storing received files, spooling, building releases) runs on the
    // blocking pool. Each of its threads keeps a zstd context and buffers warm, so tokio's default
    // of up to 512 threads would let a push of many small files grow memory with the thread
    // count rather than with the in-flight budget; the work is CPU- and disk-bound anyway.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("relsyncd")
        .max_blocking_threads((2 * cores).clamp(4, 32))
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        // Install the handlers before serving, so a signal during startup is not lost.
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        };
        let options = ServeOptions {
            grace,
            ..ServeOptions::default()
        };
        let server = daemon::serve(config, identity, options, shutdown).await?;
        server.stopped().await;
        Ok(())
    })
}

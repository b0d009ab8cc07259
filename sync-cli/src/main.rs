//! `relsync`: build and activate releases of a web application, and mirror directories.
//!
//! A thin binary: argument parsing, progress display and output formatting. All decisions are made
//! by `sync_core`'s planner and all file-system work by its edge.

mod bench;
mod demo;
mod fleet;
mod loopback;
mod output;
mod remote;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sync_core::edge::activate::ActivationOptions;
use sync_core::edge::deploy::{self, DeployOptions};
use sync_core::edge::exec::{ExecOptions, LocalSource};
use sync_core::edge::mirror::{apply_mirror, mirror_destination};
use sync_core::edge::root::AppRoot;
use sync_core::edge::scan::{scan, ScanOptions};
use sync_core::edge::EdgeError;
use sync_core::manifest::{Manifest, Policy};
use sync_core::plan::plan_mirror;
use sync_core::{RelPath, ReleaseId};

#[derive(Parser)]
#[command(
    name = "relsync",
    version,
    about = "Ship releases fast and switch them live atomically"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    keys: remote::KeyArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Build a new release of SRC under ROOT from the previous one, verify it, and activate it.
    Deploy {
        src: PathBuf,
        root: PathBuf,
        /// Release id (default: the UTC time, e.g. 20261127T031840Z).
        #[arg(long)]
        release_id: Option<String>,
        /// Releases to keep (default: ROOT/.relsync/config.toml's `keep`, else 5).
        #[arg(long)]
        keep: Option<usize>,
        /// Stage and verify, but leave `current` where it is.
        #[arg(long)]
        no_activate: bool,
        /// Print the itemized plan and change nothing.
        #[arg(long, short = 'n')]
        dry_run: bool,
        /// Machine-readable output on stdout.
        #[arg(long)]
        json: bool,
        /// Read and hash every source file, as rsync's --checksum compares by content, instead of
        /// trusting the hash cache for files whose size, times and inode are unchanged.
        #[arg(long, short = 'c')]
        checksum: bool,
        /// Leave out paths matching this gitignore-style pattern (repeatable).
        #[arg(long, value_name = "PAT")]
        exclude: Vec<String>,
        /// Link this path from ROOT/shared/ into the release (repeatable; adds to config.toml's).
        #[arg(long, value_name = "PATH")]
        shared: Vec<String>,
        /// List every changed path.
        #[arg(long, short)]
        verbose: bool,
        /// Re-hash hard-linked files too (default: check they are the verified inodes, unchanged).
        #[arg(long)]
        verify_all: bool,
        /// Keep the new release live (marked bad) when a reload, OPcache reset or health check of
        /// the activation fails, instead of going back to the previous release.
        #[arg(long)]
        no_rollback: bool,
    },
    /// Push SRC as a new release of APP to a relsyncd daemon, and activate it; with --fleet, to
    /// many daemons: stage on every host first, then activate wave by wave.
    #[command(after_help = FLEET_HELP)]
    Push {
        src: PathBuf,
        /// The daemon and app: HOST[:PORT]/APP (port 7171 by default). Not with --fleet.
        #[arg(required_unless_present = "fleet", conflicts_with = "fleet")]
        target: Option<String>,
        #[command(flatten)]
        fleet: fleet::FleetArgs,
        /// Activation waves as cumulative marks: host counts or percentages of the hosts
        /// [default: the group's `waves`, else 1,10%,100%].
        #[arg(long, value_name = "1,10%,100%", requires = "fleet")]
        waves: Option<sync_server::fleet::Waves>,
        /// Hosts (N) or share of them (P%, rounded down) that may fail staging while the others
        /// still activate [default: the group's `max_failed`, else 0].
        #[arg(long, value_name = "N|P%", requires = "fleet")]
        max_failed: Option<sync_server::fleet::MaxFailed>,
        /// Stage through a relay tree: the source sends to --fanout hosts, and each of them
        /// forwards the release to --fanout more (daemons need `accept_relayed = true`).
        #[arg(long, requires = "fleet")]
        relay: bool,
        /// Release id (default: the UTC time, e.g. 20261127T031840Z).
        #[arg(long)]
        release_id: Option<String>,
        /// Stage and verify on the daemon, but leave `current` where it is.
        #[arg(long)]
        no_activate: bool,
        /// Ask the daemon what it would need and send nothing.
        #[arg(long, short = 'n')]
        dry_run: bool,
        /// Machine-readable output on stdout.
        #[arg(long)]
        json: bool,
        /// Read and hash every source file, as rsync's --checksum compares by content, instead of
        /// trusting the hash cache for files whose size, times and inode are unchanged.
        #[arg(long, short = 'c')]
        checksum: bool,
        /// Leave out paths matching this gitignore-style pattern (repeatable).
        #[arg(long, value_name = "PAT")]
        exclude: Vec<String>,
        /// Limit the file data sent to RATE, like rsync: KiB/s, or with a unit (500K, 12M, 1G;
        /// bytes per second). With --fleet the limit is for all hosts together. 0: no limit.
        #[arg(long, value_name = "RATE")]
        bwlimit: Option<String>,
    },
    /// Create a key pair for talking to relsyncd (client or daemon) and print its fingerprint.
    Keygen {
        /// Directory for NAME.key and NAME.crt [default: $RELSYNC_CONFIG_DIR, else
        /// ~/.config/relsync].
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value = "id")]
        name: String,
    },
    /// Pin a daemon's key: trust HOST[:PORT] when it presents FINGERPRINT (SHA256:…).
    Trust { host: String, fingerprint: String },
    /// List the kept releases of ROOT (a local app root, or HOST[:PORT]/APP on a daemon), or of
    /// every host of a fleet file (--fleet).
    Releases {
        #[arg(required_unless_present = "fleet", conflicts_with = "fleet")]
        root: Option<PathBuf>,
        #[command(flatten)]
        fleet: fleet::FleetArgs,
        #[arg(long)]
        json: bool,
    },
    /// Point ROOT/current at release ID (ROOT may be HOST[:PORT]/APP).
    Activate {
        root: PathBuf,
        id: String,
        /// Keep the release live (marked bad) when its activation checks fail (local roots).
        #[arg(long)]
        no_rollback: bool,
    },
    /// Go back to the previous good release (or to --to ID); ROOT may be HOST[:PORT]/APP, or
    /// --fleet rolls back every selected host of a fleet file.
    Rollback {
        #[arg(required_unless_present = "fleet", conflicts_with = "fleet")]
        root: Option<PathBuf>,
        #[command(flatten)]
        fleet: fleet::FleetArgs,
        #[arg(long)]
        to: Option<String>,
        /// Keep the release live (marked bad) when its activation checks fail (local roots).
        #[arg(long)]
        no_rollback: bool,
    },
    /// Remove old releases beyond --keep (never current or the rollback target); ROOT may be
    /// HOST[:PORT]/APP.
    Prune {
        root: PathBuf,
        #[arg(long)]
        keep: Option<usize>,
    },
    /// Generate a sample PHP app, start local daemons, and walk through push, rollback, deploy and sync.
    Demo {
        /// Work in this directory instead of a temporary one.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Leave the generated files in place.
        #[arg(long)]
        keep: bool,
        /// Files in the sample app.
        #[arg(long, default_value_t = 15_000)]
        files: usize,
        /// Approximate size of the sample app in bytes.
        #[arg(long, default_value_t = 110_000_000)]
        bytes: u64,
        /// Local daemons to push to.
        #[arg(long, default_value_t = 3)]
        daemons: usize,
    },
    /// Measure each phase of a release on this machine (scan, hash, plan, both delta engines,
    /// compression, staging, sync, activation, end to end) and print median, min and max over
    /// the runs, with throughput, CPU seconds and peak memory.
    #[command(after_help = BENCH_HELP)]
    Bench(bench::BenchArgs),
    /// Mirror SRC to DST like rsync: `SRC/` copies the contents, `SRC` the directory itself. DST
    /// is a local directory or relsync://HOST[:PORT]/EXPORT[/PATH], a directory of an export on
    /// a relsyncd daemon.
    Sync {
        src: String,
        dst: PathBuf,
        /// Remove files in DST that SRC does not have.
        #[arg(long)]
        delete: bool,
        /// Read and hash every file of SRC and DST, as rsync's --checksum compares by content, instead of
        /// trusting the hash cache for files whose size, times and inode are unchanged.
        #[arg(long, short = 'c')]
        checksum: bool,
        #[arg(long, value_name = "PAT")]
        exclude: Vec<String>,
        /// Show what would change and change nothing.
        #[arg(short = 'n', long)]
        dry_run: bool,
        /// List every change.
        #[arg(short, long)]
        verbose: bool,
        /// Show a progress bar.
        #[arg(long)]
        progress: bool,
        #[arg(long)]
        json: bool,
    },
}

const FLEET_HELP: &str = "\
Fleet pushes (--fleet FILE, see fleet.example.toml):
  1. SRC is scanned once and staged on every selected host in parallel (--fanout at once, each
     within --host-timeout); nothing is activated yet. Hosts with the same previous release get
     the same encoded bytes.
     With --relay the source sends to --fanout hosts only (--source-fanout, if given); each
     forwards the release to --fanout more, file by file as it arrives (a tree of depth about
     log_fanout(hosts)), and a host whose relay fails is pushed to directly.
  2. Only if at most --max-failed hosts failed, the staged hosts are activated wave by wave
     (--waves). Each daemon runs its app's activation pipeline (health checks included) and puts
     its previous release back when that fails. A wave in which any host fails stops the
     rollout: its activated hosts are rolled back, later waves are not activated.
  The final table (or --json) says which hosts run which release. Exit code 0 only when every
  selected host activated (staged, with --no-activate), 1 otherwise, 2 for usage errors.";

const BENCH_HELP: &str = "\
Phases, each timed on its own:
  scan (walk + stat)   the scanner with a warm hash cache: no file content is read
  scan + hash          the scanner with no hash cache: every file read and blake3-hashed
  hash (blake3)        blake3 of every file of B alone, in parallel
  delta ...            zstd with A's file as reference, and fast_rsync (signature, diff,
                       apply), on the files B edited, in memory; every output verified
  compress (zstd)      plain zstd of the same files
  plan                 read the node's release records and plan B
  stage directories    create the directories and set their modes
  stage files          hard links, writes, symlinks
  sync (syncfs)        one syncfs of the node's file system
  verify               check the staged tree against the manifest
  record + complete    write the release record, rename staging into place
  activate (swap)      the activation pipeline (without [activation] config: the swap)
  end to end           `relsync deploy B` (or `relsync push B` to a daemon) on a node holding A
Before each build of B the node is reset to hold only A, current.
With --target HOST/APP the local node phases are replaced by the push to the daemon:
  client: ...          the client's steps (scan, connect, hello, manifest + need, transfer,
                       wait for staged, activate), timed from the session's state changes
  daemon: ...          the phases the daemon timed and reported with `staged` (need,
                       receive, plan, stage directories, stage files, sync, verify, record)
With --fleet FILE every selected host gets B at once, as `relsync push --fleet` does:
  fleet: ...           until every host staged, activation in waves, fastest/slowest host
  daemons (slowest)    per daemon phase, the longest time any host reported
Apps on daemons given with --target HOST/APP or --fleet must hold no release; at the end they
are cleared (`current` and every release removed; the journal keeps the record). Loopback
daemons are removed whole.";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RELSYNC_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .init();
    let cli = Cli::parse();
    match run(cli.command, &cli.keys) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if output::is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            eprintln!("relsync: error: {}", output::render_chain(&e));
            let usage = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<EdgeError>(),
                    Some(EdgeError::Config { .. })
                ) || c.downcast_ref::<UsageError>().is_some()
            });
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

/// A bad argument value that clap could not catch (exit code 2).
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn activation_options(no_rollback: bool) -> ActivationOptions {
    ActivationOptions {
        auto_rollback: !no_rollback,
        now_unix: now_unix(),
        config: None,
    }
}

fn release_id(s: &str) -> Result<ReleaseId> {
    ReleaseId::new(s).map_err(|e| UsageError(e.to_string()).into())
}

fn rel_paths(v: &[String], what: &str) -> Result<Vec<RelPath>> {
    v.iter()
        .map(|s| {
            RelPath::new(s.trim_end_matches('/'))
                .map_err(|e| UsageError(format!("{what} {s:?}: {e}")).into())
        })
        .collect()
}

/// Where the hash cache of source tree `src` lives. Hash caches of other trees that have gone
/// unused for a while are removed on the way ([`prune_hash_caches`]).
fn cache_file(src: &Path) -> Option<PathBuf> {
    let dir = std::env::var_os("RELSYNC_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("relsync")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/relsync")))?;
    let canon = std::fs::canonicalize(src).ok()?;
    let key = blake3::hash(canon.as_os_str().as_encoded_bytes()).to_hex();
    if std::fs::create_dir_all(&dir).is_err() {
        return None;
    }
    let removed = prune_hash_caches(&dir, SystemTime::now());
    if removed > 0 {
        tracing::debug!(removed, dir = %dir.display(), "removed unused hash caches");
    }
    Some(dir.join(format!("{}{HASH_CACHE_SUFFIX}", &key[..24])))
}

const HASH_CACHE_SUFFIX: &str = ".scan";
/// A hash cache unused this long is removed. Each names a source tree by its path, so a tree
/// deployed from a new temporary directory every time would otherwise leave one per run behind.
/// A scan rewrites its cache, or touches it when nothing changed.
const UNUSED_HASH_CACHE: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);
/// A temporary hash cache (`<cache>.tmp.<pid>`) this old is a killed run's leftover.
const STALE_HASH_CACHE_TEMP: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes the hash caches in `dir` last used more than [`UNUSED_HASH_CACHE`] before `now`, and
/// leftover temporary ones; returns how many. Nothing else in the cache directory is touched,
/// and a file that cannot be read or removed is left (the cache is only ever a shortcut).
fn prune_hash_caches(dir: &Path, now: SystemTime) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let limit = if name.ends_with(HASH_CACHE_SUFFIX) {
            UNUSED_HASH_CACHE
        } else if name.contains(&format!("{HASH_CACHE_SUFFIX}.tmp.")) {
            STALE_HASH_CACHE_TEMP
        } else {
            continue;
        };
        let stale = entry
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .and_then(|m| m.modified().ok())
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age > limit);
        if stale && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// What a scan or build reports its bytes to: the bar when it is shown, nothing otherwise. Even
/// a hidden bar reads the clock on every call, from every thread of the scan.
fn feed(pb: &ProgressBar) -> impl Fn(u64) + Sync + '_ {
    let shown = !pb.is_hidden();
    move |n| {
        if shown {
            pb.inc(n)
        }
    }
}

fn bar(show: bool, total: Option<u64>, msg: &'static str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = match total {
        Some(t) => ProgressBar::with_draw_target(Some(t), ProgressDrawTarget::stderr()),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
    };
    let style = match total {
        Some(_) => ProgressStyle::with_template(
            "{msg:>9} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        ),
        None => ProgressStyle::with_template("{msg:>9} {spinner} {bytes} {bytes_per_sec}"),
    }
    .expect("static template")
    .progress_chars("=> ");
    pb.set_style(style);
    pb.set_message(msg);
    pb
}

/// Scans the source of a release to push (to one daemon or a fleet): `.relsyncignore` files
/// honoured, nothing skipped, the default policy.
fn scan_release_source(
    src: &Path,
    excludes: &[String],
    show: bool,
    rehash: bool,
) -> Result<sync_core::edge::scan::Scan> {
    scan_tree(src, excludes, vec![], show, Policy::default(), true, rehash)
}

fn scan_tree(
    src: &Path,
    excludes: &[String],
    skip: Vec<RelPath>,
    show: bool,
    policy: Policy,
    use_ignore_file: bool,
    rehash: bool,
) -> Result<sync_core::edge::scan::Scan> {
    let pb = bar(show, None, "scanning");
    let opts = ScanOptions {
        excludes: excludes.to_vec(),
        ignore_file: use_ignore_file,
        skip,
        cache_file: cache_file(src),
        rehash,
        racy_window: sync_core::edge::scan::RACY_WINDOW,
        policy,
    };
    let t = Instant::now();
    let s = scan(src, &opts, &feed(&pb)).with_context(|| format!("scanning {}", src.display()))?;
    tracing::debug!(
        ms = t.elapsed().as_millis() as u64,
        "scan {}",
        src.display()
    );
    pb.finish_and_clear();
    Ok(s)
}

fn run(cmd: Command, keys: &remote::KeyArgs) -> Result<()> {
    match cmd {
        Command::Deploy {
            src,
            root,
            release_id: id,
            keep,
            no_activate,
            dry_run,
            json,
            checksum,
            exclude,
            shared,
            verbose,
            verify_all,
            no_rollback,
        } => {
            if keep == Some(0) {
                return Err(UsageError("--keep must be at least 1".into()).into());
            }
            let started = Instant::now();
            let show = !json && std::io::stderr().is_terminal();
            let opts = DeployOptions {
                release_id: id.as_deref().map(release_id).transpose()?,
                keep,
                activate: !no_activate,
                shared: rel_paths(&shared, "--shared")?,
                now_unix: now_unix(),
                use_objects: false,
                exec: ExecOptions {
                    verify_links: verify_all,
                    ..ExecOptions::default()
                },
                no_rollback,
                // A local deploy checks no kept file ahead of its build.
                prestaged: false,
            };
            let app = if dry_run {
                match AppRoot::open(&root) {
                    Ok(a) => Some(a),
                    Err(_) if !root.join(".relsync").exists() => None,
                    Err(e) => return Err(e.into()),
                }
            } else {
                Some(
                    AppRoot::open_or_create(&root)
                        .with_context(|| format!("opening app root {}", root.display()))?,
                )
            };
            let skip = match &app {
                Some(a) => deploy::shared_paths(a, &opts.shared)?,
                None => opts.shared.clone(),
            };
            // Kept releases' records are decoded while the source is hashed; the root keeps
            // them, so planning finds them ready (and re-reads any that change meanwhile).
            let scanned = std::thread::scope(|s| {
                if let Some(a) = &app {
                    s.spawn(|| {
                        let _ = a.records();
                    });
                }
                scan_tree(
                    &src,
                    &exclude,
                    skip,
                    show,
                    Policy::default(),
                    true,
                    checksum,
                )
            })?;
            if dry_run {
                let prep = match &app {
                    Some(a) => deploy::prepare(a, &scanned.manifest, &opts)?,
                    None => {
                        let release = opts
                            .release_id
                            .clone()
                            .unwrap_or_else(|| ReleaseId::from_unix_time(opts.now_unix));
                        let plan = sync_core::plan::plan_release(
                            &release,
                            &scanned.manifest,
                            &[],
                            &opts.shared,
                            &sync_core::plan::PlanOptions {
                                activate: opts.activate,
                                ..Default::default()
                            },
                        )?;
                        deploy::Prepared {
                            plan,
                            previous: None,
                            bases: vec![],
                            seq: 1,
                            over: None,
                        }
                    }
                };
                let previous = prep
                    .previous
                    .as_ref()
                    .and_then(|p| prep.bases.iter().find(|b| &b.id == p))
                    .map(|r| &r.manifest);
                return output::print_plan(&prep.plan, previous, json, verbose);
            }
            let app = app.expect("created unless dry run");
            let lock = app
                .lock(|stale| tracing::warn!("taking over a stale lock left by {stale}"))
                .with_context(|| format!("locking {}", root.display()))?;
            let source = LocalSource::open(&src)?;
            let pb = bar(show, Some(scanned.manifest.total_file_bytes()), "staging");
            let report = deploy::deploy(&app, &lock, &scanned.manifest, &source, &opts, &feed(&pb))
                .with_context(|| format!("deploying {} to {}", src.display(), root.display()))?;
            pb.finish_and_clear();
            output::print_deploy(&report, &scanned.stats, &root, started.elapsed(), json)
        }
        Command::Push {
            src,
            target,
            fleet,
            waves,
            max_failed,
            relay,
            release_id,
            no_activate,
            dry_run,
            json,
            checksum,
            exclude,
            bwlimit,
        } => {
            let bwlimit = match bwlimit {
                Some(text) => sync_server::client::parse_rate(&text)
                    .map_err(|e| UsageError(format!("--bwlimit: {e}")))?,
                None => None,
            };
            match target {
                Some(target) => remote::push(
                    keys,
                    remote::PushArgs {
                        src,
                        target,
                        release_id,
                        no_activate,
                        dry_run,
                        json,
                        checksum,
                        exclude,
                        bwlimit,
                    },
                ),
                None => fleet::push(
                    keys,
                    fleet::PushArgs {
                        src,
                        fleet,
                        waves,
                        max_failed,
                        relay,
                        release_id,
                        no_activate,
                        dry_run,
                        json,
                        checksum,
                        exclude,
                        bwlimit,
                    },
                ),
            }
        }
        Command::Keygen { dir, name } => remote::keygen(dir, &name),
        Command::Trust { host, fingerprint } => remote::trust(keys, &host, &fingerprint),
        Command::Releases { root, fleet, json } => {
            let Some(root) = root else {
                return fleet::releases(keys, &fleet, json);
            };
            if let Some(target) = remote::target_of(&root)? {
                return remote::releases(keys, &target, json);
            }
            let app = AppRoot::open(&root)?;
            output::print_releases(&app, json)
        }
        Command::Activate {
            root,
            id,
            no_rollback,
        } => {
            let id = release_id(&id)?;
            if let Some(target) = remote::target_of(&root)? {
                return remote::activate(keys, &target, id);
            }
            let app = AppRoot::open(&root)?;
            let lock = app.lock(|s| tracing::warn!("taking over a stale lock left by {s}"))?;
            deploy::activate_with(&app, &lock, &id, &activation_options(no_rollback))
                .with_context(|| format!("activating {id} in {}", root.display()))?;
            output::line(&format!("activated {id} in {}", root.display()))
        }
        Command::Rollback {
            root,
            fleet,
            to,
            no_rollback,
        } => {
            let to = to.as_deref().map(release_id).transpose()?;
            let Some(root) = root else {
                return fleet::rollback(keys, &fleet, to);
            };
            if let Some(target) = remote::target_of(&root)? {
                return remote::rollback(keys, &target, to);
            }
            let app = AppRoot::open(&root)?;
            let lock = app.lock(|s| tracing::warn!("taking over a stale lock left by {s}"))?;
            let id =
                deploy::rollback_with(&app, &lock, to.as_ref(), &activation_options(no_rollback))
                    .with_context(|| format!("rolling back {}", root.display()))?
                    .release;
            output::line(&format!("rolled back {} to {id}", root.display()))
        }
        Command::Prune { root, keep } => {
            if keep == Some(0) {
                return Err(UsageError("--keep must be at least 1".into()).into());
            }
            if let Some(target) = remote::target_of(&root)? {
                return remote::prune(keys, &target, keep);
            }
            let app = AppRoot::open(&root)?;
            let lock = app.lock(|s| tracing::warn!("taking over a stale lock left by {s}"))?;
            let gone = deploy::prune(&app, &lock, keep, now_unix())?;
            let names: Vec<&str> = gone.iter().map(ReleaseId::as_str).collect();
            output::line(&if names.is_empty() {
                "nothing to prune".to_string()
            } else {
                format!("pruned {}", names.join(", "))
            })
        }
        Command::Demo {
            dir,
            keep,
            files,
            bytes,
            daemons,
        } => demo::run(dir, keep, files, bytes, daemons.max(1)),
        Command::Bench(args) => bench::run(keys, args),
        Command::Sync {
            src,
            dst,
            delete,
            checksum,
            exclude,
            dry_run,
            verbose,
            progress,
            json,
        } => {
            if let Some(url) = dst.to_str().filter(|d| sync_server::client::is_sync_url(d)) {
                return remote::sync(
                    keys,
                    remote::SyncArgs {
                        src,
                        dst: url.to_owned(),
                        delete,
                        checksum,
                        exclude,
                        dry_run,
                        verbose,
                        progress,
                        json,
                    },
                );
            }
            let started = Instant::now();
            let dest = mirror_destination(&src, &dst);
            let src_path = PathBuf::from(&src);
            let show = progress && !json;
            let s = scan_tree(
                &src_path,
                &exclude,
                vec![],
                show,
                Policy::default(),
                false,
                checksum,
            )?;
            let lenient = Policy {
                allow_world_writable: true,
                ..Policy::default()
            };
            let d = if dest.exists() {
                let mut ex = exclude.clone();
                ex.push(sync_core::edge::mirror::TEMP_PATTERN.to_string());
                scan_tree(&dest, &ex, vec![], show, lenient, false, checksum)?.manifest
            } else {
                Manifest::empty()
            };
            let plan = plan_mirror(&s.manifest, &d, delete);
            if dry_run {
                return output::print_mirror_plan(&plan, json, verbose);
            }
            let source = LocalSource::open(&src_path)?;
            let pb = bar(show, Some(plan.summary.written_bytes), "copying");
            let stats = apply_mirror(&dest, &plan.ops, &source, &feed(&pb))
                .with_context(|| format!("syncing {src} to {}", dest.display()))?;
            pb.finish_and_clear();
            if verbose && !json {
                output::print_mirror_plan(&plan, false, true)?;
            }
            output::print_mirror(&plan, &stats, &dest, started.elapsed(), json)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_unused_hash_caches_and_stale_temporaries_are_pruned() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let now = SystemTime::now();
        let day = Duration::from_secs(24 * 3600);
        let hour = Duration::from_secs(3600);
        // (name, age, removed)
        let table = [
            ("0123456789abcdef01234567.scan", 31 * day, true),
            ("1123456789abcdef01234567.scan", 29 * day, false),
            ("2123456789abcdef01234567.scan", Duration::ZERO, false),
            ("3123456789abcdef01234567.scan.tmp.4242", 2 * hour, true),
            ("4123456789abcdef01234567.scan.tmp.4243", hour / 2, false),
            ("prune-state", 400 * day, false),
            ("lock", 400 * day, false),
            ("notes.txt", 400 * day, false),
        ];
        for (name, age, _) in table {
            let f = std::fs::File::create(dir.join(name)).unwrap();
            f.set_modified(now - age).unwrap();
        }
        // Directories are never removed, whatever their name and age.
        std::fs::create_dir(dir.join("old.scan")).unwrap();
        std::fs::File::open(dir.join("old.scan"))
            .unwrap()
            .set_modified(now - 400 * day)
            .unwrap();
        let want = table.iter().filter(|(_, _, gone)| *gone).count();
        assert_eq!(prune_hash_caches(dir, now), want);
        for (name, _, gone) in table {
            assert_eq!(!dir.join(name).exists(), gone, "{name}");
        }
        assert!(dir.join("old.scan").is_dir());
        assert_eq!(prune_hash_caches(dir, now), 0);
        assert_eq!(prune_hash_caches(&dir.join("missing"), now), 0);
    }
}

//! `relsync bench`: where the time of a release goes on this machine, phase by phase.
//!
//! Works with no set-up: a generated corpus pair (release A and the next deploy B, from
//! `relsync-testdata`) in a temporary directory, and a temporary app root as the node. Each run
//! resets the node to "holds A, current" and then measures every phase on fresh state; `--target
//! HOST/APP` pushes B to a daemon instead of building it locally. [`report`] holds the pure
//! statistics and formatting, [`phase`] runs and times the phases, [`chart`] draws the SVG.

pub mod chart;
pub mod fleet;
pub mod phase;
pub mod report;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde_json::json;
use std::time::Instant;
use sync_core::edge::root::AppRoot;
use sync_core::proto::client::Outcome;
use sync_core::wire::Command as WireCommand;
use sync_core::ReleaseId;

use sync_core::proto::client::ClientState;
use sync_server::client::{self, Cache, Progress, PushOptions, PushRequest, Target};
use sync_server::tls::{Identity, KnownHosts};

use crate::loopback::{self, LocalDaemons};
use crate::remote::KeyArgs;
use crate::UsageError;
use phase::{RunLog, RELEASE_A, RELEASE_B};
use report::{Phase, PhaseStats, Sample};

/// What `relsync bench` was asked to do.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// `generated` (a corpus pair made with --files, --size, --change, --seed) or a
    /// directory holding release A in PATH/a and release B in PATH/b.
    #[arg(long, default_value = "generated", value_name = "generated|PATH")]
    pub corpus: String,
    /// `local` (a temporary app root), `loopback[:N]` (N relsyncd daemons started in this
    /// process on loopback with throwaway keys and roots; more than one is pushed to as a
    /// fleet), or HOST[:PORT]/APP, an app on relsyncd set aside for benchmarking (it must
    /// hold no release).
    #[arg(
        long,
        default_value = "local",
        value_name = "local|loopback[:N]|HOST[:PORT]/APP",
        conflicts_with = "fleet"
    )]
    pub target: String,
    /// Approximate total size of the generated release A (K/M/G binary, KB/MB/GB decimal).
    #[arg(long, default_value = "110MB", value_name = "S", value_parser = relsync_testdata::parse_size)]
    pub size: u64,
    /// Files in the generated release A.
    #[arg(long, default_value_t = 15_000, value_name = "N")]
    pub files: usize,
    /// Share of A's files edited in the generated B (added, removed and moved files stay
    /// at 0.5%, 0.3% and a handful).
    #[arg(long, default_value = "3.5%", value_name = "P%", value_parser = report::parse_percent)]
    pub change: f64,
    /// Seed of the generated corpus.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Runs per phase.
    #[arg(long, default_value_t = 5, value_name = "R", value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Machine-readable output on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also write an SVG bar chart of the phases (median, whiskers from min to max).
    #[arg(long, value_name = "FILE.svg")]
    pub chart: Option<PathBuf>,
    /// Leave the generated corpus and the temporary node (holding A and B) in place.
    #[arg(long)]
    pub keep: bool,
    /// With --fleet FILE: push to every selected host of the fleet at once instead of
    /// --target (their apps must hold no release).
    #[command(flatten)]
    pub fleet: crate::fleet::FleetArgs,
    /// With --fleet or --target loopback:N: stage through a relay tree of fan-out
    /// --fanout, as `relsync push --fleet --relay` does.
    #[arg(long)]
    pub relay: bool,
}

/// Where release B goes.
enum Node {
    /// A temporary app root on this machine.
    Local(PathBuf),
    /// An app on a relsyncd daemon.
    Remote(Remote),
    /// The selected hosts of a fleet file.
    Fleet(fleet::FleetNode),
}

/// The release pair: `DIR/a` and `DIR/b`, and what we know of how they were made.
struct Corpus {
    a: PathBuf,
    b: PathBuf,
    description: String,
}

/// Progress goes to stderr, so that stdout holds only the table or the JSON.
fn progress(text: &str) {
    eprintln!("relsync bench: {text}");
}

pub fn run(keys: &KeyArgs, a: BenchArgs) -> Result<()> {
    let work = tempfile::Builder::new()
        .prefix("relsync-bench-")
        .tempdir()
        .context("creating a temporary directory for the benchmark")?;
    let result = run_in(keys, &a, work.path());
    if a.keep {
        let kept = work.keep();
        eprintln!(
            "relsync bench: kept the corpus and node under {}",
            kept.display()
        );
    }
    result
}

/// Connects to the daemon or fleet asked for (before the corpus is made, which takes a while).
/// For `loopback[:N]` it first starts the daemons, which live as long as the returned guard.
fn node(keys: &KeyArgs, a: &BenchArgs, work: &Path) -> Result<(Node, Option<LocalDaemons>)> {
    if a.fleet.fleet.is_some() {
        let f = fleet::FleetNode::connect(keys, &a.fleet, a.relay, work)?;
        return Ok((Node::Fleet(f), None));
    }
    let loopbacks = loopback_count(&a.target)?;
    if a.relay && loopbacks.is_none_or(|n| n < 2) {
        return Err(UsageError(
            "--relay needs a fleet: --fleet FILE or --target loopback:N with N of 2 or more".into(),
        )
        .into());
    }
    if a.target == "local" {
        return Ok((Node::Local(work.join("node")), None));
    }
    if let Some(n) = loopbacks {
        return loopback(a, work, n);
    }
    let target = Target::parse(&a.target).map_err(|e| UsageError(format!("--target: {e}")))?;
    Ok((Node::Remote(Remote::connect(keys, &target, work)?), None))
}

/// `loopback` is one daemon, `loopback:N` a fleet of N; anything else is not a loopback target.
fn loopback_count(target: &str) -> Result<Option<usize>> {
    let Some(rest) = target.strip_prefix("loopback") else {
        return Ok(None);
    };
    let n = match rest.strip_prefix(':') {
        None if rest.is_empty() => 1,
        None => return Ok(None),
        Some(n) => n
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=64).contains(n))
            .ok_or_else(|| {
                UsageError(format!(
                    "--target {target}: the number of loopback daemons must be 1 to 64"
                ))
            })?,
    };
    Ok(Some(n))
}

/// Starts `n` daemons in this process with a throwaway client key that they authorize and
/// that pins them; one is a daemon target, more a fleet (written to a fleet file). All of it
/// lives in `work`, so nothing is left anywhere.
fn loopback(a: &BenchArgs, work: &Path, n: usize) -> Result<(Node, Option<LocalDaemons>)> {
    let keys_dir = work.join("client");
    let client = Identity::generate("relsync-bench").context("generating a client key")?;
    let (key, _) = client
        .save(&keys_dir, "id")
        .context("saving the client key")?;
    let known_hosts = keys_dir.join("known_hosts");
    let daemons = LocalDaemons::start(work, "daemon", n, client.fingerprint(), a.relay)?;
    let mut pins = KnownHosts::load(&known_hosts)?;
    for d in &daemons.nodes {
        pins.add(&d.addr.to_string(), d.fingerprint.parse()?)?;
    }
    let keys = KeyArgs::with_files(key, known_hosts);
    progress(&format!(
        "started {n} relsyncd daemon(s) on loopback in this process"
    ));
    if n == 1 {
        let target = Target::parse(&format!("{}/{}", daemons.nodes[0].addr, loopback::APP))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let remote = Remote::connect(&keys, &target, work)?;
        return Ok((Node::Remote(remote), Some(daemons)));
    }
    let mut text = String::new();
    for (i, d) in daemons.nodes.iter().enumerate() {
        text += &format!(
            "[hosts.daemon{}]\naddress = \"{}\"\nkey = \"{}\"\n\n",
            i + 1,
            d.addr,
            d.fingerprint
        );
    }
    let hosts: Vec<String> = (1..=n).map(|i| format!("\"daemon{i}\"")).collect();
    text += &format!(
        "[groups.loopback]\nhosts = [{}]\napp = \"{}\"\nwaves = \"100%\"\n",
        hosts.join(", "),
        loopback::APP
    );
    let file = work.join("fleet.toml");
    std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
    let args = crate::fleet::FleetArgs {
        fleet: Some(file),
        ..a.fleet.clone()
    };
    let f = fleet::FleetNode::connect(&keys, &args, a.relay, work)?;
    Ok((Node::Fleet(f), Some(daemons)))
}

fn corpus(a: &BenchArgs, work: &Path) -> Result<Corpus> {
    if a.corpus != "generated" {
        let dir = PathBuf::from(&a.corpus);
        let (ra, rb) = (dir.join("a"), dir.join("b"));
        if !ra.is_dir() || !rb.is_dir() {
            return Err(UsageError(format!(
                "--corpus {}: expected the directories {} and {} (release A and B), e.g. from relsync-testdata",
                dir.display(),
                ra.display(),
                rb.display()
            ))
            .into());
        }
        return Ok(Corpus {
            a: ra,
            b: rb,
            description: format!("corpus {}", dir.display()),
        });
    }
    let out = work.join("corpus");
    let mut opts = relsync_testdata::Options::default();
    opts.seed = a.seed;
    opts.files = a.files;
    opts.bytes = a.size;
    opts.edited_share = a.change;
    progress(&format!(
        "generating a corpus pair ({} files, {:.1} MB, {:.1}% of files edited)",
        a.files,
        a.size as f64 / 1e6,
        a.change * 100.0
    ));
    let s = match relsync_testdata::generate(&out, &opts) {
        Ok(s) => s,
        Err(e @ relsync_testdata::GenerateError::InvalidOptions { .. }) => {
            return Err(UsageError(format!("cannot generate the corpus: {e}")).into())
        }
        Err(e) => return Err(e).context("generating the corpus"),
    };
    Ok(Corpus {
        a: out.join("a"),
        b: out.join("b"),
        description: format!(
            "generated corpus (seed {}): A {} files {:.1} MB; B {} edited, {} added, {} removed, {} moved, {} chmod",
            s.seed,
            s.a.files,
            s.a.bytes as f64 / 1e6,
            s.edited.len(),
            s.added.len(),
            s.removed.len(),
            s.renamed.len(),
            s.mode_changed.len()
        ),
    })
}

fn run_in(keys: &KeyArgs, a: &BenchArgs, work: &Path) -> Result<()> {
    let (node, daemons) = node(keys, a, work)?;
    let corpus = corpus(a, work)?;
    let now = crate::now_unix();
    let warm_cache = work.join("scan.cache");
    let a_scan = phase::scan_cold(&corpus.a)?;
    let b_scan = phase::fill_cache(&corpus.b, &warm_cache)?;
    let changed = phase::changed_files(&corpus.a, &a_scan.manifest, &corpus.b, &b_scan.manifest)?;
    match &node {
        Node::Local(root) => phase::node_with_a(root, &corpus.a, now)?,
        Node::Remote(r) => r.push_a(&corpus.a, a_scan.manifest)?,
        Node::Fleet(f) => f.push_a(&corpus.a, a_scan.manifest)?,
    }
    let mut logs = Vec::new();
    let measured = (|| -> Result<()> {
        for run in 1..=a.runs {
            progress(&format!("run {run}/{}", a.runs));
            let mut log = RunLog::default();
            phase::scan_and_hash(&mut log, &corpus.b, &warm_cache)?;
            phase::deltas(&mut log, &changed)?;
            match &node {
                Node::Local(root) => {
                    phase::reset(root)?;
                    phase::build_by_phase(&mut log, root, &corpus.b, &b_scan.manifest, now)?;
                    phase::reset(root)?;
                    phase::deploy_end_to_end(&mut log, root, &corpus.b, now)?;
                }
                Node::Remote(r) => r.push_b(&mut log, &corpus.b)?,
                Node::Fleet(f) => f.push_b(&mut log, &corpus.b)?,
            }
            logs.push(log);
        }
        Ok(())
    })();
    let left = match &node {
        Node::Remote(r) if !a.keep => r.finish().map(Some),
        Node::Fleet(f) if !a.keep => f.finish().map(Some),
        _ => Ok(None),
    };
    measured?;
    let left = left?;
    // Loopback daemons and everything they hold go with the work directory.
    let in_process = daemons.map(|d| {
        let n = d.nodes.len();
        d.stop();
        format!(
            "{n} relsyncd daemon(s) on loopback in this process: CPU s and RSS include them; nothing of them is left"
        )
    });
    let left = if in_process.is_some() { None } else { left };

    let phases = collect(&logs);
    let (target_text, mut notes) = describe(&node, &left, a.keep);
    notes.extend(in_process);
    let mut title = vec![
        format!("relsync bench: {target_text}, {}", corpus.description),
        format!(
            "{} run(s); {}; machine: {} cores, load average {} (shared machines skew absolute times)",
            a.runs,
            "each phase on fresh state: before each build of B the node is reset to hold only A, current",
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            load_average()
        ),
    ];
    title.extend(notes.iter().cloned());
    if let Some(path) = &a.chart {
        let svg = chart::svg(&format!("relsync bench: {target_text}"), &phases)
            .map_err(|e| anyhow::anyhow!(e))?;
        std::fs::write(path, svg).with_context(|| format!("writing chart {}", path.display()))?;
    }
    if a.json {
        let v = json!({
            "target": target_text,
            "corpus": corpus.description,
            "runs": a.runs,
            "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "load_average": load_average(),
            "notes": notes,
            "phases": phases,
        });
        return crate::output::line(&serde_json::to_string_pretty(&v)?);
    }
    crate::output::line(report::table(&title, &phases).trim_end())
}

/// Merges the runs' logs into one entry per phase, in the order of the first run.
fn collect(logs: &[RunLog]) -> Vec<PhaseStats> {
    let mut order: Vec<(Phase, Vec<Sample>)> = Vec::new();
    for log in logs {
        for (p, s) in &log.entries {
            match order.iter_mut().find(|(q, _)| q.name == p.name) {
                Some((_, samples)) => samples.push(*s),
                None => order.push((p.clone(), vec![*s])),
            }
        }
    }
    order
        .into_iter()
        .filter_map(|(p, s)| report::summarize(p, &s))
        .collect()
}

fn describe(node: &Node, left: &Option<String>, keep: bool) -> (String, Vec<String>) {
    let mut notes = vec![
        "scan, hash, delta and compress read the corpus from the page cache (warm); \
         'no hash cache' is a deploy of a fresh checkout"
            .to_string(),
        "CPU s: user + system of this process and its children (median); RSS: the process's \
         peak so far (ru_maxrss)"
            .to_string(),
    ];
    let text = match node {
        Node::Local(root) => {
            let fs = AppRoot::open(root)
                .and_then(|r| r.file_system())
                .unwrap_or_else(|_| "file system unknown".into());
            notes.push(format!(
                "node: a temporary app root in {} ({fs}; TMPDIR sets where); sync is one syncfs \
                 of its file system",
                root.parent().unwrap_or(root).display()
            ));
            "local target".to_string()
        }
        Node::Remote(r) => {
            if let Some(l) = left {
                notes.push(l.clone());
            } else if keep {
                notes.push(format!(
                    "kept releases {RELEASE_A} (current) on {}",
                    r.target
                ));
            }
            notes.push(BACK_TO_BACK.into());
            format!("daemon {}", r.target)
        }
        Node::Fleet(f) => {
            if let Some(l) = left {
                notes.push(l.clone());
            } else if keep {
                notes.push(format!("kept releases {RELEASE_A} (current) on every host"));
            }
            notes.push(BACK_TO_BACK.into());
            notes.push(
                "daemons (slowest): per phase, the longest time any host reported; daemons (busiest): the relsyncd with the most CPU seconds, and the largest peak RSS of any".into(),
            );
            f.describe()
        }
    };
    (text, notes)
}

/// What the runs against daemons leave out.
const BACK_TO_BACK: &str = "runs follow each other at once: a daemon gets no idle second to \
     prestage the next release's tree (`prestage` in relsyncd's config), so its builds make every \
     directory and link while the client waits, as on a node that gets pushes back to back";

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

/// A daemon's app that holds A: pushes of B, and the reset after each.
struct Remote {
    keys: KeyArgs,
    target: Target,
    cache: Arc<Cache>,
    rt: tokio::runtime::Runtime,
}

impl Remote {
    /// Connects to `target` and checks that its app holds no release: the benchmark activates
    /// and prunes, so it must not run on an app in use.
    fn connect(keys: &KeyArgs, target: &Target, work: &Path) -> Result<Remote> {
        let cache_dir = work.join("client-cache");
        std::fs::create_dir_all(&cache_dir)
            .with_context(|| format!("creating {}", cache_dir.display()))?;
        let cache = Arc::new(Cache::open(&cache_dir)?);
        let r = Remote {
            keys: keys.clone(),
            target: target.clone(),
            cache,
            rt: crate::remote::runtime()?,
        };
        match r.command(WireCommand::Releases)? {
            Outcome::Releases(list) if list.is_empty() => Ok(r),
            Outcome::Releases(list) => Err(UsageError(format!(
                "{target} already has {} release(s): relsync bench activates and prunes releases, so give it an app set aside for benchmarking (an empty app root in relsyncd's config)",
                list.len()
            ))
            .into()),
            o => anyhow::bail!("{target}: the daemon answered with an unexpected {o:?}"),
        }
    }

    /// Pushes release A and makes it current; the client cache records it.
    fn push_a(&self, a_dir: &Path, a: sync_core::manifest::Manifest) -> Result<()> {
        progress(&format!("pushing release A to {}", self.target));
        let req = PushRequest {
            release: ReleaseId::new(RELEASE_A)?,
            manifest: Arc::new(a),
            source: a_dir.to_owned(),
            activate: true,
        };
        self.rt
            .block_on(async {
                let conn = crate::remote::dial(&self.keys, &self.target).await?;
                let res = client::push(&conn, &req, Some(&self.cache), &|_| {}).await;
                conn.close().await;
                anyhow::Ok(res?)
            })
            .with_context(|| format!("pushing release A to {}", self.target))?;
        Ok(())
    }

    fn command(&self, cmd: WireCommand) -> Result<Outcome> {
        let what = cmd.name();
        self.rt
            .block_on(async {
                let conn = crate::remote::dial(&self.keys, &self.target).await?;
                let outcome = client::command(&conn, cmd).await;
                conn.close().await;
                anyhow::Ok(outcome?)
            })
            .with_context(|| format!("running {what} on {}", self.target))
    }

    /// `relsync push B HOST/APP` end to end (scan with no hash cache, connect, transfer, stage,
    /// activate), then back to A: activate A and prune, which removes B (newer than current, so
    /// not the rollback target). The client cache keeps knowing A only.
    ///
    /// Besides the end-to-end time it logs the client's own steps (from the session's state
    /// changes) and the phases the daemon timed and reported in `Staged`.
    fn push_b(&self, log: &mut RunLog, b: &Path) -> Result<()> {
        let marks: std::sync::Mutex<Vec<(ClientState, Instant)>> = Default::default();
        let on_progress = |p: Progress| {
            if let Progress::State(state) = p {
                marks
                    .lock()
                    .expect("not poisoned")
                    .push((state, Instant::now()));
            }
        };
        let started = Instant::now();
        let (report, sample) = phase::measure(|| {
            let scanned = phase::scan_cold(b)?;
            let scanned_at = Instant::now();
            let req = PushRequest {
                release: ReleaseId::new(RELEASE_B)?,
                manifest: Arc::new(scanned.manifest),
                source: b.to_owned(),
                activate: true,
            };
            let opts = PushOptions {
                cache: Some(Arc::clone(&self.cache)),
                record: false,
                ..PushOptions::default()
            };
            let (report, connected_at) = self.rt.block_on(async {
                let conn = crate::remote::dial(&self.keys, &self.target).await?;
                let connected_at = Instant::now();
                let res = client::push_with(&conn, &req, &opts, &on_progress).await;
                conn.close().await;
                anyhow::Ok((res?, connected_at))
            })?;
            Ok((
                report,
                scanned.stats,
                scanned_at,
                connected_at,
                Instant::now(),
            ))
        })?;
        let (pushed, stats, scanned_at, connected_at, ended_at) = report;
        let sent = pushed.sent_bytes.full + pushed.sent_bytes.zstd_ref + pushed.sent_bytes.rsync;
        let session = &pushed.session;
        let secs = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64();
        log.push_client_scan(&stats, secs(started, scanned_at));
        log.push_wall(
            "client: connect",
            "QUIC + TLS handshake",
            0,
            0,
            secs(scanned_at, connected_at),
        );
        let marks = marks.into_inner().expect("not poisoned");
        for (k, (state, at)) in marks.iter().enumerate() {
            let until = marks.get(k + 1).map_or(ended_at, |(_, t)| *t);
            let (name, files, bytes) = match state {
                ClientState::Handshake => ("client: hello", 0, 0),
                ClientState::Manifest => (
                    "client: manifest + need",
                    stats.files,
                    session.manifest_bytes,
                ),
                ClientState::Transfer => ("client: transfer", session.needed, sent),
                ClientState::Staging => ("client: wait for staged", 0, 0),
                ClientState::Activation => ("client: activate", 0, 0),
                _ => continue,
            };
            log.push_wall(name, "daemon holds A", files, bytes, secs(*at, until));
        }
        let staged = &session.staged;
        for ph in &staged.phases {
            let (files, bytes) = match ph.name.as_str() {
                "need" => (staged.files, 0),
                "receive" => (staged.received, staged.received_bytes),
                // Most of them are hard links: the release's size says nothing of the work.
                "stage files" => (staged.files, 0),
                "verify" => (staged.files, 0),
                _ => (0, 0),
            };
            log.push_wall(
                &format!("daemon: {}", ph.name),
                "timed by the daemon",
                files,
                bytes,
                ph.micros as f64 / 1e6,
            );
        }
        let usage = staged.usage;
        log.push_out(
            "daemon: relsyncd process",
            "hello to staged",
            staged.files,
            0,
            None,
            Sample {
                secs: staged.phases.iter().map(|p| p.micros).sum::<u64>() as f64 / 1e6,
                cpu_secs: usage.cpu_micros as f64 / 1e6,
                maxrss_kib: usage.peak_rss_kib,
            },
        );
        log.push_out(
            "end to end: push",
            "no hash cache, daemon holds A",
            stats.files,
            stats.bytes,
            Some(sent),
            sample,
        );
        self.back_to_a()
    }

    fn back_to_a(&self) -> Result<()> {
        self.command(WireCommand::Activate {
            release: ReleaseId::new(RELEASE_A)?,
            prune: false,
        })?;
        self.command(WireCommand::Prune { keep: Some(1) })?;
        Ok(())
    }

    /// Leaves the app as it was found, with no release (its journal keeps the record).
    fn finish(&self) -> Result<String> {
        self.command(WireCommand::Clear)?;
        Ok(format!(
            "cleared {} afterwards: it holds no release, as before (its journal keeps the record)",
            self.target
        ))
    }
}

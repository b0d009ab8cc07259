//! The commands that talk to relsyncd: `keygen`, `trust`, `push`, and `releases`, `activate`,
//! `rollback` and `prune` on a `HOST[:PORT]/APP` target, and `sync` to a
//! `relsync://HOST[:PORT]/EXPORT[/PATH]` destination.
//!
//! Keys and pins live in the config directory (`$RELSYNC_CONFIG_DIR`, else
//! `$XDG_CONFIG_HOME/relsync`, else `~/.config/relsync`): the client key `id.key`/`id.crt` and
//! `known_hosts`. `--identity`/`$RELSYNC_IDENTITY` and `--known-hosts`/`$RELSYNC_KNOWN_HOSTS`
//! point elsewhere.
//!
//! An argument names a remote target only when it has the shape `HOST[:PORT]/APP`: no leading
//! `/`, `.` or `~`, exactly one `/`. `/var/www/app`, `./app` and `app` are always local app roots;
//! a relative two-component path that exists locally (`www/app`) is refused as ambiguous (write
//! `./www/app`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use sync_core::manifest::Policy;
use sync_core::proto::client::{ClientState, Outcome};
use sync_core::wire::{Command as WireCommand, ReleaseInfo, ReleaseStatus};
use sync_core::ReleaseId;
use sync_server::client::target::host_port_with_default;
use sync_server::client::{
    self, looks_remote, Cache, Connection, NeedReport, Progress, PushReport, PushRequest,
    SyncReport, SyncRequest, SyncTarget, Target,
};
use sync_server::net::NetConfig;
use sync_server::tls::{Fingerprint, Identity, KnownHosts};

use crate::output::{human, line};
use crate::UsageError;

/// Where keys and pins are, and how long to wait for a daemon (global options).
#[derive(Args, Debug, Clone)]
pub struct KeyArgs {
    /// Client key: the `.key` file (its `.crt` next to it) [default: CONFIG_DIR/id.key, or
    /// $RELSYNC_IDENTITY].
    #[arg(long, global = true, value_name = "KEY")]
    identity: Option<PathBuf>,
    /// Pinned daemon keys [default: CONFIG_DIR/known_hosts, or $RELSYNC_KNOWN_HOSTS].
    #[arg(long, global = true, value_name = "FILE")]
    known_hosts: Option<PathBuf>,
    /// Seconds to wait for a daemon to answer the connection.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 10)]
    connect_timeout: u64,
}

fn env_path(key: &str) -> Option<PathBuf> {
    std::env::var_os(key)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `$RELSYNC_CONFIG_DIR`, else `$XDG_CONFIG_HOME/relsync`, else `~/.config/relsync`.
pub fn config_dir() -> Result<PathBuf> {
    env_path("RELSYNC_CONFIG_DIR")
        .or_else(|| env_path("XDG_CONFIG_HOME").map(|d| d.join("relsync")))
        .or_else(|| env_path("HOME").map(|d| d.join(".config/relsync")))
        .ok_or_else(|| {
            UsageError(
                "cannot tell where relsync's config lives: set RELSYNC_CONFIG_DIR or HOME".into(),
            )
            .into()
        })
}

impl KeyArgs {
    /// Keys from these files rather than the command line or the config directory.
    pub(crate) fn with_files(identity: PathBuf, known_hosts: PathBuf) -> KeyArgs {
        KeyArgs {
            identity: Some(identity),
            known_hosts: Some(known_hosts),
            connect_timeout: 10,
        }
    }

    /// The key and certificate paths of the client identity.
    fn identity_paths(&self) -> Result<(PathBuf, PathBuf)> {
        let given = self
            .identity
            .clone()
            .or_else(|| env_path("RELSYNC_IDENTITY"));
        let stem = match given {
            Some(p) if p.extension().is_some_and(|e| e == "key") => p.with_extension(""),
            Some(p) => p,
            None => config_dir()?.join("id"),
        };
        let with = |ext: &str| {
            let mut s = stem.clone().into_os_string();
            s.push(ext);
            PathBuf::from(s)
        };
        Ok((with(".key"), with(".crt")))
    }

    fn known_hosts_path(&self) -> Result<PathBuf> {
        match self
            .known_hosts
            .clone()
            .or_else(|| env_path("RELSYNC_KNOWN_HOSTS"))
        {
            Some(p) => Ok(p),
            None => Ok(config_dir()?.join("known_hosts")),
        }
    }

    /// How long to wait for a daemon to answer a connection.
    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout.max(1))
    }

    pub(crate) fn identity(&self) -> Result<Identity> {
        let (key, cert) = self.identity_paths()?;
        if !key.exists() {
            return Err(UsageError(format!(
                "no client key at {}; create one with `relsync keygen` (or pass --identity)",
                key.display()
            ))
            .into());
        }
        Identity::load(&key, &cert).map_err(|e| UsageError(e.to_string()).into())
    }

    fn known_hosts(&self) -> Result<KnownHosts> {
        let path = self.known_hosts_path()?;
        KnownHosts::load(&path).map_err(|e| UsageError(e.to_string()).into())
    }
}

/// The remote target `arg` names, if it has the remote shape (see the module docs).
pub fn target_of(arg: &Path) -> Result<Option<Target>> {
    target_in(arg, Path::new("."))
}

/// [`target_of`], resolving relative local paths from `base`.
fn target_in(arg: &Path, base: &Path) -> Result<Option<Target>> {
    let Some(text) = arg.to_str() else {
        return Ok(None);
    };
    if !looks_remote(text) {
        return Ok(None);
    }
    if base.join(arg).symlink_metadata().is_ok() {
        return Err(UsageError(format!(
            "{text:?} is both a local path and a HOST/APP target; write ./{text} for the local app root, or HOST:PORT/APP for a daemon"
        ))
        .into());
    }
    Target::parse(text)
        .map(Some)
        .map_err(|e| UsageError(e.to_string()).into())
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub(crate) async fn dial(keys: &KeyArgs, target: &Target) -> Result<Connection> {
    dial_with(keys, target, &NetConfig::default()).await
}

/// [`dial`] for one short command: no path MTU probes, which would be most of what it sends.
async fn dial_for_command(keys: &KeyArgs, target: &Target) -> Result<Connection> {
    let net = NetConfig {
        mtu_discovery: false,
        ..NetConfig::default()
    };
    dial_with(keys, target, &net).await
}

async fn dial_with(keys: &KeyArgs, target: &Target, net: &NetConfig) -> Result<Connection> {
    let identity = keys.identity()?;
    let known = keys.known_hosts()?;
    let timeout = Duration::from_secs(keys.connect_timeout.max(1));
    Ok(client::connect(target, &identity, &known, net, timeout).await?)
}

// ---------------------------------------------------------------------------------------------
// keygen and trust

pub fn keygen(dir: Option<PathBuf>, name: &str) -> Result<()> {
    let dir = match dir {
        Some(d) => d,
        None => config_dir()?,
    };
    let identity = Identity::generate(name).context("generating a key")?;
    let (key, cert) = identity.save(&dir, name).map_err(|e| {
        let existing = Identity::load(
            &dir.join(format!("{name}.key")),
            &dir.join(format!("{name}.crt")),
        )
        .map(|i| format!(" (its fingerprint is {})", i.fingerprint()))
        .unwrap_or_default();
        anyhow::anyhow!("{e}{existing}")
    })?;
    let fp = identity.fingerprint();
    line(&format!(
        "wrote {} (private, keep it secret) and {}\n\
         fingerprint {fp}\n\
         to let this key deploy an app, list it in relsyncd's config:\n  \
         [apps.APP]\n  authorized_keys = [\"{fp}\"]\n\
         if this key is a daemon's, clients pin it with: relsync trust HOST[:PORT] {fp}",
        key.display(),
        cert.display()
    ))
}

pub fn trust(keys: &KeyArgs, host: &str, fingerprint: &str) -> Result<()> {
    let host_port = host_port_with_default(host).map_err(|e| UsageError(e.to_string()))?;
    let fp: Fingerprint = fingerprint
        .parse()
        .map_err(|e: sync_server::tls::FingerprintError| UsageError(e.to_string()))?;
    let path = keys.known_hosts_path()?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let mut known = KnownHosts::load(&path).map_err(|e| UsageError(e.to_string()))?;
    known.add(&host_port, fp)?;
    line(&format!("pinned {host_port} to {fp} in {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// push

/// What `relsync push` was asked to do.
pub struct PushArgs {
    pub src: PathBuf,
    pub target: String,
    pub release_id: Option<String>,
    pub no_activate: bool,
    pub dry_run: bool,
    pub json: bool,
    /// Hash every file, ignoring the hash cache.
    pub checksum: bool,
    pub exclude: Vec<String>,
    /// Bytes per second of file data, at most.
    pub bwlimit: Option<u64>,
}

pub fn push(keys: &KeyArgs, a: PushArgs) -> Result<()> {
    let started = Instant::now();
    let target = Target::parse(&a.target).map_err(|e| UsageError(e.to_string()))?;
    let release = match &a.release_id {
        Some(id) => crate::release_id(id)?,
        None => ReleaseId::from_unix_time(crate::now_unix()),
    };
    // Key problems are configuration errors: report them before scanning a large tree.
    keys.identity()?;
    keys.known_hosts()?;
    let show = !a.json && std::io::stderr().is_terminal();
    let cache = open_cache();
    // What the cache holds for the target does not depend on the scan: read it meanwhile. If
    // that fails, the push reads it again and says why it goes without.
    let ahead = cache.clone().filter(|_| !a.dry_run).map(|c| {
        let target = target.clone();
        std::thread::spawn(move || client::read_cache_for(&c, &target))
    });
    let rt = runtime()?;
    // Connect while the tree is scanned: the handshake's round trips overlap the scan instead of
    // following it.
    let early = rt.spawn({
        let (keys, target) = (keys.clone(), target.clone());
        async move {
            let conn = dial(&keys, &target).await;
            (conn, Instant::now())
        }
    });
    let scanned = crate::scan_release_source(&a.src, &a.exclude, show, a.checksum)?;
    let (cached, manifest_basis, basis_manifest) = match ahead.map(std::thread::JoinHandle::join) {
        Some(Ok(Ok(view))) => (Some(view.contents), view.last_manifest, view.last_decoded),
        _ => (None, None, None),
    };
    let req = PushRequest {
        release,
        manifest: Arc::new(scanned.manifest),
        source: a.src.clone(),
        activate: !a.no_activate,
    };
    if a.dry_run {
        let need = rt.block_on(async {
            let conn = dialled_early(early, keys, &target).await?;
            let need = client::dry_run(&conn, &req, cache.as_ref()).await;
            conn.close().await;
            anyhow::Ok(need?)
        });
        let need = need.with_context(|| format!("asking {target} what it needs"))?;
        return print_need(&target, &req.release, &need, a.json);
    }
    // The manifest goes as a delta against the one last pushed there, if the daemon still holds
    // it: compress it while connecting.
    let packing = manifest_basis.clone().map(|basis| {
        let manifest = Arc::clone(&req.manifest);
        std::thread::spawn(move || sync_core::proto::client::pack_manifest(&manifest, &basis))
    });
    let bars = Bars::new(show);
    let report = rt.block_on(async {
        bars.connecting(&target);
        let conn = dialled_early(early, keys, &target).await?;
        let packed_manifest = match packing.map(std::thread::JoinHandle::join) {
            Some(Ok(Ok(packed))) => Some(packed),
            // The session compresses it itself, and reports a failure.
            _ => None,
        };
        let opts = client::PushOptions {
            cache: cache.clone(),
            record: true,
            cached,
            manifest_basis,
            basis_manifest,
            packed_manifest,
            rate: a.bwlimit.map(|r| Arc::new(client::RateLimit::new(r))),
            ..client::PushOptions::default()
        };
        let report = client::push_with(&conn, &req, &opts, &|p| bars.update(p)).await;
        conn.close().await;
        anyhow::Ok(report?)
    });
    bars.done();
    let report = report.with_context(|| {
        format!(
            "pushing {} to {target} as release {}",
            a.src.display(),
            req.release
        )
    })?;
    print_push(&target, &report, &scanned.stats, started.elapsed(), a.json)
}

/// How long a connection dialled before a scan may wait for its first message and still be
/// used. A daemon drops a connection that sends nothing for its message deadline (30 s unless
/// configured lower); past this wait the connection is closed and another one dialled.
const EARLY_DIAL_MAX_WAIT: Duration = Duration::from_secs(5);

/// The connection `early` dialled while the source was scanned, or a new one if that one has
/// waited too long or was closed meanwhile. A failed dial is reported now, after the scan, as
/// it was before connections were dialled early.
async fn dialled_early(
    early: tokio::task::JoinHandle<(Result<Connection>, Instant)>,
    keys: &KeyArgs,
    target: &Target,
) -> Result<Connection> {
    match early.await {
        Ok((Ok(conn), at)) if reuse_early(conn.is_open(), at.elapsed()) => Ok(conn),
        Ok((Ok(conn), _)) => {
            tracing::debug!(
                "{target}: the connection made during the scan is stale; dialling again"
            );
            conn.close().await;
            dial(keys, target).await
        }
        Ok((Err(e), _)) => Err(e),
        // The task panicked or was cancelled: try once more here, where an error is reported.
        Err(_) => dial(keys, target).await,
    }
}

/// Whether a connection dialled before the scan, `waited` ago, can carry the push.
fn reuse_early(open: bool, waited: Duration) -> bool {
    open && waited < EARLY_DIAL_MAX_WAIT
}

/// The client cache, or none (with a warning) when it cannot be opened.
fn open_cache() -> Option<Arc<Cache>> {
    match Cache::default_dir().map(|d| Cache::open(&d)) {
        Some(Ok(c)) => Some(Arc::new(c)),
        Some(Err(e)) => {
            tracing::warn!("{e}; going on without the client cache");
            None
        }
        None => None,
    }
}

// ---------------------------------------------------------------------------------------------
// sync

/// What `relsync sync SRC relsync://…` was asked to do.
pub struct SyncArgs {
    pub src: String,
    pub dst: String,
    pub delete: bool,
    /// Hash every file, ignoring the hash cache.
    pub checksum: bool,
    pub exclude: Vec<String>,
    pub dry_run: bool,
    pub verbose: bool,
    pub progress: bool,
    pub json: bool,
}

/// Mirrors SRC into a directory of an export on a daemon, with the local sync's rules: `SRC/`
/// fills the destination, `SRC` lands in `<destination>/<name of SRC>`; `--delete` removes what
/// SRC does not have; `--exclude` leaves matching paths out on both sides; `-n` asks the daemon
/// for the plan and changes nothing.
pub fn sync(keys: &KeyArgs, a: SyncArgs) -> Result<()> {
    let started = Instant::now();
    let usage = |e: sync_server::client::TargetError| UsageError(e.to_string());
    let destination = SyncTarget::parse(&a.dst)
        .and_then(|t| t.destination_for(&a.src))
        .map_err(usage)?;
    keys.identity()?;
    keys.known_hosts()?;
    let show = a.progress && !a.json;
    let src = PathBuf::from(&a.src);
    let scanned = crate::scan_tree(
        &src,
        &a.exclude,
        vec![],
        show,
        Policy::default(),
        false,
        a.checksum,
    )?;
    let cache = if a.dry_run { None } else { open_cache() };
    let req = SyncRequest {
        destination: destination.clone(),
        delete: a.delete,
        dry_run: a.dry_run,
        excludes: a.exclude.clone(),
        manifest: Arc::new(scanned.manifest),
        source: src,
    };
    let rt = runtime()?;
    let bars = Bars::new(show);
    let report = rt.block_on(async {
        bars.connecting(destination.target());
        let conn = dial(keys, destination.target()).await?;
        let report = client::sync(&conn, &req, cache.as_ref(), &|p| bars.update(p)).await;
        conn.close().await;
        anyhow::Ok(report?)
    });
    bars.done();
    let what = if a.dry_run {
        "planning the sync of"
    } else {
        "syncing"
    };
    let report = report.with_context(|| format!("{what} {} to {destination}", a.src))?;
    if a.dry_run {
        return print_sync_plan(&destination, &report, a.json, a.verbose);
    }
    if a.verbose && !a.json {
        crate::output::print_mirror_plan(&report.session.plan, false, true)?;
    }
    print_sync(&destination, &report, started.elapsed(), a.json)
}

fn print_sync_plan(dest: &SyncTarget, r: &SyncReport, json: bool, verbose: bool) -> Result<()> {
    let s = &r.session;
    if json {
        let v = json!({
            "destination": dest.to_string(),
            "dry_run": true,
            "summary": s.plan.summary,
            "ops": s.plan.ops,
            "needed_files": s.needed,
            "needed_bytes": s.needed_bytes,
            "have_files": s.have_files,
            "have_bytes": s.have_bytes,
        });
        return line(&serde_json::to_string_pretty(&v)?);
    }
    let mut text = String::new();
    for op in &s.plan.ops {
        text += &crate::output::mirror_line(op);
        text.push('\n');
    }
    if !verbose {
        let m = &s.plan.summary;
        text += &format!(
            "would write {} files ({}), remove {}, create {} directories; {} unchanged; {} files ({}) to send to {dest} [dry run]\n",
            m.written_files,
            human(m.written_bytes),
            m.removed,
            m.dirs_created,
            m.unchanged_files,
            s.needed,
            human(s.needed_bytes),
        );
    }
    line(text.trim_end())
}

fn print_sync(dest: &SyncTarget, r: &SyncReport, elapsed: Duration, json: bool) -> Result<()> {
    let s = &r.session;
    let applied = s.applied.clone().unwrap_or_default();
    if json {
        let cache = match &r.cache {
            Some(Ok(u)) => json!({
                "stored_files": u.stored_files, "stored_bytes": u.stored_bytes,
                "skipped_files": u.skipped_files, "pruned_files": u.pruned_files,
            }),
            Some(Err(e)) => json!({ "error": e }),
            None => serde_json::Value::Null,
        };
        let v = json!({
            "destination": dest.to_string(),
            "summary": s.plan.summary,
            "applied": applied,
            "needed": s.needed,
            "have_files": s.have_files,
            "have_bytes": s.have_bytes,
            "signatures": s.signatures,
            "sent": { "full": s.sent_full, "zstd_ref": s.sent_zstd_ref, "rsync": s.sent_rsync },
            "sent_bytes": r.sent_bytes,
            "payload_bytes": s.payload_bytes,
            "cache": cache,
            "seconds": elapsed.as_secs_f64(),
        });
        return line(&serde_json::to_string_pretty(&v)?);
    }
    let b = &r.sent_bytes;
    let mut text = format!(
        "synced {dest}: {} files ({}) written, {} removed, {} directories created, {} unchanged; {} sent as {} (full {} / {}, zstd-ref {} / {}, rsync {} / {}); {:.2}s\n",
        applied.written_files,
        human(applied.written_bytes),
        applied.removed,
        applied.dirs,
        s.plan.summary.unchanged_files,
        s.needed,
        human(s.payload_bytes),
        s.sent_full,
        human(b.full),
        s.sent_zstd_ref,
        human(b.zstd_ref),
        s.sent_rsync,
        human(b.rsync),
        elapsed.as_secs_f64()
    );
    if let Some(Err(e)) = &r.cache {
        text += &format!(
            "warning: the client cache was not updated ({e}); the next sync may send more\n"
        );
    }
    line(text.trim_end())
}

/// Progress display: a spinner while connecting and waiting, a byte bar while sending.
struct Bars {
    pb: ProgressBar,
}

impl Bars {
    fn new(show: bool) -> Bars {
        let pb = if show {
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        pb.set_style(Self::spinner());
        Bars { pb }
    }

    fn spinner() -> ProgressStyle {
        ProgressStyle::with_template("{msg:>12} {spinner} {elapsed}").expect("static template")
    }

    fn connecting(&self, target: &Target) {
        self.pb.set_message(format!("connecting to {target}"));
        self.pb.enable_steady_tick(Duration::from_millis(120));
    }

    fn update(&self, p: Progress) {
        match p {
            Progress::State(s) => {
                let msg = match s {
                    ClientState::Handshake => "handshake",
                    ClientState::Manifest => "manifest",
                    ClientState::Transfer => return,
                    ClientState::Staging => "staging",
                    ClientState::Activation => "activating",
                    ClientState::Mirroring => "applying",
                    ClientState::Command | ClientState::Finished => return,
                };
                if s != ClientState::Handshake {
                    self.pb.set_style(Self::spinner());
                }
                self.pb.set_message(msg);
            }
            Progress::Need { bytes, .. } => {
                self.pb.set_style(
                    ProgressStyle::with_template(
                        "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                    )
                    .expect("static template")
                    .progress_chars("=> "),
                );
                self.pb.set_length(bytes);
                self.pb.set_position(0);
                self.pb.set_message("sending");
            }
            Progress::Sent { bytes, .. } => self.pb.inc(bytes),
        }
    }

    fn done(&self) {
        self.pb.finish_and_clear();
    }
}

fn print_push(
    target: &Target,
    r: &PushReport,
    scan: &sync_core::edge::scan::ScanStats,
    elapsed: Duration,
    json: bool,
) -> Result<()> {
    let s = &r.session;
    let cache = match &r.cache {
        Some(Ok(u)) => json!({
            "stored_files": u.stored_files, "stored_bytes": u.stored_bytes,
            "skipped_files": u.skipped_files, "pruned_files": u.pruned_files,
        }),
        Some(Err(e)) => json!({ "error": e }),
        None => serde_json::Value::Null,
    };
    if json {
        let v = json!({
            "target": target.to_string(),
            "release": s.release,
            "activated": s.activated,
            "files": s.files,
            "bytes": s.bytes,
            "needed": s.needed,
            "have_files": s.have_files,
            "have_bytes": s.have_bytes,
            "signatures": s.signatures,
            "sent": { "full": s.sent_full, "zstd_ref": s.sent_zstd_ref, "rsync": s.sent_rsync },
            "sent_bytes": r.sent_bytes,
            "payload_bytes": s.payload_bytes,
            "manifest_bytes": s.manifest_bytes,
            "manifest_delta": s.manifest_delta,
            "staged": s.staged,
            "cache": cache,
            "scan": {
                "files": scan.files, "bytes": scan.bytes,
                "hashed_files": scan.hashed_files, "cached_files": scan.cached_files,
            },
            "seconds": elapsed.as_secs_f64(),
        });
        return line(&serde_json::to_string_pretty(&v)?);
    }
    let state = if s.activated {
        "activated"
    } else {
        "staged, not activated,"
    };
    let b = &r.sent_bytes;
    let mut text = format!(
        "release {} {state} on {target}: {} files ({}): {} sent as {} (full {} / {}, zstd-ref {} / {}, rsync {} / {}), {} already there ({}), {} linked; {:.2}s\n",
        s.release,
        s.files,
        human(s.bytes),
        s.needed,
        human(s.payload_bytes),
        s.sent_full,
        human(b.full),
        s.sent_zstd_ref,
        human(b.zstd_ref),
        s.sent_rsync,
        human(b.rsync),
        s.have_files,
        human(s.have_bytes),
        s.staged.linked,
        elapsed.as_secs_f64()
    );
    if let Some(Err(e)) = &r.cache {
        text += &format!(
            "warning: the client cache was not updated ({e}); the next push may send more\n"
        );
    }
    line(text.trim_end())
}

fn print_need(target: &Target, release: &ReleaseId, n: &NeedReport, json: bool) -> Result<()> {
    if json {
        let paths: Vec<_> = n
            .paths
            .iter()
            .map(|(p, size)| json!({ "path": p, "size": size }))
            .collect();
        let v = json!({
            "target": target.to_string(),
            "release": release,
            "dry_run": true,
            "files": n.files,
            "bytes": n.bytes,
            "needed_files": n.needed_files,
            "needed_bytes": n.needed_bytes,
            "with_basis": n.with_basis,
            "cached_basis": n.cached_basis,
            "have_files": n.have_files,
            "have_bytes": n.have_bytes,
            "paths": paths,
        });
        return line(&serde_json::to_string_pretty(&v)?);
    }
    let mut text = String::new();
    for (p, size) in &n.paths {
        text += &format!("send     {p} ({})\n", human(*size));
    }
    text += &format!(
        "release {release} to {target}: {} files ({}): {} to send ({}; {} with an older version there, {} of those in the local cache), {} already there ({}) [dry run: asked the daemon, nothing sent or changed]",
        n.files,
        human(n.bytes),
        n.needed_files,
        human(n.needed_bytes),
        n.with_basis,
        n.cached_basis,
        n.have_files,
        human(n.have_bytes),
    );
    line(&text)
}

// ---------------------------------------------------------------------------------------------
// releases, activate, rollback, prune on a daemon

fn run_command(keys: &KeyArgs, target: &Target, cmd: WireCommand) -> Result<Outcome> {
    let what = cmd.name();
    runtime()?
        .block_on(async {
            let conn = dial_for_command(keys, target).await?;
            let outcome = client::command(&conn, cmd).await;
            conn.close().await;
            anyhow::Ok(outcome?)
        })
        .with_context(|| format!("running {what} on {target}"))
}

fn unexpected(target: &Target, o: Outcome) -> anyhow::Error {
    anyhow::anyhow!("{target}: the daemon answered with an unexpected {o:?}")
}

pub fn releases(keys: &KeyArgs, target: &Target, json: bool) -> Result<()> {
    let list = match run_command(keys, target, WireCommand::Releases)? {
        Outcome::Releases(list) => list,
        o => return Err(unexpected(target, o)),
    };
    print_releases(list, json)
}

pub(crate) fn status_name(s: ReleaseStatus) -> &'static str {
    match s {
        ReleaseStatus::Current => "current",
        ReleaseStatus::Rollback => "rollback",
        ReleaseStatus::Good => "good",
        ReleaseStatus::Bad => "bad",
    }
}

fn print_releases(mut list: Vec<ReleaseInfo>, json: bool) -> Result<()> {
    list.sort_by(|a, b| (a.created_unix, &a.id).cmp(&(b.created_unix, &b.id)));
    if json {
        let v: Vec<_> = list
            .iter()
            .map(|r| {
                json!({
                    "id": r.id, "state": status_name(r.status), "created_unix": r.created_unix,
                    "files": r.files, "bytes": r.bytes, "manifest": r.manifest.to_hex(),
                })
            })
            .collect();
        return line(&serde_json::to_string_pretty(&v)?);
    }
    let mut text = format!(
        "{:<24} {:<9} {:<20} {:>8} {:>10}\n",
        "RELEASE", "STATE", "CREATED (UTC)", "FILES", "SIZE"
    );
    for r in list.iter().rev() {
        text += &format!(
            "{:<24} {:<9} {:<20} {:>8} {:>10}\n",
            r.id.as_str(),
            status_name(r.status),
            sync_core::release::format_utc(r.created_unix),
            r.files,
            human(r.bytes)
        );
    }
    line(text.trim_end())
}

pub fn activate(keys: &KeyArgs, target: &Target, id: ReleaseId) -> Result<()> {
    // As before: an explicit activation leaves the other releases alone (`relsync prune`).
    let cmd = WireCommand::Activate {
        release: id,
        prune: false,
    };
    match run_command(keys, target, cmd)? {
        Outcome::Activated { release, .. } => line(&format!("activated {release} on {target}")),
        o => Err(unexpected(target, o)),
    }
}

pub fn rollback(keys: &KeyArgs, target: &Target, to: Option<ReleaseId>) -> Result<()> {
    match run_command(keys, target, WireCommand::Rollback { to })? {
        Outcome::Activated { release, .. } => line(&format!("rolled back {target} to {release}")),
        o => Err(unexpected(target, o)),
    }
}

pub fn prune(keys: &KeyArgs, target: &Target, keep: Option<usize>) -> Result<()> {
    let keep = keep
        .map(|k| u32::try_from(k).map_err(|_| UsageError(format!("--keep {k} is too large"))))
        .transpose()?;
    match run_command(keys, target, WireCommand::Prune { keep })? {
        Outcome::Pruned { removed } if removed.is_empty() => {
            line(&format!("nothing to prune on {target}"))
        }
        Outcome::Pruned { removed } => {
            let names: Vec<&str> = removed.iter().map(ReleaseId::as_str).collect();
            line(&format!("pruned {} on {target}", names.join(", ")))
        }
        o => Err(unexpected(target, o)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_dialled_during_the_scan_is_used_only_while_fresh_and_open() {
        let max = EARLY_DIAL_MAX_WAIT;
        let table = [
            (true, Duration::ZERO, true),
            (true, max - Duration::from_millis(1), true),
            (true, max, false),
            (true, max * 10, false),
            (false, Duration::ZERO, false),
            (false, max, false),
        ];
        for (open, waited, want) in table {
            assert_eq!(
                reuse_early(open, waited),
                want,
                "open {open}, waited {waited:?}"
            );
        }
        // Well inside the daemon's default message deadline.
        assert!(max < Duration::from_secs(30) / 2);
    }

    #[test]
    fn arguments_are_remote_only_in_the_documented_shape() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("www/app")).unwrap();
        let table: Vec<(&str, Result<Option<&str>, ()>)> = vec![
            ("/var/www/app", Ok(None)),
            ("./app", Ok(None)),
            ("app", Ok(None)),
            ("a/b/c", Ok(None)),
            ("web1/shop", Ok(Some("web1:7171/shop"))),
            ("web1:9000/shop", Ok(Some("web1:9000/shop"))),
            ("[::1]/shop", Ok(Some("[::1]:7171/shop"))),
            // Exists locally, so it could be either.
            ("www/app", Err(())),
            ("./www/app", Ok(None)),
            ("web1:0/shop", Err(())),
            ("web1/bad name", Err(())),
        ];
        for (text, want) in table {
            match (target_in(Path::new(text), tmp.path()), want) {
                (Ok(got), Ok(want)) => {
                    assert_eq!(got.map(|t| t.to_string()).as_deref(), want, "{text}")
                }
                (Err(e), Err(())) => {
                    assert!(e.downcast_ref::<UsageError>().is_some(), "{text}: {e}")
                }
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn identity_paths_accept_the_key_file_or_its_stem() {
        let table = [
            ("/k/id.key", "/k/id.key", "/k/id.crt"),
            ("/k/id", "/k/id.key", "/k/id.crt"),
            ("/k/deploy.ci.key", "/k/deploy.ci.key", "/k/deploy.ci.crt"),
        ];
        for (given, key, cert) in table {
            let args = KeyArgs {
                identity: Some(PathBuf::from(given)),
                known_hosts: None,
                connect_timeout: 10,
            };
            let (k, c) = args.identity_paths().unwrap();
            assert_eq!(
                (k.to_str().unwrap(), c.to_str().unwrap()),
                (key, cert),
                "{given}"
            );
        }
    }
}

//! Runs an activation plan (`crate::activation`): hook processes, the swap of `current`, the
//! php-fpm reload (signal or command, then waiting for the re-executed master), the OPcache reset
//! through FPM's socket, HTTP health checks. On a failure after the swap it puts the previous
//! release back, reloads and resets again, marks the release bad in the journal, and returns an
//! error naming the step. Each step leaves a journal line with its duration and result.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::root::{operator, AppRoot, JournalEntry, LockGuard};
use super::{EdgeError, IoContext};
use crate::activation::fpm::{self, Action, OpcacheAnswer};
use crate::activation::http;
use crate::activation::{
    on_failure, plan_activation, plan_revert, ActivationConfig, CommandLine, Context, FpmSocket,
    HealthCheck, OnFailure, Reload, ReloadMethod, Step, StepKind, RESET_SCRIPT, SCRIPT_DIR,
};
use crate::layout;
use crate::release::ReleaseId;

#[derive(Debug, Clone)]
pub struct ActivationOptions {
    /// Put the previous release back when a reload, reset or health check fails (`--no-rollback`
    /// turns it off).
    pub auto_rollback: bool,
    /// Time for journal lines (the caller reads the clock).
    pub now_unix: i64,
    /// The pipeline to run instead of the app root's own `[activation]` table: relsyncd passes the
    /// app's table from its configuration file.
    pub config: Option<ActivationConfig>,
}

impl Default for ActivationOptions {
    fn default() -> Self {
        ActivationOptions {
            auto_rollback: true,
            now_unix: 0,
            config: None,
        }
    }
}

/// How one step went.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub step: StepKind,
    /// The release the step was about (the previous one for the steps of a rollback).
    pub release: ReleaseId,
    pub ok: bool,
    pub ms: u64,
    pub detail: String,
}

/// What an activation did.
#[derive(Debug, Clone, Serialize)]
pub struct ActivationReport {
    pub release: ReleaseId,
    pub previous: Option<ReleaseId>,
    pub steps: Vec<StepReport>,
    pub warnings: Vec<String>,
}

/// An activation that did not complete; `outcome` says where `current` is now.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ActivationError {
    #[error("activating release {release} failed at {step}: {reason}; {outcome}")]
    Step {
        release: ReleaseId,
        step: StepKind,
        reason: String,
        outcome: String,
        report: Box<ActivationReport>,
    },
}

impl ActivationError {
    pub fn report(&self) -> &ActivationReport {
        match self {
            ActivationError::Step { report, .. } => report,
        }
    }

    pub fn step(&self) -> StepKind {
        match self {
            ActivationError::Step { step, .. } => *step,
        }
    }
}

struct Runner<'a> {
    root: &'a AppRoot,
    abs_root: PathBuf,
    opts: ActivationOptions,
    /// Journal a line per step (only when the app configured more than the swap, so plain
    /// deploys keep their one line).
    journal_steps: bool,
    report: ActivationReport,
}

/// Activates `release` (a complete release) with the pipeline of the app's `[activation]` table.
/// `previous` is what `current` pointed to before; it is what a failure goes back to.
pub fn run(
    root: &AppRoot,
    _lock: &LockGuard,
    release: &ReleaseId,
    previous: Option<&ReleaseId>,
    opts: &ActivationOptions,
) -> Result<ActivationReport, EdgeError> {
    let activation = match &opts.config {
        Some(cfg) => cfg.validate(),
        None => root.config()?.activation(),
    }
    .map_err(|e| EdgeError::Config {
        path: root.path().join(layout::META).join(layout::CONFIG),
        reason: e.to_string(),
    })?;
    let abs_root = std::fs::canonicalize(root.path()).ctx("resolve", root.path())?;
    let ctx = Context {
        root: &abs_root,
        release,
        previous,
    };
    let steps = plan_activation(&activation, &ctx);
    let revert = plan_revert(&activation, &ctx);
    let mut runner = Runner {
        root,
        abs_root: abs_root.clone(),
        opts: opts.clone(),
        journal_steps: !activation.is_swap_only(),
        report: ActivationReport {
            release: release.clone(),
            previous: previous.cloned(),
            steps: Vec::new(),
            warnings: Vec::new(),
        },
    };
    for step in &steps {
        let kind = step.kind();
        let reason = match runner.step(step, release) {
            Ok(()) => continue,
            Err(StepFailure::Edge(e)) => return Err(e),
            Err(StepFailure::Failed(reason)) => reason,
        };
        let outcome = match on_failure(kind, opts.auto_rollback) {
            OnFailure::Stop => {
                runner.mark_bad(release, kind, &reason)?;
                format!("current was not changed; {release} is marked bad")
            }
            OnFailure::KeepLive => {
                runner.mark_bad(release, kind, &reason)?;
                format!("{release} was left active (--no-rollback) and is marked bad")
            }
            OnFailure::Report => {
                format!("{release} is live and passed its checks; nothing was rolled back")
            }
            OnFailure::Revert => {
                let (swapped, problems) = runner.revert(&revert, &reason)?;
                runner.mark_bad(release, kind, &reason)?;
                match (revert.first(), swapped, problems.is_empty()) {
                    (Some(Step::Swap { to }), true, true) => {
                        format!("rolled back to {to}; {release} is marked bad")
                    }
                    (Some(_), true, false) => format!(
                        "rolled back with problems ({}); {release} is marked bad",
                        problems.join("; ")
                    ),
                    (Some(Step::Swap { to }), false, _) => format!(
                        "could not go back to {to} ({}), so {release} stays current; it is marked \
                         bad",
                        problems.join("; ")
                    ),
                    _ => format!(
                        "there is no previous release to go back to, so {release} stays current; \
                         it is marked bad"
                    ),
                }
            }
        };
        return Err(ActivationError::Step {
            release: release.clone(),
            step: kind,
            reason,
            outcome,
            report: Box::new(runner.report),
        }
        .into());
    }
    Ok(runner.report)
}

enum StepFailure {
    /// The step did not work; the pipeline's failure policy applies.
    Failed(String),
    /// relsync's own bookkeeping failed (journal, `current`): returned as is.
    Edge(EdgeError),
}

impl Runner<'_> {
    fn warn(&mut self, text: String) {
        tracing::warn!("{text}");
        self.report.warnings.push(text);
    }

    fn journal(
        &self,
        event: String,
        release: &ReleaseId,
        result: String,
        ms: u64,
    ) -> Result<(), EdgeError> {
        self.root.append_journal(&JournalEntry {
            time_unix: self.opts.now_unix,
            event,
            release: release.to_string(),
            operator: operator(),
            manifest: None,
            files: None,
            bytes: None,
            result,
            duration_ms: ms,
        })
    }

    /// Runs one step and records it (report and journal).
    fn step(&mut self, step: &Step, release: &ReleaseId) -> Result<(), StepFailure> {
        let kind = step.kind();
        let t = Instant::now();
        tracing::info!(step = kind.name(), %release, "activation step");
        let result = match step {
            Step::BeforeActivate(c) | Step::AfterActivate(c) => run_command(c),
            Step::Swap { to } => match self.root.swap_current(to) {
                Ok(()) => Ok(format!("current -> {to}")),
                Err(e) => return Err(StepFailure::Edge(e)),
            },
            Step::FpmReload(r) => self.reload(r),
            Step::OpcacheReset {
                sockets,
                script,
                timeout,
            } => self.opcache_reset(sockets, script, *timeout),
            Step::HealthCheck(h) => health_check(h),
        };
        let ms = t.elapsed().as_millis() as u64;
        let (ok, detail) = match &result {
            Ok(d) => (true, d.clone()),
            Err(e) => (false, e.clone()),
        };
        self.report.steps.push(StepReport {
            step: kind,
            release: release.clone(),
            ok,
            ms,
            detail: detail.clone(),
        });
        if self.journal_steps {
            let line = if ok {
                "ok".to_string()
            } else {
                format!("failed: {detail}")
            };
            self.journal(format!("step:{kind}"), release, line, ms)
                .map_err(StepFailure::Edge)?;
        }
        result.map(|_| ()).map_err(StepFailure::Failed)
    }

    /// Runs the revert steps, all of them even when one fails; returns whether `current` went
    /// back and what went wrong (`original`, the failure that caused the revert, is not repeated in
    /// full).
    fn revert(&mut self, steps: &[Step], original: &str) -> Result<(bool, Vec<String>), EdgeError> {
        let mut problems = Vec::new();
        let mut swapped = false;
        for step in steps {
            let target = match step {
                Step::Swap { to } => to.clone(),
                _ => self
                    .report
                    .previous
                    .clone()
                    .unwrap_or_else(|| self.report.release.clone()),
            };
            match self.step(step, &target) {
                Ok(()) => swapped |= matches!(step, Step::Swap { .. }),
                Err(StepFailure::Failed(reason)) if reason == original => {
                    problems.push(format!("{} failed the same way", step.kind()))
                }
                Err(StepFailure::Failed(reason)) => {
                    problems.push(format!("{}: {reason}", step.kind()))
                }
                Err(StepFailure::Edge(e)) if matches!(step, Step::Swap { .. }) => {
                    // `current` still points at the failed release: nothing after this helps.
                    problems.push(format!("swap back: {}", super::error_chain(&e)));
                    break;
                }
                Err(StepFailure::Edge(e)) => return Err(e),
            }
        }
        Ok((swapped, problems))
    }

    fn mark_bad(&self, release: &ReleaseId, kind: StepKind, reason: &str) -> Result<(), EdgeError> {
        self.journal(
            "mark-bad".into(),
            release,
            format!("failed at {kind}: {reason}"),
            0,
        )
    }

    fn reload(&mut self, r: &Reload) -> Result<String, String> {
        match &r.fpm_config {
            Some(conf) => match std::fs::read_to_string(conf) {
                Ok(text) => {
                    if let Some(w) = fpm::reload_warning(conf, &text) {
                        self.warn(w);
                    }
                }
                Err(e) => self.warn(format!(
                    "cannot read {} to check process_control_timeout: {e}",
                    conf.display()
                )),
            },
            None => self.warn(
                "process_control_timeout was not checked: set fpm_config in [activation] to \
                 php-fpm's main config file (a reload with process_control_timeout = 0 kills \
                 requests in flight)"
                    .into(),
            ),
        }
        let started = Instant::now();
        let deadline = started + r.timeout;
        let before = r.pid_file.as_deref().map(pid_file_state);
        let pid = match &r.method {
            ReloadMethod::Signal => {
                let pid_file = r
                    .pid_file
                    .as_deref()
                    .expect("validated: signal needs a pid file");
                let pid = before.as_ref().and_then(|s| s.pid).ok_or_else(|| {
                    format!(
                        "cannot read a pid from {}: is php-fpm running with `pid = {}`?",
                        pid_file.display(),
                        pid_file.display()
                    )
                })?;
                let p = rustix::process::Pid::from_raw(pid).ok_or("bad pid")?;
                rustix::process::kill_process(p, rustix::process::Signal::USR2).map_err(
                    |e| match e {
                        rustix::io::Errno::PERM => format!(
                            "not allowed to signal php-fpm master {pid}: run relsync as its user \
                             or root, or set fpm_reload_command"
                        ),
                        rustix::io::Errno::SRCH => format!(
                            "php-fpm master {pid} (from {}) is not running",
                            pid_file.display()
                        ),
                        e => format!("cannot signal php-fpm master {pid}: {e}"),
                    },
                )?;
                Some(pid)
            }
            ReloadMethod::Command(c) => {
                let (program, args) = c.argv();
                run_command(&CommandLine {
                    command: c.clone(),
                    program,
                    args,
                    cwd: PathBuf::from("/"),
                    env: Vec::new(),
                    timeout: r.timeout,
                })?;
                None
            }
        };
        let how = match pid {
            Some(pid) => format!("SIGUSR2 to php-fpm master {pid}"),
            None => "the reload command".to_string(),
        };
        let new_pid = match (&r.pid_file, before) {
            (Some(pid_file), Some(before)) => loop {
                let now = pid_file_state(pid_file);
                if now.identity.is_some() && now.identity != before.identity {
                    if let Some(p) = now.pid.filter(|p| process_alive(*p)) {
                        break Some(p);
                    }
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "php-fpm did not come back within {:?} after {how}: {} was not \
                         rewritten by a running master; see php-fpm's error log",
                        r.timeout,
                        pid_file.display()
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            },
            _ => {
                self.warn(
                    "the php-fpm reload was not waited for: set fpm_pid_file so relsync can see \
                     the new master start"
                        .into(),
                );
                None
            }
        };
        for s in &r.sockets {
            loop {
                match connect(s) {
                    Ok(()) => break,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(format!(
                            "php-fpm is not accepting connections after {how}: {e}"
                        ))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
        let ms = started.elapsed().as_millis();
        Ok(match new_pid {
            Some(p) => format!("{how}; master {p} re-executed after {ms} ms"),
            None => format!("{how} ran in {ms} ms"),
        })
    }

    /// Writes the reset script under `ROOT/.relsync/php/` (not /tmp: php-fpm under systemd has a
    /// private /tmp), readable by any user, unless it is already there.
    fn write_script(&self) -> Result<(), String> {
        use cap_std::fs::PermissionsExt as _;
        let dir_rel = format!("{}/{SCRIPT_DIR}", layout::META);
        let dir = self.root.dir();
        let show = |e: std::io::Error, what: &str| {
            format!(
                "cannot {what} {}: {e}",
                self.abs_root.join(&dir_rel).join(RESET_SCRIPT).display()
            )
        };
        match dir.create_dir(&dir_rel) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(show(e, "create the directory of")),
        }
        dir.set_permissions(&dir_rel, cap_std::fs::Permissions::from_mode(0o755))
            .map_err(|e| show(e, "open up the directory of"))?;
        let file_rel = format!("{dir_rel}/{RESET_SCRIPT}");
        if dir.read_to_string(&file_rel).ok().as_deref() == Some(fpm::RESET_SCRIPT_SOURCE) {
            return Ok(());
        }
        let tmp_rel = format!("{dir_rel}/.{RESET_SCRIPT}.tmp");
        dir.write(&tmp_rel, fpm::RESET_SCRIPT_SOURCE)
            .map_err(|e| show(e, "write"))?;
        dir.set_permissions(&tmp_rel, cap_std::fs::Permissions::from_mode(0o644))
            .map_err(|e| show(e, "chmod"))?;
        dir.rename(&tmp_rel, dir, &file_rel)
            .map_err(|e| show(e, "rename into place"))
    }

    fn opcache_reset(
        &mut self,
        sockets: &[FpmSocket],
        script: &Path,
        timeout: Duration,
    ) -> Result<String, String> {
        self.write_script()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the FastCGI client: {e}"))?;
        let started = Instant::now();
        let deadline = started + timeout;
        let mut done = Vec::new();
        for socket in sockets {
            let t = Instant::now();
            let first = rt.block_on(fastcgi(socket, script, Action::Reset, deadline))?;
            let mut last: OpcacheAnswer = first.clone();
            let mut polls = 0u32;
            // opcache_reset() only schedules the restart; it happens once no request holds the
            // cache. Until then new requests run uncached, so "done" means the restart happened.
            while !last.settled() {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "the OPcache reset in php-fpm at {socket} was still pending after \
                         {timeout:?}: requests that started before it still hold the cache; raise \
                         opcache_timeout or look for long-running requests"
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
                last = rt.block_on(fastcgi(socket, script, Action::Status, deadline))?;
                polls += 1;
            }
            done.push(format!(
                "{socket}: reset by worker {} and done after {} ms ({polls} status checks)",
                first.pid.unwrap_or_default(),
                t.elapsed().as_millis()
            ));
        }
        Ok(done.join("; "))
    }
}

/// One FastCGI request running the reset script; FPM's answer parsed.
async fn fastcgi(
    socket: &FpmSocket,
    script: &Path,
    action: Action,
    deadline: Instant,
) -> Result<OpcacheAnswer, String> {
    use fastcgi_client::{Client, Params, Request};
    let mut params = Params::default();
    for (k, v) in fpm::fastcgi_params(script, action) {
        params = params.custom(k, v);
    }
    let request = Request::new_tokio(params, tokio::io::empty());
    let io_err = |e: std::io::Error| connect_error(socket, &e);
    let exchange = async {
        let resp = match socket {
            FpmSocket::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p).await.map_err(io_err)?;
                Client::new_tokio(s).execute_once(request).await
            }
            FpmSocket::Tcp { host, port } => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(io_err)?;
                Client::new_tokio(s).execute_once(request).await
            }
        }
        .map_err(|e| format!("FastCGI request to php-fpm at {socket} failed: {e}"))?;
        Ok::<_, String>(resp)
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let resp = tokio::time::timeout(left.max(Duration::from_millis(50)), exchange)
        .await
        .map_err(|_| format!("php-fpm at {socket} did not answer in time"))??;
    fpm::parse_answer(
        resp.stdout.as_deref().unwrap_or_default(),
        resp.stderr.as_deref().unwrap_or_default(),
        script,
    )
    .map_err(|p| format!("php-fpm at {socket}: {p}"))
}

fn connect_error(socket: &FpmSocket, e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        NotFound => format!(
            "php-fpm socket {socket} does not exist: is php-fpm running, and is this its `listen` \
             address?"
        ),
        ConnectionRefused => format!(
            "php-fpm at {socket} refused the connection: is it running and listening there?"
        ),
        PermissionDenied => format!(
            "no permission to connect to php-fpm socket {socket}: run relsync as a user the \
             pool's listen.owner/listen.group/listen.mode allow"
        ),
        _ => format!("cannot connect to php-fpm at {socket}: {e}"),
    }
}

/// A plain connect, to see that a listener is back.
fn connect(socket: &FpmSocket) -> Result<(), String> {
    match socket {
        FpmSocket::Unix(p) => std::os::unix::net::UnixStream::connect(p).map(drop),
        FpmSocket::Tcp { host, port } => TcpStream::connect((host.as_str(), *port)).map(drop),
    }
    .map_err(|e| connect_error(socket, &e))
}

/// What a pid file looks like now: which file it is (php-fpm writes a new one when it starts)
/// and the pid in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PidFileState {
    identity: Option<(u64, u64, i64, i64)>,
    pid: Option<i32>,
}

fn pid_file_state(path: &Path) -> PidFileState {
    let identity = std::fs::metadata(path).ok().map(|m| {
        (
            m.dev(),
            m.ino(),
            m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        )
    });
    let pid = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| fpm::parse_pid(&t));
    PidFileState { identity, pid }
}

fn process_alive(pid: i32) -> bool {
    rustix::process::Pid::from_raw(pid).is_some_and(|p| {
        !matches!(
            rustix::process::test_kill_process(p),
            Err(rustix::io::Errno::SRCH)
        )
    })
}

/// The last bytes a pipe produced.
fn drain(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    const KEEP: usize = 4096;
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        std::thread::spawn(move || {
            let mut tail = Vec::new();
            let mut buf = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * KEEP {
                    tail.drain(..tail.len() - KEEP);
                }
            }
            if tail.len() > KEEP {
                tail.drain(..tail.len() - KEEP);
            }
            let _ = tx.send(tail);
        });
    } else {
        let _ = tx.send(Vec::new());
    }
    rx
}

fn tail_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// Runs a hook or reload command in its own process group, killing the group at the timeout.
fn run_command(c: &CommandLine) -> Result<String, String> {
    let started = Instant::now();
    let mut cmd = std::process::Command::new(&c.program);
    cmd.args(&c.args)
        .current_dir(&c.cwd)
        .envs(c.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound && !c.cwd.is_dir() {
            format!(
                "cannot run `{}`: directory {} is missing",
                c.command,
                c.cwd.display()
            )
        } else if e.kind() == std::io::ErrorKind::NotFound {
            format!("cannot run `{}`: {} not found", c.command, c.program)
        } else {
            format!("cannot run `{}`: {e}", c.command)
        }
    })?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = started + c.timeout;
    let pgid = rustix::process::Pid::from_raw(child.id() as i32);
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() >= deadline => {
                if let Some(g) = pgid {
                    let _ = rustix::process::kill_process_group(g, rustix::process::Signal::KILL);
                }
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("waiting for `{}`: {e}", c.command)),
        }
    };
    // A process the command left in the background may keep the pipes open: do not wait for it.
    let grace = Duration::from_millis(500);
    let out = out.recv_timeout(grace).unwrap_or_default();
    let err = err.recv_timeout(grace).unwrap_or_default();
    let ms = started.elapsed().as_millis();
    let output = tail_text(&err);
    let output = if output.is_empty() {
        tail_text(&out)
    } else {
        output
    };
    if !out.is_empty() || !err.is_empty() {
        tracing::info!(
            "`{}`: {}",
            c.command,
            tail_text(&[out.as_slice(), err.as_slice()].concat())
        );
    }
    match status {
        None => Err(format!(
            "`{}` timed out after {:?} and was killed{}",
            c.command,
            c.timeout,
            if output.is_empty() {
                String::new()
            } else {
                format!(": {output}")
            }
        )),
        Some(st) if st.success() => Ok(format!("`{}` succeeded in {ms} ms", c.command)),
        Some(st) => Err(format!(
            "`{}` failed ({st}){}",
            c.command,
            if output.is_empty() {
                String::new()
            } else {
                format!(": {output}")
            }
        )),
    }
}

/// Retries the check until it passes or its time is up.
fn health_check(h: &HealthCheck) -> Result<String, String> {
    let started = Instant::now();
    let deadline = started + h.timeout;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let last = match http_get(h, deadline).and_then(|r| http::judge(h, &r).map(|()| r)) {
            Ok(r) => {
                return Ok(format!(
                    "{} answered {} after {attempts} attempt(s) in {} ms",
                    h.url,
                    r.status,
                    started.elapsed().as_millis()
                ))
            }
            Err(e) => e,
        };
        if Instant::now() + h.interval >= deadline {
            return Err(format!(
                "{last} (gave up after {attempts} attempt(s) in {:?})",
                h.timeout
            ));
        }
        std::thread::sleep(h.interval);
    }
}

fn http_get(h: &HealthCheck, deadline: Instant) -> Result<http::Response, String> {
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(50))
    };
    let addr = (h.host.as_str(), h.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", h.host))?
        .next()
        .ok_or_else(|| format!("cannot resolve {}", h.host))?;
    let mut s = TcpStream::connect_timeout(&addr, left())
        .map_err(|e| format!("cannot connect to {} ({addr}): {e}", h.url))?;
    let fail = |e: std::io::Error| format!("{}: {e}", h.url);
    s.set_write_timeout(Some(left())).map_err(fail)?;
    s.write_all(&http::get_request(&h.path, &h.host_header, false))
        .map_err(fail)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        s.set_read_timeout(Some(left())).map_err(fail)?;
        let n = s.read(&mut chunk).map_err(fail)?;
        buf.extend_from_slice(&chunk[..n]);
        match http::parse_response(&buf, n == 0) {
            Ok(Some((r, _))) => return Ok(r),
            Ok(None) => {}
            Err(e) => return Err(format!("{}: {e}", h.url)),
        }
    }
}

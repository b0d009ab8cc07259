//! The activation pipeline as data: what to run, in which order, with which arguments and
//! environment, and what to do when a step fails.
//!
//! An app opts in with an `[activation]` table in `ROOT/.relsync/config.toml`. Activating release
//! R then means: `before_activate` commands inside R, the atomic swap of `current`, a PHP-FPM
//! reload, an OPcache reset inside FPM, HTTP health checks, `after_activate` commands. Every step
//! but the swap is optional. This module validates the table ([`ActivationConfig::validate`]) and
//! turns it into a list of [`Step`]s ([`plan_activation`], [`plan_revert`]); `edge::activate` runs
//! them. Processes, signals, sockets and HTTP live only there. The FPM- and HTTP-specific parsing
//! (config files, FastCGI answers, HTTP responses) sits in [`fpm`] and [`http`], pure as well.

pub mod fpm;
pub mod http;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::layout;
use crate::release::ReleaseId;

/// Time a hook command may run when `command_timeout` is not set.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Time php-fpm gets to come back after a reload. Longer than a typical `process_control_timeout`
/// (the old master waits that long for in-flight requests before it re-executes).
pub const DEFAULT_RELOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Time the OPcache reset may stay pending (it waits for requests that hold the cache).
pub const DEFAULT_OPCACHE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a health check keeps retrying.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two health-check attempts.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_millis(200);

/// A command as written in the config: an array is an argv run without a shell; a string is
/// handed to `/bin/sh -c` (pipes, `&&`, variables).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum CommandSpec {
    Argv(Vec<String>),
    Shell(String),
}

/// A duration as written in the config: whole seconds, or a string with a unit (`"500ms"`,
/// `"10s"`, `"2m"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum DurationSpec {
    Secs(u64),
    Text(String),
}

/// One HTTP check as written in the config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// `http://127.0.0.1:8080/health` (plain HTTP to a local listener; no TLS).
    pub url: String,
    /// `Host` header (default: the URL's host and port), to reach the right server block.
    pub host: Option<String>,
    /// Expected status (default 200).
    pub status: Option<u16>,
    /// Text the body must contain.
    pub body_contains: Option<String>,
    /// How long to keep retrying (default 10 s).
    pub timeout: Option<DurationSpec>,
    /// Pause between attempts (default 200 ms).
    pub interval: Option<DurationSpec>,
}

/// The `[activation]` table of `ROOT/.relsync/config.toml`, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActivationConfig {
    /// Run inside the new release before `current` moves; a failure leaves `current` alone.
    #[serde(default)]
    pub before_activate: Vec<CommandSpec>,
    /// Run once the release is live and healthy; a failure is reported, nothing is rolled back.
    #[serde(default)]
    pub after_activate: Vec<CommandSpec>,
    /// Limit for each hook command (default 120 s); the command's process group is killed then.
    pub command_timeout: Option<DurationSpec>,
    /// php-fpm master's pid file: reload by SIGUSR2 and wait for the re-executed master.
    pub fpm_pid_file: Option<PathBuf>,
    /// Reload by this command instead of a signal (e.g. `systemctl reload php8.2-fpm`).
    pub fpm_reload_command: Option<CommandSpec>,
    /// php-fpm's main config file, read to check `process_control_timeout` before a reload.
    pub fpm_config: Option<PathBuf>,
    /// How long to wait for php-fpm to come back after the reload (default 30 s).
    pub reload_timeout: Option<DurationSpec>,
    /// FPM listen addresses (unix socket path or `host:port`) whose OPcache is reset.
    #[serde(default)]
    pub fpm_sockets: Vec<String>,
    /// How long the reset may take, including waiting for requests that hold the cache.
    pub opcache_timeout: Option<DurationSpec>,
    #[serde(default)]
    pub health_check: Vec<HealthCheckConfig>,
}

/// A bad `[activation]` table; `key` names the offending entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
#[error("activation.{key}: {reason}")]
pub struct ActivationConfigError {
    pub key: String,
    pub reason: String,
}

fn bad(key: impl Into<String>, reason: impl Into<String>) -> ActivationConfigError {
    ActivationConfigError {
        key: key.into(),
        reason: reason.into(),
    }
}

/// A validated command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Command {
    Argv(Vec<String>),
    Shell(String),
}

impl Command {
    fn from_spec(spec: &CommandSpec, key: &str) -> Result<Command, ActivationConfigError> {
        match spec {
            CommandSpec::Argv(v) if v.is_empty() || v[0].is_empty() => {
                Err(bad(key, "empty command; give a program and its arguments"))
            }
            CommandSpec::Shell(s) if s.trim().is_empty() => Err(bad(key, "empty command")),
            CommandSpec::Argv(v) if v.iter().any(|a| a.contains('\0')) => {
                Err(bad(key, "NUL byte in an argument"))
            }
            CommandSpec::Shell(s) if s.contains('\0') => Err(bad(key, "NUL byte in the command")),
            CommandSpec::Argv(v) => Ok(Command::Argv(v.clone())),
            CommandSpec::Shell(s) => Ok(Command::Shell(s.clone())),
        }
    }

    /// Program and arguments to execute.
    pub fn argv(&self) -> (String, Vec<String>) {
        match self {
            Command::Argv(v) => (v[0].clone(), v[1..].to_vec()),
            Command::Shell(s) => ("/bin/sh".into(), vec!["-c".into(), s.clone()]),
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Argv(v) => f.write_str(&v.join(" ")),
            Command::Shell(s) => f.write_str(s),
        }
    }
}

/// Where php-fpm listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum FpmSocket {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

impl FpmSocket {
    /// `/run/php/php8.2-fpm.sock`, `127.0.0.1:9000`, `[::1]:9000` or `localhost:9000`.
    pub fn parse(s: &str) -> Result<FpmSocket, String> {
        let path = s.strip_prefix("unix:").unwrap_or(s);
        if path.starts_with('/') {
            return Ok(FpmSocket::Unix(PathBuf::from(path)));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is neither an absolute socket path nor host:port"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("bad port in {s:?}"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("missing host in {s:?}"));
        }
        Ok(FpmSocket::Tcp {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for FpmSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FpmSocket::Unix(p) => write!(f, "{}", p.display()),
            FpmSocket::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            FpmSocket::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// How php-fpm is reloaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadMethod {
    /// SIGUSR2 to the pid in the pid file.
    Signal,
    Command(Command),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reload {
    pub method: ReloadMethod,
    /// Watched for the re-executed master (php-fpm rewrites it on start).
    pub pid_file: Option<PathBuf>,
    /// Checked for `process_control_timeout` before reloading.
    pub fpm_config: Option<PathBuf>,
    /// Sockets that must accept connections again before the reload counts as done.
    pub sockets: Vec<FpmSocket>,
    pub timeout: Duration,
}

/// A validated health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub url: String,
    pub host: String,
    pub port: u16,
    pub path: String,
    /// Value of the `Host` header.
    pub host_header: String,
    pub status: u16,
    pub body_contains: Option<String>,
    pub timeout: Duration,
    pub interval: Duration,
}

/// The `[activation]` table, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Activation {
    pub before_activate: Vec<Command>,
    pub after_activate: Vec<Command>,
    pub command_timeout: Duration,
    pub reload: Option<Reload>,
    pub fpm_sockets: Vec<FpmSocket>,
    pub opcache_timeout: Duration,
    pub health_checks: Vec<HealthCheck>,
}

impl Activation {
    /// True when activating is only the swap (no table, or an empty one): nothing to run, nothing
    /// extra to journal.
    pub fn is_swap_only(&self) -> bool {
        self.before_activate.is_empty()
            && self.after_activate.is_empty()
            && self.reload.is_none()
            && self.fpm_sockets.is_empty()
            && self.health_checks.is_empty()
    }
}

/// Parses `"250ms"`, `"10s"`, `"2m"`, `"1h"` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like \"500ms\", \"10s\" or \"2m\""))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        u => return Err(format!("unknown unit {u:?} in {text:?}; use ms, s, m or h")),
    };
    Ok(d)
}

fn duration(
    spec: &Option<DurationSpec>,
    key: &str,
    default: Duration,
) -> Result<Duration, ActivationConfigError> {
    let d = match spec {
        None => return Ok(default),
        Some(DurationSpec::Secs(s)) => Duration::from_secs(*s),
        Some(DurationSpec::Text(t)) => parse_duration(t).map_err(|r| bad(key, r))?,
    };
    if d.is_zero() {
        return Err(bad(key, "must be more than zero"));
    }
    if d > Duration::from_secs(24 * 3600) {
        return Err(bad(key, "must be at most a day"));
    }
    Ok(d)
}

impl ActivationConfig {
    /// Checks every entry; errors name the key (`activation.health_check[0].url`).
    pub fn validate(&self) -> Result<Activation, ActivationConfigError> {
        let commands = |v: &[CommandSpec], key: &str| {
            v.iter()
                .enumerate()
                .map(|(i, c)| Command::from_spec(c, &format!("{key}[{i}]")))
                .collect::<Result<Vec<_>, _>>()
        };
        let fpm_sockets = self
            .fpm_sockets
            .iter()
            .enumerate()
            .map(|(i, s)| FpmSocket::parse(s).map_err(|r| bad(format!("fpm_sockets[{i}]"), r)))
            .collect::<Result<Vec<_>, _>>()?;
        for (key, p) in [
            ("fpm_pid_file", &self.fpm_pid_file),
            ("fpm_config", &self.fpm_config),
        ] {
            if p.as_ref().is_some_and(|p| !p.is_absolute()) {
                return Err(bad(key, "must be an absolute path"));
            }
        }
        let method = match (&self.fpm_reload_command, &self.fpm_pid_file) {
            (Some(c), _) => Some(ReloadMethod::Command(Command::from_spec(
                c,
                "fpm_reload_command",
            )?)),
            (None, Some(_)) => Some(ReloadMethod::Signal),
            (None, None) => None,
        };
        let reload_timeout = duration(
            &self.reload_timeout,
            "reload_timeout",
            DEFAULT_RELOAD_TIMEOUT,
        )?;
        let reload = match method {
            Some(method) => Some(Reload {
                method,
                pid_file: self.fpm_pid_file.clone(),
                fpm_config: self.fpm_config.clone(),
                sockets: fpm_sockets.clone(),
                timeout: reload_timeout,
            }),
            None if self.fpm_config.is_some() || self.reload_timeout.is_some() => {
                return Err(bad(
                    if self.fpm_config.is_some() {
                        "fpm_config"
                    } else {
                        "reload_timeout"
                    },
                    "only used by a reload; set fpm_pid_file or fpm_reload_command too",
                ))
            }
            None => None,
        };
        if self.opcache_timeout.is_some() && fpm_sockets.is_empty() {
            return Err(bad(
                "opcache_timeout",
                "only used by the OPcache reset; set fpm_sockets too",
            ));
        }
        let health_checks = self
            .health_check
            .iter()
            .enumerate()
            .map(|(i, h)| health_check(h, &format!("health_check[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Activation {
            before_activate: commands(&self.before_activate, "before_activate")?,
            after_activate: commands(&self.after_activate, "after_activate")?,
            command_timeout: duration(
                &self.command_timeout,
                "command_timeout",
                DEFAULT_COMMAND_TIMEOUT,
            )?,
            reload,
            fpm_sockets,
            opcache_timeout: duration(
                &self.opcache_timeout,
                "opcache_timeout",
                DEFAULT_OPCACHE_TIMEOUT,
            )?,
            health_checks,
        })
    }
}

fn health_check(h: &HealthCheckConfig, key: &str) -> Result<HealthCheck, ActivationConfigError> {
    let url = http::Url::parse(&h.url).map_err(|r| bad(format!("{key}.url"), r))?;
    let status = h.status.unwrap_or(200);
    if !(100..=599).contains(&status) {
        return Err(bad(
            format!("{key}.status"),
            "must be an HTTP status (100-599)",
        ));
    }
    let host_header = match &h.host {
        Some(v) if v.is_empty() || v.bytes().any(|b| b.is_ascii_control() || b == b' ') => {
            return Err(bad(
                format!("{key}.host"),
                "must be a host name without spaces or control characters",
            ))
        }
        Some(v) => v.clone(),
        None => url.authority(),
    };
    Ok(HealthCheck {
        url: h.url.clone(),
        host_header,
        host: url.host,
        port: url.port,
        path: url.path,
        status,
        body_contains: h.body_contains.clone(),
        timeout: duration(
            &h.timeout,
            &format!("{key}.timeout"),
            DEFAULT_HEALTH_TIMEOUT,
        )?,
        interval: duration(
            &h.interval,
            &format!("{key}.interval"),
            DEFAULT_HEALTH_INTERVAL,
        )?,
    })
}

/// Which kind of step; the name used in reports, errors and the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    BeforeActivate,
    Swap,
    FpmReload,
    OpcacheReset,
    HealthCheck,
    AfterActivate,
}

impl StepKind {
    pub fn name(self) -> &'static str {
        match self {
            StepKind::BeforeActivate => "before_activate",
            StepKind::Swap => "swap",
            StepKind::FpmReload => "fpm_reload",
            StepKind::OpcacheReset => "opcache_reset",
            StepKind::HealthCheck => "health_check",
            StepKind::AfterActivate => "after_activate",
        }
    }
}

impl fmt::Display for StepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A process to start: everything the edge needs, built here so it can be tested as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommandLine {
    pub command: Command,
    pub program: String,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    /// Added to the inherited environment.
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
}

/// One step of an activation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    BeforeActivate(CommandLine),
    /// Point `current` at `to` (atomic rename, root fsynced).
    Swap {
        to: ReleaseId,
    },
    FpmReload(Reload),
    /// Reset OPcache inside FPM through each socket, running `script` there.
    OpcacheReset {
        sockets: Vec<FpmSocket>,
        script: PathBuf,
        timeout: Duration,
    },
    HealthCheck(HealthCheck),
    AfterActivate(CommandLine),
}

impl Step {
    pub fn kind(&self) -> StepKind {
        match self {
            Step::BeforeActivate(_) => StepKind::BeforeActivate,
            Step::Swap { .. } => StepKind::Swap,
            Step::FpmReload(_) => StepKind::FpmReload,
            Step::OpcacheReset { .. } => StepKind::OpcacheReset,
            Step::HealthCheck(_) => StepKind::HealthCheck,
            Step::AfterActivate(_) => StepKind::AfterActivate,
        }
    }
}

/// What an activation is about.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// Absolute path of the app root (FPM and hooks need paths that do not depend on our cwd).
    pub root: &'a Path,
    pub release: &'a ReleaseId,
    /// What `current` pointed to before.
    pub previous: Option<&'a ReleaseId>,
}

impl Context<'_> {
    pub fn release_dir(&self) -> PathBuf {
        self.root.join(layout::RELEASES).join(self.release.as_str())
    }

    /// Variables every hook command gets.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("RELSYNC_RELEASE".into(), self.release.to_string()),
            (
                "RELSYNC_RELEASE_DIR".into(),
                self.release_dir().to_string_lossy().into_owned(),
            ),
            (
                "RELSYNC_ROOT".into(),
                self.root.to_string_lossy().into_owned(),
            ),
            (
                "RELSYNC_PREVIOUS".into(),
                self.previous.map(|p| p.to_string()).unwrap_or_default(),
            ),
        ]
    }
}

/// Directory under `ROOT/.relsync/` holding the PHP script FPM runs for the reset.
pub const SCRIPT_DIR: &str = "php";
/// The reset script's file name.
pub const RESET_SCRIPT: &str = "opcache-reset.php";

/// Absolute path of the reset script of the app at `root`.
pub fn reset_script_path(root: &Path) -> PathBuf {
    root.join(layout::META).join(SCRIPT_DIR).join(RESET_SCRIPT)
}

fn command_line(cmd: &Command, ctx: &Context<'_>, timeout: Duration) -> CommandLine {
    let (program, args) = cmd.argv();
    CommandLine {
        command: cmd.clone(),
        program,
        args,
        cwd: ctx.release_dir(),
        env: ctx.env(),
        timeout,
    }
}

fn reload_and_reset(a: &Activation, root: &Path, steps: &mut Vec<Step>) {
    if let Some(r) = &a.reload {
        steps.push(Step::FpmReload(r.clone()));
    }
    if !a.fpm_sockets.is_empty() {
        steps.push(Step::OpcacheReset {
            sockets: a.fpm_sockets.clone(),
            script: reset_script_path(root),
            timeout: a.opcache_timeout,
        });
    }
}

/// The steps that activate `ctx.release`, in order.
pub fn plan_activation(a: &Activation, ctx: &Context<'_>) -> Vec<Step> {
    let mut steps: Vec<Step> = a
        .before_activate
        .iter()
        .map(|c| Step::BeforeActivate(command_line(c, ctx, a.command_timeout)))
        .collect();
    steps.push(Step::Swap {
        to: ctx.release.clone(),
    });
    // Reload before reset: a reload starts with an empty cache anyway, and the reset then runs
    // in the new master, so it also covers a reload command that does not wait.
    reload_and_reset(a, ctx.root, &mut steps);
    steps.extend(a.health_checks.iter().cloned().map(Step::HealthCheck));
    steps.extend(
        a.after_activate
            .iter()
            .map(|c| Step::AfterActivate(command_line(c, ctx, a.command_timeout))),
    );
    steps
}

/// The steps that put `ctx.previous` back after a failed activation: the swap back, then the same
/// reload and reset so FPM stops serving the failed release's code. Empty without a previous
/// release.
pub fn plan_revert(a: &Activation, ctx: &Context<'_>) -> Vec<Step> {
    let Some(prev) = ctx.previous.filter(|p| *p != ctx.release) else {
        return Vec::new();
    };
    let mut steps = vec![Step::Swap { to: prev.clone() }];
    reload_and_reset(a, ctx.root, &mut steps);
    steps
}

/// What happens when a step fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// `current` has not moved: stop, mark the release bad.
    Stop,
    /// The release is live but not working: put the previous one back (plan_revert), mark bad.
    Revert,
    /// Same as Revert, but the operator asked to keep it live (`--no-rollback`): mark bad only.
    KeepLive,
    /// The release is live and passed its checks; an `after_activate` hook failed. Report it;
    /// the release stays and is not marked bad.
    Report,
}

/// The decision table for a failed step.
pub fn on_failure(kind: StepKind, auto_rollback: bool) -> OnFailure {
    match kind {
        StepKind::BeforeActivate => OnFailure::Stop,
        // A failed swap leaves `current` where it was (rename is atomic).
        StepKind::Swap => OnFailure::Stop,
        StepKind::FpmReload | StepKind::OpcacheReset | StepKind::HealthCheck => {
            if auto_rollback {
                OnFailure::Revert
            } else {
                OnFailure::KeepLive
            }
        }
        StepKind::AfterActivate => OnFailure::Report,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Activation, String> {
        let cfg: ActivationConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn durations() {
        let table = [
            ("10", Ok(Duration::from_secs(10))),
            ("250ms", Ok(Duration::from_millis(250))),
            ("3s", Ok(Duration::from_secs(3))),
            ("2m", Ok(Duration::from_secs(120))),
            (" 1h ", Ok(Duration::from_secs(3600))),
            ("1d", Err("unknown unit")),
            ("s", Err("not a duration")),
            ("-1s", Err("not a duration")),
            ("", Err("not a duration")),
        ];
        for (text, want) in table {
            match (parse_duration(text), want) {
                (Ok(d), Ok(w)) => assert_eq!(d, w, "{text:?}"),
                (Err(e), Err(w)) => assert!(e.contains(w), "{text:?}: {e}"),
                (got, want) => panic!("{text:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn sockets() {
        let table = [
            ("/run/php/fpm.sock", Ok("/run/php/fpm.sock")),
            ("unix:/run/php/fpm.sock", Ok("/run/php/fpm.sock")),
            ("127.0.0.1:9000", Ok("127.0.0.1:9000")),
            ("[::1]:9000", Ok("[::1]:9000")),
            ("localhost:9001", Ok("localhost:9001")),
            ("php.sock", Err("neither")),
            ("127.0.0.1:0", Err("bad port")),
            ("127.0.0.1:x", Err("bad port")),
            (":9000", Err("missing host")),
        ];
        for (text, want) in table {
            match (FpmSocket::parse(text), want) {
                (Ok(s), Ok(w)) => assert_eq!(s.to_string(), w, "{text:?}"),
                (Err(e), Err(w)) => assert!(e.contains(w), "{text:?}: {e}"),
                (got, want) => panic!("{text:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn config_errors_name_the_key() {
        let table = [
            (
                "before_activate = [[]]",
                "activation.before_activate[0]: empty",
            ),
            (
                "after_activate = [\"  \"]",
                "activation.after_activate[0]: empty",
            ),
            (
                "command_timeout = \"0s\"",
                "activation.command_timeout: must be more",
            ),
            (
                "command_timeout = \"5 parsecs\"",
                "activation.command_timeout: unknown unit",
            ),
            (
                "fpm_pid_file = \"run/fpm.pid\"",
                "activation.fpm_pid_file: must be an absolute",
            ),
            (
                "fpm_config = \"/etc/php-fpm.conf\"",
                "activation.fpm_config: only used by a reload",
            ),
            (
                "opcache_timeout = 5",
                "activation.opcache_timeout: only used by the OPcache",
            ),
            (
                "fpm_sockets = [\"fpm.sock\"]",
                "activation.fpm_sockets[0]: ",
            ),
            (
                "[[health_check]]\nurl = \"https://example.com/\"",
                "activation.health_check[0].url: https is not supported",
            ),
            (
                "[[health_check]]\nurl = \"http://127.0.0.1/\"\nstatus = 42",
                "activation.health_check[0].status",
            ),
            (
                "[[health_check]]\nurl = \"http://127.0.0.1/\"\nhost = \"a b\"",
                "activation.health_check[0].host",
            ),
        ];
        for (text, want) in table {
            let err = parse(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        assert!(parse("reload = true")
            .unwrap_err()
            .contains("unknown field"));
    }

    fn full() -> Activation {
        parse(
            r#"
            before_activate = [["php", "artisan", "migrate"], "echo $RELSYNC_RELEASE > x"]
            after_activate = ["curl -s http://127.0.0.1/warm"]
            command_timeout = "30s"
            fpm_pid_file = "/run/php/fpm.pid"
            fpm_config = "/etc/php/8.2/fpm/php-fpm.conf"
            fpm_sockets = ["/run/php/fpm.sock", "127.0.0.1:9000"]
            [[health_check]]
            url = "http://127.0.0.1:8080/health"
            host = "shop.example"
            body_contains = "ok"
            timeout = "5s"
            "#,
        )
        .unwrap()
    }

    fn kinds(steps: &[Step]) -> Vec<&'static str> {
        steps.iter().map(|s| s.kind().name()).collect()
    }

    #[test]
    fn plans() {
        let (r1, r2) = (ReleaseId::new("r1").unwrap(), ReleaseId::new("r2").unwrap());
        let ctx = Context {
            root: Path::new("/srv/app"),
            release: &r2,
            previous: Some(&r1),
        };
        let a = full();
        let steps = plan_activation(&a, &ctx);
        assert_eq!(
            kinds(&steps),
            [
                "before_activate",
                "before_activate",
                "swap",
                "fpm_reload",
                "opcache_reset",
                "health_check",
                "after_activate"
            ]
        );
        let Step::BeforeActivate(cmd) = &steps[1] else {
            panic!("{:?}", steps[1])
        };
        assert_eq!(cmd.program, "/bin/sh");
        assert_eq!(cmd.args, ["-c", "echo $RELSYNC_RELEASE > x"]);
        assert_eq!(cmd.cwd, Path::new("/srv/app/releases/r2"));
        assert_eq!(cmd.timeout, Duration::from_secs(30));
        assert_eq!(
            cmd.env,
            [
                ("RELSYNC_RELEASE".to_string(), "r2".to_string()),
                ("RELSYNC_RELEASE_DIR".into(), "/srv/app/releases/r2".into()),
                ("RELSYNC_ROOT".into(), "/srv/app".into()),
                ("RELSYNC_PREVIOUS".into(), "r1".into()),
            ]
        );
        let Step::BeforeActivate(cmd) = &steps[0] else {
            panic!()
        };
        assert_eq!((cmd.program.as_str(), cmd.args.len()), ("php", 2));
        let Step::OpcacheReset {
            script, sockets, ..
        } = &steps[4]
        else {
            panic!()
        };
        assert_eq!(script, Path::new("/srv/app/.relsync/php/opcache-reset.php"));
        assert_eq!(sockets.len(), 2);
        let Step::HealthCheck(h) = &steps[5] else {
            panic!()
        };
        assert_eq!(
            (
                h.host.as_str(),
                h.port,
                h.path.as_str(),
                h.host_header.as_str()
            ),
            ("127.0.0.1", 8080, "/health", "shop.example")
        );

        let revert = plan_revert(&a, &ctx);
        assert_eq!(kinds(&revert), ["swap", "fpm_reload", "opcache_reset"]);
        assert_eq!(revert[0], Step::Swap { to: r1.clone() });

        // The first release has nothing to go back to; neither has re-activating current.
        for previous in [None, Some(&r2)] {
            let ctx = Context { previous, ..ctx };
            assert!(plan_revert(&a, &ctx).is_empty());
        }
        let ctx = Context {
            previous: None,
            ..ctx
        };
        let Step::BeforeActivate(cmd) = &plan_activation(&a, &ctx)[0] else {
            panic!()
        };
        assert_eq!(cmd.env[3], ("RELSYNC_PREVIOUS".into(), String::new()));

        let none = Activation::default();
        assert!(none.is_swap_only());
        assert!(!a.is_swap_only());
        assert_eq!(kinds(&plan_activation(&none, &ctx)), ["swap"]);
    }

    #[test]
    fn reload_by_command_and_defaults() {
        let a = parse(
            "fpm_reload_command = \"systemctl reload php8.2-fpm\"\n[[health_check]]\nurl = \"http://localhost/\"",
        )
        .unwrap();
        let r = a.reload.as_ref().unwrap();
        assert_eq!(
            r.method,
            ReloadMethod::Command(Command::Shell("systemctl reload php8.2-fpm".into()))
        );
        assert_eq!(
            (r.pid_file.as_ref(), r.timeout),
            (None, DEFAULT_RELOAD_TIMEOUT)
        );
        let h = &a.health_checks[0];
        assert_eq!(
            (h.host_header.as_str(), h.port, h.status, h.timeout),
            ("localhost", 80, 200, DEFAULT_HEALTH_TIMEOUT)
        );
        assert_eq!(a.command_timeout, DEFAULT_COMMAND_TIMEOUT);
    }

    #[test]
    fn failure_table() {
        use OnFailure::*;
        use StepKind::*;
        let table = [
            (BeforeActivate, true, Stop),
            (BeforeActivate, false, Stop),
            (Swap, true, Stop),
            (FpmReload, true, Revert),
            (OpcacheReset, true, Revert),
            (HealthCheck, true, Revert),
            (FpmReload, false, KeepLive),
            (OpcacheReset, false, KeepLive),
            (HealthCheck, false, KeepLive),
            (AfterActivate, true, Report),
            (AfterActivate, false, Report),
        ];
        for (kind, auto, want) in table {
            assert_eq!(on_failure(kind, auto), want, "{kind} auto_rollback={auto}");
        }
    }
}

//! PHP-FPM, as data: the `process_control_timeout` check of its config file, the PHP script that
//! resets OPcache from inside FPM, the FastCGI parameters that run it, and the reading of FPM's
//! answer into either a status or a problem that says what to fix.
//!
//! Why a script run through FPM's own socket: each FPM master has its own OPcache in shared
//! memory, so `opcache_reset()` from the CLI clears only the CLI's cache. Why `opcache_reset()`
//! rather than `opcache_invalidate()` over the previous release's files: with
//! `$document_root$fastcgi_script_name` the cached entries and every worker's realpath cache are
//! keyed by `current/...` paths that invalidating the old release's real paths does not reach,
//! while a reset restarts the cache and makes every worker drop its realpath cache on its next
//! request; with `$realpath_root` a reset is also what keeps old releases' entries from filling
//! the cache. Its cost, a recompile of what is hot, is paid once per deploy.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// What `process_control_timeout` is in an FPM config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlTimeout {
    /// Not in the `[global]` section: php-fpm's default, 0.
    Unset,
    Set(Duration),
    Invalid(String),
}

/// Parses php-fpm's duration syntax: a number with an optional `s`, `m`, `h` or `d` suffix.
pub fn parse_fpm_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, mult) = match t.as_bytes().last() {
        Some(b's') => (&t[..t.len() - 1], 1),
        Some(b'm') => (&t[..t.len() - 1], 60),
        Some(b'h') => (&t[..t.len() - 1], 3600),
        Some(b'd') => (&t[..t.len() - 1], 86400),
        _ => (t, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a php-fpm duration"))?;
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

/// The value of `key` in the `[global]` section of a php-fpm config file (the last one wins, as
/// in php-fpm). Only this file is read, not its `include`s: pool files cannot hold global keys.
pub fn global_setting(conf: &str, key: &str) -> Option<String> {
    let mut in_global = false;
    let mut value = None;
    for line in conf.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[') {
            in_global = section.trim_end_matches(']').trim() == "global";
            continue;
        }
        if !in_global {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if k.trim() != key {
            continue;
        }
        let v = v.split(';').next().unwrap_or_default().trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        value = Some(v.to_owned());
    }
    value
}

pub fn process_control_timeout(conf: &str) -> ControlTimeout {
    match global_setting(conf, "process_control_timeout") {
        None => ControlTimeout::Unset,
        Some(v) => match parse_fpm_duration(&v) {
            Ok(d) => ControlTimeout::Set(d),
            Err(e) => ControlTimeout::Invalid(e),
        },
    }
}

/// The warning to give before reloading php-fpm whose main config file `path` reads `conf`:
/// without a `process_control_timeout` > 0 the reload kills requests in flight.
pub fn reload_warning(path: &Path, conf: &str) -> Option<String> {
    let fix = "set `process_control_timeout = 10s` in its [global] section so a reload lets \
               running requests finish";
    match process_control_timeout(conf) {
        ControlTimeout::Set(d) if !d.is_zero() => None,
        ControlTimeout::Set(_) => Some(format!(
            "process_control_timeout is 0 in {}: a php-fpm reload kills requests in flight; {fix}",
            path.display()
        )),
        ControlTimeout::Unset => Some(format!(
            "process_control_timeout is not set in {} (php-fpm's default is 0): a php-fpm reload \
             kills requests in flight; {fix}",
            path.display()
        )),
        ControlTimeout::Invalid(e) => Some(format!(
            "cannot read process_control_timeout in {}: {e}; {fix}",
            path.display()
        )),
    }
}

/// The content of a php-fpm pid file.
pub fn parse_pid(text: &str) -> Option<i32> {
    text.trim().parse::<i32>().ok().filter(|p| *p > 1)
}

/// The PHP script FPM runs for the reset. With `RELSYNC_ACTION=reset` it calls `opcache_reset()`;
/// otherwise it only reports, which is how the edge waits for the deferred reset to happen.
pub const RESET_SCRIPT_SOURCE: &str = r#"<?php
// Written by relsync for its OPcache reset step. php-fpm runs it only when relsync asks through
// the FPM socket (it is outside the document root). Safe to delete: relsync writes it again.
$out = ['relsync' => 1, 'pid' => getmypid(), 'sapi' => PHP_SAPI];
if (!extension_loaded('Zend OPcache')) {
    $out['error'] = 'not-loaded';
} elseif (!ini_get('opcache.enable')) {
    $out['error'] = 'disabled';
} else {
    if (($_SERVER['RELSYNC_ACTION'] ?? '') === 'reset') {
        $out['reset'] = @opcache_reset();
    }
    $s = @opcache_get_status(false);
    if (!is_array($s) || (isset($out['reset']) && $out['reset'] === false)) {
        $out['error'] = (string) ini_get('opcache.restrict_api') !== '' ? 'restricted' : 'refused';
        $out['restrict_api'] = (string) ini_get('opcache.restrict_api');
    } else {
        $out['restart_pending'] = !empty($s['restart_pending']);
        $out['restart_in_progress'] = !empty($s['restart_in_progress']);
        $out['cache_full'] = !empty($s['cache_full']);
        $out['used_memory'] = $s['memory_usage']['used_memory'] ?? null;
        $out['cached_scripts'] = $s['opcache_statistics']['num_cached_scripts'] ?? null;
    }
}
header('Content-Type: application/json');
header('Cache-Control: no-store');
echo json_encode($out), "\n";
"#;

/// What the FastCGI request asks the script to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Reset,
    Status,
}

/// FastCGI parameters that run `script` (absolute path) inside FPM.
pub fn fastcgi_params(script: &Path, action: Action) -> Vec<(String, String)> {
    let script_s = script.to_string_lossy().into_owned();
    let dir = script
        .parent()
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = format!(
        "/{}",
        script
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    let action = match action {
        Action::Reset => "reset",
        Action::Status => "status",
    };
    [
        ("GATEWAY_INTERFACE", "CGI/1.1".to_owned()),
        ("SERVER_SOFTWARE", "relsync".to_owned()),
        ("SERVER_PROTOCOL", "HTTP/1.1".to_owned()),
        ("REQUEST_METHOD", "GET".to_owned()),
        ("SCRIPT_FILENAME", script_s),
        ("SCRIPT_NAME", name.clone()),
        ("REQUEST_URI", name.clone()),
        ("DOCUMENT_URI", name),
        ("DOCUMENT_ROOT", dir),
        ("QUERY_STRING", String::new()),
        ("REMOTE_ADDR", "127.0.0.1".to_owned()),
        ("SERVER_NAME", "relsync".to_owned()),
        ("CONTENT_LENGTH", "0".to_owned()),
        ("RELSYNC_ACTION", action.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// What the script reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct OpcacheAnswer {
    pub relsync: u32,
    pub pid: Option<i64>,
    pub error: Option<String>,
    pub reset: Option<bool>,
    #[serde(default)]
    pub restart_pending: bool,
    #[serde(default)]
    pub restart_in_progress: bool,
    #[serde(default)]
    pub cache_full: bool,
    pub used_memory: Option<u64>,
    pub cached_scripts: Option<u64>,
    pub restrict_api: Option<String>,
}

impl OpcacheAnswer {
    /// The reset has taken effect: no restart is waiting for requests that hold the cache.
    pub fn settled(&self) -> bool {
        !self.restart_pending && !self.restart_in_progress
    }
}

/// Why the reset could not be done; each says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FpmProblem {
    #[error(
        "php-fpm refused to run {script} (security.limit_extensions): allow .php in the pool's \
         security.limit_extensions"
    )]
    Denied { script: String },
    #[error(
        "php-fpm cannot open {script} (\"Primary script unknown\"): the pool's user must be able \
         to read it and search every directory above it (chmod o+x on the app root and its \
         .relsync directory), and php-fpm must see the same file system (no chroot, PrivateTmp or \
         container between them)"
    )]
    NotFound { script: String },
    #[error(
        "OPcache is not loaded in this php-fpm: there is nothing to reset; load it \
         (zend_extension=opcache) or remove fpm_sockets from [activation]"
    )]
    NotLoaded,
    #[error(
        "OPcache is disabled in this php-fpm pool (opcache.enable=0): there is nothing to reset; \
         enable it or remove fpm_sockets from [activation]"
    )]
    Disabled,
    #[error(
        "opcache.restrict_api = {restrict_api:?} forbids the reset from {script}: set it to a \
         prefix of that path or leave it empty"
    )]
    Restricted {
        restrict_api: String,
        script: String,
    },
    #[error("OPcache refused the reset requested by {script}")]
    Refused { script: String },
    #[error("php-fpm answered status {status} running {script}: {detail}")]
    Status {
        status: u16,
        script: String,
        detail: String,
    },
    #[error("php-fpm's answer is not the reset script's output ({detail}); is this php-fpm?")]
    Unexpected { detail: String },
}

/// Reads FPM's answer (FastCGI stdout and stderr) to the reset script run from `script`.
pub fn parse_answer(
    stdout: &[u8],
    stderr: &[u8],
    script: &Path,
) -> Result<OpcacheAnswer, FpmProblem> {
    let script_s = script.display().to_string();
    let text = String::from_utf8_lossy(stdout);
    let err_text = String::from_utf8_lossy(stderr);
    let (head, body) = match text.find("\r\n\r\n") {
        Some(i) => (&text[..i], &text[i + 4..]),
        None => match text.find("\n\n") {
            Some(i) => (&text[..i], &text[i + 2..]),
            None => ("", &text[..]),
        },
    };
    let status = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("status"))
        .and_then(|(_, v)| v.trim().split(' ').next()?.parse::<u16>().ok())
        .unwrap_or(200);
    if err_text.contains("security.limit_extensions") || body.trim() == "Access denied." {
        return Err(FpmProblem::Denied { script: script_s });
    }
    if err_text.contains("Primary script unknown") || (status == 404 && body.contains("not found"))
    {
        return Err(FpmProblem::NotFound { script: script_s });
    }
    if status != 200 {
        let detail = super::http::snippet(format!("{body} {err_text}").as_bytes());
        return Err(FpmProblem::Status {
            status,
            script: script_s,
            detail,
        });
    }
    let answer: OpcacheAnswer = match serde_json::from_str(body.trim()) {
        Ok(a) => a,
        Err(_) => {
            return Err(FpmProblem::Unexpected {
                detail: super::http::snippet(format!("{body} {err_text}").as_bytes()),
            })
        }
    };
    match answer.error.as_deref() {
        None => Ok(answer),
        Some("not-loaded") => Err(FpmProblem::NotLoaded),
        Some("disabled") => Err(FpmProblem::Disabled),
        Some("restricted") => Err(FpmProblem::Restricted {
            restrict_api: answer.restrict_api.unwrap_or_default(),
            script: script_s,
        }),
        Some(_) => Err(FpmProblem::Refused { script: script_s }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_timeout() {
        let table = [
            (
                "[global]\nprocess_control_timeout = 10s\n",
                ControlTimeout::Set(Duration::from_secs(10)),
            ),
            (
                "[global]\nprocess_control_timeout = 2m ; why\n",
                ControlTimeout::Set(Duration::from_secs(120)),
            ),
            (
                "[global]\nprocess_control_timeout = \"5\"\n",
                ControlTimeout::Set(Duration::from_secs(5)),
            ),
            (
                "[global]\nprocess_control_timeout = 0\n",
                ControlTimeout::Set(Duration::ZERO),
            ),
            (
                "[global]\n;process_control_timeout = 10s\n",
                ControlTimeout::Unset,
            ),
            (
                "[www]\nprocess_control_timeout = 10s\n",
                ControlTimeout::Unset,
            ),
            (
                "[global]\nprocess_control_timeout = 10s\n[global]\nprocess_control_timeout = 0\n",
                ControlTimeout::Set(Duration::ZERO),
            ),
            (
                "[global]\nprocess_control_timeout = soon\n",
                ControlTimeout::Invalid("\"soon\" is not a php-fpm duration".into()),
            ),
            ("", ControlTimeout::Unset),
        ];
        for (conf, want) in table {
            assert_eq!(process_control_timeout(conf), want, "{conf:?}");
        }
        let p = Path::new("/etc/php/8.2/fpm/php-fpm.conf");
        assert_eq!(
            reload_warning(p, "[global]\nprocess_control_timeout=10s"),
            None
        );
        let w = reload_warning(p, "[global]\nprocess_control_timeout = 0").unwrap();
        assert!(w.contains("is 0 in /etc/php/8.2/fpm/php-fpm.conf"), "{w}");
        let w = reload_warning(p, "[global]\npid = /run/fpm.pid").unwrap();
        assert!(
            w.contains("not set in /etc/php/8.2/fpm/php-fpm.conf"),
            "{w}"
        );
        assert!(w.contains("process_control_timeout = 10s"), "{w}");
    }

    #[test]
    fn pids() {
        for (text, want) in [
            ("1234\n", Some(1234)),
            (" 7 ", Some(7)),
            ("", None),
            ("1", None),
            ("-5", None),
            ("x", None),
        ] {
            assert_eq!(parse_pid(text), want, "{text:?}");
        }
    }

    #[test]
    fn params() {
        let p = fastcgi_params(
            Path::new("/srv/app/.relsync/php/opcache-reset.php"),
            Action::Reset,
        );
        let get = |k: &str| p.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(
            get("SCRIPT_FILENAME"),
            Some("/srv/app/.relsync/php/opcache-reset.php")
        );
        assert_eq!(get("SCRIPT_NAME"), Some("/opcache-reset.php"));
        assert_eq!(get("DOCUMENT_ROOT"), Some("/srv/app/.relsync/php"));
        assert_eq!(get("REQUEST_METHOD"), Some("GET"));
        assert_eq!(get("RELSYNC_ACTION"), Some("reset"));
        let p = fastcgi_params(Path::new("/x/s.php"), Action::Status);
        assert!(p.contains(&("RELSYNC_ACTION".into(), "status".into())));
    }

    #[test]
    fn answers() {
        let script = Path::new("/srv/app/.relsync/php/opcache-reset.php");
        let ok = b"Content-type: application/json\r\n\r\n{\"relsync\":1,\"pid\":42,\"sapi\":\"fpm-fcgi\",\"reset\":true,\"restart_pending\":true,\"restart_in_progress\":false,\"cache_full\":false,\"used_memory\":9000,\"cached_scripts\":3}\n";
        let a = parse_answer(ok, b"", script).unwrap();
        assert_eq!(
            (a.pid, a.reset, a.restart_pending, a.cached_scripts),
            (Some(42), Some(true), true, Some(3))
        );
        assert!(!a.settled());
        let settled = b"Content-type: application/json\r\n\r\n{\"relsync\":1,\"pid\":43,\"restart_pending\":false,\"restart_in_progress\":false}";
        assert!(parse_answer(settled, b"", script).unwrap().settled());

        type Check = fn(&FpmProblem) -> bool;
        /// Name, FastCGI stdout, stderr, the problem expected, text its message must contain.
        type Case = (
            &'static str,
            &'static [u8],
            &'static [u8],
            Check,
            &'static str,
        );
        let table: &[Case] = &[
            (
                "limit_extensions",
                b"Status: 403 Forbidden\r\nContent-type: text/html\r\n\r\nAccess denied.\n",
                b"Access to the script '/srv/app/.relsync/php/opcache-reset.php' has been denied (see security.limit_extensions)",
                |p| matches!(p, FpmProblem::Denied { .. }),
                "security.limit_extensions",
            ),
            (
                "unreadable",
                b"Status: 404 Not Found\r\nContent-type: text/html\r\n\r\nFile not found.\n",
                b"Primary script unknown",
                |p| matches!(p, FpmProblem::NotFound { .. }),
                "chmod o+x",
            ),
            (
                "disabled",
                b"Content-type: application/json\r\n\r\n{\"relsync\":1,\"error\":\"disabled\"}",
                b"",
                |p| matches!(p, FpmProblem::Disabled),
                "opcache.enable=0",
            ),
            (
                "not loaded",
                b"Content-type: application/json\r\n\r\n{\"relsync\":1,\"error\":\"not-loaded\"}",
                b"",
                |p| matches!(p, FpmProblem::NotLoaded),
                "zend_extension=opcache",
            ),
            (
                "restricted",
                b"Content-type: application/json\r\n\r\n{\"relsync\":1,\"error\":\"restricted\",\"restrict_api\":\"/var/www/tools\"}",
                b"",
                |p| matches!(p, FpmProblem::Restricted { .. }),
                "\"/var/www/tools\"",
            ),
            (
                "fatal error",
                b"Status: 500 Internal Server Error\r\nContent-type: text/html\r\n\r\n",
                b"PHP Fatal error: boom",
                |p| matches!(p, FpmProblem::Status { status: 500, .. }),
                "boom",
            ),
            (
                "not php",
                b"Content-type: text/html\r\n\r\n<?php echo 1;",
                b"",
                |p| matches!(p, FpmProblem::Unexpected { .. }),
                "is this php-fpm",
            ),
        ];
        for (name, out, err, check, text) in table {
            let p = parse_answer(out, err, script).unwrap_err();
            assert!(check(&p), "{name}: {p:?}");
            assert!(p.to_string().contains(text), "{name}: {p}");
        }
    }
}

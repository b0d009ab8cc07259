//! The activation pipeline against real processes, sockets and HTTP, without PHP: hook commands
//! (environment, working directory, timeouts that kill the whole process group), health checks
//! against a small local server that answers for whatever `current` points to, the automatic
//! rollback with its journal lines and mark-bad, `--no-rollback`, a php-fpm stand-in that
//! re-executes on SIGUSR2, and the errors for a missing FPM socket and a bad `[activation]` table.
//! The real nginx + php-fpm runs are in `sync-cli/tests/php.rs`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sync_core::activation::StepKind;
use sync_core::edge::activate::{ActivationError, ActivationOptions};
use sync_core::edge::deploy::{self, DeployOptions, DeployReport};
use sync_core::edge::root::AppRoot;
use sync_core::edge::EdgeError;

use crate::harness::*;

/// An HTTP server on 127.0.0.1 that answers 200 "release <id>" for the release `current` points
/// to, or 500 when that release's id starts with "bad".
struct Health {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Health {
    fn start(root: &Path) -> Health {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let (root, flag) = (root.to_owned(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let target = std::fs::read_link(root.join("current")).unwrap_or_default();
                let id = target
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let host_ok = String::from_utf8_lossy(&got).contains("Host: shop.example\r\n");
                let (status, body) = if !host_ok {
                    ("404 Not Found", "wrong host".to_string())
                } else if id.starts_with("bad") {
                    ("500 Internal Server Error", format!("broken {id}"))
                } else {
                    ("200 OK", format!("release {id}"))
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Health {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Health {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn config(path: &Path, activation: &str) {
    put(
        path,
        ".relsync/config.toml",
        format!("shared = [\"storage\"]\n[activation]\n{activation}").as_bytes(),
        0o644,
    );
}

fn health_config(port: u16) -> String {
    format!(
        "[[activation.health_check]]\nurl = \"http://127.0.0.1:{port}/health\"\nhost = \
         \"shop.example\"\nbody_contains = \"release\"\ntimeout = \"600ms\"\ninterval = \"50ms\"\n"
    )
}

fn deploy_n(
    t: &Scratch,
    app: &AppRoot,
    release: &str,
    o: DeployOptions,
) -> Result<DeployReport, EdgeError> {
    let s = t.path().join(format!("src-{release}"));
    source_tiny(&s, &format!("<?php // {release}\n"));
    deploy_tree(
        app,
        &s,
        &DeployOptions {
            keep: Some(10),
            ..o
        },
    )
}

fn activation_error(e: &EdgeError) -> &ActivationError {
    match e {
        EdgeError::Activation(a) => a,
        other => panic!("expected an activation error, got {other:?}"),
    }
}

fn steps(report: &sync_core::edge::activate::ActivationReport) -> Vec<(&'static str, bool)> {
    report.steps.iter().map(|s| (s.step.name(), s.ok)).collect()
}

#[test]
fn hooks_get_their_environment_and_run_in_the_release() {
    let t = scratch();
    let path = t.path().join("app");
    let app = new_app(&path);
    let out = t.path().join("hooks.txt");
    config(
        &path,
        &format!(
            "before_activate = [[\"sh\", \"-c\", \"echo before $RELSYNC_RELEASE $RELSYNC_PREVIOUS \
             $(pwd) >> {out}\"], \"test -f index.php && echo shell $RELSYNC_RELEASE_DIR \
             $RELSYNC_ROOT >> {out}\"]\nafter_activate = [\"echo after $(readlink \
             $RELSYNC_ROOT/current) >> {out}\"]\n",
            out = out.display()
        ),
    );
    deploy_n(&t, &app, "r1", opts("r1", true)).unwrap();
    let report = deploy_n(&t, &app, "r2", opts("r2", true)).unwrap();
    let abs = std::fs::canonicalize(&path).unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    let r = |id: &str| abs.join("releases").join(id).display().to_string();
    let want = format!(
        "before r1 {r1}\nshell {r1} {root}\nafter releases/r1\nbefore r2 r1 {r2}\nshell {r2} \
         {root}\nafter releases/r2\n",
        r1 = r("r1"),
        r2 = r("r2"),
        root = abs.display()
    );
    assert_eq!(text, want);
    assert_eq!(
        steps(report.activation.as_ref().unwrap()),
        [
            ("before_activate", true),
            ("before_activate", true),
            ("swap", true),
            ("after_activate", true)
        ]
    );
    let events: Vec<(String, String)> = journal_events(&path)
        .into_iter()
        .map(|(e, r, _)| (e, r))
        .filter(|(_, r)| r == "r2")
        .collect();
    let want: Vec<(String, String)> = [
        "step:before_activate",
        "step:before_activate",
        "step:swap",
        "step:after_activate",
        "deploy",
    ]
    .iter()
    .map(|e| (e.to_string(), "r2".to_string()))
    .collect();
    assert_eq!(events, want);
    assert_i0(&path);
}

#[test]
fn a_failing_before_activate_hook_leaves_current_alone() {
    let t = scratch();
    let path = t.path().join("app");
    let app = new_app(&path);
    deploy_n(&t, &app, "r1", opts("r1", true)).unwrap();
    config(
        &path,
        "before_activate = [\"echo migrations broke >&2; exit 3\"]\n",
    );
    let err = deploy_n(&t, &app, "r2", opts("r2", true)).unwrap_err();
    let a = activation_error(&err);
    assert_eq!(a.step(), StepKind::BeforeActivate);
    let msg = err.to_string();
    for want in [
        "release r2",
        "before_activate",
        "exit status: 3",
        "migrations broke",
        "current was not changed",
    ] {
        assert!(msg.contains(want), "{want:?} not in {msg}");
    }
    let state = assert_i0(&path);
    assert_eq!(state.current.as_deref(), Some("r1"));
    assert_eq!(app.bad_releases().unwrap(), ["r2"]);
}

#[test]
fn a_hook_that_times_out_is_killed_with_its_children() {
    let t = scratch();
    let path = t.path().join("app");
    let app = new_app(&path);
    let pid_file = t.path().join("grandchild.pid");
    config(
        &path,
        &format!(
            "command_timeout = \"300ms\"\nbefore_activate = [\"sleep 30 & echo $! > {}; wait\"]\n",
            pid_file.display()
        ),
    );
    let started = Instant::now();
    let err = deploy_n(&t, &app, "r1", opts("r1", true)).unwrap_err();
    assert!(
        err.to_string()
            .contains("timed out after 300ms and was killed"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the hook was not stopped"
    );
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The background `sleep` was in the hook's process group: it is gone too (or a zombie of init).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next();
        if stat.is_empty() || state == Some("Z") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "grandchild {pid} still running: {stat}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(assert_i0(&path).current, None);
}

#[test]
fn a_failing_health_check_rolls_back_and_marks_the_release_bad() {
    let t = scratch();
    let path = t.path().join("app");
    let app = new_app(&path);
    let health = Health::start(&path);
    config(&path, &health_config(health.port));
    deploy_n(&t, &app, "r1", opts("r1", true)).unwrap();
    deploy_n(&t, &app, "r2", opts("r2", true)).unwrap();

    let err = deploy_n(&t, &app, "bad3", opts("bad3", true)).unwrap_err();
    let a = activation_error(&err);
    assert_eq!(a.step(), StepKind::HealthCheck);
    let msg = err.to_string();
    for want in [
        "release bad3",
        "health_check",
        "answered 500 (expected 200)",
        "broken bad3",
        "rolled back to r2",
    ] {
        assert!(msg.contains(want), "{want:?} not in {msg}");
    }
    assert_eq!(
        steps(a.report()),
        [("swap", true), ("health_check", false), ("swap", true)]
    );
    assert_eq!(assert_i0(&path).current.as_deref(), Some("r2"));
    assert_eq!(app.bad_releases().unwrap(), ["bad3"]);
    let tail: Vec<(String, String, bool)> = journal_events(&path)
        .into_iter()
        .rev()
        .take(5)
        .rev()
        .map(|(e, r, res)| (e, r, res == "ok"))
        .collect();
    let want = [
        ("step:swap", "bad3", true),
        ("step:health_check", "bad3", false),
        ("step:swap", "r2", true),
        ("mark-bad", "bad3", false),
        ("deploy", "bad3", false),
    ];
    assert_eq!(
        tail,
        want.map(|(e, r, ok)| (e.to_string(), r.to_string(), ok))
    );

    // The bad release is skipped by rollback and pruned before any good one.
    deploy_n(&t, &app, "r4", opts("r4", true)).unwrap();
    let lock = app.lock(|_| {}).unwrap();
    assert_eq!(deploy::rollback(&app, &lock, None, NOW).unwrap(), id("r2"));
    assert_eq!(deploy::rollback(&app, &lock, None, NOW).unwrap(), id("r1"));
    deploy::activate(&app, &lock, &id("r4"), NOW).unwrap();
    // Not right away: requests routed to it while it was live may still be running.
    assert!(deploy::prune(&app, &lock, Some(3), NOW).unwrap().is_empty());
    let later = NOW + sync_core::retention::BAD_GRACE_SECS;
    assert_eq!(
        deploy::prune(&app, &lock, Some(3), later).unwrap(),
        [id("bad3")]
    );
    drop(lock);

    assert_eq!(assert_i0(&path).current.as_deref(), Some("r4"));
}

#[test]
fn rollback_and_activate_run_the_pipeline_too() {
    let t = scratch();
    let path = t.path().join("app");
    let app = new_app(&path);
    let health = Health::start(&path);
    deploy_n(&t, &app, "r1", opts("r1", true)).unwrap();
    deploy_n(&t, &app, "bad2", opts("bad2", false)).unwrap();
    deploy_n(&t, &app, "r3", opts("r3", true)).unwrap();
    config(&path, &health_config(health.port));
    let lock = app.lock(|_| {}).unwrap();

    let err = deploy::activate(&app, &lock, &id("bad2"), NOW).unwrap_err();
    assert_eq!(activation_error(&err).step(), StepKind::HealthCheck);
    assert!(err.to_string().contains("rolled back to r3"), "{err}");
    assert_eq!(assert_i0(&path).current.as_deref(), Some("r3"));

    // With --no-rollback the release stays, marked bad.
    let o = ActivationOptions {
        auto_rollback: false,
        now_unix: NOW,
        config: None,
    };
    let err = deploy::rollback_with(&app, &lock, Some(&id("bad2")), &o).unwrap_err();
    assert!(
        err.to_string().contains("left active (--no-rollback)"),
        "{err}"
    );
    assert_eq!(assert_i0(&path).current.as_deref(), Some("bad2"));

    let report = deploy::rollback_with(&app, &lock, None, &o).unwrap();
    assert_eq!(report.release, id("r1"));
    assert_eq!(steps(&report), [("swap", true), ("health_check", true)]);
    assert!(
        report.steps[1].detail.contains("answered 200"),
        "{:?}",
        report.steps
    );
    let events: Vec<String> = journal_events(&path)
        .into_iter()
        .filter(|(e, ..)| e == "activate" || e == "rollback")
        .map(|(e, r, res)| format!("{e} {r} {}", if res == "ok" { "ok" } else { "failed" }))
        .collect();
    assert_eq!(
        events,
        [
            "activate bad2 failed",
            "rollback bad2 failed",
            "rollback r1 ok"
        ]
    );
}

#[test]
fn an_after_activate_failure_keeps_the_release() {
    let t = scratch();
    let path = t.path().join("app");
    let app = new_app(&path);
    deploy_n(&t, &app, "r1", opts("r1", true)).unwrap();
    config(&path, "after_activate = [[\"false\"]]\n");
    let err = deploy_n(&t, &app, "r2", opts("r2", true)).unwrap_err();
    assert_eq!(activation_error(&err).step(), StepKind::AfterActivate);
    assert!(
        err.to_string().contains("r2 is live and passed its checks"),
        "{err}"
    );
    assert_eq!(assert_i0(&path).current.as_deref(), Some("r2"));
    assert!(app.bad_releases().unwrap().is_empty());
}

/// A php-fpm stand-in: writes its pid file, and on SIGUSR2 writes a new one (as php-fpm's
/// re-executed master does) after `delay`.
fn fake_fpm(dir: &Path, delay: &str) -> (Child, PathBuf) {
    let pid_file = dir.join("fpm.pid");
    let script = format!(
        "trap 'sleep {delay}; echo $$ > {p}.new; mv {p}.new {p}' USR2; echo $$ > {p}.new; mv \
         {p}.new {p}; while :; do sleep 0.02; done",
        p = pid_file.display()
    );
    let child = Command::new("sh").args(["-c", &script]).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pid_file.exists() {
        assert!(Instant::now() < deadline, "fake php-fpm did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    (child, pid_file)
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn reload_waits_for_the_new_master_and_warns_about_process_control_timeout() {
    let t = scratch();
    let path = t.path().join("app");
    let app = new_app(&path);
    let (child, pid_file) = fake_fpm(t.path(), "0.2");
    let _fpm = Kill(child);
    let conf = t.path().join("php-fpm.conf");
    std::fs::write(
        &conf,
        "[global]\npid = x\nprocess_control_timeout = 0\n[www]\nlisten = x\n",
    )
    .unwrap();
    config(
        &path,
        &format!(
            "fpm_pid_file = \"{}\"\nfpm_config = \"{}\"\n",
            pid_file.display(),
            conf.display()
        ),
    );
    let before = std::fs::metadata(&pid_file).unwrap();
    let report = deploy_n(&t, &app, "r1", opts("r1", true)).unwrap();
    let a = report.activation.unwrap();
    assert_eq!(steps(&a), [("swap", true), ("fpm_reload", true)]);
    assert!(a.steps[1].detail.contains("SIGUSR2"), "{:?}", a.steps);
    let after = std::fs::metadata(&pid_file).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_ne!(
        (before.ino(), before.mtime_nsec()),
        (after.ino(), after.mtime_nsec()),
        "returned before the new pid file"
    );
    assert_eq!(a.warnings.len(), 1, "{:?}", a.warnings);
    assert!(
        a.warnings[0].contains("process_control_timeout is 0 in"),
        "{:?}",
        a.warnings
    );

    std::fs::write(&conf, "[global]\nprocess_control_timeout = 10s\n").unwrap();
    let a = deploy_n(&t, &app, "r2", opts("r2", true))
        .unwrap()
        .activation
        .unwrap();
    assert!(a.warnings.is_empty(), "{:?}", a.warnings);

    // A master that never comes back fails the step and the release goes back.
    let slow_dir = t.path().join("slow");
    mkdir(&slow_dir, "", 0o755);
    let (slow, slow_pid) = fake_fpm(&slow_dir, "5");
    let _slow = Kill(slow);
    config(
        &path,
        &format!(
            "fpm_pid_file = \"{}\"\nreload_timeout = \"300ms\"\n",
            slow_pid.display(),
        ),
    );
    let err = deploy_n(&t, &app, "r3", opts("r3", true)).unwrap_err();
    assert_eq!(activation_error(&err).step(), StepKind::FpmReload);
    assert!(
        err.to_string().contains("did not come back within 300ms"),
        "{err}"
    );
    assert!(err.to_string().contains("rolled back"), "{err}");
    assert_eq!(assert_i0(&path).current.as_deref(), Some("r2"));
}

#[test]
fn opcache_reset_against_a_missing_socket_says_so_and_rolls_back() {
    let t = scratch();
    let path = t.path().join("app");
    let app = new_app(&path);
    deploy_n(&t, &app, "r1", opts("r1", true)).unwrap();
    let sock = t.path().join("nope.sock");
    config(
        &path,
        &format!(
            "fpm_sockets = [\"{}\"]\nopcache_timeout = \"1s\"\n",
            sock.display()
        ),
    );
    let err = deploy_n(&t, &app, "r2", opts("r2", true)).unwrap_err();
    assert_eq!(activation_error(&err).step(), StepKind::OpcacheReset);
    let msg = err.to_string();
    assert!(msg.contains("does not exist: is php-fpm running"), "{msg}");
    // The revert tries the reset again, which fails the same way, and says so.
    assert!(
        msg.contains("rolled back with problems (opcache_reset failed the same way)"),
        "{msg}"
    );
    assert_eq!(assert_i0(&path).current.as_deref(), Some("r1"));
    let script = path.join(".relsync/php/opcache-reset.php");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&script).unwrap().permissions().mode() & 0o777,
        0o644
    );
    assert!(std::fs::read_to_string(&script)
        .unwrap()
        .contains("opcache_reset()"));
}

#[test]
fn a_bad_activation_table_is_a_config_error_naming_the_key() {
    let t = scratch();
    let path = t.path().join("app");
    let app = new_app(&path);
    config(&path, "[[activation.health_check]]\nurl = \"https://x/\"\n");
    let err = deploy_n(&t, &app, "r1", opts("r1", true)).unwrap_err();
    assert!(matches!(err, EdgeError::Config { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("config.toml") && msg.contains("activation.health_check[0].url"),
        "{msg}"
    );
}

#[test]
fn the_readme_example_is_a_valid_activation_table() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let start = readme
        .find("```toml\n[activation]")
        .expect("example in README.md")
        + 8;
    let len = readme[start..].find("```").unwrap();
    let cfg = sync_core::edge::root::AppConfig::parse(
        &readme[start..start + len],
        Path::new("README.md"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let a = cfg.activation().unwrap();
    assert_eq!(
        (
            a.before_activate.len(),
            a.fpm_sockets.len(),
            a.health_checks.len()
        ),
        (1, 1, 1)
    );
    assert!(a.reload.is_some());
}

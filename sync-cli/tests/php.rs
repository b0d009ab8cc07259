//! PHP activation end to end: real nginx and php-fpm, started by the test with their own config
//! files, pid files, unix socket and loopback port in a temporary directory (never the system
//! services), and stopped when the test ends. Sixteen keep-alive clients load a small PHP app
//! whose every response names the release of each file it included (one endpoint sleeps between
//! two includes) while `relsync deploy` and `relsync rollback` run one after the other. Every run
//! checks: no non-2xx answer, no response mixing two releases, and every request that starts
//! after a command returned is served by the release `current` then points to.
//!
//! Setups: nginx with `$realpath_root` (no reload, no reset); `$document_root` with
//! `opcache.validate_timestamps=0`, first without the reset (old code is still served: the check
//! must fail) and then with the OPcache reset through FPM's socket; the same with a php-fpm reload
//! instead; a failing health check that rolls back; and a reload against a php-fpm whose
//! `process_control_timeout` is 0, which must warn. Skipped, with the reason printed, when nginx
//! or php-fpm is not installed (CI installs both). `RELSYNC_PHP_CYCLES` raises the number of
//! deploys (fault case 30's long mode).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sync_core::activation::http::{get_request, parse_response};

/// The tests share the two cores with nginx and php-fpm: one at a time keeps the figures honest.
static SERIAL: Mutex<()> = Mutex::new(());

const CLIENTS: usize = 16;

struct Tools {
    nginx: PathBuf,
    fpm: PathBuf,
}

fn find(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    for name in names {
        for d in &dirs {
            let p = d.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

fn tools() -> Option<Tools> {
    let nginx = find(&["nginx"]);
    let fpm = find(&[
        "php-fpm8.2",
        "php-fpm",
        "php-fpm8.3",
        "php-fpm8.4",
        "php-fpm8.1",
    ]);
    match (nginx, fpm) {
        (Some(nginx), Some(fpm)) => Some(Tools { nginx, fpm }),
        (n, f) => {
            eprintln!(
                "skipped: needs nginx and php-fpm (apt-get install nginx php8.2-fpm); found nginx: \
                 {}, php-fpm: {}",
                n.is_some(),
                f.is_some()
            );
            None
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DocRoot {
    /// `SCRIPT_FILENAME $realpath_root$fastcgi_script_name`: each request pinned to one release.
    Realpath,
    /// `SCRIPT_FILENAME $document_root$fastcgi_script_name`: paths through `current`.
    Document,
}

#[derive(Default)]
struct FpmSettings {
    validate_timestamps: bool,
    /// `process_control_timeout` in [global]; None leaves it out (php-fpm's default, 0).
    process_control_timeout: Option<&'static str>,
    /// More lines for the pool.
    pool: &'static str,
    /// The pool's user when the test runs as root (default root).
    user: Option<&'static str>,
}

/// nginx + php-fpm of one test, stopped on drop.
struct Stack {
    dir: PathBuf,
    port: u16,
    sock: PathBuf,
    fpm_pid: PathBuf,
    fpm_conf: PathBuf,
    fpm: Child,
    nginx: Child,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        if Instant::now() > deadline {
            panic!(
                "{what} did not start: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Stack {
    fn start(tools: &Tools, dir: &Path, app: &Path, mode: DocRoot, fpm: FpmSettings) -> Stack {
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let sock = dir.join("fpm.sock");
        let fpm_pid = dir.join("fpm.pid");
        let fpm_conf = dir.join("php-fpm.conf");
        let root = is_root();
        let mut conf = format!(
            "[global]\npid = {pid}\nerror_log = {log}\ndaemonize = no\n",
            pid = fpm_pid.display(),
            log = dir.join("fpm.log").display()
        );
        if let Some(t) = fpm.process_control_timeout {
            conf += &format!("process_control_timeout = {t}\n");
        }
        conf += &format!(
            "[app]\nlisten = {sock}\npm = static\npm.max_children = 6\ncatch_workers_output = \
             yes\nphp_admin_value[opcache.validate_timestamps] = {vt}\n\
             php_admin_value[opcache.revalidate_freq] = 0\nphp_admin_flag[display_errors] = off\n\
             php_admin_flag[log_errors] = on\n",
            sock = sock.display(),
            vt = u8::from(fpm.validate_timestamps)
        );
        conf += fpm.pool;
        match (root, fpm.user) {
            (true, Some(user)) => conf += &format!("user = {user}\n"),
            (true, None) => conf += "user = root\ngroup = root\n",
            (false, _) => {}
        }
        std::fs::write(&fpm_conf, conf).unwrap();
        let mut cmd = Command::new(&tools.fpm);
        cmd.args(["--nodaemonize", "--fpm-config"]).arg(&fpm_conf);
        if root {
            cmd.arg("--allow-to-run-as-root");
        }
        let fpm_child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("fpm.out")).unwrap())
            .spawn()
            .unwrap();

        let port = free_port();
        let script = match mode {
            DocRoot::Realpath => {
                "fastcgi_param SCRIPT_FILENAME $realpath_root$fastcgi_script_name;\n\
                 fastcgi_param DOCUMENT_ROOT $realpath_root;"
            }
            DocRoot::Document => {
                "fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;"
            }
        };
        let t = dir.join("tmp");
        let nginx_conf = format!(
            "daemon off;\nmaster_process on;\nworker_processes 2;\npid {dir}/nginx.pid;\nerror_log \
             {dir}/nginx-error.log warn;\n{user}events {{ worker_connections 1024; }}\nhttp {{\n  \
             access_log off;\n  client_body_temp_path {t}/body;\n  fastcgi_temp_path {t}/fastcgi;\n  \
             proxy_temp_path {t}/proxy;\n  uwsgi_temp_path {t}/uwsgi;\n  scgi_temp_path {t}/scgi;\n  \
             keepalive_requests 1000000;\n  keepalive_timeout 120s;\n  server {{\n    listen \
             127.0.0.1:{port};\n    root {app}/current/public;\n    location ~ \\.php$ {{\n      \
             include /etc/nginx/fastcgi_params;\n      {script}\n      fastcgi_pass \
             unix:{sock};\n    }}\n  }}\n}}\n",
            dir = dir.display(),
            t = t.display(),
            app = app.display(),
            sock = sock.display(),
            user = if root { "user root root;\n" } else { "" },
        );
        let nginx_conf_path = dir.join("nginx.conf");
        std::fs::write(&nginx_conf_path, nginx_conf).unwrap();
        let nginx_child = Command::new(&tools.nginx)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&nginx_conf_path)
            .arg("-e")
            .arg(dir.join("nginx-startup.log"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("nginx.out")).unwrap())
            .spawn()
            .unwrap();
        let mut stack = Stack {
            dir: dir.to_owned(),
            port,
            sock,
            fpm_pid,
            fpm_conf,
            fpm: fpm_child,
            nginx: nginx_child,
        };
        let (sock, pid) = (stack.sock.clone(), stack.fpm_pid.clone());
        wait_for(
            "php-fpm",
            || sock.exists() && pid.exists(),
            &dir.join("fpm.out"),
        );
        wait_for(
            "nginx",
            || TcpStream::connect(("127.0.0.1", port)).is_ok(),
            &dir.join("nginx.out"),
        );
        for child in [&mut stack.fpm, &mut stack.nginx] {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("a server exited at start ({st}); see {}", dir.display());
            }
        }
        stack
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for child in [&mut self.nginx, &mut self.fpm] {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        for child in [&mut self.nginx, &mut self.fpm] {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    }
}

/// Writes the app at release `id` into `src`: every file returns or prints `id`, so a response
/// lists the release of each file that served it.
fn write_app(src: &Path, id: &str, healthy: bool) {
    let _ = std::fs::remove_dir_all(src);
    std::fs::create_dir_all(src.join("public")).unwrap();
    std::fs::create_dir_all(src.join("lib")).unwrap();
    let respond = "header('Content-Length: ' . strlen($body));\necho $body;\n";
    let files = [
        (
            "public/index.php".to_string(),
            format!(
                "<?php\n$ids = ['{id}'];\n$ids[] = require __DIR__ . '/../lib/a.php';\n$ids[] = \
                 require __DIR__ . '/../lib/b.php';\n$body = implode(',', $ids) . \"\\n\";\n{respond}"
            ),
        ),
        (
            "public/slow.php".to_string(),
            format!(
                "<?php\n$ids = ['{id}'];\n$ids[] = require __DIR__ . '/../lib/a.php';\n\
                 usleep(50000);\n$ids[] = require __DIR__ . '/../lib/b.php';\n$body = implode(',', \
                 $ids) . \"\\n\";\n{respond}"
            ),
        ),
        (
            "public/health.php".to_string(),
            format!(
                "<?php\n$ok = {};\nhttp_response_code($ok ? 200 : 500);\n$body = ($ok ? 'ok ' : \
                 'broken ') . '{id}';\n{respond}",
                if healthy { "true" } else { "false" }
            ),
        ),
        ("lib/a.php".to_string(), format!("<?php\nreturn '{id}';\n")),
        ("lib/b.php".to_string(), format!("<?php\nreturn '{id}';\n")),
    ];
    for (p, text) in files {
        std::fs::write(src.join(p), text).unwrap();
    }
}

struct Sample {
    start: Instant,
    end: Instant,
    /// 0: the connection failed.
    status: u16,
    ids: Vec<String>,
}

struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Sample>>>,
}

fn client(port: u16, stop: Arc<AtomicBool>, seed: usize) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut conn: Option<TcpStream> = None;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut n = seed;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let path = if n.is_multiple_of(4) {
            "/slow.php"
        } else {
            "/index.php"
        };
        let start = Instant::now();
        let result = (|| -> std::io::Result<(u16, Vec<u8>, bool)> {
            if conn.is_none() {
                let s = TcpStream::connect(("127.0.0.1", port))?;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                s.set_nodelay(true)?;
                conn = Some(s);
                buf.clear();
            }
            let s = conn.as_mut().expect("connected above");
            s.write_all(&get_request(path, "app.test", true))?;
            loop {
                match parse_response(&buf, false) {
                    Ok(Some((r, used))) => {
                        buf.drain(..used);
                        return Ok((r.status, r.body, r.keep_alive));
                    }
                    Ok(None) => {}
                    Err(e) => return Err(std::io::Error::other(e.to_string())),
                }
                let k = s.read(&mut chunk)?;
                if k == 0 {
                    return Err(std::io::Error::other("connection closed"));
                }
                buf.extend_from_slice(&chunk[..k]);
            }
        })();
        let end = Instant::now();
        match result {
            Ok((status, body, keep)) => {
                let text = String::from_utf8_lossy(&body);
                let ids = text.trim().split(',').map(str::to_owned).collect();
                samples.push(Sample {
                    start,
                    end,
                    status,
                    ids,
                });
                if !keep {
                    conn = None;
                }
            }
            Err(e) => {
                samples.push(Sample {
                    start,
                    end,
                    status: 0,
                    ids: vec![e.to_string()],
                });
                conn = None;
            }
        }
    }
    samples
}

impl Load {
    fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..CLIENTS)
            .map(|i| {
                let stop = stop.clone();
                std::thread::spawn(move || client(port, stop, i))
            })
            .collect();
        Load { stop, threads }
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    }
}

/// One `relsync` command of a run: when it started and returned, and where `current` pointed
/// before and after.
struct Event {
    start: Instant,
    done: Instant,
    before: String,
    after: String,
    /// The release the command was about (the one deployed; for a rollback, where it went).
    target: String,
    what: String,
}

fn current(app: &Path) -> String {
    std::fs::read_link(app.join("current"))
        .map(|t| t.file_name().unwrap().to_string_lossy().into_owned())
        .unwrap_or_default()
}

struct Run {
    tmp: PathBuf,
    app: PathBuf,
    events: Vec<Event>,
    stderr: String,
    /// (step, ms) of every successful deploy's activation, from its `--json` report.
    steps: Vec<(String, u64)>,
}

impl Run {
    fn new(tmp: &Path) -> Run {
        let app = tmp.join("app");
        std::fs::create_dir_all(app.join(".relsync")).unwrap();
        Run {
            tmp: tmp.to_owned(),
            app,
            events: Vec::new(),
            stderr: String::new(),
            steps: Vec::new(),
        }
    }

    fn config(&self, activation: &str) {
        std::fs::write(
            self.app.join(".relsync/config.toml"),
            format!("keep = 5\n[activation]\n{activation}"),
        )
        .unwrap();
    }

    fn relsync(&mut self, args: &[&str]) -> Output {
        self.relsync_for(args, None)
    }

    fn relsync_for(&mut self, args: &[&str], target: Option<&str>) -> Output {
        let before = current(&self.app);
        let start = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_relsync"))
            .args(args)
            .env("RELSYNC_CACHE_DIR", self.tmp.join("cache"))
            .output()
            .unwrap();
        let done = Instant::now();
        self.stderr += &String::from_utf8_lossy(&out.stderr);
        let after = current(&self.app);
        if out.status.success() && args[0] == "deploy" {
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            for st in json["activation"]["steps"].as_array().into_iter().flatten() {
                let name = st["step"].as_str().unwrap_or_default().to_owned();
                self.steps
                    .push((name, st["ms"].as_u64().unwrap_or_default()));
            }
        }
        self.events.push(Event {
            start,
            done,
            before,
            target: target.map_or_else(|| after.clone(), str::to_owned),
            after,
            what: args[..2].join(" "),
        });
        out
    }

    fn deploy(&mut self, id: &str, healthy: bool) -> Output {
        let src = self.tmp.join("src");
        write_app(&src, id, healthy);
        let (src, app) = (src.display().to_string(), self.app.display().to_string());
        self.relsync_for(
            &["deploy", &src, &app, "--release-id", id, "--json"],
            Some(id),
        )
    }

    fn rollback(&mut self) -> Output {
        let app = self.app.display().to_string();
        self.relsync(&["rollback", &app])
    }

    /// `deploys` deploys with a rollback after every fifth, all expected to succeed.
    fn cycles(&mut self, prefix: &str, deploys: usize) {
        for i in 1..=deploys {
            let out = self.deploy(&format!("{prefix}{i:03}"), true);
            assert_ok(&out, "deploy");
            if i % 5 == 0 {
                assert_ok(&self.rollback(), "rollback");
            }
        }
    }
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "relsync {what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[derive(Debug, Default)]
struct Figures {
    requests: usize,
    errors: usize,
    mixed: usize,
    /// Requests that started after a command returned but were served by another release than
    /// the one `current` then pointed to (or one a later command, already running before the
    /// response came back, made current).
    stale: usize,
    /// Longest time from a command returning to the end of the last response of the release it
    /// replaced (requests in flight when it returned).
    last_old_ms: f64,
    deploys: usize,
    rollbacks: usize,
    problems: Vec<String>,
}

fn analyze(samples: &[Sample], events: &[Event]) -> Figures {
    let first = samples.iter().map(|s| s.start).min();
    let under_load = |what: &str| {
        events
            .iter()
            .filter(|e| e.what.starts_with(what) && first.is_some_and(|t| e.start >= t))
            .count()
    };
    let mut f = Figures {
        requests: samples.len(),
        deploys: under_load("deploy"),
        rollbacks: under_load("rollback"),
        ..Figures::default()
    };
    for s in samples {
        if !(200..300).contains(&s.status) {
            f.errors += 1;
            if f.errors <= 5 {
                f.problems
                    .push(format!("status {} at {:?}: {:?}", s.status, s.start, s.ids));
            }
            continue;
        }
        if s.ids.len() != 3 || s.ids.iter().any(|i| *i != s.ids[0]) {
            f.mixed += 1;
            if f.mixed <= 5 {
                f.problems.push(format!("mixed response {:?}", s.ids));
            }
            continue;
        }
        let served = &s.ids[0];
        let Some(k) = events.iter().rposition(|e| e.done <= s.start) else {
            continue;
        };
        // Served by what `current` pointed to when the request started, or by a release that a
        // later command (one that started before the request ended) made current, if only for a
        // moment (a failed activation).
        let ok = events[k].after == *served
            || events[k + 1..]
                .iter()
                .take_while(|e| e.start < s.end)
                .any(|e| e.after == *served || e.target == *served);
        if !ok {
            f.stale += 1;
            if f.stale <= 5 {
                f.problems.push(format!(
                    "request {:?} after `{}` ({} -> {}) returned was served by {served}",
                    s.start - events[k].done,
                    events[k].what,
                    events[k].before,
                    events[k].after,
                ));
            }
        }
    }
    // Requests in flight when a command returned, served by the release it replaced.
    for (k, e) in events.iter().enumerate() {
        if e.before == e.after {
            continue;
        }
        let until = events.get(k + 1).map(|n| n.start);
        for s in samples {
            let old = s.status == 200 && s.ids.iter().all(|i| *i == e.before);
            if old && s.start < e.done && s.end > e.done && until.is_none_or(|u| s.start < u) {
                let lag = s.end - e.done;
                f.last_old_ms = f.last_old_ms.max(lag.as_secs_f64() * 1000.0);
            }
        }
    }
    f
}

/// Median and longest duration of each activation step.
fn step_times(steps: &[(String, u64)]) -> String {
    let mut names: Vec<&str> = steps.iter().map(|(n, _)| n.as_str()).collect();
    names.dedup();
    names.sort();
    names.dedup();
    names
        .iter()
        .map(|n| {
            let mut ms: Vec<u64> = steps.iter().filter(|s| s.0 == *n).map(|s| s.1).collect();
            ms.sort();
            format!("{n} {} ms (max {})", ms[ms.len() / 2], ms[ms.len() - 1])
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn report(setup: &str, f: &Figures, elapsed: Duration, steps: &[(String, u64)]) {
    println!(
        "php-activation {setup}: activation step medians: {}",
        step_times(steps)
    );
    println!(
        "php-activation {setup}: {} deploys, {} rollbacks, {} requests in {:.1}s, {} errors, {} \
         mixed, {} stale after return, last old-release response {:.1} ms after return",
        f.deploys,
        f.rollbacks,
        f.requests,
        elapsed.as_secs_f64(),
        f.errors,
        f.mixed,
        f.stale,
        f.last_old_ms
    );
}

fn assert_clean(setup: &str, f: &Figures, stack: &Stack) {
    assert!(f.requests > 500, "{setup}: only {} requests", f.requests);
    let tail = |name: &str| {
        let log = stack.log(name);
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    };
    assert!(
        f.errors == 0 && f.mixed == 0 && f.stale == 0,
        "{setup}: {} errors, {} mixed, {} stale: {:#?}\nphp-fpm log:\n{}\nnginx log:\n{}",
        f.errors,
        f.mixed,
        f.stale,
        f.problems,
        tail("fpm.log"),
        tail("nginx-error.log")
    );
}

fn cycles() -> usize {
    std::env::var("RELSYNC_PHP_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

fn health(port: u16) -> String {
    format!(
        "[[activation.health_check]]\nurl = \"http://127.0.0.1:{port}/health.php\"\nhost = \
         \"app.test\"\nbody_contains = \"ok\"\ntimeout = \"1s\"\ninterval = \"50ms\"\n"
    )
}

/// Under load: `cycles` deploys with rollbacks, and one deploy whose health check fails.
fn load_run(run: &mut Run, stack: &Stack, prefix: &str, deploys: usize) -> (Figures, Duration) {
    let load = Load::start(stack.port);
    let started = Instant::now();
    run.steps.clear();
    std::thread::sleep(Duration::from_millis(200));
    run.cycles(prefix, deploys / 2);
    let bad = format!("{prefix}bad");
    let out = run.deploy(&bad, false);
    let bad_return = run.events.last().expect("the failed deploy").done;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a broken release was accepted");
    assert!(
        err.contains(&format!("activating release {bad} failed at health_check"))
            && err.contains("rolled back to"),
        "{err}"
    );
    assert_ne!(current(&run.app), bad);
    // `relsync releases` lists it as bad (until retention removes it, bad releases first).
    let list = releases_json(run);
    let states: Vec<(&str, &str)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r["state"].as_str().unwrap()))
        .collect();
    assert!(states.contains(&(bad.as_str(), "bad")), "{states:?}");
    run.cycles(&format!("{prefix}x"), deploys - deploys / 2);
    std::thread::sleep(Duration::from_millis(200));
    let samples = load.finish();
    let elapsed = started.elapsed();
    let f = analyze(&samples, &run.events);
    // Nothing that started after the failed deploy returned may come from the bad release.
    let late_bad = samples
        .iter()
        .filter(|s| s.start >= bad_return && s.ids.contains(&bad))
        .count();
    assert_eq!(
        late_bad, 0,
        "responses from {bad} after its rollback returned"
    );
    // Disk stays bounded by retention (keep = 5, plus the bad release during its grace period),
    // nothing is left staged, and `current` resolves.
    let names: Vec<String> = std::fs::read_dir(run.app.join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.len() <= 6, "{names:?}");
    assert!(!names.iter().any(|n| n.contains('.')), "{names:?}");
    assert!(run.app.join("current/public/index.php").is_file());
    (f, elapsed)
}

fn releases_json(run: &mut Run) -> serde_json::Value {
    let app = run.app.display().to_string();
    let out = run.relsync(&["releases", &app, "--json"]);
    run.events.pop();
    assert_ok(&out, "releases");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn realpath_root_needs_no_reload_or_reset() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(tools) = tools() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut run = Run::new(tmp.path());
    let stack = Stack::start(
        &tools,
        &tmp.path().join("srv"),
        &run.app,
        DocRoot::Realpath,
        FpmSettings {
            validate_timestamps: false,
            process_control_timeout: Some("10s"),
            ..FpmSettings::default()
        },
    );
    run.config("");
    assert_ok(&run.deploy("a000", true), "first deploy");
    run.config(&health(stack.port));
    let (f, elapsed) = load_run(&mut run, &stack, "a", cycles());
    report("$realpath_root", &f, elapsed, &run.steps);
    assert_clean("$realpath_root", &f, &stack);
    assert!(f.deploys >= cycles() && f.rollbacks >= 10, "{f:?}");
    assert!(!stack.log("fpm.log").contains("Cannot redeclare"));
}

#[test]
fn document_root_with_validate_timestamps_0_needs_the_opcache_reset() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(tools) = tools() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut run = Run::new(tmp.path());
    let stack = Stack::start(
        &tools,
        &tmp.path().join("srv"),
        &run.app,
        DocRoot::Document,
        FpmSettings {
            validate_timestamps: false,
            process_control_timeout: Some("10s"),
            ..FpmSettings::default()
        },
    );

    // Without the reset the swap alone leaves the old code in OPcache: under the same load and
    // checks, requests after a deploy returned are served by the release before it.
    run.config("");
    assert_ok(&run.deploy("n000", true), "deploy");
    let load = Load::start(stack.port);
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    for i in 1..=5 {
        assert_ok(&run.deploy(&format!("n{i:03}"), true), "deploy");
        std::thread::sleep(Duration::from_millis(100));
    }
    let samples = load.finish();
    let f = analyze(&samples, &run.events);
    report(
        "$document_root + validate_timestamps=0 without the reset",
        &f,
        started.elapsed(),
        &run.steps,
    );
    // Workers keep serving the first release they cached, and once retention removes it, its
    // paths (still in their realpath caches) give "No input file specified" (404).
    assert!(
        f.stale > 0 && f.mixed == 0,
        "the negative control did not show stale code: {f:?}"
    );

    // With the reset through FPM's socket.
    run.config(&format!(
        "fpm_sockets = [\"{}\"]\n{}",
        stack.sock.display(),
        health(stack.port)
    ));
    let out = run.deploy("b000", true);
    assert_ok(&out, "deploy with reset");
    // The reset ran inside this php-fpm: the worker that answered is a child of its master.
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let step = json["activation"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "opcache_reset")
        .cloned()
        .unwrap();
    assert_eq!(step["ok"], true, "{step}");
    let detail = step["detail"].as_str().unwrap();
    let worker: i32 = detail
        .split("reset by worker ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{detail}"));
    let stat = std::fs::read_to_string(format!("/proc/{worker}/stat")).unwrap();
    let ppid = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap();
    let master = std::fs::read_to_string(&stack.fpm_pid).unwrap();
    assert_eq!(ppid, master.trim(), "{detail}");
    assert!(
        detail.contains(&stack.sock.display().to_string()),
        "{detail}"
    );
    let mut s = TcpStream::connect(("127.0.0.1", stack.port)).unwrap();
    s.write_all(&get_request("/index.php", "app.test", false))
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let (r, _) = parse_response(&buf, true).unwrap().unwrap();
    assert_eq!(r.body, b"b000,b000,b000\n");
    let (f, elapsed) = load_run(&mut run, &stack, "b", cycles());
    report(
        "$document_root + validate_timestamps=0 + OPcache reset",
        &f,
        elapsed,
        &run.steps,
    );
    assert_clean("$document_root with the OPcache reset", &f, &stack);
    assert!(f.deploys >= cycles() && f.rollbacks >= 10, "{f:?}");
    assert!(
        std::fs::metadata(run.app.join(".relsync/php/opcache-reset.php")).is_ok(),
        "the reset script is under ROOT/.relsync"
    );
}

#[test]
fn document_root_with_a_php_fpm_reload() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(tools) = tools() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut run = Run::new(tmp.path());
    let stack = Stack::start(
        &tools,
        &tmp.path().join("srv"),
        &run.app,
        DocRoot::Document,
        FpmSettings {
            validate_timestamps: false,
            process_control_timeout: Some("10s"),
            ..FpmSettings::default()
        },
    );
    run.config("");
    assert_ok(&run.deploy("c000", true), "first deploy");
    run.config(&format!(
        "fpm_pid_file = \"{}\"\nfpm_config = \"{}\"\nfpm_sockets_unused = 0\n",
        stack.fpm_pid.display(),
        stack.fpm_conf.display()
    ));
    // A typo in the table is a config error (exit 2) that names the key, and changes nothing.
    let out = run.deploy("c-typo", true);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("fpm_sockets_unused"));
    assert_eq!(current(&run.app), "c000");
    run.config(&format!(
        "fpm_pid_file = \"{}\"\nfpm_config = \"{}\"\n{}",
        stack.fpm_pid.display(),
        stack.fpm_conf.display(),
        health(stack.port)
    ));
    let deploys = (cycles() / 5).max(10);
    let (f, elapsed) = load_run(&mut run, &stack, "c", deploys);
    report(
        "$document_root + validate_timestamps=0 + php-fpm reload",
        &f,
        elapsed,
        &run.steps,
    );
    assert_clean("$document_root with a php-fpm reload", &f, &stack);
    assert!(
        !run.stderr.contains("process_control_timeout"),
        "{}",
        run.stderr
    );
    assert!(
        stack.log("fpm.log").matches("reloading").count() >= deploys,
        "php-fpm was not reloaded: {}",
        stack.log("fpm.log")
    );
}

#[test]
fn a_reload_with_process_control_timeout_0_warns() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(tools) = tools() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut run = Run::new(tmp.path());
    let stack = Stack::start(
        &tools,
        &tmp.path().join("srv"),
        &run.app,
        DocRoot::Realpath,
        FpmSettings {
            validate_timestamps: true,
            process_control_timeout: None,
            ..FpmSettings::default()
        },
    );
    run.config(&format!(
        "fpm_pid_file = \"{}\"\nfpm_config = \"{}\"\n",
        stack.fpm_pid.display(),
        stack.fpm_conf.display()
    ));
    assert_ok(&run.deploy("d001", true), "deploy");
    assert!(
        run.stderr.contains("process_control_timeout is not set in")
            && run.stderr.contains("kills requests in flight"),
        "{}",
        run.stderr
    );
    std::fs::write(
        &stack.fpm_conf,
        std::fs::read_to_string(&stack.fpm_conf).unwrap().replace(
            "daemonize = no\n",
            "daemonize = no\nprocess_control_timeout = 0\n",
        ),
    )
    .unwrap();
    run.stderr.clear();
    assert_ok(&run.deploy("d002", true), "deploy");
    assert!(
        run.stderr.contains("process_control_timeout is 0 in"),
        "{}",
        run.stderr
    );
    assert_eq!(current(&run.app), "d002");
}

/// What `relsync deploy` says when php-fpm cannot do the reset, for each way it goes wrong, with
/// the stack configured to go wrong that way.
#[test]
fn opcache_reset_problems_say_what_to_fix() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(tools) = tools() else { return };
    let mut cases: Vec<(&str, FpmSettings, &str)> = vec![
        (
            "limit_extensions",
            FpmSettings {
                pool: "security.limit_extensions = .phtml\n",
                ..FpmSettings::default()
            },
            "security.limit_extensions",
        ),
        (
            "opcache disabled",
            FpmSettings {
                pool: "php_admin_value[opcache.enable] = 0\n",
                ..FpmSettings::default()
            },
            "OPcache is disabled in this php-fpm pool (opcache.enable=0)",
        ),
        (
            "restrict_api",
            FpmSettings {
                pool: "php_admin_value[opcache.restrict_api] = /nowhere\n",
                ..FpmSettings::default()
            },
            "opcache.restrict_api = \"/nowhere\" forbids the reset",
        ),
    ];
    if is_root() {
        // The pool runs as nobody, and the app root is made private to its owner below.
        cases.push((
            "unreadable",
            FpmSettings {
                user: Some("nobody"),
                ..FpmSettings::default()
            },
            "the pool's user must be able to read it",
        ));
    }
    for (name, settings, want) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let mut run = Run::new(tmp.path());
        let stack = Stack::start(
            &tools,
            &tmp.path().join("srv"),
            &run.app,
            DocRoot::Realpath,
            settings,
        );
        run.config("");
        assert_ok(&run.deploy("p001", true), "deploy");
        if name == "unreadable" {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&run.app, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        run.config(&format!(
            "fpm_sockets = [\"{}\"]\nopcache_timeout = \"5s\"\n",
            stack.sock.display()
        ));
        let out = run.deploy("p002", true);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(
            err.contains("activating release p002 failed at opcache_reset") && err.contains(want),
            "{name}: {err}"
        );
        assert_eq!(current(&run.app), "p001", "{name}");
        println!("php-activation reset problem {name}: {}", err.trim());
    }
}

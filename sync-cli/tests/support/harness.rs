//! Shared by the tests that run the real binaries on loopback: a temporary client home that runs
//! `relsync`, a `relsyncd` process with its own key and config (startable, killable with SIGKILL
//! and restartable on the same port), source trees, and checks of an app root on disk.
//!
//! `relsyncd` is found next to the test binary (`target/<profile>/relsyncd`), which
//! `cargo test --workspace` builds; with `cargo test -p sync-cli` alone, build it first
//! (`cargo build -p sync-server --bin relsyncd`).

// Each test binary includes this file and uses a different part of it.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use sync_core::edge::root::AppRoot;
use sync_core::manifest::{EntryKind, Hash};
use sync_core::release::ReleaseId;

/// How long anything that should happen "soon" may take on a loaded machine.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub fn relsyncd() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test>-<hash> → target/<profile>/relsyncd
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("relsyncd"))
        .unwrap();
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p sync-server --bin relsyncd` (cargo test --workspace builds it)",
        path.display()
    );
    path
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A temporary home for one test: client config, cache, source trees and app roots.
pub struct Env {
    tmp: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env {
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    /// `relsync ARGS`, set up to use this home's key, pins and cache.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_relsync"));
        c.args(args)
            .env("RELSYNC_CONFIG_DIR", self.path("client"))
            .env("RELSYNC_CACHE_DIR", self.path("cache"))
            .env_remove("RELSYNC_IDENTITY")
            .env_remove("RELSYNC_KNOWN_HOSTS");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "relsync {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// Runs a command that must fail with `code`; returns its stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(code), "relsync {args:?}: {stderr}");
        stderr
    }

    /// `relsync keygen` into `dir` as `name`; returns the fingerprint it printed.
    pub fn keygen(&self, dir: &Path, name: &str) -> String {
        let out = self.ok(&["keygen", "--dir", s(dir), "--name", name]);
        fingerprint_in(&out)
    }

    /// The client key in its default place (`relsync keygen` into the config dir); returns its
    /// fingerprint.
    pub fn client_key(&self) -> String {
        self.keygen(&self.path("client"), "id")
    }
}

pub fn fingerprint_in(text: &str) -> String {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint "))
        .unwrap_or_else(|| panic!("no fingerprint in {text}"));
    assert!(line.starts_with("SHA256:"), "{line}");
    line.to_owned()
}

/// How a test daemon is configured beyond its defaults.
#[derive(Default)]
pub struct DaemonOptions<'a> {
    /// Keys authorized for every app.
    pub authorized: Vec<&'a str>,
    /// Lines of the `[limits]` table, e.g. `message_timeout_secs = 1`.
    pub limits: &'a str,
    /// `keep` of every app (5 when unset).
    pub keep: Option<usize>,
    /// Exports for `relsync sync`: (name, directory, authorized key).
    pub exports: Vec<(&'a str, &'a Path, &'a str)>,
}

/// A relsyncd process serving apps `shop` and `blog` on a loopback port that stays the same
/// across restarts.
pub struct Daemon {
    child: Option<Child>,
    pub port: u16,
    pub fingerprint: String,
    /// The root of app `shop`.
    pub root: PathBuf,
    base: PathBuf,
    config: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts relsyncd with its own key, authorizing `authorized` for its apps.
    pub fn start(env: &Env, authorized: &str) -> Daemon {
        Daemon::start_with(
            env,
            &DaemonOptions {
                authorized: vec![authorized],
                ..DaemonOptions::default()
            },
        )
    }

    pub fn start_with(env: &Env, o: &DaemonOptions<'_>) -> Daemon {
        let dir = env.path("daemon");
        let fingerprint = env.keygen(&dir, "daemon");
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let base = env.path("apps");
        let keys = o
            .authorized
            .iter()
            .map(|k| format!("\"{k}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut text = format!(
            "listen = \"127.0.0.1:{port}\"\nkey = \"{}\"\ncert = \"{}\"\n\n[limits]\n{}\n",
            dir.join("daemon.key").display(),
            dir.join("daemon.crt").display(),
            o.limits,
        );
        for app in ["shop", "blog"] {
            text += &format!(
                "\n[apps.{app}]\nroot = \"{}\"\nkeep = {}\nauthorized_keys = [{keys}]\n",
                base.join(app).display(),
                o.keep.unwrap_or(5),
            );
        }
        for (name, path, key) in &o.exports {
            text += &format!(
                "\n[exports.{name}]\npath = \"{}\"\nauthorized_keys = [\"{key}\"]\n",
                path.display()
            );
        }
        let config = dir.join("relsyncd.toml");
        std::fs::write(&config, text).unwrap();
        let mut d = Daemon {
            child: None,
            port,
            fingerprint,
            root: base.join("shop"),
            base,
            config,
            log: Arc::new(Mutex::new(Vec::new())),
        };
        d.spawn();
        d
    }

    /// Starts the process and waits until it says it listens.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "relsyncd runs already");
        let mut child = Command::new(relsyncd())
            .arg("--config")
            .arg(&self.config)
            .env("RELSYNC_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Keep draining the log so the daemon never blocks on it, and keep it for assertions.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening") {
                    let _ = tx.send(Ok(()));
                }
                if std::env::var_os("RELSYNC_TEST_DAEMON_LOG").is_some() {
                    eprintln!("relsyncd: {line}");
                }
                log.lock().unwrap().push(line);
            }
            let _ = tx.send(Err(()));
        });
        self.child = Some(child);
        match rx.recv_timeout(PATIENCE) {
            Ok(Ok(())) => {}
            Ok(Err(())) => {
                let status = self.child.take().unwrap().wait().unwrap();
                panic!(
                    "relsyncd exited before listening ({status}):\n{}",
                    self.log.lock().unwrap().join("\n")
                )
            }
            Err(_) => panic!("relsyncd did not report listening in time"),
        }
    }

    /// SIGKILL, as a crash or the OOM killer would.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("relsyncd runs");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Kills the daemon (if it runs) and starts it again with the same config and port.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.kill();
        }
        self.spawn();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("relsyncd runs").id()
    }

    /// Panics unless the process is still running.
    pub fn assert_alive(&mut self) {
        let child = self.child.as_mut().expect("relsyncd was started");
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "relsyncd exited ({status}):\n{}",
                self.log.lock().unwrap().join("\n")
            );
        }
    }

    /// Number of log lines so far, to look at only what comes after.
    pub fn log_mark(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Log lines since `mark`.
    pub fn log_since(&self, mark: usize) -> Vec<String> {
        self.log.lock().unwrap()[mark..].to_vec()
    }

    /// Log lines since `mark`, once one of them contains `needle` or `patience` is over: the
    /// lines reach the test through a pipe and a reader thread, a little after the daemon
    /// wrote them.
    pub fn log_since_with(&self, mark: usize, needle: &str, patience: Duration) -> Vec<String> {
        let deadline = Instant::now() + patience;
        loop {
            let lines = self.log_since(mark);
            if lines.iter().any(|l| l.contains(needle)) || Instant::now() >= deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.host_port().parse().unwrap()
    }

    pub fn target(&self) -> String {
        self.target_of("shop")
    }

    pub fn target_of(&self, app: &str) -> String {
        format!("127.0.0.1:{}/{app}", self.port)
    }

    pub fn root_of(&self, app: &str) -> PathBuf {
        self.base.join(app)
    }

    pub fn current(&self) -> Option<String> {
        current_of(&self.root)
    }

    pub fn release_dirs(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root.join("releases"))
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Resident memory of the daemon now and at its peak, in KiB (`VmRSS`, `VmHWM`).
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/PID/status"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn current_of(root: &Path) -> Option<String> {
    let link = std::fs::read_link(root.join("current")).ok()?;
    Some(link.file_name()?.to_str()?.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Source trees

pub type Tree = Vec<(String, Vec<u8>)>;

/// Deterministic PHP-like text.
pub fn php(seed: u64, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 64);
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let mut line = 0u64;
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(
            format!("    $v{line} = f({}, '{:x}');\n", line * 7, x % 99_999).as_bytes(),
        );
        line += 1;
    }
    out.truncate(n);
    out
}

/// Incompressible bytes, so a payload is as large as its file.
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(0x2545_F491_4F6C_DD1D)
        | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

pub fn write_tree(dir: &Path, tree: &Tree) {
    let _ = std::fs::remove_dir_all(dir);
    for (p, c) in tree {
        let path = dir.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, c).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Checks of an app root

/// What an interrupted run can leave in an app root: staging and trash directories,
/// `current.tmp`, temporaries of records and objects.
pub fn leftovers(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    for n in names(&root.join("releases")) {
        if n.ends_with(".staging") || n.ends_with(".trash") {
            found.push(format!("releases/{n}"));
        }
    }
    if root.join("current.tmp").symlink_metadata().is_ok() {
        found.push("current.tmp".into());
    }
    for sub in ["releases", "objects"] {
        for n in names(&root.join(".relsync").join(sub)) {
            if n.starts_with(".tmp") {
                found.push(format!(".relsync/{sub}/{n}"));
            }
        }
    }
    found.sort();
    found
}

/// Complete objects (verified content) in the app's object store.
pub fn objects(root: &Path) -> usize {
    std::fs::read_dir(root.join(".relsync/objects"))
        .map(|rd| {
            rd.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| !e.file_name().to_string_lossy().starts_with('.'))
            })
            .count()
        })
        .unwrap_or(0)
}

/// Checks release `id` of the app at `root` against its own record: every file's blake3 equals
/// the manifest's, every directory and symlink is there, and nothing else is.
pub fn verify_release(root: &Path, id: &str) {
    let app = AppRoot::open(root).unwrap();
    let record = app
        .load_record(&ReleaseId::new(id).unwrap())
        .unwrap_or_else(|e| panic!("release {id} has no readable record: {e}"));
    let dir = root.join("releases").join(id);
    let mut expected = BTreeSet::new();
    for e in record.manifest.entries() {
        let path = dir.join(e.path.as_str());
        let meta = path
            .symlink_metadata()
            .unwrap_or_else(|err| panic!("{id}/{}: {err}", e.path));
        match &e.kind {
            EntryKind::File { size, hash, .. } => {
                assert!(meta.is_file(), "{id}/{} is not a regular file", e.path);
                let bytes = std::fs::read(&path).unwrap();
                assert_eq!(bytes.len() as u64, *size, "{id}/{}: size", e.path);
                assert!(
                    Hash::of(&bytes) == *hash,
                    "{id}/{}: content does not match the manifest",
                    e.path
                );
            }
            EntryKind::Dir { .. } => assert!(meta.is_dir(), "{id}/{} is not a directory", e.path),
            EntryKind::Symlink { .. } => {
                assert!(meta.is_symlink(), "{id}/{} is not a symlink", e.path)
            }
        }
        expected.insert(e.path.as_str().to_owned());
    }
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(&dir).unwrap().to_str().unwrap().to_owned();
            assert!(expected.contains(&rel), "{id}/{rel} is not in the manifest");
            if p.symlink_metadata().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
}

/// `current` names a complete release and that release verifies.
pub fn verify_current(root: &Path) -> String {
    let id = current_of(root).expect("current points to a release");
    assert!(
        !id.ends_with(".staging"),
        "current points to a staging directory"
    );
    verify_release(root, &id);
    id
}

/// Waits until nobody holds the app's deploy lock (a session ended), then lets it go.
pub fn wait_lock_free(root: &Path) {
    let app = AppRoot::open(root).unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        if app.lock(|_| {}).is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "the daemon still holds the lock");
        std::thread::sleep(Duration::from_millis(20));
    }
}

//! `relsync` against a real `relsyncd` on loopback: keys, pinning, pushes (full and delta),
//! dry runs and the remote commands, driven through both binaries as a user would.
//!
//! `relsyncd` is found next to this test's own binary (`target/<profile>/relsyncd`), which
//! `cargo test --workspace` builds; with `cargo test -p sync-cli` alone, build it first
//! (`cargo build -p sync-server --bin relsyncd`).

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn relsyncd() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/remote-<hash> → target/<profile>/relsyncd
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

/// A temporary home for one test: client config, cache, and the source tree.
struct Env {
    tmp: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_relsync"))
            .args(args)
            .env("RELSYNC_CONFIG_DIR", self.path("client"))
            .env("RELSYNC_CACHE_DIR", self.path("cache"))
            .env_remove("RELSYNC_IDENTITY")
            .env_remove("RELSYNC_KNOWN_HOSTS")
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "relsync {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// Runs a command that must fail with `code`; returns its stderr.
    fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(code), "relsync {args:?}: {stderr}");
        stderr
    }

    /// `relsync keygen` into `dir` as `name`; returns the fingerprint it printed.
    fn keygen(&self, dir: &Path, name: &str) -> String {
        let out = self.ok(&["keygen", "--dir", s(dir), "--name", name]);
        fingerprint_in(&out)
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn fingerprint_in(text: &str) -> String {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint "))
        .unwrap_or_else(|| panic!("no fingerprint in {text}"));
    assert!(line.starts_with("SHA256:"), "{line}");
    line.to_owned()
}

/// A relsyncd process serving app `shop` on a free loopback port.
struct Daemon {
    child: Child,
    port: u16,
    fingerprint: String,
    root: PathBuf,
}

impl Daemon {
    /// Starts relsyncd with its own key, authorizing `authorized` for app `shop`.
    fn start(env: &Env, authorized: &str) -> Daemon {
        let dir = env.path("daemon");
        let fingerprint = env.keygen(&dir, "daemon");
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let root = env.path("apps/shop");
        let config = dir.join("relsyncd.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\nkey = \"{}\"\ncert = \"{}\"\n\n[apps.shop]\nroot = \"{}\"\nkeep = 5\nauthorized_keys = [\"{authorized}\"]\n",
                dir.join("daemon.key").display(),
                dir.join("daemon.crt").display(),
                root.display()
            ),
        )
        .unwrap();
        let mut child = Command::new(relsyncd())
            .arg("--config")
            .arg(&config)
            .env("RELSYNC_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait for the daemon to say it listens; keep draining its log so it never blocks.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening") {
                    let _ = tx.send(Ok(()));
                }
                if std::env::var_os("RELSYNC_TEST_DAEMON_LOG").is_some() {
                    eprintln!("relsyncd: {line}");
                }
            }
            let _ = tx.send(Err(()));
        });
        let mut d = Daemon {
            child,
            port,
            fingerprint,
            root,
        };
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Ok(())) => d,
            Ok(Err(())) => {
                let status = d.child.wait().unwrap();
                panic!("relsyncd exited before listening ({status}); is it a real daemon yet?")
            }
            Err(_) => panic!("relsyncd did not report listening within 20 s"),
        }
    }

    fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn target(&self) -> String {
        format!("127.0.0.1:{}/shop", self.port)
    }

    fn current(&self) -> Option<String> {
        let link = std::fs::read_link(self.root.join("current")).ok()?;
        Some(link.file_name()?.to_str()?.to_owned())
    }

    fn release_dirs(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root.join("releases"))
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic PHP-like text.
fn php(seed: u64, n: usize) -> Vec<u8> {
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

type Tree = Vec<(String, Vec<u8>)>;

fn release_a() -> Tree {
    let mut t: Tree = (0..60)
        .map(|i| {
            (
                format!("src/Module{}/F{i}.php", i % 6),
                php(i, 2_000 + (i as usize) * 131),
            )
        })
        .collect();
    t.push(("vendor/lib/big.php".into(), php(900, 600_000)));
    t.push(("public/index.php".into(), php(901, 700)));
    t.push(("public/empty.txt".into(), Vec::new()));
    t
}

/// Release A with small edits to three files and one new file.
fn release_b() -> Tree {
    let mut t = release_a();
    for (p, c) in t.iter_mut() {
        if p.ends_with("/F7.php") || p.ends_with("/F31.php") || p == "vendor/lib/big.php" {
            let at = c.len() / 3;
            c.splice(at..at, b"    // changed in release b\n".iter().copied());
        }
    }
    t.push(("src/Module0/New.php".into(), php(902, 4_000)));
    t
}

fn write_tree(dir: &Path, tree: &Tree) {
    let _ = std::fs::remove_dir_all(dir);
    for (p, c) in tree {
        let path = dir.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, c).unwrap();
    }
}

/// The live release holds exactly `tree`'s files.
fn assert_live(d: &Daemon, tree: &Tree) {
    let live = d.root.join("current");
    for (p, c) in tree {
        let got = std::fs::read(live.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
        assert!(got == *c, "{p} differs in the live release");
    }
}

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn push_delta_push_releases_rollback_activate() {
    let env = Env::new();
    let client_fp = env.keygen(&env.path("client"), "id");
    let d = Daemon::start(&env, &client_fp);
    env.ok(&["trust", &d.host_port(), &d.fingerprint]);
    let src = env.path("src");
    let target = d.target();

    let a = release_a();
    write_tree(&src, &a);
    let first = env.json(&["push", s(&src), &target, "--release-id", "r1", "--json"]);
    assert_eq!(first["activated"], true, "{first}");
    assert_eq!(n(&first["files"]), 63);
    // Every non-empty content is new to the daemon.
    assert_eq!(n(&first["sent"]["full"]), n(&first["needed"]), "{first}");
    assert_eq!(n(&first["sent"]["zstd_ref"]), 0);
    assert_eq!(d.current().as_deref(), Some("r1"));
    assert_live(&d, &a);

    let b = release_b();
    write_tree(&src, &b);
    let second = env.json(&["push", s(&src), &target, "--release-id", "r2", "--json"]);
    assert_eq!(n(&second["needed"]), 4, "{second}");
    // The three edited files go as zstd deltas against what the cache says r1 holds.
    assert_eq!(n(&second["sent"]["zstd_ref"]), 3, "{second}");
    assert_eq!(n(&second["signatures"]), 0, "{second}");
    let (p1, p2) = (n(&first["payload_bytes"]), n(&second["payload_bytes"]));
    assert!(p2 * 20 < p1, "second push sent {p2} bytes, first {p1}");
    assert!(n(&second["staged"]["linked"]) >= 59, "{second}");
    assert_eq!(d.current().as_deref(), Some("r2"));
    assert_live(&d, &b);

    // A dry run asks and changes nothing.
    let mut c = b.clone();
    c.push(("src/Module1/Extra.php".into(), php(903, 1_000)));
    write_tree(&src, &c);
    let plan = env.json(&[
        "push",
        s(&src),
        &target,
        "--release-id",
        "r3",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(plan["dry_run"], true);
    assert_eq!(n(&plan["needed_files"]), 1, "{plan}");
    assert_eq!(plan["paths"][0]["path"], "src/Module1/Extra.php");
    assert_eq!(d.release_dirs(), ["r1", "r2"]);

    // Staged but not activated, then activated by command.
    let third = env.json(&[
        "push",
        s(&src),
        &target,
        "--release-id",
        "r3",
        "--no-activate",
        "--json",
    ]);
    assert_eq!(third["activated"], false);
    assert_eq!(d.current().as_deref(), Some("r2"));
    let list = env.json(&["releases", &target, "--json"]);
    let states: Vec<(&str, &str)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r["state"].as_str().unwrap()))
        .collect();
    assert!(states.contains(&("r2", "current")), "{list}");
    assert_eq!(states.len(), 3, "{list}");
    let table = env.ok(&["releases", &target]);
    assert!(table.starts_with("RELEASE"), "{table}");

    assert!(env
        .ok(&["activate", &target, "r3"])
        .contains("activated r3"));
    assert_eq!(d.current().as_deref(), Some("r3"));
    assert_live(&d, &c);
    let out = env.ok(&["rollback", &target]);
    assert!(out.contains("to r2"), "{out}");
    assert_eq!(d.current().as_deref(), Some("r2"));
    env.ok(&["rollback", &target, "--to", "r1"]);
    assert_eq!(d.current().as_deref(), Some("r1"));
    assert_live(&d, &a);
    env.ok(&["prune", &target, "--keep", "5"]);
    assert_eq!(d.release_dirs(), ["r1", "r2", "r3"]);

    // A failure on the daemon's side is a failure here: an unknown release.
    let err = env.fails(&["activate", &target, "nope"], 1);
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn unknown_and_changed_daemon_keys_are_refused() {
    let env = Env::new();
    let client_fp = env.keygen(&env.path("client"), "id");
    let d = Daemon::start(&env, &client_fp);
    let src = env.path("src");
    write_tree(&src, &release_a());
    let target = d.target();

    let err = env.fails(&["push", s(&src), &target], 1);
    let fix = format!("relsync trust {} {}", d.host_port(), d.fingerprint);
    assert!(err.contains(&fix), "{err}");
    let err = env.fails(&["releases", &target], 1);
    assert!(err.contains(&fix), "{err}");

    let other = env.keygen(&env.path("other"), "other");
    env.ok(&["trust", &d.host_port(), &other]);
    let err = env.fails(&["push", s(&src), &target], 1);
    assert!(err.contains("changed"), "{err}");
    assert!(d.release_dirs().is_empty());
    assert_eq!(d.current(), None);
}

#[test]
fn an_unauthorized_client_key_is_told_how_to_fix_it() {
    let env = Env::new();
    let client_fp = env.keygen(&env.path("client"), "id");
    let someone_else = env.keygen(&env.path("other"), "other");
    let d = Daemon::start(&env, &someone_else);
    env.ok(&["trust", &d.host_port(), &d.fingerprint]);
    let src = env.path("src");
    write_tree(&src, &release_a());
    let err = env.fails(&["push", s(&src), &d.target()], 1);
    assert!(
        err.contains(&format!("does not authorize key {client_fp}")),
        "{err}"
    );
    assert!(d.release_dirs().is_empty());
}

#[test]
fn configuration_mistakes_exit_with_2() {
    let env = Env::new();
    let src = env.path("src");
    write_tree(&src, &release_a());
    // No client key yet.
    let err = env.fails(&["push", s(&src), "127.0.0.1:9/shop"], 2);
    assert!(err.contains("relsync keygen"), "{err}");
    env.keygen(&env.path("client"), "id");
    for bad in ["127.0.0.1:0/shop", "./shop", "host/bad name", "::1/shop"] {
        env.fails(&["push", s(&src), bad], 2);
    }
    env.fails(&["trust", "host", "SHA256:tooshort"], 2);
    env.fails(
        &[
            "trust",
            "host:0",
            "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU",
        ],
        2,
    );
    // A local app root that looks like a target is refused, not guessed.
    std::fs::create_dir_all(env.path("www/app")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_relsync"))
        .args(["releases", "www/app"])
        .current_dir(env.path(""))
        .env("RELSYNC_CONFIG_DIR", env.path("client"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("./www/app"));
}

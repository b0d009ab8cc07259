//! `relsync` against a real `relsyncd` on loopback: keys, pinning, pushes (full and delta), syncs
//! into exports, dry runs and the remote commands, driven through both binaries as a user would.
//!
//! `relsyncd` is found next to this test's own binary (`target/<profile>/relsyncd`), which
//! `cargo test --workspace` builds; with `cargo test -p sync-cli` alone, build it first
//! (`cargo build -p sync-server --bin relsyncd`).

#[path = "support/harness.rs"]
mod harness;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use harness::{noise, php, s, write_tree, Daemon, DaemonOptions, Env, Tree};

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
    // With a bandwidth limit (high enough not to slow the test), the push is the same.
    let second = env.json(&[
        "push",
        s(&src),
        &target,
        "--release-id",
        "r2",
        "--json",
        "--bwlimit",
        "200M",
    ]);
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
fn a_large_file_goes_out_as_it_lies_and_its_change_by_rsync_delta() {
    let env = Env::new();
    let client_fp = env.keygen(&env.path("client"), "id");
    let d = Daemon::start(&env, &client_fp);
    env.ok(&["trust", &d.host_port(), &d.fingerprint]);
    let src = env.path("src");
    let target = d.target();

    // Over the client cache's 16 MiB: sent from where it lies (zstd raw blocks), and not cached.
    let mut a: Tree = vec![
        ("media/big.bin".into(), noise(7, (17 << 20) + 3)),
        ("index.php".into(), php(1, 500)),
    ];
    write_tree(&src, &a);
    let first = env.json(&["push", s(&src), &target, "--release-id", "r1", "--json"]);
    assert_eq!(n(&first["sent"]["full"]), 2, "{first}");
    assert!(n(&first["payload_bytes"]) > 17 << 20, "{first}");
    assert_live(&d, &a);

    // A few bytes changed in the middle: no cached basis, so the daemon's signature is asked
    // for and an rsync delta goes out.
    let mid = a[0].1.len() / 2;
    a[0].1[mid..mid + 16].copy_from_slice(b"changed in r2...");
    write_tree(&src, &a);
    let second = env.json(&["push", s(&src), &target, "--release-id", "r2", "--json"]);
    assert_eq!(n(&second["needed"]), 1, "{second}");
    assert_eq!(n(&second["signatures"]), 1, "{second}");
    assert_eq!(n(&second["sent"]["rsync"]), 1, "{second}");
    assert!(n(&second["payload_bytes"]) < 1 << 20, "{second}");
    assert_live(&d, &a);
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
    let err = env.fails(
        &["push", s(&src), "127.0.0.1:9/shop", "--bwlimit", "fast"],
        2,
    );
    assert!(err.contains("--bwlimit") && err.contains("500K"), "{err}");
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

fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let rel = e
                .path()
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                out.insert(format!("{rel}/"), Vec::new());
                walk(root, &e.path(), out);
            } else if t.is_symlink() {
                let target = std::fs::read_link(e.path()).unwrap();
                out.insert(format!("{rel} -> {}", target.display()), Vec::new());
            } else {
                out.insert(rel, std::fs::read(e.path()).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out
}

/// Just the files of a snapshot.
fn files(snap: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, Vec<u8>> {
    snap.iter()
        .filter(|(k, _)| !k.ends_with('/') && !k.contains(" -> "))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn tree_map(tree: &Tree) -> BTreeMap<String, Vec<u8>> {
    tree.iter().cloned().collect()
}

fn no_temporaries(dir: &Path) {
    let snap = snapshot(dir);
    let left: Vec<&String> = snap.keys().filter(|k| k.contains(".relsync")).collect();
    assert!(
        left.is_empty(),
        "left behind in {}: {left:?}",
        dir.display()
    );
}

/// With a trailing slash, SRC's contents go to the URL's directory itself.
fn contents_of(p: &Path) -> String {
    format!("{}/", p.display())
}

#[test]
fn sync_into_an_export_sends_only_changes_and_removes_only_with_delete() {
    let env = Env::new();
    let client_fp = env.keygen(&env.path("client"), "id");
    let export = env.path("exports/media");
    std::fs::create_dir_all(&export).unwrap();
    let d = Daemon::start_with(
        &env,
        &DaemonOptions {
            authorized: vec![&client_fp],
            exports: vec![("media", &export, &client_fp)],
            ..DaemonOptions::default()
        },
    );
    env.ok(&["trust", &d.host_port(), &d.fingerprint]);
    let url = format!("relsync://{}/media", d.host_port());
    let src = env.path("site");
    let src_arg = contents_of(&src);

    let a = release_a();
    write_tree(&src, &a);
    let first = env.json(&["sync", &src_arg, &url, "--json"]);
    assert_eq!(n(&first["applied"]["written_files"]), 63, "{first}");
    assert_eq!(n(&first["needed"]), 63, "{first}");
    assert_eq!(n(&first["sent"]["full"]), 63, "{first}");
    assert_eq!(files(&snapshot(&export)), tree_map(&a));
    no_temporaries(&export);

    // Edits go as deltas against the destination's files; a file only the destination has stays.
    std::fs::write(export.join("extra.txt"), b"only on the daemon").unwrap();
    let b = release_b();
    write_tree(&src, &b);
    let second = env.json(&["sync", &src_arg, &url, "--json"]);
    assert_eq!(n(&second["needed"]), 4, "{second}");
    assert_eq!(n(&second["sent"]["zstd_ref"]), 3, "{second}");
    assert_eq!(n(&second["applied"]["written_files"]), 4, "{second}");
    assert_eq!(n(&second["summary"]["unchanged_files"]), 60, "{second}");
    let (p1, p2) = (n(&first["payload_bytes"]), n(&second["payload_bytes"]));
    assert!(p2 * 20 < p1, "second sync sent {p2} bytes, first {p1}");
    let mut want = tree_map(&b);
    want.insert("extra.txt".into(), b"only on the daemon".to_vec());
    assert_eq!(files(&snapshot(&export)), want);

    // A dry run says what --delete would do and changes nothing.
    let mut c: Tree = b
        .iter()
        .filter(|(p, _)| p != "public/index.php")
        .map(|(p, content)| {
            let p = if p == "vendor/lib/big.php" {
                "vendor/moved.php".to_string()
            } else {
                p.clone()
            };
            (p, content.clone())
        })
        .collect();
    c.push(("public/new.txt".into(), b"new".to_vec()));
    write_tree(&src, &c);
    let before = snapshot(&export);
    let plan = env.json(&["sync", &src_arg, &url, "--delete", "-n", "--json"]);
    assert_eq!(plan["dry_run"], true, "{plan}");
    assert_eq!(n(&plan["summary"]["removed"]), 3, "{plan}");
    assert_eq!(n(&plan["needed_files"]), 1, "{plan}");
    let ops = plan["ops"].as_array().unwrap();
    assert!(
        ops.iter()
            .any(|op| op["op"] == "write" && op["path"] == "vendor/moved.php"),
        "{plan}"
    );
    let text = env.ok(&["sync", &src_arg, &url, "--delete", "-n"]);
    assert!(
        text.contains("[dry run]") && text.contains("deleting extra.txt"),
        "{text}"
    );
    assert_eq!(snapshot(&export), before, "a dry run changed the export");

    // The real thing: the moved file's content is reused although its old directory is removed
    // before it is written, so only the new file is sent.
    let third = env.json(&["sync", &src_arg, &url, "--delete", "--json"]);
    assert_eq!(n(&third["needed"]), 1, "{third}");
    assert_eq!(n(&third["applied"]["removed"]), 3, "{third}");
    assert_eq!(files(&snapshot(&export)), tree_map(&c));
    no_temporaries(&export);

    // Without changes, nothing is sent or written.
    let again = env.json(&["sync", &src_arg, &url, "--delete", "--json"]);
    assert_eq!(n(&again["needed"]), 0, "{again}");
    assert_eq!(n(&again["applied"]["written_files"]), 0, "{again}");
    let out = env.ok(&["sync", &src_arg, &url]);
    assert!(out.starts_with(&format!("synced {url}: 0 files")), "{out}");

    // Excluded paths are left alone on the daemon's side too, even with --delete.
    std::fs::write(export.join("server.log"), b"written there").unwrap();
    std::fs::write(src.join("local.log"), b"not shipped").unwrap();
    let kept = env.json(&[
        "sync",
        &src_arg,
        &url,
        "--delete",
        "--exclude",
        "*.log",
        "--json",
    ]);
    assert_eq!(n(&kept["applied"]["removed"]), 0, "{kept}");
    assert!(export.join("server.log").exists());
    assert!(!export.join("local.log").exists());
    let gone = env.json(&["sync", &src_arg, &url, "--delete", "--json"]);
    assert_eq!(n(&gone["applied"]["removed"]), 1, "{gone}");
    assert!(!export.join("server.log").exists());
    assert!(export.join("local.log").exists());
}

#[test]
fn sync_follows_the_trailing_slash_rule_below_a_subpath() {
    let env = Env::new();
    let client_fp = env.keygen(&env.path("client"), "id");
    let export = env.path("exports/media");
    std::fs::create_dir_all(&export).unwrap();
    let d = Daemon::start_with(
        &env,
        &DaemonOptions {
            authorized: vec![&client_fp],
            exports: vec![("media", &export, &client_fp)],
            ..DaemonOptions::default()
        },
    );
    env.ok(&["trust", &d.host_port(), &d.fingerprint]);
    let src = env.path("assets");
    let tree: Tree = vec![
        ("img/logo.svg".into(), b"<svg/>".to_vec()),
        ("app.css".into(), php(5, 3_000)),
    ];
    write_tree(&src, &tree);
    std::os::unix::fs::symlink("app.css", src.join("latest.css")).unwrap();

    // Without the slash the directory itself lands below the path, which is created.
    let url = format!("relsync://{}/media/deep/er", d.host_port());
    env.ok(&["sync", s(&src), &url]);
    let snap = snapshot(&export.join("deep/er/assets"));
    assert_eq!(files(&snap), tree_map(&tree));
    assert!(snap.contains_key("latest.css -> app.css"), "{snap:?}");
    // A dry run into a path that does not exist yet plans writing everything, creating nothing.
    let url = format!("relsync://{}/media/flat/", d.host_port());
    let plan = env.json(&["sync", &contents_of(&src), &url, "-n", "--json"]);
    assert_eq!(n(&plan["summary"]["written_files"]), 2, "{plan}");
    assert!(!export.join("flat").exists());
    // With the slash, the contents fill the path. What an interrupted sync left there goes.
    for stale in [".relsync-tmp-sync-1-0/objects", "img"] {
        std::fs::create_dir_all(export.join("flat").join(stale)).unwrap();
    }
    std::fs::write(export.join("flat/.relsync-tmp-sync-1-0/objects/x"), b"x").unwrap();
    std::fs::write(export.join("flat/img/.relsync-tmp-1-1"), b"half a file").unwrap();
    env.ok(&["sync", &contents_of(&src), &url]);
    assert_eq!(files(&snapshot(&export.join("flat"))), tree_map(&tree));
    let top: Vec<String> = std::fs::read_dir(&export)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(top, ["deep", "flat"]);
    no_temporaries(&export);
}

#[test]
fn sync_refuses_keys_exports_and_paths_it_must_and_writes_nothing() {
    let env = Env::new();
    let client_fp = env.keygen(&env.path("client"), "id");
    let other_fp = env.keygen(&env.path("other"), "other");
    let locked = env.path("exports/locked");
    let open = env.path("exports/open");
    let outside = env.path("outside");
    for dir in [&locked, &open, &outside] {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::os::unix::fs::symlink(&outside, open.join("out")).unwrap();
    let gone = env.path("exports/never-created");
    let d = Daemon::start_with(
        &env,
        &DaemonOptions {
            authorized: vec![&client_fp],
            exports: vec![
                ("locked", &locked, &other_fp),
                ("open", &open, &client_fp),
                ("gone", &gone, &client_fp),
            ],
            ..DaemonOptions::default()
        },
    );
    env.ok(&["trust", &d.host_port(), &d.fingerprint]);
    let src = env.path("site");
    write_tree(&src, &release_a());
    let src_arg = contents_of(&src);
    let url = |rest: &str| format!("relsync://{}/{rest}", d.host_port());

    let err = env.fails(&["sync", &src_arg, &url("locked")], 1);
    assert!(
        err.contains(&format!("key {client_fp} may not sync into export locked")),
        "{err}"
    );
    assert!(snapshot(&locked).is_empty());
    // Not even a dry run.
    env.fails(&["sync", &src_arg, &url("locked/sub"), "-n"], 1);
    assert!(snapshot(&locked).is_empty());

    let err = env.fails(&["sync", &src_arg, &url("nope")], 1);
    assert!(err.contains("has no export nope"), "{err}");
    let err = env.fails(&["sync", &src_arg, &url("gone")], 1);
    assert!(err.contains("does not exist"), "{err}");
    assert!(!gone.exists());

    for path in ["open/out", "open/out/deeper"] {
        let err = env.fails(&["sync", &src_arg, &url(path)], 1);
        assert!(err.contains("is a symlink"), "{path}: {err}");
    }
    assert!(
        snapshot(&outside).is_empty(),
        "a sync followed a symlink out"
    );
    assert_eq!(
        snapshot(&open).keys().collect::<Vec<_>>(),
        [&format!("out -> {}", outside.display())]
    );

    // Another sync holding the export's lock makes this one give up at once.
    let held = std::fs::File::open(&open).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&held), libc::LOCK_EX) },
        0
    );
    let err = env.fails(&["sync", &src_arg, &url("open/site")], 1);
    assert!(err.contains("export open is busy"), "{err}");
    assert!(!open.join("site").exists());
    drop(held);
    env.ok(&["sync", &src_arg, &url("open/site")]);
    assert_eq!(files(&snapshot(&open.join("site"))), tree_map(&release_a()));

    // Malformed destinations are usage errors.
    for bad in [
        "relsync://host",
        "relsync://host/.x",
        "relsync://host/a/../b",
    ] {
        env.fails(&["sync", &src_arg, bad], 2);
    }
}

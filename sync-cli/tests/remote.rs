//! `relsync` against a real `relsyncd` on loopback: keys, pinning, pushes (full and delta),
//! dry runs and the remote commands, driven through both binaries as a user would.
//!
//! `relsyncd` is found next to this test's own binary (`target/<profile>/relsyncd`), which
//! `cargo test --workspace` builds; with `cargo test -p sync-cli` alone, build it first
//! (`cargo build -p sync-server --bin relsyncd`).

#[path = "support/harness.rs"]
mod harness;

use std::process::Command;

use harness::{php, s, write_tree, Daemon, Env, Tree};

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

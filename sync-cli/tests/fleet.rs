//! `relsync push|releases|rollback --fleet` against an emulated fleet: real `relsyncd`s in network
//! namespaces behind shaped links (see `fleet/harness.rs`). Tests that need namespaces skip, with
//! a message, when not run as root or without iproute2; CI runs them as root.
//!
//! Like `remote.rs`, these use the `relsyncd` binary next to the test binary: `cargo test
//! --workspace` builds it; with `-p sync-cli` alone run `cargo build -p sync-server --bin relsyncd`.

#[macro_use]
#[path = "fleet/harness.rs"]
mod harness;
#[path = "support/harness.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use harness::{Fleet, Spec};
use serde_json::Value;
use support::{noise, php};

type Tree = Vec<(String, Vec<u8>)>;

fn release_a() -> Tree {
    let mut t: Tree = (0..40)
        .map(|i| {
            (
                format!("src/Module{}/F{i}.php", i % 4),
                php(i, 1_500 + (i as usize) * 97),
            )
        })
        .collect();
    t.push(("vendor/lib/big.php".into(), php(900, 300_000)));
    t.push(("public/index.php".into(), php(901, 700)));
    t
}

/// `base` with a line inserted into the files whose names end with one of `edits`, plus `new`.
fn edited(base: &Tree, edits: &[&str], new: &str, seed: u64) -> Tree {
    let mut t = base.clone();
    for (p, c) in t.iter_mut() {
        if edits.iter().any(|e| p.ends_with(e)) {
            let at = c.len() / 3;
            c.splice(at..at, format!("    // edit {seed}\n").bytes());
        }
    }
    t.push((new.into(), php(seed, 3_000)));
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

/// The node's live release holds exactly `tree`'s files.
fn assert_live(node: &harness::Node, tree: &Tree) {
    let live = node.root.join("current");
    for (p, c) in tree {
        let got = std::fs::read(live.join(p)).unwrap_or_else(|e| panic!("{}: {p}: {e}", node.name));
        assert!(got == *c, "{}: {p} differs in the live release", node.name);
    }
}

fn stdout_json(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {text}\nstderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn ok_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout_json(out)
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Per host of a push report: (name, current release, result).
fn hosts(report: &Value) -> Vec<(String, String, String)> {
    report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["host"].as_str().unwrap().to_owned(),
                h["current"].as_str().unwrap_or("?").to_owned(),
                h["result"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The command of every connection `node`'s daemon opened so far, in order, as its log says.
fn openings(node: &harness::Node) -> Vec<String> {
    node.log_lines(" opening")
        .iter()
        .filter_map(|l| {
            let v = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("command="))?;
            Some(v.trim_matches('"').to_owned())
        })
        .collect()
}

/// The commands of the connections `node`'s daemon opened after its first `since`, once there
/// are `want` of them (the log comes through a pipe, a little after the fact) or after 5 s.
fn opened_since(node: &harness::Node, since: usize, want: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let all = openings(node);
        if all.len() >= since + want || Instant::now() > deadline {
            return all[since.min(all.len())..].to_vec();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn push(f: &Fleet, src: &Path, release: &str, extra: &[&str]) -> Output {
    let file = f.fleet_file();
    let mut args = vec![
        "push",
        src.to_str().unwrap(),
        "--fleet",
        file.to_str().unwrap(),
        "--release-id",
        release,
        "--json",
    ];
    args.extend_from_slice(extra);
    f.relsync(&args)
}

/// A full push to every node, a node moved to another release, then a patch push that brings
/// every node (whatever it ran) to the new release, sending little; then the fleet-wide
/// `releases` and `rollback`, which returns each node to its own previous release.
#[test]
fn full_and_patch_pushes_reach_every_node_whatever_it_ran_before() {
    require_netns!();
    let started = Instant::now();
    let mut spec = Spec::new(6);
    spec.waves = "1,50%,100%".into();
    spec.keep = 2;
    let f = Fleet::start(&spec);
    let src = f.path("src");
    let fleet_file = f.fleet_file();
    let file = fleet_file.to_str().unwrap();

    let a = release_a();
    write_tree(&src, &a);
    let first = ok_json(&push(&f, &src, "r1", &[]));
    assert_eq!(first["success"], true, "{first}");
    for (name, current, result) in hosts(&first) {
        assert_eq!(
            (current.as_str(), result.as_str()),
            ("r1", "activated"),
            "{name}"
        );
    }
    let waves: Vec<usize> = first["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_array().unwrap().len())
        .collect();
    assert_eq!(waves, [1, 2, 3], "{first}");
    for node in &f.nodes {
        assert_eq!(node.current().as_deref(), Some("r1"), "{}", node.name);
        assert_live(node, &a);
    }
    // Every distinct content was encoded once and its payload reused for the other hosts.
    let files = a.len() as u64;
    assert!(n(&first["encoded_payloads"]) <= files, "{first}");
    assert!(
        n(&first["shared_payloads"]) >= 5 * n(&first["encoded_payloads"]),
        "{first}"
    );
    let full_per_host = n(&first["hosts"][0]["sent_bytes"]);

    // n5 moves to its own release r1b.
    let b = edited(&a, &["/F3.php", "/F9.php"], "src/Module1/Hotfix.php", 7);
    write_tree(&src, &b);
    let hotfix = f.relsync(&[
        "push",
        src.to_str().unwrap(),
        "--fleet",
        file,
        "--hosts",
        "n5",
        "--release-id",
        "r1b",
    ]);
    let table = String::from_utf8_lossy(&hotfix.stdout);
    assert!(hotfix.status.success(), "{table}");
    eprintln!("{table}");
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0][..3], ["HOST", "WAVE", "RELEASE"], "{table}");
    let last = *rows[1].last().unwrap();
    assert_eq!(
        (rows[1][0], rows[1][2], last),
        ("n5", "r1b", "activated"),
        "{table}"
    );
    let summary = table.lines().nth(2).unwrap_or_default();
    assert!(
        summary.starts_with("release r1b activated on 1 of 1 hosts"),
        "{table}"
    );
    assert_eq!(f.nodes[5].current().as_deref(), Some("r1b"));
    assert_eq!(f.nodes[4].current().as_deref(), Some("r1"));

    // The patch: every node ends on r2, n5 included, each sending a small share of the first.
    let c = edited(
        &a,
        &["/F5.php", "/F17.php", "big.php"],
        "src/Module2/New.php",
        11,
    );
    write_tree(&src, &c);
    let opened: Vec<usize> = f.nodes.iter().map(|n| openings(n).len()).collect();
    let second = ok_json(&push(&f, &src, "r2", &[]));
    // Per host: the push, which says what the host ran, and the activation, which also prunes.
    for (node, since) in f.nodes.iter().zip(opened) {
        assert_eq!(
            opened_since(node, since, 2),
            ["push", "activate"],
            "{}",
            node.name
        );
    }
    for (name, current, result) in hosts(&second) {
        assert_eq!(
            (current.as_str(), result.as_str()),
            ("r2", "activated"),
            "{name}"
        );
    }
    for (i, node) in f.nodes.iter().enumerate() {
        assert_eq!(node.current().as_deref(), Some("r2"), "{}", node.name);
        assert_live(node, &c);
        let sent = n(&second["hosts"][i]["sent_bytes"]);
        assert!(
            sent * 10 < full_per_host,
            "{}: sent {sent} of {full_per_host}",
            node.name
        );
        let previous = if i == 5 { "r1b" } else { "r1" };
        assert_eq!(second["hosts"][i]["previous"], previous, "{second}");
    }
    assert!(n(&second["shared_payloads"]) > 0, "{second}");
    // Activated hosts are pruned to `keep` (2): only n5 had a third release.
    assert_eq!(
        second["hosts"][5]["pruned"],
        serde_json::json!(["r1"]),
        "{second}"
    );
    assert_eq!(
        second["hosts"][0]["pruned"],
        serde_json::json!([]),
        "{second}"
    );
    assert_eq!(f.nodes[5].releases(), ["r1b", "r2"]);

    // A dry run asks every host and changes nothing.
    let mut d = c.clone();
    d.push(("src/Module3/Extra.php".into(), php(99, 900)));
    write_tree(&src, &d);
    let plan = ok_json(&push(&f, &src, "r3", &["--dry-run"]));
    for h in plan["hosts"].as_array().unwrap() {
        assert_eq!(n(&h["needed_files"]), 1, "{plan}");
    }
    assert!(f.nodes.iter().all(|n| n.releases().len() == 2));

    let list = ok_json(&f.relsync(&["releases", "--fleet", file, "--json"]));
    for h in list.as_array().unwrap() {
        assert_eq!(h["current"], "r2", "{list}");
    }
    let table = f.relsync(&["releases", "--fleet", file, "--group", "all"]);
    assert!(table.status.success());
    assert!(String::from_utf8_lossy(&table.stdout).contains("n5"));

    // Each node goes back to what it ran before r2.
    let back = f.relsync(&["rollback", "--fleet", file]);
    assert!(
        back.status.success(),
        "{}",
        String::from_utf8_lossy(&back.stderr)
    );
    for node in &f.nodes {
        let want = if node.name == "n5" { "r1b" } else { "r1" };
        assert_eq!(node.current().as_deref(), Some(want), "{}", node.name);
    }

    // Staging alone succeeds when every host staged; nothing moves.
    let staged = ok_json(&push(&f, &src, "r3", &["--no-activate"]));
    assert_eq!(staged["activate"], false);
    for (i, (name, current, result)) in hosts(&staged).into_iter().enumerate() {
        let want = if name == "n5" { "r1b" } else { "r1" };
        assert_eq!(
            (current.as_str(), result.as_str()),
            (want, "staged"),
            "{name}"
        );
        assert_eq!(f.nodes[i].current().as_deref(), Some(want), "{name}");
        assert!(f.nodes[i].releases().contains(&"r3".to_string()), "{name}");
    }
    eprintln!(
        "fleet full/patch test took {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// A node whose daemon dies while the release is on its way fails alone: the others stage and
/// activate, and the report and the exit code name it.
#[test]
fn a_node_killed_mid_push_is_reported_and_the_others_activate() {
    require_netns!();
    let mut spec = Spec::new(6);
    spec.max_failed = 1;
    // n5's link is slow, so the push is surely still sending to it when it is killed.
    spec.node_rates = vec![(5, "4mbit".into())];
    let mut f = Fleet::start(&spec);
    let src = f.path("src");
    let tree: Tree = (0..8)
        .map(|i| (format!("assets/blob{i}.bin"), noise(i + 1, 400_000)))
        .chain([("index.php".to_string(), php(1, 2_000))])
        .collect();
    write_tree(&src, &tree);
    let file = f.fleet_file();
    let child = f
        .command(&[
            "push",
            src.to_str().unwrap(),
            "--fleet",
            file.to_str().unwrap(),
            "--release-id",
            "r1",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while f.nodes[5].objects() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(f.nodes[5].objects() > 0, "n5 never received anything");
    f.kill(5);
    assert!(!f.nodes[5].is_running());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("n5 (stage failed)"), "{stderr}");
    let report = stdout_json(&out);
    assert_eq!(report["success"], false);
    let rows = hosts(&report);
    for (name, current, result) in &rows[..5] {
        assert_eq!(
            (current.as_str(), result.as_str()),
            ("r1", "activated"),
            "{name}"
        );
    }
    assert_eq!(rows[5].0, "n5");
    assert_eq!(rows[5].2, "stage failed", "{report}");
    assert_eq!(report["hosts"][5]["stage"]["ok"], false);
    for node in &f.nodes[..5] {
        assert_eq!(node.current().as_deref(), Some("r1"), "{}", node.name);
        assert_live(node, &tree);
    }
    assert_eq!(f.nodes[5].current(), None);
}

/// A host whose daemon refuses the push (its app is locked by another process: `Busy`) fails
/// staging alone; the push said nothing of what it runs, so the source asks it afterwards, and
/// only it: the report still knows its live release.
#[test]
fn a_host_that_refuses_the_push_is_asked_what_it_runs_afterwards() {
    require_netns!();
    let mut spec = Spec::new(3);
    spec.max_failed = 1;
    let f = Fleet::start(&spec);
    let src = f.path("src");
    let a = release_a();
    write_tree(&src, &a);
    ok_json(&push(&f, &src, "r1", &[]));
    let lock = f.nodes[2].root.join(".relsync/lock");
    // `--no-fork`: the process killed below is the one holding the lock.
    let mut holder = std::process::Command::new("flock")
        .args(["-x", "--no-fork"])
        .arg(&lock)
        .args(["sleep", "60"])
        .spawn()
        .unwrap();
    let held = || {
        let free = std::process::Command::new("flock")
            .arg("-n")
            .arg(&lock)
            .arg("true")
            .status()
            .unwrap();
        !free.success()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !held() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(held(), "the test could not take n2's lock");
    let b = edited(&a, &["/F2.php"], "src/Module0/New.php", 3);
    write_tree(&src, &b);
    let opened: Vec<usize> = f.nodes.iter().map(|n| openings(n).len()).collect();
    let out = push(&f, &src, "r2", &[]);
    let _ = holder.kill();
    let _ = holder.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let report = stdout_json(&out);
    let rows = hosts(&report);
    let want = [
        ("n0", "r2", "activated"),
        ("n1", "r2", "activated"),
        ("n2", "r1", "stage failed"),
    ];
    for ((name, current, result), (wn, wc, wr)) in rows.iter().zip(want) {
        assert_eq!(
            (name.as_str(), current.as_str(), result.as_str()),
            (wn, wc, wr),
            "{report}"
        );
    }
    assert_eq!(report["hosts"][2]["current_known"], true, "{report}");
    let busy = report["hosts"][2]["stage"]["error"].as_str().unwrap();
    assert!(busy.contains("busy"), "{busy}");
    let calls = [
        &["push", "activate"][..],
        &["push", "activate"],
        &["push", "releases"],
    ];
    for ((node, since), want) in f.nodes.iter().zip(opened).zip(calls) {
        assert_eq!(opened_since(node, since, want.len()), want, "{}", node.name);
    }
}

/// Waves 1, 2, 3 hosts; one host of the second wave fails its health check. Its daemon puts the
/// previous release back, the other host of that wave is rolled back by the client, the third
/// wave is never activated (its hosts keep r2 staged only), and the report says who runs what.
#[test]
fn a_failing_wave_rolls_back_and_later_waves_never_activate() {
    require_netns!();
    let mut spec = Spec::new(6);
    spec.waves = "1,3,100%".into();
    let mut f = Fleet::start(&spec);
    let src = f.path("src");
    let a = release_a();
    write_tree(&src, &a);
    ok_json(&push(&f, &src, "r1", &[]));
    assert!(f.nodes.iter().all(|n| n.current().as_deref() == Some("r1")));

    // n2 (in wave 2) now checks a port nothing listens on.
    f.kill(2);
    f.start_daemon(
        2,
        Some("health_check = [{ url = \"http://127.0.0.1:1/health\", timeout = \"1s\", interval = \"200ms\" }]"),
    );
    let b = edited(&a, &["/F2.php"], "src/Module0/New.php", 3);
    write_tree(&src, &b);
    let out = push(&f, &src, "r2", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let report = stdout_json(&out);
    assert_eq!(report["ending"]["kind"], "wave_failed", "{report}");
    assert_eq!(report["ending"]["wave"], 2, "{report}");
    let rows = hosts(&report);
    let want = [
        ("n0", "r2", "activated"),
        ("n1", "r1", "rolled back"),
        ("n2", "r1", "activation failed"),
        ("n3", "r1", "staged, not activated (wave 2 failed)"),
        ("n4", "r1", "staged, not activated (wave 2 failed)"),
        ("n5", "r1", "staged, not activated (wave 2 failed)"),
    ];
    for ((name, current, result), (wn, wc, wr)) in rows.iter().zip(want) {
        assert_eq!(
            (name.as_str(), current.as_str(), result.as_str()),
            (wn, wc, wr),
            "{report}"
        );
    }
    let health = report["hosts"][2]["activate"]["error"].as_str().unwrap();
    assert!(health.contains("health"), "{health}");
    for (i, h) in report["hosts"].as_array().unwrap().iter().enumerate() {
        assert_eq!(h["previous"], "r1", "n{i}: {report}");
    }
    // The activations that went through pruned (nothing, within the default `keep`), n1's
    // before the client rolled it back; a failed or skipped activation prunes nothing.
    assert_eq!(report["hosts"][0]["pruned"], serde_json::json!([]));
    assert_eq!(report["hosts"][1]["pruned"], serde_json::json!([]));
    for i in 2..6 {
        assert!(report["hosts"][i]["pruned"].is_null(), "n{i}: {report}");
    }
    assert_eq!(report["hosts"][1]["rollback"]["ok"], true);
    assert!(report["hosts"][3]["activate"].is_null());
    for (i, node) in f.nodes.iter().enumerate() {
        let want = if i == 0 { "r2" } else { "r1" };
        assert_eq!(node.current().as_deref(), Some(want), "{}", node.name);
        // Staging happened everywhere before any activation.
        assert!(node.releases().contains(&"r2".to_string()), "{}", node.name);
    }
    assert_live(&f.nodes[0], &b);
    assert_live(&f.nodes[3], &a);
}

/// A relayed push (n0 feeds n1 and n2, n1 feeds n3) in waves of 1 and the rest, where n3 fails
/// its health check: n0 stays on r2, n1 and n2 go back to what they ran before, which only
/// their relays reported (n2 ran a hotfix of its own), and n3's daemon puts its r1 back. No host
/// was asked what it runs: each opened connections for its push, activation and rollback only.
#[test]
fn a_failing_relayed_wave_returns_each_host_to_what_its_relay_said_it_ran() {
    require_netns!();
    let mut spec = Spec::new(4);
    spec.relay = true;
    spec.waves = "1,100%".into();
    let mut f = Fleet::start(&spec);
    let src = f.path("src");
    let a = release_a();
    write_tree(&src, &a);
    let relay = ["--relay", "--source-fanout", "1", "--fanout", "2"];
    ok_json(&push(&f, &src, "r1", &relay));
    let hotfix = edited(&a, &["/F3.php"], "src/Module1/Hotfix.php", 7);
    write_tree(&src, &hotfix);
    ok_json(&push(&f, &src, "r1b", &["--hosts", "n2"]));
    assert_eq!(f.nodes[2].current().as_deref(), Some("r1b"));
    f.kill(3);
    f.start_daemon(
        3,
        Some("health_check = [{ url = \"http://127.0.0.1:1/health\", timeout = \"1s\", interval = \"200ms\" }]"),
    );
    let b = edited(&a, &["/F2.php"], "src/Module0/New.php", 3);
    write_tree(&src, &b);
    let opened: Vec<usize> = f.nodes.iter().map(|n| openings(n).len()).collect();
    let out = push(&f, &src, "r2", &relay);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let report = stdout_json(&out);
    assert_eq!(report["ending"]["kind"], "wave_failed", "{report}");
    let h = &report["hosts"];
    let want = [
        (None, "r1", "r2", "activated"),
        (Some("n0"), "r1", "r1", "rolled back"),
        (Some("n0"), "r1b", "r1b", "rolled back"),
        (Some("n1"), "r1", "r1", "activation failed"),
    ];
    for (i, (relayed_by, previous, current, result)) in want.into_iter().enumerate() {
        assert_eq!(h[i]["relayed_by"].as_str(), relayed_by, "n{i}: {report}");
        assert_eq!(h[i]["previous"], previous, "n{i}: {report}");
        assert_eq!(h[i]["current"], current, "n{i}: {report}");
        assert_eq!(h[i]["result"], result, "n{i}: {report}");
        assert_eq!(f.nodes[i].current().as_deref(), Some(current), "n{i}");
    }
    assert_live(&f.nodes[0], &b);
    assert_live(&f.nodes[2], &hotfix);
    let calls = [
        &["push", "activate"][..],
        &["push", "activate", "rollback"],
        &["push", "activate", "rollback"],
        &["push", "activate"],
    ];
    for ((node, since), want) in f.nodes.iter().zip(opened).zip(calls) {
        assert_eq!(opened_since(node, since, want.len()), want, "{}", node.name);
    }
}

/// Incompressible blobs and a little PHP: what a node's share of a push is, in bytes on the
/// wire, does not depend on how well the corpus compresses.
fn blobs(count: u64, size: usize) -> Tree {
    (0..count)
        .map(|i| (format!("assets/blob{i}.bin"), noise(i + 1, size)))
        .chain([("index.php".to_string(), php(1, 2_000))])
        .collect()
}

/// A fleet of `nodes` whose daemons take relayed pushes, with `tree` written as the source.
fn relay_fleet(nodes: usize, tree: &Tree) -> (Fleet, PathBuf) {
    let mut spec = Spec::new(nodes);
    spec.relay = true;
    let f = Fleet::start(&spec);
    let src = f.path("src");
    write_tree(&src, tree);
    (f, src)
}

/// 6 nodes, fan-out 2, depth 2: the source pushes to n0 and n1 only, n0 relays to n2 and n3, n1
/// to n4 and n5. Every node stages, verifies and activates the release; the source's link
/// carries about two nodes' shares rather than six.
#[test]
fn a_relayed_push_reaches_every_node_and_the_source_sends_k_shares() {
    require_netns!();
    let tree = blobs(6, 400_000);
    let (f, src) = relay_fleet(6, &tree);
    let before = f.source_tx_bytes();
    let report = ok_json(&push(&f, &src, "r1", &["--relay", "--fanout", "2"]));
    let source_bytes = f.source_tx_bytes() - before;
    assert_eq!(report["success"], true, "{report}");
    for (name, current, result) in hosts(&report) {
        assert_eq!(
            (current.as_str(), result.as_str()),
            ("r1", "activated"),
            "{name}: {report}"
        );
    }
    for node in &f.nodes {
        assert_eq!(node.current().as_deref(), Some("r1"), "{}", node.name);
        assert_live(node, &tree);
    }
    let h = &report["hosts"];
    let relays = [None, None, Some("n0"), Some("n0"), Some("n1"), Some("n1")];
    for (i, want) in relays.iter().enumerate() {
        assert_eq!(h[i]["relayed_by"].as_str(), *want, "n{i}: {report}");
        if want.is_some() {
            assert_eq!(
                n(&h[i]["sent_bytes"]),
                0,
                "n{i} was fed by the source: {report}"
            );
        }
    }
    // One node's share: what the source sent to a root.
    let share = n(&h[0]["sent_bytes"]).max(n(&h[1]["sent_bytes"]));
    let corpus: u64 = tree.iter().map(|(_, c)| c.len() as u64).sum();
    assert!(
        share >= corpus * 9 / 10,
        "share {share} of {corpus}: {report}"
    );
    eprintln!("source sent {source_bytes} bytes on the wire; one share is {share}");
    assert!(
        source_bytes * 10 <= 2 * 12 * share,
        "source sent {source_bytes} bytes, over 1.2 x 2 shares of {share}"
    );
}

/// `--source-fanout 1`: the source sends to n0 alone, n0 relays to n1 and n2, n1 to n3 and n4.
/// The source's link carries one node's share (and the control traffic to every host).
#[test]
fn with_one_root_the_source_sends_one_share() {
    require_netns!();
    let tree = blobs(6, 400_000);
    let (f, src) = relay_fleet(5, &tree);
    let before = f.source_tx_bytes();
    let args = ["--relay", "--source-fanout", "1", "--fanout", "2"];
    let report = ok_json(&push(&f, &src, "r1", &args));
    let source_bytes = f.source_tx_bytes() - before;
    assert_eq!(report["success"], true, "{report}");
    let h = &report["hosts"];
    for (i, want) in [None, Some("n0"), Some("n0"), Some("n1"), Some("n1")]
        .iter()
        .enumerate()
    {
        assert_eq!(h[i]["relayed_by"].as_str(), *want, "n{i}: {report}");
    }
    for node in &f.nodes {
        assert_eq!(node.current().as_deref(), Some("r1"), "{}", node.name);
        assert_live(node, &tree);
    }
    let share = n(&h[0]["sent_bytes"]);
    eprintln!("source sent {source_bytes} bytes on the wire; one share is {share}");
    assert!(
        source_bytes * 10 <= 12 * share,
        "source sent {source_bytes} bytes, over 1.2 shares of {share}"
    );
}

/// Fan-out 1 makes a chain n0 → n1 → n2 → n3: every relay but the first is admitted by a
/// ticket naming the relay above it, and passes its own part of the plan on.
#[test]
fn a_chain_of_relays_passes_the_release_down_every_level() {
    require_netns!();
    let tree = blobs(3, 200_000);
    let (f, src) = relay_fleet(4, &tree);
    let report = ok_json(&push(&f, &src, "r1", &["--relay", "--fanout", "1"]));
    assert_eq!(report["success"], true, "{report}");
    let h = &report["hosts"];
    for (i, want) in [None, Some("n0"), Some("n1"), Some("n2")]
        .iter()
        .enumerate()
    {
        assert_eq!(h[i]["relayed_by"].as_str(), *want, "n{i}: {report}");
    }
    assert_eq!(n(&report["sent_bytes"]), n(&h[0]["sent_bytes"]), "{report}");
    for node in &f.nodes {
        assert_eq!(node.current().as_deref(), Some("r1"), "{}", node.name);
        assert_live(node, &tree);
    }
}

/// The numbers a relay logged with `event` for its last relayed push, by field name.
fn relay_log(node: &harness::Node, event: &str) -> std::collections::HashMap<String, u64> {
    let lines = node.log_lines(event);
    let last = lines
        .last()
        .unwrap_or_else(|| panic!("{} logged no {event:?}", node.name));
    last.split_whitespace()
        .filter_map(|w| {
            let (k, v) = w.split_once('=')?;
            Some((k.to_owned(), v.trim_end_matches(',').parse().ok()?))
        })
        .collect()
}

/// A relay sends on the payloads it received as they came (nothing encoded again), and for a
/// patch it sends its child zstd-reference deltas against the release they both hold, as the
/// source did, instead of asking for rsync signatures.
#[test]
fn a_relay_forwards_what_it_received_and_deltas_against_the_release_it_holds() {
    require_netns!();
    let a = release_a();
    let (f, src) = relay_fleet(3, &a);
    let report = ok_json(&push(&f, &src, "r1", &["--relay", "--fanout", "1"]));
    assert_eq!(report["success"], true, "{report}");
    let b = edited(&a, &["F3.php", "F17.php", "big.php"], "src/New.php", 7);
    write_tree(&src, &b);
    let report = ok_json(&push(&f, &src, "r2", &["--relay", "--fanout", "1"]));
    assert_eq!(report["success"], true, "{report}");
    for node in &f.nodes {
        assert_eq!(node.current().as_deref(), Some("r2"), "{}", node.name);
        assert_live(node, &b);
    }
    for relay in &f.nodes[..2] {
        let memo = relay_log(relay, "payloads for the children");
        assert_eq!(memo.get("encoded"), Some(&0), "{}: {memo:?}", relay.name);
        assert!(memo["as_received"] >= 4, "{}: {memo:?}", relay.name);
        let sent = relay_log(relay, "relayed the release");
        assert_eq!(sent.get("rsync"), Some(&0), "{}: {sent:?}", relay.name);
        assert!(sent["zstd_ref"] > 0, "{}: {sent:?}", relay.name);
        // Three small edits and one new file: far less than the files themselves.
        assert!(sent["bytes"] < 20_000, "{}: {sent:?}", relay.name);
    }
}

/// A relay killed while the source still sends it the release, and while it already forwards
/// what it has to its children (pipelined: they hold content before the relay has built its own
/// release). The relay is reported as failed; the hosts below it are pushed to directly by the
/// source, which sends them only what they still miss; every other node activates.
#[test]
fn a_relay_killed_mid_push_fails_alone_and_its_subtree_still_completes() {
    require_netns!();
    let mut spec = Spec::new(6);
    spec.relay = true;
    spec.max_failed = 1;
    // n0 relays to n2 and n3; its slow link keeps the source sending to it when it is killed.
    spec.node_rates = vec![(0, "8mbit".into())];
    let mut f = Fleet::start(&spec);
    let src = f.path("src");
    let tree = blobs(8, 400_000);
    write_tree(&src, &tree);
    let file = f.fleet_file();
    let child = f
        .command(&[
            "push",
            src.to_str().unwrap(),
            "--fleet",
            file.to_str().unwrap(),
            "--release-id",
            "r1",
            "--relay",
            "--fanout",
            "2",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let forwarded = || f.nodes[2].objects() > 0 && f.nodes[3].objects() > 0;
    while !forwarded() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(forwarded(), "n0 never forwarded anything to n2 and n3");
    assert_eq!(
        f.nodes[0].releases(),
        Vec::<String>::new(),
        "n0 built its release before its children got anything: not pipelined"
    );
    f.kill(0);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("n0 (stage failed)"), "{stderr}");
    let report = stdout_json(&out);
    let rows = hosts(&report);
    assert_eq!(rows[0].0, "n0");
    assert_eq!(rows[0].2, "stage failed", "{report}");
    for (name, current, result) in &rows[1..] {
        assert_eq!(
            (current.as_str(), result.as_str()),
            ("r1", "activated"),
            "{name}: {report}"
        );
    }
    let h = &report["hosts"];
    let share = n(&h[1]["sent_bytes"]);
    for i in [2, 3] {
        // Re-parented to the source, which resumed what n0 had begun.
        assert!(h[i]["relayed_by"].is_null(), "n{i}: {report}");
        let sent = n(&h[i]["sent_bytes"]);
        assert!(
            sent > 0 && sent < share,
            "n{i}: {sent} of {share}: {report}"
        );
    }
    for i in [4, 5] {
        assert_eq!(h[i]["relayed_by"], "n1", "n{i}: {report}");
    }
    for node in &f.nodes[1..] {
        assert_eq!(node.current().as_deref(), Some("r1"), "{}", node.name);
        assert_live(node, &tree);
    }
    assert_eq!(f.nodes[0].current(), None);
}

/// Mistakes in the fleet file or the selection are usage errors (exit 2) naming what is wrong,
/// reported before anything is scanned or sent. Needs no namespaces.
#[test]
fn fleet_usage_errors_exit_with_2() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_relsync"))
            .args(args)
            .env("RELSYNC_CONFIG_DIR", tmp.path().join("client"))
            .env("RELSYNC_CACHE_DIR", tmp.path().join("cache"))
            .output()
            .unwrap()
    };
    let fp = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU";
    let good = format!(
        "[hosts.web1]\naddress = \"198.18.0.10\"\nkey = \"{fp}\"\n[groups.web]\nhosts = [\"web1\"]\napp = \"shop\"\n"
    );
    let file = tmp.path().join("fleet.toml");
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let (f, s) = (file.to_str().unwrap(), src.to_str().unwrap());
    let table: Vec<(String, Vec<&str>, &str)> = vec![
        (
            good.replace("198.18.0.10", "198.18.0.10:0"),
            vec!["push", s, "--fleet", f],
            "`hosts.web1.address`",
        ),
        (
            good.clone(),
            vec!["push", s, "--fleet", f, "--group", "db"],
            "no group \"db\"",
        ),
        (
            good.clone(),
            vec!["push", s, "--fleet", f, "--hosts", "web9"],
            "no host \"web9\"",
        ),
        (
            good.clone(),
            vec!["push", s, "--fleet", f, "--waves", "0"],
            "0 hosts",
        ),
        (
            good.clone(),
            vec!["push", s, "--fleet", f, "--max-failed", "x"],
            "failure threshold",
        ),
        (
            good.clone(),
            vec!["push", s, "--fleet", f, "--fanout", "0"],
            "--fanout",
        ),
        (
            good.clone(),
            vec!["push", s, "--fleet", f, "--relay", "--source-fanout", "0"],
            "--source-fanout must be at least 1",
        ),
        (
            good.clone(),
            vec!["push", s, "--fleet", f, "web1/shop"],
            "cannot be used",
        ),
        (good.clone(), vec!["push", s, "--waves", "1"], "--fleet"),
        (
            good.clone(),
            vec!["releases", "--fleet", f, "--group", "x"],
            "no group",
        ),
        (
            good.clone(),
            vec!["rollback", "--fleet", f, "--hosts", "nope"],
            "no host",
        ),
        (good.clone(), vec!["releases"], "<ROOT>"),
    ];
    for (text, args, want) in table {
        std::fs::write(&file, text).unwrap();
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}

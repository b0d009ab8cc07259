//! `relsync bench` on a tiny corpus: every phase is reported with its counts, the chart is
//! written, and nothing is left behind, locally and against a real relsyncd. Times are never
//! checked.

#[path = "support/harness.rs"]
mod harness;

use std::path::Path;

use harness::{s, Daemon, Env};

const LOCAL_PHASES: &[&str] = &[
    "scan (walk + stat)",
    "scan + hash",
    "hash (blake3)",
    "delta zstd-ref encode",
    "delta zstd-ref apply",
    "delta rsync signature",
    "delta rsync encode",
    "delta rsync apply",
    "compress (zstd)",
    "plan",
    "stage directories",
    "stage files",
    "sync (syncfs)",
    "verify",
    "record + complete",
    "activate (swap)",
    "end to end: deploy",
];

/// Phases of a push to a daemon, after the client-side ones of [`LOCAL_PHASES`] up to
/// "compress (zstd)": the client's steps, then what the daemon timed.
const REMOTE_PHASES: &[&str] = &[
    "client: scan + hash",
    "client: connect",
    "client: hello",
    "client: manifest + need",
    "client: transfer",
    "client: wait for staged",
    "client: activate",
    "daemon: need",
    "daemon: receive",
    "daemon: plan",
    "daemon: stage directories",
    "daemon: stage files",
    "daemon: sync (syncfs)",
    "daemon: verify",
    "daemon: record + complete",
    "daemon: relsyncd process",
    "end to end: push",
];

/// Phases whose file or byte count is meaningless and reported as 0.
const NO_FILES: &[&str] = &[
    "sync (syncfs)",
    "record + complete",
    "activate (swap)",
    "client: connect",
    "client: hello",
    "client: wait for staged",
    "client: activate",
    "daemon: plan",
    "daemon: stage directories",
    "daemon: sync (syncfs)",
    "daemon: record + complete",
];
const NO_BYTES: &[&str] = &[
    "scan (walk + stat)",
    "plan",
    "stage directories",
    "verify",
    "record + complete",
    "activate (swap)",
    "client: connect",
    "client: hello",
    "client: wait for staged",
    "client: activate",
    "daemon: need",
    "daemon: plan",
    "daemon: stage directories",
    "daemon: stage files",
    "daemon: sync (syncfs)",
    "daemon: verify",
    "daemon: record + complete",
    "daemon: relsyncd process",
];

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `relsync bench ARGS --files 200 --size 2MB --json` with `TMPDIR=tmp`; must succeed.
fn bench_json(env: &Env, tmp: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["bench", "--files", "200", "--size", "2MB", "--json"];
    all.extend_from_slice(args);
    let out = env.command(&all).env("TMPDIR", tmp).output().unwrap();
    assert!(
        out.status.success(),
        "relsync {all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Pushes a one-file site to `target`, so that its app holds a release and is in use.
fn put_in_use(env: &Env, target: &str) {
    let site = env.path("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("index.php"), "<?php echo 1;\n").unwrap();
    env.ok(&["push", s(&site), target, "--release-id", "live"]);
}

fn check_phases(report: &serde_json::Value, want: &[&str], runs: u64) {
    let phases = report["phases"].as_array().expect("phases");
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, want, "{report:#}");
    for p in phases {
        let name = p["name"].as_str().unwrap();
        assert_eq!(p["runs"], runs, "{name}");
        assert_eq!(p["samples_s"].as_array().unwrap().len() as u64, runs);
        let (files, bytes) = (p["files"].as_u64().unwrap(), p["bytes"].as_u64().unwrap());
        if NO_FILES.contains(&name) {
            assert_eq!(files, 0, "{name}");
        } else {
            assert!(files > 0, "{name}: {p}");
        }
        if NO_BYTES.contains(&name) {
            assert_eq!(bytes, 0, "{name}");
        } else {
            assert!(bytes > 0, "{name}: {p}");
        }
        let (min, med, max) = (
            p["min_s"].as_f64().unwrap(),
            p["median_s"].as_f64().unwrap(),
            p["max_s"].as_f64().unwrap(),
        );
        assert!(min <= med && med <= max, "{name}: {min} {med} {max}");
        // Steps timed from the session's states, and the daemon's phases, have no CPU or
        // memory figure of their own.
        let wall_only = (name.starts_with("client: ") || name.starts_with("daemon: "))
            && !name.ends_with("relsyncd process");
        assert_eq!(p["wall_only"], wall_only, "{name}");
        if wall_only {
            assert!(
                p["peak_rss_mib"].is_null() && p["cpu_s"].is_null(),
                "{name}"
            );
        } else {
            assert!(p["peak_rss_mib"].as_f64().unwrap() > 0.0, "{name}");
        }
        assert!(p["state"].as_str().is_some_and(|s| !s.is_empty()));
    }
}

#[test]
fn local_bench_reports_every_phase_writes_a_chart_and_cleans_up() {
    let env = Env::new();
    let tmp = env.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let chart = env.path("out.svg");
    let out = env
        .command(&[
            "bench",
            "--files",
            "200",
            "--size",
            "2MB",
            "--runs",
            "2",
            "--json",
            "--chart",
            s(&chart),
        ])
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "relsync bench failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["runs"], 2);
    assert_eq!(report["target"], "local target");
    // The notes say where the node was and on which file system: what its phases measure.
    let notes = report["notes"].to_string();
    let node_in = format!("node: a temporary app root in {}", tmp.display());
    assert!(notes.contains(&node_in), "{notes}");
    assert!(!notes.contains("file system unknown"), "{notes}");
    check_phases(&report, LOCAL_PHASES, 2);
    // A just-generated corpus is too fresh for the hash cache; bench waits until it is warm.
    assert_eq!(report["phases"][0]["state"], "hash cache warm");
    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(svg.contains("<svg") && svg.contains("</svg>"), "{svg}");
    assert!(svg.contains("end to end: deploy"));
    let deploy = &report["phases"][LOCAL_PHASES.len() - 1];
    assert!(deploy["out_bytes"].as_u64().unwrap() > 0, "{deploy}");
    assert_eq!(entries(&tmp), Vec::<String>::new(), "left in TMPDIR");

    // --keep leaves the corpus and the node, holding A and B.
    let out = env
        .command(&[
            "bench", "--files", "200", "--size", "2MB", "--runs", "1", "--keep",
        ])
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("end to end: deploy"), "{text}");
    let kept = entries(&tmp);
    assert_eq!(kept.len(), 1, "{kept:?}");
    let work = tmp.join(&kept[0]);
    assert_eq!(entries(&work.join("node/releases")), ["bench-a", "bench-b"]);
    assert!(work.join("corpus/a").is_dir() && work.join("corpus/b").is_dir());
}

#[test]
fn bad_arguments_are_usage_errors() {
    let env = Env::new();
    for args in [
        &["bench", "--change", "150%"][..],
        &["bench", "--runs", "0"],
        &["bench", "--size", "lots"],
        &["bench", "--corpus", "/nonexistent/corpus"],
        &["bench", "--target", "no-app-here"],
        &["bench", "--target", "loopback:0"],
        &["bench", "--target", "loopback:many"],
        &["bench", "--relay"],
        &["bench", "--files", "300", "--size", "1000"],
    ] {
        let stderr = env.fails(args, 2);
        assert!(!stderr.is_empty(), "{args:?}");
    }
}

#[test]
fn bench_against_a_daemon_pushes_and_leaves_the_app_empty() {
    let env = Env::new();
    let client = env.client_key();
    let d = Daemon::start(&env, &client);
    env.ok(&["trust", &d.host_port(), &d.fingerprint]);
    let tmp = env.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let report = bench_json(&env, &tmp, &["--target", &d.target(), "--runs", "2"]);
    let mut want: Vec<&str> = LOCAL_PHASES[..9].to_vec();
    want.extend(REMOTE_PHASES);
    check_phases(&report, &want, 2);
    let push = &report["phases"][want.len() - 1];
    assert!(push["out_bytes"].as_u64().unwrap() > 0, "{push}");
    // The app is left as it was found: no release, no `current`.
    assert_eq!(d.release_dirs(), Vec::<String>::new());
    assert_eq!(d.current(), None);
    assert_eq!(entries(&tmp), Vec::<String>::new(), "left in TMPDIR");

    // An app that holds a release is in use: bench refuses to touch it.
    put_in_use(&env, &d.target());
    let stderr = env.fails(&["bench", "--target", &d.target(), "--runs", "1"], 2);
    assert!(stderr.contains("set aside for benchmarking"), "{stderr}");
}

#[test]
fn bench_against_a_fleet_pushes_to_every_host_and_leaves_the_apps_empty() {
    let env = Env::new();
    let client = env.client_key();
    let d = Daemon::start(&env, &client);
    // One daemon, two apps: the fleet's two "hosts".
    let fleet = env.path("fleet.toml");
    std::fs::write(
        &fleet,
        format!(
            "[hosts.n1]\naddress = \"{}\"\nkey = \"{}\"\n\n\
             [groups.one]\nhosts = [\"n1\"]\napp = \"shop\"\nwaves = \"100%\"\n\n\
             [groups.two]\nhosts = [\"n1\"]\napp = \"blog\"\nwaves = \"100%\"\n",
            d.host_port(),
            d.fingerprint
        ),
    )
    .unwrap();
    let tmp = env.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let report = bench_json(&env, &tmp, &["--fleet", s(&fleet), "--runs", "2"]);
    let phases = report["phases"].as_array().unwrap();
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
    for want in [
        "client: scan + hash",
        "fleet: every host staged",
        "fleet: activate in waves",
        "fleet: stage, fastest host",
        "fleet: stage, slowest host",
        "daemons (slowest): receive",
        "daemons (slowest): stage files",
        "daemons (slowest): verify",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let end = phases.last().unwrap();
    assert_eq!(end["name"], "end to end: fleet push");
    assert_eq!(end["runs"], 2);
    // Both apps were sent B's changed content: twice what one needs, and more than nothing.
    assert!(end["out_bytes"].as_u64().unwrap() > 0, "{end}");
    let staged = phases
        .iter()
        .find(|p| p["name"] == "fleet: every host staged")
        .unwrap();
    assert_eq!(staged["bytes"], end["out_bytes"], "{staged}");
    assert!(
        report["target"].as_str().unwrap().contains("2 hosts"),
        "{report}"
    );
    for app in ["shop", "blog"] {
        let root = d.root_of(app);
        assert_eq!(harness::current_of(&root), None, "{app}");
        assert_eq!(
            entries(&root.join("releases")),
            Vec::<String>::new(),
            "{app}"
        );
    }
    assert_eq!(entries(&tmp), Vec::<String>::new(), "left in TMPDIR");

    // An app that holds a release is in use: bench refuses to touch it.
    env.ok(&["trust", &d.host_port(), &d.fingerprint]);
    put_in_use(&env, &d.target_of("blog"));
    let stderr = env.fails(&["bench", "--fleet", s(&fleet), "--runs", "1"], 2);
    assert!(stderr.contains("set aside for benchmarking"), "{stderr}");
}

#[test]
fn bench_on_loopback_daemons_needs_no_set_up_and_leaves_nothing() {
    let env = Env::new();
    let tmp = env.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let cases: [(&str, &[&str], &str); 3] = [
        ("loopback", &[], "end to end: push"),
        ("loopback:2", &[], "end to end: fleet push"),
        // A chain: the source sends to one daemon, which relays to the next.
        (
            "loopback:3",
            &["--relay", "--fanout", "1"],
            "end to end: fleet push",
        ),
    ];
    for (target, extra, last) in cases {
        // No key, no known_hosts, no daemon: bench makes and removes its own.
        let mut args = vec![
            "bench", "--target", target, "--files", "200", "--size", "2MB", "--runs", "1", "--json",
        ];
        args.extend_from_slice(extra);
        let out = env
            .command(&args)
            .env("TMPDIR", &tmp)
            .env("RELSYNC_CONFIG_DIR", env.path("no-config-here"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{target}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let phases = report["phases"].as_array().unwrap();
        assert_eq!(phases.last().unwrap()["name"], last, "{target}");
        assert!(
            phases
                .iter()
                .any(|p| p["name"].as_str().is_some_and(|n| n.starts_with("daemon"))),
            "{target}: no daemon phase in {report}"
        );
        let notes = report["notes"].to_string();
        assert!(notes.contains("in this process"), "{target}: {notes}");
        assert!(notes.contains("back to back"), "{target}: {notes}");
        assert_eq!(
            entries(&tmp),
            Vec::<String>::new(),
            "{target}: left in TMPDIR"
        );
        assert!(!env.path("no-config-here").exists(), "{target}");
    }
}

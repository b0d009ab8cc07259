//! The comparison suite's plumbing on a tiny corpus: `benches/suite.sh` with SCALE=tiny and one
//! run per tool goes through every script's machine-readable mode and the report renderer, so
//! neither rots between full runs. Nothing is asserted about time, only that each scenario left
//! a well-formed summary with positive medians and that the report and charts were written.
//!
//! Uses the debug binaries next to this test (`cargo test --workspace` builds them), and needs
//! root (network namespaces, dropping the page cache) plus hyperfine, jq, rsync and iproute2.

use std::path::{Path, PathBuf};
use std::process::Command;

use relsync_benches::suite;

/// `target/<profile>`, where cargo puts the workspace's binaries.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/suite-<hash> → target/<profile>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn tiny_suite_writes_every_scenario_and_the_report() {
    if !is_root() {
        eprintln!("skipped: benches/suite.sh needs root (network namespaces, drop_caches)");
        return;
    }
    let bins = bin_dir();
    for b in ["relsync", "relsyncd", "relsync-testdata", "quic-baseline"] {
        assert!(
            bins.join(b).is_file(),
            "{} is missing: run `cargo build -p sync-cli -p sync-server -p relsync-testdata -p relsync-benches --bins` (cargo test --workspace builds it)",
            bins.join(b).display()
        );
    }
    let out = tempfile::tempdir().unwrap();
    let disk = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("suite.sh");
    let status = Command::new("bash")
        .arg(&script)
        .env("SCALE", "tiny")
        .env("RUNS", "1")
        .env("FLEET_RUNS", "1")
        .env("FLEET_NODES", "2")
        .env("OUT", out.path())
        .env("DISK", disk.path())
        .env("BIN_DIR", &bins)
        .env("REPORT_BIN", env!("CARGO_BIN_EXE_suite-report"))
        .status()
        .expect("running bash benches/suite.sh");
    assert!(status.success(), "benches/suite.sh failed: {status}");

    let raw = out.path().join("raw");
    let expected = [
        ("local-tree", None),
        ("local-big", None),
        ("push-patch", None),
        ("push-bulk", None),
        ("small-net", None),
        ("small-local", None),
        ("fleet-patch-2", Some(2)),
        ("fleet-initial-2", Some(2)),
    ];
    let summary = std::fs::read_to_string(out.path().join("summary.md")).unwrap();
    for (key, nodes) in expected {
        let file = raw.join(format!("{key}.summary.json"));
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let s = suite::parse(key, &text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.scenario, key);
        assert_eq!(s.nodes, nodes, "{key}");
        assert!(s.tools.len() >= 2, "{key}: {:?}", s.tools);
        for t in &s.tools {
            assert!(t.median_s > 0.0, "{key}/{}: median {}", t.name, t.median_s);
            assert_eq!(t.runs, 1, "{key}/{}", t.name);
        }
        assert!(
            summary.contains(&format!("| {key} |")),
            "{key} missing from summary.md:\n{summary}"
        );
    }
    // Network scenarios count their bytes; the small-file sync from disk is cold.
    for key in ["push-patch", "small-net", "fleet-patch-2"] {
        let s = suite::parse(
            key,
            &std::fs::read_to_string(raw.join(format!("{key}.summary.json"))).unwrap(),
        )
        .unwrap();
        assert!(
            s.tools.iter().all(|t| t.wire_bytes.is_some_and(|b| b > 0)),
            "{key}: {:?}",
            s.tools
        );
    }
    let small = std::fs::read_to_string(raw.join("small-local.summary.json")).unwrap();
    assert!(suite::parse("small-local", &small).unwrap().cold);

    let phases = std::fs::read_to_string(raw.join("phases.json")).unwrap();
    assert!(!suite::parse_phases("phases.json", &phases)
        .unwrap()
        .phases
        .is_empty());
    for svg in ["fleet-time.svg", "phases.svg"] {
        let text = std::fs::read_to_string(out.path().join(svg)).unwrap();
        assert!(
            text.starts_with("<svg"),
            "{svg}: {}",
            &text[..text.len().min(80)]
        );
        assert!(text.trim_end().ends_with("</svg>"), "{svg}");
    }
    assert!(summary.contains("fleet-time.svg") && summary.contains("phases.svg"));
    assert!(out.path().join("machine.md").is_file());
    // Everything the suite created on disk is gone.
    let left: Vec<_> = std::fs::read_dir(disk.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind in DISK: {left:?}");
}

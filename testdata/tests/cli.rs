//! The `relsync-testdata` binary as scripts use it (benches/*.sh): a release pair and its
//! summary, the same bytes for the same seed, and a refusal to overwrite.

use std::path::Path;
use std::process::Command;

fn generate(out: &Path, seed: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_relsync-testdata"))
        .args(["--seed", seed, "--files", "150", "--bytes", "600K"])
        .arg(out)
        .output()
        .unwrap()
}

/// Every file under `dir` with its content, in path order.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_binary_writes_a_pair_and_a_summary_the_same_for_the_same_seed() {
    let t = tempfile::tempdir().unwrap();
    let (one, two, other) = (t.path().join("1"), t.path().join("2"), t.path().join("3"));
    for (dir, seed) in [(&one, "7"), (&two, "7"), (&other, "8")] {
        let out = generate(dir, seed);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(one.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["seed"], 7, "{summary}");
    assert!(tree(&one.join("a")).len() >= 150);
    assert!(!tree(&one.join("b")).is_empty());
    assert_eq!(tree(&one.join("a")), tree(&two.join("a")));
    assert_eq!(tree(&one.join("b")), tree(&two.join("b")));
    assert_ne!(tree(&one.join("a")), tree(&other.join("a")));

    // An existing pair is never overwritten.
    let again = generate(&one, "9");
    assert!(!again.status.success());
    assert!(!again.stderr.is_empty());
}

//! Architecture checks that run with `cargo test`: the pure modules of sync-core do no I/O.

use std::path::{Path, PathBuf};

/// Modules that must stay pure: data in, data out.
const PURE: &[&str] = &[
    "path.rs",
    "manifest.rs",
    "release.rs",
    "layout.rs",
    "plan.rs",
    "retention.rs",
    "delta.rs",
    "delta",
    "wire.rs",
    "proto.rs",
    "proto",
    "relay.rs",
    "activation.rs",
    "activation",
];

/// What betrays I/O, a clock or a process in library code.
const FORBIDDEN: &[&str] = &[
    "std::fs",
    "std::net",
    "std::process",
    "std::env",
    "SystemTime::now",
    "Instant::now",
    "File::open",
    "File::create",
    "cap_std",
    "rustix",
    "libc::",
    "memmap2",
    "quinn",
    "tokio",
];

fn rust_files(p: &Path, out: &mut Vec<PathBuf>) {
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            rust_files(&e.unwrap().path(), out);
        }
    } else if p.extension().is_some_and(|e| e == "rs") {
        out.push(p.to_owned());
    }
}

/// Source text outside `#[cfg(test)]` modules (tests may use the file system freely).
fn non_test_code(text: &str) -> &str {
    match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    }
}

#[test]
fn pure_modules_do_no_io() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    for m in PURE {
        rust_files(&src.join(m), &mut files);
    }
    assert!(files.len() >= 7, "pure modules not found: {files:?}");
    let mut violations = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in non_test_code(&text).lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for bad in FORBIDDEN {
                if code.contains(bad) {
                    violations.push(format!("{}:{}: {bad}", f.display(), n + 1));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "I/O in pure modules:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_catches_io() {
    let sample = "use std::fs::File;\nfn f() { let _ = std::time::SystemTime::now(); }\n";
    let hits: Vec<&&str> = FORBIDDEN.iter().filter(|b| sample.contains(**b)).collect();
    assert_eq!(hits, [&"std::fs", &"SystemTime::now"]);
}

//! The `relsync` binary as a user runs it: exit codes, output, and what it leaves on disk.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/fixtures")
        .join(name)
}

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
            .env("RELSYNC_CACHE_DIR", self.path("cache"))
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
        serde_json::from_str(&self.ok(args)).unwrap()
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every path under `root` with its type and content, to compare trees before and after.
fn snapshot(root: &Path) -> Vec<(String, String)> {
    let mut v = Vec::new();
    if !root.exists() {
        return v;
    }
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let t = e.file_type().unwrap();
            let what = if t.is_symlink() {
                format!("-> {}", std::fs::read_link(&p).unwrap().display())
            } else if t.is_dir() {
                stack.push(p.clone());
                "dir".into()
            } else {
                format!("{:?}", std::fs::read(&p).unwrap())
            };
            v.push((rel, what));
        }
    }
    v.sort();
    v
}

fn current(root: &Path) -> PathBuf {
    std::fs::read_link(root.join("current")).unwrap()
}

#[test]
fn deploy_releases_rollback_activate() {
    let env = Env::new();
    let root = env.path("app");
    let v1 = fixture("php-app-v1");
    let v2 = fixture("php-app-v2");
    let r1 = env.json(&["deploy", s(&v1), s(&root), "--release-id", "one", "--json"]);
    assert_eq!(r1["release"], "one");
    assert_eq!(r1["activated"], true);
    assert_eq!(r1["summary"]["linked_files"], 0);
    let r2 = env.json(&["deploy", s(&v2), s(&root), "--release-id", "two", "--json"]);
    assert_eq!(r2["previous"], "one");
    assert!(r2["summary"]["linked_files"].as_u64().unwrap() > 0);
    assert_eq!(r2["summary"]["moved_files"], 1, "{r2}");
    assert_eq!(current(&root), Path::new("releases/two"));

    let list = env.json(&["releases", s(&root), "--json"]);
    let states: Vec<(&str, &str)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [("one", "rollback"), ("two", "current")]);
    let table = env.ok(&["releases", s(&root)]);
    assert!(table.starts_with("RELEASE"), "{table}");

    assert!(env.ok(&["rollback", s(&root)]).contains("to one"));
    assert_eq!(current(&root), Path::new("releases/one"));
    env.ok(&["activate", s(&root), "two"]);
    assert_eq!(current(&root), Path::new("releases/two"));
    let journal = std::fs::read_to_string(root.join(".relsync/journal.jsonl")).unwrap();
    let events: Vec<String> = journal
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["event"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(events, ["deploy", "deploy", "rollback", "activate"]);
}

#[test]
fn checksum_hashes_every_file_where_the_cache_would_answer() {
    let env = Env::new();
    let root = env.path("app");
    let v1 = fixture("php-app-v1");
    let deploy = |id: &str, extra: &[&str]| {
        let mut args = vec!["deploy", s(&v1), s(&root), "--release-id", id, "--json"];
        args.extend_from_slice(extra);
        env.json(&args)["scan"].clone()
    };
    let first = deploy("one", &[]);
    // Empty files need neither hashing nor the cache.
    let files = first["hashed_files"].as_u64().unwrap() + first["cached_files"].as_u64().unwrap();
    assert!(
        files > 0 && files < first["files"].as_u64().unwrap(),
        "{first}"
    );
    // A fixture checked out moments ago is inside the hash cache's racy window: wait it out.
    let mut warm = deploy("two", &[]);
    if warm["cached_files"] != files {
        std::thread::sleep(std::time::Duration::from_millis(2_100));
        deploy("three", &[]);
        warm = deploy("four", &[]);
    }
    assert_eq!(warm["hashed_files"], 0, "{warm}");
    assert_eq!(warm["cached_files"], files, "{warm}");
    for flag in ["--checksum", "-c"] {
        let full = deploy(&format!("full{}", flag.len()), &[flag]);
        assert_eq!(full["hashed_files"], files, "{flag}: {full}");
        assert_eq!(full["cached_files"], 0, "{flag}: {full}");
    }
    assert_eq!(deploy("after", &[])["cached_files"], files);
}

#[test]
fn dry_run_changes_nothing() {
    let env = Env::new();
    let root = env.path("app");
    let v1 = fixture("php-app-v1");
    let v2 = fixture("php-app-v2");
    // On a root that does not exist yet: nothing is created.
    let out = env.ok(&["deploy", s(&v1), s(&root), "--dry-run"]);
    assert!(out.contains("dry run"), "{out}");
    assert!(!root.exists());
    env.ok(&["deploy", s(&v1), s(&root), "--release-id", "one"]);
    let before = snapshot(&root);
    let plan = env.json(&["deploy", s(&v2), s(&root), "--dry-run", "--json"]);
    assert_eq!(plan["dry_run"], true);
    assert!(plan["summary"]["full_files"].as_u64().unwrap() > 0);
    assert!(!plan["deleted"].as_array().unwrap().is_empty());
    let text = env.ok(&["deploy", s(&v2), s(&root), "-n"]);
    assert!(text.contains("moved"), "{text}");
    assert_eq!(snapshot(&root), before);
}

#[test]
fn exit_codes() {
    let env = Env::new();
    let root = env.path("app");
    let v1 = fixture("php-app-v1");
    let code = |args: &[&str]| env.run(args).status.code().unwrap();
    assert_eq!(
        code(&["deploy", s(&v1), s(&root), "--release-id", "../evil"]),
        2
    );
    assert_eq!(code(&["deploy", s(&v1), s(&root), "--keep", "0"]), 2);
    assert_eq!(code(&["deploy", "--no-such-flag"]), 2);
    assert!(!root.exists(), "a usage error must not create the root");
    assert_eq!(
        code(&["deploy", s(&v1), s(&root), "--release-id", "one"]),
        0
    );
    assert_eq!(
        code(&["deploy", s(&v1), s(&root), "--release-id", "one"]),
        1
    );
    let err = env.run(&["activate", s(&root), "missing"]);
    assert_eq!(err.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&err.stderr);
    assert!(msg.contains("release missing does not exist"), "{msg}");
    assert_eq!(code(&["releases", s(&env.path("nowhere"))]), 1);
}

#[test]
fn shared_paths_from_config_are_linked_not_deployed() {
    let env = Env::new();
    let root = env.path("app");
    let src = env.path("src");
    std::fs::create_dir_all(src.join("storage/logs")).unwrap();
    std::fs::write(src.join("storage/logs/dev.log"), "from the build").unwrap();
    std::fs::write(src.join("index.php"), "<?php echo 1;").unwrap();
    std::fs::create_dir_all(root.join(".relsync")).unwrap();
    std::fs::write(
        root.join(".relsync/config.toml"),
        "shared = [\"storage\", \".env\"]\nkeep = 2\n",
    )
    .unwrap();
    std::fs::create_dir_all(root.join("shared/storage")).unwrap();
    std::fs::write(root.join("shared/.env"), "APP_KEY=x").unwrap();
    env.ok(&["deploy", s(&src), s(&root), "--release-id", "one"]);
    let rel = root.join("releases/one");
    assert_eq!(
        std::fs::read_link(rel.join("storage")).unwrap(),
        Path::new("../../shared/storage")
    );
    assert_eq!(
        std::fs::read_to_string(root.join("current/.env")).unwrap(),
        "APP_KEY=x"
    );
    assert!(
        !root.join("shared/storage/logs/dev.log").exists(),
        "shared content is never overwritten"
    );
    // keep = 2 from the config: a third deploy prunes the first.
    std::fs::write(src.join("index.php"), "<?php echo 2;").unwrap();
    env.ok(&["deploy", s(&src), s(&root), "--release-id", "two"]);
    std::fs::write(src.join("index.php"), "<?php echo 3;").unwrap();
    let out = env.ok(&["deploy", s(&src), s(&root), "--release-id", "three"]);
    assert!(out.contains("pruned one"), "{out}");
    assert!(!root.join("releases/one").exists());
    assert!(root.join("releases/two").exists());
}

#[test]
fn sync_follows_rsync_slash_rules_and_dry_run() {
    let env = Env::new();
    let v1 = fixture("php-app-v1");
    let v2 = fixture("php-app-v2");
    let dst = env.path("dst");
    // Without a trailing slash the directory itself lands inside dst.
    env.ok(&["sync", s(&v1), s(&dst)]);
    assert!(dst.join("php-app-v1/public/index.php").exists());
    // With one, its contents do.
    let contents = format!("{}/", s(&v2));
    let mirror = env.path("mirror");
    env.ok(&["sync", &contents, s(&mirror)]);
    assert_eq!(snapshot(&mirror), snapshot(&v2));
    std::fs::write(mirror.join("extra.txt"), "mine").unwrap();
    let before = snapshot(&mirror);
    let v1c = format!("{}/", s(&v1));
    let plan = env.json(&["sync", &v1c, s(&mirror), "--delete", "-n", "--json"]);
    assert!(plan["summary"]["removed"].as_u64().unwrap() >= 1);
    assert_eq!(snapshot(&mirror), before, "dry run changed the mirror");
    env.ok(&["sync", &v1c, s(&mirror)]);
    assert!(
        mirror.join("extra.txt").exists(),
        "without --delete extras stay"
    );
    let out = env.json(&["sync", &v1c, s(&mirror), "--delete", "--json"]);
    assert!(out["applied"]["removed"].as_u64().unwrap() >= 1);
    assert_eq!(snapshot(&mirror), snapshot(&v1));
    let again = env.json(&["sync", &v1c, s(&mirror), "--delete", "--json"]);
    assert_eq!(again["applied"]["written_files"], 0);
}

/// The README's first command, at a small scale: daemons start, pushes and deltas happen.
#[test]
fn demo_runs_end_to_end() {
    let env = Env::new();
    let work = env.path("demo");
    let out = env.ok(&[
        "demo",
        "--files",
        "200",
        "--bytes",
        "400000",
        "--daemons",
        "2",
        "--dir",
        s(&work),
    ]);
    for want in [
        "push release 1",
        "release release-2 activated on 127.0.0.1:",
        "zstd-ref",
        "rolled back",
        "synced",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    // Release 2 sends a small fraction of release 1: the summary's "sent as" figure drops.
    let pushes: Vec<&str> = out.lines().filter(|l| l.contains(" sent as ")).collect();
    assert_eq!(pushes.len(), 4, "{out}");
    // Both nodes end on release 2 (one was rolled back and re-activated).
    for n in 1..=2 {
        let current = std::fs::read_link(work.join(format!("node{n}/app/current"))).unwrap();
        assert_eq!(current, Path::new("releases/release-2"));
    }
}

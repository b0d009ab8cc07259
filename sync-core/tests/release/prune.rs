//! Retention on disk and fault case 15: prune never removes `current` or the rollback target, and a
//! directory of the release being pruned swapped for a symlink to an outside directory (while the
//! prune runs) never leads the removal outside.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::fs::{renameat_with, RenameFlags, CWD};
use sync_core::edge::deploy::{self, DeployOptions};
use sync_core::edge::root::AppRoot;

use crate::harness::*;

fn keep_all(release: &str) -> DeployOptions {
    DeployOptions {
        keep: Some(100),
        ..opts(release, true)
    }
}

fn prune(app: &AppRoot, keep: usize) -> Vec<String> {
    let lock = app.lock(|_| {}).unwrap();
    deploy::prune(app, &lock, Some(keep), NOW)
        .unwrap()
        .iter()
        .map(|r| r.to_string())
        .collect()
}

fn rollback(app: &AppRoot) -> String {
    let lock = app.lock(|_| {}).unwrap();
    deploy::rollback(app, &lock, None, NOW).unwrap().to_string()
}

#[test]
fn prune_keeps_current_and_rollback_target_also_after_a_rollback() {
    let t = scratch();
    let path = t.path().join("app");
    let app = new_app(&path);
    let src = |n: u32| {
        let s = t.path().join(format!("s{n}"));
        source_tiny(&s, &format!("<?php // release {n}\n"));
        s
    };
    for n in 1..=5 {
        deploy_tree(&app, &src(n), &keep_all(&format!("r{n}"))).unwrap();
    }
    assert_eq!(rollback(&app), "r4");
    // current r4, rollback target r3; r5 is newer than current and goes too.
    assert_eq!(prune(&app, 1), ["r1", "r2", "r5"]);
    let state = assert_i0(&path);
    assert_eq!(
        (state.current.as_deref(), state.releases()),
        (Some("r4"), vec!["r3", "r4"])
    );

    assert_eq!(rollback(&app), "r3");
    // r3 has nothing older left: only current is protected.
    assert_eq!(prune(&app, 1), ["r4"]);
    let state = assert_i0(&path);
    assert_eq!(
        (state.current.as_deref(), state.releases()),
        (Some("r3"), vec!["r3"])
    );

    // A deploy with keep = 1 keeps its rollback target; the next one prunes it.
    let o = |r: &str| DeployOptions {
        keep: Some(1),
        ..opts(r, true)
    };
    assert!(deploy_tree(&app, &src(6), &o("r6"))
        .unwrap()
        .pruned
        .is_empty());
    let report = deploy_tree(&app, &src(7), &o("r7")).unwrap();
    assert_eq!(report.pruned, [id("r3")]);
    let state = assert_i0(&path);
    assert_eq!(
        (state.current.as_deref(), state.releases()),
        (Some("r7"), vec!["r6", "r7"])
    );
    let pruned: Vec<String> = journal_events(&path)
        .into_iter()
        .filter(|e| e.0 == "prune")
        .map(|e| e.1)
        .collect();
    assert_eq!(pruned, ["r1", "r2", "r5", "r4"]);
}

/// Swaps `base/cache` and `base/.swap` (a symlink to the outside directory) back and forth, in the
/// release directory and in its trash name, until told to stop or a bound is hit.
fn swapper(bases: [PathBuf; 2], stop: &AtomicBool, swaps: &AtomicU64) {
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed)
        && swaps.load(Ordering::Relaxed) < 1_000_000
        && started.elapsed() < Duration::from_secs(5)
    {
        for b in &bases {
            if renameat_with(
                CWD,
                b.join("cache"),
                CWD,
                b.join(".swap"),
                RenameFlags::EXCHANGE,
            )
            .is_ok()
            {
                swaps.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn source_with_cache(dir: &Path, n: u32) {
    source_a(dir);
    put(
        dir,
        "index.php",
        format!("<?php // release {n}\n").as_bytes(),
        0o644,
    );
    for d in 0..4 {
        for f in 0..50 {
            put(
                dir,
                &format!("cache/d{d}/f{f}.php"),
                format!("<?php // {d}/{f}\n").as_bytes(),
                0o644,
            );
        }
    }
}

#[test]
fn prune_race_with_a_directory_swapped_for_an_outside_symlink() {
    let t = scratch();
    let outside = t.path().join("outside");
    put(&outside, "sentinel", b"must survive", 0o644);
    put(
        &outside,
        "d0/f0.php",
        b"outside file named like a release file",
        0o644,
    );
    let outside_before = snapshot(&outside);
    let path = t.path().join("app");
    let app = new_app(&path);
    let mut sources = Vec::new();
    for n in 1..=6 {
        let s = t.path().join(format!("s{n}"));
        source_with_cache(&s, n);
        sources.push(s);
    }
    for n in 1..=3 {
        deploy_tree(&app, &sources[n - 1], &keep_all(&format!("r{n}"))).unwrap();
    }
    let mut total_swaps = 0;
    let mut prune_errors = Vec::new();
    for round in 1..=3 {
        let victim = format!("r{round}");
        let rels = path.join("releases");
        symlink(&outside, rels.join(&victim).join(".swap")).unwrap();
        let stop = AtomicBool::new(false);
        let swaps = AtomicU64::new(0);
        let result = std::thread::scope(|s| {
            let bases = [rels.join(&victim), rels.join(format!("{victim}.trash"))];
            s.spawn(|| swapper(bases, &stop, &swaps));
            let deadline = Instant::now() + Duration::from_secs(5);
            while swaps.load(Ordering::Relaxed) < 20 && Instant::now() < deadline {
                std::thread::yield_now();
            }
            let lock = app.lock(|_| {}).unwrap();
            let r = deploy::prune(&app, &lock, Some(1), NOW);
            stop.store(true, Ordering::Relaxed);
            r
        });
        total_swaps += swaps.load(Ordering::Relaxed);
        match result {
            Ok(pruned) => assert_eq!(pruned, [id(&victim)], "round {round}"),
            // The race may make the removal fail part-way; recovery must then finish it.
            Err(e) => prune_errors.push(e.to_string()),
        }
        let lock = app.lock(|_| {}).unwrap();
        app.recover(&lock).unwrap();
        drop(lock);

        assert_eq!(
            snapshot(&outside),
            outside_before,
            "round {round}: outside changed"
        );
        let state = assert_i0(&path);
        let (rb, cur) = (format!("r{}", round + 1), format!("r{}", round + 2));
        assert_eq!(
            state.current.as_deref(),
            Some(cur.as_str()),
            "round {round}"
        );
        assert_eq!(
            state.releases(),
            [rb.as_str(), cur.as_str()],
            "round {round}"
        );
        let next = round + 3;
        deploy_tree(&app, &sources[next - 1], &keep_all(&format!("r{next}"))).unwrap();
    }
    assert!(
        total_swaps >= 60,
        "the swapper barely ran ({total_swaps} swaps)"
    );
    assert!(fs::read(outside.join("sentinel")).unwrap() == b"must survive");
    eprintln!("prune race: {total_swaps} swaps, prune errors: {prune_errors:?}");
}

#[test]
fn clear_removes_current_then_every_release_and_keeps_the_journal() {
    let t = scratch();
    let path = t.path().join("app");
    let app = new_app(&path);
    for n in 1..=3 {
        let s = t.path().join(format!("s{n}"));
        source_tiny(&s, &format!("<?php // release {n}\n"));
        deploy_tree(&app, &s, &keep_all(&format!("r{n}"))).unwrap();
    }
    let lock = app.lock(|_| {}).unwrap();
    let removed: Vec<String> = deploy::clear(&app, &lock, NOW)
        .unwrap()
        .iter()
        .map(|r| r.to_string())
        .collect();
    assert_eq!(removed, ["r3", "r2", "r1"]);
    assert!(fs::symlink_metadata(path.join("current")).is_err());
    assert_eq!(fs::read_dir(path.join("releases")).unwrap().count(), 0);
    assert!(app.records().unwrap().is_empty());
    let cleared = app
        .journal()
        .unwrap()
        .iter()
        .filter(|e| e.event == "clear")
        .count();
    assert_eq!(cleared, 3);
    // Clearing an empty app is a no-op, not an error.
    assert!(deploy::clear(&app, &lock, NOW).unwrap().is_empty());
}

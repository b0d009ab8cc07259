//! Fault cases 1 and 2: a crash after any prefix of a deploy plan, and around the swap of `current`,
//! leaves a root that recovery brings back to the old or the new release, never anything between.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use sync_core::edge::deploy::{self, DeployOptions};
use sync_core::edge::exec::{LocalSource, Stager};
use sync_core::edge::root::AppRoot;
use sync_core::plan::Op;

use crate::harness::*;

/// Deploys r0 (a tiny release) and r1 (= A, current) into a fresh app root at `path`.
fn root_with_a(path: &Path, src0: &Path, src_a: &Path) -> AppRoot {
    let app = new_app(path);
    // The extra shared path B links must exist before B is deployed.
    put(path, "shared/.env", b"APP_KEY=test\n", 0o600);
    deploy_tree(&app, src0, &opts("r0", true)).unwrap();
    deploy_tree(&app, src_a, &opts("r1", true)).unwrap();
    app
}

/// B as r2, activated, with an extra shared path and keep = 1, so the plan ends with
/// `activate` and `prune r0` (r1 stays as the rollback target).
fn opts_b() -> DeployOptions {
    DeployOptions {
        keep: Some(1),
        shared: vec![rel(".env")],
        ..opts("r2", true)
    }
}

fn position(ops: &[Op], f: impl Fn(&Op) -> bool) -> usize {
    ops.iter().position(f).expect("op in plan")
}

#[test]
fn crash_after_every_prefix_of_a_deploy_recovers_to_old_or_new() {
    let t = scratch();
    let (src0, src_a, src_b) = (
        t.path().join("s0"),
        t.path().join("sa"),
        t.path().join("sb"),
    );
    source_tiny(&src0, "<?php // r0\n");
    source_a(&src_a);
    source_b(&src_b);
    let mb = manifest_of(&src_b);
    let outside = t.path().join("outside");
    put(&outside, "sentinel", b"keep me", 0o644);
    let outside_before = snapshot(&outside);

    // The plan is the same for every k: take its shape from a probe root.
    let ops = {
        let app = root_with_a(&t.path().join("probe"), &src0, &src_a);
        deploy::prepare(&app, &mb, &opts_b()).unwrap().plan.ops
    };
    let at = |f: fn(&Op) -> bool| position(&ops, f);
    let i_record = at(|o| matches!(o, Op::WriteRecord));
    let i_complete = at(|o| matches!(o, Op::MarkComplete));
    let i_activate = at(|o| matches!(o, Op::Activate));
    let i_prune = at(|o| matches!(o, Op::Prune { .. }));
    for name in [
        "link",
        "full",
        "symlink",
        "chmod-dir",
        "mkdir",
        "sync",
        "verify",
    ] {
        assert!(
            ops.iter().any(|o| o.name() == name),
            "plan lacks {name}: {ops:?}"
        );
    }

    for k in 0..=ops.len() {
        let path = t.path().join(format!("k{k}"));
        let app = root_with_a(&path, &src0, &src_a);
        let a_before = unlinked(&snapshot(&in_release(&path, "r1", "")));
        let shared_before = snapshot(&path.join("shared"));
        {
            let lock = app.lock(|_| {}).unwrap();
            let o = opts_b();
            let prep = deploy::prepare(&app, &mb, &o).unwrap();
            assert_eq!(prep.plan.ops, ops, "k={k}: plan differs between roots");
            let source = LocalSource::open(&src_b).unwrap();
            let mut stager = Stager::begin(
                &app,
                &lock,
                &prep.plan.release,
                None,
                &mb,
                &prep.bases,
                prep.seq,
                NOW,
                &source,
                o.exec.clone(),
                &no_progress,
            )
            .unwrap();
            stager.apply(&ops[..k]).unwrap();
            // The crash: no abort, nothing after op k.
            drop(stager);
        }
        drop(app);

        // Restart: open, lock, recover.
        let app = AppRoot::open(&path).unwrap();
        let lock = app.lock(|_| {}).unwrap();
        let rec = app.recover(&lock).unwrap();
        drop(lock);

        let staged = k <= i_complete;
        assert_eq!(
            rec.staging_removed,
            if staged {
                vec!["r2.staging".to_string()]
            } else {
                vec![]
            },
            "k={k}"
        );
        let orphan = k > i_record && k <= i_complete;
        assert_eq!(
            rec.orphan_records_removed,
            if orphan {
                vec!["r2".to_string()]
            } else {
                vec![]
            },
            "k={k}"
        );
        assert!(
            rec.trash_removed.is_empty() && !rec.current_tmp_removed,
            "k={k}: {rec:?}"
        );

        let state = assert_i0(&path);
        let want_current = if k > i_activate { "r2" } else { "r1" };
        assert_eq!(state.current.as_deref(), Some(want_current), "k={k}");
        let mut want: Vec<&str> = vec!["r0", "r1", "r2"];
        want.retain(|r| (*r != "r2" || k > i_complete) && (*r != "r0" || k <= i_prune));
        assert_eq!(state.releases(), want, "k={k}");
        assert_eq!(
            unlinked(&snapshot(&in_release(&path, "r1", ""))),
            a_before,
            "k={k}: A changed"
        );
        assert_eq!(
            snapshot(&path.join("shared")),
            shared_before,
            "k={k}: shared/ changed"
        );

        // A re-push of the same release converges wherever the crash left it.
        if k <= i_complete {
            let report = deploy_tree(&app, &src_b, &opts_b()).unwrap();
            assert!(report.recovered.is_empty(), "k={k}: {:?}", report.recovered);
            let state = assert_i0(&path);
            assert_eq!(state.current.as_deref(), Some("r2"), "k={k}");
            assert_eq!(state.releases(), ["r1", "r2"], "k={k}");
        }
        drop(app);
        remove_all(&path);
    }
    assert_eq!(snapshot(&outside), outside_before);
}

#[test]
fn crash_around_the_swap_and_mid_prune_is_recovered() {
    let w = with_a_deployed();
    let (path, src_b, app) = (&w.path, &w.src_b, &w.app);
    deploy_tree(app, src_b, &opts("r2", false)).unwrap();
    let current_ino = node(&path.join("current")).ino;

    for tmp_target in ["releases/r2", "releases/does-not-exist"] {
        // Activation of r2 crashed after creating current.tmp, before the rename.
        symlink(tmp_target, path.join("current.tmp")).unwrap();
        // And an interrupted record write left its temporary file.
        put(
            path,
            ".relsync/releases/.tmp-r3.rec",
            b"half a record",
            0o644,
        );
        let lock = app.lock(|_| {}).unwrap();
        let rec = app.recover(&lock).unwrap();
        drop(lock);
        assert!(rec.current_tmp_removed, "{tmp_target}: {rec:?}");
        let state = assert_i0(path);
        assert_eq!(state.current.as_deref(), Some("r1"), "{tmp_target}");
        assert_eq!(state.releases(), ["r1", "r2"]);
        // `current` itself was not rewritten.
        assert_eq!(node(&path.join("current")).ino, current_ino);
    }

    // A prune that crashed right after renaming r1 to r1.trash (before dropping its record).
    sync_core::edge::deploy::activate(app, &app.lock(|_| {}).unwrap(), &id("r2"), NOW).unwrap();
    fs::rename(path.join("releases/r1"), path.join("releases/r1.trash")).unwrap();
    let lock = app.lock(|_| {}).unwrap();
    let rec = app.recover(&lock).unwrap();
    drop(lock);
    assert_eq!(rec.trash_removed, ["r1.trash"]);
    assert_eq!(rec.orphan_records_removed, ["r1"]);
    let state = assert_i0(path);
    assert_eq!(state.current.as_deref(), Some("r2"));
    assert_eq!(state.releases(), ["r2"]);

    // Recovery on a clean root does nothing.
    let lock = app.lock(|_| {}).unwrap();
    assert!(app.recover(&lock).unwrap().is_empty());
}

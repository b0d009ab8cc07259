//! Rollback and activation between kept releases, and the journal line each event leaves.

use sync_core::edge::deploy::{self, DeployOptions};
use sync_core::edge::root::AppRoot;
use sync_core::edge::EdgeError;
use sync_core::ReleaseId;

use crate::harness::*;

fn rollback(app: &AppRoot, to: Option<&str>) -> Result<ReleaseId, EdgeError> {
    let lock = app.lock(|_| {}).unwrap();
    deploy::rollback(app, &lock, to.map(id).as_ref(), NOW)
}

fn activate(app: &AppRoot, release: &str) -> Result<(), EdgeError> {
    let lock = app.lock(|_| {}).unwrap();
    deploy::activate(app, &lock, &id(release), NOW)
}

#[test]
fn rollback_activate_and_journal() {
    let t = scratch();
    let path = t.path().join("app");
    let app = new_app(&path);
    for n in 1..=3 {
        let s = t.path().join(format!("s{n}"));
        source_tiny(&s, &format!("<?php // release {n}\n"));
        deploy_tree(&app, &s, &opts(&format!("r{n}"), true)).unwrap();
    }
    let current = || assert_i0(&path).current;

    assert_eq!(rollback(&app, None).unwrap(), id("r2"));
    assert_eq!(current().as_deref(), Some("r2"));
    assert_eq!(rollback(&app, None).unwrap(), id("r1"));
    assert_eq!(current().as_deref(), Some("r1"));
    assert!(matches!(
        rollback(&app, None),
        Err(EdgeError::NoRollbackTarget)
    ));
    assert_eq!(rollback(&app, Some("r3")).unwrap(), id("r3"));
    assert_eq!(current().as_deref(), Some("r3"));
    activate(&app, "r2").unwrap();
    assert_eq!(current().as_deref(), Some("r2"));

    for err in [
        activate(&app, "nope").unwrap_err(),
        rollback(&app, Some("nope")).unwrap_err(),
    ] {
        match &err {
            EdgeError::NoSuchRelease(r) => assert_eq!(r.as_str(), "nope"),
            other => panic!("expected NoSuchRelease, got {other:?}"),
        }
        assert!(err.to_string().contains("nope"), "{err}");
    }
    assert_eq!(current().as_deref(), Some("r2"));

    // A deploy without activation leaves current alone until it is activated.
    let s = t.path().join("s4");
    source_tiny(&s, "<?php // release 4\n");
    let report = deploy_tree(&app, &s, &opts("r4", false)).unwrap();
    assert!(!report.activated);
    assert_eq!(current().as_deref(), Some("r2"));
    activate(&app, "r4").unwrap();
    assert_eq!(current().as_deref(), Some("r4"));

    let want = [
        ("deploy", "r1"),
        ("deploy", "r2"),
        ("deploy", "r3"),
        ("rollback", "r2"),
        ("rollback", "r1"),
        ("rollback", "r3"),
        ("activate", "r2"),
        ("deploy", "r4"),
        ("activate", "r4"),
    ];
    let events = journal_events(&path);
    let got: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.0.as_str(), e.1.as_str()))
        .collect();
    assert_eq!(
        got, want,
        "failed requests leave no line, every event leaves one"
    );
    assert!(events.iter().all(|e| e.2 == "ok"), "{events:?}");
    let lines = std::fs::read_to_string(path.join(".relsync/journal.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), want.len());
}

/// A shared path that does not exist under `ROOT/shared/` is reported before anything is staged.
#[test]
fn a_missing_shared_target_is_refused_before_staging() {
    let t = scratch();
    let src = t.path().join("src");
    source_tiny(&src, "<?php // r1\n");
    let path = t.path().join("app");
    let app = new_app(&path);
    let o = DeployOptions {
        shared: vec![rel(".env")],
        ..opts("r1", true)
    };
    let err = deploy_tree(&app, &src, &o).unwrap_err();
    assert!(
        matches!(&err, EdgeError::SharedMissing { path, .. } if path.as_str() == ".env"),
        "{err:?}"
    );
    assert!(err.to_string().contains("shared/.env"), "{err}");
    assert!(std::fs::read_dir(path.join("releases"))
        .unwrap()
        .next()
        .is_none());
    put(&path, "shared/.env", b"APP_KEY=x\n", 0o600);
    deploy_tree(&app, &src, &o).unwrap();
    assert_eq!(
        std::fs::read_to_string(path.join("current/.env")).unwrap(),
        "APP_KEY=x\n"
    );
}

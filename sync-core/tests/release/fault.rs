//! Fault cases 4 and 6: injected sync and write errors and a corrupted staged file abort the deploy
//! with an error naming the file, leave no staging and no record, keep `current`, and a later deploy
//! without the fault rebuilds the release from scratch.

use std::path::Path;

use sync_core::edge::exec::{ExecOptions, Faults};
use sync_core::edge::EdgeError;

use crate::harness::*;

fn with_faults(faults: Faults) -> sync_core::edge::deploy::DeployOptions {
    sync_core::edge::deploy::DeployOptions {
        exec: ExecOptions {
            faults,
            ..ExecOptions::default()
        },
        ..opts("r2", true)
    }
}

/// What must hold after any aborted deploy of r2, and that a clean retry of r2 rebuilds it.
fn assert_aborted_then_retry(s: &WithA, err: &EdgeError) {
    let msg = err.to_string();
    assert!(leftovers(&s.path).is_empty(), "{:?}", leftovers(&s.path));
    let state = assert_i0(&s.path);
    assert_eq!(state.current.as_deref(), Some("r1"));
    assert_eq!(state.releases(), ["r1"]);
    let events = journal_events(&s.path);
    let last = events.last().unwrap();
    assert_eq!((last.0.as_str(), last.1.as_str()), ("deploy", "r2"));
    assert!(
        last.2.starts_with("failed: ") && last.2.contains(&msg),
        "{last:?}"
    );

    let a_before = unlinked(&snapshot(&in_release(&s.path, "r1", "")));
    let report = deploy_tree(&s.app, &s.src_b, &opts("r2", true)).unwrap();
    assert!(report.recovered.is_empty(), "{:?}", report.recovered);
    // Everything not linkable is written again, nothing reused from the failed attempt.
    assert_eq!(report.exec.bytes_written, report.summary.full_bytes);
    assert!(report.summary.full_files >= 2 && report.summary.linked_files >= 5);
    let state = assert_i0(&s.path);
    assert_eq!(state.current.as_deref(), Some("r2"));
    assert_eq!(state.releases(), ["r1", "r2"]);
    assert_eq!(
        unlinked(&snapshot(&in_release(&s.path, "r1", ""))),
        a_before
    );
}

fn staging(s: &WithA) -> String {
    s.path.join("releases/r2.staging").display().to_string()
}

#[test]
fn injected_sync_error_aborts_and_a_retry_rebuilds() {
    let s = with_a_deployed();
    let err = deploy_tree(
        &s.app,
        &s.src_b,
        &with_faults(Faults {
            fail_sync: true,
            ..Faults::default()
        }),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, EdgeError::Io { what: "sync", .. }), "{err:?}");
    assert!(msg.contains(&staging(&s)), "{msg}");
    assert!(
        chain(&err).contains("injected I/O error"),
        "{}",
        chain(&err)
    );
    assert_aborted_then_retry(&s, &err);
}

#[test]
fn injected_write_error_names_the_file() {
    let s = with_a_deployed();
    for victim in ["app/added.php", "app/edit.php"] {
        let err = deploy_tree(
            &s.app,
            &s.src_b,
            &with_faults(Faults {
                fail_write: Some(rel(victim)),
                ..Faults::default()
            }),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, EdgeError::Io { .. }), "{err:?}");
        let want = Path::new(&staging(&s)).join(victim);
        assert!(msg.contains(&want.display().to_string()), "{msg}");
        assert!(leftovers(&s.path).is_empty());
        assert_eq!(assert_i0(&s.path).current.as_deref(), Some("r1"));
    }
    let err = deploy_tree(
        &s.app,
        &s.src_b,
        &with_faults(Faults {
            fail_write: Some(rel("app/added.php")),
            ..Faults::default()
        }),
    )
    .unwrap_err();
    assert_aborted_then_retry(&s, &err);
}

#[test]
fn corrupted_staged_file_is_never_activated() {
    let s = with_a_deployed();
    let a_same = node(&in_release(&s.path, "r1", "app/same.php"));
    // A written file, then a file hard-linked from A (the flip must not reach A's inode).
    for victim in ["app/added.php", "app/same.php"] {
        let err = deploy_tree(
            &s.app,
            &s.src_b,
            &with_faults(Faults {
                corrupt: Some(rel(victim)),
                ..Faults::default()
            }),
        )
        .unwrap_err();
        let msg = err.to_string();
        match &err {
            EdgeError::Verify { path, .. } => assert_eq!(path.as_str(), victim),
            other => panic!("{victim}: expected a verification error, got {other:?}"),
        }
        assert!(
            msg.contains(victim) && msg.contains("not activated"),
            "{msg}"
        );
        assert!(leftovers(&s.path).is_empty());
        assert_eq!(assert_i0(&s.path).current.as_deref(), Some("r1"));
        assert_eq!(
            node(&in_release(&s.path, "r1", "app/same.php")).unlinked(),
            a_same.unlinked()
        );
    }
    let err = deploy_tree(
        &s.app,
        &s.src_b,
        &with_faults(Faults {
            corrupt: Some(rel("app/edit.php")),
            ..Faults::default()
        }),
    )
    .unwrap_err();
    assert_aborted_then_retry(&s, &err);
}

/// Linked files in a directory with many of them are verified from one listing of the
/// directory (their inodes), the others one `lstat` each: a staged file swapped for another
/// inode is named either way.
#[test]
fn a_swapped_linked_file_is_named_whether_its_directory_is_listed_or_not() {
    let t = scratch();
    let (src_a, src_b) = (t.path().join("sa"), t.path().join("sb"));
    for src in [&src_a, &src_b] {
        mkdir(src, "", 0o755);
        mkdir(src, "many", 0o755);
        for i in 0..12 {
            put(
                src,
                &format!("many/f{i:02}.php"),
                format!("<?php // {i}\n").as_bytes(),
                0o644,
            );
        }
        mkdir(src, "few", 0o755);
        put(src, "few/one.php", b"<?php // one\n", 0o644);
    }
    put(&src_b, "many/new.php", b"<?php // new in b\n", 0o644);
    let path = t.path().join("app");
    let app = new_app(&path);
    deploy_tree(&app, &src_a, &opts("r1", true)).unwrap();
    for victim in ["many/f07.php", "few/one.php"] {
        let err = deploy_tree(
            &app,
            &src_b,
            &with_faults(Faults {
                corrupt: Some(rel(victim)),
                ..Faults::default()
            }),
        )
        .unwrap_err();
        match &err {
            EdgeError::Verify { path, reason } => {
                assert_eq!(path.as_str(), victim, "{reason}");
                assert!(reason.contains("inode"), "{reason}");
            }
            other => panic!("{victim}: expected a verification error, got {other:?}"),
        }
        assert!(leftovers(&path).is_empty(), "{victim}");
    }
    deploy_tree(&app, &src_b, &opts("r2", true)).unwrap();
    assert_eq!(
        node(&in_release(&path, "r2", "many/f07.php")).ino,
        node(&in_release(&path, "r1", "many/f07.php")).ino
    );
}

/// A build started while its content arrives (`deploy_arriving`) and cancelled, before it may
/// start, before its first operation or while it waits for that content, leaves no staging and
/// no journal entry, and the release is then built as usual.
#[test]
fn a_cancelled_build_leaves_nothing_and_journals_nothing() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use sync_core::edge::deploy::{self, Arriving};
    use sync_core::edge::exec::LocalSource;

    let s = with_a_deployed();
    let manifest = manifest_of(&s.src_b);
    let source = LocalSource::open(&s.src_b).unwrap();
    let journaled = journal(&s.path).len();
    // (cancelled by its flag, told it may not start (a dry run), cancelled while it waits)
    for (flagged, may_start) in [(true, true), (false, false), (false, true)] {
        let cancel = Arc::new(AtomicBool::new(flagged));
        let mut o = opts("r2", true);
        o.exec.cancel = Some(Arc::clone(&cancel));
        let mut waited = false;
        let mut wait = || {
            waited = true;
            Err(EdgeError::Cancelled("the push ended".into()))
        };
        let lock = s.app.lock(|_| {}).unwrap();
        let err = deploy::deploy_arriving(
            &s.app,
            &lock,
            &manifest,
            &source,
            &o,
            &|_| {},
            Arriving {
                objects: Default::default(),
                start: &mut || {
                    if may_start {
                        Ok(())
                    } else {
                        Err(EdgeError::Cancelled("the push ended at its need".into()))
                    }
                },
                wait: &mut wait,
            },
        )
        .unwrap_err();
        drop(lock);
        assert!(matches!(err, EdgeError::Cancelled(_)), "{err:?}");
        assert_eq!(waited, !flagged && may_start, "flagged: {flagged}");
        assert!(leftovers(&s.path).is_empty(), "flagged: {flagged}");
        assert_eq!(journal(&s.path).len(), journaled, "flagged: {flagged}");
        assert_eq!(assert_i0(&s.path).current.as_deref(), Some("r1"));
    }
    deploy_tree(&s.app, &s.src_b, &opts("r2", true)).unwrap();
    assert_eq!(assert_i0(&s.path).current.as_deref(), Some("r2"));
}

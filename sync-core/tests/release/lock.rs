//! Fault case 8: deploys to one app are serialized by a lock that dies with its holder; the loser
//! gets `Busy` naming the holder, another app is unaffected, and a stale owner line without a live
//! lock is taken over.

use std::cell::RefCell;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sync_core::edge::root::{operator, AppRoot};
use sync_core::edge::EdgeError;

use crate::harness::*;

#[test]
fn second_deploy_is_busy_and_names_the_holder() {
    let t = scratch();
    let src = t.path().join("src");
    source_a(&src);
    let (path, other) = (t.path().join("app"), t.path().join("other"));
    let app = new_app(&path);
    let other_app = new_app(&other);

    let (held_tx, held_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    std::thread::scope(|s| {
        let app = &app;
        let holder = s.spawn(move || {
            let lock = app.lock(|_| {}).unwrap();
            held_tx.send(()).unwrap();
            release_rx.recv().unwrap();
            drop(lock);
        });
        held_rx.recv().unwrap();

        let err = deploy_tree(app, &src, &opts("r1", true)).unwrap_err();
        let msg = err.to_string();
        match &err {
            EdgeError::Busy { root, holder } => {
                assert_eq!(root, &path);
                assert!(
                    holder.starts_with(&format!(
                        "{} pid {} since ",
                        operator(),
                        std::process::id()
                    )),
                    "{holder}"
                );
            }
            other => panic!("expected Busy, got {other:?}"),
        }
        assert!(
            msg.contains("busy") && msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(leftovers(&path).is_empty());
        assert_eq!(
            assert_i0(&path).releases.len(),
            0,
            "nothing was deployed while busy"
        );

        // Another app is not held up.
        deploy_tree(&other_app, &src, &opts("r1", true)).unwrap();
        assert_eq!(assert_i0(&other).current.as_deref(), Some("r1"));

        release_tx.send(()).unwrap();
        holder.join().unwrap();
    });

    // Free again, and a clean release leaves no stale owner behind.
    let stale = RefCell::new(None);
    let lock = app
        .lock(|s| *stale.borrow_mut() = Some(s.to_owned()))
        .unwrap();
    assert_eq!(*stale.borrow(), None);
    drop(lock);
    deploy_tree(&app, &src, &opts("r1", true)).unwrap();
    assert_eq!(assert_i0(&path).current.as_deref(), Some("r1"));
}

#[test]
fn stale_owner_line_without_a_lock_is_taken_over() {
    let t = scratch();
    let path = t.path().join("app");
    let app = AppRoot::open_or_create(&path).unwrap();
    let ghost = "ghost@gone pid 424242 since 2020-01-01 00:00:00";
    put(&path, ".relsync/lock", ghost.as_bytes(), 0o644);
    let seen = RefCell::new(Vec::new());
    let lock = app.lock(|s| seen.borrow_mut().push(s.to_owned())).unwrap();
    assert_eq!(*seen.borrow(), [ghost]);
    let line = std::fs::read_to_string(path.join(".relsync/lock")).unwrap();
    assert!(
        line.starts_with(&format!("{} pid {} since ", operator(), std::process::id())),
        "{line}"
    );
    assert!(!line.contains("ghost"), "{line}");
    drop(lock);
}

#[test]
fn lock_dies_with_its_holder_process() {
    let t = scratch();
    let path = t.path().join("app");
    let app = AppRoot::open_or_create(&path).unwrap();
    let lock_file = path.join(".relsync/lock");
    // flock(1) takes the same kind of lock (flock(2)) in a separate process; without a fork, so
    // the process killed below is the only holder.
    let child = Command::new("flock")
        .args(["-x", "-F"])
        .arg(&lock_file)
        .args(["sleep", "30"])
        .stdin(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        eprintln!("skipped: flock(1) is not installed");
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match app.lock(|_| {}) {
            Err(EdgeError::Busy { holder, .. }) => {
                // flock(1) writes no owner line.
                assert_eq!(holder, "another process");
                break;
            }
            Ok(lock) => {
                drop(lock);
                assert!(Instant::now() < deadline, "flock(1) never took the lock");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("{e}"),
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let lock = app
        .lock(|_| {})
        .expect("the lock of a killed process is free");
    drop(lock);
}

//! Keeping an app's next release prestaged while the app is idle.
//!
//! Once the app has been idle for [`IDLE`] after a command that held its lock (and at startup),
//! a background thread takes the lock and makes `ROOT/.relsync/next/<current>` ([`deploy::prestage`]): the current
//! release's tree of directories, hard links and symlinks, which the next push on top of it
//! starts from. A command about to take the lock first stops that thread and waits for it, so a
//! push never finds the app busy because of it; the tree is then either complete or gone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sync_core::edge::deploy;
use sync_core::edge::{error_chain, EdgeError};

use super::App;

/// How long the app stays idle before its tree is made: the client of the command that just
/// ended is usually still finishing (on a shared machine it would compete for the CPU), and a
/// staged release is often activated right after, which would make the tree stale at once.
pub(super) const IDLE: Duration = Duration::from_millis(1000);

/// The prestaging thread of one app.
#[derive(Debug, Default)]
pub(super) struct Prestager {
    running: Mutex<Option<Running>>,
    /// Set at shutdown: no thread is started any more.
    closed: AtomicBool,
}

#[derive(Debug)]
struct Running {
    cancel: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// Starts prestaging `app`'s current release in the background (if its config asks for it),
/// unless a thread is at it already. `fresh` makes the tree again even when one is there (at
/// startup: a tree left by an earlier process may have been cut short by a crash).
pub(super) fn kick(app: &Arc<App>, fresh: bool) {
    let this = &app.prestager;
    if !app.config.prestage || this.closed.load(Ordering::SeqCst) {
        return;
    }
    let mut running = this.running.lock().unwrap_or_else(PoisonError::into_inner);
    if running.as_ref().is_some_and(|r| !r.thread.is_finished()) {
        return;
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let (app, stop) = (Arc::clone(app), Arc::clone(&cancel));
    let spawned = std::thread::Builder::new()
        .name("relsyncd-prestage".into())
        .spawn(move || run(&app, fresh, stop));
    match spawned {
        Ok(thread) => *running = Some(Running { cancel, thread }),
        Err(e) => tracing::warn!("cannot start prestaging: {e}"),
    }
}

impl Prestager {
    /// Stops the prestaging thread, if one runs, and waits for it: the tree it was making is then
    /// complete or removed, and the app's lock is free of it.
    pub(super) fn stop(&self) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(r) = running {
            r.cancel.store(true, Ordering::SeqCst);
            let _ = r.thread.join();
        }
    }

    /// [`Prestager::stop`] for good (shutdown).
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.stop();
    }
}

fn run(app: &App, fresh: bool, cancel: Arc<AtomicBool>) {
    let (root, app) = (&app.root, app.config.name.as_str());
    if !fresh {
        let until = Instant::now() + IDLE;
        while Instant::now() < until {
            if cancel.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if !deploy::prestage_due(root, fresh) {
        return;
    }
    let lock = match root.lock(|_| {}) {
        Ok(lock) => lock,
        Err(EdgeError::Busy { holder, .. }) => {
            // Whoever holds it starts prestaging again when done, if it is relsyncd.
            tracing::debug!(app, %holder, "not prestaging: the app is busy");
            return;
        }
        Err(e) => {
            tracing::warn!(app, "not prestaging: {}", error_chain(&e));
            return;
        }
    };
    let started = Instant::now();
    match deploy::prestage(root, &lock, fresh, Some(cancel)) {
        Ok(report) => match &report.prestaged {
            Some(release) => tracing::info!(
                app,
                %release,
                files = report.files,
                removed = ?report.removed,
                ms = started.elapsed().as_millis() as u64,
                "prestaged the next release's tree"
            ),
            None if !report.removed.is_empty() => {
                tracing::debug!(app, removed = ?report.removed, "removed stale prestaged trees");
            }
            None => {}
        },
        Err(EdgeError::Cancelled(_)) => tracing::debug!(app, "prestaging stopped for a command"),
        Err(e) => tracing::warn!(
            app,
            "prestaging the next release failed (the next push builds without it): {}",
            error_chain(&e)
        ),
    }
}

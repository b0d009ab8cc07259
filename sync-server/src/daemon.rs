//! The daemon driver: accepts QUIC connections, runs one [`DaemonSession`] per connection and
//! carries out what it asks for against the app roots.
//!
//! [`serve`] opens and recovers every app root, starts the endpoint and returns a [`Server`]. Each
//! connection gets a task (`connection`) that feeds its session control bytes, file-stream
//! headers, finished work and time, and carries out the session's requests: file-system work runs
//! on tokio's blocking pool (`work` for apps, `export` for syncs), except received files, which a
//! fixed set of store workers rebuilds (`store`), as many at once as the machine has cores.
//! Shutdown stops accepting, lets the sessions in progress run for a grace period, then ends the
//! rest with an error to their clients and waits for the work they started, so nothing is left
//! half-built: a build in progress either completes or removes its staging directory, and
//! recovery at the next start covers a crash.
//!
//! [`DaemonSession`]: sync_core::proto::DaemonSession

mod connection;
mod content;
mod export;
mod prestage;
mod relay;
mod store;
mod stream;
mod work;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sync_core::edge::root::AppRoot;
use sync_core::edge::{error_chain, EdgeError};
use sync_core::wire::Limits;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::config::{AppConfig, Config, ExportConfig};
use crate::net::{server_endpoint, NetConfig, NetError};
use crate::tls::{AuthorizedClientVerifier, Identity};

/// How long sessions in progress may run on after shutdown was asked for, by default.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// How the daemon runs, beyond its configuration file.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Time sessions in progress get to finish once shutdown starts; the rest are then ended.
    pub grace: Duration,
    /// Transport knobs. The concurrent file-stream limit is always the configured
    /// `limits.max_streams`, whatever this says.
    pub net: NetConfig,
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        ServeOptions {
            grace: DEFAULT_GRACE,
            net: NetConfig::default(),
        }
    }
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    #[error("app {app}: cannot prepare its root {}: {}; check that the directory is writable by relsyncd", root.display(), error_chain(source))]
    Root {
        app: String,
        root: PathBuf,
        #[source]
        source: Box<EdgeError>,
    },
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("cannot read the address the daemon listens on: {0}")]
    LocalAddr(#[source] io::Error),
    #[error("preparing the app roots failed unexpectedly: {0}")]
    Startup(String),
}

/// A running daemon.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    /// The address the daemon listens on (the real port when the config said port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until the daemon has shut down: the shutdown future resolved, the grace period ran
    /// out or every session finished, and all work in progress ended.
    pub async fn stopped(self) {
        if let Err(e) = self.task.await {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
}

/// An app the daemon serves, with its root opened once at startup.
#[derive(Debug)]
struct App {
    config: AppConfig,
    root: AppRoot,
    /// Makes the next release's tree while the app is idle.
    prestager: prestage::Prestager,
}

/// What every connection task shares.
#[derive(Debug)]
struct Shared {
    limits: Limits,
    apps: HashMap<String, Arc<App>>,
    /// Directories `relsync sync` may mirror into.
    exports: HashMap<String, Arc<ExportConfig>>,
    /// Rebuild received files, as many at once as there are workers (CPU-bound zstd and rsync
    /// work).
    store: Arc<store::Workers>,
    /// Slots for files rebuilt while their payload arrives (`stream::ReadInto::Direct`), twice as
    /// many as store workers: each holds a blocking thread and a few MiB of pieces, and spends
    /// much of its time waiting for the stream, so that every file stream of a client (two per
    /// core) can feed one rather than spool its file to disk and read it back.
    direct: Arc<tokio::sync::Semaphore>,
    /// How this daemon pushes on to its children in a relay tree.
    relayer: Arc<relay::Relayer>,
}

/// Starts the daemon: opens every app root (creating the layout), recovers what an earlier run
/// left behind, binds `config.listen` and serves until `shutdown` resolves.
///
/// Must be called inside a multi-threaded tokio runtime. Startup failures (an app root that cannot
/// be created, an address in use) are returned here; once running, failures are per connection and
/// only logged.
pub async fn serve(
    config: Config,
    identity: Identity,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Server, DaemonError> {
    let apps_config: Vec<AppConfig> = config.apps.values().cloned().collect();
    let apps = tokio::task::spawn_blocking(move || {
        apps_config
            .into_iter()
            .map(|app| {
                let root = prepare_root(&app).map_err(|source| DaemonError::Root {
                    app: app.name.clone(),
                    root: app.root.clone(),
                    source: Box::new(source),
                })?;
                let app = Arc::new(App {
                    config: app,
                    root,
                    prestager: Default::default(),
                });
                prestage::kick(&app, true);
                Ok((app.config.name.clone(), app))
            })
            .collect::<Result<HashMap<_, _>, DaemonError>>()
    })
    .await
    .map_err(|e| DaemonError::Startup(e.to_string()))??;

    let net = NetConfig {
        max_concurrent_uni_streams: config.limits.max_streams,
        ..options.net
    };
    let authorized = Arc::new(AuthorizedClientVerifier::new(config.all_keys()));
    // A relay's key is nobody's authorized key: its ticket is checked once the push is known.
    authorized.admit_any(config.accepts_relayed());
    let endpoint = server_endpoint(config.listen, &identity, authorized, &net)?;
    let addr = endpoint.local_addr().map_err(DaemonError::LocalAddr)?;
    let slots = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    for e in config.exports.values() {
        if !e.path.is_dir() {
            tracing::warn!(
                export = %e.name,
                path = %e.path.display(),
                "export directory does not exist; syncs into it fail until it is created"
            );
        }
    }
    let exports = config
        .exports
        .iter()
        .map(|(name, e)| (name.clone(), Arc::new(e.clone())))
        .collect();
    let store = store::Workers::start(slots).map_err(|e| {
        DaemonError::Startup(format!(
            "cannot start the store workers: {e}; check the limit on threads (ulimit -u)"
        ))
    })?;
    let shared = Arc::new(Shared {
        limits: config.limits,
        apps,
        exports,
        store: Arc::new(store),
        direct: Arc::new(tokio::sync::Semaphore::new(2 * slots)),
        relayer: Arc::new(relay::Relayer {
            identity: Arc::new(identity.clone()),
            net: crate::fleet::driver::fleet_net(),
        }),
    });
    tracing::info!(
        %addr,
        key = %identity.fingerprint(),
        apps = shared.apps.len(),
        exports = shared.exports.len(),
        "relsyncd listening"
    );
    let task = tokio::spawn(accept_loop(endpoint, shared, shutdown, options.grace));
    Ok(Server { addr, task })
}

/// Opens (creating) an app root and, if nobody holds its lock, removes what an interrupted run
/// left: staging directories, `current.tmp`, orphan records, temporaries of interrupted receives.
fn prepare_root(app: &AppConfig) -> Result<AppRoot, EdgeError> {
    let root = AppRoot::open_or_create(&app.root)?;
    let lock = root.lock(|stale| {
        tracing::warn!(app = %app.name, holder = stale, "the previous holder of the lock is gone; recovering");
    });
    match lock {
        Ok(lock) => {
            let r = root.recover(&lock)?;
            if r.is_empty() {
                tracing::debug!(app = %app.name, root = %app.root.display(), "app root clean");
            } else {
                tracing::info!(
                    app = %app.name,
                    root = %app.root.display(),
                    staging_removed = ?r.staging_removed,
                    trash_removed = ?r.trash_removed,
                    orphan_records_removed = ?r.orphan_records_removed,
                    current_tmp_removed = r.current_tmp_removed,
                    objects_removed = r.objects_removed,
                    "recovered what an interrupted run left behind"
                );
            }
        }
        Err(EdgeError::Busy { holder, .. }) => {
            tracing::warn!(
                app = %app.name,
                %holder,
                "app root is locked by another process; recovery runs with the first push"
            );
        }
        Err(e) => return Err(e),
    }
    Ok(root)
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    conns.spawn(connection::run(shared.clone(), incoming, stop_rx.clone()));
                }
                None => break,
            },
            Some(done) = conns.join_next(), if !conns.is_empty() => log_join(done),
        }
    }
    // Refuse new handshakes while the sessions in progress finish.
    endpoint.set_server_config(None);
    tracing::info!(
        sessions = conns.len(),
        grace_secs = grace.as_secs(),
        "shutting down: no new connections"
    );
    let deadline = tokio::time::sleep(grace);
    tokio::pin!(deadline);
    while !conns.is_empty() {
        tokio::select! {
            () = &mut deadline => break,
            Some(done) = conns.join_next() => log_join(done),
        }
    }
    if !conns.is_empty() {
        tracing::warn!(
            sessions = conns.len(),
            "grace period over; ending the sessions still running"
        );
        let _ = stop_tx.send(true);
        while let Some(done) = conns.join_next().await {
            log_join(done);
        }
    }
    // No tree is being made (or half made) once the daemon is gone.
    let apps: Vec<Arc<App>> = shared.apps.values().cloned().collect();
    let _ = tokio::task::spawn_blocking(move || {
        for app in apps {
            app.prestager.close();
        }
    })
    .await;
    endpoint.close(0u32.into(), b"relsyncd shut down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    tracing::info!("relsyncd stopped");
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!("a connection task failed: {e}");
    }
}

//! relsyncd daemons run inside this process on loopback, each with a throwaway key and app
//! root: what `relsync demo` tours and what `relsync bench --target loopback` measures, with no
//! set-up.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sync_server::config::{AppConfig, Config};
use sync_server::daemon::{serve, ServeOptions, Server};
use sync_server::tls::{Fingerprint, Identity};

/// The app every loopback daemon serves.
pub const APP: &str = "shop";

/// One daemon: where it listens, its key and its app root.
pub struct Node {
    pub addr: SocketAddr,
    pub fingerprint: String,
    pub root: PathBuf,
}

/// Running daemons; [`LocalDaemons::stop`] (or dropping them) shuts them down.
pub struct LocalDaemons {
    pub nodes: Vec<Node>,
    runtime: tokio::runtime::Runtime,
    stop: tokio::sync::watch::Sender<bool>,
    servers: Vec<Server>,
}

impl LocalDaemons {
    /// Starts `n` daemons named `{name}{i}` whose app roots are `work/{name}{i}/app`, each
    /// authorizing `client` for app [`APP`], and with `accept_relayed` relayed pushes of it.
    pub fn start(
        work: &Path,
        name: &str,
        n: usize,
        client: Fingerprint,
        accept_relayed: bool,
    ) -> Result<LocalDaemons> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime for the local daemons")?;
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut daemons = LocalDaemons {
            nodes: Vec::new(),
            runtime,
            stop,
            servers: Vec::new(),
        };
        for i in 1..=n {
            let root = work.join(format!("{name}{i}/app"));
            let identity =
                Identity::generate(&format!("{name}{i}")).context("generating a daemon key")?;
            let fingerprint = identity.fingerprint().to_string();
            let mut apps = BTreeMap::new();
            apps.insert(
                APP.to_string(),
                AppConfig {
                    name: APP.into(),
                    root: root.clone(),
                    keep: Some(5),
                    shared: Vec::new(),
                    authorized: HashSet::from([client]),
                    accept_relayed,
                    prestage: true,
                    activation: None,
                },
            );
            let config = Config {
                listen: "127.0.0.1:0".parse().expect("literal address"),
                key: PathBuf::new(),
                cert: PathBuf::new(),
                limits: Default::default(),
                apps,
                exports: BTreeMap::new(),
            };
            let mut rx = stop_rx.clone();
            let server = daemons
                .runtime
                .block_on(serve(
                    config,
                    identity,
                    ServeOptions::default(),
                    async move {
                        let _ = rx.wait_for(|stop| *stop).await;
                    },
                ))
                .with_context(|| format!("starting local daemon {name}{i}"))?;
            daemons.nodes.push(Node {
                addr: server.local_addr(),
                fingerprint,
                root,
            });
            daemons.servers.push(server);
        }
        Ok(daemons)
    }

    /// Stops every daemon and waits until each has finished.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        let _ = self.stop.send(true);
        let servers = std::mem::take(&mut self.servers);
        self.runtime.block_on(async {
            for s in servers {
                s.stopped().await;
            }
        });
    }
}

impl Drop for LocalDaemons {
    fn drop(&mut self) {
        self.shut_down();
    }
}

//! An emulated fleet: network namespaces on a bridge, shaped links, and a real `relsyncd` in
//! each node namespace.
//!
//! Layout, for a fleet tagged `rsf-<pid>-<n>`:
//!
//! ```text
//!  <tag>-src  eth0 198.18.0.1 ──(tbf: source uplink)── s ─┐
//!                                                          ├─ br0   (in namespace <tag>-hub)
//!  <tag>-n<i> eth0 198.18.0.<10+i> ──── n<i> (tbf: node link) ┘
//! ```
//!
//! Every interface and address lives in a namespace the harness creates; the root namespace is
//! not touched, so fleets of tests running in parallel cannot collide, and deleting the
//! namespaces removes every veth and the bridge with them. Links are shaped with `tc tbf` (this
//! kernel has no netem, so no latency is added): the source's uplink on its own egress, each
//! node's link on the bridge side's egress, i.e. towards the node. [`Fleet`]'s `Drop` kills the
//! daemons and deletes the namespaces, also when a test panics; namespaces left by a fleet whose
//! process was killed outright are removed by the next fleet that starts.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use sync_server::tls::Identity;

use crate::support::relsyncd;

/// Namespace names start with this; the pid that follows tells whether the owner still runs.
const PREFIX: &str = "rsf-";
/// Port every node's relsyncd listens on (each in its own namespace).
pub const PORT: u16 = 7171;
/// Address of the source namespace.
pub const SOURCE_IP: &str = "198.18.0.1";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Why the emulated fleet cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: network namespaces need CAP_NET_ADMIN".into());
    }
    for tool in ["ip", "tc"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("`{tool}` is missing (Debian package iproute2)"));
        }
    }
    None
}

/// Skips the calling test, saying why, when the emulated fleet cannot run here.
macro_rules! require_netns {
    () => {
        if let Some(why) = $crate::harness::unavailable() {
            eprintln!("skipping: {why}");
            return;
        }
    };
}

/// Links and daemons of a fleet to build.
#[derive(Debug, Clone)]
pub struct Spec {
    pub nodes: usize,
    /// tbf rate of the source's uplink, e.g. "1gbit".
    pub source_rate: String,
    /// tbf rate of each node's link.
    pub node_rate: String,
    /// Per-node rate overrides.
    pub node_rates: Vec<(usize, String)>,
    /// `waves` of the fleet file's group (all nodes, in order).
    pub waves: String,
    pub max_failed: u32,
    /// Releases each daemon keeps (`keep` of app `shop`).
    pub keep: u32,
    /// Daemons take relayed pushes (`accept_relayed` of app `shop`).
    pub relay: bool,
}

impl Spec {
    pub fn new(nodes: usize) -> Spec {
        Spec {
            nodes,
            source_rate: "1gbit".into(),
            node_rate: "1gbit".into(),
            node_rates: Vec::new(),
            waves: "100%".into(),
            max_failed: 0,
            keep: 10,
            relay: false,
        }
    }
}

/// One node: its namespace and its relsyncd.
pub struct Node {
    pub name: String,
    pub ns: String,
    pub ip: String,
    pub fingerprint: String,
    /// The app root of app `shop`.
    pub root: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
    /// Every line relsyncd logged so far (at `info`), across restarts.
    log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    /// The lines relsyncd logged so far that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    /// The release `current` points to.
    pub fn current(&self) -> Option<String> {
        let link = std::fs::read_link(self.root.join("current")).ok()?;
        Some(link.file_name()?.to_str()?.to_owned())
    }

    /// Complete releases on disk.
    pub fn releases(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root.join("releases"))
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| !n.contains('.'))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Objects a push delivered so far (and not yet linked into a release).
    pub fn objects(&self) -> usize {
        std::fs::read_dir(self.root.join(".relsync/objects"))
            .map(|rd| rd.count())
            .unwrap_or(0)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

/// A running emulated fleet (see the module docs).
pub struct Fleet {
    pub tag: String,
    tmp: tempfile::TempDir,
    namespaces: Vec<String>,
    pub nodes: Vec<Node>,
    client_fp: String,
    src_ns: String,
    keep: u32,
    relay: bool,
}

/// Runs `ip`/`tc` with `args`; panics with its stderr when it fails.
fn run(tool: &str, args: &[&str]) {
    let out = Command::new(tool).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{tool} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes namespaces of fleets whose process is gone (killed before its `Drop` ran).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

impl Fleet {
    /// Builds the fleet of `spec`: namespaces, bridge, shaped links, one relsyncd per node
    /// (authorizing the fleet's client key for app `shop`), and a fleet file listing them.
    pub fn start(spec: &Spec) -> Fleet {
        remove_stale();
        let tag = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let tmp = tempfile::tempdir().unwrap();
        let client = Identity::generate("client").unwrap();
        client.save(&tmp.path().join("client"), "id").unwrap();
        let mut fleet = Fleet {
            src_ns: format!("{tag}-src"),
            tag,
            tmp,
            namespaces: Vec::new(),
            nodes: Vec::new(),
            client_fp: client.fingerprint().to_string(),
            keep: spec.keep,
            relay: spec.relay,
        };
        // Built on a value whose Drop cleans up, so a failure halfway leaves nothing behind.
        fleet.build(spec);
        fleet
    }

    fn add_ns(&mut self, name: &str) {
        run("ip", &["netns", "add", name]);
        self.namespaces.push(name.to_owned());
        run("ip", &["-n", name, "link", "set", "lo", "up"]);
    }

    /// Connects namespace `ns` to the bridge: `eth0` there with `ip`, `port` on the bridge.
    fn attach(&self, hub: &str, ns: &str, port: &str, ip: &str) {
        run(
            "ip",
            &[
                "-n", hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        );
        run(
            "ip",
            &["-n", hub, "link", "set", port, "master", "br0", "up"],
        );
        run(
            "ip",
            &["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        );
        run("ip", &["-n", ns, "link", "set", "eth0", "up"]);
    }

    fn shape(ns: &str, dev: &str, rate: &str) {
        run(
            "tc",
            &[
                "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "64kb",
                "latency", "50ms",
            ],
        );
    }

    fn build(&mut self, spec: &Spec) {
        let hub = format!("{}-hub", self.tag);
        self.add_ns(&hub);
        run("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        run("ip", &["-n", &hub, "link", "set", "br0", "up"]);
        let src = self.src_ns.clone();
        self.add_ns(&src);
        self.attach(&hub, &src, "s", SOURCE_IP);
        Self::shape(&src, "eth0", &spec.source_rate);
        for i in 0..spec.nodes {
            let ns = format!("{}-n{i}", self.tag);
            let ip = format!("198.18.0.{}", 10 + i);
            self.add_ns(&ns);
            let port = format!("n{i}");
            self.attach(&hub, &ns, &port, &ip);
            let rate = spec
                .node_rates
                .iter()
                .find(|(n, _)| *n == i)
                .map_or(spec.node_rate.as_str(), |(_, r)| r.as_str());
            Self::shape(&hub, &port, rate);
            let dir = self.tmp.path().join(format!("n{i}"));
            let identity = Identity::generate("daemon").unwrap();
            identity.save(&dir, "daemon").unwrap();
            self.nodes.push(Node {
                name: format!("n{i}"),
                ns,
                ip,
                fingerprint: identity.fingerprint().to_string(),
                root: dir.join("apps/shop"),
                dir,
                child: None,
                log: Arc::default(),
            });
            self.start_daemon(i, None);
        }
        let mut text = String::new();
        for n in &self.nodes {
            text += &format!(
                "[hosts.{}]\naddress = \"{}:{PORT}\"\nkey = \"{}\"\n\n",
                n.name, n.ip, n.fingerprint
            );
        }
        let names: Vec<String> = self.nodes.iter().map(|n| format!("{:?}", n.name)).collect();
        text += &format!(
            "[groups.all]\nhosts = [{}]\napp = \"shop\"\nwaves = \"{}\"\nmax_failed = {}\n",
            names.join(", "),
            spec.waves,
            spec.max_failed
        );
        std::fs::write(self.fleet_file(), text).unwrap();
    }

    /// Starts node `i`'s relsyncd, with `activation` (a TOML table body) as app `shop`'s
    /// activation pipeline, and waits until it listens.
    pub fn start_daemon(&mut self, i: usize, activation: Option<&str>) {
        let (client_fp, keep, relay) = (self.client_fp.clone(), self.keep, self.relay);
        let n = &mut self.nodes[i];
        let config = n.dir.join("relsyncd.toml");
        let mut text = format!(
            "listen = \"{}:{PORT}\"\nkey = \"daemon.key\"\ncert = \"daemon.crt\"\n\n[limits]\nmessage_timeout_secs = 20\n\n[apps.shop]\nroot = \"{}\"\nkeep = {keep}\nauthorized_keys = [\"{client_fp}\"]\naccept_relayed = {relay}\n",
            n.ip,
            n.root.display()
        );
        if let Some(a) = activation {
            text += &format!("\n[apps.shop.activation]\n{a}\n");
        }
        std::fs::write(&config, text).unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &n.ns])
            .arg(relsyncd())
            .arg("--config")
            .arg(&config)
            .env("RELSYNC_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let name = n.name.clone();
        let log = Arc::clone(&n.log);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(line.clone());
                if line.contains("listening") {
                    let _ = tx.send(true);
                }
                if std::env::var_os("RELSYNC_TEST_DAEMON_LOG").is_some() {
                    eprintln!("relsyncd {name}: {line}");
                }
            }
            let _ = tx.send(false);
        });
        n.child = Some(child);
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(true) => {}
            Ok(false) => panic!("relsyncd of {} exited before listening", n.name),
            Err(_) => panic!(
                "relsyncd of {} did not report listening within 30 s",
                n.name
            ),
        }
    }

    /// Kills node `i`'s relsyncd at once (SIGKILL), as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Bytes the source namespace has sent on its link so far (every packet: payload, QUIC and
    /// IP overhead, handshakes).
    pub fn source_tx_bytes(&self) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.src_ns, "cat"])
            .arg("/sys/class/net/eth0/statistics/tx_bytes")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    pub fn fleet_file(&self) -> PathBuf {
        self.tmp.path().join("fleet.toml")
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    /// `relsync ARGS` in the source namespace, with this fleet's client key and cache.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.src_ns])
            .arg(env!("CARGO_BIN_EXE_relsync"))
            .args(args)
            .env("RELSYNC_CONFIG_DIR", self.path("client"))
            .env("RELSYNC_CACHE_DIR", self.path("cache"))
            .env_remove("RELSYNC_IDENTITY")
            .env_remove("RELSYNC_KNOWN_HOSTS");
        c
    }

    pub fn relsync(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Deleting a namespace deletes its interfaces, and a veth goes with its peer.
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

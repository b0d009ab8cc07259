//! The fleet file (TOML): hosts with their pinned keys, and groups of hosts with their settings.
//!
//! ```toml
//! [hosts.web1]
//! address = "10.0.0.11"          # HOST[:PORT], port 7171 by default
//! key = "SHA256:…"               # the daemon's key, as `relsyncd --check` prints it
//!
//! [groups.web]
//! hosts = ["web1", "web2"]
//! app = "shop"                   # the app on each host's relsyncd
//! waves = "1,10%,100%"           # optional, default 1,10%,100%
//! max_failed = 0                 # optional: hosts (or "10%") that may fail staging
//! ```
//!
//! A host's `key` pins it for fleet commands the way a known-hosts line does for single ones, so
//! fleet hosts need no known-hosts entry, and a daemon presenting another key is refused. Every
//! value is checked when the file is loaded, and an error names the key (`hosts.web1.address`)
//! and what to write instead.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sync_core::wire::AppName;

use super::wave::{MaxFailed, Waves};
use crate::client::target::host_port_with_default;
use crate::client::Target;
use crate::tls::Fingerprint;

/// A fleet file is a few lines per host; this bounds what a wrong path makes us read.
const MAX_FILE: u64 = 64 << 20;

/// Why a fleet file could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InventoryError {
    #[error("cannot read fleet file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fleet file {}: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("fleet file {}: `{key}` {problem}", path.display())]
    Value {
        path: PathBuf,
        key: String,
        problem: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    #[serde(default)]
    hosts: BTreeMap<String, RawHost>,
    #[serde(default)]
    groups: BTreeMap<String, RawGroup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    address: String,
    key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    hosts: Vec<String>,
    app: String,
    waves: Option<String>,
    max_failed: Option<RawCount>,
}

/// `max_failed = 2` or `max_failed = "10%"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawCount {
    Number(i64),
    Text(String),
}

/// One daemon of the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetHost {
    pub name: String,
    /// `host:port`, normalized (host lower-cased, default port supplied).
    pub address: String,
    /// The key the daemon must present.
    pub key: Fingerprint,
}

impl FleetHost {
    /// The target for `app` on this host.
    pub fn target(&self, app: &AppName) -> Target {
        Target::parse(&format!("{}/{app}", self.address))
            .expect("the address was checked when the fleet file was loaded")
    }
}

/// A named list of hosts and the settings for pushing to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    /// Host names, in the order given (the order hosts are put into waves).
    pub hosts: Vec<String>,
    pub app: AppName,
    pub waves: Option<Waves>,
    pub max_failed: Option<MaxFailed>,
}

/// A loaded, validated fleet file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    path: PathBuf,
    hosts: BTreeMap<String, FleetHost>,
    groups: BTreeMap<String, Group>,
}

/// Host and group names: what a person types on the command line.
fn name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && !n.starts_with(['.', '-'])
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Inventory {
    pub fn load(path: &Path) -> Result<Inventory, InventoryError> {
        let read = |source| InventoryError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        if meta.len() > MAX_FILE {
            return Err(InventoryError::Syntax {
                path: path.to_owned(),
                message: format!("is larger than {MAX_FILE} bytes; is it really a fleet file?"),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Inventory::parse(&text, path)
    }

    /// Parses and validates `text`; `path` is used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Inventory, InventoryError> {
        let raw: RawInventory = toml::from_str(text).map_err(|e| InventoryError::Syntax {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let bad = |key: &str, problem: String| InventoryError::Value {
            path: path.to_owned(),
            key: key.to_owned(),
            problem,
        };
        if raw.hosts.is_empty() {
            return Err(bad(
                "hosts",
                "is empty; declare each daemon as [hosts.NAME] with `address` and `key`".into(),
            ));
        }
        let mut hosts = BTreeMap::new();
        let mut by_address: HashMap<String, String> = HashMap::new();
        for (name, h) in raw.hosts {
            let prefix = format!("hosts.{name}");
            if !name_ok(&name) {
                return Err(bad(
                    &prefix,
                    "is not a valid host name (letters, digits, -, _ and .)".into(),
                ));
            }
            let address = host_port_with_default(&h.address).map_err(|e| {
                bad(
                    &format!("{prefix}.address"),
                    format!("is {:?}: {e}", h.address),
                )
            })?;
            if let Some(first) = by_address.insert(address.clone(), name.clone()) {
                return Err(bad(
                    &format!("{prefix}.address"),
                    format!("is {address}, the address of host {first} too; list each daemon once"),
                ));
            }
            let key = h.key.parse::<Fingerprint>().map_err(|_| {
                bad(
                    &format!("{prefix}.key"),
                    format!(
                        "is {:?}, not a key fingerprint; `relsyncd --check` on the host prints it (SHA256:…)",
                        h.key
                    ),
                )
            })?;
            hosts.insert(name.clone(), FleetHost { name, address, key });
        }
        let mut groups = BTreeMap::new();
        for (name, g) in raw.groups {
            let prefix = format!("groups.{name}");
            if !name_ok(&name) {
                return Err(bad(
                    &prefix,
                    "is not a valid group name (letters, digits, -, _ and .)".into(),
                ));
            }
            if g.hosts.is_empty() {
                return Err(bad(
                    &format!("{prefix}.hosts"),
                    "is empty; list the names of its hosts".into(),
                ));
            }
            let mut seen = Vec::with_capacity(g.hosts.len());
            for h in &g.hosts {
                if !hosts.contains_key(h) {
                    return Err(bad(
                        &format!("{prefix}.hosts"),
                        format!("names {h:?}, which is not declared; add [hosts.{h}] or remove it"),
                    ));
                }
                if seen.contains(&h) {
                    return Err(bad(
                        &format!("{prefix}.hosts"),
                        format!("names {h:?} twice"),
                    ));
                }
                seen.push(h);
            }
            let app = AppName::new(g.app.as_str())
                .map_err(|e| bad(&format!("{prefix}.app"), format!("is {:?}: {e}", g.app)))?;
            let waves = g
                .waves
                .as_deref()
                .map(|w| w.parse::<Waves>())
                .transpose()
                .map_err(|e| bad(&format!("{prefix}.waves"), e.to_string()))?;
            let max_failed = match g.max_failed {
                None => None,
                Some(RawCount::Number(n)) if n >= 0 => Some(if n == 0 {
                    MaxFailed::None
                } else {
                    MaxFailed::Hosts(n as u64)
                }),
                Some(RawCount::Number(n)) => {
                    return Err(bad(
                        &format!("{prefix}.max_failed"),
                        format!("is {n}; write a host count (0, 2) or a percentage (\"10%\")"),
                    ))
                }
                Some(RawCount::Text(t)) => Some(
                    t.parse::<MaxFailed>()
                        .map_err(|e| bad(&format!("{prefix}.max_failed"), e.to_string()))?,
                ),
            };
            groups.insert(
                name.clone(),
                Group {
                    name,
                    hosts: g.hosts,
                    app,
                    waves,
                    max_failed,
                },
            );
        }
        if groups.is_empty() {
            return Err(bad(
                "groups",
                "is empty; declare at least one [groups.NAME] with `hosts` and `app`".into(),
            ));
        }
        Ok(Inventory {
            path: path.to_owned(),
            hosts,
            groups,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn host(&self, name: &str) -> Option<&FleetHost> {
        self.hosts.get(name)
    }

    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups.get(name)
    }

    /// Hosts by name.
    pub fn hosts(&self) -> impl Iterator<Item = &FleetHost> {
        self.hosts.values()
    }

    /// Groups by name.
    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::wave::Mark;

    const FP: &str = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU";

    fn base() -> String {
        format!(
            "[hosts.web1]\naddress = \"10.0.0.11\"\nkey = \"{FP}\"\n\
             [hosts.web2]\naddress = \"Web2.example.com:9000\"\nkey = \"{FP}\"\n\
             [groups.web]\nhosts = [\"web2\", \"web1\"]\napp = \"shop\"\nwaves = \"1,50%\"\nmax_failed = \"10%\"\n"
        )
    }

    #[test]
    fn a_good_fleet_file_loads() {
        let inv = Inventory::parse(&base(), Path::new("fleet.toml")).unwrap();
        let web1 = inv.host("web1").unwrap();
        assert_eq!(web1.address, "10.0.0.11:7171");
        assert_eq!(web1.key.to_string(), FP);
        assert_eq!(inv.host("web2").unwrap().address, "web2.example.com:9000");
        let g = inv.group("web").unwrap();
        assert_eq!(g.hosts, ["web2", "web1"]);
        assert_eq!(g.app.as_str(), "shop");
        assert_eq!(
            g.waves.as_ref().unwrap().marks(),
            [Mark::Hosts(1), Mark::Percent(50)]
        );
        assert_eq!(g.max_failed, Some(MaxFailed::Percent(10)));
        assert_eq!(
            web1.target(&g.app).to_string(),
            "10.0.0.11:7171/shop",
            "the target a push uses"
        );
        let counted = base().replace("max_failed = \"10%\"", "max_failed = 2");
        let inv = Inventory::parse(&counted, Path::new("f.toml")).unwrap();
        assert_eq!(
            inv.group("web").unwrap().max_failed,
            Some(MaxFailed::Hosts(2))
        );
    }

    #[test]
    fn the_example_fleet_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fleet.example.toml");
        let inv = Inventory::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(inv.groups().count() >= 1);
        assert!(inv.hosts().count() >= 2);
    }

    #[test]
    fn every_bad_value_names_its_key() {
        let table: &[(&str, &str, &str)] = &[
            (
                "address = \"10.0.0.11\"",
                "address = \"10.0.0.11:0\"",
                "`hosts.web1.address`",
            ),
            (
                "address = \"10.0.0.11\"",
                "address = \"::1\"",
                "`hosts.web1.address`",
            ),
            (
                "address = \"10.0.0.11\"",
                "address = \"web2.example.com:9000\"",
                "host web1 too",
            ),
            (
                &format!("key = \"{FP}\"\n[hosts.web2]"),
                "key = \"SHA256:nope\"\n[hosts.web2]",
                "`hosts.web1.key`",
            ),
            ("[hosts.web1]", "[hosts.\"web 1\"]", "`hosts.web 1`"),
            (
                "[\"web2\", \"web1\"]",
                "[\"web2\", \"web3\"]",
                "`groups.web.hosts`",
            ),
            ("[\"web2\", \"web1\"]", "[\"web2\", \"web2\"]", "twice"),
            ("[\"web2\", \"web1\"]", "[]", "`groups.web.hosts` is empty"),
            ("app = \"shop\"", "app = \"sh op\"", "`groups.web.app`"),
            (
                "waves = \"1,50%\"",
                "waves = \"1,0%\"",
                "`groups.web.waves`",
            ),
            (
                "max_failed = \"10%\"",
                "max_failed = \"lots\"",
                "`groups.web.max_failed`",
            ),
            (
                "max_failed = \"10%\"",
                "max_failed = -1",
                "`groups.web.max_failed`",
            ),
            ("[groups.web]", "[groups.\"a/b\"]", "`groups.a/b`"),
            (
                "app = \"shop\"",
                "app = \"shop\"\ncolour = 1",
                "unknown field",
            ),
            ("app = \"shop\"\n", "", "missing field `app`"),
        ];
        for (from, to, want) in table {
            let text = base().replacen(from, to, 1);
            assert_ne!(text, base(), "{from:?} is not in the base file");
            let err = Inventory::parse(&text, Path::new("f.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{to:?}: {err}");
            assert!(err.contains("f.toml"), "{err}");
        }
        let no_groups = base().split("[groups.web]").next().unwrap().to_owned();
        let err = Inventory::parse(&no_groups, Path::new("f.toml")).unwrap_err();
        assert!(err.to_string().contains("`groups` is empty"), "{err}");
        let err = Inventory::parse("", Path::new("f.toml")).unwrap_err();
        assert!(err.to_string().contains("`hosts` is empty"), "{err}");
    }
}

//! relsyncd's configuration file (TOML).
//!
//! ```toml
//! listen = "0.0.0.0:7171"
//! key = "/etc/relsync/daemon.key"
//! cert = "/etc/relsync/daemon.crt"
//!
//! [limits]                       # all optional; defaults shown in wire::Limits
//! max_frame = 67108864
//! message_timeout_secs = 30
//!
//! [apps.shop]
//! root = "/var/www/shop"
//! keep = 5
//! shared = ["storage", ".env"]
//! authorized_keys = ["SHA256:…"]
//! accept_relayed = true           # take relayed fleet pushes (see below); default false
//! prestage = true                 # keep the next release's tree ready (see below); default true
//!
//! [exports.assets]               # directories `relsync sync` may mirror into
//! path = "/srv/static"
//! authorized_keys = ["SHA256:…"]
//! ```
//!
//! `accept_relayed` lets another daemon push a release of the app on behalf of an authorized
//! client (`relsync push --fleet --relay`): the TLS layer then admits any key, and a key the app
//! does not authorize may only push, only with a relay ticket that an authorized key signed for
//! exactly that release and that relay key, and never activate.
//!
//! `prestage` keeps, under `ROOT/.relsync/next/`, a copy of the current release's tree made of
//! hard links (its directories, its files linked, its symlinks), made in the background whenever
//! the app is idle. A push on top of the current release starts from it and only changes what
//! differs, instead of making every directory and link while the client waits. It costs one
//! directory inode per directory of the release. `false` builds every release from scratch.
//!
//! Every value is checked when the file is loaded, and an error names the key (`apps.shop.root`)
//! and what to write instead.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sync_core::activation::ActivationConfig;
use sync_core::wire::Limits;
use sync_core::RelPath;

use crate::tls::Fingerprint;

/// Port relsyncd listens on when the config does not say.
pub const DEFAULT_PORT: u16 = 7171;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config {path}: `{key}` {problem}")]
    Value {
        path: PathBuf,
        key: String,
        problem: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    key: Option<PathBuf>,
    cert: Option<PathBuf>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    apps: BTreeMap<String, RawApp>,
    #[serde(default)]
    exports: BTreeMap<String, RawExport>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_frame: Option<u32>,
    max_manifest_entries: Option<u64>,
    max_manifest_bytes: Option<u64>,
    max_streams: Option<u32>,
    max_bytes_in_flight: Option<u64>,
    message_timeout_secs: Option<u64>,
    push_timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    root: PathBuf,
    keep: Option<usize>,
    #[serde(default)]
    shared: Vec<String>,
    #[serde(default)]
    authorized_keys: Vec<String>,
    #[serde(default)]
    accept_relayed: bool,
    #[serde(default = "yes")]
    prestage: bool,
    /// The activation pipeline (hooks, php-fpm reload, OPcache reset, health checks), in the same
    /// form as an app root's own `[activation]` table.
    #[serde(default)]
    activation: Option<ActivationConfig>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExport {
    path: PathBuf,
    #[serde(default)]
    authorized_keys: Vec<String>,
}

/// One app the daemon deploys releases of.
#[derive(Debug, Clone, PartialEq)]
pub struct AppConfig {
    pub name: String,
    pub root: PathBuf,
    pub keep: Option<usize>,
    pub shared: Vec<RelPath>,
    pub authorized: HashSet<Fingerprint>,
    /// Take pushes from relays holding a ticket signed by an authorized key.
    pub accept_relayed: bool,
    /// Keep the current release's tree prestaged for the next push (`.relsync/next/`).
    pub prestage: bool,
    /// Runs instead of the app root's `.relsync/config.toml` `[activation]` table when set.
    pub activation: Option<ActivationConfig>,
}

/// One directory that `relsync sync` may mirror into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    pub name: String,
    pub path: PathBuf,
    pub authorized: HashSet<Fingerprint>,
}

/// The validated daemon configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    pub key: PathBuf,
    pub cert: PathBuf,
    pub limits: Limits,
    pub apps: BTreeMap<String, AppConfig>,
    pub exports: BTreeMap<String, ExportConfig>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`; `path` is used in messages and to resolve relative key paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let bad = |key: &str, problem: String| ConfigError::Value {
            path: path.to_owned(),
            key: key.to_owned(),
            problem,
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let listen = match raw.listen.as_deref() {
            None => SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            Some(s) => s.parse().map_err(|_| {
                bad(
                    "listen",
                    format!(
                        "is {s:?}; write an address and port such as \"0.0.0.0:{DEFAULT_PORT}\""
                    ),
                )
            })?,
        };
        let key = base.join(raw.key.ok_or_else(|| {
            bad(
                "key",
                "is missing; create one with `relsync keygen --name daemon`".into(),
            )
        })?);
        let cert = base.join(raw.cert.ok_or_else(|| {
            bad(
                "cert",
                "is missing; it is written next to the key by `relsync keygen`".into(),
            )
        })?);
        let d = Limits::default();
        let l = &raw.limits;
        let positive = |key: &str, v: Option<u64>, default: u64| -> Result<u64, ConfigError> {
            match v {
                Some(0) => Err(bad(key, "must be greater than 0".into())),
                Some(v) => Ok(v),
                None => Ok(default),
            }
        };
        let limits = Limits {
            max_frame: positive(
                "limits.max_frame",
                l.max_frame.map(u64::from),
                d.max_frame.into(),
            )?
            .try_into()
            .expect("came from a u32"),
            max_manifest_entries: positive(
                "limits.max_manifest_entries",
                l.max_manifest_entries,
                d.max_manifest_entries,
            )?,
            max_manifest_bytes: positive(
                "limits.max_manifest_bytes",
                l.max_manifest_bytes,
                d.max_manifest_bytes,
            )?,
            max_streams: positive(
                "limits.max_streams",
                l.max_streams.map(u64::from),
                d.max_streams.into(),
            )?
            .try_into()
            .expect("came from a u32"),
            max_bytes_in_flight: positive(
                "limits.max_bytes_in_flight",
                l.max_bytes_in_flight,
                d.max_bytes_in_flight,
            )?,
            message_timeout_ms: positive(
                "limits.message_timeout_secs",
                l.message_timeout_secs,
                d.message_timeout_ms / 1000,
            )?
            .saturating_mul(1000),
            push_timeout_ms: positive(
                "limits.push_timeout_secs",
                l.push_timeout_secs,
                d.push_timeout_ms / 1000,
            )?
            .saturating_mul(1000),
        };
        let keys = |prefix: &str, v: &[String]| -> Result<HashSet<Fingerprint>, ConfigError> {
            v.iter()
                .map(|s| {
                    s.parse::<Fingerprint>().map_err(|_| {
                        bad(
                            &format!("{prefix}.authorized_keys"),
                            format!("has {s:?}, not a key fingerprint; `relsync keygen` prints one (SHA256:…)"),
                        )
                    })
                })
                .collect()
        };
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= 64
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        let mut apps = BTreeMap::new();
        for (name, a) in raw.apps {
            let prefix = format!("apps.{name}");
            if !name_ok(&name) {
                return Err(bad(
                    &prefix,
                    "is not a valid app name (letters, digits, - and _)".into(),
                ));
            }
            if !a.root.is_absolute() {
                return Err(bad(
                    &format!("{prefix}.root"),
                    format!("is {:?}; use an absolute path", a.root),
                ));
            }
            if a.keep == Some(0) {
                return Err(bad(&format!("{prefix}.keep"), "must be at least 1".into()));
            }
            let shared = a
                .shared
                .iter()
                .map(|s| {
                    RelPath::new(s.trim_end_matches('/'))
                        .map_err(|e| bad(&format!("{prefix}.shared"), format!("has {s:?}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(act) = &a.activation {
                act.validate()
                    .map_err(|e| bad(&format!("{prefix}.{}", e.key), e.reason.clone()))?;
            }
            let authorized = keys(&prefix, &a.authorized_keys)?;
            if authorized.is_empty() {
                return Err(bad(
                    &format!("{prefix}.authorized_keys"),
                    "is empty; nobody could push to this app (add the fingerprint `relsync keygen` printed)".into(),
                ));
            }
            apps.insert(
                name.clone(),
                AppConfig {
                    name,
                    root: a.root,
                    keep: a.keep,
                    shared,
                    authorized,
                    accept_relayed: a.accept_relayed,
                    prestage: a.prestage,
                    activation: a.activation,
                },
            );
        }
        let mut exports = BTreeMap::new();
        for (name, e) in raw.exports {
            let prefix = format!("exports.{name}");
            if !name_ok(&name) {
                return Err(bad(
                    &prefix,
                    "is not a valid export name (letters, digits, - and _)".into(),
                ));
            }
            if !e.path.is_absolute() {
                return Err(bad(
                    &format!("{prefix}.path"),
                    format!("is {:?}; use an absolute path", e.path),
                ));
            }
            let authorized = keys(&prefix, &e.authorized_keys)?;
            if authorized.is_empty() {
                return Err(bad(
                    &format!("{prefix}.authorized_keys"),
                    "is empty; nobody could sync into it".into(),
                ));
            }
            exports.insert(
                name.clone(),
                ExportConfig {
                    name,
                    path: e.path,
                    authorized,
                },
            );
        }
        if apps.is_empty() && exports.is_empty() {
            return Err(bad(
                "apps",
                "is empty; declare at least one [apps.NAME] or [exports.NAME]".into(),
            ));
        }
        Ok(Config {
            listen,
            key,
            cert,
            limits,
            apps,
            exports,
        })
    }

    /// Whether some app takes relayed pushes: the TLS layer then admits every key, and the
    /// session decides.
    pub fn accepts_relayed(&self) -> bool {
        self.apps.values().any(|a| a.accept_relayed)
    }

    /// Every key authorized anywhere: the set the TLS layer admits at handshake.
    pub fn all_keys(&self) -> HashSet<Fingerprint> {
        self.apps
            .values()
            .flat_map(|a| a.authorized.iter())
            .chain(self.exports.values().flat_map(|e| e.authorized.iter()))
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU";

    fn base() -> String {
        format!(
            "listen = \"127.0.0.1:9000\"\nkey = \"d.key\"\ncert = \"d.crt\"\n[apps.shop]\nroot = \"/srv/shop\"\nshared = [\"storage/\"]\nauthorized_keys = [\"{FP}\"]\n"
        )
    }

    #[test]
    fn a_good_config_loads() {
        let c = Config::parse(&base(), Path::new("/etc/relsync/relsyncd.toml")).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(c.key, Path::new("/etc/relsync/d.key"));
        let shop = &c.apps["shop"];
        assert_eq!(shop.shared[0].as_str(), "storage");
        assert_eq!(c.all_keys().len(), 1);
        assert_eq!(c.limits, Limits::default());
        assert!(!shop.accept_relayed && !c.accepts_relayed());
        let relayed = base().replace("authorized_keys", "accept_relayed = true\nauthorized_keys");
        let c = Config::parse(&relayed, Path::new("r.toml")).unwrap();
        assert!(c.apps["shop"].accept_relayed && c.accepts_relayed());
        let bad = base().replace("authorized_keys", "accept_relayed = 1\nauthorized_keys");
        assert!(Config::parse(&bad, Path::new("r.toml")).is_err());
        assert!(shop.prestage, "prestaging is on unless turned off");
        let off = base().replace("authorized_keys", "prestage = false\nauthorized_keys");
        assert!(!Config::parse(&off, Path::new("r.toml")).unwrap().apps["shop"].prestage);
    }

    #[test]
    fn activation_tables_are_validated_at_load() {
        let ok = format!(
            "{}[apps.shop.activation]\nhealth_check = [{{ url = \"http://127.0.0.1:8080/health\" }}]\n",
            base()
        );
        let c = Config::parse(&ok, Path::new("r.toml")).unwrap();
        assert!(c.apps["shop"].activation.is_some());
        let bad = format!("{}[apps.shop.activation]\nfpm_sockets = [\"\"]\n", base());
        let err = Config::parse(&bad, Path::new("r.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("r.toml") && err.contains("apps.shop.fpm_sockets"),
            "{err}"
        );
        let unknown = format!("{}[apps.shop.activation]\nfpm_relaod = 3\n", base());
        assert!(Config::parse(&unknown, Path::new("r.toml")).is_err());
    }

    #[test]
    fn every_bad_value_names_its_key() {
        let table: &[(&str, &str, &str)] = &[
            (
                "listen = \"127.0.0.1:9000\"",
                "listen = \"nowhere\"",
                "`listen`",
            ),
            ("key = \"d.key\"\n", "", "`key`"),
            (
                "root = \"/srv/shop\"",
                "root = \"srv/shop\"",
                "`apps.shop.root`",
            ),
            (
                "shared = [\"storage/\"]",
                "shared = [\"../etc\"]",
                "`apps.shop.shared`",
            ),
            (FP, "SHA256:nope", "`apps.shop.authorized_keys`"),
            ("[apps.shop]", "[apps.\"sh op\"]", "`apps.sh op`"),
            (
                "[apps.shop]",
                "[limits]\nmax_frame = 0\n[apps.shop]",
                "`limits.max_frame`",
            ),
            ("shared = [\"storage/\"]", "keep = 0", "`apps.shop.keep`"),
            ("shared = [\"storage/\"]", "prestage = \"yes\"", "prestage"),
            (
                "shared = [\"storage/\"]",
                "colour = \"red\"",
                "unknown field",
            ),
        ];
        for (from, to, want) in table {
            let text = base().replacen(from, to, 1);
            let err = Config::parse(&text, Path::new("r.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{to:?}: {err}");
            assert!(err.contains("r.toml"), "{err}");
        }
        let no_keys = base().replace(&format!("[\"{FP}\"]"), "[]");
        assert!(Config::parse(&no_keys, Path::new("r.toml"))
            .unwrap_err()
            .to_string()
            .contains("is empty"));
    }
}

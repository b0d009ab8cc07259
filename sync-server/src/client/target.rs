//! Where a remote command goes: `HOST[:PORT]/APP`, and the rule that tells it from a local path.
//!
//! The CLI takes both local app roots and remote targets in the same argument, so the shape of a
//! remote target is deliberately narrow ([`looks_remote`]): no leading `/`, `.` or `~`, exactly
//! one `/`, something on each side of it. `/var/www/app`, `./app`, `../app`, `~/app` and `app` are
//! therefore always local; `web1/shop`, `web1:7171/shop` and `[::1]/shop` are remote. A relative
//! path of exactly two components that exists locally is ambiguous, and callers refuse it.
//!
//! `relsync sync` names its remote destination unambiguously with a scheme instead:
//! `relsync://HOST[:PORT]/EXPORT[/PATH]` ([`SyncTarget`]).

use std::fmt;
use std::str::FromStr;

use sync_core::path::{PathError, RelPath};
use sync_core::wire::{AppName, NameError};

use crate::config::DEFAULT_PORT;
use crate::tls::{normalize_host_port, HostPortError};

/// A daemon and an app on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// Host as written, lower-cased; IPv6 literals keep their brackets.
    host: String,
    port: u16,
    app: AppName,
}

/// Why text is not a `HOST[:PORT]/APP` target.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    #[error("{0:?} is not a remote target; write HOST[:PORT]/APP, e.g. web1.example.com/shop or 10.0.0.5:7171/shop")]
    Shape(String),
    #[error("{text:?}: {source}")]
    Host {
        text: String,
        #[source]
        source: HostPortError,
    },
    #[error("{text:?}: write IPv6 addresses in brackets, e.g. [2001:db8::1]:7171")]
    BareIpv6 { text: String },
    #[error("{text:?}: app {source}")]
    App {
        text: String,
        #[source]
        source: NameError,
    },
    #[error("{0:?} is not a sync destination; write relsync://HOST[:PORT]/EXPORT[/PATH], e.g. relsync://web1.example.com/assets/img")]
    SyncShape(String),
    #[error("{text:?}: path below the export: {source}")]
    Path {
        text: String,
        #[source]
        source: PathError,
    },
}

/// The scheme that marks a sync destination.
pub const SYNC_SCHEME: &str = "relsync://";

/// Whether `text` names a sync destination on a daemon rather than a local directory.
pub fn is_sync_url(text: &str) -> bool {
    text.starts_with(SYNC_SCHEME)
}

/// A directory in an export of a daemon: `relsync://HOST[:PORT]/EXPORT[/PATH]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SyncTarget {
    /// The daemon, with the export as its app name (what `Hello` and the connection name).
    target: Target,
    path: Option<RelPath>,
}

impl SyncTarget {
    /// Parses `relsync://HOST[:PORT]/EXPORT[/PATH]`; trailing slashes are ignored.
    pub fn parse(text: &str) -> Result<SyncTarget, TargetError> {
        let shape = || TargetError::SyncShape(text.chars().take(300).collect());
        let rest = text.strip_prefix(SYNC_SCHEME).ok_or_else(shape)?;
        let (host_port, rest) = rest.split_once('/').ok_or_else(shape)?;
        let rest = rest.trim_end_matches('/');
        let (export, path) = match rest.split_once('/') {
            Some((e, p)) => (e, Some(p)),
            None => (rest, None),
        };
        if host_port.is_empty() || export.is_empty() {
            return Err(shape());
        }
        let export = AppName::new(export).map_err(|source| TargetError::App {
            text: text.to_owned(),
            source,
        })?;
        let path = path
            .map(|p| {
                RelPath::new(p).map_err(|source| TargetError::Path {
                    text: text.to_owned(),
                    source,
                })
            })
            .transpose()?;
        Ok(SyncTarget {
            target: Target::with_host_port(host_port, export, text)?,
            path,
        })
    }

    /// The daemon, with the export in place of an app.
    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn export(&self) -> &AppName {
        self.target.app()
    }

    /// The directory below the export; `None` for the export itself.
    pub fn path(&self) -> Option<&RelPath> {
        self.path.as_ref()
    }

    /// Where a sync of `src` lands, rsync-style (as `edge::mirror::mirror_destination` for local
    /// paths): `src/` fills this directory, `src` without the slash lands in `<this>/<name of
    /// src>`.
    pub fn destination_for(&self, src: &str) -> Result<SyncTarget, TargetError> {
        let name = std::path::Path::new(src).file_name();
        let path = match name {
            _ if src.ends_with('/') => self.path.clone(),
            None => self.path.clone(),
            Some(name) => {
                let bad = |source| TargetError::Path {
                    text: src.to_owned(),
                    source,
                };
                let name = name
                    .to_str()
                    .ok_or_else(|| bad(PathError::NotUtf8(name.to_string_lossy().into_owned())))?;
                let joined = match &self.path {
                    Some(p) => p.join(name),
                    None => RelPath::new(name),
                };
                Some(joined.map_err(bad)?)
            }
        };
        Ok(SyncTarget {
            target: self.target.clone(),
            path,
        })
    }
}

impl fmt::Display for SyncTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SYNC_SCHEME}{}:{}/{}",
            self.target.host, self.target.port, self.target.app
        )?;
        match &self.path {
            Some(p) => write!(f, "/{p}"),
            None => Ok(()),
        }
    }
}

/// Whether `text` has the shape of a remote target (see the module docs). It may still fail to
/// parse; a local path never has this shape unless it is a relative path of two components.
pub fn looks_remote(text: &str) -> bool {
    if text.starts_with(['/', '.', '~']) {
        return false;
    }
    match text.split_once('/') {
        Some((host, app)) => !host.is_empty() && !app.is_empty() && !app.contains('/'),
        None => false,
    }
}

impl Target {
    /// Parses `HOST[:PORT]/APP`; the port defaults to [`DEFAULT_PORT`].
    pub fn parse(text: &str) -> Result<Target, TargetError> {
        if !looks_remote(text) {
            return Err(TargetError::Shape(text.chars().take(300).collect()));
        }
        let (host_port, app) = text.split_once('/').expect("checked by looks_remote");
        let app = AppName::new(app).map_err(|source| TargetError::App {
            text: text.to_owned(),
            source,
        })?;
        Target::with_host_port(host_port, app, text)
    }

    fn with_host_port(host_port: &str, app: AppName, text: &str) -> Result<Target, TargetError> {
        let (host, port) = split_host_port(host_port, text)?;
        let normalized =
            normalize_host_port(&format!("{host}:{port}")).map_err(|source| TargetError::Host {
                text: text.to_owned(),
                source,
            })?;
        let (host, port) = normalized
            .rsplit_once(':')
            .expect("normalize_host_port keeps the port");
        Ok(Target {
            host: host.to_owned(),
            port: port.parse().expect("normalize_host_port checked the port"),
            app,
        })
    }

    /// The host as written (IPv6 literals in brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The host as a resolver and TLS name take it (IPv6 literals without brackets).
    pub fn bare_host(&self) -> &str {
        self.host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&self.host)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn app(&self) -> &AppName {
        &self.app
    }

    /// `host:port`, the form known-hosts entries use.
    pub fn host_port(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Splits `HOST[:PORT]`, supplying the default port.
fn split_host_port<'a>(host_port: &'a str, text: &str) -> Result<(&'a str, String), TargetError> {
    let bad_port = |source| TargetError::Host {
        text: text.to_owned(),
        source,
    };
    if host_port.starts_with('[') {
        return match host_port.rsplit_once("]:") {
            Some((h, p)) => Ok((&host_port[..h.len() + 1], p.to_owned())),
            None => Ok((host_port, DEFAULT_PORT.to_string())),
        };
    }
    match host_port.matches(':').count() {
        0 => Ok((host_port, DEFAULT_PORT.to_string())),
        1 => {
            let (h, p) = host_port.split_once(':').expect("one colon");
            if p.is_empty() {
                return Err(bad_port(HostPortError::Port(host_port.to_owned())));
            }
            Ok((h, p.to_owned()))
        }
        _ => Err(TargetError::BareIpv6 {
            text: text.to_owned(),
        }),
    }
}

/// `HOST[:PORT]` with the default port supplied and the host normalized, as `relsync trust`
/// takes it.
pub fn host_port_with_default(text: &str) -> Result<String, TargetError> {
    let (host, port) = split_host_port(text, text)?;
    normalize_host_port(&format!("{host}:{port}")).map_err(|source| TargetError::Host {
        text: text.to_owned(),
        source,
    })
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.host, self.port, self.app)
    }
}

impl FromStr for Target {
    type Err = TargetError;
    fn from_str(s: &str) -> Result<Target, TargetError> {
        Target::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_never_look_remote() {
        for local in [
            "/var/www/app",
            "/app",
            "./app",
            "./www/app",
            "../www/app",
            "~/www/app",
            ".hidden/app",
            "app",
            "a/b/c",
            "host/",
            "/host/app",
            "host/app/",
            "",
            "/",
        ] {
            assert!(!looks_remote(local), "{local}");
            assert!(
                matches!(Target::parse(local), Err(TargetError::Shape(_))),
                "{local}"
            );
        }
    }

    #[test]
    fn targets_parse_with_default_port() {
        let table = [
            ("web1/shop", "web1", 7171, "shop", "web1:7171/shop"),
            (
                "Web1.Example.com:9000/shop",
                "web1.example.com",
                9000,
                "shop",
                "web1.example.com:9000/shop",
            ),
            (
                "10.0.0.5/my-app_2",
                "10.0.0.5",
                7171,
                "my-app_2",
                "10.0.0.5:7171/my-app_2",
            ),
            (
                "127.0.0.1:7000/a",
                "127.0.0.1",
                7000,
                "a",
                "127.0.0.1:7000/a",
            ),
            ("[::1]/shop", "[::1]", 7171, "shop", "[::1]:7171/shop"),
            (
                "[2001:db8::1]:8000/shop",
                "[2001:db8::1]",
                8000,
                "shop",
                "[2001:db8::1]:8000/shop",
            ),
        ];
        for (text, host, port, app, shown) in table {
            let t = Target::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(
                (t.host(), t.port(), t.app().as_str()),
                (host, port, app),
                "{text}"
            );
            assert_eq!(t.to_string(), shown);
            assert_eq!(t.host_port(), shown.rsplit_once('/').unwrap().0);
            assert_eq!(
                Target::parse(&t.to_string()).unwrap(),
                t,
                "round trip {text}"
            );
        }
        assert_eq!(Target::parse("[::1]/a").unwrap().bare_host(), "::1");
        assert_eq!(Target::parse("h/a").unwrap().bare_host(), "h");
    }

    #[test]
    fn malformed_targets_say_what_is_wrong() {
        type Check = fn(&TargetError) -> bool;
        let table: [(&str, Check); 9] = [
            ("web1:0/shop", |e| matches!(e, TargetError::Host { .. })),
            ("web1:99999/shop", |e| matches!(e, TargetError::Host { .. })),
            ("web1:/shop", |e| matches!(e, TargetError::Host { .. })),
            ("web1:x/shop", |e| matches!(e, TargetError::Host { .. })),
            ("::1/shop", |e| matches!(e, TargetError::BareIpv6 { .. })),
            ("[::1/shop", |e| matches!(e, TargetError::Host { .. })),
            ("web 1/shop", |e| matches!(e, TargetError::Host { .. })),
            ("web1/.shop", |e| matches!(e, TargetError::App { .. })),
            ("web1/sh op", |e| matches!(e, TargetError::App { .. })),
        ];
        for (text, want) in table {
            let e = Target::parse(text).expect_err(text);
            assert!(want(&e), "{text}: {e:?}");
            assert!(e.to_string().contains(text), "{text}: {e}");
        }
    }

    #[test]
    fn sync_targets_parse_and_follow_the_trailing_slash_rule() {
        let table = [
            ("relsync://web1/assets", "web1", 7171, "assets", None),
            (
                "relsync://web1:9000/assets/img/2024/",
                "web1",
                9000,
                "assets",
                Some("img/2024"),
            ),
            ("relsync://[::1]:7000/a/b", "[::1]", 7000, "a", Some("b")),
        ];
        for (text, host, port, export, path) in table {
            let t = SyncTarget::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(t.target().host(), host, "{text}");
            assert_eq!(t.target().port(), port, "{text}");
            assert_eq!(t.export().as_str(), export, "{text}");
            assert_eq!(t.path().map(RelPath::as_str), path, "{text}");
            assert_eq!(SyncTarget::parse(&t.to_string()).unwrap(), t, "{text}");
        }
        let bad = [
            "web1/assets",
            "relsync://web1",
            "relsync://web1/",
            "relsync:///assets",
            "relsync://web1/.hidden",
            "relsync://web1/a/../etc",
            "relsync://web1/a/.relsync",
            "relsync://web1:0/a",
            "relsync://web1/a//b",
        ];
        for text in bad {
            assert!(SyncTarget::parse(text).is_err(), "{text}");
        }

        let t = SyncTarget::parse("relsync://h/media/img").unwrap();
        let table = [
            ("site/assets/", "relsync://h:7171/media/img"),
            ("site/assets", "relsync://h:7171/media/img/assets"),
            ("/abs/assets", "relsync://h:7171/media/img/assets"),
            ("assets/.", "relsync://h:7171/media/img/assets"),
            (".", "relsync://h:7171/media/img"),
            ("/", "relsync://h:7171/media/img"),
        ];
        for (src, want) in table {
            assert_eq!(t.destination_for(src).unwrap().to_string(), want, "{src}");
        }
        let root = SyncTarget::parse("relsync://h/media").unwrap();
        assert_eq!(
            root.destination_for("x")
                .unwrap()
                .path()
                .map(RelPath::as_str),
            Some("x")
        );
        assert_eq!(root.destination_for("x/").unwrap().path(), None);
        assert!(root.destination_for(".relsync-stuff").is_err());
    }

    #[test]
    fn trust_takes_host_with_optional_port() {
        let table = [
            ("web1", Ok("web1:7171")),
            ("WEB1:9000", Ok("web1:9000")),
            ("[::1]", Ok("[::1]:7171")),
            ("[::1]:7000", Ok("[::1]:7000")),
            ("::1", Err(())),
            ("web1:0", Err(())),
            ("", Err(())),
        ];
        for (text, want) in table {
            let got = host_port_with_default(text).ok();
            assert_eq!(got.as_deref(), want.ok(), "{text}");
        }
    }
}

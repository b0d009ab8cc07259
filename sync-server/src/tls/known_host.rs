//! The client's known-hosts file: which key each daemon `host:port` is pinned to.
//!
//! One entry a line, `host:port SHA256:…`, `#` starts a comment. A host has exactly one pinned
//! key; a second, different line for the same host is an error rather than an alternative, so a
//! stray line cannot quietly widen what is trusted. Hosts compare case-insensitively (DNS names
//! do). A missing file means nothing is trusted yet.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Fingerprint, FingerprintError};

/// The file is a handful of lines per server; this bounds what a corrupt one can make us read.
const MAX_FILE: u64 = 16 * 1024 * 1024;

/// Pinned daemon keys, by `host:port`.
#[derive(Debug, Clone)]
pub struct KnownHosts {
    path: PathBuf,
    entries: Vec<(String, Fingerprint)>,
}

/// Why the known-hosts file could not be read or updated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KnownHostsError {
    #[error("cannot {action} known-hosts file {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("known-hosts file {} is larger than {MAX_FILE} bytes; it is not a relsync known-hosts file", .0.display())]
    TooLarge(PathBuf),
    #[error("{}:{line}: expected `host:port SHA256:…`, found {text:?}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error("{}:{line}: {source}", path.display())]
    BadFingerprint {
        path: PathBuf,
        line: usize,
        #[source]
        source: FingerprintError,
    },
    #[error("{}:{line}: {source}", path.display())]
    BadHostPort {
        path: PathBuf,
        line: usize,
        #[source]
        source: HostPortError,
    },
    #[error("{}:{line}: {host_port} is already pinned to {first} on line {first_line}; keep one line per host", path.display())]
    Duplicate {
        path: PathBuf,
        line: usize,
        first_line: usize,
        host_port: String,
        first: Fingerprint,
    },
    #[error("{host_port} is already pinned to {existing} in {}; if the server was really re-keyed, delete that line first", path.display())]
    Conflict {
        path: PathBuf,
        host_port: String,
        existing: Fingerprint,
    },
    #[error(transparent)]
    HostPort(#[from] HostPortError),
}

/// A `host:port` that is not one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostPortError {
    #[error("{0:?} is not `host:port` (write IPv6 addresses as `[::1]:7878`)")]
    Shape(String),
    #[error("{0:?} has no valid port number (1-65535)")]
    Port(String),
}

/// Checks `host:port` and returns it in the form entries are compared in (host lower-cased).
pub fn normalize_host_port(text: &str) -> Result<String, HostPortError> {
    let shape = || HostPortError::Shape(text.chars().take(300).collect());
    if text.is_empty() || text.len() > 300 {
        return Err(shape());
    }
    let (host, port) = text.rsplit_once(':').ok_or_else(shape)?;
    let bad_char = |c: char| c.is_whitespace() || c.is_control() || c == '#';
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|v6| v6.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty() && !host.contains([':', '[', ']', '/']) && !host.contains(bad_char)
    };
    if !host_ok {
        return Err(shape());
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 && !port.starts_with(['+', '0']) => {}
        _ => return Err(HostPortError::Port(text.chars().take(300).collect())),
    }
    Ok(format!("{}:{port}", host.to_ascii_lowercase()))
}

impl KnownHosts {
    /// Reads `path`; a missing file gives an empty set that [`KnownHosts::add`] will create.
    pub fn load(path: &Path) -> Result<Self, KnownHostsError> {
        let entries = match read_text(path)? {
            Some(text) => parse(path, &text)?,
            None => Vec::new(),
        };
        Ok(Self {
            path: path.to_owned(),
            entries,
        })
    }

    /// The key pinned for `host_port`, if any (and `None` for text that is not `host:port`).
    pub fn lookup(&self, host_port: &str) -> Option<Fingerprint> {
        let key = normalize_host_port(host_port).ok()?;
        self.entries
            .iter()
            .find(|(hp, _)| *hp == key)
            .map(|(_, fp)| *fp)
    }

    /// Every entry, in file order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, Fingerprint)> {
        self.entries.iter().map(|(hp, fp)| (hp.as_str(), *fp))
    }

    /// The file this set was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Pins `host_port` to `fp` and writes the file (a temporary file renamed over the old one, so
    /// readers see either the old or the new file, never half a line). The file is re-read first
    /// so lines another process added meanwhile are kept. Adding the same pin again is a no-op;
    /// a different key for a pinned host is [`KnownHostsError::Conflict`].
    pub fn add(&mut self, host_port: &str, fp: Fingerprint) -> Result<(), KnownHostsError> {
        let host_port = normalize_host_port(host_port)?;
        let mut text = read_text(&self.path)?.unwrap_or_default();
        let current = parse(&self.path, &text)?;
        if let Some((_, existing)) = current.iter().find(|(hp, _)| *hp == host_port) {
            if *existing == fp {
                self.entries = current;
                return Ok(());
            }
            return Err(KnownHostsError::Conflict {
                path: self.path.clone(),
                host_port,
                existing: *existing,
            });
        }
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("{host_port} {fp}\n"));
        replace_file(&self.path, &text)?;
        self.entries = current;
        self.entries.push((host_port, fp));
        Ok(())
    }
}

fn parse(path: &Path, text: &str) -> Result<Vec<(String, Fingerprint)>, KnownHostsError> {
    let mut entries: Vec<(String, Fingerprint, usize)> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let content = raw.split('#').next().unwrap_or_default().trim();
        if content.is_empty() {
            continue;
        }
        let mut fields = content.split_whitespace();
        let (Some(hp), Some(fp), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(KnownHostsError::Syntax {
                path: path.to_owned(),
                line,
                text: raw.chars().take(200).collect(),
            });
        };
        let host_port = normalize_host_port(hp).map_err(|source| KnownHostsError::BadHostPort {
            path: path.to_owned(),
            line,
            source,
        })?;
        let fp = fp
            .parse::<Fingerprint>()
            .map_err(|source| KnownHostsError::BadFingerprint {
                path: path.to_owned(),
                line,
                source,
            })?;
        if let Some((_, first, first_line)) = entries.iter().find(|(h, _, _)| *h == host_port) {
            if *first != fp {
                return Err(KnownHostsError::Duplicate {
                    path: path.to_owned(),
                    line,
                    first_line: *first_line,
                    host_port,
                    first: *first,
                });
            }
            continue;
        }
        entries.push((host_port, fp, line));
    }
    Ok(entries.into_iter().map(|(h, f, _)| (h, f)).collect())
}

fn read_text(path: &Path) -> Result<Option<String>, KnownHostsError> {
    let io_err = |source| KnownHostsError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    };
    let file = match fs::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(io_err(err)),
    };
    let mut text = String::new();
    file.take(MAX_FILE + 1)
        .read_to_string(&mut text)
        .map_err(io_err)?;
    if text.len() as u64 > MAX_FILE {
        return Err(KnownHostsError::TooLarge(path.to_owned()));
    }
    Ok(Some(text))
}

fn replace_file(path: &Path, text: &str) -> Result<(), KnownHostsError> {
    let io_err = |action| {
        move |source| KnownHostsError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).map_err(io_err("create the directory of"))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "known_hosts".to_owned());
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{file_name}.tmp.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(io_err("create a temporary file next to"))?;
    // From here on the temporary file is ours, so removing it on failure is safe.
    let mut write = || -> io::Result<()> {
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    };
    write().map_err(|err| {
        let _ = fs::remove_file(&tmp);
        io_err("write")(err)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_normalization() {
        let table: &[(&str, Option<&str>)] = &[
            ("web1:7878", Some("web1:7878")),
            ("Web1.Example.COM:7878", Some("web1.example.com:7878")),
            ("10.0.0.1:1", Some("10.0.0.1:1")),
            ("[::1]:7878", Some("[::1]:7878")),
            ("[fe80::1]:65535", Some("[fe80::1]:65535")),
            ("web1", None),
            ("web1:", None),
            (":7878", None),
            ("web1:0", None),
            ("web1:65536", None),
            ("web1:+80", None),
            ("web1:080", None),
            ("::1:7878", None),
            ("[::1:7878", None),
            ("[nothost]:7878", None),
            ("we b1:7878", None),
            ("web#1:7878", None),
        ];
        for (input, expected) in table {
            assert_eq!(
                normalize_host_port(input).ok().as_deref(),
                *expected,
                "{input:?}"
            );
        }
    }

    #[test]
    fn parse_reads_entries_and_skips_comments() {
        let a = Fingerprint::from([1; 32]);
        let b = Fingerprint::from([2; 32]);
        let text = format!(
            "# pinned daemons\n\nweb1:7878 {a}  # first\n  [::1]:9000\t{b}\nWEB1:7878 {a}\n"
        );
        let got = parse(Path::new("kh"), &text).unwrap();
        assert_eq!(
            got,
            vec![("web1:7878".to_owned(), a), ("[::1]:9000".to_owned(), b)]
        );
    }

    #[test]
    fn parse_errors_name_the_line() {
        let a = Fingerprint::from([1; 32]);
        let b = Fingerprint::from([2; 32]);
        let cases: Vec<(String, usize)> = vec![
            ("# c\nweb1:7878\n".to_owned(), 2),
            (format!("web1:7878 {a} extra\n"), 1),
            ("\n\nweb1:7878 MD5:00\n".to_owned(), 3),
            (format!("web1 {a}\n"), 1),
            (format!("web1:1 {a}\nweb1:1 {b}\n"), 2),
        ];
        for (text, line) in cases {
            let err = parse(Path::new("kh"), &text).unwrap_err();
            let shown = err.to_string();
            assert!(shown.starts_with(&format!("kh:{line}:")), "{shown}");
        }
    }
}

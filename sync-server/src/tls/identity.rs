//! A node's long-term identity: an Ed25519 key and a self-signed certificate that carries it.
//!
//! Nothing checks the certificate's names, dates or issuer; it is only the envelope TLS needs to
//! present a public key. Trust comes from the key's [`Fingerprint`] being pinned (client side) or
//! authorized (daemon side), as with ssh host and user keys. Ed25519 is used because ring signs
//! and verifies it in TLS 1.3, keys are tiny, and signing is deterministic (no nonce to get wrong).

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rcgen::{CertificateParams, DnType, KeyPair, PublicKeyData, SerialNumber, PKCS_ED25519};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{provider, Fingerprint};

/// Key and certificate files are a few hundred bytes; anything much larger is not one of ours.
const MAX_PEM_FILE: u64 = 64 * 1024;

/// An Ed25519 key pair and a self-signed certificate for it.
pub struct Identity {
    cert_der: CertificateDer<'static>,
    key_der: PrivatePkcs8KeyDer<'static>,
    fingerprint: Fingerprint,
}

/// Why an identity could not be generated, saved or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("cannot generate a key pair or certificate for {name:?}: {source}")]
    Generate {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("identity name {0:?} is not usable as a file name; use letters, digits, `.`, `_` and `-`, not starting with `.`")]
    BadName(String),
    #[error("{} already exists; refusing to overwrite a key (move it away first if you really mean to replace it)", .0.display())]
    Exists(PathBuf),
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is larger than {MAX_PEM_FILE} bytes; it is not a relsync key or certificate", .0.display())]
    TooLarge(PathBuf),
    #[error("{} holds no PEM {what}: {source}", path.display())]
    Pem {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{} is not a PKCS#8 private key (`-----BEGIN PRIVATE KEY-----`); generate a new identity", .0.display())]
    NotPkcs8(PathBuf),
    #[error("{} holds a key this build cannot use: {source}", path.display())]
    UnsupportedKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("private key {} has mode {mode:04o}, readable or writable by others; run `chmod 600 {}`", path.display(), path.display())]
    Permissions { path: PathBuf, mode: u32 },
    #[error("certificate {} does not belong to key {}; they must come from the same identity", cert.display(), key.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("certificate {} cannot be parsed: {source}", path.display())]
    BadCertificate {
        path: PathBuf,
        #[source]
        source: super::FingerprintError,
    },
}

impl Identity {
    /// A fresh Ed25519 key and a self-signed certificate naming `name`.
    pub fn generate(name: &str) -> Result<Self, IdentityError> {
        let key =
            KeyPair::generate_for(&PKCS_ED25519).map_err(|source| IdentityError::Generate {
                name: name.to_owned(),
                source,
            })?;
        Self::issue(&key, name)
    }

    /// A new certificate for this identity's key, naming `name`. The fingerprint is unchanged.
    pub fn reissue(&self, name: &str) -> Result<Self, IdentityError> {
        let key = KeyPair::try_from(&self.key_der).map_err(|source| IdentityError::Generate {
            name: name.to_owned(),
            source,
        })?;
        Self::issue(&key, name)
    }

    fn issue(key: &KeyPair, name: &str) -> Result<Self, IdentityError> {
        let generate = |source| IdentityError::Generate {
            name: name.to_owned(),
            source,
        };
        let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(generate)?;
        params.distinguished_name.push(DnType::CommonName, name);
        // rcgen derives the serial from the key when none is given, which would make every
        // re-issued certificate for a key share one serial; a random one keeps them apart.
        let mut serial = [0u8; 16];
        provider()
            .secure_random
            .fill(&mut serial)
            .map_err(|_| generate(rcgen::Error::RingUnspecified))?;
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let cert = params.self_signed(key).map_err(generate)?;
        let cert_der = cert.der().clone();
        let fingerprint = Fingerprint::of_spki(&key.subject_public_key_info());
        Ok(Self {
            cert_der,
            key_der: PrivatePkcs8KeyDer::from(key.serialize_der()),
            fingerprint,
        })
    }

    /// Writes `dir/NAME.key` (PKCS#8 PEM, mode 0600) and `dir/NAME.crt` (PEM), creating `dir`
    /// (mode 0700) if needed. Fails without touching anything if either file exists: a key is
    /// never overwritten. Returns the key and certificate paths.
    pub fn save(&self, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), IdentityError> {
        validate_file_name(name)?;
        let key_path = dir.join(format!("{name}.key"));
        let cert_path = dir.join(format!("{name}.crt"));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| IdentityError::Io {
                action: "create directory",
                path: dir.to_owned(),
                source,
            })?;
        for path in [&key_path, &cert_path] {
            if fs::symlink_metadata(path).is_ok() {
                return Err(IdentityError::Exists(path.clone()));
            }
        }
        write_new(
            &key_path,
            0o600,
            &pem("PRIVATE KEY", self.key_der.secret_pkcs8_der()),
        )?;
        if let Err(err) = write_new(&cert_path, 0o644, &pem("CERTIFICATE", &self.cert_der)) {
            // The key file is ours (created exclusively just above), so removing it is safe and
            // leaves no half identity behind.
            let _ = fs::remove_file(&key_path);
            return Err(err);
        }
        sync_dir(dir)?;
        Ok((key_path, cert_path))
    }

    /// Loads an identity saved by [`Identity::save`] (or any PKCS#8 key + matching certificate).
    /// The key file must not be accessible by group or others, as ssh insists.
    pub fn load(key_path: &Path, cert_path: &Path) -> Result<Self, IdentityError> {
        let key_pem = read_small(key_path, true)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|source| IdentityError::Pem {
            path: key_path.to_owned(),
            what: "private key",
            source,
        })?;
        let PrivateKeyDer::Pkcs8(key_der) = key else {
            return Err(IdentityError::NotPkcs8(key_path.to_owned()));
        };
        let cert_pem = read_small(cert_path, false)?;
        let cert_der =
            CertificateDer::from_pem_slice(&cert_pem).map_err(|source| IdentityError::Pem {
                path: cert_path.to_owned(),
                what: "certificate",
                source,
            })?;
        let fingerprint =
            Fingerprint::of_cert(&cert_der).map_err(|source| IdentityError::BadCertificate {
                path: cert_path.to_owned(),
                source,
            })?;
        let signer = provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(key_der.clone_key()))
            .map_err(|source| IdentityError::UnsupportedKey {
                path: key_path.to_owned(),
                source,
            })?;
        let matches = signer
            .public_key()
            .is_some_and(|spki| Fingerprint::of_spki(&spki) == fingerprint);
        if !matches {
            return Err(IdentityError::KeyMismatch {
                key: key_path.to_owned(),
                cert: cert_path.to_owned(),
            });
        }
        Ok(Self {
            cert_der,
            key_der,
            fingerprint,
        })
    }

    /// The DER certificate presented in handshakes.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The PKCS#8 DER private key.
    pub fn key_der(&self) -> &PrivatePkcs8KeyDer<'static> {
        &self.key_der
    }

    /// The fingerprint peers pin or authorize.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Certificate chain and key in the form rustls config builders take.
    pub(crate) fn rustls_parts(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (
            vec![self.cert_der.clone()],
            PrivateKeyDer::Pkcs8(self.key_der.clone_key()),
        )
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            cert_der: self.cert_der.clone(),
            key_der: self.key_der.clone_key(),
            fingerprint: self.fingerprint,
        }
    }
}

impl fmt::Debug for Identity {
    // Never print the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

fn validate_file_name(name: &str) -> Result<(), IdentityError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadName(name.to_owned()))
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn write_new(path: &Path, mode: u32, contents: &str) -> Result<(), IdentityError> {
    let io_err = |action| {
        move |source| IdentityError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    };
    // O_EXCL: if something appeared since the existence check, fail rather than overwrite.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                IdentityError::Exists(path.to_owned())
            } else {
                io_err("create")(source)
            }
        })?;
    file.write_all(contents.as_bytes())
        .map_err(io_err("write"))?;
    file.sync_all().map_err(io_err("sync"))
}

fn sync_dir(dir: &Path) -> Result<(), IdentityError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| IdentityError::Io {
            action: "sync directory",
            path: dir.to_owned(),
            source,
        })
}

fn read_small(path: &Path, private: bool) -> Result<Vec<u8>, IdentityError> {
    let io_err = |source| IdentityError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    };
    let file = fs::File::open(path).map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if private && meta.mode() & 0o077 != 0 {
        return Err(IdentityError::Permissions {
            path: path.to_owned(),
            mode: meta.mode() & 0o7777,
        });
    }
    let mut buf = Vec::new();
    file.take(MAX_PEM_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(io_err)?;
    if buf.len() as u64 > MAX_PEM_FILE {
        return Err(IdentityError::TooLarge(path.to_owned()));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_wraps_at_64_columns_and_round_trips() {
        let der: Vec<u8> = (0..=255u8).collect();
        let text = pem("CERTIFICATE", &der);
        assert!(text.lines().all(|l| l.len() <= 64));
        let back = CertificateDer::from_pem_slice(text.as_bytes()).unwrap();
        assert_eq!(back.as_ref(), der.as_slice());
    }

    #[test]
    fn file_names_are_checked() {
        for good in ["relsyncd", "client-1", "web_2.prod"] {
            assert!(validate_file_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "../x", "sp ace", "nul\0", "é"] {
            assert!(
                matches!(validate_file_name(bad), Err(IdentityError::BadName(_))),
                "{bad:?}"
            );
        }
    }
}

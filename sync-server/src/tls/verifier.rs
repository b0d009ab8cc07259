//! rustls verifiers for key pinning (client side) and key authorization (daemon side).
//!
//! Neither builds a certificate chain: a certificate is only a carrier for a key, and the key's
//! fingerprint decides. Both still verify the TLS 1.3 CertificateVerify signature against the
//! presented certificate's key. Without that, anyone who has seen a daemon's certificate (it is
//! not secret: every client that connects receives it) could replay it and pass the pin check.
//! TLS 1.2 is refused outright: QUIC requires 1.3, and the configs offer nothing else.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError,
    PeerIncompatible, SignatureScheme,
};

use super::{normalize_host_port, provider, Fingerprint, HostPortError};

/// Why the client refused a daemon's key. Kept by [`PinnedServerVerifier`] so the caller gets
/// this typed value back instead of the string rustls and quinn reduce errors to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PinError {
    #[error("host key for {host_port} is not known; the daemon presented {presented}. Compare it with the daemon's own fingerprint, then run `relsync trust {host_port} {presented}`")]
    UnknownHost {
        host_port: String,
        presented: Fingerprint,
    },
    #[error("host key for {host_port} changed: pinned {pinned}, but the daemon presented {presented}. Someone may be intercepting the connection, or the daemon was given a new key; nothing was sent. If the change is expected, delete the {host_port} line from the known-hosts file and run `relsync trust {host_port} {presented}`")]
    HostKeyChanged {
        host_port: String,
        pinned: Fingerprint,
        presented: Fingerprint,
    },
}

fn other(err: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

fn tls12_refused() -> Error {
    Error::PeerIncompatible(PeerIncompatible::Tls13RequiredForQuic)
}

fn bad_cert(err: super::FingerprintError) -> Error {
    match err {
        super::FingerprintError::BadCertificate(e) => e,
        e => other(e),
    }
}

/// Accepts a daemon only if its key is the one pinned for the `host:port` being dialed.
///
/// Build one per connection attempt: it records why it refused ([`PinnedServerVerifier::rejection`]),
/// and that record would be ambiguous if shared between dials.
#[derive(Debug)]
pub struct PinnedServerVerifier {
    host_port: String,
    pinned: Option<Fingerprint>,
    provider: Arc<CryptoProvider>,
    rejection: Mutex<Option<PinError>>,
}

impl PinnedServerVerifier {
    /// A verifier for `host_port`, which is pinned to `pinned` (`None`: not known yet, so any
    /// key is refused with [`PinError::UnknownHost`]).
    pub fn new(host_port: &str, pinned: Option<Fingerprint>) -> Result<Self, HostPortError> {
        Ok(Self {
            host_port: normalize_host_port(host_port)?,
            pinned,
            provider: provider(),
            rejection: Mutex::new(None),
        })
    }

    /// A verifier taking the pin from a known-hosts file.
    pub fn from_known_hosts(
        known: &super::KnownHosts,
        host_port: &str,
    ) -> Result<Self, HostPortError> {
        Self::new(host_port, known.lookup(host_port))
    }

    /// The normalized `host:port` this verifier checks.
    pub fn host_port(&self) -> &str {
        &self.host_port
    }

    /// The pinned key, if any.
    pub fn pinned(&self) -> Option<Fingerprint> {
        self.pinned
    }

    /// Why the last handshake's key was refused, if it was.
    pub fn rejection(&self) -> Option<PinError> {
        self.rejection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn refuse(&self, why: PinError) -> Error {
        *self
            .rejection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(why.clone());
        // The caller reports this to the user; a debug record is enough here.
        tracing::debug!(host = %self.host_port, "{why}");
        other(why)
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let presented = Fingerprint::of_cert(end_entity).map_err(bad_cert)?;
        match self.pinned {
            Some(pinned) if pinned == presented => Ok(ServerCertVerified::assertion()),
            Some(pinned) => Err(self.refuse(PinError::HostKeyChanged {
                host_port: self.host_port.clone(),
                pinned,
                presented,
            })),
            None => Err(self.refuse(PinError::UnknownHost {
                host_port: self.host_port.clone(),
                presented,
            })),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // rustls passes the certificate it already checked; re-checking ties the signature to
        // the pinned key even if that ever changed.
        let presented = Fingerprint::of_cert(cert).map_err(bad_cert)?;
        if self.pinned != Some(presented) {
            return Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Requires a client certificate whose key is in the authorized set (the union of every app's
/// authorized keys; which app a key may push to is decided after the handshake).
///
/// The set can be swapped at run time with [`AuthorizedClientVerifier::replace`]; new handshakes
/// see the new set at once. Session resumption is off (see `net`), so a removed key cannot come
/// back in on an old ticket.
///
/// With [`AuthorizedClientVerifier::admit_any`] (an app takes relayed pushes) every key passes
/// the handshake, its signature still checked; the daemon's session then lets a key outside the
/// set do nothing but a push carrying a valid relay ticket.
#[derive(Debug)]
pub struct AuthorizedClientVerifier {
    keys: RwLock<HashSet<Fingerprint>>,
    any: AtomicBool,
    provider: Arc<CryptoProvider>,
}

impl AuthorizedClientVerifier {
    pub fn new(keys: impl IntoIterator<Item = Fingerprint>) -> Self {
        Self {
            keys: RwLock::new(keys.into_iter().collect()),
            any: AtomicBool::new(false),
            provider: provider(),
        }
    }

    /// Replaces the authorized set (e.g. after the daemon re-reads its app configs).
    pub fn replace(&self, keys: impl IntoIterator<Item = Fingerprint>) {
        let new: HashSet<_> = keys.into_iter().collect();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = new;
    }

    /// Admits every key at the handshake (`true`), or only the authorized set.
    pub fn admit_any(&self, any: bool) {
        self.any.store(any, Ordering::Relaxed);
    }

    /// Whether `fp` passes the handshake.
    fn admits(&self, fp: &Fingerprint) -> bool {
        self.any.load(Ordering::Relaxed) || self.is_authorized(fp)
    }

    pub fn is_authorized(&self, fp: &Fingerprint) -> bool {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(fp)
    }

    /// How many keys are authorized.
    pub fn len(&self) -> usize {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ClientCertVerifier for AuthorizedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let fp = Fingerprint::of_cert(end_entity).map_err(bad_cert)?;
        if self.admits(&fp) {
            Ok(ClientCertVerified::assertion())
        } else {
            tracing::warn!(key = %fp, "refused a client key that no app authorizes");
            // Maps to the access_denied alert, which the client recognises (see
            // `net::server_refused_client_key`).
            Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        let fp = Fingerprint::of_cert(cert).map_err(bad_cert)?;
        if !self.admits(&fp) {
            return Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

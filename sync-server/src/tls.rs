//! Trust without a CA, as ssh does it: every node has a key ([`Identity`]), the client pins each
//! daemon's key by `host:port` ([`KnownHosts`], checked by [`PinnedServerVerifier`]), and the
//! daemon accepts only client keys it was told about ([`AuthorizedClientVerifier`]), or a relay
//! that presents a [`ticket`] such a client signed. Keys are named by their [`Fingerprint`].
//!
//! Everything here uses ring through rustls; the provider is passed explicitly rather than
//! installed process-wide, so no other crate's choice can change what is used here.

mod fingerprint;
mod identity;
mod known_host;
pub mod ticket;
mod verifier;

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

pub use fingerprint::{Fingerprint, FingerprintError};
pub use identity::{Identity, IdentityError};
pub use known_host::{normalize_host_port, HostPortError, KnownHosts, KnownHostsError};
pub use verifier::{AuthorizedClientVerifier, PinError, PinnedServerVerifier};

/// The ring crypto provider every relsync TLS config and verifier uses.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

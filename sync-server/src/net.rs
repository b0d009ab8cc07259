//! QUIC endpoints for relsync: mutual key authentication, ALPN `relsync/1`, no 0-RTT, and
//! transport windows sized for bulk transfer.
//!
//! **No 0-RTT, no session resumption.** 0-RTT data can be replayed by anyone who captured it,
//! and relsync's requests change state ("stage this", "activate R"), so every connection does a
//! full handshake. Resumption is off too: a resumed session skips both key checks, so a key
//! removed from the authorized set, or a re-pinned daemon, would still get in on an old ticket.
//! A full Ed25519 handshake costs well under a millisecond of CPU, which a release push does not
//! notice.
//!
//! **Windows.** quinn's defaults aim at 100 Mbit/s × 100 ms: a 1.25 MB stream window and a
//! 10 MB send window, while the connection-wide receive window is unbounded. A stream needs a
//! window of at least bandwidth × RTT to keep the pipe full: 10 Gbit/s × 2 ms (a data centre)
//! ≈ 2.5 MB, 1 Gbit/s × 50 ms (across regions) ≈ 6.25 MB. [`NetConfig::default`] gives one
//! stream 8 MiB, caps a whole connection at 16 MiB (so two streams can each run at full speed
//! while a misbehaving peer can make us buffer at most 16 MiB per connection), and lets the
//! sender keep 16 MiB in flight. UDP socket buffers are raised to 4 MiB because the kernel
//! default (~208 KiB) drops bursts at multi-gigabit rates. GSO stays on (quinn's default).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{
    ClientConfig, Connection, ConnectionError, Endpoint, EndpointConfig, IdleTimeout, ServerConfig,
    TokioRuntime, TransportConfig, TransportErrorCode,
};
use rustls::pki_types::CertificateDer;
use rustls::AlertDescription;
use socket2::{Domain, Protocol, Socket, Type};

use crate::tls::{
    provider, AuthorizedClientVerifier, Fingerprint, Identity, PinError, PinnedServerVerifier,
};

/// The only application protocol either side speaks; bumped when the wire protocol breaks.
pub const ALPN: &[u8] = b"relsync/1";

const MIB: u32 = 1024 * 1024;

/// Transport knobs. [`NetConfig::default`] is tuned for bulk transfer (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Bytes one stream may have in flight towards us.
    pub stream_receive_window: u32,
    /// Bytes all streams of a connection together may have in flight towards us; this bounds
    /// how much a peer can make us buffer per connection.
    pub connection_receive_window: u32,
    /// Bytes we keep in flight (sent, unacknowledged) per connection.
    pub send_window: u64,
    /// Unidirectional streams the peer may have open at once (one per file being sent).
    pub max_concurrent_uni_streams: u32,
    /// Bidirectional streams the peer may have open at once (control exchanges).
    pub max_concurrent_bidi_streams: u32,
    /// A connection with no traffic for this long is closed. Must be positive.
    pub idle_timeout: Duration,
    /// Send a keep-alive after this much quiet, so a slow but live peer is not timed out.
    /// Must be shorter than `idle_timeout`.
    pub keep_alive_interval: Option<Duration>,
    /// Requested UDP send and receive buffer size, in bytes.
    pub socket_buffer: usize,
    /// Probe for a path MTU above QUIC's 1,200 bytes. Worth it for a transfer (fewer, larger
    /// packets); on a connection that carries one short command the probes (up to 1,452 bytes
    /// each, several of them) are most of what it sends.
    pub mtu_discovery: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            stream_receive_window: 8 * MIB,
            connection_receive_window: 16 * MIB,
            send_window: 16 * u64::from(MIB),
            max_concurrent_uni_streams: 64,
            max_concurrent_bidi_streams: 8,
            idle_timeout: Duration::from_secs(30),
            keep_alive_interval: Some(Duration::from_secs(10)),
            socket_buffer: 4 * MIB as usize,
            mtu_discovery: true,
        }
    }
}

impl NetConfig {
    /// The quinn transport config these knobs describe.
    pub fn transport(&self) -> Result<TransportConfig, NetError> {
        if self.idle_timeout.is_zero() {
            return Err(NetError::Config(
                "idle timeout is zero; QUIC reads that as no timeout at all, so give a positive one",
            ));
        }
        if self
            .keep_alive_interval
            .is_some_and(|k| k.is_zero() || k >= self.idle_timeout)
        {
            return Err(NetError::Config(
                "keep-alive interval must be positive and shorter than the idle timeout",
            ));
        }
        let idle = IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| NetError::Config("idle timeout is too large for QUIC"))?;
        let mut transport = TransportConfig::default();
        transport
            .stream_receive_window(self.stream_receive_window.into())
            .receive_window(self.connection_receive_window.into())
            .send_window(self.send_window)
            .max_concurrent_uni_streams(self.max_concurrent_uni_streams.into())
            .max_concurrent_bidi_streams(self.max_concurrent_bidi_streams.into())
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(self.keep_alive_interval)
            // relsync sends no datagrams; refusing them removes a buffer a peer could fill.
            .datagram_receive_buffer_size(None);
        if !self.mtu_discovery {
            transport.mtu_discovery_config(None);
        }
        Ok(transport)
    }
}

/// Why an endpoint or its configuration could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    #[error("cannot open a UDP socket on {addr}: {source}")]
    Socket {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start a QUIC endpoint on {addr}: {source}")]
    Endpoint {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("invalid TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("TLS configuration is unusable for QUIC: {0}")]
    Quic(#[from] NoInitialCipherSuite),
    #[error("invalid network configuration: {0}")]
    Config(&'static str),
}

/// Why a connection to a daemon failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The daemon's key is unknown or changed; the message says what to run.
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error("daemon {host_port} refused this client's key {key}; add it to the app's authorized keys on the daemon")]
    ClientKeyRefused { host_port: String, key: Fingerprint },
    #[error("cannot connect to {host_port} ({addr}): {source}")]
    Start {
        host_port: String,
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    #[error("handshake with {host_port} ({addr}) failed: {source}")]
    Handshake {
        host_port: String,
        addr: SocketAddr,
        #[source]
        source: ConnectionError,
    },
    #[error(transparent)]
    Setup(#[from] NetError),
}

/// The daemon's TLS config: TLS 1.3 only, mandatory client keys from `authorized`, ALPN
/// `relsync/1`, no early data, no tickets, no session cache.
pub fn server_tls(
    identity: &Identity,
    authorized: Arc<AuthorizedClientVerifier>,
) -> Result<rustls::ServerConfig, NetError> {
    let (chain, key) = identity.rustls_parts();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(authorized)
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    tls.send_tls13_tickets = 0;
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(tls)
}

/// The client's TLS config: TLS 1.3 only, the daemon checked by `verifier`, our key presented,
/// ALPN `relsync/1`, no early data, no resumption.
pub fn client_tls(
    identity: &Identity,
    verifier: Arc<PinnedServerVerifier>,
) -> Result<rustls::ClientConfig, NetError> {
    let (chain, key) = identity.rustls_parts();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    tls.resumption = rustls::client::Resumption::disabled();
    Ok(tls)
}

/// The daemon's quinn config (TLS from [`server_tls`], transport from `net`).
pub fn server_config(
    identity: &Identity,
    authorized: Arc<AuthorizedClientVerifier>,
    net: &NetConfig,
) -> Result<ServerConfig, NetError> {
    let quic = QuicServerConfig::try_from(server_tls(identity, authorized)?)?;
    let mut config = ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(net.transport()?));
    Ok(config)
}

/// The client's quinn config for one dial (TLS from [`client_tls`], transport from `net`).
pub fn client_config(
    identity: &Identity,
    verifier: Arc<PinnedServerVerifier>,
    net: &NetConfig,
) -> Result<ClientConfig, NetError> {
    let quic = QuicClientConfig::try_from(client_tls(identity, verifier)?)?;
    let mut config = ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(net.transport()?));
    Ok(config)
}

/// A UDP socket bound to `addr` with send and receive buffers of `net.socket_buffer` requested.
///
/// The kernel may grant less (Linux caps at `net.core.rmem_max` / `wmem_max` and reports twice
/// what it keeps for bookkeeping); what it granted is logged, with a warning when it is short.
pub fn bind_udp(addr: SocketAddr, net: &NetConfig) -> Result<std::net::UdpSocket, NetError> {
    let socket_err = |source| NetError::Socket { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(socket_err)?;
    // A failure to resize is not fatal: the endpoint works, only slower.
    if let Err(err) = socket.set_recv_buffer_size(net.socket_buffer) {
        tracing::warn!(%addr, "cannot set UDP receive buffer: {err}");
    }
    if let Err(err) = socket.set_send_buffer_size(net.socket_buffer) {
        tracing::warn!(%addr, "cannot set UDP send buffer: {err}");
    }
    socket.bind(&addr.into()).map_err(socket_err)?;
    let recv = socket.recv_buffer_size().unwrap_or(0);
    let send = socket.send_buffer_size().unwrap_or(0);
    tracing::info!(
        %addr,
        requested = net.socket_buffer,
        recv_granted = recv,
        send_granted = send,
        "UDP socket buffers"
    );
    if recv < net.socket_buffer || send < net.socket_buffer {
        tracing::warn!(
            %addr,
            "kernel granted smaller UDP buffers than the {} bytes asked for (receive {recv}, send {send}); \
             raise net.core.rmem_max and net.core.wmem_max with sysctl for full speed",
            net.socket_buffer
        );
    }
    Ok(socket.into())
}

fn endpoint(
    addr: SocketAddr,
    server: Option<ServerConfig>,
    net: &NetConfig,
) -> Result<Endpoint, NetError> {
    let socket = bind_udp(addr, net)?;
    Endpoint::new(
        EndpointConfig::default(),
        server,
        socket,
        Arc::new(TokioRuntime),
    )
    .map_err(|source| NetError::Endpoint { addr, source })
}

/// The daemon's endpoint, listening on `addr`. Must be called inside a tokio runtime.
pub fn server_endpoint(
    addr: SocketAddr,
    identity: &Identity,
    authorized: Arc<AuthorizedClientVerifier>,
    net: &NetConfig,
) -> Result<Endpoint, NetError> {
    endpoint(addr, Some(server_config(identity, authorized, net)?), net)
}

/// A client endpoint bound to `bind` (usually `0.0.0.0:0` or `[::]:0`); dial with [`connect`].
/// Must be called inside a tokio runtime.
pub fn client_endpoint(bind: SocketAddr, net: &NetConfig) -> Result<Endpoint, NetError> {
    endpoint(bind, None, net)
}

/// Dials the daemon at `addr`, checking its key with `verifier` and presenting `identity`.
///
/// `server_name` goes into SNI only (a DNS name or IP literal); trust comes from the pin.
/// A refused daemon key comes back as [`ConnectError::Pin`] with the fingerprint and the
/// command to trust it; a daemon that refuses our key gives [`ConnectError::ClientKeyRefused`].
/// Returns once the daemon has confirmed the handshake, so a returned connection has passed
/// both key checks.
pub async fn connect(
    endpoint: &Endpoint,
    addr: SocketAddr,
    server_name: &str,
    verifier: Arc<PinnedServerVerifier>,
    identity: &Identity,
    net: &NetConfig,
) -> Result<Connection, ConnectError> {
    let host_port = verifier.host_port().to_owned();
    let config = client_config(identity, verifier.clone(), net)?;
    let connecting = endpoint
        .connect_with(config, addr, server_name)
        .map_err(|source| ConnectError::Start {
            host_port: host_port.clone(),
            addr,
            source,
        })?;
    let result = match connecting.await {
        Ok(conn) => handshake_confirmed(&conn, net.idle_timeout)
            .await
            .map(|()| conn),
        Err(err) => Err(err),
    };
    result.map_err(|source| {
        if let Some(pin) = verifier.rejection() {
            ConnectError::Pin(pin)
        } else if server_refused_client_key(&source) {
            ConnectError::ClientKeyRefused {
                host_port,
                key: identity.fingerprint(),
            }
        } else {
            ConnectError::Handshake {
                host_port,
                addr,
                source,
            }
        }
    })
}

/// Waits for the daemon's HANDSHAKE_DONE, or for the connection to close, at most `limit`.
///
/// The client's handshake completes before the daemon has checked the client's key, so without
/// this a refusal would surface later, as a confusing error on whatever stream is used first.
/// quinn raises no event for HANDSHAKE_DONE; it does count the frame, so poll that (it arrives
/// one round trip after our Finished, and a refused connection closes instead). The limit
/// matters because our keep-alives would otherwise hold open a daemon that never confirms.
async fn handshake_confirmed(conn: &Connection, limit: Duration) -> Result<(), ConnectionError> {
    let confirmed = async {
        while conn.stats().frame_rx.handshake_done == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    let outcome = tokio::time::timeout(limit, async {
        tokio::select! {
            err = conn.closed() => Err(err),
            () = confirmed => Ok(()),
        }
    })
    .await;
    outcome.unwrap_or_else(|_elapsed| {
        conn.close(0u32.into(), b"handshake not confirmed");
        Err(ConnectionError::TimedOut)
    })
}

/// Whether `err` is the daemon closing the connection because it does not accept our key
/// (unknown key: `access_denied`; no key at all: `certificate_required`).
pub fn server_refused_client_key(err: &ConnectionError) -> bool {
    let ConnectionError::ConnectionClosed(close) = err else {
        return false;
    };
    [
        AlertDescription::AccessDenied,
        AlertDescription::CertificateRequired,
    ]
    .into_iter()
    .any(|alert| close.error_code == TransportErrorCode::crypto(u8::from(alert)))
}

/// The fingerprint of the key the peer authenticated with, once the handshake is done.
pub fn peer_fingerprint(conn: &Connection) -> Option<Fingerprint> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    Fingerprint::of_cert(certs.first()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_windows_cover_the_documented_bandwidth_delay_products() {
        let net = NetConfig::default();
        // 10 Gbit/s × 2 ms and 1 Gbit/s × 50 ms, in bytes.
        for bdp in [
            10_000_000_000u64 / 8 * 2 / 1000,
            1_000_000_000 / 8 * 50 / 1000,
        ] {
            assert!(u64::from(net.stream_receive_window) >= bdp, "{bdp}");
        }
        assert!(net.connection_receive_window >= net.stream_receive_window);
        assert!(net.send_window >= 16 * u64::from(MIB));
        assert!(net.transport().is_ok());
    }

    #[test]
    fn bad_timeouts_are_refused() {
        let table = [
            (Duration::ZERO, None),
            (Duration::from_secs(10), Some(Duration::from_secs(10))),
            (Duration::from_secs(10), Some(Duration::from_secs(11))),
            (Duration::from_secs(10), Some(Duration::ZERO)),
            (Duration::from_secs(u64::MAX / 1000), None),
        ];
        for (idle, keep_alive) in table {
            let net = NetConfig {
                idle_timeout: idle,
                keep_alive_interval: keep_alive,
                ..NetConfig::default()
            };
            assert!(
                matches!(net.transport(), Err(NetError::Config(_))),
                "{idle:?} {keep_alive:?}"
            );
        }
    }
}

//! relsyncd's library: the daemon's building blocks and the client side of the protocol, kept apart
//! from the thin binaries (`relsyncd` here, `relsync` in sync-cli).

pub mod client;
pub mod config;
pub mod daemon;
pub mod file_bytes;
pub mod fleet;
pub mod net;
pub mod tls;

//! relsyncd's library: the daemon's building blocks, kept apart from the thin binary.

pub mod config;
pub mod net;
pub mod tls;

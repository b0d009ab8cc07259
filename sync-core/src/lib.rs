//! relsync core: everything that decides, and the one edge that touches the file system.
//!
//! The pure modules ([`path`], [`manifest`], [`release`], [`layout`], [`plan`], [`retention`],
//! [`delta`], [`wire`], [`proto`], [`relay`], [`activation`]) do no I/O and read no clock: they take data in and return data (often a list of
//! operations) out. [`edge`] is the only module that calls the file system; it scans trees into
//! manifests and applies plans.

pub mod activation;
pub mod delta;
pub mod edge;
pub mod layout;
pub mod manifest;
pub mod path;
pub mod plan;
pub mod proto;
pub mod relay;
pub mod release;
pub mod retention;
pub mod wire;

pub use manifest::{Entry, EntryKind, Hash, Manifest};
pub use path::RelPath;
pub use release::ReleaseId;

//! Shared helpers for the relsync benchmarks.

pub mod suite;

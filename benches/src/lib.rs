//! Shared helpers for the relsync benchmarks.

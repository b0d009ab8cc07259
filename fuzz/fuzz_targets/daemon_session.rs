//! Fuzz `sync_core::proto::DaemonSession` with arbitrary client control bytes and file headers.
//!
//! The input layout and the invariants checked live in
//! `sync_core::proto::fuzz::daemon_session_one`, which `sync-core/tests/fuzz_corpus.rs` also runs
//! over `fuzz/corpus/daemon_session/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sync_core::proto::fuzz::daemon_session_one(data);
});

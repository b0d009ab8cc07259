//! Fuzz `sync_core::proto::ClientSession` pushing a release with arbitrary daemon bytes.
//!
//! The input layout and the invariants checked live in
//! `sync_core::proto::fuzz::client_session_one`, which `sync-core/tests/fuzz_corpus.rs` also runs
//! over `fuzz/corpus/client_session/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sync_core::proto::fuzz::client_session_one(data);
});

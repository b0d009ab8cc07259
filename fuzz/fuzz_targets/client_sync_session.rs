//! Fuzz `sync_core::proto::ClientSession` syncing a tree into an export with arbitrary daemon
//! bytes.
//!
//! The input layout and the invariants checked live in
//! `sync_core::proto::fuzz::client_sync_one`, which `sync-core/tests/fuzz_corpus.rs` also runs over
//! `fuzz/corpus/client_sync_session/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sync_core::proto::fuzz::client_sync_one(data);
});

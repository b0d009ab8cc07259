//! Fuzz `sync_core::delta::apply` with hostile payloads, bases and declared sizes.
//!
//! The input layout and the invariants checked live in `sync_core::delta::fuzz::apply_one`,
//! which `sync-core/tests/fuzz_corpus.rs` also runs over `fuzz/corpus/delta_apply/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sync_core::delta::fuzz::apply_one(data);
});

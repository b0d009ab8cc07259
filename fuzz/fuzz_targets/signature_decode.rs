//! Fuzz `sync_core::delta::BasisSignature::decode` and the sender's diff against what it
//! accepts.
//!
//! The input layout and the invariants checked live in
//! `sync_core::delta::fuzz::signature_decode_one`, which `sync-core/tests/fuzz_corpus.rs` also
//! runs over `fuzz/corpus/signature_decode/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sync_core::delta::fuzz::signature_decode_one(data);
});

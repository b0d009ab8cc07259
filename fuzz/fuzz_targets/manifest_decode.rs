//! Fuzz manifest and release-record decoding (with validation) and path parsing.
//!
//! The body lives in `sync_core::manifest::fuzz::decode_one`, which
//! `sync-core/tests/fuzz_corpus.rs` also runs over `fuzz/corpus/manifest_decode/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sync_core::manifest::fuzz::decode_one(data);
});

//! Fuzz relay ticket decoding and relay plan validation and splitting.
//!
//! The body lives in `sync_core::relay::fuzz::ticket_decode_one`, which
//! `sync-core/tests/fuzz_corpus.rs` also runs over `fuzz/corpus/ticket_decode/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sync_core::relay::fuzz::ticket_decode_one(data);
});

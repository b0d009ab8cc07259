//! Fuzz `sync_core::wire::FrameDecoder` and the decoding of every message type from its frames.
//!
//! The input layout and the invariants checked live in
//! `sync_core::proto::fuzz::frame_decode_one`, which `sync-core/tests/fuzz_corpus.rs` also runs
//! over `fuzz/corpus/frame_decode/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sync_core::proto::fuzz::frame_decode_one(data);
});

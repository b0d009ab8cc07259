//! Tests of the public interface: engine choice, round trips, and hostile payloads.

use std::io::{self, Write};

use super::*;

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// PHP-looking text: compressible, like the files relsync ships.
fn php(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "public",
        "function",
        "return",
        "$this->",
        "array(",
        "null",
        "static",
        "class",
        "new",
        "if (",
        "foreach (",
        "as $key => $value",
        "throw",
        "Exception",
        "namespace",
        "use",
        "App\\Http\\",
        "Controller",
        "Request",
        "Response",
        "$request",
        "->get(",
        "'id'",
        ");",
        "{",
        "}",
        "=>",
        "isset(",
        "count(",
        "strlen(",
        "private",
        "protected",
        "$container",
    ];
    let mut x = seed.wrapping_mul(2).wrapping_add(1);
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize].as_bytes());
        out.push(if x.is_multiple_of(7) { b'\n' } else { b' ' });
    }
    out.truncate(len);
    out
}

/// `data` with a few small edits: an insertion near the start, overwrites, a deletion.
fn edited(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    out.splice(10..10, b"// changed in release B\n".iter().copied());
    let step = out.len() / 8;
    for i in 1..8 {
        let at = i * step;
        out[at..at + 5].copy_from_slice(b"EDIT!");
    }
    let mid = out.len() / 2;
    out.drain(mid..mid + 300);
    out
}

fn full_len(target: &[u8]) -> u64 {
    encode_full(target, &mut io::sink()).unwrap().payload_len
}

fn round_trip(format: DeltaFormat, basis: Option<&[u8]>, payload: &[u8], target: &[u8]) {
    let mut out = Vec::new();
    apply(
        format,
        basis,
        payload,
        target.len() as u64,
        &blake3::hash(target),
        &mut out,
    )
    .unwrap_or_else(|e| panic!("{format}: {e}"));
    assert!(out == target, "{format}: output differs");
}

#[test]
fn format_codes_round_trip() {
    for format in DeltaFormat::ALL {
        assert_eq!(DeltaFormat::from_code(format.code()), Some(format));
    }
    let codes: Vec<u8> = DeltaFormat::ALL.iter().map(|f| f.code()).collect();
    assert_eq!(codes, [0, 1, 2]);
    for code in 3..=u8::MAX {
        assert_eq!(DeltaFormat::from_code(code), None);
    }
    assert!(!DeltaFormat::Full.needs_basis());
    assert!(DeltaFormat::ZstdRef.needs_basis() && DeltaFormat::Rsync.needs_basis());
}

#[test]
fn forced_engines_round_trip() {
    let basis = php(200_000, 1);
    let target = edited(&basis);
    let sig = BasisSignature::calculate(&basis);
    let full = full_len(&target);

    let mut payload = Vec::new();
    let enc = encode_full(&target, &mut payload).unwrap();
    assert_eq!(
        (enc.format, enc.payload_len),
        (DeltaFormat::Full, payload.len() as u64)
    );
    round_trip(DeltaFormat::Full, None, &payload, &target);

    let mut payload = Vec::new();
    let enc = encode_with_basis(&basis, &target, &mut payload).unwrap();
    assert_eq!(
        (enc.format, enc.payload_len),
        (DeltaFormat::ZstdRef, payload.len() as u64)
    );
    assert!(
        enc.payload_len * 10 < full,
        "zstd-ref {} vs full {full}",
        enc.payload_len
    );
    round_trip(DeltaFormat::ZstdRef, Some(&basis), &payload, &target);

    let mut payload = Vec::new();
    let enc = encode_with_signature(&sig, &target, &mut payload).unwrap();
    assert_eq!(
        (enc.format, enc.payload_len),
        (DeltaFormat::Rsync, payload.len() as u64)
    );
    assert!(
        enc.payload_len * 3 < full,
        "rsync {} vs full {full}",
        enc.payload_len
    );
    round_trip(DeltaFormat::Rsync, Some(&basis), &payload, &target);
}

#[test]
fn encode_picks_the_engine() {
    let basis = php(300_000, 2);
    let sig = BasisSignature::calculate(&basis);
    let related = edited(&basis);
    let unrelated = noise(300_000, 3);
    let cases: Vec<(&str, Basis<'_>, &[u8], DeltaFormat)> = vec![
        ("new file", Basis::None, &related, DeltaFormat::Full),
        (
            "empty basis",
            Basis::Bytes(&[]),
            &related,
            DeltaFormat::Full,
        ),
        ("empty target", Basis::Bytes(&basis), &[], DeltaFormat::Full),
        (
            "small edits, basis known",
            Basis::Bytes(&basis),
            &related,
            DeltaFormat::ZstdRef,
        ),
        (
            "unchanged, basis known",
            Basis::Bytes(&basis),
            &basis,
            DeltaFormat::ZstdRef,
        ),
        (
            "rewritten, basis known",
            Basis::Bytes(&basis),
            &unrelated,
            DeltaFormat::Full,
        ),
        (
            "small edits, signature",
            Basis::Signature(&sig),
            &related,
            DeltaFormat::Rsync,
        ),
        (
            "rewritten, signature",
            Basis::Signature(&sig),
            &unrelated,
            DeltaFormat::Full,
        ),
        (
            "shorter than a block",
            Basis::Signature(&sig),
            &related[..1000],
            DeltaFormat::Full,
        ),
    ];
    for (name, source, target, want) in cases {
        let mut payload = Vec::new();
        let enc = encode(source, target, &mut payload).unwrap();
        assert_eq!(enc.format, want, "{name}");
        assert_eq!(enc.payload_len, payload.len() as u64, "{name}");
        assert!(
            enc.payload_len <= full_len(target),
            "{name}: larger than plain zstd"
        );
        round_trip(enc.format, Some(&basis), &payload, target);

        // The same payload, and a plain one whenever a delta won: the compressed one made to
        // compare, or for a delta of at most 1/CLEAR_WIN of the target, the target stored raw.
        let mut again = Vec::new();
        let (spared_enc, spare) = encode_sparing_full(source, target, &mut again).unwrap();
        assert_eq!((spared_enc, &again), (enc, &payload), "{name}");
        let mut full = Vec::new();
        encode_full(target, &mut full).unwrap();
        match (enc.format, spare) {
            (DeltaFormat::Full, spare) => assert_eq!(spare, None, "{name}"),
            (_, None) => panic!("{name}: no plain payload though a delta won"),
            (_, Some(spare)) => {
                if payload.len() * super::CLEAR_WIN <= target.len() {
                    assert!(spare.len() > target.len(), "{name}: stored, not compressed");
                } else {
                    assert_eq!(spare, full, "{name}");
                }
                round_trip(DeltaFormat::Full, None, &spare, target);
            }
        }
    }
}

#[test]
fn only_a_delta_that_is_no_clear_win_is_compared_with_plain_zstd() {
    // One edit in a large file: the delta is far below 1/CLEAR_WIN of it, and the plain payload
    // handed back is the file stored raw (nothing was compressed to compare).
    let basis = php(300_000, 5);
    let mut small_edit = basis.clone();
    small_edit[1000] = b'#';
    // Every 64th byte changed: a delta well above 1/CLEAR_WIN, compared with plain zstd.
    let mut many_edits = basis.clone();
    for at in (0..many_edits.len()).step_by(64) {
        many_edits[at] = b'#';
    }
    for (name, target, clear) in [
        ("one edit", &small_edit, true),
        ("many edits", &many_edits, false),
    ] {
        let mut payload = Vec::new();
        let (enc, spare) = encode_sparing_full(Basis::Bytes(&basis), target, &mut payload).unwrap();
        assert_eq!(
            payload.len() * super::CLEAR_WIN <= target.len(),
            clear,
            "{name}: {} bytes",
            payload.len()
        );
        let mut full = Vec::new();
        encode_full(target, &mut full).unwrap();
        match (enc.format, spare) {
            (DeltaFormat::ZstdRef, Some(spare)) if clear => {
                assert!(spare.len() > target.len(), "{name}");
                round_trip(DeltaFormat::Full, None, &spare, target);
            }
            (DeltaFormat::ZstdRef, Some(spare)) => assert_eq!(spare, full, "{name}"),
            (DeltaFormat::Full, None) => {
                assert!(!clear, "{name}");
                assert_eq!(payload, full, "{name}");
            }
            other => panic!("{name}: {other:?}"),
        }
        round_trip(enc.format, Some(&basis), &payload, target);
    }
}

#[test]
fn delta_that_does_not_pay_falls_back_to_full() {
    // Every 2 KiB block of the target differs from the basis by one byte: the probe sees no
    // confirmed block, and even a forced rsync delta would be all literals.
    let basis = php(100_000, 4);
    let mut target = basis.clone();
    for at in (1000..target.len()).step_by(1024) {
        target[at] = b'#';
    }
    let sig = BasisSignature::calculate(&basis);
    let mut payload = Vec::new();
    let enc = encode(Basis::Signature(&sig), &target, &mut payload).unwrap();
    assert_eq!(enc.format, DeltaFormat::Full);
    let forced = encode_with_signature(&sig, &target, &mut io::sink()).unwrap();
    assert!(forced.payload_len >= enc.payload_len);
}

#[test]
fn large_target_streams_zstd_ref_beyond_the_default_window() {
    // Above EXACT_CHOICE_LIMIT the delta streams straight out, and basis plus target exceed the
    // 2 MiB window zstd picks for level 3, so this covers the window sizing on both sides.
    let basis = php(EXACT_CHOICE_LIMIT + 300_000, 5);
    let target = edited(&basis);
    let mut payload = Vec::new();
    let enc = encode(Basis::Bytes(&basis), &target, &mut payload).unwrap();
    assert_eq!(enc.format, DeltaFormat::ZstdRef);
    assert!(
        enc.payload_len * 20 < full_len(&target),
        "payload {}",
        enc.payload_len
    );
    round_trip(DeltaFormat::ZstdRef, Some(&basis), &payload, &target);
}

/// Which error a refusal test expects.
type Check = fn(&DeltaError) -> bool;

/// Name, format, basis, payload, declared hash, expected error.
type RefusalRow<'a> = (
    &'a str,
    DeltaFormat,
    Option<&'a [u8]>,
    &'a [u8],
    &'a blake3::Hash,
    Check,
);

/// Name, payload, content, declared size, expected error.
type FrameRow<'a> = (&'a str, Vec<u8>, &'a [u8], u64, Check);

#[test]
fn full_payload_larger_than_the_plain_window_round_trips() {
    // 3 MiB of content through a 2 MiB window: the decoder's window limit must match the encoder's.
    let target = php(3 << 20, 12);
    let mut payload = Vec::new();
    encode_full(&target, &mut payload).unwrap();
    round_trip(DeltaFormat::Full, None, &payload, &target);
    let mut delta = Vec::new();
    let sig = BasisSignature::calculate(&[]);
    encode_with_signature(&sig, &target, &mut delta).unwrap();
    round_trip(DeltaFormat::Rsync, Some(&[]), &delta, &target);
}

#[test]
fn wrong_basis_or_hash_is_refused() {
    let basis = php(50_000, 6);
    let target = edited(&basis);
    let hash = blake3::hash(&target);
    let other_basis = php(50_000, 7);
    let sig = BasisSignature::calculate(&basis);
    let mut zref = Vec::new();
    encode_with_basis(&basis, &target, &mut zref).unwrap();
    let mut rsync = Vec::new();
    encode_with_signature(&sig, &target, &mut rsync).unwrap();
    let mut full = Vec::new();
    encode_full(&target, &mut full).unwrap();
    let wrong_hash = blake3::hash(b"something else");
    let size = target.len() as u64;

    let cases: Vec<RefusalRow<'_>> = vec![
        (
            "full, wrong hash",
            DeltaFormat::Full,
            None,
            &full,
            &wrong_hash,
            |e| matches!(e, DeltaError::HashMismatch { .. }),
        ),
        (
            "zstd-ref, wrong hash",
            DeltaFormat::ZstdRef,
            Some(&basis),
            &zref,
            &wrong_hash,
            |e| matches!(e, DeltaError::HashMismatch { .. }),
        ),
        (
            "rsync, wrong hash",
            DeltaFormat::Rsync,
            Some(&basis),
            &rsync,
            &wrong_hash,
            |e| matches!(e, DeltaError::HashMismatch { .. }),
        ),
        (
            "zstd-ref, other basis",
            DeltaFormat::ZstdRef,
            Some(&other_basis),
            &zref,
            &hash,
            |e| {
                matches!(
                    e,
                    DeltaError::HashMismatch { .. } | DeltaError::Corrupt { .. }
                )
            },
        ),
        (
            "rsync, other basis",
            DeltaFormat::Rsync,
            Some(&other_basis),
            &rsync,
            &hash,
            |e| matches!(e, DeltaError::HashMismatch { .. }),
        ),
        (
            "rsync, short basis",
            DeltaFormat::Rsync,
            Some(&basis[..1000]),
            &rsync,
            &hash,
            |e| matches!(e, DeltaError::RsyncDelta(_)),
        ),
        (
            "zstd-ref, no basis",
            DeltaFormat::ZstdRef,
            None,
            &zref,
            &hash,
            |e| {
                matches!(
                    e,
                    DeltaError::MissingBasis {
                        format: DeltaFormat::ZstdRef
                    }
                )
            },
        ),
        (
            "rsync, no basis",
            DeltaFormat::Rsync,
            None,
            &rsync,
            &hash,
            |e| {
                matches!(
                    e,
                    DeltaError::MissingBasis {
                        format: DeltaFormat::Rsync
                    }
                )
            },
        ),
        (
            "full payload as rsync",
            DeltaFormat::Rsync,
            Some(&basis),
            &full,
            &hash,
            |e| matches!(e, DeltaError::RsyncDelta(_)),
        ),
        (
            "rsync payload as full",
            DeltaFormat::Full,
            None,
            &rsync,
            &hash,
            |e| matches!(e, DeltaError::DeclaredSize { .. }),
        ),
    ];
    for (name, format, basis, payload, hash, check) in cases {
        let mut out = Vec::new();
        let err = apply(format, basis, payload, size, hash, &mut out)
            .err()
            .unwrap_or_else(|| panic!("{name}: accepted"));
        assert!(check(&err), "{name}: wrong error {err:?}");
        assert!(err.wants_full_resend(), "{name}");
        assert!(
            out.len() as u64 <= size,
            "{name}: wrote {} bytes",
            out.len()
        );
    }
}

#[test]
fn every_truncation_is_refused() {
    let basis = php(20_000, 8);
    let target = edited(&basis);
    let hash = blake3::hash(&target);
    let sig = BasisSignature::calculate(&basis);
    let mut payloads = Vec::new();
    for format in DeltaFormat::ALL {
        let mut payload = Vec::new();
        match format {
            DeltaFormat::Full => encode_full(&target, &mut payload),
            DeltaFormat::ZstdRef => encode_with_basis(&basis, &target, &mut payload),
            DeltaFormat::Rsync => encode_with_signature(&sig, &target, &mut payload),
        }
        .unwrap();
        payloads.push((format, payload));
    }
    for (format, payload) in &payloads {
        round_trip(*format, Some(&basis), payload, &target);
        for cut in 0..payload.len() {
            let mut out = Vec::new();
            let got = apply(
                *format,
                Some(&basis),
                &payload[..cut],
                target.len() as u64,
                &hash,
                &mut out,
            );
            assert!(got.is_err(), "{format} cut at {cut} accepted");
            assert!(out.len() <= target.len());
        }
    }
}

/// Raw rsync delta commands in fast_rsync's wire format (see its patch.rs).
mod op {
    pub const MAGIC: [u8; 4] = 0x7273_0236u32.to_be_bytes();
    pub const END: u8 = 0;

    pub fn literal(data: &[u8]) -> Vec<u8> {
        let mut out = vec![0x43];
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    /// Copy with one-byte offset and length (RS_OP_COPY_N1_N1).
    pub fn copy1(offset: u8, len: u8) -> Vec<u8> {
        vec![0x45, offset, len]
    }

    /// Copy with eight-byte offset and length (RS_OP_COPY_N8_N8).
    pub fn copy8(offset: u64, len: u64) -> Vec<u8> {
        let mut out = vec![0x54];
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out
    }

    pub fn delta(parts: &[Vec<u8>]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for part in parts {
            out.extend_from_slice(part);
        }
        out
    }
}

fn zstd_frame(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame::compress(raw, None, &mut out).unwrap();
    out
}

#[test]
fn hostile_rsync_deltas_are_refused_before_writing_past_the_declared_size() {
    use op::*;
    let basis: Vec<u8> = (0..100u8).collect();
    let abc = b"abcdefghij".to_vec();
    let oob: Check = |e| {
        matches!(
            e,
            DeltaError::RsyncDelta(fast_rsync::ApplyError::CopyOutOfBounds { .. })
        )
    };
    let too_large: Check = |e| matches!(e, DeltaError::OutputTooLarge { .. });
    let cases: Vec<(&str, Vec<u8>, u64, Check)> = vec![
        (
            "copy past the end of the basis",
            delta(&[copy1(90, 20), vec![END]]),
            20,
            oob,
        ),
        (
            "offset u64::MAX",
            delta(&[copy8(u64::MAX, 2), vec![END]]),
            2,
            oob,
        ),
        (
            "offset plus length overflows",
            delta(&[copy8(u64::MAX - 1, 5), vec![END]]),
            5,
            oob,
        ),
        (
            "length 2^40",
            delta(&[copy8(0, 1 << 40), vec![END]]),
            100,
            oob,
        ),
        (
            "zero-length copy",
            delta(&[copy1(0, 0), vec![END]]),
            0,
            |e| matches!(e, DeltaError::RsyncDelta(fast_rsync::ApplyError::CopyZero)),
        ),
        (
            "copy beyond the declared size",
            delta(&[literal(&abc), copy1(0, 100), vec![END]]),
            50,
            too_large,
        ),
        (
            "literal beyond the declared size",
            delta(&[literal(&[7; 200]), vec![END]]),
            150,
            too_large,
        ),
        (
            "literal longer than the delta",
            delta(&[vec![0x44], u64::MAX.to_be_bytes().to_vec(), vec![END]]),
            100,
            |e| {
                matches!(
                    e,
                    DeltaError::RsyncDelta(_) | DeltaError::OutputTooLarge { .. }
                )
            },
        ),
        (
            "copies far beyond the declared size",
            delta(&vec![copy1(0, 100); 100]),
            150,
            |e| {
                matches!(
                    e,
                    DeltaError::OutputTooLarge { .. } | DeltaError::DeclaredSize { .. }
                )
            },
        ),
        ("unknown command", delta(&[vec![0x55], vec![END]]), 0, |e| {
            matches!(
                e,
                DeltaError::RsyncDelta(fast_rsync::ApplyError::UnknownCommand { command: 0x55 })
            )
        }),
        ("missing end", delta(&[literal(&abc)]), 10, |e| {
            matches!(
                e,
                DeltaError::RsyncDelta(fast_rsync::ApplyError::UnexpectedEof { .. })
            )
        }),
        (
            "data after end",
            delta(&[literal(&abc), vec![END, 1, 2]]),
            10,
            |e| {
                matches!(
                    e,
                    DeltaError::RsyncDelta(fast_rsync::ApplyError::TrailingData { length: 2 })
                )
            },
        ),
        ("wrong magic", vec![0x72, 0x73, 0x01, 0x36, END], 0, |e| {
            matches!(
                e,
                DeltaError::RsyncDelta(fast_rsync::ApplyError::WrongMagic { .. })
            )
        }),
        (
            "output shorter than declared",
            delta(&[literal(&abc), vec![END]]),
            20,
            |e| {
                matches!(
                    e,
                    DeltaError::OutputTooShort {
                        actual: 10,
                        expected: 20
                    }
                )
            },
        ),
    ];
    for (name, raw, expected_size, check) in cases {
        let payload = zstd_frame(&raw);
        let mut out = Vec::new();
        let hash = blake3::hash(b"");
        let err = apply(
            DeltaFormat::Rsync,
            Some(&basis),
            &payload,
            expected_size,
            &hash,
            &mut out,
        )
        .err()
        .unwrap_or_else(|| panic!("{name}: accepted"));
        assert!(check(&err), "{name}: wrong error {err:?}");
        assert!(
            out.len() as u64 <= expected_size,
            "{name}: wrote {} bytes",
            out.len()
        );
    }

    // The same builders make a valid delta, so the refusals above are not an artefact of them.
    let raw = delta(&[copy1(10, 5), literal(&abc), copy8(95, 5), vec![END]]);
    let mut want = basis[10..15].to_vec();
    want.extend_from_slice(&abc);
    want.extend_from_slice(&basis[95..]);
    round_trip(DeltaFormat::Rsync, Some(&basis), &zstd_frame(&raw), &want);
}

#[test]
fn zstd_bombs_are_refused_before_decoding() {
    let zeros = vec![0u8; 8 << 20];
    let bomb = zstd_frame(&zeros);
    assert!(bomb.len() < 4096, "bomb is {} bytes", bomb.len());
    let hash = blake3::hash(&zeros[..1024]);
    for (format, basis) in [
        (DeltaFormat::Full, None),
        (DeltaFormat::ZstdRef, Some(&zeros[..10])),
        (DeltaFormat::Rsync, Some(&zeros[..10])),
    ] {
        let mut out = Vec::new();
        let err = apply(format, basis, &bomb, 1024, &hash, &mut out).unwrap_err();
        assert!(
            matches!(err, DeltaError::DeclaredSize { declared: Some(n), .. } if n == 8 << 20),
            "{format}: {err:?}"
        );
        assert!(out.is_empty(), "{format}");
    }
}

/// A hand-made zstd frame: a window descriptor, a 4-byte declared content size, and `content`
/// as raw blocks.
fn handmade_frame(window_descriptor: u8, declared: u32, content: &[u8]) -> Vec<u8> {
    let mut out = vec![0x28, 0xb5, 0x2f, 0xfd, 0x80, window_descriptor];
    out.extend_from_slice(&declared.to_le_bytes());
    let blocks: Vec<&[u8]> = content.chunks(100 * 1024).collect();
    for (i, block) in blocks.iter().enumerate() {
        let last = u32::from(i + 1 == blocks.len());
        let header = ((block.len() as u32) << 3) | last;
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(block);
    }
    out
}

#[test]
fn handmade_frames() {
    let small = b"sixteen bytes!!!".to_vec();
    let big = php(200 * 1024, 10);
    // Window descriptor 0x00 is a 1 KiB window, 0x50 1 MiB, 0x60 4 MiB, 0xa8 2 GiB.
    let accepted = [
        ("1 KiB window", handmade_frame(0x00, 16, &small), &small),
        (
            "1 MiB window",
            handmade_frame(0x50, big.len() as u32, &big),
            &big,
        ),
        // Content that fits the output buffer is decoded in one pass with no window buffer,
        // so the oversized window costs nothing and zstd does not object.
        (
            "2 GiB window, tiny content",
            handmade_frame(0xa8, 16, &small),
            &small,
        ),
    ];
    for (name, payload, content) in accepted {
        let mut out = Vec::new();
        let size = content.len() as u64;
        apply(
            DeltaFormat::Full,
            None,
            &payload,
            size,
            &blake3::hash(content),
            &mut out,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(&out == content, "{name}");
    }

    let refused: Vec<FrameRow<'_>> = vec![
        (
            "4 MiB window, streamed content",
            handmade_frame(0x60, big.len() as u32, &big),
            &big,
            big.len() as u64,
            |e| matches!(e, DeltaError::Corrupt { .. }),
        ),
        (
            "2 GiB window, streamed content",
            handmade_frame(0xa8, big.len() as u32, &big),
            &big,
            big.len() as u64,
            |e| matches!(e, DeltaError::Corrupt { .. }),
        ),
        (
            "declares more than it holds",
            handmade_frame(0x00, 100, &small),
            &small,
            100,
            |e| {
                matches!(
                    e,
                    DeltaError::Corrupt { .. } | DeltaError::OutputTooShort { .. }
                )
            },
        ),
    ];
    for (name, payload, content, declared, check) in refused {
        let mut out = Vec::new();
        let hash = blake3::hash(content);
        let err = apply(DeltaFormat::Full, None, &payload, declared, &hash, &mut out).unwrap_err();
        assert!(check(&err), "{name}: {err:?}");
        assert!(out.len() as u64 <= declared);
    }
}

struct FailingWriter;

impl Write for FailingWriter {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::other("disk on fire"))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn local_write_failures_are_not_blamed_on_the_payload() {
    let basis = php(10_000, 9);
    let target = edited(&basis);
    let hash = blake3::hash(&target);
    let sig = BasisSignature::calculate(&basis);
    let mut full = Vec::new();
    encode_full(&target, &mut full).unwrap();
    let mut rsync = Vec::new();
    encode_with_signature(&sig, &target, &mut rsync).unwrap();
    for (format, payload) in [(DeltaFormat::Full, &full), (DeltaFormat::Rsync, &rsync)] {
        let err = apply(
            format,
            Some(&basis),
            payload,
            target.len() as u64,
            &hash,
            &mut FailingWriter,
        )
        .unwrap_err();
        assert!(matches!(err, DeltaError::Sink(_)), "{format}: {err:?}");
        assert!(!err.wants_full_resend());
    }
    let err = encode_full(&target, &mut FailingWriter).unwrap_err();
    assert!(matches!(err, DeltaError::Encode(_)));
    assert!(!err.wants_full_resend());
}

#[test]
fn error_messages_are_lower_case_and_say_what_to_do() {
    let errors = [
        DeltaError::MissingBasis {
            format: DeltaFormat::Rsync,
        },
        DeltaError::DeclaredSize {
            format: DeltaFormat::Full,
            declared: None,
            allowed: 3,
        },
        DeltaError::OutputTooLarge { limit: 3 },
        DeltaError::HashMismatch {
            expected: blake3::hash(b"a"),
            actual: blake3::hash(b"b"),
        },
        DeltaError::Signature(SignatureError::BlockLen { len: 0 }),
    ];
    for err in errors {
        let msg = err.to_string();
        assert!(msg.starts_with(|c: char| c.is_lowercase()), "{msg}");
        assert!(!msg.ends_with('.'), "{msg}");
        assert!(msg.contains("send the file in full"), "{msg}");
    }
}

/// The streaming decoder of spooled `Full` payloads accepts exactly what `apply` accepts and
/// writes the same bytes.
#[test]
fn streamed_full_payloads_agree_with_apply() {
    let mut cases: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for target in [vec![], b"x".to_vec(), php(20_000, 3), noise(5 << 20, 4)] {
        let mut payload = Vec::new();
        encode_full(&target, &mut payload).unwrap();
        cases.push((target, payload));
    }
    let (target, good) = cases[2].clone();
    for cut in [0, 1, 4, 10, 17, 18, good.len() / 2, good.len() - 1] {
        cases.push((target.clone(), good[..cut].to_vec()));
    }
    let mut trailing = good.clone();
    trailing.push(0);
    cases.push((target.clone(), trailing));
    let mut twice = good.clone();
    twice.extend_from_slice(&good);
    cases.push((target.clone(), twice));
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    cases.push((target.clone(), flipped));
    cases.push((vec![0u8; 1024], zstd_frame(&vec![0u8; 8 << 20])));
    cases.push((target.clone(), noise(300, 9)));

    for (i, (target, payload)) in cases.iter().enumerate() {
        let hash = blake3::hash(target);
        let size = target.len() as u64;
        let mut want = Vec::new();
        let whole = apply(DeltaFormat::Full, None, payload, size, &hash, &mut want);
        let mut got = Vec::new();
        let streamed = apply_full_from(&mut &payload[..], size, &hash, &mut got);
        assert_eq!(
            whole.is_ok(),
            streamed.is_ok(),
            "case {i}: apply gave {whole:?}, streaming gave {streamed:?}"
        );
        if whole.is_ok() {
            assert!(got == *target, "case {i}: streamed output differs");
        }
        assert!(got.len() <= target.len(), "case {i}: wrote past the size");
    }
}

#[test]
fn a_failed_plain_decode_leaves_the_reused_context_good_for_the_next_payload() {
    // Plain payloads share one decompression context per thread: a frame refused halfway (by
    // its window, then by its content) must not leak state into the next decode.
    let big = php(200 * 1024, 11);
    let small = b"sixteen bytes!!!".to_vec();
    let good = zstd_frame(&big);
    for bad in [
        handmade_frame(0x60, big.len() as u32, &big),
        handmade_frame(0x00, 100, &small),
    ] {
        let size = bad[6..10].try_into().map(u32::from_le_bytes).unwrap() as u64;
        let mut out = Vec::new();
        let hash = blake3::hash(b"whatever");
        assert!(apply(DeltaFormat::Full, None, &bad, size, &hash, &mut out).is_err());
        let mut out = Vec::new();
        apply(
            DeltaFormat::Full,
            None,
            &good,
            big.len() as u64,
            &blake3::hash(&big),
            &mut out,
        )
        .unwrap();
        assert!(out == big);
    }
}

#[test]
fn zstd_ref_frames_decode_alike_in_one_call_and_streamed() {
    // One thread decodes many frames against different bases through one reused context: each
    // result must be its own, whatever was decoded (or failed) before it.
    let a = php(6 * 1024, 20);
    let b = php(9 * 1024, 21);
    let mut magic_basis = vec![0x37, 0xa4, 0x30, 0xec];
    magic_basis.extend_from_slice(&a);
    let large = php(3 << 20, 22);
    let pairs: Vec<(&str, &[u8], Vec<u8>)> = vec![
        ("small", &a, edited(&a)),
        ("another basis", &b, edited(&b)),
        // Read as a formatted dictionary by the one-call decoder: streamed instead.
        (
            "basis starting with the dictionary magic",
            &magic_basis,
            edited(&magic_basis),
        ),
        ("over the one-call limit", &large, edited(&large)),
        ("small again", &a, edited(&a)),
    ];
    for round in 0..2 {
        for (name, basis, target) in &pairs {
            let mut payload = Vec::new();
            encode_with_basis(basis, target, &mut payload).unwrap();
            round_trip(DeltaFormat::ZstdRef, Some(basis), &payload, target);
            // A wrong basis fails, and leaves nothing behind for the next frame.
            let mut out = Vec::new();
            let wrong = apply(
                DeltaFormat::ZstdRef,
                Some(&b"another basis entirely"[..]),
                &payload,
                target.len() as u64,
                &blake3::hash(target),
                &mut out,
            );
            assert!(
                wrong.is_err(),
                "round {round}, {name}: a wrong basis decoded"
            );
        }
    }
    // The window a frame may declare is the one basis and content need, in one call as when
    // streamed (raw blocks reference nothing, so only the window descriptor matters). Here that
    // is 256 KiB; content small enough to decode in one pass needs no window buffer either way,
    // so there a larger window is accepted, as it always was.
    let content = php(200 * 1024, 23);
    let small = b"sixteen bytes!!!".to_vec();
    // Window descriptor 0x40 is 256 KiB, 0x50 1 MiB, 0x60 4 MiB.
    let cases: [(&str, u8, &[u8], bool); 4] = [
        ("the window needed", 0x40, &content, true),
        ("a larger window", 0x50, &content, false),
        ("a far larger window", 0x60, &content, false),
        ("a larger window, content in one pass", 0x60, &small, true),
    ];
    for (name, descriptor, content, ok) in cases {
        let mut out = Vec::new();
        let got = apply(
            DeltaFormat::ZstdRef,
            Some(&a[..100]),
            &handmade_frame(descriptor, content.len() as u32, content),
            content.len() as u64,
            &blake3::hash(content),
            &mut out,
        );
        match got {
            Ok(_) => assert!(ok && out == content, "{name}"),
            Err(e) => assert!(
                !ok && matches!(e, DeltaError::Corrupt { .. }),
                "{name}: {e:?}"
            ),
        }
    }
}

#[test]
fn one_encoder_serves_many_files_as_fresh_ones_would() {
    // Bases of different sizes in a row make the reused context change its window and tables;
    // each payload must still be the one a fresh encoder makes, and rebuild its own target.
    let small = php(3 * 1024, 30);
    let medium = php(48 * 1024, 31);
    let large = php(700 * 1024, 32);
    let unrelated = noise(20 * 1024, 33);
    let rewritten = php(48 * 1024, 34);
    let (medium_edited, small_edited, large_edited) =
        (edited(&medium), edited(&small), edited(&large));
    let medium_copy = medium.clone();
    let cases: Vec<(&str, &[u8], &[u8])> = vec![
        ("medium", &medium, &medium_edited),
        ("small after medium", &small, &small_edited),
        ("large", &large, &large_edited),
        ("small after large", &small, &small_edited),
        ("rewritten", &medium, &rewritten),
        ("unrelated basis", &unrelated, &medium_edited),
        ("empty target", &medium, &[]),
        // The target is the basis's own memory: zstd's one-call mode would not reference it.
        ("unchanged, the basis itself", &medium, &medium),
        ("unchanged, a copy", &medium, &medium_copy),
        ("medium again", &medium, &medium_edited),
    ];
    let mut encoder = Encoder::new();
    let mut deltas = 0;
    for (name, basis, target) in &cases {
        let mut reused = Vec::new();
        let (enc, spare) = encoder
            .encode_sparing_full(Basis::Bytes(basis), target, &mut reused)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut fresh = Vec::new();
        let (fresh_enc, _) = encode_sparing_full(Basis::Bytes(basis), target, &mut fresh).unwrap();
        assert_eq!(enc, fresh_enc, "{name}: a fresh encoder chose otherwise");
        assert!(reused == fresh, "{name}: the payloads differ");
        assert_eq!(enc.payload_len, reused.len() as u64, "{name}");
        round_trip(enc.format, Some(basis), &reused, target);
        if let Some(spare) = spare {
            round_trip(DeltaFormat::Full, None, &spare, target);
        }
        if name.starts_with("unchanged") {
            assert!(reused.len() < 64, "{name}: {} bytes", reused.len());
        }
        deltas += usize::from(enc.format == DeltaFormat::ZstdRef);
    }
    assert!(deltas >= 6, "only {deltas} cases went out as deltas");
}

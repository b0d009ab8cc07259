//! Property tests for the delta engines: every engine rebuilds every target exactly, and no
//! payload, however mangled, gets `apply` to panic, write past the declared size, or succeed
//! with the wrong bytes.

use proptest::prelude::*;
use sync_core::delta::{
    apply, encode, encode_full, encode_with_basis, encode_with_signature, Basis, BasisSignature,
    DeltaFormat, MIN_BLOCK_LEN,
};

/// Lengths that straddle the rsync block boundaries of small files, plus anything up to 20 KB.
fn length() -> impl Strategy<Value = usize> {
    let b = MIN_BLOCK_LEN as usize;
    prop_oneof![
        0..4usize,
        (b - 3)..(b + 3),
        (2 * b - 3)..(2 * b + 3),
        (3 * b - 3)..(3 * b + 3),
        0..20_000usize,
    ]
}

/// Random bytes, or bytes from a four-letter alphabet (compressible, with many repeated blocks).
fn content(len: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), len),
        prop::collection::vec(prop::sample::select(b"ab\n ".to_vec()), len),
    ]
}

fn blob() -> impl Strategy<Value = Vec<u8>> {
    length().prop_flat_map(content)
}

#[derive(Clone, Debug)]
enum Edit {
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Overwrite(usize, Vec<u8>),
}

fn edit() -> impl Strategy<Value = Edit> {
    let bytes = || prop::collection::vec(any::<u8>(), 1..300);
    prop_oneof![
        (any::<usize>(), bytes()).prop_map(|(at, b)| Edit::Insert(at, b)),
        (any::<usize>(), 1..3000usize).prop_map(|(at, n)| Edit::Delete(at, n)),
        (any::<usize>(), bytes()).prop_map(|(at, b)| Edit::Overwrite(at, b)),
    ]
}

fn apply_edits(basis: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut out = basis.to_vec();
    for e in edits {
        let at = |pos: usize, len: usize| if len == 0 { 0 } else { pos % (len + 1) };
        match e {
            Edit::Insert(pos, bytes) => {
                let at = at(*pos, out.len());
                out.splice(at..at, bytes.iter().copied());
            }
            Edit::Delete(pos, n) => {
                let at = at(*pos, out.len());
                let end = (at + n).min(out.len());
                out.drain(at..end);
            }
            Edit::Overwrite(pos, bytes) => {
                let at = at(*pos, out.len());
                for (i, b) in bytes.iter().enumerate() {
                    match out.get_mut(at + i) {
                        Some(slot) => *slot = *b,
                        None => out.push(*b),
                    }
                }
            }
        }
    }
    out
}

/// (basis, target): related by edits, unrelated, or involving an empty file.
fn pair() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    prop_oneof![
        3 => (blob(), prop::collection::vec(edit(), 0..6))
            .prop_map(|(basis, edits)| {
                let target = apply_edits(&basis, &edits);
                (basis, target)
            }),
        1 => (blob(), blob()),
        1 => blob().prop_map(|b| (Vec::new(), b)),
        1 => blob().prop_map(|b| (b, Vec::new())),
    ]
}

/// Applies `payload` and returns the output, asserting it never exceeds the declared size.
fn rebuild(
    format: DeltaFormat,
    basis: Option<&[u8]>,
    payload: &[u8],
    target: &[u8],
) -> Result<Vec<u8>, TestCaseError> {
    let mut out = Vec::new();
    let result = apply(
        format,
        basis,
        payload,
        target.len() as u64,
        &blake3::hash(target),
        &mut out,
    );
    prop_assert!(
        out.len() <= target.len(),
        "{} wrote {} bytes",
        format,
        out.len()
    );
    result.map_err(|e| TestCaseError::fail(format!("{format}: {e}")))?;
    Ok(out)
}

/// One payload per engine, forced and chosen, for `target` against `basis`.
fn payloads(basis: &[u8], target: &[u8]) -> Vec<(String, DeltaFormat, Vec<u8>)> {
    let local = BasisSignature::calculate(basis);
    // The sender works from the decoded wire form, as it would in a real push.
    let sig = BasisSignature::decode(local.as_bytes(), basis.len() as u64).unwrap();
    let mut out = Vec::new();
    let mut add = |name: &str, f: &dyn Fn(&mut Vec<u8>) -> DeltaFormat| {
        let mut payload = Vec::new();
        let format = f(&mut payload);
        out.push((name.to_string(), format, payload));
    };
    add("full", &|w| encode_full(target, w).unwrap().format);
    add("zstd-ref", &|w| {
        encode_with_basis(basis, target, w).unwrap().format
    });
    add("rsync", &|w| {
        encode_with_signature(&sig, target, w).unwrap().format
    });
    add("auto/bytes", &|w| {
        encode(Basis::Bytes(basis), target, w).unwrap().format
    });
    add("auto/signature", &|w| {
        encode(Basis::Signature(&sig), target, w).unwrap().format
    });
    out
}

/// Ways to damage a payload in transit.
#[derive(Clone, Debug)]
enum Mangle {
    Flip(Vec<(usize, u8)>),
    Truncate(usize),
    Append(Vec<u8>),
}

impl Mangle {
    fn apply_to(&self, payload: &mut Vec<u8>) {
        match self {
            Mangle::Flip(flips) => {
                for (at, mask) in flips {
                    let at = at % payload.len();
                    payload[at] ^= mask;
                }
            }
            Mangle::Truncate(cut) => payload.truncate(cut % payload.len()),
            Mangle::Append(tail) => payload.extend_from_slice(tail),
        }
    }
}

fn mangling() -> impl Strategy<Value = Mangle> {
    prop_oneof![
        3 => prop::collection::vec((any::<usize>(), 1u8..=255), 1..4).prop_map(Mangle::Flip),
        1 => any::<usize>().prop_map(Mangle::Truncate),
        1 => prop::collection::vec(any::<u8>(), 1..8).prop_map(Mangle::Append),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn every_engine_round_trips((basis, target) in pair()) {
        for (name, format, payload) in payloads(&basis, &target) {
            let out = rebuild(format, Some(&basis), &payload, &target)?;
            prop_assert!(out == target, "{}: output differs", name);
        }
    }

    #[test]
    fn chosen_payload_is_never_larger_than_plain_zstd_for_small_files((basis, target) in pair()) {
        let full = encode_full(&target, &mut std::io::sink()).unwrap().payload_len;
        let sig = BasisSignature::calculate(&basis);
        for source in [Basis::Bytes(&basis), Basis::Signature(&sig)] {
            let chosen = encode(source, &target, &mut std::io::sink()).unwrap();
            prop_assert!(chosen.payload_len <= full, "{:?}: {} > {}", source, chosen.payload_len, full);
        }
    }

    #[test]
    fn garbage_is_refused(
        code in 0u8..3,
        with_basis in any::<bool>(),
        magic in any::<bool>(),
        garbage in prop::collection::vec(any::<u8>(), 0..2000),
        basis in blob(),
        expected_size in 0u64..5000,
        hash_seed in any::<u64>(),
    ) {
        let format = DeltaFormat::from_code(code).unwrap();
        let mut payload = if magic { vec![0x28, 0xb5, 0x2f, 0xfd] } else { Vec::new() };
        payload.extend_from_slice(&garbage);
        let hash = blake3::hash(&hash_seed.to_le_bytes());
        let mut out = Vec::new();
        let basis = with_basis.then_some(&basis[..]);
        let result = apply(format, basis, &payload, expected_size, &hash, &mut out);
        prop_assert!(result.is_err());
        prop_assert!(out.len() as u64 <= expected_size);
    }

    #[test]
    fn mangled_payloads_never_yield_wrong_output(
        (basis, target) in pair(),
        engine in 0usize..5,
        mangle in mangling(),
    ) {
        let (name, format, mut payload) = payloads(&basis, &target).swap_remove(engine);
        let original = payload.clone();
        mangle.apply_to(&mut payload);
        let mut out = Vec::new();
        let result = apply(format, Some(&basis), &payload, target.len() as u64, &blake3::hash(&target), &mut out);
        prop_assert!(out.len() <= target.len(), "{}: wrote {} bytes", name, out.len());
        if result.is_ok() {
            prop_assert!(out == target, "{}: accepted wrong output", name);
        } else {
            prop_assert!(payload != original, "{}: untouched payload refused", name);
        }
    }
}

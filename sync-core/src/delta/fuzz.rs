//! Entry points shared by the cargo-fuzz targets in `fuzz/` and the corpus replay test.
//!
//! Each function reads arbitrary bytes as the inputs of one decoder, runs it, and panics only if
//! an invariant breaks (output beyond the declared size, success with the wrong content, a
//! validated signature the engine then refuses), so any panic is a finding. Every input is
//! interpreted, missing fields read as zero, so no input is wasted on a length check.

use super::{
    apply, encode, encode_with_signature, Basis, BasisSignature, DeltaError, DeltaFormat,
    SignatureError, MAX_BLOCK_LEN, MAX_STRONG_LEN, MIN_BLOCK_LEN, MIN_STRONG_LEN,
};

/// Declared sizes are reduced modulo one more than this, so the fuzzer's memory limit measures
/// the decoder rather than the size a test case asks for.
pub const MAX_DECLARED_SIZE: u64 = 1 << 20;

/// Flag bit in the first byte of a [`apply_one`] input: apply without a basis.
pub const NO_BASIS: u8 = 0x80;

/// Reads fields from the front of a fuzz input, zero-padding past its end.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let head = self.bytes(N);
        out[..head.len()].copy_from_slice(head);
        out
    }

    fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.0.len())
    }
}

/// Build an [`apply_one`] input: flags (format code, plus [`NO_BASIS`]), declared size (u32 LE),
/// declared blake3 hash, basis length (u32 LE), basis, payload.
pub fn apply_input(
    flags: u8,
    expected_size: u32,
    expected_hash: &blake3::Hash,
    basis: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend_from_slice(&expected_size.to_le_bytes());
    out.extend_from_slice(expected_hash.as_bytes());
    out.extend_from_slice(&(basis.len() as u32).to_le_bytes());
    out.extend_from_slice(basis);
    out.extend_from_slice(payload);
    out
}

/// Fuzz [`apply`]: decode `data` as laid out by [`apply_input`] and apply the payload.
///
/// Panics if more than the declared size was written, or if `apply` succeeded with output that
/// does not match the declared size and hash.
pub fn apply_one(data: &[u8]) -> Result<(), DeltaError> {
    let mut fields = Fields(data);
    let [flags] = fields.array::<1>();
    let format = DeltaFormat::from_code(flags & 0x03).unwrap_or(DeltaFormat::Full);
    let expected_size = u64::from(u32::from_le_bytes(fields.array())) % (MAX_DECLARED_SIZE + 1);
    let expected_hash = blake3::Hash::from_bytes(fields.array());
    let basis_len = u32::from_le_bytes(fields.array()) as usize;
    let basis = fields.bytes(basis_len);
    let payload = fields.rest();
    let basis = (flags & NO_BASIS == 0).then_some(basis);

    let mut out = Vec::new();
    let result = apply(
        format,
        basis,
        payload,
        expected_size,
        &expected_hash,
        &mut out,
    );
    assert!(
        out.len() as u64 <= expected_size,
        "{format}: wrote {} bytes, declared {expected_size}",
        out.len()
    );
    if let Ok(verified) = &result {
        assert_eq!(
            out.len() as u64,
            expected_size,
            "{format}: short output accepted"
        );
        assert_eq!(
            blake3::hash(&out),
            expected_hash,
            "{format}: wrong output accepted"
        );
        assert_eq!(
            (verified.hash(), verified.size()),
            (expected_hash.into(), expected_size),
            "{format}: the check vouches for something else"
        );
    }
    result.map(|_| ())
}

/// Build a [`signature_decode_one`] input: the declared basis length (u64 LE), the signature
/// length (u32 LE), the signature, then the target to diff against it.
pub fn signature_input(basis_len: u64, signature: &[u8], target: &[u8]) -> Vec<u8> {
    let mut out = basis_len.to_le_bytes().to_vec();
    out.extend_from_slice(&(signature.len() as u32).to_le_bytes());
    out.extend_from_slice(signature);
    out.extend_from_slice(target);
    out
}

/// Fuzz [`BasisSignature::decode`], and when it accepts, the sender's whole path against that
/// signature: probe, diff and encode of the target that follows it in the input.
///
/// Panics if an accepted signature breaks the documented limits, if encoding against it fails,
/// or if a full payload produced for it does not round-trip.
pub fn signature_decode_one(data: &[u8]) -> Result<(), SignatureError> {
    let mut fields = Fields(data);
    let basis_len = u64::from_le_bytes(fields.array());
    let signature_len = u32::from_le_bytes(fields.array()) as usize;
    let bytes = fields.bytes(signature_len);
    let target = fields.rest();
    let signature = BasisSignature::decode(bytes, basis_len)?;

    assert!((MIN_BLOCK_LEN..=MAX_BLOCK_LEN).contains(&signature.block_len()));
    assert!((MIN_STRONG_LEN..=MAX_STRONG_LEN).contains(&signature.strong_len()));
    assert_eq!(
        signature.block_count(),
        basis_len.div_ceil(u64::from(signature.block_len()))
    );
    assert_eq!(signature.as_bytes(), bytes);

    let mut payload = Vec::new();
    let encoded = encode(Basis::Signature(&signature), target, &mut payload)
        .expect("encoding against a validated signature");
    assert_eq!(encoded.payload_len, payload.len() as u64);
    if encoded.format == DeltaFormat::Full {
        let hash = blake3::hash(target);
        apply(
            DeltaFormat::Full,
            None,
            &payload,
            target.len() as u64,
            &hash,
            &mut Vec::new(),
        )
        .expect("a full payload round-trips");
    }
    encode_with_signature(&signature, target, &mut Vec::new())
        .expect("diffing against a validated signature");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::{encode_full, encode_with_basis};

    #[test]
    fn valid_inputs_succeed() {
        let basis = b"<?php echo 'hello';\n".repeat(200);
        let mut target = basis.clone();
        target.extend_from_slice(b"<?php echo 'bye';\n");
        let hash = blake3::hash(&target);
        let size = target.len() as u32;

        let mut full = Vec::new();
        encode_full(&target, &mut full).unwrap();
        let mut zref = Vec::new();
        encode_with_basis(&basis, &target, &mut zref).unwrap();
        let mut rsync = Vec::new();
        let sig = BasisSignature::calculate(&basis);
        encode_with_signature(&sig, &target, &mut rsync).unwrap();

        let cases = [
            (DeltaFormat::Full.code() | NO_BASIS, &full),
            (DeltaFormat::Full.code(), &full),
            (DeltaFormat::ZstdRef.code(), &zref),
            (DeltaFormat::Rsync.code(), &rsync),
        ];
        for (flags, payload) in cases {
            let input = apply_input(flags, size, &hash, &basis, payload);
            apply_one(&input).unwrap_or_else(|e| panic!("flags {flags:#x}: {e}"));
        }
        let missing = apply_input(
            DeltaFormat::Rsync.code() | NO_BASIS,
            size,
            &hash,
            &basis,
            &rsync,
        );
        assert!(matches!(
            apply_one(&missing),
            Err(DeltaError::MissingBasis { .. })
        ));

        let input = signature_input(basis.len() as u64, sig.as_bytes(), &target);
        signature_decode_one(&input).unwrap();
        let wrong_len = signature_input(basis.len() as u64 * 3, sig.as_bytes(), &target);
        assert!(signature_decode_one(&wrong_len).is_err());
    }

    #[test]
    fn short_inputs_are_read_as_zero_padded() {
        for len in 0..48 {
            let data = vec![0u8; len];
            // All-zero fields: a full payload of declared size 0 that is empty, so not a frame.
            assert!(
                matches!(apply_one(&data), Err(DeltaError::MalformedFrame { .. })),
                "len {len}"
            );
            assert!(
                matches!(
                    signature_decode_one(&data),
                    Err(SignatureError::TooShort { len: 0 })
                ),
                "len {len}"
            );
        }
    }
}

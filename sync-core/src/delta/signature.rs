//! rsync signatures: the receiver's summary of its basis, and the checks that make a peer's
//! signature safe to diff against.
//!
//! The wire form is fast_rsync's (librsync's) MD4 signature: a 12-byte header (magic, block
//! length, strong-hash length, all big endian) followed by one entry per block, a 4-byte weak
//! rolling sum and the truncated MD4 of the block. A signature arriving from a peer is only
//! accepted if its block length, strong-hash length and block count are all plausible for the
//! basis size the sender already knows from the manifest, so the memory and CPU a hostile
//! signature can cost stay proportional to that basis.

use super::DeltaError;

/// Smallest block length a signature may use.
pub const MIN_BLOCK_LEN: u32 = 2 * 1024;
/// Largest block length a signature may use.
pub const MAX_BLOCK_LEN: u32 = 128 * 1024;
/// Strong-hash bytes per block in signatures this crate computes. With the 32-bit weak sum that
/// is 96 bits per block; a false match only costs a resend because every rebuilt file is checked
/// with blake3, and 8 rather than 16 bytes cuts the signature from 20 to 12 bytes per block.
pub const STRONG_LEN: u32 = 8;
/// Fewest strong-hash bytes accepted from a peer; fewer would make false matches routine.
pub const MIN_STRONG_LEN: u32 = 4;
/// Most strong-hash bytes accepted from a peer: the length of an MD4 digest.
pub const MAX_STRONG_LEN: u32 = 16;
/// Most blocks accepted in one signature (12 MiB of signature at [`STRONG_LEN`]; a 128 GiB
/// basis at [`MAX_BLOCK_LEN`]).
pub const MAX_SIGNATURE_BLOCKS: u64 = 1 << 20;

const HEADER_LEN: usize = 12;
const WEAK_LEN: usize = 4;
const MD4_MAGIC: u32 = 0x7273_0136;
/// The offset rsync's weak sum adds to every byte.
const WEAK_BIAS: u16 = 31;

/// Block length for a signature of a `len`-byte basis: about √len, clamped to
/// [[`MIN_BLOCK_LEN`], [`MAX_BLOCK_LEN`]] and rounded down to a multiple of 64.
///
/// A fixed block length would make a 1 GiB file's signature 13 times rsync's; √len keeps both
/// the block count and the block length near √len.
pub fn block_size_for(len: u64) -> u32 {
    let root = len.isqrt() / 64 * 64;
    root.clamp(u64::from(MIN_BLOCK_LEN), u64::from(MAX_BLOCK_LEN)) as u32
}

/// Upper bound on the raw rsync delta for a target of `target_len` bytes diffed against a
/// signature with blocks of at least [`MIN_BLOCK_LEN`]: every copy command (at most 17 bytes)
/// covers a whole block and every literal command (at most 9 bytes of header) sits between two
/// copies, so the overhead is under 26 bytes per 2 KiB.
pub(super) fn max_delta_len(target_len: u64) -> u64 {
    target_len
        .saturating_add(target_len / 64)
        .saturating_add(64)
}

/// Why a signature from a peer was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// Shorter than the header.
    #[error("signature is {len} bytes, shorter than its header; send the file in full")]
    TooShort {
        /// Length of the signature.
        len: usize,
    },
    /// Not an MD4 rsync signature.
    #[error("signature has unsupported magic {magic:#010x}; send the file in full")]
    Magic {
        /// The magic number found.
        magic: u32,
    },
    /// Block length outside [`MIN_BLOCK_LEN`]..=[`MAX_BLOCK_LEN`].
    #[error(
        "signature block length {len} is outside {MIN_BLOCK_LEN}..={MAX_BLOCK_LEN}; send the file in full"
    )]
    BlockLen {
        /// The block length found.
        len: u32,
    },
    /// Strong-hash length outside [`MIN_STRONG_LEN`]..=[`MAX_STRONG_LEN`].
    #[error(
        "signature strong-hash length {len} is outside {MIN_STRONG_LEN}..={MAX_STRONG_LEN}; send the file in full"
    )]
    StrongLen {
        /// The strong-hash length found.
        len: u32,
    },
    /// The body is not a whole number of block entries.
    #[error(
        "signature body of {len} bytes is not a whole number of {entry_len}-byte entries; send the file in full"
    )]
    Ragged {
        /// Length of the body after the header.
        len: usize,
        /// Length of one block entry.
        entry_len: usize,
    },
    /// The block count does not match the basis size from the manifest.
    #[error(
        "signature has {blocks} blocks but a {basis_len}-byte basis has {expected}; the receiver's basis differs from the manifest, send the file in full"
    )]
    BlockCount {
        /// Blocks in the signature.
        blocks: u64,
        /// Blocks the basis size implies.
        expected: u64,
        /// The basis size from the manifest.
        basis_len: u64,
    },
    /// The basis would need more than [`MAX_SIGNATURE_BLOCKS`] blocks at this block length.
    #[error(
        "a {basis_len}-byte basis needs {blocks} blocks of {block_len} bytes, more than the {MAX_SIGNATURE_BLOCKS} allowed; send the file in full"
    )]
    TooManyBlocks {
        /// The basis size from the manifest.
        basis_len: u64,
        /// The block length in the signature.
        block_len: u32,
        /// Blocks the basis would need.
        blocks: u64,
    },
    /// fast_rsync refused the signature despite the checks above.
    #[error("signature refused by the rsync engine; send the file in full")]
    Unsupported,
}

/// A validated rsync signature of a basis file.
///
/// Built either locally with [`BasisSignature::calculate`] (receiver side) or from a peer's
/// bytes with [`BasisSignature::decode`] (sender side). Either way its block length, strong-hash
/// length and block count are within the limits above.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BasisSignature {
    inner: fast_rsync::Signature,
    basis_len: u64,
    block_len: u32,
    strong_len: u32,
}

impl BasisSignature {
    /// Compute the signature of `basis` with [`block_size_for`] and [`STRONG_LEN`].
    pub fn calculate(basis: &[u8]) -> BasisSignature {
        let block_len = block_size_for(basis.len() as u64);
        let options = fast_rsync::SignatureOptions {
            block_size: block_len,
            crypto_hash_size: STRONG_LEN,
        };
        BasisSignature {
            inner: fast_rsync::Signature::calculate(basis, options),
            basis_len: basis.len() as u64,
            block_len,
            strong_len: STRONG_LEN,
        }
    }

    /// Validate a signature received from a peer for a basis the manifest says is `basis_len`
    /// bytes long.
    ///
    /// Checks happen on the header before anything is copied: the magic must be MD4, the block
    /// length within [[`MIN_BLOCK_LEN`], [`MAX_BLOCK_LEN`]], the strong-hash length within
    /// [[`MIN_STRONG_LEN`], [`MAX_STRONG_LEN`]], and the number of blocks exactly what
    /// `basis_len` implies (at most [`MAX_SIGNATURE_BLOCKS`]).
    pub fn decode(bytes: &[u8], basis_len: u64) -> Result<BasisSignature, SignatureError> {
        let Some((header, body)) = bytes.split_first_chunk::<HEADER_LEN>() else {
            return Err(SignatureError::TooShort { len: bytes.len() });
        };
        let field =
            |i: usize| u32::from_be_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let (magic, block_len, strong_len) = (field(0), field(4), field(8));
        if magic != MD4_MAGIC {
            return Err(SignatureError::Magic { magic });
        }
        if !(MIN_BLOCK_LEN..=MAX_BLOCK_LEN).contains(&block_len) {
            return Err(SignatureError::BlockLen { len: block_len });
        }
        if !(MIN_STRONG_LEN..=MAX_STRONG_LEN).contains(&strong_len) {
            return Err(SignatureError::StrongLen { len: strong_len });
        }
        let expected = basis_len.div_ceil(u64::from(block_len));
        if expected > MAX_SIGNATURE_BLOCKS {
            return Err(SignatureError::TooManyBlocks {
                basis_len,
                block_len,
                blocks: expected,
            });
        }
        let entry_len = WEAK_LEN + strong_len as usize;
        if body.len() % entry_len != 0 {
            return Err(SignatureError::Ragged {
                len: body.len(),
                entry_len,
            });
        }
        let blocks = (body.len() / entry_len) as u64;
        if blocks != expected {
            return Err(SignatureError::BlockCount {
                blocks,
                expected,
                basis_len,
            });
        }
        let inner = fast_rsync::Signature::deserialize(bytes.to_vec())
            .map_err(|_| SignatureError::Unsupported)?;
        Ok(BasisSignature {
            inner,
            basis_len,
            block_len,
            strong_len,
        })
    }

    /// The serialized signature, as sent to the peer.
    pub fn as_bytes(&self) -> &[u8] {
        self.inner.serialized()
    }

    /// Length of the basis this signature describes.
    pub fn basis_len(&self) -> u64 {
        self.basis_len
    }

    /// Block length in bytes.
    pub fn block_len(&self) -> u32 {
        self.block_len
    }

    /// Strong-hash bytes per block.
    pub fn strong_len(&self) -> u32 {
        self.strong_len
    }

    /// Number of blocks.
    pub fn block_count(&self) -> u64 {
        ((self.as_bytes().len() - HEADER_LEN) / self.entry_len()) as u64
    }

    fn entry_len(&self) -> usize {
        WEAK_LEN + self.strong_len as usize
    }

    /// The (weak sum, strong hash) of every block, in order.
    pub(super) fn blocks(&self) -> impl Iterator<Item = (u32, &[u8])> {
        self.as_bytes()[HEADER_LEN..]
            .chunks_exact(self.entry_len())
            .map(|entry| {
                let (weak, strong) = entry.split_at(WEAK_LEN);
                (
                    u32::from_be_bytes([weak[0], weak[1], weak[2], weak[3]]),
                    strong,
                )
            })
    }

    /// The strong hash of block `index`, if it exists.
    pub(super) fn strong(&self, index: usize) -> Option<&[u8]> {
        let entry_len = self.entry_len();
        let start = HEADER_LEN + index.checked_mul(entry_len)? + WEAK_LEN;
        self.as_bytes().get(start..start + self.strong_len as usize)
    }

    /// The strong hash of `window` as this signature would record it.
    pub(super) fn strong_of(&self, window: &[u8]) -> Vec<u8> {
        let options = fast_rsync::SignatureOptions {
            block_size: self.block_len,
            crypto_hash_size: self.strong_len,
        };
        let one = fast_rsync::Signature::calculate(window, options);
        one.serialized()[HEADER_LEN + WEAK_LEN..].to_vec()
    }

    /// The raw (uncompressed) rsync delta from this signature's basis to `target`.
    pub(super) fn diff(&self, target: &[u8]) -> Result<Vec<u8>, DeltaError> {
        let index = self.inner.index();
        let mut delta = Vec::new();
        fast_rsync::diff(&index, target, &mut delta).map_err(|e| match e {
            fast_rsync::DiffError::Io(e) => DeltaError::Encode(e),
            _ => DeltaError::Signature(SignatureError::Unsupported),
        })?;
        Ok(delta)
    }
}

/// rsync's weak rolling sum of `buf`, bit for bit as fast_rsync computes it.
pub(super) fn weak_sum(buf: &[u8]) -> u32 {
    let (mut s1, mut s2) = (0u16, 0u16);
    for &b in buf {
        s1 = s1.wrapping_add(u16::from(b));
        s2 = s2.wrapping_add(s1);
    }
    let len = buf.len() as u32;
    s1 = s1.wrapping_add((len as u16).wrapping_mul(WEAK_BIAS));
    s2 = s2
        .wrapping_add(((len.wrapping_mul(len.wrapping_add(1)) / 2) as u16).wrapping_mul(WEAK_BIAS));
    u32::from(s1) | (u32::from(s2) << 16)
}

/// Slide the weak sum of a `len`-byte window one byte on: drop `old`, take in `new`.
pub(super) fn roll(sum: u32, len: u32, old: u8, new: u8) -> u32 {
    let (mut s1, mut s2) = (sum as u16, (sum >> 16) as u16);
    let (old, new) = (u16::from(old), u16::from(new));
    s1 = s1.wrapping_add(new).wrapping_sub(old);
    s2 = s2
        .wrapping_add(s1)
        .wrapping_sub((len as u16).wrapping_mul(old.wrapping_add(WEAK_BIAS)));
    u32::from(s1) | (u32::from(s2) << 16)
}

#[cfg(test)]
mod tests {
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

    /// Hand-built signature bytes: magic, block length, strong length, then `blocks` entries.
    fn raw_signature(
        magic: u32,
        block_len: u32,
        strong_len: u32,
        blocks: &[(u32, Vec<u8>)],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&magic.to_be_bytes());
        out.extend_from_slice(&block_len.to_be_bytes());
        out.extend_from_slice(&strong_len.to_be_bytes());
        for (weak, strong) in blocks {
            out.extend_from_slice(&weak.to_be_bytes());
            out.extend_from_slice(strong);
        }
        out
    }

    #[test]
    fn block_size_table() {
        const KIB: u64 = 1024;
        const MIB: u64 = 1024 * KIB;
        const GIB: u64 = 1024 * MIB;
        let cases: &[(u64, u32)] = &[
            (0, 2048),
            (1, 2048),
            (100 * KIB, 2048),
            (4 * MIB, 2048),
            (4 * MIB + 1, 2048),
            (16 * MIB, 4096),
            (100_000_000, 9984),
            (GIB, 32768),
            (16 * GIB, 131072),
            (64 * GIB, 131072),
            (u64::MAX, 131072),
        ];
        for &(len, want) in cases {
            assert_eq!(block_size_for(len), want, "block_size_for({len})");
        }
    }

    #[test]
    fn block_size_is_always_within_limits_and_aligned() {
        let mut len = 1u64;
        while len < u64::MAX / 3 {
            let b = block_size_for(len);
            assert!((MIN_BLOCK_LEN..=MAX_BLOCK_LEN).contains(&b), "{len} -> {b}");
            assert_eq!(b % 64, 0, "{len} -> {b}");
            len = len * 3 + 1;
        }
    }

    #[test]
    fn weak_sum_matches_fast_rsync_for_every_block_length() {
        for block_len in [MIN_BLOCK_LEN, 4096, 65536, 65600, MAX_BLOCK_LEN] {
            let basis = noise(block_len as usize * 2 + 17, u64::from(block_len));
            let options = fast_rsync::SignatureOptions {
                block_size: block_len,
                crypto_hash_size: STRONG_LEN,
            };
            let raw = fast_rsync::Signature::calculate(&basis, options).into_serialized();
            let sig = BasisSignature::decode(&raw, basis.len() as u64).unwrap();
            for ((weak, _), block) in sig.blocks().zip(basis.chunks(block_len as usize)) {
                assert_eq!(weak, weak_sum(block), "block length {block_len}");
            }
        }
    }

    #[test]
    fn rolling_equals_recomputing() {
        let data = noise(3000, 9);
        for len in [1usize, 64, 2048] {
            let mut sum = weak_sum(&data[..len]);
            for start in 1..data.len() - len {
                sum = roll(sum, len as u32, data[start - 1], data[start + len - 1]);
                assert_eq!(
                    sum,
                    weak_sum(&data[start..start + len]),
                    "len {len} at {start}"
                );
            }
        }
    }

    #[test]
    fn strong_of_matches_the_recorded_hash() {
        let basis = noise(3 * 2048, 5);
        let sig = BasisSignature::calculate(&basis);
        for (i, block) in basis.chunks(2048).enumerate() {
            assert_eq!(sig.strong(i).unwrap(), &sig.strong_of(block)[..]);
        }
        assert_eq!(sig.strong(3), None);
    }

    #[test]
    fn calculated_signature_decodes_to_itself() {
        for len in [0usize, 1, 2047, 2048, 2049, 10_000] {
            let basis = noise(len, len as u64 + 1);
            let sig = BasisSignature::calculate(&basis);
            let back = BasisSignature::decode(sig.as_bytes(), len as u64).unwrap();
            assert_eq!(back, sig);
            assert_eq!(back.block_count(), (len as u64).div_ceil(2048));
        }
    }

    #[test]
    fn hostile_signatures_are_refused() {
        let md4 = MD4_MAGIC;
        let entry = |weak: u32| (weak, vec![0xab; 8]);
        type Check = fn(&SignatureError) -> bool;
        let cases: Vec<(&str, Vec<u8>, u64, Check)> = vec![
            ("empty", Vec::new(), 0, |e| {
                matches!(e, SignatureError::TooShort { len: 0 })
            }),
            ("short header", vec![0x72, 0x73, 0x01], 0, |e| {
                matches!(e, SignatureError::TooShort { .. })
            }),
            (
                "blake2 magic",
                raw_signature(0x7273_0137, 2048, 8, &[]),
                0,
                |e| matches!(e, SignatureError::Magic { .. }),
            ),
            (
                "delta magic",
                raw_signature(0x7273_0236, 2048, 8, &[]),
                0,
                |e| matches!(e, SignatureError::Magic { .. }),
            ),
            ("zero block length", raw_signature(md4, 0, 8, &[]), 0, |e| {
                matches!(e, SignatureError::BlockLen { len: 0 })
            }),
            (
                "tiny block length",
                raw_signature(md4, 1, 8, &[entry(1)]),
                1,
                |e| matches!(e, SignatureError::BlockLen { len: 1 }),
            ),
            (
                "huge block length",
                raw_signature(md4, u32::MAX, 8, &[entry(1)]),
                10,
                |e| matches!(e, SignatureError::BlockLen { .. }),
            ),
            (
                "strong length 17",
                raw_signature(md4, 2048, 17, &[]),
                0,
                |e| matches!(e, SignatureError::StrongLen { len: 17 }),
            ),
            (
                "strong length u32::MAX",
                raw_signature(md4, 2048, u32::MAX, &[]),
                0,
                |e| matches!(e, SignatureError::StrongLen { .. }),
            ),
            (
                "strong length 0",
                raw_signature(md4, 2048, 0, &[]),
                0,
                |e| matches!(e, SignatureError::StrongLen { len: 0 }),
            ),
            (
                "ragged body",
                {
                    let mut s = raw_signature(md4, 2048, 8, &[entry(1)]);
                    s.push(0);
                    s
                },
                2048,
                |e| matches!(e, SignatureError::Ragged { .. }),
            ),
            (
                "more blocks than the basis",
                raw_signature(md4, 2048, 8, &[entry(1), entry(2)]),
                2048,
                |e| {
                    matches!(
                        e,
                        SignatureError::BlockCount {
                            blocks: 2,
                            expected: 1,
                            ..
                        }
                    )
                },
            ),
            (
                "fewer blocks than the basis",
                raw_signature(md4, 2048, 8, &[entry(1)]),
                4097,
                |e| {
                    matches!(
                        e,
                        SignatureError::BlockCount {
                            blocks: 1,
                            expected: 3,
                            ..
                        }
                    )
                },
            ),
            (
                "blocks for an empty basis",
                raw_signature(md4, 2048, 8, &[entry(1)]),
                0,
                |e| matches!(e, SignatureError::BlockCount { expected: 0, .. }),
            ),
            (
                "absurd basis size",
                raw_signature(md4, 2048, 8, &[entry(1)]),
                u64::MAX,
                |e| matches!(e, SignatureError::TooManyBlocks { .. }),
            ),
        ];
        for (name, bytes, basis_len, check) in cases {
            match BasisSignature::decode(&bytes, basis_len) {
                Ok(_) => panic!("{name}: accepted"),
                Err(e) => assert!(check(&e), "{name}: wrong error {e:?}"),
            }
        }
    }

    #[test]
    fn limits_are_inclusive() {
        let cases = [
            (MIN_BLOCK_LEN, MIN_STRONG_LEN),
            (MAX_BLOCK_LEN, MAX_STRONG_LEN),
            (MIN_BLOCK_LEN, MAX_STRONG_LEN),
        ];
        for (block_len, strong_len) in cases {
            let entry = (1u32, vec![0; strong_len as usize]);
            let bytes = raw_signature(MD4_MAGIC, block_len, strong_len, &[entry.clone(), entry]);
            let sig = BasisSignature::decode(&bytes, u64::from(block_len) + 1).unwrap();
            assert_eq!(
                (sig.block_len(), sig.strong_len(), sig.block_count()),
                (block_len, strong_len, 2)
            );
        }
    }

    #[test]
    fn a_million_equal_weak_sums_stay_bounded() {
        // Every block shares one weak sum and has a distinct strong hash: the worst case for the
        // index and for the diff's collision handling.
        let blocks = MAX_SIGNATURE_BLOCKS as usize;
        let mut bytes = raw_signature(MD4_MAGIC, MIN_BLOCK_LEN, STRONG_LEN, &[]);
        let target = noise(64 * 1024, 77);
        let weak = weak_sum(&target[..MIN_BLOCK_LEN as usize]);
        bytes.reserve(blocks * 12);
        for i in 0..blocks as u64 {
            bytes.extend_from_slice(&weak.to_be_bytes());
            bytes.extend_from_slice(&i.to_be_bytes());
        }
        let basis_len = blocks as u64 * u64::from(MIN_BLOCK_LEN);
        let sig = BasisSignature::decode(&bytes, basis_len).unwrap();
        assert_eq!(sig.block_count(), blocks as u64);
        let delta = sig.diff(&target).unwrap();
        // Nothing matches, so the delta is the target as one literal plus framing.
        assert!(delta.len() as u64 <= max_delta_len(target.len() as u64));
        assert!(delta.len() > target.len());
        let too_many = BasisSignature::decode(&bytes, basis_len + u64::from(MIN_BLOCK_LEN));
        assert!(matches!(
            too_many,
            Err(SignatureError::TooManyBlocks { .. })
        ));
    }

    #[test]
    fn honest_deltas_fit_the_bound() {
        // The worst honest delta alternates one-block copies with one-byte literals.
        let basis = noise(64 * 2048, 3);
        let mut target = Vec::new();
        for block in basis.chunks(2048) {
            target.extend_from_slice(block);
            target.push(0x5a);
        }
        let sig = BasisSignature::calculate(&basis);
        assert_eq!(sig.block_len(), 2048);
        let delta = sig.diff(&target).unwrap();
        assert!(
            delta.len() < target.len() / 100,
            "every block should have been copied"
        );
        assert!(delta.len() as u64 <= max_delta_len(target.len() as u64));
    }
}

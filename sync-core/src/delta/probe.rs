//! Cheap relatedness probes, run before paying for a delta.
//!
//! fast_rsync diffs unrelated data about 7x slower than similar data (~0.145 vs ~1 GB/s), and
//! zstd with a useless reference prefix only adds work, so a new or rewritten file must not reach
//! either engine. Each probe looks at a small, bounded sample for evidence that the target shares
//! content with the basis.

use std::collections::{HashMap, HashSet};

use super::signature::{roll, weak_sum, BasisSignature};

/// A probe's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Relatedness {
    /// The target shares enough content with the basis for a delta to be worth trying.
    Related,
    /// The target looks new or rewritten: send it in full without diffing.
    Unrelated,
    /// Too little data to tell.
    Unknown,
}

/// Gear table for the content-defined anchors, filled by splitmix64 so it is fixed forever.
const GEAR: [u64; 256] = gear_table();

const fn gear_table() -> [u64; 256] {
    let mut table = [0u64; 256];
    let mut state = 0x5eed_0f5e_1a7e_0d00_u64;
    let mut i = 0;
    while i < 256 {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        table[i] = z ^ (z >> 31);
        i += 1;
    }
    table
}

/// One anchor per 256 bytes on average.
const ANCHOR_BITS: u32 = 8;
/// A gear hash depends on exactly the last 64 bytes once that many have been seen; anchors
/// before that depend on where the scan started and are skipped.
const GEAR_WARMUP: usize = 63;
/// Up to this many bytes in basis plus target, both are scanned whole.
const FULL_SCAN_LIMIT: usize = 256 * 1024;
/// Target regions sampled on larger files, and their length.
const SAMPLE_REGIONS: usize = 16;
const SAMPLE_LEN: usize = 4 * 1024;
/// How far content may have moved, relative to its proportional position, and still be found.
const SAMPLE_MARGIN: usize = 16 * 1024;
/// Fewer target anchors than this gives no verdict.
const MIN_TARGET_ANCHORS: u32 = 8;
/// Pairs smaller than this (basis plus target) get no verdict without being looked at: `encode`
/// then makes the delta and the plain payload and keeps the smaller, which for such sizes costs
/// less than the probe's pass over both (on the bench corpus's 525 changed files, mostly a few
/// KiB, the probe was a third of the encoding time).
const PROBE_FROM: usize = 64 * 1024;

/// Calls `f` with the fingerprint of each content-defined anchor in `data`. Identical content
/// anchors at the same places with the same fingerprints wherever it sits in either file.
fn for_each_anchor(data: &[u8], mut f: impl FnMut(u64)) {
    let mask = !0u64 << (64 - ANCHOR_BITS);
    let mut h = 0u64;
    for (i, &b) in data.iter().enumerate() {
        h = (h << 1).wrapping_add(GEAR[usize::from(b)]);
        if h & mask == 0 && i >= GEAR_WARMUP {
            f(h);
        }
    }
}

/// `SAMPLE_REGIONS` evenly spaced target regions, each paired with the basis region around the
/// same proportional position, widened by `SAMPLE_MARGIN` on both sides.
fn sample_regions(
    basis_len: usize,
    target_len: usize,
) -> Vec<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    let span = target_len.saturating_sub(SAMPLE_LEN);
    (0..SAMPLE_REGIONS)
        .map(|i| {
            let t_start = span * i / (SAMPLE_REGIONS - 1);
            let t_end = (t_start + SAMPLE_LEN).min(target_len);
            let b_mid = (t_start as u128 * basis_len as u128 / target_len.max(1) as u128) as usize;
            let b_start = b_mid.saturating_sub(SAMPLE_MARGIN);
            let b_end = (b_mid + SAMPLE_LEN + SAMPLE_MARGIN).min(basis_len);
            (t_start..t_end, b_start.min(b_end)..b_end)
        })
        .collect()
}

/// Probe for the zstd-ref engine: the share of the target's content-defined anchors that also
/// occur in the basis; related when at least 1 in 16 is shared. Pairs under [`PROBE_FROM`] are
/// not probed, pairs up to `FULL_SCAN_LIMIT` are scanned whole, and larger ones in sampled
/// regions (about 0.6 MiB in all), since scanning a large basis whole would cost more than the
/// zstd-ref encode it is meant to save.
pub(super) fn resemblance(basis: &[u8], target: &[u8]) -> Relatedness {
    if basis.len() + target.len() < PROBE_FROM {
        return Relatedness::Unknown;
    }
    let (mut seen, mut shared) = (0u32, 0u32);
    let mut count = |basis: &[u8], target: &[u8]| {
        let mut anchors = HashSet::new();
        for_each_anchor(basis, |fp| {
            anchors.insert(fp);
        });
        for_each_anchor(target, |fp| {
            seen += 1;
            shared += u32::from(anchors.contains(&fp));
        });
    };
    if basis.len() + target.len() <= FULL_SCAN_LIMIT {
        count(basis, target);
    } else {
        for (t, b) in sample_regions(basis.len(), target.len()) {
            count(&basis[b], &target[t]);
        }
    }
    if seen < MIN_TARGET_ANCHORS {
        Relatedness::Unknown
    } else if u64::from(shared) * 16 >= u64::from(seen) {
        Relatedness::Related
    } else {
        Relatedness::Unrelated
    }
}

/// Target regions the rsync probe samples.
const PROBE_SPANS: usize = 16;
/// Strong hashes the rsync probe may compute in total, which bounds its cost even against a
/// signature whose weak sums were chosen to collide with the target.
const STRONG_CHECKS: u32 = 64;

/// Probe for the rsync engine: at evenly spaced spans of the target, slide a window over one
/// block length of positions (enough to meet a block boundary of the basis if the region is
/// unchanged) and confirm weak-sum hits with the strong hash. Related when at least a quarter
/// of the spans contain a confirmed block.
pub(super) fn rsync_relatedness(signature: &BasisSignature, target: &[u8]) -> Relatedness {
    let block_len = signature.block_len() as usize;
    if signature.block_count() == 0 || target.len() < block_len {
        return Relatedness::Unrelated;
    }
    let mut first_block: HashMap<u32, usize> = HashMap::new();
    for (index, (weak, _)) in signature.blocks().enumerate() {
        first_block.entry(weak).or_insert(index);
    }
    let windows = target.len() - block_len + 1;
    let spans = PROBE_SPANS.min(windows);
    let (mut confirmed, mut budget) = (0usize, STRONG_CHECKS);
    'spans: for span in 0..spans {
        let start = if spans == 1 {
            0
        } else {
            (span as u64 * (windows - 1) as u64 / (spans - 1) as u64) as usize
        };
        let end = (start + block_len).min(windows);
        let mut sum = weak_sum(&target[start..start + block_len]);
        for pos in start..end {
            if pos > start {
                sum = roll(
                    sum,
                    block_len as u32,
                    target[pos - 1],
                    target[pos + block_len - 1],
                );
            }
            let Some(&index) = first_block.get(&sum) else {
                continue;
            };
            if budget == 0 {
                break 'spans;
            }
            budget -= 1;
            let window = &target[pos..pos + block_len];
            if signature.strong(index) == Some(&signature.strong_of(window)[..]) {
                confirmed += 1;
                continue 'spans;
            }
        }
    }
    if confirmed > 0 && confirmed * 4 >= spans {
        Relatedness::Related
    } else {
        Relatedness::Unrelated
    }
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

    /// `data` with `edits` short overwrites spread evenly, and a few bytes inserted at the front.
    fn edited(data: &[u8], edits: usize) -> Vec<u8> {
        let mut out = b"<?php // edited\n".to_vec();
        out.extend_from_slice(data);
        let step = (out.len() / (edits + 1)).max(1);
        for i in 1..=edits {
            let at = (i * step).min(out.len() - 1);
            out[at] ^= 0x55;
        }
        out
    }

    #[test]
    fn gear_entries_are_distinct() {
        assert_eq!(GEAR.iter().collect::<HashSet<_>>().len(), 256);
    }

    #[test]
    fn sample_regions_stay_in_bounds() {
        for (basis_len, target_len) in [
            (0, 300_000),
            (300_000, 0),
            (1, 1 << 20),
            (4 << 20, 4 << 20),
            (1 << 20, 9 << 20),
        ] {
            for (t, b) in sample_regions(basis_len, target_len) {
                assert!(
                    t.start <= t.end && t.end <= target_len,
                    "{t:?} in {target_len}"
                );
                assert!(
                    b.start <= b.end && b.end <= basis_len,
                    "{b:?} in {basis_len}"
                );
            }
        }
        // Same-sized files: each basis region covers its target region plus the margin.
        for (t, b) in sample_regions(1 << 22, 1 << 22) {
            assert!(
                b.start <= t.start.saturating_sub(SAMPLE_MARGIN) && b.end >= t.end.min(1 << 22)
            );
        }
    }

    #[test]
    fn resemblance_verdicts() {
        let basis = noise(200_000, 1);
        let cases: Vec<(&str, Vec<u8>, Relatedness)> = vec![
            ("identical", basis.clone(), Relatedness::Related),
            ("small edits", edited(&basis, 20), Relatedness::Related),
            (
                "second half only",
                basis[100_000..].to_vec(),
                Relatedness::Related,
            ),
            ("unrelated", noise(200_000, 2), Relatedness::Unrelated),
            ("too small to tell", noise(300, 3), Relatedness::Unknown),
            ("empty", Vec::new(), Relatedness::Unknown),
        ];
        for (name, target, want) in cases {
            assert_eq!(resemblance(&basis, &target), want, "{name}");
        }
        // Below PROBE_FROM in all, nothing is looked at, however related or not.
        let small = noise(PROBE_FROM / 2 - 1, 4);
        for (name, target) in [
            ("identical small", small.clone()),
            ("unrelated small", noise(PROBE_FROM / 2, 5)),
        ] {
            assert_eq!(resemblance(&small, &target), Relatedness::Unknown, "{name}");
        }
        let related = noise(PROBE_FROM / 2, 6);
        assert_eq!(
            resemblance(&related, &related),
            Relatedness::Related,
            "a pair of exactly PROBE_FROM is probed"
        );
    }

    #[test]
    fn rsync_verdicts() {
        let basis = noise(300_000, 4);
        let sig = BasisSignature::calculate(&basis);
        let mut last_third_kept = basis.clone();
        last_third_kept[..200_000].copy_from_slice(&noise(200_000, 6));
        let cases: Vec<(&str, Vec<u8>, Relatedness)> = vec![
            ("identical", basis.clone(), Relatedness::Related),
            ("small edits", edited(&basis, 20), Relatedness::Related),
            ("unrelated", noise(300_000, 5), Relatedness::Unrelated),
            ("last third kept", last_third_kept, Relatedness::Related),
            (
                "shorter than a block",
                basis[..2047].to_vec(),
                Relatedness::Unrelated,
            ),
            (
                "exactly one block",
                basis[..2048].to_vec(),
                Relatedness::Related,
            ),
            ("empty", Vec::new(), Relatedness::Unrelated),
        ];
        for (name, target, want) in cases {
            assert_eq!(rsync_relatedness(&sig, &target), want, "{name}");
        }
        let empty = BasisSignature::calculate(&[]);
        assert_eq!(rsync_relatedness(&empty, &basis), Relatedness::Unrelated);
    }

    #[test]
    fn rsync_probe_gives_up_on_weak_sums_that_never_confirm() {
        // A hostile signature listing the weak sum of every target window with wrong strong
        // hashes: the probe must stop after its strong-check budget and call it unrelated.
        let target = noise(64 * 1024, 8);
        let block_len = 2048usize;
        let blocks = 64 * 1024 / block_len;
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&0x7273_0136u32.to_be_bytes());
        bytes.extend_from_slice(&(block_len as u32).to_be_bytes());
        bytes.extend_from_slice(&8u32.to_be_bytes());
        for i in 0..blocks {
            // Offset by one byte, so no block boundary of the target coincides.
            let at = i * block_len + 1;
            let at = at.min(target.len() - block_len);
            bytes.extend_from_slice(&weak_sum(&target[at..at + block_len]).to_be_bytes());
            bytes.extend_from_slice(&[0xee; 8]);
        }
        let sig = BasisSignature::decode(&bytes, target.len() as u64).unwrap();
        assert_eq!(rsync_relatedness(&sig, &target), Relatedness::Unrelated);
    }
}

//! The big-file pair: one large random file in a, and in b the same file with ten small edits.
//!
//! Both files are written as one stream in 1 MiB chunks, so a GiB-sized pair costs a few MiB of
//! memory. The edits mix overwrites, insertions and deletions, spaced through the whole file, so a
//! delta algorithm has to cope with shifted alignment as well as changed blocks.

use std::fs::{File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::SystemTime;

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::output::io_error;
use crate::GenerateError;

/// Where the big file lives inside each release.
pub const BIG_FILE_PATH: &str = "data/big.bin";
pub(crate) const MIN_BIG_FILE: u64 = 64 * 1024;
const EDITS: u64 = 10;
const CHUNK: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Overwrite(Vec<u8>),
    Insert(Vec<u8>),
    Delete(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Edit {
    offset: u64,
    op: Op,
}

/// One edit in each tenth of the file, at least 128 bytes from the next one.
fn plan_edits(rng: &mut ChaCha8Rng, size: u64) -> Vec<Edit> {
    let slot = size / EDITS;
    (0..EDITS)
        .map(|i| {
            let offset = i * slot + rng.gen_range(0..slot - 128);
            let len = rng.gen_range(1..=64usize);
            let mut bytes = vec![0u8; len];
            rng.fill_bytes(&mut bytes);
            let op = match i % 3 {
                0 => Op::Overwrite(bytes),
                1 => Op::Insert(bytes),
                _ => Op::Delete(len as u64),
            };
            Edit { offset, op }
        })
        .collect()
}

fn create(path: &Path) -> Result<File, GenerateError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(io_error(path))
}

/// Writes the pair to `a` and `b` (both files' parent directories must exist); returns the sizes.
pub(crate) fn write_big_pair(
    a: &Path,
    b: &Path,
    seed: u64,
    size: u64,
    mtimes: [SystemTime; 2],
) -> Result<[u64; 2], GenerateError> {
    write_chunked(a, b, seed, size, CHUNK, mtimes)
}

/// `chunk` must be a multiple of 4: ChaCha hands out whole 32-bit words, so other sizes would change
/// the byte stream with the chunking.
fn write_chunked(
    a: &Path,
    b: &Path,
    seed: u64,
    size: u64,
    chunk_size: usize,
    mtimes: [SystemTime; 2],
) -> Result<[u64; 2], GenerateError> {
    let mut data_rng = ChaCha8Rng::seed_from_u64(seed);
    data_rng.set_stream(1);
    let mut edit_rng = ChaCha8Rng::seed_from_u64(seed);
    edit_rng.set_stream(2);
    let edits = plan_edits(&mut edit_rng, size);

    let mut fa = create(a)?;
    let mut fb = create(b)?;
    let mut buf = vec![0u8; chunk_size];
    let mut pos = 0u64;
    let mut skip = 0u64;
    let mut next = edits.iter().peekable();
    let mut b_len = 0u64;
    while pos < size {
        let len = chunk_size.min((size - pos) as usize);
        let chunk = &mut buf[..len];
        data_rng.fill_bytes(chunk);
        fa.write_all(chunk).map_err(io_error(a))?;

        let mut out = |bytes: &[u8]| -> Result<(), GenerateError> {
            b_len += bytes.len() as u64;
            fb.write_all(bytes).map_err(io_error(b))
        };
        let dropped = skip.min(len as u64) as usize;
        let mut cur = dropped;
        skip -= dropped as u64;
        while let Some(edit) = next.next_if(|e| e.offset < pos + len as u64) {
            let at = (edit.offset - pos) as usize;
            debug_assert!(
                at >= cur,
                "edits are spaced further apart than they are long"
            );
            out(&chunk[cur..at])?;
            cur = at;
            let drop = match &edit.op {
                Op::Overwrite(bytes) => {
                    out(bytes)?;
                    bytes.len() as u64
                }
                Op::Insert(bytes) => {
                    out(bytes)?;
                    0
                }
                Op::Delete(n) => *n,
            };
            let here = drop.min((len - cur) as u64);
            cur += here as usize;
            skip = drop - here;
        }
        out(&chunk[cur..])?;
        pos += len as u64;
    }
    for (file, path, mtime) in [(&fa, a, mtimes[0]), (&fb, b, mtimes[1])] {
        file.set_permissions(Permissions::from_mode(0o644))
            .and_then(|()| file.set_modified(mtime))
            .map_err(io_error(path))?;
    }
    Ok([size, b_len])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same edits applied to the whole file in memory, to check the streaming version against.
    fn reference(seed: u64, size: u64, chunk_size: usize) -> (Vec<u8>, Vec<u8>) {
        let mut data_rng = ChaCha8Rng::seed_from_u64(seed);
        data_rng.set_stream(1);
        let mut a = vec![0u8; size as usize];
        for chunk in a.chunks_mut(chunk_size) {
            data_rng.fill_bytes(chunk);
        }
        let mut edit_rng = ChaCha8Rng::seed_from_u64(seed);
        edit_rng.set_stream(2);
        let mut b = Vec::new();
        let mut cur = 0usize;
        for edit in plan_edits(&mut edit_rng, size) {
            let at = edit.offset as usize;
            b.extend_from_slice(&a[cur..at]);
            cur = at;
            match edit.op {
                Op::Overwrite(bytes) => {
                    cur += bytes.len();
                    b.extend_from_slice(&bytes);
                }
                Op::Insert(bytes) => b.extend_from_slice(&bytes),
                Op::Delete(n) => cur += n as usize,
            }
        }
        b.extend_from_slice(&a[cur..]);
        (a, b)
    }

    #[test]
    fn streamed_pair_matches_the_in_memory_edit() {
        // Small chunks make overwrites and deletions straddle chunk boundaries.
        let cases = [
            (1, MIN_BIG_FILE, 64),
            (2, MIN_BIG_FILE + 13, 100),
            (3, 3 * CHUNK as u64 + 17, CHUNK),
            (4, 200_000, 4096),
        ];
        for (seed, size, chunk) in cases {
            let dir = tempfile::tempdir().unwrap();
            let (pa, pb) = (dir.path().join("a"), dir.path().join("b"));
            let now = SystemTime::now();
            let lens = write_chunked(&pa, &pb, seed, size, chunk, [now, now]).unwrap();
            let (ra, rb) = reference(seed, size, chunk);
            let (ga, gb) = (std::fs::read(&pa).unwrap(), std::fs::read(&pb).unwrap());
            assert_eq!(lens, [ga.len() as u64, gb.len() as u64]);
            assert!(ga == ra, "a differs for size {size} chunk {chunk}");
            assert!(gb == rb, "b differs for size {size} chunk {chunk}");
            assert!(ga != gb);
            assert_eq!(ga.len() as u64, size);
        }
    }

    #[test]
    fn edits_are_ordered_spaced_and_mixed() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let edits = plan_edits(&mut rng, MIN_BIG_FILE);
        assert_eq!(edits.len() as u64, EDITS);
        assert!(edits.windows(2).all(|w| w[0].offset + 128 <= w[1].offset));
        assert!(edits.iter().any(|e| matches!(e.op, Op::Insert(_))));
        assert!(edits.iter().any(|e| matches!(e.op, Op::Delete(_))));
        assert!(edits.iter().any(|e| matches!(e.op, Op::Overwrite(_))));
    }
}

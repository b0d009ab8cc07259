//! The hash cache: content hashes of source files keyed on what changes whenever content can change.
//!
//! The key is (device, inode, size, mtime, ctime). ctime cannot be set from user space, so even a
//! tool that restores mtime after editing a file (`touch -r`, `cp -p`) changes the key. The file is a
//! postcard encoding behind a magic and version; anything unreadable is treated as an empty cache,
//! because the cache is only ever a shortcut and a wrong miss costs one re-hash. It is replaced
//! atomically (temporary sibling + rename) and holds only the files seen by the last scan, so it
//! stays as large as the tree; a scan that would write it unchanged touches it instead, so its
//! mtime says when it was last used. It is not fsynced: a torn file after a crash reads as corrupt, which
//! is harmless.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use ahash::{AHashMap, AHashSet};
use serde::{Deserialize, Serialize};

use crate::manifest::Hash;

const MAGIC: [u8; 4] = *b"RSHC";
const VERSION: u16 = 1;
/// A cache file beyond this size is not read (about 8M entries); one that large is not ours.
const MAX_CACHE_BYTES: u64 = 512 << 20;
/// Temporary cache files are named `<cache name><TEMP_INFIX><pid>` next to the cache.
pub(super) const TEMP_INFIX: &str = ".tmp.";

/// Identity and version of a file's content as far as the file system can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub(super) struct Stamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: i64,
    pub ctime: i64,
    pub ctime_nsec: i64,
}

impl Stamp {
    /// From std's metadata, as tests read it.
    #[cfg(test)]
    pub fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }

    /// The same fields from a raw `stat`, as the scan reads them. Both come from the same kernel
    /// attributes, so a stamp cached from one matches the other.
    // The field types differ between architectures; on some these casts are no-ops.
    #[allow(clippy::unnecessary_cast)]
    pub fn from_stat(st: &rustix::fs::Stat) -> Stamp {
        Stamp {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            size: st.st_size as u64,
            mtime: st.st_mtime as i64,
            mtime_nsec: st.st_mtime_nsec as i64,
            ctime: st.st_ctime as i64,
            ctime_nsec: st.st_ctime_nsec as i64,
        }
    }

    /// The later of mtime and ctime, in nanoseconds since the epoch: when the file's content or
    /// stamp last changed, as far as its times tell.
    pub fn changed_ns(&self) -> i128 {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        ns(self.mtime, self.mtime_nsec).max(ns(self.ctime, self.ctime_nsec))
    }
}

#[derive(Serialize, Deserialize)]
struct Stored<R> {
    magic: [u8; 4],
    version: u16,
    records: R,
}

/// Hashes known from the previous scan.
#[derive(Debug, Default)]
pub(super) struct HashCache {
    // A warm scan looks up every file; SipHash of the 56-byte key was a tenth of its time.
    map: AHashMap<Stamp, Hash>,
    /// The inodes of `map`'s stamps: a file whose inode is not here cannot be found in it.
    inodes: AHashSet<u64>,
}

impl HashCache {
    /// Reads the cache at `path`; any problem yields an empty cache.
    pub fn load(path: &Path) -> HashCache {
        match read(path) {
            Ok(map) => HashCache {
                inodes: map.keys().map(|s| s.ino).collect(),
                map,
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::debug!(path = %path.display(), "no hash cache yet; hashing every file");
                HashCache::default()
            }
            Err(e) => {
                tracing::warn!(
                    path = %path.display(),
                    "ignoring unreadable hash cache ({e}); hashing every file"
                );
                HashCache::default()
            }
        }
    }

    pub fn lookup(&self, stamp: &Stamp) -> Option<Hash> {
        self.map.get(stamp).copied()
    }

    /// Whether some entry may be for the file with inode `ino` (of any device).
    pub fn may_hold(&self, ino: u64) -> bool {
        self.inodes.contains(&ino)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Replaces the cache file with `records` (stamp, hash, whether it was hashed this time) unless
    /// they equal what was loaded. Failure to write only costs the next scan time, so it is a warning.
    pub fn save_if_changed(&self, path: &Path, records: impl Iterator<Item = (Stamp, Hash, bool)>) {
        let mut records: Vec<(Stamp, Hash, bool)> = records.collect();
        // Hard links share a stamp; sorting also makes identical caches byte-identical.
        records.sort_unstable_by_key(|r| r.0);
        records.dedup_by_key(|r| r.0);
        // Without a fresh hash every record was a hit, so equal counts mean equal contents. The
        // file is touched instead, so that its mtime says when it was last used (a caller may
        // remove caches unused for long).
        if !records.iter().any(|r| r.2) && records.len() == self.len() {
            let touched = OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            if let Err(e) = touched {
                tracing::debug!(path = %path.display(), "cannot touch hash cache: {e}");
            }
            return;
        }
        let records: Vec<(Stamp, Hash)> = records.into_iter().map(|(s, h, _)| (s, h)).collect();
        if let Err(e) = write(path, &records) {
            tracing::warn!(
                path = %path.display(),
                "cannot write hash cache ({e}); the next scan will hash every file"
            );
        }
    }
}

fn read(path: &Path) -> io::Result<AHashMap<Stamp, Hash>> {
    let file = fs::File::open(path)?;
    let len = file.metadata()?.len();
    if len > MAX_CACHE_BYTES {
        return Err(io::Error::other(format!(
            "{len} bytes, over the {MAX_CACHE_BYTES}-byte limit"
        )));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(MAX_CACHE_BYTES).read_to_end(&mut bytes)?;
    decode(&bytes).map_err(io::Error::other)
}

fn decode(bytes: &[u8]) -> Result<AHashMap<Stamp, Hash>, String> {
    // Check the header before decoding the records, so that a foreign file is named as such and
    // its length prefix is never trusted.
    let (head, _): (Stored<()>, _) =
        postcard::take_from_bytes(bytes).map_err(|e| format!("not a relsync hash cache: {e}"))?;
    if head.magic != MAGIC || head.version != VERSION {
        return Err(format!(
            "not a relsync hash cache of version {VERSION} (magic {:?}, version {})",
            head.magic, head.version
        ));
    }
    let (stored, rest): (Stored<Vec<(Stamp, Hash)>>, _) =
        postcard::take_from_bytes(bytes).map_err(|e| format!("corrupt hash cache: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("corrupt hash cache: {} trailing bytes", rest.len()));
    }
    Ok(stored.records.into_iter().collect())
}

fn encode(records: &[(Stamp, Hash)]) -> Vec<u8> {
    postcard::to_stdvec(&Stored {
        magic: MAGIC,
        version: VERSION,
        records,
    })
    .expect("serializing owned data to a Vec cannot fail")
}

fn write(path: &Path, records: &[(Stamp, Hash)]) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("cache path has no file name"))?;
    let mut tmp_name = name.to_owned();
    tmp_name.push(format!("{TEMP_INFIX}{}", std::process::id()));
    let tmp: PathBuf = path.with_file_name(tmp_name);
    let bytes = encode(records);
    let result = (|| {
        // A leftover from a crashed run with the same pid is ours to replace.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(&bytes)?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(ino: u64) -> Stamp {
        Stamp {
            dev: 1,
            ino,
            size: 10,
            mtime: 1_600_000_000,
            mtime_nsec: 5,
            ctime: 1_600_000_001,
            ctime_nsec: 7,
        }
    }

    #[test]
    fn round_trip() {
        let records = vec![(stamp(1), Hash::of(b"a")), (stamp(2), Hash::of(b"b"))];
        let map = decode(&encode(&records)).unwrap();
        assert_eq!(map.len(), 2);
        assert_eq!(map[&stamp(2)], Hash::of(b"b"));
    }

    #[test]
    fn garbage_is_refused_without_panic() {
        let good = encode(&[(stamp(1), Hash::of(b"a")), (stamp(2), Hash::of(b"b"))]);
        let mut foreign = good.clone();
        foreign[0] = b'X';
        let mut newer = good.clone();
        newer[4] = VERSION as u8 + 1;
        let mut trailing = good.clone();
        trailing.push(0);
        // A huge record count with no data behind it must fail, not allocate.
        let mut huge = encode(&[]);
        huge.pop();
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("truncated", good[..good.len() - 3].to_vec()),
            ("header only", good[..5].to_vec()),
            ("foreign magic", foreign),
            ("other version", newer),
            ("trailing", trailing),
            ("huge count", huge),
        ];
        for (what, bytes) in cases {
            assert!(decode(&bytes).is_err(), "{what} was accepted");
        }
    }
}

//! Release identities and the record relsync keeps for every complete release.
//!
//! A release id names a directory under `ROOT/releases/`, so it is validated like a path component and
//! more strictly: ASCII letters, digits, `.`, `_`, `-`, not starting with `.`, and never ending in one of
//! the suffixes relsync uses for its own transient directories. The default id is a sortable UTC
//! timestamp computed from a time the caller passes in (this module reads no clock).

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::manifest::{Hash, Manifest, ManifestError, Policy};

/// Suffix of a release directory that is still being built.
pub const STAGING_SUFFIX: &str = ".staging";
/// Suffix of a release directory that is being removed.
pub const TRASH_SUFFIX: &str = ".trash";
const MAX_ID_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReleaseIdError {
    #[error("release id {0:?} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ -, not starting with `.`")]
    Invalid(String),
    #[error("release id {0:?} ends with a suffix relsync reserves (.staging, .trash)")]
    ReservedSuffix(String),
}

/// The name of one release. Shared (`Arc<str>`): every link operation of a plan names one.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct ReleaseId(Arc<str>);

impl Serialize for ReleaseId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl ReleaseId {
    pub fn new(s: impl Into<String>) -> Result<ReleaseId, ReleaseIdError> {
        let s = s.into();
        let ok_chars = s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if s.is_empty() || s.len() > MAX_ID_LEN || !ok_chars || s.starts_with('.') {
            return Err(ReleaseIdError::Invalid(s));
        }
        if s.ends_with(STAGING_SUFFIX) || s.ends_with(TRASH_SUFFIX) {
            return Err(ReleaseIdError::ReservedSuffix(s));
        }
        Ok(ReleaseId(Arc::from(s)))
    }

    /// The default id for a release created at `unix_secs`: `20261127T031840Z`.
    pub fn from_unix_time(unix_secs: i64) -> ReleaseId {
        ReleaseId(Arc::from(format_utc_compact(unix_secs)))
    }

    /// `self` if `taken` says it is free, else `self-2`, `self-3`, … (ids created within one second).
    pub fn unique(self, taken: impl Fn(&ReleaseId) -> bool) -> ReleaseId {
        if !taken(&self) {
            return self;
        }
        (2u32..)
            .map(|n| ReleaseId(Arc::from(format!("{}-{n}", self.0))))
            .find(|id| !taken(id))
            .expect("an unbounded counter finds a free id")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn staging_name(&self) -> String {
        format!("{}{STAGING_SUFFIX}", self.0)
    }

    pub fn trash_name(&self) -> String {
        format!("{}{TRASH_SUFFIX}", self.0)
    }
}

impl TryFrom<String> for ReleaseId {
    type Error = ReleaseIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        ReleaseId::new(s)
    }
}

impl From<ReleaseId> for String {
    fn from(r: ReleaseId) -> String {
        r.0.to_string()
    }
}

impl fmt::Display for ReleaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ReleaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `YYYYMMDDTHHMMSSZ` for a Unix time.
pub fn format_utc_compact(unix_secs: i64) -> String {
    let (y, mo, d) = civil_from_days(unix_secs.div_euclid(86_400));
    let s = unix_secs.rem_euclid(86_400);
    format!(
        "{y:04}{mo:02}{d:02}T{:02}{:02}{:02}Z",
        s / 3600,
        (s / 60) % 60,
        s % 60
    )
}

/// `YYYY-MM-DD HH:MM:SS` UTC for display.
pub fn format_utc(unix_secs: i64) -> String {
    let (y, mo, d) = civil_from_days(unix_secs.div_euclid(86_400));
    let s = unix_secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02}",
        s / 3600,
        (s / 60) % 60,
        s % 60
    )
}

/// Identity of a file as it was verified on disk: lets the next release link to it only while it is
/// still the very same inode with the same size and modification time (fault case 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

/// What relsync stores in `ROOT/.relsync/releases/<id>.rec` for every complete release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseRecord {
    pub id: ReleaseId,
    /// Creation order among the app's releases.
    pub seq: u64,
    pub created_unix: i64,
    pub manifest: Manifest,
    /// One stamp per file of `manifest`, in manifest order.
    pub stamps: Vec<FileStamp>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    #[error("release record is not a relsync record (bad magic or version {0})")]
    BadHeader(u16),
    #[error("release record could not be decoded: {0}")]
    Decode(String),
    #[error("release record holds {stamps} file stamps for {files} files")]
    StampCount { stamps: usize, files: usize },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

const REC_MAGIC: [u8; 4] = *b"RSRC";
const REC_VERSION: u16 = 1;

#[derive(Serialize, Deserialize)]
struct RecordWire {
    magic: [u8; 4],
    version: u16,
    id: ReleaseId,
    seq: u64,
    created_unix: i64,
    manifest: Vec<u8>,
    stamps: Vec<FileStamp>,
}

impl ReleaseRecord {
    pub fn encode(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct RecordRef<'a> {
            magic: [u8; 4],
            version: u16,
            id: &'a ReleaseId,
            seq: u64,
            created_unix: i64,
            // Serialized as `RecordWire::manifest` (a `Vec<u8>`) is: a length, then the bytes.
            manifest: &'a [u8],
            stamps: &'a [FileStamp],
        }
        postcard::to_stdvec(&RecordRef {
            magic: REC_MAGIC,
            version: REC_VERSION,
            id: &self.id,
            seq: self.seq,
            created_unix: self.created_unix,
            manifest: &self.manifest.encode(),
            stamps: &self.stamps,
        })
        .expect("serializing to a Vec cannot fail")
    }

    pub fn decode(bytes: &[u8], policy: &Policy) -> Result<ReleaseRecord, RecordError> {
        let (w, rest): (RecordWire, _) =
            postcard::take_from_bytes(bytes).map_err(|e| RecordError::Decode(e.to_string()))?;
        if !rest.is_empty() {
            return Err(RecordError::Decode(format!(
                "{} trailing bytes",
                rest.len()
            )));
        }
        if w.magic != REC_MAGIC || w.version != REC_VERSION {
            return Err(RecordError::BadHeader(w.version));
        }
        let manifest = Manifest::decode(&w.manifest, policy)?;
        let files = manifest.file_count();
        if w.stamps.len() != files {
            return Err(RecordError::StampCount {
                stamps: w.stamps.len(),
                files,
            });
        }
        Ok(ReleaseRecord {
            id: w.id,
            seq: w.seq,
            created_unix: w.created_unix,
            manifest,
            stamps: w.stamps,
        })
    }

    /// Digest of the release's manifest (the "source manifest hash" of the journal).
    pub fn digest(&self) -> Hash {
        self.manifest.digest()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Entry;

    #[test]
    fn ids() {
        for ok in ["20261127T031840Z", "v1.2.3", "a_b-c", "x"] {
            assert!(ReleaseId::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "a/b",
            "..",
            "a b",
            "é",
            "a\n",
            &"x".repeat(65),
        ] {
            assert!(
                matches!(ReleaseId::new(bad), Err(ReleaseIdError::Invalid(_))),
                "{bad:?}"
            );
        }
        for bad in ["x.staging", "x.trash"] {
            assert!(matches!(
                ReleaseId::new(bad),
                Err(ReleaseIdError::ReservedSuffix(_))
            ));
        }
    }

    #[test]
    fn timestamps() {
        let table = [
            (0, "19700101T000000Z"),
            (951_782_400, "20000229T000000Z"),
            (1_798_342_719, "20261227T033839Z"),
            (4_102_444_799, "20991231T235959Z"),
            (-1, "19691231T235959Z"),
        ];
        for (t, want) in table {
            assert_eq!(format_utc_compact(t), want, "{t}");
        }
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00");
        // Sortable: later times sort later as strings.
        assert!(format_utc_compact(1_000_000) < format_utc_compact(1_000_001));
    }

    #[test]
    fn unique_suffixes() {
        let base = ReleaseId::new("r").unwrap();
        let taken = ["r", "r-2"];
        let id = base.unique(|c| taken.contains(&c.as_str()));
        assert_eq!(id.as_str(), "r-3");
    }

    #[test]
    fn record_round_trip_and_stamp_check() {
        let p = Policy::default();
        let m = Manifest::from_unsorted(
            vec![Entry::file("a", 1, 0o644, Hash::of(b"a")).unwrap()],
            &p,
        )
        .unwrap();
        let rec = ReleaseRecord {
            id: ReleaseId::new("r1").unwrap(),
            seq: 7,
            created_unix: 1,
            manifest: m,
            stamps: vec![FileStamp {
                ino: 3,
                size: 1,
                mtime_ns: 5,
            }],
        };
        assert_eq!(ReleaseRecord::decode(&rec.encode(), &p).unwrap(), rec);
        let mut bad = rec.clone();
        bad.stamps.clear();
        assert!(matches!(
            ReleaseRecord::decode(&bad.encode(), &p),
            Err(RecordError::StampCount { .. })
        ));
        assert!(ReleaseRecord::decode(b"junk", &p).is_err());
    }
}

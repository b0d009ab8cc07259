//! Content-addressed manifests: what a release (or a mirrored tree) contains.
//!
//! A [`Manifest`] lists files (size, mode, blake3), directories (mode) and symlinks (target) in
//! canonical order. The only ways to obtain one validate it completely, so code holding a `Manifest`
//! may rely on: unique paths in [`RelPath`] order, every parent present as a directory (so no entry sits
//! under a file or a symlink), permission bits only (no setuid/setgid/sticky), no world-writable entry
//! unless the policy allows it, and symlink targets that stay inside the release (or lead into
//! `shared/` when allowed) without passing through another symlink.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::path::{resolve_symlink, PathError, RelPath, SymlinkPolicy};

/// A blake3 digest of file content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    pub fn of(data: &[u8]) -> Hash {
        Hash(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    pub fn from_hex(s: &str) -> Option<Hash> {
        blake3::Hash::from_hex(s).ok().map(|h| Hash(*h.as_bytes()))
    }
}

impl From<blake3::Hash> for Hash {
    fn from(h: blake3::Hash) -> Hash {
        Hash(*h.as_bytes())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", &self.to_hex()[..16])
    }
}

impl Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_hex())
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Hash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Hash, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            Hash::from_hex(&s).ok_or_else(|| serde::de::Error::custom("invalid blake3 hex digest"))
        } else {
            <[u8; 32]>::deserialize(d).map(Hash)
        }
    }
}

/// What a path is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    File { size: u64, mode: u32, hash: Hash },
    Dir { mode: u32 },
    Symlink { target: String },
}

/// One path of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: RelPath,
    pub kind: EntryKind,
}

/// The flat JSON shape of an entry (`{"path": .., "type": "file", "size": ..}`); the binary encoding
/// keeps the plain enum because flattening needs a self-describing format.
#[derive(Serialize, Deserialize)]
struct JsonEntry {
    path: RelPath,
    #[serde(flatten)]
    kind: JsonKind,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum JsonKind {
    File { size: u64, mode: String, hash: Hash },
    Dir { mode: String },
    Symlink { target: String },
}

impl From<&Entry> for JsonEntry {
    fn from(e: &Entry) -> JsonEntry {
        let kind = match &e.kind {
            EntryKind::File { size, mode, hash } => JsonKind::File {
                size: *size,
                mode: format!("{mode:o}"),
                hash: *hash,
            },
            EntryKind::Dir { mode } => JsonKind::Dir {
                mode: format!("{mode:o}"),
            },
            EntryKind::Symlink { target } => JsonKind::Symlink {
                target: target.clone(),
            },
        };
        JsonEntry {
            path: e.path.clone(),
            kind,
        }
    }
}

impl TryFrom<JsonEntry> for Entry {
    type Error = ManifestError;
    fn try_from(j: JsonEntry) -> Result<Entry, ManifestError> {
        let mode = |s: &str| {
            u32::from_str_radix(s, 8)
                .map_err(|_| ManifestError::Decode(format!("{}: mode {s:?} is not octal", j.path)))
        };
        let kind = match &j.kind {
            JsonKind::File {
                size,
                mode: m,
                hash,
            } => EntryKind::File {
                size: *size,
                mode: mode(m)?,
                hash: *hash,
            },
            JsonKind::Dir { mode: m } => EntryKind::Dir { mode: mode(m)? },
            JsonKind::Symlink { target } => EntryKind::Symlink {
                target: target.clone(),
            },
        };
        Ok(Entry { path: j.path, kind })
    }
}

impl Entry {
    pub fn file(path: &str, size: u64, mode: u32, hash: Hash) -> Result<Entry, PathError> {
        Ok(Entry {
            path: RelPath::new(path)?,
            kind: EntryKind::File { size, mode, hash },
        })
    }

    pub fn dir(path: &str, mode: u32) -> Result<Entry, PathError> {
        Ok(Entry {
            path: RelPath::new(path)?,
            kind: EntryKind::Dir { mode },
        })
    }

    pub fn symlink(path: &str, target: &str) -> Result<Entry, PathError> {
        Ok(Entry {
            path: RelPath::new(path)?,
            kind: EntryKind::Symlink {
                target: target.to_owned(),
            },
        })
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.kind, EntryKind::Dir { .. })
    }
}

/// Limits and policy applied when a manifest is built or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub max_entries: usize,
    pub allow_world_writable: bool,
    pub symlinks: SymlinkPolicy,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_entries: 4_000_000,
            allow_world_writable: false,
            symlinks: SymlinkPolicy::default(),
        }
    }
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("manifest has {count} entries, over the limit of {max}")]
    TooManyEntries { count: usize, max: usize },
    #[error("path {0} appears twice in the manifest")]
    Duplicate(RelPath),
    #[error("manifest is not in canonical order at {0}")]
    NotCanonical(RelPath),
    #[error("{path}: its parent {parent} is not a directory of the manifest")]
    ParentNotDir { path: RelPath, parent: RelPath },
    #[error(
        "{path}: mode {mode:o} has bits beyond rwxrwxrwx (setuid, setgid, sticky or a file type)"
    )]
    ModeBits { path: RelPath, mode: u32 },
    #[error(
        "{path}: mode {mode:o} is world-writable; fix it with `chmod o-w` or allow it explicitly"
    )]
    WorldWritable { path: RelPath, mode: u32 },
    #[error(
        "symlink {path} points through another symlink ({via}); link to the final target instead"
    )]
    SymlinkChain { path: RelPath, via: String },
    #[error("total size of the manifest's files overflows")]
    SizeOverflow,
    #[error("manifest encoding is not a relsync manifest (bad magic or version {0})")]
    BadHeader(u16),
    #[error("manifest could not be decoded: {0}")]
    Decode(String),
}

/// A validated manifest in canonical order.
#[derive(Debug, Clone)]
pub struct Manifest {
    entries: Vec<Entry>,
    /// [`Manifest::encode`] and [`Manifest::digest`], computed once: a manifest never changes
    /// after validation. A push encodes its manifest to send it, to digest it, to cache it and to
    /// record it; the daemon compares kept manifests' digests on every push and listing.
    encoded: std::sync::OnceLock<Arc<[u8]>>,
    digest: std::sync::OnceLock<Hash>,
}

impl PartialEq for Manifest {
    fn eq(&self, other: &Manifest) -> bool {
        self.entries == other.entries
    }
}

impl Eq for Manifest {}

const MAGIC: [u8; 4] = *b"RSMF";
const VERSION: u16 = 1;

#[derive(Serialize, Deserialize)]
struct Encoded<E> {
    magic: [u8; 4],
    version: u16,
    entries: E,
}

impl Manifest {
    pub fn empty() -> Manifest {
        Manifest {
            entries: Vec::new(),
            encoded: std::sync::OnceLock::new(),
            digest: std::sync::OnceLock::new(),
        }
    }

    /// Sorts `entries` into canonical order, then validates.
    pub fn from_unsorted(
        mut entries: Vec<Entry>,
        policy: &Policy,
    ) -> Result<Manifest, ManifestError> {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Manifest::from_canonical(entries, policy)
    }

    /// Validates entries that must already be in canonical order (peer data).
    pub fn from_canonical(entries: Vec<Entry>, policy: &Policy) -> Result<Manifest, ManifestError> {
        if entries.len() > policy.max_entries {
            return Err(ManifestError::TooManyEntries {
                count: entries.len(),
                max: policy.max_entries,
            });
        }
        let mut total: u64 = 0;
        for (i, e) in entries.iter().enumerate() {
            if i > 0 {
                match entries[i - 1].path.cmp(&e.path) {
                    std::cmp::Ordering::Less => {}
                    std::cmp::Ordering::Equal => {
                        return Err(ManifestError::Duplicate(e.path.clone()))
                    }
                    std::cmp::Ordering::Greater => {
                        return Err(ManifestError::NotCanonical(e.path.clone()))
                    }
                }
            }
            let mode = match &e.kind {
                EntryKind::File { size, mode, .. } => {
                    total = total
                        .checked_add(*size)
                        .ok_or(ManifestError::SizeOverflow)?;
                    Some(*mode)
                }
                EntryKind::Dir { mode } => Some(*mode),
                EntryKind::Symlink { .. } => None,
            };
            if let Some(mode) = mode {
                if mode & !0o777 != 0 {
                    return Err(ManifestError::ModeBits {
                        path: e.path.clone(),
                        mode,
                    });
                }
                if mode & 0o002 != 0 && !policy.allow_world_writable {
                    return Err(ManifestError::WorldWritable {
                        path: e.path.clone(),
                        mode,
                    });
                }
            }
        }
        let m = Manifest {
            entries,
            encoded: std::sync::OnceLock::new(),
            digest: std::sync::OnceLock::new(),
        };
        // Canonical order is depth-first, so the directories enclosing an entry are exactly a stack
        // of the directories seen on the way down to it: its parent must be the top.
        let mut dirs: Vec<&str> = Vec::new();
        for e in &m.entries {
            let p = e.path.as_str();
            while let Some(top) = dirs.last() {
                if p.len() > top.len() && p.starts_with(top) && p.as_bytes()[top.len()] == b'/' {
                    break;
                }
                dirs.pop();
            }
            if let Some((parent, _)) = p.rsplit_once('/') {
                if dirs.last() != Some(&parent) {
                    return Err(ManifestError::ParentNotDir {
                        path: e.path.clone(),
                        parent: e.path.parent().expect("has a parent"),
                    });
                }
            }
            if e.is_dir() {
                dirs.push(p);
            }
            if let EntryKind::Symlink { target } = &e.kind {
                m.check_symlink(&e.path, target, policy.symlinks)?;
            }
        }
        Ok(m)
    }

    fn check_symlink(
        &self,
        path: &RelPath,
        target: &str,
        policy: SymlinkPolicy,
    ) -> Result<(), ManifestError> {
        resolve_symlink(path, target, policy)?;
        // Walk the target from the link's directory and refuse every prefix that is another
        // symlink: passing through (or ending at) one makes the physical destination differ from
        // the lexical one just checked, also when a later `..` leaves it again (`s/../x`).
        let mut stack: Vec<&str> = match path.as_str().rsplit_once('/') {
            Some((parent, _)) => parent.split('/').collect(),
            None => Vec::new(),
        };
        for c in target.split('/') {
            match c {
                "" | "." => {}
                ".." => {
                    if stack.pop().is_none() {
                        // Above the release root: resolve_symlink allowed only `shared/`.
                        break;
                    }
                }
                c => {
                    stack.push(c);
                    let prefix = stack.join("/");
                    let Ok(p) = RelPath::new(prefix.as_str()) else {
                        // Not a valid manifest path (e.g. reserved), so not a symlink entry either.
                        continue;
                    };
                    if let Some(Entry {
                        kind: EntryKind::Symlink { .. },
                        ..
                    }) = self.get(&p)
                    {
                        return Err(ManifestError::SymlinkChain {
                            path: path.clone(),
                            via: prefix,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, path: &RelPath) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.path.cmp(path))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Files with their size, mode and hash.
    pub fn files(&self) -> impl Iterator<Item = (&RelPath, u64, u32, &Hash)> {
        self.entries.iter().filter_map(|e| match &e.kind {
            EntryKind::File { size, mode, hash } => Some((&e.path, *size, *mode, hash)),
            _ => None,
        })
    }

    pub fn file_count(&self) -> usize {
        self.files().count()
    }

    pub fn total_file_bytes(&self) -> u64 {
        // Validation guarantees this sum does not overflow.
        self.files().map(|(_, s, _, _)| s).sum()
    }

    /// Index from (content, mode) to the first path holding it.
    pub fn content_index(&self) -> HashMap<(Hash, u32), &RelPath> {
        let mut idx = HashMap::with_capacity(self.entries.len());
        for (p, _, mode, h) in self.files() {
            idx.entry((*h, mode)).or_insert(p);
        }
        idx
    }

    /// Compact binary encoding (postcard) with a magic and version header; encoded on the first
    /// call and shared after that.
    pub fn encode(&self) -> Arc<[u8]> {
        let encoded = self.encoded.get_or_init(|| {
            postcard::to_stdvec(&Encoded {
                magic: MAGIC,
                version: VERSION,
                entries: &self.entries,
            })
            .expect("serializing owned data to a Vec cannot fail")
            .into()
        });
        Arc::clone(encoded)
    }

    /// Decodes and validates peer or on-disk data.
    pub fn decode(bytes: &[u8], policy: &Policy) -> Result<Manifest, ManifestError> {
        let (enc, rest): (Encoded<Vec<Entry>>, _) =
            postcard::take_from_bytes(bytes).map_err(|e| ManifestError::Decode(e.to_string()))?;
        if !rest.is_empty() {
            return Err(ManifestError::Decode(format!(
                "{} trailing bytes",
                rest.len()
            )));
        }
        if enc.magic != MAGIC || enc.version != VERSION {
            return Err(ManifestError::BadHeader(enc.version));
        }
        Manifest::from_canonical(enc.entries, policy)
    }

    /// blake3 of the canonical encoding: identifies a manifest.
    pub fn digest(&self) -> Hash {
        *self.digest.get_or_init(|| Hash::of(&self.encode()))
    }

    /// Human-readable JSON form.
    pub fn to_json(&self) -> String {
        let v: Vec<JsonEntry> = self.entries.iter().map(JsonEntry::from).collect();
        serde_json::to_string_pretty(&v).expect("manifest JSON serialization cannot fail")
    }

    pub fn from_json(s: &str, policy: &Policy) -> Result<Manifest, ManifestError> {
        let v: Vec<JsonEntry> =
            serde_json::from_str(s).map_err(|e| ManifestError::Decode(e.to_string()))?;
        let entries = v
            .into_iter()
            .map(Entry::try_from)
            .collect::<Result<_, _>>()?;
        Manifest::from_canonical(entries, policy)
    }
}

/// How two manifests differ, path by path.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff<'a> {
    pub added: Vec<&'a Entry>,
    pub removed: Vec<&'a Entry>,
    /// (old, new) pairs with the same path and different kind, content, mode or target.
    pub changed: Vec<(&'a Entry, &'a Entry)>,
    pub unchanged: usize,
}

/// Merge-joins two canonical manifests.
pub fn diff<'a>(old: &'a Manifest, new: &'a Manifest) -> Diff<'a> {
    let mut d = Diff::default();
    let (a, b) = (old.entries(), new.entries());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) => match x.path.cmp(&y.path) {
                std::cmp::Ordering::Less => {
                    d.removed.push(x);
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    d.added.push(y);
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    if x.kind == y.kind {
                        d.unchanged += 1;
                    } else {
                        d.changed.push((x, y));
                    }
                    i += 1;
                    j += 1;
                }
            },
            (Some(x), None) => {
                d.removed.push(x);
                i += 1;
            }
            (None, Some(y)) => {
                d.added.push(y);
                j += 1;
            }
            (None, None) => unreachable!("loop condition"),
        }
    }
    d
}

/// The manifest-decoding fuzz target's body, shared with the corpus replay in `cargo test`.
pub mod fuzz {
    use super::{Manifest, Policy};
    use crate::path::RelPath;
    use crate::release::ReleaseRecord;

    /// Decodes `data` as a manifest and as a release record, and parses it as a path: none may
    /// panic, and whatever decodes must re-encode to the same value and hold the path invariants.
    pub fn decode_one(data: &[u8]) {
        let policy = Policy::default();
        if let Ok(m) = Manifest::decode(data, &policy) {
            let again =
                Manifest::decode(&m.encode(), &policy).expect("a decoded manifest re-decodes");
            assert_eq!(again, m, "manifest round trip");
            let json = Manifest::from_json(&m.to_json(), &policy).expect("JSON form re-decodes");
            assert_eq!(json, m, "JSON round trip");
        }
        if let Ok(r) = ReleaseRecord::decode(data, &policy) {
            assert_eq!(
                r.stamps.len(),
                r.manifest.file_count(),
                "one stamp per file"
            );
        }
        let text = String::from_utf8_lossy(data);
        if let Ok(p) = RelPath::new(text.as_ref()) {
            assert!(
                !p.as_str().starts_with('/'),
                "absolute path accepted: {p:?}"
            );
            assert!(
                p.components()
                    .all(|c| !c.is_empty() && c != "." && c != ".."),
                "dot or empty component accepted: {p:?}"
            );
            assert!(
                !p.as_str().chars().any(char::is_control),
                "control character accepted: {p:?}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(b: u8) -> Hash {
        Hash::of(&[b])
    }

    fn sample() -> Manifest {
        Manifest::from_unsorted(
            vec![
                Entry::file("a/x.php", 3, 0o644, h(1)).unwrap(),
                Entry::dir("a", 0o755).unwrap(),
                Entry::symlink("link", "a/x.php").unwrap(),
                Entry::file("b.txt", 1, 0o755, h(2)).unwrap(),
            ],
            &Policy::default(),
        )
        .unwrap()
    }

    #[test]
    fn canonical_order_and_lookup() {
        let m = sample();
        let paths: Vec<&str> = m.entries().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a", "a/x.php", "b.txt", "link"]);
        assert!(m.get(&RelPath::new("a/x.php").unwrap()).is_some());
        assert!(m.get(&RelPath::new("nope").unwrap()).is_none());
        assert_eq!(m.total_file_bytes(), 4);
        assert_eq!(m.file_count(), 2);
    }

    #[test]
    fn binary_and_json_round_trip() {
        let m = sample();
        let bin = m.encode();
        assert_eq!(Manifest::decode(&bin, &Policy::default()).unwrap(), m);
        let json = m.to_json();
        assert!(json.contains("\"type\": \"symlink\""), "{json}");
        assert_eq!(Manifest::from_json(&json, &Policy::default()).unwrap(), m);
        assert_eq!(
            m.digest(),
            Manifest::decode(&bin, &Policy::default()).unwrap().digest()
        );
    }

    #[test]
    fn invalid_manifests_are_rejected() {
        let p = Policy::default();
        let f = |path: &str| Entry::file(path, 1, 0o644, h(0)).unwrap();
        let d = |path: &str| Entry::dir(path, 0o755).unwrap();
        let s = |path: &str, t: &str| Entry::symlink(path, t).unwrap();
        type Check = fn(&ManifestError) -> bool;
        let table: Vec<(Vec<Entry>, Check)> = vec![
            (vec![f("a"), f("a")], |e| {
                matches!(e, ManifestError::Duplicate(_))
            }),
            (vec![d("a"), f("a")], |e| {
                matches!(e, ManifestError::Duplicate(_))
            }),
            (vec![f("b"), f("a")], |e| {
                matches!(e, ManifestError::NotCanonical(_))
            }),
            (vec![f("a/b")], |e| {
                matches!(e, ManifestError::ParentNotDir { .. })
            }),
            (vec![f("a"), f("a/b")], |e| {
                matches!(e, ManifestError::ParentNotDir { .. })
            }),
            (vec![s("a", "x"), f("a/b")], |e| {
                matches!(e, ManifestError::ParentNotDir { .. })
            }),
            (vec![Entry::file("a", 1, 0o4755, h(0)).unwrap()], |e| {
                matches!(e, ManifestError::ModeBits { .. })
            }),
            (vec![Entry::dir("a", 0o1777).unwrap()], |e| {
                matches!(e, ManifestError::ModeBits { .. })
            }),
            (vec![Entry::file("a", 1, 0o666, h(0)).unwrap()], |e| {
                matches!(e, ManifestError::WorldWritable { .. })
            }),
            (vec![s("a", "/etc/passwd")], |e| {
                matches!(e, ManifestError::Path(PathError::AbsoluteTarget { .. }))
            }),
            (vec![s("a", "../../../x")], |e| {
                matches!(e, ManifestError::Path(PathError::TargetEscapes { .. }))
            }),
            (vec![s("a", "b"), s("b", "c")], |e| {
                matches!(e, ManifestError::SymlinkChain { .. })
            }),
            (vec![d("d"), s("d/l", "../m/x"), s("m", "d")], |e| {
                matches!(e, ManifestError::SymlinkChain { .. })
            }),
            (
                vec![
                    Entry::file("a", u64::MAX, 0o644, h(0)).unwrap(),
                    Entry::file("b", 1, 0o644, h(0)).unwrap(),
                ],
                |e| matches!(e, ManifestError::SizeOverflow),
            ),
        ];
        for (entries, check) in table {
            let desc = format!("{entries:?}");
            let err = Manifest::from_canonical(entries, &p).expect_err(&desc);
            assert!(check(&err), "{desc} gave {err:?}");
        }
        let many = vec![f("a"), f("b"), f("c")];
        let tight = Policy {
            max_entries: 2,
            ..Policy::default()
        };
        assert!(matches!(
            Manifest::from_canonical(many, &tight),
            Err(ManifestError::TooManyEntries { .. })
        ));
        let ww = Policy {
            allow_world_writable: true,
            ..Policy::default()
        };
        assert!(
            Manifest::from_canonical(vec![Entry::file("a", 1, 0o666, h(0)).unwrap()], &ww).is_ok()
        );
    }

    #[test]
    fn decode_rejects_garbage_and_hostile_paths() {
        let p = Policy::default();
        assert!(Manifest::decode(b"", &p).is_err());
        assert!(Manifest::decode(b"RSMF\x01\x00\xff\xff\xff\xff\x0f", &p).is_err());
        let mut bad_magic = sample().encode().to_vec();
        bad_magic[0] = b'X';
        assert!(matches!(
            Manifest::decode(&bad_magic, &p),
            Err(ManifestError::BadHeader(_))
        ));
        // A hand-built encoding with a traversal path must fail path validation.
        #[derive(Serialize)]
        struct RawEntry {
            path: String,
            kind: EntryKind,
        }
        let raw = postcard::to_stdvec(&Encoded {
            magic: MAGIC,
            version: VERSION,
            entries: vec![RawEntry {
                path: "../etc/passwd".into(),
                kind: EntryKind::Dir { mode: 0o755 },
            }],
        })
        .unwrap();
        assert!(matches!(
            Manifest::decode(&raw, &p),
            Err(ManifestError::Decode(_))
        ));
    }

    #[test]
    fn diff_classifies_every_path() {
        let p = Policy::default();
        let old = Manifest::from_unsorted(
            vec![
                Entry::file("keep", 1, 0o644, h(1)).unwrap(),
                Entry::file("edit", 1, 0o644, h(2)).unwrap(),
                Entry::file("gone", 1, 0o644, h(3)).unwrap(),
                Entry::file("chmod", 1, 0o644, h(4)).unwrap(),
            ],
            &p,
        )
        .unwrap();
        let new = Manifest::from_unsorted(
            vec![
                Entry::file("keep", 1, 0o644, h(1)).unwrap(),
                Entry::file("edit", 1, 0o644, h(9)).unwrap(),
                Entry::file("new", 1, 0o644, h(5)).unwrap(),
                Entry::file("chmod", 1, 0o755, h(4)).unwrap(),
            ],
            &p,
        )
        .unwrap();
        let d = diff(&old, &new);
        let names = |v: &[&Entry]| v.iter().map(|e| e.path.to_string()).collect::<Vec<_>>();
        assert_eq!(names(&d.added), ["new"]);
        assert_eq!(names(&d.removed), ["gone"]);
        let changed: Vec<String> = d.changed.iter().map(|(a, _)| a.path.to_string()).collect();
        assert_eq!(changed, ["chmod", "edit"]);
        assert_eq!(d.unchanged, 1);
        assert_eq!(diff(&new, &new).unchanged, new.len());
    }
}

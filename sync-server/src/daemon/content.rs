//! Content the daemon already holds: files of kept releases and received objects.
//!
//! [`KeptContent`] answers "do we have this content?" for the need computation without reading
//! files: a kept file counts only while it is still the very inode its release recorded (same
//! device, inode, size and mtime, not a symlink), so a release edited in place since it was built
//! does not make the daemon claim content it no longer has (fault case 10).
//!
//! [`LocalContent`] is the build's content source. Nearly every file of a pushed release is linked
//! from a kept release or from the object store; what is left is content the daemon holds under
//! another mode (a mode change makes a new inode, never a chmod of a linked file) or a link source
//! that failed its identity check. Those are copied from any local file with the same content,
//! hashed while copying, so a damaged copy is passed over rather than built into the release.

use std::collections::{HashMap as StdHashMap, HashSet as StdHashSet};

/// Content hashes and paths hashed with aHash: these maps hold every file of every kept release
/// and are rebuilt for each push.
type HashMap<K, V> = StdHashMap<K, V, ahash::RandomState>;
type HashSet<T> = StdHashSet<T, ahash::RandomState>;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::sync::Arc;

use rayon::prelude::*;
use smallvec::SmallVec;

use cap_std::fs::{Dir, MetadataExt as _, OpenOptions};
use sync_core::edge::exec::{CheckedLinks, ContentSource};
use sync_core::edge::root::AppRoot;
use sync_core::edge::EdgeError;
use sync_core::layout;
use sync_core::manifest::{EntryKind, Hash, Manifest};
use sync_core::path::RelPath;
use sync_core::release::{FileStamp, ReleaseId, ReleaseRecord};

/// The files of `record` (a kept release) that are still the inodes it recorded: same device,
/// inode, size and mtime, regular files. relsyncd checks the current release's files this way as
/// soon as a push opens the app, while the manifest is still on its way; the need computation then
/// looks the current release's files up here instead of checking them one by one.
pub(super) fn intact_files(
    root: &AppRoot,
    record: &ReleaseRecord,
) -> Result<ahash::AHashSet<RelPath>, EdgeError> {
    let releases = open_dir(root, layout::RELEASES)?;
    let Ok(dir) = releases.open_dir(record.id.as_str()) else {
        return Ok(Default::default());
    };
    let device = root.device()?;
    let files: Vec<(&RelPath, FileStamp)> = record
        .manifest
        .files()
        .map(|(p, ..)| p)
        .zip(record.stamps.iter().copied())
        .collect();
    // Runs of files in one directory share its handle.
    let runs: Vec<&[(&RelPath, FileStamp)]> = files
        .chunk_by(|a, b| a.0.parent_str() == b.0.parent_str())
        .collect();
    let intact: Vec<Vec<RelPath>> = runs
        .par_iter()
        .map(|run| {
            let parent = match run[0].0.parent_str() {
                None => dir.try_clone().ok(),
                Some(p) => dir.open_dir(p).ok(),
            };
            let Some(parent) = parent else {
                return Vec::new();
            };
            run.iter()
                .filter(|(path, stamp)| stat_matches(&parent, path.file_name(), stamp, device))
                .map(|(path, _)| (*path).clone())
                .collect()
        })
        .collect();
    let mut set = ahash::AHashSet::with_capacity(files.len());
    set.extend(intact.into_iter().flatten());
    Ok(set)
}

/// Whether `name` in `dir` is the regular file `stamp` describes, on `device`.
fn stat_matches(dir: &Dir, name: &str, stamp: &FileStamp, device: u64) -> bool {
    rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
            && st.st_dev == device
            && st.st_ino == stamp.ino
            && st.st_size as u64 == stamp.size
            && i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec)
                == stamp.mtime_ns
    })
}

/// Where a content lies in the kept releases: (record index, path, recorded stamp) per copy.
type Copies<'r> = SmallVec<[(usize, &'r RelPath, FileStamp); 1]>;

/// Kept release files, by content, with the release they belong to first.
pub(super) struct KeptContent<'r> {
    dirs: Vec<Option<Dir>>,
    /// The records' release ids, in the records' order.
    ids: Vec<ReleaseId>,
    /// Copies of each content: usually one per kept release, so the first lives inline.
    by_hash: HashMap<Hash, Copies<'r>>,
    device: u64,
    /// One record's files found intact a moment ago ([`intact_files`]), by record index: they
    /// are looked up, not checked again.
    prechecked: Option<(usize, Arc<ahash::AHashSet<RelPath>>)>,
}

impl<'r> KeptContent<'r> {
    /// Indexes the files of `records` whose content is in `wanted`; `first` (the current release)
    /// is tried before the others, which go newest first.
    pub(super) fn new(
        root: &AppRoot,
        records: &'r [Arc<ReleaseRecord>],
        first: Option<&ReleaseId>,
        wanted: &HashSet<Hash>,
    ) -> Result<KeptContent<'r>, EdgeError> {
        let releases = open_dir(root, layout::RELEASES)?;
        let mut order: Vec<usize> = (0..records.len()).collect();
        order.sort_by_key(|&i| {
            (
                Some(&records[i].id) != first,
                std::cmp::Reverse(records[i].seq),
            )
        });
        let dirs = records
            .iter()
            .map(|r| releases.open_dir(r.id.as_str()).ok())
            .collect();
        let mut by_hash: HashMap<Hash, Copies<'_>> = HashMap::default();
        by_hash.reserve(wanted.len());
        for i in order {
            let r = &records[i];
            for ((path, _, _, hash), stamp) in r.manifest.files().zip(r.stamps.iter()) {
                if wanted.contains(hash) {
                    by_hash.entry(*hash).or_default().push((i, path, *stamp));
                }
            }
        }
        Ok(KeptContent {
            dirs,
            ids: records.iter().map(|r| r.id.clone()).collect(),
            by_hash,
            device: root.device()?,
            prechecked: None,
        })
    }

    /// Takes `intact`, the files of release `id` that [`intact_files`] found intact a moment
    /// ago, as checked.
    pub(super) fn set_prechecked(&mut self, id: &ReleaseId, intact: Arc<ahash::AHashSet<RelPath>>) {
        if let Some(i) = self.ids.iter().position(|r| r == id) {
            self.prechecked = Some((i, intact));
        }
    }

    /// The files of record `i` found intact beforehand, if that record was prechecked.
    fn prechecked(&self, i: usize) -> Option<&ahash::AHashSet<RelPath>> {
        self.prechecked
            .as_ref()
            .filter(|(r, _)| *r == i)
            .map(|(_, set)| &**set)
    }

    /// Whether some kept file with this content is still the inode its release verified.
    pub(super) fn has(&self, hash: &Hash) -> bool {
        self.by_hash.get(hash).is_some_and(|copies| {
            copies
                .iter()
                .any(|(i, path, stamp)| self.intact(*i, path, stamp))
        })
    }

    /// Which of `hashes` some intact kept file holds ([`KeptContent::held_checked`] alone).
    #[cfg(test)]
    pub(super) fn held<'h>(&self, hashes: impl Iterator<Item = &'h Hash>) -> HashSet<Hash> {
        self.held_checked(hashes).0
    }

    /// Which of `hashes` some intact kept file holds: [`KeptContent::has`] for many at once; and
    /// the preferred copies found intact, by release: what a build starting right away may link
    /// without checking them again ([`ExecOptions::checked_links`]).
    ///
    /// Each hash's preferred copy (current release first) is checked with one `fstatat` relative
    /// to its directory, opened once per directory and in parallel across directories; only a
    /// hash whose preferred copy fails falls back to trying the others one by one.
    ///
    /// [`ExecOptions::checked_links`]: sync_core::edge::exec::ExecOptions::checked_links
    pub(super) fn held_checked<'h>(
        &self,
        hashes: impl Iterator<Item = &'h Hash>,
    ) -> (HashSet<Hash>, CheckedLinks) {
        // Keyed by (record, parent directory).
        type Candidates<'p> = Vec<(Hash, &'p RelPath, FileStamp)>;
        let mut by_dir: HashMap<(usize, Option<&str>), Candidates<'_>> = HashMap::default();
        let mut known = Vec::new();
        for h in hashes {
            if let Some((i, path, stamp)) = self.by_hash.get(h).and_then(|c| c.first()) {
                match self.prechecked(*i) {
                    Some(set) => known.push((*h, *i, *path, set.contains(*path))),
                    None => by_dir
                        .entry((*i, path.parent_str()))
                        .or_default()
                        .push((*h, path, *stamp)),
                }
            }
        }
        let groups: Vec<_> = by_dir.into_iter().collect();
        let checked: Vec<(Hash, usize, &RelPath, bool)> = groups
            .par_iter()
            .flat_map_iter(|((i, parent), files)| {
                let dir = self
                    .dirs
                    .get(*i)
                    .and_then(Option::as_ref)
                    .and_then(|d| match parent {
                        None => d.try_clone().ok(),
                        Some(p) => d.open_dir(p).ok(),
                    });
                files.iter().map(move |(h, path, stamp)| {
                    let ok = dir
                        .as_ref()
                        .is_some_and(|d| self.stat_matches(d, path.file_name(), stamp));
                    (*h, *i, *path, ok)
                })
            })
            .collect();
        let mut intact: ahash::AHashMap<ReleaseId, ahash::AHashSet<RelPath>> = Default::default();
        for (_, i, path, ok) in &checked {
            if *ok {
                intact
                    .entry(self.ids[*i].clone())
                    .or_insert_with(|| ahash::AHashSet::with_capacity(checked.len()))
                    .insert((*path).clone());
            }
        }
        let mut intact: ahash::AHashMap<ReleaseId, Arc<ahash::AHashSet<RelPath>>> = intact
            .into_iter()
            .map(|(id, set)| (id, Arc::new(set)))
            .collect();
        if let Some((i, set)) = &self.prechecked {
            intact.insert(self.ids[*i].clone(), Arc::clone(set));
        }
        let held = checked
            .into_iter()
            .chain(known)
            .filter(|(h, _, _, ok)| *ok || self.has(h))
            .map(|(h, ..)| h)
            .collect();
        (held, Arc::new(intact))
    }

    fn stat_matches(&self, dir: &Dir, name: &str, stamp: &FileStamp) -> bool {
        stat_matches(dir, name, stamp, self.device)
    }

    /// Whether `path` of record `record` is still the file its stamp describes.
    fn intact(&self, record: usize, path: &RelPath, stamp: &FileStamp) -> bool {
        if let Some(set) = self.prechecked(record) {
            return set.contains(path);
        }
        let Some(Some(dir)) = self.dirs.get(record) else {
            return false;
        };
        dir.symlink_metadata(path.as_str()).is_ok_and(|m| {
            m.is_file()
                && m.dev() == self.device
                && m.ino() == stamp.ino
                && m.len() == stamp.size
                && i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec())
                    == stamp.mtime_ns
        })
    }

    /// Opens every kept copy of `hash` in turn (without following a final symlink).
    fn copies<'a>(&'a self, hash: &Hash) -> impl Iterator<Item = File> + use<'a, 'r> {
        self.by_hash
            .get(hash)
            .into_iter()
            .flatten()
            .filter_map(|(i, path, _)| {
                let dir = self.dirs.get(*i)?.as_ref()?;
                open_nofollow(dir, path.as_str())
            })
    }
}

/// The content source of a pushed release's build: local copies by content hash.
pub(super) struct LocalContent<'r> {
    root: &'r AppRoot,
    records: &'r [Arc<ReleaseRecord>],
    target: &'r Manifest,
    objects: Option<Dir>,
    /// The objects holding wanted content, by content; see [`LocalContent::refresh_objects`].
    object_names: std::sync::RwLock<HashMap<Hash, Vec<String>>>,
    wanted: HashSet<Hash>,
    /// Indexed when first asked for: a build copies from a kept release only content it holds
    /// under another mode, or a link source that failed its check, which most builds never do.
    kept: std::sync::OnceLock<Result<KeptContent<'r>, String>>,
}

impl<'r> LocalContent<'r> {
    pub(super) fn new(
        root: &'r AppRoot,
        target: &'r Manifest,
        records: &'r [Arc<ReleaseRecord>],
    ) -> Result<LocalContent<'r>, EdgeError> {
        let wanted: HashSet<Hash> = target.files().map(|(_, _, _, h)| *h).collect();
        let objects = open_dir(root, &format!("{}/{}", layout::META, layout::OBJECTS)).ok();
        let content = LocalContent {
            root,
            records,
            target,
            objects,
            object_names: Default::default(),
            wanted,
            kept: std::sync::OnceLock::new(),
        };
        content.refresh_objects();
        Ok(content)
    }

    /// The kept releases' files by content (the app's lock, held by the build, keeps what is
    /// current and kept from changing meanwhile).
    fn kept(&self) -> Result<&KeptContent<'r>, String> {
        self.kept
            .get_or_init(|| {
                let current = self.root.current().map_err(|e| e.to_string())?;
                KeptContent::new(self.root, self.records, current.as_ref(), &self.wanted)
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| format!("the kept releases cannot be read: {e}"))
    }

    /// Lists the object store again: for a build that started while the push's objects were
    /// still being written.
    pub(super) fn refresh_objects(&self) {
        let mut object_names: HashMap<Hash, Vec<String>> = HashMap::default();
        if let Some(dir) = &self.objects {
            if let Ok(entries) = dir.entries() {
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if let Some((hash, _)) = layout::parse_object_name(&name) {
                        if self.wanted.contains(&hash) {
                            object_names.entry(hash).or_default().push(name);
                        }
                    }
                }
            }
        }
        *self.object_names.write().unwrap_or_else(|p| p.into_inner()) = object_names;
    }
}

impl ContentSource for LocalContent<'_> {
    fn write_full(&self, path: &RelPath, size: u64, out: &mut File) -> Result<(), EdgeError> {
        let hash = match self.target.get(path).map(|e| &e.kind) {
            Some(EntryKind::File { hash, .. }) => *hash,
            _ => {
                return Err(EdgeError::Source {
                    path: path.clone(),
                    reason: "not a file of the pushed manifest".into(),
                })
            }
        };
        let names = self
            .object_names
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&hash)
            .cloned()
            .unwrap_or_default();
        let objects = names
            .iter()
            .filter_map(|name| open_nofollow(self.objects.as_ref()?, name));
        let mut copy = |src: File| {
            copy_verified(src, size, &hash, out).map_err(|e| EdgeError::Source {
                path: path.clone(),
                reason: format!("writing the copy failed: {e}"),
            })
        };
        for src in objects {
            if copy(src)? {
                return Ok(());
            }
        }
        let kept = self.kept().map_err(|reason| EdgeError::Source {
            path: path.clone(),
            reason,
        })?;
        for src in kept.copies(&hash) {
            if copy(src)? {
                return Ok(());
            }
        }
        Err(EdgeError::Source {
            path: path.clone(),
            reason: "the daemon holds no intact copy of its content (a kept release was changed or an object removed); push again".into(),
        })
    }
}

fn open_dir(root: &AppRoot, rel: &str) -> Result<Dir, EdgeError> {
    root.dir().open_dir(rel).map_err(|source| EdgeError::Io {
        what: "open",
        path: root.path().join(rel),
        source,
    })
}

fn open_nofollow(dir: &Dir, path: &str) -> Option<File> {
    let mut opts = OpenOptions::new();
    opts.read(true);
    cap_fs_ext::OpenOptionsFollowExt::follow(&mut opts, cap_fs_ext::FollowSymlinks::No);
    let f = dir.open_with(path, &opts).ok()?.into_std();
    f.metadata().ok()?.is_file().then_some(f)
}

/// Copies `src` to `out` (from its start) while hashing it. `Ok(false)` when the source is
/// unreadable or is not exactly `size` bytes with content `hash`; `Err` only when writing fails.
pub(super) fn copy_verified(src: File, size: u64, hash: &Hash, out: &mut File) -> io::Result<bool> {
    out.set_len(0)?;
    out.rewind()?;
    let mut src = src.take(size.saturating_add(1));
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let k = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Ok(false),
        };
        hasher.update(&buf[..k]);
        out.write_all(&buf[..k])?;
        n += k as u64;
    }
    Ok(n == size && Hash::from(hasher.finalize()) == *hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use sync_core::edge::deploy::{self, DeployOptions};
    use sync_core::edge::exec::LocalSource;
    use sync_core::edge::scan::{scan, ScanOptions};

    /// `held` (batched, by directory) agrees with `has` (one by one) on intact files and on
    /// each way a kept file can stop being the inode its record describes (fault case 10).
    #[test]
    fn held_agrees_with_has_on_intact_and_changed_files() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("d/e")).unwrap();
        let files = [
            ("a", "alpha"),
            ("b", "bravo"),
            ("c", "charlie"),
            ("d/x", "x-ray"),
            ("d/e/y", "yankee"),
            ("d/e/z", "zulu"),
        ];
        for (p, content) in files {
            std::fs::write(src.join(p), content).unwrap();
        }
        let root = AppRoot::open_or_create(&tmp.path().join("root")).unwrap();
        let lock = root.lock(|_| {}).unwrap();
        let scanned = scan(&src, &ScanOptions::default(), &|_| {}).unwrap();
        let opts = DeployOptions {
            release_id: Some(ReleaseId::new("r1").unwrap()),
            ..DeployOptions::default()
        };
        let source = LocalSource::open(&src).unwrap();
        deploy::deploy(&root, &lock, &scanned.manifest, &source, &opts, &|_| {}).unwrap();

        let release = tmp.path().join("root/releases/r1");
        // Edited in place (same inode, new size and mtime).
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(release.join("a"))
            .unwrap();
        f.write_all(b"!").unwrap();
        drop(f);
        // Replaced by another inode with the same content.
        std::fs::write(release.join("d/tmp"), "bravo").unwrap();
        std::fs::rename(release.join("d/tmp"), release.join("b")).unwrap();
        // Replaced by a symlink, and removed.
        std::fs::remove_file(release.join("c")).unwrap();
        symlink("d/x", release.join("c")).unwrap();
        std::fs::remove_file(release.join("d/e/z")).unwrap();

        let records = root.records().unwrap();
        let current = root.current().unwrap();
        let wanted: HashSet<Hash> = scanned.manifest.files().map(|(.., h)| *h).collect();
        let kept = KeptContent::new(&root, &records, current.as_ref(), &wanted).unwrap();
        let held = kept.held(wanted.iter());
        let one_by_one: HashSet<Hash> = wanted.iter().filter(|h| kept.has(h)).copied().collect();
        assert_eq!(held, one_by_one);
        let held_paths: Vec<&str> = scanned
            .manifest
            .files()
            .filter(|(.., h)| held.contains(h))
            .map(|(p, ..)| p.as_str())
            .collect();
        assert_eq!(held_paths, ["d/e/y", "d/x"]);

        // Checked all at once beforehand, the release's files give the same answers.
        let record = root.load_record(&ReleaseId::new("r1").unwrap()).unwrap();
        let intact = intact_files(&root, &record).unwrap();
        let mut listed: Vec<&str> = intact.iter().map(RelPath::as_str).collect();
        listed.sort_unstable();
        assert_eq!(listed, ["d/e/y", "d/x"]);
        let mut kept = KeptContent::new(&root, &records, current.as_ref(), &wanted).unwrap();
        kept.set_prechecked(&record.id, Arc::new(intact));
        let (held_after, checked) = kept.held_checked(wanted.iter());
        assert_eq!(held_after, held);
        assert_eq!(checked[&record.id].len(), 2);
    }
}

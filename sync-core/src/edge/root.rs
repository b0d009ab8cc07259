//! An app root on disk: layout, the deploy lock, recovery, release records, the journal and the
//! atomic swap of `current`.

use cap_std::fs::MetadataExt as _;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cap_std::ambient_authority;
use cap_std::fs::Dir;
use serde::{Deserialize, Serialize};

use super::{EdgeError, IoContext};
use crate::activation::{Activation, ActivationConfig, ActivationConfigError};
use crate::layout;
use crate::manifest::Policy;
use crate::path::RelPath;
use crate::release::{ReleaseId, ReleaseRecord, STAGING_SUFFIX, TRASH_SUFFIX};
use crate::retention::ReleaseState;

/// Settings kept in `ROOT/.relsync/config.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// Releases to keep (default 5).
    pub keep: Option<usize>,
    /// Paths linked from `ROOT/shared/` into every release.
    #[serde(default)]
    pub shared: Vec<String>,
    /// What activating a release runs besides the swap (hooks, php-fpm reload, OPcache reset,
    /// health checks); see `crate::activation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<ActivationConfig>,
}

impl AppConfig {
    pub fn parse(text: &str, path: &Path) -> Result<AppConfig, EdgeError> {
        let cfg: AppConfig = toml::from_str(text).map_err(|e| EdgeError::Config {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        if cfg.keep == Some(0) {
            return Err(EdgeError::Config {
                path: path.to_owned(),
                reason: "keep must be at least 1".into(),
            });
        }
        cfg.shared_paths().map_err(|reason| EdgeError::Config {
            path: path.to_owned(),
            reason,
        })?;
        cfg.activation().map_err(|e| EdgeError::Config {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(cfg)
    }

    /// The validated `[activation]` table (swap only when absent).
    pub fn activation(&self) -> Result<Activation, ActivationConfigError> {
        self.activation
            .as_ref()
            .map_or(Ok(Activation::default()), ActivationConfig::validate)
    }

    pub fn shared_paths(&self) -> Result<Vec<RelPath>, String> {
        self.shared
            .iter()
            .map(|s| RelPath::new(s.trim_end_matches('/')).map_err(|e| format!("shared: {e}")))
            .collect()
    }
}

/// A record of one event, appended to `journal.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub time_unix: i64,
    pub event: String,
    pub release: String,
    pub operator: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    pub result: String,
    pub duration_ms: u64,
}

/// `user@host`, for locks and the journal.
pub fn operator() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| format!("uid{}", rustix::process::getuid().as_raw()));
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    format!("{user}@{host}")
}

/// An opened app root. Paths handed to it are relative to the root.
///
/// Decoded release records are kept in memory while their files stay the same (inode, size,
/// mtime and ctime), so a long-lived holder such as relsyncd, or a deploy that plans and then
/// prunes, decodes each record once rather than on every look.
#[derive(Debug)]
pub struct AppRoot {
    path: PathBuf,
    dir: Dir,
    records: Mutex<HashMap<ReleaseId, CachedRecord>>,
}

/// The identity of a record file when it was decoded.
type RecordStamp = (u64, u64, i64, i64, i64, i64);

fn record_stamp(meta: &impl std::os::unix::fs::MetadataExt) -> RecordStamp {
    (
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
    )
}

#[derive(Debug)]
struct CachedRecord {
    stamp: RecordStamp,
    record: Arc<ReleaseRecord>,
}

/// Held while a deploy, activation or prune runs; released (and cleared) on drop, and by the kernel
/// if the process dies.
#[derive(Debug)]
pub struct LockGuard {
    file: File,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
    }
}

/// What recovery removed.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Recovery {
    pub staging_removed: Vec<String>,
    pub trash_removed: Vec<String>,
    pub orphan_records_removed: Vec<String>,
    pub current_tmp_removed: bool,
    pub objects_removed: usize,
    /// Prestaged trees of releases that are not current (they would keep the inodes of removed
    /// releases alive) and unfinished ones.
    pub prestages_removed: Vec<String>,
}

impl Recovery {
    pub fn is_empty(&self) -> bool {
        *self == Recovery::default()
    }
}

impl AppRoot {
    /// Opens `path`, creating the layout if it does not exist yet.
    pub fn open_or_create(path: &Path) -> Result<AppRoot, EdgeError> {
        std::fs::create_dir_all(path).ctx("create app root", path)?;
        let dir = Dir::open_ambient_dir(path, ambient_authority()).ctx("open app root", path)?;
        for d in [
            layout::RELEASES.to_string(),
            layout::SHARED.to_string(),
            layout::META.to_string(),
            format!("{}/{}", layout::META, layout::RECORDS),
        ] {
            match dir.create_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).ctx("create", path.join(&d)),
            }
        }
        Ok(AppRoot {
            path: path.to_owned(),
            dir,
            records: Mutex::default(),
        })
    }

    /// Opens an existing app root without creating anything.
    pub fn open(path: &Path) -> Result<AppRoot, EdgeError> {
        let dir = Dir::open_ambient_dir(path, ambient_authority()).ctx("open app root", path)?;
        if !dir.is_dir(layout::META) {
            return Err(EdgeError::Config {
                path: path.to_owned(),
                reason: "not a relsync app root (no .relsync directory); deploy to it first".into(),
            });
        }
        Ok(AppRoot {
            path: path.to_owned(),
            dir,
            records: Mutex::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn dir(&self) -> &Dir {
        &self.dir
    }

    pub(crate) fn releases_dir(&self) -> Result<Dir, EdgeError> {
        self.dir
            .open_dir(layout::RELEASES)
            .ctx("open", self.path.join(layout::RELEASES))
    }

    fn records_dir(&self) -> Result<Dir, EdgeError> {
        let rel = format!("{}/{}", layout::META, layout::RECORDS);
        self.dir.open_dir(&rel).ctx("open", self.path.join(rel))
    }

    /// Reads `.relsync/config.toml` (defaults when absent).
    pub fn config(&self) -> Result<AppConfig, EdgeError> {
        let rel = format!("{}/{}", layout::META, layout::CONFIG);
        match self.dir.read_to_string(&rel) {
            Ok(text) => AppConfig::parse(&text, &self.path.join(rel)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AppConfig::default()),
            Err(e) => Err(e).ctx("read", self.path.join(rel)),
        }
    }

    /// Takes the deploy lock without waiting. A lock left by a dead process is free again (flock dies
    /// with its holder); its stale owner line is reported through `on_stale`.
    pub fn lock(&self, on_stale: impl FnOnce(&str)) -> Result<LockGuard, EdgeError> {
        let rel = format!("{}/{}", layout::META, layout::LOCK);
        let path = self.path.join(&rel);
        let mut opts = cap_std::fs::OpenOptions::new();
        opts.read(true).write(true).create(true);
        let mut file = self
            .dir
            .open_with(&rel, &opts)
            .ctx("open lock", &path)?
            .into_std();
        // A lock without an owner line is being taken right now (the holder writes its line next),
        // or was just released while a child process forked by another thread still shares the
        // descriptor until its exec closes it: worth a short wait before calling the root busy.
        let patience = std::time::Instant::now() + std::time::Duration::from_millis(200);
        loop {
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => break,
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    let mut holder = String::new();
                    file.rewind().ctx("read lock", &path)?;
                    let _ = file.read_to_string(&mut holder);
                    let holder = holder.trim();
                    if holder.is_empty() && std::time::Instant::now() < patience {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                        continue;
                    }
                    return Err(EdgeError::Busy {
                        root: self.path.clone(),
                        holder: if holder.is_empty() {
                            "another process".into()
                        } else {
                            holder.to_owned()
                        },
                    });
                }
                Err(e) => return Err(std::io::Error::from(e)).ctx("lock", &path),
            }
        }
        file.rewind().ctx("read lock", &path)?;
        let mut stale = String::new();
        let _ = file.read_to_string(&mut stale);
        if !stale.trim().is_empty() {
            on_stale(stale.trim());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let owner = format!(
            "{} pid {} since {}",
            operator(),
            std::process::id(),
            crate::release::format_utc(now as i64)
        );
        file.set_len(0).ctx("write lock", &path)?;
        file.rewind().ctx("write lock", &path)?;
        file.write_all(owner.as_bytes()).ctx("write lock", &path)?;
        Ok(LockGuard { file })
    }

    /// Removes what an interrupted deploy or prune left behind. Needs the lock.
    pub fn recover(&self, _lock: &LockGuard) -> Result<Recovery, EdgeError> {
        let mut r = Recovery::default();
        match self.dir.remove_file(layout::CURRENT_TMP) {
            Ok(()) => r.current_tmp_removed = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).ctx("remove", self.path.join(layout::CURRENT_TMP)),
        }
        let releases = self.releases_dir()?;
        let rel_path = self.path.join(layout::RELEASES);
        for entry in releases.entries().ctx("list", &rel_path)? {
            let entry = entry.ctx("list", &rel_path)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let bucket = if name.ends_with(STAGING_SUFFIX) {
                &mut r.staging_removed
            } else if name.ends_with(TRASH_SUFFIX) {
                &mut r.trash_removed
            } else {
                continue;
            };
            remove_tree(&self.path.join(layout::RELEASES).join(&name))?;
            bucket.push(name);
        }
        // A record whose release directory is gone belongs to a release that never completed.
        let records = self.records_dir()?;
        let rec_path = self.path.join(layout::META).join(layout::RECORDS);
        for entry in records.entries().ctx("list", &rec_path)? {
            let entry = entry.ctx("list", &rec_path)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp") {
                // A temp file of an interrupted record write.
                records
                    .remove_file(&name)
                    .ctx("remove", rec_path.join(&name))?;
                continue;
            }
            let Some(id) = name.strip_suffix(layout::RECORD_SUFFIX) else {
                continue;
            };
            if !releases.is_dir(id) {
                records
                    .remove_file(&name)
                    .ctx("remove", rec_path.join(&name))?;
                r.orphan_records_removed.push(id.to_owned());
            }
        }
        r.prestages_removed = self.remove_prestages(self.current()?.as_ref())?;
        // Temporaries of interrupted receives, and objects of pushes never re-run within a day.
        let objects = format!("{}/{}", layout::META, layout::OBJECTS);
        if self.dir.is_dir(&objects) {
            r.objects_removed = super::object::ObjectStore::open(self)?
                .clean(std::time::Duration::from_secs(24 * 3600))?;
        }
        if !r.is_empty() {
            sync_dir(&self.dir, &self.path)?;
            sync_dir(&releases, &rel_path)?;
            sync_dir(&records, &rec_path)?;
        }
        Ok(r)
    }

    /// The release `current` points to, if any.
    pub fn current(&self) -> Result<Option<ReleaseId>, EdgeError> {
        match self.dir.read_link_contents(layout::CURRENT) {
            Ok(t) => Ok(t.to_str().and_then(layout::parse_current_target)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).ctx("read link", self.path.join(layout::CURRENT)),
        }
    }

    /// Ids of complete releases (a directory and a record), unordered.
    pub fn release_ids(&self) -> Result<Vec<ReleaseId>, EdgeError> {
        let records = self.records_dir()?;
        let releases = self.releases_dir()?;
        let rec_path = self.path.join(layout::META).join(layout::RECORDS);
        let mut ids = Vec::new();
        for entry in records.entries().ctx("list", &rec_path)? {
            let entry = entry.ctx("list", &rec_path)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name
                .strip_suffix(layout::RECORD_SUFFIX)
                .and_then(|s| ReleaseId::new(s).ok())
            {
                if releases.is_dir(id.as_str()) {
                    ids.push(id);
                }
            }
        }
        Ok(ids)
    }

    /// The record of release `id` (decoded once while its file is unchanged).
    pub fn load_record(&self, id: &ReleaseId) -> Result<Arc<ReleaseRecord>, EdgeError> {
        let rel = format!(
            "{}/{}/{}",
            layout::META,
            layout::RECORDS,
            layout::record_name(id)
        );
        let path = self.path.join(&rel);
        let file = match self.dir.open(&rel) {
            Ok(f) => f.into_std(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(EdgeError::NoSuchRelease(id.clone()))
            }
            Err(e) => return Err(e).ctx("open", path),
        };
        let meta = file.metadata().ctx("stat", &path)?;
        let stamp = record_stamp(&meta);
        let cache = || self.records.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hit) = cache().get(id).filter(|c| c.stamp == stamp) {
            return Ok(Arc::clone(&hit.record));
        }
        let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        (&file).read_to_end(&mut bytes).ctx("read", &path)?;
        let policy = Policy {
            allow_world_writable: true,
            ..Policy::default()
        };
        let record = Arc::new(ReleaseRecord::decode(&bytes, &policy).map_err(|source| {
            EdgeError::Record {
                id: id.to_string(),
                path,
                source,
            }
        })?);
        cache().insert(
            id.clone(),
            CachedRecord {
                stamp,
                record: Arc::clone(&record),
            },
        );
        Ok(record)
    }

    /// All complete releases' records, oldest first.
    pub fn records(&self) -> Result<Vec<Arc<ReleaseRecord>>, EdgeError> {
        let ids = self.release_ids()?;
        let mut v = ids
            .iter()
            .map(|id| self.load_record(id))
            .collect::<Result<Vec<_>, _>>()?;
        v.sort_by_key(|r| r.seq);
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| ids.contains(id));
        Ok(v)
    }

    /// Checks that every shared path exists under `ROOT/shared/` (as anything but a dangling name),
    /// so no release is staged or activated with links into nothing.
    pub fn check_shared(&self, shared: &[RelPath]) -> Result<(), EdgeError> {
        for p in shared {
            let rel = format!("{}/{}", layout::SHARED, p);
            match self.dir.symlink_metadata(&rel) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(EdgeError::SharedMissing {
                        root: self.path.clone(),
                        path: p.clone(),
                    })
                }
                Err(e) => return Err(e).ctx("stat", self.path.join(&rel)),
            }
        }
        Ok(())
    }

    /// Release ids marked bad by a failed activation (from the journal).
    pub fn bad_releases(&self) -> Result<Vec<String>, EdgeError> {
        Ok(self
            .journal()?
            .into_iter()
            .filter(|e| e.event == "mark-bad")
            .map(|e| e.release)
            .collect())
    }

    /// Retention view of the kept releases.
    pub fn states(&self, records: &[Arc<ReleaseRecord>]) -> Result<Vec<ReleaseState>, EdgeError> {
        self.states_at(records, None)
    }

    /// [`AppRoot::states`], with releases marked bad less than `retention::BAD_GRACE_SECS` before
    /// `now_unix` flagged (pruning spares them for now).
    pub fn states_at(
        &self,
        records: &[Arc<ReleaseRecord>],
        now_unix: Option<i64>,
    ) -> Result<Vec<ReleaseState>, EdgeError> {
        let marks: Vec<(String, i64)> = self
            .journal()?
            .into_iter()
            .filter(|e| e.event == "mark-bad")
            .map(|e| (e.release, e.time_unix))
            .collect();
        Ok(records
            .iter()
            .map(|r| {
                let mut times = marks.iter().filter(|(id, _)| id == r.id.as_str());
                let bad = times.clone().next().is_some();
                let recently_bad = now_unix.is_some_and(|now| {
                    times.any(|(_, t)| now.saturating_sub(*t) < crate::retention::BAD_GRACE_SECS)
                });
                ReleaseState {
                    id: r.id.clone(),
                    seq: r.seq,
                    bad,
                    recently_bad,
                }
            })
            .collect())
    }

    /// Writes a release record durably and keeps it decoded: reading it back (activating the
    /// release just built, the next push's need) decodes nothing while the file is unchanged.
    pub fn write_record(&self, rec: ReleaseRecord) -> Result<Arc<ReleaseRecord>, EdgeError> {
        let stamp = self.write_record_bytes(&rec.id, &rec.encode())?;
        let record = Arc::new(rec);
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                record.id.clone(),
                CachedRecord {
                    stamp,
                    record: Arc::clone(&record),
                },
            );
        Ok(record)
    }

    /// Writes an encoded release record durably (temp + fsync + rename + directory fsync) and
    /// returns the stamp [`AppRoot::load_record`] will find on it.
    fn write_record_bytes(&self, id: &ReleaseId, bytes: &[u8]) -> Result<RecordStamp, EdgeError> {
        let records = self.records_dir()?;
        let name = layout::record_name(id);
        let tmp = format!(".tmp-{name}");
        let path = self
            .path
            .join(layout::META)
            .join(layout::RECORDS)
            .join(&name);
        let mut f = records.create(&tmp).ctx("create", &path)?.into_std();
        f.write_all(bytes).ctx("write", &path)?;
        f.sync_all().ctx("sync", &path)?;
        records.rename(&tmp, &records, &name).ctx("rename", &path)?;
        sync_dir(&records, path.parent().unwrap_or(&self.path))?;
        // After the rename, which sets the file's ctime.
        let meta = f.metadata().ctx("stat", &path)?;
        Ok(record_stamp(&meta))
    }

    pub(crate) fn remove_record(&self, id: &ReleaseId) -> Result<(), EdgeError> {
        let records = self.records_dir()?;
        let name = layout::record_name(id);
        match records.remove_file(&name) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).ctx(
                "remove",
                self.path
                    .join(layout::META)
                    .join(layout::RECORDS)
                    .join(name),
            ),
        }
    }

    /// Points `current` at release `id` atomically and durably: `current.tmp` is created as a symlink,
    /// renamed over `current`, and the root directory is fsynced before returning.
    pub fn swap_current(&self, id: &ReleaseId) -> Result<(), EdgeError> {
        let releases = self.releases_dir()?;
        if !releases.is_dir(id.as_str()) {
            return Err(EdgeError::NoSuchRelease(id.clone()));
        }
        let tmp_path = self.path.join(layout::CURRENT_TMP);
        match self.dir.remove_file(layout::CURRENT_TMP) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).ctx("remove", &tmp_path),
        }
        self.dir
            .symlink_contents(layout::current_target(id), layout::CURRENT_TMP)
            .ctx("create symlink", &tmp_path)?;
        self.dir
            .rename(layout::CURRENT_TMP, &self.dir, layout::CURRENT)
            .ctx("rename", self.path.join(layout::CURRENT))?;
        sync_dir(&self.dir, &self.path)
    }

    /// Removes `current` (the app then serves no release) and fsyncs the root directory.
    pub fn remove_current(&self) -> Result<(), EdgeError> {
        match self.dir.remove_file(layout::CURRENT) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).ctx("remove", self.path.join(layout::CURRENT)),
        }
        sync_dir(&self.dir, &self.path)
    }

    /// Removes release `id`: rename to `<id>.trash` (so a crash leaves something recovery removes),
    /// drop its record, then delete the tree without following symlinks.
    pub fn remove_release(&self, id: &ReleaseId) -> Result<(), EdgeError> {
        self.remove_prestage(id)?;
        let releases = self.releases_dir()?;
        let rel_path = self.path.join(layout::RELEASES);
        let trash = id.trash_name();
        releases
            .rename(id.as_str(), &releases, &trash)
            .ctx("rename", rel_path.join(id.as_str()))?;
        sync_dir(&releases, &rel_path)?;
        self.remove_record(id)?;
        remove_tree(&rel_path.join(&trash))
    }

    /// `ROOT/.relsync/next`, for messages.
    pub(crate) fn next_path(&self) -> PathBuf {
        self.path.join(layout::META).join(layout::NEXT)
    }

    /// `.relsync/next/`, created when missing.
    pub(crate) fn next_dir(&self) -> Result<Dir, EdgeError> {
        let rel = format!("{}/{}", layout::META, layout::NEXT);
        match self.dir.create_dir(&rel) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).ctx("create", self.next_path()),
        }
        self.dir.open_dir(&rel).ctx("open", self.next_path())
    }

    /// Whether the complete prestaged tree of release `id` is there (see [`layout::NEXT`]).
    pub fn has_prestage(&self, id: &ReleaseId) -> bool {
        let rel = format!("{}/{}/{id}", layout::META, layout::NEXT);
        self.dir.symlink_metadata(&rel).is_ok_and(|m| m.is_dir())
    }

    /// The names in `.relsync/next/`: prestaged trees, complete (`<id>`) or not.
    pub fn prestages(&self) -> Result<Vec<String>, EdgeError> {
        let next = self.next_path();
        let rel = format!("{}/{}", layout::META, layout::NEXT);
        let dir = match self.dir.open_dir(rel) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).ctx("open", next),
        };
        let mut names = Vec::new();
        for entry in dir.entries().ctx("list", &next)? {
            let entry = entry.ctx("list", &next)?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    /// Removes every prestaged tree but the complete one of `keep`; returns the names removed.
    pub fn remove_prestages(&self, keep: Option<&ReleaseId>) -> Result<Vec<String>, EdgeError> {
        let next = self.next_path();
        let mut removed = Vec::new();
        for name in self.prestages()? {
            if keep.is_some_and(|k| k.as_str() == name) {
                continue;
            }
            remove_tree(&next.join(&name))?;
            removed.push(name);
        }
        Ok(removed)
    }

    /// Removes the prestaged tree of `id`, complete or not.
    pub fn remove_prestage(&self, id: &ReleaseId) -> Result<(), EdgeError> {
        let next = self.next_path();
        remove_tree(&next.join(id.as_str()))?;
        remove_tree(&next.join(format!("{id}{}", layout::PARTIAL_SUFFIX)))
    }

    /// Appends an entry to the journal and syncs it.
    pub fn append_journal(&self, entry: &JournalEntry) -> Result<(), EdgeError> {
        let rel = format!("{}/{}", layout::META, layout::JOURNAL);
        let path = self.path.join(&rel);
        let mut opts = cap_std::fs::OpenOptions::new();
        opts.append(true).create(true);
        let mut f = self.dir.open_with(&rel, &opts).ctx("open", &path)?;
        let mut line = serde_json::to_string(entry).expect("journal entries serialize");
        line.push('\n');
        f.write_all(line.as_bytes()).ctx("append", &path)?;
        f.sync_data().ctx("sync", &path)
    }

    /// Reads the journal; lines that do not parse (a torn last write) are skipped.
    pub fn journal(&self) -> Result<Vec<JournalEntry>, EdgeError> {
        let rel = format!("{}/{}", layout::META, layout::JOURNAL);
        match self.dir.read_to_string(&rel) {
            Ok(text) => Ok(text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e).ctx("read", self.path.join(rel)),
        }
    }

    /// Bytes available to unprivileged writers on the root's file system.
    pub fn free_bytes(&self) -> Result<u64, EdgeError> {
        let st = rustix::fs::fstatvfs(&readable(&self.dir, &self.path)?)
            .map_err(std::io::Error::from)
            .ctx("statvfs", &self.path)?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// The kind of file system the root is on (`tmpfs`, `ext4`, …), for reports that time it.
    pub fn file_system(&self) -> Result<String, EdgeError> {
        let st = rustix::fs::fstatfs(&readable(&self.dir, &self.path)?)
            .map_err(std::io::Error::from)
            .ctx("statfs", &self.path)?;
        #[allow(clippy::unnecessary_cast)] // `f_type`'s type differs between targets.
        Ok(file_system_name(st.f_type as u64))
    }

    /// Device of the root, to check that link sources live on the same file system.
    pub fn device(&self) -> Result<u64, EdgeError> {
        Ok(self.dir.dir_metadata().ctx("stat", &self.path)?.dev())
    }
}

/// The name of a file system by its `statfs` magic number (linux/magic.h), or the number.
fn file_system_name(magic: u64) -> String {
    match magic {
        0x0102_1994 => "tmpfs",
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x2FC1_2FC1 => "zfs",
        0xF2F5_2010 => "f2fs",
        0x794C_7630 => "overlayfs",
        0x6969 => "nfs",
        0x6573_5546 => "fuse",
        other => return format!("file system type {other:#x}"),
    }
    .to_string()
}

/// A readable descriptor for `dir`: cap-std may hold directories as `O_PATH` handles, on which
/// fsync, syncfs and fstatvfs fail with EBADF.
fn readable(dir: &Dir, path: &Path) -> Result<cap_std::fs::File, EdgeError> {
    dir.open(".").ctx("open directory", path)
}

/// fsync of a directory (makes its entries durable).
pub(crate) fn sync_dir(dir: &Dir, path: &Path) -> Result<(), EdgeError> {
    readable(dir, path)?.sync_all().ctx("sync directory", path)
}

/// syncfs of the file system holding `dir`: every dirty page and inode, in one call.
pub(crate) fn sync_fs(dir: &Dir, path: &Path) -> Result<(), EdgeError> {
    rustix::fs::syncfs(&readable(dir, path)?)
        .map_err(std::io::Error::from)
        .ctx("sync", path)
}

/// Removes a tree without following symlinks (std's implementation opens each level with
/// O_NOFOLLOW and unlinks relative to it, so a symlink swapped in mid-way is removed, not followed).
///
/// A release may hold read-only directories, whose entries an unprivileged owner cannot unlink: on
/// EACCES the directories are made owner-writable and the removal is retried.
pub(crate) fn remove_tree(path: &Path) -> Result<(), EdgeError> {
    let mut result = std::fs::remove_dir_all(path);
    if matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied) {
        result = make_owner_writable(path).and_then(|()| std::fs::remove_dir_all(path));
    }
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).ctx("remove", path),
    }
}

/// Adds u+rwx to every directory of the tree at `path`. Each level is opened relative to its parent
/// with O_NOFOLLOW and changed through that descriptor, so a symlink swapped in is never followed.
fn make_owner_writable(path: &Path) -> std::io::Result<()> {
    use rustix::fs::{fchmod, fstat, openat, FileType, Mode, OFlags, CWD};
    use rustix::io::Errno;
    fn open_dir<Fd: std::os::fd::AsFd>(
        parent: Fd,
        name: impl rustix::path::Arg,
    ) -> rustix::io::Result<std::os::fd::OwnedFd> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        openat(parent, name, flags, Mode::empty())
    }
    fn walk(fd: std::os::fd::OwnedFd) -> std::io::Result<()> {
        let mode = fstat(&fd)?.st_mode & 0o7777;
        if mode & 0o700 != 0o700 {
            fchmod(&fd, Mode::from_raw_mode(mode | 0o700))?;
        }
        for entry in rustix::fs::Dir::read_from(&fd)? {
            let entry = entry?;
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            if !matches!(entry.file_type(), FileType::Directory | FileType::Unknown) {
                continue;
            }
            match open_dir(&fd, name) {
                Ok(sub) => walk(sub)?,
                // Not a directory (any more), or already gone: nothing to open up.
                Err(Errno::NOTDIR | Errno::LOOP | Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
    walk(open_dir(CWD, path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_systems_are_named_by_their_magic_number() {
        for (magic, name) in [
            (0x0102_1994, "tmpfs"),
            (0xEF53, "ext4"),
            (0x5846_5342, "xfs"),
            (0x9123_683E, "btrfs"),
            (0x1234, "file system type 0x1234"),
        ] {
            assert_eq!(file_system_name(magic), name);
        }
        // A real root's file system is the one statfs reports for its directory.
        let td = tempfile::tempdir().unwrap();
        let root = AppRoot::open_or_create(&td.path().join("app")).unwrap();
        let st = rustix::fs::statfs(td.path()).unwrap();
        #[allow(clippy::unnecessary_cast)]
        let want = file_system_name(st.f_type as u64);
        assert_eq!(root.file_system().unwrap(), want);
    }

    #[test]
    fn config_parsing() {
        let p = Path::new("config.toml");
        let cfg = AppConfig::parse("keep = 3\nshared = [\"storage/\", \".env\"]\n", p).unwrap();
        assert_eq!(cfg.keep, Some(3));
        let shared: Vec<String> = cfg
            .shared_paths()
            .unwrap()
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(shared, ["storage", ".env"]);
        for bad in [
            "keep = 0",
            "shared = [\"../etc\"]",
            "kepe = 3",
            "keep = \"x\"",
        ] {
            let err = AppConfig::parse(bad, p).unwrap_err().to_string();
            assert!(err.contains("config.toml"), "{bad}: {err}");
        }
    }

    fn record(id: &str, seq: u64) -> ReleaseRecord {
        use crate::manifest::{Entry, Hash, Manifest};
        use crate::release::FileStamp;
        let m = Manifest::from_unsorted(
            vec![Entry::file("a", 1, 0o644, Hash::of(id.as_bytes())).unwrap()],
            &Policy::default(),
        )
        .unwrap();
        ReleaseRecord {
            id: ReleaseId::new(id).unwrap(),
            seq,
            created_unix: 1,
            manifest: m,
            stamps: vec![FileStamp {
                ino: 1,
                size: 1,
                mtime_ns: 0,
            }],
        }
    }

    #[test]
    fn records_are_decoded_once_and_reread_when_their_file_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = AppRoot::open_or_create(tmp.path()).unwrap();
        let mut written = Vec::new();
        for (id, seq) in [("r1", 1), ("r2", 2)] {
            root.dir.create_dir(format!("releases/{id}")).unwrap();
            written.push(root.write_record(record(id, seq)).unwrap());
        }
        // What was written is what is read back, not decoded again.
        let first = root.records().unwrap();
        assert_eq!(
            first.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["r1", "r2"]
        );
        assert!(first.iter().zip(&written).all(|(a, b)| Arc::ptr_eq(a, b)));
        let again = root.records().unwrap();
        assert!(first.iter().zip(&again).all(|(a, b)| Arc::ptr_eq(a, b)));

        // A record rewritten by relsync is the new one at once.
        let rewritten = root.write_record(record("r1", 9)).unwrap();
        let reread = root.load_record(&ReleaseId::new("r1").unwrap()).unwrap();
        assert_eq!(reread.seq, 9);
        assert!(Arc::ptr_eq(&reread, &rewritten));

        // One replaced behind relsync's back (a new inode) is read again.
        root.dir
            .write(".relsync/releases/.r1", record("r1", 11).encode())
            .unwrap();
        root.dir
            .rename(
                ".relsync/releases/.r1",
                &root.dir,
                ".relsync/releases/r1.rec",
            )
            .unwrap();
        let reread = root.load_record(&ReleaseId::new("r1").unwrap()).unwrap();
        assert_eq!(reread.seq, 11);
        assert!(!Arc::ptr_eq(&reread, &rewritten));
        assert_eq!(
            root.records()
                .unwrap()
                .iter()
                .map(|r| r.id.as_str())
                .collect::<Vec<_>>(),
            ["r2", "r1"]
        );

        // A release whose directory went away drops out, and a missing record is NoSuchRelease.
        root.dir.remove_dir("releases/r2").unwrap();
        assert_eq!(root.records().unwrap().len(), 1);
        root.dir.remove_file(".relsync/releases/r1.rec").unwrap();
        assert!(matches!(
            root.load_record(&ReleaseId::new("r1").unwrap()),
            Err(EdgeError::NoSuchRelease(_))
        ));
    }
}

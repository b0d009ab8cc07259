//! The temp-directory harness: source trees, deploy shortcuts, file identities, tree snapshots and
//! the I0 checker every test ends with.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, FileTimes};
use std::io::ErrorKind;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use sync_core::edge::deploy::{self, DeployOptions, DeployReport};
use sync_core::edge::exec::LocalSource;
use sync_core::edge::root::AppRoot;
use sync_core::edge::scan::{scan, ScanOptions};
use sync_core::edge::EdgeError;
use sync_core::{layout, EntryKind, Hash, Manifest, RelPath, ReleaseId};

/// The deploy time every test passes in (the engine reads no clock for ids and records).
pub const NOW: i64 = 1_800_000_000;

pub fn no_progress(_: u64) {}

/// A temporary directory that is removed even when it holds read-only directories, which an
/// unprivileged owner cannot empty as they are.
pub struct Scratch(tempfile::TempDir);

pub fn scratch() -> Scratch {
    Scratch(tempfile::tempdir().unwrap())
}

impl Scratch {
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        open_up(self.0.path());
    }
}

/// Adds u+rwx to every directory below `dir` (symlinks are left alone), so it can be removed.
pub fn open_up(dir: &Path) {
    let Ok(m) = fs::symlink_metadata(dir) else {
        return;
    };
    if !m.is_dir() {
        return;
    }
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(m.mode() | 0o700));
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            open_up(&e.path());
        }
    }
}

pub fn remove_all(dir: &Path) {
    open_up(dir);
    fs::remove_dir_all(dir).unwrap();
}

pub fn id(s: &str) -> ReleaseId {
    ReleaseId::new(s).unwrap()
}

pub fn rel(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

pub fn hash_of(data: &[u8]) -> Hash {
    Hash(*blake3::hash(data).as_bytes())
}

/// Writes `content` to `root/path` with exactly `mode` (whatever the umask), creating parents.
pub fn put(root: &Path, path: &str, content: &[u8], mode: u32) {
    let p = root.join(path);
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(&p, content).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
}

pub fn mkdir(root: &Path, path: &str, mode: u32) {
    let p = root.join(path);
    fs::create_dir_all(&p).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
}

pub fn link(root: &Path, path: &str, target: &str) {
    symlink(target, root.join(path)).unwrap();
}

/// Release A of the test application: nested and read-only directories, a symlink, an empty file.
pub fn source_a(dir: &Path) {
    mkdir(dir, "", 0o755);
    put(dir, "index.php", b"<?php require 'app/boot.php';\n", 0o644);
    mkdir(dir, "app", 0o755);
    put(
        dir,
        "app/same.php",
        b"<?php // the same in both releases\n",
        0o644,
    );
    put(dir, "app/edit.php", b"<?php echo 'version one';\n", 0o644);
    put(dir, "app/old-name.php", b"<?php class Moved {}\n", 0o644);
    put(dir, "app/chmod.sh", b"#!/bin/sh\necho tool\n", 0o644);
    put(dir, "app/gone.php", b"<?php // only in a\n", 0o644);
    mkdir(dir, "app/lib", 0o755);
    put(
        dir,
        "app/lib/util.php",
        b"<?php function util() { return 1; }\n",
        0o644,
    );
    mkdir(dir, "app/lib/deep", 0o750);
    put(dir, "app/lib/deep/x.php", b"<?php // deep\n", 0o640);
    put(dir, "empty.txt", b"", 0o644);
    mkdir(dir, "public", 0o755);
    link(dir, "public/assets", "../app/lib");
    mkdir(dir, "bin", 0o755);
    put(dir, "bin/tool", b"#!/bin/sh\nexit 0\n", 0o755);
    // Read-only last, once it is filled.
    mkdir(dir, "bin", 0o555);
}

/// Release B: one edit, one addition, one removal, a move into a new directory, a mode change on
/// identical content, a duplicate of an unchanged file and a new symlink.
pub fn source_b(dir: &Path) {
    source_a(dir);
    put(
        dir,
        "app/edit.php",
        b"<?php echo 'version two, a little longer';\n",
        0o644,
    );
    put(dir, "app/added.php", b"<?php // new in b\n", 0o644);
    fs::remove_file(dir.join("app/gone.php")).unwrap();
    mkdir(dir, "app/moved", 0o755);
    fs::rename(
        dir.join("app/old-name.php"),
        dir.join("app/moved/new-name.php"),
    )
    .unwrap();
    fs::set_permissions(dir.join("app/chmod.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    put(
        dir,
        "app/dup.php",
        b"<?php // the same in both releases\n",
        0o644,
    );
    link(dir, "public/home", "../index.php");
}

/// A one-file release, for filling the history.
pub fn source_tiny(dir: &Path, text: &str) {
    put(dir, "index.php", text.as_bytes(), 0o644);
}

pub fn manifest_of(src: &Path) -> Manifest {
    scan(src, &ScanOptions::default(), &no_progress)
        .unwrap_or_else(|e| panic!("scan {}: {e}", src.display()))
        .manifest
}

pub fn opts(release: &str, activate: bool) -> DeployOptions {
    DeployOptions {
        release_id: Some(id(release)),
        activate,
        now_unix: NOW,
        ..DeployOptions::default()
    }
}

/// Scans `src` and deploys it under the lock, like `relsync deploy` on the server itself.
pub fn deploy_tree(
    root: &AppRoot,
    src: &Path,
    o: &DeployOptions,
) -> Result<DeployReport, EdgeError> {
    let m = manifest_of(src);
    let lock = root.lock(|_| {})?;
    let source = LocalSource::open(src)?;
    deploy::deploy(root, &lock, &m, &source, o, &no_progress)
}

/// An app root with release A deployed as `r1` and current, plus the source of B.
pub struct WithA {
    _t: Scratch,
    pub path: PathBuf,
    pub src_b: PathBuf,
    pub app: AppRoot,
}

pub fn with_a_deployed() -> WithA {
    let t = scratch();
    let (src_a, src_b) = (t.path().join("sa"), t.path().join("sb"));
    source_a(&src_a);
    source_b(&src_b);
    let path = t.path().join("app");
    let app = new_app(&path);
    deploy_tree(&app, &src_a, &opts("r1", true)).unwrap();
    WithA {
        _t: t,
        path,
        src_b,
        app,
    }
}

/// An app root with a configured shared path (`storage`, holding a log the engine must not touch).
pub fn new_app(path: &Path) -> AppRoot {
    let app = AppRoot::open_or_create(path).unwrap();
    put(
        path,
        ".relsync/config.toml",
        b"shared = [\"storage\"]\n",
        0o644,
    );
    put(path, "shared/storage/app.log", b"log line\n", 0o644);
    app
}

/// What a path is on disk, with everything a change could show in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    pub nlink: u64,
    pub size: u64,
    pub mtime_ns: i128,
    /// Content hash of a regular file.
    pub hash: Option<Hash>,
    /// Target of a symlink.
    pub target: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

impl Node {
    /// The node without its link count, which linking a later release legitimately raises.
    pub fn unlinked(&self) -> Node {
        Node {
            nlink: 0,
            ..self.clone()
        }
    }
}

pub fn node(p: &Path) -> Node {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
    let ft = m.file_type();
    let kind = if ft.is_file() {
        Kind::File
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else {
        Kind::Other
    };
    Node {
        kind,
        dev: m.dev(),
        ino: m.ino(),
        mode: m.mode() & 0o7777,
        nlink: m.nlink(),
        size: m.len(),
        mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        hash: (kind == Kind::File).then(|| hash_of(&fs::read(p).unwrap())),
        target: (kind == Kind::Symlink)
            .then(|| fs::read_link(p).unwrap().to_string_lossy().into_owned()),
    }
}

/// Every entry below `dir` (not `dir` itself), never following symlinks.
pub fn snapshot(dir: &Path) -> BTreeMap<String, Node> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Node>) {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            let n = node(&p);
            let key = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            let is_dir = n.kind == Kind::Dir;
            out.insert(key, n);
            if is_dir {
                walk(base, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

pub fn unlinked(s: &BTreeMap<String, Node>) -> BTreeMap<String, Node> {
    s.iter().map(|(k, v)| (k.clone(), v.unlinked())).collect()
}

/// Sets the modification time of `p` to `mtime_ns` (to hide an in-place edit from a quick check).
pub fn set_mtime(p: &Path, mtime_ns: i128) {
    let t = UNIX_EPOCH + Duration::from_nanos(mtime_ns as u64);
    File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_times(FileTimes::new().set_modified(t))
        .unwrap();
}

/// What I0 found: the current release and the complete releases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub current: Option<String>,
    pub releases: BTreeSet<String>,
}

impl State {
    pub fn releases(&self) -> Vec<&str> {
        self.releases.iter().map(String::as_str).collect()
    }
}

/// Checks I0 on the app root at `root` and returns what it found:
///
/// - no `current.tmp`, no `*.staging` or `*.trash` release directory, no temporary record;
/// - release directories and records correspond one to one;
/// - every release holds exactly its record's manifest (type, mode, size, re-hashed content, symlink
///   target) plus relsync's shared links, and every file is still the inode (same size and mtime)
///   recorded when the release was verified: no release ever changed;
/// - `current`, if present, is a symlink `releases/<id>` to one of those releases.
pub fn assert_i0(root: &Path) -> State {
    let app = AppRoot::open(root).unwrap();
    assert!(
        fs::symlink_metadata(root.join(layout::CURRENT_TMP)).is_err(),
        "{} left behind",
        layout::CURRENT_TMP
    );
    let mut dirs = BTreeSet::new();
    for e in fs::read_dir(root.join(layout::RELEASES)).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        assert!(
            !name.ends_with(".staging") && !name.ends_with(".trash"),
            "{name} left behind in releases/"
        );
        assert!(
            e.file_type().unwrap().is_dir(),
            "releases/{name} is not a directory"
        );
        dirs.insert(name);
    }
    let mut records = BTreeSet::new();
    for e in fs::read_dir(root.join(layout::META).join(layout::RECORDS)).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        let Some(id) = name.strip_suffix(layout::RECORD_SUFFIX) else {
            panic!("stray file {name} among the release records");
        };
        records.insert(id.to_owned());
    }
    assert_eq!(dirs, records, "release directories and records differ");
    for r in &dirs {
        check_release(&app, root, r);
    }
    let current = match fs::symlink_metadata(root.join(layout::CURRENT)) {
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => panic!("stat current: {e}"),
        Ok(m) => {
            assert!(m.file_type().is_symlink(), "current is not a symlink");
            let t = fs::read_link(root.join(layout::CURRENT)).unwrap();
            let t = t.to_str().unwrap();
            let cur = t
                .strip_prefix("releases/")
                .unwrap_or_else(|| panic!("current points to {t:?}"));
            assert!(
                dirs.contains(cur),
                "current points to {t:?}, not a complete release"
            );
            assert!(fs::metadata(root.join(layout::CURRENT)).unwrap().is_dir());
            Some(cur.to_owned())
        }
    };
    State {
        current,
        releases: dirs,
    }
}

/// Checks one release against its record (see [`assert_i0`]).
pub fn check_release(app: &AppRoot, root: &Path, release: &str) {
    let rec = app
        .load_record(&id(release))
        .unwrap_or_else(|e| panic!("record of {release}: {e}"));
    let disk = snapshot(&root.join(layout::RELEASES).join(release));
    let mut stamps = rec.stamps.iter();
    for e in rec.manifest.entries() {
        let p = e.path.as_str();
        let n = disk
            .get(p)
            .unwrap_or_else(|| panic!("release {release}: {p} is missing"));
        match &e.kind {
            EntryKind::File { size, mode, hash } => {
                assert_eq!(n.kind, Kind::File, "release {release}: {p} is not a file");
                assert_eq!(n.mode, *mode, "release {release}: mode of {p}");
                assert_eq!(n.size, *size, "release {release}: size of {p}");
                assert_eq!(n.hash, Some(*hash), "release {release}: content of {p}");
                let st = stamps.next().unwrap();
                assert_eq!(
                    (n.ino, n.size, n.mtime_ns),
                    (st.ino, st.size, st.mtime_ns),
                    "release {release}: {p} is no longer the inode verified at deploy"
                );
            }
            EntryKind::Dir { mode } => {
                assert_eq!(
                    n.kind,
                    Kind::Dir,
                    "release {release}: {p} is not a directory"
                );
                assert_eq!(n.mode, *mode, "release {release}: mode of directory {p}");
            }
            EntryKind::Symlink { target } => {
                assert_eq!(
                    n.kind,
                    Kind::Symlink,
                    "release {release}: {p} is not a symlink"
                );
                assert_eq!(
                    n.target.as_ref(),
                    Some(target),
                    "release {release}: target of {p}"
                );
            }
        }
    }
    for (p, n) in &disk {
        if rec.manifest.get(&rel(p)).is_some() {
            continue;
        }
        let shared = layout::shared_link_target(&rel(p));
        assert!(
            n.kind == Kind::Symlink && n.target.as_deref() == Some(shared.as_str()),
            "release {release}: unexpected entry {p} ({n:?})"
        );
    }
}

/// An error and all its sources, the way the binary prints them (`{:#}`).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `root/releases/<release>/<path>`.
pub fn in_release(root: &Path, release: &str, path: &str) -> PathBuf {
    root.join(layout::RELEASES).join(release).join(path)
}

/// Lines of the journal as JSON values.
pub fn journal(root: &Path) -> Vec<serde_json::Value> {
    let text = fs::read_to_string(root.join(".relsync/journal.jsonl")).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("journal line {l:?}: {e}")))
        .collect()
}

/// (event, release, result) of every journal line.
pub fn journal_events(root: &Path) -> Vec<(String, String, String)> {
    journal(root)
        .iter()
        .map(|v| {
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            (s("event"), s("release"), s("result"))
        })
        .collect()
}

/// Release directories in transient states (`*.staging`, `*.trash`).
pub fn leftovers(root: &Path) -> Vec<String> {
    fs::read_dir(root.join(layout::RELEASES))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".staging") || n.ends_with(".trash"))
        .collect()
}

/// Every file of a snapshot, keyed by (dev, ino).
pub fn inodes(s: &BTreeMap<String, Node>) -> BTreeSet<(u64, u64)> {
    s.values()
        .filter(|n| n.kind == Kind::File)
        .map(|n| (n.dev, n.ino))
        .collect()
}

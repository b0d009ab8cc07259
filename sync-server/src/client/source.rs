//! Reading the files a push sends, and only those.
//!
//! The daemon chooses which files it needs, so it chooses what the client reads: a hostile daemon
//! must not be able to make the client read anything outside the source tree, or anything in it
//! that is not part of the push (fault case 20). [`SourceTree::read`] therefore accepts a path
//! only if it is a file of the pushed manifest with the size and hash the session names, opens it
//! relative to the source directory handle without following symlinks (cap-std keeps every lookup
//! beneath the directory), refuses anything but a regular file of the scanned size, and checks
//! the content against the manifest hash before a byte of it is encoded. A file edited since the
//! scan is reported as such instead of producing a payload the daemon would reject.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cap_fs_ext::{FollowSymlinks, OpenOptionsFollowExt};
use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};
use sync_core::delta::{self, Basis, DeltaError, DeltaFormat, RawFrame};
use sync_core::manifest::{EntryKind, Hash, Manifest};
use sync_core::proto::client::{Method, SendFile};
use sync_core::wire::FileHeader;
use sync_core::RelPath;

use super::cache::{Cache, MAX_CACHED_FILE};
use super::memo::PayloadBytes;
pub use crate::file_bytes::Content;

/// Files above this size are hashed on several threads.
const PARALLEL_HASH: usize = 4 << 20;

/// Why a file of the source tree could not be read or encoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The session named a file the client did not offer: refused without touching the disk.
    #[error("refusing to read {path}: it is not a file of the pushed manifest with size {size} and hash {hash}; the daemon or the session misbehaved, nothing was read")]
    NotInManifest { path: String, size: u64, hash: Hash },
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is no longer a regular file; it changed since the scan, push again", path.display())]
    NotRegular { path: PathBuf },
    #[error("{} changed since it was scanned ({detail}); stop whatever writes to the source tree and push again", path.display())]
    Changed { path: PathBuf, detail: String },
    #[error("cannot encode {}", path.display())]
    Encode {
        path: PathBuf,
        #[source]
        source: DeltaError,
    },
}

/// A payload ready for a file stream.
#[derive(Debug)]
pub struct EncodedFile {
    pub header: FileHeader,
    pub payload: PayloadBytes,
    /// The file's plain (`Full`) payload, when it was made and lost to a smaller delta
    /// ([`delta::encode_sparing_full`]): what the cache keeps of the file.
    pub spare_full: Option<Vec<u8>>,
}

/// Where a relay finds the content it forwards while it is still arriving: the release it is
/// building, its object store, its kept releases. Content that is not there yet is waited for.
pub trait Locate: Send + Sync + fmt::Debug {
    /// A file holding the content of manifest file `path` (`hash`, `mode`), if there is one yet.
    /// What it holds is checked against the manifest like any source file.
    fn open(&self, path: &RelPath, hash: &Hash, mode: u32) -> Option<std::fs::File>;
    /// Whether the content will never come (the relay's own push failed): stop waiting.
    fn given_up(&self) -> bool;
    /// Content `hash` of `size` bytes, to encode a zstd-reference delta against (a basis the
    /// receiving daemon holds, from a kept release here). Checked against `hash`; `None` when
    /// it is not here or no longer matches.
    fn basis(&self, hash: &Hash, size: u64) -> Option<Vec<u8>> {
        let _ = (hash, size);
        None
    }
}

/// Where a [`SourceTree`] reads from.
#[derive(Debug)]
enum Origin {
    Dir(Dir),
    Located(Arc<dyn Locate>),
}

/// The source tree of a push and the manifest scanned from it.
#[derive(Debug)]
pub struct SourceTree {
    origin: Origin,
    root: PathBuf,
    manifest: Arc<Manifest>,
}

impl SourceTree {
    /// Opens `root`, whose scan produced `manifest`.
    pub fn open(root: &Path, manifest: Arc<Manifest>) -> Result<SourceTree, SourceError> {
        let dir = Dir::open_ambient_dir(root, cap_std::ambient_authority()).map_err(|source| {
            SourceError::Io {
                what: "open source directory",
                path: root.to_owned(),
                source,
            }
        })?;
        Ok(SourceTree {
            origin: Origin::Dir(dir),
            root: root.to_owned(),
            manifest,
        })
    }

    /// A source whose files `locate` finds (by content), named `root` in messages.
    pub fn located(root: &Path, manifest: Arc<Manifest>, locate: Arc<dyn Locate>) -> SourceTree {
        SourceTree {
            origin: Origin::Located(locate),
            root: root.to_owned(),
            manifest,
        }
    }

    /// Whether the content of `f` can be read now (always, for a directory). `Err` when it
    /// never will be.
    pub fn ready(&self, f: &SendFile) -> Result<bool, SourceError> {
        let Origin::Located(locate) = &self.origin else {
            return Ok(true);
        };
        self.check(&f.path, f.size, &f.hash)?;
        if locate
            .open(&f.path, &f.hash, self.mode_of(&f.path))
            .is_some()
        {
            return Ok(true);
        }
        if locate.given_up() {
            return Err(SourceError::Io {
                what: "wait for",
                path: self.root.join(f.path.as_str()),
                source: io::Error::other("the relay's own push failed, so the content never came"),
            });
        }
        Ok(false)
    }

    fn mode_of(&self, path: &RelPath) -> u32 {
        match self.manifest.get(path).map(|e| &e.kind) {
            Some(EntryKind::File { mode, .. }) => *mode,
            _ => 0,
        }
    }

    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Refuses any request that is not exactly a file of the manifest.
    pub fn check(&self, path: &RelPath, size: u64, hash: &Hash) -> Result<(), SourceError> {
        match self.manifest.get(path).map(|e| &e.kind) {
            Some(EntryKind::File {
                size: s, hash: h, ..
            }) if *s == size && h == hash => Ok(()),
            _ => Err(SourceError::NotInManifest {
                path: path.to_string(),
                size,
                hash: *hash,
            }),
        }
    }

    /// The content of manifest file `path`, checked against its size and hash.
    pub fn read(&self, path: &RelPath, size: u64, hash: &Hash) -> Result<Content, SourceError> {
        self.check(path, size, hash)?;
        let full = || self.root.join(path.as_str());
        let io = |what| {
            move |source| SourceError::Io {
                what,
                path: full(),
                source,
            }
        };
        let file = match &self.origin {
            Origin::Dir(dir) => {
                let mut opts = OpenOptions::new();
                opts.read(true);
                opts.follow(FollowSymlinks::No);
                // A FIFO swapped in after the scan would block the open; refuse it later instead.
                opts.custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32);
                dir.open_with(path.as_str(), &opts)
                    .map_err(io("open"))?
                    .into_std()
            }
            Origin::Located(locate) => locate
                .open(path, hash, self.mode_of(path))
                .ok_or_else(|| io("find")(io::Error::from(io::ErrorKind::NotFound)))?,
        };
        let meta = file.metadata().map_err(io("stat"))?;
        if !meta.file_type().is_file() {
            return Err(SourceError::NotRegular { path: full() });
        }
        if meta.len() != size {
            return Err(SourceError::Changed {
                path: full(),
                detail: format!("{} bytes, scanned as {size}", meta.len()),
            });
        }
        // SAFETY: a large file is mapped read-only and private to this process. Another
        // process truncating the file while it is mapped would fault the reader, the same
        // exposure the scan's windowed hashing accepts; every byte is checked against the
        // manifest hash below, so a concurrent edit cannot go out unnoticed. (A file sent from
        // its mapping, `PayloadBytes::Raw`, is read again as it goes out: an edit after this
        // check reaches relsyncd, whose hash check of every file it receives refuses it.)
        let content = unsafe { Content::load(&file, size) }.map_err(io("read"))?;
        if content.len() as u64 != size {
            return Err(SourceError::Changed {
                path: full(),
                detail: format!("read {} bytes, scanned as {size}", content.len()),
            });
        }
        let actual = if content.len() >= PARALLEL_HASH {
            Hash::from(blake3::Hasher::new().update_rayon(&content).finalize())
        } else {
            Hash::of(&content)
        };
        if actual != *hash {
            return Err(SourceError::Changed {
                path: full(),
                detail: "content differs".into(),
            });
        }
        Ok(content)
    }

    /// Reads and encodes the file of `f` the way its method says: [`SourceTree::load`], then
    /// [`SourceTree::encode_loaded`] through an encoder of its own.
    pub fn encode(&self, f: &SendFile, cache: Option<&Cache>) -> Result<EncodedFile, SourceError> {
        let loaded = self.load(f, cache)?;
        let mut encoder = delta::Encoder::new();
        self.encode_loaded(f, &loaded, &mut encoder)
    }

    /// Reads the file of `f` and the basis its method encodes it against. A zstd-reference
    /// basis comes from the cache, or for a located source without one from [`Locate::basis`];
    /// a basis missing from (or damaged in) either lowers the file to a full send.
    pub fn load(&self, f: &SendFile, cache: Option<&Cache>) -> Result<Loaded, SourceError> {
        let content = self.read(&f.path, f.size, &f.hash)?;
        let basis = match (&f.method, cache, &self.origin) {
            (Method::ZstdRef { basis }, Some(cache), _) => {
                cache.load(&basis.hash, basis.size).unwrap_or_else(|e| {
                    tracing::debug!("cache: {e}; sending {} in full", f.path);
                    None
                })
            }
            (Method::ZstdRef { basis }, None, Origin::Located(locate)) => {
                locate.basis(&basis.hash, basis.size)
            }
            _ => None,
        };
        Ok(Loaded {
            content: Arc::new(content),
            basis,
        })
    }

    /// Encodes `loaded`, the file of `f`, through `encoder`: one encoder serves file after file
    /// (see [`delta::Encoder`]) as long as what they were loaded into outlives it.
    pub fn encode_loaded<'b>(
        &self,
        f: &'b SendFile,
        loaded: &'b Loaded,
        encoder: &mut delta::Encoder<'b>,
    ) -> Result<EncodedFile, SourceError> {
        let content = &loaded.content;
        if let (Method::Full, Some(frame)) = (&f.method, raw_shared(content)) {
            let header = f
                .header(DeltaFormat::Full, frame.payload_len())
                .expect("a Full payload fits a file sent in full");
            return Ok(EncodedFile {
                header,
                payload: PayloadBytes::Raw {
                    content: Arc::clone(content),
                    frame,
                },
                spare_full: None,
            });
        }
        let basis = match (&f.method, &loaded.basis) {
            (Method::ZstdRef { .. }, Some(bytes)) => Basis::Bytes(bytes),
            (Method::Rsync { signature, .. }, _) => Basis::Signature(signature),
            _ => Basis::None,
        };
        // Most payloads are far smaller than their file; start small and let the vector grow.
        // A large file without a basis may go out almost as large (stored raw when it does not
        // compress): room for all of it up front spares growing it by copying, and the pages it
        // does not fill are never touched.
        let reserve = match basis {
            Basis::None if content.len() >= 1 << 20 => content.len() + content.len() / 64 + 1024,
            _ => (content.len() / 4).min(1 << 20),
        };
        let mut payload = payload_buffer(reserve);
        let (enc, spare_full) = encoder
            .encode_sparing_full(basis, content, &mut payload)
            .map_err(|source| SourceError::Encode {
                path: self.root.join(f.path.as_str()),
                source,
            })?;
        let header = f
            .header(enc.format, enc.payload_len)
            .expect("delta::encode lowers only to Full, or to Rsync for a basis it was given");
        Ok(EncodedFile {
            header,
            payload: payload.into(),
            spare_full,
        })
    }
}

/// Files over this size that do not compress are sent from where they lie, as zstd Raw blocks
/// ([`RawFrame`]), rather than copied into a payload first. Up to it, the payload is made in one
/// buffer, as the cache keeps it ([`MAX_CACHED_FILE`]).
const RAW_SHARED_FROM: u64 = MAX_CACHED_FILE;

/// The raw layout of `content`'s `Full` payload, when it is sent from where it lies.
fn raw_shared(content: &Content) -> Option<RawFrame> {
    match content {
        Content::Mapped(map) if map.len() as u64 > RAW_SHARED_FROM => RawFrame::of(map),
        _ => None,
    }
}

/// A file read for sending, with the basis bytes its delta is encoded against, if any.
#[derive(Debug)]
pub struct Loaded {
    content: Arc<Content>,
    basis: Option<Vec<u8>>,
}

impl Loaded {
    /// Memory the file and its basis take.
    pub fn bytes(&self) -> usize {
        self.content.len() + self.basis.as_ref().map_or(0, Vec::len)
    }
}

/// Buffers at least this large are backed by huge pages where the kernel allows it.
const HUGE_PAGES_FROM: usize = 8 << 20;

/// An empty buffer with room for `capacity` bytes. A large one asks the kernel for transparent
/// huge pages (only a hint): filling a 128 MiB payload through 4 KiB pages costs 32,768 page
/// faults, a fifth of the client's CPU on an initial push of large files.
fn payload_buffer(capacity: usize) -> Vec<u8> {
    const PAGE: usize = 4096;
    let v = Vec::with_capacity(capacity);
    if capacity >= HUGE_PAGES_FROM {
        let start = (v.as_ptr() as usize).next_multiple_of(PAGE);
        let end = (v.as_ptr() as usize + capacity) / PAGE * PAGE;
        if end > start {
            // SAFETY: the range lies inside this vector's allocation, which nothing else uses;
            // MADV_HUGEPAGE changes only how the kernel backs the pages, never their contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    use sync_core::delta::DeltaFormat;
    use sync_core::manifest::{Entry, Policy};
    use sync_core::wire::BasisRef;

    fn tree() -> (tempfile::TempDir, SourceTree) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("app")).unwrap();
        std::fs::write(src.join("app/a.php"), b"<?php echo 1;").unwrap();
        std::fs::write(src.join("big.bin"), vec![7u8; 300_000]).unwrap();
        std::fs::write(src.join("unlisted.txt"), b"not pushed").unwrap();
        std::fs::write(tmp.path().join("secret"), b"outside").unwrap();
        symlink("../secret", src.join("link")).unwrap();
        let m = Manifest::from_unsorted(
            vec![
                Entry::dir("app", 0o755).unwrap(),
                Entry::file("app/a.php", 13, 0o644, Hash::of(b"<?php echo 1;")).unwrap(),
                Entry::file("big.bin", 300_000, 0o644, Hash::of(&vec![7u8; 300_000])).unwrap(),
                Entry::symlink("link", "app/a.php").unwrap(),
            ],
            &Policy::default(),
        )
        .unwrap();
        let t = SourceTree::open(&src, Arc::new(m)).unwrap();
        (tmp, t)
    }

    fn send(path: &str, size: u64, hash: Hash) -> SendFile {
        SendFile {
            file: 0,
            path: RelPath::new(path).unwrap(),
            size,
            hash,
            method: Method::Full,
        }
    }

    #[test]
    fn a_large_file_that_does_not_compress_is_sent_from_where_it_lies() {
        let tmp = tempfile::tempdir().unwrap();
        let len = RAW_SHARED_FROM as usize + 12_345;
        let noise = crate::client::tests::noise(5, len);
        let text = vec![b'a'; len];
        std::fs::write(tmp.path().join("noise.bin"), &noise).unwrap();
        std::fs::write(tmp.path().join("text.txt"), &text).unwrap();
        let m = Manifest::from_unsorted(
            vec![
                Entry::file("noise.bin", len as u64, 0o644, Hash::of(&noise)).unwrap(),
                Entry::file("text.txt", len as u64, 0o644, Hash::of(&text)).unwrap(),
            ],
            &Policy::default(),
        )
        .unwrap();
        let t = SourceTree::open(tmp.path(), Arc::new(m)).unwrap();
        for (path, content, raw) in [("noise.bin", &noise, true), ("text.txt", &text, false)] {
            let enc = t
                .encode(&send(path, len as u64, Hash::of(content)), None)
                .unwrap();
            assert_eq!(enc.header.format, DeltaFormat::Full, "{path}");
            assert_eq!(enc.header.payload_len, enc.payload.len() as u64, "{path}");
            assert_eq!(
                matches!(enc.payload, PayloadBytes::Raw { .. }),
                raw,
                "{path}"
            );
            // The same bytes as a payload made in one buffer, and they decode to the file.
            let mut flat = Vec::new();
            delta::encode_full(content, &mut flat).unwrap();
            assert!(enc.payload.to_vec() == flat, "{path}");
            let mut out = Vec::new();
            let expected = blake3::Hash::from_bytes(Hash::of(content).0);
            delta::apply(
                DeltaFormat::Full,
                None,
                &flat,
                len as u64,
                &expected,
                &mut out,
            )
            .unwrap();
            assert!(&out == content, "{path}");
        }
    }

    #[test]
    fn files_outside_the_manifest_are_refused_before_any_read() {
        let (_tmp, t) = tree();
        let secret = Hash::of(b"outside");
        let unlisted = Hash::of(b"not pushed");
        let a = Hash::of(b"<?php echo 1;");
        // Names a hostile peer might try: files that exist but were not offered, an entry that
        // is not a file, and listed files with another size or hash.
        let table = [
            ("unlisted.txt", 10, unlisted),
            ("link", 7, secret),
            ("app", 0, Hash::of(b"")),
            ("app/a.php", 14, a),
            ("app/a.php", 13, secret),
            ("missing.php", 1, a),
        ];
        for (path, size, hash) in table {
            let e = t.encode(&send(path, size, hash), None).unwrap_err();
            assert!(
                matches!(e, SourceError::NotInManifest { .. }),
                "{path}: {e}"
            );
            assert!(e.to_string().contains(path), "{e}");
        }
        let ok = t.encode(&send("app/a.php", 13, a), None).unwrap();
        assert_eq!(ok.header.format, DeltaFormat::Full);
        assert_eq!(ok.header.payload_len, ok.payload.len() as u64);
    }

    /// Content that appears at `at` once a test puts it there.
    #[derive(Debug)]
    struct Arriving {
        at: PathBuf,
        given_up: std::sync::atomic::AtomicBool,
    }

    impl Locate for Arriving {
        fn open(&self, _: &RelPath, _: &Hash, _: u32) -> Option<std::fs::File> {
            std::fs::File::open(&self.at).ok()
        }

        fn given_up(&self) -> bool {
            self.given_up.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    /// A relay's content: `app/a.php` as pushed, and one older version it keeps as a basis.
    #[derive(Debug)]
    struct Keeping {
        at: PathBuf,
        basis: Vec<u8>,
    }

    impl Locate for Keeping {
        fn open(&self, _: &RelPath, _: &Hash, _: u32) -> Option<std::fs::File> {
            std::fs::File::open(&self.at).ok()
        }

        fn given_up(&self) -> bool {
            false
        }

        fn basis(&self, hash: &Hash, size: u64) -> Option<Vec<u8>> {
            (Hash::of(&self.basis) == *hash && self.basis.len() as u64 == size)
                .then(|| self.basis.clone())
        }
    }

    #[test]
    fn a_located_source_makes_zstd_ref_deltas_from_the_bases_it_keeps() {
        let (tmp, t) = tree();
        let at = tmp.path().join("src/app/a.php");
        let keeping = Keeping {
            at,
            basis: b"<?php echo 0;".to_vec(),
        };
        let basis_hash = Hash::of(&keeping.basis);
        let located = SourceTree::located(
            Path::new("relay"),
            Arc::clone(t.manifest()),
            Arc::new(keeping) as Arc<dyn Locate>,
        );
        let a = Hash::of(b"<?php echo 1;");
        let with = |hash: Hash| SendFile {
            method: Method::ZstdRef {
                basis: BasisRef { hash, size: 13 },
            },
            ..send("app/a.php", 13, a)
        };
        let kept = located.encode(&with(basis_hash), None).unwrap();
        assert_eq!(kept.header.format, DeltaFormat::ZstdRef);
        // A basis the relay does not hold lowers the file to a full send.
        let missing = located.encode(&with(Hash::of(b"other")), None).unwrap();
        assert_eq!(missing.header.format, DeltaFormat::Full);
    }

    #[test]
    fn a_located_source_waits_for_content_and_checks_it_against_the_manifest() {
        let (tmp, t) = tree();
        let arriving = Arc::new(Arriving {
            at: tmp.path().join("object"),
            given_up: false.into(),
        });
        let located = SourceTree::located(
            Path::new("relay"),
            Arc::clone(t.manifest()),
            Arc::clone(&arriving) as Arc<dyn Locate>,
        );
        let a = Hash::of(b"<?php echo 1;");
        let f = send("app/a.php", 13, a);
        assert!(!located.ready(&f).unwrap(), "nothing has arrived yet");
        assert!(matches!(
            located.ready(&send("unlisted.txt", 10, Hash::of(b"not pushed"))),
            Err(SourceError::NotInManifest { .. })
        ));
        // Content that does not match the manifest is never encoded.
        std::fs::write(&arriving.at, b"<?php echo 2;").unwrap();
        assert!(located.ready(&f).unwrap());
        assert!(matches!(
            located.encode(&f, None),
            Err(SourceError::Changed { .. })
        ));
        std::fs::write(&arriving.at, b"<?php echo 1;").unwrap();
        let ok = located.encode(&f, None).unwrap();
        assert_eq!(ok.header.payload_len, ok.payload.len() as u64);
        std::fs::remove_file(&arriving.at).unwrap();
        arriving
            .given_up
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(matches!(located.ready(&f), Err(SourceError::Io { .. })));
    }

    #[test]
    fn a_file_swapped_for_a_symlink_after_the_scan_is_not_followed() {
        let (tmp, t) = tree();
        let a = Hash::of(b"<?php echo 1;");
        let path = t.root().join("app/a.php");
        std::fs::remove_file(&path).unwrap();
        symlink(tmp.path().join("secret"), &path).unwrap();
        let e = t
            .read(&RelPath::new("app/a.php").unwrap(), 13, &a)
            .unwrap_err();
        assert!(matches!(e, SourceError::Io { what: "open", .. }), "{e}");
    }

    #[test]
    fn edits_since_the_scan_are_reported_not_sent() {
        let (_tmp, t) = tree();
        let big = RelPath::new("big.bin").unwrap();
        let hash = Hash::of(&vec![7u8; 300_000]);
        assert_eq!(t.read(&big, 300_000, &hash).unwrap().len(), 300_000);
        let mut changed = vec![7u8; 300_000];
        changed[5] = 8;
        std::fs::write(t.root().join("big.bin"), &changed).unwrap();
        let e = t.read(&big, 300_000, &hash).unwrap_err();
        assert!(matches!(e, SourceError::Changed { .. }), "{e}");
        std::fs::write(t.root().join("big.bin"), b"short").unwrap();
        let e = t.read(&big, 300_000, &hash).unwrap_err();
        assert!(e.to_string().contains("5 bytes"), "{e}");
        std::fs::remove_file(t.root().join("big.bin")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            t.root().join("big.bin"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let e = t.read(&big, 300_000, &hash).unwrap_err();
        assert!(matches!(e, SourceError::NotRegular { .. }), "{e}");
    }

    #[test]
    fn a_zstd_ref_without_its_cached_basis_goes_in_full() {
        let (_tmp, t) = tree();
        let mut f = send("big.bin", 300_000, Hash::of(&vec![7u8; 300_000]));
        f.method = Method::ZstdRef {
            basis: BasisRef {
                hash: Hash::of(b"gone"),
                size: 4,
            },
        };
        let enc = t.encode(&f, None).unwrap();
        assert_eq!(enc.header.format, DeltaFormat::Full);
        assert_eq!(enc.header.basis, None);
    }
}

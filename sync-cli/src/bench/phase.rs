//! The edge half of `relsync bench`: runs each phase of a release on real files and times it.
//!
//! Phases call the library's own pieces: the scanner, `deploy::prepare` for the plan, the
//! `Stager` for the plan's operations (grouped the way `Stager::apply` groups them, so the times
//! are those of a deploy, split where its debug log splits them), `activate::run` for the swap,
//! and `deploy::deploy` end to end. Only the delta and compression phases work on bytes in memory,
//! through `sync_core::delta`, on the files that differ between the two releases.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use rayon::prelude::*;
use sync_core::delta::{self, BasisSignature, DeltaFormat};
use sync_core::edge::activate::{self, ActivationOptions};
use sync_core::edge::deploy::{self, DeployOptions};
use sync_core::edge::exec::{hash_file, ExecOptions, LocalSource, Stager};
use sync_core::edge::root::AppRoot;
use sync_core::edge::scan::{scan, Scan, ScanOptions, ScanStats};
use sync_core::manifest::{EntryKind, Manifest};
use sync_core::plan::Op;
use sync_core::ReleaseId;

use super::report::{Phase, Sample};

/// Release ids on the benchmark's node: A is what the node holds, B what each run builds.
pub const RELEASE_A: &str = "bench-a";
pub const RELEASE_B: &str = "bench-b";

/// CPU seconds (user + system) of this process and its reaped children so far.
fn cpu_secs() -> f64 {
    let secs = |who| {
        // SAFETY: getrusage only writes the struct it is given, which lives on this stack.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(who, &mut u) } != 0 {
            return 0.0;
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(u.ru_utime) + tv(u.ru_stime)
    };
    secs(libc::RUSAGE_SELF) + secs(libc::RUSAGE_CHILDREN)
}

/// Peak resident set size of this process so far, in KiB.
fn maxrss_kib() -> u64 {
    // SAFETY: as in `cpu_secs`.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0;
    }
    u.ru_maxrss.max(0) as u64
}

/// Runs `f` and measures it.
pub fn measure<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Sample)> {
    let cpu = cpu_secs();
    let t = Instant::now();
    let value = f()?;
    let secs = t.elapsed().as_secs_f64();
    Ok((
        value,
        Sample {
            secs,
            cpu_secs: (cpu_secs() - cpu).max(0.0),
            maxrss_kib: maxrss_kib(),
        },
    ))
}

/// The phases of one run, in the order they ran.
#[derive(Default)]
pub struct RunLog {
    pub entries: Vec<(Phase, Sample)>,
}

impl RunLog {
    pub fn push(
        &mut self,
        name: &str,
        state: &'static str,
        files: u64,
        bytes: u64,
        sample: Sample,
    ) {
        self.push_out(name, state, files, bytes, None, sample);
    }

    pub fn push_out(
        &mut self,
        name: &str,
        state: &'static str,
        files: u64,
        bytes: u64,
        out_bytes: Option<u64>,
        sample: Sample,
    ) {
        self.entries.push((
            Phase {
                name: name.into(),
                state,
                files,
                bytes,
                out_bytes,
                wall_only: false,
            },
            sample,
        ));
    }

    /// The cold scan that starts a push: the client's first step, timed by the caller.
    pub fn push_client_scan(&mut self, stats: &ScanStats, secs: f64) {
        self.push_wall(
            "client: scan + hash",
            "no hash cache",
            stats.files,
            stats.bytes,
            secs,
        );
    }

    /// A phase of which only the wall time is known.
    pub fn push_wall(
        &mut self,
        name: &str,
        state: &'static str,
        files: u64,
        bytes: u64,
        secs: f64,
    ) {
        self.entries.push((
            Phase {
                name: name.into(),
                state,
                files,
                bytes,
                out_bytes: None,
                wall_only: true,
            },
            Sample {
                secs,
                cpu_secs: 0.0,
                maxrss_kib: 0,
            },
        ));
    }

    /// Adds `sample` to the phase called `name`, creating it if this is its first piece.
    fn add(&mut self, name: &str, state: &'static str, files: u64, bytes: u64, sample: Sample) {
        match self.entries.iter_mut().find(|(p, _)| p.name == name) {
            Some((p, s)) => {
                p.files += files;
                p.bytes += bytes;
                s.secs += sample.secs;
                s.cpu_secs += sample.cpu_secs;
                s.maxrss_kib = s.maxrss_kib.max(sample.maxrss_kib);
            }
            None => self.push(name, state, files, bytes, sample),
        }
    }
}

fn scan_options(cache_file: Option<PathBuf>) -> ScanOptions {
    ScanOptions {
        cache_file,
        ..ScanOptions::default()
    }
}

fn scan_tree(dir: &Path, cache_file: Option<PathBuf>) -> Result<Scan> {
    scan(dir, &scan_options(cache_file), &|_| {})
        .with_context(|| format!("scanning {}", dir.display()))
}

/// Scans `dir` with no hash cache: every file is read and hashed.
pub fn scan_cold(dir: &Path) -> Result<Scan> {
    scan_tree(dir, None)
}

/// Scans `dir` until the hash cache `cache_file` holds all of it. The scanner does not cache
/// files changed (mtime or ctime) in the last two seconds (a write in the same timestamp tick could go
/// unnoticed), and a just-generated corpus is all such files: those are waited out once.
pub fn fill_cache(dir: &Path, cache_file: &Path) -> Result<Scan> {
    let first = scan_tree(dir, Some(cache_file.to_owned()))?;
    if scan_tree(dir, Some(cache_file.to_owned()))?
        .stats
        .hashed_files
        > 0
    {
        std::thread::sleep(std::time::Duration::from_millis(2_100));
        scan_tree(dir, Some(cache_file.to_owned()))?;
    }
    Ok(first)
}

/// Scan with a warm hash cache (walk and stat, no content read), then with none (walk, stat, read
/// and blake3 every file, as a deploy of a fresh checkout does), then blake3 alone.
pub fn scan_and_hash(log: &mut RunLog, b: &Path, warm_cache: &Path) -> Result<Scan> {
    let (warm, sample) = measure(|| scan_tree(b, Some(warm_cache.to_owned())))?;
    // Only a tree modified during the run leaves the cache partly cold.
    let state = if warm.stats.hashed_files == 0 {
        "hash cache warm"
    } else {
        "hash cache partly cold"
    };
    log.push("scan (walk + stat)", state, warm.stats.files, 0, sample);
    let (cold, sample) = measure(|| scan_tree(b, None))?;
    log.push(
        "scan + hash",
        "no hash cache",
        cold.stats.hashed_files,
        cold.stats.hashed_bytes,
        sample,
    );
    let files: Vec<(&sync_core::RelPath, u64, &sync_core::manifest::Hash)> = cold
        .manifest
        .files()
        .map(|(p, size, _, h)| (p, size, h))
        .collect();
    let bytes: u64 = files.iter().map(|(_, s, _)| s).sum();
    let ((), sample) = measure(|| {
        files.par_iter().try_for_each(|(path, _, want)| {
            let full = b.join(path.as_str());
            let f = std::fs::File::open(&full)
                .with_context(|| format!("opening {}", full.display()))?;
            let got = hash_file(f).with_context(|| format!("reading {}", full.display()))?;
            anyhow::ensure!(
                got == **want,
                "{} changed while it was benchmarked; leave the corpus alone during the run",
                full.display()
            );
            Ok(())
        })
    })?;
    log.push(
        "hash (blake3)",
        "page cache warm",
        files.len() as u64,
        bytes,
        sample,
    );
    Ok(cold)
}

/// A file that differs between the releases: its bytes in both, and B's size and hash.
pub struct Changed {
    pub a: Vec<u8>,
    pub b: Vec<u8>,
    pub hash: blake3::Hash,
}

/// Reads every file that has the same path in `a` and `b` but other content.
pub fn changed_files(
    a_dir: &Path,
    a: &Manifest,
    b_dir: &Path,
    b: &Manifest,
) -> Result<Vec<Changed>> {
    let read = |dir: &Path, p: &sync_core::RelPath| {
        let full = dir.join(p.as_str());
        std::fs::read(&full).with_context(|| format!("reading {}", full.display()))
    };
    b.files()
        .filter_map(|(path, _, _, hash)| match a.get(path).map(|e| &e.kind) {
            Some(EntryKind::File { hash: old, .. }) if old != hash => Some((path, hash)),
            _ => None,
        })
        .map(|(path, hash)| {
            Ok(Changed {
                a: read(a_dir, path)?,
                b: read(b_dir, path)?,
                hash: blake3::Hash::from_bytes(hash.0),
            })
        })
        .collect()
}

/// Both delta engines (encode, and apply with blake3 verification) and plain zstd on the changed
/// files, one file after another as a sender encodes a stream.
pub fn deltas(log: &mut RunLog, changed: &[Changed]) -> Result<()> {
    if changed.is_empty() {
        return Ok(());
    }
    let n = changed.len() as u64;
    let a_bytes: u64 = changed.iter().map(|c| c.a.len() as u64).sum();
    let b_bytes: u64 = changed.iter().map(|c| c.b.len() as u64).sum();
    let total = |v: &[Vec<u8>]| v.iter().map(|p| p.len() as u64).sum::<u64>();
    let state = "in memory";

    let (payloads, sample) = measure(|| {
        changed
            .iter()
            .map(|c| {
                let mut out = Vec::new();
                delta::encode_with_basis(&c.a, &c.b, &mut out)?;
                Ok(out)
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let out = Some(total(&payloads));
    log.push_out("delta zstd-ref encode", state, n, b_bytes, out, sample);
    let ((), sample) = measure(|| apply_all(DeltaFormat::ZstdRef, changed, &payloads))?;
    log.push("delta zstd-ref apply", state, n, b_bytes, sample);

    let (signatures, sample) = measure(|| {
        Ok(changed
            .iter()
            .map(|c| BasisSignature::calculate(&c.a))
            .collect::<Vec<_>>())
    })?;
    let sig_bytes: u64 = signatures.iter().map(|s| s.as_bytes().len() as u64).sum();
    log.push_out(
        "delta rsync signature",
        state,
        n,
        a_bytes,
        Some(sig_bytes),
        sample,
    );
    let (payloads, sample) = measure(|| {
        changed
            .iter()
            .zip(&signatures)
            .map(|(c, sig)| {
                let mut out = Vec::new();
                delta::encode_with_signature(sig, &c.b, &mut out)?;
                Ok(out)
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let out = Some(total(&payloads));
    log.push_out("delta rsync encode", state, n, b_bytes, out, sample);
    let ((), sample) = measure(|| apply_all(DeltaFormat::Rsync, changed, &payloads))?;
    log.push("delta rsync apply", state, n, b_bytes, sample);

    let (payloads, sample) = measure(|| {
        changed
            .iter()
            .map(|c| {
                let mut out = Vec::new();
                delta::encode_full(&c.b, &mut out)?;
                Ok(out)
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let out = Some(total(&payloads));
    log.push_out("compress (zstd)", state, n, b_bytes, out, sample);
    Ok(())
}

fn apply_all(format: DeltaFormat, changed: &[Changed], payloads: &[Vec<u8>]) -> Result<()> {
    for (c, payload) in changed.iter().zip(payloads) {
        delta::apply(
            format,
            Some(&c.a),
            payload,
            c.b.len() as u64,
            &c.hash,
            &mut std::io::sink(),
        )
        .with_context(|| format!("applying a {format:?} payload"))?;
    }
    Ok(())
}

fn release(id: &str) -> ReleaseId {
    ReleaseId::new(id).expect("the benchmark's release ids are valid")
}

fn deploy_options(id: &str, now_unix: i64) -> DeployOptions {
    DeployOptions {
        release_id: Some(release(id)),
        activate: true,
        now_unix,
        exec: ExecOptions::default(),
        ..DeployOptions::default()
    }
}

/// Deploys release A from `a` into a new app root at `root` (not timed).
pub fn node_with_a(root: &Path, a: &Path, now_unix: i64) -> Result<()> {
    let app = AppRoot::open_or_create(root)
        .with_context(|| format!("creating app root {}", root.display()))?;
    let lock = app.lock(|_| {})?;
    let scanned = scan_tree(a, None)?;
    let source = LocalSource::open(a)?;
    deploy::deploy(
        &app,
        &lock,
        &scanned.manifest,
        &source,
        &deploy_options(RELEASE_A, now_unix),
        &|_| {},
    )
    .with_context(|| format!("deploying release A into {}", root.display()))?;
    Ok(())
}

/// Puts the node back to holding only A, current: what it was before the run's build of B.
pub fn reset(root: &Path) -> Result<()> {
    let app = AppRoot::open(root)?;
    let lock = app.lock(|_| {})?;
    app.recover(&lock)?;
    let b = release(RELEASE_B);
    if app.release_ids()?.contains(&b) {
        app.swap_current(&release(RELEASE_A))?;
        app.remove_release(&b)
            .with_context(|| format!("removing release {b} from {}", root.display()))?;
    }
    Ok(())
}

/// Plans and builds B on the node phase by phase, then activates it.
pub fn build_by_phase(
    log: &mut RunLog,
    root: &Path,
    b_dir: &Path,
    b: &Manifest,
    now_unix: i64,
) -> Result<()> {
    let app = AppRoot::open(root)?;
    let lock = app.lock(|_| {})?;
    app.recover(&lock)?;
    let opts = deploy_options(RELEASE_B, now_unix);
    let (prep, sample) = measure(|| Ok(deploy::prepare(&app, b, &opts)?))?;
    log.push(
        "plan",
        "records read from disk",
        b.file_count() as u64,
        0,
        sample,
    );
    let source = LocalSource::open(b_dir)?;
    let mut stager = Stager::begin(
        &app,
        &lock,
        &prep.plan.release,
        None,
        b,
        &prep.bases,
        prep.seq,
        now_unix,
        &source,
        ExecOptions::default(),
        &|_| {},
    )?;
    let written = prep.plan.summary.full_bytes + prep.plan.summary.delta_bytes;
    let files = b.file_count() as u64;
    let ops = &prep.plan.ops;
    let mut i = 0;
    while i < ops.len() {
        let phase = ops[i].phase();
        let end = ops[i..]
            .iter()
            .position(|o| o.phase() != phase)
            .map_or(ops.len(), |n| i + n);
        let run = &ops[i..end];
        let result = if matches!(run[0], Op::Activate) {
            measure(|| {
                activate::run(
                    &app,
                    &lock,
                    &prep.plan.release,
                    prep.previous.as_ref(),
                    &ActivationOptions {
                        auto_rollback: true,
                        now_unix,
                        config: None,
                    },
                )?;
                Ok(())
            })
        } else {
            measure(|| Ok(stager.apply(run)?))
        };
        let ((), sample) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = stager.abort();
                return Err(e.context(format!("{phase} of release {RELEASE_B}")));
            }
        };
        let (count, bytes) = match phase {
            "stage directories" => (run.len() as u64, 0),
            "stage files" => (run.len() as u64, written),
            "sync (syncfs)" => (0, written),
            "verify" => (files, 0),
            _ => (0, 0),
        };
        log.add(phase, "node holds A", count, bytes, sample);
        i = end;
    }
    Ok(())
}

/// `relsync deploy B` end to end on a node holding A: scan with no hash cache, plan, build,
/// verify, record, activate.
pub fn deploy_end_to_end(log: &mut RunLog, root: &Path, b_dir: &Path, now_unix: i64) -> Result<()> {
    let ((stats, report), sample) = measure(|| {
        let app = AppRoot::open(root)?;
        let lock = app.lock(|_| {})?;
        let scanned = scan_tree(b_dir, None)?;
        let source = LocalSource::open(b_dir)?;
        let report = deploy::deploy(
            &app,
            &lock,
            &scanned.manifest,
            &source,
            &deploy_options(RELEASE_B, now_unix),
            &|_| {},
        )
        .with_context(|| format!("deploying release B into {}", root.display()))?;
        Ok((scanned.stats, report))
    })?;
    // The deploy report's own account: what the executor wrote (the rest is hard links).
    log.push_out(
        "end to end: deploy",
        "no hash cache, node holds A",
        stats.files,
        stats.bytes,
        Some(report.exec.bytes_written),
        sample,
    );
    Ok(())
}

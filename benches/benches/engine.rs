//! The release engine's stages on a generated PHP-like corpus (3,000 files, ~22 MB, scaled down from
//! the anchor so a criterion run stays short): scan + hash (cold and cached), plan, and apply (a full
//! local build of release b from release a, including verification).
//!
//! Run: `cargo bench -p relsync-benches --bench engine`. Put the temp dir on tmpfs for numbers
//! comparable to BENCHMARKS.md: `TMPDIR=/dev/shm cargo bench ...`.

use std::path::Path;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sync_core::edge::deploy::{self, DeployOptions};
use sync_core::edge::exec::LocalSource;
use sync_core::edge::root::AppRoot;
use sync_core::edge::scan::{scan, ScanOptions};
use sync_core::plan::{plan_release, Basis, PlanOptions};
use sync_core::ReleaseId;

fn corpus() -> (tempfile::TempDir, relsync_testdata::Summary) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut o = relsync_testdata::Options::default();
    o.files = 3_000;
    o.bytes = 22_000_000;
    let summary = relsync_testdata::generate(dir.path(), &o).expect("generate corpus");
    (dir, summary)
}

fn no_progress(_: u64) {}

fn scan_tree(src: &Path, cache: Option<std::path::PathBuf>) -> sync_core::edge::scan::Scan {
    let opts = ScanOptions {
        cache_file: cache,
        ..ScanOptions::default()
    };
    scan(src, &opts, &no_progress).expect("scan")
}

fn bench_engine(c: &mut Criterion) {
    let (dir, summary) = corpus();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let mut g = c.benchmark_group("engine");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(summary.b.bytes));

    g.bench_function("scan+hash cold", |bench| bench.iter(|| scan_tree(&b, None)));
    let cache = dir.path().join("scan.cache");
    scan_tree(&b, Some(cache.clone()));
    g.bench_function("scan cached", |bench| {
        bench.iter(|| scan_tree(&b, Some(cache.clone())))
    });

    let ma = scan_tree(&a, None).manifest;
    let mb = scan_tree(&b, None).manifest;
    let (ra, rb) = (ReleaseId::new("a").unwrap(), ReleaseId::new("b").unwrap());
    g.bench_function("plan", |bench| {
        bench.iter(|| {
            plan_release(
                &rb,
                &mb,
                &[Basis {
                    id: &ra,
                    manifest: &ma,
                }],
                &[],
                &PlanOptions {
                    activate: true,
                    ..PlanOptions::default()
                },
            )
            .expect("plan")
        })
    });

    // Apply: a fresh root holding release a, then build, verify and activate b.
    let src_a = LocalSource::open(&a).expect("source a");
    let src_b = LocalSource::open(&b).expect("source b");
    g.bench_function("apply (build b from a)", |bench| {
        bench.iter_batched(
            || {
                let root_dir = tempfile::tempdir().expect("temp dir");
                let root = AppRoot::open_or_create(root_dir.path()).expect("root");
                let lock = root.lock(|_| {}).expect("lock");
                let o = DeployOptions {
                    release_id: Some(ra.clone()),
                    activate: true,
                    ..DeployOptions::default()
                };
                deploy::deploy(&root, &lock, &ma, &src_a, &o, &no_progress).expect("deploy a");
                drop(lock);
                (root_dir, root)
            },
            |(root_dir, root)| {
                let lock = root.lock(|_| {}).expect("lock");
                let o = DeployOptions {
                    release_id: Some(rb.clone()),
                    activate: true,
                    ..DeployOptions::default()
                };
                deploy::deploy(&root, &lock, &mb, &src_b, &o, &no_progress).expect("deploy b");
                root_dir
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, bench_engine);
criterion_main!(benches);

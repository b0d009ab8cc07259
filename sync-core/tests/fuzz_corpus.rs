//! Replays every fuzz corpus under `fuzz/corpus/<target>/` through the same function the
//! cargo-fuzz target runs, so the seeds and every crash ever saved there are checked by an
//! ordinary `cargo test` on stable.
//!
//! To add a target, add a row to [`TARGETS`]; the test fails if a file in `fuzz/fuzz_targets/`
//! has no row, or a row has no seeds.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use sync_core::delta::{self, fuzz, BasisSignature, DeltaFormat};
use sync_core::proto::fuzz as proto_fuzz;

/// The function a fuzz target runs on one input; it panics on a finding.
type Run = fn(&[u8]);

/// (target name = corpus directory = file stem in `fuzz/fuzz_targets/`, function it runs).
const TARGETS: &[(&str, Run)] = &[
    ("delta_apply", |data| {
        let _ = fuzz::apply_one(data);
    }),
    ("signature_decode", |data| {
        let _ = fuzz::signature_decode_one(data);
    }),
    ("frame_decode", |data| {
        let _ = proto_fuzz::frame_decode_one(data);
    }),
    ("daemon_session", |data| {
        let _ = proto_fuzz::daemon_session_one(data);
    }),
    ("client_session", |data| {
        let _ = proto_fuzz::client_session_one(data);
    }),
    ("client_sync_session", |data| {
        let _ = proto_fuzz::client_sync_one(data);
    }),
    ("manifest_decode", sync_core::manifest::fuzz::decode_one),
    ("ticket_decode", sync_core::relay::fuzz::ticket_decode_one),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Non-hidden regular files in `dir`, sorted for stable reports.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| {
            e.unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
                .path()
        })
        .filter(|p| p.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_replays_without_panic() {
    let mut failures = Vec::new();
    for (target, run) in TARGETS {
        let dir = fuzz_dir().join("corpus").join(target);
        let files = files_in(&dir);
        assert!(!files.is_empty(), "no seeds in {}", dir.display());
        for file in files {
            let data =
                fs::read(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
            if panic::catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
                failures.push(file.display().to_string());
            }
        }
    }
    assert!(failures.is_empty(), "inputs that panicked: {failures:#?}");
}

#[test]
fn every_fuzz_target_has_a_replay_row() {
    let known: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
    let targets = files_in(&fuzz_dir().join("fuzz_targets"));
    assert!(!targets.is_empty());
    for file in targets {
        let stem = file.file_stem().unwrap().to_string_lossy().into_owned();
        assert!(
            known.contains(&stem.as_str()),
            "fuzz target {stem} has no row in TARGETS"
        );
    }
}

/// Rewrites the delta seeds. Run with
/// `cargo test -p sync-core --test fuzz_corpus -- --ignored write_delta_seeds`.
#[test]
#[ignore = "rewrites fuzz/corpus; run by hand when the input layout changes"]
fn write_delta_seeds() {
    let basis = b"<?php\nnamespace App;\nfunction hello() { return 'hello'; }\n".repeat(100);
    let mut target = basis.clone();
    target.splice(100..100, b"// release B\n".iter().copied());
    let hash = blake3::hash(&target);
    let size = target.len() as u32;
    let sig = BasisSignature::calculate(&basis);
    let encoded = |f: &dyn Fn(&mut Vec<u8>) -> Result<delta::Encoded, delta::DeltaError>| {
        let mut out = Vec::new();
        f(&mut out).unwrap();
        out
    };
    let full = encoded(&|w| delta::encode_full(&target, w));
    let zref = encoded(&|w| delta::encode_with_basis(&basis, &target, w));
    let rsync = encoded(&|w| delta::encode_with_signature(&sig, &target, w));
    let zstd = |raw: &[u8]| encoded(&|w| delta::encode_full(raw, w));
    let rs_magic = 0x7273_0236u32.to_be_bytes();
    let copy_past_end = [&rs_magic[..], &[0x45, 250, 100, 0]].concat();
    let literal_too_long = [&rs_magic[..], &[0x43, 0, 0, 1, 0], &[b'x'; 256], &[0]].concat();
    let bomb = zstd(&vec![0u8; 1 << 20]);

    let (f, z, r) = (
        DeltaFormat::Full.code(),
        DeltaFormat::ZstdRef.code(),
        DeltaFormat::Rsync.code(),
    );
    let apply_seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "full_ok",
            fuzz::apply_input(f | fuzz::NO_BASIS, size, &hash, &[], &full),
        ),
        (
            "zstd_ref_ok",
            fuzz::apply_input(z, size, &hash, &basis, &zref),
        ),
        (
            "rsync_ok",
            fuzz::apply_input(r, size, &hash, &basis, &rsync),
        ),
        (
            "rsync_wrong_hash",
            fuzz::apply_input(r, size, &blake3::hash(b""), &basis, &rsync),
        ),
        (
            "rsync_copy_past_end",
            fuzz::apply_input(r, 100, &hash, &basis[..200], &zstd(&copy_past_end)),
        ),
        (
            "rsync_literal_too_long",
            fuzz::apply_input(r, 100, &hash, &basis[..200], &zstd(&literal_too_long)),
        ),
        ("zstd_bomb", fuzz::apply_input(f, 1024, &hash, &[], &bomb)),
        (
            "truncated",
            fuzz::apply_input(z, size, &hash, &basis, &zref[..zref.len() / 2]),
        ),
        ("empty", Vec::new()),
    ];

    let md4 = 0x7273_0136u32.to_be_bytes();
    let header =
        |block: u32, strong: u32| [&md4[..], &block.to_be_bytes(), &strong.to_be_bytes()].concat();
    let equal_weak_sums = [
        header(2048, 8),
        [1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0].repeat(64),
    ]
    .concat();
    let signature_seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "valid_related_target",
            fuzz::signature_input(basis.len() as u64, sig.as_bytes(), &target),
        ),
        (
            "valid_unrelated_target",
            fuzz::signature_input(basis.len() as u64, sig.as_bytes(), &[7; 5000]),
        ),
        (
            "zero_block_len",
            fuzz::signature_input(0, &header(0, 8), &target),
        ),
        (
            "strong_len_17",
            fuzz::signature_input(0, &header(2048, 17), &target),
        ),
        (
            "block_count_mismatch",
            fuzz::signature_input(1 << 20, sig.as_bytes(), &target),
        ),
        (
            "equal_weak_sums",
            fuzz::signature_input(64 * 2048, &equal_weak_sums, &target),
        ),
        ("empty", Vec::new()),
    ];

    for (dir, seeds) in [
        ("delta_apply", apply_seeds),
        ("signature_decode", signature_seeds),
    ] {
        let dir = fuzz_dir().join("corpus").join(dir);
        fs::create_dir_all(&dir).unwrap();
        for (name, data) in seeds {
            fs::write(dir.join(name), &data).unwrap();
        }
        assert!(!files_in(&dir).is_empty());
    }
}

/// Rewrites the protocol seeds (frame decode, daemon and client sessions, client syncs). Run with
/// `cargo test -p sync-core --test fuzz_corpus -- --ignored write_proto_seeds`.
#[test]
#[ignore = "rewrites fuzz/corpus; run by hand when the input layout changes"]
fn write_proto_seeds() {
    for (target, name, data) in proto_fuzz::seeds() {
        let dir = fuzz_dir().join("corpus").join(target);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), &data).unwrap();
    }
}

/// Rewrites the seeds of `manifest_decode`: `cargo test -p sync-core --test fuzz_corpus --
/// --ignored write_manifest_seeds`.
#[test]
#[ignore]
fn write_manifest_seeds() {
    use sync_core::manifest::{Entry, Hash, Manifest, Policy};
    use sync_core::release::{FileStamp, ReleaseRecord};
    let dir = fuzz_dir().join("corpus/manifest_decode");
    fs::create_dir_all(&dir).unwrap();
    let m = Manifest::from_unsorted(
        vec![
            Entry::dir("app", 0o755).unwrap(),
            Entry::file("app/index.php", 12, 0o644, Hash::of(b"<?php echo;\n")).unwrap(),
            Entry::symlink("link", "app/index.php").unwrap(),
        ],
        &Policy::default(),
    )
    .unwrap();
    let enc = m.encode();
    let rec = ReleaseRecord {
        id: sync_core::ReleaseId::new("r1").unwrap(),
        seq: 1,
        created_unix: 0,
        manifest: m.clone(),
        stamps: vec![FileStamp {
            ino: 1,
            size: 12,
            mtime_ns: 0,
        }],
    };
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("manifest", enc.to_vec()),
        ("manifest-truncated", enc[..enc.len() / 2].to_vec()),
        ("record", rec.encode()),
        ("path-ok", b"vendor/pkg/src/A.php".to_vec()),
        ("path-traversal", b"a/../../etc/passwd".to_vec()),
        ("empty", Vec::new()),
    ];
    for (name, data) in seeds {
        fs::write(dir.join(name), data).unwrap();
    }
}

/// The hand-written `ticket_decode` seeds reach past the decoder's first checks: one is a valid
/// ticket, one a valid relay plan.
#[test]
fn the_ticket_seeds_decode() {
    let dir = fuzz_dir().join("corpus/ticket_decode");
    let ticket = fs::read(dir.join("ticket")).unwrap();
    let t = sync_core::relay::Ticket::decode(&ticket).unwrap();
    assert_eq!(t.body.app.as_str(), "shop");
    assert!(matches!(
        sync_core::relay::Ticket::decode(&fs::read(dir.join("ticket-short-signature")).unwrap()),
        Err(sync_core::relay::RelayError::SignatureLength(10))
    ));
}

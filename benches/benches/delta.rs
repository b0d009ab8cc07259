//! Delta engine throughput on a 4 MiB PHP-like file: signature, encode and apply for each engine,
//! for a target with small edits and for an unrelated one (where the probe should skip the diff).
//!
//! Run with `cargo bench -p relsync-benches --bench delta`. Payload sizes are printed first.

use std::hint::black_box;
use std::io;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sync_core::delta::{
    apply, encode, encode_full, encode_with_basis, encode_with_signature, Basis, BasisSignature,
    DeltaFormat,
};

const LEN: usize = 4 << 20;

/// Deterministic PHP-looking text: identifiers, keywords and punctuation on short lines.
fn php(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "public",
        "function",
        "return",
        "$this->",
        "array(",
        "null",
        "static",
        "class",
        "new",
        "if (",
        "foreach (",
        "as $key => $value",
        "throw",
        "Exception",
        "namespace",
        "use",
        "App\\Http\\",
        "Controller",
        "Request",
        "Response",
        "$request",
        "->get(",
        "'id'",
        ");",
        "{",
        "}",
        "=>",
        "isset(",
        "count(",
        "strlen(",
        "private",
        "protected",
        "$container",
        "Illuminate\\Support\\",
        "Collection",
        "->map(fn ($item) =>",
        "// TODO",
        "sprintf(",
    ];
    let mut x = seed.wrapping_mul(2).wrapping_add(1);
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize].as_bytes());
        out.push(if x.is_multiple_of(9) { b'\n' } else { b' ' });
    }
    out.truncate(len);
    out
}

/// The basis with 30 small edits (insertions, deletions and overwrites of a few bytes).
fn small_edits(basis: &[u8]) -> Vec<u8> {
    let mut out = basis.to_vec();
    let step = out.len() / 31;
    for i in (1..=30).rev() {
        let at = i * step;
        match i % 3 {
            0 => drop(out.splice(at..at, b"$changed = true;\n".iter().copied())),
            1 => drop(out.drain(at..at + 40)),
            _ => out[at..at + 8].copy_from_slice(b"renamed_"),
        }
    }
    out
}

fn payload(f: impl FnOnce(&mut Vec<u8>) -> DeltaFormat) -> (DeltaFormat, Vec<u8>) {
    let mut out = Vec::new();
    let format = f(&mut out);
    (format, out)
}

fn bench_delta(c: &mut Criterion) {
    let basis = php(LEN, 1);
    let target = small_edits(&basis);
    let unrelated = php(LEN, 2);
    let sig = BasisSignature::calculate(&basis);
    let hash = blake3::hash(&target);
    let size = target.len() as u64;

    let (_, full) = payload(|w| encode_full(&target, w).unwrap().format);
    let (_, zref) = payload(|w| encode_with_basis(&basis, &target, w).unwrap().format);
    let (_, rsync) = payload(|w| encode_with_signature(&sig, &target, w).unwrap().format);
    let (auto_bytes, auto_bytes_payload) =
        payload(|w| encode(Basis::Bytes(&basis), &target, w).unwrap().format);
    let (auto_sig, auto_sig_payload) =
        payload(|w| encode(Basis::Signature(&sig), &target, w).unwrap().format);
    let (auto_unrelated, _) = payload(|w| {
        encode(Basis::Signature(&sig), &unrelated, w)
            .unwrap()
            .format
    });
    println!("delta payloads for a {size}-byte target with 30 small edits:");
    println!("  full (plain zstd)   {:>9} bytes", full.len());
    println!("  zstd-ref            {:>9} bytes", zref.len());
    println!("  rsync               {:>9} bytes", rsync.len());
    println!(
        "  signature           {:>9} bytes ({} blocks of {})",
        sig.as_bytes().len(),
        sig.block_count(),
        sig.block_len()
    );
    println!(
        "  auto, basis bytes   {:>9} bytes as {auto_bytes}",
        auto_bytes_payload.len()
    );
    println!(
        "  auto, signature     {:>9} bytes as {auto_sig}",
        auto_sig_payload.len()
    );
    println!("  auto, unrelated     chose {auto_unrelated}");

    let mut g = c.benchmark_group("delta/4MiB-small-edits");
    g.throughput(Throughput::Bytes(size));
    g.bench_function("full/encode", |b| {
        b.iter(|| encode_full(black_box(&target), &mut io::sink()).unwrap())
    });
    g.bench_function("full/apply", |b| {
        b.iter(|| {
            apply(
                DeltaFormat::Full,
                None,
                black_box(&full),
                size,
                &hash,
                &mut io::sink(),
            )
            .unwrap()
        })
    });
    g.bench_function("zstd-ref/encode", |b| {
        b.iter(|| encode_with_basis(&basis, black_box(&target), &mut io::sink()).unwrap())
    });
    g.bench_function("zstd-ref/apply", |b| {
        b.iter(|| {
            apply(
                DeltaFormat::ZstdRef,
                Some(&basis),
                black_box(&zref),
                size,
                &hash,
                &mut io::sink(),
            )
            .unwrap()
        })
    });
    g.bench_function("rsync/signature", |b| {
        b.iter(|| BasisSignature::calculate(black_box(&basis)))
    });
    g.bench_function("rsync/encode", |b| {
        b.iter(|| encode_with_signature(&sig, black_box(&target), &mut io::sink()).unwrap())
    });
    g.bench_function("rsync/apply", |b| {
        b.iter(|| {
            apply(
                DeltaFormat::Rsync,
                Some(&basis),
                black_box(&rsync),
                size,
                &hash,
                &mut io::sink(),
            )
            .unwrap()
        })
    });
    g.bench_function("auto/basis-bytes", |b| {
        b.iter(|| encode(Basis::Bytes(&basis), black_box(&target), &mut io::sink()).unwrap())
    });
    g.bench_function("auto/signature", |b| {
        b.iter(|| encode(Basis::Signature(&sig), black_box(&target), &mut io::sink()).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("delta/4MiB-unrelated");
    g.throughput(Throughput::Bytes(unrelated.len() as u64));
    g.bench_function("rsync/encode-forced", |b| {
        b.iter(|| encode_with_signature(&sig, black_box(&unrelated), &mut io::sink()).unwrap())
    });
    g.bench_function("zstd-ref/encode-forced", |b| {
        b.iter(|| encode_with_basis(&basis, black_box(&unrelated), &mut io::sink()).unwrap())
    });
    g.bench_function("full/encode", |b| {
        b.iter(|| encode_full(black_box(&unrelated), &mut io::sink()).unwrap())
    });
    g.bench_function("auto/signature", |b| {
        b.iter(|| {
            encode(
                Basis::Signature(&sig),
                black_box(&unrelated),
                &mut io::sink(),
            )
            .unwrap()
        })
    });
    g.bench_function("auto/basis-bytes", |b| {
        b.iter(|| encode(Basis::Bytes(&basis), black_box(&unrelated), &mut io::sink()).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench_delta);
criterion_main!(benches);

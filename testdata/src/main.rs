//! `relsync-testdata`: writes a seeded release pair (`OUT/a`, `OUT/b`, `OUT/summary.json`) for
//! benchmarks and manual testing, and prints what it made.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use relsync_testdata::{generate, parse_size, Options, Summary, SUMMARY_FILE};

/// Generate a PHP-application-like release pair: OUT/a, OUT/b (the next deploy) and
/// OUT/summary.json listing what changed.
#[derive(Debug, Parser)]
#[command(name = "relsync-testdata", version)]
struct Args {
    /// Seed of every random choice; the same seed gives byte-identical trees
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Regular files in release a
    #[arg(long, default_value_t = 15_000)]
    files: usize,
    /// Approximate size of release a (suffixes: K/M/G = KiB/MiB/GiB, KB/MB/GB = powers of ten)
    #[arg(long, default_value = "110MB", value_parser = parse_size)]
    bytes: u64,
    /// Generate the big-file pair instead: one file of SIZE bytes, and the same with 10 small edits
    /// (use 1G for the default scenario)
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    big_file: Option<u64>,
    /// Output directory; must not contain a/ or b/ yet
    out: PathBuf,
}

fn report(out: &mut impl Write, dir: &std::path::Path, s: &Summary, secs: f64) -> io::Result<()> {
    let mb = |b: u64| b as f64 / 1e6;
    writeln!(
        out,
        "wrote {} (seed {}) in {secs:.2} s",
        dir.display(),
        s.seed
    )?;
    for (name, t) in [("a", &s.a), ("b", &s.b)] {
        writeln!(
            out,
            "  {name}: {} files, {:.1} MB, {} dirs, {} symlinks",
            t.files,
            mb(t.bytes),
            t.dirs,
            t.symlinks
        )?;
    }
    writeln!(
        out,
        "  b vs a: {} edited, {} added, {} removed, {} renamed, {} mode changed",
        s.edited.len(),
        s.added.len(),
        s.removed.len(),
        s.renamed.len(),
        s.mode_changed.len()
    )?;
    writeln!(out, "  paths: {}", dir.join(SUMMARY_FILE).display())
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut options = match args.big_file {
        Some(size) => Options::big(args.seed, size),
        None => Options::default(),
    };
    options.seed = args.seed;
    options.files = args.files;
    options.bytes = args.bytes;
    let started = Instant::now();
    let summary = generate(&args.out, &options)
        .with_context(|| format!("cannot generate a release pair in {}", args.out.display()))?;
    let secs = started.elapsed().as_secs_f64();
    let mut stdout = io::stdout().lock();
    match report(&mut stdout, &args.out, &summary, secs) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write to stdout"),
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relsync-testdata: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse() {
        let args =
            Args::try_parse_from(["x", "--seed", "3", "--big-file", "1G", "/tmp/o"]).unwrap();
        assert_eq!((args.seed, args.big_file), (3, Some(1 << 30)));
        let args = Args::try_parse_from(["x", "/tmp/o"]).unwrap();
        assert_eq!(
            (args.files, args.bytes, args.big_file),
            (15_000, 110_000_000, None)
        );
        assert!(Args::try_parse_from(["x"]).is_err());
    }
}

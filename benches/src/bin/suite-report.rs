//! `suite-report DIR`: renders the comparison suite's results. Reads the per-scenario summaries
//! `DIR/raw/*.summary.json` and `DIR/raw/phases.json` and `.svg` (`relsync bench --json
//! --chart`) that `benches/suite.sh` collected, and writes `DIR/summary.md` (machine
//! description, the table of ratios and bytes on the wire), `DIR/fleet-time.svg` and
//! `DIR/phases.svg` (the bench's chart, copied).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Parser;
use relsync_benches::suite::{self, chart};

#[derive(Parser)]
#[command(about = "Render the comparison suite's summary.md and charts from its JSON results")]
struct Args {
    /// The results directory of one suite run (holding raw/*.summary.json).
    dir: PathBuf,
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let raw = args.dir.join("raw");
    let mut files: Vec<PathBuf> = fs::read_dir(&raw)
        .with_context(|| format!("listing {}: run benches/suite.sh first", raw.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("listing {}", raw.display()))?;
    files.retain(|p| p.to_string_lossy().ends_with(".summary.json"));
    files.sort();
    let mut scenarios = Vec::new();
    for f in &files {
        scenarios.push(suite::parse(&f.display().to_string(), &read(f)?)?);
    }
    if scenarios.is_empty() {
        return Err(suite::SuiteError::Empty.into());
    }
    suite::sort(&mut scenarios);

    let mut md = String::from("# Comparison suite: relsync against rsync\n\n");
    let machine = args.dir.join("machine.md");
    if machine.exists() {
        md.push_str(&read(&machine)?);
        md.push('\n');
    }
    md.push_str(
        "Times in seconds: median [min–max] over the runs; the ratio is the baseline's median over \
         relsync's (above 1: relsync is faster). Bytes on the wire are medians, headers included.\n\n",
    );
    md.push_str(&suite::table(&scenarios));

    let series = suite::fleet_series(&scenarios);
    if !series.is_empty() {
        let svg = chart::fleet_svg(
            "fleet push: time until the last node is done, by fleet size",
            &series,
        )?;
        write(&args.dir.join("fleet-time.svg"), &svg)?;
        md.push_str("\n![time vs number of nodes](fleet-time.svg)\n");
    }
    let phases_file = raw.join("phases.json");
    if phases_file.exists() {
        let p = suite::parse_phases(&phases_file.display().to_string(), &read(&phases_file)?)?;
        // Drawn by `relsync bench --chart` in the same run as the JSON.
        let svg = read(&raw.join("phases.svg"))?;
        write(&args.dir.join("phases.svg"), &svg)?;
        // The corpus is named by its temporary path, which says nothing once the run is over.
        md.push_str(&format!(
            "\n![time per phase](phases.svg)\n\nPhases: `relsync bench --corpus` on the suite's release pair ({}), \
             {} runs, warm page cache.\n",
            p.target, p.runs
        ));
    }
    write(&args.dir.join("summary.md"), &md)?;
    eprintln!(
        "suite-report: {} scenarios → {}",
        scenarios.len(),
        args.dir.join("summary.md").display()
    );
    Ok(())
}

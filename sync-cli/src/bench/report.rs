//! The pure half of `relsync bench`: per-phase samples reduced to median, min and max, throughput,
//! and the table and JSON forms of the result. No clock and no file system here, so every figure
//! can be checked against a hand-made table of samples.

use serde::Serialize;

/// One measurement of one phase in one run.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sample {
    /// Wall-clock seconds.
    pub secs: f64,
    /// CPU seconds (user + system) of this process and its reaped children during the phase.
    pub cpu_secs: f64,
    /// The process's peak resident set size so far, in KiB (`ru_maxrss`), read after the phase.
    pub maxrss_kib: u64,
}

/// What a phase measures, and on how much data.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Phase {
    /// Short name, unique in a report (`scan`, `delta zstd-ref encode`, …).
    pub name: String,
    /// Whether caches were warm or cold, in a few words.
    pub state: &'static str,
    /// Files (or entries, or operations) the phase handled per run; 0 when that means nothing.
    pub files: u64,
    /// Bytes of input the phase handled per run; 0 when throughput means nothing.
    pub bytes: u64,
    /// Bytes the phase produced per run (payloads of encoders), when that is worth reporting.
    pub out_bytes: Option<u64>,
    /// Only the wall time is known: a phase the daemon timed (reported in its `Staged`
    /// answer), or a step of a push timed from the session's state changes. The CPU and memory
    /// columns are left empty.
    pub wall_only: bool,
}

/// A phase with the statistics over its runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseStats {
    #[serde(flatten)]
    pub phase: Phase,
    pub runs: usize,
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    /// `bytes` over the median time, in MB/s (10^6); absent when `bytes` is 0.
    pub mb_per_s: Option<f64>,
    /// `files` over the median time; absent when `files` is 0.
    pub files_per_s: Option<f64>,
    /// Median CPU seconds over the runs (absent for a wall-time-only phase).
    pub cpu_s: Option<f64>,
    /// Highest peak RSS seen after this phase, in MiB (absent for a wall-time-only phase).
    pub peak_rss_mib: Option<f64>,
    /// Every run's wall time, in run order.
    pub samples_s: Vec<f64>,
}

/// Median of `v` (mean of the middle two for an even count); `None` when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// `amount` per second over `secs`; `None` when there is nothing to divide (no amount, or a
/// time too short to measure).
pub fn rate(amount: u64, secs: f64) -> Option<f64> {
    (amount > 0 && secs > 0.0).then(|| amount as f64 / secs)
}

/// Reduces the samples of one phase; `None` without samples.
pub fn summarize(phase: Phase, samples: &[Sample]) -> Option<PhaseStats> {
    let secs: Vec<f64> = samples.iter().map(|s| s.secs).collect();
    let cpu: Vec<f64> = samples.iter().map(|s| s.cpu_secs).collect();
    let median_s = median(&secs)?;
    let min_s = secs.iter().copied().fold(f64::INFINITY, f64::min);
    let max_s = secs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let peak = samples.iter().map(|s| s.maxrss_kib).max().unwrap_or(0);
    Some(PhaseStats {
        cpu_s: (!phase.wall_only).then(|| median(&cpu).unwrap_or(0.0)),
        peak_rss_mib: (!phase.wall_only).then_some(peak as f64 / 1024.0),
        mb_per_s: rate(phase.bytes, median_s).map(|r| r / 1e6),
        files_per_s: rate(phase.files, median_s),
        phase,
        runs: samples.len(),
        median_s,
        min_s,
        max_s,
        samples_s: secs,
    })
}

/// Parses `--change`: a percentage such as `3.5%` or `10` (the `%` is optional), from 0 to 100,
/// returned as a share (0.035).
pub fn parse_percent(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let t = t.strip_suffix('%').unwrap_or(t).trim();
    let p: f64 = t
        .parse()
        .map_err(|_| format!("`{s}` is not a percentage: write e.g. 3.5% or 10%"))?;
    if !(0.0..=100.0).contains(&p) {
        return Err(format!("`{s}` is out of range: use 0% to 100%"));
    }
    Ok(p / 100.0)
}

/// A duration for the table: µs below a millisecond, ms below a second, s above.
pub fn duration(secs: f64) -> String {
    if secs < 1e-3 {
        format!("{:.0} µs", secs * 1e6)
    } else if secs < 1.0 {
        format!("{:.1} ms", secs * 1e3)
    } else {
        format!("{secs:.3} s")
    }
}

/// A rate with about three significant digits; `-` when absent.
pub fn rate_text(r: Option<f64>) -> String {
    match r {
        None => "-".into(),
        Some(r) if r >= 100.0 => format!("{r:.0}"),
        Some(r) if r >= 10.0 => format!("{r:.1}"),
        Some(r) => format!("{r:.2}"),
    }
}

/// The report as a fixed-width table, one line per phase, headed by `title` lines.
pub fn table(title: &[String], phases: &[PhaseStats]) -> String {
    let mut out = String::new();
    for line in title {
        out += line;
        out.push('\n');
    }
    let name_w = phases
        .iter()
        .map(|p| p.phase.name.chars().count())
        .chain([5])
        .max()
        .unwrap_or(5);
    let state_w = phases
        .iter()
        .map(|p| p.phase.state.chars().count())
        .chain([5])
        .max()
        .unwrap_or(5);
    out += &format!(
        "{:<name_w$}  {:<state_w$}  {:>7}  {:>9}  {:>10}  {:>10}  {:>10}  {:>7}  {:>9}  {:>7}  {:>8}\n",
        "phase", "state", "files", "MB", "median", "min", "max", "MB/s", "files/s", "CPU s", "RSS MiB"
    );
    for p in phases {
        let mb = if p.phase.bytes >= 1_000_000 {
            format!("{:.1}", p.phase.bytes as f64 / 1e6)
        } else if p.phase.bytes > 0 {
            format!("{:.3}", p.phase.bytes as f64 / 1e6)
        } else {
            "-".into()
        };
        let files = if p.phase.files > 0 {
            p.phase.files.to_string()
        } else {
            "-".into()
        };
        out += &format!(
            "{:<name_w$}  {:<state_w$}  {:>7}  {:>9}  {:>10}  {:>10}  {:>10}  {:>7}  {:>9}  {:>7}  {:>8}\n",
            p.phase.name,
            p.phase.state,
            files,
            mb,
            duration(p.median_s),
            duration(p.min_s),
            duration(p.max_s),
            rate_text(p.mb_per_s),
            rate_text(p.files_per_s),
            p.cpu_s.map_or("-".into(), |c| format!("{c:.3}")),
            p.peak_rss_mib.map_or("-".into(), |m| format!("{m:.1}")),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(secs: f64) -> Sample {
        Sample {
            secs,
            cpu_secs: secs / 2.0,
            maxrss_kib: (secs * 1000.0) as u64,
        }
    }

    fn phase(files: u64, bytes: u64) -> Phase {
        Phase {
            name: "scan".into(),
            state: "warm",
            files,
            bytes,
            out_bytes: None,
            wall_only: false,
        }
    }

    #[test]
    fn median_of_odd_even_and_empty_inputs() {
        let cases: &[(&[f64], Option<f64>)] = &[
            (&[], None),
            (&[2.0], Some(2.0)),
            (&[3.0, 1.0, 2.0], Some(2.0)),
            (&[4.0, 1.0, 3.0, 2.0], Some(2.5)),
            (&[5.0, 5.0, 1.0, 9.0, 7.0], Some(5.0)),
        ];
        for (input, want) in cases {
            assert_eq!(median(input), *want, "{input:?}");
        }
    }

    #[test]
    fn rate_is_absent_without_amount_or_time() {
        let cases = [
            (100, 2.0, Some(50.0)),
            (0, 2.0, None),
            (100, 0.0, None),
            (3, 0.5, Some(6.0)),
        ];
        for (amount, secs, want) in cases {
            assert_eq!(rate(amount, secs), want, "{amount} / {secs}");
        }
    }

    #[test]
    fn summary_takes_median_spread_cpu_and_peak() {
        struct Case {
            secs: &'static [f64],
            files: u64,
            bytes: u64,
            want: (f64, f64, f64, Option<f64>, Option<f64>, f64, f64),
        }
        let cases = [
            Case {
                secs: &[0.2, 0.1, 0.4],
                files: 1000,
                bytes: 50_000_000,
                // median, min, max, MB/s, files/s, median CPU, peak MiB (400 KiB)
                want: (
                    0.2,
                    0.1,
                    0.4,
                    Some(250.0),
                    Some(5000.0),
                    0.1,
                    400.0 / 1024.0,
                ),
            },
            Case {
                secs: &[1.0, 3.0],
                files: 0,
                bytes: 4_000_000,
                want: (2.0, 1.0, 3.0, Some(2.0), None, 1.0, 3000.0 / 1024.0),
            },
            Case {
                secs: &[0.5],
                files: 10,
                bytes: 0,
                want: (0.5, 0.5, 0.5, None, Some(20.0), 0.25, 500.0 / 1024.0),
            },
        ];
        for c in cases {
            let samples: Vec<Sample> = c.secs.iter().map(|&s| sample(s)).collect();
            let s = summarize(phase(c.files, c.bytes), &samples).unwrap();
            let got = (
                s.median_s,
                s.min_s,
                s.max_s,
                s.mb_per_s,
                s.files_per_s,
                s.cpu_s.unwrap(),
                s.peak_rss_mib.unwrap(),
            );
            assert_eq!(got, c.want, "{:?}", c.secs);
            assert_eq!(s.runs, c.secs.len());
            assert_eq!(s.samples_s, c.secs);
        }
        assert_eq!(summarize(phase(1, 1), &[]), None);
    }

    #[test]
    fn percentages_parse_to_shares() {
        let cases = [
            ("3.5%", Some(0.035)),
            ("10", Some(0.1)),
            (" 0% ", Some(0.0)),
            ("100%", Some(1.0)),
            ("101%", None),
            ("-1%", None),
            ("ten", None),
            ("%", None),
        ];
        for (input, want) in cases {
            let got = parse_percent(input).ok();
            match (got, want) {
                (Some(g), Some(w)) => assert!((g - w).abs() < 1e-12, "{input}: {g}"),
                (g, w) => assert_eq!(g, w, "{input}"),
            }
        }
    }

    #[test]
    fn durations_and_rates_format_by_magnitude() {
        let durations = [
            (0.000_25, "250 µs"),
            (0.0123, "12.3 ms"),
            (0.999, "999.0 ms"),
            (2.5, "2.500 s"),
        ];
        for (secs, want) in durations {
            assert_eq!(duration(secs), want, "{secs}");
        }
        let rates = [
            (None, "-"),
            (Some(1234.4), "1234"),
            (Some(45.67), "45.7"),
            (Some(2.71), "2.71"),
        ];
        for (r, want) in rates {
            assert_eq!(rate_text(r), want, "{r:?}");
        }
    }

    #[test]
    fn table_has_a_header_and_a_row_per_phase() {
        let mut slow = summarize(phase(15_000, 110_000_000), &[sample(0.1), sample(0.3)]).unwrap();
        slow.phase.name = "scan (walk + stat)".into();
        let quick = summarize(phase(0, 0), &[sample(0.0004)]).unwrap();
        let small = summarize(phase(7, 25_000), &[sample(0.001)]).unwrap();
        let text = table(&["title line".into()], &[slow, quick, small]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert_eq!(lines[0], "title line");
        let header: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            header,
            [
                "phase", "state", "files", "MB", "median", "min", "max", "MB/s", "files/s", "CPU",
                "s", "RSS", "MiB"
            ]
        );
        assert!(lines[2].starts_with("scan (walk + stat)  warm"), "{text}");
        let row: Vec<&str> = lines[2].split_whitespace().collect();
        // files, MB, median, min, max, MB/s, files/s, CPU, RSS after the name and state.
        assert_eq!(
            &row[5..],
            &[
                "15000", "110.0", "200.0", "ms", "100.0", "ms", "300.0", "ms", "550", "75000",
                "0.100", "0.3"
            ]
        );
        let quick_row: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(&quick_row[2..4], &["-", "-"], "{text}");
        assert_eq!(&quick_row[4..6], &["400", "µs"], "{text}");
        let small_row: Vec<&str> = lines[4].split_whitespace().collect();
        assert_eq!(&small_row[2..4], &["7", "0.025"], "{text}");
    }
}

//! The comparison suite's results: the per-scenario summaries that `benches/suite.sh` collects
//! from the benchmark scripts (`*.summary.json`), checked and turned into the markdown table of
//! `summary.md`; [`chart`] draws the SVGs. Text in, text out: the `suite-report` binary does the
//! reading and writing, so every figure here can be checked against a hand-made summary.

pub mod chart;

use std::cmp::Ordering;
use std::fmt::Write as _;

use serde::Deserialize;

/// What is wrong with one summary file or with the set of them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SuiteError {
    #[error("{file}: not a scenario summary ({source}); rerun the script that wrote it")]
    Json {
        file: String,
        source: serde_json::Error,
    },
    #[error("{file}: {reason}; rerun the script that wrote it")]
    Invalid { file: String, reason: String },
    #[error("no scenario summaries (*.summary.json) to report: run benches/suite.sh first")]
    Empty,
    #[error("drawing {chart}: {reason}")]
    Chart { chart: &'static str, reason: String },
}

/// One tool's figures in one scenario, in seconds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Tool {
    pub name: String,
    pub runs: u32,
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    /// Bytes the tool put on the network, where there is one.
    pub wire_bytes: Option<u64>,
}

/// One scenario as a benchmark script summarized it: relsync and its baselines.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Scenario {
    /// Unique key, e.g. `local-tree`, `fleet-patch-8`.
    pub scenario: String,
    /// Scenarios drawn together: `local`, `push`, `small`, `fleet-patch`, `fleet-initial`.
    pub group: String,
    pub title: String,
    /// Whether the page cache was dropped before each run.
    pub cold: bool,
    /// Why the runs are cold or warm, in a few words.
    pub cache_note: String,
    /// Fleet size, for fleet scenarios.
    pub nodes: Option<u32>,
    pub tools: Vec<Tool>,
}

/// The name the scripts give relsync's own figures; every other tool is a baseline.
pub const RELSYNC: &str = "relsync";

impl Scenario {
    pub fn relsync(&self) -> &Tool {
        self.tools
            .iter()
            .find(|t| t.name == RELSYNC)
            .expect("checked by parse")
    }

    pub fn baselines(&self) -> impl Iterator<Item = &Tool> {
        self.tools.iter().filter(|t| t.name != RELSYNC)
    }
}

/// Reads one summary; `file` names it in errors. Rejects what would make a meaningless row: no
/// relsync or no baseline, a median that is not a positive number, min > median > max.
pub fn parse(file: &str, text: &str) -> Result<Scenario, SuiteError> {
    let s: Scenario = serde_json::from_str(text).map_err(|source| SuiteError::Json {
        file: file.to_owned(),
        source,
    })?;
    let invalid = |reason: String| {
        Err(SuiteError::Invalid {
            file: file.to_owned(),
            reason,
        })
    };
    let relsyncs = s.tools.iter().filter(|t| t.name == RELSYNC).count();
    if relsyncs != 1 {
        return invalid(format!(
            "scenario {} has {relsyncs} tools named {RELSYNC}, expected one",
            s.scenario
        ));
    }
    if s.tools.len() < 2 {
        return invalid(format!(
            "scenario {} has no baseline to compare relsync with",
            s.scenario
        ));
    }
    for t in &s.tools {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !(positive(t.median_s) && positive(t.min_s) && positive(t.max_s)) {
            return invalid(format!(
                "{} in {}: times must be positive seconds, got median {} min {} max {}",
                t.name, s.scenario, t.median_s, t.min_s, t.max_s
            ));
        }
        if t.min_s > t.median_s || t.median_s > t.max_s {
            return invalid(format!(
                "{} in {}: min {} ≤ median {} ≤ max {} does not hold",
                t.name, s.scenario, t.min_s, t.median_s, t.max_s
            ));
        }
        if t.runs == 0 {
            return invalid(format!("{} in {}: zero runs", t.name, s.scenario));
        }
    }
    Ok(s)
}

/// Position of `key` in `order`, unknown keys last.
fn rank(order: &[&str], key: &str) -> usize {
    order.iter().position(|k| *k == key).unwrap_or(usize::MAX)
}

/// The report's order: local, push, small files, then the fleets by size; in a group the
/// everyday case first; the rest by key.
pub fn sort(scenarios: &mut [Scenario]) {
    const GROUPS: &[&str] = &["local", "push", "small", "fleet-patch", "fleet-initial"];
    const KEYS: &[&str] = &[
        "local-tree",
        "local-big",
        "push-patch",
        "push-patch-wc",
        "push-bulk",
        "small-local",
        "small-net",
    ];
    scenarios.sort_by(|a, b| {
        rank(GROUPS, &a.group)
            .cmp(&rank(GROUPS, &b.group))
            .then_with(|| a.group.cmp(&b.group))
            .then_with(|| a.nodes.cmp(&b.nodes))
            .then_with(|| rank(KEYS, &a.scenario).cmp(&rank(KEYS, &b.scenario)))
            .then_with(|| a.scenario.cmp(&b.scenario))
    });
}

/// Seconds with three decimals (milliseconds), which is what the runs resolve on a shared machine.
fn seconds(t: &Tool) -> String {
    format!("{:.3} [{:.3}–{:.3}]", t.median_s, t.min_s, t.max_s)
}

/// Bytes in decimal units, three significant figures.
pub fn bytes(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < units.len() {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else if v >= 100.0 {
        format!("{v:.0} {}", units[unit])
    } else if v >= 10.0 {
        format!("{v:.1} {}", units[unit])
    } else {
        format!("{v:.2} {}", units[unit])
    }
}

/// Baseline time over relsync's: above 1, relsync is faster.
pub fn ratio(baseline: &Tool, relsync: &Tool) -> f64 {
    baseline.median_s / relsync.median_s
}

/// The markdown table of `summary.md`, one row per baseline of each scenario, and the notes that
/// say which scenarios ran cold and why the others are warm.
pub fn table(scenarios: &[Scenario]) -> String {
    let mut out = String::new();
    out.push_str(
        "| scenario | relsync s, median [min–max] | baseline | baseline s, median [min–max] \
         | baseline ÷ relsync | bytes on the wire, relsync / baseline | runs | cache |\n",
    );
    out.push_str("|---|---:|---|---:|---:|---:|---:|---|\n");
    for s in scenarios {
        let r = s.relsync();
        for b in s.baselines() {
            let wire = match (r.wire_bytes, b.wire_bytes) {
                (Some(x), Some(y)) => format!("{} / {}", bytes(x), bytes(y)),
                _ => "n/a (local)".to_owned(),
            };
            let runs = if r.runs == b.runs {
                r.runs.to_string()
            } else {
                format!("{} / {}", r.runs, b.runs)
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {:.2}× | {} | {} | {} |",
                s.scenario,
                seconds(r),
                b.name,
                seconds(b),
                ratio(b, r),
                wire,
                runs,
                if s.cold { "cold" } else { "warm" }
            );
        }
    }
    out.push('\n');
    for s in scenarios {
        let _ = writeln!(out, "- `{}`: {}; {}", s.scenario, s.title, s.cache_note);
    }
    out
}

/// One point of the fleet chart: a tool's time at a fleet size.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub nodes: u32,
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
}

/// A line of the fleet chart: one tool in one fleet scenario, points by fleet size.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<Point>,
}

/// The fleet scenarios (those with a node count) as one line per group and tool.
pub fn fleet_series(scenarios: &[Scenario]) -> Vec<Series> {
    let mut series: Vec<Series> = Vec::new();
    for s in scenarios {
        let Some(nodes) = s.nodes else { continue };
        let scenario = s.group.strip_prefix("fleet-").unwrap_or(&s.group);
        for t in &s.tools {
            let label = format!("{scenario}: {}", t.name);
            let point = Point {
                nodes,
                median_s: t.median_s,
                min_s: t.min_s,
                max_s: t.max_s,
            };
            match series.iter_mut().find(|x| x.label == label) {
                Some(x) => x.points.push(point),
                None => series.push(Series {
                    label,
                    points: vec![point],
                }),
            }
        }
    }
    for s in &mut series {
        s.points.sort_by_key(|p| p.nodes);
    }
    series
}

/// One phase of `relsync bench --json`, as the suite checks it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PhaseBar {
    pub name: String,
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
}

/// The output of `relsync bench --json`: the phases, and what was measured where.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Phases {
    pub target: String,
    pub corpus: String,
    pub runs: u32,
    pub phases: Vec<PhaseBar>,
}

/// Reads `relsync bench --json`; `file` names it in errors.
pub fn parse_phases(file: &str, text: &str) -> Result<Phases, SuiteError> {
    let p: Phases = serde_json::from_str(text).map_err(|source| SuiteError::Json {
        file: file.to_owned(),
        source,
    })?;
    if p.phases.is_empty() {
        return Err(SuiteError::Invalid {
            file: file.to_owned(),
            reason: "relsync bench reported no phases".into(),
        });
    }
    if let Some(bad) = p.phases.iter().find(|b| {
        !(b.min_s.is_finite() && b.max_s.is_finite() && b.min_s >= 0.0)
            || b.min_s.partial_cmp(&b.median_s) == Some(Ordering::Greater)
            || b.median_s.partial_cmp(&b.max_s) == Some(Ordering::Greater)
    }) {
        return Err(SuiteError::Invalid {
            file: file.to_owned(),
            reason: format!(
                "phase {}: min {} ≤ median {} ≤ max {} does not hold",
                bad.name, bad.min_s, bad.median_s, bad.max_s
            ),
        });
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(scenario: &str, group: &str, nodes: Option<u32>, tools: &[(&str, f64)]) -> String {
        let tools: Vec<String> = tools
            .iter()
            .map(|(name, median)| {
                format!(
                    r#"{{"name": "{name}", "runs": 5, "median_s": {median}, "min_s": {}, "max_s": {}, "wire_bytes": {}}}"#,
                    median * 0.9,
                    median * 1.2,
                    if group == "local" { "null".to_owned() } else { format!("{}", (median * 1e6) as u64) }
                )
            })
            .collect();
        format!(
            r#"{{"scenario": "{scenario}", "group": "{group}", "title": "t {scenario}", "cold": {}, "cache_note": "note {scenario}", "nodes": {}, "tools": [{}]}}"#,
            group == "small",
            nodes.map_or("null".to_owned(), |n| n.to_string()),
            tools.join(", ")
        )
    }

    #[test]
    fn a_well_formed_summary_parses() {
        let s = parse(
            "x.json",
            &summary(
                "push-patch",
                "push",
                None,
                &[("relsync", 2.0), ("rsync", 5.0)],
            ),
        )
        .unwrap();
        assert_eq!(s.relsync().median_s, 2.0);
        assert_eq!(
            s.baselines().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["rsync"]
        );
        assert_eq!(s.relsync().wire_bytes, Some(2_000_000));
    }

    #[test]
    fn malformed_summaries_are_rejected_with_the_reason() {
        let ok = summary("a", "push", None, &[("relsync", 1.0), ("rsync", 2.0)]);
        let cases: &[(String, &str)] = &[
            ("{".into(), "not a scenario summary"),
            (
                ok.replace("\"relsync\"", "\"relsync2\""),
                "0 tools named relsync",
            ),
            (
                summary("a", "push", None, &[("relsync", 1.0), ("relsync", 2.0)]),
                "2 tools named relsync",
            ),
            (
                summary("a", "push", None, &[("relsync", 1.0)]),
                "no baseline",
            ),
            (
                summary("a", "push", None, &[("relsync", 0.0), ("rsync", 2.0)]),
                "positive seconds",
            ),
            (
                ok.replace("\"median_s\": 1,", "\"median_s\": 9,"),
                "does not hold",
            ),
            (ok.replace("\"runs\": 5", "\"runs\": 0"), "zero runs"),
        ];
        for (text, want) in cases {
            let err = parse("f.summary.json", text).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should say {want}");
            assert!(err.starts_with("f.summary.json: "), "{err}");
        }
    }

    #[test]
    fn scenarios_sort_by_group_then_fleet_size() {
        let mut v: Vec<Scenario> = [
            ("fleet-patch-16", "fleet-patch", Some(16)),
            ("fleet-initial-4", "fleet-initial", Some(4)),
            ("fleet-patch-4", "fleet-patch", Some(4)),
            ("small-local", "small", None),
            ("push-bulk", "push", None),
            ("push-patch-wc", "push", None),
            ("push-patch", "push", None),
            ("local-big", "local", None),
            ("small-net", "small", None),
            ("local-tree", "local", None),
            ("zz", "other", None),
        ]
        .iter()
        .map(|(s, g, n)| {
            parse("f", &summary(s, g, *n, &[("relsync", 1.0), ("rsync", 2.0)])).unwrap()
        })
        .collect();
        sort(&mut v);
        let keys: Vec<&str> = v.iter().map(|s| s.scenario.as_str()).collect();
        assert_eq!(
            keys,
            [
                "local-tree",
                "local-big",
                "push-patch",
                "push-patch-wc",
                "push-bulk",
                "small-local",
                "small-net",
                "fleet-patch-4",
                "fleet-patch-16",
                "fleet-initial-4",
                "zz"
            ]
        );
    }

    #[test]
    fn bytes_read_in_decimal_units() {
        let cases = [
            (0, "0 B"),
            (999, "999 B"),
            (1_000, "1.00 kB"),
            (1_340_000, "1.34 MB"),
            (16_940_000, "16.9 MB"),
            (893_000_000, "893 MB"),
            (2_500_000_000, "2.50 GB"),
        ];
        for (n, want) in cases {
            assert_eq!(bytes(n), want, "{n}");
        }
    }

    #[test]
    fn the_table_has_a_row_per_baseline_with_ratio_and_bytes() {
        let v = [
            parse(
                "f",
                &summary(
                    "local-tree",
                    "local",
                    None,
                    &[
                        ("relsync", 0.5),
                        ("rsync --link-dest", 2.0),
                        ("cp -al", 0.25),
                    ],
                ),
            )
            .unwrap(),
            parse(
                "f",
                &summary(
                    "small-local",
                    "small",
                    None,
                    &[("relsync", 4.0), ("rsync -a", 3.0)],
                ),
            )
            .unwrap(),
            parse(
                "f",
                &summary(
                    "fleet-patch-4",
                    "fleet-patch",
                    Some(4),
                    &[("relsync", 2.0), ("rsync", 3.0)],
                ),
            )
            .unwrap(),
        ];
        let t = table(&v);
        let rows: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| scenario"))
            .collect();
        assert_eq!(rows.len(), 4, "{t}");
        let cases = [
            (0, "| local-tree | 0.500 [0.450–0.600] | rsync --link-dest | 2.000 [1.800–2.400] | 4.00× | n/a (local) | 5 | warm |"),
            (1, "| local-tree | 0.500 [0.450–0.600] | cp -al | 0.250 [0.225–0.300] | 0.50× | n/a (local) | 5 | warm |"),
            (2, "| small-local | 4.000 [3.600–4.800] | rsync -a | 3.000 [2.700–3.600] | 0.75× | 4.00 MB / 3.00 MB | 5 | cold |"),
            (3, "| fleet-patch-4 | 2.000 [1.800–2.400] | rsync | 3.000 [2.700–3.600] | 1.50× | 2.00 MB / 3.00 MB | 5 | warm |"),
        ];
        for (i, want) in cases {
            assert_eq!(rows[i], want);
        }
        assert!(
            t.contains("- `small-local`: t small-local; note small-local"),
            "{t}"
        );
    }

    #[test]
    fn fleet_series_hold_one_line_per_scenario_and_tool() {
        let v: Vec<Scenario> = [
            ("fleet-patch-8", "fleet-patch", Some(8), 3.0),
            ("fleet-patch-4", "fleet-patch", Some(4), 2.0),
            ("fleet-initial-4", "fleet-initial", Some(4), 9.0),
            ("push-patch", "push", None, 1.0),
        ]
        .iter()
        .map(|(s, g, n, m)| {
            parse(
                "f",
                &summary(s, g, *n, &[("relsync", *m), ("rsync", m * 2.0)]),
            )
            .unwrap()
        })
        .collect();
        let series = fleet_series(&v);
        let got: Vec<(String, Vec<(u32, f64)>)> = series
            .iter()
            .map(|s| {
                (
                    s.label.clone(),
                    s.points.iter().map(|p| (p.nodes, p.median_s)).collect(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("patch: relsync".to_owned(), vec![(4, 2.0), (8, 3.0)]),
                ("patch: rsync".to_owned(), vec![(4, 4.0), (8, 6.0)]),
                ("initial: relsync".to_owned(), vec![(4, 9.0)]),
                ("initial: rsync".to_owned(), vec![(4, 18.0)]),
            ]
        );
    }

    #[test]
    fn phases_come_from_relsync_bench_json() {
        let text = r#"{"target": "local target", "corpus": "c", "runs": 3, "cores": 2, "load_average": "1.0", "notes": [],
            "phases": [{"name": "scan", "state": "warm", "files": 1, "bytes": 1, "out_bytes": null, "runs": 3,
            "median_s": 0.2, "min_s": 0.1, "max_s": 0.3, "mb_per_s": null, "files_per_s": null, "cpu_s": 0.1,
            "peak_rss_mib": 1.0, "samples_s": [0.1, 0.2, 0.3]}]}"#;
        let p = parse_phases("phases.json", text).unwrap();
        assert_eq!(p.phases.len(), 1);
        assert_eq!(p.phases[0].name, "scan");
        let empty = text.replace(
            text[text.find("[{").unwrap()..text.rfind("}]").unwrap() + 2].trim(),
            "[]",
        );
        assert!(parse_phases("phases.json", &empty)
            .unwrap_err()
            .to_string()
            .contains("no phases"));
        let inverted = text.replace("\"min_s\": 0.1", "\"min_s\": 0.25");
        assert!(parse_phases("phases.json", &inverted)
            .unwrap_err()
            .to_string()
            .contains("does not hold"));
    }
}

//! The suite's SVG charts (plotters' SVG backend, rendered into a string): time against fleet
//! size for each tool and fleet scenario, and the time of each phase of one relsync build. Each
//! point or bar is a median with a whisker from min to max, as in the table.

use plotters::prelude::*;

use super::{PhaseBar, Series, SuiteError};

const WIDTH_PX: u32 = 960;

fn chart_error<E>(chart: &'static str) -> impl Fn(DrawingAreaErrorKind<E>) -> SuiteError
where
    E: std::error::Error + Send + Sync,
{
    move |e| SuiteError::Chart {
        chart,
        reason: e.to_string(),
    }
}

/// Time (median, whiskers min to max) against the number of nodes, one line per series.
pub fn fleet_svg(title: &str, series: &[Series]) -> Result<String, SuiteError> {
    let points = || series.iter().flat_map(|s| s.points.iter());
    let max_nodes = points().map(|p| p.nodes).max().unwrap_or(1).max(1) as f64;
    let max_s = points().map(|p| p.max_s).fold(0.0_f64, f64::max).max(1e-3);
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH_PX, 540)).into_drawing_area();
        let err = chart_error("fleet-time.svg");
        root.fill(&WHITE).map_err(&err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..max_nodes * 1.08, 0.0..max_s * 1.1)
            .map_err(&err)?;
        let nodes: Vec<u32> = {
            let mut v: Vec<u32> = points().map(|p| p.nodes).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("nodes")
            .y_desc("seconds until the last node is done (median; whiskers: min to max)")
            // Ticks only at the fleet sizes that were measured.
            .x_labels(nodes.len().max(2) * 8)
            .x_label_formatter(&|v| {
                let n = v.round();
                if (v - n).abs() < 1e-6 && nodes.contains(&(n as u32)) {
                    format!("{n:.0}")
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v| format!("{v:.1}"))
            .draw()
            .map_err(&err)?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let style = color.stroke_width(2);
            // Lines and whiskers as plain paths: the workspace's plotters has only the SVG backend,
            // not the line-series and error-bar elements.
            let line: Vec<(f64, f64)> = s
                .points
                .iter()
                .map(|p| (p.nodes as f64, p.median_s))
                .collect();
            chart
                .draw_series(std::iter::once(PathElement::new(line, style)))
                .map_err(&err)?
                .label(&s.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            let cap = max_nodes * 0.008;
            chart
                .draw_series(s.points.iter().flat_map(|p| {
                    let x = p.nodes as f64;
                    [
                        vec![(x, p.min_s), (x, p.max_s)],
                        vec![(x - cap, p.min_s), (x + cap, p.min_s)],
                        vec![(x - cap, p.max_s), (x + cap, p.max_s)],
                    ]
                    .map(|points| PathElement::new(points, color.stroke_width(1)))
                }))
                .map_err(&err)?;
            chart
                .draw_series(
                    s.points
                        .iter()
                        .map(|p| Circle::new((p.nodes as f64, p.median_s), 3, color.filled())),
                )
                .map_err(&err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(&err)?;
        root.present().map_err(&err)?;
    }
    Ok(out)
}

/// One horizontal bar per phase at its median, a whisker from min to max, name and median beside.
pub fn phases_svg(title: &str, phases: &[PhaseBar]) -> Result<String, SuiteError> {
    const ROW_PX: u32 = 28;
    let n = phases.len().max(1);
    let longest_ms = phases
        .iter()
        .map(|p| p.max_s * 1e3)
        .fold(0.0_f64, f64::max)
        .max(1e-3);
    // Room right of the longest whisker for its label.
    let x_end = longest_ms * 1.7;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH_PX, 90 + ROW_PX * n as u32))
            .into_drawing_area();
        let err = chart_error("phases.svg");
        root.fill(&WHITE).map_err(&err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(8)
            .build_cartesian_2d(0.0..x_end, 0.0..n as f64)
            .map_err(&err)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .disable_y_axis()
            .y_labels(0)
            .x_desc("milliseconds (median; whiskers: min to max)")
            .draw()
            .map_err(&err)?;
        // The first phase at the top.
        let row = |i: usize| (n - 1 - i) as f64;
        chart
            .draw_series(phases.iter().enumerate().map(|(i, p)| {
                Rectangle::new(
                    [(0.0, row(i) + 0.2), (p.median_s * 1e3, row(i) + 0.8)],
                    Palette99::pick(i).mix(0.8).filled(),
                )
            }))
            .map_err(&err)?;
        for (i, p) in phases.iter().enumerate() {
            let y = row(i) + 0.5;
            let (lo, hi) = (p.min_s * 1e3, p.max_s * 1e3);
            let whisker = [
                vec![(lo, y), (hi, y)],
                vec![(lo, y - 0.15), (lo, y + 0.15)],
                vec![(hi, y - 0.15), (hi, y + 0.15)],
            ];
            chart
                .draw_series(
                    whisker
                        .into_iter()
                        .map(|points| PathElement::new(points, BLACK.stroke_width(1))),
                )
                .map_err(&err)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    phase_label(p),
                    (hi + longest_ms * 0.02, y + 0.25),
                    ("sans-serif", 13),
                )))
                .map_err(&err)?;
        }
        root.present().map_err(&err)?;
    }
    Ok(out)
}

/// The text beside a phase's bar: its name and median.
pub fn phase_label(p: &PhaseBar) -> String {
    if p.median_s >= 1.0 {
        format!("{}  {:.2} s", p.name, p.median_s)
    } else {
        format!("{}  {:.1} ms", p.name, p.median_s * 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Point;
    use super::*;

    fn series(label: &str, points: &[(u32, f64)]) -> Series {
        Series {
            label: label.into(),
            points: points
                .iter()
                .map(|&(nodes, m)| Point {
                    nodes,
                    median_s: m,
                    min_s: m * 0.9,
                    max_s: m * 1.1,
                })
                .collect(),
        }
    }

    #[test]
    fn the_fleet_chart_has_every_series_in_its_legend() {
        let cases: Vec<Vec<Series>> = vec![
            vec![
                series("patch: relsync", &[(4, 2.0), (8, 3.0), (16, 5.4)]),
                series("patch: rsync", &[(4, 3.1), (8, 7.0), (16, 14.7)]),
                series("initial: relsync", &[(4, 9.6), (8, 21.0), (16, 34.1)]),
            ],
            vec![series("patch: relsync", &[(2, 0.05)])],
            vec![],
        ];
        for s in &cases {
            let svg = fleet_svg("fleet", s).unwrap();
            assert!(svg.starts_with("<svg"), "{svg}");
            assert!(svg.trim_end().ends_with("</svg>"));
            for x in s {
                assert!(svg.contains(&x.label), "{} missing", x.label);
            }
            let dots = svg.matches("<circle").count();
            let points: usize = s.iter().map(|x| x.points.len()).sum();
            assert_eq!(dots, points, "one dot per point");
        }
    }

    #[test]
    fn the_phase_chart_labels_every_bar() {
        let phases = [
            PhaseBar {
                name: "scan".into(),
                median_s: 0.02,
                min_s: 0.01,
                max_s: 0.03,
            },
            PhaseBar {
                name: "end to end: deploy".into(),
                median_s: 1.5,
                min_s: 1.4,
                max_s: 1.9,
            },
        ];
        let svg = phases_svg("phases", &phases).unwrap();
        assert!(svg.starts_with("<svg"));
        assert_eq!(phase_label(&phases[0]), "scan  20.0 ms");
        assert_eq!(phase_label(&phases[1]), "end to end: deploy  1.50 s");
        for p in &phases {
            assert!(svg.contains(&phase_label(p)), "{} missing", p.name);
        }
    }
}

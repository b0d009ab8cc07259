//! The suite's SVG chart (plotters' SVG backend, rendered into a string): time against fleet
//! size for each tool and fleet scenario, each point a median with a whisker from min to max, as
//! in the table. The chart of the phases is `relsync bench --chart`'s own.

use plotters::prelude::*;

use super::{Series, SuiteError};

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
}

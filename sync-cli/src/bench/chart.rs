//! The phase breakdown of a `relsync bench` report as an SVG bar chart: one horizontal bar per
//! phase at its median, a whisker from min to max, and the phase's name and median beside it.
//! Rendered into a string (plotters' SVG backend), so the caller decides where it goes.

use plotters::prelude::*;

use super::report::{duration, PhaseStats};

const ROW_PX: u32 = 28;
const WIDTH_PX: u32 = 960;

/// Renders `phases` under `title`; an error names what plotters could not draw.
pub fn svg(title: &str, phases: &[PhaseStats]) -> Result<String, String> {
    let n = phases.len().max(1);
    let height = 90 + ROW_PX * n as u32;
    let longest_ms = phases
        .iter()
        .map(|p| p.max_s * 1e3)
        .fold(0.0_f64, f64::max)
        .max(1e-3);
    // Room to the right of the longest whisker for its label.
    let x_end = longest_ms * 1.6;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH_PX, height)).into_drawing_area();
        let err = |e: DrawingAreaErrorKind<_>| format!("drawing the chart: {e}");
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(8)
            .build_cartesian_2d(0.0..x_end, 0.0..n as f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .disable_y_axis()
            .y_labels(0)
            .x_desc("milliseconds (median; whiskers: min to max)")
            .x_label_formatter(&|v| {
                if x_end >= 10.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                }
            })
            .draw()
            .map_err(err)?;
        // The first phase at the top.
        let row = |i: usize| (n - 1 - i) as f64;
        chart
            .draw_series(phases.iter().enumerate().map(|(i, p)| {
                let y = row(i);
                Rectangle::new(
                    [(0.0, y + 0.2), (p.median_s * 1e3, y + 0.8)],
                    Palette99::pick(i).mix(0.8).filled(),
                )
            }))
            .map_err(err)?;
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
                .map_err(err)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{}  {}", p.phase.name, duration(p.median_s)),
                    (hi + longest_ms * 0.02, y + 0.25),
                    ("sans-serif", 13),
                )))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::report::{summarize, Phase, Sample};
    use super::*;

    fn stats(name: &str, secs: &[f64]) -> PhaseStats {
        let samples: Vec<Sample> = secs
            .iter()
            .map(|&secs| Sample {
                secs,
                ..Sample::default()
            })
            .collect();
        let phase = Phase {
            name: name.into(),
            state: "warm",
            files: 1,
            bytes: 1,
            out_bytes: None,
            wall_only: false,
        };
        summarize(phase, &samples).unwrap()
    }

    #[test]
    fn every_phase_gets_a_bar_and_a_label() {
        let cases: &[&[(&str, &[f64])]] = &[
            &[("scan", &[0.01, 0.02, 0.03])],
            &[
                ("scan", &[0.04, 0.05]),
                ("hash", &[0.1, 0.2]),
                ("sync", &[0.0, 0.0]),
            ],
            &[],
        ];
        for phases in cases {
            let stats: Vec<PhaseStats> = phases.iter().map(|(n, s)| stats(n, s)).collect();
            let svg = svg("relsync bench", &stats).unwrap();
            assert!(svg.starts_with("<svg"), "{svg}");
            assert!(svg.trim_end().ends_with("</svg>"));
            assert!(svg.contains("relsync bench"));
            for p in &stats {
                let label = format!("{}  {}", p.phase.name, duration(p.median_s));
                assert!(svg.contains(&label), "{label} missing");
            }
            // The background, the plotting area's frame and one bar per phase.
            let bars = svg.matches("<rect").count();
            assert!(bars > stats.len(), "{bars} rectangles for {}", stats.len());
        }
    }
}

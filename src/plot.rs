//! PNG charts: line panels with min-max bands, bar charts with error bars, labelled scatter
//! plots. Drawn with `plotters` into an RGB buffer, encoded by `image` and written atomically.
//! This module knows nothing of runs or studies: callers hand it numbers.

use anyhow::{anyhow, ensure, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

/// One line of a panel: y over x, with an optional band (`lo`..`hi`, e.g. min-max over seeds).
#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    pub x: Vec<f64>,
    pub y: Vec<f64>,
    pub band: Option<(Vec<f64>, Vec<f64>)>,
    /// Drawn thinner and lighter (a secondary line, e.g. the EMA next to the model).
    pub secondary: bool,
}

/// A panel: axes, title and lines.
#[derive(Clone, Debug)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

/// One bar: a mean with a symmetric error (std over seeds; 0 draws none).
#[derive(Clone, Debug)]
pub struct Bar {
    pub label: String,
    pub value: f64,
    pub error: f64,
}

/// A labelled point; points sharing a `group` are joined in x order (a model family).
#[derive(Clone, Debug)]
pub struct Point {
    pub label: String,
    pub group: String,
    pub x: f64,
    pub y: f64,
}

const W: u32 = 640;
const H: u32 = 440;
const FONT: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded font parses (a fixed asset); failing here would be a packaging bug.
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
            .unwrap_or_else(|_| panic!("embedded DejaVu Sans does not parse"));
    });
}

fn colour(i: usize) -> RGBColor {
    // Tableau 10: distinguishable and printable.
    const C: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    let (r, g, b) = C[i % C.len()];
    RGBColor(r, g, b)
}

fn finite_range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    (lo <= hi).then(|| {
        let pad = ((hi - lo) * 0.05).max(1e-6);
        (lo - pad, hi + pad)
    })
}

fn draw_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e:?}")
}

/// Renders `draw` into a `w` x `h` RGB buffer and writes it as a PNG, atomically.
fn render(
    path: &Path,
    (w, h): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    register_font();
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        draw(&root)?;
        root.present().map_err(draw_err)?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).expect("buffer sized w*h*3");
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    crate::io::atomic::write_atomic(path, &png)
}

fn draw_panel(area: &DrawingArea<BitMapBackend, plotters::coord::Shift>, p: &Panel) -> Result<()> {
    let xs = p.series.iter().flat_map(|s| s.x.iter().copied());
    let ys = p.series.iter().flat_map(|s| {
        let band = s.band.iter().flat_map(|(lo, hi)| lo.iter().chain(hi));
        s.y.iter().chain(band).copied()
    });
    let (Some((x0, x1)), Some((y0, y1))) = (finite_range(xs), finite_range(ys)) else {
        // Nothing to draw yet (no finished epoch): an empty panel with its title.
        area.titled(&p.title, (FONT, 18)).map_err(draw_err)?;
        return Ok(());
    };
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, (FONT, 18))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc(&p.x_label)
        .y_desc(&p.y_label)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(draw_err)?;
    let mut primary = 0;
    for s in &p.series {
        // A secondary line takes the colour of the primary line before it.
        let c = if s.secondary {
            colour(primary.max(1) - 1)
        } else {
            primary += 1;
            colour(primary - 1)
        };
        if let Some((lo, hi)) = &s.band {
            let upper = s.x.iter().copied().zip(hi.iter().copied());
            let lower = s.x.iter().copied().zip(lo.iter().copied()).rev();
            let poly: Vec<(f64, f64)> = upper.chain(lower).collect();
            chart
                .draw_series(std::iter::once(Polygon::new(poly, c.mix(0.18).filled())))
                .map_err(draw_err)?;
        }
        let style = if s.secondary {
            c.mix(0.6).stroke_width(1)
        } else {
            c.stroke_width(2)
        };
        let pts: Vec<(f64, f64)> = s.x.iter().copied().zip(s.y.iter().copied()).collect();
        chart
            .draw_series(LineSeries::new(pts, style))
            .map_err(draw_err)?
            .label(&s.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
    }
    if p.series.iter().any(|s| !s.label.is_empty()) {
        // The legend goes where the lines are not: below rising curves, above falling ones.
        let falling = p
            .series
            .iter()
            .filter(|s| s.y.len() > 1)
            .map(|s| s.y[s.y.len() - 1] - s.y[0])
            .sum::<f64>()
            < 0.0;
        let corner = if falling {
            SeriesLabelPosition::UpperRight
        } else {
            SeriesLabelPosition::LowerRight
        };
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .label_font((FONT, 12))
            .position(corner)
            .draw()
            .map_err(draw_err)?;
    }
    Ok(())
}

/// Panels side by side in one PNG.
pub fn panels(path: &Path, panels: &[Panel]) -> Result<()> {
    ensure!(!panels.is_empty(), "no panel to draw");
    let n = panels.len() as u32;
    render(path, (W * n, H), |root| {
        for (area, p) in root.split_evenly((1, panels.len())).iter().zip(panels) {
            draw_panel(area, p)?;
        }
        Ok(())
    })
}

/// A bar chart with error bars; the y axis starts a little below the lowest bar so that
/// differences of a point or two stay visible (its range is on the axis).
pub fn bars(path: &Path, title: &str, y_label: &str, bars: &[Bar]) -> Result<()> {
    ensure!(!bars.is_empty(), "no bar to draw");
    let lo = bars
        .iter()
        .map(|b| b.value - b.error)
        .fold(f64::INFINITY, f64::min);
    let hi = bars
        .iter()
        .map(|b| b.value + b.error)
        .fold(f64::NEG_INFINITY, f64::max);
    ensure!(
        lo.is_finite() && hi.is_finite(),
        "bar values must be finite"
    );
    let pad = ((hi - lo) * 0.25).max(0.5);
    let (y0, y1) = ((lo - pad).max(0.0), hi + pad);
    let n = bars.len();
    render(path, (W.max(90 * n as u32 + 120), H), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..n as f64, y0..y1)
            .map_err(draw_err)?;
        let names: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                let centre = (x - x.floor() - 0.5).abs() < 1e-6;
                match names.get(i) {
                    Some(s) if centre => s.clone(),
                    _ => String::new(),
                }
            })
            .y_desc(y_label)
            .label_style((FONT, 12))
            .axis_desc_style((FONT, 14))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(draw_err)?;
        for (i, b) in bars.iter().enumerate() {
            let x = i as f64;
            let c = colour(i);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x + 0.15, y0), (x + 0.85, b.value)],
                    c.mix(0.8).filled(),
                )))
                .map_err(draw_err)?;
            if b.error > 0.0 {
                let (e0, e1) = (b.value - b.error, b.value + b.error);
                let whisker = |y| PathElement::new(vec![(x + 0.4, y), (x + 0.6, y)], BLACK);
                chart
                    .draw_series([
                        PathElement::new(vec![(x + 0.5, e0), (x + 0.5, e1)], BLACK),
                        whisker(e0),
                        whisker(e1),
                    ])
                    .map_err(draw_err)?;
            }
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{:.2}", b.value),
                    (x + 0.3, b.value + b.error + (y1 - y0) * 0.02),
                    (FONT, 12),
                )))
                .map_err(draw_err)?;
        }
        Ok(())
    })
}

/// A scatter plot of labelled points, each group joined by a line (the paper's Figures 1 and 5:
/// accuracy against latency or MACs).
pub fn scatter(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    pts: &[Point],
) -> Result<()> {
    ensure!(!pts.is_empty(), "no point to draw");
    let xr = finite_range(pts.iter().map(|p| p.x)).ok_or_else(|| anyhow!("no finite x"))?;
    let yr = finite_range(pts.iter().map(|p| p.y)).ok_or_else(|| anyhow!("no finite y"))?;
    let (x0, x1) = (xr.0 - (xr.1 - xr.0) * 0.1, xr.1 + (xr.1 - xr.0) * 0.25);
    let (y0, y1) = (yr.0 - (yr.1 - yr.0) * 0.1, yr.1 + (yr.1 - yr.0) * 0.1);
    let mut groups: Vec<&str> = Vec::new();
    for p in pts {
        if !groups.contains(&p.group.as_str()) {
            groups.push(&p.group);
        }
    }
    render(path, (W, H), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(draw_err)?;
        for (gi, g) in groups.iter().enumerate() {
            let c = colour(gi);
            let mut members: Vec<&Point> = pts.iter().filter(|p| p.group == *g).collect();
            members.sort_by(|a, b| a.x.total_cmp(&b.x));
            chart
                .draw_series(LineSeries::new(
                    members.iter().map(|p| (p.x, p.y)),
                    c.stroke_width(2),
                ))
                .map_err(draw_err)?
                .label(g.to_string())
                .legend(move |(x, y)| Circle::new((x + 8, y), 4, c.filled()));
            chart
                .draw_series(
                    members
                        .iter()
                        .map(|p| Circle::new((p.x, p.y), 4, c.filled())),
                )
                .map_err(draw_err)?;
            chart
                .draw_series(members.iter().map(|p| {
                    Text::new(p.label.clone(), (p.x + (x1 - x0) * 0.012, p.y), (FONT, 11))
                }))
                .map_err(draw_err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .label_font((FONT, 12))
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(draw_err)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(path: &Path) -> image::RgbImage {
        image::open(path).expect("a PNG").to_rgb8()
    }

    fn coloured_pixels(img: &image::RgbImage) -> usize {
        img.pixels()
            .filter(|p| p.0.iter().any(|&c| c < 200) && p.0.iter().max() != p.0.iter().min())
            .count()
    }

    #[test]
    fn charts_are_pngs_with_their_lines_drawn() {
        let dir = std::env::temp_dir().join(format!("ghostv3-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let line = Series {
            label: "a".into(),
            x: vec![1.0, 2.0, 3.0],
            y: vec![0.2, 0.5, 0.7],
            band: Some((vec![0.1, 0.4, 0.6], vec![0.3, 0.6, 0.8])),
            secondary: false,
        };
        let panel = |series| Panel {
            title: "t".into(),
            x_label: "epoch".into(),
            y_label: "top-1".into(),
            series,
        };
        let empty = dir.join("empty.png");
        panels(&empty, &[panel(vec![])]).unwrap();
        let full = dir.join("full.png");
        panels(&full, &[panel(vec![line.clone()]), panel(vec![line])]).unwrap();
        let (e, f) = (decoded(&empty), decoded(&full));
        assert_eq!((f.width(), f.height()), (2 * W, H));
        // Coloured lines and bands appear only where there are series.
        assert_eq!(coloured_pixels(&e), 0);
        assert!(coloured_pixels(&f) > 2000, "{}", coloured_pixels(&f));

        let b = dir.join("bars.png");
        let bar = |v| Bar {
            label: "v".into(),
            value: v,
            error: 0.5,
        };
        bars(&b, "final", "top-1 (%)", &[bar(60.0), bar(62.0)]).unwrap();
        assert!(coloured_pixels(&decoded(&b)) > 2000);
        assert!(bars(&b, "x", "y", &[]).is_err());

        let s = dir.join("scatter.png");
        let pt = |x, y| Point {
            label: format!("{x}"),
            group: "g".into(),
            x,
            y,
        };
        scatter(&s, "acc", "ms", "top-1", &[pt(1.0, 70.0), pt(2.0, 75.0)]).unwrap();
        assert!(coloured_pixels(&decoded(&s)) > 100);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

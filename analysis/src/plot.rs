//! Figures: scaling curves (markers and dashed fits, log-x), loss curves and LR sweeps.
//! Every figure is written as SVG and PNG (the PNG at twice the size). Text uses the bundled
//! Roboto subset through plotters' `ab_glyph` renderer, so no system font is needed.

use crate::fit::PowerLaw;
use crate::runs::fmt_sig;
use crate::AnalysisError;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::{Path, PathBuf};
use std::sync::Once;

static REGULAR: &[u8] = include_bytes!("../assets/Roboto-Regular-subset.ttf");
static BOLD: &[u8] = include_bytes!("../assets/Roboto-Bold-subset.ttf");
const FAMILY: &str = "sans-serif";

fn register_fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are compiled in and known to parse; a failure would only lose text.
        let _ = register_font(FAMILY, FontStyle::Normal, REGULAR);
        let _ = register_font(FAMILY, FontStyle::Bold, BOLD);
    });
}

/// Okabe-Ito: distinguishable with colour-vision deficiencies and in greyscale print.
const PALETTE: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// One group on a scaling plot.
#[derive(Clone, Debug)]
pub struct ScalingSeries {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub law: Option<PowerLaw>,
}

/// One run on a loss-curve plot: the training loss per step and the validation points.
#[derive(Clone, Debug)]
pub struct LossCurve {
    pub label: String,
    pub train: Vec<(f64, f64)>,
    pub val: Vec<(f64, f64)>,
}

/// A figure, drawn the same way into SVG and PNG.
#[derive(Clone, Debug)]
pub enum Figure {
    /// Final loss against a budget, with the fitted `A·x^(−b) + C` dashed over the data range.
    Scaling {
        title: String,
        x_label: String,
        x_symbol: String,
        series: Vec<ScalingSeries>,
    },
    /// Loss against tokens, one colour per run.
    LossCurves {
        title: String,
        curves: Vec<LossCurve>,
    },
    /// Final loss against peak LR, one line per model.
    LrSweep {
        title: String,
        series: Vec<ScalingSeries>,
    },
}

const WIDTH: u32 = 1000;
const HEIGHT: u32 = 640;

/// Writes `<stem>.svg` and `<stem>.png` and returns their paths.
pub fn save(figure: &Figure, stem: &Path) -> Result<Vec<PathBuf>, AnalysisError> {
    register_fonts();
    let svg_path = stem.with_extension("svg");
    let png_path = stem.with_extension("png");
    let plot_err = |path: &Path| {
        let path = path.to_path_buf();
        move |reason: String| AnalysisError::Plot { path, reason }
    };

    let mut svg = String::new();
    {
        let area = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        draw(figure, &area, 1.0).map_err(plot_err(&svg_path))?;
        area.present()
            .map_err(|e| plot_err(&svg_path)(e.to_string()))?;
    }
    let (w, h) = (WIDTH * 2, HEIGHT * 2);
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    {
        let area = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        draw(figure, &area, 2.0).map_err(plot_err(&png_path))?;
        area.present()
            .map_err(|e| plot_err(&png_path)(e.to_string()))?;
    }
    if let Some(parent) = stem.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| AnalysisError::Io {
            context: format!("creating {}", parent.display()),
            source,
        })?;
    }
    std::fs::write(&svg_path, svg).map_err(|source| AnalysisError::Io {
        context: format!("writing {}", svg_path.display()),
        source,
    })?;
    write_png(&png_path, w, h, &rgb)?;
    Ok(vec![svg_path, png_path])
}

fn write_png(path: &Path, w: u32, h: u32, rgb: &[u8]) -> Result<(), AnalysisError> {
    let io = |source| AnalysisError::Io {
        context: format!("writing {}", path.display()),
        source,
    };
    let file = std::fs::File::create(path).map_err(io)?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let err = |e: png::EncodingError| AnalysisError::Plot {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut writer = encoder.write_header().map_err(err)?;
    writer.write_image_data(rgb).map_err(err)?;
    writer.finish().map_err(err)
}

fn superscript(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '0' => '⁰',
            '1' => '¹',
            '2' => '²',
            '3' => '³',
            '4' => '⁴',
            '5' => '⁵',
            '6' => '⁶',
            '7' => '⁷',
            '8' => '⁸',
            '9' => '⁹',
            '-' => '⁻',
            other => other,
        })
        .collect()
}

/// `10¹⁵`, `2×10¹⁵`; plain decimals between 0.01 and 10000.
fn tick_label(v: f64) -> String {
    if v <= 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let exp = v.log10().floor() as i32;
    let mantissa = (v / 10f64.powi(exp) * 100.0).round() / 100.0;
    if (-2..4).contains(&exp) {
        let decimals = (-exp).max(0) as usize + usize::from(mantissa.fract() != 0.0);
        return format!("{v:.decimals$}");
    }
    if (mantissa - 1.0).abs() < 1e-9 {
        format!("10{}", superscript(&exp.to_string()))
    } else {
        format!(
            "{}×10{}",
            fmt_sig(mantissa, 2)
                .trim_end_matches('0')
                .trim_end_matches('.'),
            superscript(&exp.to_string())
        )
    }
}

/// Tick positions on a log axis: decades, with 2 and 5 (or every integer multiple) on short ranges.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let decades = hi.log10() - lo.log10();
    let multiples: &[f64] = if decades > 2.5 {
        &[1.0]
    } else if decades > 1.0 {
        &[1.0, 2.0, 5.0]
    } else {
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    };
    let stride = (decades / 7.0).ceil().max(1.0) as i32;
    let (first, last) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let mut ticks = Vec::new();
    for e in first..=last {
        if multiples.len() == 1 && e.rem_euclid(stride) != 0 {
            continue;
        }
        for m in multiples {
            let v = m * 10f64.powi(e);
            if v >= lo * (1.0 - 1e-12) && v <= hi * (1.0 + 1e-12) {
                ticks.push(v);
            }
        }
    }
    if ticks.len() < 2 {
        ticks = vec![lo, (lo * hi).sqrt(), hi];
    }
    ticks
}

/// `(lo, hi)` of positive values padded by `pad` of the log span on each side.
fn log_range(values: impl Iterator<Item = f64>, pad: f64) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
    for v in values.filter(|v| v.is_finite() && *v > 0.0) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return None;
    }
    if hi / lo < 1.0001 {
        return Some((lo / 1.5, hi * 1.5));
    }
    let span = (hi / lo).ln();
    Some((lo * (-pad * span).exp(), hi * (pad * span).exp()))
}

fn lin_range(values: impl Iterator<Item = f64>, pad: f64) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return None;
    }
    let span = if hi - lo > 1e-9 {
        hi - lo
    } else {
        hi.abs().max(1.0) * 0.05
    };
    Some((lo - pad * span, hi + pad * span))
}

#[derive(Clone, Copy)]
enum Marker {
    Circle,
    Triangle,
    Square,
    Diamond,
    Cross,
}

fn marker_of(i: usize) -> Marker {
    [
        Marker::Circle,
        Marker::Square,
        Marker::Triangle,
        Marker::Diamond,
        Marker::Cross,
    ][i % 5]
}

/// A marker centred on the origin of an element's pixel coordinates.
fn marker_points(marker: Marker, r: i32) -> Vec<(i32, i32)> {
    match marker {
        Marker::Circle => (0..24)
            .map(|k| {
                let t = k as f64 / 24.0 * std::f64::consts::TAU;
                (
                    (r as f64 * t.cos()).round() as i32,
                    (r as f64 * t.sin()).round() as i32,
                )
            })
            .collect(),
        Marker::Triangle => vec![(0, -r - 1), (r + 1, r - 1), (-r - 1, r - 1)],
        Marker::Square => vec![
            (-r + 1, -r + 1),
            (r - 1, -r + 1),
            (r - 1, r - 1),
            (-r + 1, r - 1),
        ],
        Marker::Diamond => vec![(0, -r - 1), (r, 0), (0, r + 1), (-r, 0)],
        Marker::Cross => vec![],
    }
}

type Err = String;

fn text_style(size: f64, s: f64) -> TextStyle<'static> {
    (FAMILY, size * s).into_font().color(&BLACK)
}

fn draw<DB: DrawingBackend>(
    figure: &Figure,
    area: &DrawingArea<DB, Shift>,
    s: f64,
) -> Result<(), Err> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    area.fill(&WHITE).map_err(e)?;
    match figure {
        Figure::Scaling {
            title,
            x_label,
            x_symbol,
            series,
        } => draw_scaling(area, s, title, x_label, x_symbol, series),
        Figure::LossCurves { title, curves } => draw_loss_curves(area, s, title, curves),
        Figure::LrSweep { title, series } => draw_lr_sweep(area, s, title, series),
    }
}

/// Draws the marker of series `i` at a pixel position.
fn put_marker<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    at: (i32, i32),
    i: usize,
    s: f64,
) -> Result<(), Err> {
    let r = (6.0 * s).round() as i32;
    let c = color(i);
    let (x, y) = at;
    let shape = marker_of(i);
    let res = match shape {
        Marker::Cross => {
            let w = (2.5 * s).round() as u32;
            area.draw(&PathElement::new(
                vec![(x - r, y - r), (x + r, y + r)],
                c.stroke_width(w),
            ))
            .and_then(|_| {
                area.draw(&PathElement::new(
                    vec![(x - r, y + r), (x + r, y - r)],
                    c.stroke_width(w),
                ))
            })
        }
        Marker::Circle => area.draw(&Circle::new((x, y), r, c.filled())),
        _ => {
            let pts: Vec<(i32, i32)> = marker_points(shape, r)
                .into_iter()
                .map(|(dx, dy)| (x + dx, y + dy))
                .collect();
            area.draw(&Polygon::new(pts, c.filled()))
        }
    };
    res.map_err(|e| e.to_string())
}

struct Frame {
    title: String,
    x_label: String,
    y_label: String,
    y: (f64, f64),
}

/// Decimals that resolve a tick step of `step`.
fn decimals_for(step: f64) -> usize {
    if !(step.is_finite() && step > 0.0) {
        return 2;
    }
    (-(step.log10().floor())).clamp(0.0, 6.0) as usize
}

/// Axes, grid, title; returns the chart for plotting in data coordinates.
macro_rules! chart {
    ($area:expr, $s:expr, $frame:expr, $xspec:expr) => {{
        let s = $s;
        let f = &$frame;
        let mut chart = ChartBuilder::on($area)
            .caption(
                f.title.as_str(),
                (FAMILY, 24.0 * s).into_font().style(FontStyle::Bold),
            )
            .margin((18.0 * s) as i32)
            .x_label_area_size((62.0 * s) as i32)
            .y_label_area_size((82.0 * s) as i32)
            .build_cartesian_2d($xspec, f.y.0..f.y.1)
            .map_err(|e| e.to_string())?;
        let y_decimals = decimals_for((f.y.1 - f.y.0) / 8.0);
        let y_fmt = move |v: &f64| format!("{v:.y_decimals$}");
        let grid = RGBColor(225, 225, 225);
        let light = RGBColor(243, 243, 243);
        chart
            .configure_mesh()
            .x_desc(f.x_label.as_str())
            .y_desc(f.y_label.as_str())
            .axis_desc_style(text_style(20.0, s))
            .label_style(text_style(17.0, s))
            .x_label_formatter(&|v| tick_label(*v))
            .y_label_formatter(&y_fmt)
            .bold_line_style(grid.stroke_width((1.0 * s).round() as u32))
            .light_line_style(light.stroke_width((1.0 * s).round() as u32))
            .axis_style(BLACK.stroke_width((1.2 * s).round() as u32))
            .set_all_tick_mark_size((5.0 * s) as i32)
            .x_labels(10)
            .y_labels(8)
            .x_max_light_lines(0)
            .y_max_light_lines(1)
            .draw()
            .map_err(|e| e.to_string())?;
        chart
    }};
}

/// One legend row: a sample (line and/or marker) and text; `(text, true)` parts are
/// drawn as superscripts.
struct LegendEntry {
    series: usize,
    parts: Vec<(String, bool)>,
    marker: bool,
    line: Line,
}

#[derive(Clone, Copy, PartialEq)]
enum Line {
    None,
    Solid,
    Dashed,
}

impl LegendEntry {
    fn plain(series: usize, text: String, marker: bool, line: Line) -> Self {
        Self {
            series,
            parts: vec![(text, false)],
            marker,
            line,
        }
    }
}

/// A legend box in the corner of the plotting area that covers the fewest drawn points.
fn legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    plot_px: (std::ops::Range<i32>, std::ops::Range<i32>),
    s: f64,
    entries: &[LegendEntry],
    occupied: &[(i32, i32)],
) -> Result<(), Err> {
    if entries.is_empty() {
        return Ok(());
    }
    let style = text_style(16.0, s);
    let sup_style = text_style(11.5, s);
    let width_of = |parts: &[(String, bool)]| -> i32 {
        parts
            .iter()
            .map(|(t, sup)| {
                area.estimate_text_size(t, if *sup { &sup_style } else { &style })
                    .map(|(w, _)| w as i32)
                    .unwrap_or(0)
            })
            .sum()
    };
    let line_h = (26.0 * s) as i32;
    let sample_w = (44.0 * s) as i32;
    let pad = (10.0 * s) as i32;
    let text_w = entries
        .iter()
        .map(|e| width_of(&e.parts))
        .max()
        .unwrap_or(0);
    let w = pad * 3 + sample_w + text_w;
    let h = pad * 2 + line_h * entries.len() as i32;
    let (xr, yr) = plot_px;
    let corners = [
        (xr.end - w - pad, yr.start + pad),
        (xr.start + pad, yr.start + pad),
        (xr.end - w - pad, yr.end - h - pad),
        (xr.start + pad, yr.end - h - pad),
    ];
    let margin = (8.0 * s) as i32;
    let covered = |&(x0, y0): &(i32, i32)| {
        occupied
            .iter()
            .filter(|(x, y)| {
                *x >= x0 - margin
                    && *x <= x0 + w + margin
                    && *y >= y0 - margin
                    && *y <= y0 + h + margin
            })
            .count()
    };
    let (x0, y0) = corners
        .iter()
        .min_by_key(|c| covered(c))
        .copied()
        .unwrap_or(corners[0]);
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    area.draw(&Rectangle::new(
        [(x0, y0), (x0 + w, y0 + h)],
        WHITE.mix(0.92).filled(),
    ))
    .map_err(err)?;
    area.draw(&Rectangle::new(
        [(x0, y0), (x0 + w, y0 + h)],
        RGBColor(170, 170, 170).stroke_width(s.round() as u32),
    ))
    .map_err(err)?;
    let left_center = plotters::style::text_anchor::Pos::new(
        plotters::style::text_anchor::HPos::Left,
        plotters::style::text_anchor::VPos::Center,
    );
    for (row, entry) in entries.iter().enumerate() {
        let cy = y0 + pad + line_h * row as i32 + line_h / 2;
        let (sx0, sx1) = (x0 + pad, x0 + pad + sample_w);
        let stroke = color(entry.series).stroke_width((2.2 * s).round() as u32);
        match entry.line {
            Line::Dashed => {
                let dash = (7.0 * s) as i32;
                let mut x = sx0;
                while x < sx1 {
                    area.draw(&PathElement::new(
                        vec![(x, cy), ((x + dash).min(sx1), cy)],
                        stroke,
                    ))
                    .map_err(err)?;
                    x += dash * 2;
                }
            }
            Line::Solid => {
                area.draw(&PathElement::new(vec![(sx0, cy), (sx1, cy)], stroke))
                    .map_err(err)?;
            }
            Line::None => {}
        }
        if entry.marker {
            put_marker(area, ((sx0 + sx1) / 2, cy), entry.series, s)?;
        }
        let mut x = sx1 + pad;
        for (text, sup) in &entry.parts {
            let (st, y) = if *sup {
                (&sup_style, cy - (6.0 * s) as i32)
            } else {
                (&style, cy)
            };
            area.draw(&Text::new(text.clone(), (x, y), st.pos(left_center)))
                .map_err(err)?;
            x += area
                .estimate_text_size(text, st)
                .map(|(w, _)| w as i32)
                .unwrap_or(0);
        }
    }
    Ok(())
}

/// `label: A·x^−b + C` with the exponent raised.
fn law_parts(label: &str, law: &PowerLaw, symbol: &str) -> Vec<(String, bool)> {
    vec![
        (format!("{label}: {}·{symbol}", fmt_sig(law.a, 3)), false),
        (format!("−{}", fmt_sig(law.b, 3)), true),
        (format!(" + {}", fmt_sig(law.c, 3)), false),
    ]
}

fn geometric(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| (lo.ln() + (hi.ln() - lo.ln()) * i as f64 / (n - 1) as f64).exp())
        .collect()
}

fn draw_scaling<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    s: f64,
    title: &str,
    x_label: &str,
    x_symbol: &str,
    series: &[ScalingSeries],
) -> Result<(), Err> {
    let (x_lo, x_hi) = log_range(
        series.iter().flat_map(|g| g.points.iter().map(|p| p.0)),
        0.06,
    )
    .ok_or("no points to plot")?;
    // As ArchScale: each fitted curve on 100 geometric points over its own group's data.
    let curves: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(
            |g| match (g.law, log_range(g.points.iter().map(|p| p.0), 0.0)) {
                (Some(law), Some((lo, hi))) => geometric(lo, hi, 100)
                    .into_iter()
                    .map(|x| (x, law.eval(x)))
                    .collect(),
                _ => Vec::new(),
            },
        )
        .collect();
    let y = lin_range(
        series
            .iter()
            .flat_map(|g| g.points.iter().map(|p| p.1))
            .chain(curves.iter().flatten().map(|p| p.1)),
        0.08,
    )
    .ok_or("no points to plot")?;
    let frame = Frame {
        title: title.to_string(),
        x_label: x_label.to_string(),
        y_label: "Validation loss".to_string(),
        y,
    };
    let ticks = log_ticks(x_lo, x_hi);
    let mut chart = chart!(
        area,
        s,
        frame,
        (x_lo..x_hi).log_scale().with_key_points(ticks)
    );
    let drawn_lines: Vec<Vec<(f64, f64)>> = curves.clone();
    for (i, curve) in curves.iter().enumerate() {
        if !curve.is_empty() {
            chart
                .draw_series(DashedLineSeries::new(
                    curve.iter().cloned(),
                    (9.0 * s) as i32,
                    (6.0 * s) as i32,
                    color(i).stroke_width((2.2 * s).round() as u32),
                ))
                .map_err(|e| e.to_string())?;
        }
    }
    let plot = chart.plotting_area();
    let (xr, yr) = plot.get_pixel_range();
    let base = area.get_base_pixel();
    let mut occupied: Vec<(i32, i32)> = Vec::new();
    for (i, g) in series.iter().enumerate() {
        for p in &g.points {
            let (px, py) = plot.map_coordinate(p);
            put_marker(area, (px - base.0, py - base.1), i, s)?;
            occupied.push((px - base.0, py - base.1));
        }
    }
    for pts in &drawn_lines {
        occupied.extend(pts.iter().map(|p| {
            let (px, py) = plot.map_coordinate(p);
            (px - base.0, py - base.1)
        }));
    }
    let entries: Vec<LegendEntry> = series
        .iter()
        .enumerate()
        .map(|(i, g)| match &g.law {
            Some(law) => LegendEntry {
                series: i,
                parts: law_parts(&g.label, law, x_symbol),
                marker: true,
                line: Line::Dashed,
            },
            None => LegendEntry::plain(i, format!("{} (no fit)", g.label), true, Line::None),
        })
        .collect();
    legend(
        area,
        (
            xr.start - base.0..xr.end - base.0,
            yr.start - base.1..yr.end - base.1,
        ),
        s,
        &entries,
        &occupied,
    )
}

fn draw_loss_curves<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    s: f64,
    title: &str,
    curves: &[LossCurve],
) -> Result<(), Err> {
    let xs = curves
        .iter()
        .flat_map(|c| c.train.iter().chain(&c.val).map(|p| p.0));
    let (x_lo, x_hi) = log_range(xs, 0.03).ok_or("no logged points to plot")?;
    let ys = curves
        .iter()
        .flat_map(|c| c.train.iter().chain(&c.val).map(|p| p.1));
    let y = lin_range(ys, 0.05).ok_or("no logged points to plot")?;
    let frame = Frame {
        title: title.to_string(),
        x_label: "Training tokens".to_string(),
        y_label: "Loss (lines: train, markers: validation)".to_string(),
        y,
    };
    let ticks = log_ticks(x_lo, x_hi);
    let mut chart = chart!(
        area,
        s,
        frame,
        (x_lo..x_hi).log_scale().with_key_points(ticks)
    );
    for (i, c) in curves.iter().enumerate() {
        let pts: Vec<(f64, f64)> = c.train.iter().cloned().filter(|p| p.0 > 0.0).collect();
        chart
            .draw_series(LineSeries::new(
                pts,
                color(i).mix(0.85).stroke_width((1.8 * s).round() as u32),
            ))
            .map_err(|e| e.to_string())?;
    }
    let plot = chart.plotting_area();
    let (xr, yr) = plot.get_pixel_range();
    let base = area.get_base_pixel();
    let mut occupied: Vec<(i32, i32)> = Vec::new();
    for (i, c) in curves.iter().enumerate() {
        for p in c.val.iter().filter(|p| p.0 > 0.0) {
            let (px, py) = plot.map_coordinate(p);
            put_marker(area, (px - base.0, py - base.1), i, s)?;
            occupied.push((px - base.0, py - base.1));
        }
        for p in c.train.iter().filter(|p| p.0 > 0.0) {
            let (px, py) = plot.map_coordinate(p);
            occupied.push((px - base.0, py - base.1));
        }
    }
    let entries: Vec<LegendEntry> = curves
        .iter()
        .enumerate()
        .map(|(i, c)| LegendEntry::plain(i, c.label.clone(), !c.val.is_empty(), Line::Solid))
        .collect();
    legend(
        area,
        (
            xr.start - base.0..xr.end - base.0,
            yr.start - base.1..yr.end - base.1,
        ),
        s,
        &entries,
        &occupied,
    )
}

fn draw_lr_sweep<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    s: f64,
    title: &str,
    series: &[ScalingSeries],
) -> Result<(), Err> {
    let (x_lo, x_hi) = log_range(
        series.iter().flat_map(|g| g.points.iter().map(|p| p.0)),
        0.08,
    )
    .ok_or("no points to plot")?;
    let y = lin_range(
        series.iter().flat_map(|g| g.points.iter().map(|p| p.1)),
        0.1,
    )
    .ok_or("no points to plot")?;
    let frame = Frame {
        title: title.to_string(),
        x_label: "Peak learning rate".to_string(),
        y_label: "Final validation loss".to_string(),
        y,
    };
    let ticks = log_ticks(x_lo, x_hi);
    let mut chart = chart!(
        area,
        s,
        frame,
        (x_lo..x_hi).log_scale().with_key_points(ticks)
    );
    let drawn_lines: Vec<Vec<(f64, f64)>> = series.iter().map(|g| g.points.clone()).collect();
    for (i, g) in series.iter().enumerate() {
        let mut pts = g.points.clone();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(
                pts,
                color(i).stroke_width((2.0 * s).round() as u32),
            ))
            .map_err(|e| e.to_string())?;
    }
    let plot = chart.plotting_area();
    let (xr, yr) = plot.get_pixel_range();
    let base = area.get_base_pixel();
    let mut occupied: Vec<(i32, i32)> = Vec::new();
    for (i, g) in series.iter().enumerate() {
        for p in &g.points {
            let (px, py) = plot.map_coordinate(p);
            put_marker(area, (px - base.0, py - base.1), i, s)?;
            occupied.push((px - base.0, py - base.1));
        }
    }
    for pts in &drawn_lines {
        occupied.extend(pts.iter().map(|p| {
            let (px, py) = plot.map_coordinate(p);
            (px - base.0, py - base.1)
        }));
    }
    let entries: Vec<LegendEntry> = series
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let best = g.points.iter().min_by(|a, b| a.1.total_cmp(&b.1));
            let text = match best {
                Some(b) => format!("{} (best lr {})", g.label, crate::runs::fmt_lr(b.0)),
                None => g.label.clone(),
            };
            LegendEntry::plain(i, text, true, Line::Solid)
        })
        .collect();
    legend(
        area,
        (
            xr.start - base.0..xr.end - base.0,
            yr.start - base.1..yr.end - base.1,
        ),
        s,
        &entries,
        &occupied,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_are_readable() {
        assert_eq!(tick_label(1e15), "10¹⁵");
        assert_eq!(tick_label(2e15), "2×10¹⁵");
        assert_eq!(tick_label(1e-3), "10⁻³");
        assert_eq!(tick_label(0.05), "0.05");
        assert_eq!(tick_label(200.0), "200");
    }

    #[test]
    fn log_ticks_stay_in_range_and_are_few() {
        let t = log_ticks(3e14, 7e19);
        assert!(t.iter().all(|v| *v >= 3e14 && *v <= 7e19));
        assert!(t.len() >= 2 && t.len() <= 8, "{t:?}");
        let t = log_ticks(1.5e6, 9e6);
        assert!(t.contains(&2e6) && t.contains(&5e6), "{t:?}");
    }

    #[test]
    fn figures_render_to_non_empty_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let law = PowerLaw {
            a: 40.0,
            b: 0.1,
            c: 1.5,
        };
        let pts: Vec<(f64, f64)> = [1e15, 4e15, 2e16, 1e17]
            .iter()
            .map(|&x| (x, law.eval(x)))
            .collect();
        let fig = Figure::Scaling {
            title: "Scaling".into(),
            x_label: "Training FLOPs".into(),
            x_symbol: "C".into(),
            series: vec![
                ScalingSeries {
                    label: "transformer".into(),
                    points: pts.clone(),
                    law: Some(law),
                },
                ScalingSeries {
                    label: "sambay".into(),
                    points: pts.iter().map(|p| (p.0, p.1 - 0.02)).collect(),
                    law: None,
                },
            ],
        };
        let paths = save(&fig, &dir.path().join("scaling")).unwrap();
        let svg = std::fs::read_to_string(&paths[0]).unwrap();
        assert!(
            svg.contains("<svg") && svg.contains("transformer"),
            "svg lacks text"
        );
        let png = std::fs::read(&paths[1]).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        // The bitmap must contain dark text pixels and coloured markers, not just a white page.
        let decoder = png::Decoder::new(std::io::Cursor::new(png));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        let dark = buf
            .chunks(3)
            .filter(|p| p[0] < 60 && p[1] < 60 && p[2] < 60)
            .count();
        let blue = buf
            .chunks(3)
            .filter(|p| p[0] < 20 && p[1] > 100 && p[1] < 130 && p[2] > 160)
            .count();
        assert!(dark > 2000, "{dark} dark pixels");
        assert!(blue > 200, "{blue} blue pixels");
    }
}

//! PNG plots of a run: the loss and the held-out accuracy by step (from
//! `metrics.jsonl`), and the confusion matrix of an evaluation.
//!
//! Text is drawn with DejaVu Sans (Debian's `fonts-dejavu-core`): the
//! `fonts` asset, else the system's copy; without either, plotting fails
//! with a message saying so, and the trainer carries on without plots.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

use crate::{Error, Result};

const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let asset = crate::io::assets::home().join("fonts/DejaVuSans.ttf");
            let bytes = std::fs::read(&asset)
                .ok()
                .or_else(|| FONT_PATHS.iter().find_map(|p| std::fs::read(p).ok()))
                .ok_or_else(|| {
                    format!(
                        "no DejaVuSans.ttf in {} or {}; run scripts/fetch-assets.sh --only fonts",
                        asset.display(),
                        FONT_PATHS.join(", ")
                    )
                })?;
            // The font lives as long as the process: plotters keeps a reference.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| "DejaVuSans.ttf is not a usable font".to_string())
        })
        .clone()
        .map_err(Error::Invalid)
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("plotting {}: {e}", path.display()))
}

/// A line plot of `series` (name, points) into a PNG at `path`.
pub fn line_plot(
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<()> {
    font()?;
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Err(plot_err(path, "nothing to plot"));
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
        .map_err(|e| plot_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(|e| plot_err(path, e))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))?;
    Ok(())
}

/// `loss.png` (the loss of every step and its moving average) and, when the
/// run evaluated, `accuracy.png`, from `dir/metrics.jsonl`.
pub fn plot_metrics(dir: &Path) -> Result<()> {
    let path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let (mut loss, mut acc) = (Vec::new(), Vec::new());
    let mut kinds: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
    // A resumed run appends the steps after its checkpoint again: the last
    // record of each step wins.
    let mut by_step = std::collections::BTreeMap::new();
    for line in text.lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            by_step.insert(v["step"].as_u64().unwrap_or(0), v);
        }
    }
    for v in by_step.values() {
        let step = v["step"].as_f64().unwrap_or(0.0);
        if let Some(l) = v["loss"].as_f64() {
            loss.push((step, l));
        }
        if let Some(a) = v["eval"]["held_out_accuracy"].as_f64() {
            acc.push((step, 100.0 * a));
        }
        if let Some(per) = v["eval"]["per_kind"].as_object() {
            for (k, a) in per {
                if let Some(a) = a.as_f64() {
                    kinds.entry(k.clone()).or_default().push((step, 100.0 * a));
                }
            }
        }
    }
    let window = (loss.len() / 50).max(1);
    let smooth: Vec<(f64, f64)> = loss
        .iter()
        .enumerate()
        .map(|(i, &(s, _))| {
            let lo = i.saturating_sub(window - 1);
            let w = &loss[lo..=i];
            (s, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64)
        })
        .collect();
    line_plot(
        &dir.join("loss.png"),
        "training loss",
        "cross-entropy of the answer tokens",
        &[("step", loss), (&format!("mean of {window}"), smooth)],
    )?;
    if !acc.is_empty() {
        let mut series = vec![("all held-out questions", acc)];
        series.extend(kinds.iter().map(|(k, v)| (k.as_str(), v.clone())));
        line_plot(
            &dir.join("accuracy.png"),
            "held-out exact match",
            "accuracy (%)",
            &series,
        )?;
    }
    Ok(())
}

/// A confusion matrix as a PNG heat map: row = the true answer, column =
/// the model's, each cell's count written in it and coloured by its share
/// of the row.
pub fn confusion_matrix(path: &Path, labels: &[String], counts: &[Vec<usize>]) -> Result<()> {
    font()?;
    let n = labels.len();
    if n == 0 || counts.len() != n || counts.iter().any(|r| r.len() != n) {
        return Err(plot_err(
            path,
            "the matrix must be square with one label per row",
        ));
    }
    let cell = 52i32;
    let (left, top) = (110i32, 70i32);
    let side = left + cell * n as i32 + 20;
    let root = BitMapBackend::new(path, (side as u32, (top + cell * n as i32 + 110) as u32))
        .into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let centred = |size: i32| {
        ("sans-serif", size)
            .into_font()
            .color(&BLACK)
            .pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Center,
            ))
    };
    root.draw(&Text::new(
        "confusion matrix (rows: true answer, columns: predicted)",
        (side / 2, 20),
        centred(16),
    ))
    .map_err(|e| plot_err(path, e))?;
    for (i, row) in counts.iter().enumerate() {
        let total = row.iter().sum::<usize>().max(1) as f64;
        for (j, &c) in row.iter().enumerate() {
            let share = c as f64 / total;
            let (x, y) = (left + cell * j as i32, top + cell * i as i32);
            let shade = (255.0 * (1.0 - share)) as u8;
            let color = if i == j {
                RGBColor(shade, 255, shade)
            } else {
                RGBColor(255, shade, shade)
            };
            root.draw(&Rectangle::new(
                [(x, y), (x + cell, y + cell)],
                color.filled(),
            ))
            .map_err(|e| plot_err(path, e))?;
            root.draw(&Rectangle::new(
                [(x, y), (x + cell, y + cell)],
                BLACK.mix(0.2),
            ))
            .map_err(|e| plot_err(path, e))?;
            if c > 0 {
                root.draw(&Text::new(
                    c.to_string(),
                    (x + cell / 2, y + cell / 2),
                    centred(12),
                ))
                .map_err(|e| plot_err(path, e))?;
            }
        }
        let label = &labels[i];
        root.draw(&Text::new(
            label.clone(),
            (left / 2, top + cell * i as i32 + cell / 2),
            centred(13),
        ))
        .map_err(|e| plot_err(path, e))?;
        root.draw(&Text::new(
            label.clone(),
            (
                left + cell * i as i32 + cell / 2,
                top + cell * n as i32 + 14,
            ),
            ("sans-serif", 13)
                .into_font()
                .color(&BLACK)
                .transform(FontTransform::Rotate90)
                .pos(plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Left,
                    plotters::style::text_anchor::VPos::Center,
                )),
        ))
        .map_err(|e| plot_err(path, e))?;
    }
    root.present().map_err(|e| plot_err(path, e))?;
    Ok(())
}

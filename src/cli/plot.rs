//! A small PNG line chart for training curves: axes, ticks, labels (DejaVu Sans, embedded) and
//! one series per panel.

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use barlow::train::run::RunFiles;
use barlow::Error;
use std::path::Path;

const FONT: &[u8] = include_bytes!("../../data/DejaVuSans.ttf");

/// One panel: a title, axis labels and (x, y) points.
pub struct Panel<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub points: &'a [(f64, f64)],
    pub color: [u8; 3],
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn blend(&mut self, x: i64, y: i64, c: [u8; 3], a: f32) {
        if x < 0 || y < 0 || x >= self.w as i64 || y >= self.h as i64 {
            return;
        }
        let i = (y as usize * self.w + x as usize) * 3;
        for (p, &target) in self.px[i..i + 3].iter_mut().zip(&c) {
            let old = f32::from(*p);
            *p = (old + (f32::from(target) - old) * a.clamp(0.0, 1.0)).round() as u8;
        }
    }

    fn line(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, c: [u8; 3], width: f64) {
        let len = ((x1 - x0).powi(2) + (y1 - y0).powi(2)).sqrt().max(1.0);
        let steps = (len * 2.0) as usize + 1;
        let r = width / 2.0;
        for s in 0..=steps {
            let t = s as f64 / steps as f64;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            for dy in -(r.ceil() as i64)..=(r.ceil() as i64) {
                for dx in -(r.ceil() as i64)..=(r.ceil() as i64) {
                    let (px, py) = (x.round() as i64 + dx, y.round() as i64 + dy);
                    let d = ((px as f64 - x).powi(2) + (py as f64 - y).powi(2)).sqrt();
                    if d <= r + 0.5 {
                        self.blend(px, py, c, (r + 0.5 - d).min(1.0) as f32);
                    }
                }
            }
        }
    }

    /// Draws `text` with its left end at x (or centred, or right-aligned) and baseline at y.
    fn text(&mut self, font: &FontRef<'_>, s: &str, x: f64, y: f64, size: f32, align: f64) {
        let scaled = font.as_scaled(PxScale::from(size));
        let width: f32 = s
            .chars()
            .map(|ch| scaled.h_advance(font.glyph_id(ch)))
            .sum();
        let mut pen = x as f32 - width * align as f32;
        for ch in s.chars() {
            let id = font.glyph_id(ch);
            let g = id.with_scale_and_position(PxScale::from(size), ab_glyph::point(pen, y as f32));
            pen += scaled.h_advance(id);
            if let Some(o) = font.outline_glyph(g) {
                let b = o.px_bounds();
                o.draw(|gx, gy, cov| {
                    self.blend(
                        b.min.x as i64 + gx as i64,
                        b.min.y as i64 + gy as i64,
                        [30, 30, 30],
                        cov,
                    )
                });
            }
        }
    }
}

fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= n as f64)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + 1e-9 * span {
        out.push(t);
        t += step;
    }
    out
}

fn label(v: f64) -> String {
    if v.abs() >= 1000.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Renders the panels side by side into a PNG at `path` (written atomically).
pub fn save_png(path: &Path, panels: &[Panel<'_>]) -> std::io::Result<()> {
    let (pw, ph) = (520usize, 380usize);
    let mut cv = Canvas {
        w: pw * panels.len().max(1),
        h: ph,
        px: vec![255; pw * panels.len().max(1) * ph * 3],
    };
    let font = FontRef::try_from_slice(FONT).map_err(|e| std::io::Error::other(e.to_string()))?;
    for (k, p) in panels.iter().enumerate() {
        let ox = (k * pw) as f64;
        let (l, r, t, b) = (ox + 70.0, ox + pw as f64 - 20.0, 40.0, ph as f64 - 55.0);
        cv.text(&font, p.title, (l + r) / 2.0, 25.0, 18.0, 0.5);
        cv.text(&font, p.x_label, (l + r) / 2.0, ph as f64 - 12.0, 14.0, 0.5);
        let pts: Vec<(f64, f64)> = p
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        if pts.is_empty() {
            cv.text(&font, "no data", (l + r) / 2.0, (t + b) / 2.0, 14.0, 0.5);
            continue;
        }
        let (mut x0, mut x1) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
        let (mut y0, mut y1) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        if x1 - x0 < 1e-12 {
            x0 -= 1.0;
            x1 += 1.0;
        }
        let pad = ((y1 - y0) * 0.05).max(1e-6 * y1.abs()).max(1e-9);
        y0 -= pad;
        y1 += pad;
        let sx = |x: f64| l + (x - x0) / (x1 - x0) * (r - l);
        let sy = |y: f64| b - (y - y0) / (y1 - y0) * (b - t);
        let grid = [225, 225, 225];
        for ty in nice_ticks(y0, y1, 5) {
            cv.line(l, sy(ty), r, sy(ty), grid, 1.0);
            cv.text(&font, &label(ty), l - 6.0, sy(ty) + 4.0, 12.0, 1.0);
        }
        for tx in nice_ticks(x0, x1, 5) {
            cv.line(sx(tx), b, sx(tx), b + 5.0, [60, 60, 60], 1.0);
            cv.text(&font, &label(tx), sx(tx), b + 20.0, 12.0, 0.5);
        }
        cv.line(l, b, r, b, [60, 60, 60], 1.0);
        cv.line(l, t, l, b, [60, 60, 60], 1.0);
        for w in pts.windows(2) {
            cv.line(sx(w[0].0), sy(w[0].1), sx(w[1].0), sy(w[1].1), p.color, 2.0);
        }
        if pts.len() < 30 {
            for &(x, y) in &pts {
                cv.line(sx(x), sy(y), sx(x), sy(y), p.color, 6.0);
            }
        }
    }
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(
            &cv.px,
            cv.w as u32,
            cv.h as u32,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    barlow::io::write_atomic(path, &png)
}

use image::ImageEncoder;

/// Draws loss and kNN curves from the run's metrics into its PNG.
pub(crate) fn plot_metrics(files: &RunFiles) -> barlow::Result<()> {
    let text = std::fs::read_to_string(files.metrics()).unwrap_or_default();
    let mut loss = Vec::new();
    let mut knn = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        match v["event"].as_str() {
            Some("step") => loss.push((
                v["step"].as_f64().unwrap_or(0.0),
                v["loss"].as_f64().unwrap_or(f64::NAN),
            )),
            Some("knn") => knn.push((
                v["epoch"].as_f64().unwrap_or(0.0),
                100.0 * v["top1"].as_f64().unwrap_or(f64::NAN),
            )),
            _ => {}
        }
    }
    save_png(
        &files.plot(),
        &[
            Panel {
                title: "Barlow Twins loss",
                x_label: "step",
                points: &loss,
                color: [31, 119, 180],
            },
            Panel {
                title: "kNN top-1 (%)",
                x_label: "epoch",
                points: &knn,
                color: [214, 39, 40],
            },
        ],
    )
    .map_err(|e| Error::io(files.plot(), e))
}

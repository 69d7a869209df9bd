//! Loss curves as SVG, drawn with `plotters` (SVG backend). Text is laid out with the bundled
//! DejaVu Sans (registered as plotters' `sans-serif`), so no system font is needed; the SVG
//! itself names `sans-serif` and the viewer draws it with its own.

use std::sync::Once;

use plotters::prelude::*;

/// One training loss curve.
#[derive(Debug, Clone)]
pub struct Curve<'a> {
    /// Legend label.
    pub label: &'a str,
    /// Loss per step (step 1 first).
    pub loss: &'a [f32],
    /// Validation losses on held-out images, as (step, loss); drawn dashed with markers.
    pub validation: &'a [(u64, f32)],
}

/// Colour-blind-safe line colours (Okabe–Ito), cycled.
const COLORS: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(120, 120, 120),
];

/// Bias-corrected exponential moving average with span `n / 8` (at least 1): readable curves
/// from noisy per-step losses (each step sees other timesteps and noise), without the lag of an
/// uncorrected start.
pub fn smooth(values: &[f32]) -> Vec<f32> {
    let span = (values.len() as f64 / 8.0).max(1.0);
    let alpha = 2.0 / (span + 1.0);
    let mut avg = 0.0f64;
    let mut weight = 0.0f64;
    values
        .iter()
        .map(|&v| {
            avg = (1.0 - alpha) * avg + alpha * v as f64;
            weight = (1.0 - alpha) * weight + alpha;
            (avg / weight) as f32
        })
        .collect()
}

/// The `q` quantile (0..1) of the finite values (nearest rank).
fn quantile(values: &mut [f32], q: f64) -> Option<f32> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let i = ((values.len() - 1) as f64 * q).round() as usize;
    Some(values[i])
}

fn register_font() -> Result<(), String> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            crate::render::font::DEJAVU_SANS,
        )
        .map_err(|_| "the bundled DejaVuSans.ttf could not be registered".to_string());
    });
    result
}

/// All `curves` on one plot: raw losses faint, smoothed losses bold, one legend entry per
/// curve. `width`×`height` pixels (the SVG's viewBox).
pub fn loss_plot(
    curves: &[Curve<'_>],
    title: &str,
    width: u32,
    height: u32,
) -> Result<String, String> {
    register_font()?;
    let err = |e: &dyn std::fmt::Display| format!("drawing the loss plot: {e}");
    let steps = curves
        .iter()
        .map(|c| c.loss.len())
        .max()
        .unwrap_or(0)
        .max(2);
    let mut finite: Vec<f32> = curves
        .iter()
        .flat_map(|c| {
            c.loss
                .iter()
                .copied()
                .chain(c.validation.iter().map(|(_, v)| *v))
        })
        .filter(|v| v.is_finite())
        .collect();
    let lo = finite.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = quantile(&mut finite, 0.99).unwrap_or(1.0);
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo as f64, hi as f64)
    } else if lo.is_finite() {
        (lo as f64 - 0.5, lo as f64 + 0.5)
    } else {
        (0.0, 1.0)
    };
    let pad = (hi - lo) * 0.05;
    // losses are not negative: the axis starts at 0 at the lowest
    let y0 = if lo >= 0.0 {
        (lo - pad).max(0.0)
    } else {
        lo - pad
    };
    let y1 = hi + pad;
    let clamp = |v: f32| (v as f64).clamp(y0, y1);
    // enough decimals to tell the labels apart (range 0.8 → 2, 0.02 → 3)
    let decimals = ((-(y1 - y0).log10()).floor() as i32 + 2).clamp(0, 6) as usize;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(1f64..steps as f64, y0..y1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("training loss")
            .label_style(("sans-serif", 12))
            .axis_desc_style(("sans-serif", 13))
            .max_light_lines(0)
            .bold_line_style(RGBColor(225, 225, 225))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.decimals$}"))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, curve) in curves.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let points = |values: &[f32]| -> Vec<(f64, f64)> {
                values
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(s, &v)| ((s + 1) as f64, clamp(v)))
                    .collect()
            };
            chart
                .draw_series(LineSeries::new(
                    points(curve.loss),
                    color.mix(0.25).stroke_width(1),
                ))
                .map_err(|e| err(&e))?;
            chart
                .draw_series(LineSeries::new(
                    points(&smooth(curve.loss)),
                    color.stroke_width(2),
                ))
                .map_err(|e| err(&e))?
                .label(curve.label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            if !curve.validation.is_empty() {
                let points: Vec<(f64, f64)> = curve
                    .validation
                    .iter()
                    .filter(|(_, v)| v.is_finite())
                    .map(|&(s, v)| ((s as f64).max(1.0), clamp(v)))
                    .collect();
                chart
                    .draw_series(DashedLineSeries::new(
                        points.clone(),
                        6,
                        4,
                        color.stroke_width(2),
                    ))
                    .map_err(|e| err(&e))?
                    .label(format!("{} (validation)", curve.label))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.mix(0.6).stroke_width(2))
                    });
                chart
                    .draw_series(
                        points
                            .into_iter()
                            .map(|p| Circle::new(p, 3, color.filled())),
                    )
                    .map_err(|e| err(&e))?;
            }
        }
        if !curves.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .label_font(("sans-serif", 12))
                .draw()
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

/// The SVG without its XML namespace declaration, for inlining into HTML (where the `<svg>`
/// element needs none), so the page holds no URL at all.
pub fn for_inline_html(svg: &str) -> String {
    let svg = svg.replace(" xmlns=\"http://www.w3.org/2000/svg\"", "");
    let svg = svg.replace(" xmlns:xlink=\"http://www.w3.org/1999/xlink\"", "");
    match svg.find("<svg") {
        Some(start) => svg[start..].to_string(),
        None => svg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_keeps_constants_and_damps_noise() {
        assert!(smooth(&[2.0; 50]).iter().all(|v| (v - 2.0).abs() < 1e-6));
        let noisy: Vec<f32> = (0..200)
            .map(|i| if i % 2 == 0 { 1.0 } else { 0.0 })
            .collect();
        let s = smooth(&noisy);
        assert_eq!(s.len(), 200);
        assert_eq!(
            s[0], 1.0,
            "bias correction: the first value is the first sample"
        );
        assert!(
            s[100..].iter().all(|v| (v - 0.5).abs() < 0.15),
            "{:?}",
            &s[100..110]
        );
    }

    #[test]
    fn plot_has_a_curve_and_legend_per_method() {
        let a: Vec<f32> = (0..60).map(|i| 1.0 / (1.0 + i as f32)).collect();
        let b: Vec<f32> = (0..40).map(|i| 0.5 + 0.01 * (i % 3) as f32).collect();
        let svg = loss_plot(
            &[
                Curve {
                    label: "lora",
                    loss: &a,
                    validation: &[(0, 1.2), (30, 0.4), (60, 0.3)],
                },
                Curve {
                    label: "dreambooth",
                    loss: &b,
                    validation: &[],
                },
            ],
            "Training loss",
            640,
            360,
        )
        .unwrap();
        assert!(svg.starts_with("<svg") || svg.contains("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        // two polylines per curve (raw + smoothed) plus the legend samples
        assert!(svg.matches("<polyline").count() >= 4, "{svg}");
        let texts: Vec<&str> = svg
            .split("</text>")
            .filter_map(|s| s.rsplit('>').next())
            .map(str::trim)
            .collect();
        // the validation points: dashed, with a marker each and a legend entry
        assert_eq!(svg.matches("<circle").count(), 3, "{svg}");
        for label in [
            "lora",
            "lora (validation)",
            "dreambooth",
            "training loss",
            "step",
            "Training loss",
        ] {
            assert!(texts.contains(&label), "no text {label:?} in {texts:?}");
        }
        let inline = for_inline_html(&svg);
        assert!(!inline.contains("http"));
        assert!(inline.starts_with("<svg"));
    }
}

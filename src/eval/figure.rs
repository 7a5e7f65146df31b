//! The evaluation figure: ROC curves (all defects and each kind) beside the histograms of
//! good and defective image scores with the threshold marked. PNG via plotters, drawn
//! into a buffer and encoded by `image`; the font ships inside the binary (DejaVu Sans,
//! see fonts/DejaVuSans-LICENSE.txt) so a bare machine or container can draw text.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use super::compare::Comparison;
use super::metrics::roc_curve;
use super::EvalReport;

const FONT: &[u8] = include_bytes!("fonts/DejaVuSans.ttf");
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is compiled in; failing to parse it is a build defect.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

pub fn render(report: &EvalReport, path: &Path) -> anyhow::Result<()> {
    save((1300, 520), path, |buf, size| draw(report, buf, size))
}

/// `vigil eval --compare`: one panel per model, its ROC curves (all defects and each kind).
pub fn render_comparison(comparison: &Comparison, path: &Path) -> anyhow::Result<()> {
    let panels = comparison.models.len().max(1) as u32;
    save((460 * panels, 480), path, |buf, size| {
        let root = BitMapBackend::with_buffer(buf, size).into_drawing_area();
        root.fill(&WHITE)?;
        let names = short_names(
            &comparison
                .models
                .iter()
                .map(|m| m.report.model.as_str())
                .collect::<Vec<_>>(),
        );
        for ((area, m), name) in root
            .split_evenly((1, panels as usize))
            .iter()
            .zip(&comparison.models)
            .zip(names)
        {
            let title = format!("{name} ({})", m.architecture);
            draw_roc(area, &m.report, &title)?;
        }
        root.present()?;
        Ok(())
    })
}

/// Each model's path shortened to its last components, as few as tell the models apart
/// (model folders are named for what they hold, but `seed42/brushed` and `seed7/brushed`
/// share their last one).
fn short_names(models: &[&str]) -> Vec<String> {
    let parts: Vec<Vec<&str>> = models
        .iter()
        .map(|m| m.trim_end_matches('/').split('/').filter(|p| !p.is_empty()).collect())
        .collect();
    let most = parts.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let tail = |p: &[&str], n: usize| p[p.len().saturating_sub(n)..].join("/");
    let n = (1..=most)
        .find(|&n| {
            let names: std::collections::HashSet<String> = parts.iter().map(|p| tail(p, n)).collect();
            names.len() == parts.len()
        })
        .unwrap_or(most);
    parts.iter().map(|p| tail(p, n)).collect()
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// Draws into an RGB buffer of `size` and writes it as PNG.
fn save(size: (u32, u32), path: &Path, draw: impl FnOnce(&mut [u8], (u32, u32)) -> DrawResult) -> anyhow::Result<()> {
    register_font();
    let (w, h) = size;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    draw(&mut buf, size).map_err(|e| anyhow::anyhow!("drawing the figure: {e}"))?;
    image::RgbImage::from_raw(w, h, buf)
        .expect("buffer matches its size")
        .save(path)?;
    Ok(())
}

fn draw(report: &EvalReport, buf: &mut [u8], size: (u32, u32)) -> DrawResult {
    let root = BitMapBackend::with_buffer(buf, size).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(560);
    draw_roc(&left, report, "Image ROC")?;

    // Histograms over a shared range that includes the threshold.
    let lo = report.images.iter().map(|i| i.score).fold(report.threshold, f32::min) as f64;
    let hi = report.images.iter().map(|i| i.score).fold(report.threshold, f32::max) as f64;
    let bins = 30usize;
    let width = ((hi - lo) / bins as f64).max(1e-9);
    let count = |good: bool| {
        let mut c = vec![0u32; bins];
        for i in &report.images {
            if (i.category == "good") == good {
                c[(((i.score as f64 - lo) / width) as usize).min(bins - 1)] += 1;
            }
        }
        c
    };
    let (good, bad) = (count(true), count(false));
    let top = good.iter().chain(&bad).copied().max().unwrap_or(1) as f64 * 1.1;
    let mut hist = ChartBuilder::on(&right)
        .caption("Image scores", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(lo..hi + width, 0f64..top)?;
    hist.configure_mesh().x_desc("score").y_desc("images").draw()?;
    for (counts, colour, name) in [
        (&good, RGBColor(44, 160, 44), "good"),
        (&bad, RGBColor(214, 39, 40), "defective"),
    ] {
        hist.draw_series(counts.iter().enumerate().map(|(i, &n)| {
            let x0 = lo + i as f64 * width;
            Rectangle::new([(x0, 0.0), (x0 + width, n as f64)], colour.mix(0.45).filled())
        }))?
        .label(name)
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], colour.mix(0.45).filled()));
    }
    let t = report.threshold as f64;
    hist.draw_series(LineSeries::new(vec![(t, 0.0), (t, top)], BLACK.stroke_width(2)))?
        .label(format!("threshold {:.3}", report.threshold))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    hist.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}

/// The image-level ROC curves of one report (all defects, then each kind) in `area`.
fn draw_roc<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    report: &EvalReport,
    title: &str,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let mut roc = ChartBuilder::on(area)
        .caption(
            format!("{title} (AUROC {:.3})", report.overall.image_auroc),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..1f64, 0f64..1.02f64)?;
    roc.configure_mesh()
        .x_desc("false positive rate")
        .y_desc("true positive rate")
        .draw()?;
    roc.draw_series(LineSeries::new(vec![(0.0, 0.0), (1.0, 1.0)], RGBColor(190, 190, 190)))?;
    let curve_of = |defect: Option<&str>| {
        let (s, l): (Vec<f32>, Vec<bool>) = report
            .images
            .iter()
            .filter(|i| i.category == "good" || defect.is_none_or(|d| i.category == d))
            .map(|i| (i.score, i.category != "good"))
            .unzip();
        roc_curve(&s, &l)
    };
    roc.draw_series(LineSeries::new(curve_of(None), BLACK.stroke_width(3)))?
        .label("all")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(3)));
    for (i, (defect, m)) in report.per_defect.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        roc.draw_series(LineSeries::new(curve_of(Some(defect)), colour.stroke_width(2)))?
            .label(format!("{defect} ({:.3})", m.image_auroc))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
    }
    roc.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::short_names;

    #[test]
    fn panel_names_are_as_short_as_tells_the_models_apart() {
        assert_eq!(short_names(&["runs/a", "runs/b/"]), ["a", "b"]);
        assert_eq!(
            short_names(&["seed42/brushed", "x/seed7/brushed"]),
            ["seed42/brushed", "seed7/brushed"]
        );
        // The same folder twice cannot be told apart: shown whole.
        assert_eq!(short_names(&["/m/a", "/m/a"]), ["m/a", "m/a"]);
    }
}

//! Several models evaluated on the same test set, for one table.

use serde::Serialize;

use super::EvalReport;
use crate::detector::Detector;

/// One model's evaluation with what the table shows beside it.
#[derive(Debug, Serialize)]
pub struct Compared {
    /// The family (`draem`, `spatial`, …) from the model card.
    pub architecture: String,
    /// The good test images flagged at the model's threshold, as a fraction.
    pub false_alarm_rate: f64,
    /// Wall time of the evaluation per test image: decoding, the model and scoring.
    pub ms_per_image: f64,
    pub report: EvalReport,
}

impl Compared {
    pub fn new(detector: &Detector, report: EvalReport) -> Self {
        let t = &report.overall.at_threshold;
        let good = (t.false_positives + t.true_negatives).max(1);
        let images = (report.overall.good_images + report.overall.defective_images).max(1);
        Self {
            architecture: detector.card.architecture.name().to_string(),
            false_alarm_rate: t.false_positives as f64 / good as f64,
            ms_per_image: report.seconds * 1e3 / images as f64,
            report,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Comparison {
    pub data: String,
    pub models: Vec<Compared>,
}

impl Comparison {
    /// A plain-text table, one row per model, in the order given.
    pub fn summary(&self) -> String {
        let f = |v: Option<f64>| v.map_or("n/a".to_string(), |x| format!("{x:.4}"));
        let width = self
            .models
            .iter()
            .map(|m| m.report.model.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let mut s = format!(
            "{:<width$} {:<8} {:>9} {:>9} {:>8} {:>8} {:>11} {:>9}\n",
            "model", "family", "img AUROC", "pix AUROC", "AUPRO", "F1", "false alarm", "ms/image"
        );
        for m in &self.models {
            let o = &m.report.overall;
            s.push_str(&format!(
                "{:<width$} {:<8} {:>9.4} {:>9} {:>8} {:>8.3} {:>11} {:>9.1}\n",
                m.report.model,
                m.architecture,
                o.image_auroc,
                f(o.pixel_auroc),
                f(o.aupro),
                o.at_threshold.f1,
                format!("{:.1}%", 100.0 * m.false_alarm_rate),
                m.ms_per_image
            ));
        }
        s.push_str(&format!(
            "\non {} (F1 and false alarms at each model's own threshold; ms/image includes decoding)\n",
            self.data
        ));
        s
    }
}

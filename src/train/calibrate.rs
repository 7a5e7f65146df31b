//! Threshold calibration from good images only.

use serde::{Deserialize, Serialize};

use crate::detector::Detector;
use crate::image_io::Planar;
use crate::model::artifact::{quantile, ScoreStats, Thresholds};
use crate::scoring::regions::min_area_threshold;

/// How the image threshold is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ThresholdMethod {
    /// A quantile of the good images' scores, raised by the margin.
    Quantile,
    /// Bergmann et al.: the lowest map threshold at which no good image has a connected
    /// region of `min_defect_area` pixels or more. An image's score is then the highest
    /// level at which its map still has such a region (not the family's reduction), so an
    /// image is anomalous when a region of that area lies above the threshold.
    MinArea,
}

impl ThresholdMethod {
    /// The name `model.json` records (`thresholds.method`), spelt as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Quantile => "quantile",
            Self::MinArea => "min-area",
        }
    }

    /// The method a recorded name stands for; None for one this vigil does not know.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Quantile, Self::MinArea].into_iter().find(|m| m.name() == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CalibrationConfig {
    pub method: ThresholdMethod,
    /// Quantile of good scores for the `quantile` method (0.99 = 99th percentile).
    pub quantile: f32,
    /// Relative margin: threshold = quantile × (1 + margin).
    pub margin: f32,
    /// Smallest defect worth reporting, in working-resolution pixels.
    pub min_defect_area: u32,
}

impl CalibrationConfig {
    /// The margin used when none is given. A learned map's peak on good images varies more
    /// from image to image than a reconstruction-error map's, and after draem's 2400 steps
    /// it reaches further above the held-out images' on good images of another part of the
    /// same surface: on a development set of six real surfaces whose good test images come
    /// from another part of each photograph than the training images, twelve draem models
    /// (two seeds) calibrated on their 7 held-out images flagged 30 of 240 good test images
    /// with 0.2, 18 with 0.3, 9 (3.8%) with 0.4, at recalls of 0.74, 0.67 and 0.61; a
    /// third seed trained after this choice flagged 5 of 120 (4.2%) with 0.4.
    pub fn default_margin(map: crate::scoring::MapMethod) -> f32 {
        match map {
            crate::scoring::MapMethod::Learned => 0.4,
            _ => 0.1,
        }
    }

    /// Refuses settings that would write a threshold nothing can use: a quantile outside
    /// (0, 1], a negative or non-finite margin.
    pub fn validate(&self) -> Result<(), CalibrationError> {
        if !(self.quantile > 0.0 && self.quantile <= 1.0) {
            return Err(CalibrationError::Settings(format!(
                "the quantile must be above 0 and at most 1, not {}",
                self.quantile
            )));
        }
        if !(self.margin.is_finite() && self.margin >= 0.0) {
            return Err(CalibrationError::Settings(format!(
                "the margin must be a finite number of 0 or more, not {}",
                self.margin
            )));
        }
        Ok(())
    }

    /// Refuses a minimum defect area larger than a `working_size²` map: no region could
    /// reach it, and min-area would then flag every image by its whole map.
    pub fn fits(&self, working_size: usize) -> Result<(), CalibrationError> {
        let pixels = working_size * working_size;
        if self.min_defect_area as usize > pixels {
            return Err(CalibrationError::Settings(format!(
                "the minimum defect area {} px is larger than the whole {working_size}² working image ({pixels} px)",
                self.min_defect_area
            )));
        }
        Ok(())
    }
}

impl Default for CalibrationConfig {
    fn default() -> Self {
        Self {
            method: ThresholdMethod::Quantile,
            quantile: 0.99,
            margin: 0.1,
            min_defect_area: 25,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error("calibration needs at least one good image")]
    NoImages,
    #[error("{0}")]
    Settings(String),
    #[error("the calibrated thresholds are not finite (image {image}, pixel {pixel}): the model's maps hold NaN or infinite values")]
    NotFinite { image: f32, pixel: f32 },
    #[error("good image {number} of {count} scores {score}: the model's map of it holds NaN or infinite values, so it cannot set a threshold (is it an image the model can take?)")]
    NotFiniteScore { number: usize, count: usize, score: f32 },
    #[error(transparent)]
    Model(#[from] candle_core::Error),
}

/// Sets the map scales and both thresholds of `detector.card` from good `images`
/// (already at working resolution). Returns the good images' scores.
/// Whether calibration measures the error maps' scales again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scales {
    /// Training: each error map's mean over the good pixels sets its scale.
    Measure,
    /// `vigil calibrate`: the scales stay, so scores before and after are on one scale
    /// and the old and new thresholds can be compared.
    Keep,
}

pub fn calibrate(
    detector: &mut Detector,
    images: &[Planar],
    cfg: &CalibrationConfig,
    scales: Scales,
    set_by: String,
) -> Result<Vec<f32>, CalibrationError> {
    cfg.validate()?;
    cfg.fits(detector.card.input.working_size)?;
    if images.is_empty() {
        return Err(CalibrationError::NoImages);
    }
    let mut raws = Vec::with_capacity(images.len());
    for chunk in images.chunks(8) {
        let refs: Vec<&Planar> = chunk.iter().collect();
        raws.extend(detector.reconstruct_with_error_maps(&refs)?.into_iter().map(|r| r.raw));
    }
    if scales == Scales::Measure {
        // Each error map's mean over the good pixels, so each part of a mixed map averages
        // 1 on good images.
        let pixels: usize = raws.iter().map(|r| r.dssim.len()).sum();
        let mean = |f: &dyn Fn(&crate::scoring::RawMaps) -> f64| raws.iter().map(f).sum::<f64>() / pixels as f64;
        let dssim_mean = mean(&|r| r.dssim.iter().map(|&v| v as f64).sum());
        let l2_mean = mean(&|r| r.l2.iter().map(|&v| v as f64).sum());
        detector.card.scoring.ssim_scale = (dssim_mean as f32).max(1e-6);
        detector.card.scoring.l2_scale = (l2_mean as f32).max(1e-9);
    }

    let s = detector.card.input.working_size;
    let maps: Vec<(Vec<f32>, f32)> = raws.iter().map(|r| detector.reduced_map(r, None)).collect();
    // Each image's highest level with a region of the minimum area: the min-area method's
    // score, and where the quantile method cuts regions.
    let levels: Vec<f32> = maps
        .iter()
        .map(|(m, _)| min_area_threshold(m, s, s, cfg.min_defect_area))
        .collect();
    let min_area_level = levels.iter().copied().fold(0f32, f32::max);
    let (image, pixel, scores) = match cfg.method {
        ThresholdMethod::Quantile => {
            let scores: Vec<f32> = maps.iter().map(|m| m.1).collect();
            let image = quantile(&scores, cfg.quantile) * (1.0 + cfg.margin);
            (image, min_area_level.min(image), scores)
        }
        ThresholdMethod::MinArea => (min_area_level, min_area_level, levels),
    };
    // A card with a NaN threshold, or validation scores of ±∞ (their statistics then hold
    // NaN), serialises as null and no longer loads: refuse it here.
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(CalibrationError::NotFiniteScore {
            number: i + 1,
            count: scores.len(),
            score: scores[i],
        });
    }
    if !(image.is_finite() && pixel.is_finite()) {
        return Err(CalibrationError::NotFinite { image, pixel });
    }
    detector.card.thresholds = Thresholds {
        image,
        pixel,
        method: cfg.method.name().into(),
        quantile: cfg.quantile,
        margin: cfg.margin,
        min_defect_area: cfg.min_defect_area,
        validation_images: images.len(),
        set_by: Some(set_by),
        manual: false,
        level_scores: cfg.method == ThresholdMethod::MinArea,
    };
    detector.card.validation_scores = ScoreStats::of(&scores);
    Ok(scores)
}

/// What is wrong with the card's image threshold, if it cannot work: at or above 1 for a
/// learned probability map (draem's scores never exceed 1: it flags nothing), or below
/// every score of the good images it was calibrated on (it flags every part).
pub fn threshold_warning(card: &crate::model::ModelCard) -> Option<String> {
    let image = card.thresholds.image;
    let probability = matches!(card.architecture, crate::model::Architecture::Draem { .. })
        && card.scoring.method == crate::scoring::MapMethod::Learned;
    if probability && image >= 1.0 {
        return Some(format!(
            "the image threshold {image} is at or above 1, the highest score this model can give: it will flag nothing"
        ));
    }
    let lowest = card.validation_scores.min;
    if card.validation_scores.count > 0 && image < lowest {
        return Some(format!(
            "the image threshold {image} is below the lowest score of the good images it was calibrated on \
             ({lowest}): it will flag good parts"
        ));
    }
    None
}

/// A threshold set on fewer held-out good images than this rests on little: a quantile
/// of three scores is nearly their maximum, and one unusual image moves it.
pub const FEW_CALIBRATION_IMAGES: usize = 5;

/// What to tell the user when `n` held-out images set the thresholds, if that is few.
pub fn few_images_note(n: usize) -> Option<String> {
    (n > 0 && n < FEW_CALIBRATION_IMAGES).then(|| {
        format!(
            "the thresholds were calibrated on only {n} good image{}: recalibrate on 20 or more \
             good images (vigil calibrate) before trusting them",
            if n == 1 { "" } else { "s" }
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_would_write_an_unusable_threshold_are_refused() {
        let ok = CalibrationConfig::default();
        assert!(ok.validate().is_ok());
        for (quantile, margin) in [
            (f32::NAN, 0.1),
            (0.0, 0.1),
            (1.5, 0.1),
            (0.99, f32::NAN),
            (0.99, f32::INFINITY),
            (0.99, -0.5),
        ] {
            let cfg = CalibrationConfig { quantile, margin, ..ok };
            assert!(
                matches!(cfg.validate(), Err(CalibrationError::Settings(_))),
                "quantile {quantile}, margin {margin} accepted"
            );
        }
        // A minimum area up to the whole working image, not beyond.
        let area = |min_defect_area| CalibrationConfig { min_defect_area, ..ok };
        assert!(area(65_536).fits(256).is_ok());
        assert!(matches!(area(65_537).fits(256), Err(CalibrationError::Settings(_))));
    }

    #[test]
    fn method_names_are_the_command_lines_and_read_back() {
        use clap::ValueEnum;
        for m in ThresholdMethod::value_variants() {
            assert_eq!(m.name(), m.to_possible_value().unwrap().get_name());
            assert_eq!(ThresholdMethod::from_name(m.name()), Some(*m));
        }
        assert_eq!(ThresholdMethod::from_name("percentile"), None);
    }

    #[test]
    fn fewer_than_five_held_out_images_are_called_few() {
        assert_eq!(few_images_note(0), None, "none held out is warned about elsewhere");
        assert!(few_images_note(1).unwrap().contains("on only 1 good image:"));
        assert!(few_images_note(4).unwrap().contains("on only 4 good images:"));
        assert_eq!(few_images_note(FEW_CALIBRATION_IMAGES), None);
    }
}

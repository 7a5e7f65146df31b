//! Evaluation on a labelled test set in the MVTec AD layout:
//! `test/good/*`, `test/<defect>/*`, `ground_truth/<defect>/<name>_mask.png` (optional).

pub mod compare;
pub mod figure;
pub mod metrics;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::detector::{Detector, Overrides};
use crate::image_io;
use crate::train::dataset::{image_files, DatasetError};
use metrics::{Confusion, MaskedMap};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{0}: no `test` folder (expected the MVTec AD layout: test/good, test/<defect>, ground_truth/<defect>)")]
    NoTestFolder(PathBuf),
    #[error("{0}: the test set needs both good images (test/good) and defective ones (test/<defect>)")]
    OneClass(PathBuf),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("{path}: {source}")]
    Image {
        path: PathBuf,
        source: image_io::ImageError,
    },
    #[error("model error: {0}")]
    Model(#[from] candle_core::Error),
    #[error("{path}: the mask is {}×{} but its image is {}×{}", mask.0, mask.1, image.0, image.1)]
    MaskSize {
        path: PathBuf,
        mask: (u32, u32),
        image: (u32, u32),
    },
}

/// One test image and where its mask is.
#[derive(Debug, Clone)]
pub struct TestImage {
    pub path: PathBuf,
    /// `good` or the defect folder's name.
    pub category: String,
    pub mask: Option<PathBuf>,
}

impl TestImage {
    pub fn is_defective(&self) -> bool {
        self.category != "good"
    }
}

/// Lists the test images of an MVTec AD category folder.
pub fn test_set(dir: &Path) -> Result<Vec<TestImage>, EvalError> {
    if dir.is_file() {
        return Err(DatasetError::NotAFolder(dir.to_path_buf()).into());
    }
    if !dir.is_dir() {
        return Err(DatasetError::NotFound(dir.to_path_buf()).into());
    }
    let test = dir.join("test");
    if !test.is_dir() {
        return Err(EvalError::NoTestFolder(dir.to_path_buf()));
    }
    let mut categories: Vec<PathBuf> = std::fs::read_dir(&test)
        .map_err(DatasetError::Io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        // Hidden folders (a `.trash`, an editor's) are not defect types, as hidden files
        // are not images.
        .filter(|p| p.is_dir() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    categories.sort();
    let mut out = Vec::new();
    for cat in categories {
        let name = cat.file_name().expect("dir name").to_string_lossy().to_string();
        for path in image_files(&cat)? {
            let stem = path.file_stem().expect("file stem").to_string_lossy().to_string();
            // At the image's own place below its defect folder: `test/hole/a/000.png` has
            // `ground_truth/hole/a/000_mask.png`, not another folder's `000`.
            let within = path
                .parent()
                .and_then(|p| p.strip_prefix(&cat).ok())
                .unwrap_or(Path::new(""));
            let mask = dir
                .join("ground_truth")
                .join(&name)
                .join(within)
                .join(format!("{stem}_mask.png"));
            out.push(TestImage {
                category: name.clone(),
                mask: mask.is_file().then_some(mask),
                path,
            });
        }
    }
    let defective = out.iter().filter(|t| t.is_defective()).count();
    if defective == 0 || defective == out.len() {
        return Err(EvalError::OneClass(dir.to_path_buf()));
    }
    let unmasked: Vec<&TestImage> = out.iter().filter(|t| t.is_defective() && t.mask.is_none()).collect();
    if let Some(first) = unmasked.first() {
        tracing::warn!(
            "{} of {defective} defective images have no mask (ground_truth/<defect>/<name>_mask.png; the first: {}): \
             pixel AUROC and AUPRO are left out for their defect types and overall",
            unmasked.len(),
            first.path.display()
        );
    }
    Ok(out)
}

/// Metrics for all images or one defect kind (against all good images).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metrics {
    pub good_images: usize,
    pub defective_images: usize,
    pub image_auroc: f64,
    /// None when masks are missing for some defective image.
    pub pixel_auroc: Option<f64>,
    /// Normalised area under the PRO curve up to 30% FPR.
    pub aupro: Option<f64>,
    /// At the model's threshold.
    pub at_threshold: Confusion,
}

/// What `vigil eval` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub model: String,
    pub data: String,
    pub threshold: f32,
    pub overall: Metrics,
    /// The threshold with the best image-level F1 on this test set.
    pub best_f1: Confusion,
    pub per_defect: Vec<(String, Metrics)>,
    pub seconds: f64,
    /// Every test image's score and verdict: which defects escaped, which good parts were
    /// flagged (and what the figure draws).
    #[serde(default)]
    pub images: Vec<ImageScore>,
}

/// One test image as the model judged it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageScore {
    /// Relative to the data folder.
    pub path: String,
    /// `good` or the defect type.
    pub category: String,
    pub score: f32,
    pub is_anomalous: bool,
}

/// Scores every test image (none over `max_pixels`) and computes the metrics.
pub fn evaluate(
    detector: &Detector,
    model_dir: &Path,
    dir: &Path,
    progress: bool,
    max_pixels: u64,
) -> Result<EvalReport, EvalError> {
    let started = std::time::Instant::now();
    let set = test_set(dir)?;
    check_headers(&set, max_pixels)?;
    let bar = if progress {
        let b = indicatif::ProgressBar::new(set.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("evaluating {bar:30} {pos}/{len} images  eta {eta}")
                .expect("template"),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut scored = Vec::with_capacity(set.len());
    let mut judged = Vec::with_capacity(set.len());
    for chunk in set.chunks(8) {
        let images = chunk
            .iter()
            .map(|t| {
                image_io::load_oriented(&t.path, max_pixels).map_err(|source| EvalError::Image {
                    path: t.path.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&image::DynamicImage> = images.iter().map(|(img, _)| img).collect();
        let judged_chunk = detector.inspect_batch(&refs, Overrides::default())?;
        for ((t, insp), (_, orientation)) in chunk.iter().zip(judged_chunk).zip(&images) {
            let mask = match &t.mask {
                Some(p) => Some(load_mask(p, *orientation, insp.width, insp.height, max_pixels)?),
                None if !t.is_defective() => Some(vec![false; insp.width * insp.height]),
                None => None,
            };
            // The map at the image's resolution, made once: the overall metrics and each
            // defect type's (every one with all the good images) read it.
            let masked = mask.map(|m| (m, insp.map()));
            judged.push(ImageScore {
                path: t.path.strip_prefix(dir).unwrap_or(&t.path).display().to_string(),
                category: t.category.clone(),
                score: insp.score,
                is_anomalous: insp.is_anomalous,
            });
            scored.push((t.category.clone(), insp, masked));
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    // As `vigil inspect` warns per image: figures on images unlike the training images
    // (another size or colour) say less about the model than they seem to.
    let warned: Vec<&crate::detector::Inspection> =
        scored.iter().map(|s| &s.1).filter(|i| !i.warnings.is_empty()).collect();
    if let Some(first) = warned.first() {
        tracing::warn!(
            "{} of {} test images differ from the model's training images: {}",
            warned.len(),
            scored.len(),
            first.warnings.join("; ")
        );
    }
    let threshold = detector.card.thresholds.image;
    let overall = metrics_of(scored.iter().collect(), threshold);
    let mut defects: Vec<String> = scored.iter().filter(|s| s.0 != "good").map(|s| s.0.clone()).collect();
    defects.dedup();
    let per_defect = defects
        .into_iter()
        .map(|d| {
            let subset = scored.iter().filter(|s| s.0 == "good" || s.0 == d).collect();
            (d, metrics_of(subset, threshold))
        })
        .collect();
    let (s, l): (Vec<f32>, Vec<bool>) = scored.iter().map(|x| (x.1.score, x.0 != "good")).unzip();
    Ok(EvalReport {
        model: model_dir.display().to_string(),
        data: dir.display().to_string(),
        threshold,
        overall,
        best_f1: Confusion::best_f1(&s, &l),
        per_defect,
        seconds: started.elapsed().as_secs_f64(),
        images: judged,
    })
}

/// A test image's category, verdict, and (where its mask is known) mask and map.
type Scored = (String, crate::detector::Inspection, Option<(Vec<bool>, Vec<f32>)>);

fn metrics_of(items: Vec<&Scored>, threshold: f32) -> Metrics {
    let scores: Vec<f32> = items.iter().map(|s| s.1.score).collect();
    let labels: Vec<bool> = items.iter().map(|s| s.0 != "good").collect();
    let all_masks = items.iter().all(|s| s.2.is_some());
    let (pixel_auroc, aupro) = if all_masks {
        let pairs: Vec<&(Vec<bool>, Vec<f32>)> = items.iter().map(|s| s.2.as_ref().expect("checked")).collect();
        let total: usize = pairs.iter().map(|p| p.1.len()).sum();
        let mut pix = Vec::with_capacity(total);
        let mut lab = Vec::with_capacity(total);
        for (mask, map) in &pairs {
            pix.extend_from_slice(map);
            lab.extend_from_slice(mask);
        }
        let masked: Vec<MaskedMap> = items
            .iter()
            .zip(&pairs)
            .map(|(s, (mask, map))| MaskedMap {
                map,
                mask,
                width: s.1.width,
                height: s.1.height,
            })
            .collect();
        (metrics::auroc(&pix, &lab), metrics::aupro(&masked, 0.3))
    } else {
        (None, None)
    };
    Metrics {
        good_images: labels.iter().filter(|l| !**l).count(),
        defective_images: labels.iter().filter(|l| **l).count(),
        image_auroc: metrics::auroc(&scores, &labels).unwrap_or(f64::NAN),
        pixel_auroc,
        aupro,
        at_threshold: Confusion::at(&scores, &labels, threshold),
    }
}

/// Reads every test image's header once, before minutes of inference: the images whose
/// header cannot be read are named in one error (a body broken further in is still found
/// when it is decoded), and every mask must have its image's size.
fn check_headers(set: &[TestImage], max_pixels: u64) -> Result<(), EvalError> {
    let mut sizes = Vec::with_capacity(set.len());
    let mut bad = Vec::new();
    for t in set {
        match image_io::probe(&t.path, max_pixels) {
            Ok(size) => sizes.push(size),
            Err(e) => bad.push((t.path.clone(), e.to_string())),
        }
    }
    if !bad.is_empty() {
        return Err(DatasetError::BadImages(bad).into());
    }
    for (t, &image) in set.iter().zip(&sizes) {
        if let Some(mask_path) = &t.mask {
            let mask = image::image_dimensions(mask_path).map_err(|e| EvalError::Image {
                path: mask_path.clone(),
                source: image_io::ImageError::Corrupt(e.to_string()),
            })?;
            if mask != image {
                return Err(EvalError::MaskSize {
                    path: mask_path.clone(),
                    mask,
                    image,
                });
            }
        }
    }
    Ok(())
}

/// Loads a mask (nonzero = defect), which must have the image's size. A mask is drawn
/// on its image's stored pixels (its header size is checked against the image's), so it
/// is turned as its image was turned upright by its EXIF orientation.
fn load_mask(
    path: &Path,
    orientation: image::metadata::Orientation,
    width: usize,
    height: usize,
    max_pixels: u64,
) -> Result<Vec<bool>, EvalError> {
    let mut img = image_io::load(path, max_pixels).map_err(|source| EvalError::Image {
        path: path.to_path_buf(),
        source,
    })?;
    img.apply_orientation(orientation);
    let g = img.to_luma8();
    // A mask of another size cannot be matched to the map pixel for pixel; stretching it
    // would make the pixel metrics measure something else without saying so.
    if (g.width() as usize, g.height() as usize) != (width, height) {
        return Err(EvalError::MaskSize {
            path: path.to_path_buf(),
            mask: (g.width(), g.height()),
            image: (width as u32, height as u32),
        });
    }
    Ok(g.pixels().map(|p| p[0] > 0).collect())
}

impl EvalReport {
    /// A plain-text summary for the terminal.
    pub fn summary(&self) -> String {
        let f = |v: Option<f64>| v.map_or("n/a".to_string(), |x| format!("{x:.4}"));
        let mut s = format!(
            "{:<16} {:>6} {:>6} {:>9} {:>9} {:>8} {:>8} {:>8}\n",
            "defect", "good", "bad", "img AUROC", "pix AUROC", "AUPRO", "recall", "F1"
        );
        let mut row = |name: &str, m: &Metrics| {
            s.push_str(&format!(
                "{:<16} {:>6} {:>6} {:>9.4} {:>9} {:>8} {:>8.3} {:>8.3}\n",
                name,
                m.good_images,
                m.defective_images,
                m.image_auroc,
                f(m.pixel_auroc),
                f(m.aupro),
                m.at_threshold.recall,
                m.at_threshold.f1
            ));
        };
        for (d, m) in &self.per_defect {
            row(d, m);
        }
        row("all", &self.overall);
        let t = &self.overall.at_threshold;
        // Precision is undefined when nothing was flagged (the JSON report keeps 0).
        let precision = if t.true_positives + t.false_positives == 0 {
            "n/a (nothing flagged)".to_string()
        } else {
            format!("{:.3}", t.precision)
        };
        s.push_str(&format!(
            "\nat the model's threshold {:.4}: precision {precision}, recall {:.3}, F1 {:.3}, accuracy {:.3} (FP {}, FN {})\n",
            self.threshold, t.recall, t.f1, t.accuracy, t.false_positives, t.false_negatives
        ));
        s.push_str(&format!(
            "best F1 on this set: {:.3} at threshold {:.4} (precision {:.3}, recall {:.3})\n",
            self.best_f1.f1, self.best_f1.threshold, self.best_f1.precision, self.best_f1.recall
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_found_at_their_images_place_and_hidden_folders_are_not_defect_types() {
        let dir = tempfile::tempdir().unwrap();
        let png = |p: &Path| {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            image::GrayImage::new(4, 4).save(p).unwrap();
        };
        let d = dir.path();
        for p in [
            "test/good/000.png",
            "test/hole/000.png",
            "test/hole/sub/000.png",
            "test/hole/sub/001.png",
            "test/.trash/000.png",
            "ground_truth/hole/000_mask.png",
            "ground_truth/hole/sub/001_mask.png",
        ] {
            png(&d.join(p));
        }
        let set = test_set(d).unwrap();
        let mask_of = |img: &str| {
            let t = set.iter().find(|t| t.path == d.join(img)).unwrap();
            t.mask.as_ref().map(|m| m.strip_prefix(d).unwrap().to_path_buf())
        };
        assert_eq!(
            mask_of("test/hole/000.png"),
            Some("ground_truth/hole/000_mask.png".into())
        );
        // Not `ground_truth/hole/000_mask.png`, another image's mask.
        assert_eq!(mask_of("test/hole/sub/000.png"), None);
        assert_eq!(
            mask_of("test/hole/sub/001.png"),
            Some("ground_truth/hole/sub/001_mask.png".into())
        );
        assert!(set.iter().all(|t| t.category != ".trash"), "{set:?}");
        assert_eq!(set.len(), 4);
    }

    #[test]
    fn the_summary_says_precision_is_undefined_when_nothing_was_flagged() {
        let (scores, labels) = ([0.1f32, 0.2, 0.3], [false, true, true]);
        let report = |threshold: f32| {
            let at = metrics::Confusion::at(&scores, &labels, threshold);
            let overall = Metrics {
                good_images: 1,
                defective_images: 2,
                image_auroc: 1.0,
                pixel_auroc: None,
                aupro: None,
                at_threshold: at,
            };
            EvalReport {
                model: "m".into(),
                data: "d".into(),
                threshold,
                overall,
                best_f1: at,
                per_defect: vec![],
                seconds: 0.0,
                images: vec![],
            }
            .summary()
        };
        assert!(
            report(0.5).contains("precision n/a (nothing flagged)"),
            "{}",
            report(0.5)
        );
        assert!(report(0.15).contains("precision 1.000"), "{}", report(0.15));
    }

    #[test]
    fn a_mask_of_another_size_than_its_image_is_an_error_not_stretched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m_mask.png");
        let mut mask = image::GrayImage::new(4, 4);
        mask.put_pixel(1, 2, image::Luma([255]));
        mask.save(&path).unwrap();
        use image::metadata::Orientation;
        let pixels = load_mask(&path, Orientation::NoTransforms, 4, 4, image_io::DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!(pixels.iter().filter(|&&d| d).count(), 1);
        assert!(pixels[2 * 4 + 1]);
        // Its image was turned upright 90° clockwise (EXIF 6): the mask turns with it, the
        // defect at column 1, row 2 of the stored pixels lands at column 4 − 1 − 2 = 1,
        // row 1.
        let turned = load_mask(&path, Orientation::Rotate90, 4, 4, image_io::DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!(turned.iter().filter(|&&d| d).count(), 1);
        assert!(turned[4 + 1], "{turned:?}");
        match load_mask(&path, Orientation::NoTransforms, 256, 256, image_io::DEFAULT_MAX_PIXELS) {
            Err(EvalError::MaskSize { mask, image, .. }) => assert_eq!((mask, image), ((4, 4), (256, 256))),
            other => panic!("{other:?}"),
        }
    }
}

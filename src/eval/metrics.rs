//! Detection metrics: ROC/AUROC, PRO/AUPRO (MVTec AD protocol), precision/recall/F1.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::scoring::regions::label_components;

/// Indices of `scores` sorted by descending score.
fn order_desc(scores: &[f32]) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
    idx.par_sort_unstable_by(|&a, &b| scores[b as usize].total_cmp(&scores[a as usize]));
    idx
}

/// ROC curve points (fpr, tpr) from (0, 0) to (1, 1), one point per distinct score.
pub fn roc_curve(scores: &[f32], labels: &[bool]) -> Vec<(f64, f64)> {
    assert_eq!(scores.len(), labels.len());
    let pos = labels.iter().filter(|&&l| l).count() as f64;
    let neg = labels.len() as f64 - pos;
    let idx = order_desc(scores);
    let mut pts = vec![(0.0, 0.0)];
    let (mut tp, mut fp) = (0f64, 0f64);
    for (k, &i) in idx.iter().enumerate() {
        if labels[i as usize] {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        let last_of_tie = k + 1 == idx.len() || scores[idx[k + 1] as usize] != scores[i as usize];
        if last_of_tie {
            pts.push((
                if neg > 0.0 { fp / neg } else { 0.0 },
                if pos > 0.0 { tp / pos } else { 0.0 },
            ));
        }
    }
    pts
}

/// Area under the ROC curve (ties count one half, as in the Mann–Whitney statistic).
/// None when one class is missing.
pub fn auroc(scores: &[f32], labels: &[bool]) -> Option<f64> {
    let pos = labels.iter().filter(|&&l| l).count();
    if pos == 0 || pos == labels.len() {
        return None;
    }
    Some(trapezoid(&roc_curve(scores, labels), 1.0))
}

/// Integral of a piecewise-linear curve from x = 0 to `x_max` (interpolating at `x_max`).
pub fn trapezoid(points: &[(f64, f64)], x_max: f64) -> f64 {
    let mut area = 0.0;
    for w in points.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        if x0 >= x_max {
            break;
        }
        if x1 <= x_max {
            area += (x1 - x0) * (y0 + y1) / 2.0;
        } else {
            let y = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0);
            area += (x_max - x0) * (y0 + y) / 2.0;
            break;
        }
    }
    area
}

/// One image's anomaly map with its ground-truth mask (both row-major, same size).
pub struct MaskedMap<'a> {
    pub map: &'a [f32],
    pub mask: &'a [bool],
    pub width: usize,
    pub height: usize,
}

/// PRO curve (fpr, mean per-region overlap), as in the MVTec AD evaluation code:
/// ground-truth regions are 8-connected components; the FPR counts every pixel outside
/// the ground truth over all images; one point per distinct score.
pub fn pro_curve(images: &[MaskedMap]) -> Vec<(f64, f64)> {
    let total: usize = images.iter().map(|m| m.map.len()).sum();
    let mut scores = Vec::with_capacity(total);
    // Per pixel: None outside the ground truth, Some(1/area) inside a region.
    let mut weight: Vec<f32> = Vec::with_capacity(total);
    let mut regions = 0usize;
    let mut ok_pixels = 0usize;
    for m in images {
        assert_eq!(m.map.len(), m.mask.len(), "map and mask sizes differ");
        let (labels, n) = label_components(m.mask, m.width, m.height);
        let mut areas = vec![0u32; n as usize];
        labels
            .iter()
            .filter(|&&l| l > 0)
            .for_each(|&l| areas[l as usize - 1] += 1);
        regions += n as usize;
        for (i, &l) in labels.iter().enumerate() {
            scores.push(m.map[i]);
            if l == 0 {
                ok_pixels += 1;
                weight.push(-1.0);
            } else {
                weight.push(1.0 / areas[l as usize - 1] as f32);
            }
        }
    }
    if regions == 0 || ok_pixels == 0 {
        return vec![(0.0, 0.0)];
    }
    let idx = order_desc(&scores);
    let mut pts = vec![(0.0, 0.0)];
    let (mut fp, mut overlap) = (0f64, 0f64);
    for (k, &i) in idx.iter().enumerate() {
        let w = weight[i as usize];
        if w < 0.0 {
            fp += 1.0;
        } else {
            overlap += w as f64;
        }
        let last_of_tie = k + 1 == idx.len() || scores[idx[k + 1] as usize] != scores[i as usize];
        if last_of_tie {
            pts.push((fp / ok_pixels as f64, overlap / regions as f64));
        }
    }
    pts
}

/// Normalised area under the PRO curve up to `max_fpr` (0.3 in the MVTec AD protocol).
/// None when there is no ground-truth region.
pub fn aupro(images: &[MaskedMap], max_fpr: f64) -> Option<f64> {
    let has_region = images.iter().any(|m| m.mask.iter().any(|&b| b));
    if !has_region {
        return None;
    }
    Some(trapezoid(&pro_curve(images), max_fpr) / max_fpr)
}

/// Counts and rates of a binary decision `score > threshold`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Confusion {
    pub threshold: f32,
    pub true_positives: usize,
    pub false_positives: usize,
    pub true_negatives: usize,
    pub false_negatives: usize,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub accuracy: f64,
}

impl Confusion {
    pub fn at(scores: &[f32], labels: &[bool], threshold: f32) -> Self {
        let (mut tp, mut fp, mut tn, mut fneg) = (0, 0, 0, 0);
        for (&s, &l) in scores.iter().zip(labels) {
            match (s > threshold, l) {
                (true, true) => tp += 1,
                (true, false) => fp += 1,
                (false, false) => tn += 1,
                (false, true) => fneg += 1,
            }
        }
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let precision = ratio(tp, tp + fp);
        let recall = ratio(tp, tp + fneg);
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        Self {
            threshold,
            true_positives: tp,
            false_positives: fp,
            true_negatives: tn,
            false_negatives: fneg,
            precision,
            recall,
            f1,
            accuracy: ratio(tp + tn, scores.len()),
        }
    }

    /// The threshold with the highest F1, taken halfway between adjacent distinct scores.
    pub fn best_f1(scores: &[f32], labels: &[bool]) -> Self {
        let mut sorted: Vec<f32> = scores.to_vec();
        sorted.sort_by(|a, b| a.total_cmp(b));
        sorted.dedup();
        let mut candidates: Vec<f32> = sorted.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        if let Some(&lo) = sorted.first() {
            candidates.push(lo - 1e-6 * lo.abs().max(1.0));
        }
        candidates
            .into_iter()
            .map(|t| Self::at(scores, labels, t))
            .fold(None, |best: Option<Self>, c| match best {
                Some(b) if b.f1 >= c.f1 => Some(b),
                _ => Some(c),
            })
            .unwrap_or_else(|| Self::at(scores, labels, 0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_hand_computed_cases() {
        // The classic example (scikit-learn's roc_auc_score docs): 0.75.
        let s = [0.1, 0.4, 0.35, 0.8];
        let l = [false, false, true, true];
        assert!((auroc(&s, &l).unwrap() - 0.75).abs() < 1e-12);
        // Ties: positives {0.5, 0.9}, negatives {0.5, 0.5}: (0.5 + 0.5 + 1 + 1) / 4.
        let s = [0.5, 0.5, 0.5, 0.9];
        let l = [false, true, false, true];
        assert!((auroc(&s, &l).unwrap() - 0.75).abs() < 1e-12);
        assert_eq!(auroc(&[0.1, 0.2], &[true, true]), None);
        // Perfect and inverted.
        assert_eq!(auroc(&[0.1, 0.9], &[false, true]), Some(1.0));
        assert_eq!(auroc(&[0.9, 0.1], &[false, true]), Some(0.0));
    }

    #[test]
    fn aupro_hand_computed_cases() {
        // One 2-pixel region, half of it found before any false positive.
        // Sorted: 0.9 (gt), 0.8 (ok), 0.2 (ok), 0.1 (gt): PRO is 0.5 for all FPR < 1.
        let map = [0.9, 0.1, 0.8, 0.2];
        let mask = [true, true, false, false];
        let m = [MaskedMap {
            map: &map,
            mask: &mask,
            width: 4,
            height: 1,
        }];
        assert!((aupro(&m, 0.3).unwrap() - 0.5).abs() < 1e-9);
        // Two 1-pixel regions (not adjacent), a tie between a region and a good pixel:
        // curve (0,0) (0.5,0) (1,0.5) (1,1); area to 0.75 = 0.25·0.25/2, over 0.75.
        let map = [0.9, 0.5, 0.5, 0.1];
        let mask = [false, true, false, true];
        let m = [MaskedMap {
            map: &map,
            mask: &mask,
            width: 4,
            height: 1,
        }];
        assert!((aupro(&m, 0.75).unwrap() - 0.03125 / 0.75).abs() < 1e-9);
    }

    #[test]
    fn pro_weighs_regions_equally_whatever_their_size() {
        // One row: region A is pixels 0–2 (3 px), region B pixel 6 (1 px), pixels 3–5 good
        // (scored 0.5, 0.4, 0.3). Whichever region is found first, PRO is 0.5 until the
        // other is found, where pixel recall would be 3/4 (A first) or 1/4 (B first).
        let mask = [true, true, true, false, false, false, true];
        let a_first = [0.9, 0.9, 0.9, 0.5, 0.4, 0.3, 0.2];
        let b_first = [0.2, 0.2, 0.2, 0.5, 0.4, 0.3, 0.9];
        for (name, map) in [("A first", a_first), ("B first", b_first)] {
            let m = [MaskedMap {
                map: &map,
                mask: &mask,
                width: 7,
                height: 1,
            }];
            let curve = pro_curve(&m);
            // Per-pixel weights are f32 (1/3 is not exact): compare to 1e-6.
            let near = |p: (f64, f64), q: (f64, f64)| (p.0 - q.0).abs() < 1e-6 && (p.1 - q.1).abs() < 1e-6;
            assert_eq!(curve.len(), 6, "{name}: {curve:?}");
            for (got, want) in curve.iter().zip([
                (0.0, 0.0),
                (0.0, 0.5),
                (1.0 / 3.0, 0.5),
                (2.0 / 3.0, 0.5),
                (1.0, 0.5),
                (1.0, 1.0),
            ]) {
                assert!(near(*got, want), "{name}: {curve:?}");
            }
            // Area: PRO 0.5 from FPR 0 to 1; the jump at FPR 1 adds nothing.
            assert!((aupro(&m, 1.0).unwrap() - 0.5).abs() < 1e-6, "{name}");
            // Up to FPR 0.3 (the MVTec limit), normalised: also 0.5.
            assert!((aupro(&m, 0.3).unwrap() - 0.5).abs() < 1e-6, "{name}");
        }
        // Regions are pooled over images: a 1-px region in one image weighs as much as a
        // 3-px region in another. Finding only the big one gives 0.5, not 3/4.
        let (map1, mask1) = ([0.9, 0.9, 0.9, 0.1], [true, true, true, false]);
        let (map2, mask2) = ([0.0, 0.1], [true, false]);
        let m = [
            MaskedMap {
                map: &map1,
                mask: &mask1,
                width: 4,
                height: 1,
            },
            MaskedMap {
                map: &map2,
                mask: &mask2,
                width: 2,
                height: 1,
            },
        ];
        let first = pro_curve(&m)[1];
        assert!(first.0 == 0.0 && (first.1 - 0.5).abs() < 1e-6, "{first:?}");
    }

    #[test]
    fn pro_regions_are_8_connected() {
        // A diagonal with a pixel beside it is one region under 8-connectivity.
        #[rustfmt::skip]
        let map = [
            0.9, 0.0, 0.0,
            0.0, 0.9, 0.0,
            0.0, 0.5, 0.9,
        ];
        #[rustfmt::skip]
        let mask = [
            true, false, false,
            false, true, false,
            false, true, true,
        ];
        // Pixel (1,2) is adjacent to the diagonal, so the mask is one 4-pixel region:
        // found 3/4 at the first threshold.
        let m = [MaskedMap {
            map: &map,
            mask: &mask,
            width: 3,
            height: 3,
        }];
        let curve = pro_curve(&m);
        assert_eq!(curve[1], (0.0, 0.75));
        // Now split: a lone pixel far from the diagonal counts as much as the diagonal.
        let map2 = [0.9, 0.0, 0.1, 0.0, 0.9, 0.0, 0.0, 0.0, 0.9];
        let mask2 = [true, false, true, false, true, false, false, false, true];
        // Regions: diagonal {0,4,8} and {2}? (2) touches (4) diagonally: one region.
        let m2 = [MaskedMap {
            map: &map2,
            mask: &mask2,
            width: 3,
            height: 3,
        }];
        assert_eq!(pro_curve(&m2)[1], (0.0, 0.75));
        let map3 = [0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1];
        let mask3 = [true, false, false, false, false, false, false, false, true];
        let m3 = [MaskedMap {
            map: &map3,
            mask: &mask3,
            width: 3,
            height: 3,
        }];
        // Two 1-pixel regions: the first found gives PRO 0.5.
        assert_eq!(pro_curve(&m3)[1], (0.0, 0.5));
    }

    #[test]
    fn confusion_and_best_f1() {
        let s = [0.1, 0.4, 0.35, 0.8];
        let l = [false, false, true, true];
        let c = Confusion::at(&s, &l, 0.3);
        assert_eq!(
            (c.true_positives, c.false_positives, c.true_negatives, c.false_negatives),
            (2, 1, 1, 0)
        );
        assert!((c.precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((c.f1 - 0.8).abs() < 1e-12);
        assert!((c.accuracy - 0.75).abs() < 1e-12);
        let b = Confusion::best_f1(&s, &l);
        assert!((b.f1 - 0.8).abs() < 1e-12, "{b:?}");
    }
}

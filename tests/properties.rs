//! Property tests of the scoring and metric maths.

use proptest::prelude::*;
use vigil::eval::metrics::{auroc, Confusion};
use vigil::scoring::regions::find_regions;
use vigil::scoring::ssim::{ssim_map, SsimParams};

fn plane(w: usize, h: usize) -> impl Strategy<Value = Vec<f32>> {
    proptest::collection::vec(0f32..=1.0, w * h)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn ssim_is_one_on_identity_symmetric_and_bounded(a in plane(16, 12), b in plane(16, 12)) {
        let p = SsimParams::default();
        prop_assert!(ssim_map(&a, &a, 16, 12, &p).iter().all(|v| (v - 1.0).abs() < 1e-4));
        let ab = ssim_map(&a, &b, 16, 12, &p);
        let ba = ssim_map(&b, &a, 16, 12, &p);
        for (x, y) in ab.iter().zip(&ba) {
            prop_assert!((x - y).abs() < 1e-5);
            prop_assert!(*x <= 1.0 + 1e-4 && *x >= -1.0 - 1e-4);
        }
    }

    #[test]
    fn auroc_of_flipped_labels_is_the_complement(
        scores in proptest::collection::vec(0f32..1.0, 2..60),
        seed in any::<u64>(),
    ) {
        let labels: Vec<bool> = (0..scores.len()).map(|i| (seed >> (i % 64)) & 1 == 1).collect();
        let flipped: Vec<bool> = labels.iter().map(|l| !l).collect();
        if let (Some(a), Some(b)) = (auroc(&scores, &labels), auroc(&scores, &flipped)) {
            prop_assert!((a + b - 1.0).abs() < 1e-9);
        }
    }

    #[test]
    fn confusion_counts_add_up(scores in proptest::collection::vec(0f32..1.0, 1..50), t in 0f32..1.0) {
        let labels: Vec<bool> = scores.iter().map(|s| *s > 0.5).collect();
        let c = Confusion::at(&scores, &labels, t);
        prop_assert_eq!(c.true_positives + c.false_positives + c.true_negatives + c.false_negatives, scores.len());
    }

    #[test]
    fn regions_stay_inside_the_image_and_above_the_threshold(map in plane(20, 15), t in 0.3f32..0.9) {
        let regions = find_regions(&map, 20, 15, t, t, 1);
        let above = map.iter().filter(|v| **v > t).count() as u32;
        prop_assert!(regions.iter().map(|r| r.area_px).sum::<u32>() <= above);
        for r in &regions {
            prop_assert!(r.x + r.width <= 20 && r.y + r.height <= 15);
            prop_assert!(r.peak > t && r.mean > t && r.mean <= r.peak);
        }
    }
}

//! The inspection pipeline with fake reconstructors: batching, tiling, thresholds, regions.

mod common;

use std::sync::Arc;

use candle_core::Device;
use image::{DynamicImage, GrayImage, Luma};
use vigil::detector::{Detector, Overrides};
use vigil::model::artifact::Fit;
use vigil::model::{Architecture, Network};

/// Grey image with a bright square at (x, y).
fn with_square(size: u32, x: u32, y: u32) -> DynamicImage {
    let mut g = GrayImage::from_pixel(size, size, Luma([128]));
    for yy in y..y + 8 {
        for xx in x..x + 8 {
            g.put_pixel(xx, yy, Luma([255]));
        }
    }
    DynamicImage::ImageLuma8(g)
}

#[test]
fn a_defect_gives_one_region_around_it_and_a_flat_image_none() {
    let d = Detector::new(
        common::test_card(Fit::Whole, 64, 32),
        Arc::new(common::Flat(Device::Cpu)),
    );
    let flat = DynamicImage::ImageLuma8(GrayImage::from_pixel(64, 64, Luma([128])));
    let square = with_square(64, 40, 10);
    let r = d.inspect_batch(&[&flat, &square], Overrides::default()).unwrap();
    assert!(r[0].score < 1e-3 && !r[0].is_anomalous && r[0].regions.is_empty());
    assert!(r[1].is_anomalous);
    assert_eq!(r[1].regions.len(), 1);
    let reg = &r[1].regions[0];
    // The region contains the square's centre.
    assert!(
        reg.x <= 44 && reg.x + reg.width >= 44 && reg.y <= 14 && reg.y + reg.height >= 14,
        "{reg:?}"
    );
    // A per-request threshold above the score turns the verdict and removes the regions.
    let r = d
        .inspect_batch(
            &[&square],
            Overrides {
                threshold: Some(r[1].score * 2.0),
                alpha: None,
            },
        )
        .unwrap();
    assert!(!r[0].is_anomalous && r[0].regions.is_empty());
}

#[test]
fn a_map_of_nan_is_judged_anomalous_not_good() {
    // Decoding refuses non-finite samples; a model that makes NaN of a good image all the
    // same must not pass it. The flat reconstructor's map is NaN where the image is.
    let d = Detector::new(
        common::test_card(Fit::Whole, 64, 32),
        Arc::new(common::Flat(Device::Cpu)),
    );
    let nan = DynamicImage::ImageRgb32F(image::Rgb32FImage::from_pixel(64, 64, image::Rgb([f32::NAN; 3])));
    let r = d.inspect_batch(&[&nan], Overrides::default()).unwrap();
    assert_eq!(r[0].score, f32::INFINITY, "ranked above every part");
    assert!(r[0].is_anomalous);
}

#[test]
fn calibration_refuses_a_good_image_the_model_scores_as_nan() {
    use vigil::image_io::Planar;
    use vigil::train::calibrate::{calibrate, CalibrationConfig, CalibrationError, Scales};
    let mut d = Detector::new(
        common::test_card(Fit::Whole, 64, 32),
        Arc::new(common::Flat(Device::Cpu)),
    );
    let plane = |v: f32| {
        let mut p = Planar::new(1, 64, 64);
        p.data.iter_mut().for_each(|x| *x = v);
        p
    };
    // 120 images: the 0.99 quantile is the second highest score, finite, while the
    // validation scores' statistics would hold ∞ and NaN, which model.json cannot keep.
    let mut images: Vec<Planar> = (0..119).map(|i| plane(0.3 + 0.001 * i as f32)).collect();
    images.insert(7, plane(f32::NAN));
    let err = calibrate(
        &mut d,
        &images,
        &CalibrationConfig::default(),
        Scales::Keep,
        "test".into(),
    )
    .unwrap_err();
    match err {
        CalibrationError::NotFiniteScore { number, count, score } => {
            assert_eq!((number, count, score), (8, 120, f32::INFINITY))
        }
        other => panic!("{other}"),
    }
    images.remove(7);
    assert!(calibrate(
        &mut d,
        &images,
        &CalibrationConfig::default(),
        Scales::Keep,
        "test".into()
    )
    .is_ok());
    assert!(d.card.validation_scores.max.is_finite());
}

#[test]
fn maps_above_one_keep_their_regions_in_images_of_another_size() {
    // Error maps divided by a small scale, as a reconstruction family's are by its good
    // images' mean: values far above 1, thresholds too. Resizing such a map to a 100 × 80
    // image once clamped it to [0, 1], so an anomalous verdict came back with no region.
    let mut card = common::test_card(Fit::Whole, 64, 32);
    card.scoring.ssim_scale = 0.01;
    card.scoring.l2_scale = 0.01;
    card.thresholds.image = 5.0;
    card.thresholds.pixel = 3.0;
    let d = Detector::new(card, Arc::new(common::Flat(Device::Cpu)));
    let mut g = GrayImage::from_pixel(100, 80, Luma([128]));
    for y in 30..45 {
        for x in 60..75 {
            g.put_pixel(x, y, Luma([255]));
        }
    }
    let r = &d
        .inspect_batch(&[&DynamicImage::ImageLuma8(g)], Overrides::default())
        .unwrap()[0];
    assert!(r.is_anomalous && r.score > 5.0, "{}", r.score);
    assert_eq!(r.regions.len(), 1, "{:?}", r.regions);
    let reg = &r.regions[0];
    assert!(reg.peak > 5.0, "{reg:?}");
    assert!(
        reg.x <= 67 && reg.x + reg.width >= 67 && reg.y <= 37 && reg.y + reg.height >= 37,
        "{reg:?}"
    );
    let map = r.map();
    assert!(map.iter().copied().fold(0.0f32, f32::max) > 5.0);
}

#[test]
fn maps_come_back_at_the_images_own_resolution() {
    let d = Detector::new(
        common::test_card(Fit::Whole, 64, 32),
        Arc::new(common::Flat(Device::Cpu)),
    );
    let img = DynamicImage::ImageLuma8(GrayImage::from_pixel(90, 50, Luma([10])));
    let r = d.inspect_batch(&[&img], Overrides::default()).unwrap();
    assert_eq!((r[0].width, r[0].height, r[0].map().len()), (90, 50, 4500));
}

#[test]
fn an_image_of_another_size_than_the_training_images_is_judged_with_a_warning() {
    let mut card = common::test_card(Fit::Whole, 64, 32);
    let img = |w, h| DynamicImage::ImageLuma8(GrayImage::from_pixel(w, h, Luma([10])));
    // A card that does not record its training images' size warns of nothing.
    let d = Detector::new(card.clone(), Arc::new(common::Flat(Device::Cpu)));
    assert!(d.inspect_batch(&[&img(90, 50)], Overrides::default()).unwrap()[0]
        .warnings
        .is_empty());
    card.training.image_size = Some([90, 50]);
    card.training.colour = Some("grey".into());
    let d = Detector::new(card.clone(), Arc::new(common::Flat(Device::Cpu)));
    let r = d
        .inspect_batch(&[&img(90, 50), &img(180, 100), &img(50, 90)], Overrides::default())
        .unwrap();
    assert!(r[0].warnings.is_empty());
    for other in &r[1..] {
        assert_eq!(other.warnings.len(), 1);
        assert!(
            other.warnings[0].contains("trained on 90×50 images"),
            "{:?}",
            other.warnings
        );
    }
    // A colour image to this grayscale model: judged on its brightness, and told so. An
    // RGB image that holds only greys is not colour.
    let mut rgb = image::RgbImage::from_pixel(90, 50, image::Rgb([90, 90, 90]));
    let grey_rgb = DynamicImage::ImageRgb8(rgb.clone());
    rgb.pixels_mut().for_each(|p| *p = image::Rgb([150, 60, 40]));
    let colour = DynamicImage::ImageRgb8(rgb);
    let r = d.inspect_batch(&[&grey_rgb, &colour], Overrides::default()).unwrap();
    assert!(r[0].warnings.is_empty(), "{:?}", r[0].warnings);
    assert_eq!(r[1].warnings.len(), 1);
    assert!(
        r[1].warnings[0].contains("judges its brightness only"),
        "{:?}",
        r[1].warnings
    );
    // Judged against the training images: trained on colour, a grey image is told; trained
    // on a mix, nothing is.
    for (trained, warned) in [("colour", [true, false]), ("mixed", [false, false])] {
        card.training.colour = Some(trained.into());
        let d = Detector::new(card.clone(), Arc::new(common::Flat(Device::Cpu)));
        let r = d.inspect_batch(&[&grey_rgb, &colour], Overrides::default()).unwrap();
        let told: Vec<bool> = r.iter().map(|i| !i.warnings.is_empty()).collect();
        assert_eq!(told, warned, "trained on {trained}: {r:?}");
    }
}

#[test]
fn tiles_cover_the_image_and_agree_with_whole_fitting_away_from_tile_borders() {
    let whole = Detector::new(
        common::test_card(Fit::Whole, 64, 32),
        Arc::new(common::Flat(Device::Cpu)),
    );
    let tiled = Detector::new(
        common::test_card(Fit::Tiles { stride: 16 }, 64, 32),
        Arc::new(common::Flat(Device::Cpu)),
    );
    assert_eq!(tiled.tile_origins().len(), 9);
    let img = with_square(64, 28, 28);
    let a = whole.inspect_batch(&[&img], Overrides::default()).unwrap();
    let b = tiled.inspect_batch(&[&img], Overrides::default()).unwrap();
    // The flat reconstruction is the same everywhere, so the L2 part agrees exactly and the
    // SSIM part differs only where a tile border cuts the window: the peaks are close.
    assert!(
        (a[0].score - b[0].score).abs() < 0.25 * a[0].score,
        "{} vs {}",
        a[0].score,
        b[0].score
    );
}

#[test]
fn a_batch_scores_exactly_as_one_by_one() {
    let dev = Device::Cpu;
    let net = Network::new_seeded(
        &Architecture::Spatial {
            width: 4,
            bottleneck: 2,
        },
        1,
        32,
        &dev,
        3,
    )
    .unwrap();
    let d = Detector::new(common::test_card(Fit::Whole, 64, 32), Arc::new(net));
    let imgs: Vec<DynamicImage> = (0..5).map(|i| with_square(64, 5 + 9 * i, 50 - 8 * i)).collect();
    let refs: Vec<&DynamicImage> = imgs.iter().collect();
    let batch = d.inspect_batch(&refs, Overrides::default()).unwrap();
    for (img, b) in imgs.iter().zip(&batch) {
        let one = d.inspect_batch(&[img], Overrides::default()).unwrap();
        assert!(
            (one[0].score - b.score).abs() <= 1e-5 * b.score.abs().max(1.0),
            "{} vs {}",
            one[0].score,
            b.score
        );
        assert_eq!(one[0].regions.len(), b.regions.len());
    }
}

//! Golden tests on the bundled models: the samples keep their verdicts and their scores
//! stay near the values recorded when each model was trained.
//!
//! `models/default` is the default family (draem); `models/spatial` is the reconstruction
//! model that was the default before, kept as written by that vigil: it is the test that
//! artifacts of earlier versions still load and score as they did.

mod common;

use serde_json::Value;

/// Scores and verdicts of the bundled samples, recorded with `vigil inspect --model
/// models/default models/default/samples` when models/default was trained. Tolerance: 2%
/// (float summation order may differ across machines and thread counts). The draem model
/// scores the faint contamination sample under its threshold (0.609): the verdict is
/// recorded as it is.
const GOLDEN_DEFAULT: &[(&str, f64, bool)] = &[
    ("contamination_1.png", 0.4857, false),
    ("good_1.png", 0.2980, false),
    ("good_2.png", 0.3602, false),
    ("hole_1.png", 0.9603, true),
    ("scratch_1.png", 0.8619, true),
    ("stain_1.png", 0.9089, true),
];

/// The same for `models/spatial`, recorded when it was trained (vigil 0.1.0, before the
/// model seam); unchanged since. It flags every defective sample.
const GOLDEN_SPATIAL: &[(&str, f64, bool)] = &[
    ("contamination_1.png", 66.437, true),
    ("good_1.png", 8.976, false),
    ("good_2.png", 10.023, false),
    ("hole_1.png", 97.494, true),
    ("scratch_1.png", 47.458, true),
    ("stain_1.png", 28.168, true),
];

fn check_golden(model: &str, golden: &[(&str, f64, bool)]) {
    let records = common::inspect_bundled_samples(model);
    assert_eq!(records.len(), golden.len());
    for &(name, want, anomalous) in golden {
        let r = common::record_for(&records, name);
        let got = r["score"].as_f64().unwrap();
        assert!(
            (got - want).abs() <= 0.02 * want,
            "{model} {name}: score {got}, golden {want}"
        );
        assert_eq!(r["is_anomalous"].as_bool().unwrap(), anomalous, "{model} {name}");
        assert_eq!(
            r["regions"].as_array().unwrap().is_empty(),
            !anomalous,
            "{model} {name}: regions only on anomalous verdicts"
        );
    }
}

#[test]
fn bundled_default_samples_keep_their_verdicts_and_scores() {
    check_golden("default", GOLDEN_DEFAULT);
}

#[test]
fn a_model_written_before_the_model_seam_still_loads_and_scores_as_it_did() {
    check_golden("spatial", GOLDEN_SPATIAL);
}

#[test]
fn bundled_model_cards_are_complete_and_did_not_collapse() {
    let root = env!("CARGO_MANIFEST_DIR");
    for (model, family) in [("default", "draem"), ("spatial", "spatial")] {
        let card: Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{root}/models/{model}/model.json")).unwrap())
                .unwrap();
        assert_eq!(card["architecture"]["name"], family);
        assert_eq!(card["training"]["collapse"]["collapsed"], false, "{model}");
        assert!(
            card["training"]["collapse"]["contrast_ratio"].as_f64().unwrap() > 0.5,
            "{model}"
        );
        assert_eq!(card["training"]["steps"], card["training"]["planned_steps"], "{model}");
        assert!(
            card["training"]["loss_curve"].as_array().unwrap().len() >= 50,
            "{model}"
        );
        let size = std::fs::metadata(format!("{root}/models/{model}/weights.safetensors"))
            .unwrap()
            .len();
        assert!(size < 5 << 20, "{model}: bundled weights stay small: {size} bytes");
    }
}

/// `vigil calibrate` warns when given the images a model was trained on by comparing
/// fingerprints, so the default card's must be that of the set its README command trains
/// on: the synthetic set `vigil synth` writes. (The card once kept a fingerprint of an
/// earlier recipe, and calibrating it on its own training images gave no warning.)
#[test]
fn the_default_cards_data_fingerprint_is_that_of_the_set_it_was_trained_on() {
    let root = env!("CARGO_MANIFEST_DIR");
    let card: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{root}/models/default/model.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    vigil::synth::generate(dir.path(), &vigil::synth::SynthConfig::default()).unwrap();
    let files = vigil::train::dataset::training_files(dir.path()).unwrap();
    let set = vigil::train::dataset::load_set(&files, None, 256, u64::MAX).unwrap();
    assert_eq!(card["data_fingerprint"].as_str(), Some(set.fingerprint.as_str()));
}

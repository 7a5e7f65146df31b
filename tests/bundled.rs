//! Golden tests on the bundled model: its samples keep their verdicts and their scores
//! stay near the values recorded when the model was trained.

mod common;

use serde_json::Value;

/// Scores of the bundled samples, recorded with `vigil inspect --model models/default
/// models/default/samples` when models/default was trained. Tolerance: 2% (float
/// summation order may differ across machines and thread counts).
const GOLDEN: &[(&str, f64)] = &[
    ("contamination_1.png", 66.437),
    ("good_1.png", 8.976),
    ("good_2.png", 10.023),
    ("hole_1.png", 97.494),
    ("scratch_1.png", 47.458),
    ("stain_1.png", 28.168),
];

#[test]
fn bundled_samples_keep_their_verdicts_and_scores() {
    let root = env!("CARGO_MANIFEST_DIR");
    let o = common::run(&[
        "inspect",
        "--model",
        &format!("{root}/models/default"),
        &format!("{root}/models/default/samples"),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let records: Vec<Value> = common::stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), GOLDEN.len());
    for (name, want) in GOLDEN {
        let r = records
            .iter()
            .find(|r| r["path"].as_str().unwrap().ends_with(name))
            .unwrap_or_else(|| panic!("{name} missing"));
        let got = r["score"].as_f64().unwrap();
        assert!((got - want).abs() <= 0.02 * want, "{name}: score {got}, golden {want}");
        let defective = !name.starts_with("good");
        assert_eq!(r["is_anomalous"].as_bool().unwrap(), defective, "{name}");
        assert_eq!(
            r["regions"].as_array().unwrap().is_empty(),
            !defective,
            "{name}: regions only on defects"
        );
    }
}

#[test]
fn bundled_model_card_is_complete_and_did_not_collapse() {
    let root = env!("CARGO_MANIFEST_DIR");
    let card: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{root}/models/default/model.json")).unwrap()).unwrap();
    assert_eq!(card["training"]["collapse"]["collapsed"], false);
    assert!(card["training"]["collapse"]["contrast_ratio"].as_f64().unwrap() > 0.5);
    assert_eq!(card["training"]["steps"], card["training"]["planned_steps"]);
    assert!(card["training"]["loss_curve"].as_array().unwrap().len() >= 50);
    let size = std::fs::metadata(format!("{root}/models/default/weights.safetensors"))
        .unwrap()
        .len();
    assert!(size < 5 << 20, "bundled weights stay small: {size} bytes");
}

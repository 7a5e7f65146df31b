//! The CLI's subcommands: argument structs in, work done through the library, exit codes out.

pub mod bench;
pub mod eval;
pub mod inspect;
pub mod train;

use std::path::{Path, PathBuf};

use crate::cli::CalibrationArgs;
use crate::detector::Detector;
use crate::model::device::{self, DeviceChoice};
use crate::scoring::MapMethod;
use crate::train::{CalibrationConfig, ThresholdMethod};

impl CalibrationArgs {
    /// The calibration for a new model whose anomaly map is made by `map`: what is not
    /// given takes the defaults.
    pub fn config(&self, map: MapMethod) -> CalibrationConfig {
        let defaults = CalibrationConfig::default();
        CalibrationConfig {
            method: self.threshold_method.unwrap_or(defaults.method),
            quantile: self.quantile.unwrap_or(defaults.quantile),
            margin: self.margin.unwrap_or_else(|| CalibrationConfig::default_margin(map)),
            min_defect_area: self.min_defect_area.unwrap_or(defaults.min_defect_area),
        }
    }

    /// The calibration for a model calibrated before: what is not given stays as `model`'s
    /// thresholds record it (a model set by `min-area`, or with a margin chosen for its
    /// line, keeps it). A card whose method is not one vigil knows takes the defaults.
    pub fn config_keeping(&self, model: &crate::model::artifact::Thresholds, map: MapMethod) -> CalibrationConfig {
        let Some(method) = ThresholdMethod::from_name(&model.method) else {
            return self.config(map);
        };
        CalibrationConfig {
            method: self.threshold_method.unwrap_or(method),
            quantile: self.quantile.unwrap_or(model.quantile),
            margin: self.margin.unwrap_or(model.margin),
            min_defect_area: self.min_defect_area.unwrap_or(model.min_defect_area),
        }
    }
}

/// Loads a model on the chosen device.
pub fn load_detector(dir: &Path, choice: DeviceChoice) -> anyhow::Result<Detector> {
    let device = device::select(choice)?;
    Ok(Detector::load(dir, &device)?)
}

/// `vigil calibrate`: new thresholds from good images, weights untouched.
pub fn calibrate(args: &crate::cli::CalibrateArgs) -> anyhow::Result<()> {
    use crate::train::{calibrate, dataset};
    if let Some(image) = args.image_threshold {
        // Only the card changes: the weights are not loaded for it.
        return set_threshold(&args.model, image);
    }
    let mut detector = load_detector(&args.model, args.device)?;
    let views_before = detector.card.scoring.test_time_flips;
    if let Some(flips) = args.views.test_time_flips {
        let trained_with_flips = detector.card.training.augment.iter().any(|a| a == "flips");
        train::check_test_time_flips(flips, trained_with_flips).map_err(anyhow::Error::msg)?;
    }
    let views = args.views.test_time_flips.unwrap_or(views_before);
    let rescored = views != views_before;
    let data = args
        .data
        .as_ref()
        .expect("clap requires --data without --image-threshold");
    let files = dataset::training_files(data)?;
    let set = dataset::load_set(
        &files,
        Some(detector.card.input.channels),
        detector.card.input.working_size,
        args.limit.max_pixels,
    )?;
    // As `vigil inspect` warns per image: thresholds set on images unlike the training
    // images (another size or colour) fit those, not the parts the model was made for.
    let unlike = match set.image_size {
        Some((w, h)) => detector.input_warnings(w as usize, h as usize, set.any_colour),
        None if detector.card.training.image_size.is_some() => {
            vec!["the images are of several sizes; this model was trained on images of one size".into()]
        }
        None => Vec::new(),
    };
    if !unlike.is_empty() {
        tracing::warn!(
            "calibrating on images unlike the training images: {}",
            unlike.join("; ")
        );
    }
    if set.fingerprint == detector.card.data_fingerprint {
        tracing::warn!(
            "these are the images this model was trained on (the same fingerprint): thresholds set on them are \
             optimistic, and will flag good parts it has not seen; calibrate on good images held out of training"
        );
    }
    let before = detector.card.thresholds.clone();
    let config = args.calibration.config_keeping(&before, detector.card.scoring.method);
    if config.method == ThresholdMethod::MinArea
        && (args.calibration.quantile.is_some() || args.calibration.margin.is_some())
    {
        tracing::warn!(
            "--quantile and --margin do not set a min-area threshold (it has no margin): recorded for a later \
             switch to the quantile method"
        );
    }
    let set_by = format!(
        "vigil calibrate on {} image(s) of {} at {}",
        set.images.len(),
        data.display(),
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    // Scored as the model scored before, to compare with the threshold before: another
    // pass over the images when the views change, or the threshold rule (a min-area
    // threshold is a map level, not a score, and its level depends on the minimum area),
    // as the new scores do not compare.
    let levels_after = config.method == ThresholdMethod::MinArea;
    let rule_changed = before.scores_are_levels() != levels_after
        || (levels_after && before.min_defect_area != config.min_defect_area);
    let scores_before = if rescored || rule_changed {
        Some(scores_of(&detector, &set.images)?)
    } else {
        None
    };
    detector.card.scoring.test_time_flips = views;
    // The scales stay: scores before and after are on one scale, so the old and new
    // thresholds compare, and so do scores already recorded. New views make new maps:
    // their scales are measured again, as training measures them.
    let scales = if rescored {
        calibrate::Scales::Measure
    } else {
        calibrate::Scales::Keep
    };
    let scores_after = calibrate::calibrate(&mut detector, &set.images, &config, scales, set_by)?;
    // A threshold that cannot work is not written: a defective part among the images (or
    // a wild --margin) would turn the model's detection off, and a running server would
    // take it up.
    if let Some(warning) = calibrate::threshold_warning(&detector.card) {
        let highest: Vec<String> = highest_first(&set.files, &scores_after, data, |_| true)
            .into_iter()
            .take(3)
            .collect();
        anyhow::bail!(
            "{warning}; model.json is left unchanged. Calibrate on good images only (the highest scores here: {}), \
             or change --margin or --quantile, or set a threshold by hand with --image-threshold",
            highest.join(", ")
        );
    }
    // Minutes have passed: a model trained into this folder meanwhile (`vigil train --out`,
    // a server's job) must not get this card, whose weights hash is the old model's (it
    // would no longer load).
    let now = crate::model::ModelCard::load(&args.model)?;
    if now.weights_sha256 != detector.card.weights_sha256 {
        anyhow::bail!(
            "{}: the model changed while it was being calibrated (its weights are not those calibrated);              model.json is left as the new model wrote it: calibrate again",
            args.model.display()
        );
    }
    detector.card.save(&args.model)?;
    if let Some(note) = calibrate::few_images_note(set.images.len()) {
        tracing::warn!("{note}");
    }
    // Named, highest first, so that they can be looked at.
    let above = highest_first(&set.files, scores_before.as_ref().unwrap_or(&scores_after), data, |v| {
        v > before.image
    });
    if !above.is_empty() {
        const SHOWN: usize = 10;
        let mut named: Vec<String> = above.iter().take(SHOWN).cloned().collect();
        if above.len() > SHOWN {
            named.push(format!("and {} more", above.len() - SHOWN));
        }
        tracing::warn!(
            "{} of {} calibration images scored above the threshold before ({:.4}): {}; after a change of light \
             or material that is expected, but if any of them shows a defect the new threshold will let such \
             defects through",
            above.len(),
            set.images.len(),
            before.image,
            named.join(", ")
        );
    }
    let t = &detector.card.thresholds;
    let method = match config.method {
        ThresholdMethod::Quantile => format!(
            "quantile {} × (1 + margin {}), min area {} px",
            t.quantile, t.margin, t.min_defect_area
        ),
        ThresholdMethod::MinArea => format!("min-area, {} px", t.min_defect_area),
    };
    let changed = if (t.method.as_str(), t.quantile, t.margin, t.min_defect_area)
        == (
            before.method.as_str(),
            before.quantile,
            before.margin,
            before.min_defect_area,
        ) {
        "the model's own settings".to_string()
    } else {
        format!(
            "settings changed from {} (quantile {}, margin {}, min area {})",
            before.method, before.quantile, before.margin, before.min_defect_area
        )
    };
    let views = if rescored {
        let name = |f: crate::scoring::TestTimeFlips| {
            clap::ValueEnum::to_possible_value(&f).map_or_else(String::new, |v| v.get_name().to_owned())
        };
        format!(
            "; test-time flips {} (was {}): scores before and after do not compare",
            name(detector.card.scoring.test_time_flips),
            name(views_before)
        )
    } else {
        String::new()
    };
    println!(
        "calibrated on {} good image(s): image threshold {:.4} (was {:.4}), pixel threshold {:.4} (was {:.4}); {method}, {changed}{views}",
        set.images.len(),
        t.image,
        before.image,
        t.pixel,
        before.pixel,
    );
    Ok(())
}

/// "name score" of each file whose score `keep`s, highest first, named within `data`.
fn highest_first(files: &[PathBuf], scores: &[f32], data: &Path, keep: impl Fn(f32) -> bool) -> Vec<String> {
    let mut ranked: Vec<(&PathBuf, f32)> = files
        .iter()
        .zip(scores.iter().copied())
        .filter(|&(_, v)| keep(v))
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    ranked
        .iter()
        .map(|(f, v)| format!("{} {v:.4}", f.strip_prefix(data).unwrap_or(f).display()))
        .collect()
}

/// Each image's score as `detector` scores it.
fn scores_of(detector: &Detector, images: &[crate::image_io::Planar]) -> anyhow::Result<Vec<f32>> {
    let mut scores = Vec::with_capacity(images.len());
    for chunk in images.chunks(crate::detector::MAX_CHUNK) {
        let refs: Vec<&crate::image_io::Planar> = chunk.iter().collect();
        for r in detector.reconstruct(&refs)? {
            scores.push(detector.working_map(&r.raw, None).1);
        }
    }
    Ok(scores)
}

/// `vigil calibrate --image-threshold`: a threshold chosen by hand, recorded as such.
fn set_threshold(dir: &Path, image: f32) -> anyhow::Result<()> {
    let mut card = crate::model::ModelCard::load(dir)?;
    let before = card.thresholds.clone();
    let t = &mut card.thresholds;
    t.image = image;
    t.manual = true;
    t.set_by = Some(format!(
        "vigil calibrate --image-threshold {image} at {} (was {})",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        before.image,
    ));
    card.save(dir)?;
    if let Some(warning) = crate::train::calibrate::threshold_warning(&card) {
        tracing::warn!("{warning}");
    }
    let t = &card.thresholds;
    println!(
        "image threshold {:.4} (was {:.4}), set by hand; pixel threshold {:.4} (regions are cut at the lower of the \
         two); a server serving this folder takes it up at its next scan of the models folder (every 30 s by \
         default), or at once at POST /v1/models/<name>/reload",
        t.image, before.image, t.pixel
    );
    Ok(())
}

/// `vigil synth`.
pub fn synth(args: &crate::cli::SynthArgs) -> anyhow::Result<()> {
    let cfg = crate::synth::SynthConfig {
        size: args.size,
        train_good: args.train_good,
        test_good: args.test_good,
        test_defective: args.test_defective,
        seed: args.seed,
    };
    crate::synth::generate(&args.out, &cfg)?;
    println!("wrote a synthetic data set to {}", args.out.display());
    Ok(())
}

/// `vigil probe URL`: GET over plain HTTP/1.1; Ok when the status is 200.
pub fn probe(args: &crate::cli::ProbeArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let rest = args
        .url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("only http:// URLs"))?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let timeout = std::time::Duration::from_secs_f64(args.timeout);
    let url = &args.url;
    let addr = host
        .to_socket_addrs()
        .with_context(|| format!("{url}: cannot resolve {host}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{url}: cannot resolve {host}"))?;
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("{url}: cannot connect"))?;
    s.set_read_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).with_context(|| format!("{url}: no answer"))?;
    let status = String::from_utf8_lossy(&head[9..12]).to_string();
    anyhow::ensure!(status == "200", "{} answered {status}", args.url);
    Ok(())
}

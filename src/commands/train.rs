//! `vigil train`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};

use crate::cli::{ArchName, Channels, FitName, ScoringArgs, TrainArgs};
use crate::model::artifact::Fit;
use crate::model::{device, Architecture};
use crate::scoring::{MapMethod, MapSpec, Reduction, TestTimeFlips};
use crate::train::{self, Augment, TrainConfig};

pub fn run(args: &TrainArgs, threads: usize) -> anyhow::Result<()> {
    let cfg = config(args, threads)?;
    train::check_output(&args.out)?;
    // Before "training from …" is logged: a mistyped folder is the whole message.
    train::dataset::check_folder(&args.data)?;
    if args.out.join(crate::model::artifact::CARD_FILE).is_file() {
        tracing::info!(
            "{} holds a model: it is replaced when this training ends",
            args.out.display()
        );
    }
    let steps = cfg.steps;
    // First Ctrl-C (or SIGTERM, as `docker stop`, `timeout` and a cancelled CI job send):
    // finish the current step, calibrate and write the model (nothing, within the first
    // tenth of the steps). Second: quit.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\nstopping (Ctrl-C or SIGTERM): finishing the current step, then calibrating and writing the model, \
             unless under a tenth of the steps is done (Ctrl-C again to abort)"
        );
    })
    .context("installing the Ctrl-C handler")?;
    let budget = match cfg.time_budget {
        Some(b) => format!(", fewer if they do not fit {:.1} minutes", b.as_secs_f64() / 60.0),
        None => String::new(),
    };
    // The images are counted once they are loaded (listing them here as well warned twice
    // of each link that leads nowhere).
    tracing::info!(
        "training from {} ({steps} steps of {}{budget})",
        args.data.display(),
        args.batch_size
    );
    let card = train::train(&cfg, &stop)?;
    let t = &card.training;
    println!(
        "wrote {}: {} steps in {:.0} s, final loss {:.4}, contrast kept {:.0}%{}; image threshold {:.4}, pixel threshold {:.4} ({})",
        args.out.display(),
        t.steps,
        t.seconds,
        t.final_loss,
        t.collapse.contrast_ratio * 100.0,
        if t.collapse.collapsed { " (COLLAPSED: see model.json)" } else { "" },
        card.thresholds.image,
        card.thresholds.pixel,
        if card.thresholds.set_by.as_deref() == Some(train::CALIBRATED_ON_TRAINING_IMAGES) {
            format!("calibrated on the {} it trained on", plural(card.thresholds.validation_images, "image"))
        } else {
            plural(card.thresholds.validation_images, "validation image")
        }
    );
    if t.stopped_early {
        return Err(train::TrainError::StoppedEarlyWritten {
            done: t.steps,
            planned: t.planned_steps,
            out: args.out.display().to_string(),
        }
        .into());
    }
    Ok(())
}

/// "1 image", "2 images".
fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// The training configuration `args` describe, with the defaults of each family: what
/// `vigil train` runs, and what a training job started from the server runs.
pub fn config(args: &TrainArgs, threads: usize) -> anyhow::Result<TrainConfig> {
    let architecture = match args.arch {
        ArchName::Spatial => Architecture::Spatial {
            width: args.width,
            bottleneck: args.bottleneck,
        },
        ArchName::Bergmann => Architecture::Bergmann { latent: args.latent },
        ArchName::Draem => Architecture::Draem {
            width: args.width,
            bottleneck: args.bottleneck,
            segmenter_width: args.segmenter_width,
            segmenter_depth: args.segmenter_depth,
            error_maps: args.segmenter_error_maps.unwrap_or(false),
            joint_training: args.joint_training,
        },
        ArchName::Usad => Architecture::Usad {
            width: args.width,
            bottleneck: args.bottleneck,
            alpha: args.alpha,
        },
        ArchName::Adversarial => Architecture::Adversarial {
            width: args.width,
            bottleneck: args.bottleneck,
            critic_width: args.critic_width,
            adversarial_weight: args.adversarial_weight,
        },
        ArchName::Vae => Architecture::Vae {
            width: args.width,
            bottleneck: args.bottleneck,
            beta: args.beta,
            kl_warmup_steps: args.kl_warmup,
        },
    };
    let discriminative = matches!(architecture, Architecture::Draem { .. });
    let default_fit = if args.resize || architecture.fully_convolutional() {
        FitName::Whole
    } else {
        FitName::Tiles
    };
    let patch_size = if args.resize { args.size } else { args.patch };
    let fit = match args.fit.unwrap_or(default_fit) {
        FitName::Whole => Fit::Whole,
        FitName::Tiles => Fit::Tiles { stride: args.stride },
    };
    let mut augment = Augment {
        flips: false,
        rotations: false,
        brightness: 0.0,
        inpaint_fraction: 0.0,
        anomaly_fraction: 0.0,
    };
    // The discriminative family learns what is out of place, so its training crops keep
    // their orientation: with quarter turns, a piece of grain turned across the grain
    // would be normal (on the development set, dropping rot90 together with turned and
    // rescaled pastes raised cut-paste image AUROC on bamboo from 0.42 to 0.62).
    let default_augment: Vec<String> = if discriminative {
        ["flips", "brightness", "anomalies"].map(String::from).to_vec()
    } else {
        ["flips", "rot90", "brightness", "inpaint"].map(String::from).to_vec()
    };
    for a in args.augment.as_ref().unwrap_or(&default_augment) {
        match a.as_str() {
            "flips" => augment.flips = true,
            "rot90" => augment.rotations = true,
            "brightness" => augment.brightness = 0.05,
            "inpaint" => augment.inpaint_fraction = 0.8,
            // Half the crops stay clean, as DRAEM trains: the segmenter must also learn
            // to say "nothing here".
            "anomalies" => augment.anomaly_fraction = 0.5,
            "none" => {}
            other => {
                bail!("unknown augmentation {other:?} (choose from flips, rot90, brightness, inpaint, anomalies, none)")
            }
        }
    }
    if let Some(flips) = args.scoring.views.test_time_flips {
        check_test_time_flips(flips, augment.flips).map_err(anyhow::Error::msg)?;
    }
    if discriminative && augment.anomaly_fraction == 0.0 {
        bail!("--arch draem learns from synthetic anomalies: include `anomalies` in --augment");
    }
    let steps = match args.epochs {
        // Only epochs need the images counted here; training lists them again itself.
        // Saturating: an absurd count is refused by the steps' bound, not wrapped round.
        // One crop per image trained on: the held-out images are not.
        Some(e) => {
            let images = train::dataset::training_files(&args.data)?.len();
            e.saturating_mul(images - train::held_out_count(images, args.validation_fraction))
                .div_ceil(args.batch_size.max(1))
                .max(1)
        }
        // Others: about 10 minutes each for 70–80 images of 256² on 2 cores; usad's step
        // runs the autoencoder about three times. draem: twice its first default of 1200
        // raised the mean image AUROC on six real surfaces with both seeds measured (seed
        // 123: 0.881 to 0.913); the time budget trims it on machines where it would not fit.
        None => args.steps.unwrap_or(match architecture {
            Architecture::Draem { .. } => 2400,
            Architecture::Usad { .. } => 1000,
            Architecture::Adversarial { .. } => 1600,
            _ => 2500,
        }),
    };
    let device = device::select(args.device)?;
    // Families whose own map is scored: draem's segmenter, usad's two decoders, and the
    // adversarial critic's feature distance (re-scoring the six dev-set adversarial
    // models: mean image / pixel AUROC 0.77 / 0.75 with it, 0.73 / 0.71 with the SSIM+L2
    // reconstruction error, AUPRO 0.67 either way).
    let own_map = discriminative
        || matches!(
            architecture,
            Architecture::Usad { .. } | Architecture::Adversarial { .. }
        );
    // Reconstruction-only families score the squared error alone: re-scoring the same
    // reconstructions on six real surfaces, it beat (1 − SSIM) + L2 on the mean of image
    // AUROC, pixel AUROC and AUPRO for the spatial model (0.754 / 0.766 / 0.721 against
    // 0.718 / 0.746 / 0.703) and for draem's reconstructor alike; SSIM's contrast and
    // structure terms flag fine texture the network cannot rebuild exactly, everywhere.
    let map_method = args
        .scoring
        .map
        .unwrap_or(if own_map { MapMethod::Learned } else { MapMethod::L2 });
    let cfg = TrainConfig {
        data: args.data.clone(),
        out: args.out.clone(),
        architecture,
        // Unless the caller chose, draem's segmenter reads error maps when the images turn
        // out to be colour: known only once they are loaded.
        error_maps_if_colour: discriminative && args.segmenter_error_maps.is_none(),
        channels: match args.channels {
            Channels::Gray => Some(1),
            Channels::Rgb => Some(3),
            Channels::Auto => None,
        },
        working_size: args.size,
        patch_size,
        fit,
        loss: args.loss,
        kernels: args.kernels,
        steps,
        time_budget: (args.steps.is_none() && args.epochs.is_none() && args.time_budget > 0.0)
            .then(|| std::time::Duration::from_secs_f64(args.time_budget * 60.0)),
        batch_size: args.batch_size,
        learning_rate: args.lr,
        validation_fraction: args.validation_fraction,
        max_pixels: args.limit.max_pixels,
        seed: args.seed,
        augment,
        map: map_spec(&args.scoring, map_method, discriminative, args.size),
        calibration: args.calibration.config(map_method),
        device,
        threads,
        progress: true,
        abandon_when_stopped: false,
        on_step: None,
    };
    Ok(cfg)
}

/// Flipped views are averaged only for a model trained on flipped images: to one trained
/// without, a mirrored part may be a defect everywhere (text, an oriented part).
pub fn check_test_time_flips(flips: TestTimeFlips, trained_with_flips: bool) -> Result<(), String> {
    if flips.is_none() || trained_with_flips {
        return Ok(());
    }
    Err(
        "--test-time-flips needs a model trained with flips (`flips` among --augment): to one trained \
         without, a mirrored good part need not look good"
            .into(),
    )
}

/// How the trained model's map is smoothed and its score read, from the options given.
/// draem's learned map: the returned map smoothed with σ 4, the score the mean of its
/// 100 highest unsmoothed pixels (per 256² of working resolution). Re-scoring eighteen
/// draem models (six real surfaces, three seeds), that ranked images better than the
/// maximum of the map smoothed with σ 2 (mean image AUROC 0.935 against 0.918, every seed
/// up): the top pixels average out the segmenter's single-pixel noise without spreading a
/// thin scratch into its surroundings as a spatial smoothing does. σ 4 then serves the
/// map's pixels alone (pixel AUROC / AUPRO 0.928 / 0.889 against 0.919 / 0.884 at σ 2).
/// Reconstruction-error maps: σ 4 and the maximum, for the score and the map alike.
fn map_spec(scoring: &ScoringArgs, method: MapMethod, discriminative: bool, size: usize) -> MapSpec {
    let top_k_default = discriminative.then(|| (100 * size * size).div_ceil(256 * 256));
    let reduction = match (scoring.top_k.or(top_k_default), scoring.score_filter) {
        (_, Some(size)) => Reduction::MeanFilterMax { size },
        (Some(k), None) => Reduction::TopKMean { k },
        (None, None) => Reduction::Max,
    };
    MapSpec {
        method,
        smoothing_sigma: scoring.smoothing.unwrap_or(4.0),
        reduction,
        score_smoothing_sigma: scoring.score_smoothing.or(discriminative.then_some(0.0)),
        test_time_flips: scoring.views.test_time_flips.unwrap_or_default(),
        ..MapSpec::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn scoring_of(extra: &[&str]) -> ScoringArgs {
        let mut argv = vec!["vigil", "train", "--data", "d", "--out", "o"];
        argv.extend_from_slice(extra);
        match crate::cli::Cli::try_parse_from(argv).unwrap().command {
            crate::cli::Command::Train(t) => t.scoring,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn map_spec_defaults_by_family_and_options_override_them() {
        let draem = map_spec(&scoring_of(&[]), MapMethod::Learned, true, 256);
        assert_eq!(draem.smoothing_sigma, 4.0);
        assert_eq!(draem.score_smoothing_sigma, Some(0.0));
        assert_eq!(draem.reduction, Reduction::TopKMean { k: 100 });
        // k scales with the working area: 100 per 256², rounded up.
        let small = map_spec(&scoring_of(&[]), MapMethod::Learned, true, 64);
        assert_eq!(small.reduction, Reduction::TopKMean { k: 7 });
        let spatial = map_spec(&scoring_of(&[]), MapMethod::L2, false, 256);
        assert_eq!(
            (spatial.reduction, spatial.score_smoothing_sigma),
            (Reduction::Max, None)
        );
        assert_eq!(spatial.smoothing_sigma, 4.0);

        let given = scoring_of(&["--top-k", "5", "--score-smoothing", "1.5", "--smoothing", "3"]);
        let draem = map_spec(&given, MapMethod::Learned, true, 256);
        assert_eq!(draem.reduction, Reduction::TopKMean { k: 5 });
        assert_eq!(draem.score_smoothing_sigma, Some(1.5));
        assert_eq!(draem.smoothing_sigma, 3.0);
        let filtered = map_spec(&scoring_of(&["--score-filter", "21"]), MapMethod::Learned, true, 256);
        assert_eq!(filtered.reduction, Reduction::MeanFilterMax { size: 21 });
        assert!(crate::cli::Cli::try_parse_from(["vigil", "train", "--data", "d", "--out", "o", "5"]).is_err());
    }
}

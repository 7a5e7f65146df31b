//! Training a model of any family on good images, then calibrating its thresholds. What
//! is common lives here (data, sampling, the loop with progress, loss curve, stop, NaN and
//! collapse checks, calibration); each family's step lives with its network in `model`.

pub mod anomalies;
pub mod augment;
pub mod budget;
pub mod calibrate;
pub mod dataset;
pub mod loss;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::detector::Detector;
use crate::image_io::Planar;
use crate::kernels::Kernels;
use crate::model::artifact::{
    CollapseCheck, Fit, InputSpec, ModelCard, ScoreStats, Thresholds, TimeBudget, TrainingSummary, SCHEMA_VERSION,
};
use crate::model::{device, Architecture, ArtifactError, Network, StepSettings, TrainBatch};
use crate::scoring::MapSpec;
pub use augment::Augment;
pub use calibrate::{CalibrationConfig, ThresholdMethod};
pub use loss::LossKind;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Dataset(#[from] dataset::DatasetError),
    #[error("invalid settings: {0}")]
    Config(String),
    #[error(transparent)]
    Device(#[from] device::DeviceError),
    #[error("model error: {0}")]
    Model(#[from] candle_core::Error),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error(transparent)]
    Calibration(#[from] calibrate::CalibrationError),
    #[error("stopped before the end; nothing was written")]
    Stopped,
    #[error(
        "stopped after {done} of {planned} steps, under a tenth of the training: nothing was \
         written (a model already in the output folder is untouched)"
    )]
    StoppedTooSoon { done: usize, planned: usize },
    /// The command line's Ctrl-C after the first tenth: the model was written, from fewer
    /// steps than planned (an error, so that a script sees more than a success).
    #[error(
        "interrupted: the model in {out} was written after {done} of {planned} steps; train again for the \
         full model"
    )]
    StoppedEarlyWritten { done: usize, planned: usize, out: String },
}

impl TrainError {
    /// True when the training ended because it was asked to stop (Ctrl-C, a cancelled job).
    pub fn is_stop(&self) -> bool {
        matches!(
            self,
            TrainError::Stopped | TrainError::StoppedTooSoon { .. } | TrainError::StoppedEarlyWritten { .. }
        )
    }
}

/// Where training stands after a step (for a caller that shows progress elsewhere).
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    pub step: usize,
    pub steps: usize,
    pub loss: f32,
    pub elapsed_s: f64,
}

/// Called after every training step.
#[derive(Clone)]
pub struct ProgressHook(pub Arc<dyn Fn(StepReport) + Send + Sync>);

impl std::fmt::Debug for ProgressHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressHook")
    }
}

/// Everything `vigil train` decides.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub data: PathBuf,
    pub out: PathBuf,
    pub architecture: Architecture,
    /// Draem only: when the images are colour, the segmenter also reads the error maps
    /// (`error_maps` in the architecture written to `model.json` says what was trained).
    pub error_maps_if_colour: bool,
    /// 1 or 3; None decides from the images (RGB when any has colour).
    pub channels: Option<usize>,
    pub working_size: usize,
    pub patch_size: usize,
    pub fit: Fit,
    pub loss: LossKind,
    pub kernels: Kernels,
    pub steps: usize,
    /// When set, `steps` is cut before training to what a probe of this machine's speed
    /// says fits in this time, end to end (see [`budget`]).
    pub time_budget: Option<Duration>,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub validation_fraction: f32,
    /// Largest training image read, in pixels (judged from its header).
    pub max_pixels: u64,
    pub seed: u64,
    pub augment: Augment,
    pub map: MapSpec,
    pub calibration: CalibrationConfig,
    pub device: Device,
    pub threads: usize,
    /// A progress bar on stderr.
    pub progress: bool,
    /// When `stop` is set: false (the command line's Ctrl-C) writes the model trained so
    /// far; true (a training job cancelled, or its server stopping) abandons the training
    /// at once, with [`TrainError::Stopped`] and nothing written.
    pub abandon_when_stopped: bool,
    pub on_step: Option<ProgressHook>,
}

/// Upper bounds on what one training may ask for: far above any setting that trains in
/// reasonable time here (the defaults are 256 px, batches of 16, 2400 steps, widths of
/// 16–32), they turn a typo or a hostile training job into an error before anything is
/// allocated. A job asking for a width of 1,000,000 asked for 128 TB, and the failed
/// allocation aborted the whole server.
pub const MAX_WORKING_SIZE: usize = 2048;
pub const MAX_BATCH_SIZE: usize = 256;
pub const MAX_STEPS: usize = 1_000_000;
/// Channels of a network's first stage (`width`, `segmenter_width`, `critic_width`).
pub const MAX_WIDTH: usize = 256;
/// Channels of a bottleneck or a latent vector.
pub const MAX_CODE: usize = 4096;
/// Values in one full-resolution activation (batch × first-stage width × pixels: of the
/// training crops, and of the images judged at once; the defaults: 16 × 32 × 128² = 8.4 M
/// and 16 × 32 × 256² = 34 M): the bounds above each allow far more together (256 × 256 ×
/// 2048², a terabyte). 1 G values (4 GB) still lets a 1024² working size train whole.
pub const MAX_ACTIVATION: usize = 1 << 30;
/// Tiles one image is cut into (the spatial default: 7 × 7).
pub const MAX_TILES: usize = 4096;

/// A setting's name, for the message that refuses it, and its value.
type NamedSize = (&'static str, usize);

impl TrainConfig {
    /// Checks the settings without reading any image, so a training job can refuse bad
    /// options before it is queued. [`train`] checks them again.
    pub fn check(&self) -> Result<(), TrainError> {
        if self.patch_size > self.working_size {
            return Err(TrainError::Config(format!(
                "patch size {} is larger than the working size {}",
                self.patch_size, self.working_size
            )));
        }
        self.check_bounds()?;
        if self.batch_size == 0 || self.steps == 0 {
            return Err(TrainError::Config("steps and batch size must be positive".into()));
        }
        if !(0.0..1.0).contains(&self.validation_fraction) {
            return Err(TrainError::Config("validation fraction must be in [0, 1)".into()));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(TrainError::Config(format!(
                "the learning rate must be a finite number above 0, not {}",
                self.learning_rate
            )));
        }
        self.calibration.validate()?;
        self.calibration.fits(self.working_size)?;
        self.map.check(self.working_size).map_err(TrainError::Config)?;
        if let Fit::Tiles { stride } = self.fit {
            // Wider steps than a tile leave strips of every image that no tile covers.
            // (Refused here, not when a card loads: cards trained before still load.)
            if stride > self.patch_size {
                return Err(TrainError::Config(format!(
                    "tile stride {stride} is larger than the patch size {}: parts of every image would go unseen",
                    self.patch_size
                )));
            }
        }
        // As the model card will be checked once written (channels, when left to the
        // images, are 1 or 3, and no family's sizes depend on which).
        let input = InputSpec {
            channels: self.channels.unwrap_or(1),
            working_size: self.working_size,
            patch_size: self.patch_size,
            fit: self.fit,
            normalisation: String::new(),
        };
        input.check(&self.architecture).map_err(TrainError::Config)
    }

    fn check_bounds(&self) -> Result<(), TrainError> {
        // The family's sizes: its networks' first-stage widths and its code sizes.
        let (widths, codes): (Vec<NamedSize>, Vec<NamedSize>) = match &self.architecture {
            Architecture::Bergmann { latent } => (vec![], vec![("latent size", *latent)]),
            Architecture::Spatial { width, bottleneck }
            | Architecture::Usad { width, bottleneck, .. }
            | Architecture::Vae { width, bottleneck, .. } => {
                (vec![("width", *width)], vec![("bottleneck", *bottleneck)])
            }
            Architecture::Draem {
                width,
                bottleneck,
                segmenter_width,
                ..
            } => (
                vec![("width", *width), ("segmenter width", *segmenter_width)],
                vec![("bottleneck", *bottleneck)],
            ),
            Architecture::Adversarial {
                width,
                bottleneck,
                critic_width,
                ..
            } => (
                vec![("width", *width), ("critic width", *critic_width)],
                vec![("bottleneck", *bottleneck)],
            ),
        };
        let mut sizes = vec![
            ("working size", self.working_size, MAX_WORKING_SIZE),
            ("batch size", self.batch_size, MAX_BATCH_SIZE),
            ("steps", self.steps, MAX_STEPS),
        ];
        sizes.extend(widths.iter().map(|&(name, value)| (name, value, MAX_WIDTH)));
        sizes.extend(codes.iter().map(|&(name, value)| (name, value, MAX_CODE)));
        if let Architecture::Vae { kl_warmup_steps, .. } = self.architecture {
            sizes.push(("KL warm-up steps", kl_warmup_steps, MAX_STEPS));
        }
        // Values per input pixel of the first stage's activation: its channels at full
        // resolution (Bergmann's: 32 channels at half resolution in each direction).
        let widest = match self.architecture {
            Architecture::Bergmann { .. } => 8,
            _ => widths.iter().map(|&(_, value)| value).max().unwrap_or(1),
        };
        if let Some((name, value, max)) = sizes.into_iter().find(|&(_, value, max)| value > max) {
            return Err(TrainError::Config(format!(
                "{name} {value} is over the most vigil trains, {max}"
            )));
        }
        // Training runs batches of crops; inference (calibration, then serving) up to
        // MAX_CHUNK whole images or tiles at once. Saturating: the bounds above hold each
        // factor, but not the product on every word size.
        let values = |n: usize, side: usize| n.saturating_mul(widest).saturating_mul(side.saturating_mul(side));
        let inference_side = match self.fit {
            Fit::Whole => self.working_size,
            Fit::Tiles { .. } => self.patch_size,
        };
        for (what, n, side) in [
            ("batch size", self.batch_size, self.patch_size),
            ("images judged at once", crate::detector::MAX_CHUNK, inference_side),
        ] {
            let activation = values(n, side);
            if activation > MAX_ACTIVATION {
                return Err(TrainError::Config(format!(
                    "{what} {n} × width {widest} × {side}² pixels is over what vigil trains ({} M values in one \
                     activation, at most {} M): lower the width or the size",
                    activation >> 20,
                    MAX_ACTIVATION >> 20
                )));
            }
        }
        if let Fit::Tiles { stride } = self.fit {
            if stride > 0 && self.patch_size <= self.working_size {
                let per_side = crate::detector::tile_axis(self.working_size, self.patch_size, stride).len();
                if per_side * per_side > MAX_TILES {
                    return Err(TrainError::Config(format!(
                        "{per_side}² tiles an image (patch {} every {stride} px of {}): at most {MAX_TILES}; \
                         raise --stride",
                        self.patch_size, self.working_size
                    )));
                }
            }
        }
        Ok(())
    }
}

/// How many of `images` are held out to calibrate at `fraction`: at least one and never
/// all, when there are two or more and the fraction is not 0.
pub fn held_out_count(images: usize, fraction: f32) -> usize {
    if images < 2 || fraction == 0.0 {
        0
    } else {
        ((images as f32 * fraction).round() as usize).clamp(1, images - 1)
    }
}

/// Trains, calibrates and writes the artifact to `cfg.out`. Setting `stop` ends training
/// early; the artifact is still calibrated and written, unless `cfg.abandon_when_stopped`.
pub fn train(cfg: &TrainConfig, stop: &Arc<AtomicBool>) -> Result<ModelCard, TrainError> {
    let started = Instant::now();
    // A stopped job (not the command line's Ctrl-C) ends at the next of these checks.
    let still_wanted = || {
        if cfg.abandon_when_stopped && stop.load(Ordering::SeqCst) {
            Err(TrainError::Stopped)
        } else {
            Ok(())
        }
    };
    cfg.check()?;
    check_output(&cfg.out)?;
    let files = dataset::training_files(&cfg.data)?;
    let set = dataset::load_set(&files, cfg.channels, cfg.working_size, cfg.max_pixels)?;
    still_wanted()?;
    let channels = set.images[0].channels;
    let mut architecture = cfg.architecture.clone();
    if let Architecture::Draem { error_maps, .. } = &mut architecture {
        *error_maps |= cfg.error_maps_if_colour && channels == 3;
    }

    // Hold out validation images for calibration (seeded, so reruns split alike).
    let mut order: Vec<usize> = (0..set.images.len()).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    order.shuffle(&mut rng);
    let n_val = held_out_count(set.images.len(), cfg.validation_fraction);
    let validation: Vec<Planar> = order[..n_val].iter().map(|&i| set.images[i].clone()).collect();
    let training: Vec<Planar> = order[n_val..].iter().map(|&i| set.images[i].clone()).collect();
    tracing::info!(
        "loaded {} image(s), {channels} channel(s): {} to train on, {n_val} held out to calibrate",
        set.images.len(),
        training.len()
    );

    let mut card = ModelCard {
        schema_version: SCHEMA_VERSION,
        vigil_version: env!("CARGO_PKG_VERSION").into(),
        architecture: architecture.clone(),
        input: InputSpec {
            channels,
            working_size: cfg.working_size,
            patch_size: cfg.patch_size,
            fit: cfg.fit,
            normalisation: "unit-range".into(),
        },
        scoring: cfg.map.clone(),
        thresholds: Thresholds {
            image: f32::INFINITY,
            pixel: f32::INFINITY,
            method: "uncalibrated".into(),
            quantile: 0.0,
            margin: 0.0,
            min_defect_area: cfg.calibration.min_defect_area,
            validation_images: 0,
            set_by: None,
            manual: false,
            level_scores: false,
        },
        validation_scores: ScoreStats::default(),
        training: TrainingSummary::default(),
        data_fingerprint: set.fingerprint.clone(),
        weights_sha256: None,
    };
    card.check().map_err(TrainError::Config)?;

    let mut net = Network::new_seeded(&architecture, channels, cfg.patch_size, &cfg.device, cfg.seed)?;
    net.set_kernels(cfg.kernels);
    tracing::info!(parameters = net.parameter_count(), "built {:?}", architecture);
    let (steps, budget_record) = match cfg.time_budget {
        None => (cfg.steps, None),
        Some(limit) => {
            let step = budget::probe_step(cfg, &architecture, channels, &training)?;
            let remaining = limit.saturating_sub(started.elapsed() + budget::reserve(limit));
            let steps = budget::steps_within(cfg.steps, step, remaining);
            let minutes = limit.as_secs_f64() / 60.0;
            let step_s = step.as_secs_f64();
            let fits = remaining.as_secs_f64() >= steps as f64 * step_s;
            if !fits {
                tracing::warn!(
                    "a step takes {step_s:.3} s on this machine: even the fewest steps vigil trains ({steps}) \
                     overrun the {minutes:.1}-minute budget (--time-budget) once {:.0} s are kept for loading, \
                     calibrating and writing the model; training them anyway; `--steps {steps}` trains this model again",
                    budget::reserve(limit).as_secs_f64()
                );
            } else if steps < cfg.steps {
                tracing::warn!(
                    "a step takes {step_s:.3} s on this machine: {steps} steps instead of {} fit the {minutes:.1}-minute budget (--time-budget); `--steps {steps}` trains this model again",
                    cfg.steps
                );
            } else {
                tracing::info!(
                    "a step takes {step_s:.3} s on this machine: the {steps} steps fit the {minutes:.1}-minute budget"
                );
            }
            let record = TimeBudget {
                minutes,
                probe_step_seconds: step_s,
                default_steps: cfg.steps,
            };
            (steps, Some(record))
        }
    };
    let cfg = &TrainConfig { steps, ..cfg.clone() };
    still_wanted()?;
    let summary = fit(cfg, &net, &training, &validation, &mut rng, stop)?;
    still_wanted()?;
    card.training = TrainingSummary {
        training_images: training.len(),
        image_size: set.image_size.map(|(w, h)| [w, h]),
        colour: Some(set.colour.to_string()),
        time_budget: budget_record,
        ..summary
    };
    // On nearly flat images there is no structure to learn, and the collapse check's
    // ratio (reconstruction over input contrast) means nothing.
    if card.training.collapse.input_std < FLAT_CONTRAST {
        tracing::warn!(
            contrast = card.training.collapse.input_std,
            "the training images are nearly flat: there is little for a model to learn, and the contrast check does not apply"
        );
    } else if card.training.collapse.collapsed {
        tracing::warn!(
            ratio = card.training.collapse.contrast_ratio,
            "the reconstructions lost most of the input's contrast (collapse): the model will detect poorly; train longer or change the loss"
        );
    }
    // The collapse check sees lost contrast, not a loss that ran away (a learning rate
    // too high: the loss of a 20-step run at --lr 100 rose from 1.9 to 15812).
    if let Some(&(_, first)) = card.training.loss_curve.first() {
        if card.training.final_loss > 2.0 * first {
            tracing::warn!(
                first,
                last = card.training.final_loss,
                "the loss ended more than twice as high as it began: training diverged, and the model will detect poorly; lower --lr"
            );
        }
    }

    let net = Arc::new(net);
    let mut detector = Detector::new(card, net.clone());
    let (calibration_images, set_by) = if validation.is_empty() {
        tracing::warn!(
            "no validation images held out: calibrating on the training images (thresholds will be optimistic, \
             and will flag good parts the model has not seen); recalibrate with `vigil calibrate` on 20 or more \
             good images kept out of training"
        );
        (&training, CALIBRATED_ON_TRAINING_IMAGES.to_string())
    } else {
        (&validation, "the images held out of training".to_string())
    };
    calibrate::calibrate(
        &mut detector,
        calibration_images,
        &cfg.calibration,
        calibrate::Scales::Measure,
        set_by,
    )?;
    // Kept with a warning: the training is done and the threshold can be set again.
    if let Some(warning) = calibrate::threshold_warning(&detector.card) {
        tracing::warn!(
            threshold = detector.card.thresholds.image,
            "{warning}; train longer, or change --margin or --quantile"
        );
    }
    if let Some(note) = calibrate::few_images_note(validation.len()) {
        tracing::warn!("{note}");
    }
    detector.card.training.seconds = started.elapsed().as_secs_f64();
    std::fs::create_dir_all(&cfg.out).map_err(|source| ArtifactError::Write {
        path: cfg.out.clone(),
        cause: source,
    })?;
    // Replacing a model: the new weights are written aside first, then the old card goes,
    // so that a failure before leaves the old model whole and a crash between the last
    // steps leaves a folder that does not load ("no model.json") rather than new weights
    // under the old card and thresholds.
    let staged = net.stage_weights(&cfg.out)?;
    detector.card.weights_sha256 = Some(crate::model::file_sha256(&staged)?);
    let old_card = cfg.out.join(crate::model::artifact::CARD_FILE);
    match std::fs::remove_file(&old_card) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(ArtifactError::Write {
                path: old_card,
                cause: e,
            }
            .into())
        }
        _ => {}
    }
    crate::model::place_weights(&staged, &cfg.out)?;
    detector.card.save(&cfg.out)?;
    Ok(detector.card)
}

/// The optimisation loop. Returns the training summary (without image count).
fn fit(
    cfg: &TrainConfig,
    net: &Network,
    training: &[Planar],
    validation: &[Planar],
    rng: &mut rand_chacha::ChaCha8Rng,
    stop: &AtomicBool,
) -> Result<TrainingSummary, TrainError> {
    let started = Instant::now();
    let mut trainer = net.trainer(step_settings(cfg))?;
    let bar = progress_bar(cfg.steps, cfg.progress);
    // Without a terminal (nohup, CI, a container's log) the bar draws nothing: log a line
    // at every twentieth of the training instead.
    let log_every = (cfg.progress && !std::io::stderr().is_terminal()).then(|| cfg.steps.div_ceil(20));
    let curve_every = (cfg.steps / 100).max(1);
    let mut curve = Vec::new();
    let (mut interval_loss, mut interval_n) = (0f64, 0usize);
    let mut last_loss = 0f32;
    let mut last_parts = Vec::new();
    let mut steps_done = 0;
    let (p, n) = (cfg.patch_size, cfg.batch_size);
    for step in 0..cfg.steps {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let batch = sample_batch(training, p, n, &cfg.augment, rng, &cfg.device)?;
        let loss = trainer.step(&batch, cosine_lr(cfg.learning_rate, step, cfg.steps))?;
        last_loss = loss.total;
        last_parts = loss.parts.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        if !last_loss.is_finite() {
            return Err(TrainError::Config(format!(
                "the loss became {last_loss} at step {step}; lower --lr"
            )));
        }
        interval_loss += last_loss as f64;
        interval_n += 1;
        steps_done = step + 1;
        if steps_done % curve_every == 0 || steps_done == cfg.steps {
            curve.push((steps_done, (interval_loss / interval_n as f64) as f32));
            interval_loss = 0.0;
            interval_n = 0;
        }
        let secs = started.elapsed().as_secs_f64();
        let parts: String = match loss.parts.as_slice() {
            [_] => String::new(),
            parts => parts.iter().map(|(k, v)| format!(" {k} {v:.4}")).collect(),
        };
        let images_per_s = (steps_done * cfg.batch_size) as f64 / secs.max(1e-9);
        bar.set_message(format!("loss {last_loss:.4}{parts}  {images_per_s:.1} img/s"));
        bar.inc(1);
        if log_every.is_some_and(|k| steps_done % k == 0 || steps_done == cfg.steps) {
            let eta_s = secs / steps_done as f64 * (cfg.steps - steps_done) as f64;
            tracing::info!(
                "step {steps_done}/{}: loss {last_loss:.4}{parts}, {images_per_s:.1} img/s, eta {:.0} s",
                cfg.steps,
                eta_s
            );
        }
        if let Some(hook) = &cfg.on_step {
            (hook.0)(StepReport {
                step: steps_done,
                steps: cfg.steps,
                loss: last_loss,
                elapsed_s: secs,
            });
        }
    }
    bar.finish_and_clear();
    let stopped_early = steps_done < cfg.steps;
    // A model stopped within its first tenth is not worth writing over what `--out` may
    // already hold (Ctrl-C just after starting means "not this training").
    if stopped_early && steps_done < cfg.steps.div_ceil(10) && !cfg.abandon_when_stopped {
        return Err(TrainError::StoppedTooSoon {
            done: steps_done,
            planned: cfg.steps,
        });
    }
    if stopped_early && cfg.abandon_when_stopped {
        tracing::info!(
            steps_done,
            planned = cfg.steps,
            "training stopped; nothing will be written"
        );
    } else if stopped_early {
        tracing::warn!(
            steps_done,
            planned = cfg.steps,
            "training stopped early; writing the model trained so far"
        );
    }
    let collapse = collapse_check(net, if validation.is_empty() { training } else { validation }, p)?;
    Ok(TrainingSummary {
        steps: steps_done,
        planned_steps: cfg.steps,
        stopped_early,
        batch_size: cfg.batch_size,
        learning_rate: cfg.learning_rate,
        loss: cfg.loss.name().into(),
        seed: cfg.seed,
        threads: cfg.threads,
        device: device::name(&cfg.device).into(),
        seconds: started.elapsed().as_secs_f64(),
        final_loss: last_loss,
        final_loss_parts: last_parts,
        loss_curve: curve,
        training_images: 0,
        image_size: None,
        colour: None,
        augment: cfg.augment.names(),
        inpainting_fraction: cfg.augment.inpaint_fraction,
        collapse,
        time_budget: None,
    })
}

/// `n` augmented crops of `patch`² from `training`, with their targets and masks.
pub(crate) fn sample_batch<R: rand::Rng>(
    training: &[Planar],
    patch: usize,
    n: usize,
    augment: &Augment,
    rng: &mut R,
    device: &Device,
) -> candle_core::Result<TrainBatch> {
    let (c, p) = (training[0].channels, patch);
    let (mut xs, mut ys, mut ms) = (
        Vec::with_capacity(n * c * p * p),
        Vec::with_capacity(n * c * p * p),
        Vec::with_capacity(n * p * p),
    );
    for _ in 0..n {
        let s = augment::sample(training, p, augment, rng);
        xs.extend_from_slice(&s.input.data);
        ys.extend_from_slice(&s.target.data);
        ms.extend_from_slice(&s.mask);
    }
    Ok(TrainBatch {
        input: Tensor::from_vec(xs, (n, c, p, p), device)?,
        target: Tensor::from_vec(ys, (n, c, p, p), device)?,
        mask: Tensor::from_vec(ms, (n, 1, p, p), device)?,
    })
}

pub(crate) fn step_settings(cfg: &TrainConfig) -> StepSettings {
    StepSettings {
        loss: cfg.loss,
        learning_rate: cfg.learning_rate,
        weight_decay: 1e-5,
        kernels: cfg.kernels,
        seed: cfg.seed,
    }
}

/// Fails now, not after minutes of training, when the model could not be written to `out`:
/// no path, a file in the way, a folder that cannot be created or written. Folders made to
/// find out are removed again, so a training that fails later leaves nothing behind.
pub fn check_output(out: &std::path::Path) -> Result<(), ArtifactError> {
    let write_error = |source| ArtifactError::Write {
        path: out.to_path_buf(),
        cause: source,
    };
    let refuse = |why: &str| write_error(std::io::Error::other(why.to_string()));
    if out.as_os_str().is_empty() {
        return Err(refuse("no folder given for the model"));
    }
    if out.exists() && !out.is_dir() {
        return Err(refuse("a file is in the way of the model folder"));
    }
    // The folders this check creates, deepest first.
    let mut created = Vec::new();
    let mut missing = Some(out);
    while let Some(p) = missing.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        created.push(p.to_path_buf());
        missing = p.parent();
    }
    std::fs::create_dir_all(out).map_err(write_error)?;
    let probe = out.join(format!(".vigil-write-check-{}", std::process::id()));
    let writable = std::fs::write(&probe, b"").and_then(|()| std::fs::remove_file(&probe));
    for dir in &created {
        let _ = std::fs::remove_dir(dir);
    }
    writable.map_err(write_error)
}

/// `thresholds.set_by` of a model calibrated on its own training images (none held out).
pub const CALIBRATED_ON_TRAINING_IMAGES: &str = "the training images (none held out)";

/// Cosine decay from `lr` to 1% of it, after a warm-up over the first 2% of steps.
pub fn cosine_lr(lr: f64, step: usize, steps: usize) -> f64 {
    let warmup = (steps / 50).max(1);
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let t = (step - warmup) as f64 / (steps - warmup).max(1) as f64;
    lr * (0.01 + 0.99 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
}

/// Compares the contrast (standard deviation) of centre crops and their reconstructions.
/// Below about one grey level of contrast (in [0, 1] units) images are nearly flat.
const FLAT_CONTRAST: f32 = 0.004;

fn collapse_check(net: &Network, images: &[Planar], patch: usize) -> Result<CollapseCheck, TrainError> {
    use crate::model::AnomalyModel;
    let crops: Vec<Planar> = images
        .iter()
        .take(8)
        .map(|im| im.crop((im.width - patch) / 2, (im.height - patch) / 2, patch, patch))
        .collect();
    let c = crops[0].channels;
    let flat: Vec<f32> = crops.iter().flat_map(|p| p.data.iter().copied()).collect();
    let x = Tensor::from_vec(flat.clone(), (crops.len(), c, patch, patch), net.device())?;
    let y: Vec<f32> = net.infer(&x)?.reconstruction.flatten_all()?.to_vec1()?;
    let per = c * patch * patch;
    let std = |v: &[f32]| {
        let m = v.iter().sum::<f32>() / v.len() as f32;
        (v.iter().map(|a| (a - m).powi(2)).sum::<f32>() / v.len() as f32).sqrt()
    };
    let mean_std = |all: &[f32]| all.chunks(per).map(std).sum::<f32>() / crops.len() as f32;
    let (input_std, reconstruction_std) = (mean_std(&flat), mean_std(&y));
    let contrast_ratio = if input_std > 1e-6 {
        reconstruction_std / input_std
    } else {
        1.0
    };
    Ok(CollapseCheck {
        input_std,
        reconstruction_std,
        contrast_ratio,
        // On nearly flat images there is no contrast to lose (see FLAT_CONTRAST).
        collapsed: input_std >= FLAT_CONTRAST && contrast_ratio < 0.2,
    })
}

fn progress_bar(len: usize, visible: bool) -> indicatif::ProgressBar {
    if !visible {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("training {bar:30} {pos}/{len} steps  {msg}  eta {eta}")
            .expect("valid template"),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_out_images_are_a_rounded_share_never_none_never_all() {
        assert_eq!(held_out_count(70, 0.1), 7);
        assert_eq!(held_out_count(12, 0.1), 1); // 1.2
        assert_eq!(held_out_count(15, 0.1), 2); // 1.5 rounds up
        assert_eq!(held_out_count(3, 0.1), 1); // 0.3, but at least one
        assert_eq!(held_out_count(2, 0.9), 1); // 1.8, but never all
        assert_eq!((held_out_count(1, 0.5), held_out_count(50, 0.0)), (0, 0));
    }

    #[test]
    fn the_output_check_refuses_what_cannot_hold_a_model_and_leaves_nothing_behind() {
        let root = tempfile::tempdir().unwrap();
        // Missing folders two deep: accepted, and both removed again.
        let deep = root.path().join("a/b");
        check_output(&deep).unwrap();
        assert!(!root.path().join("a").exists());
        // An existing folder: accepted and kept, with no probe file left in it.
        check_output(root.path()).unwrap();
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
        // A file in the way, an empty path, a folder under a file.
        let file = root.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(check_output(&file).is_err());
        assert!(check_output(std::path::Path::new("")).is_err());
        assert!(check_output(&file.join("m")).is_err());
    }

    #[test]
    fn cosine_schedule_warms_up_then_decays_to_one_percent() {
        let lr = 1e-3;
        assert!(cosine_lr(lr, 0, 1000) < lr / 10.0);
        assert!((cosine_lr(lr, 19, 1000) - lr).abs() < 1e-12);
        assert!(cosine_lr(lr, 500, 1000) < lr && cosine_lr(lr, 500, 1000) > lr * 0.4);
        assert!((cosine_lr(lr, 999, 1000) - lr * 0.01).abs() < lr * 0.001);
    }
}

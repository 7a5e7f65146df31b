//! Command-line interface definitions (clap). Every option has a default that works.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::kernels::Kernels;
use crate::model::device::DeviceChoice;
use crate::scoring::{MapMethod, TestTimeFlips};
use crate::train::{LossKind, ThresholdMethod};

#[derive(Debug, Parser)]
#[command(
    name = "vigil",
    version,
    about = "Visual anomaly detection: learn what good parts look like, flag what cannot be reproduced."
)]
pub struct Cli {
    /// CPU threads for the model (default: all cores). Same as RAYON_NUM_THREADS.
    #[arg(long, global = true, env = "VIGIL_THREADS")]
    pub threads: Option<usize>,
    /// Log as JSON lines instead of text (VIGIL_JSON_LOGS: true, 1, yes or on; false, 0,
    /// no or off).
    #[arg(long, global = true, env = "VIGIL_JSON_LOGS", action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new())]
    pub json_logs: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the inspection service (HTTP API, batching engine, database, metrics).
    Serve(ServeArgs),
    /// Train a model on a folder of good images and calibrate its thresholds.
    Train(TrainArgs),
    /// Score images: verdict, regions, anomaly maps and heatmaps.
    Inspect(InspectArgs),
    /// Evaluate a model on a labelled test set in the MVTec AD layout.
    Eval(EvalArgs),
    /// Re-set a model's thresholds from new good images, without retraining.
    Calibrate(CalibrateArgs),
    /// Measure speeds: the matmul peak, forward passes (Bergmann and the default architecture,
    /// 128² and 256², batch 1 and 16), training steps and the SSIM loss, each on vigil's CPU
    /// kernels and on candle's own operations in the same run.
    Bench(BenchArgs),
    /// Exit 0 when an HTTP URL answers 200 (a container health check without curl).
    Probe(ProbeArgs),
    /// Generate the synthetic surface data set (MVTec AD layout) the bundled model is trained on.
    Synth(SynthArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Channels {
    Gray,
    Rgb,
    /// RGB if any training image has colour, else gray.
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ArchName {
    /// Fully convolutional autoencoder, spatial bottleneck, BatchNorm; anomaly map from
    /// the squared reconstruction error (--map ssim+l2 adds 1 − SSIM).
    Spatial,
    /// Bergmann et al. 2019: vector latent (see --latent).
    Bergmann,
    /// The default. Reconstruction plus a learned discriminator (after DRAEM): the spatial
    /// autoencoder and a small U-Net (see --segmenter-width) trained on synthetic anomalies;
    /// the anomaly map is the U-Net's per-pixel probability.
    Draem,
    /// Variational spatial autoencoder: the code is a Gaussian (see --beta, --kl-warmup);
    /// inference decodes its mean; anomaly map from the squared reconstruction error.
    Vae,
    /// One encoder, two adversarial decoders (after USAD, Audibert et al. 2020): the second
    /// decoder learns to fail on the first's rebuilds, magnifying what it cannot rebuild;
    /// anomaly map from both decoders' errors (see --alpha)
    Usad,
    /// The spatial autoencoder trained as a GAN's generator: reconstruction loss plus the
    /// judgement of a spectrally normalised patch critic (see --critic-width,
    /// --adversarial-weight); anomaly map from the critic's features of the image against
    /// its reconstruction (--map ssim+l2 for the reconstruction error).
    Adversarial,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FitName {
    /// The working image passes through the network whole (spatial architecture).
    Whole,
    /// Overlapping patches of --patch pixels at --stride; maps averaged.
    Tiles,
}

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Folder of good images (PNG, JPEG, BMP, TIFF; searched recursively), or an MVTec AD
    /// category folder (its train/good is used).
    #[arg(long)]
    pub data: PathBuf,
    /// Where to write the model (model.json + weights.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = ArchName::Draem)]
    pub arch: ArchName,
    /// Working resolution: every image is resized to SIZE×SIZE first.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Training crop size (and tile size with --fit tiles). For --arch bergmann this is the
    /// network's input: 128, 256 or 512.
    #[arg(long, default_value_t = 128)]
    pub patch: usize,
    /// How images meet the network at inference (default: whole for spatial, tiles for bergmann).
    #[arg(long, value_enum)]
    pub fit: Option<FitName>,
    /// Objects rather than textures: resize every image to --size and train and infer on
    /// the whole image (sets --patch to --size and --fit whole).
    #[arg(long, conflicts_with_all = ["fit", "patch"])]
    pub resize: bool,
    /// Tile stride for --fit tiles.
    #[arg(long, default_value_t = 32)]
    pub stride: usize,
    #[arg(long, value_enum, default_value_t = Channels::Auto)]
    pub channels: Channels,
    /// Training loss. ssim+l2 = (1 − SSIM) + 5·MSE.
    #[arg(long, value_enum, default_value_t = LossKind::SsimL2)]
    pub loss: LossKind,
    /// Latent vector size (--arch bergmann).
    #[arg(long, default_value_t = 100)]
    pub latent: usize,
    /// Base channel width (--arch spatial, vae: width, 2·width, 4·width; draem's reconstructor).
    #[arg(long, default_value_t = 16)]
    pub width: usize,
    /// Bottleneck channels at 1/8 resolution (--arch spatial, draem, vae).
    #[arg(long, default_value_t = 8)]
    pub bottleneck: usize,
    /// Base channel width of the segmentation U-Net (--arch draem: width, 2·, 4·, and 4·
    /// again at its deepest stage).
    #[arg(long, default_value_t = 8)]
    pub segmenter_width: usize,
    /// Stride-2 stages of the segmentation U-Net (--arch draem): each doubles how far it
    /// sees around a pixel. Image sides must be multiples of 2^depth.
    #[arg(long, default_value_t = 3)]
    pub segmenter_depth: usize,
    /// Whether the segmentation U-Net (--arch draem) also reads two error maps of the
    /// image against its reconstruction: 1 − SSIM over an 11-pixel window and the absolute
    /// difference, each averaged over channels. Its small first layer sees 3×3 pixels and
    /// cannot compute a windowed comparison itself. Default: on when the model takes
    /// colour input (--channels rgb, or auto with any colour training image), off for
    /// grayscale. On the development set of real surfaces, with each of three seeds, the
    /// maps raised the colour surfaces' mean image AUROC, pixel AUROC and AUPRO but spread
    /// the grayscale surfaces' maps around small defects (the README has the figures).
    #[arg(long, action = clap::ArgAction::Set, value_name = "BOOL",
          num_args = 0..=1, default_missing_value = "true")]
    pub segmenter_error_maps: Option<bool>,
    /// Whether the segmentation U-Net's loss (--arch draem) also trains the reconstructor,
    /// as in DRAEM's own training, instead of stopping at the reconstruction. Only
    /// training differs, and a step costs more. Off by default: on the development set of
    /// real surfaces its means were the default's within a few thousandths, better on one
    /// surface and worse on two (the README has the figures).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL",
          num_args = 0..=1, default_missing_value = "true")]
    pub joint_training: bool,
    /// Weight of the KL term (--arch vae): higher pulls the code towards N(0, 1), giving
    /// smoother reconstructions that rebuild less of a defect, and less of fine texture.
    #[arg(long, default_value_t = 0.01, value_parser = non_negative_f32)]
    pub beta: f32,
    /// Weight of the first decoder's error in the anomaly map (--arch usad); the second
    /// decoder's error on the first's rebuild gets 1 − alpha. Default 1: on real surface
    /// photographs the second decoder's error was noise across the whole image (the same
    /// six models re-scored: mean image / pixel AUROC 0.68 / 0.51 at 0.5, 0.78 / 0.77 at
    /// 1); the second decoder still shapes how the first is trained.
    #[arg(long, default_value_t = 1.0, value_parser = unit_interval_f32)]
    pub alpha: f32,
    /// Base channel width of the patch critic (--arch adversarial: width, 2·, 4·).
    #[arg(long, default_value_t = 16)]
    pub critic_width: usize,
    /// Weight of the critic's verdict in the reconstructor's loss (--arch adversarial),
    /// beside the reconstruction loss (1 − SSIM + 5·MSE, about 0.1–0.5 once trained).
    #[arg(long, default_value_t = 0.05, value_parser = non_negative_f32)]
    pub adversarial_weight: f32,
    /// Steps over which the KL weight ramps from 0 to --beta (--arch vae).
    #[arg(long, default_value_t = 500)]
    pub kl_warmup: usize,
    /// Optimisation steps (batches). Ignored when --epochs is given. Default: 2400 for
    /// --arch draem (9–14 minutes for 70–80 images of 256² on 2 CPU cores, depending on
    /// the machine's day and the channels; cut to what fits --time-budget), 1000 for usad,
    /// 1600 for adversarial, 2500 for the other autoencoders.
    #[arg(long, value_parser = at_least_one)]
    pub steps: Option<usize>,
    /// Passes over the training images, one crop per image each; overrides --steps.
    #[arg(long, value_parser = at_least_one)]
    pub epochs: Option<usize>,
    /// Minutes the whole training may take when the step count is the family's default
    /// (neither --steps nor --epochs given). Before training, a few steps of a throwaway
    /// copy of the network are timed, and the default is cut to what fits if it does not:
    /// logged, and recorded in model.json, where `--steps N` with the recorded N trains
    /// the same model again bit for bit. 0 turns the budget off.
    #[arg(long, default_value_t = 14.0, value_parser = minutes, allow_negative_numbers = true)]
    pub time_budget: f64,
    /// Training crops per step.
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    pub batch_size: usize,
    /// Peak learning rate (AdamW, cosine decay, 2% warm-up).
    #[arg(long, default_value_t = 1e-3, value_parser = positive_f64)]
    pub lr: f64,
    /// Fraction of the good images held out of training to calibrate thresholds.
    #[arg(long, default_value_t = 0.1, value_parser = validation_fraction)]
    pub validation_fraction: f32,
    /// Seed of initialisation, crops, synthetic anomalies and the validation split: the
    /// same seed, data, options and thread count train the same weights bit for bit (CPU).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Convolution and SSIM-loss kernels on the CPU: fast (vigil's, the default) or candle
    /// (candle's own operations, several times slower; for comparison).
    #[arg(long, value_enum, default_value_t = Kernels::Fast)]
    pub kernels: Kernels,
    /// Augmentations: any of flips, rot90, brightness, inpaint, anomalies (synthetic
    /// anomalies on half the crops); or none. Default: flips,brightness,anomalies for
    /// --arch draem (no quarter turns: what is turned out of place is a defect);
    /// flips,rot90,brightness,inpaint for the others.
    #[arg(long, value_delimiter = ',')]
    pub augment: Option<Vec<String>>,
    #[command(flatten)]
    pub scoring: ScoringArgs,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    #[command(flatten)]
    pub limit: ImageLimitArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ScoringArgs {
    /// Anomaly map: ssim (1 − SSIM), l2 (squared error), ssim+l2 (each divided by its mean
    /// on good images), or learned (the model's own map). Default: learned for draem, usad
    /// and adversarial; l2 for the reconstruction-only families (spatial, vae, bergmann),
    /// which ranked real surfaces better than ssim+l2.
    #[arg(long, value_enum)]
    pub map: Option<MapMethod>,
    /// Score = maximum of the map after an N×N mean filter (working-resolution pixels), so
    /// a defect must cover an area to score high. Default: none: DRAEM's 21×21 filter lost
    /// thin scratches on real surfaces.
    #[arg(long, conflicts_with = "top_k", value_parser = at_least_one)]
    pub score_filter: Option<usize>,
    /// σ of the Gaussian smoothing of the anomaly map (the map returned, drawn and cut into
    /// regions), in working-resolution pixels. Default: 4.
    #[arg(long, value_parser = non_negative_f32)]
    pub smoothing: Option<f32>,
    /// σ of the smoothing of the map the score is read from, when it should differ from
    /// --smoothing. Default: 0 (unsmoothed) for --arch draem, whose score averages the
    /// highest pixels instead; the same as --smoothing for the others.
    #[arg(long, value_parser = non_negative_f32)]
    pub score_smoothing: Option<f32>,
    /// Score = mean of the K highest map values instead of the maximum. Default: 100 per
    /// 256² of working resolution for --arch draem; the others take the maximum.
    #[arg(long, value_parser = at_least_one)]
    pub top_k: Option<usize>,
    #[command(flatten)]
    pub views: ViewArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ViewArgs {
    /// Also run the model on the image's flips at inspection and average the maps, turned
    /// back: horizontal (the mirror image, 2 passes of the network) or all (the three
    /// flips, 4 passes). Costs that many times the model's time per image; raised draem's
    /// mean image AUROC on six real surfaces from 0.938 to 0.946 (all) and 0.944
    /// (horizontal). Only for models trained with flips (every family's default), to which a
    /// mirrored good part is a good part. Default: none (`vigil calibrate`: the model's
    /// own; given there, it changes the model's scoring and calibrates anew on --data).
    #[arg(long, value_enum)]
    pub test_time_flips: Option<TestTimeFlips>,
}

#[derive(Debug, Clone, Args)]
pub struct CalibrationArgs {
    /// quantile: the good images' score quantile × (1 + margin); min-area: Bergmann's rule.
    /// Default: quantile (`vigil calibrate`: the model's own).
    #[arg(long, value_enum)]
    pub threshold_method: Option<ThresholdMethod>,
    /// Quantile of the good images' scores the image threshold starts from (0.99: the
    /// 99th percentile; with few images, about their maximum). Default: 0.99 (`vigil
    /// calibrate`: the model's own).
    #[arg(long, value_parser = quantile)]
    pub quantile: Option<f32>,
    /// Relative margin over the quantile. Default: 0.4 for a learned map (draem), whose
    /// good-image scores spread more from image to image and from one part of a surface to
    /// another; 0.1 for reconstruction-error maps (`vigil calibrate`: the model's own).
    #[arg(long, value_parser = non_negative_f32)]
    pub margin: Option<f32>,
    /// Smallest defect worth reporting, in working-resolution pixels. Default: 25 (`vigil
    /// calibrate`: the model's own).
    #[arg(long, value_parser = at_least_one_u32)]
    pub min_defect_area: Option<u32>,
}

/// The largest image the commands read (`vigil serve` has its own `--max-pixels`).
#[derive(Debug, Args, Clone, Copy)]
pub struct ImageLimitArgs {
    /// Largest image read, in pixels, judged from its header before decoding; larger ones
    /// are refused (a camera of more than 40 megapixels needs a higher limit).
    // No environment variable: training jobs parse these arguments inside the server,
    // whose own `VIGIL_MAX_PIXELS` (and flag) then apply.
    #[arg(long, default_value_t = crate::image_io::DEFAULT_MAX_PIXELS, value_parser = at_least_one_u64)]
    pub max_pixels: u64,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Model directory.
    #[arg(long, default_value = "models/default")]
    pub model: PathBuf,
    /// Write one JSON object per image to this file (default, or `-`: standard output).
    #[arg(long)]
    pub json_lines: Option<PathBuf>,
    /// Write each anomaly map as float32 .npy (height × width) here.
    #[arg(long)]
    pub maps_dir: Option<PathBuf>,
    /// Write each heatmap overlay as PNG here.
    #[arg(long)]
    pub heatmaps_dir: Option<PathBuf>,
    /// Write what the model rebuilt of each image as PNG here, at the model's working
    /// resolution: beside the input it shows what the model takes for a good surface.
    #[arg(long)]
    pub reconstructions_dir: Option<PathBuf>,
    /// Override the model's image threshold (regions are then cut at the lower of it and
    /// the model's pixel threshold).
    #[arg(long, value_parser = non_negative_f32)]
    pub threshold: Option<f32>,
    /// For models that mix two learned maps (usad): the weight of the first, 0 to 1,
    /// instead of the model's (the threshold was calibrated at the model's own).
    #[arg(long, value_parser = unit_interval_f32)]
    pub alpha: Option<f32>,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    #[command(flatten)]
    pub limit: ImageLimitArgs,
    /// Images or folders (searched recursively).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model directory to evaluate.
    #[arg(long, default_value = "models/default")]
    pub model: PathBuf,
    /// Evaluate several models on the same data instead of --model, and print one table
    /// (--json and --figure then hold every model: the reports, and the ROC curves
    /// side by side).
    #[arg(long, num_args = 2.., value_name = "MODEL", conflicts_with = "model")]
    pub compare: Vec<PathBuf>,
    /// MVTec AD category folder (test/good, test/<defect>, ground_truth/<defect>).
    #[arg(long)]
    pub data: PathBuf,
    /// Write the full report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a PNG with the ROC curve and the score histograms here.
    #[arg(long)]
    pub figure: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    #[command(flatten)]
    pub limit: ImageLimitArgs,
}

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// Model directory whose model.json gets the new thresholds (the weights are not touched).
    #[arg(long)]
    pub model: PathBuf,
    /// Folder of good images, all used for calibration (of an MVTec AD category folder,
    /// its train/good). Images of defective parts here raise the threshold until it
    /// misses defects: a warning says how many scored above the threshold before, and a
    /// threshold above the highest score the model can give is refused (nothing written).
    #[arg(long, required_unless_present = "image_threshold")]
    pub data: Option<PathBuf>,
    /// Set the image threshold to this value instead of calibrating on images: one chosen
    /// from `vigil eval` on labelled parts (its best-F1 threshold, or one for a false-alarm
    /// rate). The pixel threshold stays; model.json records the change and the value before.
    #[arg(long, value_parser = non_negative_f32, conflicts_with_all = ["data", "threshold_method", "quantile", "margin", "min_defect_area", "test_time_flips"])]
    pub image_threshold: Option<f32>,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    #[command(flatten)]
    pub views: ViewArgs,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    #[command(flatten)]
    pub limit: ImageLimitArgs,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    pub repeat: usize,
    /// Skip the comparison with candle's own operations (faster; no before/after ratios).
    #[arg(long)]
    pub no_compare: bool,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output folder (MVTec AD layout).
    #[arg(long)]
    pub out: PathBuf,
    /// Side of each image, in pixels (32 or more).
    #[arg(long, default_value_t = 256, value_parser = synth_size)]
    pub size: usize,
    #[arg(long, default_value_t = 80)]
    pub train_good: usize,
    #[arg(long, default_value_t = 20)]
    pub test_good: usize,
    /// Test images per defect kind (scratch, stain, hole, contamination).
    #[arg(long, default_value_t = 10)]
    pub test_defective: usize,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// `vigil serve`: every flag is also an environment variable (VIGIL_*).
#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// Address to listen on. Without --api-keys-file, keep it on loopback.
    #[arg(long, env = "VIGIL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Every sub-folder holding a model.json is served under its folder name (1–64
    /// letters, digits, `-`, `_` or `.`; others are skipped with a warning); `default` (or
    /// the only model served) is the model behind POST /v1/inspect.
    #[arg(long, env = "VIGIL_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,
    /// Database and stored images live here.
    #[arg(long, env = "VIGIL_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// sqlite://FILE or postgres://USER:PASS@HOST/DB. Default: an SQLite file in --data-dir.
    /// TLS to PostgreSQL by the URL's sslmode (prefer, the default, encrypts where the
    /// server offers it; require; verify-full checks the certificate and host name against
    /// the bundled public roots, or a private CA given as sslrootcert=FILE); a client
    /// certificate for servers that require one as sslcert=FILE&sslkey=FILE (PEM).
    #[arg(long, env = "VIGIL_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Seconds to keep trying a PostgreSQL server that does not answer yet at start (a
    /// replica and its database often start together), saying so each time; then the
    /// last error. A refused login or a failed migration is not tried again. 0: once.
    #[arg(long, env = "VIGIL_DATABASE_WAIT", default_value_t = 30.0, value_parser = seconds_or_zero)]
    pub database_wait: f64,
    #[arg(long, env = "VIGIL_DEVICE", value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Most images run through the model at once.
    #[arg(long, env = "VIGIL_MAX_BATCH", default_value_t = 8, value_parser = at_least_one)]
    pub max_batch: usize,
    /// Requests admitted per model (queued or running); beyond this the answer is 429.
    #[arg(long, env = "VIGIL_QUEUE_CAPACITY", default_value_t = 64, value_parser = at_least_one)]
    pub queue_capacity: usize,
    /// The folder a training job's `folder` must lie in (a relative one is taken inside
    /// it). Default: none, any folder the server can read; set it where admin keys are
    /// shared or the API is open, so the API cannot be used to list or read other folders.
    #[arg(long, env = "VIGIL_TRAINING_ROOT")]
    pub training_root: Option<std::path::PathBuf>,
    /// CPU threads a training job started through the server takes (one job at a time);
    /// the rest stay with inspection. Default: half the cores, at least 1.
    #[arg(long, env = "VIGIL_TRAINING_THREADS", value_parser = at_least_one)]
    pub training_threads: Option<usize>,
    /// Seconds an inspection may wait for room and for the model, and take in the model
    /// itself, before a 503: set it above the model's own time per image (`vigil bench`),
    /// times the views of `--test-time-flips`.
    #[arg(long, env = "VIGIL_REQUEST_TIMEOUT", default_value_t = 30.0, value_parser = seconds)]
    pub request_timeout: f64,
    /// Seconds a request body may pause mid-way before a 408 (a client that stalls an
    /// upload would otherwise hold its connection open).
    #[arg(long, env = "VIGIL_BODY_TIMEOUT", default_value_t = 30.0, value_parser = seconds)]
    pub body_timeout: f64,
    /// Seconds a connection may take to send a request's headers, counted from when it is
    /// ready for the next request; a keep-alive connection idle this long is closed too.
    /// Keep it above the idle timeout of any proxy in front (60 s for most load
    /// balancers): the proxy must close an idle connection first, or a request it sends
    /// as vigil closes is lost.
    #[arg(long, env = "VIGIL_HEADER_TIMEOUT", default_value_t = 75.0, value_parser = seconds)]
    pub header_timeout: f64,
    /// Seconds, after SIGTERM, that the server goes on accepting and answering requests
    /// while /health/ready already answers 503, so that a load balancer stops sending
    /// before the port closes (Kubernetes: a few seconds; 0 closes at once).
    #[arg(long, env = "VIGIL_SHUTDOWN_DELAY", default_value_t = 0.0, value_parser = seconds_or_zero)]
    pub shutdown_delay: f64,
    /// Seconds the requests in flight get to finish once the port has closed; connections
    /// still open then are dropped.
    #[arg(long, env = "VIGIL_DRAIN_TIMEOUT", default_value_t = 30.0, value_parser = seconds)]
    pub drain_timeout: f64,
    /// Pixels judged at full resolution at once, across requests: a request waits until its
    /// image fits (an image takes about 8 bytes a pixel while judged, so the default of
    /// 80 megapixels, two of the largest images, is about 650 MB). At least --max-pixels.
    #[arg(long, env = "VIGIL_MAX_INFLIGHT_PIXELS", default_value_t = 80_000_000, value_parser = at_least_one_u64)]
    pub max_inflight_pixels: u64,
    /// Largest request body accepted (413 beyond); training uploads have their own limit,
    /// 512 MiB.
    #[arg(long, env = "VIGIL_MAX_BODY_BYTES", default_value_t = 20 * 1024 * 1024, value_parser = at_least_one)]
    pub max_body_bytes: usize,
    /// Largest image accepted, judged from its header before decoding (413 beyond).
    #[arg(long, env = "VIGIL_MAX_PIXELS", default_value_t = 40_000_000, value_parser = at_least_one_u64)]
    pub max_pixels: u64,
    /// Keep each inspected image under --data-dir (needed for heatmaps and maps later).
    #[arg(long, env = "VIGIL_STORE_IMAGES", default_value_t = true, action = clap::ArgAction::Set)]
    pub store_images: bool,
    /// Delete inspections (and their images) older than this many days; 0 keeps everything.
    /// At most 36500 (a century).
    #[arg(long, env = "VIGIL_RETENTION_DAYS", default_value_t = 0, value_parser = retention_days)]
    pub retention_days: u64,
    /// Seconds between passes that bring what is served in line with --models-dir, so that
    /// replicas sharing the folder converge: a model folder that appeared (trained by
    /// another replica, or copied in) is served, a served model whose files changed to
    /// another version is reloaded, one whose folder is missing at two passes in a row is no
    /// longer served (never the last one). 0 turns the periodic pass off; the model list
    /// makes a pass, and a request naming a model not yet served loads its folder, anyway.
    #[arg(long, env = "VIGIL_MODELS_SCAN_INTERVAL", default_value_t = 30.0, value_parser = seconds_or_zero)]
    pub models_scan_interval: f64,
    /// File of API keys, one per line: `<role> <key>` with role `inspect` or `admin`.
    /// When given, every /v1 route needs `Authorization: Bearer <key>`.
    #[arg(long, env = "VIGIL_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// e.g. http://127.0.0.1:8080/health/ready (plain HTTP only).
    pub url: String,
    /// Seconds to wait for the answer (a NaN or negative value once panicked).
    #[arg(long, default_value_t = 2.0, value_parser = seconds)]
    pub timeout: f64,
}

/// Parses `text` as a `T` that `accept` takes; otherwise "`text` is not `what`". The
/// value parsers below are this with their bounds: a NaN, infinite or out-of-range number
/// would otherwise reach a model card that nothing can read back.
fn bounded<T: std::str::FromStr>(text: &str, accept: impl Fn(&T) -> bool, what: &str) -> Result<T, String> {
    text.parse::<T>()
        .ok()
        .filter(|v| accept(v))
        .ok_or_else(|| format!("{text:?} is not {what}"))
}

/// A non-negative, finite number of minutes.
fn minutes(text: &str) -> Result<f64, String> {
    bounded(
        text,
        |m: &f64| m.is_finite() && (0.0..=10_080.0).contains(m),
        "a number of minutes from 0 to 10080 (a week)",
    )
}

fn non_negative_f32(text: &str) -> Result<f32, String> {
    bounded(
        text,
        |v: &f32| v.is_finite() && *v >= 0.0,
        "a finite number of 0 or more",
    )
}

/// A number of seconds above 0 and at most a day (a timer that far ahead is a mistake,
/// and one past what the clock can add would panic).
fn seconds(text: &str) -> Result<f64, String> {
    bounded(
        text,
        |v: &f64| *v > 0.0 && *v <= 86_400.0,
        "a number of seconds above 0, at most 86400",
    )
}

fn seconds_or_zero(text: &str) -> Result<f64, String> {
    bounded(
        text,
        |v: &f64| (0.0..=86_400.0).contains(v),
        "a number of seconds from 0 to 86400",
    )
}

fn positive_f64(text: &str) -> Result<f64, String> {
    bounded(text, |v: &f64| v.is_finite() && *v > 0.0, "a finite number above 0")
}

fn unit_interval_f32(text: &str) -> Result<f32, String> {
    bounded(text, |v: &f32| (0.0..=1.0).contains(v), "a number from 0 to 1")
}

fn quantile(text: &str) -> Result<f32, String> {
    bounded(text, |v: &f32| *v > 0.0 && *v <= 1.0, "a quantile (above 0, at most 1)")
}

/// A fraction of the training images: something must be left to train on.
fn validation_fraction(text: &str) -> Result<f32, String> {
    bounded(
        text,
        |v: &f32| (0.0..1.0).contains(v),
        "a fraction from 0 up to (not including) 1",
    )
}

/// A synthetic image side: its defects are drawn at sizes that need 32 pixels or more.
fn synth_size(text: &str) -> Result<usize, String> {
    // 8192² is 67 MP an image, beyond any camera the set would stand in for.
    bounded(
        text,
        |v: &usize| (32..=8192).contains(v),
        "a whole number from 32 to 8192",
    )
}

fn retention_days(text: &str) -> Result<u64, String> {
    // Days past this overflowed the cutoff's microseconds and deleted everything.
    bounded(
        text,
        |v: &u64| *v <= 36_500,
        "a whole number of days from 0 (keep everything) to 36500",
    )
}

fn at_least_one_u64(text: &str) -> Result<u64, String> {
    bounded(text, |v: &u64| *v >= 1, "a whole number of 1 or more")
}

fn at_least_one_u32(text: &str) -> Result<u32, String> {
    bounded(text, |v: &u32| *v >= 1, "a whole number of 1 or more")
}

fn at_least_one(text: &str) -> Result<usize, String> {
    bounded(text, |v: &usize| *v >= 1, "a whole number of 1 or more")
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::Parser;

    /// True when `args` parse; false when clap refuses a value (any other refusal, such
    /// as a misspelt flag, fails the test instead of passing for a refused value).
    fn parses(args: &[&str]) -> bool {
        match Cli::try_parse_from(args) {
            Ok(_) => true,
            Err(e) if e.kind() == clap::error::ErrorKind::ValueValidation => false,
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    #[test]
    fn numbers_that_would_make_an_unusable_model_or_verdict_are_refused_when_parsed() {
        let train = |extra: &[&str]| {
            let mut a = vec!["vigil", "train", "--data", "d", "--out", "o"];
            a.extend_from_slice(extra);
            parses(&a)
        };
        assert!(train(&[]));
        assert!(train(&[
            "--margin",
            "0.2",
            "--quantile",
            "0.95",
            "--lr",
            "0.002",
            "--epochs",
            "3"
        ]));
        assert!(train(&[
            "--validation-fraction",
            "0",
            "--smoothing",
            "0",
            "--top-k",
            "50",
            "--beta",
            "0.1"
        ]));
        for bad in [
            &["--margin", "nan"][..],
            &["--margin", "inf"],
            &["--margin=-2"],
            &["--quantile", "2"],
            &["--quantile", "0"],
            &["--quantile", "nan"],
            &["--lr", "nan"],
            &["--lr", "0"],
            &["--epochs", "0"],
            &["--min-defect-area", "0"],
            &["--validation-fraction", "1"],
            &["--smoothing", "nan"],
            &["--top-k", "0"],
            &["--beta", "inf"],
        ] {
            assert!(!train(bad), "{bad:?} accepted");
        }
        let inspect = |extra: &[&str]| {
            let mut a = vec!["vigil", "inspect"];
            a.extend_from_slice(extra);
            a.push("x.png");
            parses(&a)
        };
        assert!(inspect(&["--threshold", "0.5"]));
        for bad in [
            &["--threshold", "nan"][..],
            &["--threshold", "inf"],
            &["--threshold", "1e40"],
            &["--alpha", "1.5"],
        ] {
            assert!(!inspect(bad), "{bad:?} accepted");
        }
        let calibrate = |q: &str| parses(&["vigil", "calibrate", "--model", "m", "--data", "d", "--quantile", q]);
        assert!(calibrate("1"));
        assert!(!calibrate("nan"));
        // Limits of 0 would refuse every image or request while the server reports ready.
        let serve = |extra: &[&str]| parses(&[&["vigil", "serve"][..], extra].concat());
        assert!(serve(&[
            "--max-batch",
            "1",
            "--queue-capacity",
            "1",
            "--max-pixels",
            "1",
            "--max-body-bytes",
            "1"
        ]));
        for flag in ["--max-batch", "--queue-capacity", "--max-pixels", "--max-body-bytes"] {
            assert!(!serve(&[flag, "0"]), "{flag} 0 accepted");
        }
        let synth = |size: &str| parses(&["vigil", "synth", "--out", "s", "--size", size]);
        assert!(synth("8192") && !synth("100000") && !synth("31"));
        assert!(!parses(&["vigil", "bench", "--repeat", "0"]));
        assert!(serve(&["--retention-days", "36500"]) && !serve(&["--retention-days", "999999999"]));
    }
}

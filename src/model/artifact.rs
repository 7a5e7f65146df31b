//! The model artifact: a directory holding `model.json` (this card) and `weights.safetensors`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::arch::Architecture;
use crate::scoring::MapSpec;
use crate::train::calibrate::ThresholdMethod;

pub const CARD_FILE: &str = "model.json";
pub const WEIGHTS_FILE: &str = "weights.safetensors";
/// The newest card schema this vigil reads. A card is written with the oldest schema that
/// holds what it uses ([`ModelCard::schema_needed`]): 2 only for test-time flips, which a
/// vigil reading schema 1 would ignore, scoring single views against a threshold set on
/// averaged maps (false alarms, with no word said); it refuses a schema-2 card instead.
pub const SCHEMA_VERSION: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(
        "{path}: not found (a model directory holds {CARD_FILE} and {WEIGHTS_FILE}; train one with `vigil train`)"
    )]
    Missing { path: PathBuf },
    // The causes are in the messages, so they are not also `source`s: a chain printed
    // with its causes (`{:#}`) would say each twice.
    #[error("{path}: cannot read: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("{path}: cannot write: {cause}")]
    Write { path: PathBuf, cause: std::io::Error },
    #[error("{path}: not a valid vigil model card: {cause}")]
    BadCard { path: PathBuf, cause: serde_json::Error },
    #[error("{path}: schema version {found} is newer than this vigil understands ({SCHEMA_VERSION}); upgrade vigil")]
    Schema { path: PathBuf, found: u32 },
    #[error("{path}: weights do not load: {message}")]
    BadWeights { path: PathBuf, message: String },
    #[error("{path}: inconsistent model card: {message}")]
    Inconsistent { path: PathBuf, message: String },
}

/// How images are fitted to the network.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Fit {
    /// The working image goes through the network in one pass.
    Whole,
    /// Overlapping `patch_size` tiles at `stride`; maps averaged where tiles overlap
    /// (Bergmann et al. used 128-pixel patches at stride 30).
    Tiles { stride: usize },
}

/// Input geometry and normalisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    /// 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    /// Every image is resized to `working_size × working_size` before anything else;
    /// maps are resized back to the image's own resolution at the end.
    pub working_size: usize,
    /// Side of the square crops the network was trained on.
    pub patch_size: usize,
    pub fit: Fit,
    /// Pixel values are divided by the format's maximum into [0, 1]; no mean/std shift.
    pub normalisation: String,
}

impl InputSpec {
    /// Checks that `architecture` takes these sizes, channels and fit.
    pub fn check(&self, architecture: &Architecture) -> Result<(), String> {
        architecture.validate(self.channels, self.patch_size)?;
        if self.working_size < self.patch_size {
            return Err(format!(
                "working size {} is smaller than the patch size {}",
                self.working_size, self.patch_size
            ));
        }
        match self.fit {
            Fit::Whole if !architecture.fully_convolutional() && self.working_size != self.patch_size => {
                Err("this architecture needs working_size == patch_size for whole-image fitting".into())
            }
            Fit::Whole => architecture.validate(self.channels, self.working_size),
            Fit::Tiles { stride: 0 } => Err("tile stride must be positive".into()),
            Fit::Tiles { .. } => Ok(()),
        }
    }
}

/// Thresholds and how they were set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// An image is anomalous when its score exceeds this.
    pub image: f32,
    /// Regions are the connected pixels above this (that reach `image` somewhere).
    pub pixel: f32,
    /// `quantile` or `min-area`.
    pub method: String,
    pub quantile: f32,
    pub margin: f32,
    pub min_defect_area: u32,
    pub validation_images: usize,
    /// Which images set these thresholds, and when if not at training (absent in cards
    /// written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_by: Option<String>,
    /// The image threshold was set by hand (`vigil calibrate --image-threshold`), not by
    /// `method`, which stays for the next calibration on images.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub manual: bool,
    /// Under `min-area`, scores are the highest map level with a region of the minimum
    /// area (what the threshold is). Cards calibrated with `min-area` before this existed
    /// scored by the family's reduction and stored those scores as their reference; they
    /// keep doing so until calibrated again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub level_scores: bool,
}

impl Thresholds {
    /// Whether an image's score is its min-area level rather than the scoring's reduction.
    pub fn scores_are_levels(&self) -> bool {
        self.method == ThresholdMethod::MinArea.name() && self.level_scores
    }
}

/// Statistics of a set of scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ScoreStats {
    pub count: usize,
    pub min: f32,
    pub max: f32,
    pub mean: f32,
    pub std: f32,
    pub p50: f32,
    pub p95: f32,
    pub p99: f32,
    /// Every score, ascending: the reference the server compares recent scores of good
    /// parts with (score drift). Absent in artifacts written before drift was measured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<f32>,
}

impl ScoreStats {
    pub fn of(scores: &[f32]) -> Self {
        if scores.is_empty() {
            return Self::default();
        }
        let n = scores.len() as f32;
        let mean = scores.iter().sum::<f32>() / n;
        let var = scores.iter().map(|s| (s - mean).powi(2)).sum::<f32>() / n;
        Self {
            count: scores.len(),
            min: scores.iter().copied().fold(f32::INFINITY, f32::min),
            max: scores.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            mean,
            std: var.sqrt(),
            p50: quantile(scores, 0.5),
            p95: quantile(scores, 0.95),
            p99: quantile(scores, 0.99),
            values: {
                let mut v = scores.to_vec();
                v.sort_by(f32::total_cmp);
                v
            },
        }
    }
}

/// Linear-interpolated quantile (numpy's default `linear` method).
pub fn quantile(values: &[f32], q: f32) -> f32 {
    assert!(!values.is_empty(), "quantile of nothing");
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f32;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f32)
}

/// Whether the reconstructions kept the input's contrast (a collapsed autoencoder outputs
/// a flat image at the mean brightness: a vector-latent SSIM autoencoder trained 9 minutes
/// on real textures did so every time, keeping 0.0003–0.002 of the inputs' 0.04–0.14 std).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CollapseCheck {
    pub input_std: f32,
    pub reconstruction_std: f32,
    /// reconstruction_std / input_std.
    pub contrast_ratio: f32,
    /// True when the ratio is under 0.2.
    pub collapsed: bool,
}

/// What training did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TrainingSummary {
    pub steps: usize,
    pub planned_steps: usize,
    pub stopped_early: bool,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub loss: String,
    pub seed: u64,
    pub threads: usize,
    pub device: String,
    pub seconds: f64,
    pub final_loss: f32,
    /// The named parts of the final loss (a discriminative family: reconstruction and
    /// segmentation).
    #[serde(default)]
    pub final_loss_parts: Vec<(String, f32)>,
    /// (step, mean loss over the preceding interval).
    pub loss_curve: Vec<(usize, f32)>,
    pub training_images: usize,
    /// The training images' size, [width, height], when they all shared it: an image of
    /// another size is judged with a warning (absent in cards written before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size: Option<[u32; 2]>,
    /// Whether the training images were `grey`, `colour` or `mixed`: an image of the other
    /// kind is judged with a warning (absent in cards written before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub colour: Option<String>,
    pub augment: Vec<String>,
    pub inpainting_fraction: f32,
    pub collapse: CollapseCheck,
    /// The time budget the default step count was fitted to, when it was (`planned_steps`
    /// is then what fitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_budget: Option<TimeBudget>,
}

/// How the step count was fitted to a time budget before training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimeBudget {
    pub minutes: f64,
    /// Seconds per step measured on a throwaway copy of the network just before training.
    pub probe_step_seconds: f64,
    /// The family's default step count, run when it fitted.
    pub default_steps: usize,
}

/// The model card, `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    pub schema_version: u32,
    pub vigil_version: String,
    pub architecture: Architecture,
    pub input: InputSpec,
    pub scoring: MapSpec,
    pub thresholds: Thresholds,
    pub validation_scores: ScoreStats,
    pub training: TrainingSummary,
    /// SHA-256 over the training files' contents' SHA-256s, sorted (names and folders do
    /// not change it; cards written before hashed the relative paths too).
    pub data_fingerprint: String,
    /// SHA-256 of `weights.safetensors` as training wrote it: loading refuses other
    /// weights under this card (its thresholds were set for these). Absent in cards
    /// written before it was recorded, which load unchecked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_sha256: Option<String>,
}

impl ModelCard {
    /// Reads and checks `dir/model.json`.
    pub fn load(dir: &Path) -> Result<Self, ArtifactError> {
        let path = dir.join(CARD_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ArtifactError::Missing { path: path.clone() }
            } else {
                ArtifactError::Io {
                    path: path.clone(),
                    cause: source,
                }
            }
        })?;
        let card: ModelCard = serde_json::from_str(&text).map_err(|source| ArtifactError::BadCard {
            path: path.clone(),
            cause: source,
        })?;
        if card.schema_version > SCHEMA_VERSION {
            return Err(ArtifactError::Schema {
                path,
                found: card.schema_version,
            });
        }
        card.check()
            .map_err(|message| ArtifactError::Inconsistent { path, message })?;
        if card.thresholds.method == ThresholdMethod::MinArea.name() && !card.thresholds.level_scores {
            tracing::warn!(
                model = %dir.display(),
                "calibrated with min-area before its scores were min-area levels: it judges each image's score \
                 against a region-level threshold and flags most parts; run `vigil calibrate` on good images"
            );
        }
        Ok(card)
    }

    /// What an anomaly map depends on: the weights (by their recorded hash) and how they
    /// are run and read (architecture, input, scoring), not the thresholds. Two versions
    /// with the same maps version draw the same maps of an image (a recalibration keeps
    /// it). None for a card that does not record its weights' hash.
    pub fn maps_version(&self) -> Option<String> {
        use sha2::{Digest, Sha256};
        let weights = self.weights_sha256.as_ref()?;
        let how = serde_json::to_vec(&(&self.architecture, &self.input, &self.scoring)).ok()?;
        let digest = Sha256::new().chain_update(weights).chain_update(how).finalize();
        Some(hex::encode(digest)[..16].to_string())
    }

    /// Checks the sizes fit together.
    pub fn check(&self) -> Result<(), String> {
        self.input.check(&self.architecture)?;
        self.scoring.check_loadable(self.input.working_size)
    }

    /// The oldest schema that holds what this card uses.
    pub fn schema_needed(&self) -> u32 {
        if self.scoring.test_time_flips.is_none() {
            1
        } else {
            2
        }
    }

    /// Writes `dir/model.json` (creating `dir`), atomically through a temporary file, and
    /// durably (synced).
    pub fn save(&self, dir: &Path) -> Result<(), ArtifactError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ArtifactError::Write { path, cause: source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(CARD_FILE);
        // A name of this writer's own: two saves at once (two `vigil calibrate` runs) each
        // publish a whole file, the last one winning, never one truncated by the other.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let tmp = dir.join(format!(".{CARD_FILE}.{}.{nanos}.tmp", std::process::id()));
        let card = ModelCard {
            schema_version: self.schema_needed(),
            ..self.clone()
        };
        let text = serde_json::to_string_pretty(&card).expect("a model card serialises");
        crate::durable::write_file(&tmp, &path, (text + "\n").as_bytes()).map_err(io(&path))
    }
}

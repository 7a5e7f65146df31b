//! Networks and the seams the rest of vigil sees.
//!
//! A model *family* is a folder here (`autoencoder`, `draem`, `vae`, `usad`, `adversarial`) holding its network and its
//! training step. Everything else (detector, scoring, engine, API, training loop) sees only
//! [`AnomalyModel`] (a batch in; the reconstruction and, where the family has one, a learned
//! anomaly map out) and [`TrainStep`] (one optimisation step that owns its optimizers and
//! losses). [`Network`] builds the family a model card names.

pub mod adversarial;
pub mod arch;
pub mod artifact;
pub mod autoencoder;
pub mod device;
pub mod draem;
pub(crate) mod layers;
pub mod usad;
pub mod vae;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_distr::Distribution;

pub use arch::Architecture;
pub use artifact::{ArtifactError, ModelCard};
pub use autoencoder::Autoencoder;

use crate::kernels::Kernels;
use crate::train::LossKind;

/// What a model makes of a batch.
#[derive(Debug, Clone)]
pub struct ModelOutput {
    /// The image the model rebuilt, same shape as the input (N, C, H, W), in [0, 1]: shown
    /// to users, and the basis of the SSIM/L2 maps.
    pub reconstruction: Tensor,
    /// A per-pixel anomaly map the model computes itself (N, 1, H, W), if it has one: the
    /// segmentation probability of a discriminative family.
    pub learned_map: Option<Tensor>,
    /// A second learned map (N, 1, H, W) that scoring mixes with the first:
    /// α·learned + (1 − α)·second, α the architecture's ([`Architecture::map_alpha`]) or a
    /// request's. USAD's second decoder's error on the first decoder's rebuild.
    pub second_map: Option<Tensor>,
}

/// Inference: a batch (N, C, H, W) with values in [0, 1] in, maps and images out.
/// Synchronous: called from one model thread. Tests substitute fakes.
pub trait AnomalyModel: Send + Sync {
    fn infer(&self, batch: &Tensor) -> candle_core::Result<ModelOutput>;
    fn device(&self) -> &Device;
}

/// One training batch: the (possibly corrupted) input, the clean target and the mask of
/// what was corrupted (N, 1, H, W; 1 = synthetic anomaly or inpainted pixel).
pub struct TrainBatch {
    pub input: Tensor,
    pub target: Tensor,
    pub mask: Tensor,
}

/// The loss of one step: the total that was minimised and its named parts.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLoss {
    pub total: f32,
    pub parts: Vec<(&'static str, f32)>,
}

/// One optimisation step of a family; owns its optimizers and losses.
pub trait TrainStep {
    fn step(&mut self, batch: &TrainBatch, learning_rate: f64) -> candle_core::Result<StepLoss>;
}

/// What a family's training step is built with.
#[derive(Debug, Clone, Copy)]
pub struct StepSettings {
    /// The reconstruction loss.
    pub loss: LossKind,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub kernels: Kernels,
    /// Seeds the step's own randomness (a VAE's samples), for reproducible training.
    pub seed: u64,
}

/// Trainable variables with their weight names, in name order (a family with several
/// optimisers splits them by name).
pub(crate) type NamedVars = Vec<(String, Var)>;

/// The variables alone.
pub(crate) fn unnamed(vars: NamedVars) -> Vec<Var> {
    vars.into_iter().map(|(_, v)| v).collect()
}

/// What every family's network provides to [`Network`].
trait Family: Send + Sync {
    fn infer(&self, x: &Tensor) -> candle_core::Result<ModelOutput>;
    /// A training step over `vars` (every trainable variable, in name order).
    fn trainer<'a>(&'a self, vars: NamedVars, settings: StepSettings) -> candle_core::Result<Box<dyn TrainStep + 'a>>;
    fn set_kernels(&mut self, kernels: Kernels);
    fn flops(&self, h: usize, w: usize) -> u64;
    /// The plain autoencoder that rebuilds the image, where the family has one.
    fn reconstructor(&self) -> Option<&Autoencoder>;
}

/// A model of any family with its weights.
pub struct Network {
    family: Box<dyn Family>,
    pub varmap: VarMap,
    device: Device,
}

impl Network {
    fn build(
        arch: &Architecture,
        channels: usize,
        size: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Box<dyn Family>> {
        Ok(match arch {
            Architecture::Draem { .. } => Box::new(draem::DraemNet::new(arch, channels, size, vb)?),
            Architecture::Vae { .. } => Box::new(vae::Vae::new(arch, channels, size, vb)?),
            Architecture::Usad { .. } => Box::new(usad::Usad::new(arch, channels, size, vb)?),
            Architecture::Adversarial { .. } => Box::new(adversarial::Adversarial::new(arch, channels, size, vb)?),
            _ => Box::new(Autoencoder::new(arch, channels, size, vb)?),
        })
    }

    /// A freshly initialised network; initialisation is drawn from `seed` so CPU training
    /// is reproducible (candle's own CPU initialisers cannot be seeded).
    pub fn new_seeded(
        arch: &Architecture,
        channels: usize,
        patch_size: usize,
        device: &Device,
        seed: u64,
    ) -> candle_core::Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let family = Self::build(arch, channels, patch_size, vb)?;
        seeded_init(&varmap, seed)?;
        Ok(Self {
            family,
            varmap,
            device: device.clone(),
        })
    }

    /// Loads the network described by `card` with the weights in `dir`.
    pub fn load(dir: &Path, card: &ModelCard, device: &Device) -> Result<Self, ArtifactError> {
        let path = dir.join(artifact::WEIGHTS_FILE);
        if !path.exists() {
            return Err(ArtifactError::Missing { path });
        }
        let bad = |e: candle_core::Error| ArtifactError::BadWeights {
            path: path.clone(),
            message: e.to_string(),
        };
        if let Some(recorded) = &card.weights_sha256 {
            let actual = file_sha256(&path)?;
            if !actual.eq_ignore_ascii_case(recorded) {
                return Err(ArtifactError::BadWeights {
                    path,
                    message: format!(
                        "not the weights this model.json was written with (SHA-256 {}…, recorded {}…): \
                         a model's two files belong together; copy both from one model folder",
                        &actual[..12],
                        recorded.get(..12).unwrap_or(recorded)
                    ),
                });
            }
        }
        let mut varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let family = Self::build(&card.architecture, card.input.channels, card.input.patch_size, vb).map_err(bad)?;
        varmap.load(&path).map_err(bad)?;
        Ok(Self {
            family,
            varmap,
            device: device.clone(),
        })
    }

    /// Writes `dir/weights.safetensors` atomically.
    pub fn save_weights(&self, dir: &Path) -> Result<(), ArtifactError> {
        let staged = self.stage_weights(dir)?;
        place_weights(&staged, dir)
    }

    /// Writes the weights beside their final place in `dir`, under a temporary name;
    /// [`place_weights`] moves them there (one rename).
    pub fn stage_weights(&self, dir: &Path) -> Result<PathBuf, ArtifactError> {
        let tmp = dir.join(format!(".{}.tmp", artifact::WEIGHTS_FILE));
        self.varmap.save(&tmp).map_err(|e| ArtifactError::BadWeights {
            path: tmp.clone(),
            message: e.to_string(),
        })?;
        // safetensors creates the file owner-only; a model is meant to be shared (a
        // container runs it as another user), so make it world-readable like model.json.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644));
        }
        crate::durable::sync_file(&tmp).map_err(|source| ArtifactError::Write {
            path: tmp.clone(),
            cause: source,
        })?;
        Ok(tmp)
    }

    /// Number of trainable values.
    pub fn parameter_count(&self) -> usize {
        self.trainable_vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Every trainable variable (not BatchNorm running statistics), in name order.
    fn trainable_vars(&self) -> NamedVars {
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut named: NamedVars = data
            .iter()
            .filter(|(k, _)| !k.contains("running_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    /// The family's training step over all trainable variables.
    pub fn trainer(&self, settings: StepSettings) -> candle_core::Result<Box<dyn TrainStep + '_>> {
        self.family.trainer(self.trainable_vars(), settings)
    }

    /// Chooses the convolution kernels (the fast CPU kernels by default).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.family.set_kernels(kernels);
    }

    /// Multiply-adds × 2 of one forward pass on an `h × w` input.
    pub fn flops(&self, h: usize, w: usize) -> u64 {
        self.family.flops(h, w)
    }

    /// The plain autoencoder that rebuilds the image, where the family has one.
    pub fn autoencoder(&self) -> Option<&Autoencoder> {
        self.family.reconstructor()
    }
}

impl AnomalyModel for Network {
    fn infer(&self, batch: &Tensor) -> candle_core::Result<ModelOutput> {
        self.family.infer(batch)
    }
    fn device(&self) -> &Device {
        &self.device
    }
}

/// Re-initialises every weight from a seeded generator, in name order: He-normal
/// weights (fan-in over all but the first dimension), zero biases; BatchNorm
/// parameters and running statistics (rank 1) keep their constant initial values.
fn seeded_init(varmap: &VarMap, seed: u64) -> candle_core::Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let is_norm = name.contains("running_") || (dims.len() == 1 && !is_bias_of_linear_or_conv(name, &data));
        if is_norm {
            continue;
        }
        let values: Vec<f32> = if dims.len() == 1 {
            vec![0.0; dims[0]]
        } else {
            let fan_in: usize = dims[1..].iter().product();
            let normal = rand_distr::Normal::new(0.0, (2.0 / fan_in as f64).sqrt()).expect("valid std");
            (0..var.elem_count()).map(|_| normal.sample(&mut rng) as f32).collect()
        };
        var.set(&Tensor::from_vec(values, dims, var.device())?)?;
    }
    Ok(())
}

/// A rank-1 `bias` whose sibling `weight` has rank > 1 belongs to a conv or linear layer.
fn is_bias_of_linear_or_conv(name: &str, data: &std::collections::HashMap<String, candle_core::Var>) -> bool {
    name.strip_suffix(".bias")
        .and_then(|p| data.get(&format!("{p}.weight")))
        .is_some_and(|w| w.rank() > 1)
}

/// Moves weights written by [`Network::stage_weights`] to their place in `dir`, durably.
pub fn place_weights(staged: &Path, dir: &Path) -> Result<(), ArtifactError> {
    let path = dir.join(artifact::WEIGHTS_FILE);
    crate::durable::publish(staged, &path).map_err(|source| ArtifactError::Write { path, cause: source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architectures_give_outputs_of_the_input_shape() {
        let dev = Device::Cpu;
        for (arch, c, size) in [
            (Architecture::Bergmann { latent: 10 }, 1, 128),
            (Architecture::Bergmann { latent: 10 }, 3, 256),
            (
                Architecture::Spatial {
                    width: 4,
                    bottleneck: 2,
                },
                3,
                32,
            ),
        ] {
            let net = Network::new_seeded(&arch, c, size, &dev, 1).unwrap();
            let x = Tensor::rand(0f32, 1f32, (2, c, size, size), &dev).unwrap();
            let y = net.infer(&x).unwrap().reconstruction;
            assert_eq!(y.dims(), &[2, c, size, size], "{arch:?}");
            let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|p| (0.0..=1.0).contains(p)), "sigmoid output");
        }
    }

    #[test]
    fn spatial_network_takes_larger_inputs_than_its_patch() {
        let dev = Device::Cpu;
        let net = Network::new_seeded(
            &Architecture::Spatial {
                width: 4,
                bottleneck: 2,
            },
            1,
            32,
            &dev,
            1,
        )
        .unwrap();
        let x = Tensor::rand(0f32, 1f32, (1, 1, 48, 64), &dev).unwrap();
        assert_eq!(net.infer(&x).unwrap().reconstruction.dims(), &[1, 1, 48, 64]);
    }

    #[test]
    fn seeded_initialisation_is_reproducible() {
        let dev = Device::Cpu;
        let arch = Architecture::Spatial {
            width: 4,
            bottleneck: 2,
        };
        let a = Network::new_seeded(&arch, 1, 32, &dev, 7).unwrap();
        let b = Network::new_seeded(&arch, 1, 32, &dev, 7).unwrap();
        let c = Network::new_seeded(&arch, 1, 32, &dev, 8).unwrap();
        let x = Tensor::rand(0f32, 1f32, (1, 1, 32, 32), &dev).unwrap();
        let recon = |n: &Network| -> Vec<f32> {
            let y = n.infer(&x).unwrap().reconstruction;
            y.flatten_all().unwrap().to_vec1().unwrap()
        };
        let (ya, yb, yc) = (recon(&a), recon(&b), recon(&c));
        assert_eq!(ya, yb);
        assert_ne!(ya, yc);
    }
}

#[cfg(test)]
mod flop_tests {
    use super::*;

    #[test]
    fn bergmann_flops_match_the_published_count() {
        // 242.5 MFLOP per 128×128 grayscale image, as published for this network. By hand, the
        // encoder's nine convolutions cost 121,257,984 FLOPs (e.g. the first, 1→32 ch,
        // 4×4, at 64²: 2·32·16·4096 = 4,194,304) and the mirrored decoder the same (its
        // Linear 100→2048 costs what the 8×8 valid convolution does).
        let net = Network::new_seeded(&Architecture::Bergmann { latent: 100 }, 1, 128, &Device::Cpu, 0).unwrap();
        assert_eq!(net.flops(128, 128), 2 * 121_257_984);
    }
}

/// SHA-256 of a file, in hex.
pub fn file_sha256(path: &Path) -> Result<String, ArtifactError> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).map_err(|source| ArtifactError::Io {
        path: path.to_path_buf(),
        cause: source,
    })?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

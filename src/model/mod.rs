//! Networks: architectures, device selection, the artifact, and the `Reconstructor` seam
//! the scoring pipeline and the serving engine call.

pub mod arch;
pub mod artifact;
pub mod device;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_distr::Distribution;

pub use arch::{Architecture, Autoencoder};
pub use artifact::{ArtifactError, ModelCard};

/// Turns a batch (N, C, H, W) with values in [0, 1] into its reconstruction, same shape.
/// Synchronous: called from one model thread. Tests substitute fakes.
pub trait Reconstructor: Send + Sync {
    fn reconstruct(&self, batch: &Tensor) -> candle_core::Result<Tensor>;
    fn device(&self) -> &Device;
}

/// An autoencoder with its weights.
pub struct Network {
    pub autoencoder: Autoencoder,
    pub varmap: VarMap,
    device: Device,
}

impl Network {
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
        let autoencoder = Autoencoder::new(arch, channels, patch_size, vb)?;
        seeded_init(&varmap, seed)?;
        Ok(Self {
            autoencoder,
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
        let mut varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let autoencoder =
            Autoencoder::new(&card.architecture, card.input.channels, card.input.patch_size, vb).map_err(bad)?;
        varmap.load(&path).map_err(bad)?;
        Ok(Self {
            autoencoder,
            varmap,
            device: device.clone(),
        })
    }

    /// Writes `dir/weights.safetensors` atomically.
    pub fn save_weights(&self, dir: &Path) -> Result<(), ArtifactError> {
        let path = dir.join(artifact::WEIGHTS_FILE);
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
        std::fs::rename(&tmp, &path).map_err(|source| ArtifactError::Io { path, source })
    }

    /// Number of trainable values.
    pub fn parameter_count(&self) -> usize {
        self.varmap.all_vars().iter().map(|v| v.elem_count()).sum()
    }
}

impl Reconstructor for Network {
    fn reconstruct(&self, batch: &Tensor) -> candle_core::Result<Tensor> {
        self.autoencoder.forward_t(batch, false)
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
            let y = net.reconstruct(&x).unwrap();
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
        assert_eq!(net.reconstruct(&x).unwrap().dims(), &[1, 1, 48, 64]);
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
        let ya: Vec<f32> = a.reconstruct(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let yb: Vec<f32> = b.reconstruct(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let yc: Vec<f32> = c.reconstruct(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(ya, yb);
        assert_ne!(ya, yc);
    }
}

#[cfg(test)]
mod flop_tests {
    use super::*;

    #[test]
    fn bergmann_flops_match_the_published_count() {
        // ../shared/FINDINGS.md: 242.5 MFLOP per 128×128 grayscale image. By hand, the
        // encoder's nine convolutions cost 121,257,984 FLOPs (e.g. the first, 1→32 ch,
        // 4×4, at 64²: 2·32·16·4096 = 4,194,304) and the mirrored decoder the same (its
        // Linear 100→2048 costs what the 8×8 valid convolution does).
        let net = Network::new_seeded(&Architecture::Bergmann { latent: 100 }, 1, 128, &Device::Cpu, 0).unwrap();
        assert_eq!(net.autoencoder.flops(128, 128), 2 * 121_257_984);
    }
}

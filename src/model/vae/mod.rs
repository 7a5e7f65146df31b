//! The variational family (Kingma & Welling 2014) on the spatial autoencoder: the code at
//! 1/8 resolution is a Gaussian per value (mean and log-variance), training decodes a
//! sample of it and pays β·KL for straying from N(0, 1), inference decodes the mean. A
//! reconstruction family: its anomaly map is the SSIM/L2 error like the plain autoencoder's.

use candle_core::{Result, Tensor};
use candle_nn::{AdamW, Optimizer, VarBuilder};
use rand::SeedableRng;
use rand_distr::Distribution;

use super::autoencoder::{adamw, Autoencoder};
use super::{Architecture, Family, ModelOutput, NamedVars, StepLoss, StepSettings, TrainBatch, TrainStep};
use crate::kernels::Kernels;

/// Log-variances are clamped to ±this before `exp`: a wild early step cannot overflow σ.
const LOG_VARIANCE_LIMIT: f64 = 8.0;

/// The spatial autoencoder with a distribution for a code (`enc.*`, `dec.*` weights, as the
/// spatial network; the encoder's last layer emits 2·bottleneck channels).
pub struct Vae {
    net: Autoencoder,
    bottleneck: usize,
    beta: f64,
    kl_warmup_steps: usize,
}

impl Vae {
    pub fn new(arch: &Architecture, channels: usize, size: usize, vb: VarBuilder) -> Result<Self> {
        arch.validate(channels, size).map_err(candle_core::Error::Msg)?;
        let Architecture::Vae {
            width,
            bottleneck,
            beta,
            kl_warmup_steps,
        } = *arch
        else {
            candle_core::bail!("not a vae architecture: {arch:?}")
        };
        Ok(Self {
            net: Autoencoder::spatial_with_code(width, 2 * bottleneck, bottleneck, channels, vb)?,
            bottleneck,
            beta: beta as f64,
            kl_warmup_steps,
        })
    }

    /// The code's mean and (clamped) log-variance, each (N, bottleneck, H/8, W/8).
    fn posterior(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let code = self.net.encode(x, train)?;
        let mean = code.narrow(1, 0, self.bottleneck)?;
        let log_variance = code
            .narrow(1, self.bottleneck, self.bottleneck)?
            .clamp(-LOG_VARIANCE_LIMIT, LOG_VARIANCE_LIMIT)?;
        Ok((mean, log_variance))
    }

    /// β for step `step` (0-based): linear from 0 to β over the warm-up, so the decoder
    /// first learns to reconstruct before the code is pulled towards the prior.
    pub fn beta_at(&self, step: usize) -> f64 {
        if self.kl_warmup_steps == 0 {
            self.beta
        } else {
            self.beta * ((step + 1) as f64 / self.kl_warmup_steps as f64).min(1.0)
        }
    }
}

/// KL(N(μ, σ²) ‖ N(0, 1)) per code value, averaged: mean of ½(μ² + σ² − 1 − ln σ²).
pub fn kl_divergence(mean: &Tensor, log_variance: &Tensor) -> Result<Tensor> {
    let per_value = ((mean.sqr()? + log_variance.exp()?)? - 1.0)?.sub(log_variance)?;
    (per_value * 0.5)?.mean_all()
}

impl Family for Vae {
    fn infer(&self, x: &Tensor) -> Result<ModelOutput> {
        let (mean, _) = self.posterior(x, false)?;
        Ok(ModelOutput {
            reconstruction: self.net.decode(&mean, false)?,
            learned_map: None,
            second_map: None,
        })
    }

    fn trainer<'a>(&'a self, vars: NamedVars, settings: StepSettings) -> Result<Box<dyn TrainStep + 'a>> {
        Ok(Box::new(VaeStep {
            vae: self,
            opt: adamw(vars, &settings)?,
            settings,
            // ε comes from a seeded generator: candle's CPU sampler cannot be seeded, and
            // CPU training must be reproducible for a seed.
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(settings.seed),
            step: 0,
        }))
    }

    fn set_kernels(&mut self, kernels: Kernels) {
        self.net.set_kernels(kernels);
    }

    fn flops(&self, h: usize, w: usize) -> u64 {
        self.net.flops(h, w)
    }

    fn reconstructor(&self) -> Option<&Autoencoder> {
        None
    }
}

/// Reconstruction of the clean target from a sampled code, plus the warmed-up β·KL.
struct VaeStep<'a> {
    vae: &'a Vae,
    opt: AdamW,
    settings: StepSettings,
    rng: rand_chacha::ChaCha8Rng,
    step: usize,
}

impl TrainStep for VaeStep<'_> {
    fn step(&mut self, batch: &TrainBatch, learning_rate: f64) -> Result<StepLoss> {
        self.opt.set_learning_rate(learning_rate);
        let (mean, log_variance) = self.vae.posterior(&batch.input, true)?;
        let noise: Vec<f32> = (0..mean.elem_count())
            .map(|_| rand_distr::StandardNormal.sample(&mut self.rng))
            .collect();
        let noise = Tensor::from_vec(noise, mean.shape(), mean.device())?;
        let z = (&mean + (&log_variance * 0.5)?.exp()?.mul(&noise)?)?;
        let recon = self.vae.net.decode(&z, true)?;
        let reconstruction = self
            .settings
            .loss
            .compute(&recon, &batch.target, self.settings.kernels)?;
        let kl = kl_divergence(&mean, &log_variance)?;
        let total = (&reconstruction + (&kl * self.vae.beta_at(self.step))?)?;
        self.opt.backward_step(&total)?;
        self.step += 1;
        Ok(StepLoss {
            total: total.to_scalar()?,
            parts: vec![("reconstruction", reconstruction.to_scalar()?), ("kl", kl.to_scalar()?)],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn kl_matches_its_closed_form_by_hand() {
        // ½(μ² + σ² − 1 − ln σ²) per value:
        //   μ = 0, ln σ² = 0:  0
        //   μ = 1, ln σ² = 0:  ½
        //   μ = 0, ln σ² = ln 4 = 1.386294:  ½(4 − 1 − 1.386294) = 0.806853
        //   μ = −2, ln σ² = −1:  ½(4 + 0.367879 − 1 + 1) = 2.183940
        // mean = (0 + 0.5 + 0.806853 + 2.183940) / 4 = 0.872698
        let dev = Device::Cpu;
        let mean = Tensor::new(&[0f32, 1.0, 0.0, -2.0], &dev).unwrap();
        let log_variance = Tensor::new(&[0f32, 0.0, 4f32.ln(), -1.0], &dev).unwrap();
        let kl: f32 = kl_divergence(&mean, &log_variance).unwrap().to_scalar().unwrap();
        assert!((kl - 0.872698).abs() < 1e-5, "{kl}");
    }

    #[test]
    fn beta_ramps_up_over_the_warm_up_then_holds() {
        let arch = Architecture::Vae {
            width: 4,
            bottleneck: 2,
            beta: 0.5,
            kl_warmup_steps: 4,
        };
        let vb = VarBuilder::zeros(candle_core::DType::F32, &Device::Cpu);
        let vae = Vae::new(&arch, 1, 32, vb).unwrap();
        let betas: Vec<f64> = (0..6).map(|s| vae.beta_at(s)).collect();
        assert_eq!(betas, vec![0.125, 0.25, 0.375, 0.5, 0.5, 0.5]);
    }
}

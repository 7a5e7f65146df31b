//! The GAN-trained reconstructor: the spatial autoencoder trained on its reconstruction
//! loss plus an adversarial loss from a patch critic that learns to tell good training
//! images from reconstructions (hinge losses, spectrally normalised critic). Plain
//! reconstruction losses average over what they cannot predict and blur fine texture; the
//! critic penalises blur, so good texture is rebuilt sharper and its own reconstruction
//! error falls relative to a defect's. The anomaly map is the critic's feature distance
//! between an image and its reconstruction (the learned map: on the development set of
//! real surfaces it ranked images better than the SSIM/L2 reconstruction error, which
//! `--map ssim+l2` selects).

mod critic;

use candle_core::{Result, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder};

pub use critic::Critic;

use super::autoencoder::{adamw, Autoencoder};
use super::{unnamed, Architecture, Family, ModelOutput, NamedVars, StepLoss, StepSettings, TrainBatch, TrainStep};
use crate::kernels::Kernels;

/// The reconstructor (`reconstructor.*`, the spatial autoencoder) and the critic
/// (`discriminator.*`).
pub struct Adversarial {
    reconstructor: Autoencoder,
    critic: Critic,
    adversarial_weight: f64,
}

impl Adversarial {
    pub fn new(arch: &Architecture, channels: usize, size: usize, vb: VarBuilder) -> Result<Self> {
        arch.validate(channels, size).map_err(candle_core::Error::Msg)?;
        let Architecture::Adversarial {
            width,
            bottleneck,
            critic_width,
            adversarial_weight,
        } = *arch
        else {
            candle_core::bail!("not an adversarial architecture: {arch:?}")
        };
        Ok(Self {
            reconstructor: Autoencoder::spatial(width, bottleneck, channels, vb.pp("reconstructor"))?,
            critic: Critic::new(channels, critic_width, vb.pp("discriminator"))?,
            adversarial_weight: adversarial_weight as f64,
        })
    }
}

/// The critic's hinge loss (Lim & Ye 2017; Miyato et al. 2018):
/// mean(max(0, 1 − D(real))) + mean(max(0, 1 + D(fake))).
pub fn critic_hinge_loss(real_logits: &Tensor, fake_logits: &Tensor) -> Result<Tensor> {
    let real = (1.0 - real_logits)?.relu()?.mean_all()?;
    let fake = (fake_logits + 1.0)?.relu()?.mean_all()?;
    real + fake
}

/// The reconstructor's adversarial loss: −mean(D(fake)) (it wants its rebuilds judged real).
pub fn generator_hinge_loss(fake_logits: &Tensor) -> Result<Tensor> {
    fake_logits.mean_all()?.neg()
}

impl Family for Adversarial {
    fn infer(&self, x: &Tensor) -> Result<ModelOutput> {
        let reconstruction = self.reconstructor.forward_t(x, false)?;
        Ok(ModelOutput {
            learned_map: Some(self.critic.feature_distance(x, &reconstruction)?),
            second_map: None,
            reconstruction,
        })
    }

    fn trainer<'a>(&'a self, vars: NamedVars, settings: StepSettings) -> Result<Box<dyn TrainStep + 'a>> {
        let (critic_vars, reconstructor_vars): (NamedVars, NamedVars) = vars
            .into_iter()
            .partition(|(name, _)| name.starts_with("discriminator."));
        // GAN practice: a short first-moment memory for the critic (β1 = 0.5), so it follows
        // the moving reconstructor; no weight decay (spectral normalisation bounds it).
        let critic_opt = AdamW::new(
            unnamed(critic_vars),
            ParamsAdamW {
                lr: settings.learning_rate,
                beta1: 0.5,
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        Ok(Box::new(AdversarialStep {
            net: self,
            reconstructor_opt: adamw(reconstructor_vars, &settings)?,
            critic_opt,
            settings,
        }))
    }

    fn set_kernels(&mut self, kernels: Kernels) {
        self.reconstructor.set_kernels(kernels);
        self.critic.set_kernels(kernels);
    }

    fn flops(&self, h: usize, w: usize) -> u64 {
        // Inference: the reconstructor, and the critic's first two stages on the image and
        // on its reconstruction (a small share).
        self.reconstructor.flops(h, w) + self.critic.flops(h, w)
    }

    fn reconstructor(&self) -> Option<&Autoencoder> {
        Some(&self.reconstructor)
    }
}

/// Two optimisers, as a GAN trains: the reconstructor descends reconstruction +
/// weight·adversarial loss, then the critic descends its hinge loss on clean targets
/// (real) against the same step's reconstructions (fake, cut from the graph).
struct AdversarialStep<'a> {
    net: &'a Adversarial,
    reconstructor_opt: AdamW,
    critic_opt: AdamW,
    settings: StepSettings,
}

impl TrainStep for AdversarialStep<'_> {
    fn step(&mut self, batch: &TrainBatch, learning_rate: f64) -> Result<StepLoss> {
        self.reconstructor_opt.set_learning_rate(learning_rate);
        self.critic_opt.set_learning_rate(learning_rate);
        let net = self.net;
        net.critic.power_iteration()?;
        let recon = net.reconstructor.forward_t(&batch.input, true)?;
        let reconstruction = self
            .settings
            .loss
            .compute(&recon, &batch.target, self.settings.kernels)?;
        let adversarial = generator_hinge_loss(&net.critic.forward(&recon)?)?;
        let total = (&reconstruction + (&adversarial * net.adversarial_weight)?)?;
        // The critic's weights get gradients here too; only the reconstructor's optimiser
        // steps on them.
        self.reconstructor_opt.backward_step(&total)?;
        let fake = recon.detach();
        let critic = critic_hinge_loss(&net.critic.forward(&batch.target)?, &net.critic.forward(&fake)?)?;
        self.critic_opt.backward_step(&critic)?;
        Ok(StepLoss {
            total: total.to_scalar()?,
            parts: vec![
                ("reconstruction", reconstruction.to_scalar()?),
                ("adversarial", adversarial.to_scalar()?),
                ("critic", critic.to_scalar()?),
            ],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn hinge_losses_by_hand() {
        // real logits (2, 0.5, −1): max(0, 1 − ·) = 0, 0.5, 2 → mean 0.8333;
        // fake logits (−2, 0, 1): max(0, 1 + ·) = 0, 1, 2 → mean 1; critic loss 1.8333.
        // The reconstructor's loss on those fakes: −mean(−2, 0, 1) = 1/3.
        let dev = Device::Cpu;
        let real = Tensor::new(&[2f32, 0.5, -1.0], &dev).unwrap();
        let fake = Tensor::new(&[-2f32, 0.0, 1.0], &dev).unwrap();
        let c: f32 = critic_hinge_loss(&real, &fake).unwrap().to_scalar().unwrap();
        assert!((c - (0.5 + 2.0) / 3.0 - 1.0).abs() < 1e-6, "{c}");
        let g: f32 = generator_hinge_loss(&fake).unwrap().to_scalar().unwrap();
        assert!((g - 1.0 / 3.0).abs() < 1e-6, "{g}");
    }
}

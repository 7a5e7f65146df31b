//! The reconstruction family: an autoencoder trained to rebuild good images; anomalies are
//! where it fails (SSIM/L2 maps, computed by `crate::scoring`).

mod network;

use candle_core::{Result, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

pub use network::Autoencoder;

use super::{unnamed, Family, ModelOutput, NamedVars, StepLoss, StepSettings, TrainBatch, TrainStep};
use crate::kernels::Kernels;

impl Family for Autoencoder {
    fn infer(&self, x: &Tensor) -> Result<ModelOutput> {
        Ok(ModelOutput {
            reconstruction: self.forward_t(x, false)?,
            learned_map: None,
            second_map: None,
        })
    }

    fn trainer<'a>(&'a self, vars: NamedVars, settings: StepSettings) -> Result<Box<dyn TrainStep + 'a>> {
        Ok(Box::new(ReconstructionStep {
            net: self,
            opt: adamw(vars, &settings)?,
            settings,
        }))
    }

    fn set_kernels(&mut self, kernels: Kernels) {
        Autoencoder::set_kernels(self, kernels);
    }

    fn flops(&self, h: usize, w: usize) -> u64 {
        Autoencoder::flops(self, h, w)
    }

    fn reconstructor(&self) -> Option<&Autoencoder> {
        Some(self)
    }
}

/// AdamW over `vars` with the settings' learning rate and weight decay.
pub(crate) fn adamw(vars: NamedVars, settings: &StepSettings) -> Result<AdamW> {
    AdamW::new(
        unnamed(vars),
        ParamsAdamW {
            lr: settings.learning_rate,
            weight_decay: settings.weight_decay,
            ..Default::default()
        },
    )
}

/// Rebuild the clean target from the (possibly corrupted) input.
struct ReconstructionStep<'a> {
    net: &'a Autoencoder,
    opt: AdamW,
    settings: StepSettings,
}

impl TrainStep for ReconstructionStep<'_> {
    fn step(&mut self, batch: &TrainBatch, learning_rate: f64) -> Result<StepLoss> {
        self.opt.set_learning_rate(learning_rate);
        let recon = self.net.forward_t(&batch.input, true)?;
        let loss = self
            .settings
            .loss
            .compute(&recon, &batch.target, self.settings.kernels)?;
        self.opt.backward_step(&loss)?;
        let total = loss.to_scalar::<f32>()?;
        Ok(StepLoss {
            total,
            parts: vec![("reconstruction", total)],
        })
    }
}

//! The discriminative family (after DRAEM, Zavrtanik et al. ICCV 2021): a reconstructive
//! autoencoder learns to rebuild clean images from ones with synthetic anomalies, and a
//! segmentation network learns, from the image beside its reconstruction, where the
//! anomaly was pasted (focal loss). The anomaly map is the segmenter's probability.

mod network;

use candle_core::{Result, Tensor};
use candle_nn::{AdamW, Optimizer};

pub use network::{DraemNet, Segmenter};

use super::autoencoder::{adamw, Autoencoder};
use super::{Family, ModelOutput, NamedVars, StepLoss, StepSettings, TrainBatch, TrainStep};
use crate::kernels::Kernels;

/// Focusing parameter of the focal loss (Lin et al. 2017; DRAEM uses 2).
pub const FOCAL_GAMMA: f64 = 2.0;

impl Family for DraemNet {
    fn infer(&self, x: &Tensor) -> Result<ModelOutput> {
        let (reconstruction, logits) = self.forward_t(x, false)?;
        Ok(ModelOutput {
            reconstruction,
            learned_map: Some(candle_nn::ops::sigmoid(&logits)?),
            second_map: None,
        })
    }

    fn trainer<'a>(&'a self, vars: NamedVars, settings: StepSettings) -> Result<Box<dyn TrainStep + 'a>> {
        Ok(Box::new(DraemStep {
            net: self,
            opt: adamw(vars, &settings)?,
            settings,
        }))
    }

    fn set_kernels(&mut self, kernels: Kernels) {
        self.reconstructor.set_kernels(kernels);
        self.segmenter.set_kernels(kernels);
    }

    fn flops(&self, h: usize, w: usize) -> u64 {
        self.reconstructor.flops(h, w) + self.segmenter.flops(h, w)
    }

    fn reconstructor(&self) -> Option<&Autoencoder> {
        Some(&self.reconstructor)
    }
}

/// Both networks in one step with one optimizer: reconstruction loss against the clean
/// target plus the focal loss of the segmentation against the anomaly mask.
struct DraemStep<'a> {
    net: &'a DraemNet,
    opt: AdamW,
    settings: StepSettings,
}

impl TrainStep for DraemStep<'_> {
    fn step(&mut self, batch: &TrainBatch, learning_rate: f64) -> Result<StepLoss> {
        self.opt.set_learning_rate(learning_rate);
        let (recon, logits) = self.net.forward_t(&batch.input, true)?;
        let reconstruction = self
            .settings
            .loss
            .compute(&recon, &batch.target, self.settings.kernels)?;
        let segmentation = focal_loss(&logits, &batch.mask, FOCAL_GAMMA)?;
        let total = (&reconstruction + &segmentation)?;
        self.opt.backward_step(&total)?;
        Ok(StepLoss {
            total: total.to_scalar()?,
            parts: vec![
                ("reconstruction", reconstruction.to_scalar()?),
                ("segmentation", segmentation.to_scalar()?),
            ],
        })
    }
}

/// `log(1 + e^x)` without overflow: `max(x, 0) + log(1 + e^−|x|)`.
fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// Mean binary focal loss of `logits` against 0/1 `targets`:
/// `−(1 − p_t)^γ · log p_t`, with `p_t` the probability given to the true class.
/// Log-probabilities come from softplus, so confident logits do not overflow.
pub fn focal_loss(logits: &Tensor, targets: &Tensor, gamma: f64) -> Result<Tensor> {
    let p = candle_nn::ops::sigmoid(logits)?;
    let log_p = softplus(&logits.neg()?)?.neg()?;
    let log_not_p = softplus(logits)?.neg()?;
    let not_t = (1.0 - targets)?;
    let p_t = ((targets * &p)? + (&not_t * (1.0 - &p)?)?)?;
    let log_p_t = ((targets * log_p)? + (&not_t * log_not_p)?)?;
    let weight = (1.0 - p_t)?.powf(gamma)?;
    (weight * log_p_t)?.neg()?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn focal_loss_matches_hand_computed_values() {
        // By hand (γ = 2):
        //   z = 0, t = 1: p = ½, loss = ¼·ln 2 = 0.173287
        //   z = 2, t = 0: p = σ(2) = 0.880797, p_t = 0.119203, (1 − p_t)² = 0.775803,
        //                 −ln p_t = 2.126928, loss = 1.650078
        //   z = −3, t = 0: p = 0.047426, p_t = 0.952574, (1 − p_t)² = 0.0022492,
        //                 −ln p_t = 0.048587, loss = 0.000109283
        //   z = 40, t = 1: p_t ≈ 1, loss ≈ 0 (and finite)
        let dev = Device::Cpu;
        let z = Tensor::new(&[0f32, 2.0, -3.0, 40.0], &dev).unwrap();
        let t = Tensor::new(&[1f32, 0.0, 0.0, 1.0], &dev).unwrap();
        let each = [0.173287f32, 1.650078, 0.000109283, 0.0];
        for (i, want) in each.iter().enumerate() {
            let l: f32 = focal_loss(&z.narrow(0, i, 1).unwrap(), &t.narrow(0, i, 1).unwrap(), 2.0)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!((l - want).abs() < 2e-5 + 1e-4 * want, "case {i}: {l} vs {want}");
        }
        let mean: f32 = focal_loss(&z, &t, 2.0).unwrap().to_scalar().unwrap();
        assert!((mean - each.iter().sum::<f32>() / 4.0).abs() < 2e-5);
        // γ = 0 is the plain binary cross-entropy: −ln ½ for z = 0.
        let bce: f32 = focal_loss(&z.narrow(0, 0, 1).unwrap(), &t.narrow(0, 0, 1).unwrap(), 0.0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((bce - std::f32::consts::LN_2).abs() < 1e-6);
    }

    #[test]
    fn the_segmenters_loss_reaches_the_reconstructor_only_with_joint_training() {
        use crate::model::Architecture;
        let dev = Device::Cpu;
        let x = Tensor::rand(0f32, 1f32, (2, 1, 32, 32), &dev).unwrap();
        let mask = Tensor::rand(0f32, 1f32, (2, 1, 32, 32), &dev)
            .unwrap()
            .ge(0.8)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        // The largest gradient of the focal loss alone on any reconstructor weight.
        let reconstructor_gradient = |joint_training: bool| -> f32 {
            let arch = Architecture::Draem {
                width: 4,
                bottleneck: 2,
                segmenter_width: 4,
                segmenter_depth: 3,
                error_maps: false,
                joint_training,
            };
            let varmap = candle_nn::VarMap::new();
            let vb = candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &dev);
            let net = DraemNet::new(&arch, 1, 32, vb).unwrap();
            let (_, logits) = net.forward_t(&x, true).unwrap();
            let grads = focal_loss(&logits, &mask, FOCAL_GAMMA).unwrap().backward().unwrap();
            let vars = varmap.data().lock().unwrap();
            let reconstructor: Vec<_> = vars
                .iter()
                .filter(|(name, _)| name.starts_with("reconstructor."))
                .collect();
            assert!(!reconstructor.is_empty());
            reconstructor
                .iter()
                .filter_map(|(_, v)| grads.get(v.as_tensor()))
                .map(|g| g.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap())
                .fold(0.0, f32::max)
        };
        assert_eq!(reconstructor_gradient(false), 0.0);
        assert!(reconstructor_gradient(true) > 0.0);
    }
}

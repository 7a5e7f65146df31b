//! The two-decoder adversarial family (after USAD, Audibert et al. KDD 2020), on spatial
//! autoencoders: one encoder E, two decoders D1 and D2. AE1 = D1∘E learns to rebuild good
//! images and to fool AE2 (its rebuild, encoded and decoded by D2, should also come back
//! clean); D2 learns to rebuild good images and to *fail* on AE1's rebuilds. Trained on good
//! images only, the second decoder magnifies whatever AE1 cannot rebuild. The anomaly map
//! is α·e(x, AE1(x)) + (1 − α)·e(x, AE2(AE1(x))), e the per-pixel squared error averaged
//! over channels: the model returns both errors and scoring mixes them, so α can change
//! per request (`?alpha=`) without running the network differently.
//!
//! USAD trains the two autoencoders with two optimisers. Here one loss with one optimiser
//! gives D1 and D2 the same gradients (the decoder-2 pass on AE1's rebuild runs twice, once
//! with its input cut from the graph and weighted −2, so D2 climbs the adversarial term
//! while E and D1 descend it); the encoder is trained by AE1's objective only.

use candle_core::{Result, Tensor};
use candle_nn::{AdamW, Optimizer, VarBuilder};

use super::autoencoder::{adamw, Autoencoder};
use super::{Architecture, Family, ModelOutput, NamedVars, StepLoss, StepSettings, TrainBatch, TrainStep};
use crate::kernels::Kernels;
use crate::model::layers::Sequential;

/// Steps over which the weight of the plain rebuilds falls from 1 to ½ (USAD's 1/n over
/// epochs n, here over steps: w = 1 / (1 + step / this)).
pub const ADVERSARIAL_RAMP_STEPS: f64 = 100.0;

/// E with D1 (`ae1.enc.*`, `ae1.dec.*`) and D2 (`ae2.dec.*`). (Models written before D2
/// stood alone also hold an unused `ae2.enc.*`; loading ignores it.)
pub struct Usad {
    ae1: Autoencoder,
    decoder2: Sequential,
    kernels: Kernels,
}

impl Usad {
    pub fn new(arch: &Architecture, channels: usize, size: usize, vb: VarBuilder) -> Result<Self> {
        arch.validate(channels, size).map_err(candle_core::Error::Msg)?;
        let Architecture::Usad { width, bottleneck, .. } = *arch else {
            candle_core::bail!("not a usad architecture: {arch:?}")
        };
        Ok(Self {
            ae1: Autoencoder::spatial(width, bottleneck, channels, vb.pp("ae1"))?,
            decoder2: Autoencoder::spatial_decoder(width, bottleneck, channels, vb.pp("ae2").pp("dec"))?,
            kernels: Kernels::default(),
        })
    }

    /// D2(z) for a code z.
    fn d2(&self, z: &Tensor, train: bool) -> Result<Tensor> {
        self.decoder2.forward_t(z, train, self.kernels)
    }

    /// D2(E(x)).
    fn decode2(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.d2(&self.ae1.encode(x, train)?, train)
    }
}

/// The weight of the plain rebuilds at `step` (0-based); the adversarial terms get 1 − w.
pub fn rebuild_weight(step: usize) -> f64 {
    1.0 / (1.0 + step as f64 / ADVERSARIAL_RAMP_STEPS)
}

/// mean_c (x − r)², per pixel: (N, 1, H, W).
pub fn error_map(x: &Tensor, r: &Tensor) -> Result<Tensor> {
    (x - r)?.sqr()?.mean_keepdim(1)
}

impl Family for Usad {
    fn infer(&self, x: &Tensor) -> Result<ModelOutput> {
        let r1 = self.ae1.forward_t(x, false)?;
        let r21 = self.decode2(&r1, false)?;
        Ok(ModelOutput {
            learned_map: Some(error_map(x, &r1)?),
            second_map: Some(error_map(x, &r21)?),
            reconstruction: r1,
        })
    }

    fn trainer<'a>(&'a self, vars: NamedVars, settings: StepSettings) -> Result<Box<dyn TrainStep + 'a>> {
        Ok(Box::new(UsadStep {
            net: self,
            opt: adamw(vars, &settings)?,
            settings,
            step: 0,
        }))
    }

    fn set_kernels(&mut self, kernels: Kernels) {
        self.ae1.set_kernels(kernels);
        self.kernels = kernels;
    }

    fn flops(&self, h: usize, w: usize) -> u64 {
        // Inference: AE1, then E and D2 on its rebuild.
        2 * self.ae1.flops(h, w)
    }

    fn reconstructor(&self) -> Option<&Autoencoder> {
        Some(&self.ae1)
    }
}

struct UsadStep<'a> {
    net: &'a Usad,
    opt: AdamW,
    settings: StepSettings,
    step: usize,
}

impl TrainStep for UsadStep<'_> {
    fn step(&mut self, batch: &TrainBatch, learning_rate: f64) -> Result<StepLoss> {
        self.opt.set_learning_rate(learning_rate);
        let (net, target) = (self.net, &batch.target);
        let loss = |r: &Tensor| self.settings.loss.compute(r, target, self.settings.kernels);
        let w = rebuild_weight(self.step);
        let r1 = net.ae1.forward_t(&batch.input, true)?;
        let r2 = net.decode2(&batch.input, true)?;
        // AE2 on AE1's rebuild: through the graph (E and D1 descend it) and from a cut
        // input (D2 alone, weighted −2, so it climbs it on balance).
        let r21 = net.decode2(&r1, true)?;
        let r21_cut = net.d2(&net.ae1.encode(&r1, true)?.detach(), true)?;
        let (l1, l2, l21, l21_cut) = (loss(&r1)?, loss(&r2)?, loss(&r21)?, loss(&r21_cut)?);
        let rebuilds = ((&l1 + &l2)? * w)?;
        let adversarial = ((&l21 - (&l21_cut * 2.0)?)? * (1.0 - w))?;
        let total = (&rebuilds + &adversarial)?;
        self.opt.backward_step(&total)?;
        self.step += 1;
        Ok(StepLoss {
            total: total.to_scalar()?,
            parts: vec![
                ("ae1", l1.to_scalar()?),
                ("ae2", l2.to_scalar()?),
                ("ae2_of_ae1", l21.to_scalar()?),
            ],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_maps_and_the_weight_by_hand() {
        // Two channels, one pixel: x = (1, 0), r1 = (0.5, 0) → e1 = (0.25 + 0)/2 = 0.125;
        // r21 = (1, 1) → e21 = (0 + 1)/2 = 0.5. (Scoring mixes them: see
        // `scoring::RawMaps::mixed`.)
        let dev = Device::Cpu;
        let t = |v: [f32; 2]| Tensor::new(&v, &dev).unwrap().reshape((1, 2, 1, 1)).unwrap();
        let value = |m: Tensor| -> f32 {
            assert_eq!(m.dims(), &[1, 1, 1, 1]);
            m.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]
        };
        assert_eq!(value(error_map(&t([1.0, 0.0]), &t([0.5, 0.0])).unwrap()), 0.125);
        assert_eq!(value(error_map(&t([1.0, 0.0]), &t([1.0, 1.0])).unwrap()), 0.5);
        // w = 1/(1 + step/100): 1 at the start, ½ at step 100, ¼ at 300.
        assert_eq!(rebuild_weight(0), 1.0);
        assert_eq!(rebuild_weight(100), 0.5);
        assert_eq!(rebuild_weight(300), 0.25);
    }

    #[test]
    fn decoder_two_climbs_the_adversarial_term_while_decoder_one_descends_it() {
        // The gradient of the step's loss on the adversarial term alone (w = 0): for D2 it
        // is minus the gradient of L(D2(E(r1))), for D1 plus it (as USAD's two optimisers).
        let dev = Device::Cpu;
        let arch = Architecture::Usad {
            width: 4,
            bottleneck: 2,
            alpha: 0.5,
        };
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &dev);
        let net = Usad::new(&arch, 1, 16, vb).unwrap();
        let x = Tensor::rand(0f32, 1f32, (2, 1, 16, 16), &dev).unwrap();
        let l = |r: &Tensor| (r - &x).unwrap().sqr().unwrap().mean_all().unwrap();
        let r1 = net.ae1.forward_t(&x, true).unwrap();
        let through = l(&net.decode2(&r1, true).unwrap());
        let cut = l(&net.d2(&net.ae1.encode(&r1, true).unwrap().detach(), true).unwrap());
        let adversarial = (&through - (&cut * 2.0).unwrap()).unwrap();
        let g_step = adversarial.backward().unwrap();
        let g_plain = through.backward().unwrap();
        let vars = varmap.data().lock().unwrap();
        let (mut checked_d1, mut checked_d2) = (0, 0);
        for (name, var) in vars.iter() {
            let (Some(a), Some(b)) = (g_step.get(var), g_plain.get(var)) else {
                continue;
            };
            let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let sign = if name.starts_with("ae2.dec") { -1.0 } else { 1.0 };
            for (p, q) in a.iter().zip(&b) {
                assert!(
                    (p - sign * q).abs() <= 1e-5 + 1e-4 * q.abs(),
                    "{name}: {p} vs {}",
                    sign * q
                );
            }
            if name.starts_with("ae2.dec") {
                checked_d2 += 1;
            } else if name.starts_with("ae1.dec") {
                checked_d1 += 1;
            }
        }
        assert!(checked_d1 > 0 && checked_d2 > 0);
        // The second decoder stands alone: no encoder of its own among the weights.
        assert!(vars.keys().all(|n| !n.starts_with("ae2.enc")), "{:?}", vars.keys());
    }
}

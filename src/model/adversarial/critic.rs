//! The patch critic of the adversarial family: strided convolutions down to one logit per
//! 8×8 cell ("is this patch a real good image or a reconstruction?"), each convolution
//! spectrally normalised (Miyato et al. 2018): its weight is divided by an estimate of its
//! largest singular value, so the critic is about 1-Lipschitz and cannot overpower the
//! reconstructor with arbitrarily steep gradients. No BatchNorm: it would mix real and
//! rebuilt images in one batch's statistics.

use candle_core::{Result, Tensor, Var, D};
use candle_nn::{Init, VarBuilder};

use crate::kernels::{ops, Activation, Kernels};
use crate::model::layers::LEAKY_SLOPE;

/// One spectrally normalised convolution (`weight`, `bias`, and `running_u`, the power
/// iteration's left singular vector estimate: state, not trained, saved with the weights).
pub struct SpectralConv {
    weight: Tensor,
    bias: Tensor,
    u: Var,
    stride: usize,
    pad: usize,
    leaky: bool,
}

/// `v / ‖v‖` (with a floor, so a zero vector stays finite).
fn unit(v: &Tensor) -> Result<Tensor> {
    let norm = v.sqr()?.sum_all()?.sqrt()?.maximum(1e-12)?;
    v.broadcast_div(&norm)
}

impl SpectralConv {
    #[allow(clippy::too_many_arguments)]
    fn new(cin: usize, cout: usize, k: usize, stride: usize, pad: usize, leaky: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((cout, cin, k, k), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
        let bias = vb.get_with_hints(cout, "bias", Init::Const(0.0))?;
        // Any start not orthogonal to the top singular vector converges; a constant one is
        // reproducible.
        let u = vb.get_with_hints((cout, 1), "running_u", Init::Const(1.0 / (cout as f64).sqrt()))?;
        let u = Var::from_tensor(&u)?;
        Ok(Self {
            weight,
            bias,
            u,
            stride,
            pad,
            leaky,
        })
    }

    /// The weight as a (cout, cin·k·k) matrix.
    fn matrix(&self) -> Result<Tensor> {
        let cout = self.weight.dim(0)?;
        self.weight.reshape((cout, ()))
    }

    /// One power-iteration step on the weight (no gradient): u ← W·v/‖W·v‖ with
    /// v = Wᵀ·u/‖Wᵀ·u‖. Once per training step, as Miyato et al. do.
    pub fn power_iteration(&self) -> Result<()> {
        let w = self.matrix()?.detach();
        let v = unit(&w.t()?.matmul(self.u.as_tensor())?)?;
        let u = unit(&w.matmul(&v)?)?;
        self.u.set(&u)
    }

    /// σ = uᵀ·W·v, the largest singular value as the power iteration estimates it;
    /// differentiable in W (u and v are constants, as in the paper).
    pub fn sigma(&self) -> Result<Tensor> {
        let w = self.matrix()?;
        let u = self.u.as_tensor().detach();
        let v = unit(&w.detach().t()?.matmul(&u)?)?;
        u.t()?.matmul(&w.matmul(&v)?)?.reshape(())
    }

    fn forward(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let w = self.weight.broadcast_div(&self.sigma()?)?;
        if kernels.fast_on(x.device()) {
            let act = if self.leaky {
                Activation::LeakyRelu(LEAKY_SLOPE)
            } else {
                Activation::Identity
            };
            return ops::conv2d(x, &w, &self.bias, self.stride, self.pad, act);
        }
        let y = x
            .conv2d(&w, self.pad, self.stride, 1, 1)?
            .broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?;
        if self.leaky {
            y.maximum(&(&y * LEAKY_SLOPE as f64)?)
        } else {
            Ok(y)
        }
    }

    fn flops(&self, h: usize, w: usize) -> (u64, usize, usize) {
        let (cout, cin, k, _) = self.weight.dims4().expect("a 4-D weight");
        let (oh, ow) = (
            (h + 2 * self.pad - k) / self.stride + 1,
            (w + 2 * self.pad - k) / self.stride + 1,
        );
        ((2 * cout * cin * k * k * oh * ow) as u64, oh, ow)
    }
}

/// Three 4×4 stride-2 stages (widths w, 2w, 4w) and a 3×3 head: one logit per 8×8 cell,
/// each seeing about 46 pixels across. Weights `discriminator.{conv1,conv2,conv3,head}.*`.
pub struct Critic {
    stages: Vec<SpectralConv>,
    kernels: Kernels,
}

/// The stage whose features the feature-distance map compares (after the second stride-2
/// stage, at 1/4 resolution).
const FEATURE_STAGE: usize = 1;

impl Critic {
    pub fn new(channels: usize, w: usize, vb: VarBuilder) -> Result<Self> {
        let stages = vec![
            SpectralConv::new(channels, w, 4, 2, 1, true, vb.pp("conv1"))?,
            SpectralConv::new(w, 2 * w, 4, 2, 1, true, vb.pp("conv2"))?,
            SpectralConv::new(2 * w, 4 * w, 4, 2, 1, true, vb.pp("conv3"))?,
            SpectralConv::new(4 * w, 1, 3, 1, 1, false, vb.pp("head"))?,
        ];
        Ok(Self {
            stages,
            kernels: Kernels::default(),
        })
    }

    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    pub fn power_iteration(&self) -> Result<()> {
        self.stages.iter().try_for_each(SpectralConv::power_iteration)
    }

    /// Patch logits (N, 1, H/8, W/8): high for what looks like a real good image.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.stages
            .iter()
            .try_fold(x.clone(), |h, s| s.forward(&h, self.kernels))
    }

    /// Per-pixel distance between the critic's features of `x` and of `r`: mean over
    /// channels of the squared difference at 1/4 resolution, repeated back to (N, 1, H, W).
    pub fn feature_distance(&self, x: &Tensor, r: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let features = |t: &Tensor| {
            self.stages[..=FEATURE_STAGE]
                .iter()
                .try_fold(t.clone(), |h, s| s.forward(&h, self.kernels))
        };
        let d = (features(x)? - features(r)?)?.sqr()?.mean_keepdim(D::Minus(3))?;
        d.upsample_nearest2d(h, w)
    }

    pub fn flops(&self, mut h: usize, mut w: usize) -> u64 {
        let mut total = 0;
        for s in &self.stages {
            let (f, oh, ow) = s.flops(h, w);
            total += f;
            (h, w) = (oh, ow);
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn sigma_is_the_largest_singular_value() {
        // W as a matrix [[3, 0], [4, 0], [0, 1]] (three 1×1 filters on two channels): its
        // singular values are 5 (the first column's length) and 1.
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let conv = SpectralConv::new(2, 3, 1, 1, 0, false, vb).unwrap();
        varmap
            .data()
            .lock()
            .unwrap()
            .get("weight")
            .unwrap()
            .set(
                &Tensor::new(&[3f32, 0.0, 4.0, 0.0, 0.0, 1.0], &dev)
                    .unwrap()
                    .reshape((3, 2, 1, 1))
                    .unwrap(),
            )
            .unwrap();
        for _ in 0..20 {
            conv.power_iteration().unwrap();
        }
        let sigma: f32 = conv.sigma().unwrap().to_scalar().unwrap();
        assert!((sigma - 5.0).abs() < 1e-4, "{sigma}");
        // The normalised layer maps x = (1, 0) to (3, 4, 0)/5: unit length.
        let x = Tensor::new(&[1f32, 0.0], &dev).unwrap().reshape((1, 2, 1, 1)).unwrap();
        let y: Vec<f32> = conv
            .forward(&x, Kernels::Fast)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (got, want) in y.iter().zip([0.6f32, 0.8, 0.0]) {
            assert!((got - want).abs() < 1e-4, "{y:?}");
        }
        // The power iteration's vector is saved with the weights, not trained.
        assert!(varmap.data().lock().unwrap().contains_key("running_u"));
    }

    #[test]
    fn fast_and_candle_kernels_agree_and_the_feature_map_is_per_pixel() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let mut critic = Critic::new(3, 4, vb).unwrap();
        let x = Tensor::rand(0f32, 1f32, (2, 3, 32, 32), &dev).unwrap();
        let r = Tensor::rand(0f32, 1f32, (2, 3, 32, 32), &dev).unwrap();
        let fast = critic.forward(&x).unwrap();
        critic.set_kernels(Kernels::Candle);
        let slow = critic.forward(&x).unwrap();
        assert_eq!(fast.dims(), &[2, 1, 4, 4]);
        let diff: f32 = (fast - slow)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-4, "{diff}");
        let map = critic.feature_distance(&x, &r).unwrap();
        assert_eq!(map.dims(), &[2, 1, 32, 32]);
        let same: f32 = critic
            .feature_distance(&x, &x)
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(same, 0.0);
    }
}

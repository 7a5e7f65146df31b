//! Training losses as differentiable candle expressions.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::kernels::Kernels;
use crate::scoring::filter::gaussian_kernel;

/// The reconstruction loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// 1 − mean SSIM (Bergmann et al. 2019).
    Ssim,
    /// Mean squared error.
    L2,
    /// (1 − SSIM) + 5 · MSE: SSIM for structure, L2 to hold brightness and keep the model
    /// from collapsing to a flat image early in training (pure SSIM let a vector-latent
    /// autoencoder collapse on real textures within ~100 steps).
    #[value(name = "ssim+l2")]
    #[serde(rename = "ssim+l2")]
    SsimL2,
}

impl LossKind {
    pub fn name(&self) -> &'static str {
        match self {
            LossKind::Ssim => "ssim",
            LossKind::L2 => "l2",
            LossKind::SsimL2 => "ssim+l2",
        }
    }

    /// The loss of `recon` against `target`, with the SSIM term from `kernels`.
    pub fn compute(&self, recon: &Tensor, target: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let ssim = |a: &Tensor, b: &Tensor| {
            if kernels.fast_on(a.device()) {
                crate::kernels::ssim_loss::ssim_mean(a, b)
            } else {
                ssim_mean(a, b)
            }
        };
        match self {
            LossKind::Ssim => 1.0 - ssim(recon, target)?,
            LossKind::L2 => mse(recon, target),
            LossKind::SsimL2 => {
                let s = (1.0 - ssim(recon, target)?)?;
                s + (mse(recon, target)? * 5.0)?
            }
        }
    }
}

pub fn mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (a - b)?.sqr()?.mean_all()
}

/// A `(n, n − taps + 1)` matrix whose product with a row applies `kernel` over the valid
/// region: the Gaussian blur as a matmul, which candle runs (and differentiates) with its
/// fast GEMM, where a 1-channel conv2d spends its time copying.
fn band_matrix(kernel: &[f32], n: usize, device: &candle_core::Device) -> Result<Tensor> {
    let out = n + 1 - kernel.len();
    let mut m = vec![0f32; n * out];
    for i in 0..out {
        for (j, k) in kernel.iter().enumerate() {
            m[(i + j) * out + i] = *k;
        }
    }
    Tensor::from_vec(m, (n, out), device)
}

/// candle's tensor ops (for CUDA, and the reference for the CPU kernel in
/// `kernels::ssim_loss`): mean SSIM over (N, C, H, W) tensors with an 11-tap Gaussian window (σ 1.5), computed
/// over the valid region (no padding), averaged over channels and images.
pub fn ssim_mean(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let n = b * c;
    let x = x.reshape((n, h, w))?;
    let y = y.reshape((n, h, w))?;
    let stacked = Tensor::cat(&[&x, &y, &x.sqr()?, &y.sqr()?, &(&x * &y)?], 0)?;
    let k = gaussian_kernel(1.5, 5);
    let gw = band_matrix(&k, w, x.device())?;
    let gh = band_matrix(&k, h, x.device())?.t()?.unsqueeze(0)?;
    // (5n, h, w) · (w, w') then (1, h', h) · (5n, h, w').
    let f = stacked.broadcast_matmul(&gw)?;
    let f = gh.broadcast_matmul(&f)?;
    let mx = f.narrow(0, 0, n)?;
    let my = f.narrow(0, n, n)?;
    let vx = (f.narrow(0, 2 * n, n)? - mx.sqr()?)?;
    let vy = (f.narrow(0, 3 * n, n)? - my.sqr()?)?;
    let cov = (f.narrow(0, 4 * n, n)? - (&mx * &my)?)?;
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let num = (((&mx * &my)? * 2.0)? + c1)?.mul(&((cov * 2.0)? + c2)?)?;
    let den = ((mx.sqr()? + my.sqr()?)? + c1)?.mul(&((vx + vy)? + c2)?)?;
    (num / den)?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoring::ssim::{ssim_map, SsimParams};
    use candle_core::Device;

    #[test]
    fn tensor_ssim_matches_the_scoring_ssim_on_the_valid_region() {
        let (h, w) = (24, 20);
        let a: Vec<f32> = (0..h * w).map(|i| ((i * 7 % 17) as f32) / 16.0).collect();
        let b: Vec<f32> = (0..h * w).map(|i| ((i * 5 % 13) as f32) / 12.0).collect();
        let map = ssim_map(&a, &b, w, h, &SsimParams::default());
        let mut sum = 0.0;
        let mut n = 0;
        for y in 5..h - 5 {
            for x in 5..w - 5 {
                sum += map[y * w + x];
                n += 1;
            }
        }
        let expected = sum / n as f32;
        let ta = Tensor::from_vec(a, (1, 1, h, w), &Device::Cpu).unwrap();
        let tb = Tensor::from_vec(b, (1, 1, h, w), &Device::Cpu).unwrap();
        let got: f32 = ssim_mean(&ta, &tb).unwrap().to_scalar().unwrap();
        assert!((got - expected).abs() < 1e-4, "{got} vs {expected}");
        let same: f32 = ssim_mean(&ta, &ta).unwrap().to_scalar().unwrap();
        assert!((same - 1.0).abs() < 1e-5);
    }
}

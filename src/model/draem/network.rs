//! The discriminative family's networks: the reconstructive autoencoder and the
//! segmentation U-Net that reads an image beside its reconstruction.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use rayon::prelude::*;

use crate::kernels::Kernels;
use crate::model::arch::Architecture;
use crate::model::autoencoder::Autoencoder;
use crate::model::layers::{Builder, Sequential};
use crate::scoring::ssim::{ssim_map_multichannel, SsimParams};

/// A small U-Net: `depth` stride-2 stages down to 1/2^depth resolution (widths w, 2w,
/// then 4w), as many transposed-convolution stages back up, each merged with the
/// encoder's features at its resolution; one logit per pixel out. Each stride-2 stage
/// doubles how far the segmenter sees: with depth 3 a pixel's logit depends on about
/// 50 pixels around it, with depth 5 on more than a 128² training crop. The deep stages
/// run on few pixels, so they cost little. Weights are named by stage
/// (`segmenter.down1.*`, `segmenter.up1.*`, `segmenter.merge1.*`, `segmenter.head.*`);
/// the deepest `down` stage has a second, 3×3 convolution.
pub struct Segmenter {
    down: Vec<Sequential>,
    up: Vec<Sequential>,
    merge: Vec<Sequential>,
    head: Sequential,
    kernels: Kernels,
}

impl Segmenter {
    /// `inputs` channels in (image and reconstruction stacked), base width `w`.
    pub fn new(inputs: usize, w: usize, depth: usize, vb: VarBuilder) -> Result<Self> {
        let b = |name: String| Builder::new(vb.pp(name), true);
        // Channels of the features at 1/2^level resolution.
        let width = |level: usize| w << level.min(2);
        let mut down = vec![b("down1".into()).conv_act(inputs, w, 3, 1, 1)?.build()];
        for level in 1..=depth {
            let stage = b(format!("down{}", level + 1)).conv_act(width(level - 1), width(level), 4, 2, 1)?;
            let stage = if level == depth {
                stage.conv_act(width(level), width(level), 3, 1, 1)?
            } else {
                stage
            };
            down.push(stage.build());
        }
        // up[i] brings 1/2^(i+1) resolution features to 1/2^i; merge[i] mixes them with down[i].
        let mut up = Vec::with_capacity(depth);
        let mut merge = Vec::with_capacity(depth);
        for level in 0..depth {
            up.push(
                b(format!("up{}", level + 1))
                    .up_act(width(level + 1), width(level))?
                    .build(),
            );
            merge.push(
                b(format!("merge{}", level + 1))
                    .conv_act(2 * width(level), width(level), 3, 1, 1)?
                    .build(),
            );
        }
        let head = Builder::new(vb.pp("head"), false).conv(w, 1, 3, 1, 1)?.build();
        Ok(Self {
            down,
            up,
            merge,
            head,
            kernels: Kernels::default(),
        })
    }

    /// Per-pixel anomaly logits (N, 1, H, W); H and W multiples of 2^depth.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let k = self.kernels;
        let mut skips = Vec::with_capacity(4);
        let mut h = x.clone();
        for stage in &self.down {
            h = stage.forward_t(&h, train, k)?;
            skips.push(h.clone());
        }
        for i in (0..self.up.len()).rev() {
            let up = self.up[i].forward_t(&h, train, k)?;
            h = self.merge[i].forward_t(&Tensor::cat(&[&up, &skips[i]], 1)?, train, k)?;
        }
        self.head.forward_t(&h, train, k)
    }

    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    /// Multiply-adds × 2 of one forward pass on an `h × w` input.
    pub fn flops(&self, h: usize, w: usize) -> u64 {
        let mut total = 0;
        let mut sizes = vec![];
        let (mut ch, mut cw) = (h, w);
        for stage in &self.down {
            let (f, nh, nw) = stage.flops(ch, cw);
            total += f;
            (ch, cw) = (nh, nw);
            sizes.push((ch, cw));
        }
        for i in (0..self.up.len()).rev() {
            let (f, nh, nw) = self.up[i].flops(ch, cw);
            total += f + self.merge[i].flops(nh, nw).0;
            (ch, cw) = (nh, nw);
        }
        total + self.head.flops(ch, cw).0
    }
}

/// The reconstructive autoencoder (`reconstructor.*`) and the segmenter (`segmenter.*`).
pub struct DraemNet {
    pub reconstructor: Autoencoder,
    pub segmenter: Segmenter,
    /// Whether the segmenter also reads [`error_maps`].
    pub error_maps: bool,
    /// Whether the segmenter's loss reaches the reconstructor (else its gradient stops at
    /// the reconstruction).
    pub joint_training: bool,
}

impl DraemNet {
    pub fn new(arch: &Architecture, channels: usize, size: usize, vb: VarBuilder) -> Result<Self> {
        arch.validate(channels, size).map_err(candle_core::Error::Msg)?;
        let Architecture::Draem {
            width,
            bottleneck,
            segmenter_width,
            segmenter_depth,
            error_maps,
            joint_training,
        } = *arch
        else {
            candle_core::bail!("not a draem architecture: {arch:?}")
        };
        Ok(Self {
            reconstructor: Autoencoder::spatial(width, bottleneck, channels, vb.pp("reconstructor"))?,
            segmenter: Segmenter::new(
                2 * channels + if error_maps { ERROR_MAPS } else { 0 },
                segmenter_width,
                segmenter_depth,
                vb.pp("segmenter"),
            )?,
            error_maps,
            joint_training,
        })
    }

    /// The reconstruction and the segmenter's logits for it.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let recon = self.reconstructor.forward_t(x, train)?;
        // Without joint training the segmenter's gradient stops at the reconstruction, so
        // each network keeps one job. With it (DRAEM's way) the reconstructor also learns
        // to rebuild in ways that make anomalies stand out to the segmenter; its encoder
        // sees far more of the image than the segmenter's 3 stages do.
        let seen = if self.joint_training {
            recon.clone()
        } else {
            recon.detach()
        };
        let input = if self.error_maps {
            Tensor::cat(&[x, &seen, &error_maps(x, &recon)?], 1)?
        } else {
            Tensor::cat(&[x, &seen], 1)?
        };
        let logits = self.segmenter.forward_t(&input, train)?;
        Ok((recon, logits))
    }
}

/// Channels [`error_maps`] returns.
pub const ERROR_MAPS: usize = 2;

/// Two comparisons of each image of `x` (N, C, H, W) with its reconstruction, as (N, 2, H,
/// W) on `x`'s device: (1 − SSIM)/2 over the scoring's 11-pixel Gaussian window, and the
/// absolute difference, each averaged over channels. A segmenter whose first layer sees
/// 3×3 pixels through a few channels cannot compute a windowed structural comparison
/// itself; given one, it can learn where such differences matter. Computed on the host
/// by the scoring code (hand-written SSIM); constants, so no gradient flows through them.
pub fn error_maps(x: &Tensor, recon: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let host = |t: &Tensor| -> Result<Vec<f32>> {
        t.to_device(&candle_core::Device::Cpu)?
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()
    };
    let (xs, rs) = (host(x)?, host(recon)?);
    let (plane, image) = (h * w, c * h * w);
    let params = SsimParams::default();
    let per_image: Vec<Vec<f32>> = (0..n)
        .into_par_iter()
        .map(|i| {
            let (a, b) = (&xs[i * image..(i + 1) * image], &rs[i * image..(i + 1) * image]);
            let mut out = ssim_map_multichannel(a, b, c, w, h, &params);
            out.iter_mut().for_each(|s| *s = (1.0 - *s) / 2.0);
            out.extend((0..plane).map(|p| {
                (0..c)
                    .map(|ch| (a[ch * plane + p] - b[ch * plane + p]).abs())
                    .sum::<f32>()
                    / c as f32
            }));
            out
        })
        .collect();
    Tensor::from_vec(per_image.concat(), (n, ERROR_MAPS, h, w), x.device())?.to_dtype(x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn error_maps_are_zero_for_a_perfect_rebuild_and_match_hand_computed_values() {
        let dev = Device::Cpu;
        let (h, w) = (16, 16);
        // Two images: one rebuilt exactly, one flat 0.5 rebuilt as flat 0.25.
        let mut x = vec![0f32; 2 * h * w];
        let mut r = vec![0f32; 2 * h * w];
        for i in 0..h * w {
            x[i] = 0.3 + 0.4 * ((i % w) as f32 / w as f32);
            r[i] = x[i];
            x[h * w + i] = 0.5;
            r[h * w + i] = 0.25;
        }
        let x = Tensor::from_vec(x, (2, 1, h, w), &dev).unwrap();
        let r = Tensor::from_vec(r, (2, 1, h, w), &dev).unwrap();
        let maps = error_maps(&x, &r).unwrap();
        assert_eq!(maps.dims4().unwrap(), (2, ERROR_MAPS, h, w));
        let v: Vec<f32> = maps.flatten_all().unwrap().to_vec1().unwrap();
        let plane = h * w;
        assert!(
            v[..2 * plane].iter().all(|&e| e.abs() < 1e-5),
            "a perfect rebuild has no error"
        );
        // Flat images: no variance, so SSIM is its luminance term alone,
        // (2·0.5·0.25 + C1) / (0.5² + 0.25² + C1) with C1 = (0.01·1)² = 1e-4:
        // 0.2501 / 0.3126 = 0.800064, and (1 − SSIM)/2 = 0.099968; the difference is 0.25.
        let (ssim_part, diff_part) = (&v[2 * plane..3 * plane], &v[3 * plane..]);
        assert!(
            ssim_part.iter().all(|&e| (e - 0.099968).abs() < 1e-4),
            "{}",
            ssim_part[0]
        );
        assert!(diff_part.iter().all(|&e| (e - 0.25).abs() < 1e-6));
    }
}

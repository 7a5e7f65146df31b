//! The discriminative family's networks: the reconstructive autoencoder and the
//! segmentation U-Net that reads an image beside its reconstruction.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::Kernels;
use crate::model::arch::Architecture;
use crate::model::autoencoder::Autoencoder;
use crate::model::layers::{Builder, Sequential};

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
}

impl DraemNet {
    pub fn new(arch: &Architecture, channels: usize, size: usize, vb: VarBuilder) -> Result<Self> {
        arch.validate(channels, size).map_err(candle_core::Error::Msg)?;
        let Architecture::Draem {
            width,
            bottleneck,
            segmenter_width,
            segmenter_depth,
        } = *arch
        else {
            candle_core::bail!("not a draem architecture: {arch:?}")
        };
        Ok(Self {
            reconstructor: Autoencoder::spatial(width, bottleneck, channels, vb.pp("reconstructor"))?,
            segmenter: Segmenter::new(2 * channels, segmenter_width, segmenter_depth, vb.pp("segmenter"))?,
        })
    }

    /// The reconstruction and the segmenter's logits for it.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let recon = self.reconstructor.forward_t(x, train)?;
        // The segmenter's loss does not train the reconstructor (its gradient stops here):
        // each network keeps one job, and the step skips a second backward pass through it.
        let logits = self
            .segmenter
            .forward_t(&Tensor::cat(&[x, &recon.detach()], 1)?, train)?;
        Ok((recon, logits))
    }
}

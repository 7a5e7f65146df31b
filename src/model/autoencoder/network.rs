//! The autoencoder networks: Bergmann et al.'s vector-latent SSIM autoencoder and the
//! fully convolutional spatial-bottleneck autoencoder.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::Kernels;
use crate::model::arch::Architecture;
use crate::model::layers::{Builder, Layer, Sequential};

/// An encoder-decoder network built from an [`Architecture`].
pub struct Autoencoder {
    encoder: Sequential,
    decoder: Sequential,
    kernels: Kernels,
}

impl Autoencoder {
    /// Builds the network for `channels × size × size` inputs (size = training patch size).
    pub fn new(arch: &Architecture, channels: usize, size: usize, vb: VarBuilder) -> Result<Self> {
        arch.validate(channels, size).map_err(candle_core::Error::Msg)?;
        match arch {
            Architecture::Bergmann { latent } => Self::bergmann(*latent, channels, size, vb),
            Architecture::Spatial { width, bottleneck } => Self::spatial(*width, *bottleneck, channels, vb),
            Architecture::Draem { .. }
            | Architecture::Vae { .. }
            | Architecture::Usad { .. }
            | Architecture::Adversarial { .. } => {
                candle_core::bail!("a {} model is built by its own family", arch.name())
            }
        }
    }

    fn bergmann(latent: usize, c: usize, size: usize, vb: VarBuilder) -> Result<Self> {
        let extra = (size / 128).trailing_zeros() as usize;
        let mut e = Builder::new(vb.pp("enc"), false);
        let mut cin = c;
        for _ in 0..extra {
            e = e.conv_act(cin, 32, 4, 2, 1)?;
            cin = 32;
        }
        let e = e
            .conv_act(cin, 32, 4, 2, 1)?
            .conv_act(32, 32, 4, 2, 1)?
            .conv_act(32, 32, 3, 1, 1)?
            .conv_act(32, 64, 4, 2, 1)?
            .conv_act(64, 64, 3, 1, 1)?
            .conv_act(64, 128, 4, 2, 1)?
            .conv_act(128, 64, 3, 1, 1)?
            .conv_act(64, 32, 3, 1, 1)?
            .conv(32, latent, 8, 1, 0)?;
        let d = Builder::new(vb.pp("dec"), false).push(Layer::Flatten);
        let expand = candle_nn::linear(latent, 32 * 8 * 8, d.vb())?;
        let mut d = d
            .push(Layer::Expand(expand, 32, 8, 8))
            .act(32)?
            .conv_act(32, 64, 3, 1, 1)?
            .conv_act(64, 128, 3, 1, 1)?
            .up_act(128, 64)?
            .conv_act(64, 64, 3, 1, 1)?
            .up_act(64, 32)?
            .conv_act(32, 32, 3, 1, 1)?
            .up_act(32, 32)?;
        for _ in 0..extra {
            d = d.up_act(32, 32)?;
        }
        let d = d.up(32, c)?.push(Layer::Sigmoid);
        Ok(Self {
            encoder: e.build(),
            decoder: d.build(),
            kernels: Kernels::default(),
        })
    }

    /// The spatial autoencoder (also the reconstructive half of other families).
    pub(crate) fn spatial(w: usize, bottleneck: usize, c: usize, vb: VarBuilder) -> Result<Self> {
        Self::spatial_with_code(w, bottleneck, bottleneck, c, vb)
    }

    /// The spatial autoencoder whose encoder emits `code` channels and whose decoder takes
    /// `bottleneck` (they differ when the code is a distribution: mean and log-variance).
    pub(crate) fn spatial_with_code(
        w: usize,
        code: usize,
        bottleneck: usize,
        c: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let e = Builder::new(vb.pp("enc"), true)
            .conv_act(c, w, 4, 2, 1)?
            .conv_act(w, 2 * w, 4, 2, 1)?
            .conv_act(2 * w, 4 * w, 4, 2, 1)?
            .conv_act(4 * w, 4 * w, 3, 1, 1)?
            .conv(4 * w, code, 1, 1, 0)?;
        Ok(Self {
            encoder: e.build(),
            decoder: Self::spatial_decoder(w, bottleneck, c, vb.pp("dec"))?,
            kernels: Kernels::default(),
        })
    }

    /// The spatial autoencoder's decoder alone (a second decoder on a shared encoder).
    pub(crate) fn spatial_decoder(w: usize, bottleneck: usize, c: usize, vb: VarBuilder) -> Result<Sequential> {
        Ok(Builder::new(vb, true)
            .conv_act(bottleneck, 4 * w, 3, 1, 1)?
            .up_act(4 * w, 2 * w)?
            .up_act(2 * w, w)?
            .up(w, c)?
            .push(Layer::Sigmoid)
            .build())
    }

    /// Multiply-adds × 2 of one forward pass on an `h × w` input (convolutions and the
    /// linear layer; activations and normalisation are not counted).
    pub fn flops(&self, h: usize, w: usize) -> u64 {
        let (e, h, w) = self.encoder.flops(h, w);
        e + self.decoder.flops(h, w).0
    }

    /// Chooses the convolution kernels (the fast CPU kernels by default).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    /// Runs the network; `train` selects batch statistics in BatchNorm layers.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.decode(&self.encode(x, train)?, train)
    }

    /// The encoder alone: the code (N, code channels, H/8, W/8 for the spatial network).
    pub(crate) fn encode(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.encoder.forward_t(x, train, self.kernels)
    }

    /// The decoder alone: an image in [0, 1] from a code.
    pub(crate) fn decode(&self, z: &Tensor, train: bool) -> Result<Tensor> {
        self.decoder.forward_t(z, train, self.kernels)
    }
}

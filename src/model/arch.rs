//! Autoencoder architectures, chosen by name in the model artifact.
//!
//! On the CPU, convolutions run on vigil's kernels (`crate::kernels`: im2col + GEMM, bias
//! and a directly following LeakyReLU fused); on CUDA, or with `Kernels::Candle`, on
//! candle's. Choices measured by `vigil bench` (../shared/FINDINGS.md): up-sampling is a
//! 4×4 stride-2 transposed convolution (nearest-upsample + conv was no faster and does 2.25×
//! the FLOPs), the vector latent is expanded to 8×8 by a Linear layer (~6× faster than a
//! transposed conv), and an unfused LeakyReLU is `max(x, 0.2x)`, one op instead of candle's three.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{BatchNorm, Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::kernels::{batch_norm, ops, Activation, Kernels};

/// An architecture and its sizes, as written in `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum Architecture {
    /// Bergmann et al. 2019: 4×4 stride-2 and 3×3 convolutions (32, 32, 32, 64, 64, 128,
    /// 64, 32 channels at 128²), a valid 8×8 convolution to a latent vector, a mirrored
    /// decoder, sigmoid output. One more stride-2 stage per doubling of the input size.
    Bergmann { latent: usize },
    /// A fully convolutional autoencoder with a spatial bottleneck (input/8 × input/8 ×
    /// `bottleneck` channels), BatchNorm and widths `width`, 2·`width`, 4·`width`.
    /// Unlike the vector-latent model it does not collapse to a flat image on CPU budgets
    /// (../shared/FINDINGS.md) and runs on any input whose sides are multiples of 8.
    Spatial { width: usize, bottleneck: usize },
}

impl Architecture {
    /// True when the network accepts any input size (a multiple of 8), not only its patch size.
    pub fn fully_convolutional(&self) -> bool {
        matches!(self, Architecture::Spatial { .. })
    }

    /// Checks that the architecture can take `channels × size × size` inputs.
    pub fn validate(&self, channels: usize, size: usize) -> std::result::Result<(), String> {
        if channels != 1 && channels != 3 {
            return Err(format!("channels must be 1 or 3, not {channels}"));
        }
        match self {
            Architecture::Bergmann { latent } => {
                if *latent == 0 {
                    return Err("latent size must be positive".into());
                }
                if size < 128 || !size.is_power_of_two() {
                    return Err(format!(
                        "the bergmann architecture takes 128, 256, 512… pixels, not {size}"
                    ));
                }
            }
            Architecture::Spatial { width, bottleneck } => {
                if *width == 0 || *bottleneck == 0 {
                    return Err("width and bottleneck must be positive".into());
                }
                if size < 16 || size % 8 != 0 {
                    return Err(format!(
                        "the spatial architecture takes sides that are multiples of 8 (≥ 16), not {size}"
                    ));
                }
            }
        }
        Ok(())
    }
}

const LEAKY_SLOPE: f32 = 0.2;

/// One layer of a sequential network.
enum Layer {
    /// A convolution, with a LeakyReLU fused when one follows directly (no normalisation).
    Conv {
        conv: Conv2d,
        leaky: bool,
    },
    ConvT {
        conv: ConvTranspose2d,
        leaky: bool,
    },
    Norm(BatchNorm),
    /// Linear layer followed by a reshape to (batch, c, h, w).
    Expand(Linear, usize, usize, usize),
    Flatten,
    LeakyRelu,
    Sigmoid,
}

impl Layer {
    fn forward_t(&self, x: &Tensor, train: bool, kernels: Kernels) -> Result<Tensor> {
        let fast = kernels.fast_on(x.device());
        match self {
            Layer::Conv { conv, leaky } if fast => {
                self.fast_conv(x, conv.weight(), conv_bias(conv.bias()), activation(*leaky))
            }
            Layer::ConvT { conv, leaky } if fast => {
                self.fast_conv(x, conv.weight(), conv_bias(conv.bias()), activation(*leaky))
            }
            Layer::Conv { conv, leaky } => leaky_if(conv.forward(x)?, *leaky),
            Layer::ConvT { conv, leaky } => leaky_if(conv.forward(x)?, *leaky),
            Layer::Norm(n) => n.forward_t(x, train),
            Layer::Expand(l, c, h, w) => {
                let b = x.dim(0)?;
                l.forward(x)?.reshape((b, *c, *h, *w))
            }
            Layer::Flatten => x.flatten_from(1),
            Layer::LeakyRelu => leaky_if(x.clone(), true),
            Layer::Sigmoid => candle_nn::ops::sigmoid(x),
        }
    }

    /// Runs this convolution layer on vigil's kernels with the given weight and bias.
    fn fast_conv(&self, x: &Tensor, w: &Tensor, b: &Tensor, act: Activation) -> Result<Tensor> {
        match self {
            Layer::Conv { conv, .. } => ops::conv2d(x, w, b, conv.config().stride, conv.config().padding, act),
            Layer::ConvT { conv, .. } => {
                ops::conv_transpose2d(x, w, b, conv.config().stride, conv.config().padding, act)
            }
            _ => candle_core::bail!("not a convolution layer"),
        }
    }
}

fn conv_bias(bias: Option<&Tensor>) -> &Tensor {
    bias.expect("convolutions are built with a bias")
}

fn activation(leaky: bool) -> Activation {
    if leaky {
        Activation::LeakyRelu(LEAKY_SLOPE)
    } else {
        Activation::Identity
    }
}

fn leaky_if(x: Tensor, leaky: bool) -> Result<Tensor> {
    if leaky {
        // One op; candle_nn::ops::leaky_relu builds three and a zeros tensor.
        x.maximum(&(&x * LEAKY_SLOPE as f64)?)
    } else {
        Ok(x)
    }
}

/// A convolution followed by an inference-mode BatchNorm and a LeakyReLU, as one fused
/// convolution with the normalisation folded into its weight and bias (scaled along the
/// weight's output-channel axis: 0 for a convolution, 1 for a transposed one).
fn folded_conv(layer: &Layer, bn: &BatchNorm, x: &Tensor) -> Result<Tensor> {
    let (scale, shift) = batch_norm::inference_affine(bn)?;
    let (weight, bias, axis) = match layer {
        Layer::Conv { conv, .. } => (conv.weight(), conv.bias(), 0),
        Layer::ConvT { conv, .. } => (conv.weight(), conv.bias(), 1),
        _ => candle_core::bail!("only a convolution folds a BatchNorm"),
    };
    let mut scale_shape = vec![1; 4];
    scale_shape[axis] = scale.elem_count();
    let w = weight.broadcast_mul(&scale.reshape(scale_shape)?)?;
    let b = ((conv_bias(bias) * &scale)? + &shift)?;
    layer.fast_conv(x, &w, &b, Activation::LeakyRelu(LEAKY_SLOPE))
}

/// Builds layers in order, naming their weights `<prefix>.<index>.*`.
struct Builder<'a> {
    vb: VarBuilder<'a>,
    layers: Vec<Layer>,
    batch_norm: bool,
}

impl<'a> Builder<'a> {
    fn new(vb: VarBuilder<'a>, batch_norm: bool) -> Self {
        Self {
            vb,
            layers: Vec::new(),
            batch_norm,
        }
    }

    fn vb(&self) -> VarBuilder<'a> {
        self.vb.pp(self.layers.len().to_string())
    }

    fn conv(mut self, cin: usize, cout: usize, k: usize, stride: usize, pad: usize) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: pad,
            stride,
            ..Default::default()
        };
        let layer = candle_nn::conv2d(cin, cout, k, cfg, self.vb())?;
        self.layers.push(Layer::Conv {
            conv: layer,
            leaky: false,
        });
        Ok(self)
    }

    fn up(mut self, cin: usize, cout: usize) -> Result<Self> {
        let cfg = ConvTranspose2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let layer = candle_nn::conv_transpose2d(cin, cout, 4, cfg, self.vb())?;
        self.layers.push(Layer::ConvT {
            conv: layer,
            leaky: false,
        });
        Ok(self)
    }

    /// Normalisation (when enabled) then LeakyReLU, fused into a convolution it follows
    /// directly. After a normalisation the LeakyReLU stays a layer of its own: it names no
    /// weights, but its index is part of every later layer's weight names in saved models.
    fn act(mut self, channels: usize) -> Result<Self> {
        if self.batch_norm {
            let n = candle_nn::batch_norm(channels, 1e-5, self.vb())?;
            self.layers.push(Layer::Norm(n));
        }
        match self.layers.last_mut() {
            Some(Layer::Conv { leaky, .. } | Layer::ConvT { leaky, .. }) => *leaky = true,
            _ => self.layers.push(Layer::LeakyRelu),
        }
        Ok(self)
    }

    fn conv_act(self, cin: usize, cout: usize, k: usize, stride: usize, pad: usize) -> Result<Self> {
        self.conv(cin, cout, k, stride, pad)?.act(cout)
    }

    fn up_act(self, cin: usize, cout: usize) -> Result<Self> {
        self.up(cin, cout)?.act(cout)
    }

    fn push(mut self, layer: Layer) -> Self {
        self.layers.push(layer);
        self
    }
}

/// An encoder-decoder network built from an [`Architecture`].
pub struct Autoencoder {
    encoder: Vec<Layer>,
    decoder: Vec<Layer>,
    kernels: Kernels,
}

impl Autoencoder {
    /// Builds the network for `channels × size × size` inputs (size = training patch size).
    pub fn new(arch: &Architecture, channels: usize, size: usize, vb: VarBuilder) -> Result<Self> {
        arch.validate(channels, size).map_err(candle_core::Error::Msg)?;
        match arch {
            Architecture::Bergmann { latent } => Self::bergmann(*latent, channels, size, vb),
            Architecture::Spatial { width, bottleneck } => Self::spatial(*width, *bottleneck, channels, vb),
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
            encoder: e.layers,
            decoder: d.layers,
            kernels: Kernels::default(),
        })
    }

    fn spatial(w: usize, bottleneck: usize, c: usize, vb: VarBuilder) -> Result<Self> {
        let e = Builder::new(vb.pp("enc"), true)
            .conv_act(c, w, 4, 2, 1)?
            .conv_act(w, 2 * w, 4, 2, 1)?
            .conv_act(2 * w, 4 * w, 4, 2, 1)?
            .conv_act(4 * w, 4 * w, 3, 1, 1)?
            .conv(4 * w, bottleneck, 1, 1, 0)?;
        let d = Builder::new(vb.pp("dec"), true)
            .conv_act(bottleneck, 4 * w, 3, 1, 1)?
            .up_act(4 * w, 2 * w)?
            .up_act(2 * w, w)?
            .up(w, c)?
            .push(Layer::Sigmoid);
        Ok(Self {
            encoder: e.layers,
            decoder: d.layers,
            kernels: Kernels::default(),
        })
    }

    /// Multiply-adds × 2 of one forward pass on an `h × w` input (convolutions and the
    /// linear layer; activations and normalisation are not counted).
    pub fn flops(&self, h: usize, w: usize) -> u64 {
        let (mut h, mut w) = (h, w);
        let mut total = 0u64;
        for l in self.encoder.iter().chain(&self.decoder) {
            match l {
                Layer::Conv { conv: c, .. } => {
                    let (cout, cin, k, _) = c.weight().dims4().expect("4-D weight");
                    let cfg = c.config();
                    h = (h + 2 * cfg.padding - k) / cfg.stride + 1;
                    w = (w + 2 * cfg.padding - k) / cfg.stride + 1;
                    total += 2 * (cout * cin * k * k * h * w) as u64;
                }
                Layer::ConvT { conv: c, .. } => {
                    let (cin, cout, k, _) = c.weight().dims4().expect("4-D weight");
                    total += 2 * (cout * cin * k * k * h * w) as u64;
                    let cfg = c.config();
                    h = (h - 1) * cfg.stride + k - 2 * cfg.padding;
                    w = (w - 1) * cfg.stride + k - 2 * cfg.padding;
                }
                Layer::Expand(lin, _, eh, ew) => {
                    let (o, i) = lin.weight().dims2().expect("2-D weight");
                    total += 2 * (o * i) as u64;
                    (h, w) = (*eh, *ew);
                }
                _ => {}
            }
        }
        total
    }

    /// Chooses the convolution kernels (the fast CPU kernels by default).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    /// Runs the network; `train` selects batch statistics in BatchNorm layers.
    ///
    /// On the fast kernels, a BatchNorm and the LeakyReLU after it run as one fused op in
    /// training, and at inference fold into the convolution before them (its weight and
    /// bias scaled per output channel), so conv + norm + activation is a single pass.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let layers: Vec<&Layer> = self.encoder.iter().chain(&self.decoder).collect();
        let fast = self.kernels.fast_on(x.device());
        let leaky = Activation::LeakyRelu(LEAKY_SLOPE);
        let mut h = x.clone();
        let mut rest = &layers[..];
        while let Some(layer) = rest.first() {
            match rest {
                [conv @ (Layer::Conv { leaky: false, .. } | Layer::ConvT { leaky: false, .. }), Layer::Norm(bn), Layer::LeakyRelu, ..]
                    if fast && !train =>
                {
                    h = folded_conv(conv, bn, &h)?;
                    rest = &rest[3..];
                }
                [Layer::Norm(bn), Layer::LeakyRelu, ..] if fast && train => {
                    h = batch_norm::batch_norm_train(&h, bn, leaky)?;
                    rest = &rest[2..];
                }
                _ => {
                    h = layer.forward_t(&h, train, self.kernels)?;
                    rest = &rest[1..];
                }
            }
        }
        Ok(h)
    }
}

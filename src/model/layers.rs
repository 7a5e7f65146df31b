//! Building blocks shared by every family's networks: convolution layers that run on
//! vigil's CPU kernels (im2col + GEMM, bias and a directly following LeakyReLU fused) or on
//! candle's (CUDA, or `Kernels::Candle`), and a sequential stack that fuses conv +
//! BatchNorm + LeakyReLU into one pass.
//!
//! Choices measured by `vigil bench` on the 2-core target machine: up-sampling is a 4×4
//! stride-2 transposed convolution (nearest-upsample + conv was no faster and does 2.25×
//! the FLOPs), a vector latent is expanded to 8×8 by a Linear layer (~6× faster than a
//! transposed conv), and an unfused LeakyReLU is `max(x, 0.2x)`, one op instead of candle's three.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{BatchNorm, Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig, Linear, VarBuilder};

use crate::kernels::{batch_norm, ops, Activation, Kernels};

pub(crate) const LEAKY_SLOPE: f32 = 0.2;

/// One layer of a sequential network.
pub(crate) enum Layer {
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

/// Builds layers in order, naming their weights `<prefix>.<index>.*` (the index counts
/// every layer, weightless ones included).
pub(crate) struct Builder<'a> {
    vb: VarBuilder<'a>,
    layers: Vec<Layer>,
    batch_norm: bool,
}

impl<'a> Builder<'a> {
    pub(crate) fn new(vb: VarBuilder<'a>, batch_norm: bool) -> Self {
        Self {
            vb,
            layers: Vec::new(),
            batch_norm,
        }
    }

    pub(crate) fn vb(&self) -> VarBuilder<'a> {
        self.vb.pp(self.layers.len().to_string())
    }

    pub(crate) fn conv(mut self, cin: usize, cout: usize, k: usize, stride: usize, pad: usize) -> Result<Self> {
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

    pub(crate) fn up(mut self, cin: usize, cout: usize) -> Result<Self> {
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
    pub(crate) fn act(mut self, channels: usize) -> Result<Self> {
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

    pub(crate) fn conv_act(self, cin: usize, cout: usize, k: usize, stride: usize, pad: usize) -> Result<Self> {
        self.conv(cin, cout, k, stride, pad)?.act(cout)
    }

    pub(crate) fn up_act(self, cin: usize, cout: usize) -> Result<Self> {
        self.up(cin, cout)?.act(cout)
    }

    pub(crate) fn push(mut self, layer: Layer) -> Self {
        self.layers.push(layer);
        self
    }
}

/// Layers run in order.
pub(crate) struct Sequential {
    pub(crate) layers: Vec<Layer>,
}

impl Sequential {
    /// Runs the layers; `train` selects batch statistics in BatchNorm layers.
    ///
    /// On the fast kernels, a BatchNorm and the LeakyReLU after it run as one fused op in
    /// training, and at inference fold into the convolution before them (its weight and
    /// bias scaled per output channel), so conv + norm + activation is a single pass.
    pub(crate) fn forward_t(&self, x: &Tensor, train: bool, kernels: Kernels) -> Result<Tensor> {
        let fast = kernels.fast_on(x.device());
        let leaky = Activation::LeakyRelu(LEAKY_SLOPE);
        let mut h = x.clone();
        let mut rest = &self.layers[..];
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
                    h = layer.forward_t(&h, train, kernels)?;
                    rest = &rest[1..];
                }
            }
        }
        Ok(h)
    }

    /// Multiply-adds × 2 of the convolutions and linear layers on an `h × w` input, and
    /// the output's spatial size.
    pub(crate) fn flops(&self, h: usize, w: usize) -> (u64, usize, usize) {
        let (mut h, mut w) = (h, w);
        let mut total = 0u64;
        for l in &self.layers {
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
        (total, h, w)
    }
}

impl Builder<'_> {
    pub(crate) fn build(self) -> Sequential {
        Sequential { layers: self.layers }
    }
}

//! The CPU kernels as candle custom operations with hand-written backward passes, so a
//! model built on them trains through candle's autograd like one built on candle's own
//! convolutions. CPU only: on other devices callers use candle's ops.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::conv::{self, Activation, Direction, Geometry};
use super::{cpu_slice, with_cpu_slices};

fn dims4(l: &Layout, what: &str) -> Result<(usize, usize, usize, usize)> {
    l.shape()
        .dims4()
        .map_err(|_| candle_core::Error::Msg(format!("{what}: expected a 4-D tensor, got {:?}", l.shape())))
}

fn bad_geometry(what: &str, x: &Layout, w: &Layout) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{what}: input {:?} and weight {:?} do not make a convolution",
        x.shape(),
        w.shape()
    ))
}

/// Kernel geometry of `conv2d(x: n×ci×h×w, w: co×ci×k×k)` (`Correlate`) or of
/// `conv_transpose2d(x: n×cin×h×w, w: cin×cout×k×k)` (`Adjoint`), with the batch size.
fn geometry(
    direction: Direction,
    x: &Layout,
    w: &Layout,
    stride: usize,
    pad: usize,
    what: &str,
) -> Result<(usize, Geometry)> {
    let (n, c, h, wd) = dims4(x, what)?;
    let (w0, w1, k, k2) = dims4(w, what)?;
    // The weight's axis that must match the input's channels, and its other channel axis.
    let (matching, other) = match direction {
        Direction::Correlate => (w1, w0),
        Direction::Adjoint => (w0, w1),
    };
    if matching != c || k != k2 {
        return Err(bad_geometry(what, x, w));
    }
    match direction {
        Direction::Correlate => Geometry::conv(c, h, wd, other, k, stride, pad),
        Direction::Adjoint => Geometry::transposed(c, h, wd, other, k, stride, pad),
    }
    .map(|g| (n, g))
    .ok_or_else(|| bad_geometry(what, x, w))
}

/// Gradients of a fused layer as candle tensors shaped like its input, weight and bias.
fn layer_backward(
    g: &Geometry,
    direction: Direction,
    act: Activation,
    (x, w, b, res, grad): (&Tensor, &Tensor, &Tensor, &Tensor, &Tensor),
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let grad = grad.contiguous()?;
    // The network's input needs no gradient; skip that half of the work.
    let need_input = x.track_op();
    let grads = with_cpu_slices([x, w, res, &grad], "conv backward", |[xs, ws, rs, gs]| {
        conv::backward(g, direction, xs, ws, rs, gs, act, need_input)
    })?;
    let dx = match grads.input {
        Some(v) => Some(Tensor::from_vec(v, x.shape(), x.device())?),
        None => None,
    };
    let dw = Tensor::from_vec(grads.weight, w.shape(), w.device())?;
    let db = Tensor::from_vec(grads.bias, b.shape(), b.device())?;
    Ok((dx, Some(dw), Some(db)))
}

/// `act(conv2d(x, w) + b)`: `x` is n×ci×h×w, `w` co×ci×k×k, `b` co.
pub fn conv2d(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, pad: usize, act: Activation) -> Result<Tensor> {
    let op = ConvLayer {
        stride,
        pad,
        act,
        direction: Direction::Correlate,
    };
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

/// `act(conv_transpose2d(x, w) + b)`: `x` is n×cin×h×w, `w` cin×cout×k×k, `b` cout; no
/// output padding, dilation 1.
pub fn conv_transpose2d(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    stride: usize,
    pad: usize,
    act: Activation,
) -> Result<Tensor> {
    let op = ConvLayer {
        stride,
        pad,
        act,
        direction: Direction::Adjoint,
    };
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

/// A convolution (`Correlate`) or transposed convolution (`Adjoint`) with its bias and
/// activation fused.
struct ConvLayer {
    stride: usize,
    pad: usize,
    act: Activation,
    direction: Direction,
}

impl ConvLayer {
    fn geometry(&self, x: &Layout, w: &Layout) -> Result<(usize, Geometry)> {
        geometry(self.direction, x, w, self.stride, self.pad, self.name())
    }
}

impl CustomOp3 for ConvLayer {
    fn name(&self) -> &'static str {
        match self.direction {
            Direction::Correlate => "vigil-conv2d",
            Direction::Adjoint => "vigil-conv-transpose2d",
        }
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, g) = self.geometry(lx, lw)?;
        let (channels, h, w, kernel): (_, _, _, fn(_, _, _, _, _) -> _) = match self.direction {
            Direction::Correlate => (g.co, g.ho, g.wo, conv::correlate),
            Direction::Adjoint => (g.ci, g.hi, g.wi, conv::correlate_adjoint),
        };
        let bias = cpu_slice(sb, lb, self.name())?;
        if bias.len() != channels {
            candle_core::bail!("{}: {} biases for {channels} output channels", self.name(), bias.len());
        }
        let out = kernel(
            &g,
            cpu_slice(sx, lx, "x")?,
            cpu_slice(sw, lw, "w")?,
            Some(bias),
            self.act,
        );
        Ok((CpuStorage::F32(out), Shape::from((n, channels, h, w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, g) = self.geometry(x.layout(), w.layout())?;
        layer_backward(&g, self.direction, self.act, (x, w, b, res, grad))
    }
}

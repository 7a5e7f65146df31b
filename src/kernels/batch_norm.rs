//! Batch normalisation in training mode with a fused LeakyReLU, as a candle custom op
//! with a hand-written backward pass, and the inference-mode fold of a BatchNorm into
//! the convolution before it.
//!
//! Hand-written because it is measurably faster: candle_nn's `BatchNorm::forward_train`
//! transposes and copies the activation, then runs about eight tensor ops over it, each
//! differentiated op by op; here the forward is one pass after the statistics and the
//! backward two (see `vigil bench`, spatial training step).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, Var};
use candle_nn::BatchNorm;
use rayon::prelude::*;

use super::conv::Activation;
use super::{cpu_slice, with_cpu_slices};

/// Element-wise sum of two per-channel lists of sum pairs (a parallel reduction step).
fn add_pairs(mut a: Vec<(f64, f64)>, b: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    a.iter_mut().zip(b).for_each(|(a, b)| {
        a.0 += b.0;
        a.1 += b.1;
    });
    a
}

/// Per-channel mean and biased variance of an (N, C, H, W) batch.
fn channel_stats(x: &[f32], channels: usize, plane: usize) -> (Vec<f64>, Vec<f64>) {
    let image = channels * plane;
    let partial = |img: &[f32]| -> Vec<(f64, f64)> {
        img.chunks(plane)
            .map(|p| {
                let s: f64 = p.iter().map(|v| *v as f64).sum();
                let q: f64 = p.iter().map(|v| (*v as f64) * (*v as f64)).sum();
                (s, q)
            })
            .collect()
    };
    let sums = x
        .par_chunks(image)
        .map(partial)
        .reduce_with(add_pairs)
        .unwrap_or_else(|| vec![(0.0, 0.0); channels]);
    let n = (x.len() / channels.max(1)) as f64;
    sums.into_iter()
        .map(|(s, q)| {
            let mean = s / n.max(1.0);
            (mean, (q / n.max(1.0) - mean * mean).max(0.0))
        })
        .unzip()
}

/// `act(γ·(x − mean)/√(var + ε) + β)` with the batch's statistics, updating the layer's
/// running statistics as candle's `forward_train` does (momentum, unbiased variance).
pub fn batch_norm_train(x: &Tensor, bn: &BatchNorm, act: Activation) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (n, c, h, w) = x.dims4()?;
    let Some((gamma, beta)) = bn.weight_and_bias() else {
        candle_core::bail!("batch norm: the fused op needs an affine BatchNorm")
    };
    let (mean, var) = with_cpu_slices([&x], "batch norm", |[xs]| channel_stats(xs, c, h * w))?;
    let count = (n * h * w) as f64;
    let m = bn.momentum();
    let running_mean: Vec<f32> = bn.running_mean().to_vec1()?;
    let running_var: Vec<f32> = bn.running_var().to_vec1()?;
    let new_mean: Vec<f32> = running_mean
        .iter()
        .zip(&mean)
        .map(|(r, b)| ((1.0 - m) * *r as f64 + m * b) as f32)
        .collect();
    let unbiased = count / (count - 1.0).max(1.0);
    let new_var: Vec<f32> = running_var
        .iter()
        .zip(&var)
        .map(|(r, b)| ((1.0 - m) * *r as f64 + m * b * unbiased) as f32)
        .collect();
    // The running statistics are variables of the model's VarMap; update them in place
    // (a plain tensor would be copied by `Var::from_tensor` and the update lost).
    if !bn.running_mean().is_variable() || !bn.running_var().is_variable() {
        candle_core::bail!("batch norm: training needs running statistics held in a VarMap")
    }
    Var::from_tensor(bn.running_mean())?.set(&Tensor::from_vec(new_mean, c, x.device())?)?;
    Var::from_tensor(bn.running_var())?.set(&Tensor::from_vec(new_var, c, x.device())?)?;
    let inv_std = var.iter().map(|v| (1.0 / (v + bn.eps()).sqrt()) as f32).collect();
    let mean = mean.into_iter().map(|v| v as f32).collect();
    x.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        BatchNormTrain { mean, inv_std, act },
    )
}

struct BatchNormTrain {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    act: Activation,
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "vigil-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, h, w) = lx.shape().dims4()?;
        let (x, gamma, beta) = (
            cpu_slice(sx, lx, self.name())?,
            cpu_slice(sg, lg, self.name())?,
            cpu_slice(sb, lb, self.name())?,
        );
        let scale: Vec<f32> = (0..c).map(|i| gamma[i] * self.inv_std[i]).collect();
        let shift: Vec<f32> = (0..c).map(|i| beta[i] - self.mean[i] * scale[i]).collect();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(c * h * w)
            .zip(x.par_chunks(c * h * w))
            .for_each(|(o, xi)| {
                for (ch, (o, xi)) in o.chunks_mut(h * w).zip(xi.chunks(h * w)).enumerate() {
                    let (a, b) = (scale[ch], shift[ch]);
                    match self.act {
                        Activation::Identity => o.iter_mut().zip(xi).for_each(|(o, x)| *o = x * a + b),
                        Activation::LeakyRelu(s) => o.iter_mut().zip(xi).for_each(|(o, x)| {
                            let t = x * a + b;
                            *o = t.max(t * s);
                        }),
                    }
                }
            });
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, c, h, w) = x.dims4()?;
        let plane = h * w;
        let grad = grad.contiguous()?;
        let gamma_v: Vec<f32> = gamma.to_vec1()?;
        let (dx, sums) = with_cpu_slices([x, res, &grad], self.name(), |[xs, ys, gs]| {
            let slope = match self.act {
                Activation::Identity => 1.0,
                Activation::LeakyRelu(s) => s,
            };
            // Pass 1, per channel: Σg and Σg·x̂, with g the gradient before the activation.
            let sums = xs
                .par_chunks(c * plane)
                .zip(ys.par_chunks(c * plane).zip(gs.par_chunks(c * plane)))
                .map(|(xi, (yi, gi))| {
                    let mut s = vec![(0f64, 0f64); c];
                    for (ch, acc) in s.iter_mut().enumerate() {
                        let r = ch * plane..(ch + 1) * plane;
                        let (m, is) = (self.mean[ch], self.inv_std[ch]);
                        let (mut sg, mut sgx) = (0f32, 0f32);
                        for ((x, y), g) in xi[r.clone()].iter().zip(&yi[r.clone()]).zip(&gi[r]) {
                            let g = if *y > 0.0 { *g } else { *g * slope };
                            sg += g;
                            sgx += g * (x - m) * is;
                        }
                        *acc = (sg as f64, sgx as f64);
                    }
                    s
                })
                .reduce_with(add_pairs)
                .unwrap_or_else(|| vec![(0.0, 0.0); c]);
            let count = (xs.len() / c) as f32;
            // Pass 2: dx = γ·σ⁻¹/N · (N·g − Σg − x̂·Σg·x̂).
            let mut dx = vec![0f32; xs.len()];
            dx.par_chunks_mut(c * plane)
                .zip(
                    xs.par_chunks(c * plane)
                        .zip(ys.par_chunks(c * plane).zip(gs.par_chunks(c * plane))),
                )
                .for_each(|(di, (xi, (yi, gi)))| {
                    for ch in 0..c {
                        let r = ch * plane..(ch + 1) * plane;
                        let (m, is) = (self.mean[ch], self.inv_std[ch]);
                        let (sg, sgx) = (sums[ch].0 as f32 / count, sums[ch].1 as f32 / count);
                        let k = gamma_v[ch] * is;
                        let it = xi[r.clone()].iter().zip(&yi[r.clone()]).zip(&gi[r.clone()]);
                        for (d, ((x, y), g)) in di[r].iter_mut().zip(it) {
                            let g = if *y > 0.0 { *g } else { *g * slope };
                            *d = k * (g - sg - (x - m) * is * sgx);
                        }
                    }
                });
            (dx, sums)
        })?;
        let dgamma: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
        let dbeta: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dgamma, c, x.device())?),
            Some(Tensor::from_vec(dbeta, c, x.device())?),
        ))
    }
}

/// The inference-mode BatchNorm after a layer as a per-output-channel (scale, shift), to be
/// folded into that layer's weight and bias: `bn(y) = y·scale + shift`.
pub fn inference_affine(bn: &BatchNorm) -> Result<(Tensor, Tensor)> {
    let inv_std = (bn.running_var() + bn.eps())?.sqrt()?.recip()?;
    let (scale, shift) = match bn.weight_and_bias() {
        Some((gamma, beta)) => {
            let scale = (gamma * &inv_std)?;
            let shift = (beta - (bn.running_mean() * &scale)?)?;
            (scale, shift)
        }
        None => {
            let shift = (bn.running_mean() * &inv_std)?.neg()?;
            (inv_std, shift)
        }
    };
    Ok((scale, shift))
}

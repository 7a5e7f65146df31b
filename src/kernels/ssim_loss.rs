//! Mean SSIM over the valid region (11-tap Gaussian window, σ 1.5, data range 1) as a
//! candle custom op with a hand-written backward pass.
//!
//! Hand-written because it is measurably faster: as candle tensor ops the loss is a chain
//! of ~20 ops over five stacked maps and their gradients; here forward and backward are
//! separable blurs over each plane, in parallel over planes.
//!
//! With μ = G∗x, E[x²] = G∗x², E[xy] = G∗xy and S = A₁A₂ / (B₁B₂), where
//! A₁ = 2μxμy + C₁, A₂ = 2(E[xy] − μxμy) + C₂, B₁ = μx² + μy² + C₁ and
//! B₂ = E[x²] − μx² + E[y²] − μy² + C₂, the gradient with respect to the reconstruction x is
//! Gᵀ∗∂S/∂μx + 2x·Gᵀ∗∂S/∂E[x²] + y·Gᵀ∗∂S/∂E[xy], with
//! ∂S/∂μx = 2S(μy/A₁ − μy/A₂ − μx/B₁ + μx/B₂), ∂S/∂E[x²] = −S/B₂, ∂S/∂E[xy] = 2S/A₂.
//! Gᵀ, the adjoint of a valid-region blur, spreads each value back over its window.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::scoring::filter::gaussian_kernel;

const RADIUS: usize = 5;
const TAPS: usize = 2 * RADIUS + 1;
const C1: f32 = 0.01 * 0.01;
const C2: f32 = 0.03 * 0.03;

/// `out[y][x] += Σ_j k[j] · src[y + j][x]` over the valid rows, then the same along rows:
/// `src` is `h × w`, `out` `(h − taps + 1) × (w − taps + 1)`.
fn blur_valid(src: &[f32], h: usize, w: usize, k: &[f32], tmp: &mut [f32], out: &mut [f32]) {
    let (vh, vw) = (h + 1 - k.len(), w + 1 - k.len());
    let tmp = &mut tmp[..vh * w];
    tmp.fill(0.0);
    for oy in 0..vh {
        let row = &mut tmp[oy * w..][..w];
        for (j, kj) in k.iter().enumerate() {
            let s = &src[(oy + j) * w..][..w];
            row.iter_mut().zip(s).for_each(|(r, s)| *r += kj * s);
        }
    }
    out.fill(0.0);
    for oy in 0..vh {
        let row = &tmp[oy * w..][..w];
        let o = &mut out[oy * vw..][..vw];
        for (j, kj) in k.iter().enumerate() {
            o.iter_mut().zip(&row[j..j + vw]).for_each(|(o, s)| *o += kj * s);
        }
    }
}

/// The adjoint of [`blur_valid`]: `g` is `(h − taps + 1) × (w − taps + 1)`, `out` `h × w`
/// (overwritten).
fn blur_valid_adjoint(g: &[f32], h: usize, w: usize, k: &[f32], tmp: &mut [f32], out: &mut [f32]) {
    let (vh, vw) = (h + 1 - k.len(), w + 1 - k.len());
    let tmp = &mut tmp[..vh * w];
    tmp.fill(0.0);
    for oy in 0..vh {
        let src = &g[oy * vw..][..vw];
        let row = &mut tmp[oy * w..][..w];
        for (j, kj) in k.iter().enumerate() {
            row[j..j + vw].iter_mut().zip(src).for_each(|(r, s)| *r += kj * s);
        }
    }
    out.fill(0.0);
    for oy in 0..vh {
        let src = &tmp[oy * w..][..w];
        for (j, kj) in k.iter().enumerate() {
            let row = &mut out[(oy + j) * w..][..w];
            row.iter_mut().zip(src).for_each(|(r, s)| *r += kj * s);
        }
    }
}

/// The five blurred moments of one plane pair: μx, μy, E[x²], E[y²], E[xy].
struct Moments {
    maps: [Vec<f32>; 5],
}

impl Moments {
    fn of(x: &[f32], y: &[f32], h: usize, w: usize, k: &[f32]) -> Self {
        let valid = (h + 1 - TAPS) * (w + 1 - TAPS);
        let mut tmp = vec![0f32; h * w];
        let mut product = vec![0f32; h * w];
        let mut maps: [Vec<f32>; 5] = std::array::from_fn(|_| vec![0f32; valid]);
        blur_valid(x, h, w, k, &mut tmp, &mut maps[0]);
        blur_valid(y, h, w, k, &mut tmp, &mut maps[1]);
        product.iter_mut().zip(x).for_each(|(p, x)| *p = x * x);
        blur_valid(&product, h, w, k, &mut tmp, &mut maps[2]);
        product.iter_mut().zip(y).for_each(|(p, y)| *p = y * y);
        blur_valid(&product, h, w, k, &mut tmp, &mut maps[3]);
        product
            .iter_mut()
            .zip(x.iter().zip(y))
            .for_each(|(p, (x, y))| *p = x * y);
        blur_valid(&product, h, w, k, &mut tmp, &mut maps[4]);
        Self { maps }
    }

    /// (S, A₁, A₂, B₁, B₂) at valid pixel `i`.
    fn terms(&self, i: usize) -> (f32, f32, f32, f32, f32) {
        let [mx, my, xx, yy, xy] = &self.maps;
        let (mx, my) = (mx[i], my[i]);
        let a1 = 2.0 * mx * my + C1;
        let a2 = 2.0 * (xy[i] - mx * my) + C2;
        let b1 = mx * mx + my * my + C1;
        let b2 = (xx[i] - mx * mx) + (yy[i] - my * my) + C2;
        (a1 * a2 / (b1 * b2), a1, a2, b1, b2)
    }
}

/// The image planes of a (reconstruction, target) pair of (N, C, H, W) tensors.
struct Planes<'a> {
    x: &'a [f32],
    y: &'a [f32],
    count: usize,
    h: usize,
    w: usize,
    /// Pixels of one plane's valid region.
    valid: usize,
    kernel: Vec<f32>,
}

impl<'a> Planes<'a> {
    fn read(sx: &'a CpuStorage, lx: &Layout, sy: &'a CpuStorage, ly: &Layout) -> Result<Self> {
        let (n, c, h, w) = lx.shape().dims4()?;
        if lx.shape() != ly.shape() {
            candle_core::bail!("ssim loss: shapes {:?} and {:?} differ", lx.shape(), ly.shape());
        }
        if h < TAPS || w < TAPS {
            candle_core::bail!("ssim loss: images of {h}×{w} are smaller than the {TAPS}×{TAPS} window");
        }
        let (x, y) = match (sx, sy, lx.contiguous_offsets(), ly.contiguous_offsets()) {
            (CpuStorage::F32(x), CpuStorage::F32(y), Some((a, b)), Some((c, d))) => (&x[a..b], &y[c..d]),
            _ => candle_core::bail!("ssim loss: takes contiguous f32 tensors"),
        };
        Ok(Self {
            x,
            y,
            count: n * c,
            h,
            w,
            valid: (h + 1 - TAPS) * (w + 1 - TAPS),
            kernel: gaussian_kernel(1.5, RADIUS),
        })
    }

    /// The moments of plane `p`, with its reconstruction and target.
    fn moments(&self, p: usize) -> (Moments, &'a [f32], &'a [f32]) {
        let len = self.h * self.w;
        let (x, y) = (&self.x[p * len..][..len], &self.y[p * len..][..len]);
        (Moments::of(x, y, self.h, self.w, &self.kernel), x, y)
    }
}

/// Mean SSIM of (N, C, H, W) reconstructions `x` against targets `y`, over the valid
/// region, averaged over channels and images. Differentiable in `x` only (the target is data).
pub fn ssim_mean(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&y.contiguous()?.detach(), SsimMean)
}

struct SsimMean;

impl CustomOp2 for SsimMean {
    fn name(&self) -> &'static str {
        "vigil-ssim-mean"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sy: &CpuStorage, ly: &Layout) -> Result<(CpuStorage, Shape)> {
        let planes = Planes::read(sx, lx, sy, ly)?;
        let total: f64 = (0..planes.count)
            .into_par_iter()
            .map(|p| {
                let (m, _, _) = planes.moments(p);
                (0..planes.valid).map(|i| m.terms(i).0 as f64).sum::<f64>()
            })
            .sum();
        let mean = (total / (planes.count * planes.valid) as f64) as f32;
        Ok((CpuStorage::F32(vec![mean]), Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let scale = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        Ok((Some(x.apply_op2_no_bwd(y, &SsimMeanGrad { scale })?), None))
    }
}

/// `scale · ∂(mean SSIM)/∂x`.
struct SsimMeanGrad {
    scale: f32,
}

impl CustomOp2 for SsimMeanGrad {
    fn name(&self) -> &'static str {
        "vigil-ssim-mean-grad"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sy: &CpuStorage, ly: &Layout) -> Result<(CpuStorage, Shape)> {
        let planes = Planes::read(sx, lx, sy, ly)?;
        let (h, w, valid, k) = (planes.h, planes.w, planes.valid, &planes.kernel);
        let per_value = self.scale / (planes.count * valid) as f32;
        let mut out = vec![0f32; planes.count * h * w];
        out.par_chunks_mut(h * w).enumerate().for_each(|(p, dx)| {
            let (m, xp, yp) = planes.moments(p);
            // ∂S/∂μx, ∂S/∂E[x²], ∂S/∂E[xy] at each valid pixel, scaled for the mean.
            let (mut d_mu, mut d_xx, mut d_xy) = (vec![0f32; valid], vec![0f32; valid], vec![0f32; valid]);
            for (i, ((d_mu, d_xx), d_xy)) in d_mu.iter_mut().zip(&mut d_xx).zip(&mut d_xy).enumerate() {
                let (s, a1, a2, b1, b2) = m.terms(i);
                let (mx, my) = (m.maps[0][i], m.maps[1][i]);
                let s = s * per_value;
                *d_mu = 2.0 * s * (my / a1 - my / a2 - mx / b1 + mx / b2);
                *d_xx = -s / b2;
                *d_xy = 2.0 * s / a2;
            }
            let mut tmp = vec![0f32; h * w];
            let mut spread = vec![0f32; h * w];
            blur_valid_adjoint(&d_mu, h, w, k, &mut tmp, dx);
            blur_valid_adjoint(&d_xx, h, w, k, &mut tmp, &mut spread);
            dx.iter_mut()
                .zip(&spread)
                .zip(xp)
                .for_each(|((o, s), x)| *o += 2.0 * x * s);
            blur_valid_adjoint(&d_xy, h, w, k, &mut tmp, &mut spread);
            dx.iter_mut().zip(&spread).zip(yp).for_each(|((o, s), y)| *o += y * s);
        });
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_blur_adjoint_is_its_transpose() {
        let (h, w) = (17, 14);
        let k = gaussian_kernel(1.5, RADIUS);
        let (vh, vw) = (h + 1 - TAPS, w + 1 - TAPS);
        let x: Vec<f32> = (0..h * w).map(|i| ((i * 37 % 23) as f32) / 23.0).collect();
        let g: Vec<f32> = (0..vh * vw).map(|i| ((i * 11 % 7) as f32) / 7.0 - 0.5).collect();
        let mut tmp = vec![0f32; h * w];
        let mut bx = vec![0f32; vh * vw];
        let mut ag = vec![0f32; h * w];
        blur_valid(&x, h, w, &k, &mut tmp, &mut bx);
        blur_valid_adjoint(&g, h, w, &k, &mut tmp, &mut ag);
        let l: f64 = bx.iter().zip(&g).map(|(a, b)| (a * b) as f64).sum();
        let r: f64 = x.iter().zip(&ag).map(|(a, b)| (a * b) as f64).sum();
        assert!((l - r).abs() < 1e-5 * (1.0 + l.abs()), "{l} vs {r}");
        // A constant image blurs to the same constant (the kernel sums to one).
        let ones = vec![1f32; h * w];
        blur_valid(&ones, h, w, &k, &mut tmp, &mut bx);
        assert!(bx.iter().all(|v| (v - 1.0).abs() < 1e-5));
    }
}

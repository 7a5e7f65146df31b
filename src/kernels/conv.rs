//! 2-D convolution on plain `f32` slices in NCHW order: im2col into a column matrix,
//! then one GEMM per image through the `gemm` crate (the one candle's matmul uses).
//!
//! Hand-written because it is measurably faster: candle 0.11's CPU `conv2d` fills its
//! column matrix element by element single-threaded and `conv_transpose2d` uses no GEMM
//! at all, ~5% of the matmul peak on the 2-core target machine (`vigil bench` measures
//! both paths in one run).
//!
//! Everything is expressed on one [`Geometry`], a convolution from `ci` channels of
//! `hi × wi` to `co` channels of `ho × wo`, and three kernels:
//! - [`correlate`]: the convolution itself (conv2d forward; the input gradient of a
//!   transposed convolution);
//! - [`correlate_adjoint`]: its transpose (the input gradient of conv2d; the forward pass
//!   of a transposed convolution);
//! - [`weight_grad`]: the weight gradient, Σ over the batch of `co-image · im2col(ci-image)ᵀ`.
//!
//! Work is split over images when the batch has at least one image per thread (each
//! image then runs a single-threaded GEMM with its own column buffer); a smaller batch
//! runs image by image with the GEMM itself parallel.

use gemm::Parallelism;
use rayon::prelude::*;

/// A convolution from `ci × hi × wi` to `co × ho × wo` with a square `k × k` kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub ci: usize,
    pub hi: usize,
    pub wi: usize,
    pub co: usize,
    pub ho: usize,
    pub wo: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Geometry {
    /// The geometry of a convolution of a `ci × hi × wi` input; None when the kernel does
    /// not fit.
    pub fn conv(ci: usize, hi: usize, wi: usize, co: usize, k: usize, stride: usize, pad: usize) -> Option<Self> {
        if stride == 0 || k == 0 || hi + 2 * pad < k || wi + 2 * pad < k {
            return None;
        }
        Some(Self {
            ci,
            hi,
            wi,
            co,
            ho: (hi + 2 * pad - k) / stride + 1,
            wo: (wi + 2 * pad - k) / stride + 1,
            k,
            stride,
            pad,
        })
    }

    /// The geometry whose adjoint is a transposed convolution of a `cin × h × w` input to
    /// `cout` channels (output `(h−1)·stride + k − 2·pad`, no output padding).
    pub fn transposed(
        cin: usize,
        h: usize,
        w: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Option<Self> {
        let oh = ((h.checked_sub(1)?) * stride + k).checked_sub(2 * pad)?;
        let ow = ((w.checked_sub(1)?) * stride + k).checked_sub(2 * pad)?;
        let g = Self::conv(cout, oh, ow, cin, k, stride, pad)?;
        (g.ho == h && g.wo == w).then_some(g)
    }

    /// Rows of the column matrix: `ci · k · k`.
    pub fn cols(&self) -> usize {
        self.ci * self.k * self.k
    }
    pub fn in_len(&self) -> usize {
        self.ci * self.hi * self.wi
    }
    pub fn out_len(&self) -> usize {
        self.co * self.ho * self.wo
    }
    fn out_pixels(&self) -> usize {
        self.ho * self.wo
    }
    /// A 1×1 stride-1 convolution: the image is its own column matrix.
    fn pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }
}

/// What follows the bias in the same pass over the output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Identity,
    /// `max(x, slope·x)` for 0 ≤ slope ≤ 1.
    LeakyRelu(f32),
}

/// `dst (m×n, row-major) = [dst +] a · b`, with `a` (m×k) and `b` (k×n) given by their
/// (row, column) strides so transposes cost nothing.
#[allow(clippy::too_many_arguments)]
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    parallelism: Parallelism,
) {
    assert!(dst.len() >= m * n, "gemm destination too small");
    assert!(
        m == 0 || k == 0 || (m - 1) * a_rs + (k - 1) * a_cs < a.len(),
        "gemm lhs out of bounds"
    );
    assert!(
        n == 0 || k == 0 || (k - 1) * b_rs + (n - 1) * b_cs < b.len(),
        "gemm rhs out of bounds"
    );
    // SAFETY: the asserts above keep every index the strides reach inside the slices,
    // and `dst` is exclusively borrowed.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// The output columns `o` (of `outs`) whose input column `o·stride + tap − pad` lies in
/// `0..len`, as a range.
fn valid_range(tap: usize, pad: usize, stride: usize, len: usize, outs: usize) -> (usize, usize) {
    let lo = if pad > tap { (pad - tap).div_ceil(stride) } else { 0 }.min(outs);
    let hi = if len + pad > tap {
        ((len - 1 + pad - tap) / stride + 1).min(outs)
    } else {
        0
    };
    (lo, hi.max(lo))
}

/// Fills the `cols() × ho·wo` column matrix of one `ci × hi × wi` image, in parallel over
/// channels when `parallel` (a batch smaller than the thread count).
fn im2col(g: &Geometry, x: &[f32], col: &mut [f32], parallel: bool) {
    let rows = g.k * g.k * g.out_pixels();
    let planes = x.chunks(g.hi * g.wi);
    if parallel {
        col[..g.ci * rows]
            .par_chunks_mut(rows)
            .zip(x.par_chunks(g.hi * g.wi))
            .for_each(|(c, p)| im2col_plane(g, p, c));
    } else {
        col[..g.ci * rows]
            .chunks_mut(rows)
            .zip(planes)
            .for_each(|(c, p)| im2col_plane(g, p, c));
    }
}

/// The `k·k` rows of the column matrix that come from one input channel. (Splitting a
/// strided plane into column phases first, so every row is a contiguous copy, measured no
/// faster than this gather.)
fn im2col_plane(g: &Geometry, plane: &[f32], col: &mut [f32]) {
    let (n, k, s, p) = (g.out_pixels(), g.k, g.stride, g.pad);
    for ky in 0..k {
        for kx in 0..k {
            let row = &mut col[(ky * k + kx) * n..][..n];
            let (lo, hi) = valid_range(kx, p, s, g.wi, g.wo);
            for oy in 0..g.ho {
                let out = &mut row[oy * g.wo..][..g.wo];
                let iy = (oy * s + ky).wrapping_sub(p);
                if iy >= g.hi {
                    out.fill(0.0);
                    continue;
                }
                let src = &plane[iy * g.wi..][..g.wi];
                out[..lo].fill(0.0);
                out[hi..].fill(0.0);
                if s == 1 {
                    let start = lo + kx - p;
                    out[lo..hi].copy_from_slice(&src[start..start + hi - lo]);
                } else if hi > lo {
                    let taps = src[lo * s + kx - p..].iter().step_by(s);
                    out[lo..hi].iter_mut().zip(taps).for_each(|(o, v)| *o = *v);
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds every column entry back onto the input pixel it was
/// read from. `x` must hold zeros (every caller passes a freshly zeroed buffer, so it is
/// not zeroed twice).
fn col2im(g: &Geometry, col: &[f32], x: &mut [f32], parallel: bool) {
    let rows = g.k * g.k * g.out_pixels();
    let plane = g.hi * g.wi;
    if parallel {
        x[..g.ci * plane]
            .par_chunks_mut(plane)
            .zip(col.par_chunks(rows))
            .for_each(|(p, c)| col2im_plane(g, c, p));
    } else {
        x[..g.ci * plane]
            .chunks_mut(plane)
            .zip(col.chunks(rows))
            .for_each(|(p, c)| col2im_plane(g, c, p));
    }
}

fn col2im_plane(g: &Geometry, col: &[f32], plane: &mut [f32]) {
    let (n, k, s, p) = (g.out_pixels(), g.k, g.stride, g.pad);
    for ky in 0..k {
        for kx in 0..k {
            let row = &col[(ky * k + kx) * n..][..n];
            let (lo, hi) = valid_range(kx, p, s, g.wi, g.wo);
            for oy in 0..g.ho {
                let iy = (oy * s + ky).wrapping_sub(p);
                if iy >= g.hi {
                    continue;
                }
                let src = &row[oy * g.wo..][..g.wo];
                let dst = &mut plane[iy * g.wi..][..g.wi];
                if s == 1 {
                    let start = lo + kx - p;
                    for (d, v) in dst[start..start + hi - lo].iter_mut().zip(&src[lo..hi]) {
                        *d += v;
                    }
                } else if hi > lo {
                    let taps = dst[lo * s + kx - p..].iter_mut().step_by(s);
                    taps.zip(&src[lo..hi]).for_each(|(d, v)| *d += v);
                }
            }
        }
    }
}

/// Adds the per-channel bias and applies the activation in place.
fn epilogue(img: &mut [f32], channels: usize, bias: Option<&[f32]>, act: Activation) {
    let plane = img.len() / channels.max(1);
    for (c, values) in img.chunks_mut(plane.max(1)).enumerate() {
        let b = bias.map_or(0.0, |b| b[c]);
        match act {
            Activation::Identity if b != 0.0 => values.iter_mut().for_each(|v| *v += b),
            Activation::Identity => {}
            Activation::LeakyRelu(slope) => values.iter_mut().for_each(|v| {
                let t = *v + b;
                *v = t.max(t * slope);
            }),
        }
    }
}

/// A GEMM told to use the pool means the batch is too small to split: then the copies
/// around it are split over channels too.
fn is_parallel(par: Parallelism) -> bool {
    !matches!(par, Parallelism::None)
}

fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Runs `per_image(input, output, scratch, parallelism)` over a batch: in parallel over
/// images when there is an image per thread, otherwise image by image with a parallel GEMM.
fn over_batch<F>(input: &[f32], in_len: usize, out: &mut [f32], out_len: usize, scratch: usize, per_image: F)
where
    F: Fn(&[f32], &mut [f32], &mut Vec<f32>, Parallelism) + Sync,
{
    let batch = out.len() / out_len.max(1);
    let t = threads();
    if batch >= t && t > 1 {
        out.par_chunks_mut(out_len).zip(input.par_chunks(in_len)).for_each_init(
            || vec![0f32; scratch],
            |buf, (o, x)| per_image(x, o, buf, Parallelism::None),
        );
    } else {
        let mut buf = vec![0f32; scratch];
        let par = if t > 1 {
            Parallelism::Rayon(t)
        } else {
            Parallelism::None
        };
        for (o, x) in out.chunks_mut(out_len).zip(input.chunks(in_len)) {
            per_image(x, o, &mut buf, par);
        }
    }
}

/// The convolution: `out = act(w ⋆ x + bias)` for a batch of `ci`-channel images, with
/// `w` as `co × ci × k × k`. Returns the `co`-channel images.
pub fn correlate(g: &Geometry, x: &[f32], w: &[f32], bias: Option<&[f32]>, act: Activation) -> Vec<f32> {
    let batch = x.len() / g.in_len();
    let (kk, n) = (g.cols(), g.out_pixels());
    let mut out = vec![0f32; batch * g.out_len()];
    let scratch = if g.pointwise() { 0 } else { kk * n };
    over_batch(x, g.in_len(), &mut out, g.out_len(), scratch, |xi, o, col, par| {
        let col: &[f32] = if g.pointwise() {
            xi
        } else {
            im2col(g, xi, col, is_parallel(par));
            col
        };
        matmul((g.co, n, kk), o, false, w, (kk, 1), col, (n, 1), par);
        epilogue(o, g.co, bias, act);
    });
    out
}

/// The transpose of [`correlate`]: maps a batch of `co`-channel `ho × wo` images back to
/// `ci`-channel `hi × wi` images, `out = act(col2im(wᵀ · y) + bias)`.
pub fn correlate_adjoint(g: &Geometry, y: &[f32], w: &[f32], bias: Option<&[f32]>, act: Activation) -> Vec<f32> {
    let batch = y.len() / g.out_len();
    let (kk, n) = (g.cols(), g.out_pixels());
    let mut out = vec![0f32; batch * g.in_len()];
    let scratch = if g.pointwise() { 0 } else { kk * n };
    over_batch(y, g.out_len(), &mut out, g.in_len(), scratch, |yi, o, col, par| {
        if g.pointwise() {
            matmul((kk, n, g.co), o, false, w, (1, kk), yi, (n, 1), par);
        } else {
            matmul((kk, n, g.co), col, false, w, (1, kk), yi, (n, 1), par);
            col2im(g, col, o, is_parallel(par));
        }
        epilogue(o, g.ci, bias, act);
    });
    out
}

/// The gradient flowing into a layer's pre-activation, written into `g`: `dout` where the
/// output is positive, `slope · dout` elsewhere (a LeakyReLU output has its input's sign).
fn through_activation(act: Activation, dout: &[f32], out: &[f32], g: &mut [f32]) {
    match act {
        Activation::Identity => g.copy_from_slice(dout),
        Activation::LeakyRelu(slope) => {
            for ((g, d), o) in g.iter_mut().zip(dout).zip(out) {
                *g = if *o > 0.0 { *d } else { *d * slope };
            }
        }
    }
}

/// Gradients of one layer: the input's (when asked for), the weight's and the bias's.
pub struct Gradients {
    pub input: Option<Vec<f32>>,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// Which of the two kernels a layer ran forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `out = act(correlate(x, w) + b)`: a convolution; `x` holds ci-images.
    Correlate,
    /// `out = act(correlate_adjoint(x, w) + b)`: a transposed convolution; `x` holds co-images.
    Adjoint,
}

/// The backward pass of a layer, given its input `x`, weight `w` (co × ci·k·k), output
/// `out` and the output's gradient `dout`. One pass over the batch, split into one part
/// per thread; each image's column matrix serves both the weight and the input gradient.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    g: &Geometry,
    direction: Direction,
    x: &[f32],
    w: &[f32],
    out: &[f32],
    dout: &[f32],
    act: Activation,
    need_input: bool,
) -> Gradients {
    let (x_len, out_len, out_channels) = match direction {
        Direction::Correlate => (g.in_len(), g.out_len(), g.co),
        Direction::Adjoint => (g.out_len(), g.in_len(), g.ci),
    };
    let batch = x.len() / x_len;
    let (kk, n) = (g.cols(), g.out_pixels());
    let t = threads();
    let parts = batch.clamp(1, t);
    let par = if parts == 1 && t > 1 {
        Parallelism::Rayon(t)
    } else {
        Parallelism::None
    };
    let per_part = batch.div_ceil(parts);
    let mut dx = if need_input {
        vec![0f32; batch * x_len]
    } else {
        Vec::new()
    };

    let part = |p: usize, dx: &mut [f32]| -> (Vec<f32>, Vec<f64>) {
        let mut dw = vec![0f32; g.co * kk];
        let mut db = vec![0f64; out_channels];
        let mut grad = vec![0f32; out_len];
        let mut col = vec![0f32; if g.pointwise() { 0 } else { kk * n }];
        let first = p * per_part;
        for (i, b) in (first..((p + 1) * per_part).min(batch)).enumerate() {
            let xb = &x[b * x_len..][..x_len];
            through_activation(
                act,
                &dout[b * out_len..][..out_len],
                &out[b * out_len..][..out_len],
                &mut grad,
            );
            let plane = out_len / out_channels;
            for (c, values) in grad.chunks(plane).enumerate() {
                db[c] += values.iter().sum::<f32>() as f64;
            }
            let dxb = need_input.then(|| &mut dx[(b - first) * x_len..][..x_len]);
            match direction {
                Direction::Correlate => {
                    // dw += grad · im2col(x)ᵀ;  dx = col2im(wᵀ · grad).
                    let cols: &[f32] = if g.pointwise() {
                        xb
                    } else {
                        im2col(g, xb, &mut col, is_parallel(par));
                        &col
                    };
                    matmul((g.co, kk, n), &mut dw, i > 0, &grad, (n, 1), cols, (1, n), par);
                    if let Some(dxb) = dxb {
                        if g.pointwise() {
                            matmul((kk, n, g.co), dxb, false, w, (1, kk), &grad, (n, 1), par);
                        } else {
                            matmul((kk, n, g.co), &mut col, false, w, (1, kk), &grad, (n, 1), par);
                            col2im(g, &col, dxb, is_parallel(par));
                        }
                    }
                }
                Direction::Adjoint => {
                    // With c = im2col(grad): dw += x · cᵀ;  dx = w · c.
                    let cols: &[f32] = if g.pointwise() {
                        &grad
                    } else {
                        im2col(g, &grad, &mut col, is_parallel(par));
                        &col
                    };
                    matmul((g.co, kk, n), &mut dw, i > 0, xb, (n, 1), cols, (1, n), par);
                    if let Some(dxb) = dxb {
                        matmul((g.co, n, kk), dxb, false, w, (kk, 1), cols, (n, 1), par);
                    }
                }
            }
        }
        (dw, db)
    };

    let chunk = (per_part * x_len).max(1);
    let partials: Vec<(Vec<f32>, Vec<f64>)> = if parts == 1 {
        vec![part(0, &mut dx)]
    } else if need_input {
        dx.par_chunks_mut(chunk).enumerate().map(|(p, d)| part(p, d)).collect()
    } else {
        (0..parts).into_par_iter().map(|p| part(p, &mut [])).collect()
    };
    let mut partials = partials.into_iter();
    let (mut dw, mut db) = partials
        .next()
        .unwrap_or_else(|| (vec![0f32; g.co * kk], vec![0f64; out_channels]));
    for (w2, b2) in partials {
        dw.iter_mut().zip(&w2).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(&b2).for_each(|(a, b)| *a += b);
    }
    Gradients {
        input: need_input.then_some(dx),
        weight: dw,
        bias: db.into_iter().map(|v| v as f32).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct convolution by definition, the reference for the im2col path.
    fn direct(g: &Geometry, x: &[f32], w: &[f32]) -> Vec<f32> {
        let batch = x.len() / g.in_len();
        let mut out = vec![0f32; batch * g.out_len()];
        for b in 0..batch {
            for o in 0..g.co {
                for oy in 0..g.ho {
                    for ox in 0..g.wo {
                        let mut acc = 0f64;
                        for c in 0..g.ci {
                            for ky in 0..g.k {
                                for kx in 0..g.k {
                                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                                    let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                                    if iy < 0 || ix < 0 || iy >= g.hi as isize || ix >= g.wi as isize {
                                        continue;
                                    }
                                    let xv = x[b * g.in_len() + (c * g.hi + iy as usize) * g.wi + ix as usize];
                                    let wv = w[((o * g.ci + c) * g.k + ky) * g.k + kx];
                                    acc += (xv * wv) as f64;
                                }
                            }
                        }
                        out[b * g.out_len() + (o * g.ho + oy) * g.wo + ox] = acc as f32;
                    }
                }
            }
        }
        out
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32) / 500.0 - 1.0)
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f32], g: &Geometry) {
        assert_eq!(got.len(), want.len(), "{g:?}");
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{g:?}: {a} vs {b}");
        }
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(a, b)| (*a as f64) * (*b as f64)).sum()
    }

    #[test]
    fn correlate_matches_the_definition_and_its_adjoint_is_the_transpose() {
        for (ci, co, h, w, k, s, p, batch) in [
            (1, 3, 9, 7, 4, 2, 1, 1),
            (3, 2, 11, 13, 3, 1, 1, 3),
            (2, 5, 8, 8, 1, 1, 0, 2),
            (2, 1, 10, 9, 4, 2, 1, 7),
            (3, 4, 6, 6, 6, 1, 0, 2),
        ] {
            let g = Geometry::conv(ci, h, w, co, k, s, p).unwrap();
            let x = values(batch * g.in_len(), 1);
            let wt = values(co * g.cols(), 2);
            let got = correlate(&g, &x, &wt, None, Activation::Identity);
            let want = direct(&g, &x, &wt);
            assert_close(&got, &want, &g);
            // <A x, y> = <x, Aᵀ y> for any y.
            let y = values(batch * g.out_len(), 3);
            let back = correlate_adjoint(&g, &y, &wt, None, Activation::Identity);
            let (l, r) = (dot(&got, &y), dot(&x, &back));
            assert!((l - r).abs() < 1e-3 * (1.0 + l.abs()), "{g:?}: {l} vs {r}");
            // L = <y, A_w x> has gradients Aᵀy in x, and dL/dw with <w, dL/dw> = L.
            let grads = backward(&g, Direction::Correlate, &x, &wt, &got, &y, Activation::Identity, true);
            let dx = grads.input.unwrap();
            assert_close(&dx, &back, &g);
            let (l, r) = (dot(&got, &y), dot(&wt, &grads.weight));
            assert!((l - r).abs() < 1e-3 * (1.0 + l.abs()), "{g:?}: {l} vs {r}");
            // The transposed direction: L = <x, Aᵀ_w y> has gradient A x in y.
            let grads = backward(&g, Direction::Adjoint, &y, &wt, &back, &x, Activation::Identity, true);
            let dy = grads.input.unwrap();
            assert_close(&dy, &got, &g);
            let (l, r) = (dot(&back, &x), dot(&wt, &grads.weight));
            assert!((l - r).abs() < 1e-3 * (1.0 + l.abs()), "{g:?}: {l} vs {r}");
        }
    }

    #[test]
    fn epilogue_adds_bias_then_applies_leaky_relu() {
        let mut v = vec![-1.0, 1.0, -3.0, 0.5];
        epilogue(&mut v, 2, Some(&[0.5, 1.0]), Activation::LeakyRelu(0.2));
        let want = [-0.1, 1.5, -0.4, 1.5];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{v:?}");
        }
    }

    #[test]
    fn transposed_geometry_inverts_the_output_size() {
        let g = Geometry::transposed(32, 16, 16, 8, 4, 2, 1).unwrap();
        assert_eq!((g.ci, g.hi, g.wi, g.co, g.ho, g.wo), (8, 32, 32, 32, 16, 16));
        assert!(Geometry::transposed(1, 0, 4, 1, 4, 2, 1).is_none());
    }
}

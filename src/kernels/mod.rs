//! Hand-written CPU kernels exposed as candle custom operations: convolution (forward
//! and backward, bias and LeakyReLU fused), training-mode BatchNorm (+ LeakyReLU) and the
//! SSIM training loss. Candle's own CPU convolutions run at ~5% of the matmul peak on the
//! target machines; these run the same maths through packed GEMM, 4–7× faster. `vigil
//! bench` measures both paths in one run.
//!
//! CUDA keeps candle's kernels: [`Kernels`] picks per device.

pub mod batch_norm;
pub mod conv;
pub mod ops;
pub mod ssim_loss;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

pub use conv::Activation;

/// Which convolution and loss implementation a network runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Kernels {
    /// vigil's kernels on the CPU, candle's on other devices (the default).
    #[default]
    Fast,
    /// candle's own operations everywhere (the reference the fast path is tested against).
    Candle,
}

impl Kernels {
    /// True when the fast kernels run for tensors on `device`.
    pub fn fast_on(&self, device: &candle_core::Device) -> bool {
        *self == Kernels::Fast && device.is_cpu()
    }
}

/// The f32 contents of a contiguous CPU storage.
fn cpu_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: the CPU kernels take f32 tensors, not {:?}", s.dtype())
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => candle_core::bail!("{what}: the CPU kernels take contiguous tensors"),
    }
}

/// Runs `f` on the f32 contents of contiguous CPU tensors (a backward pass, which gets
/// tensors rather than storages).
fn with_cpu_slices<const N: usize, R>(
    tensors: [&Tensor; N],
    what: &str,
    f: impl FnOnce([&[f32]; N]) -> R,
) -> Result<R> {
    let guards = tensors.map(|t| t.storage_and_layout());
    let mut slices: [&[f32]; N] = [&[]; N];
    for (slot, (storage, layout)) in slices.iter_mut().zip(&guards) {
        let Storage::Cpu(cpu) = &**storage else {
            candle_core::bail!("{what}: the CPU kernels take CPU tensors")
        };
        *slot = cpu_slice(cpu, layout, what)?;
    }
    Ok(f(slices))
}

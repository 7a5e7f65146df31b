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

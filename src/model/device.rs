//! Device selection: `auto`, `cpu` or `cuda`, with an explicit, logged fallback.

use candle_core::Device;

/// Which device the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when this build has it and a GPU answers, else CPU (logged).
    #[default]
    Auto,
    Cpu,
    /// A CUDA GPU; an error when this build or this machine has none.
    Cuda,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("CUDA was asked for, but this vigil was built without the `cuda` feature (rebuild with `cargo build --release --features cuda`)")]
    CudaNotBuilt,
    #[error("CUDA was asked for, but no GPU could be opened: {0}")]
    CudaUnavailable(String),
}

/// Resolves the choice to a candle device.
pub fn select(choice: DeviceChoice) -> Result<Device, DeviceError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => open_cuda(),
        DeviceChoice::Auto => match open_cuda() {
            Ok(d) => Ok(d),
            Err(DeviceError::CudaNotBuilt) => {
                tracing::debug!("this build has no CUDA support; using the CPU");
                Ok(Device::Cpu)
            }
            Err(e) => {
                tracing::info!("no usable GPU ({e}); using the CPU");
                Ok(Device::Cpu)
            }
        },
    }
}

#[cfg(feature = "cuda")]
fn open_cuda() -> Result<Device, DeviceError> {
    Device::new_cuda(0).map_err(|e| DeviceError::CudaUnavailable(e.to_string()))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda() -> Result<Device, DeviceError> {
    Err(DeviceError::CudaNotBuilt)
}

/// A short name for logs and metrics.
pub fn name(device: &Device) -> &'static str {
    match device {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Metal(_) => "metal",
    }
}

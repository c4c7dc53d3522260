//! Where a model runs (the workers' `--device`), and a GPU's memory.

use candle_core::Device;

use super::ModelError;

/// Where the forward pass runs (the workers' `--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDevice {
    /// The host's cores, through the engine's own quantized kernels
    /// ([`Llama`](super::Llama) itself).
    #[default]
    Cpu,
    /// CUDA GPU `n`, through candle ([`DeviceLlama`](super::DeviceLlama); the `cuda` feature).
    Cuda(usize),
}

impl std::str::FromStr for ComputeDevice {
    type Err = String;

    /// `cpu`, `cuda` (GPU 0) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device {s:?} (use cpu, cuda or cuda:N)")),
        }
    }
}

impl std::fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl ComputeDevice {
    /// The candle device, or why it cannot be had (no GPU `n`, or a build
    /// without the `cuda` feature).
    pub fn candle(self) -> Result<Device, ModelError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(_) if !cfg!(feature = "cuda") => Err(no_cuda(self)),
            // A stream of its own rather than candle's default per-thread
            // stream: a model is built on one thread and stepped on another,
            // and every op on the device must queue in the order it is issued.
            Self::Cuda(n) => Device::new_cuda_with_stream(n)
                .map_err(|e| ModelError::Device { device: self.to_string(), reason: e.to_string() }),
        }
    }

    /// The device of each of `world_size` tensor-parallel ranks: GPUs
    /// `0..world_size` for more than one rank on CUDA (which
    /// [`super::TensorParallel::on_devices`] requires of
    /// `cuda:0`), `self` for one rank.
    pub fn ranks(self, world_size: usize) -> Vec<ComputeDevice> {
        match self {
            Self::Cuda(_) if world_size > 1 => (0..world_size).map(Self::Cuda).collect(),
            device => vec![device; world_size],
        }
    }

    /// The GPU's memory now (after the model is loaded, the weights are in
    /// `total - free`); an error on the CPU or in a build without CUDA.
    pub fn gpu_memory(self) -> Result<GpuMemory, ModelError> {
        match self {
            Self::Cpu => Err(ModelError::Device { device: self.to_string(), reason: "not a GPU".into() }),
            Self::Cuda(n) => gpu_memory(n),
        }
    }
}

/// A GPU's memory as its driver reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuMemory {
    /// Bytes not allocated by any process.
    pub free: u64,
    /// The GPU's bytes in all.
    pub total: u64,
}

/// GPU `n`'s memory, from its driver.
#[cfg(feature = "cuda")]
fn gpu_memory(n: usize) -> Result<GpuMemory, ModelError> {
    let (free, total) = cudarc::driver::CudaContext::new(n)
        .and_then(|ctx| ctx.mem_get_info())
        .map_err(|e| ModelError::Device { device: ComputeDevice::Cuda(n).to_string(), reason: format!("{e:?}") })?;
    Ok(GpuMemory { free: free as u64, total: total as u64 })
}

#[cfg(not(feature = "cuda"))]
fn gpu_memory(n: usize) -> Result<GpuMemory, ModelError> {
    Err(no_cuda(ComputeDevice::Cuda(n)))
}

/// Whether GPU `n` runs candle's bf16 kernels (built for compute capability
/// 8.0 and later only). A GPU that cannot be queried fails when the model is
/// copied to it, with its own error.
#[cfg(feature = "cuda")]
pub(super) fn has_bf16(n: usize) -> bool {
    cudarc::driver::CudaContext::new(n).and_then(|ctx| ctx.compute_capability()).map_or(true, |(major, _)| major >= 8)
}

#[cfg(not(feature = "cuda"))]
pub(super) fn has_bf16(_: usize) -> bool {
    true
}

/// Why `device` cannot be had in a build without the `cuda` feature.
pub(crate) fn no_cuda(device: ComputeDevice) -> ModelError {
    ModelError::Device {
        device: device.to_string(),
        reason: "this build has no CUDA support (build with --features cuda)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print_as_the_flag_takes_them() {
        assert_eq!("cpu".parse(), Ok(ComputeDevice::Cpu));
        assert_eq!("CUDA".parse(), Ok(ComputeDevice::Cuda(0)));
        assert_eq!("cuda:2".parse(), Ok(ComputeDevice::Cuda(2)));
        for bad in ["gpu", "cuda:", "cuda:-1", "cuda2"] {
            let err = bad.parse::<ComputeDevice>().unwrap_err();
            assert!(err.contains(bad) && err.contains("cuda:N"), "{err}");
        }
        assert_eq!(ComputeDevice::Cuda(1).to_string(), "cuda:1");
        assert!(matches!(ComputeDevice::Cpu.candle(), Ok(Device::Cpu)));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_gpu_without_the_cuda_feature_is_refused_in_one_line() {
        let err = ComputeDevice::Cuda(0).candle().unwrap_err().to_string();
        assert_eq!(err, "device cuda:0: this build has no CUDA support (build with --features cuda)");
        let err = ComputeDevice::Cuda(1).gpu_memory().unwrap_err().to_string();
        assert_eq!(err, "device cuda:1: this build has no CUDA support (build with --features cuda)");
        assert!(ComputeDevice::Cpu.gpu_memory().is_err());
    }
}

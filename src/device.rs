//! Choosing the device, the compute dtype and the head's dtype ([`LoadOptions`]).

use candle_core::utils::cuda_is_available;
use candle_core::{bail, DType, Device, DeviceLocation, Error, Result};

/// `cpu` forces the CPU; `cuda_ordinal` asks for that GPU (an error when the build has no CUDA
/// or the GPU cannot be opened); neither picks GPU 0 when the build and the machine have one.
pub fn device(cpu: bool, cuda_ordinal: Option<usize>) -> Result<Device> {
    if cpu {
        return Ok(Device::Cpu);
    }
    match cuda_ordinal {
        Some(n) => {
            if !cuda_is_available() {
                bail!("this build has no CUDA support; rebuild with --features cuda")
            }
            Device::new_cuda(n)
                .map_err(|e| Error::Msg(format!("CUDA device {n} is not available: {e}")))
        }
        // A CUDA build on a machine without a usable GPU still runs, on the CPU.
        None if cuda_is_available() => Ok(Device::new_cuda(0).unwrap_or(Device::Cpu)),
        None => Ok(Device::Cpu),
    }
}

/// The dtype norms, embeddings and activations run in: BF16 on CUDA (the checkpoint's dtype,
/// what the kernels are written for), F32 on the CPU (exact reference arithmetic).
pub fn compute_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

/// `cpu`, `cuda:0`, `metal:0`.
pub fn describe(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// How to load a model: where, in which dtype, and the head's precision.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Norms, embeddings and activations; `None` picks [`crate::device::compute_dtype`].
    pub dtype: Option<DType>,
    pub head: HeadDtype,
}

/// The precision of the embedding and LM head (the largest matrix a decoded token reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeadDtype {
    /// bf16 when the checkpoint stores bf16 and the CPU computes in f32 (exact: bf16 holds
    /// those values, and the head streams half the bytes); otherwise the compute dtype.
    #[default]
    Auto,
    /// The compute dtype.
    Compute,
}

impl LoadOptions {
    pub fn new(device: &Device) -> Self {
        Self {
            device: device.clone(),
            dtype: None,
            head: HeadDtype::Auto,
        }
    }

    pub fn compute_dtype(&self) -> DType {
        self.dtype.unwrap_or_else(|| compute_dtype(&self.device))
    }

    /// The dtype to hold the embedding and head in, given the dtype they are stored in.
    pub fn head_dtype(&self, stored: DType) -> DType {
        let compute = self.compute_dtype();
        match self.head {
            HeadDtype::Auto
                if self.device.is_cpu() && compute == DType::F32 && stored == DType::BF16 =>
            {
                DType::BF16
            }
            HeadDtype::Auto | HeadDtype::Compute => compute,
        }
    }
}

//! Choosing the device and the compute dtype.

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

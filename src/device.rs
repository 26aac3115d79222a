//! Choosing the device, the compute dtype and the head's dtype ([`LoadOptions`]).

use candle_core::utils::cuda_is_available;
use candle_core::{bail, DType, Device, DeviceLocation, Error, Result};

/// `cpu` forces the CPU; `cuda_ordinal` asks for that GPU (an error when the build has no CUDA
/// or the GPU cannot be opened); neither picks GPU 0 when the build and the machine have one.
/// A GPU opened here is set up for decoding on one stream ([`for_decoding`]).
pub fn device(cpu: bool, cuda_ordinal: Option<usize>) -> Result<Device> {
    if cpu {
        return Ok(Device::Cpu);
    }
    match cuda_ordinal {
        Some(n) => {
            if !cuda_is_available() {
                bail!("this build has no CUDA support; rebuild with --features cuda")
            }
            let dev = Device::new_cuda(n)
                .map_err(|e| Error::Msg(format!("CUDA device {n} is not available: {e}")))?;
            for_decoding(dev)
        }
        // A CUDA build on a machine without a usable GPU still runs, on the CPU.
        None if cuda_is_available() => match Device::new_cuda(0) {
            Ok(dev) => for_decoding(dev),
            Err(_) => Ok(Device::Cpu),
        },
        None => Ok(Device::Cpu),
    }
}

/// Sets up a GPU for a decode loop that allocates every step's buffers anew on candle's one
/// stream: freed memory stays in the device's pool for the next step (by default the pool
/// returns it to the driver at every synchronization, i.e. every token, and the next step
/// maps it again), and no CUDA events are recorded per allocation (they order several
/// streams; nothing here uses another). Call it before loading, on a device that runs nothing
/// on other streams. Other devices are returned as they are.
pub fn for_decoding(dev: Device) -> Result<Device> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = &dev {
        use candle_core::cuda_backend::cudarc::driver::result::{device as driver, mem_pool};
        use candle_core::cuda_backend::cudarc::driver::sys;
        let stream = cuda.cuda_stream();
        let ctx = stream.context();
        let mut keep_everything = u64::MAX;
        // SAFETY: the context is bound to this thread first; the pool is the default pool of
        // this context's device; RELEASE_THRESHOLD takes a u64 (cuMemPoolSetAttribute). The
        // event tracking is turned off before any tensor of this crate exists, and the crate
        // runs on the one stream candle gives the device.
        unsafe {
            ctx.bind_to_thread().map_err(Error::wrap)?;
            let kept = driver::get_default_mem_pool(ctx.cu_device()).and_then(|pool| {
                mem_pool::set_attribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut keep_everything as *mut u64).cast(),
                )
            });
            // Only a speed matter: the GPU works either way.
            if let Err(e) = kept {
                tracing::warn!("CUDA memory pool keeps nothing between steps: {e}");
            }
            cuda.disable_event_tracking();
        }
    }
    Ok(dev)
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
    describe_location(&device.location())
}

fn describe_location(location: &DeviceLocation) -> String {
    match *location {
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
    pub kv: KvDtype,
}

/// The precision of a CPU sequence's KV cache, which a decode step reads whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// f32, exact: the attention of the reference implementation computing in f32.
    #[default]
    F32,
    /// Opt-in, CPU only: keys and values rounded to f16 as they are cached (as llama.cpp's
    /// default cache): half the cache's memory and the bytes attention reads per decoded
    /// token, at a small cost in logits (measured on the fixture in the README).
    F16,
}

impl KvDtype {
    /// An error naming the problem when this cache cannot hold a model on a device at
    /// `location`: f16 caches are the CPU attention's.
    pub fn check_device(self, location: &DeviceLocation) -> crate::Result<()> {
        match (self, location) {
            (Self::F32, _) | (Self::F16, DeviceLocation::Cpu) => Ok(()),
            (Self::F16, _) => Err(crate::Error::input(format!(
                "the f16 KV cache runs on the CPU only, and the model is on {}: \
                 use the default cache there (--kv-dtype f32), or the CPU (--cpu)",
                describe_location(location)
            ))),
        }
    }
}

/// The precision of the embedding and LM head (the largest matrix a decoded token reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeadDtype {
    /// bf16 when the checkpoint stores bf16 and the CPU computes in f32 (exact: bf16 holds
    /// those values, and the head streams half the bytes; on CPUs with AVX-512 it is stored
    /// losslessly in 12 bits a weight, [`crate::ops::cpu::CompactBf16Head`]); otherwise the
    /// compute dtype.
    #[default]
    Auto,
    /// The compute dtype.
    Compute,
    /// Opt-in, CPU only: the LM head quantized per row to int8 ([`crate::ops::Int8Head`]),
    /// half the bytes of the bf16 head per decoded token, at a small cost in logits (measured
    /// on the fixture in the README). The embedding lookup stays exact, held as with `Auto`, so
    /// a tied head keeps that matrix too: at 2B-4T 657 MB of bf16 embedding (492 MB compact)
    /// plus 329 MB of int8 head. An untied head's float matrix is not kept.
    Int8,
}

impl HeadDtype {
    /// An error naming the problem when this head cannot run on a device at `location`: the
    /// int8 head has CPU kernels only.
    pub fn check_device(self, location: &DeviceLocation) -> crate::Result<()> {
        match (self, location) {
            (Self::Int8, DeviceLocation::Cpu) | (Self::Auto | Self::Compute, _) => Ok(()),
            (Self::Int8, _) => Err(crate::Error::input(format!(
                "the int8 LM head runs on the CPU only, and the model is on {}: \
                 use the default head there (--head auto), or the CPU (--cpu)",
                describe_location(location)
            ))),
        }
    }
}

impl LoadOptions {
    pub fn new(device: &Device) -> Self {
        Self {
            device: device.clone(),
            dtype: None,
            head: HeadDtype::Auto,
            kv: KvDtype::F32,
        }
    }

    pub fn compute_dtype(&self) -> DType {
        self.dtype.unwrap_or_else(|| compute_dtype(&self.device))
    }

    /// The dtype to hold the embedding and a float head in, given the dtype they are stored in
    /// (an [`HeadDtype::Int8`] head is quantized from that).
    pub fn head_dtype(&self, stored: DType) -> DType {
        let compute = self.compute_dtype();
        match self.head {
            HeadDtype::Auto | HeadDtype::Int8
                if self.device.is_cpu() && compute == DType::F32 && stored == DType::BF16 =>
            {
                DType::BF16
            }
            HeadDtype::Auto | HeadDtype::Compute | HeadDtype::Int8 => compute,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn int8_head_on_a_gpu_is_an_input_error_naming_the_device() {
        for location in [
            DeviceLocation::Cuda { gpu_id: 1 },
            DeviceLocation::Metal { gpu_id: 0 },
        ] {
            let err = HeadDtype::Int8.check_device(&location).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Input);
            let msg = err.to_string();
            assert!(
                msg.contains("int8 LM head runs on the CPU only")
                    && msg.contains(&describe_location(&location)),
                "{msg}"
            );
        }
    }

    #[test]
    fn f16_kv_cache_on_a_gpu_is_an_input_error_naming_the_device() {
        let location = DeviceLocation::Cuda { gpu_id: 2 };
        let err = KvDtype::F16.check_device(&location).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Input);
        let msg = err.to_string();
        assert!(
            msg.contains("f16 KV cache runs on the CPU only") && msg.contains("cuda:2"),
            "{msg}"
        );
        assert!(KvDtype::F16.check_device(&DeviceLocation::Cpu).is_ok());
        assert!(KvDtype::F32.check_device(&location).is_ok());
    }

    #[test]
    fn every_head_runs_on_the_cpu_and_float_heads_anywhere() {
        let cuda = DeviceLocation::Cuda { gpu_id: 0 };
        for head in [HeadDtype::Auto, HeadDtype::Compute, HeadDtype::Int8] {
            assert!(head.check_device(&DeviceLocation::Cpu).is_ok(), "{head:?}");
        }
        for head in [HeadDtype::Auto, HeadDtype::Compute] {
            assert!(head.check_device(&cuda).is_ok(), "{head:?}");
        }
    }

    #[test]
    fn int8_head_keeps_the_embedding_as_auto_does() {
        let opts = |head| LoadOptions {
            head,
            ..LoadOptions::new(&Device::Cpu)
        };
        for stored in [DType::BF16, DType::F32] {
            assert_eq!(
                opts(HeadDtype::Int8).head_dtype(stored),
                opts(HeadDtype::Auto).head_dtype(stored)
            );
        }
        assert_eq!(opts(HeadDtype::Int8).head_dtype(DType::BF16), DType::BF16);
    }
}

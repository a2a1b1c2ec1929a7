//! The GPU's memory as the engine plans with it: how much is free now (other programs, a
//! game above all, use the same card), and the allocator's pool, held through a job and
//! given back after it.
//!
//! candle allocates on CUDA from the device's stream-ordered pool (`cuMemAllocAsync`). With
//! the pool's default release threshold of 0 every synchronisation hands freed memory back
//! to the driver, and the next step asks for it again. During a job the threshold is raised
//! so freed blocks stay for reuse; after it the pool is trimmed and the threshold lowered, so
//! an idle worker holds only its loaded weights. On Metal and the CPU there is nothing to
//! ask or hold: the engine plans with the machine's available RAM there.

use candle_core::Device;

/// Bytes of the GPU's memory free now; `None` where the device cannot say (CPU, Metal, or
/// a failed query), and the caller plans with what it knows otherwise.
pub fn free_bytes(device: &Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda_pool::free_bytes(cuda),
        _ => None,
    }
}

/// The GPU's name and total memory in bytes, from its driver (`None` off CUDA or when the
/// driver does not say).
pub fn name_and_total(device: &Device) -> Option<(String, u64)> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda_pool::name_and_total(cuda),
        _ => None,
    }
}

/// Keeps the allocator's freed memory pooled until dropped, then gives it back.
#[must_use = "the pool is given back when this is dropped"]
pub struct PoolHold {
    /// The device whose pool is held (`None`: nothing was).
    held: Option<Device>,
}

/// Holds `device`'s pool for the length of a job.
pub fn hold_pool(device: &Device) -> PoolHold {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            cuda_pool::set_release_threshold(cuda, u64::MAX);
            PoolHold {
                held: Some(device.clone()),
            }
        }
        _ => PoolHold { held: None },
    }
}

impl Drop for PoolHold {
    fn drop(&mut self) {
        if let Some(device) = &self.held {
            give_back(device);
        }
    }
}

/// Waits for `device`, then hands the memory its pool holds unused back to the driver (and
/// lowers the pool's release threshold back to 0): after a job, and after unloading models,
/// so that what a game sees free is what the worker does not use.
pub fn give_back(device: &Device) {
    #[cfg(feature = "cuda")]
    when_idle(device, cuda_pool::give_back);
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

/// Hands the memory `device`'s pool holds unused back to the driver now, the pool still held
/// (its release threshold as it is): before a CUDA graph allocates from a pool of its own, and
/// before a decode that would not fit beside the steps' freed memory (the pool may not fit
/// the decode's larger buffers into the steps' smaller freed ones).
pub fn trim_pool(device: &Device) {
    #[cfg(feature = "cuda")]
    when_idle(device, cuda_pool::trim);
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

/// Hands the memory the driver keeps for CUDA graphs on `device` back, once no graph needs
/// it (graphs allocate from a pool of their own, which outlives them).
pub fn trim_graph_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    when_idle(device, cuda_pool::trim_graph_memory);
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

/// The most memory the GPU held for a stretch of a job: handed out by the allocator's pool
/// (the loaded weights included), reserved by that pool from the driver, and reserved by the
/// pool CUDA graphs allocate from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolPeaks {
    pub used: u64,
    pub reserved: u64,
    pub graphs_reserved: u64,
}

impl std::fmt::Display for PoolPeaks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} in use ({} reserved, {} for graphs)",
            crate::human::bytes(self.used),
            crate::human::bytes(self.reserved),
            crate::human::bytes(self.graphs_reserved)
        )
    }
}

/// `device`'s pools' high-water marks since the last call, each reset to what it holds now
/// for the next stretch; `None` off CUDA or where the driver does not say. The pool counts an
/// allocation when it is asked for, not when the GPU reaches it, so nothing waits for the
/// device: a stretch ends when its last work is issued. Set against the weights and the
/// working-memory estimate, these say how close the estimate is and what the pool adds
/// beyond what is in use (`benches/gpu` reads them from the debug log).
pub fn take_pool_peaks(device: &Device) -> Option<PoolPeaks> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda_pool::take_peaks(cuda),
        _ => None,
    }
}

/// On a CUDA `device`: waits for it, then runs `then` (nothing is in flight). Elsewhere
/// nothing.
#[cfg(feature = "cuda")]
fn when_idle(device: &Device, then: fn(&candle_core::CudaDevice)) {
    if let Device::Cuda(cuda) = device {
        if let Err(error) = device.synchronize() {
            tracing::warn!("the GPU did not finish its work: {error}");
        }
        then(cuda);
    }
}

#[cfg(feature = "cuda")]
mod cuda_pool {
    use candle_core::CudaDevice;
    use candle_core::cuda_backend::cudarc::driver::{result, sys};

    pub fn free_bytes(cuda: &CudaDevice) -> Option<u64> {
        match cuda.cuda_stream().context().mem_get_info() {
            Ok((free, _total)) => Some(free as u64),
            Err(error) => {
                tracing::warn!("cannot read the GPU's free memory: {error}");
                None
            }
        }
    }

    pub fn name_and_total(cuda: &CudaDevice) -> Option<(String, u64)> {
        let stream = cuda.cuda_stream();
        let context = stream.context();
        match (context.name(), context.total_mem()) {
            (Ok(name), Ok(total)) => Some((name, total as u64)),
            (Err(error), _) | (_, Err(error)) => {
                tracing::warn!("the GPU's driver did not name it or its memory: {error}");
                None
            }
        }
    }

    /// The device's default pool (the one `cuMemAllocAsync` draws from), its context bound.
    fn default_pool(cuda: &CudaDevice) -> Option<sys::CUmemoryPool> {
        let stream = cuda.cuda_stream();
        let context = stream.context();
        if !context.has_async_alloc() {
            return None; // plain cuMemAlloc: no pool to hold or trim
        }
        if let Err(error) = context.bind_to_thread() {
            tracing::warn!("cannot reach the GPU's memory pool: {error}");
            return None;
        }
        // SAFETY: the device handle comes from a live context, as the call requires.
        match unsafe { result::device::get_mem_pool(context.cu_device()) } {
            Ok(pool) => Some(pool),
            Err(error) => {
                tracing::warn!("cannot reach the GPU's memory pool: {error}");
                None
            }
        }
    }

    pub fn set_release_threshold(cuda: &CudaDevice, bytes: u64) {
        let Some(pool) = default_pool(cuda) else {
            return;
        };
        let mut value = bytes;
        // SAFETY: the pool is the device's live default pool; the release threshold
        // attribute is a cuuint64_t, which `value` is.
        let set = unsafe {
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&raw mut value).cast(),
            )
        };
        if let Err(error) = set {
            tracing::debug!("the GPU pool's release threshold stays as it was: {error}");
        }
    }

    /// Lowers the threshold back to 0 and trims the pool empty (the device is idle).
    pub fn give_back(cuda: &CudaDevice) {
        set_release_threshold(cuda, 0);
        trim(cuda);
    }

    /// Trims the pool of what it holds unused.
    pub fn trim(cuda: &CudaDevice) {
        let Some(pool) = default_pool(cuda) else {
            return;
        };
        // SAFETY: the device's live default pool; nothing is in flight after the caller's
        // sync.
        if let Err(error) = unsafe { result::mem_pool::trim_to(pool, 0) } {
            tracing::debug!("the GPU pool was not trimmed: {error}");
        }
    }

    /// The high-water marks, each reset after it is read.
    pub fn take_peaks(cuda: &CudaDevice) -> Option<super::PoolPeaks> {
        let pool = default_pool(cuda)?;
        let pool_mark = |attribute| -> Result<u64, result::DriverError> {
            let mut value = 0u64;
            // SAFETY: the device's live default pool (its context bound by `default_pool`);
            // both attributes are cuuint64_t, which `value` is, and a high-water mark is
            // reset by setting it to 0.
            unsafe {
                result::mem_pool::get_attribute(pool, attribute, (&raw mut value).cast())?;
                let mut zero = 0u64;
                result::mem_pool::set_attribute(pool, attribute, (&raw mut zero).cast())?;
            }
            Ok(value)
        };
        let graph_mark = |attribute| -> Result<u64, result::DriverError> {
            let device = cuda.cuda_stream().context().cu_device();
            let mut value = 0u64;
            // SAFETY: as above, for the device's graph memory (cuuint64_t attributes).
            unsafe {
                sys::cuDeviceGetGraphMemAttribute(device, attribute, (&raw mut value).cast())
                    .result()?;
                let mut zero = 0u64;
                sys::cuDeviceSetGraphMemAttribute(device, attribute, (&raw mut zero).cast())
                    .result()?;
            }
            Ok(value)
        };
        let peaks = (|| {
            Ok::<_, result::DriverError>(super::PoolPeaks {
                used: pool_mark(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
                reserved: pool_mark(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
                graphs_reserved: graph_mark(
                    sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_RESERVED_MEM_HIGH,
                )?,
            })
        })();
        match peaks {
            Ok(peaks) => Some(peaks),
            Err(error) => {
                tracing::debug!("the GPU's pools did not say what they held: {error}");
                None
            }
        }
    }

    /// Gives back what the driver keeps for graphs on the device.
    pub fn trim_graph_memory(cuda: &CudaDevice) {
        let stream = cuda.cuda_stream();
        let context = stream.context();
        if let Err(error) = context.bind_to_thread() {
            tracing::debug!("the GPU's graph memory was not trimmed: {error}");
            return;
        }
        // SAFETY: the device handle comes from a live context, bound to this thread.
        let trimmed = unsafe { sys::cuDeviceGraphMemTrim(context.cu_device()) };
        if trimmed != sys::CUresult::CUDA_SUCCESS {
            tracing::debug!("the GPU's graph memory was not trimmed: {trimmed:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_read_as_the_gpu_bench_parses_them_and_the_cpu_has_none() {
        let peaks = PoolPeaks {
            used: 3_100_000_000,
            reserved: 3_200_000_000,
            graphs_reserved: 40_000_000,
        };
        // benches/gpu/bench.py's `--check-here` parses this same text (`pool_peaks`).
        assert_eq!(
            peaks.to_string(),
            "3.10 GB in use (3.20 GB reserved, 40.0 MB for graphs)"
        );
        assert_eq!(take_pool_peaks(&Device::Cpu), None);
    }
}

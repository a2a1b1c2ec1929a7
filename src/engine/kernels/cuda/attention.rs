//! The attention kernels on a CUDA device: the register kernel (`attention_mma.cu`) where the
//! head allows and it passed its check, else the WMMA kernel (`attention.cu`) with its tiling
//! for the device's shared memory; their launches, and their checks against the CPU
//! reference.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use candle_core::cuda_backend::cudarc::driver::{
    CudaModule, CudaSlice, LaunchConfig, PushKernelArg,
};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor,
};

use super::{Family, as_u32, checked_module, view, within_tolerance};
use crate::engine::kernels::attention::{self as op, Geometry, Tiling};
use crate::engine::kernels::race::Timing;

/// The dynamic shared memory a block may have on `device` (with the opt-in beyond 48 KB).
pub(in crate::engine::kernels) fn max_shared_bytes(device: &CudaDevice) -> Result<usize> {
    let bytes = device
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .w()?;
    Ok(usize::try_from(bytes).unwrap_or(0))
}

/// Whether our kernel runs on `device` (loaded and checked there).
pub(in crate::engine::kernels) fn attention_runs_on(device: &CudaDevice) -> bool {
    checked_module(device, Family::Attention).is_some()
}

/// Which of our kernels a call runs.
#[derive(Clone, Copy, Debug)]
enum Kernel {
    /// `attention_mma.cu`'s `attention_mma_f16_k<steps>`.
    Registers { steps: usize },
    /// `attention.cu`'s `attention_f16`, tiled so.
    Wmma(Tiling),
}

/// Our kernel for this call, or `None` where it does not run (not f16, not loaded or not
/// checked on this device, a head too wide for its shared memory).
pub(in crate::engine::kernels) fn attention(
    device: &CudaDevice,
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    geometry: Geometry,
    scale: f64,
) -> Result<Option<Tensor>> {
    if query.dtype() != DType::F16 {
        return Ok(None);
    }
    let [query, key, value] = [query, key, value].map(Tensor::contiguous);
    let inputs = [query?, key?, value?];
    // The register kernel copies K and V 16 bytes at a time: views that start on a multiple
    // of 8 values (its heads are multiples of 8, so every row then starts on one too).
    let aligned = inputs
        .iter()
        .all(|tensor| tensor.layout().start_offset().is_multiple_of(8));
    if let Some(steps) = op::mma_steps(geometry.head_dim)
        && aligned
        && let Some(module) = checked_module(device, Family::AttentionMma)
    {
        let kernel = Kernel::Registers { steps };
        return run(module, kernel, &inputs, geometry, scale).map(Some);
    }
    let Some(module) = checked_module(device, Family::Attention) else {
        return Ok(None);
    };
    let Some(tiling) = Tiling::for_head_dim(geometry.head_dim, max_shared_bytes(device)?) else {
        return Ok(None);
    };
    run(module, Kernel::Wmma(tiling), &inputs, geometry, scale).map(Some)
}

/// `inputs` contiguous (the kernel's views refuse anything else).
fn run(
    module: Arc<CudaModule>,
    kernel: Kernel,
    [query, key, value]: &[Tensor; 3],
    geometry: Geometry,
    scale: f64,
) -> Result<Tensor> {
    let op = AttentionOp {
        module,
        kernel,
        geometry,
        scale,
    };
    query.apply_op3_no_bwd(key, value, &op)
}

/// `kernel` against [`op::reference`] on `cases`, on `device`.
fn check_on(
    device: &CudaDevice,
    module: &Arc<CudaModule>,
    cases: &[(Geometry, f32)],
    kernels: impl Fn(Geometry) -> Vec<Kernel>,
) -> std::result::Result<(), String> {
    let gpu = Device::Cuda(device.clone());
    for &(geometry, spread) in cases {
        let inputs = op::inputs(geometry, spread).map_err(|error| error.to_string())?;
        let [query, key, value] = &inputs;
        let scale = (geometry.head_dim as f64).powf(-0.5);
        let expected = op::reference(query, key, value, geometry.heads, scale)
            .map_err(|error| error.to_string())?;
        let [query, key, value] = inputs.each_ref().map(|tensor| tensor.to_device(&gpu));
        let on_gpu = [
            query.map_err(|error| error.to_string())?,
            key.map_err(|error| error.to_string())?,
            value.map_err(|error| error.to_string())?,
        ];
        for kernel in kernels(geometry) {
            let difference = run(module.clone(), kernel, &on_gpu, geometry, scale)
                .and_then(|got| {
                    crate::engine::kernels::largest_relative_difference(&got, &expected)
                })
                .map_err(|error| format!("{geometry:?} with {kernel:?}: {error}"))?;
            within_tolerance(
                format_args!("{geometry:?} with {kernel:?}"),
                difference,
                op::TOLERANCE,
            )?;
        }
    }
    Ok(())
}

/// The WMMA kernel against [`op::reference`] on [`op::CHECK_CASES`], with every tiling this
/// device has room for (so whichever a head dim gets has been checked).
pub(super) fn check(
    device: &CudaDevice,
    module: &Arc<CudaModule>,
) -> std::result::Result<(), String> {
    let max_shared = max_shared_bytes(device).map_err(|error| error.to_string())?;
    check_on(device, module, &op::CHECK_CASES, |geometry| {
        Tiling::CHOICES
            .into_iter()
            .filter(|tiling| tiling.shared_bytes(geometry.head_dim) <= max_shared)
            .map(Kernel::Wmma)
            .collect()
    })
}

/// The register kernel against [`op::reference`] on [`op::MMA_CHECK_CASES`].
pub(super) fn check_mma(
    device: &CudaDevice,
    module: &Arc<CudaModule>,
) -> std::result::Result<(), String> {
    check_on(device, module, &op::MMA_CHECK_CASES, |geometry| {
        op::mma_steps(geometry.head_dim)
            .map(|steps| Kernel::Registers { steps })
            .into_iter()
            .collect()
    })
}

/// The register kernel (`registers`) against the WMMA kernel (`wmma`) on `device`, at the
/// first UNet level of SD 1.5 (heads of 40) and of SD 2.x / SDXL (heads of 64), 4096 tokens,
/// one image (a guided job's two run the same blocks twice as often; one keeps the race
/// short on a slow card): one call of each geometry per side.
pub(super) fn race_registers(
    device: &CudaDevice,
    registers: &Arc<CudaModule>,
    wmma: &Arc<CudaModule>,
    clock: super::race::Clock,
    finish: super::race::Finish,
) -> Result<Timing> {
    let gpu = Device::Cuda(device.clone());
    let max_shared = max_shared_bytes(device)?;
    let mut cases = Vec::new();
    for (width, heads) in [(320, 8), (640, 10)] {
        let geometry = Geometry {
            batch: 1,
            heads,
            queries: 4096,
            keys: 4096,
            head_dim: width / heads,
        };
        let (Some(steps), Some(tiling)) = (
            op::mma_steps(geometry.head_dim),
            Tiling::for_head_dim(geometry.head_dim, max_shared),
        ) else {
            candle_core::bail!("no kernel for heads of {}", geometry.head_dim);
        };
        let random = || {
            Tensor::randn(0f32, 1.0, (geometry.batch, geometry.queries, width), &gpu)?
                .to_dtype(DType::F16)
        };
        let inputs = [random()?, random()?, random()?];
        cases.push((geometry, steps, tiling, inputs));
    }
    let all = |ours: bool| {
        for (geometry, steps, tiling, inputs) in &cases {
            let (module, kernel) = if ours {
                (registers, Kernel::Registers { steps: *steps })
            } else {
                (wmma, Kernel::Wmma(*tiling))
            };
            let scale = (geometry.head_dim as f64).powf(-0.5);
            drop(run(module.clone(), kernel, inputs, *geometry, scale)?);
        }
        Ok(())
    };
    Timing::measure(clock, finish, &|| all(true), &|| all(false))
}

struct AttentionOp {
    module: Arc<CudaModule>,
    kernel: Kernel,
    geometry: Geometry,
    scale: f64,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("our attention kernel runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        query: &CudaStorage,
        query_layout: &Layout,
        key: &CudaStorage,
        key_layout: &Layout,
        value: &CudaStorage,
        value_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let Geometry {
            batch,
            heads,
            queries,
            keys,
            head_dim,
        } = self.geometry;
        if query_layout.dims() != [batch, queries, heads * head_dim] {
            candle_core::bail!("attention: the query is not {:?}", self.geometry);
        }
        let device = query.device().clone();
        let query_view = view::<half::f16>((query, query_layout))?;
        let key_view = view::<half::f16>((key, key_layout))?;
        let value_view = view::<half::f16>((value, value_layout))?;
        if key_view.len() != batch * keys * heads * head_dim || value_view.len() != key_view.len() {
            candle_core::bail!("attention: key or value is not {:?}", self.geometry);
        }
        let layouts = [query_layout, key_layout, value_layout];
        let starting_on = |values: usize| {
            layouts
                .iter()
                .all(|layout| layout.start_offset().is_multiple_of(values))
        };

        let (function, config) = match self.kernel {
            Kernel::Registers { steps } => {
                if !starting_on(8) || !head_dim.is_multiple_of(8) {
                    candle_core::bail!(
                        "attention: the register kernel needs heads and views on multiples of 8"
                    );
                }
                let function = self
                    .module
                    .load_function(&format!("attention_mma_f16_k{steps}"))
                    .w()?;
                let config = LaunchConfig {
                    grid_dim: (
                        as_u32(queries.div_ceil(op::MMA_QUERY_ROWS))?,
                        as_u32(batch * heads)?,
                        1,
                    ),
                    block_dim: (as_u32(op::MMA_THREADS)?, 1, 1),
                    shared_mem_bytes: 0,
                };
                (function, config)
            }
            Kernel::Wmma(tiling) => {
                let function = self.module.load_function("attention_f16").w()?;
                let shared_bytes = tiling.shared_bytes(head_dim);
                // Beyond 48 KB a kernel must opt in to its dynamic shared memory.
                function
                    .set_attribute(
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        i32::try_from(shared_bytes).unwrap_or(i32::MAX),
                    )
                    .w()?;
                let config = LaunchConfig {
                    grid_dim: (
                        as_u32(queries.div_ceil(tiling.query_rows()))?,
                        as_u32(batch * heads)?,
                        1,
                    ),
                    block_dim: (32 * tiling.warps, 1, 1),
                    shared_mem_bytes: as_u32(shared_bytes)?,
                };
                (function, config)
            }
        };
        // SAFETY: the kernel writes every element (each query row of each head).
        let mut out: CudaSlice<half::f16> = unsafe { device.alloc::<half::f16>(query_view.len()) }?;
        let heads_arg = as_u32(heads)?;
        let queries_arg = as_u32(queries)?;
        let keys_arg = as_u32(keys)?;
        let head_dim_arg = as_u32(head_dim)?;
        let scale_log2 = (self.scale * std::f64::consts::LOG2_E) as f32;
        let stream = device.cuda_stream();
        let mut builder = stream.launch_builder(&function);
        builder
            .arg(&query_view)
            .arg(&key_view)
            .arg(&value_view)
            .arg(&mut out)
            .arg(&heads_arg)
            .arg(&queries_arg)
            .arg(&keys_arg)
            .arg(&head_dim_arg);
        // The WMMA kernel's tail: its key tile, the scale, and whether it may copy 16 bytes at
        // a time: head dims that are multiples of 8 (all of SD's) and views that start on
        // one. (Allocations are 256-byte aligned.)
        let key_tile_arg;
        let vectors_arg;
        match self.kernel {
            Kernel::Registers { .. } => {
                builder.arg(&scale_log2);
            }
            Kernel::Wmma(tiling) => {
                key_tile_arg = tiling.key_tile;
                vectors_arg = u32::from(head_dim.is_multiple_of(8) && starting_on(8));
                builder
                    .arg(&key_tile_arg)
                    .arg(&scale_log2)
                    .arg(&vectors_arg);
            }
        }
        // SAFETY: the arguments match the kernel's signature (`attention_mma_f16_k*`: q, k, v,
        // out, heads, queries, keys, head_dim, scale_log2; `attention_f16` with the key tile
        // before the scale and the vector flag after it); the views hold the geometry's
        // elements (checked above), start where the kernel's loads need; the grid covers
        // every query row of every (image, head) and the shared memory is what the kernel's
        // layout needs.
        unsafe { builder.launch(config) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            query_layout.shape().clone(),
        ))
    }
}

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

use super::{Family, as_u32, checked_module, view};
use crate::engine::kernels::attention::{self as op, Geometry, Tiling};

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
    if let Some(steps) = op::mma_steps(geometry.head_dim)
        && let Some(module) = checked_module(device, Family::AttentionMma)
    {
        let [query, key, value] = [query, key, value].map(Tensor::contiguous);
        let (query, key, value) = (query?, key?, value?);
        // Pairs of values are read 32 bits at a time: views that start on an even value.
        if [&query, &key, &value]
            .iter()
            .all(|tensor| tensor.layout().start_offset().is_multiple_of(2))
        {
            return run_mma(module, steps, &query, &key, &value, geometry, scale).map(Some);
        }
    }
    let Some(module) = checked_module(device, Family::Attention) else {
        return Ok(None);
    };
    let Some(tiling) = Tiling::for_head_dim(geometry.head_dim, max_shared_bytes(device)?) else {
        return Ok(None);
    };
    run(module, tiling, query, key, value, geometry, scale).map(Some)
}

fn run(
    module: Arc<CudaModule>,
    tiling: Tiling,
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    geometry: Geometry,
    scale: f64,
) -> Result<Tensor> {
    let op = AttentionOp {
        module,
        tiling,
        geometry,
        scale,
    };
    query
        .contiguous()?
        .apply_op3_no_bwd(&key.contiguous()?, &value.contiguous()?, &op)
}

/// Our kernel against [`op::reference`] on [`op::CHECK_CASES`], with every tiling this device
/// has room for (so whichever a head dim gets has been checked).
pub(super) fn check(
    device: &CudaDevice,
    module: &Arc<CudaModule>,
) -> std::result::Result<(), String> {
    let max_shared = max_shared_bytes(device).map_err(|error| error.to_string())?;
    let gpu = Device::Cuda(device.clone());
    for (geometry, spread) in op::CHECK_CASES {
        let inputs = op::inputs(geometry, spread).map_err(|error| error.to_string())?;
        let [query, key, value] = &inputs;
        let scale = (geometry.head_dim as f64).powf(-0.5);
        let expected = op::reference(query, key, value, geometry.heads, scale)
            .map_err(|error| error.to_string())?;
        let on_gpu = inputs
            .iter()
            .map(|tensor| tensor.to_device(&gpu))
            .collect::<Result<Vec<_>>>()
            .map_err(|error| error.to_string())?;
        for tiling in Tiling::CHOICES {
            if tiling.shared_bytes(geometry.head_dim) > max_shared {
                continue;
            }
            let difference = run(
                module.clone(),
                tiling,
                &on_gpu[0],
                &on_gpu[1],
                &on_gpu[2],
                geometry,
                scale,
            )
            .and_then(|got| crate::engine::kernels::largest_relative_difference(&got, &expected))
            .map_err(|error| format!("{geometry:?} with {tiling:?}: {error}"))?;
            if difference.is_nan() || difference > op::TOLERANCE {
                return Err(format!(
                    "{geometry:?} with {tiling:?}: {difference} from the CPU, relative (allowed \
                     {})",
                    op::TOLERANCE
                ));
            }
        }
    }
    Ok(())
}

fn run_mma(
    module: Arc<CudaModule>,
    steps: usize,
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    geometry: Geometry,
    scale: f64,
) -> Result<Tensor> {
    let op = MmaOp {
        module,
        steps,
        geometry,
        scale,
    };
    query
        .contiguous()?
        .apply_op3_no_bwd(&key.contiguous()?, &value.contiguous()?, &op)
}

/// The register kernel against [`op::reference`] on [`op::MMA_CHECK_CASES`].
pub(super) fn check_mma(
    device: &CudaDevice,
    module: &Arc<CudaModule>,
) -> std::result::Result<(), String> {
    let gpu = Device::Cuda(device.clone());
    for (geometry, spread) in op::MMA_CHECK_CASES {
        let Some(steps) = op::mma_steps(geometry.head_dim) else {
            return Err(format!("{geometry:?}: no register kernel for the head"));
        };
        let scale = (geometry.head_dim as f64).powf(-0.5);
        let difference = op::inputs(geometry, spread)
            .and_then(|[query, key, value]| {
                let expected = op::reference(&query, &key, &value, geometry.heads, scale)?;
                let [query, key, value] = [query, key, value].map(|tensor| tensor.to_device(&gpu));
                let got = run_mma(
                    module.clone(),
                    steps,
                    &query?,
                    &key?,
                    &value?,
                    geometry,
                    scale,
                )?;
                crate::engine::kernels::largest_relative_difference(&got, &expected)
            })
            .map_err(|error| format!("{geometry:?}: {error}"))?;
        if difference.is_nan() || difference > op::TOLERANCE {
            return Err(format!(
                "{geometry:?}: {difference} from the CPU, relative (allowed {})",
                op::TOLERANCE
            ));
        }
    }
    Ok(())
}

/// The register kernel's launch: `attention_mma_f16_k<steps>`.
struct MmaOp {
    module: Arc<CudaModule>,
    steps: usize,
    geometry: Geometry,
    scale: f64,
}

impl CustomOp3 for MmaOp {
    fn name(&self) -> &'static str {
        "attention-mma"
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
        if ![query_layout, key_layout, value_layout]
            .iter()
            .all(|layout| layout.start_offset().is_multiple_of(2))
        {
            candle_core::bail!("attention: a view starts on an odd value");
        }
        let device = query.device().clone();
        let query_view = view::<half::f16>((query, query_layout))?;
        let key_view = view::<half::f16>((key, key_layout))?;
        let value_view = view::<half::f16>((value, value_layout))?;
        if key_view.len() != batch * keys * heads * head_dim || value_view.len() != key_view.len() {
            candle_core::bail!("attention: key or value is not {:?}", self.geometry);
        }

        let function = self
            .module
            .load_function(&format!("attention_mma_f16_k{}", self.steps))
            .w()?;
        // SAFETY: the kernel writes every element (each query row of each head).
        let mut out: CudaSlice<half::f16> = unsafe { device.alloc::<half::f16>(query_view.len()) }?;
        let config = LaunchConfig {
            grid_dim: (
                as_u32(queries.div_ceil(op::MMA_QUERY_ROWS))?,
                as_u32(batch * heads)?,
                1,
            ),
            block_dim: (as_u32(op::MMA_THREADS)?, 1, 1),
            shared_mem_bytes: 0,
        };
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
            .arg(&head_dim_arg)
            .arg(&scale_log2);
        // SAFETY: the arguments match `attention_mma_f16_k*`'s signature; the views hold the
        // geometry's elements (checked above), start on even values (their pairs are read as
        // 32 bits); the grid covers every query row of every (image, head); the shared memory
        // is static.
        unsafe { builder.launch(config) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            query_layout.shape().clone(),
        ))
    }
}

struct AttentionOp {
    module: Arc<CudaModule>,
    tiling: Tiling,
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

        let function = self.module.load_function("attention_f16").w()?;
        let shared_bytes = self.tiling.shared_bytes(head_dim);
        // Beyond 48 KB a kernel must opt in to its dynamic shared memory.
        function
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                i32::try_from(shared_bytes).unwrap_or(i32::MAX),
            )
            .w()?;
        // SAFETY: the kernel writes every element (each query row of each head).
        let mut out: CudaSlice<half::f16> = unsafe { device.alloc::<half::f16>(query_view.len()) }?;
        let config = LaunchConfig {
            grid_dim: (
                as_u32(queries.div_ceil(self.tiling.query_rows()))?,
                as_u32(batch * heads)?,
                1,
            ),
            block_dim: (32 * self.tiling.warps, 1, 1),
            shared_mem_bytes: as_u32(shared_bytes)?,
        };
        let heads_arg = as_u32(heads)?;
        let queries_arg = as_u32(queries)?;
        let keys_arg = as_u32(keys)?;
        let head_dim_arg = as_u32(head_dim)?;
        let key_tile_arg = self.tiling.key_tile;
        let scale_log2 = (self.scale * std::f64::consts::LOG2_E) as f32;
        // 16-byte copies where every row starts on 8 values: head dims that are multiples
        // of 8 (all of SD's), views that start on one. (Allocations are 256-byte aligned.)
        let vectors_arg = u32::from(
            head_dim.is_multiple_of(8)
                && [query_layout, key_layout, value_layout]
                    .iter()
                    .all(|layout| layout.start_offset().is_multiple_of(8)),
        );
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
            .arg(&head_dim_arg)
            .arg(&key_tile_arg)
            .arg(&scale_log2)
            .arg(&vectors_arg);
        // SAFETY: the arguments match `attention_f16`'s signature; the views hold the
        // geometry's elements (checked above); the grid covers every query row of every
        // (image, head) and the shared memory is what the tiling's layout needs.
        unsafe { builder.launch(config) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            query_layout.shape().clone(),
        ))
    }
}

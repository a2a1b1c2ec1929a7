//! The GEGLU kernel (`geglu.cu`) on a CUDA device: its launch, and its check against the CPU
//! reference.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaModule, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor,
};

use super::{Family, as_u32, checked_module, view, within_tolerance};
use crate::engine::kernels::geglu as op;

/// Our kernel for this projection and bias, or `None` where it does not run (not f16 or f32,
/// not loaded or not checked on this device).
pub(in crate::engine::kernels) fn geglu(
    device: &CudaDevice,
    projected: &Tensor,
    bias: &Tensor,
) -> Result<Option<Tensor>> {
    if !matches!(projected.dtype(), DType::F16 | DType::F32) {
        return Ok(None);
    }
    let Some(module) = checked_module(device, Family::Geglu) else {
        return Ok(None);
    };
    run(module, projected, bias).map(Some)
}

fn run(module: Arc<CudaModule>, projected: &Tensor, bias: &Tensor) -> Result<Tensor> {
    projected
        .contiguous()?
        .apply_op2_no_bwd(&bias.contiguous()?, &GegluOp { module })
}

/// Our kernel against [`op::reference`] on [`op::CHECK_CASES`].
pub(super) fn check(
    device: &CudaDevice,
    module: &Arc<CudaModule>,
) -> std::result::Result<(), String> {
    let gpu = Device::Cuda(device.clone());
    for (dims, dtype) in op::CHECK_CASES {
        let difference = op::random_projection(dims, dtype)
            .and_then(|(projected, bias)| {
                let expected = op::reference(&projected, &bias)?;
                let got = run(
                    module.clone(),
                    &projected.to_device(&gpu)?,
                    &bias.to_device(&gpu)?,
                )?;
                crate::engine::kernels::largest_relative_difference(&got, &expected)
            })
            .map_err(|error| format!("{dims:?} {dtype:?}: {error}"))?;
        within_tolerance(
            format_args!("{dims:?} {dtype:?}"),
            difference,
            op::tolerance(dtype),
        )?;
    }
    Ok(())
}

struct GegluOp {
    module: Arc<CudaModule>,
}

impl CustomOp2 for GegluOp {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("our GEGLU kernel runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        projected: &CudaStorage,
        layout: &Layout,
        bias: &CudaStorage,
        bias_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let inputs = [(projected, layout), (bias, bias_layout)];
        match projected.dtype() {
            DType::F32 => launch::<f32>(&self.module, inputs, "f32"),
            DType::F16 => launch::<half::f16>(&self.module, inputs, "f16"),
            other => candle_core::bail!("our GEGLU kernel takes f32 or f16, not {other:?}"),
        }
    }
}

fn launch<T: CudaDType + DeviceRepr>(
    module: &Arc<CudaModule>,
    [(projected, layout), bias]: [(&CudaStorage, &Layout); 2],
    suffix: &str,
) -> Result<(CudaStorage, Shape)> {
    let mut dims = layout.dims().to_vec();
    let Some(width) = dims.last_mut() else {
        candle_core::bail!("geglu: a scalar has no halves");
    };
    if !width.is_multiple_of(2) {
        candle_core::bail!("geglu: the last dimension ({width}) is odd");
    }
    *width /= 2;
    let inner = *width;
    let shape = Shape::from(dims);
    let elements = shape.elem_count();
    let rows = elements / inner.max(1);

    let device = projected.device().clone();
    let projected_view = view::<T>((projected, layout))?;
    let bias_view = view::<T>(bias)?;
    if bias_view.len() != 2 * inner {
        candle_core::bail!(
            "geglu: the bias has {} values, not {}",
            bias_view.len(),
            2 * inner
        );
    }
    // SAFETY: the kernel writes every output value.
    let mut out: CudaSlice<T> = unsafe { device.alloc::<T>(elements) }?;
    let function = module.load_function(&format!("geglu_{suffix}")).w()?;
    let config = LaunchConfig {
        grid_dim: (as_u32(op::blocks(elements))?, 1, 1),
        block_dim: (as_u32(op::THREADS)?, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows_arg, inner_arg) = (as_u32(rows)?, as_u32(inner)?);
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&function);
    builder
        .arg(&projected_view)
        .arg(&bias_view)
        .arg(&mut out)
        .arg(&rows_arg)
        .arg(&inner_arg);
    // SAFETY: the arguments match `geglu_*`'s signature; the projection's view holds rows ×
    // 2·inner values, the bias's 2·inner and `out` rows × inner.
    unsafe { builder.launch(config) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, device), shape))
}

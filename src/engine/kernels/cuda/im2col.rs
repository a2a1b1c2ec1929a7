//! The 3×3 column kernel (`im2col.cu`) on a CUDA device: its launch, and its check against
//! the CPU reference.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaModule, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor,
};

use super::{Family, as_u32, checked_module, view};
use crate::engine::kernels::im2col::{self as op, Source};

/// Whether our kernel runs on `device` (loaded and checked there).
pub(in crate::engine::kernels) fn im2col_runs_on(device: &CudaDevice) -> bool {
    checked_module(device, Family::Im2col).is_some()
}

/// Our kernel's columns for output rows `top..top + rows` of `xs` read as `source` says, or
/// `None` where it does not run (not f16 or f32, more planes than its grid holds, not loaded
/// or not checked on this device).
pub(in crate::engine::kernels) fn columns_3x3(
    device: &CudaDevice,
    xs: &Tensor,
    source: Source,
    top: usize,
    rows: usize,
) -> Result<Option<Tensor>> {
    let (batch, channels, ..) = xs.dims4()?;
    if !matches!(xs.dtype(), DType::F16 | DType::F32) || batch * channels > op::MAX_PLANES {
        return Ok(None);
    }
    let Some(module) = checked_module(device, Family::Im2col) else {
        return Ok(None);
    };
    run(module, xs, source, top, rows).map(Some)
}

fn run(
    module: Arc<CudaModule>,
    xs: &Tensor,
    source: Source,
    top: usize,
    rows: usize,
) -> Result<Tensor> {
    xs.contiguous()?.apply_op1_no_bwd(&Im2colOp {
        module,
        source,
        top,
        rows,
    })
}

/// Our kernel against [`op::reference`] on [`op::CHECK_CASES`]: a copy, so exactly.
pub(super) fn check(
    device: &CudaDevice,
    module: &Arc<CudaModule>,
) -> std::result::Result<(), String> {
    let gpu = Device::Cuda(device.clone());
    for (dims, source, top, rows, dtype) in op::CHECK_CASES {
        let case = format!("{dims:?} {source:?} rows {top}+{rows} {dtype:?}");
        let difference = op::random_image(dims, dtype)
            .and_then(|xs| {
                let expected = op::reference(&xs, source, top, rows)?;
                let got = run(module.clone(), &xs.to_device(&gpu)?, source, top, rows)?;
                crate::engine::kernels::largest_relative_difference(&got, &expected)
            })
            .map_err(|error| format!("{case}: {error}"))?;
        if difference != 0.0 {
            return Err(format!(
                "{case}: {difference} from the CPU, relative (a copy must be exact)"
            ));
        }
    }
    Ok(())
}

struct Im2colOp {
    module: Arc<CudaModule>,
    source: Source,
    top: usize,
    rows: usize,
}

impl CustomOp1 for Im2colOp {
    fn name(&self) -> &'static str {
        "im2col-3x3"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("our im2col kernel runs on CUDA only")
    }

    fn cuda_fwd(&self, xs: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        match xs.dtype() {
            DType::F32 => self.launch::<f32>(xs, layout, "f32"),
            DType::F16 => self.launch::<half::f16>(xs, layout, "f16"),
            other => candle_core::bail!("our im2col kernel takes f32 or f16, not {other:?}"),
        }
    }
}

impl Im2colOp {
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        xs: &CudaStorage,
        layout: &Layout,
        suffix: &str,
    ) -> Result<(CudaStorage, Shape)> {
        let (batch, channels, height, width) = layout.shape().dims4()?;
        let Self {
            source, top, rows, ..
        } = *self;
        let shift = source.shift();
        if rows == 0 || top + rows > height << shift {
            candle_core::bail!("im2col: rows {top}..{} of {}", top + rows, height << shift);
        }
        let planes = batch * channels;
        let cells = rows * (width << shift);
        let shape = Shape::from((batch, channels * 9, cells));

        let device = xs.device().clone();
        let xs_view = view::<T>((xs, layout))?;
        // SAFETY: the kernel writes every column value, zeros included.
        let mut columns: CudaSlice<T> = unsafe { device.alloc::<T>(shape.elem_count()) }?;
        let function = self
            .module
            .load_function(&format!("im2col_3x3_{suffix}"))
            .w()?;
        let (blocks, planes) = op::grid(planes, cells);
        let config = LaunchConfig {
            grid_dim: (as_u32(blocks)?, as_u32(planes)?, 1),
            block_dim: (as_u32(op::THREADS)?, 1, 1),
            shared_mem_bytes: 0,
        };
        // The kernel counts a band's cells in 32 bits.
        as_u32(cells)?;
        let (height_arg, width_arg, shift_arg, top_arg, rows_arg) = (
            as_u32(height)?,
            as_u32(width)?,
            as_u32(shift)?,
            as_u32(top)?,
            as_u32(rows)?,
        );
        let stream = device.cuda_stream();
        let mut builder = stream.launch_builder(&function);
        builder
            .arg(&xs_view)
            .arg(&mut columns)
            .arg(&height_arg)
            .arg(&width_arg)
            .arg(&shift_arg)
            .arg(&top_arg)
            .arg(&rows_arg);
        // SAFETY: the arguments match `im2col_3x3_*`'s signature; the view holds planes ×
        // height × width values and `columns` planes × 9 × rows · (width << shift); the band
        // lies within the (doubled) image (checked above).
        unsafe { builder.launch(config) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(columns, device), shape))
    }
}

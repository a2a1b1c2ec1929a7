//! The group norm kernels (`group_norm.cu`) on a CUDA device: their launch, and their check
//! against the CPU op.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaModule, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Device, Layout, Result};

use super::{as_u32, view};
use crate::engine::kernels::group_norm::{
    self, Activation, Geometry, Kernel, Launch, Settings, THREADS,
};

/// The shapes our group norm kernels take: f32 or f16; a row's count exact in f32 (2²⁴);
/// rows and planes within the grid's second dimension.
pub(in crate::engine::kernels) fn group_norm_fits(dtype: DType, geometry: Geometry) -> bool {
    const GRID_Y: usize = 65_535;
    matches!(dtype, DType::F32 | DType::F16)
        && geometry.row_len() <= 1 << 24
        && geometry.images * geometry.channels <= GRID_Y
}

/// Our group norm against the CPU op on [`group_norm::CHECK_CASES`].
pub(super) fn check(
    device: &CudaDevice,
    module: &Arc<CudaModule>,
) -> std::result::Result<(), String> {
    let gpu = Device::Cuda(device.clone());
    for (dims, groups, dtype, activation) in group_norm::CHECK_CASES {
        let difference =
            compare(&gpu, module, dims, groups, dtype, activation).map_err(|e| e.to_string())?;
        let allowed = group_norm::check_tolerance(dtype);
        if difference.is_nan() || difference > allowed {
            return Err(format!(
                "{dims:?} in {groups} groups, {dtype:?}, {activation:?}: {difference} from the \
                 CPU, relative (allowed {allowed})"
            ));
        }
    }
    Ok(())
}

/// Max |GPU − CPU| / (1 + |CPU|) on the case's inputs.
fn compare(
    gpu: &Device,
    module: &Arc<CudaModule>,
    dims: &[usize],
    groups: usize,
    dtype: DType,
    activation: Activation,
) -> Result<f32> {
    let eps = group_norm::CHECK_EPS;
    let [xs, weight, bias] = group_norm::random_inputs(dims, dtype)?;
    let expected = group_norm::fused(Kernel::Cpu, &xs, &weight, &bias, groups, eps, activation)?;
    let [xs, weight, bias] = [&xs, &weight, &bias].map(|t| t.to_device(gpu));
    let got = group_norm::fused(
        Kernel::Cuda(module.clone()),
        &xs?,
        &weight?,
        &bias?,
        groups,
        eps,
        activation,
    )?;
    crate::engine::kernels::largest_relative_difference(&got, &expected)
}

/// Runs the two group norm kernels (statistics, then normalise + affine + activation).
pub(in crate::engine::kernels) fn group_norm(
    module: &Arc<CudaModule>,
    xs: (&CudaStorage, &Layout),
    weight: (&CudaStorage, &Layout),
    bias: (&CudaStorage, &Layout),
    settings: Settings,
) -> Result<CudaStorage> {
    match xs.0.dtype() {
        DType::F32 => launch_group_norm::<f32>(module, xs, weight, bias, settings, "f32"),
        DType::F16 => launch_group_norm::<half::f16>(module, xs, weight, bias, settings, "f16"),
        other => candle_core::bail!("our group norm kernels take f32 or f16, not {other:?}"),
    }
}

fn launch_group_norm<T: CudaDType + DeviceRepr + candle_core::WithDType>(
    module: &Arc<CudaModule>,
    xs: (&CudaStorage, &Layout),
    weight: (&CudaStorage, &Layout),
    bias: (&CudaStorage, &Layout),
    settings: Settings,
    suffix: &str,
) -> Result<CudaStorage> {
    let Settings {
        geometry,
        eps,
        activation,
    } = settings;
    if !group_norm_fits(T::DTYPE, geometry) {
        candle_core::bail!("group norm: {geometry:?} is beyond our kernels' limits");
    }
    let device = xs.0.device().clone();
    let xs_view = view::<T>(xs)?;
    let weight_view = view::<T>(weight)?;
    let bias_view = view::<T>(bias)?;

    let row_len = geometry.row_len();
    let rows = geometry.images * geometry.groups;
    let Launch {
        splits,
        split_len,
        blocks_per_plane,
    } = geometry.launch();
    // SAFETY: every element is written by the statistics kernel before it is read.
    let mut partials: CudaSlice<f32> = unsafe { device.alloc::<f32>(rows * splits * 3) }?;
    let stats = module
        .load_function(&format!("group_norm_stats_{suffix}"))
        .w()?;
    let stream = device.cuda_stream();
    let (row_len_arg, split_len_arg) = (as_u32(row_len)?, as_u32(split_len)?);
    let mut builder = stream.launch_builder(&stats);
    builder
        .arg(&xs_view)
        .arg(&mut partials)
        .arg(&row_len_arg)
        .arg(&split_len_arg);
    // SAFETY: the arguments match the kernel's signature; the grid stays within the row
    // count and split sizes the kernel indexes by.
    unsafe { builder.launch(grid(splits, rows)?) }.w()?;

    // SAFETY: the apply kernel writes every element.
    let mut out: CudaSlice<T> = unsafe { device.alloc::<T>(geometry.elements()) }?;
    let apply = module
        .load_function(&format!("group_norm_apply_{suffix}"))
        .w()?;
    let planes = geometry.images * geometry.channels;
    let channels_arg = as_u32(geometry.channels)?;
    let channels_per_group_arg = as_u32(geometry.channels_per_group())?;
    let plane_len_arg = as_u32(geometry.plane_len)?;
    let splits_arg = as_u32(splits)?;
    let eps_arg = eps as f32;
    let silu_arg = u32::from(activation == Activation::Silu);
    let mut builder = stream.launch_builder(&apply);
    builder
        .arg(&xs_view)
        .arg(&partials)
        .arg(&weight_view)
        .arg(&bias_view)
        .arg(&mut out)
        .arg(&channels_arg)
        .arg(&channels_per_group_arg)
        .arg(&plane_len_arg)
        .arg(&splits_arg)
        .arg(&eps_arg)
        .arg(&silu_arg);
    // SAFETY: as above; `partials` holds `splits` moments for each of the `rows` rows.
    unsafe { builder.launch(grid(blocks_per_plane, planes)?) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, device))
}

/// `x` × `y` blocks of [`THREADS`] threads, no dynamic shared memory.
fn grid(x: usize, y: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (as_u32(x)?, as_u32(y)?, 1),
        block_dim: (as_u32(THREADS)?, 1, 1),
        shared_mem_bytes: 0,
    })
}

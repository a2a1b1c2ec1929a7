//! The group norm kernels (`group_norm.cu`) on a CUDA device: their launch, and their check
//! against the CPU op.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaModule, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Device, Layout, Result};

use super::{as_u32, view, within_tolerance};
use crate::engine::kernels::group_norm::{
    self, Activation, Geometry, Kernel, Launch, Settings, THREADS,
};
use crate::engine::kernels::{im2col, norm_columns};

/// The shapes our group norm kernels take: f32 or f16; a row's count exact in f32 (2²⁴);
/// rows and planes within the grid's second dimension.
pub(in crate::engine::kernels) fn group_norm_fits(dtype: DType, geometry: Geometry) -> bool {
    const GRID_Y: usize = 65_535;
    matches!(dtype, DType::F32 | DType::F16)
        && geometry.row_len() <= 1 << 24
        && geometry.images * geometry.channels <= GRID_Y
}

// The columns kernel's grid comes from `im2col::grid`, its blocks are ours.
const _: () = assert!(im2col::THREADS == THREADS);

/// Our group norm against the CPU op on [`group_norm::CHECK_CASES`], and its columns
/// against the CPU's normalised image's columns on [`norm_columns::CHECK_CASES`].
pub(super) fn check(
    device: &CudaDevice,
    module: &Arc<CudaModule>,
) -> std::result::Result<(), String> {
    let gpu = Device::Cuda(device.clone());
    for (dims, groups, dtype, activation) in group_norm::CHECK_CASES {
        let difference =
            compare(&gpu, module, dims, groups, dtype, activation).map_err(|e| e.to_string())?;
        within_tolerance(
            format_args!("{dims:?} in {groups} groups, {dtype:?}, {activation:?}"),
            difference,
            group_norm::check_tolerance(dtype),
        )?;
    }
    for case in norm_columns::CHECK_CASES {
        let (columns, affines) = norm_columns::compare_on(&gpu, Kernel::Cuda(module.clone()), case)
            .map_err(|error| format!("{case:?} as columns and affines: {error}"))?;
        for (what, difference, allowed) in [
            ("columns", columns, group_norm::check_tolerance(case.dtype)),
            ("affines", affines, AFFINES_TOLERANCE),
        ] {
            within_tolerance(format_args!("{case:?} as {what}"), difference, allowed)?;
        }
    }
    Ok(())
}

/// How far the planes' affines may be from the CPU's, relative: statistics in f32 over rows
/// of up to 16 K values (the columns' cases), in another order.
const AFFINES_TOLERANCE: f32 = 1e-4;

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
    let geometry = settings.geometry;
    let device = xs.0.device().clone();
    let xs_view = view::<T>(xs)?;
    let partials = launch_statistics::<T>(module, &xs_view, &device, geometry, suffix)?;

    // SAFETY: the apply kernel writes every element.
    let mut out: CudaSlice<T> = unsafe { device.alloc::<T>(geometry.elements()) }?;
    let apply = module
        .load_function(&format!("group_norm_apply_{suffix}"))
        .w()?;
    let planes = geometry.images * geometry.channels;
    let (weight_view, bias_view) = (view::<T>(weight)?, view::<T>(bias)?);
    let affine = AffineArgs::of(settings)?;
    let plane_len_arg = as_u32(geometry.plane_len)?;
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&apply);
    builder
        .arg(&xs_view)
        .arg(&partials)
        .arg(&weight_view)
        .arg(&bias_view)
        .arg(&mut out)
        .arg(&affine.channels)
        .arg(&affine.channels_per_group)
        .arg(&plane_len_arg)
        .arg(&affine.splits)
        .arg(&affine.eps)
        .arg(&affine.silu);
    // SAFETY: the arguments match the kernel's signature; `partials` holds `splits` moments
    // for each (image, group) row, `out` every element.
    unsafe { builder.launch(grid(geometry.launch().blocks_per_plane, planes)?) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, device))
}

/// The statistics kernel alone: each (image, group) row's partial moments, `splits` of them
/// (`Geometry::launch`), three f32 each: what the apply and columns kernels read.
pub(in crate::engine::kernels) fn group_norm_statistics(
    module: &Arc<CudaModule>,
    xs: (&CudaStorage, &Layout),
    geometry: Geometry,
) -> Result<CudaStorage> {
    let device = xs.0.device().clone();
    let partials = match xs.0.dtype() {
        DType::F32 => launch_statistics::<f32>(module, &view(xs)?, &device, geometry, "f32")?,
        DType::F16 => launch_statistics::<half::f16>(module, &view(xs)?, &device, geometry, "f16")?,
        other => candle_core::bail!("our group norm kernels take f32 or f16, not {other:?}"),
    };
    Ok(CudaStorage::wrap_cuda_slice(partials, device))
}

fn launch_statistics<T: CudaDType + DeviceRepr + candle_core::WithDType>(
    module: &Arc<CudaModule>,
    xs_view: &CudaView<'_, T>,
    device: &CudaDevice,
    geometry: Geometry,
    suffix: &str,
) -> Result<CudaSlice<f32>> {
    if !group_norm_fits(T::DTYPE, geometry) {
        candle_core::bail!("group norm: {geometry:?} is beyond our kernels' limits");
    }
    let rows = geometry.images * geometry.groups;
    let Launch {
        splits, split_len, ..
    } = geometry.launch();
    // SAFETY: every element is written by the statistics kernel before it is read.
    let mut partials: CudaSlice<f32> = unsafe { device.alloc::<f32>(rows * splits * 3) }?;
    let stats = module
        .load_function(&format!("group_norm_stats_{suffix}"))
        .w()?;
    let (row_len_arg, split_len_arg) = (as_u32(geometry.row_len())?, as_u32(split_len)?);
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&stats);
    builder
        .arg(xs_view)
        .arg(&mut partials)
        .arg(&row_len_arg)
        .arg(&split_len_arg);
    // SAFETY: the arguments match the kernel's signature; the grid stays within the row
    // count and split sizes the kernel indexes by.
    unsafe { builder.launch(grid(splits, rows)?) }.w()?;
    Ok(partials)
}

/// The normalised image's columns for output rows `top..top + rows` of a 3×3 convolution
/// (`group_norm_columns_*`), from the statistics kernel's `partials`.
pub(in crate::engine::kernels) fn group_norm_columns(
    module: &Arc<CudaModule>,
    xs: (&CudaStorage, &Layout),
    weight: (&CudaStorage, &Layout),
    bias: (&CudaStorage, &Layout),
    partials: (&CudaStorage, &Layout),
    settings: Settings,
    (top, rows): (usize, usize),
) -> Result<CudaStorage> {
    match xs.0.dtype() {
        DType::F32 => launch_columns::<f32>(
            module,
            [xs, weight, bias],
            partials,
            settings,
            (top, rows),
            "f32",
        ),
        DType::F16 => launch_columns::<half::f16>(
            module,
            [xs, weight, bias],
            partials,
            settings,
            (top, rows),
            "f16",
        ),
        other => candle_core::bail!("our group norm kernels take f32 or f16, not {other:?}"),
    }
}

fn launch_columns<T: CudaDType + DeviceRepr + candle_core::WithDType>(
    module: &Arc<CudaModule>,
    [xs, weight, bias]: [(&CudaStorage, &Layout); 3],
    partials: (&CudaStorage, &Layout),
    settings: Settings,
    (top, rows): (usize, usize),
    suffix: &str,
) -> Result<CudaStorage> {
    let geometry = settings.geometry;
    let [images, channels, height, width] = xs.1.dims() else {
        candle_core::bail!(
            "group norm columns: {:?} is not an image batch",
            xs.1.dims()
        );
    };
    let (channels, height, width) = (*channels, *height, *width);
    let planes = images * channels;
    if rows == 0 || top + rows > height || planes > im2col::MAX_PLANES {
        candle_core::bail!("group norm columns: rows {top}..{} of {height}", top + rows);
    }
    let expected_partials = geometry.images * geometry.groups * geometry.launch().splits * 3;
    if partials.1.shape().elem_count() != expected_partials {
        candle_core::bail!("group norm columns: the statistics are not this image's");
    }
    let device = xs.0.device().clone();
    let cells = rows * width;
    let elements = planes * 9 * cells;
    // SAFETY: the kernel writes every column value, zeros included.
    let mut columns: CudaSlice<T> = unsafe { device.alloc::<T>(elements) }?;
    let function = module
        .load_function(&format!("group_norm_columns_{suffix}"))
        .w()?;
    let (xs_view, weight_view, bias_view) = (view::<T>(xs)?, view::<T>(weight)?, view::<T>(bias)?);
    let partials_view = view::<f32>(partials)?;
    let affine = AffineArgs::of(settings)?;
    // The kernel counts a band's cells in 32 bits.
    let (height_arg, width_arg, top_arg, rows_arg, _) = (
        as_u32(height)?,
        as_u32(width)?,
        as_u32(top)?,
        as_u32(rows)?,
        as_u32(cells)?,
    );
    let (blocks, planes) = im2col::grid(planes, cells);
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&function);
    builder
        .arg(&xs_view)
        .arg(&partials_view)
        .arg(&weight_view)
        .arg(&bias_view)
        .arg(&mut columns)
        .arg(&affine.channels)
        .arg(&affine.channels_per_group)
        .arg(&affine.splits)
        .arg(&affine.eps)
        .arg(&affine.silu)
        .arg(&height_arg)
        .arg(&width_arg)
        .arg(&top_arg)
        .arg(&rows_arg);
    // SAFETY: the arguments match `group_norm_columns_*`'s signature; the view holds planes ×
    // height × width values, `partials` the moments of every row (checked above), `columns`
    // planes × 9 × rows · width; the band lies within the image (checked above).
    unsafe { builder.launch(grid(blocks, planes)?) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(columns, device))
}

/// Each plane's `(mean, scale, shift)` (`group_norm_affines_*`), `(images · channels) × 3`
/// f32, from the statistics kernel's `partials`.
pub(in crate::engine::kernels) fn group_norm_affines(
    module: &Arc<CudaModule>,
    partials: (&CudaStorage, &Layout),
    weight: (&CudaStorage, &Layout),
    bias: (&CudaStorage, &Layout),
    settings: Settings,
) -> Result<CudaStorage> {
    match weight.0.dtype() {
        DType::F32 => launch_affines::<f32>(module, partials, [weight, bias], settings, "f32"),
        DType::F16 => {
            launch_affines::<half::f16>(module, partials, [weight, bias], settings, "f16")
        }
        other => candle_core::bail!("our group norm kernels take f32 or f16, not {other:?}"),
    }
}

fn launch_affines<T: CudaDType + DeviceRepr + candle_core::WithDType>(
    module: &Arc<CudaModule>,
    partials: (&CudaStorage, &Layout),
    [weight, bias]: [(&CudaStorage, &Layout); 2],
    settings: Settings,
    suffix: &str,
) -> Result<CudaStorage> {
    let geometry = settings.geometry;
    let expected_partials = geometry.images * geometry.groups * geometry.launch().splits * 3;
    if partials.1.shape().elem_count() != expected_partials
        || weight.1.shape().elem_count() != geometry.channels
        || bias.1.shape().elem_count() != geometry.channels
    {
        candle_core::bail!("group norm affines: the statistics or weights are not this image's");
    }
    let device = partials.0.device().clone();
    let planes = geometry.images * geometry.channels;
    // SAFETY: the kernel writes the three values of every plane.
    let mut affines: CudaSlice<f32> = unsafe { device.alloc::<f32>(planes * 3) }?;
    let function = module
        .load_function(&format!("group_norm_affines_{suffix}"))
        .w()?;
    let (partials_view, weight_view, bias_view) =
        (view::<f32>(partials)?, view::<T>(weight)?, view::<T>(bias)?);
    let affine = AffineArgs::of(settings)?;
    let planes_arg = as_u32(planes)?;
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&function);
    builder
        .arg(&partials_view)
        .arg(&weight_view)
        .arg(&bias_view)
        .arg(&mut affines)
        .arg(&planes_arg)
        .arg(&affine.channels)
        .arg(&affine.channels_per_group)
        .arg(&affine.splits)
        .arg(&affine.eps);
    // SAFETY: the arguments match `group_norm_affines_*`'s signature; `partials` holds the
    // moments of every row and the weights every channel (checked above), `affines` three
    // values per plane; a warp per plane, the grid covering them.
    unsafe { builder.launch(grid(planes.div_ceil(THREADS / 32), 1)?) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(affines, device))
}

/// The apply and columns kernels' arguments about the normalisation, as they take them.
struct AffineArgs {
    channels: u32,
    channels_per_group: u32,
    splits: u32,
    eps: f32,
    silu: u32,
}

impl AffineArgs {
    fn of(settings: Settings) -> Result<Self> {
        let geometry = settings.geometry;
        Ok(Self {
            channels: as_u32(geometry.channels)?,
            channels_per_group: as_u32(geometry.channels_per_group())?,
            splits: as_u32(geometry.launch().splits)?,
            eps: settings.eps as f32,
            silu: u32::from(settings.activation == Activation::Silu),
        })
    }
}

/// `x` × `y` blocks of [`THREADS`] threads, no dynamic shared memory.
fn grid(x: usize, y: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (as_u32(x)?, as_u32(y)?, 1),
        block_dim: (as_u32(THREADS)?, 1, 1),
        shared_mem_bytes: 0,
    })
}

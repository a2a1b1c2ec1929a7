//! Our kernels on a CUDA device: the fatbin `build.rs` compiles (machine code for every
//! supported architecture, PTX for newer ones), loaded once per device and checked against
//! the CPU op on small inputs of every kind before the device first uses it. A module that
//! does not load, or a kernel that disagrees, leaves candle's composition in its place for
//! the rest of the process, with a warning.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaModule, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, DeviceId, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Device, Layout, Result, Tensor};

use super::group_norm::{self, Activation, Geometry, Kernel, Settings};

/// The fatbin, aligned as a fatbin's header must be. On Linux it sits in the section
/// nvcc's own fatbins use, so `cuobjdump --list-elf` on the binary lists its machine code
/// beside the rest (the release workflow checks the architectures that way).
#[cfg_attr(target_os = "linux", unsafe(link_section = ".nv_fatbin"))]
static FATBIN: Aligned<[u8; FATBIN_LEN]> =
    Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin")));

const FATBIN_LEN: usize = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin")).len();

#[repr(C, align(8))]
struct Aligned<T>(T);

/// Threads per block, as the kernels are written for (`THREADS` in the `.cu` files).
const THREADS: u32 = 256;

/// What each device this process used got: the checked module, or `None` (candle's ops).
static DEVICES: Mutex<Vec<(DeviceId, Option<Arc<CudaModule>>)>> = Mutex::new(Vec::new());

/// Our module on `device` once it has loaded and passed its check; `None`: candle's
/// composition runs there. The first call per device loads and checks (milliseconds).
pub(super) fn checked_module(device: &CudaDevice) -> Option<Arc<CudaModule>> {
    let mut devices = DEVICES.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, module)) = devices.iter().find(|(id, _)| *id == device.id()) {
        return module.clone();
    }
    let module = match load_and_check(device) {
        Ok(module) => {
            tracing::debug!("our GPU kernels loaded and agree with the CPU");
            Some(module)
        }
        Err(why) => {
            tracing::warn!("our GPU kernels are off, candle's run instead: {why}");
            None
        }
    };
    devices.push((device.id(), module.clone()));
    module
}

fn load_and_check(device: &CudaDevice) -> std::result::Result<Arc<CudaModule>, String> {
    let module = device
        .cuda_stream()
        .context()
        .load_module(Ptx::from_binary(FATBIN.0.to_vec()))
        .map_err(|error| format!("the driver did not load them ({error})"))?;
    check_group_norm(device, &module).map_err(|error| format!("group norm: {error}"))?;
    Ok(module)
}

/// The shapes our group norm kernels take: f32 or f16; a row's count exact in f32 (2²⁴);
/// rows and planes within the grid's second dimension.
pub(super) fn group_norm_fits(dtype: DType, geometry: Geometry) -> bool {
    const GRID_Y: usize = 65_535;
    matches!(dtype, DType::F32 | DType::F16)
        && geometry.row_len() <= 1 << 24
        && geometry.images * geometry.channels <= GRID_Y
}

/// Our group norm against the CPU op, on small inputs that take every path of the kernels:
/// both dtypes, both activations, rows split across blocks, planes smaller than a block.
fn check_group_norm(
    device: &CudaDevice,
    module: &Arc<CudaModule>,
) -> std::result::Result<(), String> {
    let gpu = Device::Cuda(device.clone());
    let cases: [(&[usize], usize, DType, Activation); 4] = [
        (&[2, 64, 9, 7], 32, DType::F16, Activation::Silu),
        (&[1, 32, 33, 17], 8, DType::F32, Activation::None),
        (&[1, 32, 128, 128], 4, DType::F16, Activation::Silu),
        (&[2, 12, 40], 4, DType::F32, Activation::Silu),
    ];
    for (dims, groups, dtype, activation) in cases {
        let (difference, allowed) =
            compare(&gpu, module, dims, groups, dtype, activation).map_err(|e| e.to_string())?;
        if difference.is_nan() || difference > allowed {
            return Err(format!(
                "{dims:?} in {groups} groups, {dtype:?}, {activation:?}: {difference} from the \
                 CPU, relative (allowed {allowed})"
            ));
        }
    }
    Ok(())
}

/// Max |GPU − CPU| / (1 + |CPU|) over an off-centre random input, and what rounding allows.
fn compare(
    gpu: &Device,
    module: &Arc<CudaModule>,
    dims: &[usize],
    groups: usize,
    dtype: DType,
    activation: Activation,
) -> Result<(f32, f32)> {
    let channels = dims[1];
    let cpu = Device::Cpu;
    let xs = ((Tensor::randn(0f32, 2.0, dims, &cpu)? + 3.0)?).to_dtype(dtype)?;
    let weight = Tensor::randn(1f32, 0.5, channels, &cpu)?.to_dtype(dtype)?;
    let bias = Tensor::randn(0f32, 0.5, channels, &cpu)?.to_dtype(dtype)?;
    let eps = 1e-5;
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
    // Both round once from f32 and differ only in the order of their sums (and SiLU's
    // exponential): a flipped last bit, relative to the value.
    let difference = super::largest_relative_difference(&got, &expected)?;
    let allowed = if dtype == DType::F16 { 4e-3 } else { 1e-5 };
    Ok((difference, allowed))
}

/// Runs the two group norm kernels (statistics, then normalise + affine + activation).
pub(super) fn group_norm(
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
    // Enough blocks per row to fill the GPU when rows are few and long (a VAE at 1024²: 32
    // rows of 4 M values), at most 32 (the apply kernel's first warp merges them).
    let splits = row_len.div_ceil(16_384).clamp(1, 32);
    let split_len = row_len.div_ceil(splits);
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
    let blocks_per_plane = geometry
        .plane_len
        .div_ceil(THREADS as usize * 4)
        .clamp(1, 1024);
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
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The contiguous part of `storage` that `layout` describes.
fn view<'a, T: CudaDType>(
    (storage, layout): (&'a CudaStorage, &Layout),
) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("group norm: an input is not contiguous");
    };
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

fn as_u32(value: usize) -> Result<u32> {
    u32::try_from(value).map_err(|_| {
        candle_core::Error::Msg(format!(
            "group norm: {value} does not fit a kernel argument"
        ))
    })
}

//! Our implicit-GEMM convolution (`conv3x3.cu`) on a CUDA device: its launch, and its check
//! against the CPU reference.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, sys,
};
use candle_core::cuda_backend::{CudaDType, DeviceId, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage,
    Tensor,
};

use super::{Family, as_u32, checked_module, view, within_tolerance};
use crate::engine::kernels::conv3x3::{self as op, Part, Reading, Splits};
use crate::engine::kernels::im2col::Source;

/// The family whose verdicts cover `dtype`'s kernels: the f16 ones, or the TF32 ones for f32
/// (checked and raced apart: Turing has no TF32, and either may lose its race alone).
fn family(dtype: DType) -> Option<Family> {
    match dtype {
        DType::F16 => Some(Family::Conv3x3),
        DType::F32 => Some(Family::Conv3x3Tf32),
        _ => None,
    }
}

/// Whether our convolution runs `part`'s convolutions on `device` in `dtype`: loaded and
/// checked there, and, the device's kernels being raced first (once), not slower than what
/// runs in its place at the part's shapes.
pub(in crate::engine::kernels) fn conv3x3_runs_on(
    device: &CudaDevice,
    dtype: DType,
    part: Part,
) -> bool {
    super::race::run_once(device);
    conv3x3_on(device, dtype, part)
}

/// Whether our convolution is on for `part` on `device` in `dtype` now (loaded, checked, not
/// switched off for the part by its race), racing nothing.
pub(in crate::engine::kernels) fn conv3x3_on(
    device: &CudaDevice,
    dtype: DType,
    part: Part,
) -> bool {
    family(dtype).is_some_and(|family| {
        checked_module(device, family).is_some() && !super::race::lost_at(device, family, part)
    })
}

/// The blocks of our plain `dtype` kernel that `device` runs at once (0 where it is not on
/// there, or the driver does not say): what [`Splits::Fill`] fills.
pub(in crate::engine::kernels) fn conv3x3_slots(device: &CudaDevice, dtype: DType) -> usize {
    let (Some(module), Some(kernels)) = (
        family(dtype).and_then(|family| checked_module(device, family)),
        KernelNames::of(dtype),
    ) else {
        return 0;
    };
    let name = kernels.plain;
    module
        .load_function(name)
        .map_or(0, |function| slots(device, name, &function))
}

/// Our convolution of `xs` read as `reading` says, or `None` where it does not run on this
/// device.
pub(in crate::engine::kernels) fn conv3x3(
    device: &CudaDevice,
    xs: &Tensor,
    reading: Reading,
    weights: &Tensor,
    bias: &Tensor,
    splits: Splits,
) -> Result<Option<Tensor>> {
    let Some(module) = family(xs.dtype()).and_then(|family| checked_module(device, family)) else {
        return Ok(None);
    };
    run(module, xs, reading, weights, bias, splits).map(Some)
}

fn run(
    module: Arc<CudaModule>,
    xs: &Tensor,
    reading: Reading,
    weights: &Tensor,
    bias: &Tensor,
    splits: Splits,
) -> Result<Tensor> {
    let (source, normalization) = match reading {
        Reading::Image(source) => (source, None),
        Reading::Normalized { affines, silu } => {
            (Source::AsIs, Some((affines.contiguous()?, silu)))
        }
    };
    xs.contiguous()?.apply_op3_no_bwd(
        &weights.contiguous()?,
        &bias.contiguous()?,
        &ConvOp {
            module,
            source,
            normalization,
            splits,
        },
    )
}

/// Our f16 kernels against [`op::reference`] on [`op::CHECK_CASES`].
pub(super) fn check(
    device: &CudaDevice,
    module: &Arc<CudaModule>,
) -> std::result::Result<(), String> {
    check_dtype(device, module, DType::F16)
}

/// Our TF32 kernels the same way, on f32 values (loaded on Ampere and newer only: before, their
/// tensor-core step traps).
pub(super) fn check_tf32(
    device: &CudaDevice,
    module: &Arc<CudaModule>,
) -> std::result::Result<(), String> {
    check_dtype(device, module, DType::F32)
}

fn check_dtype(
    device: &CudaDevice,
    module: &Arc<CudaModule>,
    dtype: DType,
) -> std::result::Result<(), String> {
    let gpu = Device::Cuda(device.clone());
    for case in op::CHECK_CASES {
        let difference = (|| {
            let [xs, weight, bias, affines] = op::random_inputs(case, dtype)?;
            let expected = op::reference(&xs, op::reading(case, &affines), &weight, &bias)?;
            let weights = op::kernel_order(&weight)?;
            let [xs, weights, bias, affines] =
                [&xs, &weights, &bias, &affines].map(|tensor| tensor.to_device(&gpu));
            let affines = affines?;
            let got = run(
                module.clone(),
                &xs?,
                op::reading(case, &affines),
                &weights?,
                &bias?,
                Splits::Exactly(case.splits),
            )?;
            crate::engine::kernels::largest_relative_difference(&got, &expected)
        })()
        .map_err(|error| format!("{case:?} in {dtype:?}: {error}"))?;
        within_tolerance(
            format_args!("{case:?} in {dtype:?}"),
            difference,
            op::check_tolerance(dtype),
        )?;
    }
    Ok(())
}

/// The kernel over `(xs, weights, bias)`, with the planes' affines where it normalises.
struct ConvOp {
    module: Arc<CudaModule>,
    source: Source,
    /// The affines `(batch · c_in, 3)` and whether SiLU follows.
    normalization: Option<(Tensor, bool)>,
    splits: Splits,
}

/// Threads a block of the parts' sum.
const SUM_THREADS: usize = 256;

/// How many blocks of a kernel each device runs at once (its SMs × the blocks an SM holds),
/// asked of the driver once per device and kernel.
static SLOTS: Mutex<Vec<(DeviceId, &'static str, usize)>> = Mutex::new(Vec::new());

/// The blocks of `function` (`name`) that `device` runs at once; 0 where the driver does not
/// say (then K is not split).
fn slots(device: &CudaDevice, name: &'static str, function: &CudaFunction) -> usize {
    let mut known = SLOTS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((.., slots)) = known
        .iter()
        .find(|(id, kernel, _)| *id == device.id() && *kernel == name)
    {
        return *slots;
    }
    let processors = device
        .cuda_stream()
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT);
    let per_processor =
        function.occupancy_max_active_blocks_per_multiprocessor(op::THREADS as u32, 0, None);
    let slots = match (processors, per_processor) {
        (Ok(processors), Ok(per_processor)) => {
            usize::try_from(processors).unwrap_or(0) * per_processor as usize
        }
        (Err(error), _) | (_, Err(error)) => {
            tracing::debug!("the driver did not say how many blocks of {name} fit: {error}");
            0
        }
    };
    known.push((device.id(), name, slots));
    slots
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "conv3x3-implicit"
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
        candle_core::bail!("our 3×3 convolution kernel runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xs_layout: &Layout,
        weights: &CudaStorage,
        weights_layout: &Layout,
        bias: &CudaStorage,
        bias_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dtype = xs.dtype();
        if weights.dtype() != dtype || bias.dtype() != dtype {
            candle_core::bail!(
                "our 3×3 convolution: {dtype:?} input, {:?} weights, {:?} bias",
                weights.dtype(),
                bias.dtype()
            );
        }
        let inputs = [
            (xs, xs_layout),
            (weights, weights_layout),
            (bias, bias_layout),
        ];
        match dtype {
            DType::F16 => self.launch::<half::f16>(inputs),
            DType::F32 => self.launch::<f32>(inputs),
            other => candle_core::bail!("our 3×3 convolution takes f16 or f32, not {other:?}"),
        }
    }
}

/// A dtype's kernels in `conv3x3.cu`: plain, normalised, and the parts' sum.
struct KernelNames {
    plain: &'static str,
    normalized: &'static str,
    sum_splits: &'static str,
}

impl KernelNames {
    /// `dtype`'s kernels: f16's, or for f32 the TF32 ones.
    fn of(dtype: DType) -> Option<&'static KernelNames> {
        match dtype {
            DType::F16 => Some(&F16_KERNELS),
            DType::F32 => Some(&TF32_KERNELS),
            _ => None,
        }
    }
}

const F16_KERNELS: KernelNames = KernelNames {
    plain: "conv3x3_f16",
    normalized: "conv3x3_normalized_f16",
    sum_splits: "conv3x3_sum_splits_f16",
};

/// f32 values multiplied in TF32.
const TF32_KERNELS: KernelNames = KernelNames {
    plain: "conv3x3_tf32",
    normalized: "conv3x3_normalized_tf32",
    sum_splits: "conv3x3_sum_splits_f32",
};

impl ConvOp {
    /// The kernels of `T` over `(xs, weights, bias)`, each with its layout.
    fn launch<T: CudaDType + DeviceRepr + candle_core::WithDType>(
        &self,
        [
            (xs, xs_layout),
            (weights, weights_layout),
            (bias, bias_layout),
        ]: [(&CudaStorage, &Layout); 3],
    ) -> Result<(CudaStorage, Shape)> {
        let (Some(channel_block), Some(kernels)) =
            (op::channel_block(T::DTYPE), KernelNames::of(T::DTYPE))
        else {
            candle_core::bail!("our 3×3 convolution does not take {:?}", T::DTYPE);
        };
        let (batch, in_channels, height, width) = xs_layout.shape().dims4()?;
        let (out_channels, blocks, taps, block) = weights_layout.shape().dims4()?;
        if blocks * block != in_channels
            || taps != 9
            || block != channel_block
            || !op::fits(T::DTYPE, in_channels, out_channels)
            || bias_layout.shape().elem_count() != out_channels
        {
            candle_core::bail!(
                "our 3×3 convolution: weights {:?} and bias {:?} for {:?}",
                weights_layout.dims(),
                bias_layout.dims(),
                xs_layout.dims()
            );
        }
        // The kernel copies the weights 16 bytes at a time: their first value must start 16
        // bytes into the buffer, as a tensor of their own does (a view into another might not).
        if !(weights_layout.start_offset() * T::DTYPE.size_in_bytes()).is_multiple_of(16) {
            candle_core::bail!("our 3×3 convolution: the weights do not start on 16 bytes");
        }
        let shift = self.source.shift();
        let (out_height, out_width) = (height << shift, width << shift);
        let shape = Shape::from((batch, out_channels, out_height, out_width));
        let tile_columns = op::tile_columns(out_width);
        let (name, silu) = match self.normalization {
            None => (kernels.plain, false),
            Some((_, silu)) => (kernels.normalized, silu),
        };
        let function = self.module.load_function(name).w()?;
        let device = xs.device().clone();
        let (tiles, output_tiles, images) = op::grid(batch, out_channels, out_height, out_width);
        let splits = match self.splits {
            Splits::Fill => op::splits_to_fill(
                tiles * output_tiles * images,
                in_channels / channel_block,
                slots(&device, name, &function),
            ),
            Splits::Exactly(splits) => splits,
        };
        if splits == 0 || splits > in_channels / channel_block {
            candle_core::bail!("our 3×3 convolution: {in_channels} channels in {splits} parts");
        }
        if output_tiles > 65_535 || images * splits > 65_535 {
            candle_core::bail!("our 3×3 convolution: {shape:?} is beyond its grid");
        }
        // The kernel counts an output plane's cells in 32 bits.
        let plane_len = as_u32(out_height * out_width)?;

        let (xs_view, weights_view, bias_view) = (
            view::<T>((xs, xs_layout))?,
            view::<T>((weights, weights_layout))?,
            view::<T>((bias, bias_layout))?,
        );
        // SAFETY: the kernel writes every output cell (the tiles cover the output), or with K
        // split every cell of every part's partial sums, which the sum below adds into each
        // output cell.
        let mut out: CudaSlice<T> = unsafe { device.alloc::<T>(shape.elem_count()) }?;
        let mut partials: Option<CudaSlice<f32>> = if splits > 1 {
            // SAFETY: as above.
            Some(unsafe { device.alloc::<f32>(splits * shape.elem_count()) }?)
        } else {
            None
        };
        let config = LaunchConfig {
            grid_dim: (
                as_u32(tiles)?,
                as_u32(output_tiles)?,
                as_u32(images * splits)?,
            ),
            block_dim: (as_u32(op::THREADS)?, 1, 1),
            shared_mem_bytes: 0,
        };
        let (in_arg, out_arg, height_arg, width_arg, tile_arg, splits_arg) = (
            as_u32(in_channels)?,
            as_u32(out_channels)?,
            as_u32(height)?,
            as_u32(width)?,
            as_u32(tile_columns)?,
            as_u32(splits)?,
        );
        // The normalised kernel's affines, three f32 per input plane; a null pointer for the
        // other, which does not read them.
        let affines = self
            .normalization
            .as_ref()
            .map(|(affines, _)| affines.storage_and_layout());
        let affines_view = match &affines {
            Some((storage, layout)) => {
                let Storage::Cuda(storage) = &**storage else {
                    candle_core::bail!("our 3×3 convolution: the affines are not on the GPU");
                };
                if layout.shape().elem_count() != batch * in_channels * 3 {
                    candle_core::bail!("our 3×3 convolution: the affines are not this image's");
                }
                Some(view::<f32>((storage, layout))?)
            }
            None => None,
        };
        let null: u64 = 0;
        let (shift_arg, silu_arg) = (as_u32(shift)?, u32::from(silu));
        let stream = device.cuda_stream();
        let mut builder = stream.launch_builder(&function);
        builder.arg(&xs_view);
        match &affines_view {
            Some(affines_view) => builder.arg(affines_view),
            None => builder.arg(&null),
        };
        builder.arg(&weights_view).arg(&bias_view).arg(&mut out);
        match &mut partials {
            Some(partials) => builder.arg(partials),
            None => builder.arg(&null),
        };
        builder
            .arg(&in_arg)
            .arg(&out_arg)
            .arg(&height_arg)
            .arg(&width_arg)
            .arg(&shift_arg)
            .arg(&tile_arg)
            .arg(&silu_arg)
            .arg(&splits_arg);
        // SAFETY: the arguments match the plain and normalised kernels' signature for `T`;
        // the views hold the image, the weights in the kernel's order and the bias for these
        // channel counts, and for the normalised kernel three affines per input plane (all
        // checked above); `out` the (doubled) output, `partials` `splits` times it where K is
        // split (the kernel writes one or the other); the grid is `op::grid`'s for this tile
        // width, its z times the parts, which are no more than the blocks of channels.
        unsafe { builder.launch(config) }.w()?;

        if let Some(partials) = &partials {
            let sum = self.module.load_function(kernels.sum_splits).w()?;
            let planes = as_u32(batch * out_channels)?;
            let blocks = shape.elem_count().div_ceil(SUM_THREADS).min(65_535);
            let config = LaunchConfig {
                grid_dim: (as_u32(blocks)?, 1, 1),
                block_dim: (as_u32(SUM_THREADS)?, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut builder = stream.launch_builder(&sum);
            builder
                .arg(partials)
                .arg(&bias_view)
                .arg(&mut out)
                .arg(&splits_arg)
                .arg(&planes)
                .arg(&out_arg)
                .arg(&plane_len);
            // SAFETY: the arguments match the parts' sum's signature for `T`: `partials`
            // holds `splits` × the output's values, `out` the output, the bias one value per
            // output channel; the grid strides over every output value.
            unsafe { builder.launch(config) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, device), shape))
    }
}

//! Our implicit-GEMM convolution (`conv3x3.cu`) on a CUDA device: its launch, and its check
//! against the CPU reference.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::DeviceId;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, LaunchConfig, PushKernelArg, sys,
};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage,
    Tensor,
};

use super::{Family, as_u32, checked_module, view};
use crate::engine::kernels::conv3x3::{self as op, Reading, Splits};
use crate::engine::kernels::im2col::Source;

/// Whether our convolution runs on `device`: loaded and checked there, and, the device's
/// kernels being raced first (once), not slower than what runs in its place.
pub(in crate::engine::kernels) fn conv3x3_runs_on(device: &CudaDevice) -> bool {
    super::race::run_once(device);
    checked_module(device, Family::Conv3x3).is_some()
}

/// Whether our convolution is on for `device` now (loaded, checked, not switched off by its
/// race), racing nothing.
pub(in crate::engine::kernels) fn conv3x3_on(device: &CudaDevice) -> bool {
    checked_module(device, Family::Conv3x3).is_some()
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
    let Some(module) = checked_module(device, Family::Conv3x3) else {
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

/// Our kernel against [`op::reference`] on [`op::CHECK_CASES`].
pub(super) fn check(
    device: &CudaDevice,
    module: &Arc<CudaModule>,
) -> std::result::Result<(), String> {
    let gpu = Device::Cuda(device.clone());
    for case in op::CHECK_CASES {
        let difference = (|| {
            let [xs, weights, bias, affines] = op::random_inputs(case)?;
            let expected = op::reference(&xs, op::reading(case, &affines), &weights, &bias)?;
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
        .map_err(|error| format!("{case:?}: {error}"))?;
        if difference.is_nan() || difference > op::CHECK_TOLERANCE {
            return Err(format!(
                "{case:?}: {difference} from the CPU, relative (allowed {})",
                op::CHECK_TOLERANCE
            ));
        }
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
        for storage in [xs, weights, bias] {
            if storage.dtype() != DType::F16 {
                candle_core::bail!("our 3×3 convolution takes f16, not {:?}", storage.dtype());
            }
        }
        let (batch, in_channels, height, width) = xs_layout.shape().dims4()?;
        let (out_channels, blocks, taps, block) = weights_layout.shape().dims4()?;
        if blocks * block != in_channels
            || taps != 9
            || block != op::CHANNEL_BLOCK
            || !op::fits(in_channels, out_channels)
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
        if !weights_layout.start_offset().is_multiple_of(8) {
            candle_core::bail!("our 3×3 convolution: the weights do not start on 16 bytes");
        }
        let shift = self.source.shift();
        let (out_height, out_width) = (height << shift, width << shift);
        let shape = Shape::from((batch, out_channels, out_height, out_width));
        let tile_columns = op::tile_columns(out_width);
        let (name, silu) = match self.normalization {
            None => ("conv3x3_f16", false),
            Some((_, silu)) => ("conv3x3_normalized_f16", silu),
        };
        let function = self.module.load_function(name).w()?;
        let device = xs.device().clone();
        let (tiles, output_tiles, images) = op::grid(batch, out_channels, out_height, out_width);
        let splits = match self.splits {
            Splits::Fill => op::splits_to_fill(
                tiles * output_tiles * images,
                in_channels,
                slots(&device, name, &function),
            ),
            Splits::Exactly(splits) => splits,
        };
        if splits == 0 || splits > in_channels / op::CHANNEL_BLOCK {
            candle_core::bail!("our 3×3 convolution: {in_channels} channels in {splits} parts");
        }
        if output_tiles > 65_535 || images * splits > 65_535 {
            candle_core::bail!("our 3×3 convolution: {shape:?} is beyond its grid");
        }
        // The kernel counts an output plane's cells in 32 bits.
        let plane_len = as_u32(out_height * out_width)?;

        let (xs_view, weights_view, bias_view) = (
            view::<half::f16>((xs, xs_layout))?,
            view::<half::f16>((weights, weights_layout))?,
            view::<half::f16>((bias, bias_layout))?,
        );
        // SAFETY: the kernel writes every output cell (the tiles cover the output), or with K
        // split every cell of every part's partial sums, which the sum below adds into each
        // output cell.
        let mut out: CudaSlice<half::f16> =
            unsafe { device.alloc::<half::f16>(shape.elem_count()) }?;
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
        // SAFETY: the arguments match `conv3x3_f16`'s and `conv3x3_normalized_f16`'s signature;
        // the views hold the image, the weights in the kernel's order and the bias for these
        // channel counts, and for the normalised kernel three affines per input plane (all
        // checked above); `out` the (doubled) output, `partials` `splits` times it where K is
        // split (the kernel writes one or the other); the grid is `op::grid`'s for this tile
        // width, its z times the parts, which are no more than the blocks of channels.
        unsafe { builder.launch(config) }.w()?;

        if let Some(partials) = &partials {
            let sum = self.module.load_function("conv3x3_sum_splits_f16").w()?;
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
            // SAFETY: the arguments match `conv3x3_sum_splits_f16`'s signature: `partials`
            // holds `splits` × the output's values, `out` the output, the bias one value per
            // output channel; the grid strides over every output value.
            unsafe { builder.launch(config) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, device), shape))
    }
}

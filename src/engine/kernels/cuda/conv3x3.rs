//! Our implicit-GEMM convolution (`conv3x3.cu`) on a CUDA device: its launch, and its check
//! against the CPU reference.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{
    CudaModule, CudaSlice, LaunchConfig, PushKernelArg,
};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage,
    Tensor,
};

use super::{Family, as_u32, checked_module, view};
use crate::engine::kernels::conv3x3::{self as op, Reading};
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
) -> Result<Option<Tensor>> {
    let Some(module) = checked_module(device, Family::Conv3x3) else {
        return Ok(None);
    };
    run(module, xs, reading, weights, bias).map(Some)
}

fn run(
    module: Arc<CudaModule>,
    xs: &Tensor,
    reading: Reading,
    weights: &Tensor,
    bias: &Tensor,
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
        let (tiles, output_tiles, images) = op::grid(batch, out_channels, out_height, out_width);
        if output_tiles > 65_535 || images > 65_535 {
            candle_core::bail!("our 3×3 convolution: {shape:?} is beyond its grid");
        }
        // The kernel counts an output plane's cells in 32 bits.
        as_u32(out_height * out_width)?;

        let device = xs.device().clone();
        let (xs_view, weights_view, bias_view) = (
            view::<half::f16>((xs, xs_layout))?,
            view::<half::f16>((weights, weights_layout))?,
            view::<half::f16>((bias, bias_layout))?,
        );
        // SAFETY: the kernel writes every output cell: the tiles cover the output.
        let mut out: CudaSlice<half::f16> =
            unsafe { device.alloc::<half::f16>(shape.elem_count()) }?;
        let config = LaunchConfig {
            grid_dim: (as_u32(tiles)?, as_u32(output_tiles)?, as_u32(images)?),
            block_dim: (as_u32(op::THREADS)?, 1, 1),
            shared_mem_bytes: 0,
        };
        let (in_arg, out_arg, height_arg, width_arg, tile_arg) = (
            as_u32(in_channels)?,
            as_u32(out_channels)?,
            as_u32(height)?,
            as_u32(width)?,
            as_u32(tile_columns)?,
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
        let (name, silu) = match self.normalization {
            None => ("conv3x3_f16", false),
            Some((_, silu)) => ("conv3x3_normalized_f16", silu),
        };
        let function = self.module.load_function(name).w()?;
        let null: u64 = 0;
        let (shift_arg, silu_arg) = (as_u32(shift)?, u32::from(silu));
        let stream = device.cuda_stream();
        let mut builder = stream.launch_builder(&function);
        builder.arg(&xs_view);
        match &affines_view {
            Some(affines_view) => builder.arg(affines_view),
            None => builder.arg(&null),
        };
        builder
            .arg(&weights_view)
            .arg(&bias_view)
            .arg(&mut out)
            .arg(&in_arg)
            .arg(&out_arg)
            .arg(&height_arg)
            .arg(&width_arg)
            .arg(&shift_arg)
            .arg(&tile_arg)
            .arg(&silu_arg);
        // SAFETY: the arguments match `conv3x3_f16`'s and `conv3x3_normalized_f16`'s signature;
        // the views hold the image, the weights in the kernel's order and the bias for these
        // channel counts, and for the normalised kernel three affines per input plane (all
        // checked above); `out` the (doubled) output; the grid is `op::grid`'s for this tile
        // width.
        unsafe { builder.launch(config) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, device), shape))
    }
}

//! A group norm (its affine, then SiLU) that a 3×3 convolution reads straight as its columns:
//! the statistics are taken once per image, then each band's columns are written already
//! normalised (`group_norm.cu`'s columns kernel, in [`super::im2col`]'s layout). The
//! normalised image, as large as the input, is never held, written or read back. Each
//! resnet's two convolutions and each model's last one follow a group norm and SiLU, so each
//! saves a pass over an activation, and the decode's peak holds one activation less (128 MB
//! at SD's 512² decode in f16).
//!
//! Our implicit-GEMM convolution ([`super::conv3x3`]) reads the same prepared image without
//! columns: it takes each plane's mean, scale and shift ([`NormalizedImage::affines`], a
//! fourth `group_norm.cu` kernel) and normalises each value as it loads it.
//!
//! On CUDA, where our group norm kernels and our column kernel or convolution run; elsewhere
//! [`normalized_image`] answers `None` and the model normalises, then convolves.
//! [`reference`] builds the same columns from the CPU's group norm and
//! [`super::im2col::composed`], `reference_affines` the affines from the CPU's statistics:
//! what the kernels are checked against.

#[cfg(any(test, feature = "cuda"))]
use candle_core::DType;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

use super::group_norm::{Activation, Geometry, Kernel, Settings};
#[cfg(any(test, feature = "cuda"))]
use super::{
    group_norm,
    im2col::{self, Source},
};

/// An image with its group norm's statistics taken: what the columns of the convolution that
/// reads it normalised are written from ([`NormalizedImage::columns_3x3`]).
pub struct NormalizedImage {
    xs: Tensor,
    weight: Tensor,
    bias: Tensor,
    /// The statistics kernel's partial moments, f32.
    partials: Tensor,
    settings: Settings,
    kernel: Kernel,
}

/// `xs` `(batch, channels, h, w)` to be read normalised over `groups` groups of channels,
/// scaled by `weight`, shifted by `bias`, then `activation`, with its statistics taken; `None`
/// where our kernels do not run (not CUDA, not f16 or f32, our group norm or column kernel
/// not checked on this device or slower there than candle's, a shape beyond them).
pub fn normalized_image(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    activation: Activation,
) -> Result<Option<NormalizedImage>> {
    // Only where our column kernel or our convolution runs for these input channels: where
    // the column kernel was slower than candle's convolution on this card, so is a GEMM over
    // columns, and our convolution reads the image it prepares directly.
    if !super::enabled() || xs.rank() != 4 {
        return Ok(None);
    }
    let convolution = super::conv3x3::runs_on(xs.device(), xs.dtype(), xs.dim(1)?);
    if !(super::im2col::runs_for(xs) || convolution) {
        return Ok(None);
    }
    let Some(geometry) = Geometry::of(xs, weight, bias, groups) else {
        return Ok(None);
    };
    match Kernel::for_device(xs.device(), xs.dtype(), geometry) {
        Some(kernel) => {
            let settings = Settings {
                geometry,
                eps,
                activation,
            };
            NormalizedImage::prepare(kernel, xs, weight, bias, settings).map(Some)
        }
        None => Ok(None),
    }
}

impl NormalizedImage {
    /// Takes the statistics of `xs` with `kernel`.
    fn prepare(
        kernel: Kernel,
        xs: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        settings: Settings,
    ) -> Result<Self> {
        let xs = xs.contiguous()?;
        let partials = xs.apply_op1_no_bwd(&StatisticsOp {
            kernel: kernel.clone(),
            geometry: settings.geometry,
        })?;
        Ok(Self {
            xs,
            weight: weight.contiguous()?,
            bias: bias.contiguous()?,
            partials,
            settings,
            kernel,
        })
    }

    /// The image as it is, before the norm.
    pub fn image(&self) -> &Tensor {
        &self.xs
    }

    /// Whether SiLU follows the norm.
    pub fn silu(&self) -> bool {
        self.settings.activation == Activation::Silu
    }

    /// Each plane's normalisation, `(batch · channels, 3)` f32: `(mean, scale, shift)` such
    /// that the normalised value is `(x − mean) · scale + shift` (then SiLU, if [`Self::silu`]):
    /// what a convolution that normalises as it loads reads ([`super::conv3x3`]).
    pub fn affines(&self) -> Result<Tensor> {
        self.partials.apply_op3_no_bwd(
            &self.weight,
            &self.bias,
            &AffinesOp {
                kernel: self.kernel.clone(),
                settings: self.settings,
            },
        )
    }

    /// The normalised image's columns for output rows `top..top + rows` of a 3×3
    /// convolution: `(batch, channels · 9, rows · w)`, as [`im2col::columns_3x3`] lays them.
    pub fn columns_3x3(&self, top: usize, rows: usize) -> Result<Tensor> {
        self.xs.apply_op3_no_bwd(
            &self.weight,
            &self.bias,
            &ColumnsOp {
                kernel: self.kernel.clone(),
                settings: self.settings,
                partials: self.partials.clone(),
                top,
                rows,
            },
        )
    }
}

/// The same columns in f32 on the CPU: our CPU group norm, then [`im2col::composed`].
#[cfg(any(test, feature = "cuda"))]
pub(super) fn reference(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    settings: Settings,
    (top, rows): (usize, usize),
) -> Result<Tensor> {
    let on_cpu = |tensor: &Tensor| {
        tensor
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::F32)
    };
    let normed = group_norm::fused(
        Kernel::Cpu,
        &on_cpu(xs)?,
        &on_cpu(weight)?,
        &on_cpu(bias)?,
        settings.geometry.groups,
        settings.eps,
        settings.activation,
    )?;
    im2col::composed(&normed, Source::AsIs, top, rows)
}

/// [`NormalizedImage::affines`] on the CPU in f32: each (image, group)'s mean and biased
/// variance over its channels' planes, each channel's weight over the deviation, its bias.
#[cfg(any(test, feature = "cuda"))]
pub(super) fn reference_affines(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    settings: Settings,
) -> Result<Tensor> {
    let on_cpu = |tensor: &Tensor| {
        tensor
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::F32)
    };
    let Geometry {
        images,
        channels,
        groups,
        plane_len,
    } = settings.geometry;
    let rows = on_cpu(xs)?.reshape((images, groups, (channels / groups) * plane_len))?;
    let mean = rows.mean_keepdim(2)?;
    let variance = rows.broadcast_sub(&mean)?.sqr()?.mean_keepdim(2)?;
    // Per (image, group) → per (image, channel).
    let per_channel = |values: &Tensor| {
        values
            .repeat((1, 1, channels / groups))?
            .reshape((images, channels))
    };
    let mean = per_channel(&mean)?;
    let deviation = (per_channel(&variance)? + settings.eps)?.sqrt()?;
    let scale = on_cpu(weight)?.unsqueeze(0)?.broadcast_div(&deviation)?;
    let shift = on_cpu(bias)?
        .unsqueeze(0)?
        .broadcast_as((images, channels))?;
    Tensor::stack(&[&mean, &scale, &shift.contiguous()?], 2)?.reshape((images * channels, 3))
}

/// One shape the columns kernel is checked on.
#[cfg(any(test, feature = "cuda"))]
#[derive(Clone, Copy, Debug)]
pub(super) struct CheckCase {
    pub dims: [usize; 4],
    pub groups: usize,
    pub dtype: DType,
    pub activation: Activation,
    pub top: usize,
    pub rows: usize,
}

/// What the columns kernel is checked on (on each device with the group norm's own cases,
/// and in the tests on the emulation): both dtypes and activations; a whole image, bands at
/// the top, inside and at the bottom; rows whose statistics span several blocks; a
/// one-pixel image.
#[cfg(any(test, feature = "cuda"))]
pub(super) const CHECK_CASES: [CheckCase; 5] = [
    CheckCase {
        dims: [2, 64, 9, 7],
        groups: 32,
        dtype: DType::F16,
        activation: Activation::Silu,
        top: 0,
        rows: 9,
    },
    CheckCase {
        dims: [1, 32, 33, 17],
        groups: 8,
        dtype: DType::F32,
        activation: Activation::None,
        top: 5,
        rows: 11,
    },
    CheckCase {
        dims: [1, 32, 128, 128],
        groups: 4,
        dtype: DType::F16,
        activation: Activation::Silu,
        top: 0,
        rows: 3,
    },
    CheckCase {
        dims: [2, 8, 20, 40],
        groups: 4,
        dtype: DType::F32,
        activation: Activation::Silu,
        top: 13,
        rows: 7,
    },
    CheckCase {
        dims: [1, 2, 1, 1],
        groups: 1,
        dtype: DType::F16,
        activation: Activation::Silu,
        top: 0,
        rows: 1,
    },
];

#[cfg(any(test, feature = "cuda"))]
impl CheckCase {
    pub fn settings(self) -> Settings {
        let [images, channels, height, width] = self.dims;
        Settings {
            geometry: Geometry {
                images,
                channels,
                groups: self.groups,
                plane_len: height * width,
            },
            eps: group_norm::CHECK_EPS,
            activation: self.activation,
        }
    }
}

/// Max |kernel − CPU| / (1 + |CPU|) of the case's columns, and of its planes' affines,
/// `kernel` run on `device` (one prepared image for both).
#[cfg(feature = "cuda")]
pub(super) fn compare_on(
    device: &candle_core::Device,
    kernel: Kernel,
    case: CheckCase,
) -> Result<(f32, f32)> {
    let [xs, weight, bias] = group_norm::random_inputs(&case.dims, case.dtype)?;
    let settings = case.settings();
    let columns = reference(&xs, &weight, &bias, settings, (case.top, case.rows))?;
    let affines = reference_affines(&xs, &weight, &bias, settings)?;
    let [xs, weight, bias] = [&xs, &weight, &bias].map(|t| t.to_device(device));
    let image = NormalizedImage::prepare(kernel, &xs?, &weight?, &bias?, settings)?;
    Ok((
        super::largest_relative_difference(&image.columns_3x3(case.top, case.rows)?, &columns)?,
        super::largest_relative_difference(&image.affines()?, &affines)?,
    ))
}

/// The statistics kernel: `(images · groups · splits · 3)` f32 partial moments.
struct StatisticsOp {
    /// Read by the GPU side only.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    kernel: Kernel,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    geometry: Geometry,
}

impl CustomOp1 for StatisticsOp {
    fn name(&self) -> &'static str {
        "group-norm-statistics"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the group norm's columns run on CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let Kernel::Cuda(module) = &self.kernel else {
            candle_core::bail!("group norm statistics: no CUDA kernel for a CUDA tensor");
        };
        let partials = super::cuda::group_norm_statistics(module, (xs, layout), self.geometry)?;
        let geometry = self.geometry;
        let shape = Shape::from(geometry.images * geometry.groups * geometry.launch().splits * 3);
        Ok((partials, shape))
    }
}

/// The columns kernel over `(xs, weight, bias)`, with the statistics it reads.
struct ColumnsOp {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    kernel: Kernel,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    settings: Settings,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    partials: Tensor,
    top: usize,
    rows: usize,
}

impl CustomOp3 for ColumnsOp {
    fn name(&self) -> &'static str {
        "group-norm-columns"
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
        candle_core::bail!(
            "the group norm's columns (rows {}+{}) run on CUDA only",
            self.top,
            self.rows
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xs_layout: &Layout,
        weight: &candle_core::CudaStorage,
        weight_layout: &Layout,
        bias: &candle_core::CudaStorage,
        bias_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let Kernel::Cuda(module) = &self.kernel else {
            candle_core::bail!("group norm columns: no CUDA kernel for a CUDA tensor");
        };
        let (batch, channels, _, width) = xs_layout.shape().dims4()?;
        let (partials, partials_layout) = self.partials.storage_and_layout();
        let candle_core::Storage::Cuda(partials) = &*partials else {
            candle_core::bail!("group norm columns: the statistics are not on the GPU");
        };
        let columns = super::cuda::group_norm_columns(
            module,
            (xs, xs_layout),
            (weight, weight_layout),
            (bias, bias_layout),
            (partials, partials_layout),
            self.settings,
            (self.top, self.rows),
        )?;
        Ok((
            columns,
            Shape::from((batch, channels * 9, self.rows * width)),
        ))
    }
}

/// The affines kernel over `(partials, weight, bias)`: `(images · channels, 3)` f32.
struct AffinesOp {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    kernel: Kernel,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    settings: Settings,
}

impl CustomOp3 for AffinesOp {
    fn name(&self) -> &'static str {
        "group-norm-affines"
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
        candle_core::bail!("the group norm's affines run on CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        partials: &candle_core::CudaStorage,
        partials_layout: &Layout,
        weight: &candle_core::CudaStorage,
        weight_layout: &Layout,
        bias: &candle_core::CudaStorage,
        bias_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let Kernel::Cuda(module) = &self.kernel else {
            candle_core::bail!("group norm affines: no CUDA kernel for a CUDA tensor");
        };
        let affines = super::cuda::group_norm_affines(
            module,
            (partials, partials_layout),
            (weight, weight_layout),
            (bias, bias_layout),
            self.settings,
        )?;
        let geometry = self.settings.geometry;
        Ok((
            affines,
            Shape::from((geometry.images * geometry.channels, 3)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kernels::emulation;
    use crate::engine::kernels::largest_relative_difference;

    #[test]
    fn the_cuda_source_agrees_with_the_cpu_on_an_emulated_gpu() {
        let Some(runner) = emulation::Runner::build("group_norm_runner.cpp") else {
            return;
        };
        for case in CHECK_CASES {
            let [xs, weight, bias] = group_norm::random_inputs(&case.dims, case.dtype).unwrap();
            let settings = case.settings();
            let expected = reference(&xs, &weight, &bias, settings, (case.top, case.rows)).unwrap();
            let geometry = settings.geometry;
            let launch = geometry.launch();
            let [_, _, height, width] = case.dims;
            let (blocks, _) = im2col::grid(geometry.images * geometry.channels, case.rows * width);
            let args = [
                if case.dtype == DType::F16 {
                    "f16"
                } else {
                    "f32"
                }
                .to_owned(),
                geometry.images.to_string(),
                geometry.channels.to_string(),
                geometry.groups.to_string(),
                geometry.plane_len.to_string(),
                launch.splits.to_string(),
                launch.split_len.to_string(),
                launch.blocks_per_plane.to_string(),
                group_norm::CHECK_EPS.to_string(),
                u32::from(case.activation == Activation::Silu).to_string(),
                height.to_string(),
                width.to_string(),
                case.top.to_string(),
                case.rows.to_string(),
                blocks.to_string(),
            ];
            let got = runner
                .run(
                    args.iter().map(String::as_str),
                    &[&xs, &weight, &bias],
                    case.dtype,
                    expected.shape(),
                )
                .unwrap();
            let difference = largest_relative_difference(&got, &expected).unwrap();
            assert!(
                difference <= group_norm::check_tolerance(case.dtype),
                "{case:?}: {difference} from the CPU"
            );
        }
    }

    #[test]
    fn the_reference_affines_normalise_as_the_group_norm_does() {
        // What the affines kernel is checked against, checked against the group norm itself.
        let dims = [2, 8, 5, 3];
        let [xs, weight, bias] = group_norm::random_inputs(&dims, DType::F32).unwrap();
        let settings = Settings {
            geometry: Geometry {
                images: 2,
                channels: 8,
                groups: 4,
                plane_len: 15,
            },
            eps: group_norm::CHECK_EPS,
            activation: Activation::None,
        };
        let affines = reference_affines(&xs, &weight, &bias, settings)
            .unwrap()
            .reshape((2, 8, 1, 3))
            .unwrap();
        let part = |index: usize| affines.narrow(3, index, 1).unwrap();
        let normalised = xs
            .broadcast_sub(&part(0))
            .unwrap()
            .broadcast_mul(&part(1))
            .unwrap()
            .broadcast_add(&part(2))
            .unwrap();
        let expected = group_norm::fused(
            Kernel::Cpu,
            &xs,
            &weight,
            &bias,
            4,
            settings.eps,
            Activation::None,
        )
        .unwrap();
        let difference = largest_relative_difference(&normalised, &expected).unwrap();
        assert!(difference < 1e-5, "{difference}");
    }

    #[test]
    fn the_affines_kernel_agrees_with_the_cpu_on_an_emulated_gpu() {
        let Some(runner) = emulation::Runner::build("group_norm_runner.cpp") else {
            return;
        };
        // Rows split across blocks (33 × 17 × 8 channels a group) and planes of one pixel.
        for (dims, groups) in [([2, 32, 33, 17], 4), ([3, 6, 1, 1], 3)] {
            let [xs, weight, bias] = group_norm::random_inputs(&dims, DType::F32).unwrap();
            let settings = Settings {
                geometry: Geometry {
                    images: dims[0],
                    channels: dims[1],
                    groups,
                    plane_len: dims[2] * dims[3],
                },
                eps: group_norm::CHECK_EPS,
                activation: Activation::Silu,
            };
            let expected = reference_affines(&xs, &weight, &bias, settings).unwrap();
            let geometry = settings.geometry;
            let launch = geometry.launch();
            let args = [
                "f32".to_owned(),
                geometry.images.to_string(),
                geometry.channels.to_string(),
                geometry.groups.to_string(),
                geometry.plane_len.to_string(),
                launch.splits.to_string(),
                launch.split_len.to_string(),
                launch.blocks_per_plane.to_string(),
                group_norm::CHECK_EPS.to_string(),
                "1".to_owned(),
                "affines".to_owned(),
            ];
            let got = runner
                .run(
                    args.iter().map(String::as_str),
                    &[&xs, &weight, &bias],
                    DType::F32,
                    expected.shape(),
                )
                .unwrap();
            let difference = largest_relative_difference(&got, &expected).unwrap();
            assert!(difference < 1e-4, "{dims:?}: {difference} from the CPU");
        }
    }

    #[test]
    fn the_reference_pads_the_normalised_image_with_zeros() {
        // One channel of constant 5 normalises to its bias, 2: inside the image every tap
        // reads 2, beyond the edges 0 (the convolution pads what it sees, the normalised
        // image), not the normalised value of a zero input.
        let device = candle_core::Device::Cpu;
        let xs = Tensor::full(5f32, (1, 1, 2, 2), &device).unwrap();
        let weight = Tensor::new(&[3f32], &device).unwrap();
        let bias = Tensor::new(&[2f32], &device).unwrap();
        let settings = Settings {
            geometry: Geometry {
                images: 1,
                channels: 1,
                groups: 1,
                plane_len: 4,
            },
            eps: 1e-5,
            activation: Activation::None,
        };
        let columns = reference(&xs, &weight, &bias, settings, (0, 2)).unwrap();
        // Cell (0, 0)'s taps: the row above and the column left are outside.
        let first_cell: Vec<f32> = columns
            .squeeze(0)
            .unwrap()
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(first_cell, [0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 0.0, 2.0, 2.0]);
        // And the CPU never prepares an image for it.
        assert!(
            normalized_image(&xs, &weight, &bias, 1, 1e-5, Activation::None)
                .unwrap()
                .is_none()
        );
    }
}

//! Group normalisation with its affine and an optional SiLU as one op: statistics per
//! (image, group) in f32 or better, `(x − mean) / √(var + eps) · weight + bias`, then SiLU,
//! rounded to the input's dtype once. candle composes the same from ~14 kernels (and rounds
//! after normalising, again after the weight and the bias); the CUDA kernels
//! (`group_norm.cu`) make two passes over memory, the CPU code one per row for the
//! statistics and one for the output, across threads.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// What follows the normalisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    None,
    Silu,
}

/// `xs` `(images, channels, …)` normalised over `groups` groups of channels, scaled by
/// `weight` and shifted by `bias` (both `(channels,)`), then `activation`. Our kernel where
/// it applies (see [`super`]), candle's composition elsewhere.
pub fn group_norm(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    activation: Activation,
) -> Result<Tensor> {
    let kernel = match Geometry::of(xs, weight, bias, groups) {
        Some(geometry) if super::enabled() => Kernel::for_device(xs.device(), xs.dtype(), geometry),
        _ => None,
    };
    match kernel {
        Some(kernel) => fused(kernel, xs, weight, bias, groups, eps, activation),
        None => group_norm_composed(xs, weight, bias, groups, eps, activation),
    }
}

/// The same through candle's own ops (`candle_nn::GroupNorm`, then `silu`): the fallback, and
/// the baseline our kernels are measured against.
pub fn group_norm_composed(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    activation: Activation,
) -> Result<Tensor> {
    let channels = xs.dim(1)?;
    let normed = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)
        .and_then(|norm| candle_core::Module::forward(&norm, xs))?;
    match activation {
        Activation::None => Ok(normed),
        Activation::Silu => candle_nn::ops::silu(&normed),
    }
}

/// Runs our kernel `kernel` (which the caller chose for this device and dtype).
pub(super) fn fused(
    kernel: Kernel,
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    activation: Activation,
) -> Result<Tensor> {
    let op = GroupNormOp {
        groups,
        eps,
        activation,
        kernel,
    };
    xs.contiguous()?
        .apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)
}

/// The shape of a group norm, as the kernels index it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Geometry {
    pub images: usize,
    pub channels: usize,
    pub groups: usize,
    /// Elements per (image, channel): the product of the dimensions after the channels.
    pub plane_len: usize,
}

impl Geometry {
    /// `None` where the op does not apply and candle's composition runs instead (it then
    /// reports what is wrong, if anything): fewer than 3 dimensions, channels that the
    /// groups do not divide, weight or bias of another dtype or length, nothing to norm.
    pub(super) fn of(xs: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize) -> Option<Self> {
        let dims = xs.dims();
        if dims.len() < 3 || groups == 0 {
            return None;
        }
        let geometry = Self {
            images: dims[0],
            channels: dims[1],
            groups,
            plane_len: dims[2..].iter().product(),
        };
        let matches =
            |tensor: &Tensor| tensor.dtype() == xs.dtype() && tensor.dims() == [geometry.channels];
        (geometry.channels.is_multiple_of(groups)
            && geometry.plane_len > 0
            && geometry.images > 0
            && matches(weight)
            && matches(bias))
        .then_some(geometry)
    }

    fn from_layout(layout: &Layout, groups: usize) -> Result<Self> {
        let dims = layout.dims();
        if dims.len() < 3 || groups == 0 || !dims[1].is_multiple_of(groups) {
            candle_core::bail!("group norm: {groups} groups cannot norm a {dims:?} tensor");
        }
        Ok(Self {
            images: dims[0],
            channels: dims[1],
            groups,
            plane_len: dims[2..].iter().product(),
        })
    }

    pub fn channels_per_group(self) -> usize {
        self.channels / self.groups
    }

    /// Elements per (image, group): the span the statistics are taken over.
    pub fn row_len(self) -> usize {
        self.channels_per_group() * self.plane_len
    }

    #[cfg(feature = "cuda")]
    pub fn elements(self) -> usize {
        self.images * self.channels * self.plane_len
    }

    /// How the CUDA kernels divide this group norm among their blocks.
    #[cfg(any(test, feature = "cuda"))]
    pub fn launch(self) -> Launch {
        let row_len = self.row_len();
        // Enough blocks per row to fill the GPU when rows are few and long (a VAE at 1024²:
        // 32 rows of 4 M values), at most 32 (the apply kernel's first warp merges them).
        let splits = row_len.div_ceil(16_384).clamp(1, 32);
        Launch {
            splits,
            split_len: row_len.div_ceil(splits),
            // About four values per thread, at most 1024 blocks per plane.
            blocks_per_plane: self.plane_len.div_ceil(THREADS * 4).clamp(1, 1024),
        }
    }
}

/// What our CUDA kernels are checked on (on each device before it first runs them, and in the
/// tests on the emulation): both dtypes, both activations, rows split across blocks, planes
/// smaller than a block.
#[cfg(any(test, feature = "cuda"))]
pub(super) const CHECK_CASES: [(&[usize], usize, DType, Activation); 4] = [
    (&[2, 64, 9, 7], 32, DType::F16, Activation::Silu),
    (&[1, 32, 33, 17], 8, DType::F32, Activation::None),
    (&[1, 32, 128, 128], 4, DType::F16, Activation::Silu),
    (&[2, 12, 40], 4, DType::F32, Activation::Silu),
];

/// The epsilon of the checks.
#[cfg(any(test, feature = "cuda"))]
pub(super) const CHECK_EPS: f64 = 1e-5;

/// A random input of `dims`, and a weight and bias for its channels, in `dtype`, on the CPU:
/// off-centre and wide, as activations are (a mean far from 0 must cancel nothing).
#[cfg(any(test, feature = "cuda"))]
pub(super) fn random_inputs(dims: &[usize], dtype: DType) -> Result<[Tensor; 3]> {
    let channels = dims[1];
    let cpu = Device::Cpu;
    // Seeded, so that a test's verdict does not change from run to run.
    let mut noise = crate::engine::noise::NoiseSource::new(dims.iter().product::<usize>() as u64);
    Ok([
        noise
            .tensor(dims, &cpu)?
            .affine(2.0, 3.0)?
            .to_dtype(dtype)?,
        noise
            .tensor(&[channels], &cpu)?
            .affine(0.5, 1.0)?
            .to_dtype(dtype)?,
        noise
            .tensor(&[channels], &cpu)?
            .affine(0.5, 0.0)?
            .to_dtype(dtype)?,
    ])
}

/// How far the CUDA kernels may be from the CPU op, relative to the values: both round once
/// from f32 and differ only in the order of their sums (and SiLU's exponential), a flipped
/// last bit.
#[cfg(any(test, feature = "cuda"))]
pub(super) fn check_tolerance(dtype: DType) -> f32 {
    if dtype == DType::F16 { 4e-3 } else { 1e-5 }
}

/// Threads per block of the CUDA kernels (`THREADS` in `group_norm.cu`).
#[cfg(any(test, feature = "cuda"))]
pub(super) const THREADS: usize = 256;

/// How the CUDA kernels divide one group norm: the statistics kernel takes each (image,
/// group) row in `splits` blocks of `split_len` values, the apply kernel each (image,
/// channel) plane in `blocks_per_plane` blocks. The launch and the emulated tests both use it.
#[cfg(any(test, feature = "cuda"))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Launch {
    pub splits: usize,
    pub split_len: usize,
    pub blocks_per_plane: usize,
}

/// Where the op runs.
#[derive(Clone, Debug)]
pub(super) enum Kernel {
    Cpu,
    /// The checked CUDA module (see [`super::cuda`]).
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaModule>),
}

impl Kernel {
    /// Ours for this device, dtype and shape, or `None` for candle's composition.
    pub(super) fn for_device(device: &Device, dtype: DType, geometry: Geometry) -> Option<Self> {
        match device {
            Device::Cpu => {
                matches!(dtype, DType::F32 | DType::F16 | DType::BF16).then_some(Self::Cpu)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => {
                if !super::cuda::group_norm_fits(dtype, geometry) {
                    return None;
                }
                super::cuda::checked_module(cuda, super::cuda::Family::GroupNorm).map(Self::Cuda)
            }
            _ => {
                let _ = geometry;
                None
            }
        }
    }
}

struct GroupNormOp {
    groups: usize,
    eps: f64,
    activation: Activation,
    /// Read by the GPU side only: the CPU has one kernel.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    kernel: Kernel,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let geometry = Geometry::from_layout(xs_layout, self.groups)?;
        let settings = Settings {
            geometry,
            eps: self.eps,
            activation: self.activation,
        };
        let layouts = [xs_layout, weight_layout, bias_layout];
        let out = match (xs, weight, bias) {
            (CpuStorage::F32(xs), CpuStorage::F32(weight), CpuStorage::F32(bias)) => {
                CpuStorage::F32(cpu_op([xs, weight, bias], layouts, settings)?)
            }
            (CpuStorage::F16(xs), CpuStorage::F16(weight), CpuStorage::F16(bias)) => {
                CpuStorage::F16(cpu_op([xs, weight, bias], layouts, settings)?)
            }
            (CpuStorage::BF16(xs), CpuStorage::BF16(weight), CpuStorage::BF16(bias)) => {
                CpuStorage::BF16(cpu_op([xs, weight, bias], layouts, settings)?)
            }
            _ => candle_core::bail!(
                "group norm on the CPU takes f32, f16 or bf16, all three alike (got {:?}, {:?}, {:?})",
                xs.dtype(),
                weight.dtype(),
                bias.dtype()
            ),
        };
        Ok((out, xs_layout.shape().clone()))
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
            candle_core::bail!("group norm: no CUDA kernel was chosen for a CUDA tensor");
        };
        let settings = Settings {
            geometry: Geometry::from_layout(xs_layout, self.groups)?,
            eps: self.eps,
            activation: self.activation,
        };
        let out = super::cuda::group_norm(
            module,
            (xs, xs_layout),
            (weight, weight_layout),
            (bias, bias_layout),
            settings,
        )?;
        Ok((out, xs_layout.shape().clone()))
    }
}

/// Everything about one call but the data.
#[derive(Clone, Copy, Debug)]
pub(super) struct Settings {
    pub geometry: Geometry,
    pub eps: f64,
    pub activation: Activation,
}

/// The op on the contiguous parts of `xs`, `weight` and `bias` that the layouts describe
/// (the op made its inputs contiguous).
fn cpu_op<T: WithDType>(
    data: [&[T]; 3],
    layouts: [&Layout; 3],
    settings: Settings,
) -> Result<Vec<T>> {
    let mut parts = [&[][..]; 3];
    for ((part, data), layout) in parts.iter_mut().zip(data).zip(layouts) {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("group norm: an input is not contiguous");
        };
        *part = &data[start..end];
    }
    let [xs, weight, bias] = parts;
    Ok(cpu(xs, weight, bias, settings))
}

/// The op on the CPU: each row's moments, then every plane, across threads.
fn cpu<T: WithDType>(xs: &[T], weight: &[T], bias: &[T], settings: Settings) -> Vec<T> {
    let Settings {
        geometry,
        eps,
        activation,
    } = settings;
    let moments: Vec<(f32, f32)> = xs
        .par_chunks(geometry.row_len())
        .map(|row| mean_and_inverse_std(row, eps))
        .collect();
    let mut out = vec![T::from_f64(0.0); xs.len()];
    out.par_chunks_mut(geometry.plane_len)
        .zip(xs.par_chunks(geometry.plane_len))
        .enumerate()
        .for_each(|(plane, (out, xs))| {
            let channel = plane % geometry.channels;
            let row = plane / geometry.channels * geometry.groups
                + channel / geometry.channels_per_group();
            let (mean, inverse_std) = moments[row];
            let scale = weight[channel].to_f64() as f32 * inverse_std;
            let shift = bias[channel].to_f64() as f32;
            for (out, x) in out.iter_mut().zip(xs) {
                let mut y = (x.to_f64() as f32 - mean) * scale + shift;
                if activation == Activation::Silu {
                    y /= 1.0 + (-y).exp();
                }
                *out = T::from_f64(f64::from(y));
            }
        });
    out
}

/// A row's mean and 1 / √(variance + eps) in one pass: f64 sums of the values shifted by
/// the row's first one (so a mean far from 0 cancels nothing), in 8 independent lanes.
fn mean_and_inverse_std<T: WithDType>(row: &[T], eps: f64) -> (f32, f32) {
    const LANES: usize = 8;
    let pivot = row.first().map_or(0.0, |first| first.to_f64());
    let mut sums = [0f64; LANES];
    let mut squares = [0f64; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for ((sum, square), x) in sums.iter_mut().zip(&mut squares).zip(chunk) {
            let deviation = x.to_f64() - pivot;
            *sum += deviation;
            *square += deviation * deviation;
        }
    }
    for ((sum, square), x) in sums.iter_mut().zip(&mut squares).zip(rest) {
        let deviation = x.to_f64() - pivot;
        *sum += deviation;
        *square += deviation * deviation;
    }
    let count = row.len().max(1) as f64;
    let shift = sums.iter().sum::<f64>() / count;
    let variance = (squares.iter().sum::<f64>() / count - shift * shift).max(0.0);
    (
        (pivot + shift) as f32,
        (1.0 / (variance + eps).sqrt()) as f32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kernels::emulation;
    use crate::engine::kernels::largest_relative_difference;

    #[test]
    fn the_cuda_source_agrees_with_the_cpu_op_on_an_emulated_gpu() {
        let Some(runner) = emulation::Runner::build("group_norm_runner.cpp") else {
            return;
        };
        for (dims, groups, dtype, activation) in CHECK_CASES {
            let [xs, weight, bias] = random_inputs(dims, dtype).unwrap();
            let expected = fused(
                Kernel::Cpu,
                &xs,
                &weight,
                &bias,
                groups,
                CHECK_EPS,
                activation,
            )
            .unwrap();
            let geometry = Geometry::of(&xs, &weight, &bias, groups).unwrap();
            let launch = geometry.launch();
            let args = [
                if dtype == DType::F16 { "f16" } else { "f32" }.to_owned(),
                geometry.images.to_string(),
                geometry.channels.to_string(),
                geometry.groups.to_string(),
                geometry.plane_len.to_string(),
                launch.splits.to_string(),
                launch.split_len.to_string(),
                launch.blocks_per_plane.to_string(),
                CHECK_EPS.to_string(),
                u32::from(activation == Activation::Silu).to_string(),
            ];
            let got = runner
                .run(
                    args.iter().map(String::as_str),
                    &[&xs, &weight, &bias],
                    dtype,
                    xs.shape(),
                )
                .unwrap();
            let difference = largest_relative_difference(&got, &expected).unwrap();
            assert!(
                difference <= check_tolerance(dtype),
                "{dims:?} in {groups} groups, {dtype:?}, {activation:?}, {launch:?}: \
                 {difference} from the CPU op"
            );
        }
    }

    fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
        crate::engine::kernels::largest_difference(a, b).unwrap()
    }

    #[test]
    fn the_cpu_op_matches_candles_composition() {
        // (dims, groups): UNet-like, VAE-like, one group, one channel per group, rank 3 and 5.
        let cases: [(&[usize], usize); 6] = [
            (&[2, 64, 9, 7], 32),
            (&[1, 32, 33, 17], 8),
            (&[3, 16, 5, 5], 1),
            (&[1, 8, 4, 4], 8),
            (&[2, 12, 40], 4),
            (&[1, 8, 3, 4, 5], 2),
        ];
        for (dims, groups) in cases {
            for activation in [Activation::None, Activation::Silu] {
                let [xs, weight, bias] = random_inputs(dims, DType::F32).unwrap();
                let ours =
                    fused(Kernel::Cpu, &xs, &weight, &bias, groups, 1e-5, activation).unwrap();
                let candle =
                    group_norm_composed(&xs, &weight, &bias, groups, 1e-5, activation).unwrap();
                assert_eq!(ours.dims(), dims);
                let difference = max_difference(&ours, &candle);
                assert!(
                    difference < 2e-5,
                    "{dims:?} / {groups} groups, {activation:?}: max |Δ| {difference}"
                );
            }
        }
    }

    #[test]
    fn f16_and_bf16_round_once_from_the_f32_result() {
        let [xs, weight, bias] = random_inputs(&[2, 32, 16, 16], DType::F32).unwrap();
        let reference = fused(Kernel::Cpu, &xs, &weight, &bias, 8, 1e-6, Activation::Silu).unwrap();
        for (dtype, ulp) in [(DType::F16, 2f32.powi(-10)), (DType::BF16, 2f32.powi(-7))] {
            let [xs, weight, bias] = [&xs, &weight, &bias].map(|t| t.to_dtype(dtype).unwrap());
            let ours = fused(Kernel::Cpu, &xs, &weight, &bias, 8, 1e-6, Activation::Silu).unwrap();
            assert_eq!(ours.dtype(), dtype);
            let candle =
                group_norm_composed(&xs, &weight, &bias, 8, 1e-6, Activation::Silu).unwrap();
            // Inputs rounded to the dtype move the result by a few ulps at most; candle's
            // three roundings (normalised, scaled, shifted) and SiLU's add more.
            let ours_error = max_difference(&ours, &reference);
            let candle_error = max_difference(&candle, &reference);
            assert!(ours_error < 16.0 * ulp, "{dtype:?}: ours {ours_error}");
            assert!(
                ours_error <= candle_error,
                "{dtype:?}: ours {ours_error} > candle {candle_error}"
            );
            // Once: the op on the same (rounded) inputs in f32, then rounded. Exactly in f16;
            // in bf16 the two conversions (ours from f64, candle's from f32) may part by an ulp.
            let [xs, weight, bias] = [&xs, &weight, &bias].map(|t| t.to_dtype(DType::F32).unwrap());
            let in_f32 =
                fused(Kernel::Cpu, &xs, &weight, &bias, 8, 1e-6, Activation::Silu).unwrap();
            let rounded_once = in_f32.to_dtype(dtype).unwrap();
            let apart =
                crate::engine::kernels::largest_relative_difference(&ours, &rounded_once).unwrap();
            let allowed = if dtype == DType::F16 { 0.0 } else { ulp };
            assert!(apart <= allowed, "{dtype:?}: {apart} from rounding once");
        }
    }

    #[test]
    fn a_constant_group_normalises_to_the_bias() {
        // Variance 0: eps alone keeps it finite, and every output is the bias (then SiLU).
        let xs = Tensor::full(7.5f32, (1, 4, 3, 3), &Device::Cpu).unwrap();
        let weight = Tensor::new(&[2f32, 2.0, 2.0, 2.0], &Device::Cpu).unwrap();
        let bias = Tensor::new(&[0.5f32, -1.0, 0.0, 3.0], &Device::Cpu).unwrap();
        let out = fused(Kernel::Cpu, &xs, &weight, &bias, 2, 1e-5, Activation::None).unwrap();
        let planes = out.mean((2, 3)).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(planes, [[0.5, -1.0, 0.0, 3.0]]);
    }

    #[test]
    fn a_non_contiguous_input_is_normed_as_its_values() {
        let [xs, weight, bias] = random_inputs(&[2, 16, 6, 10], DType::F32).unwrap();
        let transposed = xs.transpose(2, 3).unwrap();
        assert!(!transposed.is_contiguous());
        let ours = group_norm(&transposed, &weight, &bias, 4, 1e-5, Activation::Silu).unwrap();
        let candle = group_norm_composed(
            &transposed.contiguous().unwrap(),
            &weight,
            &bias,
            4,
            1e-5,
            Activation::Silu,
        )
        .unwrap();
        assert!(max_difference(&ours, &candle) < 2e-5);
    }

    #[test]
    fn shapes_the_op_does_not_take_go_to_candle_and_its_errors() {
        let device = Device::Cpu;
        let weight = Tensor::ones(6, DType::F32, &device).unwrap();
        let bias = Tensor::zeros(6, DType::F32, &device).unwrap();
        // 6 channels in 4 groups: candle's own error, not a panic or a wrong answer.
        let xs = Tensor::ones((1, 6, 2, 2), DType::F32, &device).unwrap();
        let error = group_norm(&xs, &weight, &bias, 4, 1e-5, Activation::None).unwrap_err();
        assert!(error.to_string().contains("must divide"), "{error}");
        // Rank 2: candle refuses it too.
        let flat = Tensor::ones((1, 6), DType::F32, &device).unwrap();
        assert!(group_norm(&flat, &weight, &bias, 3, 1e-5, Activation::None).is_err());
        // f64 is not ours but candle's: same numbers.
        let [xs, weight, bias] = random_inputs(&[1, 6, 3, 3], DType::F64).unwrap();
        let ours = group_norm(&xs, &weight, &bias, 3, 1e-5, Activation::Silu).unwrap();
        let candle = group_norm_composed(&xs, &weight, &bias, 3, 1e-5, Activation::Silu).unwrap();
        assert_eq!(max_difference(&ours, &candle), 0.0);
    }
}

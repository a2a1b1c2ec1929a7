//! A 3×3 convolution (stride 1, padded by one cell) with its bias, straight from the image:
//! on CUDA, our implicit-GEMM kernel (`conv3x3.cu`), whose column matrix exists only a tile at
//! a time in shared memory; in f16 on every supported card, and f32 (an upcast VAE: SDXL's) in
//! TF32 on Ampere and newer, as PyTorch's convolutions run by default. Against the column path
//! ([`super::im2col`]: nine times the image written to memory, read back by a GEMM, then a
//! pass for the bias) it holds no column buffer, moves a ninth of the data, and rounds once.
//! An upsampler's convolution reads its input doubled ([`Source::Doubled`]) and a convolution
//! after a group norm and SiLU reads its input normalised ([`forward_normalized`]), as the
//! columns do.
//!
//! The kernel takes a block of input channels per step (16 in f16, 8 in f32: 32 bytes of each
//! pixel, [`channel_block`]), so it reads the weights in such blocks, each block's nine taps
//! in a row: `(c_out, c_in / block, 9, block)` ([`kernel_order`]).
//! Where the output makes fewer tiles than the card runs blocks at once (the UNets' deep
//! levels), the input channels are shared among several blocks per tile ([`Splits`]), whose
//! f32 partial sums a second kernel adds up.
//! A model whose convolution it [`takes`] stores its weights that way from the start (once:
//! [`stored_order`] makes the usual layout back where another path must run). Elsewhere (the
//! CPU, f32 before Ampere, channel counts it does not take, a card where the column path was
//! faster) [`forward`] answers `None` and the caller runs the column path or candle's
//! convolution. The f16 and TF32 kernels are checked and raced apart, so either may run
//! without the other, and each is raced at the UNet's and at the VAE decoder's shapes apart
//! ([`Part`]), so it may run for one model part and not the other. [`reference`] is the same convolution on the CPU in f32: what the kernel
//! is checked against, on each device before it first runs there and in the tests on the
//! emulation. [`SWITCH`] turns both off, to measure them against the column path.

use std::sync::OnceLock;

use candle_core::{DType, Device, Result, Tensor};

use super::im2col::Source;
use super::norm_columns::NormalizedImage;

/// Output channels per block of the grid (`TILE_M`).
pub const OUTPUT_TILE: usize = 64;
/// Output cells per block (`TILE_N`).
pub const CELL_TILE: usize = 128;
/// Threads per block (`THREADS`).
#[cfg(any(test, feature = "cuda"))]
pub(super) const THREADS: usize = 128;

/// The input channels a step of the kernel takes in `dtype` (`Step<T>::CHANNELS` in
/// `conv3x3.cu`: 32 bytes of a pixel): the block of the weights' order, and what `c_in` must
/// be a multiple of. `None`: a dtype the kernel does not take.
pub fn channel_block(dtype: DType) -> Option<usize> {
    match dtype {
        DType::F16 => Some(16),
        DType::F32 => Some(8),
        _ => None,
    }
}

/// Whether the kernel takes these channel counts in `dtype`: whole blocks of input channels
/// (every convolution of the UNets and VAEs but the first, which reads the 4 latent
/// channels); any number of outputs (a tile's outputs past the last are computed from zero
/// weights and not written: the model's last convolution, to 3 or 4 channels, wastes most of
/// one tile's arithmetic, and holds no column buffer).
pub fn fits(dtype: DType, in_channels: usize, out_channels: usize) -> bool {
    whole_blocks(dtype, in_channels) && out_channels > 0
}

/// Whether `in_channels` are whole blocks of [`channel_block`] in `dtype`.
fn whole_blocks(dtype: DType, in_channels: usize) -> bool {
    channel_block(dtype).is_some_and(|block| in_channels > 0 && in_channels.is_multiple_of(block))
}

/// The environment variable that turns this kernel off alone (`0`, `off` or `false`), so that
/// the column path runs: to measure one against the other (`benches/gpu` does).
pub const SWITCH: &str = "STUDIO_WORKER_IMPLICIT_CONVOLUTION";

/// Whether [`SWITCH`] leaves this kernel on in this process.
fn switched_on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let value = std::env::var(SWITCH).unwrap_or_default();
        let off = super::switched_off(&value);
        if off {
            tracing::info!("{SWITCH}={value}: 3×3 convolutions run on the column path");
        }
        !off
    })
}

/// Whether inputs of `in_channels` in `dtype` are the kernel's kind (f16 or f32, whole
/// channel blocks) and our kernels, this one included, are on in this process.
fn eligible(dtype: DType, in_channels: usize) -> bool {
    whole_blocks(dtype, in_channels) && super::enabled() && switched_on()
}

/// The model part a convolution is of. Their convolutions are GEMMs of other shapes (the
/// UNet's: many channels over few cells, the decoder's: few channels over many cells), so
/// the card's race times our kernel at each part's shapes and keeps it for the parts where it
/// is not slower: a card may favour it for one and not the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    Unet,
    Decoder,
}

impl Part {
    pub const ALL: [Part; 2] = [Part::Unet, Part::Decoder];

    /// The part's name in the race's log line.
    pub fn name(self) -> &'static str {
        match self {
            Part::Unet => "the UNet's",
            Part::Decoder => "the VAE decoder's",
        }
    }
}

/// Whether our kernel runs a convolution of `part` from `in_channels` to `out_channels`
/// whose weights are `dtype` on `device`: CUDA, f16 (or f32 on Ampere and newer), channel
/// counts it [`fits`], and the kernel loaded, checked and not slower there than what runs in
/// its place at the part's shapes (the device's kernels are raced first, once). A model
/// asks once per convolution as it loads, and keeps the weights in [`kernel_order`] if so;
/// a call asks [`runs_on`], which races nothing.
pub fn takes(
    device: &Device,
    dtype: DType,
    in_channels: usize,
    out_channels: usize,
    part: Part,
) -> bool {
    if !eligible(dtype, in_channels) || out_channels == 0 {
        return false;
    }
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => super::cuda::conv3x3_runs_on(cuda, dtype, part),
        _ => {
            let _ = part;
            false
        }
    }
}

/// Whether our kernel is on now for inputs of `in_channels` in `dtype` on `device`, for some
/// model part: loaded, checked, and not switched off whole by its race. (A convolution that
/// holds its weights in the kernel's order was taken for its part.)
pub fn runs_on(device: &Device, dtype: DType, in_channels: usize) -> bool {
    Part::ALL
        .into_iter()
        .any(|part| runs_for(device, dtype, in_channels, part))
}

/// Whether our kernel is on now for `part`'s inputs of `in_channels` in `dtype` on `device`:
/// loaded, checked, and not switched off for the part by its race (where the device was
/// raced).
pub fn runs_for(device: &Device, dtype: DType, in_channels: usize, part: Part) -> bool {
    if !eligible(dtype, in_channels) {
        return false;
    }
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => super::cuda::conv3x3_on(cuda, dtype, part),
        _ => {
            let _ = part;
            false
        }
    }
}

/// Weights `(c_out, c_in, 3, 3)` in the kernel's order, `(c_out, c_in / block, 9, block)`
/// with the block of their dtype; f32 weights also rounded to TF32 ([`round_to_tf32`]): the
/// tensor cores would drop their low bits (truncating: up to 2⁻¹⁰ of each weight, where
/// rounding leaves 2⁻¹¹, as the kernel rounds the image's values).
pub fn kernel_order(weight: &Tensor) -> Result<Tensor> {
    let ordered = in_kernel_layout(weight)?;
    if ordered.dtype() == DType::F32 {
        round_to_tf32(&ordered)
    } else {
        Ok(ordered)
    }
}

fn in_kernel_layout(weight: &Tensor) -> Result<Tensor> {
    let (out_channels, in_channels, height, width) = weight.dims4()?;
    let block = match channel_block(weight.dtype()) {
        Some(block) if (height, width) == (3, 3) && in_channels.is_multiple_of(block) => block,
        _ => candle_core::bail!(
            "{:?} {:?} are not 3×3 weights of whole channel blocks",
            weight.dims(),
            weight.dtype()
        ),
    };
    weight
        .reshape((out_channels, in_channels / block, block, 9))?
        .transpose(2, 3)?
        .contiguous()
}

/// f32 values rounded to TF32's 10 bits of mantissa, to nearest, on their own device with
/// f32 arithmetic alone (Veltkamp's split: `c = (2¹³ + 1)·x`, then `c − (c − x)` keeps the
/// 11 leading bits of the significand, rounded). Exact ties may go either way, where the
/// kernel's `cvt.rna` takes them away from zero. Values beyond 2¹¹⁴ would overflow: no
/// model's weight is near that.
pub fn round_to_tf32(values: &Tensor) -> Result<Tensor> {
    let scaled = (values * f64::from((1u32 << 13) + 1))?;
    &scaled - (&scaled - values)?
}

/// [`kernel_order`]'s weights back as `(c_out, c_in, 3, 3)` (in f32, as rounded to TF32).
pub fn stored_order(weights: &Tensor) -> Result<Tensor> {
    let (out_channels, blocks, taps, block) = weights.dims4()?;
    if taps != 9 || channel_block(weights.dtype()) != Some(block) {
        candle_core::bail!("{:?} are not weights in the kernel's order", weights.dims());
    }
    weights
        .transpose(2, 3)?
        .contiguous()?
        .reshape((out_channels, blocks * block, 3, 3))
}

/// How many output columns a block's tile spans for an output `width` cells wide: 16 (8 rows
/// of 16: the least halo per cell, 180 pixels for 128 cells, where a row of 128 reads 390),
/// or 8 (16 rows of 8, the same halo) where tiles of 16 would leave more than an eighth of
/// their cells past the image's edge. The tile is [`CELL_TILE`] / that many rows high.
pub fn tile_columns(width: usize) -> usize {
    if width.div_ceil(16) * 16 * 8 <= width * 9 {
        16
    } else {
        8
    }
}

/// Into how many parts K (the input channels × 9 taps) is split: one, or as many as fill a
/// device that runs `slots` blocks at once when the output's own `blocks` do not (the UNet's
/// deep levels: SD-Turbo's 1280 channels at 8² are 20 blocks, on a card that runs hundreds),
/// each part at least [`MIN_SPLIT_BLOCKS`] blocks of channels, at most [`MAX_SPLITS`] parts.
/// A part's partial sums go through memory in f32 (`conv3x3_sum_splits_f16` adds them up),
/// which the few blocks of such a grid make cheap: parts × tiles stay below twice the blocks
/// the card runs at once, so the sums take at most 64 KB per such block (26 MB on an H200),
/// within the working-memory estimate's allowance for the kernels' scratch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Splits {
    /// As many as fill the device ([`splits_to_fill`]).
    Fill,
    /// This many (the checks, the bench).
    Exactly(usize),
}

/// The fewest blocks of input channels a part of a split K walks: 4 (64 channels in f16, 576
/// of K), so a block's f32 partial sums (32 KB) stay small beside what it reads (about 95 KB).
pub const MIN_SPLIT_BLOCKS: usize = 4;
/// The most parts K is split into.
pub const MAX_SPLITS: usize = 16;

/// [`Splits::Fill`]'s count for a grid of `blocks` (tiles × output tiles × images) over
/// `channel_blocks` blocks of input channels, on a device that runs `slots` blocks at once.
pub fn splits_to_fill(blocks: usize, channel_blocks: usize, slots: usize) -> usize {
    if blocks == 0 || blocks >= slots {
        return 1;
    }
    let most = (channel_blocks / MIN_SPLIT_BLOCKS).clamp(1, MAX_SPLITS);
    slots.div_ceil(blocks).min(most)
}

/// The parts [`Splits::Fill`] splits K into for an output `(batch, out_channels, out_height,
/// out_width)` from `in_channels` in `dtype` on `device` (1 where our kernel does not run
/// there): for the bench, which prints it beside its timings.
pub fn parts_to_fill(
    device: &Device,
    dtype: DType,
    in_channels: usize,
    [batch, out_channels, out_height, out_width]: [usize; 4],
) -> usize {
    let Some(block) = channel_block(dtype) else {
        return 1;
    };
    let slots = match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => super::cuda::conv3x3_slots(cuda, dtype),
        _ => 0,
    };
    let (tiles, output_tiles, images) = grid(batch, out_channels, out_height, out_width);
    splits_to_fill(tiles * output_tiles * images, in_channels / block, slots)
}

/// The grid for an output `(batch, out_channels, out_height, out_width)`: x over the tiles of
/// cells (row by row), y over the tiles of output channels, z over the images (which the
/// launch multiplies by the parts of K where it splits it).
pub fn grid(
    batch: usize,
    out_channels: usize,
    out_height: usize,
    out_width: usize,
) -> (usize, usize, usize) {
    let columns = tile_columns(out_width);
    let rows = CELL_TILE / columns;
    (
        out_height.div_ceil(rows) * out_width.div_ceil(columns),
        out_channels.div_ceil(OUTPUT_TILE),
        batch,
    )
}

/// How the kernel reads its input.
#[derive(Clone, Copy, Debug)]
pub enum Reading<'a> {
    /// The image as `Source` says (as it is, or doubled).
    Image(Source),
    /// Each value through its plane's `affines` `(batch · c_in, 3)` (mean, scale, shift, f32),
    /// then SiLU if `silu`: a group norm's output.
    Normalized { affines: &'a Tensor, silu: bool },
}

/// `xs` `(batch, c_in, h, w)` read as `source` says, convolved with `weights` (in
/// [`kernel_order`]) plus `bias` `(c_out)`; `None` where our kernel does not run for it.
pub fn forward(
    xs: &Tensor,
    source: Source,
    weights: &Tensor,
    bias: &Tensor,
) -> Result<Option<Tensor>> {
    forward_split(xs, source, weights, bias, Splits::Fill)
}

/// [`forward`] with K split as `splits` says (the bench times the parts' worth).
pub fn forward_split(
    xs: &Tensor,
    source: Source,
    weights: &Tensor,
    bias: &Tensor,
    splits: Splits,
) -> Result<Option<Tensor>> {
    if !fits_weights(xs, weights) {
        return Ok(None);
    }
    // Where the kernel is off on the device, the launch answers `None`.
    launch(xs, Reading::Image(source), weights, bias, splits)
}

/// The convolution of `image` as its group norm and SiLU leave it (the normalised image is
/// never made: each value is normalised as the kernel loads it); `None` where our kernel does
/// not run for it.
pub fn forward_normalized(
    image: &NormalizedImage,
    weights: &Tensor,
    bias: &Tensor,
) -> Result<Option<Tensor>> {
    let xs = image.image();
    // Asked before the affines are made for it.
    if !fits_weights(xs, weights) || !runs_on(xs.device(), xs.dtype(), xs.dim(1)?) {
        return Ok(None);
    }
    let affines = image.affines()?;
    let reading = Reading::Normalized {
        affines: &affines,
        silu: image.silu(),
    };
    launch(xs, reading, weights, bias, Splits::Fill)
}

/// Whether `xs` and `weights` are the kernel's kind, and `weights` in its order for `xs`'s
/// channels.
fn fits_weights(xs: &Tensor, weights: &Tensor) -> bool {
    let Ok((out_channels, blocks, taps, block)) = weights.dims4() else {
        return false;
    };
    let in_channels = blocks * block;
    eligible(xs.dtype(), in_channels)
        && weights.dtype() == xs.dtype()
        && taps == 9
        && channel_block(xs.dtype()) == Some(block)
        && out_channels > 0
        && xs.dim(1).ok() == Some(in_channels)
}

/// The kernel on `xs`'s device, or `None` where it is not on there.
fn launch(
    xs: &Tensor,
    reading: Reading,
    weights: &Tensor,
    bias: &Tensor,
    splits: Splits,
) -> Result<Option<Tensor>> {
    match xs.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => super::cuda::conv3x3(cuda, xs, reading, weights, bias, splits),
        _ => {
            let _ = (reading, weights, bias, splits);
            Ok(None)
        }
    }
}

/// The same convolution on the CPU in f32: the input read as `reading` says (normalised values
/// rounded to the input's dtype, as the kernel stores them), candle's convolution with
/// `weight` as the model stores it, `(c_out, c_in, 3, 3)` (not rounded to TF32), plus the
/// bias.
pub fn reference(xs: &Tensor, reading: Reading, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let dtype = xs.dtype();
    let on_cpu = |tensor: &Tensor| tensor.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    let xs = on_cpu(xs)?;
    let input = match reading {
        Reading::Image(source) => source.materialise(&xs)?,
        Reading::Normalized { affines, silu } => {
            let (batch, channels, ..) = xs.dims4()?;
            let affines = on_cpu(affines)?.reshape((batch, channels, 3))?;
            let part = |index: usize| affines.narrow(2, index, 1)?.unsqueeze(3);
            let normalized = xs
                .broadcast_sub(&part(0)?)?
                .broadcast_mul(&part(1)?)?
                .broadcast_add(&part(2)?)?;
            let normalized = if silu {
                candle_nn::ops::silu(&normalized)?
            } else {
                normalized
            };
            normalized.to_dtype(dtype)?.to_dtype(DType::F32)?
        }
    };
    input
        .conv2d(&on_cpu(weight)?, 1, 1, 1, 1)?
        .broadcast_add(&on_cpu(bias)?.reshape((1, (), 1, 1))?)
}

/// One shape the kernel is checked on.
#[cfg(any(test, feature = "cuda"))]
#[derive(Clone, Copy, Debug)]
pub(super) struct CheckCase {
    /// The input, `(batch, c_in, h, w)`.
    pub dims: [usize; 4],
    pub out_channels: usize,
    pub source: Source,
    /// Normalised as it is read: `Some(silu)`.
    pub normalized: Option<bool>,
    /// The parts K is split into.
    pub splits: usize,
}

/// What the kernel is checked on: both tile widths it is given (8 with rows and columns past
/// the edge, 16 over one and several tiles down and across), one, two, three and four channel
/// blocks (the normalised kernel's two affine buffers in turn), one and several output tiles,
/// a model's last convolution (3 outputs), batches, a doubled input, normalised inputs with
/// and without SiLU, and K split in parts, evenly and not (4 blocks in 3 parts: 1, 1, 2).
#[cfg(any(test, feature = "cuda"))]
pub(super) const CHECK_CASES: [CheckCase; 8] = [
    CheckCase {
        dims: [1, 16, 5, 7],
        out_channels: 64,
        source: Source::AsIs,
        normalized: None,
        splits: 1,
    },
    CheckCase {
        dims: [2, 32, 5, 64],
        out_channels: 128,
        source: Source::AsIs,
        normalized: None,
        splits: 1,
    },
    CheckCase {
        dims: [1, 16, 3, 5],
        out_channels: 64,
        source: Source::Doubled,
        normalized: None,
        splits: 1,
    },
    CheckCase {
        dims: [1, 32, 6, 16],
        out_channels: 3,
        source: Source::AsIs,
        normalized: Some(true),
        splits: 1,
    },
    CheckCase {
        dims: [2, 32, 9, 20],
        out_channels: 64,
        source: Source::AsIs,
        normalized: Some(true),
        splits: 1,
    },
    CheckCase {
        dims: [1, 48, 2, 128],
        out_channels: 64,
        source: Source::AsIs,
        normalized: Some(false),
        splits: 1,
    },
    CheckCase {
        dims: [2, 32, 5, 64],
        out_channels: 80,
        source: Source::AsIs,
        normalized: None,
        splits: 2,
    },
    CheckCase {
        dims: [2, 64, 4, 9],
        out_channels: 64,
        source: Source::AsIs,
        normalized: Some(true),
        splits: 3,
    },
];

/// How far from [`reference`] the kernel may be, relative (`(1 + |y|)`): its output's one
/// rounding to f16 (2⁻¹¹ of the value) and sums in another order; in TF32 (f32 values), the
/// inputs' and the weights' rounding to 10 bits of mantissa (2⁻¹¹ each) in every product.
#[cfg(any(test, feature = "cuda"))]
pub(super) fn check_tolerance(dtype: DType) -> f32 {
    if dtype == DType::F32 { 4e-3 } else { 2e-3 }
}

/// A case's inputs on the CPU in `dtype`: the image, the weights as a model stores them
/// (scaled so that outputs are about the inputs' size: [`kernel_order`] makes the kernel's),
/// the bias, and for a normalised case the planes' affines (f32, values f16 holds exactly, as
/// the emulation passes them).
#[cfg(any(test, feature = "cuda"))]
pub(super) fn random_inputs(case: CheckCase, dtype: DType) -> Result<[Tensor; 4]> {
    let device = Device::Cpu;
    let [batch, in_channels, ..] = case.dims;
    let xs = (Tensor::randn(0f32, 1.0, case.dims.to_vec(), &device)? + 0.5)?.to_dtype(dtype)?;
    let spread = (9.0 * in_channels as f64).powf(-0.5);
    let weight = (Tensor::randn(0f32, 1.0, (case.out_channels, in_channels, 3, 3), &device)?
        * spread)?
        .to_dtype(dtype)?;
    let bias = Tensor::randn(0f32, 0.5, case.out_channels, &device)?.to_dtype(dtype)?;
    let planes = batch * in_channels;
    let means = Tensor::randn(0.5f32, 0.3, (planes, 1), &device)?;
    let scales = Tensor::rand(0.5f32, 1.5, (planes, 1), &device)?;
    let shifts = Tensor::randn(0f32, 0.5, (planes, 1), &device)?;
    let affines = Tensor::cat(&[means, scales, shifts], 1)?
        .to_dtype(DType::F16)?
        .to_dtype(DType::F32)?;
    Ok([xs, weight, bias, affines])
}

/// The case's [`Reading`] over `affines`.
#[cfg(any(test, feature = "cuda"))]
pub(super) fn reading(case: CheckCase, affines: &Tensor) -> Reading<'_> {
    match case.normalized {
        None => Reading::Image(case.source),
        Some(silu) => Reading::Normalized { affines, silu },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kernels::emulation;
    use crate::engine::kernels::largest_relative_difference;

    #[test]
    fn the_cuda_source_agrees_with_the_reference_on_an_emulated_gpu() {
        let Some(runner) = emulation::Runner::build("conv3x3_runner.cpp") else {
            return;
        };
        for (case, dtype) in CHECK_CASES
            .into_iter()
            .flat_map(|case| [(case, DType::F16), (case, DType::F32)])
        {
            let [xs, weight, bias, affines] = random_inputs(case, dtype).unwrap();
            let expected = reference(&xs, reading(case, &affines), &weight, &bias).unwrap();
            let weights = kernel_order(&weight).unwrap();
            let [batch, in_channels, height, width] = case.dims;
            let shift = case.source.shift();
            let args = [
                8 * dtype.size_in_bytes(),
                batch,
                in_channels,
                case.out_channels,
                height,
                width,
                shift,
                tile_columns(width << shift),
                usize::from(case.normalized.is_some()),
                usize::from(case.normalized == Some(true)),
                case.splits,
                THREADS,
            ]
            .map(|arg| arg.to_string());
            let mut inputs = vec![&xs, &weights, &bias];
            if case.normalized.is_some() {
                inputs.push(&affines);
            }
            let got = runner
                .run(
                    args.iter().map(String::as_str),
                    &inputs,
                    dtype,
                    expected.shape(),
                )
                .unwrap();
            // A NaN (a cell nobody wrote) fails too.
            let difference = largest_relative_difference(&got, &expected).unwrap();
            eprintln!("{case:?} {dtype:?}: {difference:.2e}");
            assert!(
                difference <= check_tolerance(dtype),
                "{case:?} {dtype:?}: {difference} from the reference"
            );
        }
    }

    #[test]
    fn k_is_split_only_where_the_grid_leaves_the_card_idle() {
        // An H200 runs 132 SMs × 3 blocks. SD-Turbo's deepest level (1280 channels at 8², one
        // image, f16: 80 channel blocks): 20 blocks, split as far as allowed (4 channel blocks
        // a part at least, 16 parts at most); SD 1.5's first level guided (320 channels at
        // 64²): 320 blocks, split in 2; a grid that fills the card, or channels too few to
        // share, not at all.
        let slots = 132 * 3;
        assert_eq!(splits_to_fill(20, 80, slots), 16);
        assert_eq!(splits_to_fill(80, 80, slots), 5);
        assert_eq!(splits_to_fill(320, 20, slots), 2);
        assert_eq!(splits_to_fill(396, 80, slots), 1);
        assert_eq!(splits_to_fill(20, 3, slots), 1);
        // 5 blocks of channels split 1 way only (4 a part at least).
        assert_eq!(splits_to_fill(20, 5, slots), 1);
        assert_eq!(splits_to_fill(20, 8, slots), 2);
        // A driver that did not say: no split.
        assert_eq!(splits_to_fill(20, 80, 0), 1);
        // Every part walks at least MIN_SPLIT_BLOCKS blocks, as the kernel divides them.
        for blocks in 1..64 {
            for channel_blocks in 1..200 {
                let splits = splits_to_fill(blocks, channel_blocks, slots);
                assert!((1..=MAX_SPLITS).contains(&splits));
                assert!(splits == 1 || channel_blocks / splits >= MIN_SPLIT_BLOCKS);
            }
        }
    }

    #[test]
    fn the_kernel_order_holds_each_block_of_channels_tap_by_tap_and_goes_back() {
        // Weight (o, c, ky, kx) = 1000 o + 10 c + 3 ky + kx, exact in f16 and f32.
        let (outputs, channels) = (2, 32);
        let values: Vec<f32> = (0..outputs * channels * 9)
            .map(|i| {
                let (o, c, tap) = (i / (channels * 9), i / 9 % channels, i % 9);
                (1000 * o + 10 * c + tap) as f32
            })
            .collect();
        let weight = Tensor::from_vec(values, (outputs, channels, 3, 3), &Device::Cpu).unwrap();
        // Blocks of 16 channels in f16, of 8 in f32.
        for (dtype, block) in [(DType::F16, 16), (DType::F32, 8)] {
            let weight = weight.to_dtype(dtype).unwrap();
            let ordered = kernel_order(&weight).unwrap();
            assert_eq!(
                ordered.dims4().unwrap(),
                (outputs, channels / block, 9, block)
            );
            // Output 1, channel block 1, tap 5 (ky 1, kx 2), channel 3 of the block.
            let value: f32 = ordered
                .get(1)
                .and_then(|t| t.get(1))
                .and_then(|t| t.get(5))
                .and_then(|t| t.get(3))
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.to_scalar())
                .unwrap();
            assert_eq!(value, (1000 + 10 * (block + 3) + 5) as f32, "{dtype:?}");
            let back = stored_order(&ordered).unwrap();
            assert_eq!(largest_relative_difference(&back, &weight).unwrap(), 0.0);
        }
        // Channels that are not whole blocks have no kernel order.
        let odd = Tensor::zeros((4, 8, 3, 3), DType::F16, &Device::Cpu).unwrap();
        assert!(kernel_order(&odd).is_err());
        let odd = Tensor::zeros((4, 12, 3, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(kernel_order(&odd).is_err());
    }

    #[test]
    fn f32_weights_are_rounded_to_tf32_to_nearest() {
        // Values across magnitudes and signs, with every pattern of the 13 bits dropped.
        let mut values: Vec<f32> = Tensor::randn(0f32, 1.0, 4096, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        values.extend((0..0x2000u32).map(|low| f32::from_bits(0x3F80_0000 | low)));
        values.extend((0..0x2000u32).map(|low| f32::from_bits(0xC2C8_0000 | low)));
        values.extend([0.0, -0.0, 1e-30, 3.0e30]);
        let count = values.len();
        let rounded: Vec<f32> =
            round_to_tf32(&Tensor::from_vec(values.clone(), count, &Device::Cpu).unwrap())
                .unwrap()
                .to_vec1()
                .unwrap();
        for (value, rounded) in values.into_iter().zip(rounded) {
            let bits = value.to_bits();
            let down = f32::from_bits(bits & 0xFFFF_E000);
            let up = f32::from_bits((bits & 0xFFFF_E000) + 0x2000);
            assert_eq!(
                rounded.to_bits() & 0x1FFF,
                0,
                "{value:e} → {rounded:e} keeps low bits"
            );
            match bits & 0x1FFF {
                // A tie: either neighbour.
                0x1000 => assert!(rounded == down || rounded == up, "{value:e} → {rounded:e}"),
                low if low < 0x1000 => assert_eq!(rounded, down, "{value:e}"),
                _ => assert_eq!(rounded, up, "{value:e}"),
            }
        }
        // In the kernel's order f32 weights are rounded, f16 ones kept as they are.
        let weight = Tensor::from_vec(
            vec![f32::from_bits(0x3F80_1001); 8 * 9],
            (1, 8, 3, 3),
            &Device::Cpu,
        )
        .unwrap();
        let ordered: Vec<f32> = kernel_order(&weight)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            ordered
                .iter()
                .all(|&value| value == f32::from_bits(0x3F80_2000))
        );
    }

    #[test]
    fn tiles_are_sixteen_wide_unless_that_wastes_cells() {
        for width in [1024, 128, 64, 72, 144, 16] {
            assert_eq!(tile_columns(width), 16, "{width}");
        }
        // 20 and 9 wide would leave 12 and 7 of 32 and 16 columns empty.
        for width in [20, 9, 8, 5] {
            assert_eq!(tile_columns(width), 8, "{width}");
        }
        // SD 1.5's first UNet level at 512², guided: tiles of 8 rows of 16, 8 × 4 of them.
        assert_eq!(grid(2, 320, 64, 64), (32, 5, 2));
        // 7 wide, 5 high: one 8-wide, 16-high tile covers it. A last convolution to 3.
        assert_eq!(grid(1, 3, 5, 7), (1, 1, 1));
    }

    #[test]
    fn the_cpu_has_no_kernel_and_only_whole_tiles_fit() {
        let xs = Tensor::zeros((1, 16, 4, 4), DType::F16, &Device::Cpu).unwrap();
        let weights = Tensor::zeros((64, 1, 9, 16), DType::F16, &Device::Cpu).unwrap();
        let bias = Tensor::zeros(64, DType::F16, &Device::Cpu).unwrap();
        for part in Part::ALL {
            assert!(!takes(&Device::Cpu, DType::F16, 16, 64, part));
            assert!(!runs_for(&Device::Cpu, DType::F16, 16, part));
        }
        assert!(!runs_on(&Device::Cpu, DType::F16, 16));
        // No kernel, no card to fill: K whole.
        assert_eq!(
            parts_to_fill(&Device::Cpu, DType::F16, 1280, [1, 1280, 8, 8]),
            1
        );
        assert!(
            forward(&xs, Source::AsIs, &weights, &bias)
                .unwrap()
                .is_none()
        );
        assert!(fits(DType::F16, 320, 320) && fits(DType::F16, 16, 64));
        assert!(fits(DType::F16, 128, 3) && fits(DType::F32, 8, 64) && fits(DType::F32, 24, 3));
        assert!(!fits(DType::F16, 4, 320) && !fits(DType::F16, 0, 64));
        assert!(!fits(DType::F16, 16, 0) && !fits(DType::F16, 8, 64));
        assert!(!fits(DType::BF16, 16, 64) && !fits(DType::F32, 4, 64));
    }
}

//! 3×3 convolutions that bound their working memory on a GPU: with no column matrix where our
//! implicit-GEMM kernel runs, else as one GEMM into the image layout over our columns, in
//! bands where memory is short.
//!
//! candle computes a convolution on CUDA (and Metal) as im2col and one GEMM: it first copies
//! every output cell's 3×3 neighbourhood into a column buffer of `batch · h · w · c_in · 9`
//! elements. At the VAE's full resolution that buffer dwarfs everything else: 256 channels at
//! 512² in f32 is 2.4 GB, at 1024² 9.7 GB. [`Conv3x3`] can run over bands of output rows
//! instead, each band's buffer within [`ConvPlan::max_column_values`]: each band convolves its
//! rows plus one row of halo on either side, and the bands are joined. Every output cell sees
//! exactly the inputs it would whole, so a banded result equals the whole one up to the
//! GEMM's summation order.
//!
//! On CUDA the columns come from our kernel ([`kernels::im2col`]) in the transposed order of
//! candle's, `(c_in · 9, cells)`, so that the weights as a `(c_out, c_in · 9)` matrix times the
//! columns is the output in the image layout, with no transposed copy after the GEMM, and a
//! band needs no padded copy of its rows (the kernel writes the zeros). An upsampler's
//! convolution ([`Conv3x3::forward_doubled`]) reads its input doubled straight from the
//! small image there, so the upsampled image is never held. A convolution after a group norm
//! and SiLU ([`Conv3x3::forward_normalized`]) has its columns written normalised from the
//! image as it is there ([`kernels::norm_columns`]), so the normalised image is never made.
//!
//! In f16 on CUDA, where its tiles fit the channels, our implicit-GEMM kernel
//! ([`kernels::conv3x3`]) runs instead of all of that: no columns at all (so no bands), the
//! image read doubled or normalised as it is loaded, the bias added inside. A convolution it
//! takes holds its weights in the kernel's order only, and makes the stored order back for
//! the column path where the kernel declines. Weights held narrower than the convolution
//! computes (f16 under f32 arithmetic, [`Held`]) are widened at each use, on the column path.
//!
//! On the CPU candle convolves directly (no column buffer), so the engine plans no bands
//! there; the bands still run there in tests, against the whole convolution, and so does the
//! GEMM over the columns, on columns composed from candle's ops.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::norm::GroupNorm;
use super::weights::Held;
use crate::engine::kernels;
use crate::engine::kernels::NormalizedImage;
pub use crate::engine::kernels::conv3x3::Part;
use crate::engine::kernels::im2col::Source;
use crate::engine::profile::{self, Work};

/// How much column buffer a convolution may hold at once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConvPlan {
    /// Column values (not bytes: a band's GEMM has the same shape in f16 and f32); `None`:
    /// the whole convolution at once.
    pub max_column_values: Option<u64>,
}

impl ConvPlan {
    /// Bands of at most 64 M column values (128 MB in f16, 256 MB in f32). Each band's GEMM
    /// still fills a GPU: at the VAE's full resolution a band of 512-wide, 256-channel
    /// columns is 56 rows, at 1024 wide 28 rows, about 28 000 output cells by 128 or more
    /// output channels (over 200 tiles of 128 × 128). In f16 that halves the 256 MB bands
    /// this started with, taking 128 MB and more off the SD 512² decode's peak (which, with
    /// the weights, is the job's), at the cost of twice as many launches; f32 keeps its
    /// GEMMs as they were.
    pub const BANDED: Self = Self {
        max_column_values: Some(64 << 20),
    };

    /// The most column bytes this plan holds at once for values of `bytes_per_value`.
    pub fn max_bytes(self, bytes_per_value: u64) -> Option<u64> {
        self.max_column_values
            .map(|values| values.saturating_mul(bytes_per_value))
    }

    /// Output rows per band for an input `(batch, channels, _, width)`.
    fn rows(self, batch: usize, channels: usize, width: usize, height: usize) -> usize {
        match self.max_column_values {
            None => height,
            Some(budget) => {
                let per_row = (batch * width * channels * 9).max(1) as u64;
                usize::try_from(budget / per_row)
                    .unwrap_or(usize::MAX)
                    .clamp(1, height.max(1))
            }
        }
    }
}

/// What a convolution's columns are made from.
#[derive(Clone, Copy)]
enum Reading<'a> {
    /// An image, read as `Source` says.
    Image(&'a Tensor, Source),
    /// An image normalised (and through SiLU) as it is read.
    Normalized(&'a NormalizedImage),
}

impl Reading<'_> {
    /// `(batch, channels, height, width)` of what the convolution sees.
    fn dims(self) -> Result<(usize, usize, usize, usize)> {
        let (xs, source) = match self {
            Reading::Image(xs, source) => (xs, source),
            Reading::Normalized(image) => (image.image(), Source::AsIs),
        };
        let (batch, channels, ..) = xs.dims4()?;
        let (height, width) = source.size(xs)?;
        Ok((batch, channels, height, width))
    }

    fn dtype(self) -> DType {
        match self {
            Reading::Image(xs, _) => xs.dtype(),
            Reading::Normalized(image) => image.image().dtype(),
        }
    }
}

/// A 3×3 convolution, stride 1, padded by one cell on every side (what every 3×3
/// convolution of the VAE decoder is), with its bias.
pub struct Conv3x3 {
    weights: Weights,
    bias: Tensor,
}

/// A convolution's weights, held once, in the order of the path that runs it.
enum Weights {
    /// `(c_out, c_in, 3, 3)` as stored (in the compute dtype, or narrower and widened at
    /// use); as a `(c_out, c_in · 9)` matrix (a view, no copy) the GEMM's left side over our
    /// columns.
    Stored(Held),
    /// In our convolution kernel's order ([`kernels::conv3x3::kernel_order`]), where it takes
    /// this convolution.
    KernelOrder(Tensor),
}

impl Weights {
    /// Our kernel's order where it takes the convolution (of `part`) in the weights' dtype;
    /// weights held narrower than they compute stay stored (their kernel order would be held
    /// widened: all the memory they save).
    fn new(weight: Held, part: Part) -> Result<Self> {
        let held = weight.held();
        let (out_channels, in_channels, ..) = held.dims4()?;
        if !weight.widens()
            && kernels::conv3x3::takes(held.device(), held.dtype(), in_channels, out_channels, part)
        {
            return Ok(Self::KernelOrder(kernels::conv3x3::kernel_order(held)?));
        }
        Ok(Self::Stored(weight))
    }

    /// The weights in their stored order, in the compute dtype, and as the column GEMM's
    /// matrix: as held (or widened), or made back from the kernel's order where another path
    /// must run (our kernel declined a call).
    fn stored(&self) -> Result<(Tensor, Tensor)> {
        let weight = match self {
            Self::Stored(weight) => weight.at_use()?.into_owned(),
            Self::KernelOrder(weights) => kernels::conv3x3::stored_order(weights)?,
        };
        let (out_channels, in_channels, ..) = weight.dims4()?;
        let matrix = weight.reshape((out_channels, in_channels * 9))?;
        Ok((weight, matrix))
    }

    fn out_channels(&self) -> Result<usize> {
        match self {
            Self::Stored(weight) => weight.held().dim(0),
            Self::KernelOrder(weights) => weights.dim(0),
        }
    }
}

impl Conv3x3 {
    /// `part`'s convolution from `in_channels` to `out_channels`, its weights from `vb`.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        part: Part,
    ) -> Result<Self> {
        Ok(Self {
            weights: Weights::new(
                Held::get(&vb, (out_channels, in_channels, 3, 3), "weight")?,
                part,
            )?,
            bias: vb.get(out_channels, "bias")?,
        })
    }

    /// From weights `(c_out, c_in, 3, 3)` and bias `(c_out)` already in memory (the kernels
    /// bench's), computing in their dtype, a convolution of `part`. Where our convolution
    /// kernel takes it, the weights are kept in its order only.
    pub fn from_weights(weight: Tensor, bias: Tensor, part: Part) -> Result<Self> {
        Ok(Self {
            weights: Weights::new(Held::as_is(weight), part)?,
            bias,
        })
    }

    /// Whether our convolution kernel runs this convolution (it holds its weights in the
    /// kernel's order).
    pub fn runs_our_kernel(&self) -> bool {
        matches!(self.weights, Weights::KernelOrder(_))
    }

    /// `(batch, c_in, h, w)` → `(batch, c_out, h, w)`, whole or in bands as `plan` says.
    pub fn forward(&self, xs: &Tensor, plan: ConvPlan) -> Result<Tensor> {
        self.forward_from(Reading::Image(xs, Source::AsIs), plan)
    }

    /// `norm` with SiLU, then this convolution: what a resnet's convolutions and a model's
    /// last one read. Where our kernels run, our convolution normalises each value as it
    /// loads it, or the columns are written normalised from `xs`: the normalised image is
    /// never made; elsewhere it is made first.
    pub fn forward_normalized(
        &self,
        xs: &Tensor,
        norm: &GroupNorm,
        plan: ConvPlan,
    ) -> Result<Tensor> {
        // Prepared for our kernel, or for our columns where those run.
        let prepared = if self.runs_our_kernel() || kernels::im2col::runs_for(xs) {
            norm.prepare_for_convolution(xs)?
        } else {
            None
        };
        match prepared {
            Some(image) => self.forward_from(Reading::Normalized(&image), plan),
            None => self.forward(&norm.forward_then_silu(xs)?, plan),
        }
    }

    /// ×2 nearest-neighbour upsampling, then this convolution: `(batch, c_in, h, w)` →
    /// `(batch, c_out, 2h, 2w)`. Where our convolution or column kernel runs the upsampled
    /// image is never made; elsewhere candle makes it first.
    pub fn forward_doubled(&self, xs: &Tensor, plan: ConvPlan) -> Result<Tensor> {
        if !self.runs_our_kernel() && !kernels::im2col::runs_for(xs) {
            let upsampled = profile::timed(Work::Upsample, xs.device(), || {
                Source::Doubled.materialise(xs)
            })?;
            return self.forward_from(Reading::Image(&upsampled, Source::AsIs), plan);
        }
        self.forward_from(Reading::Image(xs, Source::Doubled), plan)
    }

    fn forward_from(&self, reading: Reading, plan: ConvPlan) -> Result<Tensor> {
        let device = self.bias.device();
        let _stretch = profile::stretch(Work::Conv3x3, device);
        // Our kernel holds no columns, so it takes no bands either.
        if let Weights::KernelOrder(weights) = &self.weights {
            let ours = match reading {
                Reading::Image(xs, source) => {
                    kernels::conv3x3::forward(xs, source, weights, &self.bias)?
                }
                Reading::Normalized(image) => {
                    kernels::conv3x3::forward_normalized(image, weights, &self.bias)?
                }
            };
            if let Some(out) = ours {
                return Ok(out);
            }
        }
        let weights = self.weights.stored()?;
        let (batch, channels, height, width) = reading.dims()?;
        let dtype = reading.dtype();
        let rows = plan.rows(batch, channels, width, height);
        let bias = self.bias.reshape((1, (), 1, 1))?;
        if rows >= height {
            return convolve_rows(&weights, reading, 0, height)?.broadcast_add(&bias);
        }
        // Each band, its bias added, is copied into its rows of the output: the output is
        // held once, not once as bands and again joined (and again with the bias).
        let out_channels = self.weights.out_channels()?;
        // SAFETY: the bands below cover rows 0..height and each writes all of its rows
        // before the output is returned; on an error it is dropped unread.
        let out = unsafe { Tensor::empty((batch, out_channels, height, width), dtype, device)? };
        let mut top = 0;
        while top < height {
            let band_rows = rows.min(height - top);
            let convolved =
                convolve_rows(&weights, reading, top, band_rows)?.broadcast_add(&bias)?;
            out.slice_set(&convolved, 2, top)?;
            top += band_rows;
        }
        Ok(out)
    }
}

/// Output rows `top..top + rows`, `(batch, c_out, rows, w)`, without the bias, with the
/// weights as stored and as a matrix: one GEMM over our kernels' columns where they run,
/// else candle's convolution of the band.
fn convolve_rows(
    (weight, matrix): &(Tensor, Tensor),
    reading: Reading,
    top: usize,
    rows: usize,
) -> Result<Tensor> {
    let (xs, source) = match reading {
        Reading::Image(xs, source) => (xs, source),
        Reading::Normalized(image) => {
            return times_columns(matrix, &image.columns_3x3(top, rows)?, rows);
        }
    };
    if let Some(columns) = kernels::im2col::columns_3x3(xs, source, top, rows)? {
        return times_columns(matrix, &columns, rows);
    }
    // Doubled only where the kernel ran for the image but declined this call.
    let xs = source.materialise(xs)?;
    let height = xs.dim(2)?;
    if top == 0 && rows == height {
        return xs.conv2d(weight, 1, 1, 1, 1);
    }
    // The band's rows and a halo row above and below it: the image's own rows inside,
    // zeros beyond its edges. Padded on its own: no padded copy of the whole input.
    let bottom = top + rows;
    let first = top.saturating_sub(1);
    let last = (bottom + 1).min(height);
    xs.narrow(2, first, last - first)?
        .pad_with_zeros(2, usize::from(top == 0), usize::from(bottom == height))?
        .pad_with_zeros(3, 1, 1)?
        .conv2d(weight, 0, 1, 1, 1)
}

/// The weight `matrix` `(c_out, c_in · 9)` times `columns` `(batch, c_in · 9, rows · w)`
/// ([`kernels::im2col`]'s layout): `(batch, c_out, rows, w)`.
fn times_columns(matrix: &Tensor, columns: &Tensor, rows: usize) -> Result<Tensor> {
    let (batch, _, cells) = columns.dims3()?;
    let out_channels = matrix.dim(0)?;
    matrix.broadcast_left(batch)?.matmul(columns)?.reshape((
        batch,
        out_channels,
        rows,
        cells / rows.max(1),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn random_conv(in_channels: usize, out_channels: usize) -> Conv3x3 {
        let device = Device::Cpu;
        Conv3x3::from_weights(
            Tensor::randn(0f32, 0.2, (out_channels, in_channels, 3, 3), &device).unwrap(),
            Tensor::randn(0f32, 0.2, out_channels, &device).unwrap(),
            Part::Decoder,
        )
        .unwrap()
    }

    fn largest_difference(a: &Tensor, b: &Tensor) -> f32 {
        crate::engine::kernels::largest_difference(a, b).unwrap()
    }

    #[test]
    fn bands_equal_the_whole_convolution_at_every_band_size() {
        let conv = random_conv(5, 7);
        let xs = Tensor::randn(0f32, 1.0, (2, 5, 13, 11), &Device::Cpu).unwrap();
        let whole = conv.forward(&xs, ConvPlan::default()).unwrap();
        assert_eq!(whole.dims4().unwrap(), (2, 7, 13, 11));
        // One row of columns: batch 2 × 11 cells × 5 channels × 9 taps.
        let row_values = 2 * 11 * 5 * 9;
        for rows in [1, 2, 3, 5, 12, 13, 40] {
            let plan = ConvPlan {
                max_column_values: Some(rows * row_values),
            };
            let banded = conv.forward(&xs, plan).unwrap();
            assert_eq!(banded.dims4().unwrap(), (2, 7, 13, 11));
            let difference = largest_difference(&whole, &banded);
            assert!(difference < 1e-5, "{rows} rows per band: {difference}");
        }
    }

    #[test]
    fn the_gemm_over_the_column_matrix_is_the_convolution_whole_and_in_bands() {
        // What runs on CUDA, with the columns composed from candle's ops here: the kernel
        // that writes them on a GPU is checked against the same composition.
        let conv = random_conv(5, 7);
        let xs = Tensor::randn(0f32, 1.0, (2, 5, 13, 11), &Device::Cpu).unwrap();
        let (weight, matrix) = conv.weights.stored().unwrap();
        let whole = xs.conv2d(&weight, 1, 1, 1, 1).unwrap();
        for (top, rows) in [(0, 13), (0, 4), (4, 5), (9, 4), (12, 1)] {
            let columns = kernels::im2col::composed(&xs, Source::AsIs, top, rows).unwrap();
            let band = times_columns(&matrix, &columns, rows).unwrap();
            assert_eq!(band.dims4().unwrap(), (2, 7, rows, 11));
            let expected = whole.narrow(2, top, rows).unwrap();
            let difference = largest_difference(&expected, &band);
            assert!(difference < 1e-5, "rows {top}+{rows}: {difference}");
        }
    }

    #[test]
    fn a_doubled_convolution_is_the_convolution_of_the_upsampled_image() {
        let conv = random_conv(3, 4);
        let xs = Tensor::randn(0f32, 1.0, (2, 3, 5, 4), &Device::Cpu).unwrap();
        let upsampled = xs.upsample_nearest2d(10, 8).unwrap();
        let expected = conv.forward(&upsampled, ConvPlan::default()).unwrap();
        // What runs here (candle, on the upsampled image), whole and in bands.
        let row_values = 2 * 8 * 3 * 9;
        for plan in [
            ConvPlan::default(),
            ConvPlan {
                max_column_values: Some(3 * row_values),
            },
        ] {
            let got = conv.forward_doubled(&xs, plan).unwrap();
            assert_eq!(got.dims4().unwrap(), (2, 4, 10, 8));
            assert!(largest_difference(&expected, &got) < 1e-5, "{plan:?}");
        }
        // What runs on CUDA: the GEMM over the doubled columns of the small image.
        let bias = conv.bias.reshape((1, (), 1, 1)).unwrap();
        for (top, rows) in [(0, 10), (3, 4), (9, 1)] {
            let columns = kernels::im2col::composed(&xs, Source::Doubled, top, rows).unwrap();
            let (_, matrix) = conv.weights.stored().unwrap();
            let band = times_columns(&matrix, &columns, rows)
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            let expected_band = expected.narrow(2, top, rows).unwrap();
            assert!(
                largest_difference(&expected_band, &band) < 1e-5,
                "rows {top}+{rows}"
            );
        }
    }

    #[test]
    fn a_normalized_convolution_is_candles_group_norm_silu_and_convolution() {
        // The CPU composes (our group norm, then the convolution); CUDA writes normalised
        // columns, checked against the same composition in `kernels::norm_columns`.
        let device = Device::Cpu;
        let conv = random_conv(8, 5);
        let weight = Tensor::randn(1f32, 0.3, 8, &device).unwrap();
        let bias = Tensor::randn(0f32, 0.3, 8, &device).unwrap();
        let norm = GroupNorm::from_weights(weight.clone(), bias.clone(), 4, 1e-6).unwrap();
        let xs = (Tensor::randn(0f32, 2.0, (2, 8, 9, 6), &device).unwrap() + 1.5).unwrap();
        let normed = candle_nn::GroupNorm::new(weight, bias, 8, 4, 1e-6)
            .and_then(|norm| candle_core::Module::forward(&norm, &xs))
            .and_then(|normed| candle_nn::ops::silu(&normed))
            .unwrap();
        let (weight, _) = conv.weights.stored().unwrap();
        let expected = normed
            .conv2d(&weight, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&conv.bias.reshape((1, (), 1, 1)).unwrap())
            .unwrap();
        let row_values = 2 * 6 * 8 * 9;
        for plan in [
            ConvPlan::default(),
            ConvPlan {
                max_column_values: Some(4 * row_values),
            },
        ] {
            let got = conv.forward_normalized(&xs, &norm, plan).unwrap();
            assert_eq!(got.dims4().unwrap(), (2, 5, 9, 6));
            let difference = largest_difference(&expected, &got);
            assert!(difference < 1e-4, "{plan:?}: {difference}");
        }
    }

    #[test]
    fn weights_in_the_kernels_order_convolve_the_same_where_the_kernel_declines() {
        // On the CPU our kernel never runs, so weights held in its order (as a GPU holds them)
        // go back to the stored order for the column path or candle's convolution. f32
        // weights in the kernel's order are rounded to TF32, and stay so.
        let random = random_conv(16, 64);
        let (weight, _) = random.weights.stored().unwrap();
        let weight = kernels::conv3x3::round_to_tf32(&weight).unwrap();
        let stored =
            Conv3x3::from_weights(weight.clone(), random.bias.clone(), Part::Decoder).unwrap();
        assert!(!stored.runs_our_kernel());
        let ordered = Conv3x3 {
            weights: Weights::KernelOrder(kernels::conv3x3::kernel_order(&weight).unwrap()),
            bias: stored.bias.clone(),
        };
        assert!(ordered.runs_our_kernel());
        let xs = Tensor::randn(0f32, 1.0, (2, 16, 7, 5), &Device::Cpu).unwrap();
        let banded = ConvPlan {
            max_column_values: Some(2 * 2 * 5 * 16 * 9),
        };
        for plan in [ConvPlan::default(), banded] {
            let expected = stored.forward(&xs, plan).unwrap();
            let got = ordered.forward(&xs, plan).unwrap();
            assert!(largest_difference(&expected, &got) < 1e-5, "{plan:?}");
            let expected = stored.forward_doubled(&xs, plan).unwrap();
            let got = ordered.forward_doubled(&xs, plan).unwrap();
            assert_eq!(got.dims4().unwrap(), (2, 64, 14, 10));
            assert!(
                largest_difference(&expected, &got) < 1e-5,
                "{plan:?} doubled"
            );
        }
    }

    #[test]
    fn a_band_is_never_empty_whatever_the_budget() {
        let conv = random_conv(3, 4);
        let xs = Tensor::randn(0f32, 1.0, (1, 3, 6, 6), &Device::Cpu).unwrap();
        let tiny = ConvPlan {
            max_column_values: Some(1),
        };
        assert_eq!(tiny.rows(1, 3, 6, 6), 1);
        let banded = conv.forward(&xs, tiny).unwrap();
        let whole = conv.forward(&xs, ConvPlan::default()).unwrap();
        assert!(largest_difference(&whole, &banded) < 1e-5);
    }

    #[test]
    fn the_budget_counts_the_columns_of_a_row() {
        // 64 M column values for 512 cells of 256 channels: 56 rows, in f16 (128 MB) or
        // f32 (256 MB); at 1024 cells wide, 28.
        assert_eq!(ConvPlan::BANDED.rows(1, 256, 512, 512), 56);
        assert_eq!(ConvPlan::BANDED.max_bytes(2), Some(128 << 20));
        assert_eq!(ConvPlan::BANDED.max_bytes(4), Some(256 << 20));
        assert_eq!(ConvPlan::BANDED.rows(1, 256, 1024, 1024), 28);
        assert_eq!(ConvPlan::default().rows(1, 256, 512, 512), 512);
    }
}

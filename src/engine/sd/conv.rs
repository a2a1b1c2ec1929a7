//! 3×3 convolutions that bound their working memory on a GPU, and run as one GEMM into the
//! image layout where our column kernel does.
//!
//! candle computes a convolution on CUDA (and Metal) as im2col and one GEMM: it first copies
//! every output cell's 3×3 neighbourhood into a column buffer of `batch · h · w · c_in · 9`
//! elements. At the VAE's full resolution that buffer dwarfs everything else: 256 channels at
//! 512² in f32 is 2.4 GB, at 1024² 9.7 GB. [`Conv3x3`] can run over bands of output rows
//! instead, each band's buffer within [`ConvPlan::max_column_bytes`]: each band convolves its
//! rows plus one row of halo on either side, and the bands are joined. Every output cell sees
//! exactly the inputs it would whole, so a banded result equals the whole one up to the
//! GEMM's summation order.
//!
//! On CUDA the columns come from our kernel ([`kernels::im2col`]) in the transposed order of
//! candle's, `(c_in · 9, cells)`, so that the weights as a `(c_out, c_in · 9)` matrix times the
//! columns is the output in the image layout, with no transposed copy after the GEMM, and a
//! band needs no padded copy of its rows (the kernel writes the zeros). An upsampler's
//! convolution ([`Conv3x3::forward_doubled`]) reads its input doubled straight from the
//! small image there, so the upsampled image is never held.
//!
//! On the CPU candle convolves directly (no column buffer), so the engine plans no bands
//! there; the bands still run there in tests, against the whole convolution, and so does the
//! GEMM over the columns, on columns composed from candle's ops.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use crate::engine::kernels;
use crate::engine::kernels::im2col::Source;
use crate::engine::profile::{self, Work};

/// How much column buffer a convolution may hold at once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConvPlan {
    /// `None`: the whole convolution at once.
    pub max_column_bytes: Option<u64>,
}

impl ConvPlan {
    /// Bands of at most 256 MB of columns: big enough that each band's GEMM still fills a
    /// GPU (a band of 512-wide, 256-channel f32 columns is 56 rows).
    pub const BANDED: Self = Self {
        max_column_bytes: Some(256 << 20),
    };

    /// Output rows per band for an input `(batch, channels, _, width)` of `dtype`.
    fn rows(
        self,
        batch: usize,
        channels: usize,
        width: usize,
        dtype: DType,
        height: usize,
    ) -> usize {
        match self.max_column_bytes {
            None => height,
            Some(budget) => {
                let per_row = (batch * width * channels * 9 * dtype.size_in_bytes()).max(1) as u64;
                usize::try_from(budget / per_row)
                    .unwrap_or(usize::MAX)
                    .clamp(1, height.max(1))
            }
        }
    }
}

/// A 3×3 convolution, stride 1, padded by one cell on every side (what every 3×3
/// convolution of the VAE decoder is), with its bias.
pub struct Conv3x3 {
    /// `(c_out, c_in, 3, 3)`, as stored.
    weight: Tensor,
    /// The same values as a `(c_out, c_in · 9)` matrix (a view, no copy): the GEMM's left
    /// side over our columns.
    matrix: Tensor,
    bias: Tensor,
}

impl Conv3x3 {
    pub fn new(vb: VarBuilder, in_channels: usize, out_channels: usize) -> Result<Self> {
        Self::from_weights(
            vb.get((out_channels, in_channels, 3, 3), "weight")?,
            vb.get(out_channels, "bias")?,
        )
    }

    /// From weights `(c_out, c_in, 3, 3)` and bias `(c_out)` already in memory (the kernels
    /// bench's).
    pub fn from_weights(weight: Tensor, bias: Tensor) -> Result<Self> {
        let (out_channels, in_channels, ..) = weight.dims4()?;
        let matrix = weight.reshape((out_channels, in_channels * 9))?;
        Ok(Self {
            weight,
            matrix,
            bias,
        })
    }

    /// `(batch, c_in, h, w)` → `(batch, c_out, h, w)`, whole or in bands as `plan` says.
    pub fn forward(&self, xs: &Tensor, plan: ConvPlan) -> Result<Tensor> {
        self.forward_from(xs, Source::AsIs, plan)
    }

    /// ×2 nearest-neighbour upsampling, then this convolution: `(batch, c_in, h, w)` →
    /// `(batch, c_out, 2h, 2w)`. Where our column kernel runs the upsampled image is never
    /// made; elsewhere candle makes it first.
    pub fn forward_doubled(&self, xs: &Tensor, plan: ConvPlan) -> Result<Tensor> {
        if !kernels::im2col::runs_for(xs) {
            let upsampled = profile::timed(Work::Upsample, xs.device(), || {
                Source::Doubled.materialise(xs)
            })?;
            return self.forward_from(&upsampled, Source::AsIs, plan);
        }
        self.forward_from(xs, Source::Doubled, plan)
    }

    fn forward_from(&self, xs: &Tensor, source: Source, plan: ConvPlan) -> Result<Tensor> {
        let _stretch = profile::stretch(Work::Conv3x3, xs.device());
        let (batch, channels, ..) = xs.dims4()?;
        let (height, width) = source.size(xs)?;
        let rows = plan.rows(batch, channels, width, xs.dtype(), height);
        let bias = self.bias.reshape((1, (), 1, 1))?;
        if rows >= height {
            return self
                .convolve_rows(xs, source, 0, height)?
                .broadcast_add(&bias);
        }
        // Each band, its bias added, is copied into its rows of the output: the output is
        // held once, not once as bands and again joined (and again with the bias).
        let out_channels = self.weight.dim(0)?;
        let out = Tensor::zeros(
            (batch, out_channels, height, width),
            xs.dtype(),
            xs.device(),
        )?;
        let mut top = 0;
        while top < height {
            let band_rows = rows.min(height - top);
            let convolved = self
                .convolve_rows(xs, source, top, band_rows)?
                .broadcast_add(&bias)?;
            out.slice_set(&convolved, 2, top)?;
            top += band_rows;
        }
        Ok(out)
    }

    /// Output rows `top..top + rows`, `(batch, c_out, rows, w)`, without the bias: one GEMM
    /// over our kernel's columns where it runs, else candle's convolution of the band.
    fn convolve_rows(
        &self,
        xs: &Tensor,
        source: Source,
        top: usize,
        rows: usize,
    ) -> Result<Tensor> {
        if let Some(columns) = kernels::im2col::columns_3x3(xs, source, top, rows)? {
            return self.times_columns(&columns, rows);
        }
        // Doubled only where the kernel ran for the image but declined this call.
        let xs = source.materialise(xs)?;
        let height = xs.dim(2)?;
        if top == 0 && rows == height {
            return xs.conv2d(&self.weight, 1, 1, 1, 1);
        }
        // The band's rows and a halo row above and below it: the image's own rows inside,
        // zeros beyond its edges. Padded on its own: no padded copy of the whole input.
        let bottom = top + rows;
        let first = top.saturating_sub(1);
        let last = (bottom + 1).min(height);
        xs.narrow(2, first, last - first)?
            .pad_with_zeros(2, usize::from(top == 0), usize::from(bottom == height))?
            .pad_with_zeros(3, 1, 1)?
            .conv2d(&self.weight, 0, 1, 1, 1)
    }

    /// The weights times `columns` `(batch, c_in · 9, rows · w)` ([`kernels::im2col`]'s
    /// layout): `(batch, c_out, rows, w)`.
    fn times_columns(&self, columns: &Tensor, rows: usize) -> Result<Tensor> {
        let (batch, _, cells) = columns.dims3()?;
        let out_channels = self.matrix.dim(0)?;
        self.matrix
            .broadcast_left(batch)?
            .matmul(columns)?
            .reshape((batch, out_channels, rows, cells / rows.max(1)))
    }
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
        // One row of columns: batch 2 × 11 cells × 5 channels × 9 taps × 4 bytes.
        let row_bytes = 2 * 11 * 5 * 9 * 4;
        for rows in [1, 2, 3, 5, 12, 13, 40] {
            let plan = ConvPlan {
                max_column_bytes: Some(rows * row_bytes),
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
        let whole = xs.conv2d(&conv.weight, 1, 1, 1, 1).unwrap();
        for (top, rows) in [(0, 13), (0, 4), (4, 5), (9, 4), (12, 1)] {
            let columns = kernels::im2col::composed(&xs, Source::AsIs, top, rows).unwrap();
            let band = conv.times_columns(&columns, rows).unwrap();
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
        let row_bytes = 2 * 8 * 3 * 9 * 4;
        for plan in [
            ConvPlan::default(),
            ConvPlan {
                max_column_bytes: Some(3 * row_bytes),
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
            let band = conv
                .times_columns(&columns, rows)
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
    fn a_band_is_never_empty_whatever_the_budget() {
        let conv = random_conv(3, 4);
        let xs = Tensor::randn(0f32, 1.0, (1, 3, 6, 6), &Device::Cpu).unwrap();
        let tiny = ConvPlan {
            max_column_bytes: Some(1),
        };
        assert_eq!(tiny.rows(1, 3, 6, DType::F32, 6), 1);
        let banded = conv.forward(&xs, tiny).unwrap();
        let whole = conv.forward(&xs, ConvPlan::default()).unwrap();
        assert!(largest_difference(&whole, &banded) < 1e-5);
    }

    #[test]
    fn the_budget_counts_the_columns_of_a_row() {
        // 256 MB of columns for 512 cells of 256 channels in f32: 56 rows.
        assert_eq!(ConvPlan::BANDED.rows(1, 256, 512, DType::F32, 512), 56);
        assert_eq!(ConvPlan::BANDED.rows(1, 256, 512, DType::F16, 512), 113);
        assert_eq!(ConvPlan::default().rows(1, 256, 512, DType::F32, 512), 512);
    }
}

//! 3×3 convolutions that bound their working memory on a GPU.
//!
//! candle computes a convolution on CUDA (and Metal) as im2col and one GEMM: it first copies
//! every output cell's 3×3 neighbourhood into a column buffer of `batch · h · w · c_in · 9`
//! elements. At the VAE's full resolution that buffer dwarfs everything else: 256 channels at
//! 512² in f32 is 2.4 GB, at 1024² 9.7 GB. [`Conv3x3`] can run over bands of output rows
//! instead, each band's buffer within [`ConvPlan::max_column_bytes`]: the input is padded
//! once (a ninth of the whole buffer), each band convolves its rows plus one row of halo on
//! either side, and the bands are joined. Every output cell sees exactly the inputs it would
//! whole, so a banded result equals the whole one up to the GEMM's summation order.
//!
//! On the CPU candle convolves directly (no column buffer), so the engine plans no bands
//! there; the bands still run there in tests, against the whole convolution.

use candle_core::{DType, Result, Tensor};
use candle_nn::{Conv2d, VarBuilder};

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
    weight: Tensor,
    bias: Tensor,
}

impl Conv3x3 {
    pub fn new(vb: VarBuilder, in_channels: usize, out_channels: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_channels, in_channels, 3, 3), "weight")?,
            bias: vb.get(out_channels, "bias")?,
        })
    }

    /// `(batch, c_in, h, w)` → `(batch, c_out, h, w)`, whole or in bands as `plan` says.
    pub fn forward(&self, xs: &Tensor, plan: ConvPlan) -> Result<Tensor> {
        let _stretch = profile::stretch(Work::Conv3x3, xs.device());
        let (batch, channels, height, width) = xs.dims4()?;
        let rows = plan.rows(batch, channels, width, xs.dtype(), height);
        let bias = self.bias.reshape((1, (), 1, 1))?;
        if rows >= height {
            return xs.conv2d(&self.weight, 1, 1, 1, 1)?.broadcast_add(&bias);
        }
        // Each band is padded on its own (no padded copy of the whole input), and, its bias
        // added, copied into its rows of the output: the output is held once, not once as
        // bands and again joined (and again with the bias).
        let out_channels = self.weight.dim(0)?;
        let out = Tensor::zeros(
            (batch, out_channels, height, width),
            xs.dtype(),
            xs.device(),
        )?;
        let mut top = 0;
        while top < height {
            let bottom = top + rows.min(height - top);
            // The band's rows and a halo row above and below it: the image's own rows
            // inside, zeros beyond its edges.
            let first = top.saturating_sub(1);
            let last = (bottom + 1).min(height);
            let band = xs
                .narrow(2, first, last - first)?
                .pad_with_zeros(2, usize::from(top == 0), usize::from(bottom == height))?
                .pad_with_zeros(3, 1, 1)?;
            let convolved = band
                .conv2d(&self.weight, 0, 1, 1, 1)?
                .broadcast_add(&bias)?;
            out.slice_set(&convolved, 2, top)?;
            top = bottom;
        }
        Ok(out)
    }
}

/// A 1×1 convolution (a per-cell linear map: no column buffer worth bounding).
pub fn conv1x1(vb: VarBuilder, in_channels: usize, out_channels: usize) -> Result<Conv2d> {
    candle_nn::conv2d(
        in_channels,
        out_channels,
        1,
        candle_nn::Conv2dConfig::default(),
        vb,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn random_conv(in_channels: usize, out_channels: usize) -> Conv3x3 {
        let device = Device::Cpu;
        Conv3x3 {
            weight: Tensor::randn(0f32, 0.2, (out_channels, in_channels, 3, 3), &device).unwrap(),
            bias: Tensor::randn(0f32, 0.2, out_channels, &device).unwrap(),
        }
    }

    fn largest_difference(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
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

//! Per-cell linear maps over the channels: 1×1 convolutions and the projections into and out
//! of the transformers and the VAE's attention, each one GEMM (plus its bias) whichever
//! layout its input and output are in.
//!
//! The UNet and VAE hold cells `(batch, channels, h, w)`; attention holds tokens `(batch, h·w,
//! channels)`. candle's 1×1 convolution on CUDA is a full im2col copy, a GEMM and a transposed
//! copy of the output; and going from cells to tokens or back around a projection is one more
//! copy. [`Pointwise`] instead hands the GEMM its operand transposed where the layouts
//! differ (cuBLAS takes either order), so its output is already in the layout
//! the next layer takes: no copies at all. Its weights may be held narrower than it computes
//! in ([`Held`]), and are widened as it runs.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::weights::Held;

/// A map from `c_in` to `c_out` channels at every cell: `y = W · x + b`.
pub struct Pointwise {
    /// `(c_out, c_in)`.
    weight: Held,
    /// `(c_out)`.
    bias: Tensor,
}

impl Pointwise {
    /// A linear layer's weights, `weight` `(c_out, c_in)` and `bias`.
    pub fn linear(vb: VarBuilder, in_channels: usize, out_channels: usize) -> Result<Self> {
        Ok(Self {
            weight: Held::get(&vb, (out_channels, in_channels), "weight")?,
            bias: vb.get(out_channels, "bias")?,
        })
    }

    /// A 1×1 convolution's weights, `weight` `(c_out, c_in, 1, 1)` and `bias`.
    pub fn conv(vb: VarBuilder, in_channels: usize, out_channels: usize) -> Result<Self> {
        let kernel = vb.get((out_channels, in_channels, 1, 1), "weight")?;
        Ok(Self {
            weight: Held::new(kernel.reshape((out_channels, in_channels))?, vb.dtype()),
            bias: vb.get(out_channels, "bias")?,
        })
    }

    /// Either: folders converted from old checkpoints store some projections as 1×1
    /// convolutions where diffusers' own store linear layers.
    pub fn linear_or_conv(vb: VarBuilder, in_channels: usize, out_channels: usize) -> Result<Self> {
        match Held::get(&vb, (out_channels, in_channels), "weight") {
            Ok(weight) => Ok(Self {
                weight,
                bias: vb.get(out_channels, "bias")?,
            }),
            Err(_) => Self::conv(vb, in_channels, out_channels),
        }
    }

    /// From weights `(c_out, c_in)` and bias `(c_out)` already in memory, computing in their
    /// dtype.
    pub fn from_weights(weight: Tensor, bias: Tensor) -> Self {
        Self {
            weight: Held::as_is(weight),
            bias,
        }
    }

    /// Cells `(batch, c_in, h, w)` → cells `(batch, c_out, h, w)`: `W · x` per image.
    pub fn cells_to_cells(&self, xs: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = xs.dims4()?;
        let cells = xs.reshape((batch, channels, height * width))?;
        self.weight_per_image(batch)?
            .matmul(&cells)?
            .reshape((batch, (), height, width))?
            .broadcast_add(&self.bias_per_cell()?)
    }

    /// Cells `(batch, c_in, h, w)` → tokens `(batch, h·w, c_out)`: `xᵀ · Wᵀ` per image, the
    /// cells read transposed.
    pub fn cells_to_tokens(&self, xs: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = xs.dims4()?;
        let tokens = xs
            .reshape((batch, channels, height * width))?
            .transpose(1, 2)?;
        left_side(&tokens)?
            .matmul(&self.weight_per_image(batch)?.transpose(1, 2)?)?
            .broadcast_add(&self.bias)
    }

    /// Tokens `(batch, h·w, c_in)` → cells `(batch, c_out, h, w)`: `W · tokensᵀ` per image,
    /// the tokens read transposed.
    pub fn tokens_to_cells(&self, tokens: &Tensor, height: usize, width: usize) -> Result<Tensor> {
        let batch = tokens.dim(0)?;
        self.weight_per_image(batch)?
            .matmul(&tokens.transpose(1, 2)?)?
            .reshape((batch, (), height, width))?
            .broadcast_add(&self.bias_per_cell()?)
    }

    /// Tokens `(batch, n, c_in)` → tokens `(batch, n, c_out)`: a linear layer.
    pub fn tokens_to_tokens(&self, tokens: &Tensor) -> Result<Tensor> {
        self.tokens_to_tokens_unbiased(tokens)?
            .broadcast_add(&self.bias)
    }

    /// [`Self::tokens_to_tokens`] without the bias, for a caller that adds [`Self::bias`] in
    /// a pass of its own (the feed-forward's gate): one pass over the output fewer. Tokens in
    /// rows (contiguous) are one GEMM over every image's rows, as a linear layer runs (candle's
    /// and torch's); a view is read as it stands, a GEMM per image.
    pub fn tokens_to_tokens_unbiased(&self, tokens: &Tensor) -> Result<Tensor> {
        let (batch, rows, channels) = tokens.dims3()?;
        if tokens.is_contiguous() {
            return tokens
                .reshape((batch * rows, channels))?
                .matmul(&self.weight.at_use()?.t()?)?
                .reshape((batch, rows, ()));
        }
        left_side(tokens)?.matmul(&self.weight_per_image(batch)?.transpose(1, 2)?)
    }

    /// `(c_out)`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// The weights once per image of the batch (a view: stride 0, no copy), as a batched GEMM
    /// takes them.
    fn weight_per_image(&self, batch: usize) -> Result<Tensor> {
        self.weight.at_use()?.broadcast_left(batch)
    }

    fn bias_per_cell(&self) -> Result<Tensor> {
        self.bias.reshape((1, (), 1, 1))
    }
}

/// `lhs` as a GEMM with weights shared by the batch may read it on its device. candle
/// 0.11's CPU matmul stacks the batch of its left side into rows when the right side is the
/// same for every image, which is right only for a row-major left side (a transposed view
/// comes out wrong from the second image on): on the CPU such a view is copied first. CUDA
/// hands cuBLAS the strides as they are.
fn left_side(lhs: &Tensor) -> Result<Tensor> {
    if lhs.device().is_cpu() && !lhs.is_contiguous() {
        lhs.contiguous()
    } else {
        Ok(lhs.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    fn random(dims: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1.0, dims, &Device::Cpu).unwrap()
    }

    fn largest_difference(a: &Tensor, b: &Tensor) -> f32 {
        crate::engine::kernels::largest_difference(a, b).unwrap()
    }

    /// 5 → 7 channels, and the same map as candle's 1×1 convolution and linear layer.
    fn maps() -> (Pointwise, candle_nn::Conv2d, candle_nn::Linear) {
        let weight = random(&[7, 5]);
        let bias = random(&[7]);
        let conv = candle_nn::Conv2d::new(
            weight.reshape((7, 5, 1, 1)).unwrap(),
            Some(bias.clone()),
            candle_nn::Conv2dConfig::default(),
        );
        let linear = candle_nn::Linear::new(weight.clone(), Some(bias.clone()));
        (Pointwise::from_weights(weight, bias), conv, linear)
    }

    #[test]
    fn every_layout_gives_what_candles_convolution_and_linear_layer_give() {
        let (pointwise, conv, linear) = maps();
        let (batch, height, width) = (2, 3, 4);
        let cells = random(&[batch, 5, height, width]);
        let as_tokens = |cells: &Tensor| {
            cells
                .flatten_from(2)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let tokens = as_tokens(&cells);

        let expected_cells = conv.forward(&cells).unwrap();
        let expected_tokens = linear.forward(&tokens).unwrap();
        // The two references agree with each other, in their own layouts.
        assert!(largest_difference(&as_tokens(&expected_cells), &expected_tokens) < 1e-5);

        let cases = [
            (
                "cells → cells",
                pointwise.cells_to_cells(&cells),
                &expected_cells,
            ),
            (
                "cells → tokens",
                pointwise.cells_to_tokens(&cells),
                &expected_tokens,
            ),
            (
                "tokens → cells",
                pointwise.tokens_to_cells(&tokens, height, width),
                &expected_cells,
            ),
            (
                "tokens → tokens",
                pointwise.tokens_to_tokens(&tokens),
                &expected_tokens,
            ),
        ];
        for (what, got, expected) in cases {
            let got = got.unwrap();
            let difference = largest_difference(&got, expected);
            assert!(difference < 1e-5, "{what}: {difference}");
        }
    }

    #[test]
    fn a_transposed_view_is_read_as_it_stands() {
        // A caller may hand its tokens over as a transposed view of cells: on the CPU it is
        // copied before the GEMM (`left_side`), else images after the first come out wrong.
        let (pointwise, _, linear) = maps();
        let cells = random(&[2, 5, 2, 3]);
        let view = cells.flatten_from(2).unwrap().transpose(1, 2).unwrap();
        assert!(!view.is_contiguous());
        let expected = linear.forward(&view.contiguous().unwrap()).unwrap();
        let got = pointwise.tokens_to_tokens(&view).unwrap();
        assert!(largest_difference(&got, &expected) < 1e-5);
    }

    #[test]
    fn weights_load_as_a_linear_layer_or_a_one_by_one_convolution() {
        let device = Device::Cpu;
        let weight = random(&[3, 2]);
        let bias = random(&[3]);
        let stored = |weight: Tensor| {
            let tensors = std::collections::HashMap::from([
                ("weight".to_owned(), weight),
                ("bias".to_owned(), bias.clone()),
            ]);
            VarBuilder::from_tensors(tensors, candle_core::DType::F32, &device)
        };
        let cells = random(&[1, 2, 2, 2]);
        let expected = Pointwise::from_weights(weight.clone(), bias.clone())
            .cells_to_cells(&cells)
            .unwrap();
        for vb in [
            stored(weight.clone()),
            stored(weight.reshape((3, 2, 1, 1)).unwrap()),
        ] {
            let loaded = Pointwise::linear_or_conv(vb, 2, 3).unwrap();
            let got = loaded.cells_to_cells(&cells).unwrap();
            assert!(largest_difference(&got, &expected) < 1e-6);
        }
        // A weight of neither shape is an error naming it, not a silent map.
        let wrong = stored(random(&[3, 4]));
        assert!(Pointwise::linear_or_conv(wrong, 2, 3).is_err());
    }
}

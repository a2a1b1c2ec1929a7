//! How a model's weights are loaded and handed to its layers.
//!
//! Each component's weights are memory-mapped from its safetensors file and loaded onto the
//! device in the model's [`Precision`]: every tensor in the dtype the layers compute in; or,
//! where the precision widens (f32 arithmetic on a GPU whose f16 arithmetic Stable
//! Diffusion cannot use, the GTX 16 series), every tensor of two dimensions or more — the
//! matrices, convolution kernels and embedding tables, all but a few thousandths of the
//! bytes — held in f16, with the norms' scales and the biases in f32.
//!
//! A layer keeps such a weight as a [`Held`] and takes it at use: the tensor itself where the
//! dtypes agree, else a widened copy that lives for the one operation (the device's pool
//! gives its memory to the next layer's copy). f16 → f32 is exact, so a model that widens
//! computes exactly what an f32 model whose matrices were rounded to f16 does; nothing in it
//! is f16 arithmetic.
//!
//! The layers that take weights this way: [`Linear`], [`Conv2d`] and [`Embedding`] here
//! (candle's, run on the weight at use), [`super::pointwise::Pointwise`] and
//! [`super::conv::Conv3x3`].

use std::borrow::Cow;
use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Module, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Conv2dConfig, Init, VarBuilder};

use crate::engine::device::Precision;

/// A weight as it is held, and the dtype its layer computes in.
#[derive(Clone, Debug)]
pub struct Held {
    tensor: Tensor,
    compute: DType,
}

impl Held {
    /// `tensor` as loaded, for a layer computing in `compute`.
    pub fn new(tensor: Tensor, compute: DType) -> Self {
        Self { tensor, compute }
    }

    /// `tensor`, for a layer computing in its dtype.
    pub fn as_is(tensor: Tensor) -> Self {
        let compute = tensor.dtype();
        Self::new(tensor, compute)
    }

    /// The weight `name` of `shape` from `vb`, for a layer computing in `vb`'s dtype.
    pub fn get(vb: &VarBuilder, shape: impl Into<Shape>, name: &str) -> Result<Self> {
        Ok(Self::new(vb.get(shape, name)?, vb.dtype()))
    }

    /// The weight in the compute dtype: itself, or a widened copy for this use.
    pub fn at_use(&self) -> Result<Cow<'_, Tensor>> {
        if self.tensor.dtype() == self.compute {
            Ok(Cow::Borrowed(&self.tensor))
        } else {
            Ok(Cow::Owned(self.tensor.to_dtype(self.compute)?))
        }
    }

    /// The weight as held.
    pub fn held(&self) -> &Tensor {
        &self.tensor
    }

    /// Whether it is held in another dtype than its layer computes in.
    pub fn widens(&self) -> bool {
        self.tensor.dtype() != self.compute
    }

    /// The dtype its layer computes in.
    pub fn compute_dtype(&self) -> DType {
        self.compute
    }
}

/// A linear layer, `x · Wᵀ + b`, run as candle's on the weight at use.
#[derive(Clone, Debug)]
pub struct Linear {
    /// `(out, in)`.
    weight: Held,
    /// `(out)`, in the compute dtype.
    bias: Option<Tensor>,
}

impl Linear {
    /// `weight` `(out, in)` and `bias` `(out)` from `vb`.
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            weight: Held::get(&vb, (out_dim, in_dim), "weight")?,
            bias: Some(vb.get(out_dim, "bias")?),
        })
    }

    /// `weight` `(out, in)` from `vb`, no bias.
    pub fn no_bias(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            weight: Held::get(&vb, (out_dim, in_dim), "weight")?,
            bias: None,
        })
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        candle_nn::Linear::new(self.weight.at_use()?.into_owned(), self.bias.clone()).forward(xs)
    }
}

/// A convolution with its bias (the UNet's first one and its stride-2 downsamplers), run as
/// candle's on the weight at use.
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// `(c_out, c_in, k, k)`.
    weight: Held,
    /// `(c_out)`, in the compute dtype.
    bias: Tensor,
    config: Conv2dConfig,
}

impl Conv2d {
    /// A `kernel`×`kernel` convolution from `in_channels` to `out_channels`, its `weight`
    /// and `bias` from `vb`.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        config: Conv2dConfig,
    ) -> Result<Self> {
        Ok(Self {
            weight: Held::get(&vb, (out_channels, in_channels, kernel, kernel), "weight")?,
            bias: vb.get(out_channels, "bias")?,
            config,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        candle_nn::Conv2d::new(
            self.weight.at_use()?.into_owned(),
            Some(self.bias.clone()),
            self.config,
        )
        .forward(xs)
    }
}

/// An embedding table, `(entries, width)`: the rows of the ids given, widened after they are
/// picked (never the whole table).
#[derive(Clone, Debug)]
pub struct Embedding {
    table: Held,
}

impl Embedding {
    /// `weight` `(entries, width)` from `vb`.
    pub fn new(vb: VarBuilder, entries: usize, width: usize) -> Result<Self> {
        Ok(Self {
            table: Held::get(&vb, (entries, width), "weight")?,
        })
    }
}

impl Module for Embedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let table = self.table.held();
        let rows = candle_nn::Embedding::new(table.clone(), table.dim(1)?).forward(ids)?;
        rows.to_dtype(self.table.compute_dtype())
    }
}

/// The weights in the safetensors file at `path`, memory-mapped, loaded onto `device` in
/// `precision`.
pub fn mapped(path: &Path, precision: Precision, device: &Device) -> Result<VarBuilder<'static>> {
    // SAFETY: the file is mapped read-only; like every mmap-based loader (candle's own
    // examples, safetensors' Python side) we assume it is not truncated while in use. The
    // model manager never rewrites a file that is loaded.
    let file = unsafe { MmapedSafetensors::new(path)? };
    Ok(builder(file, precision, device))
}

/// Weights that are all zeros, in `precision`: a miniature model that runs every kernel a
/// real one in that precision does (the GPU's preparation, [`super::warmup`]).
pub fn zeros(precision: Precision, device: &Device) -> VarBuilder<'static> {
    builder(Zeros, precision, device)
}

fn builder<B: SimpleBackend + 'static>(
    source: B,
    precision: Precision,
    device: &Device,
) -> VarBuilder<'static> {
    let backend: Box<dyn SimpleBackend> = if precision.widens() {
        Box::new(MatricesHeldIn {
            source,
            dtype: precision.weights,
        })
    } else {
        Box::new(source)
    };
    VarBuilder::from_backend(backend, precision.compute, device.clone())
}

/// Weights whose tensors of two dimensions or more load in `dtype`, the rest in the dtype
/// asked for.
struct MatricesHeldIn<B> {
    source: B,
    dtype: DType,
}

impl<B> MatricesHeldIn<B> {
    fn dtype_for(&self, rank: usize, asked: DType) -> DType {
        if rank >= 2 { self.dtype } else { asked }
    }
}

impl<B: SimpleBackend> SimpleBackend for MatricesHeldIn<B> {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        hints: Init,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let dtype = self.dtype_for(shape.rank(), dtype);
        self.source.get(shape, name, hints, dtype, device)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let tensor = self.source.get_unchecked(name, dtype, device)?;
        let dtype = self.dtype_for(tensor.rank(), dtype);
        tensor.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.source.contains_tensor(name)
    }
}

/// Every tensor asked for, as zeros.
struct Zeros;

impl SimpleBackend for Zeros {
    fn get(&self, shape: Shape, _: &str, _: Init, dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::zeros(shape, dtype, device)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("zeros of an unknown shape asked for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A safetensors file with a matrix, a 1×1 kernel and a bias, in f32.
    fn weights_file() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("weights.safetensors");
        let device = Device::Cpu;
        let tensors: HashMap<String, Tensor> = [
            (
                "layer.weight",
                Tensor::new(&[[1.0f32 / 3.0, 2.0], [-0.1, 1e-4]], &device),
            ),
            (
                "kernel.weight",
                Tensor::new(&[1.0f32 / 3.0, 0.7], &device).and_then(|t| t.reshape((2, 1, 1, 1))),
            ),
            ("layer.bias", Tensor::new(&[1.0f32 / 3.0, 0.5], &device)),
        ]
        .into_iter()
        .map(|(name, tensor)| (name.to_owned(), tensor.expect("a tensor")))
        .collect();
        candle_core::safetensors::save(&tensors, &path).expect("saved");
        (dir, path)
    }

    #[test]
    fn a_widening_precision_holds_matrices_in_f16_and_the_rest_in_f32() {
        let (_dir, path) = weights_file();
        let vb = mapped(&path, Precision::WIDENED_F16, &Device::Cpu).expect("mapped");
        assert_eq!(vb.dtype(), DType::F32);
        let matrix = vb.get((2, 2), "layer.weight").expect("the matrix");
        assert_eq!(matrix.dtype(), DType::F16);
        let kernel = vb.get((2, 1, 1, 1), "kernel.weight").expect("the kernel");
        assert_eq!(kernel.dtype(), DType::F16);
        let bias = vb.get(2, "layer.bias").expect("the bias");
        assert_eq!(bias.dtype(), DType::F32);
        assert_eq!(bias.to_vec1::<f32>().expect("values")[0], 1.0 / 3.0);
        assert!(vb.contains_tensor("layer.bias") && !vb.contains_tensor("nothing"));

        // A uniform precision loads everything as asked.
        let vb = mapped(&path, Precision::uniform(DType::F32), &Device::Cpu).expect("mapped");
        assert_eq!(
            vb.get((2, 2), "layer.weight").expect("the matrix").dtype(),
            DType::F32
        );
    }

    #[test]
    fn a_widened_linear_layer_is_the_f32_layer_of_its_weights_rounded_to_f16() {
        let (_dir, path) = weights_file();
        let device = Device::Cpu;
        let widened = Linear::new(
            mapped(&path, Precision::WIDENED_F16, &device)
                .expect("mapped")
                .pp("layer"),
            2,
            2,
        )
        .expect("the layer");
        assert!(widened.weight.widens());
        let input = Tensor::new(&[[0.25f32, -3.0], [1.5, 0.125]], &device).expect("input");
        let out = widened.forward(&input).expect("runs");
        assert_eq!(out.dtype(), DType::F32);

        let f32_vb = mapped(&path, Precision::uniform(DType::F32), &device).expect("mapped");
        let rounded = f32_vb
            .get((2, 2), "layer.weight")
            .and_then(|weight| weight.to_dtype(DType::F16)?.to_dtype(DType::F32))
            .expect("rounded");
        let bias = f32_vb.get(2, "layer.bias").expect("the bias");
        let expected = candle_nn::Linear::new(rounded, Some(bias))
            .forward(&input)
            .expect("runs");
        assert_eq!(
            out.to_vec2::<f32>().expect("values"),
            expected.to_vec2::<f32>().expect("values")
        );
        // And not the unrounded layer's: the weights really were held in f16.
        let unrounded = Linear::new(f32_vb.pp("layer"), 2, 2)
            .expect("the layer")
            .forward(&input)
            .expect("runs");
        assert_ne!(
            out.to_vec2::<f32>().expect("values"),
            unrounded.to_vec2::<f32>().expect("values")
        );
    }

    #[test]
    fn a_weight_in_its_layers_dtype_is_used_as_it_is() {
        let tensor = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).expect("a tensor");
        let held = Held::as_is(tensor);
        assert!(!held.widens());
        assert!(matches!(held.at_use().expect("at use"), Cow::Borrowed(_)));
    }

    #[test]
    fn an_embedding_widens_the_rows_it_picks() {
        let (_dir, path) = weights_file();
        let vb = mapped(&path, Precision::WIDENED_F16, &Device::Cpu).expect("mapped");
        let embedding = Embedding::new(vb.pp("layer"), 2, 2).expect("the table");
        let ids = Tensor::new(&[1u32, 0], &Device::Cpu).expect("ids");
        let rows = embedding.forward(&ids).expect("picked");
        assert_eq!(rows.dtype(), DType::F32);
        let rounded = |value: f32| half::f16::from_f32(value).to_f32();
        assert_eq!(
            rows.to_vec2::<f32>().expect("values"),
            vec![
                vec![rounded(-0.1), rounded(1e-4)],
                vec![rounded(1.0 / 3.0), 2.0]
            ]
        );
    }
}

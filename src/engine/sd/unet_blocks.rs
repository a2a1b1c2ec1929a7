//! The UNet's blocks, ours (diffusers' `UNet2DConditionModel` layout and weight names), so the
//! attention is ours too. On CUDA in f16 it is our fused kernel
//! ([`crate::engine::kernels::attention`]), which never holds the scores. Elsewhere: its
//! scores in the model's dtype, or in f32 where the config says `upcast_attention`; and, when
//! memory is tight, over a chunk of queries at a time, so the score matrix of a
//! high-resolution block is never held whole (8 heads × 4096² cells of f32 is 537 MB per
//! image at SD 1.5's 512²; a guided SDXL step at 1024² holds 1.34 GB of them). Chunking is exact: each query's
//! softmax only ever sees its own row. candle's own blocks hold the whole matrix, and their
//! sliced path fails on its own output shape (candle-transformers 0.11).
//!
//! The residual blocks are ours too ([`Resnet`]), so their convolutions, like the
//! upsamplers', can run in bands of rows ([`ConvPlan`]).

use candle_core::{D, DType, IndexOp, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, LayerNorm, VarBuilder};

use super::conv::{Conv3x3, ConvPlan, Part};
use super::norm::{GroupNorm, group_norm};
use super::pointwise::Pointwise;
use super::resnet::{Resnet, ResnetSettings};
use super::weights::{Conv2d, Linear};
use super::working_memory::Plan;
use crate::engine::kernels;
use crate::engine::profile::{self, Work};

/// How the attention holds its scores: whole, or at most this many bytes of them at a time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttentionPlan {
    /// `None`: the whole score matrix at once (fastest where it fits).
    pub max_score_bytes: Option<u64>,
}

impl AttentionPlan {
    /// Query rows per chunk, for `batch_heads` × `keys` scores of `score_bytes` per row.
    fn rows(self, batch_heads: usize, queries: usize, keys: usize, score_bytes: usize) -> usize {
        match self.max_score_bytes {
            None => queries,
            Some(budget) => {
                let per_row = (batch_heads * keys * score_bytes).max(1) as u64;
                usize::try_from(budget / per_row)
                    .unwrap_or(usize::MAX)
                    .clamp(1, queries.max(1))
            }
        }
    }
}

/// Multi-head attention: self-attention, or cross-attention over the text states.
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    /// Scores in f32 (else in the model's dtype).
    upcast: bool,
}

impl Attention {
    fn new(
        vb: VarBuilder,
        dim: usize,
        context_dim: usize,
        heads: usize,
        upcast: bool,
    ) -> Result<Self> {
        let head_dim = dim / heads.max(1);
        Ok(Self {
            to_q: Linear::no_bias(vb.pp("to_q"), dim, dim)?,
            to_k: Linear::no_bias(vb.pp("to_k"), context_dim, dim)?,
            to_v: Linear::no_bias(vb.pp("to_v"), context_dim, dim)?,
            to_out: Linear::new(vb.pp("to_out.0"), dim, dim)?,
            heads,
            scale: (head_dim as f64).powf(-0.5),
            upcast,
        })
    }

    /// `(batch, tokens, dim)` → `(batch · heads, tokens, head_dim)`, in f32 when upcast.
    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (batch, tokens, dim) = xs.dims3()?;
        let heads = xs
            .reshape((batch, tokens, self.heads, dim / self.heads))?
            .transpose(1, 2)?
            .reshape((batch * self.heads, tokens, dim / self.heads))?;
        if self.upcast {
            heads.to_dtype(DType::F32)
        } else {
            heads.contiguous()
        }
    }

    fn forward(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        plan: AttentionPlan,
    ) -> Result<Tensor> {
        let in_dtype = xs.dtype();
        let (batch, tokens, dim) = xs.dims3()?;
        let context = context.unwrap_or(xs);
        let device = xs.device();
        let linear = |layer: &Linear, xs: &Tensor| {
            profile::timed(Work::Linear, device, || layer.forward(xs))
        };
        let (query, key, value) = (
            linear(&self.to_q, xs)?,
            linear(&self.to_k, context)?,
            linear(&self.to_v, context)?,
        );
        // Our fused kernel where it runs (CUDA, f16): no score matrix, no head-layout copies.
        // Its scores are f32 sums of exact f16 products, as `upcast` asks.
        let fused = profile::timed(Work::Attention, device, || {
            kernels::attention(&query, &key, &value, self.heads, self.scale)
        })?;
        if let Some(attended) = fused {
            return linear(&self.to_out, &attended);
        }
        let (query, key_t, value) = profile::timed(Work::HeadLayout, device, || {
            Ok::<_, candle_core::Error>((
                (self.split_heads(&query)? * self.scale)?,
                self.split_heads(&key)?.t()?.contiguous()?,
                self.split_heads(&value)?,
            ))
        })?;
        let attended = attend(&query, &key_t, &value, plan)?;
        let merged = profile::timed(Work::HeadLayout, device, || {
            attended
                .reshape((batch, self.heads, tokens, dim / self.heads))?
                .transpose(1, 2)?
                .reshape((batch, tokens, dim))?
                .to_dtype(in_dtype)
        })?;
        linear(&self.to_out, &merged)
    }
}

/// Softmax attention of `query` `(batch·heads, queries, d)` (already scaled) over
/// `key_t` `(batch·heads, d, keys)` and `value` `(batch·heads, keys, d)`, a chunk of query
/// rows at a time as `plan` allows, in the inputs' dtype (candle's softmax sums in f32 for
/// f16 inputs). Shared with the VAE's mid-block attention.
pub(super) fn attend(
    query: &Tensor,
    key_t: &Tensor,
    value: &Tensor,
    plan: AttentionPlan,
) -> Result<Tensor> {
    let _stretch = profile::stretch(Work::Attention, query.device());
    let (batch_heads, queries, _) = query.dims3()?;
    let keys = key_t.dim(2)?;
    let rows = plan.rows(batch_heads, queries, keys, query.dtype().size_in_bytes());
    let mut chunks = Vec::with_capacity(queries.div_ceil(rows.max(1)));
    let mut start = 0;
    while start < queries {
        let end = (start + rows).min(queries);
        let scores = query.i((.., start..end, ..))?.matmul(key_t)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        chunks.push(weights.matmul(value)?);
        start = end;
    }
    if chunks.len() == 1 {
        Ok(chunks.remove(0))
    } else {
        Tensor::cat(&chunks, 1)
    }
}

/// GEGLU feed-forward: a projection to twice the inner width, one half gating the other.
struct FeedForward {
    /// To `2 · inner`: the gate's two halves. Its bias is added by the gate.
    project_in: Pointwise,
    project_out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            project_in: Pointwise::linear(vb.pp("net.0.proj"), dim, inner * 2)?,
            project_out: Linear::new(vb.pp("net.2"), inner, dim)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let device = xs.device();
        let projected = profile::timed(Work::Linear, device, || {
            self.project_in.tokens_to_tokens_unbiased(xs)
        })?;
        // The bias, the GELU and the product: our one-pass kernel where it runs (CUDA),
        // candle's composition elsewhere.
        let bias = self.project_in.bias();
        let gated = profile::timed(Work::Geglu, device, || {
            match kernels::geglu(&projected, bias)? {
                Some(gated) => Ok(gated),
                None => kernels::geglu::composed(&projected, bias),
            }
        })?;
        profile::timed(Work::Linear, device, || self.project_out.forward(&gated))
    }
}

/// Self-attention, cross-attention over the text, feed-forward; each pre-normed, residual.
struct TransformerLayer {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerLayer {
    fn new(vb: VarBuilder, dim: usize, config: TransformerConfig) -> Result<Self> {
        let TransformerConfig {
            heads,
            context_dim,
            upcast_attention,
            ..
        } = config;
        Ok(Self {
            norm1: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads, upcast_attention)?,
            norm2: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, context_dim, heads, upcast_attention)?,
            norm3: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor, plan: AttentionPlan) -> Result<Tensor> {
        let norm = |layer: &LayerNorm, xs: &Tensor| {
            profile::timed(Work::LayerNorm, xs.device(), || layer.forward(xs))
        };
        let xs = (self.attn1.forward(&norm(&self.norm1, xs)?, None, plan)? + xs)?;
        let xs = (self
            .attn2
            .forward(&norm(&self.norm2, &xs)?, Some(context), plan)?
            + &xs)?;
        self.ff.forward(&norm(&self.norm3, &xs)?)? + xs
    }
}

/// diffusers' `Transformer2DModel`: the spatial cells become tokens for `depth` layers.
pub struct Transformer {
    norm: GroupNorm,
    /// Cells in, tokens out (and back for `proj_out`): a 1×1 convolution's weights (SD 1.x)
    /// or a linear layer's (SD 2.x, SDXL), the same map.
    proj_in: Pointwise,
    layers: Vec<TransformerLayer>,
    proj_out: Pointwise,
}

/// What a cross-attention block's transformers are made of.
#[derive(Clone, Copy, Debug)]
pub struct TransformerConfig {
    pub heads: usize,
    pub depth: usize,
    pub context_dim: usize,
    pub linear_projection: bool,
    pub groups: usize,
    /// Attention scores in f32 whatever the model's dtype (diffusers' `upcast_attention`:
    /// SD 2.x 768-v overflows f16 scores).
    pub upcast_attention: bool,
}

impl Transformer {
    pub fn new(vb: VarBuilder, channels: usize, config: TransformerConfig) -> Result<Self> {
        let projection = |vb: VarBuilder| {
            if config.linear_projection {
                Pointwise::linear(vb, channels, channels)
            } else {
                Pointwise::conv(vb, channels, channels)
            }
        };
        let layers = (0..config.depth)
            .map(|index| {
                TransformerLayer::new(
                    vb.pp(format!("transformer_blocks.{index}")),
                    channels,
                    config,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(config.groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in: projection(vb.pp("proj_in"))?,
            layers,
            proj_out: projection(vb.pp("proj_out"))?,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor, plan: AttentionPlan) -> Result<Tensor> {
        let (_, _, height, width) = xs.dims4()?;
        let device = xs.device();
        let normed = self.norm.forward(xs)?;
        // The projections read and write the layouts as they stand: no copies between cells
        // and tokens.
        let mut tokens = profile::timed(Work::Linear, device, || {
            self.proj_in.cells_to_tokens(&normed)
        })?;
        for layer in &self.layers {
            tokens = layer.forward(&tokens, context, plan)?;
        }
        let out = profile::timed(Work::Linear, device, || {
            self.proj_out.tokens_to_cells(&tokens, height, width)
        })?;
        out + xs
    }
}

/// A 3×3 convolution with stride 2 (diffusers' `Downsample2D` with a convolution).
pub struct Downsample {
    conv: Conv2d,
    padding: usize,
}

impl Downsample {
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        let config = Conv2dConfig {
            stride: 2,
            padding,
            ..Default::default()
        };
        Ok(Self {
            conv: Conv2d::new(vb.pp("conv"), channels, channels, 3, config)?,
            padding,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let _stretch = profile::stretch(Work::Conv3x3, xs.device());
        if self.padding == 0 {
            // No symmetric padding: one row and column of zeros after, as diffusers pads.
            let padded = xs
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            self.conv.forward(&padded)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// Nearest-neighbour upsampling (×2, or to a given size), then a 3×3 convolution.
pub struct Upsample {
    conv: Conv3x3,
}

impl Upsample {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv3x3::new(vb.pp("conv"), channels, channels, Part::Unet)?,
        })
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        size: Option<(usize, usize)>,
        plan: ConvPlan,
    ) -> Result<Tensor> {
        let (_, _, height, width) = xs.dims4()?;
        match size {
            // ×2: the convolution reads the doubled image from the small one.
            None => self.conv.forward_doubled(xs, plan),
            Some(size) if size == (2 * height, 2 * width) => self.conv.forward_doubled(xs, plan),
            Some((height, width)) => {
                let upsampled = profile::timed(Work::Upsample, xs.device(), || {
                    xs.upsample_nearest2d(height, width)
                })?;
                self.conv.forward(&upsampled, plan)
            }
        }
    }
}

/// A block's layers as they are built: residual blocks, each followed by a transformer when
/// the block has cross-attention (diffusers' `resnets.N` and `attentions.N`).
struct Layers {
    resnets: Vec<Resnet>,
    attentions: Vec<Transformer>,
}

impl Layers {
    fn with_capacity(layers: usize) -> Self {
        Self {
            resnets: Vec::with_capacity(layers),
            attentions: Vec::new(),
        }
    }

    fn push(
        &mut self,
        vb: &VarBuilder,
        index: usize,
        in_channels: usize,
        out_channels: usize,
        resnet: ResnetSettings,
        transformer: Option<TransformerConfig>,
    ) -> Result<()> {
        self.resnets.push(resnet.block(
            vb.pp(format!("resnets.{index}")),
            in_channels,
            out_channels,
            1.0,
        )?);
        if let Some(config) = transformer {
            self.attentions.push(Transformer::new(
                vb.pp(format!("attentions.{index}")),
                out_channels,
                config,
            )?);
        }
        Ok(())
    }
}

/// A down block: residual blocks (each followed by a transformer when the block has
/// cross-attention), then an optional downsampler. Returns its output and every state the
/// up blocks take as skip connections.
pub struct DownBlock {
    resnets: Vec<Resnet>,
    attentions: Vec<Transformer>,
    downsampler: Option<Downsample>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)] // one per diffusers block parameter
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        layers: usize,
        resnet: ResnetSettings,
        transformer: Option<TransformerConfig>,
        downsample_padding: Option<usize>,
    ) -> Result<Self> {
        let mut layers_built = Layers::with_capacity(layers);
        for index in 0..layers {
            let from = if index == 0 {
                in_channels
            } else {
                out_channels
            };
            layers_built.push(&vb, index, from, out_channels, resnet, transformer)?;
        }
        let Layers {
            resnets,
            attentions,
        } = layers_built;
        let downsampler = match downsample_padding {
            Some(padding) => Some(Downsample::new(
                vb.pp("downsamplers.0"),
                out_channels,
                padding,
            )?),
            None => None,
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        plan: Plan,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (index, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, Some(temb), plan.conv)?;
            if let Some(attention) = self.attentions.get(index) {
                xs = attention.forward(&xs, context, plan.attention)?;
            }
            skips.push(xs.clone());
        }
        if let Some(downsampler) = &self.downsampler {
            xs = downsampler.forward(&xs)?;
            skips.push(xs.clone());
        }
        Ok((xs, skips))
    }
}

/// The middle: a residual block, then (transformer, residual block) pairs.
pub struct MidBlock {
    first: Resnet,
    pairs: Vec<(Transformer, Resnet)>,
}

impl MidBlock {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        resnet: ResnetSettings,
        transformer: TransformerConfig,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let first = resnet.block(vb.pp("resnets.0"), channels, channels, output_scale_factor)?;
        let pairs = vec![(
            Transformer::new(vb.pp("attentions.0"), channels, transformer)?,
            resnet.block(vb.pp("resnets.1"), channels, channels, output_scale_factor)?,
        )];
        Ok(Self { first, pairs })
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        plan: Plan,
    ) -> Result<Tensor> {
        let mut xs = self.first.forward(xs, Some(temb), plan.conv)?;
        for (attention, resnet) in &self.pairs {
            xs = attention.forward(&xs, context, plan.attention)?;
            xs = resnet.forward(&xs, Some(temb), plan.conv)?;
        }
        Ok(xs)
    }
}

/// An up block: each residual block takes the running state concatenated with one skip
/// connection (the latest first), followed by a transformer when the block has
/// cross-attention; then an optional upsampler.
pub struct UpBlock {
    resnets: Vec<Resnet>,
    attentions: Vec<Transformer>,
    upsampler: Option<Upsample>,
}

impl UpBlock {
    #[allow(clippy::too_many_arguments)] // one per diffusers block parameter
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        previous_out: usize,
        out_channels: usize,
        layers: usize,
        resnet: ResnetSettings,
        transformer: Option<TransformerConfig>,
        upsample: bool,
    ) -> Result<Self> {
        let mut layers_built = Layers::with_capacity(layers);
        for index in 0..layers {
            let skip = if index + 1 == layers {
                in_channels
            } else {
                out_channels
            };
            let from = if index == 0 {
                previous_out
            } else {
                out_channels
            };
            layers_built.push(&vb, index, from + skip, out_channels, resnet, transformer)?;
        }
        let Layers {
            resnets,
            attentions,
        } = layers_built;
        let upsampler = if upsample {
            Some(Upsample::new(vb.pp("upsamplers.0"), out_channels)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    pub fn resnet_count(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are this block's skip connections, in the order the down blocks made them.
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
        plan: Plan,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (index, resnet) in self.resnets.iter().enumerate() {
            let Some(skip) = skips.get(skips.len().wrapping_sub(index + 1)) else {
                candle_core::bail!("an up block needs one skip connection per residual block");
            };
            xs = Tensor::cat(&[&xs, skip], 1)?;
            xs = resnet.forward(&xs, Some(temb), plan.conv)?;
            if let Some(attention) = self.attentions.get(index) {
                xs = attention.forward(&xs, context, plan.attention)?;
            }
        }
        match &self.upsampler {
            Some(upsampler) => upsampler.forward(&xs, upsample_size, plan.conv),
            None => Ok(xs),
        }
    }
}

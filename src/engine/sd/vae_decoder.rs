//! The VAE's decoder, ours (diffusers' `AutoencoderKL` decoder layout and weight names), so
//! that its memory is ours to bound: its 3×3 convolutions can run in bands of rows
//! ([`Conv3x3`]), and its mid-block attention over every latent cell a chunk of queries at a
//! time (a whole 1024² decode holds 16384² f32 scores, 1.07 GB, several times over in
//! candle's). Only the decoder is loaded: text-to-image never encodes an image.
//!
//! The sequence: `post_quant_conv` → `conv_in` → mid block (resnet, attention, resnet) → up
//! blocks (resnets, then ×2 nearest upsampling and a convolution, but the last) → group norm,
//! SiLU → `conv_out`.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::conv::{Conv3x3, Part};
use super::norm::{GroupNorm, group_norm};
use super::pointwise::Pointwise;
use super::resnet::{Resnet, ResnetSettings};
use super::unet_blocks::{AttentionPlan, attend};
use super::working_memory::Plan;
use crate::engine::profile::{self, Work};

/// The decoder's shape, from `vae/config.json`.
#[derive(Clone, Debug)]
pub struct DecoderConfig {
    pub latent_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub groups: usize,
    pub use_post_quant_conv: bool,
}

/// Every group norm of the VAE uses this epsilon.
const EPS: f64 = 1e-6;

/// One of the decoder's residual blocks (no timestep embedding).
fn resnet(
    vb: VarBuilder,
    in_channels: usize,
    out_channels: usize,
    groups: usize,
) -> Result<Resnet> {
    let settings = ResnetSettings {
        temb_channels: None,
        groups,
        eps: EPS,
        part: Part::Decoder,
    };
    settings.block(vb, in_channels, out_channels, 1.0)
}

/// Single-head self-attention over the cells, in f32, residual.
struct MidAttention {
    group_norm: GroupNorm,
    to_q: Pointwise,
    to_k: Pointwise,
    to_v: Pointwise,
    to_out: Pointwise,
    scale: f64,
}

impl MidAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        // Folders converted from old checkpoints name the projections differently.
        let names = if vb.contains_tensor("to_q.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        let [to_q, to_k, to_v, to_out] =
            names.map(|name| Pointwise::linear_or_conv(vb.pp(name), channels, channels));
        Ok(Self {
            group_norm: group_norm(groups, channels, EPS, vb.pp("group_norm"))?,
            to_q: to_q?,
            to_k: to_k?,
            to_v: to_v?,
            to_out: to_out?,
            scale: (channels as f64).powf(-0.5),
        })
    }

    fn forward(&self, xs: &Tensor, plan: AttentionPlan) -> Result<Tensor> {
        let in_dtype = xs.dtype();
        let (_, _, height, width) = xs.dims4()?;
        let normed = self.group_norm.forward(xs)?;
        // The projections read the cells as tokens and write the output as cells: no copies
        // between the layouts.
        let f32_of = |projection: &Pointwise| {
            profile::timed(Work::Linear, xs.device(), || {
                projection.cells_to_tokens(&normed)
            })?
            .to_dtype(DType::F32)
        };
        let query = (f32_of(&self.to_q)? * self.scale)?;
        let key_t = f32_of(&self.to_k)?.t()?.contiguous()?;
        let value = f32_of(&self.to_v)?;
        let attended = attend(&query, &key_t, &value, plan)?.to_dtype(in_dtype)?;
        let out = profile::timed(Work::Linear, xs.device(), || {
            self.to_out.tokens_to_cells(&attended, height, width)
        })?;
        out + xs
    }
}

/// Resnets, then (but in the last block) ×2 nearest upsampling and a convolution.
struct UpBlock {
    resnets: Vec<Resnet>,
    upsampler: Option<Conv3x3>,
}

pub struct Decoder {
    post_quant_conv: Option<Pointwise>,
    conv_in: Conv3x3,
    mid_resnets: [Resnet; 2],
    mid_attention: MidAttention,
    up_blocks: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv3x3,
}

impl Decoder {
    /// From the VAE folder's weights (`vb` at its root).
    pub fn new(vb: VarBuilder, config: &DecoderConfig) -> Result<Self> {
        let groups = config.groups;
        let channels: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let Some(&deepest) = channels.first() else {
            candle_core::bail!("the VAE config has no block_out_channels");
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(Pointwise::conv(
                vb.pp("post_quant_conv"),
                config.latent_channels,
                config.latent_channels,
            )?)
        } else {
            None
        };
        let vb = vb.pp("decoder");
        let mid = vb.pp("mid_block");
        let mid_resnet =
            |index: usize| resnet(mid.pp(format!("resnets.{index}")), deepest, deepest, groups);
        let mut up_blocks = Vec::with_capacity(channels.len());
        let mut in_channels = deepest;
        for (index, &out_channels) in channels.iter().enumerate() {
            let block = vb.pp(format!("up_blocks.{index}"));
            let resnets = (0..=config.layers_per_block)
                .map(|layer| {
                    let from = if layer == 0 {
                        in_channels
                    } else {
                        out_channels
                    };
                    resnet(
                        block.pp(format!("resnets.{layer}")),
                        from,
                        out_channels,
                        groups,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampler = if index + 1 < channels.len() {
                Some(Conv3x3::new(
                    block.pp("upsamplers.0.conv"),
                    out_channels,
                    out_channels,
                    Part::Decoder,
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
            in_channels = out_channels;
        }
        Ok(Self {
            post_quant_conv,
            conv_in: Conv3x3::new(
                vb.pp("conv_in"),
                config.latent_channels,
                deepest,
                Part::Decoder,
            )?,
            mid_resnets: [mid_resnet(0)?, mid_resnet(1)?],
            mid_attention: MidAttention::new(mid.pp("attentions.0"), deepest, groups)?,
            up_blocks,
            norm_out: group_norm(groups, in_channels, EPS, vb.pp("conv_norm_out"))?,
            conv_out: Conv3x3::new(
                vb.pp("conv_out"),
                in_channels,
                config.out_channels,
                Part::Decoder,
            )?,
        })
    }

    /// Unscaled latents `(batch, latent_channels, h, w)` → pixels `(batch, 3, h·f, w·f)` in
    /// roughly `[-1, 1]`, in the decoder's dtype; `plan`'s bands and chunks (its tiles are
    /// [`super::vae::Vae`]'s).
    pub fn forward(&self, latents: &Tensor, plan: Plan) -> Result<Tensor> {
        let latents = match &self.post_quant_conv {
            Some(conv) => profile::timed(Work::Conv1x1, latents.device(), || {
                conv.cells_to_cells(latents)
            })?,
            None => latents.clone(),
        };
        let [first, second] = &self.mid_resnets;
        let mut xs = self.conv_in.forward(&latents, plan.conv)?;
        xs = first.forward(&xs, None, plan.conv)?;
        xs = self.mid_attention.forward(&xs, plan.attention)?;
        xs = second.forward(&xs, None, plan.conv)?;
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                xs = resnet.forward(&xs, None, plan.conv)?;
            }
            if let Some(upsampler) = &block.upsampler {
                // ×2 nearest, then the convolution: read doubled from the small image where
                // our column kernel runs, so the large one is never held.
                xs = upsampler.forward_doubled(&xs, plan.conv)?;
            }
        }
        self.conv_out
            .forward_normalized(&xs, &self.norm_out, plan.conv)
    }
}

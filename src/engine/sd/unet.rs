//! The denoising UNet: diffusers' `UNet2DConditionModel`, built from the folder's config.
//!
//! candle's `UNet2DConditionModel` has no `add_embedding`, so SDXL's extra conditioning
//! (the pooled text embedding and the size/crop time ids) would be silently dropped. This top
//! level adds that embedding to the timestep embedding exactly as diffusers does, over our
//! own blocks (`unet_blocks`), whose attention scores are in the model's dtype, or in f32
//! where the config says `upcast_attention` (SD 2.x 768-v), and can be held a chunk at a time.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use candle_transformers::models::stable_diffusion::embeddings::Timesteps;

use super::conv::{self, Conv3x3};
use super::model_folder::UnetConfig;
use super::norm::{GroupNorm, group_norm};
use super::resnet::ResnetSettings;
use super::unet_blocks::{DownBlock, MidBlock, TransformerConfig, UpBlock};
use super::weights::{Conv2d, Linear};
use super::working_memory::Plan;
use crate::engine::profile::{self, Part, Work};

/// SDXL's added conditioning, batched like the latents.
pub struct TextTimeConditioning<'a> {
    /// `(batch, projection_dim)`: the pooled embedding of text encoder 2.
    pub text_embeds: &'a Tensor,
    /// `(batch, 6)`: original size, crop top-left, target size.
    pub time_ids: &'a Tensor,
}

struct TextTimeEmbedding {
    time_proj: Timesteps,
    embedding: TimestepEmbedding,
}

/// diffusers' `TimestepEmbedding`: linear, SiLU, linear.
struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    fn new(vb: VarBuilder, channels: usize, time_embed_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(vb.pp("linear_1"), channels, time_embed_dim)?,
            linear_2: Linear::new(vb.pp("linear_2"), time_embed_dim, time_embed_dim)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let hidden = candle_nn::ops::silu(&self.linear_1.forward(xs)?)?;
        self.linear_2.forward(&hidden)
    }
}

pub struct Unet {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    text_time: Option<TextTimeEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv3x3,
    config: UnetConfig,
}

impl Unet {
    pub fn new(vb: VarBuilder, config: &UnetConfig) -> Result<Self> {
        let blocks = &config.blocks;
        let (Some(first), Some(last)) = (blocks.first(), blocks.last()) else {
            candle_core::bail!("a UNet needs at least one block");
        };
        let base_channels = first.out_channels;
        let time_embed_dim = base_channels * 4;
        let padded = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_in = Conv2d::new(
            vb.pp("conv_in"),
            config.in_channels,
            base_channels,
            3,
            padded,
        )?;
        let time_proj = Timesteps::new(base_channels, config.flip_sin_to_cos, config.freq_shift);
        let time_embedding =
            TimestepEmbedding::new(vb.pp("time_embedding"), base_channels, time_embed_dim)?;
        let text_time = match config.text_time {
            Some((time_dim, input_dim)) => Some(TextTimeEmbedding {
                time_proj: Timesteps::new(time_dim, config.flip_sin_to_cos, config.freq_shift),
                embedding: TimestepEmbedding::new(
                    vb.pp("add_embedding"),
                    input_dim,
                    time_embed_dim,
                )?,
            }),
            None => None,
        };

        let resnet = ResnetSettings {
            temb_channels: Some(time_embed_dim),
            groups: config.norm_num_groups,
            eps: config.norm_eps,
            part: conv::Part::Unet,
        };
        let transformer = |heads: usize, depth: usize| TransformerConfig {
            heads,
            depth,
            context_dim: config.cross_attention_dim,
            linear_projection: config.use_linear_projection,
            groups: config.norm_num_groups,
            upcast_attention: config.upcast_attention,
        };

        let count = blocks.len();
        let mut down_blocks = Vec::with_capacity(count);
        for (index, block) in blocks.iter().enumerate() {
            let in_channels = if index == 0 {
                base_channels
            } else {
                blocks[index - 1].out_channels
            };
            down_blocks.push(DownBlock::new(
                vb.pp(format!("down_blocks.{index}")),
                in_channels,
                block.out_channels,
                config.layers_per_block,
                resnet,
                block
                    .cross_attention
                    .map(|depth| transformer(block.attention_heads, depth)),
                (index + 1 < count).then_some(config.downsample_padding),
            )?);
        }

        let mid_block = MidBlock::new(
            vb.pp("mid_block"),
            last.out_channels,
            resnet,
            transformer(last.attention_heads, last.cross_attention.unwrap_or(1)),
            config.mid_block_scale_factor,
        )?;

        // Up blocks mirror the down blocks: up block `index` pairs with down block
        // `count - 1 - index` and takes the skip connections it left behind.
        let mut up_blocks = Vec::with_capacity(count);
        for index in 0..count {
            let block = blocks[count - 1 - index];
            let previous_out = if index == 0 {
                last.out_channels
            } else {
                blocks[count - index].out_channels
            };
            let in_channels = blocks[(count - 1 - index).saturating_sub(1)].out_channels;
            up_blocks.push(UpBlock::new(
                vb.pp(format!("up_blocks.{index}")),
                in_channels,
                previous_out,
                block.out_channels,
                config.layers_per_block + 1,
                resnet,
                block
                    .cross_attention
                    .map(|depth| transformer(block.attention_heads, depth)),
                index + 1 < count,
            )?);
        }

        let conv_norm_out = group_norm(
            config.norm_num_groups,
            base_channels,
            config.norm_eps,
            vb.pp("conv_norm_out"),
        )?;
        let conv_out = Conv3x3::new(
            vb.pp("conv_out"),
            base_channels,
            config.out_channels,
            conv::Part::Unet,
        )?;
        Ok(Self {
            conv_in,
            time_proj,
            time_embedding,
            text_time,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            config: config.clone(),
        })
    }

    /// Predicts the noise (or `v`) in `latents` at `timestep`, conditioned on the text
    /// encoder states (and, for SDXL, on `text_time`).
    pub fn forward(
        &self,
        latents: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        text_time: Option<TextTimeConditioning<'_>>,
        plan: Plan,
    ) -> Result<Tensor> {
        let batch = latents.dim(0)?;
        let timesteps = (Tensor::ones(batch, DType::F32, latents.device())? * timestep)?;
        self.forward_at(latents, &timesteps, encoder_hidden_states, text_time, plan)
    }

    /// The same at `timesteps`, `(batch,)` f32 on the model's device: an evaluation whose
    /// every input is a tensor, so that a CUDA graph of it can take a new timestep at each
    /// launch (a number would be fixed in the graph when it is captured).
    pub fn forward_at(
        &self,
        latents: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        text_time: Option<TextTimeConditioning<'_>>,
        plan: Plan,
    ) -> Result<Tensor> {
        let _part = profile::part(Part::Unet);
        let (batch, _channels, height, width) = latents.dims4()?;
        let dtype = latents.dtype();

        // Sinusoidal projections in f32, as the reference: in f16, `999 × frequency` would
        // lose the phase.
        let projected = self
            .time_proj
            .forward(&timesteps.to_dtype(DType::F32)?)?
            .to_dtype(dtype)?;
        let mut embedding = self.time_embedding.forward(&projected)?;
        match (&self.text_time, text_time) {
            (Some(layers), Some(conditioning)) => {
                let time_ids = conditioning.time_ids.flatten_all()?.to_dtype(DType::F32)?;
                let time_embeds = layers
                    .time_proj
                    .forward(&time_ids)?
                    .to_dtype(dtype)?
                    .reshape((batch, ()))?;
                let added = Tensor::cat(
                    &[&conditioning.text_embeds.to_dtype(dtype)?, &time_embeds],
                    D::Minus1,
                )?;
                embedding = (embedding + layers.embedding.forward(&added)?)?;
            }
            (Some(_), None) => candle_core::bail!("this UNet needs SDXL's text_time conditioning"),
            (None, Some(_)) => candle_core::bail!("this UNet takes no text_time conditioning"),
            (None, None) => {}
        }

        let sample = if self.config.center_input_sample {
            ((latents * 2.0)? - 1.0)?
        } else {
            latents.clone()
        };
        let mut xs = profile::timed(Work::Conv3x3, sample.device(), || {
            self.conv_in.forward(&sample)
        })?;
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            let (out, residuals) = block.forward(&xs, &embedding, encoder_hidden_states, plan)?;
            skips.extend(residuals);
            xs = out;
        }
        xs = self
            .mid_block
            .forward(&xs, &embedding, encoder_hidden_states, plan)?;

        // Sizes that do not divide by the total downsampling need explicit upsample sizes.
        let factor = 1usize << (self.up_blocks.len() - 1);
        let explicit_sizes = height % factor != 0 || width % factor != 0;
        let last_up = self.up_blocks.len() - 1;
        for (index, block) in self.up_blocks.iter().enumerate() {
            let residuals = skips.split_off(skips.len().saturating_sub(block.resnet_count()));
            let upsample_size = match skips.last() {
                Some(next) if explicit_sizes && index < last_up => {
                    let (_, _, h, w) = next.dims4()?;
                    Some((h, w))
                }
                _ => None,
            };
            xs = block.forward(
                &xs,
                &residuals,
                &embedding,
                encoder_hidden_states,
                upsample_size,
                plan,
            )?;
        }
        self.conv_out
            .forward_normalized(&xs, &self.conv_norm_out, plan.conv)
    }
}

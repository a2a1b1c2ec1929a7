//! The denoising UNet, assembled from candle's UNet blocks by our own top level.
//!
//! candle's `UNet2DConditionModel` has no `add_embedding`, so SDXL's extra conditioning
//! (the pooled text embedding and the size/crop time ids) would be silently dropped. This top
//! level builds the same blocks from the folder's config and adds that embedding to the
//! timestep embedding exactly as diffusers does. Attention in candle's blocks always runs in
//! f32, which is what `upcast_attention` asks for (SD 2.x) and costs little elsewhere.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, VarBuilder};
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    CrossAttnDownBlock2D, CrossAttnDownBlock2DConfig, CrossAttnUpBlock2D, CrossAttnUpBlock2DConfig,
    DownBlock2D, DownBlock2DConfig, UNetMidBlock2DCrossAttn, UNetMidBlock2DCrossAttnConfig,
    UpBlock2D, UpBlock2DConfig,
};

use super::model_folder::UnetConfig;

/// SDXL's added conditioning, batched like the latents.
pub struct TextTimeConditioning<'a> {
    /// `(batch, projection_dim)`: the pooled embedding of text encoder 2.
    pub text_embeds: &'a Tensor,
    /// `(batch, 6)`: original size, crop top-left, target size.
    pub time_ids: &'a Tensor,
}

enum DownBlock {
    Plain(DownBlock2D),
    CrossAttention(CrossAttnDownBlock2D),
}

enum UpBlock {
    Plain(UpBlock2D),
    CrossAttention(CrossAttnUpBlock2D),
}

impl UpBlock {
    fn resnet_count(&self) -> usize {
        match self {
            Self::Plain(block) => block.resnets.len(),
            Self::CrossAttention(block) => block.upblock.resnets.len(),
        }
    }
}

struct TextTimeEmbedding {
    time_proj: Timesteps,
    embedding: TimestepEmbedding,
}

pub struct Unet {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    text_time: Option<TextTimeEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: UNetMidBlock2DCrossAttn,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
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
        let conv_in = candle_nn::conv2d(
            config.in_channels,
            base_channels,
            3,
            padded,
            vb.pp("conv_in"),
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

        let count = blocks.len();
        let mut down_blocks = Vec::with_capacity(count);
        for (index, block) in blocks.iter().enumerate() {
            let in_channels = if index == 0 {
                base_channels
            } else {
                blocks[index - 1].out_channels
            };
            let plain = DownBlock2DConfig {
                num_layers: config.layers_per_block,
                resnet_eps: config.norm_eps,
                resnet_groups: config.norm_num_groups,
                add_downsample: index + 1 < count,
                downsample_padding: config.downsample_padding,
                ..Default::default()
            };
            let vb = vb.pp(format!("down_blocks.{index}"));
            down_blocks.push(match block.cross_attention {
                Some(depth) => DownBlock::CrossAttention(CrossAttnDownBlock2D::new(
                    vb,
                    in_channels,
                    block.out_channels,
                    Some(time_embed_dim),
                    false,
                    CrossAttnDownBlock2DConfig {
                        downblock: plain,
                        attn_num_head_channels: block.attention_heads,
                        cross_attention_dim: config.cross_attention_dim,
                        sliced_attention_size: None,
                        use_linear_projection: config.use_linear_projection,
                        transformer_layers_per_block: depth,
                    },
                )?),
                None => DownBlock::Plain(DownBlock2D::new(
                    vb,
                    in_channels,
                    block.out_channels,
                    Some(time_embed_dim),
                    plain,
                )?),
            });
        }

        let mid_block = UNetMidBlock2DCrossAttn::new(
            vb.pp("mid_block"),
            last.out_channels,
            Some(time_embed_dim),
            false,
            UNetMidBlock2DCrossAttnConfig {
                resnet_eps: config.norm_eps,
                resnet_groups: Some(config.norm_num_groups),
                attn_num_head_channels: last.attention_heads,
                output_scale_factor: config.mid_block_scale_factor,
                cross_attn_dim: config.cross_attention_dim,
                use_linear_projection: config.use_linear_projection,
                transformer_layers_per_block: last.cross_attention.unwrap_or(1),
                ..Default::default()
            },
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
            let plain = UpBlock2DConfig {
                num_layers: config.layers_per_block + 1,
                resnet_eps: config.norm_eps,
                resnet_groups: config.norm_num_groups,
                add_upsample: index + 1 < count,
                ..Default::default()
            };
            let vb = vb.pp(format!("up_blocks.{index}"));
            up_blocks.push(match block.cross_attention {
                Some(depth) => UpBlock::CrossAttention(CrossAttnUpBlock2D::new(
                    vb,
                    in_channels,
                    previous_out,
                    block.out_channels,
                    Some(time_embed_dim),
                    false,
                    CrossAttnUpBlock2DConfig {
                        upblock: plain,
                        attn_num_head_channels: block.attention_heads,
                        cross_attention_dim: config.cross_attention_dim,
                        sliced_attention_size: None,
                        use_linear_projection: config.use_linear_projection,
                        transformer_layers_per_block: depth,
                    },
                )?),
                None => UpBlock::Plain(UpBlock2D::new(
                    vb,
                    in_channels,
                    previous_out,
                    block.out_channels,
                    Some(time_embed_dim),
                    plain,
                )?),
            });
        }

        let conv_norm_out = candle_nn::group_norm(
            config.norm_num_groups,
            base_channels,
            config.norm_eps,
            vb.pp("conv_norm_out"),
        )?;
        let conv_out = candle_nn::conv2d(
            base_channels,
            config.out_channels,
            3,
            padded,
            vb.pp("conv_out"),
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
    ) -> Result<Tensor> {
        let (batch, _channels, height, width) = latents.dims4()?;
        let dtype = latents.dtype();
        let device = latents.device();

        // Sinusoidal projections in f32, as the reference: in f16, `999 × frequency` would
        // lose the phase.
        let timesteps = (Tensor::ones(batch, DType::F32, device)? * timestep)?;
        let projected = self.time_proj.forward(&timesteps)?.to_dtype(dtype)?;
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
        let mut xs = self.conv_in.forward(&sample)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            let (out, residuals) = match block {
                DownBlock::Plain(block) => block.forward(&xs, Some(&embedding))?,
                DownBlock::CrossAttention(block) => {
                    block.forward(&xs, Some(&embedding), Some(encoder_hidden_states))?
                }
            };
            skips.extend(residuals);
            xs = out;
        }
        xs = self
            .mid_block
            .forward(&xs, Some(&embedding), Some(encoder_hidden_states))?;

        // Sizes that do not divide by the total downsampling need explicit upsample sizes.
        let factor = 1usize << (self.up_blocks.len() - 1);
        let explicit_sizes = height % factor != 0 || width % factor != 0;
        let last_up = self.up_blocks.len() - 1;
        for (index, block) in self.up_blocks.iter().enumerate() {
            let residuals = skips.split_off(skips.len() - block.resnet_count());
            let upsample_size = match skips.last() {
                Some(next) if explicit_sizes && index < last_up => {
                    let (_, _, h, w) = next.dims4()?;
                    Some((h, w))
                }
                _ => None,
            };
            xs = match block {
                UpBlock::Plain(block) => {
                    block.forward(&xs, &residuals, Some(&embedding), upsample_size)?
                }
                UpBlock::CrossAttention(block) => block.forward(
                    &xs,
                    &residuals,
                    Some(&embedding),
                    upsample_size,
                    Some(encoder_hidden_states),
                )?,
            };
        }
        let xs = candle_nn::ops::silu(&self.conv_norm_out.forward(&xs)?)?;
        self.conv_out.forward(&xs)
    }
}

//! The VAE decoder: latents to RGB, built from `vae/config.json` on candle's `AutoEncoderKL`.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};

use super::model_folder::VaeConfig;

pub struct Vae {
    model: AutoEncoderKL,
    scaling_factor: f64,
    shift_factor: f64,
    dtype: DType,
}

impl Vae {
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let dtype = vb.dtype();
        let model = AutoEncoderKL::new(
            vb,
            config.in_channels,
            config.out_channels,
            AutoEncoderKLConfig {
                block_out_channels: config.block_out_channels.clone(),
                layers_per_block: config.layers_per_block,
                latent_channels: config.latent_channels,
                norm_num_groups: config.norm_num_groups,
                use_quant_conv: config.use_quant_conv,
                use_post_quant_conv: config.use_post_quant_conv,
            },
        )?;
        Ok(Self {
            model,
            scaling_factor: config.scaling_factor,
            shift_factor: config.shift_factor.unwrap_or(0.0),
            dtype,
        })
    }

    /// Latents `(batch, 4, h, w)` to f32 RGB `(batch, 3, h·f, w·f)` in `[0, 1]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let latents =
            ((latents / self.scaling_factor)? + self.shift_factor)?.to_dtype(self.dtype)?;
        let pixels = self.model.decode(&latents)?.to_dtype(DType::F32)?;
        ((pixels / 2.0)? + 0.5)?.clamp(0.0, 1.0)
    }
}

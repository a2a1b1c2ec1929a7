//! A diffusers-layout model folder: which pipeline it is, its components' `config.json`
//! files parsed into typed configs, and which weight file each component loads.
//!
//! The architecture comes from these files, never from a table keyed by model name, so a
//! community fine-tune or a tiny test model loads through the same path as SD 1.5. Anything
//! the engine cannot run (an inpainting UNet, LCM's guidance embedding, a non-CLIP text
//! encoder) is refused here with a reason, before a byte of weights is read.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Why a folder cannot be run. The message names the file and the field, never the path's
/// parent folders (they may hold a user name).
#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    #[error("{file} is missing")]
    Missing { file: String },
    #[error("{file} is not valid: {reason}")]
    Invalid { file: String, reason: String },
    #[error("{0}")]
    Unsupported(String),
}

/// A config value the engine cannot run, in words that name the field. The folder is
/// refused ([`FolderError::Invalid`] names the file).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unrunnable(pub String);

/// Which family of pipeline the folder holds, from `model_index.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x, SD 2.x and SD-Turbo: one CLIP text encoder.
    StableDiffusion,
    /// SDXL and SDXL-Turbo: two text encoders, pooled and size conditioning.
    StableDiffusionXl,
}

/// A JSON field that is either one value for every block or one per block.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    All(T),
    Each(Vec<T>),
}

impl<T: Copy> PerBlock<T> {
    fn resolve(&self, blocks: usize, field: &str) -> Result<Vec<T>, String> {
        match self {
            Self::All(value) => Ok(vec![*value; blocks]),
            Self::Each(values) if values.len() == blocks => Ok(values.clone()),
            Self::Each(values) => Err(format!(
                "{field} has {} entries for {blocks} blocks",
                values.len()
            )),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    /// SDXL: an empty negative prompt conditions on zeros instead of the encoded "".
    #[serde(default)]
    pub force_zeros_for_empty_prompt: bool,
}

/// `unet/config.json`, the fields this engine reads.
#[derive(Clone, Debug, Deserialize)]
pub struct UnetFile {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "two")]
    pub layers_per_block: usize,
    #[serde(default = "eight")]
    pub attention_head_dim: PerBlock<usize>,
    /// Newer configs name the head count properly; older ones put it in
    /// `attention_head_dim` (a historical misnomer diffusers keeps).
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub cross_attention_dim: usize,
    #[serde(default = "one_layer")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default = "one_f64")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    /// The latent size it was trained at (64 → 512 px for SD 1.5).
    #[serde(default)]
    pub sample_size: Option<usize>,
}

/// The only UNet GroupNorm group count candle's blocks support.
const UNET_NORM_GROUPS: usize = 32;

// Sizes well past any released model: a config beyond them is broken or hostile, and building
// it would allocate without end (and Rust aborts on a failed allocation).
const MAX_BLOCKS: usize = 8;
const MAX_CHANNELS: usize = 8192;
const MAX_LAYERS: usize = 64;
const MAX_HEADS: usize = 1024;
const MAX_IMAGE_CHANNELS: usize = 16;
const MAX_LATENT_CHANNELS: usize = 64;
const MAX_VOCABULARY: usize = 1 << 20;
const MAX_POSITIONS: usize = 4096;
const MAX_SAMPLE_SIZE: usize = 1024;

/// `field` is in `range`, or says what it is and what it must be.
pub(crate) fn within(
    field: &str,
    value: usize,
    range: RangeInclusive<usize>,
) -> Result<(), String> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(format!(
            "{field} is {value}; it must be from {} to {}",
            range.start(),
            range.end()
        ))
    }
}

/// `field` is a finite number above zero.
pub(crate) fn positive(field: &str, value: f64) -> Result<(), String> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(format!("{field} is {value}; it must be a number above 0"))
    }
}

/// `field` is a finite number.
fn finite(field: &str, value: f64) -> Result<(), String> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(format!("{field} is {value}; it must be a finite number"))
    }
}

/// One UNet block as the model builds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnetBlock {
    pub out_channels: usize,
    /// `Some(depth)`: the block has cross-attention with this many transformer layers.
    pub cross_attention: Option<usize>,
    pub attention_heads: usize,
}

/// The UNet's architecture, checked.
#[derive(Clone, Debug)]
pub struct UnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub blocks: Vec<UnetBlock>,
    pub layers_per_block: usize,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub center_input_sample: bool,
    /// SDXL's `text_time` conditioning: `(time embedding width, projection input width)`.
    pub text_time: Option<(usize, usize)>,
    pub upcast_attention: bool,
    pub sample_size: Option<usize>,
}

impl UnetFile {
    /// The architecture this file describes, or why the engine cannot run it.
    pub fn check(&self) -> Result<UnetConfig, Unrunnable> {
        self.checked_fields().map_err(Unrunnable)
    }

    fn checked_fields(&self) -> Result<UnetConfig, String> {
        let blocks = self.block_out_channels.len();
        within("the number of block_out_channels", blocks, 1..=MAX_BLOCKS)?;
        for (index, channels) in self.block_out_channels.iter().enumerate() {
            within(
                &format!("block_out_channels[{index}]"),
                *channels,
                1..=MAX_CHANNELS,
            )?;
        }
        within("out_channels", self.out_channels, 1..=MAX_IMAGE_CHANNELS)?;
        within("layers_per_block", self.layers_per_block, 1..=MAX_LAYERS)?;
        within(
            "cross_attention_dim",
            self.cross_attention_dim,
            1..=MAX_CHANNELS,
        )?;
        within("downsample_padding", self.downsample_padding, 0..=8)?;
        positive("norm_eps", self.norm_eps)?;
        finite("freq_shift", self.freq_shift)?;
        finite("mid_block_scale_factor", self.mid_block_scale_factor)?;
        if let Some(sample_size) = self.sample_size {
            within("sample_size", sample_size, 1..=MAX_SAMPLE_SIZE)?;
        }
        if self.down_block_types.len() != blocks || self.up_block_types.len() != blocks {
            return Err("down_block_types and up_block_types must match block_out_channels".into());
        }
        if self.time_cond_proj_dim.is_some() {
            return Err("time_cond_proj_dim (LCM-distilled UNets) is not supported".to_owned());
        }
        if self.class_embed_type.is_some() {
            return Err("class_embed_type (upscaler and unCLIP UNets) is not supported".to_owned());
        }
        if self.in_channels != 4 {
            return Err(format!(
                "in_channels is {} (inpainting or depth UNets are not supported)",
                self.in_channels
            ));
        }
        if self.conv_in_kernel != 3 {
            return Err("conv_in_kernel other than 3 is not supported".to_owned());
        }
        if let Some(mid) = &self.mid_block_type
            && mid != "UNetMidBlock2DCrossAttn"
        {
            return Err(format!("mid_block_type {mid} is not supported"));
        }
        if self.norm_num_groups != UNET_NORM_GROUPS {
            // candle's UNet down/up blocks build their GroupNorms with 32 groups whatever
            // they are told; every released SD 1.x/2.x/XL UNet uses 32.
            return Err(format!(
                "norm_num_groups {} is not supported (only {UNET_NORM_GROUPS})",
                self.norm_num_groups
            ));
        }
        let heads = match &self.num_attention_heads {
            Some(heads) => heads.resolve(blocks, "num_attention_heads")?,
            None => self
                .attention_head_dim
                .resolve(blocks, "attention_head_dim")?,
        };
        let depths = self
            .transformer_layers_per_block
            .resolve(blocks, "transformer_layers_per_block")?;
        let mut parsed = Vec::with_capacity(blocks);
        for (index, kind) in self.down_block_types.iter().enumerate() {
            let cross_attention = match kind.as_str() {
                "CrossAttnDownBlock2D" => Some(depths[index]),
                "DownBlock2D" => None,
                other => return Err(format!("down block type {other} is not supported")),
            };
            let up_kind = &self.up_block_types[blocks - 1 - index];
            let up_cross = match up_kind.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                other => return Err(format!("up block type {other} is not supported")),
            };
            if up_cross != cross_attention.is_some() {
                return Err(format!(
                    "up block {up_kind} does not mirror down block {kind}"
                ));
            }
            let out_channels = self.block_out_channels[index];
            within("attention heads", heads[index], 1..=MAX_HEADS)?;
            if let Some(depth) = cross_attention {
                within("transformer_layers_per_block", depth, 1..=MAX_LAYERS)?;
            }
            if !out_channels.is_multiple_of(heads[index]) {
                return Err(format!(
                    "{out_channels} channels cannot split into {} attention heads",
                    heads[index]
                ));
            }
            if !out_channels.is_multiple_of(self.norm_num_groups) {
                return Err(format!(
                    "{out_channels} channels cannot split into {} norm groups",
                    self.norm_num_groups
                ));
            }
            parsed.push(UnetBlock {
                out_channels,
                cross_attention,
                attention_heads: heads[index],
            });
        }
        let text_time = match self.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => match (
                self.addition_time_embed_dim,
                self.projection_class_embeddings_input_dim,
            ) {
                (Some(time_dim), Some(input_dim)) => {
                    within("addition_time_embed_dim", time_dim, 1..=MAX_CHANNELS)?;
                    within(
                        "projection_class_embeddings_input_dim",
                        input_dim,
                        1..=16 * MAX_CHANNELS,
                    )?;
                    Some((time_dim, input_dim))
                }
                _ => {
                    return Err("text_time conditioning needs addition_time_embed_dim and \
                                projection_class_embeddings_input_dim"
                        .to_owned());
                }
            },
            Some(other) => return Err(format!("addition_embed_type {other} is not supported")),
        };
        Ok(UnetConfig {
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            blocks: parsed,
            layers_per_block: self.layers_per_block,
            cross_attention_dim: self.cross_attention_dim,
            use_linear_projection: self.use_linear_projection,
            norm_num_groups: self.norm_num_groups,
            norm_eps: self.norm_eps,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            downsample_padding: self.downsample_padding,
            mid_block_scale_factor: self.mid_block_scale_factor,
            center_input_sample: self.center_input_sample,
            text_time,
            upcast_attention: self.upcast_attention,
            sample_size: self.sample_size,
        })
    }
}

/// `vae/config.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "sd_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// The VAE overflows in f16 (SDXL's original VAE): decode in f32. SDXL pipelines only,
    /// as diffusers reads it ([`ModelFolder::vae_dtype`]).
    #[serde(default = "yes")]
    pub force_upcast: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
}

impl VaeConfig {
    /// Why the engine cannot build this VAE, if it cannot.
    pub fn check(&self) -> Result<(), Unrunnable> {
        self.checked_fields().map_err(Unrunnable)
    }

    fn checked_fields(&self) -> Result<(), String> {
        within(
            "the number of block_out_channels",
            self.block_out_channels.len(),
            1..=MAX_BLOCKS,
        )?;
        within("norm_num_groups", self.norm_num_groups, 1..=MAX_CHANNELS)?;
        for (index, channels) in self.block_out_channels.iter().enumerate() {
            let field = format!("block_out_channels[{index}]");
            within(&field, *channels, 1..=MAX_CHANNELS)?;
            if !channels.is_multiple_of(self.norm_num_groups) {
                return Err(format!(
                    "{field} ({channels}) cannot split into {} norm groups",
                    self.norm_num_groups
                ));
            }
        }
        within("in_channels", self.in_channels, 1..=MAX_IMAGE_CHANNELS)?;
        within("out_channels", self.out_channels, 1..=MAX_IMAGE_CHANNELS)?;
        within(
            "latent_channels",
            self.latent_channels,
            1..=MAX_LATENT_CHANNELS,
        )?;
        within("layers_per_block", self.layers_per_block, 1..=MAX_LAYERS)?;
        positive("scaling_factor", self.scaling_factor)?;
        if let Some(shift) = self.shift_factor {
            finite("shift_factor", shift)?;
        }
        Ok(())
    }

    /// How many pixels one latent cell covers along each side.
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// `text_encoder*/config.json` (transformers' `CLIPTextConfig`).
#[derive(Clone, Debug, Deserialize)]
pub struct TextEncoderConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "seventy_seven")]
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

impl TextEncoderConfig {
    pub fn has_projection(&self) -> bool {
        self.architectures
            .iter()
            .any(|name| name == "CLIPTextModelWithProjection")
    }

    fn check(&self) -> Result<(), Unrunnable> {
        self.checked_fields().map_err(Unrunnable)
    }

    fn checked_fields(&self) -> Result<(), String> {
        if let Some(model_type) = &self.model_type
            && model_type != "clip_text_model"
        {
            return Err(format!("text encoder type {model_type} is not supported"));
        }
        within("vocab_size", self.vocab_size, 1..=MAX_VOCABULARY)?;
        within("hidden_size", self.hidden_size, 1..=MAX_CHANNELS)?;
        within(
            "intermediate_size",
            self.intermediate_size,
            1..=8 * MAX_CHANNELS,
        )?;
        within("num_hidden_layers", self.num_hidden_layers, 1..=MAX_LAYERS)?;
        within(
            "num_attention_heads",
            self.num_attention_heads,
            1..=MAX_HEADS,
        )?;
        within(
            "max_position_embeddings",
            self.max_position_embeddings,
            1..=MAX_POSITIONS,
        )?;
        positive("layer_norm_eps", self.layer_norm_eps)?;
        if let Some(projection_dim) = self.projection_dim {
            within("projection_dim", projection_dim, 1..=MAX_CHANNELS)?;
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err("hidden_size must split evenly into num_attention_heads".to_owned());
        }
        if !matches!(
            self.hidden_act.as_str(),
            "quick_gelu" | "gelu" | "gelu_new" | "gelu_pytorch_tanh"
        ) {
            return Err(format!("hidden_act {} is not supported", self.hidden_act));
        }
        if self.has_projection() && self.projection_dim.is_none() {
            return Err("a projection model needs projection_dim".to_owned());
        }
        Ok(())
    }
}

/// `scheduler/scheduler_config.json`: the noise schedule the model was trained with.
#[derive(Clone, Debug, Deserialize)]
pub struct SchedulerFile {
    #[serde(rename = "_class_name", default)]
    pub class_name: String,
    #[serde(default = "thousand")]
    pub num_train_timesteps: usize,
    #[serde(default = "beta_start")]
    pub beta_start: f64,
    #[serde(default = "beta_end")]
    pub beta_end: f64,
    #[serde(default = "scaled_linear")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "epsilon")]
    pub prediction_type: String,
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// DDIM clamps its `x₀` estimate to ±`clip_sample_range` (diffusers' default: on).
    #[serde(default)]
    pub clip_sample: Option<bool>,
    #[serde(default = "one_f64")]
    pub clip_sample_range: f64,
}

/// Where each component's weights are, chosen for the dtype the engine will run in.
#[derive(Clone, Debug)]
pub struct WeightFiles {
    pub unet: PathBuf,
    pub vae: PathBuf,
    pub text_encoder: PathBuf,
    pub text_encoder_2: Option<PathBuf>,
}

/// A parsed, checked model folder. Holds no weights.
#[derive(Clone, Debug)]
pub struct ModelFolder {
    pub root: PathBuf,
    pub family: Family,
    pub index: ModelIndex,
    pub unet: UnetConfig,
    pub vae: VaeConfig,
    pub text_encoder: TextEncoderConfig,
    pub text_encoder_2: Option<TextEncoderConfig>,
    pub scheduler: SchedulerFile,
}

impl ModelFolder {
    pub fn open(root: &Path) -> Result<Self, FolderError> {
        let index: ModelIndex = read_json(root, "model_index.json")?;
        let family = match index.class_name.as_str() {
            "StableDiffusionPipeline" => Family::StableDiffusion,
            "StableDiffusionXLPipeline" => Family::StableDiffusionXl,
            other => {
                return Err(FolderError::Unsupported(format!(
                    "{other} folders are not supported (Stable Diffusion 1.x/2.x and SDXL are)"
                )));
            }
        };
        let unet_file: UnetFile = read_json(root, "unet/config.json")?;
        let unet = unet_file
            .check()
            .map_err(|Unrunnable(reason)| FolderError::Invalid {
                file: "unet/config.json".to_owned(),
                reason,
            })?;
        let vae: VaeConfig = read_json(root, "vae/config.json")?;
        vae.check()
            .map_err(|Unrunnable(reason)| FolderError::Invalid {
                file: "vae/config.json".to_owned(),
                reason,
            })?;
        let text_encoder = read_text_encoder(root, "text_encoder/config.json")?;
        let text_encoder_2 = match family {
            Family::StableDiffusion => None,
            Family::StableDiffusionXl => {
                let config = read_text_encoder(root, "text_encoder_2/config.json")?;
                if !config.has_projection() {
                    return Err(FolderError::Invalid {
                        file: "text_encoder_2/config.json".to_owned(),
                        reason: "SDXL's second text encoder must be CLIPTextModelWithProjection"
                            .to_owned(),
                    });
                }
                Some(config)
            }
        };
        let context = text_encoder.hidden_size
            + text_encoder_2
                .as_ref()
                .map_or(0, |config| config.hidden_size);
        if context != unet.cross_attention_dim {
            return Err(FolderError::Invalid {
                file: "unet/config.json".to_owned(),
                reason: format!(
                    "cross_attention_dim is {} but the text encoders give {context}",
                    unet.cross_attention_dim
                ),
            });
        }
        match (family, unet.text_time) {
            (Family::StableDiffusionXl, None) => {
                return Err(FolderError::Invalid {
                    file: "unet/config.json".to_owned(),
                    reason: "an SDXL UNet needs addition_embed_type \"text_time\"".to_owned(),
                });
            }
            (Family::StableDiffusion, Some(_)) => {
                return Err(FolderError::Invalid {
                    file: "unet/config.json".to_owned(),
                    reason: "text_time conditioning needs an SDXL pipeline".to_owned(),
                });
            }
            _ => {}
        }
        let scheduler: SchedulerFile = read_json(root, "scheduler/scheduler_config.json")?;
        super::schedulers::NoiseSchedule::from_file(&scheduler).map_err(|Unrunnable(reason)| {
            FolderError::Invalid {
                file: "scheduler/scheduler_config.json".to_owned(),
                reason,
            }
        })?;
        Ok(Self {
            root: root.to_owned(),
            family,
            index,
            unet,
            vae,
            text_encoder,
            text_encoder_2,
            scheduler,
        })
    }

    /// The dtype the VAE decodes in when the rest of the pipeline runs in `dtype`: f32 instead
    /// of f16 where the decode would overflow. As in diffusers, only the SDXL pipeline honours
    /// the VAE's `force_upcast` (SDXL's original VAE overflows in f16; its fp16-fix sets it
    /// false). SD 1.x/2.x pipelines decode in f16 whatever their config says: their VAE does
    /// not overflow, and configs saved by diffusers carry its default `true`.
    pub fn vae_dtype(&self, dtype: DType) -> DType {
        let upcast = self.family == Family::StableDiffusionXl && self.vae.force_upcast;
        if dtype == DType::F16 && upcast {
            DType::F32
        } else {
            dtype
        }
    }

    /// The weight files to load: `.fp16` variants when running in f16 and present, the full
    /// precision files otherwise (f16 weights upcast to f32 lose nothing, but f32 is what the
    /// CPU path runs and what the full files hold).
    pub fn weight_files(&self, dtype: DType) -> Result<WeightFiles, FolderError> {
        let pick = |component: &str, stem: &str| -> Result<PathBuf, FolderError> {
            let full = self
                .root
                .join(component)
                .join(format!("{stem}.safetensors"));
            let half = self
                .root
                .join(component)
                .join(format!("{stem}.fp16.safetensors"));
            let preferred = if dtype == DType::F16 {
                [&half, &full]
            } else {
                [&full, &half]
            };
            preferred
                .into_iter()
                .find(|path| path.is_file())
                .cloned()
                .ok_or_else(|| FolderError::Missing {
                    file: format!("{component}/{stem}.safetensors"),
                })
        };
        Ok(WeightFiles {
            unet: pick("unet", "diffusion_pytorch_model")?,
            vae: pick("vae", "diffusion_pytorch_model")?,
            text_encoder: pick("text_encoder", "model")?,
            text_encoder_2: match self.family {
                Family::StableDiffusion => None,
                Family::StableDiffusionXl => Some(pick("text_encoder_2", "model")?),
            },
        })
    }
}

fn read_text_encoder(root: &Path, file: &str) -> Result<TextEncoderConfig, FolderError> {
    let config: TextEncoderConfig = read_json(root, file)?;
    config
        .check()
        .map_err(|Unrunnable(reason)| FolderError::Invalid {
            file: file.to_owned(),
            reason,
        })?;
    Ok(config)
}

pub(crate) fn read_json<T: DeserializeOwned>(root: &Path, file: &str) -> Result<T, FolderError> {
    let path = root.join(file);
    let text = std::fs::read_to_string(&path).map_err(|error| match error.kind() {
        std::io::ErrorKind::NotFound => FolderError::Missing {
            file: file.to_owned(),
        },
        _ => FolderError::Invalid {
            file: file.to_owned(),
            reason: error.to_string(),
        },
    })?;
    // The error names the field (`block_out_channels[2]: invalid value: integer -1, …`).
    serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(&text)).map_err(
        |error| FolderError::Invalid {
            file: file.to_owned(),
            reason: error.to_string(),
        },
    )
}

fn one_layer() -> PerBlock<usize> {
    PerBlock::All(1)
}
fn eight() -> PerBlock<usize> {
    PerBlock::All(8)
}
fn one() -> usize {
    1
}
fn two() -> usize {
    2
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn seventy_seven() -> usize {
    77
}
fn thousand() -> usize {
    1000
}
fn yes() -> bool {
    true
}
fn one_f64() -> f64 {
    1.0
}
fn norm_eps() -> f64 {
    1e-5
}
fn sd_scaling_factor() -> f64 {
    0.18215
}
fn beta_start() -> f64 {
    0.00085
}
fn beta_end() -> f64 {
    0.012
}
fn scaled_linear() -> String {
    "scaled_linear".to_owned()
}
fn epsilon() -> String {
    "epsilon".to_owned()
}
fn quick_gelu() -> String {
    "quick_gelu".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> ModelFolder {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models")
            .join(name);
        ModelFolder::open(&root).unwrap()
    }

    #[test]
    fn only_sdxl_upcasts_its_vae_as_diffusers_does() {
        // Both fixtures say force_upcast: true, as every config diffusers saves does.
        let sd1 = fixture("tiny-sd1");
        let sdxl = fixture("tiny-sdxl");
        assert!(sd1.vae.force_upcast && sdxl.vae.force_upcast);
        assert_eq!(sd1.vae_dtype(DType::F16), DType::F16);
        assert_eq!(sdxl.vae_dtype(DType::F16), DType::F32);
        // The fp16-fix VAE says false; the CPU runs f32 throughout.
        let fixed = ModelFolder {
            vae: VaeConfig {
                force_upcast: false,
                ..sdxl.vae.clone()
            },
            ..sdxl.clone()
        };
        assert_eq!(fixed.vae_dtype(DType::F16), DType::F16);
        assert_eq!(sdxl.vae_dtype(DType::F32), DType::F32);
    }
}

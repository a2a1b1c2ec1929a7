//! Making a GPU ready before the first job: candle ships its kernels as PTX, which the
//! driver compiles for the card the first time each kernel module is used (13–20 s on an
//! H200 with an empty cache, measured). That first use is moved out of the first job: a
//! miniature pipeline of the same architecture (all-zero weights, a few channels, 16²
//! latents) runs once, in the engine's dtype, through the same code as a job — text encoder,
//! guided UNet step with cross-attention, sampler arithmetic, VAE decode (also in f32, as a
//! VAE that must upcast runs) — so every kernel module a job uses is compiled, and the
//! driver's cache keeps them for later starts. Our own kernels ([`crate::engine::kernels`])
//! are machine code already; they are loaded and checked here too. On the CPU there is
//! nothing to compile.

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::conv::ConvPlan;
use super::model_folder::{TextEncoderConfig, UnetFile, VaeConfig};
use super::text_encoder::ClipTextEncoder;
use super::unet::{TextTimeConditioning, Unet};
use super::unet_blocks::AttentionPlan;
use super::vae::{Tiling, Vae};
use super::working_memory::Plan;

const UNET: &str = r#"{
  "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 32],
  "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
  "layers_per_block": 1, "attention_head_dim": [2, 4], "cross_attention_dim": 32,
  "norm_num_groups": 32, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
  "projection_class_embeddings_input_dim": 80
}"#;
const VAE: &str = r#"{
  "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [16, 32],
  "layers_per_block": 1, "norm_num_groups": 8, "scaling_factor": 0.13025
}"#;
const TEXT_ENCODER: &str = r#"{
  "architectures": ["CLIPTextModelWithProjection"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
  "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "gelu",
  "projection_dim": 32
}"#;

/// Small tiles, bands and chunks for the 16² latent (the UNet takes its bands and chunks).
const SAVING: Plan = Plan {
    vae_tiling: Some(Tiling {
        tile: 8,
        overlap: 2,
    }),
    conv: ConvPlan {
        max_column_values: Some(4 << 10),
    },
    attention: AttentionPlan {
        max_score_bytes: Some(16 << 10),
    },
};

fn parse<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> candle_core::Result<T> {
    serde_json::from_str(text)
        .map_err(|error| candle_core::Error::Msg(format!("the warm-up's {what} config: {error}")))
}

/// candle's kernel modules that a job uses, compiled one after another before the miniature
/// pipeline runs (which then finds them ready), so that the time left can be told: after each
/// module, the time so far per byte of PTX times the bytes still to go. Our own kernels are
/// machine code; they are loaded, checked and raced against candle's here too (which needs
/// candle's compiled first). A module that fails to compile is left for the pipeline to
/// report. Nothing to do off CUDA.
pub fn compile_kernels(device: &Device, time_left: &mut dyn FnMut(Duration)) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        candle_modules::compile(cuda, time_left);
    }
    #[cfg(not(feature = "cuda"))]
    let _ = time_left;
    crate::engine::kernels::prepare(device);
}

#[cfg(feature = "cuda")]
mod candle_modules {
    use std::time::{Duration, Instant};

    use candle_core::CudaDevice;
    use candle_core::cuda_backend::kernels::{self, Module};

    /// Every module but the quantized and sorting kernels, which Stable Diffusion never uses.
    const USED: [&Module; 9] = [
        &kernels::AFFINE,
        &kernels::BINARY,
        &kernels::CAST,
        &kernels::CONV,
        &kernels::FILL,
        &kernels::INDEXING,
        &kernels::REDUCE,
        &kernels::TERNARY,
        &kernels::UNARY,
    ];

    pub fn compile(cuda: &CudaDevice, time_left: &mut dyn FnMut(Duration)) {
        let total: usize = USED.iter().map(|module| module.ptx().len()).sum();
        let started = Instant::now();
        let mut done = 0;
        for module in USED {
            // candle compiles a whole module when it first looks a function up in it.
            if let Some(function) = super::first_entry(module.ptx())
                && let Err(error) = cuda.get_or_load_func(function, module)
            {
                tracing::debug!("compiling candle's {function} module: {error}");
            }
            done += module.ptx().len();
            let per_byte = started.elapsed().as_secs_f64() / done.max(1) as f64;
            time_left(Duration::from_secs_f64(per_byte * (total - done) as f64));
        }
    }
}

/// The name of the first kernel a PTX module defines (`.entry NAME(`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn first_entry(ptx: &str) -> Option<&str> {
    const ENTRY: &str = ".entry ";
    let after = &ptx[ptx.find(ENTRY)? + ENTRY.len()..];
    let end = after.find(|c: char| c == '(' || c.is_whitespace())?;
    Some(&after[..end]).filter(|name| !name.is_empty())
}

/// Runs the miniature pipeline on `device` in `dtype` once.
pub fn run(device: &Device, dtype: DType) -> candle_core::Result<()> {
    let unet_file: UnetFile = parse("UNet", UNET)?;
    let unet_config = unet_file
        .check()
        .map_err(|unrunnable| candle_core::Error::Msg(unrunnable.0))?;
    let vae_config: VaeConfig = parse("VAE", VAE)?;
    let text_config: TextEncoderConfig = parse("text encoder", TEXT_ENCODER)?;

    // Tokens → text states and the pooled embedding (SDXL's projection included).
    let text = ClipTextEncoder::new(VarBuilder::zeros(dtype, device), &text_config)?;
    let tokens = vec![(0..77).map(|id| id % 63).collect::<Vec<u32>>(); 2];
    let encoding = text.forward(&tokens, 63, device)?;

    // One guided step: batch 2, text_time conditioning, then the sampler's arithmetic.
    let unet = Unet::new(VarBuilder::zeros(dtype, device), &unet_config)?;
    let latents = Tensor::randn(0f32, 1.0, (1, 4, 16, 16), device)?.to_dtype(dtype)?;
    let doubled = Tensor::cat(&[&latents, &latents], 0)?;
    let time_ids = Tensor::new(&[[16f32, 16.0, 0.0, 0.0, 16.0, 16.0]; 2], device)?;
    let predicted = unet.forward(
        &doubled,
        999.0,
        &encoding.penultimate_hidden_state.to_dtype(dtype)?,
        Some(TextTimeConditioning {
            text_embeds: &encoding.pooled,
            time_ids: &time_ids,
        }),
        // Chunked and banded, so those paths' kernels are compiled too.
        SAVING,
    )?;
    let halves = predicted.chunk(2, 0)?;
    let guided = (&halves[0] + ((&halves[1] - &halves[0])? * 7.5)?)?;
    let stepped = (latents.to_dtype(DType::F32)? - (guided.to_dtype(DType::F32)? * 0.1)?)?;

    // The decode, in the pipeline's dtype and in f32 (a VAE that must upcast).
    let mut vae_dtypes = vec![dtype];
    if dtype != DType::F32 {
        vae_dtypes.push(DType::F32);
    }
    for vae_dtype in vae_dtypes {
        let vae = Vae::new(VarBuilder::zeros(vae_dtype, device), &vae_config)?;
        // Whole, then in tiles with banded convolutions and chunked attention, so the
        // kernels of every memory-saving path are compiled too.
        for plan in [Plan::default(), SAVING] {
            let pixels = vae
                .decode(&stepped, plan)
                .map_err(|error| candle_core::Error::Msg(error.to_string()))?;
            // Read back, as `to_images` does: the device finished everything.
            pixels.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_kernel_of_a_ptx_module_is_named() {
        let ptx = "//\n.version 9.0\n.target sm_75\n\n\t// .globl\taffine_f32\n\
                   .visible .entry affine_f32(\n\t.param .u64 affine_f32_param_0\n)\n\
                   .visible .entry affine_f16(\n)";
        assert_eq!(first_entry(ptx), Some("affine_f32"));
        assert_eq!(first_entry(".visible .entry sum_f32 (\n)"), Some("sum_f32"));
        assert_eq!(first_entry(".version 9.0\n.target sm_75\n"), None);
        assert_eq!(first_entry(".entry ("), None);
    }

    #[test]
    fn compiling_kernels_off_cuda_has_nothing_to_say() {
        let mut estimates = Vec::new();
        compile_kernels(&Device::Cpu, &mut |left| estimates.push(left));
        assert!(estimates.is_empty());
    }

    #[test]
    fn the_miniature_pipeline_runs_in_every_dtype_a_job_uses() {
        run(&Device::Cpu, DType::F32).unwrap();
        run(&Device::Cpu, DType::F16).unwrap();
    }
}

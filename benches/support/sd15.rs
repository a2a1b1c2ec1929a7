//! SD 1.5's real configs (UNet, VAE, CLIP ViT-L text encoder) in a model folder without
//! weights: the benches build full-size parts from them with all-zero weights (no download).

#![allow(dead_code)] // each bench uses what it needs

pub const SD15_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;
pub const SD15_VAE: &str = r#"{
  "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
  "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
  "out_channels": 3, "sample_size": 512, "scaling_factor": 0.18215
}"#;
pub const CLIP_L: &str = r#"{
  "architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768,
  "intermediate_size": 3072, "max_position_embeddings": 77, "model_type": "clip_text_model",
  "num_attention_heads": 12, "num_hidden_layers": 12, "vocab_size": 49408
}"#;

/// A temporary folder with SD 1.5's configs (and no weights), for `ModelFolder::open`.
pub fn folder() -> tempfile::TempDir {
    let folder = tempfile::tempdir().unwrap();
    for (file, text) in [
        (
            "model_index.json",
            r#"{"_class_name": "StableDiffusionPipeline"}"#,
        ),
        ("unet/config.json", SD15_UNET),
        ("vae/config.json", SD15_VAE),
        ("text_encoder/config.json", CLIP_L),
        ("scheduler/scheduler_config.json", "{}"),
    ] {
        let path = folder.path().join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    folder
}

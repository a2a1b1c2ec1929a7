//! Engine speed: per-step (one guided UNet evaluation, batch 2) and per-image (a whole
//! 3-step guided request) on the tiny fixtures, and per-step for a full-size SD 2.1 UNet at
//! 512×512 when `STUDIO_BENCH_SD21_DIR` names a folder with its `unet/` (made by
//! `benches/diffusers_reference.py --make-sd21-unet`).
//!
//! Prints one JSON object of median seconds, keyed like the reference script's, so
//! `benches/engine_vs_diffusers.sh` can put the two side by side as ratios.
//!
//! `cargo bench --bench engine -- text` instead times what a prompt costs a job whose text
//! encoders run on the CPU (what the engine chooses when GPU memory is tight): SDXL's two
//! encoders at full size (CLIP ViT-L and OpenCLIP ViT-bigG, random weights), f32, one
//! prompt, against the pipeline's kept encodings.
//!
//! `cargo bench --bench engine -- finite` times the check every decode ends with (no NaN or
//! infinity passes for an image) against the decode of one 512² image by SD 1.5's VAE.

// Test and tool code: an unwrap that fails is the test failing, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/sd15.rs"]
mod sd15;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use studio_worker::engine::sd::model_folder::{ModelFolder, TextEncoderConfig, UnetFile};
use studio_worker::engine::sd::text_encoder::ClipTextEncoder;
use studio_worker::engine::sd::unet::{TextTimeConditioning, Unet};
use studio_worker::engine::sd::vae::Vae;
use studio_worker::engine::sd::working_memory::Plan;
use studio_worker::engine::sd::{Request, StableDiffusion, all_finite};
use studio_worker::vocab::job::Scheduler;

fn median_time(runs: usize, mut function: impl FnMut()) -> f64 {
    function();
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            function();
            started.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models")
}

fn load_unet(root: &Path, device: &Device) -> Unet {
    let text = std::fs::read_to_string(root.join("unet/config.json")).expect("unet config");
    let file: UnetFile = serde_json::from_str(&text).expect("unet config parses");
    let config = file.check().expect("supported UNet");
    let weights = root.join("unet/diffusion_pytorch_model.safetensors");
    // SAFETY: a benchmark's own read-only file.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, device) }
        .expect("weights map");
    Unet::new(vb, &config).expect("UNet builds")
}

/// A text encoder of `config`'s size with random weights (timing only).
fn random_text_encoder(config: &TextEncoderConfig, device: &Device) -> ClipTextEncoder {
    let width = config.hidden_size;
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        (
            "text_model.embeddings.token_embedding.weight".to_owned(),
            vec![config.vocab_size, width],
        ),
        (
            "text_model.embeddings.position_embedding.weight".to_owned(),
            vec![config.max_position_embeddings, width],
        ),
        ("text_model.final_layer_norm.weight".to_owned(), vec![width]),
        ("text_model.final_layer_norm.bias".to_owned(), vec![width]),
    ];
    for layer in 0..config.num_hidden_layers {
        let prefix = format!("text_model.encoder.layers.{layer}");
        for norm in ["layer_norm1", "layer_norm2"] {
            for part in ["weight", "bias"] {
                shapes.push((format!("{prefix}.{norm}.{part}"), vec![width]));
            }
        }
        for projection in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            shapes.push((
                format!("{prefix}.self_attn.{projection}.weight"),
                vec![width, width],
            ));
            shapes.push((format!("{prefix}.self_attn.{projection}.bias"), vec![width]));
        }
        let inner = config.intermediate_size;
        shapes.push((format!("{prefix}.mlp.fc1.weight"), vec![inner, width]));
        shapes.push((format!("{prefix}.mlp.fc1.bias"), vec![inner]));
        shapes.push((format!("{prefix}.mlp.fc2.weight"), vec![width, inner]));
        shapes.push((format!("{prefix}.mlp.fc2.bias"), vec![width]));
    }
    if let Some(projection) = config.projection_dim.filter(|_| config.has_projection()) {
        shapes.push(("text_projection.weight".to_owned(), vec![projection, width]));
    }
    let tensors: HashMap<String, Tensor> = shapes
        .into_iter()
        .map(|(name, shape)| {
            let tensor = Tensor::randn(0f32, 0.02, shape, device).expect("random weights");
            (name, tensor)
        })
        .collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    ClipTextEncoder::new(vb, config).expect("text encoder builds")
}

/// SDXL's two text encoders at full size on the CPU, one prompt through both, against the
/// pipeline's kept encoding of a prompt (the fixture's, which costs the same to look up).
fn text_part(runs: usize) {
    let device = Device::Cpu;
    let config = |json: &str| -> TextEncoderConfig { serde_json::from_str(json).expect("config") };
    let clip_l = config(
        r#"{"architectures": ["CLIPTextModel"], "vocab_size": 49408, "hidden_size": 768,
            "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
            "hidden_act": "quick_gelu", "projection_dim": 768}"#,
    );
    let clip_g = config(
        r#"{"architectures": ["CLIPTextModelWithProjection"], "vocab_size": 49408,
            "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
            "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}"#,
    );
    let encoders = [
        random_text_encoder(&clip_l, &device),
        random_text_encoder(&clip_g, &device),
    ];
    let pipeline =
        StableDiffusion::load(&fixtures().join("tiny-sdxl"), &device, DType::F32).expect("loads");
    let ids = pipeline
        .token_ids("a red fox in the snow", false)
        .expect("tokenizes");
    // The end id only picks the pooled row: any id costs the same.
    let end_id = *ids.last().expect("tokens");
    let encode = median_time(runs, || {
        for encoder in &encoders {
            encoder
                .forward(std::slice::from_ref(&ids), end_id, &device)
                .expect("encodes");
        }
    });
    pipeline
        .encode_text("a red fox in the snow")
        .expect("encodes");
    let kept = median_time(runs * 100, || {
        pipeline.encode_text("a red fox in the snow").expect("kept");
    });
    assert_eq!(
        pipeline.prompts_encoded(),
        1,
        "the kept encoding served every run"
    );
    println!(
        "SDXL's text encoders, full size, f32, CPU ({} threads)",
        num_threads()
    );
    println!("{:44} {:>10}", "one prompt", "median");
    println!("{:44} {:>8.1}ms", "encoded (both encoders)", encode * 1e3);
    println!("{:44} {:>8.3}ms", "kept from an earlier job", kept * 1e3);
    println!("{:44} {:>9.5}", "kept / encoded", kept / encode);
}

/// What the check every decode now ends with (`sd::all_finite`: no NaN or infinity passes
/// for an image) costs beside the decode it checks: SD 1.5's full-size VAE decoder (all-zero
/// weights, the same work), one 512² image, f32, CPU.
fn finite_part(runs: usize) {
    let device = Device::Cpu;
    let folder = sd15::folder();
    let model = ModelFolder::open(folder.path()).expect("SD 1.5's configs");
    let vae = Vae::new(VarBuilder::zeros(DType::F32, &device), &model.vae).expect("VAE");
    let latents = Tensor::randn(0f32, 1.0, (1, 4, 64, 64), &device).expect("latents");
    let pixels = Tensor::randn(0f32, 1.0, (1, 3, 512, 512), &device).expect("pixels");
    // A decode takes most of a minute on 2 cores: one timed after one warm-up.
    let decode = median_time(runs.min(1), || {
        vae.decode(&latents, Plan::default()).expect("decodes");
    });
    let check = median_time(runs * 100, || {
        assert!(all_finite(&pixels).expect("checks"));
    });
    println!(
        "SD 1.5 VAE decode, 512², f32, {} threads: decode {decode:.2} s (check included), \
         check {:.3} ms, check / decode {:.6}",
        num_threads(),
        check * 1000.0,
        check / decode
    );
}

fn num_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn main() {
    let runs: usize = std::env::var("STUDIO_BENCH_RUNS")
        .ok()
        .and_then(|runs| runs.parse().ok())
        .unwrap_or(5);
    if std::env::args().any(|argument| argument == "text") {
        text_part(runs.min(3));
        return;
    }
    if std::env::args().any(|argument| argument == "finite") {
        finite_part(runs.min(3));
        return;
    }
    let device = Device::Cpu;
    let mut results = serde_json::Map::new();
    for name in ["tiny-sd1", "tiny-sd2-v", "tiny-sdxl"] {
        let root = fixtures().join(name);
        let pipeline = StableDiffusion::load(&root, &device, DType::F32).expect("fixture loads");
        let request = Request {
            prompt: "a red fox in the snow".to_owned(),
            negative_prompt: "blurry".to_owned(),
            width: 64,
            height: 64,
            steps: 3,
            guidance_scale: 7.5,
            seed: 0,
            num_images: 1,
            scheduler: Some(Scheduler::Euler),
            memory: Plan::default(),
            hand_back_before_decode: false,
        };
        let image = median_time(runs * 4, || {
            pipeline
                .generate(&request, &mut |_| {}, &|| false)
                .expect("generates");
        });
        results.insert(format!("{name}.image_3_steps"), image.into());

        let unet = load_unet(&root, &device);
        let latents = Tensor::randn(0f32, 1.0, (2, 4, 32, 32), &device).expect("latents");
        let context = pipeline
            .encode_prompt("a red fox", "blurry", true, 1, (64, 64))
            .expect("encodes");
        let step =
            median_time(runs * 10, || {
                let text_time = context.text_time.as_ref().map(|(text_embeds, time_ids)| {
                    TextTimeConditioning {
                        text_embeds,
                        time_ids,
                    }
                });
                unet.forward(
                    &latents,
                    500.0,
                    &context.hidden_states,
                    text_time,
                    Plan::default(),
                )
                .expect("UNet runs");
            });
        results.insert(format!("{name}.unet_step"), step.into());
    }

    if let Some(root) = std::env::var_os("STUDIO_BENCH_SD21_DIR") {
        let unet = load_unet(Path::new(&root), &device);
        let latents = Tensor::randn(0f32, 1.0, (2, 4, 64, 64), &device).expect("latents");
        let hidden = Tensor::randn(0f32, 1.0, (2, 77, 1024), &device).expect("hidden");
        let step = median_time((runs / 2).max(2), || {
            unet.forward(&latents, 500.0, &hidden, None, Plan::default())
                .expect("UNet runs");
        });
        results.insert("sd21-512.unet_step".to_owned(), step.into());
    }
    println!("{}", serde_json::Value::Object(results));
}

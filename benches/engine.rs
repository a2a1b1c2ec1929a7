//! Engine speed: per-step (one guided UNet evaluation, batch 2) and per-image (a whole
//! 3-step guided request) on the tiny fixtures, and per-step for a full-size SD 2.1 UNet at
//! 512×512 when `STUDIO_BENCH_SD21_DIR` names a folder with its `unet/` (made by
//! `benches/diffusers_reference.py --make-sd21-unet`).
//!
//! Prints one JSON object of median seconds, keyed like the reference script's, so
//! `benches/engine_vs_diffusers.sh` can put the two side by side as ratios.

// Test and tool code: an unwrap that fails is the test failing, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use studio_worker::engine::sd::model_folder::UnetFile;
use studio_worker::engine::sd::unet::{TextTimeConditioning, Unet};
use studio_worker::engine::sd::working_memory::Plan;
use studio_worker::engine::sd::{Request, StableDiffusion};
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

fn main() {
    let runs: usize = std::env::var("STUDIO_BENCH_RUNS")
        .ok()
        .and_then(|runs| runs.parse().ok())
        .unwrap_or(5);
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

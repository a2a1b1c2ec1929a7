//! Checks the working-memory estimate (`engine::sd::working_memory`) against what candle
//! really allocates: SD 1.5's UNet and VAE decoder (their real configs, all-zero weights, so
//! no download is needed) run one guided UNet step and one decode at a few sizes on the CPU,
//! and the peak resident memory each adds is compared with the estimate.
//!
//! Then one 3×3 convolution at the size of the SDXL VAE's last block, whole and in bands (a
//! GPU's plan), against the size of its output: what a convolution holds besides it.
//!
//! `cargo bench --bench working_memory` (Linux: it reads the peak from /proc/self/status).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
#[path = "support/sd15.rs"]
mod sd15;

use studio_worker::engine::sd::conv::{Conv3x3, ConvPlan, Part};
use studio_worker::engine::sd::model_folder::ModelFolder;
use studio_worker::engine::sd::unet::Unet;
use studio_worker::engine::sd::vae::Vae;
use studio_worker::engine::sd::working_memory::{DeviceKernels, Plan, WorkingMemory};

/// The process's resident memory now and at its peak since the last reset, in bytes.
fn resident() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap()
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Measures the peak resident memory `work` adds.
fn peak_of(work: impl FnOnce()) -> u64 {
    // Resets the peak to what is resident now.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let (before, _) = resident();
    work();
    resident().1.saturating_sub(before)
}

fn main() {
    if !std::path::Path::new("/proc/self/clear_refs").exists() {
        eprintln!("working_memory: needs Linux's /proc; skipped");
        return;
    }
    let folder = sd15::folder();
    let model = ModelFolder::open(folder.path()).unwrap();
    let estimate = WorkingMemory::of(&model, DType::F32);
    let device = Device::Cpu;
    // All-zero weights: never touched pages, so they add almost nothing resident.
    let unet = Unet::new(VarBuilder::zeros(DType::F32, &device), &model.unet).unwrap();
    let vae = Vae::new(VarBuilder::zeros(DType::F32, &device), &model.vae).unwrap();

    println!("SD 1.5 architecture, f32, CPU: peak resident memory added, against the estimate");
    println!(
        "{:<28} {:>10} {:>10} {:>7}",
        "stage", "measured", "estimate", "ratio"
    );
    for side in [256_usize, 384, 512] {
        let latent = side / 8;
        let guided = Tensor::zeros((2, 4, latent, latent), DType::F32, &device).unwrap();
        let context = Tensor::zeros((2, 77, 768), DType::F32, &device).unwrap();
        let unet_peak = peak_of(|| {
            unet.forward(&guided, 999.0, &context, None, Plan::default())
                .unwrap();
        });
        let one = guided.narrow(0, 0, 1).unwrap();
        let decode_peak = peak_of(|| {
            vae.decode(&one, Plan::default()).unwrap();
        });
        let side = side as u32;
        // The estimate's whole-job figure is the larger of the two stages.
        let estimated = estimate.bytes(side, side, 1, true, Plan::default(), DeviceKernels::CPU);
        for (stage, measured) in [
            ("UNet step (guided)", unet_peak),
            ("VAE decode", decode_peak),
        ] {
            println!(
                "{:<28} {:>8} MB {:>8} MB {:>7.2}",
                format!("{side}²: {stage}"),
                measured >> 20,
                estimated >> 20,
                estimated as f64 / measured.max(1) as f64
            );
        }
    }

    // 128 → 128 channels at 1024² in f32: a 512 MB output.
    println!("\n3×3 convolution, 128 → 128 channels at 1024², f32, CPU: peak added");
    let conv = Conv3x3::new(
        VarBuilder::zeros(DType::F32, &device),
        128,
        128,
        Part::Decoder,
    )
    .unwrap();
    let xs = Tensor::ones((1, 128, 1024, 1024), DType::F32, &device).unwrap();
    let output = 128 * 1024 * 1024 * 4_u64;
    for (how, plan) in [
        ("whole", ConvPlan::default()),
        ("in 256 MB bands", ConvPlan::BANDED),
    ] {
        let peak = peak_of(|| {
            conv.forward(&xs, plan).unwrap();
        });
        println!(
            "{how:<28} {:>8} MB = {:.2} × its output",
            peak >> 20,
            peak as f64 / output as f64
        );
    }
}

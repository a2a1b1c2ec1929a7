//! Our kernels against candle's composition of the same layer, on the shapes real jobs run:
//! the group norms (+ SiLU) of SD 1.5 and SDXL UNets (guided, batch 2) and of the VAE
//! decoder, in the dtype each runs in. On the CPU always; with `--features cuda` on GPU 0 as
//! well (f16 UNets, f32 VAE, as the engine runs them), where it is the speed check of
//! `benches/gpu/run.sh`.
//!
//! Prints one row per shape: candle's median time, ours, the ratio (ours / candle: below 1
//! is faster), and the largest difference from candle relative to the value. A difference
//! beyond rounding fails the run.
//!
//!     cargo bench --bench kernels                       # CPU, smaller shapes
//!     STUDIO_BENCH_RUNS=20 cargo bench --bench kernels

// Tool code: an unwrap that fails is the bench failing, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use studio_worker::engine::kernels::{self, Activation};

struct Case {
    what: &'static str,
    dims: [usize; 4],
    dtype: DType,
}

const fn case(what: &'static str, dims: [usize; 4], dtype: DType) -> Case {
    Case { what, dims, dtype }
}

/// What a GPU runs: f16 UNets, the VAE in f32 (SDXL's must upcast; SD 1.5's shapes at 512²).
fn gpu_cases() -> Vec<Case> {
    vec![
        case("SD 1.5 UNet 512², level 1", [2, 320, 64, 64], DType::F16),
        case("SD 1.5 UNet 512², level 2", [2, 640, 32, 32], DType::F16),
        case("SD 1.5 UNet 512², level 3", [2, 1280, 16, 16], DType::F16),
        case("SD 1.5 UNet 512², level 4", [2, 1280, 8, 8], DType::F16),
        case("SDXL UNet 1024², level 1", [2, 320, 128, 128], DType::F16),
        case("SDXL UNet 1024², level 2", [2, 640, 64, 64], DType::F16),
        case("SDXL UNet 1024², level 3", [2, 1280, 32, 32], DType::F16),
        case("VAE 512², 512 ch at 64²", [1, 512, 64, 64], DType::F32),
        case("VAE 512², 512 ch at 256²", [1, 512, 256, 256], DType::F32),
        case("VAE 512², 128 ch at 512²", [1, 128, 512, 512], DType::F32),
        case(
            "VAE 1024², 256 ch at 1024²",
            [1, 256, 1024, 1024],
            DType::F32,
        ),
        case("VAE 1024² in f16, 256 ch", [1, 256, 1024, 1024], DType::F16),
    ]
}

/// The CPU runs f32 and is slow: SD 1.5 at 512² only.
fn cpu_cases() -> Vec<Case> {
    vec![
        case("SD 1.5 UNet 512², level 1", [2, 320, 64, 64], DType::F32),
        case("SD 1.5 UNet 512², level 3", [2, 1280, 16, 16], DType::F32),
        case("VAE 512², 512 ch at 128²", [1, 512, 128, 128], DType::F32),
        case("VAE 512², 128 ch at 512²", [1, 128, 512, 512], DType::F32),
    ]
}

fn median_ms(runs: usize, device: &Device, mut function: impl FnMut() -> Tensor) -> f64 {
    drop(function());
    device.synchronize().unwrap();
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            let out = function();
            device.synchronize().unwrap();
            let elapsed = started.elapsed().as_secs_f64() * 1e3;
            drop(out);
            elapsed
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn run_on(device: &Device, label: &str, cases: &[Case], runs: usize) -> bool {
    println!("\n{label}: group norm + SiLU, 32 groups, median of {runs}");
    println!("| shape | dtype | candle ms | ours ms | ours / candle | max |Δ| / (1 + |y|) |");
    println!("|---|---|---|---|---|---|");
    let mut agreed = true;
    for case in cases {
        let [_, channels, _, _] = case.dims;
        let xs = (Tensor::randn(0f32, 2.0, &case.dims[..], device).unwrap() + 1.0)
            .unwrap()
            .to_dtype(case.dtype)
            .unwrap();
        let weight = Tensor::randn(1f32, 0.5, channels, device)
            .unwrap()
            .to_dtype(case.dtype)
            .unwrap();
        let bias = Tensor::randn(0f32, 0.5, channels, device)
            .unwrap()
            .to_dtype(case.dtype)
            .unwrap();
        let candle = || {
            kernels::group_norm_composed(&xs, &weight, &bias, 32, 1e-5, Activation::Silu).unwrap()
        };
        let ours = || kernels::group_norm(&xs, &weight, &bias, 32, 1e-5, Activation::Silu).unwrap();
        let difference = kernels::largest_relative_difference(&ours(), &candle()).unwrap();
        // candle rounds three times in f16 (normalised, scaled, shifted) and SiLU once more.
        let allowed = if case.dtype == DType::F16 { 1e-2 } else { 1e-4 };
        agreed &= difference <= allowed;
        let candle_ms = median_ms(runs, device, candle);
        let ours_ms = median_ms(runs, device, ours);
        println!(
            "| {} {:?} | {:?} | {candle_ms:.3} | {ours_ms:.3} | {:.2} | {difference:.1e}{} |",
            case.what,
            case.dims,
            case.dtype,
            ours_ms / candle_ms,
            if difference <= allowed {
                ""
            } else {
                " TOO FAR"
            },
        );
    }
    agreed
}

fn main() {
    let runs: usize = std::env::var("STUDIO_BENCH_RUNS")
        .ok()
        .and_then(|runs| runs.parse().ok())
        .unwrap_or(10);
    // `cargo bench` passes `--bench`; nothing else is taken.
    let mut agreed = true;
    if cfg!(feature = "cuda") {
        match Device::new_cuda(0) {
            Ok(gpu) => {
                let ours = kernels::prepare(&gpu);
                let label = format!("GPU 0 (our kernels {})", if ours { "on" } else { "OFF" });
                agreed &= run_on(&gpu, &label, &gpu_cases(), runs);
            }
            Err(error) => println!("no CUDA device ({error}); the CPU only"),
        }
    }
    agreed &= run_on(&Device::Cpu, "CPU", &cpu_cases(), runs.min(5));
    if !agreed {
        eprintln!("our kernels differ from candle's beyond rounding");
        std::process::exit(1);
    }
}

//! The races [`super::prepare`] runs on a CUDA device ([`crate::engine::kernels::race`]):
//! each family that loaded and passed its check, at the shape of the busiest layers of the
//! commonest job (SD 1.5's first UNet level at 512², guided: 2 × 320 channels × 64²; its
//! attention for one image, with SD 1.5's heads of 40 and SD 2.x's and SDXL's of 64), in
//! f16, against what runs in its place: candle's composition, for the register attention
//! our WMMA kernel, for the convolution the column path (or candle's, where our columns lost
//! theirs). The convolution is raced per model part, each part at its own shapes and judged
//! apart ([`PartVerdict`]): the UNet's (its first level and a deep one) and the VAE
//! decoder's (its full-resolution block at half size); the TF32 convolution in f32 the same
//! way, at an upcast decoder's shapes (SDXL's) and the UNet's first level. The WMMA
//! attention itself is not raced: without it the UNet holds score matrices, several GB at
//! SDXL's sizes. The job's memory estimate reads the verdicts
//! ([`crate::engine::sd::working_memory::DeviceKernels`]). The attention race is the
//! longest: 26 calls of about 70 GFLOP, a fifth of a second at 10 TFLOP/s.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use candle_core::cuda_backend::DeviceId;
use candle_core::{CudaDevice, DType, Device, Result, Tensor};

use super::{Family, checked_module, switch_off};
use crate::engine::kernels::conv3x3::{Part, Reading, Splits};
use crate::engine::kernels::im2col::Source;
use crate::engine::kernels::race::{PartVerdict, Timing};
use crate::engine::kernels::{self, Activation};

/// The channels, side and batch of the raced image (SD 1.5's first UNet level at 512²,
/// guided).
const CHANNELS: usize = 320;
const SIDE: usize = 64;
const BATCH: usize = 2;

/// The devices raced in this process.
static RACED: Mutex<Vec<DeviceId>> = Mutex::new(Vec::new());

/// The parts a family raced per part lost at, per device (where it won at others).
static LOST_PARTS: Mutex<Vec<(DeviceId, Family, Part)>> = Mutex::new(Vec::new());

/// Whether `family` lost its race at `part`'s shapes on `device` (while running for others).
pub(super) fn lost_at(device: &CudaDevice, family: Family, part: Part) -> bool {
    LOST_PARTS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .contains(&(device.id(), family, part))
}

/// Races every family on `device`, the first time it is asked for that device; switches off
/// those slower there, and says what it measured.
pub(super) fn run_once(device: &CudaDevice) {
    {
        let mut raced = RACED.lock().unwrap_or_else(PoisonError::into_inner);
        if raced.contains(&device.id()) {
            return;
        }
        raced.push(device.id());
    }
    for family in Family::ALL {
        let Some(rival) = rival(device, family) else {
            continue;
        };
        if matches!(family, Family::Conv3x3 | Family::Conv3x3Tf32) {
            judge_per_part(device, family, rival);
            continue;
        }
        match race_family(device, family) {
            Ok(Some(timing)) => {
                let ours_runs = timing.ours_runs();
                tracing::info!(
                    "our GPU {} kernel takes {:.3} ms here, {rival} {:.3} ms ({:.2}×): {}",
                    family.name(),
                    timing.ours.as_secs_f64() * 1e3,
                    timing.theirs.as_secs_f64() * 1e3,
                    timing.ratio(),
                    if ours_runs {
                        "ours runs".to_owned()
                    } else {
                        format!("{rival} runs instead")
                    }
                );
                if !ours_runs {
                    switch_off(device, family);
                }
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(
                "timing our GPU {} kernel against {rival} failed, so ours stays: {error}",
                family.name()
            ),
        }
    }
}

/// Races a convolution family at each part's shapes, and keeps it for the parts where it is
/// not slower than `rival`: off whole where it lost at every part.
fn judge_per_part(device: &CudaDevice, family: Family, rival: &str) {
    let timings = match race_convolution(device, family) {
        Ok(Some(timings)) => timings,
        Ok(None) => return,
        Err(error) => {
            tracing::warn!(
                "timing our GPU {} kernel against {rival} failed, so ours stays: {error}",
                family.name()
            );
            return;
        }
    };
    let verdict = PartVerdict::of(&timings);
    for (part, timing) in &timings {
        tracing::info!(
            "our GPU {} kernel takes {:.3} ms here at {} shapes, {rival} {:.3} ms ({:.2}×): {}",
            family.name(),
            timing.ours.as_secs_f64() * 1e3,
            part.name(),
            timing.theirs.as_secs_f64() * 1e3,
            timing.ratio(),
            if timing.ours_runs() {
                "ours runs for that part".to_owned()
            } else {
                format!("{rival} runs for that part instead")
            }
        );
    }
    match verdict {
        PartVerdict::Runs => {}
        PartVerdict::Off => switch_off(device, family),
        PartVerdict::OffFor(parts) => LOST_PARTS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(parts.into_iter().map(|part| (device.id(), family, part))),
    }
}

/// What runs in place of `family` on `device` when it is off; `None` for a family not raced.
fn rival(device: &CudaDevice, family: Family) -> Option<&'static str> {
    match family {
        Family::GroupNorm | Family::Geglu => Some("candle's composition"),
        Family::Im2col => Some("candle's convolution"),
        Family::Conv3x3 | Family::Conv3x3Tf32 if columns_run(device) => {
            Some("our columns and a GEMM")
        }
        Family::Conv3x3 | Family::Conv3x3Tf32 => Some("candle's convolution"),
        Family::AttentionMma => Some("our WMMA attention kernel"),
        Family::Attention => None,
    }
}

/// Whether 3×3 convolutions run as our columns and a GEMM on `device` (else candle's).
fn columns_run(device: &CudaDevice) -> bool {
    checked_module(device, Family::Im2col).is_some()
}

/// The race of `family` on `device`; `None` where it did not load (or its rival did not).
fn race_family(device: &CudaDevice, family: Family) -> Result<Option<Timing>> {
    let Some(module) = checked_module(device, family) else {
        return Ok(None);
    };
    let gpu = Device::Cuda(device.clone());
    let origin = Instant::now();
    let clock = || origin.elapsed();
    let finish = || gpu.synchronize();
    let random = |dims: &[usize], mean: f32, std: f32| {
        Tensor::randn(mean, std, dims, &gpu)?.to_dtype(DType::F16)
    };
    let declined = || candle_core::Error::Msg(format!("our {} kernel declined", family.name()));
    let timing = match family {
        Family::GroupNorm => {
            let xs = random(&[BATCH, CHANNELS, SIDE, SIDE], 1.0, 2.0)?;
            let weight = random(&[CHANNELS], 1.0, 0.5)?;
            let bias = random(&[CHANNELS], 0.0, 0.5)?;
            let ours =
                || kernels::group_norm(&xs, &weight, &bias, 32, 1e-5, Activation::Silu).map(drop);
            let theirs = || {
                kernels::group_norm_composed(&xs, &weight, &bias, 32, 1e-5, Activation::Silu)
                    .map(drop)
            };
            Timing::measure(&clock, &finish, &ours, &theirs)?
        }
        Family::Geglu => {
            // The feed-forward's projection: 4 × 320 inner channels, twice (value and gate).
            let width = 2 * 4 * CHANNELS;
            let projected = random(&[BATCH, SIDE * SIDE, width], 0.0, 2.0)?;
            let bias = random(&[width], 0.0, 0.5)?;
            let ours = || {
                kernels::geglu(&projected, &bias)?
                    .map(drop)
                    .ok_or_else(declined)
            };
            let theirs = || kernels::geglu::composed(&projected, &bias).map(drop);
            Timing::measure(&clock, &finish, &ours, &theirs)?
        }
        Family::Im2col => {
            let xs = random(&[BATCH, CHANNELS, SIDE, SIDE], 0.0, 1.0)?;
            let weight = random(
                &[CHANNELS, CHANNELS, 3, 3],
                0.0,
                (9.0 * CHANNELS as f32).powf(-0.5),
            )?;
            let matrix = weight.reshape((CHANNELS, CHANNELS * 9))?;
            // Our columns and one GEMM into the image layout, as `Conv3x3` runs them.
            let ours = || {
                let columns = kernels::im2col::columns_3x3(&xs, Source::AsIs, 0, SIDE)?
                    .ok_or_else(declined)?;
                matrix.broadcast_left(BATCH)?.matmul(&columns).map(drop)
            };
            let theirs = || xs.conv2d(&weight, 1, 1, 1, 1).map(drop);
            Timing::measure(&clock, &finish, &ours, &theirs)?
        }
        // Raced per part: `race_convolution`.
        Family::Conv3x3 | Family::Conv3x3Tf32 => return Ok(None),
        Family::AttentionMma => {
            let Some(wmma) = checked_module(device, Family::Attention) else {
                return Ok(None);
            };
            super::attention::race_registers(device, &module, &wmma, &clock, &finish)?
        }
        Family::Attention => return Ok(None),
    };
    Ok(Some(timing))
}

/// A raced convolution's image: (batch, channels, side); its weights are channels → channels.
type Shape = (usize, usize, usize);

/// The convolution `family` raced at each part's shapes, with its bias, as `Conv3x3` runs
/// it, against what runs in its place: the column path where our column kernel won its race
/// (raced before this), else candle's convolution. `None` where it did not load.
fn race_convolution(device: &CudaDevice, family: Family) -> Result<Option<Vec<(Part, Timing)>>> {
    if checked_module(device, family).is_none() {
        return Ok(None);
    }
    let gpu = Device::Cuda(device.clone());
    let origin = Instant::now();
    let clock = || origin.elapsed();
    let finish = || gpu.synchronize();
    let declined = || candle_core::Error::Msg(format!("our {} kernel declined", family.name()));
    // Per part, (batch, channels, side) of its busiest convolutions, each call running all.
    // In f16 the UNet's first level (few cells, many channels) and a deep level (1280
    // channels at 16²: few tiles, K split), and the f16 decoder's full-resolution block at
    // half the size (many cells, 128 channels). In f32 (TF32) an upcast decoder's (SDXL's at
    // 1024²: 512 channels at 128², 128 at 1024²) at a quarter of the size, and the UNet's
    // first level (an f32 UNet: `STUDIO_WORKER_GPU_PRECISION=f32` on a card with TF32).
    let (dtype, parts): (DType, [(Part, &[Shape]); 2]) = if family == Family::Conv3x3 {
        (
            DType::F16,
            [
                (Part::Unet, &[(BATCH, CHANNELS, SIDE), (BATCH, 1280, 16)]),
                (Part::Decoder, &[(1, 128, 256)]),
            ],
        )
    } else {
        (
            DType::F32,
            [
                (Part::Unet, &[(BATCH, CHANNELS, SIDE)]),
                (Part::Decoder, &[(1, 512, 64), (1, 128, 256)]),
            ],
        )
    };
    let columns = columns_run(device);
    let random = |dims: &[usize], std: f32| Tensor::randn(0f32, std, dims, &gpu)?.to_dtype(dtype);
    let mut timings = Vec::with_capacity(parts.len());
    for (part, cases) in parts {
        let mut shapes = Vec::with_capacity(cases.len());
        for &(batch, channels, side) in cases {
            let xs = random(&[batch, channels, side, side], 1.0)?;
            let weight = random(
                &[channels, channels, 3, 3],
                (9.0 * channels as f32).powf(-0.5),
            )?;
            let bias = random(&[channels], 0.5)?;
            let kernel_weights = kernels::conv3x3::kernel_order(&weight)?;
            shapes.push((xs, weight, kernel_weights, bias));
        }
        let ours = || {
            for (xs, _, kernel_weights, bias) in &shapes {
                let reading = Reading::Image(Source::AsIs);
                super::conv3x3::conv3x3(device, xs, reading, kernel_weights, bias, Splits::Fill)?
                    .ok_or_else(declined)?;
            }
            Ok(())
        };
        let theirs = || {
            for (xs, weight, _, bias) in &shapes {
                let (batch, channels, side, _) = xs.dims4()?;
                let convolved = if columns {
                    let columns = kernels::im2col::columns_3x3(xs, Source::AsIs, 0, side)?
                        .ok_or_else(declined)?;
                    weight
                        .reshape((channels, channels * 9))?
                        .broadcast_left(batch)?
                        .matmul(&columns)?
                        .reshape((batch, channels, side, side))?
                } else {
                    xs.conv2d(weight, 1, 1, 1, 1)?
                };
                convolved.broadcast_add(&bias.reshape((1, channels, 1, 1))?)?;
            }
            Ok(())
        };
        timings.push((part, Timing::measure(&clock, &finish, &ours, &theirs)?));
    }
    Ok(Some(timings))
}

/// How [`race`] reads the time and waits for the device, for the families' own races.
pub(super) type Clock<'a> = &'a dyn Fn() -> Duration;
pub(super) type Finish<'a> = &'a dyn Fn() -> Result<()>;

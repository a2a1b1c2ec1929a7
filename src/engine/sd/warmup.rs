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

use super::conv::ConvPlan;
use super::model_folder::{TextEncoderConfig, UnetFile, VaeConfig};
use super::text_encoder::ClipTextEncoder;
use super::unet::{TextTimeConditioning, Unet};
use super::unet_blocks::AttentionPlan;
use super::vae::{Tiling, Vae};
use super::weights;
use super::working_memory::Plan;
use crate::engine::device::Precision;

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

/// candle's kernel modules that a job uses, compiled before the miniature pipeline runs
/// (which then finds them ready), so that the time left can be told: after each module, the
/// time so far per byte of PTX times the bytes still to go. Our own kernels are machine code;
/// they are loaded, checked and raced against candle's here too (which needs candle's
/// compiled first). A module that fails to compile is left for the pipeline to report.
/// Nothing to do off CUDA.
///
/// candle compiles a module under a lock of its own, one at a time. So the modules are first
/// compiled on threads of ours, the biggest first, into the driver's cache of compiled
/// kernels ([`crate::engine::kernel_cache`]); candle's own loads then find them there. Where
/// the driver compiles on several threads at once, that takes about as long as the biggest
/// module (binary ops: 42 % of the 5.4 MB of PTX) instead of all of them; where it does not,
/// it costs the cache lookups (the log says which: the threads' time against the biggest
/// module's). Not where the person turned the cache off (`CUDA_CACHE_DISABLE=1`): candle
/// would compile everything again.
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
    use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
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
        let threads = super::compiling_threads(
            std::thread::available_parallelism().map_or(1, |cores| cores.get()),
            std::env::var(super::CACHE_DISABLE).ok().as_deref(),
        );
        if threads > 1 {
            let context = cuda.cuda_stream().context().clone();
            let compile = |module: &&Module| {
                let started = Instant::now();
                context
                    .load_module(Ptx::from_src(module.ptx()))
                    .map(|_| started.elapsed())
                    .map_err(|error| error.to_string())
            };
            let size = |module: &&Module| module.ptx().len();
            let mut tell = |progress: &super::Progress| {
                time_left(progress.time_left(started.elapsed(), threads));
            };
            let outcome = super::on_threads(&USED, size, threads, compile, &mut tell);
            tracing::info!(
                "candle's kernels compiled on {threads} threads in {:.1} s (the biggest module \
                 alone took {:.1} s){}",
                started.elapsed().as_secs_f64(),
                outcome.longest.as_secs_f64(),
                if outcome.failures.is_empty() {
                    String::new()
                } else {
                    format!("; failed: {}", outcome.failures.join("; "))
                }
            );
        }
        // candle's own loads: from the driver's cache where the threads filled it.
        let mut done = 0;
        for module in USED {
            // candle compiles a whole module when it first looks a function up in it.
            if let Some(function) = super::first_entry(module.ptx())
                && let Err(error) = cuda.get_or_load_func(function, module)
            {
                tracing::debug!("compiling candle's {function} module: {error}");
            }
            done += module.ptx().len();
            if threads <= 1 {
                let per_byte = started.elapsed().as_secs_f64() / done.max(1) as f64;
                time_left(Duration::from_secs_f64(per_byte * (total - done) as f64));
            }
        }
        time_left(Duration::ZERO);
    }
}

/// The driver's switch for its cache of compiled kernels.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const CACHE_DISABLE: &str = "CUDA_CACHE_DISABLE";

/// How many threads compile candle's modules into the driver's cache: one per core but one
/// (which the person's other programs keep), at most 4 (the biggest module is 42 % of the
/// PTX, so 3 threads already finish with it, and each compiler holds its own memory); none
/// (1: candle alone, one at a time) where the cache is off (`disable` is
/// `CUDA_CACHE_DISABLE`'s value).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn compiling_threads(cores: usize, disable: Option<&str>) -> usize {
    if disable.is_some_and(|value| value.trim() == "1") {
        return 1;
    }
    cores.saturating_sub(1).clamp(1, 4)
}

/// How far [`on_threads`] is, told after each item.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Clone, Debug, Default, PartialEq)]
struct Progress {
    /// The size of the items finished.
    done: usize,
    /// The size of the items not finished, and of the biggest of them.
    remaining: usize,
    biggest_remaining: usize,
    /// The size of the items that compiled, and the time they took between them.
    compiled: usize,
    compiling_time: Duration,
}

impl Progress {
    /// The time left, `elapsed` since the start, on `threads` threads: at the time per unit
    /// of size of the items that compiled (each timed on its own), what the biggest
    /// unfinished item still needs (it has run since the start: the biggest start first),
    /// or the rest shared among the threads, whichever is longer.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn time_left(&self, elapsed: Duration, threads: usize) -> Duration {
        let per_unit = if self.compiled > 0 {
            self.compiling_time.as_secs_f64() / self.compiled as f64
        } else {
            elapsed.as_secs_f64() / self.done.max(1) as f64
        };
        let biggest = per_unit * self.biggest_remaining as f64 - elapsed.as_secs_f64();
        let shared = per_unit * self.remaining as f64 / threads.max(1) as f64;
        Duration::from_secs_f64(biggest.max(shared).max(0.0))
    }
}

/// What [`on_threads`] did.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug)]
struct Outcome {
    /// The longest time one item took.
    longest: Duration,
    /// Each failure, as its compile said it.
    failures: Vec<String>,
}

/// Runs `compile` on every item, on `threads` threads at most, the biggest items (`size`)
/// first, so the longest starts at once and the others finish beside it. `compile` says how
/// long its item took. After each item, the calling thread is told the [`Progress`].
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn on_threads<T: Sync>(
    items: &[T],
    size: impl Fn(&T) -> usize,
    threads: usize,
    compile: impl Fn(&T) -> std::result::Result<Duration, String> + Sync,
    tell: &mut dyn FnMut(&Progress),
) -> Outcome {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&index| std::cmp::Reverse(size(&items[index])));
    let next = AtomicUsize::new(0);
    let (sender, receiver) = mpsc::channel();
    let mut outcome = Outcome {
        longest: Duration::ZERO,
        failures: Vec::new(),
    };
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, items.len().max(1)) {
            let sender = sender.clone();
            let (order, next, compile) = (&order, &next, &compile);
            scope.spawn(move || {
                while let Some(&index) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if sender.send((index, compile(&items[index]))).is_err() {
                        return;
                    }
                }
            });
        }
        drop(sender);
        let mut unfinished: Vec<usize> = order.iter().map(|&index| size(&items[index])).collect();
        let mut progress = Progress {
            remaining: unfinished.iter().sum(),
            ..Progress::default()
        };
        for (index, result) in receiver {
            let item_size = size(&items[index]);
            if let Some(at) = unfinished.iter().position(|&left| left == item_size) {
                unfinished.remove(at);
            }
            progress.done += item_size;
            progress.remaining -= item_size;
            progress.biggest_remaining = unfinished.iter().copied().max().unwrap_or(0);
            match result {
                Ok(took) => {
                    outcome.longest = outcome.longest.max(took);
                    progress.compiled += item_size;
                    progress.compiling_time += took;
                }
                Err(error) => outcome.failures.push(error),
            }
            tell(&progress);
        }
    });
    outcome
}

/// The name of the first kernel a PTX module defines (`.entry NAME(`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn first_entry(ptx: &str) -> Option<&str> {
    const ENTRY: &str = ".entry ";
    let after = &ptx[ptx.find(ENTRY)? + ENTRY.len()..];
    let end = after.find(|c: char| c == '(' || c.is_whitespace())?;
    Some(&after[..end]).filter(|name| !name.is_empty())
}

/// Runs the miniature pipeline on `device` in `precision` once.
pub fn run(device: &Device, precision: impl Into<Precision>) -> candle_core::Result<()> {
    let precision = precision.into();
    let dtype = precision.compute;
    let unet_file: UnetFile = parse("UNet", UNET)?;
    let unet_config = unet_file
        .check()
        .map_err(|unrunnable| candle_core::Error::Msg(unrunnable.0))?;
    let vae_config: VaeConfig = parse("VAE", VAE)?;
    let text_config: TextEncoderConfig = parse("text encoder", TEXT_ENCODER)?;

    // Tokens → text states and the pooled embedding (SDXL's projection included).
    let text = ClipTextEncoder::new(weights::zeros(precision, device), &text_config)?;
    let tokens = vec![(0..77).map(|id| id % 63).collect::<Vec<u32>>(); 2];
    let encoding = text.forward(&tokens, 63, device)?;

    // One guided step: batch 2, text_time conditioning, then the sampler's arithmetic.
    let unet = Unet::new(weights::zeros(precision, device), &unet_config)?;
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

    // The decode, in the pipeline's precision and in f32 (a VAE that must upcast).
    let mut vae_precisions = vec![precision];
    if dtype != DType::F32 {
        vae_precisions.push(Precision::uniform(DType::F32));
    }
    for vae_precision in vae_precisions {
        let vae = Vae::new(weights::zeros(vae_precision, device), &vae_config)?;
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
    fn modules_compile_on_threads_biggest_first_and_each_once() {
        use std::sync::Mutex;
        let sizes = [5usize, 40, 1, 22, 9];
        let started = Mutex::new(Vec::new());
        let compile = |size: &usize| {
            started.lock().unwrap().push(*size);
            if *size == 9 {
                return Err("nine failed".to_owned());
            }
            Ok(Duration::from_millis(*size as u64))
        };
        let mut told = Vec::new();
        let outcome = on_threads(&sizes, |size| *size, 1, compile, &mut |progress| {
            told.push(progress.clone())
        });
        // One thread: strictly biggest first; each told as it finished.
        assert_eq!(*started.lock().unwrap(), [40, 22, 9, 5, 1]);
        let done: Vec<usize> = told.iter().map(|progress| progress.done).collect();
        assert_eq!(done, [40, 62, 71, 76, 77]);
        let biggest: Vec<usize> = told.iter().map(|p| p.biggest_remaining).collect();
        assert_eq!(biggest, [22, 9, 5, 1, 0]);
        // The failed item (9) counts as done, not as compiled.
        assert_eq!(told[4].compiled, 68);
        assert_eq!(told[4].compiling_time, Duration::from_millis(68));
        assert_eq!(told[4].remaining, 0);
        assert_eq!(outcome.longest, Duration::from_millis(40));
        assert_eq!(outcome.failures, ["nine failed"]);

        // Several threads: every item once, each told, the last report the whole.
        started.lock().unwrap().clear();
        let mut told = Vec::new();
        let outcome = on_threads(&sizes, |size| *size, 3, compile, &mut |progress| {
            told.push(progress.done)
        });
        let mut compiled = started.lock().unwrap().clone();
        compiled.sort_unstable();
        assert_eq!(compiled, [1, 5, 9, 22, 40]);
        assert_eq!(told.len(), 5);
        assert_eq!(told.last(), Some(&77));
        assert!(told.windows(2).all(|pair| pair[0] < pair[1]), "{told:?}");
        assert_eq!(outcome.failures.len(), 1);

        // Nothing to compile: nothing told, no thread stuck.
        let none: [usize; 0] = [];
        let outcome = on_threads(&none, |size| *size, 4, compile, &mut |_| unreachable!());
        assert!(outcome.failures.is_empty());
    }

    #[test]
    fn the_time_left_waits_for_the_biggest_module_or_the_rest_shared() {
        let ms = Duration::from_millis;
        // Three threads, 1 ms a unit. The biggest (60) has run 10 ms: 50 ms to go, more than
        // the other 30 units left shared by three (10 ms).
        let progress = Progress {
            done: 10,
            remaining: 90,
            biggest_remaining: 60,
            compiled: 10,
            compiling_time: ms(10),
        };
        assert_eq!(progress.time_left(ms(10), 3), ms(50));
        // Later, the biggest done and small ones left: their share of the threads.
        let progress = Progress {
            done: 70,
            remaining: 30,
            biggest_remaining: 5,
            compiled: 70,
            compiling_time: ms(70),
        };
        assert_eq!(progress.time_left(ms(65), 3), ms(10));
        // Nothing compiled yet (the first item failed): the wall clock's rate, 2 ms a unit.
        let progress = Progress {
            done: 10,
            remaining: 10,
            biggest_remaining: 10,
            ..Progress::default()
        };
        assert_eq!(progress.time_left(ms(20), 1), ms(20));
        // All done: nothing left, never less.
        let progress = Progress {
            done: 10,
            compiled: 10,
            compiling_time: ms(10),
            ..Progress::default()
        };
        assert_eq!(progress.time_left(ms(30), 3), ms(0));
    }

    #[test]
    fn a_core_is_left_to_the_person_and_a_disabled_cache_compiles_once() {
        assert_eq!(compiling_threads(16, None), 4);
        assert_eq!(compiling_threads(4, None), 3);
        assert_eq!(compiling_threads(2, None), 1);
        assert_eq!(compiling_threads(1, None), 1);
        assert_eq!(compiling_threads(8, Some("0")), 4);
        assert_eq!(compiling_threads(8, Some(" 1 ")), 1);
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
        run(&Device::Cpu, Precision::WIDENED_F16).unwrap();
    }
}

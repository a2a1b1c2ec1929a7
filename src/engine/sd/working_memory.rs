//! How much memory a job takes beyond the model's weights: the tensors the denoise loop and
//! the decode hold at their peak, from the model's configs, the job's size, the device's way
//! of convolving and the [`Plan`].
//!
//! The estimate follows what the engine does: the UNet's attention scores are in the model's
//! dtype (f32 where it upcasts; the VAE's always f32), whole or a chunk of query rows at a
//! time, and held twice (the scores and their softmax), except where our fused kernel runs
//! the UNet's attention (none are held); the UNet keeps every down block's outputs for the skip connections; a
//! 3×3 convolution holds its input, its output and a copy of its kernel, and on a GPU also
//! its im2col column buffer (nine times its input, or one band of it);
//! the VAE decodes one image (or one tile) at a time, its last blocks at full resolution
//! with the channels of the block before. The UNet's and the decode's peaks do not overlap.
//! It errs high, by a tenth and more: refusing a job that would have fitted costs a retry
//! elsewhere, allocating past the memory there is aborts the worker on the CPU (Rust aborts
//! on a failed allocation) and fails the job halfway on a GPU.
//!
//! Checked against what candle really allocates on the CPU by `cargo bench --bench
//! working_memory` (SD 1.5 at 256², 384² and 512²; the table is in `benches/README.md`). The
//! GPU's terms (the column buffers) are from candle's CUDA source, not yet measured.

use candle_core::DType;

use super::conv::ConvPlan;
use super::model_folder::ModelFolder;
use super::unet_blocks::AttentionPlan;
use super::vae::Tiling;
use crate::engine::kernels;

/// Working tensors a resnet step holds at once, in units of its block's activation.
const RESNET_TEMPORARIES: u64 = 6;
/// Copies of the attention matrix alive at once: the scores and their softmax.
const ATTENTION_COPIES: u64 = 2;
/// A 3×3 convolution's taps: its im2col buffer holds nine values per input value.
const TAPS: u64 = 9;
/// The widest input of a UNet convolution, in units of its level's channels: an up block's
/// first resnet takes the block below's output and the skip beside it (3× at SD's first
/// level, 320 + 640; 2× elsewhere).
const UNET_CONV_INPUT: u64 = 3;
/// Working tensors of the VAE at full resolution, in units of one activation with the
/// channels that enter the last block: the resnet's input kept for its residual, the
/// convolution's input, channels-last copy and output, and the group norm's.
const VAE_TEMPORARIES: u64 = 6;
/// What candle's CPU kernels hold besides tensors (matmul packing buffers, per-thread
/// scratch): an allowance for the part of the measured peaks no tensor explains.
const KERNEL_SCRATCH: u64 = 64 << 20;
/// The margin over the sum, in tenths.
const MARGIN_TENTHS: u64 = 11;
const F32_BYTES: u64 = 4;

/// How a job is run to save memory: each choice costs some time, none changes the image
/// beyond what `tests/engine/memory_paths.rs` states.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub attention: AttentionPlan,
    pub vae_tiling: Option<Tiling>,
    /// The 3×3 convolutions in bands (what matters on a GPU; the CPU has no columns).
    pub conv: ConvPlan,
}

impl Plan {
    /// Everything whole: the fastest, where it fits (the default).
    pub const WHOLE: Self = Self {
        attention: AttentionPlan {
            max_score_bytes: None,
        },
        vae_tiling: None,
        conv: ConvPlan {
            max_column_values: None,
        },
    };

    /// The CPU's last resort: attention in chunks of 256 MB of scores, the decode in tiles.
    /// (Its convolutions stay whole: the CPU convolves without column buffers, so bands
    /// would only cost time.)
    pub const SAVING: Self = Self {
        attention: AttentionPlan {
            max_score_bytes: Some(256 << 20),
        },
        vae_tiling: Some(Tiling::DEFAULT),
        conv: ConvPlan {
            max_column_values: None,
        },
    };

    /// What a GPU runs when memory is plentiful: bands and 256 MB chunks of scores cost
    /// little there (each is still a large GEMM) and keep the peak below diffusers'; tiles,
    /// which change the image slightly, only when needed.
    pub const GPU: Self = Self {
        attention: AttentionPlan {
            max_score_bytes: Some(256 << 20),
        },
        vae_tiling: None,
        conv: ConvPlan::BANDED,
    };

    /// A GPU's last resort: half-size tiles, smaller bands (32 MB of columns in f16, 64 MB
    /// in f32) and chunks.
    pub const GPU_LEAST: Self = Self {
        attention: AttentionPlan {
            max_score_bytes: Some(64 << 20),
        },
        vae_tiling: Some(Tiling {
            tile: 32,
            overlap: 8,
        }),
        conv: ConvPlan {
            max_column_values: Some(16 << 20),
        },
    };

    /// The plans a device tries, fastest first; the engine takes the first that fits.
    pub fn choices(convolutions: Convolutions) -> &'static [Plan] {
        const TILED: Option<Tiling> = Some(Tiling::DEFAULT);
        match convolutions {
            Convolutions::Direct => &[
                Plan::WHOLE,
                Plan {
                    vae_tiling: TILED,
                    ..Plan::WHOLE
                },
                Plan::SAVING,
            ],
            Convolutions::Im2col => &[
                Plan::GPU,
                Plan {
                    vae_tiling: TILED,
                    ..Plan::GPU
                },
                Plan::GPU_LEAST,
            ],
        }
    }

    /// The plan that needs the least memory of `choices`.
    pub fn most_saving(convolutions: Convolutions) -> Plan {
        Self::choices(convolutions)
            .last()
            .copied()
            .unwrap_or(Plan::SAVING)
    }
}

/// How the device convolves, which decides whether a convolution holds column buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Convolutions {
    /// candle's CPU backend: directly, over a channels-last copy of the input.
    Direct,
    /// candle's CUDA and Metal backends: im2col, then one GEMM.
    Im2col,
}

impl Convolutions {
    pub fn of(device: &candle_core::Device) -> Self {
        if device.is_cpu() {
            Self::Direct
        } else {
            Self::Im2col
        }
    }
}

/// How the device runs the UNet's attention, which decides whether it holds score matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// Scores, softmax and weighted sum as separate ops: the score matrix is held (whole or
    /// a chunk of it, as the plan says).
    Composed,
    /// Our fused kernel ([`crate::engine::kernels::attention`]): scores never leave the
    /// GPU's shared memory, for heads up to its widest.
    Fused,
}

impl AttentionKernel {
    /// What runs on `device` for a model in `dtype` (loads and checks our kernel there).
    pub fn of(device: &candle_core::Device, dtype: DType) -> Self {
        if kernels::attention::runs_on(device, dtype) {
            Self::Fused
        } else {
            Self::Composed
        }
    }
}

/// The sizes the estimate depends on, taken from a model folder once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkingMemory {
    /// Per UNet block: its channels and, with cross-attention, its head count.
    unet_blocks: Vec<(u64, Option<u64>)>,
    layers_per_block: u64,
    unet_bytes: u64,
    /// Bytes of one UNet attention score: the model's dtype, or f32 when it upcasts.
    score_bytes: u64,
    vae_scale: u64,
    /// The channels that enter the VAE decoder's full-resolution block (its upsampled
    /// input): the second of `block_out_channels`.
    vae_full_channels: u64,
    vae_bytes: u64,
    convolutions: Convolutions,
    attention: AttentionKernel,
}

impl WorkingMemory {
    /// For `folder` run in `dtype` (its VAE in f32 when it must upcast) on a device that
    /// convolves the way `convolutions` says and runs the UNet's attention with `attention`.
    pub fn of(
        folder: &ModelFolder,
        dtype: DType,
        convolutions: Convolutions,
        attention: AttentionKernel,
    ) -> Self {
        let vae_dtype = folder.vae_dtype(dtype);
        Self {
            unet_blocks: folder
                .unet
                .blocks
                .iter()
                .map(|block| {
                    (
                        block.out_channels as u64,
                        block.cross_attention.map(|_| block.attention_heads as u64),
                    )
                })
                .collect(),
            layers_per_block: folder.unet.layers_per_block as u64,
            unet_bytes: dtype.size_in_bytes() as u64,
            score_bytes: if folder.unet.upcast_attention {
                F32_BYTES
            } else {
                dtype.size_in_bytes() as u64
            },
            vae_scale: folder.vae.scale_factor() as u64,
            vae_full_channels: folder
                .vae
                .block_out_channels
                .get(1)
                .or(folder.vae.block_out_channels.first())
                .copied()
                .unwrap_or(0) as u64,
            vae_bytes: vae_dtype.size_in_bytes() as u64,
            convolutions,
            attention,
        }
    }

    /// The same, its VAE decoding in `dtype` (one that overflowed in f16 is upcast).
    pub fn with_vae_dtype(self, dtype: DType) -> Self {
        Self {
            vae_bytes: dtype.size_in_bytes() as u64,
            ..self
        }
    }

    /// Peak bytes of a job making `images` images of `width`×`height` (`guided`: with
    /// classifier-free guidance, which doubles the UNet's batch) the way `plan` says:
    /// attention whole or a chunk of scores at a time, each image decoded whole or in tiles.
    pub fn bytes(&self, width: u32, height: u32, images: u32, guided: bool, plan: Plan) -> u64 {
        let images = u64::from(images.max(1));
        let batch = images * if guided { 2 } else { 1 };
        let scale = self.vae_scale.max(1);
        let latent_h = u64::from(height) / scale;
        let latent_w = u64::from(width) / scale;

        let mut skips = 0;
        let mut largest = 0;
        let mut attention = 0;
        for (index, (channels, heads)) in self.unet_blocks.iter().enumerate() {
            let cells = (latent_h >> index).max(1) * (latent_w >> index).max(1);
            let activation = channels * cells;
            skips += (self.layers_per_block + 1) * activation;
            largest = largest.max(activation);
            // The fused kernel holds no scores for the heads it takes.
            let fused = self.attention == AttentionKernel::Fused
                && heads.is_some_and(|heads| {
                    *channels / heads.max(1) <= kernels::attention::MAX_HEAD_DIM as u64
                });
            if let (Some(heads), false) = (heads, fused) {
                attention = attention.max(heads * cells * cells);
            }
        }
        // The scores of the widest attention, for the whole batch, or one chunk of them (at
        // least one query row of every head).
        let scores = chunked(
            batch * attention * self.score_bytes,
            latent_h * latent_w,
            plan.attention.max_score_bytes,
        );
        // On a GPU, the widest convolution's column buffer, whole or in the plan's bands.
        let unet_columns = match self.convolutions {
            Convolutions::Direct => 0,
            Convolutions::Im2col => chunked(
                batch * UNET_CONV_INPUT * largest * TAPS * self.unet_bytes,
                latent_h,
                plan.conv.max_bytes(self.unet_bytes),
            ),
        };
        let unet = batch * (skips + RESNET_TEMPORARIES * largest) * self.unet_bytes
            + unet_columns
            + ATTENTION_COPIES * scores;

        // One image (or one tile of it) through the decoder at a time.
        let (decoded_h, decoded_w) = match plan.vae_tiling {
            Some(tiling) => {
                let tile = tiling.tile as u64;
                (latent_h.min(tile), latent_w.min(tile))
            }
            None => (latent_h, latent_w),
        };
        let decoded_cells = decoded_h * decoded_w;
        let decoded_pixels = decoded_cells * scale * scale;
        let full_resolution = self.vae_full_channels * decoded_pixels;
        let decode_columns = match self.convolutions {
            Convolutions::Direct => 0,
            Convolutions::Im2col => chunked(
                full_resolution * TAPS * self.vae_bytes,
                decoded_h * scale,
                plan.conv.max_bytes(self.vae_bytes),
            ),
        };
        let decode_scores = chunked(
            decoded_cells * decoded_cells * F32_BYTES,
            decoded_cells,
            plan.attention.max_score_bytes,
        );
        let decode = VAE_TEMPORARIES * full_resolution * self.vae_bytes
            + decode_columns
            + ATTENTION_COPIES * decode_scores;

        // The copy of the largest 3×3 kernel a convolution makes, and the kernels' scratch.
        let widest = self
            .unet_blocks
            .iter()
            .map(|(channels, _)| *channels)
            .max()
            .unwrap_or(0);
        let overhead = widest * widest * 9 * self.unet_bytes + KERNEL_SCRATCH;
        // The finished pictures, as f32 (twice while tiles are blended in) and as 8-bit RGB.
        let full = u64::from(width) * u64::from(height);
        let pictures = images * full * 3 * (2 * F32_BYTES + 1);
        (unet.max(decode) + overhead) / 10 * MARGIN_TENTHS + pictures
    }
}

/// `whole` bytes made of `rows` equal rows, or as many rows as fit `budget` (at least one).
fn chunked(whole: u64, rows: u64, budget: Option<u64>) -> u64 {
    match budget {
        None => whole,
        Some(budget) => whole.min(budget.max(whole / rows.max(1))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SD 1.5's sizes (its configs' numbers).
    fn sd15() -> WorkingMemory {
        WorkingMemory {
            unet_blocks: vec![
                (320, Some(8)),
                (640, Some(8)),
                (1280, Some(8)),
                (1280, None),
            ],
            layers_per_block: 2,
            unet_bytes: 4,
            score_bytes: 4,
            vae_scale: 8,
            vae_full_channels: 256,
            vae_bytes: 4,
            convolutions: Convolutions::Direct,
            attention: AttentionKernel::Composed,
        }
    }

    /// SD 1.5 on a GPU: f16 throughout.
    fn sd15_gpu() -> WorkingMemory {
        WorkingMemory {
            unet_bytes: 2,
            score_bytes: 2,
            vae_bytes: 2,
            convolutions: Convolutions::Im2col,
            ..sd15()
        }
    }

    /// SDXL on a GPU: an f16 UNet, its stock VAE upcast to f32.
    fn sdxl_gpu() -> WorkingMemory {
        WorkingMemory {
            unet_blocks: vec![(320, None), (640, Some(10)), (1280, Some(20))],
            layers_per_block: 2,
            unet_bytes: 2,
            score_bytes: 2,
            vae_scale: 8,
            vae_full_channels: 256,
            vae_bytes: 4,
            convolutions: Convolutions::Im2col,
            attention: AttentionKernel::Composed,
        }
    }

    const GB: u64 = 1_000_000_000;
    /// The fp16 weights: SD 1.5's UNet, text encoder and VAE; SDXL's, its VAE in f32.
    const SD15_WEIGHTS: u64 = 2_130_000_000;
    const SDXL_WEIGHTS: u64 = 7_110_000_000;

    /// The first of `plans` whose job fits `room` beside `weights`.
    fn first_fitting(memory: &WorkingMemory, weights: u64, room: u64, side: u32) -> Option<Plan> {
        Plan::choices(Convolutions::Im2col)
            .iter()
            .copied()
            .find(|plan| weights + memory.bytes(side, side, 1, true, *plan) <= room)
    }

    #[test]
    fn on_a_gpu_sd15_at_512_runs_whole_within_4_gb() {
        let memory = sd15_gpu();
        let job = memory.bytes(512, 512, 1, true, Plan::GPU);
        eprintln!("SD 1.5 512², guided, GPU plan: {job} bytes beside the weights");
        assert!(SD15_WEIGHTS + job <= 4 * GB, "{job}");
        // Plenty of memory: the first (fastest) plan, which never tiles.
        assert_eq!(
            first_fitting(&memory, SD15_WEIGHTS, 100 * GB, 512),
            Some(Plan::GPU)
        );
        // Without bands the decode's column buffers alone are 1.2 GB.
        let unbanded = memory.bytes(512, 512, 1, true, Plan::WHOLE);
        assert!(unbanded > job + GB / 2, "{unbanded} vs {job}");
    }

    #[test]
    fn on_a_12_gb_card_sdxl_at_1024_finds_a_plan_within_10_gb() {
        let memory = sdxl_gpu();
        // Whole, the f32 decode at 1024² needs more than a 12 GB card has.
        let whole = memory.bytes(1024, 1024, 1, true, Plan::WHOLE);
        assert!(SDXL_WEIGHTS + whole > 12 * GB, "{whole}");
        let plan = first_fitting(&memory, SDXL_WEIGHTS, 10 * GB, 1024).expect("a plan fits");
        eprintln!(
            "SDXL 1024², guided: whole {whole}, within 10 GB {} with {plan:?}",
            memory.bytes(1024, 1024, 1, true, plan)
        );
        assert!(plan.vae_tiling.is_some(), "{plan:?}");
        // And on a card with memory to spare, nothing is tiled.
        assert_eq!(
            first_fitting(&memory, SDXL_WEIGHTS, 100 * GB, 1024),
            Some(Plan::GPU)
        );
    }

    #[test]
    fn each_gpu_choice_needs_less_than_the_one_before() {
        for memory in [sd15_gpu(), sdxl_gpu()] {
            let needs: Vec<u64> = Plan::choices(Convolutions::Im2col)
                .iter()
                .map(|plan| memory.bytes(1024, 1024, 1, true, *plan))
                .collect();
            assert!(needs.windows(2).all(|pair| pair[1] < pair[0]), "{needs:?}");
            assert_eq!(
                Plan::most_saving(Convolutions::Im2col),
                *Plan::choices(Convolutions::Im2col).last().unwrap()
            );
        }
    }

    #[test]
    fn a_cpu_holds_no_column_buffers() {
        let cpu = sd15();
        let banded = Plan {
            conv: ConvPlan::BANDED,
            ..Plan::WHOLE
        };
        assert_eq!(
            cpu.bytes(512, 512, 1, true, Plan::WHOLE),
            cpu.bytes(512, 512, 1, true, banded)
        );
    }

    #[test]
    fn attention_at_the_first_block_dominates_sd15() {
        let memory = sd15();
        let one = memory.bytes(512, 512, 1, true, Plan::default());
        // 2 (guidance) × 8 heads × 4096² cells × f32, held twice: 2.1 GB of it.
        assert!((2_100_000_000..3_000_000_000).contains(&one), "{one}");
        // Attention grows with the square of the cells: twice the side, sixteen times it.
        let big = memory.bytes(1024, 1024, 1, true, Plan::default());
        assert!(big > 14 * (one / 2), "{big}");
        assert!(memory.bytes(512, 512, 1, false, Plan::default()) < one);
        assert!(memory.bytes(512, 512, 4, true, Plan::default()) > 3 * one);
    }

    #[test]
    fn where_the_fused_kernel_runs_the_unet_holds_no_scores() {
        // SD 1.5's UNet with a small VAE behind it, so the UNet is the peak.
        let composed = WorkingMemory {
            vae_full_channels: 8,
            ..sd15_gpu()
        };
        let fused = WorkingMemory {
            attention: AttentionKernel::Fused,
            ..composed.clone()
        };
        // 1024², guided: 2 × 8 heads × 16384² cells of f16 scores at the first level, 8.6 GB
        // held twice, whole; none with the kernel.
        let whole = |memory: &WorkingMemory| memory.bytes(1024, 1024, 1, true, Plan::WHOLE);
        assert!(
            whole(&composed) > whole(&fused) + 17_000_000_000,
            "{} vs {}",
            whole(&composed),
            whole(&fused)
        );
        // Heads wider than the kernel takes still hold their scores.
        let wide_heads = WorkingMemory {
            unet_blocks: vec![(2048, Some(4))],
            ..fused.clone()
        };
        // 2 × 4 heads of 512 × 16384² cells of f16, held twice: 8.6 GB.
        assert!(whole(&wide_heads) > whole(&fused) + 8_000_000_000);
    }

    #[test]
    fn chunked_attention_bounds_the_scores() {
        let memory = sd15();
        // 1024², guided: 2 × 8 heads × 16384² cells of f32 scores, 34 GB held twice whole.
        let whole = memory.bytes(1024, 1024, 1, true, Plan::default());
        let chunked = memory.bytes(1024, 1024, 1, true, Plan::SAVING);
        assert!(whole > 30_000_000_000, "{whole}");
        assert!(chunked < 4_000_000_000, "{chunked}");
    }

    #[test]
    fn tiles_bound_the_decode_by_the_tile() {
        // SD 1.5's VAE behind a UNet without attention, so the decode is the peak: a whole
        // decode of 1024² is four 512² ones, a tiled one costs what a 512² decode does, plus
        // the picture.
        let memory = WorkingMemory {
            unet_blocks: vec![(32, None)],
            ..sd15()
        };
        let in_tiles = Plan {
            vae_tiling: Some(Tiling::DEFAULT),
            ..Plan::default()
        };
        let whole = memory.bytes(1024, 1024, 1, false, Plan::default());
        let tiled = memory.bytes(1024, 1024, 1, false, in_tiles);
        let small = memory.bytes(512, 512, 1, false, Plan::default());
        assert!(tiled < whole / 2, "{tiled} vs {whole}");
        assert!(tiled < small + 50_000_000, "{tiled} vs {small}");
        // A latent within one tile costs the same either way.
        assert_eq!(
            memory.bytes(512, 512, 1, false, in_tiles),
            memory.bytes(512, 512, 1, false, Plan::default())
        );
    }

    #[test]
    fn no_size_overflows() {
        let mut memory = sd15();
        memory.unet_blocks = vec![(8192, Some(1024)); 8];
        assert!(memory.bytes(2048, 2048, 8, true, Plan::default()) > 0);
    }
}

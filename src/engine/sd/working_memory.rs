//! How much memory a job takes beyond the model's weights: the tensors the denoise loop and
//! the decode hold at their peak, from the model's configs, the job's size, the device's way
//! of convolving and the [`Plan`].
//!
//! The estimate follows what the engine does: the UNet's attention scores are in the model's
//! dtype (f32 where it upcasts; the VAE's always f32), whole or a chunk of query rows at a
//! time, and held twice (the scores and their softmax), except where our fused kernel runs
//! the UNet's attention (none are held); the UNet keeps every down block's outputs for the skip connections; a
//! 3×3 convolution holds its input, its output and a copy of its kernel, and on a GPU also
//! its im2col column buffer (nine times its input, or one band of it) unless our implicit
//! convolution runs it (none: then only the few that kernel declines hold columns);
//! the VAE decodes one image (or one tile) at a time, its last blocks at full resolution
//! with the channels of the block before. The UNet's and the decode's peaks do not overlap.
//! Where weights are held narrower than the model computes ([`Precision::widens`]), a layer
//! widens its weights as it runs: the largest such copy is held beside the rest, and no
//! convolution runs our implicit kernel (it takes weights held in its own order).
//! It errs high, by a tenth and more: refusing a job that would have fitted costs a retry
//! elsewhere, allocating past the memory there is aborts the worker on the CPU (Rust aborts
//! on a failed allocation) and fails the job halfway on a GPU.
//!
//! Which kernels run ([`DeviceKernels`]) is the engine's to say, not the model's: it reads
//! them again once the device's kernels were raced, so a kernel that lost its race is
//! counted as what runs in its place.
//!
//! Checked against what candle really allocates on the CPU by `cargo bench --bench
//! working_memory` (SD 1.5 at 256², 384² and 512²; the table is in `benches/README.md`). The
//! GPU's terms (the column buffers) are from candle's CUDA source, not yet measured.

use candle_core::DType;

use super::conv::{ConvPlan, Part};
use super::model_folder::ModelFolder;
use super::unet_blocks::AttentionPlan;
use super::vae::Tiling;
use crate::engine::device::Precision;
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
/// What kernels hold besides tensors: candle's on the CPU (matmul packing buffers,
/// per-thread scratch), an allowance for the part of the measured peaks no tensor explains;
/// on a GPU our implicit convolution's partial sums where it splits K (at most 26 MB on an
/// H200, [`kernels::conv3x3::Splits`]).
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
            Convolutions::Im2col | Convolutions::Implicit { .. } => &[
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

/// How the device convolves, which decides which convolutions hold column buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Convolutions {
    /// candle's CPU backend: directly, over a channels-last copy of the input.
    Direct,
    /// candle's CUDA and Metal backends, or our column kernel: im2col, then one GEMM.
    Im2col,
    /// Our implicit-GEMM kernel ([`kernels::conv3x3`]) for the 3×3 convolutions it takes
    /// (whole blocks of input channels in a dtype and a model part where it runs: f16, f32
    /// as TF32; raced per part), with no column buffer; im2col for the rest: a model's first
    /// convolution (its few latent channels), the UNet's stride-2 downsamplers, and a dtype
    /// or part where it does not run.
    Implicit { f16: Parts, f32: Parts },
}

/// The model parts a kernel runs for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parts {
    pub unet: bool,
    pub decoder: bool,
}

impl Parts {
    pub const ALL: Self = Self {
        unet: true,
        decoder: true,
    };
    pub const NONE: Self = Self {
        unet: false,
        decoder: false,
    };

    fn of(runs: impl Fn(Part) -> bool) -> Self {
        Self {
            unet: runs(Part::Unet),
            decoder: runs(Part::Decoder),
        }
    }

    fn has(self, part: Part) -> bool {
        match part {
            Part::Unet => self.unet,
            Part::Decoder => self.decoder,
        }
    }
}

impl Convolutions {
    /// What runs on `device` now: on a GPU, the implicit kernel where it loaded, passed its
    /// check and won its race (so, read after the device was prepared).
    pub fn of(device: &candle_core::Device) -> Self {
        if device.is_cpu() {
            return Self::Direct;
        }
        let implicit = |dtype| {
            Parts::of(|part| {
                kernels::conv3x3::channel_block(dtype)
                    .is_some_and(|block| kernels::conv3x3::runs_for(device, dtype, block, part))
            })
        };
        match (implicit(DType::F16), implicit(DType::F32)) {
            (Parts::NONE, Parts::NONE) => Self::Im2col,
            (f16, f32) => Self::Implicit { f16, f32 },
        }
    }

    /// The same device with our implicit convolution off: what runs a model whose weights
    /// are widened at use (the kernel takes its weights held in its own order).
    fn without_implicit(self) -> Self {
        match self {
            Self::Implicit { .. } => Self::Im2col,
            other => other,
        }
    }

    /// Which of a model part's convolutions in `dtype` hold column buffers here, its blocks
    /// having `channels` (every convolution but the first reads whole blocks of them, or sums
    /// of them: an up block's concatenated inputs).
    fn columns(self, dtype: DType, channels: &[u64], part: Part) -> Columns {
        let takes = |runs: Parts| {
            runs.has(part)
                && channels.iter().all(|&channels| {
                    usize::try_from(channels)
                        .is_ok_and(|channels| kernels::conv3x3::fits(dtype, channels, 1))
                })
        };
        match self {
            Self::Direct => Columns::None,
            Self::Implicit { f16, .. } if dtype == DType::F16 && takes(f16) => {
                Columns::FirstAndStrided
            }
            Self::Implicit { f32, .. } if dtype == DType::F32 && takes(f32) => {
                Columns::FirstAndStrided
            }
            Self::Im2col | Self::Implicit { .. } => Columns::Every,
        }
    }
}

/// Which convolutions of a model hold column buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Columns {
    None,
    Every,
    /// Its first (of the latents' few channels) and its stride-2 ones: the rest run our
    /// implicit convolution.
    FirstAndStrided,
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

/// The kernels a device runs a job's convolutions and attention with: what the estimate
/// needs to know of the device beside the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceKernels {
    pub convolutions: Convolutions,
    pub attention: AttentionKernel,
}

impl DeviceKernels {
    /// The CPU's: direct convolutions, composed attention.
    pub const CPU: Self = Self {
        convolutions: Convolutions::Direct,
        attention: AttentionKernel::Composed,
    };

    /// What runs on `device` for a model in `dtype` now: read once its kernels were raced
    /// (on a GPU this loads and checks them where that was not done yet).
    pub fn of(device: &candle_core::Device, dtype: DType) -> Self {
        Self {
            convolutions: Convolutions::of(device),
            attention: AttentionKernel::of(device, dtype),
        }
    }

    /// What to assume before the device's kernels were raced: no implicit convolution
    /// (its race may switch it off; the column path holds more), our attention where it
    /// loaded (never raced).
    pub fn before_preparing(device: &candle_core::Device, dtype: DType) -> Self {
        Self {
            convolutions: if device.is_cpu() {
                Convolutions::Direct
            } else {
                Convolutions::Im2col
            },
            attention: AttentionKernel::of(device, dtype),
        }
    }
}

/// The sizes the estimate depends on, taken from a model folder once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkingMemory {
    /// Per UNet block: its channels and, with cross-attention, its head count.
    unet_blocks: Vec<(u64, Option<u64>)>,
    layers_per_block: u64,
    /// The UNet's input channels (the latents'): its first convolution's.
    unet_in_channels: u64,
    unet_dtype: DType,
    /// Bytes of one UNet attention score: the model's dtype, or f32 when it upcasts.
    score_bytes: u64,
    vae_scale: u64,
    /// The latents' channels: the decoder's first convolution's input.
    latent_channels: u64,
    /// The channels that enter the VAE decoder's full-resolution block (its upsampled
    /// input): the second of `block_out_channels`.
    vae_full_channels: u64,
    /// The decoder's blocks' channels.
    vae_channels: Vec<u64>,
    vae_dtype: DType,
    /// Whether the weights are held narrower than the model computes, and widened layer by
    /// layer.
    widens: bool,
}

impl WorkingMemory {
    /// For `folder` run in `precision` (its VAE in f32 when it must upcast).
    pub fn of(folder: &ModelFolder, precision: impl Into<Precision>) -> Self {
        let precision = precision.into();
        let dtype = precision.compute;
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
            unet_in_channels: folder.unet.in_channels as u64,
            unet_dtype: dtype,
            score_bytes: if folder.unet.upcast_attention {
                F32_BYTES
            } else {
                dtype.size_in_bytes() as u64
            },
            vae_scale: folder.vae.scale_factor() as u64,
            latent_channels: folder.vae.latent_channels as u64,
            vae_full_channels: folder
                .vae
                .block_out_channels
                .get(1)
                .or(folder.vae.block_out_channels.first())
                .copied()
                .unwrap_or(0) as u64,
            vae_channels: folder
                .vae
                .block_out_channels
                .iter()
                .map(|&channels| channels as u64)
                .collect(),
            vae_dtype: folder.vae_dtype(dtype),
            widens: precision.widens(),
        }
    }

    /// The same, its VAE decoding in `dtype` (one that overflowed in f16 is upcast).
    pub fn with_vae_dtype(self, dtype: DType) -> Self {
        Self {
            vae_dtype: dtype,
            ..self
        }
    }

    /// Peak bytes of a job making `images` images of `width`×`height` (`guided`: with
    /// classifier-free guidance, which doubles the UNet's batch) the way `plan` says, on a
    /// device that runs `kernels`: attention whole or a chunk of scores at a time, each image
    /// decoded whole or in tiles. The decode reuses what the steps freed
    /// ([`Estimate::peak`]).
    pub fn bytes(
        &self,
        width: u32,
        height: u32,
        images: u32,
        guided: bool,
        plan: Plan,
        kernels: DeviceKernels,
    ) -> u64 {
        self.estimate(width, height, images, guided, plan, kernels)
            .peak()
    }

    /// The estimate by stretch of the job, as [`Self::bytes`] takes it.
    pub fn estimate(
        &self,
        width: u32,
        height: u32,
        images: u32,
        guided: bool,
        plan: Plan,
        kernels: DeviceKernels,
    ) -> Estimate {
        let images = u64::from(images.max(1));
        let batch = images * if guided { 2 } else { 1 };
        let scale = self.vae_scale.max(1);
        let latent_h = u64::from(height) / scale;
        let latent_w = u64::from(width) / scale;
        let unet_bytes = self.unet_dtype.size_in_bytes() as u64;
        let vae_bytes = self.vae_dtype.size_in_bytes() as u64;
        let convolutions = if self.widens {
            kernels.convolutions.without_implicit()
        } else {
            kernels.convolutions
        };

        let mut skips = 0;
        let mut largest = 0;
        let mut attention = 0;
        // The largest input of a stride-2 downsampler's columns (a quarter of its cells).
        let mut downsampler_columns = 0;
        for (index, (channels, heads)) in self.unet_blocks.iter().enumerate() {
            let cells = (latent_h >> index).max(1) * (latent_w >> index).max(1);
            let activation = channels * cells;
            skips += (self.layers_per_block + 1) * activation;
            largest = largest.max(activation);
            if index + 1 < self.unet_blocks.len() {
                downsampler_columns = downsampler_columns.max(activation.div_ceil(4) * TAPS);
            }
            // The fused kernel holds no scores for the heads it takes.
            let fused = kernels.attention == AttentionKernel::Fused
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
        // On a GPU, the widest column buffer of a convolution that has one: whole, or in the
        // plan's bands for ours (candle's stride-2 downsamplers make theirs whole).
        let banded_columns = |input_values: u64, rows: u64, bytes: u64| {
            chunked(
                input_values * TAPS * bytes,
                rows,
                plan.conv.max_bytes(bytes),
            )
        };
        let latent_cells = latent_h * latent_w;
        let downsampler_columns = batch * downsampler_columns * unet_bytes;
        let unet_channels: Vec<u64> = self.unet_blocks.iter().map(|(c, _)| *c).collect();
        let unet_columns = match convolutions.columns(self.unet_dtype, &unet_channels, Part::Unet) {
            Columns::None => 0,
            Columns::Every => {
                banded_columns(batch * UNET_CONV_INPUT * largest, latent_h, unet_bytes)
                    .max(downsampler_columns)
            }
            Columns::FirstAndStrided => banded_columns(
                batch * self.unet_in_channels * latent_cells,
                latent_h,
                unet_bytes,
            )
            .max(downsampler_columns),
        };
        let unet = batch * (skips + RESNET_TEMPORARIES * largest) * unet_bytes
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
        // (The decoder has no stride-2 convolutions.)
        let decode_columns =
            match convolutions.columns(self.vae_dtype, &self.vae_channels, Part::Decoder) {
                Columns::None => 0,
                Columns::Every => banded_columns(full_resolution, decoded_h * scale, vae_bytes),
                Columns::FirstAndStrided => {
                    banded_columns(self.latent_channels * decoded_cells, decoded_h, vae_bytes)
                }
            };
        let decode_scores = chunked(
            decoded_cells * decoded_cells * F32_BYTES,
            decoded_cells,
            plan.attention.max_score_bytes,
        );
        let decode = VAE_TEMPORARIES * full_resolution * vae_bytes
            + decode_columns
            + ATTENTION_COPIES * decode_scores;

        // The copy of the largest 3×3 kernel a convolution makes, and the kernels' scratch.
        let widest = self
            .unet_blocks
            .iter()
            .map(|(channels, _)| *channels)
            .max()
            .unwrap_or(0);
        // Widening, also the largest weight in the compute dtype: an up block's first
        // convolution, from its own and the skip's channels (2 × widest) to widest.
        let widened = if self.widens {
            2 * widest * widest * TAPS * unet_bytes
        } else {
            0
        };
        let overhead = widest * widest * TAPS * unet_bytes + widened + KERNEL_SCRATCH;
        // The finished pictures, as f32 (twice while tiles are blended in) and as 8-bit RGB.
        let full = u64::from(width) * u64::from(height);
        let pictures = images * full * 3 * (2 * F32_BYTES + 1);
        Estimate {
            steps: unet,
            decode,
            beside: overhead,
            pictures,
        }
    }
}

/// A job's working memory by stretch: the steps' (the UNet's activations, columns and
/// scores) and the decode's, what is held beside either (a convolution's copy of its
/// weights, the kernels' scratch), and the finished pictures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Estimate {
    pub steps: u64,
    pub decode: u64,
    pub beside: u64,
    pub pictures: u64,
}

impl Estimate {
    /// The peak where the decode reuses the memory the steps freed: the larger stretch, with
    /// the margin. So it is on the CPU, and on a GPU whose pool was handed back between them.
    pub fn peak(&self) -> u64 {
        with_margin(self.steps.max(self.decode) + self.beside) + self.pictures
    }

    /// The peak where the steps' freed memory stays held through the decode: a GPU pool
    /// kept through the job may not fit the decode's larger buffers into the steps' smaller
    /// freed ones, and grows by the decode's whole need instead.
    pub fn peak_if_held(&self) -> u64 {
        with_margin(self.steps + self.decode + self.beside) + self.pictures
    }
}

fn with_margin(bytes: u64) -> u64 {
    bytes / 10 * MARGIN_TENTHS
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
            unet_in_channels: 4,
            unet_dtype: DType::F32,
            score_bytes: 4,
            vae_scale: 8,
            latent_channels: 4,
            vae_full_channels: 256,
            vae_channels: vec![128, 256, 512, 512],
            vae_dtype: DType::F32,
            widens: false,
        }
    }

    /// SD 1.5 on a GPU: f16 throughout.
    fn sd15_gpu() -> WorkingMemory {
        WorkingMemory {
            unet_dtype: DType::F16,
            score_bytes: 2,
            vae_dtype: DType::F16,
            ..sd15()
        }
    }

    /// A GPU where candle's convolutions or our columns run, and composed attention.
    const COLUMNS: DeviceKernels = DeviceKernels {
        convolutions: Convolutions::Im2col,
        attention: AttentionKernel::Composed,
    };
    /// The same with our implicit convolution in f16 (a Turing card: no TF32).
    const IMPLICIT: DeviceKernels = DeviceKernels {
        convolutions: Convolutions::Implicit {
            f16: Parts::ALL,
            f32: Parts::NONE,
        },
        ..COLUMNS
    };
    /// And in TF32 too (Ampere and newer).
    const IMPLICIT_TF32: DeviceKernels = DeviceKernels {
        convolutions: Convolutions::Implicit {
            f16: Parts::ALL,
            f32: Parts::ALL,
        },
        ..COLUMNS
    };
    const CPU: DeviceKernels = DeviceKernels::CPU;

    /// SDXL on a GPU: an f16 UNet, its stock VAE upcast to f32.
    fn sdxl_gpu() -> WorkingMemory {
        WorkingMemory {
            unet_blocks: vec![(320, None), (640, Some(10)), (1280, Some(20))],
            layers_per_block: 2,
            unet_in_channels: 4,
            unet_dtype: DType::F16,
            score_bytes: 2,
            vae_scale: 8,
            latent_channels: 4,
            vae_full_channels: 256,
            vae_channels: vec![128, 256, 512, 512],
            vae_dtype: DType::F32,
            widens: false,
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
            .find(|plan| weights + memory.bytes(side, side, 1, true, *plan, COLUMNS) <= room)
    }

    #[test]
    fn weights_widened_at_use_hold_the_largest_widened_and_take_no_implicit_convolution() {
        let held_f16 = WorkingMemory {
            widens: true,
            ..sd15()
        };
        // The up block's first convolution, 2560 → 1280 channels, widened to f32.
        let largest_widened = 2 * 1280 * 1280 * 9 * 4;
        for (kernels, side) in [(CPU, 512), (COLUMNS, 512), (COLUMNS, 1024)] {
            let plain = sd15().estimate(side, side, 1, true, Plan::GPU, kernels);
            let widened = held_f16.estimate(side, side, 1, true, Plan::GPU, kernels);
            assert_eq!(widened.beside, plain.beside + largest_widened);
            assert_eq!((widened.steps, widened.decode), (plain.steps, plain.decode));
        }
        // Where our implicit convolution would run (TF32 too), a widening model's
        // convolutions hold their columns all the same.
        assert_eq!(
            held_f16.estimate(512, 512, 1, true, Plan::GPU, IMPLICIT_TF32),
            held_f16.estimate(512, 512, 1, true, Plan::GPU, COLUMNS)
        );
        assert!(
            sd15().bytes(512, 512, 1, true, Plan::GPU, IMPLICIT_TF32)
                < sd15().bytes(512, 512, 1, true, Plan::GPU, COLUMNS)
        );
    }

    #[test]
    fn on_a_4_gb_gtx_1650_sd15_at_512_fits_with_its_weights_held_in_f16() {
        // The GTX 16 series' precision: f32 activations, scores and decode, f16 weights.
        let widened = WorkingMemory {
            widens: true,
            ..sd15()
        };
        // What a 4 GB card has free beside a desktop.
        let room = 3_400_000_000;
        let plan = first_fitting(&widened, SD15_WEIGHTS, room, 512).expect("a plan fits");
        let job = widened.bytes(512, 512, 1, true, plan, COLUMNS);
        eprintln!(
            "SD 1.5 512², guided, f32 over f16 weights: {job} bytes beside the weights with {plan:?}"
        );
        // All in f32, even its text encoder on the CPU leaves no room: 3.8 GB of weights.
        let f32_weights_without_text = 2 * (SD15_WEIGHTS - 246_000_000);
        assert_eq!(
            first_fitting(&sd15(), f32_weights_without_text, room, 512),
            None
        );
    }

    #[test]
    fn on_a_gpu_sd15_at_512_runs_whole_within_4_gb() {
        let memory = sd15_gpu();
        let job = memory.bytes(512, 512, 1, true, Plan::GPU, COLUMNS);
        eprintln!("SD 1.5 512², guided, GPU plan: {job} bytes beside the weights");
        assert!(SD15_WEIGHTS + job <= 4 * GB, "{job}");
        // Plenty of memory: the first (fastest) plan, which never tiles.
        assert_eq!(
            first_fitting(&memory, SD15_WEIGHTS, 100 * GB, 512),
            Some(Plan::GPU)
        );
        // Without bands the decode's column buffers alone are 1.2 GB.
        let unbanded = memory.bytes(512, 512, 1, true, Plan::WHOLE, COLUMNS);
        assert!(unbanded > job + GB / 2, "{unbanded} vs {job}");
    }

    #[test]
    fn on_a_12_gb_card_sdxl_at_1024_finds_a_plan_within_10_gb() {
        let memory = sdxl_gpu();
        // Whole, the f32 decode at 1024² needs more than a 12 GB card has.
        let whole = memory.bytes(1024, 1024, 1, true, Plan::WHOLE, COLUMNS);
        assert!(SDXL_WEIGHTS + whole > 12 * GB, "{whole}");
        let plan = first_fitting(&memory, SDXL_WEIGHTS, 10 * GB, 1024).expect("a plan fits");
        eprintln!(
            "SDXL 1024², guided: whole {whole}, within 10 GB {} with {plan:?}",
            memory.bytes(1024, 1024, 1, true, plan, COLUMNS)
        );
        assert!(plan.vae_tiling.is_some(), "{plan:?}");
        // And on a card with memory to spare, nothing is tiled.
        assert_eq!(
            first_fitting(&memory, SDXL_WEIGHTS, 100 * GB, 1024),
            Some(Plan::GPU)
        );
    }

    #[test]
    fn on_an_8_gb_card_sdxl_at_1024_fits_only_without_its_text_encoders_beside_the_job() {
        // What the GPU bench leaves an 8 GB card's worth (7.4 GiB) less a CUDA context.
        let room = 7_400_000_000;
        let text_encoders = 1_640_000_000;
        let memory = sdxl_gpu();
        let kernels = IMPLICIT_TF32;
        let fitting = |weights: u64| {
            Plan::choices(kernels.convolutions)
                .iter()
                .copied()
                .find(|plan| weights + memory.bytes(1024, 1024, 1, true, *plan, kernels) <= room)
        };
        // With its text encoders on the GPU no plan fits; without them the most saving does
        // (they visit the GPU for each prompt, before the steps allocate, or run on the CPU:
        // `CandleEngine::make_room`).
        assert_eq!(fitting(SDXL_WEIGHTS), None);
        let plan = fitting(SDXL_WEIGHTS - text_encoders).expect("a plan fits");
        assert_eq!(plan, Plan::most_saving(kernels.convolutions));
        let estimate = memory.estimate(1024, 1024, 1, true, plan, kernels);
        eprintln!(
            "SDXL 1024², guided, on 8 GB: {plan:?}, steps {} B, decode {} B, peak {} B beside the weights",
            estimate.steps,
            estimate.decode,
            estimate.peak()
        );
    }

    #[test]
    fn the_decode_reuses_the_steps_memory_unless_the_pool_holds_it() {
        let memory = sdxl_gpu();
        let estimate = memory.estimate(1024, 1024, 1, true, Plan::GPU, COLUMNS);
        assert_eq!(
            estimate.peak(),
            memory.bytes(1024, 1024, 1, true, Plan::GPU, COLUMNS)
        );
        // SDXL at 1024²: the f32 decode is the larger stretch; held together, the steps'
        // whole need comes on top of it (with the margin).
        assert!(estimate.decode > estimate.steps && estimate.steps > 0);
        let extra = estimate.peak_if_held() - estimate.peak();
        let expected = estimate.steps / 10 * MARGIN_TENTHS;
        assert!(
            extra.abs_diff(expected) <= MARGIN_TENTHS,
            "{extra} against {expected}"
        );
    }

    #[test]
    fn each_gpu_choice_needs_less_than_the_one_before() {
        for memory in [sd15_gpu(), sdxl_gpu()] {
            let needs: Vec<u64> = Plan::choices(Convolutions::Im2col)
                .iter()
                .map(|plan| memory.bytes(1024, 1024, 1, true, *plan, COLUMNS))
                .collect();
            assert!(needs.windows(2).all(|pair| pair[1] < pair[0]), "{needs:?}");
            assert_eq!(
                Plan::most_saving(Convolutions::Im2col),
                *Plan::choices(Convolutions::Im2col).last().unwrap()
            );
        }
    }

    #[test]
    fn a_part_whose_race_the_implicit_convolution_lost_holds_its_columns() {
        let sd15 = sd15_gpu();
        let f16_for = |unet, decoder| DeviceKernels {
            convolutions: Convolutions::Implicit {
                f16: Parts { unet, decoder },
                f32: Parts::NONE,
            },
            ..COLUMNS
        };
        for plan in [Plan::WHOLE, Plan::GPU] {
            let estimate = |kernels| sd15.estimate(512, 512, 1, true, plan, kernels);
            let (columns, implicit) = (estimate(COLUMNS), estimate(IMPLICIT));
            // Each stretch holds columns without the kernel, so the comparisons below can fail.
            assert!(columns.steps > implicit.steps && columns.decode > implicit.decode);
            // Off for the decoder (it lost at the decoder's shapes): the decode holds its
            // columns, the steps do not.
            let unet_only = estimate(f16_for(true, false));
            assert_eq!(
                (unet_only.steps, unet_only.decode),
                (implicit.steps, columns.decode)
            );
            // And the other way round.
            let decoder_only = estimate(f16_for(false, true));
            assert_eq!(
                (decoder_only.steps, decoder_only.decode),
                (columns.steps, implicit.decode)
            );
        }
    }

    #[test]
    fn where_the_implicit_convolution_runs_f16_convolutions_hold_no_columns() {
        let sd15 = sd15_gpu();
        let bytes =
            |memory: &WorkingMemory, plan, kernels| memory.bytes(512, 512, 1, true, plan, kernels);
        // Whole, the decode's columns are 1.2 GB (256 channels × 512² × 9 in f16), most of
        // the peak; banded, 128 MB; with the kernel only the first convolution's (4 channels
        // × 64² × 9), and the UNet becomes the peak.
        let saved = |plan| bytes(&sd15, plan, COLUMNS) - bytes(&sd15, plan, IMPLICIT);
        assert!(saved(Plan::WHOLE) > 1_000_000_000, "{}", saved(Plan::WHOLE));
        assert!(
            (100_000_000..160_000_000).contains(&saved(Plan::GPU)),
            "{}",
            saved(Plan::GPU)
        );
        // What the kernel declines still holds its columns: an f32 decode (SDXL's stock
        // VAE, the job's peak at 1024²) where TF32 does not run, a model whose channels are
        // not whole blocks.
        let sdxl = sdxl_gpu();
        for plan in [Plan::WHOLE, Plan::GPU] {
            assert_eq!(
                sdxl.bytes(1024, 1024, 1, true, plan, IMPLICIT),
                sdxl.bytes(1024, 1024, 1, true, plan, COLUMNS)
            );
        }
        // Where it does, the f32 decode holds no columns either: 256 channels × 1024² × 9 in
        // f32 whole (9.7 GB), one band of 64 M values (256 MB) in the GPU plan.
        let sdxl_saved = |plan| {
            sdxl.bytes(1024, 1024, 1, true, plan, COLUMNS)
                - sdxl.bytes(1024, 1024, 1, true, plan, IMPLICIT_TF32)
        };
        assert!(
            sdxl_saved(Plan::WHOLE) > 9_000_000_000,
            "{}",
            sdxl_saved(Plan::WHOLE)
        );
        assert!(
            (250_000_000..300_000_000).contains(&sdxl_saved(Plan::GPU)),
            "{}",
            sdxl_saved(Plan::GPU)
        );
        let odd = WorkingMemory {
            unet_blocks: vec![(324, Some(4)), (648, Some(8))],
            vae_channels: vec![132, 260],
            ..sd15_gpu()
        };
        assert_eq!(
            bytes(&odd, Plan::WHOLE, IMPLICIT),
            bytes(&odd, Plan::WHOLE, COLUMNS)
        );
        // Where the UNet is the peak (a small VAE behind it), its columns go too, but for
        // candle's stride-2 downsamplers' (320 channels × 32² × 9, guided).
        let unet_peak = WorkingMemory {
            vae_full_channels: 8,
            ..sd15_gpu()
        };
        let saved =
            bytes(&unet_peak, Plan::WHOLE, COLUMNS) - bytes(&unet_peak, Plan::WHOLE, IMPLICIT);
        // 2 × 960 channels × 64² × 9 in f16 (141.6 MB), less the downsampler's 2 × 320 ×
        // 32² × 9 (11.8 MB), with the margin of a tenth.
        let expected = (141_557_760 - 11_796_480) / 10 * 11;
        assert!(
            saved.abs_diff(expected) < 1_000_000,
            "{saved} vs {expected}"
        );
    }

    #[test]
    fn a_cpu_holds_no_column_buffers() {
        let cpu = sd15();
        let banded = Plan {
            conv: ConvPlan::BANDED,
            ..Plan::WHOLE
        };
        assert_eq!(
            cpu.bytes(512, 512, 1, true, Plan::WHOLE, CPU),
            cpu.bytes(512, 512, 1, true, banded, CPU)
        );
    }

    #[test]
    fn attention_at_the_first_block_dominates_sd15() {
        let memory = sd15();
        let one = memory.bytes(512, 512, 1, true, Plan::default(), CPU);
        // 2 (guidance) × 8 heads × 4096² cells × f32, held twice: 2.1 GB of it.
        assert!((2_100_000_000..3_000_000_000).contains(&one), "{one}");
        // Attention grows with the square of the cells: twice the side, sixteen times it.
        let big = memory.bytes(1024, 1024, 1, true, Plan::default(), CPU);
        assert!(big > 14 * (one / 2), "{big}");
        assert!(memory.bytes(512, 512, 1, false, Plan::default(), CPU) < one);
        assert!(memory.bytes(512, 512, 4, true, Plan::default(), CPU) > 3 * one);
    }

    #[test]
    fn where_the_fused_kernel_runs_the_unet_holds_no_scores() {
        // SD 1.5's UNet with a small VAE behind it, so the UNet is the peak.
        let composed = WorkingMemory {
            vae_full_channels: 8,
            ..sd15_gpu()
        };
        let fused = DeviceKernels {
            attention: AttentionKernel::Fused,
            ..COLUMNS
        };
        // 1024², guided: 2 × 8 heads × 16384² cells of f16 scores at the first level, 8.6 GB
        // held twice, whole; none with the kernel.
        let whole = |memory: &WorkingMemory, kernels| {
            memory.bytes(1024, 1024, 1, true, Plan::WHOLE, kernels)
        };
        assert!(
            whole(&composed, COLUMNS) > whole(&composed, fused) + 17_000_000_000,
            "{} vs {}",
            whole(&composed, COLUMNS),
            whole(&composed, fused)
        );
        // Heads wider than the kernel takes still hold their scores.
        let wide_heads = WorkingMemory {
            unet_blocks: vec![(2048, Some(4))],
            ..composed.clone()
        };
        // 2 × 4 heads of 512 × 16384² cells of f16, held twice: 8.6 GB.
        assert!(whole(&wide_heads, fused) > whole(&composed, fused) + 8_000_000_000);
    }

    #[test]
    fn chunked_attention_bounds_the_scores() {
        let memory = sd15();
        // 1024², guided: 2 × 8 heads × 16384² cells of f32 scores, 34 GB held twice whole.
        let whole = memory.bytes(1024, 1024, 1, true, Plan::default(), CPU);
        let chunked = memory.bytes(1024, 1024, 1, true, Plan::SAVING, CPU);
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
        let whole = memory.bytes(1024, 1024, 1, false, Plan::default(), CPU);
        let tiled = memory.bytes(1024, 1024, 1, false, in_tiles, CPU);
        let small = memory.bytes(512, 512, 1, false, Plan::default(), CPU);
        assert!(tiled < whole / 2, "{tiled} vs {whole}");
        assert!(tiled < small + 50_000_000, "{tiled} vs {small}");
        // A latent within one tile costs the same either way.
        assert_eq!(
            memory.bytes(512, 512, 1, false, in_tiles, CPU),
            memory.bytes(512, 512, 1, false, Plan::default(), CPU)
        );
    }

    #[test]
    fn no_size_overflows() {
        let mut memory = sd15();
        memory.unet_blocks = vec![(8192, Some(1024)); 8];
        for kernels in [CPU, COLUMNS, IMPLICIT] {
            assert!(memory.bytes(2048, 2048, 8, true, Plan::default(), kernels) > 0);
        }
    }
}

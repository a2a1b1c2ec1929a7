//! How much memory a job takes beyond the model's weights: the tensors the denoise loop and
//! the decode hold at their peak, from the model's configs, the job's size and the [`Plan`].
//!
//! The estimate follows what the engine does on the CPU: attention scores are computed in
//! f32 whatever the model runs in, whole or a chunk of query rows at a time, and held twice
//! (the scores and their softmax; four times in the VAE, whose softmax is not fused); the
//! UNet keeps every down block's outputs for the skip connections; a 3×3 convolution holds
//! its input, a channels-last copy of it, its output and a copy of its kernel; the VAE decodes
//! one image (or one tile) at a time, its last blocks at full resolution with the channels of
//! the block before. The UNet's and the decode's peaks do not overlap. It errs high, by a
//! tenth and more: refusing a job that would have fitted costs a retry elsewhere, allocating
//! past the RAM there is aborts the worker (Rust aborts on a failed allocation) or wakes the
//! OOM killer.
//!
//! Checked against what candle really allocates by `cargo bench --bench working_memory`
//! (SD 1.5 at 256², 384² and 512²; the table is in `benches/README.md`).

use candle_core::DType;

use super::model_folder::ModelFolder;
use super::unet_blocks::AttentionPlan;
use super::vae::Tiling;

/// Working tensors a resnet step holds at once, in units of its block's activation.
const RESNET_TEMPORARIES: u64 = 6;
/// Copies of the attention matrix alive at once: the scores and their softmax (UNet), or
/// the scores, their shifted exponentials and the quotient (the VAE's unfused softmax).
const UNET_ATTENTION_COPIES: u64 = 2;
const VAE_ATTENTION_COPIES: u64 = 4;
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

/// How a job is run to save memory: both choices cost time, neither changes the image
/// beyond what `tests/engine/memory_paths.rs` states.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub attention: AttentionPlan,
    pub vae_tiling: Option<Tiling>,
}

impl Plan {
    /// Attention in chunks of 256 MB of scores, and the decode in tiles.
    pub const SAVING: Self = Self {
        attention: AttentionPlan {
            max_score_bytes: Some(256 << 20),
        },
        vae_tiling: Some(Tiling::DEFAULT),
    };
}

/// The sizes the estimate depends on, taken from a model folder once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkingMemory {
    /// Per UNet block: its channels and, with cross-attention, its head count.
    unet_blocks: Vec<(u64, Option<u64>)>,
    layers_per_block: u64,
    unet_bytes: u64,
    vae_scale: u64,
    /// The channels that enter the VAE decoder's full-resolution block (its upsampled
    /// input): the second of `block_out_channels`.
    vae_full_channels: u64,
    vae_bytes: u64,
}

impl WorkingMemory {
    /// For `folder` run in `dtype` (its VAE in f32 when it must upcast).
    pub fn of(folder: &ModelFolder, dtype: DType) -> Self {
        let vae_dtype = if dtype == DType::F16 && folder.vae.force_upcast {
            DType::F32
        } else {
            dtype
        };
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
            vae_scale: folder.vae.scale_factor() as u64,
            vae_full_channels: folder
                .vae
                .block_out_channels
                .get(1)
                .or(folder.vae.block_out_channels.first())
                .copied()
                .unwrap_or(0) as u64,
            vae_bytes: vae_dtype.size_in_bytes() as u64,
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
            if let Some(heads) = heads {
                attention = attention.max(heads * cells * cells);
            }
        }
        // The scores of the widest attention, for the whole batch, or one chunk of them (at
        // least one query row of every head).
        let mut scores = batch * attention * F32_BYTES;
        if let Some(budget) = plan.attention.max_score_bytes {
            let row = scores / (latent_h * latent_w).max(1);
            scores = scores.min(budget.max(row));
        }
        let unet = batch * (skips + RESNET_TEMPORARIES * largest) * self.unet_bytes
            + UNET_ATTENTION_COPIES * scores;

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
        let decode = VAE_TEMPORARIES * self.vae_full_channels * decoded_pixels * self.vae_bytes
            + VAE_ATTENTION_COPIES * decoded_cells * decoded_cells * F32_BYTES;

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
            vae_scale: 8,
            vae_full_channels: 256,
            vae_bytes: 4,
        }
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

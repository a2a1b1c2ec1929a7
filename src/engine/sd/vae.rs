//! The VAE decoder: latents to RGB, built from `vae/config.json` on our [`Decoder`].
//!
//! Two ways to decode: whole (the reference), or in overlapping tiles blended into each
//! other (what diffusers calls VAE tiling), which bounds the decoder's working memory by the
//! tile's size instead of the image's: the full-resolution convolutions and the mid-block's
//! attention over every latent cell are what make a 1024² decode need gigabytes. Tiles see
//! only their own neighbourhood (the mid-block attention and the group norms' statistics are
//! per tile), so a tiled image differs slightly from a whole one; the blend hides the seams.
//! `tests/engine/memory_paths.rs` states and checks the difference.
//!
//! Either way the decoder's output is checked before it is clamped into `[0, 1]`: numbers
//! that overflowed (f16 tops out at 65504) come out as NaN or infinities, which the clamp
//! would turn into a black or flat picture passed off as a result.

use candle_core::{DType, IndexOp, Result, Tensor};
use candle_nn::VarBuilder;

use super::model_folder::VaeConfig;
use super::vae_decoder::{Decoder, DecoderConfig};
use super::working_memory::Plan;
use super::{SdError, all_finite};
use crate::engine::profile::{self, Part};

/// Overlapping tiles of the latent image, in latent cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    /// A tile's side.
    pub tile: usize,
    /// How far neighbouring tiles overlap (and blend).
    pub overlap: usize,
}

impl Tiling {
    /// diffusers' defaults for SD and SDXL: 512-pixel tiles overlapping by a quarter.
    pub const DEFAULT: Self = Self {
        tile: 64,
        overlap: 16,
    };

    /// Where the tiles along a side of `length` cells start: every `tile - overlap`, up to
    /// the first tile that reaches the end.
    fn starts(self, length: usize) -> Vec<usize> {
        let stride = self.tile.saturating_sub(self.overlap).max(1);
        let mut starts = vec![0];
        while starts
            .last()
            .is_some_and(|start| start + self.tile < length)
        {
            starts.push(starts.last().map_or(0, |start| start + stride));
        }
        starts
    }
}

pub struct Vae {
    decoder: Decoder,
    scaling_factor: f64,
    shift_factor: f64,
    dtype: DType,
}

impl Vae {
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let dtype = vb.dtype();
        let decoder = Decoder::new(
            vb,
            &DecoderConfig {
                latent_channels: config.latent_channels,
                out_channels: config.out_channels,
                block_out_channels: config.block_out_channels.clone(),
                layers_per_block: config.layers_per_block,
                groups: config.norm_num_groups,
                use_post_quant_conv: config.use_post_quant_conv,
            },
        )?;
        Ok(Self {
            decoder,
            scaling_factor: config.scaling_factor,
            shift_factor: config.shift_factor.unwrap_or(0.0),
            dtype,
        })
    }

    /// Latents `(batch, 4, h, w)` to f32 RGB `(batch, 3, h·f, w·f)` in `[0, 1]`, whole or in
    /// the plan's tiles (a latent no larger than one tile is decoded whole).
    /// [`SdError::NotFinite`] where the decoder's output is not all finite numbers.
    pub fn decode(&self, latents: &Tensor, plan: Plan) -> std::result::Result<Tensor, SdError> {
        let _part = profile::part(Part::Vae);
        let (_, _, height, width) = latents.dims4()?;
        let pixels = match plan.vae_tiling {
            Some(tiling) if height > tiling.tile || width > tiling.tile => {
                self.decode_in_tiles(latents, tiling, plan)?
            }
            _ => self.decode_raw(&self.unscale(latents)?, plan)?,
        };
        if !all_finite(&pixels)? {
            return Err(SdError::NotFinite {
                part: Part::Vae,
                dtype: self.dtype,
            });
        }
        Ok(to_unit_range(&pixels)?)
    }

    /// The decoder's dtype (f32 for a VAE that upcasts).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The decoder's output for `latents`, one tile of `tiling` at a time, blended: in
    /// `[-1, 1]` (roughly), as [`Self::decode_raw`]'s.
    fn decode_in_tiles(&self, latents: &Tensor, tiling: Tiling, plan: Plan) -> Result<Tensor> {
        let (batch, _, height, width) = latents.dims4()?;
        let latents = self.unscale(latents)?;
        let rows = tiling.starts(height);
        let columns = tiling.starts(width);
        let mut image: Option<Tensor> = None;
        for &top in &rows {
            let bottom = (top + tiling.tile).min(height);
            for &left in &columns {
                let right = (left + tiling.tile).min(width);
                let tile = latents.i((.., .., top..bottom, left..right))?;
                let pixels = self.decode_raw(&tile, plan)?;
                let (_, channels, tile_h, tile_w) = pixels.dims4()?;
                // Pixels per latent cell, from what the decoder made.
                let scale = tile_h / (bottom - top);
                let blend = tiling.overlap * scale;
                let weights = blend_weights(
                    tile_h,
                    top > 0,
                    bottom < height,
                    tile_w,
                    left > 0,
                    right < width,
                    blend,
                )?
                .to_device(pixels.device())?;
                let weighted = pixels.broadcast_mul(&weights)?;
                let whole = match image.take() {
                    Some(image) => image,
                    None => Tensor::zeros(
                        (batch, channels, height * scale, width * scale),
                        DType::F32,
                        pixels.device(),
                    )?,
                };
                let (y, x) = (top * scale, left * scale);
                let region = [0..batch, 0..channels, y..y + tile_h, x..x + tile_w];
                let sum = (whole.i((.., .., y..y + tile_h, x..x + tile_w))? + weighted)?;
                image = Some(whole.slice_assign(&region, &sum)?);
            }
        }
        match image {
            Some(image) => Ok(image),
            None => candle_core::bail!("an empty latent has no tiles"),
        }
    }

    /// The model's own scale and shift undone, in the decoder's dtype.
    fn unscale(&self, latents: &Tensor) -> Result<Tensor> {
        ((latents / self.scaling_factor)? + self.shift_factor)?.to_dtype(self.dtype)
    }

    /// The decoder's output in f32, in `[-1, 1]` (roughly).
    fn decode_raw(&self, latents: &Tensor, plan: Plan) -> Result<Tensor> {
        self.decoder.forward(latents, plan)?.to_dtype(DType::F32)
    }
}

fn to_unit_range(pixels: &Tensor) -> Result<Tensor> {
    ((pixels / 2.0)? + 0.5)?.clamp(0.0, 1.0)
}

/// A tile's blend weights `(1, 1, h, w)`: a linear ramp over `blend` pixels on each side
/// that overlaps a neighbour, 1 elsewhere. Where two tiles overlap, their ramps add up to
/// exactly 1, so no seam and no renormalisation.
fn blend_weights(
    height: usize,
    above: bool,
    below: bool,
    width: usize,
    left: bool,
    right: bool,
    blend: usize,
) -> Result<Tensor> {
    let ramp = |length: usize, rises: bool, falls: bool| -> Vec<f32> {
        (0..length)
            .map(|at| {
                let mut weight = 1.0_f32;
                if rises && at < blend {
                    weight *= (at as f32 + 0.5) / blend as f32;
                }
                let from_end = length - 1 - at;
                if falls && from_end < blend {
                    weight *= (from_end as f32 + 0.5) / blend as f32;
                }
                weight
            })
            .collect()
    };
    let rows = ramp(height, above, below);
    let columns = ramp(width, left, right);
    let weights: Vec<f32> = rows
        .iter()
        .flat_map(|row| columns.iter().map(move |column| row * column))
        .collect();
    Tensor::from_vec(weights, (1, 1, height, width), &candle_core::Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_side_and_overlap_by_the_stated_amount() {
        let tiling = Tiling::DEFAULT;
        assert_eq!(tiling.starts(64), vec![0]);
        assert_eq!(tiling.starts(65), vec![0, 48]);
        assert_eq!(tiling.starts(128), vec![0, 48, 96]);
        for length in 1..300 {
            let starts = tiling.starts(length);
            assert!(
                starts
                    .last()
                    .is_some_and(|last| last + tiling.tile >= length)
            );
            for pair in starts.windows(2) {
                assert_eq!(pair[1] - pair[0], tiling.tile - tiling.overlap);
            }
        }
    }

    #[test]
    fn overlapping_ramps_add_up_to_one() {
        // Two tiles of 8 pixels overlapping by 4: the second starts at 4.
        let first = blend_weights(1, false, false, 8, false, true, 4).unwrap();
        let second = blend_weights(1, false, false, 8, true, false, 4).unwrap();
        let first: Vec<f32> = first.flatten_all().unwrap().to_vec1().unwrap();
        let second: Vec<f32> = second.flatten_all().unwrap().to_vec1().unwrap();
        for at in 0..4 {
            assert!((first[at] - 1.0).abs() < 1e-6);
            assert!((first[4 + at] + second[at] - 1.0).abs() < 1e-6, "{at}");
            assert!((second[4 + at] - 1.0).abs() < 1e-6);
        }
    }
}

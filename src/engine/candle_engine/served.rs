//! A model folder the engine serves ([`ServedModel`]), checked once ([`check_folder`]), and
//! what it takes: its weights in memory by part (the text encoders' and the VAE's shares),
//! what a visiting text encoder brings onto the device ([`visit_bytes`]), and what its jobs
//! take beside the weights. Placement ([`super::placement`]) reads these; the engine updates
//! them when a model's VAE upcasts or it widens to f32.

use std::path::{Path, PathBuf};

use candle_core::DType;

use crate::engine::device::Precision;
use crate::engine::sd::TextPlacement;
use crate::engine::sd::model_folder::TextEncoderConfig;
use crate::engine::sd::working_memory::WorkingMemory;

/// A model folder that passed the checks.
#[derive(Clone, Debug)]
pub(super) struct ServedModel {
    pub(super) root: PathBuf,
    /// Bytes its weights take in memory at the engine's dtype (an estimate).
    pub(super) memory_bytes: u64,
    /// Of which its text encoders'.
    pub(super) text_bytes: u64,
    /// What a visiting text encoder brings onto the device at most, the larger one's
    /// ([`TextPlacement::Visiting`], [`visit_bytes`]).
    pub(super) visit_bytes: u64,
    /// Of which its VAE's.
    pub(super) vae_bytes: u64,
    /// What its VAE decodes in: f32 for one that upcasts, or that overflowed in f16 here.
    pub(super) vae_dtype: DType,
    /// What it loads in: the device's, or f32 arithmetic over f16 weights once its UNet
    /// overflowed in f16 here ([`CandleEngine::widen`]).
    pub(super) precision: Precision,
    /// What a job takes on top of the weights.
    pub(super) working: WorkingMemory,
}

impl ServedModel {
    /// Its VAE in f32 from now on (it overflowed in f16): twice the VAE's weights, and
    /// decodes in f32.
    pub(super) fn upcast_vae(&mut self) {
        if self.vae_dtype == DType::F32 {
            return;
        }
        let upcast_bytes = self.vae_bytes / self.vae_dtype.size_in_bytes() as u64 * 4;
        self.memory_bytes = self.memory_bytes - self.vae_bytes + upcast_bytes;
        self.vae_bytes = upcast_bytes;
        self.vae_dtype = DType::F32;
        self.working = self.working.clone().with_vae_dtype(DType::F32);
    }

    /// The bytes its weights take on the device with its text encoders where `text` says.
    pub(super) fn device_bytes(&self, text: TextPlacement) -> u64 {
        match text {
            TextPlacement::WithModel => self.memory_bytes,
            TextPlacement::Visiting | TextPlacement::Cpu => {
                self.memory_bytes.saturating_sub(self.text_bytes)
            }
        }
    }

    /// What its text encoders bring onto the device for a prompt where `text` says, beside
    /// the weights that stay.
    pub(super) fn visiting_bytes(&self, text: TextPlacement) -> u64 {
        match text {
            TextPlacement::Visiting => self.visit_bytes,
            TextPlacement::WithModel | TextPlacement::Cpu => 0,
        }
    }
}

/// What a text encoder of `weight_bytes` brought onto the device needs while it encodes: its
/// weights; where its file holds another dtype than the model's (`converted`: each tensor
/// comes onto the device as stored, then is converted), its largest tensor, the token
/// embedding, once more in f32; and a layer's activations over its tokens, in f32, twice
/// over for what the allocator rounds up and frees late: the hidden, query, key, value and
/// output states, the MLP's two wide ones, and the scores (SDXL's second encoder: about
/// 12 MB).
fn visit_bytes(weight_bytes: u64, converted: bool, config: &TextEncoderConfig) -> u64 {
    let tokens = config.max_position_embeddings;
    let layer_values = tokens * (6 * config.hidden_size + 2 * config.intermediate_size)
        + config.num_attention_heads * tokens * tokens;
    let stored_embedding = if converted {
        config.vocab_size * config.hidden_size
    } else {
        0
    };
    weight_bytes + 4 * (stored_embedding + 2 * layer_values) as u64
}

/// The folder's checks (configs, weight files, tensor names and shapes), its weights' size
/// in memory held in `precision` (its norms' few f32 values where it widens are not
/// counted: a few thousandths), and what its jobs take beside them.
pub(super) fn check_folder(root: &Path, precision: Precision) -> Result<ServedModel, String> {
    // Configs, and every tensor the architecture needs with its shape (headers only).
    let folder = crate::engine::sd::open_checked(root).map_err(|error| error.to_string())?;
    let files = folder
        .weight_files(precision.weights)
        .map_err(|error| error.to_string())?;
    // A weight file's size as stored, and in memory held in `dtype`.
    let sizes = |path: &PathBuf, dtype: DType| -> Result<(u64, u64), String> {
        let stored = std::fs::metadata(path)
            .map_err(|error| format!("{}: {error}", path.display()))?
            .len();
        let half_file = path
            .file_name()
            .is_some_and(|name| name.to_string_lossy().contains(".fp16."));
        // An f32 file loaded in f16 takes half its size; an f16 file loaded in f32 twice.
        let in_memory = match (half_file, dtype) {
            (false, DType::F16 | DType::BF16) => stored / 2,
            (true, DType::F32) => stored * 2,
            _ => stored,
        };
        Ok((stored, in_memory))
    };
    let in_memory = |path: &PathBuf, dtype: DType| sizes(path, dtype).map(|(_, bytes)| bytes);
    let mut text_bytes = 0;
    let mut most_visiting = 0;
    let encoders = [
        Some((&files.text_encoder, &folder.text_encoder)),
        files
            .text_encoder_2
            .as_ref()
            .zip(folder.text_encoder_2.as_ref()),
    ];
    for (path, config) in encoders.into_iter().flatten() {
        let (stored, bytes) = sizes(path, precision.weights)?;
        text_bytes += bytes;
        most_visiting = most_visiting.max(visit_bytes(bytes, bytes != stored, config));
    }
    // A VAE that must upcast (SDXL's) runs in f32 on a GPU.
    let vae_precision = crate::engine::sd::vae_precision(&folder, precision);
    let vae_dtype = vae_precision.compute;
    let vae_bytes = in_memory(&files.vae, vae_precision.weights)?;
    let bytes = text_bytes + in_memory(&files.unet, precision.weights)? + vae_bytes;
    Ok(ServedModel {
        root: root.to_owned(),
        memory_bytes: bytes,
        text_bytes,
        visit_bytes: most_visiting,
        vae_bytes,
        vae_dtype,
        precision,
        working: WorkingMemory::of(&folder, precision),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxls_second_text_encoder_visits_an_8_gb_card_beside_the_rest_of_the_model() {
        // OpenCLIP ViT-bigG's text tower, as SDXL's `text_encoder_2/config.json` has it.
        let big_g: TextEncoderConfig = serde_json::from_str(
            r#"{"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120,
                "num_hidden_layers": 32, "num_attention_heads": 20, "hidden_act": "gelu",
                "projection_dim": 1280}"#,
        )
        .unwrap();
        let weights = 1_390_000_000; // in f16
        let from_f16_file = visit_bytes(weights, false, &big_g);
        // 77 tokens' activations beside the weights: about 12 MB.
        let activations = from_f16_file - weights;
        assert!(
            (11_000_000..13_000_000).contains(&activations),
            "{activations}"
        );
        // From an f32 file, its token embedding comes in f32 first: 253 MB more.
        assert_eq!(
            visit_bytes(weights, true, &big_g) - from_f16_file,
            49408 * 1280 * 4
        );
        // What the GPU bench leaves free of an 8 GB card (7.4 GB): the UNet and the f32 VAE
        // (5.47 GB) with it fit; the whole model (7.11 GB) beside a job does not (the
        // working-memory test of that card).
        assert!(5_470_000_000 + from_f16_file <= 7_400_000_000);
    }
}

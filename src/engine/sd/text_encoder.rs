//! The CLIP text encoder, built from its own `config.json` (transformers' `CLIPTextModel`
//! and `CLIPTextModelWithProjection`).
//!
//! Ours rather than candle's because the pipelines need what candle's does not give: any
//! width and depth from the config, exact-erf GELU where the config says `gelu` (candle's
//! stable-diffusion CLIP uses the tanh approximation), the penultimate layer's hidden state
//! (SDXL conditions on it) and the projected pooled output of SDXL's second encoder.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use super::model_folder::TextEncoderConfig;
use super::weights::{Embedding, Linear};
use crate::engine::device::CachedUploads;

/// What one forward pass gives.
pub struct TextEncoding {
    /// The last layer's output after the final layer norm (SD 1.x/2.x condition on this).
    pub last_hidden_state: Tensor,
    /// The second-to-last layer's output, before any norm (SDXL conditions on this).
    pub penultimate_hidden_state: Tensor,
    /// The final-norm state at each prompt's end token, through `text_projection` when the
    /// model has one (SDXL's pooled embedding).
    pub pooled: Tensor,
}

#[derive(Clone, Copy, Debug)]
enum Activation {
    QuickGelu,
    GeluErf,
    GeluTanh,
}

impl Activation {
    fn from_config(name: &str) -> Self {
        match name {
            "quick_gelu" => Self::QuickGelu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            _ => Self::GeluErf,
        }
    }

    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::GeluErf => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
        }
    }
}

struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, config: &TextEncoderConfig) -> Result<Self> {
        let width = config.hidden_size;
        Ok(Self {
            q_proj: Linear::new(vb.pp("q_proj"), width, width)?,
            k_proj: Linear::new(vb.pp("k_proj"), width, width)?,
            v_proj: Linear::new(vb.pp("v_proj"), width, width)?,
            out_proj: Linear::new(vb.pp("out_proj"), width, width)?,
            heads: config.num_attention_heads,
            head_dim: width / config.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let (batch, length, width) = xs.dims3()?;
        let split_heads = |tensor: Tensor| -> Result<Tensor> {
            tensor
                .reshape((batch, length, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let queries = split_heads((self.q_proj.forward(xs)? * scale)?)?;
        let keys = split_heads(self.k_proj.forward(xs)?)?;
        let values = split_heads(self.v_proj.forward(xs)?)?;
        let scores = queries.matmul(&keys.t()?)?.broadcast_add(causal_mask)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let attended = weights
            .matmul(&values)?
            .transpose(1, 2)?
            .reshape((batch, length, width))?;
        self.out_proj.forward(&attended)
    }
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, config: &TextEncoderConfig) -> Result<Self> {
        let width = config.hidden_size;
        let eps = config.layer_norm_eps;
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(width, eps, vb.pp("layer_norm1"))?,
            self_attn: SelfAttention::new(vb.pp("self_attn"), config)?,
            layer_norm2: candle_nn::layer_norm(width, eps, vb.pp("layer_norm2"))?,
            fc1: Linear::new(vb.pp("mlp.fc1"), width, config.intermediate_size)?,
            fc2: Linear::new(vb.pp("mlp.fc2"), config.intermediate_size, width)?,
            activation: Activation::from_config(&config.hidden_act),
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let attended = self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, causal_mask)?;
        let xs = (xs + attended)?;
        let hidden = self.fc1.forward(&self.layer_norm2.forward(&xs)?)?;
        let hidden = self.fc2.forward(&self.activation.apply(&hidden)?)?;
        xs + hidden
    }
}

pub struct ClipTextEncoder {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    max_positions: usize,
    /// `0..max_positions` and the causal mask over them, on the weights' device, made once:
    /// a CUDA graph of the layers may not upload anything while it is captured.
    positions: Tensor,
    causal_mask: Tensor,
}

/// The layers' two outputs, stacked along the batch ([`ClipTextEncoder::layers`]).
pub struct LayerStates {
    /// `(2·batch, tokens, width)`: the penultimate states, then the last after the final
    /// norm.
    pub stacked: Tensor,
}

impl LayerStates {
    /// `(penultimate, last after the final norm)`, each `(batch, tokens, width)`.
    pub fn split(&self) -> Result<(Tensor, Tensor)> {
        let batch = self.stacked.dim(0)? / 2;
        Ok((
            self.stacked.narrow(0, 0, batch)?,
            self.stacked.narrow(0, batch, batch)?,
        ))
    }
}

impl ClipTextEncoder {
    pub fn new(vb: VarBuilder, config: &TextEncoderConfig) -> Result<Self> {
        // transformers ≤ 4 saved the text model under `text_model.`; 5 saves it at the root.
        let text = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let width = config.hidden_size;
        let layers = (0..config.num_hidden_layers)
            .map(|index| EncoderLayer::new(text.pp(format!("encoder.layers.{index}")), config))
            .collect::<Result<Vec<_>>>()?;
        let text_projection = match (config.has_projection(), config.projection_dim) {
            (true, Some(projection_dim)) => Some(Linear::no_bias(
                vb.pp("text_projection"),
                width,
                projection_dim,
            )?),
            _ => None,
        };
        let max_positions = config.max_position_embeddings;
        let device = vb.device();
        Ok(Self {
            token_embedding: Embedding::new(
                text.pp("embeddings.token_embedding"),
                config.vocab_size,
                width,
            )?,
            position_embedding: Embedding::new(
                text.pp("embeddings.position_embedding"),
                max_positions,
                width,
            )?,
            layers,
            final_layer_norm: candle_nn::layer_norm(
                width,
                config.layer_norm_eps,
                text.pp("final_layer_norm"),
            )?,
            text_projection,
            max_positions,
            positions: Tensor::arange(0u32, max_positions as u32, device)?,
            causal_mask: causal_mask(max_positions, vb.dtype(), device)?,
        })
    }

    /// Encodes a batch of token-id rows (each `max_positions` long). `end_id` marks where
    /// each prompt ends, for the pooled output. The three stages in a row: [`Self::embed`],
    /// [`Self::layers`] and [`Self::pool`].
    pub fn forward(
        &self,
        token_ids: &[Vec<u32>],
        end_id: u32,
        device: &Device,
    ) -> Result<TextEncoding> {
        let embedded = self.embed(token_ids, device)?;
        let (penultimate, last) = self.layers(&embedded)?.split()?;
        self.pool(last, penultimate, token_ids, end_id)
    }

    /// The token and position embeddings of each row of ids, `(batch, tokens, width)`.
    pub fn embed(&self, token_ids: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        let batch = token_ids.len();
        let length = token_ids.first().map_or(0, Vec::len);
        if batch == 0 || length == 0 || length > self.max_positions {
            candle_core::bail!(
                "text encoder needs 1..={} tokens per row",
                self.max_positions
            );
        }
        let flat: Vec<u32> = token_ids.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (batch, length), device)?;
        self.token_embedding.forward(&ids)?.broadcast_add(
            &self
                .position_embedding
                .forward(&self.positions.narrow(0, 0, length)?)?,
        )
    }

    /// Every layer over `embedded` `(batch, tokens, width)`: the penultimate states and the
    /// last after the final norm, stacked. Uploads nothing and reads nothing back, so it can
    /// be captured into a CUDA graph.
    pub fn layers(&self, embedded: &Tensor) -> Result<LayerStates> {
        let length = embedded.dim(1)?;
        // The dims and strides candle uploads per op repeat from prompt to prompt.
        let _uploads = CachedUploads::on(embedded.device());
        let causal_mask = self
            .causal_mask
            .narrow(0, 0, length)?
            .narrow(1, 0, length)?
            .contiguous()?;
        // hidden_states[-2] is what the last layer reads (the embeddings, for one layer).
        let mut hidden = embedded.clone();
        let mut penultimate = hidden.clone();
        for layer in &self.layers {
            penultimate = hidden;
            hidden = layer.forward(&penultimate, &causal_mask)?;
        }
        let last = self.final_layer_norm.forward(&hidden)?;
        Ok(LayerStates {
            stacked: Tensor::cat(&[&penultimate, &last], 0)?,
        })
    }

    /// The encoding of `token_ids` from its layers' states: the final-norm state at each
    /// row's first `end_id` (transformers pools at the same position), projected where the
    /// model has a projection.
    pub fn pool(
        &self,
        last_hidden_state: Tensor,
        penultimate_hidden_state: Tensor,
        token_ids: &[Vec<u32>],
        end_id: u32,
    ) -> Result<TextEncoding> {
        let pooled = token_ids
            .iter()
            .enumerate()
            .map(|(row, ids)| {
                let end = ids
                    .iter()
                    .position(|&id| id == end_id)
                    .unwrap_or(ids.len().saturating_sub(1));
                last_hidden_state.get(row)?.get(end)
            })
            .collect::<Result<Vec<_>>>()?;
        let pooled = Tensor::stack(&pooled, 0)?;
        let pooled = match &self.text_projection {
            Some(projection) => projection.forward(&pooled)?,
            None => pooled,
        };
        Ok(TextEncoding {
            last_hidden_state,
            penultimate_hidden_state,
            pooled,
        })
    }
}

/// `0` on and below the diagonal, the dtype's most negative value above it.
fn causal_mask(length: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..length)
        .flat_map(|row| (0..length).map(move |column| if column > row { f32::MIN } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (length, length), device)?.to_dtype(dtype)
}

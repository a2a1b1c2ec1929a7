//! Stable Diffusion text-to-image on candle: SD 1.x, 2.x (v-prediction included), SD-Turbo,
//! SDXL and SDXL-Turbo from any diffusers-layout folder.
//!
//! One straight sequence per job ([`StableDiffusion::generate`]): tokenize → text encoder(s)
//! → seeded initial latents → denoise loop with classifier-free guidance (skipped when the
//! guidance is ≤ 1) → VAE decode → RGB. The stages are public on their own so the parity
//! tests can check each against the reference. Numbers that overflowed never become an
//! image: the decode's output is checked ([`StableDiffusion::decode_each`]).

pub mod conv;
pub mod model_folder;
pub mod norm;
pub mod pointwise;
mod prompt_cache;
pub mod resnet;
pub mod schedulers;
mod step_graph;
pub mod text_encoder;
pub(crate) mod tokenizer;
pub mod unet;
pub mod unet_blocks;
pub mod vae;
pub mod vae_decoder;
pub mod warmup;
mod weight_check;
pub mod weights;
pub mod working_memory;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{D, DType, Device, Tensor};

use self::model_folder::{Family, FolderError, ModelFolder, TextEncoderConfig, Unrunnable};
use self::prompt_cache::{EncodedPrompt, PromptCache};
use self::schedulers::{NoiseSchedule, Sampler};
/// The variable that turns the CUDA graphs off (`0`).
pub use self::step_graph::SWITCH as STEP_GRAPHS_SWITCH;
use self::step_graph::{GraphCache, StepGraphs};
use self::text_encoder::{ClipTextEncoder, LayerStates, TextEncoding};
use self::tokenizer::ClipTokenizer;
use self::unet::{TextTimeConditioning, Unet};
use self::vae::Vae;
use self::working_memory::{Convolutions, Plan};
use super::device::{CachedUploads, Precision};
use super::gpu_memory;
use super::noise::NoiseSource;
use super::profile::{self, Part, Work};
use crate::vocab::job::{JobSpec, Scheduler};

/// Why loading or running failed.
#[derive(Debug, thiserror::Error)]
pub enum SdError {
    #[error(transparent)]
    Folder(#[from] FolderError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("stopped before it finished")]
    Cancelled,
    /// A part's output was not all finite numbers: they overflowed in `dtype` (f16 tops out
    /// at 65504), and the image would have come out black or flat.
    #[error(
        "the {}'s numbers overflowed in {} (NaN or infinity), so no image was made",
        part.label(),
        dtype.as_str()
    )]
    NotFinite { part: Part, dtype: DType },
}

/// Whether every value of `tensor` is a finite number: times zero, a finite value is 0 and
/// NaN or an infinity is NaN, so the sum of the products is 0 exactly when all are (a sum
/// of the values themselves could overflow). Two kernels and one number read back.
pub fn all_finite(tensor: &Tensor) -> candle_core::Result<bool> {
    Ok(tensor
        .to_dtype(DType::F32)?
        .affine(0.0, 0.0)?
        .sum_all()?
        .to_scalar::<f32>()?
        == 0.0)
}

/// One text-to-image request.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    /// Image `k` of the request uses seed `seed + k`, so it equals image 0 of a request
    /// with that seed.
    pub seed: u64,
    pub num_images: usize,
    /// `None`: the model's default sampler.
    pub scheduler: Option<Scheduler>,
    /// How it bounds its working memory: attention in chunks and convolutions in bands
    /// (exact), the decode in tiles (a slightly different image). Default: all whole.
    pub memory: Plan,
    /// Whether the GPU's pool hands back what the steps freed before the decode allocates
    /// (the engine's placement decides: where the two would not fit held together).
    pub hand_back_before_decode: bool,
}

impl From<&JobSpec> for Request {
    fn from(spec: &JobSpec) -> Self {
        Self {
            prompt: spec.prompt.clone(),
            negative_prompt: spec.negative_prompt.clone(),
            width: spec.width as usize,
            height: spec.height as usize,
            steps: spec.steps as usize,
            guidance_scale: spec.guidance_scale,
            seed: spec.seed,
            num_images: spec.num_images as usize,
            scheduler: spec.scheduler,
            memory: Plan::default(),
            hand_back_before_decode: false,
        }
    }
}

/// Where a running request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Encoding,
    /// Step `n` of `total` is done.
    Denoising {
        step: usize,
        total: usize,
    },
    Decoding,
}

/// How the denoise loop runs each step.
#[derive(Clone, Copy, Debug)]
pub struct DenoiseSettings {
    /// Classifier-free guidance (used when the conditioning is guided).
    pub guidance_scale: f64,
    /// How the UNet bounds its attention scores and convolution columns (tiles are the
    /// decode's).
    pub plan: Plan,
}

/// The prompt's conditioning, batched `[negative…, positive…]` when guided.
pub struct Conditioning {
    pub hidden_states: Tensor,
    /// SDXL: `(pooled text embeddings, time ids)`.
    pub text_time: Option<(Tensor, Tensor)>,
    pub guided: bool,
}

struct TextStack {
    /// Which encoder it is, for the log ("the second text encoder").
    name: &'static str,
    tokenizer: ClipTokenizer,
    encoder: EncoderWeights,
    /// Where the encoder runs (the model's device, or the CPU).
    device: Device,
    /// The encoder's layers as a CUDA graph, kept between jobs ([`step_graph`]).
    graphs: GraphCache,
    /// How many times a visiting encoder came onto the device.
    visits: AtomicU64,
}

/// A text encoder's weights: loaded once, or brought onto the device for each job's prompts.
enum EncoderWeights {
    Resident(ClipTextEncoder),
    /// Its weight file, memory-mapped: loaded onto the stack's device for each job's prompts
    /// and let go after them ([`TextPlacement::Visiting`]).
    Visiting {
        file: PathBuf,
        config: TextEncoderConfig,
        precision: Precision,
    },
}

impl TextStack {
    fn new(
        name: &'static str,
        tokenizer: ClipTokenizer,
        encoder: EncoderWeights,
        device: &Device,
    ) -> Self {
        Self {
            name,
            tokenizer,
            encoder,
            device: device.clone(),
            graphs: GraphCache::new(name),
            visits: AtomicU64::new(0),
        }
    }

    /// Each prompt's ids for this tokenizer through the encoder, in turn. A visiting encoder
    /// comes onto the device once for all of them (a job's prompt and negative prompt), and
    /// its memory goes back to the driver after them, before the job's steps allocate: the
    /// job's plan counted the device without it.
    fn encode_each(&self, prompts: &[&[u32]]) -> Result<Vec<TextEncoding>, SdError> {
        match &self.encoder {
            EncoderWeights::Resident(encoder) => prompts
                .iter()
                .map(|ids| self.encode_with(encoder, ids, true))
                .collect(),
            EncoderWeights::Visiting {
                file,
                config,
                precision,
            } => {
                let started = std::time::Instant::now();
                let encoder =
                    ClipTextEncoder::new(weights::mapped(file, *precision, &self.device)?, config)?;
                self.visits.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    "{} came onto the device in {:.0} ms, for {} prompt(s)",
                    self.name,
                    started.elapsed().as_secs_f64() * 1e3,
                    prompts.len()
                );
                // No graph: it would read weights let go after these prompts.
                let encodings = prompts
                    .iter()
                    .map(|ids| self.encode_with(&encoder, ids, false))
                    .collect();
                drop(encoder);
                gpu_memory::trim_pool(&self.device);
                encodings
            }
        }
    }

    /// `ids` through `encoder`: embedded, through the layers (one launch of a kept CUDA
    /// graph where `graphs` allows it and that pays: a text encoding is a one-step job whose
    /// input is the embedded prompt), pooled.
    fn encode_with(
        &self,
        encoder: &ClipTextEncoder,
        ids: &[u32],
        graphs: bool,
    ) -> Result<TextEncoding, SdError> {
        let token_ids = [ids.to_vec()];
        let embedded = encoder.embed(&token_ids, &self.device)?;
        let stacked = {
            let mut graphs = StepGraphs::for_job(
                &self.graphs,
                &self.device,
                graphs,
                format!("{:?} {:?}", embedded.dims(), embedded.dtype()),
                &[],
            );
            let layers = |embedded: &Tensor, _timesteps: &Tensor, _job_inputs: &[Tensor]| {
                Ok(encoder.layers(embedded)?.stacked)
            };
            // The layers read no timestep: any will do.
            graphs.step(&layers, &embedded, 0.0)?
        };
        let (penultimate, last) = LayerStates { stacked }.split()?;
        Ok(encoder.pool(last, penultimate, &token_ids, self.tokenizer.end_id())?)
    }
}

/// Where a pipeline's text encoders live. Encoding is one pass over 77 tokens per prompt, so
/// where GPU memory is tight their weights need not stay beside the UNet and the decode
/// (SDXL's two encoders are 1.6 GB in f16).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TextPlacement {
    /// On the model's device, in its dtype.
    #[default]
    WithModel,
    /// Brought onto the model's device for each job's prompts (its prompt and negative
    /// prompt together, those not kept from an earlier job), one encoder at a time, from
    /// their memory-mapped weight files, and let go after them: the device holds them only
    /// while the prompts are encoded, before the job's steps allocate. Costs such a job its
    /// weights' upload (a PCIe copy: about 0.1–0.2 s for SDXL's, against a second or so a
    /// prompt on the CPU).
    Visiting,
    /// On the CPU in f32; their output moves to the model's device.
    Cpu,
}

/// A loaded pipeline: weights on `device`, ready to run jobs.
pub struct StableDiffusion {
    folder: ModelFolder,
    device: Device,
    /// What its layers compute in (its weights may be held narrower: [`weights`]).
    dtype: DType,
    text: TextStack,
    text_2: Option<TextStack>,
    unet: Unet,
    /// Swapped for an f32 one when it overflows in f16 ([`Self::upcast_vae`]).
    vae: Mutex<Arc<Vae>>,
    /// Its weights, for that.
    vae_weights: PathBuf,
    schedule: NoiseSchedule,
    /// The UNet's CUDA graph, kept between jobs ([`step_graph`]).
    graphs: GraphCache,
    /// The last few jobs' prompts, encoded ([`prompt_cache`]).
    prompts: PromptCache,
}

impl StableDiffusion {
    /// Loads the folder's weights (memory-mapped safetensors) onto `device` in `precision`
    /// (a dtype: everything in it).
    pub fn load(
        root: &Path,
        device: &Device,
        precision: impl Into<Precision>,
    ) -> Result<Self, SdError> {
        Self::load_placed(root, device, precision, TextPlacement::WithModel)
    }

    /// The same, with the text encoders where `text` says.
    pub fn load_placed(
        root: &Path,
        device: &Device,
        precision: impl Into<Precision>,
        text: TextPlacement,
    ) -> Result<Self, SdError> {
        let precision = precision.into();
        let dtype = precision.compute;
        let folder = ModelFolder::open(root)?;
        let files = folder.weight_files(precision.weights)?;
        let schedule = noise_schedule(&folder)?;
        let (text_device, text_precision) = match text {
            TextPlacement::WithModel | TextPlacement::Visiting => (device.clone(), precision),
            TextPlacement::Cpu => (Device::Cpu, Precision::uniform(DType::F32)),
        };
        let encoder = |file: &Path, config: &TextEncoderConfig| -> Result<_, SdError> {
            Ok(match text {
                TextPlacement::Visiting => EncoderWeights::Visiting {
                    file: file.to_owned(),
                    config: config.clone(),
                    precision: text_precision,
                },
                TextPlacement::WithModel | TextPlacement::Cpu => {
                    EncoderWeights::Resident(ClipTextEncoder::new(
                        weights::mapped(file, text_precision, &text_device)?,
                        config,
                    )?)
                }
            })
        };

        let max_length = folder.text_encoder.max_position_embeddings;
        let text_stack = TextStack::new(
            "the text encoder",
            ClipTokenizer::load(root, "tokenizer", max_length)?,
            encoder(&files.text_encoder, &folder.text_encoder)?,
            &text_device,
        );
        let text_2 = match (&folder.text_encoder_2, &files.text_encoder_2) {
            (Some(config), Some(path)) => Some(TextStack::new(
                "the second text encoder",
                ClipTokenizer::load(root, "tokenizer_2", config.max_position_embeddings)?,
                encoder(path, config)?,
                &text_device,
            )),
            _ => None,
        };
        let unet = Unet::new(
            weights::mapped(&files.unet, precision, device)?,
            &folder.unet,
        )?;
        // A VAE that overflows in f16 (SDXL's, force_upcast) decodes in f32: no black images.
        let vae = load_vae(
            &folder,
            &files.vae,
            vae_precision(&folder, precision),
            device,
        )?;
        Ok(Self {
            device: device.clone(),
            dtype,
            text: text_stack,
            text_2,
            unet,
            vae: Mutex::new(Arc::new(vae)),
            vae_weights: files.vae,
            folder,
            schedule,
            graphs: GraphCache::new("the UNet's steps"),
            prompts: PromptCache::default(),
        })
    }

    pub fn family(&self) -> Family {
        self.folder.family
    }

    pub fn default_sampler(&self) -> Scheduler {
        self.schedule.default_sampler()
    }

    pub fn noise_schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// Runs a whole request: the one sequence every job goes through.
    pub fn generate(
        &self,
        request: &Request,
        progress: &mut dyn FnMut(Stage),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Vec<image::RgbImage>, SdError> {
        let guided = request.guidance_scale > 1.0;

        progress(Stage::Encoding);
        let conditioning = self.encode_prompt(
            &request.prompt,
            &request.negative_prompt,
            guided,
            request.num_images,
            (request.height, request.width),
        )?;

        let scheduler = request.scheduler.unwrap_or_else(|| self.default_sampler());
        let mut sampler = schedulers::build(scheduler, &self.schedule, request.steps);
        let factor = self.folder.vae.scale_factor();
        let shape = [
            1,
            self.folder.vae.latent_channels,
            request.height / factor,
            request.width / factor,
        ];
        // One generator per image: its initial noise, then its ancestral noise.
        let mut sources: Vec<NoiseSource> = (0..request.num_images as u64)
            .map(|image| NoiseSource::new(request.seed.wrapping_add(image)))
            .collect();
        let initial = Tensor::cat(
            &sources
                .iter_mut()
                .map(|source| source.tensor(&shape, &self.device))
                .collect::<candle_core::Result<Vec<_>>>()?,
            0,
        )?;
        let mut noise = || -> candle_core::Result<Tensor> {
            let parts = sources
                .iter_mut()
                .map(|source| source.tensor(&shape, &self.device))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)
        };

        let latents = self.denoise(
            &conditioning,
            &initial,
            sampler.as_mut(),
            DenoiseSettings {
                guidance_scale: request.guidance_scale,
                plan: request.memory,
            },
            &mut noise,
            &mut |step, total| {
                progress(Stage::Denoising { step, total });
                !cancelled()
            },
        )?;

        if request.hand_back_before_decode {
            gpu_memory::trim_pool(&self.device);
        }
        progress(Stage::Decoding);
        let pixels = self.decode_each(&latents, request.memory)?;
        to_images(&pixels)
    }

    /// The text conditioning for `prompt` (and `negative` when guided), repeated for
    /// `images` images. `size` is `(height, width)`, for SDXL's size conditioning.
    pub fn encode_prompt(
        &self,
        prompt: &str,
        negative: &str,
        guided: bool,
        images: usize,
        size: (usize, usize),
    ) -> Result<Conditioning, SdError> {
        // SDXL conditions an empty negative prompt on zeros, not on the encoded "".
        let zero_negative = negative.is_empty() && self.folder.index.force_zeros_for_empty_prompt;
        // Both prompts through the encoders at once: visiting ones come onto the device once.
        let ((positive, positive_pooled), encoded_negative) = if guided && !zero_negative {
            let [positive, negative] = self.encode_texts([prompt, negative])?;
            (positive, Some(negative))
        } else {
            let [positive] = self.encode_texts([prompt])?;
            (positive, None)
        };
        let repeat_rows = |tensor: &Tensor| -> candle_core::Result<Tensor> {
            let mut counts = vec![1; tensor.rank()];
            counts[0] = images;
            tensor.repeat(counts.as_slice())
        };
        let (hidden_states, pooled) = if guided {
            let (negative, negative_pooled) = match encoded_negative {
                Some(encoded) => encoded,
                None => (
                    positive.zeros_like()?,
                    positive_pooled
                        .as_ref()
                        .map(Tensor::zeros_like)
                        .transpose()?,
                ),
            };
            let hidden_states =
                Tensor::cat(&[repeat_rows(&negative)?, repeat_rows(&positive)?], 0)?;
            let pooled = match (negative_pooled, positive_pooled) {
                (Some(negative), Some(positive)) => Some(Tensor::cat(
                    &[repeat_rows(&negative)?, repeat_rows(&positive)?],
                    0,
                )?),
                _ => None,
            };
            (hidden_states, pooled)
        } else {
            (
                repeat_rows(&positive)?,
                positive_pooled.as_ref().map(repeat_rows).transpose()?,
            )
        };
        let text_time = match pooled {
            Some(pooled) => {
                let (height, width) = size;
                let (h, w) = (height as f32, width as f32);
                let rows = pooled.dim(0)?;
                // Original size, crop top-left (0, 0), target size: the reference defaults.
                let time_ids = Tensor::new(&[h, w, 0.0, 0.0, h, w], &self.device)?
                    .unsqueeze(0)?
                    .repeat((rows, 1))?;
                Some((pooled, time_ids))
            }
            None => None,
        };
        Ok(Conditioning {
            hidden_states,
            text_time,
            guided,
        })
    }

    /// One prompt through the text encoder(s): `(hidden states (1, L, C), pooled (1, P))`,
    /// on the model's device in its dtype. SD 1.x/2.x use the last layer; SDXL concatenates
    /// both encoders' penultimate layers and pools the second. A prompt one of the last few
    /// jobs encoded is not encoded again ([`prompt_cache`]).
    pub fn encode_text(&self, prompt: &str) -> Result<(Tensor, Option<Tensor>), SdError> {
        let [encoded] = self.encode_texts([prompt])?;
        Ok(encoded)
    }

    /// Several prompts through the text encoder(s) at once, as [`Self::encode_text`] each:
    /// an encoder that visits the device comes once for all of them.
    pub fn encode_texts<const N: usize>(
        &self,
        prompts: [&str; N],
    ) -> Result<[(Tensor, Option<Tensor>); N], SdError> {
        let token_ids = prompts
            .iter()
            .map(|prompt| {
                let mut rows = vec![self.token_ids(prompt, false)?];
                if self.text_2.is_some() {
                    rows.push(self.token_ids(prompt, true)?);
                }
                Ok(rows)
            })
            .collect::<Result<Vec<_>, SdError>>()?;
        let encoded = self
            .prompts
            .get_or_encode_each(&token_ids, |missing| self.run_text_encoders(missing))?;
        let encoded: Vec<_> = encoded
            .into_iter()
            .map(|prompt| (prompt.hidden_states, prompt.pooled))
            .collect();
        let count = encoded.len();
        encoded.try_into().map_err(|_| {
            SdError::Tensor(candle_core::Error::Msg(format!(
                "{count} encodings for {N} prompts"
            )))
        })
    }

    /// How many prompts the text encoders ran for since the pipeline loaded (a prompt found
    /// among the recent ones is not counted).
    pub fn prompts_encoded(&self) -> u64 {
        self.prompts.encoded()
    }

    /// How many times its text encoders came onto the device since it loaded, counting
    /// each encoder's coming ([`TextPlacement::Visiting`]; none where they stay).
    pub fn text_encoder_visits(&self) -> u64 {
        [Some(&self.text), self.text_2.as_ref()]
            .into_iter()
            .flatten()
            .map(|stack| stack.visits.load(Ordering::Relaxed))
            .sum()
    }

    /// The text encoder(s) over prompts' token ids (each prompt one row per tokenizer): one
    /// encoder after the other, each over every prompt.
    fn run_text_encoders(&self, prompts: &[Vec<Vec<u32>>]) -> Result<Vec<EncodedPrompt>, SdError> {
        let _stretch = profile::stretch(Work::TextEncoder, &self.device);
        let encoders = 1 + usize::from(self.text_2.is_some());
        let rows = |row: usize| -> Result<Vec<&[u32]>, SdError> {
            prompts
                .iter()
                .map(|token_ids| match token_ids.as_slice() {
                    rows if rows.len() == encoders => Ok(rows[row].as_slice()),
                    rows => Err(SdError::Tokenizer(format!(
                        "{} rows of token ids for {encoders} text encoder(s)",
                        rows.len()
                    ))),
                })
                .collect()
        };
        let to_model = |tensor: Tensor| -> candle_core::Result<Tensor> {
            tensor.to_device(&self.device)?.to_dtype(self.dtype)
        };
        let first = self.text.encode_each(&rows(0)?)?;
        match &self.text_2 {
            None => first
                .into_iter()
                .map(|encoding| {
                    Ok(EncodedPrompt {
                        hidden_states: to_model(encoding.last_hidden_state)?,
                        pooled: None,
                    })
                })
                .collect(),
            Some(stack) => {
                let second = stack.encode_each(&rows(1)?)?;
                first
                    .into_iter()
                    .zip(second)
                    .map(|(first, second)| {
                        let hidden = Tensor::cat(
                            &[
                                &first.penultimate_hidden_state,
                                &second.penultimate_hidden_state,
                            ],
                            D::Minus1,
                        )?;
                        Ok(EncodedPrompt {
                            hidden_states: to_model(hidden)?,
                            pooled: Some(to_model(second.pooled)?),
                        })
                    })
                    .collect()
            }
        }
    }

    /// The token ids the first (`second == false`) or second tokenizer gives `prompt`.
    pub fn token_ids(&self, prompt: &str, second: bool) -> Result<Vec<u32>, SdError> {
        let stack = if second {
            self.text_2
                .as_ref()
                .ok_or_else(|| SdError::Tokenizer("this model has one tokenizer".to_owned()))?
        } else {
            &self.text
        };
        stack
            .tokenizer
            .encode(prompt)
            .map_err(|error| SdError::Tokenizer(error.to_string()))
    }

    /// One UNet evaluation (for parity tests and benchmarks).
    pub fn unet_forward(
        &self,
        latents: &Tensor,
        timestep: f64,
        hidden_states: &Tensor,
        text_time: Option<(&Tensor, &Tensor)>,
        plan: Plan,
    ) -> Result<Tensor, SdError> {
        let batch = latents.dim(0)?;
        let timesteps = (Tensor::ones(batch, DType::F32, &self.device)? * timestep)?;
        self.unet_forward_at(latents, &timesteps, hidden_states, text_time, plan)
    }

    /// The same at `timesteps` `(batch,)` on the model's device (what a CUDA graph of the
    /// evaluation reads, [`step_graph`]).
    fn unet_forward_at(
        &self,
        latents: &Tensor,
        timesteps: &Tensor,
        hidden_states: &Tensor,
        text_time: Option<(&Tensor, &Tensor)>,
        plan: Plan,
    ) -> Result<Tensor, SdError> {
        let conditioning = text_time.map(|(text_embeds, time_ids)| TextTimeConditioning {
            text_embeds,
            time_ids,
        });
        let _uploads = CachedUploads::on(&self.device);
        Ok(self
            .unet
            .forward_at(
                &latents.to_dtype(self.dtype)?,
                timesteps,
                &hidden_states.to_dtype(self.dtype)?,
                conditioning,
                plan,
            )?
            .to_dtype(DType::F32)?)
    }

    /// The denoise loop from standard-normal `initial` latents (f32). `on_step(done, total)`
    /// runs after each step; returning `false` stops with [`SdError::Cancelled`].
    pub fn denoise(
        &self,
        conditioning: &Conditioning,
        initial: &Tensor,
        sampler: &mut dyn Sampler,
        settings: DenoiseSettings,
        noise: &mut dyn FnMut() -> candle_core::Result<Tensor>,
        on_step: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Tensor, SdError> {
        let timesteps = sampler.timesteps().to_vec();
        let total = timesteps.len();
        let mut latents = (initial.to_dtype(DType::F32)? * sampler.init_noise_sigma())?;
        // What the UNet reads besides the latents and the timestep: the same at every step.
        let mut job_inputs = vec![conditioning.hidden_states.clone()];
        if let Some((pooled, time_ids)) = &conditioning.text_time {
            job_inputs.extend([pooled.clone(), time_ids.clone()]);
        }
        // The evaluations as one CUDA graph, kept between jobs, where that can pay.
        let mut graphs = StepGraphs::for_job(
            &self.graphs,
            &self.device,
            Plan::choices(Convolutions::of(&self.device)).first() == Some(&settings.plan),
            format!(
                "{:?} guided {} inputs {:?} {:?}",
                initial.dims(),
                conditioning.guided,
                job_inputs.iter().map(Tensor::dims).collect::<Vec<_>>(),
                settings.plan
            ),
            &job_inputs,
        );
        let evaluate = |latents: &Tensor, timesteps: &Tensor, job_inputs: &[Tensor]| {
            let [hidden_states, text_time @ ..] = job_inputs else {
                return Err(SdError::Tensor(candle_core::Error::Msg(
                    "a UNet evaluation without its conditioning".to_owned(),
                )));
            };
            let text_time = match text_time {
                [pooled, time_ids] => Some((pooled, time_ids)),
                _ => None,
            };
            self.unet_forward_at(latents, timesteps, hidden_states, text_time, settings.plan)
        };
        for (index, &timestep) in timesteps.iter().enumerate() {
            let input = sampler.scale_model_input(&latents, index)?;
            let input = if conditioning.guided {
                Tensor::cat(&[&input, &input], 0)?
            } else {
                input
            };
            let output = graphs.step(&evaluate, &input, timestep)?;
            latents = {
                // The sampler's arithmetic only: `on_step` (progress, the policy's rest) is not.
                let _stretch = profile::stretch(Work::Sampler, &self.device);
                let prediction = if conditioning.guided {
                    let halves = output.chunk(2, 0)?;
                    let (unconditional, conditional) = (&halves[0], &halves[1]);
                    (unconditional + ((conditional - unconditional)? * settings.guidance_scale)?)?
                } else {
                    output
                };
                sampler.step(&prediction, index, &latents, noise)?
            };
            if !on_step(index + 1, total) {
                return Err(SdError::Cancelled);
            }
        }
        Ok(latents)
    }

    /// Latents to f32 RGB in `[0, 1]`, `(batch, 3, H, W)`, the whole batch at once.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, SdError> {
        self.decode_checked(latents, &|vae| vae.decode(latents, Plan::default()))
    }

    /// The same, one image at a time (a batch's decode needs the batch's memory), each
    /// the way `plan` says (whole or in tiles, convolutions in bands, attention in chunks).
    pub fn decode_each(&self, latents: &Tensor, plan: Plan) -> Result<Tensor, SdError> {
        let _uploads = CachedUploads::on(&self.device);
        self.decode_checked(latents, &|vae| {
            let images = (0..latents.dim(0)?)
                .map(|image| vae.decode(&latents.narrow(0, image, 1)?, plan))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Tensor::cat(&images, 0)?)
        })
    }

    /// `decode` with the pipeline's VAE; where its output is not all finite numbers, the
    /// cause is found: NaN latents are the UNet's doing (the job fails, nothing to retry
    /// here), and a VAE that overflowed in f16 is upcast to f32 ([`Self::upcast_vae`]) and
    /// the decode run again. What A1111 does on a "NaN in VAE"; diffusers upcasts only the
    /// VAEs whose config says they overflow (`force_upcast`, SDXL's), and this finds the
    /// others.
    fn decode_checked(
        &self,
        latents: &Tensor,
        decode: &dyn Fn(&Vae) -> Result<Tensor, SdError>,
    ) -> Result<Tensor, SdError> {
        let vae = self.vae();
        match decode(&vae) {
            Err(SdError::NotFinite { .. }) if !all_finite(latents)? => Err(SdError::NotFinite {
                part: Part::Unet,
                dtype: self.dtype,
            }),
            Err(SdError::NotFinite { dtype, .. }) if dtype != DType::F32 => {
                tracing::warn!(
                    "the VAE's numbers overflowed in {}: it decodes in f32 from now on",
                    dtype.as_str()
                );
                drop(vae);
                self.upcast_vae()?;
                decode(&self.vae())
            }
            decoded => decoded,
        }
    }

    /// The VAE in use.
    fn vae(&self) -> Arc<Vae> {
        self.vae
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The dtype the VAE decodes in (f32 for one that upcasts, or was upcast).
    pub fn vae_dtype(&self) -> DType {
        self.vae().dtype()
    }

    /// Reloads the VAE in f32 (its weights converted on load) for every later decode: for a
    /// VAE that overflowed in f16. Twice its f16 memory, as an upcasting VAE always takes.
    /// Nothing to do where it decodes in f32 already.
    pub fn upcast_vae(&self) -> Result<(), SdError> {
        if self.vae_dtype() == DType::F32 {
            return Ok(());
        }
        let upcast = load_vae(
            &self.folder,
            &self.vae_weights,
            Precision::uniform(DType::F32),
            &self.device,
        )?;
        *self.vae.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(upcast);
        Ok(())
    }
}

/// The precision a folder's VAE runs in beside a pipeline in `precision`: the same, or all
/// f32 for a VAE that must upcast from f16 (its weights too: our f32 convolution kernel
/// takes weights in its own order, made from f32).
pub fn vae_precision(folder: &ModelFolder, precision: Precision) -> Precision {
    let compute = folder.vae_dtype(precision.compute);
    if compute == precision.compute {
        precision
    } else {
        Precision::uniform(compute)
    }
}

/// The VAE from its weights at `path`, in `precision`, on `device`.
fn load_vae(
    folder: &ModelFolder,
    path: &Path,
    precision: Precision,
    device: &Device,
) -> Result<Vae, SdError> {
    Ok(Vae::new(
        weights::mapped(path, precision, device)?,
        &folder.vae,
    )?)
}

/// What a model folder says about the jobs it wants, read without loading its weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelFacts {
    /// The image side the model was trained at (512 for SD 1.5, 1024 for SDXL).
    pub native_size: usize,
    /// Pixels per latent cell along each side (8 for real models).
    pub vae_scale_factor: usize,
    /// Distilled few-step models (SD-Turbo, SDXL-Turbo) ship trailing timestep spacing;
    /// they want 1–4 steps and no guidance.
    pub few_step: bool,
    pub default_sampler: Scheduler,
}

impl ModelFacts {
    pub fn read(root: &Path) -> Result<Self, SdError> {
        let folder = ModelFolder::open(root)?;
        let schedule = noise_schedule(&folder)?;
        Ok(Self::of(&folder, &schedule))
    }

    fn of(folder: &ModelFolder, schedule: &NoiseSchedule) -> Self {
        let vae_scale_factor = folder.vae.scale_factor();
        Self {
            native_size: folder
                .unet
                .sample_size
                .map_or(512, |latent| latent * vae_scale_factor),
            vae_scale_factor,
            few_step: schedule.spacing == schedulers::Spacing::Trailing,
            default_sampler: schedule.default_sampler(),
        }
    }
}

fn noise_schedule(folder: &ModelFolder) -> Result<NoiseSchedule, SdError> {
    NoiseSchedule::from_file(&folder.scheduler).map_err(|Unrunnable(reason)| {
        SdError::Folder(FolderError::Invalid {
            file: "scheduler/scheduler_config.json".to_owned(),
            reason,
        })
    })
}

/// Opens the folder and checks that its weight files hold every tensor its architecture
/// needs, with the right shapes, without loading them.
pub fn open_checked(root: &Path) -> Result<ModelFolder, SdError> {
    let folder = ModelFolder::open(root)?;
    let files = folder.weight_files(DType::F32)?;
    let context = |component: &str, error: candle_core::Error| {
        SdError::Folder(FolderError::Invalid {
            file: format!("{component} weights"),
            reason: error.to_string(),
        })
    };
    ClipTextEncoder::new(
        weight_check::header_builder(&files.text_encoder)
            .map_err(|e| context("text_encoder", e))?,
        &folder.text_encoder,
    )
    .map_err(|error| context("text_encoder", error))?;
    if let (Some(path), Some(config)) = (&files.text_encoder_2, &folder.text_encoder_2) {
        ClipTextEncoder::new(
            weight_check::header_builder(path).map_err(|e| context("text_encoder_2", e))?,
            config,
        )
        .map_err(|error| context("text_encoder_2", error))?;
    }
    Unet::new(
        weight_check::header_builder(&files.unet).map_err(|e| context("unet", e))?,
        &folder.unet,
    )
    .map_err(|error| context("unet", error))?;
    Vae::new(
        weight_check::header_builder(&files.vae).map_err(|e| context("vae", e))?,
        &folder.vae,
    )
    .map_err(|error| context("vae", error))?;
    Ok(folder)
}

/// `(batch, 3, H, W)` floats in `[0, 1]` to 8-bit images (rounded, as the reference).
pub fn to_images(pixels: &Tensor) -> Result<Vec<image::RgbImage>, SdError> {
    let (batch, _, height, width) = pixels.dims4()?;
    let bytes = (pixels * 255.0)?
        .round()?
        .clamp(0.0, 255.0)?
        .to_dtype(DType::U8)?
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let per_image = height * width * 3;
    (0..batch)
        .map(|index| {
            let start = index * per_image;
            image::RgbImage::from_raw(
                width as u32,
                height as u32,
                bytes[start..start + per_image].to_vec(),
            )
            .ok_or_else(|| {
                SdError::Tensor(candle_core::Error::Msg(
                    "decoded image has the wrong size".to_owned(),
                ))
            })
        })
        .collect()
}

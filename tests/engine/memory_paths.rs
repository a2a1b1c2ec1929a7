//! The memory-saving paths against the plain ones, on the fixtures, so none of them can
//! silently change images:
//! - a job's images are decoded one at a time, each exactly as it decodes alone. (A whole
//!   batch decoded at once does not, on candle 0.11's CPU backend: every image but the first
//!   comes out different from its own decode, by up to 29/255 on these fixtures, with
//!   candle's decoder and with ours alike, while the reference decodes each image of a batch
//!   as it would alone. Which op does it is not found yet: a convolution, group norm,
//!   upsampling or SiLU of a batch of two alone equals its images'.)
//! - attention a chunk of queries at a time gives the same image as whole attention (the
//!   same numbers per query row; at most a level of rounding on any pixel);
//! - the decoder's convolutions in bands of rows and its attention in chunks of queries give
//!   the same image as whole (the same sums, up to their order);
//! - attention scores in f16 (what a GPU computes unless the config asks for
//!   `upcast_attention`) stay within the stated tolerance of f32 scores, in an f16 UNet;
//! - text encoders moved to the CPU run in f32 there and hand the model its own dtype;
//! - decoding in overlapping tiles stays within the stated tolerance of the whole decode
//!   (tiles see only their neighbourhood, so it is close, not equal; on these tiny random
//!   models, whose group norms over a few cells swing much more than a trained VAE's, the
//!   difference is larger than on real ones).

use candle_core::{DType, Tensor};
use studio_worker::engine::sd::conv::ConvPlan;
use studio_worker::engine::sd::unet_blocks::AttentionPlan;
use studio_worker::engine::sd::vae::Tiling;
use studio_worker::engine::sd::working_memory::Plan;
use studio_worker::engine::sd::{Request, StableDiffusion};

use crate::support::{
    FIXTURES, Golden, PROMPTS, load, reference_scale, request, worst_level_difference,
};

/// Tiled decode against whole, in `[0, 1]` pixel units: the largest difference of any
/// channel of any pixel, and the mean over all of them (measured: at most 25/255 and
/// 2.7/255; a blend that did not add up to one would be off by half the image's brightness
/// along every seam).
const TILED_MAX: f32 = 32.0 / 255.0;
const TILED_MEAN: f32 = 3.5 / 255.0;
/// Bands and chunks against whole, in `[0, 1]` pixel units: rounding only.
const BANDED_MAX: f32 = 1e-5;

fn tiled(tiling: Tiling) -> Plan {
    Plan {
        vae_tiling: Some(tiling),
        ..Plan::default()
    }
}

/// The fixtures' reference latents (32×32 cells, 64² pixels), two images of them (the
/// second at half strength, so the images differ).
fn latents(name: &str) -> Tensor {
    let one = Golden::of(name).batched("vae.latents");
    let other = (&one * 0.5).expect("scale");
    Tensor::cat(&[&one, &other], 0).expect("batch")
}

fn differences(ours: &Tensor, whole: &Tensor) -> (f32, f32) {
    let delta = (ours - whole).and_then(|d| d.abs()).expect("difference");
    let max = delta
        .max_all()
        .and_then(|m| m.to_scalar::<f32>())
        .expect("max");
    let mean = delta
        .mean_all()
        .and_then(|m| m.to_scalar::<f32>())
        .expect("mean");
    (max, mean)
}

/// The fixture's pipeline, its two-image latents, and their plain decode, one at a time.
fn decoded_whole(name: &str) -> (StableDiffusion, Tensor, Tensor) {
    let model = load(name);
    let latents = latents(name);
    let whole = model
        .decode_each(&latents, Plan::default())
        .expect("decodes");
    (model, latents, whole)
}

#[test]
fn each_image_of_a_job_decodes_as_it_does_alone() {
    for name in FIXTURES {
        let (model, latents, each) = decoded_whole(name);
        for image in 0..2 {
            let alone = model
                .decode(&latents.narrow(0, image, 1).expect("narrow"))
                .expect("decodes");
            let (max, _) = differences(&each.narrow(0, image, 1).expect("narrow"), &alone);
            assert_eq!(max, 0.0, "{name}: image {image} of the job");
        }
    }
}

#[test]
fn banded_convolutions_and_chunked_attention_decode_the_same_image() {
    for name in FIXTURES {
        let (model, latents, whole) = decoded_whole(name);
        // Bands of one or two rows at the full resolution, one query row per chunk.
        let saving = Plan {
            vae_tiling: None,
            conv: ConvPlan {
                max_column_values: Some(4 << 10),
            },
            attention: AttentionPlan {
                max_score_bytes: Some(1),
            },
        };
        let banded = model.decode_each(&latents, saving).expect("decodes");
        let (max, _) = differences(&banded, &whole);
        assert!(max <= BANDED_MAX, "{name}: max |Δ| {max}");
    }
}

#[test]
fn a_tiled_decode_stays_within_the_stated_tolerance_of_the_whole_decode() {
    // 2×2 tiles of 24 cells over the 32×32 latents, overlapping by 8.
    let tiling = Tiling {
        tile: 24,
        overlap: 8,
    };
    for name in FIXTURES {
        let (model, latents, whole) = decoded_whole(name);
        let tiled = model.decode_each(&latents, tiled(tiling)).expect("decodes");
        assert_eq!(tiled.dims(), whole.dims());
        assert_eq!(tiled.dtype(), DType::F32);
        let (max, mean) = differences(&tiled, &whole);
        eprintln!(
            "{name}: tiled vs whole decode: max |Δ| {:.1}/255, mean {:.2}/255",
            max * 255.0,
            mean * 255.0
        );
        assert!(max <= TILED_MAX, "{name}: max |Δ| {max} > {TILED_MAX}");
        assert!(mean <= TILED_MEAN, "{name}: mean |Δ| {mean} > {TILED_MEAN}");
    }
}

#[test]
fn a_latent_within_one_tile_is_decoded_whole() {
    let name = FIXTURES[0];
    let (model, latents, whole) = decoded_whole(name);
    let tiled = model
        .decode_each(&latents, tiled(Tiling::DEFAULT))
        .expect("decodes");
    let (max, _) = differences(&tiled, &whole);
    assert_eq!(max, 0.0, "32×32 cells fit one 64-cell tile");
}

#[test]
fn attention_a_chunk_at_a_time_gives_the_same_image() {
    for name in FIXTURES {
        let model = load(name);
        let request = |attention: AttentionPlan| Request {
            memory: Plan {
                attention,
                ..Plan::default()
            },
            ..request(7, 1)
        };
        let run = |attention| {
            model
                .generate(&request(attention), &mut |_| {}, &|| false)
                .expect("runs")
        };
        let whole = run(AttentionPlan::default());
        // One query row per chunk at the largest block.
        let chunked = run(AttentionPlan {
            max_score_bytes: Some(4096),
        });
        let worst = worst_level_difference(&whole[0], &chunked[0]);
        assert!(
            worst <= Some(1),
            "{name}: differs by up to {worst:?} levels"
        );
    }
}

/// An f16 UNet's output with f16 attention scores against the same UNet with f32 scores
/// (diffusers' `upcast_attention`), both against the f32 reference: at most this much
/// further from it, relative to the output's scale. Measured: f32 scores 1.6–2.9e-3 (the
/// f16 UNet's own rounding), f16 scores at most 0.8e-3 more.
const HALF_SCORES_EXTRA: f32 = 1.5e-3;

#[test]
fn attention_scores_in_f16_stay_close_to_f32_scores() {
    use candle_core::Device;
    use candle_nn::VarBuilder;
    use studio_worker::engine::sd::model_folder::{Family, ModelFolder};
    use studio_worker::engine::sd::unet::{TextTimeConditioning, Unet};

    for name in FIXTURES {
        let folder = ModelFolder::open(&crate::support::fixture(name)).expect("opens");
        let files = folder.weight_files(DType::F16).expect("weights");
        let golden = Golden::of(name);
        let half = |key: &str| golden.batched(key).to_dtype(DType::F16).expect("f16");
        let text_time = (folder.family == Family::StableDiffusionXl)
            .then(|| (half("unet.text_embeds"), half("unet.time_ids")));
        let reference = golden.batched("unet.out");
        let scale = reference_scale(&reference);
        let error_with = |upcast: bool| -> f32 {
            let mut config = folder.unet.clone();
            config.upcast_attention = upcast;
            // SAFETY: the fixture is not modified while mapped.
            let vb = unsafe {
                VarBuilder::from_mmaped_safetensors(&[&files.unet], DType::F16, &Device::Cpu)
            }
            .expect("weights map");
            let unet = Unet::new(vb, &config).expect("UNet builds");
            let out = unet
                .forward(
                    &half("unet.sample"),
                    golden.f64s("unet.timestep")[0],
                    &half("unet.hidden"),
                    text_time
                        .as_ref()
                        .map(|(text_embeds, time_ids)| TextTimeConditioning {
                            text_embeds,
                            time_ids,
                        }),
                    Plan::default(),
                )
                .expect("UNet runs");
            differences(&out.to_dtype(DType::F32).expect("f32"), &reference).0 / scale
        };
        let (f32_scores, f16_scores) = (error_with(true), error_with(false));
        eprintln!(
            "{name}: f16 UNet vs reference, relative max |Δ|: f32 scores {f32_scores:.2e}, f16 scores {f16_scores:.2e}"
        );
        assert!(
            f16_scores <= f32_scores + HALF_SCORES_EXTRA,
            "{name}: {f16_scores} vs {f32_scores}"
        );
    }
}

#[test]
fn text_encoders_on_the_cpu_run_in_f32_and_hand_the_model_its_dtype() {
    use candle_core::Device;
    use studio_worker::engine::sd::TextPlacement;

    for name in FIXTURES {
        let root = crate::support::fixture(name);
        let reference = Golden::of(name).batched("text.embeds");
        // An f16 pipeline (as on a GPU), its text encoders with it or on the CPU.
        let error = |text: TextPlacement| -> f32 {
            let model =
                StableDiffusion::load_placed(&root, &Device::Cpu, DType::F16, text).expect("loads");
            let (embeds, _) = model.encode_text(PROMPTS[0]).expect("encodes");
            assert_eq!(embeds.dtype(), DType::F16, "{name}: the model's dtype");
            differences(&embeds.to_dtype(DType::F32).expect("f32"), &reference).0
        };
        let (with_model, on_cpu) = (error(TextPlacement::WithModel), error(TextPlacement::Cpu));
        eprintln!(
            "{name}: text embeddings vs the f32 reference: f16 encoders {with_model:.2e}, f32 on the CPU {on_cpu:.2e}"
        );
        assert!(on_cpu < with_model, "{name}: {on_cpu} vs {with_model}");
    }
}

#[test]
fn text_encoders_that_visit_for_each_prompt_encode_as_the_resident_ones() {
    use candle_core::Device;
    use studio_worker::engine::sd::TextPlacement;
    use studio_worker::engine::sd::model_folder::Family;

    let [first, second, third] = [PROMPTS[0], PROMPTS[1], PROMPTS[2]];
    for name in FIXTURES {
        let root = crate::support::fixture(name);
        // f16, as on a GPU: the visiting encoders load in the model's precision each time.
        let load = |text: TextPlacement| {
            StableDiffusion::load_placed(&root, &Device::Cpu, DType::F16, text).expect("loads")
        };
        let values = |encodings: Vec<(Tensor, Option<Tensor>)>| -> Vec<Vec<f32>> {
            encodings
                .into_iter()
                .flat_map(|(embeds, pooled)| [Some(embeds), pooled].into_iter().flatten())
                .map(|tensor| {
                    assert_eq!(tensor.dtype(), DType::F16, "{name}: the model's dtype");
                    tensor
                        .to_dtype(DType::F32)
                        .and_then(|tensor| tensor.flatten_all())
                        .and_then(|tensor| tensor.to_vec1())
                        .expect("values")
                })
                .collect()
        };
        // Resident: one prompt at a time.
        let resident = load(TextPlacement::WithModel);
        let kept = values(
            [first, second, third]
                .map(|prompt| resident.encode_text(prompt).expect("encodes"))
                .into(),
        );
        assert_eq!(resident.text_encoder_visits(), 0, "{name}: they stay");
        // Visiting: two prompts in one visit of each encoder, then a third alone.
        let visiting = load(TextPlacement::Visiting);
        let encoders = match visiting.family() {
            Family::StableDiffusion => 1,
            Family::StableDiffusionXl => 2,
        };
        let [one, two] = visiting.encode_texts([first, second]).expect("encodes");
        assert_eq!(
            visiting.text_encoder_visits(),
            encoders,
            "{name}: one visit each"
        );
        let three = visiting.encode_text(third).expect("encodes");
        assert_eq!(visiting.text_encoder_visits(), 2 * encoders, "{name}");
        let visited = values(vec![one, two, three]);

        assert_eq!(visited.len(), kept.len(), "{name}");
        for (visited, kept) in visited.iter().zip(&kept) {
            assert_eq!(visited.len(), kept.len(), "{name}");
            let largest = visited
                .iter()
                .zip(kept)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0_f32, f32::max);
            assert_eq!(largest, 0.0, "{name}: the same weights, device and dtype");
        }
    }
}

//! Each stage of each fixture pipeline against the tensors diffusers computed.

use candle_core::{Result, Tensor};
use studio_worker::engine::sd::conv::ConvPlan;
use studio_worker::engine::sd::model_folder::Family;
use studio_worker::engine::sd::unet_blocks::AttentionPlan;
use studio_worker::engine::sd::working_memory::Plan;
use studio_worker::engine::sd::{DenoiseSettings, schedulers};
use studio_worker::vocab::job::Scheduler;

use crate::support::{FIXTURES, GUIDANCE, Golden, PROMPTS, SIZE, STEPS, assert_close, load};

/// Attention scores a few query rows at a time: 4 kB of them, against the fixtures' 16×16
/// latents' 256 keys, is one row per chunk at the largest block.
const CHUNKED: AttentionPlan = AttentionPlan {
    max_score_bytes: Some(4096),
};

#[test]
fn tokenizers_give_the_reference_ids() {
    for name in FIXTURES {
        let model = load(name);
        let golden = Golden::of(name);
        let tokenizers = if model.family() == Family::StableDiffusionXl {
            2
        } else {
            1
        };
        for tokenizer in 0..tokenizers {
            for (index, prompt) in PROMPTS.iter().enumerate() {
                let ours = model.token_ids(prompt, tokenizer == 1).expect("tokenizes");
                let reference: Vec<i64> = golden
                    .get(&format!("tokens.{tokenizer}.{index}"))
                    .to_vec1()
                    .expect("ids");
                let reference: Vec<u32> = reference.into_iter().map(|id| id as u32).collect();
                assert_eq!(
                    ours, reference,
                    "{name} tokenizer {tokenizer}, prompt {prompt:?}"
                );
            }
        }
    }
}

#[test]
fn text_embeddings_match_the_reference() {
    for name in FIXTURES {
        let model = load(name);
        let golden = Golden::of(name);
        let (embeds, pooled) = model.encode_text(PROMPTS[0]).expect("encodes");
        assert_close(
            &format!("{name} prompt embeddings"),
            &embeds,
            &golden.batched("text.embeds"),
        );
        let (negative, negative_pooled) = model.encode_text(PROMPTS[1]).expect("encodes");
        assert_close(
            &format!("{name} negative embeddings"),
            &negative,
            &golden.batched("text.negative"),
        );
        match model.family() {
            Family::StableDiffusionXl => {
                let pooled = pooled.expect("SDXL pools");
                assert_close(
                    &format!("{name} pooled"),
                    &pooled,
                    &golden.batched("text.pooled"),
                );
                let negative_pooled = negative_pooled.expect("SDXL pools");
                assert_close(
                    &format!("{name} negative pooled"),
                    &negative_pooled,
                    &golden.batched("text.negative_pooled"),
                );
            }
            Family::StableDiffusion => assert!(pooled.is_none()),
        }
    }
}

#[test]
fn one_unet_forward_matches_the_reference() {
    for name in FIXTURES {
        let model = load(name);
        let golden = Golden::of(name);
        let text_embeds;
        let time_ids;
        let text_time = if model.family() == Family::StableDiffusionXl {
            text_embeds = golden.batched("unet.text_embeds");
            time_ids = golden.batched("unet.time_ids");
            Some((&text_embeds, &time_ids))
        } else {
            None
        };
        let timestep = golden.f64s("unet.timestep")[0];
        // The attention whole, a few query rows at a time (what tight memory picks), and with
        // the convolutions in bands of a row or two too (what a GPU runs).
        for (plan, how) in [
            (Plan::default(), "whole attention"),
            (
                Plan {
                    attention: CHUNKED,
                    ..Plan::default()
                },
                "chunked attention",
            ),
            (
                Plan {
                    attention: CHUNKED,
                    conv: ConvPlan {
                        max_column_values: Some(4 << 10),
                    },
                    vae_tiling: None,
                },
                "chunked attention, banded convolutions",
            ),
        ] {
            let out = model
                .unet_forward(
                    &golden.batched("unet.sample"),
                    timestep,
                    &golden.batched("unet.hidden"),
                    text_time,
                    plan,
                )
                .expect("UNet runs");
            assert_close(
                &format!("{name} UNet output, {how}"),
                &out,
                &golden.batched("unet.out"),
            );
        }
    }
}

#[test]
fn vae_decode_matches_the_reference() {
    for name in FIXTURES {
        let model = load(name);
        let golden = Golden::of(name);
        let scaling = vae_scaling(name);
        // Ours un-scales the latents and maps to [0, 1]; do the same to the raw reference.
        let latents = (golden.batched("vae.latents") * scaling).expect("scale");
        let ours = model.decode(&latents).expect("decodes");
        let reference = ((golden.batched("vae.out") / 2.0).and_then(|t| t + 0.5))
            .and_then(|t| t.clamp(0.0, 1.0))
            .expect("denormalise");
        assert_close(&format!("{name} VAE decode"), &ours, &reference);
    }
}

fn vae_scaling(name: &str) -> f64 {
    if name == "tiny-sdxl" {
        0.13025
    } else {
        0.18215
    }
}

/// A whole run, as the reference pipeline does it, from its initial latents.
fn run(name: &str, scheduler: Scheduler, negative: &str, guidance: f64) -> (Tensor, Tensor) {
    let model = load(name);
    let golden = Golden::of(name);
    let guided = guidance > 1.0;
    let conditioning = model
        .encode_prompt(PROMPTS[0], negative, guided, 1, (SIZE, SIZE))
        .expect("encodes");
    let mut sampler = schedulers::build(scheduler, model.noise_schedule(), STEPS);
    let recorded = golden.get("run.euler_a.noise");
    let mut drawn = 0;
    let mut noise = || -> Result<Tensor> {
        drawn += 1;
        recorded.get(drawn - 1)?.unsqueeze(0)
    };
    let latents = model
        .denoise(
            &conditioning,
            &golden.batched("run.initial"),
            sampler.as_mut(),
            DenoiseSettings {
                guidance_scale: guidance,
                plan: Plan::default(),
            },
            &mut noise,
            &mut |_, _| true,
        )
        .expect("denoises");
    let image = model.decode(&latents).expect("decodes");
    (latents, image)
}

#[test]
fn full_runs_match_the_reference_for_every_scheduler() {
    for name in FIXTURES {
        let golden = Golden::of(name);
        for (scheduler, key) in [
            (Scheduler::Ddim, "ddim"),
            (Scheduler::Euler, "euler"),
            (Scheduler::EulerA, "euler_a"),
            (Scheduler::DpmPp2mKarras, "dpmpp_2m_karras"),
        ] {
            let (latents, image) = run(name, scheduler, PROMPTS[1], GUIDANCE);
            assert_close(
                &format!("{name} {key} final latents"),
                &latents,
                &golden.batched(&format!("run.{key}.latents")),
            );
            assert_close(
                &format!("{name} {key} image"),
                &image,
                &golden.batched(&format!("run.{key}.image")),
            );
        }
    }
}

#[test]
fn guidance_of_one_skips_the_negative_pass_as_the_reference_does() {
    for name in FIXTURES {
        let golden = Golden::of(name);
        let (_, image) = run(name, Scheduler::Euler, "", 1.0);
        assert_close(
            &format!("{name} unguided image"),
            &image,
            &golden.batched("run.euler_no_guidance.image"),
        );
    }
}

#[test]
fn sdxl_conditions_an_empty_negative_prompt_on_zeros() {
    let golden = Golden::of("tiny-sdxl");
    let (_, image) = run("tiny-sdxl", Scheduler::Euler, "", GUIDANCE);
    assert_close(
        "tiny-sdxl empty negative image",
        &image,
        &golden.batched("run.euler_empty_negative.image"),
    );
}

#[test]
fn every_sampler_picks_the_reference_timesteps_and_sigmas() {
    use studio_worker::engine::sd::schedulers::Spacing;
    for name in FIXTURES {
        let model = load(name);
        let golden = Golden::of(name);
        for (spacing, spacing_key) in [
            (Spacing::Leading, "leading"),
            (Spacing::Trailing, "trailing"),
            (Spacing::Linspace, "linspace"),
        ] {
            let mut schedule = model.noise_schedule().clone();
            schedule.spacing = spacing;
            for (scheduler, key) in [
                (Scheduler::Ddim, "ddim"),
                (Scheduler::Euler, "euler"),
                (Scheduler::EulerA, "euler_a"),
                (Scheduler::DpmPp2mKarras, "dpmpp_2m_karras"),
            ] {
                for steps in [1, 4, 25] {
                    let what = format!("{name} {key} {spacing_key} {steps} steps");
                    let prefix = format!("schedule.{key}.{spacing_key}.{steps}");
                    let sampler = schedulers::build(scheduler, &schedule, steps);
                    assert_eq!(
                        sampler.timesteps(),
                        golden.f64s(&format!("{prefix}.timesteps")).as_slice(),
                        "{what}: timesteps"
                    );
                    let reference_sigma = golden.f64s(&format!("{prefix}.init_noise_sigma"))[0];
                    assert!(
                        (sampler.init_noise_sigma() - reference_sigma).abs()
                            <= 1e-4 * reference_sigma,
                        "{what}: initial σ {} vs {reference_sigma}",
                        sampler.init_noise_sigma()
                    );
                    if scheduler != Scheduler::Ddim {
                        let ours = sampler.sigmas().expect("σ samplers expose σ");
                        let reference = golden.f64s(&format!("{prefix}.sigmas"));
                        assert_eq!(ours.len(), reference.len(), "{what}: σ count");
                        for (index, (a, b)) in ours.iter().zip(&reference).enumerate() {
                            // The reference stores σ in f32.
                            assert!(
                                (a - b).abs() <= 1e-5 * b.max(1.0),
                                "{what}: σ[{index}] {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }
}

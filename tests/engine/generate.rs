//! Whole requests through `StableDiffusion::generate` and the `CandleEngine`: seeds mean
//! something, batches equal single runs, progress and cancelling work, the cache behaves.

use std::collections::BTreeMap;

use studio_worker::engine::candle_engine::CandleEngine;
use studio_worker::engine::device;
use studio_worker::engine::sd::{Request, Stage};
use studio_worker::engine::{CancelToken, Engine, EngineError, StopReason};
use studio_worker::vocab::device::DevicePreference;
use studio_worker::vocab::job::JobSpec;

use crate::support::{fixture, load, request, worst_level_difference};

#[test]
fn the_same_job_gives_the_same_image_and_another_seed_another() {
    let model = load("tiny-sd1");
    let run = |request: &Request| {
        model
            .generate(request, &mut |_| {}, &|| false)
            .expect("runs")
    };
    let first = run(&request(11, 1));
    assert_eq!(first, run(&request(11, 1)), "same job, same pixels");
    assert_ne!(first, run(&request(12, 1)), "another seed, another image");
    assert_eq!(first[0].dimensions(), (64, 64));
}

#[test]
fn image_k_of_a_batch_is_image_0_of_seed_plus_k() {
    let model = load("tiny-sdxl");
    let run = |request: &Request| {
        model
            .generate(request, &mut |_| {}, &|| false)
            .expect("runs")
    };
    let batch = run(&request(40, 2));
    let single = run(&request(41, 1));
    assert_eq!(batch.len(), 2);
    // The batch runs through the UNet together: equal up to float summation order, which
    // moves a few pixels by a level or two.
    let worst = worst_level_difference(&batch[1], &single[0]);
    assert!(
        worst <= Some(3),
        "image 1 of the batch differs from seed 41 by up to {worst:?}"
    );
    let other = batch[0]
        .as_raw()
        .iter()
        .zip(single[0].as_raw())
        .filter(|(a, b)| a.abs_diff(**b) > 3)
        .count();
    assert!(other > 1000, "image 0 (seed 40) should differ from seed 41");
}

#[test]
fn a_prompt_a_recent_job_encoded_is_not_encoded_again_and_gives_the_same_image() {
    for name in ["tiny-sd1", "tiny-sdxl"] {
        let model = load(name);
        let run = |model: &studio_worker::engine::sd::StableDiffusion, request: &Request| {
            model
                .generate(request, &mut |_| {}, &|| false)
                .expect("runs")
        };
        run(&model, &request(11, 1));
        assert_eq!(
            model.prompts_encoded(),
            2,
            "{name}: the prompt and the negative"
        );
        let again = run(&model, &request(12, 1));
        assert_eq!(
            model.prompts_encoded(),
            2,
            "{name}: both were encoded before"
        );
        let rerolled = Request {
            prompt: "a grey wolf".to_owned(),
            ..request(13, 1)
        };
        let other = run(&model, &rerolled);
        assert_eq!(model.prompts_encoded(), 3, "{name}: only the new prompt");

        // What the kept encodings give is what a pipeline that never saw them gives.
        let fresh = load(name);
        assert_eq!(again, run(&fresh, &request(12, 1)), "{name}");
        assert_eq!(other, run(&fresh, &rerolled), "{name}");
    }
}

#[test]
fn progress_names_every_stage_and_cancelling_stops_between_steps() {
    let model = load("tiny-sd2-v");
    let mut stages = Vec::new();
    model
        .generate(&request(1, 1), &mut |stage| stages.push(stage), &|| false)
        .expect("runs");
    assert_eq!(
        stages,
        vec![
            Stage::Encoding,
            Stage::Denoising { step: 1, total: 3 },
            Stage::Denoising { step: 2, total: 3 },
            Stage::Denoising { step: 3, total: 3 },
            Stage::Decoding,
        ]
    );

    let steps = std::cell::Cell::new(0);
    let outcome = model.generate(
        &request(1, 1),
        &mut |stage| {
            if let Stage::Denoising { .. } = stage {
                steps.set(steps.get() + 1);
            }
        },
        &|| steps.get() >= 1,
    );
    assert!(
        matches!(outcome, Err(studio_worker::engine::sd::SdError::Cancelled)),
        "cancelled after the first step"
    );
    assert_eq!(steps.get(), 1);
}

fn job(model: &str, seed: u64) -> JobSpec {
    JobSpec {
        job_id: format!("job-{seed}"),
        model: model.to_owned(),
        prompt: "a lighthouse".to_owned(),
        negative_prompt: String::new(),
        width: 64,
        height: 64,
        steps: 2,
        guidance_scale: 7.0,
        seed,
        num_images: 1,
        scheduler: None,
        lease: std::time::Duration::from_secs(60),
    }
}

fn engine(budget_mb: u64) -> CandleEngine {
    let mut models = BTreeMap::new();
    models.insert("tiny-sd1".to_owned(), fixture("tiny-sd1"));
    models.insert("tiny-sdxl".to_owned(), fixture("tiny-sdxl"));
    models.insert("broken".to_owned(), fixture("does-not-exist"));
    let device = device::select(DevicePreference::Cpu).expect("the CPU opens");
    let (engine, refused) = CandleEngine::new(device, &models, budget_mb);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].model_id, "broken");
    assert!(
        refused[0].reason.contains("model_index.json"),
        "{}",
        refused[0].reason
    );
    engine
}

#[test]
fn the_engine_serves_checked_folders_keeps_models_warm_and_unloads() {
    let engine = engine(1024);
    assert_eq!(engine.ready_models(), vec!["tiny-sd1", "tiny-sdxl"]);
    let mut progress = Vec::new();
    let generated = engine
        .generate(
            &job("tiny-sd1", 3),
            &mut |update| progress.push(update),
            &CancelToken::new(),
        )
        .expect("runs");
    assert_eq!(generated.seed, 3);
    assert_eq!(generated.images.len(), 1);
    assert_eq!(progress.first().map(|update| update.step), Some(0));
    assert_eq!(progress.last().map(|update| update.step), Some(2));
    engine
        .generate(&job("tiny-sdxl", 3), &mut |_| {}, &CancelToken::new())
        .expect("runs");
    assert_eq!(engine.loaded_models(), vec!["tiny-sd1", "tiny-sdxl"]);
    engine
        .generate(&job("tiny-sd1", 4), &mut |_| {}, &CancelToken::new())
        .expect("runs");
    assert_eq!(
        engine.loaded_models(),
        vec!["tiny-sdxl", "tiny-sd1"],
        "most recent last"
    );
    engine.unload();
    assert!(engine.loaded_models().is_empty());

    let unknown = engine.generate(&job("sd-9", 1), &mut |_| {}, &CancelToken::new());
    assert!(
        matches!(unknown, Err(EngineError::ModelUnavailable(_))),
        "{unknown:?}"
    );
    let cancel = CancelToken::new();
    cancel.cancel(StopReason::Paused);
    let stopped = engine.generate(&job("tiny-sd1", 1), &mut |_| {}, &cancel);
    assert_eq!(stopped.err(), Some(EngineError::Cancelled));
}

#[test]
fn a_model_over_the_memory_budget_is_refused_and_lru_makes_room() {
    // 4 MB holds one tiny model at a time (each is ~1.5–2.5 MB of f32 weights).
    let engine = engine(4);
    engine
        .generate(&job("tiny-sd1", 1), &mut |_| {}, &CancelToken::new())
        .expect("runs");
    engine
        .generate(&job("tiny-sdxl", 1), &mut |_| {}, &CancelToken::new())
        .expect("runs");
    assert_eq!(engine.loaded_models(), vec!["tiny-sdxl"], "sd1 made room");

    // 1 MB holds neither: both are refused as the engine starts, with what they need, and a
    // job for one finds it unavailable rather than failing for memory after loading.
    let mut models = BTreeMap::new();
    models.insert("tiny-sd1".to_owned(), fixture("tiny-sd1"));
    models.insert("tiny-sdxl".to_owned(), fixture("tiny-sdxl"));
    let device = device::select(DevicePreference::Cpu).expect("the CPU opens");
    let (tiny_budget, refused) = CandleEngine::new(device, &models, 1);
    assert_eq!(refused.len(), 2, "{refused:?}");
    for model in &refused {
        assert!(
            model.reason.contains("weights need about") && model.reason.ends_with("1.05 MB of it"),
            "{}",
            model.reason
        );
    }
    assert!(tiny_budget.ready_models().is_empty());
    let unavailable = tiny_budget.generate(&job("tiny-sdxl", 1), &mut |_| {}, &CancelToken::new());
    assert!(
        matches!(unavailable, Err(EngineError::ModelUnavailable(_))),
        "{unavailable:?}"
    );
}

#[test]
fn a_cpu_job_that_would_not_fit_the_free_memory_is_refused_before_anything_loads() {
    let engine = engine(1024).with_available_memory(|| 3_000_000);
    let mut big = job("tiny-sd1", 1);
    (big.width, big.height, big.num_images) = (1024, 1024, 4);
    match engine.generate(&big, &mut |_| {}, &CancelToken::new()) {
        Err(EngineError::OutOfMemory(message)) => {
            assert!(
                message.contains("1024×1024 job of 4 image(s) needs about"),
                "{message}"
            );
            assert!(message.ends_with("3.00 MB is free"), "{message}");
        }
        other => panic!("expected an out-of-memory refusal, got {other:?}"),
    }
    assert!(
        engine.loaded_models().is_empty(),
        "nothing was loaded for it"
    );
    // A small job of the same model fits in the same memory… once the model is warm.
    let engine = engine.with_available_memory(|| 200_000_000);
    engine
        .generate(&job("tiny-sd1", 1), &mut |_| {}, &CancelToken::new())
        .expect("fits");
}

#[test]
fn a_cpu_engine_advertises_the_largest_job_its_memory_takes() {
    // The tiny fixtures' VAE halves the size once (a real one three times), so they run on
    // 16 times the cells of a real model at the same side. With their attention a chunk at a
    // time, activations and the decode set the limit; with it whole, 2 GB allowed 256², 64
    // GB only 384² (8.6 GB of scores at 256², 43 GB at 384²).
    let sides: Vec<u32> = [256, 768, 1024, 2 * 1024]
        .into_iter()
        .map(|budget_mb| engine(budget_mb).limits())
        .inspect(|limits| assert_eq!(limits.max_width, limits.max_height))
        .map(|limits| limits.max_width)
        .collect();
    assert_eq!(
        sides,
        [256, 448, 768, 1024],
        "never less than 256, more with more memory"
    );

    // Serving nothing, nothing limits it.
    let device = device::select(DevicePreference::Cpu).expect("the CPU opens");
    let (idle, _) = CandleEngine::new(device, &BTreeMap::new(), 64);
    let limits = idle.limits();
    assert_eq!((limits.max_width, limits.max_images), (1024, 4));
}

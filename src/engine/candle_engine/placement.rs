//! Where a job runs within the memory free now ([`Placement`]): the fastest of the device's
//! plans that fits, its model's text encoders with it, visiting the GPU for each job's prompts
//! or on the CPU, and the other warm models unloaded only when nothing else fits; a job that
//! fits no way is refused `oom` before anything is allocated. Also what the engine advertises:
//! the largest job every served model fits within the memory budget.

use std::sync::PoisonError;

use super::CandleEngine;
use super::served::ServedModel;
use crate::engine::EngineError;
use crate::engine::sd::TextPlacement;
use crate::engine::sd::working_memory::Plan;
use crate::vocab::job::{EngineLimits, JobSpec};

/// Jobs of this side (and this many images) are what an engine takes at most: a CPU needs
/// minutes for a 1024² image already.
const CPU_MAX_SIDE: u32 = 1024;
const GPU_MAX_SIDE: u32 = 2048;
const MIN_SIDE: u32 = 256;
const MAX_IMAGES: u32 = 4;

/// How a job runs: its memory plan, where its model's text encoders go if it loads, and
/// whether the pool hands back what the steps freed before the decode allocates: where the
/// two stretches would not fit held together, the estimate's "the decode reuses the steps'
/// memory" is made true by construction (at the cost of a wait for the device and the pool
/// growing again, paid only where memory is tight).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Placement {
    pub(super) plan: Plan,
    pub(super) text: TextPlacement,
    pub(super) hand_back_before_decode: bool,
}

impl CandleEngine {
    /// Where a model's text encoders leave the device the most room.
    pub(super) fn least_text_placement(&self) -> TextPlacement {
        if self.text_can_move {
            TextPlacement::Cpu
        } else {
            TextPlacement::WithModel
        }
    }

    /// What `model` needs at the least on the device for `images` guided images of `side`²:
    /// its weights, with its text encoders on the CPU where they may go there, and the
    /// working memory of the device's most saving plan.
    fn least_bytes(&self, model: &ServedModel, side: u32, images: u32) -> u64 {
        let kernels = self.kernels();
        model.device_bytes(self.least_text_placement())
            + model.working.bytes(
                side,
                side,
                images,
                true,
                Plan::most_saving(kernels.convolutions),
                kernels,
            )
    }

    /// How the job fits the memory free now (the GPU's, or the CPU's RAM): the fastest of
    /// the device's [`Plan::choices`] that fits; on a GPU, when none does, the same with the
    /// model's text encoders visiting the device for each prompt, then on the CPU (if it is
    /// not loaded yet); and only then after unloading the other models. A job that fits no
    /// way is refused as out of memory before anything is allocated. (The budget bounds the
    /// loaded weights, so a placement of the text encoders that exceeds it is not taken, and
    /// what is advertised; the free memory is what a job can really have, with a game beside
    /// it.)
    pub(super) fn make_room(&self, job: &JobSpec) -> Result<Placement, EngineError> {
        let Some(served) = self
            .models
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&job.model)
            .cloned()
        else {
            return Ok(Placement::default()); // `pipeline` says it is not served
        };
        let guided = job.guidance_scale > 1.0;
        let kernels = self.kernels();
        let estimate = |plan| {
            served
                .working
                .estimate(job.width, job.height, job.num_images, guided, plan, kernels)
        };
        let working = |plan| estimate(plan).peak();
        let (warm, others) = {
            let loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
            let warm = loaded
                .iter()
                .find(|entry| entry.model_id == job.model)
                .map(|entry| entry.text);
            let others: u64 = loaded
                .iter()
                .filter(|entry| entry.model_id != job.model)
                .map(|entry| entry.memory_bytes)
                .sum();
            (warm, others)
        };
        // The weights that would come onto the device, by where the text encoders go (a warm
        // model stays as it was loaded and brings none), and what visiting encoders bring
        // for a prompt, before the job's steps allocate.
        let placements: Vec<(TextPlacement, u64, u64)> = if let Some(text) = warm {
            vec![(text, 0, served.visiting_bytes(text))]
        } else {
            let mut texts = vec![TextPlacement::WithModel];
            if self.text_can_move && served.text_bytes > 0 {
                texts.extend([TextPlacement::Visiting, TextPlacement::Cpu]);
            }
            texts
                .into_iter()
                .map(|text| (text, served.device_bytes(text), served.visiting_bytes(text)))
                // The budget bounds the loaded weights: with the text encoders where it
                // would be exceeded, the load would refuse. (A visiting encoder is a job's
                // passing need, as its working memory is: the memory free bounds it.)
                .filter(|&(_, weights, _)| weights <= self.budget_bytes)
                .collect()
        };
        if placements.is_empty() {
            // Only where its weights grew since it was served (its VAE upcast).
            return Err(EngineError::OutOfMemory(format!(
                "{} needs about {} of weights on the device and the memory budget is {}",
                job.model,
                crate::human::bytes(served.device_bytes(self.least_text_placement())),
                crate::human::bytes(self.budget_bytes)
            )));
        }
        let available = (self.available_memory)();
        let fits = |room: u64| {
            placements.iter().find_map(|&(text, weights, visit)| {
                if weights + visit > room {
                    return None;
                }
                Plan::choices(kernels.convolutions)
                    .iter()
                    .copied()
                    .find(|plan| weights + working(*plan) <= room)
                    .map(|plan| Placement {
                        plan,
                        text,
                        hand_back_before_decode: weights + estimate(plan).peak_if_held() > room,
                    })
            })
        };
        // What the estimate said, to compare with a measured peak (`benches/gpu` reads it).
        let placed = |placement: Placement| {
            tracing::debug!(
                "placing a {}×{} job of {} image(s): {} of weights on the device, {} estimated \
                 beside them ({:?}, text encoders {:?}), {} free{}",
                job.width,
                job.height,
                job.num_images,
                crate::human::bytes(served.device_bytes(placement.text)),
                crate::human::bytes(working(placement.plan)),
                placement.plan,
                placement.text,
                crate::human::bytes(available),
                if placement.hand_back_before_decode {
                    "; the steps' memory handed back before the decode (both held would not fit)"
                } else {
                    ""
                }
            );
            placement
        };
        if let Some(placement) = fits(available) {
            return Ok(placed(placement));
        }
        if let Some(placement) = fits(available.saturating_add(others)) {
            tracing::info!("unloading the other models to make room for this job");
            self.loaded
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|entry| entry.model_id == job.model);
            return Ok(placed(placement));
        }
        let least_job = working(Plan::most_saving(kernels.convolutions));
        let needed = placements
            .iter()
            .map(|&(_, weights, visit)| weights + visit.max(least_job))
            .min()
            .unwrap_or(least_job);
        Err(EngineError::OutOfMemory(format!(
            "a {}×{} job of {} image(s) needs about {} of memory and {} is free",
            job.width,
            job.height,
            job.num_images,
            crate::human::bytes(needed),
            crate::human::bytes(available)
        )))
    }

    /// What the engine advertises: the largest side (and image count) whose job fits the
    /// memory budget for every served model, at the least it needs ([`Self::least_bytes`]:
    /// guided, the worst case, with the device's most saving plan and placement).
    pub(super) fn limits_within_budget(&self) -> EngineLimits {
        let models: Vec<ServedModel> = self
            .models
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let fits = |side: u32, images: u32| {
            models
                .iter()
                .all(|model| self.least_bytes(model, side, images) <= self.budget_bytes)
        };
        let max_side = if self.device.device.is_cpu() {
            CPU_MAX_SIDE
        } else {
            GPU_MAX_SIDE
        };
        let side = (MIN_SIDE / 64..=max_side / 64)
            .rev()
            .map(|sixty_fours| sixty_fours * 64)
            .find(|side| fits(*side, 1))
            .unwrap_or(MIN_SIDE);
        let images = (1..=MAX_IMAGES)
            .rev()
            .find(|images| fits(side.min(512), *images))
            .unwrap_or(1);
        EngineLimits {
            max_width: side,
            max_height: side,
            max_images: images,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::candle_engine::test_support::{job, tiny_sdxl_engine};
    use crate::engine::sd::working_memory::{AttentionKernel, Convolutions, DeviceKernels};
    use crate::engine::{CancelToken, Engine};

    #[test]
    fn text_encoders_go_to_the_cpu_when_only_that_leaves_the_device_room() {
        let plain = tiny_sdxl_engine();
        let served = plain.models.lock().unwrap()["tiny-sdxl"].clone();
        assert!(served.text_bytes > 0 && served.text_bytes < served.memory_bytes);
        let working = least_working(&served);
        let whole = plain
            .generate(&job(), &mut |_| {}, &CancelToken::new())
            .unwrap();

        // Room for everything but the text encoders, as on a GPU, and not for one of them
        // visiting beside the weights (the next test is about that).
        let room = served.memory_bytes - served.text_bytes / 2 + working;
        let mut engine = tiny_sdxl_engine().with_available_memory(move || room);
        engine.text_can_move = true;
        set_visit_bytes(&engine, room);
        assert_eq!(engine.make_room(&job()).unwrap().text, TextPlacement::Cpu);
        let moved = engine
            .generate(&job(), &mut |_| {}, &CancelToken::new())
            .unwrap();
        assert_eq!(moved.images, whole.images, "where they run changes nothing");
        let loaded = engine.loaded.lock().unwrap();
        assert_eq!(
            loaded[0].memory_bytes,
            served.memory_bytes - served.text_bytes
        );
        drop(loaded);
        // Warm, it stays as it was loaded.
        assert_eq!(engine.make_room(&job()).unwrap().text, TextPlacement::Cpu);

        // With room on the device but a budget that holds the weights only without the text
        // encoders, they leave the device too (with them, the load would refuse): to visit
        // it for each prompt, the budget bounding the weights that stay.
        let mut budgeted = tiny_sdxl_engine().with_available_memory(|| u64::MAX);
        budgeted.text_can_move = true;
        budgeted.budget_bytes = served.memory_bytes - 1;
        assert_eq!(
            budgeted.make_room(&job()).unwrap().text,
            TextPlacement::Visiting
        );
        budgeted
            .generate(&job(), &mut |_| {}, &CancelToken::new())
            .unwrap();
        // A budget its weights exceed either way (served, then grown): refused, not loaded.
        budgeted.unload();
        budgeted.budget_bytes = served.device_bytes(TextPlacement::Cpu) - 1;
        match budgeted.make_room(&job()) {
            Err(EngineError::OutOfMemory(message)) => {
                assert!(message.contains("the memory budget is"), "{message}")
            }
            other => panic!("{other:?}"),
        }

        // With room for everything, they stay with the model; where they cannot move, a
        // device without the room refuses before loading.
        let mut roomy = tiny_sdxl_engine().with_available_memory(|| u64::MAX);
        roomy.text_can_move = true;
        assert_eq!(
            roomy.make_room(&job()).unwrap().text,
            TextPlacement::WithModel
        );
        let fixed = tiny_sdxl_engine().with_available_memory(move || room);
        assert!(matches!(
            fixed.make_room(&job()),
            Err(EngineError::OutOfMemory(_))
        ));
    }

    #[test]
    fn text_encoders_visit_the_device_where_they_fit_only_while_a_prompt_is_encoded() {
        let job = JobSpec {
            negative_prompt: "blurry".to_owned(),
            ..job()
        };
        let whole = tiny_sdxl_engine()
            .generate(&job, &mut |_| {}, &CancelToken::new())
            .unwrap();
        // The tiny model's encoders are far smaller than its job's working memory; make its
        // larger one need more than the job, as SDXL's second encoder (1.4 GB) does beside
        // a job at 1024² with the most saving plan (0.6 GB).
        let served = tiny_sdxl_engine().models.lock().unwrap()["tiny-sdxl"].clone();
        let working = least_working(&served);
        let visit = working + served.text_bytes / 2;
        let without_text = served.memory_bytes - served.text_bytes;
        assert_eq!(served.device_bytes(TextPlacement::Visiting), without_text);
        let engine_with = |room: u64, budget: u64, visit: u64| {
            let mut engine = tiny_sdxl_engine().with_available_memory(move || room);
            engine.text_can_move = true;
            engine.budget_bytes = budget;
            set_visit_bytes(&engine, visit);
            engine
        };
        let placed = |room: u64, budget: u64, visit: u64| {
            engine_with(room, budget, visit)
                .make_room(&job)
                .unwrap()
                .text
        };

        // Room for the weights without the encoders and the larger of one encoder and the
        // job, not for both encoders beside the job: they visit.
        let room = without_text + visit;
        assert!(served.memory_bytes + working > room);
        let engine = engine_with(room, u64::MAX, visit);
        assert_eq!(
            engine.make_room(&job).unwrap().text,
            TextPlacement::Visiting
        );
        let visited = engine
            .generate(&job, &mut |_| {}, &CancelToken::new())
            .unwrap();
        assert_eq!(
            visited.images, whole.images,
            "where they run changes nothing"
        );
        {
            let loaded = engine.loaded.lock().unwrap();
            assert_eq!(loaded[0].memory_bytes, without_text);
            assert_eq!(
                loaded[0].pipeline.prompts_encoded(),
                2,
                "the prompt and the negative"
            );
            assert_eq!(
                loaded[0].pipeline.text_encoder_visits(),
                2,
                "each of SDXL's two encoders came once, for both prompts"
            );
        }
        // Warm, it stays as it was loaded, and each job needs room for the visit again.
        assert_eq!(
            engine.make_room(&job).unwrap().text,
            TextPlacement::Visiting
        );
        let short = engine.with_available_memory(move || visit - 1);
        match short.make_room(&job) {
            Err(EngineError::OutOfMemory(message)) => {
                assert!(message.contains(&crate::human::bytes(visit)), "{message}")
            }
            other => panic!("{other:?}"),
        }

        // A byte less and an encoder does not fit beside the weights: on the CPU.
        assert_eq!(placed(room - 1, u64::MAX, visit), TextPlacement::Cpu);
        // With room for everything they stay with the model.
        assert_eq!(placed(u64::MAX, u64::MAX, visit), TextPlacement::WithModel);
        // The budget bounds the loaded weights, not a visit (a job's passing need, as its
        // working memory is): holding the weights without the encoders alone, they visit.
        assert_eq!(
            placed(u64::MAX, without_text, visit),
            TextPlacement::Visiting
        );
    }

    /// What `job()` needs beside the tiny model's weights on the CPU's most saving plan.
    fn least_working(served: &ServedModel) -> u64 {
        served.working.bytes(
            64,
            64,
            1,
            true,
            Plan::most_saving(Convolutions::Direct),
            DeviceKernels::CPU,
        )
    }

    /// Makes the tiny SDXL's larger text encoder need `bytes` while it visits the device.
    fn set_visit_bytes(engine: &CandleEngine, bytes: u64) {
        engine
            .models
            .lock()
            .unwrap()
            .get_mut("tiny-sdxl")
            .unwrap()
            .visit_bytes = bytes;
    }

    /// The CPU engine, told it convolves as a GPU does (column buffers) and that `room` is
    /// free; its served tiny SDXL; and a 1024² job for it.
    fn gpu_like(room: u64) -> CandleEngine {
        let engine = tiny_sdxl_engine().with_available_memory(move || room);
        *engine.kernels.lock().unwrap() = GPU_LIKE;
        engine
    }

    fn served_tiny_sdxl() -> ServedModel {
        gpu_like(0).models.lock().unwrap()["tiny-sdxl"].clone()
    }

    fn job_at_1024() -> JobSpec {
        let mut big = job();
        (big.width, big.height) = (1024, 1024);
        big
    }

    #[test]
    fn a_gpu_plans_with_bands_and_chunks_first_and_tiles_only_when_short() {
        let served = served_tiny_sdxl();
        let big = job_at_1024();
        let need =
            |plan| served.memory_bytes + served.working.bytes(1024, 1024, 1, true, plan, GPU_LIKE);
        let [first, tiled, least] = Plan::choices(Convolutions::Im2col) else {
            panic!("three GPU plans");
        };
        for (room, expected) in [
            (u64::MAX, *first),
            (need(*tiled), *tiled),
            (need(*least), *least),
        ] {
            assert_eq!(gpu_like(room).make_room(&big).unwrap().plan, expected);
        }
        assert!(first.vae_tiling.is_none() && first.conv.max_column_values.is_some());
        assert!(matches!(
            gpu_like(need(*least) - 1).make_room(&big),
            Err(EngineError::OutOfMemory(_))
        ));
    }

    #[test]
    fn the_pool_hands_the_steps_memory_back_before_the_decode_only_where_both_would_not_fit() {
        let served = served_tiny_sdxl();
        let big = job_at_1024();
        let first = Plan::choices(Convolutions::Im2col)[0];
        let estimate = served
            .working
            .estimate(1024, 1024, 1, true, first, GPU_LIKE);
        assert!(estimate.steps > 0 && estimate.decode > 0);
        let weights = served.memory_bytes;
        let [reused, held] = [estimate.peak(), estimate.peak_if_held()].map(|peak| weights + peak);
        assert!(held > reused, "holding both stretches needs more");
        // Room for both held together: the pool is kept through the job.
        let roomy = gpu_like(held).make_room(&big).unwrap();
        assert_eq!(roomy.plan, first);
        assert!(!roomy.hand_back_before_decode);
        // Room for the larger stretch alone: the same plan, the pool handed back between.
        let tight = gpu_like(held - 1).make_room(&big).unwrap();
        assert_eq!(tight.plan, first);
        assert!(tight.hand_back_before_decode);
        assert!(
            gpu_like(reused)
                .make_room(&big)
                .unwrap()
                .hand_back_before_decode
        );
    }

    /// A GPU's kernels as the CPU engine's tests take them: column buffers, composed attention.
    const GPU_LIKE: DeviceKernels = DeviceKernels {
        convolutions: Convolutions::Im2col,
        attention: AttentionKernel::Composed,
    };

    #[test]
    fn each_job_is_placed_by_the_kernels_the_device_runs_then() {
        // Room for the job with a fused attention kernel (no scores held), not without: a
        // kernel switched off after the model was checked (a race lost) must count.
        let fused = DeviceKernels {
            attention: AttentionKernel::Fused,
            ..DeviceKernels::CPU
        };
        let served = served_tiny_sdxl();
        let big = job_at_1024();
        let need = |kernels: DeviceKernels| {
            Plan::choices(kernels.convolutions)
                .iter()
                .map(|plan| {
                    served.memory_bytes + served.working.bytes(1024, 1024, 1, true, *plan, kernels)
                })
                .min()
                .unwrap()
        };
        let room = need(fused);
        assert!(
            need(DeviceKernels::CPU) > room,
            "scores must cost something here"
        );
        let engine = tiny_sdxl_engine().with_available_memory(move || room);
        *engine.kernels.lock().unwrap() = fused;
        assert!(engine.make_room(&big).is_ok());
        *engine.kernels.lock().unwrap() = DeviceKernels::CPU;
        assert!(matches!(
            engine.make_room(&big),
            Err(EngineError::OutOfMemory(_))
        ));
    }
}

//! What the engine's tests share: an engine serving the tiny SDXL fixture on the CPU, and a
//! small guided job for it.

use std::path::Path;
use std::time::Duration;

use super::CandleEngine;
use crate::vocab::device::DevicePreference;
use crate::vocab::job::{JobSpec, Scheduler};

/// A CPU engine serving the tiny SDXL fixture as `tiny-sdxl`.
pub(super) fn tiny_sdxl_engine() -> CandleEngine {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-sdxl");
    let models = [("tiny-sdxl".to_owned(), root)].into_iter().collect();
    let device = crate::engine::device::select(DevicePreference::Cpu).unwrap();
    let (engine, refused) = CandleEngine::new(device, &models, 0);
    assert!(refused.is_empty(), "{refused:?}");
    engine
}

/// A guided 64² job of two steps for `tiny-sdxl`, its negative prompt empty.
pub(super) fn job() -> JobSpec {
    JobSpec {
        job_id: "j1".to_owned(),
        model: "tiny-sdxl".to_owned(),
        prompt: "a red fox".to_owned(),
        negative_prompt: String::new(),
        width: 64,
        height: 64,
        steps: 2,
        guidance_scale: 5.0,
        seed: 3,
        num_images: 1,
        scheduler: Some(Scheduler::Euler),
        lease: Duration::ZERO,
    }
}

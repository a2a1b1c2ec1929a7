//! The image engine as the job pipeline sees it: a small trait, so the pipeline is the same
//! whether the images come from candle on a GPU or from a test engine.
//!
//! The contract: [`Engine::generate`] runs on a blocking thread, reports each stage and
//! denoising step through `progress`, checks `cancel` between steps (and returns
//! [`EngineError::Cancelled`] when it is set), and returns the images with the seed it used.

pub mod candle_engine;
pub mod device;
pub mod gpu_memory;
pub mod kernel_cache;
pub mod kernels;
pub(crate) mod noise;
pub mod profile;
pub mod sd;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::vocab::device::DeviceInfo;
use crate::vocab::job::{EngineLimits, JobSpec, Scheduler};
use crate::vocab::progress::JobProgress;

/// Finished images (8-bit RGB, `width × height` each), the seed and the sampler that made
/// them.
#[derive(Clone, Debug)]
pub struct Generated {
    pub images: Vec<image::RgbImage>,
    pub seed: u64,
    /// The job's sampler, or the model's default when the job named none.
    pub sampler: Scheduler,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// `cancel` was set; the reason is in the token.
    #[error("stopped before it finished")]
    Cancelled,
    /// Not enough GPU (or CPU) memory for this job; the engine stays usable.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    #[error("model unavailable: {0}")]
    ModelUnavailable(String),
    /// Anything else. The message is shown to the studio: no paths, no secrets.
    #[error("{0}")]
    Internal(String),
    /// The job failed and the GPU no longer works in this process (a fault in a kernel, a
    /// driver reset after a game crashed it): every later call fails the same way, until the
    /// process starts again (NVIDIA's rule for these errors).
    #[error("the GPU stopped working: {0}")]
    DeviceLost(String),
}

/// A model the engine was asked to serve but cannot, and why: its folder does not pass the
/// checks, or its weights exceed the memory budget.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefusedModel {
    pub model_id: String,
    pub reason: String,
}

/// Why a model folder is not served.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServeError {
    /// The folder cannot run (a missing file, an architecture the engine does not know, a
    /// tensor of the wrong shape…): the person fixes or replaces it.
    #[error("{0}")]
    Unusable(String),
    /// This engine serves a fixed set of models.
    #[error("this engine cannot add models while running")]
    Fixed,
}

/// Why a job is being stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum StopReason {
    /// The person who submitted it cancelled it (`cancel: true`).
    CancelledByStudio = 1,
    /// The lease is gone (`409`/`410`): the job belongs to someone else now.
    LeaseLost = 2,
    /// The person paused the worker: the job goes back with `paused`.
    Paused = 3,
    /// The worker is quitting: the job goes back too.
    ShuttingDown = 4,
}

/// Set by the job loop, read by the engine between steps. The first reason wins.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicU8>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self, reason: StopReason) {
        let _ = self
            .0
            .compare_exchange(0, reason as u8, Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst) != 0
    }

    pub fn reason(&self) -> Option<StopReason> {
        match self.0.load(Ordering::SeqCst) {
            1 => Some(StopReason::CancelledByStudio),
            2 => Some(StopReason::LeaseLost),
            3 => Some(StopReason::Paused),
            4 => Some(StopReason::ShuttingDown),
            _ => None,
        }
    }
}

/// A candle error's first line: candle appends a backtrace when one was captured, which
/// must not reach the person or the studio.
pub(crate) fn first_line(error: &candle_core::Error) -> String {
    error
        .to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

pub trait Engine: Send + Sync + 'static {
    /// Size and count limits.
    fn limits(&self) -> EngineLimits;

    /// The device it runs on, for capabilities and the window.
    fn device_info(&self) -> DeviceInfo {
        crate::platform::host::cpu_device()
    }

    /// What the person should know about its device: why it runs on the CPU when a GPU was
    /// wanted (`auto`'s fallback reason), or why a GPU runs in f32.
    fn device_note(&self) -> Option<String> {
        None
    }

    /// Ids of the models that are on disk, verified and can run now.
    fn ready_models(&self) -> Vec<String>;

    /// The models it was given when it started but cannot serve, and why (a model served
    /// later, after its download, answers in [`Engine::serve`]'s error instead).
    fn refused_models(&self) -> Vec<RefusedModel> {
        Vec::new()
    }

    /// Runs one validated job. Called from a blocking thread, one job at a time.
    fn generate(
        &self,
        job: &JobSpec,
        progress: &mut dyn FnMut(JobProgress),
        cancel: &CancelToken,
    ) -> Result<Generated, EngineError>;

    /// Starts serving a model that just arrived (a finished download). Engines that serve a
    /// fixed set refuse.
    fn serve(&self, model_id: &str, folder: &std::path::Path) -> Result<(), ServeError> {
        let _ = (model_id, folder);
        Err(ServeError::Fixed)
    }

    /// Stops serving `model_id` (unticked in the settings): from now on it is neither
    /// advertised nor claimed, and its weights leave memory (at once, or when a job running
    /// with it ends). Engines that serve a fixed set keep it.
    fn forget(&self, model_id: &str) {
        let _ = model_id;
    }

    /// Gives GPU memory back (called while paused, when the setting asks for it).
    fn unload(&self) {}

    /// Whether [`Engine::prepare`] has work to do (a GPU whose kernels the driver compiles).
    fn needs_preparing(&self) -> bool {
        false
    }

    /// Makes the device ready before the first job (compiles the GPU's kernels, once after
    /// an install or a driver update), calling `time_left` with its estimate of the time
    /// still needed as it goes. Called from a blocking thread before the first claim.
    fn prepare(&self, time_left: &mut dyn FnMut(std::time::Duration)) -> Result<(), EngineError> {
        let _ = time_left;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_stop_reason_wins() {
        let cancel = CancelToken::new();
        assert!(!cancel.is_cancelled());
        cancel.cancel(StopReason::Paused);
        cancel.cancel(StopReason::LeaseLost);
        assert_eq!(cancel.reason(), Some(StopReason::Paused));
        assert!(cancel.clone().is_cancelled(), "clones share the flag");
    }
}

//! [`CandleEngine`]: the [`Engine`] the worker runs, on candle.
//!
//! It owns the device, the list of model folders it may serve (checked when the engine is
//! made, so only runnable models are advertised), and the loaded pipelines: warm between
//! jobs, least recently used first out when a new one would not fit the memory budget, all
//! dropped by [`Engine::unload`] so a paused worker gives the GPU back.
//!
//! What a served model takes is in `served`; where a job runs within the memory free, and
//! what the engine advertises, in `placement`.

mod placement;
mod served;
#[cfg(test)]
mod test_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use candle_core::DType;

use self::placement::Placement;
use self::served::{ServedModel, check_folder};
use super::device::{DeviceError, Precision, SelectedDevice};
use super::sd::working_memory::{DeviceKernels, Plan};
use super::sd::{Request, SdError, StableDiffusion, Stage as SdStage, TextPlacement};
use super::{CancelToken, Engine, EngineError, Generated, RefusedModel, ServeError};
use crate::vocab::device::{DeviceInfo, DevicePreference};
use crate::vocab::job::{EngineLimits, JobSpec};
use crate::vocab::progress::{JobProgress, Stage};

/// Share of the device's memory loaded models may take when no budget is set.
const DEFAULT_BUDGET_SHARE: f64 = 0.8;

/// The bytes of memory free now: the GPU's, or on the CPU the machine's available RAM.
type AvailableMemory = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Whether the device still works, asked after a job failed: `Some(why)` where it does not.
type DeviceProbe = Arc<dyn Fn() -> Option<String> + Send + Sync>;

struct Loaded {
    model_id: String,
    pipeline: Arc<StableDiffusion>,
    /// What it holds on the device (its text encoders' share not, when they are on the CPU
    /// or visit).
    memory_bytes: u64,
    /// Where its text encoders are.
    text: TextPlacement,
}

pub struct CandleEngine {
    device: SelectedDevice,
    /// Grows when a download finishes.
    models: Mutex<BTreeMap<String, ServedModel>>,
    /// Most recently used last.
    loaded: Mutex<Vec<Loaded>>,
    budget_bytes: u64,
    available_memory: AvailableMemory,
    device_probe: DeviceProbe,
    /// How the device convolves and runs the UNet's attention, which decides what a job
    /// holds beside its tensors: read again once the device's kernels were raced (a kernel
    /// that lost is off from then on).
    kernels: Mutex<DeviceKernels>,
    /// Whether a model's text encoders may leave the device to give it room, to visit it for
    /// each prompt or to run on the CPU (on a GPU; on the CPU they are there already).
    text_can_move: bool,
    /// The models given at the start that it does not serve, and why.
    refused: Vec<RefusedModel>,
}

impl CandleEngine {
    /// An engine on `device` serving the folders in `models` (id → diffusers folder).
    /// Folders that fail the checks are left out and returned with their reason.
    /// `budget_mb == 0` means 80 % of the device's memory (no limit when the device does not
    /// say how much it has).
    pub fn new(
        device: SelectedDevice,
        models: &BTreeMap<String, PathBuf>,
        budget_mb: u64,
    ) -> (Self, Vec<RefusedModel>) {
        let budget_bytes = if budget_mb > 0 {
            budget_mb * 1024 * 1024
        } else if device.info.memory_mb > 0 {
            (device.info.memory_mb as f64 * DEFAULT_BUDGET_SHARE) as u64 * 1024 * 1024
        } else {
            u64::MAX
        };
        let available_memory: AvailableMemory = if device.device.is_cpu() {
            Arc::new(available_ram)
        } else {
            let gpu = device.device.clone();
            // Unknown: do not refuse on a guess.
            Arc::new(move || super::gpu_memory::free_bytes(&gpu).unwrap_or(u64::MAX))
        };
        let text_can_move = !device.device.is_cpu();
        let kernels = Mutex::new(DeviceKernels::before_preparing(
            &device.device,
            device.precision.compute,
        ));
        let probed = device.device.clone();
        // A GPU whose context a fault left unusable fails even a bare wait for its stream
        // (the error is sticky); a working one, idle after the failed job, passes at once.
        let device_probe: DeviceProbe = Arc::new(move || {
            probed
                .synchronize()
                .err()
                .map(|error| readable_driver_error(&super::first_line(&error)))
        });
        let mut engine = Self {
            device,
            models: Mutex::new(BTreeMap::new()),
            loaded: Mutex::new(Vec::new()),
            budget_bytes,
            available_memory,
            device_probe,
            kernels,
            text_can_move,
            refused: Vec::new(),
        };
        let mut refused = Vec::new();
        for (model_id, root) in models {
            match engine.checked(root) {
                Ok(model) => {
                    engine
                        .models
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(model_id.clone(), model);
                }
                Err(reason) => refused.push(RefusedModel {
                    model_id: model_id.clone(),
                    reason,
                }),
            }
        }
        engine.refused.clone_from(&refused);
        (engine, refused)
    }

    /// The folder at `root` checked ([`check_folder`]), and its weights within the memory
    /// budget (its text encoders on the CPU where they may go): a model that cannot load is
    /// refused with what it needs, rather than served and failing every job as out of
    /// memory (and shrinking what the other models advertise).
    fn checked(&self, root: &Path) -> Result<ServedModel, String> {
        let model = check_folder(root, self.device.precision)?;
        let weights = model.device_bytes(self.least_text_placement());
        if weights > self.budget_bytes {
            return Err(format!(
                "its weights need about {} of {} memory{}, and this worker may use {} of it",
                crate::human::bytes(weights),
                if self.device.device.is_cpu() {
                    "the machine's"
                } else {
                    "the GPU's"
                },
                if self.text_can_move {
                    " with its text encoders on the CPU"
                } else {
                    ""
                },
                crate::human::bytes(self.budget_bytes)
            ));
        }
        Ok(model)
    }

    /// The same engine, told the memory free by `probe` instead of asking the machine (tests).
    pub fn with_available_memory(
        mut self,
        probe: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Self {
        self.available_memory = Arc::new(probe);
        self
    }

    /// The kernels its device runs jobs with.
    fn kernels(&self) -> DeviceKernels {
        *self.kernels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The same engine, its device's health told by `probe` (tests: a GPU that a fault left
    /// unusable).
    pub fn with_device_probe(
        mut self,
        probe: impl Fn() -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.device_probe = Arc::new(probe);
        self
    }

    /// Opens `preference` and serves `models`; the device's note (why the CPU, why f32) and
    /// each refused model are logged.
    pub fn start(
        preference: DevicePreference,
        models: &BTreeMap<String, PathBuf>,
        budget_mb: u64,
    ) -> Result<Self, DeviceError> {
        let device = super::device::select(preference)?;
        if let Some(note) = device.note() {
            tracing::warn!("{note}");
        }
        tracing::info!(
            "image engine on {} ({} MB)",
            device.info.name,
            device.info.memory_mb
        );
        let (engine, refused) = Self::new(device, models, budget_mb);
        for RefusedModel { model_id, reason } in refused {
            tracing::error!("model {model_id} cannot be served: {reason}");
        }
        Ok(engine)
    }

    /// The pipeline for `model_id`, loading it (its text encoders where `text` says, and
    /// making room) when it is not warm.
    fn pipeline(
        &self,
        model_id: &str,
        text: TextPlacement,
    ) -> Result<Arc<StableDiffusion>, EngineError> {
        let served = self
            .models
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(model_id)
            .cloned()
            .ok_or_else(|| EngineError::ModelUnavailable(format!("{model_id} is not served")))?;
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(index) = loaded.iter().position(|entry| entry.model_id == model_id) {
            let entry = loaded.remove(index);
            let pipeline = entry.pipeline.clone();
            loaded.push(entry);
            return Ok(pipeline);
        }
        // What comes onto the device to stay: with the text encoders on the CPU their weights
        // are in the machine's memory instead, and visiting ones come for each prompt.
        let weights = served.device_bytes(text);
        if weights > self.budget_bytes {
            return Err(EngineError::OutOfMemory(format!(
                "{model_id} needs about {} MB and the memory budget is {} MB",
                weights / (1024 * 1024),
                self.budget_bytes / (1024 * 1024)
            )));
        }
        while !loaded.is_empty()
            && loaded.iter().map(|entry| entry.memory_bytes).sum::<u64>() + weights
                > self.budget_bytes
        {
            let evicted = loaded.remove(0);
            tracing::info!("unloading {} to make room for {model_id}", evicted.model_id);
        }
        match text {
            TextPlacement::WithModel => {}
            TextPlacement::Visiting => tracing::info!(
                "the text encoders of {model_id} come onto the GPU for each job's prompts and \
                 leave after them, to leave the GPU room"
            ),
            TextPlacement::Cpu => {
                tracing::info!(
                    "the text encoders of {model_id} run on the CPU, to leave the GPU room"
                )
            }
        }
        let pipeline =
            StableDiffusion::load_placed(&served.root, &self.device.device, served.precision, text)
                .map_err(|error| engine_error(error, model_id))?;
        if served.vae_dtype == DType::F32 {
            // Its VAE overflowed in f16 on this device before.
            pipeline
                .upcast_vae()
                .map_err(|error| engine_error(error, model_id))?;
        }
        let pipeline = Arc::new(pipeline);
        loaded.push(Loaded {
            model_id: model_id.to_owned(),
            pipeline: pipeline.clone(),
            memory_bytes: weights,
            text,
        });
        Ok(pipeline)
    }

    /// `model_id`'s pipeline decodes in f32: where that is new (its VAE overflowed in f16
    /// and was upcast), its weights take more on the device from now on, its decodes more
    /// memory, and a later load upcasts at once.
    fn vae_upcast(&self, model_id: &str) {
        let mut models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(served) = models
            .get_mut(model_id)
            .filter(|served| served.vae_dtype != DType::F32)
        else {
            return;
        };
        let before = served.vae_bytes;
        served.upcast_vae();
        let extra = served.vae_bytes - before;
        drop(models);
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = loaded.iter_mut().find(|entry| entry.model_id == model_id) {
            entry.memory_bytes += extra;
        }
    }

    /// `model_id` computes in f32 over its f16 weights from now on, where it computed in f16
    /// (its UNet overflowed): its f16 pipeline unloaded, its weights and jobs counted anew.
    /// Whether that is new.
    fn widen(&self, model_id: &str) -> bool {
        let mut models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(served) = models
            .get_mut(model_id)
            .filter(|served| served.precision.compute == DType::F16)
        else {
            return false;
        };
        match check_folder(&served.root, Precision::WIDENED_F16) {
            Ok(widened) => *served = widened,
            Err(reason) => {
                tracing::error!("{model_id} cannot compute in f32: {reason}");
                return false;
            }
        }
        drop(models);
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        loaded.retain(|entry| entry.model_id != model_id);
        drop(loaded);
        super::gpu_memory::give_back(&self.device.device);
        true
    }

    /// Ids of the models warm in memory, least recently used first.
    pub fn loaded_models(&self) -> Vec<String> {
        self.loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|entry| entry.model_id.clone())
            .collect()
    }
}

impl Engine for CandleEngine {
    fn limits(&self) -> EngineLimits {
        self.limits_within_budget()
    }

    fn ready_models(&self) -> Vec<String> {
        self.models
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    fn refused_models(&self) -> Vec<RefusedModel> {
        self.refused.clone()
    }

    fn needs_preparing(&self) -> bool {
        !self.device.device.is_cpu()
    }

    fn prepare(&self, time_left: &mut dyn FnMut(Duration)) -> Result<(), EngineError> {
        if !self.needs_preparing() {
            return Ok(());
        }
        let device = &self.device.device;
        super::sd::warmup::compile_kernels(device, time_left);
        // The races are run: what the device runs from now on.
        *self.kernels.lock().unwrap_or_else(PoisonError::into_inner) =
            DeviceKernels::of(device, self.device.precision.compute);
        super::sd::warmup::run(device, self.device.precision)
            .map_err(|error| EngineError::Internal(format!("preparing the GPU failed: {error}")))
    }

    fn serve(&self, model_id: &str, folder: &Path) -> Result<(), ServeError> {
        let model = self.checked(folder).map_err(ServeError::Unusable)?;
        self.models
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(model_id.to_owned(), model);
        Ok(())
    }

    fn device_info(&self) -> DeviceInfo {
        self.device.info.clone()
    }

    fn device_note(&self) -> Option<String> {
        self.device.note().map(str::to_owned)
    }

    /// The job; where it fails, the device is asked whether it still works
    /// ([`EngineError::DeviceLost`] when not).
    fn generate(
        &self,
        job: &JobSpec,
        progress: &mut dyn FnMut(JobProgress),
        cancel: &CancelToken,
    ) -> Result<Generated, EngineError> {
        let result = self.run_job(job, progress, cancel);
        match result {
            Ok(_) | Err(EngineError::Cancelled) => result,
            Err(error) => match (self.device_probe)() {
                Some(lost) => {
                    tracing::error!("the GPU stopped working ({lost}); the job failed: {error}");
                    Err(EngineError::DeviceLost(lost))
                }
                None => Err(error),
            },
        }
    }

    fn forget(&self, model_id: &str) {
        self.models
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(model_id);
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        let before = loaded.len();
        // A job running with it holds its own reference: the weights go when it ends.
        loaded.retain(|entry| entry.model_id != model_id);
        if loaded.len() != before {
            tracing::info!("unloading {model_id}: no longer served");
            super::gpu_memory::give_back(&self.device.device);
        }
    }

    fn unload(&self) {
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        if !loaded.is_empty() {
            tracing::info!("unloading {} model(s)", loaded.len());
            loaded.clear();
            // Freed blocks go back to the pool; the pool hands them to the driver now.
            super::gpu_memory::give_back(&self.device.device);
        }
    }
}

impl CandleEngine {
    /// One job: its memory planned, its model loaded (or warm), the pipeline run.
    fn run_job(
        &self,
        job: &JobSpec,
        progress: &mut dyn FnMut(JobProgress),
        cancel: &CancelToken,
    ) -> Result<Generated, EngineError> {
        let total_steps = job.steps;
        let mut report = |stage: Stage, step: u32| {
            progress(JobProgress {
                stage,
                step,
                total_steps,
            });
        };
        report(Stage::LoadingModel, 0);
        let Placement {
            plan,
            text,
            hand_back_before_decode,
        } = self.make_room(job)?;
        // Freed memory stays pooled through the job and goes back after it.
        let pool = super::gpu_memory::hold_pool(&self.device.device);
        let pipeline = self.pipeline(&job.model, text)?;
        if cancel.is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        let request = Request {
            memory: plan,
            hand_back_before_decode,
            ..Request::from(job)
        };
        if plan != Plan::choices(self.kernels().convolutions)[0] {
            tracing::info!("saving memory: the job would not fit as it is ({plan:?})");
        }
        let sampler = job.scheduler.unwrap_or_else(|| pipeline.default_sampler());
        // The pools' peaks for the prompt and steps, then for the decode (a debug line, to set
        // against the placement's estimate; the marks are read and reset only for it).
        let device = &self.device.device;
        let pool_peaks = tracing::enabled!(tracing::Level::DEBUG);
        let take_pool_peaks = || {
            pool_peaks
                .then(|| super::gpu_memory::take_pool_peaks(device))
                .flatten()
        };
        let _ = take_pool_peaks();
        let mut steps_peaks = None;
        let result = pipeline.generate(
            &request,
            &mut |stage| match stage {
                SdStage::Encoding => report(Stage::Encoding, 0),
                SdStage::Denoising { step, .. } => report(Stage::Denoising, step as u32),
                SdStage::Decoding => {
                    steps_peaks = take_pool_peaks();
                    report(Stage::Decoding, total_steps);
                }
            },
            &|| cancel.is_cancelled(),
        );
        if let (Ok(_), Some(steps), Some(decode)) = (&result, steps_peaks, take_pool_peaks()) {
            tracing::debug!(
                "the GPU's pools in this job: the prompt and steps {steps}; the decode {decode}"
            );
        }
        if pipeline.vae_dtype() == DType::F32 {
            self.vae_upcast(&job.model);
        }
        match result {
            Ok(images) => Ok(Generated {
                images,
                seed: job.seed,
                sampler,
            }),
            Err(error) => {
                if let SdError::NotFinite {
                    part: crate::engine::profile::Part::Unet,
                    dtype: DType::F16,
                } = error
                    && self.widen(&job.model)
                {
                    // A card whose f16 arithmetic is off (the list in `device` names the
                    // known ones), or a model whose numbers outgrow f16: in f32 over the same
                    // f16 weights the job runs again, and the model's later jobs so.
                    tracing::warn!(
                        "the UNet's numbers overflowed in f16 on the {}: {} computes in f32 over \
                         its f16 weights from now on, slower in the same memory for its weights \
                         ({}=widened does so for every model from the start); the job runs again",
                        self.device.info.name,
                        job.model,
                        super::device::PRECISION_VARIABLE
                    );
                    drop(pipeline);
                    drop(pool);
                    return self.run_job(job, progress, cancel);
                }
                let error = engine_error(error, &job.model);
                if matches!(error, EngineError::OutOfMemory(_)) {
                    // Give back everything so the next job starts from a clean device.
                    self.unload();
                }
                Err(error)
            }
        }
    }
}

/// The machine's RAM available now.
fn available_ram() -> u64 {
    match sysinfo::System::new() {
        Ok(mut system) => {
            system.refresh_memory();
            system.available_memory()
        }
        // Unknown: do not refuse on a guess.
        Err(_) => u64::MAX,
    }
}

/// A CUDA driver error as the driver words it, then its name: cudarc writes
/// `DriverError(CUDA_ERROR_LAUNCH_TIMEOUT, "the launch timed out and was terminated")`,
/// this `the launch timed out and was terminated (CUDA_ERROR_LAUNCH_TIMEOUT)`. Other text
/// stays as it is; either way one line of at most 200 characters.
fn readable_driver_error(text: &str) -> String {
    const START: &str = "DriverError(";
    let readable = text.find(START).and_then(|at| {
        let inside = &text[at + START.len()..];
        let (name, rest) = inside.split_once(", \"")?;
        let (description, after) = rest.split_once("\")")?;
        Some(format!("{}{description} ({name}){after}", &text[..at]))
    });
    crate::human::one_line(readable.as_deref().unwrap_or(text), 200)
}

fn engine_error(error: SdError, model_id: &str) -> EngineError {
    match error {
        SdError::Cancelled => EngineError::Cancelled,
        SdError::Folder(error) => EngineError::ModelUnavailable(format!("{model_id}: {error}")),
        SdError::Tokenizer(reason) => EngineError::Internal(format!("tokenizer: {reason}")),
        SdError::NotFinite { .. } => EngineError::Internal(error.to_string()),
        SdError::Tensor(error) => {
            // One short line: candle appends a backtrace when one was captured, and this
            // message goes to the studio.
            let message = crate::human::one_line(&super::first_line(&error), 200);
            let lower = message.to_lowercase();
            if lower.contains("out of memory") || lower.contains("out_of_memory") {
                EngineError::OutOfMemory(message)
            } else {
                EngineError::Internal(message)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::CancelToken;
    use test_support::{job, tiny_sdxl_engine};

    /// A CPU engine in `precision` (f16 or widening, as on a GPU) serving the folder at
    /// `root` as tiny-sd1.
    fn cpu_engine_in(precision: Precision, root: &Path) -> CandleEngine {
        let models = [("tiny-sd1".to_owned(), root.to_owned())]
            .into_iter()
            .collect();
        let device = SelectedDevice {
            precision,
            ..crate::engine::device::select(DevicePreference::Cpu).unwrap()
        };
        let (engine, refused) = CandleEngine::new(device, &models, 0);
        assert!(refused.is_empty(), "{refused:?}");
        engine
    }

    #[test]
    fn a_model_whose_vae_was_upcast_counts_it_in_f32_and_loads_it_so() {
        // An f16 engine (on the CPU) serving tiny-sd1, whose VAE decodes in f16.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-sd1");
        let engine = cpu_engine_in(Precision::uniform(DType::F16), &root);
        let served = |engine: &CandleEngine| engine.models.lock().unwrap()["tiny-sd1"].clone();
        let pipeline = |engine: &CandleEngine| engine.loaded.lock().unwrap()[0].pipeline.clone();
        let job = JobSpec {
            model: "tiny-sd1".to_owned(),
            steps: 1,
            guidance_scale: 0.0,
            ..job()
        };
        let before = served(&engine);
        assert_eq!(before.vae_dtype, DType::F16);
        engine
            .generate(&job, &mut |_| {}, &CancelToken::new())
            .unwrap();
        assert_eq!(pipeline(&engine).vae_dtype(), DType::F16);
        assert_eq!(served(&engine).memory_bytes, before.memory_bytes);

        // Its VAE overflowed in a job (`StableDiffusion::decode_checked` upcast it): the
        // engine counts it after that job.
        pipeline(&engine).upcast_vae().unwrap();
        engine
            .generate(&job, &mut |_| {}, &CancelToken::new())
            .unwrap();
        let after = served(&engine);
        assert_eq!(after.vae_dtype, DType::F32);
        assert_eq!(after.vae_bytes, 2 * before.vae_bytes);
        assert_eq!(after.memory_bytes, before.memory_bytes + before.vae_bytes);
        assert_eq!(
            engine.loaded.lock().unwrap()[0].memory_bytes,
            after.memory_bytes
        );
        let decode = |model: &ServedModel| {
            model
                .working
                .bytes(512, 512, 1, false, Plan::WHOLE, DeviceKernels::CPU)
        };
        assert!(decode(&after) > decode(&before), "an f32 decode holds more");

        // Loaded again, it decodes in f32 at once.
        engine.unload();
        engine
            .generate(&job, &mut |_| {}, &CancelToken::new())
            .unwrap();
        assert_eq!(pipeline(&engine).vae_dtype(), DType::F32);
        assert_eq!(
            served(&engine).memory_bytes,
            after.memory_bytes,
            "counted once"
        );
    }

    #[test]
    fn an_engine_that_widens_counts_its_weights_in_f16_and_its_jobs_widened_copies() {
        // The GTX 16 series' precision (here on the CPU): f32 arithmetic, f16 weights.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-sd1");
        let engine = cpu_engine_in(Precision::WIDENED_F16, &root);
        let widened = engine.models.lock().unwrap()["tiny-sd1"].clone();
        let f32_model = check_folder(&root, DType::F32.into()).unwrap();
        let f16_model = check_folder(&root, DType::F16.into()).unwrap();
        // Held in f16: an f16 model's weights, the VAE's included (it computes in f32).
        assert_eq!(widened.memory_bytes, f16_model.memory_bytes);
        assert_eq!(widened.memory_bytes * 2, f32_model.memory_bytes);
        assert_eq!(widened.vae_dtype, DType::F32);
        // Its jobs: f32 activations, and the largest weight widened beside them.
        let job_bytes = |model: &ServedModel| {
            model
                .working
                .bytes(64, 64, 1, true, Plan::WHOLE, DeviceKernels::CPU)
        };
        assert!(job_bytes(&widened) > job_bytes(&f32_model));

        let job = JobSpec {
            model: "tiny-sd1".to_owned(),
            steps: 1,
            ..job()
        };
        let generated = engine
            .generate(&job, &mut |_| {}, &CancelToken::new())
            .unwrap();
        assert_eq!(generated.images.len(), 1);
        assert_eq!(
            engine.loaded.lock().unwrap()[0].memory_bytes,
            widened.memory_bytes
        );
    }

    #[test]
    fn a_model_whose_unet_overflows_f16_computes_in_f32_over_its_f16_weights_from_then_on() {
        // A copy of tiny-sd1 whose UNet's last bias is beyond f16's range: infinite in f16
        // (its UNet's output too, so the job's latents), finite in f32.
        let folder = tempfile::tempdir().unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-sd1");
        copy_folder(&fixture, folder.path());
        let unet = folder
            .path()
            .join("unet/diffusion_pytorch_model.safetensors");
        let mut tensors = candle_core::safetensors::load(&unet, &candle_core::Device::Cpu).unwrap();
        let bias = tensors.get_mut("conv_out.bias").unwrap();
        *bias = (&*bias * 1e6).unwrap();
        candle_core::safetensors::save(&tensors, &unet).unwrap();

        let engine = cpu_engine_in(Precision::uniform(DType::F16), folder.path());
        let served = |engine: &CandleEngine| engine.models.lock().unwrap()["tiny-sd1"].clone();
        let before = served(&engine);
        assert_eq!(before.precision, Precision::uniform(DType::F16));
        let job = JobSpec {
            model: "tiny-sd1".to_owned(),
            steps: 1,
            ..job()
        };
        let mut stages = Vec::new();
        let generated = engine
            .generate(
                &job,
                &mut |progress| stages.push(progress.stage),
                &CancelToken::new(),
            )
            .expect("runs again in f32");
        assert_eq!(generated.images.len(), 1);
        // Tried in f16, then again from the start.
        let loads = stages
            .iter()
            .filter(|stage| **stage == Stage::LoadingModel)
            .count();
        assert_eq!(loads, 2, "{stages:?}");

        // Counted and loaded so from now on: the same weights' memory, f32 jobs.
        let after = served(&engine);
        assert_eq!(after.precision, Precision::WIDENED_F16);
        assert_eq!(after.memory_bytes, before.memory_bytes);
        let job_bytes = |model: &ServedModel| {
            model
                .working
                .bytes(64, 64, 1, true, Plan::WHOLE, DeviceKernels::CPU)
        };
        assert!(job_bytes(&after) > job_bytes(&before));
        let pipelines: Vec<_> = engine
            .loaded
            .lock()
            .unwrap()
            .iter()
            .map(|entry| entry.pipeline.clone())
            .collect();
        assert_eq!(pipelines.len(), 1, "the f16 pipeline went");
        assert_eq!(pipelines[0].vae_dtype(), DType::F32);
        let mut stages = Vec::new();
        engine
            .generate(
                &job,
                &mut |progress| stages.push(progress.stage),
                &CancelToken::new(),
            )
            .expect("runs in f32 at once");
        assert_eq!(stages.first(), Some(&Stage::LoadingModel));
        assert_eq!(
            stages
                .iter()
                .filter(|stage| **stage == Stage::LoadingModel)
                .count(),
            1
        );
    }

    #[test]
    fn a_failed_job_on_a_device_that_stopped_working_says_the_device_is_lost() {
        // A copy of tiny-sdxl whose UNet weights are cut short after the engine checked
        // them: loading fails, as a GPU fault would fail the job.
        let folder = tempfile::tempdir().unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-sdxl");
        copy_folder(&fixture, folder.path());
        let models = [("tiny-sdxl".to_owned(), folder.path().to_owned())]
            .into_iter()
            .collect();
        let engine = |probe: Option<&'static str>| {
            let device = crate::engine::device::select(DevicePreference::Cpu).unwrap();
            let (engine, refused) = CandleEngine::new(device, &models, 0);
            assert!(refused.is_empty(), "{refused:?}");
            match probe {
                Some(lost) => engine.with_device_probe(move || Some(lost.to_owned())),
                None => engine,
            }
        };
        let unet = folder
            .path()
            .join("unet/diffusion_pytorch_model.safetensors");
        let length = std::fs::metadata(&unet).unwrap().len();
        let lost = engine(Some("CUDA_ERROR_ILLEGAL_ADDRESS"));
        let working = engine(None);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&unet)
            .unwrap()
            .set_len(length / 2)
            .unwrap();

        let run = |engine: &CandleEngine| engine.generate(&job(), &mut |_| {}, &CancelToken::new());
        assert_eq!(
            run(&lost).unwrap_err(),
            EngineError::DeviceLost("CUDA_ERROR_ILLEGAL_ADDRESS".to_owned())
        );
        // The CPU's own probe: a failed job says nothing about the device.
        let failed = run(&working).unwrap_err();
        assert!(!matches!(failed, EngineError::DeviceLost(_)), "{failed:?}");
        // A cancelled job is not a failure: the device is not asked.
        let cancel = CancelToken::new();
        cancel.cancel(crate::engine::StopReason::Paused);
        let intact = tiny_sdxl_engine().with_device_probe(|| Some("lost".to_owned()));
        assert_eq!(
            intact.generate(&job(), &mut |_| {}, &cancel).unwrap_err(),
            EngineError::Cancelled
        );
    }

    fn copy_folder(from: &Path, to: &Path) {
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                std::fs::create_dir_all(&target).unwrap();
                copy_folder(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    #[test]
    fn a_driver_error_reads_as_the_driver_words_it_then_its_name() {
        assert_eq!(
            readable_driver_error(
                "DriverError(CUDA_ERROR_LAUNCH_TIMEOUT, \"the launch timed out and was \
                 terminated\")"
            ),
            "the launch timed out and was terminated (CUDA_ERROR_LAUNCH_TIMEOUT)"
        );
        assert_eq!(
            readable_driver_error(
                "Cuda(DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access was \
                 encountered\"))"
            ),
            "Cuda(an illegal memory access was encountered (CUDA_ERROR_ILLEGAL_ADDRESS))"
        );
        assert_eq!(readable_driver_error("no device"), "no device");
        assert_eq!(readable_driver_error("DriverError(odd"), "DriverError(odd");
    }

    #[test]
    fn an_overflow_fails_the_job_with_a_message_that_names_the_part() {
        let error = engine_error(
            SdError::NotFinite {
                part: crate::engine::profile::Part::Unet,
                dtype: DType::F16,
            },
            "sd-turbo",
        );
        let EngineError::Internal(message) = error else {
            panic!("{error:?}");
        };
        assert_eq!(
            message,
            "the UNet's numbers overflowed in f16 (NaN or infinity), so no image was made"
        );
    }

    #[test]
    fn a_model_whose_weights_exceed_the_budget_is_not_served_and_says_what_it_needs() {
        let fixture = |name: &str| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/models")
                .join(name)
        };
        let engine_with = |models: &[&str], budget_mb: u64| {
            let models: BTreeMap<String, PathBuf> = models
                .iter()
                .map(|name| ((*name).to_owned(), fixture(name)))
                .collect();
            let device = crate::engine::device::select(DevicePreference::Cpu).unwrap();
            CandleEngine::new(device, &models, budget_mb)
        };
        // 2 MiB: neither tiny model's f32 weights (2.25 and 2.82 MB) fit.
        let (engine, refused) = engine_with(&["tiny-sd1", "tiny-sdxl"], 2);
        assert!(engine.ready_models().is_empty());
        let reasons: Vec<&str> = refused.iter().map(|model| model.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "its weights need about 2.25 MB of the machine's memory, and this worker may use \
                 2.10 MB of it",
                "its weights need about 2.82 MB of the machine's memory, and this worker may use \
                 2.10 MB of it",
            ]
        );

        // A budget of tiny-sd1's weights exactly: it is served when its download finishes,
        // tiny-sdxl is refused the same way, and stays out of what the engine offers.
        let (mut engine, refused) = engine_with(&[], 0);
        assert!(refused.is_empty());
        engine.budget_bytes = check_folder(&fixture("tiny-sd1"), DType::F32.into())
            .unwrap()
            .memory_bytes;
        engine.serve("tiny-sd1", &fixture("tiny-sd1")).unwrap();
        match engine.serve("tiny-sdxl", &fixture("tiny-sdxl")) {
            Err(ServeError::Unusable(reason)) => {
                assert!(
                    reason.starts_with("its weights need about 2.82 MB"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(engine.ready_models(), ["tiny-sd1"]);
    }
}

//! A pipeline's UNet evaluations as one CUDA graph, kept from job to job (and its text
//! encoders' layers the same way: a text encoding is a one-step job whose input is the
//! prompt's token embeddings, [`GraphCache::new`] names the part). The first step of
//! a shape runs as always; its evaluation is then captured once into a graph (every kernel
//! launch, allocation and free of it, with every input read from buffers of the graph's
//! own: the latents, the timestep, and the job's conditioning) and the graph is checked
//! against that step's output. Every later step, of this job and of the pipeline's later
//! jobs of the same shape, fills the buffers and launches the graph: one launch instead of
//! the several hundred kernels an SD UNet step issues one by one, each with candle's
//! allocation and driver calls. At 512² on a fast GPU that launching is what a step costs:
//! an SD-Turbo UNet step took 22 ms on the H200 for about a millisecond of math, and a
//! graph kept between jobs spares a 1-step job its whole UNet's launching.
//!
//! Only where it can pay and cannot hurt: on CUDA, with memory plentiful (the device's
//! first plan; a job on any other plan drops the kept graph), not while profiling (the
//! profile times each kind of work), and not with `STUDIO_WORKER_CUDA_GRAPHS=0` or our
//! kernels off. And only where the first step shows the CPU's launching is a good part of a
//! step: its GPU time and the CPU's time issuing it are measured (two events), and a shape
//! the GPU takes much longer over than the CPU takes to issue (SDXL at 1024²) gains nothing
//! from a graph, so none is captured for it.
//!
//! A graph may cost speed, never images: the first graph of a shape in a process is
//! launched on the first step's inputs and compared with that step's output before any step
//! uses it, and the first time a kept graph serves another job of its shape (another
//! prompt), that step runs both ways and is compared again. A capture that fails, a launch
//! that fails or a graph that disagrees turns that part's graphs off for the process with a
//! warning (the other parts' stay), and its steps run one kernel at a time as before.
//!
//! A graph is launched only on the thread that captured it: candle caches the small uploads
//! its kernels read (dims and strides) per thread, and frees them with the thread. The
//! worker runs every job on one engine thread (`runtime::engine_thread`), so a kept graph
//! serves every job; elsewhere a job on another thread captures its own.
//!
//! Memory: the graph allocates from a pool of its own. What it holds goes back to the card
//! after each job's steps (before the decode), the graph itself staying; its next launch
//! maps the memory again. The graph goes when its pipeline is unloaded, when a job of
//! another shape comes, or when memory is short.

use std::sync::{Mutex, MutexGuard, PoisonError};

use candle_core::{DType, Device, Tensor};

use super::SdError;

/// The environment variable that turns the graphs off (`0`, `off` or `false`).
pub const SWITCH: &str = "STUDIO_WORKER_CUDA_GRAPHS";

/// The largest |graph − eager| / (1 + |eager|) a graph may be from the step it is checked
/// against: the same kernels on the same inputs, so equal, or apart by a GEMM's choice of
/// summation order; a graph reading a wrong buffer is off by the values themselves.
const TOLERANCE: f32 = 1e-2;

/// A graph is captured when the CPU took at least this share of the first step's GPU time
/// to issue it: below, the GPU was busy long after the CPU was done, and launching is not
/// what a step costs.
const LAUNCH_BOUND_SHARE: f64 = 0.5;

/// What a UNet evaluation is: `(latents, timesteps, the job's inputs)` → prediction, the
/// plan fixed. The job's inputs (the text conditioning; SDXL's pooled embedding and time
/// ids) are the same at every step of a job and differ between jobs.
pub type Evaluate<'a> = dyn Fn(&Tensor, &Tensor, &[Tensor]) -> Result<Tensor, SdError> + 'a;

/// A captured evaluation, as the steps use it.
trait Graph: Send {
    /// Fills its buffers of the job's inputs with another job's (same shapes and dtypes).
    fn bind(&self, job_inputs: &[Tensor]) -> Result<(), String>;
    /// The evaluation of `input` at `timestep` with the bound job's inputs.
    fn launch(&self, input: &Tensor, timestep: f64) -> Result<Tensor, String>;
}

/// Where graphs come from (the CUDA driver; a stand-in in the tests), and what the process
/// remembers of them.
trait Recorder: Send + Sync {
    /// Whether graphs of `part` may be used on `device` now.
    fn enabled(&self, device: &Device, part: &str) -> bool;
    /// Runs `step` and times it: its output, and `(GPU ms, CPU ms issuing it)` where it could
    /// be timed.
    fn timed(
        &self,
        device: &Device,
        step: &mut dyn FnMut() -> Result<Tensor, SdError>,
    ) -> Result<(Tensor, Option<(f64, f64)>), SdError>;
    /// Captures `evaluate` reading buffers of its own, first filled with `input`,
    /// `timesteps` and `job_inputs` (the step just run); the first time for its `shape` in
    /// the process, checked against that step's `expected` output.
    fn capture(
        &self,
        evaluate: &Evaluate<'_>,
        input: &Tensor,
        timesteps: &Tensor,
        job_inputs: &[Tensor],
        expected: &Tensor,
        shape: &str,
    ) -> Result<Box<dyn Graph>, String>;
    /// Gives back the memory graphs hold while none runs (the graphs stay).
    fn release_memory(&self, device: &Device);
    /// Turns `part`'s graphs off for the rest of the process, saying why once. The other
    /// parts' stay: a text encoder's failure costs the UNet nothing.
    fn fail(&self, part: &str, why: &str);
    /// Whether a graph of `shape` was compared while serving a job other than its capture's,
    /// and agreed.
    fn served_another_job(&self, shape: &str) -> bool;
    fn mark_served_another_job(&self, shape: &str);
}

/// A pipeline's graph of one model part between its jobs, and the shapes a graph would not
/// pay for.
pub struct GraphCache {
    /// What the graph evaluates, for the log ("the UNet's steps").
    part: &'static str,
    recorder: Box<dyn Recorder>,
    slot: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    /// The last captured evaluation, while no job uses it.
    graph: Option<Kept>,
    /// Shapes whose first step was bound by the GPU, not by the CPU's launching.
    declined: Vec<String>,
}

/// A graph between jobs, and what it may serve.
struct Kept {
    graph: Box<dyn Graph>,
    /// The shapes and plan of the evaluation it was captured from.
    shape: String,
    /// The thread that captured it. candle caches its small uploads (a kernel's dims and
    /// strides, which the graph's kernels read) per thread, and frees them with the thread:
    /// a graph is launched only on the thread that captured it.
    thread: std::thread::ThreadId,
    /// The job's inputs it was captured with: a later job's comparison vouches for other
    /// prompts only when that job's inputs are not these.
    captured_with: Vec<Tensor>,
}

impl GraphCache {
    /// An empty cache for `part`'s evaluations ("the UNet's steps"), on the CUDA driver.
    pub fn new(part: &'static str) -> Self {
        #[cfg(feature = "cuda")]
        let recorder: Box<dyn Recorder> = Box::new(cuda::CudaRecorder);
        #[cfg(not(feature = "cuda"))]
        let recorder: Box<dyn Recorder> = Box::new(NoGraphs);
        Self::with_recorder(part, recorder)
    }

    fn with_recorder(part: &'static str, recorder: Box<dyn Recorder>) -> Self {
        Self {
            part,
            recorder,
            slot: Mutex::new(Slot::default()),
        }
    }

    fn slot(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A job's steps: through the graph, or one kernel at a time.
pub struct StepGraphs<'a> {
    cache: &'a GraphCache,
    state: State,
    /// What a graph is the same as another's by: the evaluation's shapes and plan.
    shape: String,
    /// The job's inputs, for the steps that run one kernel at a time.
    job_inputs: Vec<Tensor>,
    /// The inputs the graph was captured with (once there is one).
    captured_with: Vec<Tensor>,
    device: Device,
}

enum State {
    /// Steps run one kernel at a time.
    Off,
    /// The next step is timed, and a graph captured after it where that pays.
    Wanted,
    /// Steps launch the graph. `checked`: its output may be used as it is: it was compared
    /// with an eager step of this job when captured, this job's inputs are the ones it was
    /// captured with, or a graph of its shape was compared while serving another prompt
    /// before, in this process. Unchecked, the next step runs both ways.
    Ready {
        graph: Box<dyn Graph>,
        checked: bool,
    },
}

impl<'a> StepGraphs<'a> {
    /// How a job on `device` runs its steps: through `cache`'s graph when it holds one of
    /// this `shape`, else toward capturing one. `first_plan`: the job runs the device's
    /// fastest plan, so memory is plentiful; `job_inputs` are what the evaluation reads
    /// besides the latents and the timestep.
    pub fn for_job(
        cache: &'a GraphCache,
        device: &Device,
        first_plan: bool,
        shape: String,
        job_inputs: &[Tensor],
    ) -> Self {
        let mut graphs = Self {
            cache,
            state: State::Off,
            shape,
            job_inputs: job_inputs.to_vec(),
            captured_with: Vec::new(),
            device: device.clone(),
        };
        if !cache.recorder.enabled(device, cache.part) {
            return graphs;
        }
        let mut slot = cache.slot();
        let kept = slot.graph.take();
        if !first_plan || slot.declined.contains(&graphs.shape) {
            // Memory is short, or a graph does not pay: none is made, and none kept.
            return graphs;
        }
        match kept {
            Some(Kept {
                graph,
                shape,
                thread,
                captured_with,
            }) if shape == graphs.shape && thread == std::thread::current().id() => {
                match graph.bind(job_inputs) {
                    Ok(()) => {
                        // The prompt it was captured with needs no comparison (nothing to
                        // bind differs); another needs one until one agreed for its shape.
                        let checked = cache.recorder.served_another_job(&graphs.shape)
                            || !inputs_differ(job_inputs, &captured_with);
                        graphs.state = State::Ready { graph, checked };
                        graphs.captured_with = captured_with;
                    }
                    Err(why) => cache.recorder.fail(cache.part, &why),
                }
                return graphs;
            }
            // Another shape's, or another thread's: its memory goes before this job's graph
            // takes its own.
            Some(other) => drop(other),
            None => {}
        }
        graphs.state = State::Wanted;
        graphs
    }

    /// One evaluation of `input` at `timestep`: through the graph where there is one, else
    /// `evaluate` one kernel at a time (the first step of a shape timed, and a graph
    /// captured after it where that pays).
    pub fn step(
        &mut self,
        evaluate: &Evaluate<'_>,
        input: &Tensor,
        timestep: f64,
    ) -> Result<Tensor, SdError> {
        let timesteps = || -> Result<Tensor, SdError> {
            let batch = input.dim(0)?;
            Ok((Tensor::ones(batch, DType::F32, input.device())? * timestep)?)
        };
        let recorder = &self.cache.recorder;
        match std::mem::replace(&mut self.state, State::Off) {
            State::Off => evaluate(input, &timesteps()?, &self.job_inputs),
            State::Wanted => self.first_step(evaluate, input, &timesteps()?),
            State::Ready {
                graph,
                checked: true,
            } => match graph.launch(input, timestep) {
                Ok(output) => {
                    self.state = State::Ready {
                        graph,
                        checked: true,
                    };
                    Ok(output)
                }
                Err(why) => {
                    recorder.fail(self.cache.part, &why);
                    evaluate(input, &timesteps()?, &self.job_inputs)
                }
            },
            State::Ready {
                graph,
                checked: false,
            } => {
                // The graph's first step for another job than the one it was captured in:
                // run both ways, and compared.
                let expected = evaluate(input, &timesteps()?, &self.job_inputs)?;
                let agreed = graph
                    .launch(input, timestep)
                    .and_then(|output| agrees(&output, &expected));
                match agreed {
                    Ok(()) => {
                        recorder.mark_served_another_job(&self.shape);
                        self.state = State::Ready {
                            graph,
                            checked: true,
                        };
                    }
                    Err(why) => {
                        recorder.fail(self.cache.part, &format!("for another prompt, {why}"))
                    }
                }
                Ok(expected)
            }
        }
    }

    /// The first step of a shape that has no graph: timed, and followed by a capture where
    /// the CPU's launching was a good part of it. A capture that fails turns this part's
    /// graphs off for the process.
    fn first_step(
        &mut self,
        evaluate: &Evaluate<'_>,
        input: &Tensor,
        timesteps: &Tensor,
    ) -> Result<Tensor, SdError> {
        let recorder = &self.cache.recorder;
        let (output, timing) = recorder.timed(&self.device, &mut || {
            evaluate(input, timesteps, &self.job_inputs)
        })?;
        let Some((gpu_ms, issued_ms)) = timing else {
            return Ok(output);
        };
        if issued_ms < LAUNCH_BOUND_SHARE * gpu_ms {
            tracing::debug!(
                "no CUDA graph for {}: a step took the GPU {gpu_ms:.1} ms, the CPU \
                 {issued_ms:.1} ms to issue",
                self.cache.part
            );
            self.cache.slot().declined.push(self.shape.clone());
            return Ok(output);
        }
        match recorder.capture(
            evaluate,
            input,
            timesteps,
            &self.job_inputs,
            &output,
            &self.shape,
        ) {
            Ok(graph) => {
                tracing::debug!(
                    "one CUDA graph for {} (a step took the GPU {gpu_ms:.1} ms, the CPU \
                     {issued_ms:.1} ms to issue)",
                    self.cache.part
                );
                // Checked against this step when captured (or its shape was before).
                self.captured_with = self.job_inputs.clone();
                self.state = State::Ready {
                    graph,
                    checked: true,
                };
            }
            Err(why) => recorder.fail(self.cache.part, &why),
        }
        Ok(output)
    }
}

impl Drop for StepGraphs<'_> {
    fn drop(&mut self) {
        if let State::Ready { graph, .. } = std::mem::replace(&mut self.state, State::Off) {
            // The graph stays for the pipeline's next job. The memory it holds goes back
            // now, before the decode; its next launch maps it again. It was captured on this
            // thread (or it would not have been launched on it).
            self.cache.recorder.release_memory(&self.device);
            self.cache.slot().graph = Some(Kept {
                graph,
                shape: std::mem::take(&mut self.shape),
                thread: std::thread::current().id(),
                captured_with: std::mem::take(&mut self.captured_with),
            });
        }
    }
}

/// `Ok` when a graph's `output` is within [`TOLERANCE`] of the eager step's `expected`.
fn agrees(output: &Tensor, expected: &Tensor) -> Result<(), String> {
    let difference = crate::engine::kernels::largest_relative_difference(output, expected)
        .map_err(|error| error.to_string())?;
    if difference.is_nan() || difference > TOLERANCE {
        return Err(format!(
            "its output is {difference} from the step run one kernel at a time \
             (allowed {TOLERANCE})"
        ));
    }
    Ok(())
}

/// Whether two jobs' inputs differ anywhere (an input that cannot be compared counts as
/// the same: it vouches for nothing).
fn inputs_differ(these: &[Tensor], those: &[Tensor]) -> bool {
    these.len() != those.len()
        || these.iter().zip(those).any(|(this, that)| {
            this.dims() != that.dims()
                || crate::engine::kernels::largest_relative_difference(this, that)
                    .is_ok_and(|difference| difference > 0.0)
        })
}

/// Whether [`SWITCH`] leaves the graphs on.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn switched_on() -> bool {
    !crate::engine::kernels::switched_off(&std::env::var(SWITCH).unwrap_or_default())
}

/// Builds without CUDA: steps run as they are.
#[cfg(not(feature = "cuda"))]
struct NoGraphs;

#[cfg(not(feature = "cuda"))]
impl Recorder for NoGraphs {
    fn enabled(&self, _device: &Device, _part: &str) -> bool {
        false
    }

    fn timed(
        &self,
        _device: &Device,
        step: &mut dyn FnMut() -> Result<Tensor, SdError>,
    ) -> Result<(Tensor, Option<(f64, f64)>), SdError> {
        Ok((step()?, None))
    }

    fn capture(
        &self,
        _evaluate: &Evaluate<'_>,
        _input: &Tensor,
        _timesteps: &Tensor,
        _job_inputs: &[Tensor],
        _expected: &Tensor,
        _shape: &str,
    ) -> Result<Box<dyn Graph>, String> {
        Err("this build has no CUDA".to_owned())
    }

    fn release_memory(&self, _device: &Device) {}

    fn fail(&self, _part: &str, _why: &str) {}

    fn served_another_job(&self, _shape: &str) -> bool {
        false
    }

    fn mark_served_another_job(&self, _shape: &str) {}
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::{Mutex, PoisonError};

    use candle_core::cuda_backend::cudarc::driver::{CudaGraph, sys};
    use candle_core::{DType, Device, Tensor};

    use super::{Evaluate, Graph, Recorder, SdError, agrees};
    use crate::engine::gpu_memory;
    use crate::engine::profile::GpuSpan;

    /// The parts whose capture, launch or comparison failed: no more graphs of theirs in
    /// this process.
    static FAILED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    /// The shapes whose graph was compared with its eager step and agreed.
    static VERIFIED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    /// The shapes whose kept graph was compared while serving another job, and agreed.
    static SERVED_ANOTHER_JOB: Mutex<Vec<String>> = Mutex::new(Vec::new());

    /// The CUDA driver's graphs, and the process's record of them.
    pub struct CudaRecorder;

    impl Recorder for CudaRecorder {
        fn enabled(&self, device: &Device, part: &str) -> bool {
            device.is_cuda()
                && !crate::engine::profile::is_enabled()
                && crate::engine::kernels::enabled()
                && super::switched_on()
                && !FAILED
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                    .any(|failed| failed == part)
        }

        fn timed(
            &self,
            device: &Device,
            step: &mut dyn FnMut() -> Result<Tensor, SdError>,
        ) -> Result<(Tensor, Option<(f64, f64)>), SdError> {
            let span = match device {
                Device::Cuda(cuda) => GpuSpan::start(cuda)
                    .map_err(|error| tracing::debug!("no timing event: {error}"))
                    .ok(),
                _ => None,
            };
            let output = step()?;
            Ok((output, span.and_then(stop_timing)))
        }

        fn capture(
            &self,
            evaluate: &Evaluate<'_>,
            input: &Tensor,
            timesteps: &Tensor,
            job_inputs: &[Tensor],
            expected: &Tensor,
            shape: &str,
        ) -> Result<Box<dyn Graph>, String> {
            let captured =
                Captured::capture(evaluate, input, timesteps, job_inputs, expected, shape)?;
            Ok(Box::new(captured))
        }

        fn release_memory(&self, device: &Device) {
            gpu_memory::trim_graph_memory(device);
        }

        fn fail(&self, part: &str, why: &str) {
            let mut failed = FAILED.lock().unwrap_or_else(PoisonError::into_inner);
            if !failed.iter().any(|known| known == part) {
                failed.push(part.to_owned());
                tracing::warn!(
                    "the CUDA graph of {part} did not work ({why}); its kernels launch one at \
                     a time for the rest of this run"
                );
            }
        }

        fn served_another_job(&self, shape: &str) -> bool {
            SERVED_ANOTHER_JOB
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .any(|known| known == shape)
        }

        fn mark_served_another_job(&self, shape: &str) {
            let mut served = SERVED_ANOTHER_JOB
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !served.iter().any(|known| known == shape) {
                served.push(shape.to_owned());
            }
        }
    }

    /// `(GPU ms, CPU ms issuing)` of `span`'s work, waiting for the GPU to finish it.
    fn stop_timing(span: GpuSpan) -> Option<(f64, f64)> {
        let ended = span
            .end()
            .map_err(|error| tracing::debug!("no timing: {error}"))
            .ok()?;
        let gpu = ended
            .gpu_time()
            .map_err(|error| tracing::debug!("no timing: {error}"))
            .ok()?;
        Some((gpu.as_secs_f64() * 1e3, ended.issued.as_secs_f64() * 1e3))
    }

    /// A CUDA graph that may move between threads.
    struct MovableGraph(CudaGraph);

    // SAFETY: graph objects are not internally synchronised, and NVIDIA's rule for them
    // ("Graph object thread safety" in the driver API) is that calls on one graph must not
    // overlap; which thread makes them does not matter. A `MovableGraph` is only ever used
    // by its one owner: the cache, under its mutex, or the job that took it out of it.
    unsafe impl Send for MovableGraph {}

    /// A captured evaluation: the graph and the buffers it reads and writes.
    pub struct Captured {
        graph: Option<MovableGraph>,
        input: Tensor,
        timesteps: Tensor,
        /// The job's inputs: filled once per job ([`Captured::bind`]).
        job_inputs: Vec<Tensor>,
        output: Tensor,
        device: Device,
    }

    impl Captured {
        /// Captures `evaluate` reading buffers of its own. The first time for its `shape` in
        /// this process, launches it on `input` at `timesteps` with `job_inputs` (the step
        /// just run) and checks it against that step's `expected` output.
        fn capture(
            evaluate: &Evaluate<'_>,
            input: &Tensor,
            timesteps: &Tensor,
            job_inputs: &[Tensor],
            expected: &Tensor,
            shape: &str,
        ) -> Result<Self, String> {
            let device = input.device().clone();
            let Device::Cuda(cuda) = &device else {
                return Err("not a CUDA device".to_owned());
            };
            let said = |error: candle_core::Error| error.to_string();
            // The buffers outlive the capture: what the graph reads and writes at each launch.
            let fresh = |tensor: &Tensor| tensor.contiguous().and_then(|tensor| tensor.copy());
            let input_buffer = fresh(input).map_err(said)?;
            let timesteps_buffer = fresh(timesteps).map_err(said)?;
            let job_buffers = job_inputs
                .iter()
                .map(fresh)
                .collect::<candle_core::Result<Vec<_>>>()
                .map_err(said)?;
            // SAFETY: every value is written by the graph before it is read.
            let output = unsafe { Tensor::empty(expected.shape(), expected.dtype(), &device) }
                .map_err(said)?;
            // The eager step's memory, pooled for reuse, goes back: the graph allocates from
            // a pool of its own.
            gpu_memory::trim_pool(&device);

            let stream = cuda.cuda_stream();
            stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(|error| format!("capture did not begin: {error}"))?;
            // Every tensor the evaluation makes is freed inside the capture but the copy in
            // `output`, so the graph can be launched again and again.
            let recorded = evaluate(&input_buffer, &timesteps_buffer, &job_buffers)
                .and_then(|out| output.slice_set(&out, 0, 0).map_err(SdError::from));
            // A failed capture's frees fail too, and cudarc keeps their errors for the next
            // call that binds the context: read them before ending the capture (which binds
            // it), so that the capture always ends and the stream leaves capture mode.
            let context = stream.context();
            let frees = context.check_err();
            let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
            if recorded.is_err() || frees.is_err() || ended.is_err() {
                // Nor may they surface in the job's next call.
                if let Err(error) = context.check_err() {
                    tracing::debug!("after the failed capture: {error}");
                }
            }
            recorded.map_err(|error| format!("the capture failed: {error}"))?;
            frees.map_err(|error| format!("the capture's frees failed: {error}"))?;
            let graph = ended
                .map_err(|error| format!("the graph did not instantiate: {error}"))?
                .ok_or_else(|| "the capture recorded nothing".to_owned())?;
            let captured = Self {
                graph: Some(MovableGraph(graph)),
                input: input_buffer,
                timesteps: timesteps_buffer,
                job_inputs: job_buffers,
                output,
                device,
            };
            let mut verified = VERIFIED.lock().unwrap_or_else(PoisonError::into_inner);
            if !verified.iter().any(|known| known == shape) {
                captured.run()?;
                agrees(&captured.output, expected)?;
                verified.push(shape.to_owned());
            }
            Ok(captured)
        }

        fn run(&self) -> Result<(), String> {
            let Some(MovableGraph(graph)) = &self.graph else {
                return Err("the graph is gone".to_owned());
            };
            graph
                .launch()
                .map_err(|error| format!("the graph did not launch: {error}"))
        }
    }

    impl Graph for Captured {
        fn bind(&self, job_inputs: &[Tensor]) -> Result<(), String> {
            if job_inputs.len() != self.job_inputs.len() {
                return Err(format!(
                    "the job has {} inputs, the graph {}",
                    job_inputs.len(),
                    self.job_inputs.len()
                ));
            }
            for (buffer, input) in self.job_inputs.iter().zip(job_inputs) {
                if buffer.dims() != input.dims() || buffer.dtype() != input.dtype() {
                    return Err(format!(
                        "a job's input is {:?} {:?}, the graph's {:?} {:?}",
                        input.dims(),
                        input.dtype(),
                        buffer.dims(),
                        buffer.dtype()
                    ));
                }
                input
                    .contiguous()
                    .and_then(|input| buffer.slice_set(&input, 0, 0))
                    .map_err(|error| error.to_string())?;
            }
            Ok(())
        }

        /// The buffers filled, the graph launched, its output copied out (the next launch
        /// overwrites the buffer).
        fn launch(&self, input: &Tensor, timestep: f64) -> Result<Tensor, String> {
            let said = |error: candle_core::Error| error.to_string();
            input
                .contiguous()
                .and_then(|input| self.input.slice_set(&input, 0, 0))
                .map_err(said)?;
            let batch = self.timesteps.dim(0).map_err(said)?;
            Tensor::ones(batch, DType::F32, &self.device)
                .and_then(|ones| ones * timestep)
                .and_then(|timesteps| self.timesteps.slice_set(&timesteps, 0, 0))
                .map_err(said)?;
            self.run()?;
            self.output.copy().map_err(said)
        }
    }

    impl Drop for Captured {
        fn drop(&mut self) {
            // The graph first (freed once its last launch is done), then the memory the
            // driver keeps for graphs, back to the card.
            drop(self.graph.take());
            gpu_memory::trim_graph_memory(&self.device);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    /// The stand-in evaluation: latents + timestep / 1000 + ten times the sum of the job's
    /// inputs, so an output says which inputs it was computed from, by far more than the
    /// comparison's tolerance.
    fn evaluation(
        latents: &Tensor,
        timestep: f64,
        job_inputs: &[Tensor],
    ) -> Result<Tensor, SdError> {
        let mut shift = timestep / 1000.0;
        for input in job_inputs {
            shift += 10.0 * f64::from(input.sum_all()?.to_scalar::<f32>()?);
        }
        Ok((latents + shift)?)
    }

    /// What the stand-in driver did, and how it misbehaves.
    #[derive(Default)]
    struct Record {
        timed: AtomicUsize,
        captures: AtomicUsize,
        launches: AtomicUsize,
        graphs_dropped: AtomicUsize,
        releases: AtomicUsize,
        failed: AtomicBool,
        served: Mutex<Vec<String>>,
        /// `(GPU ms, CPU ms)` of every timed step.
        timing: Mutex<Option<(f64, f64)>>,
        /// Graphs that keep the inputs of their capture whatever is bound (a stale prompt).
        stale: AtomicBool,
    }

    struct FakeRecorder(Arc<Record>);

    struct FakeGraph {
        record: Arc<Record>,
        job_inputs: Mutex<Vec<Tensor>>,
    }

    impl Graph for FakeGraph {
        fn bind(&self, job_inputs: &[Tensor]) -> Result<(), String> {
            if !self.record.stale.load(Ordering::SeqCst) {
                *self.job_inputs.lock().unwrap() = job_inputs.to_vec();
            }
            Ok(())
        }

        fn launch(&self, input: &Tensor, timestep: f64) -> Result<Tensor, String> {
            self.record.launches.fetch_add(1, Ordering::SeqCst);
            evaluation(input, timestep, &self.job_inputs.lock().unwrap())
                .map_err(|error| error.to_string())
        }
    }

    impl Drop for FakeGraph {
        fn drop(&mut self) {
            self.record.graphs_dropped.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Recorder for FakeRecorder {
        fn enabled(&self, _device: &Device, _part: &str) -> bool {
            !self.0.failed.load(Ordering::SeqCst)
        }

        fn timed(
            &self,
            _device: &Device,
            step: &mut dyn FnMut() -> Result<Tensor, SdError>,
        ) -> Result<(Tensor, Option<(f64, f64)>), SdError> {
            self.0.timed.fetch_add(1, Ordering::SeqCst);
            Ok((step()?, *self.0.timing.lock().unwrap()))
        }

        fn capture(
            &self,
            evaluate: &Evaluate<'_>,
            input: &Tensor,
            timesteps: &Tensor,
            job_inputs: &[Tensor],
            _expected: &Tensor,
            _shape: &str,
        ) -> Result<Box<dyn Graph>, String> {
            // A capture evaluates once more, as the driver's does.
            evaluate(input, timesteps, job_inputs).map_err(|error| error.to_string())?;
            self.0.captures.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(FakeGraph {
                record: self.0.clone(),
                job_inputs: Mutex::new(job_inputs.to_vec()),
            }))
        }

        fn release_memory(&self, _device: &Device) {
            self.0.releases.fetch_add(1, Ordering::SeqCst);
        }

        fn fail(&self, _part: &str, _why: &str) {
            self.0.failed.store(true, Ordering::SeqCst);
        }

        fn served_another_job(&self, shape: &str) -> bool {
            self.0
                .served
                .lock()
                .unwrap()
                .iter()
                .any(|known| known == shape)
        }

        fn mark_served_another_job(&self, shape: &str) {
            self.0.served.lock().unwrap().push(shape.to_owned());
        }
    }

    /// A pipeline's graph cache on the stand-in driver, where a step takes the GPU `gpu_ms`
    /// and the CPU `issued_ms` to issue.
    fn cache(gpu_ms: f64, issued_ms: f64) -> (GraphCache, Arc<Record>) {
        let record = Arc::new(Record::default());
        *record.timing.lock().unwrap() = Some((gpu_ms, issued_ms));
        let cache =
            GraphCache::with_recorder("the stand-in", Box::new(FakeRecorder(record.clone())));
        (cache, record)
    }

    /// Runs a job of `steps` steps with `prompt` as its conditioning through `cache`, checks
    /// every step's output against the evaluation on this job's inputs, and returns how many
    /// times the job evaluated one kernel at a time.
    fn job(cache: &GraphCache, shape: &str, first_plan: bool, prompt: f32, steps: usize) -> usize {
        let device = Device::Cpu;
        let conditioning = Tensor::full(prompt, (1, 2), &device).unwrap();
        let job_inputs = [conditioning];
        let input = Tensor::zeros((1, 4, 2, 2), DType::F32, &device).unwrap();
        let eager = AtomicUsize::new(0);
        let evaluate = |latents: &Tensor, timesteps: &Tensor, job_inputs: &[Tensor]| {
            eager.fetch_add(1, Ordering::SeqCst);
            let timestep = f64::from(timesteps.get(0)?.to_scalar::<f32>()?);
            evaluation(latents, timestep, job_inputs)
        };
        let mut graphs =
            StepGraphs::for_job(cache, &device, first_plan, shape.to_owned(), &job_inputs);
        for step in 0..steps {
            let timestep = 1000.0 - 100.0 * step as f64;
            let output = graphs.step(&evaluate, &input, timestep).unwrap();
            let expected = evaluation(&input, timestep, &job_inputs).unwrap();
            assert_eq!(
                output.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                expected.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "step {step} of the job with prompt {prompt}"
            );
        }
        eager.load(Ordering::SeqCst)
    }

    #[test]
    fn a_kept_graph_serves_the_next_jobs_with_their_own_prompts() {
        let (cache, record) = cache(2.0, 20.0);
        // The first job: its first step eager and timed, a capture, then the graph.
        assert_eq!(
            job(&cache, "512", true, 1.0, 4),
            2,
            "the step and the capture"
        );
        assert_eq!(record.captures.load(Ordering::SeqCst), 1);
        assert_eq!(record.launches.load(Ordering::SeqCst), 3);
        // Another prompt: its first step runs both ways and is compared, the rest launch.
        assert_eq!(job(&cache, "512", true, 2.0, 4), 1, "the comparison");
        assert_eq!(record.launches.load(Ordering::SeqCst), 7);
        // From then on, a 1-step job is one launch.
        assert_eq!(job(&cache, "512", true, 3.0, 1), 0);
        assert_eq!(record.launches.load(Ordering::SeqCst), 8);
        assert_eq!(record.captures.load(Ordering::SeqCst), 1, "captured once");
        assert_eq!(record.timed.load(Ordering::SeqCst), 1, "timed once");
        assert_eq!(
            record.releases.load(Ordering::SeqCst),
            3,
            "memory back after each job"
        );
        assert_eq!(
            record.graphs_dropped.load(Ordering::SeqCst),
            0,
            "the graph kept"
        );
        assert!(!record.failed.load(Ordering::SeqCst));
        drop(cache);
        assert_eq!(
            record.graphs_dropped.load(Ordering::SeqCst),
            1,
            "gone with its pipeline"
        );
    }

    #[test]
    fn a_graph_that_keeps_an_old_prompt_is_caught_and_its_output_never_used() {
        let (cache, record) = cache(2.0, 20.0);
        record.stale.store(true, Ordering::SeqCst);
        job(&cache, "512", true, 1.0, 4);
        // `job` checks every output against this job's own prompt: the stale graph's would
        // carry the first prompt's.
        assert_eq!(
            job(&cache, "512", true, 2.0, 4),
            4,
            "compared, then one kernel at a time"
        );
        assert!(record.failed.load(Ordering::SeqCst), "graphs off");
        assert_eq!(record.graphs_dropped.load(Ordering::SeqCst), 1);
        assert_eq!(job(&cache, "512", true, 3.0, 2), 2);
        assert_eq!(record.captures.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_same_prompt_again_does_not_vouch_for_other_prompts() {
        let (cache, record) = cache(2.0, 20.0);
        record.stale.store(true, Ordering::SeqCst);
        job(&cache, "512", true, 1.0, 2);
        // The same prompt: the graph as captured, launched without a comparison (nothing to
        // bind differs), which says nothing about other prompts.
        assert_eq!(job(&cache, "512", true, 1.0, 2), 0);
        assert!(!record.failed.load(Ordering::SeqCst));
        // So another prompt is compared, and the stale graph caught.
        assert_eq!(job(&cache, "512", true, 2.0, 2), 2);
        assert!(record.failed.load(Ordering::SeqCst));
    }

    #[test]
    fn a_shape_bound_by_the_gpu_takes_no_graph_and_is_not_timed_again() {
        let (cache, record) = cache(200.0, 20.0);
        assert_eq!(job(&cache, "1024", true, 1.0, 3), 3);
        assert_eq!(job(&cache, "1024", true, 2.0, 3), 3);
        assert_eq!(record.timed.load(Ordering::SeqCst), 1);
        assert_eq!(record.captures.load(Ordering::SeqCst), 0);
        assert!(!record.failed.load(Ordering::SeqCst));
    }

    #[test]
    fn short_memory_or_another_shape_drops_the_kept_graph() {
        let (cache, record) = cache(2.0, 20.0);
        job(&cache, "512", true, 1.0, 2);
        // A job on a memory-saving plan: no graph, and the kept one goes.
        assert_eq!(job(&cache, "512", false, 2.0, 2), 2);
        assert_eq!(record.graphs_dropped.load(Ordering::SeqCst), 1);
        job(&cache, "512", true, 3.0, 2);
        assert_eq!(record.captures.load(Ordering::SeqCst), 2, "captured again");
        // Another shape replaces it.
        job(&cache, "768", true, 4.0, 2);
        assert_eq!(record.graphs_dropped.load(Ordering::SeqCst), 2);
        assert_eq!(record.captures.load(Ordering::SeqCst), 3);
        assert!(!record.failed.load(Ordering::SeqCst));
    }

    #[test]
    fn a_graph_is_launched_only_on_the_thread_that_captured_it() {
        let (cache, record) = cache(2.0, 20.0);
        job(&cache, "512", true, 1.0, 2);
        // Another thread: the kept graph goes (its thread's uploads are not this one's), and
        // the job captures its own.
        std::thread::scope(|scope| {
            scope.spawn(|| assert_eq!(job(&cache, "512", true, 2.0, 2), 2));
        });
        assert_eq!(record.graphs_dropped.load(Ordering::SeqCst), 1);
        assert_eq!(record.captures.load(Ordering::SeqCst), 2);
        // Back here, that other thread's graph is not launched either.
        assert_eq!(job(&cache, "512", true, 3.0, 2), 2);
        assert_eq!(record.captures.load(Ordering::SeqCst), 3);
        assert!(!record.failed.load(Ordering::SeqCst));
    }

    #[test]
    fn a_one_step_job_without_job_inputs_launches_its_kept_graph_on_each_new_input() {
        // A text encoding: one step, its input the embedded prompt, nothing bound per job.
        let (cache, record) = cache(2.0, 20.0);
        let device = Device::Cpu;
        let eager = AtomicUsize::new(0);
        let evaluate = |input: &Tensor, _timesteps: &Tensor, job_inputs: &[Tensor]| {
            eager.fetch_add(1, Ordering::SeqCst);
            evaluation(input, 0.0, job_inputs)
        };
        for prompt in [1f32, 2.0, 3.0] {
            let input = Tensor::full(prompt, (1, 3), &device).unwrap();
            let output = StepGraphs::for_job(&cache, &device, true, "77".to_owned(), &[])
                .step(&evaluate, &input, 0.0)
                .unwrap();
            assert_eq!(output.to_vec2::<f32>().unwrap(), [[prompt; 3]], "{prompt}");
        }
        assert_eq!(
            eager.load(Ordering::SeqCst),
            2,
            "the first: its step and the capture"
        );
        assert_eq!(record.captures.load(Ordering::SeqCst), 1);
        assert_eq!(
            record.launches.load(Ordering::SeqCst),
            2,
            "each later input: one launch"
        );
        assert_eq!(record.releases.load(Ordering::SeqCst), 3);
        assert!(!record.failed.load(Ordering::SeqCst));
    }

    #[test]
    fn the_cpu_never_captures_and_its_steps_run_with_the_jobs_inputs() {
        // The default recorder: the CPU is never a graph's device.
        let cache = GraphCache::new("the stand-in");
        assert_eq!(job(&cache, "512", true, 1.0, 3), 3);
        assert_eq!(job(&cache, "512", true, 2.0, 3), 3);
    }
}

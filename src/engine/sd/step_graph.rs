//! A job's UNet evaluations as one CUDA graph. The first step runs as always; its evaluation
//! is then captured once into a graph (every kernel launch, allocation and free of it, with
//! the inputs read from buffers of the graph's own) and the graph is checked against that
//! step's output; the other steps copy their latents and timestep into the buffers and
//! launch the graph: one launch instead of the several hundred kernels an SD UNet step
//! issues one by one, each with candle's allocation and driver calls. At 512² on a fast GPU
//! that launching is what a step costs: an SD-Turbo UNet step took 22 ms on the H200 for
//! about a millisecond of math.
//!
//! Only where it can pay and cannot hurt: on CUDA, for three steps or more, with memory
//! plentiful (the device's first plan: the graph holds a step's memory in a pool of its
//! own while the job runs), not while profiling (the profile times each kind of work), and
//! not with `STUDIO_WORKER_CUDA_GRAPHS=0` or our kernels off. And only where the first step
//! shows the CPU's launching is a good part of a step: its GPU time and the CPU's time
//! issuing it are measured (two events), and a step the GPU takes much longer than the CPU
//! takes to issue (SDXL at 1024²) gains nothing from a graph, so none is captured.
//!
//! The first graph of a shape in a process is launched on the first step's inputs and
//! compared with that step's output before any step uses it; a capture that fails or a
//! graph that disagrees turns graphs off for the process with a warning, and that job and
//! the rest run step by step as before, so a graph costs speed, never images. Later jobs of
//! the same shape (the same capture of the same code) skip the comparison. The graph and
//! its memory are given back when the job's denoising ends.

use candle_core::{Device, Tensor};

use super::SdError;

/// The environment variable that turns the graphs off (`0`, `off` or `false`).
pub const SWITCH: &str = "STUDIO_WORKER_CUDA_GRAPHS";

/// The fewest steps a graph is worth capturing for: the first step runs eagerly, and
/// capturing costs about one more step's launching.
const FEWEST_STEPS: usize = 3;

/// The largest |graph − eager| / (1 + |eager|) a graph may be from the step it was captured
/// from: the same kernels on the same inputs, so equal, or apart by a GEMM's choice of
/// summation order; a graph reading a wrong buffer is off by the values themselves.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const TOLERANCE: f32 = 1e-2;

/// A graph is captured when the CPU took at least this share of the first step's GPU time
/// to issue it: below, the GPU was busy long after the CPU was done, and launching is not
/// what a step costs.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const LAUNCH_BOUND_SHARE: f64 = 0.5;

/// What a UNet evaluation is: `(latents, timesteps)` → prediction, the job's conditioning
/// and plan fixed.
pub type Evaluate<'a> = dyn Fn(&Tensor, &Tensor) -> Result<Tensor, SdError> + 'a;

/// A job's graph, from wanted to captured (or not at all).
pub struct StepGraphs {
    state: State,
    /// What a graph of this job is the same as another's by: the evaluation's shapes and plan.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    shape: String,
}

enum State {
    /// Steps run one kernel at a time.
    Off,
    /// The next eager step is timed, and a graph captured after it where that pays.
    Wanted,
    #[cfg(feature = "cuda")]
    Ready(cuda::Captured),
}

impl StepGraphs {
    /// Whether this job on `device`, of `steps` steps, may get a graph (`first_plan`: the job
    /// runs the device's fastest plan, so memory is plentiful); `shape` names its
    /// evaluations' shapes and plan.
    pub fn for_job(device: &Device, steps: usize, first_plan: bool, shape: String) -> Self {
        let wanted = device.is_cuda()
            && steps >= FEWEST_STEPS
            && first_plan
            && !crate::engine::profile::is_enabled()
            && crate::engine::kernels::enabled()
            && switched_on()
            && !cuda::failed_before();
        Self {
            state: if wanted { State::Wanted } else { State::Off },
            shape,
        }
    }

    /// The evaluation of `input` at `timestep` through the graph, or `None` when there is
    /// none: the caller then runs [`StepGraphs::eager`].
    pub fn launch(&mut self, input: &Tensor, timestep: f64) -> Result<Option<Tensor>, SdError> {
        match &self.state {
            State::Off | State::Wanted => {
                let _ = (input, timestep);
                Ok(None)
            }
            #[cfg(feature = "cuda")]
            State::Ready(captured) => captured.launch(input, timestep).map(Some),
        }
    }

    /// `evaluate` on `input` at `timesteps`, one kernel at a time. Where a graph is wanted
    /// (once per job) the step is timed, and a graph captured after it if the CPU's
    /// launching was a good part of it; a capture that fails turns graphs off for the
    /// process.
    pub fn eager(
        &mut self,
        evaluate: &Evaluate<'_>,
        input: &Tensor,
        timesteps: &Tensor,
    ) -> Result<Tensor, SdError> {
        if !matches!(self.state, State::Wanted) {
            return evaluate(input, timesteps);
        }
        self.state = State::Off;
        #[cfg(feature = "cuda")]
        {
            let span = cuda::start_timing(input.device());
            let output = evaluate(input, timesteps)?;
            let Some((gpu_ms, issued_ms)) = span.and_then(cuda::stop_timing) else {
                return Ok(output);
            };
            if issued_ms < LAUNCH_BOUND_SHARE * gpu_ms {
                tracing::debug!(
                    "no CUDA graph for the UNet: a step took the GPU {gpu_ms:.1} ms, the CPU \
                     {issued_ms:.1} ms to issue"
                );
                return Ok(output);
            }
            match cuda::Captured::capture(evaluate, input, timesteps, &output, &self.shape) {
                Ok(captured) => {
                    tracing::debug!(
                        "the UNet's steps run as one CUDA graph (a step took the GPU \
                         {gpu_ms:.1} ms, the CPU {issued_ms:.1} ms to issue)"
                    );
                    self.state = State::Ready(captured);
                }
                Err(why) => cuda::fail(&why),
            }
            Ok(output)
        }
        #[cfg(not(feature = "cuda"))]
        evaluate(input, timesteps)
    }
}

/// Whether [`SWITCH`] leaves the graphs on.
fn switched_on() -> bool {
    !crate::engine::kernels::switched_off(&std::env::var(SWITCH).unwrap_or_default())
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    pub fn failed_before() -> bool {
        false
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Mutex, PoisonError};

    use candle_core::cuda_backend::cudarc::driver::{CudaGraph, sys};
    use candle_core::{DType, Device, Tensor};

    use super::{Evaluate, SdError, TOLERANCE};
    use crate::engine::gpu_memory;
    use crate::engine::profile::GpuSpan;

    /// Set once a capture failed: no more attempts in this process.
    static FAILED: AtomicBool = AtomicBool::new(false);
    /// The shapes whose graph was compared with its eager step and agreed.
    static VERIFIED: Mutex<Vec<String>> = Mutex::new(Vec::new());

    /// Starts timing the work issued to `device` from now (`None` off CUDA or without an
    /// event: the step is then not timed).
    pub fn start_timing(device: &Device) -> Option<GpuSpan> {
        let Device::Cuda(cuda) = device else {
            return None;
        };
        GpuSpan::start(cuda)
            .map_err(|error| tracing::debug!("no timing event: {error}"))
            .ok()
    }

    /// `(GPU ms, CPU ms issuing)` of `span`'s work, waiting for the GPU to finish it.
    pub fn stop_timing(span: GpuSpan) -> Option<(f64, f64)> {
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

    pub fn failed_before() -> bool {
        FAILED.load(Ordering::Relaxed)
    }

    pub fn fail(why: &str) {
        if !FAILED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "the UNet's steps run one kernel at a time: its CUDA graph did not work ({why})"
            );
        }
    }

    /// A captured evaluation: the graph and the buffers it reads and writes.
    pub struct Captured {
        graph: Option<CudaGraph>,
        input: Tensor,
        timesteps: Tensor,
        output: Tensor,
        device: Device,
    }

    impl Captured {
        /// Captures `evaluate` reading buffers of its own. The first time for its `shape` in
        /// this process, launches it on `input` at `timesteps` (the step just run) and checks
        /// it against that step's `expected` output.
        pub fn capture(
            evaluate: &Evaluate<'_>,
            input: &Tensor,
            timesteps: &Tensor,
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
            let recorded = evaluate(&input_buffer, &timesteps_buffer)
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
                graph: Some(graph),
                input: input_buffer,
                timesteps: timesteps_buffer,
                output,
                device,
            };
            let mut verified = VERIFIED.lock().unwrap_or_else(PoisonError::into_inner);
            if !verified.iter().any(|known| known == shape) {
                captured.run()?;
                let difference =
                    crate::engine::kernels::largest_relative_difference(&captured.output, expected)
                        .map_err(said)?;
                if difference.is_nan() || difference > TOLERANCE {
                    return Err(format!(
                        "its output is {difference} from the step's it was captured from \
                         (allowed {TOLERANCE})"
                    ));
                }
                verified.push(shape.to_owned());
            }
            Ok(captured)
        }

        /// The evaluation of `input` at `timestep`: the buffers filled, the graph launched,
        /// its output copied out (the next launch overwrites the buffer).
        pub fn launch(&self, input: &Tensor, timestep: f64) -> Result<Tensor, SdError> {
            self.input.slice_set(&input.contiguous()?, 0, 0)?;
            let batch = self.timesteps.dim(0)?;
            let timesteps = (Tensor::ones(batch, DType::F32, &self.device)? * timestep)?;
            self.timesteps.slice_set(&timesteps, 0, 0)?;
            self.run()
                .map_err(|why| SdError::Tensor(candle_core::Error::Msg(why)))?;
            Ok(self.output.copy()?)
        }

        fn run(&self) -> Result<(), String> {
            let Some(graph) = &self.graph else {
                return Err("the graph is gone".to_owned());
            };
            graph
                .launch()
                .map_err(|error| format!("the graph did not launch: {error}"))
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
    use super::*;

    #[test]
    fn the_cpu_never_captures_and_its_steps_run_as_they_are() {
        let device = Device::Cpu;
        let mut graphs = StepGraphs::for_job(&device, 20, true, "1×4×2×2".to_owned());
        let input = Tensor::zeros((1, 4, 2, 2), candle_core::DType::F32, &device).unwrap();
        assert!(graphs.launch(&input, 999.0).unwrap().is_none());
        let calls = std::cell::Cell::new(0);
        let evaluate = |latents: &Tensor, _: &Tensor| {
            calls.set(calls.get() + 1);
            Ok((latents + 1.0)?)
        };
        let timesteps = Tensor::ones(1, candle_core::DType::F32, &device).unwrap();
        for _ in 0..3 {
            let output = graphs.eager(&evaluate, &input, &timesteps).unwrap();
            assert_eq!(output.sum_all().unwrap().to_scalar::<f32>().unwrap(), 16.0);
        }
        // Each step evaluated once (a capture would evaluate once more), none launches.
        assert_eq!(calls.get(), 3);
        assert!(graphs.launch(&input, 999.0).unwrap().is_none());
    }
}

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
//! not with `STUDIO_WORKER_CUDA_GRAPHS=0` or our kernels off. A capture that fails, or a
//! graph whose output is not the step's it was captured from, turns graphs off for the
//! process with a warning; that job and the rest run step by step as before, so a graph
//! costs speed, never images. The graph and its memory are given back when the job's
//! denoising ends.

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

/// What a UNet evaluation is: `(latents, timesteps)` → prediction, the job's conditioning
/// and plan fixed.
pub type Evaluate<'a> = dyn Fn(&Tensor, &Tensor) -> Result<Tensor, SdError> + 'a;

/// A job's graph, from wanted to captured (or not at all).
pub struct StepGraphs {
    state: State,
}

enum State {
    /// Steps run one kernel at a time.
    Off,
    /// A graph is captured after the next eager step.
    Wanted,
    #[cfg(feature = "cuda")]
    Ready(cuda::Captured),
}

impl StepGraphs {
    /// Whether this job on `device`, of `steps` steps, gets a graph (`first_plan`: the job
    /// runs the device's fastest plan, so memory is plentiful).
    pub fn for_job(device: &Device, steps: usize, first_plan: bool) -> Self {
        let wanted = device.is_cuda()
            && steps >= FEWEST_STEPS
            && first_plan
            && !crate::engine::profile::is_enabled()
            && crate::engine::kernels::enabled()
            && switched_on()
            && !cuda::failed_before();
        Self {
            state: if wanted { State::Wanted } else { State::Off },
        }
    }

    /// The evaluation of `input` at `timestep` through the graph, or `None` when there is
    /// none: the caller evaluates it, then calls [`StepGraphs::after_eager`].
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

    /// After `evaluate` gave `output` for `input` at `timesteps`: captures the graph where
    /// one is wanted (once per job), or turns graphs off for the process if that fails.
    pub fn after_eager(
        &mut self,
        evaluate: &Evaluate<'_>,
        input: &Tensor,
        timesteps: &Tensor,
        output: &Tensor,
    ) {
        if !matches!(self.state, State::Wanted) {
            return;
        }
        self.state = State::Off;
        #[cfg(feature = "cuda")]
        match cuda::Captured::capture(evaluate, input, timesteps, output) {
            Ok(captured) => {
                tracing::debug!("the UNet's steps run as one CUDA graph");
                self.state = State::Ready(captured);
            }
            Err(why) => cuda::fail(&why),
        }
        #[cfg(not(feature = "cuda"))]
        let _ = (evaluate, input, timesteps, output);
    }
}

/// Whether [`SWITCH`] leaves the graphs on.
fn switched_on() -> bool {
    allows(&std::env::var(SWITCH).unwrap_or_default())
}

/// Whether a value of [`SWITCH`] leaves the graphs on (anything but `0`, `off`, `false`).
fn allows(value: &str) -> bool {
    !matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "0" | "off" | "false"
    )
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

    use candle_core::cuda_backend::cudarc::driver::{CudaGraph, sys};
    use candle_core::{DType, Device, Tensor};

    use super::{Evaluate, SdError, TOLERANCE};
    use crate::engine::gpu_memory;

    /// Set once a capture failed: no more attempts in this process.
    static FAILED: AtomicBool = AtomicBool::new(false);

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
        /// Captures `evaluate` reading buffers of its own, launches it on `input` at
        /// `timesteps` (the step just run) and checks it against that step's `expected`
        /// output.
        pub fn capture(
            evaluate: &Evaluate<'_>,
            input: &Tensor,
            timesteps: &Tensor,
            expected: &Tensor,
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
            captured.run()?;
            let difference =
                crate::engine::kernels::largest_relative_difference(&captured.output, expected)
                    .map_err(said)?;
            if difference.is_nan() || difference > TOLERANCE {
                return Err(format!(
                    "its output is {difference} from the step's it was captured from (allowed \
                     {TOLERANCE})"
                ));
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
        let mut graphs = StepGraphs::for_job(&device, 20, true);
        let input = Tensor::zeros((1, 4, 2, 2), candle_core::DType::F32, &device).unwrap();
        assert!(graphs.launch(&input, 999.0).unwrap().is_none());
        let calls = std::cell::Cell::new(0);
        let evaluate = |latents: &Tensor, _: &Tensor| {
            calls.set(calls.get() + 1);
            Ok(latents.clone())
        };
        let timesteps = Tensor::ones(1, candle_core::DType::F32, &device).unwrap();
        graphs.after_eager(&evaluate, &input, &timesteps, &input);
        // Nothing was captured (which would evaluate once more) and nothing launches.
        assert_eq!(calls.get(), 0);
        assert!(graphs.launch(&input, 999.0).unwrap().is_none());
    }

    #[test]
    fn only_an_explicit_no_turns_the_graphs_off() {
        for value in ["0", "off", "OFF", " false "] {
            assert!(!allows(value), "{value:?}");
        }
        for value in ["", "1", "on", "true"] {
            assert!(allows(value), "{value:?}");
        }
    }
}

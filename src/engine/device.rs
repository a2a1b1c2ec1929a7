//! Which device the engine runs on: `auto | cuda | metal | cpu`, and what it is.
//!
//! `auto` takes the GPU when this build has its backend and the GPU opens, and otherwise
//! falls back to the CPU with a message saying why (candle's `cuda_if_available` does not
//! fall back on a failed open by itself). Models run in f16 on a GPU and f32 on the CPU; on
//! the NVIDIA cards whose f16 arithmetic Stable Diffusion cannot use they compute in f32 and
//! hold their weights in f16, widening each as its layer runs ([`gpu_precision`],
//! [`Precision`]).

use candle_core::{DType, Device};

use crate::platform::host;
use crate::vocab::device::{DeviceInfo, DeviceKind, DevicePreference};

/// The dtypes a model runs in on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Precision {
    /// What every layer computes in: its activations' dtype.
    pub compute: DType,
    /// What its matrices and convolution kernels (all but a few thousandths of its weights)
    /// are held in: `compute`, or f16 under f32 arithmetic, each widened to f32 as its layer
    /// runs. An f16 model's memory, f32's arithmetic; the widening costs each layer a pass
    /// over its weights.
    pub weights: DType,
}

impl Precision {
    /// Everything in `dtype`.
    pub const fn uniform(dtype: DType) -> Self {
        Self {
            compute: dtype,
            weights: dtype,
        }
    }

    /// f32 arithmetic over weights held in f16.
    pub const WIDENED_F16: Self = Self {
        compute: DType::F32,
        weights: DType::F16,
    };

    /// Whether weights are held in another dtype than the layers compute in.
    pub fn widens(self) -> bool {
        self.compute != self.weights
    }

    /// `f16`, `f32`, or `f32, weights f16`: for the log and `device --json`.
    pub fn label(self) -> String {
        if self.widens() {
            format!(
                "{}, weights {}",
                self.compute.as_str(),
                self.weights.as_str()
            )
        } else {
            self.compute.as_str().to_owned()
        }
    }
}

impl From<DType> for Precision {
    fn from(dtype: DType) -> Self {
        Self::uniform(dtype)
    }
}

/// A device that opened.
#[derive(Clone, Debug)]
pub struct SelectedDevice {
    pub device: Device,
    pub precision: Precision,
    pub info: DeviceInfo,
    /// Why `auto` ended up on the CPU, for the log and the window.
    pub fallback_reason: Option<String>,
    /// Why a GPU computes in f32, not f16, for the log and the window.
    pub precision_note: Option<String>,
}

impl SelectedDevice {
    /// What the person should know about the device chosen: why it is the CPU, or why a
    /// GPU computes in f32.
    pub fn note(&self) -> Option<&str> {
        self.fallback_reason
            .as_deref()
            .or(self.precision_note.as_deref())
    }
}

/// The environment variable that sets an NVIDIA GPU's precision by hand: `f16`, `f32`
/// (weights too: twice an f16 model's memory) or `widened` (f32 arithmetic over f16
/// weights); anything else, or unset: [`gpu_precision`] decides.
pub const PRECISION_VARIABLE: &str = "STUDIO_WORKER_GPU_PRECISION";

/// The words in an NVIDIA card's name that mark Turing's TU116 and TU117 chips, which have
/// no tensor cores: the GeForce GTX 16 series, their laptop parts (MX450, MX550) and the
/// Quadro, T-series and mining cards built on them. Their f16 arithmetic gives NaN or black
/// images in Stable Diffusion, as every diffusers-based front end has found; they compute
/// in f32. Storing f16 is another matter (no arithmetic: the widening to f32 is a conversion
/// instruction), so their weights stay in f16, and a 4 GB GTX 1650 holds what an f16 card
/// holds.
const F16_UNRELIABLE_NAMES: [&str; 13] = [
    "1630", "1650", "1660", "MX450", "MX550", "T400", "T500", "T550", "T600", "T1000", "T1200",
    "T2000", "30HX",
];

/// The precision models run in on an NVIDIA GPU named `name` of `compute_capability`, and
/// why where it is not f16: f32 arithmetic over f16 weights on the cards
/// [`F16_UNRELIABLE_NAMES`] names (all Turing, 7.5), unless `forced` (the
/// [`PRECISION_VARIABLE`]'s value) says otherwise.
pub fn gpu_precision(
    name: &str,
    compute_capability: Option<(i32, i32)>,
    forced: Option<&str>,
) -> (Precision, Option<String>) {
    let widened_note = |why: &str, hint: &str| {
        format!(
            "models compute in f32 on the {name}{why}; weights stay in f16, so a model takes \
             its f16 memory, and jobs are slower than in f16{hint}"
        )
    };
    match forced.map(str::trim) {
        Some("f32") => {
            return (
                Precision::uniform(DType::F32),
                Some(format!(
                    "models run in f32 on this GPU ({PRECISION_VARIABLE}=f32): slower, and \
                     twice the memory"
                )),
            );
        }
        Some("f16") => return (Precision::uniform(DType::F16), None),
        Some("widened") => {
            return (
                Precision::WIDENED_F16,
                Some(widened_note(
                    &format!(" ({PRECISION_VARIABLE}=widened)"),
                    "",
                )),
            );
        }
        _ => {}
    }
    let turing = compute_capability.is_none_or(|capability| capability == (7, 5));
    let listed = name
        .split(|c: char| !c.is_ascii_alphanumeric())
        .any(|word| F16_UNRELIABLE_NAMES.contains(&word));
    if turing && listed {
        (
            Precision::WIDENED_F16,
            Some(widened_note(
                ", whose f16 arithmetic gives NaN or black images in Stable Diffusion (the GTX \
                 16 series and its relatives)",
                &format!(" ({PRECISION_VARIABLE}=f16 to try f16 anyway)"),
            )),
        )
    } else {
        (Precision::uniform(DType::F16), None)
    }
}

/// Why an explicitly named GPU cannot be used: the person picks another device in Settings
/// (or `auto`, which falls back to the CPU by itself).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// This build was made without the backend.
    #[error("this build has no {backend} support (build with --features {feature})")]
    NotBuilt {
        backend: &'static str,
        feature: &'static str,
    },
    /// The backend is there but the GPU did not open (no driver, no device, …).
    #[error("the {backend} GPU did not open: {reason}")]
    DidNotOpen {
        backend: &'static str,
        reason: String,
    },
}

/// Opens the preferred device. An explicit `cuda` or `metal` that cannot open is an error;
/// `auto` never fails.
pub fn select(preference: DevicePreference) -> Result<SelectedDevice, DeviceError> {
    match preference {
        DevicePreference::Cpu => Ok(cpu(None)),
        DevicePreference::Cuda => open_cuda(),
        DevicePreference::Metal => open_metal(),
        DevicePreference::Auto => {
            let attempt = if candle_core::utils::cuda_is_available() {
                Some(open_cuda())
            } else if candle_core::utils::metal_is_available() {
                Some(open_metal())
            } else {
                None
            };
            match attempt {
                Some(Ok(selected)) => Ok(selected),
                Some(Err(reason)) => Ok(cpu(Some(format!("{reason}; using the CPU")))),
                None => Ok(cpu(Some(
                    match crate::platform::gpu_build::unavailable_note() {
                        Some(note) => format!("{note}; using the CPU"),
                        None => "this build has no GPU backend (built without the cuda or metal \
                             feature); using the CPU"
                            .to_owned(),
                    },
                ))),
            }
        }
    }
}

fn cpu(fallback_reason: Option<String>) -> SelectedDevice {
    SelectedDevice {
        device: Device::Cpu,
        precision: Precision::uniform(DType::F32),
        info: host::cpu_device(),
        fallback_reason,
        precision_note: None,
    }
}

fn open_cuda() -> Result<SelectedDevice, DeviceError> {
    if !candle_core::utils::cuda_is_available() {
        return Err(DeviceError::NotBuilt {
            backend: "CUDA",
            feature: "cuda",
        });
    }
    let device = Device::new_cuda(0).map_err(|error| DeviceError::DidNotOpen {
        backend: "CUDA",
        reason: super::first_line(&error),
    })?;
    let (name, memory_mb) = match super::gpu_memory::name_and_total(&device) {
        Some((name, total_bytes)) => (name, total_bytes / (1024 * 1024)),
        None => ("NVIDIA GPU".to_owned(), 0),
    };
    let compute_capability = compute_capability(&device);
    if let Err(reason) = runs_here(&name, compute_capability, build_floor()) {
        return Err(DeviceError::DidNotOpen {
            backend: "CUDA",
            reason,
        });
    }
    let (precision, precision_note) = gpu_precision(
        &name,
        compute_capability,
        std::env::var(PRECISION_VARIABLE).ok().as_deref(),
    );
    // What stays in f32 on the GPU (the VAE of a model that must upcast, SDXL's stock one)
    // multiplies on the tensor cores in TF32, as PyTorch does for convolutions by default
    // (`torch.backends.cudnn.allow_tf32`): f32's range, which is what the upcast is for,
    // and f16's precision, which is what the rest of the model has. Cards before Ampere
    // have no TF32 and multiply in f32 as before.
    candle_core::cuda::set_gemm_reduced_precision_f32(true);
    without_stream_events(&device);
    Ok(SelectedDevice {
        device,
        precision,
        info: DeviceInfo {
            kind: DeviceKind::Cuda,
            name,
            memory_mb,
        },
        fallback_reason: None,
        precision_note,
    })
}

/// The oldest compute capability this build's GPU code runs on: Turing's (7.5), the oldest
/// CUDA 13 builds for and our kernels' PTX; or newer, where candle's kernels were built for a
/// newer one (`CUDA_COMPUTE_CAP` at build time, which `build.rs` passes on: PTX runs on its
/// own architecture and newer only).
fn build_floor() -> (i32, i32) {
    const TURING: (i32, i32) = (7, 5);
    option_env!("STUDIO_WORKER_CANDLE_COMPUTE_CAP")
        .and_then(|cap| cap.trim().parse::<i32>().ok())
        .map(|cap| (cap / 10, cap % 10))
        .map_or(TURING, |candle| candle.max(TURING))
}

/// Whether a GPU named `name` of `compute_capability` runs this build's GPU code, whose
/// oldest architecture is `floor`; why not, in words, where it does not. Unknown: it runs
/// (the kernels' own checks at start find out).
fn runs_here(
    name: &str,
    compute_capability: Option<(i32, i32)>,
    floor: (i32, i32),
) -> Result<(), String> {
    match compute_capability {
        Some(capability) if capability < floor => Err(format!(
            "the {name} ({}compute capability {}.{}) is older than the GPUs this build runs on \
             ({}compute capability {}.{} and newer)",
            generation(capability).map_or(String::new(), |name| format!("{name}, ")),
            capability.0,
            capability.1,
            generation(floor).map_or(String::new(), |name| format!("{name}, ")),
            floor.0,
            floor.1,
        )),
        _ => Ok(()),
    }
}

/// The NVIDIA architecture of a compute capability, and the GeForce cards built on it.
fn generation(capability: (i32, i32)) -> Option<&'static str> {
    Some(match capability {
        (3, _) => "Kepler: GeForce GTX 600 and 700 series",
        (5, _) => "Maxwell: GeForce GTX 750 and 900 series",
        (6, _) => "Pascal: GeForce GTX 10 series",
        (7, 0 | 2) => "Volta",
        (7, 5) => "Turing: GeForce GTX 16 and RTX 20 series",
        (8, 0) => "Ampere, datacenter",
        (8, 6) => "Ampere: GeForce RTX 30 series",
        (8, 9) => "Ada: GeForce RTX 40 series",
        (9, 0) => "Hopper",
        (12, _) => "Blackwell: GeForce RTX 50 series",
        _ => return None,
    })
}

/// The CUDA device's compute capability, `(major, minor)`, where its driver says.
fn compute_capability(device: &Device) -> Option<(i32, i32)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        return cuda.cuda_stream().context().compute_capability().ok();
    }
    let _ = device;
    None
}

/// Stops cudarc from giving each new buffer on `device` two CUDA events. It makes them so
/// that buffers used on several streams of one context are ordered, and uses them only once
/// a second stream exists on the context; candle runs its work on one stream per device and
/// nothing here makes another, so they were created and destroyed unused with every op's
/// output: four driver calls per op. At 512² the CPU's launching is what a step costs on a
/// fast GPU: an SD-Turbo UNet step took 22 ms on the H200 (4 steps 210 ms, 1 step 144 ms)
/// for some 0.7 TFLOP of math, about a millisecond of the card's time.
pub fn without_stream_events(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        // SAFETY: cudarc orders nothing with these events while the context has one stream
        // (`is_managing_stream_synchronization` is false), which is how this process uses
        // it: no stream is created on it besides candle's.
        unsafe { cuda.disable_event_tracking() };
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

/// While held (on this thread), candle keeps the small uploads its CUDA ops make on `device`
/// instead of making them again for every op: a strided or broadcast op's dims and strides
/// (every bias add, every copy of a transposed view), keyed by their values, and host data of
/// up to 4 KB (an embedding's `arange`), keyed by its bytes. Each would otherwise allocate,
/// copy from pageable memory and free, three driver calls per op on a launch-bound step.
/// Both caches live for the process and are never pruned, so hold this only around work whose
/// small uploads repeat (the UNet's evaluations, the decode, the text encoders' layers): the
/// same shapes and constants every step and job, some hundreds of entries of a few dozen
/// bytes per job size. Never around a prompt's token ids (new bytes each time) or the
/// sampler (its noise).
pub struct CachedUploads {
    _guard: Option<Box<dyn std::any::Any>>,
}

impl CachedUploads {
    pub fn on(device: &Device) -> Self {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = device {
            return Self {
                _guard: Some(Box::new(cuda.enable_cuda_graph_htod_cache())),
            };
        }
        let _ = device;
        Self { _guard: None }
    }
}

fn open_metal() -> Result<SelectedDevice, DeviceError> {
    if !candle_core::utils::metal_is_available() {
        return Err(DeviceError::NotBuilt {
            backend: "Metal",
            feature: "metal",
        });
    }
    let device = Device::new_metal(0).map_err(|error| DeviceError::DidNotOpen {
        backend: "Metal",
        reason: super::first_line(&error),
    })?;
    // Apple GPUs share the machine's memory.
    let memory_mb = host::cpu_device().memory_mb;
    Ok(SelectedDevice {
        device,
        precision: Precision::uniform(DType::F16),
        info: DeviceInfo {
            kind: DeviceKind::Metal,
            name: "Apple GPU (Metal)".to_owned(),
            memory_mb,
        },
        fallback_reason: None,
        precision_note: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gtx_16_series_and_its_relatives_compute_in_f32_over_f16_weights_and_say_why() {
        for name in [
            "NVIDIA GeForce GTX 1660 SUPER",
            "NVIDIA GeForce GTX 1650 Ti with Max-Q Design",
            "NVIDIA GeForce GTX 1630",
            "NVIDIA GeForce MX450",
            "NVIDIA T1000 8GB",
            "Quadro T2000",
            "NVIDIA CMP 30HX",
        ] {
            let (precision, note) = gpu_precision(name, Some((7, 5)), None);
            assert_eq!(precision, Precision::WIDENED_F16, "{name}");
            let note = note.expect("a note");
            assert!(
                note.contains(name) && note.contains("compute in f32") && note.contains("f16"),
                "{note}"
            );
        }
        // Tensor-core cards, names that only contain the numbers, and a listed name on a chip
        // that is not Turing keep f16.
        for (name, capability) in [
            ("NVIDIA GeForce RTX 2060", (7, 5)),
            ("NVIDIA GeForce RTX 4090", (8, 9)),
            ("NVIDIA RTX A1000", (8, 6)),
            ("Quadro RTX 6000", (7, 5)),
            ("NVIDIA GeForce RTX 3050 Ti Laptop GPU 16500", (8, 6)),
            ("NVIDIA GeForce GTX 1660", (6, 1)),
        ] {
            assert_eq!(
                gpu_precision(name, Some(capability), None),
                (Precision::uniform(DType::F16), None),
                "{name}"
            );
        }
    }

    #[test]
    fn the_precision_can_be_forced_every_way() {
        let (precision, note) = gpu_precision("NVIDIA GeForce RTX 4070", Some((8, 9)), Some("f32"));
        assert_eq!(precision, Precision::uniform(DType::F32));
        assert!(note.expect("a note").contains(PRECISION_VARIABLE));
        let (precision, note) =
            gpu_precision("NVIDIA GeForce RTX 4070", Some((8, 9)), Some("widened"));
        assert_eq!(precision, Precision::WIDENED_F16);
        assert!(note.expect("a note").contains(PRECISION_VARIABLE));
        assert_eq!(
            gpu_precision("NVIDIA GeForce GTX 1660", Some((7, 5)), Some(" f16 ")),
            (Precision::uniform(DType::F16), None)
        );
        // Anything else is not a choice: the card decides.
        assert_eq!(
            gpu_precision("NVIDIA GeForce GTX 1660", Some((7, 5)), Some("fp8")).0,
            Precision::WIDENED_F16
        );
    }

    #[test]
    fn a_precision_is_labelled_by_what_it_computes_in_and_what_it_holds() {
        assert_eq!(Precision::uniform(DType::F16).label(), "f16");
        assert!(!Precision::uniform(DType::F32).widens());
        assert_eq!(Precision::WIDENED_F16.label(), "f32, weights f16");
        assert!(Precision::WIDENED_F16.widens());
    }

    #[test]
    fn a_gpu_older_than_the_build_is_refused_with_its_generation_and_the_floor() {
        let refused = runs_here("NVIDIA GeForce GTX 1080", Some((6, 1)), (7, 5))
            .expect_err("Pascal is older than Turing");
        assert_eq!(
            refused,
            "the NVIDIA GeForce GTX 1080 (Pascal: GeForce GTX 10 series, compute capability \
             6.1) is older than the GPUs this build runs on (Turing: GeForce GTX 16 and RTX 20 \
             series, compute capability 7.5 and newer)"
        );
        for (name, capability) in [
            ("NVIDIA GeForce GTX 1650", (7, 5)),
            ("NVIDIA GeForce RTX 3060", (8, 6)),
            ("NVIDIA GeForce RTX 5090", (12, 0)),
        ] {
            assert_eq!(runs_here(name, Some(capability), (7, 5)), Ok(()), "{name}");
        }
        // A build whose candle kernels were made for Hopper runs on nothing older.
        assert!(runs_here("NVIDIA GeForce RTX 4090", Some((8, 9)), (9, 0)).is_err());
        assert!(
            runs_here("Tesla V100", Some((7, 0)), (7, 5))
                .expect_err("Volta")
                .contains("(Volta, compute capability 7.0)")
        );
        // A card that does not say is left to the kernels' own checks.
        assert_eq!(runs_here("NVIDIA GPU", None, (7, 5)), Ok(()));
        assert_eq!(build_floor().max((7, 5)), build_floor());
    }

    #[test]
    fn auto_without_a_gpu_backend_falls_back_to_the_cpu_and_says_why() {
        if candle_core::utils::cuda_is_available() || candle_core::utils::metal_is_available() {
            return;
        }
        let selected = select(DevicePreference::Auto).expect("auto never fails");
        assert!(selected.device.is_cpu());
        assert_eq!(selected.precision, Precision::uniform(DType::F32));
        assert!(
            selected
                .fallback_reason
                .expect("a reason")
                .contains("feature")
        );
        let refused = select(DevicePreference::Cuda).expect_err("no CUDA in this build");
        assert!(refused.to_string().contains("--features cuda"), "{refused}");
    }
}

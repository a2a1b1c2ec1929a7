//! Which device the engine runs on: `auto | cuda | metal | cpu`, and what it is.
//!
//! `auto` takes the GPU when this build has its backend and the GPU opens, and otherwise
//! falls back to the CPU with a message saying why (candle's `cuda_if_available` does not
//! fall back on a failed open by itself). Models run in f16 on a GPU and f32 on the CPU.

use candle_core::{DType, Device};

use crate::platform::host;
use crate::vocab::device::{DeviceInfo, DeviceKind, DevicePreference};

/// A device that opened.
#[derive(Clone, Debug)]
pub struct SelectedDevice {
    pub device: Device,
    pub dtype: DType,
    pub info: DeviceInfo,
    /// Why `auto` ended up on the CPU, for the log and the window.
    pub fallback_reason: Option<String>,
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
        dtype: DType::F32,
        info: host::cpu_device(),
        fallback_reason,
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
    let (name, memory_mb) = nvidia_smi_facts().unwrap_or_else(|| ("NVIDIA GPU".to_owned(), 0));
    Ok(SelectedDevice {
        device,
        dtype: DType::F16,
        info: DeviceInfo {
            kind: DeviceKind::Cuda,
            name,
            memory_mb,
        },
        fallback_reason: None,
    })
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
        dtype: DType::F16,
        info: DeviceInfo {
            kind: DeviceKind::Metal,
            name: "Apple GPU (Metal)".to_owned(),
            memory_mb,
        },
        fallback_reason: None,
    })
}

/// The first GPU's name and total memory from the NVIDIA driver's own tool.
fn nvidia_smi_facts() -> Option<(String, u64)> {
    let output = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total",
            "--format=csv,noheader,nounits",
            "--id=0",
        ])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    parse_nvidia_smi(&String::from_utf8_lossy(&output.stdout))
}

fn parse_nvidia_smi(text: &str) -> Option<(String, u64)> {
    let line = text.lines().next()?;
    let (name, memory) = line.rsplit_once(',')?;
    Some((name.trim().to_owned(), memory.trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_without_a_gpu_backend_falls_back_to_the_cpu_and_says_why() {
        if candle_core::utils::cuda_is_available() || candle_core::utils::metal_is_available() {
            return;
        }
        let selected = select(DevicePreference::Auto).expect("auto never fails");
        assert!(selected.device.is_cpu());
        assert_eq!(selected.dtype, DType::F32);
        assert!(
            selected
                .fallback_reason
                .expect("a reason")
                .contains("feature")
        );
        let refused = select(DevicePreference::Cuda).expect_err("no CUDA in this build");
        assert!(refused.to_string().contains("--features cuda"), "{refused}");
    }

    #[test]
    fn nvidia_smi_output_parses() {
        assert_eq!(
            parse_nvidia_smi("NVIDIA GeForce RTX 4090, 24564\n"),
            Some(("NVIDIA GeForce RTX 4090".to_owned(), 24564))
        );
        assert_eq!(parse_nvidia_smi("garbage"), None);
    }
}

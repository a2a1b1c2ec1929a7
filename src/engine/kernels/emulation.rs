//! Runs our CUDA kernels' source on the CPU, for the tests: a C++ compiler builds a runner from
//! `emulation/` (a CUDA block as CPU threads, WMMA and the shuffles emulated) and the kernel's
//! `.cu` file, with the address and undefined-behaviour sanitizers on; the test feeds it f16
//! tensors and reads the output back. This checks what the kernel computes (its indexing,
//! masking and arithmetic) on machines without a GPU; speed and the GPU's memory model are
//! for the GPU bench.
//!
//! Without a C++ compiler the tests that need one pass with a note, unless
//! `STUDIO_WORKER_EMULATION_TESTS=require` (set by `.ci/run`) makes them fail.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use candle_core::{DType, Device, Result, Shape, Tensor};

/// A runner built from one of `emulation/*_runner.cpp`.
pub struct Runner {
    binary: PathBuf,
    /// Keeps the binary's folder until the runner is dropped.
    _folder: tempfile::TempDir,
}

impl Runner {
    /// Builds `emulation/<source>`; `None` (after saying why) where there is no C++ compiler
    /// and the tests do not require one.
    pub fn build(source: &str) -> Option<Self> {
        let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".to_owned());
        let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine/kernels/emulation");
        let folder = tempfile::tempdir().expect("a temporary folder");
        let binary = folder.path().join("runner");
        let built = Command::new(&compiler)
            .args([
                "-std=c++20",
                "-O1",
                "-g",
                "-pthread",
                "-fno-strict-aliasing",
            ])
            .arg("-fsanitize=address,undefined")
            .arg("-fno-sanitize-recover=all")
            .arg("-I")
            .arg(&here)
            .arg(here.join(source))
            .arg("-o")
            .arg(&binary)
            .output();
        match built {
            Ok(output) if output.status.success() => Some(Self {
                binary,
                _folder: folder,
            }),
            Ok(output) => panic!(
                "{compiler} did not build {source}:\n{}",
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(error) => {
                let required =
                    std::env::var("STUDIO_WORKER_EMULATION_TESTS").as_deref() == Ok("require");
                assert!(!required, "no C++ compiler ({compiler}: {error})");
                eprintln!(
                    "skipped: no C++ compiler to emulate the CUDA kernels ({compiler}: {error})"
                );
                None
            }
        }
    }

    /// Runs with `args`, `inputs` on stdin as little-endian `dtype` (f16 or f32), and reads a
    /// tensor of `dtype` and `shape` from its stdout.
    pub fn run<'a>(
        &self,
        args: impl IntoIterator<Item = &'a str>,
        inputs: &[&Tensor],
        dtype: DType,
        shape: &Shape,
    ) -> Result<Tensor> {
        let mut stdin = Vec::new();
        for input in inputs {
            let input = input.to_dtype(dtype)?.flatten_all()?;
            match dtype {
                DType::F16 => stdin.extend(
                    input
                        .to_vec1::<half::f16>()?
                        .iter()
                        .flat_map(|value| value.to_le_bytes()),
                ),
                DType::F32 => stdin.extend(
                    input
                        .to_vec1::<f32>()?
                        .iter()
                        .flat_map(|value| value.to_le_bytes()),
                ),
                other => candle_core::bail!("the emulation reads f16 or f32, not {other:?}"),
            }
        }
        let mut child = Command::new(&self.binary)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut pipe) = child.stdin.take() {
            pipe.write_all(&stdin)?;
        }
        let output = child.wait_with_output()?;
        if !output.status.success() {
            candle_core::bail!(
                "the emulated kernel failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let bytes = &output.stdout;
        match dtype {
            DType::F16 => {
                let values: Vec<half::f16> = bytes
                    .chunks_exact(2)
                    .map(|pair| half::f16::from_le_bytes([pair[0], pair[1]]))
                    .collect();
                Tensor::from_vec(values, shape, &Device::Cpu)
            }
            _ => {
                let values: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|word| f32::from_le_bytes([word[0], word[1], word[2], word[3]]))
                    .collect();
                Tensor::from_vec(values, shape, &Device::Cpu)
            }
        }
    }
}

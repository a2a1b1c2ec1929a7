//! Our own kernels, for layers that candle composes from many generic kernels, each a full
//! pass over memory:
//! - group norm with its affine and SiLU (~14 of candle's kernels, 2 of ours). It also runs
//!   on the CPU, with the same arithmetic, and hands shapes and dtypes it does not take to
//!   candle's composition, so model code always calls the op.
//! - attention that never holds its score matrix (flash-attention style), on CUDA in f16:
//!   for heads up to 128 wide with `mma.sync` and everything in registers, else with WMMA;
//!   elsewhere it answers `None` and the model runs its own attention.
//! - GEGLU, the feed-forward's gate, in one pass (candle: two strided kernels and a
//!   temporary), on CUDA; elsewhere `None` and the model composes it.
//! - the column matrix of a 3×3 convolution in the order that makes the convolution one GEMM
//!   straight into the image layout (candle: a slower im2col, then a transposed copy of the
//!   output), on CUDA; elsewhere `None` and the model runs candle's convolution. Where a
//!   group norm and SiLU come before the convolution, the columns are written normalised
//!   from the image as it is ([`norm_columns`]): the normalised image is never made.
//! - a 3×3 convolution with no column matrix at all ([`conv3x3`]: an implicit GEMM on the
//!   tensor cores, its bias and any group norm before it applied on the way), on CUDA in
//!   f16, and in f32 as TF32 from Ampere on (an upcast VAE: SDXL's); where it was slower
//!   than the column path on the card, the column path runs (f16 and TF32 raced apart, and
//!   each per model part: the UNet's shapes and the decoder's).
//!
//! On CUDA, `build.rs` compiles each kernel source into a fatbin with machine code for every
//! supported architecture, so the driver compiles nothing for them at first start. Before a
//! device first uses one it is checked against a CPU reference on small inputs; a module that
//! does not load or a kernel that disagrees leaves candle's composition in its place (with a
//! warning), so a wrong kernel costs speed, never images. When the GPU is prepared, each
//! kernel that passed is timed against what it replaces, on that card at a job's shape
//! ([`race`]); one that is slower there is switched off the same way, so a kernel tuned on
//! another card never makes this one slower. The tests also run the CUDA sources on a CPU
//! emulation of the GPU ([`emulation`]), so their logic is checked without one.
//!
//! `STUDIO_WORKER_FUSED_KERNELS=0` turns them off for the process, to measure them against
//! candle's (`benches/gpu` does); `STUDIO_WORKER_IMPLICIT_CONVOLUTION=0` turns off the
//! implicit convolution alone ([`conv3x3::SWITCH`]), to measure it against the column path.

pub mod attention;
pub mod conv3x3;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(test)]
mod emulation;
pub mod geglu;
mod group_norm;
pub mod im2col;
pub mod norm_columns;
pub mod race;

use std::sync::OnceLock;

pub use attention::attention;
pub use geglu::geglu;
pub use group_norm::{Activation, group_norm, group_norm_composed};
pub use norm_columns::{NormalizedImage, normalized_image};

/// The environment variable that turns our kernels off (`0`, `off` or `false`).
pub const SWITCH: &str = "STUDIO_WORKER_FUSED_KERNELS";

/// Whether our kernels may run in this process.
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        let value = std::env::var(SWITCH).unwrap_or_default();
        let off = switched_off(&value);
        if off {
            tracing::info!("{SWITCH}={value}: candle's kernels run instead of ours");
        }
        !off
    })
}

/// Whether the value of an environment switch of the engine's (this one, the CUDA graphs',
/// the prompt cache's) turns its feature off: `0`, `off` or `false`, whatever the case and
/// spaces; anything else, unset included, leaves it on.
pub(crate) fn switched_off(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "0" | "off" | "false"
    )
}

/// The largest |got − expected| / (1 + |expected|), in f32 on the CPU: how far one kernel's
/// output is from another's, relative to the values (rounding scales with them). NaN where
/// either holds a NaN (a maximum alone would pass over them, and a NaN is what an unwritten
/// output of the emulation holds).
pub fn largest_relative_difference(
    got: &candle_core::Tensor,
    expected: &candle_core::Tensor,
) -> candle_core::Result<f32> {
    let expected = as_f32_on_cpu(expected)?;
    let relative = ((as_f32_on_cpu(got)? - &expected)?.abs()? / (expected.abs()? + 1.0)?)?;
    largest_or_nan(&relative)
}

/// The largest |a − b|, in f32 on the CPU; NaN where either holds a NaN.
pub fn largest_difference(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> candle_core::Result<f32> {
    largest_or_nan(&(as_f32_on_cpu(a)? - as_f32_on_cpu(b)?)?.abs()?)
}

fn as_f32_on_cpu(tensor: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    tensor
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(candle_core::DType::F32)
}

/// The largest value of `values` (non-negative), or NaN if any is one.
fn largest_or_nan(values: &candle_core::Tensor) -> candle_core::Result<f32> {
    let values = values.flatten_all()?;
    let nans = values
        .ne(&values)?
        .to_dtype(candle_core::DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    if nans > 0.0 {
        return Ok(f32::NAN);
    }
    values.max(0)?.to_scalar::<f32>()
}

/// Loads and checks our kernels on `device` now (on a GPU; elsewhere there is nothing to
/// do), so that a job does not, times each against what it replaces there and keeps the
/// faster ([`race`]); says whether all of them loaded. Call it after candle's own kernels
/// are compiled (the races run them).
pub fn prepare(device: &candle_core::Device) -> bool {
    if !enabled() {
        return false;
    }
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(cuda) => cuda::prepare(cuda),
        candle_core::Device::Cpu => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    #[test]
    fn only_an_explicit_no_turns_a_switch_off() {
        for value in ["0", "off", "OFF", " false "] {
            assert!(super::switched_off(value), "{value:?}");
        }
        for value in ["", "1", "on", "true"] {
            assert!(!super::switched_off(value), "{value:?}");
        }
    }

    #[test]
    fn one_nan_makes_the_difference_nan() {
        let expected = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let close = Tensor::new(&[1f32, 2.0, 3.5], &Device::Cpu).unwrap();
        let unwritten = Tensor::new(&[1f32, f32::NAN, 3.5], &Device::Cpu).unwrap();
        let difference = super::largest_relative_difference(&close, &expected).unwrap();
        assert!((difference - 0.125).abs() < 1e-6, "{difference}");
        assert!(
            super::largest_relative_difference(&unwritten, &expected)
                .unwrap()
                .is_nan()
        );
    }
}

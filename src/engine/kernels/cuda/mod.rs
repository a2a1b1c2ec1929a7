//! Our kernels on a CUDA device: one module per kernel source, each a fatbin `build.rs`
//! compiles (machine code for every supported architecture, PTX for newer ones), loaded once
//! per device and checked against a CPU reference on small inputs of every kind before the
//! device first uses it. A module that does not load, or a kernel that disagrees, leaves
//! candle's composition in its place for the rest of the process, with a warning; the other
//! modules are unaffected. When the device is prepared, each module that passed is also
//! timed against what it replaces ([`race`]); one that is slower on this card is switched off
//! the same way.

mod attention;
mod conv3x3;
mod geglu;
mod group_norm;
mod im2col;
mod race;

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::cuda_backend::cudarc::driver::{CudaModule, CudaView};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{CudaDevice, CudaStorage, Layout, Result};

pub(super) use attention::{attention, attention_runs_on};
pub(super) use conv3x3::{conv3x3, conv3x3_on, conv3x3_runs_on, conv3x3_slots};
pub(super) use geglu::geglu;
pub(super) use group_norm::{
    group_norm, group_norm_affines, group_norm_columns, group_norm_fits, group_norm_statistics,
};
pub(super) use im2col::{columns_3x3, im2col_runs_on};

/// A fatbin, aligned as a fatbin's header must be. On Linux it sits in the section nvcc's own
/// fatbins use, so `cuobjdump --list-elf` on the binary lists its machine code beside the
/// rest (the release workflow checks the architectures that way).
macro_rules! embedded_fatbin {
    ($name:ident, $file:literal) => {
        #[cfg_attr(target_os = "linux", unsafe(link_section = ".nv_fatbin"))]
        static $name: Aligned<[u8; include_bytes!(concat!(env!("OUT_DIR"), "/", $file)).len()]> =
            Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/", $file)));
    };
}

embedded_fatbin!(GROUP_NORM_FATBIN, "group_norm.fatbin");
embedded_fatbin!(ATTENTION_FATBIN, "attention.fatbin");
embedded_fatbin!(ATTENTION_MMA_FATBIN, "attention_mma.fatbin");
embedded_fatbin!(GEGLU_FATBIN, "geglu.fatbin");
embedded_fatbin!(IM2COL_FATBIN, "im2col.fatbin");
embedded_fatbin!(CONV3X3_FATBIN, "conv3x3.fatbin");

#[repr(C, align(8))]
struct Aligned<T>(T);

/// Our kernel sources, each its own module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Family {
    /// `group_norm.cu`: group norm with its affine and SiLU, written as it is or as a 3×3
    /// convolution's columns.
    GroupNorm,
    /// `attention.cu`: multi-head softmax attention.
    Attention,
    /// `attention_mma.cu`: the same for heads up to 128 wide, all in registers.
    AttentionMma,
    /// `geglu.cu`: the feed-forward's GELU gate.
    Geglu,
    /// `im2col.cu`: the columns of a 3×3 convolution, in the image layout's order.
    Im2col,
    /// `conv3x3.cu`: a 3×3 convolution straight from the image (implicit GEMM), f16.
    Conv3x3,
    /// `conv3x3.cu` again: its f32 kernels, in TF32 (Ampere and newer).
    Conv3x3Tf32,
}

impl Family {
    /// Every family, in the order they are loaded (and raced: the convolution's rival is the
    /// column path where the column kernel won its race).
    pub(super) const ALL: [Family; 7] = [
        Family::GroupNorm,
        Family::Attention,
        Family::AttentionMma,
        Family::Geglu,
        Family::Im2col,
        Family::Conv3x3,
        Family::Conv3x3Tf32,
    ];
}

impl Family {
    fn fatbin(self) -> &'static [u8] {
        match self {
            Family::GroupNorm => &GROUP_NORM_FATBIN.0,
            Family::Attention => &ATTENTION_FATBIN.0,
            Family::AttentionMma => &ATTENTION_MMA_FATBIN.0,
            Family::Geglu => &GEGLU_FATBIN.0,
            Family::Im2col => &IM2COL_FATBIN.0,
            Family::Conv3x3 | Family::Conv3x3Tf32 => &CONV3X3_FATBIN.0,
        }
    }

    /// Whether this family has kernels for `device`: all but the TF32 convolution, which
    /// needs Ampere or newer (compute capability 8.0).
    fn applies_to(self, device: &CudaDevice) -> bool {
        match self {
            Family::Conv3x3Tf32 => device
                .cuda_stream()
                .context()
                .compute_capability()
                .is_ok_and(|(major, _)| major >= 8),
            _ => true,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Family::GroupNorm => "group norm",
            Family::Attention => "attention",
            Family::AttentionMma => "register attention",
            Family::Geglu => "GEGLU",
            Family::Im2col => "3×3 column",
            Family::Conv3x3 => "3×3 convolution",
            Family::Conv3x3Tf32 => "3×3 TF32 convolution",
        }
    }
}

/// What each device this process used got, per family: the checked module, or `None`
/// (candle's ops).
type Loaded = Vec<(DeviceId, Family, Option<Arc<CudaModule>>)>;
static DEVICES: Mutex<Loaded> = Mutex::new(Vec::new());

/// Our `family` module on `device` once it has loaded and passed its check; `None`: candle's
/// composition runs there. The first call per device and family loads and checks
/// (milliseconds).
pub(super) fn checked_module(device: &CudaDevice, family: Family) -> Option<Arc<CudaModule>> {
    let mut devices = DEVICES.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((.., module)) = devices
        .iter()
        .find(|(id, loaded, _)| *id == device.id() && *loaded == family)
    {
        return module.clone();
    }
    if !family.applies_to(device) {
        tracing::debug!("our GPU {} kernels are not for this card", family.name());
        devices.push((device.id(), family, None));
        return None;
    }
    let module = match load_and_check(device, family) {
        Ok(module) => {
            tracing::debug!(
                "our GPU {} kernels loaded and agree with the CPU",
                family.name()
            );
            Some(module)
        }
        Err(why) => {
            tracing::warn!(
                "our GPU {} kernels are off, candle's run instead: {why}",
                family.name()
            );
            None
        }
    };
    devices.push((device.id(), family, module.clone()));
    module
}

/// Loads and checks every family on `device`, then (once per device) times each that loaded
/// against what runs in its place and switches off those slower on this card ([`race`]).
/// Says whether every family for this card loaded.
pub(super) fn prepare(device: &CudaDevice) -> bool {
    // Every family loads, whether or not one before it did.
    let loaded = Family::ALL
        .map(|family| !family.applies_to(device) || checked_module(device, family).is_some());
    race::run_once(device);
    loaded.iter().all(|loaded| *loaded)
}

/// Leaves what runs in place of `family` on `device` there for the rest of the process, as if
/// the module had not loaded.
fn switch_off(device: &CudaDevice, family: Family) {
    let mut devices = DEVICES.lock().unwrap_or_else(PoisonError::into_inner);
    for (.., module) in devices
        .iter_mut()
        .filter(|(id, loaded, _)| *id == device.id() && *loaded == family)
    {
        *module = None;
    }
}

fn load_and_check(
    device: &CudaDevice,
    family: Family,
) -> std::result::Result<Arc<CudaModule>, String> {
    let module = device
        .cuda_stream()
        .context()
        .load_module(Ptx::from_binary(family.fatbin().to_vec()))
        .map_err(|error| format!("the driver did not load them ({error})"))?;
    match family {
        Family::GroupNorm => group_norm::check(device, &module)?,
        Family::Attention => attention::check(device, &module)?,
        Family::AttentionMma => attention::check_mma(device, &module)?,
        Family::Geglu => geglu::check(device, &module)?,
        Family::Im2col => im2col::check(device, &module)?,
        Family::Conv3x3 => conv3x3::check(device, &module)?,
        Family::Conv3x3Tf32 => conv3x3::check_tf32(device, &module)?,
    }
    Ok(module)
}

/// A device check's verdict on one case: `Err` naming `case` where the kernel's largest
/// `difference` from the CPU reference (relative) is NaN or beyond `allowed`.
fn within_tolerance(
    case: impl std::fmt::Display,
    difference: f32,
    allowed: f32,
) -> std::result::Result<(), String> {
    if difference.is_nan() || difference > allowed {
        return Err(format!(
            "{case}: {difference} from the CPU, relative (allowed {allowed})"
        ));
    }
    Ok(())
}

/// The contiguous part of `storage` that `layout` describes.
fn view<'a, T: CudaDType>(
    (storage, layout): (&'a CudaStorage, &Layout),
) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("a kernel input is not contiguous");
    };
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

fn as_u32(value: usize) -> Result<u32> {
    u32::try_from(value)
        .map_err(|_| candle_core::Error::Msg(format!("{value} does not fit a kernel argument")))
}

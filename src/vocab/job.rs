//! A job as the worker runs it ([`JobSpec`]), the samplers it may name ([`Scheduler`]), and
//! the ranges its parameters must be in (studio-api.md §3.1), checked the same way for the
//! studio's jobs and for `studio-worker generate`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const MIN_SIDE: u32 = 64;
pub const MAX_SIDE: u32 = 2048;
pub const MAX_STEPS: u32 = 150;
pub const MAX_GUIDANCE: f64 = 30.0;
pub const MAX_IMAGES: u32 = 8;
pub const MAX_PROMPT_CHARS: usize = 4000;
/// 2^53 − 1: the largest integer every JSON implementation represents exactly.
pub const MAX_SEED: u64 = (1 << 53) - 1;

/// The samplers a job may ask for (`scheduler` in the protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    EulerA,
    Euler,
    Ddim,
    DpmPp2mKarras,
}

impl Scheduler {
    pub const ALL: [Self; 4] = [Self::EulerA, Self::Euler, Self::Ddim, Self::DpmPp2mKarras];

    /// The protocol's name (`euler_a`, …).
    pub fn protocol_name(self) -> &'static str {
        match self {
            Self::EulerA => "euler_a",
            Self::Euler => "euler",
            Self::Ddim => "ddim",
            Self::DpmPp2mKarras => "dpmpp_2m_karras",
        }
    }

    pub fn from_protocol(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|scheduler| scheduler.protocol_name() == name)
    }

    /// The name other Stable Diffusion tools write in a PNG's parameters (`Euler a`, …).
    pub fn display_name(self) -> &'static str {
        match self {
            Self::EulerA => "Euler a",
            Self::Euler => "Euler",
            Self::Ddim => "DDIM",
            Self::DpmPp2mKarras => "DPM++ 2M Karras",
        }
    }
}

/// A job that passed every check: what the engine runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub job_id: String,
    pub model: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    /// The job's seed, or one the worker picked (reported with the result).
    pub seed: u64,
    pub num_images: u32,
    /// `None`: the model's default.
    pub scheduler: Option<Scheduler>,
    pub lease: Duration,
}

/// What an engine can take, reported in capabilities and claims and enforced on every job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineLimits {
    pub max_width: u32,
    pub max_height: u32,
    pub max_images: u32,
}

impl EngineLimits {
    /// An engine that takes nothing (no engine at all).
    pub const NONE: Self = Self {
        max_width: 0,
        max_height: 0,
        max_images: 0,
    };
}

/// A parameter outside its range, in one line that names it and never quotes a prompt.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OutOfRange(pub String);

/// An image side: `min..=MAX_SIDE`, a multiple of 8, and within what this engine takes.
/// `name` is how the caller calls it (`width`, `--width`).
pub fn check_side(name: &str, value: u64, min: u32, engine_max: u32) -> Result<u32, OutOfRange> {
    let value = check_integer(name, value, u64::from(min), u64::from(MAX_SIDE))?;
    let value = u32::try_from(value).unwrap_or(MAX_SIDE);
    if value % 8 != 0 {
        return Err(OutOfRange(format!(
            "{name} must be a multiple of 8 (got {value})"
        )));
    }
    if value > engine_max {
        return Err(OutOfRange(format!(
            "{name} {value} is over this worker's limit of {engine_max}"
        )));
    }
    Ok(value)
}

/// Denoising steps: `1..=MAX_STEPS`.
pub fn check_steps(name: &str, value: u64) -> Result<u32, OutOfRange> {
    let steps = check_integer(name, value, 1, u64::from(MAX_STEPS))?;
    Ok(u32::try_from(steps).unwrap_or(MAX_STEPS))
}

/// Classifier-free guidance: `0..=MAX_GUIDANCE` (NaN is out of range).
pub fn check_guidance(name: &str, value: f64) -> Result<f64, OutOfRange> {
    if (0.0..=MAX_GUIDANCE).contains(&value) {
        Ok(value)
    } else {
        Err(OutOfRange(format!(
            "{name} must be from 0 to {MAX_GUIDANCE} (got {})",
            short_number(value)
        )))
    }
}

/// `value` in at most a few characters: huge and tiny numbers in exponent form (`1e300`,
/// not three hundred digits).
fn short_number(value: f64) -> String {
    if value == 0.0 || (1e-4..1e6).contains(&value.abs()) {
        format!("{value}")
    } else {
        format!("{value:e}")
    }
}

/// Images per job: `1..=MAX_IMAGES`, and within what this engine takes.
pub fn check_images(name: &str, value: u64, engine_max: u32) -> Result<u32, OutOfRange> {
    let count = check_integer(name, value, 1, u64::from(MAX_IMAGES))?;
    if count > u64::from(engine_max) {
        return Err(OutOfRange(format!(
            "{name} {count} is over this worker's limit of {engine_max}"
        )));
    }
    Ok(u32::try_from(count).unwrap_or(1))
}

/// A seed: `0..=MAX_SEED`.
pub fn check_seed(name: &str, value: u64) -> Result<u64, OutOfRange> {
    check_integer(name, value, 0, MAX_SEED)
}

/// A prompt of at most [`MAX_PROMPT_CHARS`] characters. Counting stops early: a 10 MB
/// prompt is not walked to the end.
pub fn check_prompt(name: &str, text: &str) -> Result<(), OutOfRange> {
    if text.chars().nth(MAX_PROMPT_CHARS).is_some() {
        return Err(OutOfRange(format!(
            "{name} is longer than {MAX_PROMPT_CHARS} characters"
        )));
    }
    Ok(())
}

/// `value` within `min..=max`.
pub fn check_integer(name: &str, value: u64, min: u64, max: u64) -> Result<u64, OutOfRange> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(OutOfRange(format!(
            "{name} must be from {min} to {max} (got {value})"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedulers_round_trip_their_protocol_names() {
        for scheduler in Scheduler::ALL {
            assert_eq!(
                Scheduler::from_protocol(scheduler.protocol_name()),
                Some(scheduler)
            );
        }
        assert_eq!(Scheduler::from_protocol("plms"), None);
    }

    #[test]
    fn ranges_name_the_parameter_and_the_rule() {
        assert_eq!(check_side("width", 512, MIN_SIDE, 1024), Ok(512));
        assert_eq!(
            check_side("--width", 100, 8, 2048).unwrap_err().0,
            "--width must be a multiple of 8 (got 100)"
        );
        assert_eq!(
            check_side("width", 56, MIN_SIDE, 1024).unwrap_err().0,
            "width must be from 64 to 2048 (got 56)"
        );
        assert_eq!(
            check_side("height", 1032, MIN_SIDE, 1024).unwrap_err().0,
            "height 1032 is over this worker's limit of 1024"
        );
        assert!(check_steps("steps", 0).is_err());
        assert!(check_steps("steps", 151).is_err());
        assert!(check_guidance("guidanceScale", f64::NAN).is_err());
        assert!(check_guidance("guidanceScale", 30.5).is_err());
        assert_eq!(check_images("numImages", 4, 4), Ok(4));
        assert!(check_images("numImages", 5, 4).is_err());
        assert!(check_seed("seed", MAX_SEED + 1).is_err());
        assert!(check_prompt("prompt", &"é".repeat(4000)).is_ok());
        assert!(check_prompt("prompt", &"x".repeat(4001)).is_err());
    }
}

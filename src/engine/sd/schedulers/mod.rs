//! Samplers: how a denoise loop walks from noise to an image.
//!
//! Each sampler reproduces its diffusers counterpart (`DDIMScheduler`,
//! `EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`, and
//! `DPMSolverMultistepScheduler` as DPM++ 2M with Karras sigmas): the same timesteps for a
//! given step count and spacing, the same update. The noise schedule itself (betas, what
//! the model predicts, how steps are spaced) comes from the model's
//! `scheduler/scheduler_config.json`. Ancestral noise is drawn through a closure the
//! pipeline owns, so a seed fixes it on every device.
//!
//! Arithmetic on schedule values is f64; the latents stay in f32 whatever the model runs in.
//! Rounding is numpy's (half to even), or 25-step schedules pick 833 where diffusers picks 832.

mod ddim;
mod dpm_solver;
mod euler;

use candle_core::{Result, Tensor};

use super::model_folder::{SchedulerFile, Unrunnable, positive, within};
use crate::vocab::job::Scheduler;

/// Training timesteps past any released model (1,000 is usual): more would only allocate.
const MAX_TRAIN_STEPS: usize = 100_000;

pub use ddim::Ddim;
pub use dpm_solver::DpmPp2mKarras;
pub use euler::Euler;

/// What the UNet predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    /// The noise that was added.
    Epsilon,
    /// `v = α·ε − σ·x₀` (SD 2.x 768 models).
    Velocity,
}

/// How inference timesteps are picked from the training timesteps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

/// The training noise schedule of a model.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    /// `ᾱ_t` for every training timestep.
    pub alphas_cumprod: Vec<f64>,
    pub prediction: Prediction,
    pub spacing: Spacing,
    pub steps_offset: usize,
    /// DDIM: `ᾱ` before the first timestep is 1 (else `ᾱ_0`).
    pub set_alpha_to_one: bool,
    /// DDIM: clamp the `x₀` estimate to `±range` (`clip_sample`, on unless the file says
    /// otherwise, as in diffusers).
    pub ddim_clip: Option<f64>,
    /// Which scheduler class the model ships with (its default sampler).
    pub class_name: String,
}

impl NoiseSchedule {
    /// The schedule `scheduler_config.json` describes, or why the engine cannot run it.
    pub fn from_file(file: &SchedulerFile) -> std::result::Result<Self, Unrunnable> {
        Self::checked(file).map_err(Unrunnable)
    }

    fn checked(file: &SchedulerFile) -> std::result::Result<Self, String> {
        let train_steps = file.num_train_timesteps;
        within("num_train_timesteps", train_steps, 2..=MAX_TRAIN_STEPS)?;
        within("steps_offset", file.steps_offset, 0..=train_steps - 1)?;
        positive("clip_sample_range", file.clip_sample_range)?;
        if file.trained_betas.is_none() {
            positive("beta_start", file.beta_start)?;
            positive("beta_end", file.beta_end)?;
            if file.beta_start > file.beta_end || file.beta_end >= 1.0 {
                return Err(format!(
                    "beta_start {} and beta_end {} must rise from above 0 to below 1",
                    file.beta_start, file.beta_end
                ));
            }
        }
        if let Some(betas) = &file.trained_betas
            && betas
                .iter()
                .any(|beta| !beta.is_finite() || *beta <= 0.0 || *beta >= 1.0)
        {
            return Err("trained_betas must all be above 0 and below 1".to_owned());
        }
        if file.rescale_betas_zero_snr {
            return Err("rescale_betas_zero_snr is not supported".to_owned());
        }
        let betas: Vec<f64> = match (&file.trained_betas, file.beta_schedule.as_str()) {
            (Some(betas), _) if betas.len() == train_steps => betas.clone(),
            (Some(_), _) => return Err("trained_betas has the wrong length".to_owned()),
            (None, "linear") => linspace(file.beta_start, file.beta_end, train_steps),
            (None, "scaled_linear") => {
                linspace(file.beta_start.sqrt(), file.beta_end.sqrt(), train_steps)
                    .into_iter()
                    .map(|beta| beta * beta)
                    .collect()
            }
            (None, "squaredcos_cap_v2") => cosine_betas(train_steps),
            (None, other) => return Err(format!("beta_schedule {other} is not supported")),
        };
        let mut product = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|beta| {
                product *= 1.0 - beta;
                product
            })
            .collect();
        let prediction = match file.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::Velocity,
            other => return Err(format!("prediction_type {other} is not supported")),
        };
        // The class's own default when the file does not say.
        let default_spacing = match file.class_name.as_str() {
            "DDIMScheduler" | "PNDMScheduler" => "leading",
            _ => "linspace",
        };
        let spacing = match file.timestep_spacing.as_deref().unwrap_or(default_spacing) {
            "leading" => Spacing::Leading,
            "trailing" => Spacing::Trailing,
            "linspace" => Spacing::Linspace,
            other => return Err(format!("timestep_spacing {other} is not supported")),
        };
        Ok(Self {
            alphas_cumprod,
            prediction,
            spacing,
            steps_offset: file.steps_offset,
            set_alpha_to_one: file.set_alpha_to_one.unwrap_or(true),
            ddim_clip: file
                .clip_sample
                .unwrap_or(true)
                .then_some(file.clip_sample_range),
            class_name: file.class_name.clone(),
        })
    }

    pub fn train_steps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// The sampler a job gets when it names none: the model's own scheduler where we have
    /// it; Euler ancestral for turbo-style models (trailing spacing); otherwise DPM++ 2M
    /// Karras, which does well at 20–30 steps (SD 1.5 ships PNDM, which we do not run).
    pub fn default_sampler(&self) -> Scheduler {
        match self.class_name.as_str() {
            "EulerAncestralDiscreteScheduler" => Scheduler::EulerA,
            _ if self.spacing == Spacing::Trailing => Scheduler::EulerA,
            "EulerDiscreteScheduler" => Scheduler::Euler,
            "DDIMScheduler" => Scheduler::Ddim,
            _ => Scheduler::DpmPp2mKarras,
        }
    }

    /// `σ_t = √((1 − ᾱ_t) / ᾱ_t)` for every training timestep.
    fn sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod
            .iter()
            .map(|alpha| ((1.0 - alpha) / alpha).sqrt())
            .collect()
    }

    /// Integer timesteps, highest first, for DDIM-style spacing.
    fn discrete_timesteps(&self, steps: usize) -> Vec<f64> {
        let train = self.train_steps();
        match self.spacing {
            Spacing::Leading => {
                let ratio = train / steps;
                (0..steps)
                    .rev()
                    .map(|index| (index * ratio + self.steps_offset) as f64)
                    .collect()
            }
            Spacing::Trailing => trailing(train, steps),
            Spacing::Linspace => linspace(0.0, (train - 1) as f64, steps)
                .into_iter()
                .rev()
                .map(f64::round_ties_even)
                .collect(),
        }
    }
}

/// `round(arange(train, 0, -train/steps)) − 1`.
fn trailing(train: usize, steps: usize) -> Vec<f64> {
    let ratio = train as f64 / steps as f64;
    (0..steps)
        .map(|index| (train as f64 - index as f64 * ratio).round_ties_even() - 1.0)
        .collect()
}

/// `numpy.linspace(start, stop, count)`.
pub(crate) fn linspace(start: f64, stop: f64, count: usize) -> Vec<f64> {
    match count {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (count - 1) as f64;
            (0..count)
                .map(|index| {
                    if index == count - 1 {
                        stop
                    } else {
                        start + step * index as f64
                    }
                })
                .collect()
        }
    }
}

/// `numpy.interp` for increasing `xs`.
fn interpolate(x: f64, xs: &[f64], ys: &[f64]) -> f64 {
    let last = xs.len() - 1;
    if x <= xs[0] {
        return ys[0];
    }
    if x >= xs[last] {
        return ys[last];
    }
    let upper = xs.partition_point(|&value| value <= x).min(last);
    let lower = upper - 1;
    let weight = (x - xs[lower]) / (xs[upper] - xs[lower]);
    ys[lower] + weight * (ys[upper] - ys[lower])
}

fn cosine_betas(train_steps: usize) -> Vec<f64> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    (0..train_steps)
        .map(|index| {
            let t1 = index as f64 / train_steps as f64;
            let t2 = (index + 1) as f64 / train_steps as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
        })
        .collect()
}

/// `x₀` from the model's output at noise level `σ` (Karras-style latents, `x = x₀ + σ·ε`).
fn predicted_original(
    prediction: Prediction,
    model_output: &Tensor,
    latents: &Tensor,
    sigma: f64,
) -> Result<Tensor> {
    match prediction {
        Prediction::Epsilon => latents - (model_output * sigma)?,
        Prediction::Velocity => {
            let scale = sigma * sigma + 1.0;
            (model_output * (-sigma / scale.sqrt()))? + (latents / scale)?
        }
    }
}

/// One sampler run: built for a step count, stepped once per timestep in order.
pub trait Sampler: Send {
    /// The timestep the UNet sees at each step.
    fn timesteps(&self) -> &[f64];

    /// The noise level `σ` at each step and a final 0, for samplers that work in `σ`.
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }

    /// Standard deviation of the initial noise (1 for samplers on variance-preserving
    /// latents).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The UNet's input at step `index` (the latents themselves, unless the sampler works
    /// in σ-scaled latents).
    fn scale_model_input(&self, latents: &Tensor, _index: usize) -> Result<Tensor> {
        Ok(latents.clone())
    }

    /// The latents after step `index`. `noise` gives fresh standard-normal noise shaped like
    /// the latents, for ancestral samplers.
    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        latents: &Tensor,
        noise: &mut dyn FnMut() -> Result<Tensor>,
    ) -> Result<Tensor>;
}

/// The sampler `kind` for `steps` steps over the model's noise schedule.
pub fn build(kind: Scheduler, schedule: &NoiseSchedule, steps: usize) -> Box<dyn Sampler> {
    let steps = steps.clamp(1, schedule.train_steps());
    match kind {
        Scheduler::Ddim => Box::new(Ddim::new(schedule, steps)),
        Scheduler::Euler => Box::new(Euler::new(schedule, steps, false)),
        Scheduler::EulerA => Box::new(Euler::new(schedule, steps, true)),
        Scheduler::DpmPp2mKarras => Box::new(DpmPp2mKarras::new(schedule, steps)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_and_interp_match_numpy() {
        assert_eq!(linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(linspace(2.0, 3.0, 1), vec![2.0]);
        let xs = [0.0, 1.0, 2.0];
        let ys = [10.0, 20.0, 40.0];
        assert_eq!(interpolate(1.5, &xs, &ys), 30.0);
        assert_eq!(interpolate(-1.0, &xs, &ys), 10.0);
        assert_eq!(interpolate(5.0, &xs, &ys), 40.0);
        assert_eq!(interpolate(2.0, &xs, &ys), 40.0);
    }

    #[test]
    fn trailing_spacing_ends_at_the_last_training_step() {
        assert_eq!(trailing(1000, 1), vec![999.0]);
        assert_eq!(trailing(1000, 4), vec![999.0, 749.0, 499.0, 249.0]);
    }
}

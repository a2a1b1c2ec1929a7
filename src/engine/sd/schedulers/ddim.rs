//! DDIM with η = 0: deterministic, no noise after the first.

use candle_core::{Result, Tensor};

use super::{NoiseSchedule, Prediction, Sampler};

pub struct Ddim {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    step_ratio: usize,
    prediction: Prediction,
    clip: Option<f64>,
}

impl Ddim {
    pub fn new(schedule: &NoiseSchedule, steps: usize) -> Self {
        let final_alpha_cumprod = if schedule.set_alpha_to_one {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        Self {
            timesteps: schedule.discrete_timesteps(steps),
            alphas_cumprod: schedule.alphas_cumprod.clone(),
            final_alpha_cumprod,
            step_ratio: schedule.train_steps() / steps,
            prediction: schedule.prediction,
            clip: schedule.ddim_clip,
        }
    }

    fn alpha_at(&self, timestep: i64) -> f64 {
        usize::try_from(timestep)
            .ok()
            .and_then(|index| self.alphas_cumprod.get(index).copied())
            .unwrap_or(self.final_alpha_cumprod)
    }
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        latents: &Tensor,
        _noise: &mut dyn FnMut() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let timestep = self.timesteps[index] as i64;
        let alpha = self.alpha_at(timestep);
        let alpha_previous = self.alpha_at(timestep - self.step_ratio as i64);
        let (sqrt_alpha, sqrt_one_minus) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        let (original, noise) = match self.prediction {
            Prediction::Epsilon => (
                ((latents - (model_output * sqrt_one_minus)?)? / sqrt_alpha)?,
                model_output.clone(),
            ),
            Prediction::Velocity => (
                ((latents * sqrt_alpha)? - (model_output * sqrt_one_minus)?)?,
                ((model_output * sqrt_alpha)? + (latents * sqrt_one_minus)?)?,
            ),
        };
        let original = match self.clip {
            Some(range) => original.clamp(-range, range)?,
            None => original,
        };
        (original * alpha_previous.sqrt())? + (noise * (1.0 - alpha_previous).sqrt())?
    }
}

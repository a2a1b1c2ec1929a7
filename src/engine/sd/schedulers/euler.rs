//! Euler and Euler ancestral (Karras et al.'s σ formulation, as in k-diffusion and
//! diffusers).

use candle_core::{Result, Tensor};

use super::{
    NoiseSchedule, Prediction, Sampler, Spacing, interpolate, linspace, predicted_original,
};

pub struct Euler {
    timesteps: Vec<f64>,
    /// One per timestep, then a final 0.
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: Prediction,
    ancestral: bool,
}

impl Euler {
    pub fn new(schedule: &NoiseSchedule, steps: usize, ancestral: bool) -> Self {
        let train = schedule.train_steps();
        let timesteps: Vec<f64> = match schedule.spacing {
            // Not rounded: Euler interpolates σ between training steps.
            Spacing::Linspace => linspace(0.0, (train - 1) as f64, steps)
                .into_iter()
                .rev()
                .collect(),
            Spacing::Leading | Spacing::Trailing => schedule.discrete_timesteps(steps),
        };
        let all_sigmas = schedule.sigmas();
        let positions: Vec<f64> = (0..train).map(|index| index as f64).collect();
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&timestep| interpolate(timestep, &positions, &all_sigmas))
            .collect();
        sigmas.push(0.0);
        let max_sigma = sigmas.iter().copied().fold(0.0, f64::max);
        let init_noise_sigma = match schedule.spacing {
            Spacing::Linspace | Spacing::Trailing => max_sigma,
            Spacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        Self {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction: schedule.prediction,
            ancestral,
        }
    }
}

impl Sampler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, latents: &Tensor, index: usize) -> Result<Tensor> {
        let sigma = self.sigmas[index];
        latents / (sigma * sigma + 1.0).sqrt()
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        latents: &Tensor,
        noise: &mut dyn FnMut() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let sigma = self.sigmas[index];
        let next = self.sigmas[index + 1];
        let original = predicted_original(self.prediction, model_output, latents, sigma)?;
        let derivative = ((latents - original)? / sigma)?;
        if !self.ancestral {
            return latents + (derivative * (next - sigma))?;
        }
        // Step down to σ_down deterministically, then add fresh noise of σ_up.
        let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
        let down = (next * next - up * up).sqrt();
        let stepped = (latents + (derivative * (down - sigma))?)?;
        let fresh = noise()?;
        stepped + (fresh * up)?
    }
}

//! DPM-Solver++ (2M) with Karras σ spacing: second-order multistep, deterministic.
//!
//! It works on variance-preserving latents (`x = α·x₀ + σ_vp·ε`), so the UNet input is not
//! scaled and the initial noise has σ = 1.

use candle_core::{Result, Tensor};

use super::{NoiseSchedule, Prediction, Sampler};

/// Karras et al.'s ρ.
const RHO: f64 = 7.0;

pub struct DpmPp2mKarras {
    timesteps: Vec<f64>,
    /// One per timestep, then a final 0.
    sigmas: Vec<f64>,
    prediction: Prediction,
    /// The previous step's `x₀` estimate (second-order steps need it).
    previous_original: Option<Tensor>,
}

impl DpmPp2mKarras {
    pub fn new(schedule: &NoiseSchedule, steps: usize) -> Self {
        let all_sigmas = schedule.sigmas();
        let log_sigmas: Vec<f64> = all_sigmas.iter().map(|sigma| sigma.ln()).collect();
        let sigma_min = all_sigmas[0];
        let sigma_max = all_sigmas[all_sigmas.len() - 1];
        let (max_inv, min_inv) = (sigma_max.powf(1.0 / RHO), sigma_min.powf(1.0 / RHO));
        let mut sigmas: Vec<f64> = super::linspace(0.0, 1.0, steps)
            .into_iter()
            .map(|ramp| (max_inv + ramp * (min_inv - max_inv)).powf(RHO))
            .collect();
        let timesteps = sigmas
            .iter()
            .map(|&sigma| sigma_to_timestep(sigma, &log_sigmas).round_ties_even())
            .collect();
        sigmas.push(0.0);
        Self {
            timesteps,
            sigmas,
            prediction: schedule.prediction,
            previous_original: None,
        }
    }
}

/// The (fractional) training timestep whose σ is `sigma`, interpolating in log σ.
fn sigma_to_timestep(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let below = log_sigmas
        .iter()
        .filter(|&&value| log_sigma - value >= 0.0)
        .count();
    let low = below.saturating_sub(1).min(log_sigmas.len() - 2);
    let high = low + 1;
    let weight =
        ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high])).clamp(0.0, 1.0);
    (1.0 - weight) * low as f64 + weight * high as f64
}

/// `(α_t, σ_t)` of the variance-preserving process at Karras noise level `sigma`.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `λ = log α − log σ`: +∞ at σ = 0.
fn lambda(sigma: f64) -> f64 {
    let (alpha, sigma) = alpha_sigma(sigma);
    alpha.ln() - sigma.ln()
}

impl Sampler for DpmPp2mKarras {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        latents: &Tensor,
        _noise: &mut dyn FnMut() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (sigma_s, sigma_t) = (self.sigmas[index], self.sigmas[index + 1]);
        let (alpha_s, vp_sigma_s) = alpha_sigma(sigma_s);
        let (alpha_t, vp_sigma_t) = alpha_sigma(sigma_t);
        let original = match self.prediction {
            Prediction::Epsilon => ((latents - (model_output * vp_sigma_s)?)? / alpha_s)?,
            Prediction::Velocity => ((latents * alpha_s)? - (model_output * vp_sigma_s)?)?,
        };
        let h = lambda(sigma_t) - lambda(sigma_s);
        let decay = (-h).exp() - 1.0;
        // The last step (to σ = 0) and the first are first order.
        let is_last = index + 1 == self.timesteps.len();
        let estimate = match (&self.previous_original, is_last) {
            (Some(previous), false) => {
                let h_previous = lambda(sigma_s) - lambda(self.sigmas[index - 1]);
                let r = h_previous / h;
                // D0 + ½·D1 with D1 = (m0 − m1) / r.
                (&original + ((&original - previous)? * (0.5 / r))?)?
            }
            _ => original.clone(),
        };
        let next = ((latents * (vp_sigma_t / vp_sigma_s))? - (estimate * (alpha_t * decay))?)?;
        self.previous_original = Some(original);
        Ok(next)
    }
}

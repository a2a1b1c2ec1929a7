//! Seeded Gaussian noise that the project owns.
//!
//! candle cannot seed its CPU device, and CUDA's generator differs from the CPU's, so noise
//! is drawn here on the CPU (ChaCha8, standard normal) and moved to the device. One seed
//! gives the same numbers on every machine and backend, so a job's image depends only on
//! the job (and on float rounding of the device).

use candle_core::{Device, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

pub struct NoiseSource {
    rng: ChaCha8Rng,
}

impl NoiseSource {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The next `count` standard-normal values.
    pub fn normal(&mut self, count: usize) -> Vec<f32> {
        (0..count)
            .map(|_| self.rng.sample::<f32, _>(StandardNormal))
            .collect()
    }

    /// A standard-normal f32 tensor of `shape` on `device`.
    pub fn tensor(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let values = self.normal(shape.iter().product());
        Tensor::from_vec(values, shape, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_fixes_the_noise_and_another_seed_changes_it() {
        let first = NoiseSource::new(42).normal(1000);
        assert_eq!(first, NoiseSource::new(42).normal(1000));
        assert_ne!(first, NoiseSource::new(43).normal(1000));
        let mean = first.iter().sum::<f32>() / 1000.0;
        let variance = first.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / 1000.0;
        assert!(mean.abs() < 0.1, "mean {mean}");
        assert!((variance - 1.0).abs() < 0.15, "variance {variance}");
    }

    #[test]
    fn the_stream_is_the_same_on_every_platform() {
        // Pinned values: a change of rand, rand_chacha or rand_distr that alters the stream
        // would silently change every seeded image; this makes it loud.
        let values = NoiseSource::new(7).normal(3);
        let pinned = [values[0], values[1], values[2]];
        assert_eq!(
            pinned.map(|value| (value * 1e4).round() as i32),
            PINNED_SEED_7
        );
    }

    const PINNED_SEED_7: [i32; 3] = [-7754, -13834, 8897];
}

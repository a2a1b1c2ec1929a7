//! Fixture paths, golden tensors and the comparison every parity test uses.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use studio_worker::engine::sd::{Request, StableDiffusion};
use studio_worker::vocab::job::Scheduler;

/// The prompts `make_fixtures.py` encoded, in order.
pub const PROMPTS: [&str; 4] = [
    "a red fox in the snow",
    "A Photo of an astronaut riding a horse, 4k, highly detailed!",
    "",
    "ünïcödé and emoji 🦊 tokens",
];
pub const SIZE: usize = 64;
pub const STEPS: usize = 3;
pub const GUIDANCE: f64 = 7.5;

/// The stated tolerance: max |ours − reference| ≤ 1e-3 · max(1, max |reference|), in f32.
pub const TOLERANCE: f32 = 1e-3;

pub const FIXTURES: [&str; 3] = ["tiny-sd1", "tiny-sd2-v", "tiny-sdxl"];

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

pub fn load(name: &str) -> StableDiffusion {
    StableDiffusion::load(&fixture(name), &Device::Cpu, DType::F32)
        .unwrap_or_else(|error| panic!("{name} does not load: {error}"))
}

pub struct Golden(HashMap<String, Tensor>);

impl Golden {
    pub fn of(name: &str) -> Self {
        let path = fixture(name).join("golden.safetensors");
        Self(candle_core::safetensors::load(path, &Device::Cpu).expect("golden tensors load"))
    }

    pub fn get(&self, key: &str) -> Tensor {
        self.0
            .get(key)
            .unwrap_or_else(|| panic!("golden tensor {key} is missing"))
            .clone()
    }

    /// The tensor with a leading batch dimension of 1.
    pub fn batched(&self, key: &str) -> Tensor {
        self.get(key).unsqueeze(0).expect("unsqueeze")
    }

    pub fn f64s(&self, key: &str) -> Vec<f64> {
        self.get(key)
            .to_dtype(DType::F64)
            .and_then(|tensor| tensor.flatten_all())
            .and_then(|tensor| tensor.to_vec1())
            .expect("golden f64 values")
    }
}

/// What an error is measured against: the reference's largest magnitude, at least 1.
pub fn reference_scale(reference: &Tensor) -> f32 {
    reference
        .abs()
        .and_then(|tensor| tensor.max_all())
        .and_then(|tensor| tensor.to_scalar::<f32>())
        .expect("max")
        .max(1.0)
}

/// Asserts `ours` matches `reference` within [`TOLERANCE`], naming what differs.
pub fn assert_close(what: &str, ours: &Tensor, reference: &Tensor) {
    let ours = ours.to_dtype(DType::F32).expect("f32");
    let reference = reference.to_dtype(DType::F32).expect("f32");
    assert_eq!(
        ours.dims(),
        reference.dims(),
        "{what}: shape {:?} vs reference {:?}",
        ours.dims(),
        reference.dims()
    );
    let scale = reference_scale(&reference);
    let error = (&ours - &reference)
        .and_then(|tensor| tensor.abs())
        .and_then(|tensor| tensor.max_all())
        .and_then(|tensor| tensor.to_scalar::<f32>())
        .expect("max error");
    // Printed for the record (`cargo test --test engine -- --nocapture`).
    eprintln!("{what}: max |Δ| = {error:.2e} (scale {scale:.2})");
    assert!(
        error <= TOLERANCE * scale,
        "{what}: max abs error {error:e} > {:e} (reference scale {scale})",
        TOLERANCE * scale
    );
}

/// The largest difference of any channel of any pixel between two images, in levels.
pub fn worst_level_difference(a: &image::RgbImage, b: &image::RgbImage) -> Option<u8> {
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
}

/// A guided 64×64, 3-step Euler ancestral request of `num_images` images from `seed`.
pub fn request(seed: u64, num_images: usize) -> Request {
    Request {
        prompt: "a red fox in the snow".to_owned(),
        negative_prompt: "blurry".to_owned(),
        width: 64,
        height: 64,
        steps: 3,
        guidance_scale: 5.0,
        seed,
        num_images,
        scheduler: Some(Scheduler::EulerA),
        memory: Default::default(),
        hand_back_before_decode: false,
    }
}

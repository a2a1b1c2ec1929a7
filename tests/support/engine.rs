//! A scripted engine for the pipeline tests: real `Engine` contract (stages, steps, cancel
//! between steps), images whose colour encodes the seed and index, a configurable time per
//! step, and failures on demand through the prompt (`#oom`, `#fail`, `#panic`). `#noise`
//! makes images of random pixels instead, which PNG cannot shrink (a large upload);
//! `#painting` makes images that PNG shrinks and takes as long over as a real picture.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use studio_worker::engine::{CancelToken, Engine, EngineError, Generated};
use studio_worker::vocab::job::{EngineLimits, JobSpec, Scheduler};
use studio_worker::vocab::progress::{JobProgress, Stage};

pub struct ScriptedEngine {
    pub step_time: Duration,
    pub models: Vec<String>,
    pub limits: EngineLimits,
    /// Denoising steps actually run, per job id (a stopped job ran fewer than asked).
    pub steps_run: Mutex<Vec<(String, u32)>>,
    pub unloads: AtomicUsize,
    pub jobs_started: AtomicUsize,
    /// When the last job noticed its cancel token and stopped.
    pub stopped_at: Mutex<Option<std::time::Instant>>,
    /// A device to prepare before the first job, taking this long (a GPU's kernels).
    pub prepare_for: Option<Duration>,
    /// When preparing finished.
    pub prepared_at: Mutex<Option<std::time::Instant>>,
    /// Paintings made so far, by width, height and seed: painting one takes longer than a
    /// benchmark's step, and a benchmark's engine time should be its steps.
    paintings: Mutex<HashMap<(u32, u32, u64), image::RgbImage>>,
}

impl ScriptedEngine {
    pub fn new(step_time: Duration) -> Self {
        Self {
            step_time,
            models: vec!["sd-turbo".to_owned()],
            limits: EngineLimits {
                max_width: 1024,
                max_height: 1024,
                max_images: 4,
            },
            steps_run: Mutex::new(Vec::new()),
            unloads: AtomicUsize::new(0),
            jobs_started: AtomicUsize::new(0),
            stopped_at: Mutex::new(None),
            prepare_for: None,
            prepared_at: Mutex::new(None),
            paintings: Mutex::new(HashMap::new()),
        }
    }

    pub fn steps_run(&self, job_id: &str) -> Option<u32> {
        let steps_run = self.steps_run.lock().unwrap();
        steps_run
            .iter()
            .rev()
            .find(|(id, _)| id == job_id)
            .map(|(_, steps)| *steps)
    }
}

/// The colour the scripted engine paints image `index` of a job with this seed.
pub fn colour_for(seed: u64, index: usize) -> [u8; 3] {
    let mixed = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(index as u64 * 0x51);
    let bytes = mixed.to_le_bytes();
    [bytes[0], bytes[1], bytes[2]]
}

/// A picture with a real image's statistics for PNG: smooth colour fields over six octaves
/// of value noise with a fine grain on top. PNG's encoders take about as long over it and
/// shrink it about as much as a photo of the same size (a 512² painting: 401 KB at png's
/// `Balanced`, a resized 720×477 photo: 530 KB; both 20-25× slower than at `Fast`).
pub fn painting(width: u32, height: u32, seed: u64) -> image::RgbImage {
    const LATTICE: usize = 64;
    const OCTAVES: usize = 6;
    let mut rng = fastrand::Rng::with_seed(seed);
    let knots: Vec<[f32; 3]> = (0..(LATTICE + 1) * (LATTICE + 1))
        .map(|_| [rng.f32(), rng.f32(), rng.f32()])
        .collect();
    let smooth = |t: f32| t * t * (3.0 - 2.0 * t);
    let value_noise = |x: f32, y: f32, channel: usize| {
        let (column, row) = (x as usize % LATTICE, y as usize % LATTICE);
        let (across, down) = (smooth(x.fract()), smooth(y.fract()));
        let knot = |column: usize, row: usize| knots[row * (LATTICE + 1) + column][channel];
        let top = knot(column, row) * (1.0 - across) + knot(column + 1, row) * across;
        let bottom = knot(column, row + 1) * (1.0 - across) + knot(column + 1, row + 1) * across;
        top * (1.0 - down) + bottom * down
    };
    let side = width.max(height) as f32;
    image::RgbImage::from_fn(width, height, |x, y| {
        let (u, v) = (x as f32 / side, y as f32 / side);
        let mut pixel = [0_u8; 3];
        for (channel, value) in pixel.iter_mut().enumerate() {
            let (mut sum, mut amplitude, mut frequency) = (0.0, 0.5, 4.0);
            for _ in 0..OCTAVES {
                sum += amplitude
                    * value_noise(u * frequency + channel as f32 * 7.0, v * frequency, channel);
                amplitude *= 0.5;
                frequency *= 2.0;
            }
            let grain = (rng.f32() - 0.5) * 0.03;
            *value = ((sum + grain).clamp(0.0, 1.0) * 255.0) as u8;
        }
        image::Rgb(pixel)
    })
}

impl Engine for ScriptedEngine {
    fn limits(&self) -> EngineLimits {
        self.limits
    }

    fn ready_models(&self) -> Vec<String> {
        self.models.clone()
    }

    fn generate(
        &self,
        job: &JobSpec,
        progress: &mut dyn FnMut(JobProgress),
        cancel: &CancelToken,
    ) -> Result<Generated, EngineError> {
        self.jobs_started.fetch_add(1, Ordering::SeqCst);
        let total_steps = job.steps;
        let mut report = |stage, step| {
            progress(JobProgress {
                stage,
                step,
                total_steps,
            });
        };
        report(Stage::LoadingModel, 0);
        if job.prompt.contains("#oom") {
            return Err(EngineError::OutOfMemory("needs 9 GB, 4 GB free".to_owned()));
        }
        if job.prompt.contains("#fail") {
            return Err(EngineError::Internal(
                "the scripted engine failed".to_owned(),
            ));
        }
        if job.prompt.contains("#gpu-lost") {
            return Err(EngineError::DeviceLost(
                "an illegal memory access was encountered (CUDA_ERROR_ILLEGAL_ADDRESS)".to_owned(),
            ));
        }
        if job.prompt.contains("#panic") {
            panic!("the scripted engine panicked");
        }
        report(Stage::Encoding, 0);
        let mut done = 0;
        for step in 1..=total_steps {
            if cancel.is_cancelled() {
                *self.stopped_at.lock().unwrap() = Some(std::time::Instant::now());
                self.steps_run
                    .lock()
                    .unwrap()
                    .push((job.job_id.clone(), done));
                return Err(EngineError::Cancelled);
            }
            std::thread::sleep(self.step_time);
            done = step;
            report(Stage::Denoising, step);
        }
        self.steps_run
            .lock()
            .unwrap()
            .push((job.job_id.clone(), done));
        report(Stage::Decoding, total_steps);
        let noise = job.prompt.contains("#noise");
        let painted = job.prompt.contains("#painting");
        let images = (0..job.num_images as usize)
            .map(|index| {
                if painted {
                    let key = (job.width, job.height, job.seed + index as u64);
                    self.paintings
                        .lock()
                        .unwrap()
                        .entry(key)
                        .or_insert_with(|| painting(key.0, key.1, key.2))
                        .clone()
                } else if noise {
                    let mut rng = fastrand::Rng::with_seed(job.seed + index as u64);
                    image::RgbImage::from_fn(job.width, job.height, |_, _| {
                        image::Rgb([rng.u8(..), rng.u8(..), rng.u8(..)])
                    })
                } else {
                    image::RgbImage::from_pixel(
                        job.width,
                        job.height,
                        image::Rgb(colour_for(job.seed, index)),
                    )
                }
            })
            .collect();
        Ok(Generated {
            images,
            seed: job.seed,
            sampler: job.scheduler.unwrap_or(Scheduler::EulerA),
        })
    }

    fn unload(&self) {
        self.unloads.fetch_add(1, Ordering::SeqCst);
    }

    fn needs_preparing(&self) -> bool {
        self.prepare_for.is_some()
    }

    fn prepare(&self, time_left: &mut dyn FnMut(Duration)) -> Result<(), EngineError> {
        if let Some(time) = self.prepare_for {
            // Half the time, then an estimate of the rest, as the real engine says it.
            std::thread::sleep(time / 2);
            time_left(time / 2);
            std::thread::sleep(time / 2);
            *self.prepared_at.lock().unwrap() = Some(std::time::Instant::now());
        }
        Ok(())
    }
}

//! `studio-worker generate`: one job on this PC, without the studio. It shows a progress
//! bar, writes PNGs that carry their generation parameters (an iTXt `parameters` chunk, the
//! layout other Stable Diffusion tools read) and prints the seed. It is also how a person
//! checks that their GPU works before registering.

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;

use crate::config::{self, Paths};
use crate::engine::device;
use crate::engine::sd::{Request, StableDiffusion, Stage};
use crate::vocab::device::DevicePreference;
use crate::vocab::job::{self as jobs, Scheduler};

/// Arguments that cannot run: exit code 2, like clap's own usage errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// What to draw.
    #[arg(long)]
    pub prompt: String,
    /// What to keep out of the image.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// A catalog model (downloaded with `models pull`) or a `[models.local]` id.
    #[arg(long, value_name = "ID", conflicts_with = "model_dir")]
    pub model: Option<String>,
    /// A diffusers-layout model folder.
    #[arg(long, value_name = "DIR")]
    pub model_dir: Option<PathBuf>,
    /// Denoising steps (default: the catalog model's, else 25, or 4 for turbo folders).
    #[arg(long)]
    pub steps: Option<u32>,
    /// Classifier-free guidance (default: the catalog model's, else 7.5, or 0 for turbo
    /// folders; ≤ 1 turns it off).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Image width in pixels, a multiple of 8 (default: the model's native size).
    #[arg(long)]
    pub width: Option<u32>,
    /// Image height in pixels, a multiple of 8 (default: the model's native size).
    #[arg(long)]
    pub height: Option<u32>,
    /// The seed (default: a random one, printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// euler_a, euler, ddim or dpmpp_2m_karras (default: the model's own).
    #[arg(long, value_name = "NAME")]
    pub scheduler: Option<String>,
    /// How many images; image k uses seed + k.
    #[arg(long, default_value_t = 1)]
    pub num_images: u32,
    #[arg(long, value_enum, default_value_t = DevicePreference::Auto)]
    pub device: DevicePreference,
    /// Where to write the PNG; with several images, `NAME-1.png`, `NAME-2.png`…
    #[arg(long, value_name = "FILE.png")]
    pub out: PathBuf,
}

pub fn run(paths: &Paths, args: GenerateArgs) -> anyhow::Result<()> {
    let usage = |message: String| anyhow::Error::new(UsageError(message));
    if args.prompt.trim().is_empty() {
        return Err(usage("--prompt is empty".to_owned()));
    }
    let scheduler = match &args.scheduler {
        Some(name) => Some(Scheduler::from_protocol(name).ok_or_else(|| {
            usage(format!(
                "unknown scheduler {name:?} (euler_a, euler, ddim or dpmpp_2m_karras)"
            ))
        })?),
        None => None,
    };
    if !(1..=jobs::MAX_IMAGES).contains(&args.num_images) {
        return Err(usage(format!(
            "--num-images must be 1 to {} (got {})",
            jobs::MAX_IMAGES,
            args.num_images
        )));
    }
    if args
        .out
        .extension()
        .is_none_or(|extension| !extension.eq_ignore_ascii_case("png"))
    {
        return Err(usage("--out must name a .png file".to_owned()));
    }
    let (model_name, root) = resolve_model(paths, &args)?;

    let selected = device::select(args.device).map_err(usage)?;
    if let Some(reason) = &selected.fallback_reason {
        eprintln!("note: {reason}");
    }
    eprintln!("device: {} ({:?})", selected.info.name, selected.dtype);
    let started = Instant::now();
    let pipeline = StableDiffusion::load(&root, &selected.device, selected.dtype)
        .with_context(|| format!("cannot load {model_name}"))?;
    eprintln!(
        "loaded {model_name} in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let defaults = crate::models::catalog::find(&model_name)
        .filter(|_| args.model.is_some())
        .map(|entry| entry.defaults);
    let request = request_for(&args, &pipeline, scheduler, defaults)?;
    let sampler = request
        .scheduler
        .unwrap_or_else(|| pipeline.default_sampler());
    let mut bar = ProgressBar::new();
    let started = Instant::now();
    let images = pipeline
        .generate(&request, &mut |stage| bar.show(stage), &|| false)
        .context("generation failed")?;
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());

    let parameters = parameters_text(&request, sampler, &model_name);
    for (index, image) in images.iter().enumerate() {
        let path = output_path(&args.out, index, images.len());
        write_png(&path, image, &parameters)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("{}", path.display());
    }
    println!("seed: {}", request.seed);
    Ok(())
}

fn resolve_model(paths: &Paths, args: &GenerateArgs) -> anyhow::Result<(String, PathBuf)> {
    let usage = |message: String| anyhow::Error::new(UsageError(message));
    if let Some(dir) = &args.model_dir {
        if !dir.join("model_index.json").is_file() {
            return Err(usage(format!(
                "{} is not a diffusers model folder (no model_index.json)",
                dir.display()
            )));
        }
        let name = dir.file_name().map_or_else(
            || dir.display().to_string(),
            |name| name.to_string_lossy().into_owned(),
        );
        return Ok((name, dir.clone()));
    }
    let Some(model_id) = &args.model else {
        return Err(usage(
            "name a model with --model ID or --model-dir DIR".to_owned(),
        ));
    };
    let settings = config::load(&paths.config_file)?.config;
    if let Some(root) = settings.models.local.get(model_id) {
        return Ok((model_id.clone(), root.clone()));
    }
    if let Some(entry) = crate::models::catalog::find(model_id) {
        let store = crate::models::store::ModelStore::standard(&paths.data_dir);
        return match store.and_then(|store| store.ready_path(entry)) {
            Some(root) => Ok((model_id.clone(), root)),
            None => Err(usage(format!(
                "{model_id} is not downloaded yet: `studio-worker models pull {model_id}`"
            ))),
        };
    }
    let mut known: Vec<&str> = settings.models.local.keys().map(String::as_str).collect();
    known.extend(crate::models::catalog::CATALOG.iter().map(|entry| entry.id));
    Err(usage(format!(
        "no model {model_id:?} (known: {})",
        known.join(", ")
    )))
}

/// The request the arguments describe. What they leave out comes from the catalog entry
/// when the model is a catalog one, else from the model folder (turbo models, which ship
/// trailing spacing, get 4 steps without guidance; others 25 steps at 7.5).
fn request_for(
    args: &GenerateArgs,
    pipeline: &StableDiffusion,
    scheduler: Option<Scheduler>,
    defaults: Option<crate::models::catalog::JobDefaults>,
) -> anyhow::Result<Request> {
    let usage = |message: String| anyhow::Error::new(UsageError(message));
    let few_step = pipeline.is_few_step();
    let native = defaults.map_or(pipeline.native_size() as u32, |defaults| defaults.size);
    let steps = args.steps.unwrap_or(match defaults {
        Some(defaults) => defaults.steps,
        None if few_step => 4,
        None => 25,
    });
    let guidance = args.guidance.unwrap_or(match defaults {
        Some(defaults) => defaults.guidance_scale,
        None if few_step => 0.0,
        None => 7.5,
    });
    let scheduler = scheduler.or(defaults.map(|defaults| defaults.scheduler));
    let (width, height) = (args.width.unwrap_or(native), args.height.unwrap_or(native));
    let factor = pipeline.vae_scale_factor() as u32;
    for (name, value) in [("--width", width), ("--height", height)] {
        if !(factor.max(8)..=jobs::MAX_SIDE).contains(&value) || value % 8 != 0 {
            return Err(usage(format!(
                "{name} must be a multiple of 8 from 8 to {} (got {value})",
                jobs::MAX_SIDE
            )));
        }
    }
    if !(1..=jobs::MAX_STEPS).contains(&steps) {
        return Err(usage(format!(
            "--steps must be 1 to {} (got {steps})",
            jobs::MAX_STEPS
        )));
    }
    if !(0.0..=jobs::MAX_GUIDANCE).contains(&guidance) {
        return Err(usage(format!(
            "--guidance must be 0 to {} (got {guidance})",
            jobs::MAX_GUIDANCE
        )));
    }
    let seed = match args.seed {
        Some(seed) if seed > jobs::MAX_SEED => {
            return Err(usage(format!("--seed must be at most {}", jobs::MAX_SEED)));
        }
        Some(seed) => seed,
        None => random_seed()?,
    };
    Ok(Request {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        width: width as usize,
        height: height as usize,
        steps: steps as usize,
        guidance_scale: guidance,
        seed,
        num_images: args.num_images as usize,
        scheduler,
    })
}

fn random_seed() -> anyhow::Result<u64> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|error| anyhow::anyhow!("no randomness: {error}"))?;
    Ok(u64::from_le_bytes(bytes) & jobs::MAX_SEED)
}

/// The parameters line other Stable Diffusion tools write and read.
pub fn parameters_text(request: &Request, sampler: Scheduler, model: &str) -> String {
    let mut text = request.prompt.clone();
    if !request.negative_prompt.is_empty() {
        text.push_str(&format!("\nNegative prompt: {}", request.negative_prompt));
    }
    let sampler = match sampler {
        Scheduler::EulerA => "Euler a",
        Scheduler::Euler => "Euler",
        Scheduler::Ddim => "DDIM",
        Scheduler::DpmPp2mKarras => "DPM++ 2M Karras",
    };
    text.push_str(&format!(
        "\nSteps: {}, Sampler: {sampler}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {model}",
        request.steps, request.guidance_scale, request.seed, request.width, request.height
    ));
    text
}

/// `out` itself for one image; `stem-1.png`, `stem-2.png`… for several.
fn output_path(out: &Path, index: usize, count: usize) -> PathBuf {
    if count == 1 {
        return out.to_owned();
    }
    let stem = out.file_stem().map_or_else(
        || "image".into(),
        |stem| stem.to_string_lossy().into_owned(),
    );
    out.with_file_name(format!("{stem}-{}.png", index + 1))
}

/// An 8-bit RGB PNG with an iTXt `parameters` chunk (UTF-8, so any prompt fits).
pub fn write_png(path: &Path, image: &image::RgbImage, parameters: &str) -> anyhow::Result<()> {
    let file = std::fs::File::create(path)?;
    let mut encoder =
        png::Encoder::new(std::io::BufWriter::new(file), image.width(), image.height());
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.add_itxt_chunk("parameters".to_owned(), parameters.to_owned())?;
    let mut writer = encoder.write_header()?;
    writer.write_image_data(image.as_raw())?;
    writer.finish()?;
    Ok(())
}

/// A one-line bar on a terminal; one line per stage otherwise (logs, pipes).
struct ProgressBar {
    started: Instant,
    interactive: bool,
}

impl ProgressBar {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            interactive: std::io::stderr().is_terminal(),
        }
    }

    fn show(&mut self, stage: Stage) {
        let mut stderr = std::io::stderr().lock();
        match stage {
            Stage::Encoding => {
                let _ = writeln!(stderr, "reading the prompt…");
                self.started = Instant::now();
            }
            Stage::Denoising { step, total } => {
                let per_step = self.started.elapsed().as_secs_f64() / step.max(1) as f64;
                let remaining = per_step * total.saturating_sub(step) as f64;
                let width = 30;
                let filled = width * step / total.max(1);
                let line = format!(
                    "drawing [{}{}] {step}/{total}  {per_step:.2} s/step  ~{remaining:.0} s left",
                    "#".repeat(filled),
                    "-".repeat(width - filled)
                );
                if self.interactive {
                    let _ = write!(stderr, "\r{line}");
                } else if step == total || step == 1 || step % 10 == 0 {
                    let _ = writeln!(stderr, "{line}");
                }
                let _ = stderr.flush();
            }
            Stage::Decoding => {
                if self.interactive {
                    let _ = writeln!(stderr);
                }
                let _ = writeln!(stderr, "finishing the image…");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::catalog::JobDefaults;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: GenerateArgs,
    }

    fn args(extra: &[&str]) -> GenerateArgs {
        let mut argv = vec![
            "generate", "--prompt", "a fox", "--out", "fox.png", "--seed", "1",
        ];
        argv.extend_from_slice(extra);
        Wrapper::parse_from(argv).args
    }

    #[test]
    fn what_the_arguments_leave_out_comes_from_the_catalog_then_the_folder() {
        let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-sd1");
        let pipeline =
            StableDiffusion::load(&folder, &candle_core::Device::Cpu, candle_core::DType::F32)
                .expect("fixture loads");

        // A folder alone: its trained size (32 latents × 2), 25 steps at 7.5, its own sampler.
        let request = request_for(&args(&[]), &pipeline, None, None).unwrap();
        assert_eq!(
            (request.width, request.steps, request.guidance_scale),
            (64, 25, 7.5)
        );
        assert_eq!(request.scheduler, None);

        // A catalog model: its defaults, unless an argument says otherwise.
        let turbo = JobDefaults {
            size: 128,
            steps: 1,
            guidance_scale: 0.0,
            scheduler: Scheduler::EulerA,
        };
        let request = request_for(&args(&[]), &pipeline, None, Some(turbo)).unwrap();
        assert_eq!(
            (request.width, request.steps, request.guidance_scale),
            (128, 1, 0.0)
        );
        assert_eq!(request.scheduler, Some(Scheduler::EulerA));
        let request = request_for(
            &args(&["--steps", "3", "--width", "64"]),
            &pipeline,
            Some(Scheduler::Ddim),
            Some(turbo),
        )
        .unwrap();
        assert_eq!((request.width, request.height, request.steps), (64, 128, 3));
        assert_eq!(request.scheduler, Some(Scheduler::Ddim));
    }
}

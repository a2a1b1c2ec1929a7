//! `studio-worker generate`: one job on this PC, without the studio, through the same engine
//! as a studio job (memory plan, GPU preparation, out-of-memory refusal). It shows a progress
//! bar, writes PNGs that carry their generation parameters (an iTXt `parameters` chunk, the
//! layout other Stable Diffusion tools read) and prints the seed. It is also how a person
//! checks that their GPU works before registering, and, with `--repeat`, how the GPU bench
//! times warm jobs.

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;

use super::UsageError;
use crate::config::{self, Paths};
use crate::engine::candle_engine::CandleEngine;
use crate::engine::sd::ModelFacts;
use crate::engine::{CancelToken, Engine as _, device, profile};
use crate::image_file;
use crate::vocab::device::DevicePreference;
use crate::vocab::job::{self, EngineLimits, JobSpec, Scheduler};
use crate::vocab::progress::{JobProgress, Stage};

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
    /// Run the same job this many times, each timed (the images of the last are written):
    /// the first shows the model's loading, the others a warm engine (which takes the
    /// prompts' encodings from the first run unless `STUDIO_WORKER_PROMPT_CACHE=0`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repeat: u32,
    /// After the last run, print where its time went by model part and kind of work
    /// (convolutions, norms, attention…): on an NVIDIA GPU the GPU's time between events
    /// around each kind, read after the run; on Metal each kind waits for the GPU, so read
    /// the shares there.
    #[arg(long)]
    pub profile: bool,
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
    job::check_images("--num-images", u64::from(args.num_images), job::MAX_IMAGES)
        .map_err(|error| usage(error.0))?;
    if args
        .out
        .extension()
        .is_none_or(|extension| !extension.eq_ignore_ascii_case("png"))
    {
        return Err(usage("--out must name a .png file".to_owned()));
    }
    let (model_name, root) = resolve_model(paths, &args)?;

    let facts = ModelFacts::read(&root).with_context(|| format!("cannot read {model_name}"))?;
    let defaults = crate::models::catalog::find(&model_name)
        .filter(|_| args.model.is_some())
        .map(|entry| entry.defaults);
    let spec = job_for(&args, &model_name, facts, scheduler, defaults)?;

    let selected = device::select(args.device).map_err(|error| usage(error.to_string()))?;
    if let Some(note) = selected.note() {
        eprintln!("note: {note}");
    }
    eprintln!(
        "device: {} ({})",
        selected.info.name,
        selected.precision.label()
    );
    let models = [(model_name.clone(), root)].into_iter().collect();
    let (engine, refused) = CandleEngine::new(selected, &models, 0);
    if let Some(refused) = refused.first() {
        anyhow::bail!("{model_name} cannot run: {}", refused.reason);
    }
    if engine.needs_preparing() {
        eprintln!("preparing the GPU (once after a driver update)…");
        let started = Instant::now();
        // The estimate of the time left, on a terminal (one line, rewritten).
        let terminal = std::io::stderr().is_terminal();
        engine
            .prepare(&mut |left| {
                if terminal {
                    eprint!("\r{:.0} s left   ", left.as_secs_f64().ceil());
                }
            })
            .context("the GPU could not be prepared")?;
        if terminal {
            eprint!("\r");
        }
        eprintln!("prepared in {:.2} s", started.elapsed().as_secs_f64());
    }

    profile::set_enabled(args.profile);
    let mut generated = None;
    for run in 1..=args.repeat {
        let mut bar = ProgressBar::new();
        let started = Instant::now();
        let images = engine
            .generate(
                &spec,
                &mut |progress| bar.show(progress),
                &CancelToken::new(),
            )
            .context("generation failed")?;
        let seconds = started.elapsed().as_secs_f64();
        if args.repeat > 1 {
            eprintln!("run {run}/{}: done in {seconds:.3} s", args.repeat);
        } else {
            eprintln!("done in {seconds:.1} s");
        }
        // Each run's own: the last one's is printed (warm, when there are several).
        let spent = profile::take();
        if args.profile && run == args.repeat {
            eprintln!(
                "where run {run}'s time went:\n{}",
                spent.table(started.elapsed())
            );
        }
        generated = Some(images);
    }
    let Some(generated) = generated else {
        anyhow::bail!("--repeat is at least 1");
    };

    let parameters = image_file::parameters_text(&spec, generated.sampler);
    let count = generated.images.len();
    for (index, image) in generated.images.iter().enumerate() {
        let path = output_path(&args.out, index, count);
        let png = image_file::encode_png(image, &parameters)?;
        std::fs::write(&path, png).with_context(|| format!("cannot write {}", path.display()))?;
        println!("{}", path.display());
    }
    println!("seed: {}", spec.seed);
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
    let store = crate::models::store::ModelStore::standard(&paths.data_dir);
    let folder = crate::models::served::folder_for(&settings, store.as_ref(), model_id)
        .map_err(|error| usage(error.to_string()))?;
    Ok((model_id.clone(), folder))
}

/// The job the arguments describe, checked against the same ranges as the studio's jobs.
/// What they leave out comes from the catalog entry when the model is a catalog one, else
/// from the model folder (turbo models, which ship trailing spacing, get 4 steps without
/// guidance; others 25 steps at 7.5).
fn job_for(
    args: &GenerateArgs,
    model_name: &str,
    facts: ModelFacts,
    scheduler: Option<Scheduler>,
    defaults: Option<crate::models::catalog::JobDefaults>,
) -> anyhow::Result<JobSpec> {
    let usage = |error: job::OutOfRange| anyhow::Error::new(UsageError(error.0));
    let few_step = facts.few_step;
    let native = defaults.map_or(facts.native_size as u32, |defaults| defaults.size);
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
    // Tiny test models have a smaller latent factor; a side still needs one latent cell.
    let min_side = (facts.vae_scale_factor as u32).max(8);
    let unlimited = EngineLimits {
        max_width: job::MAX_SIDE,
        max_height: job::MAX_SIDE,
        max_images: job::MAX_IMAGES,
    };
    let width = job::check_side(
        "--width",
        u64::from(args.width.unwrap_or(native)),
        min_side,
        unlimited.max_width,
    )
    .map_err(usage)?;
    let height = job::check_side(
        "--height",
        u64::from(args.height.unwrap_or(native)),
        min_side,
        unlimited.max_height,
    )
    .map_err(usage)?;
    let seed = match args.seed {
        Some(seed) => job::check_seed("--seed", seed).map_err(usage)?,
        None => random_seed()?,
    };
    Ok(JobSpec {
        job_id: "local".to_owned(),
        model: model_name.to_owned(),
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        width,
        height,
        steps: job::check_steps("--steps", u64::from(steps)).map_err(usage)?,
        guidance_scale: job::check_guidance("--guidance", guidance).map_err(usage)?,
        seed,
        num_images: job::check_images(
            "--num-images",
            u64::from(args.num_images),
            unlimited.max_images,
        )
        .map_err(usage)?,
        scheduler: scheduler.or(defaults.map(|defaults| defaults.scheduler)),
        lease: std::time::Duration::ZERO,
    })
}

fn random_seed() -> anyhow::Result<u64> {
    let bytes = crate::secret::random_bytes::<8>()?;
    Ok(u64::from_le_bytes(bytes) & job::MAX_SEED)
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

    fn show(&mut self, progress: JobProgress) {
        let mut stderr = std::io::stderr().lock();
        match progress.stage {
            // Loading is silent: a warm engine reports it too, and it takes no time then.
            Stage::LoadingModel | Stage::Uploading => {}
            Stage::Encoding => {
                let _ = writeln!(stderr, "reading the prompt…");
                self.started = Instant::now();
            }
            Stage::Denoising => {
                let (step, total) = (progress.step, progress.total_steps);
                let per_step = self.started.elapsed().as_secs_f64() / f64::from(step.max(1));
                let remaining = per_step * f64::from(total.saturating_sub(step));
                let width = 30;
                let filled = (width * step / total.max(1)) as usize;
                let line = format!(
                    "drawing [{}{}] {step}/{total}  {per_step:.2} s/step  ~{remaining:.0} s left",
                    "#".repeat(filled),
                    "-".repeat(width as usize - filled)
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
        let facts = ModelFacts::read(&folder).expect("fixture reads");

        // A folder alone: its trained size (32 latents × 2), 25 steps at 7.5, its own sampler.
        let request = job_for(&args(&[]), "tiny", facts, None, None).unwrap();
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
        let request = job_for(&args(&[]), "tiny", facts, None, Some(turbo)).unwrap();
        assert_eq!(
            (request.width, request.steps, request.guidance_scale),
            (128, 1, 0.0)
        );
        assert_eq!(request.scheduler, Some(Scheduler::EulerA));
        let request = job_for(
            &args(&["--steps", "3", "--width", "64"]),
            "tiny",
            facts,
            Some(Scheduler::Ddim),
            Some(turbo),
        )
        .unwrap();
        assert_eq!((request.width, request.height, request.steps), (64, 128, 3));
        assert_eq!(request.scheduler, Some(Scheduler::Ddim));
    }
}

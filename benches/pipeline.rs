//! Job pipeline benchmarks (not timed tests): what the worker itself adds to every job, how
//! fast a pause takes the GPU back (the person's, and a game's through the good-guest
//! policy), what the policy's probes cost at idle, and what encoding a result's PNG costs.
//!
//! ```sh
//! cargo bench --bench pipeline                  # all of it
//! cargo bench --bench pipeline -- png overhead  # only the parts named
//! ```
//!
//! The job parts run the real runtime against the in-process studio on 127.0.0.1 with the
//! scripted engine, whose "GPU work" is a fixed sleep per denoising step and whose images are
//! paintings that PNG takes as long over as a real picture, so every number is a ratio to a
//! known amount of engine time measured in the same process.

// Test and tool code: an unwrap that fails is the test failing, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use studio_worker::runtime::Command;
use support::studio::Route;
use support::{PATIENCE, approved_worker, eventually};

const OVERHEAD_JOBS: usize = 100;
const BACK_TO_BACK_JOBS: usize = 60;
const ENGINE_STEP: Duration = Duration::from_millis(50);
const PAUSE_TRIALS: usize = 20;

fn timing() -> studio_worker::timing::Timing {
    // Production timing, but a short long-poll so an idle claim does not hold a benchmark.
    let mut timing = studio_worker::timing::Timing::PRODUCTION;
    timing.claim_wait = Duration::from_secs(2);
    timing
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn job(job_id: &str, steps: u32) -> serde_json::Value {
    json!({
        "jobId": job_id, "kind": "txt2img", "model": "sd-turbo", "prompt": "bench #painting",
        "width": 512, "height": 512, "steps": steps, "guidanceScale": 0.0,
        "seed": 1, "numImages": 1, "scheduler": null, "leaseS": 120
    })
}

/// Claim answered → upload acknowledged, minus the engine's own time, per job.
async fn overhead() {
    let (studio, _home, _engine, runtime) = approved_worker(ENGINE_STEP, timing()).await;
    // One job at a time: each is queued only after the previous one was delivered, so the
    // claim's long-poll wait is not counted (it is the studio's queue, not the worker).
    let mut overhead_ms = Vec::new();
    let mut engine_ms = Vec::new();
    for n in 0..OVERHEAD_JOBS {
        let job_id = format!("bench_{n}");
        studio.enqueue(job(&job_id, 1));
        eventually("delivered", PATIENCE, || {
            studio.job(&job_id).is_some_and(|j| !j.results.is_empty())
        })
        .await;
        let log = studio.log();
        let claimed = log
            .iter()
            .rev()
            .find(|r| r.route == Route::Claim && r.status == 200)
            .unwrap();
        let uploaded = log
            .iter()
            .rev()
            .find(|r| r.route == Route::Result && r.path.contains(&format!("/{job_id}/")))
            .unwrap();
        let wall = uploaded
            .answered_at
            .duration_since(claimed.answered_at)
            .as_secs_f64()
            * 1000.0;
        let engine = studio.job(&job_id).unwrap().results[0].0["elapsedMs"]
            .as_f64()
            .unwrap();
        overhead_ms.push(wall - engine);
        engine_ms.push(engine);
    }
    let engine = median(&mut engine_ms);
    let overhead = median(&mut overhead_ms);
    let worst = overhead_ms.iter().copied().fold(f64::MIN, f64::max);
    println!(
        "overhead per job (claim answered → upload acknowledged, minus engine time), {OVERHEAD_JOBS} jobs, 512×512, 1 image:\n  \
         median {overhead:.2} ms = {:.3} × the engine's {engine:.0} ms; worst {worst:.2} ms",
        overhead / engine
    );
    runtime.shutdown().await;
}

/// Jobs queued at once, as a busy studio has them: what the worker adds between one job's
/// engine finishing and the next one's starting, read from the gaps between claim answers
/// (each gap less the engine time of the job inside it). This is what the person's GPU
/// loses per image.
async fn back_to_back() {
    let (studio, _home, _engine, runtime) = approved_worker(ENGINE_STEP, timing()).await;
    let job_ids: Vec<String> = (0..BACK_TO_BACK_JOBS)
        .map(|n| format!("queued_{n}"))
        .collect();
    for job_id in &job_ids {
        studio.enqueue(job(job_id, 1));
    }
    let last = job_ids.last().unwrap().clone();
    eventually("all delivered", PATIENCE * 4, || {
        studio.job(&last).is_some_and(|j| !j.results.is_empty())
    })
    .await;
    let mut claims: Vec<Instant> = studio
        .log()
        .iter()
        .filter(|r| r.route == Route::Claim && r.status == 200)
        .map(|r| r.answered_at)
        .collect();
    claims.sort();
    assert_eq!(claims.len(), BACK_TO_BACK_JOBS, "one claim per job");
    let mut added_ms: Vec<f64> = claims
        .windows(2)
        .zip(&job_ids)
        .map(|(pair, job_id)| {
            let gap = pair[1].duration_since(pair[0]).as_secs_f64() * 1000.0;
            let engine = studio.job(job_id).unwrap().results[0].0["elapsedMs"]
                .as_f64()
                .unwrap();
            gap - engine
        })
        .collect();
    let worst = added_ms.iter().copied().fold(f64::MIN, f64::max);
    let added = median(&mut added_ms);
    let engine_ms = ENGINE_STEP.as_secs_f64() * 1000.0;
    println!(
        "added per image, {BACK_TO_BACK_JOBS} jobs queued at once (claim answer to claim answer, \
         minus the engine's time), 512×512, 1 image:\n  \
         median {added:.2} ms = {:.3} × the engine's {engine_ms:.0} ms; worst {worst:.2} ms",
        added / engine_ms
    );
    runtime.shutdown().await;
}

/// Encoding a finished image as the worker does, against png's default settings (what the
/// worker used before), on paintings and on noise, at the sizes jobs ask for.
fn png_encoding() {
    const ROUNDS: usize = 7;
    let baseline = |image: &image::RgbImage| {
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, image.width(), image.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(image.as_raw()).unwrap();
        writer.finish().unwrap();
        bytes
    };
    let ours = |image: &image::RgbImage| {
        studio_worker::image_file::encode_png(image, "bench parameters").unwrap()
    };
    let timed = |encode: &dyn Fn(&image::RgbImage) -> Vec<u8>, image: &image::RgbImage| {
        let mut times_ms: Vec<f64> = (0..ROUNDS)
            .map(|_| {
                let started = Instant::now();
                std::hint::black_box(encode(image));
                started.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        (median(&mut times_ms), encode(image).len())
    };
    println!("PNG encoding, median of {ROUNDS} (png's defaults → the worker's):");
    for side in [512, 1024] {
        let mut rng = fastrand::Rng::with_seed(3);
        let noise = image::RgbImage::from_fn(side, side, |_, _| {
            image::Rgb([rng.u8(..), rng.u8(..), rng.u8(..)])
        });
        let painting = support::engine::painting(side, side, 7);
        for (name, image) in [("painting", &painting), ("noise", &noise)] {
            let (before_ms, before_bytes) = timed(&baseline, image);
            let (after_ms, after_bytes) = timed(&ours, image);
            println!(
                "  {side}² {name}: {before_ms:.1} → {after_ms:.1} ms ({:.3}×), \
                 {before_bytes} → {after_bytes} bytes ({:.3}×)",
                after_ms / before_ms,
                after_bytes as f64 / before_bytes as f64
            );
        }
    }
    // A job of four images: the worker's encoder one image after another, then as it runs
    // them (`encode_pngs`).
    let images: Vec<_> = (0..4)
        .map(|seed| support::engine::painting(512, 512, seed))
        .collect();
    let mut one_by_one_ms = Vec::new();
    let mut together_ms = Vec::new();
    for _ in 0..ROUNDS {
        let started = Instant::now();
        for image in &images {
            std::hint::black_box(ours(image));
        }
        one_by_one_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        let started = Instant::now();
        std::hint::black_box(studio_worker::image_file::encode_pngs(&images, "bench").unwrap());
        together_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let (one_by_one, together) = (median(&mut one_by_one_ms), median(&mut together_ms));
    println!(
        "  4 × 512² paintings, one after another → a thread each ({} cores): \
         {one_by_one:.1} → {together:.1} ms ({:.3}×)",
        std::thread::available_parallelism().map_or(1, usize::from),
        together / one_by_one
    );
}

/// A game starts (the policy's GPU probe sees it) → the engine stopped, while denoising, at
/// production timing (the policy reads its probes every second while the worker may work).
async fn game_latency() {
    use studio_worker::config;
    use support::probes::FakePc;

    let studio = support::studio::TestStudio::start().await;
    studio.set_decision(support::studio::Decision::ApproveAfterPolls(1));
    let home = support::WorkerHome::new();
    let mut settings = home.write_config(&studio.url());
    settings.policy.resume_after_game_s = 0;
    config::save(&home.config_path(), &settings).unwrap();
    let engine = std::sync::Arc::new(support::engine::ScriptedEngine::new(ENGINE_STEP));
    let pc = FakePc::new();
    let runtime = home.start_runtime_on(timing(), Some(engine.clone()), Some(&pc));
    let handle = runtime.handle();
    eventually("approved", PATIENCE, || {
        handle.status().paused.is_none() && studio.count(Route::Heartbeat) >= 1
    })
    .await;
    let mut latencies_ms = Vec::new();
    for n in 0..PAUSE_TRIALS {
        let job_id = format!("game_{n}");
        studio.enqueue(job(&job_id, 150));
        eventually("denoising", PATIENCE, || {
            studio
                .job(&job_id)
                .is_some_and(|j| j.progress.iter().any(|p| p["stage"] == "denoising"))
        })
        .await;
        // Start the game at a random point of the policy's one-second reading cycle.
        tokio::time::sleep(Duration::from_micros(fastrand::u64(0..1_000_000))).await;
        *engine.stopped_at.lock().unwrap() = None;
        let started = Instant::now();
        pc.start_game("game.exe");
        eventually("stopped", PATIENCE, || {
            engine.stopped_at.lock().unwrap().is_some()
        })
        .await;
        let stopped = engine.stopped_at.lock().unwrap().unwrap();
        latencies_ms.push(stopped.duration_since(started).as_secs_f64() * 1000.0);
        eventually("handed back", PATIENCE, || {
            studio.job(&job_id).is_some_and(|j| !j.fails.is_empty())
        })
        .await;
        studio.cancel_job(&job_id);
        pc.stop_game();
        eventually("running again", PATIENCE, || {
            handle.status().paused.is_none()
        })
        .await;
    }
    let step_ms = ENGINE_STEP.as_secs_f64() * 1000.0;
    let worst = latencies_ms.iter().copied().fold(f64::MIN, f64::max);
    let median = median(&mut latencies_ms);
    println!(
        "game start → engine stopped (policy reads every 1 s), {PAUSE_TRIALS} trials, \
         {step_ms:.0} ms steps:\n  median {median:.0} ms; worst {worst:.0} ms (goal: 2000 ms)"
    );
    runtime.shutdown().await;
}

/// What one reading of every real probe on this PC costs in CPU time, and so per hour at the
/// policy's idle cadence (one reading a second while the worker may work). Linux: the
/// process's own user + system time from /proc (the X server's share is not ours).
fn probe_cost() {
    const ROUNDS: u32 = 2000;
    let cpu_seconds = || -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: f64 =
            fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        Some(ticks / 100.0) // USER_HZ
    };
    let mut probes = studio_worker::platform::probes::Probes::for_this_pc();
    let mut live = Vec::new();
    if probes.gpu.read().is_ok() {
        live.push("GPU (NVML)");
    }
    if probes.foreground.full_screen().is_ok() {
        live.push("full screen");
    }
    if probes.idle.idle_for().is_ok() {
        live.push("input idle");
    }
    if probes.power.on_battery().is_ok() {
        live.push("power");
    }
    let (Some(before), wall) = (cpu_seconds(), Instant::now()) else {
        println!("probe cost: /proc/self/stat is not readable here");
        return;
    };
    for _ in 0..ROUNDS {
        let _ = probes.gpu.read();
        let _ = probes.foreground.full_screen();
        let _ = probes.idle.idle_for();
        let _ = probes.power.on_battery();
    }
    let wall = wall.elapsed().as_secs_f64() / f64::from(ROUNDS);
    let Some(after) = cpu_seconds() else {
        return;
    };
    let per_round = (after - before) / f64::from(ROUNDS);
    println!(
        "probe cost at idle ({} live: {}), {ROUNDS} readings:\n  {:.3} ms of CPU per reading \
         ({:.3} ms wall) = {:.1} s of CPU per hour at one reading a second ({:.4} % of one core)",
        live.len(),
        live.join(", "),
        per_round * 1000.0,
        wall * 1000.0,
        per_round * 3600.0,
        per_round * 100.0
    );
}

/// Pause requested → the engine stopped working, while denoising.
async fn pause_latency() {
    let (studio, _home, engine, runtime) = approved_worker(ENGINE_STEP, timing()).await;
    let handle = runtime.handle();
    let mut latencies_ms = Vec::new();
    for n in 0..PAUSE_TRIALS {
        let job_id = format!("pause_{n}");
        studio.enqueue(job(&job_id, 150));
        eventually("denoising", PATIENCE, || {
            studio
                .job(&job_id)
                .is_some_and(|j| j.progress.iter().any(|p| p["stage"] == "denoising"))
        })
        .await;
        // Land the pause at a random point inside a step.
        tokio::time::sleep(Duration::from_micros(fastrand::u64(0..50_000))).await;
        *engine.stopped_at.lock().unwrap() = None;
        let asked = Instant::now();
        handle.send(Command::Pause);
        eventually("stopped", PATIENCE, || {
            engine.stopped_at.lock().unwrap().is_some()
        })
        .await;
        let stopped = engine.stopped_at.lock().unwrap().unwrap();
        latencies_ms.push(stopped.duration_since(asked).as_secs_f64() * 1000.0);
        eventually("handed back", PATIENCE, || {
            studio.job(&job_id).is_some_and(|j| !j.fails.is_empty())
        })
        .await;
        studio.cancel_job(&job_id); // keep the re-queued job from coming back
        handle.send(Command::Resume);
    }
    let step_ms = ENGINE_STEP.as_secs_f64() * 1000.0;
    let worst = latencies_ms.iter().copied().fold(f64::MIN, f64::max);
    let median = median(&mut latencies_ms);
    println!(
        "pause latency (Pause sent → engine stopped), {PAUSE_TRIALS} trials, {step_ms:.0} ms steps:\n  \
         median {median:.1} ms = {:.2} step; worst {worst:.1} ms = {:.2} step",
        median / step_ms,
        worst / step_ms
    );
    runtime.shutdown().await;
}

fn main() {
    // `cargo bench` adds `--bench`; any other word names a part to run.
    let named: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    let wanted = |part: &str| named.is_empty() || named.iter().any(|name| name == part);
    if wanted("png") {
        png_encoding();
    }
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    tokio.block_on(async {
        if wanted("overhead") {
            overhead().await;
        }
        if wanted("back-to-back") {
            back_to_back().await;
        }
        if wanted("pause") {
            pause_latency().await;
        }
        if wanted("game") {
            game_latency().await;
        }
    });
    if wanted("probes") {
        probe_cost();
    }
}

//! The job pipeline (§3) end to end: the runtime with the scripted engine against the
//! in-process studio, with faults, cancels, pauses and crashes along the way.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use studio_worker::image_file::read_parameters;
use studio_worker::runtime::gpu_recovery::{self, GpuRecovery};
use studio_worker::runtime::{Command, JobOutcome, Runtime, StopRequest};
use studio_worker::vocab::pause::PauseReason;

use crate::support::engine::{ScriptedEngine, colour_for};
use crate::support::studio::{Fault, JobState, Route, TestStudio, job_body};
use crate::support::{
    PATIENCE, WorkerHome, approved_worker, claims_held_saying, eventually, fast_timing,
};

struct Pipeline {
    studio: TestStudio,
    home: WorkerHome,
    engine: Arc<ScriptedEngine>,
    runtime: Runtime,
}

impl Pipeline {
    async fn start(step_time: Duration) -> Self {
        let (studio, home, engine, runtime) = approved_worker(step_time, fast_timing()).await;
        Self {
            studio,
            home,
            engine,
            runtime,
        }
    }

    /// Queues a 100-step job and waits until the studio has seen it reach step 2.
    async fn start_long_job(&self, job_id: &str) {
        self.studio.enqueue(job_with(job_id, "steps", json!(100)));
        eventually("denoising", PATIENCE, || {
            self.studio
                .job(job_id)
                .is_some_and(|j| j.progress.iter().any(|p| p["step"].as_u64() >= Some(2)))
        })
        .await;
    }

    /// Waits until the engine stopped `job_id`, and returns the steps it ran.
    async fn engine_stopped(&self, job_id: &str) -> u32 {
        eventually("engine stopped", PATIENCE, || {
            self.engine.steps_run(job_id).is_some()
        })
        .await;
        self.engine.steps_run(job_id).unwrap_or_default()
    }

    /// Shuts the runtime down cleanly and starts a new one over the same files and studio.
    async fn restart(self) -> Self {
        self.restarted_after(GpuRecovery::default()).await
    }

    /// The same, as a worker started again for lost GPUs (`recovery`: its chain of restarts).
    async fn restarted_after(self, recovery: GpuRecovery) -> Self {
        let Self {
            studio,
            home,
            engine,
            runtime,
        } = self;
        runtime.shutdown().await;
        Self {
            runtime: home.start_runtime_recovering(
                fast_timing(),
                Some(engine.clone()),
                None,
                recovery,
            ),
            studio,
            home,
            engine,
        }
    }

    async fn delivered(&self, job_id: &str) {
        crate::support::delivered(&self.studio, job_id).await;
    }

    async fn failed_with(&self, job_id: &str, code: &str) -> Value {
        eventually(&format!("{job_id} failed with {code}"), PATIENCE, || {
            self.studio
                .job(job_id)
                .is_some_and(|job| job.fails.iter().any(|f| f["code"] == code))
        })
        .await;
        let job = self.studio.job(job_id).unwrap();
        job.fails
            .iter()
            .find(|f| f["code"] == code)
            .unwrap()
            .clone()
    }
}

/// The support's job, not square (72×64), so width and height cannot be swapped unseen.
fn job(job_id: &str) -> Value {
    let mut body = job_body(job_id);
    body["width"] = json!(72);
    body
}

fn job_with(job_id: &str, field: &str, value: Value) -> Value {
    let mut body = job(job_id);
    body[field] = value;
    body
}

fn decode(png: &[u8]) -> image::RgbImage {
    image::load_from_memory_with_format(png, image::ImageFormat::Png)
        .expect("a real PNG")
        .to_rgb8()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_is_prepared_before_the_first_claim_and_the_status_says_so() {
    let studio = TestStudio::start().await;
    studio.set_decision(crate::support::studio::Decision::ApproveAfterPolls(1));
    studio.enqueue(job("j_after_prepare"));
    let home = WorkerHome::new();
    home.write_config(&studio.url());
    let mut engine = ScriptedEngine::new(Duration::from_millis(1));
    engine.prepare_for = Some(Duration::from_millis(800));
    let engine = Arc::new(engine);
    let runtime = home.start_runtime_with(fast_timing(), Some(engine.clone()));
    let handle = runtime.handle();
    claims_held_saying(&handle, "Preparing the GPU, once").await;
    // Then the engine's estimate of the rest (the scripted engine's: 400 ms).
    claims_held_saying(&handle, "compiling its kernels, almost done").await;
    crate::support::delivered(&studio, "j_after_prepare").await;
    let prepared_at = engine.prepared_at.lock().unwrap().expect("prepared");
    let first_claim = studio.log_for(Route::Claim)[0].at;
    assert!(
        first_claim >= prepared_at,
        "the first claim waited for the GPU to be ready"
    );
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_jobs_in_a_row_are_delivered_once_each() {
    // Steps slow enough that a denoising report falls between the 2/s rate limit's slots.
    let p = Pipeline::start(Duration::from_millis(40)).await;
    for n in 0..4 {
        p.studio
            .enqueue(job_with(&format!("j_{n}"), "seed", json!(100 + n)));
    }
    for n in 0..4 {
        p.delivered(&format!("j_{n}")).await;
    }
    for n in 0..4_u64 {
        let job = p.studio.job(&format!("j_{n}")).unwrap();
        assert_eq!(job.results.len(), 1);
        assert_eq!(job.uploads, 1, "no duplicate upload");
        let (meta, images) = &job.results[0];
        assert_eq!(meta["seed"], 100 + n);
        assert_eq!(meta["model"], "sd-turbo");
        assert_eq!(
            (
                meta["width"].as_u64(),
                meta["height"].as_u64(),
                meta["steps"].as_u64()
            ),
            (Some(72), Some(64), Some(3))
        );
        assert!(meta["workerId"].as_str().unwrap().starts_with("w_"));
        let image = decode(&images[0]);
        assert_eq!(image.dimensions(), (72, 64));
        assert_eq!(image.get_pixel(10, 10).0, colour_for(100 + n, 0));
        // Progress: stages in order (one shorter than the 2/s rate limit may be folded into
        // the next), denoising seen, ending with uploading.
        const ORDER: [&str; 5] = [
            "loading_model",
            "encoding",
            "denoising",
            "decoding",
            "uploading",
        ];
        let stages: Vec<usize> = job
            .progress
            .iter()
            .map(|p| ORDER.iter().position(|s| p["stage"] == *s).unwrap())
            .collect();
        assert!(stages.windows(2).all(|w| w[0] <= w[1]), "{stages:?}");
        assert!(stages.contains(&2), "{stages:?}");
        assert_eq!(stages.last(), Some(&4), "{stages:?}");
    }

    let handle = p.runtime.handle();
    eventually("counters", PATIENCE, || {
        handle.status().jobs.counters.jobs_completed == 4
    })
    .await;
    let status = handle.status();
    assert_eq!(status.jobs.counters.images_generated, 4);
    assert_eq!(status.jobs.outbox_len, 0);
    assert!(status.jobs.current.is_none());
    assert!(
        status
            .jobs
            .recent
            .iter()
            .all(|j| j.outcome == JobOutcome::DELIVERED)
    );
    // Previews are written beside the next claim, off the job's path.
    eventually("every delivered job has a preview", PATIENCE, || {
        handle.status().jobs.recent.iter().all(|job| {
            job.thumbnail
                .as_ref()
                .is_some_and(|preview| preview.exists())
        })
    })
    .await;
    assert!(
        p.home
            .dir
            .path()
            .join("outbox")
            .read_dir()
            .unwrap()
            .next()
            .is_none(),
        "outbox empty"
    );

    // The heartbeat reports what was done and what can be done.
    eventually("a heartbeat with stats", PATIENCE, || {
        p.studio
            .log_for(Route::Heartbeat)
            .iter()
            .any(|h| h.body["stats"]["jobsCompleted"] == 4)
    })
    .await;
    let heartbeat = p
        .studio
        .log_for(Route::Heartbeat)
        .last()
        .unwrap()
        .body
        .clone();
    assert_eq!(heartbeat["capabilities"]["models"][0]["id"], "sd-turbo");
    assert_eq!(heartbeat["capabilities"]["maxWidth"], 1024);
    let claim = p.studio.log_for(Route::Claim).last().unwrap().body.clone();
    assert_eq!(claim["models"], json!(["sd-turbo"]));
    assert_eq!(claim["waitS"], 1);
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_queues_jobs_and_follows_them_through_the_operator_routes() {
    // What benches/gpu drives the dev studio with.
    let p = Pipeline::start(Duration::from_millis(5)).await;
    let http = reqwest::Client::new();
    let operator = format!("http://{}/operator", p.studio.addr());
    let queued: Value = http
        .post(format!("{operator}/jobs"))
        .json(&job("op_1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(queued["jobId"], "op_1");
    let state = |job_id: &'static str| {
        let http = http.clone();
        let url = format!("{operator}/jobs/{job_id}");
        async move {
            let answer = http.get(url).send().await.unwrap();
            (answer.status().as_u16(), answer.json::<Value>().await.ok())
        }
    };
    p.delivered("op_1").await;
    let (status, done) = state("op_1").await;
    assert_eq!(status, 200);
    let done = done.unwrap();
    assert_eq!(
        (done["state"].as_str(), done["images"].as_u64()),
        (Some("done"), Some(1))
    );
    assert!(done["progressReports"].as_u64() >= Some(1), "{done}");
    assert_eq!(state("nope").await.0, 404);
    let refused = http
        .post(format!("{operator}/jobs"))
        .body("[1, 2]")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_images_arrive_in_order_and_a_missing_seed_is_picked_and_reported() {
    let p = Pipeline::start(Duration::from_millis(1)).await;
    let mut body = job_with("j_multi", "numImages", json!(3));
    body.as_object_mut().unwrap().remove("seed");
    p.studio.enqueue(body);
    p.delivered("j_multi").await;

    let (meta, images) = p.studio.job("j_multi").unwrap().results[0].clone();
    let seed = meta["seed"]
        .as_u64()
        .expect("the worker reports the seed it picked");
    assert!(seed < 1 << 53);
    assert_eq!(images.len(), 3);
    for (index, png) in images.iter().enumerate() {
        assert_eq!(
            decode(png).get_pixel(0, 0).0,
            colour_for(seed, index),
            "image {index} in order"
        );
        // The same parameters chunk `generate` writes, with the seed the worker picked.
        let parameters = read_parameters(png).expect("a parameters chunk");
        assert!(
            parameters.starts_with("a lighthouse at dusk")
                && parameters.contains(&format!("Seed: {seed},"))
                && parameters.contains("Model: sd-turbo"),
            "{parameters}"
        );
    }
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_stops_at_the_next_step_and_reports_nothing_more() {
    let p = Pipeline::start(Duration::from_millis(20)).await;
    p.start_long_job("j_cancel").await;
    p.studio.cancel_job("j_cancel");
    assert!(p.engine_stopped("j_cancel").await < 100);

    p.studio.enqueue(job("j_next"));
    p.delivered("j_next").await;
    let cancelled = p.studio.job("j_cancel").unwrap();
    assert!(
        cancelled.results.is_empty() && cancelled.uploads == 0,
        "output discarded"
    );
    assert!(cancelled.fails.is_empty(), "nothing more reported");
    let outcome = p
        .runtime
        .handle()
        .status()
        .jobs
        .recent
        .iter()
        .find(|j| j.job_id == "j_cancel")
        .unwrap()
        .outcome
        .clone();
    assert_eq!(outcome, JobOutcome::Cancelled);
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_stops_the_job_and_discards_it() {
    let p = Pipeline::start(Duration::from_millis(20)).await;
    p.start_long_job("j_stolen").await;
    p.studio.steal_job("j_stolen");
    assert!(p.engine_stopped("j_stolen").await < 100);
    let stolen = p.studio.job("j_stolen").unwrap();
    assert_eq!(stolen.uploads, 0);
    assert!(stolen.fails.is_empty());

    p.studio.enqueue(job("j_after"));
    p.delivered("j_after").await;
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn studio_errors_during_claim_progress_and_upload_lose_nothing() {
    let p = Pipeline::start(Duration::from_millis(5)).await;
    p.studio.inject(Some(Route::Claim), Fault::Status(503), 2);
    p.studio.inject(Some(Route::Claim), Fault::Garbage, 1);
    p.studio
        .inject(Some(Route::Progress), Fault::Status(500), 3);
    p.studio.inject(
        Some(Route::Progress),
        Fault::Hang(Duration::from_secs(2)),
        1,
    );
    p.studio.inject(Some(Route::Result), Fault::Status(502), 2);
    p.studio
        .inject(Some(Route::Result), Fault::Hang(Duration::from_secs(2)), 1);
    for n in 0..3 {
        p.studio.enqueue(job(&format!("j_{n}")));
    }
    for n in 0..3 {
        p.delivered(&format!("j_{n}")).await;
        let job = p.studio.job(&format!("j_{n}")).unwrap();
        assert_eq!(job.results.len(), 1);
        assert!(job.fails.is_empty());
    }
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_upload_answer_is_retried_without_a_duplicate() {
    let p = Pipeline::start(Duration::from_millis(1)).await;
    // The studio stores the result, but the answer never reaches the worker.
    p.studio.inject(
        Some(Route::Result),
        Fault::LoseResponse(Duration::from_secs(2)),
        1,
    );
    p.studio.enqueue(job("j_lost"));
    let handle = p.runtime.handle();
    eventually("delivered from the worker's side", PATIENCE, || {
        handle.status().jobs.counters.jobs_completed == 1
    })
    .await;
    let job = p.studio.job("j_lost").unwrap();
    assert_eq!(job.uploads, 2, "retried once");
    assert_eq!(job.results.len(), 1, "stored once");
    assert_eq!(handle.status().jobs.outbox_len, 0);
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_too_large_is_reported_as_failed() {
    let p = Pipeline::start(Duration::from_millis(1)).await;
    p.studio.set_results_too_large(true);
    p.studio.enqueue(job("j_big"));
    let fail = p.failed_with("j_big", "internal").await;
    assert!(
        fail["error"].as_str().unwrap().contains("too large"),
        "{fail}"
    );
    assert_eq!(
        fail["retryable"], false,
        "the same job would be too large again"
    );
    let handle = p.runtime.handle();
    eventually("outbox emptied", PATIENCE, || {
        handle.status().jobs.outbox_len == 0
    })
    .await;
    assert!(
        p.home
            .dir
            .path()
            .join("outbox")
            .read_dir()
            .unwrap()
            .next()
            .is_none()
    );
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_outbox_and_upload_delivers_once_before_any_new_claim() {
    let Pipeline {
        studio,
        home,
        engine,
        runtime,
    } = Pipeline::start(Duration::from_millis(1)).await;
    studio.inject(Some(Route::Result), Fault::Status(503), u32::MAX);
    studio.enqueue(job("j_crash"));
    let handle = runtime.handle();
    eventually("result in the outbox", PATIENCE, || {
        handle.status().jobs.outbox_len == 1
    })
    .await;

    // Crash: every task is dropped where it stands; nothing is shut down cleanly.
    drop(runtime);
    // The dead worker's held long-poll claim is still open at the studio until its waitS
    // (1 s) runs out; a job queued before then would be leased to the dead connection (a
    // real studio gets it back when the lease expires).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    studio.enqueue(job("j_after_crash"));
    studio.clear_faults();
    let log_before = studio.log().len();

    let p = Pipeline {
        runtime: home.start_runtime_with(fast_timing(), Some(engine.clone())),
        studio,
        home,
        engine,
    };
    p.delivered("j_crash").await;
    p.delivered("j_after_crash").await;

    let log = p.studio.log()[log_before..].to_vec();
    let first_upload = log
        .iter()
        .position(|r| r.route == Route::Result && r.status < 300)
        .unwrap();
    let first_claim = log.iter().position(|r| r.route == Route::Claim).unwrap();
    assert!(
        first_upload < first_claim,
        "the outbox is drained before anything new is claimed"
    );
    assert_eq!(
        p.studio.job("j_crash").unwrap().results.len(),
        1,
        "exactly once"
    );
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_hands_the_running_job_back_and_survives_a_restart() {
    let p = Pipeline::start(Duration::from_millis(20)).await;
    p.start_long_job("j_paused").await;
    let handle = p.runtime.handle();
    assert!(handle.send(Command::Pause));

    let fail = p.failed_with("j_paused", "paused").await;
    assert_eq!(fail["retryable"], true);
    assert!(
        p.engine.steps_run("j_paused").unwrap() < 100,
        "stopped at a step boundary"
    );
    eventually("model unloaded", PATIENCE, || {
        p.engine.unloads.load(std::sync::atomic::Ordering::SeqCst) >= 1
    })
    .await;
    assert_eq!(
        handle.status().jobs.claim_blocked.as_deref(),
        Some(PauseReason::User.describe())
    );

    // The studio re-queued it; a paused worker does not take it.
    let claims = p.studio.count(Route::Claim);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        p.studio.count(Route::Claim),
        claims,
        "no claims while paused"
    );
    assert_eq!(p.studio.job("j_paused").unwrap().state, JobState::Queued);

    // Still paused after a restart.
    let p = p.restart().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        p.studio.count(Route::Claim),
        claims,
        "no claims after a restart either"
    );

    assert!(p.runtime.handle().send(Command::Resume));
    p.delivered("j_paused").await;
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quitting_mid_job_hands_it_back() {
    let p = Pipeline::start(Duration::from_millis(20)).await;
    p.studio.enqueue(job_with("j_quit", "steps", json!(100)));
    eventually("running", PATIENCE, || {
        p.engine
            .jobs_started
            .load(std::sync::atomic::Ordering::SeqCst)
            == 1
    })
    .await;
    p.runtime.shutdown().await;
    let job = p.studio.job("j_quit").unwrap();
    assert_eq!(job.fails.len(), 1, "{:?}", job.fails);
    assert_eq!(job.fails[0]["code"], "paused");
    assert_eq!(job.fails[0]["retryable"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_and_hostile_jobs_are_failed_and_the_worker_goes_on() {
    let p = Pipeline::start(Duration::from_millis(1)).await;
    let invalid = [
        job_with("bad_width", "width", json!(513)),
        job_with("bad_big", "width", json!(4096)),
        job_with("bad_negative", "height", json!(-64)),
        job_with("bad_steps", "steps", json!(151)),
        job_with("bad_steps_type", "steps", json!("4")),
        job_with("bad_guidance", "guidanceScale", json!(31)),
        job_with("bad_images", "numImages", json!(9)),
        job_with("bad_seed", "seed", json!(-1)),
        job_with("bad_huge_number", "seed", json!(1e308)),
        job_with("bad_scheduler", "scheduler", json!("plms")),
        job_with("bad_prompt_type", "prompt", json!({"text": "x"})),
        job_with("bad_long_prompt", "prompt", json!("x".repeat(100_000))),
        job_with("bad_kind", "kind", json!("img2img")),
        json!({ "jobId": "bad_missing_fields" }),
        job_with(&"x".repeat(129), "steps", json!(4)),
    ];
    for body in &invalid {
        p.studio.enqueue(body.clone());
    }
    p.studio
        .enqueue(job_with("unknown_model", "model", json!("sdxl-turbo")));
    p.studio
        .enqueue(json!({ "kind": "txt2img", "prompt": "no id" }));
    p.studio.enqueue(json!(["not", "an", "object"]));
    p.studio.enqueue(job("good"));
    p.delivered("good").await;

    for body in &invalid {
        let job_id = body["jobId"].as_str().unwrap();
        let job = p.studio.job(job_id).unwrap();
        assert_eq!(job.fails.len(), 1, "{}", &job_id[..job_id.len().min(20)]);
        assert_eq!(job.fails[0]["code"], "invalid_params");
        assert_eq!(job.fails[0]["retryable"], false);
        let message = job.fails[0]["error"].as_str().unwrap();
        assert!(!message.is_empty() && message.len() < 200, "{message}");
        assert_eq!(job.uploads, 0);
    }
    let unknown = p.studio.job("unknown_model").unwrap();
    assert_eq!(unknown.fails[0]["code"], "model_unavailable");
    assert_eq!(unknown.fails[0]["retryable"], false);
    // Jobs without a usable id can only be logged: nothing was sent for them.
    assert_eq!(p.studio.count(Route::Fail), invalid.len() + 1);
    assert_eq!(
        p.engine
            .jobs_started
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the good job ran"
    );
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_studio_that_keeps_sending_unanswerable_jobs_is_backed_off_from() {
    let p = Pipeline::start(Duration::from_millis(1)).await;
    // Every claim answers at once with a job that has no id: nothing can be reported for it.
    p.studio.inject(
        Some(Route::Claim),
        Fault::Body(json!({ "job": { "kind": "txt2img", "prompt": "no id" } })),
        u32::MAX,
    );
    let handle = p.runtime.handle();
    claims_held_saying(&handle, "cannot be answered").await;
    let before = p.studio.count(Route::Claim);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = p.studio.count(Route::Claim) - before;
    // A 20 ms → 200 ms backoff allows ~10 claims in 1.5 s; ignoring the job and claiming again
    // at once made hundreds.
    assert!(during <= 30, "{during} claims in 1.5 s");

    // The studio recovers: the backoff is over with the first good job.
    p.studio.clear_faults();
    p.studio.enqueue(job("good"));
    p.delivered("good").await;
    assert_eq!(handle.status().jobs.claim_blocked, None);
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_larger_than_a_mebibyte_are_refused_unread_and_backed_off_from() {
    let p = Pipeline::start(Duration::from_millis(1)).await;
    let handle = p.runtime.handle();
    // A claim answer of 10 MB (a job with a 10 MB prompt), then heartbeat answers of 2 MB:
    // each is a broken studio, never parsed.
    let mut huge = job("j_huge");
    huge["prompt"] = json!("x".repeat(10 << 20));
    p.studio
        .inject(Some(Route::Claim), Fault::Body(json!({ "job": huge })), 3);
    p.studio.inject(
        Some(Route::Heartbeat),
        Fault::Body(json!({ "padding": "x".repeat(2 << 20) })),
        u32::MAX,
    );
    claims_held_saying(&handle, "larger than").await;
    eventually("the heartbeat problem is shown", PATIENCE, || {
        handle
            .status()
            .connection
            .last_error
            .as_deref()
            .is_some_and(|error| error.contains("larger than"))
    })
    .await;
    assert_eq!(p.studio.count(Route::Fail), 0, "nothing to answer for");

    // Once the studio answers sensibly again, work goes on.
    p.studio.clear_faults();
    p.studio.enqueue(job("good"));
    p.delivered("good").await;
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_errors_are_reported_and_three_in_a_row_back_off() {
    let p = Pipeline::start(Duration::from_millis(1)).await;
    p.studio.enqueue(job_with("j_oom", "prompt", json!("#oom")));
    p.studio
        .enqueue(job_with("j_fail", "prompt", json!("#fail")));
    p.studio
        .enqueue(job_with("j_panic", "prompt", json!("#panic")));
    let oom = p.failed_with("j_oom", "oom").await;
    assert_eq!(oom["retryable"], true);
    let internal = p.failed_with("j_fail", "internal").await;
    assert_eq!(internal["error"], "the scripted engine failed");
    let crashed = p.failed_with("j_panic", "internal").await;
    assert_eq!(crashed["error"], "the engine crashed");

    let handle = p.runtime.handle();
    claims_held_saying(&handle, "3 jobs failed in a row").await;
    // The failed jobs were re-queued (retryable); after the pause the worker goes on. The
    // engine still fails them, but every one is answered.
    eventually("claims again after the backoff", PATIENCE, || {
        p.studio.job("j_oom").unwrap().fails.len() >= 2
    })
    .await;
    assert!(handle.status().jobs.counters.jobs_failed >= 3);
    p.runtime.shutdown().await;
}

/// What the scripted engine says when it "loses" the GPU.
const GPU_LOST: &str = "an illegal memory access was encountered (CUDA_ERROR_ILLEGAL_ADDRESS)";

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_loses_the_gpu_is_failed_and_the_worker_asks_to_start_again() {
    let p = Pipeline::start(Duration::from_millis(1)).await;
    p.studio
        .enqueue(job_with("j_lost", "prompt", json!("#gpu-lost")));
    let fail = p.failed_with("j_lost", "internal").await;
    assert_eq!(fail["retryable"], true, "another worker takes it");
    assert_eq!(
        fail["error"],
        format!("the GPU stopped working: {GPU_LOST}")
    );

    let handle = p.runtime.handle();
    eventually("a restart asked of the host", PATIENCE, || {
        handle.requests().stop_request().is_some()
    })
    .await;
    let Some(StopRequest::Restart(restart)) = handle.requests().stop_request() else {
        panic!("{:?}", handle.requests().stop_request());
    };
    assert_eq!(
        restart.reason,
        format!("the GPU stopped working: {GPU_LOST}")
    );
    let [(variable, chain)] = restart.variables.as_slice() else {
        panic!("{:?}", restart.variables);
    };
    assert_eq!(variable, gpu_recovery::VARIABLE);
    let [restarts, at, why] = chain.splitn(3, ':').collect::<Vec<_>>()[..] else {
        panic!("{chain}");
    };
    assert_eq!(restarts, "1");
    assert!(unix_now() - at.parse::<u64>().unwrap() < 60);
    assert_eq!(why, GPU_LOST, "for the new worker's status");

    // Nothing more is claimed from the lost GPU while the host stops the worker.
    p.studio.enqueue(job("j_next"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(p.studio.job("j_next").unwrap().leases, 0);
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_lost_again_soon_after_two_restarts_stops_claiming_and_says_why() {
    // Started a second time for a lost GPU a minute ago.
    let recovery = GpuRecovery::parse(&format!("2:{}", unix_now() - 60)).unwrap();
    let p = Pipeline::start(Duration::from_millis(1))
        .await
        .restarted_after(recovery)
        .await;
    let handle = p.runtime.handle();
    let restarted = handle
        .status()
        .restarted
        .expect("the status says it restarted");
    assert!(
        restarted.kernels_off,
        "a second restart turned our kernels off"
    );
    p.studio.enqueue(job("j_before"));
    crate::support::delivered(&p.studio, "j_before").await;
    p.studio
        .enqueue(job_with("j_lost", "prompt", json!("#gpu-lost")));
    p.failed_with("j_lost", "internal").await;

    claims_held_saying(&handle, "the GPU stopped working again").await;
    let blocked = handle.status().jobs.claim_blocked.unwrap();
    assert!(
        blocked.ends_with("2 times since 1 min ago; no more jobs until studio-worker is restarted"),
        "{blocked}"
    );
    assert_eq!(handle.requests().stop_request(), None, "no third restart");
    p.studio.enqueue(job("j_next"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(p.studio.job("j_next").unwrap().leases, 0);
    // The worker is up: the studio still hears from it.
    let heartbeats = p.studio.count(Route::Heartbeat);
    eventually("heartbeats go on", PATIENCE, || {
        p.studio.count(Route::Heartbeat) > heartbeats
    })
    .await;
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_job_without_losing_it() {
    let p = Pipeline::start(Duration::from_millis(1)).await;
    // The outbox folder becomes unwritable (a file in its place), as on a full disk.
    let outbox = p.home.dir.path().join("outbox");
    std::fs::remove_dir_all(&outbox).unwrap();
    std::fs::write(&outbox, b"").unwrap();
    p.studio.enqueue(job("j_disk"));
    let fail = p.failed_with("j_disk", "internal").await;
    assert_eq!(
        fail["retryable"], true,
        "another worker (or this one later) can run it"
    );
    let message = fail["error"].as_str().unwrap();
    assert!(
        message.starts_with("cannot store the result on this PC"),
        "{message}"
    );
    assert!(
        !message.contains(&p.home.dir.path().to_string_lossy().into_owned()),
        "no paths: {message}"
    );
    p.runtime.shutdown().await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_reach_a_running_worker_from_the_cli() {
    let p = Pipeline::start(Duration::from_millis(1)).await;
    let handle = p.runtime.handle();
    eventually("control file", PATIENCE, || {
        p.home.dir.path().join("control.json").exists()
    })
    .await;

    let run = |command: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_studio-worker"))
            .arg("--config")
            .arg(p.home.config_path())
            .arg(command)
            .output()
            .unwrap()
    };
    let paused = tokio::task::spawn_blocking({
        let run = run("pause");
        move || run
    })
    .await
    .unwrap();
    assert!(
        paused.status.success(),
        "{}",
        String::from_utf8_lossy(&paused.stderr)
    );
    eventually("paused", PATIENCE, || {
        handle.status().paused == Some(PauseReason::User)
    })
    .await;
    assert!(p.home.on_disk().pause.by_user);

    let resumed = run("resume");
    assert!(resumed.status.success());
    eventually("resumed", PATIENCE, || handle.status().paused.is_none()).await;

    // A wrong token is refused.
    let mut control: Value =
        serde_json::from_slice(&std::fs::read(p.home.dir.path().join("control.json")).unwrap())
            .unwrap();
    control["token"] = json!("0".repeat(64));
    let port = control["port"].as_u64().unwrap() as u16;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    stream
        .write_all(b"{\"token\":\"0000\",\"command\":\"pause\"}\n")
        .await
        .unwrap();
    let mut reply = String::new();
    tokio::io::BufReader::new(stream)
        .read_line(&mut reply)
        .await
        .unwrap();
    assert!(reply.contains("wrong token"), "{reply}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(handle.status().paused, None);

    p.runtime.shutdown().await;
    assert!(
        !p.home.dir.path().join("control.json").exists(),
        "removed on a clean exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_go_on_during_a_job_and_say_busy() {
    let p = Pipeline::start(Duration::from_millis(20)).await;
    p.studio.set_next_heartbeat_s(Some(0)); // the fast floor: several per job
    p.studio.enqueue(job_with("j_long", "steps", json!(60)));
    eventually("a busy heartbeat naming the job", PATIENCE, || {
        p.studio
            .log_for(Route::Heartbeat)
            .iter()
            .any(|h| h.body["state"] == "busy" && h.body["currentJobId"] == "j_long")
    })
    .await;
    let during = p.studio.count(Route::Heartbeat);
    eventually("more heartbeats while the engine works", PATIENCE, || {
        p.studio.count(Route::Heartbeat) >= during + 3
            && p.runtime.handle().status().jobs.current.is_some()
    })
    .await;
    p.delivered("j_long").await;
    eventually("idle again", PATIENCE, || {
        p.studio
            .log_for(Route::Heartbeat)
            .last()
            .is_some_and(|h| h.body["state"] == "idle")
    })
    .await;
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_now_cuts_the_upload_backoff_short() {
    let mut timing = fast_timing();
    // A long backoff: without the command, the next try would (almost surely) be seconds away.
    timing.backoff = studio_worker::backoff::BackoffPolicy {
        base: Duration::from_secs(60),
        cap: Duration::from_secs(60),
    };
    let (studio, _home, _engine, runtime) = approved_worker(Duration::from_millis(1), timing).await;
    studio.inject(Some(Route::Result), Fault::Status(503), 1);
    studio.enqueue(job("j_retry"));
    eventually("the first upload failed", PATIENCE, || {
        studio
            .log_for(Route::Result)
            .iter()
            .any(|r| r.status == 503)
    })
    .await;
    let handle = runtime.handle();
    let asked = std::time::Instant::now();
    while studio.job("j_retry").is_some_and(|j| j.results.is_empty()) {
        assert!(
            asked.elapsed() < Duration::from_secs(3),
            "retry now did not retry"
        );
        handle.send(Command::RetryUploads);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_finished_images_go_to_the_chosen_folder() {
    let p = Pipeline::start(Duration::from_millis(1)).await;
    let copies = p.home.dir.path().join("my pictures");
    // Changed through the running worker's own config, as the Settings tab does.
    p.runtime
        .handle()
        .config()
        .update(|c| c.images.save_copies_to = Some(copies.clone()))
        .unwrap();
    p.studio.enqueue(job_with("j_copy", "numImages", json!(2)));
    p.delivered("j_copy").await;

    let handle = p.runtime.handle();
    eventually("copies listed", PATIENCE, || {
        handle
            .status()
            .jobs
            .recent
            .front()
            .is_some_and(|j| j.saved_copies.len() == 2)
    })
    .await;
    let saved = handle
        .status()
        .jobs
        .recent
        .front()
        .unwrap()
        .saved_copies
        .clone();
    for (index, path) in saved.iter().enumerate() {
        assert!(path.starts_with(&copies), "{}", path.display());
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.ends_with(&format!("sd-turbo 42-{}.png", index + 1)),
            "{name}"
        );
        let image = decode(&std::fs::read(path).unwrap());
        assert_eq!(image.get_pixel(0, 0).0, colour_for(42, index));
    }
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_candle_engine_runs_a_real_model_and_the_studio_gets_its_exact_image() {
    use std::collections::BTreeMap;
    use studio_worker::engine::candle_engine::CandleEngine;
    use studio_worker::engine::device;
    use studio_worker::engine::sd::{Request, StableDiffusion};
    use studio_worker::vocab::device::DevicePreference;

    let folder =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-sd1");
    let cpu = device::select(DevicePreference::Cpu).unwrap();
    let models = BTreeMap::from([("tiny-sd1".to_owned(), folder.clone())]);
    let (engine, refused) = CandleEngine::new(cpu.clone(), &models, 0);
    assert!(refused.is_empty());

    let studio = TestStudio::start().await;
    studio.set_decision(crate::support::studio::Decision::ApproveAfterPolls(1));
    let home = WorkerHome::new();
    home.write_config(&studio.url());
    let runtime = home.start_runtime_with(fast_timing(), Some(Arc::new(engine)));
    let mut body = job("real");
    body["model"] = json!("tiny-sd1");
    body["width"] = json!(64);
    body["guidanceScale"] = json!(3.0);
    body["negativePrompt"] = json!("fog");
    studio.enqueue(body);
    eventually("delivered", PATIENCE, || {
        studio
            .job("real")
            .is_some_and(|job| !job.results.is_empty())
    })
    .await;

    let record = studio.job("real").unwrap();
    let uploaded = decode(&record.results[0].1[0]);
    // The same job run locally through the pipeline gives the same pixels.
    let pipeline = StableDiffusion::load(&folder, &cpu.device, cpu.precision).unwrap();
    let local = pipeline
        .generate(
            &Request {
                prompt: "a lighthouse at dusk".to_owned(),
                negative_prompt: "fog".to_owned(),
                width: 64,
                height: 64,
                steps: 3,
                guidance_scale: 3.0,
                seed: 42,
                num_images: 1,
                scheduler: None,
                memory: Default::default(),
                hand_back_before_decode: false,
            },
            &mut |_| {},
            &|| false,
        )
        .unwrap();
    assert_eq!(uploaded, local[0]);

    // Capabilities name the served model and the device the engine runs on.
    let worker = studio.workers().pop().unwrap();
    let capabilities = &worker.heartbeats.last().unwrap()["capabilities"];
    assert_eq!(capabilities["models"][0]["id"], "tiny-sd1");
    assert_eq!(capabilities["device"]["kind"], "cpu");
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_the_studio_hears_of_names_no_folder_of_this_pc() {
    use std::collections::BTreeMap;
    use studio_worker::engine::candle_engine::CandleEngine;
    use studio_worker::engine::device;
    use studio_worker::vocab::device::DevicePreference;

    let home = WorkerHome::new();
    // A model folder whose path says whose PC this is.
    let folder = home.dir.path().join("Users").join("alice").join("my-model");
    crate::support::files::copy_folder(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-sd1"),
        &folder,
    );
    let cpu = device::select(DevicePreference::Cpu).unwrap();
    let models = BTreeMap::from([("tiny-sd1".to_owned(), folder.clone())]);
    let (engine, refused) = CandleEngine::new(cpu, &models, 0);
    assert!(refused.is_empty());
    // Served, then its weights are cut short (a failing disk, a sync tool mid-copy).
    std::fs::write(
        folder.join("unet/diffusion_pytorch_model.safetensors"),
        b"\x10\0\0\0\0\0\0\0{\"broken",
    )
    .unwrap();

    let studio = TestStudio::start().await;
    studio.set_decision(crate::support::studio::Decision::ApproveAfterPolls(1));
    home.write_config(&studio.url());
    let runtime = home.start_runtime_with(fast_timing(), Some(Arc::new(engine)));
    let mut body = job("j_gone");
    body["model"] = json!("tiny-sd1");
    body["width"] = json!(64);
    studio.enqueue(body);
    eventually("reported", PATIENCE, || {
        studio
            .job("j_gone")
            .is_some_and(|job| !job.fails.is_empty())
    })
    .await;
    runtime.shutdown().await;

    let fail = &studio.job("j_gone").unwrap().fails[0];
    let error = fail["error"].as_str().unwrap();
    assert!(
        error.contains("diffusion_pytorch_model.safetensors"),
        "{error}"
    );
    let folder_text = folder.to_string_lossy();
    assert!(!error.contains(&*folder_text), "{error}");
    assert!(!error.contains("alice"), "{error}");
    assert!(
        !error.contains(&*home.dir.path().to_string_lossy()),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_studio_slow_to_answer_progress_does_not_hold_the_next_job() {
    let p = Pipeline::start(Duration::from_millis(1)).await;
    // Every progress report is taken, but answered only after the worker's request timeout
    // (500 ms here), the `uploading` report of each finished job included.
    p.studio.inject(
        Some(Route::Progress),
        Fault::LoseResponse(Duration::from_secs(2)),
        u32::MAX,
    );
    let job_ids: Vec<String> = (0..3).map(|n| format!("j_slow_{n}")).collect();
    for job_id in &job_ids {
        p.studio.enqueue(job_with(job_id, "steps", json!(1)));
    }
    for job_id in &job_ids {
        p.delivered(job_id).await;
    }

    // Once a result is stored, the next claim goes out: the report is sent beside it.
    let mut claims: Vec<_> = p
        .studio
        .log_for(Route::Claim)
        .iter()
        .filter(|request| request.status == 200)
        .map(|request| request.answered_at)
        .collect();
    claims.sort();
    assert_eq!(claims.len(), 3);
    for pair in claims.windows(2) {
        let gap = pair[1].duration_since(pair[0]);
        assert!(
            gap < Duration::from_millis(450),
            "the next claim waited {gap:?} for a progress report"
        );
    }
    // The reports were still sent.
    for job_id in &job_ids {
        let job = p.studio.job(job_id).unwrap();
        assert!(
            job.progress
                .iter()
                .any(|report| report["stage"] == "uploading"),
            "{job_id}'s upload was reported: {:?}",
            job.progress
        );
    }
    p.runtime.shutdown().await;
}

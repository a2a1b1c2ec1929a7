//! A soak test: hundreds of jobs while the studio misbehaves at random and the person pauses
//! and resumes. Ignored by default (it takes about a minute):
//!
//! ```sh
//! cargo test --test worker soak -- --ignored --nocapture
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use studio_worker::runtime::Command;

use crate::support::engine::ScriptedEngine;
use crate::support::studio::{Decision, Fault, JobState, Route, TestStudio};
use crate::support::{PATIENCE, WorkerHome, eventually, fast_timing};

const JOBS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak test: run with --ignored"]
async fn soak_200_jobs_with_random_faults_lose_and_duplicate_nothing() {
    let studio = TestStudio::start().await;
    studio.set_decision(Decision::ApproveAfterPolls(1));
    let home = WorkerHome::new();
    home.write_config(&studio.url());
    let engine = Arc::new(ScriptedEngine::new(Duration::from_millis(15)));
    let runtime = home.start_runtime_with(fast_timing(), Some(engine.clone()));
    let handle = runtime.handle();

    for n in 0..JOBS {
        studio.enqueue(json!({
            "jobId": format!("soak_{n:03}"), "kind": "txt2img", "model": "sd-turbo",
            "prompt": format!("soak job {n}"), "width": 64, "height": 64,
            "steps": 1 + n % 4, "guidanceScale": 1.5, "numImages": 1 + n % 2,
            "seed": n, "scheduler": null, "leaseS": 10
        }));
    }

    let routes = [
        Route::Claim,
        Route::Progress,
        Route::Result,
        Route::Fail,
        Route::Heartbeat,
    ];
    let faults = [
        Fault::Status(500),
        Fault::Status(502),
        Fault::Status(503),
        Fault::Garbage,
        Fault::RetryAfter {
            status: 429,
            seconds: 1,
        },
        Fault::Hang(Duration::from_millis(800)),
        Fault::LoseResponse(Duration::from_millis(800)),
    ];
    let started = Instant::now();
    let mut injected = 0;
    let mut pauses = 0;
    let deadline = started + Duration::from_secs(300);
    while studio
        .jobs()
        .iter()
        .any(|job| !matches!(job.state, JobState::Done { .. }))
    {
        assert!(
            Instant::now() < deadline,
            "soak did not finish in 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        if fastrand::u8(..10) < 3 {
            let route = routes[fastrand::usize(..routes.len())];
            let fault = faults[fastrand::usize(..faults.len())].clone();
            studio.inject(Some(route), fault, 1);
            injected += 1;
        }
        if fastrand::u8(..100) < 6 {
            handle.send(Command::Pause);
            tokio::time::sleep(Duration::from_millis(fastrand::u64(20..200))).await;
            handle.send(Command::Resume);
            pauses += 1;
        }
    }
    studio.clear_faults();

    let jobs = studio.jobs();
    let lost: Vec<_> = jobs
        .iter()
        .filter(|job| job.results.is_empty())
        .map(|j| &j.job_id)
        .collect();
    let duplicated: Vec<_> = jobs
        .iter()
        .filter(|job| job.results.len() > 1)
        .map(|j| &j.job_id)
        .collect();
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert!(duplicated.is_empty(), "stored twice: {duplicated:?}");
    for job in &jobs {
        let (meta, images) = &job.results[0];
        assert_eq!(images.len() as u64, job.body["numImages"].as_u64().unwrap());
        assert_eq!(meta["seed"], job.body["seed"]);
    }
    eventually("outbox drained", PATIENCE, || {
        handle.status().jobs.outbox_len == 0
    })
    .await;
    let status = handle.status();
    assert_eq!(status.fatal, None);
    let uploads: u32 = jobs.iter().map(|job| job.uploads).sum();
    let leases: u32 = jobs.iter().map(|job| job.leases).sum();
    let handed_back: usize = jobs.iter().map(|job| job.fails.len()).sum();
    assert!(
        handed_back > 0,
        "no pause landed mid-job: the soak did not exercise hand-backs"
    );
    println!(
        "soak: {JOBS} jobs delivered once each in {:.1} s; {injected} faults injected, {pauses} pauses; \
         {leases} leases, {uploads} uploads (retries after lost answers), {handed_back} hand-backs; \
         worker counters: {:?}",
        started.elapsed().as_secs_f64(),
        status.jobs.counters
    );
    runtime.shutdown().await;
}

//! The good-guest policy in the running worker, on a PC the test plays (`FakePc`): a game
//! starting mid-job hands the job back and unloads the model, its end lets work resume after
//! the grace, the person's Resume wins until the game starts again, heat and battery pause
//! and resume, and the GPU-share cap rests between steps. The pure decisions over time are
//! unit-tested beside the policy (`src/policy/timeline_tests.rs`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use studio_worker::config::{self, PolicySection};
use studio_worker::runtime::{Command, Runtime};
use studio_worker::vocab::pause::PauseReason;

use crate::support::engine::ScriptedEngine;
use crate::support::probes::FakePc;
use crate::support::studio::{Decision, JobState, Route, TestStudio, job_body};
use crate::support::{PATIENCE, WorkerHome, eventually, fast_timing};

struct Rig {
    studio: TestStudio,
    _home: WorkerHome,
    engine: Arc<ScriptedEngine>,
    pc: FakePc,
    runtime: Runtime,
}

impl Rig {
    /// An approved worker with the scripted engine, on a fake PC, with `policy` settings.
    async fn start(step_time: Duration, policy: impl FnOnce(&mut PolicySection)) -> Self {
        let studio = TestStudio::start().await;
        studio.set_decision(Decision::ApproveAfterPolls(1));
        let home = WorkerHome::new();
        let mut settings = home.write_config(&studio.url());
        policy(&mut settings.policy);
        config::save(&home.config_path(), &settings).unwrap();
        let engine = Arc::new(ScriptedEngine::new(step_time));
        let pc = FakePc::new();
        let runtime = home.start_runtime_on(fast_timing(), Some(engine.clone()), Some(&pc));
        let rig = Self {
            studio,
            _home: home,
            engine,
            pc,
            runtime,
        };
        eventually("heartbeating", PATIENCE, || {
            rig.studio.count(Route::Heartbeat) >= 1
        })
        .await;
        rig
    }

    fn last_heartbeat(&self) -> Value {
        self.studio
            .workers()
            .first()
            .and_then(|worker| worker.heartbeats.last().cloned())
            .unwrap_or(Value::Null)
    }

    async fn paused_for(&self, reason: &str) {
        eventually(
            &format!("heartbeat says paused for {reason}"),
            PATIENCE,
            || {
                let beat = self.last_heartbeat();
                beat["state"] == "paused" && beat["pausedReason"] == reason
            },
        )
        .await;
    }

    async fn running_again(&self) {
        eventually("heartbeat says it runs again", PATIENCE, || {
            self.last_heartbeat()["pausedReason"].is_null()
        })
        .await;
    }

    /// Queues a 100-step job and waits until the studio has seen it reach step 2.
    async fn start_long_job(&self, job_id: &str) {
        let mut body = job(job_id);
        body["steps"] = json!(100);
        self.studio.enqueue(body);
        eventually("denoising", PATIENCE, || {
            self.studio
                .job(job_id)
                .is_some_and(|j| j.progress.iter().any(|p| p["step"].as_u64() >= Some(2)))
        })
        .await;
    }
}

fn job(job_id: &str) -> Value {
    job_body(job_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_game_starting_mid_job_hands_it_back_and_its_end_resumes_work_after_the_grace() {
    let rig = Rig::start(Duration::from_millis(20), |policy| {
        policy.resume_after_game_s = 1;
    })
    .await;
    rig.start_long_job("j_game").await;

    rig.pc.start_game("Cyberpunk2077.exe");
    eventually("handed back as paused", PATIENCE, || {
        rig.studio
            .job("j_game")
            .is_some_and(|job| job.fails.iter().any(|f| f["code"] == "paused"))
    })
    .await;
    let fail = rig.studio.job("j_game").unwrap().fails[0].clone();
    assert_eq!(fail["retryable"], true, "another worker may take it");
    assert!(
        rig.engine.steps_run("j_game").unwrap() < 100,
        "stopped at a step boundary"
    );
    eventually("the GPU memory given back", PATIENCE, || {
        rig.engine.unloads.load(Ordering::SeqCst) >= 1
    })
    .await;
    rig.paused_for("game").await;
    let status = rig.runtime.handle().status();
    assert_eq!(status.paused, Some(PauseReason::Game));
    assert_eq!(
        status.pause_line().as_deref(),
        Some("Paused: Cyberpunk2077.exe is running — resumes 1 s after it closes")
    );

    // While it runs, nothing is claimed (the studio re-queued the job).
    let claims = rig.studio.count(Route::Claim);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rig.studio.count(Route::Claim),
        claims,
        "no claims during the game"
    );

    // The game closes: still nothing during the grace, then the job is taken again.
    let closed = Instant::now();
    rig.pc.stop_game();
    eventually("the job delivered after the game", PATIENCE, || {
        rig.studio
            .job("j_game")
            .is_some_and(|job| !job.results.is_empty())
    })
    .await;
    assert!(
        closed.elapsed() >= Duration::from_millis(900),
        "the grace was waited out ({:?})",
        closed.elapsed()
    );
    rig.running_again().await;
    rig.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_persons_resume_wins_over_a_game_until_it_starts_again() {
    let rig = Rig::start(Duration::from_millis(1), |policy| {
        policy.resume_after_game_s = 0;
    })
    .await;
    rig.pc.start_game("eldenring.exe");
    rig.paused_for("game").await;

    let handle = rig.runtime.handle();
    assert!(handle.send(Command::Resume));
    rig.running_again().await;
    assert_eq!(handle.status().policy.overridden, vec![PauseReason::Game]);
    rig.studio.enqueue(job("j_during_game"));
    eventually(
        "a job runs during the game, as the person asked",
        PATIENCE,
        || {
            rig.studio
                .job("j_during_game")
                .is_some_and(|job| !job.results.is_empty())
        },
    )
    .await;

    // The game ends and starts again: the pause is back.
    rig.pc.stop_game();
    eventually("the game's end seen", PATIENCE, || {
        handle.status().policy.overridden.is_empty()
    })
    .await;
    rig.pc.start_game("eldenring.exe");
    rig.paused_for("game").await;
    rig.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heat_and_battery_pause_and_resume_the_worker() {
    let rig = Rig::start(Duration::from_millis(1), |policy| {
        policy.temperature_limit_c = 80;
    })
    .await;
    rig.pc.set_temperature(86);
    rig.paused_for("temperature").await;
    rig.pc.set_temperature(77);
    rig.paused_for("temperature").await; // still within 5 °C of the limit
    rig.pc.set_temperature(74);
    rig.running_again().await;

    rig.pc.set_on_battery(true);
    rig.paused_for("battery").await;
    // The person's pause comes first in the protocol's order.
    let handle = rig.runtime.handle();
    assert!(handle.send(Command::Pause));
    rig.paused_for("user").await;
    // Their resume lifts their own pause and the battery's.
    assert!(handle.send(Command::Resume));
    rig.running_again().await;
    rig.studio.enqueue(job("j_on_battery"));
    eventually(
        "delivered on battery, as the person asked",
        PATIENCE,
        || {
            rig.studio
                .job("j_on_battery")
                .is_some_and(|job| job.state != JobState::Queued && !job.results.is_empty())
        },
    )
    .await;
    rig.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gpu_share_cap_rests_between_steps() {
    let step = Duration::from_millis(20);
    let rig = Rig::start(step, |policy| policy.max_gpu_share_percent = 50).await;
    let mut body = job("j_capped");
    body["steps"] = json!(10);
    rig.studio.enqueue(body);
    eventually("delivered", PATIENCE, || {
        rig.studio
            .job("j_capped")
            .is_some_and(|job| !job.results.is_empty())
    })
    .await;
    let meta = rig.studio.job("j_capped").unwrap().results[0].0.clone();
    let elapsed = Duration::from_millis(meta["elapsedMs"].as_u64().unwrap());
    // 10 steps of 20 ms at half the GPU: about 400 ms; never less than 10 rests of ~20 ms.
    assert!(
        elapsed >= step * 10 + step * 8,
        "the job rested between steps ({elapsed:?})"
    );
    rig.runtime.shutdown().await;
}

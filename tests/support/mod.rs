//! Shared by the integration tests: the in-process studio, fast timings, and a worker's files
//! in a temporary folder.
#![allow(dead_code)] // each test module uses a different part of the support code

#[cfg(target_os = "linux")]
pub mod desktop;
pub mod engine;
pub mod files;
pub mod hub;
pub mod probes;
pub mod studio;

use std::path::PathBuf;
use std::time::Duration;

use studio_worker::backoff::BackoffPolicy;
use studio_worker::config::{self, Config, SharedConfig};
use studio_worker::runtime::gpu_recovery::GpuRecovery;
use studio_worker::runtime::{Runtime, RuntimeOptions};
use studio_worker::timing::Timing;

/// The production loops on a test clock: every interval in milliseconds.
pub fn fast_timing() -> Timing {
    Timing {
        backoff: BackoffPolicy {
            base: Duration::from_millis(20),
            cap: Duration::from_millis(200),
        },
        poll_default: Duration::from_millis(50),
        poll_floor: Duration::from_millis(10),
        poll_cap: Duration::from_millis(100),
        heartbeat_default: Duration::from_millis(50),
        heartbeat_floor: Duration::from_millis(20),
        heartbeat_cap: Duration::from_millis(100),
        refused_retry: Duration::from_millis(100),
        request_timeout: Duration::from_millis(500),
        claim_wait: Duration::from_secs(1),
        empty_claim_pause: Duration::from_millis(50),
        progress_min_gap: Duration::from_millis(20),
        failure_backoff: BackoffPolicy {
            base: Duration::from_millis(300),
            cap: Duration::from_millis(600),
        },
        handback_timeout: Duration::from_secs(2),
        refused_upload_backoff: BackoffPolicy {
            base: Duration::from_millis(20),
            cap: Duration::from_millis(200),
        },
        give_up_refused_upload_after: Duration::from_secs(3600),
        policy_tick: Duration::from_millis(20),
        policy_paused_tick: Duration::from_millis(50),
        models_on_disk_refresh: Duration::from_millis(100),
    }
}

/// A worker's config file and data folder in a fresh temporary folder.
pub struct WorkerHome {
    pub dir: tempfile::TempDir,
}

impl WorkerHome {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// Writes a config that points at `studio_url` (as a person would after installing).
    pub fn write_config(&self, studio_url: &str) -> Config {
        let config = Config {
            api_base_url: studio_url.to_owned(),
            worker_name: "test-rig".to_owned(),
            ..Config::default()
        };
        config::save(&self.config_path(), &config).expect("save config");
        config
    }

    /// The config as it is on disk now (what a restart would see).
    pub fn on_disk(&self) -> Config {
        config::load(&self.config_path())
            .expect("load config")
            .config
    }

    /// Makes every later save of the settings fail: the file's place is taken by a folder
    /// that is not empty (a rename onto it fails, as in a settings folder that is read-only;
    /// root, which runs CI, ignores permissions).
    pub fn block_settings_saves(&self) {
        let path = self.config_path();
        std::fs::remove_file(&path).expect("remove config");
        std::fs::create_dir(&path).expect("block config");
        std::fs::write(path.join("keep"), "").expect("block config");
    }

    /// Undoes [`Self::block_settings_saves`]: the next save writes the file again.
    pub fn unblock_settings_saves(&self) {
        std::fs::remove_dir_all(self.config_path()).expect("unblock config");
    }

    pub fn shared(&self) -> SharedConfig {
        SharedConfig::new(self.config_path(), self.on_disk())
    }

    pub fn start_runtime(&self, timing: Timing) -> Runtime {
        self.start_runtime_with(timing, None)
    }

    pub fn start_runtime_with(
        &self,
        timing: Timing,
        engine: Option<std::sync::Arc<dyn studio_worker::engine::Engine>>,
    ) -> Runtime {
        self.start_runtime_on(timing, engine, None)
    }

    /// A runtime whose good-guest policy watches `pc` (`None`: no policy).
    pub fn start_runtime_on(
        &self,
        timing: Timing,
        engine: Option<std::sync::Arc<dyn studio_worker::engine::Engine>>,
        pc: Option<&probes::FakePc>,
    ) -> Runtime {
        self.start_runtime_recovering(timing, engine, pc, GpuRecovery::default())
    }

    /// The same, started again after the GPU stopped working (`recovery`: the restarts so
    /// far).
    pub fn start_runtime_recovering(
        &self,
        timing: Timing,
        engine: Option<std::sync::Arc<dyn studio_worker::engine::Engine>>,
        pc: Option<&probes::FakePc>,
        recovery: GpuRecovery,
    ) -> Runtime {
        Runtime::start(
            self.shared(),
            RuntimeOptions {
                timing,
                data_dir: self.dir.path().to_path_buf(),
                api_base_override: None,
                engine,
                recovered_config: None,
                model_supply: None,
                probes: pc.map(probes::FakePc::probes),
                tolerate_invalid_studio_url: false,
                gpu_recovery: recovery,
            },
        )
        .expect("runtime starts")
    }
}

/// A studio that approves on the first poll, and a runtime with the scripted engine that it
/// approved: the starting point of every pipeline test and benchmark.
pub async fn approved_worker(
    step_time: Duration,
    timing: Timing,
) -> (
    studio::TestStudio,
    WorkerHome,
    std::sync::Arc<engine::ScriptedEngine>,
    Runtime,
) {
    let studio = studio::TestStudio::start().await;
    studio.set_decision(studio::Decision::ApproveAfterPolls(1));
    let home = WorkerHome::new();
    home.write_config(&studio.url());
    let engine = std::sync::Arc::new(engine::ScriptedEngine::new(step_time));
    let runtime = home.start_runtime_with(timing, Some(engine.clone()));
    let handle = runtime.handle();
    eventually("approved", PATIENCE, || {
        matches!(
            handle.status().registration,
            studio_worker::registration::RegistrationState::Approved { .. }
        )
    })
    .await;
    (studio, home, engine, runtime)
}

/// Polls `condition` every 10 ms until it holds; panics with `what` after `timeout`.
pub async fn eventually(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub const PATIENCE: Duration = Duration::from_secs(10);

/// Waits until `studio` stored a result for `job_id`.
pub async fn delivered(studio: &studio::TestStudio, job_id: &str) {
    eventually(&format!("{job_id} delivered"), PATIENCE, || {
        studio
            .job(job_id)
            .is_some_and(|job| !job.results.is_empty())
    })
    .await;
}

/// Waits until the worker says it takes no jobs for a reason whose words contain `part`.
pub async fn claims_held_saying(handle: &studio_worker::runtime::RuntimeHandle, part: &str) {
    eventually(
        &format!("claims held, saying “{part}”"),
        PATIENCE,
        || {
            handle
                .status()
                .jobs
                .claim_blocked
                .is_some_and(|why| why.contains(part))
        },
    )
    .await;
}

/// Where the worker's result for `job_id` stands in its outbox (`None`: not in it).
pub fn waiting_state(
    handle: &studio_worker::runtime::RuntimeHandle,
    job_id: &str,
) -> Option<studio_worker::runtime::WaitingState> {
    handle
        .status()
        .jobs
        .waiting
        .iter()
        .find(|result| result.job_id == job_id)
        .map(|result| result.state.clone())
}

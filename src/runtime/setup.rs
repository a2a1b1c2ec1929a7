//! Starting the worker for real, the one way the app and `run --headless` both do it: the
//! model store, the engine the settings ask for, model downloads, then the runtime's tasks.
//! (Tests start [`Runtime::start`] with engines and stores of their own.)

use std::path::PathBuf;
use std::sync::Arc;

use super::{ModelSupply, Runtime, RuntimeOptions, StartError};
use crate::config::{BrokenConfig, Config, SharedConfig};
use crate::engine::Engine;
use crate::engine::candle_engine::CandleEngine;
use crate::models::served::served_models;
use crate::models::store::ModelStore;
use crate::platform::probes::Probes;
use crate::timing::Timing;

/// What the command line decided about this run.
pub struct Launch {
    /// Where `status.json`, the outbox, logs and the control file go.
    pub data_dir: PathBuf,
    /// `--api-url`: this studio for this run instead of the settings' one.
    pub api_base_override: Option<String>,
    /// The settings file `config::load` found broken and kept aside, to tell the person.
    pub recovered_config: Option<BrokenConfig>,
    /// The app (with a window to fix the settings in) rather than a headless run.
    pub with_window: bool,
}

impl Runtime {
    /// Starts the worker the settings describe. Must be called inside a tokio runtime.
    pub fn launch(config: SharedConfig, launch: Launch) -> Result<Self, StartError> {
        let store = ModelStore::standard(&launch.data_dir);
        let engine = engine_for(&config.snapshot(), store.as_ref());
        let model_supply = ModelSupply::standard(store);
        Self::start(
            config,
            RuntimeOptions {
                timing: Timing::PRODUCTION,
                data_dir: launch.data_dir,
                api_base_override: launch.api_base_override,
                engine,
                recovered_config: launch.recovered_config,
                model_supply,
                probes: Some(Probes::for_this_pc()),
                tolerate_invalid_studio_url: launch.with_window,
                gpu_recovery: super::gpu_recovery::GpuRecovery::from_environment(),
            },
        )
    }
}

/// The engine the settings ask for, serving the local folders and the enabled catalog
/// models already downloaded into `store`; `None` (logged) when the device they name cannot
/// open: the worker then stays registered and heartbeating without taking jobs.
fn engine_for(config: &Config, store: Option<&ModelStore>) -> Option<Arc<dyn Engine>> {
    let models = served_models(config, store);
    match CandleEngine::start(
        config.engine.device,
        &models,
        config.engine.memory_budget_mb,
    ) {
        Ok(engine) => Some(Arc::new(engine)),
        Err(reason) => {
            tracing::error!("the image engine cannot start: {reason}");
            None
        }
    }
}

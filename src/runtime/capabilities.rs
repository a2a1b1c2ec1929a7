//! What this worker can do, as §4 describes it: sent with the registration request and with
//! every heartbeat. Built from the engine (device, limits, ready models) and the downloads
//! task's list of models still coming, never from what the window shows.

use std::sync::Arc;

use tokio::sync::watch;

use crate::engine::Engine;
use crate::platform::host;
use crate::studio::protocol::{Capabilities, ModelReadiness};
use crate::vocab::device::DeviceInfo;
use crate::vocab::job::EngineLimits;

#[derive(Clone)]
pub(super) struct CapabilitySource {
    engine: Option<Arc<dyn Engine>>,
    device: DeviceInfo,
    /// Owner: the downloads task. Catalog models being fetched.
    coming: watch::Receiver<Vec<String>>,
}

impl CapabilitySource {
    pub(super) fn new(
        engine: Option<Arc<dyn Engine>>,
        device: DeviceInfo,
        coming: watch::Receiver<Vec<String>>,
    ) -> Self {
        Self {
            engine,
            device,
            coming,
        }
    }

    pub(super) fn ready_models(&self) -> Vec<String> {
        self.engine
            .as_ref()
            .map_or_else(Vec::new, |engine| engine.ready_models())
    }

    /// The ready models, then the ones still downloading (`ready: false`), so the studio
    /// knows what is coming.
    fn models(&self) -> Vec<ModelReadiness> {
        let ready = self.ready_models();
        let coming: Vec<String> = self
            .coming
            .borrow()
            .iter()
            .filter(|model_id| !ready.contains(model_id))
            .cloned()
            .collect();
        ready
            .into_iter()
            .map(|id| ModelReadiness { id, ready: true })
            .chain(
                coming
                    .into_iter()
                    .map(|id| ModelReadiness { id, ready: false }),
            )
            .collect()
    }

    pub(super) fn capabilities(&self) -> Capabilities {
        let limits = self
            .engine
            .as_ref()
            .map_or(EngineLimits::NONE, |engine| engine.limits());
        Capabilities {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            os: host::os_name().to_owned(),
            arch: host::arch_name().to_owned(),
            device: self.device.clone(),
            models: self.models(),
            max_width: limits.max_width,
            max_height: limits.max_height,
            max_images: limits.max_images,
            kinds: vec!["txt2img".to_owned()],
        }
    }
}

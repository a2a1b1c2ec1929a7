//! The runtime's state as the window, the tray, `status` and the heartbeat see it.
//!
//! One [`WorkerStatus`] value behind a `watch` channel. Each field has one writer (named on
//! the field); readers clone a snapshot and never hold the channel while drawing or doing I/O.
//! It holds nothing secret, so it can be written to `status.json` and shown as it is.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::registration::RegistrationState;
use crate::studio::protocol::{PauseReason, WorkerState};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub started_at: DateTime<Utc>,
    pub api_base_url: String,
    /// Writer: the registration task (and the command task on reset).
    pub registration: RegistrationState,
    /// Writer: the registration task. The last problem while registering, in one line.
    pub registration_problem: Option<String>,
    /// Writer: the registration task.
    pub next_registration_poll_at: Option<DateTime<Utc>>,
    /// Writer: the heartbeat task.
    pub connection: ConnectionStatus,
    /// Writer: whoever changes the config's pause section (derived on every config change).
    pub paused: Option<PauseReason>,
    /// Writer: the command task. Set when a change could not be saved.
    pub settings_problem: Option<String>,
    /// Writer: the runtime, when a task cannot go on at all (no entropy, config unwritable).
    pub fatal: Option<String>,
}

impl WorkerStatus {
    pub fn new(config: &Config) -> Self {
        Self {
            started_at: Utc::now(),
            api_base_url: config.api_base_url.clone(),
            registration: RegistrationState::from_config(config),
            registration_problem: None,
            next_registration_poll_at: None,
            connection: ConnectionStatus::default(),
            paused: pause_reason(config),
            settings_problem: None,
            fatal: None,
        }
    }

    /// The state the heartbeat reports.
    pub fn worker_state(&self) -> WorkerState {
        worker_state(self.paused)
    }
}

pub fn worker_state(paused: Option<PauseReason>) -> WorkerState {
    if paused.is_some() {
        WorkerState::Paused
    } else {
        WorkerState::Idle
    }
}

/// The reason to report when the worker is paused, by precedence (see [`PauseReason`]).
pub fn pause_reason(config: &Config) -> Option<PauseReason> {
    if config.pause.by_user {
        Some(PauseReason::User)
    } else if config.pause.by_studio {
        Some(PauseReason::Studio)
    } else {
        None
    }
}

/// How the last exchanges with the studio went. Writer: the heartbeat task.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionStatus {
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub next_heartbeat_at: Option<DateTime<Utc>>,
    pub heartbeats_sent: u64,
    /// Failed heartbeats since the last good one.
    pub consecutive_failures: u32,
    /// The last failure, in one line; cleared by a good heartbeat.
    pub last_error: Option<String>,
}

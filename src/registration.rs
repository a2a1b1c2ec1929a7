//! Password-less registration (studio-api.md §1) as a state machine over the config file.
//!
//! ```text
//! Pristine ──create──▶ Pending{request_id, since} ──poll──▶ Approved{worker_id}
//!    ▲                      │  │                                   │ heartbeat 401
//!    └── 404/401/403 ───────┘  └──▶ Rejected{reason}               ▼
//!    └──────────────── reset (person) ◀──────────────────────── Revoked
//! ```
//!
//! The state is not stored separately: it is *which registration fields of the config are
//! set* ([`RegistrationState::from_config`]), so a restart at any instant rebuilds it from disk.
//! [`Registrar::tick`] makes at most one HTTP round-trip and saves before it returns, and it
//! re-checks that the config still holds the state it acted on, so a reset made meanwhile is
//! never overwritten.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError, SharedConfig};
use crate::secret::{self, NoEntropy};
use crate::studio::protocol::{Capabilities, RegisterRequest, RegistrationDecision};
use crate::studio::{StudioClient, StudioError, USER_AGENT};
use crate::timing::Timing;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "state",
    rename_all = "snake_case",
    rename_all_fields = "camelCase"
)]
pub enum RegistrationState {
    /// No request yet (or the last one was forgotten by the studio).
    Pristine,
    /// Waiting for the studio's operator.
    Pending {
        request_id: String,
        since: Option<DateTime<Utc>>,
    },
    Approved {
        worker_id: String,
    },
    /// The operator said no. Only a reset by the person starts over.
    Rejected {
        reason: String,
    },
    /// The studio stopped accepting this worker's token (heartbeat 401).
    Revoked {
        worker_id: String,
    },
}

impl RegistrationState {
    pub fn from_config(config: &Config) -> Self {
        if let (Some(worker_id), Some(_)) = (&config.worker_id, &config.auth_token) {
            let worker_id = worker_id.clone();
            return if config.access_revoked {
                Self::Revoked { worker_id }
            } else {
                Self::Approved { worker_id }
            };
        }
        if let Some(reason) = &config.registration_rejected_reason {
            return Self::Rejected {
                reason: reason.clone(),
            };
        }
        if let (Some(request_id), Some(_)) =
            (&config.registration_request_id, &config.registration_secret)
        {
            return Self::Pending {
                request_id: request_id.clone(),
                since: config.registration_requested_at,
            };
        }
        Self::Pristine
    }

    /// States in which ticking does nothing until the person acts (or never, once approved).
    pub fn is_settled(&self) -> bool {
        matches!(
            self,
            Self::Approved { .. } | Self::Rejected { .. } | Self::Revoked { .. }
        )
    }

    /// One line for a person.
    pub fn describe(&self) -> String {
        match self {
            Self::Pristine => "not registered yet".to_owned(),
            Self::Pending { since, .. } => match since {
                Some(since) => format!(
                    "waiting for the studio to approve this PC (requested {})",
                    crate::human::ago(*since, Utc::now())
                ),
                None => "waiting for the studio to approve this PC".to_owned(),
            },
            Self::Approved { worker_id } => format!("approved as {worker_id}"),
            Self::Rejected { reason } => format!("rejected by the studio: {reason}"),
            Self::Revoked { .. } => {
                "access revoked by the studio; reset the registration to ask again".to_owned()
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error(transparent)]
    Studio(#[from] StudioError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    NoEntropy(#[from] NoEntropy),
}

/// What a tick left behind, and when the next one is due (`None`: nothing to do until the
/// person or the studio changes something).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TickOutcome {
    pub state: RegistrationState,
    pub next_tick: Option<Duration>,
}

impl TickOutcome {
    fn settled(state: RegistrationState) -> Self {
        Self {
            state,
            next_tick: None,
        }
    }
}

pub struct Registrar {
    client: StudioClient,
    config: SharedConfig,
    timing: Timing,
}

impl Registrar {
    pub fn new(client: StudioClient, config: SharedConfig, timing: Timing) -> Self {
        Self {
            client,
            config,
            timing,
        }
    }

    /// One step of the state machine: at most one HTTP round-trip; anything learnt is saved
    /// before this returns. On error nothing on disk has changed.
    pub async fn tick(
        &self,
        capabilities: &Capabilities,
    ) -> Result<TickOutcome, RegistrationError> {
        let config = self.config.snapshot();
        match RegistrationState::from_config(&config) {
            RegistrationState::Pristine => self.create_request(&config, capabilities).await,
            RegistrationState::Pending { request_id, .. } => {
                self.poll_request(&config, request_id).await
            }
            settled => Ok(TickOutcome::settled(settled)),
        }
    }

    async fn create_request(
        &self,
        config: &Config,
        capabilities: &Capabilities,
    ) -> Result<TickOutcome, RegistrationError> {
        // The install id and secret are saved before the first byte goes out, so a crash
        // mid-request retries with the same pair instead of orphaning a second one.
        let (install_id, registration_secret) =
            match (&config.install_id, &config.registration_secret) {
                (Some(install_id), Some(registration_secret)) => {
                    (install_id.clone(), registration_secret.clone())
                }
                _ => {
                    let install_id = match &config.install_id {
                        Some(install_id) => install_id.clone(),
                        None => secret::new_install_id()?,
                    };
                    let registration_secret = match &config.registration_secret {
                        Some(registration_secret) => registration_secret.clone(),
                        None => secret::new_registration_secret()?,
                    };
                    let (id, secret) = (install_id.clone(), registration_secret.clone());
                    self.config
                        .apply(move |c| {
                            c.install_id = Some(id);
                            c.registration_secret = Some(secret);
                        })
                        .await?;
                    (install_id, registration_secret)
                }
            };

        let body = RegisterRequest {
            install_id,
            registration_secret_hash: secret::sha256_hex(&registration_secret),
            user_agent: USER_AGENT.to_owned(),
            worker_name: config.worker_name.clone(),
            capabilities: capabilities.clone(),
        };
        let response = self.client.create_registration(&body).await?;
        let request_id = response.request_id;
        if let Err(err) = crate::studio::protocol::check_id(&request_id) {
            return Err(StudioError::Transient {
                reason: format!("the studio sent an unusable request id: {err}"),
                retry_after: None,
            }
            .into());
        }

        let now = Utc::now();
        let ours = request_id.clone();
        let state = self
            .config
            .apply(move |c| {
                // A reset while the request was in flight leaves the secret we used behind;
                // only then is the new request ours to keep.
                if c.registration_secret.as_ref() == Some(&registration_secret)
                    && RegistrationState::from_config(c) == RegistrationState::Pristine
                {
                    c.registration_request_id = Some(ours);
                    c.registration_requested_at = Some(now);
                }
                RegistrationState::from_config(c)
            })
            .await?;
        tracing::info!(request_id = %request_id, "asked the studio to approve this PC");
        Ok(TickOutcome {
            state,
            next_tick: Some(self.timing.poll_floor),
        })
    }

    async fn poll_request(
        &self,
        config: &Config,
        request_id: String,
    ) -> Result<TickOutcome, RegistrationError> {
        let Some(registration_secret) = &config.registration_secret else {
            // `from_config` only says Pending when both are set.
            return Ok(TickOutcome::settled(RegistrationState::from_config(config)));
        };
        let still_ours = {
            let request_id = request_id.clone();
            move |c: &Config| c.registration_request_id.as_deref() == Some(request_id.as_str())
        };

        match self
            .client
            .poll_registration(&request_id, registration_secret)
            .await
        {
            Ok(RegistrationDecision::Pending { poll_after_s }) => {
                let next = poll_after_s.map_or(self.timing.poll_default, Duration::from_secs);
                Ok(TickOutcome {
                    state: RegistrationState::from_config(config),
                    next_tick: Some(next.clamp(self.timing.poll_floor, self.timing.poll_cap)),
                })
            }
            Ok(RegistrationDecision::Approved {
                worker_id,
                auth_token,
            }) => {
                if let Err(err) = crate::studio::protocol::check_id(&worker_id) {
                    return Err(StudioError::Transient {
                        reason: format!("the studio sent an unusable worker id: {err}"),
                        retry_after: None,
                    }
                    .into());
                }
                if auth_token.is_empty() {
                    return Err(StudioError::Transient {
                        reason: "the studio approved this PC but sent an empty token".to_owned(),
                        retry_after: None,
                    }
                    .into());
                }
                let approved = worker_id.clone();
                let state = self
                    .config
                    .apply(move |c| {
                        if still_ours(c) {
                            c.reset_registration();
                            c.worker_id = Some(approved);
                            c.auth_token = Some(auth_token);
                        }
                        RegistrationState::from_config(c)
                    })
                    .await?;
                tracing::info!(worker_id = %worker_id, "the studio approved this PC");
                Ok(TickOutcome::settled(state))
            }
            Ok(RegistrationDecision::Rejected { reason }) => {
                let reason = reason
                    .map(|r| r.trim().to_owned())
                    .filter(|r| !r.is_empty())
                    .unwrap_or_else(|| "no reason given".to_owned());
                let rejected = reason.clone();
                let state = self
                    .config
                    .apply(move |c| {
                        if still_ours(c) {
                            c.reset_registration();
                            c.registration_rejected_reason = Some(rejected);
                        }
                        RegistrationState::from_config(c)
                    })
                    .await?;
                tracing::warn!(reason = %reason, "the studio rejected this PC");
                Ok(TickOutcome::settled(state))
            }
            Err(
                err @ (StudioError::NotFound { .. }
                | StudioError::Unauthorized
                | StudioError::Refused { status: 403, .. }),
            ) => {
                let state = self
                    .config
                    .apply(move |c| {
                        if still_ours(c) {
                            c.registration_request_id = None;
                            c.registration_secret = None;
                            c.registration_requested_at = None;
                        }
                        RegistrationState::from_config(c)
                    })
                    .await?;
                tracing::warn!(
                    "the studio no longer knows registration request {request_id} ({err}); asking again"
                );
                Ok(TickOutcome {
                    state,
                    next_tick: Some(self.timing.poll_floor),
                })
            }
            Err(err) => Err(err.into()),
        }
    }
}

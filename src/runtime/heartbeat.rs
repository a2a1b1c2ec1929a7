//! The heartbeat (studio-api.md §2): while approved, tell the studio this PC is alive, what it
//! is doing and what it can do; apply the studio's `pause`; stop for good on 401.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::outage::OutageLog;
use super::status::worker_state;
use super::{WorkerStatus, deadline_after, pause_reason, wait_until};
use crate::backoff::Backoff;
use crate::config::{Config, SharedConfig};
use crate::registration::RegistrationState;
use crate::studio::protocol::{Capabilities, Heartbeat, PauseReason, Stats};
use crate::studio::{Credentials, StudioClient, StudioError};
use crate::timing::Timing;

pub(super) async fn run(
    client: StudioClient,
    config: SharedConfig,
    status: Arc<watch::Sender<WorkerStatus>>,
    capabilities: Capabilities,
    timing: Timing,
    shutdown: CancellationToken,
) {
    let mut config_changes = config.subscribe();
    let mut backoff = Backoff::new(timing.backoff);
    let mut outage = OutageLog::new("heartbeat");

    loop {
        let snapshot = config.snapshot();
        let Some(credentials) = approved_credentials(&snapshot) else {
            status.send_modify(|s| s.connection.next_heartbeat_at = None);
            let approved = wait_until(None, &mut config_changes, &shutdown, |config| {
                approved_credentials(config).is_some()
            })
            .await;
            if !approved {
                return;
            }
            continue;
        };

        let paused = pause_reason(&snapshot);
        let started_at = status.borrow().started_at;
        let body = Heartbeat {
            state: worker_state(paused),
            paused_reason: paused,
            current_job_id: None,
            capabilities: capabilities.clone(),
            stats: Stats {
                uptime_s: (Utc::now() - started_at)
                    .num_seconds()
                    .max(0)
                    .unsigned_abs(),
                ..Stats::default()
            },
            sent_at: Utc::now(),
        };
        let reported_pause = body.paused_reason;

        let sent = tokio::select! {
            () = shutdown.cancelled() => return,
            sent = client.heartbeat(&credentials, &body) => sent,
        };
        let (delay, may_wake_early) = match sent {
            Ok(answer) => {
                backoff.reset();
                outage.recovered();
                if answer.pause != snapshot.pause.by_studio {
                    apply_studio_pause(&config, answer.pause);
                }
                status.send_modify(|s| {
                    s.connection.last_heartbeat_at = Some(Utc::now());
                    s.connection.heartbeats_sent += 1;
                    s.connection.consecutive_failures = 0;
                    s.connection.last_error = None;
                });
                let interval = answer
                    .next_heartbeat_s
                    .map_or(timing.heartbeat_default, Duration::from_secs)
                    .clamp(timing.heartbeat_floor, timing.heartbeat_cap);
                (interval, true)
            }
            Err(StudioError::Unauthorized) => {
                tracing::warn!(
                    worker_id = %credentials.worker_id,
                    "the studio revoked this worker's access; reset the registration to ask again"
                );
                if let Err(err) = config.update(|c| {
                    if c.worker_id.as_deref() == Some(credentials.worker_id.as_str()) {
                        c.access_revoked = true;
                    }
                }) {
                    tracing::error!("cannot record the revocation: {err}");
                }
                status.send_modify(|s| {
                    s.connection.last_error = Some("access revoked by the studio".to_owned());
                    s.connection.next_heartbeat_at = None;
                });
                // The loop head now finds no usable credentials and waits for a reset.
                continue;
            }
            Err(err) => {
                let delay = backoff.next_delay(err.retry_after());
                outage.failed(&err, delay);
                status.send_modify(|s| {
                    s.connection.consecutive_failures += 1;
                    s.connection.last_error = Some(err.to_string());
                });
                (delay, false)
            }
        };

        let (deadline, wall) = deadline_after(delay);
        status.send_modify(|s| s.connection.next_heartbeat_at = Some(wall));
        let worker_id = credentials.worker_id;
        let go_on = wait_until(Some(deadline), &mut config_changes, &shutdown, |config| {
            // Credentials gone (reset, revoked): go to the loop head at once. A pause or
            // resume is told to the studio at once too, unless we are backing off, where
            // the studio asked us to wait (Retry-After) or is down.
            let still_ours = matches!(
                RegistrationState::from_config(config),
                RegistrationState::Approved { worker_id: ref id } if *id == worker_id
            );
            !still_ours || (may_wake_early && pause_reason(config) != reported_pause)
        })
        .await;
        if !go_on {
            return;
        }
    }
}

fn approved_credentials(config: &Config) -> Option<Credentials> {
    match (RegistrationState::from_config(config), &config.auth_token) {
        (RegistrationState::Approved { worker_id }, Some(auth_token)) => Some(Credentials {
            worker_id,
            auth_token: auth_token.clone(),
        }),
        _ => None,
    }
}

fn apply_studio_pause(config: &SharedConfig, pause: bool) {
    match config.update(|c| c.pause.by_studio = pause) {
        Ok(()) if pause => tracing::info!("{}", PauseReason::Studio.describe()),
        Ok(()) => tracing::info!("the studio lifted its pause"),
        Err(err) => tracing::error!("cannot record the studio's pause: {err}"),
    }
}

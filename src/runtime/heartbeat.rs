//! The heartbeat (studio-api.md §2): while approved, tell the studio this PC is alive, what it
//! is doing and what it can do; apply the studio's `pause`; stop for good on 401.

use std::time::Duration;

use chrono::Utc;

use super::outage::OutageLog;
use super::status::worker_state;
use super::{TaskContext, approved_credentials, deadline_after, pause_reason, wait_until};
use crate::backoff::Backoff;
use crate::config::SharedConfig;
use crate::registration::RegistrationState;
use crate::studio::StudioError;
use crate::studio::protocol::{Heartbeat, Stats};
use crate::vocab::pause::PauseReason;

pub(super) async fn run(context: TaskContext) {
    let TaskContext {
        client,
        config,
        status,
        timing,
        shutdown,
        ..
    } = context.clone();
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
        let capabilities = context.capabilities();
        let body = {
            let current = status.borrow();
            let counters = &current.jobs.counters;
            Heartbeat {
                state: worker_state(
                    paused,
                    current.jobs.current.is_some(),
                    capabilities.models.iter().any(|model| model.ready),
                ),
                paused_reason: paused,
                current_job_id: current.jobs.current.as_ref().map(|job| job.job_id.clone()),
                capabilities,
                stats: Stats {
                    uptime_s: (Utc::now() - current.started_at)
                        .num_seconds()
                        .max(0)
                        .unsigned_abs(),
                    jobs_completed: counters.jobs_completed,
                    jobs_failed: counters.jobs_failed,
                    images_generated: counters.images_generated,
                    last_job_ms: counters.last_job_ms,
                },
                sent_at: Utc::now(),
            }
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
                context.revoked(&credentials.worker_id);
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

fn apply_studio_pause(config: &SharedConfig, pause: bool) {
    match config.update(|c| c.pause.by_studio = pause) {
        Ok(()) if pause => tracing::info!("{}", PauseReason::Studio.describe()),
        Ok(()) => tracing::info!("the studio lifted its pause"),
        Err(err) => tracing::error!("cannot record the studio's pause: {err}"),
    }
}

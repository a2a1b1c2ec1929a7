//! The heartbeat (studio-api.md §2): while approved, tell the studio this PC is alive, what it
//! is doing and what it can do; apply the studio's `pause`; stop for good on 401.
//!
//! Everything it sends comes from the tasks' own channels (the running job's id, the tally,
//! the capabilities), never from the window's status.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::capabilities::CapabilitySource;
use super::outage::OutageLog;
use super::session::Session;
use super::signals::Tally;
use super::{StatusSender, changed, deadline_after, pause_reason, wait_until};
use crate::backoff::Backoff;
use crate::config::SharedConfig;
use crate::policy::Decision;
use crate::registration::RegistrationState;
use crate::studio::protocol::{Heartbeat, Stats, WorkerState};
use crate::studio::{StudioClient, StudioError};
use crate::timing::Timing;
use crate::vocab::pause::PauseReason;

pub(super) struct HeartbeatTask {
    pub client: StudioClient,
    pub config: SharedConfig,
    pub capabilities: CapabilitySource,
    /// Owner: the job loop.
    pub current_job: watch::Receiver<Option<String>>,
    /// Owner: the policy task (its automatic pause is reported as `pausedReason`).
    pub policy: watch::Receiver<Decision>,
    /// Owners: the job loop and the uploader.
    pub tally: Arc<Tally>,
    pub status: StatusSender,
    pub timing: Timing,
    pub shutdown: CancellationToken,
}

pub(super) async fn run(task: HeartbeatTask) {
    let HeartbeatTask {
        client,
        config,
        capabilities,
        current_job,
        mut policy,
        tally,
        status,
        timing,
        shutdown,
    } = task;
    let started_at = Utc::now();
    let mut config_changes = config.subscribe();
    let mut backoff = Backoff::new(timing.backoff);
    let mut outage = OutageLog::new("heartbeat");

    loop {
        let snapshot = config.snapshot();
        let Some(session) = Session::current(&client, &config) else {
            status.send_modify(|s| s.connection.next_heartbeat_at = None);
            let approved = wait_until(None, &mut config_changes, &shutdown, |config| {
                matches!(
                    RegistrationState::from_config(config),
                    RegistrationState::Approved { .. }
                )
            })
            .await;
            if !approved {
                return;
            }
            continue;
        };

        let paused = pause_reason(&snapshot, &policy.borrow_and_update());
        let capabilities = capabilities.capabilities();
        let current_job_id = current_job.borrow().clone();
        let counters = tally.counters();
        let body = Heartbeat {
            state: worker_state(
                paused,
                current_job_id.is_some(),
                capabilities.models.iter().any(|model| model.ready),
            ),
            paused_reason: paused,
            current_job_id,
            capabilities,
            stats: Stats {
                uptime_s: (Utc::now() - started_at)
                    .num_seconds()
                    .max(0)
                    .unsigned_abs(),
                jobs_completed: counters.jobs_completed,
                jobs_failed: counters.jobs_failed,
                images_generated: counters.images_generated,
                last_job_ms: counters.last_job_ms,
            },
            sent_at: Utc::now(),
        };
        let reported_pause = body.paused_reason;

        let sent = tokio::select! {
            () = shutdown.cancelled() => return,
            sent = session.heartbeat(&body) => sent,
        };
        let (delay, may_wake_early) = match sent {
            Ok(answer) => {
                backoff.reset();
                outage.recovered();
                if answer.pause != snapshot.pause.by_studio {
                    apply_studio_pause(&config, answer.pause).await;
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
                // The session recorded it; the loop head now finds no usable credentials and
                // waits for a reset.
                status.send_modify(|s| {
                    s.connection.last_error = Some("access revoked by the studio".to_owned());
                    s.connection.next_heartbeat_at = None;
                });
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
        let worker_id = session.worker_id().to_owned();
        let woken = {
            let policy_now = policy.clone();
            let config_wait =
                wait_until(Some(deadline), &mut config_changes, &shutdown, |config| {
                    // Credentials gone (reset, revoked): go to the loop head at once. A pause or
                    // resume is told to the studio at once too, unless we are backing off, where
                    // the studio asked us to wait (Retry-After) or is down.
                    let still_ours = matches!(
                        RegistrationState::from_config(config),
                        RegistrationState::Approved { worker_id: ref id } if *id == worker_id
                    );
                    !still_ours
                        || (may_wake_early
                            && pause_reason(config, &policy_now.borrow()) != reported_pause)
                });
            // The policy pausing or resuming by itself is news too.
            let policy_wait = async {
                loop {
                    changed(&mut policy).await;
                    if may_wake_early
                        && pause_reason(&config.snapshot(), &policy.borrow()) != reported_pause
                    {
                        return;
                    }
                }
            };
            tokio::select! {
                go_on = config_wait => go_on,
                () = policy_wait => true,
            }
        };
        if !woken {
            return;
        }
    }
}

/// §2's `state`: a running job is `busy` even while it is being handed back after a pause.
fn worker_state(paused: Option<PauseReason>, busy: bool, models_ready: bool) -> WorkerState {
    if busy {
        WorkerState::Busy
    } else if paused.is_some() {
        WorkerState::Paused
    } else if !models_ready {
        WorkerState::Loading
    } else {
        WorkerState::Idle
    }
}

/// The studio's pause holds in memory even when it cannot be saved.
async fn apply_studio_pause(config: &SharedConfig, pause: bool) {
    let (_, saved) = config
        .apply_even_unsaved(move |c| c.pause.by_studio = pause)
        .await;
    if pause {
        tracing::info!("{}", PauseReason::Studio.describe());
    } else {
        tracing::info!("the studio lifted its pause");
    }
    if let Err(err) = saved {
        tracing::error!("the studio's pause holds, but cannot be saved: {err}");
    }
}

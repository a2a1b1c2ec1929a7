//! The policy task: reads the probes (on the blocking pool: X11 round trips, NVML, sysfs),
//! asks [`Policy::decide`], and publishes the decision. Every second while the worker may
//! take jobs (a game must stop it within 2 s), every few seconds while it is paused anyway
//! (only the Status tab is waiting then). The whole process list is walked only while the
//! person's "always pause for" list has entries, and then only every few readings.

use std::sync::Arc;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::StatusSender;
use crate::config::SharedConfig;
use crate::platform::probes::Probes;
use crate::policy::{Decision, Policy, Readings};
use crate::timing::Timing;

/// The process list is read every this many readings (when it is read at all).
const PROGRAM_LIST_EVERY: u32 = 5;

pub(super) struct PolicyTask {
    pub config: SharedConfig,
    pub probes: Probes,
    /// Rung by the commands task when the person presses Resume.
    pub resumed: Arc<Notify>,
    /// Owner: this task.
    pub decision: watch::Sender<Decision>,
    pub status: StatusSender,
    pub timing: Timing,
    pub shutdown: CancellationToken,
}

pub(super) async fn run(task: PolicyTask) {
    let PolicyTask {
        config,
        probes,
        resumed,
        decision,
        status,
        timing,
        shutdown,
    } = task;
    let mut policy = Policy::new();
    let mut probes = Some(probes);
    let mut readings = Readings::default();
    let mut count = 0_u32;
    let mut blind_logged = Vec::new();
    let mut config_changes = config.subscribe();
    loop {
        let settings = config.snapshot();
        let wants_programs = !settings.policy.always_pause_for.is_empty()
            && count.is_multiple_of(PROGRAM_LIST_EVERY);
        count = count.wrapping_add(1);
        if let Some(mut taken) = probes.take() {
            let read = tokio::task::spawn_blocking(move || {
                let mut fresh = Readings {
                    gpu: taken.gpu.read(),
                    full_screen: taken.foreground.full_screen(),
                    idle: taken.idle.idle_for(),
                    on_battery: taken.power.on_battery(),
                    programs: Err(crate::platform::probes::Unavailable(
                        "not read this time".to_owned(),
                    )),
                };
                if wants_programs {
                    fresh.programs = taken.programs.running();
                }
                (taken, fresh)
            })
            .await;
            match read {
                Ok((taken, fresh)) => {
                    probes = Some(taken);
                    let programs = std::mem::replace(&mut readings.programs, Ok(Vec::new()));
                    readings = Readings {
                        // The process list is kept between its (rarer) readings.
                        programs: if wants_programs {
                            fresh.programs
                        } else {
                            programs
                        },
                        ..fresh
                    };
                }
                Err(err) => {
                    // A probe panicked: the policy goes on without probes, saying so.
                    tracing::error!("the policy's probes stopped: {err}");
                    readings = Readings::default();
                }
            }
        }
        let decided = policy.decide(
            &settings.policy,
            &readings,
            std::time::Instant::now(),
            chrono::Local::now().naive_local(),
        );
        for (signal, why) in &decided.blind {
            if !blind_logged.contains(signal) {
                blind_logged.push(*signal);
                tracing::info!("policy: {signal:?} is not watched here: {why}");
            }
        }
        let changed_reason = decision.borrow().pause.as_ref().map(|pause| pause.reason)
            != decided.pause.as_ref().map(|pause| pause.reason);
        if changed_reason {
            match &decided.pause {
                Some(pause) => tracing::info!("pausing: {} ({})", pause.detail, pause.resumes),
                None => tracing::info!("the policy lets the worker run again"),
            }
        }
        decision.send_if_modified(|current| {
            let changed = *current != decided;
            if changed {
                current.clone_from(&decided);
            }
            changed
        });
        status.send_if_modified(|s| {
            let changed = s.policy != decided;
            if changed {
                s.policy = decided.clone();
            }
            changed
        });

        // Paused by the person or the studio: nothing can start a job, so look less often.
        let tick = if settings.pause.by_user || settings.pause.by_studio {
            timing.policy_paused_tick
        } else {
            timing.policy_tick
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(tick) => {}
            () = resumed.notified() => policy.resume(),
            changed = config_changes.changed() => if changed.is_err() { return },
        }
    }
}

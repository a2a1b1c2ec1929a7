//! The task that drives [`Registrar::tick`] until the studio has decided, then sleeps until
//! the person resets the registration.

use tokio_util::sync::CancellationToken;

use super::StatusSender;
use super::capabilities::CapabilitySource;
use super::outage::OutageLog;
use super::signals::{HostRequestSender, StopRequest};
use super::{deadline_after, wait_until};
use crate::backoff::Backoff;
use crate::config::SharedConfig;
use crate::registration::{Registrar, RegistrationError, RegistrationState};
use crate::timing::Timing;

pub(super) struct RegistrationTask {
    pub registrar: Registrar,
    pub capabilities: CapabilitySource,
    pub config: SharedConfig,
    pub status: StatusSender,
    /// Told when registration cannot go on at all (no entropy).
    pub host: HostRequestSender,
    pub timing: Timing,
    pub shutdown: CancellationToken,
}

pub(super) async fn run(task: RegistrationTask) {
    let RegistrationTask {
        registrar,
        capabilities,
        config,
        status,
        host,
        timing,
        shutdown,
    } = task;
    let mut config_changes = config.subscribe();
    let mut backoff = Backoff::new(timing.backoff);
    let mut outage = OutageLog::new("registration");
    let mut last_refusal: Option<String> = None;

    loop {
        let before = RegistrationState::from_config(&config.snapshot());
        let delay = if before.is_settled() {
            None
        } else {
            let capabilities = capabilities.capabilities();
            let ticked = tokio::select! {
                () = shutdown.cancelled() => return,
                ticked = registrar.tick(&capabilities) => ticked,
            };
            match ticked {
                Ok(outcome) => {
                    backoff.reset();
                    outage.recovered();
                    last_refusal = None;
                    status.send_modify(|s| s.registration_problem = None);
                    outcome.next_tick
                }
                Err(RegistrationError::Studio(err)) if err.is_transient() => {
                    let delay = backoff.next_delay(err.retry_after());
                    outage.failed(&err, delay);
                    status.send_modify(|s| s.registration_problem = Some(err.to_string()));
                    Some(delay)
                }
                Err(RegistrationError::Studio(err)) => {
                    // The studio understood and refused (a 4xx on create): tell the person,
                    // try again no sooner than the next poll interval (§1.1).
                    let message = err.to_string();
                    if last_refusal.as_ref() != Some(&message) {
                        tracing::warn!("registration: {message}");
                        last_refusal = Some(message.clone());
                    }
                    status.send_modify(|s| s.registration_problem = Some(message));
                    Some(timing.refused_retry)
                }
                Err(RegistrationError::Config(err)) => {
                    let delay = backoff.next_delay(None);
                    tracing::error!("registration: {err}");
                    status.send_modify(|s| s.registration_problem = Some(err.to_string()));
                    Some(delay)
                }
                Err(RegistrationError::NoEntropy(err)) => {
                    tracing::error!("{err}");
                    status.send_modify(|s| s.fatal = Some(err.to_string()));
                    host.stop(StopRequest::Fatal(err.to_string()));
                    return;
                }
            }
        };

        let after = RegistrationState::from_config(&config.snapshot());
        let deadline = delay.map(deadline_after);
        status.send_modify(|s| s.next_registration_poll_at = deadline.map(|(_, wall)| wall));
        // Our own saves are not news; a change to the registration made by someone else (a
        // reset, typically) is, and is acted on at once.
        let go_on = wait_until(
            deadline.map(|(instant, _)| instant),
            &mut config_changes,
            &shutdown,
            |config| RegistrationState::from_config(config) != after,
        )
        .await;
        if !go_on {
            return;
        }
    }
}

//! What a person (window, tray, CLI) can ask of the runtime, and the task that applies it.
//!
//! Commands flow one way: every view sends the same [`Command`] values, this task saves the
//! change through [`SharedConfig::update`], and the change reaches every view (and the other
//! tasks) through the config and status channels. There is one place where "pause" means
//! something.

use tokio::sync::mpsc;

use super::TaskContext;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// The person wants the GPU back: stop taking jobs.
    Pause,
    /// Take jobs again. A pause the studio asked for stays until the studio lifts it.
    Resume,
    /// Forget the studio's side of the registration and ask for approval again.
    ResetRegistration,
}

pub(super) async fn run(mut commands: mpsc::Receiver<Command>, context: TaskContext) {
    let TaskContext {
        config,
        status,
        shutdown,
        ..
    } = context;
    loop {
        let command = tokio::select! {
            () = shutdown.cancelled() => return,
            command = commands.recv() => match command {
                Some(command) => command,
                None => return,
            },
        };
        let applied = match &command {
            Command::Pause => config.update(|c| c.pause.by_user = true),
            Command::Resume => config.update(|c| c.pause.by_user = false),
            Command::ResetRegistration => config.update(|c| c.reset_registration()),
        };
        match applied {
            Ok(()) => {
                tracing::info!(?command, "applied");
                status.send_modify(|s| s.settings_problem = None);
            }
            Err(err) => {
                tracing::error!(?command, "not applied: {err}");
                status.send_modify(|s| s.settings_problem = Some(err.to_string()));
            }
        }
    }
}

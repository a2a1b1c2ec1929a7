//! The operating system asking the worker to stop: Ctrl-C, or SIGTERM on Unix (what `kill`,
//! systemd and a logout send).

/// Ctrl-C, or SIGTERM on Unix (what `kill`, systemd and a logout send).
///
/// [`ShutdownSignal::install`] registers the handlers at once, so call it before any work
/// starts: a signal that arrives before anyone waits is kept, not met by the default action
/// (which would kill the process without handing back a running job).
pub struct ShutdownSignal {
    #[cfg(unix)]
    unix: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl ShutdownSignal {
    /// Must be called inside a tokio runtime.
    pub fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let unix = match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(terminate), Ok(interrupt)) => Some((terminate, interrupt)),
                (Err(err), _) | (_, Err(err)) => {
                    tracing::warn!("cannot watch for SIGTERM/SIGINT: {err}");
                    None
                }
            };
            Self { unix }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    /// Resolves when a shutdown signal arrived (or at once, if one already did).
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        match &mut self.unix {
            Some((terminate, interrupt)) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
            }
            None => std::future::pending().await,
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("stopping");
    }
}

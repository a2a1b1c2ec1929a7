//! The desktop app: an egui window (Status, Jobs, Settings) over the same runtime the
//! headless worker runs, and a tray icon whose menu pauses and resumes generation.
//!
//! [`run`] owns the threads: the main thread runs eframe's event loop (the window, and the
//! tray on Windows/macOS), a tokio runtime runs the worker's tasks, and one task there wakes
//! the UI whenever the worker's status changes, so a hidden window costs nothing until
//! something happens.

mod app;
mod jobs_tab;
mod policy_settings;
mod settings_tab;
mod status_tab;
mod thumbnail_cache;

use anyhow::Context as _;

pub use app::{Tab, WorkerApp};

use crate::config::{BrokenConfig, SharedConfig};
use crate::runtime::{Launch, RestartRequest, Runtime, StopRequest};
use crate::tray::{Tray, TrayView};

pub struct AppOptions {
    pub data_dir: std::path::PathBuf,
    pub api_base_override: Option<String>,
    pub recovered_config: Option<BrokenConfig>,
    /// Start hidden in the tray (used for start at login).
    pub minimized: bool,
}

/// Runs the worker with its window and tray until the person quits, then shuts the worker
/// down (handing back a running job). A restart the runtime asked for (the GPU stopped
/// working) is returned, for `cli` to run once everything is released.
pub fn run(config: SharedConfig, options: AppOptions) -> anyhow::Result<Option<RestartRequest>> {
    start_at_login_once(&config);
    let tokio = crate::runtime::tokio_runtime().context("cannot start the async runtime")?;
    let (runtime, mut shutdown) = {
        let _entered = tokio.enter();
        let shutdown = crate::runtime::ShutdownSignal::install();
        let runtime = Runtime::launch(
            config,
            Launch {
                data_dir: options.data_dir,
                api_base_override: options.api_base_override,
                recovered_config: options.recovered_config,
                with_window: true,
            },
        )?;
        (runtime, shutdown)
    };
    let handle = runtime.handle();
    let requests = handle.requests().clone();
    let tokio_handle = tokio.handle().clone();

    let app_icon = crate::tray::decode_rgba(include_bytes!("../../assets/icons/app-256.png"));
    let viewport = egui::ViewportBuilder::default()
        .with_title("studio-worker")
        .with_app_id("gg.minis.studio-worker")
        .with_inner_size([720.0, 560.0])
        .with_min_inner_size([480.0, 360.0])
        .with_icon(egui::IconData {
            width: app_icon.width(),
            height: app_icon.height(),
            rgba: app_icon.into_raw(),
        });
    let native_options = eframe::NativeOptions {
        viewport,
        ..eframe::NativeOptions::default()
    };

    let result = eframe::run_native(
        "studio-worker",
        native_options,
        Box::new(move |creation| {
            let ctx = creation.egui_ctx.clone();
            // The app's look follows the system's light/dark setting.
            ctx.set_theme(egui::ThemePreference::System);

            // Status changes and the runtime's requests wake the UI, even while it is hidden.
            let mut status = handle.subscribe();
            let mut requests = handle.requests().clone();
            let wake = ctx.clone();
            tokio_handle.spawn(async move {
                loop {
                    tokio::select! {
                        changed = status.changed() => if changed.is_err() { return },
                        () = requests.changed() => {}
                    }
                    wake.request_repaint();
                }
            });

            // The tray is created here, on the event-loop thread, once the loop runs (macOS
            // and Windows require it).
            let (sender, receiver) = std::sync::mpsc::channel();
            // Logout and `kill` (SIGTERM), or Ctrl-C in a terminal, quit like the tray's Quit:
            // the running job is handed back before the process ends.
            let quit = sender.clone();
            let quit_ctx = ctx.clone();
            tokio_handle.spawn(async move {
                shutdown.recv().await;
                let _ = quit.send(crate::tray::TrayEvent::Quit);
                quit_ctx.request_repaint();
            });
            crate::tray::forward_events(sender, ctx.clone());
            let (tray, notice) = match Tray::new(&TrayView::from_status(&handle.status())) {
                Ok(tray) => (Some(tray), None),
                Err(err) => {
                    tracing::warn!("no tray icon: {err}");
                    (
                        None,
                        Some(
                            "This desktop has no tray: closing the window quits the worker."
                                .to_owned(),
                        ),
                    )
                }
            };
            Ok(Box::new(WorkerApp::new(
                handle,
                tray,
                Some(receiver),
                notice,
                options.minimized,
            )))
        }),
    );

    let restart = match requests.stop_request() {
        Some(StopRequest::Restart(restart)) => Some(restart),
        _ => None,
    };
    tokio.block_on(runtime.shutdown());
    result.map_err(|err| anyhow::anyhow!("the window could not run: {err}"))?;
    Ok(restart)
}

/// Turns start-at-login on the first time the app starts for this person, and never again
/// (so turning it off in Settings sticks): what installers do, done by the app itself.
fn start_at_login_once(config: &SharedConfig) {
    if config.snapshot().ui.start_at_login_default_applied {
        return;
    }
    match crate::platform::autostart::set_enabled(true) {
        Ok(()) => tracing::info!(
            "studio-worker now starts when you log in (Settings → Start at login turns it off)"
        ),
        Err(err) => tracing::warn!("could not turn on start at login: {err}"),
    }
    if let Err(err) = config.update(|c| c.ui.start_at_login_default_applied = true) {
        tracing::warn!("could not remember that start at login was set up: {err}");
    }
}

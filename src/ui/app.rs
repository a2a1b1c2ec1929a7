//! The window: view state only. `logic()` applies what arrived (tray clicks, status changes,
//! a close request); `ui()` draws the tabs from a status snapshot and sends commands. Nothing
//! here blocks: every change goes to the runtime as a [`Command`].

use std::sync::mpsc::Receiver;
use std::time::Duration;

use super::{jobs_tab, settings_tab, status_tab};
use crate::runtime::{Command, CommandOutcome, RuntimeHandle, StopRequest, WorkerStatus};
use crate::tray::{PauseToggle, Tray, TrayEvent, TrayView};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tab {
    Status,
    Jobs,
    Settings,
}

/// A command a tab asks for; the app sends it (and keeps what it means for the view).
#[derive(Debug)]
pub enum UiAction {
    Send(Command),
    /// Send a command whose outcome the tab shows: it keeps the receiver and polls it.
    Ask(Command, tokio::sync::oneshot::Sender<CommandOutcome>),
    ShowTab(Tab),
    /// Show a saved image in the person's default viewer.
    OpenFile(std::path::PathBuf),
}

/// A command sent with its outcome awaited by a tab: polled each frame, never waited on.
#[derive(Debug)]
pub struct PendingOutcome(tokio::sync::oneshot::Receiver<CommandOutcome>);

impl PendingOutcome {
    /// Sends `command` (through the app) and keeps where its outcome arrives.
    pub fn ask(command: Command, actions: &mut Vec<UiAction>) -> Self {
        let (outcome, receiver) = tokio::sync::oneshot::channel();
        actions.push(UiAction::Ask(command, outcome));
        Self(receiver)
    }

    /// The outcome, once the runtime has applied the command. A runtime that dropped it
    /// (stopped, or too far behind to queue it) says so as a failure.
    pub fn poll(&mut self) -> Option<CommandOutcome> {
        use tokio::sync::oneshot::error::TryRecvError;
        match self.0.try_recv() {
            Ok(outcome) => Some(outcome),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Closed) => Some(Err(
                "the worker is not answering; try again in a moment".to_owned(),
            )),
        }
    }
}

pub struct WorkerApp {
    runtime: RuntimeHandle,
    tab: Tab,
    /// The last status snapshot, replaced only when the runtime published a new one.
    status: WorkerStatus,
    status_updates: tokio::sync::watch::Receiver<WorkerStatus>,
    settings: settings_tab::SettingsForm,
    status_view: status_tab::StatusView,
    tray: Option<Tray>,
    tray_events: Option<Receiver<TrayEvent>>,
    /// Said once at the top of the window ("no tray", "still running in the tray").
    notice: Option<String>,
    quitting: bool,
    /// `--minimized`: hide (or minimise, without a tray) on the first frame.
    start_hidden: bool,
    /// The raise requests already acted on (see `HostRequests::window_raises`).
    raised: u64,
    thumbnails: super::thumbnail_cache::ThumbnailCache,
    jobs_view: jobs_tab::JobsView,
    /// The app hid its window (to the tray). Tracked here because while hidden eframe only
    /// has the last shown frame's viewport info.
    hidden: bool,
}

impl WorkerApp {
    /// `tray` and `tray_events` come from the start path (`ui::run`); tests pass `None` and
    /// never touch the process-wide tray handlers.
    pub fn new(
        runtime: RuntimeHandle,
        tray: Option<Tray>,
        tray_events: Option<Receiver<TrayEvent>>,
        notice: Option<String>,
        start_hidden: bool,
    ) -> Self {
        let mut status_updates = runtime.subscribe();
        let raised = runtime.requests().window_raises();
        let status = status_updates.borrow_and_update().clone();
        let settings = settings_tab::SettingsForm::from_config(
            &runtime.config().snapshot(),
            crate::platform::autostart::is_enabled(),
        );
        Self {
            runtime,
            tab: Tab::Status,
            settings,
            status_view: status_tab::StatusView::default(),
            tray,
            tray_events,
            notice,
            quitting: false,
            start_hidden,
            raised,
            status,
            status_updates,
            thumbnails: super::thumbnail_cache::ThumbnailCache::default(),
            jobs_view: jobs_tab::JobsView::default(),
            hidden: false,
        }
    }

    pub fn tab(&self) -> Tab {
        self.tab
    }

    /// How many preview files the Jobs tab has read (each once, however many frames).
    pub fn thumbnail_loads(&self) -> usize {
        self.thumbnails.loads_started()
    }

    /// Takes a fresh status snapshot and applies tray clicks. Returns the viewport commands
    /// the platform should carry out (kept separate so tests can run it without a window).
    pub fn apply(&mut self) -> Vec<egui::ViewportCommand> {
        // Copied only when it changed: a frame without news costs no clone.
        if self.status_updates.has_changed().unwrap_or(false) {
            self.status = self.status_updates.borrow_and_update().clone();
        }
        let mut viewport = Vec::new();
        let mut open = false;
        let raises = self.runtime.requests().window_raises();
        if raises > self.raised {
            // A second launch: show this window instead of starting another worker.
            self.raised = raises;
            open = true;
        }
        let mut events: Vec<TrayEvent> = self
            .tray_events
            .as_ref()
            .map(|events| events.try_iter().collect())
            .unwrap_or_default();
        if matches!(
            self.runtime.requests().stop_request(),
            Some(StopRequest::Quit | StopRequest::Restart(_))
        ) && !self.quitting
        {
            // `studio-worker quit` (an installer about to replace the program), or the GPU
            // stopped working and the worker starts again (`ui::run` does that once the
            // window is gone): as the tray's Quit.
            events.push(TrayEvent::Quit);
        }
        for event in events {
            match event {
                TrayEvent::TogglePause => {
                    let command = match TrayView::from_status(&self.status).toggle {
                        PauseToggle::Pause => Command::Pause,
                        PauseToggle::Resume => Command::Resume,
                    };
                    self.send(command);
                }
                TrayEvent::Open => open = true,
                TrayEvent::Quit => {
                    self.quitting = true;
                    viewport.push(egui::ViewportCommand::Close);
                }
            }
        }
        if open {
            self.hidden = false;
            viewport.push(egui::ViewportCommand::Visible(true));
            viewport.push(egui::ViewportCommand::Minimized(false));
            viewport.push(egui::ViewportCommand::Focus);
        }
        if let Some(tray) = &mut self.tray {
            tray.update(&TrayView::from_status(&self.status));
        }
        viewport
    }

    /// The window's contents (everything `ui()` draws), for the app and for tests.
    pub fn contents_ui(&mut self, ui: &mut egui::Ui) {
        self.thumbnails.receive(ui.ctx());
        let mut actions = Vec::new();
        egui::Panel::top("tabs").show(ui, |ui| {
            ui.add_space(4.0);
            ui.horizontal(|ui| {
                for (tab, label) in [
                    (Tab::Status, "Status"),
                    (Tab::Jobs, "Jobs"),
                    (Tab::Settings, "Settings"),
                ] {
                    if ui.selectable_label(self.tab == tab, label).clicked() {
                        actions.push(UiAction::ShowTab(tab));
                    }
                }
            });
            if let Some(notice) = &self.notice {
                ui.label(notice.as_str());
            }
            ui.add_space(2.0);
        });
        egui::CentralPanel::default().show(ui, |ui| {
            egui::ScrollArea::vertical().show(ui, |ui| match self.tab {
                Tab::Status => {
                    status_tab::status_tab_ui(ui, &self.status, &mut self.status_view, &mut actions)
                }
                Tab::Jobs => jobs_tab::jobs_tab_ui(
                    ui,
                    &self.status,
                    &mut self.thumbnails,
                    &mut self.jobs_view,
                    &mut actions,
                ),
                Tab::Settings => {
                    let config = self.runtime.config().snapshot();
                    settings_tab::settings_tab_ui(
                        ui,
                        &mut self.settings,
                        &config,
                        &self.status,
                        &mut actions,
                    )
                }
            });
        });
        for action in actions {
            match action {
                UiAction::Send(command) => self.send(command),
                UiAction::Ask(command, outcome) => self.runtime.ask(command, outcome),
                UiAction::ShowTab(tab) => self.tab = tab,
                UiAction::OpenFile(path) => {
                    if let Err(err) = crate::platform::open::open_path(&path) {
                        self.notice = Some(format!("Cannot open {}: {err}", path.display()));
                    }
                }
            }
        }
    }

    fn send(&mut self, command: Command) {
        if !self.runtime.send(command) {
            self.notice = Some("The worker is not answering; try again in a moment.".to_owned());
        }
    }

    /// How soon to draw again without news. Status changes wake the UI by themselves (see
    /// `ui::run`); a shown window also needs a slow tick for relative times ("12 s ago") and
    /// a running job's progress. Hidden or minimised: no tick at all, so ~0 CPU.
    pub fn tick(&self, minimized: Option<bool>) -> Option<Duration> {
        if self.hidden || minimized == Some(true) {
            None
        } else if self.status.jobs.current.is_some() {
            Some(Duration::from_millis(250))
        } else {
            Some(Duration::from_secs(1))
        }
    }

    /// Puts the window away while the tray stays. Wayland gives clients no way to hide a
    /// window and show it again (winit ignores it, and the window could be lost), so there it
    /// is minimised instead.
    fn hide(&mut self, ctx: &egui::Context) {
        if on_wayland() {
            ctx.send_viewport_cmd(egui::ViewportCommand::Minimized(true));
        } else {
            ctx.send_viewport_cmd(egui::ViewportCommand::Visible(false));
            self.hidden = true;
        }
    }

    /// Close button: hide to the tray (if there is one and the setting says so), else quit.
    fn on_close_requested(&mut self, ctx: &egui::Context) {
        let config = self.runtime.config().snapshot();
        if self.quitting || self.tray.is_none() || !config.ui.close_to_tray {
            return; // really closing: `ui::run` shuts the runtime down after the loop
        }
        ctx.send_viewport_cmd(egui::ViewportCommand::CancelClose);
        self.hide(ctx);
        if !config.ui.close_hint_shown {
            self.notice = Some(
                "studio-worker keeps running in the tray; use Quit in the tray menu to stop it."
                    .to_owned(),
            );
            self.send(Command::CloseHintShown);
        }
    }
}

impl eframe::App for WorkerApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        if std::mem::take(&mut self.start_hidden) {
            // A root window cannot be created hidden everywhere: hide it on the first frame,
            // into the tray, or minimised when there is no tray to bring it back from.
            if self.tray.is_some() {
                self.hide(ctx);
            } else {
                ctx.send_viewport_cmd(egui::ViewportCommand::Minimized(true));
            }
        }
        for command in self.apply() {
            ctx.send_viewport_cmd(command);
        }
        if ctx.input(|input| input.viewport().close_requested()) {
            self.on_close_requested(ctx);
        }
        let minimized = ctx.input(|input| input.viewport().minimized);
        if let Some(tick) = self.tick(minimized) {
            ctx.request_repaint_after(tick);
        }
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.contents_ui(ui);
    }
}

/// Whether winit runs on Wayland here: on Linux it prefers Wayland whenever a Wayland
/// display is offered.
fn on_wayland() -> bool {
    cfg!(all(unix, not(target_os = "macos")))
        && std::env::var_os("WAYLAND_DISPLAY").is_some_and(|display| !display.is_empty())
}

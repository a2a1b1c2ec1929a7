//! The tray icon: what it shows in each state ([`TrayView::from_status`], a pure function
//! tested without a display), and the platform glue that puts it on screen ([`Tray`]) and
//! forwards its clicks ([`forward_events`]).
//!
//! On Linux the icon is tray-icon's `ksni` backend (StatusNotifierItem over D-Bus on its own
//! thread: no GTK loop, no libappindicator). On Windows and macOS it must be created on the
//! event-loop thread once the loop runs, which is why the window creates it in its
//! `AppCreator`.

use tray_icon::menu::{Menu, MenuEvent, MenuId, MenuItem, PredefinedMenuItem};
use tray_icon::{MouseButton, MouseButtonState, TrayIcon, TrayIconBuilder, TrayIconEvent};

use crate::registration::RegistrationState;
use crate::runtime::WorkerStatus;
use crate::vocab::pause::PauseReason;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrayIconKind {
    Working,
    Idle,
    Paused,
    /// Waiting for approval, rejected, revoked, or the studio is unreachable.
    Attention,
}

/// The pause item's meaning in the current state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseToggle {
    Pause,
    Resume,
}

impl PauseToggle {
    pub fn label(self) -> &'static str {
        match self {
            Self::Pause => "Pause generation",
            Self::Resume => "Resume generation",
        }
    }
}

/// Everything the tray shows, derived from the worker's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrayView {
    pub icon: TrayIconKind,
    /// The first, disabled menu line.
    pub status_line: String,
    pub tooltip: String,
    pub toggle: PauseToggle,
}

/// Heartbeat failures in a row after which the studio counts as unreachable.
const UNREACHABLE_AFTER: u32 = 3;

impl TrayView {
    pub fn from_status(status: &WorkerStatus) -> Self {
        // The person can lift their own pause and the policy's, never the studio's.
        let toggle = match status.paused {
            Some(reason) if reason != PauseReason::Studio => PauseToggle::Resume,
            _ => PauseToggle::Pause,
        };
        let (icon, status_line) = if let Some(fatal) = &status.fatal {
            (TrayIconKind::Attention, format!("Stopped: {fatal}"))
        } else if let Some(job) = &status.jobs.current {
            let prompt = crate::human::one_line(&job.prompt, 32);
            (
                TrayIconKind::Working,
                format!("Working: “{prompt}” ({}/{})", job.step, job.total_steps),
            )
        } else {
            match &status.registration {
                RegistrationState::Rejected { .. } => {
                    (TrayIconKind::Attention, "Rejected by the studio".to_owned())
                }
                RegistrationState::Revoked { .. } => (
                    TrayIconKind::Attention,
                    "Access revoked: open to reset".to_owned(),
                ),
                RegistrationState::Pristine | RegistrationState::Pending { .. } => (
                    TrayIconKind::Attention,
                    "Waiting for the studio to approve this PC".to_owned(),
                ),
                RegistrationState::Approved { .. } => {
                    if let Some(line) = status.pause_line() {
                        (TrayIconKind::Paused, line)
                    } else if status.connection.consecutive_failures >= UNREACHABLE_AFTER {
                        (
                            TrayIconKind::Attention,
                            "Cannot reach the studio".to_owned(),
                        )
                    } else {
                        (TrayIconKind::Idle, "Idle: waiting for jobs".to_owned())
                    }
                }
            }
        };
        Self {
            icon,
            tooltip: format!("studio-worker: {status_line}"),
            status_line,
            toggle,
        }
    }
}

/// What a click on the tray asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrayEvent {
    TogglePause,
    Open,
    Quit,
}

const ID_TOGGLE: &str = "toggle-pause";
const ID_OPEN: &str = "open";
const ID_QUIT: &str = "quit";

impl TrayEvent {
    fn from_menu_id(id: &MenuId) -> Option<Self> {
        match id.as_ref() {
            ID_TOGGLE => Some(Self::TogglePause),
            ID_OPEN => Some(Self::Open),
            ID_QUIT => Some(Self::Quit),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrayError {
    #[error("cannot build the tray menu: {0}")]
    Menu(#[from] tray_icon::menu::Error),
    #[error("{0}")]
    Icon(#[from] tray_icon::Error),
}

/// The icon on screen, with the menu items that change.
pub struct Tray {
    icon: TrayIcon,
    status_item: MenuItem,
    toggle_item: MenuItem,
    shown: TrayView,
}

impl Tray {
    /// Puts the icon in the tray. Fails when there is no tray (no StatusNotifier host on a
    /// Linux desktop, no session bus); the app then runs with the window alone.
    pub fn new(view: &TrayView) -> Result<Self, TrayError> {
        let status_item = MenuItem::new(&view.status_line, false, None);
        let toggle_item = MenuItem::with_id(ID_TOGGLE, view.toggle.label(), true, None);
        let open_item = MenuItem::with_id(ID_OPEN, "Open studio-worker", true, None);
        let quit_item = MenuItem::with_id(ID_QUIT, "Quit", true, None);
        let menu = Menu::new();
        menu.append_items(&[
            &status_item,
            &PredefinedMenuItem::separator(),
            &toggle_item,
            &open_item,
            &PredefinedMenuItem::separator(),
            &quit_item,
        ])?;
        let mut builder = TrayIconBuilder::new()
            .with_menu(Box::new(menu))
            .with_tooltip(&view.tooltip)
            .with_title("studio-worker");
        if let Some(icon) = icon(view.icon) {
            builder = builder.with_icon(icon);
        }
        let icon = builder.build()?;
        Ok(Self {
            icon,
            status_item,
            toggle_item,
            shown: view.clone(),
        })
    }

    /// Shows `view`, touching only what changed.
    pub fn update(&mut self, view: &TrayView) {
        if *view == self.shown {
            return;
        }
        if view.status_line != self.shown.status_line {
            self.status_item.set_text(&view.status_line);
        }
        if view.toggle != self.shown.toggle {
            self.toggle_item.set_text(view.toggle.label());
        }
        if view.tooltip != self.shown.tooltip
            && let Err(err) = self.icon.set_tooltip(Some(&view.tooltip))
        {
            tracing::debug!("tray tooltip not updated: {err}");
        }
        if view.icon != self.shown.icon
            && let Err(err) = self.icon.set_icon(icon(view.icon))
        {
            tracing::debug!("tray icon not updated: {err}");
        }
        self.shown = view.clone();
    }
}

/// Routes tray clicks into `sender` and wakes the window's `logic()` to apply them. The
/// handlers are process-wide and set once, in the app's start path (never in code that tests
/// construct).
pub fn forward_events(sender: std::sync::mpsc::Sender<TrayEvent>, ctx: egui::Context) {
    let menu_sender = sender.clone();
    let menu_ctx = ctx.clone();
    MenuEvent::set_event_handler(Some(move |event: MenuEvent| {
        if let Some(tray_event) = TrayEvent::from_menu_id(&event.id) {
            let _ = menu_sender.send(tray_event);
            menu_ctx.request_repaint();
        }
    }));
    TrayIconEvent::set_event_handler(Some(move |event: TrayIconEvent| {
        let open = matches!(
            event,
            TrayIconEvent::Click {
                button: MouseButton::Left,
                button_state: MouseButtonState::Up,
                ..
            } | TrayIconEvent::DoubleClick { .. }
        );
        if open {
            let _ = sender.send(TrayEvent::Open);
            ctx.request_repaint();
        }
    }));
}

/// The tray image for a state, from `assets/icons` (64 px: sharp at 200 % scaling too).
fn icon(kind: TrayIconKind) -> Option<tray_icon::Icon> {
    let png: &[u8] = match kind {
        TrayIconKind::Working => include_bytes!("../assets/icons/tray-working-64.png"),
        TrayIconKind::Idle => include_bytes!("../assets/icons/tray-idle-64.png"),
        TrayIconKind::Paused => include_bytes!("../assets/icons/tray-paused-64.png"),
        TrayIconKind::Attention => include_bytes!("../assets/icons/tray-attention-64.png"),
    };
    let rgba = decode_rgba(png);
    tray_icon::Icon::from_rgba(rgba.to_vec(), rgba.width(), rgba.height())
        .map_err(|err| tracing::error!("bundled tray icon unusable: {err}"))
        .ok()
}

/// Decodes a bundled PNG; a broken asset yields a transparent 1×1 image rather than a crash.
pub fn decode_rgba(png: &[u8]) -> image::RgbaImage {
    image::load_from_memory_with_format(png, image::ImageFormat::Png)
        .map(|image| image.to_rgba8())
        .unwrap_or_else(|_| image::RgbaImage::new(1, 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::runtime::CurrentJob;
    use crate::vocab::progress::Stage;

    fn approved() -> WorkerStatus {
        let mut status = WorkerStatus::new(&Config::default());
        status.registration = RegistrationState::Approved {
            worker_id: "w_1".into(),
        };
        status
    }

    #[test]
    fn each_state_has_its_icon_line_and_toggle() {
        let idle = TrayView::from_status(&approved());
        assert_eq!(idle.icon, TrayIconKind::Idle);
        assert_eq!(idle.status_line, "Idle: waiting for jobs");
        assert_eq!(idle.toggle, PauseToggle::Pause);
        assert_eq!(idle.tooltip, "studio-worker: Idle: waiting for jobs");

        let mut paused = approved();
        paused.paused = Some(PauseReason::User);
        let view = TrayView::from_status(&paused);
        assert_eq!(
            (view.icon, view.toggle),
            (TrayIconKind::Paused, PauseToggle::Resume)
        );
        assert_eq!(view.status_line, "Paused by you");
        assert_eq!(view.toggle.label(), "Resume generation");

        let mut gaming = approved();
        gaming.paused = Some(PauseReason::Game);
        gaming.policy.pause = Some(crate::policy::AutoPause {
            reason: PauseReason::Game,
            detail: "Cyberpunk 2077 is running".into(),
            resumes: "resumes 2 min after it closes".into(),
        });
        let view = TrayView::from_status(&gaming);
        assert_eq!(
            view.status_line,
            "Paused: Cyberpunk 2077 is running — resumes 2 min after it closes"
        );
        assert_eq!(
            view.tooltip,
            "studio-worker: Paused: Cyberpunk 2077 is running — resumes 2 min after it closes"
        );
        assert_eq!(
            (view.icon, view.toggle),
            (TrayIconKind::Paused, PauseToggle::Resume),
            "the person may resume over a game"
        );

        paused.paused = Some(PauseReason::Studio);
        let view = TrayView::from_status(&paused);
        assert_eq!(view.status_line, "Paused by the studio");
        assert_eq!(
            view.toggle,
            PauseToggle::Pause,
            "the person cannot lift the studio's pause"
        );

        let mut working = approved();
        working.jobs.current = Some(CurrentJob {
            job_id: "j".into(),
            prompt: "a lighthouse at dusk,\n oil painting, dramatic light, 8k".into(),
            model: "sd-turbo".into(),
            width: 512,
            height: 512,
            steps: 4,
            num_images: 1,
            seed: 1,
            stage: Stage::Denoising,
            step: 3,
            total_steps: 4,
            started_at: chrono::Utc::now(),
        });
        let view = TrayView::from_status(&working);
        assert_eq!(view.icon, TrayIconKind::Working);
        assert_eq!(
            view.status_line,
            "Working: “a lighthouse at dusk, oil paint…” (3/4)"
        );

        let mut pending = approved();
        pending.registration = RegistrationState::Pending {
            request_id: "rr".into(),
            since: None,
        };
        assert_eq!(
            TrayView::from_status(&pending).icon,
            TrayIconKind::Attention
        );
        pending.registration = RegistrationState::Revoked {
            worker_id: "w".into(),
        };
        assert_eq!(
            TrayView::from_status(&pending).status_line,
            "Access revoked: open to reset"
        );

        let mut unreachable = approved();
        unreachable.connection.consecutive_failures = 3;
        assert_eq!(
            TrayView::from_status(&unreachable).icon,
            TrayIconKind::Attention
        );
    }

    #[test]
    fn menu_ids_map_to_events() {
        assert_eq!(
            TrayEvent::from_menu_id(&MenuId::new(ID_TOGGLE)),
            Some(TrayEvent::TogglePause)
        );
        assert_eq!(
            TrayEvent::from_menu_id(&MenuId::new(ID_QUIT)),
            Some(TrayEvent::Quit)
        );
        assert_eq!(TrayEvent::from_menu_id(&MenuId::new("something")), None);
    }

    #[test]
    fn bundled_icons_decode_at_64_px() {
        for kind in [
            TrayIconKind::Working,
            TrayIconKind::Idle,
            TrayIconKind::Paused,
            TrayIconKind::Attention,
        ] {
            assert!(icon(kind).is_some(), "{kind:?}");
        }
        let app = decode_rgba(include_bytes!("../assets/icons/tray-paused-64.png"));
        assert_eq!(app.dimensions(), (64, 64));
    }
}

//! The X11 probes (Linux and BSD desktops on X11, and XWayland-less sessions): the full-screen
//! foreground window, from the window manager's EWMH hints (the root's `_NET_ACTIVE_WINDOW`,
//! that window's `_NET_WM_STATE_FULLSCREEN`, or a window as large as the screen), and input
//! idle time from the MIT-SCREEN-SAVER extension. Pure Rust (x11rb), one connection per
//! probe, reconnected after the X server went away.

use std::time::Duration;

use x11rb::connection::{Connection as _, RequestConnection as _};
use x11rb::protocol::screensaver::ConnectionExt as _;
use x11rb::protocol::xproto::{Atom, AtomEnum, ConnectionExt as _, Window};
use x11rb::rust_connection::RustConnection;

use super::{ForegroundProbe, FullScreen, IdleProbe, Probed, Unavailable};

pub(super) struct X11Session {
    connection: Option<Connected>,
}

struct Connected {
    connection: RustConnection,
    root: Window,
    screen_size: (u16, u16),
    atoms: Atoms,
}

struct Atoms {
    active_window: Atom,
    wm_state: Atom,
    fullscreen: Atom,
    wm_pid: Atom,
    wm_name: Atom,
    utf8_string: Atom,
}

impl X11Session {
    pub(super) fn connect() -> Probed<Self> {
        Ok(Self {
            connection: Some(Connected::open()?),
        })
    }

    fn connected(&mut self) -> Probed<&Connected> {
        if self.connection.is_none() {
            self.connection = Some(Connected::open()?);
        }
        self.connection
            .as_ref()
            .ok_or_else(|| Unavailable("no X11 display".to_owned()))
    }

    /// Runs `read`; a broken connection is dropped (and reopened next time).
    fn with<T>(&mut self, read: impl FnOnce(&Connected) -> Result<T, X11Error>) -> Probed<T> {
        let outcome = read(self.connected()?);
        match outcome {
            Ok(value) => Ok(value),
            Err(X11Error::Unavailable(why)) => Err(why),
            Err(X11Error::Broken(why)) => {
                self.connection = None;
                Err(Unavailable(format!("the X11 display went away ({why})")))
            }
        }
    }
}

enum X11Error {
    Unavailable(Unavailable),
    Broken(String),
}

impl<E: std::fmt::Display> From<E> for X11Error
where
    E: Into<x11rb::errors::ReplyError>,
{
    fn from(error: E) -> Self {
        Self::Broken(error.to_string())
    }
}

impl Connected {
    fn open() -> Probed<Self> {
        let (connection, screen_number) = RustConnection::connect(None)
            .map_err(|error| Unavailable(format!("no X11 display ({error})")))?;
        let screen = connection
            .setup()
            .roots
            .get(screen_number)
            .ok_or_else(|| Unavailable("the X11 display has no screen".to_owned()))?;
        let (root, screen_size) = (
            screen.root,
            (screen.width_in_pixels, screen.height_in_pixels),
        );
        let atom = |name: &str| -> Probed<Atom> {
            connection
                .intern_atom(false, name.as_bytes())
                .ok()
                .and_then(|cookie| cookie.reply().ok())
                .map(|reply| reply.atom)
                .ok_or_else(|| Unavailable(format!("the X11 display does not answer ({name})")))
        };
        let atoms = Atoms {
            active_window: atom("_NET_ACTIVE_WINDOW")?,
            wm_state: atom("_NET_WM_STATE")?,
            fullscreen: atom("_NET_WM_STATE_FULLSCREEN")?,
            wm_pid: atom("_NET_WM_PID")?,
            wm_name: atom("_NET_WM_NAME")?,
            utf8_string: atom("UTF8_STRING")?,
        };
        Ok(Self {
            connection,
            root,
            screen_size,
            atoms,
        })
    }

    fn cardinals(
        &self,
        window: Window,
        property: Atom,
        kind: AtomEnum,
    ) -> Result<Vec<u32>, X11Error> {
        let reply = self
            .connection
            .get_property(false, window, property, kind, 0, 64)?
            .reply()?;
        Ok(reply.value32().map(Iterator::collect).unwrap_or_default())
    }

    fn full_screen(&self) -> Result<Option<FullScreen>, X11Error> {
        let atoms = &self.atoms;
        let active = self
            .cardinals(self.root, atoms.active_window, AtomEnum::WINDOW)?
            .first()
            .copied()
            .unwrap_or(0);
        if active == 0 {
            return Ok(None);
        }
        // A window that is gone by now answers with an error: no full-screen window then.
        let Ok(states) = self.cardinals(active, atoms.wm_state, AtomEnum::ATOM) else {
            return Ok(None);
        };
        let full_screen = states.contains(&atoms.fullscreen) || self.covers_the_screen(active);
        if !full_screen {
            return Ok(None);
        }
        let pid = self
            .cardinals(active, atoms.wm_pid, AtomEnum::CARDINAL)
            .ok()
            .and_then(|pids| pids.first().copied());
        if pid == Some(std::process::id()) {
            return Ok(None); // our own window
        }
        Ok(Some(FullScreen {
            program: pid.and_then(super::program_name),
            title: self.title(active),
        }))
    }

    /// A window as large as the whole screen, for window managers that do not set the
    /// full-screen state.
    fn covers_the_screen(&self, window: Window) -> bool {
        let geometry = self
            .connection
            .get_geometry(window)
            .ok()
            .and_then(|cookie| cookie.reply().ok());
        let origin = self
            .connection
            .translate_coordinates(window, self.root, 0, 0)
            .ok()
            .and_then(|cookie| cookie.reply().ok());
        match (geometry, origin) {
            (Some(geometry), Some(origin)) => {
                origin.dst_x <= 0
                    && origin.dst_y <= 0
                    && geometry.width >= self.screen_size.0
                    && geometry.height >= self.screen_size.1
            }
            _ => false,
        }
    }

    fn title(&self, window: Window) -> Option<String> {
        let read = |property: Atom, kind: Atom| {
            self.connection
                .get_property(false, window, property, kind, 0, 256)
                .ok()?
                .reply()
                .ok()
                .filter(|reply| !reply.value.is_empty())
                .map(|reply| String::from_utf8_lossy(&reply.value).into_owned())
        };
        read(self.atoms.wm_name, self.atoms.utf8_string)
            .or_else(|| read(AtomEnum::WM_NAME.into(), AtomEnum::STRING.into()))
    }

    fn idle_for(&self) -> Result<Duration, X11Error> {
        if self
            .connection
            .extension_information(x11rb::protocol::screensaver::X11_EXTENSION_NAME)?
            .is_none()
        {
            return Err(X11Error::Unavailable(Unavailable(
                "this X11 display keeps no idle time (no MIT-SCREEN-SAVER)".to_owned(),
            )));
        }
        let info = self.connection.screensaver_query_info(self.root)?.reply()?;
        Ok(Duration::from_millis(u64::from(info.ms_since_user_input)))
    }
}

impl ForegroundProbe for X11Session {
    fn full_screen(&mut self) -> Probed<Option<FullScreen>> {
        self.with(Connected::full_screen)
    }
}

impl IdleProbe for X11Session {
    fn idle_for(&mut self) -> Probed<Duration> {
        self.with(Connected::idle_for)
    }
}

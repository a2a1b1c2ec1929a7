//! The Windows probes: a full-screen foreground window (the shell's notification state says
//! "busy", "Direct3D full screen" or "presentation", or the foreground window covers its
//! monitor, the desktop itself excepted), input idle time (`GetLastInputInfo`, this session:
//! a gamepad usually does not count) and battery power (`GetSystemPowerStatus`).

use std::time::Duration;

use windows_sys::Win32::Foundation::{HWND, RECT};
use windows_sys::Win32::Graphics::Gdi::{
    GetMonitorInfoW, MONITOR_DEFAULTTONEAREST, MONITORINFO, MonitorFromWindow,
};
use windows_sys::Win32::System::Power::{GetSystemPowerStatus, SYSTEM_POWER_STATUS};
use windows_sys::Win32::System::SystemInformation::GetTickCount;
use windows_sys::Win32::UI::Input::KeyboardAndMouse::{GetLastInputInfo, LASTINPUTINFO};
use windows_sys::Win32::UI::Shell::{
    QUERY_USER_NOTIFICATION_STATE, QUNS_BUSY, QUNS_PRESENTATION_MODE, QUNS_RUNNING_D3D_FULL_SCREEN,
    SHQueryUserNotificationState,
};
use windows_sys::Win32::UI::WindowsAndMessaging::{
    GetClassNameW, GetDesktopWindow, GetForegroundWindow, GetShellWindow, GetWindowRect,
    GetWindowTextW, GetWindowThreadProcessId,
};

use super::{ForegroundProbe, FullScreen, IdleProbe, PowerProbe, Probed, Unavailable};

/// Window classes of the desktop and the shell, which cover the screen without being a game.
const SHELL_CLASSES: [&str; 5] = [
    "Progman",
    "WorkerW",
    "Shell_TrayWnd",
    "XamlExplorerHostIslandWindow",
    "Windows.UI.Core.CoreWindow",
];

pub(super) struct WindowsSession;

impl ForegroundProbe for WindowsSession {
    fn full_screen(&mut self) -> Probed<Option<FullScreen>> {
        let mut state: QUERY_USER_NOTIFICATION_STATE = 0;
        // SAFETY: one out-parameter, written by the shell.
        let queried = unsafe { SHQueryUserNotificationState(&mut state) } >= 0;
        let shell_says_busy = queried
            && matches!(
                state,
                QUNS_BUSY | QUNS_RUNNING_D3D_FULL_SCREEN | QUNS_PRESENTATION_MODE
            );
        // SAFETY: no arguments; a null window means none is in the foreground.
        let window = unsafe { GetForegroundWindow() };
        if window.is_null() {
            return Ok(None);
        }
        // The desktop window itself can be the foreground one, with nothing else focused (Wine
        // shows it so, owned by explorer.exe), and it covers the monitor by definition.
        // SAFETY: no arguments; each returns a handle or null.
        let (desktop, shell) = unsafe { (GetDesktopWindow(), GetShellWindow()) };
        if window == desktop || window == shell {
            return Ok(None);
        }
        let class = text_of(window, GetClassNameW);
        if SHELL_CLASSES.contains(&class.as_str()) {
            return Ok(None);
        }
        if !shell_says_busy && !covers_its_monitor(window) {
            return Ok(None);
        }
        let mut pid = 0_u32;
        // SAFETY: a live window handle and one out-parameter.
        unsafe { GetWindowThreadProcessId(window, &mut pid) };
        if pid == std::process::id() {
            return Ok(None);
        }
        let title = text_of(window, GetWindowTextW);
        Ok(Some(FullScreen {
            program: (pid != 0).then(|| super::program_name(pid)).flatten(),
            title: (!title.is_empty()).then_some(title),
        }))
    }
}

fn covers_its_monitor(window: HWND) -> bool {
    let mut rect = RECT {
        left: 0,
        top: 0,
        right: 0,
        bottom: 0,
    };
    // SAFETY: a window handle and an out-parameter of the right size.
    if unsafe { GetWindowRect(window, &mut rect) } == 0 {
        return false;
    }
    // SAFETY: any window handle; the nearest monitor is always returned.
    let monitor = unsafe { MonitorFromWindow(window, MONITOR_DEFAULTTONEAREST) };
    let mut info = MONITORINFO {
        cbSize: std::mem::size_of::<MONITORINFO>() as u32,
        rcMonitor: rect,
        rcWork: rect,
        dwFlags: 0,
    };
    // SAFETY: `cbSize` says which structure this is.
    if unsafe { GetMonitorInfoW(monitor, &mut info) } == 0 {
        return false;
    }
    let screen = info.rcMonitor;
    rect.left <= screen.left
        && rect.top <= screen.top
        && rect.right >= screen.right
        && rect.bottom >= screen.bottom
}

/// A window's class name or title.
fn text_of(window: HWND, read: unsafe extern "system" fn(HWND, *mut u16, i32) -> i32) -> String {
    let mut buffer = [0_u16; 256];
    // SAFETY: the buffer's length is passed; at most that many units are written.
    let length = unsafe { read(window, buffer.as_mut_ptr(), buffer.len() as i32) };
    let length = usize::try_from(length).unwrap_or(0).min(buffer.len());
    String::from_utf16_lossy(&buffer[..length])
}

impl IdleProbe for WindowsSession {
    fn idle_for(&mut self) -> Probed<Duration> {
        let mut info = LASTINPUTINFO {
            cbSize: std::mem::size_of::<LASTINPUTINFO>() as u32,
            dwTime: 0,
        };
        // SAFETY: `cbSize` says which structure this is.
        if unsafe { GetLastInputInfo(&mut info) } == 0 {
            return Err(Unavailable(
                "Windows did not say when the keyboard or mouse was last used".to_owned(),
            ));
        }
        // SAFETY: no arguments. Both counters wrap after 49.7 days; the difference does not.
        let now = unsafe { GetTickCount() };
        Ok(Duration::from_millis(u64::from(
            now.wrapping_sub(info.dwTime),
        )))
    }
}

impl PowerProbe for WindowsSession {
    fn on_battery(&mut self) -> Probed<bool> {
        let mut status = SYSTEM_POWER_STATUS {
            ACLineStatus: 255,
            BatteryFlag: 255,
            BatteryLifePercent: 255,
            SystemStatusFlag: 0,
            BatteryLifeTime: 0,
            BatteryFullLifeTime: 0,
        };
        // SAFETY: one out-parameter of the right size.
        if unsafe { GetSystemPowerStatus(&mut status) } == 0 {
            return Err(Unavailable(
                "Windows did not say how this PC is powered".to_owned(),
            ));
        }
        const NO_BATTERY: u8 = 128;
        Ok(status.ACLineStatus == 0 && status.BatteryFlag & NO_BATTERY == 0)
    }
}

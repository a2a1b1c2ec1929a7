//! The macOS probes: input idle time from the window server's event source (no permission
//! needed) and battery power from `pmset`, macOS's own power tool. macOS offers no way to
//! see whether another program is full screen, and no NVIDIA GPU.

use std::time::Duration;

use super::{IdleProbe, PowerProbe, Probed, Unavailable};

#[link(name = "CoreGraphics", kind = "framework")]
unsafe extern "C" {
    /// `CGEventSourceSecondsSinceLastEventType(kCGEventSourceStateHIDSystemState,
    /// kCGAnyInputEventType)`.
    fn CGEventSourceSecondsSinceLastEventType(state: i32, event_type: u32) -> f64;
}

const HID_SYSTEM_STATE: i32 = 1;
const ANY_INPUT_EVENT: u32 = u32::MAX;

pub(super) struct MacSession;

impl IdleProbe for MacSession {
    fn idle_for(&mut self) -> Probed<Duration> {
        // SAFETY: a pure query of the window server with constant arguments.
        let seconds =
            unsafe { CGEventSourceSecondsSinceLastEventType(HID_SYSTEM_STATE, ANY_INPUT_EVENT) };
        if seconds.is_finite() && seconds >= 0.0 {
            Ok(Duration::from_secs_f64(seconds))
        } else {
            Err(Unavailable(
                "macOS did not say when the keyboard or mouse was last used".to_owned(),
            ))
        }
    }
}

impl PowerProbe for MacSession {
    fn on_battery(&mut self) -> Probed<bool> {
        let output = std::process::Command::new("pmset")
            .args(["-g", "batt"])
            .output()
            .map_err(|error| Unavailable(format!("pmset did not run ({error})")))?;
        let text = String::from_utf8_lossy(&output.stdout);
        // "Now drawing from 'Battery Power'" or "… 'AC Power'".
        Ok(text.contains("'Battery Power'"))
    }
}

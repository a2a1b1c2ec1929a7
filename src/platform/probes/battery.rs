//! The power probe on Linux: `/sys/class/power_supply`, as the kernel describes every power
//! supply (`type` Battery, Mains, USB…; `online` for mains, `status` for batteries).
//! Batteries of devices (`scope = Device`: a wireless mouse, a gamepad) are not this PC's.
//! Read from a root folder the tests can point at a tree of their own.

use std::path::{Path, PathBuf};

use super::{PowerProbe, Probed};

pub struct SysfsPower {
    root: PathBuf,
}

impl SysfsPower {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }
}

impl PowerProbe for SysfsPower {
    fn on_battery(&mut self) -> Probed<bool> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Ok(false); // no power supply class: no battery to run on
        };
        let mut mains_online = false;
        let mut discharging = false;
        for entry in entries.filter_map(Result::ok) {
            let supply = entry.path();
            if read(&supply, "scope").as_deref() == Some("Device") {
                continue;
            }
            match read(&supply, "type").as_deref() {
                Some("Battery") => {
                    discharging |= read(&supply, "status").as_deref() == Some("Discharging");
                }
                Some(_) => mains_online |= read(&supply, "online").as_deref() == Some("1"),
                None => {}
            }
        }
        Ok(discharging && !mains_online)
    }
}

fn read(supply: &Path, attribute: &str) -> Option<String> {
    std::fs::read_to_string(supply.join(attribute))
        .ok()
        .map(|text| text.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supply(root: &Path, name: &str, attributes: &[(&str, &str)]) {
        let folder = root.join(name);
        std::fs::create_dir_all(&folder).unwrap();
        for (attribute, value) in attributes {
            std::fs::write(folder.join(attribute), format!("{value}\n")).unwrap();
        }
    }

    #[test]
    fn a_laptop_unplugged_runs_on_battery_and_a_mouse_battery_does_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let mut probe = SysfsPower::new(dir.path().to_path_buf());
        assert_eq!(probe.on_battery(), Ok(false), "a desktop: nothing there");

        supply(dir.path(), "AC", &[("type", "Mains"), ("online", "1")]);
        supply(
            dir.path(),
            "BAT0",
            &[("type", "Battery"), ("status", "Charging")],
        );
        supply(
            dir.path(),
            "hidpp_battery_0",
            &[
                ("type", "Battery"),
                ("scope", "Device"),
                ("status", "Discharging"),
            ],
        );
        assert_eq!(
            probe.on_battery(),
            Ok(false),
            "plugged in; the mouse is not the PC"
        );

        supply(dir.path(), "AC", &[("online", "0")]);
        supply(dir.path(), "BAT0", &[("status", "Discharging")]);
        assert_eq!(probe.on_battery(), Ok(true), "unplugged");

        supply(dir.path(), "BAT0", &[("status", "Full")]);
        assert_eq!(probe.on_battery(), Ok(false), "full and idle: not draining");
    }

    #[test]
    fn a_missing_tree_means_no_battery() {
        let mut probe = SysfsPower::new(PathBuf::from("/nonexistent/power_supply"));
        assert_eq!(probe.on_battery(), Ok(false));
    }
}

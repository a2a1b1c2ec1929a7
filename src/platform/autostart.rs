//! "Start at login": the operating system's own mechanism, which is also what the installers
//! set, so the Settings checkbox always shows the truth.
//!
//! | OS | mechanism |
//! |---|---|
//! | Linux / BSD | `~/.config/autostart/studio-worker.desktop` (XDG autostart) |
//! | macOS | `~/Library/LaunchAgents/gg.minis.studio-worker.plist` (a LaunchAgent, `RunAtLoad`) |
//! | Windows | the value `studio-worker` of `HKCU\Software\Microsoft\Windows\CurrentVersion\Run`, through the registry API |
//!
//! Every entry starts `studio-worker --minimized`, so login puts the worker in the tray.
//! The first launch of the app turns it on (`ui::run`), as installers do.
//! The Linux entry carries `TryExec`, so once the package is removed the desktop ignores it.

use std::path::Path;

#[cfg(not(windows))]
const LINUX_FILE: &str = "studio-worker.desktop";
const MACOS_LABEL: &str = "gg.minis.studio-worker";
/// Under `HKEY_CURRENT_USER`.
#[cfg(windows)]
const WINDOWS_RUN_KEY: &str = r"Software\Microsoft\Windows\CurrentVersion\Run";
#[cfg(windows)]
const WINDOWS_VALUE: &str = "studio-worker";

#[derive(Debug, thiserror::Error)]
pub enum AutostartError {
    #[error("cannot find this program's own path: {0}")]
    NoExecutable(std::io::Error),
    #[error("cannot find the home folder")]
    NoHome,
    #[error("cannot change the login items: {0}")]
    Io(#[from] std::io::Error),
}

/// Whether the worker starts at login.
pub fn is_enabled() -> bool {
    #[cfg(windows)]
    {
        registry::read(WINDOWS_RUN_KEY, WINDOWS_VALUE).is_ok_and(|value| value.is_some())
    }
    #[cfg(not(windows))]
    {
        entry_path().is_some_and(|path| path.exists())
    }
}

/// Turns start-at-login on (for this program's current path) or off.
pub fn set_enabled(enabled: bool) -> Result<(), AutostartError> {
    let exe = std::env::current_exe().map_err(AutostartError::NoExecutable)?;
    #[cfg(windows)]
    {
        if enabled {
            registry::write(WINDOWS_RUN_KEY, WINDOWS_VALUE, &windows_run_command(&exe))?;
        } else {
            registry::delete(WINDOWS_RUN_KEY, WINDOWS_VALUE)?;
        }
        Ok(())
    }
    #[cfg(not(windows))]
    {
        set_entry(enabled, &exe)
    }
}

/// Writes or removes the XDG autostart entry or the LaunchAgent.
#[cfg(not(windows))]
fn set_entry(enabled: bool, exe: &Path) -> Result<(), AutostartError> {
    let path = entry_path().ok_or(AutostartError::NoHome)?;
    if enabled {
        let text = if cfg!(target_os = "macos") {
            launch_agent_plist(exe)
        } else {
            desktop_entry(exe)
        };
        crate::files::write_atomic(&path, text.as_bytes())?;
    } else if let Err(err) = std::fs::remove_file(&path)
        && err.kind() != std::io::ErrorKind::NotFound
    {
        return Err(err.into());
    }
    Ok(())
}

#[cfg(not(windows))]
fn entry_path() -> Option<std::path::PathBuf> {
    let dirs = directories::BaseDirs::new()?;
    Some(if cfg!(target_os = "macos") {
        dirs.home_dir()
            .join("Library/LaunchAgents")
            .join(format!("{MACOS_LABEL}.plist"))
    } else {
        dirs.config_dir().join("autostart").join(LINUX_FILE)
    })
}

/// The XDG autostart entry.
pub fn desktop_entry(exe: &Path) -> String {
    format!(
        "[Desktop Entry]\n\
         Type=Application\n\
         Name=studio-worker\n\
         Comment=Lends this PC's GPU to the minis.gg studio\n\
         TryExec={}\n\
         Exec={} --minimized\n\
         Icon=studio-worker\n\
         Terminal=false\n\
         X-GNOME-Autostart-enabled=true\n",
        exe.to_string_lossy().replace('\\', "\\\\"),
        desktop_exec_quote(&exe.to_string_lossy())
    )
}

/// Quoting for a `.desktop` `Exec` key (the spec's rules: double quotes, backslash-escaped
/// `"`, `` ` ``, `$` and `\`).
fn desktop_exec_quote(path: &str) -> String {
    if !path.contains([' ', '"', '`', '$', '\\', '\'']) {
        return path.to_owned();
    }
    let mut quoted = String::from("\"");
    for c in path.chars() {
        if matches!(c, '"' | '`' | '$' | '\\') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// The macOS LaunchAgent.
pub fn launch_agent_plist(exe: &Path) -> String {
    let exe = xml_escape(&exe.to_string_lossy());
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
  <key>Label</key><string>{MACOS_LABEL}</string>
  <key>ProgramArguments</key>
  <array><string>{exe}</string><string>--minimized</string></array>
  <key>RunAtLoad</key><true/>
  <key>ProcessType</key><string>Interactive</string>
</dict>
</plist>
"#
    )
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The Run value's data: this program, quoted (its folder may have spaces), started in the
/// tray.
pub fn windows_run_command(exe: &Path) -> String {
    format!("\"{}\" --minimized", exe.display())
}

/// String values of the current user's registry, through the Win32 API: `reg.exe` is a
/// console program, and the windowed app starting one flashes a console window.
#[cfg(windows)]
mod registry {
    use windows_sys::Win32::Foundation::{ERROR_FILE_NOT_FOUND, ERROR_SUCCESS, WIN32_ERROR};
    use windows_sys::Win32::System::Registry::{
        HKEY_CURRENT_USER, REG_SZ, RRF_RT_REG_SZ, RegDeleteKeyValueW, RegGetValueW, RegSetKeyValueW,
    };

    /// UTF-16, ending in a NUL.
    fn wide(text: &str) -> Vec<u16> {
        text.encode_utf16().chain(std::iter::once(0)).collect()
    }

    fn checked(code: WIN32_ERROR) -> std::io::Result<()> {
        if code == ERROR_SUCCESS {
            Ok(())
        } else {
            Err(std::io::Error::from_raw_os_error(code as i32))
        }
    }

    /// The string value `name` of `HKEY_CURRENT_USER\<key>`; `None` where the key or the
    /// value is not there.
    pub fn read(key: &str, name: &str) -> std::io::Result<Option<String>> {
        let (key, name) = (wide(key), wide(name));
        let get = |data: *mut u16, bytes: &mut u32| {
            // SAFETY: `key` and `name` are NUL-terminated and outlive the call; `data` is null
            // (the call then only says the size) or holds `*bytes` writable bytes.
            unsafe {
                RegGetValueW(
                    HKEY_CURRENT_USER,
                    key.as_ptr(),
                    name.as_ptr(),
                    RRF_RT_REG_SZ,
                    std::ptr::null_mut(),
                    data.cast(),
                    bytes,
                )
            }
        };
        let mut bytes = 0;
        let code = get(std::ptr::null_mut(), &mut bytes);
        if code == ERROR_FILE_NOT_FOUND {
            return Ok(None);
        }
        checked(code)?;
        let mut data = vec![0_u16; (bytes as usize).div_ceil(2)];
        let mut bytes = (data.len() * 2) as u32;
        let code = get(data.as_mut_ptr(), &mut bytes);
        if code == ERROR_FILE_NOT_FOUND {
            return Ok(None); // removed between the two calls
        }
        checked(code)?;
        data.truncate(bytes as usize / 2);
        while data.last() == Some(&0) {
            data.pop();
        }
        Ok(Some(String::from_utf16_lossy(&data)))
    }

    /// Sets the string value `name` of `HKEY_CURRENT_USER\<key>`, making the key if needed.
    pub fn write(key: &str, name: &str, value: &str) -> std::io::Result<()> {
        let (key, name, value) = (wide(key), wide(name), wide(value));
        // SAFETY: NUL-terminated strings that outlive the call; the length given is the
        // value's, its NUL included, in bytes.
        checked(unsafe {
            RegSetKeyValueW(
                HKEY_CURRENT_USER,
                key.as_ptr(),
                name.as_ptr(),
                REG_SZ,
                value.as_ptr().cast(),
                (value.len() * 2) as u32,
            )
        })
    }

    /// Removes the value `name` of `HKEY_CURRENT_USER\<key>`; one that is not there is fine.
    pub fn delete(key: &str, name: &str) -> std::io::Result<()> {
        let (key, name) = (wide(key), wide(name));
        // SAFETY: NUL-terminated strings that outlive the call.
        let code = unsafe { RegDeleteKeyValueW(HKEY_CURRENT_USER, key.as_ptr(), name.as_ptr()) };
        if code == ERROR_FILE_NOT_FOUND {
            return Ok(());
        }
        checked(code)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_value_is_written_read_back_and_deleted() {
            // A key of the tests' own, never the Run key of the account running them.
            let key = format!(r"Software\studio-worker-tests\{}", std::process::id());
            let run =
                r#""C:\Users\Zoë Ng\AppData\Local\studio-worker\studio-worker.exe" --minimized"#;
            assert_eq!(read(&key, "studio-worker").unwrap(), None, "no key yet");
            write(&key, "studio-worker", run).unwrap();
            assert_eq!(read(&key, "studio-worker").unwrap().as_deref(), Some(run));
            write(&key, "studio-worker", "again").unwrap();
            assert_eq!(
                read(&key, "studio-worker").unwrap().as_deref(),
                Some("again")
            );
            delete(&key, "studio-worker").unwrap();
            assert_eq!(read(&key, "studio-worker").unwrap(), None);
            delete(&key, "studio-worker").expect("deleting what is not there is fine");
            let parent = wide(r"Software\studio-worker-tests");
            // SAFETY: a NUL-terminated string that outlives the call.
            unsafe {
                windows_sys::Win32::System::Registry::RegDeleteTreeW(
                    HKEY_CURRENT_USER,
                    parent.as_ptr(),
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_desktop_entry_starts_minimized_and_quotes_odd_paths() {
        let entry = desktop_entry(Path::new("/opt/studio worker/bin/studio-worker"));
        assert!(entry.starts_with("[Desktop Entry]\nType=Application\n"));
        assert!(entry.contains("Exec=\"/opt/studio worker/bin/studio-worker\" --minimized\n"));
        let plain = desktop_entry(Path::new("/usr/bin/studio-worker"));
        assert!(plain.contains("Exec=/usr/bin/studio-worker --minimized\n"));
        assert!(
            plain.contains("TryExec=/usr/bin/studio-worker\n"),
            "ignored by the desktop once the package is removed"
        );
        assert_eq!(desktop_exec_quote("/a/$HOME\"x"), "\"/a/\\$HOME\\\"x\"");
    }

    #[test]
    fn the_launch_agent_runs_at_load_with_an_escaped_path() {
        let plist = launch_agent_plist(Path::new(
            "/Applications/A&B.app/Contents/MacOS/studio-worker",
        ));
        assert!(plist.contains("<string>/Applications/A&amp;B.app/Contents/MacOS/studio-worker</string><string>--minimized</string>"));
        assert!(plist.contains("<key>RunAtLoad</key><true/>"));
        assert!(plist.contains("<string>gg.minis.studio-worker</string>"));
    }

    #[test]
    fn the_windows_run_value_is_quoted() {
        assert_eq!(
            windows_run_command(Path::new(
                r"C:\Users\Al Ice\AppData\Local\studio-worker\studio-worker.exe"
            )),
            r#""C:\Users\Al Ice\AppData\Local\studio-worker\studio-worker.exe" --minimized"#
        );
    }
}

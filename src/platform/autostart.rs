//! "Start at login": the operating system's own mechanism, which is also what the installers
//! set, so the Settings checkbox always shows the truth.
//!
//! | OS | mechanism |
//! |---|---|
//! | Linux / BSD | `~/.config/autostart/studio-worker.desktop` (XDG autostart) |
//! | macOS | `~/Library/LaunchAgents/gg.minis.studio-worker.plist` (a LaunchAgent, `RunAtLoad`) |
//! | Windows | `HKCU\Software\Microsoft\Windows\CurrentVersion\Run\studio-worker`, set with `reg.exe` |
//!
//! Every entry starts `studio-worker --minimized`, so login puts the worker in the tray.
//! The first launch of the app turns it on (`ui::run`), as installers do.
//! The Linux entry carries `TryExec`, so once the package is removed the desktop ignores it.

use std::path::{Path, PathBuf};

const LINUX_FILE: &str = "studio-worker.desktop";
const MACOS_LABEL: &str = "gg.minis.studio-worker";
const WINDOWS_RUN_KEY: &str = r"HKCU\Software\Microsoft\Windows\CurrentVersion\Run";
const WINDOWS_VALUE: &str = "studio-worker";

#[derive(Debug, thiserror::Error)]
pub enum AutostartError {
    #[error("cannot find this program's own path: {0}")]
    NoExecutable(std::io::Error),
    #[error("cannot find the home folder")]
    NoHome,
    #[error("cannot change the login items: {0}")]
    Io(#[from] std::io::Error),
    #[error("reg.exe failed: {0}")]
    Registry(String),
}

/// Whether the worker starts at login.
pub fn is_enabled() -> bool {
    if cfg!(target_os = "windows") {
        windows_query().unwrap_or(false)
    } else {
        entry_path().is_some_and(|path| path.exists())
    }
}

/// Turns start-at-login on (for this program's current path) or off.
pub fn set_enabled(enabled: bool) -> Result<(), AutostartError> {
    let exe = std::env::current_exe().map_err(AutostartError::NoExecutable)?;
    if cfg!(target_os = "windows") {
        return windows_set(enabled, &exe);
    }
    let path = entry_path().ok_or(AutostartError::NoHome)?;
    if enabled {
        let text = if cfg!(target_os = "macos") {
            launch_agent_plist(&exe)
        } else {
            desktop_entry(&exe)
        };
        crate::files::write_atomic(&path, text.as_bytes())?;
    } else if let Err(err) = std::fs::remove_file(&path)
        && err.kind() != std::io::ErrorKind::NotFound
    {
        return Err(err.into());
    }
    Ok(())
}

fn entry_path() -> Option<PathBuf> {
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

/// The `reg.exe` arguments that set (or delete) the Run value.
pub fn windows_reg_args(enabled: bool, exe: &Path) -> Vec<String> {
    let mut args = vec![
        if enabled { "add" } else { "delete" }.to_owned(),
        WINDOWS_RUN_KEY.to_owned(),
        "/v".to_owned(),
        WINDOWS_VALUE.to_owned(),
    ];
    if enabled {
        args.extend([
            "/t".to_owned(),
            "REG_SZ".to_owned(),
            "/d".to_owned(),
            format!("\"{}\" --minimized", exe.display()),
        ]);
    }
    args.push("/f".to_owned());
    args
}

fn windows_set(enabled: bool, exe: &Path) -> Result<(), AutostartError> {
    let output = std::process::Command::new("reg")
        .args(windows_reg_args(enabled, exe))
        .output()?;
    // Deleting a value that is not there is fine.
    if output.status.success() || !enabled {
        Ok(())
    } else {
        Err(AutostartError::Registry(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}

fn windows_query() -> Option<bool> {
    let output = std::process::Command::new("reg")
        .args(["query", WINDOWS_RUN_KEY, "/v", WINDOWS_VALUE])
        .output()
        .ok()?;
    Some(output.status.success())
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
        let args = windows_reg_args(
            true,
            Path::new(r"C:\Users\Al Ice\AppData\Local\studio-worker\studio-worker.exe"),
        );
        assert_eq!(args[0], "add");
        assert_eq!(
            args[args.len() - 2],
            r#""C:\Users\Al Ice\AppData\Local\studio-worker\studio-worker.exe" --minimized"#
        );
        assert_eq!(
            windows_reg_args(false, Path::new("x")),
            vec!["delete", WINDOWS_RUN_KEY, "/v", "studio-worker", "/f"]
        );
    }
}

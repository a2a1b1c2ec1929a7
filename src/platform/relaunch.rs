//! This program started again in place of the running one: after the GPU stopped working
//! (`runtime::gpu_recovery`), once the runtime has stopped and the single-instance lock, the
//! log and the crash guard are released.

use std::ffi::OsString;
use std::process::Command;

/// The arguments the new worker starts with: this one's, and in the app `--minimized` first,
/// so a window the person did not ask for does not jump in front of their game.
pub fn arguments(current: &[OsString], with_window: bool) -> Vec<OsString> {
    let minimized = OsString::from("--minimized");
    let mut arguments = Vec::with_capacity(current.len() + 1);
    if with_window && !current.contains(&minimized) {
        arguments.push(minimized);
    }
    arguments.extend(current.iter().cloned());
    arguments
}

/// Starts this program again with `arguments` and `variables` set: on Unix it replaces this
/// process (`exec`); on Windows it starts it and this process exits. Returns only when that
/// failed, with why.
pub fn relaunch(arguments: &[OsString], variables: &[(String, String)]) -> String {
    let program = match std::env::current_exe() {
        Ok(program) => program,
        Err(err) => return format!("cannot find this program to start it again: {err}"),
    };
    tracing::info!("starting {} again", program.display());
    let mut command = Command::new(&program);
    command.args(arguments).envs(variables.iter().cloned());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt as _;
        let err = command.exec();
        format!("could not start studio-worker again: {err}")
    }
    #[cfg(not(unix))]
    {
        match command.spawn() {
            Ok(_) => std::process::exit(0),
            Err(err) => format!("could not start studio-worker again: {err}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(arguments: &[OsString]) -> Vec<&str> {
        arguments.iter().filter_map(|a| a.to_str()).collect()
    }

    #[test]
    fn the_app_comes_back_in_the_tray_and_a_headless_run_as_it_was() {
        let app = [
            OsString::from("run"),
            OsString::from("--api-url"),
            "http://s".into(),
        ];
        assert_eq!(
            strings(&arguments(&app, true)),
            ["--minimized", "run", "--api-url", "http://s"]
        );
        let already = [OsString::from("--minimized")];
        assert_eq!(strings(&arguments(&already, true)), ["--minimized"]);
        let headless = [OsString::from("run"), OsString::from("--headless")];
        assert_eq!(strings(&arguments(&headless, false)), ["run", "--headless"]);
    }
}

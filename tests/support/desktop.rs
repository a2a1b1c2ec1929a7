//! A virtual desktop for end-to-end tests of the real app: an X display (Xvfb) and a D-Bus
//! session bus of its own, and programs started on them.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A virtual X display and a session bus, both ended when dropped.
pub struct Desktop {
    xvfb: Child,
    bus: Child,
    /// Programs started on the desktop (a window manager, windows), ended with it.
    programs: Vec<Child>,
    pub display: String,
    pub bus_address: String,
}

impl Desktop {
    /// Starts both, or says why not: `None` when one of `tools` is missing and desktop tests
    /// are not required (`STUDIO_WORKER_DESKTOP_TESTS=require`, set by `.ci/run`).
    pub fn start(test: &str, tools: &[&str]) -> Option<Self> {
        let required = std::env::var("STUDIO_WORKER_DESKTOP_TESTS").as_deref() == Ok("require");
        let missing: Vec<&str> = tools
            .iter()
            .copied()
            .filter(|tool| !on_path(tool))
            .collect();
        if !missing.is_empty() {
            assert!(
                !required,
                "desktop tests required, but {missing:?} not installed"
            );
            eprintln!("skipping {test}: {missing:?} not installed");
            return None;
        }
        // Both print where they listen once they are ready: no sleeps. The display number is
        // ours to choose, above the usual ones and apart for each test process (Xvfb's own
        // choice can collide with a stale socket of an earlier server); one taken already
        // (its lock file exists) is skipped.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let base = 100 + (std::process::id() % 400) * 20;
        let (xvfb, display) = loop {
            let number = base + NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 20;
            if std::path::Path::new(&format!("/tmp/.X{number}-lock")).exists() {
                continue;
            }
            break spawn_and_read_line(Command::new("Xvfb").args([
                &format!(":{number}"),
                "-displayfd",
                "1",
                "-screen",
                "0",
                "1280x900x24",
            ]));
        };
        // Xvfb may say its number a moment before it takes connections: wait until it does.
        let socket = format!("/tmp/.X11-unix/X{}", display.trim());
        let ready_by = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                std::time::Instant::now() < ready_by,
                "Xvfb never listened on {socket}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let (bus, bus_address) = spawn_and_read_line(Command::new("dbus-daemon").args([
            "--session",
            "--nofork",
            "--print-address=1",
        ]));
        Some(Self {
            xvfb,
            bus,
            programs: Vec::new(),
            display: format!(":{display}"),
            bus_address,
        })
    }

    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        command
            .env("DISPLAY", &self.display)
            .env("DBUS_SESSION_BUS_ADDRESS", &self.bus_address)
            .env_remove("WAYLAND_DISPLAY")
            .stdin(Stdio::null());
        command
    }

    /// `gdbus call` on the session bus; the reply in GVariant text form.
    pub fn call(
        &self,
        dest: &str,
        path: &str,
        method: &str,
        args: &[&str],
    ) -> Result<String, String> {
        let out = self
            .command("gdbus")
            .args(["call", "--session", "--dest", dest, "--object-path", path])
            .args(["--method", method, "--"])
            .args(args)
            .output()
            .map_err(|err| err.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn bus_names(&self) -> String {
        self.call(
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.ListNames",
            &[],
        )
        .unwrap_or_default()
    }

    /// Starts `program` on this desktop for as long as it lives (a window manager, a window).
    pub fn launch(&mut self, program: &str, args: &[&str]) {
        let log =
            std::env::temp_dir().join(format!("desktop-{program}-{}.log", std::process::id()));
        let child = self
            .command(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).map_or_else(|_| Stdio::null(), Stdio::from))
            .spawn()
            .unwrap_or_else(|err| panic!("start {program}: {err}"));
        self.programs.push(child);
    }

    /// Runs a desktop tool (`wmctrl`, `xdotool`) to its end; whether it succeeded.
    pub fn run(&self, program: &str, args: &[&str]) -> bool {
        self.command(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    pub fn window_visible(&self) -> bool {
        self.command("xdotool")
            .args(["search", "--onlyvisible", "--name", "^studio-worker$"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }
}

impl Drop for Desktop {
    fn drop(&mut self) {
        for child in self
            .programs
            .iter_mut()
            .chain([&mut self.xvfb, &mut self.bus])
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|folder| folder.join(tool).is_file())
    })
}

fn spawn_and_read_line(command: &mut Command) -> (Child, String) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a desktop service");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read where it listens");
    assert!(!line.trim().is_empty(), "{command:?} printed nothing");
    (child, line.trim().to_owned())
}

//! The tray end to end: the real app under Xvfb, on a D-Bus session bus of its own, driven
//! the way a StatusNotifier host (a panel) drives it — `com.canonical.dbusmenu.Event` for a
//! menu click and `org.kde.StatusNotifierItem.Activate` for a click on the icon — through
//! `gdbus`, while the in-process studio approves it.
//!
//! Needs Xvfb, dbus-daemon, gdbus and xdotool (Debian: xvfb, dbus-daemon, libglib2.0-bin,
//! xdotool, plus libgl1-mesa-dri for software OpenGL). Without them the test says so and
//! passes, unless `STUDIO_WORKER_DESKTOP_TESTS=require` (set by `.ci/run`) makes it fail.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::studio::TestStudio;
use crate::support::{WorkerHome, eventually};

const SLOW: Duration = Duration::from_secs(30);
const MENU_PATH: &str = "/MenuBar";
const ITEM_PATH: &str = "/StatusNotifierItem";

/// A virtual X display and a session bus, both ended when dropped.
struct Desktop {
    xvfb: Child,
    bus: Child,
    display: String,
    bus_address: String,
}

impl Desktop {
    /// Starts both, or says why not: `None` when a tool is missing and not required.
    fn start() -> Option<Self> {
        let required = std::env::var("STUDIO_WORKER_DESKTOP_TESTS").as_deref() == Ok("require");
        let missing: Vec<&str> = ["Xvfb", "dbus-daemon", "gdbus", "xdotool"]
            .into_iter()
            .filter(|tool| !on_path(tool))
            .collect();
        if !missing.is_empty() {
            assert!(
                !required,
                "desktop tests required, but {missing:?} not installed"
            );
            eprintln!("skipping the tray end-to-end test: {missing:?} not installed");
            return None;
        }
        // Both print where they listen once they are ready: no sleeps, no fixed numbers.
        let (xvfb, display) = spawn_and_read_line(Command::new("Xvfb").args([
            "-displayfd",
            "1",
            "-screen",
            "0",
            "1280x900x24",
        ]));
        let (bus, bus_address) = spawn_and_read_line(Command::new("dbus-daemon").args([
            "--session",
            "--nofork",
            "--print-address=1",
        ]));
        Some(Self {
            xvfb,
            bus,
            display: format!(":{display}"),
            bus_address,
        })
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        command
            .env("DISPLAY", &self.display)
            .env("DBUS_SESSION_BUS_ADDRESS", &self.bus_address)
            .env_remove("WAYLAND_DISPLAY")
            .stdin(Stdio::null());
        command
    }

    /// `gdbus call` on the session bus; the reply in GVariant text form.
    fn call(&self, dest: &str, path: &str, method: &str, args: &[&str]) -> Result<String, String> {
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

    fn bus_names(&self) -> String {
        self.call(
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.ListNames",
            &[],
        )
        .unwrap_or_default()
    }

    fn window_visible(&self) -> bool {
        self.command("xdotool")
            .args(["search", "--onlyvisible", "--name", "^studio-worker$"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }
}

impl Drop for Desktop {
    fn drop(&mut self) {
        for child in [&mut self.xvfb, &mut self.bus] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn on_path(tool: &str) -> bool {
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

/// One dbusmenu item as a panel would show it.
#[derive(Debug, PartialEq)]
struct MenuItem {
    item_id: u32,
    label: String,
    enabled: bool,
}

/// The items of a `GetLayout` reply, separators left out. The reply looks like
/// `(uint32 0, (0, {…}, [<(1, {'enabled': <false>, 'label': <'Idle'>}, @av [])>, …]))`.
fn parse_layout(reply: &str) -> Vec<MenuItem> {
    reply
        .split("<(")
        .skip(1)
        .filter_map(|item| {
            let (item_id, properties) = item.split_once(", {")?;
            let properties = properties.split_once('}')?.0;
            let label = properties.split_once("'label': <'")?.1.split_once("'>")?.0;
            Some(MenuItem {
                item_id: item_id.trim().parse().ok()?,
                label: label.to_owned(),
                enabled: !properties.contains("'enabled': <false>"),
            })
        })
        .collect()
}

struct App {
    child: Child,
    bus_name: String,
}

impl App {
    fn start(desktop: &Desktop, config: &Path) -> Self {
        let folder = config.parent().expect("config in a folder");
        let log = std::fs::File::create(folder.join("app.log")).expect("app log");
        let child = desktop
            .command(env!("CARGO_BIN_EXE_studio-worker"))
            .arg("--config")
            .arg(config)
            .arg("--minimized")
            .env_remove("RUST_LOG")
            // Never the real hub (the app starts fetching the default model).
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env("HF_HUB_CACHE", folder.join("hf-cache"))
            .env_remove("HF_TOKEN")
            // Start at login is turned on by the first launch: into this test's folder.
            .env("XDG_CONFIG_HOME", folder.join("xdg-config"))
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start the app");
        // ksni's well-known name for the first item of a process.
        let bus_name = format!("org.kde.StatusNotifierItem-{}-1", child.id());
        Self { child, bus_name }
    }

    fn menu(&self, desktop: &Desktop) -> Vec<MenuItem> {
        desktop
            .call(
                &self.bus_name,
                MENU_PATH,
                "com.canonical.dbusmenu.GetLayout",
                &["0", "-1", "@as []"],
            )
            .map(|reply| parse_layout(&reply))
            .unwrap_or_default()
    }

    fn click(&self, desktop: &Desktop, label: &str) {
        let menu = self.menu(desktop);
        let item = menu
            .iter()
            .find(|item| item.label == label)
            .unwrap_or_else(|| panic!("no “{label}” in {menu:?}"));
        assert!(item.enabled, "“{label}” is disabled");
        desktop
            .call(
                &self.bus_name,
                MENU_PATH,
                "com.canonical.dbusmenu.Event",
                &[&item.item_id.to_string(), "clicked", "<0>", "0"],
            )
            .expect("menu click delivered");
    }

    fn tooltip(&self, desktop: &Desktop) -> String {
        desktop
            .call(
                &self.bus_name,
                ITEM_PATH,
                "org.freedesktop.DBus.Properties.Get",
                &["org.kde.StatusNotifierItem", "ToolTip"],
            )
            .unwrap_or_default()
    }

    fn labels(&self, desktop: &Desktop) -> Vec<String> {
        self.menu(desktop)
            .into_iter()
            .map(|item| item.label)
            .collect()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_layout_parser_reads_labels_ids_and_enabled_flags() {
    let reply = "(uint32 0, (0, {'children-display': <'submenu'>}, [<(1, {'enabled': <false>, \
                 'label': <'Idle: waiting for jobs'>}, @av [])>, <(2, {'type': <'separator'>}, \
                 @av [])>, <(3, {'label': <'Pause generation'>}, @av [])>]))";
    assert_eq!(
        parse_layout(reply),
        vec![
            MenuItem {
                item_id: 1,
                label: "Idle: waiting for jobs".into(),
                enabled: false
            },
            MenuItem {
                item_id: 3,
                label: "Pause generation".into(),
                enabled: true
            },
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tray_menu_pauses_resumes_opens_and_quits_the_real_app() {
    let Some(desktop) = Desktop::start() else {
        return;
    };
    let studio = TestStudio::start().await;
    let home = WorkerHome::new();
    home.write_config(&studio.url());
    let mut app = App::start(&desktop, &home.config_path());

    // The icon is on the bus, and its menu says what the worker waits for.
    eventually("the tray item on the session bus", SLOW, || {
        desktop.bus_names().contains(&app.bus_name)
    })
    .await;
    eventually("the pending line", SLOW, || {
        app.labels(&desktop).first().map(String::as_str)
            == Some("Waiting for the studio to approve this PC")
    })
    .await;
    // A root window cannot be created hidden: `--minimized` hides it on its first frame.
    eventually("--minimized leaves only the tray", SLOW, || {
        !desktop.window_visible()
    })
    .await;

    // The first launch turned start at login on, pointing at this very program.
    let autostart = home
        .config_path()
        .with_file_name("xdg-config")
        .join("autostart/studio-worker.desktop");
    let entry = std::fs::read_to_string(&autostart).expect("an autostart entry");
    assert!(
        entry.contains(&format!(
            "Exec={} --minimized",
            env!("CARGO_BIN_EXE_studio-worker")
        )),
        "{entry}"
    );

    // The operator approves: the first line and the tooltip follow.
    let request_id = loop {
        if let Some(request_id) = studio.pending_request_ids().pop() {
            break request_id;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    studio.approve(&request_id).expect("approve");
    eventually("the idle line", SLOW, || {
        app.labels(&desktop).first().map(String::as_str) == Some("Idle: waiting for jobs")
    })
    .await;
    assert!(
        app.tooltip(&desktop)
            .contains("studio-worker: Idle: waiting for jobs"),
        "{}",
        app.tooltip(&desktop)
    );
    let menu = app.menu(&desktop);
    assert!(!menu[0].enabled, "the status line is not clickable");
    assert_eq!(
        menu.iter()
            .skip(1)
            .map(|item| item.label.as_str())
            .collect::<Vec<_>>(),
        ["Pause generation", "Open studio-worker", "Quit"]
    );

    // Pause from the tray: saved (it survives a reboot), and the menu offers Resume.
    app.click(&desktop, "Pause generation");
    eventually("paused by the person", SLOW, || {
        home.on_disk().pause.by_user
            && app.labels(&desktop)
                == [
                    "Paused by you",
                    "Resume generation",
                    "Open studio-worker",
                    "Quit",
                ]
    })
    .await;
    app.click(&desktop, "Resume generation");
    eventually("resumed", SLOW, || {
        !home.on_disk().pause.by_user
            && app.labels(&desktop).get(1).map(String::as_str) == Some("Pause generation")
    })
    .await;

    // A click on the icon opens the window; so does the Open item after it was hidden.
    desktop
        .call(
            &app.bus_name,
            ITEM_PATH,
            "org.kde.StatusNotifierItem.Activate",
            &["0", "0"],
        )
        .expect("activate delivered");
    eventually("the window shown", SLOW, || desktop.window_visible()).await;

    // Quit ends the process cleanly, and the icon leaves the bus with it.
    app.click(&desktop, "Quit");
    let mut exit = None;
    eventually("the app exits", SLOW, || {
        exit = app.child.try_wait().expect("wait for the app");
        exit.is_some()
    })
    .await;
    assert_eq!(exit.and_then(|status| status.code()), Some(0));
    assert!(!desktop.bus_names().contains(&app.bus_name));
}

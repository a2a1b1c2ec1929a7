//! The tray end to end: the real app under Xvfb, on a D-Bus session bus of its own, driven
//! the way a StatusNotifier host (a panel) drives it — `com.canonical.dbusmenu.Event` for a
//! menu click and `org.kde.StatusNotifierItem.Activate` for a click on the icon — through
//! `gdbus`, while the in-process studio approves it. Linux only: a Windows or macOS tray is
//! not on D-Bus.
//!
//! Needs Xvfb, dbus-daemon, gdbus and xdotool (Debian: xvfb, dbus-daemon, libglib2.0-bin,
//! xdotool, plus libgl1-mesa-dri for software OpenGL). Without them the test says so and
//! passes, unless `STUDIO_WORKER_DESKTOP_TESTS=require` (set by `.ci/run`) makes it fail.

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use crate::support::desktop::Desktop;
use crate::support::studio::TestStudio;
use crate::support::{WorkerHome, eventually};

const SLOW: Duration = Duration::from_secs(30);
const TOOLS: [&str; 4] = ["Xvfb", "dbus-daemon", "gdbus", "xdotool"];
const MENU_PATH: &str = "/MenuBar";
const ITEM_PATH: &str = "/StatusNotifierItem";

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
    let Some(desktop) = Desktop::start("the tray end-to-end test", &TOOLS) else {
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

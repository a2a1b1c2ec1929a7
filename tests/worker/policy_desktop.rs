//! The good-guest policy's X11 probes for real: on Xvfb with a window manager (openbox), a
//! window made full screen with `wmctrl` pauses the real worker as a game, and leaving full
//! screen resumes it after the grace; moving the pointer with `xdotool` is input.
//!
//! Needs Xvfb, dbus-daemon, openbox, wmctrl and xdotool. Without them the tests say so and
//! pass, unless `STUDIO_WORKER_DESKTOP_TESTS=require` (set by `.ci/run`).

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use studio_worker::config;
use x11rb::connection::Connection as _;
use x11rb::protocol::xproto::{
    AtomEnum, ConnectionExt as _, CreateWindowAux, PropMode, WindowClass,
};
use x11rb::rust_connection::RustConnection;
use x11rb::wrapper::ConnectionExt as _;

use crate::support::desktop::Desktop;
use crate::support::studio::{Decision, Route, TestStudio};
use crate::support::{WorkerHome, eventually};

const SLOW: Duration = Duration::from_secs(30);
const TOOLS: [&str; 5] = ["Xvfb", "dbus-daemon", "openbox", "wmctrl", "xdotool"];
/// The "game" window's title, as wmctrl finds it and the worker names it.
const GAME: &str = "Fake Game";

/// A window opened as a game opens one: titled, and saying which process it is (EWMH's
/// `_NET_WM_PID`, as SDL, GTK and Qt set it). It lives as long as its connection.
struct GameWindow {
    _connection: RustConnection,
}

fn open_game_window(display: &str) -> GameWindow {
    let (connection, screen_number) =
        x11rb::connect(Some(display)).expect("connect to the test display");
    let screen = &connection.setup().roots[screen_number];
    let window = connection.generate_id().expect("a window id");
    connection
        .create_window(
            x11rb::COPY_DEPTH_FROM_PARENT,
            window,
            screen.root,
            40,
            40,
            200,
            150,
            0,
            WindowClass::INPUT_OUTPUT,
            0,
            &CreateWindowAux::new().background_pixel(screen.white_pixel),
        )
        .expect("create the window");
    let atom = |name: &str| {
        connection
            .intern_atom(false, name.as_bytes())
            .expect("intern")
            .reply()
            .expect("atom")
            .atom
    };
    let (net_wm_name, utf8_string, net_wm_pid) = (
        atom("_NET_WM_NAME"),
        atom("UTF8_STRING"),
        atom("_NET_WM_PID"),
    );
    connection
        .change_property8(
            PropMode::REPLACE,
            window,
            AtomEnum::WM_NAME,
            AtomEnum::STRING,
            GAME.as_bytes(),
        )
        .expect("WM_NAME");
    connection
        .change_property8(
            PropMode::REPLACE,
            window,
            net_wm_name,
            utf8_string,
            GAME.as_bytes(),
        )
        .expect("_NET_WM_NAME");
    connection
        .change_property32(
            PropMode::REPLACE,
            window,
            net_wm_pid,
            AtomEnum::CARDINAL,
            &[std::process::id()],
        )
        .expect("_NET_WM_PID");
    connection.map_window(window).expect("map");
    connection.sync().expect("sync");
    GameWindow {
        _connection: connection,
    }
}

/// A desktop with a window manager and one ordinary window, not full screen yet.
async fn desktop_with_a_window(test: &str) -> Option<(Desktop, GameWindow)> {
    let mut desktop = Desktop::start(test, &TOOLS)?;
    // The window first, the window manager after it: a window manager adopts the windows
    // it finds when it starts, but may miss one mapped while it is starting.
    let game = open_game_window(&desktop.display);
    desktop.launch("openbox", &[]);
    eventually("the window managed by the window manager", SLOW, || {
        desktop.run("wmctrl", &["-a", GAME])
    })
    .await;
    Some((desktop, game))
}

fn set_full_screen(desktop: &Desktop, on: bool) {
    let change = if on {
        "add,fullscreen"
    } else {
        "remove,fullscreen"
    };
    assert!(desktop.run("wmctrl", &["-r", GAME, "-b", change]));
    assert!(desktop.run("wmctrl", &["-a", GAME]));
}

/// `studio-worker policy --json` on this desktop.
fn what_the_worker_sees(desktop: &Desktop, home: &WorkerHome) -> Value {
    let output = desktop
        .command(env!("CARGO_BIN_EXE_studio-worker"))
        .arg("--config")
        .arg(home.config_path())
        .args(["policy", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run studio-worker policy");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("policy --json prints JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_x11_probes_see_a_full_screen_window_and_input() {
    let Some((desktop, _game)) = desktop_with_a_window("the X11 policy probes test").await else {
        return;
    };
    let home = WorkerHome::new();
    let seen = what_the_worker_sees(&desktop, &home);
    assert_eq!(
        seen["fullScreen"],
        serde_json::json!({ "seen": null }),
        "{seen}"
    );
    assert!(seen["decision"]["pause"].is_null(), "{seen}");

    set_full_screen(&desktop, true);
    let mut seen = Value::Null;
    eventually("the full-screen window seen", SLOW, || {
        seen = what_the_worker_sees(&desktop, &home);
        !seen["fullScreen"]["seen"].is_null()
    })
    .await;
    assert_eq!(seen["fullScreen"]["seen"]["title"], GAME, "{seen}");
    // The program is this test process, found through the window's _NET_WM_PID (Linux
    // keeps 15 characters of a process name).
    let this_program = std::env::current_exe().unwrap();
    let this_program = this_program.file_name().unwrap().to_string_lossy();
    let program = seen["fullScreen"]["seen"]["program"]
        .as_str()
        .unwrap_or_default();
    assert!(
        !program.is_empty() && this_program.starts_with(program),
        "{seen}"
    );
    assert_eq!(seen["decision"]["pause"]["reason"], "game", "{seen}");
    assert_eq!(
        seen["decision"]["pause"]["detail"], "Fake Game is running",
        "{seen}"
    );

    // Input idle time grows while nobody touches the PC, and the pointer resets it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let idle = what_the_worker_sees(&desktop, &home)["idleS"]["seen"]
        .as_f64()
        .expect("X11 keeps the idle time");
    assert!(idle >= 1.0, "idle for {idle} s");
    assert!(desktop.run("xdotool", &["mousemove", "300", "200"]));
    assert!(desktop.run("xdotool", &["mousemove", "310", "210"]));
    let idle = what_the_worker_sees(&desktop, &home)["idleS"]["seen"]
        .as_f64()
        .expect("X11 keeps the idle time");
    assert!(idle < 1.0, "the pointer moved: idle for {idle} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_screen_window_pauses_the_real_worker_until_after_the_grace() {
    let Some((desktop, _game)) = desktop_with_a_window("the full-screen pause test").await else {
        return;
    };
    let studio = TestStudio::start().await;
    studio.set_decision(Decision::ApproveAfterPolls(1));
    studio.set_next_heartbeat_s(Some(5));
    let home = WorkerHome::new();
    let mut settings = home.write_config(&studio.url());
    settings.policy.resume_after_game_s = 3;
    config::save(&home.config_path(), &settings).unwrap();
    let folder = home.dir.path();
    let mut worker = desktop
        .command(env!("CARGO_BIN_EXE_studio-worker"))
        .arg("--config")
        .arg(home.config_path())
        .args(["run", "--headless"])
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HUB_CACHE", folder.join("hf-cache"))
        .env_remove("HF_TOKEN")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(folder.join("worker.log")).unwrap())
        .spawn()
        .expect("start the worker");
    let last_beat = || {
        studio
            .workers()
            .first()
            .and_then(|worker| worker.heartbeats.last().cloned())
            .unwrap_or(Value::Null)
    };
    eventually("heartbeating, not paused", SLOW, || {
        let beat = last_beat();
        !beat.is_null() && beat["pausedReason"].is_null()
    })
    .await;

    set_full_screen(&desktop, true);
    let full_screen_at = Instant::now();
    eventually("paused for the game", SLOW, || {
        last_beat()["pausedReason"] == "game"
    })
    .await;
    let pause_reported = full_screen_at.elapsed();
    // `studio-worker status` in another terminal says it in the same words.
    eventually("`status` names the game", SLOW, || {
        let output = desktop
            .command(env!("CARGO_BIN_EXE_studio-worker"))
            .arg("--config")
            .arg(home.config_path())
            .arg("status")
            .stdout(Stdio::piped())
            .output()
            .expect("run studio-worker status");
        String::from_utf8_lossy(&output.stdout)
            .contains("Paused:       Paused: Fake Game is running — resumes 3 s after it closes")
    })
    .await;

    set_full_screen(&desktop, false);
    let left_at = Instant::now();
    eventually("running again after the grace", SLOW, || {
        last_beat()["pausedReason"].is_null()
    })
    .await;
    let resumed_after = left_at.elapsed();
    assert!(
        resumed_after >= Duration::from_millis(1900),
        "the 3 s grace, counted from the last reading that saw it (≤ 1 s before), was \
         waited out ({resumed_after:?})"
    );
    eprintln!(
        "full screen → heartbeat `game`: {pause_reported:?}; full screen left → resumed: \
         {resumed_after:?} (grace 3 s)"
    );
    assert!(studio.count(Route::Heartbeat) >= 3);
    let _ = worker.kill();
    let _ = worker.wait();
}

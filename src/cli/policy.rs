//! `studio-worker policy`: what the good-guest policy sees on this PC right now (games, the
//! full-screen window, input idle time, temperature, battery) and what it would decide with
//! the current settings. A quick answer to "why is it (not) paused?", and how the tests
//! check the real probes.

use serde::Serialize;

use crate::config::{self, Paths};
use crate::platform::probes::{Probed, Probes};
use crate::policy::{Decision, Policy, Readings};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    gpu_users: Seen<Vec<GpuUserReport>>,
    temperature_c: Seen<Option<u32>>,
    full_screen: Seen<Option<FullScreenReport>>,
    idle_s: Seen<f64>,
    on_battery: Seen<bool>,
    decision: Decision,
}

/// A reading, or why there is none.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
enum Seen<T> {
    Seen(T),
    Unavailable(String),
}

impl<T> Seen<T> {
    fn of<U>(probed: &Probed<U>, read: impl FnOnce(&U) -> T) -> Self {
        match probed {
            Ok(value) => Self::Seen(read(value)),
            Err(why) => Self::Unavailable(why.0.clone()),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GpuUserReport {
    pid: u32,
    program: Option<String>,
    percent: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FullScreenReport {
    program: Option<String>,
    title: Option<String>,
}

pub(super) fn print_policy(paths: &Paths, json: bool) -> anyhow::Result<()> {
    // Read-only, like `status`: a broken settings file counts as the defaults here.
    let settings = std::fs::read(&paths.config_file)
        .ok()
        .and_then(|bytes| config::parse(&bytes).ok())
        .unwrap_or_default();
    let mut probes = Probes::for_this_pc();
    // NVML samples use since the previous reading: read twice, a moment apart.
    let _ = probes.gpu.read();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let readings = Readings {
        gpu: probes.gpu.read(),
        full_screen: probes.foreground.full_screen(),
        idle: probes.idle.idle_for(),
        on_battery: probes.power.on_battery(),
        programs: probes.programs.running(),
    };
    let decision = Policy::new().decide(
        &settings.policy,
        &readings,
        std::time::Instant::now(),
        chrono::Local::now().naive_local(),
    );
    let report = Report {
        gpu_users: Seen::of(&readings.gpu, |gpu| {
            gpu.users
                .iter()
                .map(|user| GpuUserReport {
                    pid: user.pid,
                    program: user.program.clone(),
                    percent: user.percent,
                })
                .collect()
        }),
        temperature_c: Seen::of(&readings.gpu, |gpu| gpu.temperature_c),
        full_screen: Seen::of(&readings.full_screen, |window| {
            window.as_ref().map(|window| FullScreenReport {
                program: window.program.clone(),
                title: window.title.clone(),
            })
        }),
        idle_s: Seen::of(&readings.idle, std::time::Duration::as_secs_f64),
        on_battery: Seen::of(&readings.on_battery, |on_battery| *on_battery),
        decision,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let line = |name: &str, text: String| println!("{name:<14}{text}");
    line(
        "GPU use:",
        match &report.gpu_users {
            Seen::Seen(users) if users.is_empty() => "no other program".to_owned(),
            Seen::Seen(users) => users
                .iter()
                .map(|user| {
                    format!(
                        "{} {} %",
                        user.program.as_deref().unwrap_or("(unknown)"),
                        user.percent
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
            Seen::Unavailable(why) => format!("not seen ({why})"),
        },
    );
    line(
        "Temperature:",
        match &report.temperature_c {
            Seen::Seen(Some(celsius)) => format!("{celsius} °C"),
            Seen::Seen(None) => "not reported".to_owned(),
            Seen::Unavailable(why) => format!("not seen ({why})"),
        },
    );
    line(
        "Full screen:",
        match &report.full_screen {
            Seen::Seen(None) => "no window".to_owned(),
            Seen::Seen(Some(window)) => format!(
                "{} ({})",
                window.title.as_deref().unwrap_or("untitled"),
                window.program.as_deref().unwrap_or("unknown program")
            ),
            Seen::Unavailable(why) => format!("not seen ({why})"),
        },
    );
    line(
        "Input:",
        match &report.idle_s {
            Seen::Seen(seconds) => format!(
                "last used {} ago",
                crate::human::duration(std::time::Duration::from_secs_f64(*seconds))
            ),
            Seen::Unavailable(why) => format!("not seen ({why})"),
        },
    );
    line(
        "Power:",
        match &report.on_battery {
            Seen::Seen(true) => "on battery".to_owned(),
            Seen::Seen(false) => "mains".to_owned(),
            Seen::Unavailable(why) => format!("not seen ({why})"),
        },
    );
    line(
        "Decision:",
        match &report.decision.pause {
            Some(pause) => format!("pause: {} — {}", pause.detail, pause.resumes),
            None => "run".to_owned(),
        },
    );
    Ok(())
}

//! The decision: run, or pause with a reason, from the settings, the readings and the time.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::{Datelike as _, NaiveDateTime, Timelike as _};
use serde::{Deserialize, Serialize};

use crate::config::PolicySection;
use crate::human;
use crate::platform::probes::{FullScreen, GpuReading, Probed, Unavailable};
use crate::vocab::pause::PauseReason;
use crate::vocab::schedule::DAYS;

/// The programs of the desktop itself, which use the GPU to draw it: never a game.
const DESKTOP_PROGRAMS: [&str; 20] = [
    "xorg",
    "xwayland",
    "gnome-shell",
    "mutter",
    "kwin_x11",
    "kwin_wayland",
    "plasmashell",
    "sway",
    "hyprland",
    "picom",
    "compiz",
    "windowserver",
    "dwm",
    "explorer",
    "csrss",
    "searchhost",
    "shellexperiencehost",
    "startmenuexperiencehost",
    "textinputhost",
    "applicationframehost",
];

/// How far the temperature must fall below the limit before work resumes.
const COOL_DOWN_C: u32 = 5;

/// What the probes saw last; a probe that cannot see says why.
#[derive(Clone, Debug)]
pub struct Readings {
    pub gpu: Probed<GpuReading>,
    pub full_screen: Probed<Option<FullScreen>>,
    pub idle: Probed<Duration>,
    pub on_battery: Probed<bool>,
    /// The programs running, lower-case (read only while the "always pause for" list has
    /// entries).
    pub programs: Probed<Vec<String>>,
}

impl Default for Readings {
    fn default() -> Self {
        let unread = || Unavailable("not read yet".to_owned());
        Self {
            gpu: Err(unread()),
            full_screen: Err(unread()),
            idle: Err(unread()),
            on_battery: Err(unread()),
            programs: Err(unread()),
        }
    }
}

/// An automatic pause, in the words the window and the tray show.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AutoPause {
    pub reason: PauseReason,
    /// What holds, e.g. "Cyberpunk 2077 is running".
    pub detail: String,
    /// When work resumes, e.g. "resumes 2 min after it closes".
    pub resumes: String,
}

/// A signal the policy watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// Other programs on the GPU (NVML).
    GpuUse,
    /// A full-screen foreground window.
    FullScreen,
    /// Time since the last keyboard or mouse input.
    Input,
    /// The GPU's temperature.
    Temperature,
    /// Battery power.
    Battery,
    /// The list of running programs.
    Programs,
}

impl Signal {
    /// What it is, for "Not watched on this PC: …".
    pub fn describe(self) -> &'static str {
        match self {
            Self::GpuUse => "other programs' use of the GPU",
            Self::FullScreen => "full-screen windows",
            Self::Input => "when you last used the keyboard or mouse",
            Self::Temperature => "the GPU's temperature",
            Self::Battery => "battery power",
            Self::Programs => "which programs run",
        }
    }
}

/// What the policy decided.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// The automatic pause in force; `None`: the policy lets the worker run.
    pub pause: Option<AutoPause>,
    /// Automatic reasons that hold but the person overrode (Resume), until they start again.
    pub overridden: Vec<PauseReason>,
    /// Signals the settings ask for that this PC cannot give, and why.
    pub blind: Vec<(Signal, String)>,
}

/// What the policy remembers between decisions.
#[derive(Debug, Default)]
pub struct Policy {
    /// The last game seen: its name and when.
    game: Option<(String, Instant)>,
    /// Above the temperature limit, until it falls below the limit − 5 °C.
    hot: bool,
    /// The automatic reasons whose condition held at the last decision (a condition that
    /// starts again ends the person's override of it).
    held: BTreeSet<PauseReason>,
    /// The automatic reasons in force at the last decision (what Resume overrides).
    in_force: BTreeSet<PauseReason>,
    /// The person's Resume over these, until each next starts again.
    overrides: BTreeSet<PauseReason>,
}

impl Policy {
    pub fn new() -> Self {
        Self::default()
    }

    /// The person pressed Resume: every automatic pause in force stays lifted until its
    /// condition next starts again (the game closes and starts again, the PC is plugged in
    /// and unplugged again, …).
    pub fn resume(&mut self) {
        self.overrides.extend(self.in_force.iter().copied());
    }

    /// Run, or pause for the first reason in the protocol's order. `now` is a monotonic
    /// clock (grace periods), `local` this PC's wall clock (the schedule).
    pub fn decide(
        &mut self,
        settings: &PolicySection,
        readings: &Readings,
        now: Instant,
        local: NaiveDateTime,
    ) -> Decision {
        let mut blind = Vec::new();
        let mut held = BTreeSet::new();
        let mut pauses: Vec<AutoPause> = Vec::new();

        // Games and other heavy GPU use, with a grace period after they end.
        let playing = self.game_now(settings, readings, &mut blind);
        if let Some(name) = &playing {
            held.insert(PauseReason::Game);
            self.game = Some((name.clone(), now));
        }
        let grace = Duration::from_secs(settings.resume_after_game_s);
        match (&playing, &self.game) {
            (Some(name), _) => pauses.push(AutoPause {
                reason: PauseReason::Game,
                detail: format!("{name} is running"),
                resumes: format!("resumes {} after it closes", human::duration(grace)),
            }),
            (None, Some((name, seen))) if now.duration_since(*seen) < grace => {
                // Said as a time of day: the same words every second of the grace period.
                let since = now.duration_since(*seen);
                let at = local - chrono::Duration::from_std(since).unwrap_or_default()
                    + chrono::Duration::from_std(grace).unwrap_or_default();
                pauses.push(AutoPause {
                    reason: PauseReason::Game,
                    detail: format!("{name} just closed"),
                    resumes: format!("resumes at {}", at.format("%H:%M:%S")),
                });
            }
            _ => {}
        }

        // The person at the PC.
        if settings.only_when_away {
            let away_after = Duration::from_secs(settings.away_after_min.saturating_mul(60));
            match &readings.idle {
                Ok(idle) if *idle < away_after => {
                    held.insert(PauseReason::Active);
                    pauses.push(AutoPause {
                        reason: PauseReason::Active,
                        detail: "you are using this PC".to_owned(),
                        resumes: format!(
                            "resumes after {} without keyboard or mouse",
                            human::duration(away_after)
                        ),
                    });
                }
                Ok(_) => {}
                Err(why) => blind.push((Signal::Input, why.0.clone())),
            }
        }

        // The schedule, in this PC's local time.
        if settings.use_schedule {
            let day = local.weekday().num_days_from_monday() as usize;
            let hour = local.hour();
            if !settings.schedule.allows(day, hour) {
                held.insert(PauseReason::Schedule);
                pauses.push(AutoPause {
                    reason: PauseReason::Schedule,
                    detail: "outside the hours you allowed".to_owned(),
                    resumes: resume_time(settings, day, hour),
                });
            }
        }

        // Heat, with 5 °C of hysteresis so the fans do not make it flap.
        let limit = settings.temperature_limit_c;
        if limit > 0 {
            match &readings.gpu {
                Ok(GpuReading {
                    temperature_c: Some(celsius),
                    ..
                }) => {
                    self.hot = if self.hot {
                        *celsius >= limit.saturating_sub(COOL_DOWN_C)
                    } else {
                        *celsius > limit
                    };
                    if self.hot {
                        held.insert(PauseReason::Temperature);
                        pauses.push(AutoPause {
                            reason: PauseReason::Temperature,
                            detail: format!("the GPU is at {celsius} °C (limit {limit} °C)"),
                            resumes: format!(
                                "resumes below {} °C",
                                limit.saturating_sub(COOL_DOWN_C)
                            ),
                        });
                    }
                }
                Ok(_) => {
                    self.hot = false;
                    blind.push((
                        Signal::Temperature,
                        "the GPU does not report its temperature".to_owned(),
                    ));
                }
                Err(why) => {
                    self.hot = false;
                    blind.push((Signal::Temperature, why.0.clone()));
                }
            }
        }

        // Battery power.
        if settings.pause_on_battery {
            match &readings.on_battery {
                Ok(true) => {
                    held.insert(PauseReason::Battery);
                    pauses.push(AutoPause {
                        reason: PauseReason::Battery,
                        detail: "this PC runs on battery".to_owned(),
                        resumes: "resumes when it is plugged in".to_owned(),
                    });
                }
                Ok(false) => {}
                Err(why) => blind.push((Signal::Battery, why.0.clone())),
            }
        }

        // A condition that starts again ends the person's override of it.
        for started in held.difference(&self.held) {
            self.overrides.remove(started);
        }
        // A reason that no longer holds and is no longer in force needs no override either
        // (the game's override lasts through its grace period, until it starts again).
        self.overrides
            .retain(|reason| *reason == PauseReason::Game || held.contains(reason));
        self.held = held;
        self.in_force = pauses.iter().map(|pause| pause.reason).collect();

        let (overridden, in_force): (Vec<AutoPause>, Vec<AutoPause>) = pauses
            .into_iter()
            .partition(|pause| self.overrides.contains(&pause.reason));
        let pause = in_force.into_iter().min_by_key(|pause| pause.reason);
        Decision {
            pause,
            overridden: overridden.iter().map(|pause| pause.reason).collect(),
            blind,
        }
    }

    /// The name of the game running now, if one does: a program on the "always" list, a
    /// full-screen window, or a program using the GPU heavily, the desktop's own and the
    /// "never" list excepted.
    fn game_now(
        &self,
        settings: &PolicySection,
        readings: &Readings,
        blind: &mut Vec<(Signal, String)>,
    ) -> Option<String> {
        let listed = |list: &[String], program: &str| {
            let program = normalised(program);
            list.iter().any(|entry| normalised(entry) == program)
        };
        if !settings.always_pause_for.is_empty() {
            match &readings.programs {
                Ok(running) => {
                    if let Some(entry) = settings.always_pause_for.iter().find(|entry| {
                        running
                            .iter()
                            .any(|program| listed(&[(*entry).clone()], program))
                    }) {
                        return Some(entry.clone());
                    }
                }
                Err(why) => blind.push((Signal::Programs, why.0.clone())),
            }
        }
        if !settings.pause_for_games {
            return None;
        }
        let never = |program: Option<&str>| {
            program.is_some_and(|program| listed(&settings.never_pause_for, program))
        };
        match &readings.full_screen {
            Ok(Some(window)) if !never(window.program.as_deref()) => {
                return Some(
                    window
                        .title
                        .clone()
                        .filter(|title| !title.trim().is_empty())
                        .or_else(|| window.program.clone())
                        .map_or_else(
                            || "a full-screen program".to_owned(),
                            |name| human::one_line(&name, 60),
                        ),
                );
            }
            Ok(_) => {}
            Err(why) => blind.push((Signal::FullScreen, why.0.clone())),
        }
        match &readings.gpu {
            Ok(gpu) => gpu
                .users
                .iter()
                .filter(|user| user.percent >= settings.gpu_busy_percent.max(1))
                .filter(|user| {
                    user.program.as_deref().is_none_or(|program| {
                        !DESKTOP_PROGRAMS.contains(&normalised(program).as_str())
                    })
                })
                .find(|user| !never(user.program.as_deref()))
                .map(|user| match &user.program {
                    Some(program) => human::one_line(program, 60),
                    None => format!("a program (process {})", user.pid),
                }),
            Err(why) => {
                blind.push((Signal::GpuUse, why.0.clone()));
                None
            }
        }
    }
}

/// A program name as the lists compare it: lower-case, without `.exe`.
fn normalised(program: &str) -> String {
    let lower = program.trim().to_lowercase();
    lower
        .strip_suffix(".exe")
        .map_or_else(|| lower.clone(), str::to_owned)
}

/// "resumes at 18:00" (today) or "resumes Mon at 08:00".
fn resume_time(settings: &PolicySection, day: usize, hour: u32) -> String {
    let ahead = settings.schedule.hours_until_change(day, hour);
    if ahead >= 7 * 24 {
        return "no hour of the week is allowed".to_owned();
    }
    let absolute = day as u32 * 24 + hour + ahead;
    let (resume_day, resume_hour) = ((absolute / 24 % 7) as usize, absolute % 24);
    if resume_day == day && ahead < 24 {
        format!("resumes at {resume_hour:02}:00")
    } else {
        let name = DAYS[resume_day];
        format!(
            "resumes {}{} at {resume_hour:02}:00",
            name[..1].to_uppercase(),
            &name[1..]
        )
    }
}

/// How long to rest after a denoising step that took `step_time`, so the job uses at most
/// `share_percent` of the GPU's time (≥ 100: no rest; below 10 counts as 10).
pub fn rest_after_step(step_time: Duration, share_percent: u32) -> Duration {
    if share_percent >= 100 {
        return Duration::ZERO;
    }
    let share = share_percent.max(10);
    step_time.mul_f64(f64::from(100 - share) / f64::from(share))
}

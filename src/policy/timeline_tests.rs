//! The policy over time: readings second by second, the decisions they lead to.

use std::time::{Duration, Instant};

use chrono::{NaiveDate, NaiveDateTime};

use super::{Decision, Policy, Readings, Signal};
use crate::config::PolicySection;
use crate::platform::probes::{FullScreen, GpuReading, GpuUser, Unavailable};
use crate::vocab::pause::PauseReason;

/// A policy on a test clock: `at(seconds, readings)` decides as that many seconds after the
/// start, on a local clock that starts at `local`.
struct Timeline {
    policy: Policy,
    settings: PolicySection,
    start: Instant,
    local: NaiveDateTime,
}

impl Timeline {
    fn new(settings: PolicySection) -> Self {
        Self {
            policy: Policy::new(),
            settings,
            start: Instant::now(),
            // A Wednesday afternoon.
            local: NaiveDate::from_ymd_opt(2026, 11, 25)
                .unwrap()
                .and_hms_opt(14, 0, 0)
                .unwrap(),
        }
    }

    fn at(&mut self, seconds: u64, readings: &Readings) -> Decision {
        let local = self.local + chrono::Duration::seconds(seconds as i64);
        self.at_local(seconds, local, readings)
    }

    fn at_local(&mut self, seconds: u64, local: NaiveDateTime, readings: &Readings) -> Decision {
        self.policy.decide(
            &self.settings,
            readings,
            self.start + Duration::from_secs(seconds),
            local,
        )
    }
}

fn reason(decision: &Decision) -> Option<PauseReason> {
    decision.pause.as_ref().map(|pause| pause.reason)
}

/// A quiet desktop: nothing on the GPU, no full-screen window, someone idle for an hour, on
/// mains power, a cool GPU.
fn quiet() -> Readings {
    Readings {
        gpu: Ok(GpuReading {
            users: vec![],
            temperature_c: Some(45),
        }),
        full_screen: Ok(None),
        idle: Ok(Duration::from_secs(3600)),
        on_battery: Ok(false),
        programs: Ok(vec!["bash".into(), "steam".into()]),
    }
}

fn gaming(percent: u32) -> Readings {
    let mut readings = quiet();
    readings.gpu = Ok(GpuReading {
        users: vec![GpuUser {
            pid: 4242,
            program: Some("Cyberpunk2077.exe".into()),
            percent,
        }],
        temperature_c: Some(60),
    });
    readings
}

fn hot(celsius: u32) -> Readings {
    let mut readings = quiet();
    readings.gpu = Ok(GpuReading {
        users: vec![],
        temperature_c: Some(celsius),
    });
    readings
}

#[test]
fn a_game_starting_pauses_at_once_and_its_end_resumes_after_the_grace() {
    let mut timeline = Timeline::new(PolicySection::default());
    assert_eq!(reason(&timeline.at(0, &quiet())), None);
    let paused = timeline.at(1, &gaming(85));
    assert_eq!(
        reason(&paused),
        Some(PauseReason::Game),
        "the first reading pauses"
    );
    let pause = paused.pause.unwrap();
    assert_eq!(pause.detail, "Cyberpunk2077.exe is running");
    assert_eq!(pause.resumes, "resumes 2 min after it closes");

    assert_eq!(
        reason(&timeline.at(600, &gaming(90))),
        Some(PauseReason::Game)
    );
    // Closed after 600 s (14:10:00): still paused for two minutes, saying when it resumes.
    let closing = timeline.at(601, &quiet());
    assert_eq!(reason(&closing), Some(PauseReason::Game));
    assert_eq!(
        closing.pause.unwrap().resumes,
        "resumes at 14:12:00",
        "seen last at 14:10:00, plus the grace; the same words each second"
    );
    let later = timeline.at(650, &quiet());
    assert_eq!(later.pause.unwrap().resumes, "resumes at 14:12:00");
    assert_eq!(reason(&timeline.at(719, &quiet())), Some(PauseReason::Game));
    assert_eq!(
        reason(&timeline.at(721, &quiet())),
        None,
        "120 s after it was last seen"
    );
}

#[test]
fn a_loading_screen_inside_the_grace_period_does_not_flap() {
    let mut timeline = Timeline::new(PolicySection::default());
    let mut decisions = Vec::new();
    // Play, a 30 s loading screen with the GPU idle, play again, then quit.
    for second in 0..300 {
        let readings = match second {
            0..=99 => gaming(80),
            100..=129 => quiet(),
            130..=199 => gaming(80),
            _ => quiet(),
        };
        decisions.push(reason(&timeline.at(second, &readings)));
    }
    assert!(
        decisions[..300]
            .iter()
            .all(|d| *d == Some(PauseReason::Game)),
        "paused throughout: the loading screen is inside the grace, and so is the end"
    );
    assert_eq!(reason(&timeline.at(320, &quiet())), None);
}

#[test]
fn utilisation_flapping_around_the_threshold_holds_the_pause() {
    let mut timeline = Timeline::new(PolicySection::default());
    let threshold = timeline.settings.gpu_busy_percent;
    // A light program hovering just under and over the threshold every second.
    let mut paused_seconds = 0;
    for second in 0..200 {
        let percent = if second % 2 == 0 {
            threshold - 1
        } else {
            threshold
        };
        if reason(&timeline.at(second, &gaming(percent))).is_some() {
            paused_seconds += 1;
        }
    }
    assert_eq!(
        paused_seconds, 199,
        "one change at the first crossing, none after"
    );
    // Always under it: never paused.
    let mut under = Timeline::new(PolicySection::default());
    assert!((0..60).all(|second| reason(&under.at(second, &gaming(threshold - 1))).is_none()));
}

#[test]
fn the_desktop_itself_and_programs_on_the_never_list_do_not_count() {
    let settings = PolicySection {
        never_pause_for: vec!["VLC".into()],
        ..PolicySection::default()
    };
    let mut timeline = Timeline::new(settings);
    let mut readings = quiet();
    readings.gpu = Ok(GpuReading {
        users: vec![
            GpuUser {
                pid: 1,
                program: Some("gnome-shell".into()),
                percent: 60,
            },
            GpuUser {
                pid: 2,
                program: Some("vlc".into()),
                percent: 70,
            },
        ],
        temperature_c: Some(50),
    });
    readings.full_screen = Ok(Some(FullScreen {
        program: Some("vlc.exe".into()),
        title: Some("Holiday.mkv".into()),
    }));
    assert_eq!(reason(&timeline.at(0, &readings)), None);
}

#[test]
fn a_full_screen_window_is_a_game_named_by_its_title() {
    let mut timeline = Timeline::new(PolicySection::default());
    let mut readings = quiet();
    readings.full_screen = Ok(Some(FullScreen {
        program: Some("witcher3.exe".into()),
        title: Some("The Witcher 3".into()),
    }));
    let decision = timeline.at(0, &readings);
    assert_eq!(decision.pause.unwrap().detail, "The Witcher 3 is running");
}

#[test]
fn the_always_list_pauses_even_with_game_detection_off() {
    let settings = PolicySection {
        pause_for_games: false,
        always_pause_for: vec!["Steam.exe".into()],
        ..PolicySection::default()
    };
    let mut timeline = Timeline::new(settings);
    let decision = timeline.at(0, &gaming(99));
    let pause = decision.pause.expect("steam runs: the always list holds");
    assert_eq!(pause.detail, "Steam.exe is running");
    timeline.settings.always_pause_for.clear();
    assert_eq!(
        reason(&timeline.at(1000, &gaming(99))),
        None,
        "and detection is off"
    );
}

#[test]
fn the_person_resuming_during_a_game_wins_until_the_game_starts_again() {
    let mut timeline = Timeline::new(PolicySection::default());
    assert_eq!(
        reason(&timeline.at(0, &gaming(80))),
        Some(PauseReason::Game)
    );
    timeline.policy.resume();
    let resumed = timeline.at(1, &gaming(80));
    assert_eq!(reason(&resumed), None, "the person wins");
    assert_eq!(resumed.overridden, vec![PauseReason::Game]);
    assert_eq!(
        reason(&timeline.at(100, &gaming(80))),
        None,
        "for the whole game"
    );
    assert_eq!(reason(&timeline.at(101, &quiet())), None, "and its grace");
    // The game starts again: its pause is back.
    assert_eq!(
        reason(&timeline.at(400, &gaming(80))),
        Some(PauseReason::Game)
    );
}

#[test]
fn resuming_in_a_games_grace_lasts_until_the_next_game() {
    let mut timeline = Timeline::new(PolicySection::default());
    timeline.at(0, &gaming(80));
    assert_eq!(reason(&timeline.at(10, &quiet())), Some(PauseReason::Game));
    timeline.policy.resume();
    assert_eq!(reason(&timeline.at(11, &quiet())), None);
    assert_eq!(
        reason(&timeline.at(50, &gaming(80))),
        Some(PauseReason::Game)
    );
}

#[test]
fn only_while_away_pauses_the_moment_input_comes_back() {
    let settings = PolicySection {
        only_when_away: true,
        ..PolicySection::default()
    };
    let mut timeline = Timeline::new(settings);
    let idle = |seconds: u64| {
        let mut readings = quiet();
        readings.idle = Ok(Duration::from_secs(seconds));
        readings
    };
    assert_eq!(
        reason(&timeline.at(0, &idle(299))),
        Some(PauseReason::Active)
    );
    assert_eq!(reason(&timeline.at(1, &idle(300))), None, "5 min away");
    assert_eq!(
        reason(&timeline.at(2, &idle(0))),
        Some(PauseReason::Active),
        "back at once"
    );
    // Where the OS cannot tell, the setting is said to have no effect, and nothing pauses.
    let mut blind = quiet();
    blind.idle = Err(Unavailable("Wayland does not tell".into()));
    let decision = timeline.at(3, &blind);
    assert_eq!(reason(&decision), None);
    assert_eq!(
        decision.blind,
        vec![(Signal::Input, "Wayland does not tell".into())]
    );
}

#[test]
fn the_schedule_follows_the_local_clock_across_a_dst_change() {
    let mut settings = PolicySection {
        use_schedule: true,
        ..PolicySection::default()
    };
    // Sundays: only from 03:00 to 05:00 and from 22:00.
    settings.schedule.set(6, 0, false);
    settings.schedule.set(6, 1, false);
    settings.schedule.set(6, 2, false);
    for hour in 5..22 {
        settings.schedule.set(6, hour, false);
    }
    let mut timeline = Timeline::new(settings);
    let sunday = |hour: u32, minute: u32| {
        NaiveDate::from_ymd_opt(2026, 3, 29) // the EU's spring-forward Sunday
            .unwrap()
            .and_hms_opt(hour, minute, 0)
            .unwrap()
    };
    let decision = timeline.at_local(0, sunday(1, 59), &quiet());
    assert_eq!(reason(&decision), Some(PauseReason::Schedule));
    assert_eq!(decision.pause.unwrap().resumes, "resumes at 03:00");
    // The clock jumps from 02:00 to 03:00; one real second later it is 03:00:00.
    assert_eq!(reason(&timeline.at_local(1, sunday(3, 0), &quiet())), None);
    assert_eq!(reason(&timeline.at_local(2, sunday(4, 59), &quiet())), None);
    let evening = timeline.at_local(3, sunday(5, 0), &quiet());
    assert_eq!(evening.pause.unwrap().resumes, "resumes at 22:00");
    // Autumn: 02:30 happens twice; the wall clock decides both times.
    let autumn = NaiveDate::from_ymd_opt(2026, 10, 25)
        .unwrap()
        .and_hms_opt(2, 30, 0)
        .unwrap();
    assert_eq!(
        reason(&timeline.at_local(4, autumn, &quiet())),
        Some(PauseReason::Schedule)
    );
    assert_eq!(
        reason(&timeline.at_local(3604, autumn, &quiet())),
        Some(PauseReason::Schedule)
    );
    // Saturday 23:00 → the next allowed hour is Sunday 03:00.
    let saturday = NaiveDate::from_ymd_opt(2026, 10, 24)
        .unwrap()
        .and_hms_opt(23, 0, 0)
        .unwrap();
    timeline.settings.schedule.set(5, 23, false);
    let late = timeline.at_local(5, saturday, &quiet());
    assert_eq!(late.pause.unwrap().resumes, "resumes Sun at 03:00");
}

#[test]
fn temperature_oscillating_around_the_limit_pauses_once_and_resumes_5_below() {
    let mut timeline = Timeline::new(PolicySection::default());
    let trace = [80, 83, 84, 83, 82, 84, 80, 79, 78, 77, 84, 82];
    let paused: Vec<bool> = trace
        .iter()
        .enumerate()
        .map(|(second, celsius)| reason(&timeline.at(second as u64, &hot(*celsius))).is_some())
        .collect();
    assert_eq!(
        paused,
        [
            false, false, true, true, true, true, true, true, true, false, true, true
        ],
        "above 83 pauses; only below 78 resumes"
    );
    let decision = timeline.at(20, &hot(90));
    assert_eq!(
        decision.pause.unwrap().detail,
        "the GPU is at 90 °C (limit 83 °C)"
    );
    timeline.settings.temperature_limit_c = 0;
    assert_eq!(reason(&timeline.at(21, &hot(95))), None, "0: no limit");
}

#[test]
fn battery_unplugged_pauses_and_plugging_in_resumes() {
    let mut timeline = Timeline::new(PolicySection::default());
    let mut unplugged = quiet();
    unplugged.on_battery = Ok(true);
    assert_eq!(reason(&timeline.at(0, &quiet())), None);
    assert_eq!(
        reason(&timeline.at(1, &unplugged)),
        Some(PauseReason::Battery)
    );
    assert_eq!(reason(&timeline.at(2, &quiet())), None);
    timeline.settings.pause_on_battery = false;
    assert_eq!(reason(&timeline.at(3, &unplugged)), None);
}

#[test]
fn several_reasons_report_the_first_in_the_protocols_order() {
    let settings = PolicySection {
        only_when_away: true,
        ..PolicySection::default()
    };
    let mut timeline = Timeline::new(settings);
    let mut everything = gaming(90);
    everything.on_battery = Ok(true);
    everything.idle = Ok(Duration::ZERO);
    everything.gpu = Ok(GpuReading {
        users: vec![GpuUser {
            pid: 7,
            program: Some("game".into()),
            percent: 90,
        }],
        temperature_c: Some(95),
    });
    assert_eq!(
        reason(&timeline.at(0, &everything)),
        Some(PauseReason::Game)
    );
    // Resume overrides all of them; the battery pause returns when it is unplugged again.
    timeline.policy.resume();
    assert_eq!(reason(&timeline.at(1, &everything)), None);
    let mut plugged = everything.clone();
    plugged.on_battery = Ok(false);
    timeline.at(2, &plugged);
    assert_eq!(
        reason(&timeline.at(3, &everything)),
        Some(PauseReason::Battery)
    );
}

#[test]
fn with_every_signal_absent_the_worker_runs_and_says_what_it_cannot_see() {
    let settings = PolicySection {
        only_when_away: true,
        always_pause_for: vec!["steam".into()],
        ..PolicySection::default()
    };
    let mut timeline = Timeline::new(settings);
    let decision = timeline.at(0, &Readings::default());
    assert_eq!(reason(&decision), None);
    let signals: Vec<Signal> = decision.blind.iter().map(|(signal, _)| *signal).collect();
    assert_eq!(
        signals,
        [
            Signal::Programs,
            Signal::FullScreen,
            Signal::GpuUse,
            Signal::Input,
            Signal::Temperature,
            Signal::Battery
        ]
    );
}

#[test]
fn the_gpu_share_cap_rests_in_proportion() {
    let step = Duration::from_millis(700);
    assert_eq!(super::rest_after_step(step, 100), Duration::ZERO);
    assert_eq!(super::rest_after_step(step, 70), Duration::from_millis(300));
    assert_eq!(super::rest_after_step(step, 50), step);
    assert_eq!(
        super::rest_after_step(step, 0),
        step * 9,
        "10 % at the least"
    );
}

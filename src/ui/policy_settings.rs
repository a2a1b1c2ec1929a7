//! The Settings tab's "When to step aside" section: the good-guest policy's settings
//! (`[policy]`), with the defaults a gamer would pick, and what this PC cannot see.

use crate::config::PolicySection;
use crate::policy::Signal;
use crate::vocab::schedule::{DAYS, WeeklyHours};

/// The most programs a list may name, and the longest name.
const MAX_PROGRAMS: usize = 64;
const MAX_PROGRAM_CHARS: usize = 128;

/// What the person is editing.
#[derive(Clone, Debug)]
pub struct PolicyForm {
    pub policy: PolicySection,
    /// The lists as typed: one program per line (or comma-separated).
    pub always_text: String,
    pub never_text: String,
    /// The temperature limit's switch; the limit itself is kept while it is off.
    pub temperature_on: bool,
    pub temperature_c: u32,
}

impl PolicyForm {
    pub fn from_settings(policy: &PolicySection) -> Self {
        Self {
            policy: policy.clone(),
            always_text: policy.always_pause_for.join("\n"),
            never_text: policy.never_pause_for.join("\n"),
            temperature_on: policy.temperature_limit_c > 0,
            temperature_c: if policy.temperature_limit_c > 0 {
                policy.temperature_limit_c
            } else {
                PolicySection::default().temperature_limit_c
            },
        }
    }

    /// The section to save, or why it cannot be saved.
    pub fn validate(&self) -> Result<PolicySection, String> {
        let mut policy = self.policy.clone();
        policy.always_pause_for = programs("always pause", &self.always_text)?;
        policy.never_pause_for = programs("never pause", &self.never_text)?;
        policy.temperature_limit_c = if self.temperature_on {
            self.temperature_c
        } else {
            0
        };
        if policy.use_schedule && !policy.schedule.any() {
            return Err("the schedule allows no hour at all; allow some or turn it off".to_owned());
        }
        Ok(policy)
    }
}

/// A typed list of program names: one a line or comma-separated, blanks dropped.
fn programs(list: &str, text: &str) -> Result<Vec<String>, String> {
    let names: Vec<String> = text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect();
    if names.len() > MAX_PROGRAMS {
        return Err(format!(
            "the {list} list has more than {MAX_PROGRAMS} programs"
        ));
    }
    if let Some(long) = names
        .iter()
        .find(|name| name.chars().count() > MAX_PROGRAM_CHARS)
    {
        return Err(format!(
            "“{}…” in the {list} list is not a program name",
            long.chars().take(20).collect::<String>()
        ));
    }
    Ok(names)
}

/// The section; `blind` says which signals this PC cannot give (from the running policy).
pub fn policy_settings_ui(ui: &mut egui::Ui, form: &mut PolicyForm, blind: &[(Signal, String)]) {
    ui.strong("When to step aside");
    let blind_note = |ui: &mut egui::Ui, signals: &[Signal]| {
        for (signal, why) in blind.iter().filter(|(signal, _)| signals.contains(signal)) {
            ui.label(
                egui::RichText::new(format!("This PC cannot tell {}: {why}.", signal.describe()))
                    .weak(),
            );
        }
    };
    let policy = &mut form.policy;

    ui.checkbox(
        &mut policy.pause_for_games,
        "Pause while a game runs (a program using the GPU heavily, or a full-screen window)",
    );
    ui.indent("games", |ui| {
        ui.add_enabled_ui(policy.pause_for_games, |ui| {
            ui.horizontal(|ui| {
                ui.label("Take jobs again");
                ui.add(
                    egui::DragValue::new(&mut policy.resume_after_game_s)
                        .range(0..=3600)
                        .suffix(" s"),
                );
                ui.label("after it closes");
            });
            ui.horizontal(|ui| {
                ui.label("A program is a game when it uses at least");
                ui.add(
                    egui::DragValue::new(&mut policy.gpu_busy_percent)
                        .range(1..=100)
                        .suffix(" %"),
                );
                ui.label("of the GPU");
            });
            blind_note(ui, &[Signal::GpuUse, Signal::FullScreen]);
        });
        ui.horizontal(|ui| {
            let label = ui.label("Always pause while these run:");
            ui.add(
                egui::TextEdit::multiline(&mut form.always_text)
                    .desired_rows(2)
                    .desired_width(260.0)
                    .hint_text("obs64.exe\nresolve"),
            )
            .labelled_by(label.id);
        });
        ui.horizontal(|ui| {
            let label = ui.label("Never pause for these:");
            ui.add(
                egui::TextEdit::multiline(&mut form.never_text)
                    .desired_rows(2)
                    .desired_width(260.0)
                    .hint_text("vlc"),
            )
            .labelled_by(label.id);
        });
        ui.label(
            egui::RichText::new(
                "Program names as the task manager shows them, one a line (.exe may be left out).",
            )
            .weak(),
        );
        blind_note(ui, &[Signal::Programs]);
    });

    ui.horizontal(|ui| {
        ui.checkbox(&mut policy.only_when_away, "Only while I am away: after");
        ui.add_enabled(
            policy.only_when_away,
            egui::DragValue::new(&mut policy.away_after_min)
                .range(1..=240)
                .suffix(" min"),
        );
        ui.label("without keyboard or mouse");
    });
    if policy.only_when_away {
        ui.indent("away", |ui| {
            ui.label(
                egui::RichText::new(
                    "A gamepad may not count as input: games are noticed on their own above.",
                )
                .weak(),
            );
            blind_note(ui, &[Signal::Input]);
        });
    }

    ui.checkbox(
        &mut policy.use_schedule,
        "Only in these hours (this PC's clock)",
    );
    if policy.use_schedule {
        ui.indent("schedule", |ui| {
            schedule_grid_ui(ui, &mut policy.schedule);
            ui.label(
                egui::RichText::new("Coloured hours may be worked. Click or drag to change them.")
                    .weak(),
            );
        });
    }

    ui.horizontal(|ui| {
        ui.checkbox(&mut form.temperature_on, "Pause while the GPU is above");
        ui.add_enabled(
            form.temperature_on,
            egui::DragValue::new(&mut form.temperature_c)
                .range(50..=100)
                .suffix(" °C"),
        );
        ui.label("(resumes 5 °C below)");
    });
    if form.temperature_on {
        ui.indent("temperature", |ui| blind_note(ui, &[Signal::Temperature]));
    }
    ui.horizontal(|ui| {
        let label = ui.label("Use at most");
        ui.add(
            egui::Slider::new(&mut policy.max_gpu_share_percent, 10..=100).suffix(" % of the GPU"),
        )
        .labelled_by(label.id);
        ui.label("(rests between steps: cooler and quieter)");
    });
    ui.checkbox(&mut policy.pause_on_battery, "Pause while on battery");
    if policy.pause_on_battery {
        ui.indent("battery", |ui| blind_note(ui, &[Signal::Battery]));
    }
}

/// A week of hour cells: click one to allow or forbid it, or drag across several.
fn schedule_grid_ui(ui: &mut egui::Ui, hours: &mut WeeklyHours) {
    const CELL: f32 = 14.0;
    let paint_id = ui.make_persistent_id("schedule-paint");
    let pointer_down = ui.input(|input| input.pointer.primary_down());
    if !pointer_down {
        ui.data_mut(|data| data.remove::<bool>(paint_id));
    }
    egui::Grid::new("schedule-grid")
        .spacing([2.0, 2.0])
        .min_col_width(CELL)
        .show(ui, |ui| {
            ui.label("");
            for hour in 0..24 {
                // Every third hour named, in a cell's width (the label may overhang).
                let (rect, _) =
                    ui.allocate_exact_size(egui::vec2(CELL, CELL), egui::Sense::hover());
                if hour % 3 == 0 {
                    ui.painter().text(
                        rect.left_center(),
                        egui::Align2::LEFT_CENTER,
                        hour.to_string(),
                        egui::FontId::proportional(10.0),
                        ui.visuals().weak_text_color(),
                    );
                }
            }
            ui.end_row();
            for (day, name) in DAYS.iter().enumerate() {
                let mut title = name.to_string();
                title[..1].make_ascii_uppercase();
                ui.label(&title);
                for hour in 0..24 {
                    let allowed = hours.allows(day, hour);
                    let (rect, response) = ui
                        .allocate_exact_size(egui::vec2(CELL, CELL), egui::Sense::click_and_drag());
                    let label = format!("{title} {hour:02}:00");
                    response.widget_info(|| {
                        egui::WidgetInfo::selected(egui::Role::CheckBox, true, allowed, &label)
                    });
                    let fill = if allowed {
                        ui.visuals().selection.bg_fill
                    } else {
                        ui.visuals().extreme_bg_color
                    };
                    ui.painter().rect_filled(rect, 2.0, fill);
                    if response.clicked() {
                        hours.set(day, hour, !allowed);
                    } else if response.drag_started() {
                        ui.data_mut(|data| data.insert_temp(paint_id, !allowed));
                        hours.set(day, hour, !allowed);
                    } else if pointer_down
                        && ui.rect_contains_pointer(rect)
                        && let Some(paint) = ui.data(|data| data.get_temp::<bool>(paint_id))
                    {
                        hours.set(day, hour, paint);
                    }
                }
                ui.end_row();
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_read_one_a_line_or_comma_separated() {
        assert_eq!(
            programs("always", " obs64.exe\n\nresolve , steam ").unwrap(),
            vec!["obs64.exe", "resolve", "steam"]
        );
        assert!(programs("always", &"x".repeat(200)).is_err());
        let mut form = PolicyForm::from_settings(&PolicySection::default());
        form.temperature_on = false;
        assert_eq!(form.validate().unwrap().temperature_limit_c, 0);
        form.policy.use_schedule = true;
        form.policy.schedule = WeeklyHours::NEVER;
        assert!(
            form.validate().is_err(),
            "a schedule without hours would never run"
        );
    }
}

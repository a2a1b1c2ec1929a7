//! The Status tab: the registration in plain words, the studio connection, pause, the running
//! job, this PC, and what was done since start.

use chrono::Utc;

use super::app::UiAction;
use crate::human;
use crate::registration::RegistrationState;
use crate::runtime::{Command, WorkerStatus};
use crate::vocab::pause::PauseReason;

/// View state the tab keeps between frames.
#[derive(Debug, Default)]
pub struct StatusView {
    pub confirming_reset: bool,
}

pub fn status_tab_ui(
    ui: &mut egui::Ui,
    status: &WorkerStatus,
    view: &mut StatusView,
    actions: &mut Vec<UiAction>,
) {
    if let Some(fatal) = &status.fatal {
        ui.colored_label(
            ui.visuals().error_fg_color,
            format!("The worker stopped: {fatal}"),
        );
    }
    if let Some(notice) = &status.settings_recovered {
        ui.colored_label(ui.visuals().warn_fg_color, human::capitalise(notice));
    }
    if !status.settings_unknown.is_empty() {
        ui.colored_label(
            ui.visuals().warn_fg_color,
            format!(
                "Your settings file has settings this version does not know, so they are not \
                 used (misspelt?): {}. They stay in the file.",
                status.settings_unknown.join(", ")
            ),
        );
    }
    if let Some(problem) = &status.settings_problem {
        ui.colored_label(ui.visuals().error_fg_color, human::capitalise(problem));
    }
    if let Some(problem) = &status.settings_unsaved {
        ui.colored_label(
            ui.visuals().error_fg_color,
            format!(
                "Your settings cannot be saved ({problem}): the ones in use hold until \
                 studio-worker restarts."
            ),
        );
    }

    if let Some(problem) = &status.studio_url_problem {
        // Nothing talks to the studio: registration and job state would only mislead.
        ui.heading("Not connected to the studio");
        ui.colored_label(ui.visuals().error_fg_color, human::capitalise(problem));
    } else {
        registration_ui(ui, status, view, actions);
        ui.separator();
        generation_ui(ui, status, actions);
    }
    ui.separator();
    current_job_ui(ui, status);
    ui.separator();
    connection_ui(ui, status);
    ui.separator();
    this_pc_ui(ui, status);
}

fn registration_ui(
    ui: &mut egui::Ui,
    status: &WorkerStatus,
    view: &mut StatusView,
    actions: &mut Vec<UiAction>,
) {
    let now = Utc::now();
    match &status.registration {
        RegistrationState::Pristine => {
            ui.heading("Asking the studio to approve this PC…");
        }
        RegistrationState::Pending { since, .. } => {
            let requested = since.map_or_else(String::new, |since| {
                format!(" (requested {})", human::ago(since, now))
            });
            ui.heading(format!(
                "Waiting for the studio to approve this PC{requested}"
            ));
            ui.label("The studio's operator approves new PCs. Nothing to do here: this page updates by itself.");
        }
        RegistrationState::Approved { worker_id } => {
            ui.heading(format!("Approved as {worker_id}"));
        }
        RegistrationState::Rejected { reason } => {
            ui.heading(format!("Rejected: {reason}"));
            reset_registration_ui(ui, &mut view.confirming_reset, actions);
        }
        RegistrationState::Revoked { .. } => {
            ui.heading("Access revoked");
            ui.label("The studio no longer accepts this PC. Reset the registration to ask again.");
            reset_registration_ui(ui, &mut view.confirming_reset, actions);
        }
    }
    if let Some(problem) = &status.registration_problem {
        ui.colored_label(ui.visuals().warn_fg_color, human::capitalise(problem));
    }
}

/// A Reset button that asks first, saying exactly what a reset does.
pub fn reset_registration_ui(
    ui: &mut egui::Ui,
    confirming: &mut bool,
    actions: &mut Vec<UiAction>,
) {
    if !*confirming {
        if ui.button("Reset registration…").clicked() {
            *confirming = true;
        }
        return;
    }
    egui::Frame::group(ui.style()).show(ui, |ui| {
        ui.strong("Reset registration?");
        ui.label(
            "This PC forgets its approval (worker id and access token) and asks the studio again; \
             the studio's operator has to approve it again. Your settings are kept.",
        );
        ui.horizontal(|ui| {
            if ui.button("Reset").clicked() {
                actions.push(UiAction::Send(Command::ResetRegistration));
                *confirming = false;
            }
            if ui.button("Cancel").clicked() {
                *confirming = false;
            }
        });
    });
}

fn generation_ui(ui: &mut egui::Ui, status: &WorkerStatus, actions: &mut Vec<UiAction>) {
    ui.horizontal(|ui| {
        // The person can lift their own pause and the policy's, never the studio's.
        let may_resume = status
            .paused
            .is_some_and(|reason| reason != PauseReason::Studio);
        let (label, command) = if may_resume {
            ("Resume generation", Command::Resume)
        } else {
            ("Pause generation", Command::Pause)
        };
        let button = egui::Button::new(egui::RichText::new(label).size(18.0))
            .min_size(egui::vec2(220.0, 40.0));
        if ui.add(button).clicked() {
            actions.push(UiAction::Send(command));
        }
        ui.vertical(|ui| {
            match status.paused {
                Some(reason) => {
                    match status
                        .policy
                        .pause
                        .as_ref()
                        .filter(|pause| pause.reason == reason)
                    {
                        Some(pause) => {
                            ui.strong(format!("Paused: {}", pause.detail));
                            ui.label(format!(
                                "{}. Resume generation to work anyway until it next starts.",
                                human::capitalise(&pause.resumes)
                            ));
                        }
                        None => {
                            ui.strong(human::capitalise(reason.describe()));
                        }
                    }
                    if reason == PauseReason::Studio {
                        ui.label("The studio resumes this PC when it wants jobs done again.");
                    }
                }
                None => match &status.jobs.claim_blocked {
                    Some(why) => {
                        ui.strong("Not taking jobs");
                        ui.label(human::capitalise(why));
                    }
                    None if status.jobs.current.is_some() => {
                        ui.strong("Working");
                    }
                    None => {
                        ui.strong("Taking jobs");
                        ui.label("Your GPU is lent to the studio while this is on.");
                    }
                },
            };
            if !status.policy.overridden.is_empty() && status.paused.is_none() {
                let reasons: Vec<&str> = status
                    .policy
                    .overridden
                    .iter()
                    .map(|reason| override_name(*reason))
                    .collect();
                ui.label(
                    egui::RichText::new(format!(
                        "You resumed over {}: the worker pauses again when it next starts.",
                        reasons.join(" and ")
                    ))
                    .weak(),
                );
            }
        });
    });
}

/// What the person overrode, in a sentence ("You resumed over a game").
fn override_name(reason: PauseReason) -> &'static str {
    match reason {
        PauseReason::Game => "a game",
        PauseReason::Active => "your being at the PC",
        PauseReason::Schedule => "the schedule",
        PauseReason::Temperature => "the temperature limit",
        PauseReason::Battery => "battery power",
        PauseReason::User | PauseReason::Studio => "a pause",
    }
}

fn current_job_ui(ui: &mut egui::Ui, status: &WorkerStatus) {
    let Some(job) = &status.jobs.current else {
        ui.label("No job running.");
        return;
    };
    ui.strong("Running job");
    ui.label(egui::RichText::new(format!("“{}”", job.prompt)).italics());
    ui.label(format!(
        "{} · {}×{} · {} steps · {} image{}",
        job.model,
        job.width,
        job.height,
        job.steps,
        job.num_images,
        if job.num_images == 1 { "" } else { "s" }
    ));
    let fraction = if job.total_steps == 0 {
        0.0
    } else {
        job.step as f32 / job.total_steps as f32
    };
    ui.add(egui::ProgressBar::new(fraction).text(format!(
        "{}: step {} of {}",
        human::capitalise(job.stage.describe()),
        job.step,
        job.total_steps
    )));
    let elapsed = (Utc::now() - job.started_at).to_std().unwrap_or_default();
    ui.label(format!("Running for {}", human::duration(elapsed)));
}

fn connection_ui(ui: &mut egui::Ui, status: &WorkerStatus) {
    let now = Utc::now();
    ui.strong("Studio");
    ui.label(&status.api_base_url);
    let connection = &status.connection;
    match connection.last_heartbeat_at {
        Some(at) => ui.label(format!("Last heartbeat {}", human::ago(at, now))),
        None => ui.label("No heartbeat yet"),
    };
    if let Some(next) = connection.next_heartbeat_at {
        let wait = (next - now).to_std().unwrap_or_default();
        ui.label(format!("Next in {}", human::duration(wait)));
    }
    if let Some(error) = &connection.last_error {
        ui.colored_label(ui.visuals().warn_fg_color, format!("Last problem: {error}"));
    }
}

fn this_pc_ui(ui: &mut egui::Ui, status: &WorkerStatus) {
    ui.strong("This PC");
    if let Some(device) = &status.device {
        ui.label(format!(
            "Runs on: {} · {} · {:.1} GB",
            device.kind.label(),
            device.name,
            device.memory_mb as f64 / 1024.0
        ));
    }
    if let Some(note) = &status.device_note {
        ui.label(egui::RichText::new(human::capitalise(note)).weak());
    }
    if let Some(restarted) = &status.restarted {
        ui.colored_label(ui.visuals().warn_fg_color, restarted.describe(Utc::now()));
    }
    for (signal, why) in &status.policy.blind {
        ui.label(
            egui::RichText::new(format!(
                "Not watched on this PC: {} ({why})",
                crate::policy::Signal::describe(*signal)
            ))
            .weak(),
        );
    }
    if let Some(models) = status.models_summary() {
        ui.label(human::capitalise(&models));
    }
    for refused in &status.models_refused {
        ui.colored_label(
            ui.visuals().warn_fg_color,
            format!("{} is not served: {}", refused.model_id, refused.reason),
        );
    }
    for download in &status.downloads {
        download_ui(ui, download);
    }
    let counters = &status.jobs.counters;
    ui.label(format!(
        "Since start: {} jobs done, {} images, {} failed; {} result{} waiting to upload",
        counters.jobs_completed,
        counters.images_generated,
        counters.jobs_failed,
        status.jobs.outbox_len,
        if status.jobs.outbox_len == 1 { "" } else { "s" }
    ));
}

/// "Downloading sd-turbo: 1.23 GB of 2.58 GB · 18 MB/s · about 1 min left", with a bar.
fn download_ui(ui: &mut egui::Ui, download: &crate::runtime::ModelDownload) {
    if download.total_bytes == 0 && download.problem.is_none() {
        ui.label(format!(
            "Downloading {}: asking the hub what to fetch…",
            download.model_id
        ));
        return;
    }
    if download.total_bytes > 0 {
        let fraction = download.done_bytes as f32 / download.total_bytes as f32;
        let text = format!(
            "Downloading {}: {}",
            download.model_id,
            download.words().join(" · ")
        );
        ui.add(egui::ProgressBar::new(fraction).text(text));
    }
    if let Some(problem) = &download.problem {
        ui.colored_label(
            ui.visuals().warn_fg_color,
            format!("{}: {problem}", download.model_id),
        );
    }
}

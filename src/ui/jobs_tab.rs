//! The Jobs tab: results waiting to upload, and the recent jobs with how each ended.

use chrono::Local;

use super::app::UiAction;
use super::thumbnail_cache::ThumbnailCache;
use crate::human;
use crate::runtime::{Command, Delivery, JobOutcome, WaitingState, WorkerStatus};

/// The Jobs tab's own view state.
#[derive(Debug, Default)]
pub struct JobsView {
    /// The job whose preview is shown large.
    pub enlarged: Option<String>,
}

pub fn jobs_tab_ui(
    ui: &mut egui::Ui,
    status: &WorkerStatus,
    thumbnails: &mut ThumbnailCache,
    view: &mut JobsView,
    actions: &mut Vec<UiAction>,
) {
    let waiting = status.jobs.outbox_len;
    ui.heading("Jobs");
    ui.horizontal(|ui| {
        ui.label(match waiting {
            0 => "Every finished result is with the studio.".to_owned(),
            1 => "1 finished result is waiting to upload.".to_owned(),
            n => format!("{n} finished results are waiting to upload."),
        });
        if (waiting > 0 || !status.jobs.waiting.is_empty()) && ui.button("Retry now").clicked() {
            actions.push(UiAction::Send(Command::RetryUploads));
        }
    });
    waiting_ui(ui, status, actions);
    ui.add_space(8.0);

    if status.jobs.recent.is_empty() {
        ui.label("No jobs yet since start.");
        return;
    }
    egui::Grid::new("recent-jobs")
        .striped(true)
        .num_columns(9)
        .spacing([12.0, 6.0])
        .show(ui, |ui| {
            for title in [
                "", "Time", "Prompt", "Model", "Size", "Outcome", "Took", "Seed", "",
            ] {
                ui.strong(title);
            }
            ui.end_row();
            for job in &status.jobs.recent {
                let texture = job
                    .thumbnail
                    .as_deref()
                    .and_then(|path| thumbnails.get(ui.ctx(), path));
                match texture {
                    Some(texture) => {
                        let response = ui
                            .add(
                                egui::Image::new(texture)
                                    .max_height(48.0)
                                    .sense(egui::Sense::click()),
                            )
                            .on_hover_text("Click to see it larger");
                        response.widget_info(|| {
                            egui::WidgetInfo::labeled(
                                egui::Role::Button,
                                true,
                                "Show the image larger",
                            )
                        });
                        if response.clicked() {
                            view.enlarged = Some(job.job_id.clone());
                        }
                    }
                    None => {
                        ui.label("");
                    }
                }
                ui.label(
                    job.finished_at
                        .with_timezone(&Local)
                        .format("%H:%M:%S")
                        .to_string(),
                );
                ui.label(human::one_line(&job.prompt, 48))
                    .on_hover_text(job.prompt.as_str());
                ui.label(job.model.as_str());
                ui.label(format!("{}×{}, {} steps", job.width, job.height, job.steps));
                let (text, problem) = outcome(&job.outcome);
                if problem {
                    ui.colored_label(ui.visuals().warn_fg_color, text);
                } else {
                    ui.label(text);
                }
                ui.label(human::duration(std::time::Duration::from_millis(
                    job.duration_ms,
                )));
                ui.label(
                    job.seed
                        .map_or_else(|| "—".to_owned(), |seed| seed.to_string()),
                );
                match job.saved_copies.first() {
                    Some(path) => {
                        if ui
                            .button("Open")
                            .on_hover_text(path.display().to_string())
                            .clicked()
                        {
                            actions.push(UiAction::OpenFile(path.clone()));
                        }
                    }
                    None => {
                        ui.label("");
                    }
                }
                ui.end_row();
            }
        });
    preview_ui(ui, status, thumbnails, view, actions);
}

/// The results that wait for more than their turn (the studio refused them, their files
/// cannot be read), each with what the studio said and a Discard button.
fn waiting_ui(ui: &mut egui::Ui, status: &WorkerStatus, actions: &mut Vec<UiAction>) {
    let troubled: Vec<_> = status
        .jobs
        .waiting
        .iter()
        .filter(|result| !matches!(result.state, WaitingState::Queued))
        .collect();
    if troubled.is_empty() {
        return;
    }
    ui.add_space(4.0);
    egui::Grid::new("waiting-results")
        .striped(true)
        .num_columns(3)
        .spacing([12.0, 6.0])
        .show(ui, |ui| {
            for result in troubled {
                let title = if result.prompt.is_empty() {
                    result.job_id.clone()
                } else {
                    human::one_line(&result.prompt, 40)
                };
                ui.label(title).on_hover_text(&result.job_id);
                let (text, problem) = waiting_words(&result.state);
                if problem {
                    ui.colored_label(ui.visuals().warn_fg_color, text);
                } else {
                    ui.label(text);
                }
                let discard = ui.button("Discard").on_hover_text(
                    "Give up on this result: the studio hears it failed, and it is deleted",
                );
                discard.widget_info(|| {
                    egui::WidgetInfo::labeled(
                        egui::Role::Button,
                        true,
                        format!("Discard {}", result.job_id),
                    )
                });
                if discard.clicked() {
                    actions.push(UiAction::Send(Command::DiscardResult {
                        key: result.key.clone(),
                    }));
                }
                ui.end_row();
            }
        });
}

/// A waiting result's state in words, and whether it is a problem.
fn waiting_words(state: &WaitingState) -> (String, bool) {
    match state {
        WaitingState::Queued => ("Uploading".to_owned(), false),
        WaitingState::Retrying { problem } => (format!("Retrying: {problem}"), true),
        WaitingState::Refused {
            studio_answer,
            gives_up_at,
        } => (
            format!(
                "Waiting for the studio ({studio_answer}); given up {}",
                gives_up_at.with_timezone(&Local).format("%a %d %b %H:%M")
            ),
            true,
        ),
        WaitingState::Unreadable { problem } => (format!("Kept: {problem}"), true),
        WaitingState::Damaged { problem } => (format!("Damaged, kept: {problem}"), true),
        WaitingState::DeliveredNotRemoved => (
            "Delivered, but could not be deleted from this PC (Retry now tries again)".to_owned(),
            false,
        ),
    }
}

/// The preview of one job, as large as it was kept (512 px), over the tab; Escape, a
/// click outside or Close dismisses it.
fn preview_ui(
    ui: &mut egui::Ui,
    status: &WorkerStatus,
    thumbnails: &mut ThumbnailCache,
    view: &mut JobsView,
    actions: &mut Vec<UiAction>,
) {
    let Some(job_id) = &view.enlarged else {
        return;
    };
    let Some(job) = status.jobs.recent.iter().find(|job| &job.job_id == job_id) else {
        view.enlarged = None;
        return;
    };
    let texture = job
        .thumbnail
        .as_deref()
        .and_then(|path| thumbnails.get(ui.ctx(), path));
    let modal = egui::Modal::new(egui::Id::unique("job-preview")).show(ui.ctx(), |ui| {
        if let Some(texture) = texture {
            ui.add(egui::Image::new(texture).max_size(egui::vec2(512.0, 512.0)));
        }
        ui.label(human::one_line(&job.prompt, 200));
        ui.weak(format!(
            "{}, {}×{}, {} steps, seed {}",
            job.model,
            job.width,
            job.height,
            job.steps,
            job.seed
                .map_or_else(|| "—".to_owned(), |seed| seed.to_string())
        ));
        ui.horizontal(|ui| {
            if let Some(path) = job.saved_copies.first()
                && ui.button("Open the full image").clicked()
            {
                actions.push(UiAction::OpenFile(path.clone()));
            }
            ui.button("Close").clicked()
        })
        .inner
    });
    if modal.inner || modal.should_close() {
        view.enlarged = None;
    }
}

/// The outcome in words, and whether it is a problem.
fn outcome(outcome: &JobOutcome) -> (String, bool) {
    match outcome {
        JobOutcome::Finished { delivery } => match delivery {
            Delivery::Waiting => ("Uploading".to_owned(), false),
            Delivery::Delivered => ("Delivered".to_owned(), false),
            Delivery::NotWanted => ("Made, but the studio no longer wanted it".to_owned(), true),
        },
        JobOutcome::Rejected { message, .. } => (format!("Not run: {message}"), true),
        JobOutcome::Failed { message, .. } => (format!("Failed: {message}"), true),
        JobOutcome::HandedBack => ("Handed back (paused)".to_owned(), false),
        JobOutcome::Cancelled => ("Cancelled by the studio".to_owned(), false),
        JobOutcome::LeaseLost => ("Taken over by another worker".to_owned(), true),
    }
}

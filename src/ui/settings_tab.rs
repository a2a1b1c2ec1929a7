//! The Settings tab: an edit buffer checked before it is saved (through the runtime, which
//! saves with `config::save`), and the registration reset behind a confirmation.

use super::app::{PendingOutcome, UiAction};
use super::policy_settings::{PolicyForm, policy_settings_ui};
use super::status_tab::reset_registration_ui;
use crate::config::Config;
use crate::models::catalog::CatalogEntry;
use crate::runtime::{Command, CommandOutcome, SettingsChange, WorkerStatus};
use crate::studio::ApiBase;
use crate::vocab::device::DevicePreference;

const MAX_NAME_CHARS: usize = 64;

/// What the person is editing, and what happened to the last save.
#[derive(Debug)]
pub struct SettingsForm {
    pub api_base_url: String,
    pub worker_name: String,
    pub unload_when_paused: bool,
    pub device: DevicePreference,
    /// Catalog ids to serve, in catalog order.
    pub enabled_models: Vec<String>,
    /// `[models] enabled` as saved when the buffer last looked (see [`Self::follow`]).
    seen_enabled_models: Vec<String>,
    pub close_to_tray: bool,
    pub start_at_login: bool,
    /// `[crash_reports] send`; offered only when this build has a collector.
    pub send_crash_reports: bool,
    crash_reports_offered: bool,
    saved_send_crash_reports: bool,
    pub save_copies: bool,
    pub copies_folder: Option<std::path::PathBuf>,
    /// `[policy]`: when the worker steps aside by itself.
    pub policy: PolicyForm,
    /// The folder picker's answer, while it is open, and what the folder is for.
    folder_pick: Option<(
        FolderPurpose,
        std::sync::mpsc::Receiver<Option<std::path::PathBuf>>,
    )>,
    /// A picked model folder being checked by the runtime, then why it was not added.
    adding_model: Option<AddingModel>,
    /// A catalog model's "Delete files": confirming, deleting, or what came of it.
    removal: Option<ModelRemoval>,
    /// A save the runtime has not answered yet.
    saving: Option<Saving>,
    saved_api_base_url: String,
    saved_device: DevicePreference,
    pub error: Option<String>,
    pub saved_note: Option<String>,
    pub confirming_reset: bool,
}

impl SettingsForm {
    /// `start_at_login` is the OS's own state (see `platform::autostart`).
    pub fn from_config(config: &Config, start_at_login: bool) -> Self {
        Self {
            start_at_login,
            api_base_url: config.api_base_url.clone(),
            worker_name: config.worker_name.clone(),
            unload_when_paused: config.engine.unload_when_paused,
            device: config.engine.device,
            saved_device: config.engine.device,
            enabled_models: config.models.enabled.clone(),
            seen_enabled_models: config.models.enabled.clone(),
            close_to_tray: config.ui.close_to_tray,
            send_crash_reports: config.crash_reports.send,
            crash_reports_offered: crate::crash::collector_available(),
            saved_send_crash_reports: config.crash_reports.send,
            save_copies: config.images.save_copies_to.is_some(),
            copies_folder: config.images.save_copies_to.clone(),
            policy: PolicyForm::from_settings(&config.policy),
            folder_pick: None,
            adding_model: None,
            removal: None,
            saving: None,
            saved_api_base_url: config.api_base_url.clone(),
            error: None,
            saved_note: None,
            confirming_reset: false,
        }
    }

    /// Opens the system's folder picker without blocking the UI: the dialog's future is
    /// made here (macOS wants dialogs started from the main thread) and awaited on a helper
    /// thread, which reports back through a channel and wakes the UI.
    fn pick_folder(&mut self, ctx: &egui::Context, purpose: FolderPurpose) {
        let (sender, receiver) = std::sync::mpsc::channel();
        let title = match purpose {
            FolderPurpose::Copies => "Folder for copies of finished images",
            FolderPurpose::LocalModel => "A diffusers model folder (with model_index.json)",
        };
        let dialog = rfd::AsyncFileDialog::new().set_title(title).pick_folder();
        let ctx = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name("folder-picker".to_owned())
            .spawn(move || {
                let picked = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .ok()
                    .and_then(|runtime| runtime.block_on(dialog))
                    .map(|handle| handle.path().to_path_buf());
                let _ = sender.send(picked);
                ctx.request_repaint();
            });
        if spawned.is_ok() {
            self.folder_pick = Some((purpose, receiver));
        }
    }

    /// Asks the runtime to check and serve `folder` under an id made from its name.
    pub fn add_local_model(&mut self, folder: std::path::PathBuf, actions: &mut Vec<UiAction>) {
        let model_id = crate::models::local::suggest_model_id(&folder);
        let command = Command::AddLocalModel {
            model_id: model_id.clone(),
            folder: folder.clone(),
        };
        self.adding_model = Some(AddingModel {
            model_id,
            folder,
            outcome: PendingOutcome::ask(command, actions),
            problem: None,
        });
    }

    /// Takes into the edit buffer what changed in the saved models list since the buffer
    /// last saw it (a `models remove` from the terminal unticks a model), keeping the
    /// person's own unsaved ticks: a Save writes the whole list, and would otherwise tick
    /// the removed model again and download it anew.
    fn follow(&mut self, settings: &Config) {
        let saved = &settings.models.enabled;
        if *saved == self.seen_enabled_models {
            return;
        }
        self.enabled_models
            .retain(|id| saved.contains(id) || !self.seen_enabled_models.contains(id));
        for id in saved {
            if !self.seen_enabled_models.contains(id) && !self.enabled_models.contains(id) {
                self.enabled_models.push(id.clone());
            }
        }
        self.seen_enabled_models.clone_from(saved);
    }

    /// Takes the runtime's answer to the last Save, once it came: "Saved." (with what waits
    /// for a restart) only when the settings file was written, else why not.
    fn receive_save_outcome(&mut self) {
        let Some(saving) = &mut self.saving else {
            return;
        };
        let Some(outcome) = saving.outcome.poll() else {
            return;
        };
        let change = &saving.change;
        match outcome {
            Ok(note) => {
                let after_restart: Vec<&str> = [
                    (change.api_base_url != self.saved_api_base_url, "studio URL"),
                    (change.device != self.saved_device, "device"),
                    (
                        change.send_crash_reports != self.saved_send_crash_reports,
                        "crash-report choice",
                    ),
                ]
                .into_iter()
                .filter_map(|(changed, what)| changed.then_some(what))
                .collect();
                self.saved_note = Some(note.unwrap_or_else(|| saved_note(&after_restart)));
                self.saved_api_base_url.clone_from(&change.api_base_url);
                self.saved_device = change.device;
                self.saved_send_crash_reports = change.send_crash_reports;
            }
            Err(problem) => self.error = Some(crate::human::capitalise(&problem)),
        }
        self.saving = None;
    }

    /// The change to save, or why it cannot be saved.
    pub fn validate(&self) -> Result<SettingsChange, String> {
        ApiBase::parse(&self.api_base_url).map_err(|err| err.to_string())?;
        let name = self.worker_name.trim();
        if name.is_empty() {
            return Err("the worker name cannot be empty".to_owned());
        }
        if name.chars().count() > MAX_NAME_CHARS || name.chars().any(char::is_control) {
            return Err(format!(
                "the worker name must be one line of at most {MAX_NAME_CHARS} characters"
            ));
        }
        if self.save_copies && self.copies_folder.is_none() {
            return Err("choose a folder for the copies of finished images".to_owned());
        }
        let policy = self.policy.validate()?;
        Ok(SettingsChange {
            api_base_url: self.api_base_url.trim().to_owned(),
            worker_name: name.to_owned(),
            unload_when_paused: self.unload_when_paused,
            device: self.device,
            enabled_models: self.enabled_models.clone(),
            close_to_tray: self.close_to_tray,
            start_at_login: self.start_at_login,
            send_crash_reports: self.send_crash_reports,
            save_copies_to: self.copies_folder.clone().filter(|_| self.save_copies),
            policy,
        })
    }
}

/// "Saved.", plus which of the changes wait for a restart.
fn saved_note(after_restart: &[&str]) -> String {
    match after_restart {
        [] => "Saved.".to_owned(),
        [one] => format!("Saved. The new {one} is used after a restart."),
        [first @ .., last] => format!(
            "Saved. The new {} and {last} are used after a restart.",
            first.join(", ")
        ),
    }
}

/// A change sent to be saved, kept to say what of it waits for a restart once it is.
#[derive(Debug)]
struct Saving {
    outcome: PendingOutcome,
    change: SettingsChange,
}

/// A model folder the runtime is checking (or refused: `problem`).
#[derive(Debug)]
struct AddingModel {
    model_id: String,
    folder: std::path::PathBuf,
    outcome: PendingOutcome,
    problem: Option<String>,
}

/// The "Delete files" of one catalog model, from the confirmation to its outcome.
#[derive(Debug)]
struct ModelRemoval {
    model_id: String,
    /// A model folder left out (its files stay), not a catalog model's files deleted.
    folder: bool,
    stage: RemovalStage,
}

#[derive(Debug)]
enum RemovalStage {
    /// Asking "Delete …'s files?", with what they take.
    Confirming { bytes: u64 },
    /// Sent; the runtime has not answered yet.
    Waiting(PendingOutcome),
    /// What the runtime said (how much was freed, or why not all of it).
    Done(CommandOutcome),
}

impl SettingsForm {
    /// Whether a removal is being confirmed or carried out (one at a time).
    fn removing(&self) -> bool {
        self.removal
            .as_ref()
            .is_some_and(|removal| !matches!(removal.stage, RemovalStage::Done(_)))
    }
}

/// What a folder picked in the Settings tab is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FolderPurpose {
    Copies,
    LocalModel,
}

/// `settings`: the saved settings as they are now (the runtime's latest).
pub fn settings_tab_ui(
    ui: &mut egui::Ui,
    form: &mut SettingsForm,
    settings: &Config,
    status: &crate::runtime::WorkerStatus,
    actions: &mut Vec<UiAction>,
) {
    form.follow(settings);
    ui.heading("Settings");
    egui::Grid::new("settings")
        .num_columns(2)
        .spacing([12.0, 8.0])
        .show(ui, |ui| {
            let label = ui.label("Studio URL");
            ui.add(egui::TextEdit::singleline(&mut form.api_base_url).desired_width(360.0))
                .labelled_by(label.id);
            ui.end_row();
            let label = ui.label("Worker name");
            ui.add(egui::TextEdit::singleline(&mut form.worker_name).desired_width(360.0))
                .labelled_by(label.id);
            ui.end_row();
            let label = ui.label("Make images on");
            egui::ComboBox::from_id_salt("device")
                .selected_text(device_label(form.device))
                .show_ui(ui, |ui| {
                    for device in [
                        DevicePreference::Auto,
                        DevicePreference::Cuda,
                        DevicePreference::Metal,
                        DevicePreference::Cpu,
                    ] {
                        ui.selectable_value(&mut form.device, device, device_label(device));
                    }
                })
                .response
                .labelled_by(label.id);
            ui.end_row();
        });
    models_ui(ui, form, status, actions);
    local_models_ui(ui, form, &settings.models.local, actions);
    ui.checkbox(
        &mut form.unload_when_paused,
        "Give the GPU memory back while paused",
    );
    ui.checkbox(
        &mut form.close_to_tray,
        "Closing the window keeps the worker running in the tray",
    );
    ui.checkbox(
        &mut form.start_at_login,
        "Start studio-worker (in the tray) when I log in",
    );
    if form.crash_reports_offered {
        ui.checkbox(
            &mut form.send_crash_reports,
            "Send crash reports to minis.gg (without prompts, paths or secrets)",
        );
    }
    if let Some((purpose, answer)) = form
        .folder_pick
        .as_ref()
        .and_then(|(purpose, pick)| pick.try_recv().ok().map(|answer| (*purpose, answer)))
    {
        form.folder_pick = None;
        match (purpose, answer) {
            (FolderPurpose::Copies, Some(folder)) => form.copies_folder = Some(folder),
            (FolderPurpose::LocalModel, Some(folder)) => form.add_local_model(folder, actions),
            (_, None) => {}
        }
    }
    ui.horizontal(|ui| {
        ui.checkbox(
            &mut form.save_copies,
            "Save a copy of each image to a folder",
        );
        if form.save_copies {
            let folder = form.copies_folder.as_ref().map_or_else(
                || "no folder chosen".to_owned(),
                |folder| folder.display().to_string(),
            );
            ui.label(folder);
            let choose = egui::Button::new("Choose folder…");
            if ui.add_enabled(form.folder_pick.is_none(), choose).clicked() {
                form.pick_folder(ui.ctx(), FolderPurpose::Copies);
            }
        }
    });

    ui.add_space(8.0);
    policy_settings_ui(ui, &mut form.policy, &status.policy.blind);

    ui.add_space(6.0);
    form.receive_save_outcome();
    let save = egui::Button::new("Save");
    if ui.add_enabled(form.saving.is_none(), save).clicked() {
        match form.validate() {
            Ok(change) => {
                form.error = None;
                form.saved_note = None;
                let command = Command::SaveSettings(change.clone());
                form.saving = Some(Saving {
                    outcome: PendingOutcome::ask(command, actions),
                    change,
                });
            }
            Err(reason) => {
                form.saved_note = None;
                form.error = Some(format!("Not saved: {reason}"));
            }
        }
    }
    if form.saving.is_some() {
        ui.label("Saving…");
    }
    if let Some(error) = &form.error {
        ui.colored_label(ui.visuals().error_fg_color, error.as_str());
    }
    if let Some(note) = &form.saved_note {
        ui.label(note.as_str());
    }

    ui.add_space(12.0);
    ui.separator();
    ui.strong("Registration");
    ui.label("Start over with the studio: this PC asks for approval again.");
    reset_registration_ui(ui, &mut form.confirming_reset, actions);
}

fn device_label(device: DevicePreference) -> &'static str {
    match device {
        DevicePreference::Auto => "Best available (GPU, else CPU)",
        DevicePreference::Cuda => "NVIDIA GPU (CUDA)",
        DevicePreference::Metal => "Apple GPU (Metal)",
        DevicePreference::Cpu => "CPU only (slow)",
    }
}

/// One checkbox per catalog model: checked models are downloaded (the Status tab shows the
/// progress) and served; unticked ones stop being served when saved. A model with files on
/// this PC says how much they take, and they can be deleted from here.
fn models_ui(
    ui: &mut egui::Ui,
    form: &mut SettingsForm,
    status: &WorkerStatus,
    actions: &mut Vec<UiAction>,
) {
    // Before the rows: a deletion's outcome enables their buttons again in this frame.
    if let Some(removal) = &mut form.removal
        && let RemovalStage::Waiting(pending) = &mut removal.stage
        && let Some(outcome) = pending.poll()
    {
        removal.stage = RemovalStage::Done(outcome);
    }
    ui.label("Models to serve (downloaded when missing):");
    ui.indent("models", |ui| {
        for entry in crate::models::catalog::CATALOG {
            let on_disk = on_this_pc(status, entry);
            ui.horizontal(|ui| {
                let mut serve = form.enabled_models.iter().any(|id| id == entry.id);
                let label = format!(
                    "{} (~{} download, {} GB of GPU memory)",
                    entry.display_name,
                    crate::human::bytes(entry.download_bytes),
                    entry.min_gpu_mb / 1024
                );
                if ui.checkbox(&mut serve, label).changed() {
                    form.enabled_models.retain(|id| id != entry.id);
                    if serve {
                        form.enabled_models.push(entry.id.to_owned());
                    }
                }
                if let Some((bytes, words)) = on_disk {
                    ui.weak(words);
                    let delete = egui::Button::new("Delete files…").small();
                    if ui.add_enabled(!form.removing(), delete).clicked() {
                        form.removal = Some(ModelRemoval {
                            model_id: entry.id.to_owned(),
                            folder: false,
                            stage: RemovalStage::Confirming { bytes },
                        });
                    }
                }
            });
            if form
                .removal
                .as_ref()
                .is_some_and(|removal| removal.model_id == entry.id && !removal.folder)
            {
                ui.indent(("removal", entry.id), |ui| {
                    removal_ui(ui, form, entry, actions);
                });
            }
        }
        ui.weak(
            "A model unticked is no longer served once saved; its files stay on this PC until \
             deleted here.",
        );
    });
}

/// What a catalog model's files take on this PC, and that in words: "2.59 GB on this PC"
/// once complete, "1.20 GB of ~6.94 GB on this PC" for a download stopped or under way
/// (`None`: nothing here).
fn on_this_pc(status: &WorkerStatus, entry: &CatalogEntry) -> Option<(u64, String)> {
    let of_download = |bytes: u64| {
        format!(
            "{} of ~{} on this PC",
            crate::human::bytes(bytes),
            crate::human::bytes(entry.download_bytes)
        )
    };
    // A download that has not fetched anything yet (its listing failed, say) says nothing:
    // what an earlier one left is listed below.
    if let Some(download) = status
        .downloads
        .iter()
        .find(|download| download.model_id == entry.id && download.done_bytes > 0)
    {
        return Some((download.done_bytes, of_download(download.done_bytes)));
    }
    let on_disk = status
        .models_on_disk
        .iter()
        .find(|on_disk| on_disk.model_id == entry.id)?;
    Some(if on_disk.complete {
        (
            on_disk.bytes,
            format!("{} on this PC", crate::human::bytes(on_disk.bytes)),
        )
    } else {
        (on_disk.bytes, of_download(on_disk.bytes))
    })
}

/// The confirmation, then the progress and the outcome, of deleting one model's files.
fn removal_ui(
    ui: &mut egui::Ui,
    form: &mut SettingsForm,
    entry: &CatalogEntry,
    actions: &mut Vec<UiAction>,
) {
    let Some(removal) = &mut form.removal else {
        return;
    };
    let name = entry.display_name;
    match &removal.stage {
        RemovalStage::Confirming { bytes } => {
            ui.label(format!(
                "Delete {name}'s files ({})? It is also unticked, so it is not downloaded \
                 again until you tick it.",
                crate::human::bytes(*bytes)
            ));
            let (delete, keep) = ui
                .horizontal(|ui| (ui.button("Delete").clicked(), ui.button("Keep").clicked()))
                .inner;
            if delete {
                let command = Command::RemoveModel {
                    model_id: entry.id.to_owned(),
                };
                removal.stage = RemovalStage::Waiting(PendingOutcome::ask(command, actions));
                // The runtime unticks it; the edit buffer agrees, or the next Save would tick
                // it again.
                form.enabled_models.retain(|id| id != entry.id);
            } else if keep {
                form.removal = None;
            }
        }
        stage => removal_outcome_ui(
            ui,
            stage,
            &format!("Deleting {name}'s files…"),
            &format!("{name}'s files are deleted."),
            "Not deleted",
        ),
    }
}

/// A sent removal's progress, then its outcome: `waiting` until the runtime answers, then
/// its note (else `done`), or why not after `failed`.
fn removal_outcome_ui(
    ui: &mut egui::Ui,
    stage: &RemovalStage,
    waiting: &str,
    done: &str,
    failed: &str,
) {
    match stage {
        RemovalStage::Confirming { .. } => {}
        RemovalStage::Waiting(_) => {
            ui.label(waiting);
        }
        RemovalStage::Done(Ok(note)) => {
            ui.label(note.as_deref().unwrap_or(done));
        }
        RemovalStage::Done(Err(problem)) => {
            ui.colored_label(ui.visuals().error_fg_color, format!("{failed}: {problem}"));
        }
    }
}

/// The folders served from this PC, each with a button to stop serving it (its files stay),
/// and a button to add one (checked by the runtime, then served at once).
fn local_models_ui(
    ui: &mut egui::Ui,
    form: &mut SettingsForm,
    local_models: &std::collections::BTreeMap<String, std::path::PathBuf>,
    actions: &mut Vec<UiAction>,
) {
    ui.horizontal(|ui| {
        ui.label("Model folders on this PC:");
        let add = egui::Button::new("Add a model folder…");
        if ui.add_enabled(form.folder_pick.is_none(), add).clicked() {
            form.pick_folder(ui.ctx(), FolderPurpose::LocalModel);
        }
    });
    ui.indent("local models", |ui| {
        if local_models.is_empty() {
            ui.weak("none");
        }
        for (model_id, folder) in local_models {
            ui.horizontal(|ui| {
                ui.label(format!("{model_id} — {}", folder.display()));
                let stop = egui::Button::new("Stop serving").small();
                if ui
                    .add_enabled(!form.removing(), stop)
                    .on_hover_text("The folder and its files stay as they are.")
                    .clicked()
                {
                    let command = Command::RemoveModel {
                        model_id: model_id.clone(),
                    };
                    form.removal = Some(ModelRemoval {
                        model_id: model_id.clone(),
                        folder: true,
                        stage: RemovalStage::Waiting(PendingOutcome::ask(command, actions)),
                    });
                }
            });
        }
        // Below the list: a folder left out has no row any more.
        if let Some(removal) = &form.removal
            && removal.folder
        {
            removal_outcome_ui(
                ui,
                &removal.stage,
                &format!("Leaving {} out…", removal.model_id),
                &format!("{} is no longer served.", removal.model_id),
                "Still served",
            );
        }
    });
    if let Some(adding) = &mut form.adding_model {
        if adding.problem.is_none()
            && let Some(outcome) = adding.outcome.poll()
        {
            match outcome {
                // Listed above from now on.
                Ok(_) => {
                    form.adding_model = None;
                    return;
                }
                Err(problem) => adding.problem = Some(problem),
            }
        }
        match &adding.problem {
            Some(problem) => {
                ui.colored_label(ui.visuals().error_fg_color, format!("Not added: {problem}"));
            }
            None => {
                ui.label(format!(
                    "Checking {} as {}…",
                    adding.folder.display(),
                    adding.model_id
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_saved_note_names_what_waits_for_a_restart() {
        assert_eq!(saved_note(&[]), "Saved.");
        assert_eq!(
            saved_note(&["device"]),
            "Saved. The new device is used after a restart."
        );
        assert_eq!(
            saved_note(&["studio URL", "device", "crash-report choice"]),
            "Saved. The new studio URL, device and crash-report choice are used after a restart."
        );
    }
}

//! The window's tabs, driven through AccessKit with egui_kittest: each tab reacts to the
//! worker's state, and clicks become the right commands. The test plays the runtime: it sets
//! the status and reads the commands.

use std::sync::mpsc as std_mpsc;

use chrono::Utc;
use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT as _, Queryable as _};
use studio_worker::config::{Config, SharedConfig};
use studio_worker::image_file::encode_png;
use studio_worker::registration::RegistrationState;
use studio_worker::runtime::gpu_recovery::Restarted;
use studio_worker::runtime::signals::HostRequestSender;
use studio_worker::runtime::{
    AskedCommand, Command, CommandOutcome, CurrentJob, FinishedJob, JobOutcome, ModelDownload,
    ModelOnDisk, RestartRequest, RuntimeHandle, SettingsChange, StopRequest, WorkerStatus,
    host_requests,
};
use studio_worker::studio::protocol::FailCode;
use studio_worker::tray::TrayEvent;
use studio_worker::ui::{Tab, WorkerApp};
use studio_worker::vocab::device::DevicePreference;
use studio_worker::vocab::pause::PauseReason;
use studio_worker::vocab::progress::Stage;
use tokio::sync::{mpsc, oneshot, watch};

struct Window {
    harness: Harness<'static, WorkerApp>,
    status: watch::Sender<WorkerStatus>,
    /// The runtime's requests of the window (quit, come forward).
    host: HostRequestSender,
    commands: mpsc::Receiver<Command>,
    /// The commands whose outcome the window waits for.
    asked: mpsc::Receiver<AskedCommand>,
    /// The saved settings the window reads (the runtime's, played by the test).
    settings: SharedConfig,
    /// Where the outcomes of the asked commands `sent` read go, oldest first.
    unanswered: std::collections::VecDeque<oneshot::Sender<CommandOutcome>>,
    tray: std_mpsc::Sender<TrayEvent>,
    _dir: tempfile::TempDir,
}

impl Window {
    fn new(status: WorkerStatus) -> Self {
        Self::with_settings(status, Config::default())
    }

    /// A window over `settings` (what the worker's config holds).
    fn with_settings(status: WorkerStatus, settings: Config) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = SharedConfig::new(dir.path().join("config.toml"), settings);
        let (status_sender, status_receiver) = watch::channel(status);
        let (command_sender, commands) = mpsc::channel(32);
        let (asked_sender, asked) = mpsc::channel(8);
        let (tray, tray_events) = std_mpsc::channel();
        let (host, requests) = host_requests();
        let handle = RuntimeHandle::new(
            config.clone(),
            status_receiver,
            command_sender,
            asked_sender,
            requests,
        );
        let app = WorkerApp::new(handle, None, Some(tray_events), None, false);
        let harness = Harness::builder().with_size([900.0, 800.0]).build_ui_state(
            |ui, app: &mut WorkerApp| {
                app.apply();
                app.contents_ui(ui);
            },
            app,
        );
        let mut window = Self {
            harness,
            status: status_sender,
            host,
            commands,
            asked,
            settings: config,
            unanswered: std::collections::VecDeque::new(),
            tray,
            _dir: dir,
        };
        window.harness.run();
        window
    }

    fn set_status(&mut self, change: impl FnOnce(&mut WorkerStatus)) {
        self.status.send_modify(change);
        self.harness.run();
    }

    /// The commands sent since the last call; those waiting for an outcome wait for
    /// [`Self::answer`].
    fn sent(&mut self) -> Vec<Command> {
        let mut sent: Vec<Command> = std::iter::from_fn(|| self.commands.try_recv().ok()).collect();
        while let Ok((command, outcome)) = self.asked.try_recv() {
            sent.push(command);
            self.unanswered.push_back(outcome);
        }
        sent
    }

    /// Answers the oldest command `sent` read that waits for its outcome, as the runtime
    /// would, and draws.
    fn answer(&mut self, outcome: CommandOutcome) {
        let waiting = self
            .unanswered
            .pop_front()
            .expect("a sent command waiting for its outcome");
        waiting.send(outcome).expect("the window still waits");
        self.harness.run();
    }

    /// Waits until a job's preview, loaded off the UI thread, is on screen.
    fn wait_for_preview(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while self
            .harness
            .query_by_label("Show the image larger")
            .is_none()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the preview never appeared"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
            // The loader thread's repaint can land while the new image's layout settles,
            // which may take more passes than `run` allows: keep going until it is there.
            let _ = self.harness.run_ok();
        }
    }

    /// Clicks the widget labelled `label` and draws.
    fn click(&mut self, label: &str) {
        self.harness.get_by_label(label).click();
        self.harness.run();
    }

    /// Clicks Save and returns the change sent (exactly one save, else the test fails,
    /// saying whether the tab refused it).
    fn save(&mut self) -> SettingsChange {
        self.harness.get_by_label("Save").click();
        self.harness.run();
        match self.sent().as_slice() {
            [Command::SaveSettings(change)] => change.clone(),
            other => panic!(
                "expected one save, got {other:?}; refused: {}",
                self.shows("Not saved")
            ),
        }
    }

    fn shows(&self, text: &str) -> bool {
        self.harness.query_by_label_contains(text).is_some()
    }
}

fn status(registration: RegistrationState) -> WorkerStatus {
    let mut status = WorkerStatus::new(&Config::default());
    status.registration = registration;
    status
}

fn running_job(
    job_id: &str,
    prompt: &str,
    stage: Stage,
    step: u32,
    total_steps: u32,
) -> CurrentJob {
    CurrentJob {
        job_id: job_id.into(),
        prompt: prompt.into(),
        model: "sd-turbo".into(),
        width: 512,
        height: 512,
        steps: total_steps,
        num_images: 1,
        seed: 42,
        stage,
        step,
        total_steps,
        started_at: Utc::now(),
    }
}

fn approved() -> WorkerStatus {
    status(RegistrationState::Approved {
        worker_id: "w_42".into(),
    })
}

#[test]
fn the_status_tab_says_each_registration_state_in_words() {
    let mut window = Window::new(status(RegistrationState::Pending {
        request_id: "rr_1".into(),
        since: Some(Utc::now() - chrono::Duration::minutes(12)),
    }));
    assert!(window.shows("Waiting for the studio to approve this PC (requested 12 min ago)"));
    assert!(
        window
            .harness
            .query_by_label("Reset registration…")
            .is_none(),
        "nothing to reset while pending"
    );

    window.set_status(|s| {
        s.registration = RegistrationState::Approved {
            worker_id: "w_42".into(),
        }
    });
    assert!(window.shows("Approved as w_42"));

    window.set_status(|s| {
        s.registration = RegistrationState::Rejected {
            reason: "we only take RTX cards".into(),
        }
    });
    assert!(window.shows("Rejected: we only take RTX cards"));
    assert!(
        window
            .harness
            .query_by_label("Reset registration…")
            .is_some()
    );

    window.set_status(|s| {
        s.registration = RegistrationState::Revoked {
            worker_id: "w_42".into(),
        }
    });
    assert!(window.shows("Access revoked"));
    assert!(
        window
            .harness
            .query_by_label("Reset registration…")
            .is_some()
    );
}

#[test]
fn the_status_tab_shows_connection_job_and_problems() {
    let mut running = approved();
    running.connection.last_heartbeat_at = Some(Utc::now() - chrono::Duration::seconds(12));
    running.connection.last_error = Some("studio unreachable: cannot connect".into());
    running.jobs.current = Some(running_job(
        "j_1",
        "a lighthouse at dusk",
        Stage::Denoising,
        3,
        4,
    ));
    running.settings_recovered =
        Some("the settings file could not be read (line 3); it was kept as x".into());
    running.settings_unsaved = Some("cannot write config.toml: read-only file system".into());
    running.settings_unknown = vec!["policy.temprature_limit_c".into()];
    let window = Window::new(running);
    assert!(window.shows("Last heartbeat 12 s ago"));
    assert!(window.shows("Last problem: studio unreachable: cannot connect"));
    assert!(window.shows("“a lighthouse at dusk”"));
    assert!(window.shows("Drawing: step 3 of 4"));
    assert!(window.shows("The settings file could not be read (line 3)"));
    assert!(window.shows("Your settings cannot be saved (cannot write config.toml"));
    assert!(window.shows("not used (misspelt?): policy.temprature_limit_c."));
}

#[test]
fn the_status_tab_says_the_gpu_is_being_prepared() {
    let mut preparing = approved();
    preparing.jobs.claim_blocked =
        Some("Preparing the GPU, once: compiling its kernels, 12 s left".into());
    let window = Window::new(preparing);
    assert!(window.shows("Not taking jobs"));
    assert!(window.shows("Preparing the GPU, once: compiling its kernels, 12 s left"));
}

#[test]
fn pause_and_resume_send_commands_and_follow_the_state() {
    let mut window = Window::new(approved());
    window.harness.get_by_label("Pause generation").click();
    window.harness.run();
    assert_eq!(window.sent(), vec![Command::Pause]);

    window.set_status(|s| s.paused = Some(PauseReason::User));
    assert!(window.shows("Paused by you"));
    window.harness.get_by_label("Resume generation").click();
    window.harness.run();
    assert_eq!(window.sent(), vec![Command::Resume]);

    // The studio's pause: the person can add their own, not lift the studio's.
    window.set_status(|s| s.paused = Some(PauseReason::Studio));
    assert!(window.shows("Paused by the studio"));
    assert!(window.harness.query_by_label("Pause generation").is_some());
}

#[test]
fn reset_asks_for_confirmation_first() {
    let mut window = Window::new(status(RegistrationState::Revoked {
        worker_id: "w_42".into(),
    }));
    window.harness.get_by_label("Reset registration…").click();
    window.harness.run();
    assert!(window.sent().is_empty(), "one click does not reset");
    assert!(window.shows("This PC forgets its approval"));

    window.harness.get_by_label("Cancel").click();
    window.harness.run();
    assert!(window.sent().is_empty());
    assert!(!window.shows("This PC forgets its approval"));

    window.harness.get_by_label("Reset registration…").click();
    window.harness.run();
    window.harness.get_by_label("Reset").click();
    window.harness.run();
    assert_eq!(window.sent(), vec![Command::ResetRegistration]);
}

fn replace_text(window: &mut Window, field: &str, text: &str) {
    let node = window.harness.get_by_role_and_label(Role::TextInput, field);
    node.focus();
    window.harness.run();
    window
        .harness
        .key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    window.harness.run();
    window
        .harness
        .get_by_role_and_label(Role::TextInput, field)
        .type_text(text);
    window.harness.run();
}

#[test]
fn settings_refuse_an_insecure_url_and_save_a_good_one() {
    let mut window = Window::new(approved());
    window.harness.get_by_label("Settings").click();
    window.harness.run();
    assert_eq!(window.harness.state().tab(), Tab::Settings);

    replace_text(&mut window, "Studio URL", "http://studio.example.com/api");
    window.harness.get_by_label("Save").click();
    window.harness.run();
    assert!(window.shows("Not saved: studio URL"), "a reason is given");
    assert!(window.shows("plain http"));
    assert!(window.sent().is_empty(), "nothing saved");

    replace_text(&mut window, "Studio URL", "https://studio.example.com/api");
    replace_text(&mut window, "Worker name", "Alice's desktop");
    window.harness.get_by_label("Save").click();
    window.harness.run();
    assert!(window.shows("Saving…"));
    assert!(
        !window.shows("Saved."),
        "saved only once the runtime says the file is written"
    );
    let sent = window.sent();
    window.answer(Ok(None));
    assert!(window.shows("Saved. The new studio URL is used after a restart."));
    assert!(!window.shows("Saving…"));
    assert_eq!(
        sent,
        vec![Command::SaveSettings(SettingsChange {
            api_base_url: "https://studio.example.com/api".into(),
            worker_name: "Alice's desktop".into(),
            unload_when_paused: true,
            device: DevicePreference::Auto,
            enabled_models: vec!["sd-turbo".into()],
            close_to_tray: true,
            start_at_login: studio_worker::platform::autostart::is_enabled(),
            save_copies_to: None,
            send_crash_reports: false,
            policy: studio_worker::config::PolicySection::default(),
        })]
    );
}

#[test]
fn settings_choose_the_device_used_from_the_next_start() {
    let mut window = Window::new(approved());
    window.harness.get_by_label("Settings").click();
    window.harness.run();
    window.harness.get_by_label("Make images on").click();
    window.harness.run();
    window.harness.get_by_label("CPU only (slow)").click();
    window.harness.run();
    let change = window.save();
    assert_eq!(change.device, DevicePreference::Cpu);
    window.answer(Ok(None));
    assert!(window.shows("Saved. The new device is used after a restart."));
}

#[test]
fn a_save_the_runtime_could_not_write_says_why_not_saved() {
    let mut window = Window::new(approved());
    window.harness.get_by_label("Settings").click();
    window.harness.run();
    replace_text(&mut window, "Worker name", "Alice's desktop");
    assert_eq!(window.save().worker_name, "Alice's desktop");
    window.answer(Err(
        "cannot save settings to /home/alice/.config/studio-worker/config.toml: \
         No space left on device (os error 28)"
            .into(),
    ));
    assert!(window.shows("Cannot save settings to /home/alice"));
    assert!(
        !window.shows("Saved."),
        "a failed save is never called saved"
    );

    // Saving again works once the disk has room.
    window.save();
    assert!(
        !window.shows("Cannot save settings"),
        "the old problem goes"
    );
    window.answer(Ok(None));
    assert!(window.shows("Saved."));
}

#[test]
fn settings_choose_which_catalog_models_to_serve() {
    let mut window = Window::new(approved());
    window.harness.get_by_label("Settings").click();
    window.harness.run();
    window
        .harness
        .get_by_label_contains("SDXL-Turbo (~6.94 GB download")
        .click();
    window.harness.run();
    window
        .harness
        .get_by_label_contains("SD-Turbo (~2.59 GB download")
        .click();
    window.harness.run();
    let change = window.save();
    assert_eq!(change.enabled_models, vec!["sdxl-turbo".to_owned()]);
}

#[test]
fn a_model_unticked_elsewhere_is_not_ticked_again_by_a_later_save() {
    let mut window = Window::new(approved());
    window.click("Settings");
    // The person ticks SDXL-Turbo, unsaved…
    window
        .harness
        .get_by_label_contains("SDXL-Turbo (~6.94 GB download")
        .click();
    window.harness.run();
    // …while `studio-worker models remove sd-turbo` unticks SD-Turbo in the saved settings,
    // and another change ticks SD 1.5.
    window
        .settings
        .update(|settings| settings.models.enabled = vec!["sd-1.5".into()])
        .unwrap();
    window.harness.run();
    let mut enabled = window.save().enabled_models;
    enabled.sort();
    assert_eq!(
        enabled,
        vec!["sd-1.5".to_owned(), "sdxl-turbo".to_owned()],
        "the removal and the other change kept, and the person's own tick too"
    );
}

#[test]
fn settings_delete_a_models_files_after_a_confirmation() {
    let mut on_disk = approved();
    on_disk.models_on_disk = vec![ModelOnDisk {
        model_id: "sd-turbo".into(),
        bytes: 2_590_000_000,
        complete: true,
    }];
    let mut window = Window::new(on_disk);
    window.click("Settings");
    assert!(window.shows("2.59 GB on this PC"));

    // One click only asks; Keep changes nothing.
    window.click("Delete files…");
    assert!(window.shows("Delete SD-Turbo's files (2.59 GB)?"));
    assert!(window.sent().is_empty(), "one click deletes nothing");
    window.click("Keep");
    assert!(!window.shows("Delete SD-Turbo's files"));
    assert!(window.sent().is_empty());

    // Delete: the runtime is asked, and the window says so until it answers.
    window.click("Delete files…");
    window.click("Delete");
    assert_eq!(
        window.sent(),
        vec![Command::RemoveModel {
            model_id: "sd-turbo".into()
        }]
    );
    assert!(window.shows("Deleting SD-Turbo's files…"));
    window.answer(Ok(Some(
        "Removed sd-turbo (2.59 GB freed); it is unticked in Settings, so it is not \
         downloaded again."
            .into(),
    )));
    window.set_status(|status| status.models_on_disk.clear());
    assert!(window.shows("Removed sd-turbo (2.59 GB freed)"));
    assert!(!window.shows("GB on this PC"));
    assert!(window.harness.query_by_label("Delete files…").is_none());

    // The runtime unticked it: a later Save does not tick it again.
    let change = window.save();
    assert!(change.enabled_models.is_empty());
}

#[test]
fn a_download_under_way_can_be_deleted_and_a_failed_deletion_says_why() {
    let mut downloading = approved();
    downloading.downloads = vec![ModelDownload {
        model_id: "sdxl-turbo".into(),
        done_bytes: 1_200_000_000,
        total_bytes: 6_940_000_000,
        ..Default::default()
    }];
    // A download that fetched nothing yet (the hub unreachable) says what an earlier one left.
    downloading.downloads.push(ModelDownload {
        model_id: "sd-turbo".into(),
        problem: Some("the hub cannot be reached; resuming soon".into()),
        ..Default::default()
    });
    downloading.models_on_disk = vec![ModelOnDisk {
        model_id: "sd-turbo".into(),
        bytes: 310_000_000,
        complete: false,
    }];
    let mut window = Window::new(downloading);
    window.click("Settings");
    assert!(window.shows("310 MB of ~2.59 GB on this PC"));
    assert!(window.shows("1.20 GB of ~6.94 GB on this PC"));
    window.set_status(|status| status.models_on_disk.clear());
    assert_eq!(
        window.harness.query_all_by_label("Delete files…").count(),
        1,
        "nothing of SD-Turbo to delete"
    );
    window.click("Delete files…");
    window.click("Delete");
    assert_eq!(
        window.sent(),
        vec![Command::RemoveModel {
            model_id: "sdxl-turbo".into()
        }]
    );
    assert!(
        window
            .harness
            .get_by_label("Delete files…")
            .accesskit_node()
            .is_disabled(),
        "one deletion at a time"
    );
    window.answer(Err(
        "unet/diffusion_pytorch_model.fp16.safetensors could not be deleted (Access is \
         denied); another program has it open: once it is closed, remove the model again"
            .into(),
    ));
    assert!(window.shows("Not deleted: unet/diffusion_pytorch_model.fp16.safetensors"));
    assert!(
        !window
            .harness
            .get_by_label("Delete files…")
            .accesskit_node()
            .is_disabled(),
        "it can be tried again"
    );
}

#[test]
fn settings_stop_serving_a_model_folder_and_leave_its_files() {
    let mut settings = Config::default();
    settings.models.local.insert(
        "my-finetune".into(),
        "/home/alice/models/my-finetune".into(),
    );
    let mut window = Window::with_settings(approved(), settings);
    window.click("Settings");
    assert!(window.shows("my-finetune — /home/alice/models/my-finetune"));
    window.click("Stop serving");
    assert_eq!(
        window.sent(),
        vec![Command::RemoveModel {
            model_id: "my-finetune".into()
        }]
    );
    assert!(window.shows("Leaving my-finetune out…"));
    assert!(
        window
            .harness
            .get_by_label("Stop serving")
            .accesskit_node()
            .is_disabled(),
        "one removal at a time"
    );
    window.answer(Ok(Some(
        "Stopped serving my-finetune; its folder /home/alice/models/my-finetune stays as it is."
            .into(),
    )));
    assert!(window.shows("Stopped serving my-finetune; its folder"));
}

#[test]
fn the_jobs_tab_lists_recent_jobs_and_the_outbox() {
    let mut with_jobs = approved();
    with_jobs.jobs.outbox_len = 2;
    let current = running_job("j_1", "a red fox in snow", Stage::Decoding, 4, 4);
    with_jobs
        .jobs
        .remember(FinishedJob::new(&current, JobOutcome::DELIVERED));
    let mut failed = current.clone();
    failed.job_id = "j_2".into();
    with_jobs.jobs.remember(FinishedJob::new(
        &failed,
        JobOutcome::Failed {
            code: FailCode::Oom,
            message: "out of memory: needs 9 GB".into(),
        },
    ));
    let mut window = Window::new(with_jobs);
    window.harness.get_by_label("Jobs").click();
    window.harness.run();
    assert!(window.shows("2 finished results are waiting to upload."));
    assert!(window.shows("Delivered"));
    assert!(window.shows("Failed: out of memory: needs 9 GB"));
    assert_eq!(
        window
            .harness
            .query_all_by_label("a red fox in snow")
            .count(),
        2
    );

    window.harness.get_by_label("Retry now").click();
    window.harness.run();
    assert_eq!(window.sent(), vec![Command::RetryUploads]);
    window.set_status(|s| s.jobs.outbox_len = 0);
    assert!(
        window.harness.query_by_label("Retry now").is_none(),
        "nothing to retry"
    );
}

#[test]
fn tray_clicks_become_commands_and_window_actions() {
    let mut window = Window::new(approved());
    window.tray.send(TrayEvent::TogglePause).unwrap();
    window.harness.run();
    assert_eq!(window.sent(), vec![Command::Pause]);

    window.set_status(|s| s.paused = Some(PauseReason::User));
    window.tray.send(TrayEvent::TogglePause).unwrap();
    window.harness.run();
    assert_eq!(window.sent(), vec![Command::Resume]);

    window.tray.send(TrayEvent::Open).unwrap();
    let opened = window.harness.state_mut().apply();
    assert!(opened.contains(&egui::ViewportCommand::Visible(true)));
    assert!(opened.contains(&egui::ViewportCommand::Focus));

    window.tray.send(TrayEvent::Quit).unwrap();
    assert_eq!(
        window.harness.state_mut().apply(),
        vec![egui::ViewportCommand::Close]
    );
}

#[test]
fn studio_worker_quit_closes_the_app_as_the_trays_quit_does() {
    let mut window = Window::new(approved());
    assert!(window.harness.state_mut().apply().is_empty());
    window.host.stop(StopRequest::Quit);
    assert_eq!(
        window.harness.state_mut().apply(),
        vec![egui::ViewportCommand::Close]
    );
    assert!(
        window.harness.state_mut().apply().is_empty(),
        "closed once, not every frame"
    );
}

#[test]
fn a_restart_for_a_lost_gpu_closes_the_window_for_the_new_worker() {
    let mut window = Window::new(approved());
    window.host.stop(StopRequest::Restart(RestartRequest {
        reason: "the GPU stopped working: CUDA_ERROR_LAUNCH_TIMEOUT".to_owned(),
        variables: vec![("STUDIO_WORKER_GPU_RESTARTS".to_owned(), "1:0".to_owned())],
    }));
    assert_eq!(
        window.harness.state_mut().apply(),
        vec![egui::ViewportCommand::Close]
    );
    assert!(window.harness.state_mut().apply().is_empty(), "closed once");
}

#[test]
fn the_status_tab_says_which_backend_runs_and_why_not_a_gpu() {
    let mut window = Window::new(approved());
    window.set_status(|s| {
        s.device = Some(studio_worker::vocab::device::DeviceInfo {
            kind: studio_worker::vocab::device::DeviceKind::Cpu,
            name: "AMD Ryzen 7".into(),
            memory_mb: 32768,
        });
        s.device_note = Some("no NVIDIA driver found; using the CPU".into());
    });
    assert!(window.shows("Runs on: CPU · AMD Ryzen 7 · 32.0 GB"));
    assert!(window.shows("No NVIDIA driver found; using the CPU"));

    window.set_status(|s| {
        s.device = Some(studio_worker::vocab::device::DeviceInfo {
            kind: studio_worker::vocab::device::DeviceKind::Cuda,
            name: "NVIDIA GeForce RTX 4070".into(),
            memory_mb: 12282,
        });
        s.device_note = None;
    });
    assert!(window.shows("Runs on: CUDA · NVIDIA GeForce RTX 4070 · 12.0 GB"));
    assert!(!window.shows("NVIDIA driver"));
}

#[test]
fn the_status_tab_says_which_models_are_not_served_and_why() {
    let mut window = Window::new(approved());
    window.set_status(|s| s.models_ready = Some(vec!["sd-turbo".into()]));
    assert!(window.shows("Models ready: sd-turbo"));
    assert!(!window.shows("is not served"));
    window.set_status(|s| {
        s.models_refused = vec![studio_worker::engine::RefusedModel {
            model_id: "sdxl-base".into(),
            reason: "its weights need about 5.50 GB of the GPU's memory with its text encoders \
                     on the CPU, and this worker may use 5.15 GB of it"
                .into(),
        }];
    });
    assert!(window.shows(
        "sdxl-base is not served: its weights need about 5.50 GB of the GPU's memory with its \
         text encoders on the CPU, and this worker may use 5.15 GB of it"
    ));
    assert!(window.shows("Models ready: sd-turbo"));
}

#[test]
fn the_status_tab_says_the_worker_was_started_again_for_a_lost_gpu() {
    let mut window = Window::new(approved());
    assert!(!window.shows("Started again"));
    window.set_status(|s| {
        s.restarted = Some(Restarted {
            at: chrono::Utc::now() - chrono::Duration::minutes(3),
            reason: "CUDA_ERROR_LAUNCH_TIMEOUT".into(),
            kernels_off: false,
        });
    });
    assert!(
        window
            .shows("Started again 3 min ago: the GPU stopped working (CUDA_ERROR_LAUNCH_TIMEOUT)")
    );
    window.set_status(|s| {
        if let Some(restarted) = s.restarted.as_mut() {
            restarted.kernels_off = true;
        }
    });
    assert!(window.shows(
        "Started again 3 min ago: the GPU stopped working (CUDA_ERROR_LAUNCH_TIMEOUT). It did \
         twice: this worker's own GPU kernels and CUDA graphs are off until studio-worker is \
         restarted"
    ));
}

#[test]
fn a_second_launch_brings_the_window_forward() {
    let mut window = Window::new(approved());
    assert!(window.harness.state_mut().apply().is_empty());
    window.host.raise_window();
    let raised = window.harness.state_mut().apply();
    assert!(raised.contains(&egui::ViewportCommand::Visible(true)));
    assert!(raised.contains(&egui::ViewportCommand::Focus));
    assert!(
        window.harness.state_mut().apply().is_empty(),
        "once per request"
    );
}

#[test]
fn a_hidden_or_minimised_window_does_no_periodic_work() {
    let mut window = Window::new(approved());
    let app = window.harness.state();
    assert_eq!(
        app.tick(None),
        Some(std::time::Duration::from_secs(1)),
        "shown: relative times tick"
    );
    assert_eq!(app.tick(Some(true)), None, "minimised: nothing");
    window.set_status(|s| s.jobs.current = Some(running_job("j", "p", Stage::Denoising, 1, 4)));
    assert_eq!(
        window.harness.state().tick(None),
        Some(std::time::Duration::from_millis(250))
    );
}

#[test]
fn thumbnails_load_once_off_the_ui_thread_not_every_frame() {
    let previews = tempfile::tempdir().unwrap();
    let thumbnails = studio_worker::thumbnails::Thumbnails::new(previews.path().to_path_buf());
    let image = image::RgbImage::from_pixel(512, 512, image::Rgb([200, 40, 40]));
    let mut with_preview = approved();
    let current = running_job("j_1", "a red square", Stage::Decoding, 1, 1);
    let mut finished = FinishedJob::new(&current, JobOutcome::DELIVERED);
    finished.thumbnail = Some(
        thumbnails
            .save("j_1", &image, &encode_png(&image, "").unwrap())
            .unwrap(),
    );
    with_preview.jobs.remember(finished);

    let mut window = Window::new(with_preview);
    window.harness.get_by_label("Jobs").click();
    window.wait_for_preview();
    for _ in 0..20 {
        window.harness.step();
    }
    assert_eq!(
        window.harness.state().thumbnail_loads(),
        1,
        "read once, drawn many times"
    );
}

#[test]
fn saving_copies_needs_a_folder_and_saved_copies_can_be_opened() {
    let mut window = Window::new(approved());
    window.harness.get_by_label("Settings").click();
    window.harness.run();
    window
        .harness
        .get_by_label("Save a copy of each image to a folder")
        .click();
    window.harness.run();
    assert!(window.shows("no folder chosen"));
    assert!(window.harness.query_by_label("Choose folder…").is_some());
    window.harness.get_by_label("Save").click();
    window.harness.run();
    assert!(window.shows("Not saved: choose a folder for the copies"));
    assert!(window.sent().is_empty());

    let mut with_copy = approved();
    let mut finished = FinishedJob::new(
        &running_job("j_1", "a blue fox", Stage::Decoding, 4, 4),
        JobOutcome::DELIVERED,
    );
    finished.saved_copies = vec!["/tmp/copies/fox.png".into()];
    with_copy.jobs.remember(finished);
    let mut window = Window::new(with_copy);
    window.harness.get_by_label("Jobs").click();
    window.harness.run();
    assert!(window.harness.query_by_label("Open").is_some());
}

#[test]
fn the_status_tab_shows_model_downloads_and_why_one_stopped() {
    let mut downloading = approved();
    downloading.downloads = vec![
        studio_worker::runtime::ModelDownload {
            model_id: "sd-turbo".into(),
            done_bytes: 1_290_000_000,
            total_bytes: 2_580_000_000,
            bytes_per_second: 18_200_000.0,
            eta: Some(std::time::Duration::from_secs(71)),
            problem: None,
        },
        studio_worker::runtime::ModelDownload {
            model_id: "sdxl-turbo".into(),
            problem: Some("not enough free disk space: the download needs 7.14 GB more".into()),
            ..Default::default()
        },
    ];
    let window = Window::new(downloading);
    assert!(
        window.shows("Downloading sd-turbo: 1.29 GB of 2.58 GB · 18.2 MB/s · about 1 min left"),
        "progress with size, speed and time left"
    );
    assert!(window.shows("sdxl-turbo: not enough free disk space"));
}

#[test]
fn a_broken_studio_url_is_the_status_tabs_headline() {
    let mut broken = status(RegistrationState::Pristine);
    broken.studio_url_problem =
        Some("the studio URL in the settings is not valid (plain http); fix it in Settings".into());
    let window = Window::new(broken);
    assert!(window.shows("Not connected to the studio"));
    assert!(window.shows("The studio URL in the settings is not valid"));
    assert!(
        !window.shows("Asking the studio"),
        "no registration progress is claimed while nothing talks to the studio"
    );
}

#[test]
fn a_jobs_preview_opens_large_and_closes() {
    let previews = tempfile::tempdir().unwrap();
    let thumbnails = studio_worker::thumbnails::Thumbnails::new(previews.path().to_path_buf());
    let image = image::RgbImage::from_pixel(1024, 768, image::Rgb([30, 90, 200]));
    let mut with_preview = approved();
    let current = running_job("j_9", "a blue lake at dawn", Stage::Decoding, 1, 1);
    let mut finished = FinishedJob::new(&current, JobOutcome::DELIVERED);
    let saved = thumbnails
        .save("j_9", &image, &encode_png(&image, "").unwrap())
        .unwrap();
    let kept = image::open(&saved).unwrap();
    assert_eq!(
        (kept.width(), kept.height()),
        (512, 384),
        "kept at 512 px on its longer side"
    );
    finished.thumbnail = Some(saved);
    with_preview.jobs.remember(finished);

    let mut window = Window::new(with_preview);
    window.harness.get_by_label("Jobs").click();
    window.wait_for_preview();
    assert!(window.harness.query_by_label("Close").is_none());
    window.harness.get_by_label("Show the image larger").click();
    let _ = window.harness.run_ok();
    assert!(window.shows("seed"), "the large view names the parameters");
    window.harness.get_by_label("Close").click();
    let _ = window.harness.run_ok();
    assert!(window.harness.query_by_label("Close").is_none(), "closed");
}

#[test]
fn the_status_tab_says_which_game_paused_it_and_the_person_may_resume_over_it() {
    let mut window = Window::new(approved());
    window.set_status(|s| {
        s.paused = Some(PauseReason::Game);
        s.policy.pause = Some(studio_worker::policy::AutoPause {
            reason: PauseReason::Game,
            detail: "Cyberpunk 2077 is running".into(),
            resumes: "resumes 2 min after it closes".into(),
        });
        s.policy.blind = vec![(
            studio_worker::policy::Signal::FullScreen,
            "Wayland does not let a program see other programs' windows".into(),
        )];
    });
    assert!(window.shows("Paused: Cyberpunk 2077 is running"));
    assert!(window.shows("Resumes 2 min after it closes."));
    assert!(
        window.shows(
            "Not watched on this PC: full-screen windows (Wayland does not let a program see"
        )
    );
    window.harness.get_by_label("Resume generation").click();
    window.harness.run();
    assert_eq!(window.sent(), vec![Command::Resume]);

    // Resumed over the game: working, and saying it pauses again when the game restarts.
    window.set_status(|s| {
        s.paused = None;
        s.policy.pause = None;
        s.policy.overridden = vec![PauseReason::Game];
    });
    assert!(window.shows("You resumed over a game: the worker pauses again when it next starts."));
    assert!(window.harness.query_by_label("Pause generation").is_some());
}

#[test]
fn the_policy_settings_save_with_the_rest() {
    let mut window = Window::new(approved());
    window.harness.get_by_label("Settings").click();
    window.harness.run();
    assert!(window.shows("When to step aside"));
    window
        .harness
        .get_by_label_contains("Only while I am away")
        .click();
    window.harness.run();
    assert!(window.shows("A gamepad may not count as input"));
    let list = window
        .harness
        .get_by_role_and_label(Role::MultilineTextInput, "Always pause while these run:");
    list.focus();
    window.harness.run();
    window
        .harness
        .get_by_role_and_label(Role::MultilineTextInput, "Always pause while these run:")
        .type_text("obs64.exe\nresolve");
    window.harness.run();
    window
        .harness
        .get_by_label("Only in these hours (this PC's clock)")
        .click();
    window.harness.run();
    // Sunday 03:00 is allowed (every hour is, at first): one click forbids it.
    window.harness.get_by_label("Sun 03:00").scroll_to_me();
    window.harness.run();
    window.harness.get_by_label("Sun 03:00").click();
    window.harness.run();
    // The section makes the tab longer than the window: scroll down, as a person would.
    window
        .harness
        .get_by_label_contains("Pause while on battery")
        .scroll_to_me();
    window.harness.run();
    window
        .harness
        .get_by_label_contains("Pause while on battery")
        .click();
    window.harness.run();
    window.harness.get_by_label("Save").scroll_to_me();
    window.harness.run();
    let policy = window.save().policy;
    assert!(policy.only_when_away && policy.use_schedule);
    assert!(!policy.pause_on_battery);
    assert_eq!(policy.always_pause_for, vec!["obs64.exe", "resolve"]);
    assert!(!policy.schedule.allows(6, 3) && policy.schedule.allows(6, 4));
    assert_eq!(policy.temperature_limit_c, 83, "unchanged: the default");
}

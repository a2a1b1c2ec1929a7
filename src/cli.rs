//! The command line: what each subcommand does, and the exit codes (0 ok, 1 failure with a
//! one-line reason on stderr, 2 usage error, printed by clap or by `generate`'s checks).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::config::{self, Config, Paths, SharedConfig};
use crate::platform::single_instance;
use crate::registration::RegistrationState;
use crate::runtime::control;
use crate::runtime::{Runtime, RuntimeOptions, status_file};
use crate::timing::Timing;

#[derive(Debug, Parser)]
#[command(
    name = "studio-worker",
    version,
    about = "Lends this PC's GPU to the minis.gg studio.",
    long_about = "Lends this PC's GPU to the minis.gg studio.\n\n\
        On first start the worker asks the studio for approval (no account or password: the \
        studio's operator approves this PC), then takes image jobs while you are not using the GPU.\n\n\
        Without a command, the worker runs with its window and tray icon."
)]
pub struct Cli {
    /// Settings file to use instead of the standard one; logs and state go in its folder.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Start in the tray, without showing the window (used when starting at login).
    #[arg(long)]
    pub minimized: bool,

    #[command(subcommand)]
    pub command: Option<CliCommand>,
}

#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// Run the worker.
    Run {
        /// Without any window or tray (for servers and terminals).
        #[arg(long)]
        headless: bool,
        /// Start in the tray, without showing the window.
        #[arg(long, conflicts_with = "headless")]
        minimized: bool,
        /// Talk to this studio for this run instead of the one in the settings.
        #[arg(long, value_name = "URL")]
        api_url: Option<String>,
    },
    /// Manage this PC's registration with the studio.
    Register {
        /// Forget the approval (or pending request, or rejection) and ask the studio again on
        /// the next start. Keeps the install id and all other settings.
        #[arg(long)]
        reset: bool,
    },
    /// Stop taking jobs (a running job is handed back at its next step). Remembered across
    /// restarts; acts on the running worker, or on the settings when none is running.
    Pause,
    /// Take jobs again after `pause`.
    Resume,
    /// The models this worker can serve: list, pull, remove, verify, add a local folder.
    #[command(subcommand)]
    Models(crate::models::commands::ModelsCommand),
    /// Make an image on this PC, without the studio (also a quick check that the GPU works).
    Generate(crate::generate::GenerateArgs),
    /// Show the registration, the studio and whether a worker is running.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show which device the image engine uses on this PC (GPU or CPU, and why).
    Device {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Crash on purpose, to check crash reporting end to end (the report and the log must
    /// show neither the token nor the home folder).
    #[command(hide = true)]
    CrashTest,
    /// Ask the running worker to quit: it finishes or hands back its job first. Installers
    /// use this before replacing the program.
    Quit {
        /// Seconds to wait for it to exit.
        #[arg(long, default_value_t = 60, value_name = "SECONDS")]
        wait: u64,
    },
}

/// Parses the command line, runs the command, and turns the outcome into an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("studio-worker: {err:#}");
            if err.downcast_ref::<crate::generate::UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let paths = Paths::resolve(cli.config.as_deref())?;
    // The commands that run the engine hand over to the CUDA build shipped beside this one
    // when it can run here (it replaces this process); the others never touch the GPU.
    if matches!(
        cli.command,
        None | Some(CliCommand::Run { .. } | CliCommand::Generate(_) | CliCommand::Device { .. })
    ) {
        crate::platform::gpu_build::hand_over_if_usable();
    }
    match cli.command {
        None => run_app(&paths, None, cli.minimized),
        Some(CliCommand::Run {
            headless: true,
            api_url,
            ..
        }) => run_worker(&paths, api_url),
        Some(CliCommand::Run {
            headless: false,
            api_url,
            minimized,
        }) => run_app(&paths, api_url, minimized || cli.minimized),
        Some(CliCommand::Register { reset: true }) => reset_registration(&paths),
        Some(CliCommand::Register { reset: false }) => {
            bail!("nothing to do: `register --reset` starts the registration over")
        }
        Some(CliCommand::Status { json }) => print_status(&paths, json),
        Some(CliCommand::Models(command)) => {
            let _log_guard = crate::logging::init(None);
            crate::models::commands::run(&paths, command)
        }
        Some(CliCommand::Generate(args)) => {
            let _log_guard = crate::logging::init(None);
            crate::generate::run(&paths, args)
        }
        Some(CliCommand::Pause) => set_paused(&paths, true),
        Some(CliCommand::Resume) => set_paused(&paths, false),
        Some(CliCommand::Device { json }) => print_device(&paths, json),
        Some(CliCommand::Quit { wait }) => quit_running(&paths, Duration::from_secs(wait)),
        Some(CliCommand::CrashTest) => crash_test(&paths),
    }
}

/// `crash-test`: a panic carrying a secret and a home-folder path, through the same hooks as
/// a real crash.
fn crash_test(paths: &Paths) -> anyhow::Result<()> {
    let _log_guard = crate::logging::init(Some(&paths.log_dir()));
    let (config, _) = load_config(paths)?;
    let _crash_guard = crate::crash::init(&config);
    let config = config.snapshot();
    let token = config
        .auth_token
        .as_ref()
        .map_or("(no token)", |token| token.expose());
    panic!(
        "crash test: token {token}, settings in {}",
        paths.config_file.display()
    );
}

/// `device`: the device `auto` (or the settings' choice) opens here, and why not a GPU.
fn print_device(paths: &Paths, json: bool) -> anyhow::Result<()> {
    // Read-only, like `status`: a broken settings file counts as the defaults here.
    let preference = std::fs::read(&paths.config_file)
        .ok()
        .and_then(|bytes| config::parse(&bytes).ok())
        .map(|config| config.engine.device)
        .unwrap_or_default();
    let selected = crate::engine::device::select(preference).map_err(anyhow::Error::msg)?;
    let info = &selected.info;
    if json {
        let report = serde_json::json!({
            "kind": info.kind,
            "name": info.name,
            "memoryMb": info.memory_mb,
            "fallbackReason": selected.fallback_reason,
        });
        println!("{report}");
    } else {
        println!(
            "{} · {} · {:.1} GB",
            info.kind.label(),
            info.name,
            info.memory_mb as f64 / 1024.0
        );
        if let Some(reason) = &selected.fallback_reason {
            println!("Why not a GPU: {reason}");
        }
    }
    Ok(())
}

/// `quit`: asks the running worker to stop (handing back or finishing its job), then waits
/// until its process is gone.
fn quit_running(paths: &Paths, wait: Duration) -> anyhow::Result<()> {
    let pid = running_worker_pid(&paths.data_dir);
    match tokio_current_thread()?.block_on(control::send(&paths.data_dir, "quit")) {
        Ok(()) => {}
        Err(control::ControlError::NotRunning) if pid.is_none() => {
            println!("No worker is running.");
            return Ok(());
        }
        Err(err) => bail!("{err}"),
    }
    let Some(pid) = pid else {
        println!("The worker is quitting.");
        return Ok(());
    };
    let deadline = std::time::Instant::now() + wait;
    while crate::platform::host::process_alive(pid) {
        if std::time::Instant::now() >= deadline {
            bail!(
                "the worker (process {pid}) is still stopping after {} s",
                wait.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("The worker has quit.");
    Ok(())
}

/// `pause` / `resume`: through the running worker's control channel, or in the settings file
/// when no worker runs (so it starts paused, or not).
fn set_paused(paths: &Paths, paused: bool) -> anyhow::Result<()> {
    let command = if paused { "pause" } else { "resume" };
    match tokio_current_thread()?.block_on(control::send(&paths.data_dir, command)) {
        Ok(()) => {
            println!(
                "{}",
                if paused {
                    "Paused: the worker takes no jobs and hands back the one it is running."
                } else {
                    "Resumed: the worker takes jobs again."
                }
            );
            return Ok(());
        }
        Err(control::ControlError::NotRunning) => {}
        Err(err) => bail!("{err}"),
    }
    if let Some(pid) = running_worker_pid(&paths.data_dir) {
        bail!("a worker is running (process {pid}) but its control channel is not available");
    }
    let loaded = config::load(&paths.config_file)?;
    let mut config = loaded.config;
    config.pause.by_user = paused;
    config::save(&paths.config_file, &config)?;
    println!(
        "{}",
        if paused {
            "No worker is running; it will start paused."
        } else {
            "No worker is running; it will take jobs when it starts."
        }
    );
    Ok(())
}

/// The worker with its window and tray, until the person quits.
fn run_app(paths: &Paths, api_url: Option<String>, minimized: bool) -> anyhow::Result<()> {
    if !display_available() {
        eprintln!(
            "studio-worker: no display found; running without a window (as `run --headless`)"
        );
        return run_worker(paths, api_url);
    }
    let Some(_instance) = single_instance::acquire(&paths.data_dir)? else {
        // Already running: bring its window forward instead of starting a second worker.
        return match tokio_current_thread()?.block_on(control::send(&paths.data_dir, "show")) {
            Ok(()) => {
                println!("studio-worker is already running; its window was brought forward.");
                Ok(())
            }
            Err(err) => bail!("studio-worker is already running, but did not answer ({err})"),
        };
    };
    let _log_guard = crate::logging::init(Some(&paths.log_dir()));
    let (config, recovered_config) = load_config(paths)?;
    let _crash_guard = crate::crash::init(&config);
    crate::ui::run(
        config,
        crate::ui::AppOptions {
            data_dir: paths.data_dir.clone(),
            api_base_override: api_url,
            recovered_config,
            minimized,
        },
    )
}

fn tokio_current_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Whether a window can be shown. On Linux and the BSDs that needs an X11 or Wayland display;
/// Windows and macOS always have one for a logged-in person.
fn display_available() -> bool {
    if cfg!(any(target_os = "windows", target_os = "macos")) {
        return true;
    }
    ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()))
}

/// The worker, headless, until Ctrl-C / SIGTERM or a fatal error.
fn run_worker(paths: &Paths, api_url: Option<String>) -> anyhow::Result<()> {
    let Some(_instance) = single_instance::acquire(&paths.data_dir)? else {
        let pid = running_worker_pid(&paths.data_dir)
            .map_or_else(String::new, |pid| format!(" (process {pid})"));
        bail!(
            "a worker is already running for {}{pid}",
            paths.data_dir.display()
        );
    };
    let _log_guard = crate::logging::init(Some(&paths.log_dir()));
    let (config, recovered_config) = load_config(paths)?;
    let _crash_guard = crate::crash::init(&config);
    let tokio = crate::runtime::tokio_runtime().context("cannot start the async runtime")?;
    tokio.block_on(async {
        let mut shutdown = crate::runtime::ShutdownSignal::install();
        let store = crate::models::store::ModelStore::standard(&paths.data_dir);
        let engine =
            crate::engine::candle_engine::from_settings(&config.snapshot(), store.as_ref());
        let model_supply = crate::runtime::ModelSupply::standard(store);
        let options = RuntimeOptions {
            timing: Timing::PRODUCTION,
            data_dir: paths.data_dir.clone(),
            api_base_override: api_url,
            engine,
            recovered_config,
            model_supply,
            tolerate_invalid_studio_url: false,
        };
        let runtime = Runtime::start(config, options)?;
        let outcome = tokio::select! {
            () = shutdown.recv() => Ok(()),
            () = runtime.quit_requested() => {
                tracing::info!("stopping: asked to quit");
                Ok(())
            }
            reason = runtime.fatal() => Err(anyhow::anyhow!(reason)),
        };
        runtime.shutdown().await;
        outcome
    })
}

/// Loads the settings, moving a broken file aside (and saying so) instead of overwriting it.
fn load_config(paths: &Paths) -> anyhow::Result<(SharedConfig, Option<config::BrokenConfig>)> {
    let loaded = config::load(&paths.config_file)?;
    if let Some(broken) = &loaded.recovered_from {
        tracing::error!(
            "the settings file could not be read ({}); it was kept as {} and the worker starts from default settings",
            broken.reason,
            broken.kept_at.display()
        );
    }
    Ok((
        SharedConfig::new(paths.config_file.clone(), loaded.config),
        loaded.recovered_from,
    ))
}

fn reset_registration(paths: &Paths) -> anyhow::Result<()> {
    if let Some(pid) = running_worker_pid(&paths.data_dir) {
        bail!(
            "a worker is running (process {pid}); stop it first, or use Reset registration in its Settings tab"
        );
    }
    let loaded = config::load(&paths.config_file)?;
    if let Some(broken) = &loaded.recovered_from {
        println!(
            "The settings file could not be read ({}); it was kept as {}.",
            broken.reason,
            broken.kept_at.display()
        );
    }
    let mut config = loaded.config;
    let before = RegistrationState::from_config(&config);
    config.reset_registration();
    config::save(&paths.config_file, &config)?;

    let what = match before {
        RegistrationState::Pristine => "There was no registration to forget.".to_owned(),
        RegistrationState::Pending { request_id, .. } => {
            format!("Forgot the pending request {request_id} and its secret.")
        }
        RegistrationState::Approved { worker_id } | RegistrationState::Revoked { worker_id } => {
            format!("Forgot worker {worker_id} and its access token.")
        }
        RegistrationState::Rejected { reason } => format!("Forgot the rejection ({reason})."),
    };
    println!("{what}");
    if let Some(install_id) = &config.install_id {
        println!("Kept install id {install_id} and all other settings.");
    } else {
        println!("Kept all other settings.");
    }
    println!("The next start asks the studio for approval again.");
    Ok(())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusReport {
    registration: RegistrationState,
    description: String,
    worker_id: Option<String>,
    install_id: Option<String>,
    /// Masked (`abcd…wxyz`).
    auth_token: Option<String>,
    api_base_url: String,
    worker_name: String,
    config_path: PathBuf,
    paused: Option<crate::vocab::pause::PauseReason>,
    /// What the running worker last wrote to `status.json`, when one is running.
    running: Option<status_file::StatusFile>,
}

fn print_status(paths: &Paths, json: bool) -> anyhow::Result<()> {
    // Read-only: a broken file is reported, not moved (only a command that writes moves it).
    let config = match std::fs::read(&paths.config_file) {
        Ok(bytes) => config::parse(&bytes).map_err(|reason| {
            anyhow::anyhow!(
                "{} is not valid settings ({reason}); the worker will keep it aside and start from defaults",
                paths.config_file.display(),
            )
        })?,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Config::default(),
        Err(err) => {
            return Err(err).with_context(|| format!("cannot read {}", paths.config_file.display()));
        }
    };
    let registration = RegistrationState::from_config(&config);
    let running = running_status(&paths.data_dir);
    let report = StatusReport {
        description: registration.describe(),
        registration,
        worker_id: config.worker_id.clone(),
        install_id: config.install_id.clone(),
        auth_token: config
            .auth_token
            .as_ref()
            .map(crate::secret::Secret::masked),
        api_base_url: config.api_base_url.clone(),
        worker_name: config.worker_name.clone(),
        config_path: paths.config_file.clone(),
        paused: crate::runtime::pause_reason(&config),
        running,
    };

    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let none = || "—".to_owned();
    println!("Registration: {}", report.description);
    println!(
        "Worker id:    {}",
        report.worker_id.clone().unwrap_or_else(none)
    );
    println!(
        "Token:        {}",
        report.auth_token.clone().unwrap_or_else(none)
    );
    println!(
        "Install id:   {}",
        report.install_id.clone().unwrap_or_else(none)
    );
    println!("Worker name:  {}", report.worker_name);
    println!("Studio:       {}", report.api_base_url);
    println!("Settings:     {}", report.config_path.display());
    println!(
        "Paused:       {}",
        report
            .paused
            .map_or_else(|| "no".to_owned(), |reason| reason.describe().to_owned())
    );
    match &report.running {
        Some(file) => {
            let heartbeat = file.status.connection.last_heartbeat_at.map_or_else(
                || "no heartbeat yet".to_owned(),
                |at| {
                    format!(
                        "last heartbeat {}",
                        crate::human::ago(at, chrono::Utc::now())
                    )
                },
            );
            println!("Worker:       running (process {}), {heartbeat}", file.pid);
            if let Some(notice) = &file.status.settings_recovered {
                println!("Settings:     {notice}");
            }
            if let Some(problem) = file
                .status
                .connection
                .last_error
                .as_ref()
                .or(file.status.registration_problem.as_ref())
            {
                println!("Problem:      {problem}");
            }
            if let Some(models) = &file.status.engine {
                println!("Models:       {models}");
            }
            for download in &file.status.downloads {
                println!("Download:     {}", download_line(download));
            }
        }
        None => println!("Worker:       not running"),
    }
    Ok(())
}

/// The running worker's status file, if a worker is running for this data folder.
fn running_status(data_dir: &Path) -> Option<status_file::StatusFile> {
    let file = status_file::read(&data_dir.join(status_file::FILE_NAME))?;
    (file.running && crate::platform::host::process_alive(file.pid)).then_some(file)
}

fn running_worker_pid(data_dir: &Path) -> Option<u32> {
    running_status(data_dir).map(|file| file.pid)
}

/// "sd-turbo: 1.29 GB of 2.58 GB, 18.2 MB/s, about 1 min left" (or why it stopped).
fn download_line(download: &crate::runtime::ModelDownload) -> String {
    let mut line = format!("{}: ", download.model_id);
    if download.total_bytes > 0 {
        line.push_str(&format!(
            "{} of {}",
            crate::human::bytes(download.done_bytes),
            crate::human::bytes(download.total_bytes)
        ));
        if download.bytes_per_second > 0.0 {
            line.push_str(&format!(
                ", {}/s",
                crate::human::bytes(download.bytes_per_second as u64)
            ));
        }
        if let Some(eta) = download.eta {
            line.push_str(&format!(", about {} left", crate::human::duration(eta)));
        }
    } else {
        line.push_str("starting");
    }
    if let Some(problem) = &download.problem {
        line.push_str(&format!(" ({problem})"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::ModelDownload;

    #[test]
    fn a_download_reads_as_one_status_line() {
        let moving = ModelDownload {
            model_id: "sd-turbo".into(),
            done_bytes: 1_290_000_000,
            total_bytes: 2_580_000_000,
            bytes_per_second: 18_200_000.0,
            eta: Some(std::time::Duration::from_secs(71)),
            problem: None,
        };
        assert_eq!(
            download_line(&moving),
            "sd-turbo: 1.29 GB of 2.58 GB, 18.2 MB/s, about 1 min left"
        );
        let stuck = ModelDownload {
            model_id: "sdxl-turbo".into(),
            problem: Some("needs HF_TOKEN".into()),
            ..ModelDownload::default()
        };
        assert_eq!(
            download_line(&stuck),
            "sdxl-turbo: starting (needs HF_TOKEN)"
        );
    }
}

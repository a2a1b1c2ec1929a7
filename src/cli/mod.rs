//! The command line: what each subcommand does, and the exit codes (0 ok, 1 failure with a
//! one-line reason on stderr, 2 usage error, printed by clap or by a command's own checks).
//!
//! `generate` and `models …` have their own files; `status` too.

mod generate;
mod models;
mod policy;
mod status;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

use crate::config::{self, Config, Paths, SharedConfig};
use crate::platform::single_instance;
use crate::registration::RegistrationState;
use crate::runtime::control::{self, ControlCommand, ControlError};
use crate::runtime::{Launch, RestartRequest, Runtime, StopRequest};

/// Arguments that cannot run: exit code 2, like clap's own usage errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

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
    Models(models::ModelsCommand),
    /// Make an image on this PC, without the studio (also a quick check that the GPU works).
    Generate(generate::GenerateArgs),
    /// Show the registration, the studio and whether a worker is running.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show what the worker sees on this PC (other programs on the GPU, a full-screen window,
    /// input idle time, temperature, battery) and whether it would step aside now.
    Policy {
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
    // Before clap prints help or an error: a windowed Windows build has no console of its own.
    crate::platform::console::attach_to_parent();
    let cli = Cli::parse();
    // The GPU's compiled kernels in a cache of the worker's own; set in the environment now,
    // while this is the only thread, and inherited by the CUDA build it may hand over to.
    if runs_engine(&cli.command)
        && let Ok(paths) = Paths::resolve(cli.config.as_deref())
    {
        crate::engine::kernel_cache::use_workers_own(&paths.data_dir);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("studio-worker: {err:#}");
            if err.downcast_ref::<UsageError>().is_some() {
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
    if runs_engine(&cli.command) {
        crate::platform::gpu_build::hand_over_if_usable();
    }
    match cli.command {
        None => run_app(&paths, None, cli.minimized).and_then(|end| restart_if_asked(end, true)),
        Some(CliCommand::Run {
            headless: true,
            api_url,
            ..
        }) => run_worker(&paths, api_url).and_then(|end| restart_if_asked(end, false)),
        Some(CliCommand::Run {
            headless: false,
            api_url,
            minimized,
        }) => run_app(&paths, api_url, minimized || cli.minimized)
            .and_then(|end| restart_if_asked(end, true)),
        Some(CliCommand::Register { reset: true }) => reset_registration(&paths),
        Some(CliCommand::Register { reset: false }) => {
            bail!("nothing to do: `register --reset` starts the registration over")
        }
        Some(CliCommand::Status { json }) => status::print_status(&paths, json),
        Some(CliCommand::Models(command)) => {
            let _log_guard = crate::logging::init(None);
            models::run(&paths, command)
        }
        Some(CliCommand::Generate(args)) => {
            let _log_guard = crate::logging::init(None);
            generate::run(&paths, args)
        }
        Some(CliCommand::Pause) => set_paused(&paths, true),
        Some(CliCommand::Resume) => set_paused(&paths, false),
        Some(CliCommand::Device { json }) => print_device(&paths, json),
        Some(CliCommand::Policy { json }) => policy::print_policy(&paths, json),
        Some(CliCommand::Quit { wait }) => quit_running(&paths, Duration::from_secs(wait)),
        Some(CliCommand::CrashTest) => crash_test(&paths),
    }
}

/// Starts the worker again when its run ended asking for that (the GPU stopped working),
/// with the same arguments (`with_window`: in the tray). Everything of the old run (the
/// single-instance lock, the log, the crash guard) is released by now.
fn restart_if_asked(end: Option<RestartRequest>, with_window: bool) -> anyhow::Result<()> {
    let Some(RestartRequest { reason, variables }) = end else {
        return Ok(());
    };
    eprintln!("studio-worker: {reason}; starting again");
    let current: Vec<OsString> = std::env::args_os().skip(1).collect();
    let arguments = crate::platform::relaunch::arguments(&current, with_window);
    let why = crate::platform::relaunch::relaunch(&arguments, &variables);
    bail!("{reason}, and {why}")
}

/// Whether `command` opens the engine's device: the worker itself, `generate` and `device`.
fn runs_engine(command: &Option<CliCommand>) -> bool {
    matches!(
        command,
        None | Some(CliCommand::Run { .. } | CliCommand::Generate(_) | CliCommand::Device { .. })
    )
}

/// `crash-test`: a panic carrying the secrets and a home-folder path, through the same hooks
/// as a real crash.
fn crash_test(paths: &Paths) -> anyhow::Result<()> {
    let (config, _, _guards) = open_worker(paths)?;
    let config = config.snapshot();
    let token = config
        .auth_token
        .as_ref()
        .map_or("(no token)", |token| token.expose());
    // The Hugging Face token too, when there is one: it must be hidden as well.
    let hub_token = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"]
        .iter()
        .find_map(|name| std::env::var(name).ok())
        .unwrap_or_default();
    panic!(
        "crash test: token {token}, settings in {}, hub token {hub_token}",
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
    let selected = crate::engine::device::select(preference)?;
    let info = &selected.info;
    if json {
        let report = serde_json::json!({
            "kind": info.kind,
            "name": info.name,
            "memoryMb": info.memory_mb,
            "fallbackReason": selected.fallback_reason,
            "precision": selected.precision.label(),
            "precisionNote": selected.precision_note,
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
        if let Some(note) = &selected.precision_note {
            println!("Precision: {note}");
        }
    }
    Ok(())
}

/// `quit`: asks the running worker to stop (handing back or finishing its job), then waits
/// until its process is gone.
fn quit_running(paths: &Paths, wait: Duration) -> anyhow::Result<()> {
    let pid = running_worker_pid(&paths.data_dir);
    match tokio_current_thread()?.block_on(control::send(&paths.data_dir, &ControlCommand::Quit)) {
        Ok(_) => {}
        Err(ControlError::NotRunning) if pid.is_none() => {
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

/// The settings as the file holds them, for a command that only reads them: a broken file is
/// reported, not moved aside (only a command that writes moves it).
pub(crate) fn read_settings(paths: &Paths) -> anyhow::Result<Config> {
    match std::fs::read(&paths.config_file) {
        Ok(bytes) => config::parse(&bytes).map_err(|reason| {
            anyhow::anyhow!(
                "{} is not valid settings ({reason}); the worker will keep it aside and start \
                 from defaults",
                paths.config_file.display(),
            )
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
        Err(err) => {
            Err(err).with_context(|| format!("cannot read {}", paths.config_file.display()))
        }
    }
}

/// Has the worker running for this data folder apply `command` (it is the only writer of its
/// settings while it runs). `false`: no worker runs, and the caller may change the settings
/// file itself. A note from the worker (applied, but not saved) goes to stderr.
pub(crate) fn tell_running_worker(paths: &Paths, command: &ControlCommand) -> anyhow::Result<bool> {
    let applied = ask_running_worker(paths, command)?;
    if let Some(Some(note)) = &applied {
        eprintln!("studio-worker: {note}");
    }
    Ok(applied.is_some())
}

/// [`tell_running_worker`], with what the worker said for the caller to show: `None` when no
/// worker runs, else its note (`None`: applied as asked, nothing to add).
pub(crate) fn ask_running_worker(
    paths: &Paths,
    command: &ControlCommand,
) -> anyhow::Result<Option<Option<String>>> {
    match tokio_current_thread()?.block_on(control::send(&paths.data_dir, command)) {
        Ok(note) => Ok(Some(note)),
        Err(ControlError::NotRunning) => match running_worker_pid(&paths.data_dir) {
            Some(pid) => bail!(
                "a worker is running (process {pid}) but its control channel is not available"
            ),
            None => Ok(None),
        },
        Err(err) => bail!("{err}"),
    }
}

/// `pause` / `resume`: through the running worker's control channel, or in the settings file
/// when no worker runs (so it starts paused, or not).
fn set_paused(paths: &Paths, paused: bool) -> anyhow::Result<()> {
    let command = if paused {
        ControlCommand::Pause
    } else {
        ControlCommand::Resume
    };
    if tell_running_worker(paths, &command)? {
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

/// The worker with its window and tray, until the person quits; a restart it asks for is
/// returned, to run once everything is released.
fn run_app(
    paths: &Paths,
    api_url: Option<String>,
    minimized: bool,
) -> anyhow::Result<Option<RestartRequest>> {
    if !display_available() {
        eprintln!(
            "studio-worker: no display found; running without a window (as `run --headless`)"
        );
        return run_worker(paths, api_url);
    }
    let Some(_instance) = single_instance::acquire(&paths.data_dir)? else {
        // Already running: bring its window forward instead of starting a second worker.
        return match tokio_current_thread()?
            .block_on(control::send(&paths.data_dir, &ControlCommand::Show))
        {
            Ok(_) => {
                println!("studio-worker is already running; its window was brought forward.");
                Ok(None)
            }
            Err(err) => bail!("studio-worker is already running, but did not answer ({err})"),
        };
    };
    let (config, recovered_config, _guards) = open_worker(paths)?;
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

/// The worker, headless, until Ctrl-C / SIGTERM or a fatal error; a restart it asks for
/// is returned, to run once everything is released.
fn run_worker(paths: &Paths, api_url: Option<String>) -> anyhow::Result<Option<RestartRequest>> {
    let Some(_instance) = single_instance::acquire(&paths.data_dir)? else {
        let pid = running_worker_pid(&paths.data_dir)
            .map_or_else(String::new, |pid| format!(" (process {pid})"));
        bail!(
            "a worker is already running for {}{pid}",
            paths.data_dir.display()
        );
    };
    let (config, recovered_config, _guards) = open_worker(paths)?;
    let tokio = crate::runtime::tokio_runtime().context("cannot start the async runtime")?;
    tokio.block_on(async {
        let mut shutdown = crate::runtime::ShutdownSignal::install();
        let runtime = Runtime::launch(
            config,
            Launch {
                data_dir: paths.data_dir.clone(),
                api_base_override: api_url,
                recovered_config,
                with_window: false,
            },
        )?;
        let outcome = tokio::select! {
            () = shutdown.recv() => Ok(None),
            stop = runtime.stop_requested() => match stop {
                StopRequest::Quit => {
                    tracing::info!("stopping: asked to quit");
                    Ok(None)
                }
                StopRequest::Fatal(reason) => Err(anyhow::anyhow!(reason)),
                StopRequest::Restart(restart) => {
                    tracing::warn!("stopping to start again: {}", restart.reason);
                    Ok(Some(restart))
                }
            },
        };
        runtime.shutdown().await;
        outcome
    })
}

/// What keeps logging and crash reporting going while a worker runs.
struct WorkerGuards {
    _log: crate::logging::LogGuard,
    _crash: crate::crash::CrashGuard,
}

/// The start of every command that runs the worker: logging to the log folder, the settings
/// (a broken file moved aside and said so, never overwritten), and crash reporting.
fn open_worker(
    paths: &Paths,
) -> anyhow::Result<(SharedConfig, Option<config::BrokenConfig>, WorkerGuards)> {
    let log = crate::logging::init(Some(&paths.log_dir()));
    let loaded = config::load(&paths.config_file)?;
    if let Some(broken) = &loaded.recovered_from {
        tracing::error!(
            "the settings file could not be read ({}); it was kept as {} and the worker starts from default settings",
            broken.reason,
            broken.kept_at.display()
        );
    }
    if !loaded.config.unknown.is_empty() {
        tracing::warn!(
            "the settings file holds settings this version does not know, kept as they are and \
             not used (misspelt?): {}",
            loaded.config.unknown.names().join(", ")
        );
    }
    let config = SharedConfig::new(paths.config_file.clone(), loaded.config);
    let crash = crate::crash::init(&config);
    Ok((
        config,
        loaded.recovered_from,
        WorkerGuards {
            _log: log,
            _crash: crash,
        },
    ))
}

/// `register --reset`: through the running worker (which asks the studio again at once), or
/// in the settings file when none runs.
fn reset_registration(paths: &Paths) -> anyhow::Result<()> {
    // What the worker forgets, read before it does (read-only: a broken file is its business).
    let on_disk = std::fs::read(&paths.config_file)
        .ok()
        .and_then(|bytes| config::parse(&bytes).ok());
    let running = tell_running_worker(paths, &ControlCommand::ResetRegistration)?;
    let (before, config) = if running {
        let config = on_disk.unwrap_or_default();
        (RegistrationState::from_config(&config), config)
    } else {
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
        (before, config)
    };

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
    if running {
        println!("The running worker asks the studio for approval again now.");
    } else {
        println!("The next start asks the studio for approval again.");
    }
    Ok(())
}

/// The running worker's status file, if a worker is running for this data folder.
fn running_status(data_dir: &Path) -> Option<crate::runtime::status_file::StatusFile> {
    let file =
        crate::runtime::status_file::read(&data_dir.join(crate::runtime::status_file::FILE_NAME))?;
    (file.running && crate::platform::host::process_alive(file.pid)).then_some(file)
}

fn running_worker_pid(data_dir: &Path) -> Option<u32> {
    running_status(data_dir).map(|file| file.pid)
}

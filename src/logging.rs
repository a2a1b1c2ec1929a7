//! Logging: human-readable lines on stderr and, for the worker itself, a daily-rolling file in
//! the data folder (kept a week) that a person can attach to a bug report.
//!
//! Levels mean something: `error` needs a person, `warn` is a state change for the worse
//! (once, not per retry), `info` is a state change a person would want in the log, `debug`
//! is per-request detail. `RUST_LOG` overrides the default `warn,studio_worker=info`.

use std::path::Path;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

const DEFAULT_FILTER: &str = "warn,studio_worker=info";
const KEEP_LOG_FILES: usize = 7;

/// Keeps the file writer's background thread alive; logs are flushed when it drops.
#[must_use = "logs to the file stop when the guard is dropped"]
pub struct LogGuard {
    _file_writer: Option<tracing_appender::non_blocking::WorkerGuard>,
}

/// Logs to stderr, and to `<log_dir>/studio-worker.<date>.log` when `log_dir` is given and
/// writable (when it is not, that is said once on stderr and the worker goes on).
pub fn init(log_dir: Option<&Path>) -> LogGuard {
    let filter =
        || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let stderr_layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .with_filter(filter());

    let mut file_problem = None;
    let (file_layer, guard) = match log_dir.map(open_log_file) {
        Some(Ok(appender)) => {
            let (writer, guard) = tracing_appender::non_blocking(appender);
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(false)
                .with_filter(filter());
            (Some(layer), Some(guard))
        }
        Some(Err(err)) => {
            file_problem = Some(err);
            (None, None)
        }
        None => (None, None),
    };

    // `try_init` fails only if a subscriber is already set (tests); that one is kept.
    let _ = tracing_subscriber::registry()
        .with(stderr_layer)
        .with(file_layer)
        .try_init();
    if let Some(err) = file_problem {
        tracing::warn!("logging to stderr only: {err}");
    }
    LogGuard {
        _file_writer: guard,
    }
}

fn open_log_file(log_dir: &Path) -> Result<tracing_appender::rolling::RollingFileAppender, String> {
    crate::files::create_private_dir_all(log_dir)
        .map_err(|err| format!("cannot create {}: {err}", log_dir.display()))?;
    tracing_appender::rolling::Builder::new()
        .rotation(tracing_appender::rolling::Rotation::DAILY)
        .filename_prefix("studio-worker")
        .filename_suffix("log")
        .max_log_files(KEEP_LOG_FILES)
        .build(log_dir)
        .map_err(|err| format!("cannot open a log file in {}: {err}", log_dir.display()))
}

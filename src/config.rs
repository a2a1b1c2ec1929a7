//! `config.toml`: what it holds, where it lives, and the only ways to read and write it.
//!
//! - [`load`] never overwrites a file it cannot parse: the file is renamed
//!   `config.toml.broken-<timestamp>` and the worker starts from defaults. Names it does not
//!   know are kept beside the settings ([`UnknownSettings`]) and written back by every save.
//! - [`save`] is atomic (temp file in the same folder, fsync, rename, fsync the folder) and
//!   owner-only (0600 on Unix): a crash at any instant leaves the old file or the new one.
//! - [`SharedConfig`] is the single in-memory source of truth; every change it publishes has
//!   been saved first.
//!
//! Adding a section is one place: a field of [`Config`] whose type is `Default + Serialize +
//! Deserialize` (see [`PauseSection`]); `#[serde(default)]` makes old files load unchanged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::secret::Secret;
use crate::vocab::device::DevicePreference;

pub const DEFAULT_API_BASE_URL: &str = "https://studio.minis.gg/api";
const CONFIG_FILE_NAME: &str = "config.toml";

/// Everything the worker persists between runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// The studio's API root, e.g. `https://studio.minis.gg/api`.
    pub api_base_url: String,
    /// How the studio's operator sees this PC.
    pub worker_name: String,

    // Registration (studio-api.md §1). Which of these are set *is* the registration state:
    // see `registration::RegistrationState::from_config`.
    /// UUID v4, invented on first launch, kept across `register --reset`.
    pub install_id: Option<String>,
    /// The pending request, once the studio has acknowledged it.
    pub registration_request_id: Option<String>,
    /// Proves to the studio that the poller created the request. Never leaves the machine
    /// except in the poll's `X-Registration-Secret` header.
    pub registration_secret: Option<Secret>,
    /// When the pending request was created (for "requested 12 min ago").
    pub registration_requested_at: Option<DateTime<Utc>>,
    /// The operator's reason, once rejected. Cleared by a reset.
    pub registration_rejected_reason: Option<String>,
    pub worker_id: Option<String>,
    pub auth_token: Option<Secret>,
    /// The studio answered 401 to this worker's token; nothing is retried until a reset.
    pub access_revoked: bool,

    pub pause: PauseSection,
    pub policy: PolicySection,
    pub engine: EngineSection,
    pub models: ModelsSection,
    pub ui: UiSection,
    pub images: ImagesSection,
    pub crash_reports: CrashReportsSection,

    /// What the file holds that this version does not know; written back by [`save`].
    #[serde(skip)]
    pub unknown: UnknownSettings,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            api_base_url: DEFAULT_API_BASE_URL.to_owned(),
            worker_name: default_worker_name(),
            install_id: None,
            registration_request_id: None,
            registration_secret: None,
            registration_requested_at: None,
            registration_rejected_reason: None,
            worker_id: None,
            auth_token: None,
            access_revoked: false,
            pause: PauseSection::default(),
            policy: PolicySection::default(),
            engine: EngineSection::default(),
            models: ModelsSection::default(),
            ui: UiSection::default(),
            images: ImagesSection::default(),
            crash_reports: CrashReportsSection::default(),
            unknown: UnknownSettings::default(),
        }
    }
}

/// Settings in the file that this version does not know: a misspelt name in a hand-edited
/// file, or a newer version's setting after going back to this one. They are not used, and
/// they are not lost: [`save`] writes them back as they were, after the known ones.
#[derive(Clone, Default, PartialEq)]
pub struct UnknownSettings(toml::Table);

impl UnknownSettings {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Their dotted names (`policy.temprature_limit_c`), never their values.
    pub fn names(&self) -> Vec<String> {
        fn collect(table: &toml::Table, prefix: &str, names: &mut Vec<String>) {
            for (key, value) in table {
                let name = format!("{prefix}{key}");
                match value {
                    toml::Value::Table(inner) if !inner.is_empty() => {
                        collect(inner, &format!("{name}."), names);
                    }
                    _ => names.push(name),
                }
            }
        }
        let mut names = Vec::new();
        collect(&self.0, "", &mut names);
        names
    }

    /// Keeps `raw`'s value at `keys` (a path of table keys).
    fn keep(&mut self, raw: &toml::Table, keys: &[String]) {
        let Some((last, parents)) = keys.split_last() else {
            return;
        };
        let mut from = raw;
        let mut into = &mut self.0;
        for key in parents {
            let Some(toml::Value::Table(inner)) = from.get(key) else {
                return;
            };
            from = inner;
            let entry = into
                .entry(key.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(next) = entry else {
                return;
            };
            into = next;
        }
        if let Some(value) = from.get(last) {
            into.insert(last.clone(), value.clone());
        }
    }

    /// Adds them to `known` (the settings this version writes) where it has no such key.
    fn write_into(&self, known: &mut toml::Table) {
        fn merge(from: &toml::Table, into: &mut toml::Table) {
            for (key, value) in from {
                match (into.get_mut(key), value) {
                    (Some(toml::Value::Table(known)), toml::Value::Table(unknown)) => {
                        merge(unknown, known);
                    }
                    (Some(_), _) => {}
                    (None, _) => {
                        into.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        merge(&self.0, known);
    }
}

/// Names only: a value may be a secret.
impl std::fmt::Debug for UnknownSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

/// The table keys that lead to an ignored setting; `None` inside a list (no list of tables
/// holds settings today).
fn table_keys(path: &serde_ignored::Path<'_>) -> Option<Vec<String>> {
    use serde_ignored::Path;
    match path {
        Path::Root => Some(Vec::new()),
        Path::Map { parent, key } => {
            let mut keys = table_keys(parent)?;
            keys.push(key.clone());
            Some(keys)
        }
        Path::Some { parent } | Path::NewtypeStruct { parent } => table_keys(parent),
        Path::Seq { .. } | Path::NewtypeVariant { .. } => None,
    }
}

impl Config {
    /// Forgets the studio's side of the registration (worker id, token, pending request,
    /// secret, rejection, revocation) and keeps everything else, the install id included.
    pub fn reset_registration(&mut self) {
        self.registration_request_id = None;
        self.registration_secret = None;
        self.registration_requested_at = None;
        self.registration_rejected_reason = None;
        self.worker_id = None;
        self.auth_token = None;
        self.access_revoked = false;
    }
}

/// `[pause]`: why this worker is not taking jobs. Persisted so that a person who paused and
/// rebooted is still paused.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PauseSection {
    /// The person paused (tray, window or CLI).
    pub by_user: bool,
    /// The studio's heartbeat answer said `pause: true`.
    pub by_studio: bool,
}

/// `[policy]`: when the worker steps aside by itself, so the PC's owner never notices it.
/// The defaults are what a gamer would pick: pause for games, heat and battery; run at any
/// hour, whether or not someone is at the PC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicySection {
    /// Pause while a game (or any program using the GPU heavily, or a full-screen window)
    /// runs.
    pub pause_for_games: bool,
    /// Take jobs again this long after the game ended (a loading screen or an alt-tab does
    /// not flap the worker).
    pub resume_after_game_s: u64,
    /// Another program using at least this share of the GPU counts as a game.
    pub gpu_busy_percent: u32,
    /// Programs that always pause the worker while they run (a game launcher, a video
    /// editor), by program name, case-insensitive (`obs64.exe`, `resolve`).
    pub always_pause_for: Vec<String>,
    /// Programs whose full screen or GPU use never pauses the worker (a video player).
    pub never_pause_for: Vec<String>,
    /// Run only after this PC has had no keyboard or mouse input for `away_after_min`.
    pub only_when_away: bool,
    pub away_after_min: u64,
    /// Run only in the hours of `schedule` (this PC's local time).
    pub use_schedule: bool,
    pub schedule: crate::vocab::schedule::WeeklyHours,
    /// Pause while the GPU is hotter than this (°C); resume 5 °C below. 0: no limit.
    pub temperature_limit_c: u32,
    /// Use at most this share of the GPU's time, resting between denoising steps (less heat
    /// and fan noise); 100: no rests.
    pub max_gpu_share_percent: u32,
    /// Pause while a laptop runs on battery.
    pub pause_on_battery: bool,
}

impl Default for PolicySection {
    fn default() -> Self {
        Self {
            pause_for_games: true,
            resume_after_game_s: 120,
            gpu_busy_percent: 25,
            always_pause_for: Vec::new(),
            never_pause_for: Vec::new(),
            only_when_away: false,
            away_after_min: 5,
            use_schedule: false,
            schedule: crate::vocab::schedule::WeeklyHours::default(),
            temperature_limit_c: 83,
            max_gpu_share_percent: 100,
            pause_on_battery: true,
        }
    }
}

/// `[engine]`: how the image engine uses this PC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineSection {
    /// Give the GPU memory back while paused (the next job then loads the model again).
    pub unload_when_paused: bool,
    /// `auto` (the GPU when one works, else the CPU), `cuda`, `metal` or `cpu`.
    pub device: DevicePreference,
    /// How much memory loaded models may take, in MB; 0: 80 % of the device's.
    pub memory_budget_mb: u64,
}

impl Default for EngineSection {
    fn default() -> Self {
        Self {
            unload_when_paused: true,
            device: DevicePreference::Auto,
            memory_budget_mb: 0,
        }
    }
}

/// `[models]`: which models this worker serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelsSection {
    /// Catalog models to download (when missing) and serve.
    pub enabled: Vec<String>,
    /// Model id → a diffusers-layout folder on this PC (`model_index.json`, `unet/`, …).
    pub local: BTreeMap<String, PathBuf>,
}

impl Default for ModelsSection {
    fn default() -> Self {
        Self {
            enabled: vec!["sd-turbo".to_owned()],
            local: BTreeMap::new(),
        }
    }
}

impl ModelsSection {
    /// Whether the catalog model `model_id` is ticked.
    pub fn enables(&self, model_id: &str) -> bool {
        self.enabled.iter().any(|enabled| enabled == model_id)
    }
}

/// `[images]`: what happens to finished images besides going to the studio.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImagesSection {
    /// Keep a copy of every finished image in this folder.
    pub save_copies_to: Option<PathBuf>,
}

/// `[crash_reports]`: whether panics are reported to minis.gg (see `crash`). Off until the
/// person turns it on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CrashReportsSection {
    pub send: bool,
}

/// `[ui]`: how the desktop window behaves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UiSection {
    /// Closing the window hides it to the tray; the worker goes on.
    pub close_to_tray: bool,
    /// The one-time "still running in the tray" hint has been shown.
    pub close_hint_shown: bool,
    /// Start at login was turned on by the first launch of the app (the installers' default;
    /// Settings turns it off, and it is never turned on again by itself).
    pub start_at_login_default_applied: bool,
}

impl Default for UiSection {
    fn default() -> Self {
        Self {
            close_to_tray: true,
            close_hint_shown: false,
            start_at_login_default_applied: false,
        }
    }
}

/// The host name, or a neutral name when the OS will not say.
pub fn default_worker_name() -> String {
    let host = gethostname::gethostname()
        .to_string_lossy()
        .trim()
        .to_owned();
    if host.is_empty() {
        "studio-worker".to_owned()
    } else {
        host
    }
}

/// Where the worker keeps its files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paths {
    pub config_file: PathBuf,
    /// Logs, the status snapshot and (later) the outbox.
    pub data_dir: PathBuf,
}

impl Paths {
    /// The OS's standard folders (`directories::ProjectDirs` for `gg.minis.studio-worker`), or,
    /// with `--config PATH`, that file and its own folder for everything else, so that one
    /// flag moves a whole installation (tests and portable set-ups rely on this).
    pub fn resolve(config_override: Option<&Path>) -> Result<Self, ConfigError> {
        if let Some(config_file) = config_override {
            let folder = match config_file.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
                _ => PathBuf::from("."),
            };
            return Ok(Self {
                config_file: config_file.to_path_buf(),
                data_dir: folder,
            });
        }
        let dirs = directories::ProjectDirs::from("gg", "minis", "studio-worker")
            .ok_or(ConfigError::NoHomeDirectory)?;
        Ok(Self {
            config_file: dirs.config_dir().join(CONFIG_FILE_NAME),
            data_dir: dirs.data_dir().to_path_buf(),
        })
    }

    pub fn log_dir(&self) -> PathBuf {
        self.data_dir.join("logs")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot find the home folder to keep settings in; pass --config PATH")]
    NoHomeDirectory,
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot save settings to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} could not be parsed and could not be moved aside either ({source}); fix or remove it"
    )]
    KeepBroken {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode settings: {0}")]
    Encode(#[from] toml::ser::Error),
    #[error("the settings were not saved: {0}")]
    Interrupted(String),
}

/// A config file that did not parse, moved aside so the person can look at it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokenConfig {
    pub kept_at: PathBuf,
    /// Where and why it failed, without quoting the file (it may hold a token).
    pub reason: String,
}

/// What [`load`] found.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// Set when the file existed but was unreadable as settings, and was moved aside.
    pub recovered_from: Option<BrokenConfig>,
}

/// Reads the config file. A missing file gives defaults; a file that does not parse is
/// renamed `config.toml.broken-<timestamp>` (never overwritten) and gives defaults.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    remove_interrupted_saves(path);
    let text = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Loaded {
                config: Config::default(),
                recovered_from: None,
            });
        }
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };

    match parse(&text) {
        Ok(config) => Ok(Loaded {
            config,
            recovered_from: None,
        }),
        Err(NotSettings(reason)) => {
            let kept_at = broken_path(path, Utc::now());
            std::fs::rename(path, &kept_at).map_err(|source| ConfigError::KeepBroken {
                path: path.to_path_buf(),
                source,
            })?;
            Ok(Loaded {
                config: Config::default(),
                recovered_from: Some(BrokenConfig { kept_at, reason }),
            })
        }
    }
}

/// Deletes temp files left by saves that were killed before their rename (they hold a config
/// that never became current). Only the file's own temp names are touched, and only those
/// whose writer (the pid in the name) is gone: another process may be mid-save right now.
fn remove_interrupted_saves(path: &Path) {
    let (Some(folder), Some(file_name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let folder = if folder.as_os_str().is_empty() {
        Path::new(".")
    } else {
        folder
    };
    let prefix = crate::files::temp_prefix(&file_name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(folder) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let writer = rest
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok());
        if writer.is_some_and(crate::platform::host::process_alive) {
            continue;
        }
        if let Err(err) = std::fs::remove_file(entry.path()) {
            tracing::debug!("cannot remove {}: {err}", entry.path().display());
        }
    }
}

/// A settings file that is not valid settings: it is kept aside (never overwritten) and the
/// worker starts from defaults. The reason says where and why, without quoting the file (it
/// may hold a token).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotSettings(pub String);

/// Parses the bytes of a config file.
pub fn parse(bytes: &[u8]) -> Result<Config, NotSettings> {
    let text = std::str::from_utf8(bytes)
        .map_err(|err| NotSettings(format!("not UTF-8 text (byte {})", err.valid_up_to())))?;
    let deserializer = toml::Deserializer::parse(text)
        .map_err(|err| NotSettings(describe_toml_error(text, &err)))?;
    let mut ignored = Vec::new();
    let mut config: Config = serde_ignored::deserialize(deserializer, |path| {
        if let Some(keys) = table_keys(&path) {
            ignored.push(keys);
        }
    })
    .map_err(|err| NotSettings(describe_toml_error(text, &err)))?;
    if !ignored.is_empty() {
        let raw: toml::Table =
            toml::from_str(text).map_err(|err| NotSettings(describe_toml_error(text, &err)))?;
        for keys in &ignored {
            config.unknown.keep(&raw, keys);
        }
    }
    if config.worker_name.trim().is_empty() {
        config.worker_name = default_worker_name();
    }
    Ok(config)
}

/// `line L, column C: <message>`. toml's own `Display` quotes the offending line, which may be
/// the one holding the auth token, so only the position and the message are kept.
fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim();
    match err.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message.to_owned(),
    }
}

fn broken_path(path: &Path, now: DateTime<Utc>) -> PathBuf {
    let name = path.file_name().map_or_else(
        || CONFIG_FILE_NAME.into(),
        |n| n.to_string_lossy().into_owned(),
    );
    let stamp = now.format("%Y%m%dT%H%M%SZ");
    let mut candidate = path.with_file_name(format!("{name}.broken-{stamp}"));
    // Two broken files in one second (a crash loop) must not overwrite each other.
    let mut counter = 1;
    while candidate.exists() {
        candidate = path.with_file_name(format!("{name}.broken-{stamp}-{counter}"));
        counter += 1;
    }
    candidate
}

/// The settings file's text for `config`: the settings this version knows, in their order,
/// then the ones it does not know, as they were read.
pub fn to_text(config: &Config) -> Result<String, ConfigError> {
    if config.unknown.is_empty() {
        return Ok(toml::to_string_pretty(config)?);
    }
    let mut table = toml::Table::try_from(config)?;
    config.unknown.write_into(&mut table);
    Ok(toml::to_string_pretty(&table)?)
}

/// Writes `config` to `path` atomically, readable by the owner only.
pub fn save(path: &Path, config: &Config) -> Result<(), ConfigError> {
    let text = to_text(config)?;
    crate::files::write_atomic(path, text.as_bytes()).map_err(|source| ConfigError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The in-memory config every task reads, published through a `watch` channel.
///
/// Readers get an `Arc<Config>` snapshot and never wait on I/O. Writers go one at a time:
/// [`SharedConfig::update`] saves the change to disk first and only then publishes it, so
/// memory never claims something the disk does not hold. A few changes must hold even when
/// the disk refuses them (a revocation must stop all traffic; a pause must pause):
/// [`SharedConfig::apply_even_unsaved`] publishes them anyway, says so
/// ([`SharedConfig::save_problems`]), and the next successful save writes them too.
///
/// Saving fsyncs: async tasks use the `apply…` methods, which save on the blocking pool.
#[derive(Clone)]
pub struct SharedConfig {
    path: Arc<PathBuf>,
    sender: Arc<watch::Sender<Arc<Config>>>,
    writer: Arc<Mutex<()>>,
    /// Why the last save failed (`None`: what memory holds is on disk).
    save_problem: Arc<watch::Sender<Option<String>>>,
}

impl SharedConfig {
    pub fn new(path: PathBuf, config: Config) -> Self {
        let (sender, _) = watch::channel(Arc::new(config));
        let (save_problem, _) = watch::channel(None);
        Self {
            path: Arc::new(path),
            sender: Arc::new(sender),
            writer: Arc::new(Mutex::new(())),
            save_problem: Arc::new(save_problem),
        }
    }

    /// The current config (cheap: an `Arc` clone).
    pub fn snapshot(&self) -> Arc<Config> {
        self.sender.borrow().clone()
    }

    /// Notified after every published change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Config>> {
        self.sender.subscribe()
    }

    /// Why the settings in memory are not on disk (the settings folder is not writable…),
    /// or `None`.
    pub fn save_problems(&self) -> watch::Receiver<Option<String>> {
        self.save_problem.subscribe()
    }

    /// Applies `change` to a copy, saves it, then publishes it. When nothing changed (and
    /// everything is saved) nothing is written. When the save fails the in-memory config is
    /// left as it was and the error is returned. Blocking (it fsyncs): from async code, use
    /// [`SharedConfig::apply`].
    pub fn update<R>(&self, change: impl FnOnce(&mut Config) -> R) -> Result<R, ConfigError> {
        let (result, saved) = self.write(change, false);
        saved.map(|()| result)
    }

    /// [`SharedConfig::update`], on the blocking pool.
    pub async fn apply<R: Send + 'static>(
        &self,
        change: impl FnOnce(&mut Config) -> R + Send + 'static,
    ) -> Result<R, ConfigError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.update(change))
            .await
            .unwrap_or_else(|err| Err(ConfigError::Interrupted(err.to_string())))
    }

    /// Applies and publishes `change` whether or not it can be saved (on the blocking pool);
    /// the outcome of the save is returned beside the change's own result.
    pub async fn apply_even_unsaved<R: Send + 'static>(
        &self,
        change: impl FnOnce(&mut Config) -> R + Send + 'static,
    ) -> (Option<R>, Result<(), ConfigError>) {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.write(change, true)).await {
            Ok((result, saved)) => (Some(result), saved),
            Err(err) => (None, Err(ConfigError::Interrupted(err.to_string()))),
        }
    }

    fn write<R>(
        &self,
        change: impl FnOnce(&mut Config) -> R,
        publish_unsaved: bool,
    ) -> (R, Result<(), ConfigError>) {
        // A poisoned lock only means another writer panicked; the data it guards is `()`.
        let _writing = self
            .writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = self.snapshot();
        let mut next = Config::clone(&current);
        let result = change(&mut next);
        let unsaved = self.save_problem.borrow().is_some();
        if next == *current && !unsaved {
            return (result, Ok(()));
        }
        let saved = save(&self.path, &next);
        match &saved {
            Ok(()) => {
                self.save_problem
                    .send_if_modified(|problem| problem.take().is_some());
            }
            Err(err) => {
                let problem = err.to_string();
                self.save_problem.send_if_modified(|current| {
                    let changed = current.as_deref() != Some(problem.as_str());
                    *current = Some(problem.clone());
                    changed
                });
            }
        }
        if (saved.is_ok() || publish_unsaved) && next != *current {
            self.sender.send_replace(Arc::new(next));
        }
        (result, saved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_path_never_reuses_a_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let now = Utc::now();
        let first = broken_path(&path, now);
        std::fs::write(&first, "x").unwrap();
        let second = broken_path(&path, now);
        assert_ne!(first, second);
        assert!(
            second
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("config.toml.broken-")
        );
    }

    #[test]
    fn toml_error_gives_position_without_quoting_the_file() {
        let text = "worker_name = \"ok\"\nauth_token = \"tok_SECRET_VALUE\nx = 1\n";
        let err = toml::from_str::<Config>(text).unwrap_err();
        let reason = describe_toml_error(text, &err);
        assert!(reason.starts_with("line 2"), "{reason}");
        assert!(!reason.contains("SECRET"), "{reason}");
    }

    #[test]
    fn settings_this_version_does_not_know_are_named_and_kept_through_a_save() {
        let text = "worker_name = \"rig\"\nfuture_setting = 3\n\n[policy]\n\
                    temprature_limit_c = 70\npause_for_games = false\n\n\
                    [studio]\napi_base_url = \"http://10.0.0.2\"\ntoken = \"tok_SECRET\"\n";
        let config = parse(text.as_bytes()).unwrap();
        assert_eq!(config.worker_name, "rig");
        assert!(!config.policy.pause_for_games);
        assert_eq!(
            config.policy.temperature_limit_c,
            PolicySection::default().temperature_limit_c,
            "a misspelt name sets nothing"
        );
        let names = [
            "future_setting",
            "policy.temprature_limit_c",
            "studio.api_base_url",
            "studio.token",
        ];
        let mut found = config.unknown.names();
        found.sort();
        assert_eq!(found, names);
        let debug = format!("{config:?}");
        assert!(
            debug.contains("studio.token") && !debug.contains("SECRET"),
            "{debug}"
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let mut changed = config.clone();
        changed.policy.pause_for_games = true;
        save(&path, &changed).unwrap();
        let written = std::fs::read_to_string(&path).unwrap();
        let again = parse(written.as_bytes()).unwrap();
        assert_eq!(again, changed, "{written}");
        let raw: toml::Table = toml::from_str(&written).unwrap();
        assert_eq!(raw["future_setting"].as_integer(), Some(3));
        assert_eq!(raw["policy"]["temprature_limit_c"].as_integer(), Some(70));
        assert_eq!(raw["studio"]["token"].as_str(), Some("tok_SECRET"));
        // The known settings first, in their own order.
        let position = |needle: &str| written.find(needle).unwrap();
        assert!(
            position("api_base_url") < position("worker_name"),
            "{written}"
        );
        assert!(
            position("worker_name") < position("future_setting"),
            "{written}"
        );
        assert!(position("[policy]") < position("[studio]"), "{written}");
    }

    #[test]
    fn settings_written_with_unknown_ones_beside_them_read_as_without() {
        // The file is written through a table when unknown settings come along; the known
        // ones must come out as the plain path writes them.
        let config = Config {
            install_id: Some("iid".into()),
            auth_token: Some(Secret::new("t")),
            ..Config::default()
        };
        let plain = toml::to_string_pretty(&config).unwrap();
        let through_table =
            toml::to_string_pretty(&toml::Table::try_from(&config).unwrap()).unwrap();
        assert_eq!(through_table, plain);
    }

    #[test]
    fn old_files_without_new_sections_load_with_defaults() {
        let config: Config = toml::from_str("worker_name = \"rig\"\n").unwrap();
        assert_eq!(config.worker_name, "rig");
        assert_eq!(config.api_base_url, DEFAULT_API_BASE_URL);
        assert_eq!(config.pause, PauseSection::default());
    }

    #[test]
    fn reset_keeps_install_id_and_settings() {
        let mut config = Config {
            install_id: Some("iid".into()),
            worker_name: "rig".into(),
            worker_id: Some("w_1".into()),
            auth_token: Some(Secret::new("t")),
            access_revoked: true,
            registration_rejected_reason: Some("no".into()),
            ..Config::default()
        };
        config.pause.by_user = true;
        config.reset_registration();
        assert_eq!(config.install_id.as_deref(), Some("iid"));
        assert_eq!(config.worker_name, "rig");
        assert!(config.pause.by_user);
        assert_eq!(config.worker_id, None);
        assert_eq!(config.auth_token, None);
        assert!(!config.access_revoked);
        assert_eq!(config.registration_rejected_reason, None);
    }
}

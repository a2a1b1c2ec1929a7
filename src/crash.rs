//! Crash reports: what happens when the program panics.
//!
//! Always: the panic is written, scrubbed, to stderr and the local log (so a person who does
//! not send reports can still attach a log file). Only when the person agreed in Settings
//! (`[crash_reports] send = true`) *and* this build has a collector, the same scrubbed event
//! also goes to it through `sentry`.
//!
//! The collector's address (a Sentry DSN) is baked in at build time from
//! `STUDIO_WORKER_SENTRY_DSN`; without it reporting is off. `STUDIO_WORKER_CRASH_DSN` at run
//! time points a build at another collector (for testing your own).
//!
//! Scrubbing replaces this person's secrets (the worker token, the registration secret,
//! `HF_TOKEN` or `HUGGING_FACE_HUB_TOKEN`, the control channel's token) with `[secret]` and their home folder with `~` in every string of the event,
//! and drops the host name. Native crashes (a segfault in a GPU driver) are not captured: only
//! panics.

use std::sync::Arc;

use crate::config::SharedConfig;

/// The collector this build reports to, if any.
const BUILT_IN_DSN: Option<&str> = option_env!("STUDIO_WORKER_SENTRY_DSN");
const DSN_OVERRIDE_VARIABLE: &str = "STUDIO_WORKER_CRASH_DSN";

/// Whether this build can send crash reports at all (Settings shows the choice only then).
pub fn collector_available() -> bool {
    collector_dsn().is_some()
}

fn collector_dsn() -> Option<String> {
    std::env::var(DSN_OVERRIDE_VARIABLE)
        .ok()
        .filter(|dsn| !dsn.trim().is_empty())
        .or_else(|| BUILT_IN_DSN.map(str::to_owned))
        .filter(|dsn| !dsn.trim().is_empty())
}

/// Removes what identifies the person from crash text.
pub struct Scrubber {
    /// Read at each scrub, so a token that arrives after start (an approval) is hidden too.
    secrets: Box<dyn Fn() -> Vec<String> + Send + Sync>,
    home: Option<String>,
}

impl Scrubber {
    /// Scrubs the secrets `config` holds when the crash happens, `HF_TOKEN`, and the home
    /// folder.
    pub fn for_config(config: SharedConfig) -> Self {
        let hub_tokens: Vec<String> = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"]
            .iter()
            .filter_map(|name| std::env::var(name).ok())
            .collect();
        let secrets = move || {
            let current = config.snapshot();
            [&current.auth_token, &current.registration_secret]
                .into_iter()
                .flatten()
                .map(|secret| secret.expose().to_owned())
                .chain(hub_tokens.iter().cloned())
                // The control channel's token, and whatever else the process holds.
                .chain(crate::secret::known())
                .collect()
        };
        Self::with_secrets(
            secrets,
            directories::BaseDirs::new().map(|dirs| dirs.home_dir().to_string_lossy().into_owned()),
        )
    }

    #[cfg(test)]
    fn new(secrets: Vec<String>, home: Option<String>) -> Self {
        Self::with_secrets(move || secrets.clone(), home)
    }

    fn with_secrets(
        secrets: impl Fn() -> Vec<String> + Send + Sync + 'static,
        home: Option<String>,
    ) -> Self {
        // "/" as a home folder (a service account) would turn every path into "~".
        let home = home.filter(|home| home.len() > 1);
        Self {
            secrets: Box::new(secrets),
            home,
        }
    }

    pub fn scrub(&self, text: &str) -> String {
        let mut text = text.to_owned();
        // Short strings would blank out ordinary words; real secrets are long.
        for secret in (self.secrets)().iter().filter(|secret| secret.len() >= 8) {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), "[secret]");
            }
        }
        if let Some(home) = &self.home
            && text.contains(home.as_str())
        {
            text = text.replace(home.as_str(), "~");
        }
        text
    }

    /// Scrubs every string in `event` (messages, exception values, frames' paths,
    /// breadcrumbs, extra data) and drops the host name and any user.
    pub fn scrub_event(
        &self,
        event: sentry::protocol::Event<'static>,
    ) -> Option<sentry::protocol::Event<'static>> {
        let mut value = serde_json::to_value(&event).ok()?;
        self.scrub_value(&mut value);
        let mut event: sentry::protocol::Event<'static> = serde_json::from_value(value).ok()?;
        event.server_name = None;
        event.user = None;
        Some(event)
    }

    fn scrub_value(&self, value: &mut serde_json::Value) {
        match value {
            serde_json::Value::String(text) => *text = self.scrub(text),
            serde_json::Value::Array(items) => {
                for item in items {
                    self.scrub_value(item);
                }
            }
            serde_json::Value::Object(fields) => {
                for field in fields.values_mut() {
                    self.scrub_value(field);
                }
            }
            _ => {}
        }
    }
}

/// Keeps the reporting client alive; pending reports are sent (for up to 2 s) when dropped.
#[must_use = "crash reports stop when the guard is dropped"]
pub struct CrashGuard {
    _client: Option<sentry::ClientInitGuard>,
}

/// Installs the panic hook; starts reporting when `config` says the person agreed and a
/// collector exists. Call after logging is set up, once, in the long-running commands.
pub fn init(config: &SharedConfig) -> CrashGuard {
    let scrubber = Arc::new(Scrubber::for_config(config.clone()));
    install_local_hook(Arc::clone(&scrubber));
    if !config.snapshot().crash_reports.send {
        return CrashGuard { _client: None };
    }
    let Some(dsn) = collector_dsn() else {
        tracing::debug!("crash reports: this build has no collector");
        return CrashGuard { _client: None };
    };
    let dsn = match dsn.parse::<sentry::types::Dsn>() {
        Ok(dsn) => dsn,
        Err(err) => {
            tracing::warn!("crash reports off: the collector address is not valid ({err})");
            return CrashGuard { _client: None };
        }
    };
    let before_send = Arc::clone(&scrubber);
    let mut options = sentry::ClientOptions::new();
    options.dsn = Some(dsn);
    options.release = sentry::release_name!();
    options.send_default_pii = false;
    options.server_name = None;
    options.before_send = Some(Arc::new(move |event| before_send.scrub_event(event)));
    let client = sentry::init(options);
    tracing::info!("crash reports are on (Settings turns them off)");
    CrashGuard {
        _client: Some(client),
    }
}

/// Replaces Rust's default panic message (which would print secrets as they are) with a
/// scrubbed one on stderr and in the log. sentry's hook, when reporting is on, runs first and
/// then calls this one.
fn install_local_hook(scrubber: Arc<Scrubber>) {
    std::panic::set_hook(Box::new(move |info| {
        let message = sentry::integrations::panic::message_from_panic_info(info);
        let location = info
            .location()
            .map(|location| format!(" at {}:{}", location.file(), location.line()))
            .unwrap_or_default();
        let thread = std::thread::current();
        let text = scrubber.scrub(&format!(
            "crashed: thread '{}' panicked{location}: {message}",
            thread.name().unwrap_or("unnamed")
        ));
        eprintln!("studio-worker {text}");
        tracing::error!("{text}");
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_the_home_folder_are_scrubbed_short_strings_are_not() {
        let scrubber = Scrubber::new(
            vec!["tok_abcdefghijklmnop".into(), "abc".into()],
            Some("/home/alice".into()),
        );
        assert_eq!(
            scrubber.scrub("token tok_abcdefghijklmnop in /home/alice/.config/x (abc)"),
            "token [secret] in ~/.config/x (abc)"
        );
        assert_eq!(
            Scrubber::new(vec![], Some("/".into())).scrub("/usr/bin"),
            "/usr/bin"
        );
    }

    #[test]
    fn a_token_that_arrives_after_start_is_scrubbed_too() {
        let folder = tempfile::tempdir().unwrap();
        let config = SharedConfig::new(
            folder.path().join("config.toml"),
            crate::config::Config::default(),
        );
        let scrubber = Scrubber::for_config(config.clone());
        config
            .update(|c| {
                c.auth_token = Some(crate::secret::Secret::new("tok_approvedlater0123456789"));
            })
            .unwrap();
        assert_eq!(
            scrubber.scrub("token tok_approvedlater0123456789"),
            "token [secret]"
        );
    }

    #[test]
    fn the_control_channels_token_is_scrubbed_too() {
        let folder = tempfile::tempdir().unwrap();
        let config = SharedConfig::new(
            folder.path().join("config.toml"),
            crate::config::Config::default(),
        );
        let scrubber = Scrubber::for_config(config);
        // What the control channel does with its token when it starts.
        let control_token = crate::secret::new_token().unwrap();
        crate::secret::keep_hidden(&control_token);
        assert_eq!(
            scrubber.scrub(&format!("control {}", control_token.expose())),
            "control [secret]"
        );
    }

    #[test]
    fn an_event_loses_secrets_paths_and_the_host_name() {
        let scrubber = Scrubber::new(
            vec!["tok_abcdefghijklmnop".into()],
            Some("/home/alice".into()),
        );
        let event = sentry::protocol::Event {
            message: Some("bad tok_abcdefghijklmnop".into()),
            server_name: Some("alices-pc".into()),
            exception: vec![sentry::protocol::Exception {
                ty: "panic".into(),
                value: Some("cannot open /home/alice/secret.txt".into()),
                ..Default::default()
            }]
            .into(),
            ..Default::default()
        };
        let scrubbed = scrubber.scrub_event(event).expect("kept");
        assert_eq!(scrubbed.message.as_deref(), Some("bad [secret]"));
        assert_eq!(scrubbed.server_name, None);
        assert_eq!(
            scrubbed.exception.values[0].value.as_deref(),
            Some("cannot open ~/secret.txt")
        );
    }
}

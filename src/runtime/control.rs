//! The local control channel: how `studio-worker pause`, `resume`, `quit`, `register --reset`
//! and `models add` in a terminal reach the worker that is already running. The running worker
//! stays the only writer of its settings: a change from the command line goes through its
//! command task like a click in the window, so no later save of the worker drops it.
//!
//! The running worker listens on a random port on 127.0.0.1 and writes `control.json` (port,
//! a random token, pid; owner-only, like the config) into its data folder. A client reads
//! that file, connects, and sends one line of JSON, `{"token": "…", "command": "pause"}`
//! (see [`ControlCommand`] for the others); the worker applies it and answers one line,
//! `{"ok": true}` or `{"ok": false, "error": "…"}`. The token keeps other local users (who
//! cannot read the file) from steering someone else's worker; it is compared in constant
//! time. At most [`MAX_CONNECTIONS`] clients are served at once, and a failing `accept` (out
//! of file descriptors) is retried with a growing pause, never in a tight loop. Loopback TCP
//! works the same on Windows, macOS and Linux, with no named pipe or socket-path rules.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite};
use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::Command;
use super::commands::AskedCommand;
use crate::secret::Secret;

pub const FILE_NAME: &str = "control.json";
/// A request is one line; a model folder's path is the longest thing in it.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;
/// Clients served at once; more connections are closed at once.
pub const MAX_CONNECTIONS: usize = 8;
/// How long a client has to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the answer may take: adding a model checks every tensor of its folder.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest pause between `accept` attempts that keep failing.
const ACCEPT_BACKOFF_CAP: Duration = Duration::from_secs(5);

/// What a terminal can ask of the running worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum ControlCommand {
    Pause,
    Resume,
    /// Bring the window forward (a second launch).
    Show,
    Quit,
    ResetRegistration,
    AddModel {
        #[serde(rename = "modelId")]
        model_id: String,
        folder: PathBuf,
    },
    RemoveModel {
        #[serde(rename = "modelId")]
        model_id: String,
    },
}

impl ControlCommand {
    fn into_command(self) -> Command {
        match self {
            Self::Pause => Command::Pause,
            Self::Resume => Command::Resume,
            Self::Show => Command::ShowWindow,
            Self::Quit => Command::Quit,
            Self::ResetRegistration => Command::ResetRegistration,
            Self::AddModel { model_id, folder } => Command::AddLocalModel { model_id, folder },
            Self::RemoveModel { model_id } => Command::RemoveModel { model_id },
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ControlFile {
    pub port: u16,
    pub token: Secret,
    pub pid: u32,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Applied, but not quite as asked (a pause that cannot be saved holds until a restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Where connections come from: a TCP listener, or a test's stand-in.
trait Incoming {
    type Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    fn next(&mut self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Incoming for TcpListener {
    type Stream = TcpStream;

    async fn next(&mut self) -> std::io::Result<TcpStream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// Listens until shutdown, then removes the control file.
pub(super) async fn serve(
    data_dir: PathBuf,
    requests: mpsc::Sender<AskedCommand>,
    shutdown: CancellationToken,
) {
    let path = data_dir.join(FILE_NAME);
    let listener = match TcpListener::bind(("127.0.0.1", 0)).await {
        Ok(listener) => listener,
        Err(err) => {
            tracing::warn!(
                "no local control channel (`studio-worker pause` will not reach this worker): {err}"
            );
            return;
        }
    };
    let token = match crate::secret::new_token() {
        Ok(token) => {
            crate::secret::keep_hidden(&token);
            token
        }
        Err(err) => {
            tracing::warn!("no local control channel: {err}");
            return;
        }
    };
    let file = ControlFile {
        port: listener
            .local_addr()
            .map(|addr| addr.port())
            .unwrap_or_default(),
        token: token.clone(),
        pid: std::process::id(),
    };
    let written = match serde_json::to_vec(&file) {
        Ok(bytes) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || crate::files::write_atomic(&path, &bytes))
                .await
                .unwrap_or_else(|err| Err(std::io::Error::other(err.to_string())))
        }
        Err(err) => Err(std::io::Error::other(err)),
    };
    if let Err(err) = written {
        tracing::warn!(
            "no local control channel: cannot write {}: {err}",
            path.display()
        );
        return;
    }

    accept_loop(listener, token, requests, shutdown).await;

    // Only our own file: a newer worker may have replaced it.
    if read_file(&data_dir).is_some_and(|current| current.pid == std::process::id()) {
        let _ = std::fs::remove_file(&path);
    }
}

async fn accept_loop(
    mut incoming: impl Incoming,
    token: Secret,
    requests: mpsc::Sender<AskedCommand>,
    shutdown: CancellationToken,
) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut failures = 0_u32;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = incoming.next() => accepted,
        };
        match accepted {
            Ok(stream) => {
                failures = 0;
                let Ok(permit) = connections.clone().try_acquire_owned() else {
                    tracing::debug!(
                        "control channel: {MAX_CONNECTIONS} clients already; one closed"
                    );
                    continue;
                };
                let (token, requests) = (token.clone(), requests.clone());
                tokio::spawn(async move {
                    answer(stream, token, requests).await;
                    drop(permit);
                });
            }
            Err(err) => {
                // Out of file descriptors and the like: `accept` fails again at once.
                failures = failures.saturating_add(1);
                let pause = Duration::from_millis(10)
                    .saturating_mul(2_u32.saturating_pow(failures.min(16)))
                    .min(ACCEPT_BACKOFF_CAP);
                if failures == 1 {
                    tracing::warn!("control channel: cannot accept a connection: {err}");
                } else {
                    tracing::debug!(failures, "control channel: still cannot accept: {err}");
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

async fn answer(
    stream: impl AsyncRead + AsyncWrite + Unpin,
    token: Secret,
    requests: mpsc::Sender<AskedCommand>,
) {
    let (reader, mut writer) = tokio::io::split(stream);
    let mut line = String::new();
    let read = tokio::time::timeout(
        REQUEST_TIMEOUT,
        BufReader::new(reader.take(MAX_REQUEST_BYTES)).read_line(&mut line),
    )
    .await;
    let reply = match read {
        Ok(Ok(_)) => match serde_json::from_str::<Value>(line.trim()) {
            Ok(request) => obey(request, &token, &requests).await,
            Err(_) => refusal("unreadable request".to_owned()),
        },
        _ => refusal("unreadable request".to_owned()),
    };
    if let Ok(mut bytes) = serde_json::to_vec(&reply) {
        bytes.push(b'\n');
        let _ = writer.write_all(&bytes).await;
    }
}

async fn obey(mut request: Value, token: &Secret, requests: &mpsc::Sender<AskedCommand>) -> Reply {
    let offered = request
        .as_object_mut()
        .and_then(|fields| fields.remove("token"))
        .and_then(|token| serde_json::from_value::<Secret>(token).ok());
    if offered.as_ref() != Some(token) {
        return refusal("wrong token".to_owned());
    }
    let command = match serde_json::from_value::<ControlCommand>(request) {
        Ok(command) => command.into_command(),
        Err(err) => return refusal(format!("not a command this worker knows: {err}")),
    };
    let (outcome_sender, outcome) = oneshot::channel();
    if requests.try_send((command, outcome_sender)).is_err() {
        return refusal("the worker is busy or stopping; try again".to_owned());
    }
    match tokio::time::timeout(ANSWER_TIMEOUT, outcome).await {
        Ok(Ok(Ok(note))) => Reply {
            ok: true,
            note,
            ..Reply::default()
        },
        Ok(Ok(Err(error))) => refusal(error),
        Ok(Err(_)) => refusal("the worker is stopping".to_owned()),
        Err(_) => refusal("the worker did not finish in time".to_owned()),
    }
}

fn refusal(error: String) -> Reply {
    Reply {
        ok: false,
        error: Some(error),
        note: None,
    }
}

pub fn read_file(data_dir: &Path) -> Option<ControlFile> {
    let bytes = std::fs::read(data_dir.join(FILE_NAME)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no worker is running")]
    NotRunning,
    #[error("the running worker did not answer: {0}")]
    NoAnswer(String),
    #[error("the running worker refused: {0}")]
    Refused(String),
}

/// Has the worker running for this data folder apply `command`, and waits for the outcome:
/// a note when it was applied but not quite as asked.
pub async fn send(
    data_dir: &Path,
    command: &ControlCommand,
) -> Result<Option<String>, ControlError> {
    let file = read_file(data_dir).ok_or(ControlError::NotRunning)?;
    if !crate::platform::host::process_alive(file.pid) {
        return Err(ControlError::NotRunning);
    }
    let mut request =
        serde_json::to_value(command).map_err(|err| ControlError::NoAnswer(err.to_string()))?;
    if let Some(fields) = request.as_object_mut() {
        fields.insert(
            "token".to_owned(),
            Value::String(file.token.expose().to_owned()),
        );
    }
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", file.port)).await?;
        let mut line = serde_json::to_vec(&request).map_err(std::io::Error::other)?;
        line.push(b'\n');
        stream.write_all(&line).await?;
        let mut answer = String::new();
        BufReader::new(stream.take(MAX_REQUEST_BYTES))
            .read_line(&mut answer)
            .await?;
        serde_json::from_str::<Reply>(answer.trim()).map_err(std::io::Error::other)
    };
    match tokio::time::timeout(ANSWER_TIMEOUT + REQUEST_TIMEOUT, exchange).await {
        Ok(Ok(Reply { ok: true, note, .. })) => Ok(note),
        Ok(Ok(Reply { error, .. })) => Err(ControlError::Refused(error.unwrap_or_default())),
        Ok(Err(err)) => Err(ControlError::NoAnswer(err.to_string())),
        Err(_) => Err(ControlError::NoAnswer("timed out".to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio::io::DuplexStream;

    use super::*;

    /// Connections a test hands over, then `accept` errors (counted) forever.
    struct Scripted {
        streams: Vec<DuplexStream>,
        errors: Arc<AtomicU32>,
    }

    impl Incoming for Scripted {
        type Stream = DuplexStream;

        async fn next(&mut self) -> std::io::Result<DuplexStream> {
            match self.streams.pop() {
                Some(stream) => Ok(stream),
                None => {
                    self.errors.fetch_add(1, Ordering::SeqCst);
                    Err(std::io::Error::other("too many open files"))
                }
            }
        }
    }

    fn token() -> Secret {
        Secret::new("7".repeat(64))
    }

    #[tokio::test(start_paused = true)]
    async fn failing_accepts_are_retried_with_a_growing_pause() {
        let errors = Arc::new(AtomicU32::new(0));
        let incoming = Scripted {
            streams: Vec::new(),
            errors: errors.clone(),
        };
        let (requests, _keep) = mpsc::channel(4);
        let shutdown = CancellationToken::new();
        let looping = tokio::spawn(accept_loop(incoming, token(), requests, shutdown.clone()));
        // A minute of (virtual) time: 10 ms, 20 ms, … up to 5 s apart.
        tokio::time::sleep(Duration::from_secs(60)).await;
        shutdown.cancel();
        looping.await.unwrap();
        let tries = errors.load(Ordering::SeqCst);
        assert!((5..=25).contains(&tries), "{tries} accepts in a minute");
    }

    #[tokio::test]
    async fn clients_past_the_limit_are_closed_and_the_rest_served() {
        let mut clients = Vec::new();
        let mut streams = Vec::new();
        for _ in 0..=MAX_CONNECTIONS {
            let (client, server) = tokio::io::duplex(1024);
            clients.push(client);
            streams.push(server);
        }
        streams.reverse(); // handed over in the clients' order
        let (requests, mut received) = mpsc::channel::<AskedCommand>(4);
        let shutdown = CancellationToken::new();
        tokio::spawn(accept_loop(
            Scripted {
                streams,
                errors: Arc::new(AtomicU32::new(0)),
            },
            token(),
            requests,
            shutdown.clone(),
        ));
        // The first MAX_CONNECTIONS clients hold their places by saying nothing yet; the
        // one after them is closed without an answer.
        let mut last = clients.pop().unwrap();
        let mut answer = String::new();
        BufReader::new(&mut last)
            .read_line(&mut answer)
            .await
            .unwrap();
        assert_eq!(answer, "", "closed without an answer");

        // A waiting client is served, with the command's outcome.
        tokio::spawn(async move {
            while let Some((command, outcome)) = received.recv().await {
                let result = match command {
                    Command::Pause => Ok(None),
                    _ => Err("cannot save".to_owned()),
                };
                let _ = outcome.send(result);
            }
        });
        for (client, (command, expected)) in clients.iter_mut().zip([
            ("pause", r#"{"ok":true}"#),
            ("resume", r#"{"ok":false,"error":"cannot save"}"#),
        ]) {
            let line = format!(
                "{{\"token\":\"{}\",\"command\":\"{command}\"}}\n",
                "7".repeat(64)
            );
            client.write_all(line.as_bytes()).await.unwrap();
            let mut answer = String::new();
            BufReader::new(client).read_line(&mut answer).await.unwrap();
            assert_eq!(answer.trim(), expected);
        }
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_wrong_token_or_an_unknown_command_is_refused_before_anything_runs() {
        let (requests, mut received) = mpsc::channel::<AskedCommand>(4);
        let ask = |request: Value| {
            let requests = requests.clone();
            async move { obey(request, &token(), &requests).await }
        };
        let wrong = ask(serde_json::json!({"token": "7".repeat(63), "command": "pause"})).await;
        assert_eq!(wrong.error.as_deref(), Some("wrong token"));
        let missing = ask(serde_json::json!({"command": "pause"})).await;
        assert_eq!(missing.error.as_deref(), Some("wrong token"));
        let unknown = ask(serde_json::json!({"token": "7".repeat(64), "command": "dance"})).await;
        assert!(
            unknown.error.unwrap().starts_with("not a command"),
            "unknown command"
        );
        assert!(received.try_recv().is_err(), "nothing reached the worker");
    }

    #[test]
    fn commands_have_a_stable_wire_form() {
        let add = ControlCommand::AddModel {
            model_id: "my-model".to_owned(),
            folder: PathBuf::from("/models/mine"),
        };
        assert_eq!(
            serde_json::to_value(&add).unwrap(),
            serde_json::json!({"command": "add-model", "modelId": "my-model", "folder": "/models/mine"})
        );
        assert_eq!(
            serde_json::to_value(ControlCommand::ResetRegistration).unwrap(),
            serde_json::json!({"command": "reset-registration"})
        );
    }
}

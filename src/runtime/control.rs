//! The local control channel: how `studio-worker pause` / `resume` in a terminal reach the
//! worker that is already running.
//!
//! The running worker listens on a random port on 127.0.0.1 and writes `control.json` (port,
//! a random token, pid; owner-only, like the config) into its data folder. A client reads
//! that file, connects, and sends one line of JSON `{"token": "…", "command": "pause"}`; the
//! worker answers one line `{"ok": true}` or `{"ok": false, "error": "…"}`. The token keeps
//! other local users (who cannot read the file) from pausing someone else's worker. Loopback
//! TCP works the same on Windows, macOS and Linux, with no named pipe or socket-path rules.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Command;
use crate::secret::Secret;

pub const FILE_NAME: &str = "control.json";
const MAX_REQUEST_BYTES: u64 = 4096;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ControlFile {
    pub port: u16,
    pub token: Secret,
    pub pid: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    token: Secret,
    command: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Listens until shutdown, then removes the control file.
pub(super) async fn serve(
    data_dir: PathBuf,
    commands: mpsc::Sender<Command>,
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
        Ok(token) => token,
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
    let written = serde_json::to_vec(&file)
        .map_err(std::io::Error::other)
        .and_then(|bytes| crate::files::write_atomic(&path, &bytes));
    if let Err(err) = written {
        tracing::warn!(
            "no local control channel: cannot write {}: {err}",
            path.display()
        );
        return;
    }

    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(answer(stream, token.clone(), commands.clone()));
                }
            }
        }
    }
    // Only our own file: a newer worker may have replaced it.
    if read_file(&data_dir).is_some_and(|current| current.pid == std::process::id()) {
        let _ = std::fs::remove_file(&path);
    }
}

async fn answer(stream: TcpStream, token: Secret, commands: mpsc::Sender<Command>) {
    let (reader, mut writer) = stream.into_split();
    let mut line = String::new();
    let read = tokio::time::timeout(
        CLIENT_TIMEOUT,
        BufReader::new(reader.take(MAX_REQUEST_BYTES)).read_line(&mut line),
    )
    .await;
    let reply = match (read, serde_json::from_str::<Request>(line.trim())) {
        (Ok(Ok(_)), Ok(request)) if request.token == token => match request.command.as_str() {
            "pause" => queue(&commands, Command::Pause),
            "resume" => queue(&commands, Command::Resume),
            "show" => queue(&commands, Command::ShowWindow),
            "quit" => queue(&commands, Command::Quit),
            other => refusal(format!("unknown command {other:?}")),
        },
        (Ok(Ok(_)), Ok(_)) => refusal("wrong token".to_owned()),
        _ => refusal("unreadable request".to_owned()),
    };
    if let Ok(mut bytes) = serde_json::to_vec(&reply) {
        bytes.push(b'\n');
        let _ = writer.write_all(&bytes).await;
    }
}

fn queue(commands: &mpsc::Sender<Command>, command: Command) -> Reply {
    match commands.try_send(command) {
        Ok(()) => Reply {
            ok: true,
            error: None,
        },
        Err(_) => refusal("the worker is busy or stopping; try again".to_owned()),
    }
}

fn refusal(error: String) -> Reply {
    Reply {
        ok: false,
        error: Some(error),
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

/// Sends `command` (`pause`, `resume`, `show` or `quit`) to the worker running for this data folder.
pub async fn send(data_dir: &Path, command: &str) -> Result<(), ControlError> {
    let file = read_file(data_dir).ok_or(ControlError::NotRunning)?;
    if !crate::platform::host::process_alive(file.pid) {
        return Err(ControlError::NotRunning);
    }
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", file.port)).await?;
        let mut request = serde_json::to_vec(&Request {
            token: file.token.clone(),
            command: command.to_owned(),
        })
        .map_err(std::io::Error::other)?;
        request.push(b'\n');
        stream.write_all(&request).await?;
        let mut line = String::new();
        BufReader::new(stream.take(MAX_REQUEST_BYTES))
            .read_line(&mut line)
            .await?;
        serde_json::from_str::<Reply>(line.trim()).map_err(std::io::Error::other)
    };
    match tokio::time::timeout(CLIENT_TIMEOUT, exchange).await {
        Ok(Ok(Reply { ok: true, .. })) => Ok(()),
        Ok(Ok(Reply { error, .. })) => Err(ControlError::Refused(error.unwrap_or_default())),
        Ok(Err(err)) => Err(ControlError::NoAnswer(err.to_string())),
        Err(_) => Err(ControlError::NoAnswer("timed out".to_owned())),
    }
}

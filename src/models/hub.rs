//! The Hugging Face hub over HTTP (reqwest): a repository's file list with sizes and
//! hashes, and resumable downloads of single files.
//!
//! Ours rather than the hf-hub crate's because a download here must resume from a partial
//! blob after a crash (HTTP `Range`), report bytes to shared state, stop on a cancel token,
//! and be verified against the hub's SHA-256 before anything uses it.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::AsyncWriteExt as _;
use tokio_util::sync::CancellationToken;

use crate::http_body;
use crate::secret::Secret;

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "{repo} needs a Hugging Face token: it is gated or private (accept its license on the \
         model's page, then set HF_TOKEN)"
    )]
    Unauthorized { repo: String },
    #[error("{what} was not found on the hub")]
    NotFound { what: String },
    #[error("the hub could not be reached: {0}")]
    Network(String),
    #[error("the hub answered {status} for {what}")]
    Status { status: u16, what: String },
    #[error("the hub's answer for {what} was not understood: {reason}")]
    Garbled { what: String, reason: String },
    #[error("download stopped")]
    Cancelled,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl HubError {
    /// Worth trying again later (network trouble, a hub-side error).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Network(_))
            || matches!(self, Self::Status { status, .. } if *status >= 500 || *status == 429)
    }
}

/// One file of a repository at a commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoFile {
    pub path: String,
    pub size: u64,
    /// Large (LFS) files: their SHA-256, which is also their blob name in the cache.
    pub sha256: Option<String>,
    /// Git's blob id (SHA-1 of `blob <size>\0<content>`): the blob name of small files.
    pub blob_id: String,
}

impl RepoFile {
    /// The file's name in the cache's `blobs/` folder (what `huggingface_hub` uses).
    pub fn blob_name(&self) -> &str {
        self.sha256.as_deref().unwrap_or(&self.blob_id)
    }
}

#[derive(Clone, Debug)]
pub struct RepoInfo {
    pub commit: String,
    pub files: Vec<RepoFile>,
}

#[derive(Deserialize)]
struct ApiRepo {
    sha: String,
    siblings: Vec<ApiSibling>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiSibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    blob_id: Option<String>,
    #[serde(default)]
    lfs: Option<ApiLfs>,
}

#[derive(Deserialize)]
struct ApiLfs {
    sha256: String,
    size: u64,
}

#[derive(Clone)]
pub struct HubClient {
    http: reqwest::Client,
    endpoint: String,
    token: Option<Secret>,
}

impl HubClient {
    /// `HF_ENDPOINT` (else the public hub) and `HF_TOKEN` from the environment.
    pub fn from_env() -> Result<Self, HubError> {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|endpoint| !endpoint.is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        let token = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"]
            .iter()
            .find_map(|name| std::env::var(name).ok().filter(|token| !token.is_empty()))
            .map(Secret::new);
        if let Some(token) = &token {
            crate::secret::keep_hidden(token);
        }
        Self::new(&endpoint, token)
    }

    pub fn new(endpoint: &str, token: Option<Secret>) -> Result<Self, HubError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("studio-worker/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(15))
            // A stalled transfer (no byte for this long) fails instead of hanging forever.
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|error| HubError::Network(error.to_string()))?;
        Ok(Self {
            http,
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            token,
        })
    }

    fn get(&self, url: &str) -> reqwest::RequestBuilder {
        let request = self.http.get(url);
        match &self.token {
            Some(token) => request.bearer_auth(token.expose()),
            None => request,
        }
    }

    fn check(response: &reqwest::Response, repo: &str, what: &str) -> Result<(), HubError> {
        match response.status().as_u16() {
            200..=299 => Ok(()),
            401 | 403 => Err(HubError::Unauthorized {
                repo: repo.to_owned(),
            }),
            404 => Err(HubError::NotFound {
                what: what.to_owned(),
            }),
            status => Err(HubError::Status {
                status,
                what: what.to_owned(),
            }),
        }
    }

    /// The repository's files at `revision`, with sizes and hashes.
    pub async fn repo_info(&self, repo: &str, revision: &str) -> Result<RepoInfo, HubError> {
        let url = format!(
            "{}/api/models/{repo}/revision/{revision}?blobs=true",
            self.endpoint
        );
        let what = format!("{repo}@{revision}");
        let response = self
            .get(&url)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(network_error)?;
        Self::check(&response, repo, &what)?;
        let garbled = |reason: String| HubError::Garbled {
            what: what.clone(),
            reason,
        };
        let bytes = match http_body::read_capped(response, http_body::MAX_JSON_BYTES).await {
            Ok(bytes) => bytes,
            Err(http_body::BodyError::Transport(error)) => return Err(network_error(error)),
            Err(error @ http_body::BodyError::TooLarge { .. }) => {
                return Err(garbled(error.to_string()));
            }
        };
        let body: ApiRepo =
            serde_json::from_slice(&bytes).map_err(|error| garbled(error.to_string()))?;
        // The commit names a folder in the cache: exactly a git hash, nothing else.
        if !is_hex(&body.sha, 40) {
            return Err(garbled("its commit is not a git hash".to_owned()));
        }
        if is_hex(revision, 40) && !body.sha.eq_ignore_ascii_case(revision) {
            return Err(garbled(format!(
                "it answered for commit {} instead of {revision}",
                body.sha
            )));
        }
        let files = body
            .siblings
            .into_iter()
            .map(|sibling| read_sibling(sibling).map_err(garbled))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RepoInfo {
            commit: body.sha.to_ascii_lowercase(),
            files,
        })
    }

    /// Appends the rest of `file` to `partial` (resuming from its current length), calling
    /// `on_progress` with how many of the file's bytes are on disk after each chunk. Returns
    /// when the transfer ends or fails; the partial file is kept either way, for a resume.
    pub async fn download(
        &self,
        repo: &str,
        commit: &str,
        file: &RepoFile,
        partial: &Path,
        on_progress: &mut (dyn FnMut(u64) + Send),
        cancel: &CancellationToken,
    ) -> Result<(), HubError> {
        let mut have = match tokio::fs::metadata(partial).await {
            Ok(metadata) => metadata.len(),
            Err(_) => 0,
        };
        if have > file.size {
            tokio::fs::remove_file(partial).await?;
            have = 0;
        }
        if have == file.size {
            return Ok(());
        }
        let url = format!("{}/{repo}/resolve/{commit}/{}", self.endpoint, file.path);
        let mut request = self.get(&url);
        if have > 0 {
            request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let mut response = tokio::select! {
            () = cancel.cancelled() => return Err(HubError::Cancelled),
            sent = request.send() => sent.map_err(network_error)?,
        };
        Self::check(&response, repo, &file.path)?;
        let resumed = response.status() == reqwest::StatusCode::PARTIAL_CONTENT;
        let mut output = tokio::fs::OpenOptions::new()
            .create(true)
            .append(resumed)
            .write(true)
            .truncate(!resumed)
            .open(partial)
            .await?;
        // A server that ignores the range sends everything again.
        let mut on_disk = if resumed { have } else { 0 };
        on_progress(on_disk);
        loop {
            let chunk = tokio::select! {
                () = cancel.cancelled() => {
                    output.flush().await?;
                    return Err(HubError::Cancelled);
                }
                chunk = response.chunk() => chunk,
            };
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(error) => {
                    // Keep what arrived: the next try resumes after it.
                    output.flush().await?;
                    return Err(network_error(error));
                }
            };
            let Some(chunk) = chunk else { break };
            // Never more than the hub declared: a server that keeps sending cannot fill the
            // disk. The surplus is dropped and the file (whole by size) fails its hash.
            let room = usize::try_from(file.size.saturating_sub(on_disk)).unwrap_or(usize::MAX);
            let kept = &chunk[..chunk.len().min(room)];
            output.write_all(kept).await?;
            on_disk += kept.len() as u64;
            on_progress(on_disk);
            if kept.len() < chunk.len() {
                output.flush().await?;
                output.sync_all().await?;
                return Err(HubError::Network(format!(
                    "the hub sent more of {} than the {} it declared",
                    file.path,
                    crate::human::bytes(file.size)
                )));
            }
        }
        output.flush().await?;
        output.sync_all().await?;
        Ok(())
    }
}

/// `text` is exactly `length` hex digits.
fn is_hex(text: &str, length: usize) -> bool {
    text.len() == length && text.chars().all(|c| c.is_ascii_hexdigit())
}

/// A file of the listing, checked before any of it becomes a path: blob names are hashes
/// (hex of the right length) and the file's path stays inside the snapshot folder.
fn read_sibling(sibling: ApiSibling) -> Result<RepoFile, String> {
    let path = sibling.rfilename;
    check_repo_path(&path)?;
    let (size, sha256) = match sibling.lfs {
        Some(lfs) => (Some(lfs.size), Some(lfs.sha256)),
        None => (sibling.size, None),
    };
    let Some(blob_id) = sibling.blob_id else {
        return Err(format!("{path} has no blob id"));
    };
    let Some(size) = size else {
        return Err(format!("{path} has no size"));
    };
    if !is_hex(&blob_id, 40) || !sha256.as_deref().is_none_or(|sha256| is_hex(sha256, 64)) {
        return Err(format!("{path} has a malformed hash"));
    }
    Ok(RepoFile {
        path,
        size,
        sha256: sha256.map(|sha256| sha256.to_ascii_lowercase()),
        blob_id: blob_id.to_ascii_lowercase(),
    })
}

/// A repository path the cache may create: relative, `/`-separated, no empty, `.` or `..`
/// part, no backslash, drive colon or control character.
fn check_repo_path(path: &str) -> Result<(), String> {
    let shown = crate::human::one_line(path, 80);
    if path.is_empty() || path.len() > 1024 {
        return Err(format!("a file name is empty or too long ({shown:?})"));
    }
    if path.contains(['\\', ':']) || path.chars().any(char::is_control) {
        return Err(format!(
            "the file name {shown:?} has a character paths cannot hold"
        ));
    }
    if path
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(format!("the file name {shown:?} leaves its folder"));
    }
    Ok(())
}

/// A transport failure in words a person can act on.
fn network_error(error: reqwest::Error) -> HubError {
    HubError::Network(if error.is_timeout() {
        "it did not answer in time".to_owned()
    } else if error.is_connect() {
        "cannot connect (is this PC online?)".to_owned()
    } else if error.is_body() || error.is_decode() {
        "the transfer broke off".to_owned()
    } else {
        // Without the URL: it may carry a token in a query on some mirrors.
        let error = error.without_url();
        let mut text = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            text = format!("{text}: {cause}");
            source = cause.source();
        }
        text
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sibling(path: &str, blob_id: &str, sha256: Option<&str>) -> ApiSibling {
        ApiSibling {
            rfilename: path.to_owned(),
            size: Some(10),
            blob_id: Some(blob_id.to_owned()),
            lfs: sha256.map(|sha256| ApiLfs {
                sha256: sha256.to_owned(),
                size: 10,
            }),
        }
    }

    #[test]
    fn paths_that_leave_the_snapshot_folder_are_refused() {
        for bad in [
            "",
            "../../.bashrc",
            "unet/../../x",
            "/etc/passwd",
            "unet//x",
            "./x",
            "unet\\..\\x",
            "C:/Windows/x",
            "a\u{0}b",
            "line\nbreak",
            &"a/".repeat(600),
        ] {
            assert!(check_repo_path(bad).is_err(), "{bad:?}");
        }
        for good in [
            "model_index.json",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            ".gitattributes",
            "text_encoder_2/model..safetensors",
        ] {
            assert!(check_repo_path(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn blob_names_must_be_hashes_of_the_right_length() {
        let sha1 = "a".repeat(40);
        let sha256 = "B".repeat(64);
        let file = read_sibling(sibling("unet/w.safetensors", &sha1, Some(&sha256))).unwrap();
        assert_eq!(file.blob_name(), "b".repeat(64), "lowercased");
        assert!(read_sibling(sibling("x", &"a".repeat(39), None)).is_err());
        assert!(read_sibling(sibling("x", &"a".repeat(64), None)).is_err());
        assert!(read_sibling(sibling("x", &sha1, Some(&"a".repeat(40)))).is_err());
        assert!(
            read_sibling(sibling(
                "x",
                "../../../../etc/passwd00000000000000000",
                None
            ))
            .is_err()
        );
        let mut sizeless = sibling("x", &sha1, None);
        sizeless.size = None;
        assert!(read_sibling(sizeless).is_err());
    }
}

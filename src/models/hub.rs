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
        let body: ApiRepo = response.json().await.map_err(|error| HubError::Garbled {
            what: what.clone(),
            reason: error.without_url().to_string(),
        })?;
        let files = body
            .siblings
            .into_iter()
            .map(|sibling| {
                let (size, sha256) = match sibling.lfs {
                    Some(lfs) => (Some(lfs.size), Some(lfs.sha256)),
                    None => (sibling.size, None),
                };
                // Blob names become file names in the cache: hex only, so no answer can
                // reach outside it.
                let hex = |text: &str| {
                    (40..=64).contains(&text.len()) && text.chars().all(|c| c.is_ascii_hexdigit())
                };
                if !sibling.blob_id.as_deref().is_none_or(hex) || !sha256.as_deref().is_none_or(hex)
                {
                    return Err(HubError::Garbled {
                        what: what.clone(),
                        reason: format!("{} has a malformed hash", sibling.rfilename),
                    });
                }
                match (size, sibling.blob_id) {
                    (Some(size), Some(blob_id)) => Ok(RepoFile {
                        path: sibling.rfilename,
                        size,
                        sha256,
                        blob_id,
                    }),
                    _ => Err(HubError::Garbled {
                        what: what.clone(),
                        reason: format!("{} has no size or blob id", sibling.rfilename),
                    }),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RepoInfo {
            commit: body.sha,
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
            output.write_all(&chunk).await?;
            on_disk += chunk.len() as u64;
            on_progress(on_disk);
        }
        output.flush().await?;
        output.sync_all().await?;
        Ok(())
    }
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

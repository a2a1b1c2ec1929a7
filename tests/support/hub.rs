//! An in-process Hugging Face hub: the two endpoints the model manager uses (a repository's
//! file list with sizes and hashes, and file downloads with `Range`), serving real files,
//! with the faults downloads meet: cut and stalled transfers, corrupt bytes, gated
//! repositories.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt as _;
use serde_json::json;
use sha1::Digest as _;

/// Files above this size are served as LFS files (with a SHA-256), as on the real hub.
const LFS_THRESHOLD: usize = 1024;

/// A published file, hashed once (a test may publish a gigabyte).
#[derive(Debug)]
struct HubFile {
    content: Vec<u8>,
    sha256: String,
    blob_id: String,
}

impl HubFile {
    fn new(content: Vec<u8>) -> Arc<Self> {
        Arc::new(Self {
            sha256: hex::encode(sha2::Sha256::digest(&content)),
            blob_id: git_blob_id(&content),
            content,
        })
    }
}

#[derive(Clone, Debug)]
struct Repo {
    commit: String,
    files: BTreeMap<String, Arc<HubFile>>,
    /// The token a gated repository wants.
    token: Option<String>,
}

/// One download request as the hub saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Download {
    pub path: String,
    pub range_start: Option<u64>,
    pub bytes_sent: u64,
}

#[derive(Default)]
struct HubState {
    repos: BTreeMap<String, Repo>,
    /// Path → bytes after which the next transfer of that file is cut.
    cut_after: BTreeMap<String, u64>,
    /// Path → bytes after which the next transfer of that file sends nothing more, and
    /// keeps the connection open (a transfer under way, for as long as a test needs).
    stall_after: BTreeMap<String, u64>,
    /// Path → how many more transfers of it arrive corrupt.
    corrupt: BTreeMap<String, u32>,
    downloads: Vec<Download>,
    listings: u32,
    /// Answers every listing with this body instead of the real one.
    listing_override: Option<serde_json::Value>,
    /// Path → bytes sent beyond the file's end on every transfer of it.
    oversend: BTreeMap<String, usize>,
}

#[derive(Clone)]
pub struct TestHub {
    addr: SocketAddr,
    state: Arc<Mutex<HubState>>,
}

impl TestHub {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0").await
    }

    pub async fn start_on(addr: &str) -> Self {
        let state = Arc::new(Mutex::new(HubState::default()));
        let app = Router::new()
            .route(
                "/api/models/{owner}/{name}/revision/{revision}",
                get(listing),
            )
            .route("/{owner}/{name}/resolve/{revision}/{*path}", get(resolve))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Publishes every file under `folder` as `repo` at a fixed commit (also its `main`).
    pub fn publish_folder(&self, repo: &str, folder: &Path) {
        self.publish_folder_at(repo, folder, "0123456789abcdef0123456789abcdef01234567");
    }

    /// Publishes every file under `folder` as `repo` at `commit` (also its `main`); other
    /// commits are not found.
    pub fn publish_folder_at(&self, repo: &str, folder: &Path, commit: &str) {
        let mut files = BTreeMap::new();
        let mut pending = vec![folder.to_owned()];
        while let Some(dir) = pending.pop() {
            for item in std::fs::read_dir(&dir).expect("fixture folder") {
                let path = item.expect("entry").path();
                if path.is_dir() {
                    pending.push(path);
                } else {
                    let relative = path.strip_prefix(folder).expect("inside");
                    let name = relative.to_string_lossy().replace('\\', "/");
                    files.insert(
                        name,
                        HubFile::new(std::fs::read(&path).expect("fixture file")),
                    );
                }
            }
        }
        // Extra files a real repository has and the worker must not fetch.
        files.insert(
            "README.md".to_owned(),
            HubFile::new(b"# a model\n".to_vec()),
        );
        files.insert(
            "unet/diffusion_pytorch_model.bin".to_owned(),
            HubFile::new(vec![7; 4096]),
        );
        self.state.lock().unwrap().repos.insert(
            repo.to_owned(),
            Repo {
                commit: commit.to_owned(),
                files,
                token: None,
            },
        );
    }

    /// `Some(token)`: the repository answers 401 to requests without this token.
    pub fn gate(&self, repo: &str, token: Option<&str>) {
        let mut state = self.state.lock().unwrap();
        state.repos.get_mut(repo).expect("repo").token = token.map(str::to_owned);
    }

    pub fn cut_next_transfer(&self, path: &str, after_bytes: u64) {
        self.state
            .lock()
            .unwrap()
            .cut_after
            .insert(path.to_owned(), after_bytes);
    }

    /// The next transfer of `path` sends `after_bytes`, then nothing, without closing.
    pub fn stall_next_transfer(&self, path: &str, after_bytes: u64) {
        self.state
            .lock()
            .unwrap()
            .stall_after
            .insert(path.to_owned(), after_bytes);
    }

    pub fn corrupt_next_transfers(&self, path: &str, count: u32) {
        self.state
            .lock()
            .unwrap()
            .corrupt
            .insert(path.to_owned(), count);
    }

    pub fn downloads(&self) -> Vec<Download> {
        self.state.lock().unwrap().downloads.clone()
    }

    pub fn listings(&self) -> u32 {
        self.state.lock().unwrap().listings
    }

    pub fn file_size(&self, repo: &str, path: &str) -> u64 {
        self.state.lock().unwrap().repos[repo].files[path]
            .content
            .len() as u64
    }

    /// The SHA-256 the listing gives for the file (the name of its blob in the cache).
    pub fn file_sha256(&self, repo: &str, path: &str) -> String {
        self.state.lock().unwrap().repos[repo].files[path]
            .sha256
            .clone()
    }

    /// `Some(body)`: every listing answers this instead (a broken or hostile hub).
    pub fn override_listing(&self, body: Option<serde_json::Value>) {
        self.state.lock().unwrap().listing_override = body;
    }

    /// Every transfer of `path` goes on `extra` bytes past the size the listing declared.
    pub fn oversend(&self, path: &str, extra: usize) {
        self.state
            .lock()
            .unwrap()
            .oversend
            .insert(path.to_owned(), extra);
    }

    /// Publishes `content` as `path` in `repo` (replacing what was there).
    pub fn put_file(&self, repo: &str, path: &str, content: Vec<u8>) {
        let file = HubFile::new(content);
        self.state
            .lock()
            .unwrap()
            .repos
            .get_mut(repo)
            .expect("repo")
            .files
            .insert(path.to_owned(), file);
    }
}

fn authorised(repo: &Repo, headers: &HeaderMap) -> bool {
    match &repo.token {
        None => true,
        Some(token) => headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value == format!("Bearer {token}")),
    }
}

async fn listing(
    State(state): State<Arc<Mutex<HubState>>>,
    UrlPath((owner, name, revision)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let mut state = state.lock().unwrap();
    state.listings += 1;
    if let Some(body) = &state.listing_override {
        return axum::Json(body.clone()).into_response();
    }
    let Some(repo) = state.repos.get(&format!("{owner}/{name}")) else {
        return (StatusCode::NOT_FOUND, "Repository not found").into_response();
    };
    if !authorised(repo, &headers) {
        return (StatusCode::UNAUTHORIZED, "gated").into_response();
    }
    if revision != "main" && revision != repo.commit {
        return (StatusCode::NOT_FOUND, "Revision not found").into_response();
    }
    let siblings: Vec<_> = repo
        .files
        .iter()
        .map(|(path, file)| {
            let mut sibling = json!({
                "rfilename": path,
                "size": file.content.len(),
                "blobId": file.blob_id,
            });
            if file.content.len() > LFS_THRESHOLD {
                sibling["lfs"] = json!({
                    "sha256": file.sha256,
                    "size": file.content.len(),
                    "pointerSize": 134,
                });
            }
            sibling
        })
        .collect();
    axum::Json(json!({ "id": format!("{owner}/{name}"), "sha": repo.commit, "siblings": siblings }))
        .into_response()
}

async fn resolve(
    State(state): State<Arc<Mutex<HubState>>>,
    UrlPath((owner, name, _revision, path)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let mut state = state.lock().unwrap();
    let Some(repo) = state.repos.get(&format!("{owner}/{name}")).cloned() else {
        return (StatusCode::NOT_FOUND, "Repository not found").into_response();
    };
    if !authorised(&repo, &headers) {
        return (StatusCode::UNAUTHORIZED, "gated").into_response();
    }
    let Some(file) = repo.files.get(&path) else {
        return (StatusCode::NOT_FOUND, "Entry not found").into_response();
    };
    let mut content = file.content.clone();
    if let Some(left) = state.corrupt.get_mut(&path)
        && *left > 0
    {
        *left -= 1;
        let middle = content.len() / 2;
        content[middle] ^= 0xff;
    }
    let range_start = headers
        .get(header::RANGE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("bytes="))
        .and_then(|value| value.strip_suffix('-'))
        .and_then(|value| value.parse::<u64>().ok());
    let extra = state.oversend.get(&path).copied().unwrap_or(0);
    content.extend(std::iter::repeat_n(0x5a, extra));
    let start = range_start.unwrap_or(0).min(content.len() as u64) as usize;
    let body = content[start..].to_vec();
    let cut = state.cut_after.remove(&path);
    let stall = state.stall_after.remove(&path);
    let sent = cut
        .or(stall)
        .map_or(body.len() as u64, |cut| cut.min(body.len() as u64));
    state.downloads.push(Download {
        path: path.clone(),
        range_start,
        bytes_sent: sent,
    });
    let total = content.len();
    let status = if range_start.is_some() {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let length = body.len();
    let stream_body = match (cut, stall) {
        (_, Some(stall)) => {
            // The first bytes, then silence on an open connection.
            let head = Bytes::from(body[..(stall as usize).min(length)].to_vec());
            let stream =
                futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(head) })
                    .chain(futures_util::stream::pending());
            Body::from_stream(stream)
        }
        (Some(cut), None) => {
            // Send the first bytes, let them reach the client, then break the connection.
            let head = Bytes::from(body[..(cut as usize).min(length)].to_vec());
            let stream = futures_util::stream::unfold(Some(head), |state| async move {
                match state {
                    Some(head) => Some((Ok::<Bytes, std::io::Error>(head), None)),
                    None => {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        Some((
                            Err(std::io::Error::new(
                                std::io::ErrorKind::ConnectionReset,
                                "cut",
                            )),
                            None,
                        ))
                    }
                }
            });
            Body::from_stream(stream)
        }
        (None, None) => Body::from(body),
    };
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, length)
        .header("x-repo-commit", &repo.commit);
    if range_start.is_some() {
        response = response.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{total}", total.saturating_sub(1)),
        );
    }
    response.body(stream_body).expect("response")
}

fn git_blob_id(content: &[u8]) -> String {
    let mut hasher = sha1::Sha1::new();
    hasher.update(format!("blob {}\0", content.len()).as_bytes());
    hasher.update(content);
    hex::encode(hasher.finalize())
}

//! An in-process studio that speaks `studio-api.md` over real sockets on 127.0.0.1, for the
//! integration tests and for trying the worker out (`cargo run --example dev_studio`).
//!
//! It keeps real state (registration requests, workers, tokens), decides like an operator
//! (by hand, or after N polls), can be told to misbehave per route (status codes, garbage
//! bodies, hangs, lost responses, `Retry-After`, a slow uplink), and records every request it
//! gets.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// Which endpoint a request went to; faults and assertions pick requests by route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Register,
    Poll,
    Heartbeat,
    Claim,
    Progress,
    Result,
    Fail,
    Other,
}

impl Route {
    fn of(path: &str) -> Self {
        if path.ends_with("/workers/register-request") {
            Self::Register
        } else if path.contains("/workers/register-requests/") {
            Self::Poll
        } else if path.ends_with("/heartbeat") {
            Self::Heartbeat
        } else if path.ends_with("/jobs/claim") {
            Self::Claim
        } else if path.ends_with("/progress") {
            Self::Progress
        } else if path.ends_with("/result") {
            Self::Result
        } else if path.ends_with("/fail") {
            Self::Fail
        } else {
            Self::Other
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Leased {
        worker_id: String,
    },
    Done {
        worker_id: String,
    },
    Failed {
        code: String,
    },
    /// The submitter cancelled it (progress answers `cancel: true`; results get 410).
    Cancelled,
}

/// A job as the studio keeps it.
#[derive(Clone, Debug)]
pub struct StudioJob {
    pub job_id: String,
    pub body: Value,
    pub state: JobState,
    /// Every progress body received.
    pub progress: Vec<Value>,
    /// Every fail body received.
    pub fails: Vec<Value>,
    /// Stored results: (meta, PNG images). A repeated upload is answered 200, not stored.
    pub results: Vec<(Value, Vec<Vec<u8>>)>,
    pub uploads: u32,
    pub leases: u32,
    /// When the current lease runs out (renewed by progress); then the job is queued again.
    pub lease_until: Option<Instant>,
}

impl StudioJob {
    fn lease(&self) -> Duration {
        Duration::from_secs(
            self.body
                .get("leaseS")
                .and_then(Value::as_u64)
                .unwrap_or(120),
        )
    }
}

/// A way to misbehave, applied to the next matching requests.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer this status with a JSON error body, without touching state.
    Status(u16),
    /// Answer this status with `Retry-After: seconds`, without touching state.
    RetryAfter { status: u16, seconds: u64 },
    /// `200` with a body that is not JSON.
    Garbage,
    /// `200` with JSON that lacks the required fields.
    MissingFields,
    /// `200` with this JSON body, without touching state.
    Body(Value),
    /// Wait this long, then answer 503 (the client has usually given up by then).
    Hang(Duration),
    /// Handle the request for real, then wait this long before answering: the studio's
    /// state changed but the worker (whose timeout is shorter) never hears about it.
    LoseResponse(Duration),
}

#[derive(Clone, Debug)]
struct FaultRule {
    route: Option<Route>,
    fault: Fault,
    remaining: u32,
}

/// How the "operator" decides pending requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Only by hand (tests call `approve`/`reject`; the dev studio's /operator page).
    Manual,
    ApproveAfterPolls(u32),
    RejectAfterPolls(u32, String),
}

#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub route: Route,
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub user_agent: Option<String>,
    pub registration_secret: Option<String>,
    pub body: Value,
    /// When the request arrived.
    pub at: Instant,
    /// When the answer was ready (for a held claim: when the job was handed out).
    pub answered_at: Instant,
    /// The status the studio answered (after faults).
    pub status: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestStatus {
    Pending,
    Approved { worker_id: String },
    Rejected { reason: String },
}

#[derive(Clone, Debug)]
pub struct RegistrationRequest {
    pub request_id: String,
    pub install_id: String,
    pub secret_hash: String,
    pub worker_name: String,
    pub status: RequestStatus,
    pub polls: u32,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Clone, Debug)]
pub struct WorkerRecord {
    pub worker_id: String,
    pub token: String,
    pub install_id: String,
    pub worker_name: String,
    pub revoked: bool,
    pub pause: bool,
    pub heartbeats: Vec<Value>,
}

#[derive(Default)]
struct StudioState {
    requests: BTreeMap<String, RegistrationRequest>,
    workers: BTreeMap<String, WorkerRecord>,
    decision: Option<Decision>,
    faults: VecDeque<FaultRule>,
    log: Vec<RecordedRequest>,
    poll_after_s: Option<u64>,
    next_heartbeat_s: Option<u64>,
    next_id: u64,
    jobs: BTreeMap<String, StudioJob>,
    queue: VecDeque<String>,
    /// Woken when a job is queued (held claims wait on it).
    jobs_added: Arc<tokio::sync::Notify>,
    /// Answer 413 to result uploads.
    results_too_large: bool,
    /// The worker's uplink: request bodies arrive no faster than this many bytes a second.
    uplink_bytes_per_second: Option<u64>,
}

impl StudioState {
    /// Queues a job body; its `jobId`, or a new one when it has none.
    fn enqueue(&mut self, body: Value) -> String {
        let job_id = match body.get("jobId").and_then(Value::as_str) {
            Some(job_id) if !job_id.is_empty() => job_id.to_owned(),
            _ => self.new_id("nojobid"),
        };
        self.jobs.insert(
            job_id.clone(),
            StudioJob {
                job_id: job_id.clone(),
                body,
                state: JobState::Queued,
                progress: Vec::new(),
                fails: Vec::new(),
                results: Vec::new(),
                uploads: 0,
                leases: 0,
                lease_until: None,
            },
        );
        self.queue.push_back(job_id.clone());
        self.jobs_added.notify_waiters();
        job_id
    }

    fn new_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}_{:04}", self.next_id)
    }

    fn approve(&mut self, request_id: &str) -> Option<String> {
        let worker_id = self.new_id("w");
        let token = format!("tok_{}", hex::encode(rand_bytes()));
        let request = self.requests.get_mut(request_id)?;
        if request.status != RequestStatus::Pending {
            return None;
        }
        request.status = RequestStatus::Approved {
            worker_id: worker_id.clone(),
        };
        let record = WorkerRecord {
            worker_id: worker_id.clone(),
            token,
            install_id: request.install_id.clone(),
            worker_name: request.worker_name.clone(),
            revoked: false,
            pause: false,
            heartbeats: Vec::new(),
        };
        self.workers.insert(worker_id.clone(), record);
        Some(worker_id)
    }
}

fn rand_bytes() -> [u8; 16] {
    let mut bytes = [0_u8; 16];
    for byte in &mut bytes {
        *byte = fastrand::u8(..);
    }
    bytes
}

/// A valid txt2img job for the scripted engine's `sd-turbo`: 64×64, 3 steps, one image.
pub fn job_body(job_id: &str) -> Value {
    json!({
        "jobId": job_id, "kind": "txt2img", "model": "sd-turbo",
        "prompt": "a lighthouse at dusk", "negativePrompt": "",
        "width": 64, "height": 64, "steps": 3, "guidanceScale": 0.0,
        "seed": 42, "numImages": 1, "scheduler": null, "leaseS": 120
    })
}

/// A running studio. Dropping it stops the server.
pub struct TestStudio {
    addr: SocketAddr,
    state: Arc<Mutex<StudioState>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TestStudio {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl TestStudio {
    /// Starts on a free port on 127.0.0.1.
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("literal address")).await
    }

    pub async fn start_on(addr: SocketAddr) -> Self {
        let state = Arc::new(Mutex::new(StudioState {
            decision: Some(Decision::Manual),
            ..StudioState::default()
        }));
        let api = Router::new()
            .route("/workers/register-request", post(create_request))
            .route("/workers/register-requests/{request_id}", get(poll_request))
            .route("/workers/{worker_id}/heartbeat", post(heartbeat))
            .route("/workers/{worker_id}/jobs/claim", post(claim))
            .route("/jobs/{job_id}/progress", post(progress))
            .route("/jobs/{job_id}/result", post(upload_result))
            .route("/jobs/{job_id}/fail", post(fail))
            // Results of four 2048² images are well over axum's 2 MB default.
            .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                record_and_misbehave,
            ));
        let operator = Router::new()
            .route("/", get(operator_page))
            .route("/requests", get(operator_list))
            .route("/requests/{request_id}/approve", post(operator_approve))
            .route("/requests/{request_id}/reject", post(operator_reject))
            .route("/workers/{worker_id}/revoke", post(operator_revoke))
            .route("/workers/{worker_id}/pause", post(operator_pause))
            .route("/workers/{worker_id}/resume", post(operator_resume))
            .route("/jobs", post(operator_enqueue))
            .route("/jobs/{job_id}", get(operator_job));
        let app = Router::new()
            .nest("/api", api)
            .nest("/operator", operator)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind the test studio");
        let addr = listener.local_addr().expect("bound address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            state,
            server,
        }
    }

    /// Queues a job body (as the studio would send it in a claim).
    pub fn enqueue(&self, body: Value) -> String {
        self.state().enqueue(body)
    }

    pub fn job(&self, job_id: &str) -> Option<StudioJob> {
        self.state().jobs.get(job_id).cloned()
    }

    pub fn jobs(&self) -> Vec<StudioJob> {
        self.state().jobs.values().cloned().collect()
    }

    /// The submitter cancels the job.
    pub fn cancel_job(&self, job_id: &str) {
        if let Some(job) = self.state().jobs.get_mut(job_id) {
            job.state = JobState::Cancelled;
        }
    }

    /// The lease is taken away (expired, reassigned): the worker gets 409 from now on.
    pub fn steal_job(&self, job_id: &str) {
        if let Some(job) = self.state().jobs.get_mut(job_id) {
            job.state = JobState::Leased {
                worker_id: "w_someone_else".to_owned(),
            };
        }
    }

    pub fn set_results_too_large(&self, too_large: bool) {
        self.state().results_too_large = too_large;
    }

    /// A slow home uplink: every request body is read no faster than `bytes_per_second`
    /// (the worker's request is not finished until its last byte arrived). `None`: as fast
    /// as loopback.
    pub fn set_uplink(&self, bytes_per_second: Option<u64>) {
        self.state().uplink_bytes_per_second = bytes_per_second;
    }

    /// The worker's `api_base_url` for this studio.
    pub fn url(&self) -> String {
        format!("http://{}/api", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn state(&self) -> MutexGuard<'_, StudioState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_decision(&self, decision: Decision) {
        self.state().decision = Some(decision);
    }

    pub fn set_poll_after_s(&self, seconds: Option<u64>) {
        self.state().poll_after_s = seconds;
    }

    pub fn set_next_heartbeat_s(&self, seconds: Option<u64>) {
        self.state().next_heartbeat_s = seconds;
    }

    /// Misbehave on the next `times` requests to `route` (`None`: any route).
    pub fn inject(&self, route: Option<Route>, fault: Fault, times: u32) {
        self.state().faults.push_back(FaultRule {
            route,
            fault,
            remaining: times,
        });
    }

    /// How many injected faults still wait for requests to `route`.
    pub fn pending_faults(&self, route: Route) -> u32 {
        self.state()
            .faults
            .iter()
            .filter(|rule| rule.route == Some(route))
            .map(|rule| rule.remaining)
            .sum()
    }

    pub fn clear_faults(&self) {
        self.state().faults.clear();
    }

    pub fn approve(&self, request_id: &str) -> Option<String> {
        self.state().approve(request_id)
    }

    pub fn reject(&self, request_id: &str, reason: &str) {
        if let Some(request) = self.state().requests.get_mut(request_id) {
            request.status = RequestStatus::Rejected {
                reason: reason.to_owned(),
            };
        }
    }

    /// The studio loses the request (expired, purged): polls get 404.
    pub fn forget(&self, request_id: &str) {
        self.state().requests.remove(request_id);
    }

    pub fn revoke(&self, worker_id: &str) {
        if let Some(worker) = self.state().workers.get_mut(worker_id) {
            worker.revoked = true;
        }
    }

    pub fn set_pause(&self, worker_id: &str, pause: bool) {
        if let Some(worker) = self.state().workers.get_mut(worker_id) {
            worker.pause = pause;
        }
    }

    pub fn requests(&self) -> Vec<RegistrationRequest> {
        self.state().requests.values().cloned().collect()
    }

    pub fn pending_request_ids(&self) -> Vec<String> {
        self.state()
            .requests
            .values()
            .filter(|r| r.status == RequestStatus::Pending)
            .map(|r| r.request_id.clone())
            .collect()
    }

    pub fn worker(&self, worker_id: &str) -> Option<WorkerRecord> {
        self.state().workers.get(worker_id).cloned()
    }

    pub fn workers(&self) -> Vec<WorkerRecord> {
        self.state().workers.values().cloned().collect()
    }

    /// Every request received, in order.
    pub fn log(&self) -> Vec<RecordedRequest> {
        self.state().log.clone()
    }

    pub fn log_for(&self, route: Route) -> Vec<RecordedRequest> {
        self.state()
            .log
            .iter()
            .filter(|r| r.route == route)
            .cloned()
            .collect()
    }

    pub fn count(&self, route: Route) -> usize {
        self.state().log.iter().filter(|r| r.route == route).count()
    }
}

type Shared = Arc<Mutex<StudioState>>;

fn lock(state: &Shared) -> MutexGuard<'_, StudioState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// Records every API request and applies the first matching fault rule.
async fn record_and_misbehave(
    State(state): State<Shared>,
    request: Request,
    next: Next,
) -> Response {
    let arrived = Instant::now();
    let (parts, body) = request.into_parts();
    // Inside `nest("/api", …)` the URI is stripped of `/api`; record what the worker sent.
    let path = parts
        .extensions
        .get::<axum::extract::OriginalUri>()
        .map_or_else(|| parts.uri.path().to_owned(), |uri| uri.path().to_owned());
    let route = Route::of(&path);
    // The fault is chosen when the request arrives, as a real server's trouble would be.
    let (fault, uplink) = {
        let mut state = lock(&state);
        let index = state
            .faults
            .iter()
            .position(|rule| rule.route.is_none_or(|r| r == route));
        let fault = index.map(|index| {
            let rule = &mut state.faults[index];
            rule.remaining = rule.remaining.saturating_sub(1);
            let fault = rule.fault.clone();
            if rule.remaining == 0 {
                state.faults.remove(index);
            }
            fault
        });
        (fault, state.uplink_bytes_per_second)
    };
    // A slow uplink slows the requests the studio reads to the end; a fault answered at once
    // reads the rest of the body at full speed.
    let handled_for_real = matches!(fault, None | Some(Fault::LoseResponse(_)));
    let bytes = match uplink {
        Some(bytes_per_second) if handled_for_real => read_slowly(body, bytes_per_second).await,
        _ => axum::body::to_bytes(body, 64 * 1024 * 1024)
            .await
            .unwrap_or_default(),
    };
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut recorded = RecordedRequest {
        route,
        method: parts.method.to_string(),
        path: path.clone(),
        authorization: header("authorization"),
        user_agent: header("user-agent"),
        registration_secret: header("x-registration-secret"),
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        at: arrived,
        answered_at: Instant::now(),
        status: 0,
    };

    let response = match fault {
        None => next.run(Request::from_parts(parts, bytes.into())).await,
        Some(Fault::Status(code)) => error(
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "injected fault",
        ),
        Some(Fault::RetryAfter { status, seconds }) => {
            let mut response = error(
                StatusCode::from_u16(status).unwrap_or(StatusCode::TOO_MANY_REQUESTS),
                "slow down",
            );
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&seconds.to_string()).expect("digits are a header value"),
            );
            response
        }
        Some(Fault::Garbage) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            "<html>502 Bad Gateway</html>",
        )
            .into_response(),
        Some(Fault::MissingFields) => {
            (StatusCode::OK, Json(json!({ "unexpected": true }))).into_response()
        }
        Some(Fault::Body(body)) => (StatusCode::OK, Json(body)).into_response(),
        Some(Fault::Hang(duration)) => {
            tokio::time::sleep(duration).await;
            error(StatusCode::SERVICE_UNAVAILABLE, "hung")
        }
        Some(Fault::LoseResponse(duration)) => {
            let response = next.run(Request::from_parts(parts, bytes.into())).await;
            tokio::time::sleep(duration).await;
            response
        }
    };
    recorded.status = response.status().as_u16();
    recorded.answered_at = Instant::now();
    lock(&state).log.push(recorded);
    response
}

/// Reads a request body no faster than `bytes_per_second`: after each chunk, waits until the
/// bytes so far would have taken that long.
async fn read_slowly(body: axum::body::Body, bytes_per_second: u64) -> Bytes {
    use futures_util::StreamExt as _;
    let started = tokio::time::Instant::now();
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(Ok(chunk)) = stream.next().await {
        bytes.extend_from_slice(&chunk);
        let due = Duration::from_secs_f64(bytes.len() as f64 / bytes_per_second.max(1) as f64);
        tokio::time::sleep_until(started + due).await;
    }
    Bytes::from(bytes)
}

fn is_hex64(text: &str) -> bool {
    text.len() == 64 && text.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'))
}

async fn create_request(State(state): State<Shared>, body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "body is not JSON");
    };
    let field = |name: &str| body.get(name).and_then(Value::as_str).map(str::to_owned);
    let (Some(install_id), Some(secret_hash), Some(worker_name)) = (
        field("installId"),
        field("registrationSecretHash"),
        field("workerName"),
    ) else {
        return error(
            StatusCode::BAD_REQUEST,
            "installId, registrationSecretHash and workerName are required",
        );
    };
    if uuid::Uuid::parse_str(&install_id).map(|u| u.get_version_num()) != Ok(4) {
        return error(StatusCode::BAD_REQUEST, "installId must be a UUID v4");
    }
    if !is_hex64(&secret_hash) {
        return error(
            StatusCode::BAD_REQUEST,
            "registrationSecretHash must be 64 lowercase hex",
        );
    }
    if body.get("capabilities").is_none_or(|c| !c.is_object()) {
        return error(StatusCode::BAD_REQUEST, "capabilities are required");
    }
    let mut state = lock(&state);
    // Creating twice with the same install id and secret (a retry after a lost response)
    // gives the same request.
    if let Some(existing) = state.requests.values().find(|r| {
        r.install_id == install_id
            && r.secret_hash == secret_hash
            && r.status == RequestStatus::Pending
    }) {
        return (
            StatusCode::OK,
            Json(json!({ "requestId": existing.request_id })),
        )
            .into_response();
    }
    let request_id = state.new_id("rr");
    state.requests.insert(
        request_id.clone(),
        RegistrationRequest {
            request_id: request_id.clone(),
            install_id,
            secret_hash,
            worker_name,
            status: RequestStatus::Pending,
            polls: 0,
            created_at: chrono::Utc::now(),
        },
    );
    (
        StatusCode::CREATED,
        Json(json!({ "requestId": request_id })),
    )
        .into_response()
}

async fn poll_request(
    State(state): State<Shared>,
    Path(request_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut state = lock(&state);
    let decision = state.decision.clone().unwrap_or(Decision::Manual);
    let poll_after_s = state.poll_after_s;
    let Some(request) = state.requests.get_mut(&request_id) else {
        return error(StatusCode::NOT_FOUND, "no such registration request");
    };
    let secret = headers
        .get("x-registration-secret")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if hex::encode(Sha256::digest(secret.as_bytes())) != request.secret_hash {
        return error(StatusCode::FORBIDDEN, "secret does not match");
    }
    request.polls += 1;
    let polls = request.polls;
    if request.status == RequestStatus::Pending {
        match decision {
            Decision::ApproveAfterPolls(n) if polls >= n => {
                state.approve(&request_id);
            }
            Decision::RejectAfterPolls(n, reason) if polls >= n => {
                if let Some(request) = state.requests.get_mut(&request_id) {
                    request.status = RequestStatus::Rejected { reason };
                }
            }
            _ => {}
        }
    }
    let status = state.requests.get(&request_id).map(|r| r.status.clone());
    match status {
        Some(RequestStatus::Pending) => {
            Json(json!({ "status": "pending", "pollAfterS": poll_after_s.unwrap_or(30) }))
                .into_response()
        }
        Some(RequestStatus::Approved { worker_id }) => {
            let token = state
                .workers
                .get(&worker_id)
                .map(|w| w.token.clone())
                .unwrap_or_default();
            Json(json!({ "status": "approved", "workerId": worker_id, "authToken": token }))
                .into_response()
        }
        Some(RequestStatus::Rejected { reason }) => {
            // The decision is delivered once; the request is then gone.
            state.requests.remove(&request_id);
            Json(json!({ "status": "rejected", "reason": reason })).into_response()
        }
        None => error(StatusCode::NOT_FOUND, "no such registration request"),
    }
}

async fn heartbeat(
    State(state): State<Shared>,
    Path(worker_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut state = lock(&state);
    let next_heartbeat_s = state.next_heartbeat_s;
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    let Some(worker) = state.workers.get_mut(&worker_id) else {
        return error(StatusCode::UNAUTHORIZED, "unknown worker");
    };
    if worker.revoked || worker.token != bearer {
        return error(StatusCode::UNAUTHORIZED, "token not accepted");
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "body is not JSON");
    };
    for required in ["state", "capabilities", "stats", "sentAt"] {
        if body.get(required).is_none() {
            return error(StatusCode::BAD_REQUEST, &format!("{required} is required"));
        }
    }
    worker.heartbeats.push(body);
    let pause = worker.pause;
    // The first good heartbeat consumes the registration request (§1.2).
    state.requests.retain(|_, r| {
        r.status
            != RequestStatus::Approved {
                worker_id: worker_id.clone(),
            }
    });
    Json(json!({ "nextHeartbeatS": next_heartbeat_s.unwrap_or(30), "pause": pause }))
        .into_response()
}

/// Jobs whose lease ran out without progress go back in the queue, as a real studio does
/// (this is how a claim whose answer never reached the worker gets done after all).
fn requeue_expired(state: &mut StudioState) {
    let now = Instant::now();
    let expired: Vec<String> = state
        .jobs
        .values()
        .filter(|job| {
            matches!(job.state, JobState::Leased { .. })
                && job.lease_until.is_some_and(|until| until < now)
        })
        .map(|job| job.job_id.clone())
        .collect();
    for job_id in expired {
        if let Some(job) = state.jobs.get_mut(&job_id) {
            job.state = JobState::Queued;
            job.lease_until = None;
        }
        state.queue.push_back(job_id);
    }
}

fn bearer(headers: &HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
}

/// The worker whose (unrevoked) bearer token this is.
fn bearer_worker(state: &StudioState, headers: &HeaderMap) -> Option<String> {
    let token = bearer(headers);
    state
        .workers
        .values()
        .find(|w| !w.revoked && w.token == token)
        .map(|w| w.worker_id.clone())
}

async fn claim(
    State(state): State<Shared>,
    Path(worker_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "body is not JSON");
    };
    if !body.get("models").is_some_and(Value::is_array) {
        return error(StatusCode::BAD_REQUEST, "models is required");
    }
    let wait = Duration::from_secs(
        body.get("waitS")
            .and_then(Value::as_u64)
            .unwrap_or(0)
            .min(30),
    );
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let jobs_added = {
            let mut state = lock(&state);
            if bearer_worker(&state, &headers).as_deref() != Some(worker_id.as_str()) {
                return error(StatusCode::UNAUTHORIZED, "token not accepted");
            }
            requeue_expired(&mut state);
            // A job cancelled while it waited in the queue is never handed out.
            while let Some(job_id) = state.queue.front() {
                if state
                    .jobs
                    .get(job_id)
                    .is_some_and(|job| job.state == JobState::Queued)
                {
                    break;
                }
                state.queue.pop_front();
            }
            if let Some(job_id) = state.queue.pop_front() {
                let job = state.jobs.get_mut(&job_id).expect("queued jobs exist");
                job.state = JobState::Leased {
                    worker_id: worker_id.clone(),
                };
                job.leases += 1;
                job.lease_until = Some(Instant::now() + job.lease());
                return Json(json!({ "job": job.body })).into_response();
            }
            state.jobs_added.clone()
        };
        let added = jobs_added.notified();
        tokio::pin!(added);
        added.as_mut().enable();
        // A job queued between the check and `enable` is caught by checking once more.
        if !lock(&state).queue.is_empty() {
            continue;
        }
        if tokio::time::timeout_at(deadline, added).await.is_err() {
            return StatusCode::NO_CONTENT.into_response();
        }
    }
}

/// Who is calling (by bearer token) and the JSON body, or the error to answer with.
#[allow(clippy::result_large_err)] // a test server: clarity over the size of `Response`
fn job_call(
    state: &StudioState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(String, Value), Response> {
    let worker_id = bearer_worker(state, headers)
        .ok_or_else(|| error(StatusCode::UNAUTHORIZED, "token not accepted"))?;
    let body = serde_json::from_slice::<Value>(body)
        .map_err(|_| error(StatusCode::BAD_REQUEST, "body is not JSON"))?;
    Ok((worker_id, body))
}

async fn progress(
    State(state): State<Shared>,
    Path(job_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut state = lock(&state);
    let (worker_id, body) = match job_call(&state, &headers, &body) {
        Ok(call) => call,
        Err(answer) => return answer,
    };
    let Some(job) = state.jobs.get_mut(&job_id) else {
        return error(StatusCode::NOT_FOUND, "no such job");
    };
    job.progress.push(body);
    match &job.state {
        JobState::Cancelled => Json(json!({ "cancel": true })).into_response(),
        JobState::Leased { worker_id: holder } if *holder == worker_id => {
            job.lease_until = Some(Instant::now() + job.lease());
            Json(json!({ "cancel": false, "leaseS": job.lease().as_secs() })).into_response()
        }
        _ => error(StatusCode::CONFLICT, "this job is not yours"),
    }
}

async fn upload_result(
    State(state): State<Shared>,
    Path(job_id): Path<String>,
    headers: HeaderMap,
    mut multipart: axum::extract::Multipart,
) -> Response {
    let mut meta = Value::Null;
    let mut images = Vec::new();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(err) => return error(StatusCode::BAD_REQUEST, &format!("bad multipart: {err}")),
        };
        let name = field.name().unwrap_or_default().to_owned();
        let content_type = field.content_type().unwrap_or_default().to_owned();
        let Ok(bytes) = field.bytes().await else {
            return error(StatusCode::BAD_REQUEST, "unreadable part");
        };
        match (name.as_str(), content_type.as_str()) {
            ("meta", "application/json") => {
                meta = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            }
            ("image", "image/png") => images.push(bytes.to_vec()),
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("unexpected part {name} ({content_type})"),
                );
            }
        }
    }
    let mut state = lock(&state);
    let Some(worker_id) = bearer_worker(&state, &headers) else {
        return error(StatusCode::UNAUTHORIZED, "token not accepted");
    };
    if meta.is_null() || images.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "meta and at least one image are required",
        );
    }
    if state.results_too_large {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "too large");
    }
    let Some(job) = state.jobs.get_mut(&job_id) else {
        return error(StatusCode::NOT_FOUND, "no such job");
    };
    job.uploads += 1;
    match job.state.clone() {
        // A retry after a lost answer: success, nothing stored twice (§3.3).
        JobState::Done { worker_id: holder } if holder == worker_id => {
            StatusCode::OK.into_response()
        }
        JobState::Leased { worker_id: holder } if holder == worker_id => {
            job.results.push((meta, images));
            job.state = JobState::Done { worker_id };
            StatusCode::CREATED.into_response()
        }
        JobState::Cancelled => error(StatusCode::GONE, "cancelled"),
        _ => error(StatusCode::CONFLICT, "this job is not yours"),
    }
}

async fn fail(
    State(state): State<Shared>,
    Path(job_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut state = lock(&state);
    let (worker_id, body) = match job_call(&state, &headers, &body) {
        Ok(call) => call,
        Err(answer) => return answer,
    };
    let code = body
        .get("code")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let retryable = body
        .get("retryable")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let Some(job) = state.jobs.get_mut(&job_id) else {
        return error(StatusCode::NOT_FOUND, "no such job");
    };
    job.fails.push(body);
    let holder =
        matches!(&job.state, JobState::Leased { worker_id: holder } if *holder == worker_id);
    if !holder {
        return error(StatusCode::CONFLICT, "this job is not yours");
    }
    if retryable {
        // Back in the queue, for this or another worker.
        job.state = JobState::Queued;
        state.queue.push_back(job_id);
        state.jobs_added.notify_waiters();
    } else {
        job.state = JobState::Failed { code };
    }
    StatusCode::OK.into_response()
}

async fn operator_list(State(state): State<Shared>) -> Response {
    let state = lock(&state);
    let requests: Vec<Value> = state
        .requests
        .values()
        .map(|r| {
            json!({
                "requestId": r.request_id,
                "workerName": r.worker_name,
                "installId": r.install_id,
                "status": format!("{:?}", r.status),
                "polls": r.polls,
                "createdAt": r.created_at,
            })
        })
        .collect();
    let workers: Vec<Value> = state
        .workers
        .values()
        .map(|w| {
            json!({
                "workerId": w.worker_id,
                "workerName": w.worker_name,
                "revoked": w.revoked,
                "pause": w.pause,
                "heartbeats": w.heartbeats.len(),
                "lastHeartbeat": w.heartbeats.last(),
            })
        })
        .collect();
    Json(json!({ "requests": requests, "workers": workers })).into_response()
}

/// A browser (the operator page's forms) goes back to the page; a script gets `answer`.
fn answer_operator(headers: &HeaderMap, answer: Response) -> Response {
    let from_browser = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if from_browser && answer.status().is_success() {
        axum::response::Redirect::to("/operator/").into_response()
    } else {
        answer
    }
}

/// Queues the job in the body (the claim's job JSON), for scripts: `{"jobId": …}`.
async fn operator_enqueue(State(state): State<Shared>, body: Bytes) -> Response {
    match serde_json::from_slice::<Value>(&body) {
        Ok(job) if job.is_object() => {
            let job_id = lock(&state).enqueue(job);
            Json(json!({ "jobId": job_id })).into_response()
        }
        _ => error(StatusCode::BAD_REQUEST, "the body is not a job object"),
    }
}

/// Where a job is: `{"jobId", "state": queued|leased|done|failed|cancelled, "code"?,
/// "images", "progressReports"}`.
async fn operator_job(State(state): State<Shared>, Path(job_id): Path<String>) -> Response {
    let state = lock(&state);
    let Some(job) = state.jobs.get(&job_id) else {
        return error(StatusCode::NOT_FOUND, "no such job");
    };
    let (name, code) = match &job.state {
        JobState::Queued => ("queued", None),
        JobState::Leased { .. } => ("leased", None),
        JobState::Done { .. } => ("done", None),
        JobState::Failed { code } => ("failed", Some(code.clone())),
        JobState::Cancelled => ("cancelled", None),
    };
    let images: usize = job.results.iter().map(|(_, images)| images.len()).sum();
    Json(json!({
        "jobId": job.job_id, "state": name, "code": code, "images": images,
        "progressReports": job.progress.len(),
    }))
    .into_response()
}

async fn operator_approve(
    State(state): State<Shared>,
    Path(request_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let answer = match lock(&state).approve(&request_id) {
        Some(worker_id) => Json(json!({ "workerId": worker_id })).into_response(),
        None => error(StatusCode::NOT_FOUND, "no such pending request"),
    };
    answer_operator(&headers, answer)
}

async fn operator_reject(
    State(state): State<Shared>,
    Path(request_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let reason = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("reason").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| "rejected by the operator".to_owned());
    let answer = match lock(&state).requests.get_mut(&request_id) {
        Some(request) => {
            request.status = RequestStatus::Rejected { reason };
            StatusCode::NO_CONTENT.into_response()
        }
        None => error(StatusCode::NOT_FOUND, "no such request"),
    };
    answer_operator(&headers, answer)
}

fn with_worker(
    state: &Shared,
    worker_id: &str,
    change: impl FnOnce(&mut WorkerRecord),
) -> Response {
    match lock(state).workers.get_mut(worker_id) {
        Some(worker) => {
            change(worker);
            StatusCode::NO_CONTENT.into_response()
        }
        None => error(StatusCode::NOT_FOUND, "no such worker"),
    }
}

async fn operator_revoke(
    State(state): State<Shared>,
    Path(worker_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    answer_operator(
        &headers,
        with_worker(&state, &worker_id, |w| w.revoked = true),
    )
}

async fn operator_pause(
    State(state): State<Shared>,
    Path(worker_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    answer_operator(
        &headers,
        with_worker(&state, &worker_id, |w| w.pause = true),
    )
}

async fn operator_resume(
    State(state): State<Shared>,
    Path(worker_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    answer_operator(
        &headers,
        with_worker(&state, &worker_id, |w| w.pause = false),
    )
}

/// A page for a person playing the operator: pending requests with approve/reject buttons,
/// and the approved workers.
async fn operator_page(State(state): State<Shared>) -> Html<String> {
    let state = lock(&state);
    let mut html = String::from(
        "<!doctype html><meta charset=utf-8><meta http-equiv=refresh content=5>\
         <title>dev studio · operator</title>\
         <style>body{font:15px system-ui;margin:2em}td,th{padding:.3em .8em;text-align:left}</style>\
         <h1>Registration requests</h1><table><tr><th>request</th><th>worker name</th><th>status</th><th>polls</th><th></th></tr>",
    );
    for r in state.requests.values() {
        let actions = if r.status == RequestStatus::Pending {
            format!(
                "<form method=post action=/operator/requests/{id}/approve style=display:inline><button>Approve</button></form> \
                 <form method=post action=/operator/requests/{id}/reject style=display:inline><button>Reject</button></form>",
                id = r.request_id
            )
        } else {
            String::new()
        };
        html.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{:?}</td><td>{}</td><td>{actions}</td></tr>",
            escape(&r.request_id),
            escape(&r.worker_name),
            r.status,
            r.polls
        ));
    }
    html.push_str("</table><h1>Workers</h1><table><tr><th>worker</th><th>name</th><th>heartbeats</th><th>state</th><th></th></tr>");
    for w in state.workers.values() {
        let last_state = w
            .heartbeats
            .last()
            .and_then(|h| h.get("state"))
            .and_then(Value::as_str)
            .unwrap_or("—");
        html.push_str(&format!(
            "<tr><td>{id}</td><td>{}</td><td>{}</td><td>{}{}</td><td>\
             <form method=post action=/operator/workers/{id}/{toggle} style=display:inline><button>{toggle}</button></form> \
             <form method=post action=/operator/workers/{id}/revoke style=display:inline><button>revoke</button></form></td></tr>",
            escape(&w.worker_name),
            w.heartbeats.len(),
            last_state,
            if w.revoked { " (revoked)" } else { "" },
            id = escape(&w.worker_id),
            toggle = if w.pause { "resume" } else { "pause" },
        ));
    }
    html.push_str("</table>");
    Html(html)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
